"""Power cuts on real filesystems: every message acknowledged before the cut survives it.

A filesystem of each kind spoolq supports (ext4 with and without a journal, xfs) is made in
an image file and loop-mounted; real ``spoolq`` processes write to it. At a random moment
right after an "ok" every writer is stopped (SIGSTOP: nothing more is written) and the
image file is copied at once, without any sync: the copy holds exactly what had reached the
device, which is what a disk holds after a power cut. The copy is repaired as a boot would
(e2fsck -fy, or xfs's log replay at mount), mounted, and recovered by starting the daemon on
it (recount, sweep, lost+found, run/). Then every acknowledged message must be there, in a
state it may be in, exactly once, with its fields, and no message may be left in lost+found.

* send scenario: producers send single messages, messages with an attachment, batches
  (``send --from-file``) and two-phase messages (``send --prep`` then ``commit``) to a
  paused queue, and single messages to an ``"fsync": false`` queue, of which only
  consistency is checked (docs/internals.md, "What "fsync": false can lose");
* move scenario: a real ``spoolq serve`` runs a script over the queue while producers send,
  so messages move que -> run -> done all the time (the daemon's unsynced and group-committed
  renames); an acknowledged message may be in any state afterwards, never nowhere.

docs/internals.md ("Durability per filesystem") states what these tests hold up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import loopfs
import pytest
from conftest import SPOOLQ
from daemon_util import Served, wait_for

import spoolq
from spoolq.model import State

COPIES = 3  # power cuts per filesystem and scenario
pytestmark = pytest.mark.slow


@dataclass
class Acks:
    """Messages the producers got an "ok" for: id -> (param1, states it may be found in)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    items: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def add(self, msg_id: str, param1: str, states: frozenset[str]) -> None:
        with self.changed:
            self.items[msg_id] = (param1, states)
            self.changed.notify_all()

    def wait_count(self, n: int, timeout: float = 120) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.items) >= n, timeout), "producers stalled"

    def snapshot(self) -> dict[str, tuple[str, frozenset[str]]]:
        with self.lock:
            return dict(self.items)


class Writers:
    """Every process that writes to the filesystem under test, so that all of them can be
    frozen for a copy. New processes wait while frozen."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.cond = threading.Condition()
        self.procs: set[subprocess.Popen[str]] = set()
        self.frozen = False
        self.stopping = False
        self.pinned: list[int] = []  # long-lived writers (the daemon)
        self.errors: list[str] = []

    def spoolq(self, *args: str, input: str | None = None) -> tuple[int, str]:
        with self.cond:
            self.cond.wait_for(lambda: not self.frozen)
            p = subprocess.Popen([SPOOLQ, "--root", str(self.root), *args], env=self.env, text=True,
                                 stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.procs.add(p)
        try:
            out, err = p.communicate(input, timeout=120)
        finally:
            with self.cond:
                self.procs.discard(p)
        if p.returncode != 0 and not self.stopping:
            self.errors.append(f"spoolq {' '.join(args)} exited {p.returncode}: {err}")
        return p.returncode, out

    def freeze(self) -> None:
        with self.cond:
            self.frozen = True
            pids = [p.pid for p in self.procs] + self.pinned
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        wait_for(lambda: all(loopfs.process_stopped(p) for p in pids), 30, "the writers to stop")

    def thaw(self) -> None:
        with self.cond:
            pids = [p.pid for p in self.procs] + self.pinned
            self.frozen = False
            self.cond.notify_all()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def producers(w: Writers, acks: Acks, stop: threading.Event, attach_src: Path,
              kinds: tuple[str, ...]) -> list[threading.Thread]:
    """One thread per kind of send, each sending until ``stop``, recording every "ok"."""
    que = frozenset({"que", "run", "done"}) if "moving" in kinds else frozenset({"que"})

    def single(tag: str) -> Callable[[int], None]:
        def one(i: int) -> None:
            extra = ("--attach", str(attach_src)) if tag == "attach" else ()
            rc, out = w.spoolq("--json", "send", "q", "--param1", f"{tag}-{i}", *extra)
            if rc == 0:
                acks.add(json.loads(out)["msg_id"], f"{tag}-{i}", que)
        return one

    def batch(i: int) -> None:
        lines = [f"batch-{i}-{k}" for k in range(5)]
        rc, out = w.spoolq("--json", "send", "q", "--from-file", "-", input="\n".join(lines) + "\n")
        if rc == 0:
            for msg_id, p1 in zip(json.loads(out)["msg_ids"], lines, strict=True):
                acks.add(msg_id, p1, que)

    def two_phase(i: int) -> None:
        rc, out = w.spoolq("--json", "send", "q", "--prep", "--param1", f"prep-{i}")
        if rc != 0:
            return
        msg_id = json.loads(out)["msg_id"]
        acks.add(msg_id, f"prep-{i}", que | {"prep"})
        if w.spoolq("commit", f"q/{msg_id}")[0] == 0:
            acks.add(msg_id, f"prep-{i}", que)

    def no_fsync(i: int) -> None:  # an "fsync": false queue: nothing is promised but consistency
        w.spoolq("send", "nf", "--param1", f"nf-{i}")

    bodies: dict[str, Callable[[int], None]] = {
        "single": single("single"), "attach": single("attach"), "batch": batch, "prep": two_phase,
        "moving": single("moving"), "nofsync": no_fsync,
    }

    def loop(body: Callable[[int], None]) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            body(i)

    threads = [threading.Thread(target=loop, args=(bodies[k],), daemon=True) for k in kinds]
    for t in threads:
        t.start()
    return threads


def stored_messages(root: Path) -> dict[str, list[tuple[str, str]]]:
    """id -> [(state, param1)] for every message directory of queue q (acked errors too)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for st in State:
        for p in (root / "queue" / "q" / str(st)).glob("*/*/*/*"):
            if not p.is_dir():
                continue
            try:
                param1 = json.loads((p / "msg").read_bytes()).get("param1", "")
            except (OSError, ValueError) as e:
                param1 = f"<unreadable msg: {e}>"
            found.setdefault(p.name.lstrip("."), []).append((str(st), param1))
    return found


def check_no_fsync_queue(root: Path) -> str:
    """What docs/internals.md promises of an "fsync": false queue after a power cut: its
    last messages may be gone, and one whose ``msg`` had not reached the disk is set aside
    in corrupt/ when read; never half a message shown, never a crash."""
    client = spoolq.open(root)
    shown = aside = 0
    for st in State:
        page = client.list("nf", st, limit=10000)
        assert all(v.message.param1.startswith("nf-") for v in page.items), page.items
        assert all("set aside" in p for p in page.problems), page.problems
        shown += len(page.items)
        aside += len(page.problems)
        assert client.list("nf", st, limit=10000).problems == []  # set aside once, then gone
    return f"no-fsync queue: {shown} listed, {aside} set aside"


def check_copy(kind: loopfs.FsKind, image: Path, work: Path, n: int,
               acked: dict[str, tuple[str, frozenset[str]]], report: list[str]) -> None:
    """Repair, mount and recover the copy ``image``; every message in ``acked`` must be there."""
    fsck_out = loopfs.fsck(kind, image)
    mnt = work / f"copy{n}"
    loopfs.mount(image, mnt, kind.copy_mount_opts)
    try:
        root = mnt / "spool"
        orphans = loopfs.message_dirs_in(mnt / "lost+found")
        daemon = Served(root).start()  # recovery: recount, sweep, lost+found, run/
        assert daemon.stop() == 0, daemon.log()
        found = stored_messages(root)
        problems = []
        for msg_id, (param1, states) in sorted(acked.items()):
            where = found.get(msg_id, [])
            if len(where) != 1 or where[0][0] not in states or where[0][1] != param1:
                problems.append(f"{msg_id} ({param1}): acked, may be in {sorted(states)}, found {where}")
        left = loopfs.message_dirs_in(mnt / "lost+found")
        put_back = daemon.log().count("put back ") + daemon.log().count("set aside in ")
        nf = check_no_fsync_queue(root) if (root / "queue" / "nf").is_dir() else ""
        report.append(f"{kind.name} copy {n}: {len(acked)} acked, {len(orphans)} message dir(s) in "
                      f"lost+found after fsck, {put_back} put back or set aside by recovery, {len(left)} left in "
                      f"lost+found, {len(problems)} missing or misplaced; {nf}")
        assert not problems and not left, (
            f"{kind.name}, copy {n}: {len(problems)} of {len(acked)} acked messages lost or misplaced; "
            f"message dirs left in lost+found: {[str(p) for p in left]}\n" + "\n".join(problems)
            + f"\n--- fsck:\n{fsck_out}\n--- daemon:\n{daemon.log()[-3000:]}")
    finally:
        loopfs.umount(mnt)
        image.unlink()


def power_cuts(kind_name: str, scenario: str, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    report: list[str] = [f"seed {seed}"]
    with loopfs.fresh_mount(kind_name, tmp_path) as fs:
        kind, work, image, mnt = fs.kind, fs.work, fs.image, fs.mnt
        stop = threading.Event()
        env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
        root = mnt / "spool"
        w = Writers(root, env)
        daemon: Served | None = None
        threads: list[threading.Thread] = []
        try:
            script = tmp_path / "ok.sh"  # outside the image: the copies need it too
            script.write_text("#!/bin/sh\nexit 0\n")
            script.chmod(0o755)
            assert w.spoolq("queue", "create", "q", "--script", str(script), "--workers", "2")[0] == 0, w.errors
            if scenario == "send":
                assert w.spoolq("queue", "pause", "q")[0] == 0, w.errors  # recovery must not run them
                assert w.spoolq("queue", "create", "nf", "--script", str(script), "--no-fsync")[0] == 0, w.errors
                assert w.spoolq("queue", "pause", "nf")[0] == 0, w.errors
                attach_src = mnt / "attach.bin"
                attach_src.write_bytes(os.urandom(3000) * 7)
                kinds: tuple[str, ...] = ("single", "attach", "batch", "prep", "nofsync")
            else:
                attach_src = tmp_path / "unused"
                daemon = Served(root).start()
                w.pinned.append(daemon.pid)
                kinds = ("moving", "moving", "batch")
            acks = Acks()
            threads = producers(w, acks, stop, attach_src, kinds)
            target = 0
            for n in range(COPIES):
                target += rng.randint(4, 12)
                acks.wait_count(target)
                w.freeze()
                acked = acks.snapshot()
                copy = work / f"copy{n}.img"
                loopfs.copy_image(image, copy)
                w.thaw()
                check_copy(kind, copy, work, n, acked, report)
            assert not w.errors, w.errors
        finally:
            w.stopping = True
            stop.set()
            w.thaw()
            for t in threads:
                t.join(120)
            if daemon is not None:
                daemon.stop()
    print("\n".join(report))


@pytest.mark.parametrize("kind", ["ext4-nojournal", "ext4-journal", "xfs"])
def test_power_cut_while_sending_keeps_every_acked_message(kind: str, tmp_path: Path) -> None:
    power_cuts(kind, "send", tmp_path, seed=int(time.time() * 1000) % 100000)


@pytest.mark.parametrize("kind", ["ext4-nojournal", "ext4-journal", "xfs"])
def test_power_cut_while_the_daemon_moves_messages_keeps_every_acked_message(kind: str, tmp_path: Path) -> None:
    power_cuts(kind, "move", tmp_path, seed=int(time.time() * 1000) % 100000)


def test_daemon_start_puts_back_what_fsck_moved_to_lost_found(tmp_path: Path) -> None:
    # What e2fsck does with a message directory that lost its name (I10), done by hand on a
    # real filesystem so that the daemon finds the lost+found at its top by itself.
    with loopfs.fresh_mount("ext4-nojournal", tmp_path) as fs:
        root = fs.mnt / "spool"
        w = Writers(root, {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"})
        assert w.spoolq("queue", "create", "q", "--script", "/bin/true")[0] == 0, w.errors
        assert w.spoolq("queue", "pause", "q")[0] == 0, w.errors
        rc, out = w.spoolq("--json", "send", "q", "--param1", "orphan")
        assert rc == 0, w.errors
        msg_id = json.loads(out)["msg_id"]
        (orphan,) = (root / "queue" / "q" / "que").glob(f"*/*/*/{msg_id}")
        os.rename(orphan, fs.mnt / "lost+found" / f"#{msg_id.rsplit('.', 1)[1]}")
        daemon = Served(root).start()
        assert daemon.stop() == 0
        log = daemon.log()
        assert "is on ext4 (no journal)" in log, log
        assert f"put back q/{msg_id} -> que (recovered from lost+found)" in log, log
        assert stored_messages(root) == {msg_id: [("que", "orphan")]}
        assert loopfs.message_dirs_in(fs.mnt / "lost+found") == []
