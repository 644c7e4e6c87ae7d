"""The huey app of bench/daemon.py: ``huey_consumer bench.hueyjobs.huey``; jobs in bench/jobs.py.

The database path comes from the environment (BENCH_HUEY_DB) so the harness and the consumer
agree. ``fsync=True`` makes huey's SQLite storage durable per task, as spoolq is per message.
"""

from __future__ import annotations

import os

from huey import SqliteHuey

from bench.jobs import run_function, run_program

huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"], fsync=True)


@huey.task()
def huey_program(prog: str, key: str, stamp_file: str, end_file: str) -> None:
    run_program(prog, key, stamp_file, end_file)


@huey.task()
def huey_function(key: str, stamp_file: str, end_file: str) -> None:
    run_function(key, stamp_file, end_file)
