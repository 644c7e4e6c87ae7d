"""The ``cleaner`` queue's script: retention, RQ's way (rq-spec 5.3, RQ's
``default_scripts/cleaner/cleaner_script.rb``), through the store's own API, so it works on
both stores and with a million messages (it walks ids page by page from the cutoff, oldest
last, and deletes them a thousand at a time).

A message's ``param1`` names a queue, or ``ALLQUEUES``; ``param2`` is the days to keep (a
whole number; 3 when absent, RQ's default). For each queue it deletes the messages whose id
(their creation time, as RQ's day directories) is older than that, in:

- ``done`` and ``relayed``;
- ``err``, **acknowledged** errors only (unacknowledged ones stay until someone looks);
- ``prep``: two-phase sends never committed (a relay killed between a far prep and the
  record of its id leaves one at the far end).

Nothing waiting or running is touched. It ends ``done removed N messages`` with the count per
queue in its log; a missing ``param1``, an unknown queue or a bad ``param2`` ends in err.
RQ's differences: every digit of ``param2`` counts (RQ read only the first), errors and
everything else use the same N days (RQ kept errors a day longer), and RQ's ``queue.log``
rotation has nothing to rotate here.
"""

from __future__ import annotations

import os
import re
import sys
import time

from spoolq import open as open_store
from spoolq.client import Client
from spoolq.errors import SpoolqError
from spoolq.ids import id_prefix
from spoolq.model import State

DEFAULT_DAYS = 3
PAGE = 1000
ALL = "ALLQUEUES"


def status(line: str) -> None:
    os.write(3, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    print(f"{os.getpid()} - {time.strftime('%Y-%m-%d %H:%M:%S')} - {line}", flush=True)


def days_of(param2: str) -> int:
    if not param2.strip():
        return DEFAULT_DAYS
    if not re.fullmatch(r"\s*\d{1,5}\s*", param2):
        raise ValueError(f"param2 must be a whole number of days to keep, not {param2!r}")
    return int(param2)


def clean(client: Client, queue: str, cutoff: float) -> dict[str, int]:
    """Delete what ``queue`` holds from before ``cutoff`` (epoch seconds); counts per state."""
    if cutoff <= 0:  # more days kept than since 1970 (a traceback, audit): nothing is that old
        return {}
    cursor0 = f"{id_prefix(cutoff)}.0"  # ids older than this one: created before the cutoff
    removed: dict[str, int] = {}
    for state in (State.DONE, State.RELAYED, State.ERR, State.PREP):
        cursor: str | None = cursor0
        n = 0
        while cursor is not None:
            page = client.find_ids(queue, state, cursor=cursor, limit=PAGE)
            if page.ids:
                # Only what is still in this state (err: acknowledged) goes, checked by the
                # store as it deletes: a message retried or committed meanwhile stays.
                failed = client.delete_many(queue, page.ids, state=state,
                                            acked=True if state == State.ERR else None)
                n += len(page.ids) - len(failed)
            cursor = page.next_cursor
        if n:
            removed[str(state)] = n
    return removed


def main() -> int:
    target = os.environ.get("RQ_PARAM1", "").strip()
    try:
        days = days_of(os.environ.get("RQ_PARAM2", ""))
    except ValueError as e:
        status(f"err {e}")
        return 1
    if not target:
        status("err param1 must name a queue, or ALLQUEUES")
        return 1
    where = os.environ.get("SPOOLQ_STORE") or os.environ["SPOOLQ_ROOT"]
    try:
        client = open_store(where)
        queues = client.queues()
    except SpoolqError as e:
        # On PostgreSQL scripts get the store's URL without its password: the daemon's user
        # needs it in ~/.pgpass or PGPASSWORD (docs/builtin-queues.md).
        status(f"err cannot open the store {where}: {e}")
        return 1
    if target != ALL and target not in queues:
        status(f"err no such queue: {target}")
        return 1
    cutoff = time.time() - days * 86400
    total = 0
    for q in queues if target == ALL else [target]:
        print(f"status: processing {q}", flush=True)
        removed = clean(client, q, cutoff)
        for state, n in removed.items():
            print(f"status: {q}: removed {n} {state} message(s) older than {days} day(s)", flush=True)
        total += sum(removed.values())
    status(f"done removed {total} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
