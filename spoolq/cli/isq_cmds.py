"""``spoolq isq put|get``: isq's commands (seed 000; spec B, docs/isq.md) on its spool files.

``put QUEUE MESSAGE`` appends a line to ``SPOOL/QUEUE.queue`` under isq's lock file, as
isq's ``put`` does (durably, which isq did not). ``get QUEUE CMD [N]`` sets up what isq's
``get`` did by hand with incron: the spoolq queue ``QUEUE`` runs ``CMD <line>`` for each
line, at most N at once (default 2); a daemon started with ``--isq-spool SPOOL`` takes the
lines. Unlike isq, a line is removed only once it is durably a message, and a failed CMD
leaves its message in err (retry with ``spoolq retry``), not lost.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import isq
from ..errors import InvalidInput, QueueNotFound
from .common import command, integer, queue_name

if TYPE_CHECKING:
    from .main import Ctx

SPOOL_HELP = (f"the spool directory (env SPOOLQ_ISQ_SPOOL; default {isq.DEFAULT_SPOOL}, isq's); "
              "the daemon takes its lines with serve --isq-spool DIR")


def register(sub: Any) -> None:
    ip = sub.add_parser("isq", help="isq's put and get on its <queue>.queue spool files (docs/isq.md)",
                        description="isq's commands: put appends a line to SPOOL/QUEUE.queue under isq's "
                                    "lock; get makes the queue that runs CMD <line> per line (a daemon with "
                                    "--isq-spool SPOOL takes the lines).")
    isub = ip.add_subparsers(dest="isq_command", metavar="ACTION", required=True)
    p = command(isub, "put", isq_put, "append MESSAGE as one line to SPOOL/QUEUE.queue, under its lock file")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("message", metavar="MESSAGE", help="one line (quote it: spaces are kept)")
    p.add_argument("--spool", default=None, help=SPOOL_HELP)
    p = command(isub, "get", isq_get, "make (or change) QUEUE to run CMD <line> for each line, N at once")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("cmd", metavar="CMD", help="the program and its own arguments, split as a shell would "
                                              "(no shell runs); the line is added as the last argument")
    p.add_argument("procs", metavar="N", nargs="?", default="2", help="at most N at once (default 2)")


def _spool(args: argparse.Namespace) -> Path:
    return Path(args.spool or os.environ.get("SPOOLQ_ISQ_SPOOL") or isq.DEFAULT_SPOOL)


def isq_put(args: argparse.Namespace, ctx: Ctx) -> int:
    isq.put(_spool(args), queue_name(args.queue), args.message)
    return 0


def isq_get(args: argparse.Namespace, ctx: Ctx) -> int:
    name = queue_name(args.queue)
    try:
        words = shlex.split(args.cmd)
    except ValueError as e:
        raise InvalidInput(f"CMD cannot be split: {e}") from None
    if not words:
        raise InvalidInput("CMD must name a program")
    prog = words[0] if "/" in words[0] else shutil.which(words[0])
    if prog is None:
        raise InvalidInput(f"CMD's program {words[0]!r} is not on PATH")
    changes: dict[str, Any] = {"script": os.path.abspath(prog), "args": words[1:], "message_arg": True,
                               "num_workers": integer(args.procs, "N", 1, 128)}
    try:
        ctx.client.queue_config(name)
    except QueueNotFound:
        ctx.client.create_queue(name, **changes)
        what = "created"
    else:
        ctx.client.update_queue(name, **changes)
        what = "changed"
    if ctx.json:
        ctx.emit_json({"queue": name, "config": ctx.client.queue_config(name).to_dict()})
    else:
        ctx.out(f"{what} queue {name}: {shlex.join([changes['script'], *words[1:]])} <line>, "
                f"{changes['num_workers']} at once")
    return 0
