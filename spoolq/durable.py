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
import fcntl
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


def open_own(name: str, flags: int, *, dir_fd: int | None = None, fresh: bool = False,
             truncate: bool = False) -> int:
    """Open the regular file ``name`` (``O_CREAT`` in ``flags``, never ``O_TRUNC``) in a
    directory others may write (a message's, where its script runs). Whatever is in its
    place that is not a plain file with one name (a symbolic link, a hard link to a file
    elsewhere, a FIFO, a socket, a directory) or that its owner cannot open (mode 000) is
    removed and a new file made: never written through, never waited on. ``flags`` gains
    ``O_NOFOLLOW`` and ``O_NONBLOCK`` (which a regular file ignores: clear it before
    handing the fd to a program).

    ``fresh``: the name is usually absent (a ``pid`` file, unlinked at each finish), so a
    new file is tried first, which needs no check. ``truncate``: an existing file of its
    own is emptied (after the check: ``O_TRUNC`` would empty a linked file first)."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    for _ in range(3):
        if fresh:
            try:
                return os.open(name, flags | os.O_EXCL, 0o644, dir_fd=dir_fd)
            except FileExistsError:
                pass
        try:
            fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        except IsADirectoryError:
            import shutil  # only here: most processes never meet a directory in a file's place

            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: follows no link inside it
        except OSError as e:
            # ENXIO: a FIFO nobody reads, or a socket; EACCES: a mode its owner cannot open.
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EACCES):
                raise
            _unlink_if_there(name, dir_fd)
        else:
            try:
                st = os.fstat(fd)
                # A second name: the file is someone else's too (spoolq never links these),
                # and writing would change it. Unlinking this name leaves that file as it was.
                if st.st_nlink == 1 and st.st_mode & 0o170000 == 0o100000:  # S_ISREG
                    if truncate and st.st_size:
                        os.ftruncate(fd, 0)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            _unlink_if_there(name, dir_fd)
        try:
            return os.open(name, flags | os.O_EXCL, 0o644, dir_fd=dir_fd)
        except FileExistsError:
            continue  # put back at once (by the script that left it): look again
    raise OSError(errno.EBUSY, f"{name} is replaced again each time it is removed (a process of the "
                  "message's script?)")


def open_own_log(name: str, *, dir_fd: int | None = None) -> int:
    """A script's log (``job/stdio.log``), opened to append as :func:`open_own` opens a
    file, blocking again: it becomes the script's stdout."""
    fd = open_own(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, dir_fd=dir_fd)
    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
    return fd


def _unlink_if_there(name: str, dir_fd: int | None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def write_replace(path: str | os.PathLike[str], data: bytes, *, sync: bool = True) -> None:
    """Atomically replace ``path`` with ``data``: tmp file, fsync, rename, fsync dir.

    A reader sees the old content or the new, never a mix. On failure the tmp file is
    removed and ``path`` is untouched. The tmp file is always a new one: whatever an earlier
    crash or a script left at its name (a symbolic or hard link to a file elsewhere, in a
    message directory a script can write) is removed, never written through.
    """
    p = Path(path)
    # One tmp name per thread: two threads of one process (the HTTP server's) rewriting the
    # same file took each other's tmp file away, and one of them failed.
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_native_id()}.tmp")
    try:
        _check("write", tmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # O_EXCL: never through a link
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileExistsError:
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o644)
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
    """``mkdir -p path`` below ``stop_at``; with ``sync``, make every directory created durable.

    Where renames are atomic on disk (a journal) an fsync of each new directory's parent
    does. On ext4 without a journal it does not: fsync writes the directories and their
    inodes, but not the block group's descriptor and inode bitmap, which the allocation of
    a new inode also changed. When that inode lies past the part of the inode table the
    group has used so far, e2fsck after a power cut takes it for unused and clears the
    entry that names it: the bucket and every message renamed into it are gone (the
    power-cut test found this). One ``syncfs`` writes those too; it is paid once per new
    bucket, i.e. at most once a second per state.
    """
    missing: list[Path] = []
    p = path
    while p != stop_at and not p.is_dir():
        missing.append(p)
        p = p.parent
    made = False
    unsafe = sync and rename_needs_source_sync(stop_at)
    for d in reversed(missing):
        try:
            mkdir(d)
        except FileExistsError:
            continue
        made = True
        if sync and not unsafe:
            fsync_dir(d.parent)
    if made and unsafe:
        syncfs(stop_at)


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
EXT4_MAGIC = 0xEF53
XFS_MAGIC = 0x58465342
BTRFS_MAGIC = 0x9123683E
NEW_NAME_DURABLE_FS = {EXT4_MAGIC: "ext2/3/4", XFS_MAGIC: "xfs", BTRFS_MAGIC: "btrfs"}
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


# Does a rename need its source directory fsync'd as well as its destination?
#
# On a journaling filesystem a rename is one transaction: the new entry, the removal of the
# old one, the moved directory's ".." and both parents' link counts commit together, so the
# fsync of either directory makes all of it durable, and after a crash the entry is in one
# place or the other (I4). That holds for ext4 with a journal, xfs and btrfs.
#
# ext4 without a journal (and ext2, ext3 mounted by their own drivers) writes each directory
# block on its own. fsync of the destination writes the new entry but not the source's
# removal: after a power cut e2fsck finds two entries for one directory, keeps the first it
# meets (often the one in .tmp) and clears the other. Had the removal reached the disk
# without the new entry, e2fsck would find no entry at all and move the directory to
# lost+found. So there spoolq fsyncs the source directory too, after the destination, before
# "ok": both entries are then durable and nothing is left for e2fsck to choose. The moved
# directory's own ".." and the parents' link counts are not made durable: e2fsck derives
# them from the entries it keeps (pass 3 rewrites "..", pass 4 recounts links), so they
# cannot lose a message. Unknown filesystems are treated the same way (unsafe).
_rename_safe: dict[int, bool] = {}


def _sysfs_block_name(dev: int) -> str | None:
    """The kernel's name of block device ``dev`` (``vda``, ``dm-0``, ``loop3``), or None."""
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return line.strip().split("=", 1)[1].replace("/", "!")  # as in sb->s_id
    except OSError:
        return None
    return None


def ext4_has_journal(dev: int) -> bool | None:
    """Is the ext4 filesystem on device ``dev`` journaled? None when it cannot be told (not
    mounted by the ext4 driver, no sysfs): callers treat that as "no"."""
    name = _sysfs_block_name(dev)
    if name is None:
        return None
    try:
        with open(f"/sys/fs/ext4/{name}/journal_task") as f:
            return f.read().strip() not in ("", "<none>")  # the jbd2 thread's pid, or <none>
    except FileNotFoundError:
        pass
    except OSError:
        return None
    if os.path.isdir(f"/sys/fs/ext4/{name}") and os.path.isdir(f"/proc/fs/jbd2/{name}-8"):
        return True  # a kernel without journal_task; the journal's jbd2 entry is there
    return None  # ext2/ext3 driver, an external journal, or an older kernel: not known


def fs_description(path: str | os.PathLike[str], dev: int | None = None) -> str:
    """A short name of the filesystem holding ``path`` as durability sees it: ``ext4
    (journal)``, ``ext4 (no journal)``, ``xfs``, ``btrfs``, or ``other (0x...)``."""
    if dev is None:
        dev = os.stat(path).st_dev
    magic = fs_magic(path, dev)
    if magic == EXT4_MAGIC:
        journal = ext4_has_journal(dev)
        return "ext2/3/4 (journal unknown)" if journal is None else "ext4 (journal)" if journal else "ext4 (no journal)"
    return {XFS_MAGIC: "xfs", BTRFS_MAGIC: "btrfs", 0x01021994: "tmpfs"}.get(magic, f"other (0x{magic:x})")


def rename_needs_source_sync(path: str | os.PathLike[str], dev: int | None = None, *,
                             always: bool | None = None) -> bool:
    """Must a rename on the filesystem holding ``path`` also fsync its source directory?

    False on ext4 with a journal, xfs and btrfs (a rename is one transaction there); True on
    ext4 without a journal, ext2/ext3 and every filesystem not known to be safe, and always
    with ``SPOOLQ_FSYNC_DIRS=always`` (``always``: the caller's reading of it, made once).
    Cached by device. The long comment above says why.
    """
    if always is None:
        always = os.environ.get("SPOOLQ_FSYNC_DIRS") == "always"
    if always:
        return True
    try:
        if dev is None:
            dev = os.stat(path).st_dev
        safe = _rename_safe.get(dev)
        if safe is None:
            magic = fs_magic(path, dev)
            safe = magic in (XFS_MAGIC, BTRFS_MAGIC) or (magic == EXT4_MAGIC and ext4_has_journal(dev) is True)
            _rename_safe[dev] = safe
    except OSError:
        return True
    return not safe


def fsync_after_rename(dst_dir: str | os.PathLike[str] | int, src_dir: str | os.PathLike[str] | int,
                       *, dev: int | None = None) -> None:
    """Make a rename from ``src_dir`` into ``dst_dir`` (paths or open fds) durable: fsync the
    destination, then the source where :func:`rename_needs_source_sync` says so. ``dev``:
    the filesystem's device, if the caller has it (saves a stat)."""
    _fsync_path_or_fd(dst_dir)
    if src_dir != dst_dir and rename_needs_source_sync(_path_of(dst_dir), dev):
        _fsync_path_or_fd(src_dir)


def _path_of(d: str | os.PathLike[str] | int) -> str:
    return f"/proc/self/fd/{d}" if isinstance(d, int) else os.fspath(d)


def _fsync_path_or_fd(d: str | os.PathLike[str] | int) -> None:
    if isinstance(d, int):
        fsync_fd(d)
    else:
        fsync_dir(d)


FICLONE = 0x40049409  # _IOW(0x94, 9, int): share the source's extents (reflink)


def clone_file(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst_fd`` a reflink copy of ``src_fd`` (ioctl FICLONE): no data is copied, the
    extents are shared copy-on-write (btrfs, xfs with reflink, bcachefs...). False where the
    filesystem cannot (the caller copies instead); a real failure (ENOSPC, EIO) raises."""
    _check("write")
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        return False  # EOPNOTSUPP, EXDEV (other fs), EINVAL, ENOTTY, EPERM...
    return True


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


GROUP_LINGER = 0.010
"""Seconds :class:`GroupSync` waits after a round before starting the next (a close ends the
wait). Measured on ext4 without a journal: claim + finish of 5,000 messages in one process
ran 933-1,046/s back to back, 1,511-1,725/s with 5 ms, 1,669-1,832/s with 10 ms
(``bench/README.md``). A move becomes durable up to this much later; nothing waits on it."""


class GroupSync:
    """Directory fsyncs done by a background thread, shared by everything queued meanwhile.

    The daemon renames a message and goes on at once; this thread fsyncs the directories the
    rename touched. While one round of fsyncs is in flight, new directories gather, and the
    next round syncs each distinct one once: group commit with no timer, so a move is
    durable about one device flush after it happened, and a busy daemon pays one flush per
    bucket per round instead of one per message. Within a round every destination is synced
    before any source (:meth:`add_rename`), so the new entry reaches the disk first.

    A crash inside that window leaves the message in its old state or its new one: rename
    is atomic on the journaling filesystems, and on the others (ext4 without a journal)
    e2fsck keeps one of the two entries, or, if only the removal had reached the disk, puts
    the directory in lost+found, from where the daemon's start puts it back (docs/internals.md).
    """

    def __init__(self, on_error: Callable[[str, OSError], None] | None = None, *,
                 linger: float = GROUP_LINGER) -> None:
        self._linger = linger
        self._cond = threading.Condition()
        self._pending: dict[str, int] = {}  # directory -> 0 (a destination) or 1 (a source)
        self._queued = 0  # directories handed in so far
        self._synced = 0  # of those, how many are durable (or failed and were reported)
        self._stop = False
        self._idle = False  # the thread waits for work: only then does an add wake it
        self._on_error = on_error
        self._always = os.environ.get("SPOOLQ_FSYNC_DIRS") == "always"
        self._thread = threading.Thread(target=self._run, name="spoolq-groupsync", daemon=True)
        self._thread.start()

    def add(self, directory: str | os.PathLike[str], *, source: bool = False) -> None:
        """fsync ``directory`` in the next round (after every destination if ``source``)."""
        d = os.fspath(directory)
        with self._cond:
            self._pending[d] = min(self._pending.get(d, 1), int(source))
            self._queued += 1
            if self._idle:  # else the thread is syncing, and looks again before it waits
                self._cond.notify_all()

    def add_rename(self, src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str], *,
                   only_where_unsafe: bool = False, dev: int | None = None) -> None:
        """Make a rename from ``src_dir`` into ``dst_dir`` durable in the next round, as
        :func:`fsync_after_rename` would: the destination, then the source where the
        filesystem needs it. ``only_where_unsafe``: nothing at all on a filesystem where a
        rename is atomic on disk (the daemon's que -> run move, which may be lost there)."""
        # SPOOLQ_FSYNC_DIRS read at this GroupSync's start, not per move.
        if not rename_needs_source_sync(dst_dir, dev, always=self._always):
            if not only_where_unsafe:
                self.add(dst_dir)
            return
        self.add(dst_dir)
        if os.fspath(src_dir) != os.fspath(dst_dir):
            self.add(src_dir, source=True)

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
                self._idle = True
                self._cond.wait_for(lambda: self._pending or self._stop)
                self._idle = False
                if not self._pending and self._stop:
                    return
                batch = sorted(self._pending, key=self._pending.__getitem__)  # destinations first
                self._pending = {}
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
                if self._linger > 0:
                    # Let the next round gather: while a round writes a directory's blocks,
                    # renames into that directory wait for the write (ext4 without a journal
                    # locks the buffers under I/O), so back-to-back rounds stall the daemon.
                    self._cond.wait_for(lambda: self._stop, self._linger)
