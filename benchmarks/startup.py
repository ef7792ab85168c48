"""Start-up of the ``cl`` command: ``cl --help``, and ``cl run`` from process start to its first training batch.

Each figure is the wall time of a fresh process, measured from just before it is spawned (so the interpreter's own
start counts), median over ``--repeats`` runs. ``cl run`` runs the default config (``examples/default.yaml``, one
torch thread) with a probe logger (``benchmarks/startup_probe.py``, given by ``--import``) that notes the time at the
first training batch, which heavy optional packages are imported by then, and how much of the time went into the
prefix-cache fill of the first experience (``cl.phases``: computing the frozen blocks once, which is work, not
start-up); then it ends the process.

    python -m benchmarks.startup [--quick] [--threads N] [--json PATH] [--repeats N]

``--quick`` runs the probe on a small subset (``train_per_class=20``) once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, LoadMeter, machine_info, median, table

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "startup_probe.py"
#: packages ``cl run`` should import only when a config uses them
HEAVY = ("avalanche", "wandb", "tensorboard", "torch.utils.tensorboard", "open_clip", "transformers", "faiss")


def cl_command() -> list[str]:
    """The installed ``cl`` script next to this interpreter, else ``python -m cl``."""
    script = Path(sys.executable).with_name("cl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cl"]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


def help_time() -> float:
    t0 = time.perf_counter()
    subprocess.run([*cl_command(), "--help"], check=True, capture_output=True, env=env(), cwd=ROOT)
    return time.perf_counter() - t0


def first_batch(threads: int, quick: bool) -> dict[str, Any]:
    """One ``cl run`` of the default config up to its first training batch (the probe's report)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "probe.json"
        cmd = [*cl_command(), "run", str(ROOT / "examples/default.yaml"), "--import", str(PROBE),
               "--logger", "startup_probe", "--set", f"threads={threads}", "--set", f"out={tmp}/run"]
        if quick:
            cmd += ["--set", "scenario.train_per_class=20", "--set", "scenario.test_per_class=20"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**env(), "CL_STARTUP_PROBE": str(report)},
                              cwd=ROOT)
        if not report.exists():
            raise RuntimeError(f"the probe never reached a training batch (exit {proc.returncode}):\n{proc.stderr}")
        probe = json.loads(report.read_text())
        shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
    seconds = probe["time"] - t0
    return {"s": seconds, "cpu_s": probe["cpu_s"], "cache_fill_s": probe["cache_fill_s"],
            "without_fill_s": seconds - probe["cache_fill_s"],
            "heavy_imported": [m for m in HEAVY if m in probe["modules"]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup")
    parser.add_argument("--quick", action="store_true", help="one run of each, on a small subset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the cl run (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="processes per figure (median)")
    parser.add_argument("--json", type=Path, default=None, help="where to write (default: benchmarks/results/"
                        "startup.json; --quick: only with --json)")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    with LoadMeter() as load:
        helps = [help_time() for _ in range(repeats)]
        runs = [first_batch(args.threads, args.quick) for _ in range(repeats)]
    rows = [
        {"what": "cl --help", "median s": median(helps), "runs s": ", ".join(f"{s:.2f}" for s in helps),
         "target s": 1.0},
        {"what": "cl run: first training batch", "median s": median([r["s"] for r in runs]),
         "runs s": ", ".join(f"{r['s']:.2f}" for r in runs), "target s": 5.0},
        {"what": "  its CPU seconds (less sensitive to load)", "median s": median([r["cpu_s"] for r in runs]),
         "runs s": ", ".join(f"{r['cpu_s']:.2f}" for r in runs)},
        {"what": "  of which the prefix-cache fill", "median s": median([r["cache_fill_s"] for r in runs]),
         "runs s": ", ".join(f"{r['cache_fill_s']:.2f}" for r in runs)},
        {"what": "  start-up without the fill", "median s": median([r["without_fill_s"] for r in runs]),
         "runs s": ", ".join(f"{r['without_fill_s']:.2f}" for r in runs)},
    ]
    heavy = sorted({m for r in runs for m in r["heavy_imported"]})
    payload = {
        "benchmark": "startup",
        "command": "python -m benchmarks.startup" + (" --quick" if args.quick else "")
        + f" --threads {args.threads} --repeats {repeats}",
        "quick": args.quick, "machine": machine_info(), "cl_run_threads": args.threads,
        "other_processes_cpu_cores": load.other_cores, "heavy_packages_imported_by_first_batch": heavy,
        "rows": rows,
    }
    print(f"# startup  (cl run with {args.threads} torch thread(s); other processes: {load.other_cores} cores)")
    print(table(rows, ["what", "median s", "runs s", "target s"]))
    print(f"- heavy optional packages imported by the first batch: {', '.join(heavy) or 'none'}")
    out = args.json if args.json is not None or args.quick else RESULTS_DIR / "startup.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
