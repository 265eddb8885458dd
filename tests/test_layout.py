"""The package's shape: no import cycle between ldm's modules, counting the imports inside functions and under
TYPE_CHECKING (an import deferred into a function keeps a cycle alive; it does not remove it)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ldm"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ldm modules that module `name` imports anywhere in its body (the package `ldm` itself excluded: its
    names load lazily)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            targets = [f"{module}.{a.name}" for a in node.names]  # a submodule, or a name of `module`
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in ("ldm", name):
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_kept_alive_by_a_function_level_import(tmp_path):
    (tmp_path / "ldm" / "data").mkdir(parents=True)
    (tmp_path / "ldm" / "__init__.py").write_text("")
    (tmp_path / "ldm" / "data" / "__init__.py").write_text("")
    (tmp_path / "ldm" / "a.py").write_text("from .data.b import f\n")
    (tmp_path / "ldm" / "data" / "b.py").write_text("def f():\n    from ..a import g\n")
    (tmp_path / "ldm" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    modules = {"ldm": tmp_path / "ldm/__init__.py", "ldm.data": tmp_path / "ldm/data/__init__.py",
               "ldm.a": tmp_path / "ldm/a.py", "ldm.data.b": tmp_path / "ldm/data/b.py", "ldm.c": tmp_path / "ldm/c.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["ldm.c"] == {"ldm.a"}
    assert cycles(graph) == [["ldm.a", "ldm.data.b"]]


def test_ldm_has_no_import_cycle():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 30 and {"ldm.generation.pipeline", "ldm.models.checkpoint"} <= graph["ldm.cli"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")" for c in found)


def test_the_networks_import_no_speed_request_or_training_code():
    """The networks are plain model code; the CPU speed code (`ldm.accel`) is applied to them at the edge."""
    modules = module_names()
    for name in ("ldm.models.unet", "ldm.models.vae", "ldm.models.attention", "ldm.models.tiling",
                 "ldm.models.text_encoder", "ldm.models.tokenizer"):
        outside = {m for m in imports_of(name, modules[name], modules)
                   if m.startswith(("ldm.accel", "ldm.generation", "ldm.training", "ldm.data"))}
        assert not outside, f"{name} imports {sorted(outside)}"
    assert "ldm.models.unet" in imports_of("ldm.accel.forwards", modules["ldm.accel.forwards"], modules)
