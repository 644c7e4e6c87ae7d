"""The daemon's inotify watches, and what each one is for.

| kind | path | events |
|---|---|---|
| ``root`` | ``<root>/queue`` | queues created, renamed, deleted |
| ``qdir`` | ``<root>/queue/<q>`` | ``config.json``, ``pause``, ``down`` changed; ``kick/`` created |
| ``kick`` | ``<root>/queue/<q>/kick`` | a kick file created or rewritten (``run-now``) |
| ``que`` | ``que/`` and its bucket directories (level 0..3) | buckets and messages in and out |

``que`` watches exist only while the queue is indexed (UP): a PAUSEd or DOWN queue's sends
wake nobody. When the kernel refuses a watch (``fs.inotify.max_user_watches``),
``trouble`` is set and the daemon walks its queues on a timer instead.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..store.fs import inotify as watch
from .queue import WatchFn

log = logging.getLogger("spoolq.daemon")

DIR_EVENTS = watch.IN_CREATE | watch.IN_MOVED_TO | watch.IN_MOVED_FROM | watch.IN_DELETE | watch.IN_ONLYDIR
MASKS = {
    "qdir": DIR_EVENTS | watch.IN_CLOSE_WRITE | watch.IN_ATTRIB,
    "kick": watch.IN_CREATE | watch.IN_CLOSE_WRITE | watch.IN_MOVED_TO | watch.IN_ONLYDIR,
}
OVERFLOW = "overflow"


@dataclass(frozen=True)
class Watched:
    kind: str  # root, qdir, kick, que; or OVERFLOW for a lost-events marker
    queue: str | None
    path: Path
    level: int


class Watches:
    """One inotify instance and the meaning of each of its watch descriptors."""

    def __init__(self, trouble_every: float) -> None:
        self.ino = watch.Inotify()
        self.fd = self.ino.fd
        self.trouble = False  # a watch was refused: the caller walks on a timer
        self.trouble_every = trouble_every
        self._by_wd: dict[int, Watched] = {}

    def add(self, path: Path, kind: str, queue: str | None = None, level: int = 0) -> bool:
        """Watch ``path`` for ``kind``'s events (re-adding a watched path is harmless)."""
        try:
            wd = self.ino.add(path, MASKS.get(kind, DIR_EVENTS))
        except OSError as e:
            if e.errno == errno.ENOSPC and not self.trouble:
                self.trouble = True
                log.warning("inotify watch limit reached (fs.inotify.max_user_watches): falling back "
                            "to walking the queues every %g s", self.trouble_every)
            return False
        self._by_wd[wd] = Watched(kind, queue, path, level)
        return True

    def que_watcher(self, queue: str) -> WatchFn:
        """What a walk of ``queue``'s ``que/`` calls before it lists a directory."""
        def add(path: Path, level: int) -> None:
            self.add(path, "que", queue, level)

        return add

    def drop(self, queue: str, kinds: tuple[str, ...]) -> None:
        """Stop watching ``queue``'s directories of these kinds."""
        for wd, w in list(self._by_wd.items()):
            if w.queue == queue and w.kind in kinds:
                self.ino.remove(wd)  # its IN_IGNORED finds no entry and is skipped
                del self._by_wd[wd]

    def events(self) -> Iterator[tuple[watch.Event, Watched]]:
        """Every pending event with what its watch is for; an overflow comes as kind OVERFLOW."""
        for ev in self.ino.read():
            if ev.mask & watch.IN_Q_OVERFLOW:
                yield ev, Watched(OVERFLOW, None, Path(), 0)
                continue
            w = self._by_wd.get(ev.wd)
            if w is None:
                continue
            if ev.mask & watch.IN_IGNORED:
                del self._by_wd[ev.wd]  # the directory is gone
                continue
            yield ev, w

    def close(self) -> None:
        self.ino.close()
