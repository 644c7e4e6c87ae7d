"""The queue-script contract (rq-spec 3): real scripts in bash, Python and Ruby under a real
``spoolq serve``; plus the pure status-protocol rules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fs
from daemon_util import alive, script, serve_fixture, wait_for

import spoolq
from spoolq.model import Message, State
from spoolq.runner.protocol import MAX_LINE, LineBuffer, decide, parse_completion, parse_dup

HAVE_RUBY = shutil.which("ruby") is not None


@pytest.fixture
def serve(root: Path) -> Iterator[Any]:
    yield from serve_fixture(root)


def run_one(client: spoolq.Client, queue: str, timeout: float = 30, **fields: Any) -> spoolq.model.MessageView:
    r = client.send(queue, **fields)
    return client.wait(r, timeout)


# -- pure protocol ------------------------------------------------------------------------
def test_line_buffer_joins_split_lines_and_cuts_long_ones() -> None:
    lb = LineBuffer()
    assert lb.feed(b"run par") == []
    assert lb.feed(b"tial\ndone x\nres") == ["run partial", "done x"]
    assert lb.flush() == ["res"]
    lb = LineBuffer()
    out = lb.feed(b"x" * (MAX_LINE + 10))
    assert len(out) == 1 and out[0].endswith("[truncated]") and len(out[0]) < MAX_LINE + 20
    assert lb.feed(b"yyy\ndone ok\n") == ["done ok"]  # the tail of the cut line is dropped
    assert lb.feed(b"\x00\x01bad\xff\n") == ["  bad\ufffd"]


def test_outcome_table() -> None:
    c = parse_completion
    assert decide(c("done", "x"), 0, count=0, max_count=15, last_status="", retry_delay=5).state == State.DONE
    o = decide(c("done", "x"), 1, count=0, max_count=15, last_status="", retry_delay=5)
    assert o.state == State.ERR and o.status == ("PROCESS EXITED IMPROPERLY - MOVING TO ERR - "
                                                 "Completion was done but exit status was 1")
    assert decide(c("err", "why"), 3, count=0, max_count=15, last_status="", retry_delay=5).status == "why"
    assert decide(None, 0, count=0, max_count=15, last_status="s", retry_delay=5).state == State.DONE
    o = decide(None, 111, count=2, max_count=15, last_status="", retry_delay=7)
    assert (o.state, o.count, o.requeue_delay) == (State.QUE, 3, 7)
    assert decide(None, 111, count=14, max_count=15, last_status="", retry_delay=7).state == State.ERR
    assert decide(None, 100, count=0, max_count=15, last_status="", retry_delay=7).state == State.ERR
    o = decide(c("resend", "30-later"), 0, count=2, max_count=3, last_status="", retry_delay=0)
    assert (o.state, o.status, o.count) == (State.ERR, "HIT MAX RESEND COUNT - MOVING TO ERR", 3)
    o = decide(c("resend", "30-later"), 0, count=0, max_count=3, last_status="", retry_delay=0)
    assert (o.state, o.requeue_delay) == (State.QUE, 30)
    assert parse_dup("5-X-my-queue") is not None and parse_dup("5-X-my-queue").dest == "my-queue"  # type: ignore[union-attr]
    assert parse_dup("garbage") is None


def test_the_recorded_runner_names_exactly_the_process_that_was_spawned(tmp_path: Path) -> None:
    from spoolq.daemon.jobs import HOST
    from spoolq.daemon.recovery import _runner_pid
    from spoolq.runner.spawn import START_WINDOW_NS, same_process, spawn
    from spoolq.store.leases import Attempt

    def runner(text: str) -> tuple[int, int] | None:
        return _runner_pid(Attempt("q", "1", "a", "o", 0.0, Message(), runner=text))

    sp = spawn(["/bin/sleep", "30"], env={}, cwd=tmp_path, log_fd=os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT),
               header_script="sleep")
    try:
        assert runner(f"{sp.pid} {sp.spawned_ns} {HOST}") == runner(f"{sp.pid} {sp.spawned_ns}") == (
            sp.pid, sp.spawned_ns)
        assert runner(f"{sp.pid} {sp.spawned_ns} another-host") is None, "a pid of another machine"
        assert same_process(sp.pid, sp.spawned_ns)
        # The same pid recorded at another time is another process (a reused pid).
        assert not same_process(sp.pid, sp.spawned_ns - START_WINDOW_NS - 10**9)
        assert not same_process(sp.pid, sp.spawned_ns + 10**9)
        assert not same_process(1, sp.spawned_ns)
    finally:
        os.kill(sp.pid, signal.SIGKILL)
        os.waitpid(sp.pid, 0)
    assert not same_process(sp.pid, sp.spawned_ns)  # gone
    assert runner("garbage") is None and runner("") is None


_CHILD_REPORT = r"""
import json, os, signal, sys
fds = [f for f in sorted(int(x) for x in os.listdir("/proc/self/fd")) if f > 2 and os.path.exists(f"/proc/self/fd/{f}")]
os.write(3, b"run spawned\n")
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: v for k, v in os.environ.items()
                  if k.startswith("T_")}, "sid": os.getsid(0) == os.getpid(),
                  "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                  "fds": fds,
                  "stdin": os.read(0, 10).decode(), "reply": os.read(4, 100).decode()}), flush=True)
"""


@pytest.fixture(params=["posix_spawn", "subprocess"])
def spawn_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a script is started: glibc's posix_spawn through ctypes, and subprocess
    (where glibc lacks it)."""
    from spoolq.runner import posix_spawn

    if request.param == "subprocess":
        monkeypatch.setattr(posix_spawn, "AVAILABLE", False)
    elif not posix_spawn.AVAILABLE:
        pytest.skip("this libc has no posix_spawn_file_actions_addchdir_np/addclosefrom_np")
    return str(request.param)


def test_the_script_gets_exactly_its_cwd_env_fds_session_and_signals(tmp_path: Path, spawn_path: str) -> None:
    import sys

    from spoolq.runner.spawn import spawn

    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)  # an inheritable fd of the daemon's must not reach the script
    # Nor the signal mask of the thread that spawns: posix_spawn empties it; subprocess
    # passes it on (the daemon's loop blocks nothing, so it has none to pass).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1] if spawn_path == "posix_spawn" else [])
    log = tmp_path / "log"
    try:
        sp = spawn([sys.executable, "-c", _CHILD_REPORT, "a b", "", "ü"],
                   env={"T_ONE": "1", "T_SPACE": "x y", "PATH": os.environ["PATH"]}, cwd=tmp_path,
                   log_fd=os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND), header_script="child")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(stray)
    os.write(sp.reply_fd, b"hello\n")
    os.close(sp.reply_fd)
    _, status = os.waitpid(sp.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
    os.set_blocking(sp.status_fd, True)
    assert os.read(sp.status_fd, 100) == b"run spawned\n"
    os.close(sp.status_fd)
    header, body = log.read_text().split("\n")[1:3]
    assert header.endswith(" - RQ START - child")
    got = json.loads(body)
    assert got["argv"] == ["a b", "", "ü"]
    assert got["cwd"] == str(tmp_path)
    assert got["env"] == {"T_ONE": "1", "T_SPACE": "x y"}
    assert got["sid"] and got["mask"] == []
    assert got["fds"] == [3, 4], "only the status and reply pipes beyond stdio"
    assert got["stdin"] == "" and got["reply"] == "hello\n"
    # Nothing ignored or blocked (Python ignores SIGPIPE and SIGXFSZ itself; a script must
    # not inherit that): read by a program that changes neither.
    sp = spawn(["/bin/cat", "/proc/self/status"], env={}, cwd=tmp_path,
               log_fd=os.open(log, os.O_WRONLY | os.O_TRUNC), header_script="cat")
    os.waitpid(sp.pid, 0)
    proc_status = dict(line.split(":\t", 1) for line in log.read_text().splitlines() if ":\t" in line)
    glibc_internal = (1 << 31) | (1 << 32)  # 32 and 33: glibc's posix_spawn leaves them ignored;
    # they are no signal a program can use (SIGRTMIN is 34), and glibc re-arms them at start
    assert int(proc_status["SigIgn"], 16) & ~glibc_internal == 0 and int(proc_status["SigBlk"], 16) == 0


def test_spawn_failures_say_why(tmp_path: Path, spawn_path: str) -> None:
    from spoolq.errors import ScriptError
    from spoolq.runner.spawn import _devnull, spawn

    def start(argv: list[str], env: dict[str, str] | None = None) -> None:
        spawn(argv, env=env or {"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
              log_fd=os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT), header_script="x")

    _devnull()  # the one /dev/null fd kept for every spawn's stdin, opened at the first spawn
    before = len(os.listdir("/proc/self/fd"))
    noexec = tmp_path / "noexec"
    noexec.write_text("echo hi\n")
    noshebang = tmp_path / "noshebang"
    noshebang.write_text("echo hi\n")
    noshebang.chmod(0o755)
    with pytest.raises(ScriptError, match="missing: No such file"):
        start([str(tmp_path / "missing"), ""])
    with pytest.raises(ScriptError, match=r"noexec: not executable \(Permission denied\)"):
        start([str(noexec), ""])
    with pytest.raises(ScriptError, match=r"noshebang: cannot be executed \(Exec format error"):
        start([str(noshebang), ""])
    with pytest.raises(ScriptError, match="no-such-interpreter: No such file"):
        start(["no-such-interpreter", str(noshebang)])
    with pytest.raises(ValueError):
        start(["/bin/true", ""], env={"T": "a\0b"})
    # Too big for exec: this message's fault (ValueError: it goes to err), not the script's.
    with pytest.raises(ValueError, match="E2BIG"):
        start(["/bin/true", ""], env={"PATH": "/usr/bin:/bin", "BIG": "x" * 200_000})
    # The job directory gone: the machine's problem, tried again later; not a SCRIPTERROR.
    with pytest.raises(OSError) as info:
        spawn(["/bin/true", ""], env={}, cwd=tmp_path / "gone",
              log_fd=os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT), header_script="x")
    assert not isinstance(info.value, ScriptError)
    assert len(os.listdir("/proc/self/fd")) == before, "every pipe and the log fd closed"
    # A bare program name is found on the script's PATH, not the daemon's.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "my-interp").symlink_to("/bin/true")
    start(["my-interp", "x"], env={"PATH": str(bindir)})
    os.wait()


# -- bash: every verb and outcome ---------------------------------------------------------
@pytest.mark.parametrize(("param1", "state", "status"), [
    ("done", "done", "done - done sleeping"),
    ("err", "err", "err - by design"),
    ("fails", "err", "err - alias of err"),
    ("relayed", "relayed", "relayed - http://elsewhere:3333/q/x/20240101.0000.00.000.1"),
    ("sneaky", "err", "err - PROCESS EXITED IMPROPERLY - MOVING TO ERR - Completion was done but exit "
                      "status was 1"),
    ("noverb", "done", "done - starting"),
])
def test_bash_verbs(client: spoolq.Client, serve: Any, param1: str, state: str, status: str) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    v = run_one(client, "test", param1=param1)
    assert (str(v.state), v.status) == (state, status)
    log = (fs(client).message_dir("test", v.msg_id) / "job" / "stdio.log").read_text()
    assert " - RQ START - " + script("rq_script.sh") in log
    assert f"param1 {param1}" in log


def test_exit_codes_0_100_111(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"), max_count=3,
                        retry={"base": 0.05, "factor": 1.0, "jitter": 0})
    serve()
    assert run_one(client, "test", param1="exit", param2="0").state == State.DONE
    v = run_one(client, "test", param1="exit", param2="100")
    assert v.state == State.ERR and "exit status was 100" in v.status
    v = run_one(client, "test", param1="exit", param2="7")
    assert v.state == State.ERR and "exit status was 7" in v.status
    v = run_one(client, "test", param1="exit", param2="111")  # retried with backoff until max_count
    assert v.state == State.ERR and v.message.count == 3
    assert v.status == "err - HIT MAX RESEND COUNT - MOVING TO ERR"
    log = (fs(client).message_dir("test", v.msg_id) / "job" / "stdio.log").read_text()
    assert log.count("RQ START") == 3  # attempts 0, 1, 2


def test_resend_and_max_count(client: spoolq.Client, serve: Any) -> None:
    """rq-spec 3.4: resend counts; count=2 max=3 always-resend -> err with count 3;
    count=0 max=8 resend while RQ_COUNT<6 -> done with count 6."""
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    v = run_one(client, "test", param1="resend1")
    assert (v.state, v.message.count, v.status) == (State.DONE, 1, "done - resent 1")
    v = run_one(client, "test", param1="always_resend", count=2, max_count=3)
    assert (v.state, v.message.count, v.job_status) == (State.ERR, 3, "HIT MAX RESEND COUNT - MOVING TO ERR")
    v = run_one(client, "test", param1="resend2", max_count=8)
    assert (v.state, v.message.count) == (State.DONE, 6)


def test_resend_sets_due(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    t0 = time.time()
    r = client.send("test", param1="resend1")
    wait_for(lambda: client.get(r).message.count == 1, what="resend")
    v = client.get(r)
    if v.state == State.QUE:
        assert v.message.due >= t0 + 1 - 0.01
    assert client.wait(r, 30).state == State.DONE


def test_environment(client: spoolq.Client, serve: Any, root: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"), env_vars={"RQTESTENV1": "OWEN", "RQTESTENV2": "32"})
    s = serve()
    assert run_one(client, "test", param1="env").status == "done - env ok"
    v = run_one(client, "test", param1="rqenv", param2="two", param4="four", dest="test")
    mdir = fs(client).message_dir("test", v.msg_id)
    env = dict(line.split("=", 1) for line in (mdir / "job" / "rqenv.txt").read_text().splitlines())
    base = f"http://127.0.0.1:{s.port}"
    assert env["RQ_VER"] == "3.0.0"
    assert env["RQ_SCRIPT"] == env["RQ_REALSCRIPT"] == script("rq_script.sh")
    assert env["RQ_HOST"] == base + "/" and env["RQ_PORT"] == str(s.port)
    assert env["RQ_DEST"] == f"{base}/q/test/" and env["RQ_DEST_QUEUE"] == "test"
    assert env["RQ_MSG_ID"] == v.msg_id
    assert env["RQ_FULL_MSG_ID"] == f"{base}/q/test/{v.msg_id}" == env["RQ_ORIG_MSG_ID"]
    assert env["RQ_MSG_DIR"] == str(root / "queue/test/run" / mdir.relative_to(root / "queue/test/done") / "job")
    assert (env["RQ_WRITE"], env["RQ_READ"], env["RQ_PIPE"], env["RQ_COUNT"]) == ("3", "4", "3", "0")
    assert [env[f"RQ_PARAM{i}"] for i in range(1, 5)] == ["rqenv", "two", "", "four"]
    assert "RQ_ENV" in env and "RQ_FORCE_REMOTE" not in env
    assert env["SPOOLQ_ROOT"] == str(root) and env["SPOOLQ_QUEUE"] == "test"
    assert env["SPOOLQ_STORE"] == client.store.url
    assert env["SPOOLQ_TIMEOUT"] == ""  # none set; with one, its seconds
    client.update_queue("test", timeout=90)
    v = run_one(client, "test", param1="rqenv")
    dumped = (fs(client).message_dir("test", v.msg_id) / "job" / "rqenv.txt").read_text().splitlines()
    assert "SPOOLQ_TIMEOUT=90" in dumped


def test_force_remote_and_full_url_dest(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    r = client.send_message("test", {"dest": "http://far:3333/q/other", "param1": "rqenv", "force_remote": "1"})
    v = client.wait(r, 30)
    env = (fs(client).message_dir("test", v.msg_id) / "job" / "rqenv.txt").read_text()
    assert "RQ_FORCE_REMOTE=1" in env and "RQ_DEST=http://far:3333/q/other\n" in env
    assert "RQ_DEST_QUEUE=other" in env


def test_split_long_and_garbage_lines(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    assert run_one(client, "test", param1="split").status == "done - split ok"
    v = run_one(client, "test", param1="longline")
    assert v.status == "done - survived"


def test_symlinked_script_resolved_each_run(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for d in (v1, v2):
        d.mkdir()
        shutil.copy(script("rq_script.sh"), d / "run.sh")
    cur = tmp_path / "current"
    cur.symlink_to(v1)
    client.create_queue("test", script=str(cur / "run.sh"))
    serve()
    assert run_one(client, "test", param1="symlink").status == f"done - {v1 / 'run.sh'}"
    tmp = tmp_path / "current.new"
    tmp.symlink_to(v2)
    os.rename(tmp, cur)  # a deploy: the next run uses the new target
    assert run_one(client, "test", param1="symlink").status == f"done - {v2 / 'run.sh'}"


def test_missing_and_broken_scripts_go_to_err_and_recover(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    # Each broken script sends the message that tried into err with a clear status and holds
    # the rest (SCRIPTERROR); fixing the script lets them run. SIGHUP makes the daemon look
    # again at once instead of within SCRIPT_RECHECK seconds.
    path = tmp_path / "later.sh"
    client.create_queue("test", script=str(path))
    s = serve()

    def recheck() -> None:
        assert s.proc is not None
        s.proc.send_signal(signal.SIGHUP)

    v = run_one(client, "test", param1="done")
    assert v.state == State.ERR and "script cannot start" in v.status and str(path) in v.status
    path.write_text("#!/bin/sh\necho 'done fixed' >&3\n")
    waiting = client.send("test")
    recheck()
    wait_for(lambda: "not executable" in (client.script_error("test") or ""), what="the new reason")
    assert client.get(waiting).state == State.QUE
    path.chmod(0o755)
    recheck()
    assert client.wait(waiting, 30).status == "done - fixed"
    assert client.script_error("test") is None
    path.write_text("echo no shebang\n")
    v = run_one(client, "test")
    assert v.state == State.ERR and "Exec format error" in v.status
    path.write_text("#!/bin/sh\necho 'done fixed again' >&3\n")
    recheck()
    client.retry(spoolq.MessageRef("test", v.msg_id))
    assert client.wait(spoolq.MessageRef("test", v.msg_id), 30).status == "done - fixed again"


def test_exec_prefix(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    body = tmp_path / "plain.sh"  # not executable: run through the prefix
    body.write_text("echo \"done via prefix $0\" >&3\n")
    client.create_queue("test", script=str(body), exec_prefix="/bin/bash --noprofile")
    serve()
    assert run_one(client, "test").status == f"done - via prefix {body}"


def test_dup_local_with_attachments_and_to_missing_queue(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    # PAUSEd: the copy carries param1 "dup" too and would dup itself again, for ever,
    # rewriting the reply file under the test's feet.
    client.create_queue("other", script=script("py_script.py"))
    client.set_admin_state("other", "PAUSE")
    serve()
    att = tmp_path / "note.txt"
    att.write_text("hello attachment\n")
    reply = tmp_path / "reply"
    r = client.send("test", param1="dup", param2="other", param3=str(reply), attachments=[att])
    assert client.wait(r, 30).status == "done - dup sent"
    line = reply.read_text().strip()
    assert line.startswith("ok http://127.0.0.1:") and "/q/other/" in line
    dup_id = line.split()[1]
    dup = client.get(dup_id)
    assert dup.message.param1 == "dup" and dup.message.count == 0
    assert dup.message.orig_msg_id == spoolq.open(fs(client).root).full_id("test", r.msg_id)
    assert dup.state == State.QUE
    assert dup.attachments["note.txt"].md5 == client.get(r).attachments["note.txt"].md5
    assert Path(dup.attachments["note.txt"].path).read_text() == "hello attachment\n"
    r = client.send("test", param1="dup", param2="nope_this_q_does_not_exist", param3=str(reply))
    assert client.wait(r, 30).state == State.DONE  # the source still ends done
    assert reply.read_text().strip() == "fail couldn't connect to queue - nope_this_q_does_not_exist"


def test_dup_to_paused_and_down_queues(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    client.create_queue("target", script=script("rq_script.sh"))
    serve()
    reply = tmp_path / "reply"
    client.set_admin_state("target", "PAUSE")
    run_one(client, "test", param1="dup", param2="target", param3=str(reply))
    assert reply.read_text().startswith("ok ")
    assert client.get(reply.read_text().split()[1]).state == State.QUE
    client.set_admin_state("target", "DOWN")
    run_one(client, "test", param1="dup", param2="target", param3=str(reply))
    assert reply.read_text().strip() == "fail dup failed - status: DOWN"


def test_timeout_kills_grandchildren(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"), timeout=1)
    serve()
    pidfile = tmp_path / "grandchild.pid"
    v = run_one(client, "test", param1="grandchild", param2=str(pidfile))
    assert v.state == State.ERR and v.job_status.startswith("TIMEOUT - killed after 1 s")
    gc = int(pidfile.read_text())
    wait_for(lambda: not alive(gc), 10, "grandchild to die")


def test_webhook_messages_are_posted(client: spoolq.Client, serve: Any) -> None:
    """Each post_run_webhook URL gets the final state: JSON to a plain URL, RQ's form to an RQ
    receiver; a 500 is retried with backoff, a 2xx ends it done."""
    import http.server
    import threading
    import urllib.parse

    got: list[tuple[str, str, bytes]] = []
    answers = {"/flaky": [500]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, self.headers["Content-Type"], body))
            codes = answers.get(self.path)
            self.send_response(codes.pop(0) if codes else 201)
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        client.create_queue("test", script=script("rq_script.sh"))
        serve()
        v = run_one(client, "test", param1="done",
                    post_run_webhook=[f"{base}/hook", f"{base}/q/other/new_message", f"{base}/flaky"])
        assert v.state == State.DONE
        wait_for(lambda: client.counts("webhook")["done"] == 3, 30, "three webhooks posted")
        by_path = {p: (ct, body) for p, ct, body in got}
        ct, body = by_path["/hook"]
        payload = json.loads(body)
        assert ct == "application/json"
        assert payload["msg_id"] == spoolq.open(fs(client).root).full_id("test", v.msg_id)
        assert payload["state"] == "done" and "status" not in payload and "_attachments" not in payload
        ct, body = by_path["/q/other/new_message"]
        form = urllib.parse.parse_qs(body.decode())
        assert ct == "application/x-www-form-urlencoded" and form["x_format"] == ["json"]
        assert json.loads(form["mesg"][0]) == {"src": "", "param1": "done", "param2": "", "param3": "",
                                               "param4": "", "orig_msg_id": "", "dest": "/q/other"}
        # RQ's backoff is count² × 60 s: the first retry comes at once, and gets its 201.
        flaky = next(h for h in client.list("webhook", "done").items if h.message.param1.endswith("/flaky"))
        assert (flaky.message.count, flaky.job_status) == (1, "successful post 201")
        assert [p for p, _, _ in got].count("/flaky") == 2
        assert any(h.get("note") == "resend" or h.get("state") == "que" for h in flaky.message.history[1:])
        assert client.admin_state("webhook") == "UP"
    finally:
        httpd.shutdown()


# -- Python and Ruby scripts ---------------------------------------------------------------
@pytest.mark.parametrize("lang", ["py", "rb"])
def test_other_languages(client: spoolq.Client, serve: Any, tmp_path: Path, lang: str) -> None:
    if lang == "rb" and not HAVE_RUBY:
        pytest.skip("ruby is not installed")
    name = {"py": "py_script.py", "rb": "rb_script.rb"}[lang]
    word = {"py": "python", "rb": "ruby"}[lang]
    client.create_queue("test", script=script(name), retry={"base": 0.05, "factor": 1.0, "jitter": 0})
    client.create_queue("sink", script=script("rq_script.sh"))
    client.set_admin_state("sink", "PAUSE")  # the copy would dup itself again (see above)
    serve()
    assert run_one(client, "test", param1="done").status == f"done - {word} done"
    assert run_one(client, "test", param1="err").status == f"err - {word} err"
    v = run_one(client, "test", param1="resend", param2="2")
    assert (v.state, v.message.count, v.status) == (State.DONE, 2, f"done - {word} after 2")
    v = run_one(client, "test", param1="exit", param2="111", max_count=2)
    assert (v.state, v.message.count) == (State.ERR, 2)
    reply = tmp_path / "reply"
    assert run_one(client, "test", param1="dup", param2="sink", param3=str(reply)).status == f"done - {word} dup"
    line = reply.read_text()
    assert line.startswith("ok http://") and "/q/sink/" in line
    assert client.get(line.split()[1]).message.param1 == "dup"
    if lang == "rb":
        v = run_one(client, "test", param1="sneaky")
        assert v.state == State.ERR and "Completion was done but exit status was 1" in v.status


def test_python_reads_attachment(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("py_script.py"))
    serve()
    f = tmp_path / "data.txt"
    f.write_text("forty-two\n")
    v = run_one(client, "test", param1="attach", param2="data.txt", attachments=[f])
    assert v.status == "done - attachment says forty-two"


def test_env_block_refuses_what_execve_cannot_carry_and_encodes_as_os_fsencode() -> None:
    """Every entry checked at every call (nothing is kept between starts); each byte for
    byte os.fsencode's."""
    from spoolq.runner import posix_spawn as ps

    odd = "caf\u00e9 \udcff"  # a byte that is not UTF-8 (surrogateescape), as os.environ holds it
    env = {"A": "1", "ODD": odd}
    for _ in range(2):
        assert ps.env_block(env) == [b"A=1", b"ODD=" + os.fsencode(odd)]
    for bad in ({"X": "a\x00b"}, {"X=Y": "1"}, {"N\x00": "1"}):
        for _ in range(2):
            with pytest.raises(ValueError):
                ps.env_block({"A": "1", **bad})
    big = "p" * 100_000
    assert ps.env_block({"RQ_PARAM1": big}) == [b"RQ_PARAM1=" + big.encode()]


@pytest.mark.parametrize("env_vars,force_remote,extra", [
    ({}, False, {}),
    ({"RQTESTENV1": "OWEN"}, True, {}),
    # env_vars that name message variables: the message's own win, and a message that does not
    # set RQ_FORCE_REMOTE keeps the queue's
    ({"RQ_PARAM1": "queue's", "RQ_FORCE_REMOTE": "queue's", "SPOOLQ_QUEUE": "x"}, False, {}),
    ({"RQ_FORCE_REMOTE": "queue's"}, True, {}),
    # kind fsq's FSQ_ITEM_*, over env_vars of the same names
    ({"FSQ_ITEM_ID": "queue's"}, False, {"FSQ_ITEM_ID": "the item's", "FSQ_ITEM_TRIES": "0"}),
])
def test_a_queues_encoded_environment_gives_what_build_env_gives(tmp_path: Path, env_vars: dict[str, str],
                                                                  force_remote: bool,
                                                                  extra: dict[str, str]) -> None:
    """The daemon encodes a queue's constant environment once (QueueEnv) and adds each
    message's variables: the entries are exactly build_env's, one per name."""
    from spoolq.config import RootConfig
    from spoolq.model import QueueConfig
    from spoolq.runner import posix_spawn as ps
    from spoolq.runner.spawn import QueueEnv, build_env, message_vars, queue_env

    cfg = QueueConfig(name="q", script="/bin/true", env_vars=env_vars)
    rootcfg = RootConfig(host="127.0.0.1", port=3333)
    base = {"PATH": "/usr/bin:/bin", "HOME": "/root", "RQ_OLD": "scrubbed", "SPOOLQ_X": "scrubbed"}
    const = queue_env(base=base, cfg=cfg, queue="q", script="/usr/bin/true", rootcfg=rootcfg, root=tmp_path,
                      rq_env="production")
    qe = QueueEnv(const)
    for i in range(3):  # one QueueEnv, many messages
        msg = Message(msg_id=f"20260101.0000.00.000.{i}", param1=f"p{i}", param2="two", dest="",
                      force_remote=force_remote, count=i)
        mdir = tmp_path / "run" / msg.msg_id
        env = qe.with_message(message_vars(msg, "q", rootcfg.base_url, str(mdir)))
        env.own.update(extra)
        want = {**build_env(base=base, cfg=cfg, msg=msg, queue="q", script=Path("/usr/bin/true"),
                            rootcfg=rootcfg, root=tmp_path, msg_dir=mdir, rq_env="production"), **extra}
        assert env.as_dict() == want
        block = env.block()
        assert len(block) == len(want) and sorted(block) == sorted(ps.env_block(want))
        assert env.get("PATH") == "/usr/bin:/bin" and env.get("RQ_PARAM1") == f"p{i}"
        assert "RQ_OLD" not in want and "SPOOLQ_X" not in want
        # the rules written out, not derived from the code under test: the message's own
        # variables and RQ's win over env_vars; a message without force_remote keeps the queue's
        got = dict(e.decode().split("=", 1) for e in block)
        assert (got["RQ_PARAM1"], got["RQ_PARAM2"], got["RQ_COUNT"]) == (f"p{i}", "two", str(i))
        assert (got["SPOOLQ_QUEUE"], got["RQ_SCRIPT"], got["RQ_REALSCRIPT"]) == ("q", "/bin/true", "/usr/bin/true")
        assert got["RQ_MSG_DIR"] == f"{mdir}/job" and got["SPOOLQ_MESSAGE_DIR"] == str(mdir)
        assert got.get("RQ_FORCE_REMOTE") == ("1" if force_remote else env_vars.get("RQ_FORCE_REMOTE"))
        assert got.get("FSQ_ITEM_ID") == extra.get("FSQ_ITEM_ID", env_vars.get("FSQ_ITEM_ID"))


def test_a_queues_environment_refuses_what_execve_cannot_carry() -> None:
    from spoolq.runner.spawn import QueueEnv

    with pytest.raises(ValueError):
        QueueEnv({"A": "1", "B": "a\x00b"})
    qe = QueueEnv({"A": "1"})
    with pytest.raises(ValueError):
        qe.with_message({"RQ_PARAM1": "a\x00b"}).block()


def test_real_path_is_realpath(tmp_path: Path) -> None:
    """The script's real path asked of the kernel (runner/spawn.py real_path) is what
    os.path.realpath says, for links, links to links, '..' and a path that does not exist."""
    from spoolq.runner.spawn import real_path

    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "current").symlink_to("v1")
    (tmp_path / "link.sh").symlink_to(tmp_path / "current" / "run.sh")
    (tmp_path / "chain.sh").symlink_to("link.sh")
    (tmp_path / "dangling.sh").symlink_to("nowhere.sh")
    for p in ("v1/run.sh", "current/run.sh", "link.sh", "chain.sh", "current/../v1/run.sh", "missing.sh",
              "dangling.sh", "current"):
        path = str(tmp_path / p)
        assert real_path(path) == os.path.realpath(path), p
    assert real_path("/bin/true") == os.path.realpath("/bin/true")


def test_a_queues_environment_is_built_again_for_a_new_config_or_script_and_dropped_with_it(tmp_path: Path) -> None:
    """JobRunner keeps one QueueEnv per queue: reused while the config object and the
    resolved script stay, built again when either changes, dropped when the queue goes."""
    from spoolq.config import RootConfig
    from spoolq.daemon.jobs import JobRunner
    from spoolq.model import QueueConfig
    from spoolq.store.memory import MemoryStore

    runner = JobRunner(MemoryStore(), tmp_path, RootConfig(host="127.0.0.1", port=3333), time.time,
                       "production", "owner")
    cfg = QueueConfig(name="q", script="/bin/true", env_vars={"A": "1"})
    first = runner._queue_env("q", cfg, "/usr/bin/true")
    assert runner._queue_env("q", cfg, "/usr/bin/true") is first
    deployed = runner._queue_env("q", cfg, "/srv/v2/true")  # a symlinked deploy moved the script
    assert deployed is not first and deployed.const["RQ_REALSCRIPT"] == "/srv/v2/true"
    changed = QueueConfig(name="q", script="/bin/true", env_vars={"A": "2"})
    assert runner._queue_env("q", changed, "/srv/v2/true").const["A"] == "2"
    runner.forget("q")
    assert "q" not in runner._queue_envs
