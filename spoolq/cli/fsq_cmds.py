"""``spoolq fsq ...``: fsq's command-line tools (seed 003; spec A.7; docs/fsq.md).

The same subcommands and short flags as fsq 0.2.5's ``fsq`` (whose long options were
broken; here they work), on the same directories, with fsq's exit codes rather than
spoolq's: 0 success, 100 bad usage, 111 an expected or temporary error (a queue that is
down or missing, an item that cannot be written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from types import MethodType
from typing import TYPE_CHECKING, Any, NoReturn

from .. import fsq

if TYPE_CHECKING:
    from .main import Ctx

USAGE = 100
TEMPFAIL = 111


class _Usage(Exception):
    pass


def _error(self: argparse.ArgumentParser, message: str) -> NoReturn:
    self.print_usage(sys.stderr)
    sys.stderr.write(f"spoolq fsq: {message}\n")
    raise SystemExit(USAGE)


def register(sub: Any) -> None:
    fp = sub.add_parser("fsq", help="fsq's tools on fsq queue directories: install, enqueue, scan, ... (docs/fsq.md)",
                        description="fsq's commands on its directory standard (ROOT/QUEUE/{tmp,queue,done,fail}), "
                                    "interoperable with fsq's own tools. Exit codes: 0 success, 100 usage, "
                                    "111 expected or temporary error.")
    fp.error = MethodType(_error, fp)
    fp.add_argument("-r", "--root-dir", dest="fsq_root", default=None,
                    help="the root of the queues (env FSQ_ROOT; default /var/fsq)")
    fp.add_argument("-c", "--charset", dest="fsq_charset", default=None, help="env FSQ_CHARSET (utf8)")
    fp.add_argument("-q", "--queue-dir", dest="fsq_queue", default=None, help="env FSQ_QUEUE (queue)")
    fp.add_argument("-t", "--tmp-dir", dest="fsq_tmp", default=None, help="env FSQ_TMP (tmp)")
    fp.add_argument("-d", "--done-dir", dest="fsq_done", default=None, help="env FSQ_DONE (done)")
    fp.add_argument("-F", "--fail-dir", dest="fsq_fail", default=None, help="env FSQ_FAIL (fail)")
    fp.add_argument("-D", "--down-file", dest="fsq_down", default=None, help="env FSQ_DOWN (down)")
    fp.add_argument("-T", "--trigger-fifo", dest="fsq_trigger", default=None, help="env FSQ_TRIGGER (trigger-s)")
    fp.add_argument("-l", "--list", dest="fsq_list", action="store_true", help="list the subcommands")
    fp.set_defaults(func=_list_or_usage)
    fsub = fp.add_subparsers(dest="fsq_command", metavar="ACTION")
    verbs: list[tuple[str, str]] = []

    def cmd(name: str, handler: Any, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = fsub.add_parser(name, help=help, description=help)
        p.error = MethodType(_error, p)  # type: ignore[method-assign]
        p.set_defaults(func=_wrap(handler))
        p.add_argument("-v", "--verbose", action="store_true")
        verbs.append((name, help))
        return p

    def owner(p: argparse.ArgumentParser, user_flag: str = "-o") -> None:
        p.add_argument(user_flag, "--owner" if user_flag == "-o" else "--user", dest="user", default=None)
        p.add_argument("-g", "--group", default=None)
        p.add_argument("-m", "--mode", default=None, help="octal")

    p = cmd("install", fsq_install, "install queues: QUEUE/{tmp,queue,done,fail}, atomically")
    p.add_argument("-f", "--force", action="store_true", help="uninstall an existing queue first")
    p.add_argument("-i", "--ignore-exists", action="store_true", help="leave existing queues alone, exit 0")
    p.add_argument("-d", "--down", action="store_true", help="install it down")
    p.add_argument("-t", "--triggered", action="store_true", help="with a trigger FIFO")
    owner(p)
    p.add_argument("-a", "--add-host", dest="hosts", action="append", default=[], help="with this host queue")
    p.add_argument("queues", nargs="+", metavar="QUEUE")

    p = cmd("uninstall", fsq_uninstall, "remove queues and everything in them")
    p.add_argument("queues", nargs="+", metavar="QUEUE")

    p = cmd("down", fsq_down, "set queues down (scans stop before the next item)")
    owner(p, "-u")
    p.add_argument("queues", nargs="+", metavar="QUEUE")
    p = cmd("up", fsq_up, "set queues up")
    p.add_argument("queues", nargs="+", metavar="QUEUE")

    p = cmd("enqueue", fsq_enqueue, "add one item: its content from stdin, -f FILE or -e; ARGs in its name")
    owner(p, "-u")
    p.add_argument("-f", "--file", default=None, help="the item's content")
    p.add_argument("-e", "--empty", action="store_true", help="an empty item")
    p.add_argument("-t", "--trigger", action="store_true", help="then pull the queue's trigger")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("args", nargs="*", metavar="ARG")

    p = cmd("scan", fsq_scan, "run PROG ARGS... ITEM-ARGS... on each item, one at a time (stdin: the item)")
    _scan_flags(p)
    p.add_argument("-e", "--env", dest="no_env", action="store_false", default=False,
                   help="set FSQ_ITEM_* (default)")
    p.add_argument("-E", "--no-env", dest="no_env", action="store_true", help="do not set FSQ_ITEM_*")
    p.add_argument("-k", "--empty-ok", action="store_true", help="with no PROG, run each item's arguments")
    p.add_argument("-r", "--max-rate", "--rate", dest="rate", type=float, default=None,
                   help="at most N items per second")
    p.add_argument("-a", "--all-hosts", action="store_true", help="scan every host queue")
    p.add_argument("-A", "--host", dest="hosts", action="append", default=[], help="scan this host queue")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("prog", nargs=argparse.REMAINDER, metavar="PROG [ARGS...]")

    p = cmd("done", fsq_done, "mark an item done (or with -c CODE, as scan would for that exit status)")
    p.add_argument("-c", "--code", type=int, default=None)
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("ids", nargs="+", metavar="ITEM")
    p = cmd("fail", fsq_fail, "fail an item permanently (-T: temporarily, i.e. another try)")
    p.add_argument("-T", "--tmp", action="store_true")
    p.add_argument("-m", "--max-tries", type=int, default=None)
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("ids", nargs="+", metavar="ITEM")

    p = cmd("stat", fsq_stat, "items in queue/, done/, fail/ and tmp/, and whether the queue is down")
    p.add_argument("queues", nargs="*", metavar="QUEUE", help="default: every queue under the root")

    p = cmd("add-host", fsq_add_host, "install host queues QUEUE/hosts/HOST/{tmp,queue,done,fail}")
    p.add_argument("-f", "--force", action="store_true", help="reinstall an existing host queue")
    p.add_argument("-i", "--ignore-exists", action="store_true")
    owner(p)
    p.add_argument("host", metavar="HOST")
    p.add_argument("queues", nargs="+", metavar="QUEUE")
    p = cmd("rm-host", fsq_rm_host, "remove host queues")
    p.add_argument("-f", "--force", action="store_true", help="a missing host is fine")
    p.add_argument("host", metavar="HOST")
    p.add_argument("queues", nargs="+", metavar="QUEUE")
    p = cmd("down-host", fsq_down_host, "set host queues down")
    owner(p)
    p.add_argument("host", metavar="HOST")
    p.add_argument("queues", nargs="+", metavar="QUEUE")
    p = cmd("up-host", fsq_up_host, "set host queues up")
    p.add_argument("host", metavar="HOST")
    p.add_argument("queues", nargs="+", metavar="QUEUE")

    p = cmd("host-dist", fsq_host_dist, "copy each item (same id) into host queues, then mark it done")
    _scan_flags(p)
    p.add_argument("-I", "--link", action="store_true", help="hard-link instead of copying")
    p.add_argument("-g", "--trigger", action="store_true", help="then pull hosts-trigger-s")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("hosts", nargs="*", metavar="HOST", help="default: every host queue")
    fp.set_defaults(fsq_verbs=verbs)


def _scan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--no-open", action="store_true", help="do not open (nor lock) items")
    p.add_argument("-i", "--ignore-down", action="store_true", help="scan a queue that is down")
    p.add_argument("-l", "--lock", dest="lock", action="store_true", default=None, help="flock items (default)")
    p.add_argument("-L", "--no-lock", dest="lock", action="store_false", help="do not flock items")
    p.add_argument("-D", "--no-done", action="store_true", help="leave items where they are")
    p.add_argument("-t", "--ttl", type=int, default=None, help="fail items older than TTL seconds (0: never)")
    p.add_argument("-m", "--max-tries", type=int, default=None, help="tries before failing for good (0: no limit)")
    p.add_argument("-S", "--success-code", type=int, default=None)
    p.add_argument("-T", "--fail-tmp-code", type=int, default=None)
    p.add_argument("-F", "--fail-perm-code", type=int, default=None)


def _conf(args: argparse.Namespace) -> fsq.Conf:
    over = {k[4:]: v for k, v in vars(args).items()
            if k.startswith("fsq_") and k not in ("fsq_list", "fsq_command", "fsq_verbs") and v is not None}
    for src, dst in (("max_tries", "max_tries"), ("ttl", "ttl"), ("success_code", "success"),
                     ("fail_tmp_code", "fail_tmp"), ("fail_perm_code", "fail_perm")):
        if getattr(args, src, None) is not None:
            over[dst] = getattr(args, src)
    if getattr(args, "lock", None) is not None:
        over["lock"] = args.lock
    conf = fsq.Conf.from_env(**over)
    user, group, mode = getattr(args, "user", None), getattr(args, "group", None), getattr(args, "mode", None)
    if user or group or mode:
        try:
            m = None if mode is None else int(mode, 8)
        except ValueError:
            raise _Usage(f"not an octal mode: {mode}") from None
        if args.fsq_command in ("install", "add-host"):
            conf = conf.with_(queue_user=user, queue_group=group, queue_mode=m,
                              item_user=user, item_group=group)
        else:
            conf = conf.with_(item_user=user, item_group=group, item_mode=m)
    return conf


def _wrap(handler: Any) -> Any:
    def run(args: argparse.Namespace, ctx: Ctx) -> int:
        try:
            return int(handler(args, _conf(args)) or 0)
        except _Usage as e:
            print(f"spoolq fsq: {e}", file=sys.stderr)
            return USAGE
        except OSError as e:
            print(f"spoolq fsq: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
            return TEMPFAIL
    return run


def _list_or_usage(args: argparse.Namespace, ctx: Ctx) -> int:
    if args.fsq_list:
        for name, help in args.fsq_verbs:
            print(f"{name:10} {help}")
        return 0
    print("spoolq fsq: an ACTION is needed (try --list)", file=sys.stderr)
    return USAGE


def _say(args: argparse.Namespace, text: str) -> None:
    if args.verbose:
        print(text, file=sys.stderr)


def fsq_install(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        if os.path.isdir(os.path.join(conf.root, fsq.valid_name(q))):
            if args.ignore_exists:
                _say(args, f"{q}: exists; left alone")
                continue
            if args.force:
                fsq.uninstall(conf, q)
        fsq.install(conf, q, down=args.down, triggered=args.triggered, hosts=args.hosts,
                    host_triggered=args.triggered and bool(args.hosts))
        _say(args, f"installed {q}")
    return 0


def fsq_uninstall(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        fsq.uninstall(conf, q)
        _say(args, f"uninstalled {q}")
    return 0


def fsq_down(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        fsq.set_down(conf, q)
    return 0


def fsq_up(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        fsq.set_up(conf, q)
    return 0


def fsq_enqueue(args: argparse.Namespace, conf: fsq.Conf) -> int:
    if args.file and args.empty:
        raise _Usage("-f and -e do not go together")
    src: fsq.Source
    if args.empty:
        src = b""
    elif args.file:
        src = args.file
    else:
        if sys.stdin.isatty():
            print("spoolq fsq: work-item content was not set with --empty or --file. waiting on stdin...",
                  file=sys.stderr)
        src = sys.stdin.buffer
    item_id = fsq.enqueue(conf, args.queue, src, args.args)
    print(item_id)
    if args.trigger:
        fsq.trigger_pull(conf, args.queue)
    return 0


def fsq_scan(args: argparse.Namespace, conf: fsq.Conf) -> int:
    prog = list(args.prog)
    if prog and prog[0] == "--":
        prog = prog[1:]
    if not prog and not args.empty_ok:
        raise _Usage("scan needs a PROG (or -k to run each item's arguments)")
    targets: list[str | None] = [None]
    if args.all_hosts or args.hosts:
        targets = list(args.hosts) or list(fsq.hosts(conf, args.queue))
    gap = 1.0 / args.rate if args.rate else 0.0
    last = 0.0
    for host in targets:
        try:
            items = fsq.scan(conf, args.queue, host=host, ignore_down=args.ignore_down, no_open=args.no_open,
                             rejected=lambda name, e: print(f"spoolq fsq: {e}", file=sys.stderr))
            for item in items:
                with item:
                    if gap:
                        wait = last + gap - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                        last = time.monotonic()
                    rc = _run_one(args, conf, item, prog)
                    if rc is None:
                        return TEMPFAIL
        except fsq.DownError:
            print(f"spoolq fsq: {args.queue} is down", file=sys.stderr)
            return TEMPFAIL
    return 0


def _run_one(args: argparse.Namespace, conf: fsq.Conf, item: fsq.WorkItem, prog: list[str]) -> int | None:
    """Run the program for one item and move it by its exit status. ``None``: killed by a
    signal, which stops the scan (as fsq-scan does)."""
    _say(args, f"working on {item.id} ...")
    argv = [*prog, *item.arguments]
    env = None if args.no_env else {**os.environ, **item.environ()}
    if not argv:
        code = conf.fail_perm
        print(f"spoolq fsq: {item.id}: nothing to run (no PROG and no arguments)", file=sys.stderr)
    else:
        try:
            stdin = item.item if item.item is not None else None
            code = subprocess.run(argv, stdin=stdin, env=env, check=False).returncode
        except OSError as e:
            print(f"spoolq fsq: cannot exec {argv[0]}: {e.strerror}", file=sys.stderr)
            code = conf.fail_tmp
    if code < 0:
        if not args.no_done:
            item.fail_perm()
        print(f"spoolq fsq: {item.id}: failed permanently; processing terminated by signal {-code}; aborting",
              file=sys.stderr)
        return None
    if args.no_done:
        return code
    try:
        if code == conf.success:
            item.success()
            _say(args, f"{item.id}: succeeded")
        elif code == conf.fail_tmp:
            new_id = item.fail_tmp()
            print(f"spoolq fsq: {item.id}: failed temporarily (now {new_id})", file=sys.stderr)
        else:
            item.fail_perm()
            print(f"spoolq fsq: {item.id}: failed permanently (exit {code})", file=sys.stderr)
    except fsq.WorkItemError as e:
        print(f"spoolq fsq: {e}", file=sys.stderr)
    return code


def _take(conf: fsq.Conf, queue: str, item_id: str) -> fsq.WorkItem:
    fsq.Paths(conf, queue)  # validates
    problem: list[fsq.FsqError] = []
    item = fsq.take(conf, queue, item_id, max_tries=0, ttl=0, rejected=lambda n, e: problem.append(e))
    if problem:
        raise problem[0]
    if item is None:
        raise fsq.WorkItemError(2, f"no such item in queue {queue} (or another scanner holds it): {item_id}")
    return item


def fsq_done(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for item_id in args.ids:
        with _take(conf, args.queue, item_id) as item:
            item.done(args.code)
    return 0


def fsq_fail(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for item_id in args.ids:
        with _take(conf, args.queue, item_id) as item:
            if args.tmp:
                print(item.fail_tmp(max_tries=args.max_tries))
            else:
                item.fail_perm()
    return 0


def fsq_stat(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues or fsq.queues(conf):
        c = fsq.counts(conf, q)
        if not os.path.isdir(fsq.Paths(conf, q).sub("queue")):
            raise fsq.ConfigError(2, f"no such queue: {q}")
        down = " down" if fsq.is_down(conf, q) else ""
        print(f"{q} queue={c['queue']} done={c['done']} fail={c['fail']} tmp={c['tmp']}{down}")
    return 0


def fsq_add_host(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        if os.path.isdir(fsq.Paths(conf, q, args.host).base):
            if args.ignore_exists:
                continue
            if args.force:
                fsq.uninstall_host(conf, q, args.host)
        fsq.install_host(conf, q, args.host)
    return 0


def fsq_rm_host(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        try:
            fsq.uninstall_host(conf, q, args.host)
        except fsq.HostsError:
            if not args.force:
                raise
    return 0


def fsq_down_host(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        fsq.set_down(conf, q, args.host)
    return 0


def fsq_up_host(args: argparse.Namespace, conf: fsq.Conf) -> int:
    for q in args.queues:
        fsq.set_up(conf, q, args.host)
    return 0


def fsq_host_dist(args: argparse.Namespace, conf: fsq.Conf) -> int:
    try:
        ids = fsq.host_dist(conf, args.queue, args.hosts, link=args.link, mark_done=not args.no_done,
                            ignore_down=args.ignore_down,
                            no_open=args.no_open, rejected=lambda n, e: print(f"spoolq fsq: {e}", file=sys.stderr))
    except fsq.DownError:
        print(f"spoolq fsq: {args.queue} is down", file=sys.stderr)
        return TEMPFAIL
    for i in ids:
        _say(args, f"{i}: distributed")
    if args.trigger:
        fsq.trigger_pull(conf, args.queue, ignore_listener=True, host=True)
    return 0
