"""Statistics heads (NCM, LDA, RanPAC) against reference formulas, streams and checkpoints."""

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import ShrunkCovariance
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from cl.errors import ConfigError, DataError
from cl.heads import HEADS, LDAHead, LinearHead, NCMHead, RanPACHead, create_head

K, D = 5, 16


def gaussians(per_class, seed: int = 0, classes=range(K), shift: float = 3.0):
    """Classes with one shared anisotropic covariance (condition number 1e4, randomly rotated).

    ``per_class`` is an int or one count per class; the class means (same generator seed) differ
    by about one standard deviation along random directions, mostly visible in the thin directions.
    """
    g = torch.Generator().manual_seed(0)
    rot, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    scale = rot * torch.logspace(0.5, -1.5, D, dtype=torch.float64)
    means = torch.randn(max(classes) + 1, D, generator=g, dtype=torch.float64) @ scale.T * 1.2 + shift
    counts = [per_class] * len(classes) if isinstance(per_class, int) else per_class
    y = torch.cat([torch.full((n,), c) for c, n in zip(classes, counts, strict=True)])
    g.manual_seed(1000 + seed)
    x = means[y] + torch.randn(len(y), D, generator=g, dtype=torch.float64) @ scale.T
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def sectors(n: int, seed: int = 0, n_classes: int = 4):
    """Points near the unit circle in 2 of D dims; class = angular sector mod n_classes, so each class
    owns two opposite sectors, its mean is near zero and no linear boundary separates it."""
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    y = (ang // (math.pi / n_classes)).long() % n_classes
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * 0.1
    x[:, 0] += torch.cos(ang)
    x[:, 1] += torch.sin(ang)
    return x, y


def accuracy(head, x, y) -> float:
    return (head(x).argmax(1) == y).double().mean().item()


STATS_HEADS = {
    "ncm": {},
    "lda": {"shrinkage": 0.05},
    "lda_normalized": {"shrinkage": 0.05, "normalize": True, "log_prior": True},
    "ranpac": {"proj_dim": 96, "ridge": 1.0},
    "ranpac_gcv": {"proj_dim": 96},
}


def make(key: str, **extra) -> torch.nn.Module:
    return create_head(key.split("_")[0], D, **{**STATS_HEADS[key], **extra})


# --- LDA -----------------------------------------------------------------------------------------


def test_lda_matches_sklearn_with_the_same_shrinkage():
    x, y = gaussians(60)
    xt, _ = gaussians(100, seed=1)
    head = LDAHead(D, shrinkage=0.1)
    head.update(x, y)
    # sklearn's own shrinkage=a shrinks each class's correlation matrix (standardised features);
    # ShrunkCovariance is the head's formula, (1 - a) S + a tr(S)/d I, on the covariance itself
    ref = LinearDiscriminantAnalysis(
        solver="lsqr", covariance_estimator=ShrunkCovariance(shrinkage=0.1), priors=np.full(K, 1 / K)
    ).fit(x.numpy(), y.numpy())
    # sklearn pools the class covariances over N, the head over N - K: scores differ by that factor
    n = len(y)
    expected = (ref.decision_function(xt.numpy()) - math.log(1 / K)) * (n - K) / n
    np.testing.assert_allclose(head(xt).numpy(), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(head(xt).argmax(1).numpy(), ref.predict(xt.numpy()))


@pytest.mark.parametrize("normalize", [False, True])
def test_lda_matches_the_direct_formula_on_unbalanced_classes(normalize):
    classes, counts = [0, 2, 3, 6], [40, 7, 25, 90]
    x, y = gaussians(counts, classes=classes)
    head = LDAHead(D, shrinkage=0.2, normalize=normalize, log_prior=True)
    head.update(x, y)

    f = torch.nn.functional.normalize(x, dim=1) if normalize else x
    means = torch.stack([f[y == c].mean(0) for c in classes])
    centred = torch.cat([f[y == c] - f[y == c].mean(0) for c in classes])
    cov = centred.T @ centred / (len(y) - len(classes))
    cov = 0.8 * cov + 0.2 * torch.trace(cov) / D * torch.eye(D, dtype=torch.float64)
    w = torch.linalg.solve(cov, means.T).T
    b = -0.5 * (means * w).sum(1) + torch.log(torch.tensor(counts, dtype=torch.float64) / len(y))

    xt, _ = gaussians(20, seed=1)
    scores = head(xt)
    ft = torch.nn.functional.normalize(xt, dim=1) if normalize else xt
    torch.testing.assert_close(scores[:, classes], ft @ w.T + b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(head.covariance(), cov, rtol=1e-9, atol=1e-12)


def test_lda_beats_ncm_on_anisotropic_data():
    x, y = gaussians(200)
    xt, yt = gaussians(300, seed=1)
    lda, ncm = LDAHead(D), NCMHead(D)
    lda.update(x, y)
    ncm.update(x, y)
    acc_lda, acc_ncm = accuracy(lda, xt, yt), accuracy(ncm, xt, yt)
    assert acc_lda > 0.95
    assert acc_lda > acc_ncm + 0.1


def test_lda_copes_with_one_sample_per_class_and_no_shrinkage():
    x, y = gaussians(1)
    head = LDAHead(D, shrinkage=0.0)
    head.update(x, y)  # no within-class scatter yet: nearest Euclidean mean
    assert torch.equal(head(x).argmax(1), y)
    x, y = gaussians(3)  # 15 samples, 10 degrees of freedom < 16 dims: singular
    head = LDAHead(D, shrinkage=0.0)
    head.update(x, y)
    with pytest.warns(RuntimeWarning, match="pseudo-inverse"):
        scores = head(x)
    assert torch.isfinite(scores).all()


# --- RanPAC --------------------------------------------------------------------------------------


def test_ranpac_separates_what_class_means_cannot():
    x, y = sectors(1500)
    xt, yt = sectors(1500, seed=1)
    ranpac, ncm, lda = RanPACHead(D, proj_dim=256), NCMHead(D), LDAHead(D)
    for head in (ranpac, ncm, lda):
        head.update(x, y)
    assert accuracy(ranpac, xt, yt) > 0.8
    assert accuracy(ncm, xt, yt) < 0.5
    assert accuracy(lda, xt, yt) < 0.5


def test_ranpac_ridge_solves_the_normal_equations():
    x, y = sectors(300)
    head = RanPACHead(D, proj_dim=64, ridge=0.5)
    head.update(x, y)
    h = torch.relu(x @ head.projection.double())
    w = torch.linalg.solve(h.T @ h + 0.5 * torch.eye(64, dtype=torch.float64), h.T @ torch.eye(4)[y].double())
    torch.testing.assert_close(head(x), torch.relu(x @ head.projection.double()) @ w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n", [40, 400])  # fewer and more samples than projected features
def test_ranpac_gcv_from_statistics_equals_gcv_from_data(n):
    x, y = sectors(n)
    head = RanPACHead(D, proj_dim=64)
    head.update(x, y)
    head(x[:1])
    h = torch.relu(x @ head.projection.double())
    target = torch.eye(4, dtype=torch.float64)[y]
    scale = torch.trace(h.T @ h).item() / 64
    gcv = []
    for k in RanPACHead.GRID_EXPONENTS:
        lam = 10.0**k * scale
        hat = h @ torch.linalg.solve(h.T @ h + lam * torch.eye(64, dtype=torch.float64), h.T)
        rss = (target - hat @ target).square().sum().item()
        gcv.append(n * rss / (n - torch.trace(hat).item()) ** 2)
    best = RanPACHead.GRID_EXPONENTS[int(np.argmin(gcv))]
    assert head.selected_ridge == pytest.approx(10.0**best * scale, rel=1e-9)


# --- all statistics heads ------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(STATS_HEADS))
def test_streaming_class_by_class_equals_one_update(key):
    x, y = gaussians([30, 20, 40, 10, 25])
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    stream, batch = make(key), make(key)
    for i in range(0, len(y), 7):  # classes arrive one after another, in batches of 7
        stream.update(x[i : i + 7], y[i : i + 7])
        if i % 28 == 0:
            stream(x[:2])  # solving in between must not leave stale weights behind
    batch.update(x, y)
    for name, buf in batch.named_buffers():
        torch.testing.assert_close(dict(stream.named_buffers())[name], buf, rtol=1e-12, atol=1e-12)
    xt, _ = gaussians(50, seed=1)
    torch.testing.assert_close(stream(xt), batch(xt), rtol=1e-9, atol=1e-9)
    assert torch.equal(stream(xt).argmax(1), batch(xt).argmax(1))
    assert getattr(stream, "selected_ridge", 0) == pytest.approx(getattr(batch, "selected_ridge", 0), rel=1e-12)


@pytest.mark.parametrize("key", list(STATS_HEADS))
def test_state_dict_round_trip_into_a_fresh_head(key):
    x, y = gaussians(30, classes=[1, 4, 7])
    head = make(key)
    head.update(x, y)
    fresh = make(key, **({"seed": 5} if key.startswith("ranpac") else {}))
    fresh.load_state_dict(head.state_dict())  # grows to 8 outputs; RanPAC's projection comes along
    assert fresh.num_outputs == 8
    xt, _ = gaussians(20, seed=1, classes=[1, 4, 7])
    assert torch.equal(fresh(xt), head(xt))


@pytest.mark.parametrize("key", ["lda", "ranpac"])
def test_loading_and_updating_drop_cached_weights(key):
    x, y = gaussians(30)
    small, full = make(key), make(key)
    small.update(x[y < 2], y[y < 2])
    full.update(x, y)
    small(x)  # caches the 2-class solution
    small.load_state_dict(full.state_dict())
    assert torch.equal(small(x), full(x))
    low, high = small(x.float()), small(x.double())  # scored in the input's dtype, each cached apart
    assert (low.dtype, high.dtype) == (torch.float32, torch.float64)
    torch.testing.assert_close(low.double(), full(x.double()), rtol=1e-4, atol=1e-3)

    more, _ = gaussians(2, seed=2)
    full.update(more, torch.zeros(len(more), dtype=torch.long))
    fresh = make(key)
    fresh.load_state_dict(full.state_dict())
    assert torch.equal(full(x), fresh(x))


@pytest.mark.parametrize("key", list(STATS_HEADS))
def test_scored_first_in_inference_mode_then_with_gradients(key):
    x, y = gaussians(30)
    head = make(key)
    head.update(x, y)
    with torch.inference_mode():
        head(x.float())  # what it caches for later calls is not an inference tensor
    z = x[:5].float().requires_grad_(True)
    head(z)[:, :3].sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("key", list(STATS_HEADS))
def test_unknown_classes_score_minus_inf(key):
    x, y = gaussians(20, classes=[0, 2, 5])
    head = make(key)
    head.update(x, y)
    head.add_classes([7])  # known, but no data yet
    scores = head(x)
    assert scores.shape == (len(y), 8)
    assert torch.isfinite(scores[:, [0, 2, 5]]).all()
    assert torch.isneginf(scores[:, [1, 3, 4, 6]]).all()
    if not key.startswith("ncm"):  # NCM keeps its zero prototype for a known class without data
        assert torch.isneginf(scores[:, 7]).all()
    head.update(x[:3], torch.full((3,), 7))  # class 7 has data now: scored (the cached mask is dropped)
    assert torch.isfinite(head(x)[:, [0, 2, 5, 7]]).all()
    assert torch.isneginf(head(x.double())[:, [1, 3, 4, 6]]).all()


def test_float32_embeddings_score_in_float32():
    x, y = gaussians(30)
    for key in STATS_HEADS:
        head = make(key)
        head.update(x.float(), y)
        scores = head(x.float())
        assert scores.dtype == torch.float32
        assert (scores.argmax(1) == head(x).argmax(1)).double().mean() > 0.98


def test_update_checks_shapes():
    with pytest.raises(DataError, match=r"z \[B, 16\]"):
        LDAHead(D).update(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match="y"):
        RanPACHead(D, proj_dim=8).update(torch.zeros(4, D), torch.zeros(3, dtype=torch.long))


# --- factory -------------------------------------------------------------------------------------


def test_create_head_by_name():
    assert set(HEADS.names()) == {"linear", "ncm", "lda", "ranpac"}
    assert isinstance(create_head("linear", D), LinearHead)
    assert isinstance(create_head("ncm", D), NCMHead)
    lda = create_head("lda", D, shrinkage=0.1, normalize=True)
    assert isinstance(lda, LDAHead) and lda.shrinkage == 0.1 and lda.normalize
    ranpac = create_head("ranpac", D, proj_dim=32, ridge=2.0, seed=3)
    assert isinstance(ranpac, RanPACHead) and ranpac.projection.shape == (D, 32) and ranpac.ridge == 2.0


def test_create_head_errors_say_what_is_allowed():
    with pytest.raises(ConfigError, match="did you mean 'lda'"):
        create_head("lad", D)
    with pytest.raises(ConfigError, match="did you mean 'shrinkage'"):
        create_head("lda", D, shrinkage_=0.1)
    with pytest.raises(ConfigError, match=r"shrinkage must be in \[0, 1\]"):
        create_head("lda", D, shrinkage=1.5)
    with pytest.raises(ConfigError, match="ridge must be"):
        create_head("ranpac", D, ridge=-1.0)
