"""Experience memory at 10k, 100k and 1M vectors of dimension 384: add rate, query latency, recall@10.

Each size fills a fresh ``ExperienceMemory(384, metric="ip", index="auto")`` in batches of 10,000 with
metadata (kind, experience, class), the way a run would, so the auto index starts exact and switches
to HNSW once (at ``exact_threshold``). Queries are 1,000 fresh draws from the same distribution;
recall@10 is against exact inner-product search (``faiss.knn``). Latency: one query per
``search`` call (the full call, metadata included); throughput: the 1,000 queries in one call.
"filtered" searches one experience in ten. At the largest size ``ef_search`` is swept to show the
recall/latency trade-off behind the default.

Data ("clustered"): 1,000 Gaussian clusters in a 32-dim latent space, mapped to 384 dims by a fixed
random matrix, plus isotropic noise as large as the signal, L2-normalised -- a stand-in for sentence or
image embeddings, which have a low intrinsic dimension. One "gaussian" row (i.i.d. N(0, I), no
structure) shows the worst case, where nearest neighbours are barely nearer than anything else.
FAISS runs on one thread (``faiss.omp_set_num_threads(1)``) for everything timed; only the exact
ground truth uses every core.

    python -m benchmarks.memory_search [--quick] [--json PATH]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from benchmarks._common import LoadMeter, cli
from cl.memory import ExperienceMemory

DIM = 384
K = 10
N_QUERIES = 1000
ADD_BATCH = 10_000
EXPERIENCES = 10


def clustered(n: int, seed: int, n_clusters: int = 1000, latent: int = 32, noise: float = 1.0) -> np.ndarray:
    """Unit vectors: cluster centre + spread in a 32-dim latent space, projected, plus full-rank noise."""
    world = np.random.default_rng(12345)  # the same clusters and projection for data and queries
    proj = world.standard_normal((latent, DIM)) / np.sqrt(DIM)
    centres = world.standard_normal((n_clusters, latent))
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        z = centres[rng.integers(n_clusters, size=m)] + 0.5 * rng.standard_normal((m, latent))
        signal = z @ proj
        scale = noise * np.linalg.norm(signal, axis=1, keepdims=True) / np.sqrt(DIM)
        x = signal + scale * rng.standard_normal((m, DIM))
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def gaussian(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)


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
    mem.search(q[:10], K, **kw)  # warm-up
    times, ids = np.empty(len(q)), np.empty((len(q), K), np.int64)
    cpu0 = time.thread_time()
    for i in range(len(q)):
        t0 = time.perf_counter()
        ids[i] = mem.search(q[i : i + 1], K, **kw).ids[0]
        times[i] = time.perf_counter() - t0
    return times, (time.thread_time() - cpu0) / len(q), ids


def measure(name: str, n: int, data: str, index: str = "auto", sweep: list[int] | None = None) -> dict[str, Any]:
    make = clustered if data == "clustered" else gaussian
    x, q = make(n, 1), make(N_QUERIES, 2)
    per_exp = -(-n // EXPERIENCES)
    meta = [{"kind": "exemplar", "experience": i // per_exp, "class": i % 100} for i in range(n)]
    truth = exact_knn(x, q, K)
    sub = np.arange(min(per_exp, n))  # experience 0
    truth_filtered = sub[exact_knn(x[sub], q, K)]
    load_before = os.getloadavg()
    with LoadMeter() as load:
        mem = ExperienceMemory(DIM, metric="ip", index=index)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        for s in range(0, n, ADD_BATCH):
            mem.add(x[s : s + ADD_BATCH], meta[s : s + ADD_BATCH])
        t_add, cpu_add = time.perf_counter() - t0, time.thread_time() - cpu0
        lat, cpu, found = latencies(mem, q, kind="exemplar")
        t0, cpu0 = time.perf_counter(), time.thread_time()
        batch = mem.search(q, K, kind="exemplar")
        t_batch, cpu_batch = time.perf_counter() - t0, time.thread_time() - cpu0
        lat_f, _, found_f = latencies(mem, q, kind="exemplar", experience=0)
        sweep_rows = []
        for ef in sweep or []:
            mem.config.ef_search = ef
            lat_s, cpu_s, found_s = latencies(mem, q, kind="exemplar", with_metadata=False)
            sweep_rows.append({"ef_search": ef, "p50 ms": 1e3 * float(np.median(lat_s)),
                               "mean ms": 1e3 * float(lat_s.mean()), "cpu ms/q": 1e3 * cpu_s,
                               "recall@10": recall(found_s, truth)})
            print(f"  {name}: ef_search={ef}: {sweep_rows[-1]}", flush=True)
        mem.config.ef_search = ExperienceMemory(DIM).config.ef_search
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
            t0 = time.perf_counter()
            mem.save(Path(tmp) / "mem")
            t_save = time.perf_counter() - t0
            disk = sum(f.stat().st_size for f in (Path(tmp) / "mem").rglob("*") if f.is_file())
            t0 = time.perf_counter()
            ExperienceMemory.load(Path(tmp) / "mem")
            t_load = time.perf_counter() - t0
    assert (batch.ids == found).all(), "batched and single-query searches disagree"
    row = {
        "case": name, "data": data, "n": n, "index": mem.structures()["exemplar"],
        "setting": _setting(mem), "add vec/s": n / t_add, "add s": t_add, "add cpu s": cpu_add,
        "p50 ms": 1e3 * float(np.median(lat)), "p99 ms": 1e3 * float(np.quantile(lat, 0.99)),
        "mean ms": 1e3 * float(lat.mean()), "cpu ms/q": 1e3 * cpu,
        "batch q/s": N_QUERIES / t_batch, "batch cpu ms/q": 1e3 * cpu_batch / N_QUERIES,
        "recall@10": recall(found, truth),
        "filtered p50 ms": 1e3 * float(np.median(lat_f)), "filtered recall@10": recall(found_f, truth_filtered),
        "save s": t_save, "load s": t_load, "disk MB": disk / 2**20,
        "other load": load.other_cores, "loadavg before": load_before, "loadavg after": os.getloadavg(),
        "ef_search sweep": sweep_rows,
    }
    print(f"  {name}: {row}", flush=True)
    return row


def _setting(mem: ExperienceMemory) -> str:
    c, s = mem.config, mem.structures()["exemplar"]
    if s == "hnsw":
        return f"M={c.hnsw_m}, efConstruction={c.ef_construction}, efSearch={c.ef_search}"
    if s == "ivf":
        return f"nlist={mem._indexes['exemplar'].index.nlist}, nprobe={c.nprobe}"
    return "exact"


def run(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    if quick:
        cases = [("clustered 2k", 2_000, "clustered", "auto", None), ("clustered 30k", 30_000, "clustered", "auto",
                                                                          [16, 64])]
    else:
        cases = [
            ("clustered 10k", 10_000, "clustered", "auto", None),
            ("clustered 100k", 100_000, "clustered", "auto", [16, 32, 64, 128]),
            ("clustered 100k, index=ivf", 100_000, "clustered", "ivf", None),
            ("gaussian 100k", 100_000, "gaussian", "auto", [128, 512]),
            ("clustered 1M", 1_000_000, "clustered", "auto", [32, 64, 128, 192, 256]),
        ]
    rows = [measure(*case) for case in cases]
    return {
        "rows": rows,
        "notes": [
            "ExperienceMemory(384, metric='ip', index='auto' unless stated), filled in batches of 10,000 with "
            "metadata; add vec/s includes metadata validation, SQLite inserts and the one flat->HNSW switch",
            "p50/p99/mean ms: wall time of one query per search() call, metadata included; cpu ms/q: the CPU time "
            "of those calls per query (time.thread_time: what a quiet machine would take, less cache effects); "
            "batch: 1,000 queries in one call; filtered: experience=0 (1 in 10); recall@10 against exact search "
            "(faiss.knn)",
            f"FAISS threads for timed parts: 1 (of {os.cpu_count()} CPUs); other load = CPU cores other processes "
            "used meanwhile (~0 = clean); loadavg = os.getloadavg() before and after",
        ],
    }


COLUMNS = ["case", "index", "setting", "add vec/s", "p50 ms", "p99 ms", "mean ms", "cpu ms/q", "batch q/s", "recall@10",
           "filtered p50 ms", "filtered recall@10", "save s", "load s", "disk MB", "other load"]


def main(argv: list[str] | None = None) -> None:
    cli("memory_search", run, COLUMNS, argv)


if __name__ == "__main__":
    main()
