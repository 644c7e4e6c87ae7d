#!/usr/bin/env python3
"""Write the "Reference: --help of every command" section of docs/cli.md from the parser.

    .venv/bin/python scripts/cli_reference.py          # rewrite docs/cli.md
    .venv/bin/python scripts/cli_reference.py --check  # exit 1 if docs/cli.md is stale

tests/test_cli.py runs the check, so the reference cannot drift from ``--help``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
MARKER = "## Reference: `--help` of every command"
COMMANDS = [
    [],
    *[["queue", a] for a in ("create", "list", "show", "set", "pause", "resume", "down", "up", "delete")],
    *[[c] for c in ("send", "attach", "commit", "status", "show", "ls", "stats", "retry", "clone", "run-now",
                    "delete", "cancel", "ack-errs", "sweep", "wait", "log", "serve", "login-url")],
    *[["db", a] for a in ("migrate", "status")],
]


def reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix it
    from spoolq.cli.main import build_parser

    parser = build_parser()
    out = [MARKER, "", "Generated from the parser by `scripts/cli_reference.py` (a test fails when it is stale).", ""]
    for cmd in COMMANDS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            parser.parse_args([*cmd, "--help"])
        out += [f"### spoolq {' '.join(cmd)}".rstrip(), "", "```", buf.getvalue().rstrip(), "```", ""]
    return "\n".join(out)


def main() -> int:
    text = DOC.read_text()
    head = text.split(MARKER)[0]
    new = head + reference()
    if "--check" in sys.argv[1:]:
        if new != text:
            print(f"{DOC} is stale: run scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
