"""One queue's scheduling state: which queued messages exist, when they are due, which run.

The index mirrors ``que/`` on disk. inotify events add and remove single entries; a full
rescan (at start, on a ``kick``, on overflow, and every backstop interval) re-syncs it. The
index is a cache: the store's ``move`` is what decides, so a stale entry can only cost a
failed move (WrongState), never a double start.
"""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..ids import sort_key
from ..model import AdminState, QueueConfig, State
from ..store.layout import iter_entries, message_path


@dataclass
class Entry:
    msg_id: str
    due: float
    params: tuple[str, str, str, str]
    mtime_ns: int


@dataclass
class QueueState:
    name: str
    qdir: Path
    config: QueueConfig | None = None
    admin: AdminState = AdminState.UP
    index: dict[str, Entry] = field(default_factory=dict)
    heap: list[tuple[float, tuple[str, int], str]] = field(default_factory=list)
    # child id -> parent id: coalesced duplicates waiting for their parent to finish.
    absorbed: dict[str, str] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    running_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pending_ids: set[str] = field(default_factory=set)
    needs_rescan: bool = True
    config_stale: bool = True  # config.json, pause or down changed since last read
    script_error: str | None = None  # SCRIPTERROR: why the script cannot start
    hold_until: float = 0.0  # the store failed to start a message: wait before trying again
    hold_for: float = 0.0
    dirty: bool = True
    wake_at: float | None = None

    # -- index maintenance ---------------------------------------------------------------
    def _read(self, msg_id: str, path: Path | None = None) -> Entry | None:
        p = (path or message_path(self.qdir, State.QUE, msg_id)) / "msg"
        try:
            st = os.stat(p)
            data = json.loads(p.read_bytes())
            due = float(data.get("due") or 0.0)
            params = tuple(str(data.get(f"param{i}") or "") for i in range(1, 5))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        return Entry(msg_id, due, params, st.st_mtime_ns)  # type: ignore[arg-type]

    def _put(self, e: Entry) -> None:
        old = self.index.get(e.msg_id)
        self.index[e.msg_id] = e
        if old is None or old.due != e.due:
            heapq.heappush(self.heap, (e.due, sort_key(e.msg_id), e.msg_id))

    def note_arrival(self, msg_id: str) -> None:
        self.pending_ids.add(msg_id)
        self.dirty = True

    def note_departure(self, msg_id: str) -> None:
        self.pending_ids.discard(msg_id)
        self.index.pop(msg_id, None)
        self.absorbed.pop(msg_id, None)

    def absorb_pending(self) -> None:
        """Read the messages that events announced."""
        ids, self.pending_ids = self.pending_ids, set()
        for msg_id in ids:
            if msg_id in self.running:
                continue
            e = self._read(msg_id)
            if e is not None:
                self._put(e)

    def rescan(self) -> None:
        """Re-sync the index with ``que/`` (new, changed and vanished messages)."""
        seen: set[str] = set()
        for msg_id, path, _ in iter_entries(self.qdir, State.QUE, newest_first=False):
            seen.add(msg_id)
            old = self.index.get(msg_id)
            if old is not None:
                try:
                    if os.stat(path / "msg").st_mtime_ns == old.mtime_ns:
                        continue
                except OSError:
                    continue
            e = self._read(msg_id, path)
            if e is not None:
                self._put(e)
        for gone in set(self.index) - seen:
            del self.index[gone]
            self.absorbed.pop(gone, None)
        self.heap = [(e.due, sort_key(e.msg_id), e.msg_id) for e in self.index.values()]
        heapq.heapify(self.heap)
        self.needs_rescan = False

    def drop(self, msg_id: str) -> None:
        self.index.pop(msg_id, None)
        self.absorbed.pop(msg_id, None)

    def requeued(self, msg_id: str) -> None:
        """A message this daemon put back in que (resend, 111, parent failed): read it again.
        A duplicate heap entry is harmless: the stale copy is skipped when it surfaces."""
        self.absorbed.pop(msg_id, None)
        e = self._read(msg_id)
        if e is not None:
            self.index[msg_id] = e
            heapq.heappush(self.heap, (e.due, sort_key(e.msg_id), e.msg_id))
        self.dirty = True

    # -- scheduling ----------------------------------------------------------------------
    def block_key(self, params: tuple[str, ...]) -> tuple[str, ...] | None:
        bp = self.config.blocking_params if self.config else []
        return tuple(params[i - 1] for i in bp) if bp else None

    def next_runnable(self, now: float) -> tuple[Entry | None, float | None]:
        """The message to start now, or (None, when the head becomes due) — RQ's scheduler:
        order by due; with blocking_params skip messages whose tuple is already running."""
        skipped: list[tuple[float, tuple[str, int], str]] = []
        pick: Entry | None = None
        wake: float | None = None
        blocked = set(self.running_keys.values())
        while self.heap:
            due, key, msg_id = self.heap[0]
            e = self.index.get(msg_id)
            if e is None or e.due != due or msg_id in self.absorbed or msg_id in self.running:
                heapq.heappop(self.heap)
                if e is not None and e.due == due and msg_id in self.absorbed:
                    skipped.append((due, key, msg_id))  # comes back if its parent fails
                continue
            bk = self.block_key(e.params)
            if bk is not None and bk in blocked:
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
        return pick, wake

    def coalesce_with(self, parent: Entry) -> list[str]:
        """Queued messages whose coalesce params all match ``parent``'s (any due time)."""
        cp = self.config.coalesce_params if self.config else []
        if not cp:
            return []
        want = tuple(parent.params[i - 1] for i in cp)
        out = []
        for e in self.index.values():
            if e.msg_id == parent.msg_id or e.msg_id in self.absorbed or e.msg_id in self.running:
                continue
            if tuple(e.params[i - 1] for i in cp) == want:
                out.append(e.msg_id)
        for c in out:
            self.absorbed[c] = parent.msg_id
        return out
