"""Waiting for a change in the PostgreSQL store: LISTEN.

On the ``spoolq`` channel the database sends ``msg <queue> <id>`` when a message appears,
moves, is rewritten or deleted, and ``log <queue> <id>`` when its log grows (triggers in
sql/001_init.sql): what ``wait``, ``log -f`` and the UI wait for. The daemons listen on
``spoolq_work`` instead, which carries only what a daemon acts on (sql/003_daemon_channel.sql):
``work <queue>``, ``cancel <queue> <id>``, ``queue <name>``. A watch owns one connection,
LISTENing from the moment it is made, so nothing that commits after it is made can be missed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..base import Change
from ..changes import ChangeQueue
from .connection import open_connection, storage_errors

log = logging.getLogger("spoolq.daemon")

BACKSTOP = 5.0
"""Seconds between the daemon watcher's looks at every queue, in case a notification was
lost (the connection dropped and came back)."""


class PgWatch:
    """Sleep until one of ``payloads`` is notified (or a timeout)."""

    def __init__(self, url: str, payloads: frozenset[str]) -> None:
        self._url = url
        self._payloads = payloads
        self._conn = open_connection(url)
        try:
            with storage_errors(url):
                self._conn.execute("LISTEN spoolq")
        except BaseException:
            self._conn.close()
            raise

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        with storage_errors(self._url):
            while (left := deadline - time.monotonic()) > 0:
                for n in self._conn.notifies(timeout=left, stop_after=1):
                    if n.payload in self._payloads:
                        return

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PgWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PgWatcher:
    """The daemon's feed (``PgStore.watch()``): a thread LISTENs on its own connection and
    wakes the daemon through a pipe (a stable fd, whatever happens to the connection);
    notifications become changes, and every :data:`BACKSTOP` seconds every queue is looked
    at again. A lost connection is opened again, and everything looked at after it."""

    def __init__(self, url: str, queues: Callable[[], list[str]]) -> None:
        self._url = url
        self._queues = queues
        self._queue = ChangeQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._next_look = time.monotonic() + BACKSTOP
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="spoolq-pg-listen", daemon=True)
        self._thread.start()
        self._ready.wait(15)  # LISTENing before the daemon's first claim, where the database allows

    def fileno(self) -> int:
        return self._queue.fileno()

    @property
    def wake_at(self) -> float | None:
        return self._next_look

    def _post(self, changes: list[Change]) -> None:
        self._queue.post(changes)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open_connection(self._url) as conn:
                    conn.execute("LISTEN spoolq_work")
                    self._ready.set()
                    self._post([Change("queues")])
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=1.0):
                            self._post(_change(n.payload))
            except Exception as e:  # noqa: BLE001 - the database is out of reach: try again
                self._ready.set()
                if not self._stop.is_set():
                    log.warning("PostgreSQL notifications: %s; listening again in 1 s", e)
                    self._stop.wait(1.0)

    def changes(self, budget: float = 0.004) -> list[Change]:
        out = self._queue.take()
        if time.monotonic() >= self._next_look:
            self._next_look = time.monotonic() + BACKSTOP
            out.append(Change("queues"))
            try:
                out += [Change("work", q) for q in self._queues()]
            except Exception as e:  # noqa: BLE001 - the database is out of reach: next look
                log.warning("PostgreSQL: cannot list the queues: %s", e)
        return out

    def want(self, queue: str, on: bool) -> None:
        return None  # the database answers claims: nothing to index

    def resync(self) -> None:
        self._next_look = 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._queue.close()


def _change(payload: str) -> list[Change]:
    """A ``spoolq_work`` notification as the daemon's changes."""
    kind, _, rest = payload.partition(" ")
    if kind == "work":
        return [Change("work", rest)]
    if kind == "cancel":
        queue, _, msg_id = rest.partition(" ")
        return [Change("cancel", queue, msg_id)]
    if kind == "queue":
        return [Change("queues"), Change("config", rest)]
    return []
