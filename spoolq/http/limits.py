"""Request bodies: size caps, and clients that stop sending.

Attachments arrive as ``multipart/form-data`` and are streamed to disk (uploads.py), so
they may be as large as the disk allows. Every other body (JSON messages and configs,
RQ's url-encoded forms) is parsed in memory, so it is refused with 413 past
:data:`MAX_BODY`: by ``Content-Length`` before a byte is read, or while it streams in when
the client sends it chunked. ``/login`` (public) takes :data:`~spoolq.http.auth.LOGIN_MAX_BODY`
bytes and no multipart at all.

A client that stops sending half-way through a body is cut off after
:data:`BODY_IDLE_TIMEOUT` seconds of silence (408), and one that trickles (a byte every
few seconds, never quite idle) once its body has taken more than :data:`BODY_GRACE`
seconds at under :data:`MIN_BODY_RATE` bytes a second on average (408): an upload over the
slowest real link keeps well above that; the rate is taken over each window of that
length, so a big first chunk buys no licence to trickle after it. The server's header
timeout (protocol.py) covers the part before the body.

Bodies without credentials (RQ's open routes) are parsed in memory too; all of them
together may hold at most :data:`ANON_BODY_BUDGET` bytes, so a thousand stalled 4 MiB
bodies cannot take gigabytes.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..model import MAX_SEND_BYTES
from .auth import LOGIN_MAX_BODY
from .errors import send_error
from .uploads import MAX_FIELD_BYTES

MAX_BODY = 2 * MAX_SEND_BYTES
"""Largest non-multipart request body: room for the biggest message, JSON-escaped."""
BODY_IDLE_TIMEOUT = 60.0
BODY_GRACE = 30.0
MIN_BODY_RATE = 1024.0
ANON_BODY_BUDGET = 64 * 1024 * 1024
"""Bytes of request bodies without credentials that may be held in memory at once, over
all connections (each may hold up to :data:`MAX_BODY`, or a form's fields): past it, 503."""


class BodyLimit:
    """ASGI middleware: 413 for a non-multipart body over :data:`MAX_BODY` bytes (any body
    over the small limit on ``/login``), 408 for a body that stalls or trickles, 503 when
    anonymous bodies in memory would pass :data:`ANON_BODY_BUDGET`."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY, idle_timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.idle_timeout = BODY_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.anon_bytes = 0  # bytes of anonymous bodies that may sit in memory right now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers", [])
        headers = dict(raw_headers)
        if sum(1 for name, _ in raw_headers if name == b"content-type") > 1:
            # This limit goes by one Content-Type and a route may read another: a JSON route
            # behind a multipart type had no cap at all (audit). A body has one type.
            await send_error(send, 400, "bad_request", "more than one Content-Type header",
                             [(b"connection", b"close")])
            return
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        limit: int | None = self.limit
        if scope.get("path") == "/login":
            limit = LOGIN_MAX_BODY
        elif multipart:
            limit = None  # streamed to disk by uploads.py, which caps its fields itself
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if limit is not None and declared > limit:
            await _too_large(send, limit)
            return
        anonymous = (scope.get("state") or {}).get("spoolq_principal") is None
        in_memory = limit if limit is not None else MAX_FIELD_BYTES  # what parsing may hold at most
        held = 0
        seen = 0
        started = refused = body_done = False
        window_start = time.monotonic()
        window_bytes = 0

        async def refuse(status: int, code: str, text: str, extra: list[tuple[bytes, bytes]]) -> Message:
            nonlocal refused
            refused = True
            if not started:
                await send_error(send, status, code, text, [(b"connection", b"close"), *extra])
            return {"type": "http.disconnect"}

        async def guarded_receive() -> Message:
            nonlocal seen, body_done, held, window_start, window_bytes
            if refused:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()  # after the body only a disconnect can come: no timer
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except TimeoutError:
                return await refuse(408, "timeout", f"the request body stalled for {self.idle_timeout:g} s", [])
            if message["type"] != "http.request":
                return message
            chunk = len(message.get("body", b""))
            seen += chunk
            body_done = not message.get("more_body", False)
            if limit is not None and seen > limit:
                # Answer now (the app may be mid-parse and would call it a 400), then tell
                # the app the client left; whatever it sends after is dropped.
                return await refuse(413, "too_large", f"request body over {limit} bytes; send files as "
                                    "multipart attachments", [])
            if anonymous and held < in_memory:
                more = min(chunk, in_memory - held)
                if self.anon_bytes + more > ANON_BODY_BUDGET:
                    return await refuse(503, "busy", "too many request bodies without credentials in "
                                        "flight; try again shortly", [(b"retry-after", b"1")])
                self.anon_bytes += more
                held += more
            # The rate over the last window, not since the start: a big first chunk buys no
            # licence to trickle afterwards.
            window_bytes += chunk
            now = time.monotonic()
            if not body_done and now - window_start >= BODY_GRACE:
                if window_bytes < MIN_BODY_RATE * (now - window_start):
                    return await refuse(408, "timeout", f"the request body arrives at under "
                                        f"{MIN_BODY_RATE:g} bytes/s", [])
                window_start, window_bytes = now, 0
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except Exception:
            if not refused:
                raise
        finally:
            self.anon_bytes -= held


async def _too_large(send: Send, limit: int) -> None:
    await send_error(send, 413, "too_large", f"request body over {limit} bytes; send files as multipart "
                     "attachments", [(b"connection", b"close")])
