"""Jobs that bench/daemon.py gives python-rq and huey: the same work spoolq's queue script does.

Two kinds, both reported:

* ``program``: run the no-op program once per job (``subprocess.run``), as spoolq does once
  per message: /bin/true for throughput, ``stamp`` (which records its start time) for latency.
* ``function``: a no-op Python function (for latency it records ``time.time()`` itself), the
  best case for a Python job queue: no program is started at all.

The huey app is bench/hueyjobs.py. Every job appends a 2-byte marker to ``end_file`` when it
is over, so the harness sees completion the same way for rq and huey (it polls the file's size).
"""

from __future__ import annotations

import os
import subprocess
import time


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def run_program(prog: str, key: str, stamp_file: str, end_file: str) -> None:
    """Run ``prog`` once (the same program spoolq runs per message, with one argument and
    the environment its worker runs in, as spoolq's scripts get the daemon's)."""
    subprocess.run([prog, key], env={**os.environ, "STAMP_FILE": stamp_file}, check=True)
    _append(end_file, b"x\n")


def run_function(key: str, stamp_file: str, end_file: str) -> None:
    """No program: record the start time in-process."""
    if stamp_file:
        _append(stamp_file, f"{key} {time.time():.9f}\n".encode())
    _append(end_file, b"x\n")
