"""Helpers for tests that drive the real ``spoolq serve`` in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import SPOOLQ

SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A running ``spoolq serve --no-http`` on one root; stderr goes to ``<root>/../daemon.log``."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None,
                 low_fds_taken: bool = False, store: str | None = None, http: bool = False) -> None:
        self.root = root  # the spool root, or with ``store`` (a URL) the daemon's --home
        self.store = store
        self.http = http  # serve HTTP on self.port too (the token in --home: use --trust-loopback)
        self.args = args
        self.env = env
        self.low_fds_taken = low_fds_taken  # start with fds 3 and 4 open (as s6 or systemd may)
        self.port = free_port()
        self.log_path = root.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> Served:
        e = dict(os.environ)
        e.pop("SPOOLQ_ROOT", None)
        if self.env:
            e.update(self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._mark = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [SPOOLQ, "--root", self.store or str(self.root), "serve", *(() if self.http else ("--no-http",)),
             "--port", str(self.port), "-v",
             *(("--home", str(self.root)) if self.store else ()), *self.args],
            stdout=self._log, stderr=self._log, env=e, start_new_session=True,
            **(_low_fds_kwargs() if self.low_fds_taken else {}))
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(lambda: "serving " in self.log_path.read_text(errors="replace")[self._mark:]
                 or (self.proc is not None and self.proc.poll() is not None), timeout)
        assert self.proc is not None and self.proc.poll() is None, f"daemon died:\n{self.log()}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        """SIGKILL the daemon alone (its scripts live on as orphans, as after a crash)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def cpu_ticks(self) -> int:
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime


def _low_fds_kwargs() -> dict[str, Any]:
    def setup() -> None:
        nul = os.open(os.devnull, os.O_RDWR)
        os.dup2(nul, 3)
        os.dup2(nul, 4)
    return {"preexec_fn": setup, "pass_fds": (3, 4)}


def wait_for(cond: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll ``cond`` (tests only; the daemon itself never polls) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def script(name: str) -> str:
    return str(SCRIPTS / name)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def stop_all(served: list[Served]) -> None:
    for s in served:
        if s.proc is not None and s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            s.proc.wait(10)


def daemons(root: Path, *base: str) -> Iterator[Callable[..., Served]]:
    """Generator behind a test module's ``daemon`` fixture: ``start(*extra, env=None)`` runs
    ``spoolq serve`` on ``root`` with ``base`` then ``extra``; those still running are
    stopped (SIGTERM) at the end."""
    started: list[Served] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> Served:
        s = Served(root, *base, *extra, env=env).start()
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.stop()


def pg_hosts(pg_url: str, tmp_path: Path, *base: str) -> Iterator[Callable[..., list[Served]]]:
    """Generator behind a ``hosts`` fixture: ``start(n, *args)`` starts n daemons ("hosts")
    on the database ``pg_url``, each with a --home of its own under ``tmp_path``."""
    started: list[Served] = []

    def start(n: int = 1, *args: str) -> list[Served]:
        for _ in range(n):
            home = tmp_path / f"host{len(started)}" / "home"
            home.parent.mkdir()
            started.append(Served(home, *base, *args, store=pg_url).start())
        return started[-n:]

    yield start
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.stop()


def serve_fixture(root: Path) -> Any:
    """Generator behind the ``serve`` fixture: ``serve(*args)`` starts a daemon (grace 1 s)."""
    started: list[Served] = []

    def start(*args: str, wait: bool = True, env: dict[str, str] | None = None,
              low_fds_taken: bool = False) -> Served:
        if not any(a.startswith("--grace") for a in args):
            args = ("--grace", "1", *args)
        s = Served(root, *args, env=env, low_fds_taken=low_fds_taken)
        started.append(s)
        return s.start(wait=wait)

    yield start
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            try:
                s.stop(timeout=30)
            except subprocess.TimeoutExpired:
                pass
    stop_all(started)
