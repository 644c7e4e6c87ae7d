"""Versioned migrations of the PostgreSQL store: ``spoolq db migrate`` and ``spoolq db status``.

Each applied migration is a row of ``spoolq.schema_migrations``. ``migrate`` applies the
missing ones in one transaction under an advisory lock, so two hosts migrating at once
apply each migration once, and a failure leaves the schema as it was. Opening a store checks
the version (:func:`check`) and refuses a schema that is behind or ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from ...errors import SchemaMismatch
from .connection import MIGRATE_LOCK, connect
from .sql import latest_version, migrations

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS spoolq;
CREATE TABLE IF NOT EXISTS spoolq.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class SchemaStatus:
    current: int  # 0: no spoolq schema yet
    latest: int  # what this spoolq needs

    @property
    def pending(self) -> list[str]:
        return [f"{m.version:03d}_{m.name}" for m in migrations() if m.version > self.current]


def current_version(conn: psycopg.Connection) -> int:
    """The newest applied migration (0 when the database has no spoolq schema)."""
    exists = conn.execute("SELECT to_regclass('spoolq.schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM spoolq.schema_migrations").fetchone()
    return int(row[0]) if row else 0


def status(url: str) -> SchemaStatus:
    with connect(url) as conn:
        return SchemaStatus(current_version(conn), latest_version())


def migrate(url: str) -> list[str]:
    """Apply every missing migration; returns their names (empty: up to date already)."""
    with connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (MIGRATE_LOCK,))
        conn.execute(_BOOTSTRAP)
        done = current_version(conn)
        if done > latest_version():
            raise _ahead(done)
        applied = []
        for m in migrations():
            if m.version > done:
                conn.execute(m.sql)  # one file of many statements: allowed without parameters
                conn.execute("INSERT INTO spoolq.schema_migrations (version, name) VALUES (%s, %s)",
                             (m.version, m.name))
                applied.append(f"{m.version:03d}_{m.name}")
        return applied


def check(conn: psycopg.Connection, url: str) -> None:
    """SchemaMismatch unless the database is at this spoolq's version."""
    have = current_version(conn)
    if have < latest_version():
        what = "has no spoolq schema" if have == 0 else f"has spoolq schema version {have}"
        raise SchemaMismatch(f"the database {url} {what}; this spoolq needs version {latest_version()}: "
                             f"run `spoolq --store {url} db migrate`")
    if have > latest_version():
        raise _ahead(have)


def _ahead(have: int) -> SchemaMismatch:
    return SchemaMismatch(f"the database has spoolq schema version {have}, newer than this spoolq knows "
                          f"({latest_version()}): upgrade spoolq")
