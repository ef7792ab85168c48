"""docs/writing-a-strategy.md, "A strategy that does not train": its code is examples/statistics_strategy.py, shown
whole; the strategy hides the training parameters, and its growing per-class state saves, loads and resumes with
no override."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from cl.agent import Agent
from cl.cli import main
from cl.errors import ConfigError
from cl.plugins import import_plugins
from cl.registry import SCENARIOS, STRATEGIES
from cl.run import run
from tests.helpers import TINY_SCENARIO, interrupted_and_resumed, one_thread, tiny_config

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "writing-a-strategy.md").read_text()
EXAMPLE = (ROOT / "examples" / "statistics_strategy.py").read_text()
FILE = "examples/statistics_strategy.py"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    import_plugins([FILE])


def test_the_guide_shows_the_example_whole():
    assert EXAMPLE[EXAMPLE.index("from __future__") :] in GUIDE


def test_it_hides_the_training_parameters():
    fields = STRATEGIES.params_model("class_means").model_fields
    assert set(fields) == {"batch_size", "cache_prefix"}
    for key in ("epochs", "lr", "optimizer", "weight_decay"):
        with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
            STRATEGIES.validate("class_means", {key: 1})


def test_its_growing_state_saves_loads_and_resumes(tmp_path):
    stream = SCENARIOS.create("synthetic", **{k: v for k, v in TINY_SCENARIO.items() if k != "name"})
    with one_thread():
        agent = Agent("vit_tiny_test", "class_means", device="cpu", progress=False)
        for exp in stream.experiences[:2]:
            agent.learn(exp)
        assert agent.strategy.head.counts.shape == (6,)  # grown to the largest class id seen
        assert agent.evaluate(stream.experiences[:2])["accuracy_seen"] > 0.8
        agent.save(tmp_path / "agent")
        loaded = Agent.load(tmp_path / "agent", device="cpu", progress=False)
    assert torch.equal(loaded.strategy.head.sums, agent.strategy.head.sums)
    x = stream[1].test.inputs[:16]
    assert torch.equal(loaded.predict(x), agent.predict(x))

    smoke = next(line for line in GUIDE.splitlines() if line.startswith("cl run") and "class_means" in line)
    args = shlex.split(smoke)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "smoke")
    assert main([*args, "--set", "progress=false", "--set", "threads=1", "--no-report"]) == 0
    assert json.loads((tmp_path / "smoke" / "metrics.json").read_text())["params_trainable"] == 0

    cfg = {**tiny_config(tmp_path / "a", "class_means"), "imports": [FILE]}
    with one_thread():
        resumed = interrupted_and_resumed(cfg)  # stopped before experience 2, resumed from its checkpoint
        straight = run({**cfg, "out": str(tmp_path / "b" / "run")})
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
