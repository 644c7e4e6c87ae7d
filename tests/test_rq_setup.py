"""RQ's own queue setup, run against spoolq: ``test/setup_test_queues.sh`` (curl to
``/``, ``/new_queue`` and ``/new_queue_link``) and ``test/test_queues_setup.rb`` (Ruby,
checking ``/q/<q>/config.json``), from a copy of RQ's tree (``../shared/peers/rq``; see
``../shared/peers/README.md``), with a real ``spoolq serve --trust-loopback`` whose root is
that copy, as RQ's tests expect (they run from RQ's top directory). Then the same routes
without loopback trust: refused without the token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_helpers import daemon, free_port

REPO = Path(__file__).resolve().parent.parent


def rq_tree() -> Path | None:
    """RQ's tree: ``$SPOOLQ_PEERS/rq``, else ``../shared/peers/rq`` beside the repository."""
    for base in (os.environ.get("SPOOLQ_PEERS"), str(REPO.parent / "shared" / "peers")):
        if base and (Path(base) / "rq" / "test" / "setup_test_queues.sh").is_file():
            return Path(base) / "rq"
    return None


RQ = rq_tree()
pytestmark = [
    pytest.mark.skipif(RQ is None, reason="RQ's tree is not here (set SPOOLQ_PEERS to the peers' folder)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


@pytest.fixture
def rq_root(tmp_path: Path) -> Path:
    """A copy of RQ's tree, which is also the spool root (its scripts write beside themselves)."""
    assert RQ is not None
    root = tmp_path / "rq"
    shutil.copytree(RQ, root, symlinks=True)
    # RQ's repository holds two symlinks, which the peers' copy stores as files holding
    # their targets: made links again, as a checkout of RQ has them.
    for link in ("test/test_symlink", "test/test_script_symlink.sh"):
        p = root / link
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 64:
            target = p.read_text().strip()
            p.unlink()
            p.symlink_to(target)
    return root


@pytest.fixture
def trusted(rq_root: Path) -> Iterator[tuple[Path, int]]:
    port = free_port()
    with daemon(rq_root, port, token=None, extra=("--trust-loopback",)):
        yield rq_root, port


def test_rq_setup_test_queues_and_its_check_pass(trusted: tuple[Path, int]) -> None:
    root, port = trusted
    env = {**os.environ, "RQ_PORT": str(port)}
    r = subprocess.run(["bash", "test/setup_test_queues.sh"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Sorry" not in r.stdout, r.stdout
    if shutil.which("ruby") is None:
        pytest.skip("ruby is not installed: RQ's test_queues_setup.rb not run (the queues were made)")
    r = subprocess.run(["ruby", "test/test_queues_setup.rb"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # What the setup made, as spoolq sees it: relative scripts stay relative to the root.
    import spoolq

    client = spoolq.open(root)
    made = set(client.queues())
    assert {"test", "test_symlink", "test_coalesce", "test_blocking", "test_run", "test_nop", "test_ansi",
            "test_env_var"} <= made, made
    assert client.queue_config("test_blocking").blocking_params == [1]
    assert client.queue_config("test_blocking").num_workers == 3
    assert client.queue_config("test_env_var").env_vars == {"RQTESTENV1": "OWEN", "RQTESTENV2": "32"}


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of one curl call; with -L, the last response's."""
    out = subprocess.run(["curl", "-s", "-D", "-", *args], capture_output=True, text=True, timeout=30, check=True)
    text = out.stdout
    while True:  # text=True made every CRLF a LF
        head, _, text = text.partition("\n\n")
        if not (args and "-L" in args and text.startswith("HTTP/")):
            break
    lines = head.splitlines()
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, text


def test_rq_queue_admin_answers_and_refusals(trusted: tuple[Path, int], tmp_path: Path) -> None:
    root, port = trusted
    base = f"http://127.0.0.1:{port}"
    status, _, body = curl(f"{base}/")
    assert status == 200 and "QUEUE MGR is OPERATIONAL" in body
    # A bad name: RQ still goes to the page, with the manager's refusal in the flash.
    jar = str(tmp_path / "jar")
    status, _, body = curl("-L", "--cookie-jar", jar, f"{base}/new_queue", "-F", "queue[name]=bad/name",
                           "-F", "queue[script]=./test/test_script.sh")
    assert "fail" in body and "invalid" in body.lower() and "queue created" not in body, body
    # The config file of /new_queue_link is never quoted back, whatever it holds.
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET not json")
    status, headers, _ = curl(f"{base}/new_queue_link", "-F", f"queue[json_path]={secret}")
    assert status == 303 and "TOP-SECRET" not in str(headers)
    status, _, body = curl("-L", "--cookie-jar", jar, f"{base}/new_queue_link", "-F", f"queue[json_path]={secret}")
    assert "is not JSON" in body and "TOP-SECRET" not in body
    # Made and deleted again.
    status, headers, _ = curl(f"{base}/new_queue", "-F", "queue[name]=made", "-F", "queue[script]=/bin/true",
                              "-F", "queue[num_workers]=2", "-F", "queue[coalesce_params][]=2")
    assert status == 303 and headers["location"] == "/q/made"
    status, _, body = curl(f"{base}/q/made/config.json")
    cfg = json.loads(body)
    assert (cfg["num_workers"], cfg["coalesce_params"], cfg["exec_prefix"]) == (2, [2], "")
    status, headers, _ = curl(f"{base}/delete_queue", "-F", "queue_name=made")
    assert status == 303 and headers["location"] == "/"
    assert curl(f"{base}/q/made/config.json")[0] == 404


def test_rq_queue_admin_needs_the_token_without_loopback_trust(rq_root: Path) -> None:
    with daemon(rq_root, free_port(), token=None) as base:
        for path, field in (("/new_queue", "queue[name]=x"), ("/new_queue_link", "queue[json_path]=/etc/passwd"),
                            ("/delete_queue", "queue_name=relay")):
            status, _, _ = curl(f"{base}{path}", "-F", field)
            assert status == 401, path
        token = (rq_root / "token").read_text().strip()
        status, headers, _ = curl(f"{base}/new_queue", "-H", f"Authorization: Bearer {token}",
                                  "-F", "queue[name]=x", "-F", "queue[script]=/bin/true")
        assert status == 303 and headers["location"] == "/q/x"
        # A browser post from another site never gets as far as the form.
        status, _, _ = curl(f"{base}/delete_queue", "-H", f"Authorization: Bearer {token}",
                            "-H", "Origin: http://evil.example", "-F", "queue_name=x")
        assert status == 403


def test_rq_adminoper_and_ack_errs(trusted: tuple[Path, int], tmp_path: Path) -> None:
    """RQ's queue page buttons: a field named for the action, ``back`` where to go."""
    root, port = trusted
    base = f"http://127.0.0.1:{port}"
    import spoolq

    client = spoolq.open(root)
    client.create_queue("adm", script="/bin/false")
    for word, state in (("pause", "PAUSE"), ("resume", "UP"), ("down", "DOWN"), ("up", "UP")):
        status, headers, _ = curl(f"{base}/q/adm/adminoper", "-F", f"{word}=1", "-F", "back=/q/adm")
        assert (status, headers["location"]) == (303, "/q/adm"), word
        assert str(client.admin_state("adm")) == state, word
    status, _, body = curl("-L", "--cookie-jar", str(tmp_path / "jar"), f"{base}/q/adm/adminoper", "-F", "pause=1",
                           "-F", "back=/q/adm")
    assert status == 200 and "Successfully paused queue adm" in body
    # back never leads off this server; a missing queue is RQ's 404; no action is RQ's 500.
    for evil in ("//evil.example/x", "http://evil.example/", "/\\evil.example"):
        status, headers, _ = curl(f"{base}/q/adm/adminoper", "-F", "up=1", "-F", f"back={evil}")
        assert (status, headers["location"]) == (303, "/q/adm"), evil
        status, headers, _ = curl(f"{base}/q/adm/new_message", "-F", "x_format=html", "-F", "mesg[param1]=x",
                                  "-F", f"back={evil}")
        assert status == 303 and headers["location"].startswith("/q/adm/"), (evil, headers["location"])
    assert curl(f"{base}/q/nope/adminoper", "-F", "pause=1")[:3:2] == (404, "404 - Queue not found")
    status, _, body = curl(f"{base}/q/adm/adminoper", "-F", "back=/")
    assert status == 500 and body.startswith("500 - Couldn't  queue.")
    # ack_errs: every err of the queue acknowledged.
    m = client.send("adm")
    client.store.move("adm", m.msg_id, spoolq.State.QUE, spoolq.State.ERR)
    status, headers, _ = curl(f"{base}/q/adm/ack_errs", "-F", "back=/q/adm")
    assert (status, headers["location"]) == (303, "/q/adm")
    assert client.counts("adm")["err_acked"] == 1 and client.counts("adm")["err"] == 0


def test_rq_restart_runs_a_fixed_scripterror_queue(trusted: tuple[Path, int], tmp_path: Path) -> None:
    root, port = trusted
    base = f"http://127.0.0.1:{port}"
    import spoolq

    client = spoolq.open(root)
    script = tmp_path / "later.sh"
    client.create_queue("rst", script=str(script))
    first = client.send("rst")
    assert client.wait(first, timeout=30).state == spoolq.State.ERR  # no script: SCRIPTERROR
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    status, headers, _ = curl(f"{base}/q/rst/restart", "-F", "back=/q/rst")
    assert (status, headers["location"]) == (303, "/q/rst")
    assert client.wait(client.send("rst"), timeout=30).state == spoolq.State.DONE
    status, _, body = curl("-L", "--cookie-jar", str(tmp_path / "jar"), f"{base}/q/rst/restart", "-F", "back=/q/rst")
    assert status == 200 and "Successfully restarted queue rst" in body
    assert curl(f"{base}/q/nope/restart", "-F", "back=/")[:1] == (404,)


def test_rq_queue_admin_routes_are_not_message_routes_for_anonymous_rq_level(rq_root: Path) -> None:
    """At the default anonymous level (``rq``: RQ's message routes open on loopback), the
    queue administration routes still need the token."""
    with daemon(rq_root, free_port(), token=None) as base:
        import spoolq

        spoolq.open(rq_root).create_queue("adm", script="/bin/true")
        for path, field in (("/q/adm/adminoper", "down=1"), ("/q/adm/ack_errs", "back=/"),
                            ("/q/adm/restart", "back=/")):
            assert curl(f"{base}{path}", "-F", field)[0] == 401, path
        status, _, body = curl(f"{base}/q/adm/new_message", "-d", "x_format=json", "--data-urlencode",
                               'mesg={"param1": "x"}')
        assert status == 200 and body.startswith('["ok"'), body


def test_rq_admin_flag_files_are_honoured(trusted: tuple[Path, int]) -> None:
    """RQ's test_run_admin_down.sh and test_run_admin_pause.sh, without ``bin/rq``: touching
    ``config/<q>.down`` makes ``/q/<q>.txt`` say ``status: DOWN``; with ``config/<q>.pause`` a
    message waits, and once the file is gone the daemon runs it (it watches the directory);
    ``up``/``resume`` through the API clear RQ's files too."""
    root, port = trusted
    base = f"http://127.0.0.1:{port}"
    import spoolq

    client = spoolq.open(root)
    client.create_queue("flagged", script="/bin/true")
    flags = root / "config"
    (flags / "flagged.down").touch()
    assert curl(f"{base}/q/flagged.txt")[2].strip() == "status: DOWN"
    (flags / "flagged.down").unlink()
    assert curl(f"{base}/q/flagged.txt")[2].startswith("status: UP")
    (flags / "flagged.pause").touch()
    assert str(client.admin_state("flagged")) == "PAUSE"
    r = client.send("flagged")
    with pytest.raises(spoolq.errors.WaitTimeout):
        client.wait(r, 1.5)
    (flags / "flagged.pause").unlink()
    assert client.wait(r, 20).state == spoolq.State.DONE
    (flags / "flagged.down").touch()
    (flags / "flagged.pause").touch()
    client.admin_action("flagged", "up")
    client.admin_action("flagged", "resume")
    assert not (flags / "flagged.down").exists() and not (flags / "flagged.pause").exists()
    assert str(client.admin_state("flagged")) == "UP"


# -- RQ's functional tests, with bin/rq running `spoolq rq` -----------------------------------
# The functional block of RQ's test/run_tests.sh, in its order, less RQ_NOT_YET.
RQ_FUNCTIONAL = [
    "test_rq.sh", "send_test_coalesce.sh", "send_test_sneaky.sh", "send_test_symlink.sh", "test_que_create_naming.sh",
    "test_run_admin_down.sh", "test_run_admin_pause.sh", "send_test_large.sh", "send_test_web_done.rb",
    "send_test_web_prepattachdone.rb", "send_test_web_http11_prepattachdone.rb",
    "send_test_web_prepattachdone_large.rb", "send_test_attachdone.sh",
    "send_test_cloneattachdone.sh", "send_test_web_prepdone.rb", "send_test_done.sh", "send_test_err.sh",
    "send_test_donequick.sh", "send_test_errquick.sh", "send_test_fast_collide.sh", "send_test_relay_force.sh",
    "send_test_relay.sh", "send_test_remote_relay_force.sh", "send_test_remote_relay_force_large.sh",
    "send_test_remote_relay.sh", "send_test_relay_relayid_attach.sh", "send_test_relay_relayid.sh",
    "send_test_resend.sh", "send_test_force_remote.sh",
    "test_web_attach_err.rb", "test_web_max_count.rb", "test_web_overrides.rb", "send_dup.rb", "test_web_done_json.rb",
    "env_var_test.rb",
]
# RQ's scripts that build due times from `date +%s` around several `bin/rq` calls: when a
# loaded machine makes each call take a second, their messages fall due in another order
# than the script assumes (seen once in CI, for send_test_coalesce.sh's resend part). They
# get a second run, and the first failure is printed.
RQ_SECONDS_SENSITIVE = {"send_test_coalesce.sh"}
# What the block holds that spoolq does not pass yet, and why (issue 10's next slices).
RQ_NOT_YET = {
    "send_test_web_prepattachmime.rb": "it sends Host: dru-brserv.btrll.com to 127.0.0.1, which spoolq "
                                       "refuses without a token (DNS rebinding; docs/security.md)",
}


def shim_bin_rq(root: Path) -> None:
    """RQ's bin/rq replaced by the two lines the issue names: exec spoolq rq."""
    spoolq_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "spoolq"
    if not spoolq_bin.exists():
        spoolq_bin = Path(shutil.which("spoolq") or "spoolq")
    rq = root / "bin" / "rq"
    rq.unlink()
    rq.write_text(f'#!/bin/sh\nexec "{spoolq_bin}" rq "$@"\n')
    rq.chmod(0o755)


def test_rq_functional_tests_pass_with_bin_rq_as_spoolq_rq(trusted: tuple[Path, int]) -> None:
    root, port = trusted
    env = {**os.environ, "RQ_PORT": str(port), "SPOOLQ_ROOT": str(root)}
    r = subprocess.run(["bash", "test/setup_test_queues.sh"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    shim_bin_rq(root)
    failed = {}
    nokogiri = shutil.which("ruby") is not None and subprocess.run(
        ["ruby", "-e", "require 'nokogiri'"], capture_output=True).returncode == 0
    for name in RQ_FUNCTIONAL:
        if name.endswith(".rb") and shutil.which("ruby") is None:
            continue
        if name == "test_web_overrides.rb" and not nokogiri:
            print(f"{name} not run: Ruby's nokogiri is missing (scripts/bootstrap.sh test installs ruby-nokogiri)")
            continue
        argv = ["ruby", f"test/{name}"] if name.endswith(".rb") else ["bash", f"test/{name}"]
        r = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0 and name in RQ_SECONDS_SENSITIVE:
            print(f"{name} failed once; run again:\n{(r.stdout + r.stderr)[-1500:]}")
            r = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            failed[name] = (r.stdout + r.stderr)[-1500:]
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
