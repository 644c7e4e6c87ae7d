"""RQ's HTTP routes driven the way RQ's clients drive them: curl with form fields and
multipart uploads (the relay script's exact commands), and raw HTTP/1.0 over a socket."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from http_helpers import fake_run, free_port

import spoolq
from spoolq.config import RootConfig, write_root_config
from spoolq.http.server import start_http
from spoolq.model import State

ID_RE = r"\d{8}\.\d{4}\.\d{2}\.\d{3}\.\d+"
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def client(root: Path, port: int) -> spoolq.Client:
    # Full ids name the host and port from the root's config, as the daemon records them.
    write_root_config(root, RootConfig(host="127.0.0.1", port=port))
    c = spoolq.open(root)
    c.create_queue("test", script="/bin/true")
    return c


@pytest.fixture
def base(client: spoolq.Client, port: int) -> Any:
    h = start_http(client, "127.0.0.1", port, None)
    yield h.url
    h.stop()


def curl(*args: str) -> tuple[int, str]:
    """Run curl; returns (status, body)."""
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def redirect(url: str, *fields: str) -> tuple[int, str]:
    """POST form ``fields``; (status, where it redirects)."""
    args = [a for f in fields for a in ("-d", f)]
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", *args, url],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    status, _, where = out.partition(" ")
    return int(status), where


def post_mesg(base: str, queue: str, mesg: dict[str, Any]) -> tuple[int, Any]:
    status, body = curl("-d", "x_format=json", "--data-urlencode", f"mesg={json.dumps(mesg)}",
                        f"{base}/q/{queue}/new_message")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def other_id(msg_id: str) -> str:
    """A well-formed id that is not ``msg_id``."""
    return msg_id[:-1] + ("1" if msg_id[-1] == "0" else "0")


def test_new_message_done_flow(base: str, client: spoolq.Client) -> None:
    status, res = post_mesg(base, "test", {"dest": f"{base}/q/test", "src": "dev", "count": "2",
                                           "param1": "hello", "max_count": "5"})
    assert status == 200 and res[0] == "ok"
    assert re.fullmatch(rf"http://[^/]+/q/test/{ID_RE}", res[1])
    msg_id = res[1].rsplit("/", 1)[1]
    status, body = curl(f"{base}/q/test/{msg_id}.json")
    m = json.loads(body)
    assert (m["count"], m["max_count"], m["param1"], m["state"], m["status"]) == (2, 5, "hello", "que", "que")
    assert curl(f"{base}/q/test/{msg_id}/state.json") == (200, '["que"]')
    fake_run(client, "test", msg_id, ["\x1b[32mdone sleeping\x1b[0m\n"])
    assert json.loads(curl(f"{base}/q/test/{msg_id}.json")[1])["status"] == "done - finished"


def test_prep_attach_commit_like_the_relay_script(base: str, client: spoolq.Client, tmp_path: Path,
                                                  root: Path) -> None:
    status, res = post_mesg(base, "test", {"dest": "test", "param1": "x", "_method": "prep"})
    assert status == 200 and res[0] == "ok"
    full_id = res[1]
    short = full_id.rsplit("/", 1)[1]
    assert client.store.state_of("test", short) == State.PREP
    img = tmp_path / "studio3.jpg"
    img.write_bytes(bytes(range(256)) * 375 + b"1234567")  # 96007 bytes, like RQ's fixture
    md5 = hashlib.md5(img.read_bytes()).hexdigest()
    # rq-spec 5.2 step 4, verbatim: HTTP/1.0 multipart with filedata, pathname and msg_id.
    status, body = curl("-0", "-F", "x_format=json", "-F", f"filedata=@{img}", "-F", "pathname=studio3.jpg",
                        "-F", f"msg_id={short}", f"{full_id}/attach/new")
    assert (status, json.loads(body)) == (200, ["ok", f"{md5}-Attached successfully"])
    assert not list((root / ".uploads").iterdir()), "no spooled upload left behind (RackMultipart check)"
    status, body = curl("-d", "x_format=json", "-d", "_method=commit", "-d", f"msg_id={short}", full_id)
    assert (status, json.loads(body)) == (200, ["ok", "msg commited"])
    m = json.loads(curl(f"{full_id}.json")[1])
    assert m["state"] == "que"
    assert m["_attachments"]["studio3.jpg"]["md5"] == md5 and m["_attachments"]["studio3.jpg"]["size"] == 96007
    assert curl("-o", "/dev/null", f"{base}/q/test/{short}/Xstudio54.jpgX")[0] == 404
    status, body = curl("-o", str(tmp_path / "back.jpg"), f"{base}/q/test/{short}/attach/studio3.jpg")
    assert status == 200 and (tmp_path / "back.jpg").read_bytes() == img.read_bytes()
    # Committing again is ok (a relay's retried commit; RQ answers "cannot find message").
    status, body = curl("-d", "x_format=json", "-d", "_method=commit", full_id)
    assert json.loads(body) == ["ok", "msg commited"]
    assert client.counts("test")["que"] == 1, "still one message"
    status, body = curl("-d", "x_format=json", "-d", "_method=commit", f"{base}/q/test/{other_id(short)}")
    assert json.loads(body) == ["fail", "cannot find message"]
    # Attaching after commit fails the same way.
    status, body = curl("-F", "x_format=json", "-F", f"filedata=@{img}", f"{full_id}/attach/new")
    assert json.loads(body) == ["fail", "cannot find message"]


def test_rq_error_answers(base: str, client: spoolq.Client) -> None:
    assert post_mesg(base, "nope", {"dest": "nope"}) == (404, "404 - Queue not found")
    assert post_mesg(base, "test", {"dest": "test", "_method": "teleport"}) == (400, "400 - Invalid method param")
    status, res = post_mesg(base, "test", {"dest": "test", "post_run_webhook": 5})
    assert status == 400 and res[0] == "fail"
    status, body = curl("-d", "x_format=json", "-d", "mesg={broken", f"{base}/q/test/new_message")
    assert status == 400 and json.loads(body)[0] == "fail"
    client.set_admin_state("test", "DOWN")
    assert post_mesg(base, "test", {"dest": "test"}) == (503, "503 - Service Unavailable - Operationally Down")
    assert curl(f"{base}/q/test.txt") == (200, "status: DOWN\n")
    client.set_admin_state("test", "UP")
    mid = client.prep("test").msg_id
    assert curl("-F", "x_format=json", f"{base}/q/test/{mid}/attach/new") == (
        404, "404 - Missing required param filedata")
    assert curl("-d", "_method=fly", f"{base}/q/test/{mid}") == (400, "400 - Invalid method param")
    assert curl(f"{base}/q/test/20200101.0000.00.000.1.json") == (404, "404 - Message ID not found")
    assert curl(f"{base}/q/test/../../etc/passwd")[0] == 404
    assert curl(f"{base}/q/nope.json") == (404, "404 - Queue not found")


def test_queue_listings_and_done_json(base: str, client: spoolq.Client) -> None:
    client.create_queue("other", script="/bin/true")
    assert json.loads(curl(f"{base}/q.json")[1]) == ["other", "test"]
    assert curl(f"{base}/q.txt")[1] == "q/other.txt\nq/test.txt\n"
    ids = [client.send("test", param1=str(i)).msg_id for i in range(12)]
    for i in ids:
        fake_run(client, "test", i, [])
    client.send("test")
    qj = json.loads(curl(f"{base}/q/test.json")[1])
    assert {k: qj[k] for k in ("status", "que_size", "done_size", "run_size", "err_size")} == {
        "status": "UP", "que_size": 1, "done_size": 12, "run_size": 0, "err_size": 0}
    txt = curl(f"{base}/q/test.txt")[1].splitlines()
    assert txt[0] == "status: UP" and "que: 1" in txt and "done: 12" in txt
    two = json.loads(curl(f"{base}/q/test/done.json?limit=2")[1])
    assert two == sorted(ids, reverse=True)[:2]
    assert all(re.fullmatch(ID_RE, i) for i in two)
    assert len(json.loads(curl(f"{base}/q/test/done.json")[1])) == 10
    # RQ's params['limit'].to_i: a leading integer, else 0 (none).
    assert len(json.loads(curl(f"{base}/q/test/done.json?limit=3abc")[1])) == 3
    assert len(json.loads(curl(f"{base}/q/test/done.json?limit=%2011")[1])) == 11
    for bad in ("x", "0", "-4", ""):
        assert curl(f"{base}/q/test/done.json?limit={bad}") == (200, "[]"), bad
    assert len(json.loads(curl(f"{base}/q/test/done.json?limit=99999999999999999999")[1])) == 12


def test_log_range_206_and_416(base: str, client: spoolq.Client) -> None:
    mid = client.send("test").msg_id
    assert curl(f"{base}/q/test/{mid}/log/stdio.log") == (404, "404 - Message ID log 'stdio.log' not found")
    fake_run(client, "test", mid, ["0123456789\n"])
    status, body = curl("-H", "Range: bytes=2-5", f"{base}/q/test/{mid}/log/stdio.log")
    assert (status, body) == (206, "2345")
    status, _ = curl("-H", "Range: bytes=11-", f"{base}/q/test/{mid}/log/stdio.log")
    assert status == 416
    assert curl(f"{base}/q/test/{mid}/log/stdio.log") == (200, "0123456789\n")


def test_delete_destroy_html_and_single_que(base: str, client: spoolq.Client) -> None:
    a = client.send("test").msg_id
    status, body = curl("-d", "_method=delete", "-d", "x_format=json", f"{base}/q/test/{a}")
    assert (status, json.loads(body)) == (200, ["ok", "msg deleted"])
    status, body = curl("-d", "_method=delete", "-d", "x_format=json", f"{base}/q/test/{a}")
    assert json.loads(body) == ["fail", "msg not found"]
    b = client.send("test").msg_id
    # RQ's destroy stops a running script; a queued message has none: "msg not found", kept.
    status, body = curl("-d", "_method=destroy", "-d", "x_format=json", f"{base}/q/test/{b}")
    assert json.loads(body) == ["fail", "msg not found"]
    assert client.state(f"test/{b}") == State.QUE
    status, _ = curl("-d", "_method=destroy", f"{base}/q/test/{b}")
    assert status == 303 and client.state(f"test/{b}") == State.QUE
    first = post_mesg(base, "test", {"dest": "test", "_method": "single_que"})[1][1]
    again = post_mesg(base, "test", {"dest": "test", "_method": "single_que", "param1": "ignored"})[1][1]
    assert first == again
    # x_format=html: RQ's result page without "back", a redirect there with it.
    status, page = curl("-d", "x_format=html", "-d", "mesg[dest]=test", "-d", "mesg[param1]=from-form",
                        f"{base}/q/test/new_message")
    assert status == 200 and "New Message Result" in page
    made = re.search(rf'OK - <a href="/q/test/({ID_RE})">http://[^<]+/q/test/\1</a>', page)
    assert made and client.get(f"test/{made.group(1)}").message.param1 == "from-form"
    status, page = curl("-d", "x_format=html", "-d", "mesg[dest]=test", "-d", "mesg[max_count]=lots",
                        f"{base}/q/test/new_message")
    assert status == 400 and "fail - " in page and "max_count" in page
    assert redirect(f"{base}/q/test/new_message", "x_format=html", "back=/q/test", "mesg[dest]=test") == (
        303, f"{base}/q/test")
    # A commit from a form goes on to the message (RQ); a delete to the queue.
    p = client.prep("test").msg_id
    assert redirect(f"{base}/q/test/{p}", "_method=commit") == (303, f"{base}/q/test/{p}")
    assert client.state(f"test/{p}") == State.QUE
    assert redirect(f"{base}/q/test/{p}", "_method=delete") == (303, f"{base}/q/test")
    status, body = curl("-H", "Content-Type: application/json", "-d", json.dumps({"dest": "test", "param1": "j"}),
                        f"{base}/q/test/new_message")
    assert status == 200 and json.loads(body)[0] == "ok"


def test_raw_socket_upload_with_fields_after_the_file(base: str, client: spoolq.Client) -> None:
    """rq-spec 7 #20: a 16 KB CSV upload followed by the form fields, sent over a raw socket."""
    mid = client.prep("test").msg_id
    host, port = base.removeprefix("http://").split(":")
    csv = b"".join(b"%d,name %d,\"quoted, field\"\r\n" % (i, i) for i in range(600))[:16384]
    boundary = b"----rqboundary7MA4YWxkTrZu0gW"
    body = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"filedata\"; filename=\"data.csv\"\r\n"
            b"Content-Type: text/csv\r\n\r\n" + csv + b"\r\n--" + boundary +
            b"\r\nContent-Disposition: form-data; name=\"x_format\"\r\n\r\njson\r\n--" + boundary +
            b"\r\nContent-Disposition: form-data; name=\"msg_id\"\r\n\r\n" + mid.encode() + b"\r\n--" +
            boundary + b"--\r\n")
    req = (f"POST /q/test/{mid}/attach/new HTTP/1.0\r\nHost: {host}:{port}\r\n"
           f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(req)
        resp = b""
        while chunk := s.recv(65536):
            resp += chunk
    head, _, payload = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    assert payload.startswith(b'["ok",')
    assert client.get(f"test/{mid}").attachments["data.csv"].md5 == hashlib.md5(csv).hexdigest()


def test_rq_message_routes_on_the_memory_store() -> None:
    """The RQ routes ask the client, not the filesystem: they work on a store without paths."""
    from fastapi.testclient import TestClient
    from http_helpers import TOKEN

    from spoolq.http.app import create_app

    c = spoolq.open("memory:")
    c.create_queue("work", script="/bin/true")
    http = TestClient(create_app(c, TOKEN), base_url="http://127.0.0.1:3333")
    ok, full = http.post("/q/work/new_message", data={"mesg": json.dumps({"_method": "prep"})}).json()
    msg_id = full.rsplit("/", 1)[1]
    assert http.get(f"/q/work/{msg_id}/state.json").json() == ["prep"]
    r = http.post(f"/q/work/{msg_id}/attach/new", files={"filedata": ("a.txt", b"hello")})
    assert r.json()[0] == "ok", r.text
    assert http.get(f"/q/work/{msg_id}/attach/a.txt").content == b"hello"
    r = http.post(f"/q/work/{msg_id}/attach/a.txt", data={"_method": "delete"})
    assert r.json() == ["ok", "Attachment deleted successfully"], r.text
    assert http.get(f"/q/work/{msg_id}/attach/a.txt").status_code == 404
    assert http.post(f"/q/work/{msg_id}", data={"_method": "commit", "x_format": "json"}).json() == \
        ["ok", "msg commited"]
    assert http.get(f"/q/work/{msg_id}/state.json").json() == ["que"]


def test_destroy_stops_the_running_script_and_the_message_ends_in_err(root: Path, tmp_path: Path) -> None:
    from http_helpers import daemon

    started = tmp_path / "started"
    slow = tmp_path / "slow.sh"
    slow.write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 60\n")
    slow.chmod(0o755)
    c = spoolq.open(root)
    c.create_queue("slow", script=str(slow))
    with daemon(root, free_port(), token=None, extra=("--trust-loopback",)) as base:
        mid = c.send("slow").msg_id
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.state(f"slow/{mid}") == State.RUN
        status, body = curl("-d", "_method=destroy", "-d", "x_format=json", f"{base}/q/slow/{mid}")
        assert (status, json.loads(body)) == (200, ["ok", "msg destroyed"])
        view = c.wait(f"slow/{mid}", timeout=30)
        assert view.state == State.ERR and "cancelled" in view.status, view.status

