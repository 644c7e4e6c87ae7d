"""``<q>/kick/<id>``: "read this queued message again", from ``run-now`` to the daemon.

The daemon watches queue directories and ``que/`` buckets, not message directories, so it
does not see a message rewritten in place. ``run-now`` first rewrites the message's
``msg`` (due 0), *then* creates ``kick/<id>``. The daemon watches ``kick/``; for each
name it removes the file first and reads the message after, so whatever ``run-now``
wrote before creating the file is what it reads, and a later ``run-now`` makes a new file
and a new event. One file per message: O(1) for the daemon however long the queue is.

Older versions touched a plain file ``<q>/kick`` (which made the daemon rescan the whole
queue). Such a file is replaced by the directory on the first ``run-now``; the daemon
ignores it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...ids import MSG_ID_RE

KICK_DIR = "kick"


def kick_dir(qdir: Path) -> Path:
    return qdir / KICK_DIR


def request(qdir: Path, msg_id: str) -> None:
    """Ask the daemon to read ``msg_id`` again (after its ``msg`` was rewritten in place).

    A kick is a hint (the rewrite is what counts): errors are the caller's to ignore.
    """
    kdir = kick_dir(qdir)
    path = kdir / msg_id
    for _ in range(2):
        try:
            # Opened for writing and closed: IN_CREATE for a new file, IN_CLOSE_WRITE for
            # one the daemon has not consumed yet. Either wakes it.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            os.makedirs(kdir, exist_ok=True)
            continue
        except NotADirectoryError:
            os.unlink(kdir)  # an older version's plain "kick" file
            os.makedirs(kdir, exist_ok=True)
            continue
        os.close(fd)
        return


def consume(qdir: Path, name: str) -> str | None:
    """Remove ``kick/<name>``; returns the message id it names (None for a stray name)."""
    if not MSG_ID_RE.match(name):
        return None
    try:
        os.unlink(kick_dir(qdir) / name)
    except FileNotFoundError:
        return None  # consumed already (an event for a file handled in an earlier batch)
    except OSError:
        pass  # cannot remove it (read-only): still read the message; the next start retries
    return name


def pending(qdir: Path) -> list[str]:
    """Names in ``kick/`` now (none when it is missing or is an older version's plain file)."""
    try:
        return os.listdir(kick_dir(qdir))
    except OSError:
        return []
