"""Scandir (RQ's queue installation by symlink, spoolq/daemon/scandir.py) with the real
daemon: links create, update and delete queues, seen through inotify."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_util import serve_fixture, wait_for

import spoolq
from spoolq.errors import QueueNotFound
from spoolq.model import State


@pytest.fixture
def serve(root: Path) -> Iterator[Any]:
    yield from serve_fixture(root)


def app(tmp_path: Path, name: str, config: dict[str, Any] | None = None, text: str = "app") -> Path:
    d = tmp_path / name
    d.mkdir()
    run = d / "run"
    run.write_text(f'#!/bin/sh\necho "done {text} $RQ_PARAM1" >&3\n')
    run.chmod(0o755)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def config_of(client: spoolq.Client, name: str) -> Any:
    try:
        return client.queue_config(name)
    except QueueNotFound:
        return None


def test_links_create_update_and_delete_queues(client: spoolq.Client, serve: Any, root: Path,
                                               tmp_path: Path) -> None:
    a = app(tmp_path, "a", {"num_workers": 2})
    b = app(tmp_path, "b", text="b")
    client.create_queue("handmade", script="/bin/true")
    served = serve()
    (root / "scandir").mkdir()  # made after the start: seen too
    (root / "scandir" / "myq").symlink_to(a)
    cfg = wait_for(lambda: config_of(client, "myq"), 10, "the queue to be created")
    assert (cfg.num_workers, cfg.script) == (2, str(root.absolute() / "scandir" / "myq" / "run"))
    r = client.send("myq", param1="hi")
    assert client.wait(r, 20).status == "done - app hi"
    (a / "config.json").write_text(json.dumps({"num_workers": 3, "max_count": 4}))
    wait_for(lambda: client.queue_config("myq").num_workers == 3, 10, "the config change")
    assert client.queue_config("myq").max_count == 4
    (root / "scandir" / "myq").unlink()  # re-pointed: the next message runs the new script
    (root / "scandir" / "myq").symlink_to(b)
    wait_for(lambda: client.queue_config("myq").num_workers == 1, 10, "the new directory's config")
    assert client.wait(client.send("myq", param1="x"), 20).status == "done - b x"
    (root / "scandir" / "myq").unlink()
    wait_for(lambda: "myq" not in client.queues(), 10, "the queue to be deleted")
    assert "handmade" in client.queues()  # RQ deleted queues it had not created; not here
    wait_for(lambda: "scandir: deleted queue myq" in served.log(), 10, "the deletion logged")


def test_bad_links_and_a_busy_queue(client: spoolq.Client, serve: Any, root: Path, tmp_path: Path) -> None:
    (root / "scandir").mkdir(parents=True)
    norun = tmp_path / "norun"
    norun.mkdir()
    (root / "scandir" / "norun").symlink_to(norun)
    badcfg = app(tmp_path, "badcfg", {"num_workers": "lots"})
    (root / "scandir" / "badcfg").symlink_to(badcfg)
    (root / "scandir" / "plain").mkdir()  # not a link
    (root / "scandir" / "busy").symlink_to(app(tmp_path, "busy"))
    served = serve()
    wait_for(lambda: "busy" in client.queues(), 10, "the good link's queue")
    wait_for(lambda: all(w in served.log() for w in ("norun: no run script", "badcfg: ", "plain: not a symlink")),
             10, "each bad link reported")
    assert not {"norun", "badcfg", "plain"} & set(client.queues())
    client.set_admin_state("busy", "PAUSE")
    r = client.send("busy")
    (root / "scandir" / "busy").unlink()
    wait_for(lambda: "link gone, queue kept" in served.log(), 10, "the refusal")
    assert client.get(r).state == State.QUE  # a queue that holds work is not deleted
    client.delete(r)
    served.proc.send_signal(1)  # SIGHUP: look again
    wait_for(lambda: "busy" not in client.queues(), 10, "the queue to go once empty")
