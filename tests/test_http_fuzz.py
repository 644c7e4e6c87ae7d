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
from hypothesis import HealthCheck, settings

import spoolq
from spoolq.http.app import create_app

_root = tempfile.mkdtemp(prefix="spoolq-fuzz-")
atexit.register(shutil.rmtree, _root, True)
_client = spoolq.open(_root)
_client.create_queue("work", script="/bin/true")
_ids = [_client.send("work", param1=str(i)).msg_id for i in range(3)]
_client.prep("work", param1="prepped")

app = create_app(_client)


def _as_loopback(inner: Any) -> Any:
    """The app as a browser on this machine reaches it (schemathesis sends Host: testserver,
    which a server without a token refuses: test_http_api covers that refusal)."""
    async def shim(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [*((k, v) for k, v in scope["headers"] if k != b"host"),
                                          (b"host", b"127.0.0.1")]}
        await inner(scope, receive, send)
    return shim


_http = TestClient(app, base_url="http://127.0.0.1")
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


@given(mesg=st.one_of(st.text(max_size=200), st.dictionaries(
    st.sampled_from(["dest", "param1", "due", "count", "max_count", "_method", "params", "post_run_webhook",
                     "src", "junk"]), _json_values, max_size=6).map(lambda d: __import__("json").dumps(d))),
       x_format=st.sampled_from(["json", "html", "", "xml"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_rq_new_message_never_5xx(mesg: str, x_format: str) -> None:
    r = _http.post("/q/work/new_message", data={"mesg": mesg, "x_format": x_format}, follow_redirects=False)
    assert r.status_code < 500, r.text


@given(parts=st.lists(_segment, min_size=1, max_size=4),
       suffix=st.sampled_from(["", ".json", ".txt", "/state.json", "/log/stdio.log", "/attach/x"]))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_rq_and_html_paths_never_5xx(parts: list[str], suffix: str) -> None:
    from urllib.parse import quote

    path = "/q/" + "/".join(quote(p, safe="") for p in parts) + suffix
    for headers in ({}, {"Accept": "text/html"}, {"Range": "bytes=5-2"}):
        r = _http.get(path, headers=headers, follow_redirects=False)
        assert r.status_code < 500, (path, r.status_code, r.text[:300])
    r = _http.post(path, data={"_method": "commit", "x_format": "json"}, follow_redirects=False)
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
