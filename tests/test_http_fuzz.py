"""Property-based fuzzing of the OpenAPI document: no request may get a 5xx.

Schemathesis generates requests from /api/v1/openapi.json (valid and invalid bodies,
odd path and query values) against the app in process. The SSE streams are left out:
they stay open by design. Examples per operation are bounded to keep this under a minute.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from http_helpers import AUTH, TOKEN
from hypothesis import HealthCheck, settings

import spoolq
from spoolq.http.app import create_app

_root = tempfile.mkdtemp(prefix="spoolq-fuzz-")
atexit.register(shutil.rmtree, _root, True)
_client = spoolq.open(_root)
_client.create_queue("work", script="/bin/true")
_ids = [_client.send("work", param1=str(i)).msg_id for i in range(3)]
_client.prep("work", param1="prepped")

app = create_app(_client, TOKEN)


def _as_loopback(inner: Any) -> Any:
    """The app as the token holder on this machine reaches it: schemathesis sends Host:
    testserver, which anonymous requests may not use, and no token, without which every
    change is refused before its handler runs (test_http_security covers both refusals)."""
    async def shim(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [*((k, v) for k, v in scope["headers"]
                                            if k not in (b"host", b"authorization")),
                                          (b"host", b"127.0.0.1"),
                                          (b"authorization", AUTH["Authorization"].encode())]}
        await inner(scope, receive, send)
    return shim


_http = TestClient(app, base_url="http://127.0.0.1", headers=AUTH)
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", _as_loopback(app)).exclude(
    path_regex=r"(/events|/log/stream)$")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}")
    if case.method == "POST" and response.status_code < 300:
        # What was accepted must stay readable: listing every state of the queue must work.
        for state in ("prep", "que", "err"):
            r = _http.get("/api/v1/queues/work/messages", params={"state": state, "limit": 500})
            assert r.status_code < 500, (case.method, case.formatted_path, r.text[:300])
    ctype = response.headers.get("content-type") or [""]
    if response.status_code >= 400 and ctype[0].startswith("application/json") and case.method != "HEAD":
        body = response.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body


# -- RQ routes and HTML pages are not in the OpenAPI document: fuzz them directly. ------------
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_segment = st.one_of(st.sampled_from(["work", "nope", *_ids, "..", "done.json", "state.json", "%2e%2e"]),
                     st.text(min_size=1, max_size=30).filter(lambda s: "/" not in s and "?" not in s
                                                             and "#" not in s))
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)


def _up() -> None:
    """The queue there and UP again: schemathesis may have sent ``POST
    /api/v1/queues/work/down``, after which RQ's routes answer 503 "Operationally Down", as
    RQ does, by design, or ``DELETE /api/v1/queues/work?force=true``."""
    from spoolq.errors import QueueNotFound

    try:
        _client.set_admin_state("work", "UP")
    except QueueNotFound:
        _client.create_queue("work", script="/bin/true")


@given(mesg=st.one_of(st.text(max_size=200), st.dictionaries(
    st.sampled_from(["dest", "param1", "due", "count", "max_count", "_method", "params", "post_run_webhook",
                     "src", "junk"]), _json_values, max_size=6).map(lambda d: __import__("json").dumps(d))),
       x_format=st.sampled_from(["json", "html", "", "xml"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_rq_new_message_never_5xx(mesg: str, x_format: str) -> None:
    _up()
    r = _http.post("/q/work/new_message", data={"mesg": mesg, "x_format": x_format}, follow_redirects=False)
    assert r.status_code < 500, r.text


@given(parts=st.lists(_segment, min_size=1, max_size=4),
       suffix=st.sampled_from(["", ".json", ".txt", "/state.json", "/log/stdio.log", "/attach/x"]))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_rq_and_html_paths_never_5xx(parts: list[str], suffix: str) -> None:
    from urllib.parse import quote

    _up()
    path = "/q/" + "/".join(quote(p, safe="") for p in parts) + suffix
    for headers in ({}, {"Accept": "text/html"}, {"Range": "bytes=5-2"}):
        r = _http.get(path, headers=headers, follow_redirects=False)
        assert r.status_code < 500, (path, r.status_code, r.text[:300])
    r = _http.post(path, data={"_method": "commit", "x_format": "json"}, follow_redirects=False)
    assert r.status_code < 500, (path, r.status_code, r.text[:300])


# -- headers and RQ's query parameters, which schemathesis does not reach --------------------
_header_text = st.one_of(st.text(max_size=40), st.sampled_from(["\xb2", "²", "1" * 5000, "-1", "0x10", " 7 ", ""]))


@given(limit=st.one_of(st.text(max_size=12), st.sampled_from(["²", "%C2%B2", "9" * 5000, "0", "10001"])))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_rq_query_parameters_never_5xx(limit: str) -> None:
    r = _http.get("/q/work/done.json", params={"limit": limit})
    assert r.status_code < 500, (limit, r.status_code, r.text[:200])


@given(value=_header_text)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_last_event_id_never_5xx(value: str) -> None:
    url = f"/api/v1/queues/work/messages/{_ids[0]}/log/stream"
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raw = value.encode()
    with _http.stream("GET", url, headers=[(b"last-event-id", raw)]) as r:
        assert r.status_code < 500, (value, r.status_code)


@given(first=st.one_of(st.just(""), st.from_regex(r"[0-9]{1,30}", fullmatch=True), st.just("9" * 4400)),
       last=st.one_of(st.just(""), st.from_regex(r"[0-9]{1,30}", fullmatch=True), st.just("9" * 4400)),
       junk=st.sampled_from(["", "²", "x"]))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_range_headers_never_5xx(first: str, last: str, junk: str) -> None:
    rng = f"bytes={first}{junk}-{last}"
    for url in ("/api/v1/queues/work/messages/" + _ids[0] + "/log", f"/q/work/{_ids[0]}/log/stdio.log"):
        r = _http.get(url, headers={"Range": rng.encode()})
        assert r.status_code < 500, (rng[:60], r.status_code, r.text[:200])
