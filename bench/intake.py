"""The line intake (issue 11's bench): durably acknowledged lines per second.

    ./bench/run intake [--quick] [--messages N] [--keep]

One fresh spool root, queue ``mail`` PAUSEd (so only the intake writes), ``spoolq serve
--no-http --intake-port P``. Each connection sends ``:ack`` and then its lines as fast as
the socket takes them, reading the ``ok <full id>`` answers as they come; the clock runs
from the first line to the last answer.

1. **one connection**: N lines (20,000; ``--quick`` 3,000);
2. **16 connections** at once, N/16 lines each;
3. **the ceiling**: ``send_many`` of the same N messages in batches of 1,000 from this
   process, the store's own group commit without a socket.

Prints a table with the ratios to the ceiling and writes bench/results/intake-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spoolq  # noqa: E402
from bench import common  # noqa: E402
from bench.common import say  # noqa: E402
from bench.daemon import VENV_BIN, Proc, free_port, wait_for  # noqa: E402


def connection(port: int, lines: int, tag: str, out: list[float]) -> None:
    """Send ``lines`` acked lines on one connection; appends the seconds it took to ``out``."""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        s.sendall(b":ack\n")
        body = b"".join(b"mail %s-%d\n" % (tag.encode(), i) for i in range(lines))

        def sender() -> None:
            s.sendall(body)

        t0 = time.perf_counter()
        th = threading.Thread(target=sender)
        th.start()
        got, buf = 0, b""
        while got < lines + 1:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise RuntimeError(f"connection closed after {got} answers")
            buf += chunk
            n = buf.count(b"\n")
            if b"fail" in buf:
                raise RuntimeError(f"a line failed: {buf[:200]!r}")
            got += n
            buf = buf[buf.rfind(b"\n") + 1:]
        out.append(time.perf_counter() - t0)
        th.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000 lines")
    ap.add_argument("--messages", type=int, default=None, help="lines per run (default 20,000)")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    a = ap.parse_args(argv)
    n = a.messages or (3000 if a.quick else 20000)
    work = common.make_base(a.dir, "intake")
    r: dict[str, Any] = {**common.run_header("intake", argv, work), "messages": n}
    say(f"intake benchmark in {work}: {n:,} lines per run")
    root = work / "spool"
    d: Proc | None = None
    try:
        client = spoolq.open(root)
        client.create_queue("mail", script="/bin/true")
        client.set_admin_state("mail", "pause")
        port = free_port()
        log = work / "daemon.log"
        d = Proc([str(VENV_BIN / "spoolq"), "--root", str(root), "serve", "--no-http", "--no-builtin-queues",
                  "--port", str(free_port()), "--intake-port", str(port)], log,
                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: b"serving" in log.read_bytes() or not d.alive(), 60, "serving", 0.01)
        one: list[float] = []
        connection(port, n, "one", one)
        r["one_connection_per_s"] = round(n / one[0], 1)
        say(f"  one connection: {n:,} lines in {one[0]:.2f} s = {n / one[0]:,.0f} lines/s")
        many: list[float] = []
        per = n // 16
        t0 = time.perf_counter()
        threads = [threading.Thread(target=connection, args=(port, per, f"c{k}", many)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if len(many) != 16:
            raise RuntimeError("a connection failed")
        r["sixteen_connections_per_s"] = round(per * 16 / wall, 1)
        say(f"  16 connections: {per * 16:,} lines in {wall:.2f} s = {per * 16 / wall:,.0f} lines/s")
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            client.send_many("mail", [{"param1": f"ceiling-{i}"} for i in range(start, min(n, start + 1000))])
        ceil_s = time.perf_counter() - t0
        r["send_many_per_s"] = round(n / ceil_s, 1)
        say(f"  send_many ceiling: {n:,} in {ceil_s:.2f} s = {n / ceil_s:,.0f} messages/s")
        expected = n + per * 16 + n
        counts = client.counts("mail")
        r["queued"] = counts["que"]
        if counts["que"] != expected:
            raise RuntimeError(f"{counts['que']:,} queued, {expected:,} sent")
        say(common.table([["one connection, acked", f"{n / one[0]:,.0f} lines/s", f"{ceil_s / one[0]:.2f}"],
                          ["16 connections, acked", f"{per * 16 / wall:,.0f} lines/s",
                           f"{(per * 16 / wall) / (n / ceil_s):.2f}"],
                          ["send_many, batches of 1,000 (ceiling)", f"{n / ceil_s:,.0f} messages/s", "1.00"]],
                         ["measure", "rate", "vs ceiling"]))
    finally:
        if d is not None:
            d.stop()
        path = common.write_results("intake", r)
        say(f"results: {path}")
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
