"""Bytes kept in rows of the PostgreSQL store: attachments and logs, each a run of chunks
keyed by their offset (``attachment_chunks``, ``log_chunks``).

Both directions stream: a write reads its source one chunk at a time (hashing on the way)
and inserts each chunk as it goes; a reader fetches the chunks that overlap what is asked.
Neither ever holds a whole attachment in memory.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from .connection import Cursor

CHUNK = 1024 * 1024
"""Bytes per row (at most): large enough that a row's overhead does not matter, small enough
that a reader's buffer stays small."""

Rows = Iterable[tuple[int, bytes]]


def write_chunks(cur: Cursor, insert: str, key: dict[str, Any], source: BinaryIO) -> tuple[int, str, str]:
    """Insert ``source``'s bytes as chunks (``insert`` takes ``key`` plus off and data);
    returns the size, md5 and sha256 of what was written."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK):
        cur.execute(insert, {**key, "off": size, "data": chunk})
        md5.update(chunk)
        sha.update(chunk)
        size += len(chunk)
    return size, md5.hexdigest(), sha.hexdigest()


def overlap(rows: Rows, start: int, stop: int) -> bytes:
    """The bytes in [start, stop) of consecutive chunks ``(offset, data)``."""
    out = bytearray()
    for off, data in rows:
        lo, hi = max(start - off, 0), min(stop - off, len(data))
        if lo < hi:
            out += data[lo:hi]
    return bytes(out)


class ChunkReader(io.RawIOBase):
    """A readable, seekable file over chunk rows. ``fetch(start, stop)`` returns the chunks
    that overlap [start, stop); ``size()`` the current end (a log may still grow: reading at
    the end again returns what was appended since)."""

    def __init__(self, fetch: Callable[[int, int], Rows], size: Callable[[], int]) -> None:
        super().__init__()
        self._fetch = fetch
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos}.get(whence)
        pos = (self._size() if base is None else base) + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = overlap(self._fetch(self._pos, self._pos + len(view)), self._pos, self._pos + len(view))
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)


def chunk_file(fetch: Callable[[int, int], Rows], size: Callable[[], int]) -> BinaryIO:
    """A buffered :class:`ChunkReader` (one fetch per chunk's worth of reading)."""
    return io.BufferedReader(ChunkReader(fetch, size), buffer_size=CHUNK)
