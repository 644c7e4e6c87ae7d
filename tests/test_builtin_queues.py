"""RQ's built-in queues (spoolq/builtin/): made at a root's first start, and what the
cleaner, the router and debug do, run by a real daemon."""

from __future__ import annotations

import json
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fs
from daemon_util import Served, serve_fixture, wait_for

import spoolq
from spoolq.builtin import MARKER, ROUTER_QUEUE, router_rules
from spoolq.errors import MessageNotFound
from spoolq.model import State


@pytest.fixture
def serve(root: Path) -> Iterator[Any]:
    yield from serve_fixture(root)


def test_first_start_makes_them_once(client: spoolq.Client, serve: Any, root: Path) -> None:
    s = serve()
    assert {"relay", "webhook", "cleaner", "debug"} <= set(client.queues())
    assert ROUTER_QUEUE not in client.queues(), "no router without rules"
    assert (root / MARKER).exists()
    s.stop()
    client.delete_queue("debug")
    serve()
    assert "debug" not in client.queues(), "a deleted built-in stays deleted"


def test_no_builtin_queues(client: spoolq.Client, serve: Any) -> None:
    serve("--no-builtin-queues")
    assert client.queues() == []


def test_debug_shows_the_variables_not_the_secrets(client: spoolq.Client, serve: Any) -> None:
    serve(env={"MY_SECRET_THING": "hunter2-hunter2"})
    r = client.send("debug", param1="p-one")
    v = client.wait(r, 30)
    assert (v.state, v.job_status) == (State.DONE, "script completed happily")
    text = client.open_log(r).read().decode()
    assert "RQ_PARAM1=p-one" in text and "SPOOLQ_QUEUE=debug" in text and "msg" in text
    assert "MY_SECRET_THING" in text and "hunter2" not in text


def test_cleaner_removes_old_finished_messages_only(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("q", script="/bin/true")
    client.set_admin_state("q", "pause")
    real = fs(client).clock
    fs(client).clock = lambda: real() - 5 * 86400  # five days ago
    ids: dict[str, str] = {}
    for name, dst in (("done", State.DONE), ("relayed", State.RELAYED), ("acked", State.ERR)):
        ids[name] = client.send("q", dest="q").msg_id
        client.store.move("q", ids[name], State.QUE, dst)
    client.ack_errs("q")
    ids["unacked"] = client.send("q", dest="q").msg_id
    client.store.move("q", ids["unacked"], State.QUE, State.ERR)
    ids["prep"] = client.prep("q", dest="q").msg_id
    ids["que"] = client.send("q", dest="q").msg_id
    fs(client).clock = real
    ids["young"] = client.send("q", dest="q").msg_id
    client.store.move("q", ids["young"], State.QUE, State.DONE)
    serve()
    bad = client.wait(client.send("cleaner", param1="nope"), 30)
    assert bad.state == State.ERR and "no such queue" in bad.job_status
    bad = client.wait(client.send("cleaner", param1="q", param2="three"), 30)
    assert bad.state == State.ERR and "whole number" in bad.job_status
    r = client.send("cleaner", param1="q", param2="3")
    v = client.wait(r, 60)
    assert (v.state, v.job_status) == (State.DONE, "removed 4 messages"), v.job_status

    def there(name: str) -> bool:
        try:
            client.get(f"q/{ids[name]}")
            return True
        except MessageNotFound:
            return False

    assert {n for n in ids if there(n)} == {"unacked", "que", "young"}
    assert "removed 1 done message(s) older than 3 day(s)" in client.open_log(r).read().decode()
    all_ = client.wait(client.send("cleaner", param1="ALLQUEUES", param2="0"), 60)
    assert all_.state == State.DONE  # every queue, itself included: the young one goes too
    assert not there("young") and there("que") and there("unacked")


def _rules(root: Path, text: str) -> None:
    router_rules(root).parent.mkdir(parents=True, exist_ok=True)
    router_rules(root).write_text(text)


def test_router_routes_by_rqs_rules(client: spoolq.Client, serve: Any, root: Path) -> None:
    _rules(root, """
rule "to done"
src /^finished$/
action :done

rule "spread"
src /^spread$/
action :relay
route ["a1.example", "a2.example"], ["b1.example:4444"]
log true

rule "one of"
src /^balance$/
action :balance
route "c1.example", "c2.example"

rule "default"
action :err
""")
    serve()
    assert ROUTER_QUEUE in client.queues()
    client.set_admin_state("relay", "pause")  # keep the copies where they can be read
    done = client.wait(client.send(ROUTER_QUEUE, src="finished", dest="x"), 30)
    assert (done.state, done.job_status) == (State.DONE, "router processed a done")
    err = client.wait(client.send(ROUTER_QUEUE, src="other", dest="x"), 30)
    assert (err.state, err.job_status) == (State.ERR, "router processed an err")
    spread = client.wait(client.send(ROUTER_QUEUE, src="spread", dest="inbox"), 30)
    assert (spread.state, spread.job_status) == (State.DONE, "done relay of 2 messages"), spread.job_status
    bal = client.wait(client.send(ROUTER_QUEUE, src="balance", dest="http://old:3333/q/inbox"), 30)
    assert bal.state == State.DONE and bal.job_status.startswith("DUP to http")
    dests = sorted(v.message.dest for v in client.list("relay", State.QUE).items)
    assert len(dests) == 3
    assert dests[0] in ("http://a1.example:3333/q/inbox", "http://a2.example:3333/q/inbox")  # one of each list
    assert dests[1] == "http://b1.example:4444/q/inbox"
    assert dests[2] in ("http://c1.example:3333/q/inbox", "http://c2.example:3333/q/inbox")  # one of all
    assert "spread - relay" in (root / "log" / "rq_router.log").read_text()
    client.send(ROUTER_QUEUE, src="finished\nforged - line", dest="x")
    wait_for(lambda: "forged" in (root / "log" / "rq_router.log").read_text(), 30, "the router's log line")
    assert not any(ln.startswith("forged") for ln in (root / "log" / "rq_router.log").read_text().splitlines())


def test_router_copies_are_made_once_across_tries(client: spoolq.Client, serve: Any, root: Path) -> None:
    """A try that runs again (a crash after the first copy) makes only the missing copies."""
    _rules(root, 'rule "spread"\nsrc /./\naction :relay\nroute ["a1.example", "a2.example"], ["h2.example"]\n\n'
                 'rule "default"\naction :err\n')
    serve()
    client.set_admin_state("relay", "pause")
    client.set_admin_state(ROUTER_QUEUE, "pause")
    r = client.send(ROUTER_QUEUE, src="s", dest="inbox")
    # What a killed first try leaves: the first list's copy (to a2) made and recorded in
    # job/router_dups; the retry, picking at random again, must not copy to a1 as well.
    first = client.send("relay", dest="http://a2.example:3333/q/inbox")
    mdir = root / "queue" / ROUTER_QUEUE
    (path,) = list(mdir.glob(f"que/*/*/*/{r.msg_id}"))
    (path / "job").mkdir(exist_ok=True)
    (path / "job" / "router_dups").write_text(json.dumps({"#0": first.full_id}))
    client.set_admin_state(ROUTER_QUEUE, "up")
    v = client.wait(r, 30)
    assert v.state == State.DONE, v.job_status
    dests = sorted(m.message.dest for m in client.list("relay", State.QUE).items)
    assert dests == ["http://a2.example:3333/q/inbox", "http://h2.example:3333/q/inbox"]
    assert "made by an earlier try" in client.open_log(r).read().decode()


def test_a_bad_rules_file_stops_the_router(client: spoolq.Client, serve: Any, root: Path) -> None:
    _rules(root, 'rule "x"\naction :bogus\n')
    serve()
    v = client.wait(client.send(ROUTER_QUEUE, src="s", dest="d"), 30)
    assert v.state == State.ERR and "Bad rule file" in v.job_status
    wait_for(lambda: str(client.admin_state(ROUTER_QUEUE)) == "DOWN", 10, "rq_router DOWN (RQ's flag file)")


def test_rq_new_message_goes_to_the_router(client: spoolq.Client, root: Path, tmp_path: Path) -> None:
    """RQ's get_queueclient: with rules, a message POSTed to any queue but relay and cleaner
    lands in rq_router."""
    client.create_queue("inbox", script="/bin/true")
    _rules(root, 'rule "default"\naction :done\n')
    s = Served(root, "--trust-loopback", http=True).start()
    try:
        body = urllib.parse.urlencode({"x_format": "json", "mesg": json.dumps({"dest": "inbox", "src": "t"})})
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/q/inbox/new_message", body.encode()) as res:
            ok, full = json.loads(res.read())
        assert ok == "ok" and f"/q/{ROUTER_QUEUE}/" in full
        v = client.wait(f"{ROUTER_QUEUE}/{full.rsplit('/', 1)[1]}", 30)
        assert (v.state, v.message.dest) == (State.DONE, "inbox")
        assert client.counts("inbox")["que"] + client.counts("inbox")["done"] == 0
    finally:
        s.stop()


def test_the_webhook_follows_no_redirect_and_keeps_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A redirect would turn the POST into a GET to wherever it points (another host, the
    daemon's own API) and end the webhook done: it is a failure, tried again. An endpoint
    that trickles its answer a byte at a time never trips the per-read timeout; the
    deadline for the whole post ends it (the webhook queue has no timeout of its own)."""
    import http.server
    import socket
    import threading

    from spoolq.builtin import webhook

    hits: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            hits.append(("POST", self.path))
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            hits.append(("GET", self.path))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    trickler, trickler2 = socket.socket(), socket.socket()
    for t in (trickler, trickler2):
        t.bind(("127.0.0.1", 0))
        t.listen(1)
    stop = threading.Event()

    def trickle(server: socket.socket) -> None:
        conn, _ = server.accept()
        with conn:
            while not stop.wait(0.1):
                try:
                    conn.sendall(b"H")
                except OSError:  # the webhook gave up and closed: the point
                    return

    threading.Thread(target=trickle, args=(trickler,), daemon=True).start()
    alarm = signal.getsignal(signal.SIGALRM)  # main() sets its own (pytest-timeout's is given back below)
    lines: list[str] = []
    monkeypatch.setattr(webhook, "status", lines.append)
    monkeypatch.setattr(webhook, "TIMEOUT", 1.0)
    monkeypatch.setattr(webhook, "DEADLINE", 2.0)
    try:
        monkeypatch.setenv("RQ_PARAM1", f"http://127.0.0.1:{httpd.server_address[1]}/hook")
        assert webhook.main() == 0
        assert hits == [("POST", "/hook")] and lines[-1].startswith("resend 0-HTTP 302")
        monkeypatch.setenv("RQ_PARAM1", f"http://127.0.0.1:{trickler.getsockname()[1]}/hook")
        t0 = time.monotonic()
        assert webhook.main() == 0
        assert time.monotonic() - t0 < 10 and lines[-1].startswith("resend 0-"), lines[-1]
        # A name with two addresses, the first never answering the connect: the deadline's
        # TimeoutError there is taken for that address's failure and the next is tried; it
        # trickles, and the deadline must still end the post (review of the fix above).
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued: list[socket.socket] = []
        while True:  # fill its accept queue: the next connect then hangs
            c = socket.socket()
            c.settimeout(0.5)
            queued.append(c)
            try:
                c.connect(full.getsockname())
            except TimeoutError:
                break
        addrs = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a)
                 for a in (full.getsockname(), trickler2.getsockname())]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: addrs)
        monkeypatch.setattr(webhook, "TIMEOUT", 3.0)
        monkeypatch.setenv("RQ_PARAM1", "http://two-addresses.invalid/hook")
        threading.Thread(target=trickle, args=(trickler2,), daemon=True).start()
        t0 = time.monotonic()
        assert webhook.main() == 0
        assert time.monotonic() - t0 < 12 and lines[-1].startswith("resend 0-"), lines[-1]
        for q in queued:
            q.close()
        full.close()
    finally:
        stop.set()
        trickler.close()
        trickler2.close()
        httpd.shutdown()
        signal.signal(signal.SIGALRM, alarm)


def test_the_cleaner_keeping_more_days_than_since_1970_removes_nothing(client: spoolq.Client) -> None:
    """param2 over ~20,800 days put the cutoff before 1970, whose id prefix is no id: the
    cleaner ended with a traceback and its message in err (audit)."""
    from spoolq.builtin import cleaner

    client.create_queue("q", script="/bin/true")
    client.send("q")
    assert cleaner.clean(client, "q", time.time() - 99999 * 86400) == {}
    assert client.counts("q")["que"] == 1
