"""Joint training: at each experience, train on the union of all experiences so far.

Not continual (it keeps every sample): the upper bound a continual method is compared with.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import ConcatDataset, Dataset

from cl.backbones.base import State
from cl.finetune import FinetuneBase
from cl.registry import register_strategy


@register_strategy("joint")
class Joint(FinetuneBase):
    """Upper bound: fine-tunes like ``finetune`` but on all data seen so far at every experience."""

    def train_batches(self, dataset: Dataset, exp_id: int, epoch: int) -> Iterator[tuple[State, torch.Tensor]]:
        earlier = [e.train for e in self.ctx.agent.seen if e.id != exp_id] if self.ctx.agent else []
        return super().train_batches(ConcatDataset([*earlier, dataset]), exp_id, epoch)
