"""A small inotify(7) wrapper (ctypes, Linux), and the filesystem store's message watch.

The daemon watches each queue's ``que`` bucket tree to start new messages at once; ``wait``
and ``log -f`` watch one message (:class:`FsMessageWatch`, what ``FsStore.watch_message``
returns). Nothing here polls quickly: a blocked call sleeps in ``select``/``poll`` until the
kernel reports a change; callers re-check slowly as a backstop (an event can be missed when
the queue overflows or a directory is replaced).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import NotFound

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


class FsMessageWatch:
    """Wakes :meth:`wait` when one message moves or is deleted (its directory moves between
    state directories as one inode: one watch sees every state change) and, with ``log``,
    when its ``job/`` directory changes (the log grows). Without inotify (no instances left),
    ``wait`` naps briefly instead."""

    def __init__(self, locate: Callable[[], Path], *, log: bool = False) -> None:
        self._locate = locate
        self._log = log
        try:
            self.ino: Inotify | None = Inotify()
        except OSError:
            self.ino = None
        self._arm()  # before the caller's first look: a move after it wakes the first wait

    def _arm(self) -> None:
        if self.ino is None:
            return
        try:
            mdir = self._locate()
        except NotFound:
            return  # gone: the caller's next look says so
        watches = [(mdir, IN_MOVE_SELF | IN_DELETE_SELF | (IN_CREATE if self._log else 0))]
        if self._log:
            watches.append((mdir / "job", IN_MODIFY | IN_CREATE))
        for path, mask in watches:
            try:  # re-adding a watch on the same inode only refreshes it
                self.ino.add(path, mask)
            except OSError:
                pass

    def wait(self, timeout: float) -> None:
        if self.ino is None:
            time.sleep(min(timeout, 0.2))
            return
        self._arm()  # job/ may be new, the directory may have been replaced
        self.ino.wait(timeout)

    def close(self) -> None:
        if self.ino is not None:
            self.ino.close()
            self.ino = None

    def __enter__(self) -> FsMessageWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
