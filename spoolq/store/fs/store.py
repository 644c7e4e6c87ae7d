"""The filesystem store: queues are directories, messages are directories of JSON and files.

Every state change is one rename(2) of a message directory (the commit point); durable
writes go through :mod:`spoolq.durable`. The state table, the invariants and the crash
argument are in docs/internals.md; comments below name the invariant they keep (I1..I8).
"""

from __future__ import annotations

import builtins
import copy
import errno
import itertools
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ... import durable
from ...config import RootConfig, read_root_config, write_root_config
from ...errors import (
    AttachmentNotFound,
    Conflict,
    CorruptMessage,
    InvalidConfig,
    InvalidInput,
    LogNotFound,
    MessageNotFound,
    QueueDown,
    QueueExists,
    QueueNotFound,
    SpoolqError,
    StorageError,
    WrongState,
)
from ...ids import (
    bucket_of,
    id_prefix,
    log_name_ok,
    make_id,
    validate_attachment_name,
    validate_msg_id,
    validate_queue_name,
)
from ...model import (
    ADMIN_FLAGS,
    COMPACT_JSON,
    AdminState,
    AttachmentInfo,
    IdPage,
    ListPage,
    Message,
    MessageView,
    QueueConfig,
    State,
    check_transition,
)
from ..base import AttachmentSource, SweepResult, check_attachment_names
from . import kicks, pidfile
from .attachments import add_attachment
from .beneath import NotBeneath, open_beneath, open_dir_beneath
from .debris import remove_partial
from .inotify import FsMessageWatch
from .layout import COUNT_KEYS, Counts, iter_entries, message_path
from .search import Needle, Scan, read_whole, scan, status_text
from .sweep import lost_found_of, recover_lost_found, sweep_queue, sweep_root

CHUNK = 1024 * 1024
# Order in which locate() looks for a message: the common states of a live message first.
LOOKUP_ORDER = (State.RUN, State.QUE, State.PREP, State.DONE, State.ERR, State.RELAYED)
_seq = itertools.count()
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _count_key(state: State, acked: bool = False) -> str:
    return "err_acked" if acked else str(state)


class FsStore:
    """A spool root on the local filesystem. Safe for many processes at once (no global lock)."""

    def __init__(self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(os.path.abspath(root))
        self.qroot = self.root / "queue"
        self.url = f"file://{self.root}"
        self._daemon_fd = -1  # daemon.pid, locked while this store serves as the daemon's
        self.clock = clock
        self._cfg_cache: dict[str, tuple[tuple[int, int], QueueConfig]] = {}
        # Nothing is created until something is written (create_queue): a mistyped --root
        # given to a read command must not leave an empty spool behind.

    def ensure_root(self) -> None:
        """Create the spool root and its ``queue/`` directory if they are missing."""
        try:
            self.qroot.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise durable.storage_error(e, f"cannot create spool root {self.root}") from None

    # -- the store as a whole ---------------------------------------------------------------
    def root_config(self) -> RootConfig:
        return read_root_config(self.root)

    def set_root_config(self, cfg: RootConfig) -> bool:
        try:
            if cfg != read_root_config(self.root):
                self.ensure_root()
            return write_root_config(self.root, cfg)
        except OSError as e:
            raise durable.storage_error(e, f"cannot write {self.root / 'config.json'}") from None

    def acquire_daemon(self) -> None:
        """Create the root if needed and lock ``<root>/daemon.pid`` (pidfile.py)."""
        if self._daemon_fd >= 0:
            return
        self.ensure_root()
        self._daemon_fd = pidfile.acquire(self.root)

    def release_daemon(self) -> None:
        if self._daemon_fd >= 0:
            pidfile.release(self._daemon_fd)
            self._daemon_fd = -1

    def served(self) -> bool | None:
        return self._daemon_fd >= 0 or pidfile.is_served(self.root)

    # -- queues --------------------------------------------------------------------------
    def qdir(self, name: str) -> Path:
        return self.qroot / validate_queue_name(name)

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
        path = f"{self.qroot}/{validate_queue_name(name)}/config.json"
        try:
            st = os.stat(path)
            key = (st.st_mtime_ns, st.st_size)
            cached = self._cfg_cache.get(name)
            if cached and cached[0] == key:
                return cached[1]
            raw = _read_file(Path(path))
        except (FileNotFoundError, NotADirectoryError):
            raise QueueNotFound(f"no such queue: {name}") from None
        try:
            cfg = QueueConfig.from_dict(json.loads(raw))
        except ValueError as e:
            raise InvalidConfig(f"config.json of queue {name} is not valid JSON: {e}") from None
        if cfg.name != name:
            raise InvalidConfig(f"config.json of queue {name} names another queue: {cfg.name!r}")
        self._cfg_cache[name] = (key, cfg)
        return cfg

    def admin_state(self, name: str) -> AdminState:
        qdir = self._existing_qdir(name)
        return AdminState.of_flags((qdir / "pause").exists(), (qdir / "down").exists())

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
            elif not on and p.exists():
                p.unlink()
                durable.fsync_dir(p.parent)
        except FileNotFoundError:
            pass  # removed meanwhile by someone else: the wanted end state
        except OSError as e:
            raise durable.storage_error(e, f"cannot {'set' if on else 'clear'} {flag} on {name}") from None

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
            # I2: the message becomes visible by one rename of a complete directory.
            self._publish_at(stage, qdir / str(state), m.msg_id, buckets, sync)
            stage, published = None, True
            if sync:
                # The rename: its new entry, then (where renames are not atomic on disk) its
                # removal from .tmp, else e2fsck may keep the .tmp entry (durable.py).
                durable.fsync_after_rename(buckets[m.msg_id[:16]], f"{qdir}/.tmp", dev=sst.st_dev)
        except OSError as e:
            if published:  # visible, but maybe not durable: withdraw it
                shutil.rmtree(message_path(qdir, state, m.msg_id), ignore_errors=True)
            raise durable.storage_error(e, f"cannot store message in {queue}") from None
        finally:
            for fd in (sfd, *buckets.values()):
                if fd >= 0:
                    os.close(fd)
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        self._counts(qdir).add({str(state): 1})
        return m

    def create_many(self, queue: str, msgs: Sequence[Message]) -> list[Message]:
        """Store ``msgs`` in que, all or none, with one group commit.

        Each message is made as :meth:`create` makes one (a complete directory, published by
        one rename), but the flushes are shared. The messages are staged side by side in one
        batch directory in ``.tmp``; one ``syncfs`` makes their files and names durable; each
        is renamed into its bucket; one fsync per bucket makes the renames durable. Only then
        does this return. ``msgs`` are trusted to be valid (built by Message.from_dict).
        """
        cfg = self._check_accepting(queue)
        qdir = self.qdir(queue)
        sdir = qdir / str(State.QUE)
        sync = cfg.fsync
        now = self.clock()
        prefix = id_prefix(now)  # one time for the batch: usually one bucket for all
        made: list[Message] = []
        published: list[str] = []
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
                m = self._prepare(msg, queue, now, State.QUE, f"{prefix}.{ino}", validate=False)
                durable.write_new(f"{name}/msg", m.encode(), sync=False, dir_fd=bfd)
                made.append(m)
            if sync:
                # Group commit: one flush makes every staged file and directory durable.
                durable.syncfs(qdir)
            for i, m in enumerate(made):
                # I2: each message becomes visible by one rename of a complete directory.
                self._publish_at(str(i), sdir, m.msg_id, buckets, sync, src_dir_fd=bfd)
                published.append(m.msg_id)
            if sync:
                for fd in buckets.values():
                    durable.fsync_fd(fd)
                if durable.rename_needs_source_sync(batch):
                    durable.fsync_fd(bfd)  # the renames' source: the batch directory (durable.py)
        except (OSError, SpoolqError) as e:
            # All or nothing: withdraw what was already published (the batch dir goes below).
            for msg_id in published:
                shutil.rmtree(message_path(qdir, State.QUE, msg_id), ignore_errors=True)
            if isinstance(e, SpoolqError):
                raise
            raise durable.storage_error(e, f"cannot store {len(msgs)} messages in {queue}") from None
        finally:
            for fd in (bfd, *buckets.values()):
                if fd >= 0:
                    os.close(fd)
            if batch is not None:
                shutil.rmtree(batch, ignore_errors=True)
        self._counts(qdir).add({"que": len(made)})
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

    def _publish(self, src: Path, dst: Path, state_dir: Path, sync: bool) -> None:
        """Rename ``src`` to ``dst``, creating its bucket directories as needed.

        A janitor may remove an empty bucket between our mkdir and our rename: ENOENT on the
        destination then means "make it again", never a lost message.
        """
        for _ in range(10):
            try:
                durable._check("rename", dst)
                os.rename(src, dst)
                break
            except FileNotFoundError:
                if not src.exists():
                    raise
                durable.makedirs(dst.parent, state_dir, sync=sync)
            except OSError as e:
                if e.errno in (39, 17):  # the id already exists: clock went back and inode reused
                    raise Conflict(f"message id {dst.name} already exists in {state_dir}") from None
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

    # -- reading -------------------------------------------------------------------------
    def locate(self, queue: str, msg_id: str) -> tuple[State, Path, bool]:
        """Where a message is now: (state, directory, acked)."""
        qdir = self._existing_qdir(queue)
        validate_msg_id(msg_id)
        # A message can move while we look; look a few times before calling it missing.
        for _ in range(3):
            for st in LOOKUP_ORDER:
                p = message_path(qdir, st, msg_id)
                if os.path.isdir(p):
                    return st, p, False
                if st == State.ERR:
                    p = message_path(qdir, st, msg_id, acked=True)
                    if os.path.isdir(p):
                        return st, p, True
        raise MessageNotFound(f"no message {msg_id} in queue {queue}")

    def _read_msg(self, queue: str, state: State, path: Path, acked: bool = False) -> Message:
        try:
            raw = _read_file(path / "msg")
            m = Message.from_dict(json.loads(raw))
        except FileNotFoundError:
            if not path.is_dir():
                raise MessageNotFound(f"message {path.name} moved or vanished while reading") from None
            self._set_aside(queue, state, path, acked, "msg file missing")
            raise CorruptMessage(f"message {path.name} in {queue}/{state} has no msg file; set aside") from None
        except (IsADirectoryError, NotADirectoryError, ValueError, RecursionError, SpoolqError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            self._set_aside(queue, state, path, acked, f"unreadable msg: {why}")
            raise CorruptMessage(
                f"message {path.name} in {queue}/{state} has an unreadable msg file ({why}); "
                f"set aside in {self.qdir(queue) / 'corrupt'}"
            ) from None
        except OSError as e:  # EACCES, EIO: not the message's fault, so it is not moved
            raise durable.storage_error(e, f"cannot read {queue}/{path.name}") from None
        if m.msg_id != path.name.removeprefix("."):
            why = f"msg names another id ({m.msg_id!r})"
            self._set_aside(queue, state, path, acked, why)
            raise CorruptMessage(f"message {path.name} in {queue}/{state}: {why}; "
                                 f"set aside in {self.qdir(queue) / 'corrupt'}")
        return m

    def _set_aside(self, queue: str, state: State, path: Path, acked: bool, why: str) -> None:
        """I7: a message whose files are unreadable is moved out of the state tree, not deleted."""
        qdir = self.qdir(queue)
        if self._move_to_corrupt(qdir, path, f"{state}.{path.name.lstrip('.')}", why):
            self._counts(qdir).add({_count_key(state, acked): -1})

    @staticmethod
    def _move_to_corrupt(qdir: Path, path: Path, label: str, why: str) -> bool:
        """Move the directory ``path`` to ``<q>/corrupt/<label>.<rand>`` with a ``CORRUPT``
        note saying why, for a person to look at (I7); False if it could not be moved."""
        dest = qdir / "corrupt" / f"{label}.{secrets.token_hex(3)}"
        try:
            (qdir / "corrupt").mkdir(exist_ok=True)
            durable.rename(path, dest)
            (dest / "CORRUPT").write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {why}\n")
        except OSError:
            return False
        return True

    def _view(self, queue: str, state: State, path: Path, acked: bool) -> MessageView:
        m = self._read_msg(queue, state, path, acked)
        job_status = _job_status(path)
        try:
            with open(path / "history", "rb") as f:
                for line in f:
                    try:
                        h = json.loads(line)
                    except ValueError:
                        continue  # a torn last line after a crash: history is advisory
                    if isinstance(h, dict):
                        m.history.append(h)
        except OSError:
            pass
        atts = _attachments(self.qroot / queue, path)
        return MessageView(queue=queue, message=m, state=state, job_status=job_status,
                           attachments=atts, acked=acked)

    def get(self, queue: str, msg_id: str) -> MessageView:
        for _ in range(3):
            state, path, acked = self.locate(queue, msg_id)
            try:
                return self._view(queue, state, path, acked)
            except MessageNotFound:
                continue  # it moved between locate and read: look again
        raise MessageNotFound(f"no message {msg_id} in queue {queue}")

    def state_of(self, queue: str, msg_id: str) -> State:
        return self.locate(queue, msg_id)[0]

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
        found = self._scan(queue, state, limit, cursor, filter, scan_limit)
        page = ListPage(items=[], next_cursor=found.next_cursor, scanned=found.scanned)
        for _, path, acked in found.hits:
            try:
                page.items.append(self._view(queue, state, path, acked))
            except CorruptMessage as e:
                page.problems.append(str(e))
            except MessageNotFound:
                continue  # moved on while we listed
        return page

    def find_ids(self, queue: str, state: State, *, filter: str | None = None, cursor: str | None = None,
                 limit: int = 1000, scan_limit: int | None = None) -> IdPage:
        found = self._scan(queue, state, limit, cursor, filter, scan_limit)
        return IdPage(ids=[h[0] for h in found.hits], next_cursor=found.next_cursor, scanned=found.scanned)

    def _scan(self, queue: str, state: State, limit: int, cursor: str | None, filter: str | None,
              scan_limit: int | None) -> Scan:
        qdir = self._existing_qdir(queue)
        if cursor is not None:
            validate_msg_id(cursor)
        limit = max(1, min(int(limit), 10000))
        return scan(qdir, state, Needle(filter) if filter else None, cursor=cursor, limit=limit,
                    scan_limit=None if scan_limit is None else max(1, int(scan_limit)))

    def ids(self, queue: str, state: State) -> Iterator[str]:
        qdir = self._existing_qdir(queue)
        for msg_id, _, _ in iter_entries(qdir, state, newest_first=False):
            yield msg_id

    def counts(self, queue: str) -> dict[str, int]:
        qdir = self._existing_qdir(queue)
        c = Counts(qdir / "counts").read()
        if c is None:
            return self.recount(queue)
        return c

    def recount(self, queue: str) -> dict[str, int]:
        qdir = self._existing_qdir(queue)
        return self._counts(qdir).rewrite()

    @staticmethod
    def _counts(qdir: Path) -> Counts:
        """The counts cache of the queue in ``qdir``, able to rebuild itself from the tree."""

        def walk() -> dict[str, int]:
            counts = dict.fromkeys(COUNT_KEYS, 0)
            for st in State:
                for _, _, acked in iter_entries(qdir, st, newest_first=False):
                    counts[_count_key(st, acked)] += 1
            return counts

        return Counts(qdir / "counts", walk)

    def open_attachment(self, queue: str, msg_id: str, name: str) -> BinaryIO:
        validate_attachment_name(name)
        try:
            return self._open_beneath(queue, msg_id, "attach", name, linked_inode=True)
        except (FileNotFoundError, NotADirectoryError, NotBeneath):
            raise AttachmentNotFound(f"Message ID attachment '{name}' not found") from None

    def open_log(self, queue: str, msg_id: str, name: str = "stdio.log") -> BinaryIO:
        if not log_name_ok(name):
            raise LogNotFound(f"Message ID log '{name}' not found")
        try:
            return self._open_beneath(queue, msg_id, "job", name)
        except (FileNotFoundError, NotADirectoryError, NotBeneath):
            raise LogNotFound(f"Message ID log '{name}' not found") from None

    def _open_beneath(self, queue: str, msg_id: str, area: str, name: str, *,
                      linked_inode: bool = False) -> BinaryIO:
        """``<message>/<area>/<name>``, opened without following any symbolic or second
        hard link below the queue directory: scripts can write into their message
        (store/fs/beneath.py). With ``linked_inode``, an attachment spoolq hard-linked itself
        (its metadata names the inode) is served."""
        _, path, _ = self.locate(queue, msg_id)
        qdir = self.qroot / queue
        for _ in range(3):
            try:
                inode = _linked_inode(qdir, path, name) if linked_inode else None
                return open_beneath(qdir, [*path.relative_to(qdir).parts, area, name], linked_inode=inode)
            except FileNotFoundError:
                _, moved, _ = self.locate(queue, msg_id)  # it may have moved on meanwhile
                if moved == path:
                    raise
                path = moved
        raise FileNotFoundError(errno.ENOENT, "the message keeps moving", name)

    def watch_message(self, queue: str, msg_id: str, *, log: bool = False) -> FsMessageWatch:
        self.locate(queue, msg_id)  # MessageNotFound now, not at the first wait
        return FsMessageWatch(lambda: self.locate(queue, msg_id)[1], log=log)

    def message_dir(self, queue: str, msg_id: str) -> Path:
        return self.locate(queue, msg_id)[1]

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
    ) -> Message:
        check_transition(src, dst)
        cfg = self.queue_config(queue)  # raises QueueNotFound
        qdir = self.qroot / queue
        sync = cfg.fsync if sync is None else sync and cfg.fsync
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
            # The history line is written before the rename so it travels with the directory:
            # after the rename another process (the daemon) may move the message on at once.
            # If the rename fails, the line is cut off again: history never claims a move
            # that did not happen.
            now = self.clock()
            entry = {"state": str(dst), "at": now, **({"note": note} if note else {})}
            try:
                hfd = os.open(path / "history", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                # No message directory: someone else moved or deleted it.
                raise WrongState(f"message {msg_id} is not in {src}") from None
            try:
                before = os.lseek(hfd, 0, os.SEEK_END)
                os.write(hfd, _json(entry) + b"\n")
                try:
                    self._publish(path, dest, qdir / str(dst), sync)
                except FileNotFoundError:
                    os.ftruncate(hfd, before)
                    raise WrongState(f"message {msg_id} left {src} while being moved") from None
                except BaseException:
                    os.ftruncate(hfd, before)
                    raise
            finally:
                os.close(hfd)
        except OSError as e:
            raise durable.storage_error(e, f"cannot move {queue}/{msg_id} to {dst}") from None
        self._counts(qdir).add({_count_key(src, acked): -1, str(dst): 1})
        m.history.append(entry)
        return m

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

    def delete(self, queue: str, msg_id: str) -> None:
        failures = self.delete_many(queue, [msg_id])
        if failures:
            raise failures[0][1]

    def delete_many(self, queue: str, msg_ids: Sequence[str]) -> builtins.list[tuple[str, SpoolqError]]:
        """Delete each message (none may be running); one fsync per touched bucket and one
        counts update for the lot. Returns ``(msg_id, error)`` for those that could not go."""
        qdir = self._existing_qdir(queue)
        sync = self.queue_config(queue).fsync
        failures: list[tuple[str, SpoolqError]] = []
        deltas: dict[str, int] = {}
        touched: dict[Path, None] = {}
        trash: list[Path] = []
        for msg_id in msg_ids:
            try:
                state, path, acked = self.locate(queue, msg_id)
                if state == State.RUN:
                    raise WrongState(f"message {msg_id} is running: cancel it first")
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
            deltas[key] = deltas.get(key, 0) - 1
        if sync and trash:
            try:
                # .tmp first, then each bucket the messages left (durable.fsync_after_rename,
                # once per directory for the lot).
                durable.fsync_dir(qdir / ".tmp")
                if durable.rename_needs_source_sync(qdir):
                    durable.fsync_dirs(touched)
            except OSError:
                pass  # gone from the tree already; a power cut may bring one back, never lose one
        if deltas:
            self._counts(qdir).add(deltas)
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)
        return failures

    def ack_errs(self, queue: str) -> int:
        qdir = self._existing_qdir(queue)
        sync = self.queue_config(queue).fsync
        n = 0
        buckets: dict[Path, None] = {}
        try:
            for msg_id, path, acked in list(iter_entries(qdir, State.ERR)):
                if acked:
                    continue
                try:
                    os.rename(path, path.with_name("." + msg_id))  # a rename within its bucket
                except FileNotFoundError:
                    continue
                n += 1
                buckets[path.parent] = None
            if sync:
                durable.fsync_dirs(buckets)  # each bucket once: every rename in it is durable
        except OSError as e:
            raise durable.storage_error(e, f"cannot acknowledge the errors of {queue}") from None
        finally:
            if n:
                self._counts(qdir).add({"err": -n, "err_acked": n})
        return n

    def sweep_root(self, *, older_than: float = 3600.0) -> builtins.list[str]:
        """Remove ``queue/.new.<name>.<pid>.<rand>``: queues whose creator died before its
        rename (I1), once that process is gone, or older than ``older_than`` seconds."""
        return sweep_root(self, older_than)

    def sweep(self, queue: str, *, older_than: float = 3600.0) -> SweepResult:
        """I6: complete staged messages of dead producers go into their state, the rest of
        their debris goes, empty old buckets go (store/fs/sweep.py)."""
        return sweep_queue(self, queue, older_than)

    def recover_lost_found(self, lost_found: str | os.PathLike[str] | None = None) -> SweepResult:
        """I10: put back message directories that e2fsck moved to ``lost_found`` (default:
        ``lost+found`` at the top of the spool's filesystem), see store/fs/sweep.py."""
        if lost_found is None:
            try:
                lost_found = lost_found_of(self.root)
            except OSError:
                return SweepResult()
        return recover_lost_found(self, Path(lost_found))


def _attachments(qdir: Path, mdir: Path) -> dict[str, AttachmentInfo]:
    """The attachments of the message in ``mdir``, listed without following a symbolic link
    (a script may have made ``attach/`` or a file in it one): a link is listed with size 0."""
    atts: dict[str, AttachmentInfo] = {}
    adir = mdir / "attach"
    try:
        fd = open_dir_beneath(qdir, [*mdir.relative_to(qdir).parts, "attach"])
    except (OSError, ValueError):
        return atts
    try:
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in os.scandir(fd) if not e.name.startswith(".")]
    except OSError:
        entries = []
    finally:
        os.close(fd)
    for n, st in entries:
        try:
            with open_beneath(qdir, [*mdir.relative_to(qdir).parts, "attach", f".{n}.json"]) as f:
                meta = json.loads(f.read(4096))
            atts[n] = AttachmentInfo(name=n, size=int(meta["size"]), md5=str(meta["md5"]),
                                     sha256=str(meta.get("sha256", "")), path=str(adir / n))
        except (OSError, ValueError, KeyError, TypeError):
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0  # a link: listed, never followed
            atts[n] = AttachmentInfo(name=n, size=size, md5="", sha256="", path=str(adir / n))
    return atts


def _linked_inode(qdir: Path, mdir: Path, name: str) -> int | None:
    """The inode spoolq hard-linked as attachment ``name`` (its ``.name.json`` says), if any."""
    try:
        with open_beneath(qdir, [*mdir.relative_to(qdir).parts, "attach", f".{name}.json"]) as f:
            meta = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    ino = meta.get("linked_inode") if isinstance(meta, dict) else None
    return ino if isinstance(ino, int) and not isinstance(ino, bool) else None


def _job_status(path: Path) -> str:
    """The script's latest status text from a message's ``status`` file ("" if none)."""
    try:
        return status_text(_read_file(path / "status"))
    except OSError:
        return ""


def _read_file(path: Path) -> bytes:
    return read_whole(path)


def _json(obj: Any, indent: int | None = None) -> bytes:
    if indent:
        return (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode()
    return COMPACT_JSON.encode(obj).encode()
