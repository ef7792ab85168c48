from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from cl.data import iterate_batches, targets_of
from cl.errors import DataError
from scenarios.sources.image_folder import ImageFolderDataset, from_torchvision, to_uint8_image


def make_folder(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/<i>.png`` with images of varied sizes and modes; class c is filled with value 40*c."""
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            mode = ("RGB", "L", "RGBA")[i % 3]
            size = (10 + i, 7 + 2 * i)
            fill = 40 * c if mode == "L" else (40 * c,) * len(mode)
            Image.new(mode, size, fill).save(root / name / f"{i}.png")
    return root


def test_image_folder_items_and_targets(tmp_path):
    root = make_folder(tmp_path / "train", {"cat": 3, "dog": 2, "eel": 3})
    (root / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, size=12)
    assert ds.classes == ["cat", "dog", "eel"] and len(ds) == 8
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    x, y = ds[4]
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8 and y == 1
    assert int(x.float().mean().round()) == 40
    xb, yb = next(iterate_batches(ds, batch_size=8))
    assert xb.shape == (8, 3, 12, 12) and torch.equal(yb, ds.targets)
    assert ImageFolderDataset(root)[1][0].shape == (3, 8 + 1, 11)  # original size: H=7+2, W=10+1


def test_test_folder_shares_class_ids(tmp_path):
    train = ImageFolderDataset(make_folder(tmp_path / "train", {"a": 1, "b": 1, "c": 1}), size=8)
    test = ImageFolderDataset(make_folder(tmp_path / "test", {"c": 2}), size=8, classes=train.classes)
    assert test.targets.tolist() == [2, 2]
    with pytest.raises(DataError, match=r"subfolders \['z'\] not among the classes"):
        ImageFolderDataset(make_folder(tmp_path / "odd", {"z": 1}), classes=train.classes)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "empty")
    root = make_folder(tmp_path / "partial", {"a": 1})
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"class folders \['b'\] hold no"):
        ImageFolderDataset(root)
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image"):
        ImageFolderDataset(root)[1]


def test_to_uint8_image_conversions():
    assert to_uint8_image(Image.new("L", (5, 4), 7)).shape == (1, 4, 5)
    assert to_uint8_image(Image.new("RGBA", (5, 4))).shape == (3, 4, 5)
    assert to_uint8_image(np.zeros((4, 5, 3), dtype=np.uint8)).shape == (3, 4, 5)
    x = to_uint8_image(torch.full((3, 4, 4), 0.5))
    assert x.dtype == torch.uint8 and int(x[0, 0, 0]) == 128
    assert to_uint8_image(torch.zeros(6, 6, dtype=torch.uint8), size=3).shape == (1, 3, 3)
    assert to_uint8_image(Image.new("RGB", (9, 9)), size=4).shape == (3, 4, 4)
    with pytest.raises(DataError):
        to_uint8_image("not an image")
    assert int(to_uint8_image(np.full((2, 2), 200, dtype=np.int64))[0, 0, 0]) == 200  # any integer dtype of 0-255


def test_to_uint8_image_refuses_another_scale_instead_of_saturating_or_wrapping():
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\], got values from 200 to 200"):
        to_uint8_image(torch.full((3, 4, 4), 200.0))  # was clamped to 255: a white image
    with pytest.raises(DataError, match=r"integer images must lie in 0-255, got values from 300 to 300"):
        to_uint8_image(np.full((4, 4), 300, dtype=np.int32))  # was wrapped to 44


class FakeVision(Dataset):
    """torchvision-like: PIL items, optional ``targets`` and ``classes`` attributes."""

    def __init__(self, with_targets: bool) -> None:
        self.labels = [0, 1, 2, 1]
        if with_targets:
            self.targets = list(self.labels)
            self.classes = ["x", "y", "z"]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.new("L", (6, 6), 10 * i), self.labels[i]


@pytest.mark.parametrize("with_targets", [True, False])
def test_from_torchvision(with_targets):
    ds = from_torchvision(FakeVision(with_targets))
    assert targets_of(ds).tolist() == [0, 1, 2, 1]
    assert ds.classes == (["x", "y", "z"] if with_targets else None)
    x, y = ds[2]
    assert x.shape == (1, 6, 6) and x.dtype == torch.uint8 and int(x[0, 0, 0]) == 20 and y == 2
    assert from_torchvision(FakeVision(with_targets), size=3)[0][0].shape == (1, 3, 3)
