"""The import graph of palgan's own modules: no circle, and no module importing from a floor above
(data/ and models/ below trainers/, trainers/ below tune/). Every import counts, also those inside
functions, and so does a module named in a string to ``importlib``.

    python tests/test_imports.py      # print the graph, one module per line with what it imports
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "trainers", "tune", "benchmarks")
FLOOR = {"data": 0, "models": 0, "trainers": 1, "tune": 2, "benchmarks": 3}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The palgan modules ``path`` imports anywhere in its body (``from trainers import cli`` counts as
    ``trainers.cli``; a string argument naming a module, as in ``importlib.import_module``, too)."""
    found = set()
    me = module_name(path) if path.is_relative_to(ROOT) else path.stem

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name.split(".")[0] in PACKAGES and name != me:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                add(full if full in known else node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "find_spec", "__import__"):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(arg.value)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_on_known_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_inside_functions_and_importlib_strings_count(tmp_path, monkeypatch):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from trainers.gan import x\n"
                   "import importlib\nimportlib.import_module('trainers.gan_eval')\n"
                   "from trainers import cli\n")
    got = imports_of(src, {"trainers.gan", "trainers.gan_eval", "trainers.cli", "trainers"})
    assert got == {"trainers.gan", "trainers.gan_eval", "trainers.cli"}


def test_palgan_has_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_imports_from_a_floor_above():
    bad = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
           if FLOOR[b.split(".")[0]] > FLOOR[a.split(".")[0]]]
    assert not bad, bad


if __name__ == "__main__":
    g = graph()
    for name in sorted(g, key=lambda n: (FLOOR[n.split(".")[0]], n)):
        if name.split(".")[0] != "benchmarks" or "-a" in sys.argv:
            print(f"{name:26s} -> {', '.join(sorted(g[name])) or '-'}")
    cycle = find_cycle(g)
    print("circle: " + " -> ".join(cycle) if cycle else "no circle")
