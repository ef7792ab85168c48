"""Fine-tuning the last blocks of the backbone with a linear head: the part ``finetune``, ``joint`` and ``replay``
share."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt

from cl.backbones.base import Backbone
from cl.backbones.state import State
from cl.errors import ConfigError
from cl.experience import Experience
from cl.heads import LinearHead
from cl.strategy import Strategy


class FinetuneBase(Strategy):
    """Trains the last ``train_blocks`` blocks and a linear head on each experience's data (``finetune``, ``joint``
    and ``replay`` are built on it).

    Args:
        train_blocks: how many of the backbone's last blocks train (0: the linear head alone).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        train_blocks: NonNegativeInt = 2,
        **kw: Any,
    ) -> None:
        """``kw``: the training parameters of ``Strategy`` (epochs, lr, batch_size, optimizer, ...)."""
        super().__init__(backbone, **kw)
        if train_blocks > backbone.num_blocks:  # the one bound the parameters cannot know: the backbone's depth
            raise ConfigError(f"train_blocks must be in 0..{backbone.num_blocks}, got {train_blocks}")
        self.train_blocks = train_blocks
        for block in backbone.blocks[backbone.num_blocks - train_blocks :]:
            block.requires_grad_(True)
        self.head = LinearHead(backbone.embed_dim)

    @property
    def frozen_depth(self) -> int:
        return self.backbone.num_blocks - self.train_blocks

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.head.add_classes(exp.classes)

    def training_step(self, state: State, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.scores(state), y)

    def scores(self, state: State) -> torch.Tensor:
        return self.head(self.features(state))
