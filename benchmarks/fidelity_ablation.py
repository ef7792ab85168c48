"""Fidelity ablation on Split-FashionMNIST (issue 18, item 1): which component gives how much final accuracy.

Two kinds of rows, both through the library:

- **head rows**: the frozen ImageNet EfficientNet-Lite0's features of the full FashionMNIST (60k/10k), computed
  once by the library (``Backbone.forward_until(x, 16, taps)``: the final embedding and the pooled output of each of
  the 16 blocks, from one pass; kept in ``--cache``), then the library's statistics heads (``cl.heads``: LDA, NCM,
  RanPAC) learn the class-incremental stream experience by experience, exactly as ``simplecil`` does (its
  statistics are sums, so the head's order of updates does not matter). Each row is a feature set (``emb``: the
  1,280-d embedding; ``taps:A-B``: the pooled outputs of blocks A..B) and a head. ``val0`` is the accuracy on a
  held-out 20% of experience 0's training data of the head fitted on the other 80%: the criterion the shrinkage
  was chosen by (never the test set). ``routing`` is the share of test images whose predicted class belongs to
  their own experience after the last one: what routes an adapter-per-experience method by that head.
- **engine rows**: whole runs through ``cl.run.run`` (the path of ``cl run``) of ``examples/split_fmnist_best.yaml``
  with another strategy: what adapters (APER, LAE, SEMA) add in front of the same taps and head.

    python -m benchmarks.fidelity_ablation                    # every row (finished rows are read back, not rerun)
    python -m benchmarks.fidelity_ablation --rows heads       # the head rows only (minutes; the 96 px pass: ~15)
    python -m benchmarks.fidelity_ablation --table            # the table of what --out holds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks._common import RESULTS_DIR, LoadMeter, _self_cpu_s, machine_info, table
from cl.backbones import create_backbone
from cl.data import iterate_batches
from cl.heads import create_head
from cl.metrics import summarize
from scenarios import create_scenario
from scenarios.sources.fashion_mnist import load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS_DIR / "fidelity_ablation"
BEST = ROOT / "examples" / "split_fmnist_best.yaml"

# name -> (features, head, head params, image side); features: "+"-joined parts, "emb" or "taps:A-B"
HEAD_ROWS: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "emb-ncm": ("emb", "ncm", {}, 64),
    "emb-lda": ("emb", "lda", {"shrinkage": 0.01}, 64),
    "emb+taps11-15-lda": ("emb+taps:11-15", "lda", {"shrinkage": 0.01}, 64),
    "emb+taps0-7-lda": ("emb+taps:0-7", "lda", {"shrinkage": 0.01}, 64),
    "emb+taps8-15-lda": ("emb+taps:8-15", "lda", {"shrinkage": 0.01}, 64),
    "taps0-15-lda": ("taps:0-15", "lda", {"shrinkage": 0.01}, 64),
    # sema's default head without its adapters: the prefix's taps (blocks 0-12) with the frozen embedding in the
    # place of the mixture; and the taps its task head routes with
    "emb+taps0-12-lda": ("emb+taps:0-12", "lda", {"shrinkage": 0.01}, 64),
    "taps0-12-lda": ("taps:0-12", "lda", {"shrinkage": 0.01}, 64),
    "emb+taps0-15-lda": ("emb+taps:0-15", "lda", {"shrinkage": 0.01}, 64),
    "emb+taps0-15-lda-0.001": ("emb+taps:0-15", "lda", {"shrinkage": 0.001}, 64),
    "emb+taps0-15-lda-0.1": ("emb+taps:0-15", "lda", {"shrinkage": 0.1}, 64),
    "emb+taps0-15-ncm": ("emb+taps:0-15", "ncm", {}, 64),
    "emb+taps0-15-ranpac": ("emb+taps:0-15", "ranpac", {"proj_dim": 4096}, 64),
    "emb-lda-96px": ("emb", "lda", {"shrinkage": 0.01}, 96),
    "emb+taps0-15-lda-96px": ("emb+taps:0-15", "lda", {"shrinkage": 0.01}, 96),
}
# name -> strategy params in place of split_fmnist_best.yaml's (taps: all and the LDA head unless said)
ENGINE_ROWS: dict[str, dict[str, Any]] = {
    "aper+taps": {"name": "aper", "head": "lda", "taps": "all"},
    "lae+taps": {"name": "lae", "head": "lda", "taps": "all"},
    "sema+taps": {"name": "sema", "head": "lda", "taps": "all"},
}
# item 2, text: split_fortunes (25 categories, 5 experiences; --text-per-class caps it), MiniLM-L6;
# name -> strategy params
TEXT = {"scenario": {"name": "split_fortunes", "n_experiences": 5}, "backbone": {"name": "minilm"},
        "eval": {"batch_size": 256}}
TEXT_ROWS: dict[str, dict[str, Any]] = {
    "text:simplecil-ncm": {"name": "simplecil"},
    "text:simplecil-lda": {"name": "simplecil", "head": "lda"},
    "text:simplecil-lda-taps": {"name": "simplecil", "head": "lda", "taps": "all"},
    # sema's default head on text without its adapters: the taps of the blocks before the adapted ones (0-2 of 6)
    "text:simplecil-lda-taps0-2": {"name": "simplecil", "head": "lda", "taps": [0, 1, 2]},
    "text:aper-lda": {"name": "aper", "head": "lda"},
    "text:aper-lda-taps": {"name": "aper", "head": "lda", "taps": "all"},
    "text:lae-lda": {"name": "lae", "head": "lda"},
    "text:sema": {"name": "sema"},
}


# ---- features ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def features(img: int, cache: Path, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``{split_emb, split_taps, split_y}`` of FashionMNIST's train and test sets (original order), from the library's
    frozen pass; computed once per image side and kept in ``cache``."""
    path = cache / f"fmnist-efficientnet_lite0-imagenet-{img}px.pt"
    if path.exists():
        return torch.load(path)
    bb = create_backbone("efficientnet_lite0", weights="imagenet", img_size=img).eval()
    every = bb.tap_blocks("all")
    train, test, _ = load_fashion_mnist()
    out: dict[str, torch.Tensor] = {}
    for split, data in (("train", train), ("test", test)):
        embs, taps, t0 = [], [], time.perf_counter()
        for x, _ in iterate_batches(data, batch_size):
            state = bb.forward_until(bb.prepare(x, "cpu"), bb.num_blocks, every)
            embs.append(bb.forward_from(state, bb.num_blocks))
            taps.append(state.taps)
        out.update({f"{split}_emb": torch.cat(embs), f"{split}_taps": torch.cat(taps), f"{split}_y": data.targets})
        print(f"{img} px {split}: {len(data)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    out["tap_widths"] = torch.tensor(bb.block_dims())
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return out


def select(feats: dict[str, torch.Tensor], spec: str, split: str) -> torch.Tensor:
    """The columns of a feature set (``emb``, ``taps:A-B``, joined by ``+``) for ``split``."""
    widths = feats["tap_widths"].tolist()
    starts = [sum(widths[:i]) for i in range(len(widths) + 1)]
    parts = []
    for part in spec.split("+"):
        if part == "emb":
            parts.append(feats[f"{split}_emb"])
        elif part.startswith("taps:"):
            a, b = (int(v) for v in part[5:].split("-"))
            parts.append(feats[f"{split}_taps"][:, starts[a] : starts[b + 1]])
        else:
            raise SystemExit(f"unknown feature part {part!r}")
    return torch.cat(parts, 1)


# ---- head rows ----------------------------------------------------------------------------------------------------
def feed(head: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> None:
    for s in range(0, len(y), chunk):
        head.update(z[s : s + chunk], y[s : s + chunk])


def predict(head: torch.nn.Module, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([head(z[s : s + chunk]).argmax(1) for s in range(0, len(z), chunk)])


def head_row(name: str, feats: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    spec, head_name, params, img = HEAD_ROWS[name]
    ztr, zte = select(feats, spec, "train"), select(feats, spec, "test")
    ytr, yte = feats["train_y"], feats["test_y"]
    stream = create_scenario("split_fmnist", seed=seed)
    groups = [torch.tensor(e.classes) for e in stream]
    assert [int(torch.isin(ytr, g).sum()) for g in groups] == [len(e.train) for e in stream]
    t0 = time.perf_counter()
    # the selection criterion: fit on 80% of experience 0's training data, score the other 20%
    first = torch.nonzero(torch.isin(ytr, groups[0])).squeeze(1)
    first = first[torch.randperm(len(first), generator=torch.Generator().manual_seed(123))]
    cut = int(0.8 * len(first))
    head = create_head(head_name, ztr.shape[1], **params)
    feed(head, ztr[first[:cut]], ytr[first[:cut]])
    val0 = float((predict(head, ztr[first[cut:]]) == ytr[first[cut:]]).float().mean())
    # the stream: statistics of each experience's training data, then every seen test set
    head = create_head(head_name, ztr.shape[1], **params)
    rows, seen = [], []
    for i, g in enumerate(groups):
        mine = torch.isin(ytr, g)
        feed(head, ztr[mine], ytr[mine])
        row, hits, n = [], 0, 0
        for h in groups[: i + 1]:
            test = torch.isin(yte, h)
            ok = int((predict(head, zte[test]) == yte[test]).sum())
            row.append(ok / int(test.sum()))
            hits, n = hits + ok, n + int(test.sum())
        rows.append(row)
        seen.append(hits / n)
    pred = predict(head, zte)
    owner = torch.full((10,), -1, dtype=torch.long)
    for i, g in enumerate(groups):
        owner[g] = i
    routing = float((owner[pred] == owner[yte]).float().mean())
    return {"row": name, "kind": "head", "features": spec, "dim": ztr.shape[1], "head": head_name, "head_kw": params,
            "img_size": img, "seed": seed, "val0": round(val0, 4), "routing": round(routing, 4),
            "accuracy_matrix": rows, "accuracy_seen": seen, **summarize(rows, seen),
            "wall_s": round(time.perf_counter() - t0, 1)}


# ---- engine rows --------------------------------------------------------------------------------------------------
def engine_row(
    name: str, seed: int, work: Path, threads: int | None, text_per_class: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A whole run through ``cl.run.run``: ``split_fmnist_best.yaml`` with another strategy, or a text row
    (``text_per_class``: train / test items per category, None: the full stream)."""
    from cl.run import run

    cfg = yaml.safe_load(BEST.read_text())
    if name in TEXT_ROWS:
        cfg = json.loads(json.dumps(TEXT))
        if text_per_class:
            cfg["scenario"].update(train_per_class=text_per_class[0], test_per_class=text_per_class[1])
    cfg.update(seed=seed, out=str(work / f"{name.replace(':', '-')}-s{seed}"), progress=False, loggers=[])
    if threads:
        cfg["threads"] = threads
    cfg["strategy"] = dict(TEXT_ROWS.get(name) or ENGINE_ROWS[name])
    m = run(cfg, overwrite=True)
    keep = ("accuracy_matrix", "accuracy_seen", "final_accuracy", "avg_incremental_accuracy", "avg_forgetting",
            "params_trainable", "wall_time_s", "peak_rss_mb")
    kind = "text" if name in TEXT_ROWS else "engine"
    return {"row": name, "kind": kind, "strategy": cfg["strategy"], "seed": seed, "config": cfg,
            **{k: m.get(k) for k in keep},
            "extra": {k: m[k] for k in ("adapters_per_layer", "params_functional", "cpu_time_s") if k in m}}


# ---- table --------------------------------------------------------------------------------------------------------
def print_table(folder: Path) -> None:
    """One Markdown row per result file: head rows first (by feature set), then engine and text rows."""
    results = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    order = {"head": 0, "engine": 1, "text": 2}
    rows = []
    for r in sorted(results, key=lambda r: (order[r["kind"]], r["row"], r["seed"])):
        what = f"`{r['features']}`, {r['head']} {r['head_kw'] or ''}".strip() if r["kind"] == "head" else r["row"]
        f4 = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        rows.append({"row": what, "px": r.get("img_size", ""), "seed": r["seed"], "final": f4(r["final_accuracy"]),
                     "avg_inc": f4(r["avg_incremental_accuracy"]), "forgetting": f4(r["avg_forgetting"]),
                     "val0": r.get("val0", ""), "routing": r.get("routing", ""),
                     "wall_s": r.get("row_wall_s"), "cpu_s": r.get("row_cpu_s"),
                     "load": r.get("other_processes_cpu_cores")})
    print(table(rows, ["row", "px", "seed", "final", "avg_inc", "forgetting", "val0", "routing", "wall_s", "cpu_s",
                       "load"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["heads", "engine"],
                   help="row names, or 'heads' / 'engine' / 'text' for all of a kind "
                        f"({', '.join([*HEAD_ROWS, *ENGINE_ROWS, *TEXT_ROWS])})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="class orders (one row per seed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", type=Path, default=OUT, help="one JSON per row")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "fidelity_ablation",
                   help="the feature files (0.9 GB per image side) and the engine rows' run directories")
    p.add_argument("--text-per-class", type=int, nargs=2, default=[100, 30], metavar=("TRAIN", "TEST"),
                   help="text rows: train / test items per category (the peers benchmark's subset; 0 0: the full "
                        "stream, about 13,600 texts: hours on 1 thread)")
    p.add_argument("--table", action="store_true", help="print the table of the rows in --out, run nothing")
    args = p.parse_args(argv)
    if args.table:
        print_table(args.out)
        return 0
    names = []
    for r in args.rows:
        groups = {"heads": HEAD_ROWS, "engine": ENGINE_ROWS, "text": TEXT_ROWS}
        names += list(groups[r]) if r in groups else [r]
    every = [*HEAD_ROWS, *ENGINE_ROWS, *TEXT_ROWS]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown rows {unknown} (available: {', '.join(every)})")
    text_per_class = tuple(args.text_per_class) if all(args.text_per_class) else None
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    for name, seed in ((n, s) for n in names for s in args.seeds):
        done = args.out / f"{name.replace(':', '-')}-s{seed}.json"
        if done.exists():
            print(f"== {name}: done, skipped", flush=True)
            continue
        print(f"== {name} seed {seed}", flush=True)
        cpu0, t0 = _self_cpu_s(), time.perf_counter()
        with LoadMeter() as load:
            if name in HEAD_ROWS:
                img = HEAD_ROWS[name][3]
                if img not in loaded:  # one image side in memory at a time (0.9 GB each)
                    loaded = {img: features(img, args.cache)}
                result = head_row(name, loaded[img], seed)
            else:
                result = engine_row(name, seed, args.cache, args.threads, text_per_class)
        cmd = f"python -m benchmarks.fidelity_ablation --rows {name} --seeds {seed}"
        if name in TEXT_ROWS:
            cmd += f" --text-per-class {args.text_per_class[0]} {args.text_per_class[1]}"
        result.update(command=cmd + (f" --threads {args.threads}" if args.threads else ""), machine=machine_info(),
                      row_wall_s=round(time.perf_counter() - t0, 1), row_cpu_s=round(_self_cpu_s() - cpu0, 1),
                      threads=args.threads, other_processes_cpu_cores=load.other_cores)
        done.write_text(json.dumps(result, indent=2) + "\n")
        print(f"== {name}: final {result['final_accuracy']:.4f}, avg inc {result['avg_incremental_accuracy']:.4f} "
              f"(other load {load.other_cores} cores)", flush=True)
    print_table(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
