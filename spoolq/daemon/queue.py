"""What the daemon keeps about one queue: its config and admin state as last read, which of
its messages this daemon runs, and when to look at it again.

Which queued messages exist and which is next is the store's (``Store.claim``): the
filesystem store keeps an index of ``que/`` for the queues the daemon wants
(store/fs/index.py), PostgreSQL asks the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model import AdminState, QueueConfig


@dataclass
class QueueState:
    name: str
    config: QueueConfig | None = None
    admin: AdminState = AdminState.UP
    running: set[str] = field(default_factory=set)  # ids this daemon runs now
    wanted: bool = False  # the store was told we claim from it (Watcher.want)
    ready: bool = True  # False until the start-up recount is done: it holds the counts lock
    config_stale: bool = True  # config.json, pause or down changed since last read
    script_error: str | None = None  # SCRIPTERROR: why the script cannot start
    hold_until: float = 0.0  # the store failed to start a message: wait before trying again
    hold_for: float = 0.0
    dirty: bool = True
    wake_at: float | None = None
