"""Real filesystems of a chosen kind on loop-mounted image files, for tests that depend on
how a filesystem behaves (power-cut copies, reflinks). Needs root, loop devices and the
mkfs tools; :func:`require` skips the test with the reason when something is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class FsKind:
    """How to make, check and mount one kind of filesystem image."""

    name: str
    mkfs: tuple[str, ...]
    size_mb: int
    fsck: tuple[str, ...] | None  # run on a copy before it is mounted; None: mount replays the log
    copy_mount_opts: str = ""  # extra mount options for a copy mounted beside its original


# Small images with many inodes; no lazy init, so no kernel thread writes behind the test.
_EXT4 = ("mkfs.ext4", "-q", "-F", "-i", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0")
KINDS = {
    "ext4-journal": FsKind("ext4-journal", (*_EXT4, "-O", "has_journal"), 96, ("e2fsck", "-fy")),
    "ext4-nojournal": FsKind("ext4-nojournal", (*_EXT4, "-O", "^has_journal"), 96, ("e2fsck", "-fy")),
    # 300 MB is mkfs.xfs's minimum; the image file is sparse. A copy has its original's
    # UUID, which xfs refuses to mount twice without nouuid.
    "xfs": FsKind("xfs", ("mkfs.xfs", "-q", "-f"), 300, None, "nouuid"),
}


def require(kind: FsKind) -> None:
    """Skip the calling test, saying why, unless loop-mounting ``kind`` can work here."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount loop devices")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here (/dev/loop-control is missing)")
    for tool in ("mount", "umount", kind.mkfs[0], *(kind.fsck[:1] if kind.fsck else ())):
        if shutil.which(tool) is None:
            pkg = "xfsprogs" if "xfs" in tool else "e2fsprogs" if tool.startswith(("mkfs.ext", "e2")) else tool
            pytest.skip(f"{tool} is not installed (apt-get install {pkg}; scripts/bootstrap.sh test does)")


@contextmanager
def image_dir(fallback: Path) -> Iterator[Path]:
    """A directory for image files: on /dev/shm when it is a tmpfs (copies cost nothing and
    the device flushes of the filesystem under test never reach a disk), else ``fallback``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="spoolq-loopfs-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield fallback


@dataclass(frozen=True)
class Mounted:
    """A fresh filesystem of ``kind`` in ``image``, mounted on ``mnt``; ``work`` holds both."""

    kind: FsKind
    work: Path
    image: Path
    mnt: Path


@contextmanager
def fresh_mount(kind_name: str, fallback: Path) -> Iterator[Mounted]:
    """Make a filesystem of kind ``kind_name`` and mount it for the test (skipping it when
    that cannot work here, see :func:`require`); unmounted and removed afterwards."""
    kind = KINDS[kind_name]
    require(kind)
    with image_dir(fallback) as work:
        m = Mounted(kind, work, work / "fs.img", work / "live")
        make_image(kind, m.image)
        mount(m.image, m.mnt)
        try:
            yield m
        finally:
            if is_mounted(m.mnt):
                umount(m.mnt)


def _run(argv: list[str] | tuple[str, ...], what: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"{what} failed here ({' '.join(argv)} exited {r.returncode}: {r.stderr.strip()})")
    return r


def make_image(kind: FsKind, path: Path) -> None:
    """A fresh, empty filesystem of ``kind`` in the (sparse) file ``path``."""
    with open(path, "wb") as f:
        f.truncate(kind.size_mb * 2**20)
    _run([*kind.mkfs, str(path)], f"mkfs of {kind.name}")


def mount(image: Path, mnt: Path, opts: str = "") -> None:
    """Mount ``image`` on ``mnt`` through a loop device (freed again by :func:`umount`)."""
    mnt.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-o", ",".join(filter(None, ["loop", opts])), str(image), str(mnt)], "mount -o loop")


def umount(mnt: Path, timeout: float = 20) -> None:
    """Unmount ``mnt``. A process that is still leaving it (or udev probing a new loop
    device) keeps it busy for a moment: try again until it is free."""
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        if r.returncode == 0 or not os.path.ismount(mnt):
            return
        if time.monotonic() > deadline:
            users = subprocess.run(["fuser", "-vm", str(mnt)], capture_output=True, text=True)
            raise AssertionError(f"cannot unmount {mnt}: {r.stderr.strip()}\n{users.stdout}{users.stderr}")
        time.sleep(0.1)


def is_mounted(mnt: Path) -> bool:
    return os.path.ismount(mnt)


def copy_image(src: Path, dst: Path) -> None:
    """Copy an image file as it is this instant (holes stay holes): what the disk holds at a
    power cut. Nothing is synced first: what the mounted filesystem has not written to its
    device is not in the copy."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True, timeout=60)


def fsck(kind: FsKind, image: Path) -> str:
    """Repair a copy as a boot after a power cut would (journal replay, e2fsck -fy); returns
    fsck's output. Fails the test when fsck cannot repair it (exit status 4 or more)."""
    if kind.fsck is None:
        return ""
    r = subprocess.run([*kind.fsck, str(image)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode < 4, f"{' '.join(kind.fsck)} could not repair the copy (exit {r.returncode}):\n{out}"
    return out


def process_stopped(pid: int) -> bool:
    """Is every thread of ``pid`` stopped (or the process gone)? A SIGSTOP takes effect only
    once a thread leaves the system call it is in, so a sender may finish an fsync first."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def message_dirs_in(lost_found: Path) -> list[Path]:
    """Directories at most four levels down in ``lost_found`` that hold a spoolq message (a
    ``msg`` that parses and names an id): a message e2fsck reconnected there, or the
    messages of a batch, bucket or state directory it reconnected."""
    out: list[Path] = []

    def walk(p: Path, depth: int) -> None:
        try:
            msg = json.loads((p / "msg").read_bytes())
            if isinstance(msg, dict) and msg.get("msg_id"):
                out.append(p)
                return
        except (OSError, ValueError):
            pass
        if depth > 0:
            for c in sorted(p.iterdir()):
                if stat.S_ISDIR(c.lstat().st_mode):
                    walk(c, depth - 1)

    if lost_found.is_dir():
        for p in sorted(lost_found.iterdir()):
            if stat.S_ISDIR(p.lstat().st_mode):
                walk(p, 3)
    return out
