"""The daemon's scheduling core in-process: ``Daemon(MemoryStore(clock=fake))`` driven by
``step()`` (issue 8). Scripts are real processes; due times, retries and timeouts follow a
fake clock, so nothing here sleeps to wait for time to pass."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_util import script

from spoolq.daemon.supervisor import Daemon
from spoolq.model import AdminState, Message, QueueConfig, State
from spoolq.store import MemoryStore

SIGNALS = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class Clock:
    """A fake wall clock (``t``) and a fake monotonic one (``m``): time passing moves both
    (:meth:`advance`); a clock step moves ``t`` alone."""

    def __init__(self) -> None:
        self.t = time.time()
        self.m = 1000.0

    def __call__(self) -> float:
        return self.t

    def mono(self) -> float:
        return self.m

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.m += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def daemon(store: MemoryStore, clock: Clock, tmp_path: Path) -> Iterator[Daemon]:
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    d = Daemon(store, home=tmp_path, port=1, clock=clock, mono=clock.mono)
    d.setup()
    try:
        yield d
    finally:
        for job in list(d.jobs.values()):
            d.runner.terminate(job, clock())  # type: ignore[union-attr]
        d.close()
        for s, h in saved.items():
            signal.signal(s, h)


def queue(store: MemoryStore, name: str = "q", **kw: Any) -> None:
    store.create_queue(QueueConfig.from_dict({"name": name, "script": script("rq_script.sh"), **kw}))


def send(store: MemoryStore, queue: str = "q", **kw: Any) -> str:
    return store.create(queue, Message.from_dict(kw)).msg_id


def run_until(d: Daemon, cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Step the daemon (it sleeps in select until a child or the store wakes it)."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        t = d.next_timeout()
        d.step(0.2 if t is None else min(t, 0.2))


def state(store: MemoryStore, msg_id: str, queue: str = "q") -> State:
    return store.state_of(queue, msg_id)


def test_a_message_runs_to_done(daemon: Daemon, store: MemoryStore) -> None:
    queue(store)
    m = send(store, param1="done")
    run_until(daemon, lambda: state(store, m) == State.DONE, "done")
    v = store.get("q", m)
    assert v.job_status == "done sleeping" and [h["state"] for h in v.message.history] == ["que", "run", "done"]
    log = (store.message_dir("q", m) / "job" / "stdio.log").read_text()
    assert f"msg {m} count 0 param1 done" in log


def test_exit_111_waits_for_its_backoff_on_the_clock(daemon: Daemon, store: MemoryStore, clock: Clock) -> None:
    queue(store, retry={"base": 30, "factor": 1, "max_delay": 30, "jitter": 0})
    m = send(store, param1="exit", param2="111")
    run_until(daemon, lambda: state(store, m) == State.QUE and store.get("q", m).message.count == 1, "retry")
    assert store.get("q", m).message.due == pytest.approx(clock.t + 30)
    for _ in range(5):
        daemon.step(0.05)
    assert state(store, m) == State.QUE, "not due yet on the fake clock"
    assert daemon.queues["q"].wake_at == pytest.approx(clock.t + 30), "it looks again when it is due"
    clock.t += 31
    run_until(daemon, lambda: store.get("q", m).message.count == 2, "the second try")


def test_a_timeout_follows_the_clock(daemon: Daemon, store: MemoryStore, clock: Clock) -> None:
    queue(store, timeout=60, max_count=1)
    m = send(store, param1="slow", param2="300")
    run_until(daemon, lambda: bool(daemon.jobs), "the start")
    clock.advance(61)
    run_until(daemon, lambda: state(store, m) == State.ERR, "the timeout")
    assert "timeout" in store.get("q", m).job_status.lower()


def test_a_clock_step_is_no_timeout(daemon: Daemon, store: MemoryStore, clock: Clock) -> None:
    """The wall clock stepped an hour forward killed a script with a one-hour timeout at
    once, and one stepped back let a script run past its timeout (audit): timeouts are
    durations, on the monotonic clock."""
    queue(store, timeout=3600, max_count=1)
    m = send(store, param1="slow", param2="300")
    run_until(daemon, lambda: bool(daemon.jobs), "the start")
    clock.t += 3601  # a step: no time has passed
    for _ in range(10):
        daemon.step(0.02)
    assert state(store, m) == State.RUN, store.get("q", m).job_status
    clock.t -= 7200  # stepped back past the start: the timeout still comes after its hour
    clock.m += 3601
    run_until(daemon, lambda: state(store, m) == State.ERR, "the timeout")
    assert "timeout" in store.get("q", m).job_status.lower()


def test_cancel_of_a_running_message(daemon: Daemon, store: MemoryStore) -> None:
    queue(store)
    m = send(store, param1="slow", param2="300")
    run_until(daemon, lambda: bool(daemon.jobs), "the start")
    assert store.cancel("q", m) == State.RUN
    run_until(daemon, lambda: state(store, m) == State.ERR, "the cancel")
    assert store.get("q", m).job_status == "cancelled" and not daemon.jobs


def test_blocking_params_hold_back_the_second(daemon: Daemon, store: MemoryStore, tmp_path: Path) -> None:
    queue(store, num_workers=3, blocking_params=[2])
    gate = tmp_path / "gate"
    a = send(store, param1="blocking", param2="k", param3=str(gate))
    b = send(store, param1="done", param2="k")
    c = send(store, param1="done", param2="other")
    run_until(daemon, lambda: state(store, c) == State.DONE, "the unblocked one")
    assert state(store, a) == State.RUN and state(store, b) == State.QUE
    gate.touch()
    run_until(daemon, lambda: state(store, b) == State.DONE, "the blocked one, after the first")


def test_coalesced_duplicates_end_with_their_parent(daemon: Daemon, store: MemoryStore) -> None:
    queue(store, coalesce_params=[2])
    parent = send(store, param1="done", param2="same")
    dups = [send(store, param1="done", param2="same") for _ in range(3)]
    other = send(store, param1="done", param2="different")
    run_until(daemon, lambda: state(store, other) == State.DONE and state(store, parent) == State.DONE, "both")
    for d in dups:
        v = store.get("q", d)
        assert v.state == State.DONE and v.message.dup.endswith(f"/q/q/{parent}"), v
    assert store.get("q", parent).message.dups == [f"http://127.0.0.1:1/q/q/{d}" for d in dups]


def test_a_paused_queue_starts_nothing_until_resumed(daemon: Daemon, store: MemoryStore) -> None:
    queue(store)
    store.set_admin_state("q", AdminState.PAUSE)
    m = send(store, param1="done")
    for _ in range(5):
        daemon.step(0.05)
    assert state(store, m) == State.QUE
    store.set_admin_state("q", AdminState.UP)
    run_until(daemon, lambda: state(store, m) == State.DONE, "resumed")


def test_a_missing_script_is_scripterror_and_holds_the_rest(daemon: Daemon, store: MemoryStore,
                                                             tmp_path: Path) -> None:
    store.create_queue(QueueConfig.from_dict({"name": "q", "script": str(tmp_path / "missing.sh")}))
    first, second = send(store), send(store)
    run_until(daemon, lambda: state(store, first) == State.ERR, "the first err")
    for _ in range(5):
        daemon.step(0.05)
    assert state(store, second) == State.QUE and store.script_error("q")


def test_an_expired_lease_is_reclaimed_at_start(store: MemoryStore, clock: Clock, tmp_path: Path) -> None:
    """A host died holding an attempt: the next daemon's start finishes it as a crash."""
    queue(store)
    m = send(store, param1="done")
    gone = store.claim("q", owner="dead-host", lease=30, now=clock.t)
    assert gone is not None and not isinstance(gone, float)
    store.heartbeat(gone, lease=30, runner="999999 1")  # a process that does not exist
    clock.t += 31
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    d = Daemon(store, home=tmp_path, port=1, clock=clock)
    d.setup()
    try:
        v = store.get("q", m)
        assert (v.state, v.message.count) == (State.QUE, 1), "requeued by recovery, count + 1"
        run_until(d, lambda: state(store, m) == State.DONE, "the rerun")
    finally:
        d.close()
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_lost_lease_stops_the_script_and_finishes_nothing(daemon: Daemon, store: MemoryStore,
                                                            clock: Clock) -> None:
    """A partitioned host: its lease ran out (it could not renew) and another host took the
    attempt over. Its next renewal is refused, it stops the script, and its outcome is not
    stored: the other host's finish is the one that counts."""
    queue(store)
    m = send(store, param1="slow", param2="300")
    run_until(daemon, lambda: bool(daemon.jobs), "the start")
    (job,) = daemon.jobs.values()
    clock.t += 31  # past the lease, before the daemon renewed it
    (taken,) = store.reclaim("q", owner="other-host", lease=30)
    run_until(daemon, lambda: not daemon.jobs, "the script stopped")
    assert job.lost and state(store, m) == State.RUN, "still the other host's"
    assert "lost its lease" not in store.get("q", m).job_status
    store.finish(taken, State.DONE, status="finished by the other host")
    assert store.get("q", m).job_status == "finished by the other host"


def test_leases_are_renewed_while_a_script_runs(daemon: Daemon, store: MemoryStore, clock: Clock) -> None:
    queue(store)
    m = send(store, param1="slow", param2="300")
    run_until(daemon, lambda: bool(daemon.jobs), "the start")
    for _ in range(4):  # 40 s of fake time in steps shorter than the renewal period
        clock.t += 10
        daemon.step(0)
    assert store.reclaim("q", owner="other-host", lease=30) == [], "the lease is alive"
    assert state(store, m) == State.RUN


def test_a_dead_hosts_attempt_is_recovered_while_the_daemon_runs(daemon: Daemon, store: MemoryStore,
                                                                 clock: Clock) -> None:
    queue(store)
    m = send(store, param1="done")
    store.set_admin_state("q", AdminState.PAUSE)  # so that only the dead host claims it
    store.set_admin_state("q", AdminState.UP)
    dead = store.claim("q", owner="dead-host", lease=30)
    assert dead is not None and not isinstance(dead, float)
    clock.t += 31
    run_until(daemon, lambda: state(store, m) == State.DONE, "the rerun on this host")
    assert store.get("q", m).message.count == 1
