"""The resumable training loop behind ``Strategy.fit``, and its resume points inside an experience.

``train(strategy, exp)`` runs ``strategy.epochs`` passes of ``strategy.train_batches`` through ``training_step`` and
one optimiser step per batch (``optimizer_step``: in a distributed run each rank takes its rows of the batch and the
gradients are averaged). A stop request (SIGINT/SIGTERM) ends the loop after the current step with
``RunInterrupted`` carrying a resume point (``partial``), and ``ctx.on_resume_point`` saves one periodically. Given
back as ``strategy.loops.resume`` when the experience runs again, the interrupted loop continues from that step, and
every loop of the experience that had finished before it (a strategy may run several, e.g. SEMA's one per expansion)
is fast-forwarded: its trained values, random state and epoch logs are restored without training again.

Plateau stopping (``strategy.plateau_delta``, off when None; ``strategy.plateau_patience``): a loop ends before its
last epoch once its loss has stopped improving, decided after each epoch on the epoch's mean loss summed over the
ranks, so every rank of a distributed run stops at the same epoch (``plateaued``). With ``strategy.plateau_every``
the decision is also taken inside an epoch, after every ``plateau_every`` optimiser steps, on each window's mean loss
(``Windows``; an epoch's last window ends with it), so a loop can end inside an epoch (that epoch is then logged with
the steps it ran); an epoch of at most ``plateau_every`` steps decides once, at its end, as without windows. The
decision reads only the epoch logs and the window means, which resume points and finished loops keep, so a resumed
run stops where an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from cl import distributed as dist
from cl.backbones.state import State, take_rows
from cl.context import Context
from cl.errors import CheckpointError, TrainingError
from cl.experience import Experience
from cl.interrupt import RunInterrupted
from cl.seed import rng_state, set_rng_state


@dataclass
class Loops:
    """The base loops of a strategy's current experience: how many started, what each finished one did (the names
    it trained, then their values; random state; epoch logs), and the resume point to continue from (or None)."""

    calls: int = 0
    done: list[dict[str, Any]] = field(default_factory=list)
    resume: dict[str, Any] | None = None

    def start_experience(self) -> None:
        """Forget the loops of the previous experience (the resume point stays: it is for this one)."""
        self.calls, self.done = 0, []


def plateaued(losses: list[float], delta: float | None, patience: int = 1) -> bool:
    """Whether a loop whose epochs ended with mean ``losses`` (in order) has stopped improving: its last ``patience``
    epochs each failed to lower the best loss before them by ``delta``, or its last loss is below ``delta`` (the loss
    is non-negative, e.g. cross-entropy, so no later epoch can improve it by ``delta``). Never with ``delta`` None."""
    if delta is None or not losses:
        return False
    if losses[-1] < delta:
        return True
    best, wait = float("inf"), 0
    for loss in losses:
        if loss < best - delta:
            best, wait = loss, 0
        else:
            wait += 1
    return wait >= patience


class Windows:
    """The plateau windows of a loop with ``plateau_every``: each epoch's steps in windows of ``every`` steps, its last
    window ending with the epoch (so an epoch of at most ``every`` steps is one window, as without windows). Holds the
    mean loss of each closed window (summed over the ranks), the sums of the open one, and whether a window closed
    since the last decision (``pending``): it is decided before the next step, or at the epoch's end, where the loop's
    last epoch decides nothing (as the per-epoch rule)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.means: list[float] = []
        self.total, self.count, self.steps, self.pending = 0.0, 0, 0, False

    def add(self, loss: float, n: int) -> None:
        """Count one step's mean ``loss`` over ``n`` rows; the ``every``-th closes the window."""
        self.total, self.count, self.steps = self.total + loss * n, self.count + n, self.steps + 1
        if self.steps >= self.every:
            self._close()

    def _close(self) -> None:
        total, count = dist.all_sum([self.total, self.count])
        self.means.append(total / max(count, 1))
        self.total, self.count, self.steps, self.pending = 0.0, 0, 0, True

    def decide(self) -> bool:
        """Whether a window closed since the last call (a plateau decision is due)."""
        due, self.pending = self.pending, False
        return due

    def end_epoch(self) -> bool:
        """Close the epoch's last window; whether a decision is due."""
        if self.steps:
            self._close()
        return self.decide()

    def state(self) -> dict[str, Any]:
        return {"means": list(self.means), "total": self.total, "count": self.count, "steps": self.steps,
                "pending": self.pending}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``."""
        self.means = list(state["means"])
        self.total, self.count = state["total"], state["count"]
        self.steps, self.pending = state["steps"], state["pending"]


class Trainee(Protocol):
    """What the loop uses of a strategy (``cl.strategy.Strategy`` has all of it)."""

    epochs: int
    plateau_delta: float | None
    plateau_patience: int
    plateau_every: int | None
    loops: Loops
    ctx: Context

    def parameters(self) -> Iterator[nn.Parameter]: ...
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...
    def configure_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer: ...
    def train_batches(self, dataset: Any, exp_id: int, epoch: int) -> Iterable[tuple[State, torch.Tensor]]: ...
    def training_step(self, state: State, y: torch.Tensor) -> torch.Tensor: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def keep_pretrained(self, names: set[str]) -> None: ...
    def checkpoint_state(self) -> dict[str, torch.Tensor]: ...
    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any: ...


def train(strategy: Trainee, exp: Experience) -> None:
    """One base loop of ``strategy`` on ``exp`` (see ``Strategy.fit``); resumes or fast-forwards per ``loops``."""
    with strategy.ctx.phase("train"):
        _train(strategy, exp)


def _train(strategy: Trainee, exp: Experience) -> None:
    params = [p for p in strategy.parameters() if p.requires_grad]
    if not params or strategy.epochs == 0:
        return
    loops, ctx = strategy.loops, strategy.ctx
    call = loops.calls
    loops.calls += 1
    if loops.done and "names" in loops.done[-1]:  # a later loop: keep what the previous one trained
        loops.done[-1]["state"] = _snapshot(strategy, loops.done[-1].pop("names"))
    resume = loops.resume
    if resume is not None and call < resume["call"]:
        return _fast_forward(strategy, exp, resume["done"][call])
    opt = strategy.configure_optimizer(params)
    strategy.keep_pretrained({n for n, p in strategy.named_parameters() if p.requires_grad})
    cb = ctx.callbacks
    e0, s0, rng, logs = 0, 0, None, []
    every = getattr(strategy, "plateau_every", None)
    windows = Windows(every) if every else None
    if resume is not None:  # the loop that was interrupted
        e0, s0, rng, logs = resume["epoch"], resume["step"], resume["rng"], list(resume["epoch_logs"])
        if windows is not None and resume.get("windows") is not None:
            windows.restore(resume["windows"])
        strategy.load_checkpoint_state(resume["state"])
        try:
            opt.load_state_dict(resume["optimizer"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"the resume point of experience {exp.id} does not fit this strategy's "
                                  f"optimizer ({type(e).__name__}: {e}): delete checkpoints/partial-* and "
                                  "resume, to repeat the experience from its start") from None
        _replay_epochs(strategy, exp, logs)
        loops.resume = None
    delta, patience = getattr(strategy, "plateau_delta", None), getattr(strategy, "plateau_patience", 1)
    stopped = False
    for epoch in range(e0, strategy.epochs):
        if cb is not None:
            cb.before_epoch(ctx.agent, exp, epoch)
        strategy.train()
        total, count = (resume["total"], resume["count"]) if resume is not None and epoch == e0 else (0.0, 0)
        batches = iter(strategy.train_batches(exp.train, exp.id, epoch))
        first = s0 if epoch == e0 else 0
        for _ in range(first):  # steps done before the interruption
            next(batches, None)
        if rng is not None:
            set_rng_state(rng)
            rng = None
        for it, (state, y) in enumerate(batches, start=first):
            if windows is not None and windows.decide() and plateaued(windows.means, delta, patience):
                stopped = True  # the window that closed after the previous step: stop before this one
                break
            if cb is not None:
                cb.before_iteration(ctx.agent, it)
            loss, n = optimizer_step(strategy, opt, params, state, y, (exp.id, epoch, it))
            total += loss * n
            count += n
            if windows is not None:
                windows.add(loss, n)
            if cb is not None:
                cb.after_iteration(ctx.agent, it, loss)
            try:
                ctx.check_stop(f"after step {it} of epoch {epoch} of experience {exp.id}")
            except RunInterrupted as e:
                e.partial = resume_point(strategy, exp, call, epoch, it + 1, opt, total, count, logs, windows)
                raise
            if ctx.resume_point_due() and ctx.on_resume_point is not None:
                ctx.on_resume_point(resume_point(strategy, exp, call, epoch, it + 1, opt, total, count, logs, windows))
        total, count = dist.all_sum([total, count])
        strategy.eval()
        logs.append((epoch, {"loss": total / max(count, 1)}))
        if cb is not None:
            cb.after_epoch(ctx.agent, exp, epoch, logs[-1][1])
        last = epoch + 1 == strategy.epochs
        if windows is None:
            stopped = not last and plateaued([v["loss"] for _, v in logs], delta, patience)
        elif not stopped:
            stopped = windows.end_epoch() and not last and plateaued(windows.means, delta, patience)
        if stopped:
            if cb is not None:
                where = {} if windows is None else {"every": windows.every, "windows": len(windows.means)}
                cb.on_event(ctx.agent, "plateau", {
                    "loop": call, "epochs": epoch + 1, "of": strategy.epochs, "loss": logs[-1][1]["loss"],
                    "delta": delta, "patience": patience, **where})
            break
    loops.done.append({"names": {n for n, p in strategy.named_parameters() if p.requires_grad},
                       "rng": rng_state(), "epoch_logs": logs})


def optimizer_step(strategy: Trainee, opt: torch.optim.Optimizer, params: list[nn.Parameter], state: State,
                   y: torch.Tensor, where: tuple[int, int, int]) -> tuple[float, int]:
    """One optimiser step on a global batch; in a distributed run on this rank's rows of it, with gradients
    averaged over ranks (the same update as one process on the whole batch). Returns this rank's loss and
    row count. ``where``: (experience, epoch, batch), named when the loss is not finite."""
    y_local = y
    if dist.is_distributed():
        rows = dist.local_rows(len(y))
        state, y_local = take_rows(state, rows), y[rows]
    opt.zero_grad(set_to_none=True)
    loss = strategy.training_step(state, y_local.to(strategy.ctx.device)) if len(y_local) else None
    bad = loss is not None and not bool(torch.isfinite(loss))
    if dist.any_rank(bad):
        value = loss.item() if bad else "not finite on another rank"
        exp_id, epoch, it = where
        raise TrainingError(
            f"loss is {value} at experience {exp_id}, epoch {epoch}, batch {it}: lower the learning rate "
            "(strategy.lr) or check the inputs for NaN; the run stopped before this step, and the last "
            "checkpoint (the previous experience) is kept"
        )
    if loss is not None:
        loss.backward()
    dist.average_gradients(params, len(y_local) / max(len(y), 1))
    opt.step()
    return (loss.item() if loss is not None else 0.0), len(y_local)


def _snapshot(strategy: Trainee, names: set[str]) -> dict[str, torch.Tensor]:
    entries = dict(strategy.named_parameters())
    return {n: entries[n].detach().cpu().clone() for n in names if n in entries}


def resume_point(strategy: Trainee, exp: Experience, call: int, epoch: int, step: int, opt: torch.optim.Optimizer,
                 total: float, count: int, logs: list, windows: Windows | None = None) -> dict[str, Any]:
    """Everything needed to continue loop ``call`` after ``step`` steps of ``epoch`` (see ``train``): plain data
    and tensors, as checkpoints hold them."""
    done = [d if "state" in d else {**{k: v for k, v in d.items() if k != "names"},
                                     "state": _snapshot(strategy, d["names"])} for d in strategy.loops.done]
    return {
        "experience": exp.id, "call": call, "epoch": epoch, "step": step, "total": total, "count": count,
        "epoch_logs": list(logs), "done": done, "rng": rng_state(), "optimizer": opt.state_dict(),
        "windows": windows.state() if windows is not None else None,
        "state": {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                  for k, v in strategy.checkpoint_state().items()},
    }


def _fast_forward(strategy: Trainee, exp: Experience, done: dict[str, Any]) -> None:
    """Stand for a loop that had finished before the interruption: its trained values, random state and
    epoch logs, without training again."""
    strategy.keep_pretrained(set(done["state"]))
    try:
        _, unexpected = strategy.load_state_dict(done["state"], strict=False)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"the resume point does not fit this strategy ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1][:300]})") from None
    if unexpected:
        raise CheckpointError(f"the resume point does not fit this strategy (unexpected {unexpected[:5]})")
    _replay_epochs(strategy, exp, done["epoch_logs"])
    set_rng_state(done["rng"])
    strategy.loops.done.append(done)


def _replay_epochs(strategy: Trainee, exp: Experience, logs: list) -> None:
    """Tell the callbacks about epochs finished before an interruption (so logs and events stay complete)."""
    cb = strategy.ctx.callbacks
    for epoch, values in logs if cb is not None else ():
        cb.before_epoch(strategy.ctx.agent, exp, epoch)
        cb.after_epoch(strategy.ctx.agent, exp, epoch, values)
