"""Frozen forward of EfficientNet-Lite0 with BatchNorm folded into the convolutions (``cl.backbones.fold``) or not.

The frozen backbone (ImageNet weights, eval mode, no gradients) embeds batches of random images through
``forward_features``: once as clagent runs it (through ``prefix_runner`` and ``suffix_runner``: BatchNorm folded),
once with every BatchNorm run as a norm (the stem, blocks and pool of the backbone itself called directly). The two
alternate, ``repeats`` times; reported: median images/s of each and their ratio, with the largest difference of the
embeddings.

    python -m benchmarks.fold [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks._common import cli, median
from cl.backbones import create_backbone


def measure(img_size: int, batch: int, repeats: int) -> dict[str, Any]:
    backbone = create_backbone("efficientnet_lite0", weights="imagenet", img_size=img_size)
    backbone.requires_grad_(False).eval()
    with torch.inference_mode():
        return _measure(backbone, img_size, batch, repeats)


def _measure(backbone: Any, img_size: int, batch: int, repeats: int) -> dict[str, Any]:
    x = backbone.prepare(torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8))
    def unfolded(v: torch.Tensor) -> torch.Tensor:  # the backbone's own modules, every norm a norm
        state = backbone.forward_stem(v)
        for block in backbone.blocks:
            state = block(state)
        return backbone.forward_pool(state)

    runs = {"folded": backbone.forward_features, "unfolded": unfolded}
    diff = float((runs["folded"](x) - runs["unfolded"](x)).abs().max())  # also the warm-up (and the fold)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    speed = {k: batch / median(v) for k, v in times.items()}
    return {"img_size": img_size, "batch": batch, "unfolded img/s": round(speed["unfolded"], 1),
            "folded img/s": round(speed["folded"], 1), "speed-up": round(speed["folded"] / speed["unfolded"], 2),
            "max |diff|": f"{diff:.1e}"}


def run(quick: bool = False) -> dict[str, Any]:
    cases = [(32, 8, 2)] if quick else [(64, 1, 30), (64, 256, 5), (224, 1, 10), (224, 64, 3)]
    rows = [measure(size, batch, repeats) for size, batch, repeats in cases]
    return {"rows": rows, "notes": ["EfficientNet-Lite0, ImageNet weights, frozen; embedding of the whole model"]}


def main(argv: list[str] | None = None) -> None:
    cli("fold", run, ["img_size", "batch", "unfolded img/s", "folded img/s", "speed-up", "max |diff|"], argv)


if __name__ == "__main__":
    main()
