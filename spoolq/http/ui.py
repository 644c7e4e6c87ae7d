"""The HTML UI: server-rendered Jinja2 pages, a little vendored-free JS, no build step.

Pages live at RQ's URLs (``/``, ``/q/<q>``, ``/q/<q>/<id>``, ``/new_queue``,
``/q/<q>/new_message``); every form posts to ``/ui/...`` and carries a double-submit CSRF
token. Jinja2 autoescapes everything; the log is rendered by spoolq.js into text nodes,
so neither a user's input nor a script's output can inject markup.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from .. import __version__
from ..errors import InvalidInput, InvalidMessage, SpoolqError
from ..model import State
from ..store import AttachmentSource
from . import api
from .actions import ACTIONS, ADMIN_ACTIONS, act
from .auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    FAILURE_DELAY,
    SESSION_COOKIE,
    check_csrf,
    csrf_token,
    policy_of,
    principal,
    throttle_key,
)
from .common import STATE_ORDER, AppContext, all_summaries, ctx_of, queue_summary
from .errors import status_for
from .uploads import ParsedForm, form_of

router = APIRouter(include_in_schema=False)
HERE = Path(__file__).parent
FLASH_COOKIE = "spoolq_flash"
PAGE_SIZE = 50
RQ_SUMMARY_KEYS = ("status", "state", "param1", "param2", "param3", "param4", "count", "msg_id", "max_count",
                   "post_run_webhook", "dest", "src", "orig_msg_id", "cloned_from", "dups", "dup", "force_remote")
"""The rows of RQ's message summary (``views/_message_summary.erb``), in its order."""


def _fmt_time(t: Any) -> str:
    try:
        v = float(t)
    except (TypeError, ValueError):
        return ""
    if v <= 0:
        return "now"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(v))


def _fmt_size(n: Any) -> str:
    try:
        size = float(n)
    except (TypeError, ValueError):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _rel(t: Any) -> str:
    try:
        d = float(t) - time.time()
    except (TypeError, ValueError):
        return ""
    if abs(d) < 1:
        return "now"
    span = abs(d)
    text = f"{span:.0f}s" if span < 120 else f"{span / 60:.0f}m" if span < 7200 else f"{span / 3600:.1f}h"
    return f"in {text}" if d > 0 else f"{text} ago"


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["ts"] = _fmt_time
    env.filters["size"] = _fmt_size
    env.filters["rel"] = _rel
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    env.globals["version"] = __version__
    env.globals["states"] = STATE_ORDER
    return Jinja2Templates(env=env)


TEMPLATES = make_templates()


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    ctx = ctx_of(request)
    context.setdefault("title", "spoolq")
    flash = request.cookies.get(FLASH_COOKIE)
    flash_data: dict[str, str] | None = None
    if flash:
        try:
            raw = json.loads(flash)
            flash_data = {"kind": str(raw.get("kind", "info")), "text": str(raw.get("text", ""))}
        except (ValueError, AttributeError):
            flash_data = None
    who = principal(request)
    resp = TEMPLATES.TemplateResponse(request, name, {
        "csrf": csrf_token(request), "csrf_field": CSRF_FIELD, "flash": flash_data,
        "signed_in": who is not None, "session": who == "session",
        "can_change": who is not None or ctx.auth.anonymous_level == "all", **context}, status_code=status)
    new = getattr(request.state, "new_csrf", None)
    if new:
        resp.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="strict", path="/",
                        secure=ctx.auth.secure(request))
    if flash:
        resp.delete_cookie(FLASH_COOKIE, path="/")
    return resp


def redirect(url: str, text: str = "", kind: str = "info") -> RedirectResponse:
    resp = RedirectResponse(url, status_code=303)
    if text:
        resp.set_cookie(FLASH_COOKIE, json.dumps({"kind": kind, "text": text[:500]}), path="/",
                        samesite="strict", httponly=True, max_age=60)
    return resp


def error_page(request: Request, e: SpoolqError) -> HTMLResponse:
    return render(request, "error.html", status=status_for(e), title="error", error=e)


# -- login ----------------------------------------------------------------------------------
def _safe_next(nxt: str | None) -> str:
    """Only a path on this server: never an open redirect to another site."""
    nxt = nxt or "/"
    return nxt if nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"


def _signed_in(request: Request, target: str) -> Response:
    """Start a UI session and go to ``target``."""
    resp = redirect(target)
    resp.set_cookie(SESSION_COOKIE, policy_of(request).sessions.create(), httponly=True, samesite="strict",
                    path="/", secure=policy_of(request).secure(request))
    return resp


@router.get("/login")
def login_form(request: Request, next: str = "/", code: str = "") -> Response:
    nxt = _safe_next(next)
    if code:
        if policy_of(request).links.redeem(code):
            return _signed_in(request, nxt)
        return render(request, "login.html", status=401, title="sign in", next=nxt, failed=True,
                      why="That sign-in link was used already or has expired: ask for a new one with "
                          "`spoolq login-url`, or paste the token.")
    return render(request, "login.html", title="sign in", next=nxt, failed=False, why="")


async def _small_form(request: Request) -> dict[str, str]:
    """The sign-in form: url-encoded, a few KiB at most (BodyLimit enforces the size)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise InvalidInput("sign in with the form (application/x-www-form-urlencoded)")
    body = await request.body()
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=8)
    except ValueError as e:
        raise InvalidInput(f"bad form: {e}") from None
    return {k: v for k, v in pairs}


@router.post("/login")
async def login(request: Request) -> Response:
    pol = policy_of(request)
    who = throttle_key(request.scope, dict(request.headers))
    wait = pol.throttle.blocked(who)
    if wait:
        return render(request, "login.html", status=429, title="sign in", next="/", failed=True,
                      why=f"Too many wrong tokens from this address: try again in {wait:.0f} s.")
    form = await _small_form(request)
    check_csrf(request, form.get(CSRF_FIELD))
    nxt = _safe_next(form.get("next"))
    if pol.token is None:
        return redirect(nxt)
    if not pol.token_matches(form.get("token", "").strip()):
        pol.throttle.failed(who)
        await asyncio.sleep(FAILURE_DELAY)  # and at most FAILURES_ALLOWED guesses a minute
        return render(request, "login.html", status=401, title="sign in", next=nxt, failed=True,
                      why="Wrong token.")
    return _signed_in(request, nxt)


@router.post("/logout")
async def logout(request: Request) -> Response:
    # No body is read: a cross-site post is refused by the middleware (Origin), and signing
    # out is all this can do. The session is revoked here, not just forgotten by the browser.
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        policy_of(request).sessions.revoke(sid)
    resp = redirect("/login")
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# -- pages -----------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> HTMLResponse:
    queues = all_summaries(ctx_of(request))
    totals: dict[str, int] = {}
    for q in queues:
        for k, v in q["counts"].items():
            totals[k] = totals.get(k, 0) + v
    client = ctx_of(request).client
    served = client.served()
    # serve --dispatchers: the processes that share queues (the lock files; nothing walked).
    procs = (client.dispatch_processes() or {}).get("processes", [])
    return render(request, "dashboard.html", title="spoolq", queues=queues, totals=totals,
                  mgr_up=served is None or served[0], dispatch=procs if len(procs) > 1 else [])


@router.get("/new_queue", response_class=HTMLResponse)
def new_queue_form(request: Request) -> HTMLResponse:
    return render(request, "new_queue.html", title="new queue", values={}, error=None)


def queue_config_from_form(form: ParsedForm) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": (form.get("name") or "").strip(),
                           "script": (form.get("script") or "").strip(),
                           "exec_prefix": form.get("exec_prefix") or ""}
    for key, conv in (("num_workers", int), ("max_count", int), ("timeout", float)):
        raw = (form.get(key) or "").strip()
        if raw:
            try:
                cfg[key] = conv(raw)
            except ValueError:
                raise InvalidInput(f"{key} must be a number, got {raw!r}") from None
    env = (form.get("env_vars") or "").strip()
    if env:
        pairs = {}
        for line in env.splitlines():
            if line.strip():
                k, sep, v = line.partition("=")
                if not sep:
                    raise InvalidInput(f"env_vars lines are NAME=value, got {line!r}")
                pairs[k.strip()] = v
        cfg["env_vars"] = pairs
    for key in ("coalesce_params", "blocking_params"):
        vals = form.getlist(key)
        if vals:
            cfg[key] = vals
    return cfg


@router.post("/ui/new_queue")
async def new_queue(request: Request) -> Response:
    ctx = ctx_of(request)
    async with form_of(request, ctx.upload_dir) as form:
        check_csrf(request, form.get(CSRF_FIELD))
        try:
            cfg = queue_config_from_form(form)
            await run_in_threadpool(ctx.client.create_queue, cfg)
        except SpoolqError as e:
            return render(request, "new_queue.html", status=status_for(e), title="new queue",
                          values=dict(form.items()), error=e.message)
    return redirect(f"/q/{cfg['name']}", f"queue {cfg['name']} created")


@router.get("/q/{queue}", response_class=HTMLResponse)
def queue_page(request: Request, queue: str, state: str = "que", filter: str = "",
               cursor: str = "") -> Response:
    ctx = ctx_of(request)
    try:
        summary = queue_summary(ctx, queue, with_config=True)
        st = State(state) if state in STATE_ORDER else State.QUE
        page = ctx.client.list(queue, st, limit=PAGE_SIZE, cursor=cursor or None, filter=filter or None,
                               scan_limit=api.SEARCH_SCAN if filter else None)
    except SpoolqError as e:
        return error_page(request, e)
    next_url = None
    if page.next_cursor:
        next_url = f"/q/{quote(queue)}?" + urlencode({"state": st.value, "filter": filter,
                                                       "cursor": page.next_cursor})
    return render(request, "queue.html", title=queue, q=summary, state=st.value, filter=filter, scanned=page.scanned,
                  items=page.items, problems=page.problems, next_url=next_url,
                  first_page=not cursor, now=time.time(),
                  config_json=json.dumps(summary["config"], indent=2))


def _queue_action(ctx: AppContext, queue: str, form: ParsedForm) -> str:
    action = form.get("action") or ""
    if action in ADMIN_ACTIONS:
        ctx.client.admin_action(queue, action)
        return f"queue {queue}: {action}"
    if action == "ack_errs":
        return f"{ctx.client.ack_errs(queue)} errors acknowledged"
    if action == "config":
        try:
            data = json.loads(form.get("config") or "")
        except ValueError as e:
            raise InvalidInput(f"config is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("name", queue) != queue:
            raise InvalidInput("config must be a JSON object for this queue (a queue cannot be renamed)")
        ctx.client.update_queue(queue, **data)
        return "config saved; the next run uses it"
    raise InvalidInput(f"unknown queue action {action!r}")


def _start_bulk(ctx: AppContext, queue: str, form: ParsedForm) -> str:
    """A bulk action from the queue page: with a search, count the matches first (the page
    of that count offers the action on exactly what it found); without, act at once (the
    confirm dialog showed the count). Returns the operation's page."""
    what = form.get("bulk_action") or ""
    if what not in ACTIONS:
        raise InvalidInput(f"unknown bulk action {what!r}")
    st = State(form.get("state") or "que") if (form.get("state") or "que") in STATE_ORDER else State.QUE
    flt = (form.get("filter") or "").strip()
    if flt:
        op = ctx.operations.start(queue, st, flt, "count", then=what)
    else:
        op = ctx.operations.start(queue, st, None, what)
    return f"/operations/{op.id}"


@router.post("/ui/q/{queue}")
async def queue_action(request: Request, queue: str) -> Response:
    ctx = ctx_of(request)
    async with form_of(request, ctx.upload_dir) as form:
        check_csrf(request, form.get(CSRF_FIELD))
        back = f"/q/{quote(queue)}?" + urlencode({"state": form.get("state") or "que",
                                                   "filter": form.get("filter") or ""})
        if form.get("action") == "bulk":
            try:
                target = await run_in_threadpool(_start_bulk, ctx, queue, form)
            except SpoolqError as e:
                return redirect(back, e.message, "error")
            return redirect(target)
        if form.get("action") == "delete_queue":
            try:
                await run_in_threadpool(ctx.client.delete_queue, queue, force=bool(form.get("force")))
            except SpoolqError as e:
                return redirect(back, e.message, "error")
            return redirect("/", f"queue {queue} deleted")
        try:
            text = await run_in_threadpool(_queue_action, ctx, queue, form)
        except SpoolqError as e:
            return redirect(back, e.message, "error")
    return redirect(back, text)


@router.get("/q/{queue}/new_message", response_class=HTMLResponse)
def new_message_form(request: Request, queue: str) -> Response:
    ctx = ctx_of(request)
    try:
        summary = queue_summary(ctx, queue)
    except SpoolqError as e:
        return error_page(request, e)
    return render(request, "new_message.html", title=f"new message · {queue}", q=summary,
                  values={}, error=None)


def _message_from_form(form: ParsedForm) -> tuple[dict[str, Any], str]:
    fields: dict[str, Any] = {}
    for k in ("param1", "param2", "param3", "param4", "src"):
        v = form.get(k)
        if v:
            fields[k] = v
    raw = (form.get("params") or "").strip()
    if raw:
        try:
            params = json.loads(raw)
        except ValueError as e:
            raise InvalidMessage(f"params is not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise InvalidMessage("params must be a JSON object")
        fields["params"] = params
    due = (form.get("due") or "").strip()
    delay = (form.get("delay") or "").strip()
    if due:
        try:  # <input type=datetime-local>, interpreted as UTC
            dt = datetime.strptime(due[:16], "%Y-%m-%dT%H:%M")
        except ValueError:
            raise InvalidMessage(f"due must be YYYY-MM-DDTHH:MM (UTC), got {due!r}") from None
        fields["due"] = float(calendar.timegm(dt.timetuple()))
    elif delay:
        try:
            fields["delay"] = float(delay)
        except ValueError:
            raise InvalidMessage(f"delay must be seconds, got {delay!r}") from None
    mc = (form.get("max_count") or "").strip()
    if mc:
        # ASCII digits only ("²".isdigit() is true, int() refuses it), and short enough for
        # int() (a 5000-digit number is past its limit): else a 400, not a crash.
        if not (mc.isascii() and mc.isdigit()) or len(mc) > 18:
            raise InvalidMessage(f"max_count must be a positive integer, got {mc[:40]!r}")
        fields["max_count"] = int(mc)
    hooks = (form.get("post_run_webhook") or "").split()
    if hooks:
        fields["post_run_webhook"] = hooks
    return fields, (form.get("mode") or "commit")


def _send_from_form(ctx: AppContext, queue: str, form: ParsedForm) -> str:
    fields, mode = _message_from_form(form)
    files = [f for f in form.files if f.field == "attachment" and f.filename]
    atts = [AttachmentSource(name=f.filename, path=str(f.path), link=True) for f in files]
    if mode == "prep":
        receipt = ctx.client.prep(queue, **fields)
        for a in atts:
            ctx.client.attach(receipt, a.path, name=a.name, link=True)  # our own spooled upload
    else:
        receipt = ctx.client.send(queue, attachments=atts, **fields)
    return receipt.msg_id


@router.post("/ui/q/{queue}/new_message")
async def send_message(request: Request, queue: str) -> Response:
    ctx = ctx_of(request)
    async with form_of(request, ctx.upload_dir, files=True) as form:
        check_csrf(request, form.get(CSRF_FIELD))
        try:
            msg_id = await run_in_threadpool(_send_from_form, ctx, queue, form)
        except SpoolqError as e:
            try:
                summary = queue_summary(ctx, queue)
            except SpoolqError as e2:
                return error_page(request, e2)
            return render(request, "new_message.html", status=status_for(e), title="new message",
                          q=summary, values=dict(form.items()), error=e.message)
    return redirect(f"/q/{quote(queue)}/{msg_id}", f"message {msg_id} stored")


@router.get("/q/{queue}/{msg_id}", response_class=HTMLResponse)
def message_page(request: Request, queue: str, msg_id: str) -> Response:
    ctx = ctx_of(request)
    try:
        view = ctx.client.get(f"{queue}/{msg_id}")
        summary = queue_summary(ctx, queue, with_config=True)
    except SpoolqError as e:
        return error_page(request, e)
    m = view.message
    full_id = ctx.client.full_id(queue, msg_id)
    return render(request, "message.html", title=f"{msg_id} · {queue}", q=summary, v=view, m=m,
                  full_id=full_id, now=time.time(), can_cancel=hasattr(ctx.client, "cancel"),
                  rq=view.to_rq_json(full_id, local_paths=False), rq_keys=RQ_SUMMARY_KEYS)


@router.post("/ui/q/{queue}/{msg_id}")
async def message_action(request: Request, queue: str, msg_id: str) -> Response:
    ctx = ctx_of(request)
    page = f"/q/{quote(queue)}/{quote(msg_id)}"
    async with form_of(request, ctx.upload_dir, files=True) as form:
        check_csrf(request, form.get(CSRF_FIELD))
        action = form.get("action") or ""
        try:
            if action == "attach":
                f = form.file("attachment")
                if f is None or not f.filename:
                    raise InvalidInput("choose a file to attach")
                info = await run_in_threadpool(ctx.client.attach, f"{queue}/{msg_id}", f.path,
                                               name=f.filename, link=True)  # our own spooled upload
                return redirect(page, f"attached {info.name} ({info.size} bytes, md5 {info.md5})")
            if action not in ACTIONS:
                raise InvalidInput(f"unknown action {action!r}")
            res = await run_in_threadpool(act, ctx.client, queue, msg_id, action)
        except SpoolqError as e:
            return redirect(page, e.message, "error")
    if action == "delete":
        return redirect(f"/q/{quote(queue)}", f"message {msg_id} deleted")
    if action == "clone":
        return redirect(f"/q/{quote(queue)}/{res['clone']['msg_id']}", f"cloned from {msg_id}")
    return redirect(page, f"{action}: done")


# -- bulk operations ---------------------------------------------------------------------
@router.get("/operations/{op_id}", response_class=HTMLResponse)
def operation_page(request: Request, op_id: str) -> Response:
    ctx = ctx_of(request)
    try:
        op = ctx.operations.get(op_id)
    except SpoolqError as e:
        return error_page(request, e)
    return render(request, "operation.html", title=f"{op.action} · {op.queue}", op=op.to_json())


@router.post("/ui/operations/{op_id}")
async def operation_action(request: Request, op_id: str) -> Response:
    ctx = ctx_of(request)
    page = f"/operations/{quote(op_id)}"
    async with form_of(request, ctx.upload_dir) as form:
        check_csrf(request, form.get(CSRF_FIELD))
        action = form.get("action") or ""
    try:
        op = ctx.operations.get(op_id)
        if action == "cancel":
            ctx.operations.cancel(op_id)
            return redirect(page, "stopping: what was done stays done")
        if action == "apply" and op.then:
            new = await run_in_threadpool(ctx.operations.start, op.queue, op.state, None, op.then, op.id)
            return redirect(f"/operations/{new.id}")
        raise InvalidInput(f"unknown operation action {action!r}")
    except SpoolqError as e:
        return redirect(page, e.message, "error")
