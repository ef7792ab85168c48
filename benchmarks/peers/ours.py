"""Our strategies through ``cl.run.run`` (the same path as ``cl run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.peers.grid import OUR_METHODS, TEXT_METHODS, RunSpec


def config(spec: RunSpec, out: Path) -> dict[str, Any]:
    """The run config of ``spec`` (what ``cl run`` would resolve), writing its run directory to ``out``."""
    name, params = OUR_METHODS[spec.method] if spec.method in OUR_METHODS else (spec.method, {})
    assert spec.stream == "fmnist" or spec.method in TEXT_METHODS
    return {
        "seed": spec.seed, "device": "cpu", "threads": spec.threads, "out": str(out), "progress": False,
        "loggers": [], "scenario": dict(spec.scenario), "backbone": dict(spec.backbone),
        "strategy": {"name": name, **params}, "eval": {"batch_size": 256},
    }


def run_ours(spec: RunSpec, work: Path) -> dict[str, Any]:
    """Run ``spec`` afresh in ``work/<key>``; the metrics of its ``metrics.json``."""
    import time

    from cl.metrics import summarize
    from cl.run import run

    t0 = time.perf_counter()
    cfg = config(spec, work / spec.key)
    m = run(cfg, overwrite=True)
    rows, seen = m["accuracy_matrix"], m["accuracy_seen"]
    return {"accuracy_matrix": rows, "accuracy_seen": seen, **summarize(rows, seen),
            "run_wall_s": round(time.perf_counter() - t0, 1), "params_trainable": m.get("params_trainable"),
            "config": cfg}
