"""Helpers shared by the HTTP tests: a real server in a thread, and a stand-in job runner.

``fake_run`` plays the daemon's part for tests of the HTTP layer alone: it moves a message
to run, appends to its ``job/stdio.log`` as a queue script would, then finishes it. Tests
of the whole system use the real ``spoolq serve`` instead (test_ui_browser.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import fs

import spoolq
from spoolq.model import State

SPOOLQ = str(Path(sys.executable).parent / "spoolq")
TOKEN = "test-token-0123456789abcdef"
"""The token the in-process apps and test daemons are given (SPOOLQ_TOKEN)."""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_run(client: spoolq.Client, queue: str, msg_id: str, lines: list[str], *, delay: float = 0.0,
             final: State = State.DONE, started: threading.Event | None = None) -> None:
    """Move que -> run, write ``lines`` to the job log (``delay`` apart), then -> ``final``."""
    client.store.move(queue, msg_id, State.QUE, State.RUN)
    log = fs(client).message_dir(queue, msg_id) / "job" / "stdio.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab", buffering=0) as f:
        for i, line in enumerate(lines):
            f.write(line.encode())
            if i == 0 and started is not None:
                started.set()
            if delay:
                time.sleep(delay)
    client.store.set_status(queue, msg_id, "finished")
    client.store.move(queue, msg_id, State.RUN, final)


@contextmanager
def daemon(root: Path, port: int, token: str | None = TOKEN, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Run the real ``spoolq serve`` on ``root``; yields its base URL; stops it after.

    ``token`` goes in SPOOLQ_TOKEN; None lets the daemon make ``<root>/token`` itself."""
    env = dict(os.environ)
    env.pop("SPOOLQ_ROOT", None)
    env.pop("SPOOLQ_TOKEN", None)
    env.pop("SPOOLQ_ANONYMOUS", None)
    if token:
        env["SPOOLQ_TOKEN"] = token
    args = [SPOOLQ, "--root", str(root), "serve", "--port", str(port), *extra]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"spoolq serve exited {proc.returncode}: {out}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("spoolq serve did not answer /healthz within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def have_daemon() -> bool:
    """True when ``spoolq serve`` exists in this checkout."""
    return shutil.which(SPOOLQ) is not None and subprocess.run(
        [SPOOLQ, "serve", "--help"], capture_output=True).returncode == 0
