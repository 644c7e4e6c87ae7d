"""A million messages in one PostgreSQL queue: what walks or counts messages, timed.

    ./bench/run pgscale [--quick] [--messages N] [--keep]

The project's rule: anything that walks all messages (searches, bulk actions, counts,
claims, recovery) is tried with 1,000,000 of them. One throwaway PostgreSQL cluster
(bench/pg.py's, durable), one queue, paused while it fills: N messages sent in batches of
1,000 (1 % with ``param2=acme``), the send rate printed per tenth so a slowdown shows. Then,
each timed once, in this order:

* ``counts`` (the first folds the fill's count deltas), ``recount`` (one statement over the
  rows), the newest page of the listing;
* searches: no match with the 20,000-message scan limit the API and UI use, no match over
  the whole state, the first 1,000 of the 1 % that match;
* the queue resumed: a claim, its finish, a reclaim with nothing expired;
* ``delete_many`` of the newest 10,000 (a bulk action's unit), ``counts`` again (checked
  against what was sent).

Writes bench/results/pgscale-<time>.json. ``--quick``: 100,000 messages.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import say  # noqa: E402
from bench.pg import BATCH, VENV_BIN, Cluster  # noqa: E402

SCAN_LIMIT = 20_000  # what one API/UI search request examines at most (spoolq.http)
BULK = 10_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 messages")
    ap.add_argument("--messages", type=int, default=None, help="messages in the queue (default 1,000,000)")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory (the cluster is stopped)")
    a = ap.parse_args(argv)
    n = a.messages or (100_000 if a.quick else 1_000_000)
    work = common.make_base(a.dir, "pgscale")
    result: dict[str, Any] = {
        **common.run_header("pgscale", argv, work),
        "messages": n, "timings_s": {}, "fill_per_s": [],
    }
    say(f"pgscale benchmark in {work}: {n:,} messages in one queue")
    cluster = Cluster(work)
    client: Any = None
    try:
        cluster.start()
        result["postgres"] = cluster.settings()
        url = cluster.create_database("spoolq")
        subprocess.run([str(VENV_BIN / "spoolq"), "--store", url, "db", "migrate"], check=True, capture_output=True)
        import spoolq
        from spoolq.model import State

        client = spoolq.open(url)
        store = client.store
        timings: dict[str, float] = result["timings_s"]

        def timed(label: str, fn: Callable[[], Any]) -> Any:
            t0 = time.perf_counter()
            out = fn()
            timings[label] = time.perf_counter() - t0
            say(f"  {label}: {timings[label]:.3f} s")
            return out

        client.create_queue("big", script="/bin/true", num_workers=2)
        client.set_admin_state("big", "PAUSE")
        tenth = max(BATCH, n // 10 // BATCH * BATCH)
        t0 = mark = time.perf_counter()
        for i in range(0, n, BATCH):
            client.send_many("big", [{"param1": str(j), "param2": "acme" if j % 100 == 0 else "x"}
                                     for j in range(i, min(n, i + BATCH))])
            if (i + BATCH) % tenth == 0 or i + BATCH >= n:
                now = time.perf_counter()
                rate = (min(n, i + BATCH) - (i + BATCH - tenth if (i + BATCH) % tenth == 0 else i)) / (now - mark)
                result["fill_per_s"].append(round(rate))
                say(f"  {min(n, i + BATCH):>9,} sent, {now - t0:6.1f} s, the last {tenth:,} at {rate:,.0f}/s")
                mark = now
        result["fill_total_per_s"] = n / (time.perf_counter() - t0)
        say(f"fill: {result['fill_total_per_s']:,.0f} msg/s")
        timed("counts (folds the fill's deltas)", lambda: client.counts("big"))
        timed("recount", lambda: client.recount("big"))
        timed("list, newest 50", lambda: client.list("big", "que", limit=50))
        page = timed(f"search, no match, at most {SCAN_LIMIT:,} examined",
                     lambda: store.find_ids("big", State.QUE, filter="nomatch", limit=50, scan_limit=SCAN_LIMIT))
        result["limited_search_scanned"] = page.scanned
        timed("search, no match, whole state", lambda: store.find_ids("big", State.QUE, filter="nomatch", limit=50))
        page = timed("search, acme, first 1,000", lambda: store.find_ids("big", State.QUE, filter="acme", limit=1000))
        result["acme_found"] = len(page.ids)
        client.set_admin_state("big", "UP")
        att = timed("claim", lambda: store.claim("big", owner="bench", lease=30))
        timed("finish", lambda: store.finish(att, State.DONE, status="ok"))
        timed("reclaim, nothing expired", lambda: store.reclaim("big", owner="bench", lease=30))
        ids = store.find_ids("big", State.QUE, limit=BULK).ids
        failed = timed(f"delete_many, {len(ids):,}", lambda: client.delete_many("big", ids))
        counts = timed("counts", lambda: client.counts("big"))
        result["counts"] = counts
        expected = {"que": n - 1 - len(ids) + len(failed), "done": 1}
        result["counts_ok"] = all(counts[k] == v for k, v in expected.items())
        say(f"counts: {counts} ({'as expected' if result['counts_ok'] else f'EXPECTED {expected}'})")
    finally:
        if client is not None:
            client.store.close()
        cluster.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    path = common.write_results("pgscale", result)
    say(f"\nresults: {path}")
    return 0 if result.get("counts_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
