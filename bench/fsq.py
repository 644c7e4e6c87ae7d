"""fsq directories (issue 11's bench): spoolq's fsq beside fsq 0.2.5's own tools, one run.

    ./bench/run fsq [--quick] [--messages N] [--workers W] [--keep]

One fresh fsq root per row, N items (2,000; ``--quick`` 400) with one argument each:

1. **enqueue**: fsq 0.2.5's ``fsq.senqueue`` in one Python 2.7 process, and spoolq's
   ``spoolq.fsq.enqueue`` in one Python 3 process (spoolq also fsyncs ``queue/``);
2. **process** ``/bin/true`` per item, the clock from start to the last item in ``done/``:
   fsq 0.2.5's ``fsq scan`` (serial, its only mode), ``spoolq fsq scan`` (serial, the same
   contract), and the daemon serving the directory as a queue of kind fsq with W workers
   (2 and 4 by default; the daemon is up before the queue is made, so its start is not
   timed);
3. **process with work**: N/5 items of a program that sleeps ``--work-ms`` (20) each, fsq's
   scan beside the daemon: where running items in parallel counts.

fsq 0.2.5 needs a python2.7 (``scripts/bootstrap.sh bench`` installs fsq into
``.venv/peers/fsq-0.2.5``); without one its rows say so. Writes bench/results/fsq-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spoolq  # noqa: E402
from bench import common  # noqa: E402
from bench.common import say  # noqa: E402
from bench.daemon import VENV_BIN, Proc, free_port, wait_for  # noqa: E402
from spoolq import fsq  # noqa: E402

PEER = Path(__file__).resolve().parent.parent / ".venv" / "peers" / "fsq-0.2.5"
PY2 = (PEER / "python").read_text().strip() if (PEER / "python").exists() else ""
TRUE = shutil.which("true") or "/bin/true"


def py2_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSQ_", "PYTHON", "PYENV"))}
    return {**env, "FSQ_ROOT": str(root), "PYTHONPATH": str(PEER)}


def fsq_tool(root: Path, *args: str) -> None:
    subprocess.run([PY2, str(PEER / "bin" / "fsq"), "-e", str(PEER / "libexec" / "fsq"), *args],
                   env=py2_env(root), check=True, capture_output=True)


def fresh(work: Path, name: str) -> fsq.Conf:
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    conf = fsq.Conf.from_env({}, root=str(root))
    fsq.install(conf, "q")
    return conf


def enqueue_spoolq(conf: fsq.Conf, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fsq.enqueue(conf, "q", b"", [str(i)])
    return time.perf_counter() - t0


def enqueue_fsq(conf: fsq.Conf, n: int) -> float:
    code = ("import time, fsq\nt0 = time.time()\n"
            f"for i in range({n}):\n    fsq.senqueue('q', '', str(i))\n"
            "print(time.time() - t0)\n")
    r = subprocess.run([PY2, "-c", code], env=py2_env(Path(conf.root)), check=True, capture_output=True)
    return float(r.stdout)


def done_count(conf: fsq.Conf) -> int:
    return len(os.listdir(fsq.Paths(conf, "q").sub("done")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 items")
    ap.add_argument("--messages", type=int, default=None, help="items per run (default 2,000)")
    ap.add_argument("--workers", default="2,4", help="daemon rows: workers per row (default 2,4)")
    ap.add_argument("--work-ms", type=int, default=20, help="the working program's time per item (default 20)")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    a = ap.parse_args(argv)
    n = a.messages or (400 if a.quick else 2000)
    work = common.make_base(a.dir, "fsq")
    r: dict[str, Any] = {**common.run_header("fsq", argv, work), "messages": n, "rows": {}}
    rows: list[list[str]] = []
    say(f"fsq benchmark in {work}: {n:,} items per run" + ("" if PY2 else "; no python2.7: fsq 0.2.5 rows skipped"))

    def row(key: str, label: str, seconds: float | None) -> None:
        rate = None if seconds is None else n / seconds
        r["rows"][key] = None if rate is None else round(rate, 1)
        rows.append([label, "skipped: no python2.7" if rate is None else f"{rate:,.0f}/s"])
        say(f"  {label}: " + ("skipped" if rate is None else f"{rate:,.0f} items/s"))

    d: Proc | None = None
    try:
        if PY2:
            c = fresh(work, "enq-fsq")
            row("enqueue_fsq", "enqueue: fsq 0.2.5 senqueue (py2.7)", enqueue_fsq(c, n))
        else:
            row("enqueue_fsq", "enqueue: fsq 0.2.5 senqueue (py2.7)", None)
        c = fresh(work, "enq-spoolq")
        row("enqueue_spoolq", "enqueue: spoolq.fsq.enqueue", enqueue_spoolq(c, n))

        if PY2:
            c = fresh(work, "scan-fsq")
            enqueue_spoolq(c, n)
            t0 = time.perf_counter()
            fsq_tool(Path(c.root), "scan", "q", TRUE)
            secs = time.perf_counter() - t0
            assert done_count(c) == n, "fsq's scan left items"
            row("scan_fsq", "process: fsq 0.2.5 `fsq scan` (serial)", secs)
        else:
            row("scan_fsq", "process: fsq 0.2.5 `fsq scan` (serial)", None)
        c = fresh(work, "scan-spoolq")
        enqueue_spoolq(c, n)
        t0 = time.perf_counter()
        subprocess.run([str(VENV_BIN / "spoolq"), "fsq", "-r", c.root, "scan", "q", TRUE], check=True,
                       capture_output=True)
        secs = time.perf_counter() - t0
        assert done_count(c) == n, "spoolq's scan left items"
        row("scan_spoolq", "process: `spoolq fsq scan` (serial)", secs)

        root = work / "spool"
        log = work / "daemon.log"
        d = Proc([str(VENV_BIN / "spoolq"), "--root", str(root), "serve", "--no-http", "--no-builtin-queues",
                  "--port", str(free_port())], log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: b"serving" in log.read_bytes() or not d.alive(), 60, "serving", 0.01)
        client = spoolq.open(root)
        for w in [int(x) for x in a.workers.split(",") if x]:
            c = fresh(work, f"daemon-{w}")
            enqueue_spoolq(c, n)
            t0 = time.perf_counter()
            client.create_queue(f"q{w}", kind="fsq", script=TRUE, num_workers=w,
                                fsq_dir=os.path.join(c.root, "q"))
            wait_for(lambda c=c: done_count(c) == n, 600, "all items done", 0.01)  # type: ignore[misc]
            row(f"daemon_{w}", f"process: spoolq serve, kind fsq, {w} workers", time.perf_counter() - t0)
        # The same with a program that works (sleeps) a while per item: where parallel
        # workers count. Fewer items, so the serial rows stay short.
        m = max(50, n // 5)
        prog = work / "work.sh"
        prog.write_text(f"#!/bin/sh\nsleep {a.work_ms / 1000:g}\n")
        prog.chmod(0o755)
        nw = n
        n = m
        if PY2:
            c = fresh(work, "wscan-fsq")
            enqueue_spoolq(c, m)
            t0 = time.perf_counter()
            fsq_tool(Path(c.root), "scan", "q", str(prog))
            assert done_count(c) == m
            row("work_scan_fsq", f"process, {a.work_ms} ms of work each: fsq 0.2.5 `fsq scan`",
                time.perf_counter() - t0)
        for w in [int(x) for x in a.workers.split(",") if x]:
            c = fresh(work, f"wdaemon-{w}")
            enqueue_spoolq(c, m)
            t0 = time.perf_counter()
            client.create_queue(f"w{w}", kind="fsq", script=str(prog), num_workers=w,
                                fsq_dir=os.path.join(c.root, "q"))
            wait_for(lambda c=c: done_count(c) == m, 600, "all items done", 0.01)  # type: ignore[misc]
            row(f"work_daemon_{w}", f"process, {a.work_ms} ms of work each: spoolq serve, {w} workers",
                time.perf_counter() - t0)
        n = nw
        for base in ("", "work_"):
            if not r["rows"].get(f"{base}scan_fsq"):
                continue
            for key in [k for k in r["rows"] if k.startswith(f"{base}daemon_")]:
                ratio = r["rows"][key] / r["rows"][f"{base}scan_fsq"]
                r[f"{key}_vs_fsq_scan"] = round(ratio, 2)
                rows.append([f"  {key} / fsq scan", f"{ratio:.2f} ({common.verdict(ratio > 1)})"])
        say(common.table(rows, ["measure", "rate"]))
    finally:
        if d is not None:
            d.stop()
        path = common.write_results("fsq", r)
        say(f"results: {path}")
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
