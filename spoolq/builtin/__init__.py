"""spoolq's built-in queues, RQ's five (``relay``, ``webhook``, ``cleaner``, ``rq_router``,
``debug``): their scripts (the modules beside this file, run as queue scripts) and the queues
themselves, made at a root's first start and again whenever one is needed and missing."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import QueueExists
from ..model import QueueConfig
from ..store.base import Store

log = logging.getLogger("spoolq")

RELAY_QUEUE = "relay"
ROUTER_QUEUE = "rq_router"
MARKER = ".builtin-queues"  # in the home: the first start made the built-in queues


@dataclass(frozen=True)
class Builtin:
    name: str
    num_workers: int
    package: bool = False  # the script imports spoolq (runs with site-packages)
    timeout: int | None = None


BUILTINS = {b.name: b for b in (
    Builtin("relay", 4, timeout=3600),  # a far end that answers a byte a minute holds a slot an hour at most
    Builtin("webhook", 4),
    Builtin("cleaner", 1, package=True),
    Builtin("rq_router", 4),
    Builtin("debug", 1),
)}
# Made at the first start. rq_router only when its rules file exists (without rules every
# message would end in err), see ensure_router_queue.
FIRST_START = ("relay", "webhook", "cleaner", "debug")


def script(home: Path, name: str) -> Path:
    """``<home>/scripts/<name>``: runs ``spoolq/builtin/<name>.py`` with this Python (made or
    rewritten when it says something else). A script that needs the standard library only
    imports its module from its directory, not as part of the package, with ``-IS``: a start
    without spoolq's imports and site takes 65 ms instead of 300 ms (one start per message),
    its bytecode cached as any import's. The cleaner, which uses the store, imports spoolq."""
    sdir = home / "scripts"
    sdir.mkdir(parents=True, exist_ok=True)
    path = sdir / name
    if BUILTINS.get(name, Builtin(name, 1)).package:
        text = f"#!{sys.executable}\nfrom spoolq.builtin.{name} import main\nraise SystemExit(main())\n"
    else:
        here = str(Path(__file__).resolve().parent)
        text = (f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {here!r})\n"
                f"import {name}\nraise SystemExit({name}.main())\n")
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


def ensure_queue(store: Store, home: Path, name: str) -> bool:
    """The built-in queue ``name`` with spoolq's script for it, if there is no queue of that
    name (one there is left as it is); True when it was made."""
    b = BUILTINS[name]
    if name in store.queues():
        return False
    try:
        store.create_queue(QueueConfig.from_dict({"name": name, "script": str(script(home, name)),
                                                  "num_workers": b.num_workers,
                                                  **({"timeout": b.timeout} if b.timeout else {})}))
    except QueueExists:
        return False
    log.info("created the built-in queue %s", name)
    return True


def first_start(store: Store, home: Path) -> list[str]:
    """At a root's first start (no ``<home>/.builtin-queues``), make the built-in queues, as
    RQ's install does; later starts leave them alone, so one deleted stays deleted (until it
    is needed: a relay makes ``relay`` again). Returns the names made."""
    marker = home / MARKER
    if marker.exists():
        return []
    made = [name for name in FIRST_START if ensure_queue(store, home, name)]
    marker.write_text("the built-in queues were made at the first start; delete this file to make "
                      "missing ones again at the next start\n")
    return made


def target_queue(store: Store, home: Path, dest: str) -> str:
    """The local queue a copy for ``dest`` goes to: ``relay`` (made if needed) for an http
    dest, else the queue ``dest`` names (``q/name``, ``/name/`` and ``name`` alike)."""
    if dest.startswith("http"):
        ensure_relay_queue(store, home)
        return RELAY_QUEUE
    return dest.strip("/").removeprefix("q/")


def ensure_relay_queue(store: Store, home: Path) -> None:
    """The ``relay`` queue with spoolq's relay (spoolq/builtin/relay.py), if there is none."""
    ensure_queue(store, home, RELAY_QUEUE)


def router_rules(home: Path) -> Path:
    """RQ's rules file: ``<home>/config/rq_router_rules.rb``."""
    return home / "config" / "rq_router_rules.rb"


def ensure_router_queue(store: Store, home: Path) -> bool:
    """The ``rq_router`` queue, when its rules file exists and the queue does not."""
    return router_rules(home).exists() and ensure_queue(store, home, ROUTER_QUEUE)
