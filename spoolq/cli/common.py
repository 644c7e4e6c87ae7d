"""Helpers shared by the command modules: value parsing and per-command options.

Values are parsed in the handlers, not by argparse ``type=``, so a bad value raises an
:class:`~spoolq.errors.InvalidInput` like every other bad input: ``spoolq: <message>``
on stderr, exit 2 (exitcodes.USAGE), and the ``{"error": ...}`` object under ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput
from ..ids import MessageRef, parse_ref, validate_msg_id, validate_queue_name

if TYPE_CHECKING:
    from .main import Ctx

Handler = Callable[[argparse.Namespace, "Ctx"], int]


def command(sub: Any, name: str, handler: Handler, help: str, **kw: Any) -> argparse.ArgumentParser:
    """Add a command parser that also takes ``--json`` after the command name."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help, **kw)
    # SUPPRESS: when not given here, the global --json (before the command) stands.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print stable machine-readable JSON")
    p.set_defaults(func=handler)
    return p


def warn_if_unserved(ctx: Ctx, what: str) -> None:
    """One line on stderr when no daemon serves the root, so nothing will run: ``what`` says
    what that means for this command. Only for the filesystem store, whose daemon holds
    ``<root>/daemon.pid`` locked; asking never creates the file (a read-only root stays so)."""
    served = ctx.client.served()
    if served is not None and not served[0]:
        print(f"spoolq: warning: no daemon is serving {served[1]} (start it with spoolq serve); {what}",
              file=sys.stderr)


def queue_name(name: str) -> str:
    """Validate a queue name before anything touches the disk (InvalidName: exit 2)."""
    return validate_queue_name(name)


def ref(value: str) -> MessageRef:
    """A message reference: ``QUEUE/ID`` or a full id URL (or ``/q/QUEUE/ID``).

    ``QUEUE/ID`` is split here first: ``ids.parse_ref`` reads ``q/ID`` as the start of a
    ``/q/QUEUE/ID`` path and so cannot name a message of a queue called ``q``.
    """
    queue, sep, msg_id = value.partition("/")
    if sep and queue not in ("", "http:", "https:") and "/" not in msg_id:
        return MessageRef(validate_queue_name(queue), validate_msg_id(msg_id))
    return parse_ref(value)


def refs(values: Sequence[str]) -> list[MessageRef]:
    """Parse every message reference first, so one bad reference means nothing is done."""
    return [ref(v) for v in values]


def integer(value: str | None, what: str, lo: int = 0, hi: int = 2**31) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        raise InvalidInput(f"{what} must be an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise InvalidInput(f"{what} must be between {lo} and {hi}, got {n}")
    return n


def number(value: str | None, what: str, lo: float = 0.0, hi: float = 32503680000.0) -> float | None:
    """A finite float in [lo, hi]; ``nan``, ``inf`` and words are refused."""
    if value is None:
        return None
    try:
        x = float(value.strip())
    except ValueError:
        raise InvalidInput(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise InvalidInput(f"{what} must be a number between {lo:g} and {hi:g}, got {value!r}")
    return x


def key_value(item: str, what: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` (the value may contain ``=``; the key may not be empty)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise InvalidInput(f"{what} must be KEY=VALUE, got {item!r}")
    return key.strip(), value


def json_or_text(value: str) -> Any:
    """``4`` -> 4, ``[1,2]`` -> [1, 2], ``true`` -> True, ``null`` -> None; else the text itself."""
    try:
        return json.loads(value)
    except ValueError:
        return value
