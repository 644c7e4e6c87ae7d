"""The Python API: ``spoolq.open(root)`` returns a :class:`Client`.

The CLI, the HTTP layer and the daemon's helpers all call these methods; front ends stay
thin. A message is named by a :class:`~spoolq.ids.MessageRef`, a full id URL or ``QUEUE/ID``.
"""

from __future__ import annotations

import builtins
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Unpack

from .config import RootConfig, default_root
from .errors import Conflict, InvalidInput, InvalidMessage, SpoolqError, WaitTimeout, WrongState
from .follow import follow_log, wait_final
from .ids import MessageRef, parse_ref
from .model import (
    ADMIN_ACTIONS,
    MESSAGE_FIELD_NAMES,
    AdminState,
    AttachmentInfo,
    IdPage,
    ListPage,
    Message,
    MessageFields,
    MessageView,
    QueueConfig,
    State,
)
from .parts import part_of
from .store import AttachmentSource, Store, SweepResult, open_store
from .store.base import DispatchParts, LocalSpool, LostFoundRepair, copied_attachments

AttachmentLike = str | os.PathLike[str] | AttachmentSource




@dataclass(frozen=True)
class Receipt:
    """What ``send`` answers: the message's queue, id and full id (``str()`` gives the full id)."""

    queue: str
    msg_id: str
    full_id: str

    def __str__(self) -> str:
        return self.full_id

    @property
    def ref(self) -> MessageRef:
        return MessageRef(self.queue, self.msg_id)


Ref = MessageRef | Receipt | str


def _attachment(a: AttachmentLike) -> AttachmentSource:
    if isinstance(a, AttachmentSource):
        if a.path is not None and not os.path.isabs(a.path):
            return AttachmentSource(name=a.name, path=os.path.abspath(a.path), stream=a.stream, link=a.link)
        return a
    return AttachmentSource(path=os.path.abspath(os.fspath(a)))


class Client:
    """Operations on one store. Cheap to create; holds no open resources."""

    def __init__(self, store: Store, *, root_config: RootConfig | None = None) -> None:
        self.store = store
        if root_config is None:
            root_config = store.root_config()
        self.root_config = root_config

    @property
    def base_url(self) -> str:
        return self.root_config.base_url

    def full_id(self, queue: str, msg_id: str) -> str:
        return f"{self.base_url}/q/{queue}/{msg_id}"

    def receipt(self, queue: str, msg_id: str) -> Receipt:
        return Receipt(queue, msg_id, self.full_id(queue, msg_id))

    @staticmethod
    def ref(ref: Ref) -> MessageRef:
        if isinstance(ref, Receipt):
            return ref.ref
        return ref if isinstance(ref, MessageRef) else parse_ref(ref)

    # -- queues --------------------------------------------------------------------------
    def create_queue(self, config: QueueConfig | Mapping[str, Any] | str, **options: Any) -> QueueConfig:
        """Create a queue from a QueueConfig, a config dict, or a name plus keyword options.

        ``client.create_queue("mail", script="/usr/local/bin/send-mail", num_workers=4)``
        """
        if isinstance(config, str):
            config = QueueConfig.from_dict({"name": config, **options})
        elif not isinstance(config, QueueConfig):
            config = QueueConfig.from_dict(dict(config))
        self.store.create_queue(config)
        return config

    def update_queue(self, name: str, **changes: Any) -> QueueConfig:
        """Change config keys of a queue; the next run uses them. Conflict for a kind fsq
        queue's ``fsq_dir`` or kind while it holds messages (their items are held there)."""
        old = self.store.queue_config(name)
        data = old.to_dict()
        data.update(changes)
        data["name"] = name
        cfg = QueueConfig.from_dict(data)
        if old.kind == "fsq" and (cfg.kind, cfg.fsq_dir) != (old.kind, old.fsq_dir):
            # The items its messages hold are in the old directory: the finish would not
            # find them there any more, and they would stay held, their messages in err.
            c = self.store.counts(name)
            busy = {k: c[k] for k in ("prep", "que", "run") if c.get(k)}
            if busy:
                raise Conflict(f"queue {name} still holds items of {old.fsq_dir} ({busy}): let them finish, "
                               "or delete them, before changing its fsq_dir or kind")
        self.store.update_queue(cfg)
        return cfg

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        """Delete a queue (moved to ``<root>/deleted/``). Refused (Conflict) while it holds
        messages in prep, que or run, unless ``force``."""
        self.store.delete_queue(name, force=force)

    def queues(self) -> list[str]:
        """Every queue's name, sorted."""
        return self.store.queues()

    def queue_config(self, name: str) -> QueueConfig:
        """The queue's config (QueueNotFound if there is no such queue)."""
        return self.store.queue_config(name)

    def admin_state(self, name: str) -> AdminState:
        """UP, PAUSE or DOWN: the admin flags (RQ 6.1)."""
        return self.store.admin_state(name)

    def queue_status(self, name: str) -> str:
        """RQ's combined status: ``SCRIPTERROR`` while the daemon cannot start the queue's
        script, else the admin state (UP, PAUSE, DOWN). See :meth:`status_parts`."""
        return self.status_parts(name)[0]

    def status_parts(self, name: str) -> tuple[str, AdminState, str | None]:
        """``(status, admin state, script error)`` read once each: what every summary shows."""
        admin = self.store.admin_state(name)
        why = self.store.script_error(name)
        return ("SCRIPTERROR" if why is not None else str(admin)), admin, why

    def script_error(self, name: str) -> str | None:
        """Why the daemon cannot start this queue's script, or None."""
        return self.store.script_error(name)

    def set_admin_state(self, name: str, state: AdminState | str) -> None:
        """Make a queue's admin state exactly UP, PAUSE or DOWN (both flags set to match).

        For RQ's one-flag actions (pause, resume, down, up) use :meth:`admin_action`.
        """
        try:
            st = AdminState(str(state).upper())
        except ValueError:
            raise InvalidInput(f"admin state must be UP, PAUSE or DOWN, not {state!r}") from None
        self.store.set_admin_state(name, st)

    def admin_action(self, name: str, action: str) -> AdminState:
        """RQ's admin actions (rq-spec 6.1): ``pause`` and ``down`` set their flag, ``resume``
        clears pause, ``up`` clears down; the other flag is left alone, so a queue that is
        both paused and down stays paused after ``up``. Returns the resulting state."""
        try:
            flag, on = ADMIN_ACTIONS[action.lower()]
        except (KeyError, AttributeError):
            raise InvalidInput(f"admin action must be pause, resume, down or up, not {action!r}") from None
        self.store.set_admin_flag(name, flag, on)
        return self.store.admin_state(name)

    # -- sending -------------------------------------------------------------------------
    def _build(self, queue: str, fields: Mapping[str, Any], *, default_max: int | None = None,
               now: float | None = None) -> Message:
        """A validated message from :class:`MessageFields` (send, prep and send_many share it)."""
        unknown = set(fields) - MESSAGE_FIELD_NAMES
        if unknown:
            raise InvalidMessage(f"unknown message field(s): {', '.join(sorted(unknown))}")
        d = dict(fields)
        delay = d.pop("delay", None)
        if delay is not None:
            if d.get("due") not in (None, ""):
                raise InvalidMessage("give due or delay, not both")
            d["due"] = (time.time() if now is None else now) + _delay(delay)
        if d.get("params") is not None:
            if not isinstance(d["params"], Mapping):  # a list of pairs, a number: a 400, not a crash
                raise InvalidMessage("params must be a JSON object")
            d["params"] = dict(d["params"])
        hooks = d.get("post_run_webhook")
        if isinstance(hooks, (list, tuple)):
            d["post_run_webhook"] = list(hooks)  # anything else: Message.from_dict says what is wrong
        d["dest"] = d.get("dest") or queue
        if d.get("max_count") in (None, ""):
            d["max_count"] = default_max if default_max is not None else self.store.queue_config(queue).max_count
        return Message.from_dict(d)

    def send(self, queue: str, *, attachments: Sequence[AttachmentLike] = (),
             **fields: Unpack[MessageFields]) -> Receipt:
        """Send one message to ``queue``; returns once it is durable (file and directory
        fsync'd, unless the queue says ``"fsync": false``).

        Fields (:class:`MessageFields`): ``param1``..``param4`` are RQ's opaque strings
        (numbers are turned into text); ``params`` is free JSON; ``due`` (epoch seconds) or
        ``delay`` (seconds from now) hold it back; ``max_count`` defaults to the queue's;
        also ``src``, ``dest``, ``post_run_webhook``, ``orig_msg_id``, ``count``. An unknown
        field is an InvalidMessage. ``attachments`` are paths (copied: a reflink where the
        filesystem can) or :class:`AttachmentSource` (``link=True`` hard-links a file you
        will not change in place). Raises QueueNotFound,
        QueueDown, InvalidMessage, TooLarge, DiskFull or StorageError; on any error nothing
        is stored.
        """
        m = self._build(queue, fields)
        stored = self.store.create(queue, m, attachments=[_attachment(a) for a in attachments])
        return self.receipt(queue, stored.msg_id)

    def send_message(self, queue: str, msg: Message | Mapping[str, Any], *, state: State = State.QUE,
                     attachments: Sequence[AttachmentLike] = ()) -> Receipt:
        """Send an RQ-style message dict (as RQ's HTTP and socket clients do)."""
        stored = self.store.create(queue, self._rq_message(queue, msg), state=state,
                                   attachments=[_attachment(a) for a in attachments])
        return self.receipt(queue, stored.msg_id)

    def _rq_message(self, queue: str, msg: Message | Mapping[str, Any]) -> Message:
        """``msg`` as a Message; a dict without ``max_count`` gets the queue's."""
        if isinstance(msg, Message):
            return msg
        m = Message.from_dict(dict(msg))
        if "max_count" not in msg:
            m.max_count = self.store.queue_config(queue).max_count
        return m

    def send_many(self, queue: str, messages: Iterable[MessageFields | Message]) -> list[Receipt]:
        """Send many messages with one group commit (all stored, or none). Each is validated
        first, as :meth:`send` validates one: the store's group commit trusts them."""
        default_max = self.store.queue_config(queue).max_count
        now = time.time()
        msgs = [Message.from_dict(item.to_dict()) if isinstance(item, Message)
                else self._build(queue, item, default_max=default_max, now=now) for item in messages]
        return [self.receipt(queue, m.msg_id) for m in self.store.create_many(queue, msgs)]

    def prep_relayed(self, queue: str, msg: Message | Mapping[str, Any], key: str) -> tuple[Receipt, bool]:
        """A prep for a relay with ``key`` (docs/relay.md): the message made for that key
        before, if it still exists (True), else a new one, its key recorded durably before
        this returns (False)."""
        with self.store.relay_lock(queue, key):
            made = self.store.relay_key(queue, key)
            if made is not None:
                return self.receipt(queue, made), True
            r = self.send_message(queue, msg, state=State.PREP)
            self.store.set_relay_key(queue, key, r.msg_id)
            return r, False

    def single_que(self, queue: str, msg: Message | Mapping[str, Any]) -> tuple[Receipt, bool]:
        """RQ's ``single_que``: a new message in ``queue`` only if none waits there. Returns
        the receipt of the first waiting message or of the new one, and whether it is new.
        Two callers at once never both create (the store locks the queue for it)."""
        msg_id, created = self.store.single_que(queue, self._rq_message(queue, msg))
        return self.receipt(queue, msg_id), created

    def prep(self, queue: str, **fields: Unpack[MessageFields]) -> Receipt:
        """Create a message in prep (two-phase send): :meth:`attach` files to it, then
        :meth:`commit` it. Fields as for :meth:`send`."""
        m = self._build(queue, fields)
        return self.receipt(queue, self.store.create(queue, m, state=State.PREP).msg_id)

    def attach(self, ref: Ref, path: str | os.PathLike[str] | None = None, *, name: str | None = None,
               stream: BinaryIO | None = None, link: bool = False) -> AttachmentInfo:
        """Attach a file (``path``, copied; hard-linked with ``link=True``, see
        :class:`AttachmentSource`) or a ``stream`` under ``name`` (default: the file's
        basename) to a message in prep; returns its md5, sha256, size."""
        r = self.ref(ref)
        src = AttachmentSource(name=name, path=os.path.abspath(os.fspath(path)) if path is not None else None,
                               stream=stream, link=link)
        return self.store.attach(r.queue, r.msg_id, src)

    def commit(self, ref: Ref) -> None:
        """prep -> que. Committing a queued message again is a no-op (idempotent, as in RQ);
        a message already past que cannot be committed (WrongState)."""
        r = self.ref(ref)
        self.store.commit(r.queue, r.msg_id)

    # -- reading -------------------------------------------------------------------------
    def get(self, ref: Ref) -> MessageView:
        """The message as it is now: fields, state, status text, history, attachments."""
        r = self.ref(ref)
        return self.store.get(r.queue, r.msg_id)

    def message_json(self, ref: Ref, *, local_paths: bool = True) -> dict[str, Any]:
        """RQ's get_message JSON: fields plus derived ``state``, ``status``, ``_attachments``
        (``local_paths=False``: attachment paths relative to the root, as HTTP serves them)."""
        r = self.ref(ref)
        view = self.store.get(r.queue, r.msg_id)
        return view.to_rq_json(self.full_id(r.queue, r.msg_id), local_paths=local_paths)

    def list(self, queue: str, state: State | str = State.QUE, *, limit: int = 50, cursor: str | None = None,
             filter: str | None = None, scan_limit: int | None = None) -> ListPage:
        """One page of messages in ``state``, newest first: at most ``limit``, older than
        ``cursor`` (the page's ``next_cursor``), matching ``filter`` (a case-insensitive
        substring of the id, src, dest, orig_msg_id, param1..4, a ``params`` entry written
        ``key=value``, or the status). ``scan_limit`` bounds how many messages one call
        examines: a page may then be short and still have a ``next_cursor`` to search on
        from. Unreadable messages are set aside and named in ``problems``."""
        _check_limit(limit)
        return self.store.list(queue, _state(state), limit=limit, cursor=cursor, filter=filter,
                               scan_limit=scan_limit)

    def find_ids(self, queue: str, state: State | str, *, filter: str | None = None, cursor: str | None = None,
                 limit: int = 1000, scan_limit: int | None = None) -> IdPage:
        """Like :meth:`list`, ids only: what bulk operations walk."""
        _check_limit(limit)
        return self.store.find_ids(queue, _state(state), filter=filter, cursor=cursor, limit=limit,
                                   scan_limit=scan_limit)

    def counts(self, queue: str) -> dict[str, int]:
        """Messages per state (``prep que run done relayed err err_acked``), in O(1)."""
        return self.store.counts(queue)

    def recount(self, queue: str) -> dict[str, int]:
        """Count by walking the queue's tree and rewrite the counts cache (slow; repairs)."""
        return self.store.recount(queue)

    def open_attachment(self, ref: Ref, name: str) -> BinaryIO:
        r = self.ref(ref)
        return self.store.open_attachment(r.queue, r.msg_id, name)

    def follow_log(self, ref: Ref, out: BinaryIO, *, follow: bool = False) -> MessageView:
        """Copy the message's ``stdio.log`` to ``out``; with ``follow``, until the message is
        final (``spoolq log -f``). Returns the message as last seen."""
        r = self.ref(ref)
        return follow_log(self.store, r.queue, r.msg_id, out, follow=follow)

    def open_log(self, ref: Ref, name: str = "stdio.log") -> BinaryIO:
        """One of the message's logs (``stdio.log``, or another a script wrote), for reading."""
        r = self.ref(ref)
        return self.store.open_log(r.queue, r.msg_id, name)

    def state(self, ref: Ref) -> State:
        """The message's state, without reading the message."""
        r = self.ref(ref)
        return self.store.state_of(r.queue, r.msg_id)

    def delete_attachment(self, ref: Ref, name: str) -> None:
        """Remove an attachment of a message in prep."""
        r = self.ref(ref)
        self.store.delete_attachment(r.queue, r.msg_id, name)

    def served(self) -> tuple[bool, str] | None:
        """Whether a daemon serves this store, and what it is called (a spool root's path, or
        the store's URL); None when the store cannot tell. Asking never creates anything."""
        served = self.store.served()
        return None if served is None else (served, self.store.url.removeprefix("file://"))

    def dispatch_processes(self) -> dict[str, Any] | None:
        """Who serves a directory spool now (``spoolq status``): ``{"serving": bool or None
        (cannot be told: the lock file unreadable), "processes": [{"index", "pid",
        "shares"}, ...]}``, the main process (index 0) first,
        each with the queues it shares with the others (``serve --dispatchers``). None for a
        store whose daemons are not this host's to list (PostgreSQL)."""
        if not isinstance(self.store, DispatchParts):
            return None
        procs: builtins.list[dict[str, Any]] = []
        serving: bool | None = False
        for index, pid, held in self.store.dispatch_processes():
            if held is None:  # cannot be told (the file unreadable): never said to be absent
                if index == 0:
                    serving = None
                continue
            part = part_of(pid) if index and pid else None
            procs.append({"index": index, "pid": pid, "shares": sorted(part.split) if part is not None else []})
            if index == 0:
                serving = True
        shared = sorted({q for p in procs for q in p["shares"]})
        for p in procs:
            if p["index"] == 0:
                p["shares"] = shared  # the main process dispatches its part of each split queue
        return {"serving": serving, "processes": procs}

    @property
    def upload_dir(self) -> Path:
        """Where the HTTP server spools uploads: on the spool's filesystem when there is one,
        so that storing an upload is a link, not a copy."""
        if isinstance(self.store, LocalSpool):
            return self.store.root / ".uploads"
        return Path(tempfile.gettempdir()) / "spoolq-uploads"

    # -- acting on messages --------------------------------------------------------------
    def delete(self, ref: Ref) -> None:
        """Remove a message in any state but run (cancel a running one first)."""
        r = self.ref(ref)
        self.store.delete(r.queue, r.msg_id)

    def delete_many(self, queue: str, msg_ids: Sequence[str], *, state: State | str | None = None,
                    acked: bool | None = None) -> builtins.list[tuple[str, SpoolqError]]:
        """Delete many messages of ``queue`` at once (none may be running); returns the
        ``(msg_id, error)`` of those that could not be deleted. With ``state`` (and
        ``acked``), only those still in it (see Store.delete_many)."""
        return self.store.delete_many(queue, msg_ids, state=None if state is None else _state(state), acked=acked)

    def retry(self, ref: Ref) -> None:
        """err -> que, due now, with ``count`` reset so the message gets its full ``max_count``."""
        r = self.ref(ref)

        def reset(m: Message) -> None:
            m.count = 0
            m.due = time.time()
            _reset_http_retries(m)

        try:
            self.store.move(r.queue, r.msg_id, State.ERR, State.QUE, update=reset, note="retry")
        except WrongState:
            state = self.store.state_of(r.queue, r.msg_id)  # MessageNotFound if there is none
            raise WrongState(f"message {r.queue}/{r.msg_id} is in {state}: only err can be retried") from None

    def run_now(self, ref: Ref) -> None:
        """Move a queued message to the front: its due time becomes 0 (RQ's run_message)."""
        r = self.ref(ref)
        state = self.store.state_of(r.queue, r.msg_id)
        if state == State.RUN:
            raise WrongState("msg already running")
        if state != State.QUE:
            raise WrongState(f"msg not in runnable state ({state})")

        def front(m: Message) -> None:
            m.due = 0.0

        self.store.update(r.queue, r.msg_id, front)  # the store tells its daemon (Store.update)

    def clone(self, ref: Ref) -> Receipt:
        """A new message with the same fields and attachments (done, relayed or err only)."""
        r = self.ref(ref)
        view = self.store.get(r.queue, r.msg_id)
        if view.state not in (State.DONE, State.RELAYED, State.ERR):
            raise WrongState(f"cannot clone message in {view.state} state")
        old = view.message
        m = Message.from_dict(old.to_dict())
        m.count = 0
        m.due = 0.0
        _reset_http_retries(m)
        m.cloned_from = old.msg_id
        m.orig_msg_id = old.orig_msg_id or self.full_id(r.queue, old.msg_id)
        m.dups, m.dup, m.history = [], "", []
        with copied_attachments(self.store, r.queue, r.msg_id, sorted(view.attachments)) as sources:
            stored = self.store.create(r.queue, m, attachments=sources)
        return self.receipt(r.queue, stored.msg_id)

    def wait(self, ref: Ref, timeout: float | None = None) -> MessageView:
        """Block until the message is done, relayed or err, and return it.

        Woken by the store (inotify on the filesystem), not by polling. Raises WaitTimeout if
        ``timeout`` seconds pass first.
        """
        if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
            # NaN compares false with everything: it waited for ever (audit).
            raise InvalidInput(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        r = self.ref(ref)
        view = wait_final(self.store, r.queue, r.msg_id, timeout)
        if view is None:
            state = self.store.state_of(r.queue, r.msg_id)
            raise WaitTimeout(f"message {r.queue}/{r.msg_id} is still in {state} after {timeout:g} s")
        return view

    def cancel(self, ref: Ref, *, wait: float = 10.0) -> str:
        """Stop a message: a queued one goes straight to err; for a running one the store
        tells the daemon that runs it, which terminates the script's process group, and the
        message ends in err with status ``cancelled``. Waits up to ``wait`` seconds for that.
        Returns what was done."""
        r = self.ref(ref)
        if self.store.cancel(r.queue, r.msg_id) == State.ERR:
            return "cancelled (it was queued)"
        served = self.served()
        if served is not None and not served[0]:
            return "marked cancelled (no daemon is running: it ends in err when one starts)"
        view = wait_final(self.store, r.queue, r.msg_id, wait) if wait > 0 else None
        if view is None:
            return "cancel requested (the daemon is stopping the script)"
        if view.state != State.ERR:
            return f"too late: it ended first ({view.status})"
        return f"cancelled ({view.status})"

    def ack_errs(self, queue: str) -> int:
        """Acknowledge every error of ``queue`` (they stay, counted as ``err_acked``);
        returns how many."""
        return self.store.ack_errs(queue)

    def sweep(self, queue: str) -> SweepResult:
        """Remove debris of dead producers and empty old buckets, and put complete messages a
        crash left in staging into their state (at-least-once); returns what it did."""
        return self.store.sweep(queue)

    def recover_lost_found(self, path: str | os.PathLike[str] | None = None) -> SweepResult:
        """Put back the message directories that e2fsck moved into ``path`` (default: the
        ``lost+found`` of the spool's filesystem) after a power cut; filesystem store only."""
        if not isinstance(self.store, LostFoundRepair):
            raise InvalidInput("lost+found recovery needs a filesystem store")
        return self.store.recover_lost_found(path)


def _state(state: State | str) -> State:
    try:
        return State(state)
    except ValueError:
        raise InvalidInput(f"unknown state {state!r}: use one of {', '.join(State)}") from None


def _delay(value: Any) -> float:
    """A delay in seconds: a finite, non-negative number."""
    try:
        d = float(value)
    except (TypeError, ValueError):
        raise InvalidMessage(f"delay must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(d) or d < 0:
        raise InvalidMessage(f"delay must be a non-negative number of seconds, got {value!r}")
    return d


def open(url: str | os.PathLike[str] | None = None) -> Client:  # noqa: A001 - spoolq.open is the API
    """Open a spool: a directory path, ``file:///path``, ``memory:``; default: the default root."""
    target = os.fspath(url) if url is not None else default_root()
    return Client(open_store(target))


def _reset_http_retries(m: Message) -> None:
    """An HTTP job (a kind http queue's message) retried or cloned gets its retries back, as
    its ``count`` is reset: the daemon kept the first ``remaining_retries`` as ``retries``."""
    first = m.params.get("retries")
    if "remaining_retries" in m.params and isinstance(first, int) and not isinstance(first, bool):
        m.params = {**m.params, "remaining_retries": first}


def _check_limit(limit: int) -> None:
    """A page holds at least one: 0 or less gave one item and a cursor (audit)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"limit must be a whole number >= 1, not {limit!r}")
