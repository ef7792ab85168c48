"""Data-parallel scaling: the same run with 1 and with N processes (``cl run --nproc``), same results expected.

Each setup is run as ``cl run CONFIG --nproc N`` in a fresh run directory, with ``OMP_NUM_THREADS`` =
cores / N per rank (CPU) or one GPU per rank (CUDA, NCCL). Recorded per run: wall time of the whole command
(process start-up and rendezvous included), the training phase (from each ``experience_start`` event to the
first evaluation of that experience, summed: prefix cache fill, adapter training, SEMA's scans and
descriptors), the final accuracy and whether every ``sync`` check found identical states on all ranks.

On a CPU the ranks share the machine's cores, so N processes gain only what one process with all the
threads leaves idle (small per-step ops); on GPUs each rank adds a device. GPU setups (ViT-B/16, random init,
224 px, batch 64) run only where CUDA is available.

    python -m benchmarks.distributed [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks._common import cli


@dataclass
class Setup:
    name: str
    config: dict[str, Any]
    nprocs: list[int]
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)


def setups(quick: bool) -> list[Setup]:
    if quick:
        return [Setup("tiny ViT, synthetic, sema", {
            "seed": 0, "progress": False,
            "scenario": {"name": "synthetic", "n_classes": 6, "n_experiences": 3, "train_per_class": 24,
                         "test_per_class": 12, "image_size": 16},
            "backbone": {"name": "vit_tiny_test"}, "strategy": {"name": "sema", "epochs": 1},
        }, [1, 2])]
    out = [Setup("EfficientNet-Lite0 64 px, Split-FashionMNIST 500/class, sema", {
        "seed": 0, "progress": False,
        "scenario": {"name": "split_fmnist", "n_experiences": 5, "train_per_class": 500, "test_per_class": 200},
        "backbone": {"name": "efficientnet_lite0", "weights": "imagenet", "img_size": 64},
        "strategy": {"name": "sema"},
    }, [1, 2])]
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        out.append(Setup("ViT-B/16 224 px (random init), synthetic 10 x 2 classes, sema, batch 64", {
            "seed": 0, "progress": False,
            "scenario": {"name": "synthetic", "n_classes": 20, "n_experiences": 10, "train_per_class": 256,
                         "test_per_class": 64, "image_size": 224},
            "backbone": {"name": "timm_vit", "model_name": "vit_base_patch16_224"},
            "strategy": {"name": "sema", "batch_size": 64},
        }, sorted({1, gpus}), device="cuda"))
    return out


def phases(run_dir: Path) -> float:
    """Seconds from each experience's start to its first evaluation, summed over experiences."""
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    total, start = 0.0, None
    for e in events:
        if e["kind"] == "experience_start":
            start = e["t"]
        elif e["kind"] == "eval" and start is not None:
            total += e["t"] - start
            start = None
    return total


def run_one(setup: Setup, nproc: int, workdir: Path) -> dict[str, Any]:
    run_dir = workdir / f"{setup.name[:20].replace(' ', '_')}-n{nproc}"
    cfg = {**setup.config, "device": setup.device, "out": str(run_dir)}
    path = workdir / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cores = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    cmd = [sys.executable, "-m", "cl", "run", str(path), "--no-report", "--overwrite", "--nproc", str(nproc)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    syncs = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    syncs = [e for e in syncs if e["kind"] == "sync"]
    return {
        "setup": setup.name, "device": setup.device, "processes": nproc,
        "threads_per_rank": max(1, cores // nproc) if setup.device == "cpu" else None,
        "gpu": torch.cuda.get_device_name(0) if setup.device == "cuda" else None,
        "wall_s": round(wall, 1), "train_phase_s": round(phases(run_dir), 1),
        "final_accuracy": round(metrics["final_accuracy"], 4),
        "ranks_identical": all(e["identical"] for e in syncs) if syncs else None,
    }


def run(quick: bool = False) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cl-dist-bench-") as tmp:
        for setup in setups(quick):
            base = None
            for n in setup.nprocs:
                row = run_one(setup, n, Path(tmp))
                base = base or row
                row["speed-up (train phase)"] = round(base["train_phase_s"] / max(row["train_phase_s"], 1e-9), 2)
                rows.append(row)
    notes = ["the same seed and global batch size in every row: final accuracies should agree up to float "
             "summation order; `ranks_identical`: every after-experience sync found bit-identical strategy states"]
    if not torch.cuda.is_available():
        notes.append("no GPU on this machine: the ViT-B/16 NCCL rows are not measured")
    return {"rows": rows, "notes": notes}


COLUMNS = ["setup", "device", "gpu", "processes", "threads_per_rank", "wall_s", "train_phase_s",
           "speed-up (train phase)", "final_accuracy", "ranks_identical"]

if __name__ == "__main__":
    cli("distributed", run, COLUMNS)
