"""The PostgreSQL store's attempts: claim, heartbeat, fenced finish, reclaim, cancel.

The lease is a column (``lease_until``, epoch seconds on the database's clock), the fence
is the attempt id: every write an attempt makes is conditioned on ``attempt_id = $`` while
the row is locked, so once ``reclaim`` has given the message a new attempt id the old holder
can change nothing (docs/internals.md, the PostgreSQL store, "Leases and the fence").
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable

from psycopg.rows import DictRow

from ...errors import WrongState
from ...ids import sort_key, validate_msg_id, validate_queue_name
from ...model import AdminState, Message, QueueConfig, State, check_transition
from ..leases import SUCCESS, Attempt, Lease, at_cluster_limit, fenced_out, key_of
from .connection import CLAIM_LOCK, Cursor
from .messages import MessageParts, decoded
from .sql import Q


class AttemptParts(MessageParts):
    """Attempts of messages in run, leased to the daemons (hosts) that run them."""

    def claim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> Attempt | float | None:
        validate_queue_name(queue)
        p = {"queue": queue, "owner": owner, "lease": lease, "now": now, "blocking": []}
        with self.db.cursor() as cur:  # the common case: one statement, its own transaction
            got = cur.execute(Q.claim_plain, p).fetchone()
        if got is not None:
            return self._claimed(queue, owner, got)
        # The queue's row is read on its own, as it was inside the transaction (read committed,
        # no lock): a pause committed meanwhile is seen by the next claim either way.
        row = self._queue_row(queue)
        if AdminState.of_flags(row["paused"], row["down"]) != AdminState.UP:
            return None
        cfg = QueueConfig.from_dict(row["config"])
        p = {"queue": queue, "owner": owner, "lease": lease, "now": now, "blocking": cfg.blocking_params}
        if not (cfg.blocking_params or cfg.coalesce_params or cfg.cluster_workers):
            # claim_plain found nothing due: only when the next message will be. One that
            # commits meanwhile is NOTIFYed, and the daemon claims again.
            wake = self.db.one(Q.claim_wake, p)
            return None if wake is None else wake["wake"]
        with self.db.tx() as cur:
            # Claims of this queue take turns: the next claimer's query sees what this one
            # started (blocking params and cluster_workers hold across hosts) and which
            # duplicates it holds.
            cur.execute(Q.claim_lock, {"lock": CLAIM_LOCK, "queue": queue})
            if cfg.cluster_workers:
                n = cur.execute(Q.running_count, {"queue": queue}).fetchone()
                if at_cluster_limit(cfg, n["n"] if n else 0):
                    return None
            got = cur.execute(Q.claim, p).fetchone()
            if got is None:
                wake = cur.execute(Q.claim_wake, p).fetchone()
                return None if wake is None else wake["wake"]
            return self._claimed(queue, owner, got, self._hold_dups(cur, queue, cfg, got))

    _fenced: tuple[str, float, list[str]] = ("", 0.0, [])
    """The attempt whose fence was read last, when (monotonic), and its attachments' names:
    a claim, or ``workdir`` (store.py) reading it again."""

    def _claimed(self, queue: str, owner: str, got: DictRow, dups: tuple[str, ...] = ()) -> Attempt:
        self._fenced = (got["attempt_id"], time.monotonic(), got["names"])
        return Attempt(queue, got["msg_id"], got["attempt_id"], owner, got["lease_until"], decoded(got), dups,
                       got["cancel_requested"])

    @staticmethod
    def _hold_dups(cur: Cursor, queue: str, cfg: QueueConfig, parent: DictRow) -> tuple[str, ...]:
        """The parent's queued duplicates (same coalesce key), now held by it (leases.pick)."""
        key = key_of((parent["param1"], parent["param2"], parent["param3"], parent["param4"]), cfg.coalesce_params)
        if key is None:
            return ()
        rows = cur.execute(Q.claim_hold_dups, {"queue": queue, "parent": parent["msg_id"],
                                               "coalesce": cfg.coalesce_params, "key": list(key)}).fetchall()
        return tuple(r["msg_id"] for r in sorted(rows, key=lambda r: (r["due"], sort_key(r["msg_id"]))))

    def heartbeat(self, attempt: Attempt, *, lease: float, runner: str | None = None,
                  now: float | None = None) -> Lease:
        # One statement (no BEGIN and COMMIT round trips) that does not wait for the WAL flush:
        # a renewal lost in a server crash is a shorter lease, which the fence makes safe.
        with self.db.lazy_cursor() as cur:
            row = cur.execute(Q.heartbeat, {"queue": attempt.queue, "msg_id": attempt.msg_id,
                                            "attempt_id": attempt.attempt_id, "lease": lease, "now": now,
                                            "runner": runner}).fetchone()
        if row is None:
            raise fenced_out(attempt)
        return Lease(row["lease_until"], row["cancel_requested"])

    def finish(self, attempt: Attempt, dst: State, *, status: str | None,
               update: Callable[[Message], None] | None = None, note: str = "",
               dup_status: str | None = None, dup_of: str | None = None) -> Message:
        """One transaction: the fence (the row locked while it still names this attempt),
        the status, the held duplicates, the move. A failure anywhere changes nothing, so the
        attempt still holds the message and a retry passes the fence. Without ``update`` (the
        message itself unchanged: the common end) all of it is one statement: ``finish_simple``
        when the attempt holds no duplicates, else ``finish_move``."""
        key = {"queue": attempt.queue, "msg_id": attempt.msg_id}
        dup_note = f"duplicate of {dup_of}" if dup_of else (note or str(dst))
        dup_status = f"duplicate {dup_of or attempt.msg_id}" if dup_status is None else dup_status
        if update is None:
            check_transition(State.RUN, dst)
            p = {**key, "attempt_id": attempt.attempt_id, "dst": str(dst), "note": note,
                 "set_status": status is not None, "status": status}
            with self.db.cursor() as cur:
                if not attempt.dups:  # it holds none: only its claim could have given it some
                    row = cur.execute(Q.finish_simple, p).fetchone()
                else:
                    row = cur.execute(Q.finish_move, {**p, "success": dst in SUCCESS, "dup": dup_of,
                                                      "dup_note": dup_note, "dup_status": dup_status}).fetchone()
            if row is None:
                raise fenced_out(attempt)
            return decoded(row)
        with self.db.tx() as cur:
            if cur.execute(Q.fence, {**key, "attempt_id": attempt.attempt_id}).fetchone() is None:
                raise fenced_out(attempt)
            if status is not None:
                cur.execute(Q.message_set_status, {**key, "status": status})
            if dst in SUCCESS:
                cur.execute(Q.dups_finish, {"queue": attempt.queue, "parent": attempt.msg_id, "dst": str(dst),
                                            "note": dup_note, "dup": dup_of, "status": dup_status})
            return self.move(attempt.queue, attempt.msg_id, State.RUN, dst, update=update, note=note)

    def reclaim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> builtins.list[Attempt]:
        validate_queue_name(queue)
        with self.db.tx() as cur:
            rows = cur.execute(Q.reclaim, {"queue": queue, "owner": owner, "lease": lease, "now": now}).fetchall()
        if not rows:
            self._require_queue(queue)
        return [Attempt(queue, r["msg_id"], r["attempt_id"], owner, r["lease_until"], decoded(r), tuple(r["dups"]),
                        r["cancel_requested"], r["runner"]) for r in rows]

    def cancel(self, queue: str, msg_id: str) -> State:
        with self.db.tx() as cur:
            state = self._locked(cur, queue, msg_id)["state"]
            if state == State.QUE:
                self.move(queue, msg_id, State.QUE, State.ERR, note="cancelled")
                self.set_status(queue, msg_id, "cancelled")
                return State.ERR
            if state != State.RUN:
                raise WrongState(f"message {queue}/{msg_id} is in {state}: only queued or running "
                                 "messages can be cancelled")
            cur.execute(Q.cancel_request, {"queue": queue, "msg_id": validate_msg_id(msg_id)})
            return State.RUN
