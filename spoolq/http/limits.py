"""Request bodies that are not uploads are small: one middleware caps them.

Attachments arrive as ``multipart/form-data`` and are streamed to disk (uploads.py), so
they may be as large as the disk allows. Every other body (JSON messages and configs,
RQ's url-encoded forms) is parsed in memory, so it is refused with 413 past
:data:`MAX_BODY`: by ``Content-Length`` before a byte is read, or while it streams in when
the client sends it chunked.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..model import MAX_MSG_BYTES
from .errors import send_error

MAX_BODY = 4 * MAX_MSG_BYTES
"""Largest non-multipart request body: room for the biggest message, JSON-escaped."""


class BodyLimit:
    """ASGI middleware: 413 for a non-multipart body over :data:`MAX_BODY` bytes."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            await self.app(scope, receive, send)
            return
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > self.limit:
            await _too_large(send, self.limit)
            return
        seen = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Answer now (the app may be mid-parse and would call it a 400), then tell
                    # the app the client left; whatever it sends after is dropped.
                    refused = True
                    if not started:
                        await _too_large(send, self.limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise


async def _too_large(send: Send, limit: int) -> None:
    await send_error(send, 413, "too_large", f"request body over {limit} bytes; send files as multipart "
                     "attachments", [(b"connection", b"close")])
