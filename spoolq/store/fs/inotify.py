"""A small inotify(7) wrapper (ctypes, Linux), and the filesystem store's message watch.

The daemon watches each queue's ``que`` bucket tree to start new messages at once; ``wait``
and ``log -f`` watch one message (:class:`FsMessageWatch`, what ``FsStore.watch_message``
returns). Nothing here polls quickly: a blocked call sleeps in ``select``/``poll`` until the
kernel reports a change; callers re-check slowly as a backstop (an event can be missed when
the queue overflows or a directory is replaced).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ...errors import NotFound
from ...inotify import (  # noqa: F401 - re-exported for the store's modules
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
)


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
