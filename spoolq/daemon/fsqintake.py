"""fsq queue directories served by the daemon (seed 003; spec A; docs/fsq.md): kind ``fsq``.

A spoolq queue of kind ``fsq`` names an fsq queue directory (``fsq_dir``, ``ROOT/QUEUE``).
Items that fsq's tools (or ``spoolq fsq enqueue``, or anything else) put in its ``queue/``
become messages of the spoolq queue, which its workers run in parallel with fsq-scan's
contract (jobs.py: ``PROG ARGS... ITEM-ARGS...``, the item on stdin, ``FSQ_ITEM_*``), and
the finished item is put back into ``done/`` or ``fail/`` under its id (finish.py).

Items are taken only as the queue has room (at most ``window`` messages waiting in
``que``), so ``ls queue/`` still shows the backlog, and fsq's own ``scan`` may work the
same directory at the same time: both take an item only under its flock. A take:

1. flock each item (``LOCK_EX|LOCK_NB``: one another scanner holds is skipped), check the
   name still is that file, parse its name; an item that cannot run (not a regular file, a
   malformed name, older than ``fsq_ttl``) goes to ``fail/``, as fsq-scan does;
2. store each as a **prep** message: the content as its attachment ``fsq-item`` (a hard
   link where the spool is on the same filesystem, else a copy), the directory and id in
   ``params.fsq``, the first four arguments as param1-4, ``count`` = the item's tries;
3. write a journal ``<home>/fsq/<queue>.json`` (fsync'd): the item ids and message ids;
4. commit the preps;
5. unlink the items from ``queue/`` (fsync'd), drop the journal, release the flocks.

A crash before 3 leaves preps nobody commits (the cleaner removes them) and the items in
``queue/``, flock released: they are taken again. A journal found is finished first: its
preps committed (idempotent), its items unlinked if still there. Between 3 and 5 the
items stay flock'd, so fsq's own scan does not take them; only if the daemon dies there
*and* fsq's scan runs the directory before the daemon is back can an item run twice.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import select
import stat
import threading
import time
from pathlib import Path
from typing import Any

from .. import durable, fsq
from .. import inotify as ino
from ..client import Client
from ..errors import MessageNotFound, QueueDown, QueueNotFound, SpoolqError, StorageError, WrongState
from ..events import EventBus
from ..model import Message, QueueConfig, State
from ..store.base import AttachmentSource

log = logging.getLogger("spoolq.fsq")

SRC = "fsq"
SAFETY_POLL = 5.0
"""Seconds between looks at queues that wait (items locked by another scanner, a full
window, the fsq queue down) and between reads of the queue list, when no event came."""
_MASK = ino.IN_CREATE | ino.IN_MOVED_TO | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_ONLYDIR


def window(num_workers: int) -> int:
    """Messages of a queue allowed to wait in ``que`` before more items are taken."""
    return max(16, 4 * num_workers)


class Served:
    """One fsq queue directory and how it is watched."""

    def __init__(self, cfg: QueueConfig) -> None:
        self.fsq_dir = cfg.fsq_dir
        self.conf = fsq.Conf.from_env(root=os.path.dirname(cfg.fsq_dir))
        self.fsq_queue = os.path.basename(cfg.fsq_dir)
        self.paths = fsq.Paths(self.conf, self.fsq_queue)
        self.watches: list[int] = []
        # What is left of the last sorted listing of queue/, taken from the front: as fsq's
        # scan works a snapshot through, so a directory of N items is listed about once,
        # not once per take of a window (N^2 / window for a big backlog).
        self.snapshot: collections.deque[str] = collections.deque()
        self.trigger_fd: int | None = None
        self.trigger_wfd: int | None = None  # our own writer: no EOF storm when fsq's hang up


class FsqIntake:
    """The fsq queues' watcher and taker, on its own thread."""

    name = "fsq intake"

    def __init__(self, home: Path, *, client: Client, bus: EventBus | None = None) -> None:
        self.journals = Path(home) / "fsq"
        self.spool = self.journals  # named in the error if it cannot start
        self.client = client
        self.bus = bus
        self.served: dict[str, Served] = {}
        self._by_wd: dict[int, str] = {}
        self._dirty: set[str] = set()
        self._waiting: set[str] = set()
        self._warned: set[tuple[str, str]] = set()
        self._ino: ino.Inotify | None = None
        self._sub: Any = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_due = 0.0

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        self.journals.mkdir(mode=0o700, exist_ok=True)
        self._ino = ino.Inotify()
        if self.bus is not None:
            self._sub = self.bus.subscribe(maxlen=1000, wake=self._wake)
        self._thread = threading.Thread(target=self._run, name="spoolq-fsq", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(30)
        if self._sub is not None:
            self._sub.close()
        for q in list(self.served):
            self._unserve(q)
        if self._ino is not None:
            self._ino.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _run(self) -> None:
        assert self._ino is not None
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= self._refresh_due:
                self._refresh()
                self._refresh_due = now + SAFETY_POLL
            for q in sorted(self._dirty):
                self._dirty.discard(q)
                try:
                    waits = self.take(q)
                except Exception as e:  # noqa: BLE001 - one queue must never stop the others
                    self._warn(q, "error", "fsq: %s: %s; trying again every %g s", q, e, SAFETY_POLL)
                    waits = True
                (self._waiting.add if waits else self._waiting.discard)(q)
            triggers = [s.trigger_fd for s in self.served.values() if s.trigger_fd is not None]
            ready, _, _ = select.select([self._ino.fd, self._wake_r, *triggers], [], [], SAFETY_POLL)
            if not ready:
                self._dirty |= self._waiting
            if self._wake_r in ready:
                _drain(self._wake_r)
                if self._sub is not None:
                    for ev in self._sub.drain():
                        eq = ev.get("queue")
                        if ev.get("event") == "queue_change":
                            self._refresh_due = 0.0
                        elif eq in self._waiting and (ev.get("event") != "state" or ev.get("state") == "run"):
                            self._dirty.add(eq)
            for q, s in self.served.items():
                if s.trigger_fd is not None and s.trigger_fd in ready:
                    _drain(s.trigger_fd)  # fsq's trigger_pull: one NUL per enqueue -t
                    self._dirty.add(q)
            if self._ino.fd in ready:
                for ie in self._ino.read():
                    if ie.mask & ino.IN_Q_OVERFLOW:
                        self._dirty |= set(self.served)
                    elif (wq := self._by_wd.get(ie.wd)) is not None:
                        self._dirty.add(wq)

    # -- which queues ---------------------------------------------------------------------
    def _refresh(self) -> None:
        """Serve every queue of kind fsq (and stop serving the others); a directory that is
        missing is looked for again at the next refresh."""
        store = self.client.store
        want: dict[str, QueueConfig] = {}
        try:
            for q in store.queues():
                try:
                    cfg = store.queue_config(q)
                except SpoolqError:
                    continue
                if cfg.kind == "fsq" and cfg.fsq_dir:
                    want[q] = cfg
        except SpoolqError as e:
            log.warning("fsq: cannot list the queues: %s", e)
            return
        for q in list(self.served):
            if q not in want or want[q].fsq_dir != self.served[q].fsq_dir:
                self._unserve(q)
        for q, cfg in want.items():
            if q in self.served and self.served[q].watches:
                self._dirty.add(q)  # the safety poll: a lock released by a dead scanner is no event
                continue
            self._unserve(q)
            s = Served(cfg)
            self.served[q] = s
            if (self.journals / f"{q}.json").exists():
                self._dirty.add(q)
            try:
                self._watch(q, s)
            except OSError as e:
                self._warn(q, "nodir", "fsq: %s: cannot watch %s: %s (looked for again every %g s)", q,
                           s.paths.sub("queue"), e.strerror or e, SAFETY_POLL)
                continue
            self._warned.discard((q, "nodir"))
            log.info("fsq: queue %s takes the items of %s", q, cfg.fsq_dir)
            self._dirty.add(q)

    def _watch(self, q: str, s: Served) -> None:
        assert self._ino is not None
        for path in (s.paths.sub("queue"), s.paths.base):  # items; and the down file, the trigger
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory (or a symbolic link)")
            wd = self._ino.add(Path(path), _MASK)
            s.watches.append(wd)
            self._by_wd[wd] = q
        trig = os.path.join(s.paths.base, s.conf.trigger)
        try:
            # A reader held open, so fsq's `enqueue -t` finds a listener and wakes us.
            fd = os.open(trig, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            s.trigger_fd = fd
            s.trigger_wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            os.close(fd)

    def _unserve(self, q: str) -> None:
        s = self.served.pop(q, None)
        if s is None:
            return
        for wd in s.watches:
            self._by_wd.pop(wd, None)
            if self._ino is not None:
                try:
                    self._ino.remove(wd)
                except OSError:
                    pass
        for fd in (s.trigger_fd, s.trigger_wfd):
            if fd is not None:
                os.close(fd)

    # -- taking ---------------------------------------------------------------------------
    def take(self, queue: str) -> bool:
        """Finish a take a crash interrupted, then take what room allows; True if items were
        left waiting (room, a lock, the queue down)."""
        s = self.served.get(queue)
        journal = self.journals / f"{queue}.json"
        if journal.exists():
            self._finish(queue, journal)
        if s is None or not s.watches:
            return False
        store = self.client.store
        try:
            cfg = store.queue_config(queue)
            queued = self.client.counts(queue).get("que", 0)
        except QueueNotFound:
            return False
        room = window(cfg.num_workers) - queued
        if room <= 0:
            return True
        if fsq.is_down(s.conf, s.fsq_queue):
            return True  # fsq's down: scans stop; its removal is an event
        held: list[fsq.WorkItem] = []
        left = False
        relisted = False
        try:
            while len(held) < room:
                if not s.snapshot:
                    if relisted:
                        break
                    try:
                        s.snapshot.extend(sorted(os.listdir(s.paths.sub("queue"))))
                    except FileNotFoundError:
                        self._unserve(queue)
                        return False
                    relisted = True
                    continue
                name = s.snapshot.popleft()
                item = fsq.take(s.conf, s.fsq_queue, name, lock=True, max_tries=0, ttl=cfg.fsq_ttl,
                                rejected=lambda n, e: log.warning("fsq: %s: %s: moved to fail/: %s", queue, n, e))
                if item is None:
                    # gone (another scanner finished it), or locked: seen again at the next listing
                    left = left or os.path.lexists(os.path.join(s.paths.sub("queue"), name))
                    continue
                held.append(item)
            left = left or bool(s.snapshot)
            if held:
                self._store(queue, cfg, s, held)
        finally:
            for item in held:
                item.close()
        return left

    def _store(self, queue: str, cfg: QueueConfig, s: Served, items: list[fsq.WorkItem]) -> None:
        store = self.client.store
        made: list[tuple[str, str]] = []
        try:
            for item in items:
                args = list(item.arguments)
                msg = Message(src=SRC, count=item.tries, max_count=cfg.max_count,
                              params={"fsq": {"dir": s.fsq_dir, "id": item.id}})
                for i, a in enumerate(args[:4]):
                    setattr(msg, f"param{i + 1}", a)
                try:
                    m = store.create(queue, msg, state=State.PREP, attachments=[
                        AttachmentSource(name=fsq.ITEM_ATTACHMENT, path=item.path, link=True)])
                except (QueueDown, QueueNotFound, StorageError):
                    raise
                except (ValueError, SpoolqError) as e:
                    # this item cannot be a message (an argument spoolq refuses): fsq's fail/
                    log.warning("fsq: %s: %s cannot be a message (%s): moved to fail/", queue, item.id, e)
                    item.fail_perm()
                    continue
                made.append((item.id, m.msg_id))
        except QueueDown:
            self._warn(queue, "down", "fsq: %s waits: the spoolq queue is DOWN", queue)
            if not made:
                return
        if not made:
            return
        jpath = self.journals / f"{queue}.json"
        durable.write_replace(jpath, json.dumps({"dir": s.fsq_dir, "items": made}).encode())
        self._finish(queue, jpath, made)
        self._warned.discard((queue, "down"))
        log.debug("fsq: %s: %d item(s) taken", queue, len(made))

    def _finish(self, queue: str, jpath: Path, made: list[tuple[str, str]] | None = None) -> None:
        """Steps 4-5 of a take, from its journal. Raises (the journal stays) if a step fails."""
        data = json.loads(jpath.read_bytes()) if made is None else None
        fsq_dir = data["dir"] if data is not None else self.served[queue].fsq_dir
        pairs = made if made is not None else [(str(a), str(b)) for a, b in data["items"]]  # type: ignore[index]
        with self.client.store.durable_batch():
            for _item_id, msg_id in pairs:
                try:
                    self.client.store.commit(queue, msg_id)
                except (WrongState, MessageNotFound, QueueNotFound):
                    pass  # committed before a crash, and maybe run since; or the queue is gone
        qdir = os.path.join(fsq_dir, fsq.Conf.from_env().queue)
        for item_id, _msg_id in pairs:
            try:
                os.unlink(os.path.join(qdir, fsq.valid_name(item_id)))
            except FileNotFoundError:
                pass
        try:
            durable.fsync_dir(qdir)
        except FileNotFoundError:
            pass
        os.unlink(jpath)

    def _warn(self, queue: str, kind: str, fmt: str, *args: object) -> None:
        if (queue, kind) not in self._warned:
            self._warned.add((queue, kind))
            log.warning(fmt, *args)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
