"""Stores: where queues and messages live. Chosen by URL (see :func:`open_store`)."""

from __future__ import annotations

from ..errors import InvalidInput
from .base import AttachmentSource, Store, SweepResult
from .fs import FsStore
from .memory import MemoryStore

__all__ = ["AttachmentSource", "FsStore", "MemoryStore", "Store", "SweepResult", "open_store"]


def open_store(url: str) -> Store:
    """``/path`` or ``file:///path`` -> filesystem store; ``memory:`` -> memory store;
    ``postgresql://...`` (or ``postgres://``) -> PostgreSQL store (migrated: ``spoolq db migrate``)."""
    if url == "memory:":
        return MemoryStore()
    if url.startswith("file://"):
        return FsStore(url[len("file://"):])
    if url.startswith(("postgresql://", "postgres://")):
        from .pg import PgStore  # psycopg is imported only for a database

        return PgStore(url)
    if "://" in url:
        raise InvalidInput(f"unknown store URL {url!r}: use a directory path, file:///path, memory: or postgresql://...")
    return FsStore(url)
