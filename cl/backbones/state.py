"""Prefix states: what a backbone's frozen prefix outputs and its adaptable suffix takes, in batches.

A state is a tensor with the batch first (``[B, L, D]`` tokens, ``[B, C, H, W]`` feature maps), or for text a tuple
``(hidden [B, L, D], attention_mask [B, L] of 0/1)``. These helpers treat both alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

State = torch.Tensor | tuple[torch.Tensor, ...]


def take_rows(state: State, rows: slice | torch.Tensor) -> State:
    """The rows ``rows`` (a slice or an index tensor) of a batch of states."""
    return tuple(s[rows] for s in state) if isinstance(state, tuple) else state[rows]


def to_device(state: State, device: torch.device | str) -> State:
    """A batch of states on ``device`` (copied without blocking where the copy allows it)."""
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
    if not isinstance(first, tuple):
        return pad_cat([s.to(first.device) for s in states])
    return tuple(pad_cat([s[i].to(p.device) for s in states]) for i, p in enumerate(first))
