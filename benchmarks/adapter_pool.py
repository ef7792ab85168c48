"""Where a mixture's time goes: one ``AdapterPool`` forward vs the block it adapts, as K grows.

``AdapterPool.forward`` runs its K bottleneck adapters one by one, each making full-size temporaries
(delta, delta * w, running sum). For reference the same mixture is also computed with the K adapters
stacked into one down and one up projection (``sum_k w_k up_k(relu(down_k x)) = Up_all (w * relu(Down_all x))
+ w @ b_up``), which is what a fused implementation would cost. The inputs are the real inputs of the
first adapted block (third from last) of each backbone.

    python -m benchmarks.adapter_pool [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import cli, median, timeit
from benchmarks.mixture_inference import randomise
from cl.adapters import AdapterConfig, AdapterPool, inject
from cl.backbones import create_backbone


def stacked(pool: AdapterPool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pool's mixture with its adapters stacked into two projections (reference formulation)."""
    ex = list(pool.adapters.values())
    token = pool.shape.kind == "token"
    wd = torch.cat([a.down.weight for a in ex])
    bd = torch.cat([a.down.bias for a in ex])
    wu = torch.cat([a.up.weight for a in ex], 1)
    bu = torch.stack([a.up.bias for a in ex])
    width = wd.shape[0] // len(ex)
    stride = pool.shape.stride

    def forward(x: torch.Tensor) -> torch.Tensor:
        routed = pool.router is not None and len(pool) > 1
        w = pool.mixture(pool.pool_input(x) if routed else None, x.shape[0])
        h = F.relu(F.linear(x, wd, bd) if token else F.conv2d(x, wd, bd, stride))
        if w is None:
            w = x.new_ones(x.shape[0], len(ex))
        scale = w.repeat_interleave(width, 1)
        h = h * (scale[:, None, :] if token else scale[:, :, None, None])
        out = F.linear(h, wu) if token else F.conv2d(h, wu)
        bias = w @ bu
        return out + (bias[:, None, :] if token else bias[:, :, None, None])

    return forward


def run(quick: bool = False) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    setups = [
        ("vit-b/16 224px (random init)", "vit_base_patch16_224", {}, 4 if quick else 32),
        ("effnet-lite0 64px", "efficientnet_lite0", {"weights": "imagenet", "img_size": 64}, 16 if quick else 256),
    ]
    ks = [1, 5] if quick else [1, 2, 5, 10, 20]
    repeats = 2 if quick else 7
    rows = []
    for name, backbone, params, batch in setups:
        bb = create_backbone(backbone, **params).eval()
        c, h, w = bb.data_config.input_size
        first = bb.num_blocks - 3
        (pool,) = inject(bb, AdapterConfig(kind="bottleneck", layers=[first], router="softmax")).values()
        block = bb.blocks[first].block
        with torch.no_grad():
            img = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8, generator=gen)
            x = bb.forward_until(bb.prepare(img, "cpu"), first)
            y = block(x)
            t_block = median(timeit(partial(block, x), 1, repeats))
            for k in ks:
                while len(pool) < k:
                    pool.add(f"a{len(pool)}")
                randomise(pool, gen)
                fused = stacked(pool)
                diff = float((fused(x) - pool(x, y)).abs().max() / pool(x, y).abs().max())
                t_pool = median(timeit(partial(pool, x, y), 1, repeats))
                t_fused = median(timeit(partial(fused, x), 1, repeats))
                rows.append({
                    "setup": name, "batch": batch, "input": "x".join(map(str, x.shape[1:])), "K": k,
                    "block ms": 1e3 * t_block, "pool ms": 1e3 * t_pool, "pool % of block": 100 * t_pool / t_block,
                    "stacked ms": 1e3 * t_fused, "pool / stacked": t_pool / t_fused, "max rel diff": diff,
                })
                print(f"  {name} K={k}: pool {1e3 * t_pool:.1f} ms, stacked {1e3 * t_fused:.1f} ms", flush=True)
        del bb
    return {
        "rows": rows,
        "notes": [
            "block ms: the wrapped backbone block alone; pool ms: AdapterPool.forward (softmax router, K bottleneck "
            "adapters with random weights); stacked ms: the same mixture as two stacked projections (reference, "
            "not library code); medians under torch.no_grad()",
            f"torch threads {torch.get_num_threads()}",
        ],
    }


COLUMNS = ["setup", "batch", "input", "K", "block ms", "pool ms", "pool % of block", "stacked ms", "pool / stacked",
           "max rel diff"]


def main(argv: list[str] | None = None) -> None:
    cli("adapter_pool", run, COLUMNS, argv)


if __name__ == "__main__":
    main()
