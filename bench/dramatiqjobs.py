"""The dramatiq app of bench/daemon.py: ``dramatiq bench.dramatiqjobs -p 2 -t 1``.

The Redis URL comes from the environment (BENCH_REDIS_URL) so the harness and the workers
agree. Redis runs with its default config (no fsync per write), as for python-rq.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.jobs import run_function

dramatiq.set_broker(RedisBroker(url=os.environ["BENCH_REDIS_URL"]))


@dramatiq.actor(max_retries=0)
def dramatiq_function(key: str, stamp_file: str, end_file: str) -> None:
    run_function(key, stamp_file, end_file)
