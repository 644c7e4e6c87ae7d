"""Filesystem-store specifics: layout, durability seams, corruption, debris, counts cache."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SPOOLQ, without_hanging

from spoolq import durable
from spoolq.errors import CorruptMessage, DiskFull, InvalidInput, MessageNotFound, QueueNotFound, StorageError
from spoolq.ids import bucket_of
from spoolq.model import AdminState, Message, QueueConfig, State
from spoolq.store import AttachmentSource, FsStore
from spoolq.store.fs.layout import Counts, message_path
from spoolq.store.fs.writing import logged_rename


@pytest.fixture
def fs(tmp_path: Path) -> FsStore:
    s = FsStore(tmp_path / "spool")
    s.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true"}))
    return s


@pytest.fixture(autouse=True)
def no_faults() -> Iterator[None]:
    durable.faults.clear()
    yield
    durable.faults.clear()


def visible_messages(fs: FsStore) -> list[Path]:
    """Every message directory in every state dir, found by walking the tree."""
    out = []
    for st in State:
        base = fs.qroot / "q" / str(st)
        out += [p for p in base.glob("*/*/*/*") if p.is_dir()]
    return out


def test_layout_is_readable_with_ls_and_cat(fs: FsStore) -> None:
    m = fs.create("q", Message.from_dict({"param1": "hi"}))
    day, hm, ss = bucket_of(m.msg_id)
    path = fs.qroot / "q" / "que" / day / hm / ss / m.msg_id
    assert json.loads((path / "msg").read_text())["param1"] == "hi"
    assert (fs.qroot / "q" / "config.json").is_file()
    assert sorted(os.listdir(fs.qroot / "q")) == sorted(
        ["config.json", "counts", ".tmp", "corrupt", "prep", "que", "run", "done", "relayed", "err"])


def test_everything_survives_reopening(fs: FsStore) -> None:
    m = fs.create("q", Message.from_dict({"param1": "x"}))
    fs.set_admin_state("q", AdminState.PAUSE)
    again = FsStore(fs.root)
    assert again.get("q", m.msg_id).message.param1 == "x"
    assert again.admin_state("q") == AdminState.PAUSE
    assert again.counts("q")["que"] == 1


def test_admin_flags_are_plain_files(fs: FsStore) -> None:
    (fs.qroot / "q" / "down").touch()  # RQ's tests touch flag files by hand
    assert fs.admin_state("q") == AdminState.DOWN
    (fs.qroot / "q" / "down").unlink()
    assert fs.admin_state("q") == AdminState.UP


def test_config_edited_by_hand_is_picked_up(fs: FsStore) -> None:
    path = fs.qroot / "q" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["num_workers"] = 9
    path.write_text(json.dumps(cfg))
    os.utime(path, ns=(1, 1))  # a different mtime even within the same clock tick
    assert fs.queue_config("q").num_workers == 9


def test_a_config_replaced_within_one_clock_tick_by_one_of_the_same_size_is_seen(fs: FsStore) -> None:
    """A file's times tick coarsely (a jiffy): a config rewritten right after it was read,
    to one of the same size, has the same mtime, size and (in place, or where the inode is
    reused) inode. The cached config must not hide it."""
    other = FsStore(fs.root)  # another process: the HTTP API, the CLI
    path = fs.qroot / "q" / "config.json"
    for i in range(20):
        workers = 3 if i % 2 else 4
        cfg = other.queue_config("q").to_dict()
        cfg["num_workers"] = workers
        old = os.stat(path)
        if i % 4 < 2:
            other.update_queue(QueueConfig.from_dict(cfg))  # a new file renamed into place
        else:
            path.write_text(json.dumps(cfg, indent=2))  # edited in place: the same inode
        if i % 2:  # within the same clock tick (else whenever the kernel's coarse clock says so)
            os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert fs.queue_config("q").num_workers == workers, i
        fs.queue_config("q")  # read again at once: still the same tick


@pytest.mark.parametrize("moved_before", ["history", "attachments"])
def test_a_message_read_while_it_moves_is_read_again_where_it_landed(fs: FsStore, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      moved_before: str) -> None:
    """A reader (the RQ web tests' GET after a commit) read msg in que, then the daemon moved
    the message on before its history or attachments were read: the view came back without
    its attachments. The read starts again where the message is now."""
    from spoolq.store.fs import reading
    from spoolq.store.fs.layout import message_path

    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 1000)
    m = fs.create("q", Message(), attachments=[AttachmentSource(path=str(src))])
    que, run = message_path(fs.qdir("q"), State.QUE, m.msg_id), message_path(fs.qdir("q"), State.RUN, m.msg_id)
    run.parent.mkdir(parents=True, exist_ok=True)
    moved: list[bool] = []

    def move_once() -> None:
        if not moved:
            moved.append(True)
            os.rename(que, run)  # what the daemon's start does, between two reads

    if moved_before == "history":
        real_read = FsStore._read_msg

        def read_then_move(self: FsStore, *a: Any, **k: Any) -> Message:
            got = real_read(self, *a, **k)
            move_once()
            return got

        monkeypatch.setattr(FsStore, "_read_msg", read_then_move)
    else:
        real_atts = reading._attachments

        def move_then_list(qdir: Path, mdir: Path) -> Any:
            move_once()
            return real_atts(qdir, mdir)

        monkeypatch.setattr(reading, "_attachments", move_then_list)
    view = fs.get("q", m.msg_id)
    assert moved and view.state == State.RUN
    assert list(view.attachments) == ["a.bin"] and view.attachments["a.bin"].size == 1000


def test_attachments_are_copies_unless_a_link_is_asked_for(fs: FsStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(100_000)
    src.write_bytes(data)
    m = fs.create("q", Message(), attachments=[AttachmentSource(path=str(src))])
    stored = Path(fs.get("q", m.msg_id).attachments["big.bin"].path)
    assert stored.stat().st_ino != src.stat().st_ino and src.stat().st_nlink == 1
    with open(src, "r+b") as f:  # the source rewritten in place after the send
        f.write(b"changed")
    assert stored.read_bytes() == data  # the message keeps what was sent
    meta = json.loads((stored.parent / ".big.bin.json").read_bytes())
    assert meta == {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data)}  # and no path: the directory moves from state to state
    linked = fs.create("q", Message(), attachments=[AttachmentSource(path=str(src), link=True)])
    stored = Path(fs.get("q", linked.msg_id).attachments["big.bin"].path)
    assert stored.stat().st_ino == src.stat().st_ino and src.stat().st_nlink == 2


def test_corrupt_msg_is_reported_and_set_aside(fs: FsStore) -> None:
    good = fs.create("q", Message.from_dict({"param1": "good"}))
    bad = fs.create("q", Message.from_dict({"param1": "bad"}))
    bad_dir = fs.message_dir("q", bad.msg_id)
    (bad_dir / "msg").write_text('{"param1": "trunc')
    page = fs.list("q", State.QUE)
    assert [v.msg_id for v in page.items] == [good.msg_id]
    assert len(page.problems) == 1 and bad.msg_id in page.problems[0]
    assert not bad_dir.exists()
    aside = list((fs.qroot / "q" / "corrupt").iterdir())
    assert len(aside) == 1 and (aside[0] / "CORRUPT").read_text().strip()
    assert fs.counts("q")["que"] == 1
    with pytest.raises(MessageNotFound):  # gone from the state tree, kept in corrupt/
        fs.get("q", bad.msg_id)


def test_corrupt_msg_on_get_raises_a_clear_error(fs: FsStore) -> None:
    m = fs.create("q", Message())
    (fs.message_dir("q", m.msg_id) / "msg").write_bytes(b"\x00\xff not json")
    with pytest.raises(CorruptMessage, match="set aside"):
        fs.get("q", m.msg_id)


@pytest.mark.parametrize("op,err,after", [
    ("write", errno.ENOSPC, 0), ("fsync", errno.EIO, 0), ("fsync", errno.EIO, 1), ("rename", errno.EIO, 0),
    ("mkdir", errno.ENOSPC, 0), ("fsync", errno.ENOSPC, 2),
])
def test_injected_disk_faults_leave_nothing_partial(fs: FsStore, tmp_path: Path, op: str, err: int,
                                                    after: int) -> None:
    src = tmp_path / "att.txt"
    src.write_text("attachment")
    before = fs.counts("q")
    durable.faults[op] = [err, after]
    with pytest.raises(StorageError) as info:
        fs.create("q", Message.from_dict({"param1": "x"}),
                  attachments=[AttachmentSource(name="s", stream=io.BytesIO(b"streamed"))])
    durable.faults.clear()
    if err == errno.ENOSPC:
        assert isinstance(info.value, DiskFull) and "disk full" in str(info.value)
    assert visible_messages(fs) == []
    assert os.listdir(fs.qroot / "q" / ".tmp") == []
    assert fs.counts("q") == before
    # and the store works again once the disk does
    fs.create("q", Message())
    assert len(visible_messages(fs)) == 1


def _fsyncs_of_one_send(store: FsStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    store.create("q", Message())
    monkeypatch.setattr(os, "fsync", real)
    return calls


def test_a_send_costs_two_flushes_where_the_fs_keeps_new_names(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The msg file, then the bucket it was renamed into. The stage directory is fsync'd too
    # unless the filesystem makes a new file's name durable with the file (ext4, xfs, btrfs).
    fs = FsStore(tmp_path / "spool", clock=lambda: 1_800_000_000.25)  # one bucket for all
    fs.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true"}))
    fs.create("q", Message())  # makes the bucket directories
    calls = _fsyncs_of_one_send(fs, monkeypatch)
    # Where a rename is not atomic on disk (ext4 without a journal, unknown filesystems) the
    # rename's source directory, .tmp, is fsync'd too, after the bucket.
    source = [".tmp"] if durable.rename_needs_source_sync(fs.root) else []
    if durable.new_names_durable_with_file(fs.root):
        assert calls[0] == "msg" and calls[2:] == source and len(calls) == 2 + len(source), calls
    else:
        assert calls[0] == "msg" and calls[3:] == source and len(calls) == 3 + len(source), calls
    monkeypatch.setenv("SPOOLQ_FSYNC_DIRS", "always")
    assert _fsyncs_of_one_send(fs, monkeypatch)[3:] == [".tmp"]


def test_ext4_without_a_journal_is_told_apart(tmp_path: Path) -> None:
    # This machine's root filesystem is ext4 without a journal (docs/internals.md); the
    # test is for whatever holds tmp_path, read from the kernel the way durable.py does.
    dev = os.stat(tmp_path).st_dev
    desc = durable.fs_description(tmp_path)
    if durable.fs_magic(tmp_path) != durable.EXT4_MAGIC:
        pytest.skip(f"tmp_path is on {desc}, not ext4")
    name = (Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent").read_text()
            .split("DEVNAME=")[1].split()[0])
    journal = Path(f"/sys/fs/ext4/{name}/journal_task").read_text().strip() != "<none>"
    assert desc == ("ext4 (journal)" if journal else "ext4 (no journal)")
    assert durable.rename_needs_source_sync(tmp_path) is not journal


def test_filesystem_kinds_are_told_apart(tmp_path: Path) -> None:
    assert durable.fs_magic("/proc") == 0x9FA0  # procfs: the statfs call itself works
    assert not durable.new_names_durable_with_file("/proc")
    if os.path.isdir("/dev/shm"):
        assert not durable.new_names_durable_with_file("/dev/shm")  # tmpfs: not on the list


@pytest.mark.parametrize("op", ["write", "fsync", "rename", "mkdir"])
def test_injected_faults_in_group_commit_are_all_or_nothing(fs: FsStore, op: str) -> None:
    durable.faults[op] = [errno.EIO, 3]
    with pytest.raises(StorageError):
        fs.create_many("q", [Message() for _ in range(20)])
    durable.faults.clear()
    assert visible_messages(fs) == []
    assert fs.counts("q")["que"] == 0


def test_fault_during_move_keeps_the_message_where_it_was(fs: FsStore) -> None:
    m = fs.create("q", Message())
    durable.faults["rename"] = [errno.EIO, 0]
    with pytest.raises(StorageError):
        fs.move("q", m.msg_id, State.QUE, State.RUN, update=lambda x: setattr(x, "count", 5))
    durable.faults.clear()
    v = fs.get("q", m.msg_id)
    assert v.state == State.QUE
    assert [h["state"] for h in v.message.history] == ["que"]  # no record of a move that failed


@pytest.mark.parametrize("theirs_first", [False, True])
def test_a_failed_move_takes_back_its_history_line_only(fs: FsStore, theirs_first: bool) -> None:
    """Two processes move one message at once: both append a line to its history, one
    rename wins. The loser takes its own line back, and the winner's line stays wherever
    it landed, before or after the loser's."""
    m = fs.create("q", Message())
    mdir = str(message_path(fs.qroot / "q", State.QUE, m.msg_id))
    theirs = b'{"state":"del","at":2,"note":"the other mover"}\n'

    def append_theirs() -> None:
        with open(f"{mdir}/history", "ab") as f:
            f.write(theirs)

    def lose() -> None:
        if not theirs_first:
            append_theirs()  # after our line: the cut must not take it
        raise FileNotFoundError(2, "moved by someone else")

    if theirs_first:
        append_theirs()
    hist = Path(mdir, "history")  # made by the first move: a new message's is in msg
    before = hist.read_bytes() if hist.exists() else b""
    with pytest.raises(FileNotFoundError):
        logged_rename(mdir, b'{"state":"run","at":1,"note":"ours"}\n', lose)
    after = hist.read_bytes()
    assert b"ours" not in after
    assert after == (before if theirs_first else before + theirs)


def test_a_link_as_history_is_replaced_not_written_through(fs: FsStore, tmp_path: Path) -> None:
    """A script left a symbolic link as its message's ``history``: the next move's line goes
    into a new history file, and the file the link named is left as it was."""
    m = fs.create("q", Message())
    mdir = message_path(fs.qroot / "q", State.QUE, m.msg_id)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not spoolq's\n")
    (mdir / "history").symlink_to(outside)
    fs.move("q", m.msg_id, State.QUE, State.RUN)
    assert outside.read_bytes() == b"not spoolq's\n"
    hist = message_path(fs.qroot / "q", State.RUN, m.msg_id) / "history"
    assert not hist.is_symlink()
    assert [h["state"] for h in fs.get("q", m.msg_id).message.history][-1] == "run"


def test_sweep_removes_debris_of_dead_producers(fs: FsStore) -> None:
    tmp = fs.qroot / "q" / ".tmp"
    dead = tmp / "999999999.0.abc"  # no such pid
    dead.mkdir()
    (dead / "msg").write_text("{half")
    os.utime(dead, (0, 0))
    empty = tmp / "999999999.1.abc"  # a 0-byte msg: an "fsync": false send cut by a power loss
    empty.mkdir()
    (empty / "msg").write_bytes(b"")
    os.utime(empty, (0, 0))
    mine = tmp / f"{os.getpid()}.0.live"  # a live producer's stage must survive
    mine.mkdir()
    res = fs.sweep("q")
    assert str(dead) in res.removed and str(empty) in res.removed and res.recovered == []
    assert not dead.exists() and not empty.exists() and mine.exists()
    assert visible_messages(fs) == []


def _stage_by_hand(fs: FsStore, name: str, state: State = State.QUE) -> tuple[Path, str]:
    """A complete staged message, as a producer that died between its fsync and its rename
    (or e2fsck keeping only the .tmp entry after a power cut) leaves it."""
    tmp = fs.qroot / "q" / ".tmp"
    m = fs.create("q", Message.from_dict({"param1": name}), state=state)
    src = fs.message_dir("q", m.msg_id)
    stage = tmp / name
    os.rename(src, stage)
    fs.recount("q")
    os.utime(stage, (0, 0))
    return stage, m.msg_id


def test_sweep_follows_no_link_and_waits_on_no_fifo_it_finds_staged(fs: FsStore, tmp_path: Path) -> None:
    """The sweep (at every daemon start) puts staged messages back: a link left as one's
    history is replaced, not appended through, and a FIFO as another's msg is no message
    (debris, removed) instead of hanging the start (review)."""

    other = tmp_path / "token"
    other.write_bytes(b"secret\n")
    linked, linked_id = _stage_by_hand(fs, "999999999.0.abc")
    (linked / "history").unlink(missing_ok=True)
    (linked / "history").symlink_to(other)
    fifo, _ = _stage_by_hand(fs, "999999999.1.abc")
    (fifo / "msg").unlink()
    os.mkfifo(fifo / "msg")
    for stage in (linked, fifo):
        os.utime(stage, (0, 0))  # old debris, as _stage_by_hand left it
    got = without_hanging(lambda: fs.sweep("q"), fifo / "msg", "the sweep")
    assert not isinstance(got, Exception)
    assert other.read_bytes() == b"secret\n"
    assert fs.get("q", linked_id).message.history[-1]["note"] == "recovered from .tmp"
    assert str(fifo) in got.removed  # no message: debris of a producer that died


def test_sweep_puts_complete_staged_messages_into_their_state(fs: FsStore) -> None:
    stage, msg_id = _stage_by_hand(fs, "999999999.0.abc")
    prep_stage, prep_id = _stage_by_hand(fs, "999999999.1.abc", State.PREP)
    assert visible_messages(fs) == [] and fs.counts("q")["que"] == 0
    # A send_many batch: its subdirectories are the messages.
    batch = fs.qroot / "q" / ".tmp" / "999999999.2.abc"
    batch.mkdir()
    ids = []
    for i, m in enumerate(fs.create_many("q", [Message.from_dict({"param1": f"b{i}"}) for i in range(3)])):
        os.rename(fs.message_dir("q", m.msg_id), batch / str(i))
        ids.append(m.msg_id)
    (batch / "3").mkdir()  # not written yet when the producer died
    os.utime(batch, (0, 0))
    fs.recount("q")
    res = fs.sweep("q")
    assert sorted(res.recovered) == sorted([f"q/{i} -> que (recovered from .tmp)" for i in (msg_id, *ids)]
                                           + [f"q/{prep_id} -> prep (recovered from .tmp)"])
    assert fs.get("q", msg_id).state == State.QUE and fs.get("q", prep_id).state == State.PREP
    assert fs.get("q", msg_id).message.history[-1]["note"] == "recovered from .tmp"
    assert all(fs.get("q", i).message.param1 == f"b{n}" for n, i in enumerate(ids))
    assert list((fs.qroot / "q" / ".tmp").iterdir()) == []
    assert fs.counts("q")["que"] == 4 and fs.counts("q")["prep"] == 1
    # A second directory of a message that is stored already (e2fsck can make one) is not a
    # second message, and is not deleted either: it may share files with the stored one.
    stale = fs.qroot / "q" / ".tmp" / "999999999.3.abc"
    shutil.copytree(fs.message_dir("q", msg_id), stale)
    os.utime(stale, (0, 0))
    res = fs.sweep("q")
    assert res.recovered == [] and len(res.problems) == 1 and "stored already" in res.problems[0]
    assert not stale.exists() and len(visible_messages(fs)) == 5
    (aside,) = (fs.qroot / "q" / "corrupt").iterdir()
    assert aside.name.startswith(f".tmp.{msg_id}.") and "stored already" in (aside / "CORRUPT").read_text()


def test_lost_found_message_directories_go_back_to_their_queue(fs: FsStore, tmp_path: Path) -> None:
    lf = tmp_path / "lost+found"
    lf.mkdir()
    done = fs.create("q", Message.from_dict({"param1": "done"}))
    fs.move("q", done.msg_id, State.QUE, State.RUN)
    fs.move("q", done.msg_id, State.RUN, State.DONE)
    running = fs.create("q", Message.from_dict({"param1": "running"}))
    fs.move("q", running.msg_id, State.QUE, State.RUN)
    old = fs.create("q", Message.from_dict({"param1": "old", "dest": "http://h:1/q/q/"}))
    # e2fsck names what it reconnects after the inode: #<ino>. A bucket can lose its entry too.
    os.rename(fs.message_dir("q", done.msg_id), lf / f"#{done.msg_id.rsplit('.', 1)[1]}")
    os.rename(fs.message_dir("q", running.msg_id), lf / "#2")
    bucket = lf / "#3"
    bucket.mkdir()
    os.rename(fs.message_dir("q", old.msg_id), bucket / old.msg_id)
    msg = json.loads((bucket / old.msg_id / "msg").read_bytes())
    msg["history"][0].pop("queue")  # a message written before the queue was recorded: dest tells
    (bucket / old.msg_id / "msg").write_text(json.dumps(msg))
    other = lf / "#4"  # a message of a queue this root does not have
    other.mkdir()
    (other / "msg").write_text(json.dumps({**msg, "msg_id": "20200101.0000.00.000.9", "dest": "elsewhere",
                                           "history": [{"state": "que", "at": 1, "queue": "elsewhere"}]}))
    (lf / "#5").mkdir()  # not a message: left alone, unreported
    fs.recount("q")
    res = fs.recover_lost_found(lf)
    assert sorted(res.recovered) == sorted([f"q/{done.msg_id} -> done (recovered from lost+found)",
                                            f"q/{running.msg_id} -> que (recovered from lost+found)",
                                            f"q/{old.msg_id} -> que (recovered from lost+found)"])
    assert len(res.problems) == 1 and "not in this root" in res.problems[0]
    assert fs.recover_lost_found(lf).recovered == []  # idempotent
    assert fs.get("q", done.msg_id).state == State.DONE  # the last state its history names
    assert fs.get("q", running.msg_id).state == State.QUE  # run: only the daemon puts messages there
    assert fs.get("q", old.msg_id).state == State.QUE
    assert sorted(p.name for p in lf.iterdir()) == ["#4", "#5"]
    assert fs.counts("q") == fs.recount("q")


def test_same_file_attached_twice_and_partial_attachments(fs: FsStore, tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("one")
    with pytest.raises(InvalidInput, match="two attachments named"):
        fs.create("q", Message(), attachments=[AttachmentSource(path=str(f)), AttachmentSource(path=str(f))])
    m = fs.create("q", Message(), state=State.PREP)
    fs.attach("q", m.msg_id, AttachmentSource(path=str(f), link=True))
    fs.attach("q", m.msg_id, AttachmentSource(path=str(f), link=True))  # same inode again: no .tmp left
    fs.attach("q", m.msg_id, AttachmentSource(path=str(f)))  # and a copy over the link
    adir = fs.message_dir("q", m.msg_id) / "attach"
    (adir / ".big.bin.999999999.tmp").write_bytes(b"half")  # its writer (no such pid) died
    os.utime(adir / ".big.bin.999999999.tmp", (0, 0))  # and more than a second ago
    (adir / f".other.bin.{os.getpid()}.tmp").write_bytes(b"in progress")  # a live writer's
    assert str(adir / ".big.bin.999999999.tmp") in fs.sweep("q").removed
    assert sorted(p.name for p in adir.glob(".*.tmp")) == [f".other.bin.{os.getpid()}.tmp"]
    fs.commit("q", m.msg_id)  # a committed message keeps no partial attachment
    adir = fs.message_dir("q", m.msg_id) / "attach"
    assert sorted(os.listdir(adir)) == [".f.txt.json", "f.txt"]


def test_half_made_queues_are_swept_and_reads_create_nothing(fs: FsStore, tmp_path: Path) -> None:
    dead = fs.qroot / ".new.q2.999999999.abcd"  # its creator (no such pid) died
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    os.utime(dead, (0, 0))
    live = fs.qroot / f".new.q3.{os.getpid()}.abcd"
    live.mkdir()
    assert fs.sweep_root() == [str(dead)] and live.exists() and fs.queues() == ["q"]
    nowhere = FsStore(tmp_path / "typo" / "root")
    assert nowhere.queues() == []
    with pytest.raises(QueueNotFound):
        nowhere.counts("q")
    assert not (tmp_path / "typo").exists(), "a read must not create a spool"


def test_sweep_prunes_empty_buckets_only(fs: FsStore) -> None:
    m = fs.create("q", Message())
    fs.move("q", m.msg_id, State.QUE, State.RUN)
    day, hm, ss = bucket_of(m.msg_id)
    empty = fs.qroot / "q" / "que" / day / hm / ss
    assert empty.is_dir() and not any(empty.iterdir())
    os.utime(empty, (0, 0))
    job = fs.message_dir("q", m.msg_id) / "job"
    job.mkdir()
    fs.sweep("q")
    assert not empty.exists()
    assert job.is_dir()  # nothing inside a message is touched


def test_counts_cache_is_rebuilt_when_missing_or_damaged(fs: FsStore) -> None:
    fs.create_many("q", [Message() for _ in range(5)])
    (fs.qroot / "q" / "counts").unlink()
    assert fs.counts("q")["que"] == 5
    (fs.qroot / "q" / "counts").write_text("garbage")
    assert fs.counts("q")["que"] == 5


def test_a_recount_counts_what_a_listing_lists_and_nothing_else(fs: FsStore) -> None:
    from spoolq.store.fs.layout import iter_entries

    ms = fs.create_many("q", [Message() for _ in range(7)])
    for m in ms[:3]:
        fs.move("q", m.msg_id, State.QUE, State.RUN)
    for m in ms[:2]:
        fs.move("q", m.msg_id, State.RUN, State.ERR)
    fs.ack_errs("q")  # two err entries become ".<id>"
    fs.move("q", ms[2].msg_id, State.RUN, State.ERR)
    bucket = fs.message_dir("q", ms[3].msg_id).parent
    (bucket / "stray-file").write_text("x")
    (bucket / "not-an-id").mkdir()
    (bucket / "20990101.0000.00.000.1").write_text("a file with an id's name")
    (bucket / "20990101.0000.00.000.2").symlink_to(fs.message_dir("q", ms[4].msg_id))
    (bucket / ".20990101.0000.00.000.3").symlink_to(fs.message_dir("q", ms[4].msg_id))
    (fs.qroot / "q" / "que" / "20991231").write_text("a file with a day bucket's name")
    (bucket.parent / "99").write_text("a file with a second bucket's name")
    c = fs.recount("q")
    assert (c["que"], c["run"], c["err"], c["err_acked"]) == (4, 0, 1, 2), c
    for st in State:
        listed = list(iter_entries(fs.qroot / "q", st, newest_first=False))
        assert sum(not a for _, _, a in listed) == c[str(st)]
    assert sum(a for _, _, a in iter_entries(fs.qroot / "q", State.ERR)) == c["err_acked"]


def test_a_torn_counts_file_is_recounted_not_restarted_from_zero(fs: FsStore, tmp_path: Path) -> None:
    # What the audit found after a SIGKILL between pwrite and ftruncate: a shorter record
    # followed by the tail of the longer one. The next update must recount, not start at 0.
    fs.create_many("q", [Message() for _ in range(10)])
    torn = b'{"prep":0,"que":9,"run":0,"done":0,"relayed":0,"err":0,"err_acked":0}}'
    (fs.qroot / "q" / "counts").write_bytes(torn)
    r = subprocess.run([SPOOLQ, "--root", str(fs.root), "send", "q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([SPOOLQ, "--root", str(fs.root), "--json", "stats", "q"], capture_output=True, text=True)
    assert json.loads(r.stdout)["queues"][0]["counts"]["que"] == 11, r.stdout
    assert len((fs.qroot / "q" / "counts").read_bytes()) == Counts.RECORD


HAMMER = """
import sys
from pathlib import Path
from spoolq.store.fs.layout import Counts, message_path
from spoolq.store.fs.writing import logged_rename
c = Counts(Path(sys.argv[1]))
print("ready", flush=True)
while True:  # que between 9 and 10: every other record is one byte shorter than the last
    c.add({"que": 1})
    c.add({"que": -1})
"""


def test_counts_file_parses_whenever_its_writer_is_killed(fs: FsStore) -> None:
    path = fs.qroot / "q" / "counts"
    rng = random.Random()
    for _ in range(20):
        path.write_bytes(b'{"que":9}')
        p = subprocess.Popen([sys.executable, "-c", HAMMER, str(path)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 0.02))  # a random instant in the loop, not a wait for anything
        p.kill()
        p.wait()
        c = Counts(path).read()  # killed between its +1 and its -1, it leaves one more
        assert c is not None and c["que"] in (9, 10), path.read_bytes()


def test_counts_survive_deltas_in_any_order(fs: FsStore) -> None:
    # A producer adds que+1 after its rename; the daemon may move the message on (que-1,
    # run+1) before that. The sums must come out right whatever the order.
    counts = Counts(fs.qroot / "q" / "counts")
    counts.add({"que": -1, "run": 1})
    assert fs.counts("q")["que"] == 0  # shown clamped while the +1 is on its way
    counts.add({"que": 1})
    c = fs.counts("q")
    assert (c["que"], c["run"]) == (0, 1)


def test_a_moved_message_never_shows_in_two_states(fs: FsStore) -> None:
    m = fs.create("q", Message())
    fs.move("q", m.msg_id, State.QUE, State.RUN)
    found = [p for p in visible_messages(fs) if p.name == m.msg_id]
    assert len(found) == 1 and found[0].parts[-5] == "run"


def test_unsynced_queue_still_renames_atomically(tmp_path: Path) -> None:
    s = FsStore(tmp_path / "spool")
    s.create_queue(QueueConfig.from_dict({"name": "fast", "script": "/bin/true", "fsync": False}))
    durable.faults["fsync"] = [errno.EIO, 0]  # would fail if any fsync were attempted
    m = s.create("fast", Message())
    s.create_many("fast", [Message() for _ in range(10)])
    s.move("fast", m.msg_id, State.QUE, State.RUN)
    assert s.counts("fast")["que"] == 10


def test_updating_a_queued_message_kicks_the_daemon(fs: FsStore) -> None:
    """The daemon watches queue directories, not messages: the store itself leaves
    kick/<id> after rewriting a queued message (run-now), and only then (kicks.py)."""
    queued = fs.create("q", Message.from_dict({"due": 9e9})).msg_id
    prepped = fs.create("q", Message(), state=State.PREP).msg_id
    fs.update("q", prepped, lambda m: setattr(m, "param1", "x"))
    assert not (fs.qdir("q") / "kick").exists()

    def front(m: Message) -> None:
        assert not (fs.qdir("q") / "kick" / queued).exists(), "the kick comes after the rewrite"
        m.due = 0.0

    fs.update("q", queued, front)
    assert os.listdir(fs.qdir("q") / "kick") == [queued]
    assert fs.get("q", queued).message.due == 0.0


@pytest.mark.parametrize("many", [False, True])
def test_a_recount_racing_a_send_counts_it_once(fs: FsStore, monkeypatch: pytest.MonkeyPatch, many: bool) -> None:
    """I8: a recount that comes between a send's publishing rename and its delta must not
    count the message twice. The recount is started inside the rename and must wait."""
    real = fs._publish_at
    recounts: list[threading.Thread] = []

    def publish_then_recount(*args: object, **kw: object) -> None:
        real(*args, **kw)  # type: ignore[arg-type]
        if not recounts:  # the message is visible now; its delta is not added yet
            t = threading.Thread(target=fs.recount, args=("q",))
            recounts.append(t)
            t.start()
            t.join(0.3)  # a recount free to run now would count the new message here

    monkeypatch.setattr(fs, "_publish_at", publish_then_recount)
    if many:
        fs.create_many("q", [Message(dest="q") for _ in range(5)])
    else:
        fs.create("q", Message(dest="q"))
    recounts[0].join(10)
    assert fs.counts("q")["que"] == (5 if many else 1) == len(list(fs.find_ids("q", State.QUE).ids))


@pytest.mark.parametrize("what", ["move", "delete_many", "ack_errs"])
def test_a_recount_racing_a_rename_counts_it_once(fs: FsStore, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """I8 for the other renames: a commit, a bulk delete, an acknowledgement. A recount is
    started right after the first rename and must wait for its delta."""
    ids = [m.msg_id for m in fs.create_many("q", [Message(dest="q") for _ in range(4)], state=State.PREP)]
    if what == "ack_errs":
        for i in ids:
            fs.move("q", i, State.PREP, State.QUE)
            fs.move("q", i, State.QUE, State.RUN)
            fs.move("q", i, State.RUN, State.ERR)
    real = os.rename
    recounts: list[threading.Thread] = []

    def rename_then_recount(*args: object, **kw: object) -> None:
        real(*args, **kw)  # type: ignore[arg-type]
        if not recounts:
            t = threading.Thread(target=fs.recount, args=("q",))
            recounts.append(t)
            t.start()
            t.join(0.3)  # a recount free to run now would see this rename without its delta

    monkeypatch.setattr(os, "rename", rename_then_recount)
    if what == "move":
        fs.commit("q", ids[0])
    elif what == "delete_many":
        assert fs.delete_many("q", ids[:2]) == []  # not all: counts clamp at zero
    else:
        assert fs.ack_errs("q") == 4
    monkeypatch.undo()
    recounts[0].join(10)
    truth = fs.counts("q")
    walked = FsStore(fs.root).recount("q")
    assert truth == walked, f"{what}: counts {truth} but the tree holds {walked}"


def test_the_index_sees_a_msg_rewritten_within_one_clock_tick(fs: FsStore,
                                                                 request: pytest.FixtureRequest) -> None:
    """The daemon's index schedules by each message's due time and params as read, and a
    claim checks the file is unchanged (``refresh_entry``) before trusting them. A rewrite
    with the same mtime (two writes within one clock tick; here set by hand) is a new
    inode: the index must read the new file, not keep the old values."""
    m = fs.create("q", Message(param1="old"))
    w = fs.watch()
    request.addfinalizer(w.close)
    w.want("q", True)
    ix = w.indexes["q"]
    deadline = time.monotonic() + 10
    while m.msg_id not in ix.index:
        assert time.monotonic() < deadline, "not indexed"
        w.changes()
    entry = ix.index[m.msg_id]
    assert entry.params[0] == "old"
    path = fs.qroot / "q" / "que" / Path(*bucket_of(m.msg_id)) / m.msg_id / "msg"
    st = os.stat(path)
    data = json.loads(path.read_bytes())
    data["param1"] = "new"
    tmp = path.with_name("msg.new")
    tmp.write_bytes(json.dumps(data).encode())
    os.rename(tmp, path)  # how every rewrite of msg is made (durable.write_replace): a new inode
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == entry.stamp[1]
    assert ix.refresh_entry(entry).params[0] == "new"
    a = fs.claim("q", owner="t", lease=60)
    assert not isinstance(a, (float, type(None)))
    assert a.message.param1 == "new"


def test_a_message_that_moved_away_and_back_while_read_is_not_set_aside(fs: FsStore, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Its msg open failed because the message had moved (que -> run), and it was back
    (run -> que, a requeue) when the reader looked at its directory: a live message, read
    again, never set aside as one without a msg (I7 is for damaged messages)."""
    from spoolq.store.fs import reading
    from spoolq.store.fs.layout import message_path

    m = fs.create("q", Message(param1="alive"))
    que, run = message_path(fs.qdir("q"), State.QUE, m.msg_id), message_path(fs.qdir("q"), State.RUN, m.msg_id)
    run.parent.mkdir(parents=True, exist_ok=True)
    real_read = reading._read_file
    moves: list[bool] = []

    def away_and_back(path: Any) -> bytes:
        if not moves and str(path).startswith(str(que)):
            moves.append(True)
            os.rename(que, run)  # the daemon's start...
            try:
                return real_read(path)  # ...so this open fails
            finally:
                os.rename(run, que)  # ...and a requeue puts it back before the reader looks
        return real_read(path)

    monkeypatch.setattr(reading, "_read_file", away_and_back)
    view = fs.get("q", m.msg_id)
    assert moves and view.state == State.QUE and view.message.param1 == "alive"
    assert not (fs.qdir("q") / "corrupt").exists() or not any((fs.qdir("q") / "corrupt").iterdir())
    # a directory that really has no msg is still set aside, as is one whose msg is a
    # link to nothing
    (que / "msg").unlink()
    with pytest.raises(CorruptMessage):
        fs.get("q", m.msg_id)
    dangling = fs.create("q", Message())
    dpath = message_path(fs.qdir("q"), State.QUE, dangling.msg_id)
    (dpath / "msg").unlink()
    (dpath / "msg").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CorruptMessage):
        fs.get("q", dangling.msg_id)
    assert len(list((fs.qdir("q") / "corrupt").iterdir())) == 2


@pytest.mark.parametrize("left", ["symlink", "hard link", "file"])
def test_write_replace_never_writes_through_what_is_left_at_its_tmp_name(tmp_path: Path, left: str) -> None:
    """``durable.write_replace`` writes a tmp file beside the target, under a name a script
    can foresee (the daemon's pid) in a message directory it can write: a link left there
    must not be followed (the daemon would write, or truncate, the file it points at)."""
    target = tmp_path / "status"
    other = tmp_path / "token"
    other.write_bytes(b"secret\n")
    tmp = tmp_path / f".status.{os.getpid()}.{threading.get_native_id()}.tmp"
    if left == "symlink":
        tmp.symlink_to(other)
    elif left == "hard link":
        os.link(other, tmp)
    else:
        tmp.write_bytes(b"a crash's leftover\n")
    durable.write_replace(target, b'{"job_status": "done"}', sync=False)
    assert target.read_bytes() == b'{"job_status": "done"}' and not target.is_symlink()
    assert other.read_bytes() == b"secret\n" and not tmp.exists()


def test_write_replace_from_many_threads_at_once(tmp_path: Path) -> None:
    """The HTTP server's threads rewrite one file at once (the relay keys of concurrent
    preps): each rewrite succeeds and leaves one whole version (the audit's 500s came from
    threads sharing a tmp name)."""
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "keys.json"
    start = threading.Barrier(8)

    def rewrite(i: int) -> None:
        start.wait()
        for j in range(50):
            durable.write_replace(target, f"{i}.{j}\n".encode() * 100, sync=False)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(rewrite, range(8)))  # re-raises any thread's failure
    lines = set(target.read_bytes().splitlines())
    assert len(lines) == 1 and lines.pop().endswith(b".49")
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]


@pytest.mark.parametrize("times", [1, 99])
def test_open_own_when_the_link_keeps_coming_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  times: int) -> None:
    """A process of the script puts its link back right after each unlink: open_own looks
    again (a few times), and then says what happens instead of an EEXIST the caller took
    for "the id exists there already" (review)."""
    other = tmp_path / "token"
    other.write_bytes(b"secret\n")
    name = tmp_path / "history"
    name.symlink_to(other)
    real_unlink = durable._unlink_if_there
    put_back = [times]

    def unlink_then_put_back(n: str, dir_fd: int | None) -> None:
        real_unlink(n, dir_fd)
        if put_back[0]:
            put_back[0] -= 1
            os.symlink(other, n)

    monkeypatch.setattr(durable, "_unlink_if_there", unlink_then_put_back)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
    if times > 3:
        with pytest.raises(OSError) as e:
            durable.open_own(str(name), flags)
        assert e.value.errno == errno.EBUSY and not isinstance(e.value, FileExistsError)
    else:
        fd = durable.open_own(str(name), flags)
        os.write(fd, b"mine\n")
        os.close(fd)
        assert not name.is_symlink() and name.read_bytes() == b"mine\n"
    assert other.read_bytes() == b"secret\n"
