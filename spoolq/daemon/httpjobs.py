"""Queues of kind ``http``: strings-queue's HTTP jobs, performed by the daemon itself
(docs/http-jobs.md).

A message of such a queue is one HTTP request, described by its ``params`` (``method``,
``url``, ``body``, ``headers``, ``timeout_secs``, ``remaining_retries``,
``retry_delay_secs``). No process is started for it: the supervisor claims the message as
for a script, this module hands the request to a thread of a small pool (one keep-alive
``httpx.Client`` per queue), and the answer comes back through a pipe in the supervisor's
selector. The outcome is decided and settled on the supervisor's thread, through the same
Finisher as a script's, so every crash rule is the per-message one: a daemon killed during a
request leaves the message in ``run`` and the next start runs it again (at-least-once; an
HTTP job must be idempotent, as strings-queue asked of its handlers).

Only the supervisor's thread touches the store. A request thread gets the job, the client
and a deadline, and returns what it saw; its log lines are written by the supervisor.

Bounds: ``num_workers`` requests in flight per queue, ``http_per_host`` per host of a queue
(claimed messages over that wait in ``run`` for their host's turn). A request runs for at
most its ``timeout_secs`` in all (the thread checks the deadline between reads; the
supervisor gives up on it :data:`ABANDON_GRACE` seconds later if the thread is stuck).
"""

from __future__ import annotations

import errno
import logging
import os
import queue as queuemod
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ..errors import LeaseLost, SpoolqError
from ..model import Message, QueueConfig, State
from ..runner.protocol import MAX_RESEND_TEXT, Outcome
from ..store.leases import Attempt
from .finish import Finish
from .jobs import LEASE, RENEW, JobRunner

log = logging.getLogger("spoolq.daemon")

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 10
DEFAULT_DELAY = 60.0
"""strings-queue's column defaults: ``timeout_secs``, ``remaining_retries``, ``retry_delay_secs``."""
MAX_TIMEOUT = 3600.0
MAX_DELAY = 365 * 86400.0
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
TEMPORARY = (503, 429)
"""Status codes that mean "try again later" (strings-queue: 503 only)."""
BODY_KEPT = 64 * 1024
"""Bytes of a response read and written to the message's log; the rest is not read."""
RESPONSE_KEPT = 4096
"""Characters of the response body kept in the message's ``last_response`` param."""
STATUS_KEPT = 200
ABANDON_GRACE = 5.0
"""Seconds past a request's deadline before the supervisor stops waiting for its thread."""
POOL_THREADS = 256
NOT_FROM_MESSAGE = frozenset({"authorization", "proxy-authorization", "host", "content-length",
                              "transfer-encoding", "connection", "x-bitlancer-job-id", "x-spoolq-message"})
"""Request headers a message may not set: credentials come from the queue's config, and the
rest are the request's framing or spoolq's own."""


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
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {v!r}") from None
    if not lo <= n <= hi:  # NaN fails too
        raise ValueError(f"{key} must be {lo:g}-{hi:g}, got {v!r}")
    return n


def check_url(url: Any, allow: list[str]) -> httpx.URL:
    """``url`` as a URL spoolq will call: http or https, a host, no user:password (credentials
    come from the queue), and under one of ``allow``'s prefixes when it has any."""
    if not isinstance(url, str) or not url:
        raise ValueError("url is required (an http:// or https:// URL)")
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise ValueError(f"url {url!r} is not a URL: {e}") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"url {url!r}: only http:// and https:// URLs with a host are called")
    if u.userinfo:
        raise ValueError("url: no user:password in the URL (credentials come from the queue's http_auth)")
    if allow and not any(_under(u, p) for p in allow):
        raise ValueError(f"url {url!r} is not under the queue's http_allow prefixes")
    return u


def _under(u: httpx.URL, prefix: str) -> bool:
    p = httpx.URL(prefix)
    return (u.scheme, u.host, u.port) == (p.scheme, p.host, p.port) and u.path.startswith(p.path or "/")


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
        if not k or any(c in k for c in ' \t\r\n:\0') or any(c in v for c in '\r\n\0'):
            raise ValueError(f"header {k!r}: invalid name or value")
    timeout = _number(p.get("timeout_secs", DEFAULT_TIMEOUT), "timeout_secs", 0.001, MAX_TIMEOUT)
    delay = _number(p.get("retry_delay_secs", DEFAULT_DELAY), "retry_delay_secs", 0, MAX_DELAY)
    remaining = _number(p.get("remaining_retries", DEFAULT_RETRIES), "remaining_retries", 0, 1_000_000)
    if remaining != int(remaining):
        raise ValueError("remaining_retries must be a whole number")
    job_id = p.get("http_job_id", msg.msg_id)
    return HttpJob(method.upper(), str(url), body.encode(), dict(headers), timeout, delay, int(remaining),
                   str(job_id))


@dataclass
class Response:
    """What a request thread saw."""

    started: float
    status: int | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False
    error: str = ""
    took: float = 0.0


KEPT_HEADERS = ("retry-after", "x-bitlancer-retry-delay-secs", "x-bitlancer-url")


def perform(client: httpx.Client, job: HttpJob, extra: dict[str, str], auth: tuple[str, str] | None,
            deadline: float) -> Response:
    """Make the request (on a pool thread): at most BODY_KEPT bytes of the answer are read,
    and reading stops at ``deadline`` (time.monotonic())."""
    res = Response(started=time.time())
    t0 = time.monotonic()
    try:
        with client.stream(job.method, job.url, content=job.body or None,
                           headers={**job.headers, **extra}, auth=auth,
                           timeout=httpx.Timeout(max(0.001, min(job.timeout, deadline - t0)))) as r:
            res.status = r.status_code
            res.headers = {k: r.headers[k] for k in KEPT_HEADERS if k in r.headers}
            got = bytearray()
            for chunk in r.iter_bytes():
                got += chunk
                if len(got) >= BODY_KEPT:
                    break
                if time.monotonic() >= deadline:
                    res.timed_out, res.status = True, None
                    break
            res.body = bytes(got[:BODY_KEPT])
    except httpx.TimeoutException:
        res.timed_out, res.status = True, None
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
        res.status = None
        res.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    res.took = time.monotonic() - t0
    return res


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (seconds, or an HTTP date), or None."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return min(MAX_DELAY, float(v))
    try:
        return min(MAX_DELAY, max(0.0, parsedate_to_datetime(v).timestamp() - now))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    return line[:STATUS_KEPT] + ("..." if len(line) > STATUS_KEPT else "")


def decide(job: HttpJob, res: Response, cfg: QueueConfig, msg: Message, now: float) -> tuple[Outcome, str]:
    """The outcome of a request and its log line (strings-queue's words)."""
    upd: dict[str, Any] = {"last_started_at": res.started, "last_finished_at": now}
    if "retries" not in msg.params:
        upd["retries"] = job.remaining  # what `spoolq retry` gives back (client.py)
    delay = job.retry_delay
    body = res.body.decode("utf-8", "replace")
    if res.status is not None:
        upd["last_response"] = body[:RESPONSE_KEPT]
        upd["status_code"] = res.status
        hdr = res.headers.get("x-bitlancer-retry-delay-secs", "").strip()
        if hdr.isdigit() and int(hdr) <= MAX_DELAY:
            delay = upd["retry_delay_secs"] = int(hdr)
        new_url = res.headers.get("x-bitlancer-url")
        if new_url:
            try:
                upd["url"] = str(check_url(new_url, cfg.http_allow))
            except ValueError as e:
                log.warning("%s/%s: x-bitlancer-url not taken: %s", msg.dest, msg.msg_id, e)
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
        if res.timed_out:
            what, line = "timeout", "Job failed due to timeout"
        elif res.status is None:
            what, line = res.error, f"Job failed temporarily: {res.error}"
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


def _not_called(why: str) -> dict[str, Any]:
    """The params of a job that ends without a request: a permanent failure, as a row of the
    SQL intake shows it."""
    return {"result_code": 1, "last_response": why, "last_finished_at": time.time()}


def log_line(job_id: str, text: str, when: float | None = None) -> bytes:
    """A line of the message's log as strings-queue logged it: ``<asctime>  [JOBID id] text``."""
    t = time.time() if when is None else when
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t * 1000) % 1000:03d}"
    return f"{stamp}  [JOBID {job_id}] {text}\n".encode("utf-8", "replace")


@dataclass
class Flight:
    """One claimed HTTP job, waiting for its host's turn or in a thread."""

    attempt: Attempt
    job: HttpJob
    cfg: QueueConfig
    host: tuple[str, str]  # (queue, scheme://host:port)
    log_fd: int
    claimed: float
    renew_at: float
    deadline: float = 0.0  # the daemon's clock; set when the request starts
    started: bool = False
    done: bool = False  # concluded or abandoned: a late answer is dropped

    @property
    def key(self) -> tuple[str, str]:
        return (self.attempt.queue, self.attempt.msg_id)


class HttpJobs:
    """Every kind http queue's requests, driven by the supervisor's loop."""

    def __init__(self, runner: JobRunner, sel: selectors.BaseSelector, clock: Callable[[], float], *,
                 finished: Callable[[Finish], None]) -> None:
        self.runner = runner
        self.store = runner.store
        self.clock = clock
        self.finished = finished  # the supervisor's: frees the message's place in its queue
        # httpx logs every request at INFO: the job's own log has it, the daemon's need not
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self.flights: dict[tuple[str, str], Flight] = {}
        self.per_queue: dict[str, int] = {}
        self.per_host: dict[tuple[str, str], int] = {}
        self.waiting: dict[tuple[str, str], deque[Flight]] = {}
        self.clients: dict[tuple[str, bool], httpx.Client] = {}
        self.tasks: queuemod.SimpleQueue[tuple[Any, ...] | None] = queuemod.SimpleQueue()
        self.threads = 0
        self.busy = 0  # tasks handed to the threads and not done yet
        self._busy_lock = threading.Lock()
        self.answers: queuemod.SimpleQueue[tuple[Flight, Response]] = queuemod.SimpleQueue()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel = sel
        sel.register(self._r, selectors.EVENT_READ, self)

    def close(self) -> None:
        for _ in range(self.threads):
            self.tasks.put(None)
        for c in self.clients.values():
            c.close()
        self.clients.clear()
        try:
            self.sel.unregister(self._r)
        except (KeyError, ValueError):
            pass
        for fd in (self._r, self._w):
            os.close(fd)
        for f in self.flights.values():
            self._close_log(f)

    def alive(self) -> bool:
        return bool(self.flights)

    def free(self, queue: str, cfg: QueueConfig) -> bool:
        return self.per_queue.get(queue, 0) < cfg.num_workers

    # -- starting ------------------------------------------------------------------------
    def send(self, attempt: Attempt, cfg: QueueConfig, now: float) -> bool:
        """Take a claimed attempt; False if it ended at once (cancelled, not a valid job, no
        retries left, or no log for it): the caller's slot is free again."""
        msg = attempt.message
        if attempt.cancel_requested:
            self.runner.finish_without_run(attempt, Outcome(State.ERR, "cancelled", msg.count))
            return False
        try:
            job = parse_job(msg, cfg)
        except ValueError as e:
            log.warning("%s/%s: not an HTTP job: %s", attempt.queue, attempt.msg_id, e)
            self.runner.finish_without_run(attempt, Outcome(State.ERR, f"not an HTTP job: {e}", msg.count,
                                                            params_update=_not_called(f"not an HTTP job: {e}")))
            return False
        if job.remaining <= 0:
            why = "no retries left (remaining_retries 0)"
            self.runner.finish_without_run(attempt, Outcome(State.ERR, why, msg.count,
                                                            params_update=_not_called(why)))
            return False
        try:
            self.store.workdir(attempt)  # the message's job/ (where the log is) is made here
            fd = self.store.log_fd(attempt)
        except (OSError, SpoolqError) as e:
            log.error("%s/%s: cannot start: %s", attempt.queue, attempt.msg_id, e)
            self.runner.finish_without_run(attempt, Outcome(State.QUE, f"daemon could not start the job: {e}",
                                                            msg.count, requeue_delay=30.0))
            return False
        u = httpx.URL(job.url)
        f = Flight(attempt, job, cfg, (attempt.queue, f"{u.scheme}://{u.host}:{u.port or ''}"), fd, now,
                   now + RENEW)
        self.flights[f.key] = f
        self.per_queue[attempt.queue] = self.per_queue.get(attempt.queue, 0) + 1
        self.runner.stats.started(attempt.queue)
        if self.per_host.get(f.host, 0) < cfg.http_per_host:
            self._start(f, now)
        else:
            self.waiting.setdefault(f.host, deque()).append(f)
        return True

    def _client(self, queue: str, cfg: QueueConfig) -> httpx.Client:
        key = (queue, cfg.http_verify)
        c = self.clients.get(key)
        if c is None:
            n = max(cfg.num_workers, 1)
            c = self.clients[key] = httpx.Client(
                verify=cfg.http_verify, follow_redirects=False, trust_env=False,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        return c

    def _start(self, f: Flight, now: float) -> None:
        a = f.attempt
        self.per_host[f.host] = self.per_host.get(f.host, 0) + 1
        f.started = True
        f.deadline = now + f.job.timeout
        log.debug("%s/%s: %s %s", a.queue, a.msg_id, f.job.method, f.job.url)
        self._log(f, f"Calling job with method {f.job.method} on url {f.job.url} (timeout {f.job.timeout:g})")
        try:
            auth = self._auth(f.cfg)
        except OSError as e:
            self._conclude(f, Outcome(State.QUE, f"cannot read http_auth's password_file: {e}", a.message.count,
                                      requeue_delay=30.0), f"Job not called: cannot read the queue's password: {e}")
            return
        extra = {"x-bitlancer-job-id": f.job.job_id, "X-Spoolq-Message": self.runner.full_id(a.queue, a.msg_id)}
        client = self._client(a.queue, f.cfg)
        deadline = time.monotonic() + f.job.timeout
        with self._busy_lock:
            self.busy += 1
            more = self.busy > self.threads
        if more and self.threads < POOL_THREADS:
            # Daemon threads: one stuck in a request abandoned at the stop must not hold the
            # process's exit (a ThreadPoolExecutor's are joined at exit).
            self.threads += 1
            threading.Thread(target=self._worker, name=f"spoolq-http-{self.threads}", daemon=True).start()
        self.tasks.put((f, client, extra, auth, deadline))

    @staticmethod
    def _auth(cfg: QueueConfig) -> tuple[str, str] | None:
        if not cfg.http_auth:
            return None
        fd = os.open(cfg.http_auth["password_file"], os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            password = os.read(fd, 4096).decode("utf-8", "replace").rstrip("\r\n")
        finally:
            os.close(fd)
        return (cfg.http_auth["user"], password)

    def _worker(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            try:
                self._thread(*task)
            finally:
                with self._busy_lock:
                    self.busy -= 1

    def _thread(self, f: Flight, client: httpx.Client, extra: dict[str, str], auth: tuple[str, str] | None,
                deadline: float) -> None:
        try:
            res = perform(client, f.job, extra, auth, deadline)
        except Exception as e:  # noqa: BLE001 - the answer must reach the supervisor whatever happens
            res = Response(started=time.time(), error=f"{type(e).__name__}: {e}")
        self.answers.put((f, res))
        try:
            os.write(self._w, b"x")
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EBADF):
                raise

    # -- answers -------------------------------------------------------------------------
    def on_answers(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                f, res = self.answers.get_nowait()
            except queuemod.Empty:
                return
            if f.done:
                continue  # abandoned (cancelled, lost, past its deadline, the daemon stopping)
            try:
                outcome, line = decide(f.job, res, f.cfg, f.attempt.message, self.clock())
            except Exception:  # noqa: BLE001 - a bug must not leave the message without an outcome
                log.exception("%s/%s: cannot decide the outcome; requeueing it", *f.key)
                outcome, line = Outcome(State.QUE, "the daemon could not decide the outcome",
                                        f.attempt.message.count + 1, requeue_delay=f.job.retry_delay), ""
            self._conclude(f, outcome, line, took=res.took)

    def _log(self, f: Flight, text: str) -> None:
        if f.log_fd < 0:
            return
        try:
            os.write(f.log_fd, log_line(f.job.job_id, text))
        except OSError as e:
            log.warning("%s/%s: cannot write its log: %s", *f.key, e)

    @staticmethod
    def _close_log(f: Flight) -> None:
        if f.log_fd >= 0:
            try:
                os.close(f.log_fd)
            except OSError:
                pass
            f.log_fd = -1

    def _conclude(self, f: Flight, outcome: Outcome, line: str = "", *, took: float = 0.0,
                  lost: bool = False) -> None:
        """The attempt is over: free its places, settle its outcome (the log is closed first:
        a store that copies the log elsewhere waits for its end)."""
        f.done = True
        if line:
            self._log(f, line)
        self._close_log(f)
        del self.flights[f.key]
        q = f.attempt.queue
        self.per_queue[q] -= 1
        if f.started:
            self.per_host[f.host] -= 1
            waiting = self.waiting.get(f.host)
            while waiting and self.per_host[f.host] < f.cfg.http_per_host:
                nxt = waiting.popleft()
                if not nxt.done:
                    self._start(nxt, self.clock())
        else:
            w = self.waiting.get(f.host)
            if w is not None and f in w:
                w.remove(f)
        fin = Finish(f.attempt, outcome, pid=0, took=took)
        if lost:
            log.warning("%s/%s: dropped the outcome of its request (%s): another host holds the message now",
                        q, f.attempt.msg_id, outcome.state)
            self.finished(fin)
        elif self.runner.finisher.settle(fin):
            self.finished(fin)

    # -- time: leases, deadlines, cancels ------------------------------------------------
    def tick(self, now: float) -> None:
        for f in list(self.flights.values()):
            if f.done:
                continue
            if f.started and now >= f.deadline + ABANDON_GRACE:
                log.warning("%s/%s: its request thread is still busy %g s past the timeout; giving up on it",
                            *f.key, ABANDON_GRACE)
                res = Response(started=f.claimed, timed_out=True)
                outcome, line = decide(f.job, res, f.cfg, f.attempt.message, now)
                self._conclude(f, outcome, line)
            elif now >= f.renew_at:
                self._renew(f, now)

    def _renew(self, f: Flight, now: float) -> None:
        f.renew_at = now + RENEW
        try:
            cancel = self.store.heartbeat(f.attempt, lease=LEASE).cancel_requested
        except LeaseLost:
            self._conclude(f, Outcome(State.QUE, "lost its lease", f.attempt.message.count), lost=True)
            return
        except (OSError, SpoolqError) as e:
            log.warning("%s/%s: cannot renew the lease: %s", *f.key, e)
            return
        if cancel:
            log.info("%s/%s: cancelled; its request's answer will be dropped", *f.key)
            self._conclude(f, Outcome(State.ERR, "cancelled", f.attempt.message.count), "Job cancelled")

    def check(self, queue: str, msg_id: str, now: float) -> bool:
        """The store reports a cancel of ``msg_id``: if it is ours, ask the store and act.
        False if it is not one of our requests."""
        f = self.flights.get((queue, msg_id))
        if f is None:
            return False
        self._renew(f, now)
        return True

    def next_time(self) -> float | None:
        times = [f.renew_at for f in self.flights.values()]
        times += [f.deadline + ABANDON_GRACE for f in self.flights.values() if f.started]
        return min(times, default=None)

    def stop_all(self, now: float, *, kill: bool) -> None:
        """The daemon stops: what waits for its host goes back to the queue unchanged now;
        with ``kill`` (the grace is over) the requests still out go back too, and their
        answers are dropped (the next start runs them again)."""
        for f in list(self.flights.values()):
            if not f.started or kill:
                self._conclude(f, Outcome(State.QUE, "requeued: the daemon stopped while it ran",
                                          f.attempt.message.count),
                               "Job requeued: the daemon stopped" if f.started else "")
