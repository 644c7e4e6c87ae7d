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
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from ..client import Client
from ..errors import AttachmentNotFound, NotFound, QueueNotFound, SpoolqError
from ..model import State
from ..store import FsStore
from .errors import BadRequest

CHUNK = 256 * 1024
FINISHED_KEYS = ("done", "relayed", "err", "err_acked")
STATE_ORDER = ("prep", "que", "run", "done", "err", "relayed")


class LogNotFound(NotFound):
    code = "log_not_found"


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
    token: str | None = None
    upload_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    throughput: Throughput = field(default_factory=Throughput)
    stopping: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    poll_interval: float = 0.25
    events_interval: float = 1.0


def ctx_of(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def default_upload_dir(client: Client) -> Path:
    """Spooled uploads live on the spool's filesystem, so attaching them is a hard link."""
    if isinstance(client.store, FsStore):
        return client.store.root / ".uploads"
    return Path(tempfile.gettempdir()) / "spoolq-uploads"


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


def parse_state(value: str) -> State:
    try:
        return State(value)
    except ValueError:
        raise BadRequest(f"unknown state {value!r}: use one of {', '.join(State)}") from None


def log_path(client: Client, queue: str, msg_id: str, name: str = "stdio.log") -> Path:
    """The path of a message's job log (it moves with the message; resolve it per use)."""
    if name != "stdio.log" and not re.match(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$", name):
        raise LogNotFound(f"Message ID log '{name}' not found")
    return client.store.message_dir(queue, msg_id) / "job" / name


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
INLINE_TYPES = frozenset({"text/plain", "image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf",
                          "application/json"})
"""Attachment types a browser may show in place; anything else (HTML, SVG...) downloads."""


def _read_span(path: Path, fh: Any, start: int, length: int) -> Iterator[bytes]:
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


def file_response(request: Request, path: Path, *, media_type: str, missing: NotFound,
                  filename: str | None = None) -> Response:
    """Serve a file streamed in chunks, honouring a single ``Range: bytes=a-b`` (206/416).

    The file may be growing (a running job's log): its size is taken once, at open.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the streaming generator
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise missing from None
    size = os.fstat(fh.fileno()).st_size
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
        inverted = bool(m and m.group(1) and m.group(2) and int(m.group(2)) < int(m.group(1)))
        if m and (m.group(1) or m.group(2)) and not inverted:  # "9-3" is invalid: ignored (RFC 9110)
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start = max(0, size - int(m.group(2)))
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
    return StreamingResponse(_read_span(path, fh, start, length), status_code=status,
                             headers=headers, media_type=media_type)


def attachment_response(request: Request, client: Client, queue: str, msg_id: str, name: str) -> Response:
    """Download an attachment with its content type and length, streamed."""
    view = client.get(f"{queue}/{msg_id}")
    info = view.attachments.get(name)
    if info is None:
        raise AttachmentNotFound(f"Message ID attachment '{name}' not found")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if info.path:
        return file_response(request, Path(info.path), media_type=media_type, filename=name,
                             missing=AttachmentNotFound(f"Message ID attachment '{name}' not found"))
    stream = client.open_attachment(f"{queue}/{msg_id}", name)

    def chunks() -> Iterator[bytes]:
        with stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type=media_type,
                             headers={"Content-Length": str(info.size)})
