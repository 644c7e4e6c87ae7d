"""Store chores that walk many files, done by a thread so the dispatch loop never waits.

The start-up recount of each queue (a walk of its whole tree, seconds for a million
messages) and the sweeps of staging debris and empty buckets (at start, then every
``--sweep`` seconds) run here. The loop hands in tasks and gets results back through a
pipe it selects on, so it learns of a finished recount without polling. Nothing here
touches the loop's state: results are plain values.

Why a recount holds its queue back: ``recount`` rebuilds the counts file under its
exclusive lock (I8), and every move of that queue adds its delta under the same lock, so a
move would wait for the whole walk. The loop therefore starts nothing in a queue until its
recount is done (``QueueState.ready``); other queues go on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass

from ..store.base import LocalSpool, Store

log = logging.getLogger("spoolq.daemon")

RECOUNT = "recount"
SWEEP = "sweep"
SWEEP_ROOT = "sweep-root"


@dataclass(frozen=True)
class Result:
    kind: str
    queue: str  # "" for the root
    removed: tuple[str, ...] = ()
    recovered: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    error: str = ""


class Housekeeper:
    """One background thread working through (kind, queue) tasks in order."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._tasks: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._results: deque[Result] = deque()
        self._outstanding = 0  # tasks handed in and not yet reported back (loop thread only)
        self._stop = threading.Event()
        self.fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="spoolq-housekeeping", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Tasks are still in flight (a new round of sweeps waits for the last one)."""
        return self._outstanding > 0

    def start_up(self, queues: list[str]) -> None:
        """The start-up chores: sweep the root, recount every queue, then sweep them.

        Recounts go smallest first, by the counts cache (read without a walk; a queue
        without one goes last): a million-message queue must not keep small ones waiting.
        """
        self.submit(SWEEP_ROOT)
        for name in sorted(queues, key=self._cached_size):
            self.submit(RECOUNT, name)
        for name in queues:
            self.submit(SWEEP, name)

    def _cached_size(self, queue: str) -> float:
        if not isinstance(self.store, LocalSpool):
            return 0.0
        counts = self.store.cached_counts(queue)
        return float(sum(counts.values())) if counts is not None else float("inf")

    def submit(self, kind: str, queue: str = "") -> None:
        self._outstanding += 1
        self._tasks.put((kind, queue))

    def results(self) -> list[Result]:
        """What finished since the last call (call when ``fd`` is readable; never blocks)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        out: list[Result] = []
        while self._results:
            out.append(self._results.popleft())
        self._outstanding -= len(out)
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the task in hand (a long recount may still be finishing: it is left to
        the process's exit, which drops its lock; the file is only written at its end)."""
        self._stop.set()
        self._tasks.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():  # else it may still write: the fds go with the process
            for fd in (self.fd, self._wake_w):
                os.close(fd)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None or self._stop.is_set():
                return
            kind, name = task
            try:
                if kind == RECOUNT:
                    self.store.recount(name)
                    res = Result(kind, name)
                elif kind == SWEEP:
                    swept = self.store.sweep(name)
                    res = Result(kind, name, tuple(swept.removed), tuple(swept.recovered), tuple(swept.problems))
                elif isinstance(self.store, LocalSpool):
                    res = Result(kind, name, tuple(self.store.sweep_root()))
                else:
                    res = Result(kind, name)
            except Exception as e:  # noqa: BLE001 - a chore that fails is reported, never fatal
                res = Result(kind, name, error=f"{type(e).__name__}: {e}")
            self._results.append(res)
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass  # the pipe is full: the loop has a wake-up pending already
