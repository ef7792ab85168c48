"""Inference cost of MOS as the number of tasks T grows, against a single-pass mixture and the plain forward.

For T = 1, 2, 5, 10, 20 tasks (one bottleneck adapter set per task on the last 3 blocks, random non-zero
weights) a prepared batch is classified by:

- ``mos (ours)``: ``strategies.mos.MOS`` — the prefix once (``forward_until``), then ``scores``: frozen suffix
  -> original head -> likely task; that task's adapters (hard routes) -> adapted head; one self-refinement
  step for the inputs whose adapted prediction points to another task (``refine_steps=1``); ensemble.
  Its heads hold random class statistics, so predictions (and refinements) are close to arbitrary: with
  T tasks about 1 - 1/T of the inputs are refined, the worst case of one refinement step.
- ``mos (public-code passes)``: what the public MOS code runs, T + 1 full backbone passes (the frozen model,
  then every task's adapters on every image), with our blocks; a lower bound of its cost, since it also
  re-merges adapters inside every forward.
- ``key_retrieval``: ``strategies.key_retrieval.KeyRetrieval`` — prefix once, frozen suffix, one FAISS search
  over 2 keys per task, the routed adapters, LDA head.
- ``mixture (sema-style)``: T adapters per block mixed by the hard descriptor router in one pass.

Each row is timed alternating with the plain frozen forward of the same backbone (ratio to plain = median
plain time / median time, 1.0 = free). Forward hooks on the backbone's blocks count block executions:
passes/image = block executions per image / blocks (a full forward is 1).

    python -m benchmarks.mos_inference [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks._common import LoadMeter, cli, median
from benchmarks.mixture_inference import PassCounter, forward_fn, paired_times, randomise
from cl.adapters import AdapterConfig, inject
from cl.backbones import Backbone, create_backbone
from cl.experience import Experience
from cl.routing import adapters_off, routing
from strategies.key_retrieval import KeyRetrieval
from strategies.mos import MOS

LAYERS = [-3, -2, -1]
CLASSES_PER_TASK = 2


@dataclass
class Setup:
    name: str
    backbone: str
    params: dict[str, Any]
    batch: int
    tasks: list[int]
    warmup: int
    repeats: int
    public_max_t: int  # the T + 1 pass baseline is timed up to this T (it is (T + 1)x the plain forward)


def setups(quick: bool) -> list[Setup]:
    if quick:
        return [
            Setup("effnet-lite0 64px", "efficientnet_lite0", {"weights": "imagenet", "img_size": 64}, 16, [1, 2],
                  1, 2, 2),
            Setup("vit-b/16 224px (random init)", "vit_base_patch16_224", {}, 2, [1, 2], 0, 1, 1),
        ]
    return [
        Setup("effnet-lite0 64px", "efficientnet_lite0", {"weights": "imagenet", "img_size": 64}, 256,
              [1, 2, 5, 10, 20], 1, 3, 20),
        Setup("vit-b/16 224px (random init)", "vit_base_patch16_224", {}, 4, [1, 2, 5, 10, 20], 1, 2, 5),
    ]


def _tasks(strategy: Any, t: int) -> None:
    """Give ``strategy`` ``t`` experiences' adapters and classes without training (random weights after)."""
    for e in range(t):
        strategy.before_experience(Experience(e, None, None, [CLASSES_PER_TASK * e + c for c in range(2)]))


def _random_stats(dim: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """8 random features around a random mean per class, for heads and keys."""
    n = CLASSES_PER_TASK * t
    y = torch.arange(n).repeat_interleave(8)
    z = torch.randn(n, dim, generator=gen)[y] + 0.5 * torch.randn(len(y), dim, generator=gen)
    return z, y


@torch.no_grad()
def build_mos(plain: Backbone, t: int, gen: torch.Generator) -> MOS:
    s = MOS(copy.deepcopy(plain), layers=LAYERS)
    _tasks(s, t)
    for pool in s.pools.values():
        randomise(pool, gen)
    for head in (s.frozen_head, s.head):
        head.update(*_random_stats(plain.embed_dim, t, gen))
    return s.eval()


@torch.no_grad()
def build_key_retrieval(plain: Backbone, t: int, gen: torch.Generator) -> KeyRetrieval:
    s = KeyRetrieval(copy.deepcopy(plain), layers=LAYERS)
    _tasks(s, t)
    for pool in s.pools.values():
        randomise(pool, gen)
    z, y = _random_stats(plain.embed_dim, t, gen)
    for e in range(t):
        mine = (y // CLASSES_PER_TASK) == e
        s.router.add_keys(z[mine], y[mine], expert=e, experience=e)
    s.head.update(torch.cat([z, z], 1), y)
    return s.eval()


def strategy_fn(strategy: MOS | KeyRetrieval, x: torch.Tensor) -> Callable[[], None]:
    @torch.no_grad()
    def step() -> None:
        strategy.scores(strategy.backbone.forward_until(x, strategy.frozen_depth))

    return step


def public_fn(strategy: MOS, x: torch.Tensor) -> Callable[[], None]:
    """T + 1 full passes: the frozen model, then each task's adapters on every image."""
    bb, pools = strategy.backbone, strategy.pools
    routes = [dict.fromkeys(pools, torch.nn.functional.one_hot(torch.tensor(k), len(strategy.names)).float())
              for k in range(len(strategy.names))]

    @torch.no_grad()
    def step() -> None:
        with adapters_off(pools):
            bb.forward_features(x)
        for r in routes:
            with routing(pools, r):
                bb.forward_features(x)

    return step


def mixture_backbone(plain: Backbone, t: int, gen: torch.Generator) -> Backbone:
    bb = copy.deepcopy(plain)
    pools = inject(bb, AdapterConfig(kind="bottleneck", layers=LAYERS, router="descriptor",
                                     router_kw={"hard": True}, descriptor_hidden=128))
    for pool in pools.values():
        while len(pool) < t:
            pool.add(f"a{len(pool)}")
        randomise(pool, gen)
    return bb.eval()


def passes(backbone: Backbone, fn: Callable[[], None], batch: int) -> float:
    """Block executions per image / blocks, counted by forward hooks over one call of ``fn``."""
    counter = PassCounter(backbone)
    try:
        fn()
    finally:
        counter.remove()
    return sum(counter.block_images) / (batch * backbone.num_blocks)


def run(quick: bool = False) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for s in setups(quick):
        plain = create_backbone(s.backbone, **s.params).eval()
        c, h, w = plain.data_config.input_size
        x = plain.prepare(torch.randint(0, 256, (s.batch, c, h, w), dtype=torch.uint8, generator=gen), "cpu")
        run_plain = forward_fn(plain, x)
        all_plain: list[float] = []
        measured: list[dict[str, Any]] = []
        for t in s.tasks:
            mos = build_mos(plain, t, gen)
            cases: list[tuple[str, Backbone, Callable[[], None], int, int]] = [
                ("mos (ours)", mos.backbone, strategy_fn(mos, x), s.warmup, s.repeats),
            ]
            if t <= s.public_max_t:
                cases.append(("mos (public-code passes)", mos.backbone, public_fn(mos, x), min(s.warmup, 1),
                              s.repeats if t <= 5 else 1))
            kr = build_key_retrieval(plain, t, gen)
            cases.append(("key_retrieval", kr.backbone, strategy_fn(kr, x), s.warmup, s.repeats))
            mix = mixture_backbone(plain, t, gen)
            cases.append(("mixture (sema-style, 1 pass)", mix, forward_fn(mix, x), s.warmup, s.repeats))
            for method, bb, fn, warmup, repeats in cases:
                with LoadMeter() as load:
                    tp, tm = paired_times(run_plain, fn, warmup, repeats)
                all_plain += tp
                mos.passes[-1] = [0, 0]
                p = passes(bb, fn, s.batch)
                extra = {}
                if method == "mos (ours)":
                    extra["refined share"] = mos.passes[-1][1] / mos.passes[-1][0] - 2.0
                    extra["metric passes/image"] = mos.extra_metrics()["backbone_passes_per_image"]
                measured.append({"method": method, "T": t, "plain_s": tp, "s": tm, "passes": p,
                                 "other": load.other_cores, **extra})
                print(f"  {s.name} {method} T={t}: {s.batch / median(tm):.1f} img/s "
                      f"(plain {s.batch / median(tp):.1f}), {p:.2f} passes/image", flush=True)
            del mos, kr, mix
        t_plain = median(all_plain)
        rows.append({"setup": s.name, "batch": s.batch, "method": "plain frozen forward", "T": None,
                     "img/s": s.batch / t_plain, "ms/batch": 1e3 * t_plain, "ratio to plain": 1.0,
                     "passes/image": passes(plain, run_plain, s.batch),
                     "other load": max((m["other"] or 0.0) for m in measured)})
        for m in measured:
            tm = median(m["s"])
            rows.append({"setup": s.name, "batch": s.batch, "method": m["method"], "T": m["T"],
                         "img/s": s.batch / tm, "ms/batch": 1e3 * tm, "ratio to plain": median(m["plain_s"]) / tm,
                         "passes/image": m["passes"], "refined share": m.get("refined share"),
                         "other load": m["other"]})
            raw.append({"setup": s.name, **{k: v for k, v in m.items() if k != "other"}})
        del plain
    return {
        "rows": rows,
        "raw": raw,
        "notes": [
            f"T tasks = T bottleneck adapters on each of blocks {LAYERS} (random non-zero weights); heads hold random "
            "class statistics (2 classes per task), so MOS refines about 1 - 1/T of the inputs: its worst case with "
            "refine_steps=1",
            "timed: from the prepared batch to class scores (strategies: forward_until + scores; others: "
            "backbone.forward_features) under torch.no_grad(), median of repeats after warm-up, each row "
            "alternating with the plain forward (ratio to plain = median plain / median row time)",
            "passes/image = block executions per image / blocks, counted by forward hooks (prefix blocks once for "
            "the strategies, which share the prefix state between their passes)",
            "mos (public-code passes): T + 1 full passes with our blocks and no per-forward re-merging, a lower "
            "bound of the public code's cost; timed up to the T given in the JSON (public_max_t), it is (T + 1)x "
            "the plain forward by construction",
            "refined share = suffix passes per image - 2 (the frozen pass and the first adapter pass)",
            "other load = CPU cores other processes used while that row was timed (~0 = clean)",
            f"torch threads {torch.get_num_threads()}",
        ],
    }


COLUMNS = ["setup", "batch", "method", "T", "img/s", "ms/batch", "ratio to plain", "passes/image", "refined share",
           "other load"]


def main(argv: list[str] | None = None) -> None:
    cli("mos_inference", run, COLUMNS, argv)


if __name__ == "__main__":
    main()
