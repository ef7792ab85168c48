"""``ExperienceMemory``: vectors with typed metadata over FAISS, searchable by kind and filters.

Every kind (the built-in exemplar, adapter_key, prototype, task, and any a user declares) has its own FAISS index,
so a search for adapter keys never wades through a million exemplars, and each kind is exact (``IndexFlat``) until
it outgrows ``exact_threshold``; past it ``index="auto"`` uses IVF where that scans at most half the vectors at
recall@10 >= ``tune_recall`` on a held-out sample, and stays exact where nothing does (``"ivf"``/``"hnsw"`` force
a structure, tuned the same way); see ``cl.memory.index``.
Filters on experience, class, adapter, a declared field (a typed, indexed column) or any other metadata key (read
from the entry's JSON) select ids in SQLite, which the kind's index then searches exactly (brute force over the
subset) or through an ``IDSelector`` when the subset is large.
Metadata lives in SQLite (``cl.memory.store``); ``save`` writes an atomic, checksummed generation
(``cl.memory.persist``).
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import cl
from cl.errors import CheckpointError, ConfigError, DataError
from cl.lazy import lazy_import
from cl.memory.index import METRICS, IndexConfig, KindIndex, Subset, Tuning, gpu_available
from cl.memory.persist import FORMAT, FORMAT_VERSION, check_writable, is_memory_dir, read_generation, write_generation
from cl.memory.store import KINDS, RESERVED, MetadataStore, check_name, encode_rows, field_type, unknown_kind

faiss = lazy_import("faiss")  # loaded at its first use (cl.lazy)

METADATA_FILE = "metadata.sqlite"
INDEX_MAGIC = (b"IxM2", b"IwFl")  # the FAISS index types a save writes: IndexIDMap2 (flat, HNSW), IndexIVFFlat
_SUBSET_CACHE_SIZE = 32  # filtered subsets kept until the next change ...
_SUBSET_CACHE_BYTES = 256 * 2**20  # ... and at most this much memory (ids, gathered vectors, bitmaps)


class Hit(NamedTuple):
    """One neighbour of a query: its id, score (inner product, or squared L2 distance) and metadata."""

    id: int
    score: float
    metadata: dict[str, Any] | None


@dataclass
class SearchResult:
    """Neighbours of a batch of queries, best first.

    ``scores`` and ``ids`` are ``[n_queries, k]``; where fewer than ``k`` entries match, the row ends
    with id -1 and score -inf (``ip``, higher is nearer) or +inf (``l2``, squared distance, lower is
    nearer). ``metadata[q]`` holds the metadata of the valid hits of query ``q`` (aligned with the
    start of ``ids[q]``); it is None when searched with ``with_metadata=False``.
    """

    scores: np.ndarray
    ids: np.ndarray
    metadata: list[list[dict[str, Any]]] | None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, q: int) -> list[Hit]:
        """The valid hits of query ``q``."""
        ids, scores = self.ids[q], self.scores[q]
        n = int((ids >= 0).sum())
        metas = self.metadata[q] if self.metadata is not None else [None] * n
        return [Hit(int(i), float(s), m) for i, s, m in zip(ids[:n], scores[:n], metas, strict=True)]


@dataclass
class Entries:
    """Stored entries: ``ids [n]``, ``vectors [n, dim]`` float32 and one metadata dict per entry."""

    ids: np.ndarray
    vectors: np.ndarray
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.ids)


def _as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """``x`` (numpy, torch or nested lists) as a C-contiguous float32 ``[n, dim]`` array of finite values."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    try:
        x = np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise DataError(f"{what} must be a [n, {dim}] matrix of numbers; rows of unequal length? ({e})") from None
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise DataError(f"{what} must be real numbers (float32 preferred), got dtype {x.dtype}")
    if x.ndim == 1 and x.shape[0] == dim:
        x = x[None]
    if x.ndim != 2:
        raise DataError(f"{what} must be a [n, {dim}] matrix, got shape {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise DataError(f"{what} have dimension {x.shape[1]}, this memory holds dimension {dim} (expected [n, {dim}])")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if len(bad) > 10 else "")
        raise DataError(f"{what} contain NaN or inf in {len(bad)} row(s): {shown}")
    return x


def _as_ids(ids: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids).ravel() if not isinstance(ids, (int, np.integer)) else np.array([ids])
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"ids must be integers (as returned by add), got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _filter_key(kind: str, filters: Mapping[str, Any]) -> tuple[Any, ...]:
    def freeze(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return tuple(v.tolist())
        if isinstance(v, (list, tuple, set, frozenset)):
            return tuple(sorted(v, key=repr))
        return v

    return (kind, *sorted((k, freeze(v)) for k, v in filters.items()))


class ExperienceMemory:
    """Vectors of one dimension with typed metadata, searched by similarity per kind.

    ``metric``: ``"ip"`` (inner product; normalise vectors for cosine) or ``"l2"`` (squared distance).
    ``index``: ``"auto"`` (exact up to ``exact_threshold`` vectors of a kind; above, IVF with a tuned
    ``nprobe`` where it scans at most half the vectors, else still exact), ``"flat"`` (always exact),
    ``"hnsw"`` (from the first vector, tuned ``ef_search``) or ``"ivf"`` (exact, then IVF past the threshold).
    ``ef_search``/``nprobe``: None tunes them to ``tune_recall`` (recall@10 on a held-out sample of stored
    vectors) when the index is built and each time the kind doubles; a number fixes them.
    ``path``: the directory ``save()`` writes; nothing is written before. ``gpu``: None uses a GPU when
    FAISS sees one. ``budget``: the most entries it may hold (None: no limit; an ``add`` past it is refused; a
    setting of the run, not saved with the memory). ``kinds``: kinds of entry of your own besides the built-in
    ``KINDS``; ``fields``: metadata keys of your own with their types (``{"source": str, "page": int}``; str, int,
    float or bool), checked on every add and stored as indexed columns so filters on them stay fast (``declare``
    adds both later). The remaining keywords tune the indexes (``IndexConfig``).
    """

    def __init__(
        self,
        dim: int,
        path: str | Path | None = None,
        metric: str = "ip",
        index: str = "auto",
        *,
        exact_threshold: int = 10_000,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        tune_recall: float = 0.97,
        compact_fraction: float = 0.25,
        gpu: bool | None = None,
        overwrite: bool = False,
        budget: int | None = None,
        kinds: Sequence[str] = (),
        fields: Mapping[str, type | str] | None = None,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"memory dim must be a positive int, got {dim!r}")
        if metric not in METRICS:
            raise ConfigError(f"unknown memory metric {metric!r} (choose 'ip' or 'l2')")
        config = IndexConfig(index=index, exact_threshold=exact_threshold, hnsw_m=hnsw_m,
                             ef_construction=ef_construction, ef_search=ef_search, nlist=nlist, nprobe=nprobe,
                             tune_recall=tune_recall, compact_fraction=compact_fraction)
        config.validate()
        if gpu and not gpu_available():
            raise ConfigError("gpu=True but FAISS sees no GPU (faiss-cpu, or no device); pass gpu=None to use "
                              "a GPU only when there is one")
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            check_writable(self.path)
            if is_memory_dir(self.path) and not overwrite:
                raise ConfigError(
                    f"{self.path} already holds an experience memory; open it with ExperienceMemory.load(path), "
                    "or pass overwrite=True to replace it at the next save()"
                )
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ConfigError(f"memory budget must be an int >= 0 (entries) or None (no limit), got {budget!r}")
        self.budget = budget
        self.dim, self.metric, self.config = int(dim), metric, config
        self.gpu = gpu_available() if gpu is None else bool(gpu)
        self._store = MetadataStore()
        self._indexes = {kind: KindIndex(self.dim, metric, config, self.gpu) for kind in KINDS}
        self._next_id = 0
        self._subsets: dict[tuple[Any, ...], Subset] = {}  # filter -> matching ids, until the next change
        self.declare(kinds, fields)

    # -- kinds and fields -------------------------------------------------------------------------

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind an entry may have: the built-in ``KINDS``, then the declared ones."""
        return tuple(self._indexes)

    @property
    def fields(self) -> dict[str, str]:
        """The declared metadata fields and their types (``{"source": "str"}``)."""
        return dict(self._store.fields)

    def declare(self, kinds: Sequence[str] | str = (), fields: Mapping[str, type | str] | None = None) -> None:
        """Add kinds of entry and typed metadata fields of your own (declaring one again is a no-op).

        A kind gets its own index, searched like the built-in ones. A field (type str, int, float or bool) is
        checked on every ``add``/``update`` and stored as an indexed column, so filters on it stay fast; entries
        that already hold the key move their values to the column (their values must have the type). Keys that are
        not declared are kept and filter too, untyped and read from each entry's JSON."""
        for kind in [kinds] if isinstance(kinds, str) else list(kinds):
            if kind not in self._indexes:
                check_name(kind, "kind")
                self._indexes[kind] = KindIndex(self.dim, self.metric, self.config, self.gpu)
        for name, type_ in (fields or {}).items():
            self._store.declare_field(name, type_)
        self._subsets.clear()

    def _kinds_arg(self, kind: str | Sequence[str] | None) -> list[str]:
        """``kind`` (None: every kind) as a list of known kinds; an unknown one raises ConfigError."""
        wanted = list(self._indexes) if kind is None else [kind] if isinstance(kind, str) else list(kind)
        for k in wanted:
            if k not in self._indexes:
                raise ConfigError(unknown_kind(k, self.kinds, "memory kind"))
        return wanted

    # -- sizes ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(ix) for ix in self._indexes.values())

    def counts(self) -> dict[str, int]:
        """Number of entries per kind (kinds with none are left out)."""
        return {kind: len(ix) for kind, ix in self._indexes.items() if len(ix)}

    def structures(self) -> dict[str, str]:
        """The index each non-empty kind uses now: ``flat``, ``hnsw`` or ``ivf``."""
        return {kind: ix.structure for kind, ix in self._indexes.items() if len(ix)}

    def index_settings(self) -> dict[str, dict[str, Any]]:
        """Per non-empty kind: its structure, search settings (``nprobe``, ``ef_search``) and the recall@10
        they reached on the held-out sample when last tuned (``sample_recall``)."""
        return {kind: ix.settings() for kind, ix in self._indexes.items() if len(ix)}

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}: {n} ({self._indexes[k].structure})" for k, n in self.counts().items())
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (f"ExperienceMemory(dim={self.dim}, metric={self.metric!r}, index={self.config.index!r}, "
                f"entries={{{kinds}}}{where})")

    # -- writing ----------------------------------------------------------------------------------

    def add(self, vectors: Any, metadata: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> np.ndarray:
        """Store ``vectors [n, dim]`` with one metadata dict per row (a single dict applies to every row).

        Each dict needs ``kind`` (one of ``kinds``: the built-in ones and those declared); ``experience`` and
        ``class`` (ints), ``adapter`` (str or int) and the declared ``fields`` are typed columns, other
        JSON-serializable keys are kept too (and filter, untyped). Returns the new ids, which stay valid until the
        entry is removed.
        """
        x = _as_matrix(vectors, self.dim, "vectors")
        if isinstance(metadata, Mapping):
            metadata = [metadata] * len(x)
        if isinstance(metadata, (str, bytes)) or not isinstance(metadata, Sequence):
            raise DataError(f"metadata must be a list of dicts (one per vector), got {type(metadata).__name__}")
        if len(metadata) != len(x):
            raise DataError(f"got {len(x)} vectors but {len(metadata)} metadata dicts; pass one dict per vector")
        if self.budget is not None and len(self) + len(x) > self.budget:
            held = ", ".join(f"{k}: {n}" for k, n in self.counts().items()) or "none"
            raise DataError(f"the experience memory holds {len(self)} entries ({held}) of its budget of {self.budget}: "
                            f"{len(x)} more do not fit (raise memory.budget in the run config, or remove entries)")
        ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
        rows = encode_rows(ids, metadata, self.kinds, self._store.fields)  # validates all before anything changes
        kinds = np.array([r[1] for r in rows])
        for kind in np.unique(kinds).tolist():
            mask = kinds == kind
            self._indexes[kind].add(x[mask], ids[mask])
        self._store.insert(rows, {k for meta in metadata for k in meta})
        self._next_id += len(x)
        self._subsets.clear()
        return ids

    def remove(self, ids: Any) -> None:
        """Remove entries by id; ids not in the memory raise DataError and nothing is removed."""
        ids = np.unique(_as_ids(ids))
        if len(ids) == 0:
            return
        for kind, kind_ids in self._store.kinds_of(ids).items():
            self._indexes[kind].remove(kind_ids)
        self._store.delete(ids)
        self._subsets.clear()

    def update(self, ids: Any, **values: Any) -> None:
        """Set metadata on entries, e.g. ``update(ids, adapter="t3")``; other keys merge into the extras
        (a None extra deletes that key). The kind cannot change: remove and add the vector again."""
        values = {("class" if k == "class_" else k): v for k, v in values.items()}
        ids = np.unique(_as_ids(ids))
        if len(ids) and values:
            self._store.update(ids, values)
            self._subsets.clear()

    # -- reading ----------------------------------------------------------------------------------

    def search(
        self, queries: Any, k: int, kind: str | Sequence[str] | None = None, *, with_metadata: bool = True,
        **filters: Any,
    ) -> SearchResult:
        """The ``k`` nearest entries of each query row, among ``kind`` (None: all kinds) matching ``filters``.

        ``filters``: ``experience``, ``class`` (or ``class_``), ``adapter``, a declared field or any metadata key
        entries hold; a value may be a scalar, a list (any of) or None (unset). All queries are searched in one
        FAISS call per kind.
        """
        q = _as_matrix(queries, self.dim, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be a positive int, got {k!r}")
        k = int(k)
        kinds = [kd for kd in self._kinds_arg(kind) if len(self._indexes[kd])]
        filters = self._store.normalize_filters(filters)
        parts = [self._indexes[kd].search(q, k, self._subset(kd, filters) if filters else None) for kd in kinds]
        if filters:
            self._trim_subsets()
        if not parts:
            scores, ids = np.full((len(q), k), -np.inf if self.metric == "ip" else np.inf, np.float32), \
                np.full((len(q), k), -1, np.int64)
        elif len(parts) == 1:
            scores, ids = parts[0]
        else:
            scores, ids = np.hstack([p[0] for p in parts]), np.hstack([p[1] for p in parts])
            order = np.argsort(-scores if self.metric == "ip" else scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        metadata = None
        if with_metadata:
            found = self._store.get(np.unique(ids[ids >= 0]))
            metadata = [[found[i] for i in row if i >= 0] for row in ids.tolist()]
        return SearchResult(scores, ids, metadata)

    def _subset(self, kind: str, filters: Mapping[str, Any]) -> Subset:
        """The ids of ``kind`` matching ``filters``, cached (with their FAISS selector) until the next change."""
        key = _filter_key(kind, filters)
        if key not in self._subsets:
            if len(self._subsets) >= _SUBSET_CACHE_SIZE:
                self._subsets.pop(next(iter(self._subsets)))
            self._subsets[key] = Subset(self._store.ids([kind], filters))
        return self._subsets[key]

    def _trim_subsets(self) -> None:
        total = sum(s.nbytes for s in self._subsets.values())
        while total > _SUBSET_CACHE_BYTES and self._subsets:
            total -= self._subsets.pop(next(iter(self._subsets))).nbytes

    def get(self, ids: Any) -> Entries:
        """Vectors and metadata of ``ids``, in the order given; unknown ids raise DataError."""
        ids = _as_ids(ids)
        metas = self._store.get(ids)
        vectors = np.empty((len(ids), self.dim), np.float32)
        kinds = np.array([metas[i]["kind"] for i in ids.tolist()])
        for kind in np.unique(kinds).tolist():
            mask = kinds == kind
            vectors[mask] = self._indexes[kind].reconstruct(ids[mask])
        return Entries(ids, vectors, [metas[i] for i in ids.tolist()])

    def ids(self, kind: str | Sequence[str] | None = None, **filters: Any) -> np.ndarray:
        """Ids (ascending) of the entries of ``kind`` matching ``filters``."""
        kinds = None if kind is None else self._kinds_arg(kind)
        return self._store.ids(kinds, self._store.normalize_filters(filters))

    def count(self, kind: str | Sequence[str] | None = None, **filters: Any) -> int:
        """Number of entries of ``kind`` matching ``filters``."""
        if not filters:
            return sum(len(self._indexes[kd]) for kd in self._kinds_arg(kind))
        kinds = None if kind is None else self._kinds_arg(kind)
        return self._store.count(kinds, self._store.normalize_filters(filters))

    def vectors(self, kind: str | Sequence[str] | None = None, **filters: Any) -> tuple[np.ndarray, np.ndarray]:
        """Ids (ascending) and vectors ``[n, dim]`` of the matching entries, without their metadata."""
        kinds = self._kinds_arg(kind)
        filters = self._store.normalize_filters(filters)
        ids = [self._store.ids([kd], filters) for kd in kinds]
        vecs = [self._indexes[kd].reconstruct(i) for kd, i in zip(kinds, ids, strict=True)]
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids, kind="stable")
        return all_ids[order], np.concatenate(vecs)[order]

    def entries(self, kind: str | Sequence[str] | None = None, **filters: Any) -> Entries:
        """Ids (ascending), vectors and metadata of the matching entries."""
        ids, metadata = self._store.select(None if kind is None else self._kinds_arg(kind),
                                           self._store.normalize_filters(filters))
        _, vectors = self.vectors(kind, **filters)
        return Entries(ids, vectors, metadata)

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: str | Path | None = None) -> Path:
        """Write the memory atomically to ``path`` (default: its own; a new one becomes its own) and return it.

        A crash at any moment leaves the previous save loadable; see ``cl.memory.persist``.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("this memory has no path: pass path= to ExperienceMemory(...) or to save(path)")
        kinds = {}
        for kind, ix in self._indexes.items():
            kinds[kind] = {"structure": ix.structure, "count": len(ix),
                           "file": f"index-{kind}.faiss" if ix.index is not None else None,
                           "tuning": asdict(ix.tuning)}

        def write_files(folder: Path) -> list[str]:
            self._store.save(folder / METADATA_FILE)
            names = [METADATA_FILE]
            for kind, ix in self._indexes.items():
                if ix.index is not None:
                    faiss.write_index(ix.index, str(folder / kinds[kind]["file"]))
                    names.append(kinds[kind]["file"])
            return names

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "written_by": f"clagent {cl.__version__}, faiss {faiss.__version__}",
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "dim": self.dim,
            "metric": self.metric,
            "config": asdict(self.config),
            "next_id": self._next_id,
            "entries": len(self),
            "kinds": kinds,  # the built-in and the declared kinds
            "fields": self._store.fields,  # the declared fields and their types, in column order
        }
        write_generation(target, write_files, manifest)
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path, *, gpu: bool | None = None, verify: bool = True,
             generation: str | None = None) -> ExperienceMemory:
        """Open a saved memory; a missing, foreign, corrupted or newer-format one raises CheckpointError.

        ``verify`` checks every file against its sha256 in the manifest (reads each file once more).
        ``generation`` opens that saved generation instead of the live one (one a checkpoint retained).
        """
        root = Path(path)
        gen, manifest = read_generation(root, verify=verify, generation=generation)
        try:
            mem = cls(manifest["dim"], None, manifest["metric"], gpu=gpu, **manifest["config"])
            next_id = int(manifest["next_id"])
            kinds = manifest["kinds"]
            if not isinstance(kinds, dict) or not all(isinstance(v, dict) for v in kinds.values()):
                raise TypeError("'kinds' is not an object of objects")
            fields = manifest.get("fields", {})  # format 3: declared fields
            if not isinstance(fields, dict):
                raise TypeError("'fields' is not an object")
            fields = {check_name(f, "field"): field_type(f, t) for f, t in fields.items()}
            if reserved := sorted(set(fields) & set(RESERVED)):
                raise ValueError(f"fields {reserved} are built in")
            mem.declare([check_name(k, "kind") for k in kinds if k not in KINDS])
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(f"experience memory {root} has an invalid manifest ({e}); it is corrupted") from None
        mem.path = root
        mem._store = MetadataStore.load(gen / METADATA_FILE, mem.kinds, fields)
        mem._next_id = next_id
        files = manifest.get("files")
        for kind, info in kinds.items():
            if not info.get("file"):
                continue
            name = info["file"]
            if not isinstance(files, dict) or name not in files or not (gen / name).is_file():
                raise CheckpointError(f"experience memory {root}: its manifest names {name!r} as the {kind} index, "
                                      f"which is not one of the files of {gen.name}; it is corrupted")
            with open(gen / name, "rb") as f:
                magic = f.read(4)
            if magic not in INDEX_MAGIC:  # FAISS parses nothing but the index types clagent writes
                raise CheckpointError(f"experience memory {root}: {gen.name}/{name} is not a FAISS index of a type "
                                      f"clagent writes (it starts with {magic!r}); it is corrupted")
            try:
                index = faiss.read_index(str(gen / name))
            except RuntimeError as e:
                raise CheckpointError(f"experience memory {root}: cannot read {name} ({e})") from None
            if index.d != mem.dim:
                raise CheckpointError(f"experience memory {root}: {info['file']} has dimension {index.d}, "
                                      f"the manifest says {mem.dim}; it is corrupted")
            ix = mem._indexes[kind]
            stored_ids = mem._store.ids([kind])
            try:
                tuning = Tuning(**info.get("tuning", {}))
            except TypeError as e:
                raise CheckpointError(f"experience memory {root} has an invalid manifest ({e}); it is corrupted") \
                    from None
            consistent = ix.attach(index, stored_ids, tuning)
            if not consistent or len(ix) != info.get("count") or (len(stored_ids) and stored_ids[-1] >= next_id):
                raise CheckpointError(f"experience memory {root} is inconsistent: the {kind} index holds "
                                      f"{len(ix)} entries, its metadata {len(stored_ids)}; it is corrupted")
        if sum(len(ix) for ix in mem._indexes.values()) != mem._store.count():
            raise CheckpointError(f"experience memory {root} is inconsistent: metadata rows without vectors")
        return mem
