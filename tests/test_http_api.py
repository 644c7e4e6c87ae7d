"""The JSON API (/api/v1): in process with TestClient, and against a real server thread."""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi.testclient import TestClient
from http_helpers import AUTH, TOKEN, daemon, fake_run, free_port, have_daemon

import spoolq
from spoolq.errors import InvalidMessage
from spoolq.http.app import create_app
from spoolq.http.errors import AddressInUse, HttpConfigError
from spoolq.http.server import start_http
from spoolq.model import State

API = "/api/v1"
LOCAL = "http://127.0.0.1"  # a loopback Host: anonymous requests are answered only under such names


@pytest.fixture
def client(root: Path) -> spoolq.Client:
    c = spoolq.open(root)
    c.create_queue("work", script="/bin/true")
    return c


@pytest.fixture
def http(client: spoolq.Client) -> TestClient:
    """The app, with the token on every request (tests of anonymous access make their own)."""
    return TestClient(create_app(client, TOKEN, poll_interval=0.02, events_interval=0.05), base_url=LOCAL,
                      headers=AUTH)


def err(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


def send(http: TestClient, queue: str = "work", **fields: Any) -> dict[str, Any]:
    r = http.post(f"{API}/queues/{queue}/messages", json=fields)
    assert r.status_code == 201, r.text
    return r.json()


# -- service -------------------------------------------------------------------------------
def test_healthz_and_openapi(http: TestClient) -> None:
    assert http.get("/healthz").json()["status"] == "ok"
    doc = http.get(f"{API}/openapi.json").json()
    paths = doc["paths"]
    assert "/api/v1/queues" in paths and "/api/v1/queues/{queue}/messages" in paths
    assert "/api/v1/events" in paths and "/metrics" in paths
    assert not any(p.startswith("/q/") for p in paths), "RQ routes are not part of the documented API"
    send_body = paths["/api/v1/queues/{queue}/messages"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(send_body)


def test_queue_lifecycle(http: TestClient) -> None:
    r = http.post(f"{API}/queues", json={"name": "mail", "script": "/bin/cat", "num_workers": 3})
    assert r.status_code == 201
    assert r.json()["config"]["num_workers"] == 3
    assert err(http.post(f"{API}/queues", json={"name": "mail", "script": "/bin/cat"}))["code"] == "queue_exists"
    listing = {q["name"]: q for q in http.get(f"{API}/queues").json()}
    assert listing["mail"]["status"] == "UP" and listing["mail"]["counts"]["que"] == 0
    r = http.patch(f"{API}/queues/mail/config", json={"num_workers": 5, "timeout": 30})
    assert r.status_code == 200 and r.json()["num_workers"] == 5
    assert http.get(f"{API}/queues/mail/config").json()["timeout"] == 30
    r = http.patch(f"{API}/queues/mail/config", json={"num_workers": 0})
    assert r.status_code == 400 and err(r)["code"] == "invalid_config"
    assert http.patch(f"{API}/queues/mail/config", json={"name": "other"}).status_code == 400
    for action, status in (("pause", "PAUSE"), ("resume", "UP"), ("down", "DOWN"), ("up", "UP")):
        assert http.post(f"{API}/queues/mail/{action}").json()["status"] == status
    assert http.post(f"{API}/queues/mail/sideways").status_code == 400
    send(http, "mail")
    r = http.delete(f"{API}/queues/mail")
    assert r.status_code == 409 and err(r)["code"] == "conflict"
    assert http.delete(f"{API}/queues/mail", params={"force": "true"}).status_code == 200
    assert err(http.get(f"{API}/queues/mail"))["code"] == "queue_not_found"


def test_down_queue_refuses_with_503(http: TestClient) -> None:
    http.post(f"{API}/queues/work/down")
    r = http.post(f"{API}/queues/work/messages", json={"param1": "x"})
    assert r.status_code == 503 and err(r)["code"] == "queue_down"


def test_send_get_list_paginate_filter(http: TestClient) -> None:
    ids = [send(http, param1=f"p{i}", params={"user": "alice" if i % 2 else "bob"})["msg_id"]
           for i in range(7)]
    m = http.get(f"{API}/queues/work/messages/{ids[0]}").json()
    assert m["param1"] == "p0" and m["state"] == "que" and m["params"] == {"user": "bob"}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"state": "que", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = http.get(f"{API}/queues/work/messages", params=params).json()
        seen += [i["msg_id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids)), "newest first, every message exactly once"
    alice = http.get(f"{API}/queues/work/messages", params={"filter": "alice"}).json()["items"]
    assert sorted(i["msg_id"] for i in alice) == sorted(ids[1::2])


def test_send_multipart_with_attachments_and_download(http: TestClient, root: Path) -> None:
    blob = bytes(range(256)) * 400
    r = http.post(f"{API}/queues/work/messages",
                  data={"message": json.dumps({"param1": "files"})},
                  files=[("file", ("data.bin", blob, "application/octet-stream")),
                         ("file", ("notes.txt", b"hello\n", "text/plain"))])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["attachments"]["data.bin"]["size"] == len(blob)
    mid = body["msg_id"]
    d = http.get(f"{API}/queues/work/messages/{mid}/attachments/data.bin")
    assert d.status_code == 200 and d.content == blob
    assert d.headers["content-length"] == str(len(blob))
    t = http.get(f"{API}/queues/work/messages/{mid}/attachments/notes.txt")
    assert t.headers["content-type"].startswith("text/plain") and t.text == "hello\n"
    part = http.get(f"{API}/queues/work/messages/{mid}/attachments/data.bin", headers={"Range": "bytes=256-511"})
    assert part.status_code == 206 and part.content == blob[256:512]
    assert not list((root / ".uploads").iterdir()), "spooled uploads are removed after the request"
    stored = root / "queue" / "work"
    att = next(stored.glob("que/*/*/*/*/attach/data.bin"))
    assert att.stat().st_nlink == 1


def test_prep_attach_commit(http: TestClient) -> None:
    mid = send(http, param1="later", state="prep")["msg_id"]
    r = http.post(f"{API}/queues/work/messages/{mid}/attachments",
                  files={"file": ("a.txt", b"abc", "text/plain")}, data={"name": "renamed.txt"})
    assert r.status_code == 201 and r.json()["md5"] == "900150983cd24fb0d6963f7d28e17f72"
    assert http.post(f"{API}/queues/work/messages/{mid}/commit").status_code == 200
    m = http.get(f"{API}/queues/work/messages/{mid}").json()
    assert m["state"] == "que" and m["_attachments"]["renamed.txt"]["size"] == 3
    r = http.post(f"{API}/queues/work/messages/{mid}/attachments", files={"file": ("b.txt", b"x")})
    assert r.status_code == 409 and err(r)["code"] == "wrong_state"


def test_message_actions(http: TestClient, client: spoolq.Client) -> None:
    a = send(http, param1="a")["msg_id"]
    client.store.move("work", a, State.QUE, State.ERR, note="test")
    r = http.post(f"{API}/queues/work/messages/{a}/retry")
    assert r.status_code == 200
    assert http.get(f"{API}/queues/work/messages/{a}").json()["state"] == "que"
    assert err(http.post(f"{API}/queues/work/messages/{a}/retry"))["code"] == "wrong_state"
    assert http.post(f"{API}/queues/work/messages/{a}/run-now").status_code == 200
    assert http.get(f"{API}/queues/work/messages/{a}").json()["due"] == 0
    fake_run(client, "work", a, ["ok\n"])
    clone = http.post(f"{API}/queues/work/messages/{a}/clone").json()["clone"]
    cm = http.get(f"{API}/queues/work/messages/{clone['msg_id']}").json()
    assert cm["cloned_from"] == a and cm["state"] == "que"
    r = http.post(f"{API}/queues/work/messages/{clone['msg_id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel"] == "cancelled (it was queued)", r.text
    assert http.get(f"{API}/queues/work/messages/{clone['msg_id']}").json()["status"] == "err - cancelled"
    assert http.delete(f"{API}/queues/work/messages/{a}").status_code == 200
    assert http.get(f"{API}/queues/work/messages/{a}").status_code == 404
    assert http.post(f"{API}/queues/work/messages/{a}/explode").status_code == 400


def finished(http: TestClient, op: dict[str, Any]) -> dict[str, Any]:
    """A bulk operation's final state (``?wait`` blocks until it ends)."""
    r = http.get(op["url"], params={"wait": 30})
    assert r.status_code == 200 and r.json()["status"] != "running", r.text
    return r.json()


def test_bulk_over_filter(http: TestClient, client: spoolq.Client) -> None:
    for i in range(25):
        send(http, param1="keep" if i % 5 else "drop", param2=str(i))
    r = http.post(f"{API}/queues/work/bulk", json={"action": "delete", "state": "que", "filter": "drop"})
    assert r.status_code == 202 and r.json()["status"] in ("running", "done")
    op = finished(http, r.json())
    assert (op["status"], op["scanned"], op["matched"], op["succeeded"], op["failures"], op["remaining"]) == \
        ("done", 25, 5, 5, 0, 20)
    assert http.get(f"{API}/queues/work").json()["counts"]["que"] == 20
    for v in client.list("work", State.QUE, limit=100).items[:12]:
        client.store.move("work", v.msg_id, State.QUE, State.ERR)
    op = finished(http, http.post(f"{API}/queues/work/bulk", json={"action": "retry", "state": "err"}).json())
    assert {k: op[k] for k in ("queue", "state", "filter", "action", "matched", "succeeded", "failed",
                               "remaining")} == {"queue": "work", "state": "err", "filter": "", "action": "retry",
                                                 "matched": 12, "succeeded": 12, "failed": [], "remaining": 0}
    assert http.post(f"{API}/queues/work/bulk", json={"action": "nuke", "state": "err"}).status_code == 400
    # Count first, then act on exactly what was counted, even once more messages match.
    count = finished(http, http.post(f"{API}/queues/work/bulk",
                                     json={"action": "count", "state": "que", "filter": "keep"}).json())
    assert count["matched"] == 20 and count["selection_kept"]
    send(http, param1="keep", param2="late")
    op = finished(http, http.post(f"{API}/queues/work/bulk", json={"action": "delete", "state": "que",
                                                                   "ids_from": count["id"]}).json())
    assert (op["matched"], op["succeeded"], op["remaining"]) == (20, 20, 1)
    assert [v.message.param2 for v in client.list("work", State.QUE).items] == ["late"]
    assert http.get(f"{API}/operations").json()[0]["id"] == op["id"]
    # A message that left the state between the count and the delete is not deleted (audit:
    # a retried one, back in que, went with the errors).
    ids = [v.msg_id for v in client.list("work", State.QUE).items]
    client.store.move("work", ids[0], State.QUE, State.ERR)
    count = finished(http, http.post(f"{API}/queues/work/bulk", json={"action": "count", "state": "err"}).json())
    assert count["matched"] == 1
    client.retry(f"work/{ids[0]}")
    op = finished(http, http.post(f"{API}/queues/work/bulk", json={"action": "delete", "state": "err",
                                                                   "ids_from": count["id"]}).json())
    assert op["succeeded"] == 0 and client.get(f"work/{ids[0]}").state == State.QUE


def test_log_range_and_finished_stream(http: TestClient, client: spoolq.Client) -> None:
    mid = send(http)["msg_id"]
    r = http.get(f"{API}/queues/work/messages/{mid}/log")
    assert r.status_code == 404 and err(r)["code"] == "log_not_found"
    text = "".join(f"\x1b[3{i % 8}mline {i}\x1b[0m\n" for i in range(50))
    fake_run(client, "work", mid, [text])
    full = http.get(f"{API}/queues/work/messages/{mid}/log")
    assert full.status_code == 200 and full.text == text
    r = http.get(f"{API}/queues/work/messages/{mid}/log", headers={"Range": "bytes=10-"})
    assert r.status_code == 206 and r.text == text[10:]
    assert r.headers["content-range"] == f"bytes 10-{len(text) - 1}/{len(text)}"
    r = http.get(f"{API}/queues/work/messages/{mid}/log", headers={"Range": f"bytes={len(text)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(text)}"
    r = http.get(f"{API}/queues/work/messages/{mid}/log", headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.text == text[-5:]
    events = parse_sse(http.get(f"{API}/queues/work/messages/{mid}/log/stream").text)
    assert "".join(d["text"] for e, d in events if e == "log") == text
    assert events[-1][0] == "end" and events[-1][1]["state"] == "done"
    resumed = parse_sse(http.get(f"{API}/queues/work/messages/{mid}/log/stream",
                                 params={"offset": len(text) - 7}).text)
    assert "".join(d["text"] for e, d in resumed if e == "log") == text[-7:]


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.split("\n\n"):
        event, data = "message", None
        for line in frame.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if data is not None:
            out.append((event, data))
    return out


def test_errors_have_one_shape_and_no_5xx(http: TestClient) -> None:
    cases = [
        ("get", f"{API}/queues/nope", None, 404, "queue_not_found"),
        ("get", f"{API}/queues/bad..name", None, 400, "invalid_name"),
        ("get", f"{API}/queues/work/messages/notanid", None, 400, "invalid_name"),
        ("get", f"{API}/queues/work/messages/20200101.0000.00.000.1", None, 404, "message_not_found"),
        ("get", f"{API}/queues/work/messages", {"state": "limbo"}, 400, "invalid_input"),
        ("get", f"{API}/queues/work/messages", {"limit": "0"}, 400, "invalid_input"),
        ("get", f"{API}/queues/work/messages", {"cursor": "../../etc"}, 400, "invalid_name"),
        ("post", f"{API}/queues", {"name": "x"}, 400, "invalid_config"),
        ("get", f"{API}/nowhere", None, 404, "not_found"),
    ]
    for method, url, params, status, code in cases:
        if method == "get":
            r = http.get(url, params=params)
        else:
            r = http.post(url, json=params)
        assert (r.status_code, err(r)["code"]) == (status, code), (url, r.text)
    bad_bodies: list[Any] = [b"{not json", b"[]", json.dumps({"param1": {"nested": 1}}).encode(),
                             json.dumps({"unknown": 1}).encode(), json.dumps({"due": "soon"}).encode(),
                             json.dumps({"due": 1e300}).encode(), json.dumps({"max_count": -1}).encode(),
                             json.dumps({"post_run_webhook": ["ftp://x"]}).encode(), b"\xff\xfe",
                             json.dumps({"state": "run"}).encode(), json.dumps({"count": 3}).encode(),
                             json.dumps({"param1": [1]}).encode(), json.dumps({"due": 1, "delay": 2}).encode()]
    for body in bad_bodies:
        r = http.post(f"{API}/queues/work/messages", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err(r)
    r = http.post(f"{API}/queues/work/messages", content=b"--x\r\nbroken", headers={
        "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400
    big = json.dumps({"param1": "x" * (2 << 20)}).encode()  # over model.MAX_SEND_BYTES
    r = http.post(f"{API}/queues/work/messages", content=big, headers={"content-type": "application/json"})
    assert (r.status_code, err(r)["code"]) == (413, "too_large")
    schema = http.get(f"{API}/openapi.json").json()
    body = schema["paths"]["/api/v1/queues/{queue}/messages"]["post"]["requestBody"]["content"]
    props = body["application/json"]["schema"]["properties"]
    assert set(props) == {*spoolq.model.MESSAGE_FIELD_NAMES - {"count"}, "state"}, "one definition of a message"


@pytest.mark.parametrize("fields", [
    {"param1": "\ud800"}, {"params": {"k": "\udc80"}}, {"param2": "a\u0000b"},
    {"params": {"deep": functools.reduce(lambda acc, _: [acc], range(40), cast("list[Any]", []))}},
])
def test_values_that_would_poison_the_spool_are_refused(http: TestClient, fields: dict[str, Any]) -> None:
    # Each was once answered 201 and then broke the daemon or every later listing.
    body = json.dumps(fields).encode()  # \ud800 stays an escape: valid JSON, invalid text
    r = http.post(f"{API}/queues/work/messages", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    r = http.post("/q/work/new_message", data={"mesg": body.decode(), "x_format": "json"})
    assert r.status_code == 400 and r.json()[0] == "fail", r.text
    for state in ("que", "prep"):
        assert http.get(f"{API}/queues/work/messages", params={"state": state}).status_code == 200


@pytest.mark.parametrize("params", [[[]], [["a", "b"]], True, 1.5, "x", [1]])
def test_params_that_are_not_an_object_are_a_400(http: TestClient, client: spoolq.Client, params: Any) -> None:
    """Found by the schema fuzzer: a list (even of pairs, which dict() would take), a bool or
    a number as params crashed the send with a 500. Every entry point says it the same way."""
    r = http.post(f"{API}/queues/work/messages", json={"param1": "p", "params": params})
    assert r.status_code == 400 and "params must be a JSON object" in err(r)["message"], r.text
    r = http.post("/q/work/new_message", data={"mesg": json.dumps({"params": params}), "x_format": "json"})
    assert r.status_code == 400 and r.json()[0] == "fail", r.text
    with pytest.raises(InvalidMessage):
        client.send("work", params=params)
    assert client.counts("work")["que"] == 0


def test_deep_json_anywhere_is_a_400(http: TestClient) -> None:
    deep = ("[" * 5000 + "]" * 5000).encode()
    for url in (f"{API}/queues/work/messages", f"{API}/queues", f"{API}/queues/work/bulk"):
        r = http.post(url, content=b'{"params": {"a": ' + deep + b"}}", headers={"content-type": "application/json"})
        assert r.status_code == 400, (url, r.status_code, r.text[:200])
        err(r)
    r = http.post("/q/work/new_message", data={"mesg": '{"params": {"a": ' + deep.decode() + "}}"})
    assert r.status_code < 500


def test_bodies_are_capped_except_uploads(http: TestClient) -> None:
    from spoolq.http.limits import MAX_BODY

    big = b'{"param1": "' + b"x" * (MAX_BODY + 10) + b'"}'
    for url in (f"{API}/queues/work/messages", f"{API}/queues", "/q/work/new_message"):
        r = http.post(url, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and err(r)["code"] == "too_large", (url, r.text[:200])

    def chunked() -> Any:  # no Content-Length: counted while it streams in
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    r = http.post(f"{API}/queues", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    files = {"file": ("big.bin", b"\0" * (MAX_BODY + 10), "application/octet-stream")}
    r = http.post(f"{API}/queues/work/messages", data={"message": "{}"}, files=files)
    assert r.status_code == 201, "attachments stream to disk and are not capped"


def test_served_files_are_inert(http: TestClient) -> None:
    page = b"<script>fetch('/api/v1/queues')</script>"
    files = [("file", ("page.html", page, "text/html")),
             ("file", ("pic.png", b"\x89PNG\r\n", "image/png"))]
    m = http.post(f"{API}/queues/work/messages", data={"message": "{}"}, files=files).json()
    base = f"{API}/queues/work/messages/{m['msg_id']}/attachments"
    for url in (f"{base}/page.html", f"/q/work/{m['msg_id']}/attach/page.html"):
        r = http.get(url)
        assert r.headers["content-disposition"].startswith("attachment;"), url
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in r.headers["content-security-policy"]
    assert http.get(f"{base}/pic.png").headers["content-disposition"].startswith("inline;")
    head = http.head(f"{base}/page.html")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(page))
    r = http.get(f"{base}/page.html", headers={"Range": "bytes=9-3"})  # invalid: ignored (RFC 9110)
    assert r.status_code == 200 and r.content == page
    assert http.get("/").headers["x-frame-options"] == "DENY"


def test_anonymous_only_under_loopback_names(client: spoolq.Client) -> None:
    # A page on another site that rebinds its name to 127.0.0.1 sends its own Host.
    app = create_app(client, TOKEN)
    evil = TestClient(app, base_url="http://rebind.attacker.example:3333")
    r = evil.post("/q/work/new_message", data={"mesg": "{}"})
    assert r.status_code == 403 and "Host" in err(r)["message"]
    assert evil.get(f"{API}/queues").status_code == 403
    assert client.counts("work")["que"] == 0
    for base in ("http://127.0.0.1:3333", "http://localhost", "http://[::1]:8080"):
        assert TestClient(app, base_url=base).get(f"{API}/queues").status_code == 200, base
    assert evil.get(f"{API}/queues", headers=AUTH).status_code == 200, "with the token any Host will do"


def test_status_codes_say_what_happened(http: TestClient, client: spoolq.Client) -> None:
    missing = f"{API}/queues/work/messages/20200101.0000.00.000.1"
    r = http.post(f"{missing}/retry")
    assert r.status_code == 404 and err(r)["code"] == "message_not_found"
    m = send(http)
    client.store.move("work", m["msg_id"], State.QUE, State.RUN)
    client.store.move("work", m["msg_id"], State.RUN, State.DONE)
    r = http.post(f"{API}/queues/work/messages/{m['msg_id']}/commit")
    assert r.status_code == 409, r.text
    assert http.get("/q/bad..name.json").text.startswith("404 - Queue")
    doc = http.get(f"{API}/openapi.json").json()
    ops = [op for path in doc["paths"].values() for op in path.values()]
    assert not any("422" in op["responses"] for op in ops)
    assert all(op["responses"]["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
               for op in ops)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_metrics(http: TestClient) -> None:
    send(http)
    text = http.get("/metrics").text
    assert 'spoolq_messages{queue="work",state="que"} 1' in text
    assert 'spoolq_queue_status{queue="work",status="UP"} 1' in text
    assert "spoolq_http_requests_total{" in text


def test_ui_escapes_user_input(http: TestClient, client: spoolq.Client) -> None:
    mid = send(http, param1="<script>alert('x')</script>", src="<b>bold</b>")["msg_id"]
    page = http.get(f"/q/work/{mid}").text
    assert "<script>alert" not in page and "&lt;script&gt;alert(" in page
    assert "<b>bold</b>" not in page
    listing = http.get("/q/work", params={"filter": "<script>"}).text
    assert "<script>alert" not in listing and mid in listing


def test_ui_forms_need_csrf_and_same_origin(http: TestClient) -> None:
    r = http.post("/ui/new_queue", data={"name": "evil", "script": "/bin/true"})
    assert r.status_code == 403
    page = http.get("/new_queue")
    token = page.text.split('name="csrf" value="')[1].split('"')[0]
    r = http.post("/ui/new_queue", data={"name": "good", "script": "/bin/true", "csrf": token},
                  follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/q/good"
    r = http.post(f"{API}/queues/work/pause", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and err(r)["code"] == "forbidden"
    r = http.post("/q/work/new_message", data={"mesg": "{}"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403


def test_token_auth_sessions_and_sign_out(client: spoolq.Client) -> None:
    http = TestClient(create_app(client, TOKEN, anonymous="none"))
    assert http.get("/healthz").status_code == 200
    r = http.get(f"{API}/queues")
    assert r.status_code == 401 and err(r)["code"] == "unauthorized"
    assert http.get(f"{API}/queues", headers=AUTH).status_code == 200
    basic = base64.b64encode(f"rq:{TOKEN}".encode()).decode()
    assert http.get("/q.json", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    r = http.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    login = http.get("/login")
    csrf = login.text.split('name="csrf" value="')[1].split('"')[0]
    bad = http.post("/login", data={"token": "nope", "csrf": csrf, "next": "/"}, follow_redirects=False)
    assert bad.status_code == 401
    ok = http.post("/login", data={"token": TOKEN, "csrf": csrf, "next": "/q/work"}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/q/work"
    session = http.cookies["spoolq_session"]
    assert TOKEN not in session, "the cookie is a session id, not the token nor derived from it"
    assert http.get("/q/work").status_code == 200, "the session cookie now authorizes the UI"
    page = http.get("/q/work").text
    assert 'action="/logout"' in page
    out = http.post("/logout", headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    r = http.get("/q/work", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303, "signed out: back to the login form"
    replay = TestClient(http.app, cookies={"spoolq_session": session})
    r = replay.get(f"{API}/queues")
    assert r.status_code == 401, "signing out revokes the session on the server, not only in the browser"


def test_a_session_mints_no_sign_in_links(client: spoolq.Client) -> None:
    """A sign-in link is a new session: one minted by a session outlived its sign-out and
    its day (audit). Only the token (or ``login-url`` on disk) makes them."""
    http = TestClient(create_app(client, TOKEN, anonymous="none"))
    r = http.post(f"{API}/login-links", headers=AUTH, json={"ttl": 600})
    assert r.status_code == 201
    assert http.get(r.json()["url"], follow_redirects=False).status_code == 303  # signed in by the link
    r = http.post(f"{API}/login-links", headers={"Origin": "http://testserver"}, json={"ttl": 86400})
    assert r.status_code == 403 and err(r)["code"] == "forbidden"


@pytest.mark.parametrize("secure", [False, True])
def test_secure_cookies_behind_a_tls_proxy(client: spoolq.Client, secure: bool) -> None:
    """Behind a TLS reverse proxy the daemon sees plain HTTP: ``serve --secure-cookies``
    marks the session (and CSRF) cookies Secure anyway, so a browser never sends them over
    http (audit: they never were, whatever the docs said)."""
    http = TestClient(create_app(client, TOKEN, anonymous="none", secure_cookies=secure))
    link = http.post(f"{API}/login-links", headers=AUTH).json()["url"]
    signed = http.get(link, headers={"X-Forwarded-Proto": "https"}, follow_redirects=False)
    assert signed.status_code == 303
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith("spoolq_session=") and ("; Secure" in cookie) == secure, cookie
    form = http.get("/login")
    assert ("; Secure" in form.headers["set-cookie"]) == secure


def test_signing_out_ends_the_sessions_open_streams(server: Any, client: spoolq.Client) -> None:
    """An events stream opened with the session cookie kept streaming after sign-out
    (audit); signing out ends it."""
    with httpx.Client(base_url=server.url, timeout=30) as h:
        link = h.post(f"{API}/login-links", headers=AUTH, json={"ttl": 600}).json()["url"]
        assert h.get(link, follow_redirects=False).status_code == 303
        assert "spoolq_session" in h.cookies
        got: list[str] = []
        with h.stream("GET", f"{API}/events") as resp:
            assert resp.status_code == 200
            signed_out = False
            for chunk in resp.iter_text():
                got.append(chunk)
                if not signed_out and "event: queue" in "".join(got):
                    out = httpx.post(f"{server.url}/logout", cookies={"spoolq_session": h.cookies["spoolq_session"]},
                                     headers={"Origin": server.url}, follow_redirects=False)
                    assert out.status_code == 303
                    signed_out = True
                    client.create_queue("afterlogout", script="/bin/true")
        # The loop ended: the server closed the stream, and nothing after sign-out came.
        assert signed_out and "afterlogout" not in "".join(got)


def test_start_http_refuses_exposed_address_without_token(client: spoolq.Client) -> None:
    with pytest.raises(HttpConfigError, match="without a token"):
        start_http(client, "0.0.0.0", free_port(), None)
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    try:
        with pytest.raises(AddressInUse):
            start_http(client, "127.0.0.1", h.port, TOKEN)
    finally:
        h.stop()


@pytest.fixture
def server(client: spoolq.Client) -> Any:
    h = start_http(client, "127.0.0.1", free_port(), TOKEN, poll_interval=0.02, events_interval=0.05)
    yield h
    h.stop()


def test_real_server_follows_a_running_log(server: Any, client: spoolq.Client) -> None:
    mid = client.send("work").msg_id
    started = threading.Event()
    lines = [f"\x1b[1;3{i % 7 + 1}mstep {i}\x1b[0m\n" for i in range(8)]
    t = threading.Thread(target=fake_run, args=(client, "work", mid, lines),
                         kwargs={"delay": 0.15, "started": started})
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.Client(base_url=server.url, timeout=30) as h, \
            h.stream("GET", f"{API}/queues/work/messages/{mid}/log/stream") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        t.start()
        buf = ""
        for chunk in resp.iter_text():
            buf += chunk
            while "\n\n" in buf:
                frame, buf = buf.split("\n\n", 1)
                events += parse_sse(frame + "\n\n")
            if events and events[-1][0] == "end":
                break
    t.join()
    log_events = [d for e, d in events if e == "log"]
    assert len(log_events) >= 2, "the log arrived in pieces, while the job ran"
    assert "".join(d["text"] for d in log_events) == "".join(lines)
    states = [d["state"] for e, d in events if e == "state"]
    assert "run" in states and states[-1] == "done"
    first_run = next(i for i, (e, d) in enumerate(events) if e == "state" and d["state"] == "run")
    first_done = next(i for i, (e, d) in enumerate(events) if e == "state" and d["state"] == "done")
    assert any(e == "log" for e, _ in events[first_run:first_done])


def test_real_server_events_stream(server: Any, client: spoolq.Client) -> None:
    got: list[dict[str, Any]] = []
    with httpx.Client(base_url=server.url, timeout=30) as h, \
            h.stream("GET", f"{API}/events", params={"queue": "work"}) as resp:
        buf = ""
        sent = False
        for chunk in resp.iter_text():
            buf += chunk
            while "\n\n" in buf:
                frame, buf = buf.split("\n\n", 1)
                got += [d for e, d in parse_sse(frame + "\n\n") if e == "queue"]
            if got and not sent:
                assert got[0]["counts"]["que"] == 0
                client.send("work")
                sent = True
            if any(g["counts"]["que"] == 1 for g in got):
                break
    assert got[-1]["name"] == "work" and got[-1]["counts"]["que"] == 1


def test_real_server_stops_with_open_streams(client: spoolq.Client) -> None:
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    with httpx.Client(base_url=h.url, timeout=10) as c, c.stream("GET", f"{API}/events") as resp:
        assert resp.status_code == 200
        t0 = time.monotonic()
        h.stop()
        assert not h.thread.is_alive()
    assert time.monotonic() - t0 < 30


def test_memory_store_attachments_stream(tmp_path: Path) -> None:
    """A store without file paths (memory:) still serves attachments and uploads."""
    mem = spoolq.open("memory:")
    mem.create_queue("m", script="/bin/true")
    http = TestClient(create_app(mem, TOKEN, upload_dir=tmp_path / "up"), base_url=LOCAL, headers=AUTH)
    r = http.post(f"{API}/queues/m/messages", data={"message": "{}"},
                  files={"file": ("x.json", b'{"a": 1}', "application/json")})
    assert r.status_code == 201, r.text
    d = http.get(f"{API}/queues/m/messages/{r.json()['msg_id']}/attachments/x.json")
    assert d.status_code == 200 and d.json() == {"a": 1}
    assert d.headers["content-type"] == "application/json" and d.headers["content-length"] == "8"


@pytest.mark.skipif(not have_daemon(), reason="spoolq serve is not available in this checkout")
def test_against_the_real_daemon(tmp_path: Path) -> None:
    """The API as served by ``spoolq serve``: a real script runs, its log streams, it finishes."""
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/sh\nfor i in 1 2 3; do printf "\\033[35mtick %s\\033[0m\\n" $i; sleep 0.2; done\n'
                      'cat "$RQ_MSG_DIR/../attach/in.txt"\n')
    script.chmod(0o755)
    root = tmp_path / "spool"
    root.mkdir()
    with daemon(root, free_port()) as url, httpx.Client(base_url=url, timeout=60, headers=AUTH) as h:
        assert h.post(f"{API}/queues", json={"name": "real", "script": str(script)}).status_code == 201
        r = h.post(f"{API}/queues/real/messages", data={"message": json.dumps({"param1": "x"})},
                   files={"file": ("in.txt", b"from the attachment\n")})
        assert r.status_code == 201, r.text
        mid = r.json()["msg_id"]
        with h.stream("GET", f"{API}/queues/real/messages/{mid}/log/stream") as resp:
            events = parse_sse("".join(resp.iter_text()))
        text = "".join(d["text"] for e, d in events if e == "log")
        assert "\x1b[35mtick 1\x1b[0m\n" in text and "tick 3" in text and "from the attachment" in text
        assert events[-1] == ("end", {"state": "done", "status": events[-1][1]["status"],
                                      "offset": len(text.encode())})
        assert h.get(f"{API}/queues/real/messages/{mid}").json()["state"] == "done"
        assert h.get(f"{API}/queues/real/messages/{mid}/log").text == text
        assert 'spoolq_messages{queue="real",state="done"} 1' in h.get("/metrics").text


def _csrf(page: str) -> str:
    return page.split('name="csrf" value="')[1].split('"')[0]


@pytest.mark.parametrize("max_count", ["\u00b2", "9" * 5000, "-1", "1.5", "x"])
def test_the_ui_form_refuses_a_max_count_that_is_not_a_count(http: TestClient, client: spoolq.Client,
                                                             max_count: str) -> None:
    """Found by an audit: "²" passed str.isdigit() and int() refused it; 5000 digits are past
    int()'s limit. Both crashed the form with a 500."""
    csrf = _csrf(http.get("/q/work/new_message").text)
    r = http.post("/ui/q/work/new_message", data={"csrf": csrf, "param1": "ui", "max_count": max_count},
                  follow_redirects=False)
    assert r.status_code < 500, r.text
    assert "max_count must be a positive integer" in r.text or r.status_code == 400, r.text
    assert client.counts("work")["que"] == 0


def test_ui_forms_prep_attach_commit_and_bulk(http: TestClient, client: spoolq.Client) -> None:
    csrf = _csrf(http.get("/q/work/new_message").text)
    r = http.post("/ui/q/work/new_message", data={"csrf": csrf, "param1": "ui", "mode": "prep",
                                                  "params": '{"k": [1, 2]}', "delay": "30"},
                  files=[("attachment", ("one.txt", b"1", "text/plain")), ("attachment", ("", b"", ""))],
                  follow_redirects=False)
    assert r.status_code == 303, r.text
    page_url = r.headers["location"]
    mid = page_url.rsplit("/", 1)[1]
    view = client.get(f"work/{mid}")
    assert view.state == State.PREP and view.message.params == {"k": [1, 2]} and set(view.attachments) == {"one.txt"}
    assert view.message.due > time.time() + 20
    r = http.post(f"/ui/q/work/{mid}", data={"csrf": csrf, "action": "attach"},
                  files={"attachment": ("two.txt", b"22", "text/plain")}, follow_redirects=False)
    assert r.status_code == 303
    page = http.get(page_url).text
    assert "two.txt" in page and "attached two.txt" in page
    http.post(f"/ui/q/work/{mid}", data={"csrf": csrf, "action": "commit"})
    assert client.get(f"work/{mid}").state == State.QUE
    bad = http.post("/ui/q/work/new_message", data={"csrf": csrf, "params": "[not json"})
    assert bad.status_code == 400 and "params is not valid JSON" in bad.text
    for i in range(4):
        client.send("work", param1=f"bulk-{i}")
    r = http.post("/ui/q/work", data={"csrf": csrf, "action": "bulk", "bulk_action": "delete", "state": "que",
                                      "filter": "bulk-"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/operations/")
    op_id = r.headers["location"].rsplit("/", 1)[1]
    count = finished(http, {"url": f"{API}/operations/{op_id}"})
    assert count["action"] == "count" and count["matched"] == 4 and client.counts("work")["que"] == 5
    page = http.get(r.headers["location"]).text
    assert "4 que messages match." in page and "Delete these 4" in page
    r = http.post(f"/ui/operations/{op_id}", data={"csrf": csrf, "action": "apply"}, follow_redirects=False)
    assert r.status_code == 303
    done = finished(http, {"url": f"{API}/operations/{r.headers['location'].rsplit('/', 1)[1]}"})
    assert (done["action"], done["succeeded"], done["remaining"]) == ("delete", 4, 1)
    assert client.counts("work")["que"] == 1


def test_the_openapi_document_describes_every_json_answer(http: TestClient) -> None:
    """Issue 8: JSON endpoints declare what they return (spoolq/http/schemas.py)."""
    spec = http.get(f"{API}/openapi.json").json()
    undescribed = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            for status, resp in op.get("responses", {}).items():
                schema = resp.get("content", {}).get("application/json", {}).get("schema")
                if status.startswith("2") and schema is not None and not (schema.get("$ref") or schema.get("items")):
                    undescribed.append(f"{method.upper()} {path} {status}")
    assert undescribed == [], undescribed
    msg = spec["components"]["schemas"]["MessageOut"]["properties"]
    assert {"msg_id", "state", "status", "history", "_attachments"} <= set(msg)
