"""Run every benchmark, each in its own process, and write ``benchmarks/results/<name>.json``.

    python -m benchmarks.run_all [--only NAME ...] [--quick] [--threads N] [--out DIR]

``make bench`` calls this. Each JSON holds the rows, the exact command and the machine (CPU model,
torch threads and version, GPU). ``--quick`` is a smoke test with tiny sizes; its figures mean nothing,
so it writes nowhere unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import RESULTS_DIR

BENCHMARKS = ["prefix_cache", "fold", "fill", "mixture_inference", "adapter_pool", "memory_search", "mos_inference",
              "distributed"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help=f"result folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else RESULTS_DIR)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parent.parent
    failed = []
    for name in args.only:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if out is not None:
            cmd += ["--json", str(out / f"{name}.json")]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=root, env=env)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
