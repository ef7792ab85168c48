"""What a backbone expects as input (``DataConfig``) and the batched image preprocessing that produces it: dtype,
channels, size, normalisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cl.data import image_value_problem
from cl.errors import DataError


@dataclass(frozen=True)
class DataConfig:
    """What a backbone expects as input; travels with the backbone's registry name."""

    modality: str = "image"  # "image" or "text"
    input_size: tuple[int, int, int] = (3, 224, 224)  # C, H, W (images)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    max_length: int = 128  # tokens (text)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_hint(shape: tuple[int, ...], channels: int = 3) -> str:
    """What an image batch of ``shape`` probably lacks, as a hint (``""`` when nothing obvious): the batch
    dimension of one image ``[C, H, W]``, the channel dimension of grey images ``[B, H, W]``, channels last, alpha."""
    ok = (1, channels)
    if len(shape) == 2:
        return "; one grey image [H, W]? make it [1, 1, H, W] with images[None, None]"
    if len(shape) == 3:
        grey = "the channel dimension with images[:, None] (a batch of grey images [B, H, W])"
        if shape[0] in ok:
            return f"; add the batch dimension with images[None] (one image [C, H, W]), or {grey}"
        if shape[-1] in ok:
            return "; one image with its channels last [H, W, C]? use images.permute(2, 0, 1)[None]"
        return f"; add {grey}"
    if len(shape) == 4 and shape[1] not in ok:
        if shape[-1] in (*ok, 4) and shape[1] > 4:
            return "; channels last [B, H, W, C]? use images.permute(0, 3, 1, 2)"
        if shape[1] == 4:
            return "; drop an alpha channel with images[:, :3]"
    return ""


def prepare_images(
    images: torch.Tensor,
    config: DataConfig,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 or integer (0-255) or float (0-1) ``[B, C, H, W]``, C = 1 or 3, any size -> normalised model input.

    Grayscale is broadcast to the config's channels, the size is matched with bilinear
    interpolation (only when it differs), and the work runs on ``device``. Values outside those ranges (float
    images of 0-255 or 0-16, normalised images, 16-bit integers) raise DataError saying how to scale them.
    """
    channels, height, width = config.input_size
    expected = f"[B, C, H, W] with C = 1 or {channels}"
    if isinstance(images, (list, tuple)) and images and all(isinstance(s, str) for s in images):
        raise DataError(f"an image backbone expected an image tensor {expected}, got a list of strings "
                        "(text needs a text backbone, e.g. minilm)")
    if not isinstance(images, torch.Tensor):
        raise DataError(f"expected an image tensor {expected}, got {type(images).__name__} "
                        "(convert arrays with torch.as_tensor)")
    if images.ndim != 4 or images.shape[1] not in (1, channels):
        hint = shape_hint(tuple(images.shape), channels)
        raise DataError(f"expected images of shape {expected}, got shape {tuple(images.shape)}{hint}")
    if images.shape[-1] == 0 or images.shape[-2] == 0:
        raise DataError(f"expected images of shape {expected} with H, W >= 1, got shape {tuple(images.shape)}")
    if (problem := image_value_problem(images)) is not None:
        raise DataError(problem)
    x = images.to(device, non_blocking=True)
    x = x.float() if x.is_floating_point() else x.float() / 255
    if x.shape[-2:] != (height, width):
        shrink = x.shape[-2] > height or x.shape[-1] > width
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)
    mean = torch.tensor(config.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std  # broadcasting also repeats a single (grayscale) channel
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
