"""SEMA: self-expanding mixtures of adapters (Wang et al., CVPR 2025), built from ``cl`` parts.

Per experience: scan the adaptable layers in order; a layer whose representation descriptors all
flag the new data as shifted (loss z-score > tau) gets one new adapter (at most one per layer per
experience), which is trained before the following layers are scanned. Descriptors are then
trained on the adapter's inputs; old adapters, router columns and descriptors stay frozen.
``expandable`` gives the paper's layout: every adapted block (``layers: all``) gets an adapter at the first
experience, only the ``expandable`` ones (the paper: blocks 9-11 of 12) have descriptors and grow after it.

The defaults follow what we measured (README): one backbone pass per input. The frozen prefix's pooled block
outputs (``taps="prefix"``, from the same pass) pick each input's experience with an LDA task head
(``route_by="taps"``), which routes it to that experience's adapters (hard routes: old inputs keep exactly their
old adapters); the classifier is an LDA head over ``[prefix taps, mixture]`` (``head_features="adapted"``).
``route_by="head"`` with ``head_features="concat"`` (the earlier defaults) routes and classifies with the frozen
embedding too, which costs a second pass of the adapted blocks. ``head="linear"`` with ``head_features="mixture"``
and ``route_by="layer"`` gives the paper's masked-CE linear classifier and per-layer routers. ``sema_replay``
(below) is SEMA trained with exemplar replay.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt
from torch.utils.data import Dataset

from cl import distributed as dist
from cl.adapter_strategy import AdapterStrategy
from cl.adapters import AdapterConfig, AdapterPool
from cl.adapters.pool import select_blocks
from cl.backbones.base import Backbone, State
from cl.backbones.state import untapped
from cl.descriptors import ShiftDetector, train_descriptor
from cl.errors import ConfigError
from cl.experience import Experience
from cl.heads import Head, create_head, masked_cross_entropy
from cl.registry import register_strategy
from cl.replay import with_replay
from cl.routing import OFF, Routes, routes_to, routes_to_each, routing


@register_strategy("sema")
class SEMA(AdapterStrategy):
    """Self-expanding adapters: descriptors detect shifts, a pool per layer grows only when needed.

    Args:
        router: how a layer mixes its adapters: a registered router (``descriptor``: by the descriptors' z-scores,
            no training; ``softmax``, ``topk``: learned; ``fixed``).
        router_kw: the router's own parameters (default for ``descriptor``: ``{"hard": True}``, one adapter each).
        tau: expansion threshold: a layer adds an adapter when the new data's loss z-score under every descriptor
            of its pool is above it.
        reuse: which adapter an experience uses in a layer where it added none: ``latest`` (the latest one added
            there before it) or ``nearest`` (the one whose descriptor gave its data the lowest z-score: on a stream
            whose domains recur, the one trained on the same domain).
        descriptor_hidden: hidden width of each adapter's descriptor (an autoencoder of the adapter's inputs).
        buffer_size: how many of an experience's inputs set a new descriptor's loss statistics (its z-score scale).
        descriptor_epochs: training epochs of each new descriptor.
        descriptor_lr: learning rate of the descriptors (Adam).
        scan_samples: training inputs per experience the shift test of each layer looks at.
        rescan: train a new adapter before the later layers are tested (they then see its outputs).
        warm_start: a new adapter starts as a copy of the one the nearest past experience (the journal's) used.
        taps: blocks whose pooled outputs (from the frozen prefix pass) route (``route_by="taps"``) and feed the
            statistics head: ``"auto"`` (the blocks before the first adapted one when routing by taps, else
            none), ``"prefix"``, ``"all"``, a list of block indices, or None.
    """

    always_expand = False  # True: a new adapter in every layer for every experience (no shift test)
    #: a training loop ends once an epoch improves the masked cross-entropy by less than 0.01 (or it is below 0.01):
    #: after the first loop of an experience the later layers' loops start near 0 (README, Speed)
    param_defaults: ClassVar[dict[str, Any]] = {"plateau_delta": 0.01, "head_features": "adapted"}

    def __init__(
        self,
        backbone: Backbone,
        *,
        router: str = "descriptor",
        router_kw: dict[str, Any] | None = None,
        route_by: Literal["layer", "task", "head", "taps"] | None = None,
        taps: Literal["all", "prefix", "auto"] | list[int] | None = "auto",
        tau: float = 2.0,
        reuse: Literal["latest", "nearest"] = "latest",
        descriptor_hidden: PositiveInt = 128,
        buffer_size: PositiveInt = 500,
        descriptor_epochs: NonNegativeInt = 20,
        descriptor_lr: PositiveFloat = 1e-2,
        scan_samples: PositiveInt = 1024,
        rescan: bool = True,
        warm_start: bool = False,
        expandable: list[int] | None = None,
        **kw: Any,
    ) -> None:
        """``route_by``: what picks the adapters of an input: each layer's router (``layer``), the first layer's
        descriptors (``task``: one experience's adapters everywhere), an LDA head on the frozen embedding (``head``)
        or on the prefix's taps (``taps``: no frozen pass of the adapted blocks; needs ``taps`` before them);
        None: ``taps``, or ``head`` when the adapters start at block 0 (no prefix to tap).
        ``taps``: as ``TapChoice``'s; ``"auto"``: ``"prefix"`` (every block before the first adapted one) when
        routing by taps, else none. With ``head="linear"`` the taps only route.
        ``expandable``: the adapted blocks that may grow after the first experience (None: all of them); the others
        get one adapter at the first experience, trained with it and shared by every later one, no descriptor,
        and a router only if ``router`` is a learned one (the paper: ``layers: all``, ``expandable: [-3, -2, -1]``).
        ``kw``: ``AdapterStrategy``'s (adapter layers and kind, head, training parameters for the adapters)."""
        if router_kw is None:  # hard descriptor routes keep old inputs on exactly their old adapters
            router_kw = {"hard": True} if router == "descriptor" else {}
        self._pool_options = {"router": router, "router_kw": dict(router_kw), "descriptor_hidden": descriptor_hidden}
        self._expandable = expandable
        if taps == "auto":
            taps = "prefix" if route_by in (None, "taps") else None
        super().__init__(backbone, taps=taps, **kw)
        if route_by is None:
            route_by = "taps" if self.prefix_taps else "head"
        self.expandable = tuple(i for i in self.pools if self.pools[i].descriptors is not None)
        self.router_name, self.route_by = router, route_by
        self.detector = ShiftDetector(tau)
        self.reuse = reuse
        self.buffer_size, self.descriptor_epochs, self.descriptor_lr = buffer_size, descriptor_epochs, descriptor_lr
        self.scan_samples, self.rescan, self.warm_start = scan_samples, rescan, warm_start
        # route_by="head" / "taps": which experience a frozen embedding / the prefix taps belong to, via the class
        route_dim = {"head": backbone.embed_dim, "taps": backbone.tap_dim(self.prefix_taps)}.get(route_by)
        if route_by == "taps" and not self.prefix_taps:
            raise ConfigError(
                "route_by='taps' routes by the pooled outputs of blocks before the first adapted one, and the "
                "adapters start at block 0: use route_by='head' (or 'layer')" if self.frozen_depth == 0 else
                f"route_by='taps' routes by the taps of blocks before the first adapted one ({self.frozen_depth}): "
                f"set taps='prefix' (or some of 0..{self.frozen_depth - 1})")
        self.task_head: Head | None = create_head("lda", route_dim) if route_dim else None
        # its labels are (experience, class) pairs, so a class met in several experiences (domain shifts) stays apart
        self.register_buffer("pairs", torch.zeros(0, 2, dtype=torch.long))  # row = task-head label: (exp, class)
        self._training_exp: int | None = None  # inside fit: the current experience routes every layer
        self._nearest: tuple[int, int, float] | None = None  # (experience, nearest past one, similarity)
        self.head: Head = self.train_head if self.head_name == "linear" else self.make_head(self.head_dim)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        auto = params.get("taps") == "auto"
        super().check_params({**params, "taps": None} if auto else params)  # with a linear head they only route
        if params.get("route_by") == "task" and params.get("router") != "descriptor":
            raise ValueError("route_by='task' picks the experience with the first layer's descriptors: use "
                             "router='descriptor'")
        if params.get("route_by") == "task" and params.get("expandable") is not None:
            raise ValueError("route_by='task' reads the first adapted block's descriptors, which a block that is not "
                             "expandable has none of: use route_by='head' or 'layer' with expandable")

    def adapter_config(self, config: AdapterConfig) -> AdapterConfig:
        """The pools get SEMA's router and representation descriptors."""
        return AdapterConfig(**{**config.model_dump(), **self._pool_options})

    def pool_configs(self, backbone: Backbone, config: AdapterConfig) -> list[AdapterConfig]:
        """With ``expandable``: SEMA's pools for the expandable blocks; for the others, pools without descriptors
        (and with the router only if it is a learned one, as the paper's)."""
        if self._expandable is None:
            return [self.adapter_config(config)]
        n, blocks = backbone.num_blocks, select_blocks(backbone, config)
        grow = sorted({i % n for i in self._expandable if -n <= i < n})
        if len(grow) != len(set(self._expandable)) or not grow or not set(grow) <= set(blocks):
            raise ConfigError(f"expandable {list(self._expandable)} must name some of the adapted blocks {blocks} "
                              f"(negative: from the end of {n})")
        fixed = [i for i in blocks if i not in grow]
        router = self._pool_options["router"]
        learned = router not in ("descriptor", "fixed")
        configs = [self.adapter_config(config.model_copy(update={"layers": grow}))]
        if fixed:
            configs.append(config.model_copy(update={
                "layers": fixed, "router": router if learned else None,
                "router_kw": self._pool_options["router_kw"] if learned else {}}))
        return configs

    # ---- hooks ------------------------------------------------------------------------------
    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.train_head.add_classes(exp.classes)
        self.head.add_classes(exp.classes)
        new = torch.tensor([[exp.id, c] for c in exp.classes], dtype=torch.long, device=self.pairs.device)
        self.pairs = torch.cat([self.pairs, new])
        for pool in self.pools.values():  # descriptors train only in their own phase
            if pool.descriptors is not None:
                pool.descriptors.requires_grad_(False)

    def fit(self, exp: Experience) -> None:
        """Scan layers in order; expand where the data shifted; train each expansion before going on."""
        self._training_exp = exp.id
        try:
            self._scan_and_expand(exp)
        finally:
            self._training_exp = None

    def _scan_and_expand(self, exp: Experience) -> None:
        new: dict[int, str] = {}
        name = f"e{exp.id}"
        first = all(len(p) == 0 for p in self.pools.values())  # every layer expands: train once
        gen = self.ctx.generator(exp.id, -1)
        for layer, pool in self.pools.items():
            if len(pool) and layer not in self.expandable:  # adapted at the first experience only
                continue
            if len(pool) and not self.always_expand:
                with self.ctx.phase("scan"):
                    pooled = self.pooled_inputs(exp.train, [layer], limit=self.scan_samples, generator=gen)
                    decision = self.detector(pool.descriptors, pooled[layer])
                    shift, z = dist.broadcast((decision.shift, decision.zscores))  # rank 0 decides for every rank
            else:
                shift, z = True, {}
            self.emit("expansion" if shift else "reuse", layer=layer, adapter=name if shift else None,
                      zscores=z, tau=self.detector.tau, adapters=len(pool) + int(shift))
            if not shift:
                if self.reuse == "nearest":
                    pool.reuse(min(z, key=z.get), exp.id)
                continue
            pool.add(name, owner=exp.id)
            if pool.descriptors is not None:
                pool.descriptors[name].requires_grad_(False)
            if self.warm_start and len(pool) > 1:
                self._warm_start(exp, layer, pool, name)
            new[layer] = name
            if self.rescan and not first:
                self._train_expansion(exp, new)
                new = {}
        if new:
            self._train_expansion(exp, new)

    def _warm_start(self, exp: Experience, layer: int, pool: AdapterPool, name: str) -> None:
        """Start adapter ``name`` as a copy of the adapter the nearest past experience (the agent's journal) used
        in this layer, instead of from zero."""
        journal = self.ctx.agent.journal if self.ctx.agent is not None else None
        if journal is None or not len(self.memory.ids(kind="task")):
            return
        if self._nearest is None or self._nearest[0] != exp.id:  # one journal query per experience
            match = dist.broadcast(journal.nearest_experience(exp, k=1)[0])
            self._nearest = (exp.id, match.experience, match.score)
        _, past, score = self._nearest
        source = pool.names[int(pool.adapter_for(torch.tensor([past]))[0])]  # the adapter ``past`` used here
        pool.adapters[name].load_state_dict(pool.adapters[source].state_dict())
        self.emit("warm_start", layer=layer, adapter=name, source=source, nearest_experience=past,
                  similarity=round(float(score), 4))

    def _train_expansion(self, exp: Experience, new: dict[int, str]) -> None:
        """Train the new adapters (routed to them alone), then their descriptors; freeze both."""
        described = [layer for layer in new if self.pools[layer].descriptors is not None]
        with self._forced(new):
            with self.ctx.phase(f"train: layer{'s' if len(new) > 1 else ''} {', '.join(map(str, new))}"):
                super().fit(exp)
            with self.ctx.phase("descriptors"):
                pooled = self.pooled_inputs(exp.train, described) if described else {}
        for layer, name in new.items():
            if layer in pooled:
                with self.ctx.phase("descriptors"):
                    self._train_descriptor(self.pools[layer], name, pooled[layer], exp.id)
            self.pools[layer].freeze(name)

    def _forced(self, new: dict[int, str]):
        """Route the current data to the adapters being trained, unless the router itself learns."""
        if self.router_name not in ("descriptor", "fixed"):
            return routing(self.pools, {})
        return routing(self.pools, routes_to_each(self.pools, new))

    def _train_descriptor(self, pool: AdapterPool, name: str, x: torch.Tensor, exp_id: int) -> None:
        train_descriptor(pool.descriptors[name], x, lr=self.descriptor_lr, epochs=self.descriptor_epochs,
                         batch_size=self.batch_size, keep=self.buffer_size,
                         generator=self.ctx.generator(exp_id, 10_000 + len(pool)), progress=self.ctx.progress,
                         desc=f"descriptor {name}")

    def training_step(self, state: State, y: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(self.train_head(self.embedding(state, self.routes(state))), y,
                                    self.experience.classes)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        bs, dev = self.ctx.eval_batch_size, self.ctx.device
        if self.task_head is not None:  # first: the statistics head below sees this experience's routes
            for state, frozen, y in self.states_with_frozen(exp.train, bs, desc=f"exp {exp.id} routes"):
                self.task_head.update(self.route_input(state, frozen), self.pair_labels(exp.id, y.to(dev)))
        if self.head is not self.train_head:
            for state, frozen, y in self.states_with_frozen(exp.train, bs, desc=f"exp {exp.id} head"):
                self.head.update(self.features(state, frozen), y.to(dev))

    def routes(self, state: State, frozen: torch.Tensor | None = None) -> Routes:
        """The routes of the mixture embedding: each layer's router (``route_by="layer"``), else ``task_routes``
        (``frozen``: the frozen embedding, if already known)."""
        return None if self.route_by == "layer" else self.task_routes(state, frozen)

    @torch.no_grad()
    def route_experiences(self, state: State, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """The experience ``[B]`` whose adapters each input takes (``route_by`` "task" or "head")."""
        inner = untapped(state)
        x, mask = (inner[0], inner[1]) if isinstance(inner, tuple) else (inner, None)
        if self._training_exp is not None:
            return torch.full((x.shape[0],), self._training_exp, dtype=torch.long, device=x.device)
        if self.task_head is not None:
            return self.pairs[self.task_head(self.route_input(state, frozen)).argmax(-1), 0]
        first = self.pools[self.frozen_depth]
        chosen = first.descriptors.zscores(first.pool_input(x, mask)).argmin(-1)  # index into first.names
        return torch.tensor(first.owners, device=x.device)[chosen]

    def route_input(self, state: State, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """What the task head reads: the prefix's taps (``route_by="taps"``) or the frozen embedding."""
        if self.route_by == "taps":
            return self.prefix_tap_features(state)
        return self.embedding(state, OFF) if frozen is None else frozen

    def pair_labels(self, exp_id: int, y: torch.Tensor) -> torch.Tensor:
        """Task-head labels of classes ``y`` seen in experience ``exp_id`` (rows of ``pairs``)."""
        table = torch.full((int(self.pairs[:, 1].max()) + 1,), -1, dtype=torch.long, device=self.pairs.device)
        mine = self.pairs[:, 0] == exp_id
        table[self.pairs[mine, 1]] = torch.nonzero(mine).squeeze(1)
        return table.to(y.device)[y]

    @torch.no_grad()
    def task_routes(self, state: State, frozen: torch.Tensor | None = None) -> dict[int, torch.Tensor | str]:
        """Routes ``{layer: route}`` that send each input to one experience's adapters: in every layer the adapter
        that experience used there (its own, or the latest older one it reused); the adapter's name when the batch
        has one experience (it runs alone), else one-hot weights ``[B, K]`` (``routes_to``). The experience is the
        current one while training, else picked by ``route_experiences``. Forced layers keep their override."""
        free = {i: p for i, p in self.pools.items() if p.route_override is None and len(p) > 1}
        if not free:
            return {}
        return routes_to(free, self.route_experiences(state, frozen))

    def features(self, state: State, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """What the head sees: the mixture embedding, or ``[frozen, mixture]`` with ``head_features="concat"``
        (``frozen``: the frozen embedding, if already known)."""
        if frozen is None and self.uses_frozen:
            frozen = self.embedding(state, OFF)
        if self.head is self.train_head:  # the linear head: the mixture alone (taps, if any, only route)
            return self.embedding(state, self.routes(state, frozen))
        return self.routed_features(state, self.routes(state, frozen), frozen)

    @property
    def uses_frozen(self) -> bool:
        """Whether routes or features read the frozen embedding (``route_by="head"``, ``head_features="concat"``,
        taps of adapted blocks): only then is it computed."""
        return self.route_by == "head" or super().uses_frozen

    def scores(self, state: State) -> torch.Tensor:
        return self.head(self.features(state))

    @torch.no_grad()
    def score_batches(self, dataset: Dataset, batch_size: int, desc: str = "scores"):
        """As ``Strategy``'s, with the frozen embeddings of a cached data set computed once (they never change)."""
        for state, frozen, y in self.states_with_frozen(dataset, batch_size, desc):
            yield self.head(self.features(state, frozen)), y

    def extra_metrics(self) -> dict[str, Any]:
        return self.pool_metrics()


@register_strategy("adapter_per_task")
class AdapterPerTask(SEMA):
    """SEMA's parts with no shift test: every experience adds an adapter to every adaptable layer."""

    always_expand = True


SEMAReplay = register_strategy("sema_replay")(with_replay(SEMA, "SEMAReplay"))  # SEMA's adapters trained with rehearsal
