"""``create_app(client, token=None)``: the whole HTTP surface as one ASGI app.

Routers, in match order: the JSON API and its SSE streams (``/api/v1``), ``/healthz`` and
``/metrics``, RQ's routes (their ``.json``/``.txt`` paths must win over the HTML pages at
the same prefix), then the HTML UI and its static files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from .. import __version__
from ..client import Client
from ..errors import SpoolqError
from ..events import EventBus
from . import api, metrics, rq_admin, rq_routes, sse, ui
from .auth import AccessLevel, AuthMiddleware, AuthPolicy, LoginLinks, SecurityHeaders
from .common import MAX_STREAMS, AppContext
from .errors import error_body, error_response, status_for, validation_text
from .limits import BodyLimit
from .metrics import ExtraMetrics, RequestMetrics, RequestStats
from .uploads import sweep_uploads

log = logging.getLogger("spoolq.http")
HERE = Path(__file__).parent


def _wants_html(request: Request) -> bool:
    path = request.url.path
    return (not path.startswith("/api/") and request.method == "GET"
            and "text/html" in request.headers.get("accept", ""))


def create_app(client: Client, token: str | None = None, *, anonymous: AccessLevel | str = AccessLevel.RQ,
               loopback_only: bool = True, upload_dir: Path | None = None,
               extra_metrics: ExtraMetrics | None = None, poll_interval: float = 0.25,
               events_interval: float = 1.0, max_streams: int = MAX_STREAMS,
               login_root: str | None = None, events: EventBus | None = None,
               secure_cookies: bool = False) -> FastAPI:
    """The ASGI app over ``client``.

    ``token`` is the credential that may do everything; without it nothing beyond the
    ``anonymous`` level can be done over HTTP. ``anonymous`` is what requests without
    credentials may do when the server listens on loopback only (``loopback_only``; off
    loopback they get the public paths only). See :mod:`spoolq.http.auth`.
    ``max_streams`` caps the SSE streams open at once (more get 503). ``login_root``: the
    spool root whose ``login/`` holds codes ``spoolq login-url`` made (credentials.py).
    """
    app = _App(title="spoolq", version=__version__,
                  description="spoolq's HTTP API. Errors are {\"error\": {\"code\", \"message\"}}. "
                              "See docs/http-api.md.",
                  openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None)
    policy = AuthPolicy(token=token or None, anonymous=AccessLevel(anonymous), loopback_only=loopback_only,
                        links=LoginLinks(root=login_root), secure_cookies=secure_cookies)
    ctx = AppContext(client=client, auth=policy,
                     upload_dir=upload_dir or client.upload_dir,
                     poll_interval=poll_interval, events_interval=events_interval, max_streams=max_streams,
                     home=Path(login_root) if login_root else None, events=events)
    try:
        ctx.upload_dir.mkdir(parents=True, exist_ok=True)
        sweep_uploads(ctx.upload_dir)
    except OSError as e:
        log.warning("cannot prepare upload directory %s: %s", ctx.upload_dir, e)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.ctx = ctx
    app.state.auth = policy
    app.state.request_stats = RequestStats()
    app.state.extra_metrics = extra_metrics

    @app.exception_handler(SpoolqError)
    async def spoolq_error(request: Request, exc: SpoolqError) -> Response:
        if _wants_html(request):
            return ui.error_page(request, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        # A path parameter that fails its pattern is a bad queue, message or attachment name.
        code = "invalid_name" if errors and all(e.get("loc", ("",))[0] == "path" for e in errors) else "invalid_input"
        return JSONResponse(error_body(code, validation_text(errors)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path only;
            # GET and DELETE of one path are separate routes here.
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        # The client went away mid-request: nobody reads this answer, and it is no error of ours.
        log.debug("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> Response:
        return JSONResponse(error_body("invalid_input", "JSON nested too deeply"), status_code=400)

    @app.exception_handler(PermissionError)
    async def unreadable(request: Request, exc: PermissionError) -> Response:
        # A file in the spool this daemon's user may not read (chmod 000 by a script, or
        # another owner): the daemon's problem, said plainly, without paths; not a crash.
        log.warning("permission denied on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body("permission_denied", "the daemon may not read a file this request "
                                       "needs (permission denied); see the daemon log"), status_code=403)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", "internal error; see the daemon log"),
                            status_code=status_for(exc))

    app.include_router(api.router)
    app.include_router(sse.router)
    app.include_router(metrics.router)
    app.include_router(rq_admin.router)  # before rq_routes: /q/<q>/adminoper is no message id
    app.include_router(rq_routes.router)
    app.include_router(ui.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # add_middleware wraps: the last added runs first. Outermost (see _App): security headers
    # (on every answer, the middlewares' own 401/403/413 and 500s included), then metrics,
    # then authentication, which decides before the body limit lets the route read a byte.
    app.add_middleware(BodyLimit)
    app.add_middleware(AuthMiddleware, policy=policy)
    app.add_middleware(RequestMetrics, stats=app.state.request_stats)
    return app


class _App(FastAPI):
    """FastAPI with :class:`SecurityHeaders` outside everything, Starlette's own error
    middleware included: its 500s carry the headers too."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Any) -> list[str]:
    """Every method some route of ``app`` answers on this request's path (for ``Allow``)."""
    routes = app.router.routes
    return [m for m in HTTP_METHODS
            if any(r.matches({**scope, "type": "http", "method": m})[0] == Match.FULL for r in routes)]


ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "stable machine-readable code, e.g. queue_not_found"},
        "message": {"type": "string"}}}},
}
ERROR_STATUSES = {"400": "Bad input", "401": "A token is required", "403": "Refused (cross-site, Host, CSRF)",
                  "429": "Too many wrong tokens from this address",
                  "404": "No such queue, message, attachment or log", "409": "The message is in the wrong state",
                  "413": "Request body or message too large", "503": "The queue is DOWN",
                  "507": "The spool's disk is full"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, told the truth about errors: every operation answers errors as
    ``Error`` (never FastAPI's 422 shape), and a bearer token is accepted everywhere."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for code, text in ERROR_STATUSES.items():
                responses.setdefault(code, {"description": text, "content": {"application/json": {"schema": ref}}})
    doc["components"]["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "The daemon's token (<root>/token, SPOOLQ_TOKEN or --token-file). Needed for "
                       "everything but reading (and RQ's message routes) on a loopback server, and for "
                       "everything off loopback."}}
    doc["security"] = [{"bearer": []}, {}]
    app.openapi_schema = doc
    return doc


def openapi_document(app: FastAPI) -> dict[str, Any]:
    return app.openapi()
