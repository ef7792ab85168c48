"""Descriptors: batched losses, the FIFO of recent losses, z-scores, shift detection, growth on load."""

from __future__ import annotations

import pytest
import torch

from cl.descriptors import Descriptor, DescriptorSet, ShiftDetector
from cl.errors import ConfigError
from tests.helpers import fit, subspace_sampler


def test_losses_are_batched_per_sample_mse() -> None:
    d = Descriptor(16, hidden=4)
    x = torch.randn(5, 16)
    looped = torch.stack([torch.nn.functional.mse_loss(d(row), row) for row in x])
    torch.testing.assert_close(d.losses(x), looped)
    torch.testing.assert_close(d.loss(x), looped.mean())


def test_fifo_keeps_the_latest_losses() -> None:
    d = Descriptor(4, hidden=2, buffer_size=5)
    assert d.zscore(torch.tensor(3.0)) == 3.0  # empty buffer: the raw loss
    d.record(torch.tensor([1.0, 2.0, 3.0]))
    assert d.filled == 3
    mean, std = d.stats()
    torch.testing.assert_close((mean, std), (torch.tensor(2.0), torch.tensor(1.0)))
    d.record(torch.arange(10.0, 17.0))  # more than the buffer holds: only the last 5 stay
    assert d.filled == 5 and int(d.count) == 10
    assert sorted(d.recent.tolist()) == [12.0, 13.0, 14.0, 15.0, 16.0]
    torch.testing.assert_close(d.zscore(torch.tensor(14.0 + 2 * 2.5**0.5)), torch.tensor(2.0))
    d.record(torch.tensor([20.0]))
    assert sorted(d.recent.tolist()) == [13.0, 14.0, 15.0, 16.0, 20.0]
    fresh = Descriptor(4, hidden=2, buffer_size=5)
    fresh.load_state_dict(d.state_dict())
    assert torch.equal(fresh.recent, d.recent) and int(fresh.count) == 11


def test_detector_flags_a_shifted_batch_not_a_fresh_one() -> None:
    a, b = subspace_sampler(0), subspace_sampler(1)
    ds = DescriptorSet(32, hidden=8)
    fit(ds, "a", a)
    detect = ShiftDetector(tau=2.0)
    same, shifted = detect(ds, a(32)), detect(ds, b(32))
    assert not same.shift and same.zscores["a"] < 2.0
    assert shifted.shift and shifted.zscores["a"] > 2.0 and shifted.tau == 2.0
    fit(ds, "b", b)  # now B is known to one descriptor of the layer: no shift
    assert not detect(ds, b(32)).shift
    assert detect(DescriptorSet(32), a(4)).shift  # a layer with no descriptors always expands
    ds.add("c")
    with pytest.raises(ConfigError, match="'c' has no recorded losses"):
        detect(ds, a(4))


def test_descriptor_set_regrows_from_state_dict() -> None:
    ds = DescriptorSet(8, hidden=4, buffer_size=10)
    ds.add("t0")
    ds.add("t1").record(torch.ones(3))
    fresh = DescriptorSet(8)
    fresh.load_state_dict(ds.state_dict())
    assert fresh.names == ["t0", "t1"] and fresh["t1"].encoder.out_features == 4 and fresh["t1"].filled == 3
    x = torch.randn(6, 8)
    torch.testing.assert_close(fresh.losses(x), ds.losses(x))
    assert ds.losses(x).shape == (6, 2)
