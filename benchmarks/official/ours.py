"""Our side of ``benchmarks.official``: ``sema`` and ``mos`` run through their own code paths on random images.

Every function here works without the official checkouts (the smoke test runs them on a tiny ViT).
``sema`` runs with its defaults (hard routes picked by an LDA task head on the prefix's taps, LDA head over
``[taps, mixture]``: one backbone pass) except for the settings the official run shares: batch, epochs,
descriptor epochs, SGD with the official learning rate and weight decay, and a fixed expansion decision
(``OneExpansion``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.mixture_inference import randomise
from cl.agent import Agent
from cl.backbones import Backbone, create_backbone
from cl.callbacks.base import Callback
from cl.data import ArrayDataset
from cl.descriptors import ShiftDecision, ShiftDetector
from cl.experience import Experience
from cl.strategy import Strategy
from strategies.mos import MOS
from strategies.sema import SEMA


@dataclass
class Sizes:
    """What both sides share; ``--quick`` shrinks it."""

    images: int = 32  # per side per case (SEMA training and inference, MOS inference)
    batch: int = 32  # SEMA training and inference batch (the official config's)
    epochs: int = 5  # adapter epochs of the timed later task (official func_epoch, CIFAR config)
    descriptor_epochs: int = 20  # official rd_epoch (every config)
    classes: int = 10  # classes per task
    setup_images: int = 4  # the untimed first task that puts both sides in their later-task state
    mos_batch: int = 32
    seed: int = 0


#: the official SEMA config's optimiser (exps/sema_cifar.json: SGD, init_lr 0.005, weight_decay 0.0005)
SEMA_TRAINING = {"optimizer": "sgd", "lr": 0.005, "weight_decay": 0.0005}


def random_images(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``n`` random uint8 images ``[n, *shape]``."""
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)


def labels(n: int, task: int, classes: int) -> torch.Tensor:
    """Targets of ``n`` items of task ``task``: its ``classes`` classes in turn."""
    return task * classes + torch.arange(n) % classes


def experience(task: int, images: torch.Tensor, classes: int) -> Experience:
    """Experience ``task`` of ``classes`` classes on ``images`` (no test set: nothing is evaluated)."""
    return Experience(task, ArrayDataset(images, labels(len(images), task, classes)), None,
                      list(range(task * classes, (task + 1) * classes)))


class OneExpansion(ShiftDetector):
    """SEMA's detector with its decision fixed: the first layer it is asked about shifts, the others do not.

    The descriptors' losses and z-scores are still computed (the scan costs what it costs); only the decision
    is overridden, so that both sides add exactly one adapter, in the first expandable block.
    """

    def __init__(self, tau: float = 2.0) -> None:
        super().__init__(tau)
        self.calls = 0

    def __call__(self, descriptors: Any, pooled: torch.Tensor) -> ShiftDecision:
        real = super().__call__(descriptors, pooled)
        self.calls += 1
        return ShiftDecision(self.calls == 1, real.zscores, real.tau)


class EpochTimer(Callback):
    """Seconds of every training epoch of the agent."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def before_epoch(self, agent: Any, exp: Any, epoch: int) -> None:
        self._t0 = time.perf_counter()

    def after_epoch(self, agent: Any, exp: Any, epoch: int, logs: dict[str, float]) -> None:
        self.times.append(time.perf_counter() - self._t0)


def learn(agent: Agent, exp: Experience) -> None:
    """What ``Agent.learn`` does to the strategy, without evaluation, journal or checkpoints."""
    s = agent.strategy
    s.before_experience(exp)
    s.fit(exp)
    s.after_experience(exp)


def sema_after_first_task(backbone: str, sizes: Sizes, generator: torch.Generator) -> Agent:
    """A fresh ``sema`` agent that has learned a first task of ``sizes.setup_images`` images (1 epoch each),
    set up for the timed later task: ``sizes.epochs`` epochs, ``sizes.descriptor_epochs`` descriptor epochs."""
    bb = create_backbone(backbone)
    strategy = SEMA(bb, epochs=1, descriptor_epochs=1, batch_size=sizes.batch, **SEMA_TRAINING)
    strategy.detector = OneExpansion(strategy.detector.tau)
    agent = Agent(bb, strategy, device="cpu", progress=False, journal=False, seed=sizes.seed,
                  callbacks=[EpochTimer()])
    shape = bb.data_config.input_size
    learn(agent, experience(0, random_images(sizes.setup_images, shape, generator), sizes.classes))
    strategy.epochs, strategy.descriptor_epochs = sizes.epochs, sizes.descriptor_epochs
    return agent


def epoch_timer(agent: Agent) -> EpochTimer:
    return next(c for c in agent.callbacks.callbacks if isinstance(c, EpochTimer))


def sema_begin_task(agent: Agent, exp: Experience) -> dict[int, str]:
    """Start ``exp`` as ``sema`` does (hooks, the real scan of every layer) and stop where the new adapter would be
    trained; returns it (``{layer: name}``)."""
    s = agent.strategy
    s.before_experience(exp)
    new: dict[int, str] = {}
    s._train_expansion = lambda e, added: new.update(added)  # the instance attribute shadows the method
    try:
        s.fit(exp)
    finally:
        del s._train_expansion
    if len(new) != 1:
        raise RuntimeError(f"expected one expansion, got {new}")
    return new


def sema_train_epoch(agent: Agent, exp: Experience, new: dict[int, str], fill: bool = False) -> None:
    """One epoch of ``sema``'s training loop for the adapter ``new`` (as inside ``SEMA._train_expansion``);
    ``fill``: empty the prefix cache first, so the epoch fills it."""
    s = agent.strategy
    if fill:
        agent.ctx.cache.clear()
    epochs, s.epochs, s._training_exp = s.epochs, 1, exp.id
    try:
        with s._forced(new):
            Strategy.fit(s, exp)
    finally:
        s.epochs, s._training_exp = epochs, None


def sema_experience(agent: Agent, exp: Experience) -> dict[str, Any]:
    """Learn ``exp`` (a later task), everything included: the prefix-cache fill, the scan of every layer, the
    epochs, the descriptors, the statistics heads. Seconds in all and per phase; the adapters per layer."""
    s = agent.strategy
    timer = epoch_timer(agent)
    timer.times.clear()
    spent = {"descriptors": 0.0}
    train_descriptor = s._train_descriptor

    def timed_descriptor(*args: Any) -> None:
        t = time.perf_counter()
        train_descriptor(*args)
        spent["descriptors"] += time.perf_counter() - t

    s._train_descriptor = timed_descriptor
    try:
        t0 = time.perf_counter()
        s.states(exp.train)  # the fill (the scan would do it otherwise)
        t1 = time.perf_counter()
        s.before_experience(exp)
        s.fit(exp)
        t2 = time.perf_counter()
        s.after_experience(exp)
        t3 = time.perf_counter()
    finally:
        del s._train_descriptor
    epochs = sum(timer.times)
    return {
        "s": t3 - t0,
        "phases": {"fill": t1 - t0, "epochs": epochs, "descriptors": spent["descriptors"],
                   "scans and other": (t2 - t1) - epochs - spent["descriptors"], "after_experience (heads)": t3 - t2},
        "adapters_per_layer": {str(k): len(p) for k, p in s.pools.items()},
    }


def sema_predict(agent: Agent, images: torch.Tensor, batch: int) -> None:
    agent.predict(images, batch_size=batch)


# ---- MOS ----------------------------------------------------------------------------------------------
def plain_backbone(backbone: str) -> Backbone:
    return create_backbone(backbone).eval()


@torch.no_grad()
def mos_with_tasks(plain: Backbone, tasks: int, classes: int, generator: torch.Generator) -> MOS:
    """Our ``mos`` after ``tasks`` tasks of ``classes`` classes, adapters on every block (as MOS adapts all),
    without training: random adapter weights; the two heads fed different random class statistics, so the
    adapted head mostly points to another task than the frozen one and nearly every input is refined (our worst
    case, about 3 - 1/T suffix passes). Inference runs the real path (frozen pass, task adapter,
    self-refinement, ensemble)."""
    s = MOS(copy.deepcopy(plain), layers=list(range(plain.num_blocks)))
    for t in range(tasks):
        s.before_experience(Experience(t, None, None, list(range(t * classes, (t + 1) * classes))))
    for pool in s.pools.values():
        randomise(pool, generator)
    n, dim = tasks * classes, plain.embed_dim
    y = torch.arange(n).repeat_interleave(8)
    for head in (s.frozen_head, s.head):
        z = torch.randn(n, dim, generator=generator)[y] + 0.5 * torch.randn(len(y), dim, generator=generator)
        head.update(z, y)
    return s.eval()


@torch.no_grad()
def mos_predict(strategy: MOS, images: torch.Tensor, batch: int) -> None:
    for x in images.split(batch):
        strategy.predict(x)
