"""Which message a relay made, by the relay's key (the receiving side of exactly-once relay,
docs/relay.md): ``<queue>/relay-keys/<YYYYmmdd>/<sha256 of the key, 40 hex>``, holding the
message id, written atomically and fsynced before the prep is answered.

Keys are kept :data:`KEEP_DAYS` days (a sender retries for far less: its backoff ends in err
after 15 tries), in one directory per UTC day, so a lookup opens at most ``KEEP_DAYS + 1``
files and the sweep drops whole old days. A key whose message is gone (deleted, cleaned)
is no key.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

from ... import durable
from ...ids import MSG_ID_RE

KEEP_DAYS = 7
DIR = "relay-keys"
_DAY_RE = re.compile(r"^\d{8}\Z")


def _name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _day(t: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(t))


def lookup(qdir: Path, key: str, now: float) -> str | None:
    """The message id recorded for ``key`` in the last KEEP_DAYS days (the caller checks it
    still exists), or None."""
    name = _name(key)
    for back in range(KEEP_DAYS + 1):
        try:
            text = (qdir / DIR / _day(now - back * 86400) / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, UnicodeDecodeError):
            return None
        return text if MSG_ID_RE.match(text) else None
    return None


def record(qdir: Path, key: str, msg_id: str, now: float, *, sync: bool) -> None:
    """Remember ``msg_id`` for ``key`` (today's directory), durably when ``sync``."""
    day = qdir / DIR / _day(now)
    durable.makedirs(day, qdir, sync=sync)
    durable.write_replace(day / _name(key), msg_id.encode() + b"\n", sync=sync)


def prune(qdir: Path, now: float) -> int:
    """Remove the days older than KEEP_DAYS; how many."""
    oldest = _day(now - KEEP_DAYS * 86400)
    n = 0
    try:
        days = os.listdir(qdir / DIR)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for d in days:
        if _DAY_RE.match(d) and d < oldest:
            shutil.rmtree(qdir / DIR / d, ignore_errors=True)
            n += 1
    return n
