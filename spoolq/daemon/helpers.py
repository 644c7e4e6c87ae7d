"""``serve --dispatchers K``: the main process starts K-1 dispatch helpers and keeps them
running (docs/plans/sharded-dispatch.md, parts.py).

A helper is ``spoolq serve`` in helper mode (``--dispatch-part``): it holds its own lock
(``dispatch.<i>.pid``), dispatches only its part of the split queues, and dies with the
main process (``PR_SET_PDEATHSIG``: SIGKILL). A helper that dies is started again, with
backoff; its start recovers the ``run/`` messages of its part, as any daemon's start does.
The main process starts them once its own recovery and recounts are done, so no recount
walks beside a helper's moves, and no helper runs while the main process recovers.

A helper's ``state`` events (a message started, ended) and its ``/metrics`` counters reach
the main process as JSON lines on the helper's stdout (:class:`ForwardingBus`); the main
process says on the helper's stdin whether anyone listens to ``state`` events, so that a
helper builds none for nobody. Other events (``admin``, ``queue_change``) the main process
publishes itself, for every queue.

A helper killed loses the counts deltas it had not flushed yet (I8), as a killed daemon
does; a daemon's next start recounts, and so does this: when a helper dies, the others are
stopped too, the shared queues are recounted (the main process's own moves numbered
against the walk, as at its start), and then every helper starts again.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..events import Event, EventBus
from ..parts import Part
from ..runner.protocol import LineBuffer, read_lines
from ..runner.spawn import has_exited, reap

log = logging.getLogger("spoolq.daemon")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
YOUNG = 2.0
"""A helper that dies within this many seconds of its start is started again with backoff."""
PR_SET_PDEATHSIG = 1
GIVE_UP = 5
"""A helper that dies this many times in a row, each within YOUNG of its start: the main
process dispatches the split queues alone from then on (the parts are planned again)."""
KILL_AFTER = 15.0
"""After the grace: time a helper gets to stop its workers (their own 5 s included) and
hand back what they held, before it is killed."""


def _longer(backoff: float) -> float:
    return min(BACKOFF_MAX, max(BACKOFF_FIRST, backoff * 2))


@dataclass
class Helper:
    part: Part
    proc: subprocess.Popen[bytes] | None = None
    quick_deaths: int = 0  # in a row, each within YOUNG of its start
    started: float = 0.0
    start_at: float = 0.0  # when to start it (again)
    backoff: float = 0.0
    lines: LineBuffer = field(default_factory=LineBuffer)  # its stdout: events and counters
    last_stats: dict[str, Any] | None = None  # its counters as last applied (JobStats.apply)
    told: bool | None = None  # what it was last told of "state" events (wanted or not)
    exits: int = 0  # exits nobody asked for (/metrics)


class Helpers:
    """The main process's dispatch helpers: started, watched, restarted, stopped."""

    def __init__(self, parts: Sequence[Part], argv: Sequence[str], sel: selectors.BaseSelector) -> None:
        self.helpers = [Helper(p) for p in parts]
        self.sel = sel  # each helper's stdout is registered with it, the Helper as its data
        self.argv = list(argv)  # the command up to and including "serve", with its options
        self.running = False  # started once the main process is ready
        self.stopping = False
        self.recount = False  # a helper died: once none runs, recount the shared queues
        # Every time here (start_at, kill_at) is on the supervisor's monotonic clock.
        self.kill_at: float | None = None  # stop_now: SIGKILL whatever still runs then
        self.given_up = False  # helpers keep dying at start: the main process takes their parts

    def start_all(self, now: float) -> None:
        self.running = True
        for h in self.helpers:
            h.start_at = max(h.start_at, now)
        self.tick(now)

    def _start(self, h: Helper, now: float) -> None:
        argv = [*self.argv, "--dispatch-part", h.part.arg(), "--dispatch-parent", str(os.getpid())]
        try:
            # Its stdin is a pipe from here: EOF (the pipe closed by stop, or by this process's
            # death) tells it to stop. A signal would do, except that a service manager's
            # SIGTERM reaches the whole group, and a second one means "stop now".
            h.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as e:
            h.backoff = _longer(h.backoff)
            h.start_at = now + h.backoff
            log.error("dispatch helper %d: cannot start: %s; trying again in %g s", h.part.index, e, h.backoff)
            return
        h.started = now
        h.lines, h.last_stats, h.told = LineBuffer(), None, None
        assert h.proc.stdout is not None
        os.set_blocking(h.proc.stdout.fileno(), False)
        self.sel.register(h.proc.stdout.fileno(), selectors.EVENT_READ, h)
        log.info("dispatch helper %d of %d started, pid %d", h.part.index, h.part.count, h.proc.pid)

    def read(self, h: Helper) -> list[dict[str, Any]]:
        """What a helper wrote on its stdout (events and counters, one JSON object a line);
        at EOF its stdout is closed."""
        if h.proc is None or h.proc.stdout is None or h.proc.stdout.closed:
            return []
        lines, eof = read_lines(h.proc.stdout.fileno(), h.lines)
        if eof:
            self._close_stdout(h)
        out = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def _close_stdout(self, h: Helper) -> None:
        if h.proc is not None and h.proc.stdout is not None and not h.proc.stdout.closed:
            try:
                self.sel.unregister(h.proc.stdout.fileno())
            except (KeyError, ValueError):
                pass
            h.proc.stdout.close()

    def tell(self, wants_state: bool) -> None:
        """Tell each running helper whether anyone listens to ``state`` events (a line on
        its stdin, when that changed or it is new)."""
        for h in self.helpers:
            stdin = h.proc.stdin if h.proc is not None else None
            if stdin is None or stdin.closed or h.told == wants_state:
                continue
            try:
                stdin.write(json.dumps({"wants_state": wants_state}).encode() + b"\n")
                stdin.flush()
                h.told = wants_state
            except OSError:
                pass  # it is on its way out: its exit is noticed by tick

    def tick(self, now: float) -> None:
        """Start what is due; notice helpers that exited (SIGCHLD) and plan their restart."""
        for h in self.helpers:
            if h.proc is not None and has_exited(h.proc.pid):
                code = reap(h.proc.pid)
                h.proc.returncode = code  # reaped here: subprocess must not wait for it
                self._close_stdout(h)
                if h.proc.stdin is not None:
                    h.proc.stdin.close()
                pid, h.proc = h.proc.pid, None
                if self.stopping:
                    continue
                if not self.running:  # asked to stop (a recount, a re-plan)
                    if code != 0:  # but it died: its counts deltas are lost (I8)
                        h.exits += 1
                        log.error("dispatch helper %d (pid %d) exited with %d while stopping", h.part.index,
                                  pid, code)
                        self.recount = True
                    continue
                h.exits += 1
                young = now - h.started < YOUNG
                h.quick_deaths = h.quick_deaths + 1 if young else 0
                if h.quick_deaths >= GIVE_UP:
                    self.given_up = True
                h.backoff = _longer(h.backoff) if young else 0.0
                h.start_at = now + h.backoff
                log.error("dispatch helper %d (pid %d) exited with %d; recounting the shared queues and "
                          "starting the helpers again in %g s at the earliest", h.part.index, pid, code, h.backoff)
                self._stop_for_recount()
            if self.running and not self.stopping and h.proc is None and now >= h.start_at:
                self._start(h, now)
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self.signal(signal.SIGKILL)

    def _stop_for_recount(self) -> None:
        """A helper died: stop the others (they hand back what they hold); the supervisor
        recounts once none runs (:attr:`recount`), then starts them all (:meth:`start_all`)."""
        self.recount = True
        self.pause()

    def pause(self) -> None:
        """Stop every helper (EOF: they hand back what they hold) and start none until
        :meth:`start_all`."""
        self.running = False
        for h in self.helpers:
            if h.proc is not None and h.proc.stdin is not None and not h.proc.stdin.closed:
                h.proc.stdin.close()

    def set_split(self, split: frozenset[str]) -> None:
        """New parts for the helpers (they are stopped: :meth:`pause`)."""
        for h in self.helpers:
            h.part = Part(h.part.index, h.part.count, split)

    def next_time(self) -> float | None:
        times = [] if self.kill_at is None else [self.kill_at]
        if self.running and not self.stopping:
            times += [h.start_at for h in self.helpers if h.proc is None]
        return min(times, default=None)

    def stop(self) -> None:
        """EOF on each helper's stdin: it stops as a daemon does, with the same grace."""
        self.stopping = True
        self.pause()

    def stop_now(self, now: float) -> None:
        """The grace is over: SIGTERM, a helper's second word to stop (it stops its workers
        now and hands back what they held), and SIGKILL what still runs
        :data:`KILL_AFTER` seconds later."""
        self.stop()
        self.signal(signal.SIGTERM)
        if self.kill_at is None:
            self.kill_at = now + KILL_AFTER

    def signal(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def alive(self) -> bool:
        return any(h.proc is not None for h in self.helpers)

    def pids(self) -> list[int]:
        # Each proc read once: /metrics asks from the HTTP thread while tick may clear it.
        return [p.pid for p in (h.proc for h in self.helpers) if p is not None]

    def metrics(self) -> list[str]:
        """Prometheus lines (read from the HTTP thread: a glance, not a transaction)."""
        lines = ["# HELP spoolq_dispatch_helper_exits_total Exits of a dispatch helper that nobody asked for "
                 "(each one means a recount of the shared queues and a restart).",
                 "# TYPE spoolq_dispatch_helper_exits_total counter"]
        lines += [f'spoolq_dispatch_helper_exits_total{{helper="{h.part.index}"}} {h.exits}' for h in self.helpers]
        lines += ["# HELP spoolq_dispatch_helpers_given_up 1 when the helpers kept dying at start and the main "
                  "process dispatches every queue alone.", "# TYPE spoolq_dispatch_helpers_given_up gauge",
                  f"spoolq_dispatch_helpers_given_up {int(self.given_up)}"]
        return lines


class ForwardingBus(EventBus):
    """A dispatch helper's event bus: ``state`` events, while the main process says someone
    listens, and its counters go to the main process as JSON lines on ``fd`` (stdout).
    Non-blocking: what the pipe does not take waits in a buffer of at most
    :data:`PENDING_MAX` bytes, and events beyond it are dropped (they are news, not a
    record; the counters are sent whole each time, so a later line makes up for a lost one)."""

    def __init__(self, fd: int = 1) -> None:
        super().__init__()
        self.fd = fd
        os.set_blocking(fd, False)
        self.state_wanted = False
        self.pending = bytearray()
        self.dropped = 0

    @property
    def listening(self) -> bool:
        return self.state_wanted

    def wants(self, kind: str) -> bool:
        return kind == "state" and self.state_wanted

    def publish(self, event: Event) -> None:
        if event.get("event") != "state" or not self.state_wanted:
            return  # the main process publishes every other kind itself
        event.setdefault("at", round(time.time(), 3))
        self.send({"e": event})

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        if len(self.pending) + len(data) > PENDING_MAX:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("the main process does not read this helper's events: dropping them")
            return
        self.pending += data
        self.flush()

    def flush(self) -> None:
        while self.pending:
            try:
                n = os.write(self.fd, self.pending)
            except BlockingIOError:
                return
            except OSError:
                self.pending.clear()  # the main process is gone: this helper dies with it
                return
            del self.pending[:n]


PENDING_MAX = 1 << 20


def die_with_parent(parent: int) -> None:
    """A helper: SIGKILL when the process that started it dies, and exit at once if it is
    gone already (it may have died before the request was made)."""
    libc = ctypes.CDLL(None, use_errno=True)  # the C library this Python runs on (glibc, musl)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        log.error("the main spoolq process (pid %d) is gone: not starting", parent)
        sys.exit(1)
