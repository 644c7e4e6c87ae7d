"""Persistent workers: queues of kind ``worker`` (docs/workers.md).

A worker is the queue's program started once and fed many messages: one JSON line per
message on its fd 4, answers ``ID VERB TEXT`` on its fd 3 (the verbs of the fd-3 protocol).
Its stdout and stderr go to ``<home>/workers/<queue>.log``. The daemon keeps
``num_workers`` of them per queue, each holding at most ``worker_inflight`` messages;
every message it holds is an ordinary attempt in ``run`` (claimed, leased, fenced,
finished through the Finisher), so the crash rules are the per-message ones:

* a worker that dies holding messages: each goes back to the queue with ``count`` + 1
  (err once ``max_count`` is used up), as after a crash; the worker is started again, with
  backoff when it keeps dying young;
* a message past the queue's ``timeout`` or cancelled: the worker is stopped (SIGTERM to its
  process group, SIGKILL after :data:`~.jobs.KILL_GRACE`), that message ends in err and the
  others it held go back to the queue unchanged;
* the daemon killed: the next start recovers ``run`` as always, and kills the orphaned
  workers first (``<home>/workers/<queue>.<slot>.pid``: pid, start time, host).

A worker is replaced after ``worker_restart_after`` answers (0: never) and when the
queue's script, ``exec_prefix`` or ``env_vars`` change: its fd 4 is closed, which tells it
to finish what it holds and exit.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import random
import select
import selectors
import signal
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RootConfig
from ..errors import CorruptMessage, LeaseLost, ScriptError, ScriptUnusable, SpoolqError
from ..model import QueueConfig, State
from ..parts import Part
from ..runner import protocol
from ..runner.protocol import Completion, LineBuffer, Outcome
from ..runner.spawn import (
    Spawned,
    build_argv,
    has_exited,
    kill_group,
    queue_env,
    reap,
    require_file,
    resolve_script,
    same_process,
    spawn,
)
from ..store.leases import Attempt
from .finish import Finish
from .jobs import HOST, KILL_GRACE, KNOWN_VERBS, LEASE, RENEW, JobRunner, crash_outcome, retry_delay

log = logging.getLogger("spoolq.daemon")

WORKERS_DIR = "workers"
"""Under the daemon's home: the workers' cwd, logs (``<queue>.log``) and pid files."""
LOG_ROTATE = 64 << 20
"""A worker log over this many bytes is renamed to ``<queue>.log.1`` when a worker starts."""
YOUNG = 5.0
"""A worker that dies within this many seconds of its start is restarted with backoff."""
BACKOFF_MAX = 60.0
PROTOCOL_VERSION = "1"
_LINE = json.JSONEncoder(separators=(",", ":"))
"""A message's line to its worker (what ``json.dumps`` with these separators gives, without
an encoder made per message)."""


@dataclass
class InFlight:
    """One message a worker holds."""

    attempt: Attempt
    sent: float
    renew_at: float
    end: int = 0  # the worker's input stream offset just past this message's line
    deadline: float | None = None  # set while it is the oldest message its worker holds
    last_status: str = ""
    written_status: str | None = None  # the status text on disk now (None: none written yet)
    timed_out: bool = False
    cancelled: bool = False
    lost: bool = False


@dataclass
class Worker:
    """One running worker process."""

    queue: str
    slot: int
    spawned: Spawned
    started: float
    key: tuple[object, ...]  # the config it runs (script, prefix, env): changed -> replaced
    inflight: dict[str, InFlight] = field(default_factory=dict)
    lines: LineBuffer = field(default_factory=LineBuffer)
    out: bytearray = field(default_factory=bytearray)  # message lines not yet taken by the pipe
    writing: bool = False  # registered for EVENT_WRITE on its input
    queued_bytes: int = 0  # bytes of message lines handed to `out` so far
    written_bytes: int = 0  # of those, bytes the pipe took
    answered: int = 0
    draining: bool = False  # it takes nothing more; fd 4 is closed once it holds nothing
    eof: bool = False
    broken_at: float | None = None  # it closed fd 3 or fd 4 while it may still run
    kill_at: float | None = None
    stopping: bool = False  # the daemon stops: what it holds goes back unchanged
    terminated: str = ""  # why the daemon stopped it ("" if it was not stopped)
    broken_why: str = ""

    @property
    def pid(self) -> int:
        return self.spawned.pid


class WorkerInput:
    """Selector data for a worker's input pipe, registered while lines wait to be written."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker


@dataclass
class Pool:
    """The workers of one queue."""

    queue: str
    workers: dict[int, Worker] = field(default_factory=dict)  # slot -> worker
    fails: int = 0  # workers in a row that died young
    hold_until: float = 0.0  # no start before this (backoff)


def config_key(cfg: QueueConfig) -> tuple[object, ...]:
    return (cfg.script, cfg.exec_prefix, tuple(sorted(cfg.env_vars.items())))


class Workers:
    """Every queue's persistent workers, driven by the supervisor's loop."""

    def __init__(self, runner: JobRunner, sel: selectors.BaseSelector, home: Path,
                 rootcfg: RootConfig, clock: Callable[[], float], *,
                 finished: Callable[[Finish], None], changed: Callable[[str], None],
                 config: Callable[[str], QueueConfig | None], subdir: str = "") -> None:
        self.runner = runner
        self.store = runner.store
        self.sel = sel
        self.home = home
        self.rootcfg = rootcfg
        self.clock = clock
        self.finished = finished  # the supervisor's: frees the message's place in its queue
        self.changed = changed  # the supervisor's: look at this queue's workers again
        self._cfg = config  # the supervisor's: a queue's config as last read (no stat per message)
        self.pools: dict[str, Pool] = {}
        self.by_pid: dict[int, Worker] = {}
        self.dir = home / WORKERS_DIR / subdir  # a dispatch helper's own (helper_dir)
        self._unflushed: dict[int, Worker] = {}  # id -> a worker whose sent lines wait (flush_sent)
        # Each worker's input pipe, watched for nothing but the error the kernel reports once
        # its read end is closed: a worker that closes fd 4 and runs on is found broken even
        # when nothing is being written to it (a write's EPIPE was the only sign before).
        self._inputs = select.epoll()
        self._input_of: dict[int, Worker] = {}
        sel.register(self._inputs.fileno(), selectors.EVENT_READ, self)

    # -- starting --------------------------------------------------------------------------
    def alive(self) -> bool:
        return bool(self.by_pid)

    def pool(self, queue: str) -> Pool:
        p = self.pools.get(queue)
        if p is None:
            p = self.pools[queue] = Pool(queue)
        return p

    def ensure(self, queue: str, cfg: QueueConfig, now: float) -> float | None:
        """Start the workers ``queue`` lacks; drain those running an old config or beyond
        ``num_workers``. Returns when to try again (backoff) or None. Raises ScriptUnusable."""
        pool = self.pool(queue)
        key = config_key(cfg)
        for slot, w in list(pool.workers.items()):
            if not w.draining and (w.key != key or slot >= cfg.num_workers):
                log.info("queue %s: replacing worker %d (pid %d): %s", queue, slot, w.pid,
                         "its config changed" if w.key != key else "fewer workers configured")
                self.drain(w)
        if now < pool.hold_until:
            return pool.hold_until
        for slot in range(cfg.num_workers):
            cur = pool.workers.get(slot)
            if cur is None or cur.draining:
                # A draining worker keeps the messages it holds until it exits; its
                # replacement starts beside it.
                pool.workers.pop(slot, None)
                self._start(pool, slot, cfg, now)
        return None

    def _start(self, pool: Pool, slot: int, cfg: QueueConfig, now: float) -> None:
        queue = pool.queue
        try:
            script = require_file(cfg, self.home) if cfg.exec_prefix.strip() else resolve_script(cfg, self.home)
            self.dir.mkdir(parents=True, exist_ok=True)
            env = self.worker_env(cfg, queue, script, slot)
            sp = spawn(build_argv(cfg, script), env=env, cwd=self.dir, log_fd=self._log_fd(queue),
                       header_script=f"{script} (worker {slot} of queue {queue})")
        except ScriptError as e:
            self.runner.stats.script_error(queue)
            raise ScriptUnusable(str(e)) from None
        except (OSError, ValueError, UnicodeError) as e:
            pool.fails += 1
            wait = self._backoff(pool, now)
            log.error("queue %s: cannot start worker %d: %s; trying again in %g s", queue, slot, e, wait)
            return
        w = Worker(queue, slot, sp, now, config_key(cfg))
        pool.workers[slot] = w
        self.by_pid[w.pid] = w
        self.sel.register(sp.status_fd, selectors.EVENT_READ, w)
        self._inputs.register(sp.reply_fd, 0)  # EPOLLERR is always reported
        self._input_of[sp.reply_fd] = w
        self._write_pidfile(w)
        log.info("queue %s: started worker %d, pid %d", queue, slot, w.pid)

    def _backoff(self, pool: Pool, now: float) -> float:
        wait = min(BACKOFF_MAX, 2.0 ** min(pool.fails - 1, 10))
        pool.hold_until = now + wait
        return wait

    def worker_env(self, cfg: QueueConfig, queue: str, script: Path, slot: int) -> dict[str, str]:
        """A script's environment without a message's variables, and the worker's own."""
        env = queue_env(base=self.runner.base_env, cfg=cfg, queue=queue, script=str(script),
                        rootcfg=self.rootcfg, root=self.home, rq_env=self.runner.rq_env)
        env.update({"SPOOLQ_STORE": self.runner.store.url, "SPOOLQ_WORKER": str(slot),
                    "SPOOLQ_WORKER_PROTOCOL": PROTOCOL_VERSION})
        return env

    def _log_fd(self, queue: str) -> int:
        path = self.dir / f"{queue}.log"
        try:
            if path.stat().st_size > LOG_ROTATE:
                os.replace(path, self.dir / f"{queue}.log.1")
        except FileNotFoundError:
            pass
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)

    def _pidfile(self, w: Worker) -> Path:
        # The pid in the name: a replacement in the same slot has a file of its own.
        return self.dir / f"{w.queue}.{w.slot}.{w.pid}.pid"

    def _write_pidfile(self, w: Worker) -> None:
        """"pid spawn_ns host", as a per-message script's ``pid`` file: the next start kills
        this worker if the daemon dies (:func:`kill_orphans`). Not fsync'd: it matters only
        while this boot lasts."""
        try:
            tmp = self.dir / f".{w.queue}.{w.slot}.{w.pid}.pid.tmp"
            tmp.write_text(f"{w.pid} {w.spawned.spawned_ns} {HOST}\n")
            os.replace(tmp, self._pidfile(w))
        except OSError as e:
            log.warning("queue %s: cannot record worker %d's pid: %s", w.queue, w.slot, e)

    # -- feeding ---------------------------------------------------------------------------
    def free(self, queue: str, cfg: QueueConfig) -> Worker | None:
        """The live worker of ``queue`` holding the fewest messages, if it has room."""
        pool = self.pools.get(queue)
        if pool is None:
            return None
        best: Worker | None = None
        for w in pool.workers.values():
            if w.draining or w.eof or w.broken_at is not None or len(w.inflight) >= cfg.worker_inflight:
                continue
            if best is None or len(w.inflight) < len(best.inflight):
                best = w
        return best

    def send(self, w: Worker, attempt: Attempt, cfg: QueueConfig, now: float) -> bool:
        """Hand a claimed attempt to ``w``; False if it ended at once (cancelled before it
        started, or no directory for it): the caller's slot is free again."""
        msg = attempt.message
        if attempt.cancel_requested:
            self.runner.finish_without_run(attempt, Outcome(State.ERR, "cancelled", msg.count))
            return False
        try:
            mdir = self.store.attempt_dir(attempt)
        except CorruptMessage as e:  # set aside by the store: only the attempt is left to end
            log.error("%s/%s: cannot start: %s", attempt.queue, attempt.msg_id, e)
            self.runner.finish_without_run(attempt, Outcome(State.ERR, f"cannot start: {e}", msg.count))
            return False
        except (OSError, SpoolqError) as e:
            log.error("%s/%s: cannot start: %s", attempt.queue, attempt.msg_id, e)
            self.runner.finish_without_run(attempt, Outcome(State.QUE, f"daemon could not start the job: {e}",
                                                            msg.count, requeue_delay=30.0))
            return False
        try:
            data = msg.to_dict()
            data.pop("history", None)
            # ASCII JSON: any string survives (a lone surrogate in a hand-written msg too).
            line = _LINE.encode({"id": attempt.msg_id, "queue": attempt.queue,
                                 "full_id": self.runner.full_id(attempt.queue, attempt.msg_id),
                                 "count": msg.count, "max_count": msg.max_count, "dir": mdir,
                                 "msg": data}).encode() + b"\n"
        except (ValueError, TypeError) as e:
            log.warning("%s/%s: cannot start: %s", attempt.queue, attempt.msg_id, e)
            self.runner.finish_without_run(attempt, Outcome(State.ERR, f"cannot start: {e}", msg.count))
            return False
        inf = InFlight(attempt, now, now + RENEW)
        w.inflight[attempt.msg_id] = inf
        self._arm(w, now, cfg)
        self.runner.stats.started(attempt.queue)
        # The pass's first line to a worker is written at once: a worker that closed its
        # fd 4 or died is found broken (EPIPE) before it is handed more; the rest wait for
        # flush_sent, one write for the lot.
        self._write(w, line, flush=id(w) not in self._unflushed)
        self._unflushed[id(w)] = w
        inf.end = w.queued_bytes
        return True

    def flush_sent(self) -> None:
        """Write the rest of the lines :meth:`send` gathered: two writes (and wake-ups of the
        worker) per worker per dispatch pass instead of one per message."""
        pending, self._unflushed = self._unflushed, {}
        for w in pending.values():
            self.flush(w)

    def _arm(self, w: Worker, now: float, cfg: QueueConfig | None = None) -> None:
        """The queue's timeout runs for the oldest message a worker holds: a worker that
        answers in order has started it (the others wait behind it)."""
        cfg = cfg or self._cfg(w.queue)
        head = next(iter(w.inflight.values()), None)
        if head is not None and head.deadline is None and cfg is not None and cfg.timeout is not None:
            head.deadline = self.runner.mono() + cfg.timeout  # monotonic, as a script's (jobs.py)

    def _write(self, w: Worker, data: bytes, *, flush: bool = True) -> None:
        if w.spawned.reply_fd < 0:
            return  # closed: the worker is on its way out
        w.out += data
        w.queued_bytes += len(data)
        if flush:
            self.flush(w)

    def flush(self, w: Worker) -> None:
        """Write what the pipe takes; the rest when the selector says it has room."""
        fd = w.spawned.reply_fd
        while w.out:
            try:
                n = os.write(fd, w.out)
            except BlockingIOError:
                break
            except OSError as e:  # EPIPE: it closed fd 4 or died; its exit settles its messages
                if e.errno != errno.EPIPE:
                    log.warning("queue %s: worker %d: cannot write to it: %s", w.queue, w.slot, e)
                w.out.clear()
                self._broken(w, "closed its fd 4")
                break
            del w.out[:n]
            w.written_bytes += n
        want = bool(w.out)
        if want != w.writing:
            if want:
                self.sel.register(fd, selectors.EVENT_WRITE, WorkerInput(w))
            else:
                self.sel.unregister(fd)
            w.writing = want
        self._maybe_close(w)

    def drain(self, w: Worker) -> None:
        """Take nothing more. Its fd 4 stays open until it holds nothing (so it can still
        be answered a ``dup``), then EOF tells it to exit."""
        w.draining = True
        self._maybe_close(w)

    def _maybe_close(self, w: Worker) -> None:
        if w.draining and not w.out and not w.inflight:
            self._close_input(w)

    def _broken(self, w: Worker, why: str) -> None:
        """It can no longer be fed or answer, yet may run on: stopped if it has not exited
        within KILL_GRACE (:meth:`tick`); what it holds then goes back unchanged."""
        if w.broken_at is None and w.pid in self.by_pid:
            w.broken_at = self.runner.mono()
            w.broken_why = why

    def on_inputs(self) -> None:
        """Some worker's input pipe has lost its reader: that worker closed fd 4 (or gave
        it away and exited meanwhile)."""
        for fd, _ in self._inputs.poll(0):
            w = self._input_of.pop(fd, None)
            self._inputs.unregister(fd)  # level-triggered: reported once, not in a loop
            if w is not None:
                self._broken(w, "closed its fd 4")

    def _close_input(self, w: Worker) -> None:
        if w.spawned.reply_fd >= 0:
            if self._input_of.pop(w.spawned.reply_fd, None) is not None:
                self._inputs.unregister(w.spawned.reply_fd)
            if w.writing:
                self.sel.unregister(w.spawned.reply_fd)
                w.writing = False
            try:
                os.close(w.spawned.reply_fd)
            except OSError:
                pass
            w.spawned.reply_fd = -1

    # -- answers ---------------------------------------------------------------------------
    def read(self, w: Worker) -> None:
        """Read what the worker wrote on fd 3; at EOF unregister it (its exit is reaped)."""
        lines, eof = protocol.read_lines(w.spawned.status_fd, w.lines)
        w.eof = w.eof or eof
        if w.eof:
            try:
                self.sel.unregister(w.spawned.status_fd)
            except (KeyError, ValueError):
                pass
            self._broken(w, "closed its fd 3")
        if lines:
            self.handle(w, lines)

    def handle(self, w: Worker, lines: list[str]) -> None:
        pending: dict[str, str] = {}  # id -> last status text not yet written
        for line in lines:
            msg_id, _, rest = line.strip().partition(" ")
            inf = w.inflight.get(msg_id)
            if inf is None:
                if msg_id:
                    log.warning("queue %s: worker %d wrote for %r, which it does not hold: %.200s",
                                w.queue, w.slot, msg_id, line)
                continue
            verb, text = protocol.split_line(rest)
            if not verb:
                continue
            if verb == "dup":
                reply = self.runner.dup(w.queue, inf.attempt.message, text)
                self._write(w, json.dumps({"id": msg_id, "reply": reply}).encode() + b"\n")
                continue
            status = text if verb in KNOWN_VERBS else rest.strip()
            c = protocol.parse_completion(verb, text)
            if c is None:
                inf.last_status = status
                pending[msg_id] = status
                continue
            if c.kind in ("done", "err") and not c.text and inf.last_status:
                c = dataclasses.replace(c, text=inf.last_status)  # no text: what it showed stays
            inf.last_status = c.text
            pending.pop(msg_id, None)
            self._conclude(w, inf, self._decide(inf, c))
            w.answered += 1
            self.pool(w.queue).fails = 0  # a worker that answers is not failing to start
        for msg_id, text in pending.items():
            inf = w.inflight.get(msg_id)
            if inf is None:
                continue
            try:
                self.store.set_status(w.queue, msg_id, text)
                inf.written_status = text
            except SpoolqError as e:
                log.warning("%s/%s: cannot write status: %s", w.queue, msg_id, e)
        cfg = self._cfg(w.queue)
        if cfg is not None and cfg.worker_restart_after and w.answered >= cfg.worker_restart_after \
                and not w.draining:
            log.info("queue %s: worker %d (pid %d) answered %d messages: replacing it", w.queue, w.slot,
                     w.pid, w.answered)
            self.drain(w)

    def _decide(self, inf: InFlight, c: Completion) -> Outcome:
        """The outcome of a completion line (a worker has no exit status per message)."""
        m = inf.attempt.message
        if inf.cancelled:
            return Outcome(State.ERR, "cancelled", m.count)
        if inf.timed_out:  # it answered after the daemon stopped it for its timeout
            return Outcome(State.ERR, f"TIMEOUT - killed after {self._timeout(inf.attempt.queue):g} s", m.count)
        cfg = self._cfg(inf.attempt.queue)
        return protocol.decide(c, 0, count=m.count, max_count=m.max_count, last_status=inf.last_status,
                               retry_delay=retry_delay(cfg, m.count, random.random()))

    def _conclude(self, w: Worker, inf: InFlight, outcome: Outcome, note: str = "") -> None:
        """The message's attempt is over: settle its outcome (held and retried if the store
        refuses: the message keeps its place in run meanwhile, not the worker's room)."""
        del w.inflight[inf.attempt.msg_id]
        now = self.clock()
        if w.pid in self.by_pid:
            self._arm(w, now)
            self._maybe_close(w)
        fin = Finish(inf.attempt, outcome, note=note, pid=w.pid, took=now - inf.sent,
                     current_status=inf.written_status)
        if inf.lost:
            log.warning("%s/%s: dropped the outcome from worker pid %d (%s): another host holds the "
                        "message now", w.queue, inf.attempt.msg_id, w.pid, outcome.state)
            self.finished(fin)
        elif self.runner.finisher.settle(fin):
            self.finished(fin)

    # -- time: leases, timeouts, kills -----------------------------------------------------
    def tick(self, now: float) -> None:
        mono = self.runner.mono()  # deadlines, broken_at, kill_at: monotonic (a clock step is no timeout)
        for w in list(self.by_pid.values()):
            if w.broken_at is not None and not w.terminated and mono >= w.broken_at + KILL_GRACE:
                self.terminate(w, now, f"it {w.broken_why} but kept running")
            if w.kill_at is not None and mono >= w.kill_at:
                w.kill_at = None
                kill_group(w.pid, signal.SIGKILL)
            for inf in list(w.inflight.values()):
                if inf.deadline is not None and mono >= inf.deadline and not inf.timed_out:
                    inf.timed_out = True
                    self.terminate(w, now, f"message {inf.attempt.msg_id} ran past the queue's timeout")
                if now >= inf.renew_at:
                    self._renew(w, inf, now)

    def _renew(self, w: Worker, inf: InFlight, now: float) -> None:
        inf.renew_at = now + RENEW
        try:
            cancel = self.store.heartbeat(inf.attempt, lease=LEASE).cancel_requested
        except LeaseLost:
            if not inf.lost:
                inf.lost = True
                self.terminate(w, now, f"{inf.attempt.msg_id} lost its lease to another host")
            return
        except (OSError, SpoolqError) as e:
            log.warning("%s/%s: cannot renew the lease: %s", w.queue, inf.attempt.msg_id, e)
            return
        if cancel:
            self.cancel(w.queue, inf.attempt.msg_id)

    def next_time(self) -> float | None:
        """The next wall-clock time something is due (monotonic ones converted)."""
        times: list[float] = []
        to_wall = self.clock() - self.runner.mono()
        for w in self.by_pid.values():
            if w.kill_at is not None:
                times.append(w.kill_at + to_wall)
            if w.broken_at is not None and not w.terminated:
                times.append(w.broken_at + KILL_GRACE + to_wall)
            for inf in w.inflight.values():
                times.append(inf.renew_at)
                if inf.deadline is not None and not inf.timed_out:
                    times.append(inf.deadline + to_wall)
        return min(times, default=None)

    def terminate(self, w: Worker, now: float, why: str) -> None:
        if not w.terminated:
            w.terminated = why
            log.warning("queue %s: stopping worker %d (pid %d): %s", w.queue, w.slot, w.pid, why)
        self.drain(w)
        kill_group(w.pid, signal.SIGTERM)
        if w.kill_at is None:
            w.kill_at = self.runner.mono() + KILL_GRACE

    def cancel(self, queue: str, msg_id: str) -> bool:
        """A running message was cancelled: stop the worker that holds it. False if none does."""
        for w in list(self.by_pid.values()):
            inf = w.inflight.get(msg_id) if w.queue == queue else None
            if inf is not None:
                if not inf.cancelled:
                    inf.cancelled = True
                    self.terminate(w, self.clock(), f"message {msg_id} was cancelled")
                return True
        return False

    def stop_all(self, now: float, *, kill: bool) -> None:
        """The daemon stops: no more messages; with ``kill``, SIGTERM (grace is over)."""
        for w in list(self.by_pid.values()):
            w.stopping = True
            if kill:
                if not w.terminated:
                    self.terminate(w, now, "the daemon is stopping")
            elif not w.draining:
                self.drain(w)

    def retire(self, queue: str) -> None:
        """The queue is gone, or no longer of kind worker: its workers finish and exit."""
        pool = self.pools.pop(queue, None)
        for w in pool.workers.values() if pool else ():
            if not w.draining:
                log.info("queue %s: letting worker %d (pid %d) go", queue, w.slot, w.pid)
                self.drain(w)

    def check(self, queue: str, msg_id: str, now: float) -> None:
        """The store reports a cancel of ``msg_id``: if a worker holds it, ask the store
        (the lease's heartbeat) and stop that worker if it is so."""
        for w in list(self.by_pid.values()):
            inf = w.inflight.get(msg_id) if w.queue == queue else None
            if inf is not None and not inf.cancelled:
                self._renew(w, inf, now)

    # -- exits -----------------------------------------------------------------------------
    def reap(self) -> None:
        for pid, w in list(self.by_pid.items()):
            if not has_exited(pid):
                continue
            if w.terminated or w.stopping:
                kill_group(pid, signal.SIGKILL)  # what it left behind, while its pid is held
            self._exited(w, reap(pid))

    def _exited(self, w: Worker, code: int) -> None:
        """Settle the answers it wrote before it died, then what it still held."""
        del self.by_pid[w.pid]
        if not w.eof:
            self.read(w)
        if not w.eof:
            try:
                self.sel.unregister(w.spawned.status_fd)
            except (KeyError, ValueError):
                pass
        rest = w.lines.flush()
        if rest:
            self.handle(w, rest)
        # What of its input it read: a line still in the pipe never reached it.
        taken = w.written_bytes - _unread(w.spawned.reply_fd)
        self._close_input(w)
        try:
            os.close(w.spawned.status_fd)
        except OSError:
            pass
        pool = self.pool(w.queue)
        if pool.workers.get(w.slot) is w:
            del pool.workers[w.slot]
        try:
            os.unlink(self._pidfile(w))
        except OSError:
            pass
        how = protocol.describe_exit(code)
        now = self.clock()
        held = len(w.inflight)
        for inf in list(w.inflight.values()):
            m = inf.attempt.message
            if inf.cancelled or inf.timed_out:
                why = "cancelled" if inf.cancelled else (
                    f"TIMEOUT - killed after {self._timeout(w.queue):g} s (the worker's process group "
                    f"was terminated; its exit status was {how})")
                self._conclude(w, inf, Outcome(State.ERR, why, m.count))
            elif inf.end > taken:
                # Its line never reached the worker (unwritten, or unread in the pipe: a
                # worker that dies at start reads nothing): it was not tried.
                self._conclude(w, inf, Outcome(State.QUE, "requeued: its worker exited before taking it",
                                               m.count), note="requeued")
            elif w.stopping or w.terminated:
                # Stopped by the daemon for another message's sake, or because it stops: this
                # one did nothing wrong.
                why = w.terminated or "the daemon stopped"
                self._conclude(w, inf, Outcome(State.QUE, f"requeued: its worker was stopped ({why})", m.count),
                               note="requeued")
            else:
                self._conclude(w, inf, crash_outcome(m, f"its worker (pid {w.pid}) exited with status {how} "
                                                        "while it held the message"), note="worker died")
        young = now - w.started < YOUNG and not w.answered
        if w.stopping or w.terminated or (code == 0 and w.draining):
            pass
        elif young or held:
            pool.fails += 1
            wait = self._backoff(pool, now) if young else 0.0
            log.error("queue %s: worker %d (pid %d) exited with status %s holding %d message(s)%s", w.queue,
                      w.slot, w.pid, how, held, f"; next start in {wait:g} s" if wait else "")
        else:
            log.warning("queue %s: worker %d (pid %d) exited with status %s", w.queue, w.slot, w.pid, how)
        self.changed(w.queue)

    def _timeout(self, queue: str) -> float:
        cfg = self._cfg(queue)
        return cfg.timeout if cfg is not None and cfg.timeout is not None else 0.0


def _unread(fd: int) -> int:
    """Bytes written to the pipe ``fd`` (its write end) that its reader has not read."""
    if fd < 0:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return 0


def helper_dir(part: Part) -> str:
    """Where under ``<home>/workers`` a dispatch process keeps its workers' files: the main
    process in ``workers`` itself, helper ``i`` of ``serve --dispatchers`` in ``workers/d<i>``."""
    return "" if part.main else f"d{part.index}"


def kill_orphans(home: Path, subdir: str | None = None) -> int:
    """Kill the workers a dead daemon left running (their pid files under ``<home>/workers``,
    and its dispatch helpers' under ``workers/d<i>``; only ``workers/<subdir>`` if given, a
    helper's own); returns how many. Only a process that is really that worker (same pid
    and start time, on this host) is touched."""
    base = home / WORKERS_DIR
    if subdir is not None:
        return _kill_orphans_in(base / subdir)
    killed = _kill_orphans_in(base)
    for d in sorted(base.glob("d[0-9]*")):
        killed += _kill_orphans_in(d)
    return killed


def _kill_orphans_in(d: Path) -> int:
    killed = 0
    try:
        names = [n for n in os.listdir(d) if n.endswith(".pid") and not n.startswith(".")]
    except OSError:
        return 0
    for name in names:
        try:
            pid_s, ns_s, host = (d / name).read_text().split()[:3]
            pid, ns = int(pid_s), int(ns_s)
        except (OSError, ValueError):
            pid, ns, host = 0, 0, ""
        if host == HOST and same_process(pid, ns):
            kill_group(pid, signal.SIGKILL)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            killed += 1
            log.warning("killed orphaned worker pid %d (%s)", pid, name)
        try:
            os.unlink(d / name)
        except OSError:
            pass
    return killed

