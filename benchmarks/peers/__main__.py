"""``python -m benchmarks.peers``: run the peer grid (one process per run, finished runs skipped) and report."""

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

from benchmarks._common import RESULTS_DIR, LoadMeter, machine_info
from benchmarks.peers.grid import AVALANCHE_TRAINING, STREAMS, RunSpec, build_grid
from benchmarks.peers.report import check_class_orders, markdown, summarize_runs, update_results_md
from benchmarks.peers.worker import execute

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SIZES = {"fmnist": (500, 200), "fortunes": (100, 30)}  # subsets that fit ~45 min on 2 busy cores
QUICK_SIZES = {"fmnist": (6, 4), "fortunes": (6, 4)}


def run_spec(spec: RunSpec, out: Path, work: Path, in_process: bool = False) -> dict[str, Any] | None:
    """The result of ``spec``: read from ``out/<key>.json`` if that run finished, else run it.

    A run goes to its own subprocess (its output in ``work/<key>.log``), so wall time, CPU time
    (``getrusage``) and peak RSS are its own; ``in_process`` (the ``--quick`` default) runs it here instead,
    where peak RSS is the whole process's so far.
    """
    done = out / f"{spec.key}.json"
    if done.exists():
        result = json.loads(done.read_text())
        if result.get("spec") == spec.to_dict():
            print(f"== {spec.key}: done, skipped", flush=True)
            return result
    work.mkdir(parents=True, exist_ok=True)
    print(f"== {spec.key}", flush=True)
    t0 = time.perf_counter()
    with LoadMeter() as load:
        if in_process:
            result, cpu, rss = _in_process(spec, work)
        else:
            found = _subprocess(spec, work)
            if found is None:
                return None
            result, cpu, rss = found
    wall = time.perf_counter() - t0
    result.update(wall_s=round(wall, 1), cpu_s=round(cpu, 1), peak_rss_mb=round(rss, 1),
                  other_processes_cpu_cores=load.other_cores, in_process=in_process)
    out.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, done)
    print(f"== {spec.key}: final accuracy {result['final_accuracy']:.4f}, {wall:.0f} s "
          f"(other load {load.other_cores} cores)", flush=True)
    return result


def _in_process(spec: RunSpec, work: Path) -> tuple[dict[str, Any], float, float]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = execute(spec, work)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, cpu, after.ru_maxrss / 1024


def _subprocess(spec: RunSpec, work: Path) -> tuple[dict[str, Any], float, float] | None:
    spec_file, partial, log = (work / f"{spec.key}.{s}" for s in ("spec.json", "partial.json", "log"))
    spec_file.write_text(json.dumps(spec.to_dict()))
    partial.unlink(missing_ok=True)
    threads = str(spec.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers.worker", str(spec_file), str(partial),
                                 str(work)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode or not partial.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        print(f"{tail}== {spec.key}: FAILED (exit {proc.returncode}), log {log}", file=sys.stderr, flush=True)
        return None
    result = json.loads(partial.read_text())
    partial.unlink()
    return result, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def headings(sizes: dict[str, tuple[int | None, int | None]], weights: str) -> dict[str, str]:
    def subset(stream: str) -> str:
        tr, te = sizes[stream]
        return (f"{tr or 'all'} train / {te or 'all'} test items per class"
                + (" (a subset of the full stream)" if tr or te else ""))

    w = " (random init)" if weights == "none" else ""
    return {
        "fmnist": f"**Split-FashionMNIST**, 5 experiences x 2 classes, {subset('fmnist')}; "
                  f"EfficientNet-Lite0{w or ' ImageNet'} at {32 if w else 64} px; 1 torch thread per run",
        "fortunes": f"**Split-fortunes** (text), 5 experiences x 5 categories, {subset('fortunes')}; "
                    f"{'a 3-layer MiniLM' + w if w else 'MiniLM-L6 (all-MiniLM-L6-v2)'}; 1 torch thread per run",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny smoke version (few items, seed 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds = class orders (default 0 1 2)")
    p.add_argument("--streams", nargs="+", choices=list(STREAMS), default=list(STREAMS))
    p.add_argument("--methods", nargs="+", default=None, help="only these (method or framework:method)")
    p.add_argument("--train-per-class", type=int, default=None, help="Split-FashionMNIST train subset")
    p.add_argument("--test-per-class", type=int, default=None, help="Split-FashionMNIST test subset")
    p.add_argument("--text-train-per-class", type=int, default=None, help="Split-fortunes train subset")
    p.add_argument("--text-test-per-class", type=int, default=None, help="Split-fortunes test subset")
    p.add_argument("--weights", choices=["pretrained", "none"], default="pretrained", help="none: random init")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", type=Path, default=None, help="per-run results (default benchmarks/results/peers; "
                   "with --quick a temporary folder); the summary goes to OUT.json")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "peers", help="run directories of our runs")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run in this process, not one subprocess per run (default: only with --quick)")
    p.add_argument("--table-only", action="store_true", help="report the finished runs, run nothing")
    p.add_argument("--update-results-md", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    base = QUICK_SIZES if args.quick else DEFAULT_SIZES
    sizes = {
        "fmnist": (args.train_per_class or base["fmnist"][0], args.test_per_class or base["fmnist"][1]),
        "fortunes": (args.text_train_per_class or base["fortunes"][0],
                     args.text_test_per_class or base["fortunes"][1]),
    }
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = args.out or (Path(tempfile.mkdtemp(prefix="peers-")) / "peers" if args.quick else RESULTS_DIR / "peers")
    specs = build_grid(seeds, sizes, args.streams, args.methods, args.weights == "none", args.threads)
    t0 = time.perf_counter()
    results, failed = [], []
    for spec in specs:
        if args.table_only:
            f = out / f"{spec.key}.json"
            r = json.loads(f.read_text()) if f.exists() else None
            r = r if r and r.get("spec") == spec.to_dict() else None
        else:
            r = run_spec(spec, out, args.work, args.quick if args.in_process is None else args.in_process)
        if r is None:
            failed.append(spec.key)
        else:
            results.append(r)
    rows = summarize_runs(results)
    text = markdown(rows, {s: h for s, h in headings(sizes, args.weights).items() if s in args.streams})
    problems = check_class_orders(results)
    payload = {
        "benchmark": "peers", "command": " ".join(["python -m benchmarks.peers", *argv]), "quick": args.quick,
        "machine": machine_info(), "wall_s": round(time.perf_counter() - t0, 1), "sizes": sizes, "seeds": seeds,
        "avalanche_training": AVALANCHE_TRAINING, "rows": rows, "missing": failed, "class_order_problems": problems,
        "runs": results,
    }
    summary = out.with_name(out.name + ".json")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    print(f"wrote {summary}", file=sys.stderr)
    if args.update_results_md and not update_results_md(ROOT / "benchmarks" / "RESULTS.md", text):
        print("benchmarks/RESULTS.md has no peers-table markers: table not written", file=sys.stderr)
    for msg in problems + [f"missing: {k}" for k in failed]:
        print(f"WARNING: {msg}", file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
