"""Routes over adapter pools: which adapters each input runs through, forced for the length of a ``with`` block.

A route is, per pool, mixture weights (``[K]`` or ``[B, K]``) or an adapter name (every input to that adapter,
which then runs alone: no weights, no dispatch). ``routing(pools, routes)`` sets them, ``routes_to(pools, target)``
builds the routes that send inputs to an experience's adapters (or the adapter of a name) in every pool, and
``adapters_off(pools)`` runs the backbone as if it had none. ``routed(pools, routes)``
takes any of them (``Routes``): what ``Strategy.embedding(state, routes)`` runs the backbone under.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from cl.adapters.pool import AdapterPool


@contextmanager
def routing(pools: Mapping[int, AdapterPool], weights: Mapping[int, torch.Tensor | str]) -> Iterator[None]:
    """Force the routes of the given layers inside the block: mixture weights (``[K]`` or ``[B, K]``) or an adapter
    name."""
    before = {i: pools[i].route_override for i in weights}
    try:
        for i, w in weights.items():
            pools[i].route_override = w
        yield
    finally:
        for i, w in before.items():
            pools[i].route_override = w


def routes_to(pools: Mapping[int, AdapterPool], target: int | str | torch.Tensor) -> dict[int, torch.Tensor | str]:
    """The routes ``routing`` takes to send inputs to an experience's adapters (or to the adapter of that name) in
    every non-empty pool (as ``routes_to_each``)."""
    target = _single(target)  # once for every pool
    return {i: _route(p, target) for i, p in pools.items() if len(p)}


def routes_to_each(
    pools: Mapping[int, AdapterPool], targets: Mapping[int, int | str | torch.Tensor]
) -> dict[int, torch.Tensor | str]:
    """A route per layer to its target (e.g. the adapter each layer is training); ``routes_to`` sends every pool
    to the same one. One target for every input (an adapter name, an experience id, or experience ids ``[B]`` all
    equal) gives the adapter's name: it then runs alone on the whole batch; different experiences per input give
    one-hot weights ``[B, K]`` (``AdapterPool.route_to``)."""
    return {i: _route(pools[i], _single(t)) for i, t in targets.items()}


def _single(target: int | str | torch.Tensor) -> int | str | torch.Tensor:
    """Experience ids that are all the same (or a 0-d tensor) as one int: one experience for the whole batch."""
    if isinstance(target, torch.Tensor) and target.dim() <= 1 and target.numel():
        if target.numel() == 1:  # batch 1: no comparison to make
            return int(target.item())
        first = target.reshape(-1)[0]
        if bool((target == first).all()):
            return int(first)
    return target


def _route(pool: AdapterPool, target: int | str | torch.Tensor) -> torch.Tensor | str:
    """One pool's route to ``target`` (``_single``'d; see ``routes_to_each``)."""
    if isinstance(target, str):
        pool.adapter(target)  # or the error naming the pool's adapters
        return target
    if not isinstance(target, torch.Tensor) and int(target) >= 0:
        name = pool.adapter_name_for(int(target))
        if name is not None:
            return name
    return pool.route_to(target)  # weights [B, K], or route_to's error (no adapter for that experience)


@contextmanager
def adapters_off(pools: Mapping[int, AdapterPool]) -> Iterator[None]:
    """Run the backbone as if it had no adapters (every mixture weight 0): the frozen model's features."""
    with routing(pools, {i: torch.zeros(len(p), device=p.device) for i, p in pools.items() if len(p)}):
        yield


class _Off:
    """The route that switches every adapter off: ``OFF``."""

    def __repr__(self) -> str:
        return "OFF"


OFF = _Off()
#: routes, as ``routed`` and ``Strategy.embedding`` take them: None (as the pools route now: their routers and
#: overrides), ``OFF`` (every adapter off: the frozen model), ``{layer: weights [K] or [B, K], or an adapter name}``,
#: or an experience id, experience ids ``[B]`` or an adapter name (to its adapters in every pool: ``routes_to``)
Routes = Union[_Off, Mapping[int, torch.Tensor | str], int, str, torch.Tensor, None]  # noqa: UP007 (a runtime alias)


@contextmanager
def routed(pools: Mapping[int, AdapterPool], routes: Routes) -> Iterator[None]:
    """Run the ``with`` block under ``routes`` (see ``Routes``) over ``pools``."""
    if routes is None:
        yield
    elif routes is OFF:
        with adapters_off(pools):
            yield
    else:
        with routing(pools, routes if isinstance(routes, Mapping) else routes_to(pools, routes)):
            yield
