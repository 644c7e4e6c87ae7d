"""RQ's queue administration over HTTP (reference/rq-spec.md section 4): creating and
deleting queues with RQ's form fields, as RQ's own ``setup_test_queues.sh`` does with curl.

``POST /new_queue`` takes ``queue[name]``, ``queue[script]``, ``queue[num_workers]``,
``queue[exec_prefix]``, ``queue[coalesce_params][]``, ``queue[blocking_params][]`` and answers
RQ's way: 303 to the queue's page with a flash holding the queue manager's answer,
``["success","queue created - awesome"]`` or ``["fail","<reason>"]``. ``POST
/new_queue_link`` (brightroll's RQ; drudru's tests call it) reads the queue's config from a
JSON file on the server, ``queue[json_path]``, relative to the spool root. ``POST
/delete_queue`` (``queue_name``) deletes a queue and goes back to ``/``. ``POST
/q/<q>/adminoper`` (a field named ``pause``, ``resume``, ``down`` or ``up``) and ``POST
/q/<q>/ack_errs`` act on a queue and go ``back`` (a path on this server), RQ's flash saying
what was done; a refusal is RQ's plain-text 500 (404 for a missing queue).

Each of these changes what runs, so each needs the ``all`` access level (auth.py): a token,
a signed-in session (with the CSRF field, as the UI's own forms), or ``serve
--trust-loopback``, RQ's model (docs/security.md). A browser's cross-site post is refused
before any of this runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response

from ..errors import InvalidConfig, InvalidInput, InvalidName, QueueNotFound, SpoolqError
from ..ids import validate_queue_name
from ..store.base import LocalSpool
from .auth import CSRF_FIELD, check_csrf, principal
from .common import ctx_of, local_target
from .ui import queue_config_from_form, redirect
from .uploads import ParsedForm, form_of

router = APIRouter(include_in_schema=False)
CREATED = ["success", "queue created - awesome"]  # RQ's queue manager's words; RQ's tests grep them
MAX_CONFIG_FILE = 64 * 1024
RQ_FIELD = re.compile(r"^queue\[([a-z_]+)\](\[\])?$")
T = TypeVar("T")


def _answer(result: list[str]) -> str:
    return json.dumps(result)


def _check_session(request: Request, form: ParsedForm) -> None:
    """A signed-in browser's form needs the CSRF field too (a token or loopback trust does not)."""
    if principal(request) == "session":
        check_csrf(request, form.get(CSRF_FIELD))


def rq_form(form: ParsedForm) -> ParsedForm:
    """RQ's ``queue[x]`` and ``queue[x][]`` fields as the UI's form names them (``x``), empty
    list entries left out, for :func:`spoolq.http.ui.queue_config_from_form`."""
    fields: dict[str, list[str]] = {}
    for key, values in form.fields.items():
        m = RQ_FIELD.match(key)
        if m:
            fields.setdefault(m.group(1), []).extend(v for v in values if v.strip() or not m.group(2))
    return ParsedForm(fields=fields)


def _config_file(request: Request, raw: str) -> dict[str, Any]:
    """The JSON object in the file ``raw`` names (relative: to the spool root). Errors never
    quote the file: only what is wrong with it."""
    path = Path(raw)
    if not path.is_absolute():
        store = ctx_of(request).client.store
        if not isinstance(store, LocalSpool):
            raise InvalidConfig("queue[json_path] must be an absolute path on this store")
        path = store.root / path
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE + 1)
    except OSError as e:
        raise InvalidConfig(f"cannot read the config file {raw}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise InvalidConfig(f"the config file {raw} is over {MAX_CONFIG_FILE} bytes")
    try:
        cfg = json.loads(data)
    except ValueError:
        raise InvalidConfig(f"the config file {raw} is not JSON") from None
    if not isinstance(cfg, dict):
        raise InvalidConfig(f"the config file {raw} does not hold a JSON object")
    return cfg


async def _create(request: Request, name: str, make: Callable[[], dict[str, Any]]) -> Response:
    """Create the queue whose config ``make`` reads; RQ goes to the queue's page either way,
    the manager's answer in the flash (to ``/`` while the name is not known)."""
    try:
        cfg = await run_in_threadpool(make)
        name = str(cfg.get("name") or name)
        try:
            validate_queue_name(name)
        except InvalidName as e:
            # RQ's words, which its tests look for; no page to go to: the dashboard shows it.
            return redirect("/", _answer(["fail", f"queue name has invalid characters ({e.message})"]),
                            kind="error")
        await run_in_threadpool(ctx_of(request).client.create_queue, cfg)
    except SpoolqError as e:
        return redirect(f"/q/{quote(name, safe='')}" if name else "/", _answer(["fail", e.message]), kind="error")
    return redirect(f"/q/{quote(name, safe='')}", _answer(CREATED))


async def _form(request: Request, take: Callable[[ParsedForm], T]) -> T:
    """What ``take`` reads from the posted form (checked as :func:`_check_session` says)."""
    async with form_of(request, ctx_of(request).upload_dir) as form:
        _check_session(request, form)
        return take(form)


def _field(name: str) -> Callable[[ParsedForm], str]:
    return lambda form: (form.get(name) or "").strip()


@router.post("/new_queue")
async def new_queue(request: Request) -> Response:
    form = await _form(request, rq_form)
    return await _create(request, form.get("name") or "", lambda: queue_config_from_form(form))


@router.post("/new_queue_link")
async def new_queue_link(request: Request) -> Response:
    raw = await _form(request, _field("queue[json_path]"))
    return await _create(request, "", lambda: _config_file(request, raw))


@router.post("/delete_queue")
async def delete_queue(request: Request) -> Response:
    name = await _form(request, _field("queue_name"))
    try:
        await run_in_threadpool(ctx_of(request).client.delete_queue, name)
    except SpoolqError as e:
        return redirect("/", _answer(["fail", e.message]), kind="error")
    return redirect("/", _answer(["success", "queue deleted"]))


ADMIN_WORDS = ("pause", "resume", "down", "up")


async def _queue_action(request: Request, queue: str, verb: str, act: Callable[[], str],
                        back: str | None = None) -> Response:
    """RQ's queue buttons: run ``act`` (its text goes in the flash), then go ``back`` (the
    form's, if not given; a path on this server, else the queue's page). A missing queue is
    RQ's plain-text 404, any other refusal its ``500 - Couldn't <verb> queue. <why>.``"""
    if back is None:
        back = await _form(request, _field("back"))
    try:
        done = await run_in_threadpool(act)
    except QueueNotFound:
        return PlainTextResponse("404 - Queue not found", status_code=404)
    except SpoolqError as e:
        return PlainTextResponse(f"500 - Couldn't {verb} queue. {e.message}.", status_code=500)
    return redirect(local_target(back, f"/q/{quote(queue, safe='')}"), done)


ADMIN_WORDS = ("pause", "resume", "down", "up")


@router.post("/q/{queue}/adminoper")
async def adminoper(request: Request, queue: str) -> Response:
    action, back = await _form(request, lambda f: (next((w for w in ADMIN_WORDS if f.get(w) is not None), ""),
                                                   _field("back")(f)))

    def act() -> str:
        if not action:
            raise InvalidInput("no action: send one of pause, resume, down, up")
        ctx_of(request).client.admin_action(queue, action)
        return f"Successfully {action}d queue {queue}"

    return await _queue_action(request, queue, action, act, back)


@router.post("/q/{queue}/ack_errs")
async def ack_errs(request: Request, queue: str) -> Response:
    return await _queue_action(request, queue, "ack errs",
                               lambda: f"Successfully acknowledged errors ({ctx_of(request).client.ack_errs(queue)})")


@router.post("/q/{queue}/restart")
async def restart(request: Request, queue: str) -> Response:
    """RQ's "restart" of a queue's worker. spoolq has no worker per queue to restart; what it
    means here is RQ's use for it: a SCRIPTERROR queue whose script was fixed runs again now.
    The queue's config is written again unchanged, which makes the daemon read it and check
    the script at once (it checks every 5 s anyway)."""

    def act() -> str:
        ctx_of(request).client.update_queue(queue)
        return f"Successfully restarted queue {queue}"

    return await _queue_action(request, queue, "restart", act)
