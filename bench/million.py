"""A million messages under a running daemon (issue 9, item 4).

    ./bench/run million [--quick] [--messages N] [--in-run K] [--keep]

One fresh spool root on the filesystem store, queue ``big`` UP with ``num_workers=1`` and a
script that holds its one slot (``exec sleep 3600``), so everything sent after the first
message stays queued while the daemon indexes it, as a daemon behind a stuck worker would.

1. **enqueue rate**: N messages (1,000,000; ``--quick`` 100,000) sent with ``send_many`` in
   batches of 1,000 while ``spoolq serve`` runs, the rate per tenth of N. Target: flat (the
   last tenth at least 0.8 x the first).
2. **daemon RSS** at 0, N/10 and N queued (each after the daemon's CPU use has settled, so
   its index has caught up). Target: bounded (RSS at N within 1.5 x RSS at 0 + 64 MB).
3. **restart**: the daemon is SIGKILLed (a crash), its script's process group killed; K
   messages (1,000) are moved from ``que`` to ``run`` with the store's own move (what a
   crash of a daemon running K scripts leaves: no pid files), and the queue's script
   becomes ``stamp`` (bench/stamp.c) with 2 workers. Then ``spoolq serve`` is started and
   the clock runs from its spawn to the first stamp: **first dispatch**. Target: < 2 s.
   Also when it logged ``serving`` and when all K recovered messages were back in ``que``
   or beyond.

Prints the figures with PASS/MISS and writes bench/results/million-<time>.json. Needs about
9 GB free on the data directory's filesystem for a million messages.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spoolq  # noqa: E402
from bench import common  # noqa: E402
from bench.backlog import rss_mb, settle  # noqa: E402
from bench.common import say  # noqa: E402
from bench.daemon import VENV_BIN, Proc, Stamps, compile_stamp, free_port, wait_for  # noqa: E402
from spoolq.model import State  # noqa: E402

BATCH = 1000
TARGET_FLAT = 0.8
TARGET_FIRST_DISPATCH_S = 2.0


def serve(root: Path, log: Path) -> Proc:
    return Proc([str(VENV_BIN / "spoolq"), "--root", str(root), "serve", "--no-http", "--port",
                 str(free_port()), "--grace", "2"], log, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_scripts(root: Path) -> None:
    """SIGKILL the process group of every script whose pid file is in ``big``'s run/."""
    for pidfile in glob.glob(str(root / "queue" / "big" / "run" / "*" / "*" / "*" / "*" / "pid")):
        try:
            pid = int(Path(pidfile).read_text().split()[0])
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 messages instead of 1,000,000")
    ap.add_argument("--messages", type=int, default=None, help="messages to queue (default 1,000,000)")
    ap.add_argument("--in-run", type=int, default=1000, help="messages left in run/ by the crash (default 1,000)")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    a = ap.parse_args(argv)
    n = a.messages or (100_000 if a.quick else 1_000_000)
    tenth = max(BATCH, n // 10 // BATCH * BATCH)
    work = common.make_base(a.dir, "million")
    r: dict[str, Any] = {
        **common.run_header("million", argv, work),
        "messages": n, "in_run": a.in_run,
    }
    say(f"million benchmark in {work}: {n:,} messages, {a.in_run:,} left in run by a crash")
    root = work / "spool"
    d: Proc | None = None
    try:
        stamp = compile_stamp(work)
        stamps = Stamps(work / "stamps")
        hold = work / "hold.sh"
        hold.write_text("#!/bin/sh\nexec sleep 3600\n")
        hold.chmod(0o755)
        client = spoolq.open(root)
        client.create_queue("big", script=str(hold), num_workers=1,
                            env_vars={"STAMP_FILE": str(stamps.path)})
        d = serve(root, work / "daemon1.log")
        wait_for(lambda: b"serving" in (work / "daemon1.log").read_bytes() or not d.alive(), 60, "serving", 0.01)
        settle(d.p.pid)
        rss = {"0": rss_mb(d.p.pid)}
        say(f"  RSS with 0 queued: {rss['0']} MB")
        rates: list[float] = []
        sent = 0
        t_all = time.perf_counter()
        while sent < n:
            t0 = time.perf_counter()
            start, upto = sent, min(n, sent + tenth)
            while sent < upto:
                k = min(BATCH, upto - sent)
                client.send_many("big", [{"param1": str(sent + i)} for i in range(k)])
                sent += k
            rates.append((upto - start) / (time.perf_counter() - t0))
            say(f"  sent {sent:,}: {rates[-1]:,.0f} msg/s over the last {upto - start:,}")
            if sent == tenth:
                settle(d.p.pid)
                rss[str(sent)] = rss_mb(d.p.pid)
                say(f"  RSS with {sent:,} queued: {rss[str(sent)]} MB")
        r["fill_s"] = round(time.perf_counter() - t_all, 1)
        settle(d.p.pid)
        rss[str(n)] = rss_mb(d.p.pid)
        say(f"  RSS with {n:,} queued: {rss[str(n)]} MB")
        r["rates"] = [round(x) for x in rates]
        r["rss_mb"] = rss
        r["counts_before_crash"] = client.counts("big")

        # The crash.
        d.stop(signal.SIGKILL)
        kill_scripts(root)
        d = None
        store = client.store
        moved = 0
        for view in client.list("big", State.QUE, limit=a.in_run).items:
            store.move("big", view.msg_id, State.QUE, State.RUN)
            moved += 1
        client.update_queue("big", script=stamp, num_workers=2)
        r["counts_at_restart"] = client.counts("big")
        say(f"  crashed; {moved:,} messages put in run/, script now stamp; restarting")
        log2 = work / "daemon2.log"
        t_spawn = time.time()
        d = serve(root, log2)
        serving: float | None = None

        def started() -> bool:
            nonlocal serving
            if serving is None and b"serving" in log2.read_bytes():
                serving = time.time()
            return len(stamps.poll()) > 0 or not d.alive()

        wait_for(started, 600, "the first dispatch", 0.002)
        if not d.alive():
            raise RuntimeError(f"the daemon died: {log2.read_text(errors='replace')[-2000:]}")
        first = min(stamps.poll().values()) - t_spawn
        r["first_dispatch_s"] = round(first, 3)
        r["serving_s"] = round(serving - t_spawn, 3) if serving is not None else None
        wait_for(lambda: client.counts("big")["run"] <= 2, 600, "run/ recovered", 0.05)
        r["recovered_s"] = round(time.time() - t_spawn, 2)
        r["rss_after_restart_mb"] = rss_mb(d.p.pid)
        say(f"  first dispatch {first:.3f} s after the spawn ('serving' seen at {r['serving_s']} s); "
            f"run/ recovered after {r['recovered_s']} s; RSS {r['rss_after_restart_mb']} MB")
    finally:
        if d is not None:
            d.stop(signal.SIGKILL)
        kill_scripts(root)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(r)
    path = common.write_results("million", r)
    say(f"\nresults: {path}")
    return 0


def report(r: dict[str, Any]) -> None:
    rates = r.get("rates") or []
    if rates:
        flat = rates[-1] / rates[0]
        r["flat_ratio"] = round(flat, 2)
        say(f"\nenqueue rate by tenth (msg/s): {', '.join(f'{x:,}' for x in rates)}")
        say(f"last tenth / first = {flat:.2f} (target >= {TARGET_FLAT}) {common.verdict(flat >= TARGET_FLAT)}")
    rss = r.get("rss_mb") or {}
    if rss:
        keys = sorted(rss, key=int)
        bound = 1.5 * rss[keys[0]] + 64
        ok = rss[keys[-1]] <= bound
        say("daemon RSS (MB) by messages queued: " + ", ".join(f"{int(k):,}: {rss[k]}" for k in keys)
            + f" (target <= {bound:.0f}) {common.verdict(ok)}")
    if "first_dispatch_s" in r:
        x = r["first_dispatch_s"]
        say(f"restart with {r['messages']:,} queued and {r['in_run']:,} in run/: first dispatch {x:.3f} s "
            f"(target < {TARGET_FIRST_DISPATCH_S}) {common.verdict(x < TARGET_FIRST_DISPATCH_S)}")


if __name__ == "__main__":
    sys.exit(main())
