"""The filesystem store's index of one queue's ``que/``: which queued messages exist and
when they are due, so that :meth:`FsStore.claim` picks the next one without a walk.

Kept only while a daemon wants to claim from the queue (``Watcher.want``, the queue is
UP): a PAUSEd or DOWN queue has no index and no watches on ``que/``, so its messages cost
nothing however many there are. When it can run again it is indexed by a :class:`Walk` of ``que/``, done
in slices (``work``) between the daemon's other duties, oldest bucket first; messages
already indexed can start meanwhile. After that inotify keeps the index current, one
message per event, and nothing re-reads the queue periodically. A full walk happens again
only when events may have been lost (inotify overflow, SIGHUP, a failed dispatch).

The index is a cache (D3): the store's ``move`` is what decides, so a stale entry can only
cost a failed move (WrongState), never a double start. Which messages run is the store's
(its attempts); the index only keeps the coalesced duplicates they hold (``absorbed``).
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ... import filestamp
from ...errors import SpoolqError
from ...filestamp import Stamp
from ...ids import MSG_ID_RE
from ...model import Message, QueueConfig, State, param_text
from ..leases import key_of
from .layout import message_path
from .search import read_rest

QUE_DEPTH = 3
"""que/<day>/<HHMM>/<SS>/<id>: bucket directories are levels 0..3 below que/."""

INDEX_CAP = int(os.environ.get("SPOOLQ_INDEX_CAP") or 4096)
"""A walk pauses once this many messages are indexed, and goes on when dispatch has taken
a quarter of them or finds nothing it can start (``QueueIndex.cap``). Each message the
walk reads is kept whole (``Entry.message``, if ``msg`` is at most ``KEEP_MSG_BYTES``), so
that the daemon's start need not parse it again: that second parse was ~7 % of the
daemon's CPU per persistent-worker message. The figure bounds the daemon's
memory: ~1-3 KB per indexed message (~500 bytes for one not kept: those that arrive by
event while the index is over the cap, and a coalescing queue's, which is not capped).
The environment variable is for tests."""

KEEP_MSG_BYTES = 1024
"""The largest ``msg`` an index keeps whole; a bigger one is parsed again at its start."""

_WIDTHS = (8, 4, 2)  # name lengths of the bucket levels 1..3


class Entry:
    """What the scheduler needs of one queued message (slots: a million of them add up)."""

    __slots__ = ("msg_id", "due", "params", "stamp", "gen", "message", "raw")

    def __init__(self, msg_id: str, due: float, params: tuple[str, str, str, str], stamp: Stamp,
                 gen: int = 0, message: Message | None = None, raw: bytes | None = None) -> None:
        self.msg_id = msg_id
        self.due = due
        self.params = params
        self.stamp = stamp  # of the msg it was read from (filestamp.py)
        self.gen = gen
        # The validated msg as read (KEEP_MSG_BYTES), and its bytes while the stamp cannot
        # vouch for them (filestamp.py; as the queue config cache keeps them): the start
        # takes this copy on a stat once ``raw`` is None, else if it reads the same bytes.
        # The entry's taker owns it (the start appends to its history).
        self.message = message
        self.raw = raw

    def same(self, st: os.stat_result) -> bool:
        """Is ``msg`` (``st``) still the file this entry was read from (inode, mtime, size)?
        Whether that vouches for its content is filestamp's rule (``raw``)."""
        return filestamp.key(st) == self.stamp


def _indexed_param(value: object) -> str:
    """A param as the message itself will carry it (a number 0 is "0", true is "true"), so
    that ``blocking_params`` compares it with running messages' params alike. One a message
    cannot carry is "": the start reads it again and sets the message aside (I7)."""
    try:
        return param_text(value)
    except SpoolqError:
        return ""


def read_entry(msg_id: str, msg_dir: Path, keep: bool = False) -> Entry | None:
    """The message's due time and params, or None if it is gone or unreadable (the store
    sets unreadable messages aside when the daemon tries to start them, I7). ``keep``: the
    validated message too, if ``msg`` is small and valid (``Entry.message``)."""
    p = f"{msg_dir}/msg"
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO never hangs the loop
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        raw = read_rest(fd)
        data = json.loads(raw)
        due = float(data.get("due") or 0.0)
        get = data.get
        params = (_indexed_param(get("param1")), _indexed_param(get("param2")), _indexed_param(get("param3")),
                  _indexed_param(get("param4")))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return None
    finally:
        os.close(fd)
    key, settled = filestamp.stamp(st)
    if keep and len(raw) <= KEEP_MSG_BYTES:
        try:
            m = Message.from_dict(data)
        except (ValueError, TypeError, RecursionError, SpoolqError):
            pass  # the start reads it again, and the store decides (sets it aside, I7)
        else:
            if m.msg_id == msg_id:
                return Entry(msg_id, due, params, key, message=m, raw=None if settled else raw)
    return Entry(msg_id, due, params, key)


@dataclass
class Walk:
    """A walk of (part of) ``que/`` that can stop after any message and go on later.

    ``stack`` holds directories still to visit, the oldest on top; ``names`` the messages
    of the bucket being read, the oldest last. Each directory is watched *before* it is
    listed, so a message that arrives after the listing is an inotify event, and one that
    arrives before it is listed: none is missed. A ``full`` walk ends by dropping entries
    it did not see (of an older ``gen``): messages that left ``que/`` while events were lost.
    """

    stack: list[tuple[Path, int]]
    full: bool
    gen: int
    bucket: Path | None = None
    names: list[str] = field(default_factory=list)
    sweep: list[str] | None = None  # a full walk's last phase: ids to check for staleness
    read: int = 0
    paused: bool = False  # the index full (anywhere in the walk) (QueueIndex.cap)

    def add_root(self, path: Path, level: int) -> None:
        """Visit ``path`` in creation order. The stack holds directories newest at the
        bottom, oldest on top (paths under one ``que/`` compare by their parts: a bucket's
        name is its creation time), so a new bucket, usually the newest, goes below the
        older ones still to visit instead of jumping the queue."""
        key = path.parts
        i = len(self.stack)
        while i > 0 and self.stack[i - 1][0].parts < key:
            i -= 1
        self.stack.insert(i, (path, level))


WatchFn = Callable[[Path, int], None]
"""Called with each directory of ``que/`` (and its level) before the walk lists it."""


@dataclass
class QueueIndex:
    name: str
    qdir: Path
    index: dict[str, Entry] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)
    # child id -> parent id: coalesced duplicates waiting for their parent to finish.
    absorbed: dict[str, str] = field(default_factory=dict)
    pending_ids: set[str] = field(default_factory=set)
    indexed: bool = False  # que/ is watched and the index is (being) kept
    walk: Walk | None = None
    gen: int = 0
    # Bound on the index (None: index everything, as a coalescing queue must): with more
    # queued than this the walk waits, oldest buckets (and messages) indexed first.
    cap: int | None = INDEX_CAP
    starved: bool = False  # dispatch found nothing it could start while the walk waited
    # With `serve --dispatchers`: is a message of this queue this process's (parts.py)?
    # None: all of them are.
    owns: Callable[[str], bool] | None = None

    # -- index maintenance ---------------------------------------------------------------
    def _put(self, e: Entry) -> None:
        """Index ``e``; a new due gets a new heap entry (the old one is skipped when it surfaces)."""
        e.gen = self.gen
        old = self.index.get(e.msg_id)
        self.index[e.msg_id] = e
        if old is None or old.due != e.due:
            heapq.heappush(self.heap, (e.due, e.msg_id))

    def start_index(self) -> None:
        """Begin indexing ``que/`` from scratch (the queue became runnable)."""
        self.indexed = True
        self.rewalk()

    def rewalk(self) -> None:
        """Walk all of ``que/`` again, keeping what is indexed: events may have been lost."""
        if not self.indexed:
            return
        self.gen += 1
        self.walk = Walk(stack=[(self.qdir / str(State.QUE), 0)], full=True, gen=self.gen)

    def add_walk_root(self, path: Path, level: int) -> None:
        """A bucket directory appeared: walk it too (its messages may predate its watch)."""
        if not self.indexed:
            return
        if self.walk is None:
            self.walk = Walk(stack=[], full=False, gen=self.gen)
        self.walk.add_root(path, level)

    def unindex(self) -> None:
        """Forget ``que/`` (the queue cannot run): no index, no walk, no pending reads."""
        self.indexed = False
        self.walk = None
        self.index = {}
        self.heap = []
        self.absorbed = {}
        self.pending_ids = set()

    def _ours(self, msg_id: str) -> bool:
        return self.owns is None or self.owns(msg_id)

    def note_arrival(self, msg_id: str) -> None:
        """A message appeared in ``que/`` or was kicked: read it at the next ``absorb``."""
        if self.indexed and self._ours(msg_id):
            self.pending_ids.add(msg_id)

    def note_departure(self, msg_id: str) -> None:
        self.pending_ids.discard(msg_id)
        self.index.pop(msg_id, None)
        self.absorbed.pop(msg_id, None)

    def has_work(self) -> bool:
        w = self.walk
        if w is not None and w.paused and (self.starved or self.cap is None
                                           or len(self.index) <= self.cap * 3 // 4):
            w.paused = False
        return bool(self.pending_ids) or (w is not None and not w.paused)

    def bound(self, cfg: QueueConfig) -> None:
        """Cap the index unless the queue coalesces: a parent's duplicates may be anywhere
        in ``que/``, so all of it must be indexed before one is chosen."""
        self.cap = None if cfg.coalesce_params else INDEX_CAP

    def _keep(self) -> bool:
        """Should a message read now be kept whole (``INDEX_CAP``)?"""
        return self.cap is not None and len(self.index) < self.cap

    def _full(self) -> bool:
        return self.cap is not None and len(self.index) >= self.cap and not self.starved

    def absorb(self, until: float, now: Callable[[], float]) -> bool:
        """Read the messages events announced, until ``now() >= until``; True if any was
        indexed (the queue should be dispatched). Left-overs wait for the next call."""
        added = False
        while self.pending_ids and now() < until:
            msg_id = self.pending_ids.pop()
            e = read_entry(msg_id, message_path(self.qdir, State.QUE, msg_id), self._keep())
            if e is not None:
                self._put(e)
                added = True
        return added

    def walk_on(self, until: float, now: Callable[[], float], watch: WatchFn) -> bool:
        """Go on with the walk until ``now() >= until``; True if anything was indexed.
        Bounded, so that indexing a million messages never holds up the other queues."""
        added = False
        w = self.walk
        while w is not None and not w.paused and now() < until:
            if w.names:
                if self._full():
                    w.paused = True  # within a bucket too: one can hold far more than the cap
                    break
                added |= self._walk_message(w)
            elif w.stack:
                if added:
                    self.starved = False  # one bucket more; dispatch says if it needs another
                if self._full():
                    w.paused = True  # between buckets: goes on when dispatch needs more
                    break
                self._walk_dir(w, watch)
            elif w.full and w.sweep is None:
                w.sweep = list(self.index)
            elif w.sweep:
                for _ in range(min(len(w.sweep), 1000)):
                    msg_id = w.sweep.pop()
                    e = self.index.get(msg_id)
                    if e is not None and e.gen < w.gen and msg_id not in self.pending_ids:
                        del self.index[msg_id]  # left que/ while events were lost
                        self.absorbed.pop(msg_id, None)
            else:
                self.walk = w = None
        if added:
            self.starved = False
        return added

    def _walk_dir(self, w: Walk, watch: WatchFn) -> None:
        path, level = w.stack.pop()
        watch(path, level)  # before listing: what arrives after the listing is an event
        try:
            names = os.listdir(path)
        except OSError:
            return
        if level < QUE_DEPTH:
            width = _WIDTHS[level]
            subs = sorted((n for n in names if len(n) == width and n.isdigit()), reverse=True)
            w.stack.extend((path / n, level + 1) for n in subs)  # oldest on top
        else:
            w.bucket = path
            # Newest first, popped from the end: the oldest messages are indexed (and can
            # start) first. Ids of one bucket differ only in the millisecond and the inode.
            w.names = sorted((n for n in names if MSG_ID_RE.match(n)), reverse=True)

    def _walk_message(self, w: Walk) -> bool:
        msg_id = w.names.pop()
        if not self._ours(msg_id):
            return False  # another dispatch process's (parts.py)
        assert w.bucket is not None
        path = w.bucket / msg_id
        old = self.index.get(msg_id)
        if old is not None:
            try:
                if old.same(os.stat(f"{path}/msg")):
                    old.gen = self.gen  # unchanged: seen, no need to read it
                    return False
            except OSError:
                return False  # gone since the listing: its departure event drops it
        w.read += 1
        e = read_entry(msg_id, path, self._keep())
        if e is None:
            return False
        self._put(e)
        return True

    def drop(self, msg_id: str) -> None:
        self.index.pop(msg_id, None)
        self.absorbed.pop(msg_id, None)

    def release(self, msg_id: str) -> None:
        """A held duplicate whose parent did not succeed: it runs on its own."""
        if self.absorbed.pop(msg_id, None) is not None:
            self.requeued(msg_id)

    def put_back(self, e: Entry) -> None:
        """An entry taken off the heap for a start that did not happen: schedule it again."""
        if not self.indexed:
            return
        self.index.pop(e.msg_id, None)  # so _put pushes it even with an unchanged due
        self._put(e)

    def requeued(self, msg_id: str) -> None:
        """A message the store put back in que (resend, 111, parent failed): read it again.
        A duplicate heap entry is harmless: the stale copy is skipped when it surfaces."""
        self.absorbed.pop(msg_id, None)
        if self.indexed and self._ours(msg_id):
            e = read_entry(msg_id, message_path(self.qdir, State.QUE, msg_id), self._keep())
            if e is not None:
                self.index.pop(msg_id, None)
                self._put(e)

    def refresh_entry(self, e: Entry) -> Entry:
        """``e`` as it is on disk now, if its ``msg`` changed since it was indexed (a hand
        edit, or a ``run-now`` whose kick is not handled yet): one stat per start."""
        path = message_path(self.qdir, State.QUE, e.msg_id)
        try:
            if e.same(os.stat(f"{path}/msg")):
                return e
        except OSError:
            return e  # gone: the move will say so
        fresh = read_entry(e.msg_id, path, self._keep())
        return fresh if fresh is not None else e

    # -- scheduling (the rule of leases.pick, on the heap) ----------------------------------
    def next_runnable(self, now: float, blocking: Sequence[int],
                      blocked: set[tuple[str, ...] | None]) -> tuple[Entry | None, float | None]:
        """The message to start now, or (None, when the head becomes due) — RQ's scheduler:
        order by due; skip messages whose ``blocking`` params tuple is in ``blocked``."""
        skipped: list[tuple[float, str]] = []
        pick: Entry | None = None
        wake: float | None = None
        while self.heap:
            due, msg_id = self.heap[0]
            e = self.index.get(msg_id)
            if e is None or e.due != due or msg_id in self.absorbed:
                heapq.heappop(self.heap)
                if e is not None and e.due == due and msg_id in self.absorbed:
                    skipped.append((due, msg_id))  # comes back if its parent fails
                continue
            if blocking and key_of(e.params, blocking) in blocked:
                skipped.append(heapq.heappop(self.heap))
                continue
            if e.due > now:
                wake = e.due
                break
            pick = e
            heapq.heappop(self.heap)
            break
        for s in skipped:
            heapq.heappush(self.heap, s)
        if pick is None and self.walk is not None:
            # What can start may be further on: the walk must go on past the cap, whether it
            # paused already or will at its next step (a walk cut short by its time budget
            # within a bucket pauses there without another dispatch to say this).
            self.starved = True
        return pick, wake

    def coalesce_with(self, parent: Entry, cp: Sequence[int]) -> list[str]:
        """Queued messages whose coalesce params all match ``parent``'s (any due time), now
        held (``absorbed``) for it."""
        if not cp:
            return []
        want = key_of(parent.params, cp)
        out = []
        for e in self.index.values():
            if e.msg_id == parent.msg_id or e.msg_id in self.absorbed:
                continue
            if key_of(e.params, cp) == want:
                out.append(e.msg_id)
        for c in out:
            self.absorbed[c] = parent.msg_id
        return out
