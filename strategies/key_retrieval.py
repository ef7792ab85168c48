"""Key retrieval: an adapter set per experience, found at test time by nearest keys in the experience memory.

Each experience trains its own adapters on the last blocks (routed to them alone), then writes keys for
them: class prototypes of its frozen features (``keys_per_class`` > 1: k-means centroids per class) as
``adapter_key`` entries of the strategy's experience memory (``strategy.memory``, the agent's) when it fits the
metric, else of the router's own. At inference the frozen feature of each input queries the keys (one FAISS
search per batch) and the input runs through the adapters of its best key (``cl.routing.keys.KeyRouter``; by
default keys and queries are whitened by the shared within-class covariance and compared by cosine, which routes
more inputs to their own experience than plain cosine: benchmarks/RESULTS.md). The classifier is a statistics
head (LDA by default) over ``[frozen, adapted]`` features, so misrouted inputs keep the frozen half. Routing by
keys needs no class-to-experience map: it works on domain-incremental streams too (the same class in several
experiences gets a key per experience).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from cl.adapter_strategy import AdapterStrategy
from cl.backbones.base import Backbone, State
from cl.experience import Experience
from cl.heads import Head
from cl.memory import ExperienceMemory
from cl.registry import register_strategy
from cl.routing import OFF
from cl.routing.keys import KeyRouter, RouteLog, experience_of


@register_strategy("key_retrieval")
class KeyRetrieval(AdapterStrategy):
    """An adapter set per experience, routed per input by its nearest frozen-feature keys (FAISS memory).

    Args:
        metric: how keys and queries compare: ``cosine``, ``whitened`` (cosine after whitening by the shared
            within-class covariance) or ``mahalanobis``.
        mode: ``top1`` (the best key's adapters), ``vote`` (the adapters most of the ``top_k`` keys belong to)
            or ``soft`` (a softmax over the ``top_k`` keys' similarities).
        top_k: keys retrieved per input (``vote`` and ``soft``).
        temperature: softmax temperature of ``soft`` (default: 0.05 for cosines, 1.0 for ``mahalanobis``).
        keys_per_class: keys each class writes (more than 1: spherical k-means centroids).
        shrinkage: shrinkage of the whitening covariance towards the scaled identity (0-1, as ``LDAHead``'s).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        metric: Literal["cosine", "whitened", "mahalanobis"] = "whitened",
        mode: Literal["top1", "vote", "soft"] = "top1",
        top_k: PositiveInt = 1,
        temperature: PositiveFloat | None = None,
        keys_per_class: PositiveInt = 1,
        shrinkage: Annotated[float, Field(ge=0, le=1)] = 0.01,
        **kw: Any,
    ) -> None:
        """``kw``: ``AdapterStrategy``'s (adapter layers and kind, head, training parameters for the adapters)."""
        super().__init__(backbone, **kw)
        self.router = KeyRouter(backbone.embed_dim, metric=metric, mode=mode, top_k=top_k, temperature=temperature,
                                keys_per_class=keys_per_class, shrinkage=shrinkage)
        self.head: Head = self.make_head(self.head_dim)
        self.register_buffer("class_experience", torch.zeros(0, dtype=torch.long))  # diagnostics only
        self.log = RouteLog()

    def use_memory(self, memory: ExperienceMemory) -> None:
        """The router keeps the keys in the strategy's memory (its own if that one does not fit)."""
        super().use_memory(memory)
        self.router.attach(memory)

    # ---- hooks ------------------------------------------------------------------------------
    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.train_head.add_classes(exp.classes)
        self.head.add_classes(exp.classes)
        need = max(exp.classes) + 1
        if need > len(self.class_experience):
            grown = self.class_experience.new_full((need,), -1)
            grown[: len(self.class_experience)] = self.class_experience
            self.class_experience = grown
        for c in exp.classes:  # a class seen in two experiences has no single true experience (-2)
            self.class_experience[c] = exp.id if int(self.class_experience[c]) in (-1, exp.id) else -2
        name = f"e{exp.id}"
        for pool in self.pools.values():
            pool.add(name, owner=exp.id)
        self.router.add_expert(name)

    def fit(self, exp: Experience) -> None:
        """Train this experience's adapters alone (every input routed to them), then freeze them."""
        self.fit_alone(exp)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        """Keys from this experience's frozen features, then the head from the routed features (frozen reused)."""
        bs = self.ctx.eval_batch_size
        frozen, labels = [], []
        for state, y in self.iterate_states(exp.train, bs, desc=f"exp {exp.id} keys"):
            frozen.append(self.embedding(state, OFF))
            labels.append(y)
        name = self.pool.owned_by(exp.id)  # the adapter this experience added (the same name in every pool)
        keys = self.router.add_keys(torch.cat(frozen), torch.cat(labels), self.router.names.index(name),
                                    experience=exp.id)
        self.emit("keys", experience=exp.id, adapter=name, keys=len(keys), total_keys=len(self.router.keys),
                  metric=self.router.metric)
        for (state, y), z in zip(self.iterate_states(exp.train, bs, desc=f"exp {exp.id} head"), frozen, strict=True):
            self.head.update(self._embed(state, z)[0], y.to(self.ctx.device))

    # ---- inference ----------------------------------------------------------------------------
    def _embed(self, state: State, frozen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(head features, routing weights ``[B, K]``): adapters chosen by key retrieval on the frozen feature."""
        frozen = self.embedding(state, OFF) if frozen is None else frozen
        weights = self.router(frozen)
        return self.routed_features(state, dict.fromkeys(self.pools, weights), frozen), weights

    def features(self, state: State) -> torch.Tensor:
        return self._embed(state)[0]

    def scores(self, state: State) -> torch.Tensor:
        feats, weights = self._embed(state)
        if self.log.targets is not None:
            truth = experience_of(self.log.targets, self.class_experience)
            owner = torch.tensor(self.pool.owners)  # router experts = pool adapters, in order
            self.log.record(weights.argmax(-1), self.router.names, truth, owner)
        return self.head(feats)

    def extra_metrics(self) -> dict[str, Any]:
        n, d = self.backbone.num_blocks, self.frozen_depth
        return {
            **self.pool_metrics(),
            "adapter_keys": len(self.router.keys),
            # by construction: the prefix once, the suffix twice (frozen query, routed adapters)
            "suffix_passes_per_image": 2.0,
            "backbone_passes_per_image": (d + 2.0 * (n - d)) / n,
        }
