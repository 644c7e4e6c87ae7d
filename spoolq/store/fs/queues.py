"""The filesystem store's queues: their directories, configs and admin flags.

Part of :class:`~spoolq.store.fs.store.FsStore` (a chain of classes, one module per concern);
the invariants are in docs/internals.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ... import durable, filestamp
from ...errors import (
    InvalidConfig,
    InvalidInput,
    QueueExists,
    QueueNotFound,
    SpoolqError,
)
from ...filestamp import Stamp
from ...ids import (
    validate_queue_name,
)
from ...model import (
    ADMIN_FLAGS,
    COMPACT_JSON,
    AdminState,
    QueueConfig,
    State,
)
from ...parts import WHOLE, Part
from .layout import COUNT_KEYS, RQ_FLAG_DIR, Counts
from .search import read_whole


class QueueParts:
    """The filesystem store's queues: their directories, configs and admin flags."""

    def __init__(self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(os.path.abspath(root))
        self.qroot = self.root / "queue"
        self.url = f"file://{self.root}"
        self._daemon_fd = -1  # daemon.pid, locked while this store serves as the daemon's
        # With `serve --dispatchers`, the messages this process owns (parts.py): what it
        # indexes, recovers and takes kicks for. Set before acquire_daemon.
        self.part: Part = WHOLE
        self.clock = clock
        # name -> its stamp, the config, and its bytes while the stamp cannot vouch for it (filestamp.py)
        self._cfg_cache: dict[str, tuple[Stamp, QueueConfig, bytes | None]] = {}
        self._qdirs: dict[str, Path] = {}  # name -> its directory: qdir() is asked per message

    def ensure_root(self) -> None:
        """Create the spool root and its ``queue/`` directory if they are missing."""
        try:
            self.qroot.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise durable.storage_error(e, f"cannot create spool root {self.root}") from None

    # -- queues --------------------------------------------------------------------------
    def qdir(self, name: str) -> Path:
        q = self._qdirs.get(name)
        if q is None:
            q = self.qroot / validate_queue_name(name)
            if len(self._qdirs) >= 1024:
                self._qdirs.clear()  # many queue names, or a caller trying many: start over
            self._qdirs[name] = q
        return q

    def _existing_qdir(self, name: str) -> Path:
        q = self.qdir(name)
        if not (q / "config.json").is_file():
            raise QueueNotFound(f"no such queue: {name}")
        return q

    def create_queue(self, config: QueueConfig) -> None:
        qdir = self.qdir(config.name)
        if qdir.exists():
            raise QueueExists(f"queue {config.name} already exists")
        self.ensure_root()
        # I1: a queue appears whole or not at all: built in a staging dir, then renamed.
        stage = self.qroot / f".new.{config.name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            durable.mkdir(stage)
            for sub in (*[str(s) for s in State], ".tmp", "corrupt"):
                durable.mkdir(stage / sub)
            durable.write_new(stage / "config.json", _json(config.to_dict(), indent=2))
            durable.write_new(stage / "counts", Counts.record(dict.fromkeys(COUNT_KEYS, 0)), sync=False)
            try:
                durable.rename(stage, qdir)
            except OSError as e:
                if e.errno in (39, 17):  # ENOTEMPTY, EEXIST: someone created it first
                    raise QueueExists(f"queue {config.name} already exists") from None
                raise
        except OSError as e:
            raise durable.storage_error(e, f"cannot create queue {config.name}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def update_queue(self, config: QueueConfig) -> None:
        qdir = self._existing_qdir(config.name)
        try:
            durable.write_replace(qdir / "config.json", _json(config.to_dict(), indent=2))
        except OSError as e:
            raise durable.storage_error(e, f"cannot write config of {config.name}") from None

    def queues(self) -> list[str]:
        try:
            names = os.listdir(self.qroot)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.startswith("."):
                continue
            try:
                validate_queue_name(n)
            except SpoolqError:
                continue
            if (self.qroot / n / "config.json").is_file():
                out.append(n)
        return sorted(out)

    def queue_config(self, name: str) -> QueueConfig:
        # On every send and move: one stat and a cache hit, without building Path objects.
        # The stamp vouches only for a config that had settled when read (filestamp.py);
        # until then its bytes are compared.
        path = f"{self.qroot}/{validate_queue_name(name)}/config.json"
        try:
            key, settled = filestamp.stamp(os.stat(path))
            cached = self._cfg_cache.get(name)
            if cached and cached[0] == key and cached[2] is None:
                return cached[1]
            raw = _read_file(Path(path))
        except (FileNotFoundError, NotADirectoryError):
            raise QueueNotFound(f"no such queue: {name}") from None
        if cached and cached[0] == key and cached[2] == raw:
            cfg = cached[1]
        else:
            try:
                cfg = QueueConfig.from_dict(json.loads(raw))
            except ValueError as e:
                raise InvalidConfig(f"config.json of queue {name} is not valid JSON: {e}") from None
            if cfg.name != name:
                raise InvalidConfig(f"config.json of queue {name} names another queue: {cfg.name!r}")
        self._cfg_cache[name] = (key, cfg, None if settled else raw)
        return cfg

    def rq_flag(self, name: str, flag: str) -> Path:
        """RQ's admin flag file of the queue, ``<root>/config/<queue>.<flag>`` (rq-spec 6.1):
        honoured beside spoolq's own ``queue/<q>/<flag>``, as RQ's tests touch it."""
        return self.root / RQ_FLAG_DIR / f"{name}.{flag}"

    def admin_state(self, name: str) -> AdminState:
        qdir = self._existing_qdir(name)
        return AdminState.of_flags((qdir / "pause").exists() or self.rq_flag(name, "pause").exists(),
                                   (qdir / "down").exists() or self.rq_flag(name, "down").exists())

    def set_admin_state(self, name: str, state: AdminState) -> None:
        self.set_admin_flag(name, "down", state == AdminState.DOWN)
        self.set_admin_flag(name, "pause", state == AdminState.PAUSE)

    def script_error(self, name: str) -> str | None:
        try:
            text = (self.qdir(name) / "scripterror").read_text(errors="replace").strip()
        except OSError:
            return None
        return text or "script cannot start"

    def set_script_error(self, name: str, why: str | None) -> None:
        p = self._existing_qdir(name) / "scripterror"
        try:
            if why is None:
                p.unlink(missing_ok=True)
            else:
                durable.write_replace(p, why.encode() + b"\n", sync=False)  # the daemon re-derives it
        except OSError as e:
            raise durable.storage_error(e, f"cannot record the script error of {name}") from None

    def set_admin_flag(self, name: str, flag: str, on: bool) -> None:
        if flag not in ADMIN_FLAGS:
            raise InvalidInput(f"admin flag must be pause or down, not {flag!r}")
        p = self._existing_qdir(name) / flag
        try:
            if on and not p.exists():
                durable.write_replace(p, b"")
            elif not on:
                for f in (p, self.rq_flag(name, flag)):  # clearing clears RQ's file too
                    if f.exists():
                        f.unlink()
                        durable.fsync_dir(f.parent)
        except FileNotFoundError:
            pass  # removed meanwhile by someone else: the wanted end state
        except OSError as e:
            raise durable.storage_error(e, f"cannot {'set' if on else 'clear'} {flag} on {name}") from None



def _read_file(path: Path | str) -> bytes:
    return read_whole(path)



def _json(obj: Any, indent: int | None = None) -> bytes:
    if indent:
        return (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode()
    return COMPACT_JSON.encode(obj).encode()

