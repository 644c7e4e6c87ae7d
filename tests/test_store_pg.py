"""What only the PostgreSQL store has to prove: several hosts (separate stores, separate
connections) on one database, leases on the database's clock, migrations and the schema
check, streamed attachments, LISTEN/NOTIFY. The Store contract itself runs on PostgreSQL in
tests/test_store_contract.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SPOOLQ

from spoolq.errors import LeaseLost, LogNotFound, SchemaMismatch
from spoolq.model import AdminState, Message, QueueConfig, State
from spoolq.store import MemoryStore, open_store
from spoolq.store.base import AttachmentSource
from spoolq.store.leases import Attempt
from spoolq.store.pg import PgStore
from spoolq.store.pg.sql import migrations


@pytest.fixture
def stores(pg_url: str) -> Iterator[list[PgStore]]:
    """Four stores on one database: four hosts, each with its own pool."""
    made = [PgStore(pg_url) for _ in range(4)]
    yield made
    for s in made:
        s.close()


def make_queue(store: Any, name: str = "q", **kw: Any) -> None:
    store.create_queue(QueueConfig.from_dict({"name": name, "script": "/bin/true", **kw}))


def claim_all(store: PgStore, queue: str, on_claim: Any = None) -> list[str]:
    """Claim and finish until the queue has nothing runnable; the ids this host ran."""
    ran: list[str] = []
    while True:
        a = store.claim(queue, owner=f"host-{id(store)}", lease=30)
        if not isinstance(a, Attempt):
            return ran
        ran.append(a.msg_id)
        if on_claim is not None:
            on_claim(a)
        store.finish(a, State.DONE, status="ok")


def in_threads(items: list[Any], work: Any) -> list[Any]:
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(items[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_concurrent_claims_never_share_a_message(stores: list[PgStore]) -> None:
    make_queue(stores[0])
    made = {m.msg_id for m in stores[0].create_many("q", [Message(param1=str(i)) for i in range(500)])}
    ran = in_threads(stores, lambda s: claim_all(s, "q"))
    every = [i for r in ran for i in r]
    assert len(every) == len(set(every)) == 500, "each message claimed exactly once"
    assert set(every) == made
    assert all(r for r in ran), "every host got some work"
    assert stores[0].counts("q")["done"] == 500


def test_blocking_params_hold_across_hosts(stores: list[PgStore]) -> None:
    """Four hosts claim from a queue whose messages share 2 blocking keys: never two
    messages with one key running at once, and each message runs once. (Without the claim
    lock, attempts.py, this fails nearly every time: claims overlap all the time.)"""
    make_queue(stores[0], blocking_params=[1])
    stores[0].create_many("q", [Message(param1=f"k{i % 2}", param2=str(i)) for i in range(200)])
    running: set[str] = set()
    clashes: list[str] = []
    guard = threading.Lock()

    def hold(a: Attempt) -> None:
        key = a.message.param1
        with guard:
            if key in running:
                clashes.append(key)
            running.add(key)
        time.sleep(0.0005)  # run a little, so that other hosts try the same key meanwhile
        with guard:
            running.discard(key)  # before the finish commits: a later claim of the key is fair

    ran = in_threads(stores, lambda s: claim_all(s, "q", hold))
    assert clashes == []
    assert sorted(i for r in ran for i in r) == sorted(stores[0].find_ids("q", State.DONE, limit=1000).ids)
    assert stores[0].counts("q")["done"] == 200


def test_a_host_whose_lease_ran_out_is_fenced_out(stores: list[PgStore]) -> None:
    """Host a claims on the database's clock and stops heartbeating; host b reclaims after
    the lease ends; a's heartbeat and finish are refused and change nothing."""
    a_store, b_store = stores[0], stores[1]
    make_queue(a_store)
    m = a_store.create("q", Message(param1="job")).msg_id
    a = a_store.claim("q", owner="host-a", lease=1.0)
    assert isinstance(a, Attempt)
    a_store.heartbeat(a, lease=1.0, runner="4242 17")
    assert b_store.reclaim("q", owner="host-b", lease=30) == [], "a's lease is live"
    time.sleep(1.2)
    (b,) = b_store.reclaim("q", owner="host-b", lease=30)
    assert (b.msg_id, b.runner, b.owner) == (m, "4242 17", "host-b")
    with pytest.raises(LeaseLost):
        a_store.heartbeat(a, lease=30)
    with pytest.raises(LeaseLost):
        a_store.finish(a, State.DONE, status="late")
    with pytest.raises(LeaseLost):
        a_store.workdir(a)
    with pytest.raises(LeaseLost):
        a_store.log_fd(a)
    assert b_store.workdir(b).name == "job"
    os.close(b_store.log_fd(b))  # its fence read by workdir just before
    v = b_store.get("q", m)
    assert (v.state, v.job_status) == (State.RUN, ""), "the fenced-out finish changed nothing"
    b_store.finish(b, State.ERR, status="crashed")
    assert a_store.get("q", m).status == "err - crashed"


def test_many_hosts_serve_one_database_and_a_dead_one_stops_counting(stores: list[PgStore], pg_url: str) -> None:
    a, b = stores[0], stores[1]
    assert a.served() is False
    a.acquire_daemon()
    b.acquire_daemon()  # no DaemonRunning: hosts share the database
    assert stores[2].served() is True
    a.release_daemon()
    assert stores[2].served() is True, "b still serves"
    b.release_daemon()
    assert stores[2].served() is False
    # A host that is killed: its session ends with it, and with it the host's lock.
    code = ("import sys, time; from spoolq.store.pg import PgStore; s = PgStore(sys.argv[1]); "
            "s.acquire_daemon(); print('up', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, pg_url], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "up\n"
        assert stores[2].served() is True
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 10
    while stores[2].served() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stores[2].served() is False


def test_a_clashing_id_gets_another(stores: list[PgStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary key refuses an id that exists; the create takes the next one."""
    from spoolq.store.pg import messages

    s = stores[0]
    make_queue(s)
    first = s.create("q", Message(param1="first"))
    real = messages.make_id
    calls = iter([first.msg_id])
    monkeypatch.setattr(messages, "make_id", lambda t, n: next(calls, None) or real(t, n))
    second, third = s.create_many("q", [Message(param1="second"), Message(param1="third")])
    assert len({first.msg_id, second.msg_id, third.msg_id}) == 3
    assert s.get("q", first.msg_id).message.param1 == "first", "the first message is untouched"
    assert s.get("q", second.msg_id).message.param1 == "second"
    assert s.counts("q")["que"] == 3


def test_a_message_watch_wakes_on_its_log_only(stores: list[PgStore]) -> None:
    s, other = stores[0], stores[1]
    make_queue(s)
    m = s.create("q", Message()).msg_id
    n = s.create("q", Message()).msg_id
    with s.watch_message("q", m, log=True) as watch:
        other.append_log("q", n, b"not this one\n")
        t0 = time.monotonic()
        watch.wait(0.5)
        assert time.monotonic() - t0 >= 0.45, "another message's log does not wake it"
        timer = threading.Timer(0.2, lambda: other.append_log("q", m, b"line\n"))
        timer.start()
        t0 = time.monotonic()
        watch.wait(20)
        timer.join()
        assert time.monotonic() - t0 < 10, "woken by the log, not by the timeout"
    assert s.read_log("q", m) == b"line\n"


def test_log_appends_racing_from_several_hosts_keep_every_byte_once(stores: list[PgStore]) -> None:
    """One-statement appends collide on the log's end and read it again: no chunk lost,
    none overlapping, whichever host appends."""
    from spoolq.errors import MessageNotFound

    make_queue(stores[0])
    m = stores[0].create("q", Message()).msg_id
    lines = [[f"host {h} line {i:03d}\n".encode() for i in range(40)] for h in range(4)]

    def append(h: int) -> None:
        for line in lines[h]:
            stores[h].append_log("q", m, line)

    threads = [threading.Thread(target=append, args=(h,)) for h in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = stores[0].read_log("q", m).splitlines(keepends=True)
    assert sorted(got) == sorted(line for h in lines for line in h)
    for h in range(4):
        assert [x for x in got if x.startswith(f"host {h} ".encode())] == lines[h], "each host's lines in order"
    end = len(b"".join(got))
    with stores[0].db.tx():  # inside a transaction the append is a savepoint
        assert stores[0].append_log("q", m, b"in a transaction\n") == end + 17
    assert stores[1].read_log("q", m, offset=end) == b"in a transaction\n"
    with pytest.raises(MessageNotFound):
        stores[1].append_log("q", m[:-1] + ("9" if m[-1] != "9" else "8"), b"no such message\n")


@pytest.mark.parametrize("kind", ["memory", "pg"])
def test_append_and_read_log_across_moves(kind: str, request: pytest.FixtureRequest) -> None:
    """``append_log``/``read_log`` (what the daemon and SSE will use) on the stores that have
    them; ``open_log`` gives the same bytes, seekable for HTTP Range."""
    s: Any = MemoryStore() if kind == "memory" else PgStore(request.getfixturevalue("pg_url"))
    make_queue(s)
    m = s.create("q", Message()).msg_id
    with pytest.raises(LogNotFound):
        s.read_log("q", m)
    assert s.append_log("q", m, b"attempt 1\n") == 10
    s.move("q", m, State.QUE, State.RUN)
    assert s.append_log("q", m, b"") == 10
    assert s.append_log("q", m, b"x" * 3_000_000) == 3_000_010, "larger than a chunk"
    s.move("q", m, State.RUN, State.DONE)
    assert s.read_log("q", m, offset=8, limit=5) == b"1\nxxx"
    assert s.read_log("q", m, offset=3_000_010) == b"", "nothing new yet"
    with s.open_log("q", m) as f:
        assert f.seek(0, io.SEEK_END) == 3_000_010
        f.seek(9)
        assert f.read(4) == b"\nxxx"
        f.seek(0)
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(b"attempt 1\n" + b"x" * 3_000_000).digest()
    if kind == "pg":
        s.close()


def test_an_unmigrated_database_says_to_migrate_and_the_cli_migrates(pg_cluster: Any) -> None:
    url = pg_cluster.new_database(migrated=False)
    with pytest.raises(SchemaMismatch, match="db migrate"):
        PgStore(url)
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}

    def spoolq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SPOOLQ, "--store", url, *args], capture_output=True, text=True, env=env, timeout=60)

    r = spoolq("send", "q")
    assert r.returncode == 6 and "db migrate" in r.stderr, r.stderr
    every = [f"{m.version:03d}_{m.name}" for m in migrations()]
    assert every[:3] == ["001_init", "002_count_deltas", "003_daemon_channel"]
    assert json.loads(spoolq("--json", "db", "status").stdout) == {"version": 0, "latest": len(every),
                                                                    "pending": every}
    r = spoolq("db", "migrate")
    assert r.returncode == 0 and f"applied {', '.join(every)}" in r.stdout, r.stderr
    r = spoolq("db", "migrate")
    assert r.returncode == 0 and "up to date" in r.stdout, "a second migrate changes nothing"
    assert json.loads(spoolq("--json", "db", "status").stdout)["pending"] == []
    # The whole CLI now works on the database.
    assert spoolq("queue", "create", "q", "--script", "/bin/true").returncode == 0
    sent = spoolq("send", "q", "--param1", "hello")
    assert sent.returncode == 0, sent.stderr
    shown = json.loads(spoolq("--json", "show", sent.stdout.strip()).stdout)
    assert (shown["param1"], shown["state"]) == ("hello", "que")
    r = subprocess.run([SPOOLQ, "--store", "/tmp", "db", "status"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "PostgreSQL" in r.stderr


def test_hosts_migrating_at_once_apply_each_migration_once(pg_cluster: Any) -> None:
    from spoolq.store.pg.migrate import migrate

    url = pg_cluster.new_database(migrated=False)
    applied = in_threads([url] * 3, migrate)
    assert sorted(map(len, applied)) == [0, 0, len(migrations())]
    store = open_store(url)
    assert isinstance(store, PgStore) and store.queues() == []
    store.close()


class Generated(io.RawIOBase):
    """``size`` pseudo-random bytes, made as they are read (never all in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left, 1 << 20)
        data = hashlib.sha256(str(self.left).encode()).digest() * (n // 32 + 1)
        buffer[:n] = data[:n]
        self.sha.update(data[:n])
        self.left -= n
        return n


BIG = 64 << 20
RSS_CHILD = f"""
import hashlib, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_store_pg import BIG, Generated
from spoolq.model import AdminState, Message, QueueConfig, State
from spoolq.store.base import AttachmentSource
from spoolq.store.pg import PgStore
from spoolq.store.pg.sql import migrations
s = PgStore(sys.argv[1])
s.create_queue(QueueConfig.from_dict({{"name": "q", "script": "/bin/true"}}))
m = s.create("q", Message(), state=State.PREP).msg_id
s.attach("q", m, AttachmentSource(name="warm-up", stream=Generated(4 << 20)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
src = Generated(BIG)
info = s.attach("q", m, AttachmentSource(name="big.bin", stream=src))
out = hashlib.sha256()
with s.open_attachment("q", m, "big.bin") as f:
    while chunk := f.read(1 << 16):
        out.update(chunk)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, info.size, info.sha256 == src.sha.hexdigest(), out.hexdigest() == info.sha256)
"""


def test_a_64_mib_attachment_streams_in_and_out(pg_url: str) -> None:
    """In a fresh process (so its peak RSS means something): 64 MiB go into the database and
    back with the peak RSS growing by far less than that, and the bytes and hashes agree."""
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, pg_url], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before_kib, after_kib, size, stored_hash_ok, read_hash_ok = r.stdout.split()
    assert (int(size), stored_hash_ok, read_hash_ok) == (BIG, "True", "True")
    grown = (int(after_kib) - int(before_kib)) * 1024
    assert grown < BIG // 4, f"peak RSS grew by {grown >> 20} MiB for a {BIG >> 20} MiB attachment"


def test_a_stream_attachment_keeps_its_bytes_and_hashes(stores: list[PgStore], tmp_path: Path) -> None:
    """Chunk boundaries: a file of 2.5 chunks, read back whole and from odd offsets."""
    s = stores[0]
    make_queue(s)
    data = os.urandom((5 << 20) // 2)
    f = tmp_path / "data.bin"
    f.write_bytes(data)
    m = s.create("q", Message(), attachments=[AttachmentSource(path=str(f))]).msg_id
    info = s.get("q", m).attachments["data.bin"]
    assert (info.size, info.md5) == (len(data), hashlib.md5(data).hexdigest())
    with s.open_attachment("q", m, "data.bin") as fh:
        assert fh.read() == data
        fh.seek((1 << 20) - 3)
        assert fh.read(7) == data[(1 << 20) - 3:(1 << 20) + 4]


def test_the_store_never_shows_its_password(pg_url: str) -> None:
    """``url`` is shown (served, SPOOLQ_ROOT for scripts, errors): the password stays out."""
    from spoolq.store.pg.connection import safe_url

    with_password = pg_url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    s = PgStore(with_password)
    try:
        assert s.url == pg_url and s.queues() == []
    finally:
        s.close()
    assert safe_url("postgresql://u@h/db?sslmode=require&password=s3cret") == "postgresql://u@h/db?sslmode=require"
    assert safe_url("postgresql://u@h/db?sslpassword=keypw&sslmode=verify-full") == "postgresql://u@h/db?sslmode=verify-full"
    assert safe_url("postgresql:///db?host=/run/pg") == "postgresql:///db?host=%2Frun%2Fpg"


def test_counts_are_kept_in_deltas_that_fold(stores: list[PgStore]) -> None:
    """Counts come from delta rows written with each change; counting folds them, and a
    deleted queue takes its deltas along (a new queue of that name starts at zero)."""
    s = stores[0]

    def deltas() -> int:
        return int(s.db.all("SELECT count(*) AS n FROM spoolq.count_deltas WHERE queue = 'q'", {})[0]["n"])

    make_queue(s)
    ids = [m.msg_id for m in s.create_many("q", [Message() for _ in range(300)])]
    for i in ids[:40]:
        s.move("q", i, State.QUE, State.RUN)
    for i in ids[:30]:
        s.move("q", i, State.RUN, State.ERR)
    s.ack_errs("q")
    s.delete("q", ids[-1])
    assert deltas() > 300
    want = {"prep": 0, "que": 259, "run": 10, "done": 0, "relayed": 0, "err": 0, "err_acked": 30}
    assert s.counts("q") == want
    assert deltas() <= 3, "folded: one row per key"
    assert stores[1].counts("q") == want == s.recount("q")
    s.delete_queue("q", force=True)
    assert deltas() == 0
    make_queue(s)
    assert set(s.counts("q").values()) == {0}


def test_the_daemon_feed_carries_only_what_a_daemon_acts_on(stores: list[PgStore]) -> None:
    """The daemons' channel (sql/003_daemon_channel.sql): a batch send wakes a daemon once;
    a claim, a lease renewal and the end of a plain queue's message wake nobody; the end of a
    message in a queue with blocking params wakes the others; a cancel reaches them."""
    a, b = stores[0], stores[1]
    make_queue(a, "plain")
    make_queue(a, "blocky", blocking_params=[1])
    feed = b.watch()

    def take(quiet: float = 0.3) -> list[tuple[str, str | None, str | None]]:
        """What the feed says until it stays quiet for ``quiet`` s (the backstop left out)."""
        got: list[tuple[str, str | None, str | None]] = []
        end = time.monotonic() + quiet
        while time.monotonic() < end:
            for ch in feed._queue.take():  # not changes(): its 5 s backstop would add every queue
                got.append((ch.kind, ch.queue, ch.msg_id))
                end = time.monotonic() + quiet
            time.sleep(0.01)
        return got

    try:
        take()  # LISTENing: the first look, and the queues' creation
        a.create_many("plain", [Message(param1=str(i)) for i in range(100)])
        assert take() == [("work", "plain", None)], "100 messages in one transaction: one wake"
        att = a.claim("plain", owner="h", lease=30)
        assert isinstance(att, Attempt)
        a.heartbeat(att, lease=30, runner="1 2 h")
        a.finish(att, State.DONE, status="ok")
        assert take() == [], "a claim, a renewal, a plain finish: nothing for the other daemons"
        a.create("blocky", Message(param1="k"))
        assert take() == [("work", "blocky", None)]
        att = a.claim("blocky", owner="h", lease=30)
        assert isinstance(att, Attempt)
        assert take() == []
        a.cancel("blocky", att.msg_id)
        assert take() == [("cancel", "blocky", att.msg_id)]
        a.finish(att, State.ERR, status="cancelled")
        assert take() == [("work", "blocky", None)], "its key no longer blocks the queue"
        a.set_admin_state("plain", AdminState.PAUSE)
        assert take() == [("queues", None, None), ("config", "plain", None)]
    finally:
        feed.close()


def test_a_nul_in_params_is_refused_at_the_send(stores: list[PgStore]) -> None:
    """jsonb cannot hold a NUL: a message whose params had one was stored (as text) and
    then failed every jsonb read, its finish (and a coalesced one's) retried for ever
    (audit). It is refused at the send, one or many, and nothing is stored."""
    from spoolq.errors import InvalidMessage

    s = stores[0]
    make_queue(s, coalesce_params=[1])
    for params in ({"note": "x\x00y"}, {"k\x00": 1}, {"deep": [{"a": ["\x00"]}]}):
        with pytest.raises(InvalidMessage, match="NUL"):
            s.create("q", Message.from_dict({"param1": "k", "params": params}))
        with pytest.raises(InvalidMessage, match="NUL"):
            s.create_many("q", [Message.from_dict({"param1": "ok"}), Message.from_dict({"params": params})])
    assert s.counts("q")["que"] == 0
    s.create("q", Message.from_dict({"param1": "k", "params": {"note": "x\\u0000y as text"}}))
    assert s.counts("q")["que"] == 1


def test_preps_of_one_relay_key_on_two_hosts_make_one_message(stores: list[PgStore]) -> None:
    """Two far daemons of one database answering preps of one relay key at the same moment
    made two preps (audit: 39 of 40 keys): the look-up and the prep are one under the
    key's lock, database-wide."""
    import threading

    make_queue(stores[0], "inbox")
    hosts = stores[:2]
    for k in range(10):
        key = f"relay/20261205.1130.00.000.{k}@7.0"
        start = threading.Barrier(len(hosts) * 2)
        made: list[str] = []

        def prep(s: PgStore, key: str = key, start: threading.Barrier = start, made: list[str] = made) -> None:
            start.wait()
            with s.relay_lock("inbox", key):
                found = s.relay_key("inbox", key)
                if found is None:
                    m = s.create("inbox", Message(), state=State.PREP)
                    s.set_relay_key("inbox", key, m.msg_id)
                    found = m.msg_id
            made.append(found)

        threads = [threading.Thread(target=prep, args=(s,)) for s in hosts for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(made) == 4 and len(set(made)) == 1, made
    assert stores[0].counts("inbox")["prep"] == 10


def test_a_status_with_a_nul_is_stored_readable(stores: list[PgStore]) -> None:
    """set_status with a NUL failed with a raw database error (audit): text cannot hold
    one. The NUL is shown as U+FFFD instead."""
    s = stores[0]
    make_queue(s)
    m = s.create("q", Message())
    s.set_status("q", m.msg_id, "half\x00way")
    assert s.get("q", m.msg_id).job_status == "half\ufffdway"
