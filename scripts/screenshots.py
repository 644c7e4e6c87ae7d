"""Take the README's UI screenshots with Debian's chromium against a real ``spoolq serve``.

    .venv/bin/python scripts/screenshots.py      # writes docs/screenshots/*.png

Builds a small demo spool (a few queues, messages in every state, one job printing a
coloured log slowly), then shoots the dashboard and a message page while its log streams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "screenshots"
SPOOLQ = str(Path(sys.executable).parent / "spoolq")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

BUILD = r"""#!/bin/sh
steps="fetch sources|resolve dependencies|compile core|compile plugins|link|run unit tests|package|upload artifact"
i=0
echo "$steps" | tr '|' '\n' | while read -r step; do
  i=$((i + 1))
  printf '\033[1;34m==>\033[0m \033[1m%s\033[0m\n' "$step"
  printf '    \033[2m%s\033[0m %s\n' "$(date -u +%H:%M:%S)" "working on $RQ_PARAM1 ($i/8)"
  [ "$i" -eq 3 ] && printf '    \033[33mwarning:\033[0m deprecated flag -O1 ignored\n'
  [ "$i" -eq 6 ] && printf '    \033[32m✔ 412 passed\033[0m, \033[33m3 skipped\033[0m in 4.2s\n'
  sleep 1.2
done
printf '\033[1;32mBUILD OK\033[0m %s\n' "$RQ_PARAM1"
"""


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="spoolq-shots-"))
    root = tmp / "spool"
    script = tmp / "build.sh"
    script.write_text(BUILD)
    script.chmod(0o755)
    port = 3397
    env = {k: v for k, v in os.environ.items() if k not in ("SPOOLQ_ROOT", "SPOOLQ_TOKEN")}
    proc = subprocess.Popen([SPOOLQ, "--root", str(root), "serve", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        c = httpx.Client(base_url=base)
        queues = {"builds": str(script), "mail": "/bin/true", "thumbnails": "/bin/true",
                  "webhooks": "/bin/false", "reports": "/bin/true"}
        for name, s in queues.items():
            c.post("/api/v1/queues", json={"name": name, "script": s, "num_workers": 2}).raise_for_status()
        for i in range(40):
            c.post("/api/v1/queues/mail/messages", json={"param1": f"user{i}@example.com"})
        for i in range(12):
            c.post("/api/v1/queues/thumbnails/messages", json={"param1": f"img_{i:04d}.jpg"})
        for i in range(3):
            c.post("/api/v1/queues/webhooks/messages", json={"param1": f"https://hooks.example.com/{i}"})
        time.sleep(3)
        c.post("/api/v1/queues/reports/pause")
        for i in range(7):
            c.post("/api/v1/queues/reports/messages", json={"param1": f"2026-11-{i + 1:02d}"})
        for i in range(9):
            c.post("/api/v1/queues/thumbnails/messages", json={"param1": f"img_{i:04d}.png", "delay": 600})
        c.post("/api/v1/queues/builds/messages", json={"param1": "spoolq v0.1.0"})
        live = c.post("/api/v1/queues/builds/messages", json={"param1": "spoolq v0.2.0",
                                                              "params": {"branch": "main", "sha": "93666ea"}})
        mid = live.json()["msg_id"]
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = b.new_page(viewport={"width": 1280, "height": 1010})
            page.goto(base + f"/q/builds/{mid}")
            page.wait_for_function("document.getElementById('msg-state').dataset.state === 'run'"
                                   " && document.querySelectorAll('#log span.ansi').length >= 14",
                                   timeout=60_000)
            OUT.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUT / "message-live-log.png"))
            time.sleep(8)
            page.set_viewport_size({"width": 1280, "height": 560})
            page.goto(base + "/")
            time.sleep(2.5)
            page.screenshot(path=str(OUT / "dashboard.png"))
            b.close()
        print("wrote", OUT / "dashboard.png", OUT / "message-live-log.png")
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
