"""Message commands: ``send`` (one, or one per line of a file), ``attach``, ``commit``,
``show``, ``ls``, ``retry``, ``clone``, ``run-now`` and ``delete``.

A message is named by its full id (``http://host:port/q/QUEUE/ID``) or ``QUEUE/ID``.
Commands that take several messages parse every reference before acting on any, then act
on each in turn; failures are reported per message and the exit code is the first one's.
JSON shapes are documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import InvalidInput, SpoolqError, TooLarge, WrongState
from ..ids import MessageRef
from ..model import MAX_ENV_VALUE, Message, MessageView, State
from ..store import AttachmentSource
from . import exitcodes, output
from .common import command, integer, key_value, number, queue_name, refs, warn_if_unserved

if TYPE_CHECKING:
    from .main import Ctx

BATCH = 1000
"""Lines per group commit of ``send --from-file``: one fsync pass per batch."""


def register(sub: Any) -> None:
    p = command(sub, "send", send, "send a message (prints its full id), or one per line of a file")
    p.add_argument("queue", metavar="QUEUE")
    for i in range(1, 5):
        p.add_argument(f"--param{i}", metavar="V", help=f"RQ param{i}")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="a named parameter in the message's params object (repeatable)")
    p.add_argument("--attach", action="append", default=[], metavar="FILE",
                   help="attach a copy of a file (a reflink where the filesystem can; repeatable)")
    p.add_argument("--move", action="store_true",
                   help="hand the --attach files over: hard-link them into the message (copy them "
                        "from another filesystem) and remove them once the message is stored")
    p.add_argument("--due", metavar="EPOCH", help="run no earlier than this time (epoch seconds)")
    p.add_argument("--delay", metavar="SECS", help="run no earlier than SECS from now")
    p.add_argument("--src", metavar="S", default="", help="free-form source tag")
    p.add_argument("--max-count", metavar="N", help="retry limit (default: the queue's max_count)")
    p.add_argument("--dest", metavar="D", help="RQ dest field (informational; default QUEUE)")
    p.add_argument("--webhook", action="append", default=[], metavar="URL",
                   help="URL to POST the message's final state to when it finishes (repeatable), "
                        "through the local webhook queue, retried with backoff until a 2xx answer")
    p.add_argument("--prep", action="store_true",
                   help="leave the message in prep: add files with `attach`, then `commit`")
    p.add_argument("--from-file", metavar="FILE",
                   help="send one message per non-blank line of FILE ('-' for stdin), "
                        "the line in param1; prints the count")

    p = command(sub, "attach", attach, "attach a file to a message in prep")
    p.add_argument("msg", metavar="MSG")
    p.add_argument("file", metavar="FILE", help="the file, or '-' for stdin (needs --name)")
    p.add_argument("--name", metavar="N", help="attachment name (default: the file's basename)")
    p.add_argument("--move", action="store_true",
                   help="hand the file over: hard-link it (copy it from another filesystem) and "
                        "remove it once attached")

    p = command(sub, "commit", commit, "move a message from prep to que (idempotent)")
    p.add_argument("msg", metavar="MSG")

    p = command(sub, "show", show, "show a message (with --json: RQ's message JSON)")
    p.add_argument("msg", metavar="MSG")

    p = command(sub, "ls", ls, "list a queue's messages in one state, newest first")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("--state", default="que", metavar="S",
                   help="prep, que, run, done, relayed or err (default que)")
    p.add_argument("--limit", default="50", metavar="N", help="at most N messages (1-10000, default 50)")
    p.add_argument("--cursor", metavar="ID", help="continue after this id (the previous page's next_cursor)")
    p.add_argument("--filter", metavar="TEXT",
                   help="only messages with TEXT (any case) in their id, src, dest, orig_msg_id, "
                        "param1..param4, a params entry written key=value, or their status")

    p = command(sub, "retry", retry, "move failed messages (err) back to que, due now, count reset")
    p.add_argument("msgs", nargs="+", metavar="MSG")

    p = command(sub, "clone", clone, "send a copy of a finished message (done, relayed or err)")
    p.add_argument("msg", metavar="MSG")

    p = command(sub, "run-now", run_now, "move a queued message to the front (due 0)")
    p.add_argument("msg", metavar="MSG")

    p = command(sub, "delete", delete, "delete messages (any state but run)")
    p.add_argument("msgs", nargs="+", metavar="MSG")


# -- send ---------------------------------------------------------------------------------------
def _send_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword fields of Client.send from the command line; every value is checked here."""
    f: dict[str, Any] = {}
    for i in range(1, 5):
        v = getattr(args, f"param{i}")
        if v is not None:
            f[f"param{i}"] = v
    params: dict[str, str] = {}
    for item in args.param:
        k, v = key_value(item, "--param")
        params[k] = v
    if params:
        f["params"] = params
    if args.due is not None and args.delay is not None:
        raise InvalidInput("give --due or --delay, not both")
    if args.due is not None:
        f["due"] = number(args.due, "--due")
    if args.delay is not None:
        f["delay"] = number(args.delay, "--delay", 0.0, 100 * 365 * 86400.0)
    if args.src:
        f["src"] = args.src
    if args.max_count is not None:
        f["max_count"] = integer(args.max_count, "--max-count", 1, 1_000_000)
    if args.dest is not None:
        f["dest"] = args.dest
    if args.webhook:
        f["post_run_webhook"] = list(args.webhook)
    return f


def _receipt_json(ctx: Ctx, queue: str, msg_id: str, **extra: Any) -> dict[str, Any]:
    return {"queue": queue, "msg_id": msg_id, "full_id": ctx.client.full_id(queue, msg_id), **extra}


def send(args: argparse.Namespace, ctx: Ctx) -> int:
    queue = queue_name(args.queue)
    fields = _send_fields(args)
    if args.move and not args.attach:
        raise InvalidInput("--move hands over the --attach files: give at least one")
    if args.from_file is not None:
        return _send_lines(args, ctx, queue, fields)
    attachments = [os.path.abspath(a) for a in args.attach]
    client = ctx.client
    if args.prep:
        r = client.prep(queue, **fields)
        try:
            for path in attachments:
                client.attach(r, path, link=args.move)
        except BaseException:
            client.delete(r)  # a half-attached prep message is of no use to anyone
            raise
        state = "prep"
    else:
        r = client.send(queue, attachments=[AttachmentSource(path=a, link=args.move) for a in attachments],
                        **fields)
        state = "que"
    if args.move:
        _remove_moved(attachments)
    if state == "que":
        warn_if_unserved(ctx, "the message will wait")
    if ctx.json:
        ctx.emit_json(_receipt_json(ctx, queue, r.msg_id, state=state))
    else:
        ctx.out(r.full_id)
    return 0


def _remove_moved(paths: list[str]) -> None:
    """``--move``: the files are stored, so their old names go (as mv(1) would). A name that
    cannot be removed is only a warning: the message holds its own link or copy."""
    for p in paths:
        try:
            os.unlink(p)
        except OSError as e:
            print(f"spoolq: warning: attached, but could not remove {p}: {e.strerror}", file=sys.stderr)


def _open_input(path: str) -> tuple[BinaryIO, int | None]:
    """The byte stream to read and its size when known (for the progress bar)."""
    if path == "-":
        return sys.stdin.buffer, None
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror}") from None
    st = os.fstat(f.fileno())
    return f, st.st_size if stat.S_ISREG(st.st_mode) else None


def _lines(f: BinaryIO) -> Iterator[tuple[int, int, str]]:
    """(line number, bytes read so far, text) of every non-blank line; isq's one message a line.
    A line is read at most a param's size at a time: a 400 MB line took 822 MB of memory
    before it was refused (audit)."""
    offset = 0
    lineno = 0
    while raw := f.readline(MAX_ENV_VALUE + 2):  # the value, and its \r\n
        lineno += 1
        if len(raw) > MAX_ENV_VALUE + 1 and not raw.endswith(b"\n"):
            raise TooLarge(f"line {lineno} is over {MAX_ENV_VALUE} bytes: param1 reaches a script as an "
                           "environment variable, which Linux caps at 128 KiB")
        offset += len(raw)
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"line {lineno} is not valid UTF-8") from None
        yield lineno, offset, text


def _send_lines(args: argparse.Namespace, ctx: Ctx, queue: str, fields: dict[str, Any]) -> int:
    """Stream FILE in batches of :data:`BATCH`, each stored with one group commit.

    Each batch is all-or-nothing; batches before a failure stay sent, and the error says
    how many (a retry of the whole file would send those again: delivery is at-least-once).
    """
    if "param1" in fields or args.attach or args.prep:
        raise InvalidInput("--from-file puts each line in param1: it cannot be combined with "
                           "--param1, --attach or --prep")
    client = ctx.client
    if "delay" in fields:
        fields["due"] = time.time() + fields.pop("delay")
    fields.setdefault("max_count", client.queue_config(queue).max_count)  # also: does it exist?
    fields["dest"] = fields.get("dest") or queue
    fields["post_run_webhook"] = fields.get("post_run_webhook", [])
    template = Message.from_dict(fields)  # validate once; every line only changes param1
    f, size = _open_input(args.from_file)
    bar = output.Progress(f"sending to {queue}", size, unit=" msgs")
    ids: list[str] = []
    batch: list[Message] = []
    last_line = sent_upto = 0  # line numbers: last read, last in a stored batch

    def flush() -> None:
        nonlocal sent_upto
        ids.extend(r.msg_id for r in client.send_many(queue, batch))
        batch.clear()
        sent_upto = last_line

    try:
        for lineno, offset, text in _lines(f):
            last_line = lineno
            batch.append(dataclasses.replace(template, param1=text))
            if len(batch) >= BATCH:
                flush()
                bar.update(offset, len(ids))
        if batch:
            flush()
        bar.update(size or 0, len(ids))
    except SpoolqError as e:
        if ids:
            e.message = (f"{e.message} ({len(ids)} messages from lines 1-{sent_upto} were sent; "
                         f"nothing after line {sent_upto})")
        raise
    except KeyboardInterrupt:
        print(f"\nspoolq: interrupted; {len(ids)} messages were sent", file=sys.stderr)
        raise
    finally:
        bar.close()
        if f is not sys.stdin.buffer:
            f.close()
    if ids:
        warn_if_unserved(ctx, "the messages will wait")
    if ctx.json:
        ctx.emit_json({"queue": queue, "count": len(ids), "msg_ids": ids,
                       "full_ids": [client.full_id(queue, i) for i in ids]})
    else:
        ctx.out(str(len(ids)))
    return 0


# -- two-phase: attach, commit ------------------------------------------------------------------
def attach(args: argparse.Namespace, ctx: Ctx) -> int:
    (ref,) = refs([args.msg])
    if args.file == "-":
        if args.move:
            raise InvalidInput("--move hands over a file: stdin ('-') cannot be moved")
        if not args.name:
            raise InvalidInput("attaching stdin ('-') needs --name")
        info = ctx.client.attach(ref, name=args.name, stream=sys.stdin.buffer)
    else:
        info = ctx.client.attach(ref, args.file, name=args.name, link=args.move)
        if args.move:
            _remove_moved([args.file])
    full_id = ctx.client.full_id(ref.queue, ref.msg_id)
    if ctx.json:
        ctx.emit_json({"full_id": full_id, "name": info.name, **info.to_dict()})
    else:
        ctx.out(f"{info.md5}  {output.clean(info.name)}  {info.size} bytes  {full_id}")
    return 0


def commit(args: argparse.Namespace, ctx: Ctx) -> int:
    (ref,) = refs([args.msg])
    ctx.client.commit(ref)
    state = ctx.client.state(ref)
    if state == State.QUE:
        warn_if_unserved(ctx, "the message will wait")
    if ctx.json:
        ctx.emit_json(_receipt_json(ctx, ref.queue, ref.msg_id, state=str(state)))
    else:
        ctx.out(ctx.client.full_id(ref.queue, ref.msg_id))
    return 0


# -- reading ------------------------------------------------------------------------------------
def _params_summary(m: Message, width: int = 60) -> str:
    parts = [f"{getattr(m, f'param{i}')}" for i in range(1, 5) if getattr(m, f"param{i}")]
    parts += [f"{k}={v}" for k, v in m.params.items()]
    return output.clean(" | ".join(parts), width)


def show(args: argparse.Namespace, ctx: Ctx) -> int:
    (ref,) = refs([args.msg])
    if ctx.json:
        ctx.emit_json(ctx.client.message_json(ref))
        return 0
    view = ctx.client.get(ref)
    m = view.message
    pairs: list[tuple[str, Any]] = [
        ("id", ctx.client.full_id(ref.queue, ref.msg_id)),
        ("queue", view.queue),
        ("state", f"{view.state}{' (acknowledged)' if view.acked else ''}"),
        ("status", view.status),
        ("count", f"{m.count} of max {m.max_count}"),
        ("created", output.fmt_time(m.created_at)),
        ("due", output.fmt_time(m.due) if m.due else "now (front of the queue)"),
    ]
    for key in ("src", "dest", "param1", "param2", "param3", "param4", "orig_msg_id",
                "cloned_from", "dup"):
        if getattr(m, key):
            pairs.append((key, getattr(m, key)))
    if m.params:
        pairs.append(("params", json.dumps(m.params, ensure_ascii=False)))
    for hook in m.post_run_webhook:
        pairs.append(("webhook", hook))
    for d in m.dups:
        pairs.append(("absorbed", d))
    ctx.out(output.key_values(pairs))
    if view.attachments:
        ctx.out()
        ctx.out(output.table(["ATTACHMENT", "SIZE", "MD5"],
                             [[a.name, a.size, a.md5] for a in view.attachments.values()],
                             numeric=[1]))
    if m.history:
        ctx.out()
        ctx.out(output.table(["AT", "STATE", "NOTE"],
                             [[output.fmt_time(h.get("at")), h.get("state", ""), h.get("note", "")]
                              for h in m.history]))
    return 0


def _row(view: MessageView) -> list[Any]:
    m = view.message
    status = view.status + (" (acked)" if view.acked else "")
    return [view.msg_id, output.clean(status, 40), f"{m.count}/{m.max_count}",
            output.fmt_time(m.due), _params_summary(m)]


def ls(args: argparse.Namespace, ctx: Ctx) -> int:
    queue = queue_name(args.queue)
    limit = integer(args.limit, "--limit", 1, 10000)
    assert limit is not None
    page = ctx.client.list(queue, args.state, limit=limit, cursor=args.cursor, filter=args.filter)
    for problem in page.problems:
        print(f"spoolq: {problem}", file=sys.stderr)
    if ctx.json:
        ctx.emit_json({"items": [v.to_rq_json(ctx.client.full_id(queue, v.msg_id)) for v in page.items],
                       "next_cursor": page.next_cursor})
        return 0
    if page.items:
        ctx.out(output.table(["ID", "STATUS", "COUNT", "DUE", "PARAMS"],
                             [_row(v) for v in page.items]))
    else:
        print(f"spoolq: no messages in {queue}/{args.state}"
              f"{' matching ' + repr(args.filter) if args.filter else ''}", file=sys.stderr)
    if page.next_cursor:
        print(f"spoolq: more: spoolq ls {queue} --state {args.state} --limit {limit} "
              f"--cursor {page.next_cursor}", file=sys.stderr)
    return 0


# -- acting on messages -------------------------------------------------------------------------
def _each(ctx: Ctx, values: list[str], action: Callable[[MessageRef], None], verb: str) -> int:
    """Apply ``action`` to every message; report per message; exit with the first failure's code."""
    targets = refs(values)
    ok: list[str] = []
    failed: list[dict[str, Any]] = []
    code = 0
    for value, ref in zip(values, targets, strict=True):
        try:
            action(ref)
            ok.append(ctx.client.full_id(ref.queue, ref.msg_id))
        except SpoolqError as e:
            failed.append({"ref": value, **output.error_json(e.code, str(e))})
            print(f"spoolq: {output.clean(value)}: {e}", file=sys.stderr)
            code = code or exitcodes.exit_code_for(e)
    if ctx.json:
        result: dict[str, Any] = {"ok": ok, "failed": failed}
        if failed:
            result["error"] = failed[0]["error"]
        ctx.emit_json(result)
    else:
        for full_id in ok:
            ctx.out(f"{verb} {full_id}")
    return code


def retry(args: argparse.Namespace, ctx: Ctx) -> int:
    def one(ref: MessageRef) -> None:
        # Looked up first so a missing message is "not found" (exit 3), not "wrong state".
        state = ctx.client.state(ref)
        if state != State.ERR:
            raise WrongState(f"message {ref.msg_id} is in {state}: only failed messages (err) "
                             "can be retried")
        ctx.client.retry(ref)

    return _each(ctx, args.msgs, one, "retried")


def delete(args: argparse.Namespace, ctx: Ctx) -> int:
    return _each(ctx, args.msgs, ctx.client.delete, "deleted")


def clone(args: argparse.Namespace, ctx: Ctx) -> int:
    (ref,) = refs([args.msg])
    r = ctx.client.clone(ref)
    if ctx.json:
        ctx.emit_json(_receipt_json(ctx, r.queue, r.msg_id,
                                    cloned_from=ctx.client.full_id(ref.queue, ref.msg_id)))
    else:
        ctx.out(r.full_id)
    return 0


def run_now(args: argparse.Namespace, ctx: Ctx) -> int:
    (ref,) = refs([args.msg])
    ctx.client.run_now(ref)
    if ctx.json:
        ctx.emit_json(_receipt_json(ctx, ref.queue, ref.msg_id, due=0))
    else:
        ctx.out(ctx.client.full_id(ref.queue, ref.msg_id))
    return 0
