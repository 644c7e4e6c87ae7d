"""The JSON API under ``/api/v1`` (documented in docs/http-api.md and by the OpenAPI document).

Handlers are thin: they validate the HTTP shape, call :class:`spoolq.client.Client`, and
let :mod:`spoolq.http.errors` turn exceptions into ``{"error": {code, message}}``.
Blocking handlers are plain ``def`` (FastAPI runs them in its thread pool); the ones that
stream a request body are ``async``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Query, Request
from fastapi import Path as FastPath
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..errors import InvalidConfig, InvalidInput, InvalidMessage, TooLarge
from ..model import MAX_SEND_BYTES, MESSAGE_FIELD_NAMES, MessageFields, State
from ..store import AttachmentSource
from .actions import act
from .auth import LINK_TTL, policy_of, principal
from .common import (
    AppContext,
    AttachName,
    MsgId,
    QueueName,
    all_summaries,
    attachment_response,
    ctx_of,
    file_response,
    open_log,
    queue_summary,
)
from .errors import BadRequest, Forbidden
from .schemas import (
    AckedOut,
    ActionOut,
    AttachedOut,
    DeletedOut,
    LoginLinkOut,
    MessageOut,
    MessagePage,
    OperationOut,
    QueueConfigOut,
    QueueSummary,
    ReceiptOut,
)
from .uploads import ParsedForm, form_of

router = APIRouter(prefix="/api/v1")
SEARCH_SCAN = 20_000
"""A filtered listing examines at most this many messages per request (about half a second
on this project's VM), then answers with what it found and a cursor to search on from."""


SEND_STATES = ("que", "prep")
HTTP_SEND_FIELDS = MESSAGE_FIELD_NAMES - {"count"}
"""What a JSON send may set: :class:`~spoolq.model.MessageFields` but ``count`` (a new
message has run no attempt), plus ``state`` (que, or prep to attach files, then commit)."""


def _new_message_schema() -> dict[str, Any]:
    """The OpenAPI schema of a JSON send, from the one definition (model.MessageFields)."""
    schema = TypeAdapter(MessageFields).json_schema()
    schema["properties"].pop("count", None)
    schema["properties"]["state"] = {"enum": list(SEND_STATES), "default": "que",
                                     "description": "prep: attach files, then commit"}
    schema["properties"]["due"]["description"] = "epoch seconds; default now"
    schema["properties"]["delay"]["description"] = "seconds from now (instead of due)"
    schema["title"] = "NewMessage"
    schema["additionalProperties"] = False
    return schema


class AdminAction(StrEnum):
    pause = "pause"
    resume = "resume"
    down = "down"
    up = "up"


class MessageAction(StrEnum):
    retry = "retry"
    clone = "clone"
    run_now = "run-now"
    cancel = "cancel"
    commit = "commit"


class BulkAction(StrEnum):
    retry = "retry"
    delete = "delete"
    clone = "clone"
    run_now = "run-now"
    cancel = "cancel"
    commit = "commit"
    count_matches = "count"  # (not `count`: that name is str.count)


class BulkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: BulkAction
    state: State
    filter: str = Field("", description="the list filter (model.search_text); empty = every message")
    ids_from: str | None = Field(None, description="act on exactly the ids a finished 'count' found")
    then: BulkAction | None = Field(None, description="for a count: the action a UI offers next")


_SEND_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _new_message_schema()},
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "message": {"type": "string", "description": "the message as JSON (NewMessage)"},
                    "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                },
            }},
        },
    }
}


def _ctx(request: Request) -> AppContext:
    return ctx_of(request)


# -- service ------------------------------------------------------------------------------
class LoginLinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    next: str = Field("/", description="the page to open after signing in (a path on this server)")
    ttl: float = Field(LINK_TTL, gt=0, le=86400, description="seconds the link stays valid (it works once)")


@router.post("/login-links", status_code=201, response_model=LoginLinkOut,
             summary="A one-time sign-in link for the web UI (what `spoolq login-url` prints)")
def login_link(request: Request, req: LoginLinkRequest | None = Body(None)) -> dict[str, Any]:  # noqa: B008
    if principal(request) == "session":
        # A link is a new session: one minted by a session would outlive its sign-out and
        # its day (a stolen cookie made permanent). The token, or login-url, makes them.
        raise Forbidden("a sign-in link needs the token, not a browser session")
    req = req or LoginLinkRequest.model_validate({})
    nxt = req.next if req.next.startswith("/") and not req.next.startswith("//") else "/"
    code = policy_of(request).links.mint(req.ttl)
    url = str(request.base_url).rstrip("/") + "/login?" + urlencode({"code": code, "next": nxt})
    return {"url": url, "expires_in": req.ttl}



@router.get("/queues", response_model=list[QueueSummary], summary="All queues with admin status and counts per state")
def list_queues(request: Request) -> list[dict[str, Any]]:
    return all_summaries(_ctx(request))


@router.post("/queues", status_code=201, response_model=QueueSummary, summary="Create a queue from a config object")
def create_queue(request: Request, config: dict[str, Any] = Body(  # noqa: B008
        ..., examples=[{"name": "mail", "script": "/usr/local/bin/send-mail", "num_workers": 2}])
) -> dict[str, Any]:
    ctx = _ctx(request)
    cfg = ctx.client.create_queue(config)
    return queue_summary(ctx, cfg.name, with_config=True)


@router.get("/queues/{queue}", response_model=QueueSummary, summary="One queue: status, counts, config")
def get_queue(request: Request, queue: QueueName) -> dict[str, Any]:
    return queue_summary(_ctx(request), queue, with_config=True)


@router.get("/queues/{queue}/config", response_model=QueueConfigOut, summary="A queue's config")
def get_config(request: Request, queue: QueueName) -> dict[str, Any]:
    return _ctx(request).client.queue_config(queue).to_dict()


@router.patch("/queues/{queue}/config", response_model=QueueConfigOut,
              summary="Change config keys (the next run uses them)")
def patch_config(request: Request, queue: QueueName, changes: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
    if "name" in changes and changes["name"] != queue:
        raise InvalidConfig("a queue cannot be renamed")
    return _ctx(request).client.update_queue(queue, **changes).to_dict()


@router.post("/queues/{queue}/ack-errs", response_model=AckedOut, summary="Acknowledge every error of a queue")
def ack_errs(request: Request, queue: QueueName) -> dict[str, Any]:
    return {"queue": queue, "acked": _ctx(request).client.ack_errs(queue)}


@router.delete("/queues/{queue}", response_model=DeletedOut,
               summary="Delete a queue (refused while it holds work, unless force)")
def delete_queue(request: Request, queue: QueueName, force: bool = False) -> dict[str, Any]:
    _ctx(request).client.delete_queue(queue, force=force)
    return {"queue": queue, "deleted": True}


# -- messages -----------------------------------------------------------------------------
def _receipt_json(ctx: AppContext, queue: str, msg_id: str) -> dict[str, Any]:
    view = ctx.client.get(f"{queue}/{msg_id}")
    return {"queue": queue, "msg_id": msg_id, "full_id": ctx.client.full_id(queue, msg_id),
            "state": str(view.state),
            "attachments": {n: {"md5": a.md5, "size": a.size} for n, a in view.attachments.items()}}


def _parse_message(raw: bytes | str) -> tuple[dict[str, Any], str]:
    """The fields of a JSON send and its state; the values are validated once, by the client
    (Message.from_dict), as for every other way in."""
    if len(raw) > MAX_SEND_BYTES:
        raise TooLarge(f"the message JSON is larger than {MAX_SEND_BYTES >> 20} MiB; put bulk data in an "
                       "attachment")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"the message is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidMessage("the message must be a JSON object")
    state = data.pop("state", "que")
    if state not in SEND_STATES:
        raise InvalidMessage(f"state must be que or prep, not {state!r}")
    unknown = set(data) - HTTP_SEND_FIELDS
    if unknown:
        raise InvalidMessage(f"unknown message field(s): {', '.join(sorted(unknown))}")
    return data, state


def send_with_files(ctx: AppContext, queue: str, msg: tuple[dict[str, Any], str],
                    form: ParsedForm | None) -> dict[str, Any]:
    """Store a message with the form's files as attachments, in que (one step) or prep.

    Spooled uploads sit on the spool's filesystem, so each attachment is a hard link.
    """
    client = ctx.client
    fields, state = msg
    files = [f for f in form.files if f.filename] if form else []  # skip a browser's empty file input
    if state == "prep":
        receipt = client.prep(queue, **fields)
        for f in files:
            client.attach(receipt, f.path, name=f.filename, link=True)  # our own spooled upload
    else:
        sources = [AttachmentSource(name=f.filename, path=str(f.path), link=True) for f in files]
        receipt = client.send(queue, attachments=sources, **fields)
    return _receipt_json(ctx, queue, receipt.msg_id)


@router.post("/queues/{queue}/messages", status_code=201, openapi_extra=_SEND_BODY, response_model=ReceiptOut,
             summary="Send a message: JSON, or multipart with a 'message' JSON field and files")
async def send_message(request: Request, queue: QueueName) -> dict[str, Any]:
    ctx = _ctx(request)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        async with form_of(request, ctx.upload_dir, files=True) as form:
            msg = _parse_message(form.get("message") or "{}")
            return await run_in_threadpool(send_with_files, ctx, queue, msg, form)
    msg = _parse_message(await request.body() or b"")
    return await run_in_threadpool(send_with_files, ctx, queue, msg, None)


@router.get("/queues/{queue}/messages", response_model=MessagePage,
            summary="Messages in one state, newest first, paginated")
def list_messages(request: Request, queue: QueueName, state: State = State.QUE,
                  limit: int = Query(50, ge=1, le=1000), cursor: str | None = None,
                  filter: str | None = None,
                  scan: int = Query(SEARCH_SCAN, ge=1, le=1_000_000,
                                    description="with a filter: messages examined at most by this call "
                                                f"(at most {SEARCH_SCAN} without credentials)")
                  ) -> dict[str, Any]:
    ctx = _ctx(request)
    if principal(request) is None:
        scan = min(scan, SEARCH_SCAN)  # anonymous callers cannot hold a worker thread for long
    page = ctx.client.list(queue, state, limit=limit, cursor=cursor or None, filter=filter or None,
                           scan_limit=scan if filter else None)
    return {"queue": queue, "state": str(state), "next_cursor": page.next_cursor,
            "scanned": page.scanned, "problems": page.problems,
            "items": [v.to_rq_json(ctx.client.full_id(queue, v.msg_id), local_paths=False) for v in page.items]}


@router.post("/queues/{queue}/bulk", status_code=202, response_model=OperationOut,
             summary="Start one action over every message a filter matches (a background operation)")
def bulk_action(request: Request, queue: QueueName, req: BulkRequest) -> dict[str, Any]:
    op = _ctx(request).operations.start(queue, req.state, req.filter or None, req.action.value,
                                        ids_from=req.ids_from, then=req.then.value if req.then else None)
    return op.to_json()


OpId = Annotated[str, FastPath(pattern=r"^[0-9a-f]{16}$", description="an operation id")]


@router.get("/operations", response_model=list[OperationOut],
            summary="Bulk operations, newest first (kept until restart)")
def list_operations(request: Request) -> list[dict[str, Any]]:
    return [op.to_json() for op in _ctx(request).operations.recent()]


@router.get("/operations/{op_id}", response_model=OperationOut,
            summary="One bulk operation's progress; ?wait=S waits until it ends")
def get_operation(request: Request, op_id: OpId, wait: float = Query(0, ge=0, le=60)) -> dict[str, Any]:
    ops = _ctx(request).operations
    return (ops.wait(op_id, wait) if wait else ops.get(op_id)).to_json()


@router.post("/operations/{op_id}/cancel", response_model=OperationOut,
             summary="Stop a bulk operation (what it did stays done)")
def cancel_operation(request: Request, op_id: OpId) -> dict[str, Any]:
    return _ctx(request).operations.cancel(op_id).to_json()


@router.get("/queues/{queue}/messages/{msg_id}", response_model=MessageOut,
            summary="One message (RQ's JSON plus history)")
def get_message(request: Request, queue: QueueName, msg_id: MsgId) -> dict[str, Any]:
    return _ctx(request).client.message_json(f"{queue}/{msg_id}", local_paths=False)


@router.delete("/queues/{queue}/messages/{msg_id}", response_model=ActionOut,
               summary="Delete a message (not while it runs)")
def delete_message(request: Request, queue: QueueName, msg_id: MsgId) -> dict[str, Any]:
    return act(_ctx(request).client, queue, msg_id, "delete")


@router.post("/queues/{queue}/messages/{msg_id}/attachments", status_code=201, response_model=AttachedOut,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                 "schema": {"type": "object", "properties": {
                     "file": {"type": "string", "format": "binary"},
                     "name": {"type": "string"}}}}}}},
             summary="Attach a file to a message in prep (multipart field 'file', optional 'name')")
async def add_attachment(request: Request, queue: QueueName, msg_id: MsgId) -> dict[str, Any]:
    ctx = _ctx(request)
    async with form_of(request, ctx.upload_dir, files=True) as form:
        f = form.file("file")
        if f is None:
            raise InvalidInput("missing the multipart file field 'file'")
        name = form.get("name") or f.filename
        if not name:
            raise InvalidInput("the upload has no filename: give one, or a 'name' field")
        info = await run_in_threadpool(ctx.client.attach, f"{queue}/{msg_id}", f.path, name=name,
                                       link=True)  # our own spooled upload: no copy
    return {"name": info.name, "md5": info.md5, "sha256": info.sha256, "size": info.size}


@router.post("/queues/{queue}/messages/{msg_id}/{action}", response_model=ActionOut,
             summary="retry (err), clone (final), run-now (que), cancel (run), commit (prep)")
def message_action(request: Request, queue: QueueName, msg_id: MsgId, action: MessageAction) -> dict[str, Any]:
    return act(_ctx(request).client, queue, msg_id, action.value)


@router.head("/queues/{queue}/messages/{msg_id}/attachments/{name}", include_in_schema=False)
@router.get("/queues/{queue}/messages/{msg_id}/attachments/{name}", response_class=Response,
            summary="Download an attachment (streamed; Range supported; HEAD too)")
def get_attachment(request: Request, queue: QueueName, msg_id: MsgId, name: AttachName) -> Response:
    return attachment_response(request, _ctx(request).client, queue, msg_id, name)


@router.head("/queues/{queue}/messages/{msg_id}/log", include_in_schema=False)
@router.get("/queues/{queue}/messages/{msg_id}/log", response_class=Response,
            summary="The job's stdio.log (Range requests: 206 / 416; HEAD too)")
def get_log(request: Request, queue: QueueName, msg_id: MsgId) -> Response:
    fh = open_log(_ctx(request).client, queue, msg_id)
    return file_response(request, fh, media_type="text/plain; charset=utf-8")


# Registered last: its path would otherwise shadow the other POST /queues/{queue}/... routes.
@router.post("/queues/{queue}/{action}", response_model=QueueSummary, summary="pause, resume, down or up")
def admin(request: Request, queue: QueueName, action: AdminAction) -> dict[str, Any]:
    ctx = _ctx(request)
    ctx.client.admin_action(queue, action.value)
    return queue_summary(ctx, queue)
