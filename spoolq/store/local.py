"""Local files for a store that keeps none (PostgreSQL): the script's working directory,
and the pump that carries its output into the store's log.

RQ's contract gives a script a ``job/`` directory to run in, with the message as ``../msg``
and its attachments as ``../attach/<name>``. :func:`materialize` writes those from the store
into a local directory (attachments streamed, never held in memory). :class:`LogPump`
hands out pipe ends for scripts' stdout and stderr and appends what comes through to the
store, from one thread for all running scripts.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import selectors
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import durable
from ..errors import SpoolqError
from ..ids import validate_msg_id, validate_queue_name
from .leases import Attempt

if TYPE_CHECKING:
    from .base import Store

log = logging.getLogger("spoolq.daemon")

CHUNK = 1 << 20


def materialize(store: Store, attempt: Attempt, base: Path, names: Iterable[str] | None = None) -> Path:
    """``base/<queue>/<id>/job``, beside ``msg`` and ``attach/`` written from the store; kept
    across attempts on this host (the script's files stay, as on the filesystem store).
    ``names``: the message's attachments, when the caller has read them already."""
    mdir = base / validate_queue_name(attempt.queue) / validate_msg_id(attempt.msg_id)
    # Kept across attempts, so an earlier script may have left a link (or a directory, a
    # file) in the place of any of these (as on the filesystem store, docs/security.md):
    # none is followed, ``base`` itself (``<home>/work``) included. What is written here is
    # a copy of the store's: whatever is in the way is removed and the copy made again.
    base.parent.mkdir(parents=True, exist_ok=True)
    _own_dir(base)
    _own_dir(mdir.parent)
    _own_dir(mdir)
    job = mdir / "job"
    _own_dir(job)
    remove(mdir / ".msg.tmp")  # what a crash or a script left there (a link): never written through
    durable.write_new(mdir / ".msg.tmp", attempt.message.encode(), sync=False)
    _replace(mdir / ".msg.tmp", mdir / "msg")
    attach = mdir / "attach"
    _own_dir(attach)
    if names is None:
        names = store.get(attempt.queue, attempt.msg_id).attachments
    for name in names:
        dest = attach / name
        try:
            if stat.S_ISREG(os.lstat(dest).st_mode):
                continue  # attachments cannot change once the message is committed
        except FileNotFoundError:
            pass
        part = attach / f".{name}.part"
        remove(part)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)  # new: no link followed
        with store.open_attachment(attempt.queue, attempt.msg_id, name) as src, open(fd, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
        _replace(part, dest)
    return job


def _replace(src: Path, dst: Path) -> None:
    """``os.replace``, also where a directory stands at ``dst`` (a rename replaces a link or
    a file, never follows one, but cannot replace a directory): else the start would fail
    the same way at every retry, and the message never run nor end."""
    try:
        os.replace(src, dst)
    except IsADirectoryError:
        shutil.rmtree(dst)
        os.replace(src, dst)


def _own_dir(path: Path) -> None:
    """``path`` a directory of its own: anything else in its place (a link, a file) is
    removed, not followed, and a directory made."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return
        path.unlink()
    except FileNotFoundError:
        pass
    path.mkdir()


def remove(path: Path) -> None:
    """Whatever is at ``path`` (a leftover part, a link, a file), gone; a directory with its
    contents. Never follows a link."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path)


class Trash:
    """Finished messages' local directories, removed by a thread of their own: removing one
    is five or more unlinks (about 0.6 ms on this machine's ext4), renaming it away is one.
    ``<base>/.trash`` (a name no queue can have) is emptied again at the next start when a
    process dies first."""

    def __init__(self, base: Path) -> None:
        self.dir = base / ".trash"
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._n = itertools.count()

    def forget(self, queue_name: str, msg_id: str) -> None:
        """Remove ``<base>/<queue>/<id>``: moved into the trash now, deleted soon."""
        path = self.dir.parent / validate_queue_name(queue_name) / validate_msg_id(msg_id)
        if self._thread is None:
            _own_dir(self.dir.parent)  # as materialize: a link a script left there is not followed
            _own_dir(self.dir)
            for left in os.listdir(self.dir):  # a previous process's, died before removing it
                self._queue.put(self.dir / left)
            self._thread = threading.Thread(target=self._run, name="spoolq-trash", daemon=True)
            self._thread.start()
        dest = self.dir / f"{os.getpid()}.{time.monotonic_ns()}.{next(self._n)}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return
        except OSError as e:  # e.g. the trash itself removed by hand: remove it here then
            log.warning("cannot move %s into %s (%s); removing it in place", path, self.dir, e)
            shutil.rmtree(path, ignore_errors=True)
            return
        self._queue.put(dest)

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Remove what is in the trash now, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class LogPump:
    """One thread copying scripts' output from pipes into the store, as it comes."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._open = 0
        self._thread = threading.Thread(target=self._run, name="spoolq-logpump", daemon=True)
        self._thread.start()

    def open(self, append: Callable[[bytes], object], label: str) -> tuple[int, threading.Event]:
        """A write end for a script's stdout/stderr (the caller passes it on and closes it),
        and an event set once everything written to it has gone to ``append`` (every
        writer closed it and the pipe is read to its end)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        drained = threading.Event()
        with self._lock:
            self._sel.register(r, selectors.EVENT_READ, (append, label, drained))
            self._open += 1
        os.write(self._wake_w, b"!")
        return w, drained

    @property
    def open_pipes(self) -> int:
        return self._open

    def _run(self) -> None:
        while not self._stop:
            self._round(None)
        self._round(0)  # what the pipes hold now

    def _round(self, timeout: float | None) -> None:
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            self._drain(key.fd, *key.data)

    def _drain(self, fd: int, append: Callable[[bytes], object], label: str, drained: threading.Event) -> None:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                append(data)
            except (OSError, SpoolqError) as e:  # the store is out of reach: this part is lost
                log.warning("%s: %d bytes of output not stored: %s", label, len(data), e)
            return
        with self._lock:
            self._sel.unregister(fd)
            self._open -= 1
        os.close(fd)
        drained.set()

    def close(self) -> None:
        """Stop, after one last read of what the pipes hold (their writers are gone by then)."""
        self._stop = True
        os.write(self._wake_w, b"!")
        self._thread.join(5)
        if not self._thread.is_alive():
            for key in list(self._sel.get_map().values()):
                if key.data is not None:
                    os.close(key.fd)
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
