"""The daemon: one supervisor per spool root (``spoolq serve``), dispatching queue scripts.

``Daemon`` is imported lazily: the CLI asks the store whether a daemon is there
(``Store.served``) without loading the supervisor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .supervisor import Daemon

__all__ = ["Daemon"]


def __getattr__(name: str) -> Any:
    if name == "Daemon":
        from .supervisor import Daemon

        return Daemon
    raise AttributeError(name)
