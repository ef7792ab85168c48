"""Start-up of the ``cl`` command: ``cl --help``, and ``cl run`` from process start to its first training batch.

Each figure is the wall time of a fresh process, measured from just before it is spawned (so the interpreter's own
start counts), median over ``--repeats`` runs. ``cl run`` runs the default config (``examples/default.yaml``) as
``make run`` does (its default threads: torch's, one per core) and with one torch thread, the two settings
alternating process by process, with a probe logger (``benchmarks/startup_probe.py``, given by ``--import``) that
notes the time at the first training batch, which heavy optional packages are imported by then, and how much of
the time went into the prefix-cache fill of the first experience (``cl.phases``: computing the frozen blocks for the
images that batch reads, which is work, not start-up); then it ends the process.

    python -m benchmarks.startup [--quick] [--threads default,1] [--json PATH] [--repeats N]

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


def first_batch(threads: int | None, quick: bool) -> dict[str, Any]:
    """One ``cl run`` of the default config up to its first training batch (the probe's report); ``threads`` None:
    the config's default (torch's own count)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "probe.json"
        cmd = [*cl_command(), "run", str(ROOT / "examples/default.yaml"), "--import", str(PROBE),
               "--logger", "startup_probe", "--set", f"out={tmp}/run"]
        if threads is not None:
            cmd += ["--set", f"threads={threads}"]
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


def _label(threads: int | None) -> str:
    return f"default threads ({os.cpu_count()} cores)" if threads is None else f"{threads} thread(s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup")
    parser.add_argument("--quick", action="store_true", help="one run of each, on a small subset")
    parser.add_argument("--threads", default="default,1",
                        help="torch threads of the cl run, comma-separated: 'default' (the config's, as make run) "
                             "and/or counts (default: default,1)")
    parser.add_argument("--repeats", type=int, default=5, help="processes per figure (median)")
    parser.add_argument("--json", type=Path, default=None, help="where to write (default: benchmarks/results/"
                        "startup.json; --quick: only with --json)")
    args = parser.parse_args(argv)
    settings = [None if t.strip() == "default" else int(t) for t in args.threads.split(",")]
    repeats = 1 if args.quick else args.repeats
    runs: dict[int | None, list[dict[str, Any]]] = {t: [] for t in settings}
    with LoadMeter() as load:
        helps = [help_time() for _ in range(repeats)]
        for _ in range(repeats):  # the settings alternate, so a drift of the host's speed reaches each alike
            for t in settings:
                runs[t].append(first_batch(t, args.quick))
    rows = [{"what": "cl --help", "median s": median(helps), "runs s": ", ".join(f"{s:.2f}" for s in helps),
             "target s": 1.0}]
    for t in settings:
        got = runs[t]
        rows += [
            {"what": f"cl run, {_label(t)}: first training batch", "median s": median([r["s"] for r in got]),
             "runs s": ", ".join(f"{r['s']:.2f}" for r in got), "target s": 5.0},
            {"what": "  its CPU seconds (less sensitive to load)", "median s": median([r["cpu_s"] for r in got]),
             "runs s": ", ".join(f"{r['cpu_s']:.2f}" for r in got)},
            {"what": "  of which the prefix-cache fill", "median s": median([r["cache_fill_s"] for r in got]),
             "runs s": ", ".join(f"{r['cache_fill_s']:.2f}" for r in got)},
            {"what": "  start-up without the fill", "median s": median([r["without_fill_s"] for r in got]),
             "runs s": ", ".join(f"{r['without_fill_s']:.2f}" for r in got)},
        ]
    heavy = sorted({m for got in runs.values() for r in got for m in r["heavy_imported"]})
    payload = {
        "benchmark": "startup",
        "command": "python -m benchmarks.startup" + (" --quick" if args.quick else "")
        + f" --threads {args.threads} --repeats {repeats}",
        "quick": args.quick, "machine": machine_info(),
        "cl_run_threads": [_label(t) for t in settings],
        "other_processes_cpu_cores": load.other_cores, "heavy_packages_imported_by_first_batch": heavy,
        "rows": rows,
    }
    print(f"# startup  (cl run with {', '.join(_label(t) for t in settings)}; other processes: "
          f"{load.other_cores} cores)")
    print(table(rows, ["what", "median s", "runs s", "target s"]))
    print(f"- heavy optional packages imported by the first batch: {', '.join(heavy) or 'none'}")
    out = args.json if args.json is not None or args.quick else RESULTS_DIR / "startup.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
