"""The filesystem store: queues are directories, messages are directories of JSON and files.

Every state change is one rename(2) of a message directory (the commit point); durable
writes go through :mod:`spoolq.durable`. The state table, the invariants and the crash
argument are in docs/internals.md; comments name the invariant they keep (I1..I8).

:class:`FsStore` is built as a chain, one module per concern: ``queues.py`` (queue
directories, configs, admin flags) <- ``reading.py`` (locating, viewing, listing, counting,
opening files) <- ``writing.py`` (creating, publishing, moving, rewriting, deleting) <-
``attempts.py`` (claim, heartbeat, fenced finish, reclaim) <- this
module (the store as a whole: where the daemon listens, its lock, sweeping).
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
from pathlib import Path

from ... import durable
from ...config import RootConfig, read_root_config, write_root_config
from ...errors import MessageNotFound
from ..base import SweepResult, process_relay_lock
from . import pidfile, relaykeys
from .attempts import AttemptParts
from .layout import Counts
from .sweep import lost_found_of, recover_lost_found, sweep_queue, sweep_root

log = logging.getLogger("spoolq.daemon")


class FsStore(AttemptParts):
    """A spool root on the local filesystem. Safe for many processes at once (no global lock)."""

    # -- the store as a whole ---------------------------------------------------------------
    def root_config(self) -> RootConfig:
        return read_root_config(self.root)

    def set_root_config(self, cfg: RootConfig) -> bool:
        self.ensure_root()  # writes nothing when the root is there already
        try:
            return write_root_config(self.root, cfg)
        except OSError as e:
            raise durable.storage_error(e, f"cannot write {self.root / 'config.json'}") from None

    def acquire_daemon(self) -> None:
        """Create the root if needed and lock ``<root>/daemon.pid`` (pidfile.py); the
        daemon's moves are group-committed from now on (attempts.py)."""
        if self._daemon_fd >= 0:
            return
        self.ensure_root()
        part = self.part
        self._daemon_fd = pidfile.acquire(self.root, pidfile.PIDFILE if part.main else pidfile.helper_lock(part.index))
        log.info("spool %s is on %s", self.root, durable.fs_description(self.root))
        self._start_group_sync()

    def wait_for_helpers(self, timeout: float) -> builtins.list[str]:
        return pidfile.wait_for_helpers(self.root, timeout)

    def reclaim_again(self, queue: str) -> None:
        self._reclaimed.discard(queue)

    def dispatch_processes(self) -> builtins.list[tuple[int, int | None, bool | None]]:
        return pidfile.processes(self.root)

    def release_daemon(self) -> None:
        self._stop_group_sync()
        if self._watcher is not None:
            self._watcher.close()
        if self._daemon_fd >= 0:
            pidfile.release(self._daemon_fd)
            self._daemon_fd = -1

    def served(self) -> bool | None:
        return self._daemon_fd >= 0 or pidfile.is_served(self.root)

    def sweep_root(self, *, older_than: float = 3600.0) -> builtins.list[str]:
        """Remove ``queue/.new.<name>.<pid>.<rand>``: queues whose creator died before its
        rename (I1), once that process is gone, or older than ``older_than`` seconds."""
        return sweep_root(self, older_than)

    def cached_counts(self, queue: str) -> dict[str, int] | None:
        """The counts cache as it is (None when missing or unreadable): no walk."""
        return Counts(self.qdir(queue) / "counts").read()

    def sweep(self, queue: str, *, older_than: float = 3600.0) -> SweepResult:
        """I6: complete staged messages of dead producers go into their state, the rest of
        their debris goes, empty old buckets go (store/fs/sweep.py); relay keys older than
        a week go."""
        result = sweep_queue(self, queue, older_than)
        relaykeys.prune(self._existing_qdir(queue), self.clock())
        return result

    def relay_key(self, queue: str, key: str) -> str | None:
        msg_id = relaykeys.lookup(self._existing_qdir(queue), key, self.clock())
        if msg_id is None:
            return None
        try:
            self.state_of(queue, msg_id)
        except MessageNotFound:
            return None
        return msg_id

    def relay_lock(self, queue: str, key: str) -> threading.Lock:
        return process_relay_lock(queue, key)

    def set_relay_key(self, queue: str, key: str, msg_id: str) -> None:
        qdir = self._existing_qdir(queue)
        try:
            relaykeys.record(qdir, key, msg_id, self.clock(), sync=self.queue_config(queue).fsync)
        except OSError as e:
            raise durable.storage_error(e, f"cannot record a relay key in {queue}") from None

    def recover_lost_found(self, lost_found: str | os.PathLike[str] | None = None) -> SweepResult:
        """I10: put back message directories that e2fsck moved to ``lost_found`` (default:
        ``lost+found`` at the top of the spool's filesystem), see store/fs/sweep.py."""
        if lost_found is None:
            try:
                lost_found = lost_found_of(self.root)
            except OSError:
                return SweepResult()
        return recover_lost_found(self, Path(lost_found))

