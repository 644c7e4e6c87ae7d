"""Starting a queue script the way RQ does (reference/rq-spec.md 3.1), and finding it again.

The child: cwd ``<message>/job``, stdin /dev/null, stdout and stderr appended to
``job/stdio.log`` after an ``RQ START`` header, fd 3 the write end of the status pipe, fd 4
the read end of the reply pipe, every ``RQ_*`` variable, its own session (so the daemon can
kill the whole process group). No shell is involved unless ``exec_prefix`` names one.

The pid file (``<message>/pid``, as RQ keeps it) records ``pid spawn_time``, the
CLOCK_BOOTTIME nanoseconds just before the spawn. After a daemon crash the next daemon
kills a pid only if that process started within :data:`START_WINDOW_NS` of that moment
(``/proc/<pid>/stat`` gives start times on the same clock), never an unrelated process
that reused the pid: reuse within two seconds would take the whole pid space wrapping.
Reading the start time back at spawn would be exact, but it costs a /proc read while the
child is busy exec'ing, on the hot path of every message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import durable
from ..config import RootConfig
from ..errors import ScriptError
from ..fsq import message_args as fsq_item_args
from ..model import Message, QueueConfig
from . import posix_spawn as _ps

RQ_VER = "3.0.0"
START_WINDOW_NS = 2_000_000_000
"""How long after the recorded spawn time a process may have started and still be ours."""
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

# Never handed to scripts: the daemon's own secrets and stale values of our variables.
_SCRUB_PREFIXES = ("RQ_", "SPOOLQ_")


_low_fds_owned = False


def reserve_low_fds() -> bool:
    """Claim fds 3 and 4 for spawning, if they are free (RQ's ``exec 3>/dev/null 4>/dev/null``).

    Call it before opening anything else. When both are ours, :func:`spawn` hands the pipes
    over without running Python code in the child (fast vfork path); when something else
    already holds 3 or 4 (the daemon embedded in another program), it falls back to a
    ``preexec_fn`` that does the dup2 in the child.
    """
    global _low_fds_owned
    if _low_fds_owned:
        return True
    free = []
    for fd in (3, 4):
        try:
            os.fstat(fd)
        except OSError:
            free.append(fd)
    if free != [3, 4]:
        return False
    _park_low_fds()
    _low_fds_owned = True
    return True


def resolve_script(cfg: QueueConfig, root: Path) -> Path:
    """The real path to execute, resolved now (symlinked deploys take effect on the next run)."""
    return Path(script_path(cfg, root))


def script_path(cfg: QueueConfig, root: Path | str) -> str:
    """:func:`resolve_script` as a string (the daemon's start builds no Path)."""
    return real_path(cfg.script if cfg.script.startswith("/") else os.path.join(root, cfg.script))


def real_path(path: str) -> str:
    """``os.path.realpath(path)``, asked of the kernel where ``path`` exists: an ``O_PATH``
    open and its ``/proc/self/fd`` link are three system calls, where realpath's walk is a
    stat per component and a readlink per link (per message, for every script started)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    finally:
        os.close(fd)
    # Not a path (an unreachable mount, a file deleted meanwhile): the walk says what it is.
    return real if real.startswith("/") and not real.endswith(" (deleted)") else os.path.realpath(path)


def check_script(cfg: QueueConfig, root: Path) -> Path:
    """The resolved script, or ScriptError saying plainly why it cannot run.

    Without ``exec_prefix`` the script itself is exec'd: it must be an executable file, and
    a ``#!`` interpreter must exist. With a prefix, the script must exist and the prefix's
    program must be found.
    """
    script = require_file(cfg, root)
    if cfg.exec_prefix.strip():
        try:
            prog = shlex.split(cfg.exec_prefix)[0]
        except (ValueError, IndexError):
            raise ScriptError(f"exec_prefix cannot be parsed: {cfg.exec_prefix!r}") from None
        if shutil.which(prog) is None:
            raise ScriptError(f"script cannot start: exec_prefix program {prog!r} not found")
        return script
    if not os.access(script, os.X_OK):
        raise ScriptError(f"script cannot start: {script}: not executable (Permission denied)")
    head = _head(script)
    if head is not None and not head.startswith((b"#!", b"\x7fELF")):
        raise ScriptError(f"script cannot start: {script}: cannot be executed (Exec format error: "
                          "no #! line?)")
    interp = _interpreter(head)
    if interp is not None and not os.access(interp, os.X_OK):
        raise ScriptError(f"script cannot start: {script}: bad interpreter {interp!r} "
                          "(no such file, or not executable)")
    return script


def require_file(cfg: QueueConfig, root: Path) -> Path:
    """The resolved script if it is a regular file, else ScriptError. One stat: what the
    daemon checks before each run with an ``exec_prefix`` (whose program would otherwise
    start and fail on a missing script); :func:`check_script` does the rest on failure."""
    script = resolve_script(cfg, root)
    try:
        st = os.stat(script)
    except OSError as e:
        raise ScriptError(f"script cannot start: {cfg.script}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ScriptError(f"script cannot start: {cfg.script}: not a regular file")
    return script


def script_problem(cfg: QueueConfig, root: Path) -> str | None:
    """Why the queue's script cannot run, or None if :func:`check_script` finds it runnable."""
    try:
        check_script(cfg, root)
    except ScriptError as e:
        return str(e)
    return None


def _head(script: Path) -> bytes | None:
    """The first bytes of the script (None if it cannot be read: exec will say why)."""
    try:
        with open(script, "rb") as f:
            return f.read(256)
    except OSError:
        return None


def _interpreter(head: bytes | None) -> str | None:
    """The program on a ``#!`` line, or None."""
    if head is None or not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None


def rq_dest(dest: str, base_url: str, queue: str) -> tuple[str, str]:
    """RQ_DEST and RQ_DEST_QUEUE for a message's ``dest`` (rq-spec 3.1)."""
    if dest.startswith("http"):
        full = dest
    else:
        name = dest.strip("/")
        if name.startswith("q/"):
            name = name[2:].strip("/")
        full = f"{base_url}/q/{name or queue}/"
    tail = full.split("/q/", 1)[1] if "/q/" in full else ""
    return full, tail.split("/", 1)[0]


def scrubbed_env(base: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment without its own RQ_* and SPOOLQ_* variables."""
    return {k: v for k, v in base.items() if not k.startswith(_SCRUB_PREFIXES)}


def build_env(*, base: Mapping[str, str], cfg: QueueConfig, msg: Message, queue: str, script: Path,
              rootcfg: RootConfig, root: Path, msg_dir: Path, rq_env: str) -> dict[str, str]:
    """The script's environment: the daemon's, scrubbed, plus RQ's variables and ``env_vars``."""
    return {**queue_env(base=base, cfg=cfg, queue=queue, script=str(script), rootcfg=rootcfg, root=root,
                        rq_env=rq_env),
            **message_vars(msg, queue, rootcfg.base_url, str(msg_dir))}


def queue_env(*, base: Mapping[str, str], cfg: QueueConfig, queue: str, script: str, rootcfg: RootConfig,
              root: Path, rq_env: str) -> dict[str, str]:
    """The part of a script's environment that is the same for every message of the queue:
    the daemon's, scrubbed, then ``env_vars``, then RQ's variables that do not depend on the
    message (:func:`message_vars` adds those, over anything here)."""
    env = scrubbed_env(base)
    base_url = rootcfg.base_url
    env.update(cfg.env_vars)
    env.update({
        "RQ_VER": RQ_VER,
        "RQ_SCRIPT": cfg.script,
        "RQ_REALSCRIPT": script,
        "RQ_HOST": base_url + "/",
        "RQ_PORT": str(rootcfg.port),
        "RQ_WRITE": "3",
        "RQ_READ": "4",
        "RQ_PIPE": "3",
        "RQ_ENV": rq_env,
        "SPOOLQ_ROOT": str(root),
        "SPOOLQ_QUEUE": queue,
        # The queue's timeout (seconds, "" for none): a script that talks to a slow peer
        # can give up first and ask for a retry (the relay does) rather than be killed.
        "SPOOLQ_TIMEOUT": "" if cfg.timeout is None else f"{cfg.timeout:g}",
    })
    return env


MESSAGE_VARS = frozenset({
    "RQ_DEST", "RQ_DEST_QUEUE", "RQ_MSG_ID", "RQ_FULL_MSG_ID", "RQ_ORIG_MSG_ID", "RQ_MSG_DIR", "RQ_COUNT",
    "RQ_PARAM1", "RQ_PARAM2", "RQ_PARAM3", "RQ_PARAM4", "SPOOLQ_MSG_ID", "SPOOLQ_MESSAGE_DIR",
    "SPOOLQ_MAX_COUNT", "RQ_FORCE_REMOTE"})
"""Every variable :func:`message_vars` may set."""


def message_vars(msg: Message, queue: str, base_url: str, msg_dir: str) -> dict[str, str]:
    """RQ's variables that come from the message (rq-spec 3.1)."""
    full_id = f"{base_url}/q/{queue}/{msg.msg_id}"
    dest, dest_queue = rq_dest(msg.dest or queue, base_url, queue)
    env = {
        "RQ_DEST": dest,
        "RQ_DEST_QUEUE": dest_queue,
        "RQ_MSG_ID": msg.msg_id,
        "RQ_FULL_MSG_ID": full_id,
        "RQ_ORIG_MSG_ID": msg.orig_msg_id or full_id,
        "RQ_MSG_DIR": msg_dir + "/job",
        "RQ_COUNT": str(msg.count),
        "RQ_PARAM1": msg.param1,
        "RQ_PARAM2": msg.param2,
        "RQ_PARAM3": msg.param3,
        "RQ_PARAM4": msg.param4,
        "SPOOLQ_MSG_ID": msg.msg_id,
        "SPOOLQ_MESSAGE_DIR": msg_dir,
        "SPOOLQ_MAX_COUNT": str(msg.max_count),
    }
    if msg.force_remote:
        env["RQ_FORCE_REMOTE"] = "1"
    return env


class QueueEnv:
    """A queue's :func:`queue_env`, encoded once: the daemon's own environment and the queue's
    ``env_vars`` are most of a script's environment, the same at every start, and building
    and encoding them per message was a tenth of the daemon's cost per script. Raises
    ValueError (as :func:`~spoolq.runner.posix_spawn.env_block`) for what no environment
    can hold."""

    __slots__ = ("const", "_block", "_under")

    def __init__(self, const: dict[str, str]) -> None:
        self.const = const
        self._block = _ps.env_block({k: v for k, v in const.items() if k not in MESSAGE_VARS})
        # Values of message variables set here (by env_vars): a message without its own keeps them.
        self._under = {k: v for k, v in const.items() if k in MESSAGE_VARS}

    def with_message(self, own: dict[str, str]) -> ScriptEnv:
        return ScriptEnv(self, own)


class ScriptEnv:
    """One script's environment: its queue's :class:`QueueEnv` with the message's variables
    (and kind fsq's ``FSQ_ITEM_*``) over it. The same entries as ``as_dict()`` would give."""

    __slots__ = ("queue_env", "own")

    def __init__(self, queue_env: QueueEnv, own: dict[str, str]) -> None:
        self.queue_env = queue_env
        self.own = own

    def as_dict(self) -> dict[str, str]:
        return {**self.queue_env.const, **self.own}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.own.get(key, self.queue_env.const.get(key, default))

    def block(self) -> list[bytes]:
        """``KEY=value`` entries for execve."""
        qe, own = self.queue_env, self.own
        if not own.keys() <= MESSAGE_VARS:  # e.g. FSQ_ITEM_*, which env_vars might set too
            return _ps.env_block(self.as_dict())
        return [*qe._block, *_ps.env_block({**qe._under, **own} if qe._under else own)]


def build_argv(cfg: QueueConfig, script: Path | str, msg: Message | None = None) -> list[str]:
    """``exec_prefix`` empty: exec the script itself with one empty argument (RQ's
    ``exec(path, "")``). Otherwise the prefix is split like a shell would (no shell runs)
    and the script path appended. Then ``args``, and with ``message_arg`` the message's
    param1 as one last argument (isq's ``cmd "$line"``), in place of RQ's empty one. Kind
    fsq: ``args`` then the item's arguments, as fsq-scan runs ``PROG ARGS... ITEM-ARGS...``."""
    extra = [*cfg.args, *([msg.param1 if msg is not None else ""] if cfg.message_arg else [])]
    if cfg.kind == "fsq":  # fsq-scan's PROG ARGS... ITEM-ARGS...: no empty argument
        extra = [*cfg.args, *(fsq_item_args(msg) if msg is not None else [])]
        return [*shlex.split(cfg.exec_prefix), str(script), *extra]
    if not cfg.exec_prefix.strip():
        return [str(script), *(extra or [""])]
    return [*shlex.split(cfg.exec_prefix), str(script), *extra]


@dataclass
class Spawned:
    pid: int
    spawned_ns: int  # CLOCK_BOOTTIME just before the spawn (see same_process)
    status_fd: int  # read end of the status pipe (non-blocking)
    reply_fd: int  # write end of the reply pipe (non-blocking)


def spawn(argv: list[str], *, env: Mapping[str, str] | ScriptEnv, cwd: Path | str, log_fd: int,
          header_script: str, stdin_fd: int | None = None) -> Spawned:
    """Start the script in ``cwd`` with stdout and stderr on ``log_fd`` (``Store.log_fd``;
    closed here whatever happens), the status pipe's write end on fd 3 and the reply pipe's
    read end on fd 4; stdin is ``stdin_fd`` (kind fsq: the item; the caller closes it), else
    /dev/null. Raises ScriptError if the script cannot be executed, ValueError if this
    message's arguments or environment cannot be (a NUL, E2BIG), OSError for a failure of
    the machine's that may pass (:func:`_spawn_failure`).
    """
    opened = [log_fd]
    try:
        status_r, status_w = os.pipe()
        opened += (status_r, status_w)
        reply_r, reply_w = os.pipe()
    except BaseException:
        for fd in opened:  # EMFILE: nothing of this start stays open
            os.close(fd)
        raise
    stamp = _stamp()
    spawned_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    # The header goes in before the script can write anything, so it always comes first.
    # RQ's header starts with the script's pid, written by the child between fork and exec;
    # here no Python runs in the child (vfork), and the pid is not known before the spawn.
    # Writing it afterwards would race the script's output, and patching it in place would
    # break the log's append-only promise to live readers, so the header has no pid: it is
    # in the message's pid file while the script runs, and in `serve -v`'s log.
    try:
        durable.write_all(log_fd, f"\n{stamp} - RQ START - {header_script}\n".encode())
    except OSError:
        pass  # a full disk: the script still runs; its output may fail the same way
    try:
        pid = _start(argv, env, cwd, log_fd, status_w, reply_r, stdin_fd)
    except BaseException as e:
        for fd in (status_r, status_w, reply_r, reply_w, log_fd):
            os.close(fd)
        if isinstance(e, OSError):
            raise _spawn_failure(e, argv, cwd) from None
        if isinstance(e, subprocess.SubprocessError):
            raise ScriptError(f"script cannot start: {argv[0]}: {e}") from None
        raise  # a value no environment can hold (ValueError), or worse
    for fd in (log_fd, status_w, reply_r):
        os.close(fd)
    # A pipe's end has no other status flag: one F_SETFL each, not set_blocking's get and set.
    fcntl.fcntl(status_r, fcntl.F_SETFL, os.O_NONBLOCK)
    fcntl.fcntl(reply_w, fcntl.F_SETFL, os.O_NONBLOCK)
    return Spawned(pid, spawned_ns, status_r, reply_w)


_last_stamp: tuple[int, str] = (-1, "")


def _stamp() -> str:
    """The log header's local time, ``%Y-%m-%d %H:%M:%S %z``, formatted once a second."""
    global _last_stamp
    now = time.time()
    sec = int(now)
    if _last_stamp[0] != sec:
        _last_stamp = (sec, time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)))
    return _last_stamp[1]


def _start(argv: list[str], env: Mapping[str, str] | ScriptEnv, cwd: Path | str, log_fd: int, status_w: int,
           reply_r: int, stdin_fd: int | None = None) -> int:
    """Exec the script; its pid. glibc's ``posix_spawn`` (runner/posix_spawn.py) where it has
    what is needed and the fds handed down do not collide with 0-4; else subprocess.

    On the subprocess path the pipes still reach the child as fds 3 and 4 without any Python
    code running between fork and exec (so subprocess can use vfork): the parent points its
    own reserved fds 3 and 4 (see :func:`reserve_low_fds`) at the pipe ends just for the
    spawn and passes them down, then points them back at /dev/null. Only the dispatching
    thread spawns, and fds 3 and 4 are never free, so no other thread can be handed them
    meanwhile. Without them, a ``preexec_fn`` does the dup2 in the child.
    """
    stdin = _devnull() if stdin_fd is None else stdin_fd
    if _ps.AVAILABLE and min(log_fd, status_w, reply_r, stdin) > 4:
        block = env.block() if isinstance(env, ScriptEnv) else _ps.env_block(env)
        return _ps.spawn(_exec_path(argv[0], env), argv, block, cwd=os.fspath(cwd),
                         fds=((stdin, 0), (log_fd, 1), (log_fd, 2), (status_w, 3), (reply_r, 4)))
    fast = _low_fds_owned
    if isinstance(env, ScriptEnv):
        env = env.as_dict()

    def child_setup() -> None:  # slow path only: runs in the child between fork and exec
        hi_w, hi_r = os.dup(status_w), os.dup(reply_r)
        os.dup2(hi_w, 3)
        os.dup2(hi_r, 4)

    try:
        if fast:
            os.dup2(status_w, 3, inheritable=False)
            os.dup2(reply_r, 4, inheritable=False)
        # pass_fds (3, 4) on both paths: close_fds runs after preexec_fn, and would close
        # the pipes the slow path has just put on 3 and 4.
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=stdin, stdout=log_fd, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, pass_fds=(3, 4),
            preexec_fn=None if fast else child_setup,
        )
    finally:
        if fast:
            _park_low_fds()
    proc.returncode = 0  # the daemon reaps it with waitpid; subprocess must never try
    return proc.pid


def _exec_path(prog: str, env: Mapping[str, str] | ScriptEnv) -> str:
    """What to exec for ``argv[0]``: itself when it holds a slash, else the first match on
    the script's PATH (as subprocess and execvpe look it up)."""
    if "/" in prog:
        return prog
    found = shutil.which(prog, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", prog)
    return found


# exec's errors that say the script (or its interpreter) cannot run; anything else
# (EAGAIN at the process limit, ENOMEM, EMFILE...) is the machine's, for a later try.
_SCRIPT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.ELOOP, errno.EISDIR,
                  errno.ETXTBSY, errno.ENAMETOOLONG}


def _spawn_failure(e: OSError, argv: list[str], cwd: Path | str) -> Exception:
    """What a failed spawn means: ScriptError when the script cannot run (the queue holds
    its messages: SCRIPTERROR), ValueError when this message's arguments and environment
    are too big for exec (that message goes to err), else the OSError itself (the message
    waits and is tried again)."""
    if e.errno == errno.E2BIG:
        return ValueError("the arguments and environment are too long for exec (E2BIG)")
    if e.errno not in _SCRIPT_ERRNOS or (e.errno == errno.ENOENT and not os.path.isdir(cwd)):
        return OSError(e.errno, f"cannot start the script: {e.strerror}")
    why = e.strerror or str(e)
    if isinstance(e, PermissionError):
        why = "not executable (Permission denied)"
    elif e.errno == errno.ENOEXEC:
        why = "cannot be executed (Exec format error: no #! line?)"
    return ScriptError(f"script cannot start: {e.filename or argv[0]}: {why}")


_devnull_fd = -1


def _devnull() -> int:
    """One /dev/null fd (above 10, close-on-exec) kept open for every spawn's stdin."""
    global _devnull_fd
    if _devnull_fd < 0:
        low = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        _devnull_fd = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 10)  # dup3 refuses old == new
        os.close(low)
    return _devnull_fd


def _park_low_fds() -> None:
    """Point fds 3 and 4 at /dev/null (close-on-exec)."""
    nul = _devnull()
    for fd in (3, 4):
        os.dup2(nul, fd, inheritable=False)


def _proc_stat(pid: int | str) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if the process is gone.

    comm (field 2) may hold spaces and parentheses: the split starts after the last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); None if gone."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def same_process(pid: int, spawned_ns: int) -> bool:
    """Is ``pid`` still the script that was spawned at ``spawned_ns`` (CLOCK_BOOTTIME)?

    Its start time, in clock ticks on the same clock, must fall between one tick before
    (the tick truncates) and :data:`START_WINDOW_NS` after the recorded moment.
    """
    if pid <= 1:
        return False
    ticks = proc_start_ticks(pid)
    if ticks is None:
        return False
    started = ticks * _TICK_NS
    return spawned_ns - 2 * _TICK_NS <= started <= spawned_ns + START_WINDOW_NS


def leftover_processes(pgid: int, msg_id: str) -> list[int]:
    """Processes still in the process group or session ``pgid`` that carry this message's
    ``SPOOLQ_MSG_ID`` in their environment: what a script left running after it exited.

    Used by recovery once the script itself is gone. A pid is not reused while a group or
    session still uses its number, so members of group ``pgid`` are the script's own; the
    environment check guards against a whole new group that got the number later.
    """
    mark = f"SPOOLQ_MSG_ID={msg_id}".encode()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for e in entries:
        if not e.isdigit():
            continue
        try:
            fields = _proc_stat(e)
            if fields is None or pgid not in (int(fields[2]), int(fields[3])):  # pgrp, session
                continue
            with open(f"/proc/{e}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    found.append(int(e))
        except (OSError, IndexError, ValueError):
            continue
    return found


def has_exited(pid: int) -> bool:
    """Has child ``pid`` exited? ``waitid(WNOWAIT)``: it stays a zombie, so its process
    group can still be killed (grandchildren included) while its id cannot be reused."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def reap(pid: int) -> int:
    """Reap an exited child: its exit code (``-9`` if something else reaped it)."""
    try:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        return -signal.SIGKILL


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
