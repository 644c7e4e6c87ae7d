"""``<root>/daemon.pid``: the lock that makes one daemon the only one serving a spool root.

The daemon holds an exclusive ``flock`` on the file for its whole life (D1); the kernel
drops it when the process dies, so a stale file never blocks a start. Anyone may ask
whether a daemon is there by trying a shared lock without blocking: it is granted only
when nobody holds the exclusive one. The pid written into the file is for people
(``cat daemon.pid``), never for the lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from ...errors import DaemonRunning

log = logging.getLogger("spoolq.daemon")

PIDFILE = "daemon.pid"


HELPER_LOCK_GLOB = "dispatch.*.pid"


def wait_for_helpers(root: Path, timeout: float) -> list[str]:
    """Before a main daemon of ``serve --dispatchers`` recovers ``run/``: wait until no helper
    of an earlier one holds its lock (helpers die with their main process, which takes a
    moment). Returns the lock files still held after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    held: list[str] = []
    for path in sorted(root.glob(HELPER_LOCK_GLOB)):
        if _locked(path):
            log.info("waiting for %s: a dispatch helper of an earlier spoolq serve holds it", path.name)
        while _locked(path):  # None (cannot tell): no helper of ours could have opened it either
            if time.monotonic() >= deadline:
                held.append(str(path))
                break
            time.sleep(0.05)
    return held


def helper_lock(index: int) -> str:
    """The lock file of dispatch process ``index`` (> 0) of ``serve --dispatchers``."""
    return f"dispatch.{index}.pid"


def acquire(root: Path, name: str = PIDFILE) -> int:
    """Lock ``<root>/daemon.pid``; returns the locked fd. DaemonRunning if another daemon holds it.
    ``name``: another file of the root, ``dispatch.<i>.pid`` for a dispatch helper
    (:func:`helper_lock`).

    Writing the pid is a courtesy: on a full disk it fails with a warning and the daemon
    starts all the same (the lock is what counts).
    """
    path = root / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _lock_exclusive(fd)
    except OSError as e:
        other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DaemonRunning(f"another spoolq daemon (pid {other}) is serving {root} "
                                f"(it holds {path})") from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        log.warning("cannot write the pid into %s: %s; serving anyway (the lock is what counts)",
                    path, e.strerror)
    return fd


def _lock_exclusive(fd: int, tries: int = 20) -> None:
    """``LOCK_EX`` without blocking, tried again for a few milliseconds: whoever asks whether
    a daemon is there (:func:`_locked`: ``spoolq status``, a CLI warning) holds a shared
    lock for a moment, and a start must not fail on that. A daemon really holding the lock
    still fails it at once, but for those milliseconds."""
    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or i == tries - 1:
                raise
            time.sleep(0.001)


def release(fd: int) -> None:
    """Empty the file and let go of the lock.

    The file stays: unlinking it before the unlock would let a second daemon lock the old
    inode while a third locks a new file at the same path.
    """
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def is_served(root: str | os.PathLike[str]) -> bool:
    """Does a daemon hold ``<root>/daemon.pid``'s lock right now?

    Opens the file read-only and never creates it, so asking leaves nothing behind (a
    read-only root stays untouched). A missing file means no daemon ever served the root;
    a file that cannot be opened (permissions) counts as served, so callers do not warn
    about what they cannot know.
    """
    return _locked(Path(root) / PIDFILE) is not False


def processes(root: str | os.PathLike[str]) -> list[tuple[int, int | None, bool | None]]:
    """The dispatch processes serving ``root`` now, the main one first: ``(index, pid,
    held)``, index 0 for the main process (``daemon.pid``), i for helper i
    (``dispatch.<i>.pid``), the pid as its file says (None if unreadable). ``held`` is True
    where the file's lock is held, None where the file cannot be opened to ask
    (permissions): unknown, not absent. Files nobody holds are left out. Read-only."""
    base = Path(root)
    paths = [(0, base / PIDFILE)]
    for path in base.glob(HELPER_LOCK_GLOB):
        number = path.name.split(".")[1]
        if number.isdigit():
            paths.append((int(number), path))
    out: list[tuple[int, int | None, bool | None]] = []
    for index, path in sorted(paths):
        held = _locked(path)
        if held is False:
            continue
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        out.append((index, int(text) if text.isdigit() else None, held))
    return out


def _locked(path: Path) -> bool | None:
    """Does a process hold ``path``'s exclusive lock right now? False for a missing file,
    None when it cannot be opened (permissions). Read-only: nothing is created."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # closing drops the shared lock if we got it
    return False
