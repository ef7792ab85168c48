"""A strategy that does not train, whose per-class state grows: cosine similarity to each class's mean frozen
feature (docs/writing-a-strategy.md, "A strategy that does not train"). Run it with

    cl run --import examples/statistics_strategy.py --strategy class_means --scenario synthetic --backbone vit_tiny_test
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl.registry import register_strategy
from cl.strategy import Strategy


class MeanHead(nn.Module):
    """A statistics head: per-class sums and counts of the features it is fed, grown as classes arrive."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(0, dim))
        self.register_buffer("counts", torch.zeros(0))

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:  # features [B, dim], global class ids [B]
        grow = int(y.max()) + 1 - len(self.counts)
        if grow > 0:  # one row per class id, grown with torch.cat: checkpoints load the rows by value
            self.sums = torch.cat([self.sums, self.sums.new_zeros(grow, self.sums.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
        self.sums.index_add_(0, y, z.to(self.sums))
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=self.counts.dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # scores [B, classes]; a class without data: -inf
        means = F.normalize(self.sums / self.counts.clamp_min(1)[:, None], dim=1)
        return (F.normalize(z, dim=1) @ means.T.to(z)).masked_fill(self.counts == 0, float("-inf"))


@register_strategy("class_means")
class ClassMeans(Strategy):
    """Cosine similarity to each class's mean frozen feature: nothing trains, no data is kept."""

    trains = False  # epochs, lr, optimizer, weight_decay: neither shown by the registry nor taken from a config

    def __init__(self, backbone, **kw: Any) -> None:
        super().__init__(backbone, **kw)
        self.head = MeanHead(backbone.embed_dim)

    @torch.no_grad()
    def after_experience(self, exp) -> None:
        self.update_statistics(self.head, exp.train, desc=f"exp {exp.id} means")  # head.update(features, y)

    def scores(self, state) -> torch.Tensor:
        return self.head(self.features(state))
