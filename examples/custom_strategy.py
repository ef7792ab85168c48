"""A complete new method for clagent: prototype-plus-adapter (docs/writing-a-strategy.md walks through it).

SSF (scale-and-shift) adapters on the last blocks learn the first experience with a cosine classifier,
then freeze; every class, old or new, gets a prototype: its mean embedding through the adapted model.
Prediction is the nearest prototype by cosine similarity. Run it with

    cl run examples/default.yaml --import examples/custom_strategy.py --strategy proto_adapter
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl.adapters import AdapterConfig, inject
from cl.heads import NCMHead
from cl.registry import register_strategy
from cl.strategy import Strategy


@register_strategy("proto_adapter")
class ProtoAdapter(Strategy):
    """SSF adapters tuned on the first experience with a cosine classifier, then nearest class prototype."""

    param_defaults: ClassVar[dict[str, Any]] = {"epochs": 2, "lr": 1e-2, "batch_size": 128}

    def __init__(self, backbone, *, layers: tuple[int, ...] = (-2, -1), temperature: float = 16.0, **kw: Any) -> None:
        self.pools = inject(backbone, AdapterConfig(kind="ssf", layers=list(layers), router=None))
        super().__init__(backbone, **{**self.param_defaults, **kw})
        self.temperature = temperature
        self.head = NCMHead(backbone.embed_dim)  # prototypes: running class means, no stored data
        self.classifier = nn.Parameter(torch.zeros(0, backbone.embed_dim))  # grows with the first classes

    @property
    def frozen_depth(self) -> int:  # blocks before this one are frozen: their outputs are cached
        return min(self.pools)

    def before_experience(self, exp) -> None:
        super().before_experience(exp)
        if exp.id == 0:  # adapt on the first experience only
            for pool in self.pools.values():
                pool.add("first")
            self.classifier = nn.Parameter(0.01 * torch.randn(max(exp.classes) + 1, self.backbone.embed_dim))

    def fit(self, exp) -> None:
        if exp.id == 0:
            super().fit(exp)  # the base loop: epochs, optimiser, progress bar, NaN check, callbacks
            for pool in self.pools.values():
                pool.freeze("first")
            self.classifier = nn.Parameter(torch.zeros(0, self.backbone.embed_dim), requires_grad=False)  # done
            self.emit("adapted", layers=list(self.pools))  # events reach the journal and every logger

    def training_step(self, state, y) -> torch.Tensor:
        z = F.normalize(self.features(state), dim=1)
        logits = self.temperature * z @ F.normalize(self.classifier, dim=1).T
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def after_experience(self, exp) -> None:
        self.head.add_classes(exp.classes)
        self.update_statistics(self.head, exp.train, desc=f"exp {exp.id} prototypes")

    def scores(self, state) -> torch.Tensor:  # [B, classes]: column c scores global class id c
        return self.head(self.features(state))
