"""Who may do what over HTTP, decided before a byte of the request body is read.

The trust model (docs/security.md): whoever can change what a queue executes can run
commands as the daemon's user, so that always needs a credential, on loopback too.

- **Credentials**: the root's token (``Authorization: Bearer <token>``, or HTTP basic auth
  with the token as the password for RQ tools that keep credentials in the URL), or a UI
  session (a random id in an HttpOnly, SameSite=Strict cookie, made by signing in with the
  token or a one-time login link; kept in memory, revoked by "Sign out", gone at restart).
  Any valid credential may do everything.
- **Anonymous requests** get the server's :class:`AccessLevel` (``serve --anonymous``, default
  ``rq``), and only when the server listens on loopback and the ``Host`` header names
  loopback (a page whose name was rebound to 127.0.0.1 sends its own name: refused, 403).
  Off loopback anonymous requests get nothing but the public paths.
- **Public paths** (``/healthz``, ``/login``, ``/logout``, ``/static/*``) need nothing; ``/login``
  takes at most :data:`LOGIN_MAX_BODY` bytes.
- **Cross-site**: an unsafe method with an ``Origin`` (or ``Sec-Fetch-Site: cross-site``) that is
  not this server is refused (403). A request authenticated by the session cookie (which a
  browser attaches by itself) must also *prove* it is same-origin (``Origin`` or
  ``Sec-Fetch-Site``); the UI's forms carry a double-submit CSRF token too.
- **Guessing**: every wrong token is answered after a second, and a client address with
  more than :data:`FAILURES_ALLOWED` wrong tokens in :data:`FAILURE_WINDOW` seconds gets 429
  for credentialed requests, without their credential being checked at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import credentials
from ..config import is_loopback
from ..credentials import AccessLevel
from .errors import Forbidden, send_error

SESSION_COOKIE = "spoolq_session"
CSRF_COOKIE = "spoolq_csrf"
CSRF_FIELD = "csrf"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOGIN_MAX_BODY = 4096
"""The sign-in form (a token, a CSRF value, a path) fits in far less."""
SESSION_IDLE = 4 * 3600.0
SESSION_MAX_AGE = 86400.0
MAX_SESSIONS = 10_000
FAILURE_DELAY = 1.0
"""Seconds a wrong token waits for its answer."""
FAILURES_ALLOWED = 20
FAILURE_WINDOW = 60.0
LINK_TTL = 600.0
"""Seconds a one-time login link made on request (``spoolq login-url``) stays valid."""

# RQ's message routes (rq-spec 4): send, commit/delete, clone, run_now, attach, detach. Not
# RQ's queue administration (adminoper, ack_errs, restart), which shares their shape.
_RQ_MESSAGE_ROUTE = re.compile(r"^/q/[^/]+/(?!(?:adminoper|ack_errs|restart)$)[^/]+(?:/clone|/run_now|/attach/[^/]+)?$")


_RANK = {AccessLevel.NONE: 0, AccessLevel.READ: 1, AccessLevel.RQ: 2, AccessLevel.ALL: 3}
PUBLIC = -1


def required_rank(method: str, path: str) -> int:
    """The least :class:`AccessLevel` rank a request needs (:data:`PUBLIC` for public paths)."""
    if path.startswith("/static/") or path == "/favicon.ico":
        return PUBLIC
    if path == "/healthz" and method in ("GET", "HEAD"):
        return PUBLIC
    if path in ("/login", "/logout"):
        return PUBLIC
    if method in ("GET", "HEAD"):
        return _RANK[AccessLevel.READ]
    if method == "POST" and _RQ_MESSAGE_ROUTE.match(path):
        return _RANK[AccessLevel.RQ]
    return _RANK[AccessLevel.ALL]


# -- sessions, one-time links, the guessing throttle ------------------------------------------
class SessionStore:
    """UI sessions: random ids, kept in memory (a restart signs everyone out), revocable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[float, float]] = {}  # sha256(id) -> (created, last seen)
        self.clock = clock

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    def create(self) -> str:
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                self._prune(now)
                while len(self._sessions) >= MAX_SESSIONS:  # still full: drop the oldest
                    del self._sessions[min(self._sessions, key=lambda k: self._sessions[k][0])]
            self._sessions[self._key(sid)] = (now, now)
        return sid

    def valid(self, sid: str) -> bool:
        if not sid or len(sid) > 128:
            return False
        key = self._key(sid)
        now = self.clock()
        with self._lock:
            got = self._sessions.get(key)
            if got is None:
                return False
            created, seen = got
            if now - seen > SESSION_IDLE or now - created > SESSION_MAX_AGE:
                del self._sessions[key]
                return False
            self._sessions[key] = (created, now)
            return True

    def alive(self, sid: str) -> bool:
        """Is ``sid`` a session that neither ended nor expired? Unlike :meth:`valid`, a look
        that does not count as use (a stream held open is no sign of a person)."""
        now = self.clock()
        with self._lock:
            got = self._sessions.get(self._key(sid))
        return got is not None and now - got[1] <= SESSION_IDLE and now - got[0] <= SESSION_MAX_AGE

    def revoke(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(self._key(sid), None)

    def _prune(self, now: float) -> None:
        for k, (created, seen) in list(self._sessions.items()):
            if now - seen > SESSION_IDLE or now - created > SESSION_MAX_AGE:
                del self._sessions[k]


class LoginLinks:
    """One-time login codes: each signs one browser in, once, before it expires. Codes are
    minted here (``serve``'s link, ``POST /api/v1/login-links``) or, with ``root``, on disk
    by ``spoolq login-url`` (credentials.mint_login_code)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, root: str | None = None) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, float] = {}  # sha256(code) -> expiry
        self.clock = clock
        self.root = root

    def mint(self, ttl: float = LINK_TTL) -> str:
        code = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            for k, exp in list(self._codes.items()):
                if exp < now:
                    del self._codes[k]
            if len(self._codes) >= 1000:
                del self._codes[min(self._codes, key=self._codes.__getitem__)]
            self._codes[hashlib.sha256(code.encode()).hexdigest()] = now + ttl
        return code

    def redeem(self, code: str) -> bool:
        """True once for a valid, unexpired code; the code is spent either way."""
        if not code or len(code) > 128:
            return False
        with self._lock:
            exp = self._codes.pop(hashlib.sha256(code.encode()).hexdigest(), None)
        if exp is None and self.root is not None:
            return credentials.redeem_login_code(self.root, code)
        return exp is not None and exp >= self.clock()


MAX_THROTLED = 10_000
"""Client keys the throttle remembers at most (its memory stays bounded under a flood)."""


class FailureThrottle:
    """Wrong tokens per client key in a sliding window (guessing is slowed to a crawl).

    The key is the socket's address (uvicorn's proxy headers are off, so X-Forwarded-For
    cannot pick a fresh one) and whether the ``Host`` header is a loopback name: a web page
    that rebinds its DNS name to 127.0.0.1 guesses under its own name, so it cannot lock out
    scripts on this machine that say ``localhost``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._fails: dict[str, list[float]] = {}
        self.clock = clock

    def blocked(self, who: str) -> float:
        """Seconds until ``who`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            times = [t for t in self._fails.get(who, []) if now - t < FAILURE_WINDOW]
            if times:
                self._fails[who] = times
            else:
                self._fails.pop(who, None)
            return FAILURE_WINDOW - (now - times[0]) if len(times) >= FAILURES_ALLOWED else 0.0

    def failed(self, who: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._fails) > MAX_THROTLED:
                self._fails = {k: v for k, v in self._fails.items() if v and now - v[-1] < FAILURE_WINDOW}
            if len(self._fails) > MAX_THROTLED:  # a flood of addresses: keep the newest half
                keep = sorted(self._fails.items(), key=lambda kv: kv[1][-1])[len(self._fails) // 2:]
                self._fails = dict(keep)
            self._fails.setdefault(who, []).append(now)


@dataclass
class AuthPolicy:
    """The server's token, what anonymous requests may do, and its sessions and links."""

    token: str | None = None
    anonymous: AccessLevel = AccessLevel.RQ
    loopback_only: bool = True
    sessions: SessionStore = field(default_factory=SessionStore)
    links: LoginLinks = field(default_factory=LoginLinks)
    throttle: FailureThrottle = field(default_factory=FailureThrottle)
    secure_cookies: bool = False  # serve --secure-cookies: behind a TLS proxy, which this cannot see

    def secure(self, request: Request) -> bool:
        """Whether the UI's cookies are marked ``Secure``."""
        return self.secure_cookies or request.url.scheme == "https"

    @property
    def anonymous_level(self) -> AccessLevel:
        """Off loopback, anonymous requests get nothing whatever was configured."""
        return self.anonymous if self.loopback_only else AccessLevel.NONE

    def token_matches(self, candidate: str) -> bool:
        return self.token is not None and hmac.compare_digest(candidate.encode(), self.token.encode())


def principal(request: Request) -> str | None:
    """How the request authenticated: ``token``, ``session`` or None (anonymous)."""
    state = request.scope.get("state") or {}
    value = state.get("spoolq_principal")
    return value if isinstance(value, str) else None


def session_ended(request: Request) -> bool:
    """A request signed in by its session cookie whose session has ended since (signed
    out, expired): what a long stream checks as it goes, so that signing out ends it too."""
    if principal(request) != "session":
        return False
    return not policy_of(request).sessions.alive(request.cookies.get(SESSION_COOKIE, ""))


def policy_of(request: Request) -> AuthPolicy:
    pol: AuthPolicy = request.app.state.auth
    return pol


# -- the middleware ---------------------------------------------------------------------------
def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


def presented_token(headers: dict[str, str]) -> str | None:
    """The token a request presents in ``Authorization`` (bearer, or basic's password)."""
    auth = headers.get("authorization", "")
    if not auth:
        return None
    scheme, _, cred = auth.partition(" ")
    if scheme.lower() == "bearer":
        return cred.strip()
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return ""
        return password
    return ""  # a scheme we do not know is a wrong credential, not an absent one


def cross_site(headers: dict[str, str]) -> bool:
    """True for a request a browser sent on behalf of another site."""
    if headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = headers.get("origin")
    if not origin:
        return False
    if origin == "null":
        return True
    return _netloc(origin) != headers.get("host", "").lower()


def _netloc(url: str) -> str | None:
    """The lowercased host[:port] of ``url``; None when it is no URL at all (``http://[``)."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return None


def same_origin_proof(headers: dict[str, str]) -> bool:
    """A browser said this request comes from our own pages (it sends Origin on every POST)."""
    if headers.get("sec-fetch-site") == "same-origin":
        return True
    origin = headers.get("origin") or ""
    return origin not in ("", "null") and _netloc(origin) == headers.get("host", "").lower()


def _loopback_host(host: str) -> bool:
    """A ``Host`` header naming this machine's loopback (any port); absent counts (HTTP/1.0)."""
    if not host:
        return True
    name = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
    return is_loopback(name)


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


def throttle_key(scope: Scope, headers: dict[str, str]) -> str:
    """Whose wrong tokens these are, for :class:`FailureThrottle`: the socket's address, all
    of 127.0.0.0/8 and ::1 as one (a local guesser gets no fresh key from 127.0.0.2), and
    apart from them the same address under a Host that is no loopback name (one key for all
    such names, so a rebinding page cannot lock local scripts out, nor pick fresh keys)."""
    address = client_address(scope)
    key = "loopback" if is_loopback(address) else address
    if not _loopback_host(headers.get("host", "")):
        key += " (another Host)"
    return key


class AuthMiddleware:
    """Decides every HTTP request from its method, path and headers (module docstring)."""

    def __init__(self, app: ASGIApp, policy: AuthPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pol = self.policy
        headers = _headers(scope)
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        if method in UNSAFE_METHODS and cross_site(headers):
            await send_error(send, 403, Forbidden.code, "cross-site request refused")
            return
        need = required_rank(method, path)
        who: str | None = None
        token = presented_token(headers)
        if token is not None and need != PUBLIC:
            address = throttle_key(scope, headers)
            wait = pol.throttle.blocked(address)
            if wait:
                await send_error(send, 429, "too_many_failures",
                                 f"too many wrong tokens from {address}; try again in {wait:.0f} s",
                                 [(b"retry-after", str(int(wait) + 1).encode())])
                return
            if not pol.token_matches(token):
                pol.throttle.failed(address)
                await asyncio.sleep(FAILURE_DELAY)
                await send_error(send, 401, "unauthorized", "wrong token",
                                 [(b"www-authenticate", b'Bearer realm="spoolq"')])
                return
            who = "token"
        elif pol.sessions.valid(_cookies(headers.get("cookie", "")).get(SESSION_COOKIE, "")):
            if method in UNSAFE_METHODS and not same_origin_proof(headers):
                await send_error(send, 403, Forbidden.code, "a signed-in browser request must come from this "
                                 "server's own pages (no Origin header); use a bearer token from scripts")
                return
            who = "session"
        scope.setdefault("state", {})["spoolq_principal"] = who
        if who is not None or need == PUBLIC:
            await self.app(scope, receive, send)
            return
        if _RANK[pol.anonymous_level] < need:
            await self._refuse(scope, send, headers, path, method)
            return
        if pol.loopback_only and not _loopback_host(headers.get("host", "")):
            await send_error(send, 403, Forbidden.code, "this server answers anonymous requests only under "
                             "loopback names (Host header refused); present the token")
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, headers: dict[str, str], path: str, method: str) -> None:
        """401, or for a browser on a page or a form post, a redirect to the sign-in page."""
        browser = "text/html" in headers.get("accept", "") and not path.startswith("/api/")
        if browser and method in ("GET", "HEAD", "POST"):
            if method == "GET":
                target = path + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
            else:  # back to the page the form was on, when it is ours
                try:
                    ref = urlsplit(headers.get("referer", ""))
                    target = ref.path if ref.path.startswith("/") and ref.netloc == headers.get("host") else "/"
                except ValueError:
                    target = "/"  # no URL at all
            await _send(send, 303, b"", [(b"location", f"/login?next={quote(target)}".encode())])
            return
        await send_error(send, 401, "unauthorized", "a token is required: Authorization: Bearer <token> "
                         "(the daemon's token is in <root>/token)",
                         [(b"www-authenticate", b'Bearer realm="spoolq"')])


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


# -- CSRF ---------------------------------------------------------------------------------------
def csrf_token(request: Request) -> str:
    """The CSRF token for this browser: the cookie's value, or a new one (set by the page)."""
    existing = request.cookies.get(CSRF_COOKIE)
    if existing and 32 <= len(existing) <= 128:
        return existing
    token: str = getattr(request.state, "new_csrf", "") or secrets.token_urlsafe(32)
    request.state.new_csrf = token
    return token


def check_csrf(request: Request, submitted: str | None) -> None:
    """Double-submit check: the form's hidden field must equal the cookie."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not submitted or not hmac.compare_digest(cookie.encode(), submitted.encode()):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page and try again")


# -- headers on every response ------------------------------------------------------------------
UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
          "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")


class SecurityHeaders:
    """Headers on every response, errors from the other middlewares included: no MIME
    sniffing, no framing by other sites (clickjacking), and on HTML pages a CSP that allows
    only this server's own scripts and styles. Files served from the spool set a sandbox
    CSP of their own (common.py), which is kept."""

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
                raw = list(message.get("headers", []))
                have = {k.lower() for k, _ in raw}
                extra = [(k, v) for k, v in self.EXTRA if k not in have]
                ctype = dict((k.lower(), v) for k, v in raw).get(b"content-type", b"")
                if ctype.startswith(b"text/html") and b"content-security-policy" not in have:
                    extra.append((b"content-security-policy", UI_CSP.encode()))
                message = {**message, "headers": [*raw, *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
