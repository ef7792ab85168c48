"""SEMA ablation on Split-FashionMNIST: classifier head x router, and ``adapter_per_task`` vs ``sema``.

A head does not influence training (the adapters and a learned router are trained through SEMA's masked-CE
linear head over the mixture embedding), so each run trains one strategy/router once and scores every head
on the same features after every experience:

- ``linear``: that masked-CE training head over the mixture embedding (the paper's classifier);
- ``ncm`` / ``lda`` / ``ranpac``: statistics heads over ``[frozen, mixture]`` features, updated after each
  experience from its own data only.

The ``lda`` numbers are the strategy's own head, i.e. what ``cl run examples/default.yaml --strategy S
--set strategy.router=R`` reports; the agent's own evaluation is stored beside them (``agent``) as a check.
A run is ``strategy:router[:route_by]``, e.g. ``sema:descriptor``, ``sema:descriptor:task``, ``sema:softmax``,
``sema:topk``, ``adapter_per_task:descriptor``. Each run writes ``RESULTS/<run>.json``; ``--table`` prints
the Markdown table of every run found there.

    python -m benchmarks.sema_ablation --runs sema:descriptor sema:softmax [--threads 1] [--train-per-class N]
    python -m benchmarks.sema_ablation --table
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

from benchmarks._common import RESULTS_DIR, LoadMeter, machine_info, table
from cl.agent import Agent
from cl.heads import Head, create_head
from cl.metrics import summarize
from scenarios import create_scenario

OUT = RESULTS_DIR / "sema_ablation"
HEADS = ["linear", "ncm", "lda", "ranpac"]
ROUTER_PARAMS: dict[str, dict[str, Any]] = {
    "descriptor": {"router": "descriptor"},  # hard routes (SEMA's default here)
    "softmax": {"router": "softmax"},
    "topk": {"router": "topk", "router_kw": {"k": 2}},  # k=1 would pass no gradient to the router
}
BACKBONE = {"weights": "imagenet", "img_size": 64}
#: the settings the ablation's rows were measured with: per-layer routes unless a run names ``route_by``, heads over
#: ``[frozen, mixture]`` (sema's defaults now route and classify with the prefix's taps instead)
ABLATION_BASE: dict[str, Any] = {"route_by": "layer", "head_features": "concat", "taps": None}


def strategy_params(spec: str) -> tuple[str, dict[str, Any]]:
    """``strategy:router[:route_by]`` -> (strategy name, its parameters)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ROUTER_PARAMS:
        raise SystemExit(f"bad run {spec!r}: use strategy:router[:route_by] with router in {list(ROUTER_PARAMS)}")
    params = {**ABLATION_BASE, **ROUTER_PARAMS[parts[1]]}
    if len(parts) == 3:
        params["route_by"] = parts[2]
    return parts[0], params


@torch.no_grad()
def evaluate_heads(agent: Agent, heads: dict[str, Head]) -> dict[str, list[float]]:
    """Accuracy of each head on each seen experience's test set (features computed once per batch)."""
    strat = agent.strategy
    strat.eval()
    d = strat.backbone.embed_dim
    out: dict[str, list[float]] = {name: [] for name in heads}
    for exp in agent.seen:
        ok = dict.fromkeys(heads, 0)
        n = 0
        for state, y in strat.iterate_states(exp.test, agent.ctx.eval_batch_size, desc=f"eval exp {exp.id}"):
            feats = strat.features(state)
            for name, head in heads.items():
                z = feats[:, d:] if name == "linear" else feats
                ok[name] += int((head(z).argmax(1).cpu() == y).sum())
            n += len(y)
        for name in heads:
            out[name].append(ok[name] / n)
    return out


def counts(agent: Agent) -> dict[str, int]:
    """All parameters, and the pools' functional (adapters + routers) and descriptor parameters."""
    extra = agent.strategy.extra_metrics()
    return {"total": agent.strategy.count_params()["params_total"], "functional": extra["params_functional"],
            "descriptors": extra["params_descriptors"]}


def seen_accuracy(row: list[float], sizes: list[int]) -> float:
    """Accuracy over the union of the test sets in ``row`` (weighted by their sizes)."""
    return sum(a * n for a, n in zip(row, sizes, strict=False)) / sum(sizes[: len(row)])


def run_one(spec: str, train_per_class: int | None, seed: int) -> dict[str, Any]:
    name, params = strategy_params(spec)
    scenario = {"n_experiences": 5, "seed": seed}
    if train_per_class:
        scenario["train_per_class"] = train_per_class
    stream = create_scenario("split_fmnist", **scenario)
    agent = Agent("efficientnet_lite0", name, backbone_params=BACKBONE, strategy_params=params, device="cpu",
                  seed=seed, progress=False)
    strat = agent.strategy
    dim = 2 * strat.backbone.embed_dim
    heads: dict[str, Head] = {"linear": strat.train_head, "lda": strat.head}
    heads.update({h: create_head(h, dim).to(agent.device) for h in ("ncm", "ranpac")})
    rows: dict[str, list[list[float]]] = {h: [] for h in [*HEADS, "agent"]}
    added: dict[str, list[int]] = {"total": [], "functional": [], "descriptors": []}
    sizes, t0 = [len(e.test) for e in stream], time.perf_counter()
    for exp in stream:
        before = counts(agent)
        result = agent.learn(exp)
        for k, v in counts(agent).items():
            added[k].append(v - before[k])
        for h in ("ncm", "ranpac"):
            heads[h].add_classes(exp.classes)
            strat.update_statistics(heads[h], exp.train, desc=f"exp {exp.id} {h}")
        for h, accs in evaluate_heads(agent, heads).items():
            rows[h].append(accs)
        rows["agent"].append(result["accuracy"])
        print(f"{spec} exp {exp.id}, accuracy on all seen: "
              + " ".join(f"{h} {100 * seen_accuracy(rows[h][-1], sizes):.1f}" for h in HEADS), flush=True)
    results = {}
    for h, r in rows.items():
        seen = [seen_accuracy(row, sizes) for row in r]
        results[h] = {"accuracy_matrix": r, "accuracy_seen": seen, **summarize(r, seen)}
    return {
        "run": spec, "strategy": name, "strategy_params": params, "scenario": scenario, "backbone": BACKBONE,
        "heads": results, "params_added_per_experience": added,
        "adapters_per_layer": strat.extra_metrics().get("adapters_per_layer"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def print_table(folder: Path) -> None:
    rows = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        for h in HEADS:
            m = r["heads"][h]
            rows.append({
                "run": r["run"], "head": h, "final": round(m["final_accuracy"], 4),
                "avg_inc": round(m["avg_incremental_accuracy"], 4), "forgetting": round(m["avg_forgetting"], 4),
                "functional_added": "/".join(f"{p:,}" for p in r["params_added_per_experience"]["functional"]),
                "descriptors_added": "/".join(f"{p:,}" for p in r["params_added_per_experience"]["descriptors"]),
                "adapters": r["adapters_per_layer"], "wall_s": r["wall_s"],
            })
    print(table(rows, ["run", "head", "final", "avg_inc", "forgetting", "functional_added", "descriptors_added",
                       "adapters", "wall_s"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sema_ablation")
    parser.add_argument("--runs", nargs="+", default=[], help="strategy:router[:route_by] ...")
    parser.add_argument("--train-per-class", type=int, default=None, help="subsample (default: all 6,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of the runs in --out")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.runs:
        strategy_params(spec)  # fail fast on a typo
    for spec in args.runs:
        with LoadMeter() as load:
            result = run_one(spec, args.train_per_class, args.seed)
        cmd = f"python -m benchmarks.sema_ablation --runs {spec}"
        cmd += (f" --train-per-class {args.train_per_class}" if args.train_per_class else "")
        cmd += (f" --threads {args.threads}" if args.threads else "")
        result.update(command=cmd, machine=machine_info(), other_processes_cpu_cores=load.other_cores)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{spec.replace(':', '-')}.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.table or not args.runs:
        print_table(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
