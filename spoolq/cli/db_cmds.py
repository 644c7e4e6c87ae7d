"""``db migrate`` and ``db status``: the schema of a PostgreSQL store (spoolq/store/pg/migrate.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput
from .common import command

if TYPE_CHECKING:
    from .main import Ctx


def register(sub: Any) -> None:
    dp = sub.add_parser("db", help="the schema of a PostgreSQL store: migrate, status",
                        description="Create or upgrade the spoolq schema of a PostgreSQL store "
                                    "(spoolq --store postgresql://... db migrate).")
    dsub = dp.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    command(dsub, "migrate", db_migrate, "apply the migrations the database lacks (safe to repeat, and from "
                                         "several hosts at once: they take turns)")
    command(dsub, "status", db_status, "show the database's schema version and the migrations it lacks")


def _database(ctx: Ctx) -> str:
    url = ctx.root
    if not url.startswith(("postgresql://", "postgres://")):
        raise InvalidInput(f"db commands work on a PostgreSQL store (--store postgresql://...), not {url}")
    return url


def db_migrate(args: argparse.Namespace, ctx: Ctx) -> int:
    from ..store.pg.migrate import migrate, status

    applied = migrate(_database(ctx))
    version = status(_database(ctx)).current
    if ctx.json:
        ctx.emit_json({"applied": applied, "version": version})
    elif applied:
        ctx.out(f"applied {', '.join(applied)}: schema version {version}")
    else:
        ctx.out(f"up to date: schema version {version}")
    return 0


def db_status(args: argparse.Namespace, ctx: Ctx) -> int:
    from ..store.pg.migrate import status

    st = status(_database(ctx))
    if ctx.json:
        ctx.emit_json({"version": st.current, "latest": st.latest, "pending": st.pending})
    else:
        ctx.out(f"schema version {st.current} (this spoolq: {st.latest})")
        if st.pending:
            ctx.out(f"pending: {', '.join(st.pending)} (run spoolq db migrate)")
    return 0
