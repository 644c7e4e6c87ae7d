"""Backlog benchmark (issue 7, item 14): what a big PAUSEd queue costs the daemon.

    ./bench/run backlog [--quick] [--messages N] [--seconds S] [--rate R] [--patience P]
                        [--only old,new] [--base REV] [--keep]

One spool root, filled once: queue ``big``, PAUSEd, holding N messages (1,000,000; with
``--quick`` 200,000), sent with ``send_many`` in batches of 1,000; and queue ``lat``, whose
script is ``stamp`` (bench/stamp.c: it appends its key and the time it started to a file).
Then each implementation in turn serves that root, the same way:

* ``old``: the code at ``--base`` (default e4d2b1c, the merge base of the daemon rework),
  extracted with ``git archive`` into a temporary directory;
* ``new``: this checkout.

For each: ``spoolq serve --no-http`` is started, and

1. **start**: seconds from the spawn until the daemon is settled (its CPU use stays under
   5 % for 3 consecutive seconds; at most 300 s), and the CPU it used meanwhile;
2. **idle CPU**: CPU seconds it uses over S seconds (default 60, two of the old code's 30 s
   rescans), given per 30 s;
3. **send -> start on another queue**: for S seconds, one message to ``lat`` every 1/R s
   (default R = 10), open loop: a send never waits for the previous job, so every message
   sent while the daemon stalls shows the stall. Latency = the stamp's time - the time just
   before the (durable) send. p50, p99, max; also p50 and p99 from the moment the send
   returned (the daemon's part alone, without the send's fsyncs). Probes that have not
   started ``--patience`` seconds (default 120) after the last send count with the time
   waited so far (a lower bound), and their number is reported;
4. RSS of the daemon at the end, then SIGTERM.

Prints the two side by side and writes bench/results/backlog-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from bench.daemon import Proc, Stamps, compile_stamp, free_port, wait_for  # noqa: E402

DEFAULT_BASE = "e4d2b1c"
BATCH = 1000
SETTLE_CPU = 0.05  # CPU seconds per second below which the daemon counts as idle
SETTLE_SECONDS = 3
SETTLE_MAX = 300.0


def fill(client: spoolq.Client, n: int) -> dict[str, Any]:
    """N messages into the PAUSEd queue ``big`` (send_many, batches of BATCH)."""
    client.create_queue("big", script="/bin/true")
    client.set_admin_state("big", "pause")
    t0 = time.perf_counter()
    sent = 0
    while sent < n:
        k = min(BATCH, n - sent)
        client.send_many("big", [{"param1": str(sent + i)} for i in range(k)])
        sent += k
        if sent % 100_000 == 0 or sent == n:
            el = time.perf_counter() - t0
            say(f"  filled {sent:,} ({sent / el:,.0f} msg/s)")
    took = time.perf_counter() - t0
    return {"messages": n, "seconds": round(took, 1), "msg_per_s": round(n / took)}


def extract(rev: str, dest: Path) -> Path:
    """The ``spoolq`` package as it was at ``rev``, under ``dest``."""
    archive = subprocess.run(["git", "-C", str(common.REPO), "archive", rev, "spoolq"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def settle(pid: int) -> tuple[float, bool]:
    """Wait until the daemon's CPU use stays low; (seconds waited, settled?)."""
    t0 = time.monotonic()
    quiet = 0
    last = cpu_seconds(pid)
    while time.monotonic() - t0 < SETTLE_MAX:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now - last < SETTLE_CPU else 0
        last = now
        if quiet >= SETTLE_SECONDS:
            return time.monotonic() - t0, True
    return time.monotonic() - t0, False


def measure(name: str, code: Path, root: Path, stamps: Stamps, seconds: float, rate: float,
            patience: float, work: Path) -> dict[str, Any]:
    """Serve ``root`` with the spoolq package found in ``code``; the four figures."""
    client = spoolq.open(root)
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("SPOOLQ_ROOT", None)
    log = work / f"{name}-daemon.log"
    # cwd = code: ``-m spoolq`` takes the package there, not an installed one.
    t0 = time.monotonic()
    d = Proc([sys.executable, "-m", "spoolq", "--root", str(root), "serve", "--no-http", "--port",
              str(free_port()), "--grace", "5"], log, env=env, cwd=code)
    out: dict[str, Any] = {}
    try:
        wait_for(lambda: "serving " in log.read_text(errors="replace") or not d.alive(), 600, "serving")
        if not d.alive():
            raise RuntimeError(f"{name} daemon died: {log.read_text(errors='replace')[-2000:]}")
        waited, settled = settle(d.p.pid)
        out["start_s"] = round(time.monotonic() - t0, 1)
        out["start_settled"] = settled
        out["start_cpu_s"] = round(cpu_seconds(d.p.pid), 2)
        say(f"  {name}: up and {'settled' if settled else 'NOT settled'} after {out['start_s']} s "
            f"({out['start_cpu_s']} s CPU)")
        c0 = cpu_seconds(d.p.pid)
        time.sleep(seconds)
        out["idle_cpu_per_30s"] = round((cpu_seconds(d.p.pid) - c0) * 30.0 / seconds, 3)
        say(f"  {name}: idle CPU {out['idle_cpu_per_30s']} s per 30 s")
        sent: dict[str, float] = {}
        acked: dict[str, float] = {}
        n = int(seconds * rate)
        start = time.monotonic()
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            key = f"{name}{i}"
            sent[key] = time.time()
            client.send("lat", param1=key)
            acked[key] = time.time()
        try:
            wait_for(lambda: all(k in stamps.poll() for k in sent), patience, "every probe to start", 0.05)
        except TimeoutError:
            pass  # a stalled daemon: the probes not started count with the time waited so far
        gave_up = time.time()
        started = stamps.poll()
        out["unstarted"] = sum(k not in started for k in sent)
        out["latency_ms"] = common.summary_ms([started.get(k, gave_up) - t for k, t in sent.items()])
        out["from_ack_ms"] = common.summary_ms([started.get(k, gave_up) - t for k, t in acked.items()])
        out["rss_mb"] = rss_mb(d.p.pid)
        ms = out["latency_ms"]
        ack = out["from_ack_ms"]
        say(f"  {name}: send -> start p50 {ms['p50']} ms, p99 {ms['p99']} ms, max {ms['max']} ms "
            f"({ms['n']} sends, {out['unstarted']} not started {patience:g} s after the last; from the "
            f"ack: p50 {ack['p50']}, p99 {ack['p99']}); RSS {out['rss_mb']} MB")
    finally:
        d.stop(timeout=60)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200,000 messages instead of 1,000,000")
    ap.add_argument("--messages", type=int, default=None, help="messages in the paused queue")
    ap.add_argument("--seconds", type=float, default=60.0, help="idle and latency windows (default 60)")
    ap.add_argument("--rate", type=float, default=10.0, help="latency probes per second (default 10)")
    ap.add_argument("--patience", type=float, default=120.0,
                    help="seconds to wait for the last probes to start (default 120)")
    ap.add_argument("--only", default="old,new", help="which implementations (default old,new)")
    ap.add_argument("--base", default=DEFAULT_BASE, help=f"the old code's revision (default {DEFAULT_BASE})")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    a = ap.parse_args(argv)
    n = a.messages or (200_000 if a.quick else 1_000_000)
    only = [x for x in ("old", "new") if x in a.only.split(",")]
    work = common.make_base(a.dir, "backlog")
    result: dict[str, Any] = {
        "kind": "backlog", "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "command": " ".join(["bench/backlog.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": common.machine(), "fs": common.fs_facts(work), "git": common.git_rev(),
        "base": a.base, "messages": n, "seconds": a.seconds, "rate": a.rate, "patience": a.patience,
        "errors": {},
    }
    say(f"backlog benchmark in {work}: {n:,} messages in a PAUSEd queue; {a.seconds:g} s windows, "
        f"{a.rate:g} probes/s")
    tmp = Path(tempfile.mkdtemp(prefix="spoolq-base-"))
    try:
        root = work / "spool"
        client = spoolq.open(root)
        stamps = Stamps(work / "stamps")
        client.create_queue("lat", script=compile_stamp(work), env_vars={"STAMP_FILE": str(stamps.path)})
        say("filling ...")
        result["fill"] = fill(client, n)
        codes = {"old": extract(a.base, tmp), "new": common.REPO}
        for name in only:
            say(f"\n{name} ({a.base if name == 'old' else result['git']}) ...")
            try:
                result[name] = measure(name, codes[name], root, stamps, a.seconds, a.rate, a.patience, work)
            except Exception as e:  # one side failing is reported; the other still runs
                result["errors"][name] = f"{type(e).__name__}: {e}"
                say(f"  {name} FAILED: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not a.keep:
            say(f"\nremoving {work} ...")
            took = common.rmtree_timed(work)
            say(f"  removed in {took:.0f} s")
    report(result)
    say(f"\nresults: {common.write_results('backlog', result)}")
    return 0


def report(r: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for name in ("old", "new"):
        v = r.get(name)
        if not v:
            rows.append([name, "not run", "", "", "", "", "", "", "", "", ""])
            continue
        ms, ack = v["latency_ms"], v["from_ack_ms"]
        rows.append([f"{name} ({r['base'] if name == 'old' else r['git']})",
                     f"{v['start_s']}{'' if v['start_settled'] else ' (unsettled)'}", v["start_cpu_s"],
                     v["idle_cpu_per_30s"], ms["p50"], ms["p99"], ms["max"], ack["p50"], ack["p99"],
                     f"{v['unstarted']}/{ms['n']}", v["rss_mb"]])
    say(f"\n{r['messages']:,} messages in a PAUSEd queue (fill: {r['fill']['msg_per_s']:,} msg/s); "
        f"latency: send -> start on another queue, {r['rate']:g}/s for {r['seconds']:g} s")
    say(common.table(rows, ["daemon", "start s", "start CPU s", "idle CPU s/30 s", "p50 ms", "p99 ms",
                            "max ms", "ack p50", "ack p99", "unstarted", "RSS MB"]))


if __name__ == "__main__":
    sys.exit(main())
