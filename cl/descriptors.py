"""Representation descriptors (SEMA): a small autoencoder per adapter on the pooled input of its layer.

A descriptor learns to reconstruct the inputs its adapter was trained on and keeps a FIFO of its recent
reconstruction losses; a batch whose loss z-score is high under every descriptor of a layer is new to
that layer (a distribution shift), which is the signal to add an adapter there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl.errors import ConfigError


class Descriptor(nn.Module):
    """Linear autoencoder ``dim -> hidden -> dim`` trained with MSE; ``recent`` holds the last losses (FIFO)."""

    def __init__(self, dim: int, hidden: int = 128, buffer_size: int = 500) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, hidden)
        self.decoder = nn.Linear(hidden, dim)
        self.register_buffer("recent", torch.zeros(buffer_size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # losses ever recorded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction MSE ``[B]`` of pooled inputs ``[B, dim]``."""
        return (self(x) - x).pow(2).mean(-1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training objective: mean reconstruction MSE of a batch."""
        return F.mse_loss(self(x), x)

    @torch.no_grad()
    def record(self, losses: torch.Tensor) -> None:
        """Push per-sample losses into the FIFO (the oldest fall out)."""
        size = self.recent.numel()
        losses = losses.detach().flatten()
        skipped = max(0, losses.numel() - size)
        losses = losses[skipped:]
        idx = (self.count + skipped + torch.arange(losses.numel(), device=self.recent.device)) % size
        self.recent[idx] = losses.to(self.recent)
        self.count += losses.numel() + skipped

    @property
    def filled(self) -> int:
        return int(min(int(self.count), self.recent.numel()))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the recorded losses (no host sync)."""
        valid = (torch.arange(self.recent.numel(), device=self.recent.device) < self.count).to(self.recent)
        n = valid.sum()
        mean = (self.recent * valid).sum() / n.clamp_min(1)
        var = ((self.recent - mean).pow(2) * valid).sum() / (n - 1).clamp_min(1)
        return mean, var.sqrt().clamp_min(1e-8)

    def zscore(self, loss: torch.Tensor) -> torch.Tensor:
        """How many standard deviations ``loss`` lies above the recorded losses (empty buffer: the raw loss)."""
        mean, std = self.stats()
        return torch.where(self.count > 0, (loss - mean) / std, loss)


class DescriptorSet(nn.ModuleDict):
    """A layer's descriptors by adapter name; creates the ones a loaded state dict names that it lacks."""

    def __init__(self, dim: int, hidden: int = 128, buffer_size: int = 500) -> None:
        super().__init__()
        self.dim = dim
        self.hidden = hidden
        self.buffer_size = buffer_size
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    @property
    def names(self) -> list[str]:
        return list(self.keys())

    def add(self, name: str) -> Descriptor:
        if name in self:
            raise ConfigError(f"descriptor {name!r} already exists (have: {', '.join(self.names)})")
        self[name] = d = Descriptor(self.dim, self.hidden, self.buffer_size).to(self._anchor.device)
        return d

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction losses ``[B, K]`` under each descriptor, in ``names`` order."""
        return torch.stack([d.losses(x) for d in self.values()], -1)

    def zscores(self, x: torch.Tensor) -> torch.Tensor:
        """Loss z-scores ``[B, K]`` against each descriptor's recorded losses."""
        return torch.stack([d.zscore(d.losses(x)) for d in self.values()], -1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key, value in state_dict.items():
            if key.startswith(prefix) and key.endswith(".encoder.weight"):
                name = key[len(prefix) : -len(".encoder.weight")]
                if "." not in name and name not in self:
                    size = state_dict[f"{prefix}{name}.recent"].numel()
                    self[name] = Descriptor(value.shape[1], value.shape[0], size).to(value.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def train_descriptor(
    d: Descriptor, x: torch.Tensor, *, lr: float, epochs: int, batch_size: int, keep: int,
    generator: torch.Generator | None = None, progress: Any = None, desc: str = "descriptor",
) -> None:
    """Fit descriptor ``d`` to the pooled inputs ``x`` ``[N, c]`` (Adam, ``epochs`` shuffled passes in batches of
    ``batch_size``), then freeze it and record the losses of the last ``keep`` rows as its reference statistics.
    ``progress``: the engine's progress-bar wrapper (``ctx.progress``) or None."""
    d.requires_grad_(True)
    opt = torch.optim.Adam(d.parameters(), lr=lr, foreach=True)  # the same values as the per-tensor loop, fewer calls
    steps = range(epochs) if progress is None else progress(range(epochs), epochs, desc)
    for _ in steps:
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            opt.zero_grad(set_to_none=True)
            d.loss(x[idx]).backward()
            opt.step()
    d.requires_grad_(False)
    with torch.no_grad():
        d.record(d.losses(x[-keep:]))


@dataclass(frozen=True)
class ShiftDecision:
    """Whether a batch is new to a layer: ``shift`` when every descriptor's mean z-score exceeds ``tau``."""

    shift: bool
    zscores: dict[str, float]
    tau: float


class ShiftDetector:
    """SEMA's expansion signal: a shift when the batch's loss z-score is above ``tau`` under EVERY descriptor."""

    def __init__(self, tau: float = 2.0) -> None:
        self.tau = tau

    @torch.no_grad()
    def __call__(self, descriptors: DescriptorSet | dict[str, Descriptor], pooled: torch.Tensor) -> ShiftDecision:
        """Decide for pooled layer inputs ``[B, dim]``; a layer without descriptors always shifts."""
        items: Iterable[tuple[str, Descriptor]] = descriptors.items()
        z: dict[str, float] = {}
        for name, d in items:
            if not int(d.count):
                raise ConfigError(f"descriptor {name!r} has no recorded losses: record() its training losses first")
            z[name] = float(d.zscore(d.losses(pooled)).mean())
        return ShiftDecision(all(v > self.tau for v in z.values()), z, self.tau)
