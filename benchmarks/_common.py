"""Helpers shared by the benchmarks: machine description, timing with warm-up and repeats, output."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cl.allocator import tune_allocator

# every benchmark process runs with the allocator settings of `cl run` (cl.allocator), so both sides of a comparison
# (ours and another library's code in the same process) share them from the first allocation
ALLOCATOR_TUNED = tune_allocator()

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, threads, library versions, GPU (if any)."""
    cpu = _lscpu()
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover
        timm_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "cores_per_socket": cpu.get("Core(s) per socket"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": gpu,
        "allocator_tuned": ALLOCATOR_TUNED,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


class LoadMeter:
    """CPU time the *other* processes used while the block ran, in cores (0 = the machine was ours).

    Reads the system's busy time from ``/proc/stat`` and this process's own CPU time; on a machine
    without ``/proc`` the figure is None. Use it to tell a clean measurement from a contended one.
    """

    def __enter__(self) -> LoadMeter:
        self._sys0, self._self0, self._t0 = _system_busy_s(), _self_cpu_s(), time.perf_counter()
        self.other_cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        sys1 = _system_busy_s()
        if self._sys0 is not None and sys1 is not None and wall > 0:
            other = (sys1 - self._sys0) - (_self_cpu_s() - self._self0)
            self.other_cores = round(max(other, 0.0) / wall, 2)


def _system_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timeit(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A small Markdown table of ``columns`` from ``rows`` (floats with 3 significant figures)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def cli(name: str, run: Callable[..., dict[str, Any]], columns: list[str], argv: list[str] | None = None) -> None:
    """Parse ``--quick``, ``--threads`` and ``--json``; run, print a table and optionally write JSON."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, figures meaningless)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the result with the machine info here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with LoadMeter() as load:
        result = run(quick=args.quick)
    payload = {
        "benchmark": name,
        "command": f"python -m benchmarks.{name}" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else ""),
        "quick": args.quick,
        "machine": machine_info(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "other_processes_cpu_cores": load.other_cores,
        **result,
    }
    print(f"# {name}  ({payload['machine']['cpu_model']}, {payload['machine']['torch_threads']} torch threads, "
          f"torch {payload['machine']['torch']})")
    print(table(result["rows"], columns))
    for note in result.get("notes", []):
        print(f"- {note}")
    if load.other_cores is not None and load.other_cores > 0.1:
        print(f"WARNING: other processes used {load.other_cores} CPU cores on average during the run: "
              "the figures are contended, rerun on a quiet machine", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
