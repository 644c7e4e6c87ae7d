"""The procrastinate app that bench/pg.py runs beside spoolq: the same work per job.

Two tasks, both reported:

* ``program``: run a program once per job (``subprocess.run``), as spoolq runs its queue
  script once per message: /bin/true for throughput, ``stamp`` (bench/stamp.c, records its
  start time) for latency.
* ``function``: a no-op Python function (for latency it records ``time.time()`` itself),
  procrastinate's best case: no program is started at all.

Both are synchronous tasks: procrastinate's worker runs them in threads, up to its
``--concurrency`` at once. The database is ``$BENCH_PROC_DSN``.
"""

from __future__ import annotations

import os
import subprocess
import time

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PROC_DSN", "")))


@app.task(name="program", queue="bench")
def program(prog: str, key: str, stamp_file: str) -> None:
    env = dict(os.environ)  # as spoolq's scripts get the daemon's (bench/daemon.py NOOP_ARGV)
    if stamp_file:
        env["STAMP_FILE"] = stamp_file
    subprocess.run([prog, key], env=env, check=True)


@app.task(name="function", queue="bench")
def function(key: str, stamp_file: str) -> None:
    if stamp_file:
        fd = os.open(stamp_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{key} {time.time():.9f}\n".encode())
        finally:
            os.close(fd)
