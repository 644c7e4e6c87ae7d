"""The daemon in-process on the filesystem store, driven by ``step()``: what an audit of the
daemon's move onto the Store protocol found (issue 8). Each test failed on 25b6d5c."""
from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_util import script

from spoolq import durable
from spoolq.daemon.supervisor import Daemon
from spoolq.model import AdminState, Message, QueueConfig, State
from spoolq.store.fs import FsStore
from spoolq.store.fs.layout import message_path

SIGNALS = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


@pytest.fixture
def fsd(tmp_path: Path) -> Iterator[tuple[Daemon, FsStore]]:
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    root = tmp_path / "root"
    FsStore(root).ensure_root()
    d = Daemon(FsStore(root), home=root, port=1, sweep_interval=1e9)
    d.setup()
    client = FsStore(root)  # another process's view (the CLI)
    try:
        yield d, client
    finally:
        for job in list(d.jobs.values()):
            d.runner.terminate(job, time.time())  # type: ignore[union-attr]
        d.close()
        for s, h in saved.items():
            signal.signal(s, h)


def run_until(d: Daemon, cond: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        t = d.next_timeout()
        d.step(0.1 if t is None else min(t, 0.1))


def spin(d: Daemon, secs: float) -> None:
    end = time.monotonic() + secs
    while time.monotonic() < end:
        d.step(0.05)


def mkq(st: Any, name: str = "q", **kw: Any) -> None:
    st.create_queue(QueueConfig.from_dict({"name": name, "script": script("rq_script.sh"), **kw}))


def send(st: Any, queue: str = "q", **kw: Any) -> str:
    return st.create(queue, Message.from_dict(kw)).msg_id


def test_fsync_error_after_the_finish_rename_holds_forever(fsd: tuple[Daemon, FsStore], monkeypatch: Any) -> None:
    """The move out of run renamed, then its directory fsync failed (EIO): the retry finds the
    message gone from run and lets go (before: held for ever, the worker slot never freed)."""
    d, c = fsd
    mkq(c, num_workers=1)
    m = send(c, param1="exit", param2="111")
    run_until(d, lambda: bool(d.jobs), "the start")
    real = durable.fsync_after_rename
    calls = {"n": 0}

    def once(*a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "injected EIO after the rename")
        real(*a, **k)

    monkeypatch.setattr(durable, "fsync_after_rename", once)
    run_until(d, lambda: calls["n"] >= 1, "the finish")
    assert c.state_of("q", m) == State.QUE, "the rename happened"
    other = send(c, param1="done")
    # Let the held finish be retried a few times (1 s, 2 s, 4 s ...).
    spin(d, 8)
    assert not d.runner.finisher.held, "the finish is held for ever"  # type: ignore[union-attr]
    assert c.state_of("q", other) == State.DONE


def test_parent_gone_from_run_strands_its_duplicates_and_blocks_its_key(fsd: tuple[Daemon, FsStore],
                                                                        tmp_path: Path) -> None:
    """A running parent leaves run by hand: its finish lets go of the attempt, its held
    duplicate runs on its own and its blocking key is free again."""
    d, c = fsd
    mkq(c, num_workers=2, coalesce_params=[2], blocking_params=[4])
    gate = tmp_path / "gate"
    c.set_admin_state("q", AdminState.PAUSE)
    p = send(c, param1="blocking", param2="k", param3=str(gate), param4="B")
    time.sleep(0.01)
    dup = send(c, param1="done", param2="k")
    c.set_admin_state("q", AdminState.UP)
    run_until(d, lambda: c.state_of("q", p) == State.RUN, "the parent's start")
    spin(d, 0.5)
    assert c.state_of("q", dup) == State.QUE  # held
    # By hand: the running message is put aside (e.g. an operator moves it to err).
    src = message_path(c.qdir("q"), State.RUN, p)
    dst = message_path(c.qdir("q"), State.ERR, p)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    gate.touch()
    run_until(d, lambda: not d.jobs, "the parent's exit")
    later = send(c, param1="done", param2="other", param4="B")
    spin(d, 3)
    assert c.state_of("q", dup) == State.DONE, "the duplicate is stranded in que"
    assert c.state_of("q", later) == State.DONE, "the blocking key stays taken"


def running_parent_and_held_dup(d: Daemon, c: FsStore, gate: Path) -> tuple[str, str]:
    """A parent running until ``gate`` exists, and its duplicate, held (coalesce param 2)."""
    c.set_admin_state("q", AdminState.PAUSE)
    p = send(c, param1="blocking", param2="k", param3=str(gate))
    time.sleep(0.01)
    dup = send(c, param1="done", param2="k")
    c.set_admin_state("q", AdminState.UP)
    run_until(d, lambda: c.state_of("q", p) == State.RUN, "the parent's start")
    return p, dup


def test_cancelled_held_duplicate_keeps_its_status(fsd: tuple[Daemon, FsStore], tmp_path: Path) -> None:
    d, c = fsd
    mkq(c, coalesce_params=[2])
    gate = tmp_path / "gate"
    p, dup = running_parent_and_held_dup(d, c, gate)
    spin(d, 0.3)
    assert c.cancel("q", dup) == State.ERR
    gate.touch()
    run_until(d, lambda: c.state_of("q", p) == State.DONE, "the parent's end")
    v = c.get("q", dup)
    assert v.job_status == "cancelled"


def test_queue_force_deleted_while_running_holds_its_finish_forever(fsd: tuple[Daemon, FsStore]) -> None:
    d, c = fsd
    mkq(c)
    send(c, param1="slow", param2="1")
    run_until(d, lambda: bool(d.jobs), "the start")
    c.delete_queue("q", force=True)
    run_until(d, lambda: not d.jobs, "the exit")
    spin(d, 4)
    assert not d.runner.finisher.held  # type: ignore[union-attr]


def test_queue_recreated_before_the_daemon_refreshes(fsd: tuple[Daemon, FsStore]) -> None:
    """Deleted and created again between two looks of the daemon: the new queue is indexed
    and its config read, and its messages run."""
    d, c = fsd
    mkq(c)
    m1 = send(c, param1="done")
    run_until(d, lambda: c.state_of("q", m1) == State.DONE, "m1")
    c.delete_queue("q", force=True)
    orig = d.refresh

    def refresh(**kw: Any) -> None:
        if "q" not in c.queues():
            mkq(c, num_workers=4)  # recreated in the window (scripted delete + create)
        d.refresh = orig  # type: ignore[method-assign]
        orig(**kw)

    d.refresh = refresh  # type: ignore[method-assign]
    spin(d, 0.5)
    walks = {"n": 0}
    real = d.store._claim_walking  # type: ignore[attr-defined]

    def counting(*a: Any, **k: Any) -> Any:
        walks["n"] += 1
        return real(*a, **k)

    d.store._claim_walking = counting  # type: ignore[attr-defined]
    ms = [send(c, param1="done") for _ in range(3)]
    run_until(d, lambda: all(c.state_of("q", m) == State.DONE for m in ms), "the recreated queue's messages")
    assert walks["n"] == 0, "claims come from the index, not from walks of que/"
    cfg = d.queues["q"].config
    assert cfg is not None and cfg.num_workers == 4, "the new queue's config"


def test_held_duplicates_stay_held_across_pause_and_resume(fsd: tuple[Daemon, FsStore], tmp_path: Path) -> None:
    """Pausing drops the queue's index; the one built at resume must still know which
    duplicates a running parent holds (before: they ran on their own beside it)."""
    d, c = fsd
    mkq(c, num_workers=2, coalesce_params=[2])
    gate = tmp_path / "gate"
    p, dup = running_parent_and_held_dup(d, c, gate)
    c.set_admin_state("q", AdminState.PAUSE)
    spin(d, 0.3)
    c.set_admin_state("q", AdminState.UP)
    spin(d, 1.0)
    assert c.state_of("q", dup) == State.QUE, "still held by its running parent"
    gate.touch()
    run_until(d, lambda: c.state_of("q", p) == State.DONE, "the parent's end")
    v = c.get("q", dup)
    assert v.state == State.DONE and v.message.dup.endswith(f"/q/q/{p}"), v
