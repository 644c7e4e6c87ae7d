"""fsq 0.2.5, the original (PyPI, with its own ``bin/fsq`` and ``libexec/fsq`` tools), under
Python 2.7, against spoolq on the same directories (spec A; docs/fsq.md):

- items fsq's ``fsq enqueue`` and ``fsq.senqueue`` make are run by spoolq's daemon (kind fsq)
  and by ``spoolq fsq scan``;
- items spoolq makes are run by fsq's own ``fsq scan``;
- fsq's construct/deconstruct and spoolq's agree on tricky names, both ways;
- queues installed by either are used by the other.

``scripts/bootstrap.sh test`` installs fsq into ``.venv/peers/fsq-0.2.5`` where a python2.7
exists; without one these tests skip and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SPOOLQ
from daemon_util import Served, daemons, wait_for

import spoolq
from spoolq import fsq

PEER = Path(__file__).resolve().parent.parent / ".venv" / "peers" / "fsq-0.2.5"
PY2 = (PEER / "python").read_text().strip() if (PEER / "python").exists() else ""

pytestmark = pytest.mark.skipif(
    not PY2 or not os.access(PY2, os.X_OK),
    reason="fsq 0.2.5 under Python 2.7 is not installed (no python2.7 on this machine, or "
           "scripts/bootstrap.sh test could not install it): fsq's interop tests skipped")


@pytest.fixture
def fsq_root(tmp_path: Path) -> Path:
    r = tmp_path / "fsq"
    r.mkdir()
    return r


@pytest.fixture
def conf(fsq_root: Path) -> fsq.Conf:
    return fsq.Conf.from_env({}, root=str(fsq_root))


def py2_env(fsq_root: Path, **extra: str) -> dict[str, str]:
    # fsq binds FSQ_ROOT when imported (its -r option does not work): the environment it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSQ_", "PYTHON", "PYENV"))}
    env.update({"FSQ_ROOT": str(fsq_root), "PYTHONPATH": str(PEER), "LC_ALL": "C.UTF-8", **extra})
    return env


def fsq_tool(fsq_root: Path, *args: str, input: bytes | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """fsq's own command line: ``bin/fsq`` with its ``libexec/fsq`` subcommands."""
    return subprocess.run([PY2, str(PEER / "bin" / "fsq"), "-e", str(PEER / "libexec" / "fsq"), *args],
                          input=input, env=py2_env(fsq_root, **(env or {})), capture_output=True, timeout=60)


def fsq_py(fsq_root: Path, code: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PY2, "-c", code], env=py2_env(fsq_root), capture_output=True, timeout=60)


def spoolq_fsq(conf: fsq.Conf, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FSQ_")}
    return subprocess.run([SPOOLQ, "fsq", "-r", conf.root, *args], env={**e, **(env or {})},
                          capture_output=True, timeout=60)


def listing(conf: fsq.Conf, q: str, which: str) -> list[str]:
    return sorted(os.listdir(fsq.Paths(conf, q).sub(which)))


RECORD = """#!/bin/sh
printf '%s|%s|%s|%s\\n' "$FSQ_ITEM_ID" "$*" "$(cat)" "$FSQ_ITEM_TRIES" >> "$OUT"
"""


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "runs"
    p = tmp_path / "record.sh"
    p.write_text(RECORD)
    p.chmod(0o755)
    return p, out


def test_names_agree_both_ways(conf: fsq.Conf) -> None:
    vectors = [["a_b", "c/d", "e%f"], ["has space", "ø", ""], ["..", ".", "x"], ["%%__//"], []]
    code = ("import json, sys\nfrom fsq import construct, deconstruct, encode\n"
            f"vs = json.loads({json.dumps(vectors)!r})\n"
            "out = []\n"
            "for v in vs:\n"
            "    n = construct(v)\n"
            "    out.append([n, deconstruct(n)[1], encode(u'abc', encoded=(u'a',))])\n"
            "sys.stdout.write(json.dumps(out))\n")
    r = fsq_py(Path(conf.root), code)
    assert r.returncode == 0, r.stderr.decode()
    theirs = json.loads(r.stdout)
    for v, (name, back, enc) in zip(vectors, theirs, strict=True):
        assert fsq.construct(v) == name
        assert fsq.deconstruct(name)[1] == back == v
        assert fsq.encode("abc", encoded=("a",)) == enc
    # a name fsq cannot parse is refused by both
    r = fsq_py(Path(conf.root), "from fsq import decode\ntry:\n decode(u'ab%')\nexcept Exception as e:\n"
                                " print(type(e).__name__)")
    assert r.stdout.strip() == b"FSQEncodeError"
    with pytest.raises(fsq.EncodeError):
        fsq.decode("ab%")


def test_fsq_tools_enqueue_and_spoolq_scan_runs(conf: fsq.Conf, recorder: tuple[Path, Path]) -> None:
    prog, out = recorder
    r = fsq_tool(Path(conf.root), "install", "q")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(Path(conf.root, "q"))) == ["done", "fail", "queue", "tmp"]
    r = fsq_tool(Path(conf.root), "enqueue", "q", "x y", "a_b", input=b"from fsq's tool")
    assert r.returncode == 0, r.stderr
    r = fsq_py(Path(conf.root), "import fsq\nprint(fsq.senqueue('q', 'from fsq.senqueue', 'p/q'))")
    assert r.returncode == 0, r.stderr
    ids = listing(conf, "q", "queue")
    assert len(ids) == 2
    r = spoolq_fsq(conf, "scan", "q", str(prog), "first", env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    got = sorted(out.read_text().splitlines())
    assert sorted(line.split("|")[1:] for line in got) == [["first p/q", "from fsq.senqueue", "0"],
                                                           ["first x y a_b", "from fsq's tool", "0"]]
    assert listing(conf, "q", "done") == ids


def test_spoolq_enqueues_and_fsq_scan_runs(conf: fsq.Conf, recorder: tuple[Path, Path]) -> None:
    prog, out = recorder
    r = spoolq_fsq(conf, "install", "q")
    assert r.returncode == 0
    a = fsq.enqueue(conf, "q", b"spoolq's content", ["x y", "a_b", "p/q"])
    b = spoolq_fsq(conf, "enqueue", "-e", "q", "two").stdout.decode().strip()
    r = fsq_tool(Path(conf.root), "scan", "-v", "q", str(prog), "first", env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines == sorted([f"{a}|first x y a_b p/q|spoolq's content|0", f"{b}|first two||0"])
    assert listing(conf, "q", "done") == sorted([a, b])
    # fsq's fail_tmp on an item spoolq made: tries 0 -> 1 in the name, as spoolq's does
    c = fsq.enqueue(conf, "q", b"", ["again"])
    r = fsq_tool(Path(conf.root), "scan", "-m", "3", "q", "sh", "-c", "exit 111")
    assert r.returncode == 0, r.stderr
    assert listing(conf, "q", "queue") == [fsq.outcome_name(c, 1)]
    [item] = list(fsq.scan(conf, "q", max_tries=3))
    assert item.tries == 1 and item.arguments == ("again",)


def test_fsq_scan_skips_an_item_spoolq_holds(conf: fsq.Conf, recorder: tuple[Path, Path]) -> None:
    prog, out = recorder
    fsq.install(conf, "q")
    held_id = fsq.enqueue(conf, "q", b"held")
    free_id = fsq.enqueue(conf, "q", b"free")
    held = fsq.take(conf, "q", held_id)
    assert held is not None
    r = fsq_tool(Path(conf.root), "scan", "q", str(prog), env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    assert [line.split("|")[0] for line in out.read_text().splitlines()] == [free_id]
    held.success()
    held.close()
    assert listing(conf, "q", "done") == sorted([held_id, free_id])


@pytest.fixture
def daemon(root: Path) -> Iterator[Callable[..., Served]]:
    yield from daemons(root, "--no-builtin-queues", "--grace", "1")


def test_the_daemon_runs_what_fsq_enqueues(client: spoolq.Client, conf: fsq.Conf, recorder: tuple[Path, Path],
                                           daemon: Callable[..., Served]) -> None:
    """The issue's interop: fsq's own tools enqueue (with its trigger), spoolq's daemon runs
    the items in parallel, and they end in fsq's done/ and fail/ where fsq's users look."""
    prog, out = recorder
    r = fsq_tool(Path(conf.root), "install", "-t", "jobs")
    assert r.returncode == 0, r.stderr
    client.create_queue("jobs", kind="fsq", script=str(prog), fsq_dir=os.path.join(conf.root, "jobs"), num_workers=4)
    daemon(env={"OUT": str(out)})
    # -t: fsq's enqueue pulls the trigger, and fails when nothing listens; the daemon listens
    wait_for(lambda: fsq_tool(Path(conf.root), "enqueue", "-e", "-t", "jobs", "probe").returncode == 0,
             what="fsq's enqueue -t to find the daemon listening")
    for i in range(20):
        r = fsq_tool(Path(conf.root), "enqueue", "jobs", str(i), input=b"n%d" % i)
        assert r.returncode == 0, r.stderr
    wait_for(lambda: len(listing(conf, "jobs", "done")) == 21, what="21 items in done/")
    assert listing(conf, "jobs", "queue") == []
    runs = sorted(line.split("|")[1:3] for line in out.read_text().splitlines())
    assert runs == sorted([["probe", ""]] + [[str(i), f"n{i}"] for i in range(20)])
    wait_for(lambda: client.counts("jobs").get("done") == 21, what="counts")
    # and fsq's own scan sees nothing left to do, nor any item twice
    r = fsq_tool(Path(conf.root), "scan", "jobs", "false")
    assert r.returncode == 0 and listing(conf, "jobs", "fail") == []
