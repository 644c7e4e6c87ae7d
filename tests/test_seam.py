"""The store seam (issue 8): only ``spoolq/store/`` knows the spool's paths and layout.

Everything else (client, CLI, HTTP, daemon, runner) must reach messages through the Store
protocol, so that a PostgreSQL store can stand in for the filesystem. This test walks the
AST of every module outside ``spoolq/store/`` and lists what crosses the seam:

- imports of the filesystem store (``FsStore``, anything in ``spoolq/store/fs/``);
- ``.store.<attr>`` chains in the CLI and HTTP (reaching past the client into its store),
  and anywhere for an attribute that is not part of the ``Store`` protocol (``store/base.py``);
- filesystem-only operations and knobs: ``message_dir``, ``qdir``, ``qroot``, and
  ``move(..., sync=, current=)``.

Today's crossings are in ``seam_allowlist.txt`` (docs/plans/store-seam.md says which
protocol operation replaces each). The test fails on any crossing not listed (a new leak)
and on any listed one that is gone (shrink the list: it only ever gets shorter).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "spoolq"
ALLOWLIST = Path(__file__).with_name("seam_allowlist.txt")

FS_NAMES = {"FsStore"}
FS_ATTRS = {"message_dir", "qdir", "qroot"}
FS_KNOBS = {"sync", "current"}
PAST_THE_CLIENT = ("spoolq/cli/", "spoolq/http/")


CAPABILITIES = {"LostFoundRepair", "LocalSpool", "LocalWork", "LiveRecounts", "DispatchParts"}
"""Optional protocols of store/base.py, used behind an ``isinstance`` check."""


def protocol_names() -> set[str]:
    """The methods and attributes of the ``Store`` protocol class and its capabilities."""
    tree = ast.parse((PKG / "store" / "base.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in {"Store"} | CAPABILITIES:
            names |= {n.name for n in node.body if isinstance(n, ast.FunctionDef)} | {
                n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    if "claim" not in names:
        raise AssertionError("no class Store in store/base.py")
    return names


PROTOCOL = protocol_names()


def crossings(path: Path, root: Path = ROOT) -> Counter[str]:
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), str(path))
    found: Counter[str] = Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if "store" in parts:
                tail = parts[parts.index("store") + 1:]
                if tail[:1] == ["fs"]:
                    where = ".".join(tail[1:2]) or "|".join(sorted(a.name for a in node.names))
                    found[f"{rel}: import store.fs.{where}"] += 1
                elif not tail:
                    for a in node.names:
                        if a.name in FS_NAMES or a.name == "fs":
                            found[f"{rel}: import {a.name}"] += 1
            else:
                for a in node.names:
                    if a.name in FS_NAMES:
                        found[f"{rel}: import {a.name}"] += 1
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if "store" in parts and parts[parts.index("store") + 1:][:1] == ["fs"]:
                    found[f"{rel}: import {a.name}"] += 1
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Attribute) and node.value.attr == "store":
                if rel.startswith(PAST_THE_CLIENT) or node.attr not in PROTOCOL or node.attr in FS_ATTRS:
                    found[f"{rel}: .store.{node.attr}"] += 1
            elif node.attr in FS_ATTRS:
                found[f"{rel}: .{node.attr}"] += 1
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "move":
                for kw in node.keywords:
                    if kw.arg in FS_KNOBS:
                        found[f"{rel}: move({kw.arg}=)"] += 1
    return found


def all_crossings() -> Counter[str]:
    total: Counter[str] = Counter()
    for path in sorted(PKG.rglob("*.py")):
        if (PKG / "store") in path.parents:
            continue
        total += crossings(path)
    return total


def read_allowlist() -> Counter[str]:
    allowed: Counter[str] = Counter()
    for line in ALLOWLIST.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        count, _, what = line.partition(" ")
        allowed[what] = int(count)
    return allowed


def test_nothing_new_crosses_the_store_seam() -> None:
    found, allowed = all_crossings(), read_allowlist()
    new = {k: v - allowed[k] for k, v in found.items() if v > allowed[k]}
    assert not new, ("these cross the store seam (go through the Store protocol instead, "
                     f"docs/plans/store-seam.md): {new}")


def test_the_allowlist_only_shrinks() -> None:
    found, allowed = all_crossings(), read_allowlist()
    gone = {k: v - found[k] for k, v in allowed.items() if v > found[k]}
    assert not gone, f"fixed crossings: lower or remove them in {ALLOWLIST.name}: {gone}"


def test_the_walk_sees_a_crossing(tmp_path: Path) -> None:
    """The detector itself: each kind of crossing in a made-up module is found."""
    mod = tmp_path / "m.py"
    mod.write_text("from spoolq.store.fs.layout import message_path\nfrom ..store import FsStore\n"
                   "from ..store.fs import kicks\nimport spoolq.store.fs\n"
                   "def f(client):\n    client.store.open_log('q', 'i')\n    client.store._cfg_cache.clear()\n"
                   "    client.store.message_dir('q', 'i')\n"
                   "    client.move('q', 'i', 'que', 'run', sync=False, current=None)\n")
    got = crossings(mod, tmp_path)
    assert got == Counter({"m.py: import store.fs.layout": 1, "m.py: import FsStore": 1,
                           "m.py: import store.fs.kicks": 1, "m.py: import spoolq.store.fs": 1,
                           "m.py: .store._cfg_cache": 1, "m.py: .store.message_dir": 1,
                           "m.py: move(sync=)": 1, "m.py: move(current=)": 1}), got
    # The same calls from the HTTP layer reach past the client: each is a crossing there.
    (tmp_path / "spoolq" / "http").mkdir(parents=True)
    web = tmp_path / "spoolq" / "http" / "m.py"
    web.write_text(mod.read_text())
    assert crossings(web, tmp_path)["spoolq/http/m.py: .store.open_log"] == 1
