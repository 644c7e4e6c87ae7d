"""The memory store: the reference implementation of the Store protocol, for tests.

It keeps the same rules as the filesystem store (state table, transitions, validation,
errors) with none of the durability. Job directories, which scripts need, are created on
demand under a private temporary directory.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from .. import durable
from ..config import RootConfig
from ..errors import (
    AttachmentNotFound,
    Conflict,
    InvalidInput,
    LogNotFound,
    MessageNotFound,
    QueueDown,
    QueueExists,
    QueueNotFound,
    SpoolqError,
    WrongState,
)
from ..ids import log_name_ok, make_id, sort_key, validate_attachment_name, validate_msg_id, validate_queue_name
from ..model import (
    ADMIN_FLAGS,
    COUNT_KEYS,
    AdminState,
    AttachmentInfo,
    IdPage,
    ListPage,
    Message,
    MessageView,
    QueueConfig,
    State,
    check_transition,
    runner_host,
    search_text,
)
from .base import (
    AttachmentSource,
    Change,
    SweepResult,
    attachment_name,
    check_attachment_names,
    process_relay_lock,
    source_stream,
)
from .changes import ChangeQueue
from .leases import SUCCESS, Attempt, Candidate, Lease, fenced_out, new_attempt_id, params_of, pick
from .local import materialize
from .scratch import ScratchDirs


@dataclass
class _Entry:
    msg: Message
    state: State
    status: str = ""
    acked: bool = False
    attachments: dict[str, tuple[bytes, AttachmentInfo]] = field(default_factory=dict)
    cancel_requested: bool = False
    attempt: Attempt | None = None  # the current attempt while in run
    runner: str | None = None
    held_by: str | None = None  # attempt id of the parent holding this queued duplicate


@dataclass
class _Queue:
    config: QueueConfig
    flags: set[str] = field(default_factory=set)
    script_error: str | None = None
    messages: dict[str, _Entry] = field(default_factory=dict)
    relay_keys: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (msg_id, when)


class _NapWatch:
    """The memory store's message watch: it naps briefly (a dict in this process is cheap to
    look at again; the memory store is for tests and embedding, not for waiting at scale)."""

    NAP = 0.02

    def wait(self, timeout: float) -> None:
        time.sleep(max(0.0, min(timeout, self.NAP)))

    def close(self) -> None:
        return None

    def __enter__(self) -> _NapWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _MemWatcher:
    """The memory store's change feed: a pipe made readable by the store's own mutations."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._queue = ChangeQueue()
        self.busy = False
        self.wake_at: float | None = None

    def fileno(self) -> int:
        return self._queue.fileno()

    def post(self, change: Change) -> None:
        self._queue.post([change])

    def changes(self, budget: float = 0.004) -> builtins.list[Change]:
        return self._queue.take()

    def want(self, queue: str, on: bool) -> None:
        return None  # nothing to index: claim looks at every queued message

    def resync(self) -> None:
        self.post(Change("queues"))

    def close(self) -> None:
        with self._store._lock:
            if self in self._store._watchers:
                self._store._watchers.remove(self)
        self._queue.close()


class MemoryStore:
    """All data in process memory; thread-safe through one lock (fine for a reference)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.url = "memory:"
        self._root_config = RootConfig()
        self._daemon = False
        self.clock = clock
        self._q: dict[str, _Queue] = {}
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._scratch = ScratchDirs("spoolq-mem-")
        self._watchers: builtins.list[_MemWatcher] = []

    def watch(self) -> _MemWatcher:
        w = _MemWatcher(self)
        with self._lock:
            self._watchers.append(w)
        return w

    def _notify(self, kind: str, queue: str | None = None, msg_id: str | None = None) -> None:
        with self._lock:
            for w in self._watchers:
                w.post(Change(kind, queue, msg_id))

    def _queue(self, name: str) -> _Queue:
        validate_queue_name(name)
        q = self._q.get(name)
        if q is None:
            raise QueueNotFound(f"no such queue: {name}")
        return q

    def _entry(self, queue: str, msg_id: str) -> _Entry:
        validate_msg_id(msg_id)
        e = self._queue(queue).messages.get(msg_id)
        if e is None:
            raise MessageNotFound(f"no message {msg_id} in queue {queue}")
        return e

    # -- the store as a whole ---------------------------------------------------------------
    def root_config(self) -> RootConfig:
        return RootConfig(self._root_config.host, self._root_config.port)

    def set_root_config(self, cfg: RootConfig) -> bool:
        if (cfg.host, cfg.port) == (self._root_config.host, self._root_config.port):
            return False
        self._root_config = RootConfig(cfg.host, cfg.port)
        return True

    def acquire_daemon(self) -> None:
        self._daemon = True  # one process holds the store: its daemon is the only one

    def release_daemon(self) -> None:
        self._daemon = False

    def served(self) -> bool | None:
        return self._daemon

    # -- queues --------------------------------------------------------------------------
    def create_queue(self, config: QueueConfig) -> None:
        with self._lock:
            validate_queue_name(config.name)
            if config.name in self._q:
                raise QueueExists(f"queue {config.name} already exists")
            self._q[config.name] = _Queue(QueueConfig.from_dict(config.to_dict()))
            self._notify("queues")

    def update_queue(self, config: QueueConfig) -> None:
        with self._lock:
            self._queue(config.name).config = QueueConfig.from_dict(config.to_dict())
            self._notify("config", config.name)

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        with self._lock:
            self._queue(name)
            c = self.counts(name)
            busy = {k: c[k] for k in ("prep", "que", "run") if c[k]}
            if busy and not force:
                raise Conflict(f"queue {name} still holds messages ({busy}); drain it first or use --force")
            del self._q[name]
            self._notify("queues")

    def queues(self) -> list[str]:
        return sorted(self._q)

    def queue_config(self, name: str) -> QueueConfig:
        return QueueConfig.from_dict(self._queue(name).config.to_dict())

    def admin_state(self, name: str) -> AdminState:
        f = self._queue(name).flags
        return AdminState.of_flags("pause" in f, "down" in f)

    def set_admin_state(self, name: str, state: AdminState) -> None:
        state = AdminState(state)
        self.set_admin_flag(name, "down", state == AdminState.DOWN)
        self.set_admin_flag(name, "pause", state == AdminState.PAUSE)

    def script_error(self, name: str) -> str | None:
        return self._queue(name).script_error

    def set_script_error(self, name: str, why: str | None) -> None:
        self._queue(name).script_error = why

    def set_admin_flag(self, name: str, flag: str, on: bool) -> None:
        if flag not in ADMIN_FLAGS:
            raise InvalidInput(f"admin flag must be pause or down, not {flag!r}")
        flags = self._queue(name).flags
        if on:
            flags.add(flag)
        else:
            flags.discard(flag)
        self._notify("config", name)

    # -- creating ------------------------------------------------------------------------
    def _new(self, queue: str, msg: Message, state: State) -> Message:
        q = self._queue(queue)
        if "down" in q.flags:
            raise QueueDown(f"queue {queue} is DOWN: it refuses new messages")
        now = self.clock()
        m = Message.from_dict(msg.to_dict())
        m.msg_id = make_id(now, next(self._seq))
        m.created_at = now
        m.due = m.due or now
        m.dest = m.dest or queue
        m.history = [{"state": str(state), "at": now}]
        m.encode()  # validates size and serializability
        return m

    def create(
        self,
        queue: str,
        msg: Message,
        *,
        attachments: Sequence[AttachmentSource] = (),
        state: State = State.QUE,
    ) -> Message:
        if state not in (State.QUE, State.PREP):
            raise InvalidInput("new messages start in que or prep")
        check_attachment_names(attachments)
        with self._lock:
            m = self._new(queue, msg, state)
            entry = _Entry(m, state)
            for a in attachments:
                info, data = self._read_attachment(a)
                entry.attachments[info.name] = (data, info)
            self._queue(queue).messages[m.msg_id] = entry
            if state == State.QUE:
                self._notify("work", queue, m.msg_id)
            return Message.from_dict(m.to_dict())

    def single_que(self, queue: str, msg: Message) -> tuple[str, bool]:
        with self._lock:
            waiting = [i for i, e in self._queue(queue).messages.items() if e.state == State.QUE]
            if waiting:
                return min(waiting, key=sort_key), False
            return self.create(queue, msg).msg_id, True

    def create_many(self, queue: str, msgs: Sequence[Message], *, state: State = State.QUE) -> list[Message]:
        if state not in (State.QUE, State.PREP):
            raise InvalidInput("new messages start in que or prep")
        with self._lock:
            made = [self._new(queue, m, state) for m in msgs]
            for m in made:
                self._queue(queue).messages[m.msg_id] = _Entry(m, state)
            self._notify("work", queue)
            return [Message.from_dict(m.to_dict()) for m in made]

    @staticmethod
    def _read_attachment(a: AttachmentSource) -> tuple[AttachmentInfo, bytes]:
        name = attachment_name(a)
        with source_stream(a) as f:
            data = f.read()
        info = AttachmentInfo(name=name, size=len(data), md5=hashlib.md5(data).hexdigest(),
                              sha256=hashlib.sha256(data).hexdigest())
        return info, data

    def attach(self, queue: str, msg_id: str, source: AttachmentSource) -> AttachmentInfo:
        with self._lock:
            e = self._entry(queue, msg_id)
            if e.state != State.PREP:
                raise WrongState(f"message {msg_id} is not in prep: attachments can only be added in prep")
            info, data = self._read_attachment(source)
            e.attachments[info.name] = (data, info)
            return info

    def delete_attachment(self, queue: str, msg_id: str, name: str) -> None:
        with self._lock:
            e = self._entry(queue, msg_id)
            if e.state != State.PREP:
                raise WrongState(f"message {msg_id} is not in prep")
            if e.attachments.pop(name, None) is None:
                raise AttachmentNotFound(f"no attachment {name} on {queue}/{msg_id}")

    def commit(self, queue: str, msg_id: str) -> None:
        with self._lock:
            state = self._entry(queue, msg_id).state
            if state == State.PREP:
                self.move(queue, msg_id, State.PREP, State.QUE, note="commit")
            elif state != State.QUE:
                raise WrongState(f"message {queue}/{msg_id} is in {state}: only prep can be committed")

    # -- reading -------------------------------------------------------------------------
    def _view(self, queue: str, e: _Entry) -> MessageView:
        return MessageView(
            queue=queue,
            message=Message.from_dict(e.msg.to_dict()),
            state=e.state,
            job_status=e.status,
            attachments={n: info for n, (_, info) in e.attachments.items()},
            acked=e.acked,
            host=runner_host(e.runner) if e.state == State.RUN else "",
        )

    def get(self, queue: str, msg_id: str) -> MessageView:
        with self._lock:
            return self._view(queue, self._entry(queue, msg_id))

    def state_of(self, queue: str, msg_id: str) -> State:
        return self._entry(queue, msg_id).state

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
        with self._lock:
            found = self.find_ids(queue, state, filter=filter, cursor=cursor, limit=limit, scan_limit=scan_limit)
            q = self._queue(queue)
            return ListPage(items=[self._view(queue, q.messages[i]) for i in found.ids],
                            next_cursor=found.next_cursor, scanned=found.scanned)

    def find_ids(self, queue: str, state: State, *, filter: str | None = None, cursor: str | None = None,
                 limit: int = 1000, scan_limit: int | None = None) -> IdPage:
        with self._lock:
            q = self._queue(queue)
            if cursor is not None:
                validate_msg_id(cursor)
            limit = max(1, min(int(limit), 10000))
            ids = sorted((i for i, e in q.messages.items() if e.state == state), key=sort_key, reverse=True)
            if cursor is not None:
                ck = sort_key(cursor)
                ids = [i for i in ids if sort_key(i) < ck]
            needle = filter.casefold() if filter else None
            page = IdPage(ids=[])
            last = None
            for i in ids:
                if len(page.ids) >= limit or (scan_limit is not None and page.scanned >= scan_limit):
                    page.next_cursor = last
                    break
                page.scanned += 1
                last = i
                e = q.messages[i]
                if needle is not None and needle not in search_text(e.msg.to_dict(), e.status):
                    continue
                page.ids.append(i)
            return page

    def counts(self, queue: str) -> dict[str, int]:
        with self._lock:
            c = dict.fromkeys(COUNT_KEYS, 0)
            for e in self._queue(queue).messages.values():
                c["err_acked" if e.acked else str(e.state)] += 1
            return c

    def recount(self, queue: str) -> dict[str, int]:
        return self.counts(queue)

    def open_attachment(self, queue: str, msg_id: str, name: str) -> BinaryIO:
        validate_attachment_name(name)
        e = self._entry(queue, msg_id)
        if name not in e.attachments:
            raise AttachmentNotFound(f"Message ID attachment '{name}' not found")
        return io.BytesIO(e.attachments[name][0])

    def open_log(self, queue: str, msg_id: str, name: str = "stdio.log") -> BinaryIO:
        if not log_name_ok(name):
            raise LogNotFound(f"Message ID log '{name}' not found")
        try:
            return open(self.message_dir(queue, msg_id) / "job" / name, "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise LogNotFound(f"Message ID log '{name}' not found") from None

    def append_log(self, queue: str, msg_id: str, data: bytes, name: str = "stdio.log") -> int:
        """Append to one of the message's logs (its ``job/<name>``); returns the new end."""
        if not log_name_ok(name):
            raise LogNotFound(f"Message ID log '{name}' not found")
        with open(self.message_dir(queue, msg_id) / "job" / name, "ab") as f:
            f.write(data)
            return f.tell()

    def read_log(self, queue: str, msg_id: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes of ``stdio.log`` from ``offset``; LogNotFound before its first write."""
        with self.open_log(queue, msg_id) as f:
            f.seek(offset)
            return f.read(max(0, limit))

    def watch_message(self, queue: str, msg_id: str, *, log: bool = False) -> _NapWatch:
        self._entry(queue, msg_id)
        return _NapWatch()

    def message_dir(self, queue: str, msg_id: str) -> Path:
        self._entry(queue, msg_id)
        return self._scratch.message_dir(queue, msg_id)

    # -- changing ------------------------------------------------------------------------
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
        check_transition(src, dst)
        with self._lock:
            e = self._entry(queue, msg_id)
            if e.state != src:
                raise WrongState(f"message {msg_id} is not in {src}")
            if update is not None:
                m = Message.from_dict(e.msg.to_dict())
                update(m)
                m.encode()
                e.msg = m
            if e.state == State.QUE:
                e.held_by = None  # a held duplicate that leaves the queue is free
            e.state = dst
            e.acked = False
            entry = {"state": str(dst), "at": self.clock(), **({"note": note} if note else {})}
            e.msg.history.append(entry)
            if dst == State.QUE:
                self._notify("work", queue, msg_id)
            return Message.from_dict(e.msg.to_dict())

    def update(self, queue: str, msg_id: str, fn: Callable[[Message], None]) -> Message:
        with self._lock:
            e = self._entry(queue, msg_id)
            m = Message.from_dict(e.msg.to_dict())
            fn(m)
            m.encode()
            e.msg = m
            if e.state == State.QUE:
                self._notify("work", queue, msg_id)
            return Message.from_dict(m.to_dict())

    def set_status(self, queue: str, msg_id: str, text: str) -> None:
        with self._lock:
            self._entry(queue, msg_id).status = text

    # -- attempts ---------------------------------------------------------------------------
    def claim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> Attempt | float | None:
        now = self.clock() if now is None else now
        with self._lock:
            q = self._queue(queue)
            if AdminState.of_flags("pause" in q.flags, "down" in q.flags) != AdminState.UP:
                return None
            queued = [Candidate(i, e.msg.due, params_of(e.msg)) for i, e in q.messages.items()
                      if e.state == State.QUE and e.held_by is None]
            running = [params_of(e.msg) for e in q.messages.values() if e.state == State.RUN]
            chosen, dups, wake = pick(queued, running, q.config, now)
            if chosen is None:
                return wake
            m = self.move(queue, chosen.msg_id, State.QUE, State.RUN, note="run")
            e = q.messages[chosen.msg_id]
            a = Attempt(queue, chosen.msg_id, new_attempt_id(chosen.msg_id, m.count), owner, now + lease, m,
                        tuple(dups), e.cancel_requested)
            for d in dups:
                q.messages[d].held_by = a.attempt_id
            e.attempt, e.runner = a, None
            return a

    def _current(self, attempt: Attempt) -> _Entry:
        e = self._entry(attempt.queue, attempt.msg_id)
        if e.state != State.RUN or e.attempt is None or e.attempt.attempt_id != attempt.attempt_id:
            raise fenced_out(attempt)
        return e

    def heartbeat(self, attempt: Attempt, *, lease: float, runner: str | None = None,
                  now: float | None = None) -> Lease:
        now = self.clock() if now is None else now
        with self._lock:
            e = self._current(attempt)
            assert e.attempt is not None
            e.attempt = replace(e.attempt, expires_at=now + lease)
            if runner is not None:
                e.runner = runner
            return Lease(now + lease, e.cancel_requested)

    def durable_batch(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # each finish is durable at its commit already

    def attempt_dir(self, attempt: Attempt) -> str:
        """Beside ``job/``: ``msg`` and ``attach/`` written from the store."""
        return str(self.workdir(attempt).parent)

    def workdir(self, attempt: Attempt) -> Path:
        with self._lock:
            self._current(attempt)
        return materialize(self, attempt, self._scratch.root())

    def start_job(self, attempt: Attempt) -> tuple[str, int]:
        return str(self.workdir(attempt)), self.log_fd(attempt)

    def record_runner(self, attempt: Attempt, runner: str, *, lease: float) -> None:
        self.heartbeat(attempt, lease=lease, runner=runner)

    def log_fd(self, attempt: Attempt) -> int:
        """``job/stdio.log`` of the local copy: a link (or a hard link) an earlier script
        left there is replaced by a file, never written through (as on the filesystem)."""
        return durable.open_own_log(str(self.workdir(attempt) / "stdio.log"))

    def finish(self, attempt: Attempt, dst: State, *, status: str | None,
               update: Callable[[Message], None] | None = None, note: str = "",
               dup_status: str | None = None, dup_of: str | None = None) -> Message:
        with self._lock:
            e = self._current(attempt)
            if status is not None:
                e.status = status
            m = self.move(attempt.queue, attempt.msg_id, State.RUN, dst, update=update, note=note)
            e.attempt, e.runner, e.cancel_requested = None, None, False
            q = self._queue(attempt.queue)
            for d in attempt.dups:
                de = q.messages.get(d)
                if de is None or de.held_by != attempt.attempt_id:
                    continue
                de.held_by = None
                if dst in SUCCESS and de.state == State.QUE:
                    def mark(m: Message) -> None:
                        m.dup = dup_of or ""

                    self.move(attempt.queue, d, State.QUE, dst, update=mark if dup_of else None,
                              note=f"duplicate of {dup_of}" if dup_of else (note or str(dst)))
                    de.status = dup_status if dup_status is not None else f"duplicate {dup_of or attempt.msg_id}"
                elif de.state == State.QUE:
                    self._notify("work", attempt.queue, d)
            return m

    def reclaim(self, queue: str, *, owner: str, lease: float, now: float | None = None) -> builtins.list[Attempt]:
        now = self.clock() if now is None else now
        out: builtins.list[Attempt] = []
        with self._lock:
            for msg_id, e in self._queue(queue).messages.items():
                if e.state != State.RUN:
                    continue
                old = e.attempt
                if old is not None and old.expires_at >= now:
                    continue  # its holder still holds it
                a = Attempt(queue, msg_id, new_attempt_id(msg_id, e.msg.count), owner, now + lease,
                            Message.from_dict(e.msg.to_dict()), old.dups if old else (), e.cancel_requested,
                            e.runner)
                e.attempt = a
                for d in a.dups:  # the duplicates stay held, now by the new attempt
                    de = self._queue(queue).messages.get(d)
                    if de is not None and old is not None and de.held_by == old.attempt_id:
                        de.held_by = a.attempt_id
                out.append(a)
        return out

    def cancel(self, queue: str, msg_id: str) -> State:
        with self._lock:
            e = self._entry(queue, msg_id)
            if e.state == State.QUE:
                self.move(queue, msg_id, State.QUE, State.ERR, note="cancelled")
                e.status = "cancelled"
                return State.ERR
            if e.state != State.RUN:
                raise WrongState(f"message {queue}/{msg_id} is in {e.state}: only queued or running "
                                 "messages can be cancelled")
            e.cancel_requested = True
            self._notify("cancel", queue, msg_id)
            return State.RUN

    def delete(self, queue: str, msg_id: str) -> None:
        with self._lock:
            e = self._entry(queue, msg_id)
            if e.state == State.RUN:
                raise WrongState(f"message {msg_id} is running: cancel it first")
            del self._queue(queue).messages[msg_id]

    def delete_many(self, queue: str, msg_ids: Sequence[str], *, state: State | None = None,
                    acked: bool | None = None) -> builtins.list[tuple[str, SpoolqError]]:
        failures: list[tuple[str, SpoolqError]] = []
        for msg_id in msg_ids:
            try:
                with self._lock:
                    if state is not None:
                        e = self._entry(queue, msg_id)
                        if e.state != state or (acked is not None and e.acked != acked):
                            raise WrongState(f"message {msg_id} is {e.state}, not {state}")
                    self.delete(queue, msg_id)
            except SpoolqError as e:
                failures.append((msg_id, e))
        return failures

    def ack_errs(self, queue: str) -> int:
        with self._lock:
            n = 0
            for e in self._queue(queue).messages.values():
                if e.state == State.ERR and not e.acked:
                    e.acked = True
                    n += 1
            return n

    def sweep(self, queue: str, *, older_than: float = 3600.0) -> SweepResult:
        q = self._queue(queue)
        with self._lock:
            week = self.clock() - 7 * 86400
            for k in [k for k, (_, t) in q.relay_keys.items() if t < week]:
                del q.relay_keys[k]
        return SweepResult()

    def relay_key(self, queue: str, key: str) -> str | None:
        with self._lock:
            got = self._queue(queue).relay_keys.get(key)
            if got is None or got[1] < self.clock() - 7 * 86400:
                return None
            return got[0] if got[0] in self._queue(queue).messages else None

    def relay_lock(self, queue: str, key: str) -> threading.Lock:
        return process_relay_lock(queue, key)

    def set_relay_key(self, queue: str, key: str, msg_id: str) -> None:
        with self._lock:
            self._queue(queue).relay_keys[key] = (msg_id, self.clock())
