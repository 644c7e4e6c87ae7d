"""isq's spool files as a producer (seed 000; spec B): ``spoolq serve --isq-spool DIR``.

Each line appended to ``DIR/<queue>.queue`` (by ``echo line >> q.queue``, isq's ``put``,
``spoolq isq put``) becomes one message of the spoolq queue ``<queue>``, param1 = the line,
src = ``isq`` (docs/isq.md). The file stays the queue isq users know: lines are taken only
as the queue has room (at most ``window`` messages waiting in ``que``), so ``wc -l`` still
shows what waits, and a torn last line (no newline yet) waits for its newline.

A line leaves the file only after it is durably a message (isq removed it first: at most
once; here at least once, and exactly once through a crash at any instant):

1. under the file's lock (isq's ``<queue>.queue.lock``), read the complete lines;
2. store them as **prep** messages (one group commit);
3. write a journal ``<home>/isq/<queue>.json`` (fsync'd): the file's device and inode,
   how many bytes were taken, their sha256, the prep ids;
4. commit the preps (they can run from here on);
5. cut the taken bytes off: the rest is written to a new file that replaces the old one by
   a rename (fsync'd), with the old file's mode (and owner, where this user may set it);
6. drop the journal, release the lock.

A crash before 3 leaves preps nobody commits (the cleaner removes old preps) and the lines
in the file: they are taken again. A journal that exists is finished before anything new
is taken from its file (at start, or after a cut that failed): its preps committed (again:
committing is idempotent), and the cut made if the file is still the same inode and still
starts with the taken bytes; while it cannot be finished, nothing more is taken. Bytes a
writer without the lock appends while a cut is made are carried over to the new file
(checked once more just after the rename); a writer that keeps the file open across a cut
and writes after it loses those lines, so long-lived writers must take the lock; and a
crash in the instant between the rename and that second check loses what a writer without
the lock appended in it (docs/isq.md).

Lines that cannot be messages (not UTF-8, a NUL, longer than :data:`MAX_LINE`) are moved
to ``<home>/isq/<queue>.rejected``, never dropped. The spool is often world-writable:
nothing here follows a symbolic link or opens anything but a regular file with one link
(``O_NONBLOCK``, then ``fstat``: a FIFO planted there cannot block the thread), and the
journals and rejected lines live in the daemon's home. The file is read a piece at a time,
never whole. The daemon's own lock and cut are events too: a file is looked at again only
when it differs from how the last take left it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import secrets
import select
import stat
from pathlib import Path
from typing import Any

from .. import durable, isq
from .. import inotify as ino
from ..client import Client
from ..errors import InvalidMessage, MessageNotFound, QueueDown, QueueNotFound, WrongState
from ..events import EventBus
from ..model import Message, State
from .watchthread import WatchThread

log = logging.getLogger("spoolq.isq")

SRC = "isq"
MAX_LINE = 64 * 1024
"""A longer line is rejected (moved to ``<home>/isq/<queue>.rejected``), as the line intake's limit."""
SAFETY_POLL = 5.0
"""Seconds between looks at files that wait (a lock held, a full window) when no event came."""
_MASK = (ino.IN_MODIFY | ino.IN_CLOSE_WRITE | ino.IN_MOVED_TO | ino.IN_CREATE | ino.IN_DELETE
         | ino.IN_MOVED_FROM)
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def window(num_workers: int) -> int:
    """Messages of a queue allowed to wait in ``que`` before more lines are taken."""
    return max(16, 4 * num_workers)  # num_workers is at most 128: 512 at most


class IsqSpool(WatchThread):
    """The spool directory's watcher and taker, on its own thread."""

    name = "isq spool"
    thread_name = "spoolq-isq"

    def __init__(self, spool: Path, home: Path, *, client: Client, bus: EventBus | None = None) -> None:
        self.spool = Path(spool)
        self.journals = Path(home) / "isq"
        self.client = client
        super().__init__(bus)
        self._dirty: set[str] = set()
        self._waiting: set[str] = set()  # files with lines left that wait for room, a queue, a retry
        self._lock_wait: set[str] = set()  # files whose lock another process holds
        self._left: dict[str, tuple[int, int]] = {}  # (inode, size) each file was left in
        self._warned: set[tuple[str, str]] = set()

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        self.journals.mkdir(mode=0o700, exist_ok=True)
        self._open_watch().add(self.spool, _MASK | ino.IN_ONLYDIR)
        self._sweep_debris()
        for j in sorted(self.journals.glob("*.json")):
            self._dirty.add(j.stem)  # a take a crash interrupted: finished first (take)
        for name in os.listdir(self.spool):
            q = isq.queue_of(name)
            if q is not None:
                self._dirty.add(q)
        self._start_thread(self._run)
        log.info("isq spool %s: taking lines of <queue>.queue files", self.spool)

    def _run(self) -> None:
        assert self._ino is not None
        while not self._stop.is_set():
            for q in sorted(self._dirty):
                self._dirty.discard(q)
                self._lock_wait.discard(q)
                try:
                    waits = self.take(q)
                except Exception as e:  # noqa: BLE001 - one file must never stop the others
                    self._warn(q, f"error {e}", "isq spool: %s.queue: %s; trying again every %g s", q, e,
                               SAFETY_POLL)
                    waits = True
                (self._waiting.add if waits else self._waiting.discard)(q)
            timeout = SAFETY_POLL if self._waiting else None
            ready, _, _ = select.select([self._ino.fd, self._wake_r], [], [], timeout)
            if not ready:
                self._dirty |= self._waiting
            if self._wake_r in ready:
                for ev in self._woken():
                    eq = ev.get("queue")
                    # a message started (room in que), a queue made or resumed
                    if eq in self._waiting and (ev.get("event") != "state" or ev.get("state") == "run"):
                        self._dirty.add(eq)
            if self._ino.fd in ready:
                self._events(self._ino.read())

    def _events(self, events: list[ino.Event]) -> None:
        """Mark the files others changed. The daemon's own lock and cut are events too, and
        must not start another take: a file is looked at again only when its inode or size
        differs from how the last take left it, a lock's removal only by whoever waits for it."""
        for e in events:
            if e.mask & ino.IN_Q_OVERFLOW:
                self._dirty |= {oq for n in os.listdir(self.spool) if (oq := isq.queue_of(n))}
                continue
            if e.name.endswith(isq.LOCK_SUFFIX):
                lq = isq.queue_of(e.name[: -len(".lock")])
                if lq in self._lock_wait and e.mask & (ino.IN_DELETE | ino.IN_MOVED_FROM):
                    self._dirty.add(lq)
                continue
            fq = isq.queue_of(e.name)
            if fq is None:
                continue
            try:
                st = os.lstat(self.spool / e.name)
                now = (st.st_ino, st.st_size)
            except OSError:
                now = (0, 0)
            if self._left.get(fq) != now:
                self._dirty.add(fq)

    # -- taking ---------------------------------------------------------------------------
    def take(self, queue: str) -> bool:
        """Finish a take a crash interrupted, then take what room allows of ``queue``'s file;
        True if lines were left waiting."""
        journal = self.journals / f"{queue}.json"
        pending = journal.exists()
        store = self.client.store
        try:
            cfg = store.queue_config(queue)
            queued = self.client.counts(queue).get("que", 0)
        except QueueNotFound:
            if pending:
                cfg, queued = None, 0  # its preps went with the queue: the cut is what is left
            else:
                self._warn(queue, "noqueue", "isq spool: %s.queue waits: no queue %s (spoolq isq get %s CMD)",
                           queue, queue, queue)
                return True
        room = window(cfg.num_workers) - queued if cfg is not None else 0
        if room <= 0 and not pending:
            return True
        lk = isq.lock_file(self.spool, queue)
        if not isq.try_lock(lk):
            self._lock_wait.add(queue)
            return True  # its removal is an event
        try:
            if pending:
                self._finish(queue, journal)
            return self._take_locked(queue, room) if room > 0 else True
        finally:
            isq.unlock(lk)

    def _open(self, queue: str) -> tuple[int, os.stat_result] | None:
        """The queue's file, open for reading, if it is a regular file with one link (never
        a link, a FIFO or a device: O_NONBLOCK, then fstat)."""
        path = isq.queue_file(self.spool, queue)
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                self._warn(queue, "link", "isq spool: %s is a symbolic link: left alone", path)
                return None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            self._warn(queue, "odd", "isq spool: %s is not a regular file with one link: left alone", path)
            return None
        return fd, st

    def _take_locked(self, queue: str, room: int) -> bool:
        opened = self._open(queue)
        if opened is None:
            self._left.pop(queue, None)
            return False
        fd, st = opened
        try:
            self._left[queue] = (st.st_ino, st.st_size)
            taken, lines = _complete_lines(fd, room)
            if not taken:
                return False
            if not self._cuttable(st):
                self._warn(queue, "sticky", "isq spool: %s.queue belongs to uid %d in a sticky directory: "
                           "this user cannot replace it, so its lines are left alone", queue, st.st_uid)
                return True
            good, bad = _messages(lines)
            ids: list[str] = []
            if good:
                try:
                    made = self.client.store.create_many(queue, good, state=State.PREP)
                except QueueDown:
                    self._warn(queue, "down", "isq spool: %s.queue waits: queue %s is DOWN", queue, queue)
                    return True
                ids = [m.msg_id for m in made]
            journal = {"dev": st.st_dev, "inode": st.st_ino, "length": taken, "sha256": _sha256(fd, taken),
                       "ids": ids, "rejected": [base64.b64encode(b).decode() for b in bad]}
            jpath = self.journals / f"{queue}.json"
            durable.write_replace(jpath, json.dumps(journal).encode())
            self._finish(queue, jpath, journal, (fd, st))
            self._warned.discard((queue, "down"))
            log.debug("isq spool: %s.queue: %d line(s) taken", queue, len(lines))
            return len(lines) >= room  # perhaps more: looked at again when there is room
        finally:
            os.close(fd)

    def _finish(self, queue: str, jpath: Path, journal: dict[str, Any] | None = None,
                opened: tuple[int, os.stat_result] | None = None) -> None:
        """Steps 4-6 of a take (module docstring), from its journal: commit the preps, keep
        the rejected lines, cut the taken bytes if the file still starts with them, drop the
        journal. Raises (the journal stays, the next take tries again) if any step fails."""
        recovering = journal is None
        if journal is None:
            journal = json.loads(jpath.read_bytes())
        ids = [str(i) for i in journal["ids"]]
        try:
            self._commit(queue, ids)
        except QueueNotFound:
            pass
        bad = [base64.b64decode(b) for b in journal.get("rejected", [])]
        if bad:
            self._reject(queue, bad)  # again after a crash between this and the cut: at least once
        own = opened is None
        if own:
            opened = self._open(queue)
        if opened is not None:
            fd, st = opened
            try:
                st = os.fstat(fd)  # its size now: lines may have come since it was opened
                if ((st.st_dev, st.st_ino) == (int(journal["dev"]), int(journal["inode"]))
                        and st.st_size >= int(journal["length"])
                        and _sha256(fd, int(journal["length"])) == journal["sha256"]):
                    self._left[queue] = self._cut(isq.queue_file(self.spool, queue), fd, st, int(journal["length"]))
            finally:
                if own:
                    os.close(fd)
        os.unlink(jpath)
        if recovering:
            log.warning("isq spool: finished %s.queue's take of %d line(s) that a crash interrupted",
                        queue, len(ids) + len(bad))

    def _commit(self, queue: str, ids: list[str]) -> None:
        with self.client.store.durable_batch():
            for msg_id in ids:
                try:
                    self.client.store.commit(queue, msg_id)
                except (WrongState, MessageNotFound):
                    pass  # committed before a crash, and maybe run since

    def _cuttable(self, st: os.stat_result) -> bool:
        """Can this user rename over the file? Not in a sticky directory (an a+w spool with
        +t) where neither the file nor the directory is ours, unless we are root. Checked
        before anything is stored: a cut that always fails would take the lines again and
        again."""
        me = os.geteuid()
        if me == 0 or st.st_uid == me:
            return True
        d = os.stat(self.spool)
        return not (d.st_mode & stat.S_ISVTX) or d.st_uid == me

    def _cut(self, path: Path, fd: int, st: os.stat_result, taken: int) -> tuple[int, int]:
        """Replace the file by what follows its first ``taken`` bytes, read from ``fd`` (the
        old file) up to its end now, then what reached it during the rename. Returns the new
        file's (inode, size)."""
        tmp = path.with_name(f".{path.name}.spoolq-{secrets.token_hex(4)}")
        tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                mode = stat.S_IMODE(st.st_mode)
                if st.st_uid != os.geteuid():
                    try:
                        os.fchown(tfd, st.st_uid, st.st_gid)
                    except PermissionError:
                        mode |= 0o066  # its owner could write it; so can they now (docs/isq.md)
                os.fchmod(tfd, mode)
                copied = _copy(fd, taken, tfd)
                os.fsync(tfd)
                nst = os.fstat(tfd)
            finally:
                os.close(tfd)
            durable.rename(tmp, path)  # and the directory fsync'd
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        late = _read_from(fd, taken + copied)  # appended to the old file while it was replaced
        if late:
            afd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                durable.write_all(afd, late)
                os.fsync(afd)
                nst = os.fstat(afd)
            finally:
                os.close(afd)
        return nst.st_ino, nst.st_size

    def _reject(self, queue: str, bad: list[bytes]) -> None:
        path = self.journals / f"{queue}.rejected"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            durable.write_all(fd, b"".join(line + b"\n" for line in bad))
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("isq spool: %d line(s) of %s.queue cannot be messages (not UTF-8, a NUL, over %d "
                    "bytes): moved to %s", len(bad), queue, MAX_LINE, path)

    # -- start-up ---------------------------------------------------------------------------
    def _sweep_debris(self) -> None:
        """Temporary files of cuts a crash left (only ours: their names and owner say so)."""
        for name in os.listdir(self.spool):
            if name.startswith(".") and ".queue.spoolq-" in name:
                try:
                    p = self.spool / name
                    if os.lstat(p).st_uid == os.geteuid():
                        os.unlink(p)
                except OSError:
                    pass

    def _warn(self, queue: str, kind: str, fmt: str, *args: object) -> None:
        if (queue, kind) not in self._warned:
            self._warned.add((queue, kind))
            log.warning(fmt, *args)


def _read_from(fd: int, offset: int) -> bytes:
    chunks = []
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _copy(src: int, offset: int, dst: int) -> int:
    """Copy ``src`` from ``offset`` to its end into ``dst``; the number of bytes."""
    n = 0
    while chunk := os.pread(src, 1 << 20, offset + n):
        durable.write_all(dst, chunk)
        n += len(chunk)
    return n


def _sha256(fd: int, length: int) -> str:
    h = hashlib.sha256()
    off = 0
    while off < length:
        chunk = os.pread(fd, min(1 << 20, length - off), off)
        if not chunk:
            break
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest()


def _complete_lines(fd: int, room: int) -> tuple[int, list[bytes]]:
    """(bytes taken, the lines): at most ``room`` complete lines from the start of ``fd``,
    read a piece at a time (never the whole file). Empty lines are taken and dropped without
    counting. A line longer than :data:`MAX_LINE` is taken as its first MAX_LINE + 1 bytes
    (rejected: too long) once its newline has come."""
    taken, buf, pos, skipping, head = 0, b"", 0, False, b""
    lines: list[bytes] = []
    while len(lines) < room:
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_LINE:  # a giant line: keep its head, look for its end
                if not skipping:
                    head = buf[: MAX_LINE + 1]
                    skipping = True
                buf = b""
            chunk = os.pread(fd, 1 << 16, pos)
            if not chunk:
                break
            buf += chunk
            pos += len(chunk)
            continue
        line, buf = buf[:nl], buf[nl + 1:]
        taken = pos - len(buf)
        if skipping:
            lines.append(head)
            skipping = False
            continue
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            lines.append(line)
    return taken, lines


def _messages(lines: list[bytes]) -> tuple[list[Message], list[bytes]]:
    good: list[Message] = []
    bad: list[bytes] = []
    for raw in lines:
        if len(raw) > MAX_LINE:
            bad.append(raw)
            continue
        try:
            good.append(Message.from_dict({"param1": raw.decode("utf-8"), "src": SRC}))
        except (UnicodeDecodeError, InvalidMessage):
            bad.append(raw)
    return good, bad
