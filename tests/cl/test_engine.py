"""Engine: hook order, run-directory contract, NaN stop, agent save/load (kills and resume: test_faults.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cl.agent import Agent
from cl.callbacks.base import Callback
from cl.checkpoint import Checkpointer, load_checkpoint, load_memory
from cl.config import build_config
from cl.errors import ConfigError
from cl.run import run
from scenarios import create_scenario
from tests.helpers import TINY_SCENARIO, one_thread, tiny_config


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name):
        if name.startswith(("before_", "after_", "on_")):
            calls = object.__getattribute__(self, "calls")
            return lambda *a, **k: calls.append(name)
        return object.__getattribute__(self, name)


def test_hooks_fire_in_order(tmp_path):
    rec = Recorder()
    scen = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}
    stream = create_scenario("synthetic", **{**scen, "n_experiences": 2})
    agent = Agent("vit_tiny_test", "finetune", strategy_params={"epochs": 2, "batch_size": 64},
                  callbacks=[rec], device="cpu", progress=False)
    agent.learn(stream[0])
    calls = [c for c in rec.calls if c not in ("before_iteration", "after_iteration")]
    assert calls == [
        "before_experience", "before_epoch", "after_epoch", "before_epoch", "after_epoch",
        "after_training", "before_eval", "after_eval", "on_event", "after_experience",
    ]  # on_event: the journal's entry, written once the evaluation is known
    its = rec.calls[rec.calls.index("before_epoch") + 1 : rec.calls.index("after_epoch")]
    assert its[:2] == ["before_iteration", "after_iteration"] and len(its) == 2 * 2  # 72 items / 64


def test_run_directory_contract(tmp_path):
    metrics = run(tiny_config(tmp_path, "finetune", epochs=2))
    out = tmp_path / "run"
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_matrix", "avg_incremental_accuracy", "final_accuracy", "avg_forgetting", "bwt",
                "params_trainable", "params_added_per_experience", "wall_time_s", "peak_rss_mb"):
        assert key in on_disk, key
    assert [len(r) for r in on_disk["accuracy_matrix"]] == [1, 2, 3]
    assert all(0.0 <= a <= 1.0 for r in on_disk["accuracy_matrix"] for a in r)
    assert on_disk["final_accuracy"] == pytest.approx(metrics["final_accuracy"])
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert all({"t", "experience", "kind"} <= e.keys() for e in events)
    assert [e["kind"] for e in events].count("experience_end") == 3
    # config.yaml is fully resolved: strategy defaults are filled in and it re-validates
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["strategy"]["lr"] == 1e-3 and cfg["strategy"]["epochs"] == 2
    build_config(cfg)


def test_scenario_seed_follows_the_run_seed_unless_set():
    from cl.config import resolve

    assert resolve(build_config({"scenario": {"name": "split_digits"}}, seed=3)).scenario.params["seed"] == 3
    explicit = build_config({"scenario": {"name": "split_digits", "seed": 1}}, seed=3)
    assert resolve(explicit).scenario.params["seed"] == 1


def test_rerun_from_config_yaml_is_identical(tmp_path):
    first = run(tiny_config(tmp_path, "finetune"))
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    cfg["out"] = str(tmp_path / "again")
    second = run(cfg)
    assert second["accuracy_matrix"] == first["accuracy_matrix"]


def test_same_dir_different_config_is_refused(tmp_path):
    run(tiny_config(tmp_path, "simplecil"))
    with pytest.raises(ConfigError, match="different config"):
        run(tiny_config(tmp_path, "finetune"))


def test_agent_save_load_predicts_the_same(tmp_path):
    scen = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}
    stream = create_scenario("synthetic", **scen)
    agent = Agent("vit_tiny_test", "finetune", device="cpu", progress=False)
    for exp in stream:
        agent.learn(exp)
    x = stream[0].test.inputs[:16]
    agent.save(tmp_path / "agent")
    loaded = Agent.load(tmp_path / "agent", device="cpu", progress=False)
    assert torch.equal(loaded.predict(x), agent.predict(x))
    assert agent.evaluate(stream.experiences)["accuracy"] == loaded.evaluate(stream.experiences)["accuracy"]


def test_checkpoint_leaves_out_untouched_pretrained_weights(tmp_path):
    run(tiny_config(tmp_path, "simplecil"))
    payload = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert not any(k.startswith("backbone.") for k in payload["strategy"])
    assert "head.sums" in payload["strategy"]


class Diverge(Callback):
    """Fills the trainable weights with NaN before batch ``batch`` of epoch ``epoch`` of experience ``exp_id``."""

    def __init__(self, exp_id: int, epoch: int, batch: int) -> None:
        self.at, self.now = (exp_id, epoch), None
        self.batch = batch
        self.checkpoints: dict[str, bytes] = {}

    def before_experience(self, agent, exp) -> None:
        if exp.id == self.at[0]:  # what the last good checkpoint looks like
            ckpts = agent.callbacks.find(Checkpointer).directory
            self.checkpoints = {p.name: p.read_bytes() for p in ckpts.iterdir()}

    def before_epoch(self, agent, exp, epoch) -> None:
        self.now = (exp.id, epoch)

    def before_iteration(self, agent, iteration) -> None:
        if self.now == self.at and iteration == self.batch:
            with torch.no_grad():
                for p in agent.strategy.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


def test_nan_loss_stops_with_a_hint_and_keeps_the_last_good_checkpoint(tmp_path):
    from cl.errors import TrainingError

    cfg = tiny_config(tmp_path, "finetune", epochs=2, batch_size=16)
    diverge = Diverge(1, epoch=1, batch=2)
    with one_thread(), pytest.raises(TrainingError, match=r"at experience 1, epoch 1, batch 2: lower the lear") as err:
        run(cfg, extra_callbacks=[diverge])
    assert "last checkpoint (the previous experience) is kept" in str(err.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert diverge.checkpoints and {p.name: p.read_bytes() for p in ckpts.iterdir()} == diverge.checkpoints
    payload = load_checkpoint(ckpts)
    assert payload["experiences_done"] == [0]
    assert len(load_memory(tmp_path / "run" / "memory", payload["memory"])) == payload["memory"]["entries"]
    with one_thread():
        assert run(build_config(cfg), resume=True)["experiences_done"] == 3  # resumes from it
