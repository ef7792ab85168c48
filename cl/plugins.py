"""User code that registers strategies, scenarios or backbones: imported by module name or file path.

``cl run --import my_pkg.methods`` or ``--import path/to/my_strategy.py`` (also ``imports:`` in a config,
so ``RUN/config.yaml`` repeats the run) imports the code before names are looked up in the registries.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from cl.errors import ConfigError

_FILES: dict[Path, ModuleType] = {}


def import_plugin(spec: str) -> ModuleType:
    """Import a module by dotted name, or a ``.py`` file by path (once per resolved path)."""
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec).expanduser().resolve()
        if path in _FILES:
            return _FILES[path]
        if not path.is_file():
            raise ConfigError(f"--import {spec}: no such file (give a .py file or an importable module name)")
        name = f"clagent_plugin_{path.stem}_{len(_FILES)}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"--import {spec} failed: {type(e).__name__}: {e}") from e
        _FILES[path] = module
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise ConfigError(f"--import {spec}: {e} (give an importable module name or a .py file)") from e


def plugin_key(spec: str) -> str:
    """What a plugin spec names, to compare two specs: the resolved path of a file, else the module name."""
    return str(Path(spec).expanduser().resolve()) if spec.endswith(".py") or "/" in spec else spec


#: modules whose registrations are clagent's own (nothing to import for them)
BUILT_IN = ("cl", "scenarios", "strategies")


def source_of(entry: object) -> str | None:
    """What to import so that a registry entry exists: None for clagent's own entries, the resolved path of a ``.py``
    file imported with ``import_plugin``, else the defining module's name (``__main__`` for a script's own)."""
    module = getattr(entry, "__module__", None)
    if module is None or module.split(".")[0] in BUILT_IN:
        return None
    path = next((p for p, m in _FILES.items() if m.__name__ == module), None)
    return str(path) if path is not None else module


def import_plugins(specs: Iterable[str]) -> list[ModuleType]:
    """Import every plugin in order."""
    return [import_plugin(s) for s in specs]
