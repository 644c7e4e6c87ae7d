"""The PostgreSQL store: many hosts share queues through one database (issue 8).

``PgStore(url)`` keeps the Store protocol on PostgreSQL through psycopg 3 and its pool:
queues, messages, attachments and logs are rows (sql/001_init.sql); claims use
``FOR UPDATE SKIP LOCKED``; leases and their fence are columns; changes are NOTIFYed.
The tables, the invariants and the lease/fence argument are in docs/internals.md ("The
PostgreSQL store"). Built as a chain, one module per concern: ``queues.py`` <-
``messages.py`` <- ``attempts.py`` <- this module (attachments and logs read back, watches,
local directories).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from psycopg import errors as pgerr

from ...errors import AttachmentNotFound, LogNotFound, StorageError
from ...ids import log_name_ok, validate_attachment_name, validate_msg_id, validate_queue_name
from ...model import Message, State
from ..base import SweepResult
from ..leases import Attempt, fenced_out
from ..local import LogPump, Trash, materialize
from ..scratch import ScratchDirs
from .attempts import AttemptParts
from .blobs import CHUNK, Rows, chunk_file, overlap
from .connection import RELAY_LOCK, storage_errors
from .sql import Q
from .watch import PgWatch, PgWatcher

RELAY_KEY_DAYS = 7  # as the filesystem store's (store/fs/relaykeys.py)

log = logging.getLogger("spoolq.daemon")

LOG_DRAIN = 2.0
"""Seconds a finish waits for the script's output pipe to be read to its end."""
FENCE_REUSE = 1.0
"""Seconds a fence read by a claim or ``workdir`` also stands for ``workdir`` and ``log_fd`` of
the same attempt. A lease lost meanwhile is caught all the same: the next heartbeat gets
LeaseLost, the finish is fenced."""
APPEND_TRIES = 100
"""Tries of one log append that other appenders keep beating to the log's end."""


class PgStore(AttemptParts):
    """A spoolq store in a PostgreSQL database (migrated by ``spoolq db migrate``)."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        super().__init__(url, pool_size=pool_size)
        self._scratch = ScratchDirs("spoolq-pg-")
        self.local_dir: Path | None = None  # where scripts run on this host (serve: <home>/work)
        self._pump: LogPump | None = None
        self._trash: Trash | None = None
        self._drained: dict[str, threading.Event] = {}  # attempt id -> its log pipe read to the end

    def close(self) -> None:
        if self._pump is not None:
            self._pump.close()
            self._pump = None
        if self._trash is not None:
            self._trash.close()
            self._trash = None
        super().close()
        self._scratch.cleanup()

    # -- attachments ----------------------------------------------------------------------------
    def open_attachment(self, queue: str, msg_id: str, name: str) -> BinaryIO:
        """The attachment, read a chunk at a time as the caller reads."""
        validate_attachment_name(name)
        key = {"queue": queue, "msg_id": msg_id, "name": name}
        self.state_of(queue, msg_id)
        row = self.db.one(Q.attachment_size, key)
        if row is None:
            raise AttachmentNotFound(f"Message ID attachment '{name}' not found")
        size: int = row["size"]

        def fetch(start: int, stop: int) -> Rows:
            return [(r["off"], r["data"]) for r in self.db.all(Q.attachment_read, {**key, "start": start,
                                                                                     "stop": stop})]

        return chunk_file(fetch, lambda: size)

    # -- logs -----------------------------------------------------------------------------------
    def _log_key(self, queue: str, msg_id: str, name: str) -> dict[str, str]:
        """The log's key; LogNotFound for a name no log can have, the missing message's error."""
        if not log_name_ok(name):
            raise LogNotFound(f"Message ID log '{name}' not found")
        self.state_of(queue, msg_id)
        return {"queue": queue, "msg_id": msg_id, "name": name}

    def _log_end(self, key: dict[str, str]) -> int | None:
        row = self.db.one(Q.log_end, key)
        return None if row is None else int(row["size"])

    def _log_rows(self, key: dict[str, str], start: int, stop: int) -> Rows:
        return [(r["off"], r["data"]) for r in self.db.all(Q.log_read, {**key, "start": start, "stop": stop})]

    def open_log(self, queue: str, msg_id: str, name: str = "stdio.log") -> BinaryIO:
        """The log as a seekable file; reading at its end again returns what was appended
        since (``log -f``). LogNotFound before its first write."""
        key = self._log_key(queue, msg_id, name)
        if self._log_end(key) is None:
            raise LogNotFound(f"Message ID log '{name}' not found")
        return chunk_file(lambda start, stop: self._log_rows(key, start, stop), lambda: self._log_end(key) or 0)

    def append_log(self, queue: str, msg_id: str, data: bytes, name: str = "stdio.log") -> int:
        """Append to the message's log (in chunks of at most 1 MiB, all in one statement);
        returns its new end.

        No lock: the statement reads the log's end and inserts after it. Two appends that
        read the same end collide on the primary key; the second fails once the first has
        committed, and reads the end again. Inside a transaction the try is a savepoint."""
        if not data:
            key = self._log_key(queue, msg_id, name)
            return self._log_end(key) or 0
        if not log_name_ok(name):
            raise LogNotFound(f"Message ID log '{name}' not found")
        p = {"queue": validate_queue_name(queue), "msg_id": validate_msg_id(msg_id), "name": name,
             "rels": list(range(0, len(data), CHUNK)),
             "datas": [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]}
        for _ in range(APPEND_TRIES):
            # This thread's transaction, if any; else a commit that does not wait for the WAL
            # flush: the finish that ends the attempt waits for the log (LOG_DRAIN) and its
            # own flush makes the log durable with it (Db.lazy_cursor).
            with self.db.lazy_cursor() as cur:
                try:
                    if self.db.in_transaction:
                        with cur.connection.transaction():  # a savepoint: a collision undoes only this try
                            rows = cur.execute(Q.log_append, p).fetchall()
                    else:
                        rows = cur.execute(Q.log_append, p).fetchall()
                except pgerr.UniqueViolation:
                    continue  # another append took this end first: read it again
                except pgerr.ForeignKeyViolation:
                    break
            return max(int(r["size"]) for r in rows)
        else:
            raise StorageError(f"log {name} of {queue}/{msg_id}: {APPEND_TRIES} appends in a row lost the race "
                               "for its end")
        raise self._missing(queue, msg_id)

    def read_log(self, queue: str, msg_id: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes of the log from ``offset`` (b"" when nothing is there yet);
        LogNotFound before its first write."""
        key = self._log_key(queue, msg_id, "stdio.log")
        stop = offset + max(0, limit)
        data = overlap(self._log_rows(key, offset, stop), offset, stop)
        if not data and self._log_end(key) is None:
            raise LogNotFound("Message ID log 'stdio.log' not found")
        return data

    # -- watching, local directories, housekeeping ---------------------------------------------
    def watch_message(self, queue: str, msg_id: str, *, log: bool = False) -> PgWatch:
        """LISTEN first, then check the message exists: a change after this returns wakes
        the first ``wait``."""
        payloads = {f"msg {queue} {msg_id}"} | ({f"log {queue} {msg_id}"} if log else set())
        watch = PgWatch(self._conninfo, frozenset(payloads))
        try:
            self.state_of(queue, msg_id)
        except BaseException:
            watch.close()
            raise
        return watch

    def watch(self) -> PgWatcher:
        """The daemon's feed: LISTEN on a connection of its own (watch.py)."""
        return PgWatcher(self._conninfo, self.queues)

    def _fence_fresh(self, attempt: Attempt) -> list[str] | None:
        """The attachments' names, if the attempt's fence was read (by its claim or by
        ``workdir``) within FENCE_REUSE seconds."""
        attempt_id, at, names = self._fenced
        return names if attempt_id == attempt.attempt_id and time.monotonic() - at <= FENCE_REUSE else None

    def durable_batch(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # each finish is durable at its commit already

    def attempt_dir(self, attempt: Attempt) -> str:
        """Beside ``job/``: ``msg`` and ``attach/`` written from the store."""
        return str(self.workdir(attempt).parent)

    def workdir(self, attempt: Attempt) -> Path:
        """``<local_dir>/<queue>/<id>/job`` on this host, beside ``msg`` and ``attach/``
        written from the database (store/local.py); kept while the message runs here. The
        fence and the attachments' names are one query, which a claim just made answered
        already (the daemon starts what it claims at once)."""
        names = self._fence_fresh(attempt)
        if names is None:
            row = self.db.one(Q.attempt_attachments, {"queue": attempt.queue, "msg_id": attempt.msg_id,
                                                      "attempt_id": attempt.attempt_id})
            if row is None:
                raise fenced_out(attempt)
            names = row["names"]
            self._fenced = (attempt.attempt_id, time.monotonic(), names)
        return materialize(self, attempt, self.local_dir or self._scratch.root(), names)

    def start_job(self, attempt: Attempt) -> tuple[str, int]:
        return str(self.workdir(attempt)), self.log_fd(attempt)

    def record_runner(self, attempt: Attempt, runner: str, *, lease: float) -> None:
        self.heartbeat(attempt, lease=lease, runner=runner)

    def log_fd(self, attempt: Attempt) -> int:
        """A pipe whose output one thread appends to the message's log as it comes. The fence
        is read again unless ``workdir`` read it for this attempt within FENCE_REUSE seconds
        (the daemon asks for both as it starts a script)."""
        if self._fence_fresh(attempt) is None:
            self._fence(attempt)
        if self._pump is None:
            self._pump = LogPump()
        q, msg_id = attempt.queue, attempt.msg_id
        fd, drained = self._pump.open(lambda data: self.append_log(q, msg_id, data), f"{q}/{msg_id}")
        self._drained[attempt.attempt_id] = drained
        return fd

    def finish(self, attempt: Attempt, dst: State, *, status: str | None,
               update: Callable[[Message], None] | None = None, note: str = "",
               dup_status: str | None = None, dup_of: str | None = None) -> Message:
        """As the protocol says, once the script's output is in the log: a reader that sees
        the final state then reads the whole log (the SSE stream ends on it), and the next
        attempt's output comes after this one's. A pipe still held open by a process the
        script left behind is waited for :data:`LOG_DRAIN` seconds at most. A message that
        ends (not back in the queue) has its local directory removed: all of it that lasts
        is in the database."""
        drained = self._drained.pop(attempt.attempt_id, None)
        if drained is not None and not drained.wait(LOG_DRAIN):
            log.warning("%s/%s: its output pipe is still open (a process the script left?); finishing "
                        "without waiting for the rest of its log", attempt.queue, attempt.msg_id)
        m = super().finish(attempt, dst, status=status, update=update, note=note, dup_status=dup_status,
                           dup_of=dup_of)
        if dst.final:
            self._trash_of().forget(attempt.queue, attempt.msg_id)
        return m

    def _trash_of(self) -> Trash:
        base = self.local_dir or self._scratch.root()
        if self._trash is None or self._trash.dir.parent != base:
            if self._trash is not None:
                self._trash.close()
            self._trash = Trash(base)
        return self._trash

    def _fence(self, attempt: Attempt) -> None:
        """LeaseLost unless the attempt holds its message now. A plain read: a row lock would
        be let go at once anyway, and it would make this a transaction that waits for a WAL
        flush at its commit."""
        if self.db.one(Q.attempt_holds, {"queue": attempt.queue, "msg_id": attempt.msg_id,
                                         "attempt_id": attempt.attempt_id}) is None:
            raise fenced_out(attempt)

    def message_dir(self, queue: str, msg_id: str) -> Path:
        """A local directory for the message on this host (not shared: the message itself
        lives in the database)."""
        self.state_of(queue, msg_id)
        return self._scratch.message_dir(queue, msg_id)

    def sweep(self, queue: str, *, older_than: float = 3600.0) -> SweepResult:
        """No debris to sweep (a transaction leaves none); folds the queue's count deltas,
        so a busy queue that nobody counts keeps few of them."""
        self._require_queue(queue)
        self._compact_counts(queue)
        with self.db.tx() as cur:
            cur.execute(Q.relay_keys_prune, {"queue": queue, "since": time.time() - RELAY_KEY_DAYS * 86400})
        return SweepResult()

    def relay_key(self, queue: str, key: str) -> str | None:
        validate_queue_name(queue)
        row = self.db.one(Q.relay_key_get, {"queue": queue, "key": key,
                                            "since": time.time() - RELAY_KEY_DAYS * 86400})
        return None if row is None else str(row["msg_id"])

    @contextlib.contextmanager
    def relay_lock(self, queue: str, key: str) -> Iterator[None]:
        """A session advisory lock on the key, on a pooled connection held meanwhile: far
        daemons of one database answering preps of one key at once made two (audit: 39 of
        40 keys)."""
        validate_queue_name(queue)
        args = (RELAY_LOCK, f"{queue}/{key}")
        with storage_errors(self.url), self.db.pool.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", args)
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", args)

    def set_relay_key(self, queue: str, key: str, msg_id: str) -> None:
        validate_queue_name(queue)
        self._require_queue(queue)
        with self.db.tx() as cur:
            cur.execute(Q.relay_key_set, {"queue": queue, "key": key, "msg_id": msg_id, "now": time.time()})
