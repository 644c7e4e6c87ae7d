"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive`` seconds, but a
client that connects and then sends its headers a byte at a time (or never) holds a
connection forever: 200 such connections were held open in an audit. Here every
connection must deliver a complete request head within :data:`HEADER_TIMEOUT` seconds
of its first byte (or of the connection, or of the previous response), else it is closed.

uvicorn answers requests over its concurrency limit itself, with a bare 503; here that
answer is spoolq's JSON error with the security headers every other answer has.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from .auth import SecurityHeaders
from .errors import error_body

HEADER_TIMEOUT = 10.0


class GuardedH11Protocol(H11Protocol):
    """H11Protocol + a request-head deadline (module docstring)."""

    header_timeout = HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # IDLE: h11 has not seen a whole request head yet (a new connection, or between
        # keep-alive requests); anything else means the head arrived.
        if self.conn.their_state is h11.IDLE:
            if self._head_timer is None:
                self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head, on a kept-alive connection

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


_BUSY = json.dumps(error_body("busy", "too many connections; try again shortly")).encode()


async def _service_unavailable(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_BUSY)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"1"), *SecurityHeaders.EXTRA]})
    await send({"type": "http.response.body", "body": _BUSY, "more_body": False})


# uvicorn looks the function up in its h11 module at each request over the limit.
h11_impl.service_unavailable = _service_unavailable
