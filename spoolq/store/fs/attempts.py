"""The filesystem store's attempts: claim, heartbeat, fenced finish, reclaim (store/leases.py).

Part of :class:`~spoolq.store.fs.store.FsStore` (a chain of classes, one module per concern).
One daemon serves a spool root (it holds ``<root>/daemon.pid`` locked, D1), so its lease is
that lock: a heartbeat only checks the fence and looks for a cancel, and every attempt in
``run/`` that this daemon did not hand out belongs to a dead one and is reclaimed (only
while holding the lock). An attempt's id is kept
in ``<message>/attempt`` (unsynced, like ``pid``: after a power cut the whole run/ is
reclaimed anyway); finish reads it before the rename, which is the fence. Held coalesced
duplicates live in the daemon's memory, as they always have: a crash releases them.

This claim walks ``que/`` in full to choose (correct, O(queued)); the daemon's own index
(daemon/queue.py) is the fast path and moves in behind this method next (issue 8).
"""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ... import durable
from ...errors import CorruptMessage, MessageNotFound, SpoolqError
from ...model import AdminState, Message, State
from ..leases import SUCCESS, Attempt, Candidate, Lease, fenced_out, new_attempt_id, params_of, pick
from .layout import iter_entries, message_path
from .writing import WriteParts

ATTEMPT_FILE = "attempt"


class AttemptParts(WriteParts):
    """Attempts of messages in run: who holds each, and the fence on finishing."""

    def __init__(self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(root, clock=clock)
        self._held: dict[tuple[str, str], str] = {}  # (queue, duplicate id) -> the parent's attempt id
        self._mine: dict[tuple[str, str], str] = {}  # (queue, id) -> attempt id this store handed out

    def move(self, queue: str, msg_id: str, src: State, dst: State, **kw: Any) -> Message:
        m = super().move(queue, msg_id, src, dst, **kw)
        if src == State.QUE:
            self._held.pop((queue, msg_id), None)  # a held duplicate that left the queue is free
        return m

    def delete(self, queue: str, msg_id: str) -> None:
        super().delete(queue, msg_id)
        self._held.pop((queue, msg_id), None)

    def _messages(self, queue: str, state: State) -> builtins.list[tuple[str, Path, Message]]:
        out = []
        for msg_id, path, acked in iter_entries(self._existing_qdir(queue), state, newest_first=False):
            try:
                out.append((msg_id, path, self._read_msg(queue, state, path, acked)))
            except (CorruptMessage, MessageNotFound):
                continue  # set aside, or moved on while we looked
        return out

    def claim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> Attempt | float | None:
        now = self.clock() if now is None else now
        if self.admin_state(queue) != AdminState.UP:
            return None
        held = self._held
        queued = [Candidate(i, m.due, params_of(m)) for i, _, m in self._messages(queue, State.QUE)
                  if (queue, i) not in held]
        running = [params_of(m) for _, _, m in self._messages(queue, State.RUN)]
        chosen, dups, wake = pick(queued, running, self.queue_config(queue), now)
        if chosen is None:
            return wake
        attempt_id = new_attempt_id(chosen.msg_id, 0)
        self._mine[(queue, chosen.msg_id)] = attempt_id  # before the move: reclaim never takes it
        try:
            m = self.move(queue, chosen.msg_id, State.QUE, State.RUN, note="run")
            a = Attempt(queue, chosen.msg_id, attempt_id, owner, now + lease, m, tuple(dups))
            self._write_attempt(a)
        except BaseException:
            self._mine.pop((queue, chosen.msg_id), None)
            raise
        for d in dups:
            held[(queue, d)] = a.attempt_id
        return a

    def _write_attempt(self, a: Attempt) -> None:
        path = self.message_dir(a.queue, a.msg_id) / ATTEMPT_FILE
        durable.write_replace(path, json.dumps({"id": a.attempt_id, "owner": a.owner}).encode(), sync=False)

    def _current_dir(self, a: Attempt) -> Path:
        """The attempt's message directory, if the attempt is still the message's (the fence)."""
        try:
            state, path, _ = self.locate(a.queue, a.msg_id)
            current = json.loads((path / ATTEMPT_FILE).read_bytes()).get("id") if state == State.RUN else None
        except (MessageNotFound, OSError, ValueError, AttributeError):
            current = None
        if current != a.attempt_id:
            raise fenced_out(a)
        return path

    def heartbeat(self, attempt: Attempt, *, lease: float, runner: str | None = None,
                  now: float | None = None) -> Lease:
        now = self.clock() if now is None else now
        path = self._current_dir(attempt)
        if runner is not None:
            durable.write_replace(path / "pid", runner.encode() + b"\n", sync=False)
        return Lease(now + lease, (path / "cancel").exists())

    def finish(self, attempt: Attempt, dst: State, *, status: str,
               update: Callable[[Message], None] | None = None, note: str = "",
               dup_status: str | None = None) -> Message:
        self._current_dir(attempt)
        self.set_status(attempt.queue, attempt.msg_id, status)
        # The move first: if it fails (a full disk), the attempt still holds the message and
        # the caller's retry passes the fence; the marks are cleared once it has landed.
        m = self.move(attempt.queue, attempt.msg_id, State.RUN, dst, update=update, note=note)
        self._mine.pop((attempt.queue, attempt.msg_id), None)
        landed = message_path(self.qdir(attempt.queue), dst, attempt.msg_id)
        for name in (ATTEMPT_FILE, "pid", "cancel"):
            try:
                os.unlink(landed / name)
            except FileNotFoundError:
                pass  # never written, or the message moved on already
        held = self._held
        for d in attempt.dups:
            if held.get((attempt.queue, d)) != attempt.attempt_id:
                continue
            del held[(attempt.queue, d)]
            if dst in SUCCESS:
                try:
                    self.move(attempt.queue, d, State.QUE, dst, note=note or str(dst))
                    self.set_status(attempt.queue, d, dup_status if dup_status is not None else
                                    f"duplicate {attempt.msg_id}")
                except SpoolqError:
                    continue  # it left que meanwhile (deleted, cancelled): nothing to take along
        return m

    def reclaim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> builtins.list[Attempt]:
        """Only the daemon (the holder of ``daemon.pid``'s lock) reclaims: then every attempt in
        run that this store did not hand out belongs to a daemon that is gone."""
        now = self.clock() if now is None else now
        out: builtins.list[Attempt] = []
        if self._daemon_fd < 0:
            return out  # a live daemon may hold them: leave them alone
        for msg_id, path, m in self._messages(queue, State.RUN):
            if (queue, msg_id) in self._mine:
                continue  # ours, and alive
            try:
                runner: str | None = (path / "pid").read_text().strip() or None
            except OSError:
                runner = None
            a = Attempt(queue, msg_id, new_attempt_id(msg_id, m.count), owner, now + lease, m,
                        cancel_requested=(path / "cancel").exists(), runner=runner)
            self._write_attempt(a)
            self._mine[(queue, msg_id)] = a.attempt_id
            out.append(a)
        return out
