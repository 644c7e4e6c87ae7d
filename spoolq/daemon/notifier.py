"""The notifier (seed 002, the AnyEvent "Notifier"; spec D): ``spoolq serve --notify-port P``.

A TCP server, loopback by default, for telling other processes that something happened
(docs/notifier.md):

- every line a client sends goes to every *other* connected client (the ``lobby``, which each
  client is in from the start); a line of exactly ``quit`` or ``exit``, a 0x04 byte (Ctrl-D
  in telnet) or EOF disconnects that client only; nothing is kept, so a client that was not
  connected never gets a line;
- ``:join CHANNEL`` / ``:part CHANNEL`` subscribe to spoolq's own events, one JSON line each
  (spoolq/events.py): ``events`` (all), ``events.<queue>`` (one queue's), ``admin`` (admin
  state changes); ``:part lobby`` stops the chat lines; ``:channels`` lists one's channels.
  A line that starts with ``::`` is chat with one ``:`` taken off; any other line that starts
  with ``:`` is a command (an unknown one gets ``:error ...`` back).

Lines, limits, slow clients and ``:auth`` off loopback: linesrv.py. The daemon only
publishes events to it, which never blocks.
"""

from __future__ import annotations

import json

from ..events import EventBus, Subscription
from ..ids import QUEUE_NAME_RE
from .linesrv import Client, LineServer

LOBBY = "lobby"


def valid_channel(name: str) -> bool:
    if name in (LOBBY, "events", "admin"):
        return True
    return name.startswith("events.") and QUEUE_NAME_RE.match(name[len("events."):]) is not None


class Notifier(LineServer):
    name = "notifier"

    def __init__(self, host: str, port: int, *, token: str | None, bus: EventBus | None,
                 trust_loopback: bool = True) -> None:
        super().__init__(host, port, token=token, trust_loopback=trust_loopback)
        self.bus = bus
        self._sub: Subscription | None = None

    def start(self) -> None:
        if self.bus is not None:
            self._sub = self.bus.subscribe(maxlen=10000, wake=self.wake)
        super().start()

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.close()
        super().stop()

    def new_client(self, c: Client) -> None:
        c.channels.add(LOBBY)

    def handle(self, c: Client, lines: list[bytes]) -> None:
        for line in lines:
            if c.gone:
                return
            if line in (b"quit", b"exit"):
                self.drop(c, None)
                return
            if line.startswith(b"::"):
                line = line[1:]
            elif line.startswith(b":"):
                self._command(c, line.decode("utf-8", "replace"))
                continue
            out = line + b"\n"
            for other in list(self.clients.values()):
                if other is not c and LOBBY in other.channels and other.authed:
                    self.send(other, out)

    def _command(self, c: Client, line: str) -> None:
        word, _, arg = line.partition(" ")
        arg = arg.strip()
        if word in (":join", ":part"):
            if not valid_channel(arg):
                self.send(c, f":error no channel {arg!r}: lobby, events, events.<queue>, admin\n".encode())
                return
            if word == ":join":
                c.channels.add(arg)
            else:
                c.channels.discard(arg)
            self.send(c, f":ok {word[1:]} {arg}\n".encode())
        elif word == ":channels":
            self.send(c, (":ok " + " ".join(sorted(c.channels)) + "\n").encode())
        else:
            self.send(c, b":error unknown command (:join, :part, :channels; '::' starts a chat line with ':')\n")

    def on_wake(self) -> None:
        """spoolq's events, to the clients on their channels."""
        if self._sub is None:
            return
        for ev in self._sub.drain():
            queue = ev.get("queue")
            chans = {"events", f"events.{queue}"} | ({"admin"} if ev.get("event") == "admin" else set())
            line: bytes | None = None
            for c in list(self.clients.values()):
                if c.channels & chans and c.authed:
                    if line is None:
                        line = (json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
                    self.send(c, line)
