"""Many real producer processes at once, and producers SIGKILLed at random moments."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import spoolq
from spoolq.ids import MSG_ID_RE
from spoolq.model import State

PRODUCER = r"""
import sys, spoolq
root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = spoolq.open(root)
for i in range(n):
    c.send("q", param1=tag, param2=str(i))
"""

# Sends forever: single messages with a streamed attachment, and batches.
KILLABLE = r"""
import io, sys, spoolq
from spoolq.store import AttachmentSource
root, tag = sys.argv[1], sys.argv[2]
c = spoolq.open(root)
i = 0
while True:
    i += 1
    payload = (tag + str(i)).encode() * 5000
    c.send("q", param1=tag, param2=str(i),
           attachments=[AttachmentSource(name="data.bin", stream=io.BytesIO(payload))])
    c.send_many("q", [{"param1": tag, "param2": f"{i}.{k}"} for k in range(20)])
    m = c.prep("q", param1=tag, param2=f"prep{i}")
    c.attach(m, stream=io.BytesIO(payload), name="late.bin")
    c.commit(m)
"""


def all_message_dirs(root: Path) -> list[tuple[str, Path]]:
    out = []
    for st in State:
        out += [(str(st), p) for p in (root / "queue" / "q" / str(st)).glob("*/*/*/*") if p.is_dir()]
    return out


def assert_complete(dirs: list[tuple[str, Path]]) -> None:
    """Every visible message is whole: a parseable msg, attachments matching their md5."""
    for state, p in dirs:
        assert state in ("que", "prep")
        m = json.loads((p / "msg").read_text())
        assert m["param1"].startswith("r")
        for att in (p / "attach").glob("*") if (p / "attach").is_dir() else []:
            if att.name.startswith("."):
                continue
            meta = json.loads((p / "attach" / f".{att.name}.json").read_text())
            data = att.read_bytes()
            assert hashlib.md5(data).hexdigest() == meta["md5"] and len(data) == meta["size"]
        if state == "que" and m["param2"].startswith("prep"):
            assert (p / "attach" / "late.bin").is_file()  # committed only after its attachment


def test_eight_parallel_producers_never_collide(root: Path) -> None:
    client = spoolq.open(root)
    client.create_queue("q", script="/bin/true")
    procs = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(root), f"p{k}", "1000"]) for k in range(8)]
    for p in procs:
        assert p.wait(timeout=600) == 0
    dirs = all_message_dirs(root)
    assert len(dirs) == 8000
    ids = [p.name for _, p in dirs]
    assert len(set(ids)) == 8000 and all(MSG_ID_RE.match(i) for i in ids)
    seen = set()
    for _, mdir in dirs:
        m = json.loads((mdir / "msg").read_text())  # complete, parseable
        seen.add((m["param1"], m["param2"]))
    assert seen == {(f"p{k}", str(i)) for k in range(8) for i in range(1000)}
    assert client.counts("q")["que"] == 8000
    assert client.recount("q")["que"] == 8000


def test_producers_killed_at_random_moments_leave_nothing_half_visible(root: Path) -> None:
    client = spoolq.open(root)
    client.create_queue("q", script="/bin/true")
    rng = random.Random(1234)
    for round_ in range(25):
        before = len(all_message_dirs(root))
        procs = [subprocess.Popen([sys.executable, "-c", KILLABLE, str(root), f"r{round_}p{k}"]) for k in range(2)]
        # Wait until they are sending (imports take long on a loaded CI machine), then kill
        # them at a random moment mid-stream.
        deadline = time.monotonic() + 30
        while len(all_message_dirs(root)) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.3)
        for p in procs:
            time.sleep(rng.random() * 0.05)
            p.send_signal(signal.SIGKILL)
            p.wait()
    dirs = all_message_dirs(root)
    assert dirs, "the producers should have stored something before being killed"
    assert_complete(dirs)
    # Debris of the dead producers is swept (half-written attachments of prep messages
    # included); what is visible is what is counted. A complete staged message (a producer
    # killed between its last fsync and its rename, or a batch cut off mid-publish) is put
    # into its state instead: it was never acknowledged, and now appears (at-least-once).
    # Sweep leaves a dead producer's staging directory alone for its first second
    # (store/fs/debris.py), so the last round's must age.
    time.sleep(1.1)
    res = client.sweep("q")
    assert list((root / "queue" / "q" / ".tmp").iterdir()) == []
    assert res.problems == []
    after = all_message_dirs(root)
    assert len(after) == len(dirs) + len(res.recovered)
    assert_complete(after)
    assert [a for _, p in after for a in p.glob("attach/.*.tmp")] == []
    counts = client.recount("q")
    assert counts["que"] + counts["prep"] == len(after)
    # every visible queued message can be read through the API
    listed, cursor = 0, None
    while True:
        page = client.list("q", State.QUE, limit=5000, cursor=cursor)
        assert page.problems == []
        listed += len(page.items)
        if not (cursor := page.next_cursor):
            break
    assert listed == counts["que"]
