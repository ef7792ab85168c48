from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from cl.data import ArrayDataset, targets_of
from cl.errors import ConfigError, DataError
from scenarios.builders import (
    class_incremental,
    domain_incremental,
    experience_sizes,
    head_per_class,
    resolve_class_order,
    subset,
    task_incremental,
)


def orders(stream) -> list[int]:
    return [c for e in stream for c in e.classes]


def test_seeded_order_is_deterministic_and_differs_across_seeds(toy):
    a = class_incremental(*toy, n_experiences=3, seed=1)
    b = class_incremental(*toy, n_experiences=3, seed=1)
    c = class_incremental(*toy, n_experiences=3, seed=2)
    assert orders(a) == orders(b) == a.info["class_order"]
    assert orders(a) != orders(c)
    assert sorted(orders(a)) == list(range(6))
    assert orders(class_incremental(*toy, n_experiences=3, seed=None)) == list(range(6))


def test_explicit_order_is_respected_and_targets_stay_global(toy):
    order = [5, 3, 1, 0, 2, 4]
    s = class_incremental(*toy, n_experiences=3, class_order=order, class_names=list("abcdef"))
    assert s.kind == "class" and len(s) == 3 and s.classes == order and s.num_classes == 6
    assert [e.classes for e in s] == [[5, 3], [1, 0], [2, 4]]
    for e in s:
        assert set(targets_of(e.train).tolist()) == set(e.classes)
        assert set(targets_of(e.test).tolist()) == set(e.classes)
        assert len(e.train) == 10 and len(e.test) == 4 and e.task_label == 0
    assert s.class_names == list("abcdef")


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([0, 1, 1, 2, 3, 4], "duplicated [1]"),
        ([0, 1, 2, 3, 4, 5, 9], "unknown [9]"),
        ([0, 1, 2, 3, 4], "missing [5]"),
    ],
)
def test_invalid_class_order_is_rejected_with_the_reason(toy, order, message):
    with pytest.raises(ConfigError, match="exactly once") as err:
        class_incremental(*toy, n_experiences=2, class_order=order)
    assert message in str(err.value)


def test_resolve_class_order_reports_every_problem():
    with pytest.raises(ConfigError) as err:
        resolve_class_order([0, 1, 2, 3], [0, 0, 7], seed=0)
    assert "duplicated [0]" in str(err.value) and "unknown [7]" in str(err.value)
    assert "missing [1, 2, 3]" in str(err.value)


def test_uneven_n_experiences_is_rejected_with_a_suggestion(toy):
    with pytest.raises(ConfigError, match=r"6 classes cannot be split evenly into 4.*\[2, 2, 1, 1\]"):
        class_incremental(*toy, n_experiences=4)


def test_uneven_split_from_a_list(toy):
    s = class_incremental(*toy, classes_per_experience=[3, 2, 1], seed=None)
    assert [e.classes for e in s] == [[0, 1, 2], [3, 4], [5]]
    assert [len(e.train) for e in s] == [15, 10, 5]


@pytest.mark.parametrize(
    ("n_experiences", "per_experience", "message"),
    [
        (None, [3, 2], "sums to 5 but there are 6 classes"),
        (None, [6, 0], "no empty experience"),
        (None, 4, "does not divide"),
        (7, None, "exceeds the 6 classes"),
        (0, None, "must be >= 1"),
        (2, [3, 2, 1], "disagrees"),
        (None, None, "give n_experiences or classes_per_experience"),
    ],
)
def test_bad_sizes(n_experiences, per_experience, message):
    with pytest.raises(ConfigError, match=message):
        experience_sizes(6, n_experiences, per_experience)


def test_int_classes_per_experience(toy):
    assert [len(e.classes) for e in class_incremental(*toy, classes_per_experience=2)] == [2, 2, 2]


def test_test_class_missing_from_train_is_rejected(toy):
    train, test = toy
    only_four = train.subset(torch.isin(train.targets, torch.arange(4)).nonzero().flatten())
    with pytest.raises(DataError, match=r"classes \[4, 5\] appear in the test set but not in the training"):
        class_incremental(only_four, test, n_experiences=2)


def test_experience_without_test_items_is_rejected(toy):
    train, test = toy
    test = test.subset((test.targets < 4).nonzero().flatten())
    with pytest.raises(DataError, match=r"experience 2 \(classes \[4, 5\]\) has no test items"):
        class_incremental(train, test, n_experiences=3, seed=None)


def test_task_incremental_sets_task_labels(toy):
    s = task_incremental(*toy, n_experiences=3, seed=0)
    assert s.kind == "task" and s.task_aware
    assert [e.task_label for e in s] == [0, 1, 2]
    assert orders(s) == orders(class_incremental(*toy, n_experiences=3, seed=0))


class PlainDataset(Dataset):
    """No ``targets`` attribute and no ``subset``: the builders must fall back to ``Subset``."""

    def __init__(self, data: ArrayDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]


def test_plain_datasets_are_subset_with_targets(toy):
    s = class_incremental(PlainDataset(toy[0]), PlainDataset(toy[1]), n_experiences=2, seed=None)
    e = s[1]
    assert torch.equal(e.train.targets, torch.tensor([3, 4, 5] * 5))
    x, y = e.train[0]
    assert y == 3 and torch.equal(x, toy[0][3][0])


def test_subset_and_head_per_class(make_toy):
    d = make_toy(3, 4)  # targets 0,1,2,0,1,2,...
    assert subset(d, [1, 4]).targets.tolist() == [1, 1]
    head = head_per_class(d, 2)
    assert head.targets.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(head.inputs, d.inputs[:6])
    assert head_per_class(d, None) is d
    assert len(head_per_class(d, 10)) == 12
    with pytest.raises(ConfigError):
        head_per_class(d, 0)


def test_domain_incremental(toy):
    train, test = toy
    s = domain_incremental([("a", train, test), ("a", train, test), ("b", train, test)], name="doms")
    assert s.kind == "domain" and s.name == "doms" and len(s) == 3
    assert [e.domain for e in s] == ["a", "a", "b"]
    assert all(e.classes == list(range(6)) for e in s) and s.classes == list(range(6))
    empty = train.subset([])
    with pytest.raises(DataError, match=r"domain 'c' .* has no test items"):
        domain_incremental([("a", train, test), ("c", train, empty)])
    with pytest.raises(DataError, match="no training items"):
        domain_incremental([("a", empty, test)])
    with pytest.raises(ConfigError):
        domain_incremental([])
