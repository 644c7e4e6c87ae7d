"""RQ's HTTP routes, exactly as RQ's clients call them (reference/rq-spec.md section 4).

Answers keep RQ's formats: ``["ok", ...]`` / ``["fail", reason]`` for actions, plain-text
``"404 - ..."`` pages for missing things, 503 for a DOWN queue. Statuses still come from
:func:`spoolq.http.errors.status_for`. None of these routes is in the OpenAPI document:
the JSON API under /api/v1 is the documented interface; these exist so RQ tools work unchanged.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from ..builtin import RELAY_QUEUE, ROUTER_QUEUE, ensure_router_queue, router_rules
from ..errors import (
    InvalidInput,
    InvalidName,
    MessageNotFound,
    NotFound,
    QueueDown,
    QueueNotFound,
    SpoolqError,
    WrongState,
)
from ..ids import MessageRef, log_name_ok
from ..model import State
from .actions import act
from .common import AppContext, attachment_response, ctx_of, file_response, local_target, open_log
from .errors import status_for
from .ui import render
from .uploads import ParsedForm, form_of

router = APIRouter(include_in_schema=False)
TEXT_404_QUEUE = "404 - Queue not found"
TEXT_404_MSG = "404 - Message ID not found"
TEXT_503_DOWN = "503 - Service Unavailable - Operationally Down"
MESG_FIELD_RE = re.compile(r"^mesg\[([A-Za-z0-9_]+)\](\[\])?$")


def _text(status: int, text: str) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status)


def _fail(e: SpoolqError, text: str | None = None) -> JSONResponse:
    return JSONResponse(["fail", text or e.message], status_code=status_for(e))


def _lookup_error(e: SpoolqError, *, queue_only: bool = False) -> Response:
    """RQ answers a missing or malformed queue or id with a plain-text 404 (``queue_only``:
    no message was named, so a bad name is a bad queue name)."""
    if isinstance(e, QueueNotFound) or (queue_only and isinstance(e, InvalidName)):
        return _text(404, TEXT_404_QUEUE)
    if isinstance(e, (InvalidName, MessageNotFound)):
        return _text(404, TEXT_404_MSG)
    if isinstance(e, NotFound):
        return _text(404, f"404 - {e.message}")
    return _text(status_for(e), f"{status_for(e)} - {e.message}")


def _queue_or_error(ctx: AppContext, queue: str) -> Response | None:
    try:
        ctx.client.queue_config(queue)
    except SpoolqError as e:
        return _lookup_error(e)
    return None


# -- service-wide --------------------------------------------------------------------------
@router.get("/q.json")
def queues_json(request: Request) -> list[str]:
    return ctx_of(request).client.queues()


@router.get("/q.txt", response_class=PlainTextResponse)
def queues_txt(request: Request) -> str:
    return "".join(f"q/{n}.txt\n" for n in ctx_of(request).client.queues())


# -- one queue --------------------------------------------------------------------------
def _queue_stats(ctx: AppContext, queue: str) -> tuple[str, int, dict[str, int]]:
    status = ctx.client.queue_status(queue)
    counts = ctx.client.counts(queue)
    return status, int(time.time() - ctx.started), counts


@router.get("/q/{queue}.json")
def queue_json(request: Request, queue: str) -> Response:
    ctx = ctx_of(request)
    try:
        status, uptime, c = _queue_stats(ctx, queue)
    except SpoolqError as e:
        return _lookup_error(e, queue_only=True)
    body: dict[str, Any] = {"status": status, "uptime": uptime}
    for st in ("prep", "que", "run", "done", "err", "relayed"):
        body[f"{st}_size"] = c.get(st, 0)
    return JSONResponse(body)


@router.get("/q/{queue}.txt")
def queue_txt(request: Request, queue: str) -> Response:
    ctx = ctx_of(request)
    try:
        status, uptime, c = _queue_stats(ctx, queue)
    except SpoolqError as e:
        return _lookup_error(e, queue_only=True)
    if status == "DOWN":
        return PlainTextResponse("status: DOWN\n")
    lines = [f"status: {status}", f"uptime: {uptime}"]
    lines += [f"{st}: {c.get(st, 0)}" for st in ("prep", "que", "run", "done", "err", "relayed")]
    return PlainTextResponse("\n".join(lines) + "\n")


@router.get("/q/{queue}/done.json")
def done_json(request: Request, queue: str, limit: str = "10") -> Response:
    ctx = ctx_of(request)
    n = min(ruby_to_i(limit), DONE_JSON_MAX)  # RQ: params['limit'].to_i
    try:
        page = ctx.client.list(queue, State.DONE, limit=max(n, 1))
    except SpoolqError as e:
        return _lookup_error(e)
    return JSONResponse([v.msg_id for v in page.items] if n > 0 else [])


DONE_JSON_MAX = 10000


def ruby_to_i(text: str) -> int:
    """Ruby's ``String#to_i``: the integer at the start (after blanks, with a sign), else 0;
    ``"12abc"`` is 12 and ``"abc"`` 0. Digits are ASCII only (``"²".isdigit()`` is true)."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    return int(m.group(1)[:12]) if m else 0


@router.get("/q/{queue}/config.json")
def config_json(request: Request, queue: str) -> Response:
    try:
        return JSONResponse(ctx_of(request).client.queue_config(queue).to_dict())
    except SpoolqError:
        return _text(404, f"404 - Queue config for '{queue}' not found")


@router.get("/q/{queue}/config")
def config_live(request: Request, queue: str) -> Response:
    return config_json(request, queue)


# -- new messages ----------------------------------------------------------------------------
def _mesg_from_form(form: ParsedForm, x_format: str) -> dict[str, Any]:
    if x_format == "html":
        mesg: dict[str, Any] = {}
        for k, v in form.items():
            m = MESG_FIELD_RE.match(k)
            if m:
                have = mesg.get(m.group(1))
                if have is not None and isinstance(have, list) != bool(m.group(2)):
                    # Rack's answer too: one field cannot be both a value and a list.
                    raise InvalidInput(f"form field mesg[{m.group(1)}] is given both as a value and as a list")
                if m.group(2):
                    mesg.setdefault(m.group(1), []).append(v)
                else:
                    mesg[m.group(1)] = v
        return mesg
    raw = form.get("mesg")
    if raw is None:
        raise InvalidInput("missing required form field mesg (the message as JSON)")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidInput(f"mesg is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput("mesg must be a JSON object")
    return data


RELAY_KEY_HEADER = "x-spoolq-relay-key"
REUSED_HEADER = "X-Spoolq-Reused"


def _store_new(ctx: AppContext, queue: str, mesg: dict[str, Any], relay_key: str | None = None) -> tuple[str, bool]:
    """Create the message per RQ's ``_method``; returns the full id, and whether it is a
    message made before for the same relay key (a prep from a relay that tries again)."""
    method = mesg.pop("_method", None) or "commit"
    client = ctx.client
    if method == "single_que":
        return client.single_que(queue, mesg)[0].full_id, False
    state = State.PREP if method == "prep" else State.QUE
    if relay_key is not None and state == State.PREP:
        r, reused = client.prep_relayed(queue, mesg, relay_key)
        return r.full_id, reused
    return client.send_message(queue, mesg, state=state).full_id, False


def _relay_key(request: Request) -> str | None:
    """The relay's key header (docs/relay.md): printable ASCII, at most 1,024 bytes."""
    key = request.headers.get(RELAY_KEY_HEADER)
    if key is None:
        return None
    if not key or len(key) > 1024 or not key.isascii() or not key.isprintable():
        raise InvalidInput(f"{RELAY_KEY_HEADER} must be 1-1024 printable ASCII characters")
    return key


def routed(ctx: AppContext, queue: str) -> str:
    """RQ's ``get_queueclient``: on a root with router rules (``config/rq_router_rules.rb``),
    new messages for any queue but ``relay`` and ``cleaner`` go to ``rq_router``, which
    routes them by the rules (made here if the rules came after the daemon's start)."""
    if ctx.home is None or queue in (RELAY_QUEUE, "cleaner", ROUTER_QUEUE):
        return queue
    if not router_rules(ctx.home).exists():
        return queue
    ensure_router_queue(ctx.client.store, ctx.home)
    return ROUTER_QUEUE


@router.post("/q/{queue}/new_message")
async def new_message(request: Request, queue: str) -> Response:
    ctx = ctx_of(request)
    queue = await run_in_threadpool(routed, ctx, queue)
    missing = await run_in_threadpool(_queue_or_error, ctx, queue)
    if missing is not None:
        return missing
    if await run_in_threadpool(lambda: str(ctx.client.admin_state(queue))) == "DOWN":
        return _text(503, TEXT_503_DOWN)
    x_format = "json"
    back: str | None = None
    try:
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                mesg = json.loads(await request.body())
            except ValueError as e:
                raise InvalidInput(f"body is not valid JSON: {e}") from None
            if not isinstance(mesg, dict):
                raise InvalidInput("the message must be a JSON object")
        else:
            async with form_of(request, ctx.upload_dir) as form:
                x_format = form.get("x_format") or "json"
                mesg = _mesg_from_form(form, x_format)
                back = form.get("back")
        if mesg.get("_method", "commit") not in ("commit", "prep", "single_que", "", None):
            return _text(400, "400 - Invalid method param")
        full_id, reused = await run_in_threadpool(_store_new, ctx, queue, mesg, _relay_key(request))
    except QueueDown:
        return _text(503, TEXT_503_DOWN)
    except SpoolqError as e:
        if x_format == "html" and not back:
            return render(request, "new_message_post.html", status_for(e), title="New Message Result", q=queue,
                          ok=False, word="fail", text=e.message)
        return _fail(e)
    if x_format == "html":
        msg_id = full_id.rsplit("/", 1)[1]
        if not back:  # RQ renders its result page; with "back" it redirects there
            return render(request, "new_message_post.html", title="New Message Result", q=queue, ok=True,
                          msg_id=msg_id, full_id=full_id)
        return RedirectResponse(local_target(back, f"/q/{queue}/{msg_id}"), status_code=303)
    return JSONResponse(["ok", full_id], headers={REUSED_HEADER: "1"} if reused else None)


# -- one message ----------------------------------------------------------------------------
@router.get("/q/{queue}/{msg_id}.json")
def message_json(request: Request, queue: str, msg_id: str) -> Response:
    try:
        return JSONResponse(ctx_of(request).client.message_json(f"{queue}/{msg_id}", local_paths=False))
    except SpoolqError as e:
        return _lookup_error(e)


@router.get("/q/{queue}/{msg_id}/state.json")
def state_json(request: Request, queue: str, msg_id: str) -> Response:
    try:
        return JSONResponse([str(ctx_of(request).client.state(MessageRef(queue, msg_id)))])
    except SpoolqError as e:
        return _lookup_error(e)


@router.api_route("/q/{queue}/{msg_id}/attach/{name}", methods=["GET", "HEAD"])
def get_attachment(request: Request, queue: str, msg_id: str, name: str) -> Response:
    try:
        return attachment_response(request, ctx_of(request).client, queue, msg_id, name)
    except SpoolqError as e:
        return _lookup_error(e)


@router.api_route("/q/{queue}/{msg_id}/log/{log}", methods=["GET", "HEAD"])
def get_log(request: Request, queue: str, msg_id: str, log: str) -> Response:
    try:
        fh = open_log(ctx_of(request).client, queue, msg_id, log)
        return file_response(request, fh, media_type="text/plain; charset=utf-8")
    except SpoolqError as e:
        return _lookup_error(e)


def _tailview(request: Request, queue: str, msg_id: str, name: str, tail_path: str) -> Response:
    return render(request, "tailview.html", title=f"{name} · {msg_id}", q=queue, msg_id=msg_id, file_name=name,
                  tail_path=tail_path, state_path=f"/q/{queue}/{msg_id}/state.json")


@router.get("/q/{queue}/{msg_id}/tailview/{name}")
def tailview(request: Request, queue: str, msg_id: str, name: str) -> Response:
    """RQ's tail of an attachment as it grows."""
    try:
        view = ctx_of(request).client.get(MessageRef(queue, msg_id))
    except SpoolqError as e:
        return _lookup_error(e)
    if name not in view.attachments:
        return _text(404, f"404 - Message ID attachment '{name}' not found")
    return _tailview(request, queue, msg_id, name, f"/q/{queue}/{msg_id}/attach/{name}")


@router.get("/q/{queue}/{msg_id}/tailviewlog/{log}")
def tailviewlog(request: Request, queue: str, msg_id: str, log: str) -> Response:
    """RQ's tail of a job log (``stdio.log``) as it grows, ANSI colours shown."""
    try:
        ctx_of(request).client.state(MessageRef(queue, msg_id))
    except SpoolqError as e:
        return _lookup_error(e)
    if not log_name_ok(log):
        return _text(404, f"404 - Message ID log '{log}' not found")
    return _tailview(request, queue, msg_id, log, f"/q/{queue}/{msg_id}/log/{log}")


_RESULT_TEXT = {"commit": "msg commited", "delete": "msg deleted", "destroy": "msg destroyed"}


def _message_method(ctx: AppContext, queue: str, msg_id: str, method: str) -> None:
    if method == "commit":
        try:
            ctx.client.commit(f"{queue}/{msg_id}")
        except WrongState:
            # Committed by an earlier try whose answer was lost: ok again, so a relay's
            # retried commit is safe. RQ answers "cannot find message" (rq-spec 5.1).
            pass
    elif method == "destroy":
        # RQ's destroy stops the running script (SIGTERM to its pid; the message ends in
        # err) and answers "msg not found" when none runs, keeping the message. Here the
        # daemon stops the script's whole process group: a cancel.
        if ctx.client.state(MessageRef(queue, msg_id)) != State.RUN:
            raise MessageNotFound("msg not found")
        ctx.client.cancel(f"{queue}/{msg_id}", wait=0)
    else:
        ctx.client.delete(f"{queue}/{msg_id}")


@router.post("/q/{queue}/{msg_id}")
async def message_method(request: Request, queue: str, msg_id: str) -> Response:
    ctx = ctx_of(request)
    try:
        async with form_of(request, ctx.upload_dir) as form:
            method = form.get("_method") or ""
            x_format = form.get("x_format") or "html"
    except SpoolqError as e:
        return _fail(e)
    if method not in _RESULT_TEXT:
        return _text(400, "400 - Invalid method param")
    try:
        await run_in_threadpool(_message_method, ctx, queue, msg_id, method)
    except (QueueNotFound, InvalidName) as e:
        return _lookup_error(e)
    except MessageNotFound as e:
        if x_format != "json":  # RQ: back to the message page
            return RedirectResponse(f"/q/{queue}/{msg_id}", status_code=303)
        return _fail(e, "cannot find message" if method == "commit" else "msg not found")
    except SpoolqError as e:
        if x_format != "json":
            return RedirectResponse(f"/q/{queue}/{msg_id}", status_code=303)
        return _fail(e)
    if x_format == "json":
        return JSONResponse(["ok", _RESULT_TEXT[method]])
    # RQ: a commit goes on to the message, a delete or destroy to its queue.
    return RedirectResponse(f"/q/{queue}/{msg_id}" if method == "commit" else f"/q/{queue}", status_code=303)


async def _simple_action(request: Request, queue: str, msg_id: str, action: str) -> Response:
    ctx = ctx_of(request)
    try:  # before the body is read: the message must exist
        await run_in_threadpool(ctx.client.state, MessageRef(queue, msg_id))
    except (QueueNotFound, InvalidName, MessageNotFound) as e:
        return _lookup_error(e)
    try:
        async with form_of(request, ctx.upload_dir) as form:
            x_format = form.get("x_format") or "html"
    except SpoolqError:
        x_format = "html"
    try:
        result = await run_in_threadpool(act, ctx.client, queue, msg_id, action)
    except (QueueNotFound, InvalidName, MessageNotFound) as e:
        return _lookup_error(e)
    except SpoolqError as e:
        return _fail(e)
    if x_format == "json":
        return JSONResponse(["ok", result.get("clone", {}).get("full_id", "ok")])
    target = f"/q/{queue}" if action == "clone" else f"/q/{queue}/{msg_id}"
    return RedirectResponse(target, status_code=303)


@router.post("/q/{queue}/{msg_id}/clone")
async def clone(request: Request, queue: str, msg_id: str) -> Response:
    return await _simple_action(request, queue, msg_id, "clone")


@router.post("/q/{queue}/{msg_id}/run_now")
async def run_now(request: Request, queue: str, msg_id: str) -> Response:
    return await _simple_action(request, queue, msg_id, "run-now")


@router.post("/q/{queue}/{msg_id}/attach/new")
async def attach_new(request: Request, queue: str, msg_id: str) -> Response:
    ctx = ctx_of(request)
    try:
        # Before a byte of the upload is stored: the message must exist and be in prep.
        if await run_in_threadpool(ctx.client.state, MessageRef(queue, msg_id)) != State.PREP:
            raise WrongState("message is not in prep")
        async with form_of(request, ctx.upload_dir, files=True) as form:
            f = form.file("filedata")
            if f is None:
                return _text(404, "404 - Missing required param filedata")
            if not f.filename:
                raise InvalidInput("filedata has no filename: the stored name is the upload's filename")
            info = await run_in_threadpool(ctx.client.attach, f"{queue}/{msg_id}", f.path,
                                           name=f.filename, link=True)  # our own spooled upload
    except (QueueNotFound, InvalidName) as e:
        if isinstance(e, InvalidName) and "ttachment" in e.message:
            return _fail(e)
        return _lookup_error(e)
    except (MessageNotFound, WrongState) as e:
        return _fail(e, "cannot find message")
    except SpoolqError as e:
        return _fail(e)
    return JSONResponse(["ok", f"{info.md5}-Attached successfully"])


@router.post("/q/{queue}/{msg_id}/attach/{name}")
async def attach_delete(request: Request, queue: str, msg_id: str, name: str) -> Response:
    ctx = ctx_of(request)
    try:
        async with form_of(request, ctx.upload_dir) as form:
            method = form.get("_method")
        if method != "delete":
            return _text(400, "400 - Invalid method param")
        await run_in_threadpool(ctx.client.delete_attachment, MessageRef(queue, msg_id), name)
    except WrongState as e:
        return _fail(e, "msg not in prep")
    except SpoolqError as e:
        return _fail(e)
    return JSONResponse(["ok", "Attachment deleted successfully"])
