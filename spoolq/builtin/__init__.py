"""The scripts of spoolq's built-in queues (``webhook``, ``relay``), run as queue scripts,
and the queues themselves, made when first needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import QueueExists
from ..model import QueueConfig
from ..store.base import Store

RELAY_QUEUE = "relay"


def script(home: Path, name: str) -> Path:
    """``<home>/scripts/<name>``: runs ``spoolq/builtin/<name>.py`` with this Python (made or
    rewritten when it says something else). The file runs by its path, not as part of the
    package: these scripts need the standard library only, and a start without spoolq's
    imports takes a third of the time (one start per message)."""
    sdir = home / "scripts"
    sdir.mkdir(parents=True, exist_ok=True)
    path = sdir / name
    module = Path(__file__).resolve().parent / f"{name}.py"
    text = f"#!{sys.executable} -I\nimport runpy\nrunpy.run_path({str(module)!r}, run_name='__main__')\n"
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    tmp = sdir / f".{name}.tmp"
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.rename(tmp, path)
    return path


def target_queue(store: Store, home: Path, dest: str) -> str:
    """The local queue a copy for ``dest`` goes to: ``relay`` (made if needed) for an http
    dest, else the queue ``dest`` names (``q/name``, ``/name/`` and ``name`` alike)."""
    if dest.startswith("http"):
        ensure_relay_queue(store, home)
        return RELAY_QUEUE
    return dest.strip("/").removeprefix("q/")


def ensure_relay_queue(store: Store, home: Path) -> None:
    """The ``relay`` queue with spoolq's relay (spoolq/builtin/relay.py), if there is none."""
    if RELAY_QUEUE in store.queues():
        return
    try:
        store.create_queue(QueueConfig.from_dict({"name": RELAY_QUEUE, "script": str(script(home, "relay")),
                                                  "num_workers": 4}))
    except QueueExists:
        pass
