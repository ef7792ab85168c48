"""Experience memory with default settings: recall@10 against exact search, query latency and build time.

Each case fills a fresh ``ExperienceMemory(dim)`` (defaults: metric ``ip``, ``index="auto"``) in batches of
10,000 with metadata (kind, experience, class), the way a run would, so the memory starts exact and decides
past ``exact_threshold`` whether a tuned IVF pays (see ``cl.memory.index``). Sizes 10k, 50k, 100k and 1M,
dimensions 128 and 384, two kinds of data:

- ``random``: i.i.d. N(0, I) vectors, no structure: the worst case, where nearest neighbours are barely
  nearer than anything else and no index beats a scan at a useful recall;
- ``clustered``: 1,000 Gaussian clusters in a 32-dim latent space, mapped to ``dim`` dims by a fixed random
  matrix, plus isotropic noise as large as the signal, L2-normalised: a stand-in for sentence or image
  embeddings, which have a low intrinsic dimension.

Queries are fresh draws from the same distribution (never stored vectors); recall@10 is against exact search
(``faiss.knn``) over 1,000 queries searched in one call. Latency: one query per ``search`` call (the whole
call, metadata included) over 200 queries, wall time (p50) and CPU time (``time.thread_time``, what a quiet
core would take, less cache effects). "filtered": experience 0 (one entry in ten). A few extra rows compare
``index="hnsw"`` (efSearch tuned the same way), ``index="ivf"`` and the former default (HNSW, efSearch 128).
FAISS runs on one thread for everything built or timed; only the exact ground truth uses every core.

    python -m benchmarks.memory_search [--quick] [--json PATH] [--cases PATTERN,...]

Without ``--json`` the result goes to ``benchmarks/results/memory_search.json``; with ``--cases`` (fnmatch
patterns over the case names, e.g. ``"* 1M x384"``) only those run, and their rows replace the rows of the
same name in that file.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from benchmarks._common import RESULTS_DIR, LoadMeter, cli
from cl.memory import ExperienceMemory

K = 10
N_QUERIES = 1000  # recall (one batched call)
N_TIMED = 200  # single-query latency
N_FILTERED = 100
ADD_BATCH = 10_000
EXPERIENCES = 10
SIZES = ("10k", "50k", "100k", "1M")
DIMS = (128, 384)
DATA = ("random", "clustered")
JSON = RESULTS_DIR / "memory_search.json"


def clustered(n: int, dim: int, seed: int, n_clusters: int = 1000, latent: int = 32, noise: float = 1.0) -> np.ndarray:
    """Unit vectors: cluster centre + spread in a 32-dim latent space, projected, plus full-rank noise."""
    world = np.random.default_rng(12345)  # the same clusters and projection for data and queries
    proj = world.standard_normal((latent, dim)) / np.sqrt(dim)
    centres = world.standard_normal((n_clusters, latent))
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        z = centres[rng.integers(n_clusters, size=m)] + 0.5 * rng.standard_normal((m, latent))
        signal = z @ proj
        scale = noise * np.linalg.norm(signal, axis=1, keepdims=True) / np.sqrt(dim)
        x = signal + scale * rng.standard_normal((m, dim))
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def random(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def exact_knn(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        return faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    finally:
        faiss.omp_set_num_threads(1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True))
    return hits / truth.size


def latencies(mem: ExperienceMemory, q: np.ndarray, **kw: Any) -> tuple[np.ndarray, float, np.ndarray]:
    """Per-query wall times (s) of single-query searches, their mean CPU time (s), and the ids found."""
    mem.search(q[:5], K, **kw)  # warm-up
    times, ids = np.empty(len(q)), np.empty((len(q), K), np.int64)
    cpu0 = time.thread_time()
    for i in range(len(q)):
        t0 = time.perf_counter()
        ids[i] = mem.search(q[i : i + 1], K, **kw).ids[0]
        times[i] = time.perf_counter() - t0
    return times, (time.thread_time() - cpu0) / len(q), ids


def setting(info: dict[str, Any]) -> str:
    if info["structure"] == "hnsw":
        return f"HNSW M={info['M']}, efC={info['ef_construction']}, efSearch={info['ef_search']}"
    if info["structure"] == "ivf":
        return f"IVF nlist={info['nlist']}, nprobe={info['nprobe']} (scans {100 * info['scan']:.1f}%)"
    return "exact"


def count(size: str) -> int:
    """``"50k"`` -> 50000, ``"1M"`` -> 1000000."""
    return int(float(size[:-1]) * {"k": 1e3, "M": 1e6}[size[-1]])


def case_name(data: str, size: str, dim: int, options: dict[str, Any]) -> str:
    return f"{data} {size} x{dim}" + "".join(f", {k}={v}" for k, v in options.items())


def measure(data: str, size: str, dim: int, **options: Any) -> dict[str, Any]:
    n, name = count(size), case_name(data, size, dim, options)
    make = clustered if data == "clustered" else random
    x, q = make(n, dim, 1), make(N_QUERIES, dim, 2)
    per_exp = -(-n // EXPERIENCES)
    truth = exact_knn(x, q, K)
    sub = np.arange(min(per_exp, n))  # experience 0
    truth_filtered = sub[exact_knn(x[sub], q[:N_FILTERED], K)]
    load_before = os.getloadavg()
    with LoadMeter() as load:
        mem = ExperienceMemory(dim, **options)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        for s in range(0, n, ADD_BATCH):
            meta = [{"kind": "exemplar", "experience": i // per_exp, "class": i % 100}
                    for i in range(s, min(s + ADD_BATCH, n))]
            mem.add(x[s : s + ADD_BATCH], meta)
        t_build, cpu_build = time.perf_counter() - t0, time.thread_time() - cpu0
        batch = mem.search(q, K, kind="exemplar", with_metadata=False)
        lat, cpu, found = latencies(mem, q[:N_TIMED], kind="exemplar")
        lat_f, cpu_f, found_f = latencies(mem, q[:N_FILTERED], kind="exemplar", experience=0)
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
            t0 = time.perf_counter()
            mem.save(Path(tmp) / "mem")
            t_save = time.perf_counter() - t0
            disk = sum(f.stat().st_size for f in (Path(tmp) / "mem").rglob("*") if f.is_file())
            t0 = time.perf_counter()
            loaded = ExperienceMemory.load(Path(tmp) / "mem")
            t_load = time.perf_counter() - t0
            same_after_load = bool((loaded.search(q[:N_TIMED], K).ids == batch.ids[:N_TIMED]).all())
            del loaded
    assert (batch.ids[:N_TIMED] == found).all(), "batched and single-query searches disagree"
    info = mem.index_settings()["exemplar"]
    row = {
        "case": name, "data": data, "n": n, "dim": dim, "options": options, "index": info["structure"],
        "setting": setting(info), "recall@10": recall(batch.ids, truth), "sample recall@10": info["sample_recall"],
        "p50 ms": 1e3 * float(np.median(lat)), "p99 ms": 1e3 * float(np.quantile(lat, 0.99)),
        "cpu ms/q": 1e3 * cpu, "filtered recall@10": recall(found_f, truth_filtered),
        "filtered p50 ms": 1e3 * float(np.median(lat_f)), "filtered cpu ms/q": 1e3 * cpu_f,
        "build s": t_build, "build cpu s": cpu_build, "save s": t_save, "load s": t_load,
        "disk MB": disk / 2**20, "same ids after load": same_after_load, "settings": info,
        "other load": load.other_cores, "loadavg before": load_before, "loadavg after": os.getloadavg(),
    }
    print(f"  {name}: {json.dumps({k: v for k, v in row.items() if k != 'settings'}, default=str)}", flush=True)
    del mem, x
    gc.collect()
    return row


def cases(quick: bool) -> list[tuple[str, str, int, dict[str, Any]]]:
    if quick:
        return [("random", "10k", 128, {}), ("clustered", "20k", 128, {}), ("clustered", "20k", 128, {"index": "hnsw"})]
    out = [(data, size, dim, {}) for size in SIZES for dim in DIMS for data in DATA]
    out += [
        ("random", "50k", 128, {"index": "hnsw", "ef_search": 128}),  # the former default
        ("random", "50k", 128, {"index": "hnsw"}),
        ("clustered", "100k", 384, {"index": "hnsw", "ef_search": 128}),
        ("clustered", "100k", 384, {"index": "hnsw"}),
        ("clustered", "100k", 384, {"index": "ivf"}),
    ]
    return out


def run(quick: bool = False, patterns: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    todo = [c for c in cases(quick) if not patterns or any(fnmatch.fnmatch(case_name(*c), p) for p in patterns)]
    rows = [measure(data, size, dim, **options) for data, size, dim, options in todo]
    return {
        "rows": rows,
        "notes": [
            "ExperienceMemory(dim) with default settings unless options say otherwise, filled in batches of 10,000 "
            "with metadata; build s: wall time of those adds (metadata, SQLite, the exact->IVF trials and tunings)",
            "recall@10: 1,000 fresh queries in one call against exact search (faiss.knn); sample recall@10: what "
            "the tuning measured on stored vectors held out as queries (1.0: exact); p50/p99 ms: wall time of one "
            "query per search() call, metadata included; cpu ms/q: CPU time of those calls per query; filtered: "
            "experience=0 (1 in 10)",
            f"FAISS threads for everything built or timed: 1 (of {os.cpu_count()} CPUs); other load = CPU cores "
            "other processes used meanwhile (~0 = clean); loadavg = os.getloadavg() before and after",
        ],
    }


COLUMNS = ["case", "setting", "recall@10", "sample recall@10", "p50 ms", "cpu ms/q", "filtered recall@10",
           "filtered cpu ms/q", "build s", "build cpu s", "other load"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--cases", default=None)
    known, rest = extra.parse_known_args(argv)
    patterns = known.cases.split(",") if known.cases else None
    if "--json" not in rest and "--quick" not in rest:
        rest += ["--json", str(JSON)]
    previous = json.loads(JSON.read_text()) if patterns and JSON.exists() else None
    cli("memory_search", lambda quick: run(quick, patterns), COLUMNS, rest)
    if previous is not None and rest[rest.index("--json") + 1] == str(JSON):
        merged = json.loads(JSON.read_text())
        new = {r["case"]: r for r in merged["rows"]}
        order = [r["case"] for r in previous.get("rows", [])] + [c for c in new if c not in
                                                                 {r["case"] for r in previous.get("rows", [])}]
        old = {r["case"]: r for r in previous.get("rows", [])}
        merged["rows"] = [new.get(c, old.get(c)) for c in order]
        merged["runs"] = [*previous.get("runs", [_run_info(previous)]), _run_info(merged, patterns)]
        JSON.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"merged into {JSON} ({len(new)} rows replaced or added)", file=sys.stderr)


def _run_info(payload: dict[str, Any], patterns: list[str] | None = None) -> dict[str, Any]:
    """What one invocation ran, for a file merged from several."""
    return {"cases": patterns or "all", "wall_s": payload.get("wall_s"), "date": payload.get("machine", {}).get("date"),
            "git_commit": payload.get("machine", {}).get("git_commit"),
            "other_processes_cpu_cores": payload.get("other_processes_cpu_cores")}


if __name__ == "__main__":
    main()
