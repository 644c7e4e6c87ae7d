"""Disk faults injected into the real `spoolq` command give a clear error and store nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Cli

from spoolq.cli import exitcodes


def queued(root: Path) -> list[Path]:
    return [p for p in (root / "queue" / "q" / "que").glob("*/*/*/*") if p.is_dir()]


@pytest.fixture
def qcli(cli: Cli) -> Cli:
    assert cli("queue", "create", "q", "--script", "/bin/true").returncode == 0
    return cli


@pytest.mark.parametrize("fault,text", [("write:ENOSPC", "disk full"), ("fsync:EIO", "Input/output error"),
                                        ("rename:EIO:0", "Input/output error"), ("fsync:ENOSPC:1", "disk full")])
def test_send_under_disk_faults(qcli: Cli, root: Path, tmp_path: Path, fault: str, text: str) -> None:
    att = tmp_path / "a.txt"
    att.write_text("x" * 1000)
    r = qcli("send", "q", "--param1", "x", "--attach", str(att), env={"SPOOLQ_FAULT_INJECT": fault})
    assert r.returncode == exitcodes.STORAGE, r.stderr
    assert text in r.stderr and "cannot store message in q" in r.stderr
    assert queued(root) == []
    assert list((root / "queue" / "q" / ".tmp").iterdir()) == []
    ok = qcli("send", "q", "--param1", "after")
    assert ok.returncode == 0 and len(queued(root)) == 1


def test_bulk_send_under_disk_fault_is_all_or_nothing(qcli: Cli, root: Path) -> None:
    lines = "".join(f"line {i}\n" for i in range(500))
    r = qcli("send", "q", "--from-file", "-", input=lines, env={"SPOOLQ_FAULT_INJECT": "rename:EIO:100"})
    assert r.returncode == exitcodes.STORAGE, r.stderr
    assert queued(root) == []
