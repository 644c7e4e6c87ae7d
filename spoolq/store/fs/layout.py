"""Paths of the filesystem store, and the per-queue counts cache.

The layout (docs/internals.md has the full table)::

    <root>/config.json                      host and port that name this machine in full ids
    <root>/queue/<q>/config.json            the queue config
    <root>/queue/<q>/pause | down           admin-state flag files (RQ semantics)
    <root>/config/<q>.pause | .down         RQ's own admin flag files, honoured too
    <root>/queue/<q>/scripterror            the daemon's SCRIPTERROR reason, while it lasts
    <root>/queue/<q>/kick/<id>              run-now's note: the daemon reads that message again
    <root>/queue/<q>/counts                 counts cache (derived; see Counts)
    <root>/queue/<q>/.tmp/                  staging: messages being written, invisible
    <root>/queue/<q>/corrupt/               messages set aside because their files are unreadable
    <root>/queue/<q>/<state>/<YYYYMMDD>/<HHMM>/<SS>/<id>/   one message
    <root>/deleted/<q>.<time>.<rand>/       deleted queues, kept until removed by hand
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ...ids import MSG_ID_RE, bucket_of, sort_key
from ...model import COMPACT_JSON, COUNT_KEYS, State

RQ_FLAG_DIR = "config"
"""Where RQ keeps its admin flag files, ``<q>.pause`` and ``<q>.down``, under the root."""


def message_path(qdir: Path, state: State | str, msg_id: str, *, acked: bool = False) -> Path:
    return _message_path(str(qdir), str(state), msg_id, acked)


def bucketed(msg_id: str) -> str:
    """``<day>/<HHMM>/<SS>/<id>``: where ``msg_id`` lives below a state directory, as a
    string (the daemon's hot path builds no Path)."""
    return f"{msg_id[0:8]}/{msg_id[9:13]}/{msg_id[14:16]}/{msg_id}"


@functools.lru_cache(maxsize=4096)
def _message_path(qdir: str, state: str, msg_id: str, acked: bool) -> Path:
    # One Path built from one string, and the last few thousand kept: the daemon asks for
    # the same few paths of a message ten times while it starts and ends it, and building a
    # Path costs several us (five joins cost ~10).
    if acked:
        return Path(f"{qdir}/{state}/{msg_id[0:8]}/{msg_id[9:13]}/{msg_id[14:16]}/.{msg_id}")
    return Path(f"{qdir}/{state}/{bucketed(msg_id)}")


def _sorted_dirs(path: Path, width: int, reverse: bool) -> list[str]:
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):  # a stray file with a bucket's name
        return []
    return sorted((n for n in names if len(n) == width and n.isdigit()), reverse=reverse)


def iter_entries(
    qdir: Path, state: State | str, *, newest_first: bool = True, before: str | None = None
) -> Iterator[tuple[str, Path, bool]]:
    """Yield ``(msg_id, path, acked)`` in ``state``, ordered by id.

    Walks the bucket tree lazily, so the newest N cost a few small directory reads however
    many messages the state holds. ``before`` (a cursor id) skips everything not older.
    """
    for bdir, entries in iter_buckets(qdir, state, newest_first=newest_first, before=before):
        for msg_id, name, acked in entries:
            yield msg_id, bdir / name, acked


def bucket_dirs(sdir: Path, newest_first: bool, upto: tuple[str, str, str] | None = None) -> Iterator[Path]:
    """The bucket directories (``<day>/<HHMM>/<SS>``) of a state directory, in time order;
    ``upto``: none after that bucket."""
    for day in _sorted_dirs(sdir, 8, newest_first):
        if upto and day > upto[0]:
            continue
        for hm in _sorted_dirs(sdir / day, 4, newest_first):
            if upto and (day, hm) > upto[:2]:
                continue
            for ss in _sorted_dirs(sdir / day / hm, 2, newest_first):
                if upto and (day, hm, ss) > upto:
                    continue
                yield sdir / day / hm / ss


def message_dirs(bdir: Path) -> Iterator[str]:
    """Names of the directories in a bucket (d_type from scandir, no stat: a stray file or
    link with an id-like name is not a message); nothing if the bucket is gone."""
    try:
        with os.scandir(bdir) as it:
            yield from (e.name for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return


def count_entries(qdir: Path, state: State | str,
                  names_of: Callable[[Path], Iterable[str]] = message_dirs) -> tuple[int, int]:
    """(messages, acked messages) in ``state``: what :func:`iter_buckets` would yield,
    counted without sorting or parsing ids (a recount walks every message of a queue).
    ``names_of`` lists one bucket (a live recount numbers each listing: recount.py)."""
    plain = acked = 0
    match = MSG_ID_RE.match
    for bdir in bucket_dirs(qdir / str(state), False):
        for n in names_of(bdir):
            if n[0] == ".":
                acked += match(n[1:]) is not None
            else:
                plain += match(n) is not None
    return plain, acked


def count_tree(qdir: Path, names_of: Callable[[Path], Iterable[str]] = message_dirs) -> dict[str, int]:
    """The counts of every state of the queue in ``qdir``, from a walk of its tree."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for st in State:
        plain, acked = count_entries(qdir, st, names_of)
        counts[str(st)] += plain
        counts["err_acked"] += acked
    return counts


def iter_buckets(
    qdir: Path, state: State | str, *, newest_first: bool = True, before: str | None = None
) -> Iterator[tuple[Path, list[tuple[str, str, bool]]]]:
    """Yield ``(bucket directory, [(msg_id, entry name, acked), ...])`` bucket by bucket, in
    id order (what :func:`iter_entries` walks; scans that touch every message use it to
    build one path per bucket instead of one per message)."""
    ckey = sort_key(before) if before else None
    for bdir in bucket_dirs(qdir / str(state), newest_first, bucket_of(before) if before else None):
        found: list[tuple[tuple[str, int], str, bool]] = []
        for n in message_dirs(bdir):
            acked = n.startswith(".")
            mid = n[1:] if acked else n
            if not MSG_ID_RE.match(mid):
                continue
            k = sort_key(mid)
            if ckey is not None and k >= ckey:
                continue
            found.append((k, n, acked))
        found.sort(reverse=newest_first)
        if found:
            yield bdir, [((n[1:] if acked else n), n, acked) for _, n, acked in found]


class Counts:
    """Messages per state of one queue, kept in ``<q>/counts`` so reading is O(1).

    Every state change adds its delta under an exclusive ``flock`` on the file (a critical
    section of one read and one write, no fsync: the counts are derived data). A crash
    between a rename and its delta leaves a count off by one until :meth:`rewrite` walks
    the tree again (``spoolq stats --recount``, and the daemon at start).

    Deltas land in any order: a producer adds ``que +1`` after its rename, and the daemon
    may already have moved the message on and added ``que -1``. So the file keeps the raw
    sums, which may dip below zero for a moment, and only :meth:`read` clamps them.
    Clamping each delta instead would lose the ``-1`` and leave ``que`` one too high.

    The file is always one record of :data:`RECORD` bytes (JSON padded with spaces), written
    with one ``pwrite`` at offset 0 and never truncated, so a process killed at any instant
    leaves the old record or the new one, never a mix. (A shorter record followed by a
    truncate left ``{..."que":9...}}`` when killed in between.) Replacing the file by a
    rename would break the lock: writers would hold flocks on different inodes.
    ``walk`` (the tree walk) rebuilds a file that does not parse, under the lock.
    """

    RECORD = 512
    """Bytes per record: seven counts of up to 19 digits take about 220."""

    def __init__(self, path: Path, walk: Callable[[], dict[str, int]] | None = None) -> None:
        self.path = path
        self.walk = walk

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @classmethod
    def record(cls, counts: dict[str, int]) -> bytes:
        """``counts`` as one fixed-width record (space-padded JSON, a newline at the end)."""
        data = COMPACT_JSON.encode(counts).encode()
        if len(data) >= cls.RECORD:
            raise ValueError(f"counts do not fit a {cls.RECORD}-byte record: {data[:80]!r}...")
        return data + b" " * (cls.RECORD - 1 - len(data)) + b"\n"

    @classmethod
    def _parse(cls, raw: bytes) -> dict[str, int] | None:
        try:
            d = json.loads(raw[: cls.RECORD])  # a longer file: an old record's tail, hand edits
        except ValueError:
            return None
        if not isinstance(d, dict):
            return None
        try:
            counts = {k: int(d.get(k, 0)) for k in COUNT_KEYS}
        except (TypeError, ValueError, OverflowError):
            return None  # damaged by hand: the caller recounts
        if any(abs(v) >= 2**63 for v in counts.values()):
            return None
        return counts

    def read(self) -> dict[str, int] | None:
        """The counts, or None if the cache is missing or unreadable (the caller recounts)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            raw = os.pread(fd, self.RECORD, 0)
        finally:
            os.close(fd)
        counts = self._parse(raw) if raw else None
        return {k: max(0, v) for k, v in counts.items()} if counts is not None else None

    def add(self, deltas: dict[str, int]) -> None:
        """Add ``deltas`` (state -> change) under the lock. A file that is missing, empty or
        does not parse is rebuilt by ``walk`` instead (never started again from zeros): the
        walk sees this change's rename already, so the deltas are not added to it."""
        with self.adding(deltas):
            pass

    @contextlib.contextmanager
    def adding(self, deltas: dict[str, int]) -> Iterator[None]:
        """``with counts.adding({"que": 1}): rename(...)``: the change and its delta under one
        hold of the lock, so a recount (which takes the lock) sees both or neither. Without it
        a recount between a producer's rename and its delta counted the message twice. Keep
        the body short (a rename, not an fsync): producers and recounts wait for it. The
        delta is added only when the body succeeds."""
        try:
            fd = self._open()
        except OSError:
            yield  # derived data: the next recount repairs it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
            try:
                raw = os.pread(fd, self.RECORD + 1, 0)
                counts = self._parse(raw) if raw else None
                if counts is None and self.walk is not None:
                    counts = self.walk()
                else:
                    if counts is None:
                        counts = dict.fromkeys(COUNT_KEYS, 0)
                    for k, v in deltas.items():
                        counts[k] = counts.get(k, 0) + v
                self._write(fd, counts, longer=len(raw) > self.RECORD)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
                    raise
        finally:
            os.close(fd)

    @classmethod
    def _write(cls, fd: int, counts: dict[str, int], *, longer: bool) -> None:
        os.pwrite(fd, cls.record(counts), 0)  # the whole record in one write: see the class docstring
        if longer:
            os.ftruncate(fd, cls.RECORD)  # tidies a longer file once; not needed to parse it

    def rewrite(self, walk: Callable[[], dict[str, int]] | None = None) -> dict[str, int]:
        """Recount under the lock (with ``walk``, default the one given at construction):
        producers wait for the walk, so no delta is lost."""
        fn = walk or self.walk
        if fn is None:
            raise ValueError("Counts.rewrite needs a walk")
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            counts = fn()
            self._write(fd, counts, longer=os.fstat(fd).st_size > self.RECORD)
            return counts
        finally:
            os.close(fd)
