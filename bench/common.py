"""Shared helpers of the benchmark scripts: where to put data, machine facts, results, tables.

Benchmarks are documented commands (bench/README.md), never timed tests.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
DEFAULT_DATA = REPO.parent / "bench-data"  # on /work: the filesystem spoolq is used on


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def make_base(parent: Path, name: str) -> Path:
    """A fresh directory for one run, ``parent/<name>-<time>-<pid>``.

    ``parent`` gets ext4's "top of directory hierarchy" flag (``chattr +T``) when possible, so
    the allocator spreads each run's directories to quiet block groups. That matters on an
    ext4 without a journal (as on the benchmark VM): there the kernel skips inodes freed in
    the last minutes, one by one, on every create (fs/ext4/ialloc.c, recently_deleted()),
    so a block group where other processes just deleted files makes every create slower.
    Raw and spoolq figures are measured under the same parent, so the flag favours neither.
    """
    parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("chattr"):
        subprocess.run(["chattr", "+T", str(parent)], stderr=subprocess.DEVNULL, check=False)
    base = parent / f"{name}-{utc_stamp()}-{os.getpid()}"
    base.mkdir()
    return base


def fs_facts(path: Path) -> dict[str, Any]:
    """The filesystem a path lives on: type, device, and (ext4) whether it has a journal."""
    facts: dict[str, Any] = {"path": str(path)}
    try:
        facts["fstype"] = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                                         text=True, check=False).stdout.strip()
        st = os.stat(path)
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        facts["device"] = dev
        name = os.path.basename(os.path.realpath(f"/sys/dev/block/{dev}"))
        jt = Path(f"/sys/fs/ext4/{name}/journal_task")
        if jt.exists():
            facts["fstype"] = "ext4"
            facts["ext4_journal"] = jt.read_text().strip() != "<none>"
        if shutil.which("findmnt"):
            facts["mount"] = subprocess.run(["findmnt", "-no", "TARGET,SOURCE,OPTIONS", "-T", str(path)],
                                            capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        pass
    return facts


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def git_rev() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def run_header(kind: str, argv: Sequence[str] | None, work: Path) -> dict[str, Any]:
    """The facts every result file starts with: kind, date, command, machine, fs, git."""
    return {
        "kind": kind, "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "command": " ".join([f"bench/{kind}.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "fs": fs_facts(work), "git": git_rev(),
    }


def write_results(kind: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{kind}-{utc_stamp()}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank), 0 < p <= 100."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p99/max/mean of durations given in seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50": round(pct(ms, 50), 3), "p99": round(pct(ms, 99), 3),
            "max": round(max(ms), 3), "mean": round(statistics.fmean(ms), 3)}


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    line = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), line, *(fmt(r) for r in cells[1:])])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def say(*args: Any) -> None:
    print(*args, flush=True)


def free_gb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**30


def rmtree_timed(path: Path) -> float:
    t = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    return time.perf_counter() - t


def python() -> str:
    return sys.executable
