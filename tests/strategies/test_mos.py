"""MOS: merges once per task (never in a forward), counts its backbone passes right, routes each input through
its own task's adapters, runs end to end and resumes. Whether it learns from its data: test_learning_contract.py."""

from __future__ import annotations

import pytest
import torch

import strategies.mos  # noqa: F401  (registration)
from cl.agent import Agent
from cl.callbacks.base import Callback
from cl.errors import ConfigError
from cl.routing import OFF
from cl.run import run
from scenarios import create_scenario
from tests.helpers import interrupted_and_resumed, one_thread, tiny_config

FAST = {"epochs": 1, "batch_size": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a busy machine: one thread is faster (tests/helpers.py)."""
    with one_thread():
        yield


class Events(Callback):
    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []

    def on_event(self, agent, kind, data) -> None:
        self.items.append((kind, data))


def adapter_weights(strategy) -> dict[str, torch.Tensor]:
    pools = strategy.pools.items()
    return {f"{layer}.{k}": v.clone() for layer, p in pools for k, v in p.adapters.state_dict().items()}


def test_merges_once_per_task_and_never_in_a_forward():
    stream = create_scenario("synthetic", n_classes=6, n_experiences=3, train_per_class=16, test_per_class=8)
    events = Events()
    m = 0.3
    agent = Agent("vit_tiny_test", "mos", strategy_params={**FAST, "merge_momentum": m}, callbacks=[events],
                  device="cpu", progress=False)
    s = agent.strategy
    trained: dict[int, dict[str, torch.Tensor]] = {}
    fit = s.fit

    def fit_and_snapshot(exp):  # the adapters as trained, before the end-of-task merge
        fit(exp)
        trained[exp.id] = adapter_weights(s)

    s.fit = fit_and_snapshot
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for exp in stream:
        agent.learn(exp)  # learn evaluates every seen test set: forwards through every adapter
        merged[exp.id] = adapter_weights(s)
    assert int(s.merges) == 2 and [d["experience"] for k, d in events.items if k == "merge"] == [1, 2]
    for t in (1, 2):  # e_t = (1 - m) trained + m mean(earlier merged), computed once at the end of task t
        for key, w in merged[t].items():
            layer, name, rest = key.split(".", 2)
            if name != f"e{t}":
                continue
            earlier = torch.stack([merged[t - 1][f"{layer}.e{j}.{rest}"] for j in range(t)]).mean(0)
            assert torch.allclose(w, (1 - m) * trained[t][key] + m * earlier, atol=1e-6)
            assert not torch.allclose(w, trained[t][key])  # the merge did change it
    before = adapter_weights(s)
    agent.evaluate(stream.experiences)
    agent.predict(stream[0].test.inputs[:8])
    assert all(torch.equal(before[k], v) for k, v in adapter_weights(s).items())  # forwards merge nothing
    assert int(s.merges) == 2


def test_backbone_passes_per_image_counts_every_suffix_pass():
    """The metric equals the block executions seen by hooks, refinement included (forced by a scrambled head)."""
    stream = create_scenario("synthetic", n_classes=6, n_experiences=3, train_per_class=16, test_per_class=8)
    agent = Agent("vit_tiny_test", "mos", strategy_params={**FAST, "refine_steps": 2}, device="cpu", progress=False)
    for exp in stream:
        agent.learn(exp)
    s = agent.strategy
    with torch.no_grad():  # class statistics shifted by one class: adapted predictions point to other tasks
        s.head.sums.copy_(s.head.sums.roll(1, 0))
        s.head.counts.copy_(s.head.counts.roll(1, 0))
        s.head.invalidate()
    blocks = s.backbone.blocks
    counted = [0] * len(blocks)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: counted.__setitem__(i, counted[i] + a[0].shape[0]))
             for i, b in enumerate(blocks)]
    s.passes[-1] = [0, 0]
    results = agent.evaluate(stream.experiences)
    for h in hooks:
        h.remove()
    images = sum(results["count"])
    d, n = s.frozen_depth, len(blocks)
    assert counted[:d] == [0] * d  # the prefix came from the cache: computed once per image, before
    assert len(set(counted[d:])) == 1  # every suffix block saw the same images
    suffix = counted[d] / images
    assert 2.0 < suffix <= 4.0  # frozen + first adapter + (some) refinements, at most refine_steps more
    metrics = s.extra_metrics()
    assert metrics["suffix_passes_per_image"] == pytest.approx(suffix)
    assert metrics["backbone_passes_per_image"] == pytest.approx((d + suffix * (n - d)) / n)


def test_runs_end_to_end_and_resumes_identically(tmp_path):
    full = run(tiny_config(tmp_path / "a", "mos", **FAST))
    assert full["merges"] == 2 and full["adapters_per_layer"] == {"1": 3, "2": 3, "3": 3}
    assert full["backbone_passes_per_image"] < 2  # the public code: T + 1 = 4
    cfg = tiny_config(tmp_path / "b", "mos", **FAST)

    resumed = interrupted_and_resumed(cfg)
    for key in ("accuracy_matrix", "merges", "adapters_per_layer", "backbone_passes_per_image_per_experience"):
        assert resumed[key] == full[key]


def test_each_input_runs_through_its_own_task_adapters():
    """In a batch mixing tasks, every row gets the features of its own task's adapters, as if it ran alone; the
    adapters are trained (they move the features away from the frozen ones, each task's differently)."""
    stream = create_scenario("synthetic", n_classes=6, n_experiences=3, train_per_class=16, test_per_class=4)
    agent = Agent("vit_tiny_test", "mos", strategy_params={**FAST, "lr": 1e-2}, device="cpu", progress=False)
    for exp in stream:
        agent.learn(exp)
    s = agent.strategy
    x = torch.cat([e.test.inputs[:3] for e in stream])
    tasks = torch.arange(3).repeat_interleave(3).roll(4)  # rows of every task, most not through their own
    with torch.no_grad():
        state = s.backbone.forward_until(s.backbone.prepare(x, "cpu"), s.frozen_depth)
        mixed = s.embedding(state, tasks)
        alone = torch.cat([s.embedding(state[i : i + 1], tasks[i : i + 1]) for i in range(len(x))])
        by_task = [s.embedding(state, torch.full_like(tasks, t)) for t in range(3)]
        frozen = s.embedding(state, OFF)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    for t in range(3):
        torch.testing.assert_close(mixed[tasks == t], by_task[t][tasks == t], rtol=1e-5, atol=1e-5)
        assert ((by_task[t] - frozen).norm(dim=1) > 1e-3 * frozen.norm(dim=1)).all()
    assert ((by_task[0] - by_task[1]).norm(dim=1) > 1e-3 * frozen.norm(dim=1)).all()


def test_needs_classes_that_belong_to_one_task():
    domain = create_scenario("rotated_digits", angles=[0, 90], train_per_class=4, test_per_class=2)
    agent = Agent("vit_tiny_test", "mos", strategy_params=FAST, device="cpu", progress=False)
    agent.learn(domain[0])
    with pytest.raises(ConfigError, match="key_retrieval"):
        agent.learn(domain[1])
    with pytest.raises(ConfigError, match="merge_momentum"):
        Agent("vit_tiny_test", "mos", strategy_params={"merge_momentum": 1.5}, device="cpu")
