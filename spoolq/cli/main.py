"""Entry point of the ``spoolq`` command: global options, dispatch, error -> exit code.

Each command group lives in its own module with a ``register(subparsers)`` function that
adds its commands and sets ``func`` (a callable ``(args, ctx) -> int``) on each parser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .. import __version__
from ..client import Client
from ..client import open as open_client
from ..config import default_root
from ..errors import SpoolqError
from . import daemon_cmds, db_cmds, exitcodes, fsq_cmds, isq_cmds, message_cmds, output, queue_cmds, rq_cmd

# Command-group modules, in help order.
COMMAND_MODULES = (queue_cmds, message_cmds, daemon_cmds, db_cmds, rq_cmd, isq_cmds, fsq_cmds)


class Ctx:
    """What every command gets: the parsed globals, a lazily opened client, output helpers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root: str = args.root or default_root()
        self.json: bool = bool(args.json)
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = open_client(self.root)
        return self._client

    def emit_json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def out(self, text: str = "") -> None:
        sys.stdout.write(text + "\n")


class Parser(argparse.ArgumentParser):
    """argparse with spoolq's error format: ``spoolq: <message>`` (and JSON under --json), exit 2."""

    def error(self, message: str) -> NoReturn:
        if "--json" in sys.argv[1:]:
            sys.stdout.write(json.dumps(output.error_json("usage", message)) + "\n")
        self.print_usage(sys.stderr)
        sys.stderr.write(f"spoolq: {message}\n")
        raise SystemExit(exitcodes.USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="spoolq",
        description="A per-machine message queue manager whose database is the filesystem.",
    )
    p.add_argument("--root", "--store", dest="root", default=os.environ.get("SPOOLQ_ROOT"),
                   help="spool root directory or store URL (postgresql://user@host/db for PostgreSQL; "
                        "default: $SPOOLQ_ROOT, else /var/spool/spoolq when writable, else ~/.local/state/spoolq)")
    p.add_argument("--json", action="store_true", help="print stable machine-readable JSON")
    p.add_argument("--version", action="version", version=f"spoolq {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        words = list(sys.argv[1:] if argv is None else argv)
        if e.code == exitcodes.USAGE and "fsq" in words and all(w.startswith("-") for w in words[:words.index("fsq")]):
            raise SystemExit(fsq_cmds.USAGE) from None  # fsq's tools say bad usage with 100
        raise
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    ctx = Ctx(args)
    try:
        return int(args.func(args, ctx) or 0)
    except SpoolqError as e:
        code = exitcodes.exit_code_for(e)
        if ctx.json:
            ctx.emit_json(output.error_json(e.code, str(e)))
        print(f"spoolq: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return exitcodes.OK
