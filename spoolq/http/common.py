"""What the API, the RQ routes and the UI share: the app context, summaries, file responses."""

from __future__ import annotations

import mimetypes
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Annotated, Any, BinaryIO

from fastapi import Path, Request
from starlette.responses import Response, StreamingResponse

from ..client import Client
from ..errors import QueueNotFound, SpoolqError
from ..events import EventBus
from ..ids import MessageRef
from .auth import AuthPolicy
from .operations import Operations

CHUNK = 256 * 1024

# Path parameters with the patterns the store enforces, so the OpenAPI document says what a
# valid name is (ids.py holds the same rules; a mismatch is a 400 before any handler runs).
QueueName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", max_length=128,
                                description="a queue name: 1-128 of A-Z a-z 0-9 _ -, not starting with _ or -")]
MsgId = Annotated[str, Path(pattern=r"^[0-9]{8}\.[0-9]{4}\.[0-9]{2}\.[0-9]{3}\.[0-9]{1,20}$", max_length=48,
                            description="a message id, YYYYmmdd.HHMM.SS.mmm.N (UTC)")]
AttachName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._+,=@-]{0,199}$", max_length=200,
                                 description="an attachment name: no dot-files, separators or spaces")]
FINISHED_KEYS = ("done", "relayed", "err", "err_acked")
STATE_ORDER = ("prep", "que", "run", "done", "err", "relayed")


class Throughput:
    """Finished messages per minute per queue, from samples of the counts (no daemon needed).

    Samples are taken whenever counts are read (dashboard, events stream, API), at most
    one per queue every few seconds, and kept for :attr:`window` seconds.
    """

    def __init__(self, window: float = 600.0, min_gap: float = 2.0) -> None:
        self.window = window
        self.min_gap = min_gap
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def record(self, queue: str, counts: dict[str, int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        total = sum(counts.get(k, 0) for k in FINISHED_KEYS)
        with self._lock:
            dq = self._samples.setdefault(queue, deque())
            if dq and now - dq[-1][0] < self.min_gap:
                return
            dq.append((now, total))
            while dq and now - dq[0][0] > self.window:
                dq.popleft()

    def per_minute(self, queue: str) -> float | None:
        """None until two samples at least ten seconds apart exist."""
        with self._lock:
            dq = self._samples.get(queue)
            if not dq or len(dq) < 2 or dq[-1][0] - dq[0][0] < 10:
                return None
            (t0, n0), (t1, n1) = dq[0], dq[-1]
        return max(0, n1 - n0) * 60.0 / (t1 - t0)


@dataclass
class AppContext:
    """Everything a request handler needs, held on ``app.state.ctx`` (no globals)."""

    client: Client
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    upload_dir: FsPath = field(default_factory=lambda: FsPath(tempfile.gettempdir()))
    throughput: Throughput = field(default_factory=Throughput)
    stopping: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    poll_interval: float = 0.25
    events_interval: float = 1.0
    max_streams: int = 100
    home: FsPath | None = None  # the daemon's home: RQ's router rules file is looked for there
    events: EventBus | None = None  # the daemon's events (spoolq/events.py), when it runs in this process
    streams: StreamSlots = field(init=False)
    operations: Operations = field(init=False)

    def __post_init__(self) -> None:
        self.streams = StreamSlots(self.max_streams)
        self.operations = Operations(self.client)


MAX_STREAMS = 100
"""SSE streams open at once; each polls while it lives, so a thousand of them slowed every
other request (median API latency 0.97 s in an audit). More get 503 with Retry-After."""


class StreamSlots:
    """A counter of open SSE streams with a ceiling (thread-safe: handlers run in threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    RESERVED_FRACTION = 0.2
    """Of the slots, this share is kept for callers with credentials: anonymous readers
    filling every slot cannot lock the owner's UI out of its live views."""

    def take(self, credentialed: bool = True) -> bool:
        with self._lock:
            ceiling = self.limit if credentialed else self.limit - max(1, int(self.limit * self.RESERVED_FRACTION))
            if self.open >= ceiling:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open = max(0, self.open - 1)


def local_target(raw: str | None, default: str) -> str:
    """A redirect target a client asked for (RQ's ``back``), if it is a path on this server;
    else ``default``. ``//host`` and any backslash (browsers read ``/\\host`` as ``//host``)
    would send the browser to another site."""
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return default


def ctx_of(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def queue_summary(ctx: AppContext, name: str, *, with_config: bool = False) -> dict[str, Any]:
    """A queue's name, admin status, counts per state and recent throughput."""
    client = ctx.client
    counts = client.counts(name)
    ctx.throughput.record(name, counts)
    status, admin, why = client.status_parts(name)
    out: dict[str, Any] = {
        "name": name,
        "status": status,
        "admin": str(admin),
        "counts": counts,
        "done_per_min": ctx.throughput.per_minute(name),
    }
    if why is not None:
        out["script_error"] = why
    if with_config:
        out["config"] = client.queue_config(name).to_dict()
    return out


def all_summaries(ctx: AppContext) -> list[dict[str, Any]]:
    out = []
    for name in ctx.client.queues():
        try:
            out.append(queue_summary(ctx, name))
        except QueueNotFound:
            continue  # deleted while we listed
        except SpoolqError as e:
            out.append({"name": name, "status": "BROKEN", "counts": {}, "done_per_min": None,
                        "problem": str(e)})
    return out



def open_log(client: Client, queue: str, msg_id: str, name: str = "stdio.log") -> BinaryIO:
    """A message's job log (``job/<name>``), opened without following symbolic links."""
    return client.open_log(MessageRef(queue, msg_id), name)


_RANGE_RE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
RANGE_DIGITS = 18
"""Longer numbers in a Range header are past any file: no int() of 4,300 digits (ValueError)."""
INLINE_TYPES = frozenset({"text/plain", "image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf",
                          "application/json"})
"""Attachment types a browser may show in place; anything else (HTML, SVG...) downloads."""


def _read_span(fh: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    try:
        fh.seek(start)
        left = length
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        fh.close()


def _byte_pos(digits: str, size: int) -> int:
    """A Range position; anything longer than RANGE_DIGITS digits lies past the end."""
    return int(digits) if len(digits) <= RANGE_DIGITS else size + 1


def file_response(request: Request, fh: BinaryIO, *, media_type: str, filename: str | None = None) -> Response:
    """Serve an open file streamed in chunks, honouring a single ``Range: bytes=a-b`` (206/416).

    The file may be growing (a running job's log): its size is taken once, here. The
    response closes ``fh``.
    """
    size = fh.seek(0, os.SEEK_END)  # works for files and in-memory streams alike
    # Whatever a script wrote or a user uploaded is served inert: a sandbox with no scripts
    # (nosniff comes with every response, auth.SecurityHeaders), and a download (not a page
    # on our origin) unless it is a plain type.
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-cache",
               "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"}
    if filename:
        how = "inline" if media_type.split(";")[0] in INLINE_TYPES else "attachment"
        headers["Content-Disposition"] = f"{how}; filename=\"{filename}\""
    rng = request.headers.get("range")
    start, end, status = 0, size - 1, 200
    if rng:
        m = _RANGE_RE.match(rng.strip())
        first, last = (m.group(1), m.group(2)) if m else ("", "")
        inverted = bool(first and last and _byte_pos(last, size) < _byte_pos(first, size))
        if m and (first or last) and not inverted:  # "9-3" is invalid: ignored (RFC 9110)
            if first:
                start = _byte_pos(first, size)
                end = min(_byte_pos(last, size), size - 1) if last else size - 1
            else:  # suffix range: the last N bytes
                start = max(0, size - _byte_pos(last, size))
            if start >= size or end < start:
                fh.close()
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}",
                                                          "Accept-Ranges": "bytes"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        # A malformed or multi-range header is ignored: the whole file, as RFC 9110 allows.
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        fh.close()
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(_read_span(fh, start, length), status_code=status,
                             headers=headers, media_type=media_type)


def attachment_response(request: Request, client: Client, queue: str, msg_id: str, name: str) -> Response:
    """Download an attachment with its content type and length, streamed (Range too)."""
    fh = client.open_attachment(f"{queue}/{msg_id}", name)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return file_response(request, fh, media_type=media_type, filename=name)
