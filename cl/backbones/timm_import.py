"""``import timm`` without what timm imports for its own training scripts only.

timm's ``timm.utils.summary`` imports ``wandb`` whenever it is installed (to log timm's own training runs), which
costs seconds of every ``cl run``'s start-up; clagent never uses that path, so ``wandb`` is hidden while timm loads
and stays importable afterwards (the ``wandb`` logger imports it when a run asks for it).
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_timm() -> ModuleType:
    """The ``timm`` module, loaded (the first time) with ``wandb`` hidden from it."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # an import of it raises ImportError: timm goes on without it
    try:
        import timm
    finally:
        if hide and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    return timm
