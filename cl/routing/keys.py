"""Key-retrieval routing: adapters are found by nearest keys in the experience memory (L2P-style, no training).

Each adapter (expert) gets keys, prototypes of the frozen features of the data it was trained on: one
class mean per class (``keys_per_class=1``), or that many spherical k-means centroids per class. A query
(the frozen feature of an input) retrieves its top-k keys in one batched FAISS search over the
``adapter_key`` entries of an ``ExperienceMemory``; the adapters of those keys give the route.

``metric="cosine"`` compares L2-normalised features by inner product. ``"whitened"`` (the default) and
``"mahalanobis"`` first whiten keys and queries by the shared within-class covariance of everything seen
(shrunk as in ``LDAHead``); ``"mahalanobis"`` then ranks by Euclidean distance, which with class-mean keys
is the LDA decision under equal priors (an ``l2`` memory), ``"whitened"`` by cosine (an ``ip`` memory, like
the engine's). Their keys in the memory are rewritten whenever the covariance changes (once per
``add_keys``: a few keys per class). How often each metric routes inputs to their own experience:
benchmarks/RESULTS.md.

The keys' raw vectors live in the router's state dict (the checkpoint); the memory is the search structure,
filled from them when the router is attached to a fresh one. ``RouteLog`` counts, during evaluation, which
adapter inputs were routed to and how often that was their true experience, for ``route``/``retrieval``
events.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cl.errors import ConfigError, DataError
from cl.heads import LDAHead
from cl.lazy import lazy_import
from cl.loading import LoadsByValue
from cl.memory import ExperienceMemory
from cl.registry import ROUTERS
from cl.routing.routers import Router

faiss = lazy_import("faiss")  # loaded at its first use (cl.lazy)

KEY_KIND = "adapter_key"
METRIC_SPACE = {"cosine": "ip", "whitened": "ip", "mahalanobis": "l2"}  # key metric -> memory metric
MODES = ("top1", "vote", "soft")


@ROUTERS.register("key")
class KeyRouter(LoadsByValue, Router):
    """Routes each query to the adapters of its nearest keys (``forward(queries [B, dim]) -> weights [B, K]``).

    ``mode``: ``"top1"`` one-hot on the best key's adapter; ``"vote"`` one-hot on the adapter most of the
    ``top_k`` keys belong to (ties: the better-ranked); ``"soft"`` ``softmax(similarity / temperature)`` over
    the ``top_k`` keys, summed per adapter. Similarity is the cosine, or ``-d^2 / 2`` (a log-likelihood)
    with ``metric="mahalanobis"``; ``temperature`` defaults to 0.05 for the cosines and 1.0 for the latter.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "whitened",
        mode: str = "top1",
        top_k: int = 1,
        temperature: float | None = None,
        keys_per_class: int = 1,
        shrinkage: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if metric not in METRIC_SPACE:
            raise ConfigError(f"key router: metric must be one of {', '.join(METRIC_SPACE)}, got {metric!r}")
        if mode not in MODES:
            raise ConfigError(f"key router: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if top_k < 1 or keys_per_class < 1:
            raise ConfigError(f"key router: top_k and keys_per_class must be >= 1, got {top_k} and {keys_per_class}")
        self.dim, self.metric, self.mode, self.top_k = dim, metric, mode, top_k
        self.temperature = temperature if temperature is not None else (1.0 if metric == "mahalanobis" else 0.05)
        self.keys_per_class, self.seed = keys_per_class, seed
        self.names: list[str] = []  # adapter name per expert index (memory metadata "adapter")
        for name, dtype in (("keys", torch.float32), ("key_expert", torch.long), ("key_experience", torch.long),
                            ("key_class", torch.long), ("key_ids", torch.long)):
            self.register_buffer(name, torch.zeros((0, dim) if name == "keys" else (0,), dtype=dtype))
        # whitened, mahalanobis: running class statistics of all key data; their shrunk pooled covariance whitens
        self.stats = LDAHead(dim, shrinkage=shrinkage) if metric != "cosine" else None
        self._whiten: torch.Tensor | None = None  # L^-1 with S = L L^T, derived from ``stats``
        self._memory: ExperienceMemory | None = None
        self._shared = False  # the memory belongs to the engine (other entries may live in it)
        self._refused: ExperienceMemory | None = None  # an engine memory that does not fit (warned once)
        self._stale = True  # the memory does not hold exactly our keys yet
        self._order = self._sorted_ids = np.zeros(0, np.int64)  # memory id -> key row lookup

    # ---- experts and memory ----------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.names)

    def add_expert(self, name: str | None = None) -> None:
        """A new column; ``name`` is the adapter id written to the memory (default: its index)."""
        name = str(self.num_experts) if name is None else name
        if name in self.names:
            raise ConfigError(f"key router already has an expert {name!r}")
        self.names.append(name)

    @property
    def memory(self) -> ExperienceMemory:
        """The memory searched (the engine's when attached and compatible, else the router's own)."""
        if self._memory is None:
            self._memory = ExperienceMemory(self.dim, metric=METRIC_SPACE[self.metric])
            self._shared, self._stale = False, True
        if self._stale:
            self._sync()
        return self._memory

    def attach(self, memory: ExperienceMemory | None) -> None:
        """Keep the keys in ``memory`` (the engine's ``ctx.memory``) when its dimension and metric fit.

        A memory that does not fit (or None) leaves the router with a memory of its own, with a warning
        for an incompatible one.
        """
        if memory is None or memory is self._memory or memory is self._refused:
            return
        want = METRIC_SPACE[self.metric]
        if memory.dim != self.dim or memory.metric != want:
            self._refused = memory
            warnings.warn(
                f"the engine's memory holds dim {memory.dim} / metric {memory.metric!r}; {self.metric} keys need "
                f"dim {self.dim} / {want!r}: the key router keeps its own memory", RuntimeWarning, stacklevel=2,
            )
            return
        self._memory, self._shared, self._stale = memory, True, True

    def _sync(self) -> None:
        """Make the memory's adapter keys for our adapters exactly ours (after a load, attach or re-whitening)."""
        mem = self._memory
        filters = {"adapter": self.names} if self._shared else {}
        present = mem.ids(KEY_KIND, **filters) if self.names or not self._shared else np.zeros(0, np.int64)
        mine = self.key_ids.cpu().numpy()
        if not (len(present) == len(mine) and np.array_equal(np.sort(present), np.sort(mine))):
            mem.remove(present)
            ids = mem.add(self._stored(self.keys), self._metadata(range(len(self.keys)))) if len(self.keys) else []
            self.key_ids = torch.as_tensor(np.asarray(ids, np.int64), device=self.key_ids.device)
        self._order = np.argsort(self.key_ids.cpu().numpy(), kind="stable")
        self._sorted_ids = self.key_ids.cpu().numpy()[self._order]
        self._stale = False

    def _metadata(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        out = []
        for r in rows:
            meta = {"kind": KEY_KIND, "adapter": self.names[int(self.key_expert[r])]}
            for key, buf in (("experience", self.key_experience), ("class", self.key_class)):
                if int(buf[r]) >= 0:
                    meta[key] = int(buf[r])
            out.append(meta)
        return out

    # ---- keys -------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_keys(
        self, features: torch.Tensor, classes: torch.Tensor, expert: int, experience: int | None = None
    ) -> torch.Tensor:
        """Keys for ``expert`` from frozen ``features [N, dim]`` with labels ``classes [N]``: per class, its mean
        (``keys_per_class=1``) or k-means centroids. Returns the new keys ``[n, dim]`` (raw feature space)."""
        if not 0 <= expert < self.num_experts:
            raise ConfigError(f"key router has {self.num_experts} experts; no expert {expert} (add_expert first)")
        if features.ndim != 2 or features.shape[1] != self.dim or classes.shape != features.shape[:1]:
            raise DataError(f"add_keys expects features [N, {self.dim}] and classes [N]; got "
                            f"{tuple(features.shape)} and {tuple(classes.shape)}")
        feats, classes = features.detach().float().cpu(), classes.detach().long().cpu()
        keys, labels = [], []
        for c in torch.unique(classes).tolist():
            keys.append(self._class_keys(feats[classes == c], c))
            labels += [c] * len(keys[-1])
        if not keys:
            return torch.zeros(0, self.dim)
        new = torch.cat(keys)
        if self.stats is not None:
            self.stats.update(feats, classes)
            self._whiten = None
        n = len(new)
        dev = self.keys.device
        self.keys = torch.cat([self.keys, new.to(dev)])
        self.key_expert = torch.cat([self.key_expert, torch.full((n,), expert, device=dev)])
        exp = -1 if experience is None else int(experience)
        self.key_experience = torch.cat([self.key_experience, torch.full((n,), exp, device=dev)])
        self.key_class = torch.cat([self.key_class, torch.tensor(labels, device=dev)])
        if self.stats is None and self._memory is not None and not self._stale:  # cosine: just add the new keys
            ids = self._memory.add(self._stored(new), self._metadata(range(len(self.keys) - n, len(self.keys))))
            self.key_ids = torch.cat([self.key_ids, torch.as_tensor(ids, device=dev)])
            self._sync()
        else:  # whitened keys: the whitening changed, every key moves
            self.key_ids = torch.cat([self.key_ids, torch.full((n,), -1, device=dev)])
            self._stale = True
        return new

    def _class_keys(self, x: torch.Tensor, c: int) -> torch.Tensor:
        k = min(self.keys_per_class, len(x))
        if k == 1:
            return x.mean(0, keepdim=True)
        km = faiss.Kmeans(self.dim, k, niter=20, seed=self.seed + c, spherical=self.metric == "cosine",
                          verbose=False)
        km.train(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        return torch.from_numpy(km.centroids.copy())

    def whitening(self) -> torch.Tensor | None:
        """``L^-1`` ``[dim, dim]`` for the shrunk shared covariance ``S = L L^T`` (None for cosine keys)."""
        if self.stats is None:
            return None
        if self._whiten is None:
            cov = self.stats.covariance()
            chol = torch.linalg.cholesky(cov)
            eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
            self._whiten = torch.linalg.solve_triangular(chol, eye, upper=False).float()
        return self._whiten

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Features in the key space: whitened (unless cosine), then L2-normalised (unless mahalanobis)."""
        w = self.whitening()
        x = x.float() if w is None else x.float() @ w.to(x.device).T
        return x if self.metric == "mahalanobis" else F.normalize(x, dim=-1)

    def _stored(self, keys: torch.Tensor) -> np.ndarray:
        return self.project(keys).cpu().numpy()

    # ---- retrieval --------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(self, queries: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` (default ``top_k``) nearest keys of each query, in one search: ``(similarity [B, k],
        key row [B, k])`` on the queries' device, best first; rows are -1 (similarity -inf) past the last key."""
        k = k or self.top_k
        mem = self.memory
        filters = {"adapter": self.names} if self._shared else {}
        found = mem.search(self.project(queries), k, kind=KEY_KIND, with_metadata=False, **filters)
        ids, known = found.ids, self._sorted_ids
        rows = np.full(ids.shape, -1, np.int64)
        if len(known):  # memory id -> key row; ids of other entries (or none, -1) stay -1
            pos = np.searchsorted(known, ids).clip(0, len(known) - 1)
            rows = np.where((ids >= 0) & (known[pos] == ids), self._order[pos], -1)
        sim = found.scores if mem.metric == "ip" else -0.5 * found.scores
        sim = np.where(rows >= 0, sim, -np.inf)
        return (torch.from_numpy(np.ascontiguousarray(sim, np.float32)).to(queries.device),
                torch.from_numpy(rows.astype(np.int64)).to(queries.device))

    @torch.no_grad()
    def route(self, queries: torch.Tensor) -> torch.Tensor:
        """The expert ``[B]`` each query goes to (``top1``/``vote``; ``soft``: the largest weight)."""
        return self(queries).argmax(-1)

    @torch.no_grad()
    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        k_experts = self.num_experts
        if not len(self.keys):  # nothing to retrieve yet: every expert alike
            return queries.new_full((queries.shape[0], k_experts), 1.0 / max(k_experts, 1))
        sim, rows = self.retrieve(queries, 1 if self.mode == "top1" else self.top_k)
        valid = rows >= 0
        experts = torch.where(valid, self.key_expert.to(rows.device)[rows.clamp_min(0)], 0)
        if self.mode == "soft":
            w = torch.softmax(sim / self.temperature, -1).masked_fill(~valid, 0.0)
            return queries.new_zeros(len(queries), k_experts).scatter_add_(1, experts, w.to(queries.dtype))
        if self.mode == "vote":  # rank-discounted counts: ties go to the better-ranked key
            rank = torch.arange(experts.shape[1], device=rows.device)
            votes = (1.0 - 1e-3 * rank.float()).expand_as(experts) * valid
            chosen = queries.new_zeros(len(queries), k_experts).scatter_add_(1, experts, votes.to(queries.dtype))
            return F.one_hot(chosen.argmax(-1), k_experts).to(queries.dtype)
        return F.one_hot(experts[:, 0], k_experts).to(queries.dtype)

    # ---- state --------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"names": list(self.names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.names = list(state.get("names", self.names))
        self._stale = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._whiten, self._stale = None, True  # the keys change: whiten again, refill the memory
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> KeyRouter:
        self._whiten = None
        return super()._apply(fn, recurse)


class RouteLog:
    """Route diagnostics during evaluation: adapter usage, and hits against the true experience where the
    labels tell it (``true_experience[y]``, -1 unknown).

    ``watch(batches, emit)`` wraps an evaluation's ``(state, y)`` batches: while a batch is out, ``targets``
    holds its labels, so ``record`` can compare; once the batches are exhausted it emits one ``route`` event
    (``usage: {adapter: inputs}``) and one ``retrieval`` event (``hits``, ``queries``, ``hit_rate``, the
    tested experience when the data holds one, and any extra counts) and starts over.
    """

    def __init__(self) -> None:
        self.targets: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self.usage: dict[str, int] = {}
        self.hits = self.queries = self.inputs = 0
        self.extra: dict[str, int] = {}
        self.tested: set[int] = set()

    def watch(
        self, batches: Iterator[tuple[Any, torch.Tensor]], emit: Callable[..., None], experience: int | None
    ) -> Iterator[tuple[Any, torch.Tensor]]:
        self._reset()
        try:
            for state, y in batches:
                self.targets = y
                yield state, y
        finally:
            self.targets = None
        if self.inputs and experience is not None:
            tested = next(iter(self.tested)) if len(self.tested) == 1 else None
            emit("route", experience=experience, usage=dict(sorted(self.usage.items())))
            emit("retrieval", experience=experience, tested=tested, hits=self.hits, queries=self.queries,
                 hit_rate=self.hits / self.queries if self.queries else None, inputs=self.inputs, **self.extra)

    def record(
        self, chosen: torch.Tensor, names: Sequence[str], true_experience: torch.Tensor | None = None,
        adapter_experience: torch.Tensor | None = None, **extra: int,
    ) -> None:
        """Count routes ``chosen [B]`` (indices into ``names``); hits where ``adapter_experience[chosen]``
        equals ``true_experience [B]`` (>= 0 where known). Does nothing outside ``watch``."""
        y = self.targets
        if y is None or len(y) != len(chosen):
            return
        counts = torch.bincount(chosen.cpu(), minlength=len(names)).tolist()
        for name, n in zip(names, counts, strict=False):
            if n:
                self.usage[name] = self.usage.get(name, 0) + n
        self.inputs += len(chosen)
        for key, n in extra.items():
            self.extra[key] = self.extra.get(key, 0) + int(n)
        if true_experience is None or adapter_experience is None:
            return
        truth = true_experience.cpu()
        known = truth >= 0
        got = adapter_experience.cpu()[chosen.cpu()]
        self.hits += int((got[known] == truth[known]).sum())
        self.queries += int(known.sum())
        self.tested.update(truth[known].unique().tolist())


def experience_of(classes: torch.Tensor, class_experience: torch.Tensor) -> torch.Tensor:
    """The experience ``[B]`` each label belongs to (-1 where unknown or ambiguous)."""
    classes = classes.to(class_experience.device)
    ok = (classes >= 0) & (classes < len(class_experience))
    return torch.where(ok, class_experience[classes.clamp(0, max(len(class_experience) - 1, 0))], -1) \
        if len(class_experience) else torch.full_like(classes, -1)
