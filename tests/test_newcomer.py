"""What a new user met in the audit (hardening issue, item 17), through the real command."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

import spoolq


def test_serve_on_an_unusable_root_says_why(cli: Any, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = cli("--root", str(not_a_dir / "spool"), "serve", "--no-http", timeout=30)
    assert r.returncode == 11 and "cannot create the spool root" in r.stderr
    assert "Traceback" not in r.stderr


def test_serve_on_a_port_in_use_exits_11(cli: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", "--port", str(port), env={"SPOOLQ_TOKEN": "a-token-long-enough-for-spoolq"}, timeout=60)
    assert r.returncode == 11, (r.returncode, r.stderr)
    assert "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_params_too_big_for_an_environment_are_refused_at_send(cli: Any, root: Path, tmp_path: Path) -> None:
    client = spoolq.open(root)
    client.create_queue("q", script="/bin/true")
    big = tmp_path / "lines"
    big.write_text("x" * 500_000 + "\n")  # (argv itself cannot carry it: the same 128 KiB cap)
    r = cli("send", "q", "--from-file", str(big))
    assert r.returncode == 2 and "128 KiB" in r.stderr
    with pytest.raises(spoolq.errors.TooLarge):
        client.send("q", param2="y" * 500_000)
    assert client.counts("q")["que"] == 0
    assert cli("send", "q", "--param1", "x" * 100_000).returncode == 0


def test_queue_set_makes_the_script_absolute_and_lists_the_keys(cli: Any, root: Path, tmp_path: Path) -> None:
    spoolq.open(root).create_queue("q", script="/bin/true")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    r = cli("queue", "set", "q", "script=run.sh", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert spoolq.open(root).queue_config("q").script == str(tmp_path / "run.sh")
    assert "not executable" in r.stderr
    r = cli("queue", "set", "q", "workrs=2")
    assert r.returncode == 2 and "workrs" in r.stderr and "num_workers" in r.stderr


def test_status_shows_scripterror(cli: Any, root: Path) -> None:
    c = spoolq.open(root)
    c.create_queue("q", script="/nonexistent")
    c.store.set_script_error("q", "script cannot start: /nonexistent: No such file")
    r = cli("status")
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("q "))
    assert "SCRIPTERROR" in line
    rows = json.loads(cli("--json", "status").stdout)["queues"]
    assert rows[0]["status"] == "SCRIPTERROR" and "No such file" in rows[0]["script_error"]


def test_webhook_help_says_what_is_posted(cli: Any) -> None:
    r = cli("send", "--help")
    text = " ".join(r.stdout.split())
    assert "POST the message's final state" in text and "until a 2xx answer" in text


@pytest.mark.parametrize("page", ["README.md"])
def test_readme_says_where_the_command_is(page: str) -> None:
    text = (Path(__file__).resolve().parent.parent / page).read_text()
    assert 'export PATH="$PWD/.venv/bin:$PATH"' in text
