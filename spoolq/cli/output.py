"""Human output for the CLI: aligned tables, safe text, times, and a stderr progress bar.

Machine output is ``ctx.emit_json``; this module only shapes what a person reads. Anything
that came from a message (params, status text, names) may hold control characters: it goes
through :func:`clean` so a hostile message cannot move the cursor or recolour a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def clean(value: Any, width: int | None = None) -> str:
    """``value`` as one printable line, shortened to ``width`` characters with an ellipsis."""
    text = str(value).translate(_CONTROL)
    if width is not None and len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    return text


def fmt_time(epoch: float | None) -> str:
    """An epoch as ``2026-11-23 09:21:45Z`` (UTC, like message ids); ``-`` for none."""
    if not epoch:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(epoch)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"  # a hand-edited history entry: shown, never a crash


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Iterable[int] = ()) -> str:
    """Rows as aligned columns under ``headers``; columns in ``numeric`` are right-aligned.

    The last column is never padded, so a long free-text column does not leave trailing blanks.
    """
    cells = [[clean(c) for c in headers]] + [[clean(c) for c in row] for row in rows]
    right = set(numeric)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = []
        for i, c in enumerate(r):
            if i == len(r) - 1 and i not in right:
                parts.append(c)
            elif i in right:
                parts.append(c.rjust(widths[i]))
            else:
                parts.append(c.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """``key: value`` lines with the values aligned."""
    items = [(k, clean(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}".rstrip() for k, v in items)


def error_json(code: str, message: str) -> dict[str, Any]:
    """The one error shape of ``--json`` output, used by every command."""
    return {"error": {"code": code, "message": message}}


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    Redraws at most ten times a second so a tight loop does not spend its time drawing.
    ``total`` may be None (unknown length: stdin), then only the count and rate are shown.
    """

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 unit: str = "") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.count = 0
        self.start = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int, count: int | None = None) -> None:
        """Progress is ``done`` of ``total`` units; ``count`` is what to report (e.g. messages)."""
        self.done = done
        if count is not None:
            self.count = count
        now = time.monotonic()
        if self.enabled and now - self._drawn >= 0.1:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = f"{self.count / elapsed:,.0f}/s"
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = ("#" * int(frac * 30)).ljust(30, ".")
            line = f"{self.label} [{bar}] {frac * 100:5.1f}%  {self.count:,}{self.unit}  {rate}"
        else:
            line = f"{self.label} {self.count:,}{self.unit}  {rate}"
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (a no-op when not on a terminal)."""
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
