"""``AdapterStrategy``: the base of the adapter methods (APER, SEMA, MOS, LAE, key retrieval).

Adapter pools injected into blocks ``layers`` of the frozen backbone (``pools``, by block index), a masked
cross-entropy ``train_head`` that trains them, the frozen prefix up to the first adapted block, and ``fit_alone``:
train the adapters an experience added with every input routed to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import PositiveInt
from torch.utils.data import Dataset

from cl.adapters import AdapterConfig, AdapterPool, inject
from cl.backbones.base import Backbone
from cl.backbones.state import State, untapped
from cl.errors import ConfigError
from cl.experience import Experience
from cl.heads import HeadChoice, LinearHead, masked_cross_entropy
from cl.routing import OFF, Routes, routed, routes_to_each, routing
from cl.strategy import Strategy
from cl.taps import TapChoice

#: what the head of an adapter strategy sees: ``[frozen, adapted]`` embeddings, or the adapted one alone ("mixture":
#: SEMA's word for it)
HeadFeatures = Literal["concat", "adapted", "mixture"]


class AdapterStrategy(TapChoice, HeadChoice, Strategy):
    """Base of the adapter methods (APER, SEMA, MOS, LAE, key retrieval): adapter pools injected into blocks
    ``layers`` of the frozen backbone (``pools``, by block index), a masked-CE ``train_head`` that trains them,
    the frozen prefix up to the first adapted block, and a head chosen by name over ``routed_features``
    (``[taps, frozen, adapted]``: ``taps`` and ``head_features`` say which parts).

    Args:
        layers: blocks to adapt (negative: from the end), or ``"all"``.
        adapter: adapter kind (``bottleneck``, ``lora``, ``ssf``, ``rank1``).
        adapter_dim: bottleneck width or rank (default: the kind's).
        head_features: what the head sees: ``"concat"`` ``[frozen, adapted]`` embeddings, ``"adapted"`` (or
            ``"mixture"``) the adapted one alone (None: the class's ``param_defaults``).
        kw: ``taps`` (``TapChoice``: the frozen backbone's pooled block outputs in front of the head's features),
            ``head`` and ``head_kw`` (``HeadChoice``) and the training parameters of ``Strategy``.
    """

    param_defaults: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 128, "head": "lda",
                                                "head_features": "concat"}

    def __init__(
        self,
        backbone: Backbone,
        *,
        layers: Sequence[int] | Literal["all"] = (-3, -2, -1),
        adapter: str = "bottleneck",
        adapter_dim: PositiveInt | None = None,
        head_features: HeadFeatures | None = None,
        **kw: Any,
    ) -> None:
        chosen = None if layers == "all" else list(layers)  # None: every block
        config = AdapterConfig(kind=adapter, dim=adapter_dim, layers=chosen, router=None)
        injected = {i: p for c in self.pool_configs(backbone, config) for i, p in inject(backbone, c).items()}
        self.pools: dict[int, AdapterPool] = dict(sorted(injected.items()))
        super().__init__(backbone, **{**self.base_defaults(), **kw})
        self.head_features = self.defaults()["head_features"] if head_features is None else head_features
        self.concat = self.head_features == "concat"  # the head sees [frozen, adapted] (``routed_features``)
        self.train_head = LinearHead(backbone.embed_dim)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Parameters that do not go together (the registry calls this after checking each one)."""
        if params.get("head") == "linear" and params.get("head_features") == "concat":
            raise ValueError("head='linear' is the training head, over the adapted embedding alone: use "
                             "head_features='adapted'")
        if params.get("head") == "linear" and params.get("taps"):
            raise ValueError("head='linear' is the training head, over the adapted embedding alone: taps feed a "
                             "statistics head (ncm, lda, ranpac)")

    @property
    def pool(self) -> AdapterPool:
        """The first adapted block's pool: where a strategy that adds the same adapters to every pool (one per
        experience) reads their names and owners."""
        return self.pools[min(self.pools)]

    @property
    def head_dim(self) -> int:
        """The width of what the head sees (``routed_features``)."""
        return self.tap_dim + self.backbone.embed_dim * (2 if self.concat else 1)

    def adapter_config(self, config: AdapterConfig) -> AdapterConfig:
        """The pools' configuration (a subclass adds its router here); called before ``Strategy.__init__``."""
        return config

    def pool_configs(self, backbone: Backbone, config: AdapterConfig) -> list[AdapterConfig]:
        """The configurations the pools are injected with, one per group of blocks (default: ``adapter_config`` for
        every adapted block; SEMA gives the blocks it never expands pools without descriptors); called before
        ``Strategy.__init__``."""
        return [self.adapter_config(config)]

    @property
    def frozen_depth(self) -> int:
        return min(self.pools)

    def fit_alone(self, exp: Experience) -> None:
        """Train the adapters ``exp`` added (``pool.add(name, owner=exp.id)`` in every pool) with every input routed
        to them alone, then freeze them."""
        names = {i: p.owned_by(exp.id) for i, p in self.pools.items()}
        if None in names.values():
            missing = [i for i, n in names.items() if n is None]
            raise ConfigError(f"{type(self).__name__}: experience {exp.id} added no adapter to the pools of blocks "
                              f"{missing}: add one with pool.add(name, owner={exp.id}) before fit_alone")
        with routing(self.pools, routes_to_each(self.pools, names)):
            Strategy.fit(self, exp)
        for i, name in names.items():
            self.pools[i].freeze(name)

    def routed_features(self, state: State, routes: Routes = None, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """What the head sees with the adapters under ``routes`` (see ``embedding``): the adapted embedding, with
        ``head_features="concat"`` behind the frozen one, and behind the frozen backbone's ``taps`` when it taps
        blocks: ``[taps, frozen, adapted]`` (``frozen``: the frozen embedding, when already computed)."""
        adapted = self.embedding(state, routes)
        parts = []
        if self.taps:  # a frozen pass for taps of adapted blocks gives the frozen embedding too
            taps, frozen = self.tap_features(state, frozen)
            parts.append(taps)
        if self.concat:
            parts.append(self.embedding(state, OFF) if frozen is None else frozen)
        return torch.cat([*parts, adapted], 1) if parts else adapted

    @property
    def uses_frozen(self) -> bool:
        """Whether the head's features read the frozen embedding (``head_features="concat"``, or taps of adapted
        blocks, whose frozen pass gives it); ``states_with_frozen`` computes it only then."""
        depth = self.frozen_depth
        return self.concat or any(i >= depth for i in self.taps)

    def frozen_embeddings(self, dataset) -> torch.Tensor | None:
        """The frozen model's embeddings ``[N, embed_dim]`` (adapters off) of every item of ``dataset``, computed once
        and kept with its cached prefix states (``pretrained_embeddings``: an adapter strategy trains adapters and
        heads, never the backbone's own weights); None when they cannot be cached."""
        return None if self._pretrained else self.pretrained_embeddings(dataset)

    def states_with_frozen(self, dataset, batch_size: int, desc: str = "batches"):
        """``(prefix state, frozen embedding or None, targets)`` batches of ``dataset`` in order (``iterate_states``
        with the matching rows of ``frozen_embeddings``; None where they are not cached or not ``uses_frozen``)."""
        frozen, start = (self.frozen_embeddings(dataset) if self.uses_frozen else None), 0
        for state, y in self.iterate_states(dataset, batch_size, desc=desc):
            yield state, None if frozen is None else frozen[start : start + len(y)], y
            start += len(y)

    @torch.no_grad()
    def pooled_inputs(
        self, dataset: Dataset, layers: list[int], limit: int | None = None, generator: torch.Generator | None = None
    ) -> dict[int, torch.Tensor]:
        """Pooled inputs ``[N, c]`` of ``layers`` for (up to ``limit`` shuffled items of) ``dataset``: each layer's
        block input (the blocks before it under the current routes), pooled as its pool pools it; the blocks from
        the last of ``layers`` on are not run."""
        chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        last, seen = max(layers), 0
        was = self.training
        self.eval()
        it = self.iterate_states(dataset, self.ctx.eval_batch_size, shuffle=generator is not None,
                                 generator=generator, desc="descriptor inputs")
        for state, _ in it:
            with routed(self.pools, self.routes(state)):
                state = untapped(state)  # the blocks read the state; taps matter to the routes only
                for i in range(self.frozen_depth, last + 1):
                    if i in chunks:
                        x, mask = (state[0], state[1]) if isinstance(state, tuple) else (state, None)
                        chunks[i].append(self.pools[i].pool_input(x, mask))
                    if i < last:
                        state = self.backbone.forward_block(i, state)
            seen += len(chunks[last][-1])
            if limit is not None and seen >= limit:
                break
        self.train(was)
        return {layer: torch.cat(c)[:limit] for layer, c in chunks.items()}

    def pool_metrics(self) -> dict[str, Any]:
        """Adapters per layer (count and names) and the parameters the pools added: functional (adapters +
        routers) and descriptors."""
        counts = [p.parameter_counts() for p in self.pools.values()]
        return {
            "adapters_per_layer": {str(layer): len(p) for layer, p in self.pools.items()},
            "adapter_names_per_layer": {str(layer): p.names for layer, p in self.pools.items()},
            "params_functional": sum(c["adapters"] + c["router"] for c in counts),
            "params_descriptors": sum(c["descriptors"] for c in counts),
        }

    def training_step(self, state: State, y: torch.Tensor) -> torch.Tensor:
        """Masked cross-entropy of ``train_head`` on the features through the adapters the current routes pick."""
        return masked_cross_entropy(self.train_head(self.embedding(state)), y, self.experience.classes)

    def iterate_states(self, dataset, batch_size: int, shuffle: bool = False, generator=None, desc: str = "batches",
                       **kw: Any):
        """As ``Strategy``'s; during evaluation a strategy with a route log (``self.log``) records its routes."""
        batches = super().iterate_states(dataset, batch_size, shuffle, generator, desc, **kw)
        log = getattr(self, "log", None)
        if self.training or log is None:
            return batches
        return log.watch(batches, self.emit, self.experience.id if self.experience is not None else None)
