"""Metric formulas against hand-computed matrices (docs/metrics.md)."""

import math

import pytest

from cl.metrics import (
    avg_forgetting,
    avg_incremental_accuracy,
    backward_transfer,
    forgetting_per_experience,
    forward_transfer,
    summarize,
)

R = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.95]]


def test_forgetting_uses_best_earlier_accuracy():
    assert forgetting_per_experience(R) == pytest.approx([0.4, 0.1])
    assert avg_forgetting(R) == pytest.approx(0.25)
    # the best accuracy on exp 0 came after exp 1, not right after learning it
    rising = [[0.5], [0.8, 0.9], [0.3, 0.9, 0.9]]
    assert forgetting_per_experience(rising) == pytest.approx([0.5, 0.0])


def test_backward_transfer():
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert backward_transfer([[0.5], [0.8, 0.9], [0.3, 0.9, 0.9]]) == pytest.approx(-0.1)


def test_single_experience_has_no_forgetting():
    assert avg_forgetting([[0.7]]) == 0.0
    assert backward_transfer([[0.7]]) == 0.0


def test_forward_transfer_needs_future_rows():
    full = [[0.9, 0.2, 0.1], [0.8, 0.9, 0.3], [0.7, 0.8, 0.9]]
    assert forward_transfer(full, [0.1, 0.1, 0.1]) == pytest.approx(0.15)
    assert forward_transfer(R, [0.1, 0.1, 0.1]) is None
    assert forward_transfer(full, None) is None


def test_summary_headlines():
    seen = [0.9, 0.7, 0.72]
    s = summarize(R, seen)
    assert s["final_accuracy"] == 0.72
    assert s["avg_incremental_accuracy"] == pytest.approx((0.9 + 0.7 + 0.72) / 3)
    assert math.isnan(avg_incremental_accuracy([]))
