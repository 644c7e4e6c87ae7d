"""Message actions shared by the API, the RQ routes, the UI and bulk operations (operations.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..client import Client
from ..errors import InvalidInput
from .errors import NotImplementedYet

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
        cancel: Callable[[str], Any] | None = getattr(client, "cancel", None)
        if cancel is None:
            raise NotImplementedYet("cancelling a running job needs the daemon's client.cancel, "
                                    "which this spoolq does not have yet")
        cancel(ref)
    else:
        raise InvalidInput(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    return result
