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
4. **a dispatch helper killed** (``--dispatchers 2``; skipped with ``--no-helper``): the
   queue becomes persistent workers (kind ``worker``, 2 workers, one message each, each
   stamping the message's id and sleeping 50 ms), ``spoolq serve --dispatchers 2`` splits it,
   and once both processes have started messages and the helper has run 3 s (one that dies
   within 2 s of its start is restarted after a backoff) the helper is SIGKILLed. Measured: seconds
   until a message of the helper's part starts again (the main process first recounts the
   queue: a walk of every message), the messages the main process started meanwhile, and
   after a clean stop (exit status 0, nothing left in run/) whether ``counts`` equals a fresh
   walk and holds all N. Target: the
   counts exact (no time target: this is the recount's price, made visible).

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
from bench.floor import helper_pids  # noqa: E402
from spoolq.model import State  # noqa: E402
from spoolq.parts import Part  # noqa: E402

BATCH = 1000
TARGET_FLAT = 0.8
TARGET_FIRST_DISPATCH_S = 2.0


HOLDING_WORKER = """
import os, time
import spoolq


def hold(job):
    fd = os.open(os.environ["STAMP_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getppid()}:{job.id} {time.time():.9f}\\n".encode())
    finally:
        os.close(fd)
    time.sleep(0.05)


spoolq.worker("big")(hold)
raise SystemExit(spoolq.run_worker())
"""


def serve(root: Path, log: Path, *more: str) -> Proc:
    return Proc([str(VENV_BIN / "spoolq"), "--root", str(root), "serve", "--no-http", "--port",
                 str(free_port()), "--grace", "2", *more], log, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def age_s(pid: int) -> float:
    """Seconds since ``pid`` started (/proc: its start in clock ticks since boot, the clock
    CLOCK_BOOTTIME counts; not /proc/uptime, which a container may fake)."""
    start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start / os.sysconf("SC_CLK_TCK")


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
    ap.add_argument("--no-helper", action="store_true", help="skip step 4, a dispatch helper killed")
    a = ap.parse_args(argv)
    n = a.messages or (100_000 if a.quick else 1_000_000)
    r = run(n, a.in_run, a.dir, keep=a.keep, helper=not a.no_helper, argv=argv)
    report(r)
    path = common.write_results("million", r)
    say(f"\nresults: {path}")
    return 0


def run(n: int, in_run: int, parent: Path, *, keep: bool = False, helper: bool = True,
        argv: list[str] | None = None) -> dict[str, Any]:
    """Steps 1-4 (the module's text) in a fresh directory under ``parent``: the figures."""
    tenth = max(BATCH, n // 10 // BATCH * BATCH)
    work = common.make_base(parent, "million")
    r: dict[str, Any] = {
        **common.run_header("million", argv, work),
        "messages": n, "in_run": in_run,
    }
    say(f"million benchmark in {work}: {n:,} messages, {in_run:,} left in run by a crash")
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
        for view in client.list("big", State.QUE, limit=in_run).items:
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
        if helper:
            d.stop(signal.SIGKILL)
            kill_scripts(root)
            d = None
            r["helper"] = d_helper = helper_killed(root, client, work, stamps, n)
            say(f"  helper killed: its part started again after {d_helper['back_s']} s, the main process "
                f"started {d_helper['main_started_meanwhile']} meanwhile; counts exact: {d_helper['counts_exact']}")
    finally:
        if d is not None:
            d.stop(signal.SIGKILL)
        kill_scripts(root)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return r


def helper_killed(root: Path, client: spoolq.Client, work: Path, stamps: Stamps, n: int) -> dict[str, Any]:
    """Step 4 (see the module's text); the daemon is down when it starts and when it ends."""
    worker = work / "hold_worker.py"
    worker.write_text(f"#!{sys.executable}\n" + HOLDING_WORKER)
    worker.chmod(0o755)
    client.update_queue("big", script=str(worker), kind="worker", num_workers=2, worker_inflight=1)
    log = work / "daemon3.log"
    d = serve(root, log, "--dispatchers", "2")
    main, helper = Part(0, 2, frozenset({"big"})), Part(1, 2, frozenset({"big"}))
    try:
        t0 = time.time()

        def started_by(part: Part, after: float, by: set[int] | None = None) -> list[float]:
            """Start times of ``part``'s messages after ``after``; with ``by``, only those run
            by one of those processes (each stamp names the worker's parent: the dispatch
            process, or 1 for a worker whose helper was killed under it)."""
            out = []
            for key, t in stamps.poll().items():
                pid, _, msg_id = key.partition(":")
                if msg_id and t > after and part.owns("big", msg_id) and (by is None or int(pid) in by):
                    out.append(t)
            return out

        def new_helper() -> set[int]:
            return set(helper_pids(d.p.pid)) - set(helpers)

        wait_for(lambda: (bool(started_by(main, t0)) and bool(started_by(helper, t0))) or not d.alive(), 600,
                 "both dispatch processes", 0.01)
        helpers = helper_pids(d.p.pid)
        if not d.alive() or len(helpers) != 1:
            raise RuntimeError(f"no helper to kill: {log.read_text(errors='replace')[-2000:]}")
        # A helper that dies young (within helpers.YOUNG, 2 s, of its start) is restarted
        # after a backoff, one that has been running at once: kill one that has been running.
        time.sleep(max(0.0, 3.0 - age_s(helpers[0])))  # at most 3 s: age_s is never negative
        t_kill = time.time()
        os.kill(helpers[0], signal.SIGKILL)
        wait_for(lambda: bool(started_by(helper, t_kill, new_helper())) or not d.alive(), 900,
                 "the helper's part again", 0.01)
        back = min(started_by(helper, t_kill, new_helper()))
        meanwhile = sum(1 for t in started_by(main, t_kill) if t < back)
        rss = rss_mb(d.p.pid)
    finally:
        d.stop()  # SIGTERM: a clean stop, held messages back in que
    code = d.p.returncode
    counts = client.counts("big")
    walked = client.store.recount("big")
    exact = counts == walked and sum(walked.values()) == n and not walked.get("run") and code == 0
    return {"back_s": round(back - t_kill, 2), "main_started_meanwhile": meanwhile, "rss_mb": rss,
            "stop_status": code, "counts": counts, "walked": walked, "counts_exact": exact}


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
    h = r.get("helper")
    if h:
        say(f"a dispatch helper killed with {r['messages']:,} queued: its part started again after {h['back_s']} s "
            f"(the main process started {h['main_started_meanwhile']} meanwhile); after a clean stop counts = a "
            f"fresh walk and hold all {r['messages']:,}: {common.verdict(h['counts_exact'])}")


if __name__ == "__main__":
    sys.exit(main())
