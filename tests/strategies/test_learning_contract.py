"""The learning contract of every registered strategy, on a tiny stream where training must help.

Every name in the strategy registry is checked (a newly registered strategy is included automatically):

(a) every module a training step optimises sees every batch row routed to it (adapters: the rows their pool's
    route sends them; anything else: the whole batch), and each of those rows sends a non-zero gradient back;
    a strategy without trainable parameters after ``fit`` must not have stepped an optimiser either;
(b) a strategy that trains beats its frozen twin (the same strategy and head with training epochs 0) on the
    experiences it trained on; one that trains nothing equals its twin;
(c) two gloo processes end with the strategy state of one process.

(a) and (b) run with ``LEARN``, settings under which every training strategy learns the stream; (c) with
``EXACT``, under which training is not chaotic: with Adam at ``LEARN``'s rate, full-block fine-tuning turns the
float rounding that differs between one sum and two half sums into 100% different weights after 360 steps, and
Adam makes lr-sized random steps out of the rounding noise of gradients that are exactly zero in theory (the
key bias of attention), so no two summation orders agree there. The 2-process runs of all strategies share
one spawn, started when the module's first test runs and joined by the (c) tests.
"""

from __future__ import annotations

import math
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import strategies  # noqa: F401  (registers every strategy)
from cl.adapters import AdapterPool, pools
from cl.agent import Agent
from cl.callbacks.base import Callback
from cl.data import ArrayDataset
from cl.experience import Stream
from cl.registry import STRATEGIES
from scenarios.builders import class_incremental
from tests.helpers import gloo_group, one_thread, state_differences

NAMES = STRATEGIES.names()
# Training settings given to every strategy that takes them: 5 steps an epoch of 64 rows, batches of 13 rows
# (7 + 6 on two ranks: gradient averaging over unequal slices)
LEARN = {"epochs": 8, "batch_size": 13, "lr": 1e-2}
EXACT = {"epochs": 2, "batch_size": 13, "lr": 1e-2, "optimizer": "sgd"}
FASTER = {"ranpac": {"proj_dim": 256}}  # only to save time: the default 2048-wide ridge head costs seconds
MARGIN = 0.2  # accuracy a trained strategy must gain over its frozen twin
RELATIVE = 1e-4  # |distributed - single| / |single| allowed per state tensor
SPAWN_TIMEOUT_S = 480


def contract_stream(train_per_class: int = 32, test_per_class: int = 24, seed: int = 0) -> Stream:
    """3 experiences of 2 classes, 16 px RGB, where frozen features cannot tell the classes apart and training can.

    Class: stripes along rows or along columns, with a random sign in each 4x4 cell (one patch of the tiny ViT),
    over random blocky brightness; experience ``e`` brightens channel ``e`` (the shift between experiences).
    Every class has the same mean image, so frozen features separate the two classes of an experience only
    through weak second-order terms (frozen features with an LDA, NCM or untrained linear head score 0.4-0.6
    within an experience, RanPAC's random ReLU projection 0.65-0.8); an adapter or block that learns the stripes'
    magnitude per patch separates them (1.0).
    """
    rng = np.random.default_rng(seed)
    size, cell = 16, 4
    rows = np.zeros((size, size))
    rows[::2] = 1
    stripes = [2 * rows - 1, 2 * rows.T - 1]  # class 2e: along rows, 2e + 1: along columns

    def blocks(shape: tuple[int, ...]) -> np.ndarray:
        return rng.integers(0, 2, shape).repeat(cell, -2).repeat(cell, -1)

    def make(per_class: int) -> ArrayDataset:
        n = 2 * per_class
        images, targets = [], []
        for e in range(3):
            labels = np.arange(n) % 2
            x = 60 + rng.normal(0, 10, (n, 3, size, size)) + 100 * blocks((n, 3, size // cell, size // cell))
            x[:, e] += 60
            sign = 2 * blocks((n, 1, size // cell, size // cell)) - 1
            x += 60 * sign * np.stack([stripes[c] for c in labels])[:, None]
            images.append(np.clip(x, 0, 255).astype(np.uint8))
            targets.append(2 * e + labels)
        return ArrayDataset(np.concatenate(images), np.concatenate(targets))

    return class_incremental(make(train_per_class), make(test_per_class), n_experiences=3,
                             class_order=list(range(6)), name="contract")


def strategy_params(name: str, training: dict[str, Any]) -> dict[str, Any]:
    """``training`` where the strategy takes those keys, plus any ``FASTER`` setting."""
    accepted = STRATEGIES.params_model(name).model_fields
    return {**{k: v for k, v in training.items() if k in accepted}, **FASTER.get(name, {})}


def make_agent(name: str, training: dict[str, Any], rank: int = 0, world_size: int = 1,
               callbacks: list[Callback] | None = None) -> Agent:
    """An agent of ``name`` on the tiny random ViT, evaluated within each experience's classes (task-aware)."""
    return Agent("vit_tiny_test", name, strategy_params=strategy_params(name, training), callbacks=callbacks,
                 device="cpu", progress=False, task_aware=True, eval_batch_size=64, rank=rank, world_size=world_size)


def learn(agent: Agent, stream: Stream) -> list[float]:
    """Learn the stream; the accuracy on each experience right after learning it (its classes only)."""
    return [agent.learn(exp)["accuracy"][-1] for exp in stream]


def tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


# ---- (a): rows in, gradients out -------------------------------------------------------------------------
@dataclass
class Step:
    rows: int  # rows of the batch given to ``training_step``
    seen: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # rows each trained module received
    routed: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # rows the routes sent each adapter
    graded: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # rows with a non-zero gradient back
    calls: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # rows per call, not adapters
    errors: list[str] = field(default_factory=list)  # routes that fit no batch


class RowWatch:
    """Watches a strategy's training: which parameters each optimiser steps (by experience), and per training
    step the rows each trained module receives, the rows routed to each trained adapter, and the rows whose
    gradient comes back through the module's output."""

    def __init__(self, agent: Agent) -> None:
        self.strategy = s = agent.strategy
        self.trained: dict[int, set[str]] = defaultdict(set)  # experience -> names of the stepped parameters
        self.groups: dict[str, str] = {}  # trained module -> "adapter" or "module"
        self.steps: list[tuple[int, Step, dict[str, str]]] = []  # (experience, step, groups trained then)
        self._step: Step | None = None
        self._handles: list[Any] = []
        s.configure_optimizer = self._configure_optimizer  # shadows the method for this instance
        s.training_step = self._training_step

    def _configure_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        s = self.strategy
        ids = {id(p) for p in params}
        self.trained[s.experience.id] |= {n for n, p in s.named_parameters() if id(p) in ids}
        self._watch(ids)
        return type(s).configure_optimizer(s, params)

    def _training_step(self, state: Any, y: torch.Tensor) -> torch.Tensor:
        self._step = Step(rows=len(y))
        self.steps.append((self.strategy.experience.id, self._step, dict(self.groups)))
        try:
            return type(self.strategy).training_step(self.strategy, state, y)
        finally:
            self._step = None  # the backward after it still reports gradients to this step's record

    def _watch(self, ids: set[int]) -> None:
        """Hook the modules whose parameters ``ids`` holds: each trained adapter, and the largest modules made
        only of the other trained parameters (a head, a block); a parameter in none goes with its own module."""
        for h in self._handles:
            h.remove()
        self._handles, self.groups = [], {}
        s = self.strategy
        modules = dict(s.named_modules())
        named = {id(m): n for n, m in modules.items()}
        adapters: list[nn.Module] = []
        for pool in pools(s.backbone).values():
            trained = {n: a for n, a in pool.adapters.items() if any(id(p) in ids for p in a.parameters())}
            if trained:
                keys = {n: named[id(a)] for n, a in trained.items()}
                self._handles.append(pool.register_forward_pre_hook(self._routes(keys), with_kwargs=True))
            adapters += trained.values()
        rest = ids - {id(p) for a in adapters for p in a.parameters()}
        whole = {n for n, m in modules.items() if (ps := list(m.parameters())) and all(id(p) in rest for p in ps)}
        chosen = {n for n in whole if not any(n.startswith(o + ".") for o in whole)}
        covered = {id(p) for n in chosen for p in modules[n].parameters()}
        chosen |= {n for n, m in modules.items() if any(id(p) in rest - covered for p in m.parameters(recurse=False))}
        for a in adapters:
            self._hook(named[id(a)], a, "adapter")
        for n in chosen:
            self._hook(n, modules[n], "module")

    def _hook(self, name: str, module: nn.Module, kind: str) -> None:
        self.groups[name] = kind

        def forward(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            step = self._step
            if step is None:  # evaluation, statistics: not a training step
                return
            x = _first_tensor((*args, *kwargs.values()))
            if x is None:
                step.errors.append(f"{name} was called without a tensor input")
                return
            step.seen[name] += x.shape[0]
            if kind == "module":
                step.calls[name].append(x.shape[0])
            y = _first_tensor(out if isinstance(out, tuple) else (out,))
            if y is not None and y.requires_grad:
                y.register_hook(lambda g: step.graded.__setitem__(
                    name, step.graded[name] + int((g.reshape(len(g), -1) != 0).any(1).sum())))

        self._handles.append(module.register_forward_hook(forward, with_kwargs=True))

    def _routes(self, keys: dict[str, str]):
        """A pre-hook on ``pool`` counting the rows its route sends each trained adapter: a ``[K]`` or ``[1, K]``
        route or an adapter's name sends every row, a ``[B, K]`` one each row where it is non-zero (a router: the
        same, from its weights); with no route and no router every adapter gets every row."""

        def pre(m: AdapterPool, args: tuple, kwargs: dict) -> None:
            step = self._step
            if step is None:
                return
            x = args[0]
            b = x.shape[0]
            w = m.route_override
            if isinstance(w, str):  # an adapter name: every row to that adapter
                w = m.route_to(w)
            if w is None and m.router is not None and len(m) > 1:
                with torch.no_grad():
                    w = m.router(m.pool_input(x, args[2] if len(args) > 2 else kwargs.get("mask")))
            if w is None:
                w = torch.ones(len(m))
            w = w.expand(b, -1) if w.dim() == 1 or w.shape[0] == 1 else w
            if w.shape[0] != b:
                step.errors.append(f"a route of {w.shape[0]} rows for a batch of {b} into {list(keys.values())}")
                return
            for n, key in keys.items():  # adapter name in the pool -> module name in the strategy
                step.routed[key] += int((w[:, m.names.index(n)] != 0).sum())

        return pre

    def problems(self) -> list[str]:
        """Every breach of (a), as readable lines."""
        out = []
        for exp, step, groups in self.steps:
            where = f"experience {exp}, a batch of {step.rows}"
            out += [f"{where}: {e}" for e in step.errors]
            if not groups:
                out.append(f"{where}: a training step with no trained module")
            for name, kind in groups.items():
                seen, graded = step.seen.get(name, 0), step.graded.get(name, 0)
                if kind == "adapter":
                    if seen != step.routed.get(name, 0):
                        out.append(f"{where}: adapter {name} received {seen} rows, its routes sent it "
                                   f"{step.routed.get(name, 0)}")
                elif not step.calls.get(name) or any(r != step.rows for r in step.calls[name]):
                    out.append(f"{where}: {name} received {step.calls.get(name, [])} rows per call")
                if graded != seen:
                    out.append(f"{where}: {name} got a gradient from {graded} of the {seen} rows it received")
        return out


def _first_tensor(values: Any) -> torch.Tensor | None:
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


# ---- single-process runs ------------------------------------------------------------------------------------
@dataclass
class Run:
    accuracy: list[float]  # per experience, right after learning it
    trained: dict[int, set[str]]  # experience -> parameters an optimiser stepped
    trainable: list[str]  # parameters that require a gradient after the stream
    problems: list[str]  # breaches of (a)
    state: dict[str, torch.Tensor]
    steps: int  # training steps in all


def single_run(name: str, training: dict[str, Any], frozen: bool = False) -> Run:
    """One process learns the contract stream (``frozen``: with training epochs 0, the frozen twin)."""
    with one_thread():
        agent = make_agent(name, training)
        if frozen:
            agent.strategy.epochs = 0
        watch = RowWatch(agent)
        accuracy = learn(agent, contract_stream())
    s = agent.strategy
    return Run(accuracy, dict(watch.trained), [n for n, p in s.named_parameters() if p.requires_grad],
               watch.problems(), tensors(s.checkpoint_state()), len(watch.steps))


class Runs:
    """Single-process runs by (strategy, settings, frozen), each made once."""

    def __init__(self) -> None:
        self.done: dict[tuple[str, str, bool], Run] = {}

    def __call__(self, name: str, training: dict[str, Any], frozen: bool = False) -> Run:
        key = (name, repr(training), frozen)
        if key not in self.done:
            self.done[key] = single_run(name, training, frozen)
        return self.done[key]


@pytest.fixture(scope="module")
def runs() -> Runs:
    return Runs()


# ---- 2-process runs -----------------------------------------------------------------------------------------
class Syncs(Callback):
    """Whether the ranks held identical strategy states after each experience (the agent's ``sync`` events)."""

    def __init__(self) -> None:
        self.identical: list[bool] = []

    def on_event(self, agent: Agent, kind: str, data: dict[str, Any]) -> None:
        if kind == "sync":
            self.identical.append(bool(data["identical"]))


def _rank_worker(rank: int, world: int, init_file: str, out: str, names: list[str], training: dict[str, Any]) -> None:
    """One of two gloo ranks: learn the stream with every strategy in turn; rank 0 saves each final state (or
    the error) and whether the ranks ended identical."""
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file):
        for name in names:
            try:
                syncs = Syncs()
                agent = make_agent(name, training, rank, world, callbacks=[syncs])
                accuracy = learn(agent, contract_stream())
                result = {"state": tensors(agent.strategy.checkpoint_state()), "accuracy": accuracy,
                          "identical": syncs.identical}
            except Exception:
                result = {"error": traceback.format_exc()}
            if rank == 0:
                torch.save(result, Path(out) / f"{name}.pt")


class Distributed:
    """The 2-process runs of every strategy, in the background from construction; ``result(name)`` waits."""

    def __init__(self, out: Path, names: list[str], training: dict[str, Any]) -> None:
        self.out = out
        self.context = mp.spawn(_rank_worker, args=(2, str(out / "init"), str(out), names, training), nprocs=2,
                                join=False)
        self.deadline = time.monotonic() + SPAWN_TIMEOUT_S
        self.done = False

    def wait(self) -> None:
        while not self.done:
            if time.monotonic() > self.deadline:
                self.stop()
                raise TimeoutError(f"the 2-process runs took more than {SPAWN_TIMEOUT_S} s")
            self.done = self.context.join(timeout=1)

    def stop(self) -> None:
        for p in self.context.processes:
            if p.is_alive():
                p.kill()
                p.join()
        self.done = True

    def result(self, name: str) -> dict[str, Any]:
        self.wait()
        return torch.load(self.out / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> Iterator[Distributed]:
    """Every test asks for it, so that the 2-process runs start with the module's first test and overlap the
    single-process ones; stopped (killed if still running) when the module ends."""
    d = Distributed(tmp_path_factory.mktemp("contract-2proc"), NAMES, EXACT)
    try:
        yield d
    finally:
        d.stop()


# ---- the contract ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_trained_module_learns_from_every_row(name, runs, distributed):
    """(a) Rows in and gradients out of every trained module, at every training step; a strategy that keeps no
    trainable parameter after fit trained nothing."""
    run = runs(name, LEARN)
    if not run.trainable:
        assert not run.trained and run.steps == 0, f"{name} stepped an optimiser but keeps no trainable parameter"
        return
    assert run.trained, f"{name} keeps trainable parameters {run.trainable[:4]} but never trained them"
    assert run.steps > 0
    assert not run.problems, "\n".join(run.problems[:10])


@pytest.mark.parametrize("name", NAMES)
def test_training_beats_the_frozen_twin(name, runs, distributed):
    """(b) On the experiences it trained on, the strategy beats itself with training epochs 0 by ``MARGIN``."""
    run, twin = runs(name, LEARN), runs(name, LEARN, frozen=True)
    assert not twin.trained, f"{name} trained {sorted(twin.trained)} with epochs=0"
    if not run.trained:  # training-free: the twin is the same run
        assert run.accuracy == twin.accuracy
        return
    exps = sorted(run.trained)
    gain = np.mean([run.accuracy[e] - twin.accuracy[e] for e in exps])
    assert gain >= MARGIN, (f"{name} on experiences {exps}: trained {[run.accuracy[e] for e in exps]}, "
                            f"frozen twin {[twin.accuracy[e] for e in exps]}")


@pytest.mark.parametrize("name", NAMES)
def test_two_gloo_processes_end_where_one_does(name, runs, distributed):
    """(c) Rank 0 of a 2-process run holds the single-process state (rank 1 the same: the sync checks)."""
    single = runs(name, EXACT)
    result = distributed.result(name)
    assert "error" not in result, result.get("error")
    assert result["identical"] == [True] * 3, "the ranks' states differed after some experience"
    far = state_differences(result["state"], single.state, RELATIVE, 1e-7)
    assert not far, f"{len(far)} of {len(single.state)} state tensors differ: {dict(list(far.items())[:8])}"
    assert math.isclose(np.mean(result["accuracy"]), np.mean(single.accuracy), abs_tol=0.02)
