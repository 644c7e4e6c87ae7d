"""The life of one attempt: start (que -> run), status lines and dup requests, and the
decision at its end. Applying that decision (the move out of ``run/``, and holding it when
the disk refuses) is :mod:`.finish`'s.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import fsq
from ..builtin import target_queue
from ..config import RootConfig
from ..errors import (
    CorruptMessage,
    LeaseLost,
    QueueDown,
    QueueNotFound,
    ScriptError,
    ScriptUnusable,
    SpoolqError,
)
from ..model import Message, QueueConfig, State
from ..runner import protocol
from ..runner.protocol import MAX_RESEND_TEXT, Completion, LineBuffer, Outcome
from ..runner.spawn import (
    QueueEnv,
    Spawned,
    build_argv,
    kill_group,
    message_vars,
    queue_env,
    require_file,
    script_path,
    script_problem,
    scrubbed_env,
    spawn,
)
from ..store.base import Store, copied_attachments
from ..store.leases import Attempt
from .finish import Finish, Finisher
from .stats import JobStats

log = logging.getLogger("spoolq.daemon")

KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when the daemon stops a job."""
LEASE = 30.0
"""Seconds an attempt is leased for: another host may take it over once it has run out
(the filesystem's lease is the daemon's lock instead). Renewed every :data:`RENEW`."""
RENEW = LEASE / 3
HOST = socket.gethostname()
KNOWN_VERBS = {"run", "done", "err", "fails", "relayed", "resend", "dup"}


@dataclass(eq=False)  # one job is one object (the loop compares its selector keys' data with strings)
class Job:
    attempt: Attempt
    spawned: Spawned
    started: float
    timeout: float | None
    lines: LineBuffer = field(default_factory=LineBuffer)
    completion: Completion | None = None
    last_status: str = ""
    deadline: float | None = None  # on the runner's monotonic clock (a clock step is no timeout)
    kill_at: float | None = None  # the same
    timed_out: bool = False
    stopping: bool = False
    eof: bool = False
    cancelled: bool = False  # a cancel was asked for
    lost: bool = False  # fenced out (another host took the attempt over): finish nothing
    renew_at: float = 0.0  # when to renew the lease (the daemon's clock)
    status_written: bool = False

    @property
    def queue(self) -> str:
        return self.attempt.queue

    @property
    def msg(self) -> Message:
        return self.attempt.message

    @property
    def msg_id(self) -> str:
        return self.attempt.msg_id

    @property
    def pid(self) -> int:
        return self.spawned.pid


class JobRunner:
    """Starts and finishes attempts for the supervisor. All store access is synchronous."""

    def __init__(self, store: Store, home: Path, rootcfg: RootConfig, clock: Callable[[], float],
                 rq_env: str, owner: str, mono: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.home = home  # relative scripts resolve here; the webhook placeholder lives here
        self.rootcfg = rootcfg
        self.clock = clock  # the wall clock: due times, leases, what is stored
        # Durations (timeouts, kill grace): a wall clock stepped an hour forward killed every
        # running script as timed out, and one stepped back let them run past it (audit).
        self.mono = mono
        self.rq_env = rq_env
        self.owner = owner
        self.stats = JobStats()
        self.finisher = Finisher(store, home, self.full_id, clock, self.stats)
        # The daemon's environment is read once: os.environ decodes each variable at every
        # read, which was a tenth of a start's cost.
        self.base_env = scrubbed_env(os.environ)
        self._queue_envs: dict[str, tuple[QueueConfig, str, QueueEnv]] = {}

    def full_id(self, queue: str, msg_id: str) -> str:
        return f"{self.rootcfg.base_url}/q/{queue}/{msg_id}"

    # -- start ---------------------------------------------------------------------------
    def start(self, attempt: Attempt, cfg: QueueConfig) -> Job | None:
        """Exec the script of a claimed attempt. None if it could not start (it is then
        finished: in err, or back in que for a problem that is not the message's).

        Raises ScriptUnusable when the queue's script cannot run (the message is in err).
        """
        queue, msg, msg_id = attempt.queue, attempt.message, attempt.msg_id
        if attempt.cancel_requested:
            self.finish_without_run(attempt, Outcome(State.ERR, "cancelled", msg.count))
            return None
        try:
            # With a prefix the exec succeeds whatever the script: check it is there first.
            script = str(require_file(cfg, self.home)) if cfg.exec_prefix.strip() else script_path(cfg, self.home)
            argv = build_argv(cfg, script, msg)
            stdin = None
            if cfg.kind == "fsq":  # fsq-scan's contract: FSQ_ITEM_*, the item on stdin
                got = self._item_stdin(attempt, cfg)
                if isinstance(got, str):
                    state = State.DONE if got == "done" else State.ERR
                    self.finish_without_run(attempt, Outcome(state, f"its fsq item was in {got}/ already "
                                                             "(finished before a crash)", msg.count))
                    return None
                stdin = got
            try:
                # job/ and its log once the script's path, argv and a fsq item are there
                # (strings: a Path per start was a measurable cost).
                workdir, log_fd = self.store.start_job(attempt)
                try:
                    env = self._queue_env(queue, cfg, script).with_message(
                        message_vars(msg, queue, self.rootcfg.base_url, workdir.rpartition("/")[0]))
                    if cfg.kind == "fsq":
                        env.own.update(fsq.message_env(msg))
                except BaseException:
                    os.close(log_fd)  # spawn closes it from here on
                    raise
                sp = spawn(argv, env=env, cwd=workdir, log_fd=log_fd, header_script=script, stdin_fd=stdin)
            finally:
                if stdin is not None:
                    os.close(stdin)
        except ScriptError as e:
            why = script_problem(cfg, self.home) or str(e)  # "bad interpreter" beats ENOENT
            log.warning("%s/%s: %s", queue, msg_id, why)
            self.stats.script_error(queue)
            self.finish_without_run(attempt, Outcome(State.ERR, why, msg.count))
            raise ScriptUnusable(why) from None
        except (ValueError, UnicodeError) as e:
            # A value no environment can hold (a NUL, a lone surrogate) in a message written
            # by hand or by an older spoolq: this message can never run.
            log.warning("%s/%s: cannot start: %s", queue, msg_id, e)
            self.finish_without_run(attempt, Outcome(State.ERR, f"cannot start: invalid value in the "
                                                     f"message or env_vars: {e}", msg.count))
            return None
        except CorruptMessage as e:  # set aside by the store: only the attempt is left to end
            log.error("%s/%s: cannot start: %s", queue, msg_id, e)
            self.finish_without_run(attempt, Outcome(State.ERR, f"cannot start: {e}", msg.count))
            return None
        except (OSError, SpoolqError) as e:  # disk full, EMFILE...: not the message's fault; later
            log.error("%s/%s: cannot start: %s", queue, msg_id, e)
            self.finish_without_run(attempt, Outcome(State.QUE, f"daemon could not start the job: {e}",
                                                     msg.count, requeue_delay=30.0))
            return None
        try:
            # "pid spawn_ns host": recovery kills only what runs on its own host (D4). No
            # cancel is looked for here: one asked since the claim's look kicks the daemon,
            # which looks once the job is registered (supervisor._cancel), and reap looks.
            self.store.record_runner(attempt, f"{sp.pid} {sp.spawned_ns} {HOST}", lease=LEASE)
        except (OSError, SpoolqError) as e:
            log.error("%s/%s: cannot record the script's pid: %s", queue, msg_id, e)
        now = self.clock()
        job = Job(attempt=attempt, spawned=sp, started=now, timeout=cfg.timeout, renew_at=now + RENEW)
        if cfg.timeout is not None:
            job.deadline = self.mono() + cfg.timeout
        self.stats.started(queue)
        log.debug("%s/%s: started pid %d (count %d)", queue, msg_id, sp.pid, msg.count)
        return job

    def forget(self, queue: str) -> None:
        """The queue is gone: drop what was kept for it."""
        self._queue_envs.pop(queue, None)

    def _queue_env(self, queue: str, cfg: QueueConfig, script: str) -> QueueEnv:
        """The queue's constant environment, built once per config and resolved script (a new
        config is a new object; a symlinked deploy that moves the script changes the path)."""
        got = self._queue_envs.get(queue)
        if got is not None and got[0] is cfg and got[1] == script:
            return got[2]
        const = queue_env(base=self.base_env, cfg=cfg, queue=queue, script=script, rootcfg=self.rootcfg,
                          root=self.home, rq_env=self.rq_env)
        const["SPOOLQ_STORE"] = self.store.url  # no password (the PostgreSQL store's url is safe_url'd)
        qe = QueueEnv(const)
        self._queue_envs[queue] = (cfg, script, qe)
        return qe

    def _item_stdin(self, attempt: Attempt, cfg: QueueConfig) -> int | str:
        """An fd of the message's held fsq item (fsq.Held), for the script's stdin; or
        ``"done"``/``"fail"`` when the item is already there (its outcome was written, then a
        crash kept the message from moving: it is finished as that, not run again).
        ValueError when there is none: only the item the intake held under this message's id
        is ever read, in the queue's own fsq directory, whatever the message's params say."""
        msg = attempt.message
        try:
            fsq_dir, _ = fsq.message_item(msg)
            if fsq_dir != cfg.fsq_dir:
                raise ValueError(f"its params name {fsq_dir}, not the queue's fsq_dir")
            _, names = fsq.outcome_names(msg)

            def open_or_where(h: fsq.Held) -> int | str:
                try:
                    return h.open(attempt.msg_id)
                except FileNotFoundError:
                    where = h.where_finished(names)
                    if where is None:
                        raise
                    return where

            got: int | str = self.finisher.fsq.run(fsq_dir, attempt.queue, open_or_where)
            return got
        except (FileNotFoundError, NotADirectoryError, fsq.FsqError) as e:
            raise ValueError(f"its fsq item cannot be read: {e}") from None

    def cancel_asked(self, job: Job) -> bool:
        """Has a cancel been asked for the job's message (Store.cancel)? Renews the lease."""
        return self.renew(job, self.clock())

    def renew(self, job: Job, now: float) -> bool:
        """Extend the job's lease; True when a cancel was asked for. An attempt another host
        took over (LeaseLost: this one's lease ran out, e.g. while the database was out of
        reach) is marked ``lost`` and its script is stopped: its outcome would be refused."""
        job.renew_at = now + RENEW
        try:
            return self.store.heartbeat(job.attempt, lease=LEASE).cancel_requested
        except LeaseLost:
            if not job.lost:
                job.lost = True
                log.error("%s/%s: lost its lease to another host; stopping its script (pid %d), whose "
                          "outcome would be refused", job.queue, job.msg_id, job.pid)
                self.terminate(job, now)
            return False
        except (OSError, SpoolqError) as e:
            log.warning("%s/%s: cannot renew the lease: %s", job.queue, job.msg_id, e)
            return False  # tried again at the next renewal; the finish is fenced anyway

    # -- while running -------------------------------------------------------------------
    def read_status(self, job: Job) -> None:
        """Read what the script wrote on fd 3; at EOF mark the job so the caller unregisters it."""
        lines, eof = protocol.read_lines(job.spawned.status_fd, job.lines)
        job.eof = job.eof or eof
        if lines:
            self.handle_lines(job, lines)

    def handle_lines(self, job: Job, lines: list[str]) -> None:
        text = None
        for line in lines:
            verb, rest = protocol.split_line(line)
            if not verb:
                continue
            text = rest if verb in KNOWN_VERBS else line.strip()
            if verb == "dup":
                self.reply(job, self.dup(job.queue, job.msg, rest))
                continue
            c = protocol.parse_completion(verb, rest)
            if c is not None and job.completion is None:
                job.completion = c
        # Every line is a status update; only the last of a burst needs writing.
        if text is not None:
            job.last_status = text
            try:
                self.store.set_status(job.queue, job.msg_id, text)
                job.status_written = True
            except SpoolqError as e:
                log.warning("%s/%s: cannot write status: %s", job.queue, job.msg_id, e)

    def reply(self, job: Job, line: str) -> None:
        try:
            os.write(job.spawned.reply_fd, (line + "\n").encode())
        except OSError:
            pass  # the script closed fd 4 or never reads it: the reply is dropped

    def dup(self, queue: str, old: Message, text: str) -> str:
        """``dup DUE-X-DEST``: copy the message ``old`` of ``queue`` (and its attachments) to a
        local queue, or to the relay queue for an http dest. Answers RQ's reply lines."""
        req = protocol.parse_dup(text)
        if req is None:
            return "fail dup failed - bad dup request, expected DUE-X-DEST"
        dest = req.dest
        new = Message(dest=dest, src=old.src, count=0, max_count=old.max_count, param1=old.param1,
                      param2=old.param2, param3=old.param3, param4=old.param4,
                      due=self.clock() + req.due_secs, post_run_webhook=list(old.post_run_webhook),
                      orig_msg_id=old.orig_msg_id or self.full_id(queue, old.msg_id),
                      params=dict(old.params))
        try:
            target = target_queue(self.store, self.home, dest)
        except (OSError, SpoolqError) as e:
            return f"fail dup failed - cannot create the relay queue: {e}"
        try:
            self.store.queue_config(target)
        except (QueueNotFound, SpoolqError):
            return f"fail couldn't connect to queue - {target}"
        try:
            names = sorted(self.store.get(queue, old.msg_id).attachments)
            with copied_attachments(self.store, queue, old.msg_id, names) as sources:
                stored = self.store.create(target, new, attachments=sources)
        except QueueDown:
            return "fail dup failed - status: DOWN"
        except SpoolqError as e:
            return f"fail dup failed - {e}"
        return f"ok {self.full_id(target, stored.msg_id)}"

    def check_timeout(self, job: Job, now: float) -> None:
        mono = self.mono()
        if job.deadline is not None and mono >= job.deadline and not job.timed_out:
            job.timed_out = True
            log.info("%s/%s: timeout after %s s, terminating its process group",
                     job.queue, job.msg_id, job.timeout)
            self.terminate(job, now)
        elif job.kill_at is not None and mono >= job.kill_at:
            job.kill_at = None
            kill_group(job.pid, signal.SIGKILL)

    def terminate(self, job: Job, now: float) -> None:
        kill_group(job.pid, signal.SIGTERM)
        job.kill_at = self.mono() + KILL_GRACE

    # -- end -----------------------------------------------------------------------------
    def finish(self, job: Job, exit_code: int, cfg: QueueConfig | None) -> Finish:
        """Decide the outcome of an exited script (rq-spec 3.3); the caller settles it.

        Never raises for the message's sake: a retry policy that cannot compute a delay
        falls back to its ``max_delay``, and a decision that fails for any other reason
        requeues the message as a crash would (count + 1), so no outcome is ever missing.
        """
        if not job.eof:
            self.read_status(job)
            rest = job.lines.flush()
            if rest:
                self.handle_lines(job, rest)
        for fd in (job.spawned.status_fd, job.spawned.reply_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        cancelled = job.cancelled
        try:
            outcome = self._decide(job, exit_code, cfg, cancelled)
        except Exception:  # noqa: BLE001 - a bug must not leave the message without an outcome
            log.exception("%s/%s: cannot decide the outcome; requeueing it as after a crash",
                          job.queue, job.msg_id)
            outcome = crash_outcome(job.msg, "the daemon could not decide the outcome")
        # The status already says the right thing when the script's last line is the
        # outcome's text: skip a rewrite.
        return Finish(job.attempt, outcome, current_status=job.last_status if job.status_written else None,
                      pid=job.pid, exit_code=exit_code, took=self.clock() - job.started)

    def _decide(self, job: Job, exit_code: int, cfg: QueueConfig | None, cancelled: bool) -> Outcome:
        if job.stopping and not cancelled:
            return Outcome(State.QUE, "requeued: the daemon stopped while it ran", job.msg.count)
        return protocol.decide(job.completion, exit_code, count=job.msg.count,
                               max_count=job.msg.max_count, last_status=job.last_status,
                               retry_delay=retry_delay(cfg, job.msg.count, random.random()),
                               cancelled=cancelled, timed_out=job.timeout if job.timed_out else None)

    def finish_without_run(self, attempt: Attempt, outcome: Outcome) -> None:
        """End an attempt whose script never started (held and retried if the store refuses)."""
        self.finisher.settle(Finish(attempt, outcome))


def retry_delay(cfg: QueueConfig | None, count: int, rand: float) -> float:
    """The backoff before the next try after exit 111; a policy whose numbers overflow
    (``base`` and ``factor`` near 1e308) means "as long as allowed": its ``max_delay``."""
    if cfg is None:
        return 60.0
    try:
        return cfg.retry.delay(count, rand)
    except (ArithmeticError, ValueError):
        return cfg.retry.max_delay


def crash_outcome(msg: Message, why: str) -> Outcome:
    """What a crash earns a message found in run: one more run, unless that takes ``count``
    past ``max_count`` (a crash is not the message's fault, but one that keeps killing the
    daemon must end). Due at once."""
    if msg.count + 1 > msg.max_count:
        return Outcome(State.ERR, f"{MAX_RESEND_TEXT} ({why})", msg.count + 1)
    return Outcome(State.QUE, f"requeued: {why}", msg.count + 1, requeue_delay=0.0)


def root_env(home: Path) -> str:
    """``RQ_ENV`` for scripts: the root config's ``env``, else ``production``."""
    try:
        data = json.loads((home / "config.json").read_bytes())
        env = data.get("env") if isinstance(data, dict) else None
        return env if isinstance(env, str) and env else "production"
    except (OSError, ValueError):
        return "production"
