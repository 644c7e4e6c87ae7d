"""The native relay (spoolq/builtin/relay.py): a message whose dest is another spoolq's
queue URL crosses over HTTP with its attachment (md5-checked), ends relayed there with
the far id, and the far message runs. RQ's own relay tests run in test_rq_setup.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

from daemon_util import Served

import spoolq
from spoolq.builtin import ensure_relay_queue
from spoolq.model import State


def test_relay_to_another_spoolq(tmp_path: Path) -> None:
    a_root, b_root = tmp_path / "a" / "spool", tmp_path / "b" / "spool"
    a_root.parent.mkdir()
    b_root.parent.mkdir()
    a, b = spoolq.open(a_root), spoolq.open(b_root)
    b.create_queue("inbox", script="/bin/true")
    ensure_relay_queue(a.store, a_root)
    far = Served(b_root, "--trust-loopback", http=True).start()
    near = Served(a_root).start()
    try:
        blob = tmp_path / "blob.bin"
        blob.write_bytes(bytes(range(256)) * 4096)
        r = a.send("relay", dest=f"http://127.0.0.1:{far.port}/q/inbox", param1="hello", src="a-test",
                   attachments=[str(blob)])
        v = a.wait(r, 60)
        assert v.state == State.RELAYED, v.status
        far_id = v.job_status
        assert far_id.startswith(f"http://127.0.0.1:{far.port}/q/inbox/")
        w = b.wait(f"inbox/{far_id.rsplit('/', 1)[1]}", 30)
        assert (w.state, w.message.param1, w.message.src, w.message.count) == (State.DONE, "hello", "a-test", 1)
        assert w.message.orig_msg_id == spoolq.open(a_root).full_id("relay", r.msg_id)  # the first
        with b.open_attachment(f"inbox/{w.msg_id}", "blob.bin") as f:
            assert hashlib.md5(f.read()).hexdigest() == hashlib.md5(blob.read_bytes()).hexdigest()  # noqa: S324
        assert b.counts("inbox")["done"] == 1  # one far message, not one per try
        assert "attempting remote" in a.open_log(r).read().decode()
    finally:
        near.stop()
        far.stop()
