"""Persistent workers in Python: a decorator over the worker protocol (docs/workers.md).

A queue of kind ``worker`` starts its script once and feeds it messages; in Python the
script is a module like this::

    import spoolq

    @spoolq.worker("thumbs")
    def thumb(job: spoolq.Job) -> str | None:
        src = job.attachment("photo.jpg")
        ...
        return "made 3 sizes"          # done, with this status (None: done, no text)
        # raise spoolq.Retry(60, "busy")  -> runs again in 60 s (count + 1, up to max_count)
        # raise spoolq.Fail("bad input")  -> err (any other exception too: err, its traceback
        #                                    goes to the worker's log)

    if __name__ == "__main__":
        spoolq.run_worker()

``run_worker()`` serves the queue the daemon named (``SPOOLQ_QUEUE``) with the function
registered for it, until the daemon closes the message pipe.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

Handler = Callable[["Job"], "str | None"]
_handlers: dict[str, Handler] = {}

IN_FD, OUT_FD = 4, 3


class Retry(Exception):  # noqa: N818 - what it asks for, as RQ's verb
    """Run the message again after ``seconds`` (RQ's ``resend``)."""

    def __init__(self, seconds: float = 0, reason: str = "") -> None:
        super().__init__(reason)
        self.seconds = seconds
        self.reason = reason


class Fail(Exception):  # noqa: N818
    """End the message in err with ``reason`` as its status."""


def worker(queue: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``queue``'s messages."""

    def register(fn: Handler) -> Handler:
        _handlers[queue] = fn
        return fn

    return register


def _line(text: str) -> str:
    return " ".join(str(text).split("\n"))


class Job:
    """One message, as a worker receives it."""

    def __init__(self, data: dict[str, Any], conn: _Conn) -> None:
        self.id: str = data["id"]
        self.queue: str = data.get("queue", "")
        self.full_id: str = data.get("full_id", "")
        self.count: int = int(data.get("count", 0))
        self.max_count: int = int(data.get("max_count", 0))
        self.dir = Path(data.get("dir", "."))
        self.msg: dict[str, Any] = data.get("msg", {})
        self._conn = conn

    def param(self, n: int) -> str:
        return str(self.msg.get(f"param{n}", ""))

    @property
    def param1(self) -> str:
        return self.param(1)

    @property
    def param2(self) -> str:
        return self.param(2)

    @property
    def param3(self) -> str:
        return self.param(3)

    @property
    def param4(self) -> str:
        return self.param(4)

    @property
    def params(self) -> dict[str, Any]:
        p = self.msg.get("params")
        return dict(p) if isinstance(p, dict) else {}

    def attachment(self, name: str) -> Path:
        """The path of an attachment (read it; it is the message's own copy)."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad attachment name {name!r}")
        return self.dir / "attach" / name

    def status(self, text: str) -> None:
        """Show ``text`` as the message's status while it runs."""
        self._conn.send(f"{self.id} run {_line(text)}")

    def dup(self, dest: str, due_secs: float = 0) -> str:
        """Copy the message to ``dest`` (a queue, or an http URL for the relay queue);
        returns the daemon's reply (``ok <full id>`` or ``fail <why>``)."""
        self._conn.send(f"{self.id} dup {_secs(due_secs)}-X-{_line(dest)}")
        return self._conn.reply(self.id)


class _Conn:
    def __init__(self, rfile: BinaryIO, out_fd: int) -> None:
        self.rfile = rfile
        self.out_fd = out_fd
        self.waiting: deque[dict[str, Any]] = deque()  # messages read while waiting for a reply

    def send(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "replace")
        while data:
            n = os.write(self.out_fd, data)
            data = data[n:]

    def _read(self) -> dict[str, Any] | None:
        raw = self.rfile.readline()
        if not raw:
            return None
        return dict(json.loads(raw))

    def next(self) -> dict[str, Any] | None:
        if self.waiting:
            return self.waiting.popleft()
        while True:
            d = self._read()
            if d is None or "reply" not in d:
                return d

    def reply(self, msg_id: str) -> str:
        while True:
            d = self._read()
            if d is None:
                return "fail the daemon closed the pipe"
            if "reply" in d:
                if d.get("id") == msg_id:
                    return str(d["reply"])
                continue
            self.waiting.append(d)


def _secs(seconds: float) -> str:
    """Seconds as the protocol reads them: digits and a point, never an exponent (``{:g}``
    wrote 3000000 as ``3e+06``, which the daemon reads as 3). Negative or not a number: 0;
    at most the daemon's cap (ten years)."""
    from .runner.protocol import MAX_RESEND_SECS

    s = float(seconds)
    s = min(s, MAX_RESEND_SECS) if math.isfinite(s) and s > 0 else (MAX_RESEND_SECS if s == math.inf else 0.0)
    return f"{s:.6f}".rstrip("0").rstrip(".") or "0"


def outcome_line(job_id: str, fn: Handler, job: Job) -> str:
    """Run ``fn`` on ``job``; the answer line it earns."""
    try:
        text = fn(job)
    except Retry as e:
        reason = f"-{_line(e.reason)}" if e.reason else ""
        return f"{job_id} resend {_secs(e.seconds)}{reason}"
    except Fail as e:
        return f"{job_id} err {_line(str(e))}"
    except Exception as e:  # noqa: BLE001 - any failure of the handler is the message's err
        traceback.print_exc()
        return f"{job_id} err {_line(f'{type(e).__name__}: {e}')}"
    return f"{job_id} done" + (f" {_line(text)}" if text else "")


def run_worker(queue: str | None = None) -> int:
    """Serve messages until the daemon closes the pipe; returns 0 (exit status)."""
    name = queue or os.environ.get("SPOOLQ_QUEUE", "")
    fn = _handlers.get(name)
    if fn is None:
        if len(_handlers) == 1 and not name:
            fn = next(iter(_handlers.values()))
        else:
            print(f"spoolq worker: no handler for queue {name!r} (registered: {sorted(_handlers)})",
                  file=sys.stderr)
            return 2
    if os.environ.get("SPOOLQ_WORKER_PROTOCOL") is None:
        print("spoolq worker: not started by spoolq (the daemon runs this for a queue of kind worker)",
              file=sys.stderr)
        return 2
    conn = _Conn(os.fdopen(IN_FD, "rb"), OUT_FD)
    while (data := conn.next()) is not None:
        job = Job(data, conn)
        conn.send(outcome_line(job.id, fn, job))
    return 0
