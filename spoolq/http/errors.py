"""The one place that maps spoolq's exception tree to HTTP statuses, and the error shape.

Every error answer of the JSON API is ``{"error": {"code": ..., "message": ...}}`` where
``code`` is the exception's stable ``code``. RQ's routes answer in RQ's own formats
(``["fail", reason]`` or a plain-text ``"404 - ..."``) but take their status from here too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi.responses import JSONResponse

from .. import errors


class HttpConfigError(errors.InvalidInput):
    """The HTTP server was asked to run in a way that is not allowed (e.g. no token off loopback)."""

    code = "http_config"


AddressInUse = errors.AddressInUse


class BadRequest(errors.InvalidInput):
    """A request that is malformed at the HTTP level (bad form, bad JSON, bad Range)."""

    code = "bad_request"


class Forbidden(errors.SpoolqError):
    """A cross-site or CSRF-unsafe request."""

    code = "forbidden"


class ServiceBusy(errors.SpoolqError):
    """A server-wide limit is reached (open live streams); try again later."""

    code = "busy"


# Most specific first: the first class the error is an instance of decides.
_STATUS_BY_CLASS: list[tuple[type[errors.SpoolqError], int]] = [
    (errors.TooLarge, 413),
    (errors.InvalidInput, 400),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.QueueDown, 503),
    (errors.DiskFull, 507),
    (errors.CorruptMessage, 500),
    (errors.StorageError, 500),
    (errors.WaitTimeout, 504),
    (errors.DaemonRunning, 409),
    (errors.Unauthorized, 401),
    (Forbidden, 403),
    (ServiceBusy, 503),
    (errors.AddressInUse, 500),
]


def status_for(exc: BaseException) -> int:
    """The HTTP status for an exception; 500 only for what is not a :class:`SpoolqError`."""
    for cls, status in _STATUS_BY_CLASS:
        if isinstance(exc, cls):
            return status
    return 400 if isinstance(exc, errors.SpoolqError) else 500


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON API's answer for an exception."""
    status = status_for(exc)
    if isinstance(exc, errors.SpoolqError):
        body = error_body(exc.code, exc.message)
    else:
        body = error_body("internal", "internal error; see the daemon log")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if isinstance(exc, ServiceBusy):
        headers = {"Retry-After": "5"}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_text(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic's/FastAPI's validation errors as ``field: problem`` clauses (at most five;
    the ``body`` prefix of a location is dropped): one line, not pydantic's own text."""
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


async def send_error(send: Any, status: int, code: str, message: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with the JSON error shape straight from ASGI middleware (before any route)."""
    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
