"""``spoolq rq VERB --flags``: RQ's ``bin/rq`` (rq-spec 6.2, ``code/rq.rb``), verb for verb.

RQ's scripts and tests call ``./bin/rq sendmesg --dest q --param1=x`` and read its one-line
answers (``ok <full id>``, ``fail <reason>``), exit 0 exactly when the answer is ``ok``.
A two-line ``bin/rq`` that execs ``spoolq rq "$@"`` serves them. The arguments are parsed
as ``rq.rb`` parses them (``--k=v``, ``--k v``, a bare ``--flag``), the root comes from
``SPOOLQ_ROOT`` (or ``--root`` before ``rq``), and the store is used directly, as RQ's
command talks to its queue manager on the same host.

Where RQ crashed with a Ruby backtrace (a missing argument, a queue that does not exist,
relaying without ``--relay-ok``, a bare ``--force_remote``), this prints ``fail <reason>``
and exits 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import router
from ..builtin import RELAY_QUEUE, ensure_relay_queue
from ..errors import MessageNotFound, QueueDown, SpoolqError, WrongState
from ..model import AdminState, State

if TYPE_CHECKING:
    from ..client import Client
    from .main import Ctx

MESG_KEYS = ("dest", "src", "count", "max_count", "param1", "param2", "param3", "param4", "due", "force_remote")
_QUEUE_RE = re.compile(r"/q/([^/]+)")
_ID_RE = re.compile(r"/q/[^/]+/([^/]+)")


class RqFail(Exception):
    """A ``fail <reason>`` answer."""


def register(sub: Any) -> None:
    p = sub.add_parser("rq", help="RQ's bin/rq command: sendmesg, prepmesg, attachmesg, commitmesg, "
                                  "statusmesg, ... with RQ's flags and answers",
                       description="RQ's bin/rq, verb for verb: spoolq rq VERB --flag=value ... "
                                   "(run it without a verb for the list). Answers 'ok ...' (exit 0) or "
                                   "'fail <reason>' (exit 1), as RQ does.",
                       add_help=False)
    p.add_argument("words", nargs=argparse.REMAINDER, help="the verb and its --flags, as RQ takes them")
    p.set_defaults(func=rq_main)


def parse_args(words: list[str]) -> tuple[str, dict[str, Any]]:
    """``process_args`` of rq.rb: every word holding ``--`` is a flag; ``--k=v``; ``--k v``
    when the next word holds no ``--``; else ``--k`` alone is true."""
    cmd, rest = words[0], words[1:]
    args: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        w = rest[i]
        if "--" in w:
            if "=" in w:
                k, v = w.split("=", 1)
                args[k[2:]] = v
                i += 1
                continue
            if i + 1 < len(rest) and "--" not in rest[i + 1]:
                args[w[2:]] = rest[i + 1]
                i += 2
                continue
            args[w[2:]] = True
        i += 1
    return cmd, args


def rq_main(args: argparse.Namespace, ctx: Ctx) -> int:
    words = list(args.words)
    if not words or "-h" in words or "--help" in words:
        ctx.out("Valid commands are:")
        ctx.out("  " + "\n  ".join(sorted([*VERBS, "verify_rules"])))
        return 1
    cmd, flags = parse_args(words)
    if cmd == "verify_rules":  # needs no spool
        return verify_rules(flags, ctx)
    verb = VERBS.get(cmd)
    if verb is None:
        print(f"Command not found: {cmd} (cmd_{cmd})", file=sys.stderr)
        return 1
    try:
        lines = verb(ctx.client, flags)
    except RqFail as e:
        lines = [f"fail {e}"]
    except QueueDown:
        lines = ["fail status: DOWN"]
    except SpoolqError as e:
        lines = [f"fail {e}"]
    for line in lines:
        ctx.out(line)
    return 0 if lines[0].split(" ", 1)[0] == "ok" else 1


# -- the verbs ------------------------------------------------------------------------------
def _need(flags: dict[str, Any], key: str) -> str:
    v = flags.get(key)
    if v is None or v is True:
        raise RqFail(f"missing argument --{key}")
    return str(v)


def _dest_queue(client: Client, flags: dict[str, Any]) -> str:
    q = _need(flags, "dest")
    if q.startswith("http:"):
        if "relay-ok" not in flags:
            raise RqFail("cannot relay message (a dest on another host needs --relay-ok)")
        home = getattr(client.store, "root", None)  # the spool root; a database has none here
        if isinstance(home, Path):
            try:
                ensure_relay_queue(client.store, home)
            except OSError as e:
                raise RqFail(f"cannot create the relay queue: {e}") from None
        return RELAY_QUEUE
    return q


def _mesg(flags: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in MESG_KEYS:
        if k in flags:
            v = flags[k]
            out[k] = "1" if v is True else v  # a bare --force_remote: RQ crashed on it
    return out


def _up(client: Client, queue: str) -> str:
    """``queue``, unless it is DOWN: RQ's manager answers every message command of a DOWN
    queue with ``fail status: DOWN``."""
    if client.admin_state(queue) == AdminState.DOWN:
        raise QueueDown(f"queue {queue} is DOWN")
    return queue


def _ref(client: Client, flags: dict[str, Any]) -> str:
    """``queue/id`` from RQ's full id (``http://host:port/q/<queue>/<id>``), as rq.rb's
    regexes take them apart."""
    full = _need(flags, "msg_id")
    q, i = _QUEUE_RE.search(full), _ID_RE.search(full)
    if q is None or i is None:
        raise RqFail(f"not a full message id: {full}")
    return f"{_up(client, q.group(1))}/{i.group(1)}"


def _full(client: Client, ref: str) -> str:
    q, i = ref.split("/", 1)
    return client.full_id(q, i)


def sendmesg(client: Client, flags: dict[str, Any]) -> list[str]:
    return [f"ok {client.send_message(_dest_queue(client, flags), _mesg(flags)).full_id}"]


def prepmesg(client: Client, flags: dict[str, Any]) -> list[str]:
    return [f"ok {client.send_message(_dest_queue(client, flags), _mesg(flags), state=State.PREP).full_id}"]


def single_que(client: Client, flags: dict[str, Any]) -> list[str]:
    """A message only if the queue has none waiting; else the first waiting one's id."""
    queue = _up(client, _need(flags, "dest"))
    receipt, _ = client.single_que(queue, _mesg(flags))
    return [f"ok {receipt.full_id}"]


def attachmesg(client: Client, flags: dict[str, Any]) -> list[str]:
    ref = _ref(client, flags)
    path = os.path.abspath(os.path.expanduser(_need(flags, "pathname")))  # Ruby's File.expand_path
    if not os.path.exists(path):
        raise RqFail(f"No such file {path} to attach to message")
    if os.path.isdir(path):
        raise RqFail(f"Attachment currently cannot be a directory {path}")
    if not os.access(path, os.R_OK):
        raise RqFail(f"Attachment currently cannot be read: {path}")
    if not os.path.isfile(path):
        raise RqFail(f"Attachment currently not of supported type: {path}")
    name = flags.get("name")
    try:
        info = client.attach(ref, path, name=name if isinstance(name, str) else None,
                             link="local_fs_only" in flags)
    except (MessageNotFound, WrongState):
        raise RqFail("cannot find message") from None
    return [f"ok {info.md5}-Attached successfully for Message: {flags['msg_id']} attachment"]


def commitmesg(client: Client, flags: dict[str, Any]) -> list[str]:
    ref = _ref(client, flags)
    try:
        client.commit(ref)
    except WrongState:
        pass  # committed by an earlier try: ok again, so a retried commit is safe (RQ: fail)
    except MessageNotFound:
        raise RqFail("cannot find message") from None
    return ["ok msg commited"]  # sic: RQ's answer


def _get(client: Client, flags: dict[str, Any]) -> Any:
    try:
        return client.get(_ref(client, flags))
    except MessageNotFound:
        raise RqFail("msg not found") from None


def statusmesg(client: Client, flags: dict[str, Any]) -> list[str]:
    return [f"ok {_get(client, flags).status}"]


def state(client: Client, flags: dict[str, Any]) -> list[str]:
    return [f"ok {_get(client, flags).state}"]


def statuscountmesg(client: Client, flags: dict[str, Any]) -> list[str]:
    return [f"ok {_get(client, flags).message.count}"]


def attachstatusmesg(client: Client, flags: dict[str, Any]) -> list[str]:
    view = _get(client, flags)
    lines = [f"ok {len(view.attachments)}"]
    for name, a in sorted(view.attachments.items()):
        lines.append(f"{name} {a.md5} {a.size} {a.path}")
    return lines


def clone(client: Client, flags: dict[str, Any]) -> list[str]:
    try:
        return [f"ok {client.clone(_ref(client, flags)).full_id}"]
    except MessageNotFound:
        raise RqFail("msg not found") from None


def verify_rules(flags: dict[str, Any], ctx: Ctx) -> int:
    """``verify_rules --path FILE [--verbose]``: ``ok``, or ``fail bad router rules file``
    (with ``--verbose``, the rules read, or where the file is wrong)."""
    path = flags.get("path")
    if not isinstance(path, str) or not path:
        ctx.out("fail missing argument: --path")
        return 1
    verbose = bool(flags.get("verbose"))
    try:
        rules = router.load(os.path.expanduser(path))
    except router.RulesError as e:
        if verbose:
            ctx.out(str(e))
        ctx.out("fail bad router rules file")
        return 1
    if verbose:
        for line in rules.warnings:
            ctx.out(line)
        for rule in rules.rules:
            ctx.out(rule.describe())
    ctx.out("ok")
    return 0


VERBS: dict[str, Callable[[Client, dict[str, Any]], list[str]]] = {
    "sendmesg": sendmesg, "prepmesg": prepmesg, "single_que": single_que, "attachmesg": attachmesg,
    "commitmesg": commitmesg, "statusmesg": statusmesg, "state": state, "statuscountmesg": statuscountmesg,
    "attachstatusmesg": attachstatusmesg, "clone": clone,
}
