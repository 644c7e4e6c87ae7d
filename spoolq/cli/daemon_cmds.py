"""``spoolq serve`` (the daemon) and the commands that follow its work: ``wait``, ``log``, ``cancel``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .. import credentials
from ..config import is_loopback
from ..credentials import AccessLevel
from ..errors import InvalidInput, Unavailable, WaitTimeout
from ..model import State
from ..parts import MAX_DISPATCHERS
from . import exitcodes, output
from .common import command, warn_if_unserved


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the daemon: dispatch queue scripts (and serve HTTP)",
                       description="Run the spoolq daemon for the spool root: start queue scripts as "
                                   "messages become due, recover after a crash, and serve the HTTP API.")
    p.add_argument("--host", default=None, help="host name/address in full ids and where HTTP listens "
                                                "(default: the root's config, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: the root's config, else 3333)")
    p.add_argument("--no-http", action="store_true", help="do not start the HTTP server")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds running jobs get to finish on SIGTERM before they are stopped and "
                        "requeued (default 30)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the HTTP token from FILE (mode 0600; env SPOOLQ_TOKEN_FILE). Default: "
                        "SPOOLQ_TOKEN, else ROOT/token, created at the first start. Whoever holds the "
                        "token can run commands as this user")
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: argv is visible in ps
    p.add_argument("--anonymous", default=os.environ.get("SPOOLQ_ANONYMOUS") or "rq",
                   choices=[str(a) for a in AccessLevel],
                   help="what requests without the token may do on a loopback server (env "
                        "SPOOLQ_ANONYMOUS): none; read (every GET); rq (default: read + RQ's message "
                        "routes, so RQ's HTTP clients work); all (everything). Off loopback: none")
    p.add_argument("--trust-loopback", action="store_true",
                   help="RQ's model: everything open on loopback without a token, queue creation and "
                        "config included (same as --anonymous all). Any local user or process can then run "
                        "commands as this user: use it only on a machine you alone use")
    p.add_argument("--secure-cookies", action="store_true",
                   help="mark the UI's session and CSRF cookies Secure, for a daemon reached through a TLS "
                        "reverse proxy (it sees plain HTTP and cannot tell): the browser then never sends them "
                        "over http")
    for name, what, doc in (
            ("notify", "serve the notifier on port P (docs/notifier.md): each line a client sends goes to every "
                       "other client; ':join events' gives spoolq's events as JSON lines", "the notifier's"),
            ("intake", "take messages as lines on port P (docs/intake.md): 'QUEUE MESSAGE' per line, e.g. echo "
                       "'mail alice@example.com' | nc 127.0.0.1 P; ':ack' asks for 'ok <full id>' per line",
             "the intake's")):
        p.add_argument(f"--{name}-port", type=int, default=None, metavar="P", help=what)
        p.add_argument(f"--{name}-host", default="127.0.0.1", metavar="ADDR",
                       help=f"{doc} address (default 127.0.0.1). Off loopback a client from another host must "
                            "send ':auth <token>' first")
    p.add_argument("--isq-spool", default=None, metavar="DIR",
                   help="take the lines of isq's spool files DIR/<queue>.queue as messages of <queue>, as "
                        "the queue has room (docs/isq.md); spoolq isq put and isq's own put append to them")
    p.add_argument("--no-builtin-queues", action="store_true",
                   help="do not make RQ's built-in queues (relay, webhook, cleaner, debug) at the root's "
                        "first start; they are still made when first needed")
    p.add_argument("--home", default=os.environ.get("SPOOLQ_HOME"), metavar="DIR",
                   help="this daemon's own directory: its token, sign-in codes, relative scripts and, "
                        "for a store that is not a directory (PostgreSQL), the scripts' working "
                        "directories (env SPOOLQ_HOME; default: the spool root; required for PostgreSQL)")
    p.add_argument("--sweep", type=float, default=300.0, metavar="S",
                   help="seconds between sweeps of staging debris and empty buckets (default 300)")
    # Obsolete: the daemon no longer rescans queues periodically. Accepted (and ignored, with
    # a warning) so that unit files written for older versions still start.
    p.add_argument("--rescan", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dispatchers", type=int, default=None, metavar="K",
                   help="processes that dispatch messages (env SPOOLQ_DISPATCHERS; default 1). With K > 1 "
                        "each queue of persistent workers with num_workers >= K and no blocking_params, "
                        "coalesce_params or cluster_workers is shared by message among K processes, "
                        "which takes more than one core (docs/workers.md); decided at start")
    p.add_argument("--dispatch-part", default=None, help=argparse.SUPPRESS)  # a helper: serve's own use
    p.add_argument("--dispatch-parent", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="log every job start and end")
    p.set_defaults(func=cmd_serve)

    p = command(sub, "wait", cmd_wait, "wait until a message is done, relayed or err")
    p.description = ("Block until the message reaches a final state. Exit status: 0 done or relayed, "
                     "9 err, 7 timeout.")
    p.add_argument("message", help="full id URL or QUEUE/ID")
    p.add_argument("--timeout", type=float, default=None, help="give up after S seconds (exit 7)")

    p = command(sub, "log", cmd_log, "print a message's job/stdio.log (-f: follow until it ends)")
    p.description = ("Print the message's job/stdio.log. With -f, keep printing until the message "
                     "reaches a final state; the exit status is then wait's: 0 done or relayed, 9 err.")
    p.add_argument("message", help="full id URL or QUEUE/ID")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new output until the message reaches a final state")

    p = sub.add_parser("login-url", help="print a one-time sign-in link for the running daemon's web UI",
                       description="Make a sign-in link to the web UI of the root's daemon. The code is "
                                   "written to ROOT/login/ (only the daemon's user can), not sent over "
                                   "the network. The link works once, within --ttl seconds.")
    p.add_argument("--ttl", type=float, default=600.0, help="seconds the link stays valid (default 600)")
    p.add_argument("--next", default="/", help="the page to open after signing in (default /)")
    p.set_defaults(func=cmd_login_url)

    p = command(sub, "cancel", cmd_cancel, "stop a queued or running message; it ends in err (cancelled)")
    p.add_argument("message", help="full id URL or QUEUE/ID")


def cmd_serve(args: argparse.Namespace, ctx: Any) -> int:
    from ..daemon.supervisor import Daemon
    from ..runner.spawn import reserve_low_fds
    from ..store import open_store
    from ..store.base import LocalWork

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s spoolq[%(process)d] %(levelname)s %(message)s")
    # Start-up, recovery and trouble always; every job's start and end with -v.
    logging.getLogger("spoolq").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.token is not None:
        raise InvalidInput("--token is not accepted: a command line is visible to every user in ps. "
                           "Put the token in a file (--token-file, mode 0600) or in SPOOLQ_TOKEN")
    try:
        anonymous = AccessLevel.ALL if args.trust_loopback else AccessLevel(args.anonymous)
    except ValueError:
        raise InvalidInput(f"--anonymous (or SPOOLQ_ANONYMOUS) is {args.anonymous!r}; it must be one of "
                           + ", ".join(a.value for a in AccessLevel)) from None
    directory = "://" not in ctx.root or ctx.root.startswith("file://")
    home = args.home or (ctx.root.removeprefix("file://") if directory else None)
    if home is None:
        raise InvalidInput("serving a store that is not a directory needs --home DIR (or SPOOLQ_HOME): "
                           "where this daemon keeps its token, sign-in codes and its scripts' working "
                           "directories")
    _own_directory(home, "the spool root" if directory and not args.home else "--home")
    if args.rescan is not None:
        logging.getLogger("spoolq").warning("--rescan is obsolete and ignored: the daemon no longer "
                                            "rescans queues (see docs/operations.md)")
    if args.dispatchers is None:
        env = os.environ.get("SPOOLQ_DISPATCHERS") or "1"
        try:
            args.dispatchers = int(env)
        except ValueError:
            raise InvalidInput(f"SPOOLQ_DISPATCHERS={env!r}: it must be a number (--dispatchers)") from None
    if not 1 <= args.dispatchers <= MAX_DISPATCHERS:
        raise InvalidInput(f"--dispatchers {args.dispatchers}: it must be between 1 and {MAX_DISPATCHERS}")
    if args.dispatchers > 1 and not directory:
        raise InvalidInput("--dispatchers needs a directory spool (a PostgreSQL store is shared by running "
                           "one spoolq serve per host)")
    if args.dispatch_part is not None:
        return _serve_helper(args, ctx, home)
    # fds 3 and 4 for spawning (the fast vfork path), claimed before the store opens anything:
    # a database store keeps connections open, and its sockets would take them.
    reserve_low_fds()
    store = open_store(ctx.root)
    if isinstance(store, LocalWork):
        store.local_dir = Path(home) / "work"
    helper_argv = [sys.executable, "-m", "spoolq", "--root", ctx.root, "serve", "--no-http", "--home", home,
                   "--grace", repr(args.grace), *(["-v"] if args.verbose else [])]
    d = Daemon(store, home=home, host=args.host, port=args.port, grace=args.grace, sweep_interval=args.sweep,
               builtin_queues=not args.no_builtin_queues, dispatchers=args.dispatchers, helper_argv=helper_argv)
    notifying, taking = args.notify_port is not None, args.intake_port is not None
    for flag, port in (("--notify-port", args.notify_port), ("--intake-port", args.intake_port)):
        if port is not None and not 0 <= port <= 65535:
            raise InvalidInput(f"{flag} {port} is not a port (0-65535)")
    # The line servers trust loopback as HTTP does: the intake sends messages (RQ's routes:
    # anonymous rq or all), the notifier is read and chat (anything but none).
    intake_trusts = anonymous in (AccessLevel.RQ, AccessLevel.ALL)
    notify_trusts = anonymous != AccessLevel.NONE
    need_token = (not args.no_http or (notifying and not (notify_trusts and is_loopback(args.notify_host)))
                  or (taking and not (intake_trusts and is_loopback(args.intake_host))))
    token = credentials.load_or_create(home, args.token_file) if need_token else None
    d.setup()
    http: Any = None
    lines: list[Any] = []  # the notifier and the intake: line servers on their own threads
    try:
        secret = None if token is None else token.value
        if notifying:
            from ..daemon.notifier import Notifier

            lines.append(Notifier(args.notify_host, args.notify_port, token=secret, bus=d.events,
                                  trust_loopback=notify_trusts))
        if taking:
            from ..client import Client
            from ..daemon.intake import Intake

            lines.append(Intake(args.intake_host, args.intake_port, token=secret,
                                client=Client(open_store(ctx.root), root_config=d.rootcfg),
                                trust_loopback=intake_trusts))
        if args.isq_spool:
            from ..client import Client
            from ..daemon.isqspool import IsqSpool

            lines.append(IsqSpool(Path(args.isq_spool), Path(home), client=Client(open_store(ctx.root)),
                                  bus=d.events))
        from ..client import Client
        from ..daemon.fsqintake import FsqIntake

        # Queues of kind fsq: served whenever one exists (docs/fsq.md).
        lines.append(FsqIntake(Path(home), client=Client(open_store(ctx.root)), bus=d.events))
        for srv in lines:
            try:
                srv.start()
            except OSError as e:
                where = f"use {srv.spool}" if hasattr(srv, "spool") else f"listen on {srv.host}:{srv.port}"
                raise Unavailable(f"the {srv.name} cannot {where}: {e.strerror or e}") from None
        if not args.no_http:
            assert token is not None
            if anonymous == AccessLevel.ALL and is_loopback(d.rootcfg.host):
                logging.getLogger("spoolq").warning(
                    "--trust-loopback: anyone on this machine can create queues and change what they "
                    "run over HTTP, i.e. run commands as this user")
            http = _start_http(ctx, d, token.value, anonymous, secure_cookies=args.secure_cookies)
        d.loop()
    finally:
        for srv in lines:
            if getattr(srv, "srv", True) is not None:
                srv.stop()
        if http is not None:
            try:
                http.stop()
            except Exception as e:  # noqa: BLE001 - shutting down: report and go on
                logging.getLogger("spoolq").warning("HTTP server did not stop cleanly: %s", e)
        d.close()
    return exitcodes.OK


def _serve_helper(args: argparse.Namespace, ctx: Any, home: str) -> int:
    """``serve --dispatch-part``: a dispatch helper the main ``serve --dispatchers`` started
    (daemon/helpers.py). It dispatches its part of the shared queues and nothing else: no
    HTTP, no line servers, no built-in queues, timers or sweeps; it dies with its parent."""
    from ..daemon.helpers import ForwardingBus, die_with_parent
    from ..daemon.supervisor import Daemon
    from ..parts import Part
    from ..runner.spawn import reserve_low_fds
    from ..store import open_store

    if args.dispatch_parent is None:
        raise InvalidInput("--dispatch-part is serve's own (it starts its helpers): use --dispatchers")
    try:
        part = Part.parse(args.dispatch_part)
    except ValueError as e:
        raise InvalidInput(f"--dispatch-part {args.dispatch_part!r}: {e}") from None
    die_with_parent(args.dispatch_parent)
    reserve_low_fds()  # as serve does, before the store opens anything
    d = Daemon(open_store(ctx.root), home=home, grace=args.grace, builtin_queues=False, part=part,
               events=ForwardingBus(sys.stdout.fileno()))
    d.run()
    return exitcodes.OK


def _own_directory(path: str, what: str) -> None:
    """Create ``path`` if needed; Unavailable unless this user can write it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"cannot create {what} {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise Unavailable(f"{what} {path} is not writable by this user (uid {os.geteuid()}); "
                          "give it to this user, or choose another")


SERVE_LINK_TTL = 24 * 3600.0
"""The sign-in link ``serve`` prints at start stays valid this long, and for one use."""


def _start_http(ctx: Any, d: Any, token: str, anonymous: AccessLevel, *, secure_cookies: bool = False) -> Any:
    from ..client import Client
    from ..http.server import start_http
    from ..store import open_store

    directory = "://" not in ctx.root or ctx.root.startswith("file://")
    # Full ids this server answers name this host, whichever host the store's shared root
    # config names (several daemons share a PostgreSQL store).
    client = Client(open_store(str(d.home) if directory else ctx.root), root_config=d.rootcfg)
    extra = d.metrics_text if d.runner is not None else None
    http = start_http(client, d.rootcfg.host, d.rootcfg.port, token, extra_metrics=extra, anonymous=anonymous,
                      login_root=str(d.home), events=d.events, secure_cookies=secure_cookies)
    code = http.app.state.auth.links.mint(SERVE_LINK_TTL)
    # Like Jupyter: the way into the UI, printed once. The link works once, for a day.
    url = d.rootcfg.local_url
    print(f"spoolq: web UI at {url}/ ; sign in once with {url}/login?code={code} "
          "(spoolq login-url makes another)", file=sys.stderr, flush=True)
    return http


def cmd_login_url(args: argparse.Namespace, ctx: Any) -> int:
    from ..config import read_root_config

    root = ctx.root.removeprefix("file://")
    if "://" in root:
        raise InvalidInput("spoolq login-url needs the daemon's spool directory (file store)")
    if not 0 < args.ttl <= 7 * 86400:
        raise InvalidInput("--ttl must be between 0 and 604800 seconds (a week)")
    if not os.path.isdir(root):
        raise Unavailable(f"no spool root at {root}; start the daemon with spoolq serve")
    # Made on disk, where only the token's owner can write: the token goes over no socket,
    # so whatever listens on the daemon's port while it is down learns nothing.
    try:
        code = credentials.mint_login_code(root, args.ttl)
    except PermissionError as e:
        raise Unavailable(f"cannot write {credentials.login_dir(root)}: {e.strerror}; run as the daemon's "
                          "user") from None
    nxt = args.next if args.next.startswith("/") and not args.next.startswith("//") else "/"
    link = f"{read_root_config(root).local_url}/login?" + urlencode({"code": code, "next": nxt})
    if ctx.json:
        ctx.emit_json({"url": link, "expires_in": args.ttl})
    else:
        ctx.out(link)
    return exitcodes.OK


def _print_view(ctx: Any, view: Any, full_id: str) -> None:
    if ctx.json:
        ctx.emit_json(view.to_rq_json(full_id))
    else:
        ctx.out(view.status)


def _warn_if_waiting(ctx: Any, ref: Any) -> None:
    """For wait and log -f: warn when the message is not final and nothing will move it."""
    if not ctx.client.state(ref).final:
        warn_if_unserved(ctx, "the message will not change state until one does")


def cmd_wait(args: argparse.Namespace, ctx: Any) -> int:
    client = ctx.client
    ref = client.ref(args.message)
    _warn_if_waiting(ctx, ref)
    try:
        view = client.wait(ref, args.timeout)
    except WaitTimeout as e:
        if ctx.json:
            ctx.emit_json({**output.error_json(e.code, str(e)),
                           "state": str(client.state(ref))})
        print(f"spoolq: {e}", file=sys.stderr)
        return exitcodes.TIMEOUT
    _print_view(ctx, view, client.full_id(ref.queue, ref.msg_id))
    return exitcodes.MESSAGE_FAILED if view.state == State.ERR else exitcodes.OK


def cmd_log(args: argparse.Namespace, ctx: Any) -> int:
    client = ctx.client
    ref = client.ref(args.message)
    if args.follow:
        _warn_if_waiting(ctx, ref)
    try:
        view = client.follow_log(ref, sys.stdout.buffer, follow=args.follow)
    except KeyboardInterrupt:
        return exitcodes.OK
    if args.follow and view.state == State.ERR:
        return exitcodes.MESSAGE_FAILED  # as wait: followed to the end, and it failed
    return exitcodes.OK


def cmd_cancel(args: argparse.Namespace, ctx: Any) -> int:
    client = ctx.client
    what = client.cancel(args.message)
    if ctx.json:
        ctx.emit_json({"ok": True, "result": what})
    else:
        ctx.out(what)
    return exitcodes.OK
