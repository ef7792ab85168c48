"""Training throughput of one experience with and without the prefix cache.

For each case an ``Agent`` learns the first Split-FashionMNIST experience twice, with
``cache_prefix=True`` and ``False`` (fresh agent, same seed, same shuffles). A callback times every
epoch (``before_epoch`` -> ``after_epoch``); with the cache on, the cache is filled before ``learn``
(timed on its own as the one-off cost), so every timed epoch reads cached states. Reported: median
images/s over the epochs, the speed-up of a cached epoch, and after how many epochs the fill pays off.

    python -m benchmarks.prefix_cache [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks._common import LoadMeter, cli, median
from cl.agent import Agent
from cl.callbacks.base import Callback
from scenarios import create_scenario


class EpochTimer(Callback):
    """Wall time of every training epoch (several ``fit`` calls in one experience are all recorded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def before_epoch(self, agent: Any, exp: Any, epoch: int) -> None:
        self._t0 = time.perf_counter()

    def after_epoch(self, agent: Any, exp: Any, epoch: int, logs: dict[str, float]) -> None:
        self.times.append(time.perf_counter() - self._t0)


@dataclass
class Case:
    name: str
    backbone: str
    strategy: str
    train_per_class: int
    epochs: int
    batch_size: int
    backbone_params: dict[str, Any] = field(default_factory=dict)
    strategy_params: dict[str, Any] = field(default_factory=dict)


def cases(quick: bool) -> list[Case]:
    eff = {"weights": "imagenet", "img_size": 64}
    sema = {"layers": [-3, -2, -1], "descriptor_epochs": 1}
    if quick:
        return [
            Case("effnet-lite0 64px sema", "efficientnet_lite0", "sema", 25, 2, 16, eff, sema),
            Case("effnet-lite0 64px finetune-3", "efficientnet_lite0", "finetune", 25, 2, 16, eff,
                 {"train_blocks": 3}),
            Case("vit-b/16 224px sema (random init)", "vit_base_patch16_224", "sema", 2, 2, 2, {}, sema),
        ]
    return [
        Case("effnet-lite0 64px sema", "efficientnet_lite0", "sema", 1000, 5, 128, eff, sema),
        Case("effnet-lite0 64px finetune-3", "efficientnet_lite0", "finetune", 1000, 5, 128, eff,
             {"train_blocks": 3}),
        Case("vit-b/16 224px sema (random init)", "vit_base_patch16_224", "sema", 32, 3, 16, {}, sema),
    ]


def measure(case: Case, cache: bool, exp: Any) -> dict[str, Any]:
    """Learn ``exp`` once with a fresh agent; epoch times, fill time, whole-``learn`` time."""
    timer = EpochTimer()
    params = {**case.strategy_params, "epochs": case.epochs, "batch_size": case.batch_size, "cache_prefix": cache}
    agent = Agent(
        case.backbone, case.strategy, backbone_params=case.backbone_params, strategy_params=params,
        callbacks=[timer], device="cpu", progress=False, seed=0,
    )
    strat = agent.strategy
    fill_s = cache_mb = None
    if cache:
        t0 = time.perf_counter()
        states = strat.states(exp.train)  # the same dataset object: every epoch then reads these states
        fill_s = time.perf_counter() - t0
        cache_mb = states.nbytes() / 2**20
    t0 = time.perf_counter()
    with LoadMeter() as load:
        agent.learn(exp)
    learn_s = time.perf_counter() - t0
    warm_fill_s = None
    if cache:  # the fill again, now that the process is warm (the first one also pays one-off start-up costs)
        agent.ctx.cache.clear()
        t0 = time.perf_counter()
        strat.states(exp.train)
        warm_fill_s = time.perf_counter() - t0
    return {
        "other_cores": load.other_cores, "warm_fill_s": warm_fill_s,
        "epoch_s": timer.times, "fill_s": fill_s, "learn_s": learn_s, "cache_mb": cache_mb,
        "frozen_depth": strat.frozen_depth, "num_blocks": strat.backbone.num_blocks,
    }


def run(quick: bool = False) -> dict[str, Any]:
    rows, raw = [], []
    streams: dict[int, Any] = {}
    for case in cases(quick):
        if case.train_per_class not in streams:
            streams[case.train_per_class] = create_scenario(
                "split_fmnist", n_experiences=5, train_per_class=case.train_per_class, test_per_class=4
            )
        exp = streams[case.train_per_class][0]
        n = len(exp.train)
        on = measure(case, True, exp)
        off = measure(case, False, exp)
        t_on, t_off = median(on["epoch_s"]), median(off["epoch_s"])
        saved = t_off - t_on
        rows.append({
            "case": case.name,
            "images": n,
            "batch": case.batch_size,
            "epochs": case.epochs,
            "frozen blocks": f"{on['frozen_depth']}/{on['num_blocks']}",
            "img/s cached": n / t_on,
            "img/s uncached": n / t_off,
            "speed-up": t_off / t_on,
            "fill s": on["fill_s"],
            "fill s (warm)": on["warm_fill_s"],
            "epochs to amortise": on["fill_s"] / saved if saved > 0 else None,
            "cache MB": on["cache_mb"],
            "learn s cached (+fill)": on["learn_s"] + on["fill_s"],
            "learn s uncached": off["learn_s"],
            "other load": max((m["other_cores"] or 0.0) for m in (on, off)),
        })
        raw.append({"case": case.__dict__, "cached": on, "uncached": off})
        print(f"  {case.name}: cached {n / t_on:.1f} img/s, uncached {n / t_off:.1f} img/s", flush=True)
    return {
        "rows": rows,
        "raw": raw,
        "notes": [
            "epoch = before_epoch -> after_epoch callback (training steps only; SEMA's descriptor training, "
            "head update and evaluation are outside); img/s = train images / median epoch time",
            "fill = Strategy.states(exp.train) (prefix forward of every train image, once), timed before learn "
            "(cold: first prefix pass of the process); fill s (warm) = the same again after learn",
            "learn s = the whole Agent.learn (epochs, SEMA descriptor inputs and training, head update, evaluation "
            "of 8 test items); cached adds the fill",
            "epochs to amortise = fill s / (uncached epoch s - cached epoch s)",
            "other load = CPU cores other processes used during learn (max of the two runs; ~0 = clean)",
            f"torch.use_deterministic_algorithms is on (Agent default); torch threads {torch.get_num_threads()}",
        ],
    }


COLUMNS = ["case", "images", "batch", "epochs", "frozen blocks", "img/s cached", "img/s uncached", "speed-up",
           "fill s", "fill s (warm)", "epochs to amortise", "cache MB", "learn s cached (+fill)", "learn s uncached",
           "other load"]


def main(argv: list[str] | None = None) -> None:
    cli("prefix_cache", run, COLUMNS, argv)


if __name__ == "__main__":
    main()
