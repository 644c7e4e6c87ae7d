"""The notifier (spec D, docs/notifier.md): ``spoolq serve --notify-port P``, with real
sockets against a real daemon: D's checks 1-4, many clients, abrupt disconnects, a client
that does not read, and spoolq's own events on channels."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_util import Served, free_port, wait_for

import spoolq
from spoolq.model import State


class Peer:
    """One nc-like client: send lines, read lines with a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; had {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def nothing(self, wait: float = 0.3) -> bool:
        """True when no line arrives within ``wait`` (the server sent this client nothing)."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return self.buf == b""
        self.buf += chunk
        return False

    def closed(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(root: Path) -> Iterator[tuple[Served, int]]:
    port = free_port()
    s = Served(root, "--notify-port", str(port)).start()
    try:
        yield s, port
    finally:
        s.stop()


def connect(port: int, n: int) -> list[Peer]:
    peers = [Peer(port) for _ in range(n)]
    # Everyone is in: a line from the last reaches all the others.
    peers[-1].send(b"hello\n")
    for p in peers[:-1]:
        assert p.line() == b"hello"
    return peers


def test_a_line_goes_to_every_other_client_once(notify: tuple[Served, int]) -> None:
    """D.1: with three clients, a line from client 1 arrives once at 2 and 3, not at 1."""
    one, two, three = connect(notify[1], 3)
    one.send(b"files ready: /srv/in/batch-7\r\n")
    assert two.line() == three.line() == b"files ready: /srv/in/batch-7"
    assert one.nothing() and two.nothing() and three.nothing()


@pytest.mark.parametrize("goodbye", [b"quit\n", b"exit\r\n", b"\x04", b"half a line\x04", None])
def test_each_goodbye_disconnects_only_that_client(notify: tuple[Served, int], goodbye: bytes | None) -> None:
    """D.2: quit, exit, Ctrl-D and EOF each disconnect only that client."""
    one, two, three = connect(notify[1], 3)
    if goodbye is None:
        one.sock.shutdown(socket.SHUT_WR)  # EOF
    else:
        one.send(goodbye)
    assert one.closed()
    two.send(b"still here\n")
    assert three.line() == b"still here"


def test_a_late_client_gets_nothing_old(notify: tuple[Served, int]) -> None:
    """D.3: no persistence."""
    one, two = connect(notify[1], 2)
    one.send(b"before\n")
    assert two.line() == b"before"
    late = Peer(notify[1])
    late.send(b"hi\n")  # once the others hear it, the server has taken the new connection
    assert one.line() == two.line() == b"hi"
    one.send(b"after\n")
    assert late.line() == b"after" and two.line() == b"after"  # its first line: "before" never came


def test_abrupt_drops_and_many_clients(notify: tuple[Served, int]) -> None:
    """D.4 with 60 clients: ten reset their connections mid-stream; the server goes on and
    the rest get every line."""
    peers = connect(notify[1], 60)
    for p in peers[:10]:
        p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        p.close()  # an RST, not a FIN
    sender, rest = peers[-1], peers[10:-1]
    for i in range(20):
        sender.send(b"line %d\n" % i)
    for p in rest:
        assert [p.line() for _ in range(20)] == [b"line %d" % i for i in range(20)]
    assert notify[0].proc is not None and notify[0].proc.poll() is None


def test_a_client_that_does_not_read_is_dropped_not_waited_for(notify: tuple[Served, int]) -> None:
    peers = connect(notify[1], 3)
    stuck, sender, reader = peers
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = b"x" * 60000 + b"\n"
    for _ in range(300):  # 18 MB: more than the kernel's buffers and the 1 MiB limit
        sender.send(big)
        assert reader.line() == big[:-1]
    assert "too slow" in wait_for(lambda: notify[0].log() if "too slow" in notify[0].log() else "", 10,
                                  "the slow client dropped")


def test_commands_and_escapes(notify: tuple[Served, int]) -> None:
    one, two = connect(notify[1], 2)
    one.send(b":channels\n")
    assert one.line() == b":ok lobby"
    one.send(b"::colon first\n")
    assert two.line() == b":colon first"
    one.send(b":nope\n")
    assert one.line().startswith(b":error unknown command")
    one.send(b":join events.no/such\n")
    assert one.line().startswith(b":error no channel")
    one.send(b"x" * (70 * 1024))
    assert one.closed()


def test_events_on_channels(notify: tuple[Served, int], client: spoolq.Client) -> None:
    """spoolq's own events as JSON lines: a message's start and end, admin changes."""
    client.create_queue("mail", script="/bin/true")
    client.create_queue("other", script="/bin/true")
    watcher, everything = Peer(notify[1]), Peer(notify[1])
    watcher.send(b":part lobby\n:join events.mail\n")
    assert watcher.line() == b":ok part lobby" and watcher.line() == b":ok join events.mail"
    everything.send(b":join events\n")
    assert everything.line() == b":ok join events"
    client.send("other")
    r = client.send("mail", param1="x")
    assert client.wait(r, 30).state == State.DONE
    got = [json.loads(watcher.line()) for _ in range(2)]
    assert [(e["event"], e["queue"], e["msg_id"], e["state"]) for e in got] == [
        ("state", "mail", r.msg_id, "run"), ("state", "mail", r.msg_id, "done")]
    client.set_admin_state("mail", "pause")
    admin = json.loads(watcher.line())
    assert (admin["event"], admin["state"], admin["was"]) == ("admin", "PAUSE", "UP")
    queues: set[str] = set()
    deadline = time.monotonic() + 10
    while len(queues) < 2 and time.monotonic() < deadline:
        queues.add(json.loads(everything.line())["queue"])
    assert queues == {"mail", "other"}


def test_off_loopback_a_client_needs_the_token(root: Path) -> None:
    """Bound to a wildcard address, a client from another address must send :auth first.
    (Loopback peers are trusted, so the test checks the refusal through the address the
    host has on its own network, when it has one.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet goes out: it picks the route's source
            addr = probe.getsockname()[0]
        except OSError:
            addr = "127.0.0.1"
    if addr.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    port = free_port()
    s = Served(root, "--notify-port", str(port), "--notify-host", "0.0.0.0").start()  # noqa: S104
    try:
        token = (root / "token").read_text().strip()
        stranger = socket.create_connection((addr, port), timeout=10)
        stranger.sendall(b"hello\n")
        assert stranger.recv(1000).startswith(b":error send :auth")
        friend = Peer(port)
        known = socket.create_connection((addr, port), timeout=10)
        known.sendall(b":auth " + token.encode() + b"\n")
        assert known.recv(1000) == b":ok authenticated\n"
        known.sendall(b"from afar\n")
        assert friend.line() == b"from afar"
    finally:
        s.stop()


def test_the_same_events_on_sse(tmp_path: Path, root: Path, client: spoolq.Client) -> None:
    client.create_queue("mail", script="/bin/true")
    s = Served(root, "--trust-loopback", http=True).start()
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"GET /api/v1/events?queue=mail HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            buf = b""
            while b"event: queue" not in buf:  # the stream's first frame: it listens from here on
                buf += sock.recv(65536)
            r = client.send("mail")
            deadline = time.monotonic() + 20
            while b'"state":"done"' not in buf and time.monotonic() < deadline:
                buf += sock.recv(65536)
        assert b"event: message" in buf and f'"msg_id":"{r.msg_id}"'.encode() in buf
    finally:
        s.stop()

