"""Message actions shared by the API, the RQ routes and the UI, singly or in bulk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..client import Client
from ..errors import InvalidInput, SpoolqError
from ..model import State
from .errors import NotImplementedYet

ADMIN_ACTIONS = ("pause", "resume", "down", "up")
"""Queue admin actions (RQ's): each sets or clears one flag (Client.admin_action)."""
ACTIONS = ("retry", "delete", "clone", "run-now", "cancel", "commit")
BULK_LIMIT = 100_000
"""Most messages one bulk request acts on; a bigger set needs several requests."""


def act(client: Client, queue: str, msg_id: str, action: str) -> dict[str, Any]:
    """Do ``action`` to one message; returns what the API answers."""
    ref = f"{queue}/{msg_id}"
    result: dict[str, Any] = {"queue": queue, "msg_id": msg_id, "action": action}
    if action == "retry":
        client.retry(ref)
    elif action == "delete":
        client.delete(ref)
    elif action == "clone":
        receipt = client.clone(ref)
        result["clone"] = {"queue": receipt.queue, "msg_id": receipt.msg_id, "full_id": receipt.full_id}
    elif action == "run-now":
        client.run_now(ref)
    elif action == "commit":
        client.commit(ref)
    elif action == "cancel":
        cancel: Callable[[str], Any] | None = getattr(client, "cancel", None)
        if cancel is None:
            raise NotImplementedYet("cancelling a running job needs the daemon's client.cancel, "
                                    "which this spoolq does not have yet")
        cancel(ref)
    else:
        raise InvalidInput(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    return result


def matching_ids(client: Client, queue: str, state: State, filter: str | None,
                 limit: int = BULK_LIMIT) -> list[str]:
    """Every id in ``state`` whose message matches ``filter`` (newest first), up to ``limit``."""
    ids: list[str] = []
    cursor: str | None = None
    while len(ids) < limit:
        page = client.list(queue, state, limit=min(1000, limit - len(ids)), cursor=cursor,
                           filter=filter or None)
        ids.extend(v.msg_id for v in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return ids[:limit]


def bulk(client: Client, queue: str, state: State, filter: str | None, action: str) -> dict[str, Any]:
    """Do ``action`` to everything in ``state`` that ``filter`` matches.

    The set is taken first, then acted on one message at a time: a message that moved on
    meanwhile is reported under ``failed`` and the rest still go through.
    """
    if action not in ACTIONS:
        raise InvalidInput(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    ids = matching_ids(client, queue, state, filter)
    ok = 0
    failed: list[dict[str, str]] = []
    for msg_id in ids:
        try:
            act(client, queue, msg_id, action)
            ok += 1
        except NotImplementedYet:
            raise
        except SpoolqError as e:
            if len(failed) < 100:
                failed.append({"msg_id": msg_id, "code": e.code, "message": e.message})
    return {"queue": queue, "state": str(state), "filter": filter or "", "action": action,
            "matched": len(ids), "succeeded": ok, "failed": failed,
            "truncated": len(ids) >= BULK_LIMIT}
