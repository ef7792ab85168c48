"""Fixtures of the benchmark smoke tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def restore_threads():
    """Benchmarks set torch's thread count (``--threads``): put it back after the test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
