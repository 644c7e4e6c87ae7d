"""Message ids, full ids and name validation.

A message id is ``YYYYmmdd.HHMM.SS.mmm.<n>`` in UTC, RQ's format (``^\\d{8}\\.\\d{4}\\.
\\d{2}\\.\\d{3}\\.\\d+$``). The prefix orders ids by creation time to the millisecond;
``<n>`` makes the id unique on the host (the filesystem store uses the inode number of
the message directory, which no other live message can share; see docs/internals.md).

The full id names a message across machines: ``http://<host>:<port>/q/<queue>/<id>``.
"""

from __future__ import annotations

import re
import time
from typing import NamedTuple

from .errors import InvalidName

# \Z, not $ (which also matches before a final newline), and ASCII digits only: these names
# become paths.
MSG_ID_RE = re.compile(r"^\d{8}\.\d{4}\.\d{2}\.\d{3}\.\d+\Z", re.ASCII)
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z", re.ASCII)
# Attachment names end up as file names and, in scripts, on command lines: no dot-files,
# no separators, no whitespace, no shell metacharacters. At most 200 characters, so the
# store's derived names (".<name>.json.<pid>.tmp") still fit in 255 bytes.
ATTACH_NAME_MAX = 200
ATTACH_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+,=@-]*\Z", re.ASCII)
# Files of a message's job/ directory that may be served (stdio.log and whatever a script
# writes beside it): plain names only.
LOG_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z", re.ASCII)
FULL_ID_RE = re.compile(r"^https?://[^/\s]+(?:/[^\s]*)?/q/([^/\s]+)/(\d{8}\.\d{4}\.\d{2}\.\d{3}\.\d+)/?\Z",
                        re.ASCII)


def id_prefix(t: float) -> str:
    """The time part of an id created at epoch ``t`` (UTC, millisecond resolution)."""
    tm = time.gmtime(t)
    ms = int((t - int(t)) * 1000)
    return time.strftime("%Y%m%d.%H%M.%S", tm) + f".{ms:03d}"


def make_id(t: float, unique: int) -> str:
    return f"{id_prefix(t)}.{unique}"


def sort_key(msg_id: str) -> tuple[str, int]:
    """Order ids by time, then by their numeric suffix (string order would put 10 before 9)."""
    prefix, _, n = msg_id.rpartition(".")
    return (prefix, int(n) if n.isdigit() else 0)


def bucket_of(msg_id: str) -> tuple[str, str, str]:
    """The (day, HHMM, SS) directories that hold ``msg_id`` in every state directory."""
    return (msg_id[0:8], msg_id[9:13], msg_id[14:16])



def validate_queue_name(name: str) -> str:
    if not isinstance(name, str) or not QUEUE_NAME_RE.match(name):
        raise InvalidName(
            f"invalid queue name {name!r}: use 1-128 of A-Z a-z 0-9 _ -, starting with a letter or digit"
        )
    return name


def validate_msg_id(msg_id: str) -> str:
    if not isinstance(msg_id, str) or not MSG_ID_RE.match(msg_id):
        raise InvalidName(f"invalid message id {msg_id!r}: expected YYYYmmdd.HHMM.SS.mmm.N")
    return msg_id


def log_name_ok(name: str) -> bool:
    """May ``name`` name a file of a message's ``job/`` directory (``stdio.log``...)?"""
    return isinstance(name, str) and bool(LOG_NAME_RE.match(name))


def validate_attachment_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName("attachment name must be a non-empty string")
    if name.startswith("."):
        raise InvalidName(f"Attachment name as a dot-file not allowed: {name}")
    if len(name) > ATTACH_NAME_MAX:
        raise InvalidName(f"attachment name too long: {len(name)} characters, at most {ATTACH_NAME_MAX}")
    if not ATTACH_NAME_RE.match(name):
        raise InvalidName(
            f"Attachment name has invalid character. not allowed: {name!r} "
            "(use A-Z a-z 0-9 and . _ + , = @ -)"
        )
    return name


class MessageRef(NamedTuple):
    """A message named by queue and id. ``str()`` of the full form is the full id."""

    queue: str
    msg_id: str

    def full_id(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/q/{self.queue}/{self.msg_id}"


def parse_ref(ref: str) -> MessageRef:
    """Parse a message reference: a full id URL or ``QUEUE/ID``."""
    if not isinstance(ref, str):
        raise InvalidName(f"invalid message reference {ref!r}")
    m = FULL_ID_RE.match(ref)
    if m:
        return MessageRef(validate_queue_name(m.group(1)), m.group(2))
    queue, sep, msg_id = ref.strip("/").partition("/")
    if sep and queue == "q" and "/" in msg_id:  # "/q/QUEUE/ID", as in a full id's path
        queue, _, msg_id = msg_id.partition("/")
    if not sep or not msg_id:
        raise InvalidName(f"invalid message reference {ref!r}: use QUEUE/ID or a full id URL")
    return MessageRef(validate_queue_name(queue), validate_msg_id(msg_id))
