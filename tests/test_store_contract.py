"""The Store contract: every store (memory, filesystem, PostgreSQL) must pass these same tests."""

from __future__ import annotations

import functools
import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from spoolq.client import Client
from spoolq.errors import (
    AttachmentNotFound,
    Conflict,
    InvalidConfig,
    InvalidInput,
    InvalidMessage,
    InvalidName,
    LogNotFound,
    MessageNotFound,
    QueueDown,
    QueueExists,
    QueueNotFound,
    TooLarge,
    WrongState,
)
from spoolq.ids import MSG_ID_RE, sort_key
from spoolq.model import AdminState, Message, QueueConfig, State
from spoolq.store import AttachmentSource, FsStore, MemoryStore, Store


@pytest.fixture(params=["memory", "fs", "pg"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "fs":
        yield FsStore(tmp_path / "spool")
    else:
        from spoolq.store.pg import PgStore

        pg = PgStore(request.getfixturevalue("pg_url"))
        yield pg
        pg.close()


def make_queue(store: Store, name: str = "q", **kw: Any) -> QueueConfig:
    cfg = QueueConfig.from_dict({"name": name, "script": "/bin/true", **kw})
    store.create_queue(cfg)
    return cfg


def msg(**kw: Any) -> Message:
    return Message.from_dict(kw)


def log_soon(store: Store, queue: str, msg_id: str, want: bytes) -> bytes:
    """The message's log once it reads ``want``, or as it is after 5 s (a store may carry
    the log through a pipe: it lands soon)."""
    deadline = time.monotonic() + 5
    while (log := store.open_log(queue, msg_id).read()) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return log


# -- queues ---------------------------------------------------------------------------------
def test_queue_create_list_config_roundtrip(store: Store) -> None:
    make_queue(store, "beta", num_workers=3, env_vars={"A": "1"}, coalesce_params=[2, 1], timeout=5)
    make_queue(store, "alpha")
    assert store.queues() == ["alpha", "beta"]
    cfg = store.queue_config("beta")
    assert cfg.num_workers == 3 and cfg.env_vars == {"A": "1"}
    assert cfg.coalesce_params == [1, 2] and cfg.timeout == 5.0 and cfg.fsync is True


def test_queue_create_twice_is_a_conflict(store: Store) -> None:
    make_queue(store)
    with pytest.raises(QueueExists):
        make_queue(store)


@pytest.mark.parametrize("bad", ["", "a b", "../x", "a/b", ".hidden", "x" * 129, "a;b", "a.b", "é"])
def test_bad_queue_names_are_refused(store: Store, bad: str) -> None:
    with pytest.raises(InvalidConfig):
        make_queue(store, bad)
    assert store.queues() == []


@pytest.mark.parametrize("cfg", [
    {"num_workers": 0}, {"num_workers": "many"}, {"env_vars": {"RQ_X": "1"}}, {"env_vars": {"1A": "x"}},
    {"coalesce_params": [5]}, {"timeout": -1}, {"fsync": "yes"}, {"bogus": 1}, {"script": ""},
    {"cluster_workers": 0}, {"cluster_workers": "2"}, {"cluster_workers": True},
])
def test_bad_queue_configs_are_refused(store: Store, cfg: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfig):
        QueueConfig.from_dict({"name": "q", "script": "/bin/true", **cfg})


def test_update_and_delete_queue(store: Store) -> None:
    cfg = make_queue(store)
    cfg.num_workers = 7
    store.update_queue(cfg)
    assert store.queue_config("q").num_workers == 7
    store.create("q", msg(param1="x"))
    with pytest.raises(Conflict):
        store.delete_queue("q")
    store.delete_queue("q", force=True)
    assert store.queues() == []
    with pytest.raises(QueueNotFound):
        store.queue_config("q")


def test_admin_flags_are_independent(store: Store) -> None:
    # RQ 6.1: down wins over pause; each action touches its own flag only.
    make_queue(store)
    store.set_admin_flag("q", "down", True)
    store.set_admin_flag("q", "pause", True)
    assert store.admin_state("q") == AdminState.DOWN
    with pytest.raises(QueueDown):
        store.create("q", msg())
    store.set_admin_flag("q", "down", False)
    assert store.admin_state("q") == AdminState.PAUSE
    store.set_admin_flag("q", "pause", False)
    assert store.admin_state("q") == AdminState.UP
    store.set_admin_flag("q", "pause", False)  # clearing a clear flag is fine
    with pytest.raises(InvalidInput):
        store.set_admin_flag("q", "../config.json", True)


def test_admin_states(store: Store) -> None:
    make_queue(store)
    assert store.admin_state("q") == AdminState.UP
    store.set_admin_state("q", AdminState.PAUSE)
    assert store.admin_state("q") == AdminState.PAUSE
    store.create("q", msg())  # PAUSE accepts
    store.set_admin_state("q", AdminState.DOWN)
    assert store.admin_state("q") == AdminState.DOWN
    with pytest.raises(QueueDown, match="DOWN"):
        store.create("q", msg())
    with pytest.raises(QueueDown):
        store.create_many("q", [msg()])
    store.set_admin_state("q", AdminState.UP)
    store.create("q", msg())
    assert store.counts("q")["que"] == 2


def test_unknown_queue(store: Store) -> None:
    with pytest.raises(QueueNotFound):
        store.create("nope", msg())
    with pytest.raises(QueueNotFound):
        store.counts("nope")


# -- messages -------------------------------------------------------------------------------
def test_single_que_creates_only_when_nothing_waits_even_when_raced(store: Store) -> None:
    import threading

    make_queue(store)
    make_queue(store, "race")
    first, created = store.single_que("q", msg(param1="a"))
    assert created and store.get("q", first).message.param1 == "a"
    assert store.single_que("q", msg(param1="b")) == (first, False)
    later = store.create("q", msg()).msg_id
    assert store.single_que("q", msg()) == (first, False), "the first waiting one, not the newest"
    store.delete("q", first)
    assert store.single_que("q", msg()) == (later, False)
    got: list[tuple[str, bool]] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        got.append(store.single_que("race", msg()))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(c for _, c in got) == 1 and len({i for i, _ in got}) == 1, got
    assert store.counts("race")["que"] == 1
    with pytest.raises(QueueNotFound):
        store.single_que("nope", msg())


def test_create_and_get(store: Store) -> None:
    make_queue(store)
    m = store.create("q", msg(param1="a", param2=7, src="me", params={"k": [1, 2]}, max_count=3))
    assert MSG_ID_RE.match(m.msg_id)
    v = store.get("q", m.msg_id)
    assert v.state == State.QUE and v.status == "que"
    assert v.message.param1 == "a" and v.message.param2 == "7" and v.message.src == "me"
    assert v.message.params == {"k": [1, 2]} and v.message.max_count == 3
    assert v.message.dest == "q" and v.message.created_at > 0 and v.message.due == v.message.created_at
    assert v.message.history[0]["state"] == "que"


def test_ids_are_unique_and_time_ordered(store: Store) -> None:
    make_queue(store)
    ids = [store.create("q", msg()).msg_id for _ in range(50)]
    ids += [m.msg_id for m in store.create_many("q", [msg() for _ in range(50)])]
    assert len(set(ids)) == 100
    # creation-time prefix never decreases
    prefixes = [i.rsplit(".", 1)[0] for i in ids]
    assert prefixes == sorted(prefixes)


def test_message_validation(store: Store) -> None:
    make_queue(store)
    with pytest.raises(InvalidMessage):
        Message.from_dict({"param1": {"nested": 1}})
    with pytest.raises(InvalidMessage):
        Message.from_dict({"count": "lots"})
    with pytest.raises(InvalidMessage):
        Message.from_dict({"due": "tomorrow"})
    with pytest.raises(InvalidMessage):
        Message.from_dict({"post_run_webhook": ["file:///etc/passwd"]})
    with pytest.raises(InvalidMessage):
        Message.from_dict({"whatever": 1}, strict=True)
    with pytest.raises(TooLarge):
        store.create("q", msg(param1="x" * (2 * 1024 * 1024)))
    assert store.counts("q")["que"] == 0


def test_prep_attach_commit(store: Store, tmp_path: Path) -> None:
    make_queue(store)
    f = tmp_path / "data.bin"
    f.write_bytes(b"hello world" * 1000)
    m = store.create("q", msg(), state=State.PREP)
    assert store.state_of("q", m.msg_id) == State.PREP
    info = store.attach("q", m.msg_id, AttachmentSource(path=str(f)))
    assert info.name == "data.bin" and info.size == 11000
    assert info.md5 == hashlib.md5(f.read_bytes()).hexdigest()
    assert info.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    store.attach("q", m.msg_id, AttachmentSource(name="s.txt", stream=io.BytesIO(b"streamed")))
    store.commit("q", m.msg_id)
    store.commit("q", m.msg_id)  # idempotent
    v = store.get("q", m.msg_id)
    assert v.state == State.QUE
    assert set(v.attachments) == {"data.bin", "s.txt"}
    assert v.attachments["s.txt"].md5 == hashlib.md5(b"streamed").hexdigest()
    with store.open_attachment("q", m.msg_id, "s.txt") as fh:
        assert fh.read() == b"streamed"
    with pytest.raises(WrongState):
        store.attach("q", m.msg_id, AttachmentSource(name="late", stream=io.BytesIO(b"x")))
    with pytest.raises(AttachmentNotFound):
        store.open_attachment("q", m.msg_id, "missing")
    store.move("q", m.msg_id, State.QUE, State.RUN)
    with pytest.raises(WrongState, match="only prep"):  # past que: a commit is a mistake, said so
        store.commit("q", m.msg_id)


def test_send_with_attachments_in_one_step(store: Store, tmp_path: Path) -> None:
    make_queue(store)
    f = tmp_path / "a.txt"
    f.write_text("A")
    m = store.create("q", msg(), attachments=[AttachmentSource(path=str(f)),
                                              AttachmentSource(name="b.txt", stream=io.BytesIO(b"B"))])
    v = store.get("q", m.msg_id)
    assert {n: a.size for n, a in v.attachments.items()} == {"a.txt": 1, "b.txt": 1}


@pytest.mark.parametrize("name", [".hidden", "a/b", "../etc", "a b", "x;rm", "$(x)", "a|b", "", "a\nb", "`x`",
                                  "trailing\n", "nul\x00", "x" * 201])
def test_hostile_attachment_names(store: Store, name: str) -> None:
    make_queue(store)
    m = store.create("q", msg(), state=State.PREP)
    with pytest.raises(InvalidName):
        store.attach("q", m.msg_id, AttachmentSource(name=name, stream=io.BytesIO(b"x")))
    assert store.get("q", m.msg_id).attachments == {}


def test_bad_attachment_paths(store: Store, tmp_path: Path) -> None:
    make_queue(store)
    m = store.create("q", msg(), state=State.PREP)
    for path, text in [("relative.txt", "must start with /"), (str(tmp_path / "missing"), "No such file"),
                       (str(tmp_path), "cannot be a directory")]:
        with pytest.raises(InvalidInput, match=text):
            store.attach("q", m.msg_id, AttachmentSource(path=path))


@pytest.mark.parametrize("bad", ["../../etc", "20261123.0920.08.804", "x", "20261123.0920.08.804.1/..", "",
                                 "20261123.0920.08.804.1\n", "20261123.0920.08.804.\u0661"])
def test_hostile_message_ids(store: Store, bad: str) -> None:
    make_queue(store)
    with pytest.raises(InvalidName):
        store.get("q", bad)


def test_missing_message(store: Store) -> None:
    make_queue(store)
    with pytest.raises(MessageNotFound):
        store.get("q", "20200101.0000.00.000.1")


def test_list_newest_first_with_cursor_and_filter(store: Store) -> None:
    make_queue(store)
    ids = [store.create("q", msg(param1=f"item-{i}", param2="even" if i % 2 == 0 else "odd")).msg_id
           for i in range(25)]
    newest_first = sorted(ids, key=sort_key, reverse=True)
    page = store.list("q", State.QUE, limit=10)
    assert [v.msg_id for v in page.items] == newest_first[:10]
    seen = [v.msg_id for v in page.items]
    while page.next_cursor:
        page = store.list("q", State.QUE, limit=10, cursor=page.next_cursor)
        seen += [v.msg_id for v in page.items]
    assert seen == newest_first
    odd = store.list("q", State.QUE, limit=100, filter="ODD")
    assert len(odd.items) == 12 and all(v.message.param2 == "odd" for v in odd.items)
    assert store.list("q", State.DONE).items == []


@pytest.mark.parametrize("fields", [
    {"param1": "a\x00b"}, {"param2": "\ud800"}, {"params": {"k": "\udc80"}},
    {"params": {"deep": functools.reduce(lambda acc, _: [acc], range(40), cast("list[Any]", []))}},
    {"params": {"n": float("inf")}}, {"count": 1.5}, {"max_count": 1e400},
])
def test_unsafe_message_values_are_refused(store: Store, fields: dict[str, Any]) -> None:
    # Each of these was once accepted and then broke the daemon or every later listing.
    make_queue(store)
    with pytest.raises(InvalidMessage):
        store.create("q", Message.from_dict(fields))
    assert store.counts("q")["que"] == 0


def test_filter_searches_values_in_any_script(store: Store) -> None:
    make_queue(store)
    cafe = store.create("q", msg(param1="Café Zürich", params={"cust": "ACME", "tags": ["Blue"]})).msg_id
    store.create("q", msg(param1="plain"))
    store.set_status("q", cafe, "run STRASSE 5")

    def found(text: str) -> list[str]:
        return [v.msg_id for v in store.list("q", State.QUE, filter=text).items]

    for text in ("café", "ZÜRICH", "acme", "cust=acme", "tags=blue", "straße", cafe):
        assert found(text) == [cafe], text
    assert len(found("m1")) == 0, "field names are not searched"
    assert len(found("plain")) == 1


def test_a_scan_limit_bounds_each_search_and_the_cursor_goes_on(store: Store) -> None:
    make_queue(store)
    ids = [store.create("q", msg(param1=f"n{i}", params={"hit": i % 10 == 0})).msg_id for i in range(95)]
    want = sorted((m for i, m in enumerate(ids) if i % 10 == 0), key=sort_key, reverse=True)
    found: list[str] = []
    cursor = None
    calls = 0
    while True:
        page = store.list("q", State.QUE, limit=50, cursor=cursor, filter="hit=true", scan_limit=20)
        assert page.scanned <= 20
        calls += 1
        found += [v.msg_id for v in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert found == want and calls == 5, "95 messages, 20 examined per call"
    ids_page = store.find_ids("q", State.QUE, filter="hit=true", limit=3)
    assert ids_page.ids == want[:3] and ids_page.next_cursor is not None


def test_delete_many(store: Store) -> None:
    make_queue(store)
    a, b, c = (store.create("q", msg()).msg_id for _ in range(3))
    store.move("q", c, State.QUE, State.RUN)
    failures = store.delete_many("q", [a, b, c, "20200101.0000.00.000.1"])
    assert [(m, type(e)) for m, e in failures] == [(c, WrongState), ("20200101.0000.00.000.1", MessageNotFound)]
    assert store.counts("q")["que"] == 0 and store.counts("q")["run"] == 1
    with pytest.raises(MessageNotFound):
        store.get("q", a)


def test_delete_many_in_a_state_leaves_what_moved(store: Store) -> None:
    """What a caller chose by state (the cleaner: old acknowledged errors) is deleted only if
    still there: a message retried meanwhile is not lost."""
    make_queue(store)
    acked, unacked, retried, prep = (store.create("q", msg()).msg_id for _ in range(4))
    for m in (acked, retried):
        store.move("q", m, State.QUE, State.ERR)
    store.ack_errs("q")
    store.move("q", unacked, State.QUE, State.ERR)
    store.move("q", retried, State.ERR, State.QUE)  # a retry after the caller listed it
    failures = store.delete_many("q", [acked, unacked, retried], state=State.ERR, acked=True)
    assert sorted(m for m, e in failures if isinstance(e, WrongState)) == sorted([unacked, retried])
    assert store.state_of("q", retried) == State.QUE and store.state_of("q", unacked) == State.ERR
    with pytest.raises(MessageNotFound):
        store.get("q", acked)
    assert [m for m, _ in store.delete_many("q", [prep], state=State.PREP)] == [prep]  # it is queued
    assert store.state_of("q", prep) == State.QUE


def test_relay_keys(store: Store) -> None:
    """The receiving side of exactly-once relay: a key names the message made for it, while
    that message exists."""
    make_queue(store)
    m = store.create("q", msg(), state=State.PREP).msg_id
    assert store.relay_key("q", "far/1@1.5") is None
    store.set_relay_key("q", "far/1@1.5", m)
    assert store.relay_key("q", "far/1@1.5") == m
    assert store.relay_key("q", "far/2@1.5") is None
    store.sweep("q")  # a fresh key stays
    assert store.relay_key("q", "far/1@1.5") == m
    store.delete("q", m)
    assert store.relay_key("q", "far/1@1.5") is None, "a key whose message is gone is no key"


def test_create_many_in_prep_waits_for_commits_in_order(store: Store) -> None:
    """Batches in prep (the isq spool's take, docs/isq.md), committed one by one, and FIFO:
    a batch's messages are due in the order given."""
    make_queue(store)
    made = store.create_many("q", [Message.from_dict({"param1": str(i)}) for i in range(20)], state=State.PREP)
    assert store.counts("q")["prep"] == 20 and store.counts("q")["que"] == 0
    assert [m.due for m in made] == sorted(m.due for m in made)
    assert len({(m.due, m.msg_id) for m in made}) == 20
    for m in made:
        store.commit("q", m.msg_id)
    assert store.counts("q")["que"] == 20
    order = sorted(made, key=lambda m: (m.due, sort_key(m.msg_id)))  # the daemons' order
    assert [m.param1 for m in order] == [str(i) for i in range(20)]
    with pytest.raises(InvalidInput):
        store.create_many("q", [msg()], state=State.RUN)


def test_counts_follow_every_change(store: Store) -> None:
    make_queue(store)
    a = store.create("q", msg()).msg_id
    b = store.create("q", msg()).msg_id
    store.create("q", msg(), state=State.PREP)
    store.create_many("q", [msg(), msg()])
    store.move("q", a, State.QUE, State.RUN)
    store.move("q", a, State.RUN, State.ERR)
    store.move("q", b, State.QUE, State.RUN)
    store.move("q", b, State.RUN, State.DONE)
    c = store.counts("q")
    assert (c["prep"], c["que"], c["run"], c["done"], c["err"]) == (1, 2, 0, 1, 1)
    assert store.ack_errs("q") == 1
    c = store.counts("q")
    assert c["err"] == 0 and c["err_acked"] == 1
    store.delete("q", b)
    assert store.counts("q")["done"] == 0
    assert store.recount("q") == store.counts("q")


def test_transitions_are_enforced(store: Store) -> None:
    make_queue(store)
    m = store.create("q", msg()).msg_id
    with pytest.raises(WrongState):
        store.move("q", m, State.QUE, State.PREP)
    with pytest.raises(WrongState):
        store.move("q", m, State.RUN, State.DONE)  # it is not in run
    store.move("q", m, State.QUE, State.RUN)
    store.move("q", m, State.RUN, State.DONE)
    with pytest.raises(WrongState):
        store.move("q", m, State.DONE, State.QUE)
    assert [h["state"] for h in store.get("q", m).message.history] == ["que", "run", "done"]


def test_move_with_update_and_status(store: Store) -> None:
    make_queue(store)
    m = store.create("q", msg()).msg_id
    store.move("q", m, State.QUE, State.RUN)
    store.set_status("q", m, "halfway")
    assert store.get("q", m).status == "run - halfway"

    def bump(x: Message) -> None:
        x.count += 1
        x.due = 123.0

    store.move("q", m, State.RUN, State.QUE, update=bump, note="resend")
    v = store.get("q", m)
    assert v.state == State.QUE and v.message.count == 1 and v.message.due == 123.0
    assert v.message.history[-1].get("note") == "resend"
    store.update("q", m, lambda x: setattr(x, "param4", "changed"))
    assert store.get("q", m).message.param4 == "changed"


def test_running_messages_cannot_be_deleted(store: Store) -> None:
    make_queue(store)
    m = store.create("q", msg()).msg_id
    store.move("q", m, State.QUE, State.RUN)
    with pytest.raises(WrongState):
        store.delete("q", m)


def test_acked_errors_can_be_retried(store: Store) -> None:
    make_queue(store)
    m = store.create("q", msg()).msg_id
    store.move("q", m, State.QUE, State.ERR)
    store.ack_errs("q")
    assert store.get("q", m).acked
    store.move("q", m, State.ERR, State.QUE)
    assert store.counts("q")["err_acked"] == 0 and store.counts("q")["que"] == 1


def test_find_ids_walks_every_message_of_a_state(store: Store) -> None:
    make_queue(store)
    made = {m.msg_id for m in store.create_many("q", [msg() for _ in range(30)])}
    page = store.find_ids("q", State.QUE, limit=1000)
    assert set(page.ids) == made and page.next_cursor is None
    assert store.find_ids("q", State.RUN).ids == []


def test_the_workdir_and_the_log_go_on_across_attempts(store: Store) -> None:
    """A script's files stay in its working directory for the next attempt (on this host),
    beside ``../msg`` and ``../attach``; what it writes to ``log_fd`` is the message's log."""
    import json
    import os

    from spoolq.store.leases import Attempt

    make_queue(store)
    m = store.create("q", msg(param1="p"), attachments=[AttachmentSource(name="a.txt", stream=io.BytesIO(b"A"))])
    for n in (1, 2):
        a = store.claim("q", owner="o", lease=30)
        assert isinstance(a, Attempt) and a.msg_id == m.msg_id
        job = store.workdir(a)
        assert job.is_dir() and (job.parent / "attach" / "a.txt").read_bytes() == b"A"
        assert json.loads((job.parent / "msg").read_bytes())["param1"] == "p"
        if n == 2:
            assert (job / "left").read_text() == "by attempt 1", "kept for the next attempt"
        (job / "left").write_text("by attempt 1")
        fd = store.log_fd(a)
        os.write(fd, f"attempt {n}\n".encode())
        os.close(fd)
        store.finish(a, State.QUE if n == 1 else State.DONE, status=f"try {n}")
    assert log_soon(store, "q", m.msg_id, b"attempt 1\nattempt 2\n") == b"attempt 1\nattempt 2\n"



@pytest.mark.parametrize("left", ["symlink", "hard link"])
def test_a_link_left_as_the_log_is_not_written_through(store: Store, tmp_path: Path, left: str) -> None:
    """A script may leave ``job/stdio.log`` as a link to a file elsewhere (by accident, or
    unpacked from an archive); the next attempt's output must not land in that file."""
    import os

    from spoolq.store.leases import Attempt
    from spoolq.store.pg import PgStore

    if isinstance(store, PgStore):
        pytest.skip("PostgreSQL's log_fd is a pipe into the database: no file to follow a link to")
    make_queue(store)
    m = store.create("q", msg())
    a = store.claim("q", owner="o", lease=30)
    assert isinstance(a, Attempt) and a.msg_id == m.msg_id
    job = store.workdir(a)
    other = tmp_path / "other"
    other.write_bytes(b"not a log\n")
    log = job / "stdio.log"
    if log.exists() or log.is_symlink():
        log.unlink()
    if left == "hard link":
        try:
            os.link(other, log)
        except OSError as e:  # another filesystem than the test's directory
            pytest.skip(f"no hard link from {job} to {tmp_path}: {e}")
    else:
        log.symlink_to(other)
    store.finish(a, State.QUE, status="")
    a = store.claim("q", owner="o", lease=30)
    assert isinstance(a, Attempt) and a.msg_id == m.msg_id
    store.workdir(a)
    fd = store.log_fd(a)
    os.write(fd, b"attempt 2\n")
    os.close(fd)
    store.finish(a, State.DONE, status="")
    assert other.read_bytes() == b"not a log\n"


@pytest.mark.parametrize("ref,expect", [
    ("q/20261123.0920.08.804.1", ("q", "20261123.0920.08.804.1")),
    ("mail/20261123.0920.08.804.1", ("mail", "20261123.0920.08.804.1")),
    ("/q/mail/20261123.0920.08.804.1", ("mail", "20261123.0920.08.804.1")),
    ("http://h.example:3333/q/q/20261123.0920.08.804.1", ("q", "20261123.0920.08.804.1")),
])
def test_message_references(ref: str, expect: tuple[str, str]) -> None:
    from spoolq.ids import parse_ref

    assert tuple(parse_ref(ref)) == expect


@pytest.mark.parametrize("ref", ["mail", "mail/../x", "../q/x", "http://h/q/mail/notanid",
                                 "a b/20261123.0920.08.804.1"])
def test_bad_message_references(ref: str) -> None:
    from spoolq.ids import parse_ref

    with pytest.raises(InvalidName):
        parse_ref(ref)


@pytest.mark.parametrize("items", [
    [Message(param1="x", due=-5)], [Message(max_count=0)], [{"delay": -100}], [{"delay": 5, "due": 1}],
    [{"delay": "abc"}], [{"param1": "ok"}, {"param1": ["not", "a", "string"]}], [{"parm1": "typo"}],
])
def test_client_send_many_validates_everything_first(store: Store, items: list[Any]) -> None:
    # The store's group commit trusts its input; the client must refuse bad messages before
    # any is stored, or they would be acknowledged and then set aside as corrupt.
    from spoolq.client import Client

    make_queue(store)
    with pytest.raises(InvalidMessage):
        Client(store).send_many("q", items)
    assert store.counts("q")["que"] == 0 and store.find_ids("q", State.QUE).ids == []
    if isinstance(items[0], dict):  # send refuses the same field as one message
        with pytest.raises(InvalidMessage):
            Client(store).send("q", **items[-1])


def test_the_client_answers_what_the_cli_and_http_used_to_ask_the_store(store: Store) -> None:
    """state, open_log, delete_attachment, served, upload_dir: the CLI and HTTP go through
    the client for these (the store seam, tests/test_seam.py), on every store."""
    c = Client(store)
    make_queue(store)
    r = c.send("q")
    assert c.state(r) == State.QUE and c.state(f"q/{r.msg_id}") == State.QUE
    with pytest.raises(MessageNotFound):
        c.state("q/20260101.0000.00.000.1")
    with pytest.raises(LogNotFound):
        c.open_log(r)
    p = c.prep("q")
    c.attach(p, name="a.txt", stream=io.BytesIO(b"hi"))
    assert set(c.get(p).attachments) == {"a.txt"}
    c.delete_attachment(p, "a.txt")
    assert c.get(p).attachments == {}
    name = str(store.root) if isinstance(store, FsStore) else store.url
    assert c.served() == (False, name), "no daemon serves it"
    store.acquire_daemon()
    try:
        assert c.served() == (True, name)
    finally:
        store.release_daemon()
    assert c.served() == (False, name)
    if isinstance(store, FsStore):
        assert c.upload_dir == store.root / ".uploads"
    else:
        assert c.upload_dir.is_absolute()


def test_root_config_and_the_daemon_slot(store: Store, tmp_path: Path) -> None:
    """Where the daemon listens is kept by the store; only one daemon serves a store."""
    from spoolq.config import RootConfig
    from spoolq.errors import DaemonRunning

    assert store.root_config() == RootConfig()
    assert store.set_root_config(RootConfig("127.0.0.1", 4444)) is True
    assert store.set_root_config(RootConfig("127.0.0.1", 4444)) is False, "unchanged: nothing written"
    assert store.root_config() == RootConfig("127.0.0.1", 4444)
    assert Client(store).base_url == "http://127.0.0.1:4444"
    store.acquire_daemon()
    try:
        if isinstance(store, FsStore):
            other = FsStore(store.root)
            assert other.served() is True
            with pytest.raises(DaemonRunning):
                other.acquire_daemon()
    finally:
        store.release_daemon()
    if isinstance(store, FsStore):
        again = FsStore(store.root)
        again.acquire_daemon()  # free again: released, and its fd closed
        again.release_daemon()


def test_a_message_watch_wakes_wait_and_log_follow(store: Store) -> None:
    """``wait`` and ``log -f`` sleep on the store's watch of one message, on every store."""
    import threading

    c = Client(store)
    make_queue(store)
    r = c.send("q")
    with pytest.raises(MessageNotFound):
        store.watch_message("q", "20260101.0000.00.000.1")

    def finish() -> None:
        store.move("q", r.msg_id, State.QUE, State.RUN, note="run")
        store.set_status("q", r.msg_id, "fine")
        store.move("q", r.msg_id, State.RUN, State.DONE, note="done")

    t = threading.Timer(0.2, finish)
    t.start()
    try:
        assert c.wait(r, 30).status == "done - fine"
    finally:
        t.join()
    out = io.BytesIO()
    assert c.follow_log(r, out, follow=True).state == State.DONE
    assert out.getvalue() == b""  # no log was written: nothing to copy, and no hang


def test_cancel_queued_running_and_final(store: Store) -> None:
    """Queued: err at once. Running: recorded for the daemon (RUN). Final: WrongState."""
    make_queue(store)
    a = store.create("q", msg()).msg_id
    assert store.cancel("q", a) == State.ERR
    v = store.get("q", a)
    assert (v.state, v.status) == (State.ERR, "err - cancelled")
    b = store.create("q", msg()).msg_id
    store.move("q", b, State.QUE, State.RUN, note="run")
    assert store.cancel("q", b) == State.RUN
    assert store.cancel("q", b) == State.RUN, "asking twice is fine"
    assert store.state_of("q", b) == State.RUN, "the daemon, not the caller, ends it"
    if isinstance(store, FsStore):
        mdir = store.message_dir("q", b)
        assert (mdir / "cancel").exists()
        assert (store.qdir("q") / "kick" / b).exists(), "the daemon is woken"
    with pytest.raises(WrongState):
        store.cancel("q", a)


# -- attempts and leases (store/leases.py) ------------------------------------------------
def test_claim_order_due_times_and_admin_state(store: Store) -> None:
    from spoolq.store.leases import Attempt

    make_queue(store)
    now = time.time() + 5  # after every creation: the messages without a due time are due
    late = store.create("q", msg(due=now + 60)).msg_id
    first = store.create("q", msg()).msg_id
    second = store.create("q", msg()).msg_id
    store.set_admin_state("q", AdminState.PAUSE)
    assert store.claim("q", owner="a", lease=30, now=now) is None, "PAUSE runs nothing"
    store.set_admin_state("q", AdminState.UP)
    a = store.claim("q", owner="a", lease=30, now=now)
    assert isinstance(a, Attempt) and a.msg_id == first and a.expires_at == now + 30
    assert store.state_of("q", first) == State.RUN
    b = store.claim("q", owner="a", lease=30, now=now)
    assert isinstance(b, Attempt) and b.msg_id == second and b.attempt_id != a.attempt_id
    assert store.claim("q", owner="a", lease=30, now=now) == now + 60, "when the next one is due"
    c = store.claim("q", owner="a", lease=30, now=now + 61)
    assert isinstance(c, Attempt) and c.msg_id == late
    assert store.claim("q", owner="a", lease=30, now=now + 61) is None


def test_blocking_and_coalescing_params(store: Store) -> None:
    from spoolq.store.leases import Attempt

    make_queue(store, blocking_params=[1], coalesce_params=[2])
    t0 = time.time() + 5
    x1 = store.create("q", msg(param1="x", param2="a")).msg_id
    x2 = store.create("q", msg(param1="x", param2="b")).msg_id
    y = store.create("q", msg(param1="y", param2="a")).msg_id
    z = store.create("q", msg(param1="z", param2="c")).msg_id
    a = store.claim("q", owner="o", lease=30, now=t0)
    assert isinstance(a, Attempt) and a.msg_id == x1 and a.dups == (y,), "y has the same coalesce param"
    b = store.claim("q", owner="o", lease=30, now=t0)
    assert isinstance(b, Attempt) and b.msg_id == z, "x2 is blocked by x1, y is held"
    assert store.claim("q", owner="o", lease=30, now=t0) is None
    store.finish(a, State.DONE, status="ok", dup_status="duplicate of x1")
    assert store.get("q", y).status == "done - duplicate of x1", "the duplicate finished with its parent"
    c = store.claim("q", owner="o", lease=30, now=t0)
    assert isinstance(c, Attempt) and c.msg_id == x2, "x1 ended: x2 is no longer blocked"
    # A parent that fails releases its duplicates: they run on their own.
    d1 = store.create("q", msg(param1="p", param2="k")).msg_id
    d2 = store.create("q", msg(param1="q", param2="k")).msg_id
    store.finish(b, State.DONE, status="ok")
    store.finish(c, State.DONE, status="ok")
    e = store.claim("q", owner="o", lease=30, now=t0)
    assert isinstance(e, Attempt) and (e.msg_id, e.dups) == (d1, (d2,))
    store.finish(e, State.ERR, status="failed")
    f = store.claim("q", owner="o", lease=30, now=t0)
    assert isinstance(f, Attempt) and f.msg_id == d2


def test_duplicates_record_their_parent_and_status_can_be_left_alone(store: Store) -> None:
    """finish(dup_of=): each duplicate taken along names its parent's full id; status=None
    leaves the status the script last set."""
    from spoolq.store.leases import Attempt

    make_queue(store, coalesce_params=[1])
    parent = store.create("q", msg(param1="k")).msg_id
    dup = store.create("q", msg(param1="k")).msg_id
    a = store.claim("q", owner="o", lease=30, now=time.time() + 5)
    assert isinstance(a, Attempt) and a.dups == (dup,)
    store.set_status("q", parent, "last words")
    store.finish(a, State.DONE, status=None, dup_of=f"http://h:1/q/q/{parent}")
    assert store.get("q", parent).job_status == "last words"
    v = store.get("q", dup)
    assert v.state == State.DONE and v.message.dup == f"http://h:1/q/q/{parent}"
    assert v.job_status == f"duplicate http://h:1/q/q/{parent}"
    assert v.message.history[-1].get("note") == f"duplicate of http://h:1/q/q/{parent}"


def test_finish_is_fenced_and_reclaim_takes_over(store: Store) -> None:
    """A holder whose lease ran out (a dead host) cannot finish what another took over. On
    the filesystem the lease is the daemon's lock: the taker is the next daemon."""
    from spoolq.errors import LeaseLost
    from spoolq.store.leases import Attempt

    make_queue(store)
    m = store.create("q", msg(param1="job")).msg_id
    t0 = time.time() + 5
    store.acquire_daemon()
    a = store.claim("q", owner="host-a", lease=30, now=t0)
    assert isinstance(a, Attempt)
    lease = store.heartbeat(a, lease=30, runner="4242 17", now=t0 + 10)
    assert lease.expires_at == t0 + 40 and not lease.cancel_requested
    assert store.reclaim("q", owner="host-a", lease=30, now=t0 + 20) == [], "its own live attempt"
    # host-a dies: its lease ends at t0 + 40 (its lock is let go). host-b takes over after that.
    store.release_daemon()
    taker: Store = FsStore(store.root) if isinstance(store, FsStore) else store
    if isinstance(store, FsStore):
        assert taker.reclaim("q", owner="host-b", lease=30, now=t0 + 41) == [], "not the daemon: hands off"
    taker.acquire_daemon()
    try:
        (b,) = taker.reclaim("q", owner="host-b", lease=30, now=t0 + 41)
        assert (b.msg_id, b.runner, b.owner) == (m, "4242 17", "host-b") and b.attempt_id != a.attempt_id
        assert taker.reclaim("q", owner="host-b", lease=30, now=t0 + 42) == [], "taken once"
        taker.cancel("q", m)
        assert taker.heartbeat(b, lease=30, now=t0 + 42).cancel_requested
        with pytest.raises(LeaseLost):
            store.heartbeat(a, lease=30, now=t0 + 42)
        with pytest.raises(LeaseLost):
            store.finish(a, State.DONE, status="late")
        assert taker.state_of("q", m) == State.RUN, "the fenced-out finish changed nothing"
        done = taker.finish(b, State.ERR, status="cancelled",
                            update=lambda msg: setattr(msg, "count", msg.count + 1))
        assert done.count == 1 and taker.get("q", m).status == "err - cancelled"
        with pytest.raises(LeaseLost):
            taker.finish(b, State.DONE, status="twice")
    finally:
        taker.release_daemon()


def test_a_finish_that_fails_can_be_retried(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk refuses the move: the attempt still holds the message, the retry lands."""
    from spoolq.errors import DiskFull
    from spoolq.store.leases import Attempt

    make_queue(store)
    m = store.create("q", msg()).msg_id
    a = store.claim("q", owner="o", lease=30, now=time.time() + 5)
    assert isinstance(a, Attempt)
    real = store.move

    def full(*args: Any, **kw: Any) -> Any:
        raise DiskFull("no space left on device")

    monkeypatch.setattr(store, "move", full)
    db = getattr(store, "db", None)
    if db is not None:  # PostgreSQL: a finish that does not rewrite the message is one statement
        real_cursor = db.cursor
        monkeypatch.setattr(db, "cursor", full)
    with pytest.raises(DiskFull):
        store.finish(a, State.DONE, status="ok")
    monkeypatch.setattr(store, "move", real)
    if db is not None:
        monkeypatch.setattr(db, "cursor", real_cursor)
    store.finish(a, State.DONE, status="ok")
    assert store.get("q", m).status == "done - ok"


def test_a_held_duplicate_that_leaves_the_queue_is_free(store: Store) -> None:
    from spoolq.store.leases import Attempt

    make_queue(store, coalesce_params=[1])
    t0 = time.time() + 5
    store.create("q", msg(param1="k"))
    dup = store.create("q", msg(param1="k")).msg_id
    a = store.claim("q", owner="o", lease=30, now=t0)
    assert isinstance(a, Attempt) and a.dups == (dup,)
    store.cancel("q", dup)  # the user cancels the duplicate, then retries it
    store.move("q", dup, State.ERR, State.QUE, note="retry")
    b = store.claim("q", owner="o", lease=30, now=t0)
    assert isinstance(b, Attempt) and b.msg_id == dup, "no longer held by the parent"
    store.finish(a, State.DONE, status="ok")
    assert store.state_of("q", dup) == State.RUN, "the parent's success does not take it along"


def test_a_running_message_names_the_host_that_runs_it(store: Store) -> None:
    """Issue 8: the API and the UI show which host runs each attempt (``MessageView.host``,
    from the runner its daemon recorded)."""
    from spoolq.store.leases import Attempt

    make_queue(store)
    m = store.create("q", msg()).msg_id
    a = store.claim("q", owner="host-b:12", lease=30, now=time.time() + 5)
    assert isinstance(a, Attempt)
    assert store.get("q", m).host == "", "not started yet"
    store.heartbeat(a, lease=30, runner="4242 17 host-b")
    v = store.get("q", m)
    assert v.host == "host-b" and v.to_rq_json()["host"] == "host-b"
    store.finish(a, State.DONE, status="ok")
    assert store.get("q", m).host == "" and "host" not in store.get("q", m).to_rq_json()


def test_record_runner_is_what_a_heartbeat_with_a_runner_records(store: Store) -> None:
    """The daemon records the script's pid with ``record_runner`` (no look for a cancel):
    the same record a heartbeat's ``runner`` makes, gone with the attempt's finish."""
    from spoolq.errors import LeaseLost
    from spoolq.store.leases import Attempt

    make_queue(store)
    m = store.create("q", msg()).msg_id
    a = store.claim("q", owner="host-b:12", lease=30, now=time.time() + 5)
    assert isinstance(a, Attempt)
    store.record_runner(a, "4242 17 host-b", lease=30)
    assert store.get("q", m).host == "host-b"
    store.finish(a, State.DONE, status="ok")
    assert store.get("q", m).host == ""
    with pytest.raises(LeaseLost):
        store.record_runner(a, "4243 18 host-b", lease=30)  # the attempt is over: fenced out


def test_start_job_is_workdir_and_log_fd_in_one_step(store: Store) -> None:
    """``start_job``: the working directory (made, beside ``../msg``) and a log fd, on the
    first attempt and on a later one, whose files and log go on."""
    import json
    import os

    from spoolq.store.leases import Attempt

    make_queue(store)
    m = store.create("q", msg(param1="p"))
    for n in (1, 2):
        a = store.claim("q", owner="o", lease=30)
        assert isinstance(a, Attempt) and a.msg_id == m.msg_id
        job, fd = store.start_job(a)
        try:
            assert isinstance(job, str) and os.path.isdir(job) and os.path.basename(job) == "job"
            assert json.loads(Path(job, "..", "msg").read_bytes())["param1"] == "p"
            if n == 2:
                assert Path(job, "left").read_text() == "by attempt 1"
            Path(job, "left").write_text("by attempt 1")
            os.write(fd, f"attempt {n}\n".encode())
        finally:
            os.close(fd)
        store.finish(a, State.QUE if n == 1 else State.DONE, status=f"try {n}")
    assert log_soon(store, "q", m.msg_id, b"attempt 1\nattempt 2\n") == b"attempt 1\nattempt 2\n"


def test_cluster_workers_limit_running_messages_over_every_host(store: Store) -> None:
    """Issue 8: ``num_workers`` is per host; ``cluster_workers`` bounds a queue's running
    messages over every host that claims from the store."""
    from spoolq.store.leases import Attempt

    make_queue(store, cluster_workers=2)
    for _ in range(3):
        store.create("q", msg())
    t = time.time() + 5
    a = store.claim("q", owner="host-a", lease=30, now=t)
    b = store.claim("q", owner="host-b", lease=30, now=t)
    assert isinstance(a, Attempt) and isinstance(b, Attempt)
    assert store.claim("q", owner="host-c", lease=30, now=t) is None, "two run: the third waits"
    store.finish(a, State.DONE, status="ok")
    assert isinstance(store.claim("q", owner="host-c", lease=30, now=t), Attempt)
    assert store.queue_config("q").to_dict()["cluster_workers"] == 2
