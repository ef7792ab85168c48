"""One run in its own process: ``python -m benchmarks.peers.worker SPEC.json RESULT.json WORK_DIR``.

Writes the run's metrics, its class order and the spec to ``RESULT.json`` (atomically, last), so a result
file exists only for a finished run. The parent measures wall time, CPU time and peak RSS of this process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.peers.grid import RunSpec


def execute(spec: RunSpec, work: Path) -> dict[str, Any]:
    """Run ``spec`` in this process: its metrics, class order and data sizes."""
    import torch

    from cl.allocator import tune_allocator
    from cl.registry import SCENARIOS

    tune_allocator()  # both frameworks' processes run with the allocator settings of `cl run`
    torch.set_num_threads(spec.threads)
    stream = SCENARIOS.create(spec.scenario["name"], **{k: v for k, v in spec.scenario.items() if k != "name"})
    if spec.framework == "avalanche":
        from benchmarks.peers.avalanche_runs import run_avalanche

        result = run_avalanche(spec, stream)
    else:
        from benchmarks.peers.ours import run_ours

        result = run_ours(spec, work)
    result.update(spec=spec.to_dict(), key=spec.key, class_order=[list(e.classes) for e in stream],
                  train_size=sum(len(e.train) for e in stream), test_size=sum(len(e.test) for e in stream),
                  torch_threads=torch.get_num_threads())
    return result


def main(argv: list[str]) -> int:
    spec_path, result_path, work = (Path(a) for a in argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cl.metrics import write_json_atomic

    result = execute(RunSpec(**json.loads(spec_path.read_text())), work)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
