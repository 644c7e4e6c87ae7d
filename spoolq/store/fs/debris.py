"""Debris of writers that died: staging directories, half-made queues, half-written
attachments. Each carries its writer's pid in its name, so a sweep can tell debris from
work in progress (internals.md, I6)."""

from __future__ import annotations

import os
import time
from pathlib import Path

DEAD_OWNER_GRACE = 1.0
"""Seconds even a dead owner's debris is left alone: a writer in another pid namespace (a
container sharing the spool) looks dead from here while it writes."""


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` exist (in this pid namespace)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_debris(path: Path, owner: str, older_than: float, now: float) -> bool:
    """Is ``path``, written by process ``owner`` (a pid as text), debris? Yes when its owner
    is gone and :data:`DEAD_OWNER_GRACE` has passed, or when it is older than ``older_than``
    seconds whoever owns it. A path that vanished meanwhile is not."""
    try:
        age = now - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    owner_alive = owner.isdigit() and pid_alive(int(owner))
    return (not owner_alive and age > DEAD_OWNER_GRACE) or age > older_than


def remove_partial(attach_dir: Path, older_than: float = 0.0) -> list[str]:
    """Remove half-written attachments (``.<name>.<pid>.tmp``, store/fs/attachments.py) that
    :func:`is_debris` calls debris; ``older_than=0`` removes them all."""
    removed: list[str] = []
    now = time.time()
    try:
        names = [n for n in os.listdir(attach_dir) if n.startswith(".") and n.endswith(".tmp")]
    except OSError:
        return removed
    for n in names:
        p = attach_dir / n
        if is_debris(p, n[:-4].rpartition(".")[2], older_than, now):
            try:
                p.unlink()
                removed.append(str(p))
            except OSError:
                continue
    return removed
