"""The notifier (seed 002, the AnyEvent "Notifier"; spec D): ``spoolq serve --notify-port P``.

A TCP server, loopback by default, for telling other processes that something happened:

- every line a client sends goes to every *other* connected client (the ``lobby``, which each
  client is in from the start); a line of exactly ``quit`` or ``exit``, a 0x04 byte (Ctrl-D
  in telnet) or EOF disconnects that client only; nothing is kept, so a client that was not
  connected never gets a line;
- ``:join CHANNEL`` / ``:part CHANNEL`` subscribe to spoolq's own events, one JSON line each
  (spoolq/events.py): ``events`` (all), ``events.<queue>`` (one queue's), ``admin`` (admin
  state changes); ``:part lobby`` stops the chat lines; ``:channels`` lists one's channels.
  A line that starts with ``::`` is chat with one ``:`` taken off; any other line that starts
  with ``:`` is a command (an unknown one gets ``:error ...`` back);
- a client that does not read is dropped once 1 MiB waits for it, never slowing the others;
  a line longer than 64 KiB drops its sender;
- bound to a non-loopback address, a client from another host must first send
  ``:auth <token>`` (the daemon's HTTP token).

Lines go out with ``\\n``. It runs on its own thread with one selector; the daemon only
publishes events to it, which never blocks.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field

from ..events import EventBus, Subscription
from ..ids import QUEUE_NAME_RE

log = logging.getLogger("spoolq.notifier")

MAX_LINE = 64 * 1024
MAX_OUT = 1 << 20
LOBBY = "lobby"
READ = 65536


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
    channels: set[str] = field(default_factory=lambda: {LOBBY})
    closing: bool = False  # close once ``out`` is sent


def valid_channel(name: str) -> bool:
    if name in (LOBBY, "events", "admin"):
        return True
    return name.startswith("events.") and QUEUE_NAME_RE.match(name[len("events."):]) is not None


class Notifier:
    def __init__(self, host: str, port: int, *, token: str | None, bus: EventBus | None) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.bus = bus
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._sub: Subscription | None = None
        self._thread: threading.Thread | None = None
        self.srv: socket.socket | None = None

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
        if self.bus is not None:
            self._sub = self.bus.subscribe(maxlen=10000, wake=self._wake)
        self._thread = threading.Thread(target=self._run, name="spoolq-notifier", daemon=True)
        self._thread.start()
        log.info("notifier listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        if self._sub is not None:
            self._sub.close()
        for c in list(self.clients.values()):
            self._drop(c, None)
        if self.srv is not None:
            self.sel.unregister(self.srv)
            self.srv.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.sel.close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake is pending already

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, mask in self.sel.select(1.0):
                try:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                        self._events()
                    else:
                        c = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(c)
                        if mask & selectors.EVENT_WRITE and c.sock.fileno() >= 0:
                            self._flush(c)
                except Exception:  # noqa: BLE001 - one client's trouble must not stop the server
                    log.exception("notifier: unexpected error")

    # -- clients -------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self.srv is not None
        for _ in range(64):
            try:
                sock, addr = self.srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving those connected
                log.warning("notifier: cannot accept: %s", e)
                return
            sock.setblocking(False)
            peer = str(addr[0])
            c = Client(sock, peer, authed=self.token is None or is_loopback_addr(peer))
            self.clients[sock.fileno()] = c
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _drop(self, c: Client, why: str | None) -> None:
        if why:
            log.info("notifier: dropped %s: %s", c.peer, why)
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
        except OSError:
            data = b""
        if not data:  # EOF: a last line without its newline still counts
            if c.inbuf:
                self._line(c, bytes(c.inbuf))
            self._drop(c, None)
            return
        ctrl_d = data.find(b"\x04")
        if ctrl_d >= 0:
            data = data[:ctrl_d]
        c.inbuf += data
        while True:
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                break
            line = bytes(c.inbuf[:nl]).rstrip(b"\r")
            del c.inbuf[:nl + 1]
            if not self._line(c, line) or c.sock.fileno() < 0:
                return
        if ctrl_d >= 0:
            self._drop(c, None)
        elif len(c.inbuf) > MAX_LINE:
            self._send(c, b":error line longer than 64 KiB\n")
            self._drop(c, "line too long")

    def _line(self, c: Client, line: bytes) -> bool:
        """Handle one line; False when the client is gone."""
        if not c.authed:
            word, _, secret = line.partition(b" ")
            if word == b":auth" and self.token is not None and hmac.compare_digest(secret, self.token.encode()):
                c.authed = True
                return self._send(c, b":ok authenticated\n")
            self._send(c, b":error send :auth <token> first\n")
            self._drop(c, "no token")
            return False
        if line in (b"quit", b"exit"):
            self._drop(c, None)
            return False
        if line.startswith(b"::"):
            line = line[1:]
        elif line.startswith(b":"):
            return self._command(c, line.decode("utf-8", "replace"))
        out = line + b"\n"
        for other in list(self.clients.values()):
            if other is not c and LOBBY in other.channels and other.authed:
                self._send(other, out)
        return True

    def _command(self, c: Client, line: str) -> bool:
        word, _, arg = line.partition(" ")
        arg = arg.strip()
        if word in (":join", ":part"):
            if not valid_channel(arg):
                return self._send(c, f":error no channel {arg!r}: lobby, events, events.<queue>, admin\n".encode())
            if word == ":join":
                c.channels.add(arg)
            else:
                c.channels.discard(arg)
            return self._send(c, f":ok {word[1:]} {arg}\n".encode())
        if word == ":channels":
            return self._send(c, (":ok " + " ".join(sorted(c.channels)) + "\n").encode())
        return self._send(c, b":error unknown command (:join, :part, :channels; '::' starts a chat line with ':')\n")

    def _send(self, c: Client, data: bytes) -> bool:
        """Queue ``data`` for ``c``; a client with more than MAX_OUT waiting is dropped."""
        if c.sock.fileno() < 0:
            return False
        if len(c.out) + len(data) > MAX_OUT:
            self._drop(c, "too slow: 1 MiB waiting")
            return False
        was_empty = not c.out
        c.out += data
        if was_empty:
            return self._flush(c)
        return True

    def _flush(self, c: Client) -> bool:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(c, None)
            return False
        del c.out[:n]
        try:
            self.sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0), c)
        except (KeyError, ValueError):
            return False
        return True

    # -- spoolq's events -----------------------------------------------------------------
    def _events(self) -> None:
        if self._sub is None:
            return
        for ev in self._sub.drain():
            queue = ev.get("queue")
            chans = {"events", f"events.{queue}"} | ({"admin"} if ev.get("event") == "admin" else set())
            line: bytes | None = None
            for c in list(self.clients.values()):
                hit = c.channels & chans
                if hit and c.authed:
                    if line is None:
                        line = (json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
                    self._send(c, line)

