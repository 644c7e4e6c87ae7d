"""The line intake (isq's producers, seed 000; spec B): ``spoolq serve --intake-port P``.

``echo "mail alice@example.com" | nc 127.0.0.1 P`` enqueues a message in ``mail`` with
``param1`` = ``alice@example.com`` (docs/intake.md):

- a line is ``QUEUE MESSAGE``: the first word names the queue, the rest of the line (after
  one space) is the message (isq kept only the second word); many lines per connection
  (isq took one);
- the lines one read brings are stored together, per queue, with one group commit
  (``send_many``): each is durable before it is acknowledged;
- ``:ack`` turns on an answer per line, ``ok <full id>``; without it a good line gets no
  answer (isq's producers do not read). A bad line (no message, no such queue, a DOWN
  queue, a message the store refuses) always gets ``fail <reason>``, and the connection and
  the listener go on. Empty lines are skipped, an empty connection enqueues nothing;
- lines, limits, slow readers and ``:auth`` off loopback: linesrv.py.

Sends block this thread only (an fsync per batch), never the daemon's loop.
"""

from __future__ import annotations

import logging

from ..client import Client as SpoolqClient
from ..errors import InvalidMessage, QueueNotFound, SpoolqError
from ..ids import QUEUE_NAME_RE
from .linesrv import Client, LineServer

log = logging.getLogger("spoolq.intake")

SRC = "intake"


class Intake(LineServer):
    name = "intake"

    def __init__(self, host: str, port: int, *, token: str | None, client: SpoolqClient,
                 trust_loopback: bool = True) -> None:
        super().__init__(host, port, token=token, trust_loopback=trust_loopback)
        self.client = client

    def handle(self, c: Client, lines: list[bytes]) -> None:
        # Per queue, in order: (index of the line, message); answers go out in line order.
        batches: dict[str, list[tuple[int, str]]] = {}
        answers: dict[int, bytes] = {}
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                answers[i] = b"fail the line is not UTF-8\n"
                continue
            if line == ":ack":
                c.ack = True
                answers[i] = b":ok ack\n"
                continue
            if line.startswith(":"):
                answers[i] = b":error unknown command (:ack, :auth)\n"
                continue
            queue, _, message = line.partition(" ")
            if not QUEUE_NAME_RE.match(queue):
                answers[i] = f"fail invalid queue name {queue[:80]!r}\n".encode()
            elif not message:
                answers[i] = f"fail no message after the queue name {queue}\n".encode()
            else:
                batches.setdefault(queue, []).append((i, message))
        for queue, items in batches.items():
            try:
                done = self._send(queue, items)
            except QueueNotFound:
                done = {i: (False, f"no such queue: {queue}") for i, _ in items}
            except SpoolqError as e:
                done = {i: (False, e.message) for i, _ in items}
            for i, (ok, text) in done.items():
                if not ok:
                    answers[i] = b"fail " + " ".join(text.split()).encode() + b"\n"
                elif c.ack:
                    answers[i] = f"ok {text}\n".encode()
        if answers:
            self.send(c, b"".join(answers[i] for i in sorted(answers)))

    def _send(self, queue: str, items: list[tuple[int, str]]) -> dict[int, tuple[bool, str]]:
        """Store ``items`` with one group commit; line index -> full id, or the reason it
        was refused. A message the store refuses is found by sending the batch one by one."""
        fields = [{"dest": queue, "src": SRC, "param1": m} for _, m in items]
        try:
            receipts = self.client.send_many(queue, fields)  # type: ignore[arg-type]
        except InvalidMessage:
            out: dict[int, tuple[bool, str]] = {}
            for (i, _), f in zip(items, fields, strict=True):
                try:
                    out[i] = (True, self.client.send(queue, **f).full_id)  # type: ignore[arg-type]
                except InvalidMessage as e:
                    out[i] = (False, e.message)
            return out
        return {i: (True, r.full_id) for (i, _), r in zip(items, receipts, strict=True)}
