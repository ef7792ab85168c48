"""The experience memory has one owner (the agent), one config section (``memory:``: index, metric, budget,
path) and one way in for strategies (``strategy.memory``, the agent's ``ctx.memory``)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from cl.agent import Agent
from cl.backbones import create_backbone
from cl.config import build_config, resolve
from cl.errors import ConfigError, DataError
from cl.memory import ExperienceMemory
from cl.registry import SCENARIOS, STRATEGIES
from cl.run import run
from tests.helpers import TINY_SCENARIO, interrupted_and_resumed, one_thread, tiny_config

STREAM = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}


def test_the_memory_section_builds_the_agents_memory_and_names_its_folder(tmp_path):
    cfg = {**tiny_config(tmp_path / "a", "simplecil"), "memory": {"metric": "l2", "index": "flat", "path": "mem"}}
    with one_thread():
        resumed = interrupted_and_resumed(cfg)
        straight = run({**cfg, "out": str(tmp_path / "b" / "run")})
    out = tmp_path / "a" / "run"
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert not (out / "memory").exists() and ExperienceMemory.load(out / "mem").metric == "l2"
    assert ExperienceMemory.load(out / "mem").counts() == {"prototype": 6, "task": 3}
    written = yaml.safe_load((out / "config.yaml").read_text())["memory"]
    assert written == {"index": "flat", "metric": "l2", "budget": None, "path": "mem"}
    assert resolve(build_config({})).memory.model_dump() == {"index": "auto", "metric": "ip", "budget": None,
                                                            "path": "memory"}


@pytest.mark.parametrize(("memory", "says"), [
    ({"metric": "cosine"}, r"memory.metric"), ({"index": "lsh"}, r"memory.index"), ({"budget": -1}, r"memory.budget"),
    ({"path": "../elsewhere"}, r"inside the run directory"), ({"path": "/tmp/x"}, r"inside the run directory"),
    ({"path": "checkpoints"}, r"belongs to the run directory"), ({"size": 3}, r"unknown key 'memory.size'"),
])
def test_bad_memory_settings_are_refused_before_anything_runs(tmp_path, memory, says):
    with pytest.raises(ConfigError, match=says):
        build_config({**tiny_config(tmp_path, "simplecil"), "memory": memory})
    with pytest.raises(ConfigError, match=says.replace("memory.", "")):
        Agent("vit_tiny_test", "simplecil", device="cpu", progress=False, memory=memory)


def test_a_budget_refuses_entries_past_it():
    mem = ExperienceMemory(4, budget=3)
    mem.add(np.eye(4, dtype=np.float32)[:2], {"kind": "task"})
    with pytest.raises(DataError, match=r"holds 2 entries \(task: 2\) of its budget of 3: 2 more do not fit"):
        mem.add(np.eye(4, dtype=np.float32)[2:], {"kind": "prototype"})
    assert len(mem) == 2  # nothing of the refused add went in
    stream = SCENARIOS.create("synthetic", **STREAM)
    agent = Agent("vit_tiny_test", "simplecil", device="cpu", progress=False, memory={"budget": 4})
    with one_thread():
        agent.learn(stream[0])  # the journal writes a task and 2 prototypes: 3 entries
        with pytest.raises(DataError, match=r"raise memory\.budget"):
            agent.learn(stream[1])


def test_the_agent_lends_its_one_memory_and_a_strategy_alone_has_one_of_its_own():
    stream = SCENARIOS.create("synthetic", **STREAM)
    params = {"epochs": 1, "budget": 6}
    with one_thread():
        agent = Agent("vit_tiny_test", "sema_replay", strategy_params=params, device="cpu", progress=False)
        assert agent.strategy.memory is agent.memory is agent.ctx.memory
        agent.learn(stream[0])
        assert agent.memory.counts()["exemplar"] == 6  # replay wrote into the agent's memory
        keys = Agent("vit_tiny_test", "key_retrieval", strategy_params={"epochs": 1}, device="cpu", progress=False)
        keys.learn(stream[0])
        assert keys.strategy.router.memory is keys.memory and keys.memory.counts()["adapter_key"] == 2
        other = ExperienceMemory(keys.backbone.embed_dim, budget=None)
        keys.use_memory(other)  # a loaded memory replaces it: the strategy and its router follow
        assert keys.strategy.memory is other and keys.strategy.router.memory is other
        assert other.counts()["adapter_key"] == 2  # the router refilled it from its state

        alone = STRATEGIES.create("key_retrieval", create_backbone("vit_tiny_test"), epochs=0)
        alone.before_experience(stream[1])  # no agent: the strategy made its own, and its router keeps keys there
        assert alone.memory is alone.ctx.memory and alone.router.memory is alone.memory
