"""SimpleCIL: frozen backbone, class prototypes, cosine nearest class mean. No training."""

from __future__ import annotations

import torch

from cl.backbones.base import Backbone, State
from cl.heads import NCMHead
from cl.registry import register_strategy
from cl.strategy import Strategy
from scenarios.stream import Experience


@register_strategy("simplecil")
class SimpleCIL(Strategy):
    """Frozen pretrained features + cosine nearest-class-mean prototypes (Zhou et al., 2023)."""

    def __init__(self, backbone: Backbone, *, batch_size: int = 256, cache_prefix: bool = True) -> None:
        super().__init__(backbone, epochs=0, batch_size=batch_size, cache_prefix=cache_prefix)
        self.head = NCMHead(backbone.embed_dim)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        for state, y in self.iterate_states(exp.train, self.batch_size, desc=f"exp {exp.id} prototypes"):
            self.head.update(self.features(state), y.to(self.ctx.device))

    def scores(self, state: State) -> torch.Tensor:
        return self.head(self.features(state))
