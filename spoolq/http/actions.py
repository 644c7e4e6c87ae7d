"""Message actions shared by the API, the RQ routes, the UI and bulk operations (operations.py)."""

from __future__ import annotations

from typing import Any

from ..client import Client
from ..errors import InvalidInput

ADMIN_ACTIONS = ("pause", "resume", "down", "up")
"""Queue admin actions (RQ's): each sets or clears one flag (Client.admin_action)."""
ACTIONS = ("retry", "delete", "clone", "run-now", "cancel", "commit")


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
        result["cancel"] = client.cancel(ref, wait=0)  # the daemon stops a running script
    else:
        raise InvalidInput(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    return result
