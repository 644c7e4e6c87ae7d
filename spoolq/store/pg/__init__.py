"""The PostgreSQL store (issue 8): ``postgresql://`` URLs. Imported only when one is opened,
so spoolq works without psycopg's database driver being used.

``store.py`` is :class:`PgStore`; its parts: ``connection`` (pool, transactions, errors),
``sql`` (the ``.sql`` files: migrations and named queries), ``migrate`` (``spoolq db``),
``queues``, ``messages``, ``attempts``, ``blobs`` (attachments and logs in chunks),
``watch`` (LISTEN/NOTIFY).
"""

from __future__ import annotations

from .store import PgStore

__all__ = ["PgStore"]
