"""The daemon's events, for whoever listens in the same process: the notifier's channels
(spoolq/daemon/notifier.py) and the SSE stream (``GET /api/v1/events``).

An event is a small dict: ``{"event": "state", "queue", "msg_id", "state", "status", "at"}``
when the daemon starts a message (``run``) or stores an attempt's outcome (``done``,
``relayed``, ``err``, or ``que`` for a retry later); ``{"event": "admin", "queue", "state",
"was", "at"}`` when a queue's admin state changes; ``{"event": "queue_change", "queue",
"change": "created"|"deleted", "at"}``. Publishing never blocks: each subscriber has a bounded buffer,
and a subscriber that falls behind loses the oldest events (and is told how many).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


class Subscription:
    def __init__(self, bus: EventBus, maxlen: int, wake: Callable[[], None] | None,
                 kinds: frozenset[str] | None = None) -> None:
        self._bus = bus
        self._items: deque[Event] = deque(maxlen=maxlen)
        self._wake = wake
        self.kinds = kinds  # the "event" values it gets; None: every one
        self.dropped = 0

    def push(self, event: Event) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(event)
        if self._wake is not None:
            self._wake()

    def drain(self) -> list[Event]:
        out: list[Event] = []
        while True:
            try:
                out.append(self._items.popleft())
            except IndexError:
                return out

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: set[Subscription] = set()

    def subscribe(self, *, maxlen: int = 10000, wake: Callable[[], None] | None = None,
                  kinds: set[str] | frozenset[str] | None = None) -> Subscription:
        """Events from now on; only those whose ``event`` is in ``kinds`` when it is given
        (a thread that only needs to hear of new queues costs the daemon nothing per message)."""
        s = Subscription(self, maxlen, wake, None if kinds is None else frozenset(kinds))
        with self._lock:
            self._subs.add(s)
            self._recount()
        return s

    def unsubscribe(self, s: Subscription) -> None:
        with self._lock:
            self._subs.discard(s)
            self._recount()

    def _recount(self) -> None:
        self._all = any(s.kinds is None for s in self._subs)
        self._kinds = frozenset().union(*(s.kinds for s in self._subs if s.kinds is not None))

    _all = False
    _kinds: frozenset[str] = frozenset()

    @property
    def listening(self) -> bool:
        return bool(self._subs)

    def wants(self, kind: str) -> bool:
        """Does any subscriber take events of this kind? (Checked before building one: the
        daemon publishes two per message.)"""
        return self._all or kind in self._kinds

    def publish(self, event: Event) -> None:
        if not self._subs:  # nobody listens: no work
            return
        event.setdefault("at", round(time.time(), 3))
        with self._lock:
            subs = list(self._subs)
        kind = event.get("event")
        for s in subs:
            if s.kinds is None or kind in s.kinds:
                s.push(event)
