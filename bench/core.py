"""Core benchmark (issue 2): durable sends beside the raw filesystem limit, and a big queue.

    ./bench/run core [--quick] [--messages N] [--rounds R] [--dir DIR] [--keep]

All in one run, on one filesystem (a fresh directory under --dir, by default /work/bench-data):

(a) raw limit: create a 100-byte file, fsync it, rename it into another directory, fsync the
    directory; where a rename is not atomic on disk (ext4 without a journal: spoolq.durable.
    rename_needs_source_sync) also fsync the directory it came from, the promise spoolq makes
    there. Ops/s.
(b) durable single ``client.send`` (msg, the bucket, and the staging dir where the filesystem
    needs it; plus .tmp where renames are not atomic on disk). Messages/s.
    (a) and (b) run interleaved, in rounds, so background load hits both alike.
(c) durable ``client.send_many`` in batches of 1,000 (one group commit per batch). Messages/s.
(d) one queue filled with --messages (default 1,000,000) messages by send_many, plus a few
    hundred more moved on into every other state; then ``counts`` and ``list(state, limit=50)``
    (newest first) for every state are timed, and a full ``recount`` walk for contrast.

Prints a table and writes bench/results/core-<time>.json. The data directory is removed at
the end (1,000,000 messages take ~9 GB) unless --keep.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spoolq  # noqa: E402
from bench import common  # noqa: E402
from bench.common import say  # noqa: E402
from spoolq import durable  # noqa: E402
from spoolq.ids import sort_key  # noqa: E402
from spoolq.model import MessageFields, State  # noqa: E402

TARGET_RATIO = 0.60
TARGET_MANY = 10_000
TARGET_QUERY_MS = 100.0
BATCH = 1000
PAYLOAD = b"x" * 100
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Raw:
    """The raw limit: one durable create-and-rename of a 100-byte file per op. Durable means
    what spoolq promises on this filesystem: on ext4 without a journal the rename's source
    directory is fsync'd too (docs/internals.md), else the comparison would be unfair."""

    def __init__(self, base: Path) -> None:
        self.tmp = str(base / "tmp")
        self.dst = str(base / "dst")
        os.makedirs(self.tmp)
        os.makedirs(self.dst)
        self.n = 0
        self.fsync_source = durable.rename_needs_source_sync(self.tmp)

    def op(self) -> None:
        self.n += 1
        name = str(self.n)
        src = f"{self.tmp}/{name}"
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.write(fd, PAYLOAD)
        os.fsync(fd)
        os.close(fd)
        os.rename(src, f"{self.dst}/{name}")
        for d in (self.dst, self.tmp) if self.fsync_source else (self.dst,):
            dfd = os.open(d, DIR_FLAGS)
            os.fsync(dfd)
            os.close(dfd)


def timed(fn: Any, n: int) -> tuple[float, list[float]]:
    """Run ``fn`` n times; total seconds and each call's seconds."""
    each = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        each.append(time.perf_counter() - t)
    return time.perf_counter() - t0, each


def bench_single(base: Path, client: spoolq.Client, rounds: int, per_round: int) -> dict[str, Any]:
    raw = Raw(base / "raw")
    client.create_queue("single", script="/bin/true")
    seq = iter(range(10**9))

    def send() -> None:
        client.send("single", param1=str(next(seq)))

    timed(raw.op, 20)  # warm up both paths
    timed(send, 20)
    raw_t = send_t = 0.0
    raw_each: list[float] = []
    send_each: list[float] = []
    per: list[dict[str, float]] = []
    for r in range(rounds):
        a, ae = timed(raw.op, per_round)
        b, be = timed(send, per_round)
        raw_t, send_t = raw_t + a, send_t + b
        raw_each += ae
        send_each += be
        per.append({"raw": per_round / a, "send": per_round / b})
        say(f"  round {r + 1}/{rounds}: raw {per_round / a:7.0f} ops/s   send {per_round / b:7.0f} msg/s"
            f"   ratio {a / b:.2f}")
    n = rounds * per_round
    return {
        "ops_per_round": per_round, "rounds": rounds,
        "raw_ops_s": n / raw_t, "send_msg_s": n / send_t, "ratio": raw_t / send_t,
        "round_ratios": [round(p["send"] / p["raw"], 3) for p in per],
        "raw_latency_ms": common.summary_ms(raw_each), "send_latency_ms": common.summary_ms(send_each),
    }


def bench_many(client: spoolq.Client, batches: int) -> dict[str, Any]:
    client.create_queue("many", script="/bin/true")
    client.send_many("many", [{"param1": "warm"} for _ in range(100)])
    rates = []
    total = 0.0
    for b in range(batches):
        msgs: list[MessageFields] = [{"param1": str(b * BATCH + i)} for i in range(BATCH)]
        t = time.perf_counter()
        client.send_many("many", msgs)
        el = time.perf_counter() - t
        total += el
        rates.append(BATCH / el)
    say(f"  {batches} batches of {BATCH}: {batches * BATCH / total:.0f} msg/s "
        f"(batch median {statistics.median(rates):.0f}, min {min(rates):.0f}, max {max(rates):.0f})")
    return {"batch": BATCH, "batches": batches, "msg_s": batches * BATCH / total,
            "batch_msg_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}}


def fill(client: spoolq.Client, queue: str, n: int) -> dict[str, Any]:
    client.create_queue(queue, script="/bin/true")
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(BATCH, n - done)
        client.send_many(queue, [{"param1": str(done + i)} for i in range(k)])
        done += k
        if done % 100_000 == 0 or done == n:
            say(f"  {done:>9,} messages  {done / (time.perf_counter() - t0):7.0f} msg/s overall")
    el = time.perf_counter() - t0
    return {"messages": n, "seconds": el, "msg_s": n / el}


def populate_states(client: spoolq.Client, queue: str, each: int) -> None:
    """Give every state other than que some entries (que keeps all its messages)."""
    store = client.store
    extra = [r.msg_id for r in client.send_many(queue, [{"param1": f"extra{i}"} for i in range(4 * each)])]
    for i, msg_id in enumerate(extra):
        store.move(queue, msg_id, State.QUE, State.RUN)
        final = (None, State.DONE, State.ERR, State.RELAYED)[i // each]
        if final is not None:
            store.move(queue, msg_id, State.RUN, final)
    for i in range(each):
        client.prep(queue, param1=f"prep{i}")


def time_queries(client: spoolq.Client, queue: str, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def sample(fn: Any) -> dict[str, float]:
        first = time.perf_counter()
        fn()
        first = time.perf_counter() - first
        rest = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            rest.append(time.perf_counter() - t)
        return {"first_ms": round(first * 1000, 3), "median_ms": round(statistics.median(rest) * 1000, 3),
                "max_ms": round(max(rest) * 1000, 3)}

    out["counts"] = sample(lambda: client.counts(queue))
    out["counts"]["value"] = client.counts(queue)
    say(f"    counts: {out['counts']}")
    for st in State:
        out[f"list {st}"] = sample(lambda st=st: client.list(queue, st, limit=50))
        page = client.list(queue, st, limit=50)
        out[f"list {st}"]["items"] = len(page.items)
        ids = [v.message.msg_id for v in page.items]
        out[f"list {st}"]["newest_first"] = ids == sorted(ids, key=sort_key, reverse=True)
        say(f"    list {st}: {out[f'list {st}']}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100,000 messages, fewer rounds")
    ap.add_argument("--messages", type=int, default=None, help="messages in the big queue (default 1,000,000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved raw/send rounds (default 10)")
    ap.add_argument("--per-round", type=int, default=200, help="ops per round and side (default 200)")
    ap.add_argument("--batches", type=int, default=None, help="send_many batches of 1,000 (default 20)")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument("--no-recount", action="store_true", help="skip the full recount walk")
    a = ap.parse_args(argv)
    n_big = a.messages if a.messages is not None else (100_000 if a.quick else 1_000_000)
    rounds = a.rounds if a.rounds is not None else (5 if a.quick else 10)
    batches = a.batches if a.batches is not None else (10 if a.quick else 20)

    a.dir.mkdir(parents=True, exist_ok=True)
    need_gb = (n_big + batches * BATCH + rounds * a.per_round) * 9.5e3 / 2**30 + 1
    if common.free_gb(a.dir) < 2 * need_gb:
        say(f"not enough space in {a.dir}: {common.free_gb(a.dir):.1f} GB free, want {2 * need_gb:.1f}")
        return 2
    base = common.make_base(a.dir, "core")
    result: dict[str, Any] = {
        "kind": "core", "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "command": " ".join(["bench/core.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": common.machine(), "fs": common.fs_facts(base), "git": common.git_rev(),
    }
    say(f"core benchmark in {base}")
    result["fs"]["durability"] = durable.fs_description(base)
    result["fs"]["fsync_rename_source"] = durable.rename_needs_source_sync(base)
    say(f"filesystem: {result['fs']}")
    t_start = time.perf_counter()
    try:
        client = spoolq.open(base / "spool")
        say(f"\n(a)+(b) raw limit vs durable single send, {rounds} interleaved rounds of {a.per_round}:")
        result["single"] = bench_single(base, client, rounds, a.per_round)
        say("\n(c) send_many, durable:")
        result["send_many"] = bench_many(client, batches)
        big = spoolq.open(base / "big")
        say(f"\n(d) filling one queue with {n_big:,} messages (send_many, batches of {BATCH}):")
        result["fill"] = fill(big, "big", n_big)
        populate_states(big, "big", 50)
        say("  timing counts and list(limit=50) for every state:")
        result["queries"] = time_queries(big, "big", repeat=20)
        if not a.no_recount:
            say("  timing a full recount walk (for contrast):")
            result["recount_walk_s"] = round(_recount(big, "big"), 3)
            say(f"    {result['recount_walk_s']:.1f} s")
    finally:
        if a.keep:
            say(f"\nkept {base}")
        else:
            say(f"\nremoving {base} ...")
            result["cleanup_s"] = round(common.rmtree_timed(base), 1)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    report(result)
    path = common.write_results("core", result)
    say(f"\nresults: {path}")
    return 0


def _recount(client: spoolq.Client, queue: str) -> float:
    t = time.perf_counter()
    client.recount(queue)
    return time.perf_counter() - t


def report(r: dict[str, Any]) -> None:
    s, m, q = r["single"], r["send_many"], r["queries"]
    rows: list[list[Any]] = [
        ["(a) raw: create 100 B, fsync, rename, fsync dir"
         + (" + source dir" if r["fs"].get("fsync_rename_source") else ""), f"{s['raw_ops_s']:.0f} ops/s", "", ""],
        ["(b) durable single send", f"{s['send_msg_s']:.0f} msg/s",
         f"(b)/(a) = {s['ratio']:.2f}", f">= {TARGET_RATIO:.2f} {common.verdict(s['ratio'] >= TARGET_RATIO)}"],
        ["(c) durable send_many, batches of 1000", f"{m['msg_s']:.0f} msg/s", "",
         f">= {TARGET_MANY:,} {common.verdict(m['msg_s'] >= TARGET_MANY)}"],
        [f"    filling {r['fill']['messages']:,} messages (send_many)", f"{r['fill']['msg_s']:.0f} msg/s", "", ""],
    ]
    for name, v in q.items():
        worst = max(v["first_ms"], v["max_ms"])
        extra = f"{v['items']} items" if "items" in v else ""
        rows.append([f"(d) {name}", f"{v['median_ms']:.2f} ms", f"first {v['first_ms']:.2f}, max {v['max_ms']:.2f}"
                     + (f", {extra}" if extra else ""),
                     f"< {TARGET_QUERY_MS:.0f} ms {common.verdict(worst < TARGET_QUERY_MS)}"])
    if "recount_walk_s" in r:
        rows.append(["    recount (full walk, for contrast)", f"{r['recount_walk_s']:.1f} s", "", ""])
    say("\n" + common.table(rows, ["figure", "value", "detail", "target"]))
    say(f"single send latency ms: {s['send_latency_ms']}; raw op: {s['raw_latency_ms']}")
    say(f"per-round ratios (b)/(a): {s['round_ratios']}")
    say(f"que count: {q['counts']['value']}")


if __name__ == "__main__":
    sys.exit(main())
