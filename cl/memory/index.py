"""The FAISS index of one kind of entry: exact while small, HNSW or IVF once it outgrows a threshold.

``structure`` is the index in use: ``flat`` (``IndexIDMap2`` over ``IndexFlat``, exact), ``hnsw``
(``IndexIDMap2`` over ``IndexHNSWFlat``) or ``ivf`` (``IndexIVFFlat`` holding the ids itself, with a
hash-table direct map so entries can be read back and removed by id). The policy ``auto`` starts flat and
rebuilds once as HNSW when an add crosses ``exact_threshold``; ``ivf`` starts flat and trains its
coarse quantizer once, on the vectors held at that moment, then keeps adding. Ids are the memory's ids,
so they never change when other entries are removed.

HNSW graphs cannot delete nodes: a removed id becomes a tombstone, excluded from every search by an
``IDSelector``, and the graph is rebuilt from the live vectors once tombstones exceed
``compact_fraction`` of it (amortised, and never on add).

A filtered search (a subset of this kind's ids) is exact when the subset is at most ``exact_threshold``
ids: their vectors are gathered (once, until the memory changes) and searched by brute force, which
beats scanning or walking the whole index and keeps HNSW away from very selective filters, where graph
search degrades. A larger subset goes through the index with an ``IDSelectorBitmap`` (exact for
``flat``, with the usual HNSW/IVF recall otherwise).

With a GPU (``faiss.get_num_gpus() > 0``), unfiltered searches of flat and IVF indexes run on a GPU copy
kept in sync on add and rebuilt after a remove; HNSW stays on the CPU (FAISS has no GPU HNSW) and
anything the GPU cannot do falls back to the CPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from cl.errors import ConfigError

INDEX_TYPES: tuple[str, ...] = ("auto", "flat", "hnsw", "ivf")
METRICS: dict[str, int] = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
GPU_MAX_K = 2048  # largest k FAISS GPU searches accept


@dataclass
class IndexConfig:
    """How each kind's index is built and searched (``ef_search``/``nprobe`` apply from the next search)."""

    index: str = "auto"
    exact_threshold: int = 10_000  # flat (exact) up to this many vectors of one kind
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 40  # HNSW build beam width
    ef_search: int = 128  # HNSW search beam width (raised to k when k is larger)
    nlist: int | None = None  # IVF lists; None: 4 sqrt(n) at training time, a power of two
    nprobe: int = 32  # IVF lists visited per query
    compact_fraction: float = 0.25  # rebuild an HNSW graph when this share of it is tombstones

    def validate(self) -> None:
        if self.index not in INDEX_TYPES:
            raise ConfigError(f"unknown memory index {self.index!r} (choose one of {', '.join(INDEX_TYPES)})")
        for name in ("exact_threshold", "hnsw_m", "ef_construction", "ef_search", "nprobe"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"memory {name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"memory nlist must be >= 1 or None, got {self.nlist}")
        if not 0 < self.compact_fraction <= 1:
            raise ConfigError(f"memory compact_fraction must be in (0, 1], got {self.compact_fraction}")


def _gpu_clone(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` on GPU 0 (module-level so tests can stand in a CPU clone)."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


_GPU_RESOURCES: Any = None


def gpu_available() -> bool:
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
        self.removed = np.empty(0, np.int64)  # HNSW tombstones, sorted
        self._not_removed: Any = None  # cached IDSelectorNot over the tombstones
        self._mirror: Any = None  # GPU copy: (gpu index, position -> id map or None for IVF)
        self._structure: tuple[Any, str] = (None, "flat")  # (index it describes, its structure)

    # -- state ------------------------------------------------------------------------------------

    @property
    def structure(self) -> str:
        if self._structure[0] is not self.index:
            inner = self.index.index if isinstance(self.index, faiss.IndexIDMap2) else self.index
            inner = faiss.downcast_index(inner) if inner is not None else None
            kind = "ivf" if isinstance(inner, faiss.IndexIVF) else "flat"
            self._structure = (self.index, "hnsw" if isinstance(inner, faiss.IndexHNSW) else kind)
        return self._structure[1]

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

    def attach(self, index: Any, live_ids: np.ndarray) -> bool:
        """Use a loaded ``index`` whose live entries are ``live_ids`` (sorted); HNSW ids missing from it
        become tombstones again. False when the index and the ids disagree."""
        self.index, self._not_removed, self._mirror = index, None, None
        if self.structure == "ivf":
            self.removed = np.empty(0, np.int64)
            return self.ntotal == len(live_ids)
        stored = self.stored_ids()
        self.removed = np.setdiff1d(stored, live_ids)
        return bool(np.isin(live_ids, stored).all()) and (self.structure == "hnsw" or not len(self.removed))

    # -- building ---------------------------------------------------------------------------------

    def _target(self, n: int) -> str:
        """The structure a kind of ``n`` vectors should have under the policy."""
        policy = self.config.index
        if policy in ("flat", "hnsw"):
            return policy
        if n <= self.config.exact_threshold:
            return "flat"
        return "hnsw" if policy == "auto" else "ivf"

    def _new(self, structure: str, train: np.ndarray | None = None) -> faiss.Index:
        metric = METRICS[self.metric]
        if structure == "flat":
            return faiss.index_factory(self.dim, "IDMap2,Flat", metric)
        if structure == "hnsw":
            index = faiss.index_factory(self.dim, f"IDMap2,HNSW{self.config.hnsw_m},Flat", metric)
            faiss.downcast_index(index.index).hnsw.efConstruction = self.config.ef_construction
            return index
        assert train is not None
        nlist = self.config.nlist or 2 ** round(math.log2(max(4 * math.sqrt(len(train)), 1)))
        nlist = max(1, min(nlist, len(train) // 39 or 1))  # FAISS wants >= 39 training points per list
        index = faiss.index_factory(self.dim, f"IVF{nlist},Flat", metric)
        index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index

    def _rebuild(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        structure = self._target(len(ids))
        index = self._new(structure, vectors if structure == "ivf" else None)
        if len(ids):
            index.add_with_ids(vectors, ids)
        self.index, self.removed, self._not_removed, self._mirror = index, np.empty(0, np.int64), None, None

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids (sorted) and vectors of the live entries (flat and HNSW; for IVF, pass ids to ``reconstruct``)."""
        ids = np.sort(self.stored_ids())
        if len(self.removed):
            ids = ids[~np.isin(ids, self.removed, assume_unique=True)]
        return ids, self.reconstruct(ids)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add rows with their ids; an add that crosses the threshold converts a flat index once."""
        n_after = len(self) + len(ids)
        structure = self.structure
        if self.index is None:
            self._rebuild(vectors, ids)
            return
        if structure == "flat" and self._target(n_after) != "flat":
            old = self.stored_ids()
            self._rebuild(np.concatenate([self.reconstruct(old), vectors]), np.concatenate([old, ids]))
            return
        self.index.add_with_ids(vectors, ids)
        if self._mirror is not None:
            gpu_index, positions = self._mirror
            if positions is None:
                gpu_index.add_with_ids(vectors, ids)
            else:
                gpu_index.add(vectors)
                self._mirror = (gpu_index, np.concatenate([positions, ids]))

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
            self.index = None

    # -- reading ----------------------------------------------------------------------------------

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.empty((0, self.dim), np.float32)
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def _params(self, k: int, sel: Any) -> Any:
        structure = self.structure
        if structure == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.config.ef_search, k)
        elif structure == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = min(self.config.nprobe, self.index.nlist)
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
        if subset is not None:
            sel = subset.selector()
        elif len(self.removed):
            if self._not_removed is None:
                inner, bitmap = _bitmap_selector(self.removed)
                self._not_removed = (faiss.IDSelectorNot(inner), inner, bitmap)  # keep what it reads alive
            sel = self._not_removed[0]
        else:
            sel = None
            if self.gpu and k <= GPU_MAX_K and self.structure != "hnsw":
                out = self._gpu_search(queries, k)
                if out is not None:
                    return out
        params = self._params(k, sel)
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
                gpu_index.nprobe = min(self.config.nprobe, self.index.nlist)
            scores, found = gpu_index.search(queries, k)
        except (RuntimeError, AttributeError) as e:  # no GPU support for this index, or out of GPU memory
            warnings.warn(f"experience memory: GPU search failed ({e}); searching on the CPU", stacklevel=3)
            self.gpu, self._mirror = False, None
            return None
        if positions is not None:
            found = np.where(found >= 0, positions[np.maximum(found, 0)], -1)
        return _clean(scores, found, self.metric)


def _empty(nq: int, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    fill = -np.inf if metric == "ip" else np.inf
    return np.full((nq, k), fill, np.float32), np.full((nq, k), -1, np.int64)


def _clean(scores: np.ndarray, ids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads missing hits with id -1 and +-FLT_MAX; use -inf (ip) / +inf (l2) so merges sort right."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    scores[ids < 0] = -np.inf if metric == "ip" else np.inf
    return scores, ids
