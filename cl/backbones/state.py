"""Prefix states: what a backbone's frozen prefix outputs and its adaptable suffix takes, in batches.

A state is a tensor with the batch first (``[B, L, D]`` tokens, ``[B, C, H, W]`` feature maps), or for text a tuple
``(hidden [B, L, D], attention_mask [B, L] of 0/1)``, or either of these ``Tapped``: with the pooled outputs of some
blocks before it, computed in the same pass (``Backbone.forward_until(x, stop, taps)``). These helpers treat all alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Tapped:
    """A prefix state plus ``taps`` ``[B, T]``: the pooled outputs (feature maps: global average pool; tokens:
    (masked) token mean) of the blocks tapped on the way to it, concatenated in block order. Not a tuple, so that
    nothing takes it for a text state; ``Backbone.forward_from`` reads through it."""

    state: torch.Tensor | tuple[torch.Tensor, ...]
    taps: torch.Tensor


State = torch.Tensor | tuple[torch.Tensor, ...] | Tapped


def untapped(state: State) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The state without its taps (itself if it has none)."""
    return state.state if isinstance(state, Tapped) else state


def take_rows(state: State, rows: slice | torch.Tensor) -> State:
    """The rows ``rows`` (a slice or an index tensor) of a batch of states."""
    if isinstance(state, Tapped):
        return Tapped(take_rows(state.state, rows), state.taps[rows])
    return tuple(s[rows] for s in state) if isinstance(state, tuple) else state[rows]


def to_device(state: State, device: torch.device | str) -> State:
    """A batch of states on ``device`` (copied without blocking where the copy allows it)."""
    if isinstance(state, Tapped):
        return Tapped(to_device(state.state, device), state.taps.to(device, non_blocking=True))
    if isinstance(state, tuple):
        return tuple(s.to(device, non_blocking=True) for s in state)
    return state.to(device, non_blocking=True)


def pad_cat(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors with the batch first as one, zero-padded along dimension 1 to the longest (token states and masks
    of different lengths)."""
    if chunks[0].ndim >= 2 and len({c.shape[1] for c in chunks}) > 1:
        n = max(c.shape[1] for c in chunks)
        chunks = [F.pad(c, (0, 0) * (c.ndim - 2) + (0, n - c.shape[1])) for c in chunks]
    return torch.cat(list(chunks))


def cat_states(states: Sequence[State]) -> State:
    """Batches of prefix states as one, on the first one's device (token states padded to the longest)."""
    first = states[0]
    if isinstance(first, Tapped):
        inner = cat_states([s.state for s in states])
        return Tapped(inner, torch.cat([s.taps.to(first.taps.device) for s in states]))
    if not isinstance(first, tuple):
        return pad_cat([s.to(first.device) for s in states])
    return tuple(pad_cat([s[i].to(p.device) for s in states]) for i, p in enumerate(first))
