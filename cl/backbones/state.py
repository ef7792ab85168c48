"""Prefix states: what a backbone's frozen prefix outputs and its adaptable suffix takes, in batches.

A state is a tensor with the batch first (``[B, L, D]`` tokens, ``[B, C, H, W]`` feature maps), or for text a tuple
``(hidden [B, L, D], attention_mask [B, L] of 0/1)``. These helpers treat both alike.
"""

from __future__ import annotations

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


def cat_states(a: State, b: State) -> State:
    """Two batches of prefix states as one (token states padded to the longer length)."""
    if not isinstance(a, tuple):
        return torch.cat([a, b.to(a.device)])
    n = max(a[0].shape[1], b[0].shape[1])
    return tuple(torch.cat([_pad(p, n), _pad(q.to(p.device), n)]) for p, q in zip(a, b, strict=True))


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.ndim < 2 or x.shape[1] == n:
        return x
    return F.pad(x, (0, 0) * (x.ndim - 2) + (0, n - x.shape[1]))
