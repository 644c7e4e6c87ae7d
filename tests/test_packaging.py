"""What ``pip install spoolq`` installs must be enough to run it: every third-party module
spoolq imports comes from its declared runtime dependencies, not from the dev extra (a
plain install once crashed at ``spoolq serve``: ``httpx`` and ``httpcore`` came only with
the tests' tools)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement

SPOOLQ = Path(__file__).resolve().parent.parent / "spoolq"


def imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for path in SPOOLQ.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "spoolq"}


def runtime_closure() -> set[str]:
    """The distributions ``pip install spoolq`` brings in (no extras), by normalized name."""
    names: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [("spoolq", frozenset[str]())]
    while todo:
        dist, extras = todo.pop()
        if (dist, extras) in seen:
            continue
        seen.add((dist, extras))
        names.add(norm(dist))
        for raw in md.requires(dist) or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append((norm(req.name), frozenset(req.extras)))
    return names


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_every_imported_module_comes_with_a_plain_install() -> None:
    providers = md.packages_distributions()
    closure = runtime_closure()
    missing = {}
    for mod in sorted(imported_top_level_modules()):
        dists = {norm(d) for d in providers.get(mod, [])}
        assert dists, f"spoolq imports {mod}, which no installed distribution provides"
        if not dists & closure:
            missing[mod] = sorted(dists)
    assert not missing, f"imported by spoolq but installed only by an extra or by chance: {missing}"
