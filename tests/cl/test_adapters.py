"""Adapters: zero-init insertion, training, prefix split, pools by name, routing overrides, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from cl.adapters import AdaptedBlock, AdapterConfig, AdapterPool, RankOne, capturing, inject, pools
from cl.backbones import Backbone, create_backbone
from cl.errors import CheckpointError, ConfigError
from cl.routing import routes_to, routing
from tests.helpers import SENTENCES, TINY, one_thread

KINDS = ["bottleneck", "lora", "ssf", "rank1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def tiny(name: str) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(name, **TINY[name]).eval().requires_grad_(False)


def batch(b: Backbone) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if b.data_config.modality == "text":
        return b.prepare(SENTENCES)
    return torch.randn(3, *b.data_config.input_size, generator=torch.Generator().manual_seed(1))


def expanded(name: str, kind: str, **cfg) -> tuple[Backbone, dict[int, AdapterPool]]:
    """A backbone with two adapters per pool in every block (the first frozen)."""
    b = tiny(name)
    ps = inject(b, AdapterConfig(kind=kind, **cfg))
    for p in ps.values():
        p.add("t0")
        p.freeze("t0")
        p.add("t1")
    return b, ps


def train_step(b: Backbone, x, lr: float = 0.1) -> None:
    out = b(x)
    (out.pow(2).sum() + out.sum()).backward()
    with torch.no_grad():
        for p in b.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


def routed_pass(b: Backbone, ps: dict[int, AdapterPool], x, routes) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output of one pass of ``b`` under ``routes`` and the gradients it leaves on ``b``'s parameters."""
    b.zero_grad(set_to_none=True)
    with routing(ps, routes):
        out = b(x)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in b.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("kind", KINDS)
def test_insertion_keeps_function_then_training_changes_it(name: str, kind: str) -> None:
    b = tiny(name)
    x = batch(b)
    with torch.no_grad():
        ref = b(x)
    ps = inject(b, AdapterConfig(kind=kind, top_k=1))
    for p in ps.values():
        p.add("t0")
        p.add("t1")
    assert all(isinstance(blk, AdaptedBlock) for blk in b.blocks)
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref, rtol=0, atol=0)
    train_step(b, x)
    with torch.no_grad():
        assert (b(x) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["vit_tiny_test", "efficientnet_lite0", "minilm"])
def test_prefix_split_holds_with_trained_adapters(name: str) -> None:
    b, _ = expanded(name, "bottleneck")
    x = batch(b)
    train_step(b, x)
    with torch.no_grad():
        full = b.forward_features(x)
        for k in range(b.num_blocks + 1):
            torch.testing.assert_close(b.forward_from(b.forward_until(x, k), k), full)


def test_frozen_adapter_gets_no_grad() -> None:
    b, ps = expanded("vit_tiny_test", "bottleneck")
    b(batch(b)).sum().backward()
    pool = ps[0]
    assert pool.names == ["t0", "t1"] and pool.frozen == {"t0"}
    assert all(p.grad is None for p in pool.adapters["t0"].parameters())
    assert pool.adapters["t1"].up.weight.grad.abs().sum() > 0
    assert pool.router.frozen == [0]  # the frozen adapter's router column too
    with pytest.raises(ConfigError, match="already exists"):
        pool.add("t1")
    with pytest.raises(ConfigError, match="no adapter"):
        pool.freeze("t9")
    with pytest.raises(ConfigError, match=r"without '\.'"):
        pool.add("a.b")


def test_inject_selects_blocks_and_is_idempotent() -> None:
    b = tiny("vit_tiny_test")
    ps = inject(b, AdapterConfig(layers=[-1, 0]))
    assert list(ps) == [0, 3]
    assert inject(b, AdapterConfig(layers=[3])) == {3: ps[3]}
    assert pools(b) == ps
    assert list(inject(b, AdapterConfig(pattern="blocks.[12]"))) == [1, 2]
    assert list(inject(tiny("minilm"), AdapterConfig(pattern="*.layer.1"))) == [1]
    with pytest.raises(ConfigError, match="already has a 'bottleneck'"):
        inject(b, AdapterConfig(kind="lora", layers=[0]))
    with pytest.raises(ConfigError, match=r"out of range .* 4 blocks"):
        inject(b, AdapterConfig(layers=[4]))
    with pytest.raises(ConfigError, match="matches no block"):
        inject(b, AdapterConfig(pattern="head*"))
    with pytest.raises(ConfigError, match="either layers or pattern"):
        AdapterConfig(layers=[0], pattern="*")
    with pytest.raises(ConfigError, match="'lorra'"):
        AdapterConfig(kind="lorra")
    assert AdapterConfig(kind="rank1").router is None and AdapterConfig(kind="rank1", router="softmax").router
    assert b.blocks[0].attn is b.blocks[0].block.attn  # the wrapped block's attributes stay reachable


def test_channel_adapters_follow_stride_and_width() -> None:
    b = tiny("efficientnet_lite0")
    ps = inject(b, AdapterConfig())
    strided = [i for i, p in ps.items() if p.shape.stride == 2]
    assert strided and all(ps[i].shape.c_in != ps[i].shape.c_out for i in strided)
    assert ps[1].add("t0").down.out_channels == 32  # channel default width


def test_checkpoint_of_expanded_model_loads_into_fresh_one() -> None:
    cfg = {"descriptor_hidden": 8, "layers": [-2, -1]}
    b, ps = expanded("vit_tiny_test", "bottleneck", **cfg)
    x = batch(b)
    train_step(b, x)
    ps[3].add("t2")
    ps[3].descriptors["t2"].record(torch.rand(7))
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = tiny("vit_tiny_test")
    fps = inject(fresh, AdapterConfig(**cfg))
    fresh.load_state_dict(state)  # strict: every adapter, router column and descriptor was recreated
    assert fps[3].names == ["t0", "t1", "t2"] and fps[2].names == ["t0", "t1"]
    assert fps[3].frozen == {"t0"} and not fps[3].adapters["t0"].up.weight.requires_grad
    assert fps[3].router.frozen == ps[3].router.frozen == [0, 1]
    assert int(fps[3].descriptors["t2"].count) == 7
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), b(x), rtol=0, atol=0)

    lora = tiny("vit_tiny_test")
    inject(lora, AdapterConfig(kind="lora", **cfg))
    with pytest.raises(CheckpointError, match="'bottleneck' adapter pool"):
        lora.load_state_dict(state)


def test_route_override_selects_one_adapter() -> None:
    b, ps = expanded("vit_tiny_test", "lora")
    x = batch(b)
    train_step(b, x)  # only t1 moves
    with torch.no_grad():
        mixed = b(x)
        with routing(ps, {i: torch.tensor([1.0, 0.0]) for i in ps}):
            only_t0 = b(x)
        assert ps[0].route_override is None
        torch.testing.assert_close(b(x), mixed)
        for p in ps.values():  # t0 is still zero: routing everything to it is the plain backbone
            p.adapters.pop("t1")
            p.router = None
        torch.testing.assert_close(only_t0, b(x))
    with pytest.raises(ConfigError, match="2 columns for 1 adapters"), routing(ps, {0: torch.ones(2)}):
        b(x)


def test_a_route_for_every_input_reaches_every_row() -> None:
    """A ``[K]`` or ``[1, K]`` route sends every input of the batch through the adapters it weights (each row its
    own delta, not row 0's broadcast); ``[B, K]`` needs one row per input, anything else is an error."""
    b, ps = expanded("vit_tiny_test", "bottleneck")
    x = batch(b)
    train_step(b, x)  # t1 moves away from zero
    rows = []
    hooks = [p.adapters["t1"].register_forward_hook(lambda m, a, o: rows.append(len(a[0]))) for p in ps.values()]
    with torch.no_grad():
        with routing(ps, {i: torch.tensor([0.0, 1.0]) for i in ps}):
            flat = b(x)
        with routing(ps, {i: torch.tensor([[0.0, 1.0]]) for i in ps}):
            one_row = b(x)
        with routing(ps, {i: torch.tensor([[0.0, 1.0]]).expand(3, -1) for i in ps}):
            per_row = b(x)
    for h in hooks:
        h.remove()
    assert rows == [3] * (3 * len(ps))
    torch.testing.assert_close(one_row, flat, rtol=0, atol=0)
    torch.testing.assert_close(per_row, flat, rtol=0, atol=0)
    assert not torch.allclose(flat[0], flat[1])  # inputs keep their own features
    with pytest.raises(ConfigError, match=r"shape \(2, 2\) for a batch of 3"), routing(ps, {0: torch.ones(2, 2)}):
        b(x)


def test_pools_route_inputs_to_the_adapters_of_their_experience() -> None:
    """``add(name, owner=e)`` records the experience; ``route_to`` sends an experience to the adapter it added, or
    where it added none (it reused the pool) to the latest one an earlier experience added."""
    b = tiny("vit_tiny_test")
    ps = inject(b, AdapterConfig(layers=[-2, -1]))
    for name, owner in [("shared", None), ("a", 0), ("b", 2)]:
        for p in ps.values():
            p.add(name, owner=owner)
    ps[3].add("c", owner=3)  # experience 3 expanded the last block only
    pool = ps[3]
    assert pool.owners == [-1, 0, 2, 3] and pool.owner("a") == 0 and pool.owner("shared") is None
    assert pool.owned_by(2) == "b" and pool.owned_by(1) is None
    exps = torch.tensor([0, 1, 2, 3, 5])
    assert pool.adapter_for(exps).tolist() == [1, 1, 2, 3, 3]  # 1 reused a, 5 reused c
    assert ps[2].adapter_for(exps).tolist() == [1, 1, 2, 2, 2]  # 3 and 5 reused b in block 2
    w = pool.route_to(exps)
    assert w.shape == (5, 4) and torch.equal(w.argmax(1), pool.adapter_for(exps))
    assert torch.equal(w.sum(1), torch.ones(5))
    assert pool.route_to(1).tolist() == [0.0, 1.0, 0.0, 0.0]  # one experience: [K], every input
    assert pool.route_to("shared").tolist() == [1.0, 0.0, 0.0, 0.0]  # by adapter name
    routes = routes_to(ps, exps)
    assert set(routes) == {2, 3} and routes[3].shape == (5, 4) and routes[2].shape == (5, 3)
    pool.add("e5", owner=5)  # a later expansion: asked again, the pool answers with it
    assert pool.adapter_for(torch.tensor([4, 5, 9])).tolist() == [3, 4, 4]
    with pytest.raises(ConfigError, match=r"no adapter for experiences \[-1\]"):
        pool.adapter_for(torch.tensor([-1, 0]))
    late = inject(tiny("vit_tiny_test"), AdapterConfig(layers=[0]))[0]
    late.add("x")
    late.add("y", owner=1)
    with pytest.raises(ConfigError, match=r"no adapter for experiences \[0\] .*y \(experience 1\)"):
        late.route_to(torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match="no adapter 'z'"):
        pool.route_to("z")
    with pytest.raises(ConfigError, match="owner"):
        pool.add("d", owner=-1)


def test_owners_survive_a_checkpoint_and_old_checkpoints_get_them_from_names() -> None:
    b = tiny("vit_tiny_test")
    ps = inject(b, AdapterConfig(layers=[-1]))
    ps[3].add("e0", owner=0)
    ps[3].add("online")
    ps[3].add("e7", owner=2)  # the owner is recorded, not read from the name
    state = b.state_dict()
    fresh = tiny("vit_tiny_test")
    fps = inject(fresh, AdapterConfig(layers=[-1]))
    fresh.load_state_dict(state)
    assert fps[3].names == ["e0", "online", "e7"] and fps[3].owners == [0, -1, 2]
    old = dict(state)  # as saved before owners were recorded
    old["model.blocks.3.pool._extra_state"] = {"kind": "bottleneck", "names": ["e0", "online", "e7"], "frozen": []}
    older = tiny("vit_tiny_test")
    ops = inject(older, AdapterConfig(layers=[-1]))
    ops[3].add("e0")  # a strategy may have added some before loading: they get their owner too
    older.load_state_dict(old)
    assert ops[3].owners == [0, -1, 7]  # e<id> names: experience id


def test_an_experience_that_reuses_a_pool_goes_to_the_adapter_it_was_given_and_keeps_it_after_a_checkpoint() -> None:
    b = tiny("vit_tiny_test")
    pool = inject(b, AdapterConfig(layers=[-1]))[3]
    for k in (0, 1):
        pool.add(f"e{k}", owner=k)
    exps = torch.tensor([0, 1, 2, 3])
    assert pool.adapter_for(exps).tolist() == [0, 1, 1, 1]  # 2 and 3 added none: the latest before them
    pool.reuse("e0", 2)  # experience 2 (a recurrence of experience 0's domain) uses e0
    assert pool.adapter_for(exps).tolist() == [0, 1, 0, 1]
    assert pool.route_to(2).tolist() == [1.0, 0.0]
    fresh = tiny("vit_tiny_test")
    again = inject(fresh, AdapterConfig(layers=[-1]))[3]
    fresh.load_state_dict(b.state_dict())
    assert again.adapter_for(exps).tolist() == [0, 1, 0, 1]
    with pytest.raises(ConfigError, match="no adapter 'e5'"):
        pool.reuse("e5", 3)
    with pytest.raises(ConfigError, match="added no adapter"):
        pool.reuse("e0", 1)  # experience 1 has its own


@pytest.mark.parametrize("name", ["vit_tiny_test", "efficientnet_lite0"])
def test_hard_routes_run_each_adapter_on_its_inputs_only(name: str) -> None:
    """One-hot routes dispatch inputs to their adapter: same outputs and gradients as the dense sum."""
    b, ps = expanded(name, "bottleneck")
    x = batch(b)
    train_step(b, x)  # t1 moves away from zero
    hard = {i: torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]) for i in ps}
    soft = {i: w * (1 - 1e-7) + (1 - w) * 1e-7 for i, w in hard.items()}  # not one-hot: the dense path
    (fast, g_fast), (dense, g_dense) = routed_pass(b, ps, x, hard), routed_pass(b, ps, x, soft)
    torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-5)
    assert len(g_fast) == len(g_dense) > 0
    for a, c in zip(g_fast, g_dense, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-5)
    calls = []
    hooks = [p.adapters["t0"].register_forward_hook(lambda m, a, o: calls.append(len(a[0]))) for p in ps.values()]
    with torch.no_grad(), routing(ps, hard):
        b(x)
    for h in hooks:
        h.remove()
    assert calls == [1] * len(ps)  # t0 saw only the one input routed to it, in every block


def test_text_pooling_ignores_padding() -> None:
    b = tiny("minilm")
    ps = inject(b, AdapterConfig())
    with torch.no_grad(), capturing(ps) as found:
        b(b.prepare(SENTENCES[2:]))
        alone = found[1][0]
        b(b.prepare(SENTENCES))
    assert found[1].shape == (3, 32)
    torch.testing.assert_close(found[1][2], alone, atol=1e-5, rtol=1e-5)
    assert ps[0]._sink is None


def test_rank_one_experts_gate_jointly() -> None:
    _, ps = expanded("vit_tiny_test", "rank1", dim=2, top_k=1)
    pool = ps[0]
    pool.add("t2")
    experts = list(pool.adapters.values())
    for e in experts:
        torch.nn.init.normal_(e.up.weight)
    x = torch.randn(2, 5, 32)
    acts = torch.cat([e.down(x) for e in experts], -1)  # [2, 5, 6]
    winner = acts.abs().argmax(-1)
    expected = torch.zeros_like(x)
    for k, e in enumerate(experts):
        for r in range(2):
            on = (winner == 2 * k + r).unsqueeze(-1)
            expected += on * acts[..., 2 * k + r, None] * e.up.weight[:, r]
    torch.testing.assert_close(pool(x, x), expected)
    assert isinstance(experts[0], RankOne) and pool.router is None
    assert pool.parameter_counts() == {"adapters": 3 * 2 * 2 * 32, "router": 0, "descriptors": 0}


@pytest.mark.parametrize("kind", KINDS)
def test_one_experience_per_batch_routes_by_name_and_runs_that_adapter_alone(kind: str) -> None:
    """``routes_to`` a single experience (an int, or ids all equal) gives each pool its adapter's name: that adapter
    alone runs on every row, with the outputs and gradients of its one-hot weights; mixed ids give weights."""
    b = tiny("vit_tiny_test")
    ps = inject(b, AdapterConfig(kind=kind, top_k=1, layers=[-2, -1]))
    for p in ps.values():
        p.add("e0", owner=0)
        p.add("e1", owner=1)
    ps[3].reuse("e0", 2)
    x = batch(b)
    train_step(b, x)  # both adapters move away from zero
    named = routes_to(ps, torch.tensor([2, 2, 2]))
    assert named == {2: "e1", 3: "e0"} and routes_to(ps, 1) == {2: "e1", 3: "e1"}
    mixed = routes_to(ps, torch.tensor([0, 1, 1]))
    assert all(isinstance(w, torch.Tensor) and w.shape == (3, 2) for w in mixed.values())
    calls = []
    hooks = [p.adapters[n].register_forward_hook(lambda m, a, o, n=n: calls.append((n, len(o))))
             for p in ps.values() for n in p.names]
    calls.clear()
    by_name, g_name = routed_pass(b, ps, x, named)
    if kind != "rank1":  # rank-one experts mix by weights: a name becomes its one-hot weights
        assert sorted(calls) == [("e0", 3), ("e1", 3)]  # one adapter per pool, on the whole batch
    by_weights, g_weights = routed_pass(b, ps, x, {i: ps[i].route_to(n) for i, n in named.items()})
    torch.testing.assert_close(by_name, by_weights, rtol=1e-5, atol=1e-6)
    assert len(g_name) == len(g_weights) > 0
    for a, c in zip(g_name, g_weights, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    for h in hooks:
        h.remove()
    with pytest.raises(ConfigError, match="no adapter 'zz'"), routing(ps, {3: "zz"}):
        b(x) if kind != "rank1" else ps[3].mixture(None, 3)
