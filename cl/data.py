"""Dataset types and batch iteration shared by scenarios, strategies and the engine.

An item is ``(input, target)``: an image tensor (``uint8`` or float, ``[C, H, W]``) or a string.
Preprocessing to the backbone's input (resize, normalise, tokenise) happens per batch in
``Backbone.prepare``, so datasets stay small (FashionMNIST stays ``uint8`` 28x28).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from cl.errors import DataError

Inputs = torch.Tensor | list[str]
Index = Sequence[int] | np.ndarray | torch.Tensor


class ArrayDataset(Dataset):
    """In-memory inputs (a tensor ``[N, ...]`` or a list of ``N`` strings) with integer targets.

    Indexing with an index array (``subset``) gives a view without copying per item, and
    ``iterate_batches`` slices whole batches instead of collating items one by one.
    """

    def __init__(self, inputs: Inputs | np.ndarray, targets: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(np.ascontiguousarray(inputs))
        targets = as_labels(targets)
        if targets.ndim != 1:
            raise DataError(f"targets must be 1-D, got shape {tuple(targets.shape)}")
        if len(inputs) != len(targets):
            raise DataError(f"{len(inputs)} inputs but {len(targets)} targets: they must match")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.inputs[i], int(self.targets[i])

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        """The items at ``index`` (a view for tensors)."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        if isinstance(self.inputs, torch.Tensor):
            inputs: Inputs = self.inputs[idx]
        else:
            inputs = [self.inputs[int(i)] for i in idx]
        return ArrayDataset(inputs, self.targets[idx])

    def take(self, index: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """A batch ``(inputs, targets)`` for an index tensor."""
        if isinstance(self.inputs, torch.Tensor):
            return self.inputs[index], self.targets[index]
        return [self.inputs[int(i)] for i in index], self.targets[index]


def as_labels(targets: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Class ids as a long tensor; fractional, boolean or non-numeric labels raise DataError (no silent rounding)."""
    if isinstance(targets, torch.Tensor):
        if targets.dtype == torch.long:
            return targets
        targets = targets.detach().cpu().numpy()
    try:
        arr = np.asarray(targets)
    except ValueError as e:  # ragged nesting
        raise DataError(f"targets must be a flat list of class ids ({e})") from None
    if arr.size and arr.dtype.kind not in "iuf":
        raise DataError(f"targets must be integer class ids, got dtype {arr.dtype} (map names to ids first)")
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        bad = arr[arr != np.round(arr)][:5].tolist()
        raise DataError(f"targets must be integer class ids, got non-integer values such as {bad}")
    return torch.as_tensor(arr.astype(np.int64, copy=False))


def known_targets(dataset: Dataset | None) -> torch.Tensor | None:
    """The labels of ``dataset`` when it exposes them without loading items (a ``targets`` attribute, or a
    ``ConcatDataset`` of such parts); else None."""
    if isinstance(dataset, ConcatDataset):
        parts = [known_targets(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else torch.cat([torch.empty(0, dtype=torch.long), *parts])
    t = getattr(dataset, "targets", None)
    return None if t is None else as_labels(t)


def targets_of(dataset: Dataset) -> torch.Tensor:
    """Integer targets of a dataset: its ``targets`` attribute, or read item by item."""
    t = known_targets(dataset)
    if t is not None:
        return t
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def subset(dataset: Dataset, index: Index) -> Dataset:
    """The items of ``dataset`` at ``index``; keeps a ``targets`` attribute so ``targets_of`` is fast."""
    idx = np.asarray(index, dtype=np.int64)
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(idx)
    sub = Subset(dataset, idx.tolist())
    sub.targets = targets_of(dataset)[torch.from_numpy(idx)]  # type: ignore[attr-defined]
    return sub


def _collate(items: list[tuple[Any, int]]) -> tuple[Inputs, torch.Tensor]:
    xs, ys = zip(*items, strict=True)
    x0 = xs[0]
    inputs: Inputs = list(xs) if isinstance(x0, str) else torch.stack([torch.as_tensor(x) for x in xs])
    return inputs, torch.tensor(ys, dtype=torch.long)


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """Yield ``(inputs, targets)`` batches; in-memory datasets are sliced, others loaded."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    if isinstance(dataset, ArrayDataset):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            yield dataset.take(order[s : s + batch_size])
        return
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
        num_workers=num_workers, collate_fn=_collate, drop_last=drop_last,
    )
    yield from loader


def num_batches(dataset: Dataset, batch_size: int, drop_last: bool = False) -> int:
    """How many batches ``iterate_batches`` yields."""
    n = len(dataset)
    return n // batch_size if drop_last else -(-n // batch_size)
