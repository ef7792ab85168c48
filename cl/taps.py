"""Taps: the frozen backbone's pooled block outputs, put in front of what a statistics head sees.

A block's pooled output (feature maps: global average pool; tokens: (masked) token mean; ``Backbone.pool_block``)
is a cheap description of an input at that depth. Concatenated over blocks, these *multi-layer* features carry
what the last layer has pooled away (textures, strokes, shapes at several scales), and class statistics (LDA) over
them separate classes that the final embedding confuses (README, "Fidelity"). They cost no extra pass: the taps of
the blocks before ``frozen_depth`` come with the prefix states (``Tapped``, cached by the prefix cache), those of
later blocks with the frozen pass of the adapted blocks that ``[frozen, adapted]`` features make anyway.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from cl.adapters import pools
from cl.backbones.state import State, Tapped
from cl.errors import DataError
from cl.routing import OFF, routed


class TapChoice:
    """Strategy mixin: the ``taps`` parameter and the features it adds (``class Mine(TapChoice, HeadChoice,
    Strategy)``; ``SimpleCIL`` and ``AdapterStrategy`` have it).

    Args:
        taps: blocks whose pooled outputs, from the frozen backbone, the head sees in front of the embedding(s):
            ``"all"``, ``"prefix"`` (the blocks before the first adapted one: no pass beyond the prefix's), a list
            of block indices (negative: from the end), or None (no taps).
    """

    def __init__(self, *args: Any, taps: Literal["all", "prefix"] | list[int] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.taps: tuple[int, ...] = (tuple(range(self.frozen_depth)) if taps == "prefix"
                                      else self.backbone.tap_blocks(taps))

    @property
    def prefix_taps(self) -> tuple[int, ...]:
        """The tapped blocks before ``frozen_depth``: their pooled outputs come with the (cached) prefix states."""
        depth = self.frozen_depth
        return tuple(i for i in self.taps if i < depth)

    @property
    def tap_dim(self) -> int:
        """Width of ``tap_features``."""
        return self.backbone.tap_dim(self.taps)

    def prefix_tap_features(self, state: State) -> torch.Tensor:
        """The pooled outputs ``[B, T]`` of the ``prefix_taps`` blocks, which come with the prefix states."""
        if not isinstance(state, Tapped):
            raise DataError(f"{type(self).__name__} taps blocks {list(self.prefix_taps)} but got prefix states "
                            "without taps: compute them with Strategy.prefix / iterate_states")
        return state.taps

    def tap_features(
        self, state: State, frozen: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(taps [B, tap_dim], frozen embedding)`` of prefix states: the prefix's taps from the ``Tapped`` state;
        those of blocks from ``frozen_depth`` on from one pass of the frozen model (every adapter off), which also
        gives the frozen embedding. ``frozen``: the frozen embedding when already computed (returned as is; None
        stays None when no pass was needed)."""
        parts = [self.prefix_tap_features(state)] if self.prefix_taps else []
        later = [i for i in self.taps if i >= self.frozen_depth]
        if later:
            with routed(pools(self.backbone), OFF):
                embedding, pooled = self.backbone.forward_from_tapped(state, self.frozen_depth, later)
            frozen = embedding if frozen is None else frozen
            parts.append(pooled)
        return torch.cat(parts, 1), frozen
