"""Key-retrieval routing: nearest keys pick the adapter, batched search equals per-query, keys live in the memory;
the key_retrieval strategy runs end to end and resumes to identical metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import strategies.key_retrieval  # noqa: F401  (registration)
from cl.errors import ConfigError
from cl.memory import ExperienceMemory
from cl.routing import create_router
from cl.routing.keys import KeyRouter
from cl.run import run
from tests.helpers import interrupted_and_resumed, one_thread, tiny_config

DIM = 16
FAST = {"epochs": 1, "batch_size": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a busy machine: one thread is faster (tests/helpers.py)."""
    with one_thread():
        yield


def clustered_router(metric: str, **kw) -> tuple[KeyRouter, torch.Tensor]:
    """A router with 3 experts, each keyed on 2 classes of well separated Gaussian clusters; returns the centres."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(6, DIM, generator=gen) * 4
    router = KeyRouter(DIM, metric=metric, **kw)
    for e in range(3):
        router.add_expert(f"e{e}")
        y = torch.tensor([2 * e, 2 * e + 1]).repeat_interleave(30)
        x = centres[y] + torch.randn(len(y), DIM, generator=gen)
        router.add_keys(x, y, expert=e, experience=e)
    return router, centres


@pytest.mark.parametrize("metric", ["cosine", "whitened", "mahalanobis"])
def test_a_query_near_a_key_routes_to_its_adapter(metric):
    router, centres = clustered_router(metric)
    queries = centres + 0.3 * torch.randn(centres.shape, generator=torch.Generator().manual_seed(1))
    assert router.route(queries).tolist() == [0, 0, 1, 1, 2, 2]
    w = router(queries)
    assert w.shape == (6, 3) and torch.equal(w.sum(-1), torch.ones(6))  # one-hot rows
    sim, rows = router.retrieve(queries, k=2)
    assert router.key_class[rows[:, 0]].tolist() == list(range(6))  # the nearest key is the query's own class
    assert bool((sim[:, 0] >= sim[:, 1]).all())


@pytest.mark.parametrize("mode", ["top1", "vote", "soft"])
def test_batched_search_equals_per_query(mode):
    router, _ = clustered_router("mahalanobis", mode=mode, top_k=3)
    queries = torch.randn(40, DIM, generator=torch.Generator().manual_seed(2)) * 4
    sim, rows = router.retrieve(queries)
    one = [router.retrieve(q[None]) for q in queries]
    assert torch.equal(rows, torch.cat([r for _, r in one]))
    assert torch.allclose(sim, torch.cat([s for s, _ in one]), rtol=1e-5, atol=1e-4)
    assert torch.allclose(router(queries), torch.cat([router(q[None]) for q in queries]), atol=1e-6)


def test_keys_live_in_a_shared_memory_and_reload_without_duplicates():
    mem = ExperienceMemory(DIM, metric="ip")
    mem.add(np.ones((2, DIM), np.float32), {"kind": "adapter_key", "adapter": "other"})  # someone else's keys
    router, centres = clustered_router("whitened", keys_per_class=2)
    router.attach(mem)
    assert router.route(centres).tolist() == [0, 0, 1, 1, 2, 2]  # attaching moved the keys into the memory
    entries = mem.entries("adapter_key", adapter=["e0", "e1", "e2"])
    assert len(entries) == 12  # 2 k-means keys per class
    assert sorted({(m["adapter"], m["experience"], m["class"]) for m in entries.metadata}) == \
        [(f"e{c // 2}", c // 2, c) for c in range(6)]
    again = create_router("key", DIM, keys_per_class=2)
    again.load_state_dict(router.state_dict())
    again.attach(mem)  # the same memory (as after a resume that restored it): nothing added twice
    assert torch.equal(again.route(centres), router.route(centres)) and mem.count("adapter_key") == 14
    fresh = KeyRouter(DIM, keys_per_class=2)
    fresh.load_state_dict(router.state_dict())  # no memory given: its own, filled from the state dict
    assert torch.equal(fresh.route(centres), router.route(centres)) and fresh.memory is not mem
    with pytest.warns(RuntimeWarning, match="own memory"):
        KeyRouter(DIM, metric="mahalanobis").attach(mem)  # whitened keys need an l2 memory
    with pytest.raises(ConfigError, match="metric"):
        KeyRouter(DIM, metric="dot")


def test_runs_end_to_end_emits_route_events_and_resumes_identically(tmp_path):
    full = run(tiny_config(tmp_path / "a", "key_retrieval", **FAST))
    assert full["final_accuracy"] > 0.9
    assert full["adapters_per_layer"] == {"1": 3, "2": 3, "3": 3} and full["adapter_keys"] == 6
    events = [json.loads(line) for line in (tmp_path / "a" / "run" / "events.jsonl").read_text().splitlines()]
    retrieval = [e for e in events if e["kind"] == "retrieval"]
    assert [e["experience"] for e in retrieval] == [0, 1, 1, 2, 2, 2]  # one per evaluated test set
    assert all(e["queries"] > 0 and 0 <= e["hit_rate"] <= 1 for e in retrieval)
    assert any(e["kind"] == "route" and set(e["usage"]) <= {"e0", "e1", "e2"} for e in events)

    cfg = tiny_config(tmp_path / "b", "key_retrieval", **FAST)

    resumed = interrupted_and_resumed(cfg)
    for key in ("accuracy_matrix", "adapters_per_layer", "adapter_keys", "backbone_passes_per_image"):
        assert resumed[key] == full[key]
