"""A queue's start-up recount while the daemon moves its messages (issue 9: a restart with
a million queued dispatches before the walk of them is done).

A recount rebuilds ``counts`` from a walk of the queue's tree under the counts lock (I8),
so producers wait for it and the file it writes is exact for the moment it ends. The
daemon's own moves cannot wait that long (seconds for a million messages) and need not:
the daemon knows each one. While a :class:`LiveRecount` of a queue is open, every move the
daemon makes in that queue happens under the recount's lock and is numbered in the same
sequence as the walk's listing of each bucket directory. At the end, for each such move of
a message from bucket B of state S to bucket B of state D (a message keeps its bucket):

* the walk counted it in S iff it listed S/B before the move: only then is S's ``-1``
  added (otherwise the walk never saw it there, or saw it only after it had left);
* the walk counted it in D iff it listed D/B after the move: only then is D's ``+1``
  dropped (a bucket the walk never listed did not exist when its parent was listed, so
  nothing in it was counted).

A chain of moves of one message (que -> run -> done during the walk) adds up: each link is
judged by its own number. Deltas the daemon gathered before the recount was opened are
dropped (the walk sees their moves); moves after it is closed are gathered as usual.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .layout import count_tree, message_dirs


class LiveRecount:
    """The bookkeeping of one queue's recount beside the daemon's moves of its messages."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # a listing of a bucket, or one move
        self.seq = 0
        self.listed: dict[tuple[str, str], int] = {}  # (state dir, "day/HHMM/SS") -> its listing's number
        self.moves: list[tuple[int, str, dict[str, int]]] = []  # (number, bucket, deltas)
        self.closed = False

    def moved(self, msg_id: str, deltas: dict[str, int]) -> None:
        """A move of ``msg_id`` with these counts deltas (call holding ``lock``)."""
        self.seq += 1
        self.moves.append((self.seq, bucket_key(msg_id), deltas))

    def walk(self, qdir: Path) -> dict[str, int]:
        """The counts of the tree, each bucket listed under ``lock`` and numbered."""

        def names_of(bdir: Path) -> list[str]:
            with self.lock:
                names = list(message_dirs(bdir))
                self.seq += 1
                self.listed[(bdir.parent.parent.parent.name, bucket_key_of(bdir))] = self.seq
            return names

        return count_tree(qdir, names_of)

    def adjustments(self) -> dict[str, int]:
        """What the daemon's moves during the walk add to its counts (call holding ``lock``)."""
        out: dict[str, int] = {}
        for seq, bucket, deltas in self.moves:
            for key, v in deltas.items():
                state = "err" if key == "err_acked" else key
                listed = self.listed.get((state, bucket))
                if v < 0:
                    keep = listed is not None and listed < seq  # the walk counted it there
                else:
                    keep = listed is None or listed < seq  # the walk did not count it there
                if keep:
                    out[key] = out.get(key, 0) + v
        return out


def bucket_key(msg_id: str) -> str:
    return f"{msg_id[0:8]}/{msg_id[9:13]}/{msg_id[14:16]}"


def bucket_key_of(bdir: Path) -> str:
    """:func:`bucket_key` of a bucket directory (``<state>/<day>/<HHMM>/<SS>``)."""
    return f"{bdir.parent.parent.name}/{bdir.parent.name}/{bdir.name}"
