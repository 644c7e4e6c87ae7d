"""The relay between two spoolq daemons on loopback (issue 10's bench).

    ./bench/run relay [--quick] [--messages N] [--workers W] [--size-mb M] [--keep]

Two spool roots under one fresh data directory: the far one (``spoolq serve
--trust-loopback``, queue ``inbox`` PAUSEd so it only receives) and the near one (``spoolq
serve --no-http``, its ``relay`` queue with W workers, default 4).

1. **small messages**: N messages (2,000; ``--quick`` 300) with no attachment sent to
   ``relay`` in one ``send_many``; the clock runs from the send to the last one relayed
   (each is a prep, a commit and a state check's worth of HTTP plus one relay process).
2. **one big attachment**: one message carrying an M MiB file (1,024; ``--quick`` 256); the
   clock runs from its commit to relayed (the relay streams the file, md5 on the way; the
   far end spools it to disk, md5s it and makes it durable).
3. **raw**: the same bytes copied over a loopback TCP connection into a file that is then
   fsynced, in this process (the floor: a read, a socket, a write, a flush). Reported beside
   (2) as a ratio.

Prints a table and writes bench/results/relay-<time>.json.
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
from spoolq.builtin import ensure_relay_queue  # noqa: E402
from spoolq.model import State  # noqa: E402

CHUNK = 1 << 20


def serve(root: Path, log: Path, *args: str) -> tuple[Proc, int]:
    port = free_port()
    p = Proc([str(VENV_BIN / "spoolq"), "--root", str(root), "serve", "--port", str(port), *args], log,
             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(lambda: b"serving" in log.read_bytes() or p.p.poll() is not None, 60, "serving", 0.01)
    if p.p.poll() is not None:
        raise RuntimeError(f"daemon died: {log.read_text(errors='replace')[-2000:]}")
    return p, port


def make_file(path: Path, mib: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i % 251:] + block[:i % 251])
        f.flush()
        os.fsync(f.fileno())


def raw_copy(src: Path, dst: Path) -> float:
    """Seconds to copy ``src`` over loopback TCP into ``dst``, fsynced."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def receive() -> None:
        conn, _ = srv.accept()
        with conn, open(dst, "wb") as f:
            while True:
                b = conn.recv(CHUNK)
                if not b:
                    break
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
            conn.sendall(b"k")

    t = threading.Thread(target=receive)
    t.start()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c, open(src, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            c.sendall(b)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)
    elapsed = time.perf_counter() - t0
    t.join()
    srv.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 messages and a 256 MiB attachment")
    ap.add_argument("--messages", type=int, default=None, help="small messages to relay (default 2,000)")
    ap.add_argument("--workers", type=int, default=4, help="relay queue workers (default 4)")
    ap.add_argument("--size-mb", type=int, default=None, help="the big attachment in MiB (default 1,024)")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    a = ap.parse_args(argv)
    n = a.messages or (300 if a.quick else 2000)
    mib = a.size_mb or (256 if a.quick else 1024)
    work = common.make_base(a.dir, "relay")
    r: dict[str, Any] = {
        **common.run_header("relay", argv, work),
        "messages": n, "workers": a.workers, "size_mib": mib,
    }
    say(f"relay benchmark in {work}: {n:,} small messages, one {mib} MiB attachment, {a.workers} relay workers")
    near_root, far_root = work / "near" / "spool", work / "far" / "spool"
    near_root.parent.mkdir(parents=True)
    far_root.parent.mkdir(parents=True)
    procs: list[Proc] = []
    try:
        far_c, near_c = spoolq.open(far_root), spoolq.open(near_root)
        far_c.create_queue("inbox", script="/bin/true")
        far_c.set_admin_state("inbox", "pause")
        ensure_relay_queue(near_c.store, near_root)
        near_c.update_queue("relay", num_workers=a.workers)
        far, port = serve(far_root, work / "far.log", "--trust-loopback")
        procs.append(far)
        near, _ = serve(near_root, work / "near.log", "--no-http", "-v")
        procs.append(near)
        dest = f"http://127.0.0.1:{port}/q/inbox"

        t0 = time.perf_counter()
        near_c.send_many("relay", [{"dest": dest, "param1": str(i)} for i in range(n)])
        wait_for(lambda: near_c.counts("relay")["relayed"] + near_c.counts("relay")["err"] >= n, 3600,
                 "the small messages", 0.01)
        small_s = time.perf_counter() - t0
        counts = near_c.counts("relay")
        r["small"] = {"seconds": round(small_s, 2), "msg_per_s": round(n / small_s, 1), "err": counts["err"],
                      "far_que": far_c.counts("inbox")["que"]}
        say(f"  small: {n:,} relayed in {small_s:.1f} s = {n / small_s:,.1f} msg/s "
            f"(err {counts['err']}, far que {r['small']['far_que']:,})")

        big = work / "big.bin"
        make_file(big, mib)
        receipt = near_c.send("relay", dest=dest, param1="big", attachments=[str(big)])
        t0 = time.perf_counter()
        v = near_c.wait(receipt, 3600)
        big_s = time.perf_counter() - t0
        if v.state != State.RELAYED:
            raise RuntimeError(f"the big message ended {v.state}: {v.status}")
        raw_s = raw_copy(big, work / "raw.bin")
        r["big"] = {"seconds": round(big_s, 2), "mb_per_s": round(mib / big_s, 1),
                    "raw_seconds": round(raw_s, 2), "raw_mb_per_s": round(mib / raw_s, 1),
                    "ratio": round(raw_s / big_s, 3)}
        say(f"  big: {mib} MiB relayed in {big_s:.1f} s = {mib / big_s:,.0f} MiB/s; "
            f"raw loopback copy {raw_s:.1f} s = {mib / raw_s:,.0f} MiB/s; relay/raw = {raw_s / big_s:.2f}")
        say(common.table([["relay, small messages", f"{n / small_s:,.1f} msg/s", ""],
                          [f"relay, one {mib} MiB attachment", f"{mib / big_s:,.0f} MiB/s",
                           f"{raw_s / big_s:.2f} x raw"],
                          ["raw loopback copy + fsync", f"{mib / raw_s:,.0f} MiB/s", "1.00"]],
                         ["measure", "result", "vs raw"]))
    finally:
        for p in procs:
            p.stop()
        path = common.write_results("relay", r)
        say(f"results: {path}")
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
