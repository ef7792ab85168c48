"""Loading module state by value: what a checkpoint holds decides the shapes, so state that grows needs no code.

Before a state dict is loaded, every parameter and buffer it names whose saved shape differs from the module's in
the first dimension only takes the saved shape (then the saved values): state that grows with the stream along its
first dimension (seen classes, per-class rows of a head, keys, a user's per-class counts grown by ``torch.cat``)
saves and loads with no override. Other shape differences still fail to load. Structural growth (adapters,
router columns and descriptors created by name) stays with the modules that own it: their ``_load_from_state_dict``
creates what a state dict names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def resize_to(module: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Give each tensor of ``module`` (submodules included) that ``state_dict`` holds with another first dimension the
    saved shape (values undefined until loaded); returns the names resized."""
    resized = []
    for name, saved in state_dict.items():
        if not isinstance(saved, torch.Tensor):
            continue
        path, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(path)
        except AttributeError:  # a module the loaders create by name, or an unexpected key (reported by the load)
            continue
        for table in (owner._parameters, owner._buffers):
            current = table.get(attr)
            if current is None or not _grown(current, saved):
                continue
            fresh = current.new_empty(saved.shape)
            table[attr] = nn.Parameter(fresh, requires_grad=current.requires_grad) if table is owner._parameters \
                else fresh
            resized.append(name)
    return resized


def _grown(current: torch.Tensor, saved: torch.Tensor) -> bool:
    return current.ndim == saved.ndim >= 1 and current.shape[1:] == saved.shape[1:] and current.shape != saved.shape


class LoadsByValue(nn.Module):
    """A module whose ``load_state_dict`` first resizes its grown tensors to the state dict's (``resize_to``)."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        resize_to(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
