"""Whether a small file changed since it was read, from its stat: the rule every cache by
stat in spoolq uses (queue configs, timer files).

A file's times tick coarsely (a jiffy), so a file replaced within one tick by another of
the same size (edited in place, or renamed over it with an inode just freed) has the same
inode, mtime and size. Git's "racy clean" rule: the stamp vouches for a file only when the
file was older than :data:`SETTLED_NS` at the moment it was read; until then the reader
compares the content (or reads it again). A file dated in the future (a clock stepped
back, a file server whose clock is ahead) is not trusted until it is that old: slower,
never stale. A server whose clock is behind by more than this can still hide a same-size
rewrite within one of its ticks, as from any cache by stat.
"""

from __future__ import annotations

import os
import time

Stamp = tuple[int, int, int]
SETTLED_NS = 2_000_000_000
"""Well past a timestamp tick and the small clock steps NTP makes."""


def key(st: os.stat_result) -> Stamp:
    """The file's (inode, mtime, size): what a later stat is compared with."""
    return st.st_ino, st.st_mtime_ns, st.st_size


def stamp(st: os.stat_result) -> tuple[Stamp, bool]:
    """The file's :func:`key`, and whether that vouches for its content from now on (read it
    now, and its stamp unchanged later means the content is too)."""
    return key(st), time.time_ns() - st.st_mtime_ns > SETTLED_NS
