"""MOS: model surgery — adapter merging and self-refined retrieval (Sun et al., AAAI 2025), on ``cl`` parts.

Per task: a new adapter set on the last blocks is trained alone (masked cross-entropy), then **merged once**
with the earlier ones, ``new <- (1 - m) new + m mean(earlier)`` (``cl.adapters.merge``), and kept as that
task's adapter; nothing is re-merged in a forward. Class statistics come from each class's own task
adapter (the adapted model's head) and from the frozen features (the original model's head).

Inference, per batch of prefix states (the prefix is computed once and shared by every pass):
1. frozen suffix -> original head -> the task of its best class: the likely task;
2. that task's adapter (hard routes: each adapter runs only on its own inputs) -> adapted head;
3. self-refinement: where the adapted prediction belongs to another task, run that task's adapter on just
   those inputs (``refine_steps`` times at most, never a task already tried for the input);
4. two-stage ensemble: ``softmax(adapted) + ensemble_weight * softmax(original)``.
The public code runs all T task adapters plus the original model, T + 1 full passes per image; here it is
one prefix and 2 + (refined share) suffix passes, reported as ``backbone_passes_per_image``.

Refinement rarely changes the task: an adapter's features look like its own task's classes to the adapted head,
so the frozen first guess decides the task, and that bounds the accuracy (figures: README, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt

from cl.adapter_strategy import AdapterStrategy
from cl.adapters.merge import merge_pools
from cl.backbones.base import Backbone
from cl.backbones.state import State, take_rows
from cl.errors import ConfigError
from cl.experience import Experience
from cl.heads import Head
from cl.registry import register_strategy
from cl.routing import OFF
from cl.routing.keys import RouteLog, experience_of


@register_strategy("mos")
class MOS(AdapterStrategy):
    """An adapter set per task merged once at its end; self-refined task retrieval; ensemble with the frozen model.

    Args:
        merge_momentum: share of the earlier adapters' mean a new adapter is merged with (0: no merging).
        refine_steps: self-refinement rounds: an input whose adapted prediction belongs to another task runs that
            task's adapter (0: none).
        ensemble_weight: weight of the frozen model's softmax added to the adapted one.
    """

    param_defaults: ClassVar[dict[str, Any]] = {"head_features": "adapted"}

    def __init__(
        self,
        backbone: Backbone,
        *,
        merge_momentum: Annotated[float, Field(ge=0, le=1)] = 0.1,
        refine_steps: NonNegativeInt = 1,
        ensemble_weight: NonNegativeFloat = 1.0,
        **kw: Any,
    ) -> None:
        """``merge_momentum`` 0: no merging. ``kw``: ``AdapterStrategy``'s (adapter layers and kind, head, training
        parameters for the adapters)."""
        super().__init__(backbone, **kw)
        self.merge_momentum, self.refine_steps, self.ensemble_weight = merge_momentum, refine_steps, ensemble_weight
        self.frozen_head: Head = self.make_head(backbone.embed_dim)  # the original model's prototypes
        self.head: Head = self.make_head(self.head_dim)  # each class through its own task's adapter
        self.register_buffer("class_experience", torch.zeros(0, dtype=torch.long))
        self.register_buffer("merges", torch.zeros((), dtype=torch.long))
        self.passes: list[list[int]] = []  # per experience: [images scored, suffix passes run for them]
        self.log = RouteLog()

    @property
    def names(self) -> list[str]:
        return self.pool.names

    # ---- hooks ------------------------------------------------------------------------------
    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        for h in (self.train_head, self.frozen_head, self.head):
            h.add_classes(exp.classes)
        need = max(exp.classes) + 1
        if need > len(self.class_experience):
            grown = self.class_experience.new_full((need,), -1)
            grown[: len(self.class_experience)] = self.class_experience
            self.class_experience = grown
        taken = [c for c in exp.classes if int(self.class_experience[c]) not in (-1, exp.id)]
        if taken:
            raise ConfigError(f"mos retrieves the task of a predicted class, but classes {taken} of experience "
                              f"{exp.id} were in an earlier one (a domain-incremental stream? use key_retrieval)")
        self.class_experience[list(exp.classes)] = exp.id
        for pool in self.pools.values():
            pool.add(f"e{exp.id}", owner=exp.id)
        self.passes.append([0, 0])

    def fit(self, exp: Experience) -> None:
        """Train this task's adapters alone (every input routed to them), then freeze them."""
        self.fit_alone(exp)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        """Merge the new adapters once, then class statistics of the frozen and the (merged) adapted features."""
        name = self.pool.owned_by(exp.id)
        earlier = [n for n in self.names if n != name]
        layers = merge_pools(self.pools, name, earlier, self.merge_momentum)
        if layers:
            self.merges += 1
            self.emit("merge", experience=exp.id, adapter=name, earlier=earlier, momentum=self.merge_momentum,
                      layers=layers)
        for state, y in self.iterate_states(exp.train, self.ctx.eval_batch_size, desc=f"exp {exp.id} prototypes"):
            y = y.to(self.ctx.device)
            frozen = self.embedding(state, OFF)
            self.frozen_head.update(frozen, y)
            self.head.update(self.routed_features(state, torch.full_like(y, exp.id), frozen), y)

    # ---- inference ----------------------------------------------------------------------------
    def features(self, state: State) -> torch.Tensor:
        """The adapted embedding after self-refined retrieval (what the adapted head scores)."""
        return self._retrieve(state)[1]

    @torch.no_grad()
    def _retrieve(self, state: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
        """(original scores, adapted features, adapted scores, final task, counts) of a batch of prefix states."""
        frozen = self.embedding(state, OFF)
        original = self.frozen_head(frozen)
        tasks = self.class_experience[original.argmax(-1)]  # 1. the likely task
        first = tasks.clone()
        feats = self.routed_features(state, tasks, frozen)  # 2. its adapter (each input through its task's)
        adapted = self.head(feats)
        b = len(tasks)
        tried = F.one_hot(tasks, int(self.class_experience.max()) + 1).bool()
        suffix = 2 * b
        for _ in range(self.refine_steps):  # 3. self-refinement, only where the adapter points elsewhere
            proposed = self.class_experience[adapted.argmax(-1)]
            redo = ((proposed != tasks) & ~tried.gather(1, proposed[:, None]).squeeze(1)).nonzero().squeeze(1)
            if not len(redo):
                break
            sub = take_rows(state, redo)
            feats[redo] = self.routed_features(sub, proposed[redo], frozen[redo])
            adapted[redo] = self.head(feats[redo])
            tasks[redo] = proposed[redo]
            tried[redo, proposed[redo]] = True
            suffix += len(redo)
        counts = {"suffix_passes": suffix, "first_pass_changed": int((tasks != first).sum())}
        if self.log.targets is not None:
            truth = experience_of(self.log.targets, self.class_experience)
            known = truth >= 0
            counts["first_pass_hits"] = int((first[known] == truth[known].to(first.device)).sum())
        return original, feats, adapted, tasks, counts

    def scores(self, state: State) -> torch.Tensor:
        original, _, adapted, tasks, counts = self._retrieve(state)
        if self.passes:
            self.passes[-1][0] += len(tasks)
            self.passes[-1][1] += counts["suffix_passes"]
        if self.log.targets is not None:
            truth = experience_of(self.log.targets, self.class_experience)
            self.log.record(self.pool.adapter_for(tasks), self.names, truth, torch.tensor(self.pool.owners), **counts)
        if self.ensemble_weight == 0:  # 4. two-stage ensemble with the original model
            return adapted
        probs = adapted.softmax(-1) + self.ensemble_weight * original.softmax(-1)
        return probs.clamp_min(1e-30).log().masked_fill(~self.head.known.to(probs.device), float("-inf"))

    # ---- state and metrics --------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"passes": [list(p) for p in self.passes]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.passes = [list(p) for p in state.get("passes", [])]

    def extra_metrics(self) -> dict[str, Any]:
        n, d = self.backbone.num_blocks, self.frozen_depth
        per_exp = [s / i if i else None for i, s in self.passes]
        full = [None if s is None else (d + s * (n - d)) / n for s in per_exp]
        return {
            **self.pool_metrics(),
            "merges": int(self.merges),
            # block executions per scored image / blocks (a full forward = 1); the prefix runs once per image
            "suffix_passes_per_image": per_exp[-1] if per_exp else None,
            "backbone_passes_per_image": full[-1] if full else None,
            "backbone_passes_per_image_per_experience": full,
            "public_code_passes_per_image": len(self.passes) + 1 if self.passes else None,
        }
