"""Heavy optional libraries imported where they are first used, not where they are named.

``faiss = lazy_import("faiss")`` at the top of a module reads like ``import faiss``, but the library is imported
at the first read of one of its attributes, so a run pays for it when it first searches a memory, not at start-up.
The stand-in stays out of ``sys.modules`` until then (``importlib.util.LazyLoader`` puts its module there, where
``inspect.getmodule``, which torch calls while registering operators, reads every module's ``__file__`` and so
imports it at once).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for module ``name`` until an attribute is read, then imports it and reads from it."""

    def __init__(self, name: str) -> None:
        self.__name = name
        self.__module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self.__module is None:
            self.__module = importlib.import_module(self.__name)
        return getattr(self.__module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name!r} ({'imported' if self.__module else 'not imported yet'})>"


def lazy_import(name: str) -> Any:
    """Module ``name`` (itself if it is imported already, else a ``LazyModule``); one that is not installed raises
    ``ModuleNotFoundError`` here, as ``import`` would."""
    if (module := sys.modules.get(name)) is not None:
        return module
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return LazyModule(name)


__all__ = ["LazyModule", "lazy_import"]
