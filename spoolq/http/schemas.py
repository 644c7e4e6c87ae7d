"""What the JSON API answers, declared so that the OpenAPI document describes it (issue 8).

The handlers build plain dicts (the same ones RQ's routes and the UI use); these models
only describe and check them on the way out. Each allows extra keys, so a field added to
a response is served before it is described here, never dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class QueueConfigOut(_Out):
    name: str
    script: str
    num_workers: int
    exec_prefix: str = ""
    env_vars: dict[str, str] = {}
    coalesce_params: list[int] = []
    blocking_params: list[int] = []
    timeout: float | None = None
    max_count: int
    retry: dict[str, float]
    fsync: bool = True
    kind: str = Field("script", description="script: one process per message; worker: persistent workers; "
                      "fsq: the items of an fsq queue directory; http: each message an HTTP request")
    worker_inflight: int = 1
    worker_restart_after: int = 0
    args: list[str] = Field([], description="arguments after the script")
    message_arg: bool = Field(False, description="param1 as the script's last argument (isq)")


class QueueSummary(_Out):
    name: str
    status: str = Field(description="UP, PAUSE, DOWN or SCRIPTERROR (RQ's oper status)")
    admin: str = Field(description="the admin state: UP, PAUSE or DOWN")
    counts: dict[str, int] = Field(description="messages per state (err excludes acknowledged errors: err_acked)")
    done_per_min: float | None = None
    script_error: str | None = Field(None, description="why the script cannot start, in SCRIPTERROR")
    config: QueueConfigOut | None = None


class AttachmentOut(_Out):
    md5: str
    size: int
    sha256: str | None = None
    path: str | None = Field(None, description="relative to the spool root (RQ's)")


class MessageOut(_Out):
    """RQ's message JSON plus spoolq's fields, the state, the job status and the history."""

    msg_id: str
    queue: str
    state: str
    status: str = Field(description="'<state> - <job status>' (RQ's)")
    dest: str
    src: str
    count: int
    max_count: int
    param1: str
    param2: str
    param3: str
    param4: str
    due: float
    orig_msg_id: str
    post_run_webhook: list[str]
    params: dict[str, Any]
    created_at: float
    history: list[dict[str, Any]]
    path: str
    full_msg_id: str | None = None
    acked: bool | None = None
    host: str | None = Field(None, description="in run: the host whose daemon runs it")
    attachments: dict[str, AttachmentOut] | None = Field(None, alias="_attachments")


class MessagePage(_Out):
    queue: str
    state: str
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")
    scanned: int
    problems: list[str]
    items: list[MessageOut]


class ReceiptOut(_Out):
    queue: str
    msg_id: str
    full_id: str
    state: str
    attachments: dict[str, AttachmentOut]


class ActionOut(_Out):
    queue: str
    msg_id: str
    action: str
    clone: dict[str, str] | None = None
    cancel: str | None = Field(None, description="for a cancel: the state the message was in")


class AttachedOut(_Out):
    name: str
    md5: str
    sha256: str
    size: int


class OperationOut(_Out):
    id: str
    queue: str
    state: str
    action: str
    status: str = Field(description="running, done, failed or cancelled")
    filter: str | None = None
    scanned: int
    matched: int
    succeeded: int
    failures: int
    failed: list[dict[str, str]]
    remaining: int | None = None
    url: str


class LoginLinkOut(_Out):
    url: str
    expires_in: float


class AckedOut(_Out):
    queue: str
    acked: int


class DeletedOut(_Out):
    queue: str
    deleted: bool


class HealthOut(_Out):
    status: str
    version: str
    uptime: float = Field(description="seconds since the HTTP server started")
