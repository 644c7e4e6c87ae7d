"""Connections of the PostgreSQL store: a pool, one transaction per store operation, and
database errors turned into spoolq's (every failure underneath is a StorageError).

A method that opens a transaction may call other methods of the store: they join it (the
transaction is kept per thread), so an operation made of smaller ones commits or rolls back
as one (``finish`` moves the message and its duplicates together).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
from psycopg import errors as pgerr
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from ...errors import DiskFull, StorageError

# Advisory lock keys (classid of the two-int form): one space per use, the objid says what.
HOST_LOCK = 1397772113  # objid: spoolq.hosts.id, held by a serving daemon's session
MIGRATE_LOCK = 1397772114  # objid 0: migrations
CLAIM_LOCK = 1397772115  # objid: hashtext(queue), claims of a queue with blocking/coalesce params
# 1397772116 was the lock of appends to one log: they now collide on its primary key instead
COUNTS_LOCK = 1397772117  # objid: hashtext(queue), compacting or rebuilding its count deltas
SINGLE_QUE_LOCK = 1397772118  # objid: hashtext(queue), single_que's look and create
RELAY_LOCK = 1397772119  # objid: hashtext(queue/key), a relay key's look-up and prep

Cursor = psycopg.Cursor[DictRow]


def safe_url(url: str) -> str:
    """``url`` without its password (in the user part or the query), fit to show users and
    scripts (``SPOOLQ_ROOT``): they get the password from ``~/.pgpass`` or ``PGPASSWORD``."""
    parts = urlsplit(url)
    creds, at, host = parts.netloc.rpartition("@")
    # Every secret libpq takes as a parameter: the password, and a client key's passphrase.
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k not in ("password", "sslpassword")])
    shown = f"{parts.scheme}://{creds.partition(':')[0]}{at}{host}{parts.path}"
    return f"{shown}?{query}" if query else shown


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """psycopg's errors as spoolq's: a full disk is DiskFull, anything else a StorageError."""
    try:
        yield
    except pgerr.DiskFull as e:
        raise DiskFull(f"the database {safe_url(url)} is out of space: {e}") from None
    except psycopg.OperationalError as e:
        raise StorageError(f"cannot use the database {safe_url(url)}: {e}") from None
    except psycopg.Error as e:
        raise StorageError(f"database error on {safe_url(url)}: {type(e).__name__}: {e}") from None


def open_connection(url: str) -> psycopg.Connection:
    """One connection outside the pool (LISTEN, the daemon's host lock), in autocommit."""
    with storage_errors(url):
        return psycopg.connect(url, autocommit=True, connect_timeout=10)


@contextmanager
def connect(url: str) -> Iterator[psycopg.Connection]:
    """:func:`open_connection` for one block (migrations, the schema check)."""
    conn = open_connection(url)
    with storage_errors(url), conn:
        yield conn


class Db:
    """A connection pool and the current transaction of each thread."""

    def __init__(self, url: str, *, max_size: int = 8) -> None:
        self.url = url
        self.pool = ConnectionPool(url, min_size=1, max_size=max_size, open=True, name="spoolq",
                                   kwargs={"autocommit": True, "connect_timeout": 10})
        self._local = threading.local()
        self._lazy: ConnectionPool | None = None
        self._lazy_lock = threading.Lock()

    @contextmanager
    def tx(self) -> Iterator[Cursor]:
        """A cursor in a transaction: this thread's current one if any, else a new one that
        commits when the block ends and rolls back when it raises."""
        cur: Cursor | None = getattr(self._local, "cur", None)
        if cur is not None:
            yield cur
            return
        with storage_errors(self.url), self.pool.connection() as conn, conn.transaction(), \
                conn.cursor(row_factory=dict_row) as cur:
            self._local.cur = cur
            try:
                yield cur
            finally:
                self._local.cur = None

    @property
    def in_transaction(self) -> bool:
        """Does this thread have a transaction open (``tx``)?"""
        return getattr(self._local, "cur", None) is not None

    @contextmanager
    def cursor(self) -> Iterator[Cursor]:
        """A cursor for reads: in this thread's transaction if any, else autocommit."""
        cur: Cursor | None = getattr(self._local, "cur", None)
        if cur is not None:
            yield cur
            return
        with storage_errors(self.url), self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    @contextmanager
    def lazy_cursor(self) -> Iterator[Cursor]:
        """A cursor whose statements commit without waiting for the WAL flush
        (``synchronous_commit = off``), for writes whose loss in a server crash is harmless:
        lease renewals and log appends. Such a commit is visible to all at once, and durable
        as soon as any later commit waits for its flush (the WAL is flushed in order), e.g.
        the finish that follows; the server's WAL writer flushes it within a fraction of a
        second anyway. In this thread's transaction, if any, it is that transaction's."""
        if getattr(self._local, "cur", None) is not None:
            with self.cursor() as cur:
                yield cur
            return
        with self._lazy_lock:
            if self._lazy is None:
                self._lazy = ConnectionPool(self.url, min_size=1, max_size=2, open=True, name="spoolq-lazy",
                                            kwargs={"autocommit": True, "connect_timeout": 10},
                                            configure=_lazy_commits)
        with storage_errors(self.url), self._lazy.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    def one(self, query: str, params: dict[str, Any]) -> DictRow | None:
        with self.cursor() as cur:
            return cur.execute(query, params).fetchone()

    def all(self, query: str, params: dict[str, Any]) -> list[DictRow]:
        with self.cursor() as cur:
            return cur.execute(query, params).fetchall()

    def close(self) -> None:
        self.pool.close()
        with self._lazy_lock:
            if self._lazy is not None:
                self._lazy.close()
                self._lazy = None


def _lazy_commits(conn: psycopg.Connection) -> None:
    conn.execute("SET synchronous_commit = off")
