"""The paper benchmarks' data on disk (CIFAR-100, CUB-200, ImageNet-R/A, ObjectNet, OmniBenchmark, VTAB), read in
the layouts their public code (PILOT, SEMA, MOS) expects, never downloaded; and PILOT's class order.

PILOT prepares every benchmark but CIFAR-100 as ``ROOT/train/<class>/*`` + ``ROOT/test/<class>/*``; CIFAR-100 is
torchvision's ``cifar-100-python`` pickle folder; CUB-200 may also be the original ``CUB_200_2011`` release.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from cl.data import ArrayDataset, subset
from cl.errors import DataError
from scenarios.sources.image_folder import ImageFolderDataset

PILOT_DATA = "https://github.com/sun-hailong/LAMDA-PILOT#datasets"


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's name, class count, usual folder name and where to get it."""

    name: str
    title: str
    n_classes: int
    folder: str
    source: str


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("cifar100", "CIFAR-100", 100, "cifar-100-python",
                  "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (what torchvision downloads)"),
        Benchmark("cub200", "CUB-200-2011", 200, "cub", f"PILOT's prepared split ({PILOT_DATA}) or the original "
                  "CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/)"),
        Benchmark("imagenet_r", "ImageNet-R", 200, "imagenet-r", f"PILOT's prepared split ({PILOT_DATA})"),
        Benchmark("imagenet_a", "ImageNet-A", 200, "imagenet-a", f"PILOT's prepared split ({PILOT_DATA})"),
        Benchmark("objectnet", "ObjectNet", 200, "objectnet",
                  f"MOS's prepared split (https://github.com/sun-hailong/AAAI25-MOS#dataset, OneDrive; {PILOT_DATA})"),
        Benchmark("omnibenchmark", "OmniBenchmark", 300, "omnibenchmark",
                  f"PILOT's prepared split ({PILOT_DATA})"),
        Benchmark("vtab", "VTAB", 50, "vtab", f"PILOT's prepared split ({PILOT_DATA})"),
    )
}


def _missing(b: Benchmark, root: Path, layout: str) -> DataError:
    return DataError(
        f"{b.name}: no {b.title} at {root.absolute()}: expected {layout}. Get it from {b.source}, unpack it, and point "
        f"scenario.root at it (--set scenario.root=PATH); docs/reproduce.md lists every benchmark's data."
    )


def pilot_class_order(n_classes: int, seed: int | None) -> list[int]:
    """PILOT's class order: ``np.random.seed(seed); np.random.permutation(n)`` (sorted when ``seed`` is None).

    Classes are the sorted class-folder (or label) ids, as torchvision's ``ImageFolder`` numbers them.
    """
    if seed is None:
        return list(range(n_classes))
    return np.random.RandomState(seed).permutation(n_classes).tolist()


def pilot_folders(name: str, root: str | Path) -> tuple[Path, Path]:
    """``(ROOT/train, ROOT/test)`` of a PILOT-prepared benchmark, checked to hold its number of class folders."""
    b = BENCHMARKS[name]
    root = Path(root).expanduser()
    layout = f"ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg with {b.n_classes} class folders (PILOT's layout)"
    train, test = root / "train", root / "test"
    if not (train.is_dir() and test.is_dir()):
        raise _missing(b, root, layout)
    found = sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if found != b.n_classes:
        raise DataError(
            f"{name}: {train} holds {found} class folders, {b.title} has {b.n_classes}: an incomplete or different "
            f"download? Expected {layout}; get it from {b.source}"
        )
    return train, test


def load_cifar100(root: str | Path) -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    """CIFAR-100 from torchvision's ``cifar-100-python`` folder (``train``, ``test``, ``meta`` pickles), no download.

    ``root`` is that folder or its parent. Returns uint8 ``[N, 3, 32, 32]`` train (50k) and test (10k) sets with the
    fine labels (0-99), and the fine class names. The files are pickles: only read copies you trust.
    """
    b = BENCHMARKS["cifar100"]
    root = Path(root).expanduser()
    folder = root if (root / "meta").is_file() else root / b.folder
    files = {k: folder / k for k in ("train", "test", "meta")}
    if not all(f.is_file() for f in files.values()):
        raise _missing(b, root, "ROOT/cifar-100-python/{train,test,meta} (torchvision's CIFAR100 folder) or that "
                       "folder itself")

    def read(path: Path) -> dict:
        try:
            with path.open("rb") as f:
                return pickle.load(f, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise DataError(f"cifar100: cannot read {path} ({e}); re-extract cifar-100-python.tar.gz") from None

    parts = []
    for split in ("train", "test"):
        entry = read(files[split])
        try:
            images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise DataError(f"cifar100: {files[split]} is not a CIFAR-100 batch ({e})") from None
        parts.append(ArrayDataset(images, labels))
    names = list(read(files["meta"]).get("fine_label_names", []))
    if len(names) != b.n_classes:
        raise DataError(f"cifar100: {files['meta']} lists {len(names)} fine label names, expected {b.n_classes}")
    return parts[0], parts[1], names


def _cub_original_root(root: Path) -> Path | None:
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file() and (candidate / "train_test_split.txt").is_file():
            return candidate
    return None


def cub_layout(root: str | Path) -> str | None:
    """``"CUB_200_2011"`` (the original release), ``"pilot"`` (train/test folders) or None (neither) at ``root``."""
    root = Path(root).expanduser()
    if _cub_original_root(root) is not None:
        return "CUB_200_2011"
    return "pilot" if (root / "train").is_dir() else None


def load_cub200(root: str | Path) -> tuple[Dataset, Dataset, list[str]]:
    """CUB-200-2011 as (train, test, class names) at original image sizes, from either layout:

    PILOT's ``ROOT/train/<class>/*`` + ``ROOT/test/<class>/*``, or the original release (``images.txt``,
    ``train_test_split.txt`` and ``images/<class>/*`` in ROOT or ROOT/CUB_200_2011), split by its official file.
    """
    b = BENCHMARKS["cub200"]
    root = Path(root).expanduser()
    original = _cub_original_root(root)
    if original is None:
        if cub_layout(root) is None:
            raise _missing(b, root, "PILOT's ROOT/train/<class>/*.jpg + ROOT/test/<class>/*.jpg, or the original "
                           "CUB_200_2011 folder (images.txt, train_test_split.txt, images/<class>/*.jpg)")
        train_dir, test_dir = pilot_folders("cub200", root)
        train = ImageFolderDataset(train_dir)
        return train, ImageFolderDataset(test_dir, classes=train.classes), train.classes
    images = ImageFolderDataset(original / "images")
    if len(images.classes) != b.n_classes:
        raise DataError(f"cub200: {original / 'images'} holds {len(images.classes)} class folders, expected "
                        f"{b.n_classes}; re-extract CUB_200_2011.tgz")
    position = {p.relative_to(original / "images").as_posix(): i for i, (p, _) in enumerate(images.samples)}
    paths = dict(line.split() for line in (original / "images.txt").read_text().splitlines() if line.strip())
    is_train = dict(line.split() for line in (original / "train_test_split.txt").read_text().splitlines()
                    if line.strip())
    idx: dict[str, list[int]] = {"1": [], "0": []}
    for image_id, rel in paths.items():
        if rel not in position:
            raise DataError(f"cub200: {original / 'images' / rel} is listed in images.txt but missing")
        flag = is_train.get(image_id)
        if flag not in idx:
            raise DataError(f"cub200: image {image_id} has no 0/1 entry in {original / 'train_test_split.txt'}")
        idx[flag].append(position[rel])
    return subset(images, sorted(idx["1"])), subset(images, sorted(idx["0"])), images.classes
