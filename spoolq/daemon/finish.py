"""The end of an attempt, and what happens when the disk refuses it.

A :class:`Finish` is an attempt's outcome, decided once and kept in memory until it is
stored. :meth:`Finisher.settle` makes it happen: first the webhook messages, then
``Store.finish`` (docs/internals.md, "The run state": the final status text, removal of
``pid`` and ``cancel``, the commit point, the one move out of ``run/``, and last the
coalesced duplicates), which is fenced by the attempt's id.

If a step fails (disk full while rewriting ``msg``, EIO, anything), the Finish is *held*:
retried after 1 s, 2 s, 4 s ... at most 60 s apart, from the daemon's loop, while every
other queue goes on. The message stays in ``run/`` meanwhile, which is exactly where a
crash would leave it (recovery would re-run it: at-least-once), so holding loses nothing,
and once space returns it reaches its state without a restart. Each step records that it
is done, so a retry does not queue a webhook twice.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import builtin, durable, fsq, httpjob
from ..errors import (
    CorruptMessage,
    MessageNotFound,
    QueueNotFound,
    SpoolqError,
    StorageError,
    WrongState,
)
from ..model import Message, QueueConfig, State
from ..runner.protocol import Outcome
from ..store.base import Store
from ..store.leases import Attempt
from .stats import JobStats

log = logging.getLogger("spoolq.daemon")

WEBHOOK_QUEUE = "webhook"
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
"""Seconds before the first retry of a held finish, and the most between two retries."""
WEBHOOK_PLACEHOLDER = "webhook-placeholder"
"""The script earlier versions gave the webhook queue (it sent nothing)."""


@dataclass
class Finish:
    """One attempt's way out of ``run``: where to, and how far it got."""

    attempt: Attempt
    outcome: Outcome
    note: str = ""
    current_status: str | None = None  # what the status says now; None: unknown
    # Set when it ends a job of this daemon: the supervisor frees the worker slot after it.
    pid: int | None = None
    exit_code: int = 0
    took: float = 0.0  # seconds the script ran
    # Progress, kept across retries.
    due: float | None = None  # for a requeue: fixed at the first try
    hooks_queued: int = 0
    mirrored: bool = False  # kind fsq: the item is in the fsq queue's done/ or fail/
    tries: int = 0
    retry_at: float = 0.0

    @property
    def queue(self) -> str:
        return self.attempt.queue

    @property
    def msg(self) -> Message:
        return self.attempt.message  # as stored at the claim (the daemon alone changes it in run)

    @property
    def msg_id(self) -> str:
        return self.attempt.msg_id


class Finisher:
    """Applies outcomes, and holds the ones the store refused until it takes them."""

    def __init__(self, store: Store, home: Path, full_id: Callable[[str, str], str], clock: Callable[[], float],
                 stats: JobStats) -> None:
        self.store = store
        self.home = home
        self.full_id = full_id
        self.clock = clock
        self.stats = stats
        self.held: list[Finish] = []
        self.fsq = fsq.HeldCache()  # kind fsq: the hold directories, kept open

    # -- settling and retrying -----------------------------------------------------------
    def settle(self, fin: Finish) -> bool:
        """Make ``fin`` happen; if anything fails, hold it for a retry. True when done."""
        try:
            self._commit(fin)
        except Exception as e:  # noqa: BLE001 - one message must never take the daemon down
            self._hold(fin, e)
            return False
        return True

    def retry(self, now: float, ready: Callable[[str], bool]) -> list[Finish]:
        """Try every held finish that is due again; returns those that are now done.
        ``ready(queue)`` False postpones a queue's (its start-up recount holds the counts lock)."""
        done: list[Finish] = []
        for fin in [f for f in self.held if f.retry_at <= now]:
            if not ready(fin.queue):
                fin.retry_at = now + RETRY_FIRST
                continue
            try:
                self._commit(fin)
            except Exception as e:  # noqa: BLE001 - as in settle
                self._hold(fin, e)
                continue
            self.held.remove(fin)
            log.warning("%s/%s: finished (%s) at try %d", fin.queue, fin.msg_id, fin.outcome.state,
                        fin.tries + 1)
            done.append(fin)
        return done

    def next_retry(self) -> float | None:
        return min((f.retry_at for f in self.held), default=None)

    def _hold(self, fin: Finish, e: Exception) -> None:
        fin.tries += 1
        wait = min(RETRY_MAX, RETRY_FIRST * 2 ** min(fin.tries - 1, 16))
        fin.retry_at = self.clock() + wait
        if fin not in self.held:
            self.held.append(fin)
        where = f"{fin.queue}/{fin.msg_id}"
        if fin.tries > 1:
            log.debug("%s: try %d to finish failed: %s; next in %g s", where, fin.tries, e, wait)
            return
        log.error("%s: cannot finish the attempt (-> %s): %s; the outcome is kept in memory and "
                  "tried again in %g s, then with backoff up to %g s (it stays in run meanwhile)",
                  where, fin.outcome.state, e, wait, RETRY_MAX,
                  exc_info=not isinstance(e, (StorageError, OSError)))  # anything else is a bug

    # -- the steps -----------------------------------------------------------------------
    def _commit(self, fin: Finish) -> None:
        queue, msg, outcome = fin.queue, fin.msg, httpjob.final_row(fin.msg, fin.outcome)
        msg_id = msg.msg_id
        dups = fin.attempt.dups
        finished_ok = outcome.state in (State.DONE, State.RELAYED)
        if outcome.state == State.QUE and fin.due is None:
            fin.due = self.clock() + outcome.requeue_delay
        due = fin.due

        def update(m: Message) -> None:
            m.count = outcome.count
            if due is not None:
                m.due = due
            if finished_ok and dups:
                m.dups = [self.full_id(queue, d) for d in dups]
            if outcome.params_update:
                m.params = {**m.params, **outcome.params_update}

        if outcome.state.final and fin.hooks_queued < len(msg.post_run_webhook):
            final = Message.from_dict(msg.to_dict())
            update(final)
            self._webhooks(fin, final)
        if outcome.state.final and not fin.mirrored and isinstance(msg.params.get("fsq"), dict):
            self._fsq_outcome(fin)
            fin.mirrored = True
        changed = (outcome.count != msg.count or outcome.state == State.QUE or (finished_ok and bool(dups))
                   or bool(outcome.params_update))
        status = None if outcome.status == fin.current_status else outcome.status
        try:
            # No rewrite of msg when nothing in it changes: one fsync'd write fewer per message
            # (the store group-commits such a move).
            self.store.finish(fin.attempt, outcome.state, status=status, update=update if changed else None,
                              note=fin.note or outcome.state.value, dup_of=self.full_id(queue, msg_id))
        except (WrongState, MessageNotFound, QueueNotFound, CorruptMessage) as e:
            # Not where this daemon left it (moved or deleted by hand, or fenced out by
            # another host): nothing to retry.
            log.warning("%s/%s: cannot move to %s: %s", queue, msg_id, outcome.state, e)
            return
        fin.current_status = outcome.status
        if fin.pid is not None:
            self.stats.finished(queue, str(outcome.state), fin.took)
            log.debug("%s/%s: pid %d exit %d after %.3f s -> %s%s", queue, msg_id, fin.pid, fin.exit_code,
                      fin.took, outcome.state, f" - {outcome.status}" if outcome.status else "")

    def _fsq_outcome(self, fin: Finish) -> None:
        """Kind fsq: move the held item into its fsq queue's ``done/`` (done, relayed) or
        ``fail/`` (err), named with tries = the message's count, before the message moves, so
        fsq's tools see the outcome. One rename, not fsync'd: the message's state is the
        record, and the intake's sweep moves the item of a finished message that a crash
        left held. Only the item held under this message's id moves, and only in the queue's
        own fsq directory. An item or directory gone is logged and skipped: the message's
        own outcome matters more."""
        queue, msg = fin.queue, fin.msg
        which = "fail" if fin.outcome.state == State.ERR else "done"
        try:
            fsq_dir, _ = fsq.message_item(msg)
            cfg = self.store.queue_config(queue)
            if cfg.kind != "fsq" or cfg.fsq_dir != fsq_dir:
                return  # a message naming another directory: nothing of it is held anywhere
            name, _earlier = fsq.outcome_names(msg)
            self.fsq.run(fsq_dir, queue, lambda h: h.release(msg.msg_id, name, which, sync=False))
        except (ValueError, fsq.FsqError, QueueNotFound) as e:
            log.warning("%s/%s: not put into the fsq queue's %s/: %s", queue, msg.msg_id, which, e)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise durable.storage_error(e, f"cannot put the item into the fsq queue's {which}/") from None
            log.warning("%s/%s: not put into the fsq queue's %s/: %s", queue, msg.msg_id, which, e)

    def _webhooks(self, fin: Finish, msg: Message) -> None:
        """One message in the local ``webhook`` queue per ``post_run_webhook`` URL (rq-spec 3.3).

        A storage failure holds the finish (the webhooks not yet queued are queued at the
        retry); any other refusal (the webhook queue is DOWN...) drops that webhook, logged.
        """
        if fin.queue == WEBHOOK_QUEUE:
            fin.hooks_queued = len(msg.post_run_webhook)
            return
        data = msg.to_dict()
        data["msg_id"] = self.full_id(fin.queue, msg.msg_id)
        data["state"] = str(fin.outcome.state)
        data.pop("history", None)
        payload = json.dumps(data, separators=(",", ":"))
        try:
            self.ensure_webhook_queue()
        except OSError as e:
            raise durable.storage_error(e, "cannot create the webhook queue") from None
        while fin.hooks_queued < len(msg.post_run_webhook):
            url = msg.post_run_webhook[fin.hooks_queued]
            try:
                self.store.create(WEBHOOK_QUEUE, Message(dest=WEBHOOK_QUEUE, param1=url, param2=payload,
                                                         src=data["msg_id"]))
            except StorageError:
                raise
            except SpoolqError as e:
                log.error("%s/%s: cannot queue webhook %s: %s", fin.queue, msg.msg_id, url, e)
            fin.hooks_queued += 1

    def ensure_webhook_queue(self) -> None:
        """The ``webhook`` queue, with spoolq's sender (spoolq/builtin/webhook.py) as its
        script; one that still has the placeholder of earlier versions gets the sender
        (its admin state is left as it is)."""
        sender = builtin.script(self.home, "webhook")
        if WEBHOOK_QUEUE in self.store.queues():
            cfg = self.store.queue_config(WEBHOOK_QUEUE)
            if Path(cfg.script).name == WEBHOOK_PLACEHOLDER:
                self.store.update_queue(QueueConfig.from_dict({**cfg.to_dict(), "script": str(sender)}))
                log.warning("the webhook queue now runs spoolq's sender (%s); it is %s", sender,
                            self.store.admin_state(WEBHOOK_QUEUE))
            return
        builtin.ensure_queue(self.store, self.home, WEBHOOK_QUEUE)
