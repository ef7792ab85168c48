from __future__ import annotations

import pytest
import torch

from cl.errors import ConfigError
from scenarios.sources.digits import load_digits


def test_digits_images_and_split():
    train, test, names = load_digits()
    assert len(train) + len(test) == 1797 and names == [str(d) for d in range(10)]
    assert train.inputs.shape[1:] == (1, 8, 8) and train.inputs.dtype == torch.uint8
    assert int(train.inputs.max()) == 255 and int(train.inputs.min()) == 0
    assert abs(len(test) / 1797 - 0.25) < 0.01
    train_counts, test_counts = train.targets.bincount(), test.targets.bincount()
    assert (test_counts / (train_counts + test_counts) - 0.25).abs().max() < 0.03  # stratified


def test_digits_split_is_fixed_by_seed():
    a, b = load_digits(seed=0)[1], load_digits(seed=0)[1]
    c = load_digits(seed=1)[1]
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, c.inputs)


def test_bad_test_fraction():
    with pytest.raises(ConfigError, match="test_fraction"):
        load_digits(test_fraction=1.5)
