"""The filesystem store's attempts: claim, heartbeat, fenced finish, reclaim (store/leases.py).

Part of :class:`~spoolq.store.fs.store.FsStore` (a chain of classes, one module per concern).
One daemon serves a spool root (it holds ``<root>/daemon.pid`` locked, D1), so its lease is
that lock: a heartbeat only checks the fence and looks for a cancel, and every attempt in
``run/`` that this daemon did not hand out belongs to a dead one and is reclaimed (only
while holding the lock). The attempts this store handed out are kept in memory
(``_mine``), which is the fence for the daemon that holds them; an attempt's id is also
written to ``<message>/attempt`` (unsynced, like ``pid``: after a power cut the whole run/
is reclaimed anyway), the fence for any other process. Held coalesced duplicates live in
memory too, as they always have: a crash releases them.

With a watcher (:meth:`watch`, the daemon's) a queue the daemon wants is indexed
(index.py) and claim picks from the index, one stat per start (D3); without one, claim
walks ``que/`` in full (correct, O(queued): tools and tests). The daemon's moves out of
``run/`` and into it are made durable by a group-commit thread (durable.GroupSync) that
the daemon's lock owns: one device flush per bucket per round, not one per message.
"""

from __future__ import annotations

import builtins
import errno
import json
import json.encoder
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ... import durable
from ...errors import Conflict, CorruptMessage, MessageNotFound, QueueNotFound, SpoolqError, StorageError, WrongState
from ...model import AdminState, Message, QueueConfig, State, check_transition
from ..leases import (
    SUCCESS,
    Attempt,
    Candidate,
    Lease,
    at_cluster_limit,
    fenced_out,
    key_of,
    new_attempt_id,
    params_of,
    pick,
)
from .index import Entry, QueueIndex
from .layout import bucketed, iter_entries
from .recount import LiveRecount
from .search import read_whole
from .watcher import FsWatcher
from .writing import WriteParts, logged_rename

log = logging.getLogger("spoolq.daemon")

ATTEMPT_FILE = "attempt"
_CLAIM_DELTAS = {str(State.QUE): -1, str(State.RUN): 1}
_FINISH_DELTAS = {str(st): {str(State.RUN): -1, str(st): 1} for st in State}
_ascii_str = json.encoder.encode_basestring_ascii  # C: a str as JSON, ASCII only (as COMPACT_JSON)
_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
COUNTS_LINGER = 0.005
"""Seconds the daemon's store gathers counts deltas before adding them (``_counted_rename``)."""


class AttemptParts(WriteParts):
    """Attempts of messages in run: who holds each, and the fence on finishing."""

    def __init__(self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(root, clock=clock)
        self._held: dict[tuple[str, str], str] = {}  # (queue, duplicate id) -> the parent's attempt id
        self._mine: dict[str, dict[str, Attempt]] = {}  # queue -> id -> the attempt this store handed out
        self._watcher: FsWatcher | None = None
        self._group_sync: durable.GroupSync | None = None
        self._reclaimed: set[str] = set()  # queues whose run/ was reclaimed under this lock
        self._cancel_seen: set[tuple[str, str]] = set()  # attempts that saw a cancel marker
        self._attempt_files: set[tuple[str, str]] = set()  # attempts with an ``attempt`` file
        self._pid_files: set[tuple[str, str]] = set()  # attempts whose runner wrote a ``pid`` file
        self._devs: dict[str, int] = {}  # queue -> st_dev of its directory
        self._count_lock = threading.Lock()
        self._count_pending: dict[Path, dict[str, int]] = {}  # queue dir -> deltas not yet added
        self._count_due: float | None = None  # time.monotonic() when they must be added
        self._recounts: dict[str, LiveRecount] = {}  # queue -> its recount beside our moves
        self._moving = threading.local()  # .rc, .msg_id: a move under a LiveRecount's lock

    # -- the daemon's feed ---------------------------------------------------------------
    def watch(self) -> FsWatcher:
        """Changes for the daemon (inotify), and the claim indexes of the queues it wants."""
        if self._watcher is None:
            self._watcher = FsWatcher(self)
        return self._watcher

    def holds(self, queue: str, msg_id: str) -> bool:
        """Is ``msg_id`` in run under an attempt this store handed out?"""
        return msg_id in self._mine.get(queue, {})

    def _start_group_sync(self) -> None:
        if self._group_sync is None:
            self._group_sync = durable.GroupSync(on_error=_group_sync_failed)

    def _stop_group_sync(self) -> None:
        """The daemon lets go: its moves made durable, its attempts no longer its own."""
        for queue, rc in list(self._recounts.items()):
            self._abandon_recount(queue, rc)  # not walked yet (or still walking): add them as usual
        self.flush_counts()
        if self._group_sync is not None:
            self._group_sync.close()  # every finished move durable before the lock is let go
            self._group_sync = None
        self._mine.clear()
        self._held.clear()
        self._reclaimed.clear()
        self._cancel_seen.clear()
        self._attempt_files.clear()
        self._pid_files.clear()
        self._devs.clear()

    # -- counts ----------------------------------------------------------------------------
    def _counted_rename(self, qdir: Path, deltas: dict[str, int], rename: Callable[[], None]) -> None:
        """The daemon's moves add their counts deltas together, :data:`COUNTS_LINGER` after
        the first (``flush_counts``, called by the watcher's loop, and at the end of a
        ``durable_batch`` such as recovery, before any recount starts): one locked
        read-modify-write of ``counts`` for many moves instead of one per move. Readers see
        a count up to that much late; a crash loses the deltas held, which the next start's
        recount repairs. A move made while its queue is recounted is renamed under the
        recount's lock and left to it to judge (recount.py)."""
        if self._group_sync is None:
            super()._counted_rename(qdir, deltas, rename)
            return
        rc = getattr(self._moving, "rc", None)
        if rc is not None:
            with rc.lock:
                if not rc.closed:
                    rename()
                    rc.moved(self._moving.msg_id, deltas)
                    return
        rename()
        self._gather(qdir, deltas)

    def _gather(self, qdir: Path, deltas: dict[str, int]) -> None:
        with self._count_lock:
            pending = self._count_pending.get(qdir)
            if pending is None:
                # The directory's inode, so that deltas of a queue deleted and made again
                # under its name meanwhile are not added to the new one.
                try:
                    ino = os.stat(qdir).st_ino
                except OSError:
                    return
                pending = self._count_pending[qdir] = {"": ino}
            for k, v in deltas.items():
                pending[k] = pending.get(k, 0) + v
            if self._count_due is None:
                self._count_due = time.monotonic() + COUNTS_LINGER

    @property
    def counts_due(self) -> float | None:
        """When :meth:`flush_counts` is due (``time.monotonic()``), or None."""
        return self._count_due

    def flush_counts(self) -> None:
        """Add the gathered counts deltas to each queue's ``counts`` file."""
        with self._count_lock:
            pending, self._count_pending, self._count_due = self._count_pending, {}, None
        for qdir, deltas in pending.items():
            ino = deltas.pop("")
            try:
                if os.stat(qdir).st_ino != ino:
                    continue  # deleted (and maybe made again): these moves were in the old one
            except OSError:
                continue
            if any(deltas.values()):
                self._counts(qdir).add(deltas)

    # -- the start-up recount beside dispatch (recount.py) --------------------------------
    def begin_recount(self, queue: str) -> bool:
        """From now until :meth:`recount` of ``queue`` ends, this store's moves in it are
        numbered against the walk's listings instead of waiting for its lock: the daemon
        dispatches while a million messages are counted. False: not the daemon's store."""
        if self._group_sync is None:
            return False
        qdir = self.qdir(queue)
        with self._count_lock:
            self._count_pending.pop(qdir, None)  # moves already made: the walk will see them
            self._recounts[queue] = LiveRecount()
        return True

    def recount(self, queue: str) -> dict[str, int]:
        rc = self._recounts.get(queue)
        if rc is None:
            return super().recount(queue)
        try:
            qdir = self._existing_qdir(queue)

            def walk() -> dict[str, int]:
                counts = rc.walk(qdir)
                with rc.lock:  # still under the counts lock: later moves add on top
                    if rc.closed:
                        raise _Abandoned  # the daemon let go and added the moves' deltas itself
                    self._close_recount(queue, rc)
                    for k, v in rc.adjustments().items():
                        counts[k] = counts.get(k, 0) + v
                return counts

            try:
                return self._counts(qdir).rewrite(walk)
            except _Abandoned:
                return self._counts(qdir).read() or {}
        finally:
            self._abandon_recount(queue, rc)  # if the walk failed: the deltas go the usual way

    def _close_recount(self, queue: str, rc: LiveRecount) -> None:
        rc.closed = True
        if self._recounts.get(queue) is rc:
            del self._recounts[queue]

    def _abandon_recount(self, queue: str, rc: LiveRecount) -> None:
        """Close ``rc`` unjudged, its moves' deltas gathered as if no recount were open."""
        with rc.lock:
            if rc.closed:
                return
            self._close_recount(queue, rc)
            for _, _, deltas in rc.moves:
                self._gather(self.qdir(queue), deltas)

    # -- moves that free held duplicates ---------------------------------------------------
    def move(self, queue: str, msg_id: str, src: State, dst: State, **kw: Any) -> Message:
        rc = self._recounts.get(queue)
        if rc is None:
            m = super().move(queue, msg_id, src, dst, **kw)
        else:
            # Only the rename and its numbering happen under rc.lock (_counted_rename): the
            # rest of a move may take the counts lock (a corrupt msg set aside), which the
            # recount holds while it waits for rc.lock.
            self._moving.rc, self._moving.msg_id = rc, msg_id
            try:
                m = super().move(queue, msg_id, src, dst, **kw)
            finally:
                self._moving.rc = None
        if src == State.QUE:
            self._held.pop((queue, msg_id), None)  # a held duplicate that left the queue is free
        return m

    def delete(self, queue: str, msg_id: str) -> None:
        super().delete(queue, msg_id)
        self._held.pop((queue, msg_id), None)

    # -- claim ---------------------------------------------------------------------------
    def claim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> Attempt | float | None:
        now = self.clock() if now is None else now
        cfg, admin = self._settings(queue)
        if admin != AdminState.UP:
            return None
        ix = self._watcher.indexes.get(queue) if self._watcher is not None else None
        if ix is None:
            return self._claim_walking(queue, cfg, owner, lease, now)
        return self._claim_indexed(ix, cfg, owner, lease, now)

    def _settings(self, queue: str) -> tuple[QueueConfig, AdminState]:
        """Config and admin state: from the watcher's cache for the daemon, else read."""
        if self._watcher is not None and queue in self._watcher.indexes:
            return self._watcher.settings(queue)
        return self.queue_config(queue), self.admin_state(queue)

    def _claim_walking(self, queue: str, cfg: QueueConfig, owner: str, lease: float,
                       now: float) -> Attempt | float | None:
        held = self._held
        owns = self.part.owns
        queued = [Candidate(i, m.due, params_of(m)) for i, _, m in self._messages(queue, State.QUE)
                  if (queue, i) not in held and owns(queue, i)]
        running = [params_of(m) for _, _, m in self._messages(queue, State.RUN)]
        chosen, dups, wake = pick(queued, running, cfg, now)
        if chosen is None:
            return wake
        a = self._start(queue, chosen.msg_id, cfg, owner, lease, now, tuple(dups))
        for d in dups:
            held[(queue, d)] = a.attempt_id
        return a

    def _claim_indexed(self, ix: QueueIndex, cfg: QueueConfig, owner: str, lease: float,
                       now: float) -> Attempt | float | None:
        ix.bound(cfg)
        if cfg.coalesce_params and ix.walk is not None and ix.walk.full:
            return None  # every duplicate must be indexed before a parent is chosen
        mine = self._mine.get(ix.name, {})
        if at_cluster_limit(cfg, len(mine)):
            return None  # one daemon per root: its attempts are every running one
        bp = cfg.blocking_params
        blocked = {key_of(params_of(a.message), bp) for a in mine.values()} if bp else set()
        while True:
            entry, wake = ix.next_runnable(now, bp, blocked)
            if entry is None:
                return wake
            ix.index.pop(entry.msg_id, None)
            try:
                a = self._start_indexed(ix, entry, cfg, owner, lease, now)
                if a is None:  # the unusual case: the general path says what it is
                    fresh = ix.refresh_entry(entry)
                    if fresh is not entry:  # changed on disk since indexed: schedule what is there now
                        ix.put_back(fresh)
                        continue
                    a = self._start(ix.name, entry.msg_id, cfg, owner, lease, now, ())
            except (WrongState, MessageNotFound):
                continue  # gone since indexed: its departure event is on its way
            except CorruptMessage as e:
                log.error("%s", e)  # set aside by the store; the queue goes on
                continue
            except StorageError:
                ix.put_back(entry)  # still queued: the caller waits before trying again
                raise
            dups = ix.coalesce_with(entry, cfg.coalesce_params)
            if dups:
                a = replace(a, dups=tuple(dups))
                self._mine[ix.name][a.msg_id] = a
                for d in dups:
                    self._held[(ix.name, d)] = a.attempt_id
            return a

    def _start_indexed(self, ix: QueueIndex, e: Entry, cfg: QueueConfig, owner: str, lease: float,
                       now: float) -> Attempt | None:
        """The daemon's start of an indexed message, lean: what :meth:`_start` and the generic
        ``move`` do, in one pass on strings. ``msg`` is read at most once, and parsed and
        validated only if it is not what the index read (:func:`_indexed_message`); the
        history line, the rename into run and the counts delta are the move's. None, with
        nothing changed on disk, for anything unusual (``msg`` changed since indexed,
        unreadable, missing, big; the run bucket missing; the queue being recounted; not
        the daemon's store): the caller takes the general path, which handles each case."""
        gs = self._group_sync
        queue = ix.name
        if gs is None or queue in self._recounts or self._batch_depth:
            return None
        mid = e.msg_id
        qs, rel = str(ix.qdir), bucketed(mid)
        src = f"{qs}/que/{rel}"
        m = _indexed_message(e, src)
        if m is None:
            return None
        dst = f"{qs}/run/{rel}"
        at = self.clock()
        if not _logged_rename(src, dst, f'{{"state":"run","at":{at!r},"note":"run"}}\n'.encode(),
                              f"{queue}/{mid} to run"):
            return None  # gone, or no run bucket yet: the general path says which
        self._gather(ix.qdir, _CLAIM_DELTAS)
        self._held.pop((queue, mid), None)
        m.history.append({"state": "run", "at": at, "note": "run"})
        return self._hand_out(queue, m, cfg, owner, lease, now, (), src, dst)

    def _start(self, queue: str, msg_id: str, cfg: QueueConfig, owner: str, lease: float, now: float,
               dups: tuple[str, ...]) -> Attempt:
        # Not fsync'd: if a crash loses this rename the message is still in que, which is
        # where recovery would put it; the move out of run is the durable one.
        m = self.move(queue, msg_id, State.QUE, State.RUN, note="run", sync=False, cfg=cfg)
        qs, rel = str(self.qdir(queue)), bucketed(msg_id)
        a = self._hand_out(queue, m, cfg, owner, lease, now, dups, f"{qs}/que/{rel}", f"{qs}/run/{rel}")
        if self._daemon_fd < 0:
            self._write_attempt(a, Path(f"{qs}/run/{rel}"))  # the daemon's fence is _mine: no write per start
        return a

    def _hand_out(self, queue: str, m: Message, cfg: QueueConfig, owner: str, lease: float, now: float,
                  dups: tuple[str, ...], que_dir: str, run_dir: str) -> Attempt:
        """A message just moved from ``que_dir`` to ``run_dir``: its attempt, recorded."""
        if self._group_sync is not None and cfg.fsync:
            # Where a rename is not atomic on disk (ext4 without a journal) a producer's fsync
            # of the que bucket can write this move's removal long before anything writes the
            # run bucket: the message would be in neither after a power cut. Both are synced
            # soon, new entry first; what is left of the window, lost+found recovery covers.
            self._group_sync.add_rename(que_dir.rpartition("/")[0], run_dir.rpartition("/")[0],
                                        only_where_unsafe=True, dev=self._dev(queue))
        mid = m.msg_id
        a = Attempt(queue, mid, new_attempt_id(mid, m.count), owner, now + lease, m, dups,
                    cancel_requested=os.path.exists(f"{run_dir}/cancel"))
        if a.cancel_requested:
            self._cancel_seen.add((queue, mid))
        self._mine.setdefault(queue, {})[mid] = a
        return a

    def _dev(self, queue: str) -> int | None:
        """The device of a queue's directory, stat'ed once: the group commit asks at every
        move which filesystem's rules apply, and a stat per ask was part of the daemon's cost."""
        dev = self._devs.get(queue)
        if dev is None:
            try:
                dev = self._devs[queue] = os.stat(self.qdir(queue)).st_dev
            except OSError:
                return None
        return dev

    def _write_attempt(self, a: Attempt, run_dir: Path) -> None:
        """The fence for a process that does not hold the daemon lock (whose ``_mine`` is not
        trusted; without a file it is fenced out). Best effort: a message must not be
        stranded in run because this small write failed."""
        try:
            durable.write_replace(run_dir / ATTEMPT_FILE,
                                  json.dumps({"id": a.attempt_id, "owner": a.owner}).encode(), sync=False)
            self._attempt_files.add((a.queue, a.msg_id))
        except OSError as e:
            log.warning("%s/%s: cannot record the attempt: %s", a.queue, a.msg_id, e)

    def _messages(self, queue: str, state: State) -> builtins.list[tuple[str, Path, Message]]:
        out = []
        for msg_id, path, acked in iter_entries(self._existing_qdir(queue), state, newest_first=False):
            try:
                out.append((msg_id, path, self._read_msg(queue, state, path, acked)))
            except (CorruptMessage, MessageNotFound):
                continue  # set aside, or moved on while we looked
        return out

    # -- the fence -----------------------------------------------------------------------
    def _current_dir(self, a: Attempt) -> str:
        """The attempt's message directory in run, if the attempt is still the message's.
        ``_mine`` is trusted while this store holds the daemon lock (no other process can
        take over then); otherwise the ``attempt`` file decides. A string: building a Path
        per use was a measurable part of the daemon's cost per message."""
        mine = self._mine.get(a.queue, {}).get(a.msg_id) if self._daemon_fd >= 0 else None
        if mine is not None:
            if mine.attempt_id == a.attempt_id:
                return f"{self.qdir(a.queue)}/run/{bucketed(a.msg_id)}"
        else:
            current: str | None
            try:
                state, path, _ = self.locate(a.queue, a.msg_id)
                current = json.loads((path / ATTEMPT_FILE).read_bytes()).get("id") if state == State.RUN else None
            except (MessageNotFound, OSError, ValueError, AttributeError):
                current = None
            if current == a.attempt_id:
                return str(path)
        raise fenced_out(a)

    def workdir(self, attempt: Attempt) -> Path:
        """``<message>/job``: the script's cwd (RQ_MSG_DIR), beside ``msg`` and ``attach/``,
        kept from earlier attempts (the log goes on). Nothing below the message directory is
        followed: a link in the message directory's place is set aside (CorruptMessage), and
        one an earlier script left in ``job``'s place is removed."""
        run_dir = self._current_dir(attempt)
        dfd = self._open_message_dir(attempt, run_dir)
        try:
            _ensure_job(dfd)
        except OSError as e:
            raise durable.storage_error(e, f"cannot create {run_dir}/job") from None
        finally:
            os.close(dfd)
        return Path(f"{run_dir}/job")

    def attempt_dir(self, attempt: Attempt) -> str:
        """The message's own directory in run: nothing to create or copy. Never a link: what
        stands in its place (a link, a file) is set aside as for a script's start
        (:meth:`_open_message_dir`: CorruptMessage), so a persistent worker is never handed
        a path that leads out of the spool. One ``lstat``."""
        run_dir = self._current_dir(attempt)
        try:
            if stat.S_ISDIR(os.lstat(run_dir).st_mode):
                return run_dir
        except OSError as e:
            raise durable.storage_error(e, f"cannot reach {run_dir}") from None
        os.close(self._open_message_dir(attempt, run_dir))  # sets it aside and raises
        return run_dir  # replaced by a directory meanwhile: the fd said so

    def log_fd(self, attempt: Attempt) -> int:
        """``job/stdio.log`` opened for appending (the script writes to the file itself),
        reached without following a link; a link, a FIFO or another non-file in its place
        is replaced by a file (a FIFO is opened without blocking: no reader must hold the
        daemon)."""
        run_dir = self._current_dir(attempt)
        dfd = self._open_message_dir(attempt, run_dir)
        try:
            return _open_log_beneath(dfd)
        except OSError as e:
            raise durable.storage_error(e, f"cannot open {run_dir}/job/stdio.log") from None
        finally:
            os.close(dfd)

    def _open_message_dir(self, attempt: Attempt, run_dir: str) -> int:
        """An fd of the message directory itself, never of a link in its place. What a
        script left there instead of its message directory (a link, a file) is set aside
        into ``corrupt/``, not followed, and CorruptMessage raised: tried again, the start
        would fail the same way for ever."""
        try:
            return os.open(run_dir, _DIR_NOFOLLOW)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise durable.storage_error(e, f"cannot open {run_dir}") from None
        why = "not a directory (a link or a file in the message directory's place); not followed"
        self._set_aside(attempt.queue, State.RUN, Path(run_dir), False, why)
        raise CorruptMessage(f"message {attempt.msg_id} in {attempt.queue}/run: {why}; set aside in "
                             f"{self.qdir(attempt.queue) / 'corrupt'}")

    def start_job(self, attempt: Attempt) -> tuple[str, int]:
        """:meth:`workdir` and :meth:`log_fd` in one step, for the daemon's start of a script,
        on one fd of the message directory. A ``job/`` made in it just now is new and empty:
        nothing an earlier script left can be in its place, so its log is opened by its name
        there (four system calls, not eight). One kept from an earlier attempt is checked,
        and its log reached, as those two do."""
        run_dir = self._current_dir(attempt)
        job = f"{run_dir}/job"
        dfd = self._open_message_dir(attempt, run_dir)
        try:
            try:
                os.mkdir("job", dir_fd=dfd)
            except FileExistsError:
                _ensure_job(dfd)
                return job, _open_log_beneath(dfd)
            return job, os.open("job/stdio.log", _LOG_FLAGS, 0o644, dir_fd=dfd)
        except OSError as e:
            raise durable.storage_error(e, f"cannot open {job}/stdio.log") from None
        finally:
            os.close(dfd)

    def record_runner(self, attempt: Attempt, runner: str, *, lease: float) -> None:
        """The ``pid`` file: what runs the attempt (``pid spawn_ns host``), for recovery."""
        self._write_pid(self._current_dir(attempt), attempt, runner)

    def _write_pid(self, path: str, attempt: Attempt, runner: str) -> None:
        # Not fsync'd and not renamed into place: it matters only while this boot lasts, and
        # a daemon crash cannot tear a finished write(2).
        # A link a script left in its place is not followed (durable.open_own). Usually
        # there is none: the finish unlinks it.
        fd = durable.open_own(f"{path}/pid", os.O_WRONLY | os.O_CREAT, fresh=True, truncate=True)
        self._pid_files.add((attempt.queue, attempt.msg_id))
        try:
            os.write(fd, runner.encode() + b"\n")
        finally:
            os.close(fd)

    def heartbeat(self, attempt: Attempt, *, lease: float, runner: str | None = None,
                  now: float | None = None) -> Lease:
        now = self.clock() if now is None else now
        path = self._current_dir(attempt)
        if runner is not None:
            self._write_pid(path, attempt, runner)
        cancel = os.path.exists(f"{path}/cancel")
        if cancel:
            self._cancel_seen.add((attempt.queue, attempt.msg_id))
        return Lease(now + lease, cancel)

    # -- finish --------------------------------------------------------------------------
    def finish(self, attempt: Attempt, dst: State, *, status: str | None,
               update: Callable[[Message], None] | None = None, note: str = "",
               dup_status: str | None = None, dup_of: str | None = None) -> Message:
        q, msg_id = attempt.queue, attempt.msg_id
        path = self._current_dir(attempt)
        ix = self._watcher.indexes.get(q) if self._watcher is not None else None
        try:
            if status is not None and (status or os.path.exists(f"{path}/status")):
                self._write_status(q, msg_id, path, status)
            # First: a cancel must never follow the message into a later run. A pid file is
            # there only where a runner wrote one (never for a persistent worker's messages);
            # after a restart's reclaim, which marks its attempts as seen, it may be.
            seen = (q, msg_id) in self._cancel_seen
            for name in ("pid", "cancel") if seen else ("pid",) if (q, msg_id) in self._pid_files else ():
                try:
                    os.unlink(f"{path}/{name}")
                except FileNotFoundError:
                    pass
            cfg, _ = self._settings(q)
            deferred = update is None and self._group_sync is not None
            head, _, rel = path.rpartition("/run/")  # rel: the bucket and the id, never "/run/"
            landed = f"{head}/{dst}/{rel}"
            # The commit point. If it fails (a full disk) the attempt still holds the message
            # and the caller's retry passes the fence.
            got = self._finish_move(q, msg_id, path, landed, dst, note, attempt.message) if deferred else None
            m = got if got is not None else self.move(q, msg_id, State.RUN, dst, update=update, note=note,
                                                      sync=False if deferred else None,
                                                      current=attempt.message, cfg=cfg)
        except (WrongState, MessageNotFound, QueueNotFound, FileNotFoundError) as e:
            # Not in run any more (moved or deleted by hand, the queue deleted, or a retry of
            # a move whose rename landed before its fsync failed): nothing to retry.
            self._let_go(attempt, ix, dst=None)
            raise WrongState(f"{q}/{msg_id} left run without this attempt: {e}") from None
        except CorruptMessage:
            # Its msg was unreadable when the finish rewrote it: set aside (I7), out of run.
            self._let_go(attempt, ix, dst=None)
            raise
        if deferred and cfg.fsync and self._group_sync is not None:  # destination first
            self._group_sync.add_rename(path.rpartition("/")[0], landed.rpartition("/")[0], dev=self._dev(q))
        if (q, msg_id) in self._attempt_files:
            try:
                os.unlink(f"{landed}/{ATTEMPT_FILE}")
            except OSError:
                pass  # the message moved on already
        if ix is not None and dst == State.QUE:
            ix.requeued(msg_id)
        self._let_go(attempt, ix, dst=dst, dup_of=dup_of,
                     dup_status=dup_status if dup_status is not None else f"duplicate {dup_of or msg_id}",
                     note=note)
        return m

    def _finish_move(self, queue: str, msg_id: str, src: str, dest: str, dst: State, note: str,
                     current: Message) -> Message | None:
        """The daemon's move of its own attempt out of run when ``msg`` is not rewritten,
        lean: the generic ``move`` on strings, without reading what the attempt holds. None,
        with nothing changed, where the general path must decide (the message gone from run,
        the destination bucket missing, the queue being recounted, a ``durable_batch``, whose
        ``syncfs`` the generic move asks for)."""
        if queue in self._recounts or self._batch_depth:
            return None
        check_transition(State.RUN, dst)
        state = str(dst)
        at = self.clock()
        entry = {"state": state, "at": at, **({"note": note} if note else {})}
        # The line _json(entry) would make, without the encoder's Python layers.
        line = (f'{{"state":"{state}","at":{at!r},"note":{_ascii_str(note)}}}\n' if note
                else f'{{"state":"{state}","at":{at!r}}}\n')
        if not _logged_rename(src, dest, line.encode(), f"{queue}/{msg_id} to {dst}"):
            return None
        self._gather(self.qdir(queue), _FINISH_DELTAS[state])
        current.history.append(entry)  # the attempt's own copy, over now: no copy of it made
        return current

    def _let_go(self, attempt: Attempt, ix: QueueIndex | None, *, dst: State | None, dup_of: str | None = None,
                dup_status: str = "", note: str = "") -> None:
        """The attempt is over: forget it; its held duplicates end with it when it succeeded
        (``dst``), else run on their own."""
        key = (attempt.queue, attempt.msg_id)
        self._mine.get(attempt.queue, {}).pop(attempt.msg_id, None)
        self._cancel_seen.discard(key)
        self._attempt_files.discard(key)
        self._pid_files.discard(key)
        for d in attempt.dups:
            if self._held.pop((attempt.queue, d), None) not in (None, attempt.attempt_id):
                continue
            if dst not in SUCCESS:
                if ix is not None:
                    ix.release(d)
                continue
            if ix is not None:
                ix.drop(d)

            def mark(m: Message) -> None:
                m.dup = dup_of or ""

            try:
                # The move first: a duplicate cancelled meanwhile keeps its own status.
                self.move(attempt.queue, d, State.QUE, dst, update=mark if dup_of else None,
                          note=f"duplicate of {dup_of}" if dup_of else (note or str(dst)))
                self.set_status(attempt.queue, d, dup_status)
            except SpoolqError as e:
                # It left que meanwhile (deleted, cancelled), or the disk refused: it stays
                # queued and runs on its own (at-least-once, nothing lost).
                log.info("%s/%s: duplicate not finished with its parent: %s", attempt.queue, d, e)
                if ix is not None:
                    ix.requeued(d)

    def _write_status(self, queue: str, msg_id: str, path: str, text: str) -> None:
        try:
            durable.write_replace(f"{path}/status", json.dumps({"job_status": text}).encode(), sync=False)
        except FileNotFoundError:
            raise  # the message directory is gone: the caller decides
        except OSError as e:
            raise durable.storage_error(e, f"cannot set status of {queue}/{msg_id}") from None

    # -- reclaim -------------------------------------------------------------------------
    def reclaim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> builtins.list[Attempt]:
        """Only the daemon (the holder of ``daemon.pid``'s lock, or of a dispatch helper's)
        reclaims: then every attempt in run that this store did not hand out, among the
        messages its process owns (``part``), belongs to a daemon that is gone. Once per queue
        per lock: while it is held nothing else puts attempts in run, so the daemon's periodic
        reclaim (for stores shared by hosts) costs nothing here."""
        now = self.clock() if now is None else now
        out: builtins.list[Attempt] = []
        if self._daemon_fd < 0 or queue in self._reclaimed:
            return out  # a live daemon may hold them: leave them alone
        mine = self._mine.setdefault(queue, {})
        owns = self.part.owns
        for msg_id, path, m in self._messages(queue, State.RUN):
            if msg_id in mine or not owns(queue, msg_id):
                continue  # ours and alive, or another dispatch process's (parts.py)
            try:
                runner: str | None = read_whole(path / "pid").decode(errors="replace").strip() or None
            except OSError:
                runner = None
            a = Attempt(queue, msg_id, new_attempt_id(msg_id, m.count), owner, now + lease, m,
                        cancel_requested=(path / "cancel").exists(), runner=runner)
            self._cancel_seen.add((queue, msg_id))  # unlinked at its finish whatever it was
            mine[msg_id] = a
            self._write_attempt(a, path)
            out.append(a)
        self._reclaimed.add(queue)
        return out


def _ensure_job(dfd: int) -> None:
    """``job`` in the message directory ``dfd`` a plain directory: made if missing; a link
    or a file an earlier script left in its place removed first."""
    try:
        if stat.S_ISDIR(os.stat("job", dir_fd=dfd, follow_symlinks=False).st_mode):
            return
        os.unlink("job", dir_fd=dfd)
    except FileNotFoundError:
        pass
    os.mkdir("job", dir_fd=dfd)


def _open_log_beneath(dfd: int) -> int:
    """``job/stdio.log`` of the message directory ``dfd``, ``job`` reached without following
    a link (ELOOP or ENOTDIR if one is there now), the log as :func:`~spoolq.durable.open_own_log`
    opens it."""
    jfd = os.open("job", _DIR_NOFOLLOW, dir_fd=dfd)
    try:
        return durable.open_own_log("stdio.log", dir_fd=jfd)
    finally:
        os.close(jfd)


def _indexed_message(e: Entry, src: str) -> Message | None:
    """The message in the directory ``src`` that ``e`` was indexed from: ``msg`` must still
    be that file (``Entry.same``). The index's validated copy is taken on a stat where the
    stamp vouches for the content (``Entry.raw`` None: filestamp's rule), else on a read
    that finds the same bytes; otherwise what is read is validated and runs. None for
    anything unusual (changed, gone, unreadable, big, another id)."""
    m = e.message
    if m is not None and e.raw is None:
        try:
            return m if e.same(os.stat(f"{src}/msg")) else None
        except OSError:
            return None
    try:
        fd = os.open(f"{src}/msg", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not e.same(os.fstat(fd)):
            return None
        raw = os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)
    if m is not None and raw == e.raw:
        return m
    if len(raw) >= 65536:
        return None
    try:
        m = Message.from_dict(json.loads(raw))
    except (ValueError, TypeError, RecursionError, SpoolqError):
        return None
    return m if m.msg_id == e.msg_id else None


def _logged_rename(src: str, dst: str, line: bytes, what: str) -> bool:
    """:func:`~.writing.logged_rename` with a plain rename (no bucket made, no counts):
    False, with nothing changed, when something is missing (the message, or ``dst``'s
    bucket); Conflict or StorageError as the generic ``move`` says them."""

    def rename() -> None:
        durable._check("rename", dst)
        os.rename(src, dst)

    try:
        logged_rename(src, line, rename)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # as _publish: clock went back, inode reused
            raise Conflict(f"cannot move {what}: the id exists there already") from None
        raise durable.storage_error(e, f"cannot move {what}") from None
    return True


class _Abandoned(Exception):
    """A recount whose moves were handed back to the usual counting before its walk ended."""


def _group_sync_failed(directory: str, e: OSError) -> None:
    log.error("fsync of %s failed: %s; messages finished into it may run again after a crash",
              directory, e)
