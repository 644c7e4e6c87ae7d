"""Open a file below a directory without following any symbolic link on the way.

Scripts run with write access to their message directory, and whatever they leave there
(``ln -s /etc/passwd ../attach/passwd.txt``, an archive unpacked into ``job/``) is later
served over HTTP. So files served from a message are opened one path component at a time
from the queue directory, each with ``O_NOFOLLOW``: a symbolic link anywhere below the
queue directory, the message directory itself included, is refused (``ELOOP``,
``ENOTDIR``) instead of followed. This is what ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS)`` does, without needing Linux 5.6.

A hard link is the other way out: ``ln <root>/token job/x`` (or an archive holding a hard
link, unpacked into ``job/``) makes a file below the message that *is* a file elsewhere.
So a file with more than one link is refused too, unless the caller names the inode it
made on purpose (an attachment spoolq itself linked, ``send --link``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from typing import BinaryIO

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not block us


class NotBeneath(OSError):
    """A component is a symbolic link, or not what it must be (a directory, a regular file)."""


def open_beneath(base: str | os.PathLike[str], parts: Sequence[str], *, linked_inode: int | None = None) -> BinaryIO:
    """Open ``base/parts[0]/.../parts[-1]`` for reading, a regular file, with no symlink
    anywhere below ``base`` and no second hard link (unless the file is ``linked_inode``).
    Raises FileNotFoundError for a missing component and :class:`NotBeneath` for a link
    or a non-regular file."""
    _check(parts)
    fd = open_dir_beneath(base, parts[:-1])
    try:
        return open_in(fd, parts[-1], linked_inode=linked_inode)
    finally:
        os.close(fd)


def open_in(dir_fd: int, name: str, *, linked_inode: int | None = None) -> BinaryIO:
    """Open ``name`` in the directory ``dir_fd`` (from :func:`open_dir_beneath`) as
    :func:`open_beneath` opens its last component: a regular file, not through a link."""
    _check([name])
    try:
        ffd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotBeneath(e.errno, "a symbolic link", name) from None
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP, errno.EAGAIN, errno.ENODEV, errno.EISDIR):
            # A socket, a device without a driver, a directory: nothing to serve.
            raise NotBeneath(e.errno, "not a regular file", name) from None
        raise
    try:
        st = os.fstat(ffd)
        if not stat.S_ISREG(st.st_mode):
            raise NotBeneath(errno.EINVAL, "not a regular file", name)
        if st.st_nlink > 1 and st.st_ino != linked_inode:
            raise NotBeneath(errno.EMLINK, "a hard link to a file elsewhere", name)
        os.set_blocking(ffd, True)
        return os.fdopen(ffd, "rb")
    except BaseException:
        os.close(ffd)
        raise


def open_dir_beneath(base: str | os.PathLike[str], parts: Sequence[str]) -> int:
    """A file descriptor of the directory ``base/parts...``, reached without following any
    symbolic link below ``base`` (the caller closes it)."""
    if parts:
        _check(parts)
    fd = os.open(base, _DIR)
    try:
        for p in parts:
            try:
                nfd = os.open(p, _DIR, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotBeneath(e.errno, "not a plain directory (a symbolic link?)", p) from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check(parts: Sequence[str]) -> None:
    if not parts or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise NotBeneath(errno.EINVAL, "bad path component", "/".join(parts))
