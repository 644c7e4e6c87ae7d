"""Queue commands: ``queue create|list|show|set|pause|resume|down|up|delete``, ``status``,
``stats``, ``ack-errs`` and ``sweep``.

JSON shapes are documented in docs/cli.md. Every queue name is validated before the spool
is opened, so a hostile name (``../x``) is refused with exit 2 and nothing on disk changes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput, SpoolqError
from ..model import COUNT_KEYS, QUEUE_KINDS, AdminState, QueueConfig
from ..store import SweepResult
from . import output
from .common import command, integer, json_or_text, key_value, number, queue_name, refs

if TYPE_CHECKING:
    from .main import Ctx

COUNT_HEADERS = [k.upper() if k != "err_acked" else "ACKED" for k in COUNT_KEYS]


def register(sub: Any) -> None:
    qp = sub.add_parser("queue", help="create, inspect, change and delete queues",
                        description="Create, inspect, change and delete queues.")
    qsub = qp.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    p = command(qsub, "create", queue_create, "create a queue whose messages are run by SCRIPT")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--script", metavar="PATH",
                   help="program run once per message (made absolute); required but for --kind http")
    p.add_argument("--workers", metavar="N", help="messages run at once (1-128, default 1)")
    p.add_argument("--exec-prefix", metavar="S", default="",
                   help="command line put before the script, e.g. 'nice -n 10'")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment variable for the script (repeatable)")
    p.add_argument("--timeout", metavar="S", help="kill a run after S seconds")
    p.add_argument("--max-count", metavar="N", help="default retry limit of messages (default 15)")
    p.add_argument("--coalesce", action="append", default=[], metavar="N",
                   help="coalesce queued messages equal in param N (1-4; repeatable)")
    p.add_argument("--blocking", action="append", default=[], metavar="N",
                   help="never run two messages equal in param N at once (1-4; repeatable)")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not fsync messages (faster; a crash may lose acknowledged ones)")
    p.add_argument("--kind", choices=QUEUE_KINDS, default="script",
                   help="script: SCRIPT runs once per message (default); worker: SCRIPT is a persistent "
                   "worker fed messages over a pipe (docs/workers.md); fsq: SCRIPT runs once per item of "
                   "the fsq queue directory --fsq-dir, with fsq's contract (docs/fsq.md); http: each message is an "
                   "HTTP request the daemon makes itself, no SCRIPT (docs/http-jobs.md)")
    p.add_argument("--fsq-dir", metavar="DIR", help="kind fsq: the fsq queue directory (ROOT/QUEUE) to serve")
    p.add_argument("--fsq-ttl", metavar="S", help="kind fsq: items older than S seconds fail untaken (0: never)")
    p.add_argument("--http-ok", action="append", default=[], metavar="CODE",
                   help="kind http: a status code that means done (repeatable; default any 2xx; "
                   "strings-queue took 200 only)")
    p.add_argument("--http-per-host", metavar="N", help="kind http: requests in flight to one host (default 4)")
    p.add_argument("--http-auth-user", metavar="USER",
                   help="kind http: basic auth user sent with every request (with --http-password-file)")
    p.add_argument("--http-password-file", metavar="FILE",
                   help="kind http: the file holding the basic auth password (read at each request)")
    p.add_argument("--http-allow", action="append", default=[], metavar="PREFIX",
                   help="kind http: only call URLs under this prefix (repeatable; default any)")
    p.add_argument("--inflight", metavar="N", help="kind worker: messages one worker holds at once (default 1)")
    p.add_argument("--restart-after", metavar="N",
                   help="kind worker: replace a worker after N messages (default 0: never)")

    command(qsub, "list", queue_list, "list queues with admin state, workers and script")

    p = command(qsub, "show", queue_show, "show a queue's config, admin state and counts")
    p.add_argument("name", metavar="NAME")

    p = command(qsub, "set", queue_set, "change config keys (values are parsed as JSON when they parse); "
                "keys: " + ", ".join(QueueConfig.__dataclass_fields__) + "; a script path is made absolute")
    p.add_argument("name", metavar="NAME")
    p.add_argument("changes", nargs="+", metavar="KEY=VALUE")

    for action, text in (("pause", "accept messages but run none (running ones finish)"),
                         ("resume", "undo pause: run messages again"),
                         ("down", "refuse new messages (sends fail with exit 5)"),
                         ("up", "undo down: accept messages again")):
        p = command(qsub, action, queue_admin, text)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(admin_action=action)

    p = command(qsub, "delete", queue_delete,
                "delete a queue (moved to ROOT/deleted/); refused while messages wait unless --force")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="delete even with messages in prep, que or run")

    p = command(sub, "status", status,
                "every queue's admin state and counts, and the daemon's processes; or one message's status")
    p.add_argument("msg", nargs="?", metavar="MSG", help="QUEUE/ID or full id: print its status text")

    p = command(sub, "stats", stats, "message counts per state (all queues when QUEUE is omitted)")
    p.add_argument("queue", nargs="?", metavar="QUEUE")
    p.add_argument("--recount", action="store_true",
                   help="recount from the messages on disk instead of the counts cache")

    p = command(sub, "ack-errs", ack_errs,
                "acknowledge every error of a queue (they stay in err, counted as err_acked)")
    p.add_argument("queue", metavar="QUEUE")

    p = command(sub, "sweep", sweep,
                "remove debris of dead producers and empty buckets; put back messages a crash left behind")
    p.add_argument("queue", nargs="?", metavar="QUEUE", help="the queue to sweep (default: every queue)")
    p.add_argument("--lost-found", metavar="PATH",
                   help="first put back the message directories e2fsck moved to PATH (the lost+found "
                        "of the spool's filesystem) after a power cut")


# -- queue ... ------------------------------------------------------------------------------
def _config_from_args(args: argparse.Namespace, name: str) -> QueueConfig:
    if not args.script and args.kind != "http":
        raise InvalidInput("--script must name the program to run per message")
    data: dict[str, Any] = {
        "name": name,
        "script": os.path.abspath(args.script) if args.script else "",
        "exec_prefix": args.exec_prefix,
        "env_vars": dict(key_value(e, "--env") for e in args.env),
        "coalesce_params": [integer(n, "--coalesce", 1, 4) for n in args.coalesce],
        "blocking_params": [integer(n, "--blocking", 1, 4) for n in args.blocking],
        "fsync": not args.no_fsync,
        "kind": args.kind,
    }
    if args.fsq_dir is not None:
        data["fsq_dir"] = os.path.abspath(args.fsq_dir)
    if args.fsq_ttl is not None:
        data["fsq_ttl"] = integer(args.fsq_ttl, "--fsq-ttl", 0, 10 * 365 * 86400)
    if args.http_ok:
        data["http_ok"] = [integer(c, "--http-ok", 100, 599) for c in args.http_ok]
    if args.http_per_host is not None:
        data["http_per_host"] = integer(args.http_per_host, "--http-per-host", 1, 128)
    if args.http_auth_user is not None or args.http_password_file is not None:
        if not (args.http_auth_user and args.http_password_file):
            raise InvalidInput("--http-auth-user and --http-password-file go together")
        data["http_auth"] = {"user": args.http_auth_user, "password_file": os.path.abspath(args.http_password_file)}
    if args.http_allow:
        data["http_allow"] = list(args.http_allow)
    if args.inflight is not None:
        data["worker_inflight"] = integer(args.inflight, "--inflight", 1, 1000)
    if args.restart_after is not None:
        data["worker_restart_after"] = integer(args.restart_after, "--restart-after", 0, 1_000_000_000)
    if args.workers is not None:
        data["num_workers"] = integer(args.workers, "--workers", 1, 128)
    if args.timeout is not None:
        data["timeout"] = number(args.timeout, "--timeout", 0.001, 10 * 365 * 86400.0)
    if args.max_count is not None:
        data["max_count"] = integer(args.max_count, "--max-count", 1, 1_000_000)
    return QueueConfig.from_dict(data)


def _queue_json(ctx: Ctx, name: str, *, counts: bool = True) -> dict[str, Any]:
    c = ctx.client
    status, admin, why = c.status_parts(name)
    d: dict[str, Any] = {"name": name, "admin_state": str(admin), "status": status,
                         "config": c.queue_config(name).to_dict()}
    if why is not None:
        d["script_error"] = why
    if counts:
        d["counts"] = c.counts(name)
    return d


def _warn_about_script(cfg: QueueConfig) -> None:
    if not os.path.isfile(cfg.script):
        print(f"spoolq: warning: script {cfg.script} does not exist (yet); "
              "messages will wait (SCRIPTERROR) until it does", file=sys.stderr)
    elif not cfg.exec_prefix and not os.access(cfg.script, os.X_OK):
        print(f"spoolq: warning: script {cfg.script} is not executable", file=sys.stderr)


def queue_create(args: argparse.Namespace, ctx: Ctx) -> int:
    # Validated in full before the spool is opened: bad input leaves no trace on disk.
    cfg = _config_from_args(args, queue_name(args.name))
    if cfg.kind != "http":
        _warn_about_script(cfg)
    ctx.client.create_queue(cfg)
    if ctx.json:
        ctx.emit_json(_queue_json(ctx, cfg.name))
    else:
        what = "HTTP jobs" if cfg.kind == "http" else f"script {output.clean(cfg.script)}"
        ctx.out(f"created queue {cfg.name} ({what}, {cfg.num_workers} worker{'s' if cfg.num_workers != 1 else ''})")
    return 0


def queue_list(args: argparse.Namespace, ctx: Ctx) -> int:
    rows: list[dict[str, Any]] = []
    for name in ctx.client.queues():
        try:
            cfg = ctx.client.queue_config(name)
            status, admin, _ = ctx.client.status_parts(name)
            rows.append({"name": name, "admin_state": str(admin), "status": status,
                         "num_workers": cfg.num_workers, "script": cfg.script})
        except SpoolqError as e:
            print(f"spoolq: {name}: {e}", file=sys.stderr)
            rows.append({"name": name, "admin_state": None, "num_workers": None, "script": None,
                         **output.error_json(e.code, str(e))})
    if ctx.json:
        ctx.emit_json({"queues": rows})
    elif rows:
        ctx.out(output.table(
            ["QUEUE", "STATE", "WORKERS", "SCRIPT"],
            [[r["name"], r.get("status") or "?", r["num_workers"] or "?", r["script"] or "?"]
             for r in rows], numeric=[2]))
    else:
        print(f"spoolq: no queues in {ctx.root} (create one with `spoolq queue create`)",
              file=sys.stderr)
    return 0


def queue_show(args: argparse.Namespace, ctx: Ctx) -> int:
    name = queue_name(args.name)
    d = _queue_json(ctx, name)
    if ctx.json:
        ctx.emit_json(d)
        return 0
    cfg = d["config"]
    ctx.out(output.key_values([
        ("queue", name),
        ("admin state", d["admin_state"]),
        *([("SCRIPTERROR", d["script_error"])] if "script_error" in d else []),
        ("script", cfg["script"]),
        ("exec prefix", cfg["exec_prefix"] or "-"),
        ("workers", cfg["num_workers"]),
        ("env", " ".join(f"{k}={v}" for k, v in cfg["env_vars"].items()) or "-"),
        ("timeout", f"{cfg['timeout']:g}s" if cfg["timeout"] else "none"),
        ("max count", cfg["max_count"]),
        ("coalesce", " ".join(f"param{n}" for n in cfg["coalesce_params"]) or "-"),
        ("blocking", " ".join(f"param{n}" for n in cfg["blocking_params"]) or "-"),
        ("retry", ", ".join(f"{k} {v:g}" for k, v in cfg["retry"].items())),
        ("fsync", "yes" if cfg["fsync"] else "no"),
    ]))
    ctx.out()
    ctx.out(output.table(COUNT_HEADERS, [[d["counts"].get(k, 0) for k in COUNT_KEYS]],
                         numeric=range(len(COUNT_KEYS))))
    return 0


def queue_set(args: argparse.Namespace, ctx: Ctx) -> int:
    name = queue_name(args.name)
    changes: dict[str, Any] = {}
    for item in args.changes:
        key, raw = key_value(item, "a change")
        if key == "name":
            raise InvalidInput("a queue cannot be renamed")
        changes[key] = json_or_text(raw)
        if key == "script" and isinstance(changes[key], str) and changes[key]:
            # As `queue create --script` does: a path typed here means one from here. (The
            # daemon would resolve a relative one against the spool root, RQ's rule.)
            changes[key] = os.path.abspath(changes[key])
    cfg = ctx.client.update_queue(name, **changes)
    if "script" in changes:
        _warn_about_script(cfg)
    if ctx.json:
        ctx.emit_json({"name": name, "config": cfg.to_dict(), "changed": sorted(changes)})
    else:
        new = cfg.to_dict()
        for key in sorted(changes):
            ctx.out(f"{name}: {key} = {output.clean(new.get(key))}")
    return 0


def queue_admin(args: argparse.Namespace, ctx: Ctx) -> int:
    """RQ's admin actions: pause and down set a flag; resume clears pause; up clears down."""
    name = queue_name(args.name)
    action: str = args.admin_action
    current = ctx.client.admin_state(name)
    target = ctx.client.admin_action(name, action)
    note = ""
    if action == "resume" and target == AdminState.DOWN:
        note = f" (down, not paused: `spoolq queue up {name}` to accept messages)"
    elif action == "up" and target == AdminState.PAUSE:
        note = f" (paused, not down: `spoolq queue resume {name}` to run messages)"
    if ctx.json:
        ctx.emit_json({"name": name, "admin_state": str(target), "previous": str(current)})
    else:
        ctx.out(f"{name}: {target}{note}")
    return 0


def queue_delete(args: argparse.Namespace, ctx: Ctx) -> int:
    name = queue_name(args.name)
    ctx.client.delete_queue(name, force=args.force)
    if ctx.json:
        ctx.emit_json({"name": name, "deleted": True})
    else:
        ctx.out(f"deleted queue {name}")
    return 0


# -- status, stats, ack-errs, sweep -----------------------------------------------------------
def _count_rows(ctx: Ctx, names: list[str], *, recount: bool = False,
                admin: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        row: dict[str, Any] = {"name": name}
        try:
            if admin:
                status_text, admin_state, why = ctx.client.status_parts(name)
                row["admin_state"] = str(admin_state)
                row["status"] = status_text  # SCRIPTERROR while the daemon cannot start the script
                if why is not None:
                    row["script_error"] = why
            row["counts"] = ctx.client.recount(name) if recount else ctx.client.counts(name)
        except SpoolqError as e:
            if len(names) == 1:
                raise
            print(f"spoolq: {name}: {e}", file=sys.stderr)
            row.setdefault("admin_state", None)
            row["counts"] = None
            row.update(output.error_json(e.code, str(e)))
        rows.append(row)
    return rows


def _count_table(rows: list[dict[str, Any]], *, admin: bool) -> str:
    headers = ["QUEUE", *(["STATUS"] if admin else []), *COUNT_HEADERS]
    first = 2 if admin else 1
    body = []
    for r in rows:
        counts = r["counts"] or {}
        body.append([r["name"], *([r.get("status") or r["admin_state"] or "?"] if admin else []),
                     *[counts.get(k, "?") for k in COUNT_KEYS]])
    return output.table(headers, body, numeric=range(first, first + len(COUNT_KEYS)))


def status(args: argparse.Namespace, ctx: Ctx) -> int:
    if args.msg is not None:
        (ref,) = refs([args.msg])
        view = ctx.client.get(ref)
        if ctx.json:
            ctx.emit_json({"queue": ref.queue, "msg_id": ref.msg_id,
                           "full_id": ctx.client.full_id(ref.queue, ref.msg_id),
                           "state": str(view.state), "status": view.status})
        else:
            ctx.out(output.clean(view.status))
        return 0
    rows = _count_rows(ctx, ctx.client.queues(), admin=True)
    daemon = ctx.client.dispatch_processes()
    if ctx.json:
        ctx.emit_json({"queues": rows, **({"daemon": daemon} if daemon is not None else {})})
        return 0
    if rows:
        ctx.out(_count_table(rows, admin=True))
    else:
        print(f"spoolq: no queues in {ctx.root} (create one with `spoolq queue create`)",
              file=sys.stderr)
    if daemon is not None:
        ctx.out(_daemon_text(daemon))
    return 0


def _daemon_text(daemon: dict[str, Any]) -> str:
    procs = daemon["processes"]
    if daemon["serving"] is None:
        return "daemon: unknown (its lock file, daemon.pid, cannot be opened by this user)"
    if not procs:
        return "daemon: none serving this spool"
    lines = []
    for p in procs:
        pid = p["pid"] if p["pid"] is not None else "?"
        who = "daemon" if p["index"] == 0 else f"dispatch helper {p['index']}"
        shares = f", shares {', '.join(p['shares'])}" if p["shares"] else ""
        lines.append(f"{who}: pid {pid}{shares}")
    if not daemon["serving"]:
        lines.insert(0, "daemon: none (helpers of a daemon that is gone still run)")
    return "\n".join(lines)


def stats(args: argparse.Namespace, ctx: Ctx) -> int:
    names = [queue_name(args.queue)] if args.queue is not None else ctx.client.queues()
    rows = _count_rows(ctx, names, recount=args.recount)
    if ctx.json:
        ctx.emit_json({"queues": rows})
    elif rows:
        ctx.out(_count_table(rows, admin=False))
    return 0


def ack_errs(args: argparse.Namespace, ctx: Ctx) -> int:
    name = queue_name(args.queue)
    n = ctx.client.ack_errs(name)
    if ctx.json:
        ctx.emit_json({"queue": name, "acked": n})
    else:
        ctx.out(f"acknowledged {n} error{'s' if n != 1 else ''} in {name}")
    return 0


def sweep(args: argparse.Namespace, ctx: Ctx) -> int:
    names = [queue_name(args.queue)] if args.queue else ctx.client.queues()
    total = SweepResult()
    if args.lost_found:
        found = ctx.client.recover_lost_found(args.lost_found)
        total.recovered += found.recovered
        total.problems += found.problems
    for name in names:
        r = ctx.client.sweep(name)
        for field in ("removed", "recovered", "problems"):
            getattr(total, field).extend(getattr(r, field))
    if ctx.json:
        ctx.emit_json({"queue": args.queue, "removed": total.removed, "recovered": total.recovered,
                       "problems": total.problems})
        return 0
    for path in total.removed:
        ctx.out(f"removed {output.clean(path)}")
    for line in total.recovered:
        ctx.out(f"recovered {output.clean(line)}")
    for line in total.problems:
        print(f"spoolq: left alone: {output.clean(line)}", file=sys.stderr)
    ctx.out(f"swept {args.queue or 'all queues'}: {len(total.removed)} removed, "
            f"{len(total.recovered)} recovered")
    return 0
