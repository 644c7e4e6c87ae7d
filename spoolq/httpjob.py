"""strings-queue's HTTP jobs (docs/http-jobs.md): what a message of a ``kind: http`` queue
asks for, the request itself, and the outcome of its answer. Pure functions and the
request: the daemon's side (threads, leases, finishing) is :mod:`spoolq.daemon.httpjobs`.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
import httpx

from .model import Message, QueueConfig, State
from .runner.protocol import MAX_RESEND_TEXT, Outcome

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 10
DEFAULT_DELAY = 60.0
"""strings-queue's column defaults: ``timeout_secs``, ``remaining_retries``, ``retry_delay_secs``."""
MAX_TIMEOUT = 3600.0
MAX_DELAY = 365 * 86400
MAX_RETRIES = 1_000_000
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
TEMPORARY = (503, 429)
"""Status codes that mean "try again later" (strings-queue: 503 only)."""
BODY_KEPT = 64 * 1024
"""Bytes of an answer read and written to the message's log; the rest is not read."""
RESPONSE_KEPT = 4096
"""Characters of the answer's body kept in the message's ``last_response`` param."""
STATUS_KEPT = 200
NOT_FROM_MESSAGE = frozenset({"authorization", "proxy-authorization", "host", "content-length",
                              "transfer-encoding", "connection", "accept-encoding", "x-bitlancer-job-id",
                              "x-spoolq-message"})
"""Request headers a message may not set: credentials come from the queue's config, the rest
are the request's framing or spoolq's own (answers come uncompressed: a small gzip body must
not inflate to hundreds of MiB in the daemon)."""
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
"""A header name (RFC 9110's token)."""
VALUE_RE = re.compile(r"[\t\x20-\x7e]*", re.ASCII)
DIGITS_RE = re.compile(r"[0-9]{1,10}", re.ASCII)
JOB_ID_RE = re.compile(r"[0-9]{1,18}", re.ASCII)
ENCODED_PATH_RE = re.compile(r"%(2e|2f|5c|25|00)|[\\;\x00]", re.IGNORECASE)
"""In a path compared with ``http_allow``: an encoded dot, slash, backslash, percent or NUL,
a backslash, or a semicolon (``..;`` is ``..`` to some servers): never under a prefix."""
HEX_RE = re.compile(r"%[0-9a-fA-F]{2}")
KEPT_HEADERS = ("retry-after", "x-bitlancer-retry-delay-secs", "x-bitlancer-url")
WRITE_PIECE = 64 * 1024


@dataclass(frozen=True)
class HttpJob:
    """A message's request, checked."""

    method: str
    url: str
    body: bytes
    headers: dict[str, str]
    timeout: float
    retry_delay: float
    remaining: int
    job_id: str  # x-bitlancer-job-id: the SQL intake's row id, else the message id


def _number(v: Any, key: str, lo: float, hi: float) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{key} must be a number, got {v!r}")
    try:
        n = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be a number, got {v!r}") from None
    if not lo <= n <= hi:  # NaN fails too
        raise ValueError(f"{key} must be {lo:g}-{hi:g}, got {v!r}")
    return n


def _parse(url: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise ValueError(f"{url!r} is not a URL: {e}") from None


def check_prefix(prefix: Any) -> httpx.URL:
    """An ``http_allow`` prefix: an http(s) URL with a host, no user:password, no query or
    fragment, no encoded dot, slash or backslash in its path (ValueError otherwise)."""
    if not isinstance(prefix, str) or not prefix.lower().startswith(("http://", "https://")):
        raise ValueError(f"http_allow: {prefix!r} is not an http:// or https:// URL prefix")
    p = _parse(prefix)
    if (not p.host or p.userinfo or "?" in prefix or "#" in prefix
            or ENCODED_PATH_RE.search(p.raw_path.decode("ascii"))):
        raise ValueError(f"http_allow: {prefix!r} must be scheme://host[:port][/path], with no user, "
                         "query, fragment or encoded dot or slash")
    return p


def check_url(url: Any, allow: list[str]) -> httpx.URL:
    """``url`` as a URL spoolq will call: http or https, a host, no user:password (credentials
    come from the queue), and under one of ``allow``'s prefixes when it has any."""
    if not isinstance(url, str) or not url:
        raise ValueError("url is required (an http:// or https:// URL)")
    u = _parse(url)
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"url {url!r}: only http:// and https:// URLs with a host are called")
    if u.userinfo:
        raise ValueError("url: no user:password in the URL (credentials come from the queue's http_auth)")
    if allow and not allowed(u, allow):
        raise ValueError(f"url {url!r} is not under the queue's http_allow prefixes")
    return u


def allowed(u: httpx.URL, allow: list[str]) -> bool:
    """Is ``u`` under one of the prefixes? Compared on the parsed scheme, host and port, and
    on the path as it is sent, segment by segment (``/api`` allows ``/api`` and ``/api/x``,
    not ``/api-admin``); a path with an encoded dot, slash or backslash is never allowed (a
    server that decodes it would serve another path than the one compared)."""
    path = _hex_upper(u.raw_path.decode("ascii").split("?", 1)[0])
    if ENCODED_PATH_RE.search(path) or "/../" in f"{path}/" or "/./" in f"{path}/":
        return False
    for prefix in allow:
        try:
            p = check_prefix(prefix)
        except ValueError:
            continue
        if (u.scheme, u.host, u.port) != (p.scheme, p.host, p.port):
            continue
        pp = _hex_upper(p.raw_path.decode("ascii")) or "/"
        if path == pp or path.startswith(pp if pp.endswith("/") else pp + "/"):
            return True
    return False


def _hex_upper(path: str) -> str:
    """Percent-escapes in one case (``%c3%a9`` and ``%C3%A9`` are the same path)."""
    return HEX_RE.sub(lambda m: m.group().upper(), path)


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def parse_job(msg: Message, cfg: QueueConfig) -> HttpJob:
    """The request a message asks for (ValueError says what is wrong with it)."""
    p = msg.params
    method = p.get("method", p.get("http_method"))
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    url = check_url(p.get("url"), cfg.http_allow)
    body = p.get("body")
    if body is None:
        body = ""
    if not isinstance(body, str):
        raise ValueError("body must be a string")
    headers = p.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValueError("headers must be an object of name: value strings")
    for k, v in headers.items():
        if k.lower() in NOT_FROM_MESSAGE:
            raise ValueError(f"header {k} cannot come from a message")
        if not TOKEN_RE.fullmatch(k) or not VALUE_RE.fullmatch(v):
            raise ValueError(f"header {k!r}: the name must be a token and the value printable ASCII")
    timeout = _number(p.get("timeout_secs", DEFAULT_TIMEOUT), "timeout_secs", 0.001, MAX_TIMEOUT)
    delay = _number(p.get("retry_delay_secs", DEFAULT_DELAY), "retry_delay_secs", 0, MAX_DELAY)
    remaining = _number(p.get("remaining_retries", DEFAULT_RETRIES), "remaining_retries", 0, MAX_RETRIES)
    if remaining != int(remaining):
        raise ValueError("remaining_retries must be a whole number")
    row = p.get("http_job_id")
    job_id = row if isinstance(row, str) and JOB_ID_RE.fullmatch(row) else msg.msg_id
    return HttpJob(method.upper(), str(url), body.encode(), dict(headers), timeout, delay, int(remaining), job_id)


# -- the request -------------------------------------------------------------------------
class Guard:
    """One request's hard deadline and abort switch, shared by its thread and the daemon.

    The thread's network stream (:class:`GuardedStream`) asks the guard before every read
    and write: each gets at most the time left (so a server that trickles a byte at a time
    cannot stretch a request past ``timeout_secs``), and none starts once the request is
    aborted. :meth:`abort` (the daemon's thread: a cancel, a lost lease, the stop) shuts the
    socket down, which wakes a read in progress at once. Once the thread has read what it
    wants (:meth:`release`) the connection may go back to the pool for another request, and
    an abort no longer touches it."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic()
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.aborted = False
        self.released = False

    def check(self, sock: socket.socket | None, timeout: float | None, exc: type[Exception]) -> float:
        with self.lock:
            if self.aborted:
                raise exc("the request was abandoned")
            if not self.released:
                self.sock = sock
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise exc("the job's timeout_secs ran out")
        return left if timeout is None else min(timeout, left)

    def release(self) -> None:
        with self.lock:
            self.released, self.sock = True, None

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            if self.sock is not None and not self.released:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_current = threading.local()  # .guard: the Guard of the request this thread makes


class GuardedStream(httpcore.NetworkStream):
    """httpcore's socket stream, asking the current request's Guard before each read and write."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def _left(self, timeout: float | None, exc: type[Exception]) -> float | None:
        g: Guard | None = getattr(_current, "guard", None)
        if g is None:
            return timeout
        return g.check(self._inner.get_extra_info("socket"), timeout, exc)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # In pieces, each given the time left: a peer that reads slowly cannot stretch one
        # write of a big body past the deadline (httpcore gives every send() the whole timeout).
        view = memoryview(buffer)
        for i in range(0, len(view), WRITE_PIECE):
            self._inner.write(bytes(view[i:i + WRITE_PIECE]), self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return GuardedStream(self._inner.start_tls(ssl_context, server_hostname,
                                                   self._left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class GuardedBackend(httpcore.SyncBackend):
    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        g: Guard | None = getattr(_current, "guard", None)
        if g is not None:
            timeout = g.check(None, timeout, httpcore.ConnectTimeout)
        return GuardedStream(super().connect_tcp(host, port, timeout, local_address, socket_options))


def make_client(cfg: QueueConfig) -> httpx.Client:
    """A keep-alive client for one queue: no limit on connections (the daemon bounds the
    requests), no proxies or certificates from the environment, no redirects followed, and
    every socket guarded (:class:`Guard`)."""
    n = max(cfg.num_workers, 1)
    transport = httpx.HTTPTransport(verify=cfg.http_verify, trust_env=False,
                                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=n))
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("this httpx/httpcore cannot take spoolq's guarded sockets")
    pool._network_backend = GuardedBackend()
    return httpx.Client(transport=transport, follow_redirects=False, trust_env=False)


@dataclass
class Response:
    """What a request thread saw."""

    started: float
    status: int | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False
    error: str = ""
    not_called: bool = False  # it never reached the server (no connection from the pool)
    took: float = 0.0


def perform(client: httpx.Client, job: HttpJob, extra: dict[str, str], auth: tuple[str, str] | None,
            guard: Guard) -> Response:
    """Make the request (on a pool thread), within ``guard``'s deadline: at most BODY_KEPT
    bytes of the answer are read."""
    res = Response(started=time.time())
    t0 = time.monotonic()
    _current.guard = guard
    try:
        left = max(0.001, guard.deadline - t0)
        with client.stream(job.method, job.url, content=job.body or None,
                           headers={**job.headers, "Accept-Encoding": "identity", **extra}, auth=auth,
                           timeout=httpx.Timeout(left)) as r:
            try:
                res.status = r.status_code
                res.headers = {k: r.headers[k] for k in KEPT_HEADERS if k in r.headers}
                got = bytearray()
                # r.stream, not r.iter_raw(): iter_raw closes the response when the body ends,
                # which gives the connection back to the pool while this guard still holds its
                # socket; an abort then could cut another request's. It goes back when the
                # `with` closes the response, after release().
                stream = r.stream
                assert isinstance(stream, httpx.SyncByteStream)
                for chunk in stream:
                    got += chunk
                    if len(got) >= BODY_KEPT:
                        break
                res.body = bytes(got[:BODY_KEPT])
            finally:
                guard.release()
    except httpx.PoolTimeout:
        res.status, res.not_called = None, True
    except httpx.TimeoutException:
        res.timed_out, res.status = True, None
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
        res.status = None
        res.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        guard.release()
        _current.guard = None
    res.took = time.monotonic() - t0
    return res


# -- the outcome -------------------------------------------------------------------------
def _seconds(value: str | None) -> int | None:
    """A header's whole number of seconds (ASCII digits, at most a year), or None."""
    v = (value or "").strip()
    return min(int(v), MAX_DELAY) if DIGITS_RE.fullmatch(v) else None


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (seconds, or an HTTP date), or None."""
    s = _seconds(value)
    if s is not None or not value:
        return s
    try:
        return float(min(MAX_DELAY, max(0.0, parsedate_to_datetime(value.strip()).timestamp() - now)))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def text(data: bytes) -> str:
    """An answer's bytes as text that every store keeps: UTF-8 (invalid bytes replaced) with
    no NUL (PostgreSQL's text refuses one)."""
    return data.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _first_line(body: str) -> str:
    line = body.strip().split("\n", 1)[0].strip()
    return line[:STATUS_KEPT] + ("..." if len(line) > STATUS_KEPT else "")


def decide(job: HttpJob, res: Response, cfg: QueueConfig, msg: Message, now: float) -> tuple[Outcome, str]:
    """The outcome of a request and its log line (strings-queue's words)."""
    upd: dict[str, Any] = {"last_started_at": res.started, "last_finished_at": now}
    if "retries" not in msg.params:
        upd["retries"] = job.remaining  # what `spoolq retry` gives back (client.py)
    if res.not_called:
        return (Outcome(State.QUE, "not called: no connection free; trying again", msg.count, requeue_delay=1.0),
                "Job not called: no connection free")
    delay: float = job.retry_delay
    body = text(res.body)
    if res.status is not None:
        upd["last_response"] = body[:RESPONSE_KEPT]
        upd["status_code"] = res.status
        hdr = _seconds(res.headers.get("x-bitlancer-retry-delay-secs"))
        if hdr is not None:
            delay = upd["retry_delay_secs"] = hdr
        moved = _moved(res.headers.get("x-bitlancer-url"), job, cfg)
        if moved is not None:
            upd["url"] = moved
        ok = res.status in cfg.http_ok if cfg.http_ok else 200 <= res.status < 300
        if ok:
            upd["result_code"] = 0
            status = f"HTTP {res.status}" + (f": {_first_line(body)}" if body.strip() else "")
            # A success rewrites the params only where a row mirrors them (the SQL intake's
            # jobs) or an earlier failure wrote them: elsewhere the status and the log say it
            # all, and the filesystem store then finishes without rewriting msg (one durable
            # write fewer per job: 1.7 x the rate, bench/README.md).
            keep = upd if ({"http_job_id", "result_code"} & set(msg.params) or "url" in upd
                           or "retry_delay_secs" in upd) else None
            return Outcome(State.DONE, status, msg.count, params_update=keep), f"Job succeeded: {body}"
    remaining = job.remaining - 1
    upd["remaining_retries"] = remaining
    if res.status is None or res.status in TEMPORARY:
        upd["result_code"] = 2
        error = text(res.error.encode())
        if res.timed_out:
            what, line = "timeout", "Job failed due to timeout"
        elif res.status is None:
            what, line = error, f"Job failed temporarily: {error}"
        else:
            what, line = f"HTTP {res.status}", f"Job failed temporarily: {body}"
            ra = retry_after(res.headers.get("retry-after"), time.time())
            if ra is not None:
                delay = ra
        if remaining <= 0:
            return Outcome(State.ERR, f"{what} - no retries left", msg.count + 1, params_update=upd), line
        if msg.count + 1 >= msg.max_count:
            return Outcome(State.ERR, f"{MAX_RESEND_TEXT} ({what})", msg.count + 1, params_update=upd), line
        return (Outcome(State.QUE, f"{what} - retry in {delay:g} s ({remaining} left)", msg.count + 1,
                        requeue_delay=float(delay), params_update=upd), line)
    upd["result_code"] = 1
    status = f"HTTP {res.status}" + (f": {_first_line(body)}" if body.strip() else "")
    return Outcome(State.ERR, status, msg.count, params_update=upd), f"Job failed permanently: {body}"


def _moved(value: str | None, job: HttpJob, cfg: QueueConfig) -> str | None:
    """The url an ``x-bitlancer-url`` header moves the job to: one the queue may call and, when
    the queue has no ``http_allow``, on the job's own scheme, host and port (an answer must not
    steer the daemon to another host, e.g. a metadata service). None: not taken."""
    if not value:
        return None
    try:
        new = check_url(value, cfg.http_allow)
    except ValueError:
        return None
    if not cfg.http_allow and not same_origin(new, httpx.URL(job.url)):
        return None
    return str(new)


def not_called(why: str) -> dict[str, Any]:
    """The params of a job that ends without a request (invalid, no retries left, cancelled):
    a permanent failure, as a row of the SQL intake shows it."""
    return {"result_code": 1, "last_response": why, "last_finished_at": time.time()}


def log_line(job_id: str, line: str, when: float | None = None) -> bytes:
    """An entry of the message's log as strings-queue logged it: ``<asctime>  [JOBID id] text``.
    The further lines of a text that spans lines begin with a tab, so no answer can forge an
    entry of its own (``spoolq.http_job_log`` strips the tab again)."""
    t = time.time() if when is None else when
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t * 1000) % 1000:03d}"
    entry = f"{stamp}  [JOBID {job_id}] {line}".replace("\x00", "\ufffd").replace("\n", "\n\t")
    return (entry + "\n").encode("utf-8", "replace")


def final_row(msg: Message, outcome: Outcome) -> Outcome:
    """``outcome``, closing the SQL intake's row of a job whatever ended it (a crash's
    recovery, a cancel while the daemon was down): a final outcome without a ``result_code``
    gets one (2 when a crash loop used up the tries, else 1), so the row never stays
    "not finished" (NULL) for a message that is."""
    if not outcome.state.final or "http_job_id" not in msg.params:
        return outcome
    if outcome.params_update and "result_code" in outcome.params_update:
        return outcome
    code = 0 if outcome.state != State.ERR else 2 if outcome.status.startswith(MAX_RESEND_TEXT) else 1
    upd = {**not_called(outcome.status), "result_code": code, **(outcome.params_update or {})}
    return dataclasses.replace(outcome, params_update=upd)
