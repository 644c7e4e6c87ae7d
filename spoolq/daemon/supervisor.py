"""``spoolq serve``: one supervisor per spool root.

A single-threaded event loop (``selectors``) waits on: the store's change feed
(``Store.watch()``: new messages, run-now, cancels, config and admin-state changes, new
queues; inotify on the filesystem), a self-pipe fed by signals (SIGCHLD, SIGHUP, SIGTERM,
SIGINT), the housekeeping thread's pipe, and each running script's status pipe. Its
timeout is the nearest due time, job deadline, retry of a held finish or sweep, so an idle
daemon sleeps in the kernel. The daemon takes messages only through ``Store.claim`` and
ends them only through the fenced ``Store.finish``. Work that grows with the number of
messages is never done in one piece here: the store's indexing gets at most :data:`SLICE`
seconds per iteration (``Watcher.changes``), and whole-tree walks (recount, sweep) run on
the housekeeping thread. ``step()`` runs one iteration, so tests and tools can drive the loop without
sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from .. import builtin
from ..config import RootConfig
from ..errors import DaemonRunning, InvalidConfig, QueueNotFound, ScriptUnusable, SpoolqError, StorageError
from ..events import EventBus
from ..model import AdminState, QueueConfig
from ..parts import WHOLE, Part, splittable
from ..runner.protocol import LineBuffer, read_lines
from ..runner.spawn import has_exited, kill_group, reap, reserve_low_fds, script_problem
from ..store.base import Change, DispatchParts, LiveRecounts, LostFoundRepair, Store, Watcher
from ..store.leases import Attempt
from .finish import RETRY_FIRST, RETRY_MAX, Finish
from .helpers import ForwardingBus, Helper, Helpers
from .housekeeping import RECOUNT, SWEEP, SWEEP_ROOT, Housekeeper
from .httpjobs import HttpJobs
from .jobs import LEASE, Job, JobRunner, crash_outcome, root_env
from .queue import QueueState
from .recovery import recover_queue
from .scandir import Scandir
from .timers import Timers
from .workers import Worker, WorkerInput, Workers, helper_dir, kill_orphans

log = logging.getLogger("spoolq.daemon")

SCRIPT_RECHECK = 5.0
"""Seconds between checks of a SCRIPTERROR queue's script (config changes recheck at once)."""
RECLAIM_EVERY = LEASE / 2
"""Seconds between looks for attempts whose holder is gone (another host died)."""
SLICE = 0.004
"""Seconds of the store's indexing per loop iteration at most: what a big queue can delay
the others."""
STORE_RETRY = 0.5
"""Seconds between tries of the loop while the store fails (a database out of reach)."""


class Daemon:
    """The daemon serving ``store``; ``home`` holds its own files (relative scripts, the
    webhook placeholder, ``config.json``'s ``env``): the spool root on the filesystem."""

    def __init__(self, store: Store, *, home: str | os.PathLike[str], host: str | None = None,
                 port: int | None = None, grace: float = 30.0, sweep_interval: float = 300.0,
                 clock: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                 builtin_queues: bool = True,
                 events: EventBus | None = None, dispatchers: int = 1, part: Part | None = None,
                 helper_argv: Sequence[str] = ()) -> None:
        self.store = store
        # `serve --dispatchers` (parts.py, helpers.py): the main process runs `dispatchers`
        # processes in all and starts the others with `helper_argv`; a helper is given its
        # `part`. The main process's own part is known once recovery is done (setup).
        self.dispatchers = dispatchers
        self.part = part or WHOLE
        self.helper_argv = list(helper_argv)
        self.helpers: Helpers | None = None
        self.helpers_ever: Helpers | None = None  # kept for /metrics once the split is gone
        self._parent_lines = LineBuffer()  # a helper's stdin
        self._stats_at = 0.0  # a helper: when its counters go to the main process next
        self._stats_sent = 0  # the counters' version last sent
        self.recounting: set[str] = set()  # queues whose recount the housekeeper has not done yet
        self.replan: set[str] = set()  # split queues that can no longer be split (_share)
        self.home = Path(home)
        self.builtin_queues = builtin_queues
        self.events = events or EventBus()  # the notifier's channels and the SSE stream listen
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        cfg = self.store.root_config()
        self.rootcfg = RootConfig(host=host or cfg.host, port=port if port is not None else cfg.port)
        self.grace = grace
        self.sweep_interval = sweep_interval
        self.clock = clock
        self.mono = mono  # durations: timeouts, grace, kills (JobRunner.mono)
        self.queues: dict[str, QueueState] = {}
        self.jobs: dict[int, Job] = {}
        self.stopping = False
        self.grace_end: float | None = None
        self.next_sweep = 0.0
        self.next_reclaim = 0.0
        self.refresh_queues = True
        self.flags: set[int] = set()
        self.sel: selectors.BaseSelector  # created in setup(), after fds 3 and 4 are claimed
        self.watcher: Watcher | None = None
        self.runner: JobRunner | None = None
        self.workers: Workers | None = None
        self.http: HttpJobs | None = None
        self.timers: Timers | None = None
        self.timers_at = 0.0  # time.monotonic() when the timers are looked at next
        self.scandir: Scandir | None = None
        self.housekeeper: Housekeeper | None = None

    # -- setup / teardown ----------------------------------------------------------------
    def metrics_text(self) -> str:
        """What ``/metrics`` adds for the daemon: the runner's counters (stats.py), and how
        many processes dispatch (``serve --dispatchers``: the helpers alive, their exits)."""
        text = self.runner.stats.render().rstrip("\n") if self.runner is not None else ""
        helpers, ever = self.helpers, self.helpers_ever
        lines = ["# HELP spoolq_dispatch_processes The main process and the dispatch helper processes running "
                 "now (serve --dispatchers).", "# TYPE spoolq_dispatch_processes gauge",
                 f"spoolq_dispatch_processes {1 + (len(helpers.pids()) if helpers is not None else 0)}"]
        if ever is not None:  # after the split is gone too: its exits, and whether it was given up
            lines += ever.metrics()
        return "\n".join([*([text] if text else []), *lines]) + "\n"

    def acquire(self) -> None:
        """Become the store's daemon (the filesystem: ``<root>/daemon.pid`` locked);
        DaemonRunning if another is."""
        self.store.acquire_daemon()

    def release(self) -> None:
        self.store.release_daemon()

    def setup(self) -> None:
        """Everything before the loop: lock, root config, signals, watches, recovery.

        Nothing here needs to write except recovery's moves (which are held and retried
        when the disk refuses them): on a full disk the daemon starts, serves reads and
        runs what it can.
        """
        if not reserve_low_fds():  # before this process opens anything else
            log.info("fds 3 and 4 are taken: scripts are spawned through the slower preexec path")
        self.sel = selectors.DefaultSelector()
        helper = not self.part.main
        if self.part.count > 1 or self.dispatchers > 1:
            if not isinstance(self.store, DispatchParts):
                raise InvalidConfig("several dispatch processes (--dispatchers) need a directory spool")
            self.store.part = self.part  # a helper's lock and recovery are its part's; main's: all
        self.acquire()
        if self.part.main and isinstance(self.store, DispatchParts):
            # Helpers of an earlier serve (--dispatchers) die with it, which takes a moment:
            # none may run while this one recovers run/.
            held = self.store.wait_for_helpers(10.0)
            if held:
                self.release()
                raise DaemonRunning(f"a dispatch helper of an earlier spoolq serve still holds {held[0]}")
        if not helper:
            try:
                self.store.set_root_config(self.rootcfg)
            except StorageError as e:
                log.warning("cannot record host and port: %s; full ids printed by the CLI may name another "
                            "port until it is written", e)
        self.runner = JobRunner(self.store, self.home, self.rootcfg, self.clock,
                                os.environ.get("RQ_ENV") or root_env(self.home), self.owner, self.mono)
        self.workers = Workers(self.runner, self.sel, self.home, self.rootcfg, self.clock,
                               finished=self._finished, changed=self._workers_changed,
                               config=self._config_of, subdir=helper_dir(self.part))
        self.http = HttpJobs(self.runner, self.sel, self.clock, finished=self._finished)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r = rfd
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.sel.register(rfd, selectors.EVENT_READ, "wake")
        self.watcher = self.store.watch()
        self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, "store")
        self.housekeeper = Housekeeper(self.store)
        self.sel.register(self.housekeeper.fd, selectors.EVENT_READ, "housekeeping")
        if helper:
            # The main process's word, and its stop (EOF), on stdin (helpers.py)
            os.set_blocking(sys.stdin.fileno(), False)
            self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "parent")
            self._setup_helper()
            return
        if isinstance(self.store, LostFoundRepair):
            found = self.store.recover_lost_found()  # I10: what e2fsck moved there after a power cut
            for line in found.recovered:
                log.warning("put back %s", line)
            for line in found.problems:
                log.warning("lost+found: %s", line)
        if kill_orphans(self.home):
            log.warning("killed the persistent workers of a daemon that is gone")
        if self.builtin_queues:
            try:
                made = builtin.first_start(self.store, self.home)
                if builtin.ensure_router_queue(self.store, self.home):
                    made.append(builtin.ROUTER_QUEUE)
                if made:
                    log.info("made the built-in queues %s", ", ".join(made))
            except (SpoolqError, OSError) as e:
                log.error("cannot make the built-in queues: %s", e)
        names = self.store.queues()
        try:
            # One flush for all of recovery's moves (the filesystem: a syncfs at the end of
            # the block instead of four fsyncs per message), before anything is dispatched.
            with self.store.durable_batch():
                for name in names:
                    try:
                        self.store.set_script_error(name, None)  # a dead daemon's verdict; found again if true
                    except SpoolqError as e:
                        log.warning("queue %s: %s", name, e)
                    # D2: run/ is emptied before anything is dispatched. Moves the store refuses
                    # are held by the finisher and retried; nothing else is written here.
                    self._recover(name)
                self.timers = Timers(self.store, self.home, self.clock)  # finishes a dead daemon's tick
        except StorageError as e:
            log.error("%s; a crash now may run the recovered messages once more", e)
        if self.timers is None:
            self.timers = Timers(self.store, self.home, self.clock)
        if self.dispatchers > 1:
            self._plan_helpers(names)
        try:
            self.scandir = Scandir(self.store, self.home)
            self.sel.register(self.scandir.fileno(), selectors.EVENT_READ, "scandir")
        except OSError as e:
            log.error("scandir: cannot watch %s: %s; links there are not read", self.home, e)
        self.refresh(starting=True)
        # Recounts and sweeps go to the housekeeping thread. A queue starts nothing until its
        # recount is done (the recount holds its counts lock), unless the store numbers our
        # moves against the recount's walk instead (store/fs/recount.py).
        if isinstance(self.store, LiveRecounts):
            for name, qs in self.queues.items():
                qs.ready = self.store.begin_recount(name)
        self.housekeeper.start_up(list(self.queues))
        self.recounting = set(self.queues)  # the dispatch helpers wait for these (_tend_helpers)
        self.next_sweep = self.clock() + self.sweep_interval
        self.next_reclaim = self.clock() + RECLAIM_EVERY

    def _setup_helper(self) -> None:
        """A dispatch helper (helpers.py): its own workers' orphans, the recovery of its part
        of the split queues, and nothing of the main process's (lost+found, built-in
        queues, timers, scandir, recounts, sweeps)."""
        assert self.housekeeper is not None
        if kill_orphans(self.home, helper_dir(self.part)):
            log.warning("killed the persistent workers of a dispatch helper that is gone")
        try:
            with self.store.durable_batch():
                for name in sorted(self.part.split):
                    self._recover(name)
        except StorageError as e:
            log.error("%s; a crash now may run the recovered messages once more", e)
        self.refresh()  # its queues are ready at once: recounts are the main process's
        self.next_sweep = float("inf")  # and so are sweeps
        self.next_reclaim = self.clock() + RECLAIM_EVERY

    def _plan_helpers(self, names: Sequence[str]) -> None:
        """The main process of ``--dispatchers K``, its recovery done: which queues are
        split (parts.py), fixed until the next start; the helpers start once every queue
        is recounted (step)."""
        split = []
        for name in names:
            try:
                if splittable(self.store.queue_config(name), self.dispatchers):
                    split.append(name)
            except SpoolqError:
                continue
        if not split:
            log.warning("--dispatchers %d: no queue can be split (persistent workers, num_workers >= %d, "
                        "no blocking_params, coalesce_params or cluster_workers): one process dispatches",
                        self.dispatchers, self.dispatchers)
            return
        k = self.dispatchers
        self.part = Part(0, k, frozenset(split))
        assert isinstance(self.store, DispatchParts)
        self.store.part = self.part
        self.helpers = Helpers([Part(i, k, self.part.split) for i in range(1, k)], self.helper_argv, self.sel)
        self.helpers_ever = self.helpers
        log.info("%d dispatch processes share the queue(s) %s", k, ", ".join(sorted(split)))

    def _tend_helpers(self, now: float) -> None:
        """Start the dispatch helpers once the shared queues are recounted, and recount
        them again when a helper has died (helpers.py). ``now``: the monotonic clock."""
        helpers = self.helpers
        assert helpers is not None and self.housekeeper is not None and self.runner is not None
        helpers.tick(now)
        helpers.tell(self.events.wants("state"))
        if self.stopping:
            return
        if (self.replan or helpers.given_up) and helpers.running:
            helpers.pause()
        if helpers.running:
            return
        if self.replan or helpers.given_up:
            if helpers.alive():
                return  # they are handing back what they hold
            self._plan_again()
            if self.helpers is None:
                return
        if helpers.recount:
            if helpers.alive():
                return  # the others are handing back what they hold
            helpers.recount = False
            self._recount(self.part.split)
        # Not while a shared queue is recounted (only this process's moves are numbered
        # against the walk), nor while this process holds a finish of one: it may be a
        # message a helper owns, which start-up recovery took (a helper's reclaim would
        # take it again, and run it beside this finish's retry).
        if self.recounting & self.part.split:
            return
        if any(not self.part.owns(fin.queue, fin.msg_id) for fin in self.runner.finisher.held):
            return
        helpers.start_all(now)

    def _recount(self, names: frozenset[str]) -> None:
        """Recount these queues on the housekeeping thread, this process's moves numbered
        against the walk; the helpers wait for it (``recounting``)."""
        assert self.housekeeper is not None
        for name in sorted(names):
            qs = self.queues.get(name)
            if qs is None:
                continue
            qs.ready = self.store.begin_recount(name) if isinstance(self.store, LiveRecounts) else False
            self.housekeeper.submit(RECOUNT, name)
            self.recounting.add(name)

    def _plan_again(self) -> None:
        """Every helper stopped: take out of the split the queues that can no longer be
        split (or all of them if the helpers keep dying at start). Their indexes here are
        made again, owning everything; their configs are read again."""
        assert self.helpers is not None and self.watcher is not None
        drop = set(self.part.split) if self.helpers.given_up else set(self.replan)
        if self.helpers.given_up:
            log.error("the dispatch helpers keep dying at start: dispatching every queue from this process")
        self.replan.clear()
        old = self.part.split
        split = frozenset(old - drop)
        self.part = Part(0, self.part.count, split)
        assert isinstance(self.store, DispatchParts)
        self.store.part = self.part
        for name in drop:
            qs = self.queues.get(name)
            self.watcher.want(name, False)  # its index owned part 0 only
            if qs is not None:
                qs.wanted = False
                qs.config_stale = qs.dirty = True
            # No helper runs: whatever one left in run/ (it died, or was killed past its
            # grace) is this process's now, as after a crash.
            self.store.reclaim_again(name)
            self._recover(name)
        # A helper may have died before it stopped: its counts deltas are lost (I8).
        self.helpers.recount = False
        self._recount(old)
        if not split:
            self.helpers = None
            log.info("no queue is shared any more: one process dispatches")
            return
        self.helpers.set_split(split)
        log.info("%d dispatch processes share the queue(s) %s", self.part.count, ", ".join(sorted(split)))

    def _recover(self, name: str) -> None:
        """Finish the attempts of ``name`` whose holder is gone (recovery.py)."""
        assert self.runner is not None
        try:
            rec = recover_queue(self.runner, name)
        except Exception:  # noqa: BLE001 - run unreadable: the other queues still start
            log.exception("queue %s: recovery failed", name)
            return
        if rec.requeued or rec.failed or rec.killed or rec.held:
            log.warning("queue %s: recovered %d message(s) from run (%d to err, %d held for a "
                        "retry), killed %d orphaned script(s)", name, rec.requeued, rec.failed,
                        rec.held, rec.killed)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.flags.add(signum)

    def close(self) -> None:
        if not self.part.main:
            self._report_to_main(final=True)
        if self.http is not None:
            self.http.close()
        if self.housekeeper is not None:
            self.housekeeper.close()
        if self.scandir is not None:
            self.scandir.close()
        signal.set_wakeup_fd(-1)
        if self.watcher is not None:
            self.watcher.close()
        if hasattr(self, "sel"):
            self.sel.close()
        self.release()  # the store makes every finished move durable before it lets go

    # -- queues and changes ---------------------------------------------------------------
    def refresh(self, *, starting: bool = False) -> None:
        """Sync the set of queues with the store. ``starting``: the queues found at start
        wait for their recount (``ready``)."""
        self.refresh_queues = False
        names = {n for n in self.store.queues() if self.part.serves(n)}
        for gone in set(self.queues) - names:
            log.info("queue %s is gone", gone)
            del self.queues[gone]
            if self.runner is not None:
                self.runner.forget(gone)
            self.events.publish({"event": "queue_change", "queue": gone, "change": "deleted"})
            if self.workers is not None:
                self.workers.retire(gone)
        for name in sorted(names - set(self.queues)):
            self.queues[name] = QueueState(name, ready=not starting)
            if not starting:
                self.events.publish({"event": "queue_change", "queue": name, "change": "created"})

    def on_changes(self) -> None:
        """What the store reports (at most SLICE seconds of its indexing)."""
        assert self.watcher is not None
        for ch in self.watcher.changes(SLICE):
            if ch.kind == "queues":
                self.refresh_queues = True
                continue
            qs = self.queues.get(ch.queue or "")
            if qs is None:
                self.refresh_queues = True
            elif ch.kind == "config":
                qs.dirty = qs.config_stale = True
            elif ch.kind == "work":
                qs.dirty = True
            elif ch.kind == "cancel":
                self._cancel(qs, ch)

    def _cancel(self, qs: QueueState, ch: Change) -> None:
        """Store.cancel of a running message: the script is ours to stop (reap sees the
        request and the message ends in err, "cancelled")."""
        assert self.runner is not None
        job = next((j for j in self.jobs.values() if j.queue == qs.name and j.msg_id == ch.msg_id), None)
        if job is not None and not job.cancelled and self.runner.cancel_asked(job):
            self._cancel_job(job)
        elif job is None and ch.msg_id:
            if self.http is not None and self.http.check(qs.name, ch.msg_id, self.clock()):
                return
            if self.workers is not None:
                self.workers.check(qs.name, ch.msg_id, self.clock())

    def _cancel_job(self, job: Job) -> None:
        assert self.runner is not None
        job.cancelled = True
        log.info("%s/%s: cancelled, terminating its process group", job.queue, job.msg_id)
        self.runner.terminate(job, self.clock())

    def _resync(self) -> None:
        """Changes may have been missed: read every queue's config again, and the store too."""
        assert self.watcher is not None
        self.watcher.resync()
        self.refresh_queues = True
        for qs in self.queues.values():
            qs.config_stale = qs.dirty = True

    def on_housekeeping(self) -> None:
        assert self.housekeeper is not None
        for res in self.housekeeper.results():
            what = f"queue {res.queue}" if res.queue else self.store.url
            if res.error:
                log.warning("%s: %s failed: %s", what, res.kind, res.error)
            for path in res.removed:
                log.info("%s: swept %s", what, path)
            for line in res.recovered:
                log.warning("%s: put back %s", what, line)  # I6: a complete message left in staging
            for line in res.problems:
                log.warning("%s: sweep: %s", what, line)
            log.debug("%s: %s done", what, res.kind)
            qs = self.queues.get(res.queue)
            if res.kind == RECOUNT:
                self.recounting.discard(res.queue or "")
                if qs is not None:
                    qs.ready = qs.dirty = True  # its moves no longer wait for the recount's lock

    # -- signals -------------------------------------------------------------------------
    def on_signals(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        flags, self.flags = self.flags, set()
        if signal.SIGHUP in flags:
            log.info("SIGHUP: re-reading queue configs and timers and walking the queues")
            self._resync()
            self.timers_at = 0.0
            if self.timers is not None:
                self.timers.next_scan = 0.0
            if self.scandir is not None:
                self.scandir.scan_at = 0.0
            if self.helpers is not None:
                self.helpers.signal(signal.SIGHUP)  # the same for their queues
        if flags & {signal.SIGTERM, signal.SIGINT}:
            self.begin_stop()
        self.reap()

    def _parent_says(self) -> None:
        """A dispatch helper's stdin (helpers.py): whether the main process wants ``state``
        events, one JSON line each time that changes; EOF is its stop."""
        lines, eof = read_lines(sys.stdin.fileno(), self._parent_lines)
        for line in lines:
            try:
                wanted = json.loads(line).get("wants_state")
            except (ValueError, AttributeError):
                continue
            if isinstance(self.events, ForwardingBus) and isinstance(wanted, bool):
                self.events.state_wanted = wanted
        if not eof:
            return
        self.sel.unregister(sys.stdin.fileno())
        if not self.stopping:
            self.begin_stop()

    def _helper_says(self, h: Helper) -> None:
        """A dispatch helper's stdout: its ``state`` events, published here, and its
        counters, added to this process's (helpers.py)."""
        assert self.helpers is not None and self.runner is not None
        for obj in self.helpers.read(h):
            event, stats = obj.get("e"), obj.get("s")
            if isinstance(event, dict) and event.get("event") == "state":
                self.events.publish(event)
            elif isinstance(stats, dict):
                try:
                    self.runner.stats.apply(stats, h.last_stats)
                except (TypeError, ValueError, AttributeError) as e:
                    log.warning("dispatch helper %d: unreadable counters: %s", h.part.index, e)
                    continue
                h.last_stats = stats

    def _report_to_main(self, *, final: bool = False) -> None:
        """A dispatch helper: its counters to the main process, at most once a second and
        only when they changed, and what the pipe did not take before."""
        bus = self.events
        if not isinstance(bus, ForwardingBus) or self.runner is None:
            return
        now = time.monotonic()
        stats = self.runner.stats
        if stats.version != self._stats_sent and (final or now >= self._stats_at):
            self._stats_at = now + 1.0
            self._stats_sent = stats.version
            bus.send({"s": stats.snapshot()})
        bus.flush()

    def _report_due(self) -> float | None:
        """A dispatch helper: when its counters (or what its pipe did not take) are due,
        ``time.monotonic()``; None when nothing waits."""
        bus = self.events
        if not isinstance(bus, ForwardingBus) or self.runner is None:
            return None
        if bus.pending:
            return time.monotonic() + 0.05
        return self._stats_at if self.runner.stats.version != self._stats_sent else None

    def begin_stop(self) -> None:
        now = self.clock()
        if self.stopping:
            self.grace_end = self.mono()  # a second signal: no more waiting
            log.warning("stopping now: terminating %d running job(s)", len(self.jobs))
            return
        self.stopping = True
        self.grace_end = self.mono() + self.grace  # monotonic: a clock step neither ends nor stretches it
        if self.workers is not None:
            self.workers.stop_all(now, kill=False)  # EOF on fd 4: answer what you hold, then exit
        if self.http is not None:
            self.http.stop_all(now, kill=False)  # what waits for its host goes back at once
        if self.helpers is not None:
            self.helpers.stop()  # each stops as a daemon does
        log.warning("stopping: starting nothing new; %d job(s) get %.0f s to finish", len(self.jobs),
                    self.grace)

    def reap(self) -> None:
        """Finish every job whose process has exited.

        ``waitid(WNOWAIT)`` sees the exit while the pid is still a zombie, so a timed-out,
        cancelled or stopped job's process group can be killed (grandchildren included) while
        its id cannot have been reused; only then is the zombie reaped.
        """
        if self.workers is not None:
            self.workers.reap()
        for pid, job in list(self.jobs.items()):
            if not has_exited(pid):
                continue
            assert self.runner is not None
            job.cancelled = job.cancelled or self.runner.cancel_asked(job)
            if job.timed_out or job.stopping or job.cancelled or job.lost:
                kill_group(pid, signal.SIGKILL)
            self._finish(job, reap(pid))

    def _finish(self, job: Job, code: int) -> None:
        assert self.runner is not None
        del self.jobs[job.pid]
        if not job.eof:
            try:
                self.sel.unregister(job.spawned.status_fd)
            except (KeyError, ValueError):
                pass
        qs = self.queues.get(job.queue)
        try:
            fin = self.runner.finish(job, code, qs.config if qs is not None else None)
        except Exception:  # noqa: BLE001 - a bug reading its end must not strand the message
            log.exception("%s/%s: cannot conclude the attempt; requeueing it as after a crash",
                          job.queue, job.msg_id)
            fin = Finish(job.attempt, crash_outcome(job.msg, "the daemon could not conclude the attempt"),
                         pid=job.pid, exit_code=code)
        if job.lost:
            log.warning("%s/%s: dropped the outcome of pid %d (%s): another host holds the message now",
                        job.queue, job.msg_id, job.pid, fin.outcome.state)
            self._finished(fin)
        elif self.runner.finisher.settle(fin):
            self._finished(fin)
        # Else it is held and retried (finish.py): the message stays in run/ and keeps its
        # worker slot until its outcome is on disk.

    def _finished(self, fin: Finish) -> None:
        """An attempt's outcome is stored: free the worker slot (the store released or
        finished its duplicates, and indexed it again if it went back to the queue)."""
        qs = self.queues.get(fin.queue)
        if qs is None:
            return
        qs.running.discard(fin.msg_id)
        qs.dirty = True
        if self.events.wants("state"):  # once per message: no dict for nobody
            self.events.publish({"event": "state", "queue": fin.queue, "msg_id": fin.msg_id,
                                 "state": str(fin.outcome.state), "status": fin.outcome.status})

    def _config_of(self, queue: str) -> QueueConfig | None:
        qs = self.queues.get(queue)
        return qs.config if qs is not None else None

    def _workers_changed(self, queue: str) -> None:
        qs = self.queues.get(queue)
        if qs is not None:
            qs.dirty = True

    # -- dispatch ------------------------------------------------------------------------
    def _reload(self, qs: QueueState) -> bool:
        """Re-read config and admin state if inotify said they changed; False: not runnable."""
        if not (qs.config_stale or qs.config is None):
            return True
        first = qs.config is None  # its admin state is news only after the first read
        # Only when inotify saw config.json, pause or down change (or SIGHUP): three stats
        # fewer per message on a busy queue.
        try:
            qs.config = self._share(self.store.queue_config(qs.name))
        except QueueNotFound:
            self.refresh_queues = True
            return False
        except (InvalidConfig, SpoolqError) as e:
            if qs.config is None:
                log.error("queue %s: unusable config, not running it: %s", qs.name, e)
                return False
            log.error("queue %s: unusable config, keeping the last good one: %s", qs.name, e)
        was = None if first else qs.admin
        try:
            qs.admin = self.store.admin_state(qs.name)
        except QueueNotFound:
            self.refresh_queues = True
            return False
        if was is not None and qs.admin != was:
            self.events.publish({"event": "admin", "queue": qs.name, "state": str(qs.admin), "was": str(was)})
        qs.config_stale = False
        return True

    def _share(self, cfg: QueueConfig) -> QueueConfig:
        """A split queue's config as this dispatch process runs it: its share of the
        workers (parts.py). The split was decided at the start and holds until the next."""
        part = self.part
        if cfg.name not in part.split:
            return cfg
        if not splittable(cfg, part.count):
            # A rule now spans its messages (num_workers 1, blocking_params...): no process
            # may claim from it until the main process has planned the parts again without
            # it (the helpers stopped, the queue whole); its workers take nothing more.
            if part.main and cfg.name not in self.replan:
                log.warning("queue %s: its config no longer allows %d dispatch processes to share it; "
                            "stopping the helpers to dispatch it from one process", cfg.name, part.count)
                self.replan.add(cfg.name)
            return replace(cfg, num_workers=0)
        return replace(cfg, num_workers=max(1, part.workers(cfg.name, cfg.num_workers)))

    def _want(self, qs: QueueState, on: bool) -> None:
        """Tell the store whether we claim from the queue (the filesystem indexes it, or
        forgets it: a PAUSEd or DOWN queue's messages cost nothing). Told at every dispatch
        (a no-op when nothing changed): the store may have forgotten a queue deleted and
        created again under its name."""
        assert self.watcher is not None
        if qs.wanted != on:
            log.debug("queue %s: %s", qs.name, "claiming" if on else f"{qs.admin}, not claiming")
        qs.wanted = on
        self.watcher.want(qs.name, on)

    def dispatch(self, qs: QueueState, now: float) -> float | None:
        """Start what may start in one queue; returns when to look again (a due time) or None."""
        assert self.runner is not None
        qs.dirty = False
        if not self._reload(qs):
            return None
        cfg = qs.config
        assert cfg is not None
        if cfg.kind != "worker" and self.workers is not None:
            self.workers.retire(qs.name)  # no longer a queue of workers: let them go
        self._want(qs, qs.admin == AdminState.UP)
        if qs.admin != AdminState.UP or self.stopping or not qs.ready:
            return None
        if qs.script_error is not None and cfg.kind == "http":
            qs.script_error = None  # no script to run: a kind script turned http
            self._record_script_error(qs, None)
        if qs.script_error is not None:
            # SCRIPTERROR (RQ's oper status): nothing starts until the script can run again.
            # Checked on every config change and every SCRIPT_RECHECK seconds.
            why = script_problem(cfg, self.home)
            if why is not None:
                if why != qs.script_error:
                    qs.script_error = why
                    self._record_script_error(qs, why)
                return now + SCRIPT_RECHECK
            log.warning("queue %s: the script can run again; resuming", qs.name)
            qs.script_error = None
            self._record_script_error(qs, None)
        if now < qs.hold_until:
            return qs.hold_until
        if cfg.kind == "worker":
            return self._dispatch_workers(qs, cfg, now)
        if cfg.kind == "http":
            return self._dispatch_http(qs, cfg, now)
        while len(qs.running) < cfg.num_workers:
            got = self._claim(qs, now)
            if not isinstance(got, Attempt):
                return got
            if not self._start(qs, got, cfg):
                return now + SCRIPT_RECHECK
        return None

    def _claim(self, qs: QueueState, now: float) -> Attempt | float | None:
        """The next message of ``qs`` to start, or when to look again (a due time, or the
        end of the wait after the store failed), or None."""
        try:
            got = self.store.claim(qs.name, owner=self.owner, lease=LEASE, now=now)
        except StorageError as e:
            # The move into run failed (disk full...): the message is still queued. Every
            # other message would fail the same way, so the queue waits, with backoff.
            qs.hold_for = min(RETRY_MAX, max(RETRY_FIRST, qs.hold_for * 2))
            qs.hold_until = now + qs.hold_for
            log.error("queue %s: cannot start a message: %s; trying again in %g s", qs.name, e,
                      qs.hold_for)
            return qs.hold_until
        qs.hold_for = 0.0
        return got

    def _dispatch_workers(self, qs: QueueState, cfg: QueueConfig, now: float) -> float | None:
        """A queue of persistent workers (workers.py): keep them running, and feed each one
        until it holds ``worker_inflight`` messages."""
        assert self.workers is not None
        try:
            wake = self.workers.ensure(qs.name, cfg, now)
        except ScriptUnusable as e:
            log.error("queue %s: SCRIPTERROR: %s; holding its messages until the script is fixed",
                      qs.name, e)
            qs.script_error = str(e)
            self._record_script_error(qs, qs.script_error)
            return now + SCRIPT_RECHECK
        try:
            while (w := self.workers.free(qs.name, cfg)) is not None:
                got = self._claim(qs, now)
                if not isinstance(got, Attempt):
                    return got if wake is None or (got is not None and got < wake) else wake
                if self.workers.send(w, got, cfg, now):
                    qs.running.add(got.msg_id)
                    self._started(got)
            return wake
        finally:
            self.workers.flush_sent()  # the pass's lines, one write per worker

    def _dispatch_http(self, qs: QueueState, cfg: QueueConfig, now: float) -> float | None:
        """A queue of HTTP jobs (httpjobs.py): no process, a request on a pool thread."""
        assert self.http is not None
        while self.http.free(qs.name, cfg):
            got = self._claim(qs, now)
            if not isinstance(got, Attempt):
                return got
            if self.http.send(got, cfg, now):
                qs.running.add(got.msg_id)
                self._started(got)
        return None

    def _start(self, qs: QueueState, attempt: Attempt, cfg: QueueConfig) -> bool:
        """Run a claimed attempt; False when the queue's script is unusable (SCRIPTERROR)."""
        assert self.runner is not None
        try:
            job = self.runner.start(attempt, cfg)
        except ScriptUnusable as e:
            log.error("queue %s: SCRIPTERROR: %s; holding its messages until the script is fixed",
                      qs.name, e)
            qs.script_error = str(e)
            self._record_script_error(qs, qs.script_error)
            return False
        if job is not None:
            qs.running.add(attempt.msg_id)
            self.jobs[job.pid] = job
            self.sel.register(job.spawned.status_fd, selectors.EVENT_READ, job)
            self._started(attempt)
        return True

    def _started(self, attempt: Attempt) -> None:
        if self.events.wants("state"):
            self.events.publish({"event": "state", "queue": attempt.queue, "msg_id": attempt.msg_id,
                                 "state": "run", "status": "run"})

    def _record_script_error(self, qs: QueueState, why: str | None) -> None:
        """Show SCRIPTERROR (or its end) to every reader of the spool: the ``scripterror`` file."""
        try:
            self.store.set_script_error(qs.name, why)
        except SpoolqError as e:
            log.warning("queue %s: %s", qs.name, e)

    # -- the loop ------------------------------------------------------------------------
    def step(self, timeout: float | None) -> None:
        """One iteration: wait up to ``timeout`` for events, then act on everything pending."""
        assert self.runner is not None and self.housekeeper is not None and self.watcher is not None
        store_ready = False
        for key, _ in self.sel.select(timeout):
            if key.data == "wake":
                self.on_signals()
            elif key.data == "store":
                store_ready = True
            elif key.data == "housekeeping":
                self.on_housekeeping()
            elif key.data == "parent":
                self._parent_says()
            elif isinstance(key.data, Helper):
                self._helper_says(key.data)
            elif key.data == "scandir":
                assert self.scandir is not None
                self.scandir.on_events()
            elif isinstance(key.data, Worker):
                assert self.workers is not None
                if not key.data.eof:
                    self.workers.read(key.data)
            elif isinstance(key.data, HttpJobs):
                key.data.on_answers()
            elif isinstance(key.data, WorkerInput):
                assert self.workers is not None
                self.workers.flush(key.data.worker)
            elif isinstance(key.data, Workers):
                key.data.on_inputs()
            elif isinstance(key.data, Job):
                job = key.data
                if self.jobs.get(job.pid) is not job or job.eof:
                    continue  # finished earlier in this batch
                self.runner.read_status(job)
                if job.eof:
                    self.sel.unregister(job.spawned.status_fd)
        if self.flags:
            self.on_signals()
        now = self.clock()
        for job in list(self.jobs.values()):
            self.runner.check_timeout(job, now)
            if now >= job.renew_at and self.runner.renew(job, now) and not job.cancelled:
                self._cancel_job(job)
        assert self.workers is not None
        self.workers.tick(now)
        assert self.http is not None
        self.http.tick(now)
        if self.helpers is not None:
            self._tend_helpers(self.mono())  # restart backoffs and the kill: durations
        if not self.part.main:
            self._report_to_main()
        if self.stopping and self.grace_end is not None and self.mono() >= self.grace_end:
            for job in self.jobs.values():
                if not job.stopping:
                    job.stopping = True
                    self.runner.terminate(job, now)
            self.workers.stop_all(now, kill=True)
            self.http.stop_all(now, kill=True)
            if self.helpers is not None:
                self.helpers.stop_now(self.mono())
        if now >= self.next_sweep and not self.housekeeper.busy:
            self.next_sweep = now + self.sweep_interval
            self.housekeeper.submit(SWEEP_ROOT)
            for name in self.queues:
                self.housekeeper.submit(SWEEP, name)
        for fin in self.runner.finisher.retry(now, self._ready):
            self._finished(fin)
        wake_at = self.watcher.wake_at
        if store_ready or self.watcher.busy or (wake_at is not None and time.monotonic() >= wake_at):
            self.on_changes()
        if self.refresh_queues:
            self.refresh()
        if self.timers is not None and not self.stopping and time.monotonic() >= self.timers_at:
            try:
                self.timers_at = self.timers.tick()
            except Exception:  # noqa: BLE001 - a timer must never stop the daemon
                log.exception("timers failed; looking again in 10 s")
                self.timers_at = time.monotonic() + 10.0
        if self.scandir is not None and not self.stopping and time.monotonic() >= self.scandir.scan_at:
            try:
                self.scandir.scan()
            except Exception:  # noqa: BLE001 - a bad link must never stop the daemon
                log.exception("scandir failed; looking again in %g s", 60.0)
                self.scandir.scan_at = time.monotonic() + 60.0
        if now >= self.next_reclaim and not self.stopping:
            self.next_reclaim = now + RECLAIM_EVERY
            for name in list(self.queues):
                self._recover(name)  # another host's attempts whose lease ran out
        for qs in list(self.queues.values()):
            if qs.dirty or (qs.wake_at is not None and now >= qs.wake_at):
                try:
                    qs.wake_at = self.dispatch(qs, now)
                except Exception:  # noqa: BLE001 - a broken queue must not stop the others
                    log.exception("queue %s: dispatch failed; indexing it again, retrying in 5 s", qs.name)
                    self._want(qs, False)  # the next dispatch indexes it afresh
                    qs.dirty, qs.wake_at, qs.config_stale = False, now + 5.0, True

    def _ready(self, queue: str) -> bool:
        qs = self.queues.get(queue)
        return qs is None or qs.ready

    def next_timeout(self) -> float | None:
        assert self.runner is not None
        assert self.watcher is not None
        if ((self.watcher.busy and not self.stopping) or any(qs.dirty for qs in self.queues.values())
                or self.refresh_queues or self.flags):
            return 0.0
        now = self.clock()
        mono = self.mono()
        times = [self.next_sweep, self.next_reclaim]
        times += [qs.wake_at for qs in self.queues.values() if qs.wake_at is not None]
        for job in self.jobs.values():
            times.append(job.renew_at)
            if job.deadline is not None and not job.timed_out:
                times.append(now + job.deadline - mono)  # monotonic, made a wall-clock time here
            if job.kill_at is not None:
                times.append(now + job.kill_at - mono)
        retry = self.runner.finisher.next_retry()
        if retry is not None:
            times.append(retry)
        assert self.workers is not None
        wt = self.workers.next_time()
        if wt is not None:
            times.append(wt)
        assert self.http is not None
        ht = self.http.next_time()
        if ht is not None:
            times.append(ht)
        if self.helpers is not None:
            st = self.helpers.next_time()
            if st is not None:
                times.append(now + st - mono)
        wake_at = self.watcher.wake_at
        if wake_at is not None:
            times.append(now + wake_at - time.monotonic())
        if self.timers is not None and not self.stopping:
            times.append(now + self.timers_at - time.monotonic())
        if self.scandir is not None and not self.stopping:
            times.append(now + self.scandir.scan_at - time.monotonic())
        report = self._report_due()
        if report is not None:
            times.append(now + report - time.monotonic())
        if self.stopping and self.grace_end is not None and (
                any(not j.stopping for j in self.jobs.values()) or self.runner.finisher.held
                or self.workers.alive() or self.http.alive() or (self.helpers and self.helpers.alive())):
            times.append(now + self.grace_end - mono)
        return max(0.0, min(times) - now)

    def _done(self) -> bool:
        """Stopping, nothing running, and no held finish left to wait for (or no more time)."""
        if not (self.stopping and not self.jobs and not (self.workers and self.workers.alive())
                and not (self.http and self.http.alive()) and not (self.helpers and self.helpers.alive())):
            return False
        assert self.runner is not None
        held = self.runner.finisher.held
        if not held:
            return True
        if self.grace_end is not None and self.mono() < self.grace_end:
            return False
        for fin in held:
            log.error("%s/%s: stopping with its outcome (%s) not stored; it stays in run and the "
                      "next start recovers it (it runs again)", fin.queue, fin.msg_id, fin.outcome.state)
        return True

    def loop(self) -> None:
        """Serve until stopped by SIGTERM/SIGINT and every job is finished or requeued."""
        log.info("serving %s as %s", self.store.url, self.rootcfg.base_url)
        quiet_until = 0.0
        while not self._done():
            try:
                self.step(self.next_timeout())
            except StorageError as e:
                # The store is out of reach (a database restarting, its connections cut):
                # running scripts go on, finishes are held and retried, and so is this.
                now = time.monotonic()
                if now >= quiet_until:
                    log.warning("the store failed: %s; going on, trying again", e)
                    quiet_until = now + 30.0
                self.refresh_queues = True
                time.sleep(STORE_RETRY)
        log.info("stopped")

    def run(self) -> int:
        self.setup()
        try:
            self.loop()
        finally:
            self.close()
        return 0

