"""The daemon's lean start and finish (store/fs/attempts.py, ``_start_indexed`` and
``_finish_move``): the store of a process holding the daemon lock, claiming from its index.
Each unusual case must fall back to the general path and end exactly as it would: the
message set aside, skipped, rescheduled or reported, nothing lost, the counts true, the
history honest."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import without_hanging

from spoolq import durable
from spoolq.errors import Conflict, CorruptMessage, StorageError, WrongState
from spoolq.model import COMPACT_JSON, AdminState, Message, QueueConfig, State
from spoolq.store.fs import FsStore
from spoolq.store.fs.layout import count_tree, message_path
from spoolq.store.leases import Attempt


@pytest.fixture
def st(tmp_path: Path) -> Iterator[FsStore]:
    durable.faults.clear()
    s = FsStore(tmp_path / "root")
    s.ensure_root()
    s.acquire_daemon()
    s.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true", "num_workers": 100}))
    w = s.watch()
    w.want("q", True)
    try:
        yield s
    finally:
        durable.faults.clear()
        s.release_daemon()


def indexed(st: FsStore, *ids: str, buckets: bool = True) -> None:
    """Wait until the index holds ``ids``. Their buckets are made in every state first, as
    a busy queue has them, so that the moves take the lean path (a missing bucket is the
    general path's case) unless ``buckets`` is False."""
    for i in ids if buckets else ():
        for state in (State.RUN, State.DONE, State.ERR, State.RELAYED):
            os.makedirs(message_path(st.qdir("q"), state, i).parent, exist_ok=True)
    ix = st.watch().indexes["q"]
    deadline = time.monotonic() + 10
    while not all(i in ix.index for i in ids):
        assert time.monotonic() < deadline, "not indexed"
        st.watch().changes()


def claim(st: FsStore) -> Attempt:
    a = st.claim("q", owner="t", lease=60)
    assert isinstance(a, Attempt), a
    return a


def history(st: FsStore, msg_id: str) -> list[dict[str, object]]:
    return [h for h in st.get("q", msg_id).message.history]


def true_counts(st: FsStore) -> None:
    st.flush_counts()
    assert {k: v for k, v in st.counts("q").items() if v} == {k: v for k, v in count_tree(st.qdir("q")).items() if v}


def msg_file(st: FsStore, state: State, msg_id: str) -> Path:
    return message_path(st.qdir("q"), state, msg_id) / "msg"


def test_claim_and_finish_write_what_the_general_move_writes(st: FsStore) -> None:
    m = st.create("q", Message(param1="a b", params={"k": "v"}))
    indexed(st, m.msg_id)
    a = claim(st)
    assert (a.message.param1, a.message.params) == ("a b", {"k": "v"})
    assert a.message.history[-1]["state"] == "run" and a.message.history[-1]["note"] == "run"
    assert st.state_of("q", m.msg_id) == State.RUN
    true_counts(st)
    st.finish(a, State.DONE, status=None, note="done")
    assert st.state_of("q", m.msg_id) == State.DONE
    assert [(h["state"], h.get("note")) for h in history(st, m.msg_id)] == [
        ("que", None), ("run", "run"), ("done", "done")]
    true_counts(st)


def test_a_msg_rewritten_after_indexing_runs_as_it_is_now(st: FsStore) -> None:
    m = st.create("q", Message(param1="old"))
    indexed(st, m.msg_id)
    path = msg_file(st, State.QUE, m.msg_id)
    data = json.loads(path.read_bytes())
    data["param1"] = "new"
    durable.write_replace(path, json.dumps(data).encode(), sync=False)
    a = claim(st)
    assert a.message.param1 == "new"


def test_a_msg_rewritten_to_a_later_due_time_waits(st: FsStore) -> None:
    m = st.create("q", Message(param1="x"))
    indexed(st, m.msg_id)
    path = msg_file(st, State.QUE, m.msg_id)
    data = json.loads(path.read_bytes())
    data["due"] = time.time() + 3600
    durable.write_replace(path, json.dumps(data).encode(), sync=False)
    got = st.claim("q", owner="t", lease=60)
    assert isinstance(got, float) and got > time.time() + 3000  # when to look again
    assert st.state_of("q", m.msg_id) == State.QUE


@pytest.mark.parametrize("damage", [b"{half", b"[]", b'{"msg_id": "20000101.0000.00.000.1"}', None])
def test_a_msg_damaged_after_indexing_is_set_aside_and_the_queue_goes_on(st: FsStore, damage: bytes | None) -> None:
    bad = st.create("q", Message(param1="bad"))
    good = st.create("q", Message(param1="good"))
    indexed(st, bad.msg_id, good.msg_id)
    path = msg_file(st, State.QUE, bad.msg_id)
    if damage is None:
        path.unlink()
    else:
        before = os.stat(path)
        path.write_bytes(damage)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # within one clock tick: the size differs
    a = claim(st)
    assert a.msg_id == good.msg_id
    corrupt = list((st.qdir("q") / "corrupt").iterdir())
    assert len(corrupt) == 1 and corrupt[0].name.startswith(f"que.{bad.msg_id}.")
    hist = corrupt[0] / "history"
    assert not hist.exists() or "run" not in hist.read_text()  # no record of a move that did not happen
    true_counts(st)


def test_a_message_gone_after_indexing_is_skipped(st: FsStore) -> None:
    gone = st.create("q", Message(param1="gone"))
    kept = st.create("q", Message(param1="kept"))
    indexed(st, gone.msg_id, kept.msg_id)
    st.delete("q", gone.msg_id)  # its event not read yet: the index still has it
    assert claim(st).msg_id == kept.msg_id
    true_counts(st)


def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the messages ``Message.from_dict`` builds from now on."""
    seen: list[str] = []
    real = Message.from_dict.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Message], data: object, **kw: object) -> Message:
        m = real(cls, data, **kw)
        seen.append(m.msg_id)
        return m

    monkeypatch.setattr(Message, "from_dict", classmethod(spy))
    return seen


def test_the_start_takes_the_message_the_index_kept_without_parsing_msg_again(
        st: FsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    m = st.create("q", Message(param1="kept", params={"k": [1, "two"]}))
    indexed(st, m.msg_id)
    assert st.watch().indexes["q"].index[m.msg_id].message is not None
    seen = parses(monkeypatch)
    a = claim(st)
    assert seen == []
    assert (a.message.param1, a.message.params, a.message.msg_id) == ("kept", {"k": [1, "two"]}, m.msg_id)
    assert a.message == st.get("q", m.msg_id).message  # what the general path reads from run/


def opens_of_msg(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = os.open

    def spy(path: object, *a: object, **kw: object) -> int:
        if str(path).endswith("/msg"):
            seen.append(str(path))
        return real(path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    return seen


@pytest.mark.parametrize("age", [0, 10])
def test_the_start_reads_a_msg_whose_stamp_cannot_vouch_for_it_and_no_other(
        st: FsStore, monkeypatch: pytest.MonkeyPatch, age: int) -> None:
    """filestamp's rule: a stat vouches for a msg that was over 2 s old when indexed."""
    m = st.create("q", Message(param1="p"))
    path = msg_file(st, State.QUE, m.msg_id)
    t = time.time_ns() - age * 1_000_000_000
    os.utime(path, ns=(t, t))
    indexed(st, m.msg_id)
    e = st.watch().indexes["q"].index[m.msg_id]
    assert e.message is not None and (e.raw is None) == (age > 2)  # bytes kept while unsettled
    opened, parsed = opens_of_msg(monkeypatch), parses(monkeypatch)
    assert claim(st).message.param1 == "p"
    assert parsed == []
    assert len(opened) == (0 if age > 2 else 1)


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "over-the-kept-size"])
@pytest.mark.parametrize(("written", "seen"), [(0, "0"), (True, "true"), (False, "false"), (1.5, "1.5")])
def test_a_value_written_by_hand_as_a_param_blocks_as_the_running_message_sees_it(
        st: FsStore, kept: bool, written: object, seen: str) -> None:
    """blocking_params compares queued entries with running messages' params: a running
    message whose param1 is ``seen`` must hold a queued one whose msg says ``written`` (a
    JSON number or boolean), as the general path converts it, whether or not the index
    kept the parsed message (a msg over KEEP_MSG_BYTES is not kept)."""
    from spoolq.store.fs.index import KEEP_MSG_BYTES

    st.update_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true", "num_workers": 100,
                                           "blocking_params": [1]}))
    first = st.create("q", Message(param1=seen))
    indexed(st, first.msg_id)
    assert claim(st).message.param1 == seen
    pad = {} if kept else {"pad": "x" * KEEP_MSG_BYTES}
    second = st.create("q", Message(param1="placeholder", params=pad))
    path = msg_file(st, State.QUE, second.msg_id)
    data = json.loads(path.read_bytes())
    data["param1"] = written
    durable.write_replace(path, json.dumps(data).encode(), sync=False)
    indexed(st, second.msg_id)
    entry = st.watch().indexes["q"].index[second.msg_id]
    assert (entry.message is not None) == kept
    assert entry.params[0] == seen
    assert st.claim("q", owner="t", lease=60) is None


def test_a_msg_over_the_kept_size_is_parsed_at_the_start(st: FsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from spoolq.store.fs.index import KEEP_MSG_BYTES

    m = st.create("q", Message(param1="x" * KEEP_MSG_BYTES))
    indexed(st, m.msg_id)
    assert st.watch().indexes["q"].index[m.msg_id].message is None
    seen = parses(monkeypatch)
    assert claim(st).message.param1 == "x" * KEEP_MSG_BYTES
    assert seen == [m.msg_id]


def same_size_within_one_tick(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` in place, leaving its inode, size and mtime as they were:
    what an edit by hand within one clock tick of the last write looks like to a stat."""
    before = os.stat(path)
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_edit_that_a_stat_cannot_see_still_runs_as_it_is_now(st: FsStore) -> None:
    m = st.create("q", Message(param1="old"))
    indexed(st, m.msg_id)
    path = msg_file(st, State.QUE, m.msg_id)
    same_size_within_one_tick(path, path.read_bytes().replace(b'"old"', b'"new"'))
    assert claim(st).message.param1 == "new"


def test_damage_that_a_stat_cannot_see_is_still_set_aside(st: FsStore) -> None:
    bad = st.create("q", Message(param1="bad"))
    good = st.create("q", Message(param1="good"))
    indexed(st, bad.msg_id, good.msg_id)
    path = msg_file(st, State.QUE, bad.msg_id)
    same_size_within_one_tick(path, b"{" + b" " * (path.stat().st_size - 1))
    assert claim(st).msg_id == good.msg_id
    assert [p.name.split(".")[0] for p in (st.qdir("q") / "corrupt").iterdir() if p.is_dir()] == ["que"]


def test_an_index_over_its_cap_keeps_no_more_messages_whole(st: FsStore) -> None:
    from spoolq.store.fs.index import QueueIndex

    ids = [st.create("q", Message(param1=str(i))).msg_id for i in range(5)]
    ix = QueueIndex("q", st.qdir("q"), cap=2, indexed=True)
    for i in ids:
        ix.note_arrival(i)  # by event: read whatever the cap
    ix.absorb(float("inf"), time.monotonic)
    assert sorted(ix.index) == sorted(ids)
    assert sum(e.message is not None for e in ix.index.values()) == 2


def test_a_walk_pauses_at_the_cap_within_a_bucket_and_each_message_starts_as_it_is(
        st: FsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from spoolq.store.fs import index

    st.set_admin_state("q", AdminState.PAUSE)
    st.watch().want("q", False)
    ids = [m.msg_id for m in st.create_many("q", [Message(param1=str(i)) for i in range(7)])]  # one bucket
    monkeypatch.setattr(index, "INDEX_CAP", 3)
    st.set_admin_state("q", AdminState.UP)
    w = st.watch()
    w.want("q", True)
    ix = w.indexes["q"]
    ix.cap = 3
    deadline = time.monotonic() + 10
    while ix.walk is None or not ix.walk.paused:
        assert time.monotonic() < deadline, "the walk did not pause"
        w.changes()
    assert len(ix.index) == 3 and all(e.message is not None for e in ix.index.values())
    for i in range(7):
        a = claim(st)
        assert a.message.param1 == str(i)
        w.changes()
    assert all(st.state_of("q", i) == State.RUN for i in ids)


def test_a_walk_cut_short_within_a_bucket_goes_on_while_nothing_can_start(st: FsStore) -> None:
    """Nothing indexed can start and the walk's time budget ran out within a bucket over the
    cap: the walk must go on (it once paused there with no dispatch left to wake it)."""
    from spoolq.store.fs.index import QueueIndex

    old = FsStore(st.root, clock=lambda: time.time() - 10)  # one older bucket, due in an hour
    old.create_many("q", [Message(param1=f"later{i}", due=time.time() + 3600) for i in range(8)])
    ready = st.create("q", Message(param1="ready", due=time.time() - 1))
    ix = QueueIndex("q", st.qdir("q"), cap=3)
    ix.start_index()
    ticks = [0]

    def now() -> float:
        ticks[0] += 1
        return float(ticks[0])

    for _ in range(100):
        assert ix.has_work(), f"stalled with {len(ix.index)} indexed"
        if not ix.walk_on(ticks[0] + 3.0, now, lambda path, level: None):  # a few steps a turn
            continue  # nothing new: the daemon dispatches only when the index grew
        pick, _ = ix.next_runnable(time.time(), (), set())
        if pick is not None:
            assert pick.msg_id == ready.msg_id
            break
    else:
        raise AssertionError("the ready message was never found")


def test_a_coalescing_queue_indexes_all_of_que_and_keeps_no_message(tmp_path: Path) -> None:
    s = FsStore(tmp_path / "root")
    s.ensure_root()
    s.acquire_daemon()
    try:
        s.create_queue(QueueConfig.from_dict({"name": "c", "script": "/bin/true", "coalesce_params": [1]}))
        w = s.watch()
        w.want("c", True)
        ix = w.indexes["c"]
        deadline = time.monotonic() + 10
        while ix.walk is not None or ix.cap is not None:
            assert time.monotonic() < deadline, "not bound"
            w.changes()
            s.claim("c", owner="t", lease=60)  # binds the index: uncapped for a coalescing queue
        m = s.create("c", Message(param1="a"))
        while m.msg_id not in ix.index:
            assert time.monotonic() < deadline, "not indexed"
            w.changes()
        assert all(e.message is None for e in ix.index.values())
    finally:
        s.release_daemon()


def test_a_big_msg_takes_the_general_path_whole(st: FsStore) -> None:
    big = "x" * 200_000
    m = st.create("q", Message(param1="big", params={"blob": big}))
    indexed(st, m.msg_id)
    a = claim(st)
    assert a.message.params["blob"] == big


def test_a_failed_rename_into_run_leaves_the_message_queued_and_its_history_unclaimed(st: FsStore) -> None:
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    claim_bucket = message_path(st.qdir("q"), State.RUN, m.msg_id).parent
    os.makedirs(claim_bucket, exist_ok=True)  # the lean path's rename is the one that fails
    durable.faults["rename"] = [errno.EIO, 0]
    with pytest.raises(StorageError):
        st.claim("q", owner="t", lease=60)
    durable.faults.clear()
    assert st.state_of("q", m.msg_id) == State.QUE
    assert [h["state"] for h in history(st, m.msg_id)] == ["que"]
    a = claim(st)  # put back in the index: the next try starts it
    assert a.msg_id == m.msg_id
    assert [h["state"] for h in a.message.history] == ["que", "run"]  # the kept message: one start
    true_counts(st)


def test_a_failed_rename_out_of_run_keeps_the_attempt_and_a_retry_finishes(st: FsStore) -> None:
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    os.makedirs(message_path(st.qdir("q"), State.DONE, m.msg_id).parent, exist_ok=True)
    durable.faults["rename"] = [errno.ENOSPC, 0]
    with pytest.raises(StorageError):
        st.finish(a, State.DONE, status=None, note="done")
    durable.faults.clear()
    assert st.state_of("q", m.msg_id) == State.RUN
    assert [h["state"] for h in history(st, m.msg_id)] == ["que", "run"]
    st.finish(a, State.DONE, status=None, note="done")  # the Finisher's retry
    assert st.state_of("q", m.msg_id) == State.DONE
    assert [h["state"] for h in history(st, m.msg_id)] == ["que", "run", "done"]
    true_counts(st)


def test_a_finish_after_the_message_left_run_by_hand_lets_go(st: FsStore) -> None:
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    shutil.rmtree(message_path(st.qdir("q"), State.RUN, m.msg_id))
    with pytest.raises(WrongState):
        st.finish(a, State.DONE, status=None, note="done")
    assert not st.holds("q", m.msg_id)
    assert not message_path(st.qdir("q"), State.DONE, m.msg_id).exists()


@pytest.mark.parametrize("dst", [State.DONE, State.ERR, State.QUE, State.RELAYED])
def test_each_way_out_of_run_lands_in_its_state_with_a_note_that_is_json(st: FsStore, dst: State) -> None:
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    note = 'he said "no"\n\\ \x1b[31m ok \u00e9\u2028\U0001f600'
    st.finish(a, dst, status="", note=note)
    assert st.state_of("q", m.msg_id) == dst
    assert history(st, m.msg_id)[-1] == {"state": str(dst), "at": history(st, m.msg_id)[-1]["at"], "note": note}
    # The line is what the store's JSON encoder writes for it (compact, ASCII).
    last = (message_path(st.qdir("q"), dst, m.msg_id) / "history").read_bytes().splitlines()[-1]
    assert last == COMPACT_JSON.encode(json.loads(last)).encode() and last.isascii()
    assert not (message_path(st.qdir("q"), dst, m.msg_id) / "attempt").exists()
    true_counts(st)


def test_a_later_due_is_respected(st: FsStore) -> None:
    later = st.create("q", Message(param1="later", due=time.time() + 3600))
    now = st.create("q", Message(param1="now"))
    indexed(st, later.msg_id, now.msg_id)
    assert claim(st).msg_id == now.msg_id
    got = st.claim("q", owner="t", lease=60)
    assert isinstance(got, float) and got >= later.due - 1  # when to look again: its due
    assert [h["state"] for h in history(st, later.msg_id)] == ["que"]


def test_an_id_already_in_the_destination_is_a_conflict_and_changes_nothing(st: FsStore) -> None:
    """As the generic move says it (the clock went back and an inode was reused)."""
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    squatter = message_path(st.qdir("q"), State.RUN, m.msg_id)
    (squatter / "x").mkdir(parents=True)  # a non-empty directory under the same id
    with pytest.raises(Conflict):
        st.claim("q", owner="t", lease=60)
    que_dir = message_path(st.qdir("q"), State.QUE, m.msg_id)
    assert (que_dir / "msg").exists()
    assert not (que_dir / "history").exists() or "run" not in (que_dir / "history").read_text()
    shutil.rmtree(squatter)
    st.watch().indexes["q"].requeued(m.msg_id)  # what the daemon's re-index after the error does
    a = claim(st)
    (message_path(st.qdir("q"), State.DONE, m.msg_id) / "x").mkdir(parents=True)
    with pytest.raises(Conflict):
        st.finish(a, State.DONE, status=None, note="done")
    assert st.state_of("q", m.msg_id) == State.RUN
    assert [h["state"] for h in history(st, m.msg_id)] == ["que", "run"]


def test_a_finish_into_a_state_run_cannot_go_to_is_refused(st: FsStore) -> None:
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    os.makedirs(message_path(st.qdir("q"), State.PREP, m.msg_id).parent)
    with pytest.raises(WrongState):
        st.finish(a, State.PREP, status=None)
    assert st.state_of("q", m.msg_id) == State.RUN


def test_finishes_inside_a_durable_batch_are_made_durable_at_its_end(st: FsStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery finishes attempts inside durable_batch, whose one syncfs must cover them."""
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    synced: list[object] = []
    monkeypatch.setattr(durable, "syncfs", lambda root: synced.append(root))
    with st.durable_batch():
        st.finish(a, State.ERR, status="cancelled", note="cancelled")
    assert synced == [st.root]
    assert st.state_of("q", m.msg_id) == State.ERR


def test_the_first_message_of_a_second_makes_its_buckets(st: FsStore) -> None:
    """No run/ or done/ bucket yet: the lean moves hand over to the general path, which
    makes them; the history and counts come out the same."""
    m = st.create("q", Message())
    indexed(st, m.msg_id, buckets=False)
    a = claim(st)
    st.finish(a, State.DONE, status=None, note="done")
    assert st.state_of("q", m.msg_id) == State.DONE
    assert [h["state"] for h in history(st, m.msg_id)] == ["que", "run", "done"]
    true_counts(st)


def test_a_finish_that_meets_a_damaged_msg_sets_it_aside_and_lets_the_attempt_go(st: FsStore) -> None:
    """The finish rewrites msg (a retry's count), and finds it damaged by hand meanwhile:
    the message is set aside (I7), and the attempt is no longer the store's (it held a
    place among the queue's running attempts until the daemon stopped)."""
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    msg_file(st, State.RUN, m.msg_id).write_bytes(b"{not json")

    def count(msg: Message) -> None:
        msg.count += 1

    with pytest.raises(CorruptMessage):
        st.finish(a, State.QUE, status=None, update=count, note="retry")
    assert not st.holds("q", m.msg_id)
    assert not message_path(st.qdir("q"), State.RUN, m.msg_id).exists()
    assert [p.name for p in (st.qdir("q") / "corrupt").iterdir() if m.msg_id in p.name]  # set aside


def test_start_job_makes_job_and_its_log_on_a_first_attempt(st: FsStore) -> None:
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    job, fd = st.start_job(a)
    try:
        os.write(fd, b"out\n")
    finally:
        os.close(fd)
    mdir = message_path(st.qdir("q"), State.RUN, m.msg_id)
    assert job == f"{mdir}/job" and (mdir / "job" / "stdio.log").read_bytes() == b"out\n"


@pytest.mark.parametrize("left", ["a link to a directory", "a file", "a directory whose log is a link"])
def test_start_job_after_an_earlier_script_left_things_follows_no_link(st: FsStore, tmp_path: Path,
                                                                        left: str) -> None:
    """What an earlier attempt left in ``job/``'s place takes the checked way (workdir and
    log_fd): a link is never followed, a file in the directory's place is replaced."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stdio.log").write_text("untouched\n")
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    job = message_path(st.qdir("q"), State.RUN, m.msg_id) / "job"
    if left == "a link to a directory":
        job.symlink_to(outside)
    elif left == "a file":
        job.write_text("x")
    else:
        job.mkdir()
        (job / "stdio.log").symlink_to(outside / "stdio.log")
    got, fd = st.start_job(a)
    try:
        os.write(fd, b"mine\n")
    finally:
        os.close(fd)
    assert got == str(job) and job.is_dir() and not job.is_symlink()
    assert (job / "stdio.log").read_bytes() == b"mine\n" and not (job / "stdio.log").is_symlink()
    assert (outside / "stdio.log").read_text() == "untouched\n" and os.listdir(outside) == ["stdio.log"]


def claimed_behind_a_link(st: FsStore, elsewhere: Path) -> Attempt:
    """A claimed message whose directory in run/ was then replaced by a link to
    ``elsewhere``, holding its files (what a script of an earlier attempt could leave)."""
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    mdir = message_path(st.qdir("q"), State.RUN, m.msg_id)
    for name in os.listdir(mdir):
        os.rename(mdir / name, elsewhere / name)
    mdir.rmdir()
    mdir.symlink_to(elsewhere)
    return a


@pytest.mark.parametrize("who", ["script", "worker"])
def test_a_start_sets_aside_a_link_in_place_of_the_message_directory(st: FsStore, tmp_path: Path,
                                                                     who: str) -> None:
    """An earlier script may replace its message directory with a link to a directory of
    its choosing. A script's start must not follow it, and a persistent worker must not be
    handed it as its ``dir`` (its writes would leave the spool); neither may fail the same
    way at every retry for ever. The link is set aside into ``corrupt/`` with its reason
    beside it, the run count follows, and the start ends the attempt (the message is no
    longer the daemon's)."""
    import selectors

    from spoolq.config import RootConfig
    from spoolq.daemon.jobs import JobRunner
    from spoolq.daemon.workers import Workers

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    a = claimed_behind_a_link(st, elsewhere)
    before = sorted(os.listdir(elsewhere))
    runner = JobRunner(st, tmp_path, RootConfig(), time.time, "production", "t")
    store_call: Callable[[Attempt], object]
    if who == "script":
        assert runner.start(a, st.queue_config("q")) is None
        store_call = st.start_job
    else:
        workers = Workers(runner, selectors.DefaultSelector(), tmp_path, RootConfig(), time.time,
                          finished=lambda f: None, changed=lambda q: None, config=st.queue_config)
        # The worker itself is never reached: the hand-out ends before anything is written to it.
        assert workers.send(None, a, st.queue_config("q"), time.time()) is False  # type: ignore[arg-type]
        store_call = st.attempt_dir
    assert sorted(os.listdir(elsewhere)) == before, "nothing written through the link"
    corrupt = st.qdir("q") / "corrupt"
    links = [p for p in corrupt.iterdir() if p.is_symlink()]
    assert len(links) == 1 and links[0].resolve() == elsewhere.resolve()
    assert "not followed" in Path(f"{links[0]}.CORRUPT").read_text()
    assert not os.path.lexists(message_path(st.qdir("q"), State.RUN, a.msg_id))
    assert not st.holds("q", a.msg_id)
    st.flush_counts()
    assert st.counts("q").get("run", 0) == 0
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(CorruptMessage):  # the store's own call says why
        store_call(claimed_behind_a_link(st, again))
    m = st.create("q", Message())  # a real directory is used as it is
    indexed(st, m.msg_id)
    mdir = str(message_path(st.qdir("q"), State.RUN, m.msg_id))
    got = store_call(claim(st))
    if isinstance(got, tuple):
        os.close(got[1])
        got = got[0]
    assert got == (f"{mdir}/job" if who == "script" else mdir)


@pytest.mark.parametrize("thing", ["fifo", "socket", "directory", "file", "hard link"])
def test_a_fifo_or_socket_left_as_the_log_neither_blocks_nor_is_written(st: FsStore, thing: str,
                                                                         tmp_path: Path) -> None:
    """A FIFO with nobody reading it would block a plain open for writing for ever: the
    daemon's loop with it. It is replaced by a file, as a link is, and so are a socket and
    a directory (which would otherwise send the message back to the queue at every try).
    A file there is the log of earlier attempts: appended to, blocking for the script. A
    hard link to a file elsewhere (``ln <root>/token job/stdio.log``) is no log of ours:
    the next attempt's output must not be appended to that file."""
    import socket

    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    job = message_path(st.qdir("q"), State.RUN, m.msg_id) / "job"
    job.mkdir()
    log = job / "stdio.log"
    sock = None
    if thing == "fifo":
        os.mkfifo(log)
    elif thing == "directory":
        log.mkdir()
        (log / "inside").write_text("x")
    elif thing == "file":
        log.write_bytes(b"earlier\n")
    elif thing == "hard link":
        other = st.root / "elsewhere"  # on the spool's filesystem, as a hard link must be
        other.write_bytes(b"not a log\n")
        os.link(other, log)
    else:
        sock = socket.socket(socket.AF_UNIX)
        here = os.getcwd()
        os.chdir(job)  # a socket's path is short (108 bytes): bound by its name
        try:
            sock.bind("stdio.log")
        finally:
            os.chdir(here)
    got = without_hanging(lambda: st.start_job(a), log, "the open of the log")
    assert not isinstance(got, Exception)
    _, fd = got
    try:
        os.write(fd, b"mine\n")
        assert os.get_blocking(fd), "the script gets a blocking stdout"
    finally:
        os.close(fd)
        if sock is not None:
            sock.close()
    assert log.is_file() and log.read_bytes() == (b"earlier\n" if thing == "file" else b"") + b"mine\n"
    if thing == "hard link":
        assert (st.root / "elsewhere").read_bytes() == b"not a log\n" and log.stat().st_nlink == 1


@pytest.mark.parametrize("name", ["history", "pid"])
@pytest.mark.parametrize("thing", ["symlink", "hard link", "fifo", "directory"])
def test_what_a_script_leaves_as_history_or_pid_is_replaced(st: FsStore, name: str, thing: str) -> None:
    """A script can write in its message directory. What it leaves where the daemon writes
    the message's ``history`` (at every move) or its ``pid`` file (at a start) is replaced
    by a new file: a link is not written through (nor truncated), a FIFO nobody reads does
    not block the daemon's loop, and a directory does not stop the message for ever."""

    other = st.root / "elsewhere"  # on the spool's filesystem, as a hard link must be
    other.write_bytes(b"not spoolq's\n")
    m = st.create("q", Message())
    indexed(st, m.msg_id)

    def plant(mdir: Path) -> None:
        where = mdir / name
        if where.exists():
            where.unlink()
        if thing == "symlink":
            where.symlink_to(other)
        elif thing == "hard link":
            os.link(other, where)
        elif thing == "fifo":
            os.mkfifo(where)
        else:
            where.mkdir()
            (where / "inside").write_text("x")

    def unblocked(fn: Callable[[], object]) -> None:
        without_hanging(fn, where, f"writing {name}")

    if name == "history":
        plant(message_path(st.qdir("q"), State.QUE, m.msg_id))
    where = message_path(st.qdir("q"), State.RUN, m.msg_id) / name
    a: list[Attempt] = []
    unblocked(lambda: a.append(claim(st)))  # the claim's move appends to history
    if name == "pid":
        plant(where.parent)
    unblocked(lambda: st.record_runner(a[0], "4242 1 host", lease=60))
    assert other.read_bytes() == b"not spoolq's\n"
    assert where.is_file() and not where.is_symlink() and where.stat().st_nlink == 1
    if name == "pid":
        assert where.read_text() == "4242 1 host\n"
    st.finish(a[0], State.DONE, status=None, note="done")
    assert other.read_bytes() == b"not spoolq's\n"
    assert [h["state"] for h in history(st, m.msg_id)][-1] == "done"


@pytest.mark.parametrize("name", ["status", "history", "pid", "msg"])
def test_a_fifo_a_script_left_in_its_message_hangs_no_reader(st: FsStore, name: str) -> None:
    """A FIFO nobody writes to, left by a script where the message's files are, blocked a
    plain open for reading: the view of the message (a request's thread, ``spoolq show``)
    and the daemon's recovery of ``run/`` (its ``pid`` file) hung until someone wrote. Each
    read is non-blocking now; the FIFO reads as empty."""

    m = st.create("q", Message())
    st.move("q", m.msg_id, State.QUE, State.RUN)  # as a crashed daemon leaves it
    where = message_path(st.qdir("q"), State.RUN, m.msg_id) / name
    if where.exists():
        where.unlink()
    os.mkfifo(where)

    # An error is fine here (the FIFO reads as empty), a hang is not.
    without_hanging(lambda: st.get("q", m.msg_id), where, f"reading {name}", errors_ok=True)
    without_hanging(lambda: st.reclaim("q", owner="t", lease=60), where, f"reading {name}", errors_ok=True)


def test_a_message_whose_script_is_missing_gets_no_log(st: FsStore, tmp_path: Path) -> None:
    """With an ``exec_prefix`` the script is checked before anything is made for the
    attempt: the message goes to err with the reason and has no log (404), as before."""
    from spoolq.config import RootConfig
    from spoolq.daemon.jobs import JobRunner
    from spoolq.errors import LogNotFound, ScriptUnusable

    cfg = QueueConfig.from_dict({"name": "q", "script": str(tmp_path / "missing.sh"), "exec_prefix": "/bin/sh",
                                 "num_workers": 100})
    st.update_queue(cfg)
    m = st.create("q", Message())
    indexed(st, m.msg_id)
    a = claim(st)
    runner = JobRunner(st, tmp_path, RootConfig(), time.time, "production", "t")
    def fds() -> set[str]:
        return {os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{n}")}

    before = fds()
    with pytest.raises(ScriptUnusable):
        runner.start(a, st.queue_config("q"))
    # Nothing of the attempt's is left open (a directory the store keeps open to fsync may be).
    assert [f for f in fds() - before if not os.path.isdir(f)] == []
    assert st.state_of("q", m.msg_id) == State.ERR
    assert "missing.sh" in st.get("q", m.msg_id).status
    with pytest.raises(LogNotFound):
        st.open_log("q", m.msg_id)


def test_workdir_refuses_a_link_in_place_of_the_message_directory(st: FsStore, tmp_path: Path) -> None:
    """``workdir`` (the HTTP jobs' and the stores' callers) makes nothing through a link left
    in place of the message directory, as ``start_job`` does not."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    a = claimed_behind_a_link(st, elsewhere)
    with pytest.raises(StorageError):
        st.workdir(a)
    assert not (elsewhere / "job").exists()


def test_a_spawn_that_runs_out_of_fds_closes_what_it_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE at the second pipe: the log fd and the first pipe are closed (else a daemon
    short of fds leaks three more at every retry and never recovers)."""
    import importlib

    sp = importlib.import_module("spoolq.runner.spawn")  # the module (the package exports a function of that name)

    real_pipe = os.pipe
    made: list[int] = []

    def pipe() -> tuple[int, int]:
        if made:
            raise OSError(errno.EMFILE, "Too many open files")
        r, w = real_pipe()
        made.extend((r, w))
        return r, w

    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    monkeypatch.setattr(sp.os, "pipe", pipe)
    with pytest.raises(OSError):
        sp.spawn(["/bin/true"], env={"PATH": "/bin"}, cwd=str(tmp_path), log_fd=log_fd, header_script="/bin/true")
    for fd in (log_fd, *made):
        with pytest.raises(OSError):
            os.fstat(fd)
