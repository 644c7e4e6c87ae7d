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
in the file: they are taken again. At start each journal is finished: its preps committed
(again: committing is idempotent), and the cut made if the file is still the same inode
and still starts with the taken bytes. Bytes a writer without the lock appends while a cut
is made are carried over to the new file (checked once more just after the rename); a
writer that keeps the file open across a cut and writes after it loses those lines, so
long-lived writers must take the lock (docs/isq.md).

Lines that cannot be messages (not UTF-8, a NUL, longer than :data:`MAX_LINE`) are moved
to ``<queue>.queue.rejected`` beside the file, never dropped. The spool is often
world-writable: nothing here follows a symbolic link, and a ``.queue`` that is not a
regular file with one link is left alone (logged once).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import select
import stat
import threading
from pathlib import Path
from typing import Any

from .. import durable, isq
from .. import inotify as ino
from ..client import Client
from ..errors import InvalidMessage, MessageNotFound, QueueDown, QueueNotFound, SpoolqError, WrongState
from ..events import EventBus
from ..model import Message, State

log = logging.getLogger("spoolq.isq")

SRC = "isq"
MAX_LINE = 64 * 1024
"""A longer line is rejected (moved to ``<queue>.queue.rejected``), as the line intake's limit."""
MAX_TAKE = 1000
"""Lines taken in one batch at most, whatever the window."""
SAFETY_POLL = 5.0
"""Seconds between looks at files that wait (a lock held, a full window) when no event came."""
_MASK = (ino.IN_MODIFY | ino.IN_CLOSE_WRITE | ino.IN_MOVED_TO | ino.IN_CREATE | ino.IN_DELETE
         | ino.IN_MOVED_FROM)
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def window(num_workers: int) -> int:
    """Messages of a queue allowed to wait in ``que`` before more lines are taken."""
    return min(MAX_TAKE, max(16, 4 * num_workers))


class IsqSpool:
    """The spool directory's watcher and taker, on its own thread."""

    name = "isq spool"

    def __init__(self, spool: Path, home: Path, *, client: Client, bus: EventBus | None = None) -> None:
        self.spool = Path(spool)
        self.journals = Path(home) / "isq"
        self.client = client
        self.bus = bus
        self._dirty: set[str] = set()
        self._waiting: set[str] = set()  # files with lines left that wait for room or the lock
        self._warned: set[tuple[str, str]] = set()
        self._ino: ino.Inotify | None = None
        self._sub: Any = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        self.journals.mkdir(mode=0o700, exist_ok=True)
        self._ino = ino.Inotify()
        self._ino.add(self.spool, _MASK | ino.IN_ONLYDIR)
        if self.bus is not None:
            self._sub = self.bus.subscribe(maxlen=1000, wake=self._wake)
        self._sweep_debris()
        self._recover()
        for name in os.listdir(self.spool):
            q = isq.queue_of(name)
            if q is not None:
                self._dirty.add(q)
        self._thread = threading.Thread(target=self._run, name="spoolq-isq", daemon=True)
        self._thread.start()
        log.info("isq spool %s: taking lines of <queue>.queue files", self.spool)

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(30)
        if self._sub is not None:
            self._sub.close()
        if self._ino is not None:
            self._ino.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass  # full: a wake-up is pending already

    def _run(self) -> None:
        assert self._ino is not None
        while not self._stop.is_set():
            if self._dirty:
                for q in sorted(self._dirty):
                    self._dirty.discard(q)
                    try:
                        if self.take(q):
                            self._waiting.add(q)
                        else:
                            self._waiting.discard(q)
                    except Exception:  # noqa: BLE001 - one file must never stop the others
                        log.exception("isq spool: %s.queue", q)
                        self._waiting.add(q)
            timeout = SAFETY_POLL if self._waiting else None
            ready, _, _ = select.select([self._ino.fd, self._wake_r], [], [], timeout)
            if not ready:
                self._dirty |= self._waiting
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                if self._sub is not None:
                    for ev in self._sub.drain():
                        eq = ev.get("queue")
                        # a message started (room in que), a queue made or resumed
                        if eq in self._waiting and (ev.get("event") != "state" or ev.get("state") == "run"):
                            self._dirty.add(eq)
            if self._ino.fd in ready:
                for e in self._ino.read():
                    if e.mask & ino.IN_Q_OVERFLOW:
                        self._dirty |= {oq for n in os.listdir(self.spool) if (oq := isq.queue_of(n))}
                        continue
                    name = e.name[: -len(".lock")] if e.name.endswith(isq.LOCK_SUFFIX) else e.name
                    fq = isq.queue_of(name)
                    if fq is not None:
                        self._dirty.add(fq)

    # -- taking ---------------------------------------------------------------------------
    def take(self, queue: str) -> bool:
        """Take what room allows of ``queue``'s file; True if lines were left waiting."""
        store = self.client.store
        try:
            cfg = store.queue_config(queue)
            queued = self.client.counts(queue).get("que", 0)
        except QueueNotFound:
            self._warn(queue, "noqueue", "isq spool: %s.queue waits: no queue %s (spoolq isq get %s CMD)",
                       queue, queue, queue)
            return True
        room = window(cfg.num_workers) - queued
        if room <= 0:
            return True
        lk = isq.lock_file(self.spool, queue)
        if not isq.try_lock(lk):
            return True  # its removal is an event
        try:
            return self._take_locked(queue, room)
        finally:
            isq.unlock(lk)

    def _take_locked(self, queue: str, room: int) -> bool:
        path = isq.queue_file(self.spool, queue)
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:
                self._warn(queue, "link", "isq spool: %s is a symbolic link: left alone", path)
                return False
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                self._warn(queue, "odd", "isq spool: %s is not a regular file with one link: left alone", path)
                return False
            data = _read_all(fd, 0)
            taken, lines = _complete_lines(data, room)
            if not taken:
                return False
            good, bad = _messages(lines)
            if bad:
                self._reject(queue, bad)
            ids: list[str] = []
            if good:
                try:
                    made = self.client.store.create_many(queue, good, state=State.PREP)
                except QueueDown:
                    self._warn(queue, "down", "isq spool: %s.queue waits: queue %s is DOWN", queue, queue)
                    return True
                ids = [m.msg_id for m in made]
            journal = {"dev": st.st_dev, "inode": st.st_ino, "length": taken,
                       "sha256": hashlib.sha256(data[:taken]).hexdigest(), "ids": ids}
            jpath = self.journals / f"{queue}.json"
            durable.write_replace(jpath, json.dumps(journal).encode())
            self._commit(queue, ids)
            self._cut(path, fd, st, data, taken)
            os.unlink(jpath)
            self._warned.discard((queue, "down"))
            log.debug("isq spool: %s.queue: %d line(s) taken", queue, len(lines))
            return data.count(b"\n") > len(lines)
        finally:
            os.close(fd)

    def _commit(self, queue: str, ids: list[str]) -> None:
        with self.client.store.durable_batch():
            for msg_id in ids:
                try:
                    self.client.store.commit(queue, msg_id)
                except (WrongState, MessageNotFound):
                    pass  # committed before a crash, and maybe run since

    def _cut(self, path: Path, fd: int, st: os.stat_result, data: bytes, taken: int) -> None:
        """Replace the file by what follows the first ``taken`` bytes of ``data``, plus what
        was appended to it since ``data`` was read (``fd`` is the old file)."""
        extra = _read_all(fd, len(data))
        rest = data[taken:] + extra
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
                os.write(tfd, rest)
                os.fsync(tfd)
            finally:
                os.close(tfd)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        durable.fsync_dir(path.parent)
        late = _read_all(fd, len(data) + len(extra))  # appended to the old file while it was being replaced
        if late:
            afd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(afd, late)
                os.fsync(afd)
            finally:
                os.close(afd)

    def _reject(self, queue: str, bad: list[bytes]) -> None:
        path = self.spool / f"{queue}.queue.rejected"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(line + b"\n" for line in bad))
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("isq spool: %d line(s) of %s.queue cannot be messages (not UTF-8, a NUL, over %d "
                    "bytes): moved to %s", len(bad), queue, MAX_LINE, path)

    # -- start-up ---------------------------------------------------------------------------
    def _recover(self) -> None:
        """Finish what a crash left between a journal and its removal."""
        for j in sorted(self.journals.glob("*.json")):
            queue = j.stem
            try:
                journal = json.loads(j.read_bytes())
                ids = [str(i) for i in journal["ids"]]
                dev, inode, length, digest = (int(journal["dev"]), int(journal["inode"]),
                                              int(journal["length"]), str(journal["sha256"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("isq spool: journal %s unreadable (%s): left for a person to look at", j, e)
                continue
            try:
                self._commit(queue, ids)
            except QueueNotFound:
                pass
            except SpoolqError as e:
                log.error("isq spool: journal %s: cannot commit its messages: %s; retried at the next start",
                          j, e)
                continue
            lk = isq.lock_file(self.spool, queue)
            isq.lock(lk, 60.0)
            try:
                path = isq.queue_file(self.spool, queue)
                try:
                    fd = os.open(path, _READ)
                except FileNotFoundError:
                    fd = -1
                if fd >= 0:
                    try:
                        st = os.fstat(fd)
                        data = _read_all(fd, 0)
                        if ((st.st_dev, st.st_ino) == (dev, inode) and len(data) >= length
                                and hashlib.sha256(data[:length]).hexdigest() == digest):
                            self._cut(path, fd, st, data, length)  # the crash came before the cut
                    finally:
                        os.close(fd)
            finally:
                isq.unlock(lk)
            os.unlink(j)
            log.warning("isq spool: finished %s.queue's take of %d line(s) that a crash interrupted",
                        queue, len(ids))

    def _sweep_debris(self) -> None:
        """Temporary files of cuts and locks a crash left (only ours: their names say so)."""
        for name in os.listdir(self.spool):
            if name.startswith(".") and (".queue.spoolq-" in name or name.startswith(f".lk{os.getpid()}.")):
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


def _read_all(fd: int, offset: int) -> bytes:
    chunks = []
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _complete_lines(data: bytes, room: int) -> tuple[int, list[bytes]]:
    """(bytes taken, the lines): at most ``room`` complete lines, each with its newline;
    empty lines are taken and dropped without counting."""
    taken, start = 0, 0
    lines: list[bytes] = []
    while len(lines) < room:
        nl = data.find(b"\n", start)
        if nl < 0:
            break
        line = data[start:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            lines.append(line)
        start = taken = nl + 1
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
