"""The life the daemon's watching threads share (the isq spool, the fsq intake): an inotify
instance, a subscription to the daemon's events, a self-pipe that wakes the thread, and a
stop that joins it before anything it uses is closed."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from .. import inotify as ino
from ..events import Event, EventBus


def drain(fd: int) -> None:
    """Read a non-blocking fd (a wake-up pipe, a trigger FIFO) until it is empty."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class WatchThread:
    """Subclasses set ``thread_name`` and ``_run`` (which loops until ``_stop`` is set and
    selects on ``_ino.fd`` and ``_wake_r``), and may add to :meth:`_on_stop`."""

    thread_name = "spoolq-watch"

    def __init__(self, bus: EventBus | None) -> None:
        self.bus = bus
        self._ino: ino.Inotify | None = None
        self._sub: Any = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open_watch(self, kinds: frozenset[str] | None = None) -> ino.Inotify:
        self._ino = ino.Inotify()
        self._listen(kinds)
        return self._ino

    def _listen(self, kinds: frozenset[str] | None) -> None:
        """Hear the daemon's events of these kinds (None: all) from now on; the subscription
        is replaced only when they change (the new one first: no event falls between)."""
        if self.bus is None or (self._sub is not None and self._sub.kinds == kinds):
            return
        old, self._sub = self._sub, self.bus.subscribe(maxlen=1000, wake=self._wake, kinds=kinds)
        if old is not None:
            old.close()

    def _start_thread(self, run: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(30)
        if self._sub is not None:
            self._sub.close()
        self._on_stop()
        if self._ino is not None:
            self._ino.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _on_stop(self) -> None:
        """What a subclass closes once its thread has ended, before the inotify instance."""

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass  # full: a wake-up is pending already

    def _woken(self) -> list[Event]:
        """Empty the wake-up pipe; the daemon's events that came meanwhile."""
        drain(self._wake_r)
        return self._sub.drain() if self._sub is not None else []
