"""Classifier heads over global class ids; every head grows as classes arrive.

A head maps embeddings ``[B, D]`` to scores ``[B, C]`` where column ``c`` is global class id ``c``
and ``C`` is one more than the largest id seen; columns of classes not seen yet score ``-inf``.
Heads resize themselves when a checkpoint with more classes is loaded, so an expanded model
rebuilds from its state dict alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    """Base class: tracks which class ids are known (the ``known`` mask)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("known", torch.zeros(0, dtype=torch.bool))

    @property
    def num_outputs(self) -> int:
        return int(self.known.numel())

    def add_classes(self, classes: Iterable[int]) -> None:
        """Make room for ``classes`` (global ids) and mark them known."""
        classes = list(classes)
        if not classes:
            return
        need = max(classes) + 1
        if need > self.num_outputs:
            self._grow(need)
        self.known[classes] = True

    def _grow(self, n: int) -> None:
        known = torch.zeros(n, dtype=torch.bool, device=self.known.device)
        known[: self.num_outputs] = self.known
        self.known = known

    def mask_unknown(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~self.known, float("-inf"))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "known"
        if key in state_dict and state_dict[key].numel() != self.num_outputs:
            self._grow(state_dict[key].numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LinearHead(Head):
    """A linear classifier whose rows are added per class (trained with cross-entropy)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.weight = nn.Parameter(torch.zeros(0, dim))
        self.bias = nn.Parameter(torch.zeros(0))

    def _grow(self, n: int) -> None:
        old = self.num_outputs
        super()._grow(n)
        w = torch.empty(n - old, self.dim, device=self.weight.device)
        nn.init.normal_(w, std=0.01)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, torch.zeros(n - old, device=w.device)]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mask_unknown(F.linear(z, self.weight, self.bias))


class NCMHead(Head):
    """Cosine nearest-class-mean over prototypes accumulated without storing data (SimpleCIL)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("sums", torch.zeros(0, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))

    def _grow(self, n: int) -> None:
        old = self.num_outputs
        super()._grow(n)
        dev = self.sums.device
        self.sums = torch.cat([self.sums, torch.zeros(n - old, self.dim, dtype=torch.float64, device=dev)])
        self.counts = torch.cat([self.counts, torch.zeros(n - old, dtype=torch.float64, device=dev)])

    @torch.no_grad()
    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of embeddings to their class sums."""
        self.add_classes(torch.unique(y).tolist())
        self.sums.index_add_(0, y.to(self.sums.device), z.to(self.sums))
        self.counts.index_add_(0, y.to(self.counts.device), torch.ones_like(y, dtype=torch.float64))

    @property
    def prototypes(self) -> torch.Tensor:
        return (self.sums / self.counts.clamp_min(1).unsqueeze(1)).float()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        protos = F.normalize(self.prototypes.to(z.device), dim=1)
        return self.mask_unknown(F.normalize(z, dim=1) @ protos.T)
