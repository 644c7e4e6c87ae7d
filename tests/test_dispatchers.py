"""``spoolq serve --dispatchers K``: K processes dispatch one root, a queue of persistent
workers split between them by message (spoolq/parts.py, daemon/helpers.py). The real
daemon and its helpers, real worker programs, SIGKILLs of either side."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SPOOLQ, fs
from daemon_util import alive, serve_fixture, wait_for

import spoolq
from spoolq.model import MessageFields, QueueConfig, State
from spoolq.parts import Part, splittable

WORKER = """
import os, time
import spoolq

@spoolq.worker("w")
def handle(job):
    if job.param1.startswith("sleep:"):
        time.sleep(float(job.param1[6:]))
    return str(os.getppid())  # the dispatch process that runs this worker

if __name__ == "__main__":
    raise SystemExit(spoolq.run_worker())
"""


@pytest.fixture
def serve(root: Path) -> Iterator[Any]:
    yield from serve_fixture(root)


def worker(tmp_path: Path) -> str:
    path = tmp_path / "worker.py"
    path.write_text(f"#!{sys.executable}\n" + WORKER)
    path.chmod(0o755)
    return str(path)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def helper_pids(main_pid: int) -> list[int]:
    """The main process's children that are dispatch helpers (``serve --dispatch-part``)."""
    out = []
    for pid in children(main_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"--dispatch-part" in f.read():
                    out.append(pid)
        except OSError:
            continue
    return out


def metric_of(port: int, name: str) -> str:
    """One unlabelled-or-labelled sample of the daemon's /metrics, as text ("missing" if absent)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        text = r.read().decode()
    return next((x.split()[-1] for x in text.splitlines() if x.startswith(name + " ")), "missing")


def owner_index(msg_id: str, k: int = 2) -> int:
    return zlib.crc32(msg_id.encode()) % k


def in_both_parts(client: spoolq.Client, fields: MessageFields, n: int) -> list[str]:
    """Send ``n`` messages to ``w``, and more one at a time until both processes own some
    (ids are not chosen: 8 could all be one process's, once in 128)."""
    ids = [m.msg_id for m in client.send_many("w", [fields.copy() for _ in range(n)])]
    while {owner_index(i) for i in ids} != {0, 1}:
        ids.append(client.send("w", **fields).msg_id)
    return ids


def all_done(client: spoolq.Client, n: int) -> bool:
    c = client.counts("w")
    return bool(c["done"] + c["err"] >= n)


def test_two_processes_share_a_queue_of_workers_by_message(client: spoolq.Client, serve: Any,
                                                         tmp_path: Path) -> None:
    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=4)
    client.create_queue("s", script="/bin/true")  # a script queue: the main process's alone
    served = serve("--dispatchers", "2")
    wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")
    helper = helper_pids(served.pid)[0]
    sent = [m.msg_id for m in client.send_many("w", [{"param1": str(i)} for i in range(200)])]
    scripts = [m.msg_id for m in client.send_many("s", [{"param1": str(i)} for i in range(5)])]
    wait_for(lambda: all_done(client, 200), 60, "every message")
    c = client.counts("w")
    assert c["done"] == 200 and c["que"] == c["run"] == c["err"] == 0, c
    ran_by = {i: int(client.get(f"w/{i}").job_status) for i in sent}
    # Each message ran in the worker of the process that owns it, and both took part.
    assert {ran_by[i] for i in sent if owner_index(i) == 0} == {served.pid}
    assert {ran_by[i] for i in sent if owner_index(i) == 1} == {helper}
    wait_for(lambda: client.counts("s")["done"] == 5, 20, "the script queue")
    assert all(client.get(f"s/{i}").state == State.DONE for i in scripts)
    # Each process runs one of the queue's two workers, its files in its own directory.
    assert len(list((served.root / "workers").glob("w.*.pid"))) == 1
    assert len(list((served.root / "workers" / "d1").glob("w.*.pid"))) == 1
    assert "2 dispatch processes share the queue(s) w" in served.log()
    assert served.stop() == 0
    assert not alive(helper)


def test_a_helper_killed_under_load_loses_nothing(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    """SIGKILL the helper while its worker holds messages: the main process starts it
    again, the new helper recovers its part of run/ and runs it; every message ends done."""
    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=8,
                        max_count=100)
    served = serve("--dispatchers", "2")
    wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")
    sent = [m.msg_id for m in client.send_many("w", [{"param1": "sleep:0.01"} for _ in range(300)])]

    def done_reaches(n: int) -> bool:
        return bool(client.counts("w")["done"] >= n)

    def another_helper(gone: int) -> bool:
        return helper_pids(served.pid) not in ([], [gone])

    for _ in range(3):
        helper = wait_for(lambda: helper_pids(served.pid), 20, "a dispatch helper")[0]
        wait_for(functools.partial(children, helper), 20, "the helper's worker")  # it is dispatching
        wait_for(functools.partial(done_reaches, client.counts("w")["done"] + 10), 20, "messages to run meanwhile")
        os.kill(helper, signal.SIGKILL)
        wait_for(functools.partial(another_helper, helper), 20, "the helper started again")
    wait_for(lambda: all_done(client, 300), 120, "every message")
    c = client.counts("w")
    assert c["done"] == 300 and c["que"] == c["run"] == c["err"] == 0, c
    assert all(client.get(f"w/{i}").state == State.DONE for i in sent)
    assert served.log().count("recounting the shared queues") == 3
    # Only the killed helper's part was recovered: the main process's messages never were.
    recovered = [i for i in sent if any(h.get("note") == "recovered" for h in client.get(f"w/{i}").message.history)]
    assert recovered and all(owner_index(i) == 1 for i in recovered)
    assert served.stop() == 0


def test_the_helpers_die_with_the_main_process(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    """SIGKILL the main process: its helper dies with it (PR_SET_PDEATHSIG), and the next
    serve recovers and runs everything."""
    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=8)
    served = serve("--dispatchers", "2")
    helper = wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")[0]
    sent = [m.msg_id for m in client.send_many("w", [{"param1": "sleep:0.01"} for _ in range(100)])]
    wait_for(lambda: client.counts("w")["run"] > 0, 20, "messages to run")
    served.kill()
    wait_for(lambda: not alive(helper), 20, "the helper to die with the main process")
    again = serve("--dispatchers", "2")
    wait_for(lambda: all_done(client, 100), 60, "every message")
    assert all(client.get(f"w/{i}").state == State.DONE for i in sent)
    assert again.stop() == 0


def test_dispatchers_is_checked(cli: Any) -> None:
    for bad in ("0", "17"):
        r = cli("serve", "--no-http", "--dispatchers", bad)
        assert r.returncode != 0 and "--dispatchers" in r.stderr
    r = cli("serve", "--no-http", "--dispatch-part", "1/2:w")
    assert r.returncode != 0 and "--dispatchers" in r.stderr


def test_which_queues_are_split() -> None:
    def cfg(**kw: Any) -> QueueConfig:
        return QueueConfig.from_dict({"name": "q", "script": "/bin/true", "kind": "worker", "num_workers": 4, **kw})

    assert splittable(cfg(), 2) and splittable(cfg(), 4)
    assert not splittable(cfg(), 1) and not splittable(cfg(), 5)  # a process without a worker
    assert not splittable(cfg(kind="script"), 2)
    assert not splittable(cfg(blocking_params=[1]), 2)
    assert not splittable(cfg(coalesce_params=[2]), 2)
    assert not splittable(cfg(cluster_workers=4), 2)


def test_each_message_has_one_owner_and_the_workers_add_up() -> None:
    split = frozenset({"w"})
    parts = [Part(i, 3, split) for i in range(3)]
    ids = [f"20261205.0600.00.{n:03d}.{n * 7919}" for n in range(300)]
    for i in ids:
        assert sum(p.owns("w", i) for p in parts) == 1
        assert [p.owns("other", i) for p in parts] == [True, False, False]  # a whole queue: the main's
    assert {sum(p.owns("w", i) for i in ids) > 50 for p in parts} == {True}  # spread, not lumped
    for n in range(3, 12):
        assert sum(p.workers("w", n) for p in parts) == n
    assert Part.parse(parts[2].arg()) == parts[2]
    with pytest.raises(ValueError):
        Part(2, 2)


def test_a_helper_does_not_outlive_a_parent_that_is_gone(root: Path, tmp_path: Path) -> None:
    """A helper whose parent pid is not its parent's (the main process died before the
    helper could ask to die with it) exits at once instead of serving unwatched."""
    spoolq.open(root).create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2)
    r = subprocess.run([SPOOLQ, "--root", str(root), "serve", "--no-http", "--dispatch-part", "1/2:w",
                        "--dispatch-parent", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "is gone" in r.stderr
    assert not (root / "dispatch.1.pid").exists()  # it stopped before taking its lock


def test_a_helpers_events_and_counters_reach_the_main_process(client: spoolq.Client, root: Path,
                                                              tmp_path: Path) -> None:
    """The notifier (in the main process) carries the state events of every message of a
    split queue, the helper's too, and /metrics counts them all."""
    import json
    import socket
    import urllib.request

    from daemon_util import Served, free_port

    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=4)
    notify = free_port()
    served = Served(root, "--dispatchers", "2", "--notify-port", str(notify), "--trust-loopback",
                    http=True).start()
    try:
        wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")
        sock = socket.create_connection(("127.0.0.1", notify), timeout=10)
        sock.settimeout(1)
        buf = b""

        def events(until: Any, timeout: float = 30) -> set[tuple[str, str]]:
            """(msg id, state) of the events that come until ``until(got)`` or the timeout."""
            nonlocal buf
            got: set[tuple[str, str]] = set()
            deadline = time.monotonic() + timeout
            while not until(got) and time.monotonic() < deadline:
                try:
                    buf += sock.recv(65536)
                except TimeoutError:
                    continue
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b":"):
                        e = json.loads(line)
                        got.add((e["msg_id"], e["state"]))
            return got

        sock.sendall(b":join events.w\n")
        events(lambda _: b":ok join events.w\n" in buf, 10)
        # The helper hears that someone listens at its next turn: probe with messages it
        # owns until one's events come through, then send the batch.
        probes = 0
        for i in range(20):
            probe = client.send("w", param1=f"probe {i}").msg_id
            probes += 1
            if owner_index(probe) == 1 and (probe, "done") in events(lambda g, p=probe: (p, "done") in g, 5):
                break
        else:
            raise AssertionError("no event of the helper's messages reached the notifier")
        sent = [m.msg_id for m in client.send_many("w", [{"param1": str(i)} for i in range(40)])]
        want = {(i, s) for i in sent for s in ("run", "done")}
        got = events(lambda g: want <= g)
        missing = want - got
        assert not missing, f"{len(missing)} events missing, e.g. {sorted(missing)[:4]}"
        assert {owner_index(i) for i in sent} == {0, 1}

        def outcomes() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics") as r:
                text = r.read().decode()
            line = next((x for x in text.splitlines()
                         if x.startswith('spoolq_job_outcomes_total{queue="w",outcome="done"}')), "")
            return int(line.split()[-1]) if line else 0

        total = probes + len(sent)
        wait_for(lambda: client.counts("w")["done"] == total, 20, "every message counted done")
        try:
            wait_for(lambda: outcomes() == total, 20, "/metrics to count every message")
        except AssertionError:
            raise AssertionError(f"/metrics counts {outcomes()} done, the queue {total}") from None
        sock.close()
    finally:
        served.stop()


def test_a_stop_past_the_grace_hands_back_what_every_process_held(client: spoolq.Client, serve: Any,
                                                                   tmp_path: Path) -> None:
    """SIGTERM while both processes' workers run messages longer than --grace: the helpers
    stop their workers too, and what they held goes back to que as a stop's (count
    unchanged), not as a crash's; no worker outlives serve."""
    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=1,
                        max_count=1)
    served = serve("--dispatchers", "2", "--grace", "1")
    wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")
    ids = in_both_parts(client, {"param1": "sleep:60"}, 8)
    running = wait_for(lambda: [i for i in ids if client.get(f"w/{i}").state == State.RUN]
                       if client.counts("w")["run"] == 2 else [], 20, "both workers busy")
    assert {owner_index(i) for i in running} == {0, 1}
    workers = [int(p.read_text().split()[0]) for p in (served.root / "workers").rglob("w.*.pid")]
    assert len(workers) == 2
    assert served.stop() == 0
    assert not [p for p in workers if alive(p)]
    for i in running:
        v = client.get(f"w/{i}")
        assert v.state == State.QUE and v.message.count == 0, (v.state, v.message.count, v.job_status)
    assert client.counts("w")["run"] == 0


def test_sighup_reaches_the_helpers(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    """SIGHUP (for edits inotify cannot see: a config.json that is a link to a file
    elsewhere) makes every dispatch process read the configs again."""
    path = tmp_path / "tagger.py"
    path.write_text(f"#!{sys.executable}\n" + WORKER.replace("return str(os.getppid())",
                                                             'return os.environ["TAG"] + " " + str(os.getppid())'))
    path.chmod(0o755)
    client.create_queue("w", script=str(path), kind="worker", num_workers=2, env_vars={"TAG": "old"})
    cfg = fs(client).qdir("w") / "config.json"
    elsewhere = tmp_path / "w.json"
    elsewhere.write_text(cfg.read_text())
    cfg.unlink()
    cfg.symlink_to(elsewhere)
    served = serve("--dispatchers", "2")
    wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")
    client.send_many("w", [{} for _ in range(20)])
    wait_for(lambda: client.counts("w")["done"] == 20, 20, "the first batch")
    elsewhere.write_text(elsewhere.read_text().replace('"old"', '"new"'))
    os.kill(served.pid, signal.SIGHUP)
    wait_for(lambda: served.log().count("SIGHUP: re-reading") == 2, 20, "both processes to re-read")
    ids = [m.msg_id for m in client.send_many("w", [{} for _ in range(40)])]
    wait_for(lambda: client.counts("w")["done"] == 60, 30, "the second batch")
    tags = {(owner_index(i), client.get(f"w/{i}").job_status.split()[0]) for i in ids}
    assert tags == {(0, "new"), (1, "new")}


@pytest.mark.parametrize("change", [{"num_workers": 1}, {"blocking_params": [1]}], ids=["one-worker", "blocking"])
def test_a_split_queue_whose_config_no_longer_allows_it_is_dispatched_by_one_process(
        client: spoolq.Client, serve: Any, tmp_path: Path, change: dict[str, Any]) -> None:
    """num_workers 1 (one message at a time) or blocking_params set at runtime: the helpers
    stop, the queue is whole again, and no two of its messages run at once."""
    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=1)
    served = serve("--dispatchers", "2")
    helper = wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")[0]
    client.update_queue("w", **change)
    wait_for(lambda: "no queue is shared any more" in served.log(), 20, "the parts planned again")
    assert not alive(helper) and not helper_pids(served.pid)
    ids = [m.msg_id for m in client.send_many("w", [{"param1": "sleep:0.05"} for _ in range(12)])]
    peak = 0
    deadline = time.monotonic() + 30
    while client.counts("w")["done"] < 12 and time.monotonic() < deadline:
        peak = max(peak, client.counts("w")["run"])
    assert client.counts("w")["done"] == 12 and peak <= 1
    assert {int(client.get(f"w/{i}").job_status) for i in ids} == {served.pid}


def test_kicks_reach_the_process_that_owns_the_message(client: spoolq.Client, serve: Any,
                                                       tmp_path: Path) -> None:
    """run-now and cancel write a kick that only the message's owner consumes, also while
    that owner is a helper being started again."""
    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=4)
    served = serve("--dispatchers", "2")

    def all_in(ids: list[str], state: State) -> bool:
        return all(client.get(f"w/{i}").state == state for i in ids)

    for kill in (False, True):
        helper = wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")[0]
        wait_for(functools.partial(children, helper), 20, "the helper's worker")
        later = in_both_parts(client, {"param1": "x", "delay": 3600}, 10)
        long = in_both_parts(client, {"param1": "sleep:60"}, 4)
        wait_for(functools.partial(all_in, long, State.RUN), 20, "long ones run")
        if kill:
            os.kill(helper, signal.SIGKILL)
        for i in later:
            client.run_now(f"w/{i}")
        for i in long:
            client.cancel(f"w/{i}", wait=0)
        wait_for(functools.partial(all_in, later, State.DONE), 30, "run-now")
        wait_for(functools.partial(all_in, long, State.ERR), 30, "cancel")
    assert served.stop() == 0


def test_a_new_serve_waits_for_the_helpers_of_an_earlier_one(root: Path, client: spoolq.Client) -> None:
    """No process may recover run/ while a helper of an earlier serve still runs: a start
    waits until every dispatch.<i>.pid lock is free."""
    import fcntl

    from daemon_util import Served

    client.create_queue("q", script="/bin/true")
    lock = os.open(root / "dispatch.1.pid", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    s = Served(root).start(wait=False)
    try:
        wait_for(lambda: "waiting for dispatch.1.pid" in s.log(), 20, "the start to wait for the lock")
        assert "serving " not in s.log()  # it serves only once the lock is free
        os.close(lock)  # the earlier helper is gone
        s.wait_ready()
        assert client.wait(client.send("q"), 20).state == State.DONE
    finally:
        s.stop()


def test_no_helper_starts_while_the_main_process_holds_a_recovery_of_its_part(
        client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    """Start-up recovery takes every message in run/, a helper's part too. If the disk
    refuses such a move, the finish is held and retried; a helper started meanwhile would
    recover the same message and run it beside the retry. The helpers wait for it."""
    import json

    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here: it stands in for a disk that refuses a move")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    log = tmp_path / "runs.jsonl"
    path = tmp_path / "recorder.py"
    path.write_text(f"#!{sys.executable}\n" + """
import json, os, time
import spoolq

@spoolq.worker("w")
def handle(job):
    with open(os.environ["RUNS"], "a") as f:
        f.write(json.dumps([job.id, 1, os.getpid()]) + "\\n")
    time.sleep(float(job.param1))
    with open(os.environ["RUNS"], "a") as f:
        f.write(json.dumps([job.id, -1, os.getpid()]) + "\\n")

if __name__ == "__main__":
    raise SystemExit(spoolq.run_worker())
""")
    path.chmod(0o755)
    client.create_queue("w", script=str(path), kind="worker", num_workers=6, worker_inflight=1,
                        env_vars={"RUNS": str(log)})
    first = serve()
    ids = in_both_parts(client, {"param1": "3"}, 6)
    client.update_queue("w", num_workers=len(ids))
    wait_for(lambda: client.counts("w")["run"] == len(ids), 20, "every message running")
    orphans = {int(p.read_text().split()[0]) for p in (first.root / "workers").glob("w.*.pid")}
    first.kill()  # a crash: all six are left in run/, their workers orphans (killed at the next start)
    que = fs(client).qdir("w") / "que"
    buckets = {str(p.parent) for p in que.rglob("msg")} | {str(p) for p in que.rglob("*") if p.is_dir()}
    buckets |= {str(que / Path(*p.relative_to(fs(client).qdir("w") / "run").parts[:3]))
                for p in (fs(client).qdir("w") / "run").glob("*/*/*")}
    for b in sorted(buckets):
        os.makedirs(b, exist_ok=True)
    frozen = sorted(buckets, key=len, reverse=True)
    subprocess.run(["chattr", "+i", *frozen], check=True)  # recovery's moves back to que/ fail
    try:
        again = serve("--dispatchers", "2")
        wait_for(lambda: "held for a retry" in again.log(), 20, "recovery to hold its moves")
        assert not helper_pids(again.pid)
    finally:
        subprocess.run(["chattr", "-i", *frozen], check=True)
    wait_for(lambda: all(client.get(f"w/{i}").state == State.DONE for i in ids), 60, "every message done")
    wait_for(lambda: helper_pids(again.pid), 20, "the helper, once the held moves are done")
    depth: dict[str, int] = {}
    for line in log.read_text().splitlines():
        i, d, pid = json.loads(line)
        if pid not in orphans:  # their runs were cut short by the crash
            depth[i] = depth.get(i, 0) + d
            assert depth[i] <= 1, f"{i} ran twice at once"
    assert again.stop() == 0


def test_a_helper_that_dies_just_before_a_replan_leaves_nothing_in_run(client: spoolq.Client, serve: Any,
                                                                       tmp_path: Path) -> None:
    """The helper is killed while its messages run, and before the main process notices,
    the queue's config comes to need one process: the queue is the main process's again,
    and it recovers what the dead helper left in run/ (and recounts)."""
    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2, worker_inflight=4)
    served = serve("--dispatchers", "2")
    helper = wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")[0]
    ids = in_both_parts(client, {"param1": "sleep:2"}, 8)
    theirs = [i for i in ids if owner_index(i) == 1]
    wait_for(lambda: any(client.get(f"w/{i}").state == State.RUN for i in theirs), 20, "the helper busy")
    os.kill(served.pid, signal.SIGSTOP)  # both happen before the main process looks
    try:
        client.update_queue("w", num_workers=1)
        os.kill(helper, signal.SIGKILL)
        wait_for(lambda: not alive(helper), 10, "the helper dead")
    finally:
        os.kill(served.pid, signal.SIGCONT)
    wait_for(lambda: "no queue is shared any more" in served.log(), 20, "the parts planned again")
    wait_for(lambda: all(client.get(f"w/{i}").state == State.DONE for i in ids), 60, "every message done")
    wait_for(lambda: client.counts("w") == {**client.counts("w"), "que": 0, "run": 0, "done": len(ids)}, 20,
             "exact counts")
    assert served.stop() == 0


def test_status_and_metrics_show_the_dispatch_processes(client: spoolq.Client, root: Path, cli: Any,
                                                        tmp_path: Path) -> None:
    """`spoolq status` names each dispatch process, its pid and the queues it shares;
    /metrics counts the processes and a helper's exit; both follow a helper's restart."""
    import urllib.request

    from daemon_util import Served

    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2)
    client.create_queue("s", script="/bin/true")  # not split: no process says it shares it
    served = Served(root, "--dispatchers", "2", "--trust-loopback", http=True).start()

    def metric(name: str) -> str:
        return metric_of(served.port, name)

    def shown(helper: int) -> None:
        # The helper process is there before it has taken its lock: wait for the lock.
        wait_for(lambda: len(cli.json("status")["daemon"]["processes"]) == 2, 20, "the helper's lock")
        assert cli.json("status")["daemon"] == {"serving": True, "processes": [
            {"index": 0, "pid": served.pid, "shares": ["w"]}, {"index": 1, "pid": helper, "shares": ["w"]}]}
        lines = cli("status").stdout.splitlines()
        assert f"daemon: pid {served.pid}, shares w" in lines
        assert f"dispatch helper 1: pid {helper}, shares w" in lines

    try:
        helper = wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")[0]
        shown(helper)
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/") as r:  # the UI's dashboard
            page = r.read().decode()
        assert f"2 dispatch processes (daemon pid {served.pid}, helper 1 pid {helper}) share w" in page
        assert metric("spoolq_dispatch_processes") == "2"
        assert metric('spoolq_dispatch_helper_exits_total{helper="1"}') == "0"
        assert metric("spoolq_dispatch_helpers_given_up") == "0"
        os.kill(helper, signal.SIGKILL)
        again = wait_for(lambda: [p for p in helper_pids(served.pid) if p != helper], 30, "a new helper")[0]
        wait_for(lambda: metric("spoolq_dispatch_processes") == "2", 20, "two processes again")
        assert metric('spoolq_dispatch_helper_exits_total{helper="1"}') == "1"
        shown(again)
    finally:
        served.stop()
    assert cli.json("status")["daemon"] == {"serving": False, "processes": []}
    assert "daemon: none serving this spool" in cli("status").stdout.splitlines()


def test_status_of_a_daemon_with_one_process(client: spoolq.Client, serve: Any, cli: Any) -> None:
    client.create_queue("s", script="/bin/true")
    served = serve()
    assert cli.json("status")["daemon"] == {"serving": True,
                                            "processes": [{"index": 0, "pid": served.pid, "shares": []}]}
    assert f"daemon: pid {served.pid}" in cli("status").stdout.splitlines()


def test_helpers_that_keep_dying_at_start_are_given_up(client: spoolq.Client, root: Path, tmp_path: Path) -> None:
    """A helper that cannot start (here: something else holds its lock) dies young again and
    again; after 5 such deaths the main process dispatches every queue itself, and /metrics
    says so (the exits and the given-up gauge outlive the helpers)."""
    import fcntl
    import threading

    from daemon_util import Served

    client.create_queue("w", script=worker(tmp_path), kind="worker", num_workers=2)
    served = Served(root, "--dispatchers", "2", "--trust-loopback", http=True).start()

    def metric(name: str) -> str:
        return metric_of(served.port, name)

    fd = -1
    try:
        helper = wait_for(lambda: helper_pids(served.pid), 20, "the dispatch helper")[0]
        wait_for(lambda: (spoolq.open(root).dispatch_processes() or {}).get("processes", [])[1:], 20,
                 "the helper's lock")
        fd = os.open(root / "dispatch.1.pid", os.O_RDWR)
        # Blocked until the helper's death lets go of its lock: then every restart fails to take it.
        taker = threading.Thread(target=fcntl.flock, args=(fd, fcntl.LOCK_EX), daemon=True)
        taker.start()
        os.kill(helper, signal.SIGKILL)
        taker.join(10)
        assert not taker.is_alive(), "the dead helper's lock was not released"
        wait_for(lambda: "keep dying at start" in served.log(), 90, "the main process to give up")
        assert metric("spoolq_dispatch_helpers_given_up") == "1"
        assert metric("spoolq_dispatch_processes") == "1"
        exits = served.log().count("dispatch helper 1 (pid")
        assert exits >= 5 and metric('spoolq_dispatch_helper_exits_total{helper="1"}') == str(exits)
        sent = [m.msg_id for m in client.send_many("w", [{"param1": str(i)} for i in range(20)])]
        wait_for(lambda: all_done(client, 20), 30, "every message, by the main process")
        assert {int(client.get(f"w/{i}").job_status) for i in sent} == {served.pid}
    finally:
        if fd >= 0:
            os.close(fd)
        served.stop()


def test_status_says_unknown_when_the_lock_file_cannot_be_read(root: Path) -> None:
    """A lock file this user cannot open (another user's daemon, mode 0600) says nothing
    either way: `status` must not report that no daemon serves the spool."""
    from spoolq.cli.queue_cmds import _daemon_text
    from spoolq.store.fs import FsStore

    class Unreadable(FsStore):
        def dispatch_processes(self) -> list[tuple[int, int | None, bool | None]]:
            return [(0, None, None)]  # what pidfile.processes says of a file it cannot open

    c = spoolq.Client(Unreadable(root))
    assert c.dispatch_processes() == {"serving": None, "processes": []}
    assert _daemon_text({"serving": None, "processes": []}).startswith("daemon: unknown")
    assert _daemon_text({"serving": False, "processes": []}) == "daemon: none serving this spool"


def test_a_start_is_not_refused_for_a_reader_asking_who_serves(root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`spoolq status` asks with a shared lock held for a moment; a daemon (or helper)
    starting at that moment must take its lock all the same, not fail as if one ran."""
    import fcntl

    from spoolq.store.fs import pidfile

    root.mkdir(parents=True, exist_ok=True)
    path = root / pidfile.helper_lock(1)
    path.write_text("")
    reader = os.open(path, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)  # a reader caught holding its shared lock
    waits: list[float] = []

    def wait(seconds: float) -> None:  # the reader lets go while the start waits to try again
        waits.append(seconds)
        if len(waits) == 1:
            os.close(reader)

    monkeypatch.setattr(pidfile.time, "sleep", wait)
    fd = pidfile.acquire(root, pidfile.helper_lock(1))
    assert len(waits) == 1, "it tried again once the reader was gone"
    try:
        assert pidfile.processes(root) == [(1, os.getpid(), True)]
    finally:
        pidfile.release(fd)
