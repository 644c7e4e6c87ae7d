"""``start_http``: run the app with uvicorn in a background thread of the daemon.

The socket is bound here, in the caller's thread, so "address in use" is an exception the
daemon can report, not a ``sys.exit`` inside a thread. uvicorn installs no signal
handlers: the daemon owns the signals and calls :meth:`HttpHandle.stop`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from ..client import Client
from ..config import is_loopback
from ..errors import AddressInUse
from .app import create_app
from .errors import HttpConfigError
from .protocol import GuardedH11Protocol

MAX_CONNECTIONS = 1000
"""Connections (and requests in flight) beyond this get 503 at once instead of piling up."""

class _ThreadServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn versions
        return None


class HttpHandle:
    """A running HTTP server. ``stop()`` closes it (streams end within about a second)."""

    def __init__(self, server: _ThreadServer, thread: threading.Thread, sock: socket.socket,
                 app: Any) -> None:
        self.server = server
        self.thread = thread
        self.sock = sock
        self.app = app
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.app.state.ctx.stopping.set()
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise AddressInUse(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    # Accepted sockets inherit this. Without it a keep-alive response written as two
    # segments (headers, body) waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def start_http(client: Client, host: str = "127.0.0.1", port: int = 3333, token: str | None = None,
               *, log_level: str = "warning", **app_options: Any) -> HttpHandle:
    """Serve spoolq's HTTP API, RQ routes and UI on ``host:port`` in a background thread.

    Off loopback a token is required (raises :class:`HttpConfigError` without one), and
    anonymous requests get nothing but the public paths. Returns once the server accepts
    connections.
    """
    loopback = is_loopback(host)
    if not token and not loopback:
        raise HttpConfigError(
            f"refusing to serve HTTP on {host} without a token: set SPOOLQ_TOKEN or --token-file, "
            "or listen on 127.0.0.1")
    app = create_app(client, token=token, loopback_only=loopback, **app_options)
    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2, ws="none", http=GuardedH11Protocol,
                            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5,
                            # The peer is the socket's: X-Forwarded-For from anyone would let a
                            # guesser pick a fresh address for the failure throttle (auth.py).
                            proxy_headers=False, server_header=False)
    server = _ThreadServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="spoolq-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise AddressInUse(f"the HTTP server on {host}:{port} failed to start (see the log)")
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return HttpHandle(server, thread, sock, app)
