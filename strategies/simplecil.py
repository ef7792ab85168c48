"""SimpleCIL and training-free heads on frozen features: cosine NCM, LDA, RanPAC."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from cl.backbones.base import Backbone, State
from cl.experience import Experience
from cl.heads import HeadChoice
from cl.registry import register_strategy
from cl.strategy import Strategy
from cl.taps import TapChoice


@register_strategy("simplecil")
class SimpleCIL(TapChoice, HeadChoice, Strategy):
    """Frozen pretrained features + class statistics; ``head="ncm"`` is SimpleCIL (Zhou et al., 2023).

    ``head="lda"`` (shared covariance) and ``head="ranpac"`` (random projection + ridge) are training-free
    baselines too; all are updated from each experience without old data. ``taps`` puts the pooled outputs of
    the backbone's blocks in front of the embedding (``cl.taps``; ``taps="all"`` with ``head="lda"`` is
    ``examples/split_fmnist_best.yaml``). Nothing trains (``trains = False``): ``batch_size`` is kept for the
    configs that name it, and sizes nothing.
    """

    trains = False
    param_defaults: ClassVar[dict[str, Any]] = {"head": "ncm", "batch_size": 256}

    def __init__(self, backbone: Backbone, **kw: Any) -> None:
        """``kw``: ``taps`` (``TapChoice``), ``head``, ``head_kw`` (``HeadChoice``), ``cache_prefix`` (``Strategy``)."""
        super().__init__(backbone, **{**self.base_defaults(), **kw})
        self.head = self.make_head(backbone.embed_dim + self.tap_dim)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        self.head.add_classes(exp.classes)
        self.update_statistics(self.head, exp.train, desc=f"exp {exp.id} statistics")

    def features(self, state: State) -> torch.Tensor:
        """The frozen embedding, behind the taps (``[taps, embedding]``) when the strategy taps blocks."""
        if not self.taps:
            return self.embedding(state)
        return torch.cat([self.tap_features(state)[0], self.embedding(state)], 1)

    def scores(self, state: State) -> torch.Tensor:
        return self.head(self.features(state))


@register_strategy("ranpac")
def ranpac(
    backbone: Backbone, *, proj_dim: int = 2048, ridge: float | None = None, seed: int = 0, batch_size: int = 256
) -> SimpleCIL:
    """RanPAC without training: frozen features, random ReLU projection, ridge head (GCV-chosen ridge).

    Args:
        proj_dim: width of the random ReLU projection.
        ridge: ridge penalty of the head (None: chosen by generalised cross-validation).
        seed: seed of the random projection.
        batch_size: batch size of the statistics pass.
    """
    return SimpleCIL(backbone, head="ranpac", head_kw={"proj_dim": proj_dim, "ridge": ridge, "seed": seed},
                     batch_size=batch_size)
