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
(claimed messages over that wait in ``run`` for their host's turn); one thread per request
in flight. A request runs for at most its ``timeout_secs`` in all: its socket's every read
and write gets only the time left (:class:`spoolq.httpjob.Guard`). A request the daemon
abandons (a cancel, a lease lost to another host, the end of the stop's grace) has its
socket shut down at once, so it cannot still be talking to the server when the job is
called again.
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
from dataclasses import dataclass

import httpx

from ..errors import LeaseLost, SpoolqError
from ..httpjob import Guard, HttpJob, Response, decide, log_line, make_client, not_called, parse_job, perform
from ..model import QueueConfig, State
from ..runner.protocol import Outcome
from ..store.leases import Attempt
from .finish import Finish
from .jobs import LEASE, RENEW, JobRunner

log = logging.getLogger("spoolq.daemon")

IDLE_THREAD = 60.0
"""Seconds a request thread waits for another request before it ends."""
ABANDON_GRACE = 5.0
"""Seconds past a request's deadline before the daemon gives up on its thread (which the
guard's deadline should have ended: a safety net), aborting its socket."""


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
    deadline: float = 0.0  # time.monotonic(); set when the request starts
    guard: Guard | None = None
    client: httpx.Client | None = None
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
        self.clients: dict[str, tuple[tuple[bool, int], httpx.Client]] = {}
        self.old_clients: list[httpx.Client] = []  # replaced; closed at the end
        self.tasks: queuemod.SimpleQueue[tuple[Flight, httpx.Client, dict[str, str],
                                                tuple[str, str] | None] | None] = queuemod.SimpleQueue()
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
        for f in self.flights.values():
            if f.guard is not None:
                f.guard.abort()
        for c in [c for _, c in self.clients.values()] + self.old_clients:
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
            self.runner.finish_without_run(attempt, Outcome(State.ERR, "cancelled", msg.count,
                                                            params_update=not_called("cancelled")))
            return False
        try:
            job = parse_job(msg, cfg)
        except ValueError as e:
            log.warning("%s/%s: not an HTTP job: %s", attempt.queue, attempt.msg_id, e)
            self.runner.finish_without_run(attempt, Outcome(State.ERR, f"not an HTTP job: {e}", msg.count,
                                                            params_update=not_called(f"not an HTTP job: {e}")))
            return False
        if job.remaining <= 0:
            why = "no retries left (remaining_retries 0)"
            self.runner.finish_without_run(attempt, Outcome(State.ERR, why, msg.count,
                                                            params_update=not_called(why)))
            return False
        try:
            _, fd = self.store.start_job(attempt)  # the message's job/ (where the log is) is made here
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
        """The queue's keep-alive client; a new one when its TLS verification or its number of
        workers changed (the old one is closed at the end: requests may still use it)."""
        key = (cfg.http_verify, cfg.num_workers)
        have = self.clients.get(queue)
        if have is not None and have[0] == key:
            return have[1]
        if have is not None:
            if any(f.client is have[1] for f in self.flights.values()):
                self.old_clients.append(have[1])  # closed when its last request ends
            else:
                have[1].close()
        c = make_client(cfg)
        self.clients[queue] = (key, c)
        return c

    def _start(self, f: Flight, now: float) -> None:
        a = f.attempt
        self.per_host[f.host] = self.per_host.get(f.host, 0) + 1
        f.started = True
        f.deadline = time.monotonic() + f.job.timeout
        f.guard = Guard(f.deadline)
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
        f.client = client
        with self._busy_lock:
            self.busy += 1
            more = self.busy > self.threads
            if more:
                self.threads += 1
        if more:
            # One thread per request in flight (at most the queues' num_workers together);
            # idle ones leave after IDLE_THREAD seconds. Daemon threads: one in a request
            # abandoned at the stop must not hold the process's exit (a ThreadPoolExecutor's
            # are joined at exit).
            threading.Thread(target=self._worker, name=f"spoolq-http-{self.threads}", daemon=True).start()
        self.tasks.put((f, client, extra, auth))

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
            try:
                task = self.tasks.get(timeout=IDLE_THREAD)
            except queuemod.Empty:
                with self._busy_lock:
                    # Leave only while every task handed out has a thread without this one
                    # (busy counts those queued and those running).
                    if self.busy < self.threads:
                        self.threads -= 1
                        return
                continue
            if task is None:
                return
            try:
                self._thread(*task)
            finally:
                with self._busy_lock:
                    self.busy -= 1

    def _thread(self, f: Flight, client: httpx.Client, extra: dict[str, str], auth: tuple[str, str] | None) -> None:
        assert f.guard is not None
        try:
            res = perform(client, f.job, extra, auth, f.guard)
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
                # Not back to the queue: a bug that comes back with every answer would call
                # the job forever. err, where `spoolq retry` can send it again.
                log.exception("%s/%s: cannot decide the outcome; the message goes to err", *f.key)
                why = "the daemon could not decide the outcome of the answer (a bug: see its log)"
                outcome, line = Outcome(State.ERR, why, f.attempt.message.count + 1,
                                        params_update=not_called(why)), ""
            self._conclude(f, outcome, line, took=res.took)

    def _log(self, f: Flight, line: str) -> None:
        if f.log_fd < 0:
            return
        try:
            os.write(f.log_fd, log_line(f.job.job_id, line))
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
        if f.guard is not None:
            f.guard.abort()  # a no-op once its thread is done with the socket
        if line:
            self._log(f, line)
        self._close_log(f)
        del self.flights[f.key]
        if f.client is not None and f.client in self.old_clients and not any(
                g.client is f.client for g in self.flights.values()):
            self.old_clients.remove(f.client)  # replaced by a config change, and now unused
            f.client.close()
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
        mono = time.monotonic()
        for f in list(self.flights.values()):
            if f.done:
                continue
            if f.started and mono >= f.deadline + ABANDON_GRACE:
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
            log.info("%s/%s: cancelled; its request is abandoned", *f.key)
            self._conclude(f, Outcome(State.ERR, "cancelled", f.attempt.message.count,
                                      params_update=not_called("cancelled")), "Job cancelled")

    def check(self, queue: str, msg_id: str, now: float) -> bool:
        """The store reports a cancel of ``msg_id``: if it is ours, ask the store and act.
        False if it is not one of our requests."""
        f = self.flights.get((queue, msg_id))
        if f is None:
            return False
        self._renew(f, now)
        return True

    def next_time(self) -> float | None:
        """The daemon's clock when tick() has something to do (a renewal, a thread to give up on)."""
        now, mono = self.clock(), time.monotonic()
        times = [f.renew_at for f in self.flights.values()]
        times += [now + f.deadline + ABANDON_GRACE - mono for f in self.flights.values() if f.started]
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
