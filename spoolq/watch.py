"""A small inotify(7) wrapper (ctypes, Linux) and the waits built on it.

The daemon watches each queue's ``que`` bucket tree to start new messages at once; ``wait``
and ``log -f`` watch one message. Nothing here polls quickly: a blocked call sleeps in
``select``/``poll`` until the kernel reports a change, with a slow re-check as a backstop
(an event can be missed when the queue overflows or a directory is replaced).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import LogNotFound

if TYPE_CHECKING:
    from .model import MessageView
    from .store.base import Store

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


BACKSTOP = 5.0
"""Seconds between re-checks while waiting, in case an event was missed."""


def wait_final(store: Store, queue: str, msg_id: str, timeout: float | None,
               clock: Callable[[], float] = time.monotonic) -> MessageView | None:
    """Block until the message is done, relayed or err; None if ``timeout`` passes first.

    Watches the message's own directory: it moves between state directories as one inode,
    so one watch sees every state change (IN_MOVE_SELF).
    """
    deadline = None if timeout is None else clock() + timeout
    try:
        ino: Inotify | None = Inotify()
    except OSError:
        ino = None
    watched: str | None = None
    try:
        while True:
            view = store.get(queue, msg_id)
            if view.state.final:
                return view
            if ino is not None and watched is None:
                try:
                    path = store.message_dir(queue, msg_id)
                    ino.add(path, IN_MOVE_SELF | IN_DELETE_SELF)
                    watched = str(path)
                    continue  # re-check: it may have moved before the watch existed
                except OSError:
                    pass
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                return None
            nap = BACKSTOP if left is None else min(BACKSTOP, left)
            if ino is None:
                time.sleep(min(nap, 0.2))
            else:
                for ev in ino.wait(nap):
                    if ev.mask & IN_IGNORED:
                        watched = None  # the directory is gone (deleted): look again
    finally:
        if ino is not None:
            ino.close()


def follow_log(store: Store, queue: str, msg_id: str, out: BinaryIO, *, follow: bool,
               clock: Callable[[], float] = time.monotonic) -> MessageView:
    """Copy the message's ``job/stdio.log`` to ``out``; with ``follow``, keep copying new output
    until the message reaches a final state. Returns the message as last seen."""
    ino = Inotify() if follow else None
    f: BinaryIO | None = None
    try:
        while True:
            view = store.get(queue, msg_id)
            mdir = store.message_dir(queue, msg_id)
            if f is None:
                try:  # never through a link a script left (store/beneath.py); kept open across moves
                    f = store.open_log(queue, msg_id)
                except LogNotFound:
                    f = None
            if f is not None:
                _copy(f, out)
            if not follow or view.state.final:
                if f is not None:
                    _copy(f, out)
                return view
            assert ino is not None
            # Re-adding a watch on the same inode only refreshes it; the job dir may be new.
            for p, mask in ((mdir, IN_MOVE_SELF | IN_CREATE), (mdir / "job", IN_MODIFY | IN_CREATE)):
                try:
                    ino.add(p, mask)
                except OSError:
                    pass
            ino.wait(BACKSTOP)
    finally:
        if f is not None:
            f.close()
        if ino is not None:
            ino.close()


def _copy(f: BinaryIO, out: BinaryIO) -> None:
    while chunk := f.read(65536):
        out.write(chunk)
    out.flush()


def walk_dirs(top: Path, depth: int) -> Iterator[tuple[Path, int]]:
    """``top`` and its subdirectories down to ``depth`` levels, with their level (0 = top)."""
    yield top, 0
    if depth <= 0:
        return
    try:
        names = sorted(os.listdir(top))
    except OSError:
        return
    for n in names:
        p = top / n
        if n.isdigit() and p.is_dir():
            for sub, lvl in walk_dirs(p, depth - 1):
                yield sub, lvl + 1
