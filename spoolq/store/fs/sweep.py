"""What crashes and power cuts leave behind in the filesystem store, and how it is put right.

* **Debris** of writers that died (staging directories, half-made queues, half-written
  attachments) is removed (I6), and empty old buckets are pruned.
* A **complete staged message** (a staging directory in ``<q>/.tmp`` holding a whole,
  parseable ``msg`` whose id is in no state) is never removed: it is put into the state it
  was created for, que or prep (I6). After a power cut on a filesystem whose renames are not
  atomic on disk (ext4 without a journal), e2fsck may have kept only the ``.tmp`` entry of a
  message that was acknowledged; and a producer killed between its fsync and its rename
  leaves one that was not. Either way the message comes back (at-least-once).
* **lost+found**: e2fsck moves a directory it finds no entry for into ``lost+found`` as
  ``#<inode>``. A message directory there is put back into its queue (I10).

Every rename here goes through :mod:`spoolq.durable` like any other state change.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ... import durable
from ...errors import SpoolqError
from ...ids import QUEUE_NAME_RE, validate_msg_id
from ...model import COMPACT_JSON, Message, State
from ..base import SweepResult
from .debris import is_debris, remove_partial
from .layout import iter_entries, message_path
from .search import read_whole

if TYPE_CHECKING:
    from .store import FsStore

log = logging.getLogger("spoolq.store")

BUCKET_IDLE = 60.0
"""Seconds an empty bucket must have been left alone before sweep removes it."""


def sweep_queue(store: FsStore, queue: str, older_than: float) -> SweepResult:
    """I6 for one queue: recover complete staged messages of dead producers, remove the rest
    of their debris, half-written attachments of prep messages, and empty old buckets."""
    qdir = store._existing_qdir(queue)
    res = SweepResult()
    now = time.time()
    tmp = qdir / ".tmp"
    for n in _names(tmp):
        p = tmp / n
        if n.startswith("deleted."):  # a delete that was cut short: finish it
            shutil.rmtree(p, ignore_errors=True)
            res.removed.append(str(p))
        elif is_debris(p, n.split(".", 1)[0], older_than, now):
            # A staging directory is one message (it holds msg) or a send_many batch (its
            # subdirectories do). Whatever is complete goes into its state; the rest is debris.
            for m in _messages_in(p, depth=1):
                if not _put_back(store, queue, m, "recovered from .tmp", res):
                    _set_aside_copy(store, queue, m, ".tmp", res)
            shutil.rmtree(p, ignore_errors=True)  # what is left is incomplete: never acknowledged
            res.removed.append(str(p))
    # Half-written attachments of messages still in prep, left by a writer that died.
    for _, path, _ in iter_entries(qdir, State.PREP):
        res.removed += remove_partial(path / "attach", older_than)
    # Only the three bucket levels are pruned, never anything inside a message.
    for st in State:
        sdir = qdir / str(st)
        for day in _digits(sdir):
            for hm in _digits(sdir / day):
                for ss in _digits(sdir / day / hm):
                    if _rmdir_if_stale(sdir / day / hm / ss, now):
                        res.removed.append(str(sdir / day / hm / ss))
                _rmdir_if_stale(sdir / day / hm, now)
            _rmdir_if_stale(sdir / day, now)
    return res


def sweep_root(store: FsStore, older_than: float) -> list[str]:
    """Remove ``queue/.new.<name>.<pid>.<rand>``: queues whose creator died before its
    rename (I1), once that process is gone, or older than ``older_than`` seconds."""
    removed: list[str] = []
    now = time.time()
    for n in _names(store.qroot):
        if not n.startswith(".new."):
            continue
        p = store.qroot / n
        parts = n.split(".")  # "", "new", name, pid, rand
        if is_debris(p, parts[3] if len(parts) == 5 else "", older_than, now):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def lost_found_of(root: Path) -> Path:
    """``lost+found`` at the top of the filesystem that holds ``root`` (found by walking up
    while the device stays the same; it need not exist)."""
    top = root
    dev = os.stat(root).st_dev
    while top.parent != top and os.stat(top.parent).st_dev == dev:
        top = top.parent
    return top / "lost+found"


def recover_lost_found(store: FsStore, lost_found: Path) -> SweepResult:
    """I10: put message directories that e2fsck reconnected to ``lost_found`` back.

    A candidate is a directory (not a symlink) holding a parseable ``msg``, found at the top
    of an entry or up to four levels below it (a ``send_many`` batch, or a bucket or state
    directory that lost its own entry, whose messages keep their names). Its queue is the one recorded at
    creation (``msg``'s first history entry), or for older messages the queue its ``dest``
    names; it must exist in this root, and the id must be in none of its states. It goes to
    the state its ``history`` names last (the move that was cut short, or the one before),
    except that run becomes que (only the daemon puts messages in run). Anything else is
    left where it is and reported in ``problems``.
    """
    res = SweepResult()
    for n in _names(lost_found):
        p = lost_found / n
        try:
            if not stat.S_ISDIR(p.lstat().st_mode):
                continue
        except OSError:
            continue
        found = list(_messages_in(p, depth=4, problems=res.problems))
        for m in found:
            queue = _queue_of(store, m.message)
            if queue is None:
                res.problems.append(f"{m.path}: message {m.message.msg_id} of a queue not in this root "
                                    f"(dest {m.message.dest!r}); left in place")
            elif not _put_back(store, queue, m, "recovered from lost+found", res, by_history=True):
                _set_aside_copy(store, queue, m, "lost+found", res)
        if found and p.exists():
            _remove_empty_dirs(p)  # the batch or bucket directories the messages were in
    return res


class _Staged:
    """A complete message directory found outside the state tree."""

    def __init__(self, path: Path, message: Message) -> None:
        self.path = path
        self.message = message


def _messages_in(p: Path, depth: int, problems: list[str] | None = None) -> Iterator[_Staged]:
    """The complete messages at or below directory ``p``: ``p`` itself if it holds ``msg``,
    else those in its subdirectories, at most ``depth`` levels down (symlinks are not
    followed). An unreadable ``msg`` is not a message (reported in ``problems``)."""
    if os.path.lexists(p / "msg"):
        try:
            m = Message.from_dict(json.loads(read_whole(p / "msg")))  # a FIFO there hangs no start
            validate_msg_id(m.msg_id)
        except (OSError, ValueError, RecursionError, SpoolqError) as e:
            if problems is not None:
                problems.append(f"{p}: msg unreadable ({e}); left in place")
            return
        yield _Staged(p, m)
    elif depth > 0:
        for n in sorted(_names(p)):
            try:
                if stat.S_ISDIR((p / n).lstat().st_mode):
                    yield from _messages_in(p / n, depth - 1, problems)
            except OSError:
                continue


def _remove_empty_dirs(p: Path) -> None:
    """rmdir ``p`` and the empty directories below it (ENOTEMPTY keeps anything else)."""
    for n in _names(p):
        if (p / n).is_dir() and not (p / n).is_symlink():
            _remove_empty_dirs(p / n)
    try:
        p.rmdir()
    except OSError:
        pass


def _queue_of(store: FsStore, m: Message) -> str | None:
    """The queue a message was created in: recorded in its creation event (since 2026-12),
    else derived from ``dest`` (``name``, ``/q/name/`` or a full URL); None if not here."""
    names: list[str] = []
    if m.history and isinstance(m.history[0].get("queue"), str):
        names.append(m.history[0]["queue"])
    dest = "/" + m.dest.strip().strip("/")
    names.append(dest.rsplit("/q/", 1)[1] if "/q/" in dest else dest[1:])
    for n in names:
        if QUEUE_NAME_RE.match(n) and (store.qroot / n / "config.json").is_file():
            return n
    return None


def _last_state(m: _Staged) -> State:
    """The state a recovered message goes to: the last one its history names (run: que)."""
    last = str(m.message.history[0].get("state", "que")) if m.message.history else "que"
    try:
        for line in read_whole(m.path / "history").splitlines():
            try:
                h = json.loads(line)
            except ValueError:
                continue  # torn by the crash
            if isinstance(h, dict) and isinstance(h.get("state"), str):
                last = h["state"]
    except OSError:
        pass
    try:
        st = State(last)
    except ValueError:
        return State.QUE
    return State.QUE if st == State.RUN else st


def _put_back(store: FsStore, queue: str, m: _Staged, note: str, res: SweepResult, *,
              by_history: bool = False) -> bool:
    """Rename the complete message ``m`` into its state in ``queue``. False if its id is
    already in a state (``m`` is then a stale copy, for the caller to remove or report);
    a failure to move it is reported in ``res.problems``."""
    msg_id = m.message.msg_id
    qdir = store.qdir(queue)
    if _anywhere(qdir, msg_id):
        return False
    if by_history:
        st = _last_state(m)
    else:
        created = str(m.message.history[0].get("state", "")) if m.message.history else ""
        st = State.PREP if created == State.PREP.value else State.QUE
    remove_partial(m.path / "attach")  # debris of an attach cut short (prep only)
    entry = {"state": str(st), "at": time.time(), "note": note}
    try:
        # Advisory, like every history line; a link left as history is not followed.
        hfd = durable.open_own(str(m.path / "history"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            durable.write_all(hfd, COMPACT_JSON.encode(entry).encode() + b"\n")
        finally:
            os.close(hfd)
        store._publish(m.path, message_path(qdir, st, msg_id), store.queue_config(queue).fsync)
    except (OSError, SpoolqError) as e:
        if m.path.exists():  # else another sweep put it back meanwhile
            res.problems.append(f"{m.path}: cannot put message {msg_id} back into {queue}/{st}: {e}")
        return True
    store._counts(qdir).add({str(st): 1})
    log.info("%s/%s: %s into %s", queue, msg_id, note, st)
    res.recovered.append(f"{queue}/{msg_id} -> {st} ({note})")
    return True


def _set_aside_copy(store: FsStore, queue: str, m: _Staged, where: str, res: SweepResult) -> None:
    """A second directory for a message that is stored already. After a power cut on ext4
    without a journal, e2fsck gives a directory inode that was freed on disk too late the
    blocks it shares with a new one, so a copy of another message (sharing its files) can
    appear. The stored one is the message; the copy goes to ``corrupt/``, never deleted:
    removing it could take files with it that e2fsck left linked only there."""
    qdir = store.qdir(queue)
    why = f"a second directory for {m.message.msg_id}, which is stored already, found in {where}"
    if store._move_to_corrupt(qdir, m.path, f"{where}.{m.message.msg_id}", why):
        res.problems.append(f"{m.path}: {why}; set aside in {qdir / 'corrupt'}")
    else:
        res.problems.append(f"{m.path}: {why}; left in place")


def _anywhere(qdir: Path, msg_id: str) -> bool:
    return any(os.path.lexists(message_path(qdir, st, msg_id)) for st in State) or \
        os.path.lexists(message_path(qdir, State.ERR, msg_id, acked=True))


def _names(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _digits(path: Path) -> list[str]:
    return [n for n in _names(path) if n.isdigit()]


def _rmdir_if_stale(path: Path, now: float) -> bool:
    """Remove an empty bucket not touched for a minute (ENOTEMPTY keeps a busy one)."""
    try:
        if now - path.stat().st_mtime < BUCKET_IDLE:
            return False
        path.rmdir()
        return True
    except OSError:
        return False
