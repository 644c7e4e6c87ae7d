"""Shared fixtures: a fresh spool root per test, and the real ``spoolq`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import spoolq
from spoolq.store.fs import FsStore

SPOOLQ = str(Path(sys.executable).parent / "spoolq")
T = TypeVar("T")


def without_hanging(fn: Callable[[], T], fifo: Path, what: str, *, errors_ok: bool = False) -> T | Exception:
    """``fn()`` on a thread, where a FIFO at ``fifo`` might block it: what it returned (or,
    with ``errors_ok``, what it raised). The test fails if it still waits after 10 s; the
    FIFO's other end is then opened, so that the thread does not wait for ever."""
    got: list[T | Exception] = []

    def run() -> None:
        try:
            got.append(fn())
        except Exception as e:
            got.append(e)
            if not errors_ok:
                raise

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        for flags in (os.O_RDONLY, os.O_WRONLY):  # whichever end the thread waits for
            try:
                os.close(os.open(fifo, flags | os.O_NONBLOCK))
            except OSError:
                pass
    assert not t.is_alive(), f"{what} blocked"
    assert got and (errors_ok or not isinstance(got[0], Exception)), f"{what} failed: {got}"
    return got[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty spool root on the same filesystem as tmp_path."""
    r = tmp_path / "spool"
    r.mkdir()
    return r


@pytest.fixture
def client(root: Path) -> spoolq.Client:
    return spoolq.open(root)


def clock_ago(seconds: float) -> Callable[[], float]:
    """A store clock ``seconds`` behind the real one (messages created in the past)."""
    return lambda: time.time() - seconds


def fs(client: spoolq.Client) -> FsStore:
    """The client's store, which the tests that look at the spool's files need to be the
    filesystem's (its paths: ``message_dir``, ``qdir``, ``root``)."""
    assert isinstance(client.store, FsStore), client.store
    return client.store


class Cli:
    """Runs the installed ``spoolq`` console script in a subprocess against one root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        e = dict(os.environ)
        e.pop("SPOOLQ_ROOT", None)
        if env:
            e.update(env)
        return subprocess.run([SPOOLQ, "--root", str(self.root), *args], input=input, env=e,
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def json(self, *args: str, **kw: Any) -> Any:
        r = self("--json", *args, **kw)
        assert r.returncode == 0, f"spoolq {' '.join(args)} exited {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)


@pytest.fixture
def cli(root: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    return Cli(root)


# -- PostgreSQL (tests/pg_cluster.py) ----------------------------------------------------------
@pytest.fixture(scope="session")
def pg_cluster() -> Any:
    """A throwaway PostgreSQL cluster for this test process (each xdist worker has its own)."""
    from pg_cluster import PgCluster, unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(why)
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: Any) -> Iterator[str]:
    """The URL of an empty, migrated database of its own (emptied again afterwards)."""
    url = str(pg_cluster.new_database())
    yield url
    pg_cluster.recycle(url)
