"""Adapter merging (MOS): pull a newly trained adapter towards the earlier ones, once, after its task.

``merge_into(target, earlier, momentum)`` sets every parameter of ``target`` to
``(1 - momentum) * target + momentum * mean(earlier)`` in place. It is a weight-space operation done
once at the end of a task and stored as the adapter's weights: nothing is re-merged inside a forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cl.adapters.pool import AdapterPool
from cl.errors import ConfigError


@torch.no_grad()
def merge_into(target: nn.Module, earlier: Sequence[nn.Module], momentum: float) -> None:
    """``target <- (1 - momentum) * target + momentum * mean(earlier)``, parameter by parameter (in place)."""
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"merge momentum must be in [0, 1], got {momentum}")
    if not earlier or momentum == 0.0:
        return
    params = list(target.parameters())
    for other in earlier:
        if [p.shape for p in other.parameters()] != [p.shape for p in params]:
            raise ConfigError(f"cannot merge a {type(other).__name__} of another shape into a {type(target).__name__}")
    for i, p in enumerate(params):
        mean = torch.stack([list(m.parameters())[i].detach() for m in earlier]).mean(0)
        p.mul_(1.0 - momentum).add_(mean.to(p), alpha=momentum)


def merge_pools(pools: Mapping[int, AdapterPool], name: str, earlier: Sequence[str], momentum: float) -> list[int]:
    """Merge adapter ``name`` with the ``earlier`` adapters of each pool that has them; returns the layers merged."""
    merged = []
    for layer, pool in pools.items():
        others = [pool.adapters[n] for n in earlier if n in pool.adapters and n != name]
        if name in pool.adapters and others:
            merge_into(pool.adapters[name], others, momentum)
            merged.append(layer)
    return merged
