"""The fd-3 status protocol and the outcome table (reference/rq-spec.md 3.2 and 3.3).

A script writes lines ``VERB TEXT`` on fd 3. Every line becomes the message's visible
status; ``done``, ``err`` (alias ``fails``), ``relayed`` and ``resend`` are completions and
the first one decides; ``dup`` asks for a copy and gets a reply line on fd 4. This module is
pure apart from :func:`read_lines` (which reads a pipe): no processes, no store, so every rule
here is tested on its own.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from typing import Any

from ..model import State

MAX_LINE = 64 * 1024
"""A longer status line is cut here (and marked); the rest up to the newline is dropped."""

TERMINAL_VERBS = {"done": "done", "err": "err", "fails": "err", "relayed": "relayed", "resend": "resend"}
EXIT_TEMPFAIL = 111
EXIT_PERMFAIL = 100
MAX_RESEND_SECS = 10 * 365 * 86400.0


class LineBuffer:
    """Splits a byte stream into lines, keeping partial lines across reads (RQ did not)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    if not self._discarding:
                        out.append(_decode(self._buf[: self.max_line]) + " [truncated]")
                        self._discarding = True
                    del self._buf[:]
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._discarding:
                self._discarding = False  # the tail of a cut line
                continue
            if len(line) > self.max_line:
                out.append(_decode(line[: self.max_line]) + " [truncated]")
            else:
                out.append(_decode(line))

    def flush(self) -> list[str]:
        """At end of stream: a last line without its newline still counts."""
        rest, self._buf = bytes(self._buf), bytearray()
        if rest and not self._discarding:
            return [_decode(rest[: self.max_line])]
        return []


def read_lines(fd: int, buf: LineBuffer, budget: int = 1 << 20) -> tuple[list[str], bool]:
    """Read what a non-blocking pipe holds (up to ``budget`` bytes, so other pipes get a
    turn; the fd stays readable); its complete lines (all of them at EOF) and whether EOF
    was reached."""
    chunks: list[bytes] = []
    eof = False
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        except OSError:
            data = b""
        if not data:
            eof = True
            break
        chunks.append(data)
        if sum(map(len, chunks)) > budget:
            break
    lines: list[str] = []
    for c in chunks:
        lines += buf.feed(c)
    if eof:
        lines += buf.flush()
    return lines, eof


_CONTROLS = {c: " " for c in range(32) if c != 0x1B}
"""Control characters would corrupt a one-line status (tabs become spaces); ESC stays for colours."""


def _decode(b: bytes | bytearray) -> str:
    return bytes(b).decode("utf-8", "replace").rstrip("\r").translate(_CONTROLS)


def split_line(line: str) -> tuple[str, str]:
    """``"VERB TEXT"`` -> (verb, text); a line without a space is a verb with empty text."""
    verb, _, text = line.strip().partition(" ")
    return verb, text.strip()


@dataclass
class Completion:
    """A terminal line: ``kind`` is done, err, relayed or resend."""

    kind: str
    text: str
    resend_secs: float = 0.0


def parse_completion(verb: str, text: str) -> Completion | None:
    kind = TERMINAL_VERBS.get(verb)
    if kind is None:
        return None
    c = Completion(kind, text)
    if kind == "resend":
        c.resend_secs = parse_resend(text)
    return c


def parse_resend(text: str) -> float:
    """``SECS[-REASON]`` -> seconds; anything unparsable is 0 (Ruby's ``to_i``)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)", text)
    if not m:
        return 0.0
    return min(float(m.group(1)), MAX_RESEND_SECS)


@dataclass
class DupRequest:
    due_secs: float
    dest: str


def parse_dup(text: str) -> DupRequest | None:
    """``DUE-X-DEST`` (X is ignored, as in RQ). None when malformed."""
    parts = text.split("-", 2)
    if len(parts) != 3 or not parts[2].strip():
        return None
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*$", parts[0])
    due = min(float(m.group(1)), MAX_RESEND_SECS) if m else 0.0
    return DupRequest(due, parts[2].strip())


def describe_exit(code: int) -> str:
    """A returncode as text: ``1``, or ``signal 9 (SIGKILL)`` for a negative code."""
    if code >= 0:
        return str(code)
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "?"
    return f"signal {-code} ({name})"


@dataclass
class Outcome:
    """Where a finished attempt sends the message."""

    state: State
    status: str
    count: int
    requeue_delay: float = 0.0  # when state is QUE: seconds until due
    params_update: dict[str, Any] | None = None  # keys set in the message's params on the way (kind http)


MAX_RESEND_TEXT = "HIT MAX RESEND COUNT - MOVING TO ERR"


def decide(completion: Completion | None, exit_code: int, *, count: int, max_count: int,
           last_status: str, retry_delay: float, timed_out: float | None = None,
           cancelled: bool = False) -> Outcome:
    """RQ's exit table (rq-spec 3.3) plus the fsq exit codes for scripts that write no verb.

    ``retry_delay`` is the backoff for exit 111; ``timed_out`` the timeout (seconds) if the
    daemon killed the job for running too long.
    """
    if cancelled:
        return Outcome(State.ERR, "cancelled", count)
    if timed_out is not None:
        return Outcome(State.ERR, f"TIMEOUT - killed after {timed_out:g} s (process group "
                       f"terminated; exit status was {describe_exit(exit_code)})", count)
    if completion is not None and completion.kind == "err":
        return Outcome(State.ERR, completion.text, count)
    if exit_code != 0:
        if completion is not None:
            return Outcome(State.ERR, "PROCESS EXITED IMPROPERLY - MOVING TO ERR - Completion was "
                           f"{completion.kind} but exit status was {describe_exit(exit_code)}", count)
        if exit_code == EXIT_TEMPFAIL:
            return _requeue(count, max_count, retry_delay,
                            f"exit 111 (temporary failure), retry in {retry_delay:.0f} s"
                            + (f" - {last_status}" if last_status else ""))
        what = "permanent failure" if exit_code == EXIT_PERMFAIL else "no completion written"
        return Outcome(State.ERR, "PROCESS EXITED IMPROPERLY - MOVING TO ERR - exit status was "
                       f"{describe_exit(exit_code)} ({what})" + (f" - {last_status}" if last_status else ""),
                       count)
    if completion is None:
        return Outcome(State.DONE, last_status, count)
    if completion.kind == "resend":
        return _requeue(count, max_count, completion.resend_secs, completion.text)
    return Outcome(State(completion.kind), completion.text, count)


def _requeue(count: int, max_count: int, delay: float, status: str) -> Outcome:
    new = count + 1
    if new >= max_count:
        return Outcome(State.ERR, MAX_RESEND_TEXT, new)
    return Outcome(State.QUE, status, new, requeue_delay=delay)
