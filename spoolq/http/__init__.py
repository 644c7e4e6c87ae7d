"""spoolq's HTTP surface: the JSON API (/api/v1), RQ's routes, the HTML UI and SSE streams.

``create_app`` builds the ASGI app; ``start_http`` serves it from a daemon thread.
"""

from __future__ import annotations

__all__ = ["create_app", "start_http"]


def __getattr__(name: str) -> object:
    # Imported lazily: the CLI imports spoolq.http only when it serves.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "start_http":
        from .server import start_http

        return start_http
    raise AttributeError(name)
