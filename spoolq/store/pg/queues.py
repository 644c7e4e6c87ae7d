"""The PostgreSQL store's queues, its settings, and the daemons (hosts) serving it.

Part of :class:`~spoolq.store.pg.store.PgStore`, a chain of classes as in the filesystem
store: ``queues.py`` <- ``messages.py`` <- ``attempts.py`` <- ``store.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ...config import RootConfig, root_config_of
from ...errors import Conflict, InvalidInput, QueueDown, QueueExists, QueueNotFound, StorageError
from ...ids import validate_queue_name
from ...model import ADMIN_FLAGS, COUNT_KEYS, AdminState, QueueConfig
from . import migrate
from .connection import COUNTS_LOCK, HOST_LOCK, Cursor, Db, connect, open_connection, safe_url, storage_errors
from .sql import Q

log = logging.getLogger("spoolq.store")

HOST_CHECK = 2.0
"""Seconds between looks at the session that holds a serving host's lock (keep_host)."""

COMPACT_AT = 256
"""Count deltas of a queue that counts() sums before it folds them (one query either way;
the fold keeps the next sum small)."""


class QueueParts:
    """Queues (config, admin flags, SCRIPTERROR), where the daemon listens, who serves."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = safe_url(url)  # shown to users and scripts: never the password
        self._conninfo = url
        with connect(url) as conn:
            migrate.check(conn, self.url)
        self.db = Db(url, max_size=pool_size)
        self._host: psycopg.Connection | None = None  # a serving daemon's session (its host lock)
        self._host_id = 0
        self._serving = False  # acquire_daemon was called: the host lock is to be kept
        self._host_check_at = 0.0

    def close(self) -> None:
        """Let go of the pool (and of the daemon's host registration, if any)."""
        self.release_daemon()
        self.db.close()

    # -- the store as a whole ---------------------------------------------------------------
    def root_config(self) -> RootConfig:
        row = self.db.one(Q.setting_get, {"key": "root"})
        return root_config_of(row["value"] if row else None)

    def set_root_config(self, cfg: RootConfig) -> bool:
        with self.db.tx() as cur:
            cur.execute(Q.setting_put, {"key": "root", "value": Jsonb({"host": cfg.host, "port": cfg.port})})
            return cur.rowcount > 0

    def acquire_daemon(self) -> None:
        """Register this process as a host serving the database. Many hosts may serve one
        database; each holds an advisory lock on its own session while it serves, so a host
        that dies (its session ends) stops counting at once."""
        if self._host is not None:
            return
        self._register_host()
        self._serving = True

    def _register_host(self) -> None:
        conn = open_connection(self._conninfo)
        try:
            with storage_errors(self.url):
                conn.execute(Q.hosts_forget_dead, {"lock": HOST_LOCK})
                row = conn.execute(Q.host_register, {"name": f"{socket.gethostname()}:{os.getpid()}"}).fetchone()
                assert row is not None
                self._host_id = int(row[0])
                conn.execute(Q.host_lock, {"lock": HOST_LOCK, "id": self._host_id})
        except BaseException:
            conn.close()
            raise
        self._host = conn

    def keep_host(self) -> None:
        """The host lock lives on a session of its own, which a database restart ends: then
        served() said no daemon runs while this one served (audit), and the next daemon's
        start forgot this host. Looked at every HOST_CHECK seconds (from queues(), which a
        serving daemon calls at every reconnect of its watcher and every few seconds) and
        taken again on a new session when it is gone."""
        now = time.monotonic()
        if not self._serving or now < self._host_check_at:
            return
        self._host_check_at = now + HOST_CHECK
        conn = self._host
        if conn is not None:
            try:
                conn.execute("SELECT 1")
                return
            except psycopg.Error:
                self._host = None
                try:
                    conn.close()
                except psycopg.Error:
                    pass
        try:
            self._register_host()
        except (StorageError, psycopg.Error) as e:
            log.warning("the database session that marks this host as serving ended, and a new one "
                        "cannot be made yet: %s", e)
            return
        log.warning("the database session that marks this host as serving had ended (a restart?): "
                    "registered again")

    def release_daemon(self) -> None:
        self._serving = False
        conn, self._host = self._host, None
        if conn is None:
            return
        try:
            conn.execute(Q.host_unregister, {"lock": HOST_LOCK, "id": self._host_id})
        except psycopg.Error:
            pass  # the session ends below: the host stops counting as live anyway
        conn.close()

    def served(self) -> bool | None:
        row = self.db.one(Q.hosts_live, {"lock": HOST_LOCK})
        return bool(row and row["live"])

    # -- queues -----------------------------------------------------------------------------
    def _queue_row(self, name: str, cur: Cursor | None = None) -> dict[str, Any]:
        validate_queue_name(name)
        if cur is None:
            row = self.db.one(Q.queue_get, {"queue": name})
        else:
            row = cur.execute(Q.queue_get, {"queue": name}).fetchone()
        if row is None:
            raise QueueNotFound(f"no such queue: {name}")
        return row

    def _require_queue(self, name: str) -> None:
        self._queue_row(name)

    def _writable_queue(self, cur: Cursor, name: str) -> dict[str, Any]:
        """The queue's row, if it takes new messages (QueueNotFound, QueueDown)."""
        row = self._queue_row(name, cur)
        if row["down"]:
            raise QueueDown(f"queue {name} is DOWN: it refuses new messages")
        return row

    def create_queue(self, config: QueueConfig) -> None:
        validate_queue_name(config.name)
        with self.db.tx() as cur:
            cur.execute(Q.queue_insert, {"queue": config.name, "config": Jsonb(config.to_dict())})
            if cur.rowcount == 0:
                raise QueueExists(f"queue {config.name} already exists")

    def update_queue(self, config: QueueConfig) -> None:
        validate_queue_name(config.name)
        with self.db.tx() as cur:
            cur.execute(Q.queue_update, {"queue": config.name, "config": Jsonb(config.to_dict())})
            if cur.rowcount == 0:
                raise QueueNotFound(f"no such queue: {config.name}")

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        validate_queue_name(name)
        with self.db.tx() as cur:
            # The queue's row locked: no message can be added to it (their foreign key) meanwhile.
            if cur.execute(Q.queue_lock, {"queue": name}).fetchone() is None:
                raise QueueNotFound(f"no such queue: {name}")
            c = self.counts(name)
            busy = {k: c[k] for k in ("prep", "que", "run") if c[k]}
            if busy and not force:
                raise Conflict(f"queue {name} still holds messages ({busy}); drain it first or use --force")
            cur.execute(Q.queue_delete, {"queue": name})
            cur.execute(Q.counts_forget, {"queue": name})  # the deltas its messages' deletion added too

    def queues(self) -> list[str]:
        self.keep_host()
        return [r["name"] for r in self.db.all(Q.queue_names, {})]

    def queue_config(self, name: str) -> QueueConfig:
        return QueueConfig.from_dict(self._queue_row(name)["config"])

    def admin_state(self, name: str) -> AdminState:
        row = self._queue_row(name)
        return AdminState.of_flags(row["paused"], row["down"])

    def set_admin_state(self, name: str, state: AdminState) -> None:
        state = AdminState(state)
        self._set_flags(name, paused=state == AdminState.PAUSE, down=state == AdminState.DOWN)

    def set_admin_flag(self, name: str, flag: str, on: bool) -> None:
        if flag not in ADMIN_FLAGS:
            raise InvalidInput(f"admin flag must be pause or down, not {flag!r}")
        self._set_flags(name, paused=on if flag == "pause" else None, down=on if flag == "down" else None)

    def _set_flags(self, name: str, *, paused: bool | None, down: bool | None) -> None:
        validate_queue_name(name)
        with self.db.tx() as cur:
            cur.execute(Q.queue_set_flag, {"queue": name, "paused": paused, "down": down})
            if cur.rowcount == 0:
                raise QueueNotFound(f"no such queue: {name}")

    def script_error(self, name: str) -> str | None:
        why: str | None = self._queue_row(name)["script_error"]
        return why

    def set_script_error(self, name: str, why: str | None) -> None:
        validate_queue_name(name)
        with self.db.tx() as cur:
            cur.execute(Q.queue_set_script_error, {"queue": name, "why": why})
            if cur.rowcount == 0:
                raise QueueNotFound(f"no such queue: {name}")

    def counts(self, queue: str) -> dict[str, int]:
        """The queue's count deltas summed (sql/002_count_deltas.sql); folded into one row per
        key once there are more than :data:`COMPACT_AT` of them."""
        validate_queue_name(queue)
        rows = self.db.all(Q.queue_counts, {"queue": queue})
        if not rows:
            raise QueueNotFound(f"no such queue: {queue}")
        c = dict.fromkeys(COUNT_KEYS, 0)
        for r in rows:
            if r["key"] is not None:
                c[r["key"]] += int(r["n"])
        if sum(r["rows"] for r in rows) > COMPACT_AT:
            self._compact_counts(queue)
        return c

    def _compact_counts(self, queue: str) -> None:
        with self.db.tx() as cur:
            row = cur.execute(Q.counts_lock, {"lock": COUNTS_LOCK, "queue": queue}).fetchone()
            if row and row["locked"]:  # else another host is compacting them right now
                cur.execute(Q.counts_compact, {"queue": queue})

    def recount(self, queue: str) -> dict[str, int]:
        """Rebuild the queue's count deltas from its messages (they cannot drift, being
        written in the transaction of each change: this is a check, or a repair by hand)."""
        self._require_queue(queue)
        with self.db.tx() as cur:
            cur.execute(Q.counts_wait_lock, {"lock": COUNTS_LOCK, "queue": queue})
            cur.execute(Q.counts_from_messages, {"queue": queue})
        return self.counts(queue)
