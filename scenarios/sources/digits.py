"""scikit-learn's 8x8 handwritten digits (1797 images, bundled with scikit-learn, no download)."""

from __future__ import annotations

import functools

import numpy as np

from cl.data import ArrayDataset
from cl.errors import ConfigError

CLASS_NAMES = tuple(str(d) for d in range(10))


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]  # values 0-16 -> 0-255
    return images, d.target.astype(np.int64)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    """``(train, test, class_names)``: uint8 images ``[N, 1, 8, 8]``, a stratified split fixed by ``seed``."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    from sklearn.model_selection import train_test_split

    images, targets = _digits_arrays()
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=test_fraction, random_state=seed, stratify=targets
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (
        ArrayDataset(images[train_idx], targets[train_idx]),
        ArrayDataset(images[test_idx], targets[test_idx]),
        list(CLASS_NAMES),
    )
