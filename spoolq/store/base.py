"""The Store protocol: everything the client, daemon and HTTP layer need from storage.

Two implementations pass one contract suite (``tests/test_store_contract.py``): the
filesystem store (the default, ``spoolq.store.fs``) and a memory store (reference and
tests). Every store keeps the state table of docs/internals.md: a message is in exactly
one state, moves only along :data:`spoolq.model.TRANSITIONS`, and every move is atomic.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from ..config import RootConfig
from ..errors import AttachmentNotFound, InvalidInput, InvalidName, SpoolqError
from ..ids import validate_attachment_name
from ..model import AdminState, AttachmentInfo, IdPage, ListPage, Message, MessageView, QueueConfig, State
from ..parts import Part
from .leases import Attempt, Lease


@dataclass
class AttachmentSource:
    """An attachment to add: a local file (``path``) or a readable binary stream (``stream``).

    ``name`` defaults to the file's basename. A file is copied, so rewriting it later cannot
    change the message (a reflink where the filesystem can share extents, btrfs or xfs with
    reflink: no data is copied then). ``link=True`` hard-links a file on the spool's
    filesystem instead (copied elsewhere): the caller promises never to change it in place,
    since the message would change with it and no longer match its recorded md5. Either way
    md5, sha256 and size are recorded.
    """

    name: str | None = None
    path: str | None = None
    stream: BinaryIO | None = None
    link: bool = False


@dataclass
class SweepResult:
    """What a sweep did: debris removed, messages put back into a state, and what it left
    alone for a person to look at (each a line of text)."""

    removed: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@contextmanager
def copied_attachments(store: Store, queue: str, msg_id: str,
                       names: Sequence[str]) -> Iterator[list[AttachmentSource]]:
    """Sources for copying a message's attachments into another (clone, dup), each opened
    through the store, which follows no link a script left (store/fs/beneath.py): an
    attachment it refuses is not copied. The files are closed on exit."""
    with ExitStack() as stack:
        out: list[AttachmentSource] = []
        for n in names:
            try:
                f = store.open_attachment(queue, msg_id, n)
            except AttachmentNotFound:
                continue
            stack.enter_context(f)
            out.append(AttachmentSource(name=n, stream=f))
        yield out


def attachment_name(src: AttachmentSource) -> str:
    """The validated name an attachment will be stored under (default: the file's basename)."""
    name = src.name or (os.path.basename(src.path) if src.path else "")
    if not name:
        raise InvalidName("an attachment needs a name")
    return validate_attachment_name(name)


@contextmanager
def source_stream(src: AttachmentSource) -> Iterator[BinaryIO]:
    """The bytes of an attachment to add, for stores that copy them: its file (an absolute
    path to a readable regular file, as the filesystem store requires) or its stream."""
    if src.path is None:
        if src.stream is None:
            raise InvalidInput("an attachment needs a path or a stream")
        yield src.stream
        return
    checked_path(src.path)
    try:
        f = open(src.path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError:
        raise InvalidInput(f"Attachment currently cannot be read: {src.path}") from None
    with f:
        yield f


def checked_path(path: str) -> os.stat_result:
    """The stat of a file to attach: an absolute path to a readable regular file (InvalidInput)."""
    if not os.path.isabs(path):
        raise InvalidInput(f"Invalid pathname, must be normalized {path} (ie. must start with /")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInput(f"No such file {path} to attach to message") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"Attachment currently cannot be a directory {path}")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"Attachment currently not of supported type: {path}")
    if not os.access(path, os.R_OK):
        raise InvalidInput(f"Attachment currently cannot be read: {path}")
    return st


def check_attachment_names(attachments: Sequence[AttachmentSource]) -> None:
    """Every attachment of one message needs its own valid name (InvalidName, InvalidInput)."""
    seen: set[str] = set()
    for a in attachments:
        name = attachment_name(a)
        if name in seen:
            raise InvalidInput(f"two attachments named {name!r}: give them different names")
        seen.add(name)


class MessageWatch(Protocol):
    """What :meth:`Store.watch_message` returns: a way to sleep until a message may have changed."""

    def wait(self, timeout: float) -> None:
        """Return when the message may have changed (moved, deleted; with ``log``, its log
        grew), or after ``timeout`` seconds. Spurious returns are allowed: look again."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> MessageWatch: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class Change:
    """Something a daemon should look at again, from :meth:`Store.watch`.

    ``queues``: the set of queues may have changed. ``config``: a queue's config or admin
    state may have changed. ``work``: a queue may have something new to claim. ``cancel``:
    a cancel was asked for a message this store's daemon holds (``msg_id``).
    """

    kind: str
    queue: str | None = None
    msg_id: str | None = None


class Watcher(Protocol):
    """What :meth:`Store.watch` returns: the daemon's feed of changes, to select on."""

    def fileno(self) -> int:
        """Readable when changes may be pending."""
        ...

    def changes(self, budget: float = 0.004) -> list[Change]:
        """Drain what happened, doing at most ``budget`` seconds of the store's own work
        (the filesystem indexes queues in slices); never blocks."""
        ...

    @property
    def busy(self) -> bool:
        """The store has work left: call :meth:`changes` again without waiting."""
        ...

    @property
    def wake_at(self) -> float | None:
        """Call :meth:`changes` by then (monotonic clock) even if ``fileno`` stays quiet."""
        ...

    def want(self, queue: str, on: bool) -> None:
        """The caller will (not) claim from ``queue`` (it is UP, or not): a store may keep
        an index of its queued messages meanwhile."""
        ...

    def resync(self) -> None:
        """Changes may have been missed, or files edited by hand (SIGHUP): read again."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LostFoundRepair(Protocol):
    """A store that can put back what a filesystem check moved to ``lost+found`` (FsStore)."""

    def recover_lost_found(self, lost_found: str | os.PathLike[str] | None = None) -> SweepResult: ...


@runtime_checkable
class LocalSpool(Protocol):
    """A store that is a directory on this machine (FsStore): the HTTP server spools uploads
    on its filesystem, so storing one is a hard link; its housekeeping sweeps the root and
    orders the start-up recounts by the cached counts."""

    root: Path

    def sweep_root(self, *, older_than: float = 3600.0) -> builtins.list[str]: ...

    def cached_counts(self, queue: str) -> dict[str, int] | None: ...


@runtime_checkable
class LiveRecounts(Protocol):
    """A store whose recount lets the daemon's own moves go on meanwhile (FsStore: the
    recount holds the counts lock, which producers wait for; store/fs/recount.py). The
    daemon dispatches from a queue whose ``begin_recount`` said True without waiting."""

    def begin_recount(self, queue: str) -> bool: ...


@runtime_checkable
class DispatchParts(Protocol):
    """A store that several dispatch processes on one host can share, each owning a part of
    the messages (FsStore; ``serve --dispatchers``, parts.py). ``part`` is set before
    ``acquire_daemon``: it names the process's lock, and what it indexes and recovers."""

    part: Part

    def wait_for_helpers(self, timeout: float) -> list[str]:
        """Wait until no dispatch helper (of an earlier daemon) holds its lock; what is still
        held after ``timeout`` seconds."""
        ...

    def reclaim_again(self, queue: str) -> None:
        """The next ``reclaim`` of ``queue`` walks ``run/`` again: its part changed hands (no
        helper runs), and what a helper left there is now this process's to recover."""
        ...

    def dispatch_processes(self) -> list[tuple[int, int | None, bool | None]]:
        """The processes serving the store now, the main one first: ``(index, pid, held)``,
        index 0 the main process, ``held`` None where it cannot be told (permissions); none
        if no daemon serves it. Read-only (``spoolq status``)."""
        ...


@runtime_checkable
class LocalWork(Protocol):
    """A store whose scripts' working directories are made on this host (PostgreSQL): the
    daemon says where (``<home>/work``)."""

    local_dir: Path | None


class Store(Protocol):
    """Storage for queues and messages. All methods are safe to call from many processes."""

    url: str

    # -- the store as a whole ------------------------------------------------------
    def root_config(self) -> RootConfig:
        """Where the daemon serving this store listens (its full ids name it)."""
        ...

    def set_root_config(self, cfg: RootConfig) -> bool:
        """Record ``cfg``; writes only when it differs (a daemon must start on a full disk).
        Returns whether it wrote. StorageError when the write fails."""
        ...

    def acquire_daemon(self) -> None:
        """Become the daemon serving this store (the filesystem: ``<root>/daemon.pid``
        locked for the daemon's life, one per root). DaemonRunning when it is taken."""
        ...

    def release_daemon(self) -> None:
        """Stop serving: what :meth:`acquire_daemon` took is let go."""
        ...

    def served(self) -> bool | None:
        """Does a daemon serve this store now? None when the store cannot tell. Asking
        changes nothing."""
        ...

    # -- queues -----------------------------------------------------------------
    def create_queue(self, config: QueueConfig) -> None:
        """Create a queue. Raises QueueExists if it exists."""

    def update_queue(self, config: QueueConfig) -> None:
        """Replace a queue's config (applies to the next run). Raises QueueNotFound."""

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        """Remove a queue. Refuses (Conflict) while messages are in prep, que or run unless ``force``."""

    def queues(self) -> list[str]:
        """Names of all queues, sorted."""

    def queue_config(self, name: str) -> QueueConfig: ...

    def admin_state(self, name: str) -> AdminState: ...

    def set_admin_state(self, name: str, state: AdminState) -> None:
        """Make the admin state exactly UP, PAUSE or DOWN (both flags set accordingly);
        persisted so it survives restarts."""

    def script_error(self, name: str) -> str | None:
        """Why the daemon cannot start this queue's script (its SCRIPTERROR), or None."""

    def set_script_error(self, name: str, why: str | None) -> None:
        """Record (or clear, with None) the daemon's SCRIPTERROR for a queue."""

    def set_admin_flag(self, name: str, flag: str, on: bool) -> None:
        """Set or clear one admin flag, ``pause`` or ``down``, leaving the other as it is
        (RQ's pause/resume/down/up actions; the state is DOWN if down is set, else PAUSE
        if pause is set, else UP)."""

    # -- creating messages --------------------------------------------------------
    def create(
        self,
        queue: str,
        msg: Message,
        *,
        attachments: Sequence[AttachmentSource] = (),
        state: State = State.QUE,
    ) -> Message:
        """Store a new message in ``prep`` or ``que``; returns it with ``msg_id`` and ``created_at`` set.

        Durable before it returns (unless the queue has ``fsync: false``). A DOWN queue
        raises QueueDown. Nothing partial is ever visible: on any error nothing was stored.
        """

    def create_many(self, queue: str, msgs: Sequence[Message], *, state: State = State.QUE) -> list[Message]:
        """Store many messages in ``state`` (que, or prep) with one group commit; all or nothing."""

    def single_que(self, queue: str, msg: Message) -> tuple[str, bool]:
        """RQ's ``single_que``: ``msg`` in ``que`` only if no message waits there; returns
        (the id of the first waiting message, or of the new one; whether it was created).
        Atomic among callers of this method: two of them never both create."""

    def attach(self, queue: str, msg_id: str, source: AttachmentSource) -> AttachmentInfo:
        """Add an attachment to a message in prep (the same name replaces). WrongState otherwise."""

    def delete_attachment(self, queue: str, msg_id: str, name: str) -> None: ...

    def commit(self, queue: str, msg_id: str) -> None:
        """prep -> que. Committing a queued message again is a no-op (idempotent, as in RQ);
        one already running or finished raises WrongState."""

    # -- reading ------------------------------------------------------------------
    def get(self, queue: str, msg_id: str) -> MessageView:
        """The message with its state, job status, attachments and history."""

    def state_of(self, queue: str, msg_id: str) -> State: ...

    def list(
        self,
        queue: str,
        state: State,
        *,
        limit: int = 50,
        cursor: str | None = None,
        filter: str | None = None,
        scan_limit: int | None = None,
    ) -> ListPage:
        """Messages in ``state``, newest first. ``cursor`` is the ``next_cursor`` of the
        previous page; ``filter`` is a casefolded substring of model.search_text (the id,
        src, dest, param1..4, orig_msg_id, ``params`` as ``key=value``, the status);
        ``scan_limit`` bounds how many messages one call examines (see ListPage)."""

    def find_ids(self, queue: str, state: State, *, filter: str | None = None, cursor: str | None = None,
                 limit: int = 1000, scan_limit: int | None = None) -> IdPage:
        """What :meth:`list` would list, ids only (bulk operations walk a state with it)."""

    def counts(self, queue: str) -> dict[str, int]:
        """Messages per state (``err`` excludes acknowledged errors, counted as ``err_acked``)."""

    def open_attachment(self, queue: str, msg_id: str, name: str) -> BinaryIO:
        """An attachment's bytes (AttachmentNotFound; never through a symbolic link)."""

    def open_log(self, queue: str, msg_id: str, name: str = "stdio.log") -> BinaryIO:
        """A file of the message's ``job/`` directory, by default the script's output
        (LogNotFound when there is none yet; never through a symbolic link)."""

    def watch_message(self, queue: str, msg_id: str, *, log: bool = False) -> MessageWatch:
        """A watch on one message, armed before this returns (so a change after it wakes the
        first ``wait``); ``log``: wake on log output too. For ``wait`` and ``log -f``."""
        ...

    def watch(self) -> Watcher:
        """The daemon's feed of changes (queues, configs, new work, cancels)."""
        ...

    # -- changing messages -------------------------------------------------------
    def move(
        self,
        queue: str,
        msg_id: str,
        src: State,
        dst: State,
        *,
        update: Callable[[Message], None] | None = None,
        note: str = "",
    ) -> Message:
        """Move a message from ``src`` to ``dst`` (one atomic step), optionally rewriting it first.

        Raises WrongState if the transition is not allowed or the message is not in ``src``
        (someone else moved it: the caller lost a race and must not act on it). A message
        in run belongs to its attempt: ``finish`` it (moving it out of run by hand takes it
        from the daemon that runs it).
        """

    def update(self, queue: str, msg_id: str, fn: Callable[[Message], None]) -> Message:
        """Rewrite a message in place (whatever its state), atomically. A daemon serving the
        store sees a queued message's new fields (due time, params) at once."""

    def set_status(self, queue: str, msg_id: str, text: str) -> None:
        """Set the job status text shown as ``"<state> - <text>"``."""

    # -- attempts (leases.py) --------------------------------------------------------------
    def claim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> Attempt | float | None:
        """que -> run for the next runnable message of ``queue`` (leases.pick), leased to
        ``owner`` for ``lease`` seconds, with its coalesced duplicates held. Returns the
        Attempt; or when the next message becomes due; or None (nothing to run, or the
        queue is not UP). Never hands one message to two attempts at once."""
        ...

    def heartbeat(self, attempt: Attempt, *, lease: float, runner: str | None = None,
                  now: float | None = None) -> Lease:
        """Extend the attempt's lease; record ``runner`` (what runs it) when given; report a
        pending cancel. LeaseLost when the attempt is no longer the message's."""
        ...

    def workdir(self, attempt: Attempt) -> Path:
        """A local directory, created if needed, for the attempt's script to run in
        (RQ_MSG_DIR), whose parent holds ``msg`` and ``attach/`` as RQ's scripts expect."""
        ...

    def start_job(self, attempt: Attempt) -> tuple[str, int]:
        """:meth:`workdir` (as a string) and :meth:`log_fd` together: what the daemon needs
        to start the attempt's script (a store may do both in fewer steps)."""
        ...

    def record_runner(self, attempt: Attempt, runner: str, *, lease: float) -> None:
        """Record what runs the attempt (``pid spawn_ns host``, for recovery), as
        :meth:`heartbeat` with ``runner`` does, without asking about a cancel (the daemon
        learns of one from the store's watch, and at the script's end). LeaseLost when the
        attempt is no longer the message's."""
        ...

    def durable_batch(self) -> contextlib.AbstractContextManager[None]:
        """A block whose moves may be made durable together at its end (the filesystem: one
        syncfs instead of fsyncs per move); elsewhere nothing changes."""
        ...

    def attempt_dir(self, attempt: Attempt) -> str:
        """The local directory (its path) holding the attempt's ``msg`` and ``attach/`` (what
        a persistent worker is handed; it runs elsewhere, so no ``job/`` is needed)."""
        ...

    def log_fd(self, attempt: Attempt) -> int:
        """A new fd (close-on-exec, the caller closes it) that the script's stdout and stderr
        go to; what is written to it is appended to the message's log, ``stdio.log``."""
        ...

    def finish(self, attempt: Attempt, dst: State, *, status: str | None,
               update: Callable[[Message], None] | None = None, note: str = "",
               dup_status: str | None = None, dup_of: str | None = None) -> Message:
        """End the attempt: set ``status`` (None: leave it), clear its runner and cancel
        request, run -> ``dst`` (``update`` rewrites the message on the way). Held
        duplicates go to ``dst`` too on success, with ``dup = dup_of`` and status
        ``dup_status`` (default ``duplicate <dup_of>``), and back to the queue otherwise.
        Fenced: LeaseLost when the attempt is no longer the message's current one."""
        ...

    def reclaim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> builtins.list[Attempt]:
        """The attempts of ``queue`` whose holder is gone (its lease ran out), re-leased to
        ``owner`` so that it finishes them; each carries the old holder's ``runner`` and
        any cancel request. Their old attempt ids are fenced out."""
        ...

    def cancel(self, queue: str, msg_id: str) -> State:
        """Stop a message. Queued: it goes to err with status ``cancelled`` (returns ERR).
        Running: the request is recorded and the daemon that runs it is told; it kills the
        script and the message ends in err, ``cancelled`` (returns RUN). Any other state:
        WrongState. Nothing is killed from the caller's process: it may be another machine."""
        ...

    def delete(self, queue: str, msg_id: str) -> None:
        """Remove a message (any state but run: cancel it first)."""

    def delete_many(self, queue: str, msg_ids: Sequence[str], *, state: State | None = None,
                    acked: bool | None = None) -> builtins.list[tuple[str, SpoolqError]]:
        """Delete each message (as :meth:`delete`), cheaper than one by one; returns the
        ``(msg_id, error)`` of those that could not be deleted. With ``state`` (and for err
        ``acked``), only a message still in that state is deleted, checked atomically with
        the deletion (WrongState otherwise): what a caller chose by state cannot be lost to
        a move made meanwhile (a retry, a commit)."""

    def relay_key(self, queue: str, key: str) -> str | None:
        """The message of ``queue`` a relay with ``key`` made (recorded by
        :meth:`set_relay_key` in the last seven days, and still there), or None."""
        ...

    def set_relay_key(self, queue: str, key: str, msg_id: str) -> None:
        """Record that ``msg_id`` was made for the relay ``key``: durable before it returns
        (the prep's answer follows). Kept seven days; the queue's sweep drops older ones."""

    def relay_lock(self, queue: str, key: str) -> contextlib.AbstractContextManager[object]:
        """Held around the look-up of ``key`` and the prep made for it, so that two relays
        of one message at once make one prep (docs/relay.md): across the process on the
        filesystem and in memory (one daemon answers), across the hosts of a database."""
        ...

    def ack_errs(self, queue: str) -> int:
        """Acknowledge every unacknowledged error; returns how many."""

    def recount(self, queue: str) -> dict[str, int]:
        """Recompute the counts from the messages themselves (after a crash or by hand)."""

    def sweep(self, queue: str, *, older_than: float = 3600.0) -> SweepResult:
        """Remove debris of dead producers and empty buckets, and put complete messages that
        a crash left in staging into their state; returns what it did."""


_RELAY_KEY_LOCKS = [threading.Lock() for _ in range(64)]


def process_relay_lock(queue: str, key: str) -> threading.Lock:
    """:meth:`Store.relay_lock` for stores one process serves: striped by key."""
    return _RELAY_KEY_LOCKS[hash((queue, key)) % len(_RELAY_KEY_LOCKS)]
