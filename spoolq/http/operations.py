"""Bulk actions as background operations with live progress and a truthful result.

An audit deleted 100,000 messages through the UI: one request ran for 226 s and then said
"100000 of 100000" while 99,985 remained. Now a bulk action is an :class:`Operation`: it
runs in a thread of the server, walks the state in slices (``Store.find_ids`` with a scan
limit, so no step holds anything for long), acts as it goes, and counts exactly what it
examined, matched, did and failed; ``GET /api/v1/operations/<id>`` shows it while it runs.

A ``count`` operation acts on nothing: it finds what a filter matches and keeps the ids,
so that the UI can say "312 messages match" and then act on exactly those (``ids_from``).
Operations live in the server's memory: a restart forgets them (what they did stays done).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..client import Client
from ..errors import InvalidInput, NotFound, SpoolqError
from ..model import State
from .actions import ACTIONS, act
from .errors import ServiceBusy

log = logging.getLogger("spoolq.http")

SCAN_SLICE = 5000
"""Messages examined per step of a walk (a fraction of a second each)."""
BATCH = 500
"""Matches acted on per step."""
MAX_SELECTION = 1_000_000
"""Ids a count keeps for a later action; past that the action re-runs the filter."""
MAX_RUNNING = 2
KEEP_FINISHED = 50
MAX_FAILURES_SHOWN = 100
OPERATION_ACTIONS = (*ACTIONS, "count")


class OperationNotFound(NotFound):
    code = "operation_not_found"


@dataclass
class Operation:
    """One bulk action over a queue's state; every counter is exact when it ends."""

    id: str
    queue: str
    state: State
    filter: str
    action: str
    total: int  # messages in the state when it started (the counts cache)
    ids_from: str | None = None
    then: str | None = None  # for a count: the action the UI offers next, on what it found
    status: str = "running"  # running, done, cancelled, failed
    scanned: int = 0
    matched: int = 0
    succeeded: int = 0
    failures: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    error: str = ""
    remaining: int | None = None  # messages left in the state when it ended
    started: float = field(default_factory=time.time)
    finished: float | None = None
    selection: list[str] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "queue": self.queue, "state": str(self.state), "filter": self.filter,
            "action": self.action, "ids_from": self.ids_from, "then": self.then, "status": self.status,
            "total": self.total,
            "scanned": self.scanned, "matched": self.matched, "succeeded": self.succeeded,
            "failures": self.failures, "failed": list(self.failed), "error": self.error,
            "remaining": self.remaining, "started": self.started, "finished": self.finished,
            "selection_kept": self.selection is not None and self.status == "done",
            "url": f"/api/v1/operations/{self.id}",
        }

    def note_failure(self, msg_id: str, e: SpoolqError) -> None:
        self.failures += 1
        if len(self.failed) < MAX_FAILURES_SHOWN:
            self.failed.append({"msg_id": msg_id, "code": e.code, "message": e.message})


class Operations:
    """The server's operations: started here, run on threads, kept for a while after."""

    def __init__(self, client: Client, *, max_running: int = MAX_RUNNING) -> None:
        self.client = client
        self.max_running = max_running
        self._ops: dict[str, Operation] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def start(self, queue: str, state: State, filter: str | None, action: str,
              ids_from: str | None = None, then: str | None = None) -> Operation:
        """Start ``action`` over every message of ``queue`` in ``state`` that ``filter``
        matches (or over the ids a finished count ``ids_from`` found)."""
        if action not in OPERATION_ACTIONS:
            raise InvalidInput(f"unknown action {action!r}: use one of {', '.join(OPERATION_ACTIONS)}")
        if then is not None and (action != "count" or then not in ACTIONS):
            raise InvalidInput(f"'then' is for a count, and one of {', '.join(ACTIONS)}")
        selection: list[str] | None = None
        if ids_from:
            source = self.get(ids_from)
            if source.action != "count" or source.status != "done":
                raise InvalidInput(f"operation {ids_from} is not a finished count")
            if (source.queue, source.state) != (queue, state):
                raise InvalidInput(f"operation {ids_from} counted {source.queue}/{source.state}, "
                                   f"not {queue}/{state}")
            if source.selection is None:
                raise InvalidInput(f"operation {ids_from} matched more than {MAX_SELECTION} messages; "
                                   "act with its filter instead")
            selection, filter = list(source.selection), source.filter
        total = self.client.counts(queue).get(str(state), 0)  # QueueNotFound here, not in the thread
        op = Operation(id=secrets.token_hex(8), queue=queue, state=state, filter=filter or "", action=action,
                       total=total, ids_from=ids_from or None, then=then)
        with self._lock:
            running = sum(1 for o in self._ops.values() if o.status == "running")
            if running >= self.max_running:
                raise ServiceBusy(f"{running} bulk operations are running; wait for one to end")
            self._ops[op.id] = op
            self._forget_old()
        threading.Thread(target=self._run, args=(op, selection), name=f"spoolq-op-{op.id}", daemon=True).start()
        return op

    def get(self, op_id: str) -> Operation:
        with self._lock:
            op = self._ops.get(op_id)
        if op is None:
            raise OperationNotFound(f"no operation {op_id} (operations are forgotten at restart)")
        return op

    def recent(self) -> list[Operation]:
        with self._lock:
            return sorted(self._ops.values(), key=lambda o: o.started, reverse=True)

    def wait(self, op_id: str, timeout: float) -> Operation:
        """The operation, once it has ended or ``timeout`` seconds have passed."""
        op = self.get(op_id)
        with self._changed:
            self._changed.wait_for(lambda: op.status != "running", timeout)
        return op

    def cancel(self, op_id: str) -> Operation:
        op = self.get(op_id)
        op.cancel.set()
        return op

    def _forget_old(self) -> None:
        done = [o for o in self._ops.values() if o.status != "running"]
        for o in sorted(done, key=lambda o: o.started)[:max(0, len(done) - KEEP_FINISHED)]:
            del self._ops[o.id]

    # -- the work ---------------------------------------------------------------------------
    def _run(self, op: Operation, selection: list[str] | None) -> None:
        status, error = "failed", "interrupted"
        try:
            if selection is not None:
                self._act_on(op, selection)
            else:
                self._walk(op)
            status, error = ("cancelled" if op.cancel.is_set() else "done"), ""
        except SpoolqError as e:
            error = e.message
        except Exception as e:  # noqa: BLE001 - a bug must end the operation, not hang it
            log.exception("bulk operation %s failed", op.id)
            error = f"internal error: {e}"
        finally:
            try:
                op.remaining = self.client.counts(op.queue).get(str(op.state), 0)
            except SpoolqError:
                op.remaining = None
            op.finished = time.time()
            # The status last: whoever sees the operation ended sees all of its outcome
            # (a poller once saw "done" with "remaining" still null).
            with self._changed:
                op.error = error
                op.status = status
                self._changed.notify_all()

    def _walk(self, op: Operation) -> None:
        """Find the matches slice by slice, acting on each batch as it is found."""
        cursor: str | None = None
        if op.action == "count":
            op.selection = []
        while not op.cancel.is_set():
            page = self.client.find_ids(op.queue, op.state, filter=op.filter or None, cursor=cursor,
                                        limit=BATCH, scan_limit=SCAN_SLICE)
            op.scanned += page.scanned
            op.matched += len(page.ids)
            if op.action == "count":
                if op.selection is not None:
                    op.selection.extend(page.ids)
                    if len(op.selection) > MAX_SELECTION:
                        op.selection = None
                op.succeeded += len(page.ids)
            else:
                self._act(op, page.ids)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def _act_on(self, op: Operation, ids: list[str]) -> None:
        for i in range(0, len(ids), BATCH):
            if op.cancel.is_set():
                return
            batch = ids[i:i + BATCH]
            op.scanned += len(batch)
            op.matched += len(batch)
            self._act(op, batch)

    def _act(self, op: Operation, ids: list[str]) -> None:
        if op.action == "delete":
            # Only those still in the state the operation is over: one retried, acked or
            # moved since it was listed is not this operation's to delete (audit).
            failures = self.client.delete_many(op.queue, ids, state=op.state)
            for msg_id, e in failures:
                op.note_failure(msg_id, e)
            op.succeeded += len(ids) - len(failures)
            return
        one: Callable[[str], Any] = lambda msg_id: act(self.client, op.queue, msg_id, op.action)  # noqa: E731
        for msg_id in ids:
            if op.cancel.is_set():
                return
            try:
                one(msg_id)
                op.succeeded += 1
            except SpoolqError as e:
                op.note_failure(msg_id, e)
