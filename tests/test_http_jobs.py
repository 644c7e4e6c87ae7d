"""Queues of kind http: strings-queue's HTTP jobs (spec C, checks C.4; docs/http-jobs.md).

A real daemon (``spoolq serve``) makes the requests to a real HTTP server on loopback,
scripted to answer 200, 201, 404, 500, 503 and slowly. Check 9 (two processors never call
one job at once) needs two daemons on one store: it is in test_http_jobs_pg.py, with the
SQL intake."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli
from daemon_util import Served, daemons, wait_for
from http_jobs_util import Scripted, Trickle, scripted_server

import spoolq
from spoolq.errors import InvalidConfig
from spoolq.httpjob import HttpJob, parse_job
from spoolq.model import Message, MessageView, QueueConfig, State


@pytest.fixture
def srv() -> Iterator[Scripted]:
    yield from scripted_server()


@pytest.fixture
def daemon(root: Path) -> Iterator[Callable[..., Served]]:
    yield from daemons(root, "--no-builtin-queues", "--grace", "1")


def make_queue(client: spoolq.Client, name: str = "hooks", **kw: Any) -> str:
    client.create_queue(name, kind="http", **{"num_workers": 4, **kw})
    return name


def send(client: spoolq.Client, q: str, url: str, method: str = "GET", **params: Any) -> str:
    return client.send(q, params={"method": method, "url": url, **params}).msg_id


def final(client: spoolq.Client, q: str, msg_id: str, timeout: float = 20) -> MessageView:
    return wait_for(lambda: (v := client.get(f"{q}/{msg_id}")).state.final and v, timeout, f"{msg_id} final")


def log_lines(client: spoolq.Client, q: str, msg_id: str) -> list[str]:
    with client.open_log(f"{q}/{msg_id}") as f:
        return f.read().decode().splitlines()


def test_c4_1_defaults_timeout_retries_and_delay(client: spoolq.Client, srv: Scripted,
                                                 daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    daemon()
    t0 = time.time()
    mid = send(client, q, srv.url("/code/503"))  # only method and url
    v = wait_for(lambda: (m := client.get(f"{q}/{mid}")).state == State.QUE and m.message.count == 1 and m,
                 what="back in que after the 503")
    assert v.message.params["remaining_retries"] == 9  # 10 by default, one used
    assert t0 + 59 < v.message.due < time.time() + 61  # 60 s by default
    assert "(timeout 60)" in log_lines(client, q, mid)[0]
    assert len(srv.of("/code/503")) == 1


def test_c4_2_success(client: spoolq.Client, srv: Scripted, daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    daemon()
    mid = send(client, q, srv.url("/code/200"), remaining_retries=7)
    v = final(client, q, mid)
    assert v.state == State.DONE and v.job_status == "HTTP 200: GET 200"
    # unchanged by a success (no row mirrors them: the status and the log say it, and the
    # finish does not rewrite the message)
    assert v.message.params == {"method": "GET", "url": srv.url("/code/200"), "remaining_retries": 7}
    # a job of the SQL intake (http_job_id) gets strings-queue's columns for its row
    row = send(client, q, srv.url("/code/200"), http_job_id="77")
    v = final(client, q, row)
    p = v.message.params
    assert p["result_code"] == 0 and p["last_response"] == "GET 200" and p["status_code"] == 200
    assert p["retries"] == 10
    assert time.time() - 30 < p["last_finished_at"] <= time.time() and p["last_started_at"] <= p["last_finished_at"]
    assert log_lines(client, q, row)[-1].endswith("  [JOBID 77] Job succeeded: GET 200")
    assert srv.of("/code/200")[-1].headers["x-bitlancer-job-id"] == "77"
    lines = log_lines(client, q, mid)
    assert lines[-1].endswith(f"  [JOBID {mid}] Job succeeded: GET 200"), lines
    assert f"[JOBID {mid}] Calling job with method GET on url {srv.url('/code/200')} (timeout 60)" in lines[0]


def test_c4_3_temporary_failure_waits_its_delay(client: spoolq.Client, srv: Scripted,
                                                daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    srv.seqs["a"] = [503, 200]
    daemon()
    mid = send(client, q, srv.url("/seq/a"), retry_delay_secs=1.5)
    v = wait_for(lambda: (m := client.get(f"{q}/{mid}")).message.count == 1 and m, what="first failure")
    assert v.message.params["result_code"] == 2 and v.message.params["remaining_retries"] == 9
    assert any(line.endswith("Job failed temporarily: GET 503") for line in log_lines(client, q, mid))
    v = final(client, q, mid)
    assert v.state == State.DONE and v.message.params["result_code"] == 0
    first, second = srv.of("/seq/a")
    assert second.start - first.end >= 1.5  # not re-run before its delay; re-run after it


def test_c4_4_timeout_is_temporary(client: spoolq.Client, srv: Scripted, daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    daemon()
    t0 = time.monotonic()
    mid = send(client, q, srv.url("/slow/3"), timeout_secs=0.3, remaining_retries=2, retry_delay_secs=0)
    v = final(client, q, mid)
    assert time.monotonic() - t0 < 3  # both tries gave up at their timeout, not at the answer
    assert v.state == State.ERR and v.job_status == "timeout - no retries left"
    assert v.message.params["result_code"] == 2 and v.message.params["remaining_retries"] == 0
    assert [ln.split("] ", 1)[1] for ln in log_lines(client, q, mid)].count("Job failed due to timeout") == 2


@pytest.mark.parametrize("code", [500, 404])
def test_c4_5_permanent_failures(client: spoolq.Client, srv: Scripted, daemon: Callable[..., Served],
                                 code: int) -> None:
    q = make_queue(client)
    daemon()
    mid = send(client, q, srv.url(f"/code/{code}"), method="POST")
    v = final(client, q, mid)
    assert v.state == State.ERR and v.job_status == f"HTTP {code}: POST {code}"
    assert v.message.params["result_code"] == 1 and v.message.params["remaining_retries"] == 9
    assert log_lines(client, q, mid)[-1].endswith(f"Job failed permanently: POST {code}")
    time.sleep(0.3)
    assert len(srv.of(f"/code/{code}")) == 1  # never re-run


def test_c4_5_201_is_permanent_only_where_the_queue_says_200(client: spoolq.Client, srv: Scripted,
                                                             daemon: Callable[..., Served]) -> None:
    strict = make_queue(client, "strict", http_ok=[200])  # strings-queue's rule
    loose = make_queue(client, "loose")  # spoolq's default: any 2xx
    daemon()
    a = send(client, strict, srv.url("/code/201"))
    b = send(client, loose, srv.url("/code/201"))
    assert final(client, strict, a).state == State.ERR
    assert final(client, loose, b).state == State.DONE


def test_c4_6_no_retries_left_is_never_run_again(client: spoolq.Client, srv: Scripted,
                                                 daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    daemon()
    one = send(client, q, srv.url("/code/503"), remaining_retries=1, retry_delay_secs=0)
    zero = send(client, q, srv.url("/code/200"), remaining_retries=0)
    v = final(client, q, one)
    assert v.state == State.ERR and v.message.params["remaining_retries"] == 0
    assert final(client, q, zero).state == State.ERR
    time.sleep(0.3)
    assert len(srv.of("/code/503")) == 1 and srv.of("/code/200") == []


def test_c4_7_headers_set_the_delay_and_the_url(client: spoolq.Client, srv: Scripted,
                                                daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    srv.headers_for["/hdr/503"] = {"x-bitlancer-retry-delay-secs": "786"}
    srv.headers_for["/hdr/502"] = {"x-bitlancer-url": srv.url("/code/200"), "x-bitlancer-retry-delay-secs": "0",
                                   "Retry-After": "0"}
    daemon()
    t0 = time.time()
    slow = send(client, q, srv.url("/hdr/503"))
    v = wait_for(lambda: (m := client.get(f"{q}/{slow}")).message.count == 1 and m, what="requeued")
    assert v.message.params["retry_delay_secs"] == 786 and t0 + 785 < v.message.due < time.time() + 787
    # a handler redirects its job: the next try calls the new url (a 503 is temporary)
    srv.headers_for["/hdr/503"] = {"x-bitlancer-url": srv.url("/code/200"), "x-bitlancer-retry-delay-secs": "0"}
    moved = send(client, q, srv.url("/hdr/503"))
    v = final(client, q, moved)
    assert v.state == State.DONE and v.message.params["url"] == srv.url("/code/200")
    assert v.message.params["retry_delay_secs"] == 0 and len(srv.of("/code/200")) == 1


def test_c4_7_retry_after_sets_this_retry_only(client: spoolq.Client, srv: Scripted,
                                               daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    srv.headers_for["/hdr/429"] = {"Retry-After": "300"}
    daemon()
    t0 = time.time()
    mid = send(client, q, srv.url("/hdr/429"), retry_delay_secs=5)
    v = wait_for(lambda: (m := client.get(f"{q}/{mid}")).message.count == 1 and m, what="requeued")
    assert t0 + 299 < v.message.due < time.time() + 301
    assert v.message.params["retry_delay_secs"] == 5 and v.job_status.startswith("HTTP 429 - retry in 300 s")


def test_c4_8_body_auth_and_job_id(client: spoolq.Client, srv: Scripted, daemon: Callable[..., Served],
                                   tmp_path: Path) -> None:
    pw = tmp_path / "password"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    q = make_queue(client, http_auth={"user": "api", "password_file": str(pw)}, http_allow=[srv.url("/code/")])
    daemon()
    mid = send(client, q, srv.url("/code/200"), method="POST", body="hello=world",
               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert final(client, q, mid).state == State.DONE
    (call,) = srv.of("/code/200")
    assert call.method == "POST" and call.body == b"hello=world"
    assert call.headers["authorization"] == "Basic " + base64.b64encode(b"api:s3cret").decode()
    assert call.headers["x-bitlancer-job-id"] == mid
    assert call.headers["x-spoolq-message"].endswith(f"/q/{q}/{mid}")
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    assert call.headers["accept-encoding"] == "identity"  # no gzip to inflate in the daemon


def test_credentials_never_come_from_the_message(client: spoolq.Client, srv: Scripted,
                                                 daemon: Callable[..., Served]) -> None:
    q = make_queue(client, http_allow=[srv.url("/code/")])
    daemon()
    bad = {
        "auth": send(client, q, srv.url("/code/200"), headers={"Authorization": "Basic eDp5"}),
        "userinfo": send(client, q, f"http://u:p@127.0.0.1:{srv.port}/code/200"),
        "scheme": send(client, q, "file:///etc/passwd"),
        "allow": send(client, q, srv.url("/slow/0")),
        "method": send(client, q, srv.url("/code/200"), method="TRACE"),
        "crlf": send(client, q, srv.url("/code/200"), headers={"X-A": "b\r\nX-Evil: 1"}),
        "timeout": send(client, q, srv.url("/code/200"), timeout_secs="NaN"),
    }
    for what, mid in bad.items():
        v = final(client, q, mid)
        assert v.state == State.ERR and v.job_status.startswith("not an HTTP job"), (what, v.job_status)
    assert srv.calls == []


def test_connection_refused_is_temporary(client: spoolq.Client, daemon: Callable[..., Served]) -> None:
    from daemon_util import free_port
    q = make_queue(client)
    daemon()
    mid = send(client, q, f"http://127.0.0.1:{free_port()}/x", remaining_retries=2, retry_delay_secs=0)
    v = final(client, q, mid)
    assert v.state == State.ERR and "ConnectError" in v.job_status and v.message.params["result_code"] == 2
    assert sum("Job failed temporarily: ConnectError" in ln for ln in log_lines(client, q, mid)) == 2


def test_c4_10_one_at_a_time_still_finishes_every_job(client: spoolq.Client, srv: Scripted,
                                                      daemon: Callable[..., Served]) -> None:
    q = make_queue(client, num_workers=1)
    daemon()
    ids = [send(client, q, srv.url("/slow/0.05")) for _ in range(6)]
    assert all(final(client, q, i).state == State.DONE for i in ids)
    assert srv.peak == 1 and len(srv.calls) == 6


def test_in_flight_bounded_per_queue_and_per_host(client: spoolq.Client, srv: Scripted,
                                                  daemon: Callable[..., Served]) -> None:
    q = make_queue(client, num_workers=8, http_per_host=3)
    daemon()
    ids = [send(client, q, srv.url("/hold")) for _ in range(8)]
    wait_for(lambda: srv.in_progress == 3, what="three requests at the host")
    time.sleep(0.3)
    assert srv.in_progress == 3  # the others wait in run for their host's turn
    assert client.counts(q).get("run") == 8
    srv.release.set()
    assert all(final(client, q, i).state == State.DONE for i in ids)
    assert srv.peak == 3


def test_cancel_a_request_in_flight(client: spoolq.Client, srv: Scripted, daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    daemon()
    mid = send(client, q, srv.url("/hold"))
    wait_for(lambda: srv.in_progress == 1, what="the request at the server")
    client.cancel(f"{q}/{mid}")
    v = final(client, q, mid, timeout=15)
    assert v.state == State.ERR and v.job_status == "cancelled"


def test_daemon_killed_mid_request_runs_it_again(client: spoolq.Client, srv: Scripted,
                                                 daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    d = daemon()
    mid = send(client, q, srv.url("/hold"))
    wait_for(lambda: srv.in_progress == 1, what="the request at the server")
    d.kill()
    srv.release.set()
    daemon()
    v = final(client, q, mid)
    assert v.state == State.DONE and v.message.count == 1  # at-least-once: it ran again
    assert len(srv.of("/hold")) == 2


def test_stopping_daemon_lets_requests_finish(client: spoolq.Client, srv: Scripted, root: Path) -> None:
    client.create_queue("hooks", kind="http")
    d = Served(root, "--no-builtin-queues", "--grace", "20").start()
    mid = send(client, "hooks", srv.url("/slow/1"))
    wait_for(lambda: srv.in_progress == 1, what="the request at the server")
    assert d.stop() == 0
    v = client.get(f"hooks/{mid}")
    assert v.state == State.DONE and v.message.count == 0


def test_cli_creates_an_http_queue(cli: Cli, client: spoolq.Client, srv: Scripted,
                                   daemon: Callable[..., Served], tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x")
    r = cli("queue", "create", "sq", "--kind", "http", "--http-ok", "200", "--http-per-host", "2",
            "--http-auth-user", "api", "--http-password-file", str(pw), "--http-allow", srv.url("/"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "created queue sq (HTTP jobs, 1 worker)" in r.stdout
    r = cli("queue", "create", "half", "--kind", "http", "--http-auth-user", "api")
    assert r.returncode != 0 and "go together" in r.stderr
    cfg = client.queue_config("sq")
    assert (cfg.kind, cfg.http_ok, cfg.http_per_host, cfg.script) == ("http", [200], 2, "")
    assert cfg.http_auth == {"user": "api", "password_file": str(pw)}
    daemon()
    r = cli("send", "sq", "--param", "method=PUT", "--param", f"url={srv.url('/code/200')}", "--param", "body=x")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(srv.of("/code/200")) == 1, what="the PUT")
    assert srv.of("/code/200")[0].method == "PUT"
    r = cli("queue", "create", "nope", "--http-ok", "200", "--script", "/bin/true")
    assert r.returncode != 0 and "need kind http" in r.stderr


def test_the_ui_and_api_show_an_http_queue(client: spoolq.Client) -> None:
    from fastapi.testclient import TestClient
    from http_helpers import AUTH, TOKEN

    from spoolq.http.app import create_app
    make_queue(client, http_ok=[200, 204], http_allow=["https://hooks.example/"])
    http = TestClient(create_app(client, TOKEN), base_url="http://127.0.0.1", headers=AUTH)
    page = http.get("/q/hooks").text
    assert 'id="kind-note"' in page and "Kind <b>http</b>" in page and "done on 200, 204" in page
    assert "https://hooks.example/" in page
    cfg = http.get("/api/v1/queues/hooks").json()["config"]
    assert cfg["kind"] == "http" and cfg["http_ok"] == [200, 204] and cfg["script"] == ""
    # a config change over HTTP needs the credential, as every config change does
    anon = TestClient(create_app(client, TOKEN), base_url="http://127.0.0.1")
    r = anon.patch("/api/v1/queues/hooks/config", json={"http_allow": []})
    assert r.status_code in (401, 403)
    assert client.queue_config("hooks").http_allow == ["https://hooks.example/"]


# -- the audit's findings: requests that must end, pools that must grow, headers and URLs that
# -- must not steer the daemon
def test_a_trickling_server_cannot_stretch_a_request_past_its_timeout(client: spoolq.Client,
                                                                      daemon: Callable[..., Served]) -> None:
    slow = Trickle(every=0.1)  # a header byte every 0.1 s, forever: no read ever times out
    try:
        q = make_queue(client)
        daemon()
        t0 = time.monotonic()
        mid = send(client, q, slow.url("/x"), timeout_secs=1, remaining_retries=2, retry_delay_secs=0)
        v = final(client, q, mid)
        assert v.state == State.ERR and v.job_status == "timeout - no retries left"
        assert time.monotonic() - t0 < 5  # two tries of 1 s each, not forever
        assert slow.job_ids == [mid, mid]
        wait_for(lambda: slow.open == 0, 5, "both connections closed by the daemon")
    finally:
        slow.close()


def test_a_cancel_closes_the_request_and_a_retry_never_overlaps_it(client: spoolq.Client, srv: Scripted,
                                                                   daemon: Callable[..., Served]) -> None:
    q = make_queue(client, num_workers=1)
    daemon()
    mid = send(client, q, srv.url("/hold"))
    wait_for(lambda: srv.in_progress == 1, what="the request at the server")
    client.cancel(f"{q}/{mid}")
    v = final(client, q, mid, timeout=15)
    assert v.state == State.ERR and v.job_status == "cancelled" and v.message.params["result_code"] == 1
    wait_for(lambda: srv.in_progress == 0, 5, "the connection closed by the daemon")
    assert srv.of("/hold")[0].dropped
    nxt = send(client, q, srv.url("/code/200"), timeout_secs=2)  # the one worker's place is free
    assert final(client, q, nxt).state == State.DONE
    client.retry(f"{q}/{mid}")
    wait_for(lambda: len(srv.of("/hold")) == 2, what="the retry's call")
    srv.release.set()
    assert final(client, q, mid).state == State.DONE
    assert srv.most_at_once[mid] == 1


def test_more_workers_means_more_at_once(client: spoolq.Client, srv: Scripted,
                                         daemon: Callable[..., Served]) -> None:
    q = make_queue(client, num_workers=1, http_per_host=8)
    daemon()
    assert final(client, q, send(client, q, srv.url("/code/200"))).state == State.DONE  # its client exists
    client.update_queue(q, num_workers=4)
    ids = [send(client, q, srv.url("/hold")) for _ in range(4)]
    wait_for(lambda: srv.in_progress == 4, what="four requests at once")
    srv.release.set()
    assert all(final(client, q, i).state == State.DONE for i in ids)


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "-1", "1e9"])
def test_a_bad_delay_header_is_ignored(client: spoolq.Client, srv: Scripted, daemon: Callable[..., Served],
                                       value: str) -> None:
    q = make_queue(client)
    srv.headers_for["/hdr/503"] = {"x-bitlancer-retry-delay-secs": value, "Retry-After": value}
    daemon()
    mid = send(client, q, srv.url("/hdr/503"), remaining_retries=2, retry_delay_secs=0.2)
    v = final(client, q, mid)
    assert v.state == State.ERR and v.job_status == "HTTP 503 - no retries left"
    assert v.message.params["retry_delay_secs"] == 0.2 and len(srv.of("/hdr/503")) == 2


def test_an_answer_cannot_move_its_job_to_another_host(client: spoolq.Client, srv: Scripted,
                                                       daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    srv.headers_for["/hdr/503"] = {"x-bitlancer-url": "http://169.254.169.254/latest/meta-data/",
                                   "x-bitlancer-retry-delay-secs": "0"}
    daemon()
    mid = send(client, q, srv.url("/hdr/503"), remaining_retries=2)
    v = final(client, q, mid)
    assert v.message.params["url"] == srv.url("/hdr/503") and len(srv.of("/hdr/503")) == 2


def test_a_nul_in_an_answer_is_kept_out_of_status_and_log(client: spoolq.Client, srv: Scripted,
                                                          daemon: Callable[..., Served]) -> None:
    q = make_queue(client)
    srv.bodies["nul"] = b"a\x00b\nsecond \xff line"
    daemon()
    mid = send(client, q, srv.url("/body/nul"))
    v = final(client, q, mid)
    assert v.state == State.DONE and v.job_status == "HTTP 200: a\ufffdb"
    # a line of the answer is indented in the log: no answer can forge an entry of its own
    assert log_lines(client, q, mid)[-2:] == [log_lines(client, q, mid)[-2], "\tsecond \ufffd line"]
    assert "\x00" not in "".join(log_lines(client, q, mid))


def test_a_queue_turned_http_leaves_its_scripterror(client: spoolq.Client, srv: Scripted,
                                                    daemon: Callable[..., Served]) -> None:
    client.create_queue("h", script="/nonexistent/script")
    daemon()
    client.send("h", params={"x": "1"})
    wait_for(lambda: client.script_error("h") is not None, what="SCRIPTERROR")
    client.update_queue("h", kind="http", script="")
    mid = send(client, "h", srv.url("/code/200"))
    assert final(client, "h", mid).state == State.DONE
    assert client.script_error("h") is None


def test_job_checks() -> None:
    cfg = QueueConfig.from_dict({"name": "q", "kind": "http", "http_allow": ["http://h.example/api",
                                                                           "https://h.example:8443/v1/",
                                                                           "http://h.example/caf%C3%A9/"]})

    def job(url: str = "http://h.example/api/x", **p: Any) -> HttpJob:
        return parse_job(Message(msg_id="20261204.0900.00.000.1", params={"method": "get", "url": url, **p}), cfg)

    assert job().method == "GET" and job().job_id == "20261204.0900.00.000.1"
    assert job(http_job_id="42").job_id == "42"
    assert job(http_job_id="4\n[JOBID 1] forged").job_id == "20261204.0900.00.000.1"
    for url in ("http://h.example/api", "http://h.example/api/", "http://h.example/api/x?y=1",
                "https://h.example:8443/v1/z", "HTTP://H.EXAMPLE/api/x"):
        assert job(url).url
    assert job("http://h.example/caf%c3%a9/x").url  # escapes compare in either case
    for url in ("http://h.example/api/..;/admin", "http://h.example/api/..\\admin", "http://h.example/api/%252e%252e/x",
                "http://h.example/api/x;y"):
        with pytest.raises(ValueError):
            job(url)
    for url in ("http://h.example/api-admin", "http://h.example/apix", "http://h.example/api/%2e%2e/admin",
                "http://h.example/api%2f..%2fadmin", "http://h.example/api/%2E%2E/x", "http://h.example/api/..%5cx",
                "http://h.example.evil/api/x", "http://h.example:81/api/x", "https://h.example/api/x",
                "https://h.example:8443/v1", "http://x@h.example/api/x", "ftp://h.example/api/x"):
        with pytest.raises(ValueError):
            job(url)
    for headers in ({"X(A)": "1"}, {"X-A": "\u2603"}, {"X-A": "a\r\nb"}, {"accept-encoding": "gzip"},
                    {"": "x"}, {"Host": "x"}):
        with pytest.raises(ValueError):
            job(headers=headers)
    assert job(headers={"X-Ok": "a b\tc"}).headers == {"X-Ok": "a b\tc"}
    for bad in ({"http_allow": ["http://a:port/"]}, {"http_allow": ["http://h/?q=1"]}, {"http_allow": ["h/"]},
                {"http_allow": ["http://h/a?"]}, {"http_allow": ["http://h/a;b/"]},
                {"http_allow": ["http://u:p@h/"]}, {"http_allow": ["http://h/%2e%2e/"]},
                {"http_auth": {"user": "u", "password_file": "/etc/pw"}},  # credentials need http_allow
                {"http_ok": [99]}, {"http_per_host": 0}, {"http_verify": "yes"}):
        with pytest.raises(InvalidConfig):
            QueueConfig.from_dict({"name": "q", "kind": "http", **bad})
    with pytest.raises(InvalidConfig):
        QueueConfig.from_dict({"name": "q", "script": "/bin/true", "http_ok": [200]})


def test_a_crash_or_a_cancel_while_down_still_closes_a_rows_job(client: spoolq.Client, srv: Scripted,
                                                                daemon: Callable[..., Served]) -> None:
    """A job of the SQL intake (http_job_id) that recovery ends gets a result_code, so its row
    (on PostgreSQL) never stays "not finished": 1 for a cancel, 2 for tries a crash used up."""
    q = make_queue(client)
    d = daemon()
    cancelled = send(client, q, srv.url("/hold"), http_job_id="5")
    crashed = client.send(q, params={"method": "GET", "url": srv.url("/hold"), "http_job_id": "6"},
                          max_count=1, count=1).msg_id
    wait_for(lambda: srv.in_progress == 2, what="both requests at the server")
    d.kill()
    client.cancel(f"{q}/{cancelled}", wait=0)  # recorded; its daemon is gone
    srv.release.set()
    daemon()
    v = final(client, q, cancelled)
    assert (v.state, v.message.params["result_code"], v.message.params["last_response"]) == (
        State.ERR, 1, "cancelled")
    v = final(client, q, crashed)
    assert v.state == State.ERR and v.message.params["result_code"] == 2

