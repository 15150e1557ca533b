"""The package's plan, enforced on the source: stage packages whose imports run one way (LAYERS, bottom-up), no import
cycle between modules, imtune's own imports at the top of library modules, and modules and functions that stay
small. Only the command layer (commands/, cli.py) imports a stage inside `run`, so that `imtune --help` and
`imtune COMMAND --help` never load torch."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imtune"

# Bottom-up: a unit may import its own modules and the units before it, never one after it. report sits below
# evaluate and tasks because they write their Markdown with its renderer; experiments (compare, sweep, study) use all
# of the stages; cli gives the report its parser by registration (imtune.report.checks.register_parser).
LAYERS = ["imtune", "types", "results", "files", "console", "data", "analysis", "config", "rundir", "model", "train",
          "report", "evaluate", "tasks", "experiments", "serve", "integrations", "commands", "cli", "__main__"]
LAZY_ALLOWED = ("commands", "cli")  # the command layer: a stage is imported when its command runs


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for p in src.rglob("*.py"):
        parts = list(p.relative_to(src.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def unit(module: str) -> str:
    """The layer a module belongs to: its package under imtune, or the root module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "imtune"


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str, bool]]:
    """(importer, imported module, where, inside a function) for every import of an imtune module."""
    edges = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: a relative import (imtune imports absolutely)"
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in mods and t != mod:
                    edges.append((mod, t, f"{path.name}:{node.lineno}", id(node) in in_function))
    return edges


def upward(edges) -> list[str]:
    rank = {u: i for i, u in enumerate(LAYERS)}
    return [f"{where}: {unit(a)} imports {b} ({unit(b)} is above it)" for a, b, where, _ in edges
            if unit(a) != unit(b) and rank[unit(b)] > rank[unit(a)]]


def cycle(mods, edges) -> list[str]:
    """One import cycle (the modules in order, the first again at the end), or []."""
    succ: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _, _ in edges:
        succ[a].add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(m: str, path: list[str]) -> list[str]:
        state[m] = 1
        for n in sorted(succ[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return []

    for m in sorted(mods):
        if m not in state and (found := visit(m, [m])):
            return found
    return []


def lazy(edges) -> list[str]:
    return [f"{where}: imports {b} inside a function" for a, b, where, inside in edges
            if inside and unit(a) not in LAZY_ALLOWED]


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, imports(mods)


def test_every_unit_has_a_layer(graph):
    mods, _ = graph
    assert sorted({unit(m) for m in mods} - set(LAYERS)) == []


def test_imports_run_downward_only(graph):
    assert upward(graph[1]) == []


def test_no_import_cycle(graph):
    assert " -> ".join(cycle(*graph)) == ""


def test_library_modules_import_imtune_at_the_top(graph):
    assert lazy(graph[1]) == []


def test_the_checks_find_an_upward_import_a_cycle_and_a_lazy_import(tmp_path):
    """In a copy of the package: data.pack imports the trainer inside a function, data.load imports data.prepare
    (which imports data.load)."""
    copy = tmp_path / "imtune"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    pack, load = copy / "data" / "pack.py", copy / "data" / "load.py"
    pack.write_text(pack.read_text() + "\n\ndef _x():\n    from imtune.train.loop import train\n")
    load.write_text(load.read_text() + "\nfrom imtune.data.prepare import prepare_examples  # noqa\n")
    mods = modules(copy)
    edges = imports(mods)
    assert [x for x in upward(edges) if "pack.py" in x] == [
        f"pack.py:{len(pack.read_text().splitlines())}: data imports imtune.train.loop (train is above it)"]
    assert set(cycle(mods, edges)) >= {"imtune.data.load", "imtune.data.prepare"}
    assert lazy(edges) == [f"pack.py:{len(pack.read_text().splitlines())}: imports imtune.train.loop inside a function"]


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80  # a module you can hold in your head; a function that fits a screen


def test_modules_and_functions_stay_small():
    big = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(SRC.parent)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {node.name} is {n} lines")
    assert big == []
