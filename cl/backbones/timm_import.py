"""``import timm`` without what timm imports for its own training scripts only.

timm's ``timm.utils.summary`` imports ``wandb`` whenever it is installed (to log timm's own training runs), which
costs seconds of every ``cl run``'s start-up; clagent never uses that path, so while timm loads, an import of
``wandb`` made by timm's own modules fails (timm goes on without it). Imports of ``wandb`` from anywhere else,
another thread included (``cl.run`` loads the scenario on a thread meanwhile), are untouched, and ``wandb`` stays
importable afterwards (the ``wandb`` logger imports it when a run asks for it).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType

_lock = threading.Lock()


class _NoWandbForTimm(importlib.abc.MetaPathFinder):
    """Refuses ``wandb`` to imports made from timm's modules (found on the importing thread's stack)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == "wandb":
            frame = sys._getframe(1)
            while frame is not None:
                if str(frame.f_globals.get("__name__", "")).startswith("timm."):
                    raise ModuleNotFoundError("wandb is not imported for timm's own training scripts", name="wandb")
                frame = frame.f_back
        return None


def import_timm() -> ModuleType:
    """The ``timm`` module, loaded (the first time) without ``wandb``."""
    with _lock:
        if "timm" not in sys.modules:
            finder = _NoWandbForTimm()
            sys.meta_path.insert(0, finder)
            try:
                import timm
            finally:
                sys.meta_path.remove(finder)
    import timm  # waits for an import another thread has begun without this function

    return timm
