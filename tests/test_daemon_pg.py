"""The daemon on PostgreSQL (issue 8): the real ``spoolq --store postgresql://... serve``,
several of them on one database acting as hosts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_util import Served, script, wait_for

import spoolq
from spoolq.model import State


@pytest.fixture
def hosts(pg_url: str, tmp_path: Path) -> Iterator[Any]:
    """Start daemons ("hosts") on the test's database, each with a --home of its own."""
    started: list[Served] = []

    def start(n: int = 1, *args: str) -> list[Served]:
        for _ in range(n):
            home = tmp_path / f"host{len(started)}" / "home"
            home.parent.mkdir()
            started.append(Served(home, *args, store=pg_url).start())
        return started[-n:]

    yield start
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.stop()


@pytest.fixture
def client(pg_url: str) -> spoolq.Client:
    return spoolq.open(pg_url)


def test_serve_needs_a_home_for_a_database(pg_url: str, cli: Any) -> None:
    r = cli("--root", pg_url, "serve", "--no-http")
    assert r.returncode != 0 and "--home" in r.stderr


def test_a_daemon_on_postgresql_runs_scripts_and_stores_their_log(client: spoolq.Client, hosts: Any) -> None:
    client.create_queue("q", script=script("rq_script.sh"), num_workers=2)
    hosts(1)
    rs = [client.send("q", param1=p) for p in ("done", "err", "resend1")]
    ends = {r.msg_id: client.wait(r, 30) for r in rs}
    assert [(v.state, v.job_status) for v in ends.values()] == [
        (State.DONE, "done sleeping"), (State.ERR, "by design"), (State.DONE, "resent 1")]
    log = client.open_log(rs[0]).read().decode()
    assert " - RQ START - " in log and f"msg {rs[0].msg_id} count 0 param1 done" in log


def test_attachments_reach_the_script_and_cancel_stops_it(client: spoolq.Client, hosts: Any,
                                                         tmp_path: Path) -> None:
    s = tmp_path / "cat.sh"
    s.write_text('#!/bin/sh\nif [ "$RQ_PARAM1" = slow ]; then sleep 300; fi\n'
                 'echo "done $(cat ../attach/a.txt) $(wc -c < ../msg | tr -d " ")" >&3\n')
    s.chmod(0o755)
    client.create_queue("q", script=str(s))
    hosts(1)
    f = tmp_path / "a.txt"
    f.write_text("attached")
    v = client.wait(client.send("q", attachments=[str(f)]), 30)
    assert v.state == State.DONE and v.job_status.startswith("attached "), v
    slow = client.send("q", param1="slow")
    wait_for(lambda: client.get(slow).state == State.RUN, 30, "the start")
    client.cancel(slow)
    v = client.wait(slow, 30)
    assert (v.state, v.job_status) == (State.ERR, "cancelled")


def test_three_hosts_share_a_queue_and_a_killed_one_is_taken_over(client: spoolq.Client, hosts: Any,
                                                                   tmp_path: Path) -> None:
    client.create_queue("q", script=script("rq_script.sh"), num_workers=2)
    a, b, c = hosts(3)
    done = client.send_many("q", [{"param1": "done"} for _ in range(60)])
    for r in done:
        v = client.wait(r, 60)
        assert v.state == State.DONE and [h["state"] for h in v.message.history] == ["que", "run", "done"], v
    assert sum(h.log().count("started pid") for h in (a, b, c)) == 60, "each message ran once"
    assert sum(1 for h in (a, b, c) if "started pid" in h.log()) >= 2, "the hosts shared the queue"
    pidfile = tmp_path / "slow.pid"
    slow = client.send("q", param1="slowfirst", param2=str(pidfile))
    wait_for(lambda: pidfile.exists(), 30, "the slow script")
    holder = next(h for h in (a, b, c) if f"q/{slow.msg_id}: started" in h.log())
    holder.kill()  # a host dies with the attempt; its lease (30 s) runs out, another host reruns it
    t0 = time.monotonic()
    v = client.wait(slow, 90)
    assert (v.state, v.message.count, v.job_status) == (State.DONE, 1, "second run"), v
    assert time.monotonic() - t0 >= 15, "taken over only after the lease ran out (30 s from its last renewal)"


def test_the_log_is_served_and_streamed_from_the_database(client: spoolq.Client, hosts: Any,
                                                          tmp_path: Path) -> None:
    """Any host's HTTP server answers for a log written on another: Range and the SSE stream
    read it from PostgreSQL."""
    from fastapi.testclient import TestClient
    from http_helpers import AUTH, TOKEN
    from test_http_api import API, parse_sse

    from spoolq.http.app import create_app

    s = tmp_path / "colours.sh"
    s.write_text('#!/bin/sh\nfor i in 1 2 3; do printf "\\033[3${i}mline $i\\033[0m\\n"; done\n'
                 'echo "done coloured" >&3\n')
    s.chmod(0o755)
    client.create_queue("q", script=str(s))
    hosts(1)
    r = client.send("q")
    assert client.wait(r, 30).state == State.DONE
    http = TestClient(create_app(client, TOKEN, poll_interval=0.02, events_interval=0.05),
                      base_url="http://127.0.0.1", headers=AUTH)
    full = http.get(f"{API}/queues/q/messages/{r.msg_id}/log")
    assert full.status_code == 200 and full.text.endswith("\x1b[33mline 3\x1b[0m\n"), full.text
    part = http.get(f"{API}/queues/q/messages/{r.msg_id}/log", headers={"Range": "bytes=-14"})
    assert part.status_code == 206 and part.text == full.text[-14:]
    events = parse_sse(http.get(f"{API}/queues/q/messages/{r.msg_id}/log/stream").text)
    assert "".join(d["text"] for e, d in events if e == "log") == full.text
    assert events[-1][0] == "end" and events[-1][1]["state"] == "done"
