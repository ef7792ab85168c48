"""SimpleCIL and training-free heads on frozen features: cosine NCM, LDA, RanPAC."""

from __future__ import annotations

from typing import Any

import torch

from cl.backbones.base import Backbone, State
from cl.experience import Experience
from cl.heads import create_head
from cl.registry import register_strategy
from cl.strategy import Strategy


@register_strategy("simplecil")
class SimpleCIL(Strategy):
    """Frozen pretrained features + class statistics; ``head="ncm"`` is SimpleCIL (Zhou et al., 2023).

    ``head="lda"`` (shared covariance) and ``head="ranpac"`` (random projection + ridge) are the
    training-free baselines of METHODS.md; all are updated from each experience without old data.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        head: str = "ncm",
        head_kw: dict[str, Any] | None = None,
        batch_size: int = 256,
        cache_prefix: bool = True,
    ) -> None:
        super().__init__(backbone, epochs=0, batch_size=batch_size, cache_prefix=cache_prefix)
        self.head = create_head(head, backbone.embed_dim, **(head_kw or {}))

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        self.head.add_classes(exp.classes)
        self.update_statistics(self.head, exp.train, desc=f"exp {exp.id} statistics")

    def scores(self, state: State) -> torch.Tensor:
        return self.head(self.features(state))


@register_strategy("ranpac")
def ranpac(
    backbone: Backbone, *, proj_dim: int = 2048, ridge: float | None = None, seed: int = 0, batch_size: int = 256
) -> SimpleCIL:
    """RanPAC without training: frozen features, random ReLU projection, ridge head (GCV-chosen ridge)."""
    return SimpleCIL(backbone, head="ranpac", head_kw={"proj_dim": proj_dim, "ridge": ridge, "seed": seed},
                     batch_size=batch_size)
