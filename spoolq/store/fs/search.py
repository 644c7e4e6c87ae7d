"""The list filter, fast enough to scan a big state: a raw-bytes test before any JSON.

What a filter matches is :func:`spoolq.model.search_text`: the id, src, dest, param1..4,
orig_msg_id, every ``params`` entry as ``key=value`` and the status text, casefolded. An
audit found a search over 200,000 queued messages took 20-25 s, mostly parsing JSON that
could not match. :class:`Needle` first asks whether a message *could* match by looking for
the needle's pieces in its raw bytes, and parses only those that pass.

Why the raw test never misses a match: a needle that matches lies inside one line of the
search text, i.e. inside one value or one ``key.path=value``. Split at ``.`` and ``=``, each
piece of it lies inside one key or one value, and keys and values stand verbatim in the
stored JSON (UTF-8, ``ensure_ascii=False``) unless JSON escapes them. So the raw test is
used only for needles without characters JSON escapes (``"``, ``\\``, control characters)
and without ``none`` (``null`` in JSON, ``None`` in the search text), and never for a
message whose raw bytes hold a ``\\u`` escape (written by an older spoolq). A piece that
could be part of a ``None`` (``no``, ``one``...: the needle may begin or end inside one) is
not looked for.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...model import State, search_text
from .layout import iter_buckets

_SPLIT = re.compile(r"[.=]")


class Needle:
    """One casefolded filter text, with its raw-bytes pre-test."""

    def __init__(self, text: str) -> None:
        self.text = text.casefold()
        safe = not any(c in self.text for c in '"\\') and all(ord(c) >= 0x20 for c in self.text) \
            and "none" not in self.text
        self.pieces: list[str] | None = [p for p in _SPLIT.split(self.text) if p and p not in "none"] \
            if safe else None

    def could_match(self, raw: bytes, status: str) -> bool:
        """False only when the message certainly does not match (then no JSON is parsed)."""
        if self.text in status.casefold():
            return True
        if self.pieces is None or b"\\u" in raw:
            return True
        body = raw.decode("utf-8", "replace").casefold()
        return all(p in body for p in self.pieces)

    def matches(self, raw: bytes, status: str) -> bool:
        """Does the message whose ``msg`` holds ``raw`` match? An unreadable message counts
        as a match, so that a listing reports it (I7) instead of a filter hiding it."""
        if not self.could_match(raw, status):
            return False
        try:
            data: Any = json.loads(raw)
        except (ValueError, RecursionError):
            return True
        if not isinstance(data, dict):
            return True
        return self.text in search_text(data, status)


def status_text(raw: bytes) -> str:
    """The job status in a message's ``status`` file ("" if it holds none)."""
    try:
        js = json.loads(raw)
    except ValueError:
        return ""
    return str(js.get("job_status", "")) if isinstance(js, dict) else ""


@dataclass
class Scan:
    """What :func:`scan` found: ``(msg_id, path, acked)`` per hit, newest first; the cursor
    to go on from (None: the state was scanned to its end); how many entries it examined."""

    hits: list[tuple[str, Path, bool]]
    next_cursor: str | None
    scanned: int


def scan(qdir: Path, state: State, needle: Needle | None, *, cursor: str | None, limit: int,
         scan_limit: int | None = None) -> Scan:
    """Walk ``state`` newest first from ``cursor``, collecting up to ``limit`` entries that
    match ``needle`` (all, when None) and examining at most ``scan_limit`` entries, so that
    one call stays cheap however big the state is; the caller goes on from ``next_cursor``."""
    hits: list[tuple[str, Path, bool]] = []
    scanned = 0
    last: str | None = None
    for bdir, entries in iter_buckets(qdir, state, before=cursor):
        base = str(bdir)
        for msg_id, name, acked in entries:
            if len(hits) >= limit or (scan_limit is not None and scanned >= scan_limit):
                return Scan(hits, last, scanned)
            scanned += 1
            last = msg_id
            if needle is not None:
                try:
                    raw = read_whole(f"{base}/{name}/msg")
                except FileNotFoundError:
                    continue  # moved on or deleted while we scanned
                except OSError:
                    raw = b""  # unreadable: listed, so that the listing reports it (I7)
                try:
                    status = status_text(read_whole(f"{base}/{name}/status"))
                except OSError:
                    status = ""
                if not needle.matches(raw, status):
                    continue
            hits.append((msg_id, bdir / name, acked))
    return Scan(hits, None, scanned)


def read_whole(path: str | os.PathLike[str]) -> bytes:
    """The whole file, in as few syscalls as it takes (Path.read_bytes makes ten). Opened
    non-blocking (a regular file ignores it): a FIFO a script left in its message's place
    reads as empty or fails (EAGAIN), instead of hanging the reader (a request's thread, the
    daemon's recovery) until someone writes to it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return read_rest(fd)
    finally:
        os.close(fd)


def read_rest(fd: int) -> bytes:
    """Everything from ``fd``'s offset to the end, in as few reads as it takes."""
    first = os.read(fd, 65536)
    if len(first) < 65536:
        return first  # a short read of a local regular file is its end: one read, not two
    chunks = [first]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
