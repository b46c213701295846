"""The streaming / distributed core of the metrics family (derivations/metrics.md, MET.1-MET.6)
and the full-set KID variance (derivations/divergence.md, DIV.16).

Oracles: one pass over all the data, exact rationals (``fractions``), 40-digit ``mpmath``,
closed forms for commuting covariances, ``scipy.linalg.sqrtm`` as the peer formula, exact
enumeration of a discrete distribution, the empirical variance over independent draws,
and a real 2-process ``torch.distributed`` (gloo, 127.0.0.1) run against one process on the
concatenated data.
"""

from __future__ import annotations

import itertools
import os
import warnings
from fractions import Fraction

import numpy as np
import pytest

from genloss.reference import divergence as RD
from genloss.reference import metrics as RM
from gloo_workers import init_gloo, run_workers
from peers import given_features, peer, try_peer

torch = pytest.importorskip("torch")
import genloss.torch as T  # noqa: E402
from genloss.native import divergence as ND  # noqa: E402

REL = 1e-12  # merge vs one pass in float64: a few roundings per merge (MET.1)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))


# ============================================================================= MET.1


def _splits(n, rng):
    yield [1] * n  # every part one sample
    yield [n]
    yield [1, 2, 5, n - 8]
    yield [n - 8, 5, 2, 1]
    for _ in range(4):
        cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, 6), replace=False))
        yield list(np.diff(np.concatenate([[0], cuts, [n]])))


@pytest.mark.parametrize("layer", ["reference", "torch"])
def test_merge_any_split_equals_one_pass(layer):
    """update() over any split, merge() of part-states (a tree) = one update of all rows (MET.1)."""
    cls = RM.GaussianMoments if layer == "reference" else T.GaussianMoments
    wrap = (lambda a: a) if layer == "reference" else torch.from_numpy
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 6)) * rng.uniform(0.5, 3.0, size=6) + rng.normal(size=6) * 3
    whole = cls().update(wrap(x))
    mean_1, cov_1 = np.asarray(whole.mean), np.asarray(whole.cov)
    assert rel_err(cov_1, np.cov(x, rowvar=False)) < REL  # the one pass itself: numpy's two-pass cov
    for sizes in _splits(x.shape[0], rng):
        parts = np.split(x, np.cumsum(sizes)[:-1])
        streamed = cls()
        for p in parts:
            streamed.update(wrap(p))
        states = [cls().update(wrap(p)) for p in parts]
        while len(states) > 1:  # merge as a tree, the other association order
            states = [
                states[i].merge(states[i + 1]) if i + 1 < len(states) else states[i]
                for i in range(0, len(states), 2)
            ]
        for got in (streamed, states[0]):
            assert got.n == x.shape[0]
            assert rel_err(got.mean, mean_1) < REL, sizes
            assert rel_err(got.cov, cov_1) < REL, sizes
    empty = cls(dim=6)
    assert empty.merge(cls()).n == 0 and cls().merge(whole).n == 23  # an empty side is the identity


def _exact_moments(x):
    """Mean and unbiased covariance of the float64 rows as exact rationals, rounded once."""
    n, d = x.shape
    xf = [[Fraction(float(v)) for v in row] for row in x]
    mean = [sum(r[j] for r in xf) / n for j in range(d)]
    cov = [
        [sum((r[i] - mean[i]) * (r[j] - mean[j]) for r in xf) / (n - 1) for j in range(d)] for i in range(d)
    ]
    return np.array([float(m) for m in mean]), np.array([[float(c) for c in row] for row in cov])


@pytest.mark.parametrize("layer", ["reference", "torch"])
def test_large_mean_keeps_every_digit(layer):
    """Mean 1e4, spread 1, one row at a time: Chan's update agrees with the exact rational
    covariance to 1e-12 relative, where the one-pass sum(x x^T) - n mean mean^T is off by
    more than 1e-10 in float64 and by O(1) in float32 (MET.1)."""
    cls = RM.GaussianMoments if layer == "reference" else T.GaussianMoments
    wrap = (lambda a: a) if layer == "reference" else torch.from_numpy
    rng = np.random.default_rng(1)
    x = 1e4 + rng.normal(size=(300, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.7]])
    mean_exact, cov_exact = _exact_moments(x)
    g = cls()
    for row in x:
        g.update(wrap(row[None, :]))
    assert rel_err(g.mean, mean_exact) < 1e-15
    assert rel_err(g.cov, cov_exact) < REL
    n = x.shape[0]
    naive64 = (x.T @ x - n * np.outer(x.mean(0), x.mean(0))) / (n - 1)
    x32 = x.astype(np.float32)
    naive32 = (x32.T @ x32 - n * np.outer(x32.mean(0), x32.mean(0))) / (n - 1)
    assert rel_err(naive64, cov_exact) > 1e-10  # the cancellation the streaming form avoids
    assert rel_err(naive32, cov_exact) > 0.5


def test_moments_errors_name_the_op_and_argument():
    g = RM.GaussianMoments()
    with pytest.raises(ValueError, match=r"GaussianMoments\.cov: .*n >= 2"):
        _ = g.cov
    g.update(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"GaussianMoments\.update: x must have 3 features"):
        g.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"GaussianMoments\.update: x must be finite"):
        g.update(np.full((1, 3), np.nan))
    with pytest.raises(TypeError, match=r"GaussianMoments\.merge: other"):
        g.merge(np.ones(3))


@pytest.mark.parametrize("layer", ["reference", "torch"])
def test_moments_dim_and_merge_checks(layer):
    """dim: a TypeError for a non-int (2.0 was a ValueError), a ValueError below 1; merge refuses a
    state of another d even when it is empty (an empty d=4 state merged into a d=3 one was accepted)."""
    cls = RM.GaussianMoments if layer == "reference" else pytest.importorskip("genloss.torch").GaussianMoments
    with pytest.raises(TypeError, match=r"GaussianMoments: dim must be an int, got float"):
        cls(dim=2.0)
    with pytest.raises(TypeError, match=r"GaussianMoments: dim must be an int, got bool"):
        cls(dim=True)
    with pytest.raises(ValueError, match=r"GaussianMoments: dim must be >= 1, got 0"):
        cls(dim=0)
    with pytest.raises(ValueError, match=r"GaussianMoments\.merge: other has d=4, this state d=3"):
        cls(dim=3).merge(cls(dim=4))
    assert cls(dim=3).merge(cls()).dim == 3  # a state that has not seen data yet has no d to disagree
    with pytest.raises(ValueError, match=r"frechet_distance: y must have 3 features"):
        RM.frechet_distance(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"frechet_distance: cov1 is not positive semi-definite"):
        RM.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(TypeError, match=r"frechet_distance: takes"):
        RM.frechet_distance(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"frechet_distance: cov1 requires grad"):
        c = torch.eye(2, dtype=torch.float64, requires_grad=True)
        T.frechet_distance(torch.zeros(2), c, torch.zeros(2), torch.eye(2))
    with pytest.raises(RuntimeError, match=r"gather_with_grad: torch.distributed is not initialized"):
        T.gather_with_grad(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"kid: real_features needs >= 4 samples"):
        RD.kid(np.ones((3, 2)), np.ones((5, 2)), subsets=None)


# ============================================================================= MET.2 - MET.4


def test_frechet_commuting_closed_form():
    """Diagonal covariances: tr sqrt(S1 S2) = sum sqrt(s1 s2) (MET.2, MET.3); every call form."""
    rng = np.random.default_rng(2)
    d = 9
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 4.0, size=d), rng.uniform(0.1, 4.0, size=d)
    s1[0] = 0.0  # a singular direction too
    closed = np.sum((mu1 - mu2) ** 2) + s1.sum() + s2.sum() - 2 * np.sum(np.sqrt(s1 * s2))
    got = RM.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert abs(float(got) - closed) <= 1e-13 * (s1.sum() + s2.sum())
    t = T.frechet_distance(*(torch.from_numpy(a) for a in (mu1, np.diag(s1), mu2, np.diag(s2))))
    assert abs(float(t) - closed) <= 1e-13 * (s1.sum() + s2.sum())
    # features whose sample covariances are exactly diagonal: +-1 columns of a Hadamard design
    h = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=np.float64)[:, 1:]
    a, b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.25, 1.0])
    x, y = h * a + 1.0, h * b - 2.0  # covariances diag(a^2 * 4/3), diag(b^2 * 4/3)
    closed = 3 * 9.0 + (4 / 3) * (np.sum(a**2) + np.sum(b**2) - 2 * np.sum(a * b))
    assert abs(float(RM.frechet_distance(x, y)) - closed) < 1e-13 * closed
    assert abs(float(T.frechet_distance(torch.from_numpy(x), torch.from_numpy(y))) - closed) < 1e-13 * closed


def _mp_trace_sqrt_from_factor_product(p):
    """sum sqrt(eigenvalues of P P^T) at 40 digits, P an exact (integer or float64) matrix."""
    import mpmath as mp

    with mp.workdps(40):
        pm = mp.matrix(p.tolist())
        c = pm * pm.T
        ev = mp.eigsy(c, eigvals_only=True)
        return float(mp.fsum(mp.sqrt(max(e, 0)) for e in ev))


@pytest.mark.parametrize("d", [7, 64])
def test_frechet_high_precision(d):
    """Integer factors L1, L2 (cov_i = L_i L_i^T, exact in float64): the eigenvalues of the
    exact symmetric (L1^T L2)(L1^T L2)^T at 40 digits give tr sqrt(S1 S2) (MET.3)."""
    pytest.importorskip("mpmath")
    rng = np.random.default_rng(d)
    l1 = rng.integers(-3, 4, size=(d, d)).astype(np.float64) + 4 * np.eye(d)
    l2 = rng.integers(-3, 4, size=(d, d)).astype(np.float64)
    mu1, mu2 = rng.integers(-5, 6, size=d).astype(np.float64), rng.integers(-5, 6, size=d).astype(np.float64)
    c1, c2 = l1 @ l1.T, l2 @ l2.T  # integers < 2^53: exact
    exact = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(c1)
        + np.trace(c2)
        - 2 * _mp_trace_sqrt_from_factor_product(l1.T @ l2)
    )
    got = RM.frechet_distance(mu1, c1, mu2, c2)
    assert abs(float(got) - exact) <= 1e-10 * abs(exact)
    t = T.frechet_distance(*(torch.from_numpy(a) for a in (mu1, c1, mu2, c2)))
    assert abs(float(t) - exact) <= 1e-10 * abs(exact)


def test_frechet_matches_scipy_sqrtm():
    """Well-conditioned covariances: the usual real(sqrtm(S1 @ S2)) formula agrees (MET.2)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 1.0
    y = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    mu1, mu2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    peer = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(c1)
        + np.trace(c2)
        - 2 * np.trace(scipy_linalg.sqrtm(c1 @ c2).real)
    )
    for got in (
        RM.frechet_distance(x, y),
        RM.frechet_distance(mu1, c1, mu2, c2),
        RM.frechet_distance(RM.GaussianMoments().update(x), RM.GaussianMoments().update(y)),
        T.frechet_distance(torch.from_numpy(x), torch.from_numpy(y)),
        T.frechet_distance(
            T.GaussianMoments().update(torch.from_numpy(x)), T.GaussianMoments().update(torch.from_numpy(y))
        ),
    ):
        assert abs(float(got) - peer) <= 1e-9 * abs(peer)


@pytest.mark.parametrize(("n1", "n2"), [(5, 7), (7, 5), (6, 40)])
def test_frechet_rank_deficient_is_real_and_nonnegative(n1, n2):
    """n < d (rank-deficient covariances, scale 1e3): real, >= -1e-10 * scale, equal to the
    40-digit nuclear norm of A B^T (MET.4); the moments form agrees to 1e-7 (MET.4: a
    given singular covariance determines tr sqrt only to sqrt(eps))."""
    pytest.importorskip("mpmath")
    rng = np.random.default_rng(n1 * 100 + n2)
    d = 32
    x = 1e3 * rng.normal(size=(n1, d)) + 5.0
    y = rng.normal(size=(n2, n1)) @ x / np.sqrt(n1) + 300 * rng.normal(size=(n2, d))  # overlaps x's span
    a, b = x - x.mean(0), y - y.mean(0)
    scale = np.sum(a * a) / (n1 - 1) + np.sum(b * b) / (n2 - 1) + np.sum((x.mean(0) - y.mean(0)) ** 2)
    tsqrt = _mp_trace_sqrt_from_factor_product(a @ b.T) / np.sqrt((n1 - 1) * (n2 - 1))
    exact = scale - 2 * tsqrt
    for got in (RM.frechet_distance(x, y), T.frechet_distance(torch.from_numpy(x), torch.from_numpy(y))):
        assert np.isrealobj(np.asarray(got)) and float(got) >= -1e-10 * scale
        assert abs(float(got) - exact) <= 1e-12 * scale
    moments = RM.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert float(moments) >= -1e-10 * scale and abs(float(moments) - exact) <= 1e-7 * scale


def test_frechet_float32_statistics_of_rank_deficient_features():
    """(MET.4) float32 (mu, cov) of n < d features (the way FID statistics are often stored): the
    cov's d - n + 1 zero eigenvalues carry float32 rounding (about -2.5e-8 at lambda_max 2.4, far
    below float64's -1e-8 lambda_max test), so they must be taken as zero by the input dtype's
    epsilon, not refused.  Both layers = the features form on the same (float32) features, to the
    float32 rounding of the statistics (each entry 6e-8 relative: 1e-5 of the traces leaves room)."""
    rng = np.random.default_rng(40)
    x = np.abs(rng.standard_normal((100, 256))).astype(np.float32)
    y = np.abs(rng.standard_normal((120, 256))).astype(np.float32)
    want = float(RM.frechet_distance(x, y))
    stats = [
        x.mean(0, dtype=np.float64),
        np.cov(x, rowvar=False),
        y.mean(0, dtype=np.float64),
        np.cov(y, rowvar=False),
    ]
    stats = [s.astype(np.float32) for s in stats]
    lam = np.linalg.eigvalsh(stats[1].astype(np.float64))
    assert lam[0] < -1e-8 * lam[-1]  # the case: the old fixed float64 test refused it
    scale = float(np.trace(stats[1].astype(np.float64)) + np.trace(stats[3].astype(np.float64)))
    for got in (RM.frechet_distance(*stats), T.frechet_distance(*(torch.from_numpy(s) for s in stats))):
        assert abs(float(got) - want) <= 1e-5 * scale, (float(got), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frechet_indefinite_covariance_is_refused(dtype):
    """(MET.4) an eigenvalue of -1e-3 lambda_max is no rounding (float32's band at d = 64 is
    4 d eps = 3e-5): refused by both layers, in float32 and float64; float64 input keeps the strict
    -1e-8 lambda_max test (-1e-6 is refused)."""
    rng = np.random.default_rng(41)
    d = 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.linspace(0.1, 1.0, d)
    mu = np.zeros(d, dtype=dtype)
    good = ((q * lam) @ q.T).astype(dtype)
    for neg in (-1e-3, -1e-6) if dtype == np.float64 else (-1e-3,):
        lam[0] = neg
        bad = ((q * lam) @ q.T).astype(dtype)
        with pytest.raises(ValueError, match=r"frechet_distance: cov2 is not positive semi-definite"):
            RM.frechet_distance(mu, good, mu, bad)
        with pytest.raises(ValueError, match=r"frechet_distance: cov2 is not positive semi-definite"):
            T.frechet_distance(*(torch.from_numpy(a) for a in (mu, good, mu, bad)))


@pytest.mark.parametrize(("n", "d"), [(5, 32), (50, 8)])
def test_frechet_identical_data_is_zero(n, d):
    """Identical data: 0 up to rounding on every path, including rank-deficient covariances (MET.2, MET.4)."""
    rng = np.random.default_rng(n + d)
    x = 10 * rng.normal(size=(n, d)) + 100.0
    c = np.cov(x, rowvar=False)
    tol = 1e-12 * 2 * np.trace(c)
    for got in (
        RM.frechet_distance(x, x),
        RM.frechet_distance(x.mean(0), c, x.mean(0), c),
        T.frechet_distance(torch.from_numpy(x), torch.from_numpy(x)),
    ):
        assert abs(float(got)) <= tol


# ============================================================================= MET.5


# ============================================================================= FID vs pytorch-fid and torchmetrics


def _peer_fids(mu1, c1, mu2, c2):
    """pytorch-fid's ``calculate_frechet_distance`` and torchmetrics' FID formula (``_compute_fid``, what
    its ``FrechetInceptionDistance.compute`` returns) on the same moments, each where it imports."""
    import contextlib
    import io
    import warnings

    out = {}
    fid_score, fid = try_peer("pytorch_fid.fid_score"), try_peer("torchmetrics.image.fid")
    if not isinstance(fid_score, Exception):
        # silenced: scipy's deprecation of sqrtm's `disp`, and pytorch-fid's printed singular-product note
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            out["pytorch-fid"] = float(fid_score.calculate_frechet_distance(mu1, c1, mu2, c2))
    if not isinstance(fid, Exception):
        out["torchmetrics"] = float(fid._compute_fid(*(torch.from_numpy(a) for a in (mu1, c1, mu2, c2))))
    if not out:
        pytest.skip("neither pytorch-fid nor torchmetrics imports here")
    return out


def _mp_trace_sqrt_from_data(x, y):
    """(MET.3, MET.4) tr sqrt(S1 S2) of the sample covariances of x and y at 40 digits: the nuclear norm
    of A B^T (A, B the centred data; its n1 x n1 Gram when n1 <= d), or for n1 > d the eigenvalues of the
    symmetric L^T (B^T B) L with A^T A = L L^T (Cholesky), d x d: the same non-zero spectrum."""
    import mpmath as mp

    a, b = x - x.mean(0), y - y.mean(0)
    norm = np.sqrt((len(x) - 1) * (len(y) - 1))
    if len(x) <= x.shape[1]:
        return _mp_trace_sqrt_from_factor_product(a @ b.T) / norm
    with mp.workdps(40):
        am, bm = mp.matrix(a.tolist()), mp.matrix(b.tolist())
        lower = mp.cholesky(am.T * am)
        ev = mp.eigsy(lower.T * (bm.T * bm) * lower, eigvals_only=True)
        return float(mp.fsum(mp.sqrt(max(e, 0)) for e in ev)) / norm


def test_frechet_matches_fid_peers():
    """(MET.2) pytorch-fid and torchmetrics take the square root of the NON-symmetric S1 S2 (scipy's
    ``sqrtm``; the square roots of ``torch.linalg.eigvals``). Well-conditioned covariances: they agree with
    the 40-digit value, as ours does, to 1e-9 of the scale (tr S1 + tr S2 + |mu1 - mu2|^2). Rank-deficient
    covariances (n < d, as FID on few samples): a null direction's eigenvalue is rounded to about
    eps * lambda_max, and its square root, about 1e-8 sqrt(lambda_max), is added to the trace term, so
    their value is off by about 3e-8 relative (here n = 20, d = 64: -1.5e-4 on 5240), and identical
    data give -3.3e-5 and -3.7e-5 instead of 0 (pytorch-fid 0.3.0, torchmetrics 1.9.0). The
    test shows the correct values (the 40-digit nuclear norm of MET.4, and 0) and ours at 1e-12 of the
    scale; there the peers are held only to 1e-6, the size of their rounding of the square root."""
    pytest.importorskip("mpmath")
    rng = np.random.default_rng(31)
    cases = (
        ("well-conditioned", rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 1.0,
         rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)), 1e-12, 1e-9),
        ("n < d", rng.normal(size=(20, 64)) @ rng.normal(size=(64, 64)) + 1.0,
         rng.normal(size=(20, 64)) @ rng.normal(size=(64, 64)), 1e-12, 1e-6),
    )  # fmt: skip
    for name, x, y, our_rtol, peer_rtol in cases:
        mu1, mu2, c1, c2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        scale = np.trace(c1) + np.trace(c2) + np.sum((mu1 - mu2) ** 2)
        exact = scale - 2 * _mp_trace_sqrt_from_data(x, y)
        assert abs(float(RM.frechet_distance(x, y)) - exact) <= our_rtol * scale, name
        for who, got in _peer_fids(mu1, c1, mu2, c2).items():
            assert abs(got - exact) <= peer_rtol * scale, (name, who, got, exact)
    # identical rank-deficient data: 0, which ours returns to rounding and the peers to about 1e-8 relative
    x = rng.normal(size=(50, 64)) @ rng.normal(size=(64, 64)) + 1.0
    c = np.cov(x, rowvar=False)
    assert abs(float(RM.frechet_distance(x, x))) <= 1e-12 * 2 * np.trace(c)
    for who, got in _peer_fids(x.mean(0), c, x.mean(0), c).items():
        assert abs(got) <= 1e-6 * 2 * np.trace(c), (who, got)


def test_frechet_matches_torchmetrics_fid_metric():
    """(MET.1) torchmetrics' ``FrechetInceptionDistance`` (public API, with a feature module that passes
    the features through) accumulates sum(x x^T) and forms the covariance as (sum x x^T - n mu mu^T)/(n - 1),
    which loses log10(mean^2 / spread^2) digits. FID is invariant to shifting both sets by one vector, so
    the correct value at mean 1e6 is ours on the data shifted back (exactly: Sterbenz's lemma). Ours,
    streamed through ``GaussianMoments`` (Chan's update, MET.1), matches it to 1e-9 of the scale
    (tr S1 + tr S2 + |mu1 - mu2|^2) at every shift. torchmetrics matches at mean 0, and at mean 1e6 it is
    off by 1.3e-3 relative (torchmetrics 1.9.0, float64 states); the test holds it to MET.1's bound for
    the one-pass formula, about eps * mean^2 per covariance entry (spread 1)."""
    fid = peer("torchmetrics.image.fid")

    rng = np.random.default_rng(32)
    d, n = 8, 2000
    x0, y0 = rng.normal(size=(n, d)), 1.1 * rng.normal(size=(n, d)) + 0.1
    for shift in (0.0, 1e6):
        x, y = x0 + shift, y0 + shift
        back_x, back_y = x - shift, y - shift  # exact: the rounded data, shifted back
        truth = float(RM.frechet_distance(back_x, back_y))
        scale = np.trace(np.cov(back_x, rowvar=False)) + np.trace(np.cov(back_y, rowvar=False)) + truth
        mine = RM.GaussianMoments(), RM.GaussianMoments()
        metric = fid.FrechetInceptionDistance(feature=given_features(d))
        metric.set_dtype(torch.float64)
        for part_x, part_y in zip(np.array_split(x, 10), np.array_split(y, 10), strict=True):
            metric.update(torch.from_numpy(part_x), real=True)
            metric.update(torch.from_numpy(part_y), real=False)
            mine[0].update(part_x)
            mine[1].update(part_y)
        assert abs(float(RM.frechet_distance(*mine)) - truth) <= 1e-9 * scale, shift
        theirs = float(metric.compute())
        # MET.1: each covariance entry loses about eps * shift^2 (the rounding of sum x x^T ~ n shift^2, / n)
        assert abs(theirs - truth) <= max(1e-9 * scale, 10 * d * 2.0**-52 * shift**2), (shift, theirs, truth)


@pytest.mark.parametrize(("n1", "n2", "d"), [(6, 5, 4), (3, 4, 7), (9, 12, 3)])
def test_torch_frechet_gradcheck(n1, n2, d):
    """gradcheck of d^2(x, y) in float64 for n <= d (the data themselves) and n > d (QR), on
    random, well-separated spectra; and the value = the reference (MET.5)."""
    gen = torch.Generator().manual_seed(n1 * 31 + d)
    x = torch.randn(n1, d, generator=gen, dtype=torch.float64, requires_grad=True)
    y = (1.5 * torch.randn(n2, d, generator=gen, dtype=torch.float64) + 0.3).requires_grad_()
    assert (
        abs(
            float(T.frechet_distance(x, y).detach())
            - float(RM.frechet_distance(x.detach().numpy(), y.detach().numpy()))
        )
        < 1e-12
    )
    assert torch.autograd.gradcheck(T.frechet_distance, (x, y), fast_mode=True)


def test_torch_frechet_gradient_at_repeated_and_vanishing_singular_values():
    """Orthogonal designs make A B^T a multiple of an isometry (every singular value repeated);
    n1 < n2 leaves singular values at 0. The gradient is finite and equals central differences
    along random directions (MET.5: the polar factor is unique at repeated non-zero singular
    values; the vanishing ones are the centring's, whose subgradient choice does not matter)."""
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    cases = [
        (h[:, 1:] * 2.0, h[:, 1:] * 3.0 + 1.0),  # A B^T = 24 (I - 11^T/4): singular values 24, 24, 24, 0
        (
            torch.randn(3, 5, generator=gen, dtype=torch.float64),
            torch.randn(8, 5, generator=gen, dtype=torch.float64),
        ),
    ]
    for x0, y0 in cases:
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        T.frechet_distance(x, y).backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
        for _ in range(3):
            dx = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
            dy = torch.randn(y0.shape, generator=gen, dtype=torch.float64)
            h_ = 1e-6
            fd = (
                T.frechet_distance(x0 + h_ * dx, y0 + h_ * dy)
                - T.frechet_distance(x0 - h_ * dx, y0 - h_ * dy)
            ) / (2 * h_)
            an = (x.grad * dx).sum() + (y.grad * dy).sum()
            assert abs(float(fd - an)) <= 1e-6 * max(1.0, abs(float(an)))


# ============================================================================= DIV.16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_frechet_non_finite_input_is_named_in_both_layers(bad):
    """A NaN or inf feature: the reference's ValueError naming the op and the argument in the torch
    layer too (it failed inside LAPACK: torch._C._LinAlgError from the SVD); the moments form too."""
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    for _layer, fn in (("reference", lambda *a: RM.frechet_distance(*(t.numpy() for t in a))),
                      ("torch", T.frechet_distance)):  # fmt: skip
        for which in (0, 1):
            xs, ys = x.clone(), y.clone()
            (xs, ys)[which][0, 0] = bad
            with pytest.raises(ValueError, match=rf"frechet_distance: {'xy'[which]} must be finite"):
                fn(xs, ys)
        mu, cov = x.mean(0), torch.cov(x.T)
        cov[0, 1] = bad
        with pytest.raises(ValueError, match="frechet_distance: mu1 and cov1 must be finite"):
            fn(mu, cov, y.mean(0), torch.cov(y.T))


def test_kid_variance_is_exactly_unbiased():
    """Exact enumeration: p on 2 atoms, q on 3 atoms (1-D), N=4, M=5. The mean of the variance
    estimate over all 2^4 * 3^5 samples equals the exact Var of the full-set MMD^2_u (DIV.16)."""
    px, sx = np.array([0.3, 0.7]), np.array([-1.0, 2.0])
    py, sy = np.array([0.2, 0.5, 0.3]), np.array([-0.5, 0.5, 1.5])
    n, m = 4, 5
    e1 = e2 = ev = 0.0
    for ix in itertools.product(range(2), repeat=n):
        wx, x = np.prod(px[list(ix)]), sx[list(ix)][:, None]
        for iy in itertools.product(range(3), repeat=m):
            w, y = wx * np.prod(py[list(iy)]), sy[list(iy)][:, None]
            sums = RD._polynomial_sums(x, y)
            # the estimator by its definition (double loops), not through the sums
            k = lambda a, b: (a * b + 1.0) ** 3  # noqa: E731  D = 1
            u = (
                sum(k(x[i, 0], x[j, 0]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
                + sum(k(y[i, 0], y[j, 0]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                - 2 * sum(k(x[i, 0], y[j, 0]) for i in range(n) for j in range(m)) / (n * m)
            )
            e1, e2, ev = e1 + w * u, e2 + w * u * u, ev + w * RD.mmd2_u_variance(n, m, sums)
    var = e2 - e1 * e1
    assert abs(ev - var) <= 1e-12 * var


def test_kid_variance_matches_empirical_variance():
    """3000 independent draws (N=40, M=30, D=4, shifted Gaussians, fixed seed): the mean of the
    closed-form variance (std^2 of kid(subsets=None)) is within 4 standard errors of the sample
    variance of the estimates; the standard error from the draws' fourth central moment
    (DIV.16)."""
    rng = np.random.default_rng(11)
    draws = 3000
    vals, variances = np.empty(draws), np.empty(draws)
    for r in range(draws):
        x = rng.normal(size=(40, 4))
        y = rng.normal(size=(30, 4)) * 1.2 + 0.4
        v, s = RD.kid(x, y, subsets=None)
        vals[r], variances[r] = v, s**2
    emp = vals.var(ddof=1)
    c = vals - vals.mean()
    se_emp = np.sqrt(max(np.mean(c**4) - emp**2, 0.0) / draws)  # sd of the sample variance
    se_mean = variances.std(ddof=1) / np.sqrt(draws)
    assert abs(variances.mean() - emp) <= 4 * np.hypot(se_emp, se_mean), (variances.mean(), emp, se_emp)
    assert abs(variances.mean() - emp) <= 0.15 * emp  # and a stated relative tolerance


def test_kid_full_set_every_layer(monkeypatch):
    """subsets=None: the native/torch tiled sums (tiles smaller than the data, float32 and
    float64 inputs) give the reference's value and std; the value is the full-set mmd2 (DIV.16)."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(37, 5)), rng.normal(size=(29, 5)) + 0.3
    v_ref, s_ref = RD.kid(x, y, subsets=None)
    assert abs(float(v_ref) - float(RD.mmd2(x, y, "polynomial"))) < 1e-12 * abs(float(v_ref)) + 1e-15
    monkeypatch.setattr(ND, "_KID_TILE", 8)
    for v, s in (
        ND.kid(x, y, subsets=None),
        T.kid(torch.from_numpy(x), torch.from_numpy(y), subsets=None),
    ):
        assert abs(v - float(v_ref)) <= 1e-12 * abs(float(v_ref)) and abs(s - float(s_ref)) <= 1e-10 * float(
            s_ref
        )
    v32, s32 = T.kid(torch.from_numpy(x).float(), torch.from_numpy(y).float(), subsets=None)
    x32, y32 = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    v_r32, s_r32 = RD.kid(x32, y32, subsets=None)  # float32 inputs are promoted, then exact float64 math
    assert abs(v32 - float(v_r32)) <= 1e-12 * abs(float(v_r32)) and abs(s32 - float(s_r32)) <= 1e-10 * float(
        s_r32
    )


# ============================================================================= MET.1, MET.6: 2 ranks


WORLD = 2
N_PER_RANK = (9, 6)  # unequal shards: padding in gather_with_grad
D = 5


def _global_data():
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(sum(N_PER_RANK), D, generator=gen, dtype=torch.float64) * 2 + 1e3
    y = torch.randn(sum(N_PER_RANK), D, generator=gen, dtype=torch.float64) + 0.5
    return x, y


def _global_terms(x, y):
    """The metrics of the gathered batch: FD, MMD^2 (rbf, fixed bandwidth), full-set KID."""
    xc = x - x.mean(dim=0)  # the features sit at 1e3: centre them for the kernels
    kid = T.kid(xc.detach(), y.detach(), subsets=None)
    return T.frechet_distance(x, y), T.mmd2(xc, y, "rbf", [2.0]), torch.tensor(kid, dtype=torch.float64)


def _global_loss(x, y):
    """One global loss on the gathered batch: FD + MMD^2."""
    fd, mmd, _ = _global_terms(x, y)
    return fd + mmd


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    init_gloo(rank, port, WORLD)
    try:
        x, y = _global_data()
        lo, hi = sum(N_PER_RANK[:rank]), sum(N_PER_RANK[: rank + 1])
        # GaussianMoments.all_reduce: the local shard fed in two updates
        g = T.GaussianMoments(dim=D)
        g.update(x[lo : lo + 2]).update(x[lo + 2 : hi])
        g.all_reduce()
        # gather_with_grad: a parameter theta scales the local shards; every rank computes the same loss
        theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        xs = theta * x[lo:hi]  # a shard that depends on a (replicated) parameter
        xs.retain_grad()
        ys = y[lo:hi].clone().requires_grad_()
        xg, yg = T.gather_with_grad(xs), T.gather_with_grad(ys)
        fd, mmd, kid = _global_terms(xg, yg)
        loss = fd + mmd  # = _global_loss
        terms = torch.cat([torch.stack([fd.detach(), mmd.detach()]), kid])
        loss.backward()
        theta_grad = theta.grad.clone()
        dist.all_reduce(theta_grad)  # DDP: average the parameter gradients over the ranks
        theta_grad /= WORLD
        errors = []  # ranks that cannot merge: a ValueError on every rank (once an abort, or a hang)
        for bad in (
            T.GaussianMoments().update(x[lo:hi, : 3 - rank]),
            T.GaussianMoments(dim=D if rank else None),
        ):
            try:
                bad.all_reduce()
                errors.append(None)
            except ValueError as err:
                errors.append(str(err))
        torch.save(
            {
                "n": g.n, "mean": g.mean, "cov": g.cov, "gathered": xg.detach(), "loss": loss.detach(), "terms": terms,
                "grad_x": xs.grad, "grad_y": ys.grad, "theta_grad": theta_grad, "errors": errors,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_two_ranks():
    """A real 2-process gloo job on 127.0.0.1 (MET.1, MET.6):

    * ``GaussianMoments.all_reduce`` = one process on the concatenated data (1e-12), bitwise
      the same on both ranks;
    * ``gather_with_grad`` returns the concatenated batch; every rank's loss (FD + mmd2 of
      the gathered batch) and each of ``frechet_distance``, ``mmd2`` and full-set ``kid`` =
      one process's on the concatenated data;
    * each shard's gradient = W x the single-process gradient of its rows (the sum over the
      ranks' identical losses), and the DDP-averaged parameter gradient = the single-process one.
    """
    x, y = _global_data()
    res = run_workers(_worker, WORLD)

    one = T.GaussianMoments().update(x)
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    xt = theta * x
    xt.retain_grad()
    yv = y.clone().requires_grad_()
    expected = _global_terms(1.3 * x, y)  # one process, the concatenated shards
    expected_terms = torch.cat([torch.stack([t.detach() for t in expected[:2]]), expected[2]])
    loss = _global_loss(xt, yv)
    loss.backward()
    loss = loss.detach()
    for r, got in enumerate(res):
        assert got["n"] == one.n
        assert rel_err(got["mean"], one.mean) < REL and rel_err(got["cov"], one.cov) < REL
        assert torch.equal(got["mean"], res[0]["mean"]) and torch.equal(got["cov"], res[0]["cov"])
        assert torch.equal(got["gathered"], xt.detach())
        assert abs(float(got["loss"]) - float(loss)) <= 1e-12 * abs(float(loss))
        assert torch.allclose(got["terms"], expected_terms, rtol=1e-12, atol=0)  # FD, mmd2, kid value and std
        lo, hi = sum(N_PER_RANK[:r]), sum(N_PER_RANK[: r + 1])
        assert rel_err(got["grad_x"], WORLD * xt.grad[lo:hi]) < 1e-10
        assert rel_err(got["grad_x"], RM.gathered_gradient([xt.grad.numpy()] * WORLD, N_PER_RANK, r)) < 1e-10
        assert rel_err(got["grad_y"], WORLD * yv.grad[lo:hi]) < 1e-10
        assert abs(float(got["theta_grad"]) - float(theta.grad)) <= 1e-10 * abs(float(theta.grad))
        dims, nodim = got["errors"]
        assert dims is not None and "the ranks' dims differ ([3, 2], in rank order)" in dims
        assert nodim is not None and "rank(s) [0] of the group have no data and no dim" in nodim


def test_frechet_and_sliced_wasserstein_refuse_second_derivatives():
    """Both are once differentiable (MET.5, MET.16): a gradient penalty's pattern (first-order
    gradients with create_graph=True, then their derivative) raises 'double backward', never
    returns the Hessian-vector product without the metric's curvature (it returned 2 d for
    SW + |z|^2, off by up to 0.5 from finite differences for FID)."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(30, 5, dtype=torch.float64, generator=gen)
    for value in (lambda: gt.frechet_distance(a, y), lambda: gt.sliced_wasserstein(a, y) + (a * a).sum()):
        (g,) = torch.autograd.grad(value(), a, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g * torch.randn(g.shape, dtype=g.dtype, generator=gen)).sum(), a)
    # first order with create_graph=True is still the plain gradient
    (g1,) = torch.autograd.grad(gt.frechet_distance(a, y), a, create_graph=True)
    (g0,) = torch.autograd.grad(gt.frechet_distance(a, y), a)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)


@pytest.mark.parametrize("layer", ["reference", "torch"])
def test_moments_mean_is_a_copy(layer):
    """GaussianMoments.mean hands out a copy: subtracting in place from it (mu -= other.mean)
    once changed the accumulated state, and FID came out 17.7 instead of 4.0 (a shift by 1 in d = 4)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 4))
    if layer == "torch":
        torch = pytest.importorskip("torch")
        gt = pytest.importorskip("genloss.torch")
        a, b = (
            gt.GaussianMoments().update(torch.tensor(x)),
            gt.GaussianMoments().update(torch.tensor(x + 1.0)),
        )
        fd = gt.frechet_distance
    else:
        a, b = RM.GaussianMoments().update(x), RM.GaussianMoments().update(x + 1.0)
        fd = RM.frechet_distance
    mu = a.mean
    mu -= b.mean
    assert float(fd(a, b)) == pytest.approx(4.0, rel=1e-9)  # same covariance, means 1 apart in 4 dims


def test_frechet_moments_form_refuses_d0_and_complex_covariances():
    """d = 0 moments: a ValueError naming mu1 in both layers (an IndexError before); a complex or
    bool covariance: the torch layer refuses it as the reference does (it dropped the imaginary
    part silently)."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    z = np.zeros((0,)), np.zeros((0, 0))
    with pytest.raises(
        ValueError, match=r"^frechet_distance: mu1 must have shape \(d,\) and cov1 \(d, d\), d >= 1"
    ):
        RM.frechet_distance(z[0], z[1], z[0], z[1])
    zt = [torch.tensor(a) for a in (*z, *z)]
    with pytest.raises(
        ValueError, match=r"^frechet_distance: mu1 must have shape \(d,\) and cov1 \(d, d\), d >= 1"
    ):
        gt.frechet_distance(*zt)
    mu, eye = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    for bad in (eye.to(torch.complex128), eye.bool()):
        with pytest.raises(TypeError, match="^frechet_distance: cov1 must be a real tensor"):
            gt.frechet_distance(mu, bad, mu, eye)


def test_frechet_of_features_beyond_the_square_range():
    """(MET.2) features past 2^450 are divided by a power of two s and the value multiplied by s^2,
    exact: at 2^500 the distance is 2^1000 times the distance of the unscaled features (both layers,
    and the torch gradient 2^500 times), where the scatter's squares overflowed before; at 1e200 the
    distance is beyond float64, inf as any overflow (the reference returned NaN, torch raised LAPACK's
    LinAlgError)."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((40, 5)), rng.standard_normal((30, 5)) + 0.3
    base = float(RM.frechet_distance(x, y))
    big = 2.0**500
    np.testing.assert_allclose(float(RM.frechet_distance(x * big, y * big)), base * 2.0**1000, rtol=1e-12)
    with np.errstate(all="raise"):  # no overflow on the way, no NaN
        assert float(RM.frechet_distance(x * 1e200, y * 1e200)) == np.inf
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    xt = torch.tensor(x, requires_grad=True)
    gt.frechet_distance(xt, torch.tensor(y)).backward()
    g_base = xt.grad.clone()
    xt = torch.tensor(x * big, requires_grad=True)
    value = gt.frechet_distance(xt, torch.tensor(y * big))
    value.backward()
    np.testing.assert_allclose(float(value.detach()), base * 2.0**1000, rtol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), g_base.numpy() * big, rtol=1e-10, atol=1e-12 * big)
    assert float(gt.frechet_distance(torch.tensor(x * 1e200), torch.tensor(y * 1e200))) == np.inf


@pytest.mark.parametrize("name", ["frechet_distance", "sliced_wasserstein", "cmmd"])
def test_feature_metrics_under_torch_func(name):
    """torch.func.grad and vmap(grad) of the differentiable feature metrics equal autograd's gradient
    per call, and vmap their values: frechet_distance and sliced_wasserstein raised "must override
    the setup_context staticmethod" (their autograd.Functions had the old form), and vmap read a
    value back (the feature scale)."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    rng = np.random.default_rng(6)
    y = torch.from_numpy(rng.standard_normal((15, 3)))
    xs = torch.from_numpy(rng.standard_normal((3, 20, 3)))
    xs[1, :2] = xs[1, :2] * 3.0 + 1.0  # three different calls

    def f(a):
        return getattr(gt, name)(a, y)

    want_v, want_g = [], []
    for a in xs:
        a = a.clone().requires_grad_(True)
        v = f(a)
        v.backward()
        want_v.append(float(v.detach()))
        want_g.append(a.grad)
    np.testing.assert_allclose(torch.func.grad(f)(xs[0]).numpy(), want_g[0].numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(torch.func.vmap(f)(xs).numpy(), want_v, rtol=1e-10, atol=1e-13)
    per_call = torch.func.vmap(torch.func.grad(f))(xs)
    np.testing.assert_allclose(per_call.numpy(), torch.stack(want_g).numpy(), rtol=1e-10, atol=1e-13)
    # forward mode: the tangent is the gradient's inner product with the direction (it raised)
    direction = torch.from_numpy(rng.standard_normal((20, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.func.jvp's own jit.script use
        _, tangent = torch.func.jvp(f, (xs[0],), (direction,))
    np.testing.assert_allclose(float(tangent), float((want_g[0] * direction).sum()), rtol=1e-10, atol=1e-13)


def test_torch_cmmd_promotes_mixed_float_features():
    """cmmd of float32 features beside float64 ones is computed in float64 (it refused them, while
    frechet_distance, prdc, sliced_wasserstein and kid take them): the value equals the all-float64
    call on the same numbers, and the float32 input's gradient comes back in float32."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((12, 4))).float().requires_grad_(True)
    y = torch.from_numpy(rng.standard_normal((10, 4)) + 0.2)
    value = gt.cmmd(x, y)
    value.backward()
    x64 = x.detach().double().requires_grad_(True)
    want = gt.cmmd(x64, y)
    want.backward()
    np.testing.assert_allclose(float(value.detach()), float(want.detach()), rtol=1e-13)
    assert x.grad.dtype == torch.float32
    np.testing.assert_allclose(x.grad.numpy(), x64.grad.float().numpy(), rtol=1e-6, atol=1e-9)
