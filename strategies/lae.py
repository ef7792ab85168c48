"""LAE: learning, accumulation, ensemble (Gao et al., ICCV 2023) over any adapter kind of ``cl.adapters``.

Each adapted block holds one pool with two adapters: ``online`` learns every experience (after the first
one at ``adapter_lr_scale`` times the learning rate, optionally frozen for ``freeze_epochs`` while the new
classifier rows settle: the paper's calibrated adaptation speed); ``offline`` is a copy of ``online``
after the first experience, then follows it by an EMA after every optimiser step (``momentum`` per step,
0.9999 as in the paper and its code). Prediction ensembles the members' class scores: the element-wise max
of their softmax (``ensemble="softmax"``, the official code) or, per input, the member with the lower free
energy ``-logsumexp(logits)`` (``"energy"``); ``"online"`` / ``"offline"`` use one member alone.

The paper's classifier is a linear head shared by both members, trained with cross-entropy over the current
task's classes only: ``head="linear", head_features="adapted", ensemble="softmax"``; it cannot separate old
classes from similar new ones. Our default is a statistics head (LDA) over ``[frozen, offline]`` features, the
offline member alone: the online adapters keep moving, so class statistics collected through them go stale, and
a lower momentum lets the offline ones drift too (figures: README, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt
from torch import nn

from cl.adapter_strategy import AdapterStrategy
from cl.adapters.ema import ema_update
from cl.backbones.base import Backbone, State
from cl.errors import ConfigError
from cl.experience import Experience
from cl.heads import Head, masked_cross_entropy
from cl.registry import register_strategy
from cl.routing import OFF

MEMBERS = ("online", "offline")


def ensemble_scores(scores: Sequence[torch.Tensor], rule: str = "softmax") -> torch.Tensor:
    """Combine the members' class scores ``[B, C]`` into log-probabilities ``[B, C]``.

    ``softmax``: log of the element-wise max of the members' softmax (LAE); ``energy``: per input, the
    log-softmax of the member with the lowest free energy ``-logsumexp(scores)``, i.e. the most confident one.
    """
    logp = torch.stack([s.log_softmax(-1) for s in scores])  # [M, B, C]
    if rule == "softmax":
        return logp.amax(0)
    if rule == "energy":
        pick = torch.stack([s.logsumexp(-1) for s in scores]).argmax(0)  # lowest energy = largest logsumexp
        return logp.gather(0, pick.view(1, -1, 1).expand(1, *logp.shape[1:]))[0]
    raise ConfigError(f"unknown ensemble rule {rule!r} (available: softmax, energy)")


@register_strategy("lae")
class LAE(AdapterStrategy):
    """Online adapters learn, offline EMA adapters accumulate; LDA on [frozen, offline] or a max-softmax ensemble.

    Args:
        momentum: EMA momentum of the offline adapters, per optimiser step (the paper: 0.9999).
        adapter_lr_scale: the online adapters' learning rate after the first experience, as a share of ``lr``.
        freeze_epochs: epochs of each later experience that train the classifier alone, the adapters frozen.
        ensemble: what predicts: ``offline`` or ``online`` alone, or both by ``softmax`` (element-wise max) or
            ``energy`` (per input, the member of lower free energy).
    """

    param_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "optimizer": "adam"}

    def __init__(
        self,
        backbone: Backbone,
        *,
        momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9999,
        adapter_lr_scale: NonNegativeFloat = 0.1,
        freeze_epochs: NonNegativeInt = 0,
        ensemble: Literal["softmax", "energy", "online", "offline"] = "offline",
        **kw: Any,
    ) -> None:
        """``momentum``: per optimiser step (the paper: 0.9999). ``kw``: ``AdapterStrategy``'s (adapter layers and
        kind, head, training parameters for the adapters)."""
        super().__init__(backbone, **kw)
        self.momentum, self.adapter_lr_scale, self.freeze_epochs = momentum, adapter_lr_scale, freeze_epochs
        self.rule = ensemble
        self.members = (ensemble,) if ensemble in MEMBERS else MEMBERS  # the members that predict
        self.heads: nn.ModuleDict | None = None  # statistics heads, one per predicting member
        if self.head_name != "linear":
            self.heads = nn.ModuleDict({m: self.make_head(self.head_dim) for m in self.members})
        self.register_buffer("experiences_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        for pool in self.pools.values():  # a bare backbone forward takes the online adapters
            pool.route_override = torch.tensor([1.0, 0.0])

    @property
    def accumulating(self) -> bool:
        """Whether the offline adapters exist as a copy and follow the online ones (after the first experience)."""
        return bool(self.experiences_done > 0)

    # ---- hooks ------------------------------------------------------------------------------
    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        for pool in self.pools.values():  # created here so that experience 0 counts their parameters
            if not len(pool):
                pool.add("online")
                pool.add("offline")
                pool.freeze("offline")  # never trained: it only follows ``online``
        self.train_head.add_classes(exp.classes)
        if self.heads is not None:
            for h in self.heads.values():
                h.add_classes(exp.classes)

    def configure_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Head at ``lr``; online adapters at ``lr * adapter_lr_scale`` after the first experience (0 for the
        first ``freeze_epochs``); after every step the offline adapters take their EMA step."""
        online = {id(p) for p in self.member_modules("online").parameters()}
        adapters = [p for p in params if id(p) in online]
        groups = [{"params": [p for p in params if id(p) not in online]}, {"params": adapters}]
        if self.accumulating:
            groups[1]["lr"] = self.lr * self.adapter_lr_scale
        opt = super().configure_optimizer([g for g in groups if g["params"]])
        if not self.accumulating:
            return opt
        sched = None
        if self.freeze_epochs and adapters:  # calibrated speed: the new head rows first, the adapters after
            frozen = self.freeze_epochs * math.ceil(len(self.experience.train) / self.batch_size)
            rules = [lambda s: 1.0] * (len(opt.param_groups) - 1) + [lambda s: float(s >= frozen)]
            sched = torch.optim.lr_scheduler.LambdaLR(opt, rules)

        def after_step(*_: Any) -> None:
            self.accumulate()
            if sched is not None:
                sched.step()

        opt.register_step_post_hook(after_step)
        return opt

    def accumulate(self) -> None:
        """One EMA step of the offline adapters towards the online ones."""
        ema_update(self.member_modules("offline"), self.member_modules("online"), self.momentum)
        self.ema_steps += 1

    def training_step(self, state: State, y: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(self.train_head(self.embedding(state, "online")), y, self.experience.classes)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        if not self.accumulating:  # the offline adapters start as what the first experience taught
            ema_update(self.member_modules("offline"), self.member_modules("online"), 0.0)
        self.experiences_done += 1
        self.emit("accumulate", experience=exp.id, ema_steps=int(self.ema_steps), momentum=self.momentum,
                  lag=self.offline_lag())
        if self.heads is None:
            return
        for state, y in self.iterate_states(exp.train, self.ctx.eval_batch_size, desc=f"exp {exp.id} head"):
            frozen = self.embedding(state, OFF) if self.concat else None
            for m in self.members:
                self.heads[m].update(self.routed_features(state, m, frozen), y.to(self.ctx.device))

    # ---- inference --------------------------------------------------------------------------
    def member_scores(self, state: State) -> dict[str, torch.Tensor]:
        """Class scores ``[B, C]`` of each predicting member: its head over ``routed_features(state, member)``."""
        frozen = self.embedding(state, OFF) if self.concat else None
        return {m: self.head_of(m)(self.routed_features(state, m, frozen)) for m in self.members}

    def features(self, state: State) -> torch.Tensor:
        """The offline member's head features (the stable one)."""
        return self.routed_features(state, "offline")

    def scores(self, state: State) -> torch.Tensor:
        scores = list(self.member_scores(state).values())
        return scores[0] if len(scores) == 1 else ensemble_scores(scores, self.rule)

    # ---- helpers ----------------------------------------------------------------------------
    def head_of(self, member: str) -> Head:
        return self.train_head if self.heads is None else self.heads[member]

    def member_modules(self, member: str) -> nn.ModuleList:
        """The ``member``'s adapters of every adapted block, in block order (a view, not registered)."""
        return nn.ModuleList([p.adapters[member] for p in self.pools.values() if member in p.adapters])

    @torch.no_grad()
    def offline_lag(self) -> float:
        """``||online - offline|| / ||online||`` over all adapter weights: how far the offline copy trails."""
        on = [p.flatten() for p in self.member_modules("online").parameters()]
        if not on:
            return 0.0
        on, off = torch.cat(on), torch.cat([p.flatten() for p in self.member_modules("offline").parameters()])
        return float((on - off).norm() / on.norm().clamp_min(1e-12))

    def extra_metrics(self) -> dict[str, Any]:
        counts = [p.parameter_counts()["adapters"] for p in self.pools.values()]
        return {"ema_steps": int(self.ema_steps), "offline_lag": self.offline_lag(), "params_adapters": sum(counts)}
