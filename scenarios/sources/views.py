"""How the papers' pipelines (PILOT, SEMA, MOS) present an image to a 224-px ViT: a fixed evaluation view or a
fresh random view per access.

``ImageView(dataset, 224)`` resizes each image's shorter side to 256 and centre-crops 224 (PILOT's test transform);
``ImageView(dataset, 224, augment=True)`` draws a random-resized crop (scale 0.05-1, ratio 3/4-4/3) and a horizontal
flip on every access (PILOT's train transform) and says so with ``augmented = True``: its items change from one
epoch to the next, so outputs computed from them (the engine's prefix cache) must never be reused.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cl.data import targets_of
from cl.errors import DataError

#: PILOT's random-resized-crop area range and aspect-ratio range
CROP_SCALE = (0.05, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.dtype != torch.uint8:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"expected a uint8 image [C, H, W], got {got}")


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> ``[C, size, size]``: shorter side to ``size * 256 / 224`` (bicubic), centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    _check(x)
    x = F.resize(x, [int(size * 256 / 224)], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(x, [size, size]).contiguous()


def random_resized_crop(x: torch.Tensor, size: int, flip: bool = True) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> ``[C, size, size]``: a random crop (``CROP_SCALE`` of the area, ``CROP_RATIO`` aspect)
    resized bilinearly, flipped left-right half the time; torchvision's sampling, torch's global generator."""
    from torchvision.transforms.v2 import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    _check(x)
    top, left, h, w = RandomResizedCrop.get_params(x, list(CROP_SCALE), list(CROP_RATIO))
    x = F.resized_crop(x, top, left, h, w, [size, size], antialias=True)
    if flip and torch.rand(1).item() < 0.5:
        x = x.flip(-1)
    return x.contiguous()


class ImageView(Dataset):
    """Items of an image dataset (uint8 ``[C, H, W]``, any size) as a ViT at ``size`` px sees them.

    ``augment=False``: ``resize_center_crop`` (the same image every access). ``augment=True``: a new
    ``random_resized_crop`` on every access, drawn from torch's global generator (seeded by the run), and
    ``augmented`` is True so the engine can tell it must recompute every pass.
    """

    def __init__(self, dataset: Dataset, size: int = 224, augment: bool = False) -> None:
        if size < 1:
            raise DataError(f"image size must be >= 1, got {size}")
        self.dataset = dataset
        self.size = size
        self.augmented = bool(augment)
        self.targets = targets_of(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[i]
        view = random_resized_crop(x, self.size) if self.augmented else resize_center_crop(x, self.size)
        return view, int(y)

    def __repr__(self) -> str:
        kind = "random-resized-crop + flip" if self.augmented else "resize + centre crop"
        return f"ImageView({len(self)} items, {self.size} px, {kind})"
