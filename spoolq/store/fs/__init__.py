"""The filesystem store: the only code that knows the spool's paths and layout.

``store.py`` is :class:`FsStore`; the rest are its parts: ``layout`` (paths, buckets, the
counts file), ``attachments``, ``beneath`` (opening files a script may have tampered with),
``search``, ``sweep`` (debris and lost+found), ``debris``, ``kicks`` (run-now's hint to the
daemon), ``inotify`` (the kernel's change events), ``pidfile`` (the daemon's lock).
"""

from __future__ import annotations

from .store import FsStore

__all__ = ["FsStore"]
