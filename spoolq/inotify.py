"""A small inotify(7) wrapper (ctypes, Linux): one instance, its watches and its events.

Used by the filesystem store (store/fs/inotify.py: the daemon's queue watches, ``wait`` and
``log -f``) and by the daemon for its own directories (scandir). Nothing here polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
from dataclasses import dataclass

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000

_EVENT = struct.Struct("iIII")
_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str

    @property
    def is_dir(self) -> bool:
        return bool(self.mask & IN_ISDIR)


class Inotify:
    """One inotify instance: a non-blocking, close-on-exec file descriptor to select on."""

    def __init__(self) -> None:
        fd = _lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd: int = fd

    def add(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch ``path``; returns the watch descriptor. OSError (ENOENT, ENOSPC...) on failure."""
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_add_watch: {os.strerror(e)}", os.fspath(path))
        return int(wd)

    def remove(self, wd: int) -> None:
        _lib().inotify_rm_watch(self.fd, wd)  # EINVAL if already gone: nothing to do

    def read(self) -> list[Event]:
        """Every event queued now (possibly none); never blocks."""
        out: list[Event] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return out
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size
                name = data[pos:pos + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                pos += length
                out.append(Event(wd, mask, name))

    def wait(self, timeout: float | None) -> list[Event]:
        """Block until events arrive or ``timeout`` seconds pass (None: forever)."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        p.poll(ms)
        return self.read()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
