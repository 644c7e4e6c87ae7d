"""Scandir: RQ's way of installing queues (docs/scandir.md).

``<home>/scandir/<name>`` is a symlink to a script directory holding an executable ``run``
(and optionally ``config.json``). The daemon keeps a queue ``<name>`` per link: created when
the link appears, its config updated when the directory's ``config.json`` changes, deleted
when the link goes (once the queue holds nothing that waits or runs). The queue's script is
``<home>/scandir/<name>/run``, through the link, so pointing the link at a new directory
deploys a new script at the next message. Changes are seen through inotify at once, with a
look every :data:`BACKSTOP` seconds besides.

Only the queues scandir created or took over (a link named like an existing queue) are
ever deleted by it: they are listed in ``<home>/scandir/.managed.json``. (RQ deleted every
queue it had not seen in scandir at its first scan.)
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from .. import durable
from ..errors import Conflict, InvalidConfig, QueueExists, QueueNotFound, SpoolqError
from ..ids import QUEUE_NAME_RE
from ..inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
)
from ..model import QueueConfig
from ..store.base import Store

log = logging.getLogger("spoolq.daemon")

SCANDIR = "scandir"
MANAGED = ".managed.json"
BACKSTOP = 60.0
SETTLE = 0.1
"""Seconds after an event before looking (a burst of events, one look)."""
_DIR_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_CLOSE_WRITE
_SELF = IN_DELETE_SELF | IN_MOVE_SELF


class Scandir:
    """The daemon's scandir: :meth:`scan` syncs queues with the links."""

    def __init__(self, store: Store, home: Path) -> None:
        self.store = store
        self.home = home.absolute()  # scripts are recorded by absolute path
        self.dir = self.home / SCANDIR
        self.ino = Inotify()
        self.watches: dict[int, Path] = {}
        self.wds: dict[Path, int] = {}
        self.scan_at = 0.0  # time.monotonic() of the next look
        self.reported: dict[str, str] = {}  # name -> the problem last logged (logged once)
        self.managed: set[str] = self._read_managed()
        self._watch(home, IN_CREATE | IN_MOVED_TO)  # for scandir/ itself appearing

    def fileno(self) -> int:
        return self.ino.fd

    def close(self) -> None:
        self.ino.close()

    # -- watching --------------------------------------------------------------------------
    def _watch(self, path: Path, mask: int) -> None:
        if path in self.wds:
            return
        try:
            wd = self.ino.add(path, mask)
        except OSError as e:
            log.debug("scandir: cannot watch %s: %s", path, e)
            return
        self.watches[wd] = path
        self.wds[path] = wd

    def on_events(self) -> None:
        """Something changed: look soon."""
        try:
            events = self.ino.read()
        except OSError:
            events = []
        for ev in events:
            if ev.mask & IN_IGNORED:  # a watch removed (by us, or its directory went)
                path = self.watches.pop(ev.wd, None)
                if path is not None and self.wds.get(path) == ev.wd:
                    del self.wds[path]
                continue
            if ev.mask & IN_Q_OVERFLOW or self.watches.get(ev.wd) != self.home or ev.name == SCANDIR:
                self.scan_at = min(self.scan_at, time.monotonic() + SETTLE)
                return

    def _rewatch(self, targets: list[Path]) -> None:
        """Watch the home, scandir/ and each linked directory; stop watching the others."""
        keep = {self.home, self.dir, *targets}
        for path, wd in list(self.wds.items()):
            if path not in keep:
                self.ino.remove(wd)  # its IN_IGNORED event drops it from the maps
                del self.wds[path]
        self._watch(self.home, IN_CREATE | IN_MOVED_TO)
        self._watch(self.dir, _DIR_EVENTS | _SELF)
        for t in targets:
            self._watch(t, _DIR_EVENTS | _SELF)

    # -- the managed list ------------------------------------------------------------------
    def _read_managed(self) -> set[str]:
        try:
            data = json.loads((self.dir / MANAGED).read_bytes())
        except (OSError, ValueError):
            return set()
        return {n for n in data if isinstance(n, str)} if isinstance(data, list) else set()

    def _save_managed(self) -> None:
        try:
            durable.write_replace(self.dir / MANAGED, json.dumps(sorted(self.managed)).encode(), sync=True)
        except OSError as e:
            log.error("scandir: cannot record the queues it manages: %s", e)

    # -- scanning --------------------------------------------------------------------------
    def _problem(self, name: str, why: str) -> None:
        if self.reported.get(name) != why:
            self.reported[name] = why
            log.error("scandir: %s: %s", name, why)

    def _desired(self, name: str) -> tuple[QueueConfig, Path]:
        """The queue a link asks for, and the directory it points at; ValueError if unusable."""
        link = self.dir / name
        st = os.lstat(link)
        if not stat.S_ISLNK(st.st_mode):
            raise ValueError("not a symlink (scandir entries are links to script directories)")
        target = Path(os.path.realpath(link))
        if not target.is_dir():
            raise ValueError(f"{target} is not a directory")
        run = link / "run"
        try:
            rst = os.stat(run)
        except OSError:
            raise ValueError(f"no run script in {target}") from None
        if not stat.S_ISREG(rst.st_mode) or not os.access(run, os.X_OK):
            raise ValueError(f"{target}/run is not an executable file")
        data: dict[str, Any] = {}
        cfg_path = link / "config.json"
        if cfg_path.exists():
            try:
                raw = json.loads(cfg_path.read_bytes())
            except (OSError, ValueError) as e:
                raise ValueError(f"{target}/config.json: {e}") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{target}/config.json is not a JSON object")
            data = raw
        data = {**data, "name": name, "script": str(run)}
        try:
            return QueueConfig.from_dict(data), target
        except InvalidConfig as e:
            raise ValueError(f"{target}/config.json: {e}") from None

    def scan(self) -> None:
        self.scan_at = time.monotonic() + BACKSTOP
        try:
            names = sorted(n for n in os.listdir(self.dir) if not n.startswith("."))
        except FileNotFoundError:
            names = []
        except OSError as e:
            log.error("scandir: cannot read %s: %s", self.dir, e)
            return
        try:
            existing = set(self.store.queues())
        except SpoolqError as e:
            log.error("scandir: cannot list the queues: %s", e)
            return
        wanted: set[str] = set()
        targets: list[Path] = []
        changed = False
        for name in names:
            if not QUEUE_NAME_RE.match(name):
                self._problem(name, "not a valid queue name")
                continue
            try:
                cfg, target = self._desired(name)
            except (OSError, ValueError) as e:
                self._problem(name, str(e))
                continue
            wanted.add(name)
            targets.append(target)
            self.reported.pop(name, None)
            try:
                if name not in existing:
                    self.store.create_queue(cfg)
                    log.warning("scandir: created queue %s (%s)", name, target)
                elif self.store.queue_config(name).to_dict() != cfg.to_dict():
                    self.store.update_queue(cfg)
                    log.warning("scandir: updated queue %s from %s", name, target)
            except QueueExists:
                pass
            except SpoolqError as e:
                self._problem(name, str(e))
                continue
            if name not in self.managed:
                self.managed.add(name)
                changed = True
        for name in sorted(self.managed - wanted):
            if name in names and name in existing:
                continue  # still linked but unusable now: kept (SCRIPTERROR shows why) until fixed or unlinked
            try:
                if name in existing:
                    self.store.delete_queue(name)
                    log.warning("scandir: deleted queue %s (its link is gone)", name)
            except Conflict as e:
                self._problem(name, f"link gone, queue kept: {e}")
                continue
            except QueueNotFound:
                pass
            except SpoolqError as e:
                self._problem(name, str(e))
                continue
            self.managed.discard(name)
            self.reported.pop(name, None)
            changed = True
        if changed:
            self._save_managed()
        self._rewatch(targets)
