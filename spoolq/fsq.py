"""fsq, the directory standard (seed 003; spec A; docs/fsq.md), in Python 3.

A queue ``Q`` is a directory ``ROOT/Q/{tmp,queue,done,fail}``; a work item is one regular
file in ``queue/`` named ``_<time>_<entropy>_<pid>_<host>_<tries>_<arg>...``. It is built in
``tmp/``, fsync'd, then linked into ``queue/``, so ``queue/`` never shows a partial item. A
scanner takes an item by ``flock(LOCK_EX|LOCK_NB)`` on it, runs it, and renames it into
``done/`` or ``fail/``, or back into ``queue/`` with its tries field bumped for another try.

This module writes and reads exactly fsq 0.2.5's layout, names, modes and locks, so fsq's
own tools and spoolq share queues both ways (tests/test_fsq_interop.py runs the original
under Python 2.7). Where fsq has bugs, this follows fsq's documented intent, and
docs/fsq.md lists each difference:

- constants are read from the environment when a :class:`Conf` is made, not when the module
  is imported, and ``root`` is honoured (fsq bound ``FSQ_ROOT`` at import);
- TTL fails an item *older* than TTL seconds (fsq's comparison was inverted);
- an entropy clash takes the next entropy instead of failing the enqueue;
- enqueue, done and fail also fsync the directories they change, so an acknowledged
  item survives a power cut (fsq fsync'd only the item);
- a scanner re-checks, once it holds the lock, that the name still is that file, so an item
  another scanner finished in the meantime is not run twice;
- anything in ``queue/`` that is not a regular file (a link, a FIFO, a directory) is moved to
  ``fail/``, never opened through.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import grp
import os
import pwd
import re
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import IO, Any, BinaryIO

from . import durable

HOSTNAME = socket.gethostname()
CHUNK = 1 << 16
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- errors ----------------------------------------------------------------------------------

class FsqError(OSError):
    """Every fsq error; ``errno`` says which kind, ``strerror`` says what happened."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class EncodeError(FsqError):
    pass


class MalformedEntryError(FsqError):
    pass


class PathError(FsqError):
    pass


class ConfigError(FsqError):
    pass


class InstallError(FsqError):
    pass


class EnqueueError(FsqError):
    pass


class WorkItemError(FsqError):
    pass


class MaxTriesError(WorkItemError):
    pass


class TTLExpiredError(WorkItemError):
    pass


class ScanError(FsqError):
    pass


class DownError(ScanError):
    pass


class TriggerPullError(FsqError):
    pass


class HostsError(FsqError):
    pass




# --- constants -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conf:
    """fsq's constants (spec A.5). :meth:`from_env` reads the ``FSQ_*`` variables."""

    root: str = "/var/fsq"
    charset: str = "utf8"
    delimiter: str = "_"
    encode: str = "%"
    timefmt: str = "%Y%m%d%H%M%S"
    queue: str = "queue"
    tmp: str = "tmp"
    done: str = "done"
    fail: str = "fail"
    down: str = "down"
    trigger: str = "trigger-s"
    hosts: str = "hosts"
    hosts_trigger: str = "hosts-trigger-s"
    item_user: str | None = None
    item_group: str | None = None
    queue_user: str | None = None
    queue_group: str | None = None
    item_mode: int = 0o640
    queue_mode: int = 0o2770
    success: int = 0
    fail_tmp: int = 111
    fail_perm: int = 100
    use_trigger: bool = False
    lock: bool = True
    max_tries: int = 1
    ttl: int = 0

    def __post_init__(self) -> None:
        check_delimiter(self.delimiter, self.encode)
        for f in ("queue", "tmp", "done", "fail", "down", "trigger", "hosts", "hosts_trigger"):
            valid_name(getattr(self, f))
        if self.max_tries < 0 or self.ttl < 0:
            raise ConfigError(errno.EINVAL, "max_tries and ttl must be 0 or more")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Conf:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("FSQ_" + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _coerce(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Conf:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(name: str, raw: str) -> Any:
    default = getattr(Conf, name)
    try:
        if name.endswith("_mode"):
            return int(raw, 8)
        if isinstance(default, bool):
            return bool(int(raw))
        if isinstance(default, int):
            return int(raw)
    except ValueError:
        raise ConfigError(errno.EINVAL, f"FSQ_{name.upper()}: not a number: {raw!r}") from None
    return raw or None if default is None else raw


def check_delimiter(delimiter: str, encodeseq: str) -> None:
    for what, c in (("delimiter", delimiter), ("encode", encodeseq)):
        if len(c) != 1 or not c.isascii():
            raise EncodeError(errno.EINVAL, f"{what} must be one ASCII character: {c!r}")
    if delimiter == encodeseq:
        raise EncodeError(errno.EINVAL, f"delimiter and encode character must differ: {c!r}")


def valid_name(name: Any) -> str:
    """A queue, host, sub-directory or item name: not ``.``/``..``, no ``/`` or NUL."""
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        name = str(name)
    if not isinstance(name, str):
        raise PathError(errno.EINVAL, f"not a name: {name!r}")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise PathError(errno.EINVAL, f"illegal name: {name!r}")
    return name


# --- names -----------------------------------------------------------------------------------

def encode(arg: Any, delimiter: str = "_", encodeseq: str = "%", encoded: Iterable[str] = ()) -> str:
    """Escape the delimiter, the encode character, ``/`` and ``encoded`` as ``%hh``."""
    check_delimiter(delimiter, encodeseq)
    encoded = tuple(encoded)
    for c in encoded:
        if not str(c).isascii():
            raise EncodeError(errno.EINVAL, f"invalid encoded value: {c!r} (not ASCII)")
    special = {delimiter, encodeseq, "/", *encoded}
    out = []
    for c in str(arg):
        if c in special:
            if ord(c) > 0xFF:
                raise EncodeError(errno.EINVAL, f"cannot encode {c!r}")
            out.append(f"{encodeseq}{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def decode(arg: str, encodeseq: str = "%") -> str:
    out = []
    i, n = 0, len(arg)
    while i < n:
        c = arg[i]
        if c == encodeseq:
            hh = arg[i + 1:i + 3]
            if len(hh) < 2:
                raise EncodeError(errno.EINVAL, f"truncated encoding at end of argument: {arg!r}")
            if not all(h in "0123456789abcdefABCDEF" for h in hh):
                raise EncodeError(errno.EINVAL, f"invalid decode target: {encodeseq}{hh}")
            out.append(chr(int(hh, 16)))
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def construct(args: Iterable[Any], delimiter: str = "_", encodeseq: str = "%") -> str:
    """``D f1 D f2 ...`` with each field encoded; ``D`` alone for no fields."""
    parts = [encode(a, delimiter, encodeseq) for a in args]
    return delimiter + delimiter.join(parts) if parts else delimiter


def deconstruct(name: str, encodeseq: str = "%") -> tuple[str, list[str]]:
    """``(delimiter, fields)``: the delimiter is the name's first character, whatever it is."""
    if not name:
        raise MalformedEntryError(errno.EINVAL, "cannot derive delimiter from an empty name")
    delimiter = name[0]
    check_delimiter(delimiter, encodeseq)
    if len(name) == 1:
        return delimiter, []
    fields_: list[str] = []
    cur: list[str] = []
    skip = 0
    for c in name[1:]:
        if skip:
            skip -= 1
            cur.append(c)
        elif c == encodeseq:
            skip = 2
            cur.append(c)
        elif c == delimiter:
            fields_.append(decode("".join(cur), encodeseq))
            cur = []
        else:
            cur.append(c)
    fields_.append(decode("".join(cur), encodeseq))
    return delimiter, fields_


_entropy_lock = threading.Lock()
_entropy_key: tuple[int, str, str] | None = None
_entropy = -1


def _next_entropy(stamp: str) -> int:
    """fsq's per-process counter: 0 for the first item of a (pid, second, host), then 1, 2..."""
    global _entropy_key, _entropy
    with _entropy_lock:
        key = (os.getpid(), stamp, HOSTNAME)
        if key != _entropy_key:
            _entropy_key, _entropy = key, -1
        _entropy += 1
        return _entropy


def new_name(conf: Conf, args: Iterable[Any], tries: int = 0, now: datetime.datetime | None = None) -> str:
    stamp = (now or datetime.datetime.now()).strftime(conf.timefmt)
    fields_ = [stamp, _next_entropy(stamp), os.getpid(), HOSTNAME, tries, *args]
    return construct(fields_, conf.delimiter, conf.encode)


# --- paths -----------------------------------------------------------------------------------

class Paths:
    """The directories of one queue (or one host queue of it) under a :class:`Conf`."""

    def __init__(self, conf: Conf, queue: str, host: str | None = None) -> None:
        self.conf = conf
        self.queue_name = valid_name(queue)
        self.host = None if host is None else valid_name(host)
        base = os.path.join(conf.root, self.queue_name)
        self.top = base
        self.base = base if host is None else os.path.join(base, conf.hosts, self.host or "")

    def sub(self, which: str) -> str:
        return os.path.join(self.base, getattr(self.conf, which))

    def item(self, item_id: str, which: str = "queue") -> str:
        return os.path.join(self.sub(which), valid_name(item_id))


def _ids(user: str | None, group: str | None) -> tuple[int, int]:
    uid = gid = -1
    try:
        if user is not None:
            uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        if group is not None:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise ConfigError(errno.EINVAL, f"no such user or group: {e.args[0]}") from None
    return uid, gid


def _own(fd_or_path: int | str, mode: int, user: str | None, group: str | None) -> None:
    uid, gid = _ids(user, group)
    if isinstance(fd_or_path, int):
        if uid != -1 or gid != -1:
            os.fchown(fd_or_path, uid, gid)
        os.fchmod(fd_or_path, mode)
    else:
        if uid != -1 or gid != -1:
            os.chown(fd_or_path, uid, gid, follow_symlinks=False)
        os.chmod(fd_or_path, mode)


# --- install, down, triggers -----------------------------------------------------------------

def install(conf: Conf, queue: str, *, down: bool = False, triggered: bool = False,
            hosts: Iterable[str] = (), host_triggered: bool = False) -> None:
    """Build ``.Q*`` (hidden), then rename it to ``Q``: the queue appears whole or not at all."""
    p = Paths(conf, queue)
    if not os.path.isdir(conf.root):
        raise InstallError(errno.ENOENT, f"no such root: {conf.root}")
    tmp = tempfile.mkdtemp(prefix="." + p.queue_name, dir=conf.root)
    try:
        _build_queue_dir(conf, tmp, down=down, triggered=triggered or conf.use_trigger)
        hosts = list(hosts)
        if hosts:
            hdir = os.path.join(tmp, conf.hosts)
            os.mkdir(hdir)
            _own(hdir, conf.queue_mode, conf.queue_user, conf.queue_group)
            for h in hosts:
                os.mkdir(os.path.join(hdir, valid_name(h)))
                _build_queue_dir(conf, os.path.join(hdir, h), down=False, triggered=False)
            if host_triggered:
                _mkfifo(conf, os.path.join(tmp, conf.hosts_trigger), conf.queue_mode, conf.queue_user,
                        conf.queue_group)
        _sync_tree(tmp)
        try:
            os.rename(tmp, p.top)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise InstallError(e.errno, f"queue exists: {p.queue_name}") from None
            raise
        durable.fsync_dir(conf.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_queue_dir(conf: Conf, path: str, *, down: bool, triggered: bool) -> None:
    _own(path, conf.queue_mode, conf.queue_user, conf.queue_group)
    for which in ("tmp", "queue", "done", "fail"):
        d = os.path.join(path, getattr(conf, which))
        os.mkdir(d)
        _own(d, conf.queue_mode, conf.queue_user, conf.queue_group)
    if down:
        _make_down(conf, os.path.join(path, conf.down))
    if triggered:
        _mkfifo(conf, os.path.join(path, conf.trigger), conf.item_mode, conf.item_user, conf.item_group)


def _sync_tree(top: str) -> None:
    for d, _subdirs, _files in os.walk(top, topdown=False):
        durable.fsync_dir(d)


def uninstall(conf: Conf, queue: str) -> None:
    """Down the queue, move it aside (hidden) in one rename, then remove it."""
    p = Paths(conf, queue)
    if not os.path.isdir(p.top):
        raise ConfigError(errno.ENOENT, f"no such queue: {p.queue_name}")
    set_down(conf, queue)
    aside = tempfile.mkdtemp(prefix="." + p.queue_name, dir=conf.root)
    os.rename(p.top, aside)
    durable.fsync_dir(conf.root)
    shutil.rmtree(aside)


def install_host(conf: Conf, queue: str, *hosts: str) -> None:
    p = Paths(conf, queue)
    if not os.path.isdir(p.top):
        raise ConfigError(errno.ENOENT, f"no such queue: {p.queue_name}")
    hdir = os.path.join(p.top, conf.hosts)
    try:
        os.mkdir(hdir)
        _own(hdir, conf.queue_mode, conf.queue_user, conf.queue_group)
    except FileExistsError:
        pass
    for h in hosts:
        tmp = tempfile.mkdtemp(prefix="." + valid_name(h), dir=hdir)
        try:
            _build_queue_dir(conf, tmp, down=False, triggered=False)
            _sync_tree(tmp)
            try:
                os.rename(tmp, os.path.join(hdir, h))
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise InstallError(e.errno, f"host queue exists: {p.queue_name}/{h}") from None
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    durable.fsync_dir(hdir)


def uninstall_host(conf: Conf, queue: str, *hosts: str) -> None:
    p = Paths(conf, queue)
    hdir = os.path.join(p.top, conf.hosts)
    for h in hosts:
        target = os.path.join(hdir, valid_name(h))
        if not os.path.isdir(target):
            raise HostsError(errno.ENOENT, f"no such host: {p.queue_name}/{h}")
        aside = tempfile.mkdtemp(prefix="." + h, dir=hdir)
        os.rename(target, aside)
        shutil.rmtree(aside)
    durable.fsync_dir(hdir)


def hosts(conf: Conf, queue: str) -> list[str]:
    hdir = os.path.join(Paths(conf, queue).top, conf.hosts)
    try:
        return sorted(n for n in os.listdir(hdir) if not n.startswith(".")
                      and os.path.isdir(os.path.join(hdir, n)))
    except FileNotFoundError:
        return []


def queues(conf: Conf) -> list[str]:
    """The installed queues under the root (hidden ``.Q*`` work directories left out)."""
    try:
        names = os.listdir(conf.root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith(".")
                  and os.path.isdir(os.path.join(conf.root, n, conf.queue)))


def _make_down(conf: Conf, path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, conf.item_mode)
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        _own(fd, conf.item_mode, conf.item_user, conf.item_group)
    finally:
        os.close(fd)


def set_down(conf: Conf, queue: str, host: str | None = None) -> None:
    p = Paths(conf, queue, host)
    if not os.path.isdir(p.base):
        raise ConfigError(errno.ENOENT, f"no such queue: {_label(p)}")
    _make_down(conf, os.path.join(p.base, conf.down))
    durable.fsync_dir(p.base)


def set_up(conf: Conf, queue: str, host: str | None = None) -> None:
    p = Paths(conf, queue, host)
    if not os.path.isdir(p.base):
        raise ConfigError(errno.ENOENT, f"no such queue: {_label(p)}")
    try:
        os.unlink(os.path.join(p.base, conf.down))
    except FileNotFoundError:
        return
    durable.fsync_dir(p.base)


def is_down(conf: Conf, queue: str, host: str | None = None) -> bool:
    p = Paths(conf, queue, host)
    return os.path.lexists(os.path.join(p.base, conf.down))


def _label(p: Paths) -> str:
    return p.queue_name if p.host is None else f"{p.queue_name}/{p.conf.hosts}/{p.host}"


def _mkfifo(conf: Conf, path: str, mode: int, user: str | None, group: str | None) -> None:
    try:
        os.mkfifo(path, mode)
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            raise ConfigError(errno.EEXIST, f"not a FIFO: {path}") from None
    _own(path, mode, user, group)


def trigger(conf: Conf, queue: str, host: bool = False) -> None:
    p = Paths(conf, queue)
    name = conf.hosts_trigger if host else conf.trigger
    mode = conf.queue_mode if host else conf.item_mode
    _mkfifo(conf, os.path.join(p.top, name), mode, conf.item_user, conf.item_group)


def untrigger(conf: Conf, queue: str, host: bool = False) -> None:
    p = Paths(conf, queue)
    try:
        os.unlink(os.path.join(p.top, conf.hosts_trigger if host else conf.trigger))
    except FileNotFoundError:
        pass


def trigger_pull(conf: Conf, queue: str, ignore_listener: bool = False, host: bool = False) -> None:
    """Write one NUL to the queue's FIFO without blocking; no reader is an error unless ignored."""
    p = Paths(conf, queue)
    path = os.path.join(p.top, conf.hosts_trigger if host else conf.trigger)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:
            if ignore_listener:
                return
            raise TriggerPullError(errno.ENXIO, f"No listener for: {path}") from None
        raise TriggerPullError(e.errno or errno.EIO, f"cannot pull trigger {path}: {e.strerror}") from None
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise TriggerPullError(errno.EINVAL, f"not a FIFO: {path}")
        try:
            os.write(fd, b"\0")
        except BlockingIOError:
            pass  # full: the listener has wake-ups queued already
    finally:
        os.close(fd)


# --- enqueue ---------------------------------------------------------------------------------

Source = bytes | str | int | IO[bytes]


def _copy_in(src: Source, fd: int) -> None:
    if isinstance(src, (bytes, bytearray, memoryview)):
        durable.write_all(fd, bytes(src))
    elif isinstance(src, str):
        with open(src, "rb") as f:
            _copy_in(f, fd)
    elif isinstance(src, int):
        while True:
            chunk = os.read(src, CHUNK)
            if not chunk:
                break
            durable.write_all(fd, chunk)
    else:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            durable.write_all(fd, chunk if isinstance(chunk, bytes) else str(chunk).encode())


def enqueue(conf: Conf, queue: str, src: Source, args: Iterable[Any] = (), *,
            host: str | None = None) -> str:
    """Add one item; return its id. ``src``: bytes, a path, a raw fd or a binary file object.

    The item is written in ``tmp/``, fsync'd, linked into ``queue/`` (fsync'd too) and
    unlinked from ``tmp/``: ``queue/`` never holds a partial item, and the id returned is
    durable.
    """
    args = [str(a) for a in args]
    p = Paths(conf, queue, host)
    if not os.path.isdir(p.sub("queue")):
        raise EnqueueError(errno.ENOENT, f"no such queue: {_label(p)}")
    for _attempt in range(1000):
        name = new_name(conf, args)
        tmp = p.item(name, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         conf.item_mode)
        except FileExistsError:
            continue
        except OSError as e:
            raise EnqueueError(e.errno or errno.EIO, f"cannot enqueue into {_label(p)}: {e.strerror}") from None
        try:
            try:
                if conf.item_user is not None or conf.item_group is not None:
                    os.fchown(fd, *_ids(conf.item_user, conf.item_group))
                _copy_in(src, fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, p.item(name))
            except FileExistsError:
                os.unlink(tmp)
                continue
            os.unlink(tmp)
            durable.fsync_dir(p.sub("queue"))
            return name
        except FsqError:
            _unlink_quietly(tmp)
            raise
        except OSError as e:
            _unlink_quietly(tmp)
            raise EnqueueError(e.errno or errno.EIO, f"cannot enqueue into {_label(p)}: {e.strerror}") from None
    raise EnqueueError(errno.EEXIST, f"no free name in {_label(p)}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def reenqueue(conf: Conf, item: WorkItem, queue: str, *, host: str | None = None, link: bool = False) -> str:
    """Copy ``item`` into another queue (or host queue) under the same id, tries included.
    Idempotent: an id already in the target is left as it is."""
    p = Paths(conf, queue, host)
    name = item.id
    target = p.item(name)
    if os.path.lexists(target):
        return name
    tmp = p.item(name, "tmp")
    if link:
        _unlink_quietly(tmp)
        os.link(item.path, tmp)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
        finally:
            _unlink_quietly(tmp)
    else:
        with open(item.path, "rb", opener=_nofollow_opener) as f:
            _link_in(f, tmp, target, conf.item_mode)
    durable.fsync_dir(p.sub("queue"))
    return name


def _link_in(src: Source, tmp: str, target: str, mode: int) -> None:
    """Copy ``src`` into ``tmp`` (fsync'd), link it as ``target`` (one already there stays), and
    unlink ``tmp``: ``target`` appears whole or not at all. The caller fsyncs the directory."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            _copy_in(src, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
    finally:
        _unlink_quietly(tmp)


def _nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


# --- work items, scan, done ------------------------------------------------------------------

class WorkItem:
    """One item taken from ``queue/``: its fields, and (unless ``no_open``) ``item``, the open,
    flock'd file. The lock lasts until :meth:`close`; a renamed item keeps it (same inode).
    Taken by :func:`take` or :func:`scan`, it also holds its queue's directory open, and its
    done/fail moves are made relative to it, never through a ``done/`` or ``fail/`` swapped
    for a link."""

    def __init__(self, conf: Conf, queue: str, item_id: str, *, host: str | None = None,
                 fd: int | None = None, base_fd: int | None = None) -> None:
        self._base: int | None = None
        self.conf = conf
        self.queue = queue
        self.host = host
        self.id = item_id
        self.paths = Paths(conf, queue, host)
        self.item: BinaryIO | None = None
        self.delimiter, f = deconstruct(item_id, conf.encode)
        try:  # fsq's order: the date first, so `junkfile` fails as fsq says it does
            self.enqueued_at = datetime.datetime.strptime(f[0] if f else "", conf.timefmt)
        except ValueError:
            raise MalformedEntryError(errno.EINVAL, f"invalid date string for strptime fmt "
                                                    f"{conf.timefmt}: {f[0] if f else ''}") from None
        if len(f) < 5:
            raise MalformedEntryError(errno.EINVAL, f"needed at least 5 fields, got {len(f)}: {item_id}")
        self.entropy, self.pid, self.hostname = f[1], f[2], f[3]
        self.tries = parse_tries(f[4])
        self.arguments = tuple(f[5:])
        if fd is not None:  # last: an item that does not parse leaves the fds to its caller
            self.item = os.fdopen(fd, "rb")
        if base_fd is not None:
            self._base = os.dup(base_fd)

    @property
    def path(self) -> str:
        return self.paths.item(self.id)

    def environ(self) -> dict[str, str]:
        """fsq-scan's ``FSQ_ITEM_*`` variables for a program run on this item."""
        env = {"FSQ_ITEM_PID": self.pid, "FSQ_ITEM_ENTROPY": self.entropy,
               "FSQ_ITEM_HOSTNAME": self.hostname, "FSQ_ITEM_ID": self.id,
               "FSQ_ITEM_TRIES": str(self.tries),
               "FSQ_ITEM_ENQUEUED_AT": self.enqueued_at.strftime(self.conf.timefmt)}
        if self.host is not None:
            env["FSQ_ITEM_HOST"] = self.host
        return env

    def close(self) -> None:
        if self.item is not None:
            self.item.close()
            self.item = None
        if self._base is not None:
            os.close(self._base)
            self._base = None

    def _rename(self, new_id: str, which: str) -> None:
        """``queue/<id>`` to ``<which>/<new_id>``, durably: relative to the queue's directory
        when this item holds it open (each sub-directory opened without following a link)."""
        if self._base is None:
            os.rename(self.path, self.paths.item(new_id, which))
            durable.fsync_after_rename(self.paths.sub(which), self.paths.sub("queue"))
            return
        qfd = os.open(self.conf.queue, _DIR, dir_fd=self._base)
        try:
            dfd = qfd if which == "queue" else os.open(getattr(self.conf, which), _DIR, dir_fd=self._base)
            try:
                os.rename(self.id, valid_name(new_id), src_dir_fd=qfd, dst_dir_fd=dfd)
                durable.fsync_after_rename(dfd, qfd)
            finally:
                if dfd != qfd:
                    os.close(dfd)
        finally:
            os.close(qfd)

    def __enter__(self) -> WorkItem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def success(self) -> None:
        _move(self, "done")

    def fail_perm(self) -> None:
        _move(self, "fail")

    def fail_tmp(self, max_tries: int | None = None, ttl: int | None = None) -> str:
        """Another try: the same name with tries + 1, back in ``queue/``. Past the limits the
        item goes to ``fail/`` (its name unchanged) and :class:`MaxTriesError` (or
        :class:`TTLExpiredError`) is raised. Returns the new id."""
        max_tries = self.conf.max_tries if max_tries is None else max_tries
        ttl = self.conf.ttl if ttl is None else ttl
        try:
            check_limits(self.tries + 1, self.enqueued_at, max_tries, ttl)
        except WorkItemError as e:
            self.fail_perm()
            raise type(e)(e.errno or errno.EINTR, f"{e.strerror}: for item {self.id}; failed permanently") from None
        _, f = deconstruct(self.id, self.conf.encode)
        f[4] = str(self.tries + 1)
        new_id = construct(f, self.delimiter, self.conf.encode)
        self._rename(new_id, "queue")
        self.id, self.tries = new_id, self.tries + 1
        return new_id

    retry = fail_tmp

    def fail(self, fail_type: int | None = None) -> None:
        if fail_type == self.conf.fail_tmp:
            self.fail_tmp()
        else:
            self.fail_perm()

    def done(self, done_type: int | None = None) -> None:
        """fsq's exit-code contract: success → ``done/``; fail_tmp → another try; else ``fail/``."""
        if done_type is None or done_type == self.conf.success:
            self.success()
        elif done_type == self.conf.fail_tmp:
            self.fail_tmp()
        else:
            self.fail_perm()


def _move(item: WorkItem, which: str) -> None:
    try:
        item._rename(item.id, which)
    except OSError as e:
        raise WorkItemError(e.errno or errno.EIO, f"cannot move {item.id} to {which}: {e.strerror}") from None


def check_limits(tries: int, enqueued_at: datetime.datetime, max_tries: int, ttl: int,
                 now: datetime.datetime | None = None) -> None:
    """Raise when ``tries`` reached ``max_tries`` (0: no limit) or the item is older than
    ``ttl`` seconds (0: no limit). fsq's own TTL test was inverted; this is its intent."""
    if max_tries > 0 and tries >= max_tries:
        raise MaxTriesError(errno.EINTR, f"Max tries exceeded: {max_tries} ({tries})")
    if ttl > 0 and (now or datetime.datetime.now()) > enqueued_at + datetime.timedelta(seconds=ttl):
        raise TTLExpiredError(errno.EINTR, f"TTL Expired: {ttl}")


Rejected = Callable[[str, FsqError], None]


def take(conf: Conf, queue: str, name: str, *, host: str | None = None, lock: bool | None = None,
         no_open: bool = False, max_tries: int | None = None, ttl: int | None = None,
         rejected: Rejected | None = None) -> WorkItem | None:
    """Take one named item: open it (never through a link), flock it, check it is still that
    name, parse it and check its limits. ``None`` if it is gone or another scanner holds it.
    An item that cannot be run (not a regular file, a bad name, past its tries or TTL) is
    moved to ``fail/``, reported to ``rejected``, and ``None`` returned."""
    p = Paths(conf, queue, host)
    fds: list[int] = []
    try:
        try:
            fds.append(os.open(p.base, _DIR))
        except FileNotFoundError:
            return None
        fds.append(os.open(conf.queue, _DIR, dir_fd=fds[0]))
        fds.append(os.open(conf.fail, _DIR, dir_fd=fds[0]))
        return _take(conf, queue, host, fds[1], fds[2], name, lock=conf.lock if lock is None else lock,
                     no_open=no_open, max_tries=conf.max_tries if max_tries is None else max_tries,
                     ttl=conf.ttl if ttl is None else ttl, rejected=rejected, base_fd=fds[0])
    finally:
        for fd in fds:
            os.close(fd)


def _take(conf: Conf, queue: str, host: str | None, qfd: int, ffd: int, name: str, *, lock: bool, no_open: bool,
          max_tries: int, ttl: int, rejected: Rejected | None, base_fd: int | None = None) -> WorkItem | None:
    """:func:`take` on open ``queue/`` and ``fail/`` directory fds: every look, open and
    rename relative to them."""
    fd = None
    try:
        if not no_open:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=qfd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM):
                    raise
                raise MalformedEntryError(errno.EINVAL, f"not a regular file: {name}") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MalformedEntryError(errno.EINVAL, f"not a regular file: {name}")
            if lock:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None  # another scanner's (fd closed below)
                try:
                    now = os.stat(name, dir_fd=qfd, follow_symlinks=False)
                except FileNotFoundError:
                    return None
                if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                    return None  # finished and replaced while we waited: not ours
            os.set_blocking(fd, True)
        elif not stat.S_ISREG(os.stat(name, dir_fd=qfd, follow_symlinks=False).st_mode):
            raise MalformedEntryError(errno.EINVAL, f"not a regular file: {name}")
        item = WorkItem(conf, queue, name, host=host, fd=fd, base_fd=base_fd)
        fd = None
        try:
            check_limits(item.tries, item.enqueued_at, max_tries, ttl)
        except WorkItemError as e:
            item.close()
            raise type(e)(e.errno or errno.EINTR, f"{e.strerror}: for item {name}; failed permanently") from None
        return item
    except FileNotFoundError:
        return None
    except FsqError as e:
        if fd is not None:
            os.close(fd)
            fd = None
        try:
            os.rename(name, name, src_dir_fd=qfd, dst_dir_fd=ffd)
        except FileNotFoundError:
            return None
        except OSError as e2:  # (fail/<name> is a directory...): left where it is, the scan goes on
            if rejected:
                rejected(name, type(e)(e.errno or errno.EINVAL, f"{e.strerror}; it cannot be moved to fail/ "
                                                                f"either ({e2.strerror}): left in queue/"))
            return None
        durable.fsync_after_rename(ffd, qfd)
        if rejected:
            # A fresh exception: the caught one's traceback would keep the frames above alive,
            # and with them the items a scan yielded before (their locks held).
            rejected(name, type(e)(e.errno or errno.EINVAL, str(e.strerror)))
        return None
    finally:
        if fd is not None:
            os.close(fd)


def scan(conf: Conf, queue: str, *, host: str | None = None, lock: bool | None = None,
         ignore_down: bool = False, no_open: bool = False, max_tries: int | None = None,
         ttl: int | None = None, rejected: Rejected | None = None) -> Iterator[WorkItem]:
    """The items of a snapshot of ``queue/``, in name order, each taken with :func:`take`.
    Raises :class:`DownError` (before an item) while the queue is down, unless ``ignore_down``.
    Items another scanner holds, or that vanish, are skipped; items that cannot run go to
    ``fail/`` (reported to ``rejected``) and the scan goes on."""
    p = Paths(conf, queue, host)
    try:
        names = sorted(os.listdir(p.sub("queue")))
    except FileNotFoundError:
        raise ScanError(errno.ENOENT, f"no such queue: {_label(p)}") from None
    for name in names:
        if not ignore_down and is_down(conf, queue, host):
            raise DownError(errno.EAGAIN, f"queue {_label(p)}: is down")
        item = take(conf, queue, name, host=host, lock=lock, no_open=no_open, max_tries=max_tries,
                    ttl=ttl, rejected=rejected)
        if item is not None:
            yield item


def counts(conf: Conf, queue: str, host: str | None = None) -> dict[str, int]:
    """Entries in ``queue/``, ``done/``, ``fail/`` and ``tmp/``."""
    p = Paths(conf, queue, host)
    out = {}
    for which in ("queue", "done", "fail", "tmp"):
        try:
            with os.scandir(p.sub(which)) as it:
                out[which] = sum(1 for _ in it)
        except FileNotFoundError:
            out[which] = 0
    return out


def host_dist(conf: Conf, queue: str, to_hosts: Iterable[str] = (), *, link: bool = False,
              mark_done: bool = True, rejected: Rejected | None = None, **scan_kw: Any) -> list[str]:
    """Copy every item (same id) into each host queue (all when none are named), then move it
    to ``done/`` (unless not ``mark_done``). Returns the ids distributed."""
    targets = list(to_hosts) or hosts(conf, queue)
    if not targets:
        raise HostsError(errno.ENOENT, f"queue {queue} has no hosts")
    for h in targets:
        if not os.path.isdir(Paths(conf, queue, h).sub("queue")):
            raise HostsError(errno.ENOENT, f"no such host: {queue}/{h}")
    out = []
    for item in scan(conf, queue, rejected=rejected, **scan_kw):
        with item:
            for h in targets:
                reenqueue(conf, item, queue, host=h, link=link)
            if mark_done:
                item.success()
            out.append(item.id)
    return out


# --- spoolq messages made of fsq items (kind fsq; daemon/fsqintake.py) -----------------------

HOLD = ".spoolq"
"""The directory, beside ``queue/``, where the daemon holds the items it took (each one is a
message of a kind fsq queue, waiting or running) until their outcome moves them into
``done/`` or ``fail/``. Hidden, the daemon's own (0700): fsq's tools never look there."""


def message_item(msg: Any) -> tuple[str, str]:
    """``(fsq queue directory, item id)`` of a message the fsq intake made; ValueError if it
    is not one (a message sent to a kind fsq queue by other means)."""
    f = msg.params.get("fsq") if isinstance(msg.params, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("dir"), str) or not isinstance(f.get("id"), str):
        raise ValueError("not an fsq item: the message has no params.fsq {dir, id}")
    return f["dir"], valid_name(f["id"])


def _message_fields(msg: Any) -> list[str]:
    _, item_id = message_item(msg)
    return deconstruct(item_id, Conf.encode)[1]


def message_args(msg: Any) -> list[str]:
    """The item's arguments, for fsq-scan's ``PROG ARGS... ITEM-ARGS...``."""
    return _message_fields(msg)[5:]


def message_env(msg: Any) -> dict[str, str]:
    """``FSQ_ITEM_*`` for a message's item; tries is the message's count (its retries so far)."""
    _, item_id = message_item(msg)
    f = _message_fields(msg)
    if len(f) < 5:
        raise ValueError(f"malformed fsq item id: {item_id}")
    return {"FSQ_ITEM_PID": f[2], "FSQ_ITEM_ENTROPY": f[1], "FSQ_ITEM_HOSTNAME": f[3], "FSQ_ITEM_ID": item_id,
            "FSQ_ITEM_TRIES": str(msg.count), "FSQ_ITEM_ENQUEUED_AT": f[0]}


_TRIES = re.compile(r"-?[0-9]+")


def parse_tries(field: str) -> int:
    """The tries field, as Python 2's ``int()`` (fsq's) reads it: digits, maybe a minus; not
    Python 3's laxer ``int()`` (``" 2"``, ``"1_0"``)."""
    if not _TRIES.fullmatch(field):
        raise MalformedEntryError(errno.EINVAL, f"tries must be an int, not {field!r}")
    return int(field)


def outcome_name(item_id: str, tries: int, encodeseq: str = "%") -> str:
    """The item's id with its tries field set, as fsq names it in ``done/`` and ``fail/``
    (the id itself, byte for byte, while the tries are those it came with)."""
    delimiter, f = deconstruct(item_id, encodeseq)
    if len(f) < 5 or (_TRIES.fullmatch(f[4]) and max(0, int(f[4])) == tries):
        return item_id
    f[4] = str(tries)
    return construct(f, delimiter, encodeseq)


class Held:
    """An fsq queue directory's ``queue/``, ``done/``, ``fail/`` and one spoolq queue's hold
    directory ``.spoolq/<queue>/``, opened without following a link (every rename is
    relative to these fds, so a directory swapped for a link later cannot redirect one).
    The hold directories must be this user's and writable by no one else. A held item is
    named by the id of the message it is (its own id is in the message's ``params.fsq``),
    so a look at the hold directory tells which messages' items are there. Close it after
    use."""

    def __init__(self, fsq_dir: str, queue: str, conf: Conf | None = None, *, create: bool = False) -> None:
        """``queue``: the spoolq queue whose items these are; each has its own hold directory,
        ``.spoolq/<queue>/``, so two queues serving one fsq directory never touch each
        other's. ``create``: make the hold directories when missing (the intake does)."""
        self.fsq_dir = fsq_dir
        self.queue = queue
        self.conf = conf or Conf.from_env(root=os.path.dirname(fsq_dir))
        self.fds: dict[str, int] = {}
        try:
            top = os.open(fsq_dir, _DIR)
            self.fds["top"] = top
            for which in ("queue", "done", "fail"):
                self.fds[which] = os.open(getattr(self.conf, which), _DIR, dir_fd=top)
            parent = top
            for i, name in enumerate((HOLD, valid_name(queue))):
                if create:
                    try:
                        os.mkdir(name, 0o700, dir_fd=parent)
                        os.fsync(parent)
                    except FileExistsError:
                        pass
                fd = os.open(name, _DIR, dir_fd=parent)
                self.fds["hold" if i else "holds"] = fd
                st = os.fstat(fd)
                if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                    raise ConfigError(errno.EPERM, f"{fsq_dir}/{HOLD} is not this user's alone "
                                                   f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
                parent = fd
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hold(self, taken: Iterable[tuple[WorkItem, str]]) -> tuple[set[str], list[str]]:
        """Move taken items (each with its message's id) from ``queue/`` into the hold
        directory, each named by the message's id, and check each is still the file that was
        locked (one swapped meanwhile goes to ``fail/`` instead). fsync'd. Returns the message
        ids of the items held, and what went wrong with the others."""
        moved: set[str] = set()
        problems: list[str] = []
        swapped = False
        for item, msg_id in taken:
            try:
                os.rename(valid_name(item.id), valid_name(msg_id), src_dir_fd=self.fds["queue"],
                          dst_dir_fd=self.fds["hold"])
            except FileNotFoundError:
                problems.append(f"{item.id}: gone before it was held")
                continue
            except OSError as e:
                problems.append(f"{item.id}: cannot be held: {e.strerror or e}")
                continue
            now = os.stat(msg_id, dir_fd=self.fds["hold"], follow_symlinks=False)
            if item.item is not None and (now.st_dev, now.st_ino) != _dev_ino(item.item.fileno()):
                os.rename(msg_id, item.id, src_dir_fd=self.fds["hold"], dst_dir_fd=self.fds["fail"])
                swapped = True
                problems.append(f"{item.id}: replaced by another file after it was locked: moved to fail/")
                continue
            moved.add(msg_id)
        durable.fsync_after_rename(self.fds["hold"], self.fds["queue"])
        if swapped:
            os.fsync(self.fds["fail"])
        return moved, problems

    def in_queue(self, name: str) -> bool:
        return _lexists(self.fds["queue"], name)

    def is_held(self, msg_id: str) -> bool:
        return _lexists(self.fds["hold"], valid_name(msg_id))

    def held(self) -> list[str]:
        """The message ids whose items are held."""
        return sorted(n for n in os.listdir(self.fds["hold"]) if not n.startswith("."))

    def open(self, msg_id: str) -> int:
        """An fd of the message's held item. FileNotFoundError if it is not held: only an
        item the intake held under the message's own id is ever read (a message naming some
        other item in its params gets nothing)."""
        try:
            fd = os.open(valid_name(msg_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fds["hold"])
        except OSError as e:  # gone, a link (ELOOP), a FIFO without a writer (ENXIO)...
            raise FileNotFoundError(errno.ENOENT, f"the fsq item of message {msg_id} is not held "
                                                  f"({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, f"the fsq item of message {msg_id} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    def release(self, msg_id: str, name: str, which: str, *, sync: bool = True) -> bool:
        """Move the message's held item into ``done/`` or ``fail/`` as ``name``. Only a held
        item moves: one already in ``done/`` or ``fail/`` is fsq's, whatever a message
        says. A name taken there gets a ``.<n>`` suffix rather than replace it. False if the
        item is not held. ``sync`` False: no fsync (the start-up sweep repairs a lost rename)."""
        if not self.is_held(msg_id):
            return False
        target = name
        for n in range(1, 1000):
            if not _lexists(self.fds[which], target):
                break
            target = f"{name}.{n}"[:255]
        try:
            os.rename(msg_id, target, src_dir_fd=self.fds["hold"], dst_dir_fd=self.fds[which])
        except FileNotFoundError:
            return False
        if sync:
            durable.fsync_after_rename(self.fds[which], self.fds["hold"])
        return True

    def where_finished(self, names: Iterable[str]) -> str | None:
        """``"done"`` or ``"fail"`` if one of ``names`` is there (an outcome written before a
        crash kept its message from moving), else None."""
        for which in ("done", "fail"):
            if any(_lexists(self.fds[which], n) for n in names):
                return which
        return None

    def to_fail(self, msg_id: str, name: str) -> None:
        """A held item whose message is gone (deleted by hand, or set aside unreadable): into
        ``fail/`` (never deleted: the item is the user's)."""
        self.release(msg_id, name, "fail")


def outcome_names(msg: Any, encodeseq: str = "%") -> tuple[str, list[str]]:
    """The name a message's item gets in ``done/``/``fail/`` now (tries = its count), and every
    name an earlier try of it may have given it (tries from the item's own up to the count)."""
    _, item_id = message_item(msg)
    f = deconstruct(item_id, encodeseq)[1]
    try:
        taken = max(0, parse_tries(f[4]))
    except (IndexError, MalformedEntryError):
        raise ValueError(f"malformed fsq item id: {item_id}") from None
    return (outcome_name(item_id, msg.count, encodeseq),
            [outcome_name(item_id, t, encodeseq) for t in range(taken, max(taken, msg.count) + 1)])


class HeldCache:
    """:class:`Held` per fsq directory, kept open for the daemon's dispatch (no opens per
    message); one that fails is dropped and opened again once."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], Held] = {}
        self._lock = threading.Lock()

    def run(self, fsq_dir: str, queue: str, fn: Callable[[Held], Any]) -> Any:
        key = (fsq_dir, queue)
        for attempt in (0, 1):
            with self._lock:
                h = self._held.get(key)
                if h is None:
                    h = self._held[key] = Held(fsq_dir, queue)
            try:
                return fn(h)
            except OSError:
                if attempt:
                    raise
                self.forget(key)  # the directory may have been replaced: open it afresh
        raise AssertionError("unreachable")

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            h = self._held.pop(key, None)
        if h is not None:
            h.close()

    def close(self) -> None:
        for d in list(self._held):
            self.forget(d)


def _dev_ino(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def take_at(held: Held, name: str, *, ttl: int = 0, rejected: Rejected | None = None) -> WorkItem | None:
    """:func:`take` for the daemon, on ``held``'s directory fds (a ``queue/`` or ``fail/``
    swapped for a link after they were opened cannot lead out of the fsq directory). Tries
    are not checked here (the message's ``max_count`` is)."""
    return _take(held.conf, os.path.basename(held.fsq_dir), None, held.fds["queue"], held.fds["fail"], name,
                 lock=True, no_open=False, max_tries=0, ttl=ttl, rejected=rejected, base_fd=held.fds["top"])


def _lexists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
