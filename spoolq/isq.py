"""isq's spool files (seed 000; spec B): a queue is a text file ``<spool>/<queue>.queue``
with one message per line, appended under a lock file ``<queue>.queue.lock``.

The lock is lockfile-progs' (``lockfile-create --use-pid``, which isq uses): a file that
holds the owner's pid and a newline, made by ``link(2)`` of a complete temporary file so it
appears whole or not at all. A lock whose pid is not a live process is stale and may be
removed, as is one without a pid older than five minutes (liblockfile's rules), one that
is not a regular file, and one holding this process's own pid. spoolq's
``isq put`` and the daemon's spool intake (daemon/isqspool.py) both take it, so they
interoperate with isq's own ``put``/``get`` and with anything else that uses lockfile-progs.

Nothing here follows a symbolic link: a spool is often world-writable (isq's README says
``chmod a+w``), and a link planted there must not make spoolq read or write elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import time
from pathlib import Path

from .errors import InvalidInput, InvalidName, Unavailable
from .ids import validate_queue_name

SUFFIX = ".queue"
LOCK_SUFFIX = ".queue.lock"
DEFAULT_SPOOL = "/var/spool/isqueue"
STALE_NO_PID = 300.0
"""A lock file without a readable pid is stale after this many seconds (liblockfile)."""
RETRY = 0.05
"""Seconds between tries for a held lock (isq's ``sleep 0.05``)."""

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def queue_file(spool: Path, queue: str) -> Path:
    return spool / f"{validate_queue_name(queue)}{SUFFIX}"


def lock_file(spool: Path, queue: str) -> Path:
    return spool / f"{validate_queue_name(queue)}{LOCK_SUFFIX}"


def queue_of(name: str) -> str | None:
    """The queue a spool entry's name is the file of (``mail.queue`` -> ``mail``), or None."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    q = name[: -len(SUFFIX)]
    try:
        return validate_queue_name(q)
    except InvalidName:
        return None


def try_lock(path: Path) -> bool:
    """Take the lock at ``path`` if it is free or stale; False if a live process holds it."""
    tmp = path.with_name(f".lk{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    try:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            pass
        # Breaking a stale lock: judge it, remove it, take it, with no other spoolq process
        # doing the same in between (an flock on the directory). Otherwise two breakers
        # that both judged the dead holder's lock stale could each remove what the other
        # had just taken, and both hold it (audit: 25 of 300 rounds of three processes).
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            for _ in range(3):
                if not stale(path):
                    return False
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    continue  # taken meanwhile by one that found it free: judged again
            return False
        finally:
            os.close(dfd)  # lets the flock go
    finally:
        os.unlink(tmp)


def stale(path: Path) -> bool:
    """Is the lock at ``path`` left by a process that is gone (or gone itself)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            return True  # not a lock file: a link (or a socket) planted in the spool
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return True  # a FIFO or a device planted in the spool: no process's lock
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    try:
        pid = int(raw.split()[0]) if raw.split() else 0
    except ValueError:
        pid = 0
    if pid <= 0:
        return time.time() - st.st_mtime > STALE_NO_PID
    if pid == os.getpid():
        return True  # this process takes a lock only to let it go before it asks again: an
        # earlier process with the same pid (a container's daemon restarted) left it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def unlock(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def lock(path: Path, timeout: float) -> None:
    """Take the lock at ``path``, trying every :data:`RETRY` s for ``timeout`` s (isq retries
    for ever); Unavailable when it stays held."""
    end = time.monotonic() + timeout
    while not try_lock(path):
        if time.monotonic() >= end:
            raise Unavailable(f"{path} is held by another process (waited {timeout:g} s)")
        time.sleep(RETRY)


def put(spool: Path, queue: str, message: str, *, timeout: float = 30.0) -> None:
    """isq's ``put``: append ``message`` and a newline to the queue's file, under its lock,
    made durable (isq did not fsync). The file is created if needed."""
    if "\n" in message or "\r" in message or "\0" in message:
        raise InvalidInput("an isq message is one line: no newline, carriage return or NUL")
    path, lk = queue_file(spool, queue), lock_file(spool, queue)
    lock(lk, timeout)
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InvalidInput(f"{path} is a symbolic link: refusing to follow it") from None
            if e.errno == errno.ENXIO:  # a FIFO nobody reads (or a socket)
                raise InvalidInput(f"{path} is not a regular file") from None
            raise Unavailable(f"cannot open {path}: {e.strerror or e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidInput(f"{path} is not a regular file")
            data = message.encode() + b"\n"
            if os.write(fd, data) != len(data):
                raise Unavailable(f"short write to {path}")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        unlock(lk)
