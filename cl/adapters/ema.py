"""Exponential moving averages of module weights: a slow copy that accumulates what a fast one learns.

Used by LAE (offline adapters that follow the online ones); the same helper serves mean-teacher or
weight-averaging methods. The update is ``torch.optim.swa_utils.get_ema_multi_avg_fn``: one fused
``_foreach_lerp_`` over all tensors, whatever their number.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from cl.errors import ConfigError


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for every parameter (``momentum=0`` copies).

    Buffers are copied (an average of running statistics or counters means nothing). ``target`` and
    ``source`` must have the same structure; ``target`` is changed in place, outside autograd.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"EMA momentum must be in [0, 1], got {momentum}")
    tp, sp = _matched(target.parameters(), source.parameters(), "parameters")
    if tp and momentum == 0.0:
        torch._foreach_copy_(tp, sp)
    elif tp:
        get_ema_multi_avg_fn(momentum)(tp, sp, None)
    tb, sb = _matched(target.buffers(), source.buffers(), "buffers")
    if tb:
        torch._foreach_copy_(tb, sb)


def _matched(target, source, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    t, s = list(target), list(source)
    if [x.shape for x in t] != [x.shape for x in s]:
        raise ConfigError(
            f"EMA target and source {what} differ: {[tuple(x.shape) for x in t][:4]} vs "
            f"{[tuple(x.shape) for x in s][:4]} (give modules of the same structure)"
        )
    return t, s
