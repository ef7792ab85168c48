"""The layering of the three packages (DESIGN.md): ``cl`` is the engine and knows neither ``scenarios`` nor
``strategies``; a strategy module builds on ``cl`` and never on another strategy; no module imports itself back
through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cl", "scenarios", "strategies")

BLOCKED = """
import importlib, importlib.abc, pkgutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("scenarios", "strategies"):
            raise ImportError(f"{name} is unimportable in this test")
        return None

sys.meta_path.insert(0, Refuse())
import cl
names = [m.name for m in pkgutil.walk_packages(cl.__path__, "cl.") if m.name != "cl.__main__"]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name."""
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def module_imports(path: Path) -> set[str]:
    """What a module imports when it is imported (``TYPE_CHECKING`` blocks included, imports inside functions and
    classes left out): ``a.b`` for ``import a.b``, ``a.b`` and ``a.b.c`` for ``from a.b import c``."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.Import):
                found.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:  # relative: the package it sits in
                    base = ".".join(path.relative_to(ROOT).with_suffix("").parts[: -n.level])
                    mod = f"{base}.{n.module}" if n.module else base
                else:
                    mod = n.module or ""
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in n.names)
    return found


def test_cl_imports_with_scenarios_and_strategies_unimportable():
    """Every module of the engine imports while ``scenarios`` and ``strategies`` cannot be imported at all."""
    done = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 40  # it did walk the whole package


def test_no_strategy_module_imports_another():
    """Code two strategies need lives in ``cl``; ``strategies/__init__.py`` only imports them to register them."""
    offenders = {}
    for f in sorted((ROOT / "strategies").glob("*.py")):
        if f.name == "__init__.py":
            continue
        others = {m for m in module_imports(f) if m.split(".")[0] == "strategies"}
        if others:
            offenders[f.name] = sorted(others)
    assert not offenders


def test_the_engine_imports_no_stream_and_no_strategy_module():
    found = {name: sorted(m for m in module_imports(f) if m.split(".")[0] in ("scenarios", "strategies"))
             for name, f in modules().items() if name.split(".")[0] == "cl"}
    assert not {k: v for k, v in found.items() if v}


def test_no_import_cycle_between_modules():
    """Module-level imports (type-checking ones too) form no cycle, e.g. ``cl.backbones.base`` and
    ``cl.backbones.preprocess`` do not import each other."""
    mods = modules()
    graph = {m: {d for d in module_imports(f) if d in mods and d != m} for m, f in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*path[path.index(d):], d] if d in path else [*path, m, d]
            if d not in state and (cycle := visit(d, [*path, d])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert (cycle := visit(m, [m])) is None, " -> ".join(cycle)
