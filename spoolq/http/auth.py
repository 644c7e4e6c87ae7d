"""Authentication (token) and cross-site protection, as one ASGI middleware.

- Without a token (loopback only, enforced by :func:`spoolq.http.server.start_http`) every
  request is allowed, but state-changing requests from another site are refused.
- With a token, a request must carry it: ``Authorization: Bearer <token>`` (API and RQ
  routes), HTTP basic auth with the token as password (RQ tools that put credentials in the
  URL), or the session cookie the UI's login form sets. ``/healthz``, ``/login`` and
  ``/static`` stay public.
- DNS rebinding: without a token, a request whose ``Host`` is not a loopback name or
  address (a page on another site that made its name resolve to 127.0.0.1) is refused with
  403 before anything else: the token is what protects a server on a real address.
- Cross-site: an unsafe method with an ``Origin`` (or ``Sec-Fetch-Site: cross-site``) that
  is not this server is refused with 403. Browsers always send these on cross-site form
  posts; curl and RQ's clients never do. The UI's forms also carry a double-submit CSRF
  token (:func:`check_csrf`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import is_loopback
from .errors import Forbidden, send_error

SESSION_COOKIE = "spoolq_session"
CSRF_COOKIE = "spoolq_csrf"
CSRF_FIELD = "csrf"
PUBLIC_PREFIXES = ("/healthz", "/login", "/static/", "/favicon.ico")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def session_value(token: str) -> str:
    """The session cookie's value: derived from the token, so it is valid exactly while the token is."""
    return hmac.new(token.encode(), b"spoolq-ui-session", hashlib.sha256).hexdigest()


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


def authorized(headers: dict[str, str], token: str) -> bool:
    auth = headers.get("authorization", "")
    scheme, _, cred = auth.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), token.encode()):
        return True
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            password = ""
        if password and hmac.compare_digest(password.encode(), token.encode()):
            return True
    cookie = _cookies(headers.get("cookie", "")).get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


def cross_site(headers: dict[str, str]) -> bool:
    """True for a request a browser sent on behalf of another site."""
    if headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = headers.get("origin")
    if not origin:
        return False
    if origin == "null":
        return True
    return urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


class AuthMiddleware:
    """Token check and cross-site refusal for every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        path: str = scope.get("path", "")
        if not self.token and not _loopback_host(headers.get("host", "")):
            await send_error(send, 403, Forbidden.code, "this server answers only to loopback names "
                             "(Host header refused)")
            return
        if scope.get("method", "GET") in UNSAFE_METHODS and cross_site(headers):
            await send_error(send, 403, Forbidden.code, "cross-site request refused")
            return
        if self.token and not path.startswith(PUBLIC_PREFIXES) and not authorized(headers, self.token):
            accept = headers.get("accept", "")
            if scope.get("method") == "GET" and "text/html" in accept and not path.startswith("/api/"):
                target = path + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
                await _send(send, 303, b"", [(b"location", f"/login?next={quote(target)}".encode())])
                return
            await send_error(send, 401, "unauthorized", "a token is required: Authorization: Bearer <token>",
                             [(b"www-authenticate", b'Bearer realm="spoolq"')])
            return
        await self.app(scope, receive, send)


def _loopback_host(host: str) -> bool:
    """A ``Host`` header naming this machine's loopback (any port); absent counts (HTTP/1.0)."""
    if not host:
        return True
    name = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
    return is_loopback(name)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def csrf_token(request: Request) -> str:
    """The CSRF token for this browser: the cookie's value, or a new one (set by the page)."""
    existing = request.cookies.get(CSRF_COOKIE)
    if existing and len(existing) >= 32:
        return existing
    token: str = getattr(request.state, "new_csrf", "") or secrets.token_urlsafe(32)
    request.state.new_csrf = token
    return token


def check_csrf(request: Request, submitted: str | None) -> None:
    """Double-submit check: the form's hidden field must equal the cookie."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not submitted or not hmac.compare_digest(cookie.encode(), submitted.encode()):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page and try again")


class SecurityHeaders:
    """Headers on every response: no MIME sniffing, and no framing by other sites
    (clickjacking). Files served from the spool add a sandbox CSP of their own (common.py)."""

    EXTRA = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
             (b"referrer-policy", b"same-origin")]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in self.EXTRA if k not in have)]}
            await send(message)

        await self.app(scope, receive, with_headers)
