"""The agent's memory and journal: task summaries, prototypes, nearest past experience, save/load, events."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cl.agent import Agent
from cl.data import ArrayDataset
from cl.errors import ConfigError
from cl.experience import Experience
from cl.memory import ExperienceMemory
from cl.registry import STRATEGIES, register_strategy
from cl.run import run
from scenarios import create_scenario
from strategies.finetune import Finetune
from tests.helpers import TINY_SCENARIO, one_thread, tiny_config

SCEN = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}


def test_run_journals_each_experience_into_run_memory(tmp_path):
    with one_thread():
        m = run({**tiny_config(tmp_path, "simplecil"), "loggers": []})
    mem = ExperienceMemory.load(tmp_path / "run" / "memory")
    assert mem.counts() == {"task": 3, "prototype": 6}
    tasks = sorted(mem.entries("task").metadata, key=lambda t: t["experience"])
    assert [t["accuracy_seen"] for t in tasks] == pytest.approx(m["accuracy_seen"])
    assert tasks[2]["accuracy"] == {str(i): pytest.approx(a) for i, a in enumerate(m["accuracy_matrix"][2])}
    assert [t["samples"] for t in tasks] == [2 * SCEN["train_per_class"]] * 3
    protos = mem.entries("prototype")
    assert sorted(p["class"] for p in protos.metadata) == list(range(6))
    assert np.allclose(np.linalg.norm(protos.vectors, axis=1), 1, atol=1e-5)
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    journal = [e for e in events if e["kind"] == "journal"]
    assert [e["experience"] for e in journal] == [0, 1, 2] and journal[1]["classes"] == tasks[1]["classes"]
    kinds = [e["kind"] for e in events if e["experience"] == 1]
    assert kinds.index("eval") < kinds.index("journal") < kinds.index("experience_end")


def test_nearest_past_experience_of_a_repeated_task_is_itself():
    """Experience 2 repeats experience 0's data (a copy): the journal finds 0, though finetune trained since."""
    stream = create_scenario("synthetic", **SCEN)
    e0, e1 = stream[0], stream[1]
    copy = ArrayDataset(e0.train.inputs.clone(), e0.train.targets.clone())
    e2 = Experience(2, copy, e0.test, list(e0.classes))
    agent = Agent("vit_tiny_test", "finetune", strategy_params={"epochs": 2, "lr": 3e-3}, device="cpu",
                  progress=False)
    with one_thread():
        agent.learn(e0)
        agent.learn(e1)
        best = agent.journal.nearest_experience(e2, k=2)
        assert [b.experience for b in best] == [0, 1] and best[0].score == pytest.approx(1.0, abs=1e-5)
        assert best[0].summary["classes"] == e0.classes
        z, _ = agent.strategy.memory_embeddings(e1.test)
        assert agent.journal.nearest_experience(z)[0].experience == 1  # embeddings, averaged
        assert agent.journal.nearest_experience(e1.test.inputs[:8])[0].experience == 1  # raw images
        with pytest.raises(ConfigError, match="embeddings"):
            agent.journal.nearest_experience(np.zeros(3))


def test_memory_embedding_stays_pretrained_while_finetune_trains():
    stream = create_scenario("synthetic", **SCEN)
    agent = Agent("vit_tiny_test", "finetune", strategy_params={"epochs": 2, "lr": 1e-2}, device="cpu",
                  progress=False)
    strat, x = agent.strategy, stream[0].test
    with one_thread():
        before, _ = strat.memory_embeddings(x)
        agent.learn(stream[0])
    with one_thread(), torch.no_grad():
        after, _ = strat.memory_embeddings(x)
        state = strat.backbone.forward_until(strat.backbone.prepare(x.inputs[:4], "cpu"), strat.frozen_depth)
        trained = torch.nn.functional.normalize(strat.features(state), dim=1)
        strat.memory_embedding(state)
        again = torch.nn.functional.normalize(strat.features(state), dim=1)
    assert torch.allclose(before, after, atol=1e-5)  # the memory's space did not move ...
    assert not torch.allclose(trained, after[:4], atol=1e-2)  # ... though the trained features did
    assert torch.equal(trained, again)  # and embed put the trained weights back


class Announcing(Finetune):
    """A finetune that reports pool decisions and routes, as an expanding strategy would."""

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.emit("expansion", layer=3, adapter=f"e{exp.id}", adapters=exp.id + 1)
        self.emit("reuse", layer=2, adapter=None, adapters=1)
        self.emit("route", usage={"e0": 3.0, f"e{exp.id}": 1.0})


def test_journal_keeps_adapters_and_routing_from_events():
    if "announcing_test" not in STRATEGIES:
        register_strategy("announcing_test")(Announcing)
    stream = create_scenario("synthetic", **SCEN)
    agent = Agent("vit_tiny_test", "announcing_test", strategy_params={"epochs": 1}, device="cpu", progress=False)
    with one_thread():
        agent.learn(stream[0])
        agent.learn(stream[1])
    first, second = agent.journal.summaries()
    assert second["adapters"] == {"created": [{"layer": 3, "adapter": "e1"}], "reused": [{"layer": 2}]}
    assert first["routing"]["usage"] == {"e0": 1.0} and second["routing"]["usage"] == {"e0": 0.75, "e1": 0.25}


def test_agent_save_load_keeps_the_memory(tmp_path):
    stream = create_scenario("synthetic", **SCEN)
    agent = Agent("vit_tiny_test", "replay", strategy_params={"epochs": 1, "budget": 12}, device="cpu",
                  progress=False)
    with one_thread():
        for exp in stream:
            agent.learn(exp)
        agent.save(tmp_path / "agent")
        loaded = Agent.load(tmp_path / "agent", device="cpu", progress=False)
        x = stream[2].test.inputs[:16]
        assert torch.equal(loaded.predict(x), agent.predict(x))
    assert loaded.memory.counts() == agent.memory.counts() == {"exemplar": 12, "prototype": 6, "task": 3}
    assert torch.equal(loaded.strategy.exemplars.inputs, agent.strategy.exemplars.inputs)
    assert loaded.journal.nearest_experience(stream[1])[0].experience == 1
    assert agent.memory.path is None  # saving a copy did not move the live memory
