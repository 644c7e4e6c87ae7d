"""Every durable filesystem write spoolq makes goes through this module.

The recipe (docs/internals.md, "Durability"): write a temporary file, fsync it, rename it
into place, fsync the directory. Only then is "ok" answered. ``sync=False`` (a queue
configured with ``"fsync": false``) skips the fsyncs and keeps the renames.

Fault injection: tests set :data:`faults` (in process) or the environment variable
``SPOOLQ_FAULT_INJECT`` (for a subprocess) to ``"OP:ERRNO[:AFTER]"``, e.g.
``write:ENOSPC`` or ``fsync:EIO:3`` (fail the 4th fsync). OP is one of ``write``,
``fsync``, ``rename``, ``mkdir``, ``link``. This is the only seam; it costs one dict
lookup per call when unused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import DiskFull, StorageError

faults: dict[str, list[int]] = {}
"""op -> [errno, calls to let through first]. Empty in production."""


def _load_env_faults() -> None:
    spec = os.environ.get("SPOOLQ_FAULT_INJECT", "")
    for part in filter(None, spec.split(",")):
        bits = part.split(":")
        op, err = bits[0], getattr(errno, bits[1]) if len(bits) > 1 else errno.EIO
        after = int(bits[2]) if len(bits) > 2 else 0
        faults[op] = [err, after]


_load_env_faults()


def _check(op: str, path: str | os.PathLike[str] = "") -> None:
    f = faults.get(op)
    if f is None:
        return
    if f[1] > 0:
        f[1] -= 1
        return
    raise OSError(f[0], os.strerror(f[0]) + " (injected)", str(path))


def storage_error(e: OSError, what: str) -> StorageError:
    """Translate an OSError from the disk into spoolq's error tree, with a clear message."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{what}: disk full ({e.strerror}); nothing was stored")
    return StorageError(f"{what}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))


def fsync_fd(fd: int) -> None:
    _check("fsync")
    os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so the names created, renamed or removed in it are durable."""
    _check("fsync", path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str | os.PathLike[str], data: bytes, *, sync: bool = True, mode: int = 0o644,
              dir_fd: int | None = None) -> None:
    """Create ``path`` (which must not exist) holding ``data``; fsync it when ``sync``.

    Used inside a staging directory that nobody else can see yet, so no rename is needed:
    the directory's own rename publishes the file. ``dir_fd``: ``path`` is relative to it.
    """
    _check("write", path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        if sync:
            fsync_fd(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """write(2) until all of ``data`` is written (no fault injection: callers add it)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_replace(path: str | os.PathLike[str], data: bytes, *, sync: bool = True) -> None:
    """Atomically replace ``path`` with ``data``: tmp file, fsync, rename, fsync dir.

    A reader sees the old content or the new, never a mix. On failure the tmp file is
    removed and ``path`` is untouched.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        _check("write", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            if sync:
                fsync_fd(fd)
        finally:
            os.close(fd)
        rename(tmp, p, sync=sync)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, sync: bool = True) -> None:
    """rename(2), then fsync the destination directory when ``sync`` (and the source's, if different).

    rename is the commit point of every state change: it is atomic, so after a crash the
    entry is in exactly one of the two places.
    """
    _check("rename", dst)
    os.rename(src, dst)
    if sync:
        dst_dir = os.path.dirname(os.fspath(dst))
        fsync_dir(dst_dir)
        src_dir = os.path.dirname(os.fspath(src))
        if src_dir != dst_dir:
            fsync_dir(src_dir)


def mkdir(path: str | os.PathLike[str], mode: int = 0o755, *, dir_fd: int | None = None) -> None:
    _check("mkdir", path)
    os.mkdir(path, mode, dir_fd=dir_fd)


def makedirs(path: Path, stop_at: Path, *, sync: bool = True) -> None:
    """``mkdir -p path`` below ``stop_at``; fsync the parent of every directory created."""
    missing: list[Path] = []
    p = path
    while p != stop_at and not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            mkdir(d)
        except FileExistsError:
            continue
        if sync:
            fsync_dir(d.parent)


def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    _check("link", dst)
    os.link(src, dst)


def write_stream_chunk(fd: int, chunk: bytes) -> None:
    """Write one chunk of a streamed file (attachments); injected faults apply."""
    _check("write")
    write_all(fd, chunk)


_libc: ctypes.CDLL | None = None

# Filesystems on which fsync(2) of a newly created file also makes its name durable in its
# directory, and the names of newly created parent directories up the chain:
#  * ext4 with a journal, xfs: the create is logged in the same transaction as the new
#    directory entry, and fsync forces the log up to it (ext4_fsync_journal, xfs_file_fsync);
#  * ext4 without a journal: ext4_sync_parent() writes every new parent ("ext4 has taken the
#    stance that [...] the parent directory should be sync'ed if this inode entry is new",
#    commits 14ece1028b3e and 0893ed458b4b);
#  * btrfs: fsync of a new inode logs its new ancestors (btrfs_log_inode_parent).
# Elsewhere (NFS, ZFS, tmpfs, FUSE, unknown) spoolq fsyncs the directory as well.
NEW_NAME_DURABLE_FS = {0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs"}
_fs_magic: dict[int, int] = {}


def fs_magic(path: str | os.PathLike[str], dev: int | None = None) -> int:
    """``f_type`` of statfs(2) for the filesystem holding ``path`` (0 if unknown); cached by
    device (``dev``, when the caller has it already, saves a stat)."""
    global _libc
    if dev is None:
        dev = os.stat(path).st_dev
    magic = _fs_magic.get(dev)
    if magic is None:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct statfs; f_type (a C long) comes first
        ok = _libc.statfs(os.fsencode(os.fspath(path)), buf) == 0
        magic = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF if ok else 0
        _fs_magic[dev] = magic
    return magic


def new_names_durable_with_file(path: str | os.PathLike[str], dev: int | None = None) -> bool:
    """Does fsync of a new file below ``path`` also make its (new) directory entries durable?

    True on ext4, xfs and btrfs (see :data:`NEW_NAME_DURABLE_FS`), unless the environment
    sets ``SPOOLQ_FSYNC_DIRS=always``. Callers then skip the directory fsync that would
    only repeat what the file's fsync already did: one device flush fewer per message.
    """
    if os.environ.get("SPOOLQ_FSYNC_DIRS") == "always":
        return False
    try:
        return fs_magic(path, dev) in NEW_NAME_DURABLE_FS
    except OSError:
        return False


def syncfs(path: str | os.PathLike[str]) -> None:
    """Flush everything dirty on the filesystem holding ``path`` (group commit).

    One ``syncfs(2)`` makes a whole batch of files durable at the cost of one flush, where
    fsync per file would pay one journal commit each. Falls back to ``sync()``.
    """
    global _libc
    _check("fsync", path)
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fn = getattr(_libc, "syncfs", None)
        if fn is None:
            os.sync()
            return
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[str | os.PathLike[str]]) -> None:
    for p in dict.fromkeys(os.fspath(x) for x in paths):
        fsync_dir(p)


class GroupSync:
    """Directory fsyncs done by a background thread, shared by everything queued meanwhile.

    The daemon renames a message out of ``run/`` and goes on at once; this thread fsyncs the
    destination directory. While one round of fsyncs is in flight, new directories gather,
    and the next round syncs each distinct one once: group commit with no timer, so a move
    is durable about one device flush after it happened, and a busy daemon pays one flush
    per bucket per round instead of one per message. A crash inside that window leaves the
    message in ``run/`` (rename is atomic on the journaling filesystems spoolq supports),
    and recovery runs it again: the at-least-once promise, unchanged.
    """

    def __init__(self, on_error: Callable[[str, OSError], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._pending: dict[str, None] = {}
        self._queued = 0  # directories handed in so far
        self._synced = 0  # of those, how many are durable (or failed and were reported)
        self._stop = False
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="spoolq-groupsync", daemon=True)
        self._thread.start()

    def add(self, directory: str | os.PathLike[str]) -> None:
        with self._cond:
            self._pending[os.fspath(directory)] = None
            self._queued += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is fsync'd; False on timeout."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._synced >= target, timeout)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop)
                if not self._pending and self._stop:
                    return
                batch, self._pending = list(self._pending), {}
                upto = self._queued
            for d in batch:
                try:
                    fsync_dir(d)
                except FileNotFoundError:
                    pass  # a bucket emptied and removed since: nothing in it to make durable
                except OSError as e:
                    if self._on_error is not None:
                        self._on_error(d, e)
            with self._cond:
                self._synced = upto
                self._cond.notify_all()
