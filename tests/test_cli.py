"""The ``spoolq`` command line, driven through the real installed console script.

The daemon is not involved: where a test needs a message in run, done or err it moves it
with the Python API (``client.store.move``), exactly as the daemon would.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SPOOLQ, Cli, fs

import spoolq
from spoolq import State
from spoolq.cli import exitcodes

FULL_ID = re.compile(r"^http://127\.0\.0\.1:3333/q/([A-Za-z0-9_-]+)/(\d{8}\.\d{4}\.\d{2}\.\d{3}\.\d+)$")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    s = tmp_path / "job.sh"
    s.write_text("#!/bin/sh\necho ran\n")
    s.chmod(0o755)
    return s


@pytest.fixture
def q(cli: Cli, script: Path) -> str:
    """A queue named ``q`` with an executable script."""
    r = cli("queue", "create", "q", "--script", str(script))
    assert r.returncode == 0, r.stderr
    return "q"


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def send(cli: Cli, queue: str, *args: str) -> str:
    r = cli("send", queue, *args)
    assert r.returncode == 0, r.stderr
    full_id = r.stdout.strip()
    assert FULL_ID.match(full_id), full_id
    return full_id


def short(full_id: str) -> str:
    m = FULL_ID.match(full_id)
    assert m
    return m.group(2)


def to_state(client: spoolq.Client, queue: str, msg_id: str, *path: State, status: str = "") -> None:
    """Walk a message along ``path`` (que -> run -> done...) as the daemon would."""
    states = [State.QUE, *path]
    for src, dst in zip(states, states[1:], strict=False):
        client.store.move(queue, msg_id, src, dst)
    if status:
        client.store.set_status(queue, msg_id, status)


# -- queues ---------------------------------------------------------------------------------
def test_queue_lifecycle(cli: Cli, script: Path, root: Path) -> None:
    r = cli("queue", "create", "mail", "--script", str(script), "--workers", "3", "--env", "A=1=2",
            "--timeout", "2.5", "--max-count", "7", "--coalesce", "1", "--blocking", "2", "--no-fsync")
    assert r.returncode == 0, r.stderr
    assert "created queue mail" in r.stdout
    shown = cli.json("queue", "show", "mail")
    assert shown["admin_state"] == "UP"
    cfg = shown["config"]
    assert cfg["script"] == str(script)
    assert (cfg["num_workers"], cfg["env_vars"], cfg["timeout"], cfg["max_count"]) == (3, {"A": "1=2"}, 2.5, 7)
    assert (cfg["coalesce_params"], cfg["blocking_params"], cfg["fsync"]) == ([1], [2], False)
    assert shown["counts"]["que"] == 0

    assert cli("queue", "create", "mail", "--script", str(script)).returncode == exitcodes.CONFLICT
    listed = cli.json("queue", "list")
    assert [x["name"] for x in listed["queues"]] == ["mail"]
    human = cli("queue", "list").stdout.splitlines()
    assert human[0].split() == ["QUEUE", "STATE", "WORKERS", "SCRIPT"]
    assert human[1].split() == ["mail", "UP", "3", str(script)]

    for action, want in (("pause", "PAUSE"), ("resume", "UP"), ("down", "DOWN"), ("up", "UP")):
        assert cli.json("queue", action, "mail")["admin_state"] == want
        assert cli.json("queue", "show", "mail")["admin_state"] == want

    changed = cli.json("queue", "set", "mail", "num_workers=5", "timeout=null", 'env_vars={"B": "x"}',
                       "exec_prefix=nice -n 5")
    assert changed["changed"] == ["env_vars", "exec_prefix", "num_workers", "timeout"]
    cfg = cli.json("queue", "show", "mail")["config"]
    assert (cfg["num_workers"], cfg["timeout"], cfg["env_vars"], cfg["exec_prefix"]) == (
        5, None, {"B": "x"}, "nice -n 5")

    send(cli, "mail", "--param1", "x")
    r = cli("queue", "delete", "mail")
    assert r.returncode == exitcodes.CONFLICT and "--force" in r.stderr
    assert cli("queue", "delete", "mail", "--force").returncode == 0
    assert cli.json("queue", "list") == {"queues": []}
    assert cli("queue", "show", "mail").returncode == exitcodes.NOT_FOUND
    assert cli("queue", "delete", "mail").returncode == exitcodes.NOT_FOUND
    assert list((root / "deleted").iterdir()), "a deleted queue is kept under ROOT/deleted"


@pytest.mark.parametrize("timeout", ["nan", "-1", "inf"])
def test_wait_refuses_a_timeout_that_is_no_time(cli: Cli, q: str, timeout: str) -> None:
    """``--timeout nan`` waited for ever: NaN is never <= 0 (audit). A bad value is exit 2,
    at once."""
    full = cli("send", q).stdout.strip()
    r = cli("wait", full, "--timeout", timeout, timeout=20)
    assert r.returncode == exitcodes.USAGE and "timeout must be" in r.stderr, r.stderr


def test_a_page_holds_at_least_one(cli: Cli, q: str, root: Path) -> None:
    """The Python API took limit 0 or -1 and answered one item and a cursor (audit)."""
    import spoolq
    from spoolq.errors import InvalidInput

    client = spoolq.open(root)
    client.send(q)
    for bad in (0, -1):
        with pytest.raises(InvalidInput, match="limit"):
            client.list(q, "que", limit=bad)
        with pytest.raises(InvalidInput, match="limit"):
            client.find_ids(q, "que", limit=bad)
    assert len(client.list(q, "que", limit=1).items) == 1


MEASURED = """
import resource, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
chunk = b"x" * (1 << 20)
try:
    for _ in range(200):  # one line of 200 MiB
        p.stdin.write(chunk)
    p.stdin.write(b"\\n")
    p.stdin.close()
except BrokenPipeError:
    pass  # refused before the end: the point
err = p.stderr.read().decode()
print(p.wait(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, err.strip()[:200])
"""


def test_send_from_file_reads_a_huge_line_only_so_far(q: str, root: Path) -> None:
    """A 400 MB line took 822 MB of memory before it was refused (audit): the line is read
    at most a param's size at a time, refused (exit 2) and the memory stays small."""
    r = subprocess.run([sys.executable, "-c", MEASURED, SPOOLQ, "--root", str(root), "send", q,
                        "--from-file", "-"], capture_output=True, text=True, timeout=120)
    code, peak_mb, why = r.stdout.split(" ", 2)
    assert int(code) == exitcodes.USAGE and "line 1 is over" in why, r.stdout
    assert int(peak_mb) < 120, f"peak {peak_mb} MiB for a 200 MiB line"


def test_queue_show_human(cli: Cli, q: str) -> None:
    out = cli("queue", "show", q).stdout
    assert re.search(r"^admin state: UP$", out, re.M)
    assert re.search(r"^workers:\s+1$", out, re.M)
    assert re.search(r"^\s*PREP\s+QUE\s+RUN\s+DONE\s+RELAYED\s+ERR\s+ACKED$", out, re.M)


@pytest.mark.parametrize("args", [
    ["--workers", "abc"], ["--workers", "0"], ["--workers", "129"], ["--env", "NOEQUALS"],
    ["--env", "RQ_HOST=x"], ["--coalesce", "5"], ["--timeout", "-1"], ["--timeout", "nan"],
    ["--max-count", "0"],
])
def test_queue_create_rejects_bad_options(cli: Cli, script: Path, root: Path, args: list[str]) -> None:
    before = tree(root)
    r = cli("queue", "create", "bad", "--script", str(script), *args)
    assert r.returncode == exitcodes.USAGE, (args, r.stderr)
    assert r.stderr.startswith("spoolq: ")
    assert tree(root) == before


def test_queue_create_warns_about_missing_script(cli: Cli, tmp_path: Path) -> None:
    r = cli("queue", "create", "later", "--script", str(tmp_path / "not-yet"))
    assert r.returncode == 0
    assert "does not exist" in r.stderr


def test_queue_set_rejects_bad_changes(cli: Cli, q: str) -> None:
    before = cli.json("queue", "show", q)["config"]
    for change in ("colour=blue", "name=other", "num_workers=lots", "noequals", "max_count=0"):
        r = cli("queue", "set", q, "num_workers=2", change)
        assert r.returncode == exitcodes.USAGE, change
        assert r.stderr.startswith("spoolq: ")
    assert cli.json("queue", "show", q)["config"] == before, "a rejected set changes nothing"
    assert cli("queue", "set", "nosuch", "num_workers=2").returncode == exitcodes.NOT_FOUND


def test_resume_does_not_lift_down(cli: Cli, q: str) -> None:
    """RQ 6.1: resume undoes pause and up undoes down; neither undoes the other."""
    cli("queue", "down", q)
    r = cli("queue", "resume", q)
    assert r.returncode == 0 and "DOWN" in r.stdout and "queue up" in r.stdout
    assert cli.json("queue", "show", q)["admin_state"] == "DOWN"
    cli("queue", "up", q)
    cli("queue", "pause", q)
    assert cli.json("queue", "up", q)["admin_state"] == "PAUSE"
    # Pausing a DOWN queue must not open it for sends; up then leaves it paused.
    cli("queue", "resume", q)
    cli("queue", "down", q)
    assert cli.json("queue", "pause", q)["admin_state"] == "DOWN"
    assert cli("send", q, "--param1", "sneaked").returncode == 5
    assert cli.json("queue", "up", q)["admin_state"] == "PAUSE"
    assert cli.json("queue", "resume", q)["admin_state"] == "UP"


def test_down_refuses_sends_pause_accepts(cli: Cli, q: str, client: spoolq.Client) -> None:
    cli("queue", "down", q)
    r = cli("send", q, "--param1", "x")
    assert r.returncode == exitcodes.QUEUE_DOWN == 5
    assert r.stderr == "spoolq: queue q is DOWN: it refuses new messages\n"
    r = cli("--json", "send", q, "--param1", "x")
    assert r.returncode == 5
    assert json.loads(r.stdout) == {"error": {"code": "queue_down",
                                              "message": "queue q is DOWN: it refuses new messages"}}
    r = cli("send", q, "--from-file", "-", input="a\nb\n")
    assert r.returncode == 5
    assert client.counts(q)["que"] == 0
    cli("queue", "up", q)
    cli("queue", "pause", q)
    send(cli, q, "--param1", "x")
    assert client.counts(q)["que"] == 1


# -- send ---------------------------------------------------------------------------------------
def test_send_fields_attachments_and_show_json(cli: Cli, q: str, tmp_path: Path) -> None:
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(5000))
    b = tmp_path / "notes.txt"
    b.write_text("hello\n")
    full_id = send(cli, q, "--param1", "one", "--param2", "two", "--param3", "3", "--param4", "",
                   "--param", "user=alice", "--param", "expr=a=b", "--src", "cron", "--max-count", "4",
                   "--dest", "elsewhere", "--webhook", "http://example.com/hook", "--due", "2000000000",
                   "--attach", str(a), "--attach", str(b))
    m = cli.json("show", full_id)
    assert m["msg_id"] == short(full_id) and m["full_msg_id"] == full_id
    assert (m["param1"], m["param2"], m["param3"], m["param4"]) == ("one", "two", "3", "")
    assert m["params"] == {"user": "alice", "expr": "a=b"}
    assert (m["src"], m["max_count"], m["dest"], m["count"]) == ("cron", 4, "elsewhere", 0)
    assert m["post_run_webhook"] == ["http://example.com/hook"]
    assert m["due"] == 2000000000
    assert (m["state"], m["status"]) == ("que", "que")
    assert (cli.root / m["path"] / "msg").is_file(), "RQ's derived path, relative to the root"
    assert m["orig_msg_id"] == full_id, "an original is the first of its chain"
    atts = m["_attachments"]
    assert set(atts) == {"a.bin", "notes.txt"}
    for name, path in (("a.bin", a), ("notes.txt", b)):
        data = path.read_bytes()
        assert atts[name]["md5"] == hashlib.md5(data).hexdigest()
        assert atts[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert atts[name]["size"] == len(data)
        assert Path(atts[name]["path"]).read_bytes() == data
    # QUEUE/ID names the same message as the full id
    assert cli.json("show", f"{q}/{short(full_id)}")["msg_id"] == m["msg_id"]


def test_send_json_delay_and_default_max_count(cli: Cli, script: Path) -> None:
    cli("queue", "create", "slow", "--script", str(script), "--max-count", "9")
    t0 = time.time()
    r = cli.json("send", "slow", "--delay", "3600")
    assert set(r) == {"queue", "msg_id", "full_id", "state"}
    assert r["queue"] == "slow" and r["state"] == "que"
    assert FULL_ID.match(r["full_id"]) and short(r["full_id"]) == r["msg_id"]
    m = cli.json("show", r["full_id"])
    assert t0 + 3600 <= m["due"] <= time.time() + 3600
    assert m["max_count"] == 9, "the queue's max_count is the default"


MALFORMED_SENDS = [
    ["--param", "novalue"], ["--param", "=v"], ["--due", "abc"], ["--due", "nan"], ["--due", "-5"],
    ["--due", "inf"], ["--delay", "-1"], ["--delay", "soon"], ["--due", "1", "--delay", "1"],
    ["--max-count", "0"], ["--max-count", "x"], ["--webhook", "ftp://x"],
    ["--attach", "/nonexistent/file"], ["--attach", "/"],
    ["--from-file", "/nonexistent/file"], ["--from-file", "-", "--param1", "x"],
    ["--from-file", "-", "--prep"],
]


def test_send_rejects_malformed_input(cli: Cli, q: str, client: spoolq.Client) -> None:
    for args in MALFORMED_SENDS:
        r = cli("--json", "send", q, *args, input="")
        assert r.returncode == exitcodes.USAGE, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("spoolq: ")
        assert json.loads(r.stdout)["error"]["code"].startswith("invalid"), args
    r = cli("send", q, "--due", "yesterday")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "spoolq: --due must be a number, got 'yesterday'\n")
    assert client.recount(q) == dict.fromkeys(client.counts(q), 0), "nothing was stored"


def test_send_to_missing_queue(cli: Cli) -> None:
    r = cli("send", "nosuch", "--param1", "x")
    assert r.returncode == exitcodes.NOT_FOUND
    assert r.stderr == "spoolq: no such queue: nosuch\n"


def test_send_from_file_10000_lines(cli: Cli, q: str, tmp_path: Path, client: spoolq.Client) -> None:
    lines = [f"job {i} π" for i in range(10_000)]
    f = tmp_path / "lines.txt"
    # blank and whitespace-only lines are skipped; CRLF endings are stripped
    f.write_bytes(("\n".join(lines[:5000]) + "\n\n   \r\n" + "\r\n".join(lines[5000:]) + "\n").encode())
    t0 = time.monotonic()
    r = cli("send", q, "--from-file", str(f), "--src", "bulk")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "10000\n"
    # No progress bar when stderr is not a terminal; only the warning that no daemon serves.
    assert r.stderr.startswith("spoolq: warning: no daemon is serving") and r.stderr.count("\n") == 1
    assert time.monotonic() - t0 < 30
    assert client.counts(q)["que"] == 10_000
    assert client.recount(q)["que"] == 10_000
    items = client.list(q, limit=10_000).items
    assert sorted(v.message.param1 for v in items) == sorted(lines)
    assert {v.message.src for v in items} == {"bulk"}


def test_send_from_stdin_json(cli: Cli, q: str) -> None:
    r = cli.json("send", q, "--from-file", "-", "--param2", "shared", input="a\n\nb\nc")
    assert r["queue"] == q and r["count"] == 3 and len(r["msg_ids"]) == 3
    assert [short(f) for f in r["full_ids"]] == r["msg_ids"]
    assert len(set(r["msg_ids"])) == 3
    got = {cli.json("show", f)["param1"]: cli.json("show", f)["param2"] for f in r["full_ids"]}
    assert got == {"a": "shared", "b": "shared", "c": "shared"}


def test_send_from_file_rejects_bad_utf8(cli: Cli, q: str, client: spoolq.Client) -> None:
    r = subprocess.run([SPOOLQ, "--root", str(cli.root), "send", q, "--from-file", "-"],
                       input=b"fine\n\xff\xfe\n", capture_output=True)
    assert r.returncode == exitcodes.USAGE
    assert b"line 2 is not valid UTF-8" in r.stderr
    assert client.counts(q)["que"] == 0, "the batch holding the bad line is not sent"
    # a failure after whole batches were stored says exactly how much of the input went in
    r = subprocess.run([SPOOLQ, "--root", str(cli.root), "send", q, "--from-file", "-"],
                       input=b"".join(b"%d\n" % i for i in range(1000)) + b"ok\n\xff\n",
                       capture_output=True)
    assert r.returncode == exitcodes.USAGE
    assert r.stderr.decode() == ("spoolq: line 1002 is not valid UTF-8 (1000 messages from lines "
                                 "1-1000 were sent; nothing after line 1000)\n")
    assert client.counts(q)["que"] == 1000


def test_progress_bar_only_on_a_terminal(cli: Cli, q: str, tmp_path: Path) -> None:
    f = tmp_path / "lines.txt"
    f.write_text("".join(f"{i}\n" for i in range(1500)))
    master, slave = pty.openpty()
    try:
        p = subprocess.run([SPOOLQ, "--root", str(cli.root), "send", q, "--from-file", str(f)],
                           stdout=subprocess.PIPE, stderr=slave, timeout=60)
        os.close(slave)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    assert p.returncode == 0 and p.stdout == b"1500\n"
    assert b"sending to q [" in drawn and b"100.0%" in drawn and b"1,500 msgs" in drawn


# -- two-phase: prep, attach, commit ----------------------------------------------------------
def test_prep_attach_commit(cli: Cli, q: str, tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    r = cli.json("send", q, "--prep", "--param1", "p")
    full_id = r["full_id"]
    assert r["state"] == "prep" and cli.json("show", full_id)["state"] == "prep"
    info = cli.json("attach", full_id, str(f))
    assert info["name"] == "data.csv" and info["md5"] == hashlib.md5(b"a,b\n").hexdigest()
    r = cli("attach", full_id, "-", "--name", "from-stdin.txt", input="piped")
    assert r.returncode == 0 and hashlib.md5(b"piped").hexdigest() in r.stdout
    assert cli("attach", full_id, "-", input="x").returncode == exitcodes.USAGE
    for bad in ("../evil", ".hidden", "a b", "x;rm"):
        assert cli("attach", full_id, str(f), "--name", bad).returncode == exitcodes.USAGE, bad
    assert cli("attach", full_id, str(tmp_path / "missing")).returncode == exitcodes.USAGE
    assert cli.json("commit", full_id)["state"] == "que"
    m = cli.json("show", full_id)
    assert m["state"] == "que" and set(m["_attachments"]) == {"data.csv", "from-stdin.txt"}
    assert m["_attachments"]["from-stdin.txt"]["size"] == 5
    assert cli("commit", full_id).returncode == 0, "commit is idempotent"
    r = cli("attach", full_id, str(f), "--name", "late")
    assert r.returncode == exitcodes.CONFLICT and "prep" in r.stderr


def test_send_prep_with_attachment(cli: Cli, q: str, tmp_path: Path, client: spoolq.Client) -> None:
    f = tmp_path / "x.txt"
    f.write_text("x")
    full_id = send(cli, q, "--prep", "--attach", str(f))
    m = cli.json("show", full_id)
    assert m["state"] == "prep" and list(m["_attachments"]) == ["x.txt"]
    dot = tmp_path / ".env"
    dot.write_text("SECRET=1")
    for args in (["--attach", str(dot)], ["--prep", "--attach", str(f), "--attach", str(dot)]):
        r = cli("send", q, *args)
        assert r.returncode == exitcodes.USAGE and "dot-file" in r.stderr, args
    for name, why in (("nl\n", "invalid character"), ("x" * 201, "too long"), ("a;b", "invalid character")):
        r = cli("attach", full_id, str(f), "--name", name)
        assert r.returncode == exitcodes.USAGE and why in r.stderr, (name, r.stderr)
    c = client.recount(q)
    assert (c["prep"], c["que"]) == (1, 0), "a refused send leaves no message, not even in prep"


def _stored_attachment(root: Path, q: str, full_id: str, name: str) -> Path:
    (path,) = (root / "queue" / q).glob(f"*/*/*/*/{short(full_id)}/attach/{name}")
    return path


def test_an_attached_file_rewritten_later_does_not_change_the_message(cli: Cli, q: str, root: Path,
                                                                      tmp_path: Path) -> None:
    # The audit: send --attach hard-linked a file on the spool's filesystem, so rewriting it
    # afterwards changed the stored attachment behind its recorded md5.
    f = tmp_path / "report.csv"
    f.write_bytes(b"original,data\n" * 1000)
    full_id = send(cli, q, "--attach", str(f))
    with open(f, "r+b") as out:  # rewritten in place, as an editor or a log writer would
        out.write(b"CHANGED")
    stored = _stored_attachment(root, q, full_id, "report.csv")
    assert stored.read_bytes() == b"original,data\n" * 1000 and f.stat().st_nlink == 1
    m = cli.json("show", full_id)
    assert m["_attachments"]["report.csv"]["md5"] == hashlib.md5(stored.read_bytes()).hexdigest()
    # .<name>.json holds the hashes and size, no path: the directory moves between states.
    meta = json.loads((stored.parent / ".report.csv.json").read_bytes())
    assert sorted(meta) == ["md5", "sha256", "size"]


def test_move_hands_attached_files_over(cli: Cli, q: str, root: Path, tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(50_000))
    ino = f.stat().st_ino
    full_id = send(cli, q, "--attach", str(f), "--move")
    assert not f.exists()  # handed over: nobody else holds the name to rewrite it
    assert _stored_attachment(root, q, full_id, "big.bin").stat().st_ino == ino  # linked, not copied
    g = tmp_path / "late.bin"
    g.write_bytes(b"late")
    prep = cli.json("send", q, "--prep")["full_id"]
    assert cli.json("attach", prep, str(g), "--move")["md5"] == hashlib.md5(b"late").hexdigest()
    assert not g.exists()
    r = cli("attach", prep, "-", "--name", "x", "--move", input="x")
    assert r.returncode == exitcodes.USAGE and "stdin" in r.stderr
    r = cli("send", q, "--move")
    assert r.returncode == exitcodes.USAGE and "--attach" in r.stderr
    h = tmp_path / "kept.bin"
    h.write_bytes(b"k")
    assert cli("send", q, "--attach", str(h), "--attach", str(tmp_path / "missing"), "--move").returncode != 0
    assert h.exists(), "a failed send removes nothing"


def test_ack_errs_makes_its_renames_durable(cli: Cli, q: str, client: spoolq.Client) -> None:
    # Each acknowledgement is a rename in its bucket; ack-errs must fsync those buckets, so
    # a failing fsync (injected at the durable seam) must be reported, not ignored.
    for _ in range(2):
        r = client.send(q)
        client.store.move(q, r.msg_id, State.QUE, State.RUN)
        client.store.move(q, r.msg_id, State.RUN, State.ERR)
    out = cli("ack-errs", q, env={"SPOOLQ_FAULT_INJECT": "fsync:EIO"})
    assert out.returncode == exitcodes.STORAGE and "cannot acknowledge" in out.stderr, (out.returncode, out.stderr)
    assert client.counts(q)["err_acked"] == 2  # the renames happened: counted as they are
    assert cli("ack-errs", q).returncode == 0


# -- reading ---------------------------------------------------------------------------------
def test_show_human_and_errors(cli: Cli, q: str, tmp_path: Path) -> None:
    f = tmp_path / "att.txt"
    f.write_text("abc")
    full_id = send(cli, q, "--param1", "hello", "--param", "k=v", "--attach", str(f))
    out = cli("show", full_id).stdout
    assert re.search(rf"^id:\s+{re.escape(full_id)}$", out, re.M)
    assert re.search(r"^param1:\s+hello$", out, re.M)
    assert re.search(r"^params:\s+\{\"k\": \"v\"\}$", out, re.M)
    assert re.search(rf"^att\.txt\s+3\s+{hashlib.md5(b'abc').hexdigest()}$", out, re.M)
    missing = f"{q}/20200101.0000.00.000.1"
    r = cli("show", missing)
    assert r.returncode == exitcodes.NOT_FOUND and r.stderr.startswith("spoolq: no message")
    r = cli("--json", "show", missing)
    assert json.loads(r.stdout)["error"]["code"] == "message_not_found"
    for bad in ("q", "q/notanid", "http://h:1/q/q/x", "nosuch/20200101.0000.00.000.1"):
        r = cli("show", bad)
        assert r.returncode in (exitcodes.USAGE, exitcodes.NOT_FOUND), bad
        assert r.returncode == (exitcodes.NOT_FOUND if bad.startswith("nosuch") else exitcodes.USAGE)


def test_status_overview_and_message_status(cli: Cli, q: str, script: Path,
                                            client: spoolq.Client) -> None:
    cli("queue", "create", "other", "--script", str(script))
    cli("queue", "pause", "other")
    a = send(cli, q, "--param1", "a")
    send(cli, q, "--param1", "b")
    to_state(client, q, short(a), State.RUN, State.DONE, status="done sleeping")
    assert cli("status", a).stdout == "done - done sleeping\n"
    st = cli.json("status", f"{q}/{short(a)}")
    assert st == {"queue": q, "msg_id": short(a), "full_id": a, "state": "done",
                  "status": "done - done sleeping"}
    over = cli.json("status")["queues"]
    assert [(x["name"], x["admin_state"]) for x in over] == [("other", "PAUSE"), ("q", "UP")]
    qrow = over[1]["counts"]
    assert (qrow["que"], qrow["done"], qrow["err"]) == (1, 1, 0)
    lines = cli("status").stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "STATUS", "PREP", "QUE", "RUN", "DONE", "RELAYED", "ERR", "ACKED"]
    assert lines[2].split() == ["q", "UP", "0", "1", "0", "1", "0", "0", "0"]
    assert cli("status", f"{q}/20200101.0000.00.000.1").returncode == exitcodes.NOT_FOUND


def _sent_in_order(client: spoolq.Client, queue: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(client.send(queue, param1=f"m{i}", param2="even" if i % 2 == 0 else "odd").msg_id)
        time.sleep(0.002)  # ids order by millisecond; ties order by inode, not by send order
    return ids


def test_ls_order_limit_cursor_filter(cli: Cli, q: str, client: spoolq.Client) -> None:
    ids = _sent_in_order(client, q, 5)
    page = cli.json("ls", q)
    assert [m["msg_id"] for m in page["items"]] == ids[::-1] and page["next_cursor"] is None
    assert page["items"][0]["full_msg_id"] == client.full_id(q, ids[-1])
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        args = ["ls", q, "--limit", "2"] + (["--cursor", cursor] if cursor else [])
        page = cli.json(*args)
        seen += [m["msg_id"] for m in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["items"]) == 2
    assert seen == ids[::-1] and pages == 3
    odd = cli.json("ls", q, "--filter", "ODD")["items"]
    assert [m["param1"] for m in odd] == ["m3", "m1"]
    r = cli("ls", q, "--limit", "2")
    rows = r.stdout.splitlines()
    assert rows[0].split() == ["ID", "STATUS", "COUNT", "DUE", "PARAMS"]
    assert [row.split()[0] for row in rows[1:]] == [ids[4], ids[3]]
    assert re.search(r"\| even$", rows[1])
    assert f"--cursor {ids[3]}" in r.stderr
    assert cli.json("ls", q, "--state", "err") == {"items": [], "next_cursor": None}


def test_ls_rejects_bad_options(cli: Cli, q: str) -> None:
    for args in (["--state", "bogus"], ["--limit", "0"], ["--limit", "many"], ["--cursor", "../../etc"]):
        assert cli("ls", q, *args).returncode == exitcodes.USAGE, args
    assert cli("ls", "nosuch").returncode == exitcodes.NOT_FOUND


def test_ls_reports_corrupt_messages_on_stderr(cli: Cli, q: str, client: spoolq.Client) -> None:
    good, bad = _sent_in_order(client, q, 2)
    (fs(client).message_dir(q, bad) / "msg").write_text("{not json")
    r = cli("--json", "ls", q)
    assert r.returncode == 0
    assert [m["msg_id"] for m in json.loads(r.stdout)["items"]] == [good]
    assert "unreadable msg" in r.stderr and bad in r.stderr


def test_hand_damage_never_crashes_a_listing(cli: Cli, q: str, client: spoolq.Client) -> None:
    ids = _sent_in_order(client, q, 7)
    dirs = [fs(client).message_dir(q, i) for i in ids]
    (dirs[1] / "msg").unlink()
    (dirs[1] / "msg").mkdir()  # msg is a directory
    other = json.loads((dirs[2] / "msg").read_text())
    other["msg_id"] = "20000101.0000.00.000.1"
    (dirs[2] / "msg").write_text(json.dumps(other))  # names another message
    (dirs[3] / "attach").mkdir()
    (dirs[3] / "attach" / "gone.bin").symlink_to("/nonexistent/file")  # dangling, no .json
    (dirs[4] / "history").write_text('{"state": "run", "at": "yesterday"}\n{"state": "x", "at": 1e300}\n')
    (dirs[5] / "counts-not-here").write_text("")
    (dirs[0].parent / "20200101.0000.00.000.99").write_text("a stray file, not a message")
    (fs(client).qroot / q / "counts").write_text('{"que": "abc", "run": null}')
    r = cli("ls", q)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    listed = [m["msg_id"] for m in cli.json("ls", q)["items"]]
    assert listed == [ids[6], ids[5], ids[4], ids[3], ids[0]]  # newest first, the damaged two set aside
    for i in (ids[3], ids[4]):
        r = cli("show", f"{q}/{i}")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert cli.json("show", f"{q}/{ids[3]}")["_attachments"]["gone.bin"]["size"] == 0
    assert "?" in cli("show", f"{q}/{ids[4]}").stdout
    assert cli("send", q, "--param1", "after").returncode == 0  # damaged counts: no crash after the rename
    assert cli.json("stats", q, "--recount")["queues"][0]["counts"]["que"] == 6


def test_human_output_escapes_control_characters(cli: Cli, q: str) -> None:
    full_id = send(cli, q, "--param1", "red\x1b[31malert\nnext")
    out = cli("ls", q).stdout + cli("show", full_id).stdout
    assert "\x1b" not in out and "\\x1b[31malert\\nnext" in out
    assert cli.json("show", full_id)["param1"] == "red\x1b[31malert\nnext"


# -- acting on messages ------------------------------------------------------------------------
def test_retry(cli: Cli, q: str, client: spoolq.Client) -> None:
    a, b, c = (send(cli, q, "--param1", x) for x in "abc")
    for fid in (a, b):
        client.store.update(q, short(fid), lambda m: setattr(m, "count", 3))
        to_state(client, q, short(fid), State.RUN, State.ERR, status="by design")
    r = cli("retry", a, b)
    assert r.returncode == 0 and r.stdout.splitlines() == [f"retried {a}", f"retried {b}"]
    m = cli.json("show", a)
    assert m["state"] == "que" and m["count"] == 0 and m["due"] <= time.time()
    # c is queued, not failed: refused; a missing message: not found. First failure decides.
    missing = f"{q}/20200101.0000.00.000.1"
    r = cli("--json", "retry", c, missing)
    assert r.returncode == exitcodes.CONFLICT
    out = json.loads(r.stdout)
    assert out["ok"] == [] and [f["ref"] for f in out["failed"]] == [c, missing]
    assert out["error"]["code"] == "wrong_state"
    assert cli("retry", missing).returncode == exitcodes.NOT_FOUND
    # one malformed reference: nothing at all is done
    to_state(client, q, short(a), State.RUN, State.ERR)
    assert cli("retry", a, "../etc/passwd").returncode == exitcodes.USAGE
    assert cli.json("show", a)["state"] == "err"


def test_clone(cli: Cli, q: str, client: spoolq.Client, tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("payload")
    orig = send(cli, q, "--param1", "again", "--attach", str(f))
    assert cli("clone", orig).returncode == exitcodes.CONFLICT, "a queued message is not cloned"
    to_state(client, q, short(orig), State.RUN, State.DONE)
    r = cli.json("clone", orig)
    assert r["cloned_from"] == orig and r["full_id"] != orig
    m = cli.json("show", r["full_id"])
    assert (m["state"], m["param1"], m["cloned_from"], m["orig_msg_id"]) == ("que", "again", short(orig), orig)
    assert m["_attachments"]["in.txt"]["md5"] == hashlib.md5(b"payload").hexdigest()
    assert FULL_ID.match(cli("clone", orig).stdout.strip())


def test_run_now(cli: Cli, q: str, client: spoolq.Client) -> None:
    fid = send(cli, q, "--delay", "86400")
    assert cli.json("run-now", fid)["due"] == 0
    assert cli.json("show", fid)["due"] == 0
    to_state(client, q, short(fid), State.RUN)
    r = cli("run-now", fid)
    assert r.returncode == exitcodes.CONFLICT and "already running" in r.stderr


def test_delete(cli: Cli, q: str, client: spoolq.Client) -> None:
    a, b, c = (send(cli, q) for _ in range(3))
    r = cli("delete", a, f"{q}/{short(b)}")
    assert r.returncode == 0 and r.stdout.splitlines() == [f"deleted {a}", f"deleted {b}"]
    assert cli("show", a).returncode == exitcodes.NOT_FOUND
    assert client.counts(q)["que"] == 1
    assert cli("delete", a).returncode == exitcodes.NOT_FOUND
    to_state(client, q, short(c), State.RUN)
    r = cli("delete", c)
    assert r.returncode == exitcodes.CONFLICT and "cancel" in r.stderr
    assert cli("delete", "a b/c").returncode == exitcodes.USAGE


def test_ack_errs_and_stats(cli: Cli, q: str, script: Path, client: spoolq.Client) -> None:
    cli("queue", "create", "empty", "--script", str(script))
    ids = [short(send(cli, q)) for _ in range(3)]
    for i in ids[:2]:
        to_state(client, q, i, State.RUN, State.ERR)
    assert cli.json("stats", q) == {"queues": [{"name": q, "counts": {
        "prep": 0, "que": 1, "run": 0, "done": 0, "relayed": 0, "err": 2, "err_acked": 0}}]}
    assert cli("ack-errs", q).stdout == f"acknowledged 2 errors in {q}\n"
    assert cli.json("ack-errs", q) == {"queue": q, "acked": 0}
    c = cli.json("stats", "--recount", q)["queues"][0]["counts"]
    assert (c["err"], c["err_acked"], c["que"]) == (0, 2, 1)
    assert cli("ls", q, "--state", "err").stdout.count("err (acked)") == 2
    every = cli.json("stats")["queues"]
    assert [x["name"] for x in every] == ["empty", q]
    lines = cli("stats").stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "PREP", "QUE", "RUN", "DONE", "RELAYED", "ERR", "ACKED"]
    assert lines[2].split() == [q, "0", "1", "0", "0", "0", "0", "2"]
    assert cli("stats", "nosuch").returncode == exitcodes.NOT_FOUND
    assert cli("ack-errs", "nosuch").returncode == exitcodes.NOT_FOUND


def test_sweep(cli: Cli, q: str, root: Path) -> None:
    debris = root / "queue" / q / ".tmp" / "999999999.0.abcdef"  # a producer pid that is not alive
    debris.mkdir()
    old = time.time() - 10
    os.utime(debris, (old, old))
    r = cli.json("sweep", q)
    assert r["queue"] == q and str(debris) in r["removed"]
    assert not debris.exists()
    assert cli("sweep", q).stdout.strip().endswith("0 removed, 0 recovered")
    assert cli("sweep", "nosuch").returncode == exitcodes.NOT_FOUND


# -- names, roots, error shapes ------------------------------------------------------------------
HOSTILE = ["../x", "a b", ";rm -rf", ".hidden", "..", "x" * 300, "a/b", "é", "", "nl\n", "\u0661\u0662"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_queue_names_rejected(cli: Cli, script: Path, tmp_path: Path, name: str) -> None:
    before = tree(tmp_path)
    for args in (["queue", "create", name, "--script", str(script)], ["send", name, "--param1", "x"]):
        r = cli(*args)
        assert r.returncode == exitcodes.USAGE, (args, r.stderr)
        assert r.stderr.startswith("spoolq: invalid "), r.stderr
    assert tree(tmp_path) == before, "nothing was created on disk"


def test_hostile_names_in_every_command(cli: Cli, q: str, tmp_path: Path) -> None:
    before = tree(tmp_path)
    for name in ("../x", ".hidden"):
        for args in (["ls", name], ["stats", name], ["queue", "show", name], ["queue", "set", name, "a=1"],
                     ["queue", "down", name], ["queue", "delete", name, "--force"], ["ack-errs", name],
                     ["sweep", name], ["show", f"{name}/20200101.0000.00.000.1"]):
            r = cli(*args)
            assert r.returncode == exitcodes.USAGE, (args, r.stderr)
    assert tree(tmp_path) == before


def test_json_flag_after_command_and_error_shape(cli: Cli, q: str) -> None:
    r = cli("ls", q, "--json")
    assert json.loads(r.stdout) == {"items": [], "next_cursor": None}
    r = cli("queue", "show", "nosuch", "--json")
    assert r.returncode == exitcodes.NOT_FOUND
    assert json.loads(r.stdout) == {"error": {"code": "queue_not_found", "message": "no such queue: nosuch"}}
    assert r.stderr == "spoolq: no such queue: nosuch\n"


def test_spoolq_root_environment(tmp_path: Path, script: Path) -> None:
    root = tmp_path / "envroot"
    env: dict[str, Any] = {**os.environ, "SPOOLQ_ROOT": str(root)}
    r = subprocess.run([SPOOLQ, "queue", "create", "viaenv", "--script", str(script)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (root / "queue" / "viaenv" / "config.json").is_file()
    r = subprocess.run([SPOOLQ, "--json", "queue", "list"], env=env, capture_output=True, text=True)
    assert [x["name"] for x in json.loads(r.stdout)["queues"]] == ["viaenv"]


def test_usage_errors_exit_2(cli: Cli) -> None:
    assert cli().returncode == exitcodes.USAGE
    assert cli("queue").returncode == exitcodes.USAGE
    assert cli("send").returncode == exitcodes.USAGE
    assert cli("queue", "create", "x").returncode == exitcodes.USAGE  # --script is required


def test_cli_reference_in_the_docs_is_current() -> None:
    # docs/cli.md's reference section is generated from the parser; a changed --help must
    # come with a regenerated page (scripts/cli_reference.py).
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(repo / "scripts" / "cli_reference.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- spoolq rq: RQ's bin/rq ---------------------------------------------------------------------
def test_rq_flags_are_parsed_as_rq_rb_parses_them() -> None:
    from spoolq.cli.rq_cmd import parse_args

    assert parse_args(["sendmesg", "--dest", "q", "--param1=a=b", "--force_remote", "--src", "x"]) == (
        "sendmesg", {"dest": "q", "param1": "a=b", "force_remote": True, "src": "x"})
    # rq.rb takes any word holding "--" for a flag, and a value holding "--" is no value.
    assert parse_args(["sendmesg", "--param1", "a--b"]) == ("sendmesg", {"param1": True, "-b": True})
    assert parse_args(["state", "stray", "--msg_id", "u"]) == ("state", {"msg_id": "u"})


def test_rq_answers_ok_or_fail_and_exits_as_rq_does(cli: Cli, script: Path, tmp_path: Path) -> None:
    r = cli("rq")
    assert r.returncode == 1 and r.stdout.startswith("Valid commands are:\n") and "  sendmesg\n" in r.stdout
    r = cli("rq", "frobnicate")
    assert r.returncode == 1 and "Command not found: frobnicate" in r.stderr
    assert cli("queue", "create", "t", "--script", str(script)).returncode == 0
    r = cli("rq", "prepmesg", "--dest", "t", "--param1=x", "--force_remote")  # a bare flag RQ crashed on
    assert r.returncode == 0 and r.stdout.startswith("ok http://")
    full = r.stdout.split()[1]
    assert spoolq.open(cli.root).get(f"t/{full.rsplit('/', 1)[1]}").message.force_remote
    att = tmp_path / "a.txt"
    att.write_bytes(b"hello\n")
    md5 = hashlib.md5(b"hello\n").hexdigest()
    r = cli("rq", "attachmesg", "--msg_id", full, "--pathname", str(att))
    assert r.stdout == f"ok {md5}-Attached successfully for Message: {full} attachment\n"
    r = cli("rq", "attachstatusmesg", "--msg_id", full)
    lines = r.stdout.splitlines()
    assert lines[0] == "ok 1" and lines[1].startswith(f"a.txt {md5} 6 /")
    assert cli("rq", "commitmesg", "--msg_id", full).stdout == "ok msg commited\n"
    assert cli("rq", "commitmesg", "--msg_id", full).stdout == "ok msg commited\n"  # again: ok (RQ: fail)
    other = full[:-1] + ("1" if full[-1] == "0" else "0")
    assert cli("rq", "commitmesg", "--msg_id", other).stdout == "fail cannot find message\n"
    assert cli("rq", "state", "--msg_id", full).stdout == "ok que\n"
    assert cli("rq", "statuscountmesg", "--msg_id", full).stdout == "ok 0\n"
    assert cli("rq", "single_que", "--dest", "t").stdout == f"ok {full}\n"  # one is waiting already
    for args, why in ((("sendmesg", "--dest", "nope"), "fail no such queue"),
                      (("sendmesg", "--dest", "http://far:1/q/x"), "fail cannot relay message"),
                      (("sendmesg",), "fail missing argument --dest"),
                      (("statusmesg", "--msg_id", full.replace("/q/t/", "/q/t/2")), "fail "),
                      (("commitmesg", "--msg_id", "garbage"), "fail not a full message id")):
        r = cli("rq", *args)
        assert (r.returncode, r.stdout.startswith(why)) == (1, True), (args, r.stdout, r.stderr)
    cli("queue", "down", "t")
    for args in (("sendmesg", "--dest", "t"), ("single_que", "--dest", "t"), ("state", "--msg_id", full),
                 ("statusmesg", "--msg_id", full), ("commitmesg", "--msg_id", full)):
        r = cli("rq", *args)
        assert (r.returncode, r.stdout) == (1, "fail status: DOWN\n"), args  # every command, as RQ's manager
    # --pathname is expanded as Ruby's File.expand_path does: ~ is the home directory.
    cli("queue", "up", "t")
    held = cli("rq", "prepmesg", "--dest", "t").stdout.split()[1]
    r = cli("rq", "attachmesg", "--msg_id", held, "--pathname", "~/a.txt", env={"HOME": str(tmp_path)})
    assert r.stdout.startswith(f"ok {md5}-Attached successfully"), r.stdout
