"""A small TCP line server on its own thread, one selector: what the notifier
(notifier.py) and the line intake (intake.py) share.

Each client's lines (``\\n``-terminated, a ``\\r`` before it dropped) go to :meth:`handle`;
a last line without its newline counts at EOF (not after a reset); a 0x04 byte (Ctrl-D
in telnet) ends the connection after the complete lines before it. A line longer than 64 KiB drops its sender.
Output is buffered per client: one with more than 1 MiB waiting is dropped, so a client
that does not read never slows the others. Bound off loopback, a client from anywhere but
loopback must send ``:auth <token>`` first, within :data:`AUTH_WITHIN` seconds. At most
:data:`MAX_CLIENTS` are connected at once (more are told so and closed); when the process
runs out of file descriptors, the server stops accepting for a second instead of spinning.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("spoolq.linesrv")

MAX_LINE = 64 * 1024
MAX_OUT = 1 << 20
READ = 65536
MAX_CLIENTS = 512
"""Clients connected at once, per server: each holds a file descriptor the daemon's scripts
need too, and up to a line of input."""
AUTH_WITHIN = 10.0
"""Seconds a client that must send ``:auth`` has to do it: idle strangers hold no fds."""
ACCEPT_PAUSE = 1.0
"""Seconds without accepting after accept(2) failed (EMFILE): the listener stays readable."""


def is_loopback_addr(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(eq=False)
class Client:
    sock: socket.socket
    peer: str
    authed: bool
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    channels: set[str] = field(default_factory=set)  # the notifier's
    ack: bool = False  # the intake's
    since: float = field(default_factory=time.monotonic)  # connected at

    @property
    def gone(self) -> bool:
        return self.sock.fileno() < 0


class LineServer:
    name = "line server"

    def __init__(self, host: str, port: int, *, token: str | None, trust_loopback: bool = True) -> None:
        self.host = host
        self.port = port
        self.token = token
        # False (serve --anonymous none, or read for the intake): loopback clients send
        # :auth <token> first too, as HTTP requests without the token get nothing there
        self.trust_loopback = trust_loopback
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.srv: socket.socket | None = None
        self._accept_at: float | None = None  # accepting again then (after EMFILE)
        self._tidy_at = 0.0  # the next look for clients that did not authenticate in time

    # -- to be filled in -----------------------------------------------------------------
    def new_client(self, c: Client) -> None:
        """A client connected."""

    def handle(self, c: Client, lines: list[bytes]) -> None:
        """The complete lines one read brought (in order); called with the client authed."""

    def on_wake(self) -> None:
        """Another thread called :meth:`wake`."""

    # -- life ----------------------------------------------------------------------------
    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.host, self.port))
        srv.listen(128)
        srv.setblocking(False)
        self.srv = srv
        self.port = srv.getsockname()[1]
        self.sel.register(srv, selectors.EVENT_READ, "accept")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"spoolq-{self.name}", daemon=True)
        self._thread.start()
        log.info("%s listening on %s:%d", self.name, self.host, self.port)

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(5)
        for c in list(self.clients.values()):
            self.drop(c, None)
        if self.srv is not None:
            self.sel.unregister(self.srv)
            self.srv.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.sel.close()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # a wake is pending already (or we are stopping)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._tidy(time.monotonic())
            for key, mask in self.sel.select(1.0 if self._accept_at is None else ACCEPT_PAUSE / 4):
                try:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                        self.on_wake()
                    else:
                        c = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(c)
                        if mask & selectors.EVENT_WRITE and not c.gone:
                            self._flush(c)
                except Exception:  # noqa: BLE001 - one client's trouble must not stop the server
                    log.exception("%s: unexpected error", self.name)

    # -- clients -------------------------------------------------------------------------
    def _tidy(self, now: float) -> None:
        """Accept again after a pause; drop clients that did not send ``:auth`` in time."""
        if self._accept_at is not None and now >= self._accept_at and self.srv is not None:
            self._accept_at = None
            self.sel.register(self.srv, selectors.EVENT_READ, "accept")
        if now < self._tidy_at:
            return
        self._tidy_at = now + 0.5
        for c in [c for c in self.clients.values() if not c.authed and now - c.since > AUTH_WITHIN]:
            self.send(c, b":error send :auth <token> first\n")
            self.drop(c, f"no :auth within {AUTH_WITHIN:g} s")

    def _accept(self) -> None:
        assert self.srv is not None
        for _ in range(64):
            try:
                sock, addr = self.srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving those connected
                # The pending connection stays, and the listener readable: without a pause
                # this loop would spin (and log) as fast as it can.
                log.warning("%s: cannot accept: %s; not accepting for %g s", self.name, e, ACCEPT_PAUSE)
                self.sel.unregister(self.srv)
                self._accept_at = time.monotonic() + ACCEPT_PAUSE
                return
            if len(self.clients) >= MAX_CLIENTS:
                try:
                    sock.send(b":error too many connections\n")
                except OSError:
                    pass
                sock.close()
                log.warning("%s: refused %s: %d clients connected already", self.name, addr[0], MAX_CLIENTS)
                continue
            sock.setblocking(False)
            peer = str(addr[0])
            c = Client(sock, peer, authed=self.token is None or (self.trust_loopback and is_loopback_addr(peer)))
            self.clients[sock.fileno()] = c
            self.sel.register(sock, selectors.EVENT_READ, c)
            self.new_client(c)

    def drop(self, c: Client, why: str | None) -> None:
        if c.gone:
            return
        if why:
            log.info("%s: dropped %s: %s", self.name, c.peer, why)
        self.clients.pop(c.sock.fileno(), None)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _read(self, c: Client) -> None:
        try:
            data = c.sock.recv(READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # a reset: the sender gave up, its unfinished line with it
            self.drop(c, None)
            return
        if not data:  # EOF: a last line without its newline still counts
            if c.inbuf:
                self._lines(c, [bytes(c.inbuf).rstrip(b"\r")])
            self.drop(c, None)
            return
        ctrl_d = data.find(b"\x04")
        if ctrl_d >= 0:
            data = data[:ctrl_d]
        c.inbuf += data
        lines: list[bytes] = []
        too_long = False
        while (nl := c.inbuf.find(b"\n")) >= 0:
            if nl > MAX_LINE:  # complete, but begun in an earlier read: as long a line all the same
                too_long = True
                break
            lines.append(bytes(c.inbuf[:nl]).rstrip(b"\r"))
            del c.inbuf[:nl + 1]
        if lines:
            self._lines(c, lines)
        if c.gone:
            return
        if too_long or len(c.inbuf) > MAX_LINE:
            self.send(c, b":error line longer than 64 KiB\n")
            self.drop(c, "line too long")
        elif ctrl_d >= 0:
            self.drop(c, None)

    def _lines(self, c: Client, lines: list[bytes]) -> None:
        while lines and not c.authed:
            word, _, secret = lines.pop(0).partition(b" ")
            if word == b":auth" and self.token is not None and hmac.compare_digest(secret, self.token.encode()):
                c.authed = True
                self.send(c, b":ok authenticated\n")
            else:
                self.send(c, b":error send :auth <token> first\n")
                self.drop(c, "no token")
                return
        if lines:
            self.handle(c, lines)

    def send(self, c: Client, data: bytes) -> bool:
        """Queue ``data`` for ``c``; a client with more than MAX_OUT waiting is dropped."""
        if c.gone:
            return False
        if len(c.out) + len(data) > MAX_OUT:
            self.drop(c, "too slow: 1 MiB waiting")
            return False
        was_empty = not c.out
        c.out += data
        return self._flush(c) if was_empty else True

    def _flush(self, c: Client) -> bool:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.drop(c, None)
            return False
        del c.out[:n]
        try:
            self.sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0), c)
        except (KeyError, ValueError):
            return False
        return True
