"""SEMA's accuracy / added-parameters trade-off over ``tau`` (its expansion threshold), against references.

Each point is one ``cl run CONFIG --set strategy.tau=T`` in its own process (the command is stored with the
point): final accuracy, how many layer scans expanded, the functional parameters added (adapters + routers) and,
apart, the descriptors' parameters; wall and CPU seconds (the child's ``getrusage``) and the load the other
processes put on the machine meanwhile. References: ``adapter_per_task`` (an adapter in every layer for every
experience: what SEMA saves against) and ``simplecil`` with the LDA head (no adapter at all).

    python -m benchmarks.tau_curve --taus 1 2 4 8 16 --train-per-class 500 --test-per-class 300 --threads 1
    python -m benchmarks.tau_curve --config examples/recurring_fmnist.yaml --taus 2 \\
        --json benchmarks/results/recurring_fmnist.json --threads 1
    python -m benchmarks.tau_curve --table [--json PATH]

Points already in ``--json`` with the same command are kept, not rerun (a stopped run resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, LoadMeter, machine_info, table

OUT = RESULTS_DIR / "tau_curve.json"
REFERENCES = {  # label -> cl run arguments
    "adapter_per_task": ["--strategy", "adapter_per_task"],
    "simplecil_lda": ["--strategy", "simplecil", "--set", "strategy.head=lda"],
}
COLUMNS = ["label", "final_accuracy", "expanded_scans", "adapters_per_layer", "params_functional",
           "params_functional_vs_apt", "params_descriptors", "wall_s", "cpu_s", "load_other_cores", "command"]


def cl_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The ``cl run`` arguments of one point (without ``--out``)."""
    out = ["cl", "run", str(args.config), *extra]
    for key, value in (("train_per_class", args.train_per_class), ("test_per_class", args.test_per_class)):
        if value is not None:
            out += ["--set", f"scenario.{key}={value}"]
    if args.threads:
        out += ["--set", f"threads={args.threads}"]
    return out


def scans(events: Path) -> tuple[int, int]:
    """(expanded, tested) layer scans after the first experience (the first always expands)."""
    expanded = tested = 0
    for line in events.read_text().splitlines():
        e = json.loads(line)
        if e.get("kind") in ("expansion", "reuse") and e.get("experience", 0) > 0:
            tested += 1
            expanded += e["kind"] == "expansion"
    return expanded, tested


def run_point(label: str, tau: float | None, argv: list[str]) -> dict[str, Any]:
    """Run ``python -m cl run ...`` (``argv`` starts with ``cl run``) and read its metrics and events."""
    with tempfile.TemporaryDirectory(prefix="tau_curve_") as tmp:
        cmd = [sys.executable, "-m", *argv, "--out", tmp]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        with LoadMeter() as load:
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        m = json.loads((Path(tmp) / "metrics.json").read_text())
        expanded, tested = scans(Path(tmp) / "events.jsonl")
    return {
        "label": label, "tau": tau, "command": " ".join(argv),
        "final_accuracy": round(m["final_accuracy"], 4),
        "avg_incremental_accuracy": round(m["avg_incremental_accuracy"], 4),
        "avg_forgetting": round(m["avg_forgetting"], 4),
        "expanded_scans": f"{expanded}/{tested}" if tested else None,
        "adapters_per_layer": "/".join(str(v) for v in m.get("adapters_per_layer", {}).values()) or "0",
        "params_functional": m.get("params_functional", 0), "params_descriptors": m.get("params_descriptors", 0),
        "wall_s": round(wall, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        "load_other_cores": load.other_cores, "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }


def with_ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each point's functional parameters as a fraction of ``adapter_per_task``'s (when that point exists)."""
    apt = next((p["params_functional"] for p in points if p["label"] == "adapter_per_task"), None)
    for p in points:
        p["params_functional_vs_apt"] = round(p["params_functional"] / apt, 3) if apt else None
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tau_curve")
    parser.add_argument("--config", type=Path, default=Path("examples/default.yaml"))
    parser.add_argument("--taus", type=float, nargs="*", default=[], help="sema's tau values to run")
    parser.add_argument("--references", nargs="*", default=list(REFERENCES), choices=list(REFERENCES))
    parser.add_argument("--train-per-class", type=int, default=None, help="scenario subset (default: the config's)")
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each run")
    parser.add_argument("--json", type=Path, default=OUT, help=f"results file (default {OUT})")
    parser.add_argument("--table", action="store_true", help="print the table of --json and stop")
    args = parser.parse_args(argv)
    done: list[dict[str, Any]] = json.loads(args.json.read_text())["points"] if args.json.exists() else []
    if not args.table:
        todo = [(f"sema tau={t:g}", t, cl_args(args, ["--set", f"strategy.tau={t:g}"])) for t in args.taus]
        todo += [(name, None, cl_args(args, REFERENCES[name])) for name in args.references]
        for label, tau, cmd in todo:
            if any(p["command"] == " ".join(cmd) for p in done):
                continue
            point = run_point(label, tau, cmd)
            print(json.dumps(point), flush=True)
            done = [p for p in done if p["label"] != label] + [point]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            result = {"points": with_ratios(done), "machine": machine_info()}
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(sorted(with_ratios(done), key=lambda p: (p["tau"] is None, p["tau"] or 0)), COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
