"""Server-sent events: a running job's log as it grows, and queue state changes.

Both streams poll cheap things (one ``fstat``/``read`` of the log, one small ``counts``
file per queue) and only while a client is connected: nobody listening means no work.
The log stream keeps one open file descriptor: the message directory moves between
state directories by rename, and an open file follows its inode, so the stream never
loses its place when the job moves from ``run`` to ``done`` or back to ``que``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from typing import IO, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import LogNotFound, MessageNotFound, SpoolqError
from ..events import Subscription
from ..model import FINAL_STATES, State
from .auth import principal, session_ended
from .common import AppContext, MsgId, QueueName, StreamSlots, all_summaries, ctx_of, open_log
from .errors import BadRequest, ServiceBusy

router = APIRouter(prefix="/api/v1")
READ_MAX = 256 * 1024
KEEPALIVE_SECONDS = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: str, data: Any, event_id: str | None = None) -> str:
    """One SSE frame. ``data`` is JSON, so it never contains a raw newline."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class LogFollower:
    """Reads new bytes of one message's log, reopening only until the log first exists."""

    def __init__(self, ctx: AppContext, queue: str, msg_id: str, offset: int) -> None:
        self.ctx = ctx
        self.queue = queue
        self.msg_id = msg_id
        self.offset = offset
        self.fh: IO[bytes] | None = None
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def poll(self) -> tuple[str, State, str]:
        """(new text, state, status) now; raises MessageNotFound if the message is gone."""
        view = self.ctx.client.get(f"{self.queue}/{self.msg_id}")
        if self.fh is None:
            try:
                self.fh = open_log(self.ctx.client, self.queue, self.msg_id)
                size = self.fh.seek(0, os.SEEK_END)  # any store's log: seekable, not always a file
                self.offset = min(self.offset, size)
                self.fh.seek(self.offset)
            except LogNotFound:
                self.fh = None
        text = ""
        if self.fh is not None:
            data = self.fh.read(READ_MAX)
            if data:
                self.offset += len(data)
                text = self.decoder.decode(data)
        return text, view.state, view.status

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


async def follow_log(ctx: AppContext, request: Request, queue: str, msg_id: str,
                     offset: int) -> AsyncIterator[str]:
    """``log`` events while the job runs, ``state`` events on changes, then one ``end``."""
    follower = LogFollower(ctx, queue, msg_id, offset)
    last_status: str | None = None
    idle = 0.0
    try:
        while not ctx.stopping.is_set() and not session_ended(request):  # signed out: the stream ends
            try:
                text, state, status = await run_in_threadpool(follower.poll)
            except MessageNotFound:
                yield sse("end", {"reason": "message not found"})
                return
            except SpoolqError as e:
                yield sse("error", {"code": e.code, "message": e.message})
                return
            if text:
                yield sse("log", {"text": text, "offset": follower.offset}, str(follower.offset))
                idle = 0.0
            if status != last_status:
                last_status = status
                yield sse("state", {"state": str(state), "status": status})
            if state in FINAL_STATES and not text:
                # Final and nothing more to read: one last read catches output the job wrote
                # just before it finished (the read above may have raced the final write).
                more, _, _ = await run_in_threadpool(follower.poll)
                if more:
                    yield sse("log", {"text": more, "offset": follower.offset}, str(follower.offset))
                    continue
                yield sse("end", {"state": str(state), "status": status, "offset": follower.offset})
                return
            if await request.is_disconnected():
                return
            if not text:
                await asyncio.sleep(ctx.poll_interval)
                idle += ctx.poll_interval
                if idle >= KEEPALIVE_SECONDS:
                    idle = 0.0
                    yield ": keepalive\n\n"
    finally:
        follower.close()


@router.get("/queues/{queue}/messages/{msg_id}/log/stream",
            summary="SSE: follow the job's log (events log, state, end)",
            response_class=StreamingResponse)
def stream_log(request: Request, queue: QueueName, msg_id: MsgId,
               offset: int = Query(0, ge=0, le=2**62)) -> StreamingResponse:
    ctx = ctx_of(request)
    ctx.client.get(f"{queue}/{msg_id}")  # 404 now rather than inside the stream
    last = request.headers.get("last-event-id", "").strip()
    if last:
        # The ids we send are byte offsets; anything else did not come from us.
        if not re.fullmatch(r"[0-9]{1,18}", last):
            raise BadRequest("Last-Event-ID must be a byte offset (the id of a log event)")
        offset = int(last)
    return _stream(ctx, request, follow_log(ctx, request, queue, msg_id, offset))


async def queue_events(ctx: AppContext, request: Request, only: str | None) -> AsyncIterator[str]:
    """A ``queue`` event for each queue whose status or counts changed (all of them first),
    and the daemon's own events as they come (``message``, ``admin``: spoolq/events.py)."""
    sub = ctx.events.subscribe(maxlen=10000) if ctx.events is not None else None
    try:
        async for frame in _queue_events(ctx, request, only, sub):
            yield frame
    finally:
        if sub is not None:
            sub.close()


async def _queue_events(ctx: AppContext, request: Request, only: str | None,
                        sub: Subscription | None) -> AsyncIterator[str]:
    seen: dict[str, str] = {}
    idle = 0.0
    while not ctx.stopping.is_set() and not session_ended(request):  # signed out: the stream ends
        if sub is not None:
            for ev in sub.drain():
                if not only or ev.get("queue") == only:
                    idle = 0.0
                    yield sse("message" if ev.get("event") == "state" else str(ev.get("event")), ev)
        summaries = await run_in_threadpool(all_summaries, ctx)
        names = set()
        for s in summaries:
            if only and s["name"] != only:
                continue
            names.add(s["name"])
            key = json.dumps([s["status"], s["counts"]], sort_keys=True)
            if seen.get(s["name"]) != key:
                seen[s["name"]] = key
                idle = 0.0
                yield sse("queue", s)
        for gone in set(seen) - names:
            del seen[gone]
            yield sse("queue_deleted", {"name": gone})
        if await request.is_disconnected():
            return
        await asyncio.sleep(ctx.events_interval)
        idle += ctx.events_interval
        if idle >= KEEPALIVE_SECONDS:
            idle = 0.0
            yield ": keepalive\n\n"


@router.get("/events", summary="SSE: queue status and counts as they change (event 'queue')",
            response_class=StreamingResponse)
def events(request: Request, queue: str | None = None) -> StreamingResponse:
    ctx = ctx_of(request)
    if queue:
        ctx.client.queue_config(queue)
    return _stream(ctx, request, queue_events(ctx, request, queue))


class _SlotStream(StreamingResponse):
    """An SSE response that gives its stream slot back however it ends (finished, client
    gone, cancelled, never started)."""

    def __init__(self, events: AsyncIterator[str], slots: StreamSlots) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.give_back()


def _stream(ctx: AppContext, request: Request, events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response holding one of the server's stream slots while it lives (503 when
    they are all taken: each open stream polls, and a thousand slowed everything else;
    anonymous streams cannot take the last slots, StreamSlots)."""
    if not ctx.streams.take(credentialed=principal(request) is not None):
        raise ServiceBusy(f"{ctx.streams.limit} live streams are open already; try again later")
    return _SlotStream(_while_signed_in(request, events), ctx.streams)


async def _while_signed_in(request: Request, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """``events`` until its session (if the cookie signed it in) ends: nothing is sent after
    a sign-out, even a frame the stream made just before it."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]  # an async generator
        async for frame in events:
            if session_ended(request):
                return
            yield frame
