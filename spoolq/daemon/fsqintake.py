"""fsq queue directories served by the daemon (seed 003; spec A; docs/fsq.md): kind ``fsq``.

A spoolq queue of kind ``fsq`` names an fsq queue directory (``fsq_dir``, ``ROOT/QUEUE``).
Items that fsq's tools (or ``spoolq fsq enqueue``, or anything else) put in its ``queue/``
become messages of the spoolq queue, which its workers run in parallel with fsq-scan's
contract (jobs.py: ``PROG ARGS... ITEM-ARGS...``, the item on stdin, ``FSQ_ITEM_*``), and
the finished item is put back into ``done/`` or ``fail/`` under its id (finish.py).

Items are taken only as the queue has room (at most ``window`` messages waiting in
``que``, in batches of at least half of it), so ``ls queue/`` still shows the backlog, and
fsq's own ``scan`` may work the same directory at the same time: both take an item only
under its flock. A take:

1. flock each item (``LOCK_EX|LOCK_NB``: one another scanner holds is skipped), check the
   name still is that file, parse its name; an item that cannot run (not a regular file, a
   malformed name, older than ``fsq_ttl``) goes to ``fail/``, as fsq-scan does;
2. store them as **prep** messages, one group commit: the directory and id in
   ``params.fsq``, the first four arguments as param1-4, ``count`` = the item's tries;
3. move the items by rename from ``queue/`` into the hold directory ``.spoolq/`` beside it,
   each named by its message's id (fsq.Held: the daemon's own, 0700; fsync'd): no copy,
   and fsq's tools never look there;
4. commit the preps (from here they can run: the script's stdin is the held item);
5. release the flocks.

The outcome moves the held item into ``done/`` or ``fail/`` by one more rename (finish.py).

The hold directory is the take's journal: a crash before 3 leaves preps nobody commits
(the cleaner removes them) and the items in ``queue/``, taken again; a crash between 3
and 4 leaves held items of prep messages, which the start-up sweep commits. Until 3 the
items stay flock'd, so fsq's own scan skips them; after 3 fsq cannot see them.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import stat
import time
from pathlib import Path

from .. import fsq
from .. import inotify as ino
from ..client import Client
from ..errors import MessageNotFound, QueueDown, QueueNotFound, SpoolqError
from ..events import EventBus
from ..model import Message, QueueConfig, State
from .watchthread import WatchThread, drain

log = logging.getLogger("spoolq.fsq")

SRC = "fsq"
NEW_QUEUES = frozenset({"queue_change"})
SERVING = frozenset({"queue_change", "state", "admin"})
"""The daemon's events the intake hears: with no fsq queue to serve, only new queues."""
SAFETY_POLL = 5.0
"""Seconds between looks at queues that wait (items locked by another scanner, a full
window, the fsq queue down) and between reads of the queue list, when no event came."""
_MASK = ino.IN_CREATE | ino.IN_MOVED_TO | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_ONLYDIR


IDLE_AFTER = 1.0
"""Seconds after a take before idle workers count as idle (the daemon starts what was just
taken within milliseconds; idle past this, what waits in ``que`` waits out a backoff)."""
MAX_WINDOWS = 4
"""With workers idle, items are taken until this many windows wait in ``que`` (messages
waiting out a retry's backoff are in ``que`` too, and must not stop the intake)."""


def _not_a_message(item: fsq.WorkItem) -> str:
    """Why an item's name cannot be a message's fields, or ''."""
    try:
        item.id.encode()
    except UnicodeEncodeError:
        return "its name is not UTF-8"
    if any("\0" in a for a in item.arguments):
        return "an argument holds a NUL (%00)"
    if not item.tries < 2**31 - 1:
        return f"tries {item.tries} is out of range"
    return ""


def window(num_workers: int) -> int:
    """Messages of a queue allowed to wait in ``que`` before more items are taken."""
    return max(16, 4 * num_workers)


class Served:
    """One fsq queue directory and how it is watched."""

    def __init__(self, cfg: QueueConfig) -> None:
        self.fsq_dir = cfg.fsq_dir
        self.conf = fsq.Conf.from_env(root=os.path.dirname(cfg.fsq_dir))
        self.fsq_queue = os.path.basename(cfg.fsq_dir)
        self.paths = fsq.Paths(self.conf, self.fsq_queue)
        self.watches: list[int] = []
        # What is left of the last sorted listing of queue/, taken from the front: as fsq's
        # scan works a snapshot through, so a directory of N items is listed about once,
        # not once per take of a window (N^2 / window for a big backlog).
        self.snapshot: collections.deque[str] = collections.deque()
        self.resweep = False  # a take failed after its hold: sweep before the next
        self.last_take = 0.0  # time.monotonic() of the last take that stored items
        self.trigger_fd: int | None = None
        self.trigger_wfd: int | None = None  # our own writer: no EOF storm when fsq's hang up


class FsqIntake(WatchThread):
    """The fsq queues' watcher and taker, on its own thread."""

    name = "fsq intake"
    thread_name = "spoolq-fsq"

    def __init__(self, home: Path, *, client: Client, bus: EventBus | None = None) -> None:
        self.spool = Path(home)  # named in the error if it cannot start
        self.client = client
        super().__init__(bus)
        self.served: dict[str, Served] = {}
        self._by_wd: dict[int, set[str]] = {}  # two queues on one directory share its watches
        self._dirty: set[str] = set()
        self._waiting: set[str] = set()
        self._warned: set[tuple[str, str]] = set()
        self._refresh_due = 0.0

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        self._open_watch(NEW_QUEUES)
        self._start_thread(self._run)

    def _on_stop(self) -> None:
        for q in list(self.served):
            self._unserve(q)

    def _run(self) -> None:
        assert self._ino is not None
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= self._refresh_due:
                self._refresh_due = now + SAFETY_POLL
                try:
                    self._refresh()
                except Exception as e:  # noqa: BLE001 - EMFILE, say: the thread must outlive it
                    self._warn("", "refresh", "fsq: cannot look at the queues: %s; again in %g s", e,
                               SAFETY_POLL)
            for q in sorted(self._dirty):
                self._dirty.discard(q)
                try:
                    waits = self.take(q)
                except Exception as e:  # noqa: BLE001 - one queue must never stop the others
                    self._warn(q, "error", "fsq: %s: %s; trying again every %g s", q, e, SAFETY_POLL)
                    waits = True
                (self._waiting.add if waits else self._waiting.discard)(q)
            triggers = [s.trigger_fd for s in self.served.values() if s.trigger_fd is not None]
            ready, _, _ = select.select([self._ino.fd, self._wake_r, *triggers], [], [], SAFETY_POLL)
            if not ready:
                self._dirty |= self._waiting
            if self._wake_r in ready:
                for ev in self._woken():
                    eq = ev.get("queue")
                    if ev.get("event") == "queue_change":
                        self._refresh_due = 0.0
                    elif eq in self._waiting:  # a start, an end, an admin change: room, perhaps
                        self._dirty.add(eq)
            for q, s in self.served.items():
                if s.trigger_fd is not None and s.trigger_fd in ready:
                    drain(s.trigger_fd)  # fsq's trigger_pull: one NUL per enqueue -t
                    self._dirty.add(q)
            if self._ino.fd in ready:
                for ie in self._ino.read():
                    if ie.mask & ino.IN_Q_OVERFLOW:
                        self._dirty |= set(self.served)
                    else:
                        self._dirty |= self._by_wd.get(ie.wd, set())

    # -- which queues ---------------------------------------------------------------------
    def _refresh(self) -> None:
        """Serve every queue of kind fsq (and stop serving the others); a directory that is
        missing is looked for again at the next refresh."""
        store = self.client.store
        want: dict[str, QueueConfig] = {}
        try:
            for q in store.queues():
                try:
                    cfg = store.queue_config(q)
                except SpoolqError:
                    continue
                if cfg.kind == "fsq" and cfg.fsq_dir:
                    want[q] = cfg
        except SpoolqError as e:
            log.warning("fsq: cannot list the queues: %s", e)
            return
        for q in list(self.served):
            if q not in want or want[q].fsq_dir != self.served[q].fsq_dir:
                self._unserve(q)
        for q, cfg in want.items():
            if q in self.served and self.served[q].watches:
                s = self.served[q]
                self._dirty.add(q)  # the safety poll: a lock released by a dead scanner is no event
                self._open_trigger(s)  # a trigger-s made (again) since
                try:  # items of messages that ended without the daemon's finish (cancel, duplicates)
                    with fsq.Held(s.fsq_dir, q, s.conf) as held:
                        self._sweep(q, held)
                except OSError as e:
                    self._warn(q, "sweep", "fsq: %s: cannot look at its held items: %s", q, e)
                continue
            self._unserve(q)
            s = Served(cfg)
            self.served[q] = s
            try:
                self._watch(q, s)
            except OSError as e:
                self._warn(q, "nodir", "fsq: %s: cannot serve %s: %s (looked at again every %g s)", q,
                           s.fsq_dir, e.strerror or e, SAFETY_POLL)
                continue
            self._warned.discard((q, "nodir"))
            log.info("fsq: queue %s takes the items of %s", q, cfg.fsq_dir)
            self._dirty.add(q)
        # The daemon's events cost it a dict and a wake-up per message start and end: hear
        # them only while there is an fsq queue to serve; else only of queues made.
        self._listen(SERVING if self.served else NEW_QUEUES)

    def _watch(self, q: str, s: Served) -> None:
        assert self._ino is not None
        with fsq.Held(s.fsq_dir, q, s.conf, create=True) as held:  # the directories, the hold ours
            self._sweep(q, held)
        for path in (s.paths.sub("queue"), s.paths.base):  # items; and the down file, the trigger
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory (or a symbolic link)")
            wd = self._ino.add(Path(path), _MASK)
            s.watches.append(wd)
            self._by_wd.setdefault(wd, set()).add(q)
        self._open_trigger(s)

    def _open_trigger(self, s: Served) -> None:
        """Hold ``trigger-s`` open for reading (and writing, so its readers see no EOF), so
        fsq's ``enqueue -t`` finds a listener and wakes us; again if it was made anew."""
        trig = os.path.join(s.paths.base, s.conf.trigger)
        try:
            st = os.lstat(trig)
        except OSError:
            return
        if not stat.S_ISFIFO(st.st_mode):
            return
        if s.trigger_fd is not None:
            now = os.fstat(s.trigger_fd)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return
            for fd in (s.trigger_fd, s.trigger_wfd):
                if fd is not None:
                    os.close(fd)
            s.trigger_fd = s.trigger_wfd = None
        try:
            fd = os.open(trig, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            return
        try:
            # A reader alone would see EOF for ever once an enqueue -t hangs up: a storm.
            wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:  # fsq's mode 0640: readable by the group, not writable by it
            os.close(fd)
            self._warn(s.fsq_dir, "trigger", "fsq: cannot hold %s open for writing (%s): its enqueue -t "
                       "wakes nothing; items are looked for every %g s", trig, e.strerror or e, SAFETY_POLL)
            return
        s.trigger_fd, s.trigger_wfd = fd, wfd

    def _sweep(self, queue: str, held: fsq.Held) -> None:
        """Finish what the take and the finish could not: a held item's prep message is
        committed (a crash came between the hold and the commit); items held for messages
        that are finished (a crash kept the outcome's rename from standing, it is not
        fsync'd; or the message ended without the daemon: a cancel while queued, a coalesced
        duplicate) go where the outcome says; items of messages that are gone (deleted by
        hand, set aside unreadable) go to ``fail/`` under the message's id, never deleted.
        At each start of serving and every SAFETY_POLL: the hold holds the window and the
        running, so this is cheap."""
        store = self.client.store
        for msg_id in held.held():
            try:
                state = store.state_of(queue, msg_id)  # every SAFETY_POLL: the cheap look first
                if not (state == State.PREP or state.final):
                    continue  # waiting or running: the daemon's
                view = store.get(queue, msg_id)
            except MessageNotFound:
                held.to_fail(msg_id, msg_id)
                log.warning("fsq: %s/%s: message gone: its held item moved to fail/%s", queue, msg_id, msg_id)
                continue
            except (SpoolqError, ValueError):
                continue
            if view.state == State.PREP:  # held, then a crash before its commit
                store.commit(queue, msg_id)
                log.info("fsq: %s/%s: committed (its item was held when the daemon stopped)", queue, msg_id)
            elif view.state.final:
                which = "fail" if view.state == State.ERR else "done"
                try:
                    name, _ = fsq.outcome_names(view.message)
                except ValueError:
                    name = msg_id
                if held.release(msg_id, name, which):
                    log.info("fsq: %s/%s: its item moved into %s/ (its message ended without the daemon's "
                             "finish, or a crash undid the move)", queue, msg_id, which)

    def _unserve(self, q: str) -> None:
        s = self.served.pop(q, None)
        if s is None:
            return
        for wd in s.watches:
            users = self._by_wd.get(wd, set())
            users.discard(q)
            if users:
                continue  # another queue watches the same directory
            self._by_wd.pop(wd, None)
            if self._ino is not None:
                try:
                    self._ino.remove(wd)
                except OSError:
                    pass
        for fd in (s.trigger_fd, s.trigger_wfd):
            if fd is not None:
                os.close(fd)

    # -- taking ---------------------------------------------------------------------------
    def take(self, queue: str) -> bool:
        """Take what room allows of ``queue``'s fsq directory; True if items were left
        waiting (room, a lock, the queue down). Everything is done through one fsq.Held:
        directory fds opened without following links, fresh for each take."""
        s = self.served.get(queue)
        if s is None or not s.watches:
            return False
        store = self.client.store
        try:
            cfg = store.queue_config(queue)
            counts = self.client.counts(queue)
        except QueueNotFound:
            return False
        queued, running = counts.get("que", 0), counts.get("run", 0)
        w = window(cfg.num_workers)
        idle = running < cfg.num_workers and time.monotonic() - s.last_take > IDLE_AFTER
        if queued > w // 2 and (not idle or queued >= MAX_WINDOWS * w):
            # Take in batches: each take costs a few fsyncs whatever its size, so wait until
            # half the window has started (half of it still waits: the workers never starve).
            # Messages waiting out a retry's backoff are queued too: with workers idle a while
            # after the last take, take on, up to MAX_WINDOWS windows in que.
            return True
        room = min(w, MAX_WINDOWS * w - queued)
        if fsq.is_down(s.conf, s.fsq_queue):
            return True  # fsq's down: scans stop; its removal is an event
        try:
            held_dirs = fsq.Held(s.fsq_dir, queue, s.conf, create=True)
        except FileNotFoundError:
            self._unserve(queue)  # looked for again at the next refresh
            return False
        items: list[fsq.WorkItem] = []
        left = False
        relisted = False
        try:
            if s.resweep:
                self._sweep(queue, held_dirs)
                s.resweep = False
            while len(items) < room:
                if not s.snapshot:
                    if relisted:
                        break
                    s.snapshot.extend(sorted(os.listdir(held_dirs.fds["queue"])))
                    relisted = True
                    continue
                name = s.snapshot.popleft()
                item = fsq.take_at(held_dirs, name, ttl=cfg.fsq_ttl,
                                   rejected=lambda n, e: log.warning("fsq: %s: %s: moved to fail/: %s", queue, n, e))
                if item is None:
                    # gone (another scanner finished it), or locked: seen again at the next listing
                    left = left or held_dirs.in_queue(name)
                    continue
                items.append(item)
            left = left or bool(s.snapshot)
            if items and not self._store(queue, cfg, s, held_dirs, items):
                left = True  # the spoolq queue is DOWN: its "up" is an event
        finally:
            for item in items:
                item.close()
            held_dirs.close()
        return left

    def _store(self, queue: str, cfg: QueueConfig, s: Served, held: fsq.Held, items: list[fsq.WorkItem]) -> bool:
        """Steps 2-4 of a take (module docstring). False if the spoolq queue is DOWN."""
        good: list[tuple[fsq.WorkItem, Message]] = []
        for item in items:
            msg = Message(src=SRC, count=max(0, item.tries), max_count=cfg.max_count,
                          params={"fsq": {"dir": s.fsq_dir, "id": item.id}})
            for i, a in enumerate(item.arguments[:4]):
                setattr(msg, f"param{i + 1}", a)
            why = _not_a_message(item)
            if why:
                self._reject(queue, held, item, f"cannot be a message ({why})")
                continue
            good.append((item, msg))
        if not good:
            return True
        store = self.client.store
        try:
            made = store.create_many(queue, [m for _, m in good], state=State.PREP)
        except QueueDown:
            self._warn(queue, "down", "fsq: %s waits: the spoolq queue is DOWN", queue)
            return False
        taken = [(item, m.msg_id) for (item, _), m in zip(good, made, strict=True)]
        try:
            moved, problems = held.hold(taken)
        except BaseException:
            s.resweep = True  # some may be held: the next take commits those
            raise
        for p in problems:
            log.warning("fsq: %s: %s", queue, p)
        try:
            with store.durable_batch():
                for _, msg_id in taken:  # in order: a commit makes a message due (FIFO)
                    if msg_id in moved:
                        store.commit(queue, msg_id)
                    else:
                        store.delete(queue, msg_id)  # its item was not held: no message
        except BaseException:
            s.resweep = True  # held items of uncommitted preps: the next take commits them
            raise
        self._warned.discard((queue, "down"))
        s.last_take = time.monotonic()
        log.debug("fsq: %s: %d item(s) taken", queue, len(moved))
        return True

    def _reject(self, queue: str, held: fsq.Held, item: fsq.WorkItem, why: str) -> None:
        try:
            os.rename(item.id, item.id, src_dir_fd=held.fds["queue"], dst_dir_fd=held.fds["fail"])
        except FileNotFoundError:
            return
        log.warning("fsq: %s: %s %s: moved to fail/", queue, item.id, why)

    def _warn(self, queue: str, kind: str, fmt: str, *args: object) -> None:
        if (queue, kind) not in self._warned:
            self._warned.add((queue, kind))
            log.warning(fmt, *args)
