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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import durable
from ..config import RootConfig
from ..errors import CorruptMessage, MessageNotFound, QueueDown, QueueNotFound, SpoolqError, WrongState
from ..model import Message, QueueConfig, State
from ..runner import protocol
from ..runner.protocol import MAX_RESEND_TEXT, Completion, LineBuffer, Outcome
from ..runner.spawn import (
    ScriptError,
    Spawned,
    build_argv,
    build_env,
    kill_group,
    require_file,
    resolve_script,
    script_problem,
    spawn,
    write_pidfile,
)
from ..store.base import copied_attachments
from ..store.fs import FsStore
from ..store.fs.layout import message_path
from .finish import Finish, Finisher
from .stats import JobStats

log = logging.getLogger("spoolq.daemon")

RELAY_QUEUE = "relay"
KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when the daemon stops a job."""
KNOWN_VERBS = {"run", "done", "err", "fails", "relayed", "resend", "dup"}


class ScriptUnusable(Exception):
    """The queue's script cannot be started (missing, not executable, bad interpreter):
    the message that tried is in err; the supervisor holds the queue in SCRIPTERROR."""


@dataclass
class Job:
    queue: str
    msg: Message
    msg_dir: Path
    spawned: Spawned
    started: float
    timeout: float | None
    block_key: tuple[str, ...] | None
    lines: LineBuffer = field(default_factory=LineBuffer)
    completion: Completion | None = None
    last_status: str = ""
    deadline: float | None = None
    kill_at: float | None = None
    timed_out: bool = False
    stopping: bool = False
    eof: bool = False
    cancelled: bool = False  # a cancel file was seen
    status_written: bool = False
    dups: list[str] = field(default_factory=list)

    @property
    def msg_id(self) -> str:
        return self.msg.msg_id

    @property
    def pid(self) -> int:
        return self.spawned.pid


class JobRunner:
    """Starts and finishes attempts for the supervisor. All store access is synchronous."""

    def __init__(self, store: FsStore, rootcfg: RootConfig, clock: Callable[[], float],
                 rq_env: str, group_sync: durable.GroupSync | None = None) -> None:
        self.store = store
        self.root = store.root
        self.rootcfg = rootcfg
        self.clock = clock
        self.rq_env = rq_env
        self.stats = JobStats()
        self.group_sync = group_sync
        self.finisher = Finisher(store, self.full_id, clock, self.stats, group_sync)

    def full_id(self, queue: str, msg_id: str) -> str:
        return f"{self.rootcfg.base_url}/q/{queue}/{msg_id}"

    # -- start ---------------------------------------------------------------------------
    def start(self, queue: str, msg_id: str, cfg: QueueConfig,
              block_key: tuple[str, ...] | None) -> Job | None:
        """que -> run, then exec the script. None if the message was taken by someone else
        or could not start (it is then in err, or back in que for a storage problem).

        Raises StorageError when the store cannot make the move (disk full): the message is
        still in que and the caller waits before trying that queue again.
        """
        try:
            # Not fsync'd: if a crash loses this rename the message is still in que, which is
            # where recovery would put it; the move out of run is the durable one.
            msg = self.store.move(queue, msg_id, State.QUE, State.RUN, note="run", sync=False)
        except (WrongState, MessageNotFound):
            return None
        except CorruptMessage as e:
            log.error("%s", e)  # set aside by the store; the queue goes on
            return None
        qdir = self.store.qdir(queue)
        msg_dir = message_path(qdir, State.RUN, msg_id)
        if self.group_sync is not None and cfg.fsync:
            # Where a rename is not atomic on disk (ext4 without a journal) a producer's fsync
            # of the que bucket can write this move's removal long before anything writes the
            # run bucket: the message would be in neither after a power cut. Both are synced
            # soon, new entry first; what is left of the window, lost+found recovery covers.
            self.group_sync.add_rename(message_path(qdir, State.QUE, msg_id).parent, msg_dir.parent,
                                       only_where_unsafe=True)
        if (msg_dir / "cancel").exists():
            self.finish_without_run(queue, msg, Outcome(State.ERR, "cancelled", msg.count))
            return None
        try:
            # With a prefix the exec succeeds whatever the script: check it is there first.
            script = require_file(cfg, self.root) if cfg.exec_prefix.strip() else resolve_script(cfg, self.root)
            env = build_env(base=os.environ, cfg=cfg, msg=msg, queue=queue, script=script,
                            rootcfg=self.rootcfg, root=self.root, msg_dir=msg_dir, rq_env=self.rq_env)
            sp = spawn(build_argv(cfg, script), env=env, msg_dir=msg_dir, header_script=str(script))
        except ScriptError as e:
            why = script_problem(cfg, self.root) or str(e)  # "bad interpreter" beats ENOENT
            log.warning("%s/%s: %s", queue, msg_id, why)
            self.stats.script_error(queue)
            self.finish_without_run(queue, msg, Outcome(State.ERR, why, msg.count))
            raise ScriptUnusable(why) from None
        except (ValueError, UnicodeError) as e:
            # A value no environment can hold (a NUL, a lone surrogate) in a message written
            # by hand or by an older spoolq: this message can never run.
            log.warning("%s/%s: cannot start: %s", queue, msg_id, e)
            self.finish_without_run(queue, msg, Outcome(State.ERR, f"cannot start: invalid value in the "
                                                        f"message or env_vars: {e}", msg.count))
            return None
        except OSError as e:  # disk full, EMFILE...: not the message's fault; try again later
            log.error("%s/%s: cannot start: %s", queue, msg_id, e)
            self.finish_without_run(queue, msg, Outcome(State.QUE, f"daemon could not start the job: {e}",
                                                        msg.count, requeue_delay=30.0))
            return None
        try:
            write_pidfile(msg_dir, sp.pid, sp.spawned_ns)
        except OSError as e:
            log.error("%s/%s: cannot write pid file: %s", queue, msg_id, e)
        now = self.clock()
        job = Job(queue=queue, msg=msg, msg_dir=msg_dir, spawned=sp, started=now, timeout=cfg.timeout,
                  block_key=block_key)
        if cfg.timeout is not None:
            job.deadline = now + cfg.timeout
        self.stats.started(queue)
        log.debug("%s/%s: started pid %d (count %d)", queue, msg_id, sp.pid, msg.count)
        return job

    # -- while running -------------------------------------------------------------------
    def read_status(self, job: Job) -> None:
        """Read what the script wrote on fd 3; at EOF mark the job so the caller unregisters it."""
        chunks: list[bytes] = []
        while True:
            try:
                data = os.read(job.spawned.status_fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                job.eof = True
                break
            chunks.append(data)
            if sum(map(len, chunks)) > 1 << 20:
                break  # let other jobs have a turn; the fd stays readable
        lines: list[str] = []
        for c in chunks:
            lines += job.lines.feed(c)
        if job.eof:
            lines += job.lines.flush()
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
                self.reply(job, self.dup(job, rest))
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

    def dup(self, job: Job, text: str) -> str:
        """``dup DUE-X-DEST``: copy the message (and its attachments) to a local queue, or to
        the relay queue for an http dest. Answers RQ's reply lines."""
        req = protocol.parse_dup(text)
        if req is None:
            return "fail dup failed - bad dup request, expected DUE-X-DEST"
        dest = req.dest
        target = RELAY_QUEUE if dest.startswith("http") else dest.strip("/").removeprefix("q/")
        old = job.msg
        new = Message(dest=dest, src=old.src, count=0, max_count=old.max_count, param1=old.param1,
                      param2=old.param2, param3=old.param3, param4=old.param4,
                      due=self.clock() + req.due_secs, post_run_webhook=list(old.post_run_webhook),
                      orig_msg_id=old.orig_msg_id or self.full_id(job.queue, old.msg_id),
                      params=dict(old.params))
        try:
            self.store.queue_config(target)
        except (QueueNotFound, SpoolqError):
            return f"fail couldn't connect to queue - {target}"
        try:
            names = sorted(self.store.get(job.queue, old.msg_id).attachments)
            with copied_attachments(self.store, job.queue, old.msg_id, names) as sources:
                stored = self.store.create(target, new, attachments=sources)
        except QueueDown:
            return "fail dup failed - status: DOWN"
        except SpoolqError as e:
            return f"fail dup failed - {e}"
        return f"ok {self.full_id(target, stored.msg_id)}"

    def check_timeout(self, job: Job, now: float) -> None:
        if job.deadline is not None and now >= job.deadline and not job.timed_out:
            job.timed_out = True
            log.info("%s/%s: timeout after %s s, terminating its process group",
                     job.queue, job.msg_id, job.timeout)
            self.terminate(job, now)
        elif job.kill_at is not None and now >= job.kill_at:
            job.kill_at = None
            kill_group(job.pid, signal.SIGKILL)

    def terminate(self, job: Job, now: float) -> None:
        kill_group(job.pid, signal.SIGTERM)
        job.kill_at = now + KILL_GRACE

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
        cancelled = job.cancelled or (job.msg_dir / "cancel").exists()
        try:
            outcome = self._decide(job, exit_code, cfg, cancelled)
        except Exception:  # noqa: BLE001 - a bug must not leave the message without an outcome
            log.exception("%s/%s: cannot decide the outcome; requeueing it as after a crash",
                          job.queue, job.msg_id)
            outcome = crash_outcome(job.msg, "the daemon could not decide the outcome")
        # The status file already says the right thing when the script's last line is the
        # outcome's text (or there is no status at all and none is wanted): skip a rewrite.
        if job.status_written:
            current: str | None = job.last_status
        else:
            current = None if (job.msg_dir / "status").exists() else ""
        return Finish(job.queue, job.msg, outcome, dups=job.dups, current_status=current,
                      cancel_file=cancelled, durable_later=True, cfg=cfg, pid=job.pid,
                      exit_code=exit_code, took=self.clock() - job.started)

    def _decide(self, job: Job, exit_code: int, cfg: QueueConfig | None, cancelled: bool) -> Outcome:
        if job.stopping and not cancelled:
            return Outcome(State.QUE, "requeued: the daemon stopped while it ran", job.msg.count)
        return protocol.decide(job.completion, exit_code, count=job.msg.count,
                               max_count=job.msg.max_count, last_status=job.last_status,
                               retry_delay=retry_delay(cfg, job.msg.count, random.random()),
                               cancelled=cancelled, timed_out=job.timeout if job.timed_out else None)

    def finish_without_run(self, queue: str, msg: Message, outcome: Outcome) -> None:
        """End an attempt whose script never started (held and retried if the store refuses)."""
        self.finisher.settle(Finish(queue, msg, outcome))


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


def root_env(root: Path) -> str:
    """``RQ_ENV`` for scripts: the root config's ``env``, else ``production``."""
    try:
        data = json.loads((root / "config.json").read_bytes())
        env = data.get("env") if isinstance(data, dict) else None
        return env if isinstance(env, str) and env else "production"
    except (OSError, ValueError):
        return "production"
