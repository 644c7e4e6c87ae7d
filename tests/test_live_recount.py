"""The start-up recount beside the daemon's moves (store/fs/recount.py): the daemon
dispatches from a queue while its counts are rebuilt by a walk, and the counts come out
exact. First the judging rule against a model (every interleaving of listings and moves
hypothesis finds), then the real store: a recount thread walking a queue while this
thread claims and finishes its messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import clock_ago
from hypothesis import given, settings
from hypothesis import strategies as hs

import spoolq.store.fs.layout as layout_mod
from spoolq.model import Message, QueueConfig, State
from spoolq.store.fs import FsStore
from spoolq.store.fs.layout import count_tree
from spoolq.store.fs.recount import LiveRecount

STATES = ("que", "run", "done", "err")
NEXT = {"que": ("run",), "run": ("done", "err", "que"), "done": (), "err": ("que",)}

# A model: messages in buckets 0..2, each in a state. A "walk" lists (state, bucket) pairs in
# its order; "moves" happen between listings. Each step: ("list",) or ("move", i, choice).
steps = hs.lists(hs.one_of(hs.just(("list", 0, 0)),
                           hs.tuples(hs.just("move"), hs.integers(0, 11), hs.integers(0, 2))),
                 max_size=60)


@settings(max_examples=400, deadline=None)
@given(steps=steps, start=hs.lists(hs.sampled_from(STATES), min_size=12, max_size=12))
def test_walk_plus_judged_moves_is_the_truth(steps: list[tuple[Any, ...]], start: list[str]) -> None:
    where = {i: start[i] for i in range(12)}  # message i lives in bucket i % 3
    ids = {i: f"2026120{i % 3 + 1}.0000.00.000.{i}" for i in range(12)}
    order = [(st, b) for st in STATES for b in range(3)]  # the walk's listing order
    rc = LiveRecount()
    walked = dict.fromkeys(STATES, 0)
    for step in steps + [("list", 0, 0)] * len(order):
        if step[0] == "list":
            if not order:
                continue
            st, b = order.pop(0)
            rc.seq += 1
            bucket = f"2026120{b + 1}/0000/00"
            rc.listed[(st, bucket)] = rc.seq
            walked[st] += sum(1 for i in where if i % 3 == b and where[i] == st)
        else:
            _, i, c = step
            nxt = NEXT[where[i]]
            if not nxt:
                continue
            dst = nxt[c % len(nxt)]
            rc.moved(ids[i], {where[i]: -1, dst: 1})
            where[i] = dst
    got = dict(walked)
    for k, v in rc.adjustments().items():
        got[k] += v
    assert got == {st: sum(1 for s in where.values() if s == st) for st in STATES}


# -- the real store ------------------------------------------------------------------------

@pytest.fixture
def daemon_store(tmp_path: Path) -> Iterator[FsStore]:
    st = FsStore(tmp_path / "root")
    st.ensure_root()
    st.acquire_daemon()
    try:
        yield st
    finally:
        st.release_daemon()


def truth(st: FsStore, queue: str) -> dict[str, int]:
    return count_tree(st.qdir(queue))


def test_claims_and_finishes_during_a_recount_leave_exact_counts(daemon_store: FsStore, tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    st = daemon_store
    st.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true", "num_workers": 128}))
    for age in range(60, 0, -2):  # 30 buckets of 20: the walk takes turns with the moves below
        past = FsStore(st.root, clock=clock_ago(age))
        past.create_many("q", [Message.from_dict({"param1": str(i)}) for i in range(20)])
    slow_buckets = layout_mod.bucket_dirs

    def bucket_dirs(*a: Any) -> Iterator[Path]:
        for b in slow_buckets(*a):
            if threading.current_thread().name == "recount":  # not this thread's claims' walks
                time.sleep(0.002)  # outside the recount's lock: moves slip in between listings
            yield b

    monkeypatch.setattr(layout_mod, "bucket_dirs", bucket_dirs)
    st.flush_counts()
    assert st.begin_recount("q")
    done = threading.Event()
    def recount() -> None:
        st.recount("q")
        done.set()

    t = threading.Thread(target=recount, name="recount")
    t.start()
    moved = 0
    while not done.is_set() or moved < 50:
        a = st.claim("q", owner="me", lease=60)
        if a is None or isinstance(a, float):
            break
        st.finish(a, State.DONE if moved % 3 else State.ERR, status=None)  # each one: que -> run -> done/err
        moved += 1
    t.join(30)
    assert done.is_set()
    st.flush_counts()
    assert moved >= 50
    assert st.counts("q") == truth(st, "q")


def test_moves_of_a_recount_never_walked_are_counted_when_the_daemon_lets_go(tmp_path: Path) -> None:
    st = FsStore(tmp_path / "root")
    st.ensure_root()
    st.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true"}))
    st.create_many("q", [Message.from_dict({"param1": str(i)}) for i in range(5)])
    st.acquire_daemon()
    assert st.begin_recount("q")  # the daemon stops before its housekeeping got to it
    for _ in range(3):
        a = st.claim("q", owner="me", lease=60)
        assert a is not None and not isinstance(a, float)
        st.finish(a, State.DONE, status=None)
    st.release_daemon()
    assert st.counts("q") == truth(st, "q")
    assert truth(st, "q")["done"] == 3


def test_a_corrupt_message_met_during_a_recount_does_not_deadlock(daemon_store: FsStore, monkeypatch: Any) -> None:
    """Setting a corrupt message aside takes the counts lock, which the recount holds while it
    waits for its own lock between buckets: the move must not hold that one meanwhile."""
    from spoolq.errors import CorruptMessage, WrongState

    st = daemon_store
    st.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true"}))
    for age in range(60, 0, -2):
        FsStore(st.root, clock=clock_ago(age)).create_many("q", [Message.from_dict({})])
    bad = st.create("q", Message.from_dict({"param1": "x"})).msg_id
    (st.message_dir("q", bad) / "msg").write_text("{not json")
    slow_buckets = layout_mod.bucket_dirs

    def bucket_dirs(*a: Any) -> Iterator[Path]:
        for b in slow_buckets(*a):
            if threading.current_thread().name == "recount":
                time.sleep(0.01)
            yield b

    monkeypatch.setattr(layout_mod, "bucket_dirs", bucket_dirs)
    st.flush_counts()
    assert st.begin_recount("q")
    walker = threading.Thread(target=st.recount, args=("q",), daemon=True, name="recount")
    walker.start()
    time.sleep(0.05)  # the walk is under way, holding the counts lock
    outcome: list[BaseException | None] = []

    def mover() -> None:
        try:
            st.move("q", bad, State.QUE, State.RUN)
            outcome.append(None)
        except (CorruptMessage, WrongState) as e:
            outcome.append(e)

    t = threading.Thread(target=mover, daemon=True)
    t.start()
    t.join(30)
    walker.join(30)
    assert not t.is_alive() and not walker.is_alive(), "deadlock: the move and the recount wait for each other"
    assert outcome and isinstance(outcome[0], (CorruptMessage, WrongState))
