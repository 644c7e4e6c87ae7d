"""Attachments are copies; where the filesystem shares extents (xfs with reflink, btrfs) the
copy is a reflink and costs no space. Run on a loop-mounted xfs image (loopfs.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import loopfs
from conftest import SPOOLQ

from spoolq import durable

MB = 2**20


def _free_bytes(path: Path) -> int:
    durable.syncfs(path)  # delayed allocation: count the blocks the files really take
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_attachments_are_reflinked_copies_on_xfs(tmp_path: Path) -> None:
    with loopfs.fresh_mount("xfs", tmp_path) as fs:
        root = fs.mnt / "spool"

        def spoolq(*args: str) -> str:
            r = subprocess.run([SPOOLQ, "--root", str(root), *args], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            return r.stdout

        spoolq("queue", "create", "q", "--script", "/bin/true")
        src = fs.mnt / "data.bin"
        data = os.urandom(MB) * 32
        src.write_bytes(data)
        before = _free_bytes(fs.mnt)
        ids = [json.loads(spoolq("--json", "send", "q", "--attach", str(src)))["msg_id"] for _ in range(3)]
        used = before - _free_bytes(fs.mnt)
        # Three copies of 32 MiB would take 96 MiB; reflinks take a few blocks of metadata.
        assert used < 8 * MB, f"{used / MB:.1f} MiB used by three attachments of 32 MiB"
        with open(src, "r+b") as f:  # copy-on-write: the stored copies keep the old data
            f.write(b"changed")
        for msg_id in ids:
            (stored,) = (root / "queue" / "q" / "que").glob(f"*/*/*/{msg_id}/attach/data.bin")
            assert stored.stat().st_ino != src.stat().st_ino
            assert hashlib.md5(stored.read_bytes()).hexdigest() == hashlib.md5(data).hexdigest()
