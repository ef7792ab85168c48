"""Replay: herding, class-balanced budget in the memory, less forgetting than finetune, resume, composition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cl.agent import Agent
from cl.checkpoint import load_memory
from cl.config import build_config
from cl.errors import CheckpointError, ConfigError
from cl.memory import ExperienceMemory
from cl.memory.exemplars import class_quotas, herding
from cl.run import run
from scenarios import create_scenario
from tests.helpers import TINY_SCENARIO, StopBefore, one_thread, tiny_config

# enough steps per experience (32 items per class, batches of 16) for rehearsal to matter on the tiny ViT
REPLAY = {"epochs": 4, "lr": 3e-3, "batch_size": 16}
SCENARIO = {**TINY_SCENARIO, "train_per_class": 32}


def config(tmp_path, strategy: str, **params):
    cfg = tiny_config(tmp_path, strategy, **params)
    cfg["scenario"], cfg["loggers"] = dict(SCENARIO), []
    return cfg


def test_herding_picks_the_documented_order():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])  # mean 3.2
    assert herding(x, 5).tolist() == [3, 2, 1, 4, 0]  # nearest-to-mean would end 0, 4
    assert herding(x, 2).tolist() == [3, 2]  # a prefix for a smaller budget
    pts = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    naive, total = [], torch.zeros(8)  # iCaRL's loop as written in the paper
    for k in range(1, 21):
        dist = ((pts.mean(0) - (total + pts) / k) ** 2).sum(1)
        dist[naive] = float("inf")
        naive.append(int(dist.argmin()))
        total += pts[naive[-1]]
    assert herding(pts, 20).tolist() == naive
    assert len(herding(pts, 100)) == 60


def test_class_quotas_split_the_budget_in_arrival_order():
    assert class_quotas([4, 6], 2000) == {4: 1000, 6: 1000}
    q = class_quotas([4, 6, 2, 7, 3, 5], 2000)
    assert sum(q.values()) == 2000 and q[4] == q[6] == 334 and q[3] == q[5] == 333


def test_buffer_stays_within_budget_class_balanced_and_in_the_memory():
    stream = create_scenario("synthetic", **{k: v for k, v in SCENARIO.items() if k != "name"})
    agent = Agent("vit_tiny_test", "replay", strategy_params={**REPLAY, "epochs": 1, "budget": 20}, device="cpu",
                  progress=False)
    store, mem = agent.strategy.exemplars, agent.memory
    before: dict[int, set[tuple[int, int]]] = {}
    with one_thread():
        for exp in stream:
            agent.learn(exp)
            counts = np.array([int((store.targets == c).sum()) for c in agent.strategy.seen_classes])
            assert len(store) <= 20 and counts.max() - counts.min() <= 1 and counts.min() >= 20 // len(counts)
            entries = mem.entries("exemplar")
            assert sorted(entries.ids.tolist()) == sorted(store.ids.tolist())  # removed exemplars left the memory
            by_id = dict(zip(store.ids.tolist(), store.targets.tolist(), strict=True))
            assert all(by_id[i] == m["class"] for i, m in zip(entries.ids.tolist(), entries.metadata, strict=True))
            now: dict[int, set[tuple[int, int]]] = {}
            for m in entries.metadata:
                now.setdefault(m["class"], set()).add((m["experience"], m["index"]))
            assert all(now[c] < before[c] for c in before)  # a shrinking class keeps a subset (herding's prefix)
            before = now
    assert [len(before[c]) for c in stream.classes] == [4, 4, 3, 3, 3, 3]  # 20 over 6 classes, first ones first
    x = stream[0].train.inputs[[m["index"] for m in entries.metadata[:3]]]
    assert torch.equal(store.inputs[:3], x)  # the buffer stores the raw inputs


def test_replay_forgets_much_less_than_finetune(tmp_path):
    with one_thread():
        ft = run(config(tmp_path / "ft", "finetune", **REPLAY))
        rp = run(config(tmp_path / "rp", "replay", **REPLAY, budget=48))
    assert ft["avg_forgetting"] > 0.8
    assert rp["avg_forgetting"] < ft["avg_forgetting"] - 0.5
    assert rp["final_accuracy"] > ft["final_accuracy"] + 0.3
    assert rp["exemplars"] == 48 and rp["exemplars_per_class"] == {str(c): 8 for c in range(6)}


def _memory(path) -> tuple[list, np.ndarray, list]:
    e = ExperienceMemory.load(path).entries()
    return e.ids.tolist(), e.vectors, e.metadata


def test_memory_saved_with_checkpoints_and_resume_matches(tmp_path):
    params = {**REPLAY, "budget": 30, "selection": "reservoir"}
    with one_thread():
        ref = run(config(tmp_path / "ref", "replay", **params))
        cfg = config(tmp_path, "replay", **params)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, extra_callbacks=[StopBefore(2)])
        ids, _, meta = _memory(tmp_path / "run" / "memory")  # saved after experience 1
        assert {m["experience"] for m in meta if m["kind"] == "task"} == {0, 1}
        resumed = run(build_config(cfg), resume=True)
    assert resumed["accuracy_matrix"] == ref["accuracy_matrix"]
    assert resumed["avg_forgetting"] == ref["avg_forgetting"]
    ref_ids, ref_vecs, ref_meta = _memory(tmp_path / "ref" / "run" / "memory")
    ids, vecs, meta = _memory(tmp_path / "run" / "memory")
    assert ids == ref_ids and meta == ref_meta and np.array_equal(vecs, ref_vecs)
    assert sum(m["kind"] == "exemplar" for m in meta) == 30


def test_resume_loads_the_memory_generation_its_checkpoint_names(tmp_path):
    cfg = config(tmp_path, "replay", **{**REPLAY, "epochs": 1}, budget=12)
    memory = tmp_path / "run" / "memory"
    with one_thread():
        with pytest.raises(KeyboardInterrupt):
            run(cfg, extra_callbacks=[StopBefore(2)])
        mem = ExperienceMemory.load(memory)
        mem.add(np.ones((1, mem.dim), np.float32), {"kind": "task", "experience": 9})
        mem.save()  # as if the run had stopped after saving the memory of experience 2, before its checkpoint
        run(build_config(cfg), resume=True)  # switches back to the generation the checkpoint names
    assert ExperienceMemory.load(memory).count(experience=9) == 0
    with pytest.raises(CheckpointError, match="has no generation 'gen-000099'"):
        load_memory(memory, {"generation": "gen-000099", "entries": 1})


def test_replay_composes_with_another_strategy_through_the_config(tmp_path):
    """sema_replay (SEMA + ReplayMixin): SEMA's masked loss covers the replayed classes; the buffer fills."""
    params = {"budget": 12, "epochs": 1, "batch_size": 32, "descriptor_epochs": 2, "head": "linear",
              "head_features": "mixture"}
    with one_thread():
        m = run(config(tmp_path, "sema_replay", **params))
    assert m["exemplars"] == 12 and len(m["exemplars_per_class"]) == 6
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "epoch" and e["experience"] > 0 for e in events)  # trained with a non-empty buffer
    assert all(e["adapters"]["created"] for e in events if e["kind"] == "journal")  # the journal saw expansions
    assert m["adapters_per_layer"]  # SEMA's own metrics are still there
    with pytest.raises(ConfigError, match="selection"):
        run(config(tmp_path / "bad", "replay", selection="random"))
