"""``serve --dispatchers K``: the main process starts K-1 dispatch helpers and keeps them
running (docs/plans/sharded-dispatch.md, parts.py).

A helper is ``spoolq serve`` in helper mode (``--dispatch-part``): it holds its own lock
(``dispatch.<i>.pid``), dispatches only its part of the split queues, and dies with the
main process (``PR_SET_PDEATHSIG``: SIGKILL). A helper that dies is started again, with
backoff; its start recovers the ``run/`` messages of its part, as any daemon's start does.
The main process starts them once its own recovery and recounts are done, so no recount
walks beside a helper's moves, and no helper runs while the main process recovers.

A helper killed loses the counts deltas it had not flushed yet (I8), as a killed daemon
does; a daemon's next start recounts, and so does this: when a helper dies, the others are
stopped too, the shared queues are recounted (the main process's own moves numbered
against the walk, as at its start), and then every helper starts again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..parts import Part
from ..runner.spawn import has_exited, reap

log = logging.getLogger("spoolq.daemon")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
YOUNG = 2.0
"""A helper that dies within this many seconds of its start is started again with backoff."""
PR_SET_PDEATHSIG = 1


@dataclass
class Helper:
    part: Part
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    start_at: float = 0.0  # when to start it (again)
    backoff: float = 0.0


class Helpers:
    """The main process's dispatch helpers: started, watched, restarted, stopped."""

    def __init__(self, parts: Sequence[Part], argv: Sequence[str]) -> None:
        self.helpers = [Helper(p) for p in parts]
        self.argv = list(argv)  # the command up to and including "serve", with its options
        self.running = False  # started once the main process is ready
        self.stopping = False
        self.recount = False  # a helper died: once none runs, recount the shared queues

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
            h.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, close_fds=True)
        except OSError as e:
            h.backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, h.backoff * 2))
            h.start_at = now + h.backoff
            log.error("dispatch helper %d: cannot start: %s; trying again in %g s", h.part.index, e, h.backoff)
            return
        h.started = now
        log.info("dispatch helper %d of %d started, pid %d", h.part.index, h.part.count, h.proc.pid)

    def tick(self, now: float) -> None:
        """Start what is due; notice helpers that exited (SIGCHLD) and plan their restart."""
        for h in self.helpers:
            if h.proc is not None and has_exited(h.proc.pid):
                code = reap(h.proc.pid)
                h.proc.returncode = code  # reaped here: subprocess must not wait for it
                if h.proc.stdin is not None:
                    h.proc.stdin.close()
                pid, h.proc = h.proc.pid, None
                if self.stopping or not self.running:
                    continue  # stopped by us
                h.backoff = (min(BACKOFF_MAX, max(BACKOFF_FIRST, h.backoff * 2)) if now - h.started < YOUNG
                             else 0.0)
                h.start_at = now + h.backoff
                log.error("dispatch helper %d (pid %d) exited with %d; recounting the shared queues and "
                          "starting the helpers again in %g s at the earliest", h.part.index, pid, code, h.backoff)
                self._stop_for_recount()
            if self.running and not self.stopping and h.proc is None and now >= h.start_at:
                self._start(h, now)

    def _stop_for_recount(self) -> None:
        """A helper died: stop the others (they hand back what they hold); the supervisor
        recounts once none runs (:attr:`recount`), then starts them all (:meth:`start_all`)."""
        self.running = False
        self.recount = True
        for h in self.helpers:
            if h.proc is not None and h.proc.stdin is not None and not h.proc.stdin.closed:
                h.proc.stdin.close()

    def next_time(self) -> float | None:
        if not self.running or self.stopping:
            return None
        return min((h.start_at for h in self.helpers if h.proc is None), default=None)

    def stop(self, *, kill: bool = False) -> None:
        """EOF on each helper's stdin (it then stops as a daemon does), or SIGKILL at the
        grace's end."""
        self.stopping = True
        for h in self.helpers:
            if h.proc is None:
                continue
            if h.proc.stdin is not None and not h.proc.stdin.closed:
                h.proc.stdin.close()
            if kill:
                try:
                    os.kill(h.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def alive(self) -> bool:
        return any(h.proc is not None for h in self.helpers)

    def pids(self) -> list[int]:
        return [h.proc.pid for h in self.helpers if h.proc is not None]


def die_with_parent(parent: int) -> None:
    """A helper: SIGKILL when the process that started it dies, and exit at once if it is
    gone already (it may have died before the request was made)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        log.error("the main spoolq process (pid %d) is gone: not starting", parent)
        sys.exit(1)
