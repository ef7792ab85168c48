"""SEMA: expands on a shift and not on a repeat, keeps old features, resumes, cache-independent."""

from __future__ import annotations

import pytest
import torch

from cl.agent import Agent
from cl.callbacks.base import Callback
from cl.errors import ConfigError
from cl.routing import OFF
from cl.run import run
from scenarios import create_scenario
from tests.helpers import interrupted_and_resumed, tiny_config

FAST = {"epochs": 2, "descriptor_epochs": 10, "batch_size": 64}


class Events(Callback):
    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []

    def on_event(self, agent, kind, data) -> None:
        self.items.append((kind, data))


def test_expands_on_a_shift_not_on_a_repeat():
    stream = create_scenario("rotated_digits", angles=[0, 0, 90], train_per_class=40, test_per_class=10)
    events = Events()
    agent = Agent("vit_tiny_test", "sema", strategy_params=FAST, callbacks=[events], device="cpu", progress=False)
    per_exp = []
    for exp in stream:
        start = len(events.items)
        agent.learn(exp)
        per_exp.append([k for k, _ in events.items[start:] if k in ("expansion", "reuse")])
    assert per_exp[0] == ["expansion"] * 3  # first experience: an adapter in every layer
    assert per_exp[1] == ["reuse"] * 3  # the same distribution again: nothing added
    assert "expansion" in per_exp[2]  # rotated digits: the pool grows
    pools = agent.strategy.pools
    assert all(p.names[0] == "e0" and "e1" not in p.names for p in pools.values())
    z = next(d["zscores"] for k, d in events.items if k == "expansion" and d["adapter"] == "e2")
    assert all(v > 2.0 for v in z.values())


def test_old_inputs_keep_their_features_after_an_expansion():
    stream = create_scenario("rotated_digits", angles=[0, 90], train_per_class=40, test_per_class=10)
    agent = Agent("vit_tiny_test", "sema", strategy_params=FAST, device="cpu", progress=False)
    agent.learn(stream[0])
    strat = agent.strategy
    x = stream[0].test.inputs

    def feats() -> torch.Tensor:
        with torch.no_grad():
            return strat.backbone.forward_features(strat.backbone.prepare(x, "cpu"))

    before = feats()
    agent.learn(stream[1])
    assert all(len(p) == 2 for p in strat.pools.values())  # it did expand
    change = (feats() - before).norm(dim=1) / before.norm(dim=1)
    # hard descriptor routes: most old inputs keep their features exactly; the rest are inputs whose
    # nearest descriptor is now the new one (measured: 21% on this tiny random-init stream)
    assert change.median() < 1e-4
    assert (change < 0.01).float().mean() > 0.7


@pytest.mark.parametrize("route_by", ["layer", "head"])
def test_resume_rebuilds_the_expanded_pools(tmp_path, route_by):
    cfg = tiny_config(tmp_path, "adapter_per_task", route_by=route_by, **FAST)
    full = run(cfg)
    cfg2 = tiny_config(tmp_path / "b", "adapter_per_task", route_by=route_by, **FAST)

    resumed = interrupted_and_resumed(cfg2)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert full["adapters_per_layer"] == {"1": 3, "2": 3, "3": 3}
    assert resumed["adapters_per_layer"] == full["adapters_per_layer"]


def test_prefix_cache_does_not_change_results(tmp_path):
    cached = run(tiny_config(tmp_path / "a", "sema", **FAST))
    fresh = run(tiny_config(tmp_path / "b", "sema", cache_prefix=False, **FAST))
    assert fresh["accuracy_matrix"] == cached["accuracy_matrix"]
    assert fresh["adapters_per_layer"] == cached["adapters_per_layer"]


def test_concat_head_features_and_frozen_half(tmp_path):
    """``head_features=concat``: the head sees [frozen, mixture]; the frozen half ignores the adapters."""
    stream = create_scenario("synthetic", n_classes=4, n_experiences=2, train_per_class=16, test_per_class=4)
    agent = Agent("vit_tiny_test", "sema", strategy_params={**FAST, "head_features": "concat", "route_by": "head",
                                                           "taps": None}, device="cpu",
                  progress=False)
    for exp in stream:
        agent.learn(exp)
    s = agent.strategy
    x = stream[0].test.inputs
    with torch.no_grad():
        state = s.backbone.forward_until(s.backbone.prepare(x, "cpu"), s.frozen_depth)
        feats = s.features(state)
    d = s.backbone.embed_dim
    assert feats.shape == (len(x), 2 * d)
    from cl.backbones import create_backbone

    fresh = create_backbone("vit_tiny_test")
    fresh.load_state_dict({k.replace(".block.", "."): v for k, v in s.backbone.state_dict().items()
                           if ".pool." not in k})
    with torch.no_grad():
        ref = fresh.forward_features(fresh.prepare(x, "cpu"))
    assert torch.allclose(feats[:, :d], ref, atol=1e-5)


def test_task_routes_follow_the_first_layer_everywhere():
    """``route_by=task``: the first layer's best descriptor picks one experience's adapters in every layer;
    a layer that reused an older adapter for that experience uses the older one."""
    stream = create_scenario("rotated_digits", angles=[0, 90, 45], train_per_class=20, test_per_class=10)
    agent = Agent("vit_tiny_test", "adapter_per_task", strategy_params={**FAST, "route_by": "task"},
                  device="cpu", progress=False)
    for exp in stream:
        agent.learn(exp)
    s = agent.strategy
    first_layer, *later = list(s.pools)
    s.pools[later[-1]].adapters.pop("e1")  # as if the last layer had reused e0 for experience 1
    s.pools[later[-1]].descriptors.pop("e1")
    x = torch.cat([e.test.inputs for e in stream])
    with torch.no_grad():
        state = s.backbone.forward_until(s.backbone.prepare(x, "cpu"), s.frozen_depth)
        routes = s.task_routes(state)
        first = s.pools[first_layer]
        chosen = first.descriptors.zscores(first.pool_input(state)).argmin(-1)
    assert sorted(chosen.unique().tolist()) == [0, 1, 2]  # every experience is picked by some inputs
    for layer in (first_layer, *later[:-1]):
        assert torch.equal(routes[layer].argmax(-1), chosen)  # the same experience in every layer
    assert torch.equal(routes[later[-1]].argmax(-1), torch.tensor([0, 0, 1])[chosen])  # e1 -> reused e0
    assert all(torch.equal(r.sum(-1), torch.ones(len(x))) for r in routes.values())  # one-hot
    s._training_exp = 1  # while training experience 1, every layer takes experience 1's adapters
    with torch.no_grad():
        training = s.task_routes(state)
    s._training_exp = None
    assert training[later[0]] == "e1" and training[later[-1]] == "e0"  # one experience: its adapters, by name


@pytest.mark.parametrize("scenario", ["synthetic", "rotated_digits"])
def test_head_routes_by_the_experience_of_the_predicted_class(scenario):
    """``route_by=head``: an LDA head on frozen features, over (experience, class) labels, picks the experience;
    on a domain-incremental stream the same class in two experiences stays two labels."""
    if scenario == "synthetic":  # class-incremental: 6 classes, 2 per experience
        stream = create_scenario("synthetic", n_classes=6, n_experiences=3, train_per_class=16, test_per_class=8)
    else:  # domain-incremental: digits 0-9, then the same digits rotated
        stream = create_scenario("rotated_digits", angles=[0, 90], train_per_class=20, test_per_class=10)
    agent = Agent("vit_tiny_test", "adapter_per_task", strategy_params={**FAST, "route_by": "head"},
                  device="cpu", progress=False)
    for exp in stream:
        agent.learn(exp)
    s = agent.strategy
    assert s.pairs.tolist() == [[e.id, c] for e in stream for c in e.classes]
    x = torch.cat([e.test.inputs for e in stream])
    with torch.no_grad():
        state = s.backbone.forward_until(s.backbone.prepare(x, "cpu"), s.frozen_depth)
        expected = s.pairs[s.task_head(s.embedding(state, OFF)).argmax(-1), 0]
        routes = s.task_routes(state)
    assert len(expected.unique()) == len(stream)
    assert all(torch.equal(r.argmax(-1), expected) for r in routes.values())
    truth = torch.cat([torch.full((len(e.test),), e.id) for e in stream])
    assert (expected == truth).float().mean() > 0.6  # the experience is mostly found from frozen features


ONE_PASS = {"route_by": "taps", "taps": "prefix", "head_features": "adapted"}


def test_one_pass_setting_routes_by_prefix_taps_and_runs_each_block_once():
    """``route_by=taps`` + ``taps=prefix`` + ``head_features=adapted``: the task head reads the prefix's taps, so a
    prediction runs every block once (no frozen pass of the adapted blocks), and it still finds the experience."""
    stream = create_scenario("synthetic", n_classes=6, n_experiences=3, train_per_class=16, test_per_class=8)
    agent = Agent("vit_tiny_test", "adapter_per_task", strategy_params={**FAST, **ONE_PASS}, device="cpu",
                  progress=False)
    for exp in stream:
        agent.learn(exp)
    s = agent.strategy
    assert s.prefix_taps == tuple(range(s.frozen_depth)) and s.task_head.dim == s.backbone.tap_dim(s.prefix_taps)
    x = torch.cat([e.test.inputs for e in stream])
    calls = {i: 0 for i in range(s.backbone.num_blocks)}
    hooks = [s.backbone.blocks[i].register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in calls]
    try:
        predicted = s.predict(x)
    finally:
        for h in hooks:
            h.remove()
    assert set(calls.values()) == {1}, calls
    with torch.no_grad():
        state = s.prefix(s.backbone.prepare(x, "cpu"))
        found = s.pairs[s.task_head(state.taps).argmax(-1), 0]
    assert all(torch.equal(r.argmax(-1), found) for r in s.task_routes(state).values())
    truth = torch.cat([torch.full((len(e.test),), e.id) for e in stream])
    assert (found == truth).float().mean() > 0.6
    labels = torch.cat([e.test.targets for e in stream])
    assert (predicted == labels).float().mean() > 0.5


def test_route_by_taps_needs_prefix_taps_and_the_default_falls_back_without_a_prefix():
    with pytest.raises(ConfigError, match="taps='prefix'"):
        Agent("vit_tiny_test", "sema", strategy_params={"route_by": "taps", "taps": None}, device="cpu")
    with pytest.raises(ConfigError, match="start at block 0"):
        Agent("vit_tiny_test", "sema", strategy_params={"route_by": "taps", "layers": "all"}, device="cpu")
    assert Agent("vit_tiny_test", "sema", device="cpu").strategy.route_by == "taps"
    assert Agent("vit_tiny_test", "sema", strategy_params={"layers": "all"}, device="cpu").strategy.route_by == "head"


def test_route_by_needs_the_descriptor_router():
    with pytest.raises(ConfigError, match="route_by"):
        Agent("vit_tiny_test", "sema", strategy_params={"route_by": "task", "router": "softmax"}, device="cpu")
    with pytest.raises(ConfigError, match="route_by"):
        Agent("vit_tiny_test", "sema", strategy_params={"route_by": "experience"}, device="cpu")


class WarmStarts(Callback):
    """Records each ``warm_start`` event and whether the new adapter then equals its source."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def on_event(self, agent, kind, data) -> None:
        if kind == "warm_start":
            pool = agent.strategy.pools[data["layer"]]
            new, src = pool.adapters[data["adapter"]].state_dict(), pool.adapters[data["source"]].state_dict()
            self.events.append({**data, "copied": all(torch.equal(new[k], src[k]) for k in new)})


def test_warm_start_copies_the_adapter_of_the_nearest_past_experience():
    """A recurring task (experience 2 = experience 0's distribution): with ``warm_start`` its new adapters start
    as copies of experience 0's, found by the agent's journal."""
    stream = create_scenario("rotated_digits", angles=[0, 90, 0], train_per_class=10, test_per_class=2)
    log = WarmStarts()
    agent = Agent("vit_tiny_test", "adapter_per_task", strategy_params={**FAST, "warm_start": True},
                  callbacks=[log], device="cpu", progress=False)
    for exp in stream:
        agent.learn(exp)
    layers = set(agent.strategy.pools)
    assert {e["layer"] for e in log.events if e["adapter"] == "e1"} == layers  # e1's nearest can only be e0
    recurring = [e for e in log.events if e["adapter"] == "e2"]
    assert {e["layer"] for e in recurring} == layers
    assert all(e["nearest_experience"] == 0 and e["source"] == "e0" for e in recurring)
    assert all(e["copied"] for e in log.events)
