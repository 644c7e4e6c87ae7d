"""``spoolq serve`` (the daemon) and the commands that follow its work: ``wait``, ``log``, ``cancel``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .. import watch
from ..config import is_loopback
from ..errors import InvalidInput, WaitTimeout
from ..model import State
from . import exitcodes
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
    p.add_argument("--token", default=os.environ.get("SPOOLQ_TOKEN"),
                   help="bearer token the HTTP API requires (env SPOOLQ_TOKEN); required off loopback")
    p.add_argument("--sweep", type=float, default=300.0, metavar="S",
                   help="seconds between sweeps of staging debris and empty buckets (default 300)")
    # Obsolete: the daemon no longer rescans queues periodically. Accepted (and ignored, with
    # a warning) so that unit files written for older versions still start.
    p.add_argument("--rescan", type=float, default=None, help=argparse.SUPPRESS)
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

    p = command(sub, "cancel", cmd_cancel, "stop a queued or running message; it ends in err (cancelled)")
    p.add_argument("message", help="full id URL or QUEUE/ID")


def cmd_serve(args: argparse.Namespace, ctx: Any) -> int:
    from ..daemon.supervisor import Daemon

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s spoolq[%(process)d] %(levelname)s %(message)s")
    # Start-up, recovery and trouble always; every job's start and end with -v.
    logging.getLogger("spoolq").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if "://" in ctx.root and not ctx.root.startswith("file://"):
        raise InvalidInput("spoolq serve needs a spool directory (file store)")
    root = ctx.root.removeprefix("file://")
    os.makedirs(root, exist_ok=True)
    if args.rescan is not None:
        logging.getLogger("spoolq").warning("--rescan is obsolete and ignored: the daemon no longer "
                                            "rescans queues (see docs/operations.md)")
    d = Daemon(root, host=args.host, port=args.port, grace=args.grace, sweep_interval=args.sweep)
    if not args.no_http and not args.token and not is_loopback(d.rootcfg.host):
        raise InvalidInput(f"refusing to serve HTTP on {d.rootcfg.host} without a token: set --token or "
                           "SPOOLQ_TOKEN (or use --no-http)")
    d.setup()
    http: Any = None
    try:
        if not args.no_http:
            http = _start_http(ctx, d, args.token)
        d.loop()
    finally:
        if http is not None:
            try:
                http.stop()
            except Exception as e:  # noqa: BLE001 - shutting down: report and go on
                logging.getLogger("spoolq").warning("HTTP server did not stop cleanly: %s", e)
        d.close()
    return exitcodes.OK


def _start_http(ctx: Any, d: Any, token: str | None) -> Any:
    log = logging.getLogger("spoolq")
    try:
        from ..http.server import start_http  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        log.warning("HTTP API not available (%s); serving queues only", e)
        return None
    from ..client import open as open_client

    client = open_client(str(d.root))
    extra = d.runner.stats.render if d.runner is not None else None
    return start_http(client, d.rootcfg.host, d.rootcfg.port, token, extra_metrics=extra)


def _print_view(ctx: Any, view: Any, full_id: str) -> None:
    if ctx.json:
        ctx.emit_json(view.to_rq_json(full_id))
    else:
        ctx.out(view.status)


def _warn_if_waiting(ctx: Any, ref: Any) -> None:
    """For wait and log -f: warn when the message is not final and nothing will move it."""
    if not ctx.client.store.state_of(ref.queue, ref.msg_id).final:
        warn_if_unserved(ctx, "the message will not change state until one does")


def cmd_wait(args: argparse.Namespace, ctx: Any) -> int:
    client = ctx.client
    ref = client.ref(args.message)
    _warn_if_waiting(ctx, ref)
    try:
        view = client.wait(ref, args.timeout)
    except WaitTimeout as e:
        if ctx.json:
            ctx.emit_json({"error": {"code": e.code, "message": str(e)},
                           "state": str(client.store.state_of(ref.queue, ref.msg_id))})
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
        view = watch.follow_log(client.store, ref.queue, ref.msg_id, sys.stdout.buffer, follow=args.follow)
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
