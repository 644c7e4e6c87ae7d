"""Local files for stores that keep none: the script's directory and the log pump."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from spoolq.model import Message, QueueConfig
from spoolq.store import MemoryStore
from spoolq.store.base import AttachmentSource
from spoolq.store.leases import Attempt, new_attempt_id
from spoolq.store.local import LogPump, Trash, materialize


@pytest.mark.parametrize("where", ["message directory", "job", "attach", "msg.tmp", "attachment part", "queue",
                                   "a directory as msg", "a directory as the attachment", "work"])
def test_materialize_follows_no_link_an_earlier_script_left(tmp_path: Path, where: str) -> None:
    """The local directory is kept across attempts: a script of an earlier one may leave a
    link in the place of anything materialize writes. Nothing is written through it (a
    worker's ``dir`` and a script's cwd never lead out), and the copy is made again."""
    store = MemoryStore()
    store.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true"}))
    m = store.create("q", Message(param1="hello"),
                     attachments=[AttachmentSource(name="a.txt", stream=io.BytesIO(b"A"))])
    a = store.claim("q", owner="me", lease=30)
    assert isinstance(a, Attempt)
    base = tmp_path / "work"
    mdir = base / "q" / m.msg_id
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept").write_text("mine\n")
    if where == "work":
        base.symlink_to(elsewhere)  # <home>/work itself (audit: the copy was built there)
    else:
        base.mkdir()
    if where == "queue":
        (base / "q").symlink_to(elsewhere)
    elif where != "work":
        (base / "q").mkdir()
    if where in ("queue", "work"):
        pass  # the queue's directory, or the base, is the link
    elif where == "message directory":
        mdir.symlink_to(elsewhere)
    elif where.startswith("a directory as"):
        (mdir / ("msg" if where.endswith("msg") else "attach/a.txt") / "inside").mkdir(parents=True)
    else:
        mdir.mkdir()
        name = {"job": "job", "attach": "attach", "msg.tmp": ".msg.tmp", "attachment part": "attach"}[where]
        if where == "attachment part":
            (mdir / "attach").mkdir()
            (mdir / "attach" / ".a.txt.part").symlink_to(elsewhere / "kept")
        else:
            (mdir / name).symlink_to(elsewhere if where != "msg.tmp" else elsewhere / "kept")
    job = materialize(store, a, base)
    assert sorted(os.listdir(elsewhere)) == ["kept"] and (elsewhere / "kept").read_text() == "mine\n"
    for d in (mdir, job, mdir / "attach"):
        assert d.is_dir() and not d.is_symlink(), d
    assert Message.from_dict(json.loads((mdir / "msg").read_bytes())).param1 == "hello"
    assert (mdir / "attach" / "a.txt").read_bytes() == b"A" and not (mdir / "attach" / "a.txt").is_symlink()


def test_materialize_writes_msg_and_streams_attachments(tmp_path: Path) -> None:
    store = MemoryStore()
    store.create_queue(QueueConfig.from_dict({"name": "q", "script": "/bin/true"}))
    big = os.urandom(3 << 20)
    m = store.create("q", Message(param1="hello"), attachments=[
        AttachmentSource(name="big.bin", stream=io.BytesIO(big)),
        AttachmentSource(name="a.txt", stream=io.BytesIO(b"A"))])
    a = store.claim("q", owner="me", lease=30)
    assert isinstance(a, Attempt)
    job = materialize(store, a, tmp_path / "work")
    assert job == tmp_path / "work" / "q" / m.msg_id / "job" and job.is_dir()
    assert Message.from_dict(json.loads((job.parent / "msg").read_bytes())).param1 == "hello"
    assert hashlib.sha256((job.parent / "attach" / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()
    assert (job.parent / "attach" / "a.txt").read_bytes() == b"A"
    (job / "left-by-the-script").write_text("x")
    assert materialize(store, a, tmp_path / "work") == job and (job / "left-by-the-script").exists()
    trash = Trash(tmp_path / "work")
    trash.forget("q", m.msg_id)
    assert not job.parent.exists(), "moved out of the queue's directory at once"
    trash.forget("q", m.msg_id)  # gone already: nothing to do
    trash.close()
    assert os.listdir(tmp_path / "work" / ".trash") == [], "and removed by the trash's thread"


def test_the_trash_empties_what_a_dead_process_left(tmp_path: Path) -> None:
    left = tmp_path / "work" / ".trash" / "123.456.0"
    (left / "job").mkdir(parents=True)
    (left / "job" / "stdio.log").write_text("x")
    (tmp_path / "work" / "q" / "20261203.1147.55.775.1" / "job").mkdir(parents=True)
    trash = Trash(tmp_path / "work")
    trash.forget("q", "20261203.1147.55.775.1")
    trash.close()
    assert os.listdir(tmp_path / "work" / ".trash") == [] and os.listdir(tmp_path / "work" / "q") == []


def test_the_log_pump_carries_output_into_the_store() -> None:
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    pump = LogPump()
    try:
        procs = []
        for name in got:
            w, _ = pump.open(got[name].append, name)
            procs.append(subprocess.Popen(["/bin/sh", "-c", f"for i in 1 2 3; do echo {name}$i; done; "
                                           f"head -c 3000000 /dev/zero"], stdout=w, stderr=w))
            os.close(w)
        for p in procs:
            assert p.wait(10) == 0
        end = time.monotonic() + 10
        while pump.open_pipes and time.monotonic() < end:
            time.sleep(0.01)
        assert pump.open_pipes == 0, "every pipe read to its end and closed"
    finally:
        pump.close()
    for name, chunks in got.items():
        data = b"".join(chunks)
        assert data.startswith(f"{name}1\n{name}2\n{name}3\n".encode()) and len(data) == 9 + 3_000_000


def test_a_store_that_refuses_loses_only_that_part() -> None:
    calls: list[bytes] = []

    def flaky(data: bytes) -> None:
        calls.append(data)
        if len(calls) == 1:
            from spoolq.errors import StorageError
            raise StorageError("database down")

    pump = LogPump()
    try:
        w, drained = pump.open(flaky, "job")
        os.write(w, b"first\n")
        end = time.monotonic() + 5
        while not calls and time.monotonic() < end:
            time.sleep(0.01)
        os.write(w, b"second\n")
        os.close(w)
        assert drained.wait(5), "read to its end once the writer closed it"
    finally:
        pump.close()
    assert calls[0] == b"first\n" and b"".join(calls[1:]) == b"second\n"


def test_attempt_ids_are_unique_in_a_process_and_across_a_fork() -> None:
    """The attempt id is the fence: a random prefix per process and a counter (no getrandom
    per start). A forked child must not repeat its parent's ids."""
    mine = {new_attempt_id("20261204.1400.00.000.1", 0) for _ in range(10_000)}
    assert len(mine) == 10_000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.close(r)
            os.write(w, "\n".join(new_attempt_id("20261204.1400.00.000.1", 0) for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        theirs = set(f.read().decode().split("\n"))
    os.waitpid(pid, 0)
    ours_next = {new_attempt_id("20261204.1400.00.000.1", 0) for _ in range(100)}
    assert len(theirs) == 100
    assert not theirs & (mine | ours_next)
    assert {i.rsplit(".", 1)[1][:8] for i in theirs} != {i.rsplit(".", 1)[1][:8] for i in mine}


def test_the_trash_follows_no_link_left_in_its_place(tmp_path: Path) -> None:
    """``<home>/work/.trash`` replaced by a link (a script can write under ``<home>/work``):
    finished messages' directories are not moved, then removed, where it points."""
    base = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept").write_text("mine\n")
    mdir = base / "q" / "20261205.1100.00.000.1"
    mdir.mkdir(parents=True)
    (base / ".trash").symlink_to(elsewhere)
    Trash(base).forget("q", "20261205.1100.00.000.1")
    assert os.listdir(elsewhere) == ["kept"] and (elsewhere / "kept").read_text() == "mine\n"
    assert (base / ".trash").is_dir() and not (base / ".trash").is_symlink()
    assert not mdir.exists()
