"""Dataset types and batch iteration shared by scenarios, strategies and the engine.

An item is ``(input, target)``: an image tensor (``uint8`` or float, ``[C, H, W]``) or a string.
Preprocessing to the backbone's input (resize, normalise, tokenise) happens per batch in
``Backbone.prepare``, so datasets stay small (FashionMNIST stays ``uint8`` 28x28).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from cl.errors import DataError

Inputs = torch.Tensor | list[str]
Index = Sequence[int] | np.ndarray | torch.Tensor


class ArrayDataset(Dataset):
    """In-memory inputs (a tensor or numpy array ``[N, ...]``, or a list of ``N`` strings) with integer targets.

    Images are ``[N, C, H, W]``: uint8 (0-255) or float in [0, 1]. ``value_range=(lo, hi)`` declares another scale
    (float images of 0-16, 16-bit integers of 0-65535): the inputs are stored as float32 ``(x - lo) / (hi - lo)``,
    in [0, 1]; a value outside the declared range raises DataError.

    Indexing with an index array (``subset``) gives a view without copying per item, and
    ``iterate_batches`` slices whole batches instead of collating items one by one.
    """

    def __init__(
        self,
        inputs: Inputs | np.ndarray,
        targets: Sequence[int] | np.ndarray | torch.Tensor,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(np.ascontiguousarray(inputs))
        targets = as_labels(targets)
        if targets.ndim != 1:
            raise DataError(f"targets must be 1-D, got shape {tuple(targets.shape)}")
        if len(inputs) != len(targets):
            raise DataError(f"{len(inputs)} inputs but {len(targets)} targets: they must match")
        if value_range is not None:
            inputs = scale_to_unit(inputs, value_range)
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


#: how far float images may stray outside [0, 1] (resampling overshoot) before they are refused as another scale
FLOAT_TOLERANCE = 0.1


def image_value_problem(images: torch.Tensor) -> str | None:
    """Why the values of an image tensor are not uint8-style 0-255 or float 0-1 (None when they are), with how to
    scale them; an empty tensor is fine."""
    if images.dtype == torch.uint8 or images.numel() == 0:
        return None
    if images.dtype == torch.bool or images.is_complex():
        return f"expected uint8 (0-255) or float (0-1) images, got dtype {images.dtype}"
    lo, hi = (float(v) for v in torch.aminmax(images.detach().reshape(-1).float()))
    if not images.is_floating_point():
        if lo >= 0 and hi <= 255:
            return None
        return (f"integer images must lie in 0-255, got values from {lo:g} to {hi:g}: scale them to 0-255 first, or "
                f"store them with ArrayDataset(images, targets, value_range=({min(lo, 0):g}, {hi:g})), which scales "
                "them to 0-1 (docs/your-data.md)")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "float images hold NaN or inf values"
    if lo >= -FLOAT_TOLERANCE and hi <= 1 + FLOAT_TOLERANCE:
        return None
    if lo < -FLOAT_TOLERANCE:
        return (f"float images must lie in [0, 1], got values from {lo:.3g} to {hi:.3g}: they look normalised "
                "already; pass them unnormalised (in [0, 1], or uint8 0-255): the backbone normalises with its own "
                "mean and std")
    return (f"float images must lie in [0, 1], got values from {lo:.3g} to {hi:.3g}: divide them by their largest "
            f"possible value (images / 255 for 8-bit data; images / {hi:g} if {hi:g} is it), or store them with "
            f"ArrayDataset(images, targets, value_range=(0, {hi:g})), which scales them to [0, 1] "
            "(docs/your-data.md)")


def scale_to_unit(inputs: Any, value_range: tuple[float, float]) -> torch.Tensor:
    """A numeric tensor whose values lie in ``value_range = (lo, hi)``, as float32 ``(x - lo) / (hi - lo)``."""
    if not isinstance(inputs, torch.Tensor) or inputs.dtype == torch.bool or inputs.is_complex():
        raise DataError(f"value_range scales numeric tensors or arrays, got {type(inputs).__name__}"
                        + (f" of dtype {inputs.dtype}" if isinstance(inputs, torch.Tensor) else ""))
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise DataError(f"value_range must be (lowest, highest), got {value_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise DataError(f"value_range must be (lowest, highest) with lowest < highest, got {value_range!r}")
    x = inputs.float()
    if x.numel():
        got_lo, got_hi = (float(v) for v in torch.aminmax(x.reshape(-1)))
        if got_lo < lo or got_hi > hi:
            raise DataError(f"value_range=({lo:g}, {hi:g}) but the inputs hold values from {got_lo:g} to "
                            f"{got_hi:g}: give the range the data can take")
    return (x - lo) / (hi - lo)


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


def take_batch(dataset: Dataset, index: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
    """The items of ``dataset`` at ``index`` (a long tensor) as one batch ``(inputs, targets)``: sliced from an
    ``ArrayDataset``, else read item by item and collated (as ``iterate_batches``)."""
    if isinstance(dataset, ArrayDataset):
        return dataset.take(index)
    return _collate([dataset[int(i)] for i in index])


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
