"""The filesystem's own rate over a million durable message-shaped creates (issue 9's
flatness: is the fast start spoolq's doing or the disk's?).

    ./bench/run rawfill [--quick] [--messages N] [--keep]

No spoolq: in batches of 1,000, what ``send_many`` asks of the filesystem: a directory and
one small file (``msg``, 300 bytes) per message staged side by side, one ``syncfs``, a
rename of each into a per-second bucket directory, an fsync of each bucket touched. The
rate per tenth of N (1,000,000; ``--quick`` 100,000), the kernel's dirty and writeback
pages at each tenth, and last tenth / first, as ``bench/million.py`` prints them for
spoolq. Writes bench/results/rawfill-<time>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import say  # noqa: E402

BATCH = 1000
PER_BUCKET = 40  # messages per second-bucket: about what 10,000-15,000 msg/s gives with a ms id
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        raise OSError(ctypes.get_errno(), "syncfs")


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("Dirty", "Writeback"):
                out[k] = int(v.split()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 messages")
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    n = a.messages or (100_000 if a.quick else 1_000_000)
    work = common.make_base(a.dir, "rawfill")
    r: dict[str, Any] = {**common.run_header("rawfill", argv, work), "messages": n}
    body = b"x" * 300
    tenth = max(BATCH, n // 10 // BATCH * BATCH)
    rates: list[float] = []
    mem: list[dict[str, int]] = []
    say(f"rawfill in {work}: {n:,} message-shaped durable creates")
    try:
        que = work / "que"
        tmp = work / ".tmp"
        que.mkdir()
        tmp.mkdir()
        rootfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        made = 0
        t_tenth = time.perf_counter()
        while made < n:
            batch = tmp / f"b{made}"
            batch.mkdir()
            bfd = os.open(batch, os.O_RDONLY | os.O_DIRECTORY)
            for i in range(BATCH):
                os.mkdir(f"m{i}", dir_fd=bfd)
                fd = os.open(f"m{i}/msg", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=bfd)
                os.write(fd, body)
                os.close(fd)
            syncfs(rootfd)
            touched = {}
            for i in range(BATCH):
                k = made + i
                bucket = que / f"{k // (PER_BUCKET * 60 * 60):04d}" / f"{k // (PER_BUCKET * 60) % 60:02d}" / \
                    f"{k // PER_BUCKET % 60:02d}"
                if bucket not in touched:
                    bucket.mkdir(parents=True, exist_ok=True)
                    touched[bucket] = os.open(bucket, os.O_RDONLY | os.O_DIRECTORY)
                os.rename(f"m{i}", f"{k}", src_dir_fd=bfd, dst_dir_fd=touched[bucket])
            for fd in touched.values():
                os.fsync(fd)
                os.close(fd)
            os.fsync(bfd)
            os.close(bfd)
            os.rmdir(batch)
            made += BATCH
            if made % tenth == 0 or made >= n:
                now = time.perf_counter()
                rates.append(round(tenth / (now - t_tenth), 1))
                mem.append(meminfo())
                say(f"  {made:>9,}: {rates[-1]:,.0f} msg/s  dirty {mem[-1]['Dirty'] // 1024} MB, "
                    f"writeback {mem[-1]['Writeback'] // 1024} MB")
                t_tenth = now
        os.close(rootfd)
        r["rates_per_tenth"] = rates
        r["meminfo_per_tenth"] = mem
        r["last_over_first"] = round(rates[-1] / rates[0], 2)
        say(f"rate by tenth (msg/s): {', '.join(f'{x:,.0f}' for x in rates)}")
        say(f"last tenth / first = {r['last_over_first']:.2f}")
    finally:
        path = common.write_results("rawfill", r)
        say(f"results: {path}")
        if not a.keep:
            say(f"removing {work} ({common.rmtree_timed(work):.0f} s)")
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
