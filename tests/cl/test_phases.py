"""Where the time goes (cl/phases.py, metrics.json phase_*), plateau stopping (cl/training.py), and the frozen
embeddings a cached data set keeps (cl/memory_embedding.py): the figures add up, a plateaued loop stops and says so,
and the kept embeddings give the scores computed without them."""

from __future__ import annotations

import json
import time

import pytest
import torch

from cl.agent import Agent
from cl.callbacks.base import Callback
from cl.phases import PhaseClock
from cl.report import write_report
from cl.run import run
from cl.training import plateaued
from scenarios import create_scenario
from tests.helpers import TINY_SCENARIO, one_thread, tiny_config


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_phase_clock_counts_nested_phases_once():
    clock = PhaseClock()
    with clock.phase("train: layer 1"):
        _busy(0.02)
        with clock.phase("train"):  # the loop's own bare kind refines the strategy's phase
            _busy(0.02)
        with clock.phase("cache_fill"):
            _busy(0.03)
    wall, cpu = clock.totals(digits=6)
    assert set(wall) == {"train: layer 1", "cache_fill"}
    assert cpu["cache_fill"] == pytest.approx(0.03, abs=0.01)
    assert cpu["train: layer 1"] == pytest.approx(0.04, abs=0.015)
    clock.reset()
    assert clock.totals() == ({}, {})


def test_plateaued():
    assert not plateaued([1.0, 0.5], None)
    assert plateaued([0.005], 0.01)  # below delta: nothing left to gain
    assert not plateaued([1.0, 0.9], 0.05)
    assert plateaued([1.0, 0.99], 0.05)
    assert not plateaued([1.0, 0.99], 0.05, patience=2)
    assert plateaued([1.0, 0.99, 0.98], 0.05, patience=2)
    assert not plateaued([1.0, 0.99, 0.5], 0.05, patience=2)  # the last epoch improved: the wait starts again


class Epochs(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.events: list[dict] = []
        self.steps = 0

    def after_iteration(self, agent, iteration, loss) -> None:
        self.steps += 1

    def after_epoch(self, agent, exp, epoch, logs) -> None:
        self.epochs.append(epoch)

    def on_event(self, agent, kind, data) -> None:
        if kind == "plateau":
            self.events.append(data)


@pytest.mark.parametrize("delta", [None, 100.0])
def test_a_plateaued_loop_stops_early_and_says_so(delta):
    scen = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}
    stream = create_scenario("synthetic", **{**scen, "n_experiences": 1})
    rec = Epochs()
    with one_thread():
        agent = Agent("vit_tiny_test", "finetune", strategy_params={"epochs": 4, "plateau_delta": delta},
                      callbacks=[rec], device="cpu", progress=False, journal=False)
        agent.learn(stream[0])
    if delta is None:
        assert rec.epochs == [0, 1, 2, 3] and rec.events == []
    else:  # every loss is below 100: nothing to gain after the first epoch
        assert rec.epochs == [0]
        assert rec.events[0]["epochs"] == 1 and rec.events[0]["of"] == 4
        assert "every" not in rec.events[0]  # decided at the epoch's end


def _steps_per_epoch():
    """Batches per epoch of finetune (batch size 64) on a one-experience tiny stream, and the stream."""
    scen = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}
    stream = create_scenario("synthetic", **{**scen, "n_experiences": 1})
    return -(-len(stream[0].train) // 64), stream  # finetune's batch size 64


@pytest.mark.parametrize("delta,every,steps", [(None, 2, None), (100.0, 2, 2), (100.0, 1, 1), (100.0, 50, "epoch")])
def test_plateau_every_decides_inside_an_epoch(delta, every, steps):
    """``plateau_every``: the decision comes after every ``every`` steps, on each window's mean loss, so a loop can end
    inside its first epoch; a window as long as the epoch decides at its end (the per-epoch rule); without
    ``plateau_delta`` it never ends early."""
    per_epoch, stream = _steps_per_epoch()
    assert per_epoch > 2  # room to end inside the epoch
    rec = Epochs()
    with one_thread():
        agent = Agent("vit_tiny_test", "finetune", callbacks=[rec], device="cpu", progress=False, journal=False,
                      strategy_params={"epochs": 3, "plateau_delta": delta, "plateau_every": every, "lr": 1e-2})
        agent.learn(stream[0])
    if steps is None:
        assert rec.steps == 3 * per_epoch and rec.events == []
    elif steps == "epoch":
        assert rec.steps == per_epoch and rec.epochs == [0] and rec.events[0]["windows"] == 1
    else:  # every loss is below 100: the first window to close ends the loop, inside epoch 0
        assert rec.steps == steps and rec.epochs == [0]
        assert rec.events == [{"loop": 0, "epochs": 1, "of": 3, "loss": pytest.approx(rec.events[0]["loss"]),
                               "delta": delta, "patience": 1, "every": every, "windows": 1}]


def test_metrics_record_phases_that_add_up_and_the_report_shows_them(tmp_path):
    with one_thread():
        run(tiny_config(tmp_path, "sema", epochs=2, batch_size=32, descriptor_epochs=2))
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    walls, cpus = metrics["phase_time_s"], metrics["phase_cpu_s"]
    assert len(walls) == len(cpus) == 3
    for wall, cpu, total in zip(walls, cpus, metrics["wall_time_per_experience_s"], strict=True):
        assert sum(wall.values()) == pytest.approx(total, abs=0.01)
        assert {"cache_fill", "evaluation", "head_update", "descriptors", "other"} <= wall.keys()
        assert any(k.startswith("train: layer") for k in wall)
        assert wall.keys() == cpu.keys()
    assert "scan" in walls[1]  # later experiences test the layers for a shift
    assert metrics["cpu_time_s"] > 0
    write_report([out], out / "report.html")
    page = (out / "report.html").read_text()
    assert 'id="chart-phases-0"' in page and 'id="table-phases-0"' in page and "descriptors" in page


def test_kept_frozen_embeddings_give_the_scores_computed_without_them():
    """Frozen embeddings of a cached data set are computed once, kept, and give the scores computed without them;
    a strategy that never reads them (sema's defaults) does not compute them."""
    scen = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}
    stream = create_scenario("synthetic", **{**scen, "n_experiences": 2})
    with one_thread():
        frozen_routing = {"route_by": "head", "head_features": "concat"}  # routes and features read the frozen one
        agent = Agent("vit_tiny_test", "sema", strategy_params={"epochs": 1, "descriptor_epochs": 1, **frozen_routing},
                      device="cpu", progress=False, journal=False)
        for exp in stream:
            agent.learn(exp)
        s = agent.strategy
        s.eval()
        test = stream[0].test
        fast = torch.cat([scores for scores, _ in s.score_batches(test, 16)])
        assert s.states(test).derived  # the frozen embeddings were kept with the cached states
        with torch.no_grad():
            plain = torch.cat([s.scores(state) for state, _ in s.iterate_states(test, 16)])
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    one_pass = Agent("vit_tiny_test", "sema", strategy_params={"epochs": 1, "descriptor_epochs": 1}, device="cpu",
                     progress=False, journal=False)
    for exp in stream:
        one_pass.learn(exp)
    assert not one_pass.strategy.uses_frozen and "pretrained" not in one_pass.strategy.states(stream[0].test).derived
