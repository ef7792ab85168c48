"""Adapter modules and their config. Each adapter maps a block's input (or output) to a delta added to
the block's output, and is zero on the output side at creation, so inserting one leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import torch
from torch import nn

from cl.errors import ConfigError
from cl.registry import format_validation_error

BlockKind = Literal["token", "channel"]
AdapterKind = Literal["bottleneck", "lora", "ssf", "rank1"]

#: default ``dim`` (bottleneck width or rank) per adapter kind and block kind
DEFAULT_DIM: dict[str, dict[str, int]] = {
    "bottleneck": {"token": 16, "channel": 32},
    "lora": {"token": 8, "channel": 8},
    "rank1": {"token": 1, "channel": 1},
    "ssf": {"token": 0, "channel": 0},
}


class AdapterConfig(pydantic.BaseModel):
    """What to adapt and how (PEFT-style): ``AdapterConfig(kind="bottleneck", dim=16, layers=[-3, -2, -1])``.

    ``layers`` (block indices, negative from the end) or ``pattern`` (wildcard on module names such as
    ``"blocks.1[01]"`` or ``"*.layer.5"``) choose the blocks; neither means every block.
    ``router`` mixes a pool's adapters (``None``: plain sum); it defaults to ``"softmax"``, and to ``None`` for
    ``rank1``, whose own self-activated gate picks ``top_k`` rank-one experts per position.
    ``descriptor_hidden`` gives every pool a representation descriptor per adapter (SEMA).
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    kind: AdapterKind = "bottleneck"
    dim: int | None = pydantic.Field(default=None, gt=0)
    layers: list[int] | None = None
    pattern: str | None = None
    scale: float = 1.0
    dropout: float = pydantic.Field(default=0.0, ge=0.0, lt=1.0)
    top_k: int | None = pydantic.Field(default=None, gt=0)
    router: str | None = "softmax"
    router_kw: dict[str, Any] = pydantic.Field(default_factory=dict)
    descriptor_hidden: int | None = pydantic.Field(default=None, gt=0)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as e:
            raise ConfigError(format_validation_error(e, "adapter config", type(self))) from None

    @pydantic.model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if self.layers is not None and self.pattern is not None:
            raise ValueError("give either layers or pattern, not both")
        if self.kind == "rank1" and "router" not in self.model_fields_set:
            self.router = None
        return self

    def width(self, block_kind: str) -> int:
        """``dim``, or the kind's default for this block kind."""
        return self.dim or DEFAULT_DIM[self.kind][block_kind]


@dataclass(frozen=True)
class BlockShape:
    """What an adapter must fit: block kind, input and output width, spatial stride (channel blocks)."""

    kind: str
    c_in: int
    c_out: int
    stride: int = 1


def projection(kind: str, c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Module:
    """A linear map on the feature axis: ``nn.Linear`` for tokens, a strided 1x1 conv for channels."""
    if kind == "token":
        return nn.Linear(c_in, c_out, bias=bias)
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=bias)


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class LowRank(nn.Module):
    """``x -> up(dropout(act(down(x)))) * scale`` with ``up`` zero-initialised."""

    uses_output = False  # the input is the block's input

    def __init__(
        self,
        shape: BlockShape,
        dim: int,
        scale: float = 1.0,
        dropout: float = 0.0,
        act: nn.Module | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.scale = scale
        self.down = projection(shape.kind, shape.c_in, dim, shape.stride, bias)
        self.act = act or nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.up = _zero_(projection(shape.kind, dim, shape.c_out, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.down(x))
        if self.dropout.p:  # dropout 0 and scale 1 (the defaults) are the identity: no call for them
            h = self.dropout(h)
        out = self.up(h)
        return out if self.scale == 1.0 else out * self.scale


class Bottleneck(LowRank):
    """Parallel bottleneck adapter (AdaptFormer/SEMA): down -> ReLU -> up, width ``dim``."""

    def __init__(self, shape: BlockShape, dim: int, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__(shape, dim, scale, dropout, act=nn.ReLU())


class LoRA(LowRank):
    """A rank-``dim`` parallel linear map ``B(A(x)) * scale`` (no biases, ``B`` zero-initialised)."""

    def __init__(self, shape: BlockShape, dim: int, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__(shape, dim, scale, dropout, bias=False)


class RankOne(LowRank):
    """``dim`` rank-one experts ``b_i <a_i, x>``; a self-activated gate keeps the ``top_k`` largest ``|<a_i, x>|``.

    Several RankOne modules (one per task) are gated jointly by ``RankOne.mix`` so that experts of all
    tasks compete for the same ``top_k`` slots (MoRA-style growth: one rank per task).
    """

    def __init__(
        self, shape: BlockShape, dim: int, scale: float = 1.0, dropout: float = 0.0, top_k: int | None = None
    ) -> None:
        super().__init__(shape, dim, scale, dropout, bias=False)
        self.top_k = top_k

    @property
    def feature_axis(self) -> int:
        return -1 if self.shape.kind == "token" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RankOne.mix([self], x, self.top_k)

    @staticmethod
    def mix(
        experts: list[RankOne], x: torch.Tensor, top_k: int | None, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sum of the experts' deltas, keeping the ``top_k`` rank-one components with the largest activation
        per position across all experts; ``weights`` ``[B, K]`` scale each module's contribution."""
        axis = experts[0].feature_axis
        acts = [e.down(x) for e in experts]
        s = torch.cat(acts, axis)
        if top_k is not None and top_k < s.shape[axis]:
            keep = torch.zeros_like(s).scatter_(axis, s.abs().topk(top_k, axis).indices, 1.0)
            s = s * keep
        out = None
        for k, (e, part) in enumerate(zip(experts, s.split([a.shape[axis] for a in acts], axis), strict=True)):
            delta = e.up(e.dropout(part)) * e.scale
            if weights is not None:
                delta = delta * per_sample(weights[:, k], delta)
            out = delta if out is None else out + delta
        return out


class SSF(nn.Module):
    """Scale and shift of the block output ``y``, as a delta: ``(gamma - 1) * y + beta`` (gamma 1, beta 0 at init)."""

    uses_output = True  # the input is the block's output

    def __init__(self, shape: BlockShape, dim: int = 0, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.shape = shape
        self.gamma = nn.Parameter(torch.ones(shape.c_out))
        self.beta = nn.Parameter(torch.zeros(shape.c_out))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        view = (-1,) if self.shape.kind == "token" else (-1, 1, 1)
        return (self.gamma - 1).view(view) * y + self.beta.view(view)


def per_sample(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``[B]`` shaped to broadcast over ``like`` ``[B, ...]``."""
    return w.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


ADAPTERS: dict[str, type[nn.Module]] = {"bottleneck": Bottleneck, "lora": LoRA, "ssf": SSF, "rank1": RankOne}


def build_adapter(config: AdapterConfig, shape: BlockShape) -> nn.Module:
    """A fresh adapter of ``config.kind`` that fits ``shape`` (zero delta at creation)."""
    extra = {"top_k": config.top_k} if config.kind == "rank1" else {}
    return ADAPTERS[config.kind](shape, config.width(shape.kind), config.scale, config.dropout, **extra)
