"""The ``rq_router`` queue's script: route a message by RQ's rules (rq-spec 5.4, RQ's
``default_scripts/rq_router/rq_router_script.rb``), read with spoolq's safe parser
(spoolq/router.py) instead of Ruby's ``instance_eval``.

The rules are ``<home>/config/rq_router_rules.rb``. The first rule whose ``src`` and ``dest``
patterns match the message decides:

- ``done`` / ``err``: the message ends so (``router processed a done`` / ``an err``);
- ``balance``: one copy to one host of ``route``, picked at random (``dup 0-X-<dest>``, the
  dest's host swapped by RQ's ``txform_host``), then ``done DUP to <id>``;
- ``relay``: one copy per host (one of each inner list), then ``done done relay of N
  messages``. Each copy made is recorded in ``job/router_dups`` (by its place in the
  route) before the next, so a try that runs again after a crash makes only the copies
  still missing (RQ's made them all again); a crash in the instant between the daemon
  making a copy and the record can still make that one copy twice.

``delay N`` waits N seconds first; ``log true`` (forced for ``err``) appends a line to
``<home>/log/rq_router.log``. A rules file that cannot be read sends the message to err and
writes ``<home>/config/rq_router.down`` (RQ's flag file: the queue goes DOWN until it is
fixed and the flag removed), as RQ's script does. A run longer than 60 s is stopped (RQ's
alarm).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

RULES = Path("config") / "rq_router_rules.rb"
DOWN_FLAG = Path("config") / "rq_router.down"
LOG = Path("log") / "rq_router.log"
DUPS_FILE = "router_dups"
ALARM_S = 60


def _router() -> ModuleType:
    """spoolq/router.py, loaded by its path: this script runs without the spoolq package."""
    name = "spoolq_router_rules"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "router.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # before it runs: dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def status(line: str) -> None:
    os.write(3, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    print(f"{os.getpid()} - {time.strftime('%Y-%m-%d %H:%M:%S')} - {line}", flush=True)


def read_reply(reply: Any) -> tuple[str, str]:
    line = reply.readline().decode("utf-8", "replace").strip()
    word, _, rest = line.partition(" ")
    return word, rest


def _one_line(value: object) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(value))


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def route(home: Path, msg: dict[str, Any], jobdir: Path, reply: Any) -> int:
    rules_path = home / RULES
    router = _router()
    try:
        rules = router.load(rules_path, os.environ)
    except (OSError, router.RulesError) as e:
        (home / DOWN_FLAG).parent.mkdir(parents=True, exist_ok=True)
        (home / DOWN_FLAG).write_text("bad rules file\n")
        why = e.strerror if isinstance(e, OSError) else str(e)
        status(f"err Bad rule file at: {rules_path} ({why})")
        return 1
    rule = rules.first_match(msg)
    if rule.log or rule.action == "err":
        (home / LOG).parent.mkdir(parents=True, exist_ok=True)
        fields = (rule.desc, rule.action, msg.get("msg_id", ""), msg.get("src", ""))
        with open(home / LOG, "a") as f:  # one line each: a sender's src cannot forge another
            f.write(f"{os.getpid()} - {time.strftime('%Y-%m-%d %H:%M:%S %z')} - "
                    + " - ".join(_one_line(v) for v in fields) + "\n")
    if rule.delay > 0:
        status(f"run router delay {rule.delay} seconds")
        time.sleep(rule.delay)
    if rule.action == "done":
        status("done router processed a done")
        return 0
    if rule.action != "balance" and rule.action != "relay":
        status("err router processed an err")
        return 1
    dest = str(msg.get("dest") or "")
    dups_file = jobdir / DUPS_FILE
    # Keyed by the copy's place in the route (its host, or its list in a list of lists: a
    # retry picks at random again, and a list already served must not get a second copy).
    made: dict[str, str] = json.loads(dups_file.read_text()) if dups_file.exists() else {}
    hosts = rule.select_hosts()[:1] if rule.action == "balance" else rule.select_hosts()
    grouped = rule.action == "balance" or bool(rule.route and isinstance(rule.route[0], list))
    for i, host in enumerate(hosts):
        key = f"#{i}" if grouped else host
        if key in made:
            status(f"run DUP relay to {made[key]} (made by an earlier try)")
            continue
        new_dest = router.txform_host(dest, host)
        status(f"dup 0-X-{new_dest}")
        word, new_id = read_reply(reply)
        if word != "ok":
            status(f"err DUP {'relay ' if rule.action == 'relay' else ''}failed - {new_id}")
            return 1
        made[key] = new_id
        _fsync_write(dups_file, json.dumps(made))
        if rule.action == "balance":
            status(f"done DUP to {new_id}")
            return 0
        status(f"run DUP relay to {new_id}")
    status(f"done done relay of {len(hosts)} messages")
    return 0


def main() -> int:
    def too_long(signum: int, frame: Any) -> None:
        print(f"{os.getpid()}: program took too long ({ALARM_S} secs). Goodbye", flush=True)
        os._exit(2)

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(ALARM_S)
    home = Path(os.environ.get("SPOOLQ_ROOT", "."))
    msg_dir = Path(os.environ.get("SPOOLQ_MESSAGE_DIR", ".."))
    msg = json.loads((msg_dir / "msg").read_text())
    msg.setdefault("msg_id", os.environ.get("RQ_MSG_ID", ""))
    with os.fdopen(4, "rb", buffering=0) as reply:
        return route(home, msg, Path.cwd(), reply)


if __name__ == "__main__":
    sys.exit(main())
