"""Waiting for a change in the PostgreSQL store: LISTEN on the ``spoolq`` channel.

The database sends ``msg <queue> <id>`` when a message appears, moves, is rewritten or
deleted, ``log <queue> <id>`` when its log grows, ``queue <name>`` when a queue changes
(triggers in sql/001_init.sql). A watch owns one connection, LISTENing from the moment it
is made, so nothing that commits after it is made can be missed.
"""

from __future__ import annotations

import time

from .connection import open_connection, storage_errors


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
