"""strings-queue's SQL intake on the PostgreSQL store (spec C; docs/http-jobs.md): a row
INSERTed into ``spoolq.http_jobs`` is an HTTP job, and the row shows its outcome with
strings-queue's columns. Real PostgreSQL (a throwaway cluster), real daemons, a real HTTP
server on loopback. Check C.4 #9 (two processors never call one job at once) runs two
daemons on one database."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from daemon_util import pg_hosts, wait_for
from http_jobs_util import Scripted, scripted_server

import spoolq
from spoolq.model import State


@pytest.fixture
def srv() -> Iterator[Scripted]:
    yield from scripted_server()


@pytest.fixture
def hosts(pg_url: str, tmp_path: Path) -> Iterator[Any]:
    yield from pg_hosts(pg_url, tmp_path, "--no-builtin-queues", "--grace", "1")


@pytest.fixture
def client(pg_url: str) -> spoolq.Client:
    c = spoolq.open(pg_url)
    c.create_queue("http", kind="http", num_workers=4)
    return c


@pytest.fixture
def db(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


def insert(db: psycopg.Connection[Any], sql: str, *args: Any) -> int:
    row = db.execute(sql + " RETURNING id", args).fetchone()
    assert row is not None
    return int(row[0])


def job(db: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    cur = db.execute("SELECT * FROM spoolq.http_jobs WHERE id = %s", (job_id,))
    names = [d.name for d in cur.description or ()]
    row = cur.fetchone()
    assert row is not None
    return dict(zip(names, row, strict=True))


def finished(db: psycopg.Connection[Any], job_id: int, timeout: float = 20) -> dict[str, Any]:
    return wait_for(lambda: (j := job(db, job_id))["last_finished_at"] is not None and j, timeout, f"job {job_id}")


def log_rows(db: psycopg.Connection[Any], job_id: int) -> list[str]:
    return [r[0] for r in db.execute("SELECT msg FROM spoolq.http_job_log WHERE job_id = %s ORDER BY line",
                                     (job_id,))]


def test_c4_1_an_insert_with_method_and_url_gets_the_defaults(client: spoolq.Client,
                                                              db: psycopg.Connection[Any], srv: Scripted) -> None:
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/code/200"))
    j = job(db, jid)
    assert (j["timeout_secs"], j["remaining_retries"], j["retry_delay_secs"], j["result_code"]) == (60, 10, 60, None)
    # the row and its message were made in one statement: the message waits in the queue
    v = client.get(f"http/{j['msg_id']}")
    assert v.state == State.QUE and v.message.src == "sql"
    p = v.message.params
    assert (p["method"], p["url"], p["timeout_secs"], p["remaining_retries"], p["http_job_id"]) == (
        "GET", srv.url("/code/200"), 60, 10, str(jid))


def test_c4_2_to_8_the_row_shows_each_outcome(client: spoolq.Client, db: psycopg.Connection[Any], srv: Scripted,
                                              hosts: Any, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    client.update_queue("http", http_ok=[200], http_auth={"user": "api", "password_file": str(pw)},
                        http_allow=[srv.url("/")])
    srv.headers_for["/hdr/503"] = {"x-bitlancer-retry-delay-secs": "786"}
    srv.headers_for["/hdr/502"] = {"x-bitlancer-url": srv.url("/code/200")}
    ins = ("INSERT INTO spoolq.http_jobs (http_method, url, body, timeout_secs, remaining_retries) "
           "VALUES (%s, %s, %s, %s, %s)")
    ok = insert(db, ins, "post", srv.url("/code/200"), "the body", 60, 10)
    temp = insert(db, ins, "GET", srv.url("/hdr/503"), None, 60, 10)
    slow = insert(db, ins, "GET", srv.url("/slow/3"), None, 1, 1)
    perm = {c: insert(db, ins, "GET", srv.url(f"/code/{c}"), None, 60, 10) for c in (500, 404, 201)}
    moved = insert(db, ins, "GET", srv.url("/hdr/502"), None, 60, 10)
    hosts(1)
    t0 = time.time()
    # 2: 200 -> result 0, retries unchanged, the body in last_response and the log
    j = finished(db, ok)
    assert (j["result_code"], j["remaining_retries"], j["last_response"]) == (0, 10, "POST 200")
    assert log_rows(db, ok)[-1] == f"[JOBID {ok}] Job succeeded: POST 200"
    first = f"[JOBID {ok}] Calling job with method POST on url {srv.url('/code/200')} (timeout 60)"
    assert log_rows(db, ok)[0] == first
    # 8: the body, basic auth from the queue, the job id header
    calls = srv.of("/code/200")
    assert len(calls) == 1 and calls[0].body == b"the body" and calls[0].headers["x-bitlancer-job-id"] == str(ok)
    assert calls[0].headers["authorization"] == "Basic " + base64.b64encode(b"api:s3cret").decode()
    # 3 and 7: 503 -> result 2, one retry used, the header's delay kept, not run again before it
    j = finished(db, temp)
    assert (j["result_code"], j["remaining_retries"], j["retry_delay_secs"]) == (2, 9, 786)
    assert log_rows(db, temp)[-1] == f"[JOBID {temp}] Job failed temporarily: GET 503"
    msg = client.get(f"http/{j['msg_id']}")
    assert msg.state == State.QUE and msg.message.due > t0 + 780
    # 4: a timeout is temporary; its last retry used, it is never selected again (6)
    j = finished(db, slow)
    assert (j["result_code"], j["remaining_retries"]) == (2, 0)
    assert log_rows(db, slow)[-1] == f"[JOBID {slow}] Job failed due to timeout"
    assert client.get(f"http/{j['msg_id']}").state == State.ERR
    # 5: 500, 404 and (strings-queue's rule, http_ok [200]) 201 are permanent
    for code, jid in perm.items():
        j = finished(db, jid)
        assert (j["result_code"], j["remaining_retries"]) == (1, 9), code
        assert client.get(f"http/{j['msg_id']}").state == State.ERR
    # 7: x-bitlancer-url rewrites the row's url (a 502 is permanent: it is not called again)
    j = finished(db, moved)
    assert j["url"] == srv.url("/code/200") and j["result_code"] == 1
    time.sleep(0.3)
    assert len(srv.of("/hdr/503")) == 1 and all(len(srv.of(f"/code/{c}")) == 1 for c in perm)
    assert len(srv.of("/hdr/502")) == 1 and len(srv.of("/code/200")) == 1


def test_bad_inserts_are_refused_and_make_nothing(client: spoolq.Client, db: psycopg.Connection[Any]) -> None:
    client.create_queue("scripts", script="/bin/true")
    for sql, why in [
        ("INSERT INTO spoolq.http_jobs (http_method, url, queue) VALUES ('GET', 'http://x/', 'nope')", "no queue nope"),
        ("INSERT INTO spoolq.http_jobs (http_method, url, queue) VALUES ('GET', 'http://x/', 'scripts')",
         "not of kind http"),
        ("INSERT INTO spoolq.http_jobs (http_method, url, remaining_retries) VALUES ('GET', 'http://x/', -1)",
         "remaining_retries"),
        ("INSERT INTO spoolq.http_jobs (http_method, url, headers) VALUES ('GET', 'http://x/', '[1]')", "headers"),
    ]:
        with pytest.raises(psycopg.Error, match=why):
            db.execute(sql)
    client.set_admin_state("http", "DOWN")
    with pytest.raises(psycopg.Error, match="DOWN"):
        db.execute("INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', 'http://x/')")
    assert db.execute("SELECT count(*) FROM spoolq.http_jobs").fetchone() == (0,)
    assert client.counts("http").get("que", 0) == 0 and client.counts("scripts").get("que", 0) == 0


def test_a_rolled_back_insert_leaves_no_message(client: spoolq.Client, pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', 'http://x/')")
        conn.rollback()
    assert client.counts("http").get("que", 0) == 0


def test_a_job_that_is_not_valid_fails_permanently_in_its_row(client: spoolq.Client, db: psycopg.Connection[Any],
                                                               hosts: Any) -> None:
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', 'file:///etc/passwd')")
    hosts(1)
    j = finished(db, jid)
    assert j["result_code"] == 1 and j["last_response"].startswith("not an HTTP job: url")


def test_retry_gives_a_job_its_retries_back(client: spoolq.Client, db: psycopg.Connection[Any], srv: Scripted,
                                            hosts: Any) -> None:
    srv.seqs["r"] = [503, 200]
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url, remaining_retries) VALUES ('GET', %s, 1)",
                 srv.url("/seq/r"))
    hosts(1)
    j = finished(db, jid)
    assert (j["result_code"], j["remaining_retries"]) == (2, 0)
    msg_id = j["msg_id"]
    wait_for(lambda: client.get(f"http/{msg_id}").state == State.ERR, what="err")
    client.retry(f"http/{msg_id}")
    j = wait_for(lambda: (r := job(db, jid))["result_code"] == 0 and r, what="done after the retry")
    assert j["remaining_retries"] == 1


def test_c4_9_two_daemons_never_call_one_job_at_once(client: spoolq.Client, db: psycopg.Connection[Any],
                                                     srv: Scripted, hosts: Any) -> None:
    srv.seqs["c"] = [503, 503, 200]  # some jobs run more than once: retries too must not overlap
    n = 40
    # both daemons are up before the first job exists: started one after the other over
    # jobs already queued, the first could finish them all while the second still starts
    daemons = hosts(2)
    ids = [insert(db, "INSERT INTO spoolq.http_jobs (http_method, url, retry_delay_secs) VALUES ('GET', %s, 0)",
                  srv.url("/slow/0.05") if i % 4 else srv.url("/seq/c")) for i in range(n)]
    wait_for(lambda: db.execute("SELECT count(*) FROM spoolq.http_jobs WHERE result_code = 0").fetchone() == (n,),
             timeout=60, what="every job done")
    assert set(srv.most_at_once) == {str(i) for i in ids}
    assert max(srv.most_at_once.values()) == 1  # never two calls of one job at once
    assert len(srv.calls) == n + 2  # each job once, and the two 503s once more
    calls = [d.log().count(": GET http://") for d in daemons]  # "-v": each request started is logged
    assert sum(calls) == n + 2 and min(calls) > 0, calls  # both took part


def test_c4_10_one_at_a_time_still_finishes_every_job(client: spoolq.Client, db: psycopg.Connection[Any],
                                                      srv: Scripted, hosts: Any) -> None:
    client.update_queue("http", num_workers=1)
    ids = [insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/slow/0.05"))
           for _ in range(5)]
    hosts(1)
    for i in ids:
        assert finished(db, i)["result_code"] == 0
    assert srv.peak == 1


def test_jobs_inserted_while_the_daemon_runs(client: spoolq.Client, db: psycopg.Connection[Any], srv: Scripted,
                                             hosts: Any) -> None:
    hosts(1)
    time.sleep(0.5)
    ids = [insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/code/200"))
           for _ in range(3)]
    assert [finished(db, i)["result_code"] for i in ids] == [0, 0, 0]


def test_on_conflict_do_nothing_makes_no_second_message(client: spoolq.Client, db: psycopg.Connection[Any]) -> None:
    sql = "INSERT INTO spoolq.http_jobs (id, http_method, url) VALUES (1000, 'GET', 'http://x/') ON CONFLICT DO NOTHING"
    db.execute(sql)
    db.execute(sql)
    assert db.execute("SELECT count(*) FROM spoolq.http_jobs").fetchone() == (1,)
    assert client.counts("http")["que"] == 1


def test_what_no_daemon_could_run_is_refused_at_the_insert(client: spoolq.Client,
                                                           db: psycopg.Connection[Any]) -> None:
    for cols, vals in [("timeout_secs", 7200), ("retry_delay_secs", 10**9), ("remaining_retries", 2147483647),
                       ("http_method", "TRACE"), ("body", "x" * 1_100_000)]:
        with pytest.raises(psycopg.Error):
            db.execute(f"INSERT INTO spoolq.http_jobs (url, http_method, {cols}) VALUES ('http://x/', 'GET', %s)"
                       if cols != "http_method" else
                       "INSERT INTO spoolq.http_jobs (url, http_method) VALUES ('http://x/', %s)", (vals,))
    assert db.execute("SELECT count(*) FROM spoolq.http_jobs").fetchone() == (0,)
    assert client.counts("http").get("que", 0) == 0


@pytest.mark.parametrize("body", [b"a\x00b", b"ok\nthen \x00 later"])
def test_a_nul_in_an_answer_still_finishes_the_row(client: spoolq.Client, db: psycopg.Connection[Any],
                                                   srv: Scripted, hosts: Any, body: bytes) -> None:
    srv.bodies["nul"] = body
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/body/nul"))
    hosts(1)
    j = finished(db, jid)
    assert j["result_code"] == 0 and j["last_response"] == body.decode().replace("\x00", "\ufffd")
    assert log_rows(db, jid)[-1] == f"[JOBID {jid}] Job succeeded: " + body.decode().replace("\x00", "\ufffd")


def test_the_row_trigger_never_blocks_another_message(client: spoolq.Client, db: psycopg.Connection[Any]) -> None:
    client.create_queue("other", script="/bin/true")
    r = client.send("other", params={"http_job_id": "1", "x": "aXb"})
    # Not json-castable as stored: a send refuses a NUL in params now, so the row is made as
    # an older version stored such a message.
    db.execute("UPDATE spoolq.messages SET msg = replace(msg, 'aXb', 'a\\u0000b') WHERE msg_id = %s", (r.msg_id,))
    row = db.execute("SELECT msg FROM spoolq.messages WHERE msg_id = %s", (r.msg_id,)).fetchone()
    assert row is not None and "a\\u0000b" in row[0]
    client.set_admin_state("other", "PAUSE")
    client.run_now(r)  # rewrites the message: the trigger looks at it and lets it be
    assert client.get(r).message.due == 0.0


def test_a_cancelled_job_is_a_permanent_failure_in_its_row(client: spoolq.Client, db: psycopg.Connection[Any],
                                                           srv: Scripted, hosts: Any) -> None:
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/hold"))
    hosts(1)
    wait_for(lambda: srv.in_progress == 1, what="the request at the server")
    client.cancel(f"http/{job(db, jid)['msg_id']}")
    j = finished(db, jid)
    assert (j["result_code"], j["last_response"]) == (1, "cancelled")


def test_a_body_of_two_lines_is_one_log_row(client: spoolq.Client, db: psycopg.Connection[Any], srv: Scripted,
                                            hosts: Any) -> None:
    srv.bodies["two"] = b"first line\nsecond line"
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/body/two"))
    hosts(1)
    finished(db, jid)
    rows = db.execute("SELECT line, logged_at IS NOT NULL, msg FROM spoolq.http_job_log WHERE job_id = %s "
                      "ORDER BY line", (jid,)).fetchall()
    assert [r[:2] for r in rows] == [(1, True), (2, True)]
    assert rows[-1][2] == f"[JOBID {jid}] Job succeeded: first line\nsecond line"


def test_a_producer_needs_only_insert_on_http_jobs(client: spoolq.Client, db: psycopg.Connection[Any],
                                                   pg_url: str) -> None:
    db.execute("DO $$ BEGIN CREATE ROLE sq_producer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    db.execute("GRANT USAGE ON SCHEMA spoolq TO sq_producer")
    db.execute("GRANT INSERT ON spoolq.http_jobs TO sq_producer")
    db.execute("GRANT USAGE ON SEQUENCE spoolq.http_jobs_id_seq TO sq_producer")
    as_producer = pg_url.replace("postgres@", "sq_producer@", 1)
    with psycopg.connect(as_producer, autocommit=True) as conn:
        conn.execute("INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', 'http://x/')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # and nothing else of spoolq's
            conn.execute("UPDATE spoolq.queues SET config = '{}'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM spoolq.messages")
    assert client.counts("http")["que"] == 1


def test_a_row_locked_by_a_user_holds_the_finish_not_the_daemon(client: spoolq.Client, pg_url: str,
                                                                db: psycopg.Connection[Any], srv: Scripted,
                                                                hosts: Any) -> None:
    locked = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/code/200"))
    with psycopg.connect(pg_url) as user:
        user.execute("SELECT 1 FROM spoolq.http_jobs WHERE id = %s FOR UPDATE", (locked,))
        hosts(1)
        other = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)",
                       srv.url("/code/201"))
        assert finished(db, other)["result_code"] == 0  # the daemon goes on meanwhile
        assert client.get(f"http/{job(db, locked)['msg_id']}").state == State.RUN  # its finish is held
        user.rollback()
    assert finished(db, locked)["result_code"] == 0  # and lands once the lock is gone
    assert client.get(f"http/{job(db, locked)['msg_id']}").state == State.DONE


def test_a_row_keeps_its_id_queue_and_message(client: spoolq.Client, db: psycopg.Connection[Any]) -> None:
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', 'http://x/')")
    with pytest.raises(psycopg.Error, match="keeps its id"):
        db.execute("UPDATE spoolq.http_jobs SET msg_id = 'x' WHERE id = %s", (jid,))
    db.execute("UPDATE spoolq.http_jobs SET organization_id = 7 WHERE id = %s", (jid,))  # the rest is the user's


def test_an_answer_cannot_forge_a_log_entry(client: spoolq.Client, db: psycopg.Connection[Any], srv: Scripted,
                                            hosts: Any) -> None:
    srv.bodies["forge"] = b"ok\n2026-01-01 00:00:00,000  [JOBID 9] Job succeeded: forged"
    jid = insert(db, "INSERT INTO spoolq.http_jobs (http_method, url) VALUES ('GET', %s)", srv.url("/body/forge"))
    hosts(1)
    finished(db, jid)
    rows = db.execute("SELECT logged_at, msg FROM spoolq.http_job_log WHERE job_id = %s ORDER BY line",
                      (jid,)).fetchall()
    assert len(rows) == 2 and not rows[-1][0].startswith("2026-01-01")
    assert rows[-1][1] == f"[JOBID {jid}] Job succeeded: ok\n2026-01-01 00:00:00,000  [JOBID 9] Job succeeded: forged"
