"""The prefix-cache fill (``cl.cache.compute_states``) of the default run: batch size, and batches on threads.

Split-FashionMNIST training images through the frozen, BatchNorm-folded blocks 0-12 of the ImageNet
EfficientNet-Lite0 at 64 px with the taps of those blocks (what ``make run`` caches). Each row fills the same images
with one setting: ``workers`` Python threads running batches at once with one torch thread each
(``cl.cache.map_batches``), or 1 worker with the process's torch threads inside every operator. The rows alternate,
``rounds`` times, in one process; reported: median, min and max seconds, and whether the states equal the first
row's bit for bit.

    python -m benchmarks.fill [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import Subset

from benchmarks._common import cli, median
from cl.backbones import create_backbone
from cl.cache import compute_states


def run(quick: bool = False) -> dict[str, Any]:
    from scenarios.sources.fashion_mnist import load_fashion_mnist

    threads = torch.get_num_threads()
    weights, img_size, depth, images, rounds = ("none", 32, 6, 96, 1) if quick else ("imagenet", 64, 13, 6000, 5)
    backbone = create_backbone("efficientnet_lite0", weights=weights, img_size=img_size)
    backbone.requires_grad_(False).eval()
    train = load_fashion_mnist()[0]
    data = Subset(train, range(images))
    # (batch, workers): the fill before these changes (32, 1), the batch sizes with 1 worker, then threads
    settings = [(32, 1), (64, 1), (128, 1), (256, 1), (64, threads), (32, threads)]
    if threads == 1:
        settings = [s for s in settings if s[1] == 1]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    equal: dict[tuple[int, int], bool] = {}
    first = None
    for _ in range(rounds):
        for batch, workers in settings:
            t0 = time.perf_counter()
            states = compute_states(backbone, data, depth, torch.device("cpu"), batch_size=batch,
                                    taps=list(range(depth)), workers=workers)
            times[(batch, workers)].append(time.perf_counter() - t0)
            if first is None:
                first = states
            equal[(batch, workers)] = bool(torch.equal(states.parts[0], first.parts[0])
                                           and torch.equal(states.taps, first.taps))
    rows = [{"batch": b, "workers": w, "torch threads per batch": 1 if w > 1 else threads,
             "median s": round(median(times[(b, w)]), 2), "min s": round(min(times[(b, w)]), 2),
             "max s": round(max(times[(b, w)]), 2), "img/s": round(images / median(times[(b, w)]), 1),
             "equal to first row": equal[(b, w)]} for b, w in settings]
    return {"rows": rows, "notes": [
        f"{images} Split-FashionMNIST training images, blocks 0-{depth - 1} with taps, {rounds} rounds alternated",
        "workers > 1: cl.cache.map_batches (the default on a CPU with more than one torch thread)"]}


def main(argv: list[str] | None = None) -> None:
    cli("fill", run, ["batch", "workers", "torch threads per batch", "median s", "min s", "max s", "img/s",
                      "equal to first row"], argv)


if __name__ == "__main__":
    main()
