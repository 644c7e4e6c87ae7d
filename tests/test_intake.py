"""The line intake (isq's producers, spec B; docs/intake.md): ``spoolq serve --intake-port P``
with real sockets and real ``nc`` against a real daemon."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_util import Served, free_port, wait_for

import spoolq
from spoolq.model import State


@pytest.fixture
def intake(root: Path, client: spoolq.Client) -> Iterator[int]:
    client.create_queue("mail", script="/bin/true")
    client.set_admin_state("mail", "pause")  # what arrives stays where the test can read it
    port = free_port()
    s = Served(root, "--intake-port", str(port), "--no-builtin-queues").start()
    try:
        yield port
    finally:
        s.stop()


def talk(port: int, data: bytes, *, answers: int = 0) -> list[bytes]:
    """Send ``data``, read ``answers`` lines, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while buf.count(b"\n") < answers:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.splitlines()


def queued(client: spoolq.Client) -> list[str]:
    return sorted(v.message.param1 for v in client.list("mail", State.QUE, limit=1000).items)


def test_isqs_producer_with_nc(intake: int, client: spoolq.Client) -> None:
    """B.3 #7, as isq's users run it: one line through nc enqueues the message."""
    if shutil.which("nc") is None:
        pytest.skip("nc is not installed (scripts/bootstrap.sh test installs netcat-openbsd)")
    subprocess.run(f"echo 'mail alice@example.com' | nc -q0 127.0.0.1 {intake}", shell=True, check=True,
                   timeout=30)
    wait_for(lambda: queued(client) == ["alice@example.com"], 10, "the message")
    (v,) = client.list("mail", State.QUE).items
    assert (v.message.src, v.message.dest) == ("intake", "mail")


def test_many_lines_acked_in_order_and_durable(intake: int, client: spoolq.Client) -> None:
    lines = b":ack\n" + b"".join(b"mail message %d with  two  spaces\r\n" % i for i in range(50))
    answers = talk(intake, lines, answers=51)
    assert answers[0] == b":ok ack"
    ids = [a.split()[1].decode() for a in answers[1:]]
    assert all(a.startswith(b"ok http") for a in answers[1:]) and len(set(ids)) == 50
    # Acknowledged means stored: each id is there, in order, its message whole.
    got = [client.get(f"mail/{i.rsplit('/', 1)[1]}").message.param1 for i in ids]
    assert got == [f"message {i} with  two  spaces" for i in range(50)]


def test_bad_lines_get_fail_and_the_connection_goes_on(intake: int, client: spoolq.Client) -> None:
    client.create_queue("stopped", script="/bin/true")
    client.set_admin_state("stopped", "down")
    lines = (b"nosuch hello\n"  # no such queue
             b"mail\n"  # no message
             b"../etc x\n"  # not a queue name
             b"mail \xff\xfe\n"  # not UTF-8
             b"stopped hi\n"  # DOWN
             b"mail nul\x00inside\n"  # the store refuses a NUL
             b"\n"  # skipped
             b":ack\n"
             b"mail after all that\n")
    answers = talk(intake, lines, answers=8)
    assert answers[0] == b"fail no such queue: nosuch"
    assert answers[1] == b"fail no message after the queue name mail"
    assert answers[2].startswith(b"fail invalid queue name")
    assert answers[3] == b"fail the line is not UTF-8"
    assert answers[4].startswith(b"fail") and b"DOWN" in answers[4]
    assert answers[5].startswith(b"fail") and len(answers[5].splitlines()) == 1
    assert answers[6] == b":ok ack"
    assert answers[7].startswith(b"ok http")
    assert queued(client) == ["after all that"]


def test_an_empty_connection_enqueues_nothing_and_the_listener_goes_on(intake: int, client: spoolq.Client) -> None:
    """B.3 #7: an empty connection enqueues nothing, and the listener keeps serving (also
    after a connection reset mid-line)."""
    assert talk(intake, b"") == []
    with socket.create_connection(("127.0.0.1", intake), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(b"mail half a li")  # then an RST: a line without its end is no message
    talk(intake, b"mail last line without a newline")  # at EOF it counts
    wait_for(lambda: queued(client) == ["last line without a newline"], 10, "the message")


def test_a_line_too_long_drops_only_its_sender(intake: int, client: spoolq.Client) -> None:
    answers = talk(intake, b"mail " + b"x" * (70 * 1024), answers=1)
    assert answers == [b":error line longer than 64 KiB"]
    assert talk(intake, b":ack\nmail fine\n", answers=2)[1].startswith(b"ok ")
    assert queued(client) == ["fine"]


@pytest.mark.parametrize("level", ["none", "read"])
def test_with_anonymous_none_or_read_loopback_clients_need_the_token(root: Path, client: spoolq.Client,
                                                                      level: str) -> None:
    """As over HTTP: where a request without the token may not send messages, neither may a
    loopback line client that has not sent :auth (the notifier follows --anonymous none)."""
    client.create_queue("mail", script="/bin/true")
    client.set_admin_state("mail", "pause")
    port, nport = free_port(), free_port()
    s = Served(root, "--intake-port", str(port), "--notify-port", str(nport), "--anonymous", level,
               "--no-builtin-queues").start()
    try:
        token = (root / "token").read_text().strip()
        assert talk(port, b"mail sneaky\n", answers=1)[0].startswith(b":error send :auth")
        got = talk(port, b":auth " + token.encode() + b"\n:ack\nmail allowed\n", answers=3)
        assert got[0] == b":ok authenticated" and got[-1].startswith(b"ok ")
        assert queued(client) == ["allowed"]
        if level == "none":  # (under read, the notifier's events are readable, as GETs are)
            assert talk(nport, b"hello\n", answers=1)[0].startswith(b":error send :auth")
    finally:
        s.stop()
    # the default (rq) trusts loopback, as RQ's HTTP routes do
    s = Served(root, "--intake-port", str(port), "--no-builtin-queues").start()
    try:
        assert talk(port, b":ack\nmail trusted\n", answers=2)[-1].startswith(b"ok ")
    finally:
        s.stop()
