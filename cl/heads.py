"""Classifier heads over global class ids; every head grows as classes arrive.

A head maps embeddings ``[B, D]`` to scores ``[B, C]`` where column ``c`` is global class id ``c``
and ``C`` is one more than the largest id seen; columns of classes not seen yet score ``-inf``.
A checkpoint with more classes loads by value (``cl.loading``): the per-class tensors take its shape, so an
expanded model rebuilds from its state dict alone.

Statistics heads (``NCMHead``, ``LDAHead``, ``RanPACHead``) learn without gradients or stored data:
``update(z, y)`` adds a batch to running float64 sums. ``create_head(name, dim, **params)`` builds
any head by its registered name; ``HeadChoice`` gives a strategy its ``head`` / ``head_kw`` parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl.errors import ConfigError, DataError
from cl.loading import LoadsByValue
from cl.registry import HEADS, param_defaults_of, register_head


class Head(LoadsByValue):
    """Base class: tracks which class ids are known (the ``known`` mask)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("known", torch.zeros(0, dtype=torch.bool))

    @property
    def num_outputs(self) -> int:
        return int(self.known.numel())

    def add_classes(self, classes: Iterable[int]) -> None:
        """Make room for ``classes`` (global ids) and mark them known."""
        classes = list(classes)
        if not classes:
            return
        need = max(classes) + 1
        if need > self.num_outputs:
            self._grow(need)
        self.known[classes] = True

    def _grow(self, n: int) -> None:
        known = torch.zeros(n, dtype=torch.bool, device=self.known.device)
        known[: self.num_outputs] = self.known
        self.known = known

    def mask_unknown(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~self.known, float("-inf"))


@register_head("linear")
class LinearHead(Head):
    """A linear classifier whose rows are added per class (trained with cross-entropy)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.weight = nn.Parameter(torch.zeros(0, dim))
        self.bias = nn.Parameter(torch.zeros(0))

    def _grow(self, n: int) -> None:
        old = self.num_outputs
        super()._grow(n)
        w = torch.empty(n - old, self.dim, device=self.weight.device)
        nn.init.normal_(w, std=0.01)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, torch.zeros(n - old, device=w.device)]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mask_unknown(F.linear(z, self.weight, self.bias))


class ClassStatsHead(Head):
    """Base of heads built from running per-class sums and counts, learnt without stored data.

    ``update`` maps a batch through ``stat_features`` (identity unless a subclass says otherwise),
    then adds it in float64 to the per-class ``sums`` ``[C, stat_dim]`` and ``counts`` ``[C]`` and,
    with ``gram=True``, to the uncentred second moment ``gram = sum f f^T`` ``[stat_dim, stat_dim]``.
    Sums do not depend on batching: a stream fed batch by batch equals one update (to float64 rounding).
    Weights a subclass solves from the statistics are cached until the statistics change.
    """

    def __init__(self, dim: int, stat_dim: int | None = None, gram: bool = False) -> None:
        super().__init__(dim)
        self.stat_dim = stat_dim or dim
        self.register_buffer("sums", torch.zeros(0, self.stat_dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))
        g = torch.zeros(self.stat_dim, self.stat_dim, dtype=torch.float64) if gram else None
        self.register_buffer("gram", g)
        self._cache: Any = None
        self._scoring: dict[tuple[torch.dtype, torch.device], tuple[Any, torch.Tensor | None]] = {}

    def stat_features(self, z: torch.Tensor) -> torch.Tensor:
        """What is accumulated for an embedding batch (and what the solved weights apply to)."""
        return z

    @torch.no_grad()
    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Add embeddings ``z`` ``[B, dim]`` with global class ids ``y`` ``[B]`` to the statistics."""
        if z.ndim != 2 or z.shape[1] != self.dim or y.shape != z.shape[:1]:
            raise DataError(
                f"{type(self).__name__}.update expects z [B, {self.dim}] and y [B]; "
                f"got z {tuple(z.shape)} and y {tuple(y.shape)}"
            )
        if not len(y):
            return
        self.add_classes(torch.unique(y).tolist())
        dev = self.sums.device
        f = self.stat_features(z.to(device=dev, dtype=torch.float64))
        y = y.to(device=dev, dtype=torch.long)
        self.sums.index_add_(0, y, f)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        if self.gram is not None:
            self.gram.addmm_(f.T, f)
        self.invalidate()

    @property
    def means(self) -> torch.Tensor:
        """Per-class means of the accumulated features (float64; zero rows for classes without data)."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    @property
    def ready(self) -> torch.Tensor:
        """Mask of the classes that have data (LDA and RanPAC score the others ``-inf``)."""
        return self.counts > 0

    def invalidate(self) -> None:
        """Drop the cached solved weights; the next forward solves again."""
        self._cache = None
        self._scoring = {}

    def solved(self) -> Any:
        """The subclass's ``_solve()`` result, computed once per change of the statistics."""
        if self._cache is None:
            with torch.no_grad():
                self._cache = self._solve()
        return self._cache

    def _solve(self) -> Any:
        raise NotImplementedError

    def scoring(self, z: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """``solved()`` with its tensors in ``z``'s dtype and device, and the mask there of the classes without data
        (None when every class has data); cached with ``solved()``, so a forward converts nothing."""
        key = (z.dtype, z.device)
        found = self._scoring.get(key)
        if found is None:
            solved = self.solved()
            with torch.inference_mode(False):  # kept for later calls: never an inference tensor (no autograd there)
                cast = tuple(_copy_as(t, z) for t in solved) if isinstance(solved, tuple) else _copy_as(solved, z)
                unready = ~self.ready.to(z.device)
            found = self._scoring[key] = (cast, unready if bool(unready.any()) else None)
        return found

    def mask_unready(self, scores: torch.Tensor, unready: torch.Tensor | None) -> torch.Tensor:
        """``scores`` with the classes without data at ``-inf`` (``unready``: ``scoring``'s mask)."""
        return scores if unready is None else scores.masked_fill(unready, float("-inf"))

    def _grow(self, n: int) -> None:
        old = self.num_outputs
        super()._grow(n)
        dev = self.sums.device
        self.sums = torch.cat([self.sums, torch.zeros(n - old, self.stat_dim, dtype=torch.float64, device=dev)])
        self.counts = torch.cat([self.counts, torch.zeros(n - old, dtype=torch.float64, device=dev)])
        self.invalidate()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.invalidate()

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        self.invalidate()  # .to() / .double(): solve again where the buffers now live
        return super()._apply(fn, recurse)


@register_head("ncm")
class NCMHead(ClassStatsHead):
    """Cosine nearest-class-mean over prototypes accumulated without storing data (SimpleCIL)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)

    @property
    def prototypes(self) -> torch.Tensor:
        return self.means.float()

    def _solve(self) -> torch.Tensor:
        return F.normalize(self.means, dim=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        protos, _ = self.scoring(z)  # the unit prototypes, cached (a class without data keeps its zero row)
        return self.mask_unknown(F.normalize(z, dim=1) @ protos.T)


def _copy_as(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in ``z``'s dtype and device."""
    return t.to(device=z.device, dtype=z.dtype, copy=True)


def _spd_solve(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """``a^-1 b`` for a symmetric positive (semi)definite ``a``: Cholesky, else the pseudo-inverse."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    warnings.warn(f"{what} is singular; using its pseudo-inverse", RuntimeWarning, stacklevel=3)
    return torch.linalg.pinv(a, hermitian=True) @ b


@register_head("lda")
class LDAHead(ClassStatsHead):
    """Linear discriminant analysis: running class means and one shared, shrunk within-class covariance.

    ``S = (sum x x^T - sum_c n_c mu_c mu_c^T) / (N - K)`` over the K classes with data (pooled, unbiased),
    shrunk towards the scaled identity: ``(1 - a) S + a tr(S)/dim I`` with ``a = shrinkage`` (the
    formula of sklearn's ``ShrunkCovariance``). Scores ``w_c^T x + b_c`` with ``w_c = S^-1 mu_c`` and
    ``b_c = -mu_c^T S^-1 mu_c / 2``, plus ``log(n_c / N)`` with ``log_prior`` (default: equal priors).
    ``normalize`` L2-normalises embeddings before both ``update`` and scoring.

    Args:
        shrinkage: share of the scaled identity in the covariance (0-1).
        normalize: L2-normalise embeddings before updating and scoring.
        log_prior: add the log class frequencies to the scores (default: equal priors).
    """

    def __init__(self, dim: int, shrinkage: float = 0.01, normalize: bool = False, log_prior: bool = False) -> None:
        if not 0.0 <= shrinkage <= 1.0:
            raise ConfigError(f"lda head: shrinkage must be in [0, 1]; got {shrinkage}")
        super().__init__(dim, gram=True)
        self.shrinkage = float(shrinkage)
        self.normalize = normalize
        self.log_prior = log_prior

    def stat_features(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=1) if self.normalize else z

    def covariance(self) -> torch.Tensor:
        """The shrunk pooled within-class covariance (float64); the identity while it is undefined."""
        n, s = self.counts[self.ready], self.sums[self.ready]
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.sums.device)
        dof = float(n.sum()) - n.numel()
        if dof < 1:  # at most one sample per class: nearest Euclidean mean
            return eye
        scatter = self.gram - s.T @ (s / n.unsqueeze(1))
        cov = (scatter + scatter.T) / (2 * dof)
        scale = torch.trace(cov) / self.dim
        if scale <= 0:
            return eye
        return (1 - self.shrinkage) * cov + self.shrinkage * scale * eye

    def _solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.means
        w = _spd_solve(self.covariance(), mu.T, "the LDA covariance (shrinkage 0?)").T
        b = -0.5 * (mu * w).sum(1)
        if self.log_prior:
            b = b + torch.log(self.counts / self.counts.sum())
        return w, b

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        (w, b), unready = self.scoring(z)
        return self.mask_unready(F.linear(self.stat_features(z), w, b), unready)


@register_head("ranpac")
class RanPACHead(ClassStatsHead):
    """RanPAC: a frozen random ReLU projection, then ridge regression onto one-hot class targets.

    ``h = ReLU(z P)`` with ``P ~ N(0, 1)`` ``[dim, proj_dim]`` drawn from ``seed`` and kept in the state
    dict (a checkpoint restores it exactly, whatever the RNG). Statistics: ``G = sum h h^T`` (``gram``)
    and ``C = sum h y^T`` (the per-class sums of h); ``W = (G + ridge I)^-1 C``; scores ``h W``.
    With ``ridge=None`` every solve picks ridge from ``10^k tr(G)/proj_dim``, k = -8..4, by generalised
    cross-validation, computed from G and C alone (no held-out data to store; the choice is in
    ``selected_ridge``). No bias: scores are positively homogeneous in z, so only directions matter.
    Cost: G is ``proj_dim^2`` float64 (32 MiB at the default 2048; 0.2-0.8 GiB at the paper's
    5000-10000) and a solve is one ``proj_dim``-sized eigendecomposition (a Cholesky with a given
    ridge); 2048 keeps both CPU-friendly for 768-1280-wide embeddings.

    Args:
        proj_dim: width of the random ReLU projection.
        ridge: ridge penalty (None: chosen by generalised cross-validation at every solve).
        seed: seed of the random projection.
    """

    GRID_EXPONENTS = tuple(range(-8, 5))

    def __init__(self, dim: int, proj_dim: int = 2048, ridge: float | None = None, seed: int = 0) -> None:
        if proj_dim < 1:
            raise ConfigError(f"ranpac head: proj_dim must be positive; got {proj_dim}")
        if ridge is not None and ridge < 0:
            raise ConfigError(f"ranpac head: ridge must be >= 0 or None (choose by GCV); got {ridge}")
        super().__init__(dim, stat_dim=proj_dim, gram=True)
        self.proj_dim = proj_dim
        self.ridge = ridge
        self.selected_ridge: float | None = None
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(dim, proj_dim, generator=gen))

    def stat_features(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z @ self.projection.to(z))

    def invalidate(self) -> None:
        super().invalidate()
        self.selected_ridge = None

    def _solve(self) -> torch.Tensor:
        g, c = self.gram, self.sums.T
        if self.ridge is not None:
            self.selected_ridge = self.ridge
            eye = torch.eye(self.proj_dim, dtype=g.dtype, device=g.device)
            return _spd_solve(g + self.ridge * eye, c, "the RanPAC Gram matrix (ridge 0?)")
        evals, vecs = torch.linalg.eigh(g)
        evals = evals.clamp_min(0)
        a = vecs.T @ c
        ridge = self._gcv_ridge(evals, a.square().sum(1), float(self.counts.sum()))
        self.selected_ridge = ridge
        return vecs @ (a / (evals + ridge).unsqueeze(1))

    def _gcv_ridge(self, evals: torch.Tensor, a2: torch.Tensor, n: float) -> float:
        """The grid ridge minimising GCV = n RSS / (n - df)^2, from G's eigenvalues and C's energy in them.

        With ``G = V E V^T``, ``a_i = ||V_i^T C||^2``: ``RSS(l) = RSS(0) + sum_i (l / (e_i + l))^2 a_i / e_i``
        and ``n - df(l) = (n - rank) + sum_i l / (e_i + l)`` over the non-null ``e_i``, written as sums
        of non-negative terms so that nothing cancels.
        """
        scale = max(float(evals.sum()) / evals.numel(), torch.finfo(torch.float64).tiny)
        keep = evals > evals.max() * evals.numel() * torch.finfo(torch.float64).eps
        e, a2 = evals[keep], a2[keep]
        rss0 = max(n - float((a2 / e).sum()), 0.0)
        free = max(n - int(keep.sum()), 0)
        grid = torch.tensor([10.0**k * scale for k in self.GRID_EXPONENTS], dtype=torch.float64, device=e.device)
        shrink = grid.unsqueeze(1) / (e + grid.unsqueeze(1))  # [grid, rank]
        rss = rss0 + (shrink.square() * (a2 / e)).sum(1)
        gcv = n * rss / (free + shrink.sum(1)).square()
        return float(grid[int(torch.argmin(gcv))])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w, unready = self.scoring(z)
        return self.mask_unready(self.stat_features(z) @ w, unready)


def create_head(name: str, dim: int, **params: Any) -> Head:
    """The head registered as ``name`` (``linear``, ``ncm``, ``lda``, ``ranpac``) for ``dim``-wide embeddings."""
    return HEADS.create(name, dim, **params)


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Cross-entropy over ``classes`` only (the current experience's): other columns get no gradient."""
    mask = torch.full_like(logits[0], float("-inf"))
    mask[classes] = 0
    return F.cross_entropy(logits + mask, y)


class HeadChoice:
    """Strategy mixin: the classifier head chosen by registered name, declared once for every strategy that offers
    the choice (``class Mine(HeadChoice, Strategy)``; ``AdapterStrategy`` has it).

    Args:
        head: a registered head (``linear``, ``ncm``, ``lda``, ``ranpac``; None: the class's ``param_defaults``
            ``head``, else ``lda``).
        head_kw: the head's own parameters (e.g. ``{"shrinkage": 0.1}`` for ``lda``).
    """

    def __init__(self, *args: Any, head: str | None = None, head_kw: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.head_name = param_defaults_of(type(self)).get("head", "lda") if head is None else head
        self.head_kw = dict(head_kw or {})

    def make_head(self, dim: int) -> Head:
        """A new head of the chosen kind over ``dim``-wide features."""
        return create_head(self.head_name, dim, **self.head_kw)
