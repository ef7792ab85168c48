"""Inference throughput of a SEMA-style mixture as the number of adapters per layer grows.

A backbone gets bottleneck adapter pools on its last 3 blocks (``cl.adapters.inject``), then
K = 0, 1, 2, 5, 10, 20 adapters per pool (``pool.add``) with random non-zero weights, mixed by a softmax
router or by the hard descriptor router (SEMA's default). Each mixture's ``forward_features`` is timed
under ``torch.no_grad()`` against the plain frozen forward of the same backbone (same weights, same
process, measured before and after the mixtures). Forward hooks on the wrapped blocks count how many
images each block sees per input image (backbone passes per image) and how often the adapters run.

    python -m benchmarks.mixture_inference [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks._common import LoadMeter, cli, median, timeit
from cl.adapters import AdaptedBlock, AdapterConfig, inject
from cl.backbones import Backbone, create_backbone

LAYERS = [-3, -2, -1]
ROUTERS: dict[str, dict[str, Any]] = {
    "softmax": {"router": "softmax"},
    "descriptor (hard)": {"router": "descriptor", "router_kw": {"hard": True}, "descriptor_hidden": 128},
}


@dataclass
class Setup:
    name: str
    backbone: str
    params: dict[str, Any]
    batch: int
    ks: list[int]
    warmup: int
    repeats: int


def setups(quick: bool) -> list[Setup]:
    if quick:
        return [
            Setup("effnet-lite0 64px", "efficientnet_lite0", {"weights": "imagenet", "img_size": 64}, 16,
                  [0, 1, 2], 1, 2),
            Setup("vit-b/16 224px (random init)", "vit_base_patch16_224", {}, 2, [0, 2], 0, 1),
        ]
    return [
        Setup("effnet-lite0 64px", "efficientnet_lite0", {"weights": "imagenet", "img_size": 64}, 256,
              [0, 1, 2, 5, 10, 20], 2, 20),
        Setup("vit-b/16 224px (random init)", "vit_base_patch16_224", {}, 32, [0, 1, 2, 5, 10, 20], 1, 3),
    ]


class PassCounter:
    """Counts the images that go through each (unwrapped) backbone block and the adapter calls."""

    def __init__(self, backbone: Backbone) -> None:
        self.block_images = [0] * backbone.num_blocks
        self.adapter_calls = 0
        self.handles = []
        for i, b in enumerate(backbone.blocks):
            inner = b.block if isinstance(b, AdaptedBlock) else b
            self.handles.append(inner.register_forward_hook(self._block_hook(i)))
            if isinstance(b, AdaptedBlock):
                for a in b.pool.adapters.values():
                    self.handles.append(a.register_forward_hook(self._adapter_hook))

    def _block_hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            self.block_images[i] += args[0].shape[0]

        return hook

    def _adapter_hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.adapter_calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def randomise(pool: Any, generator: torch.Generator) -> None:
    """Random non-zero weights for the pool's adapters and router; descriptors get recorded losses."""
    for p in pool.adapters.parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    if pool.router is not None:
        for p in pool.router.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    if pool.descriptors is not None:
        for d in pool.descriptors.values():
            if int(d.count) == 0:
                d.record(torch.rand(d.recent.numel(), generator=generator))


def forward_fn(backbone: Backbone, x: torch.Tensor) -> Callable[[], None]:
    backbone.eval()

    @torch.no_grad()
    def step() -> None:
        backbone.forward_features(x)

    return step


def paired_times(plain: Callable[[], None], mixture: Callable[[], None], warmup: int, repeats: int):
    """Alternate plain and mixture calls (after ``warmup`` untimed calls of each), so that slow drift of the
    machine's speed hits both alike; returns (plain times, mixture times)."""
    timeit(plain, warmup, 0)
    timeit(mixture, warmup, 0)
    tp: list[float] = []
    tm: list[float] = []
    for _ in range(repeats):
        tp += timeit(plain, 0, 1)
        tm += timeit(mixture, 0, 1)
    return tp, tm


def count_passes(backbone: Backbone, x: torch.Tensor) -> tuple[float, float, int, torch.Tensor]:
    """(min, max) backbone passes per image over the blocks, adapter calls per batch, and the features."""
    counter = PassCounter(backbone)
    try:
        with torch.no_grad():
            out = backbone.forward_features(x)
    finally:
        counter.remove()
    per_image = [n / x.shape[0] for n in counter.block_images]
    return min(per_image), max(per_image), counter.adapter_calls, out


def run(quick: bool = False) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for s in setups(quick):
        plain = create_backbone(s.backbone, **s.params).eval()
        c, h, w = plain.data_config.input_size
        x = plain.prepare(torch.randint(0, 256, (s.batch, c, h, w), dtype=torch.uint8, generator=gen), "cpu")
        run_plain = forward_fn(plain, x)
        lo, hi, _, ref = count_passes(plain, x)
        all_plain: list[float] = []
        mixtures: list[dict[str, Any]] = []
        for router, kw in ROUTERS.items():
            bb = copy.deepcopy(plain)
            pools = inject(bb, AdapterConfig(kind="bottleneck", layers=LAYERS, **kw))
            for k in s.ks:
                for pool in pools.values():
                    while len(pool) < k:
                        pool.add(f"a{len(pool)}")
                    randomise(pool, gen)
                with LoadMeter() as load:
                    tp, tm = paired_times(run_plain, forward_fn(bb, x), s.warmup, s.repeats)
                all_plain += tp
                p_lo, p_hi, calls, out = count_passes(bb, x)
                change = float((out - ref).norm() / ref.norm())  # > 0: the adapters really compute
                mixtures.append({"router": router, "K": k, "plain_s": tp, "mixture_s": tm, "passes": (p_lo, p_hi),
                                 "adapter_calls": calls, "change": change, "other": load.other_cores})
                print(f"  {s.name} {router} K={k}: {s.batch / median(tm):.1f} img/s "
                      f"(plain {s.batch / median(tp):.1f})", flush=True)
            del bb
        t_plain = median(all_plain)
        rows.append({"setup": s.name, "batch": s.batch, "router": "plain (no adapters)", "K": None,
                     "img/s": s.batch / t_plain, "ms/batch": 1e3 * t_plain, "ratio to plain": 1.0,
                     "passes/image": _passes(lo, hi), "adapter calls/batch": 0,
                     "other load": max((m["other"] or 0.0) for m in mixtures)})
        raw += [{"setup": s.name, **{k: m[k] for k in ("router", "K", "plain_s", "mixture_s")}} for m in mixtures]
        for m in mixtures:
            t = median(m["mixture_s"])
            rows.append({"setup": s.name, "batch": s.batch, "router": m["router"], "K": m["K"],
                         "img/s": s.batch / t, "ms/batch": 1e3 * t, "ratio to plain": median(m["plain_s"]) / t,
                         "passes/image": _passes(*m["passes"]), "adapter calls/batch": m["adapter_calls"],
                         "feature change": m["change"], "other load": m["other"]})
        del plain
    return {
        "rows": rows,
        "raw": raw,
        "notes": [
            f"adapters: bottleneck on blocks {LAYERS}, K per block, random non-zero weights; timed: "
            "backbone.forward_features on a prepared batch under torch.no_grad(), median of repeats after warm-up",
            "each mixture row is timed alternating with the plain backbone (same weights, same process); "
            "ratio to plain = median plain time of those pairs / median mixture time (1.0 = no cost); "
            "the plain row is the median over all pairs",
            "passes/image: images through every backbone block / batch size (min = max = 1 means one pass)",
            "feature change = ||mixture features - plain features|| / ||plain features|| (> 0: adapters act)",
            "other load = CPU cores other processes used while that row was timed (~0 = clean)",
            f"torch threads {torch.get_num_threads()}",
        ],
    }


def _passes(lo: float, hi: float) -> str:
    return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"


COLUMNS = ["setup", "batch", "router", "K", "img/s", "ms/batch", "ratio to plain", "passes/image",
           "adapter calls/batch", "feature change", "other load"]


def main(argv: list[str] | None = None) -> None:
    cli("mixture_inference", run, COLUMNS, argv)


if __name__ == "__main__":
    main()
