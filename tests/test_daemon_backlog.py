"""A backlog costs the daemon nothing while it waits: a PAUSEd queue's messages are never
read (they are indexed when it is resumed), there is no periodic re-read of any queue,
``run-now`` reads one message instead of rescanning the queue, and staging debris is swept
periodically off the dispatch thread. What is asserted is what the daemon reads (seen with
inotify from outside), not how long anything takes: speed is the benchmark's
(``./bench/run backlog``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import clock_ago, fs
from daemon_util import script, serve_fixture, wait_for

import spoolq
from spoolq.model import MessageFields, State
from spoolq.store import FsStore
from spoolq.store.fs import inotify as watch

IN_OPEN = 0x20
BACKLOG = 2000


@pytest.fixture
def serve(root: Path) -> Iterator[Any]:
    yield from serve_fixture(root)


def settle(client: spoolq.Client) -> None:
    """The daemon has handled everything so far: a probe message on another queue ran."""
    if "probe" not in client.queues():
        client.create_queue("probe", script=script("rq_script.sh"))
    assert client.wait(client.send("probe", param1="done"), 30).state == State.DONE


class Opens:
    """Who opens what under a queue's ``que/``: inotify IN_OPEN on every bucket directory
    (a listing opens it) and on every message directory (reading ``msg`` opens it)."""

    def __init__(self, qdir: Path) -> None:
        self.ino = watch.Inotify()
        self.buckets: dict[int, Path] = {}
        self.messages: dict[int, Path] = {}
        for bucket in (qdir / "que").glob("*/*/*"):
            self.buckets[self.ino.add(bucket, IN_OPEN)] = bucket
            for m in bucket.iterdir():
                self.messages[self.ino.add(m, IN_OPEN)] = m
        self.ino.read()  # our own listing above

    def read(self) -> tuple[set[Path], set[Path]]:
        """(buckets listed, messages whose msg was opened) since the last call."""
        listed, opened = set(), set()
        for ev in self.ino.read():
            if ev.wd in self.buckets and ev.name == "":
                listed.add(self.buckets[ev.wd])
            elif ev.wd in self.messages and ev.name == "msg":
                opened.add(self.messages[ev.wd])
        return listed, opened

    def close(self) -> None:
        self.ino.close()


def test_a_paused_backlog_is_never_read_and_runs_once_resumed(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("big", script="/bin/true", num_workers=2)
    client.set_admin_state("big", "pause")
    client.send_many("big", [{"param1": str(i)} for i in range(BACKLOG)])
    opens = Opens(fs(client).qdir("big"))
    try:
        s = serve()
        settle(client)
        os.kill(s.pid, signal.SIGHUP)  # re-reads configs and walks queues: not a paused one
        settle(client)
        _, opened = opens.read()
        assert not opened, f"the daemon read {len(opened)} messages of a paused queue"
    finally:
        opens.close()
    client.set_admin_state("big", "up")
    wait_for(lambda: client.counts("big")["done"] == BACKLOG, 120, "the resumed backlog to run")
    assert client.counts("big")["que"] == 0


def test_run_now_reads_one_message_not_the_queue(client: spoolq.Client, root: Path, serve: Any) -> None:
    client.create_queue("q", script="/bin/true")
    # Four buckets (one per second of creation), all due in an hour.
    later = []
    for age in (6, 4, 2, 0):
        past = spoolq.Client(FsStore(root, clock=clock_ago(age)))
        later += past.send_many("q", [{"param1": str(i), "delay": 3600} for i in range(BACKLOG // 4)])
    s = serve()
    wait_for(lambda: "queue q: indexed que/" in s.log(), 60, "the queue to be indexed")
    wait_for(lambda: "queue q: sweep done" in s.log(), 60, "start-up housekeeping")
    target = later[-1]
    target_dir = fs(client).message_dir("q", target.msg_id)
    opens = Opens(fs(client).qdir("q"))
    try:
        client.run_now(target)  # itself reads and rewrites the target in its bucket
        assert client.wait(target, 30).state == State.DONE
        listed, opened = opens.read()
        # The kick names one message: the daemon lists no other bucket, reads no other msg.
        assert listed <= {target_dir.parent}, f"{len(listed)} buckets listed"
        assert opened <= {target_dir}, f"{len(opened)} messages read"
    finally:
        opens.close()
    # The daemon adds its counts deltas a few ms after its moves (COUNTS_LINGER).
    wait_for(lambda: client.counts("q")["que"] == BACKLOG - 1, 10, "the counts")


def test_an_older_versions_kick_file_is_harmless(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("q", script=script("rq_script.sh"))
    (fs(client).qdir("q") / "kick").touch()  # what run-now touched before kick/ existed
    serve()
    later = client.send("q", param1="done", delay=3600)
    settle(client)
    assert client.get(later).state == State.QUE
    client.run_now(later)  # replaces the old file by the kick/ directory
    assert client.wait(later, 30).state == State.DONE
    assert (fs(client).qdir("q") / "kick").is_dir()


def test_debris_is_swept_while_the_daemon_runs(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("q", script=script("rq_script.sh"))
    serve("--sweep", "1")
    p = subprocess.Popen(["true"])  # a process that has exited: debris named by its pid is dead's
    p.wait()
    debris = fs(client).qdir("q") / ".tmp" / f"{p.pid}.0.abcdef"
    debris.mkdir()
    (debris / "msg").write_text("{}")
    old = time.time() - 10
    os.utime(debris, (old, old))  # older than sweep's one-second grace for dead owners
    wait_for(lambda: not debris.exists(), 30, "the periodic sweep")
    settle(client)


CAP = 100  # SPOOLQ_INDEX_CAP for the daemons below: a backlog of hundreds is "over the cap"


def sent_in_buckets(root: Path, queue: str, ages: list[int], per: int, **fields: Any) -> list[Any]:
    """``per`` messages created ``age`` seconds ago for each age: one bucket per age, so the
    walk meets them bucket by bucket (param1 = "<bucket>-<n>", buckets numbered oldest first)."""
    ids = []
    for b, age in enumerate(sorted(ages, reverse=True)):
        past = spoolq.Client(FsStore(root, clock=clock_ago(age)))
        batch = [cast(MessageFields, {"param1": f"{b:02d}-{i:03d}", **fields}) for i in range(per)]
        ids += past.send_many(queue, batch)
    return ids


def test_a_backlog_over_the_index_cap_is_read_a_slice_at_a_time(client: spoolq.Client, root: Path,
                                                                 serve: Any, tmp_path: Path) -> None:
    gate, fifo, out = tmp_path / "gate", tmp_path / "fifo", tmp_path / "out"
    os.mkfifo(fifo)
    held = tmp_path / "held.sh"  # the first message waits on the fifo, later ones run at once
    held.write_text(f'#!/bin/sh\n[ -e {gate} ] || read x < {fifo}\necho "$RQ_PARAM1" >> {out}\n')
    held.chmod(0o755)
    client.create_queue("big", script=str(held), num_workers=1)
    client.set_admin_state("big", "pause")
    buckets, per = 10, 60
    sent_in_buckets(root, "big", [2 * b + 2 for b in range(buckets)], per)
    opens = Opens(fs(client).qdir("big"))
    try:
        serve(env={"SPOOLQ_INDEX_CAP": str(CAP)})
        client.set_admin_state("big", "up")
        wait_for(lambda: client.counts("big")["run"] == 1, 30, "the first message to start")
        settle(client)
        _, opened = opens.read()  # (every bucket is listed: the start-up recount)
        # The walk stops between buckets once CAP are indexed: two buckets of 60 here.
        assert len(opened) <= CAP + per, f"{len(opened)} of {buckets * per} queued messages read"
    finally:
        opens.close()
    late = client.send("big", param1="late")  # a new bucket while the walk waits
    gate.touch()
    with open(fifo, "w"):
        pass  # the first script's read ends
    total = buckets * per + 1
    wait_for(lambda: client.counts("big")["done"] == total, 120, "the backlog to run")
    ran = out.read_text().split()
    assert sorted(ran) == sorted([f"{b:02d}-{i:03d}" for b in range(buckets) for i in range(per)] + ["late"])
    order = [r.split("-")[0] for r in ran if r != "late"]
    assert order == sorted(order), "buckets ran out of creation order"
    assert client.get(late).state == State.DONE


def test_over_the_cap_a_runnable_message_behind_later_ones_is_found(client: spoolq.Client, root: Path,
                                                                    serve: Any) -> None:
    client.create_queue("q", script="/bin/true", num_workers=2)
    client.set_admin_state("q", "pause")
    later = sent_in_buckets(root, "q", [12, 10], CAP, delay=3600)  # fill the index, due in an hour
    now = sent_in_buckets(root, "q", [6, 4], 10)
    serve(env={"SPOOLQ_INDEX_CAP": str(CAP)})
    client.set_admin_state("q", "up")
    for msg_id in now:
        assert client.wait(msg_id, 60).state == State.DONE
    assert all(client.get(m).state == State.QUE for m in later)
