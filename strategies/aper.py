"""APER/ADAM (Zhou et al., 2024): adapt on the first experience only, then class statistics over the
concatenation of frozen and adapted features, so later experiences need no training at all.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from cl.adapter_strategy import AdapterStrategy
from cl.backbones.base import Backbone, State
from cl.experience import Experience
from cl.registry import register_strategy


@register_strategy("aper")
class APER(AdapterStrategy):
    """First-experience adapters + prototypes (``head``: ncm, lda, ranpac) over [frozen, adapted] features."""

    param_defaults: ClassVar[dict[str, Any]] = {"head": "ncm"}

    def __init__(self, backbone: Backbone, **kw: Any) -> None:
        """``kw``: ``AdapterStrategy``'s (adapter layers and kind, head, training parameters for the adapters)."""
        super().__init__(backbone, **kw)
        self.head = self.make_head(self.head_dim)

    @property
    def adapted(self) -> bool:
        return all(len(p) for p in self.pools.values())

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if not self.adapted:
            self.train_head.add_classes(exp.classes)
        self.head.add_classes(exp.classes)

    def fit(self, exp: Experience) -> None:
        if self.adapted:  # only the first experience trains
            return
        for pool in self.pools.values():
            pool.add("first", owner=exp.id)
        super().fit(exp)
        for pool in self.pools.values():
            pool.freeze("first")
        self.emit("adapted", layers=list(self.pools), experience=exp.id)

    def features(self, state: State) -> torch.Tensor:
        """``[frozen, adapted]`` embeddings (frozen: adapters switched off)."""
        return self.routed_features(state)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        self.update_statistics(self.head, exp.train, desc=f"exp {exp.id} prototypes")

    def scores(self, state: State) -> torch.Tensor:
        return self.head(self.features(state))
