"""Which dispatch process owns a message, when ``spoolq serve --dispatchers K`` runs K of them.

A queue is either *split* (persistent workers with nothing that spans messages: each
message belongs to process ``crc32(id) % K``) or *whole* (every other queue: process 0,
the main one, owns it all). Which queues are split is decided once, when ``serve``
starts, and handed to every process, so ownership is a pure function that no process has
to ask another about (docs/plans/sharded-dispatch.md).

A claim needs no ownership: it is a rename out of ``que/``, and only one rename wins.
Ownership decides what a process does to messages it did not claim: which ones it
indexes (and so tries to claim), which ``run/`` entries it recovers as a dead holder's,
and which kicks it consumes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import QueueConfig

MAX_DISPATCHERS = 16


def splittable(cfg: QueueConfig, count: int) -> bool:
    """Can ``count`` processes share this queue's messages? Persistent workers only, at
    least one worker per process, and no rule that compares messages with each other or
    counts them over the queue (``blocking_params``, ``coalesce_params``,
    ``cluster_workers``)."""
    return (count > 1 and cfg.kind == "worker" and cfg.num_workers >= count and not cfg.blocking_params
            and not cfg.coalesce_params and cfg.cluster_workers is None)


@dataclass(frozen=True)
class Part:
    """Process ``index`` of ``count``; ``split``: the queues shared by message."""

    index: int = 0
    count: int = 1
    split: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_DISPATCHERS or not 0 <= self.index < self.count:
            raise ValueError(f"dispatch process {self.index} of {self.count}: out of range")

    @property
    def main(self) -> bool:
        return self.index == 0

    def serves(self, queue: str) -> bool:
        """Does this process dispatch ``queue`` at all?"""
        return self.index == 0 or queue in self.split

    def owns(self, queue: str, msg_id: str) -> bool:
        if queue in self.split:
            return zlib.crc32(msg_id.encode()) % self.count == self.index
        return self.index == 0

    def workers(self, queue: str, num_workers: int) -> int:
        """This process's share of a queue's ``num_workers`` (all of it for a whole queue)."""
        if queue not in self.split:
            return num_workers
        return num_workers // self.count + (1 if self.index < num_workers % self.count else 0)

    def arg(self) -> str:
        """The helper's command-line form (``serve --dispatch-part``)."""
        return f"{self.index}/{self.count}:{','.join(sorted(self.split))}"

    @classmethod
    def parse(cls, text: str) -> Part:
        where, _, names = text.partition(":")
        i, _, k = where.partition("/")
        return cls(int(i), int(k), frozenset(n for n in names.split(",") if n))


def part_of(pid: int) -> Part | None:
    """The part a running dispatch helper serves, from its command line
    (``--dispatch-part``); None if ``pid`` is not one, or its command line is unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return Part.parse(argv[argv.index(b"--dispatch-part") + 1].decode())
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


WHOLE = Part()
"""One dispatch process: it owns everything."""
