"""Routers: pooled block input ``[B, D]`` -> mixture weights ``[B, K]`` over a pool's K adapters.

Every router grows by ``add_expert()`` (one column per new adapter) and regrows from a state dict,
so a checkpoint of an expanded model loads into a fresh one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl.descriptors import DescriptorSet
from cl.errors import ConfigError
from cl.registry import ROUTERS


class Router(nn.Module):
    """Base class: ``num_experts`` columns, ``add_expert()``, ``forward(pooled) -> weights [B, K]``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    def add_expert(self) -> None:
        raise NotImplementedError

    def freeze(self, j: int, frozen: bool = True) -> None:
        """Stop (or resume) training expert ``j``'s column; routers without parameters ignore it."""


@ROUTERS.register("softmax")
class SoftmaxRouter(Router):
    """Linear map to K logits, softmax (SEMA's expandable router), one column per expert.

    Columns are separate parameters, so freezing one is ``requires_grad_(False)``. ``add_expert`` freezes
    the existing columns (``freeze_old``) and starts the new one at the mean of the old columns with its bias
    lowered by ``new_bias``: its logit is then ``mean(old logits) + new_bias`` for every input, which bounds
    the change of the old mixture by ``exp(new_bias / temperature)`` (<1.9% at -4). The first column starts at
    zero (a neutral reference logit, not a random frozen one) and, like every newest column, stays trainable
    until the next expert arrives. With ``k=1`` a TopKRouter passes no gradient to its logits: use ``k >= 2``.
    """

    def __init__(self, dim: int, new_bias: float = -4.0, temperature: float = 1.0, freeze_old: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.new_bias = new_bias
        self.temperature = temperature
        self.freeze_old = freeze_old
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()

    @property
    def num_experts(self) -> int:
        return len(self.weight)

    def add_expert(self) -> None:
        if self.freeze_old:
            for j in range(self.num_experts):
                self.freeze(j)
        if self.num_experts:
            w = torch.stack(list(self.weight)).detach().mean(0)
            b = torch.stack(list(self.bias)).detach().mean(0) + self.new_bias
        else:
            w, b = self._anchor.new_zeros(self.dim), self._anchor.new_zeros(1)
        self.weight.append(nn.Parameter(w.clone()))
        self.bias.append(nn.Parameter(b.clone()))

    def freeze(self, j: int, frozen: bool = True) -> None:
        self.weight[j].requires_grad_(not frozen)
        self.bias[j].requires_grad_(not frozen)

    @property
    def frozen(self) -> list[int]:
        return [j for j, w in enumerate(self.weight) if not w.requires_grad]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        w, b = torch.stack(list(self.weight)), torch.cat(list(self.bias))
        return F.linear(pooled, w.to(pooled.dtype), b.to(pooled.dtype)) / self.temperature

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.logits(pooled).softmax(-1)

    def get_extra_state(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for j in range(self.num_experts):
            self.freeze(j, j in state.get("frozen", []))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        n = sum(1 for k in state_dict if k.startswith(prefix + "weight.") and k.rsplit(".", 1)[-1].isdigit())
        while self.num_experts < n:
            self.add_expert()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@ROUTERS.register("topk")
class TopKRouter(SoftmaxRouter):
    """SoftmaxRouter that keeps the ``k`` largest weights per input, renormalised to sum to 1."""

    def __init__(
        self, dim: int, k: int = 1, new_bias: float = -4.0, temperature: float = 1.0, freeze_old: bool = True
    ) -> None:
        super().__init__(dim, new_bias, temperature, freeze_old)
        self.k = k

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.logits(pooled)
        if self.k >= logits.shape[-1]:
            return logits.softmax(-1)
        top = logits.topk(self.k, -1)
        return torch.zeros_like(logits).scatter_(-1, top.indices, top.values.softmax(-1))


@ROUTERS.register("descriptor")
class DescriptorRouter(Router):
    """No trained parameters: weights ``softmax(-z / temperature)`` of each descriptor's reconstruction-loss
    z-score (or one-hot on the smallest with ``hard=True``), so inputs go to the adapters whose
    descriptors know their distribution. The set is referenced, not owned: its owner (the pool) saves it.
    """

    def __init__(
        self, dim: int, descriptors: DescriptorSet | None = None, temperature: float = 1.0, hard: bool = False
    ) -> None:
        super().__init__()
        if descriptors is None:
            raise ConfigError("the descriptor router needs descriptors (AdapterConfig.descriptor_hidden)")
        object.__setattr__(self, "descriptors", descriptors)  # a reference, kept out of this state dict
        self.temperature = temperature
        self.hard = hard

    @property
    def num_experts(self) -> int:
        return len(self.descriptors)

    def add_expert(self) -> None:
        """Nothing to grow: each expert is its descriptor, added to the set by its owner."""

    @torch.no_grad()  # routing only: the task loss must not train the descriptors
    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = self.descriptors.zscores(pooled)
        if self.hard:
            return F.one_hot(z.argmin(-1), z.shape[-1]).to(pooled.dtype)
        return (-z / self.temperature).softmax(-1)


@ROUTERS.register("fixed")
class FixedRouter(Router):
    """Weights given from outside (``weights``: ``[K]`` or ``[B, K]``, e.g. a task's one-hot); uniform if unset."""

    def __init__(self, dim: int, weights: list[float] | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.k = 0
        self.register_buffer("weights", torch.tensor(weights) if weights is not None else None, persistent=False)

    @property
    def num_experts(self) -> int:
        return self.k

    def add_expert(self) -> None:
        self.k += 1

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return pooled.new_full((pooled.shape[0], self.k), 1.0 / self.k)
        if self.weights.shape[-1] != self.k:
            raise ConfigError(f"fixed router weights have {self.weights.shape[-1]} columns for {self.k} experts")
        return self.weights.to(pooled.dtype).expand(pooled.shape[0], self.k)

    def get_extra_state(self) -> dict[str, Any]:
        return {"k": self.k}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.k = max(self.k, int(state.get("k", 0)))


def create_router(name: str, dim: int, **kw: Any) -> Router:
    """A router by name (``softmax``, ``topk``, ``descriptor``, ``fixed``); bad names or keys raise ConfigError."""
    return ROUTERS.create(name, dim, **kw)
