"""Conversion between our ``Stream`` and Avalanche (0.6) benchmarks, both ways.

Avalanche is imported inside the functions: importing it takes several seconds.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from cl.data import subset, targets_of
from cl.errors import DataError
from cl.experience import Experience, Stream


class AvalancheItems(Dataset):
    """An Avalanche dataset (items ``(x, y, task, ...)``) seen as ``(x, y)`` items with ``targets``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.targets = torch.tensor([int(t) for t in dataset.targets], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i][0], int(self.targets[i])


class FloatImages(Dataset):
    """Items of ``dataset`` with uint8 image tensors scaled to float32 in ``[0, 1]`` (others unchanged)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self.dataset[i]
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            x = x.float() / 255
        return x, y


def _task_label(exp: Any) -> int:
    try:
        return int(exp.task_label)
    except (AttributeError, ValueError):
        return 0


def from_avalanche(
    benchmark: Any, name: str = "avalanche", kind: str | None = None, class_names: list[str] | None = None
) -> Stream:
    """Our ``Stream`` over an Avalanche benchmark's ``train_stream`` / ``test_stream``.

    Test experience ``i`` pairs with train experience ``i``; a single test experience is split by
    the classes of each train experience. ``kind`` defaults to ``"task"`` when task labels differ,
    ``"domain"`` when a class recurs in another experience, else ``"class"``.
    """
    train_exps, test_exps = list(benchmark.train_stream), list(benchmark.test_stream)
    if len(test_exps) not in (1, len(train_exps)):
        raise DataError(
            f"cannot pair {len(test_exps)} test experiences with {len(train_exps)} train experiences "
            "(need one test experience, or one per train experience)"
        )
    experiences = []
    for i, exp in enumerate(train_exps):
        train = AvalancheItems(exp.dataset)
        classes = getattr(exp, "classes_in_this_experience", None)
        if classes is None:
            classes = train.targets.unique().tolist()
        classes = [int(c) for c in (sorted(classes) if isinstance(classes, set | frozenset) else classes)]
        if len(test_exps) == len(train_exps):
            test: Dataset = AvalancheItems(test_exps[i].dataset)
        else:
            whole = AvalancheItems(test_exps[0].dataset)
            test = subset(whole, torch.isin(whole.targets, torch.tensor(classes)).nonzero().flatten())
        experiences.append(
            Experience(id=i, train=train, test=test, classes=classes, task_label=_task_label(exp))
        )
    if kind is None:
        if len({e.task_label for e in experiences}) > 1:
            kind = "task"
        elif sum(len(e.classes) for e in experiences) > len({c for e in experiences for c in e.classes}):
            kind = "domain"  # classes recur (all of them, or some: new instances of known classes)
        else:
            kind = "class"
    if kind != "task":
        for e in experiences:
            e.task_label = 0
    return Stream(experiences, kind=kind, name=name, class_names=class_names)


def _to_avalanche_dataset(dataset: Dataset, task_label: int, float_images: bool) -> Any:
    from avalanche.benchmarks.utils import (
        ConstantSequence,
        DataAttribute,
        TaskAwareSupervisedClassificationDataset,
        TaskLabels,
    )

    targets = targets_of(dataset)
    return TaskAwareSupervisedClassificationDataset(
        [FloatImages(dataset) if float_images else dataset],
        data_attributes=[
            DataAttribute(targets.tolist(), "targets"),
            TaskLabels(ConstantSequence(task_label, len(targets))),
        ],
    )


def to_avalanche(stream: Stream, float_images: bool = True) -> Any:
    """An Avalanche ``CLScenario`` with the same experiences, class order and items as ``stream``.

    Items are ``(x, y, task_label)`` as Avalanche strategies expect; targets stay global ids.
    With ``float_images`` (default) uint8 images become float32 in ``[0, 1]`` (what Avalanche models
    take, no normalisation); otherwise items keep our dtype. Experiences carry
    ``classes_in_this_experience`` in our order, ``task_label`` and, for domain streams, ``domain``.
    """
    with warnings.catch_warnings():  # avalanche's imports warn about deprecated third-party packages
        warnings.simplefilter("ignore", DeprecationWarning)
        from avalanche.benchmarks.scenarios import (
            benchmark_from_datasets,
            with_classes_timeline,
            with_task_labels,
        )

    bm = benchmark_from_datasets(
        train=[_to_avalanche_dataset(e.train, e.task_label, float_images) for e in stream],
        test=[_to_avalanche_dataset(e.test, e.task_label, float_images) for e in stream],
    )
    bm = with_classes_timeline(with_task_labels(bm))
    for avl_stream in (bm.train_stream, bm.test_stream):
        for exp, ours in zip(avl_stream, stream, strict=True):
            exp.classes_in_this_experience = list(ours.classes)
            exp.domain = ours.domain
    return bm
