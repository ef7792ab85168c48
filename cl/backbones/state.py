"""Prefix states: what a backbone's frozen prefix outputs and its adaptable suffix takes, in batches.

A state is a tensor with the batch first (``[B, L, D]`` tokens, ``[B, C, H, W]`` feature maps), or for text a tuple
``(hidden [B, L, D], attention_mask [B, L] of 0/1)``. These helpers treat both alike.
"""

from __future__ import annotations

import torch

State = torch.Tensor | tuple[torch.Tensor, ...]


def take_rows(state: State, rows: slice | torch.Tensor) -> State:
    """The rows ``rows`` (a slice or an index tensor) of a batch of states."""
    return tuple(s[rows] for s in state) if isinstance(state, tuple) else state[rows]


def to_device(state: State, device: torch.device | str) -> State:
    """A batch of states on ``device`` (copied without blocking where the copy allows it)."""
    if isinstance(state, tuple):
        return tuple(s.to(device, non_blocking=True) for s in state)
    return state.to(device, non_blocking=True)
