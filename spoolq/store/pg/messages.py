"""The PostgreSQL store's messages: create, attach, read, list, move, rewrite, delete.

A message is one row of ``spoolq.messages``: its state is a column, and every change of
state is one UPDATE guarded by the state it leaves (``... AND state = src``), so two
callers racing for a move cannot both win (docs/internals.md, the PostgreSQL store).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from psycopg import errors as pgerr
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from ...errors import (
    AttachmentNotFound,
    InvalidInput,
    InvalidMessage,
    InvalidName,
    MessageNotFound,
    QueueDown,
    QueueNotFound,
    SpoolqError,
    StorageError,
    WrongState,
)
from ...ids import make_id, validate_msg_id, validate_queue_name
from ...model import (
    AttachmentInfo,
    IdPage,
    ListPage,
    Message,
    MessageView,
    State,
    check_transition,
    holds_nul,
    runner_host,
    search_text,
)
from ..base import AttachmentSource, attachment_name, check_attachment_names, source_stream
from .blobs import write_chunks
from .connection import SINGLE_QUE_LOCK, Cursor
from .queues import QueueParts
from .sql import Q

ID_TRIES = 5
"""Fresh ids a create tries when the primary key refuses one (ids come from a sequence, so
only a sequence set back by hand could clash)."""
FILTER_BATCH = 500
"""Messages read per query while a filtered listing looks for matches."""
CURSOR_TOP = ("~", 0)
"""Sorts after every id (``~`` follows the digits): a listing with no cursor starts here."""


def encoded(m: Message) -> dict[str, Any]:
    """The columns of a message's row (validates it: InvalidMessage, TooLarge). History is a
    column of its own, appended to by each move."""
    history, m.history = m.history, []
    try:
        body = m.encode().decode()
    finally:
        m.history = history
    return {"msg": body, "due": m.due, "param1": m.param1, "param2": m.param2, "param3": m.param3,
            "param4": m.param4}


def decoded(row: DictRow) -> Message:
    """The message of a row (its ``msg`` and ``history`` columns)."""
    data = json.loads(row["msg"])
    data["history"] = row["history"]
    return Message.from_dict(data)


def _cursor_key(cursor: str) -> tuple[str, int]:
    prefix, _, n = validate_msg_id(cursor).rpartition(".")
    return prefix, int(n)


class MessageParts(QueueParts):
    """Messages and their attachments."""

    # -- errors: what is wrong when a row was not there ------------------------------------------
    def _missing(self, queue: str, msg_id: str) -> SpoolqError:
        try:
            self._require_queue(queue)
        except QueueNotFound as e:
            return e
        return MessageNotFound(f"no message {msg_id} in queue {queue}")

    def _not_in(self, queue: str, msg_id: str, src: State) -> SpoolqError:
        row = self.db.one(Q.message_state, {"queue": queue, "msg_id": msg_id})
        return self._missing(queue, msg_id) if row is None else WrongState(f"message {msg_id} is not in {src}")

    def _locked(self, cur: Cursor, queue: str, msg_id: str) -> DictRow:
        """The message's row, locked until the transaction ends."""
        validate_queue_name(queue)
        validate_msg_id(msg_id)
        row = cur.execute(Q.message_lock, {"queue": queue, "msg_id": msg_id}).fetchone()
        if row is None:
            raise self._missing(queue, msg_id)
        return row

    # -- creating ------------------------------------------------------------------------------
    def create(self, queue: str, msg: Message, *, attachments: Sequence[AttachmentSource] = (),
               state: State = State.QUE) -> Message:
        if state not in (State.QUE, State.PREP):
            raise InvalidInput("new messages start in que or prep")
        check_attachment_names(attachments)
        if not attachments and not self.db.in_transaction:
            return self._insert_one(queue, msg, state)
        with self.db.tx() as cur:
            self._writable_queue(cur, queue)
            (m,) = self._insert(cur, queue, [msg], state)
            for a in attachments:
                self._attach(cur, queue, m.msg_id, a)
            return m

    def single_que(self, queue: str, msg: Message) -> tuple[str, bool]:
        with self.db.tx() as cur:
            self._writable_queue(cur, queue)
            cur.execute(Q.single_que_lock, {"lock": SINGLE_QUE_LOCK, "queue": queue})
            row = cur.execute(Q.message_first_queued, {"queue": queue}).fetchone()
            if row is not None:
                return str(row["msg_id"]), False
            (m,) = self._insert(cur, queue, [msg], State.QUE)
            return m.msg_id, True

    def create_many(self, queue: str, msgs: Sequence[Message], *, state: State = State.QUE) -> list[Message]:
        if state not in (State.QUE, State.PREP):
            raise InvalidInput("new messages start in que or prep")
        with self.db.tx() as cur:
            self._writable_queue(cur, queue)
            return self._insert(cur, queue, msgs, state) if msgs else []

    def _insert_one(self, queue: str, msg: Message, state: State) -> Message:
        """A message without attachments: its queue's check and its id in one query, its row
        in one statement (its own transaction). Two round trips, where the general path
        takes five."""
        validate_queue_name(queue)
        for _ in range(ID_TRIES):
            row = self.db.one(Q.queue_new_id, {"queue": queue})
            if row is None:
                raise QueueNotFound(f"no such queue: {queue}")
            if row["down"]:
                raise QueueDown(f"queue {queue} is DOWN: it refuses new messages")
            m = self._stamped(queue, msg, state, row["now"], row["n"])
            with self.db.cursor() as cur:
                try:
                    done = cur.execute(Q.message_insert, {"queue": queue, "state": str(state), "msg_id": m.msg_id,
                                                          "history": Jsonb(m.history), **encoded(m)}).fetchone()
                except pgerr.ForeignKeyViolation:
                    done = None
                    missing = True
                else:
                    missing = False
            if missing:
                raise QueueNotFound(f"no such queue: {queue}")  # deleted since the query above
            if done is not None:
                return m
        raise StorageError(f"no free message id in {ID_TRIES} tries: is spoolq.msg_seq behind the ids?")

    def _insert(self, cur: Cursor, queue: str, msgs: Sequence[Message], state: State) -> list[Message]:
        """Insert new messages with fresh ids (time from the database's clock, suffix from
        its sequence, so hosts sharing it never make the same id). The primary key refuses
        an id that exists (ON CONFLICT DO NOTHING inserts no row): that message gets another."""
        made: list[Message | None] = [None] * len(msgs)
        for _ in range(ID_TRIES):
            todo = [i for i, m in enumerate(made) if m is None]
            stamps = cur.execute(Q.new_ids, {"count": len(todo)}).fetchall()
            tried = {i: self._stamped(queue, msgs[i], state, s["now"], s["n"])
                     for i, s in zip(todo, stamps, strict=True)}
            cur.executemany(Q.message_insert, [{"queue": queue, "state": str(state), "msg_id": m.msg_id,
                                                "history": Jsonb(m.history), **encoded(m)} for m in tried.values()],
                            returning=True)
            for i in tried:
                if cur.fetchone() is not None:
                    made[i] = tried[i]
                cur.nextset()
            if all(m is not None for m in made):
                return [m for m in made if m is not None]
        raise StorageError(f"no free message id in {ID_TRIES} tries: is spoolq.msg_seq behind the ids?")

    @staticmethod
    def _stamped(queue: str, msg: Message, state: State, now: float, n: int) -> Message:
        if holds_nul(msg.params):
            # Stored as text it would pass, and every jsonb read of it fail: its finish (a
            # coalesced one's too) was retried for ever (audit).
            raise InvalidMessage("params must not contain a NUL character (PostgreSQL cannot store one)")
        m = Message.from_dict(msg.to_dict())
        m.msg_id = make_id(now, n)
        m.created_at = now
        m.due = m.due or now
        m.dest = m.dest or queue
        m.history = [{"state": str(state), "at": now}]
        return m

    def attach(self, queue: str, msg_id: str, source: AttachmentSource) -> AttachmentInfo:
        with self.db.tx() as cur:
            if self._locked(cur, queue, msg_id)["state"] != State.PREP:
                raise WrongState(f"message {msg_id} is not in prep: attachments can only be added in prep")
            return self._attach(cur, queue, msg_id, source)

    def _attach(self, cur: Cursor, queue: str, msg_id: str, source: AttachmentSource) -> AttachmentInfo:
        """Stream one attachment into chunks (the same name replaces), hashing on the way."""
        key = {"queue": queue, "msg_id": msg_id, "name": attachment_name(source)}
        cur.execute(Q.attachment_drop, key)
        cur.execute(Q.attachment_begin, key)
        with source_stream(source) as f:
            size, md5, sha256 = write_chunks(cur, Q.attachment_chunk, key, f)
        cur.execute(Q.attachment_end, {**key, "size": size, "md5": md5, "sha256": sha256})
        return AttachmentInfo(name=key["name"], size=size, md5=md5, sha256=sha256)

    def delete_attachment(self, queue: str, msg_id: str, name: str) -> None:
        with self.db.tx() as cur:
            if self._locked(cur, queue, msg_id)["state"] != State.PREP:
                raise WrongState(f"message {msg_id} is not in prep")
            cur.execute(Q.attachment_drop, {"queue": queue, "msg_id": msg_id, "name": name})
            if cur.rowcount == 0:
                raise AttachmentNotFound(f"no attachment {name} on {queue}/{msg_id}")

    def commit(self, queue: str, msg_id: str) -> None:
        with self.db.tx() as cur:
            state = self._locked(cur, queue, msg_id)["state"]
            if state == State.PREP:
                self.move(queue, msg_id, State.PREP, State.QUE, note="commit")
            elif state != State.QUE:
                raise WrongState(f"message {queue}/{msg_id} is in {state}: only prep can be committed")

    # -- reading --------------------------------------------------------------------------------
    @staticmethod
    def _view(queue: str, row: DictRow, attachments: dict[str, AttachmentInfo]) -> MessageView:
        return MessageView(queue=queue, message=decoded(row), state=State(row["state"]), job_status=row["status"],
                           attachments=attachments, acked=row["acked"],
                           host=runner_host(row.get("runner")) if row["state"] == State.RUN else "")

    def get(self, queue: str, msg_id: str) -> MessageView:
        validate_queue_name(queue)
        validate_msg_id(msg_id)
        row = self.db.one(Q.message_get, {"queue": queue, "msg_id": msg_id})
        if row is None:
            raise self._missing(queue, msg_id)
        infos = {a[0]: AttachmentInfo(name=a[0], size=a[1], md5=a[2], sha256=a[3]) for a in row["attachments"]}
        return self._view(queue, row, infos)

    def state_of(self, queue: str, msg_id: str) -> State:
        validate_queue_name(queue)
        validate_msg_id(msg_id)
        row = self.db.one(Q.message_state, {"queue": queue, "msg_id": msg_id})
        if row is None:
            raise self._missing(queue, msg_id)
        return State(row["state"])

    def list(self, queue: str, state: State, *, limit: int = 50, cursor: str | None = None,
             filter: str | None = None, scan_limit: int | None = None) -> ListPage:
        page, rows = self._scan(queue, state, filter=filter, cursor=cursor, limit=limit, scan_limit=scan_limit,
                                rows=True)
        infos: dict[str, dict[str, AttachmentInfo]] = {i: {} for i in page.ids}
        if page.ids:
            for a in self.db.all(Q.messages_attachments, {"queue": queue, "ids": page.ids}):
                infos[a["msg_id"]][a["name"]] = AttachmentInfo(a["name"], a["size"], a["md5"], a["sha256"])
        return ListPage(items=[self._view(queue, rows[i], infos[i]) for i in page.ids],
                        next_cursor=page.next_cursor, scanned=page.scanned)

    def find_ids(self, queue: str, state: State, *, filter: str | None = None, cursor: str | None = None,
                 limit: int = 1000, scan_limit: int | None = None) -> IdPage:
        return self._scan(queue, state, filter=filter, cursor=cursor, limit=limit, scan_limit=scan_limit,
                          rows=False)[0]

    def _scan(self, queue: str, state: State, *, filter: str | None, cursor: str | None, limit: int,
              scan_limit: int | None, rows: bool) -> tuple[IdPage, dict[str, DictRow]]:
        """The memory store's listing walk (newest first, at most ``limit`` matches and
        ``scan_limit`` examined), reading the rows in keyset-paged batches."""
        validate_queue_name(queue)
        state = State(state)
        at = CURSOR_TOP if cursor is None else _cursor_key(cursor)
        limit = max(1, min(int(limit), 10000))
        needle = filter.casefold() if filter else None
        page, kept = IdPage(ids=[]), {}
        page_last: str | None = None
        for row in self._rows_below(queue, state, at, full=rows or needle is not None,
                                    batch=limit + 1 if needle is None else FILTER_BATCH):
            if len(page.ids) >= limit or (scan_limit is not None and page.scanned >= scan_limit):
                page.next_cursor = page_last
                break
            page.scanned += 1
            page_last = row["msg_id"]
            if needle is not None and needle not in search_text(json.loads(row["msg"]), row["status"]):
                continue
            page.ids.append(page_last)
            kept[page_last] = row
        if page.scanned == 0:
            self._require_queue(queue)  # nothing there, or no such queue
        return page, kept

    def _rows_below(self, queue: str, state: State, at: tuple[str, int], *, full: bool,
                    batch: int) -> Iterator[DictRow]:
        """The rows of ``state`` below the id key ``at``, newest first, ``batch`` per query."""
        while True:
            got = self.db.all(Q.messages_scan if full else Q.message_ids_scan,
                              {"queue": queue, "state": str(state), "c_time": at[0], "c_n": at[1], "limit": batch})
            yield from got
            if len(got) < batch:
                return
            at = _cursor_key(got[-1]["msg_id"])

    # -- changing -------------------------------------------------------------------------------
    def move(self, queue: str, msg_id: str, src: State, dst: State, *,
             update: Callable[[Message], None] | None = None, note: str = "") -> Message:
        """One UPDATE guarded by ``state = src`` (every commit is durable)."""
        check_transition(src, dst)
        validate_queue_name(queue)
        validate_msg_id(msg_id)
        fields: dict[str, Any] = dict.fromkeys(("msg", "due", "param1", "param2", "param3", "param4"))
        with self.db.tx() as cur:
            if update is not None:
                row = cur.execute(Q.message_lock, {"queue": queue, "msg_id": msg_id}).fetchone()
                if row is None or row["state"] != src:
                    raise self._not_in(queue, msg_id, src)
                m = decoded(row)
                update(m)
                fields = encoded(m)
            row = cur.execute(Q.message_move, {"queue": queue, "msg_id": msg_id, "src": str(src), "dst": str(dst),
                                               "note": note, **fields}).fetchone()
            if row is None:
                raise self._not_in(queue, msg_id, src)
            if src == State.RUN:  # the attempt ended: its held duplicates are free
                cur.execute(Q.dups_release, {"queue": queue, "parent": msg_id})
            return decoded(row)

    def update(self, queue: str, msg_id: str, fn: Callable[[Message], None]) -> Message:
        """Rewrite in place; the row's trigger tells every listener (a daemon sees a queued
        message's new due time at once)."""
        with self.db.tx() as cur:
            m = decoded(self._locked(cur, queue, msg_id))
            fn(m)
            cur.execute(Q.message_rewrite, {"queue": queue, "msg_id": msg_id, **encoded(m)})
            return m

    def set_status(self, queue: str, msg_id: str, text: str) -> None:
        validate_queue_name(queue)
        validate_msg_id(msg_id)
        # PostgreSQL's text holds no NUL (a raw StorageError, audit): a status is for people.
        text = text.replace("\x00", "\ufffd")
        with self.db.tx() as cur:
            cur.execute(Q.message_set_status, {"queue": queue, "msg_id": msg_id, "status": text})
            if cur.rowcount == 0:
                raise self._missing(queue, msg_id)

    def delete(self, queue: str, msg_id: str) -> None:
        for _, error in self.delete_many(queue, [msg_id]):
            raise error

    def delete_many(self, queue: str, msg_ids: Sequence[str], *, state: State | None = None,
                    acked: bool | None = None) -> builtins.list[tuple[str, SpoolqError]]:
        validate_queue_name(queue)
        valid = []
        for i in msg_ids:
            try:
                valid.append(validate_msg_id(i))
            except InvalidName:
                pass
        with self.db.tx() as cur:
            if state is None:
                rows = cur.execute(Q.messages_delete, {"queue": queue, "ids": valid})
            else:  # the state checked in the DELETE itself
                rows = cur.execute(Q.messages_delete_in_state, {"queue": queue, "ids": valid, "state": str(state),
                                                                "acked": acked})
            gone = {r["msg_id"] for r in rows}
            left = [i for i in valid if i not in gone]
            states = {r["msg_id"]: r["state"]
                      for r in (cur.execute(Q.messages_states, {"queue": queue, "ids": left}) if left else [])}
        return [(i, e) for i in msg_ids if (e := self._undeletable(queue, i, gone, states, state)) is not None]

    def _undeletable(self, queue: str, msg_id: str, gone: set[str], states: dict[str, str],
                     want: State | None = None) -> SpoolqError | None:
        """Why ``msg_id`` was not deleted (None: it was; a second mention of it: not found)."""
        if msg_id in gone:
            gone.discard(msg_id)
            return None
        try:
            validate_msg_id(msg_id)
        except InvalidName as e:
            return e
        if states.get(msg_id) == State.RUN:
            return WrongState(f"message {msg_id} is running: cancel it first")
        if want is not None and msg_id in states:
            return WrongState(f"message {msg_id} is {states[msg_id]}, not {want}")
        return self._missing(queue, msg_id)

    def ack_errs(self, queue: str) -> int:
        validate_queue_name(queue)
        with self.db.tx() as cur:
            cur.execute(Q.errs_ack, {"queue": queue})
            n = cur.rowcount
        if n == 0:
            self._require_queue(queue)
        return n
