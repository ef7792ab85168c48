"""Naive fine-tuning: train the last blocks and a linear head on each experience in turn.

The lower bound of a stream: nothing protects old classes, so it shows forgetting.
"""

from __future__ import annotations

from cl.finetune import FinetuneBase
from cl.registry import register_strategy


@register_strategy("finetune")
class Finetune(FinetuneBase):
    """Naive sequential fine-tuning of the last ``train_blocks`` blocks and a linear head."""
