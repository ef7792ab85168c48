"""Stream builders: split labelled datasets into class-, task- or domain-incremental streams.

Targets keep their global class ids in every experience; builders only choose which items go
where. Every builder validates its inputs and raises ``ConfigError`` (bad settings) or
``DataError`` (data inconsistent with the settings) with a message that says what to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cl.data import Index, subset, targets_of  # noqa: F401  (Index, subset: the data contract's, re-exported)
from cl.errors import ConfigError, DataError
from cl.experience import Experience, Stream


def head_per_class(dataset: Dataset, n: int | None, start: int = 0) -> Dataset:
    """The first ``n`` items of each class, in dataset order (all items when ``n`` is None); with ``start``, the
    ``n`` items of each class that follow its first ``start`` (disjoint slices of one dataset)."""
    if n is None:
        return dataset
    if n < 1:
        raise ConfigError(f"items per class must be >= 1 or None, got {n}")
    if start < 0:
        raise ConfigError(f"start must be >= 0, got {start}")
    t = targets_of(dataset).numpy()
    order = np.argsort(t, kind="stable")
    sorted_t = t[order]
    starts = np.searchsorted(sorted_t, sorted_t, side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(t)) - starts
    return subset(dataset, np.flatnonzero((rank >= start) & (rank < start + n)))


def resolve_class_order(
    classes: Sequence[int], class_order: Sequence[int] | None, seed: int | None
) -> list[int]:
    """The order in which ``classes`` appear: ``class_order`` checked, else a seeded permutation.

    ``seed=None`` with no ``class_order`` keeps the classes sorted.
    """
    known = sorted(int(c) for c in classes)
    if class_order is None:
        if seed is None:
            return known
        return [int(c) for c in np.random.default_rng(seed).permutation(known)]
    order = [int(c) for c in class_order]
    problems = []
    dup = sorted({c for c in order if order.count(c) > 1})
    if dup:
        problems.append(f"duplicated {dup}")
    unknown = sorted(set(order) - set(known))
    if unknown:
        problems.append(f"unknown {unknown} (not in the training data)")
    missing = sorted(set(known) - set(order))
    if missing:
        problems.append(f"missing {missing}")
    if problems:
        raise ConfigError(
            f"class_order must list each of the {len(known)} classes {known} exactly once: "
            + "; ".join(problems)
        )
    return order


def experience_sizes(
    n_classes: int, n_experiences: int | None, classes_per_experience: int | Sequence[int] | None
) -> list[int]:
    """Number of classes in each experience, from ``n_experiences`` or ``classes_per_experience``."""
    if isinstance(classes_per_experience, Sequence):
        sizes = [int(s) for s in classes_per_experience]
        if any(s < 1 for s in sizes):
            raise ConfigError(f"classes_per_experience must all be >= 1 (no empty experience), got {sizes}")
        if sum(sizes) != n_classes:
            raise ConfigError(
                f"classes_per_experience {sizes} sums to {sum(sizes)} but there are {n_classes} classes"
            )
    elif classes_per_experience is not None:
        k = int(classes_per_experience)
        if k < 1 or n_classes % k:
            raise ConfigError(
                f"classes_per_experience={k} does not divide the {n_classes} classes; "
                "give a divisor or a list of sizes"
            )
        sizes = [k] * (n_classes // k)
    elif n_experiences is not None:
        if n_experiences < 1:
            raise ConfigError(f"n_experiences must be >= 1, got {n_experiences}")
        if n_experiences > n_classes:
            raise ConfigError(
                f"n_experiences={n_experiences} exceeds the {n_classes} classes: some would be empty"
            )
        if n_classes % n_experiences:
            q, r = divmod(n_classes, n_experiences)
            example = [q + 1] * r + [q] * (n_experiences - r)
            raise ConfigError(
                f"{n_classes} classes cannot be split evenly into {n_experiences} experiences; "
                f"choose a divisor of {n_classes} or pass classes_per_experience={example}"
            )
        sizes = [n_classes // n_experiences] * n_experiences
    else:
        raise ConfigError("give n_experiences or classes_per_experience")
    if n_experiences is not None and len(sizes) != n_experiences:
        raise ConfigError(
            f"n_experiences={n_experiences} disagrees with classes_per_experience "
            f"({len(sizes)} experiences: {sizes})"
        )
    return sizes


def _check_test_classes(train_t: torch.Tensor, test_t: torch.Tensor, where: str = "") -> None:
    extra = sorted(set(test_t.unique().tolist()) - set(train_t.unique().tolist()))
    if extra:
        raise DataError(f"classes {extra} appear in the test set{where} but not in the training set")


def _split_by_class(
    train: Dataset,
    test: Dataset,
    n_experiences: int | None,
    classes_per_experience: int | Sequence[int] | None,
    class_order: Sequence[int] | None,
    seed: int | None,
    name: str,
    class_names: Sequence[str] | None,
    kind: str,
) -> Stream:
    train_t, test_t = targets_of(train), targets_of(test)
    if len(train_t) == 0:
        raise DataError(f"{name}: the training set is empty")
    _check_test_classes(train_t, test_t)
    order = resolve_class_order(train_t.unique().tolist(), class_order, seed)
    sizes = experience_sizes(len(order), n_experiences, classes_per_experience)
    experiences = []
    start = 0
    for i, size in enumerate(sizes):
        classes = order[start : start + size]
        start += size
        cls = torch.tensor(classes)
        test_idx = torch.isin(test_t, cls).nonzero().flatten()
        if len(test_idx) == 0:
            raise DataError(f"{name}: experience {i} (classes {classes}) has no test items")
        experiences.append(
            Experience(
                id=i,
                train=subset(train, torch.isin(train_t, cls).nonzero().flatten()),
                test=subset(test, test_idx),
                classes=classes,
                task_label=i if kind == "task" else 0,
            )
        )
    info = {"class_order": order, "seed": seed}
    return Stream(experiences, kind=kind, name=name, class_names=class_names, info=info)


def class_incremental(
    train: Dataset,
    test: Dataset,
    n_experiences: int | None = None,
    classes_per_experience: int | list[int] | None = None,
    class_order: list[int] | None = None,
    seed: int | None = 0,
    name: str = "class_incremental",
    class_names: Sequence[str] | None = None,
) -> Stream:
    """Class-incremental stream: disjoint groups of classes, in ``class_order`` (else seeded random).

    Give ``n_experiences`` (must divide the class count) or ``classes_per_experience`` (an int
    divisor, or a list of sizes summing to the class count for uneven splits).
    """
    return _split_by_class(
        train, test, n_experiences, classes_per_experience, class_order, seed, name, class_names, "class"
    )


def task_incremental(
    train: Dataset,
    test: Dataset,
    n_experiences: int | None = None,
    classes_per_experience: int | list[int] | None = None,
    class_order: list[int] | None = None,
    seed: int | None = 0,
    name: str = "task_incremental",
    class_names: Sequence[str] | None = None,
) -> Stream:
    """Like ``class_incremental`` but ``task_label`` = experience id, known at test time.

    Targets stay global class ids; a multi-head model maps them to its head itself.
    """
    return _split_by_class(
        train, test, n_experiences, classes_per_experience, class_order, seed, name, class_names, "task"
    )


def domain_incremental(
    domains: Sequence[tuple[str, Dataset, Dataset]],
    name: str = "domain_incremental",
    class_names: Sequence[str] | None = None,
    info: dict | None = None,
) -> Stream:
    """Domain-incremental stream: one experience per ``(domain, train, test)``, same label space.

    A domain name may repeat (the same distribution seen again). ``info``: what describes the stream (``Stream.info``).
    """
    if not domains:
        raise ConfigError(f"{name}: give at least one (domain, train, test) triple")
    experiences = []
    for i, (domain, train, test) in enumerate(domains):
        train_t, test_t = targets_of(train), targets_of(test)
        if len(train_t) == 0:
            raise DataError(f"{name}: domain {domain!r} (experience {i}) has no training items")
        if len(test_t) == 0:
            raise DataError(f"{name}: domain {domain!r} (experience {i}) has no test items")
        _check_test_classes(train_t, test_t, f" of domain {domain!r}")
        experiences.append(
            Experience(id=i, train=train, test=test, classes=sorted(train_t.unique().tolist()), domain=domain)
        )
    return Stream(experiences, kind="domain", name=name, class_names=class_names, info=dict(info or {}))
