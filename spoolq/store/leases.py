"""Attempts and leases: how a daemon takes a message to run, on any store (issue 8).

A daemon **claims** the next runnable message of a queue (que -> run) and gets an
:class:`Attempt`: an id of its own and a lease that ends at ``expires_at``. It keeps the
lease with :meth:`~spoolq.store.base.Store.heartbeat` while the script runs, and ends the
attempt with ``finish``, which is **fenced**: it succeeds only while this attempt is the
message's current one. When a daemon dies its leases run out; another daemon's ``reclaim``
re-leases those attempts to itself (fencing out the dead one) and finishes them as crashed
(at-least-once, as on the filesystem). On the filesystem store a daemon's lease is its lock
on ``<root>/daemon.pid`` (one daemon per root), so a heartbeat extends nothing on disk there.

:func:`pick` is the scheduling rule both stores share (RQ's, as the daemon's index keeps it):
the queued message with the smallest (due, id) that is due, skipping messages whose
``blocking_params`` tuple is running already; the queued messages whose
``coalesce_params`` tuple equals the pick's are held as its duplicates.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import LeaseLost
from ..ids import sort_key
from ..model import Message, QueueConfig, State

Params = tuple[str, str, str, str]

SUCCESS = frozenset({State.DONE, State.RELAYED})
"""An attempt ending in these takes its held duplicates along; any other end releases them."""


@dataclass(frozen=True)
class Attempt:
    """One run of one message, held by ``owner`` until ``expires_at`` (the store's clock)."""

    queue: str
    msg_id: str
    attempt_id: str
    owner: str
    expires_at: float
    message: Message
    dups: tuple[str, ...] = ()  # coalesced duplicates held for this attempt
    cancel_requested: bool = False
    runner: str | None = None  # what the holder recorded about its process ("pid spawn_ns")


@dataclass(frozen=True)
class Lease:
    expires_at: float
    cancel_requested: bool


@dataclass(frozen=True)
class Candidate:
    msg_id: str
    due: float
    params: Params


def params_of(m: Message) -> Params:
    return (m.param1, m.param2, m.param3, m.param4)


def key_of(params: Params, numbers: Sequence[int]) -> tuple[str, ...] | None:
    return tuple(params[i - 1] for i in numbers) if numbers else None


def fenced_out(a: Attempt) -> LeaseLost:
    """The error of an attempt that no longer holds its message."""
    return LeaseLost(f"attempt {a.attempt_id} of {a.queue}/{a.msg_id} is no longer the message's (fenced out)")


class _AttemptIds:
    """Attempt ids unique among processes (a random prefix per process, made again in a
    forked child) and within one (a counter): a ``getrandom`` per start was part of the
    daemon's cost, and so would a ``getpid`` be."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = secrets.token_hex(4)
        self.seq = itertools.count()


_attempt_ids = _AttemptIds()
os.register_at_fork(after_in_child=_attempt_ids.reset)


def new_attempt_id(msg_id: str, count: int) -> str:
    ids = _attempt_ids
    return f"{msg_id}.{count}.{ids.prefix}{next(ids.seq):x}"


def at_cluster_limit(cfg: QueueConfig, running: int) -> bool:
    """The queue's ``cluster_workers`` (over every host) are all busy: claim nothing."""
    return cfg.cluster_workers is not None and running >= cfg.cluster_workers


def pick(queued: Iterable[Candidate], running: Iterable[Params], cfg: QueueConfig,
         now: float) -> tuple[Candidate | None, list[str], float | None]:
    """The message to start now, its duplicates to hold, and otherwise when the first
    blocked-free message becomes due (None: nothing queued that could run, or the queue's
    ``cluster_workers`` are all busy)."""
    running = list(running)
    if at_cluster_limit(cfg, len(running)):
        return None, [], None
    blocked = {key_of(p, cfg.blocking_params) for p in running} - {None}
    ordered = sorted(queued, key=lambda c: (c.due, sort_key(c.msg_id)))
    wake: float | None = None
    for c in ordered:
        if key_of(c.params, cfg.blocking_params) in blocked:
            continue
        if c.due > now:
            wake = c.due
            break
        want = key_of(c.params, cfg.coalesce_params)
        dups = [] if want is None else [
            o.msg_id for o in ordered if o.msg_id != c.msg_id and key_of(o.params, cfg.coalesce_params) == want]
        return c, dups, None
    return None, [], wake
