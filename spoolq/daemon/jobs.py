"""The life of one attempt: start (que -> run), status lines and dup requests, and the end.

Order of the durable steps at the end (docs/internals-daemon.md): status text, webhook
messages, then the one rename out of ``run/``. A crash before the rename re-runs the
message (at-least-once); a crash after it leaves nothing to redo except coalesced
duplicates, which simply stay queued and run on their own.
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
from ..errors import CorruptMessage, MessageNotFound, QueueDown, QueueExists, QueueNotFound, SpoolqError, WrongState
from ..model import AdminState, Message, QueueConfig, State
from ..runner import protocol
from ..runner.protocol import Completion, LineBuffer, Outcome
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
from ..store.base import AttachmentSource
from ..store.fs import FsStore
from ..store.layout import message_path
from .stats import JobStats

log = logging.getLogger("spoolq.daemon")

WEBHOOK_QUEUE = "webhook"
RELAY_QUEUE = "relay"
KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when the daemon stops a job."""
KNOWN_VERBS = {"run", "done", "err", "fails", "relayed", "resend", "dup"}
WEBHOOK_PLACEHOLDER = """#!/bin/sh
# Placeholder created by spoolq: the webhook sender is not installed yet. The queue is
# created PAUSEd so webhook messages wait; resume it once a real sender is configured.
echo "err webhook sender not installed yet" >&3
exit 0
"""


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
        self.group_sync = group_sync
        self.stats = JobStats()

    def full_id(self, queue: str, msg_id: str) -> str:
        return f"{self.rootcfg.base_url}/q/{queue}/{msg_id}"

    # -- start ---------------------------------------------------------------------------
    def start(self, queue: str, msg_id: str, cfg: QueueConfig,
              block_key: tuple[str, ...] | None) -> Job | None:
        """que -> run, then exec the script. None if the message was taken by someone else
        or could not start (it is then in err, or back in que for a storage problem)."""
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
        adir = job.msg_dir / "attach"
        try:
            names = sorted(n for n in os.listdir(adir) if not n.startswith("."))
        except OSError:
            names = []
        sources = [AttachmentSource(name=n, path=str(adir / n)) for n in names]
        try:
            self.store.queue_config(target)
        except (QueueNotFound, SpoolqError):
            return f"fail couldn't connect to queue - {target}"
        try:
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
    def finish(self, job: Job, exit_code: int, cfg: QueueConfig | None) -> Outcome:
        """Decide and apply the outcome of an exited script (rq-spec 3.3)."""
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
        policy = cfg.retry if cfg is not None else None
        delay = policy.delay(job.msg.count, random.random()) if policy is not None else 60.0
        if job.stopping and not cancelled:
            outcome = Outcome(State.QUE, "requeued: the daemon stopped while it ran", job.msg.count)
        else:
            outcome = protocol.decide(job.completion, exit_code, count=job.msg.count,
                                      max_count=job.msg.max_count, last_status=job.last_status,
                                      retry_delay=delay, cancelled=cancelled,
                                      timed_out=job.timeout if job.timed_out else None)
        # The status file already says the right thing when the script's last line is the
        # outcome's text (or there is no status at all and none is wanted): skip a rewrite.
        if job.status_written:
            current: str | None = job.last_status
        else:
            current = None if (job.msg_dir / "status").exists() else ""
        self.apply(job.queue, job.msg, outcome, dups=job.dups, current_status=current,
                   cancel_file=cancelled, durable_later=True, cfg=cfg)
        took = self.clock() - job.started
        self.stats.finished(job.queue, str(outcome.state), took)
        log.debug("%s/%s: pid %d exit %d after %.3f s -> %s%s", job.queue, job.msg_id, job.pid, exit_code,
                  took, outcome.state, f" - {outcome.status}" if outcome.status else "")
        return outcome

    def finish_without_run(self, queue: str, msg: Message, outcome: Outcome) -> None:
        self.apply(queue, msg, outcome, dups=[])

    def apply(self, queue: str, msg: Message, outcome: Outcome, *, dups: list[str],
              src: State = State.RUN, note: str = "", current_status: str | None = None,
              cancel_file: bool = True, durable_later: bool = False, cfg: QueueConfig | None = None) -> None:
        """Make ``outcome`` happen: status, webhooks, then the one move out of ``src``.

        ``durable_later``: a plain move (nothing in ``msg`` changes) is made durable by the
        daemon's group-commit thread instead of an fsync here (durable.GroupSync); ``cfg``
        says whether the queue wants fsyncs at all. ``cancel_file=False``: the caller knows
        there is no cancel file to remove.
        """
        msg_id = msg.msg_id
        mdir = message_path(self.store.qdir(queue), src, msg_id)
        if outcome.status != current_status:
            try:
                self.store.set_status(queue, msg_id, outcome.status)
            except SpoolqError:
                pass
        for f in ("pid", "cancel") if cancel_file else ("pid",):
            try:
                os.unlink(mdir / f)
            except OSError:
                pass
        parent_full = self.full_id(queue, msg_id)
        finished_ok = outcome.state in (State.DONE, State.RELAYED)
        now = self.clock()

        def update(m: Message) -> None:
            m.count = outcome.count
            if outcome.state == State.QUE:
                m.due = now + outcome.requeue_delay
            if finished_ok and dups:
                m.dups = [self.full_id(queue, d) for d in dups]

        if outcome.state.final:
            final = Message.from_dict(msg.to_dict())
            update(final)
            self.webhooks(queue, final, outcome.state)
        changed = (outcome.count != msg.count or outcome.state == State.QUE or (finished_ok and dups))
        deferred = durable_later and not changed and self.group_sync is not None
        try:
            # No rewrite of msg when nothing in it changes: one fsync'd write fewer per message.
            self.store.move(queue, msg_id, src, outcome.state, update=update if changed else None,
                            note=note or outcome.state.value, sync=False if deferred else None,
                            current=msg if src == State.RUN else None)
        except (WrongState, MessageNotFound, QueueNotFound, CorruptMessage) as e:
            log.warning("%s/%s: cannot move to %s: %s", queue, msg_id, outcome.state, e)
            return
        if deferred and self.group_sync is not None and (cfg is None or cfg.fsync):
            qdir = self.store.qdir(queue)
            self.group_sync.add_rename(mdir.parent, message_path(qdir, outcome.state, msg_id).parent)
        if finished_ok:
            for d in dups:
                self.finish_duplicate(queue, d, parent_full, outcome.state)

    def finish_duplicate(self, queue: str, msg_id: str, parent_full: str, state: State) -> None:
        """A coalesced duplicate ends with its parent, without running (rq-spec 3.4)."""
        try:
            self.store.set_status(queue, msg_id, f"duplicate {parent_full}")

            def mark(m: Message) -> None:
                m.dup = parent_full

            self.store.move(queue, msg_id, State.QUE, state, update=mark, note=f"duplicate of {parent_full}")
        except SpoolqError as e:
            log.info("%s/%s: duplicate not finished with its parent: %s", queue, msg_id, e)

    def webhooks(self, queue: str, msg: Message, state: State) -> None:
        """One message in the local ``webhook`` queue per ``post_run_webhook`` URL (rq-spec 3.3)."""
        if not msg.post_run_webhook or queue == WEBHOOK_QUEUE:
            return
        data = msg.to_dict()
        data["msg_id"] = self.full_id(queue, msg.msg_id)
        data["state"] = str(state)
        data.pop("history", None)
        payload = json.dumps(data, separators=(",", ":"))
        try:
            self.ensure_webhook_queue()
            for url in msg.post_run_webhook:
                self.store.create(WEBHOOK_QUEUE, Message(dest=WEBHOOK_QUEUE, param1=url, param2=payload,
                                                         src=data["msg_id"]))
        except SpoolqError as e:
            log.error("%s/%s: cannot queue webhook: %s", queue, msg.msg_id, e)

    def ensure_webhook_queue(self) -> None:
        if WEBHOOK_QUEUE in self.store.queues():
            return
        sdir = self.root / "scripts"
        sdir.mkdir(exist_ok=True)
        script = sdir / "webhook-placeholder"
        if not script.exists():
            tmp = sdir / ".webhook-placeholder.tmp"
            tmp.write_text(WEBHOOK_PLACEHOLDER)
            tmp.chmod(0o755)
            os.rename(tmp, script)
        try:
            self.store.create_queue(QueueConfig.from_dict({"name": WEBHOOK_QUEUE, "script": str(script)}))
            self.store.set_admin_state(WEBHOOK_QUEUE, AdminState.PAUSE)
            log.warning("created the webhook queue, PAUSEd, with a placeholder script: install a "
                        "sender and resume it to deliver webhooks")
        except QueueExists:
            pass
