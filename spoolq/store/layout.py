"""Paths of the filesystem store, and the per-queue counts cache.

The layout (docs/internals.md has the full table)::

    <root>/config.json                      host and port that name this machine in full ids
    <root>/queue/<q>/config.json            the queue config
    <root>/queue/<q>/pause | down           admin-state flag files (RQ semantics)
    <root>/queue/<q>/scripterror            the daemon's SCRIPTERROR reason, while it lasts
    <root>/queue/<q>/kick/<id>              run-now's note: the daemon reads that message again
    <root>/queue/<q>/counts                 counts cache (derived; see Counts)
    <root>/queue/<q>/.tmp/                  staging: messages being written, invisible
    <root>/queue/<q>/corrupt/               messages set aside because their files are unreadable
    <root>/queue/<q>/<state>/<YYYYMMDD>/<HHMM>/<SS>/<id>/   one message
    <root>/deleted/<q>.<time>.<rand>/       deleted queues, kept until removed by hand
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..ids import MSG_ID_RE, bucket_of, sort_key
from ..model import COMPACT_JSON, State

COUNT_KEYS = ("prep", "que", "run", "done", "relayed", "err", "err_acked")


def message_path(qdir: Path, state: State | str, msg_id: str, *, acked: bool = False) -> Path:
    day, hm, ss = bucket_of(msg_id)
    return qdir / str(state) / day / hm / ss / (("." + msg_id) if acked else msg_id)


def _sorted_dirs(path: Path, width: int, reverse: bool) -> list[str]:
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if len(n) == width and n.isdigit()), reverse=reverse)


def iter_entries(
    qdir: Path, state: State | str, *, newest_first: bool = True, before: str | None = None
) -> Iterator[tuple[str, Path, bool]]:
    """Yield ``(msg_id, path, acked)`` in ``state``, ordered by id.

    Walks the bucket tree lazily, so the newest N cost a few small directory reads however
    many messages the state holds. ``before`` (a cursor id) skips everything not older.
    """
    sdir = qdir / str(state)
    cb = bucket_of(before) if before else None
    ckey = sort_key(before) if before else None
    for day in _sorted_dirs(sdir, 8, newest_first):
        if cb and day > cb[0]:
            continue
        for hm in _sorted_dirs(sdir / day, 4, newest_first):
            if cb and (day, hm) > cb[:2]:
                continue
            for ss in _sorted_dirs(sdir / day / hm, 2, newest_first):
                if cb and (day, hm, ss) > cb:
                    continue
                bdir = sdir / day / hm / ss
                try:
                    # d_type from scandir, no stat: a stray file with an id-like name is not
                    # a message.
                    with os.scandir(bdir) as it:
                        names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
                except (FileNotFoundError, NotADirectoryError):
                    continue
                found: list[tuple[tuple[str, int], str, bool]] = []
                for n in names:
                    acked = n.startswith(".")
                    mid = n[1:] if acked else n
                    if not MSG_ID_RE.match(mid):
                        continue
                    k = sort_key(mid)
                    if ckey is not None and k >= ckey:
                        continue
                    found.append((k, n, acked))
                found.sort(reverse=newest_first)
                for _, n, acked in found:
                    yield (n[1:] if acked else n), bdir / n, acked


class Counts:
    """Messages per state of one queue, kept in ``<q>/counts`` so reading is O(1).

    Every state change adds its delta under an exclusive ``flock`` on the file (a critical
    section of one read and one write, no fsync: the counts are derived data). A crash
    between a rename and its delta leaves a count off by one until :meth:`rewrite` is given
    a fresh walk (``spoolq stats --recount``, and the daemon at start).

    Deltas land in any order: a producer adds ``que +1`` after its rename, and the daemon
    may already have moved the message on and added ``que -1``. So the file keeps the raw
    sums, which may dip below zero for a moment, and only :meth:`read` clamps them.
    Clamping each delta instead would lose the ``-1`` and leave ``que`` one too high.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _parse(raw: bytes) -> dict[str, int] | None:
        try:
            d = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(d, dict):
            return None
        try:
            return {k: int(d.get(k, 0)) for k in COUNT_KEYS}
        except (TypeError, ValueError, OverflowError):
            return None  # damaged by hand: the caller recounts (or starts from zero)

    def read(self) -> dict[str, int] | None:
        """The counts, or None if the cache is missing or unreadable (the caller recounts)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            raw = os.pread(fd, 65536, 0)
        finally:
            os.close(fd)
        counts = self._parse(raw) if raw else None
        return {k: max(0, v) for k, v in counts.items()} if counts is not None else None

    def add(self, deltas: dict[str, int]) -> None:
        try:
            fd = self._open()
        except OSError:
            return  # derived data: a failed update is repaired by the next recount
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 65536, 0)
            counts = self._parse(raw) if raw else None
            if counts is None:
                counts = dict.fromkeys(COUNT_KEYS, 0)
            for k, v in deltas.items():
                counts[k] = counts.get(k, 0) + v  # raw sums: see the class docstring
            self._write(fd, counts)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
                raise
        finally:
            os.close(fd)

    @staticmethod
    def _write(fd: int, counts: dict[str, int]) -> None:
        data = COMPACT_JSON.encode(counts).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    def rewrite(self, walk: Callable[[], dict[str, int]]) -> dict[str, int]:
        """Recount under the lock: producers wait for the walk, so no delta is lost."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            counts = walk()
            self._write(fd, counts)
            return counts
        finally:
            os.close(fd)
