"""Image datasets read lazily from disk (class-per-subfolder) or wrapped from torchvision."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cl.data import image_value_problem, targets_of
from cl.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def to_uint8_image(x: Any, size: int | None = None) -> torch.Tensor:
    """A PIL image, array or tensor -> uint8 tensor ``[C, H, W]``, resized to ``size`` x ``size`` if given.

    PIL images and arrays are read as ``[H, W]`` or ``[H, W, C]``; tensors as ``[H, W]`` or
    ``[C, H, W]``; float values must lie in ``[0, 1]`` and integer ones in 0-255 (else DataError, which says how
    to scale them).
    """
    from PIL import Image

    if isinstance(x, Image.Image):
        if x.mode not in ("L", "RGB"):
            x = x.convert("RGB")
        if size is not None and x.size != (size, size):
            x = x.resize((size, size), Image.BILINEAR)
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x))
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    elif isinstance(x, torch.Tensor):
        t = x[None] if x.ndim == 2 else x
    else:
        raise DataError(f"cannot read an image from a {type(x).__name__}")
    if t.ndim != 3:
        raise DataError(f"expected an image [C, H, W], got shape {tuple(t.shape)}")
    if (problem := image_value_problem(t)) is not None:
        raise DataError(problem)
    if t.is_floating_point():
        t = (t * 255).round().clamp(0, 255)
    t = t.to(torch.uint8)
    if size is not None and tuple(t.shape[1:]) != (size, size):
        t = torch.nn.functional.interpolate(t[None].float(), (size, size), mode="bilinear", antialias=True)[0]
        t = t.round().clamp(0, 255).to(torch.uint8)
    return t.contiguous()


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files (like torchvision ``ImageFolder``), decoded with PIL on access.

    Items are uint8 RGB tensors ``[3, size, size]`` (original size when ``size`` is None, which
    only stacks into batches if all images share it). Pass ``classes`` (e.g. the train set's)
    so a test folder uses the same class ids; it may lack some of them.
    """

    def __init__(
        self,
        root: str | Path,
        size: int | None = None,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"image folder {self.root} has no class subfolders (expected <root>/<class>/*)")
        if classes is None:
            self.classes = folders
        else:
            self.classes = list(classes)
            unknown = sorted(set(folders) - set(self.classes))
            if unknown:
                raise DataError(f"image folder {self.root} has subfolders {unknown} not among the classes")
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for name in folders:
            files = sorted(p for p in (self.root / name).rglob("*") if p.suffix.lower() in exts)
            if not files:
                empty.append(name)
            label = self.classes.index(name)
            self.samples.extend((p, label) for p in files)
        if empty:
            raise DataError(f"image folder {self.root}: class folders {empty} hold no {'/'.join(exts)} image")
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, target = self.samples[i]
        try:
            with Image.open(path) as img:
                image = to_uint8_image(img.convert("RGB"), self.size)
        except OSError as e:
            raise DataError(f"cannot decode image {path}: {e}") from None
        return image, target


class TorchvisionDataset(Dataset):
    """A torchvision-style dataset (PIL, array or tensor items) whose items become uint8 ``[C, H, W]``."""

    def __init__(self, dataset: Dataset, size: int | None = None) -> None:
        self.dataset = dataset
        self.size = size
        self.targets = targets_of(dataset)
        self.classes = list(getattr(dataset, "classes", [])) or None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, _ = self.dataset[i]
        return to_uint8_image(x, self.size), int(self.targets[i])


def from_torchvision(dataset: Dataset, size: int | None = None) -> TorchvisionDataset:
    """Wrap a torchvision-style dataset (``targets`` attribute used when present) to yield uint8 tensors."""
    return TorchvisionDataset(dataset, size)
