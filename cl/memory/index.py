"""The FAISS index of one kind of entry: exact while small or hard, IVF or HNSW tuned to a recall target.

``structure`` is the index in use: ``flat`` (``IndexIDMap2`` over ``IndexFlat``, exact), ``ivf``
(``IndexIVFFlat`` holding the ids itself, with a hash-table direct map so entries can be read back and
removed by id) or ``hnsw`` (``IndexIDMap2`` over ``IndexHNSWFlat``). Ids are the memory's ids, so they never
change when other entries are removed.

Policies. ``auto`` stays exact up to ``exact_threshold`` vectors. Past it, it trains an IVF quantizer on a
sample and tunes ``nprobe`` (below); it switches to IVF only if that searches at most ``IVF_MAX_SCAN`` of the
vectors (quantizer included), and otherwise stays exact and asks again at ``PROBE_GROWTH`` times the size.
On data without structure (i.i.d. random vectors) no index beats a scan at a useful recall, so those stay
exact; on clustered data (embeddings) IVF scans a few percent. ``ivf`` always switches past the threshold;
``hnsw`` is HNSW from the first vector; ``flat`` is always exact.

Tuning. Search settings are chosen for recall@10 >= ``tune_recall`` on a held-out sample: up to
``TUNE_QUERIES`` stored vectors used as queries, each searched without itself, against exact results.
IVF: the exact neighbours of each query are assigned to their lists, and ``nprobe`` is the smallest number
of nearest lists that holds the target share of them -- what an IVF search at that ``nprobe`` finds,
computed without searching; the quantizer is trained on other vectors than the queries, so they are held
out. HNSW: ``efSearch`` is raised step by step until the queries reach the target (a warning when
``HNSW_MAX_EF`` does not); a graph links every stored vector to its neighbours, which makes stored vectors
easy queries, so the queries are rows held back from the batch being added and inserted after tuning
(stored vectors only when the batch has fewer than ``2 * HNSW_MIN_HELD_OUT`` rows). Tuning happens when
the structure is built and again each time the kind has doubled since; an IVF retrains its quantizer (one
rebuild) when the kind has grown fourfold and would get more lists. Adding is otherwise incremental, and
the rebuilds are geometric (amortised O(1) per entry). The tuned values live in the FAISS index
(``nprobe``, ``hnsw.efSearch``), so a saved index keeps them, and the bookkeeping (``Tuning``) goes into
the memory's manifest. An explicit ``ef_search`` or ``nprobe`` replaces the tuned value.

HNSW graphs cannot delete nodes: a removed id becomes a tombstone, excluded from every search by an
``IDSelector``, and the graph is rebuilt from the live vectors once tombstones exceed
``compact_fraction`` of it (amortised, and never on add).

A filtered search (a subset of this kind's ids) is exact when the subset is at most ``exact_threshold``
ids: their vectors are gathered (once, until the memory changes) and searched by brute force, which
beats scanning or walking the whole index and keeps HNSW away from very selective filters, where graph
search degrades. A larger subset goes through the index with an ``IDSelectorBitmap`` (exact for ``flat``;
``nprobe``/``efSearch`` are scaled by the inverse share of the kind the subset is, so as many candidates
pass the filter as an unfiltered search would see).

With a GPU (``faiss.get_num_gpus() > 0``), unfiltered searches of flat and IVF indexes run on a GPU copy
kept in sync on add and rebuilt after a remove; HNSW stays on the CPU (FAISS has no GPU HNSW) and
anything the GPU cannot do falls back to the CPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cl.errors import ConfigError
from cl.lazy import lazy_import

faiss = lazy_import("faiss")  # loaded at its first use (cl.lazy)

INDEX_TYPES: tuple[str, ...] = ("auto", "flat", "hnsw", "ivf")
#: faiss.METRIC_INNER_PRODUCT and faiss.METRIC_L2 (values of FAISS's MetricType enum, part of its stable API; named
#: here so that checking a metric does not load FAISS)
METRICS: dict[str, int] = {"ip": 0, "l2": 1}
GPU_MAX_K = 2048  # largest k FAISS GPU searches accept
TUNE_K = 10  # settings are tuned for recall@10
TUNE_QUERIES = 300  # held-out queries per tuning (recall over 3,000 neighbours)
IVF_MAX_SCAN = 0.5  # auto: IVF only when a search scans at most this share of the vectors, else exact
TRAIN_PER_LIST = 40  # IVF quantizer training sample, per list (FAISS wants at least 39)
PROBE_GROWTH = 4  # auto, exact: after an IVF trial that does not pay, the next one at this many times the size
SIZE_SAMPLE = 50_000  # vectors assigned to estimate the IVF list sizes before deciding to build one
HNSW_EF_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
HNSW_MAX_EF = HNSW_EF_STEPS[-1]
HNSW_MIN_HELD_OUT = 100  # an HNSW tunes on new rows held back from a batch of at least twice this many
_CHUNK = 65_536  # rows per exact-search block


@dataclass
class IndexConfig:
    """How each kind's index is built and searched (``ef_search``/``nprobe``: None = tuned; a number fixes it)."""

    index: str = "auto"
    exact_threshold: int = 10_000  # exact up to this many vectors of one kind (auto, ivf)
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 40  # HNSW build beam width
    ef_search: int | None = None  # HNSW search beam width (raised to k when k is larger); None: tuned
    nlist: int | None = None  # IVF lists; None: about sqrt(n) at training time, a power of two
    nprobe: int | None = None  # IVF lists visited per query; None: tuned
    tune_recall: float = 0.97  # recall@10 the tuned settings reach on a held-out sample of stored vectors
    compact_fraction: float = 0.25  # rebuild an HNSW graph when this share of it is tombstones

    def validate(self) -> None:
        if self.index not in INDEX_TYPES:
            raise ConfigError(f"unknown memory index {self.index!r} (choose one of {', '.join(INDEX_TYPES)})")
        for name in ("exact_threshold", "hnsw_m", "ef_construction"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"memory {name} must be >= 1, got {getattr(self, name)}")
        for name in ("ef_search", "nlist", "nprobe"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise ConfigError(f"memory {name} must be >= 1 or None (tuned), got {value}")
        if not 0 < self.tune_recall <= 1:
            raise ConfigError(f"memory tune_recall must be in (0, 1], got {self.tune_recall}")
        if not 0 < self.compact_fraction <= 1:
            raise ConfigError(f"memory compact_fraction must be in (0, 1], got {self.compact_fraction}")


@dataclass
class Tuning:
    """When and how a kind's search settings were last tuned (saved in the memory's manifest)."""

    tuned_at: int = 0  # live entries when ef_search/nprobe were last tuned (0: not yet)
    trained_at: int = 0  # IVF: live entries when its quantizer was trained
    next_probe: int = 0  # auto, exact: the size at which IVF is considered again (0: past the threshold)
    recall: float | None = None  # recall@10 on the held-out sample at the last tuning (exact: 1.0)
    scan: float | None = None  # IVF: share of the vectors a search scans, quantizer included


def _gpu_clone(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` on GPU 0 (module-level so tests can stand in a CPU clone)."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


_GPU_RESOURCES: Any = None


def gpu_available() -> bool:
    """Whether FAISS searches on a GPU here: a GPU build of faiss and a device. Where torch, built for CUDA, sees
    no device, there is none for FAISS either, and faiss stays unloaded."""
    import torch

    if torch.version.cuda is not None and not torch.cuda.is_available():
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _bitmap_selector(ids: np.ndarray) -> tuple[Any, np.ndarray]:
    """An ``IDSelectorBitmap`` holding ``ids`` (one bit per id up to the largest: O(1) membership tests,
    1 MB for 8M ids) and the bitmap it reads, which must outlive it."""
    mask = np.zeros(int(ids.max()) + 1, dtype=bool)
    mask[ids] = True
    bitmap = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(bitmap), bitmap


@dataclass
class Subset:
    """The ids a filtered search is restricted to, with what searching them needs, built on first use:
    their vectors (small subsets, searched by brute force) or a FAISS selector (large ones)."""

    ids: np.ndarray
    vectors: np.ndarray | None = None
    _selector: tuple[Any, np.ndarray] | None = None

    def selector(self) -> Any:
        if self._selector is None:
            self._selector = _bitmap_selector(self.ids)
        return self._selector[0]

    @property
    def nbytes(self) -> int:
        extra = self.vectors.nbytes if self.vectors is not None else 0
        return self.ids.nbytes + extra + (self._selector[1].nbytes if self._selector is not None else 0)


class KindIndex:
    """Vectors of one kind with the memory's ids; see the module docstring for the policy."""

    def __init__(self, dim: int, metric: str, config: IndexConfig, gpu: bool = False) -> None:
        self.dim, self.metric, self.config, self.gpu = dim, metric, config, gpu
        self.index: Any = None  # None while the kind is empty
        self.tuning = Tuning()
        self.removed = np.empty(0, np.int64)  # HNSW tombstones, sorted
        self._not_removed: Any = None  # cached IDSelectorNot over the tombstones
        self._mirror: Any = None  # GPU copy: (gpu index, position -> id map or None for IVF)
        self._structure: tuple[Any, str, Any] = (None, "flat", None)  # (index it describes, structure, inner)

    # -- state ------------------------------------------------------------------------------------

    def _describe(self) -> tuple[str, Any]:
        if self._structure[0] is not self.index:
            inner = self.index.index if isinstance(self.index, faiss.IndexIDMap2) else self.index
            inner = faiss.downcast_index(inner) if inner is not None else None
            kind = "hnsw" if isinstance(inner, faiss.IndexHNSW) else "ivf" if isinstance(inner, faiss.IndexIVF) \
                else "flat"
            self._structure = (self.index, kind, inner)
        return self._structure[1], self._structure[2]

    @property
    def structure(self) -> str:
        return self._describe()[0]

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal - len(self.removed)

    def stored_ids(self) -> np.ndarray:
        """Every id in the index, tombstones included (flat and HNSW only: IVF keeps ids in its lists)."""
        if self.index is None:
            return np.empty(0, np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)

    def live_ids(self) -> np.ndarray:
        """The ids of the live entries, sorted."""
        if self.index is None:
            return np.empty(0, np.int64)
        if self.structure == "ivf":
            return np.sort(np.concatenate([ids for ids, _ in self._lists()] or [np.empty(0, np.int64)]))
        ids = np.sort(self.stored_ids())
        return ids[~np.isin(ids, self.removed, assume_unique=True)] if len(self.removed) else ids

    def ef_search(self) -> int:
        """HNSW: the search beam width in use (the configured one, else the tuned one)."""
        return int(self.config.ef_search or self._describe()[1].hnsw.efSearch)

    def nprobe(self) -> int:
        """IVF: the lists visited per query (the configured number, else the tuned one)."""
        return int(min(self.config.nprobe or self.index.nprobe, self.index.nlist))

    def settings(self) -> dict[str, Any]:
        """The structure and search settings in use, with the sample recall of the last tuning."""
        structure = self.structure
        out: dict[str, Any] = {"structure": structure, "entries": len(self)}
        if structure == "hnsw":
            out.update(M=self.config.hnsw_m, ef_construction=self.config.ef_construction, ef_search=self.ef_search())
        elif structure == "ivf":
            out.update(nlist=int(self.index.nlist), nprobe=self.nprobe())
        out.update(sample_recall=self.tuning.recall, scan=self.tuning.scan)
        return out

    def attach(self, index: Any, live_ids: np.ndarray, tuning: Tuning | None = None) -> bool:
        """Use a loaded ``index`` whose live entries are ``live_ids`` (sorted); HNSW ids missing from it
        become tombstones again. False when the index and the ids disagree."""
        self.index, self._not_removed, self._mirror = index, None, None
        self.tuning = tuning or Tuning()
        if self.structure == "ivf":
            self.removed = np.empty(0, np.int64)
            return self.ntotal == len(live_ids)
        stored = self.stored_ids()
        self.removed = np.setdiff1d(stored, live_ids)
        return bool(np.isin(live_ids, stored).all()) and (self.structure == "hnsw" or not len(self.removed))

    # -- building ---------------------------------------------------------------------------------

    def _new(self, structure: str) -> faiss.Index:
        metric = METRICS[self.metric]
        if structure == "flat":
            return faiss.index_factory(self.dim, "IDMap2,Flat", metric)
        index = faiss.index_factory(self.dim, f"IDMap2,HNSW{self.config.hnsw_m},Flat", metric)
        faiss.downcast_index(index.index).hnsw.efConstruction = self.config.ef_construction
        return index

    def _nlist(self, n: int) -> int:
        """IVF lists for ``n`` vectors: about 2 sqrt(n), a power of two with at least 39 vectors per list."""
        if self.config.nlist:
            return max(1, min(int(self.config.nlist), n // 39 or 1))
        return 2 ** max(0, min(round(math.log2(max(2 * math.sqrt(n), 1))), int(math.log2(max(n // 39, 1)))))

    def _set(self, index: Any, tuning: Tuning) -> None:
        self.index, self.tuning = index, tuning
        self.removed, self._not_removed, self._mirror = np.empty(0, np.int64), None, None

    def _rebuild(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """A new index of the policy's first structure (HNSW: the same as before, keeping its tuned ef)."""
        structure = "hnsw" if self.config.index == "hnsw" else "flat"
        index = self._new(structure)
        if structure == "hnsw" and self.structure == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self._describe()[1].hnsw.efSearch
        if len(ids):
            index.add_with_ids(vectors, ids)
        self._set(index, self.tuning if structure == "hnsw" and self.index is not None else Tuning())

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add rows with their ids; past a size milestone, retune (or switch structure) once.

        An HNSW due for tuning holds back up to TUNE_QUERIES rows of a large enough batch, tunes efSearch with
        them as queries (they are not in the graph yet, like any new query), then inserts them."""
        n_after = len(self) + len(ids)
        held_out = None
        if (self.config.index == "hnsw" and self.config.ef_search is None and n_after >= 2 * self.tuning.tuned_at
                and len(ids) >= 2 * HNSW_MIN_HELD_OUT):
            rng = np.random.default_rng([n_after, 3])
            mask = np.zeros(len(ids), bool)
            mask[rng.choice(len(ids), min(TUNE_QUERIES, len(ids) // 2), replace=False)] = True
            held_out = (vectors[mask], ids[mask])
            vectors, ids = vectors[~mask], ids[~mask]
        self._insert(vectors, ids)
        if held_out is not None:
            self._tune_hnsw(held_out[0])
            self._insert(*held_out)
            self.tuning.tuned_at = n_after
        self._grown()

    def _insert(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self.index is None:
            self._rebuild(vectors, ids)
            return
        self.index.add_with_ids(vectors, ids)
        if self._mirror is not None:
            gpu_index, positions = self._mirror
            if positions is None:
                gpu_index.add_with_ids(vectors, ids)
            else:
                gpu_index.add(vectors)
                self._mirror = (gpu_index, np.concatenate([positions, ids]))

    def _grown(self) -> None:
        """What a larger kind needs: an IVF trial, a retrained or retuned IVF, a retuned HNSW."""
        n, structure, config, tuning = len(self), self.structure, self.config, self.tuning
        if structure == "flat":
            if config.index in ("auto", "ivf") and n > config.exact_threshold and n >= tuning.next_probe:
                self._build_ivf()
        elif structure == "ivf":
            if config.nlist is None and n >= 4 * tuning.trained_at and self._nlist(n) > self.index.nlist:
                self._build_ivf()
            elif n >= 2 * tuning.tuned_at:
                self._tune_ivf()
        elif structure == "hnsw" and n >= 2 * tuning.tuned_at:
            self._tune_hnsw()

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (all present); HNSW tombstones them and compacts past ``compact_fraction``."""
        self._mirror = None
        if self.structure == "hnsw":
            self.removed = np.union1d(self.removed, ids)
            self._not_removed = None
            if len(self.removed) >= self.config.compact_fraction * self.ntotal:
                ids, vectors = self.live()
                self._rebuild(vectors, ids)
            return
        if self.structure == "ivf":
            self.index.remove_ids(faiss.IDSelectorArray(ids))
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        if len(self) == 0:
            self.index, self.tuning = None, Tuning()

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids (sorted) and vectors of the live entries."""
        ids = self.live_ids()
        return ids, self.reconstruct(ids)

    # -- tuning -----------------------------------------------------------------------------------

    def _blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The live entries as (ids, vectors) blocks of about ``_CHUNK`` rows, without copying flat storage."""
        structure, inner = self._describe()
        if structure == "ivf":
            ids_acc: list[np.ndarray] = []
            vec_acc: list[np.ndarray] = []
            for ids, vectors in self._lists():
                ids_acc.append(ids)
                vec_acc.append(vectors)
                if sum(map(len, ids_acc)) >= _CHUNK:
                    yield np.concatenate(ids_acc), np.concatenate(vec_acc)
                    ids_acc, vec_acc = [], []
            if ids_acc:
                yield np.concatenate(ids_acc), np.concatenate(vec_acc)
            return
        store = inner if structure == "flat" else faiss.downcast_index(inner.storage)
        n = int(store.ntotal)
        xb = faiss.rev_swig_ptr(store.get_xb(), n * self.dim).reshape(n, self.dim)
        ids = self.stored_ids()
        live = ~np.isin(ids, self.removed) if len(self.removed) else None
        for start in range(0, n, _CHUNK):
            block_ids, block = ids[start : start + _CHUNK], xb[start : start + _CHUNK]
            if live is not None:
                keep = live[start : start + _CHUNK]
                block_ids, block = block_ids[keep], block[keep]
            yield block_ids, block

    def _lists(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """IVF: (ids, vectors) of each non-empty list, as views into the index (valid while it is unchanged)."""
        invlists = self.index.invlists
        for list_no in range(self.index.nlist):
            size = invlists.list_size(list_no)
            if size:
                codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size)
                ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
                yield ids, codes.view(np.float32).reshape(size, self.dim)

    def exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores and ids ``[nq, k]`` over the live entries, whatever the structure (blocked brute force)."""
        scores, ids = _empty(len(queries), k, self.metric)
        for block_ids, block in self._blocks():
            s, pos = faiss.knn(queries, block, min(k, len(block)), metric=METRICS[self.metric])
            s, i = np.hstack([scores, s]), np.hstack([ids, np.where(pos >= 0, block_ids[np.maximum(pos, 0)], -1)])
            order = np.argsort(-s if self.metric == "ip" else s, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        return scores, ids

    def _sample(self, size: int, salt: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """``size`` live ids not in ``exclude``, drawn without replacement (sorted); the same for the same entries."""
        ids = self.live_ids()
        if exclude is not None and len(exclude) < len(ids):
            ids = ids[~np.isin(ids, exclude)]
        if size >= len(ids):
            return ids
        return np.sort(np.random.default_rng([len(ids), salt]).choice(ids, size, replace=False))

    def _held_out(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Sample query ids, their vectors and their exact ``k`` nearest other entries (None below 2 entries)."""
        k = min(TUNE_K, n - 1)
        if k < 1:
            return None
        qids = self._sample(TUNE_QUERIES, salt=0)
        queries = self.reconstruct(qids)
        return qids, queries, _without_self(self.exact(queries, k + 1)[1], qids)

    def _ivf_ranks(self, ivf: Any, held_out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
        """The lists of ``ivf`` nearest first for each query ``[m, nlist]``, and for each exact neighbour the
        position of its list in its query's order (a search at ``nprobe`` finds it iff that is < nprobe)."""
        _, queries, truth = held_out
        quantizer = faiss.downcast_index(ivf.quantizer)
        nlist = int(ivf.nlist)
        _, order = quantizer.search(queries, nlist)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(nlist), order.shape), axis=1)
        rows, cols = np.nonzero(truth >= 0)
        _, lists = quantizer.search(self.reconstruct(truth[rows, cols]), 1)
        return order, rank[rows, lists[:, 0]]

    def _pick_nprobe(self, ranks: np.ndarray, nlist: int) -> tuple[int, float]:
        if self.config.nprobe:
            nprobe = min(int(self.config.nprobe), nlist)
        else:
            need = math.ceil(self.config.tune_recall * len(ranks) - 1e-9)
            nprobe = int(np.sort(ranks)[max(need, 1) - 1]) + 1 if len(ranks) else 1
        return nprobe, float((ranks < nprobe).mean()) if len(ranks) else 1.0

    @staticmethod
    def _scan(order: np.ndarray, sizes: np.ndarray, nprobe: int, n: int) -> float:
        """Mean share of the ``n`` vectors a search at ``nprobe`` compares with (list entries and centroids)."""
        return float((sizes[order[:, :nprobe]].sum(1).mean() + len(sizes)) / n)

    def _build_ivf(self) -> None:
        """Train an IVF quantizer on a sample, tune nprobe, and move the entries into it; under ``auto``,
        only if it scans at most IVF_MAX_SCAN of them (else stay, or become, exact for a while)."""
        n = len(self)
        held_out = self._held_out(n)
        ivf = faiss.index_factory(self.dim, f"IVF{self._nlist(n)},Flat", METRICS[self.metric])
        assert held_out is not None  # n > exact_threshold >= 1
        spare = n - len(held_out[0]) >= 39 * ivf.nlist  # train on other vectors than the queries, if enough
        ivf.train(self.reconstruct(self._sample(TRAIN_PER_LIST * int(ivf.nlist), salt=1,
                                                exclude=held_out[0] if spare else None)))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        order, ranks = self._ivf_ranks(ivf, held_out)
        nprobe, recall = self._pick_nprobe(ranks, int(ivf.nlist))
        quantizer = faiss.downcast_index(ivf.quantizer)
        _, lists = quantizer.search(self.reconstruct(self._sample(SIZE_SAMPLE, salt=2)), 1)
        sizes = np.bincount(lists[:, 0], minlength=ivf.nlist) * (n / len(lists))
        if self.config.index == "auto" and self._scan(order, sizes, nprobe, n) > IVF_MAX_SCAN:
            if self.structure != "flat":
                self._to_flat()
            self.tuning = Tuning(next_probe=PROBE_GROWTH * n, recall=1.0)
            return
        for ids, vectors in self._blocks():
            ivf.add_with_ids(np.ascontiguousarray(vectors), ids)
        ivf.nprobe = nprobe
        sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
        self._set(ivf, Tuning(tuned_at=n, trained_at=n, recall=recall, scan=self._scan(order, sizes, nprobe, n)))

    def _tune_ivf(self) -> None:
        """Retune nprobe on a fresh sample; under ``auto``, become exact if IVF no longer pays."""
        n = len(self)
        held_out = self._held_out(n)
        if held_out is None:
            return
        order, ranks = self._ivf_ranks(self.index, held_out)
        nprobe, recall = self._pick_nprobe(ranks, int(self.index.nlist))
        sizes = np.array([self.index.invlists.list_size(i) for i in range(self.index.nlist)])
        scan = self._scan(order, sizes, nprobe, n)
        if self.config.index == "auto" and scan > IVF_MAX_SCAN:
            self._to_flat()
            self.tuning = Tuning(next_probe=PROBE_GROWTH * n, recall=1.0)
            return
        self.index.nprobe = nprobe
        self.tuning = Tuning(tuned_at=n, trained_at=self.tuning.trained_at, recall=recall, scan=scan)

    def _to_flat(self) -> None:
        flat = self._new("flat")
        for ids, vectors in self._blocks():
            flat.add_with_ids(np.ascontiguousarray(vectors), ids)
        self._set(flat, Tuning())

    def _tune_hnsw(self, queries: np.ndarray | None = None) -> None:
        """Raise efSearch until held-out ``queries`` (vectors not in the graph) reach ``tune_recall`` (or
        HNSW_MAX_EF). Without them, stored vectors are the queries: optimistic, since each one's own node links
        to its neighbours (on clustered data, 0.98 on such a sample was 0.87 on new queries)."""
        n = len(self)
        if queries is not None:
            k = min(TUNE_K, n)
            qids, truth = np.full(len(queries), -1, np.int64), self.exact(queries, k)[1]
        else:
            held_out = self._held_out(n)
            if held_out is None:
                return
            qids, queries, truth = held_out
        hnsw = self._describe()[1].hnsw
        sel = self._selector(None)
        recall, ef = 0.0, HNSW_EF_STEPS[0]
        for ef in HNSW_EF_STEPS if self.config.ef_search is None else (int(self.config.ef_search),):
            params = faiss.SearchParametersHNSW()
            params.efSearch = ef
            if sel is not None:
                params.sel = sel
            found = self.index.search(queries, truth.shape[1] + 1, params=params)[1]
            found = _without_self(found, qids)  # no query is stored: drops the last column
            recall = _recall(found, truth)
            if recall >= self.config.tune_recall:
                break
        else:
            if self.config.ef_search is None:
                warnings.warn(f"experience memory: HNSW reaches recall@10 {recall:.2f} < {self.config.tune_recall} "
                              f"on a sample of {n:,} vectors at efSearch={ef}; these vectors have little structure "
                              "for a graph to use: index='auto' keeps them exact", stacklevel=4)
        hnsw.efSearch = ef
        self.tuning = Tuning(tuned_at=n, recall=recall)

    # -- reading ----------------------------------------------------------------------------------

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.empty((0, self.dim), np.float32)
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def _selector(self, subset: Subset | None) -> Any:
        if subset is not None:
            return subset.selector()
        if len(self.removed):
            if self._not_removed is None:
                inner, bitmap = _bitmap_selector(self.removed)
                self._not_removed = (faiss.IDSelectorNot(inner), inner, bitmap)  # keep what it reads alive
            return self._not_removed[0]
        return None

    def _params(self, k: int, sel: Any, matching: int) -> Any:
        """Search parameters; ``matching`` entries pass ``sel``: a selective filter widens the search to match."""
        structure = self.structure
        widen = self.ntotal / max(matching, 1)
        if structure == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(min(math.ceil(self.ef_search() * widen), max(self.ntotal, k)), k)
        elif structure == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = min(math.ceil(self.nprobe() * widen), int(self.index.nlist))
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        return params

    def search(self, queries: np.ndarray, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids ``[nq, k]`` (id -1 where fewer than k match); ``subset``: only these ids (all live)."""
        nq = len(queries)
        if self.index is None or len(self) == 0 or (subset is not None and len(subset.ids) == 0):
            return _empty(nq, k, self.metric)
        if subset is not None and len(subset.ids) <= self.config.exact_threshold:
            if subset.vectors is None:
                subset.vectors = self.reconstruct(subset.ids)
            return self._exact_subset(queries, k, subset.ids, subset.vectors)
        sel = self._selector(subset)
        if sel is None and self.gpu and k <= GPU_MAX_K and self.structure != "hnsw":
            out = self._gpu_search(queries, k)
            if out is not None:
                return out
        params = self._params(k, sel, len(subset.ids) if subset is not None else len(self))
        scores, ids = self.index.search(queries, k, params=params)
        return _clean(scores, ids, self.metric)

    def _exact_subset(self, queries: np.ndarray, k: int, subset: np.ndarray,
                      vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, len(subset))
        scores, pos = faiss.knn(queries, vectors, kk, metric=METRICS[self.metric])
        ids = np.where(pos >= 0, subset[np.maximum(pos, 0)], -1)
        if kk < k:
            pad_scores, pad_ids = _empty(len(queries), k - kk, self.metric)
            scores, ids = np.hstack([scores, pad_scores]), np.hstack([ids, pad_ids])
        return _clean(scores, ids, self.metric)

    def _gpu_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            if self._mirror is None:
                if self.structure == "ivf":
                    self._mirror = (_gpu_clone(self.index), None)
                else:
                    self._mirror = (_gpu_clone(self.index.index), self.stored_ids().copy())
            gpu_index, positions = self._mirror
            if positions is None:
                gpu_index.nprobe = self.nprobe()
            scores, found = gpu_index.search(queries, k)
        except (RuntimeError, AttributeError) as e:  # no GPU support for this index, or out of GPU memory
            warnings.warn(f"experience memory: GPU search failed ({e}); searching on the CPU", stacklevel=3)
            self.gpu, self._mirror = False, None
            return None
        if positions is not None:
            found = np.where(found >= 0, positions[np.maximum(found, 0)], -1)
        return _clean(scores, found, self.metric)


def _without_self(found: np.ndarray, qids: np.ndarray) -> np.ndarray:
    """``found [m, k+1]`` less each query's own id (or, where it is missing, the last column): ``[m, k]``."""
    is_self = found == qids[:, None]
    is_self[~is_self.any(1), -1] = True
    return found[~is_self].reshape(len(found), found.shape[1] - 1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the valid ids of ``truth`` that ``found`` holds in the same row."""
    valid = truth >= 0
    hit = (truth[:, :, None] == found[:, None, :]).any(2) & valid
    return float(hit.sum() / max(valid.sum(), 1))


def _empty(nq: int, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    fill = -np.inf if metric == "ip" else np.inf
    return np.full((nq, k), fill, np.float32), np.full((nq, k), -1, np.int64)


def _clean(scores: np.ndarray, ids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads missing hits with id -1 and +-FLT_MAX; use -inf (ip) / +inf (l2) so merges sort right."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    scores[ids < 0] = -np.inf if metric == "ip" else np.inf
    return scores, ids
