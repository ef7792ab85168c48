"""FashionMNIST from the idx files on disk (Debian ``dataset-fashion-mnist`` or a torchvision root)."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from cl.data import ArrayDataset
from cl.errors import DataError

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "CLAGENT_FMNIST_ROOT"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
INSTALL_HINT = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or pass root= a torchvision FashionMNIST folder"
)


def read_idx(path: str | Path) -> np.ndarray:
    """A (writable) uint8 array from an idx file, gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path} holds {len(data)} bytes, its header says {expected}: truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


@functools.cache
def _load_arrays(root: str) -> dict[str, np.ndarray]:
    base = Path(root)
    arrays = {}
    for key, stem in FILES.items():
        path = _find(base, stem)
        if path is None:
            raise DataError(f"FashionMNIST file {stem}.gz not found under {root}: {INSTALL_HINT}")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"FashionMNIST {split} split under {root}: {n_img} images but {n_lab} labels")
    return arrays


def load_fashion_mnist(root: str | None = None) -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    """``(train, test, class_names)``: uint8 images ``[N, 1, 28, 28]`` (60000 / 10000) and labels 0-9.

    ``root`` is a folder holding the idx files (``.gz`` or not), or a torchvision root with
    ``FashionMNIST/raw``; default ``$CLAGENT_FMNIST_ROOT``, else the Debian path. Parsed arrays
    are cached per process and shared read-only between calls.
    """
    root = str(Path(root or os.environ.get(ROOT_ENV) or DEBIAN_ROOT).expanduser().resolve())
    a = _load_arrays(root)
    train = ArrayDataset(a["train_images"][:, None], a["train_labels"])
    test = ArrayDataset(a["test_images"][:, None], a["test_labels"])
    return train, test, list(CLASS_NAMES)
