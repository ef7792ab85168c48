"""Shared fixtures of the scenarios tests: toy datasets and the real-data roots (skip when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cl.data import ArrayDataset

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FORTUNES_ROOT = Path("/usr/share/games/fortunes")


def toy_dataset(n_classes: int, per_class: int, seed: int = 0) -> ArrayDataset:
    """Random uint8 images ``[3, 4, 4]``, ``per_class`` items of each class, classes interleaved."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_classes * per_class, 3, 4, 4), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n_classes).repeat(per_class))


@pytest.fixture
def make_toy():
    """The ``toy_dataset`` factory."""
    return toy_dataset


@pytest.fixture
def toy() -> tuple[ArrayDataset, ArrayDataset]:
    """Six classes: 5 train and 2 test items each."""
    return toy_dataset(6, 5, seed=0), toy_dataset(6, 2, seed=1)


@pytest.fixture
def fmnist_root() -> Path:
    if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"FashionMNIST not at {FMNIST_ROOT} (apt-get install dataset-fashion-mnist)")
    return FMNIST_ROOT


@pytest.fixture
def fortunes_root() -> Path:
    if not (FORTUNES_ROOT / "computers").is_file():
        pytest.skip(f"fortunes not at {FORTUNES_ROOT} (apt-get install fortunes)")
    return FORTUNES_ROOT
