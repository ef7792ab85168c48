"""``python -m benchmarks.official``: our ``sema`` and ``mos`` side by side with the official code, in one process.

    python -m benchmarks.official --sema-code PATH --mos-code PATH [--threads 1] [--pairs 3] [--images 32]
        [--epochs 5] [--descriptor-epochs 20] [--tasks 1,5,10,20] [--mos-batch 32] [--cases 1,2,3,4,5]
        [--quick] [--json PATH]

Cases (ViT-B/16, random init on both sides; each alternates the official side (A) and ours (B) in one window,
A B A B ..., ``--pairs`` times after ``--warmup`` untimed calls of each; img/s = images / median seconds):
1. SEMA, a later task's training epoch (one expansion, in block 9), our prefix cache warm;
2. the same epoch as the first of the task: ours fills the prefix cache in it;
3. the whole later task, everything included: official ``incremental_train`` (detection, adapter epochs,
   descriptor epochs, re-detection) + ``after_task``; ours the fill, the scans, the epochs, the descriptors,
   the statistics heads (no warm-up: every call builds a fresh learner after a first task, untimed);
4. SEMA inference after those two tasks: official ``_eval_cnn`` vs ``Agent.predict`` with ``sema``'s defaults;
5. MOS inference with T tasks' adapters: official ``_eval_cnn`` (T + 1 passes) vs our ``mos`` (adapters on all
   12 blocks, as MOS adapts all 12), untrained weights (warm-up at the first T only).
The official checkouts are given by path (see ``benchmarks.official.checkouts``); a side whose checkout is absent
or at another commit is skipped with the reason. Writes ``benchmarks/results/official.json`` (``--quick``: only
with ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS_DIR, LoadMeter, machine_info, median, table
from benchmarks.official import ours
from benchmarks.official.checkouts import MOS_CODE, SEMA_CODE, SHIMS, Checkout, locate, official_code
from benchmarks.official.theirs import DataManager, TheirMOS, TheirSEMA, loader

BACKBONE = "vit_base_patch16_224"  # their builders make ViT-B/16 only (768 wide, 12 blocks hard-coded)
SHAPE = (3, 224, 224)
FULL = {"images": 32, "batch": 32, "epochs": 5, "descriptor_epochs": 20, "setup_images": 4, "mos_batch": 32,
        "tasks": [1, 5, 10, 20], "pairs": 3, "warmup": 1}
QUICK = {"images": 2, "batch": 2, "epochs": 1, "descriptor_epochs": 1, "setup_images": 2, "mos_batch": 2,
         "tasks": [1, 2], "pairs": 1, "warmup": 0}
CASES = {
    1: "SEMA later-task training epoch (ours: prefix cache warm)",
    2: "SEMA first epoch of a later task (ours: + prefix-cache fill)",
    3: "SEMA whole later task, everything included",
    4: "SEMA inference (ours: sema defaults)",
    5: "MOS inference",
}
Trial = Callable[[], dict[str, Any]]


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Trial:
    def trial() -> dict[str, Any]:
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        return {"s": time.perf_counter() - t0}

    return trial


def alternate(theirs: Trial, mine: Trial, pairs: int, warmup: int) -> tuple[list[dict], list[dict], float | None]:
    """A B A B ...: ``warmup`` untimed pairs, then ``pairs`` timed ones; (official runs, our runs, other load)."""
    for _ in range(warmup):
        theirs()
        mine()
    a, b = [], []
    with LoadMeter() as load:
        for i in range(pairs):
            a.append(theirs())
            b.append(mine())
            print(f"    pair {i + 1}/{pairs}: official {a[-1]['s']:.2f} s, ours {b[-1]['s']:.2f} s", flush=True)
    return a, b, load.other_cores


def row(case: int, images: int, batch: int, a: list[dict], b: list[dict], load: float | None,
        **extra: Any) -> dict[str, Any]:
    ta, tb = [r["s"] for r in a], [r["s"] for r in b]
    return {"case": f"{case}. {CASES[case]}", **extra, "images": images, "batch": batch,
            "official img/s": images / median(ta), "ours img/s": images / median(tb),
            "ours/official": median(ta) / median(tb),
            "per-pair ours/official": ", ".join(f"{x / y:.2f}" for x, y in zip(ta, tb, strict=True)),
            "other load": load, "official_s": ta, "ours_s": tb}


def phases(runs: list[dict]) -> dict[str, float]:
    return {k: round(median([r["phases"][k] for r in runs]), 2) for k in runs[0]["phases"]}


def sema_cases(code: Checkout, sizes: ours.Sizes, cases: list[int], pairs: int, warmup: int) -> list[dict]:
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(sizes.seed)
    x0 = ours.random_images(sizes.setup_images, SHAPE, gen)
    x1 = ours.random_images(sizes.images, SHAPE, gen)
    exp1, data1 = ours.experience(1, x1, sizes.classes), DataManager({1: x1}, sizes.classes, 2)
    n, bs = sizes.images, sizes.batch
    with official_code(code):
        theirs = TheirSEMA(sizes)
        if 1 in cases or 2 in cases:
            learner = theirs.after_first_task({0: x0})
            theirs.begin_task(learner, data1)
            agent = ours.sema_after_first_task(BACKBONE, sizes, gen)
            new = ours.sema_begin_task(agent, exp1)  # its scan filled the cache
            for case, fill in ((1, False), (2, True)):
                if case in cases:
                    print(f"  case {case}: {CASES[case]}", flush=True)
                    a, b, load = alternate(timed(theirs.train_epoch, learner),
                                           timed(ours.sema_train_epoch, agent, exp1, new, fill=fill), pairs, warmup)
                    rows.append(row(case, n, bs, a, b, load))
            del learner, agent
        kept: dict[str, Any] = {}
        if 3 in cases:
            print(f"  case 3: {CASES[3]}", flush=True)

            def their_task() -> dict[str, Any]:
                kept.pop("theirs", None)
                learner = theirs.after_first_task({0: x0})
                kept["theirs"] = learner
                return theirs.experience(learner, data1)

            def our_task() -> dict[str, Any]:
                kept.pop("ours", None)
                agent = ours.sema_after_first_task(BACKBONE, sizes, gen)
                kept["ours"] = agent
                return ours.sema_experience(agent, exp1)

            a, b, load = alternate(their_task, our_task, pairs, 0)
            rows.append(row(3, n, bs, a, b, load, phases={"official": phases(a), "ours": phases(b)},
                            adapters_per_layer={"official": a[-1]["adapters_per_layer"],
                                                "ours": b[-1]["adapters_per_layer"]}))
        if 4 in cases:
            print(f"  case 4: {CASES[4]}", flush=True)
            if not kept:  # after a short second task (1 epoch, 1 descriptor epoch): only its structure matters
                short = dataclasses.replace(sizes, epochs=1, descriptor_epochs=1)
                kept["theirs"] = TheirSEMA(short).after_first_task({0: x0})
                theirs.experience(kept["theirs"], data1)
                kept["ours"] = ours.sema_after_first_task(BACKBONE, short, gen)
                ours.sema_experience(kept["ours"], exp1)
            xi = ours.random_images(n, SHAPE, gen)
            a, b, load = alternate(timed(theirs.predict, kept["theirs"], loader(xi, bs)),
                                   timed(ours.sema_predict, kept["ours"], xi, bs), pairs, warmup)
            rows.append(row(4, n, bs, a, b, load))
    return rows


def mos_cases(code: Checkout, sizes: ours.Sizes, tasks: list[int], pairs: int, warmup: int) -> list[dict]:
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(sizes.seed + 1)
    n, bs = sizes.images, sizes.mos_batch
    with official_code(code):
        theirs = TheirMOS(sizes, max(tasks), gen)
        plain = ours.plain_backbone(BACKBONE)
        for i, t in enumerate(sorted(tasks)):
            print(f"  case 5: {CASES[5]}, T = {t}", flush=True)
            theirs.grow(t)
            mine = ours.mos_with_tasks(plain, t, sizes.classes, gen)
            xs = ours.random_images(n, SHAPE, gen)
            a, b, load = alternate(timed(theirs.predict, loader(xs, bs)), timed(ours.mos_predict, mine, xs, bs),
                                   pairs, warmup if i == 0 else 0)
            rows.append(row(5, n, bs, a, b, load, T=t, **{
                "official passes/img": t + 1,
                "ours passes/img": mine.extra_metrics()["backbone_passes_per_image"]}))
            del mine
    return rows


NOTES = [
    "img/s = images / median seconds of the timed call; ours/official = median official s / median ours s; "
    "per-pair ratios are the same per A B pair; other load = CPU cores other processes used meanwhile (~0 = clean)",
    "both sides: random-init ViT-B/16 224 px (theirs: their own ViT built by their builder from a random timm "
    "ViT-B/16; ours: cl.backbones timm_vit vit_base_patch16_224), CPU, the same torch threads, random images "
    "in memory (ours uint8 through Backbone.prepare, theirs pre-normalised float tensors through a DataLoader "
    "without workers); data loading and decoding are not part of either side",
    "SEMA cases: the second task of a stream with 10 classes per task; a first task on a few images (untimed) "
    "puts each side in its later-task state (theirs: adapters in all 12 blocks, descriptors in 9-11; ours: "
    "adapters and descriptors in 9-11, the blocks SEMA expands); exactly one expansion, in block 9, on both "
    "sides (theirs: expansion threshold -1 with blocks 10-11 flagged added_for_task; ours: the OneExpansion "
    "detector), each side still running its own detection/scan",
    "SEMA training settings on both sides: batch, SGD lr 0.005 weight decay 0.0005 (their CIFAR config), "
    "the adapter epochs and descriptor epochs given; their per-epoch test-set evaluation is cut (a stub "
    "switches to eval mode only); ours evaluates nothing either",
    "one process for both sides: our Agent turns on torch.use_deterministic_algorithms (warn_only), which then "
    "holds for the official side too: both run under the same setting (e.g. uninitialised memory filled)",
    "case 3 phases (medians, s): see each row's phases; theirs trains descriptors with full backbone "
    "passes (rd epochs), ours on cached pooled inputs",
    "case 4: after the case-3 task (2 tasks, adapters 2/1/1 in blocks 9/10/11); theirs _eval_cnn (forward, "
    "top-5), ours Agent.predict (sema defaults: one pass, taps route + routed mixture, LDA head)",
    "case 5: untrained adapters with random weights and random class statistics in the heads, so nearly every "
    "input is refined on our side (its worst case, refine_steps=1); passes/img: theirs T + 1 by construction, "
    "ours counted (MOS.extra_metrics)",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.official", description=__doc__.split("\n")[0])
    p.add_argument("--sema-code", default=None, help=f"SEMA-CL checkout (default ${SEMA_CODE.env})")
    p.add_argument("--mos-code", default=None, help=f"AAAI25-MOS checkout (default ${MOS_CODE.env})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, figures meaningless)")
    for name, kind in (("images", int), ("batch", int), ("epochs", int), ("descriptor-epochs", int),
                       ("setup-images", int), ("mos-batch", int), ("pairs", int), ("warmup", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"default {FULL[name.replace('-', '_')]}")
    p.add_argument("--tasks", default=None, help="MOS task counts, comma-separated (default 1,5,10,20)")
    p.add_argument("--cases", default="1,2,3,4,5", help="which cases to run (default all)")
    p.add_argument("--json", type=Path, default=None, help=f"default {RESULTS_DIR / 'official.json'} (not --quick)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    opt = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in preset.items()}
    if args.tasks is not None:
        opt["tasks"] = [int(t) for t in args.tasks.split(",")]
    cases = sorted({int(c) for c in args.cases.split(",")})
    sizes = ours.Sizes(**{k: opt[k] for k in ("images", "batch", "epochs", "descriptor_epochs", "setup_images",
                                              "mos_batch")})
    torch.set_num_threads(args.threads)
    sema, mos = locate(SEMA_CODE, args.sema_code), locate(MOS_CODE, args.mos_code)
    for c in (sema, mos):
        print(c.message, file=sys.stderr if not c.usable or c.message.startswith("WARNING") else sys.stdout)
    skipped = [f"cases {[c for c in cases if c < 5]} skipped: {sema.message}"] if not sema.usable else []
    skipped += [f"case 5 skipped: {mos.message}"] if not mos.usable and 5 in cases else []
    rows: list[dict] = []
    t0 = time.perf_counter()
    with LoadMeter() as load:
        if sema.usable and any(c < 5 for c in cases):
            rows += sema_cases(sema, sizes, cases, opt["pairs"], opt["warmup"])
        if mos.usable and 5 in cases:
            rows += mos_cases(mos, sizes, opt["tasks"], opt["pairs"], opt["warmup"])
    columns = ["case", "T", "images", "batch", "official img/s", "ours img/s", "ours/official",
               "per-pair ours/official", "official passes/img", "ours passes/img", "other load"]
    print(f"# official  ({machine_info()['cpu_model']}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__})")
    print(table(rows, columns) if rows else "(nothing ran)")
    for r in rows:
        if "phases" in r:
            print(f"- case 3 phases, median s: official {r['phases']['official']}; ours {r['phases']['ours']}")
    for s in skipped:
        print(f"- {s}")
    payload = {
        "benchmark": "official",
        "command": "python -m benchmarks.official " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "machine": machine_info(), "threads": torch.get_num_threads(),
        "sizes": dataclasses.asdict(sizes), "tasks": opt["tasks"], "pairs": opt["pairs"], "warmup": opt["warmup"],
        "cases": cases, "checkouts": {"sema": sema.to_dict(), "mos": mos.to_dict()}, "shims": SHIMS,
        "wall_s": round(time.perf_counter() - t0, 1), "other_processes_cpu_cores": load.other_cores,
        "rows": rows, "skipped": skipped, "notes": NOTES,
    }
    if load.other_cores is not None and load.other_cores > 0.1:
        print(f"WARNING: other processes used {load.other_cores} CPU cores on average during the run: "
              "the figures are contended, rerun on a quiet machine", file=sys.stderr)
    out = args.json if args.json is not None or args.quick else RESULTS_DIR / "official.json"
    if out is not None and rows:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0 if rows else 2


if __name__ == "__main__":
    sys.exit(main())
