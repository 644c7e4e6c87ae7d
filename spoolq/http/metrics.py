"""``/healthz`` and ``/metrics`` (Prometheus text format 0.0.4).

Per-queue gauges come from the counts cache (O(1) per queue). Request counters are kept
by :class:`RequestMetrics`, a middleware. A daemon that knows more (runs, outcomes,
durations) passes an ``extra_metrics`` callable to ``create_app`` and its lines are appended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..prometheus import label as _label
from .common import all_summaries, ctx_of
from .schemas import HealthOut

router = APIRouter()
ExtraMetrics = Callable[[], str]


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestStats:
    """Responses by method, route and status class, and the time spent on them.

    Every label comes from a fixed set, whatever the client sends: a method outside
    :data:`KNOWN_METHODS` counts as ``other`` and the route is the matched route's template
    (``/api/v1/queues/{queue}``), or ``none`` when nothing matched (an audit grew this to
    172 MB with made-up method names before)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, str, str], int] = {}
        self.seconds: dict[tuple[str, str, str], float] = {}

    def add(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method if method in KNOWN_METHODS else "other", route, f"{status // 100}xx" if status else "none")
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def render(self) -> list[str]:
        lines = ["# HELP spoolq_http_requests_total HTTP responses by method, route template and status class.",
                 "# TYPE spoolq_http_requests_total counter"]
        with self.lock:
            items = sorted(self.counts.items())
            secs = dict(self.seconds)
        for (method, route, cls), n in items:
            lines.append(f'spoolq_http_requests_total{{method="{method}",route="{_label(route)}",code="{cls}"}} {n}')
        lines += ["# HELP spoolq_http_request_seconds_total Time spent answering, by method, route and status class.",
                  "# TYPE spoolq_http_request_seconds_total counter"]
        for key, _ in items:
            method, route, cls = key
            lines.append(f'spoolq_http_request_seconds_total{{method="{method}",route="{_label(route)}",'
                         f'code="{cls}"}} {secs[key]:.6f}')
        return lines


def route_template(scope: Scope) -> str:
    """The template of the route that answered (``none`` if no route matched)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "none"


class RequestMetrics:
    """Middleware feeding :class:`RequestStats` (SSE streams count when they end)."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            self.stats.add(str(scope.get("method", "")), route_template(scope), status[0],
                           time.perf_counter() - t0)


@router.get("/healthz", response_model=HealthOut,
            summary="Liveness: 200 when the store answers (public: no paths, no counts)")
def healthz(request: Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    ctx.client.queues()
    # No paths here: /healthz is public, and the spool's location is nobody else's business.
    return {"status": "ok", "version": __version__, "uptime": round(time.time() - ctx.started, 3)}


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def metrics(request: Request) -> PlainTextResponse:
    ctx = ctx_of(request)
    lines = [
        "# HELP spoolq_up The HTTP server is answering.", "# TYPE spoolq_up gauge", "spoolq_up 1",
        "# HELP spoolq_uptime_seconds Seconds since the HTTP server started.",
        "# TYPE spoolq_uptime_seconds gauge", f"spoolq_uptime_seconds {time.time() - ctx.started:.3f}",
        "# HELP spoolq_messages Messages per queue and state (err_acked: acknowledged errors).",
        "# TYPE spoolq_messages gauge",
    ]
    summaries = all_summaries(ctx)
    for s in summaries:
        for state, n in sorted(s["counts"].items()):
            lines.append(f'spoolq_messages{{queue="{_label(s["name"])}",state="{state}"}} {n}')
    lines += ["# HELP spoolq_queue_status Admin status per queue (1 for the current one).",
              "# TYPE spoolq_queue_status gauge"]
    for s in summaries:
        for st in ("UP", "PAUSE", "DOWN"):
            lines.append(f'spoolq_queue_status{{queue="{_label(s["name"])}",status="{st}"}} '
                         f'{1 if s["status"] == st else 0}')
    lines += ["# HELP spoolq_finished_per_minute Finished messages per minute, sampled by the server.",
              "# TYPE spoolq_finished_per_minute gauge"]
    for s in summaries:
        if s["done_per_min"] is not None:
            lines.append(f'spoolq_finished_per_minute{{queue="{_label(s["name"])}"}} {s["done_per_min"]:.3f}')
    req: RequestStats | None = getattr(request.app.state, "request_stats", None)
    if req is not None:
        lines += req.render()
    extra: ExtraMetrics | None = getattr(request.app.state, "extra_metrics", None)
    if extra is not None:
        try:
            lines.append(extra().rstrip("\n"))
        except Exception as e:  # a broken hook must not break the scrape
            lines.append(f"# extra metrics failed: {_label(str(e))}")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
