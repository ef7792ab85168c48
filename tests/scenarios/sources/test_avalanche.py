from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from cl.data import targets_of
from cl.errors import DataError
from scenarios.builders import class_incremental, domain_incremental, task_incremental
from scenarios.sources.avalanche import from_avalanche, to_avalanche
from scenarios.sources.digits import load_digits


@pytest.fixture(scope="module")
def digits():
    train, test, _ = load_digits()
    return train, test


def test_round_trip_keeps_classes_and_items(digits):
    ours = class_incremental(*digits, n_experiences=5, seed=3)
    bm = to_avalanche(ours)
    assert len(bm.train_stream) == len(bm.test_stream) == 5
    exp = bm.train_stream[1]
    assert exp.classes_in_this_experience == ours[1].classes and exp.task_label == 0
    x, y, t = exp.dataset[0]
    ref_x, ref_y = ours[1].train[0]
    assert x.dtype == torch.float32 and torch.allclose(x, ref_x.float() / 255) and (y, t) == (ref_y, 0)
    back = from_avalanche(bm)
    assert back.kind == "class"
    assert [e.classes for e in back] == [e.classes for e in ours]
    assert [len(e.train) for e in back] == [len(e.train) for e in ours]
    assert [len(e.test) for e in back] == [len(e.test) for e in ours]
    assert torch.equal(targets_of(back[2].test), targets_of(ours[2].test))
    assert torch.equal(back[0].train[0][0], ours[0].train[0][0].float() / 255)


def test_round_trip_of_task_and_domain_streams(digits):
    tasks = task_incremental(*digits, n_experiences=2, seed=0)
    back = from_avalanche(to_avalanche(tasks, float_images=False))
    assert back.kind == "task" and [e.task_label for e in back] == [0, 1]
    assert back[1].train[0][0].dtype == torch.uint8
    doms = from_avalanche(to_avalanche(domain_incremental([("a", *digits), ("b", *digits)])))
    assert doms.kind == "domain" and [e.classes for e in doms] == [list(range(10))] * 2


def test_from_an_avalanche_generator(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.benchmarks import nc_benchmark

        bm = nc_benchmark(*digits, n_experiences=5, task_labels=False, seed=1)
    ours = from_avalanche(bm)
    assert len(ours) == 5 and sorted(ours.classes) == list(range(10))
    assert sum(len(e.train) for e in ours) == len(digits[0])
    for e in ours:
        assert set(targets_of(e.train).tolist()) == set(e.classes)


class Triples:
    """Avalanche-like dataset: ``targets`` and ``(x, y, task)`` items."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), i), self.targets[i], 0


def test_single_test_experience_is_split_by_classes():
    train = [SimpleNamespace(dataset=Triples([c, c]), classes_in_this_experience={c}) for c in (2, 0, 1)]
    bm = SimpleNamespace(train_stream=train, test_stream=[SimpleNamespace(dataset=Triples([0, 1, 2, 2]))])
    s = from_avalanche(bm)
    assert [e.classes for e in s] == [[2], [0], [1]] and [len(e.test) for e in s] == [2, 1, 1]
    assert int(s[0].test[1][0][0, 0, 0]) == 3
    bm.test_stream = bm.test_stream * 2
    with pytest.raises(DataError, match="cannot pair 2 test experiences with 3 train"):
        from_avalanche(bm)
