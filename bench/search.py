"""Search and bulk benchmark (hardening issue, item 15): a big state, searched and emptied.

    ./bench/run search [--quick] [--messages N] [--baseline REV] [--dir DIR] [--keep]

One queue (paused) is filled with --messages (default 1,000,000; --quick 200,000) messages
by send_many, 1 in 100 with ``params.cust = acme``. Then, in one run:

(a) a search that matches nothing, walking the whole state: today's code beside the
    --baseline revision's (default e4d2b1c, the main before the hardening issue; run from a
    temporary git worktree in a subprocess over the same spool);
(b) one search request as the API and UI make it (at most 20,000 messages examined);
(c) a ``count`` operation over the whole state (cust=acme: 1 %), then the delete of exactly
    what it found (``ids_from``), as the UI's "Delete matching" does;
(d) a bulk delete of everything left, as one background operation; the counts cache and a
    recount must then both say 0 (a truthful result);
(e) for contrast, the baseline's bulk delete (one synchronous call, at most 100,000) over a
    separate queue of 20,000 messages, beside today's over another 20,000.

Prints a table and writes bench/results/search-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spoolq  # noqa: E402
from bench import common  # noqa: E402
from bench.common import say  # noqa: E402
from spoolq.http.operations import Operations  # noqa: E402

BATCH = 1000
SEARCH_SCAN = 20_000
BASELINE = "e4d2b1c"

OLD_SEARCH = r"""
import json, os, sys, time
import spoolq
assert spoolq.__file__.startswith(os.environ["PYTHONPATH"]), spoolq.__file__  # the baseline, not today's
c = spoolq.open(sys.argv[1])
t = time.perf_counter()
page = c.list(sys.argv[2], "que", limit=50, filter="no-such-text")
print(json.dumps({"seconds": time.perf_counter() - t, "items": len(page.items)}))
"""

OLD_BULK = r"""
import json, os, sys, time
import spoolq
assert spoolq.__file__.startswith(os.environ["PYTHONPATH"]), spoolq.__file__
from spoolq.http.actions import bulk
c = spoolq.open(sys.argv[1])
t = time.perf_counter()
res = bulk(c, sys.argv[2], "que", None, "delete")
print(json.dumps({"seconds": time.perf_counter() - t, "succeeded": res["succeeded"], "matched": res["matched"]}))
"""


def fill(client: spoolq.Client, queue: str, n: int) -> float:
    client.create_queue(queue, script="/bin/true")
    client.set_admin_state(queue, "PAUSE")
    t = time.perf_counter()
    for b in range(n // BATCH):
        client.send_many(queue, [{"param1": f"user{b * BATCH + i}@example.com",
                                  "params": {"cust": "acme" if i % 100 == 0 else "other", "n": i}}
                                 for i in range(BATCH)])
    return time.perf_counter() - t


def baseline_tree(rev: str) -> Path:
    """A temporary worktree of ``rev`` (removed at exit by the caller)."""
    path = Path(tempfile.mkdtemp(prefix="spoolq-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def run_old(tree: Path, code: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # cwd too: `python -c` puts the current directory first on sys.path, before PYTHONPATH.
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tree, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"the baseline failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def wait(ops: Operations, op_id: str) -> dict[str, Any]:
    return ops.wait(op_id, 24 * 3600).to_json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    n = args.messages or (200_000 if args.quick else 1_000_000)
    base = common.make_base(args.dir, "search")
    root = base / "spool"
    client = spoolq.open(root)
    results: dict[str, Any] = {"messages": n, "machine": common.machine(), "fs": common.fs_facts(base),
                               "git": common.git_rev(), "baseline": args.baseline}
    tree = baseline_tree(args.baseline)
    try:
        say(f"filling {n:,} messages ...")
        results["fill_seconds"] = round(fill(client, "big", n), 1)
        say(f"  {n / results['fill_seconds']:,.0f} msg/s")

        old = run_old(tree, OLD_SEARCH, str(root), "big")
        t = time.perf_counter()
        page = client.list("big", "que", limit=50, filter="no-such-text")
        new_full = time.perf_counter() - t
        assert not page.items and page.scanned == n
        t = time.perf_counter()
        page = client.list("big", "que", limit=50, filter="no-such-text", scan_limit=SEARCH_SCAN)
        one_request = time.perf_counter() - t
        results["search"] = {"baseline_full_walk_s": round(old["seconds"], 2), "full_walk_s": round(new_full, 2),
                             "speedup": round(old["seconds"] / new_full, 2),
                             "one_request_s": round(one_request, 3), "one_request_scanned": page.scanned}

        ops = Operations(client)
        t = time.perf_counter()
        count = wait(ops, ops.start("big", spoolq.model.State.QUE, "cust=acme", "count").id)
        count_s = time.perf_counter() - t
        t = time.perf_counter()
        dropped = wait(ops, ops.start("big", spoolq.model.State.QUE, None, "delete", ids_from=count["id"]).id)
        drop_s = time.perf_counter() - t
        t = time.perf_counter()
        everything = wait(ops, ops.start("big", spoolq.model.State.QUE, None, "delete").id)
        all_s = time.perf_counter() - t
        left_cache, left_walk = client.counts("big")["que"], client.recount("big")["que"]
        results["bulk"] = {
            "count_s": round(count_s, 2), "count_matched": count["matched"],
            "delete_matched_s": round(drop_s, 2), "delete_matched": dropped["succeeded"],
            "delete_all_s": round(all_s, 2), "delete_all": everything["succeeded"],
            "delete_all_per_s": round(everything["succeeded"] / all_s),
            "reported_remaining": everything["remaining"], "counts_after": left_cache, "recount_after": left_walk,
        }

        fill(client, "old", 20_000)
        fill(client, "new", 20_000)
        old_bulk = run_old(tree, OLD_BULK, str(root), "old")
        t = time.perf_counter()
        new_bulk = wait(ops, ops.start("new", spoolq.model.State.QUE, None, "delete").id)
        new_bulk_s = time.perf_counter() - t
        results["bulk_20k"] = {"baseline_s": round(old_bulk["seconds"], 2), "baseline_deleted": old_bulk["succeeded"],
                               "now_s": round(new_bulk_s, 2), "now_deleted": new_bulk["succeeded"],
                               "speedup": round(old_bulk["seconds"] / new_bulk_s, 2)}
    finally:
        subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force", str(tree)], check=False)
        if not args.keep:
            common.rmtree_timed(base)

    s, b, c = results["search"], results["bulk"], results["bulk_20k"]
    say()
    say(common.table([
        ["search, no match, whole state", f"{s['baseline_full_walk_s']} s", f"{s['full_walk_s']} s",
         f"{s['speedup']}x"],
        [f"one search request ({SEARCH_SCAN:,} examined)", "-", f"{s['one_request_s']} s", ""],
        ["bulk delete, 20,000 messages", f"{c['baseline_s']} s", f"{c['now_s']} s", f"{c['speedup']}x"],
    ], header=[f"{n:,} queued", f"baseline {args.baseline}", "now", "ratio"]))
    say()
    say(common.table([
        ["count cust=acme (1 %)", f"{b['count_s']} s", f"{b['count_matched']:,} matched"],
        ["delete exactly those", f"{b['delete_matched_s']} s", f"{b['delete_matched']:,} deleted"],
        ["delete everything left", f"{b['delete_all_s']} s", f"{b['delete_all']:,} ({b['delete_all_per_s']:,}/s)"],
        ["left: reported / counts / recount", "",
         f"{b['reported_remaining']} / {b['counts_after']} / {b['recount_after']}"],
    ], header=["operation", "time", "result"]))
    path = common.write_results("search", results)
    say(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
