"""The supervisor: scheduling (due, num_workers, PAUSE/DOWN, coalescing, blocking), config
reloads, the pidfile, signals, crash recovery, and the follow-up commands wait/log/cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SPOOLQ, fs
from daemon_util import Served, alive, script, serve_fixture, wait_for

import spoolq
from spoolq.errors import QueueDown
from spoolq.model import State


@pytest.fixture
def serve(root: Path) -> Iterator[Any]:
    yield from serve_fixture(root)


def state(client: spoolq.Client, r: Any) -> str:
    return str(client.get(r).state)


def settle(client: spoolq.Client) -> None:
    """Prove the daemon has handled everything sent so far: a probe message runs to done."""
    if "probe" not in client.queues():
        client.create_queue("probe", script=script("rq_script.sh"))
    assert client.wait(client.send("probe", param1="done"), 30).state == State.DONE


def test_pause_and_down(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    client.set_admin_state("test", "PAUSE")
    a, b = client.send("test"), client.send("test")
    settle(client)
    assert (state(client, a), state(client, b)) == ("que", "que")
    assert client.counts("test")["run"] == 0
    client.set_admin_state("test", "UP")
    assert client.wait(a, 30).state == client.wait(b, 30).state == State.DONE
    client.set_admin_state("test", "DOWN")
    with pytest.raises(QueueDown):
        client.send("test")
    client.set_admin_state("test", "PAUSE")
    c = client.send("test")
    client.set_admin_state("test", "DOWN")  # DOWN also runs nothing
    settle(client)
    assert state(client, c) == "que"
    client.set_admin_state("test", "UP")
    assert client.wait(c, 30).state == State.DONE


def test_touching_flag_files_works_like_rq(client: spoolq.Client, serve: Any, root: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    (root / "queue/test/pause").touch()
    a = client.send("test")
    settle(client)
    assert state(client, a) == "que"
    (root / "queue/test/pause").unlink()
    assert client.wait(a, 30).state == State.DONE


def test_num_workers_and_blocking_params(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    """RQ's test_message_blocking: params a, b, a with 3 workers -> run, run, que."""
    client.create_queue("test", script=script("rq_script.sh"), num_workers=3, blocking_params=[2])
    serve()
    locks = [tmp_path / f"unlock{i}" for i in range(3)]
    msgs = [client.send("test", param1="blocking", param2=p, param3=str(locks[i]))
            for i, p in enumerate("aba")]
    wait_for(lambda: [state(client, m) for m in msgs] == ["run", "run", "que"], what="run run que")
    settle(client)
    assert state(client, msgs[2]) == "que"
    locks[0].touch()
    wait_for(lambda: [state(client, m) for m in msgs] == ["done", "run", "run"], what="done run run")
    locks[1].touch()
    locks[2].touch()
    assert client.wait(msgs[2], 30).state == State.DONE


def test_counts_stay_exact_under_a_burst(client: spoolq.Client, serve: Any) -> None:
    # The daemon moves messages out of que while producers are still adding their +1s.
    client.create_queue("test", script="/bin/true", num_workers=4)
    serve()
    for _ in range(6):
        client.send_many("test", [{} for _ in range(100)])
    wait_for(lambda: client.counts("test")["done"] == 600, what="600 messages done")
    c = client.counts("test")
    assert c == client.store.recount("test") and c["que"] == c["run"] == 0


def test_num_workers_limit(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"), num_workers=2)
    serve()
    lock = tmp_path / "go"
    msgs = [client.send("test", param1="blocking", param2=str(i), param3=str(lock)) for i in range(5)]
    wait_for(lambda: client.counts("test")["run"] == 2, what="two running")
    settle(client)
    assert sorted(state(client, m) for m in msgs) == ["que", "que", "que", "run", "run"]
    lock.touch()
    for m in msgs:
        assert client.wait(m, 30).state == State.DONE


def test_coalesce_params(client: spoolq.Client, serve: Any) -> None:
    """RQ's send_test_coalesce: two later messages coalesce into the one that runs first;
    when the parent fails, its duplicates go back and run on their own."""
    client.create_queue("test", script=script("rq_script.sh"), coalesce_params=[2])
    now = time.time()
    m1 = client.send("test", param1="done", param2="k", due=now + 3)
    m2 = client.send("test", param1="done", param2="k", due=now + 3)
    m3 = client.send("test", param1="done", param2="k", due=now - 2)
    other = client.send("test", param1="done", param2="different", due=now + 1)
    serve()
    for m in (m3, m1, m2, other):
        assert client.wait(m, 30).state == State.DONE
    full3 = spoolq.open(fs(client).root).full_id("test", m3.msg_id)
    assert client.get(m1).status == client.get(m2).status == f"done - duplicate {full3}"
    assert client.get(m1).message.dup == full3
    assert sorted(client.get(m3).message.dups) == sorted(
        spoolq.open(fs(client).root).full_id("test", m.msg_id) for m in (m1, m2))
    assert client.get(other).status == "done - done sleeping"
    # The parent errs: the duplicate is released and runs normally.
    c1 = client.send("test", param1="done", param2="z", delay=1)
    c2 = client.send("test", param1="err", param2="z")
    assert client.wait(c2, 30).state == State.ERR
    assert client.wait(c1, 30).status == "done - done sleeping"


def test_due_times_and_run_now(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    later = client.send("test", delay=3600)
    soon = client.send("test", delay=1)
    settle(client)
    assert state(client, later) == "que"
    assert client.wait(soon, 30).state == State.DONE
    client.run_now(later)
    assert client.wait(later, 30).state == State.DONE


def test_new_queue_while_running(client: spoolq.Client, serve: Any) -> None:
    serve()
    client.create_queue("fresh", script=script("rq_script.sh"))
    assert client.wait(client.send("fresh"), 30).state == State.DONE


def test_config_change_and_sighup(client: spoolq.Client, serve: Any, root: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    s = serve()
    assert client.wait(client.send("test", param1="env"), 30).state == State.ERR
    client.update_queue("test", env_vars={"RQTESTENV1": "OWEN", "RQTESTENV2": "32"})
    assert client.wait(client.send("test", param1="env"), 30).status == "done - env ok"
    # A hand edit in place (same size, so only SIGHUP is sure to be noticed), then SIGHUP.
    cfg_path = root / "queue/test/config.json"
    data = json.loads(cfg_path.read_text())
    data["env_vars"]["RQTESTENV2"] = "33"
    with open(cfg_path, "r+") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.truncate()
    os.kill(s.pid, signal.SIGHUP)
    assert client.wait(client.send("test", param1="env"), 30).status == "err - env missing"


def test_second_daemon_refused(client: spoolq.Client, serve: Any, cli: Any) -> None:
    s = serve()
    r = cli("serve", "--no-http", timeout=30)
    assert r.returncode == 8
    assert "another spoolq daemon" in r.stderr and str(s.pid) in r.stderr


def test_tokens_never_on_the_command_line_and_never_short(cli: Any, root: Path, tmp_path: Path) -> None:
    r = cli("serve", "--token", "a-long-enough-token-1234567890", timeout=30)
    assert r.returncode == 2 and "visible to every user in ps" in r.stderr
    r = cli("serve", env={"SPOOLQ_TOKEN": "short"}, timeout=30)
    assert r.returncode == 2 and "at least 16" in r.stderr
    loose = tmp_path / "token"
    loose.write_text("a-long-enough-token-1234567890\n")
    loose.chmod(0o644)
    r = cli("serve", "--token-file", str(loose), timeout=30)
    assert r.returncode == 2 and "readable by others" in r.stderr
    assert not (root / "token").exists(), "no token file is made when the configured one is refused"


def test_sigterm_waits_then_requeues(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    s = serve("--grace", "1")
    pidf = tmp_path / "pid"
    r = client.send("test", param1="slowfirst", param2=str(pidf))
    wait_for(lambda: pidf.exists() and pidf.read_text().strip(), what="script start")
    script_pid = int(pidf.read_text())
    assert s.stop(timeout=30) == 0
    v = client.get(r)
    assert v.state == State.QUE and v.message.count == 0
    assert "daemon stopped" in v.job_status
    wait_for(lambda: not alive(script_pid), 10, "script to be stopped")


def test_sigterm_lets_short_jobs_finish(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    s = serve("--grace", "20")
    r = client.send("test", param1="slow", param2="1")
    wait_for(lambda: state(client, r) == "run", what="running")
    assert s.stop(timeout=30) == 0
    assert client.get(r).status == "done - slept"


def test_crash_recovery_kills_orphans_and_reruns(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    s = serve()
    pidf = tmp_path / "pid"
    r = client.send("test", param1="slowfirst", param2=str(pidf))
    wait_for(lambda: pidf.exists() and pidf.read_text().strip(), what="script start")
    orphan = int(pidf.read_text())
    # The daemon records the pid right after exec (docs/operations.md, "Known window").
    wait_for(lambda: (fs(client).message_dir("test", r.msg_id) / "pid").exists(), what="pid file")
    s.kill()  # SIGKILL: the script lives on as an orphan
    assert alive(orphan)
    assert client.get(r).state == State.RUN
    serve()
    v = client.wait(r, 30)
    wait_for(lambda: not alive(orphan), 10, "orphan to be killed")
    assert (v.state, v.message.count, v.job_status) == (State.DONE, 1, "second run")
    log = (fs(client).message_dir("test", r.msg_id) / "job" / "stdio.log").read_text()
    assert log.count("RQ START") == 2


def test_scripts_get_fds_3_and_4_when_the_daemon_started_with_them_taken(client: spoolq.Client,
                                                                         serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    s = serve(low_fds_taken=True)
    assert "fds 3 and 4 are taken" in s.log()
    assert client.wait(client.send("test", param1="done"), 30).status == "done - done sleeping"


def test_the_log_header_comes_before_any_output(client: spoolq.Client, serve: Any) -> None:
    # exec_prefix echo: the fastest possible first line, racing the header.
    client.create_queue("test", script=script("rq_script.sh"), exec_prefix="/bin/echo FIRSTLINE",
                        num_workers=2)
    serve()
    rs = client.send_many("test", [{} for _ in range(30)])
    for r in rs:
        client.wait(r, 30)
        log = (fs(client).message_dir("test", r.msg_id) / "job" / "stdio.log").read_text()
        header, first = log.split("\n")[1:3]
        assert header.endswith(" - RQ START - " + script("rq_script.sh")), log
        assert first.startswith("FIRSTLINE"), log


def test_a_missing_script_holds_the_queue_until_it_is_fixed(client: spoolq.Client, serve: Any, cli: Any,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "later.sh"
    client.create_queue("test", script=str(path), num_workers=2)
    serve()
    rs = client.send_many("test", [{"param1": str(i)} for i in range(20)])
    wait_for(lambda: client.counts("test")["err"] == 1, what="the first message in err")
    show = cli.json("queue", "show", "test")
    assert show["status"] == "SCRIPTERROR" and "No such file" in show["script_error"]
    errs = client.list("test", State.ERR).items
    assert len(errs) == 1 and "later.sh" in errs[0].status
    time.sleep(0.5)
    assert client.counts("test")["que"] == 19, "the rest wait, not thrown into err"
    path.write_text("#!/bin/sh\necho done fixed >&3\n")
    path.chmod(0o755)
    for r in rs:
        if r.msg_id != errs[0].msg_id:
            assert client.wait(r, 30).status == "done - fixed"  # the daemon rechecks by itself
    assert cli.json("queue", "show", "test")["status"] == "UP"


def test_a_link_left_by_a_script_is_not_followed_by_the_next_attempt(client: spoolq.Client, serve: Any,
                                                                       tmp_path: Path) -> None:
    """A script that puts links in place of its ``job/`` directory and of ``stdio.log`` (or
    is made to): the next attempt's output must not land where they point."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched\n")
    s = tmp_path / "linker.sh"
    s.write_text(f"""#!/bin/sh
if [ "$RQ_COUNT" = 0 ]; then
  ln -sf {outside}/victim stdio.log.new && mv stdio.log.new stdio.log
  echo "resend 0-again" >&3
elif [ "$RQ_COUNT" = 1 ]; then
  cd .. && mv job job.old && ln -s {outside} job
  echo "resend 0-again" >&3
else
  echo "third attempt output"
  echo "done linked" >&3
fi
""")
    s.chmod(0o755)
    client.create_queue("q", script=str(s))
    serve()
    r = client.send("q")
    v = client.wait(r, 30)
    assert (v.state, v.message.count) == (State.DONE, 2), v
    assert (outside / "victim").read_text() == "untouched\n"
    assert sorted(os.listdir(outside)) == ["victim"]
    job = fs(client).message_dir("q", r.msg_id) / "job"
    assert not job.is_symlink() and "third attempt output" in (job / "stdio.log").read_text()


def test_verbose_logs_every_job(client: spoolq.Client, serve: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    s = serve()  # the fixture passes -v
    r = client.send("test", param1="err")
    client.wait(r, 30)
    wait_for(lambda: f"test/{r.msg_id}: pid" in s.log(), what="the end line")
    assert f"test/{r.msg_id}: started pid" in s.log()
    assert "-> err - by design" in s.log()


def test_bad_interpreter_is_named(client: spoolq.Client, serve: Any, tmp_path: Path) -> None:
    path = tmp_path / "interp.sh"
    path.write_text("#!/no/such/interpreter\n")
    path.chmod(0o755)
    client.create_queue("test", script=str(path))
    serve()
    v = client.wait(client.send("test"), 30)
    assert v.state == State.ERR and "bad interpreter '/no/such/interpreter'" in v.status


def test_recovery_kills_what_an_exited_script_left_running(client: spoolq.Client, serve: Any,
                                                           tmp_path: Path) -> None:
    # As under systemd or init: orphans are reparented to a reaper (here this test process,
    # a child subreaper), which reaps the script once it exits; its background child lives on.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    try:
        body = tmp_path / "leaver.sh"
        leftover = tmp_path / "leftover.pid"
        body.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {leftover}\nsleep 1\nexit 0\n")
        body.chmod(0o755)
        client.create_queue("test", script=str(body), max_count=1)
        s = serve()
        r = client.send("test")
        wait_for(lambda: leftover.exists() and leftover.read_text().strip(), what="the script's child")
        child = int(leftover.read_text())
        s.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # reap the script when it exits, as init would
            try:
                os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pass
            script_pid = int((fs(client).message_dir("test", r.msg_id) / "pid").read_text().split()[0])
            if not alive(script_pid):
                break
            time.sleep(0.05)
        assert alive(child)
        leftover.unlink()
        s2 = serve()
        wait_for(lambda: not alive(child), 10, "the leftover child to be killed")
        assert "left running by its exited script" in s2.log()
        # max_count 1: a crash still earns the message its run again.
        v = client.wait(r, 30)
        assert v.state == State.DONE and v.message.count == 1
    finally:
        libc.prctl(36, 0, 0, 0, 0)
        for _ in range(50):
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def test_wait_log_and_cancel_commands(client: spoolq.Client, serve: Any, cli: Any, tmp_path: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    ok = client.send("test", param1="done")
    r = cli("wait", f"test/{ok.msg_id}", "--timeout", "30")
    assert (r.returncode, r.stdout.strip()) == (0, "done - done sleeping")
    bad = client.send("test", param1="err")
    assert cli("wait", f"test/{bad.msg_id}", "--timeout", "30").returncode == 9
    later = client.send("test", delay=3600)
    assert cli("wait", f"test/{later.msg_id}", "--timeout", "0.5").returncode == 7
    r = cli("log", f"test/{ok.msg_id}")
    assert r.returncode == 0 and "RQ START" in r.stdout and "param1 done" in r.stdout
    slow = client.send("test", param1="slow", param2="1")
    r = cli("log", "-f", f"test/{slow.msg_id}", timeout=60)
    assert r.returncode == 0 and "param1 slow" in r.stdout
    assert client.get(slow).state == State.DONE
    pidf = tmp_path / "pid"
    running = client.send("test", param1="slowfirst", param2=str(pidf))
    wait_for(lambda: pidf.exists() and pidf.read_text().strip(), what="script start")
    wait_for(lambda: (fs(client).message_dir("test", running.msg_id) / "pid").exists(), what="pid file")
    r = cli("cancel", f"test/{running.msg_id}")
    assert r.returncode == 0, r.stderr
    v = client.wait(running, 30)
    assert (v.state, v.job_status) == (State.ERR, "cancelled")
    wait_for(lambda: not alive(int(pidf.read_text())), 10, "cancelled script to die")
    assert cli("cancel", f"test/{later.msg_id}").returncode == 0
    assert client.get(later).status == "err - cancelled"
    assert cli("cancel", f"test/{ok.msg_id}").returncode == 4  # already done: a conflict


def test_cancel_is_carried_out_by_the_daemon_not_the_caller(client: spoolq.Client, serve: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The store records the cancel and wakes the daemon, which kills the script: the
    caller signals nothing (it may be on another machine, issue 8)."""
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    pidf = tmp_path / "pid"
    running = client.send("test", param1="slowfirst", param2=str(pidf))
    wait_for(lambda: pidf.exists() and pidf.read_text().strip(), what="script start")

    def no_signals(*a: Any) -> None:
        raise AssertionError(f"the caller sent a signal: {a}")

    monkeypatch.setattr(os, "killpg", no_signals)
    monkeypatch.setattr(os, "kill", no_signals)
    what = client.cancel(running, wait=30)
    assert what == "cancelled (err - cancelled)", what
    monkeypatch.undo()
    wait_for(lambda: not alive(int(pidf.read_text())), 10, "cancelled script to die")
    assert client.get(running).message.history[-1]["state"] == "err"


def test_wait_takes_json_after_the_command(client: spoolq.Client, serve: Any, cli: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    ok = client.send("test", param1="done")
    r = cli("wait", f"test/{ok.msg_id}", "--json", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "done - done sleeping"


def test_log_follow_exits_as_wait_when_the_message_ends_in_err(client: spoolq.Client, serve: Any,
                                                               cli: Any) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    serve()
    bad = client.send("test", param1="err")
    r = cli("log", "-f", f"test/{bad.msg_id}")
    assert (r.returncode, client.get(bad).state) == (9, State.ERR)  # wait's status for err
    assert "param1 err" in r.stdout
    assert cli("log", f"test/{bad.msg_id}").returncode == 0  # printing a log is not following it


def test_commands_warn_when_no_daemon_serves_the_root(client: spoolq.Client, serve: Any, cli: Any,
                                                      root: Path) -> None:
    client.create_queue("test", script=script("rq_script.sh"))
    warning = f"spoolq: warning: no daemon is serving {root} (start it with spoolq serve)"
    r = cli("send", "test", "--param1", "done")
    assert r.returncode == 0 and r.stderr == f"{warning}; the message will wait\n"
    full_id = r.stdout.strip()
    assert not (root / "daemon.pid").exists()  # asking created nothing
    r = cli("wait", full_id, "--timeout", "0.1")
    assert r.returncode == 7 and r.stderr.startswith(f"{warning}; the message will not change state")
    follow = subprocess.Popen([SPOOLQ, "--root", str(root), "log", "-f", full_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stderr is not None
        assert follow.stderr.readline().startswith(warning)
    finally:
        follow.kill()
        follow.wait(10)
    s = serve()
    r = cli("wait", full_id, "--timeout", "30")
    assert (r.returncode, r.stderr) == (0, "")
    r = cli("send", "test", "--param1", "done")
    assert (r.returncode, r.stderr) == (0, "")
    s.stop()
    assert cli("send", "test").stderr.startswith(warning)  # a stopped daemon serves no more


def test_idle_daemon_uses_no_cpu(client: spoolq.Client, root: Path) -> None:
    for i in range(100):
        client.create_queue(f"q{i:03d}", script=script("rq_script.sh"))
    s = Served(root).start()
    try:
        time.sleep(1)  # let start-up work finish
        before = s.cpu_ticks()
        time.sleep(30)
        used = s.cpu_ticks() - before
        hz = os.sysconf("SC_CLK_TCK")
        print(f"idle daemon with 100 queues: {used} ticks ({used / hz:.3f} s CPU) in 30 s")
        assert used / hz < 0.3
    finally:
        s.stop()


def test_serve_cli_help_and_exit(cli: Any) -> None:
    r = cli("serve", "--help")
    assert r.returncode == 0 and "--grace" in r.stdout
    assert subprocess.run([SPOOLQ, "wait", "--help"], capture_output=True).returncode == 0


def test_serve_with_http(client: spoolq.Client, root: Path) -> None:
    import urllib.request

    from daemon_util import free_port

    port = free_port()
    client.create_queue("test", script=script("rq_script.sh"))
    p = subprocess.Popen([SPOOLQ, "--root", str(root), "serve", "--port", str(port), "--grace", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(healthy, 30, "HTTP health")
        assert client.wait(client.send("test"), 30).state == State.DONE
        assert client.wait(client.send("test", param1="err"), 30).state == State.ERR
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        # Runs, outcomes and durations come from the daemon itself.
        assert 'spoolq_job_starts_total{queue="test"} 2' in text
        assert 'spoolq_job_outcomes_total{queue="test",outcome="done"} 1' in text
        assert 'spoolq_job_outcomes_total{queue="test",outcome="err"} 1' in text
        assert 'spoolq_job_duration_seconds_count{queue="test"} 2' in text
        assert 'spoolq_job_duration_seconds_bucket{queue="test",le="+Inf"} 2' in text
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
