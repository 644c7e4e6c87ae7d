"""A queue of :class:`~spoolq.store.base.Change` that any thread may post to and the
daemon's loop takes from, woken through a pipe it selects on (the memory store's and the
PostgreSQL store's watchers)."""

from __future__ import annotations

import os
import threading

from .base import Change


class ChangeQueue:
    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._pending: list[Change] = []
        self._closed = False

    def fileno(self) -> int:
        """Readable while changes are pending."""
        return self._r

    def post(self, changes: list[Change]) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending += changes
            try:
                os.write(self._w, b"!")
            except BlockingIOError:
                pass  # a wake-up is pending already

    def take(self) -> list[Change]:
        """Everything posted so far (never blocks)."""
        with self._lock:
            try:
                while os.read(self._r, 4096):
                    pass
            except BlockingIOError:
                pass
            out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._r)
                os.close(self._w)
