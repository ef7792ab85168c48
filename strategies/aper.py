"""APER/ADAM (Zhou et al., 2024): adapt on the first experience only, then class statistics over the
concatenation of frozen and adapted features, so later experiences need no training at all.
"""

from __future__ import annotations

from typing import Any

import torch

from cl.adapter_strategy import AdapterStrategy
from cl.backbones.base import Backbone, State
from cl.experience import Experience
from cl.heads import create_head
from cl.registry import register_strategy


@register_strategy("aper")
class APER(AdapterStrategy):
    """First-experience adapters + prototypes (``head``: ncm, lda, ranpac) over [frozen, adapted] features."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        head: str = "ncm",
        head_kw: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        """``kw``: ``AdapterStrategy``'s (adapter layers and kind, training parameters for the adapters)."""
        super().__init__(backbone, **kw)
        self.head = create_head(head, 2 * backbone.embed_dim, **(head_kw or {}))

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
