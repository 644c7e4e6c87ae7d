"""The filesystem store's writes: creating, publishing, moving, rewriting and deleting messages (and queues).

Part of :class:`~spoolq.store.fs.store.FsStore` (a chain of classes, one module per concern);
the invariants are in docs/internals.md.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import fcntl
import itertools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ... import durable
from ...errors import (
    AttachmentNotFound,
    Conflict,
    InvalidInput,
    MessageNotFound,
    QueueDown,
    SpoolqError,
    StorageError,
    WrongState,
)
from ...ids import (
    bucket_of,
    id_prefix,
    make_id,
    validate_attachment_name,
    validate_msg_id,
)
from ...model import (
    AttachmentInfo,
    Message,
    QueueConfig,
    State,
    check_transition,
)
from ..base import AttachmentSource, check_attachment_names
from . import kicks
from .attachments import add_attachment
from .debris import remove_partial
from .layout import iter_entries, message_path
from .queues import _json
from .reading import ReadParts, _count_key

_seq = itertools.count()
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
COUNT_LOCK_BATCH = 256
"""Renames of a bulk delete or acknowledgement made per hold of the counts lock (I8)."""


def logged_rename(mdir: str, line: bytes, rename: Callable[[], None]) -> None:
    """A move's disk steps: ``line`` appended to the history in the message directory
    ``mdir``, then ``rename()``, the line cut off again if that raises. The line goes first
    so that it travels with the directory (once renamed, another process may move the
    message on at once), and history never claims a move that did not happen.
    FileNotFoundError when ``mdir`` is gone, or whatever ``rename`` raises."""
    # A script can write in its message directory: a link it left as ``history`` is
    # replaced, not written through (durable.open_own).
    hfd = durable.open_own(f"{mdir}/history", os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        n = os.write(hfd, line)
        try:
            rename()
        except BaseException:
            _take_back(hfd, n)
            raise
    finally:
        os.close(hfd)


def _take_back(hfd: int, n: int) -> None:
    """Remove the ``n`` bytes just appended through ``hfd`` (``O_APPEND``) from the history.

    The offset is just past them, wherever the end was (asked only here: a seek per move was
    a syscall on the daemon's hot path). A rename fails when another process moved the
    message first, and that process appended its own line too: if its line came after ours,
    cutting the file at our line's start would take its line with ours, and history would
    miss a move that happened. So what follows our line is written back after the cut."""
    end = os.lseek(hfd, 0, os.SEEK_CUR)
    after = os.fstat(hfd).st_size - end
    tail = os.pread(hfd, after, end) if after > 0 else b""
    os.ftruncate(hfd, end - n)
    if tail:
        durable.write_all(hfd, tail)  # O_APPEND: at the new end


class WriteParts(ReadParts):
    """The filesystem store's writes: creating, publishing, moving, rewriting and deleting messages (and queues)."""

    _batch_depth = 0  # inside durable_batch(): moves are made durable together at its end
    _batch_dirty = False

    @contextlib.contextmanager
    def durable_batch(self) -> Iterator[None]:
        """Moves inside the block are not fsync'd one by one: one ``syncfs`` at its end makes
        them all durable (recovery's hundreds of moves: one flush instead of four each). A
        crash inside the block leaves each message where it was or where it went, as a
        crash between a move and its fsync would (at-least-once: it runs again)."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0:
                self.flush_counts()
            if self._batch_depth == 0 and self._batch_dirty:
                self._batch_dirty = False
                try:
                    durable.syncfs(self.root)
                except OSError as e:
                    raise durable.storage_error(e, "cannot make the recovered moves durable") from None

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        qdir = self._existing_qdir(name)
        if not force:
            c = self.counts(name)
            busy = {k: c[k] for k in ("prep", "que", "run") if c[k]}
            if busy:
                raise Conflict(
                    f"queue {name} still holds messages ({busy}); drain it first or use --force"
                )
        dest = self.root / "deleted"
        try:
            dest.mkdir(exist_ok=True)
            durable.rename(qdir, dest / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{secrets.token_hex(3)}")
        except OSError as e:
            raise durable.storage_error(e, f"cannot delete queue {name}") from None
        self._cfg_cache.pop(name, None)

    # -- creating ------------------------------------------------------------------------
    def _stage(self, qdir: Path) -> str:
        """Make a fresh staging directory in ``<q>/.tmp``, named for sweep() (``<pid>.*``)."""
        path = f"{qdir}/.tmp/{os.getpid()}.{next(_seq)}.{secrets.token_hex(3)}"
        durable.mkdir(path)
        return path

    def _check_accepting(self, queue: str) -> QueueConfig:
        cfg = self.queue_config(queue)
        if os.path.lexists(f"{self.qroot}/{queue}/down"):  # admin_state() == DOWN, in one stat
            raise QueueDown(f"queue {queue} is DOWN: it refuses new messages")
        return cfg

    def _prepare(self, msg: Message, queue: str, now: float, state: State, msg_id: str,
                 *, validate: bool = True) -> Message:
        """The message as stored: a copy of ``msg`` with its id, creation time and defaults.

        ``validate=False`` trusts ``msg`` (it was built by Message.from_dict, as the client
        does) and makes a shallow copy instead of a JSON round trip through from_dict.
        """
        m = Message.from_dict(msg.to_dict()) if validate else copy.copy(msg)
        m.msg_id = msg_id
        m.created_at = now
        if not m.due:
            m.due = now
        if not m.dest:
            m.dest = queue
        # The queue is recorded so that a message directory e2fsck put in lost+found can be
        # given back to its queue (store/fs/sweep.py).
        m.history = [{"state": str(state), "at": now, "queue": queue}]
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
        cfg = self._check_accepting(queue)
        qdir = self.qroot / queue  # validated by _check_accepting
        sync = cfg.fsync
        stage: str | None = None
        sfd = -1
        buckets: dict[str, int] = {}
        published = False
        try:
            stage = self._stage(qdir)
            # One fd on the stage gives its inode (which makes the id unique), creates msg in
            # it and fsyncs it.
            sfd = os.open(stage, _DIR_FLAGS)
            now = self.clock()
            sst = os.fstat(sfd)
            m = self._prepare(msg, queue, now, state, make_id(now, sst.st_ino))
            data = m.encode()
            if attachments:
                check_attachment_names(attachments)
                attach_dir = Path(stage) / "attach"
                durable.mkdir(attach_dir)
                for a in attachments:
                    add_attachment(attach_dir, a, sync)
            durable.write_new("msg", data, sync=sync, dir_fd=sfd)
            if sync and (attachments or not durable.new_names_durable_with_file(stage, sst.st_dev)):
                # The names msg (and attach) in the stage. On ext4/xfs/btrfs the fsync of
                # the new msg file has already made them durable (durable.py explains).
                durable.fsync_fd(sfd)
            # I2: the message becomes visible by one rename of a complete directory, counted
            # under the same hold of the counts lock (I8: a recount sees both or neither).
            with self._counts(qdir).adding({str(state): 1}):
                self._publish_at(stage, qdir / str(state), m.msg_id, buckets, sync)
            stage, published = None, True
            if sync:
                # The rename: its new entry, then (where renames are not atomic on disk) its
                # removal from .tmp, else e2fsck may keep the .tmp entry (durable.py).
                durable.fsync_after_rename(buckets[m.msg_id[:16]], f"{qdir}/.tmp", dev=sst.st_dev)
        except OSError as e:
            if published:  # visible, but maybe not durable: withdraw it
                shutil.rmtree(message_path(qdir, state, m.msg_id), ignore_errors=True)
                self._counts(qdir).add({str(state): -1})
            raise durable.storage_error(e, f"cannot store message in {queue}") from None
        finally:
            for fd in (sfd, *buckets.values()):
                if fd >= 0:
                    os.close(fd)
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        return m

    def single_que(self, queue: str, msg: Message) -> tuple[str, bool]:
        """Under an exclusive flock on ``<queue>/.single_que.lock``: the first waiting message,
        else a new one."""
        self._check_accepting(queue)
        qdir = self.qroot / queue
        try:
            fd = os.open(qdir / ".single_que.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise durable.storage_error(e, f"cannot lock {queue} for single_que") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for msg_id, _, _ in iter_entries(qdir, State.QUE, newest_first=False):
                return msg_id, False
            return self.create(queue, msg).msg_id, True
        finally:
            os.close(fd)  # lets go of the lock

    def create_many(self, queue: str, msgs: Sequence[Message], *, state: State = State.QUE) -> list[Message]:
        """Store ``msgs`` in ``state`` (que, or prep), all or none, with one group commit.

        Each message is made as :meth:`create` makes one (a complete directory, published by
        one rename), but the flushes are shared. The messages are staged side by side in one
        batch directory in ``.tmp``; one ``syncfs`` makes their files and names durable; each
        is renamed into its bucket; one fsync per bucket makes the renames durable. Only then
        does this return. ``msgs`` are trusted to be valid (built by Message.from_dict).
        """
        if state not in (State.QUE, State.PREP):
            raise InvalidInput("new messages start in que or prep")
        cfg = self._check_accepting(queue)
        qdir = self.qdir(queue)
        sdir = qdir / str(state)
        sync = cfg.fsync
        now = self.clock()
        prefix = id_prefix(now)  # one time for the batch: usually one bucket for all
        made: list[Message] = []
        published: list[str] = []
        counted = False
        batch: str | None = None
        bfd = -1
        buckets: dict[str, int] = {}  # bucket part of the id -> open fd on that bucket
        try:
            batch = self._stage(qdir)
            bfd = os.open(batch, _DIR_FLAGS)
            for i, msg in enumerate(msgs):
                name = str(i)
                durable.mkdir(name, dir_fd=bfd)
                ino = os.stat(name, dir_fd=bfd).st_ino
                m = self._prepare(msg, queue, now, state, f"{prefix}.{ino}", validate=False)
                if not msg.due:
                    # Ids in one batch differ by inode, in no useful order: a microsecond per
                    # message keeps the batch first in, first out (the daemon starts by due).
                    m.due = now + i * 1e-6
                durable.write_new(f"{name}/msg", m.encode(), sync=False, dir_fd=bfd)
                made.append(m)
            if sync:
                # Group commit: one flush makes every staged file and directory durable.
                durable.syncfs(qdir)
            # I2: each message becomes visible by one rename of a complete directory; I8:
            # counted under the same hold of the counts lock as the renames.
            with self._counts(qdir).adding({str(state): len(made)}):
                for i, m in enumerate(made):
                    self._publish_at(str(i), sdir, m.msg_id, buckets, sync, src_dir_fd=bfd)
                    published.append(m.msg_id)
            counted = True
            if sync:
                for fd in buckets.values():
                    durable.fsync_fd(fd)
                if durable.rename_needs_source_sync(batch):
                    durable.fsync_fd(bfd)  # the renames' source: the batch directory (durable.py)
        except (OSError, SpoolqError) as e:
            # All or nothing: withdraw what was already published (the batch dir goes below).
            for msg_id in published:
                shutil.rmtree(message_path(qdir, state, msg_id), ignore_errors=True)
            if counted:
                self._counts(qdir).add({str(state): -len(made)})
            if isinstance(e, SpoolqError):
                raise
            raise durable.storage_error(e, f"cannot store {len(msgs)} messages in {queue}") from None
        finally:
            for fd in (bfd, *buckets.values()):
                if fd >= 0:
                    os.close(fd)
            if batch is not None:
                shutil.rmtree(batch, ignore_errors=True)
        return made

    def _publish_at(self, src: str, state_dir: Path, msg_id: str, buckets: dict[str, int],
                    sync: bool, *, src_dir_fd: int | None = None) -> None:
        """Rename ``src`` (relative to ``src_dir_fd`` if given) to ``msg_id`` in its bucket of
        ``state_dir``: :meth:`_publish` on open directories. ``buckets`` caches fds on the
        buckets by the bucket part of the id (``msg_id[:16]``); the caller fsyncs and closes
        them. A bucket removed by the janitor under us is made again.
        """
        key = msg_id[:16]  # YYYYmmdd.HHMM.SS: the bucket
        for _ in range(10):
            fd = buckets.get(key)
            if fd is None:
                fd = buckets[key] = self._open_bucket(state_dir, msg_id, sync)
            try:
                durable._check("rename", msg_id)
                os.rename(src, msg_id, src_dir_fd=src_dir_fd, dst_dir_fd=fd)
                return
            except FileNotFoundError:
                os.stat(src, dir_fd=src_dir_fd)  # raises if the source is what went missing
                os.close(buckets.pop(key))  # the bucket was removed: make it again
            except OSError as e:
                if e.errno in (39, 17):  # the id already exists: clock went back and inode reused
                    raise Conflict(f"message id {msg_id} already exists in {state_dir}") from None
                raise
        raise StorageError(f"cannot create the bucket directory of {msg_id} in {state_dir}")

    @staticmethod
    def _open_bucket(state_dir: Path, msg_id: str, sync: bool) -> int:
        """An fd on the bucket directory that holds ``msg_id`` in ``state_dir``, made as needed."""
        bucket = state_dir.joinpath(*bucket_of(msg_id))
        for _ in range(10):
            try:
                return os.open(bucket, _DIR_FLAGS)
            except FileNotFoundError:
                durable.makedirs(bucket, state_dir, sync=sync)
        raise StorageError(f"cannot create bucket directory {bucket}")

    def _publish(self, src: Path, dst: Path, sync: bool, *, durable_dirs: bool | None = None) -> None:
        """Rename ``src`` to ``dst`` (``<state>/<day>/<HHMM>/<SS>/<id>``), creating its bucket
        directories as needed (made durable when ``durable_dirs``, default ``sync``: a
        deferred move of a durable queue still makes a new bucket durable at once, as no
        later directory fsync would).

        A janitor may remove an empty bucket between our mkdir and our rename: ENOENT on the
        destination then means "make it again", never a lost message.
        """
        dirs_sync = sync if durable_dirs is None else durable_dirs
        for _ in range(10):
            try:
                durable._check("rename", dst)
                os.rename(src, dst)
                break
            except FileNotFoundError:
                if not src.exists():
                    raise
                durable.makedirs(dst.parent, dst.parents[3], sync=dirs_sync)  # up to the state directory
            except OSError as e:
                if e.errno in (39, 17):  # the id already exists: clock went back and inode reused
                    raise Conflict(f"message id {dst.name} already exists in {dst.parents[3]}") from None
                raise
        else:
            raise StorageError(f"cannot create bucket directory {dst.parent}")
        # On a journaling filesystem the rename is one transaction, which the fsync of the
        # destination directory commits; elsewhere the source directory is fsync'd as well.
        if sync:
            durable.fsync_after_rename(dst.parent, src.parent)

    def attach(self, queue: str, msg_id: str, source: AttachmentSource) -> AttachmentInfo:
        qdir = self._existing_qdir(queue)
        cfg = self.queue_config(queue)
        path = message_path(qdir, State.PREP, validate_msg_id(msg_id))
        if not path.is_dir():
            self.locate(queue, msg_id)  # raises MessageNotFound if it is nowhere
            raise WrongState(f"message {msg_id} is not in prep: attachments can only be added in prep")
        attach_dir = path / "attach"
        try:
            try:
                durable.mkdir(attach_dir)
            except FileExistsError:
                pass
            return add_attachment(attach_dir, source, cfg.fsync)
        except OSError as e:
            raise durable.storage_error(e, f"cannot attach to {queue}/{msg_id}") from None

    def delete_attachment(self, queue: str, msg_id: str, name: str) -> None:
        qdir = self._existing_qdir(queue)
        validate_attachment_name(name)
        path = message_path(qdir, State.PREP, validate_msg_id(msg_id))
        if not path.is_dir():
            self.locate(queue, msg_id)
            raise WrongState(f"message {msg_id} is not in prep")
        try:
            os.unlink(path / "attach" / name)
        except FileNotFoundError:
            raise AttachmentNotFound(f"no attachment {name} on {queue}/{msg_id}") from None
        try:
            os.unlink(path / "attach" / f".{name}.json")
        except FileNotFoundError:
            pass

    def commit(self, queue: str, msg_id: str) -> None:
        state, path, _ = self.locate(queue, msg_id)
        if state == State.PREP:
            remove_partial(path / "attach")  # debris of an attach that was killed mid-stream
            self.move(queue, msg_id, State.PREP, State.QUE, note="commit")
        elif state != State.QUE:
            raise WrongState(f"message {queue}/{msg_id} is in {state}: only prep can be committed")

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
        sync: bool | None = None,
        current: Message | None = None,
        cfg: QueueConfig | None = None,
    ) -> Message:
        """Move a message from ``src`` to ``dst``. ``current``: the message as the caller
        knows it (not read again); ``cfg``: the queue's config as the caller has it (the
        daemon's cache: one stat fewer per move)."""
        check_transition(src, dst)
        if cfg is None:
            cfg = self.queue_config(queue)  # raises QueueNotFound
        qdir = self.qdir(queue)  # cached: a Path join per move was measurable
        sync = cfg.fsync if sync is None else sync and cfg.fsync
        durable_dirs = cfg.fsync
        if self._batch_depth and cfg.fsync:
            sync = durable_dirs = False
            self._batch_dirty = True  # durable_batch's syncfs covers this move
        path = message_path(qdir, src, validate_msg_id(msg_id))
        acked = False
        if src == State.ERR and not path.is_dir():
            path, acked = message_path(qdir, src, msg_id, acked=True), True
        try:
            if current is not None and update is None:
                m = copy.copy(current)
                m.history = list(current.history)
            else:
                try:
                    m = self._read_msg(queue, src, path, acked)
                except MessageNotFound:
                    raise WrongState(f"message {msg_id} is not in {src}") from None
            if update is not None:
                update(m)
                durable.write_replace(path / "msg", m.encode(), sync=sync)
            dest = message_path(qdir, dst, msg_id)
            now = self.clock()
            entry = {"state": str(dst), "at": now, **({"note": note} if note else {})}
            try:
                # I8: the rename and its delta under one hold of the counts lock, so a
                # recount sees both or neither (the fsyncs come after, outside it).
                logged_rename(str(path), _json(entry) + b"\n", lambda: self._counted_rename(
                    qdir, {_count_key(src, acked): -1, str(dst): 1},
                    lambda: self._publish(path, dest, False, durable_dirs=durable_dirs)))
            except FileNotFoundError:
                # No message directory (someone else moved or deleted it), or it left meanwhile.
                raise WrongState(f"message {msg_id} is not in {src} (moved meanwhile)") from None
            if sync:
                # On a journaling filesystem the rename is one transaction, which the fsync of
                # the destination directory commits; elsewhere the source is fsync'd as well.
                durable.fsync_after_rename(dest.parent, path.parent)
        except OSError as e:
            raise durable.storage_error(e, f"cannot move {queue}/{msg_id} to {dst}") from None
        m.history.append(entry)
        return m

    def _counted_rename(self, qdir: Path, deltas: dict[str, int], rename: Callable[[], None]) -> None:
        """A move's ``rename()``, and its counts delta once the rename is done (the daemon's
        store gathers them instead: attempts.py). A call, not a ``with``: a generator-based
        context manager cost the daemon several us per move."""
        with self._counts(qdir).adding(deltas):
            rename()

    def flush_counts(self) -> None:
        """Add gathered counts deltas (none here: attempts.py gathers them for the daemon)."""

    def update(self, queue: str, msg_id: str, fn: Callable[[Message], None]) -> Message:
        state, path, acked = self.locate(queue, msg_id)
        m = self._read_msg(queue, state, path, acked)
        fn(m)
        try:
            durable.write_replace(path / "msg", m.encode(), sync=self.queue_config(queue).fsync)
        except FileNotFoundError:
            raise WrongState(f"message {msg_id} moved while being updated; try again") from None
        except OSError as e:
            raise durable.storage_error(e, f"cannot update {queue}/{msg_id}") from None
        if state == State.QUE:
            # The daemon watches queue directories, not message directories: kick/<id> makes it
            # read this one again (after the rewrite above, kicks.py).
            try:
                kicks.request(self.qroot / queue, msg_id)
            except OSError:
                pass  # a hint only: the rewrite is what counts; the daemon sees it later
        return m

    def set_status(self, queue: str, msg_id: str, text: str) -> None:
        _, path, _ = self.locate(queue, msg_id)
        try:
            # Advisory text, rewritten on every status line: atomic but not fsync'd.
            durable.write_replace(path / "status", _json({"job_status": text}), sync=False)
        except FileNotFoundError:
            pass  # the message moved on; its next state writes its own status
        except OSError as e:
            raise durable.storage_error(e, f"cannot set status of {queue}/{msg_id}") from None

    def cancel(self, queue: str, msg_id: str) -> State:
        for _ in range(5):
            state, path, _ = self.locate(queue, msg_id)
            if state == State.QUE:
                try:
                    self.move(queue, msg_id, State.QUE, State.ERR, note="cancelled")
                except WrongState:
                    continue  # the daemon started it meanwhile
                self.set_status(queue, msg_id, "cancelled")
                return State.ERR
            if state != State.RUN:
                raise WrongState(f"message {queue}/{msg_id} is in {state}: only queued or running "
                                 "messages can be cancelled")
            try:
                durable.write_new(path / "cancel", b"", sync=False)  # the daemon's reap reads it too
            except FileExistsError:
                pass  # asked before
            except FileNotFoundError:
                continue  # it left run meanwhile
            except OSError as e:
                raise durable.storage_error(e, f"cannot cancel {queue}/{msg_id}") from None
            try:
                kicks.request(self.qdir(queue), msg_id)  # wakes the daemon: it kills the script
            except OSError:
                pass  # the marker is what counts: the script's end (or a restart) sees it
            return State.RUN
        raise WrongState(f"message {queue}/{msg_id} keeps changing state; try again")

    def delete(self, queue: str, msg_id: str) -> None:
        failures = self.delete_many(queue, [msg_id])
        if failures:
            raise failures[0][1]

    def delete_many(self, queue: str, msg_ids: Sequence[str], *, state: State | None = None,
                    acked: bool | None = None) -> builtins.list[tuple[str, SpoolqError]]:
        """Delete each message (none may be running); one fsync per touched bucket and one
        counts update for the lot. Returns ``(msg_id, error)`` for those that could not go."""
        qdir = self._existing_qdir(queue)
        sync = self.queue_config(queue).fsync
        failures: list[tuple[str, SpoolqError]] = []
        touched: dict[Path, None] = {}
        trash: list[Path] = []
        want_state, want_acked = state, acked
        ids = list(msg_ids)
        for at in range(0, len(ids), COUNT_LOCK_BATCH):
            # I8: renames and their deltas under one hold of the counts lock (a recount sees
            # both or neither), a batch at a time so that producers do not wait long.
            part: dict[str, int] = {}
            with self._counts(qdir).adding(part):
                for msg_id in ids[at:at + COUNT_LOCK_BATCH]:
                    try:
                        state, path, acked = self.locate(queue, msg_id)
                        if state == State.RUN:
                            raise WrongState(f"message {msg_id} is running: cancel it first")
                        # The rename below takes the path found here: a message moved meanwhile
                        # is not there any more, and is not deleted.
                        if want_state is not None and (state != want_state or (want_acked is not None
                                                                              and acked != want_acked)):
                            raise WrongState(f"message {msg_id} is {'acknowledged ' if acked else ''}{state}, "
                                             f"not {'acknowledged ' if want_acked else ''}{want_state}")
                        dest = qdir / ".tmp" / f"deleted.{msg_id}.{secrets.token_hex(3)}"
                        try:
                            os.rename(path, dest)  # I2 again: it disappears in one step
                        except FileNotFoundError:
                            raise MessageNotFound(f"message {msg_id} moved while being deleted") from None
                        except OSError as e:
                            raise durable.storage_error(e, f"cannot delete {queue}/{msg_id}") from None
                    except SpoolqError as e:
                        failures.append((msg_id, e))
                        continue
                    trash.append(dest)
                    touched[path.parent] = None
                    key = _count_key(state, acked)
                    part[key] = part.get(key, 0) - 1
        if sync and trash:
            try:
                # .tmp first, then each bucket the messages left (durable.fsync_after_rename,
                # once per directory for the lot).
                durable.fsync_dir(qdir / ".tmp")
                if durable.rename_needs_source_sync(qdir):
                    durable.fsync_dirs(touched)
            except OSError:
                pass  # gone from the tree already; a power cut may bring one back, never lose one
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)
        return failures

    def ack_errs(self, queue: str) -> int:
        qdir = self._existing_qdir(queue)
        sync = self.queue_config(queue).fsync
        n = 0
        buckets: dict[Path, None] = {}
        entries = [(msg_id, path) for msg_id, path, acked in iter_entries(qdir, State.ERR) if not acked]
        try:
            for at in range(0, len(entries), COUNT_LOCK_BATCH):
                part: dict[str, int] = {}
                failed: OSError | None = None
                with self._counts(qdir).adding(part):  # I8, as in delete_many
                    for msg_id, path in entries[at:at + COUNT_LOCK_BATCH]:
                        try:
                            os.rename(path, path.with_name("." + msg_id))  # a rename within its bucket
                        except FileNotFoundError:
                            continue
                        except OSError as e:
                            failed = e  # raised once what was renamed is counted
                            break
                        n += 1
                        part["err"] = part.get("err", 0) - 1
                        part["err_acked"] = part.get("err_acked", 0) + 1
                        buckets[path.parent] = None
                if failed is not None:
                    raise failed
            if sync:
                durable.fsync_dirs(buckets)  # each bucket once: every rename in it is durable
        except OSError as e:
            raise durable.storage_error(e, f"cannot acknowledge the errors of {queue}") from None
        return n

