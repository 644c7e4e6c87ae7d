"""The filesystem store's change feed for the daemon (``FsStore.watch()``): inotify, and the
indexes of the queues the daemon claims from (index.py).

| kind | path | events |
|---|---|---|
| ``root`` | ``<root>/queue`` | queues created, renamed, deleted |
| ``qdir`` | ``<root>/queue/<q>`` | ``config.json``, ``pause``, ``down`` changed; ``kick/`` created |
| ``kick`` | ``<root>/queue/<q>/kick`` | a kick file created or rewritten (``run-now``, ``cancel``) |
| ``que`` | ``que/`` and its bucket directories (level 0..3) | buckets and messages in and out |

``que`` watches and the index exist only for queues the daemon wants to claim from
(:meth:`FsWatcher.want`, while the queue is UP): a PAUSEd or DOWN queue's sends wake nobody.
Indexing is done in slices of at most the ``budget`` given to :meth:`FsWatcher.changes`, so a
million-message queue never holds up the daemon's other duties. When the kernel refuses a
watch (``fs.inotify.max_user_watches``), the queues are walked on a timer instead
(``wake_at``).
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...model import ADMIN_FLAGS, AdminState, QueueConfig
from ..base import Change
from . import inotify as ino
from . import kicks
from .index import QUE_DEPTH, QueueIndex, WatchFn
from .layout import RQ_FLAG_DIR

if TYPE_CHECKING:
    from .attempts import AttemptParts

log = logging.getLogger("spoolq.daemon")

DIR_EVENTS = ino.IN_CREATE | ino.IN_MOVED_TO | ino.IN_MOVED_FROM | ino.IN_DELETE | ino.IN_ONLYDIR
MASKS = {
    "qdir": DIR_EVENTS | ino.IN_CLOSE_WRITE | ino.IN_ATTRIB,
    "kick": ino.IN_CREATE | ino.IN_CLOSE_WRITE | ino.IN_MOVED_TO | ino.IN_ONLYDIR,
}
QDIR_NAMES = {"config.json", "pause", "down"}
OVERFLOW = "overflow"
TROUBLE_WALK = 5.0
"""Without enough inotify watches, indexed queues are walked (in slices) this often instead."""
BIG_WALK = 10_000
"""A walk that read this many messages is worth a line in the log without -v."""


@dataclass(frozen=True)
class Watched:
    kind: str  # root, qdir, kick, que; or OVERFLOW for a lost-events marker
    queue: str | None
    path: Path
    level: int


class FsWatcher:
    """One inotify instance, what each of its watches is for, and the claim indexes."""

    def __init__(self, store: AttemptParts) -> None:
        self.store = store
        self.ino = ino.Inotify()
        self.trouble = False  # a watch was refused: indexed queues are walked on a timer
        self._next_trouble_walk = 0.0
        self._by_wd: dict[int, Watched] = {}
        self.indexes: dict[str, QueueIndex] = {}  # the queues a daemon claims from
        self._queues: set[str] = set()
        self._settings: dict[str, tuple[QueueConfig, AdminState]] = {}  # read once per change
        self._out: list[Change] = []
        self._turn = 0  # which queue indexes first (round robin)
        self._add(store.qroot, "root")
        rq_flags = store.root / RQ_FLAG_DIR
        try:
            rq_flags.mkdir(exist_ok=True)
            self._add(rq_flags, "rqflags")
        except OSError as e:
            log.warning("cannot watch %s for RQ's admin flag files: %s", rq_flags, e)
        self._sync_queues()

    # -- the Watcher protocol -------------------------------------------------------------
    def fileno(self) -> int:
        return self.ino.fd

    @property
    def busy(self) -> bool:
        """Indexing is left to do: call :meth:`changes` again without waiting."""
        return bool(self._out) or any(ix.has_work() for ix in self.indexes.values())

    @property
    def wake_at(self) -> float | None:
        due = self.store.counts_due  # the daemon's gathered counts deltas (attempts.py)
        trouble = self._next_trouble_walk if self.trouble else None
        return min(due, trouble) if due is not None and trouble is not None else due or trouble

    def changes(self, budget: float = 0.004) -> list[Change]:
        """What happened since the last call, after at most ``budget`` seconds of indexing."""
        due = self.store.counts_due
        if due is not None and time.monotonic() >= due:
            self.store.flush_counts()
        self._read_events()
        if self.trouble and time.monotonic() >= self._next_trouble_walk:
            self._next_trouble_walk = time.monotonic() + TROUBLE_WALK
            self._rewalk_all()
        self._index_work(budget)
        out, self._out = self._out, []
        return out

    def want(self, queue: str, on: bool) -> None:
        """The daemon will (not) claim from ``queue``: index its ``que/`` (in slices) or forget it."""
        ix = self.indexes.get(queue)
        if on and ix is None:
            part = self.store.part
            owns = None if part.count == 1 else functools.partial(part.owns, queue)
            ix = self.indexes[queue] = QueueIndex(queue, self.store.qdir(queue), owns=owns)
            # Duplicates held by running attempts stay held in the new index.
            ix.absorbed = {d: parent for (q, d), parent in self.store._held.items() if q == queue}
            ix.bound(self.settings(queue)[0])
            ix.start_index()
            log.debug("queue %s: indexing que/", queue)
        elif not on and ix is not None:
            del self.indexes[queue]
            self._drop(queue, ("que",))
            log.debug("queue %s: not indexed", queue)

    def resync(self) -> None:
        """Events may have been lost, or files changed by hand (SIGHUP): re-read everything."""
        self.store._cfg_cache.clear()
        self._rewalk_all()

    def settings(self, queue: str) -> tuple[QueueConfig, AdminState]:
        """The queue's config and admin state, read again only after inotify said they
        changed: what ``claim`` and ``finish`` need, without a stat per message."""
        got = self._settings.get(queue)
        if got is None:
            got = self._settings[queue] = (self.store.queue_config(queue), self.store.admin_state(queue))
        return got

    def close(self) -> None:
        if self.store._watcher is self:
            self.store._watcher = None
        self.ino.close()

    # -- watches --------------------------------------------------------------------------
    def _add(self, path: Path, kind: str, queue: str | None = None, level: int = 0) -> bool:
        """Watch ``path`` for ``kind``'s events (re-adding a watched path is harmless)."""
        try:
            wd = self.ino.add(path, MASKS.get(kind, DIR_EVENTS))
        except OSError as e:
            if e.errno == errno.ENOSPC and not self.trouble:
                self.trouble = True
                log.warning("inotify watch limit reached (fs.inotify.max_user_watches): falling back "
                            "to walking the queues every %g s", TROUBLE_WALK)
            return False
        self._by_wd[wd] = Watched(kind, queue, path, level)
        return True

    def _que_watcher(self, queue: str) -> WatchFn:
        def add(path: Path, level: int) -> None:
            self._add(path, "que", queue, level)

        return add

    def _drop(self, queue: str, kinds: tuple[str, ...]) -> None:
        for wd, w in list(self._by_wd.items()):
            if w.queue == queue and w.kind in kinds:
                self.ino.remove(wd)  # its IN_IGNORED finds no entry and is skipped
                del self._by_wd[wd]

    def _events(self) -> Iterator[tuple[ino.Event, Watched]]:
        for ev in self.ino.read():
            if ev.mask & ino.IN_Q_OVERFLOW:
                yield ev, Watched(OVERFLOW, None, Path(), 0)
                continue
            w = self._by_wd.get(ev.wd)
            if w is None:
                continue
            if ev.mask & ino.IN_IGNORED:
                del self._by_wd[ev.wd]  # the directory is gone
                continue
            yield ev, w

    # -- queues and kicks -----------------------------------------------------------------
    def _sync_queues(self) -> None:
        """Watch new queues' directories and kicks; forget gone ones."""
        names = set(self.store.queues())
        self._settings.clear()  # a queue deleted and created again under its name
        for gone in self._queues - names:
            self._forget(gone)
        for name in sorted(names - self._queues):
            self._add(self.store.qdir(name), "qdir", name)
            self._watch_kicks(name)
        self._queues = names

    def _forget(self, queue: str) -> None:
        """Drop what is known of ``queue`` (its watches, index and settings)."""
        self._drop(queue, ("qdir", "kick", "que"))
        self.indexes.pop(queue, None)
        self._settings.pop(queue, None)
        self._queues.discard(queue)

    def _watch_kicks(self, queue: str) -> None:
        """Watch ``kick/`` and handle the kicks already there (run-now while we were away)."""
        qdir = self.store.qdir(queue)
        kdir = kicks.kick_dir(qdir)
        if kdir.is_dir():
            self._add(kdir, "kick", queue)
        for name in kicks.pending(qdir):
            self._kicked(queue, name)

    def _kicked(self, queue: str, name: str) -> None:
        if not self.store.part.owns(queue, name):
            return  # another dispatch process's message: that process consumes it (parts.py)
        msg_id = kicks.consume(self.store.qdir(queue), name)
        if msg_id is None:
            return
        if self.store.holds(queue, msg_id):
            self._out.append(Change("cancel", queue, msg_id))  # the holder looks for a cancel
            return
        ix = self.indexes.get(queue)
        if ix is not None:
            ix.note_arrival(msg_id)  # read it again: run-now rewrote it in place

    def _rewalk_all(self) -> None:
        self._sync_queues()
        for name in self._queues:
            self._add(self.store.qdir(name), "qdir", name)
            self._watch_kicks(name)
            self._out.append(Change("config", name))
        for ix in self.indexes.values():
            ix.rewalk()
        self._out.append(Change("queues"))

    def _read_events(self) -> None:
        for ev, w in self._events():
            if w.kind == OVERFLOW:
                log.warning("inotify queue overflow: walking every queue again")
                self._rewalk_all()
                continue
            if w.kind == "root":
                if not ev.name.startswith("."):
                    self._forget(ev.name)  # gone, new, or deleted and created again: start afresh
                    self._sync_queues()
                    self._out += [Change("queues"), Change("config", ev.name)]
                continue
            if w.kind == "rqflags":
                queue, dot, flag = ev.name.rpartition(".")
                if dot and flag in ADMIN_FLAGS and queue in self._queues:
                    self._settings.pop(queue, None)
                    self._out.append(Change("config", queue))
                continue
            queue = w.queue or ""
            if w.kind == "qdir":
                if ev.name in QDIR_NAMES:
                    self._settings.pop(queue, None)
                    self._out.append(Change("config", queue))
                elif ev.name == kicks.KICK_DIR and ev.is_dir and ev.mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
                    self._watch_kicks(queue)
                continue
            if w.kind == "kick":
                self._kicked(queue, ev.name)
                continue
            ix = self.indexes.get(queue)
            if ix is None:
                continue
            if w.level < QUE_DEPTH:
                if ev.is_dir and ev.mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
                    ix.add_walk_root(w.path / ev.name, w.level + 1)
            elif ev.mask & (ino.IN_MOVED_TO | ino.IN_CREATE):
                ix.note_arrival(ev.name)
            elif ev.mask & (ino.IN_MOVED_FROM | ino.IN_DELETE):
                ix.note_departure(ev.name)

    # -- indexing -------------------------------------------------------------------------
    def _index_work(self, budget: float) -> None:
        """At most ``budget`` seconds of indexing: first the messages events announced (someone
        may be waiting for them), then the walks, taking turns between queues."""
        busy = [ix for ix in self.indexes.values() if ix.has_work()]
        if not busy:
            return
        self._turn = (self._turn + 1) % len(busy)
        busy = busy[self._turn:] + busy[:self._turn]
        clock = time.perf_counter  # a CPU budget, not a schedule
        until = clock() + budget
        for ix in busy:
            if ix.absorb(until, clock):
                self._out.append(Change("work", ix.name))
        for ix in busy:
            w = ix.walk
            if w is None:
                continue
            if ix.walk_on(until, clock, self._que_watcher(ix.name)) or ix.walk is None:
                # New entries, or a finished walk (a coalescing queue waits for it).
                self._out.append(Change("work", ix.name))
            if ix.walk is None and w.full:
                log.log(logging.INFO if w.read >= BIG_WALK else logging.DEBUG,
                        "queue %s: indexed que/: %d queued message(s), %d read", ix.name, len(ix.index),
                        w.read)
            if clock() >= until:
                return

