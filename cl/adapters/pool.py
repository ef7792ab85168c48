"""Adapter pools and their injection into a backbone's blocks (PEFT-style: config in, blocks wrapped).

``inject(backbone, config)`` wraps the chosen ``backbone.blocks[i]`` in ``AdaptedBlock``s, each holding an
``AdapterPool``: adapters by name, mixed by a router on the pooled block input. An adapter may record the
experience it was made for (its owner); ``route_to`` / ``routes_to`` send inputs to an experience's adapters.
A pool rebuilds the adapters, router columns, descriptors and owners a loaded state dict names, so a
checkpoint of an expanded model loads into a freshly injected one.

Routes over pools (``routing``, ``routes_to``, ``adapters_off``) live in ``cl.routing``; ``capturing`` stays here: it
records the pools' pooled inputs (a pool's sink, which SEMA's descriptors learn from) and routes nothing.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl.adapters.modules import AdapterConfig, BlockShape, RankOne, build_adapter, per_sample
from cl.backbones.base import Backbone
from cl.descriptors import DescriptorSet
from cl.errors import CheckpointError, ConfigError
from cl.routing.routers import create_router


class AdapterPool(nn.Module):
    """A block's adapters by name; ``forward(x, y)`` = sum_k w_k(x) * adapter_k(x) with w from the router.

    With one adapter (or no router) the weights are 1. ``route_override`` (``[K]`` or ``[1, K]``: every input;
    ``[B, K]``: one row per input; an adapter name: every input to that adapter alone, which then runs without
    weights) replaces the router, e.g. to route by task id or retrieval (``route_to``, ``adapter_name_for``).
    ``descriptors`` (optional) holds one descriptor per adapter.
    """

    def __init__(self, config: AdapterConfig, shape: BlockShape) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)
        self.config = config
        self.shape = shape
        self.adapters = nn.ModuleDict()
        self.frozen: set[str] = set()
        self._owners: dict[str, int] = {}  # adapter name -> the experience it was made for
        self._reused: dict[int, str] = {}  # experience that added no adapter here -> the adapter it uses (``reuse``)
        self.descriptors: DescriptorSet | None = None
        if config.descriptor_hidden or config.router == "descriptor":
            self.use_descriptors(config.descriptor_hidden or 128)
        kw = dict(config.router_kw, **({"descriptors": self.descriptors} if config.router == "descriptor" else {}))
        self.router = create_router(config.router, shape.c_in, **kw) if config.router else None
        self.route_override: torch.Tensor | str | None = None
        self._sink: tuple[dict[int, torch.Tensor], int] | None = None  # set by ``capturing``

    @property
    def device(self) -> torch.device:
        """Where the pool's adapters (and the weights it builds) live."""
        return self._anchor.device

    @property
    def names(self) -> list[str]:
        return list(self.adapters.keys())

    def __len__(self) -> int:
        return len(self.adapters)

    def adapter(self, name: str) -> nn.Module:
        """Adapter ``name``; ConfigError naming the pool's adapters if it has none of that name."""
        if name not in self.adapters:
            raise ConfigError(f"no adapter {name!r} (have: {', '.join(self.names) or 'none'})")
        return self.adapters[name]

    def add(self, name: str, owner: int | None = None) -> nn.Module:
        """Create adapter ``name`` (zero delta), its router column and descriptor; rebuild optimisers after.
        ``owner``: the experience the adapter is made for (``route_to`` finds it by that; None: no experience's)."""
        if not name or "." in name:
            raise ConfigError(f"adapter names must be non-empty and without '.', got {name!r}")
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} already exists (have: {', '.join(self.names)})")
        if owner is not None and int(owner) < 0:
            raise ConfigError(f"adapter {name!r}: the owner is an experience id >= 0, got {owner}")
        self.adapters[name] = adapter = build_adapter(self.config, self.shape).to(self._anchor.device)
        if owner is not None:
            self._owners[name] = int(owner)
        if self.router is not None:
            self.router.add_expert()
        if self.descriptors is not None:
            self.descriptors.add(name)
        return adapter

    def freeze(self, name: str) -> None:
        """Stop training adapter ``name`` and its router column (its descriptor is left to its trainer)."""
        self.adapter(name).requires_grad_(False)
        if self.router is not None:
            self.router.freeze(self.names.index(name))
        self.frozen.add(name)

    def owner(self, name: str) -> int | None:
        """The experience adapter ``name`` was made for (None: added without one)."""
        self.adapter(name)
        return self._owners.get(name)

    @property
    def owners(self) -> list[int]:
        """The owning experience of each adapter, in ``names`` order (-1: none)."""
        return [self._owners.get(n, -1) for n in self.names]

    def reuse(self, name: str, experience: int) -> None:
        """Experience ``experience``, which added no adapter to this pool, uses adapter ``name`` here (``adapter_for``
        routes it there instead of to the latest adapter added before it)."""
        self.adapter(name)
        if int(experience) < 0 or self.owned_by(int(experience)) is not None:
            raise ConfigError(f"experience {experience} cannot reuse {name!r}: give an experience id >= 0 that added "
                              f"no adapter to this pool")
        self._reused[int(experience)] = name

    def owned_by(self, experience: int) -> str | None:
        """The name of the adapter experience ``experience`` added to this pool (the last one, if several); None
        if it added none."""
        return next((n for n in reversed(self.names) if self._owners.get(n) == experience), None)

    def adapter_name_for(self, experience: int) -> str | None:
        """The adapter experience ``experience`` uses in this pool: the one it added (the latest, if several), or
        where it added none (it reused the pool), the one ``reuse`` gave it, else the latest added by an earlier
        experience; None if there is none."""
        if experience in self._reused:
            return self._reused[experience]
        usable = [n for n in self.names if 0 <= self._owners.get(n, -1) <= experience]
        return usable[-1] if usable else None

    def adapter_for(self, experiences: torch.Tensor) -> torch.Tensor:
        """Index into ``names`` of the adapter each experience of ``experiences`` ``[B]`` uses in this pool
        (``adapter_name_for``)."""
        exps = experiences.long().reshape(-1)
        seen, where = torch.unique(exps, return_inverse=True)
        names = [self.adapter_name_for(e) if e >= 0 else None for e in seen.tolist()]
        found = torch.tensor([-1 if n is None else self.names.index(n) for n in names], dtype=torch.long,
                             device=exps.device)[where]
        if bool((found < 0).any()):
            missing = sorted(set(exps[found < 0].tolist()))
            have = ", ".join(f"{n} (experience {o})" for n, o in zip(self.names, self.owners, strict=True) if o >= 0)
            raise ConfigError(f"no adapter for experiences {missing} in this pool (owned adapters: {have or 'none'})")
        return found

    def route_to(self, target: int | str | torch.Tensor) -> torch.Tensor:
        """One-hot mixture weights for ``route_override`` / ``routing``: an experience id or an adapter name gives
        ``[K]`` (every input to that experience's adapter, see ``adapter_for``, or to the named one); experience
        ids ``[B]`` give ``[B, K]`` (each input to its experience's adapter)."""
        if isinstance(target, str):
            self.adapter(target)
            return F.one_hot(torch.tensor(self.names.index(target), device=self._anchor.device), len(self)).float()
        exps = target if isinstance(target, torch.Tensor) else torch.tensor(int(target), device=self._anchor.device)
        if exps.dim() > 1:
            raise ConfigError(f"route_to takes one experience id per input ([B]), got shape {tuple(exps.shape)}")
        index = self.adapter_for(exps)
        return F.one_hot(index if exps.dim() else index[0], len(self)).float()

    def use_descriptors(self, hidden: int = 128, buffer_size: int = 500) -> DescriptorSet:
        """Give this layer a descriptor per adapter (existing ones included); returns the set."""
        if self.descriptors is None:
            self.descriptors = DescriptorSet(self.shape.c_in, hidden, buffer_size).to(self._anchor.device)
            for name in self.names:
                self.descriptors.add(name)
        return self.descriptors

    def pool_input(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Block input -> ``[B, c_in]``: token mean (over unmasked tokens) or global average pool."""
        if self.shape.kind == "channel":
            return x.mean((2, 3))
        if mask is None:
            return x.mean(1)
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)

    def mixture(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Weights ``[B, K]`` from the override or the router; None means weight 1 for every adapter."""
        if self.route_override is not None:
            w = self.route_override
            if isinstance(w, str):
                return self.route_to(w).expand(batch, -1)
            if w.shape[-1] != len(self):
                raise ConfigError(f"route_override has {w.shape[-1]} columns for {len(self)} adapters {self.names}")
            if w.dim() == 1 or (w.dim() == 2 and w.shape[0] in (1, batch)):
                return w.expand(batch, -1)
            raise ConfigError(
                f"route_override of shape {tuple(w.shape)} for a batch of {batch} inputs: give [K] or [1, K] "
                f"(the same weights for every input) or [{batch}, K] (one row per input)"
            )
        if self.router is None or len(self) == 1:
            return None
        return self.router(pooled)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Delta for block output ``y`` from block input ``x`` (``mask``: [B, L] token mask); None if empty."""
        routed = self.route_override is None and self.router is not None and len(self) > 1
        pooled = self.pool_input(x, mask) if routed or self._sink is not None else None
        if self._sink is not None:
            self._sink[0][self._sink[1]] = pooled.detach()
        if not len(self):
            return None
        name = self.route_override
        if isinstance(name, str) and self.config.kind != "rank1":  # every input to one adapter: it runs alone
            adapter = self.adapter(name)
            return adapter(y if adapter.uses_output else x)
        w = self.mixture(pooled, x.shape[0])
        if w is not None:
            w = w.to(x.device)
        experts = list(self.adapters.values())
        if self.config.kind == "rank1":
            return RankOne.mix(experts, x, self.config.top_k, w)
        if w is not None and not bool(w.any()):  # adapters off: the frozen block's output
            return None
        if w is not None and is_one_hot(w):
            return self._dispatch(experts, x, y, w.argmax(-1))
        out = None
        for k, adapter in enumerate(experts):
            delta = adapter(y if adapter.uses_output else x)
            if w is not None:
                delta = delta * per_sample(w[:, k], delta)
            out = delta if out is None else out + delta
        return out

    @staticmethod
    def _dispatch(experts: list[nn.Module], x: torch.Tensor, y: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Hard routes: each adapter runs only on the inputs routed to it (cost independent of K)."""
        out = None
        for k, adapter in enumerate(experts):
            idx = (route == k).nonzero().squeeze(1)
            if not len(idx):
                continue
            delta = adapter((y if adapter.uses_output else x).index_select(0, idx))
            if len(idx) == len(route):
                return delta
            if out is None:
                out = delta.new_zeros(len(route), *delta.shape[1:])
                if y.is_contiguous(memory_format=torch.channels_last) and out.dim() == 4:
                    out = out.contiguous(memory_format=torch.channels_last)
            out = out.index_copy(0, idx, delta)
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by role: functional (adapters, router) and detection-only (descriptors)."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {"adapters": count(self.adapters), "router": count(self.router), "descriptors": count(self.descriptors)}

    def get_extra_state(self) -> dict[str, Any]:
        owners = {n: o for n, o in zip(self.names, self.owners, strict=True) if o >= 0}
        state = {"kind": self.config.kind, "names": self.names, "frozen": sorted(self.frozen), "owners": owners}
        return {**state, "reused": dict(self._reused)} if self._reused else state  # as before unless reuse was used

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.config.kind) != self.config.kind:
            raise CheckpointError(
                f"checkpoint has a {state['kind']!r} adapter pool where this model has a "
                f"{self.config.kind!r} one: inject with the config the checkpoint was made with"
            )
        for name in state.get("frozen", []):
            self.freeze(name)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "_extra_state") or {}
        at = prefix + "adapters."
        names = saved.get("names") or list(
            dict.fromkeys(k[len(at) :].split(".")[0] for k in state_dict if k.startswith(at))
        )
        if self.descriptors is None:
            enc = next(
                (
                    v
                    for k, v in state_dict.items()
                    if k.startswith(prefix + "descriptors.") and k.endswith(".encoder.weight")
                ),
                None,
            )
            if enc is not None:
                self.use_descriptors(enc.shape[0])
        owners = saved.get("owners")
        if owners is None:  # a checkpoint from before owners were recorded: strategies named adapters e<experience>
            owners = {n: int(n[1:]) for n in names if re.fullmatch(r"e\d+", n)}
        for name in names:
            if name not in self.adapters:
                self.add(name, owner=owners.get(name))
            elif name in owners:
                self._owners[name] = int(owners[name])
        self._reused = {int(e): n for e, n in (saved.get("reused") or {}).items()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def is_one_hot(w: torch.Tensor) -> bool:
    """Whether every row of mixture weights ``[B, K]`` is a one-hot vector (hard routes)."""
    return bool(((w == 0) | (w == 1)).all()) and bool((w.sum(-1) == 1).all())


class AdaptedBlock(nn.Module):
    """A backbone block plus its adapter pool: the block's (first) output gets the pool's delta added."""

    def __init__(self, block: nn.Module, pool: AdapterPool) -> None:
        super().__init__()
        self.block = block
        self.pool = pool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        if not len(self.pool) and self.pool._sink is None:
            return out
        y = out[0] if isinstance(out, tuple) else out
        x = args[0] if args else next(iter(kwargs.values()))  # the block's input: its first argument
        delta = self.pool(x, y, token_mask(kwargs.get("attention_mask"), y))
        if delta is None:
            return out
        return (y + delta, *out[1:]) if isinstance(out, tuple) else y + delta

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)  # the wrapped block's attributes stay reachable


def token_mask(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """A ``[B, L]`` bool mask of real tokens from a block's attention mask: 0/1 ``[B, L]``, or an HF
    ``[B, 1, L, L]`` mask (bool, True = attend, or additive float, 0 = attend); None for anything else."""
    if attention_mask is None or attention_mask.shape[0] != hidden.shape[0]:
        return None
    m = attention_mask
    if m.dim() == 2 and m.shape[1] == hidden.shape[1]:
        return m.bool()
    if m.dim() == 4 and m.shape[-1] == hidden.shape[1]:
        return (m if m.dtype == torch.bool else m > -1e3).flatten(1, 2).any(1)
    return None


def select_blocks(backbone: Backbone, config: AdapterConfig) -> list[int]:
    """Block indices chosen by ``config.layers`` (negative from the end) or ``config.pattern``; all if neither."""
    n = backbone.num_blocks
    if config.layers is not None:
        bad = [i for i in config.layers if not -n <= i < n]
        if bad:
            raise ConfigError(
                f"adapter layers {bad} out of range for {backbone.name or 'the backbone'} "
                f"with {n} blocks (valid: {-n}..{n - 1})"
            )
        return sorted({i % n for i in config.layers})
    if config.pattern is None:
        return list(range(n))
    qualified = {id(m): name for name, m in backbone.named_modules()}
    chosen = [
        i
        for i, b in enumerate(backbone.blocks)
        if fnmatch.fnmatch(f"blocks.{i}", config.pattern) or fnmatch.fnmatch(qualified[id(b)], config.pattern)
    ]
    if not chosen:
        raise ConfigError(
            f"adapter pattern {config.pattern!r} matches no block (block names look like "
            f"'blocks.0' or {qualified[id(backbone.blocks[0])]!r})"
        )
    return chosen


@torch.no_grad()
def block_shapes(backbone: Backbone, indices: list[int]) -> dict[int, BlockShape]:
    """Input/output width and stride of the chosen blocks (channel blocks: one probe forward in eval mode)."""
    if backbone.block_kind == "token":
        dims = backbone.block_dims()
        return {i: BlockShape("token", dims[i], dims[i]) for i in indices}
    found: dict[int, BlockShape] = {}

    def hook(i: int, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        x = args[0]
        found[i] = BlockShape("channel", x.shape[1], out.shape[1], math.ceil(x.shape[-1] / out.shape[-1]))

    handles = [backbone.blocks[i].register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i in indices]
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        x = torch.zeros(1, *backbone.data_config.input_size, device=backbone.device)
        backbone.forward_features(x.contiguous(memory_format=torch.channels_last) if backbone.channels_last else x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return found


def inject(backbone: Backbone, config: AdapterConfig) -> dict[int, AdapterPool]:
    """Wrap the blocks ``config`` chooses in AdaptedBlocks with empty pools; already wrapped blocks keep theirs."""
    indices = select_blocks(backbone, config)
    fresh = [i for i in indices if not isinstance(backbone.blocks[i], AdaptedBlock)]
    shapes = block_shapes(backbone, fresh) if fresh else {}
    out: dict[int, AdapterPool] = {}
    for i in indices:
        block = backbone.blocks[i]
        if isinstance(block, AdaptedBlock):
            if block.pool.config.kind != config.kind:
                have = block.pool.config.kind
                raise ConfigError(f"block {i} already has a {have!r} adapter pool, not {config.kind!r}")
            out[i] = block.pool
            continue
        out[i] = AdapterPool(config, shapes[i]).to(backbone.device)
        backbone.blocks[i] = wrapper = AdaptedBlock(block, out[i])
        wrapper.training = block.training  # the block's mode (a frozen backbone's folded copies need eval mode)
    return out


def pools(backbone: Backbone) -> dict[int, AdapterPool]:
    """The adapter pools of an injected backbone by block index."""
    return {i: b.pool for i, b in enumerate(backbone.blocks) if isinstance(b, AdaptedBlock)}


@contextmanager
def capturing(pools: Mapping[int, AdapterPool]) -> Iterator[dict[int, torch.Tensor]]:
    """Yields ``{layer: pooled block input [B, c_in]}`` (detached), filled by each forward inside the block."""
    found: dict[int, torch.Tensor] = {}
    try:
        for i, p in pools.items():
            p._sink = (found, i)
        yield found
    finally:
        for p in pools.values():
            p._sink = None
