"""HTTP jobs (issue 11's bench): jobs per second of a kind http queue, beside a bare httpx
loop making the same requests.

    ./bench/run httpjobs [--quick] [--messages N] [--concurrency 1,8] [--keep]

A local server that answers at once (uvicorn, one process, a two-line ASGI app) runs in
its own process. For each concurrency C:

1. **bare httpx**: C threads share one keep-alive ``httpx.Client`` and make N GET requests
   between them, as fast as the server answers: the ceiling of "the same requests";
2. **spoolq**: a queue of kind http (``num_workers`` C, ``http_per_host`` C), N durable
   messages sent with ``send_many`` while it is PAUSEd, then resumed; the clock runs from
   the resume to the last message in done (``spoolq serve`` reading, claiming, requesting,
   logging and finishing each one durably).

Prints a table with spoolq's ratio to the bare loop and writes
bench/results/httpjobs-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

import spoolq  # noqa: E402
from bench import common  # noqa: E402
from bench.common import say  # noqa: E402
from bench.daemon import VENV_BIN, Proc, free_port, wait_for  # noqa: E402

APP = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''


def bare(url: str, n: int, width: int) -> float:
    """Seconds for ``n`` GETs of ``url`` by ``width`` threads sharing one client."""
    left = [n]
    lock = threading.Lock()
    errors: list[str] = []
    with httpx.Client(limits=httpx.Limits(max_connections=width, max_keepalive_connections=width),
                      trust_env=False) as c:
        def worker() -> None:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                r = c.get(url)
                if r.status_code != 200:
                    errors.append(str(r.status_code))
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(width)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} bad answers: {errors[:3]}")
    return took


def through_spoolq(work: Path, url: str, n: int, width: int) -> float:
    """Seconds from resuming a kind http queue holding ``n`` jobs to the last one done."""
    root = work / f"spool-{width}"
    client = spoolq.open(root)
    client.create_queue("jobs", kind="http", num_workers=width, http_per_host=width)
    client.set_admin_state("jobs", "pause")
    for start in range(0, n, 1000):
        batch = min(n, start + 1000) - start
        client.send_many("jobs", [{"params": {"method": "GET", "url": url}} for _ in range(batch)])
    log = work / f"daemon-{width}.log"
    d = Proc([str(VENV_BIN / "spoolq"), "--root", str(root), "serve", "--no-http", "--no-builtin-queues",
              "--port", str(free_port())], log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: b"serving" in log.read_bytes() or not d.alive(), 60, "serving", 0.01)
        time.sleep(1.0)  # its start-up recount and sweep, out of the measured time
        t0 = time.perf_counter()
        client.set_admin_state("jobs", "UP")
        wait_for(lambda: client.counts("jobs").get("done", 0) + client.counts("jobs").get("err", 0) >= n,
                 600, "every job finished", 0.01)
        took = time.perf_counter() - t0
        counts = client.counts("jobs")
        if counts.get("done", 0) != n:
            raise RuntimeError(f"not every job done: {counts}")
        return took
    finally:
        d.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 jobs per run")
    ap.add_argument("--messages", type=int, default=None, help="jobs per run (default 5,000)")
    ap.add_argument("--concurrency", default="1,8", help="requests in flight, comma-separated (default 1,8)")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    a = ap.parse_args(argv)
    n = a.messages or (1000 if a.quick else 5000)
    widths = [int(w) for w in a.concurrency.split(",")]
    work = common.make_base(a.dir, "httpjobs")
    r: dict[str, Any] = {**common.run_header("httpjobs", argv, work), "messages": n, "runs": []}
    say(f"HTTP jobs benchmark in {work}: {n:,} jobs per run")
    (work / "app.py").write_text(APP)
    port = free_port()
    slog = work / "server.log"
    server = Proc([str(VENV_BIN / "python"), "-m", "uvicorn", "--app-dir", str(work), "--port", str(port),
                   "--log-level", "warning", "--no-access-log", "app:app"], slog)
    url = f"http://127.0.0.1:{port}/job"
    rows = []
    try:
        wait_for(lambda: _answers(url) or not server.alive(), 30, "the server", 0.05)
        for w in widths:
            b = bare(url, n, w)
            s = through_spoolq(work, url, n, w)
            run = {"concurrency": w, "bare_per_s": round(n / b, 1), "spoolq_per_s": round(n / s, 1),
                   "ratio": round(b / s, 3)}
            r["runs"].append(run)
            say(f"  concurrency {w}: bare httpx {n / b:,.0f}/s, spoolq {n / s:,.0f}/s ({b / s:.2f}x)")
            rows += [[f"bare httpx loop, {w} in flight", f"{n / b:,.0f} req/s", "1.00"],
                     [f"spoolq kind http, num_workers {w}", f"{n / s:,.0f} jobs/s", f"{b / s:.2f}"]]
        say(common.table(rows, ["measure", "rate", "vs bare"]))
    finally:
        server.stop()
        path = common.write_results("httpjobs", r)
        say(f"results: {path}")
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
