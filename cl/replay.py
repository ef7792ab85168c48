"""Exemplar replay (rehearsal) for any strategy: a class-balanced buffer of past samples mixed into every training
batch. ``ReplayMixin`` adds it to a ``Strategy`` subclass, ``with_replay(Mine)`` builds that class::

    register_strategy("mine_replay")(with_replay(Mine))     # cl run --strategy mine_replay --set strategy.budget=500

The buffer (which samples, where they are kept) is ``cl.memory.exemplars``; the prefix states of the buffer are
computed once per experience, then reused by every epoch, like the prefix cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pydantic import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset

from cl.backbones.base import Backbone
from cl.backbones.state import State, cat_states, to_device
from cl.cache import CachedStates, compute_states
from cl.errors import CheckpointError, ConfigError
from cl.experience import Experience
from cl.memory.exemplars import ExemplarStore, Selection, class_quotas
from cl.strategy import Strategy

_SALT = 7_001  # seeds replay sampling apart from the current data's shuffles


class ReplayMixin:
    """Adds exemplar replay to a ``Strategy`` subclass: ``class MineReplay(ReplayMixin, Mine)``.

    Args:
        budget: exemplars kept in all (class-balanced: each seen class gets ``budget // classes``, so a
            class's share shrinks as classes arrive and its lowest-priority exemplars leave the memory).
        selection: ``"herding"`` (iCaRL: exemplars whose mean tracks the class mean, in the memory
            embedding) or ``"reservoir"`` (a uniform random sample of each class, kept uniform as it shrinks
            or as the class comes back).
        replay_batch_size: exemplars added to each training batch (default: ``batch_size``); the number
            of batches per epoch is the current data's, and the buffer is cycled through.

    During ``fit``, ``self.experience.classes`` lists the current and replayed classes, so a loss masked
    to the experience's classes (SEMA, APER) covers the replayed ones.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        budget: NonNegativeInt = 2000,
        selection: Selection = "herding",
        replay_batch_size: PositiveInt | None = None,
        **kw: Any,
    ) -> None:
        """``kw``: the parameters of the strategy replay is added to."""
        super().__init__(backbone, **{**self.defaults(), **kw})
        self.budget, self.selection, self.replay_batch_size = budget, selection, replay_batch_size
        self.exemplars = ExemplarStore()
        self._buffer_states: CachedStates | None = None  # the buffer's prefix states during one experience

    # ---- hooks ----------------------------------------------------------------------------------
    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        missing = np.setdiff1d(self.exemplars.ids.numpy(), self.memory.ids("exemplar"))
        if len(missing):
            raise CheckpointError(f"{len(missing)} replay exemplars (ids {missing[:5].tolist()}...) are not in the "
                                  "experience memory: the strategy state and the memory come from different runs")
        self._buffer_states = None

    def fit(self, exp: Experience) -> None:
        if not len(self.exemplars):
            return super().fit(exp)
        self.experience = dataclasses.replace(exp, classes=sorted({*exp.classes, *self.exemplars.classes()}))
        try:
            super().fit(exp)
        finally:
            self.experience = exp

    def train_batches(self, dataset: Dataset, exp_id: int, epoch: int) -> Iterator[tuple[State, torch.Tensor]]:
        """The current data's batches, each extended by ``replay_batch_size`` exemplars."""
        current = super().train_batches(dataset, exp_id, epoch)
        if not len(self.exemplars):
            return current
        replayed = self._replay_batches(self.ctx.generator(exp_id, epoch, _SALT))  # endless: cycles the buffer
        return ((cat_states([s, rs]), torch.cat([y, ry])) for (s, y), (rs, ry) in zip(current, replayed, strict=False))

    def training_step(self, state: State, y: torch.Tensor) -> torch.Tensor:
        loss = super().training_step(state, y)
        if torch.isinf(loss) and len(self.exemplars):
            raise ConfigError(f"{type(self).__name__}: the loss is infinite on batches with replayed exemplars: "
                              "the strategy's loss must cover the replayed classes (use self.experience.classes)")
        return loss

    def after_experience(self, exp: Experience) -> None:
        super().after_experience(exp)
        self._buffer_states = None
        self.update_buffer(exp)

    # ---- the buffer -----------------------------------------------------------------------------
    @torch.no_grad()
    def update_buffer(self, exp: Experience) -> None:
        """Select exemplars of ``exp``'s classes, then shrink every class to its share of the budget."""
        z, y = self.memory_embeddings(exp.train, desc=f"exp {exp.id} exemplars")
        quotas = class_quotas(self.seen_classes.tolist(), self.budget)
        store, added = self.exemplars, 0
        for c in sorted(set(y.tolist())):
            added += store.select(self.memory, c, z, (y == c).nonzero().flatten(), quotas.get(c, 0),
                                  selection=self.selection, experience=exp.id, dataset=exp.train,
                                  generator=self.ctx.generator(exp.id, _SALT, c))
        removed = store.shrink(self.memory, quotas)
        self.emit("replay", size=len(store), added=added, removed=removed, per_class=store.per_class(),
                  selection=self.selection, budget=self.budget)

    def _replay_batches(self, generator: torch.Generator) -> Iterator[tuple[State, torch.Tensor]]:
        """Shuffled exemplar batches, the buffer cycled through without end."""
        bs = self.replay_batch_size or self.batch_size
        if self.cache_prefix and self.ctx.cache is not None and self._buffer_states is None:
            self._buffer_states = compute_states(self.backbone, self.exemplars.dataset(), self.frozen_depth,
                                                 self.ctx.device, batch_size=self.ctx.eval_batch_size,
                                                 taps=self.prefix_taps)
        while True:
            if self._buffer_states is not None:
                for s, y in self._buffer_states.batches(bs, True, generator):
                    yield to_device(s, self.ctx.device), y
            else:
                yield from self._fresh_states(self.exemplars.dataset(), self.frozen_depth, bs, True, generator)

    def extra_metrics(self) -> dict[str, Any]:
        return {**super().extra_metrics(), "exemplars": len(self.exemplars),
                "exemplars_per_class": self.exemplars.per_class()}


def with_replay(base: type[Strategy], name: str | None = None) -> type[Strategy]:
    """``base`` with exemplar replay: its parameters plus ``budget``, ``selection`` and ``replay_batch_size``."""
    if not (isinstance(base, type) and issubclass(base, Strategy)):
        raise ConfigError(f"with_replay takes a Strategy subclass, got {base!r}")
    doc = f"{base.__name__} trained with exemplar replay (budget, selection, replay_batch_size)."
    return type(name or f"{base.__name__}Replay", (ReplayMixin, base), {"__doc__": doc, "__module__": base.__module__})
