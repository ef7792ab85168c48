"""LAE: the offline adapters are an EMA of the online ones, the ensemble follows the confident member,
every adapter kind works, and a resumed run ends with the same metrics (tiny random-init models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import strategies.lae  # noqa: F401  (registers "lae" until strategies/__init__.py imports it)
from cl.adapters.ema import ema_update
from cl.agent import Agent
from cl.errors import ConfigError
from cl.routing import OFF
from cl.run import run
from scenarios import create_scenario
from strategies.lae import LAE, ensemble_scores
from tests.helpers import interrupted_and_resumed, one_thread, tiny_config

FAST = {"epochs": 2, "batch_size": 16, "lr": 3e-3}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def stream(n_experiences: int = 2):
    return create_scenario("synthetic", n_classes=2 * n_experiences, n_experiences=n_experiences,
                           train_per_class=16, test_per_class=4, image_size=16)


def agent(**params) -> Agent:
    return Agent("vit_tiny_test", "lae", strategy_params={**FAST, **params}, device="cpu", progress=False)


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_ema_update_is_the_formula():
    target, source = nn.Linear(4, 3), nn.Linear(4, 3)
    target.register_buffer("count", torch.tensor(1.0))
    source.register_buffer("count", torch.tensor(7.0))
    before = weights(target)
    ema_update(target, source, 0.9)
    for t, t0, s in zip(target.parameters(), before, source.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s)
    assert target.count == 7.0  # buffers are copied, not averaged
    ema_update(target, source, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), source.parameters(), strict=True))
    with pytest.raises(ConfigError, match="differ"):
        ema_update(nn.Linear(4, 3), nn.Linear(3, 3), 0.5)
    with pytest.raises(ConfigError, match="momentum"):
        ema_update(target, source, 1.5)


def test_offline_adapters_follow_the_online_ones_by_ema_steps():
    """Experience 0: offline = a copy of online. Later: one EMA step per optimiser step, never a gradient."""
    exps = stream()
    a = agent(momentum=0.8)
    s: LAE = a.strategy
    a.learn(exps[0])
    online, offline = s.member_modules("online"), s.member_modules("offline")
    assert s.ema_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(online.parameters(), offline.parameters(), strict=True))
    start, seen = weights(offline), []
    step = s.accumulate
    s.accumulate = lambda: (seen.append(weights(online)), step())  # online weights after each optimiser step
    a.learn(exps[1])
    n_steps = FAST["epochs"] * -(-len(exps[1].train) // FAST["batch_size"])
    assert len(seen) == n_steps and s.ema_steps == n_steps
    expected = start
    for w in seen:
        expected = [0.8 * e + 0.2 * x for e, x in zip(expected, w, strict=True)]
    for got, want in zip(offline.parameters(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
        assert got.grad is None and not got.requires_grad
    # the offline copy lags: it moved less than the online adapters since the copy, but it did move
    moved = lambda ws: torch.cat([(w - w0).flatten() for w, w0 in zip(ws, start, strict=True)]).norm()  # noqa: E731
    assert 0 < moved(weights(offline)) < moved(weights(online))
    assert 0 < s.offline_lag() < 1


def test_later_experiences_train_the_online_adapters_slower():
    exps = stream()
    a = agent(adapter_lr_scale=0.1, freeze_epochs=1)
    s: LAE = a.strategy
    a.learn(exps[0])
    s.before_experience(exps[1])
    params = [p for p in s.parameters() if p.requires_grad]
    opt = s.configure_optimizer(params)
    head, adapters = opt.param_groups
    assert {id(p) for p in adapters["params"]} == {id(p) for p in s.member_modules("online").parameters()}
    assert head["lr"] == FAST["lr"] and adapters["lr"] == 0.0  # frozen for the first epoch
    for _ in range(-(-len(exps[1].train) // FAST["batch_size"])):
        opt.step()
    assert adapters["lr"] == pytest.approx(0.1 * FAST["lr"])


def test_ensemble_follows_the_confident_member():
    online = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 3.0, float("-inf")]])
    offline = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, float("-inf")]])
    for rule in ("softmax", "energy"):
        out = ensemble_scores([online, offline], rule)
        assert out.argmax(1).tolist() == [0, 2, 1]  # each row: the prediction of the more confident member
        assert torch.isneginf(out[2, 2])  # unknown classes stay -inf
    probs = torch.stack([online.softmax(1), offline.softmax(1)]).amax(0)
    assert torch.allclose(ensemble_scores([online, offline], "softmax").exp(), probs)
    energy_pick = ensemble_scores([online, offline], "energy")
    assert torch.allclose(energy_pick[1], offline[1].log_softmax(0))  # lower energy: offline decides row 1
    # a flat but high-energy member against a peaked low-energy one: the two rules disagree
    flat, peaked = torch.tensor([[2.0, 1.9, -5.0]]), torch.tensor([[0.0, 1.5, 0.0]])
    assert ensemble_scores([flat, peaked], "softmax").argmax(1).item() == 1  # the larger probability
    assert ensemble_scores([flat, peaked], "energy").argmax(1).item() == 0  # the lower energy
    with pytest.raises(ConfigError, match="ensemble"):
        ensemble_scores([online], "mean")


@pytest.mark.parametrize("kind", ["bottleneck", "lora", "ssf", "rank1"])
def test_every_adapter_kind_routes_each_member_through_its_own_adapters(kind):
    """The paper's setting: a shared linear head, max-softmax over both members."""
    exps = stream()
    a = agent(adapter=kind, momentum=0.5, head="linear", head_features="adapted", ensemble="softmax")
    for exp in exps:
        a.learn(exp)
    s: LAE = a.strategy
    assert all(p.names == ["online", "offline"] and p.frozen == {"offline"} for p in s.pools.values())
    x = exps[0].test.inputs
    with torch.no_grad():
        state = s.backbone.forward_until(s.backbone.prepare(x, "cpu"), s.frozen_depth)
        on, off, frozen = (s.embedding(state, m) for m in ("online", "offline", OFF))
        assert not torch.allclose(on, off) and not torch.allclose(off, frozen)
        scores = s.scores(state)
        # the offline route equals the online route with the offline weights loaded into it
        for p in s.pools.values():
            p.adapters["online"].load_state_dict(p.adapters["offline"].state_dict())
        assert torch.allclose(s.embedding(state, "online"), off, atol=1e-6)
        online = s.train_head(on)
        assert torch.allclose(scores, ensemble_scores([online, s.train_head(off)]))
    assert torch.isfinite(scores[:, s.seen_classes]).all()


def test_statistics_heads_one_per_predicting_member_over_frozen_and_adapted_features():
    exps = stream()
    a, both = agent(), agent(ensemble="softmax")  # default: LDA over [frozen, offline], the offline member alone
    for exp in exps:
        a.learn(exp)
        both.learn(exp)
    s: LAE = a.strategy
    d = s.backbone.embed_dim
    assert set(s.heads) == {"offline"} and set(both.strategy.heads) == {"online", "offline"}
    assert all(h.dim == 2 * d and int(h.counts.sum()) == 64 for h in [*s.heads.values(), *both.strategy.heads.values()])
    x = exps[0].test.inputs
    with torch.no_grad():
        state = s.backbone.forward_until(s.backbone.prepare(x, "cpu"), s.frozen_depth)
        feats = torch.cat([s.embedding(state, OFF), s.embedding(state, "offline")], 1)
        assert torch.equal(s.scores(state), s.heads["offline"](feats))
    assert a.evaluate(exps)["accuracy_seen"] > 0.5
    with pytest.raises(ConfigError, match="head_features"):
        agent(head="linear", head_features="concat")
    with pytest.raises(ConfigError, match="ensemble"):
        agent(ensemble="mean")


def test_run_and_resume_end_with_the_same_metrics(tmp_path):
    params = {**FAST, "adapter": "lora", "momentum": 0.9, "freeze_epochs": 1, "ensemble": "softmax"}
    full = run(tiny_config(tmp_path / "a", "lae", **params))

    resumed = interrupted_and_resumed(tiny_config(tmp_path / "b", "lae", **params))
    assert full["ema_steps"] > 0 and full["offline_lag"] > 0
    for key in ("accuracy_matrix", "ema_steps", "offline_lag", "params_added_per_experience"):
        assert resumed[key] == full[key], key
