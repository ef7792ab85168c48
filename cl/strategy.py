"""The strategy base class: the surface a continual-learning method is written against.

A strategy wraps a backbone. The engine calls, per experience: ``before_experience`` -> ``fit`` (epochs of
``training_step`` over prefix states) -> ``after_experience``; evaluation calls ``scores``. A new method usually
overrides ``before_experience``, ``training_step``, ``after_experience`` and ``scores``, reads features with
``features`` / ``embedding`` and the experience memory as ``self.memory``; everything else is inherited: the
resumable training loop (``cl.training``; ``fit``'s docstring says what overriding it means), the prefix cache,
the memory's embedding (``cl.memory_embedding``), checkpoints that load growing state by value (``cl.loading``)
and events. Strategies never write files: they ``emit`` events for callbacks. Adapter methods build on
``cl.adapter_strategy.AdapterStrategy``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from cl.adapters import pools
from cl.backbones.base import Backbone
from cl.backbones.state import State, to_device
from cl.cache import CachedStates, is_augmented
from cl.context import Context
from cl.data import iterate_batches, subset
from cl.errors import CheckpointError, TrainingError
from cl.experience import Experience
from cl.loading import LoadsByValue
from cl.memory import ExperienceMemory, MemoryConfig
from cl.memory_embedding import MemoryEmbedding
from cl.registry import param_defaults_of
from cl.routing import Routes, routed
from cl.training import Loops, train

#: what a strategy that does not train (``trains = False``) fixes: neither shown nor taken by the registry
TRAINING_PARAMS = ("epochs", "lr", "optimizer", "weight_decay", "plateau_delta", "plateau_patience", "plateau_every")


class Strategy(MemoryEmbedding, LoadsByValue):
    """Base class of every method. Subclasses are registered with ``@register_strategy``.

    Args:
        backbone: the pretrained model (frozen unless the strategy unfreezes parts).
        epochs: training epochs per experience.
        lr: learning rate.
        batch_size: training batch size.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: optimiser weight decay.
        cache_prefix: reuse outputs of frozen blocks across epochs and experiences.
        plateau_delta: end a training loop before ``epochs`` once its epoch loss stops improving by this much
            (``cl.training.plateaued``; None: always train ``epochs``).
        plateau_patience: how many epochs (or windows) in a row may improve by less than ``plateau_delta`` before the
            loop ends.
        plateau_every: also decide inside an epoch, on the mean loss of every ``plateau_every`` optimiser steps, so a
            loop whose loss falls in its first epoch can end inside it (None, or at least the epoch's steps: once per
            epoch, at its end).
    """

    #: a subclass's own defaults for parameters of its bases, merged over theirs (``defaults()``); the registry
    #: shows them, and a subclass that takes ``**kw`` passes ``{**self.defaults(), **kw}`` on to its base
    param_defaults: ClassVar[dict[str, Any]] = {}
    #: False: the strategy never trains (statistics only); ``epochs`` is 0 and the registry neither shows nor
    #: takes the training parameters (``hidden_params``)
    trains: ClassVar[bool] = True
    hidden_params: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.hidden_params = () if cls.trains else TRAINING_PARAMS

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The class's ``param_defaults`` over its bases' (what the registry fills in)."""
        return param_defaults_of(cls)

    @classmethod
    def base_defaults(cls) -> dict[str, Any]:
        """``defaults()`` of this ``__init__``'s own parameters (what a base class taking ``**kw`` passes on)."""
        own = inspect.signature(Strategy.__init__).parameters
        return {k: v for k, v in cls.defaults().items() if k in own}

    def __init__(
        self,
        backbone: Backbone,
        *,
        epochs: Annotated[int, Field(ge=0)] = 1,
        lr: Annotated[float, Field(gt=0)] = 1e-3,
        batch_size: Annotated[int, Field(ge=1)] = 64,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        weight_decay: Annotated[float, Field(ge=0)] = 0.0,
        cache_prefix: bool = True,
        plateau_delta: Annotated[float, Field(gt=0)] | None = None,
        plateau_patience: Annotated[int, Field(ge=1)] = 1,
        plateau_every: Annotated[int, Field(ge=1)] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.epochs, self.lr, self.batch_size = (epochs if self.trains else 0), lr, batch_size
        self.plateau_delta, self.plateau_patience, self.plateau_every = plateau_delta, plateau_patience, plateau_every
        self.optimizer_name, self.weight_decay = optimizer, weight_decay
        self.cache_prefix = cache_prefix
        self.ctx = Context()
        self.register_buffer("seen_classes", torch.zeros(0, dtype=torch.long))
        self.experience: Experience | None = None
        backbone.requires_grad_(False).eval()
        # Backbone entries that construction restores (pretrained weights): left out of checkpoints
        # until something trains them.
        self._pristine = {f"backbone.{k}" for k in backbone.state_dict() if not k.endswith("_extra_state")}
        # Pretrained values of the backbone entries that training or a checkpoint changed (``memory_embedding``)
        self._pretrained: dict[str, torch.Tensor] = {}
        self._embedded: tuple[Dataset, torch.Tensor, torch.Tensor] | None = None  # the last ``memory_embeddings``
        self.loops = Loops()  # the base loops of this experience, and a resume point to continue it from

    # ---- structure --------------------------------------------------------------------------
    @property
    def frozen_depth(self) -> int:
        """How many leading blocks are frozen (their output may be cached). Default: all."""
        return self.backbone.num_blocks

    @property
    def prefix_taps(self) -> tuple[int, ...]:
        """Blocks before ``frozen_depth`` whose pooled outputs the prefix states carry (``Tapped`` states, computed
        and cached with them); none unless the strategy taps blocks (``cl.taps.TapChoice``)."""
        return ()

    def prefix(self, x: State) -> State:
        """Model input (``backbone.prepare``'s) -> the prefix state at ``frozen_depth``, with ``prefix_taps``."""
        return self.backbone.forward_until(x, self.frozen_depth, self.prefix_taps)

    def bind(self, ctx: Context) -> None:
        """Attach the engine's context (and its memory: ``use_memory``) and move to its device."""
        self.ctx = ctx
        self.to(ctx.device).eval()
        if ctx.memory is not None:
            self.use_memory(ctx.memory)

    @property
    def memory(self) -> ExperienceMemory:
        """The experience memory, the one way in for a strategy: the agent's (``ctx.memory``, built from the run
        config's ``memory:`` section); a strategy used on its own gets one with the default settings on first use."""
        if self.ctx.memory is None:
            self.use_memory(MemoryConfig().build(self.backbone.embed_dim))
        return self.ctx.memory

    def use_memory(self, memory: ExperienceMemory) -> None:
        """Lend ``memory`` to the strategy: the agent does when it binds the strategy and again when it replaces its
        memory (a loaded one). A strategy that hands it on (key retrieval, to its router) overrides this and calls
        ``super()``."""
        self.ctx.memory = memory

    def train(self, mode: bool = True) -> Strategy:
        """Train mode for the strategy's own modules; the backbone stays in eval mode (frozen BN)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def emit(self, kind: str, **data: Any) -> None:
        """Report a decision (``expansion``, ``route``, ...) to the callbacks."""
        if self.ctx.callbacks is not None:
            self.ctx.callbacks.on_event(self.ctx.agent, kind, data)

    # ---- hooks ------------------------------------------------------------------------------
    def before_experience(self, exp: Experience) -> None:
        """Called before training on ``exp`` (expand, add classes, reset optimiser state)."""
        self.experience = exp
        self._embedded = None
        self.use_memory(self.memory)  # lent before every experience: the agent's, or the strategy's own
        self.loops.start_experience()
        new = torch.tensor([c for c in exp.classes if c not in set(self.seen_classes.tolist())])
        self.seen_classes = torch.cat([self.seen_classes, new.to(self.seen_classes)])

    def fit(self, exp: Experience) -> None:
        """Train on ``exp``: ``epochs`` passes of ``training_step`` over ``train_batches`` (``cl.training.train``).

        The base loop optimises every parameter with ``requires_grad`` (``configure_optimizer``), tells the callbacks
        about epochs and steps, stops on a non-finite loss, splits each batch over the ranks of a distributed run and
        averages their gradients, and ends after the current step on a stop request (SIGINT/SIGTERM) with a resume
        point. Overriding ``fit``:

        - each ``super().fit(exp)`` (or ``fit_alone``) is one *loop*; a strategy may run several in an experience
          (SEMA: one per expansion), or none (it does not train then, as APER after its first experience);
        - an experience interrupted inside a loop runs again from its start state when resumed: ``before_experience``
          and this ``fit`` run again, the loops that had finished are fast-forwarded (their trained values, random
          state and epoch logs restored, not trained again) and the interrupted one continues from its step. So the
          code around the loops must decide the same when it runs again: seed it with ``self.ctx.generator``, take
          decisions that every rank must share with ``cl.distributed.broadcast``;
        - training done outside the loops (SEMA's descriptors) has no resume point of its own: it runs again;
        - what a loop trains is what has ``requires_grad`` when it starts: freeze what must not change first.
        """
        train(self, exp)

    def training_step(self, state: State, y: torch.Tensor) -> torch.Tensor:
        """Loss of one batch of prefix states (at ``frozen_depth``) and targets."""
        raise NotImplementedError(f"{type(self).__name__} does not train; override training_step")

    def after_experience(self, exp: Experience) -> None:
        """Called after training on ``exp`` (merge, consolidate, write prototypes)."""

    def scores(self, state: State) -> torch.Tensor:
        """Class scores ``[B, C]`` (column = global class id) for prefix states at ``frozen_depth``."""
        raise NotImplementedError

    # ---- features: what the head sees; the backbone's embedding under routes ---------------------
    def features(self, state: State) -> torch.Tensor:
        """What the head sees for prefix states (default: ``embedding(state)``)."""
        return self.embedding(state)

    def embedding(self, state: State, routes: Routes = None) -> torch.Tensor:
        """The backbone's embedding ``[B, embed_dim]`` of prefix states (the blocks from ``frozen_depth`` on) under
        ``routes`` (``cl.routing.Routes``): None as the pools route now, ``OFF`` with every adapter off (the frozen
        model's), ``{layer: weights}``, or an experience id, ids ``[B]`` or adapter name to route to in every pool."""
        if routes is None:  # no route to force (and no pools to look up)
            return self.backbone.forward_from(state, self.frozen_depth)
        with routed(pools(self.backbone), routes):
            return self.backbone.forward_from(state, self.frozen_depth)

    def configure_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        name = self.optimizer_name.lower()
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay, foreach=True)
        if name in ("adam", "adamw"):  # foreach: the values of the per-tensor loop (a CPU's default) in fewer calls
            cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
            return cls(params, lr=self.lr, weight_decay=self.weight_decay, foreach=True)
        raise TrainingError(f"unknown optimizer {self.optimizer_name!r} (available: adam, adamw, sgd)")

    def states(self, dataset: Dataset, depth: int | None = None, filling: bool = False) -> CachedStates | None:
        """Cached prefix states of ``dataset`` (None when caching is off). ``filling``: they may still compute the
        rows not read yet, where a batch reads them (``cl.cache.FillingStates``), so a first pass over the data set
        need not wait for a whole fill; the states are the same."""
        if not self.cache_prefix or self.ctx.cache is None or is_augmented(dataset):  # augmented: fresh passes
            return None
        depth = self.frozen_depth if depth is None else depth
        if isinstance(dataset, ConcatDataset):  # cache the parts, so each is computed once
            return CachedStates.cat([self.states(d, depth) for d in dataset.datasets])
        args = (self.backbone, dataset, depth, self.ctx.device)
        kw = {"taps": [i for i in self.prefix_taps if i < depth], "batch_size": self.ctx.fill_batch(),
              "progress": self.ctx.progress}
        if filling:
            return self.ctx.cache.reader(*args, phase=lambda: self.ctx.phase("cache_fill"), **kw)
        with self.ctx.phase("cache_fill"):
            return self.ctx.cache.get(*args, **kw)

    def iterate_states(
        self, dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
        desc: str = "batches", rows: slice | None = None,
    ) -> Iterator[tuple[State, torch.Tensor]]:
        """``(prefix state, targets)`` batches: from the cache, or computed batch by batch. ``rows``: only these
        rows of ``dataset``, in order (a rank's shard; cached states are sliced, others computed for them alone)."""
        depth = self.frozen_depth
        cached = self.states(dataset, depth, filling=True)
        n = len(dataset) if rows is None else len(range(rows.start, rows.stop))
        if cached is not None:
            if rows is None:
                it = cached.batches(batch_size, shuffle, generator)
            else:
                it = (cached.take(i) for i in torch.arange(rows.start, rows.stop).split(batch_size))
            dev = self.ctx.device
            it = ((to_device(s, dev), y) for s, y in it)
        else:
            part = dataset if rows is None else subset(dataset, range(rows.start, rows.stop))
            it = self._fresh_states(part, depth, batch_size, shuffle, generator)
        if self.ctx.progress is not None:
            it = self.ctx.progress(it, math.ceil(n / batch_size), desc)
        return it

    def _fresh_states(self, dataset, depth, batch_size, shuffle, generator):
        for x, y in iterate_batches(dataset, batch_size, shuffle, generator):
            with torch.no_grad():  # yield outside the block: the consumer may need gradients
                taps = [i for i in self.prefix_taps if i < depth]
                state = self.backbone.forward_until(self.backbone.prepare(x, self.ctx.device), depth, taps)
            yield state, y

    def train_batches(self, dataset, exp_id: int, epoch: int) -> Iterator[tuple[State, torch.Tensor]]:
        """Shuffled training batches, seeded by (run seed, experience, epoch)."""
        return self.iterate_states(
            dataset, self.batch_size, shuffle=True, generator=self.ctx.generator(exp_id, epoch),
            desc=f"exp {exp_id} epoch {epoch + 1}/{self.epochs}",
        )

    @torch.no_grad()
    def score_batches(self, dataset: Dataset, batch_size: int, desc: str = "scores") -> Iterator[
            tuple[torch.Tensor, torch.Tensor]]:
        """``(scores [B, C], targets [B])`` over ``dataset`` in order: what evaluation runs. The default scores each
        batch of prefix states; a strategy that keeps per-item features of a data set (e.g. frozen embeddings, which
        never change) reads them here instead of computing them again."""
        for state, y in self.iterate_states(dataset, batch_size, desc=desc):
            yield self.scores(state), y

    @torch.no_grad()
    def update_statistics(self, head: nn.Module, dataset: Dataset, desc: str = "statistics") -> None:
        """Feed the features of ``dataset`` to a statistics head (NCM, LDA, RanPAC) batch by batch."""
        if not callable(getattr(head, "update", None)):
            raise TrainingError(f"{type(head).__name__} has no update(z, y): a statistics head adds features [B, dim] "
                                "with global class ids [B] to its statistics (docs/writing-a-strategy.md, "
                                "\"A strategy that does not train\")")
        for state, y in self.iterate_states(dataset, self.ctx.eval_batch_size, desc=desc):
            head.update(self.features(state), y.to(self.ctx.device))

    @torch.no_grad()
    def predict(self, inputs) -> torch.Tensor:
        """Predicted global class ids for a raw batch (images or strings); no task id needed."""
        if any(m.training for m in self.children()):  # a walk of every module per batch costs more than a small one
            self.eval()
        return self.scores(self.prefix(self.backbone.prepare(inputs, self.ctx.device))).argmax(1).cpu()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """State dict without the untouched pretrained backbone weights."""
        return {k: v for k, v in self.state_dict().items() if k not in self._pristine}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a ``checkpoint_state``: tensors that grew take the saved shape (``cl.loading``), pools recreate the
        adapters it names. A state that does not fit (shapes, keys, extra state of another kind) raises
        CheckpointError."""
        self.keep_pretrained(set(state))
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint does not fit this strategy ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1][:300]})") from None
        bad = [k for k in missing if k not in self._pristine]
        if bad or unexpected:
            raise CheckpointError(
                f"checkpoint does not fit this strategy: missing {bad[:5]}, unexpected {list(unexpected)[:5]}"
            )

    def extra_metrics(self) -> dict[str, Any]:
        """Strategy-specific figures for metrics.json (e.g. adapters per layer)."""
        return {}

    def count_params(self) -> dict[str, int]:
        """Total and trainable parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"params_total": total, "params_trainable": trainable}
