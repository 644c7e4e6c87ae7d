"""The PostgreSQL store's SQL, kept in ``sql/``: numbered migrations (``NNN_name.sql``) and
named queries (``queries.sql``: each query follows a ``-- name: <name>`` line).

Every query takes its values as parameters (``%(name)s``); identifiers are fixed in the
files, so no SQL is ever built from user data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_MIGRATION_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql\Z")
_NAME_RE = re.compile(r"^-- name: ([a-z0-9_]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _read(name: str) -> str:
    return (resources.files(__package__) / "sql" / name).read_text(encoding="utf-8")


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration, oldest first."""
    found = []
    for entry in (resources.files(__package__) / "sql").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return tuple(sorted(found, key=lambda mig: mig.version))


def latest_version() -> int:
    return migrations()[-1].version


_INCLUDE_RE = re.compile(r"^\s*-- include: ([a-z0-9_]+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """The named queries of ``queries.sql``. A line ``-- include: <name>`` in a query stands
    for that (earlier) query, e.g. a statement that is also part of a bigger one."""
    text = _read("queries.sql")
    parts = _NAME_RE.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        found[name] = _INCLUDE_RE.sub(lambda m: found[m.group(1)], body.strip())
    return found


class Queries:
    """Attribute access to the named queries: ``Q.claim`` (an unknown name fails at once)."""

    def __getattr__(self, name: str) -> str:
        try:
            return queries()[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None


Q = Queries()
