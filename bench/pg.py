"""PostgreSQL benchmark (issue 8): spoolq's PostgreSQL store and daemons beside procrastinate.

    ./bench/run pg [--quick] [--messages N] [--samples M] [--rate R] [--only spoolq,procrastinate]

One throwaway PostgreSQL cluster for the run (initdb + pg_ctl under the data directory, as
the ``postgres`` user when root; ``fsync=on``, ``synchronous_commit=on``: every commit of
both systems waits for the WAL flush), with two databases: ``spoolq`` (``spoolq db
migrate``) and ``procrastinate`` (``procrastinate schema --apply``).

Per system:

* enqueue/s: N messages one call each (spoolq ``client.send``, procrastinate ``defer``) and
  N in batches of 1,000 (``send_many``, ``batch_defer``), into a queue nobody serves (spoolq:
  paused). The two systems alternate in two rounds of N/2 each, so a burst of load on the
  machine hits both.
* processed/s with 1, 2 and 3 daemons / workers: spoolq ``serve`` processes (each with its
  own ``--home``; the queue has ``num_workers=2``, i.e. two scripts at once per daemon),
  procrastinate ``worker --concurrency 2`` processes. They are started and idle; then N
  messages are enqueued in batches of 1,000 and the clock runs from the first enqueue to
  the moment the database says the N-th is finished (spoolq ``counts``, procrastinate's
  job status). The program is /bin/true; procrastinate runs it with ``subprocess.run``
  (task ``program``) and also runs a no-op Python task (``function``, its best case).
* latency, enqueue -> start: M messages, one every 1/R s (open loop: a send never waits for
  the previous job) to an idle system with one daemon / worker. The program is ``stamp``
  (bench/stamp.c), which appends its key and clock_gettime(REALTIME) the moment it starts.
  From just before the enqueue call (``call``) and from its return (``ack``).

CPU seconds used per message by the daemons/workers (with their scripts) and by PostgreSQL
(all its processes) are recorded for each throughput run. Prints one table, the ratios
spoolq/procrastinate and the issue's figures (procrastinate: 899 enqueues/s, 376
processed/s on this machine), and writes bench/results/pg-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pg_cluster import find_bin_dir, unavailable_reason  # noqa: E402  (tests/pg_cluster.py)

from bench import common  # noqa: E402
from bench.common import say  # noqa: E402
from bench.daemon import Proc, Stamps, compile_stamp, free_port, wait_for  # noqa: E402

VENV_BIN = Path(sys.executable).parent
TRUE = "/bin/true"
BATCH = 1000
HOSTS = (1, 2, 3)
POLL = 0.025  # how often the harness asks the database how many are finished (both systems alike)
ISSUE_PROC_ENQ = 899.0  # the issue's figures for procrastinate on this machine
ISSUE_PROC_DONE = 376.0


# -- the cluster ----------------------------------------------------------------------------
class Cluster:
    """A PostgreSQL cluster of the run's own, under ``work/pg`` (the disk measured), durable."""

    def __init__(self, work: Path) -> None:
        why = unavailable_reason()
        if why:
            raise RuntimeError(why)
        bin_dir = find_bin_dir()
        assert bin_dir is not None
        self.bin = bin_dir
        self.dir = work / "pg"
        self.dir.mkdir()
        self.data = self.dir / "data"
        self.port = 0
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
                  "--encoding=UTF8", "--no-sync")
        for attempt in range(5):
            self.port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} "
                    "-c fsync=on -c synchronous_commit=on -c max_connections=200 "
                    + os.environ.get("BENCH_PG_OPTS", ""))  # e.g. pg_stat_statements for a profile
            try:
                self._run(str(self.bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
                          "-l", str(self.dir / "log"), "-o", opts)
                return
            except RuntimeError:
                if attempt == 4:
                    raise

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # fixed names only
        return self.url(name)

    def settings(self) -> dict[str, str]:
        import psycopg

        names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "full_page_writes",
                 "shared_buffers", "max_connections")
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            return {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[arg-type,index]

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def stop(self) -> None:
        if self.port:
            self._run(str(self.bin / "pg_ctl"), "stop", "-m", "fast", "-D", str(self.data))


# -- CPU accounting -------------------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds of the process trees under ``roots``: each live process's own time plus
    that of its children it has reaped (so a finished script counts in its daemon's)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(d)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = sum(int(x) for x in fields[11:15]) / TICK
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += times.get(p, 0.0)
        todo.extend(children.get(p, ()))
    return total


class CpuMeter:
    def __init__(self, workers: Callable[[], list[int]], postmaster: int) -> None:
        self.workers = workers
        self.postmaster = postmaster

    def snap(self) -> tuple[float, float]:
        return tree_cpu(self.workers()), tree_cpu([self.postmaster])


def cpu_per_msg(before: tuple[float, float], after: tuple[float, float], n: int) -> dict[str, float]:
    return {"workers_ms": round((after[0] - before[0]) * 1000 / n, 3),
            "postgres_ms": round((after[1] - before[1]) * 1000 / n, 3)}


# -- latency (open loop) ----------------------------------------------------------------------
def open_loop(m: int, rate: float, send: Callable[[str], None], stamps: Stamps,
              patience: float = 30.0) -> dict[str, Any]:
    """M sends, one every 1/rate s whatever happened to the previous ones; then wait (at most
    ``patience`` s) until each has started. Unstarted ones count with the time waited so far."""
    t_call: dict[str, float] = {}
    t_ack: dict[str, float] = {}
    start = time.monotonic()
    for i in range(m):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        key = f"k{i}"
        t_call[key] = time.time()
        send(key)
        t_ack[key] = time.time()
    try:
        wait_for(lambda: all(k in stamps.poll() for k in t_call), patience, "every probe to start", 0.01)
    except TimeoutError:
        pass
    now = time.time()
    seen = stamps.poll()
    unstarted = sum(k not in seen for k in t_call)
    return {"from_call_ms": common.summary_ms([seen.get(k, now) - t for k, t in t_call.items()]),
            "from_ack_ms": common.summary_ms([seen.get(k, now) - t for k, t in t_ack.items()]),
            "unstarted": unstarted, "rate": rate}


# -- spoolq -----------------------------------------------------------------------------------
class Spoolq:
    name = "spoolq"

    def __init__(self, url: str, work: Path, stamp: str) -> None:
        import spoolq

        self.url = url
        self.work = work
        self.stamp = stamp
        r = subprocess.run([str(VENV_BIN / "spoolq"), "--store", url, "db", "migrate"], capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"spoolq db migrate failed: {r.stdout}{r.stderr}")
        self.client = spoolq.open(url)
        self.stamps = Stamps(work / "spoolq-stamps")
        self.client.create_queue("enq", script=TRUE, num_workers=2)
        self.client.set_admin_state("enq", "PAUSE")  # enqueue only: nobody runs these
        for k in HOSTS:
            self.client.create_queue(f"tput{k}", script=TRUE, num_workers=2)
        self.client.create_queue("lat", script=stamp, num_workers=2, env_vars={"STAMP_FILE": str(self.stamps.path)})
        self.procs: list[Proc] = []
        self._made = 0

    def enqueue_single(self, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            self.client.send("enq", param1=str(i))
        return time.perf_counter() - t0

    def enqueue_batch(self, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            self.client.send_many("enq", [{"param1": str(j)} for j in range(i, min(n, i + BATCH))])
        return time.perf_counter() - t0

    @contextmanager
    def hosts(self, k: int) -> Iterator[Callable[[], list[int]]]:
        procs: list[Proc] = []
        try:
            for _ in range(k):
                self._made += 1
                home = self.work / f"home{self._made}"
                home.mkdir()
                log = self.work / f"daemon{self._made}.log"
                procs.append(Proc([str(VENV_BIN / "spoolq"), "--store", self.url, "serve", "--home", str(home),
                                   "--no-http", "--port", str(free_port())], log,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            for p in procs:
                wait_for(lambda p=p: b"serving" in p.log.read_bytes() or not p.alive(), 30,
                         "spoolq serve to start", 0.01)
                if not p.alive():
                    raise RuntimeError(f"spoolq serve exited: {p.log.read_text()[-2000:]}")
            time.sleep(0.5)
            yield lambda: [p.p.pid for p in procs]
        finally:
            for p in procs:
                p.stop()

    def finished(self, queue: str) -> int:
        c = self.client.counts(queue)
        return c["done"] + c["err"] + c["err_acked"]

    def throughput(self, k: int, n: int, meter: CpuMeter) -> dict[str, Any]:
        q = f"tput{k}"
        before = meter.snap()
        t0 = time.time()
        for i in range(0, n, BATCH):
            self.client.send_many(q, [{"param1": str(j)} for j in range(i, min(n, i + BATCH))])
        t_enq = time.time()
        t_end = wait_for(lambda: self.finished(q) >= n, 120 + n / 10, f"{n} spoolq messages", POLL)
        after = meter.snap()
        c = self.client.counts(q)
        return {"msg_s": n / (t_end - t0), "seconds": t_end - t0, "enqueue_seconds": t_enq - t0, "counts": c,
                "cpu_per_msg": cpu_per_msg(before, after, n)}

    def latency(self, m: int, rate: float) -> dict[str, Any]:
        out = open_loop(m, rate, lambda key: self.client.send("lat", param1=key), self.stamps)
        out["counts"] = self.client.counts("lat")
        return out

    def close(self) -> None:
        self.client.store.close()


# -- procrastinate --------------------------------------------------------------------------
class Procrastinate:
    name = "procrastinate"

    def __init__(self, url: str, work: Path, stamp: str) -> None:
        os.environ["BENCH_PROC_DSN"] = url
        self.env = {**os.environ, "PYTHONPATH": str(common.REPO), "BENCH_PROC_DSN": url}
        r = subprocess.run([str(VENV_BIN / "procrastinate"), "--app", "bench.procjobs.app", "schema", "--apply"],
                           capture_output=True, text=True, env=self.env, cwd=common.REPO, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"procrastinate schema --apply failed: {r.stdout}{r.stderr}")
        import psycopg

        from bench import procjobs

        self.jobs = procjobs
        self.app = procjobs.app.open()
        self.conn = psycopg.connect(url, autocommit=True)
        self.work = work
        self.stamp = stamp
        self.enq_program = procjobs.program.configure(queue="enq")
        self.version = _version("procrastinate")
        self._made = 0

    def enqueue_single(self, n: int) -> float:
        d = self.enq_program
        t0 = time.perf_counter()
        for i in range(n):
            d.defer(prog=TRUE, key=str(i), stamp_file="")
        return time.perf_counter() - t0

    def enqueue_batch(self, n: int) -> float:
        d = self.enq_program
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            d.batch_defer(*({"prog": TRUE, "key": str(j), "stamp_file": ""} for j in range(i, min(n, i + BATCH))))
        return time.perf_counter() - t0

    @contextmanager
    def hosts(self, k: int) -> Iterator[Callable[[], list[int]]]:
        procs: list[Proc] = []
        try:
            for _ in range(k):
                self._made += 1
                log = self.work / f"worker{self._made}.log"
                procs.append(Proc([str(VENV_BIN / "procrastinate"), "--app", "bench.procjobs.app", "worker",
                                   "--queues", "bench", "--concurrency", "2", "--name", f"bench{self._made}"],
                                  log, env=self.env, cwd=common.REPO))
            # the worker logs nothing at its default level: it is ready once it LISTENs
            wait_for(lambda: self._listeners() >= k or not all(p.alive() for p in procs), 30,
                     "procrastinate workers to listen", 0.02)
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"procrastinate worker exited: {p.log.read_text()[-2000:]}")
            time.sleep(0.5)
            yield lambda: [p.p.pid for p in procs]
        finally:
            for p in procs:
                p.stop()

    def _listeners(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND query ILIKE 'LISTEN%%'").fetchone()
        return int(row[0]) if row else 0

    def finished_since(self, first_id: int) -> int:
        row = self.conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE id >= %s "
                                "AND status IN ('succeeded', 'failed')", (first_id,)).fetchone()
        return int(row[0]) if row else 0

    def failed_since(self, first_id: int) -> int:
        row = self.conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE id >= %s AND status = 'failed'",
                                (first_id,)).fetchone()
        return int(row[0]) if row else 0

    def throughput(self, k: int, n: int, meter: CpuMeter, kind: str) -> dict[str, Any]:
        task = self.jobs.program if kind == "program" else self.jobs.function
        args: dict[str, Any] = {"prog": TRUE} if kind == "program" else {}
        before = meter.snap()
        t0 = time.time()
        first = 0
        for i in range(0, n, BATCH):
            ids = task.batch_defer(*({**args, "key": str(j), "stamp_file": ""} for j in range(i, min(n, i + BATCH))))
            first = first or min(ids)
        t_enq = time.time()
        t_end = wait_for(lambda: self.finished_since(first) >= n, 120 + n / 10, f"{n} procrastinate jobs",
                         POLL)
        after = meter.snap()
        return {"msg_s": n / (t_end - t0), "seconds": t_end - t0, "enqueue_seconds": t_enq - t0,
                "failed": self.failed_since(first), "cpu_per_msg": cpu_per_msg(before, after, n)}

    def latency(self, m: int, rate: float, kind: str) -> dict[str, Any]:
        stamps = Stamps(self.work / f"proc-{kind}-stamps")
        sf = str(stamps.path)
        if kind == "program":
            def send(key: str) -> None:
                self.jobs.program.defer(prog=self.stamp, key=key, stamp_file=sf)
        else:
            def send(key: str) -> None:
                self.jobs.function.defer(key=key, stamp_file=sf)
        return open_loop(m, rate, send, stamps)

    def close(self) -> None:
        self.app.close()
        self.conn.close()


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return "?"


# -- the run --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 messages, 50 latency samples")
    ap.add_argument("--messages", type=int, default=None, help="messages per figure (default 2000)")
    ap.add_argument("--samples", type=int, default=None, help="latency samples per system (default 200)")
    ap.add_argument("--rate", type=float, default=20.0, help="latency probes per second (default 20)")
    ap.add_argument("--only", default="spoolq,procrastinate", help="which systems to run")
    ap.add_argument("--dir", type=Path, default=common.DEFAULT_DATA, help="parent of the data directory")
    ap.add_argument("--keep", action="store_true", help="keep the data directory (the cluster is stopped)")
    a = ap.parse_args(argv)
    n = a.messages or (300 if a.quick else 2000)
    m = a.samples or (50 if a.quick else 200)
    only = set(a.only.split(","))
    work = common.make_base(a.dir, "pg")
    result: dict[str, Any] = {
        "kind": "pg", "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "command": " ".join(["bench/pg.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": common.machine(), "fs": common.fs_facts(work), "git": common.git_rev(),
        "messages": n, "samples": m, "rate": a.rate, "batch": BATCH, "errors": {},
    }
    say(f"pg benchmark in {work}: {n} messages per figure, {m} latency samples at {a.rate:g}/s")
    cluster = Cluster(work)
    systems: list[Any] = []
    try:
        stamp = compile_stamp(work)
        cluster.start()
        result["postgres"] = cluster.settings()
        say(f"PostgreSQL {result['postgres']['server_version']} on port {cluster.port}: "
            f"fsync={result['postgres']['fsync']}, synchronous_commit={result['postgres']['synchronous_commit']}")
        for name, cls in (("spoolq", Spoolq), ("procrastinate", Procrastinate)):
            if name not in only:
                continue
            sub = work / name
            sub.mkdir()
            try:
                systems.append(cls(cluster.create_database(name), sub, stamp))
            except Exception as e:
                result["errors"][name] = f"{type(e).__name__}: {e}"
                say(f"  {name} cannot run: {e}")
        for s in systems:
            result[s.name] = {"enqueue": {"single_s": 0.0, "batch_s": 0.0}, "processed": {}}
            if s.name == "procrastinate":
                result[s.name]["version"] = s.version
        # enqueue: alternate the systems, two rounds of n/2 each
        say("\nenqueue ...")
        halves = (n // 2, n - n // 2)
        for half in halves:
            for s in systems:
                e = result[s.name]["enqueue"]
                e["single_s"] += s.enqueue_single(half)
                e["batch_s"] += s.enqueue_batch(half)
        for s in systems:
            e = result[s.name]["enqueue"]
            e["single_per_s"] = n / e["single_s"]
            e["batch_per_s"] = n / e["batch_s"]
            say(f"  {s.name}: {e['single_per_s']:.0f}/s one by one, {e['batch_per_s']:.0f}/s in batches")
        # processed/s with 1, 2, 3 daemons / workers; latency with 1
        postmaster = cluster.postmaster_pid()
        for k in HOSTS:
            for s in systems:
                say(f"\n{s.name} with {k} {'daemon' if s.name == 'spoolq' else 'worker'}{'s' if k > 1 else ''} ...")
                try:
                    with s.hosts(k) as pids:
                        meter = CpuMeter(pids, postmaster)
                        if s.name == "spoolq":
                            v = s.throughput(k, n, meter)
                            result[s.name]["processed"][str(k)] = v
                            say(f"  {v['msg_s']:.0f} msg/s, CPU/msg: daemons {v['cpu_per_msg']['workers_ms']:.2f} ms, "
                                f"postgres {v['cpu_per_msg']['postgres_ms']:.2f} ms")
                            if k == 1:
                                time.sleep(1.0)
                                lat = s.latency(m, a.rate)
                                result[s.name]["latency"] = lat
                                say(f"  latency p50 {lat['from_call_ms']['p50']:.2f} ms, "
                                    f"p99 {lat['from_call_ms']['p99']:.2f} ms")
                        else:
                            for kind in ("program", "function"):
                                v = s.throughput(k, n, meter, kind)
                                result[s.name]["processed"].setdefault(kind, {})[str(k)] = v
                                say(f"  {kind}: {v['msg_s']:.0f} msg/s, CPU/msg: workers "
                                    f"{v['cpu_per_msg']['workers_ms']:.2f} ms, "
                                    f"postgres {v['cpu_per_msg']['postgres_ms']:.2f} ms")
                                meter = CpuMeter(pids, postmaster)
                            if k == 1:
                                for kind in ("program", "function"):
                                    time.sleep(1.0)
                                    lat = s.latency(m, a.rate, kind)
                                    result[s.name].setdefault("latency", {})[kind] = lat
                                    say(f"  latency {kind}: p50 {lat['from_call_ms']['p50']:.2f} ms, "
                                        f"p99 {lat['from_call_ms']['p99']:.2f} ms")
                except Exception as e:
                    result["errors"][f"{s.name}-{k}"] = f"{type(e).__name__}: {e}"
                    say(f"  FAILED: {e}")
    finally:
        for s in systems:
            try:
                s.close()
            except Exception:
                pass
        try:
            cluster.stop()
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report(result)
    path = common.write_results("pg", result)
    say(f"\nresults: {path}")
    return 0


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(r: dict[str, Any]) -> None:
    s, p = r.get("spoolq"), r.get("procrastinate")

    def tput(v: dict[str, Any] | None, k: int) -> float | None:
        return None if not v or str(k) not in v else v[str(k)]["msg_s"]

    def lat(v: dict[str, Any] | None) -> tuple[float | None, float | None, int]:
        if not v:
            return None, None, 0
        return v["from_call_ms"]["p50"], v["from_call_ms"]["p99"], v.get("unstarted", 0)

    rows: list[list[str]] = []
    figures: dict[str, list[float | None]] = {}

    def row(label: str, enq: dict[str, Any] | None, proc: dict[str, Any] | None, latv: dict[str, Any] | None) -> None:
        p50, p99, unstarted = lat(latv)
        vals = [enq["single_per_s"] if enq else None, enq["batch_per_s"] if enq else None,
                *(tput(proc, k) for k in HOSTS), p50, p99]
        figures[label] = vals
        rows.append([label, *(_f(v) for v in vals[:5]), _f(p50, "{:.2f}"), _f(p99, "{:.2f}")
                     + (f" ({unstarted} unstarted)" if unstarted else "")])

    if s:
        row("spoolq serve, 2 workers/daemon", s["enqueue"], s["processed"], s.get("latency"))
    if p:
        row("procrastinate, program (subprocess.run)", p["enqueue"], p["processed"].get("program"),
            (p.get("latency") or {}).get("program"))
        row("procrastinate, no-op function", None, p["processed"].get("function"),
            (p.get("latency") or {}).get("function"))
    header = ["system", "enq/s single", "enq/s batch", "done/s x1", "done/s x2", "done/s x3", "p50 ms", "p99 ms"]
    say("\n" + common.table(rows, header))
    say(f"N = {r['messages']}, batches of {r['batch']}; x1/x2/x3 = daemons (spoolq) or workers "
        f"(procrastinate, --concurrency 2); latency = enqueue call -> program start, "
        f"{r['samples']} probes at {r['rate']:g}/s, open loop, one daemon/worker")
    cpu_rows = []
    pp_ = (p or {}).get("processed", {})
    for label, v in (("spoolq", (s or {}).get("processed")), ("procrastinate program", pp_.get("program")),
                     ("procrastinate function", pp_.get("function"))):
        if v:
            cpu_rows.append([label, *(f"{v[str(k)]['cpu_per_msg']['workers_ms']:.2f} / "
                                      f"{v[str(k)]['cpu_per_msg']['postgres_ms']:.2f}" if str(k) in v else "-"
                                      for k in HOSTS)])
    if cpu_rows:
        say("\nCPU ms per message, daemons-or-workers (with their programs) / PostgreSQL")
        say(common.table(cpu_rows, ["system", "x1", "x2", "x3"]))
    if s and p:
        sp, pp = figures[rows[0][0]], figures[rows[1][0]]
        names = ["enqueue single", "enqueue batch", *(f"processed x{k}" for k in HOSTS), "p50", "p99"]
        ratios = {}
        for name, a, b in zip(names, sp, pp, strict=True):
            if a and b:
                ratios[name] = a / b if name not in ("p50", "p99") else b / a
        r["ratios_spoolq_procrastinate"] = ratios
        say("\nspoolq / procrastinate (program): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
            + "  (latency: procrastinate's / spoolq's, > 1 = spoolq faster)")
    if s:
        enq = s["enqueue"]["single_per_s"]
        best = max((v["msg_s"] for v in s["processed"].values()), default=0.0)
        say(f"issue 8 figures: procrastinate 899 enqueues/s, 376 processed/s: spoolq enqueue {enq:.0f}/s "
            f"{common.verdict(enq > ISSUE_PROC_ENQ)}, processed (best of x1-x3) {best:.0f}/s "
            f"{common.verdict(best > ISSUE_PROC_DONE)}")
        grows = [tput(s["processed"], k) for k in HOSTS]
        if all(g is not None for g in grows):
            say("spoolq processed/s x1 -> x2 -> x3: " + " -> ".join(f"{g:.0f}" for g in grows if g is not None))
    say(f"load average at start {r['machine']['loadavg_at_start']}, at end {r['machine'].get('loadavg_at_end')}")
    for k, e in r["errors"].items():
        say(f"{k}: {e}")


if __name__ == "__main__":
    sys.exit(main())
