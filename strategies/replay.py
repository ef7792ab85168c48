"""Replay: fine-tuning with class-balanced exemplar replay (Avalanche's ``Replay``).

The mechanism, a buffer of past samples kept in the experience memory and mixed into every training batch, is
``cl.replay.ReplayMixin`` (any strategy composes with it: ``sema_replay`` is SEMA's); which samples are kept is
``cl.memory.exemplars`` (herding or reservoir, class-balanced quotas of ``budget``). docs/memory.md describes both.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cl.finetune import FinetuneBase
from cl.registry import register_strategy
from cl.replay import ReplayMixin


@register_strategy("replay")
class Replay(ReplayMixin, FinetuneBase):
    """Finetune + class-balanced exemplar replay (Avalanche's Replay): 2,000 exemplars by herding by default."""

    # pinned, not inherited: why one epoch, docs/memory.md
    param_defaults: ClassVar[dict[str, Any]] = {"epochs": 1, "lr": 1e-3}
