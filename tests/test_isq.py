"""isq's spool files (seed 000; spec B.3 checks 1-6 and 8; docs/isq.md): ``spoolq isq put``,
``spoolq isq get``, and a real daemon with ``--isq-spool`` taking the lines. isq's own
producer runs too: ``isq-produce.sh`` as spec B.1 gives it, with lockfile-progs' real
``lockfile-create``. B.3 #7 (TCP) is tests/test_intake.py."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SPOOLQ
from daemon_util import Served, daemons, wait_for

import spoolq
from spoolq import inotify as ino
from spoolq import isq
from spoolq.model import State

ISQ_PRODUCE = """#!/bin/bash
# isq-produce.sh (grahamking/isqueue beb7f5b, spec B.1) with isq-lockutil.sh inlined; SPOOL
# replaces /var/spool/isqueue.
QUEUE=$SPOOL/$1.queue
acquire_lock() {
    until lockfile-create --use-pid --quiet --retry 0 $QUEUE; do sleep 0.05; done
}
release_lock() {
    lockfile-remove $QUEUE
}
acquire_lock
echo $2 >> $QUEUE
release_lock
"""


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    s = tmp_path / "isqueue"
    s.mkdir()
    return s


@pytest.fixture
def daemon(root: Path, spool: Path) -> Iterator[Callable[..., Served]]:
    yield from daemons(root, "--isq-spool", str(spool), "--no-builtin-queues", "--grace", "1")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def params(client: spoolq.Client, queue: str, *states: State) -> list[str]:
    out = []
    for st in states or tuple(State):
        out += [v.message.param1 for v in client.list(queue, st, limit=10000).items]
    return out


def recorder(tmp_path: Path, name: str = "rec") -> tuple[Path, Path]:
    """A CMD that appends each of its arguments as one line (args joined by '|') to a file."""
    out = tmp_path / f"{name}.out"
    prog = tmp_path / f"{name}.sh"
    prog.write_text(f'#!/bin/sh\nIFS="|"; echo "$*" >> {out}\n')
    prog.chmod(0o755)
    return prog, out


# -- B.3 #1: put --------------------------------------------------------------------------------

def test_put_appends_one_whole_line_and_creates_the_file(cli: Any, spool: Path) -> None:
    r = cli("isq", "put", "--spool", str(spool), "mail", "alice  two  spaces")
    assert r.returncode == 0, r.stderr
    assert (spool / "mail.queue").read_bytes() == b"alice  two  spaces\n"
    assert not (spool / "mail.queue.lock").exists()


def test_concurrent_puts_give_whole_lines(cli: Any, spool: Path) -> None:
    words = [f"message-{i}-" + "x" * 5000 for i in range(5)]
    threads = [threading.Thread(target=cli, args=("isq", "put", "--spool", str(spool), "q", w)) for w in words]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(lines(spool / "q.queue")) == sorted(words)


def test_put_waits_for_isqs_lock_and_refuses_bad_lines(cli: Any, spool: Path) -> None:
    if shutil.which("lockfile-create") is None:
        pytest.skip("lockfile-progs is not installed (scripts/bootstrap.sh test installs it)")
    # lockfile-progs' own lock, held by a live shell (--use-pid writes the shell's pid).
    holder = subprocess.Popen(["sh", "-c", f"lockfile-create --use-pid --retry 0 {spool}/q.queue && echo held "
                                           f"&& read x; lockfile-remove {spool}/q.queue"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == "held\n"
    put = subprocess.Popen([SPOOLQ, "isq", "put", "--spool", str(spool), "q", "m"])
    with pytest.raises(subprocess.TimeoutExpired):
        put.wait(0.5)  # waiting for the lock, not written
    assert not (spool / "q.queue").exists()
    holder.stdin.write("\n")
    holder.stdin.close()
    holder.wait(10)
    assert put.wait(10) == 0
    assert lines(spool / "q.queue") == ["m"]
    r = cli("isq", "put", "--spool", str(spool), "q", "two\nlines")
    assert r.returncode != 0 and "one line" in r.stderr
    r = cli("isq", "put", "--spool", str(spool), "../etc", "m")
    assert r.returncode != 0 and "invalid queue name" in r.stderr


def test_a_stale_lock_of_a_dead_process_is_taken(cli: Any, spool: Path) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    (spool / "q.queue.lock").write_text(f"{p.pid}\n")
    assert cli("isq", "put", "--spool", str(spool), "q", "m", timeout=20).returncode == 0
    assert lines(spool / "q.queue") == ["m"]


# -- B.3 #2-#6, #8: the daemon takes the lines ---------------------------------------------------------

def test_get_runs_cmd_with_the_line_as_last_argument_in_fifo_order(cli: Any, client: spoolq.Client, spool: Path,
                                                                   daemon: Any, tmp_path: Path) -> None:
    prog, out = recorder(tmp_path)
    r = cli("isq", "get", "q", f"{prog} --flag 'an arg'", "1")  # B.3 #4: CMD split, the line last
    assert r.returncode == 0, r.stderr
    cfg = client.queue_config("q")
    assert (cfg.args, cfg.message_arg, cfg.num_workers) == (["--flag", "an arg"], True, 1)
    daemon()
    msgs = [f"line {i}  with  spaces" for i in range(30)]
    with open(spool / "q.queue", "a") as f:  # B.3 #6: a plain append wakes the daemon
        f.write("".join(m + "\n" for m in msgs))
    wait_for(lambda: len(lines(out)) == 30 and (spool / "q.queue").read_bytes() == b"", 60, "every line to run")
    assert lines(out) == [f"--flag|an arg|{m}" for m in msgs]  # FIFO, the line one argument
    assert (spool / "q.queue").read_bytes() == b""  # B.3 #2: until the file is empty
    wait_for(lambda: client.counts("q")["done"] == 30, 30, "the daemon to record the last")
    v = client.list("q", State.DONE, limit=1).items[0]
    assert v.message.src == "isq"


def test_a_failing_cmd_leaves_its_message_in_err_not_lost(cli: Any, client: spoolq.Client, spool: Path,
                                                          daemon: Any) -> None:
    """B.3 #2/#3 differ on purpose: isq ignored the status and lost the message (at most once);
    here the line leaves the file as before, and a failure keeps its message in err."""
    assert cli("isq", "get", "q", "/bin/false").returncode == 0
    assert client.queue_config("q").num_workers == 2  # B.3 #5: isq's default of two consumers
    client.update_queue("q", max_count=1)
    daemon()
    assert cli("isq", "put", "--spool", str(spool), "q", "doomed").returncode == 0
    wait_for(lambda: client.counts("q")["err"] == 1 and lines(spool / "q.queue") == [], 30, "the message to fail")
    assert params(client, "q", State.ERR) == ["doomed"]
    assert lines(spool / "q.queue") == []


def test_at_most_n_run_and_the_file_keeps_what_waits(cli: Any, client: spoolq.Client, spool: Path, daemon: Any,
                                                     tmp_path: Path) -> None:
    """B.3 #5 (no more than N at once) and #8 (depth = wc -l): lines are taken only as the
    queue has room (spoolq.daemon.isqspool.window: 16 for N = 2)."""
    gate = tmp_path / "gate"
    prog = tmp_path / "held.sh"
    prog.write_text(f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n")  # every run waits for the gate
    prog.chmod(0o755)
    assert cli("isq", "get", "q", str(prog), "2").returncode == 0
    daemon()
    (spool / "q.queue").write_text("".join(f"m{i}\n" for i in range(100)))
    wait_for(lambda: client.counts("q")["run"] == 2, 30, "two runs")
    # What waits beyond the window stays in the file: wc -l.
    wait_for(lambda: client.counts("q")["que"] == 16 and len(lines(spool / "q.queue")) == 100 - 2 - 16, 30,
             "the window to fill")
    assert client.counts("q")["run"] == 2
    gate.touch()
    wait_for(lambda: client.counts("q")["done"] == 100, 60, "every line to run")
    wait_for(lambda: (spool / "q.queue").read_bytes() == b"", 10, "the last cut")
    assert (spool / "q.queue").read_bytes() == b""
    assert sorted(params(client, "q", State.DONE)) == sorted(f"m{i}" for i in range(100))


def test_isqs_own_producer_and_a_torn_line(client: spoolq.Client, spool: Path, daemon: Any,
                                           tmp_path: Path) -> None:
    if shutil.which("lockfile-create") is None:
        pytest.skip("lockfile-progs is not installed (scripts/bootstrap.sh test installs it)")
    produce = tmp_path / "isq-produce.sh"
    produce.write_text(ISQ_PRODUCE)
    produce.chmod(0o755)
    client.create_queue("server_type", script="/bin/true", num_workers=2)
    client.set_admin_state("server_type", "pause")
    daemon()
    env = {**os.environ, "SPOOL": str(spool)}
    procs = [subprocess.Popen([str(produce), "server_type", f"host{i}.example.com"], env=env) for i in range(8)]
    assert all(p.wait(30) == 0 for p in procs)
    wait_for(lambda: client.counts("server_type")["que"] == 8 and (spool / "server_type.queue").read_bytes() == b"",
             30, "isq's lines")
    assert sorted(params(client, "server_type", State.QUE)) == sorted(f"host{i}.example.com" for i in range(8))
    with open(spool / "server_type.queue", "ab") as f:
        f.write(b"half a li")  # a torn last line waits for its newline
        f.flush()
        with open(spool / "server_type.queue", "a") as g:
            g.write("")  # another event: nothing complete to take
        wait_for(lambda: not (spool / "server_type.queue.lock").exists(), 10, "the lock to be free")
        assert client.counts("server_type")["que"] == 8
        f.write(b"ne\n")
    wait_for(lambda: client.counts("server_type")["que"] == 9, 30, "the completed line")
    assert "half a line" in params(client, "server_type", State.QUE)


def test_a_line_that_cannot_be_a_message_is_moved_aside(client: spoolq.Client, root: Path, spool: Path,
                                                        daemon: Any) -> None:
    client.create_queue("q", script="/bin/true")
    client.set_admin_state("q", "pause")
    daemon()
    (spool / "q.queue").write_bytes(b"good\n\xff\xfe not utf-8\nalso good\n")
    wait_for(lambda: client.counts("q")["que"] == 2 and (spool / "q.queue").read_bytes() == b"", 30,
             "the good lines")
    assert (root / "isq" / "q.rejected").read_bytes() == b"\xff\xfe not utf-8\n"
    assert (spool / "q.queue").read_bytes() == b""


def test_lines_wait_for_their_queue_and_links_are_not_followed(cli: Any, client: spoolq.Client, spool: Path,
                                                               daemon: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("password1\n")
    (spool / "stolen.queue").symlink_to(secret)
    client.create_queue("stolen", script="/bin/true")
    client.set_admin_state("stolen", "pause")
    (spool / "later.queue").write_text("waits\n")
    s = daemon()
    wait_for(lambda: "no queue later" in s.log(), 30, "the warning")
    assert (spool / "later.queue").read_text() == "waits\n"
    client.create_queue("later", script="/bin/true")  # its creation event: the line is taken
    client.set_admin_state("later", "pause")
    wait_for(lambda: client.counts("later")["que"] == 1, 30, "the waiting line")
    assert "is a symbolic link" in s.log()
    assert client.counts("stolen")["que"] == 0 and secret.read_text() == "password1\n"


@pytest.mark.slow
def test_daemon_kills_while_taking_lose_and_double_nothing(cli: Any, client: spoolq.Client, root: Path,
                                                          spool: Path) -> None:
    """The journal (docs/isq.md): SIGKILL the daemon at random moments while writers append;
    in the end every line is exactly one message that ran, and the file is empty."""
    n = int(os.environ.get("SPOOLQ_ISQ_CHAOS_N", "600"))
    client.create_queue("q", script="/bin/true", num_workers=4)
    rng = random.Random(int(os.environ.get("SPOOLQ_ISQ_CHAOS_SEED", "7")))
    served: list[Served] = []

    def start() -> Served:
        s = Served(root, "--isq-spool", str(spool), "--no-builtin-queues", "--grace", "1").start()
        served.append(s)
        return s

    s = start()
    sent = 0
    while sent < n:
        batch = min(n - sent, rng.randint(1, 80))
        for i in range(sent, sent + batch):
            if i % 50 == 0:  # now and then the real command, else its function (faster)
                assert cli("isq", "put", "--spool", str(spool), "q", f"line-{i}").returncode == 0
            else:
                isq.put(spool, "q", f"line-{i}")
        sent += batch
        if rng.random() < 0.5:
            if rng.random() < 0.5:
                # Into the window that matters: the journal is written, the cut not yet made.
                (root / "isq").mkdir(exist_ok=True)
                with ino.Inotify() as w:
                    w.add(root / "isq", ino.IN_MOVED_TO)
                    isq.put(spool, "q", f"line-{sent}")
                    sent += 1
                    w.wait(5)
            os.kill(s.pid, signal.SIGKILL)
            s.proc.wait(10)  # type: ignore[union-attr]
            s = start()
    wait_for(lambda: client.counts("q")["done"] >= sent and client.counts("q")["que"] == 0, 300, "every line to run")
    s.stop()
    interrupted = sum(log.count("a crash interrupted") for log in [served[0].log()])
    print(f"{len(served) - 1} kills, {interrupted} of them between a journal and its cut")
    done = params(client, "q", State.DONE)
    assert sorted(done) == sorted(f"line-{i}" for i in range(sent)), "a line lost or run twice"
    assert (spool / "q.queue").read_bytes() == b""
    assert not list((root / "isq").glob("*.json")), "a journal left behind"


def test_a_take_cut_short_by_a_crash_is_finished_at_start(client: spoolq.Client, root: Path, spool: Path,
                                                          daemon: Any) -> None:
    """What a crash between the journal and the cut leaves (docs/isq.md): preps, the journal,
    the lines still in the file. The next start commits the preps and cuts the lines, once."""
    import hashlib
    import json

    from spoolq.model import Message

    client.create_queue("q", script="/bin/true")
    client.set_admin_state("q", "pause")
    client.create_queue("r", script="/bin/true")
    client.set_admin_state("r", "pause")
    path = spool / "q.queue"
    path.write_bytes(b"one\ntwo\nthree\n")
    taken = len(b"one\ntwo\n")
    preps = client.store.create_many("q", [Message.from_dict({"param1": p, "src": "isq"}) for p in ("one", "two")],
                                     state=State.PREP)
    st = path.stat()
    (root / "isq").mkdir()
    (root / "isq" / "q.json").write_text(json.dumps({
        "dev": st.st_dev, "inode": st.st_ino, "length": taken,
        "sha256": hashlib.sha256(path.read_bytes()[:taken]).hexdigest(), "ids": [m.msg_id for m in preps]}))
    # And one whose cut was made (the file is another inode now): only its commit is left.
    (spool / "r.queue").write_bytes(b"")
    rprep = client.store.create_many("r", [Message.from_dict({"param1": "gone"})], state=State.PREP)
    (root / "isq" / "r.json").write_text(json.dumps({
        "dev": st.st_dev, "inode": st.st_ino + 1000000, "length": 5, "sha256": "0" * 64,
        "ids": [rprep[0].msg_id]}))
    s = daemon()
    wait_for(lambda: client.counts("q")["que"] == 3 and path.read_bytes() == b"", 30, "the three lines")
    assert sorted(params(client, "q", State.QUE)) == ["one", "three", "two"]
    assert client.counts("q")["prep"] == 0
    wait_for(lambda: params(client, "r", State.QUE) == ["gone"], 30, "r's journal to be finished")
    assert path.read_bytes() == b""
    wait_for(lambda: not list((root / "isq").glob("*.json")), 10, "the last take's journal to go")
    assert "a crash interrupted" in s.log()


class LockTakes:
    """Counts the creations of a spool's lock files (inotify from outside): each is one take."""

    def __init__(self, spool: Path) -> None:
        from spoolq import inotify as ino

        self.ino = ino.Inotify()
        self.ino.add(spool, ino.IN_CREATE | ino.IN_MOVED_TO)

    def count(self) -> int:
        return sum(1 for e in self.ino.read() if e.name.endswith(".queue.lock"))


def test_an_idle_spool_is_left_alone(client: spoolq.Client, spool: Path, daemon: Any) -> None:
    """The daemon's own lock and cut are inotify events too: they must not start another take
    (a loop of takes, the CPU at 100 %, found by an audit)."""
    client.create_queue("q", script="/bin/true")
    client.set_admin_state("q", "pause")
    s = daemon()
    takes = LockTakes(spool)
    try:
        (spool / "q.queue").write_text("a\nb\n")
        wait_for(lambda: client.counts("q")["que"] == 2 and (spool / "q.queue").read_bytes() == b"", 30, "the lines")
        settle_start = s.cpu_ticks()
        client.create_queue("probe", script="/bin/true")
        assert client.wait(client.send("probe"), 30).state == State.DONE  # the daemon went round its loop
        first = takes.count()
        assert first <= 3, f"{first} takes of two lines"
        client.create_queue("probe2", script="/bin/true")
        assert client.wait(client.send("probe2"), 30).state == State.DONE
        assert takes.count() == 0, "takes with nothing new in the file"
        assert s.cpu_ticks() - settle_start < 100  # not a spinning thread (100 ticks = 1 s of CPU)
    finally:
        takes.ino.close()


def test_fifos_planted_in_the_spool_block_nothing(cli: Any, client: spoolq.Client, spool: Path,
                                                  daemon: Any) -> None:
    os.mkfifo(spool / "trap.queue")
    os.mkfifo(spool / "other.queue.lock")
    client.create_queue("trap", script="/bin/true")
    client.create_queue("q", script="/bin/true")
    client.set_admin_state("q", "pause")
    s = daemon()
    (spool / "q.queue").write_text("fine\n")
    wait_for(lambda: client.counts("q")["que"] == 1, 30, "the other queue's line")
    assert "not a regular file" in s.log()
    r = cli("isq", "put", "--spool", str(spool), "other", "m", timeout=30)  # a FIFO lock is no lock
    assert r.returncode == 0, r.stderr
    r = cli("isq", "put", "--spool", str(spool), "trap", "m", timeout=30)
    assert r.returncode != 0 and "not a regular file" in r.stderr


def test_a_cut_that_fails_takes_nothing_twice(client: spoolq.Client, root: Path, spool: Path, daemon: Any) -> None:
    """An append-only file (chattr +a) cannot be replaced, even by root: the lines taken stay
    taken once, nothing more is taken while the journal waits, and all goes on once it can."""
    client.create_queue("q", script="/bin/true")
    client.set_admin_state("q", "pause")
    path = spool / "q.queue"
    path.write_text("one\ntwo\n")
    if subprocess.run(["chattr", "+a", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +a does not work here (scripts/bootstrap.sh test installs e2fsprogs; ext4 needed)")
    try:
        s = daemon()
        wait_for(lambda: client.counts("q")["que"] == 2, 30, "the two lines")
        wait_for(lambda: "Operation not permitted" in s.log(), 30, "the failed cut")
        with open(path, "a") as f:
            f.write("three\n")  # an event: a take that must finish the journal first, and cannot
        client.create_queue("probe", script="/bin/true")
        assert client.wait(client.send("probe"), 30).state == State.DONE
        assert client.counts("q")["que"] == 2 and client.counts("q")["prep"] == 0
    finally:
        subprocess.run(["chattr", "-a", str(path)], check=True)
    with open(path, "a") as f:
        f.write("four\n")
    wait_for(lambda: client.counts("q")["que"] == 4 and path.read_bytes() == b"", 30, "the rest")
    assert sorted(params(client, "q", State.QUE)) == ["four", "one", "three", "two"]


def _take_at_once(lock: str, barrier: Any, got: Any, done: Any) -> None:
    barrier.wait()
    got.put(isq.try_lock(Path(lock)))
    done.wait()  # alive, so a lock taken is held (not stale) until every try is over


def test_breakers_of_a_stale_lock_never_both_hold_it(tmp_path: Path) -> None:
    """Three processes find a dead holder's lock at once: each judged it stale, removed it
    and linked its own, and one could remove what another had just taken, so two held it
    (audit: 25 of 300 rounds). Exactly one takes it now."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "q.queue.lock"
    doubled = 0
    for _ in range(60):
        lock.write_text(f"{dead.pid}\n")  # the dead holder's
        barrier, got, done = ctx.Barrier(3), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_take_at_once, args=(str(lock), barrier, got, done)) for _ in range(3)]
        for p in procs:
            p.start()
        taken = [got.get(timeout=30) for _ in procs]
        done.set()
        for p in procs:
            p.join(30)
        doubled += taken.count(True) > 1
        assert taken.count(True) >= 1
        lock.unlink()
    assert doubled == 0
