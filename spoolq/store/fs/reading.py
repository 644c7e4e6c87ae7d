"""The filesystem store's reads: finding, viewing, listing, counting and opening messages.

Part of :class:`~spoolq.store.fs.store.FsStore` (a chain of classes, one module per concern);
the invariants are in docs/internals.md.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO

from ... import durable
from ...errors import (
    AttachmentNotFound,
    CorruptMessage,
    LogNotFound,
    MessageNotFound,
    SpoolqError,
)
from ...ids import (
    log_name_ok,
    validate_attachment_name,
    validate_msg_id,
)
from ...model import (
    AttachmentInfo,
    IdPage,
    ListPage,
    Message,
    MessageView,
    State,
    runner_host,
)
from .beneath import NotBeneath, open_dir_beneath, open_in
from .inotify import FsMessageWatch
from .layout import Counts, count_tree, message_path
from .queues import QueueParts, _read_file
from .search import Needle, Scan, read_whole, scan, status_text

# Order in which locate() looks for a message: the common states of a live message first.
LOOKUP_ORDER = (State.RUN, State.QUE, State.PREP, State.DONE, State.ERR, State.RELAYED)


class ReadParts(QueueParts):
    """The filesystem store's reads: finding, viewing, listing, counting and opening messages."""

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
            raw = _read_file(f"{path}/msg")
            m = Message.from_dict(json.loads(raw))
        except FileNotFoundError:
            # Gone, or moved away and back meanwhile (the daemon's start, then a requeue): a
            # msg there now is a live message's, for the caller to read again. Only a
            # directory that still has none is set aside.
            if not path.is_dir() or os.path.exists(f"{path}/msg"):
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
            # Into the directory; beside it for anything else (a link is not followed).
            note = dest / "CORRUPT" if stat.S_ISDIR(os.lstat(dest).st_mode) else Path(f"{dest}.CORRUPT")
            note.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {why}\n")
        except OSError:
            return False
        return True

    def _view(self, queue: str, state: State, path: Path, acked: bool) -> MessageView:
        m = self._read_msg(queue, state, path, acked)
        job_status = _job_status(path)
        try:
            for line in read_whole(path / "history").splitlines():
                try:
                    h = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash: history is advisory
                if isinstance(h, dict):
                    m.history.append(h)
        except FileNotFoundError:
            if not path.is_dir():  # it moved on since its msg was read: the caller reads again
                raise MessageNotFound(f"message {path.name} moved while reading") from None
        except OSError:
            pass
        atts = _attachments(self.qroot / queue, path)
        return MessageView(queue=queue, message=m, state=state, job_status=job_status,
                           attachments=atts, acked=acked, host=_running_host(path) if state == State.RUN else "")

    def get(self, queue: str, msg_id: str) -> MessageView:
        # A message moves a few times in its life; ten tries outlast any real run of moves
        # (each read that saw one starts again where it landed).
        for _ in range(10):
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

        return Counts(qdir / "counts", lambda: count_tree(qdir))

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
                fd = open_dir_beneath(qdir, [*path.relative_to(qdir).parts, area])
                try:
                    inode = _linked_inode(_meta(fd, name)) if linked_inode else None
                    return open_in(fd, name, linked_inode=inode)
                finally:
                    os.close(fd)
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



def _count_key(state: State, acked: bool = False) -> str:
    return "err_acked" if acked else str(state)



def _attachments(qdir: Path, mdir: Path) -> dict[str, AttachmentInfo]:
    """The attachments of the message in ``mdir``, listed without following a symbolic link
    (a script may have made ``attach/`` or a file in it one): a link is listed with size 0."""
    atts: dict[str, AttachmentInfo] = {}
    adir = mdir / "attach"
    try:
        fd = open_dir_beneath(qdir, [*mdir.relative_to(qdir).parts, "attach"])
    except FileNotFoundError:
        if not os.path.isdir(mdir):  # it moved on since its msg was read: the caller reads again
            raise MessageNotFound(f"message {mdir.name} moved while reading") from None
        return atts
    except (OSError, ValueError):
        return atts
    try:
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in os.scandir(fd) if not e.name.startswith(".")]
        for n, st in entries:
            meta = _meta(fd, n) or {}
            try:
                atts[n] = AttachmentInfo(name=n, size=int(meta["size"]), md5=str(meta["md5"]),
                                         sha256=str(meta.get("sha256", "")), path=str(adir / n))
            except (ValueError, KeyError, TypeError):
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0  # a link: listed, never followed
                atts[n] = AttachmentInfo(name=n, size=size, md5="", sha256="", path=str(adir / n))
    except OSError:
        pass  # the directory went away while we listed it
    finally:
        os.close(fd)
    return atts


def _meta(attach_fd: int, name: str) -> dict[str, Any] | None:
    """``attach/.<name>.json`` (size, hashes, a linked inode), read through the attach
    directory's fd without following a link; None when missing or unreadable."""
    try:
        with open_in(attach_fd, f".{name}.json") as f:
            meta = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None



def _linked_inode(meta: dict[str, Any] | None) -> int | None:
    """The inode spoolq hard-linked as this attachment (its metadata says), if any."""
    ino = meta.get("linked_inode") if meta is not None else None
    return ino if isinstance(ino, int) and not isinstance(ino, bool) else None



def _job_status(path: Path) -> str:
    """The script's latest status text from a message's ``status`` file ("" if none)."""
    try:
        return status_text(_read_file(path / "status"))
    except OSError:
        return ""


def _running_host(path: Path) -> str:
    """The host named in a running message's ``pid`` file (this one, for a file written by an
    older daemon without it); "" before the script started."""
    try:
        runner = read_whole(path / "pid").decode(errors="replace")
    except OSError:
        return ""
    return runner_host(runner) or socket.gethostname()
