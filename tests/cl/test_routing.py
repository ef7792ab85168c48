"""Routers: growth that keeps old mixtures, frozen columns, top-k sparsity, descriptor routing, the factory."""

from __future__ import annotations

import pytest
import torch

from cl.descriptors import DescriptorSet
from cl.errors import ConfigError
from cl.routing import DescriptorRouter, FixedRouter, SoftmaxRouter, TopKRouter, create_router
from tests.helpers import fit, subspace_sampler


def trained_like(router: SoftmaxRouter, k: int) -> SoftmaxRouter:
    """A router with ``k`` experts whose columns look trained (random, not the init)."""
    for _ in range(k):
        router.add_expert()
    with torch.no_grad():
        for w, b in zip(router.weight, router.bias, strict=True):
            w.normal_(std=0.5)
            b.normal_()
    return router


def test_new_column_keeps_old_mixture() -> None:
    router = trained_like(SoftmaxRouter(16), 3)
    x = torch.randn(256, 16) * 3
    before = router(x)
    router.add_expert()
    after = router(x)
    assert after.shape == (256, 4)
    assert (after[:, :3] - before).abs().max() < 0.02
    assert after[:, 3].max() < 0.02


def test_first_column_starts_neutral_and_each_newest_is_trained() -> None:
    router = SoftmaxRouter(8)
    router.add_expert()
    assert router.frozen == [] and router.weight[0].abs().sum() == 0
    router.add_expert()
    assert router.frozen == [0]  # the old column freezes when the next arrives
    x = torch.randn(4, 8)
    assert torch.allclose(router(x)[:, 1], torch.full((4,), torch.tensor(-4.0).exp() / (1 + torch.tensor(-4.0).exp())))
    router(x)[:, 1].sum().backward()
    assert router.weight[0].grad is None and router.weight[1].grad.abs().sum() > 0


def test_topk_router_is_sparse_and_normalised() -> None:
    router = trained_like(TopKRouter(8, k=2), 5)
    w = router(torch.randn(32, 8))
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    assert torch.equal(trained_like(TopKRouter(8, k=9), 3)(torch.randn(2, 8)).gt(0).sum(-1), torch.tensor([3, 3]))


def test_router_regrows_from_state_dict() -> None:
    router = trained_like(SoftmaxRouter(8), 3)
    router.add_expert()
    fresh = SoftmaxRouter(8)
    fresh.load_state_dict(router.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), router(x))
    assert fresh.frozen == [0, 1, 2]


def test_descriptor_router_sends_inputs_to_their_descriptor() -> None:
    domains = [subspace_sampler(s) for s in range(3)]
    ds = DescriptorSet(32, hidden=8)
    for k, sample in enumerate(domains):
        fit(ds, f"d{k}", sample)
    soft = create_router("descriptor", 32, descriptors=ds)
    hard = create_router("descriptor", 32, descriptors=ds, hard=True)
    assert isinstance(soft, DescriptorRouter) and soft.descriptors is ds and soft.num_experts == 3
    assert not list(soft.state_dict())  # the set is saved by its owner
    for k, sample in enumerate(domains):
        x = sample(64)
        assert (soft(x).argmax(-1) == k).float().mean() > 0.95
        assert (hard(x)[:, k] == 1).float().mean() > 0.95
    with pytest.raises(ConfigError, match="needs descriptors"):
        create_router("descriptor", 32)


def test_fixed_router_and_factory() -> None:
    fixed = create_router("fixed", 4)
    assert isinstance(fixed, FixedRouter)
    fixed.add_expert()
    fixed.add_expert()
    torch.testing.assert_close(fixed(torch.randn(3, 4)), torch.full((3, 2), 0.5))
    fixed.weights = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(fixed(torch.randn(3, 4)), torch.tensor([[0.0, 1.0]] * 3))
    fixed.add_expert()
    with pytest.raises(ConfigError, match="2 columns for 3 experts"):
        fixed(torch.randn(1, 4))
    with pytest.raises(ConfigError, match="did you mean 'topk'"):
        create_router("top-k", 4)
    with pytest.raises(ConfigError, match="unknown key 'bias'"):
        create_router("softmax", 4, bias=-2)
    assert create_router("topk", 4, k=3).k == 3
