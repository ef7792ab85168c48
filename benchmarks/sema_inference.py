"""What ``sema``'s inference costs against the plain frozen forward, with its defaults and two other settings.

For each backbone and batch size, four agents predict the same random images (``Agent.predict``, the path of
new, uncached inputs): ``plain``, the frozen backbone with a prototype head (``simplecil``: one backbone pass);
``sema`` with its defaults (one pass: the pooled outputs of the frozen blocks before the adapters, ``taps``, pick
each input's experience with an LDA task head and feed the LDA head with the mixture); ``sema frozen routing``
(the earlier defaults: ``route_by="head"``, an LDA head on the frozen embedding picks the experience, so the
adapted blocks run twice, frozen and adapted; the head sees ``[frozen, mixture]``); and ``sema layer routing``
(``route_by="layer"``, ``head_features="mixture"``: each adapted block's descriptors route, the head sees the
mixture alone). Each ``sema`` agent first learns two tasks of a few random images (one epoch, an adapter per
layer per task: 2 adapters in each of the last 3 blocks). The agents are timed in turn, A B C D A B C D ...,
after one untimed call each (15 timed calls each on EfficientNet, 3 on ViT-B/16); figures are median img/s and
the ratio of each ``sema`` to ``plain``.

    python -m benchmarks.sema_inference [--quick] [--threads N] [--json PATH]

Accuracy of the two settings is not measured here (random weights for ViT-B/16): see the README's Speed notes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks._common import LoadMeter, cli, median
from benchmarks.official.ours import experience, learn, random_images
from cl.agent import Agent
from cl.backbones import create_backbone

SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "frozen routing": {"route_by": "head", "head_features": "concat", "taps": None},
    "layer routing": {"route_by": "layer", "head_features": "mixture", "taps": None},
}


def backbones(quick: bool) -> list[tuple[str, str, dict[str, Any], list[int], int]]:
    """``(label, name, params, batch sizes, timed calls per agent)``: EfficientNet's calls take 0.1-0.2 s, so it gets
    15 of them against the host's noise (ViT-B/16's take 8-30 s: 3)."""
    if quick:
        return [("vit-tiny (test)", "vit_tiny_test", {}, [1, 4], 1)]
    return [("EfficientNet-Lite0 64 px", "efficientnet_lite0", {"weights": "imagenet", "img_size": 64}, [1, 64], 15),
            ("ViT-B/16 224 px (random init)", "vit_base_patch16_224", {}, [1, 64], 3)]


def sema_agent(name: str, params: dict[str, Any], setting: dict[str, Any], gen: torch.Generator) -> Agent:
    bb = create_backbone(name, **params)
    agent = Agent(bb, "sema", strategy_params={"epochs": 1, "descriptor_epochs": 1, "batch_size": 8, **setting},
                  device="cpu", progress=False, journal=False, seed=0)
    agent.strategy.always_expand = True  # an adapter per layer per task: the pools the timing sees are fixed
    shape = bb.data_config.input_size
    for task in range(2):
        learn(agent, experience(task, random_images(8, shape, gen), 2))
    agent.strategy.eval()
    return agent


def plain_agent(name: str, params: dict[str, Any], gen: torch.Generator) -> Agent:
    bb = create_backbone(name, **params)
    agent = Agent(bb, "simplecil", device="cpu", progress=False, journal=False, seed=0)
    shape = bb.data_config.input_size
    for task in range(2):
        learn(agent, experience(task, random_images(8, shape, gen), 2))
    return agent


def run(quick: bool = False) -> dict[str, Any]:
    rows = []
    for label, name, params, batches, repeats in backbones(quick):
        gen = torch.Generator().manual_seed(0)
        agents = {"plain": plain_agent(name, params, gen)}
        agents.update({s: sema_agent(name, params, p, gen) for s, p in SETTINGS.items()})
        shape = agents["plain"].strategy.backbone.data_config.input_size
        for batch in batches:
            n = batch if batch > 1 else (4 if quick else 16)
            x = random_images(n, shape, gen)
            times: dict[str, list[float]] = {k: [] for k in agents}
            with torch.no_grad(), LoadMeter() as load:
                for agent in agents.values():  # warm-up
                    agent.predict(x, batch_size=batch)
                for _ in range(repeats):
                    for k, agent in agents.items():
                        t0 = time.perf_counter()
                        agent.predict(x, batch_size=batch)
                        times[k].append(time.perf_counter() - t0)
            plain = median(times["plain"])
            for k, ts in times.items():
                rows.append({"backbone": label, "batch": batch, "agent": k if k == "plain" else f"sema {k}",
                             "img/s": n / median(ts), "time / plain": median(ts) / plain,
                             "runs s": ", ".join(f"{t:.3f}" for t in ts), "other load": load.other_cores})
            print(f"  {label} batch {batch}: " + ", ".join(f"{k} {n / median(ts):.2f} img/s"
                                                           for k, ts in times.items()), flush=True)
    notes = ["'sema defaults': route_by='taps' (the prefix's taps pick the experience) + head over [taps, mixture];"
             " 'sema frozen routing': route_by='head' (a frozen pass picks it) + head over [frozen, mixture];"
             " 'sema layer routing': route_by='layer', head_features='mixture'; plain: simplecil (one frozen pass)"]
    return {"rows": rows, "notes": notes}


def main(argv: list[str] | None = None) -> None:
    cli("sema_inference", run, ["backbone", "batch", "agent", "img/s", "time / plain", "runs s", "other load"], argv)


if __name__ == "__main__":
    main()
