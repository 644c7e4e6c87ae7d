"""Measure spoolq's HTTP layer against a real ``spoolq serve`` (numbers for issue 4's note).

    .venv/bin/python bench/http_measure.py [--size-mb 1024] [--seconds 10] [--concurrency 8]

1. Upload a SIZE-MB attachment (multipart, streamed by curl) to a prep message through the
   JSON API and through RQ's attach/new route; download it back. Reports MB/s and the
   daemon's RSS before, peak during (sampled every 20 ms from /proc) and after.
2. API latency under load from a second process: CONCURRENCY threads for SECONDS doing a
   mix of GET /api/v1/queues/<q>, POST messages and GET message JSON; p50/p95/p99 and req/s.
Not a test: no assertions, numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

SPOOLQ = str(Path(sys.executable).parent / "spoolq")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.02)


def timed_curl(args: list[str], pid: int) -> tuple[float, int, int, str]:
    """(seconds, rss before KB, peak RSS KB, body)."""
    before = rss_kb(pid)
    s = RssSampler(pid)
    s.start()
    t0 = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, check=True)
    dt = time.perf_counter() - t0
    s.stop.set()
    s.join()
    return dt, before, max(s.peak, rss_kb(pid)), out.stdout


def load(base: str, seconds: float, concurrency: int) -> None:
    lat: dict[str, list[float]] = {"GET queue": [], "POST message": [], "GET message": []}
    ids: list[str] = []
    lock = threading.Lock()
    errors = [0]
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while time.monotonic() < deadline:
                kind = random.choice(list(lat))
                t0 = time.perf_counter()
                if kind == "GET queue":
                    r = c.get("/api/v1/queues/load")
                elif kind == "POST message":
                    r = c.post("/api/v1/queues/load/messages", json={"param1": "x", "params": {"n": 1}})
                    if r.status_code == 201:
                        with lock:
                            ids.append(r.json()["msg_id"])
                else:
                    with lock:
                        mid = random.choice(ids) if ids else None
                    if mid is None:
                        continue
                    r = c.get(f"/api/v1/queues/load/messages/{mid}")
                dt = time.perf_counter() - t0
                with lock:
                    lat[kind].append(dt)
                    if r.status_code >= 400:
                        errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(len(v) for v in lat.values())
    print(f"\nAPI under load: {concurrency} threads in a separate process, {wall:.1f} s, "
          f"{total} requests, {total / wall:.0f} req/s, {errors[0]} errors")
    for kind, v in lat.items():
        if not v:
            continue
        q = statistics.quantiles(v, n=100)
        print(f"  {kind:13s} n={len(v):6d}  p50={q[49] * 1000:6.1f} ms  p95={q[94] * 1000:6.1f} ms  "
              f"p99={q[98] * 1000:6.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=3391)
    ap.add_argument("--load-only", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        load(a.base, a.seconds, a.concurrency)
        return
    tmp = Path(tempfile.mkdtemp(prefix="spoolq-httpbench-"))
    root = tmp / "spool"
    env = {k: v for k, v in os.environ.items() if k not in ("SPOOLQ_ROOT", "SPOOLQ_TOKEN")}
    proc = subprocess.Popen([SPOOLQ, "--root", str(root), "serve", "--port", str(a.port)], env=env)
    base = f"http://127.0.0.1:{a.port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        c = httpx.Client(base_url=base, timeout=600)
        c.post("/api/v1/queues", json={"name": "big", "script": "/bin/true"}).raise_for_status()
        c.post("/api/v1/queues", json={"name": "load", "script": "/bin/true"}).raise_for_status()
        c.post("/api/v1/queues/load/pause").raise_for_status()
        print(f"daemon pid {proc.pid}, idle RSS {rss_kb(proc.pid) / 1024:.1f} MB")
        if not a.load_only:
            src = tmp / "big.bin"
            with open(src, "wb") as f:
                chunk = os.urandom(1024 * 1024)
                for _ in range(a.size_mb):
                    f.write(chunk)
            size_mb = src.stat().st_size / 1e6
            for route in ("api", "rq"):
                mid = c.post("/api/v1/queues/big/messages", json={"state": "prep"}).json()["msg_id"]
                if route == "api":
                    url, field = f"{base}/api/v1/queues/big/messages/{mid}/attachments", "file"
                else:
                    url, field = f"{base}/q/big/{mid}/attach/new", "filedata"
                dt, before, peak, body = timed_curl(["-F", f"{field}=@{src}", "-F", "x_format=json", url],
                                                    proc.pid)
                print(f"upload {size_mb:.0f} MB via {route:3s}: {dt:6.2f} s = {size_mb / dt:6.0f} MB/s; "
                      f"daemon RSS {before / 1024:.1f} MB -> peak {peak / 1024:.1f} MB "
                      f"(+{(peak - before) / 1024:.1f} MB); answer {body[:80]}")
                c.post(f"/api/v1/queues/big/messages/{mid}/commit").raise_for_status()
                time.sleep(0.5)
                name = "big.bin"
                dt, before, peak, _ = timed_curl(["-o", "/dev/null", f"{base}/q/big/{mid}/attach/{name}"],
                                                 proc.pid)
                print(f"download {size_mb:.0f} MB ({route} message): {dt:6.2f} s = {size_mb / dt:6.0f} MB/s; "
                      f"daemon RSS {before / 1024:.1f} MB -> peak {peak / 1024:.1f} MB "
                      f"(+{(peak - before) / 1024:.1f} MB)")
            src.unlink()
        worker = subprocess.run([sys.executable, __file__, "--worker", "--base", base, "--seconds",
                                 str(a.seconds), "--concurrency", str(a.concurrency)])
        print(f"daemon RSS after load {rss_kb(proc.pid) / 1024:.1f} MB")
        del worker
        print(json.dumps({"root": str(root)}))
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
