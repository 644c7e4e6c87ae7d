"""Search and bulk actions over big states (hardening issue, item 15).

The filter's raw-bytes pre-test must never miss a match (a property test against the exact
definition, model.search_text); bulk actions run as background operations whose counters
are exact, that can be stopped, and that act on exactly what a count found.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import fs
from fastapi.testclient import TestClient
from http_helpers import AUTH, TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spoolq
from spoolq.http import operations
from spoolq.http.app import create_app
from spoolq.model import Message, State, search_text
from spoolq.store.fs.search import Needle

API = "/api/v1"

_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12)
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                       | _text, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                       max_leaves=6)


def test_a_needle_ending_inside_a_none_is_found() -> None:
    """Hypothesis found it: ``{"0": null}`` searches as ``0=none``, and ``0=no`` is a piece of
    that, while the raw JSON says ``null``."""
    raw = b'{"msg_id":"20261203.0000.00.000.1","params":{"0":null,"x":"y"}}'
    for needle in ("0=no", "0=n", "one", "=none", "ne"):
        assert Needle(needle).matches(raw, ""), needle
    assert not Needle("0=nz").matches(raw, "")


@given(fields=st.fixed_dictionaries({"param1": _text, "src": _text}, optional={"params": st.dictionaries(
    _text, _values, max_size=4)}), status=_text, data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_raw_pre_test_never_misses_a_match(fields: dict[str, Any], status: str, data: Any) -> None:
    m = Message.from_dict(fields)
    m.msg_id = "20261203.0000.00.000.1"
    raw = m.encode()
    exact = search_text(json.loads(raw), status)
    # Any piece of the exact search text must be found; so must anything the exact test finds.
    start = data.draw(st.integers(0, max(0, len(exact) - 1)))
    needle = exact[start:start + data.draw(st.integers(1, 12))] or "x"
    assert Needle(needle).matches(raw, status) == (needle.casefold() in exact), (needle, exact)
    other = data.draw(_text.filter(bool))
    assert Needle(other).matches(raw, status) == (other.casefold() in exact), (other, exact)


def test_old_ascii_escaped_messages_are_still_found(root: Path) -> None:
    client = spoolq.open(root)
    client.create_queue("q", script="/bin/true")
    mid = client.send("q", param1="Zürich").msg_id
    path = fs(client).message_dir("q", mid) / "msg"
    path.write_text(json.dumps(json.loads(path.read_bytes())))  # as spoolq wrote it before 2026-12-02
    assert "\\u00fc" in path.read_text()
    assert [v.msg_id for v in client.list("q", State.QUE, filter="zürich").items] == [mid]


@pytest.fixture
def big(root: Path) -> spoolq.Client:
    """3,000 queued messages in a paused queue, 1 in 100 for customer acme."""
    client = spoolq.open(root)
    client.create_queue("big", script="/bin/true")
    client.set_admin_state("big", "PAUSE")
    for b in range(3):
        client.send_many("big", [{"param1": f"u{b}-{i}", "params": {"cust": "acme" if i % 100 == 0 else "other"}}
                                 for i in range(1000)])
    return client


def wait_done(http: TestClient, op: dict[str, Any]) -> dict[str, Any]:
    r = http.get(op["url"], params={"wait": 60})
    assert r.json()["status"] != "running", r.text
    return r.json()


def test_searches_are_bounded_and_say_what_they_searched(big: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from spoolq.http import api

    monkeypatch.setattr(api, "SEARCH_SCAN", 1000)
    http = TestClient(create_app(big, TOKEN), base_url="http://127.0.0.1", headers=AUTH)
    r = http.get(f"{API}/queues/big/messages", params={"filter": "cust=acme", "scan": 1000})
    body = r.json()
    assert body["scanned"] == 1000 and len(body["items"]) == 10 and body["next_cursor"]
    page = http.get("/q/big", params={"state": "que", "filter": "nothing-matches"}).text
    assert "Searched 1000 que messages from the newest so far" in page and "Search further" in page
    assert "param1–param4" in page, "the page says which fields are searched"
    # Following the cursor finds every match exactly once.
    seen: list[str] = []
    cursor = None
    while True:
        body = http.get(f"{API}/queues/big/messages", params={"filter": "cust=acme", "scan": 1000, "limit": 1000,
                                                              **({"cursor": cursor} if cursor else {})}).json()
        seen += [m["msg_id"] for m in body["items"]]
        if not body["next_cursor"]:
            break
        cursor = body["next_cursor"]
    assert len(seen) == len(set(seen)) == 30


def test_bulk_delete_is_exact_and_stoppable(big: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operations, "SCAN_SLICE", 200)
    monkeypatch.setattr(operations, "BATCH", 100)
    http = TestClient(create_app(big, TOKEN), base_url="http://127.0.0.1", headers=AUTH)
    op = wait_done(http, http.post(f"{API}/queues/big/bulk", json={"action": "delete", "state": "que",
                                                                 "filter": "cust=acme"}).json())
    assert (op["status"], op["total"], op["scanned"], op["matched"], op["succeeded"], op["remaining"]) == \
        ("done", 3000, 3000, 30, 30, 2970)
    assert big.counts("big")["que"] == 2970 == big.recount("big")["que"]
    # A delete of everything, stopped part-way: the counters still say what happened.
    started = http.post(f"{API}/queues/big/bulk", json={"action": "delete", "state": "que"}).json()
    while http.get(started["url"]).json()["succeeded"] == 0:
        time.sleep(0.01)
    http.post(f"{started['url']}/cancel")
    op = wait_done(http, started)
    left = big.recount("big")["que"]
    assert op["status"] in ("cancelled", "done")
    assert op["succeeded"] + op["failures"] == 2970 - left and op["remaining"] == left
    if op["status"] == "cancelled":
        assert left > 0


def test_bulk_retry_over_err_and_operation_limits(big: spoolq.Client) -> None:
    http = TestClient(create_app(big, TOKEN), base_url="http://127.0.0.1", headers=AUTH)
    for mid in big.find_ids("big", "que", limit=50).ids:
        big.store.move("big", mid, State.QUE, State.RUN)
        big.store.move("big", mid, State.RUN, State.ERR)
    op = wait_done(http, http.post(f"{API}/queues/big/bulk", json={"action": "retry", "state": "err"}).json())
    assert (op["matched"], op["succeeded"], op["remaining"]) == (50, 50, 0)
    assert http.get(f"{API}/operations/{'0' * 16}").status_code == 404
    r = http.post(f"{API}/queues/big/bulk", json={"action": "delete", "state": "que", "ids_from": op["id"]})
    assert r.status_code == 400 and "not a finished count" in r.text


def test_an_operation_is_seen_ended_only_with_all_of_its_outcome(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Its status turns last: a poller that sees "done" sees "remaining" and "finished"
    too (CI once caught "done" with "remaining" still null, the final count not yet read)."""
    client = spoolq.open(tmp_path / "root")
    client.create_queue("q", script="/bin/true")
    client.set_admin_state("q", "PAUSE")
    for i in range(3):
        client.send("q", param1=f"x{i}")
    entered, gate = threading.Event(), threading.Event()
    real_counts = client.counts

    def counts(queue: str) -> dict[str, int]:
        if threading.current_thread().name.startswith("spoolq-op-") and not gate.is_set():
            entered.set()
            gate.wait(10)  # the operation's last step held open
        return real_counts(queue)

    monkeypatch.setattr(client, "counts", counts)
    ops = operations.Operations(client)
    op = ops.start("q", State.QUE, "x", "delete")
    assert entered.wait(10)
    try:
        assert ops.get(op.id).status == "running"  # the count after the work is not read yet
    finally:
        gate.set()
    ended = ops.wait(op.id, 10)
    assert (ended.status, ended.succeeded, ended.remaining) == ("done", 3, 0) and ended.finished is not None
