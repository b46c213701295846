r"""Identities of the divergence family, checked numerically against the NumPy reference.

Every assertion compares ``genloss.reference.divergence`` with a value computed here
independently of it: a definition written out with plain NumPy or Python loops, a
closed form, a brute-force search, central finite differences, or a Monte-Carlo
average with its standard error.  The equations are derived in
``derivations/divergence.md`` (tags ``DIV.n``).

Discrete distributions are batches with repeated atoms, as in
``tests/test_gan_identities.py``: with counts ``n_k`` and ``p_k = n_k / N``, a batch
mean over ``np.repeat(v, n)`` is the expectation under ``p``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fd import check_fd
from fd import weights as fd_weights
from genloss.reference import divergence as R
from genloss.reference import gan as G

LOG2 = math.log(2.0)
KERNELS = ("rbf", "imq", "polynomial", "energy")
ESTIMATORS = ("unbiased", "biased", "linear")
DIVERGENCES = ("kl", "reverse_kl", "pearson", "squared_hellinger", "jensen_shannon", "gan", "total_variation")
BW = {"rbf": (0.7, 2.0), "imq": (0.5, 1.5), "polynomial": None, "energy": None}
K = 7  # atoms per discrete distribution

# Tolerances, float64.  Identities between sums of O(1) terms: 1e-12.  MMD values are
# differences of kernel means of up to 65^2 terms of size up to ~1e2 (polynomial): the
# absolute rounding is below 1e-12; 1e-10 leaves a margin and still sees an error of the
# size of one diagonal term, 1/65^2 ~ 2e-4.
TIGHT = dict(rtol=1e-12, atol=1e-12)
MMD_TOL = dict(rtol=1e-10, atol=1e-10)


def _g(a):
    return float(np.asarray(a))


# ----------------------------------------------------------------------------- independent helpers


def _kernel_matrix(kernel, a, b, bw):
    """All-pairs kernel matrix from np.linalg.norm of the differences (or the Gram matrix)."""
    if kernel == "polynomial":
        return (a @ b.T / a.shape[1] + 1.0) ** 3
    r = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    if kernel == "rbf":
        return sum(np.exp(-(r**2) / (2.0 * s**2)) for s in bw)
    if kernel == "imq":
        return sum(1.0 / np.sqrt(1.0 + r**2 / s**2) for s in bw)
    return -r


def _kernel_scalar(kernel, u, v, bw):
    """One kernel value with Python floats and math only."""
    if kernel == "polynomial":
        return (sum(a * b for a, b in zip(u, v, strict=True)) / len(u) + 1.0) ** 3
    r = math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True)))
    if kernel == "rbf":
        return sum(math.exp(-r * r / (2 * s * s)) for s in bw)
    if kernel == "imq":
        return sum((1 + r * r / (s * s)) ** -0.5 for s in bw)
    return -r


def _dense_mmd2(kernel, x, y, bw, estimator):
    n, m = len(x), len(y)
    kxx, kyy, kxy = (_kernel_matrix(kernel, a, b, bw) for a, b in ((x, x), (y, y), (x, y)))
    if estimator == "biased":
        return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    if estimator == "unbiased":
        return (
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2.0 * kxy.mean()
        )
    h = [kxx[i, i + 1] + kyy[i, i + 1] - kxy[i, i + 1] - kxy[i + 1, i] for i in range(0, n - 1, 2)]
    return float(np.mean(h))


def _loop_mmd2(kernel, x, y, bw, estimator):
    """The estimators as explicit double loops (small N, M only)."""
    x, y = x.tolist(), y.tolist()
    n, m = len(x), len(y)

    def k(u, v):
        return _kernel_scalar(kernel, u, v, bw)

    if estimator == "linear":
        half = n // 2
        total = 0.0
        for i in range(half):
            a, b, c, d = x[2 * i], x[2 * i + 1], y[2 * i], y[2 * i + 1]
            total += k(a, b) + k(c, d) - k(a, d) - k(b, c)
        return total / half
    skip = estimator == "unbiased"
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not (skip and i == j))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not (skip and i == j))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    nxx, nyy = (n * (n - 1), m * (m - 1)) if skip else (n * n, m * m)
    return sxx / nxx + syy / nyy - 2.0 * sxy / (n * m)


def _estimators_for(n, m):
    out = ["biased"]
    if n >= 2 and m >= 2:
        out.append("unbiased")
    if n == m >= 2:
        out.append("linear")
    return out


def _discrete(rng, k=K):
    n = rng.integers(1, 30, size=k)
    m = rng.integers(1, 30, size=k)
    return n, m, n / n.sum(), m / m.sum()


def _kl(a, b):
    return float(np.sum(a * np.log(a / b)))


def _jsd(p, q):
    mix = 0.5 * (p + q)
    return 0.5 * _kl(p, mix) + 0.5 * _kl(q, mix)


# f(u) of each divergence, from derivations/gan.md (GAN.18), and the optimal critic output v*.
_F = {
    "kl": lambda u: u * np.log(u),
    "reverse_kl": lambda u: -np.log(u),
    "pearson": lambda u: (u - 1.0) ** 2,
    "squared_hellinger": lambda u: (np.sqrt(u) - 1.0) ** 2,
    "jensen_shannon": lambda u: u * np.log(u) - (u + 1.0) * np.log((u + 1.0) / 2.0),
    "gan": lambda u: u * np.log(u) - (u + 1.0) * np.log(u + 1.0),
    "total_variation": lambda u: 0.5 * np.abs(u - 1.0),
}
_VSTAR = {  # g_f(v*) = T* = f'(p/q)
    "kl": lambda r: 1.0 + np.log(r),
    "reverse_kl": np.log,
    "pearson": lambda r: 2.0 * (r - 1.0),
    "squared_hellinger": lambda r: 0.5 * np.log(r),
    "jensen_shannon": np.log,
    "gan": np.log,
    "total_variation": lambda r: 40.0 * np.sign(r - 1.0),  # tanh(40) = 1 in float64
}


def _bound(div, v, p, q):
    """E_p g_f(v) - E_q f*(g_f(v)) on discrete p, q, with the f-GAN pieces of gan.F_DIVERGENCES."""
    d = G.F_DIVERGENCES[div]
    return float(np.sum(p * d.activation(v)) - np.sum(q * d.conjugate(v)))


# ============================================================================= DIV.6 / DIV.7 values


PAIRS = [(1, 1), (1, 3), (2, 2), (2, 3), (3, 7), (7, 3), (7, 7), (64, 65), (65, 64), (64, 64), (65, 65)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("n", "m"), PAIRS, ids=[f"{n}x{m}" for n, m in PAIRS])
def test_mmd2_matches_dense_formula(kernel, n, m):
    """(DIV.6), (DIV.7) Every estimator = the dense formula (and, for small N, M, explicit loops)."""
    rng = np.random.default_rng(n * 100 + m)
    d = 3
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) + 0.3
    for estimator in _estimators_for(n, m):
        got = _g(R.mmd2(x, y, kernel, BW[kernel], estimator))
        np.testing.assert_allclose(got, _dense_mmd2(kernel, x, y, BW[kernel], estimator), **MMD_TOL)
        if n <= 7 and m <= 7:
            np.testing.assert_allclose(got, _loop_mmd2(kernel, x, y, BW[kernel], estimator), **MMD_TOL)
    if n < 2:
        with pytest.raises(ValueError, match="x must have at least 2 samples"):
            R.mmd2(x, y, kernel, BW[kernel], "unbiased")
    if n != m:
        with pytest.raises(ValueError, match="y must have as many samples as x"):
            R.mmd2(x, y, kernel, BW[kernel], "linear")


def test_median_heuristic_is_the_default_bandwidth():
    """(DIV.12) bandwidths=None is (median_bandwidth(x, y),), held constant in the backward."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(9, 2)) * 2
    s = R.median_bandwidth(x, y)
    for kernel in ("rbf", "imq"):
        for estimator in ("unbiased", "biased"):
            assert _g(R.mmd2(x, y, kernel, None, estimator)) == _g(R.mmd2(x, y, kernel, (s,), estimator))
            a = R.mmd2_backward(x, y, 1.3, kernel, None, estimator)
            b = R.mmd2_backward(x, y, 1.3, kernel, [s], estimator)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_mmd2_blocked_equals_unblocked(monkeypatch):
    """(DIV.11) Row blocks of any size give the same value and gradients (up to summation order)."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(6, 4))
    full = {k: (R.mmd2(x, y, k, BW[k]), R.mmd2_backward(x, y, 1.0, k, BW[k])) for k in KERNELS}
    monkeypatch.setattr(R, "_BLOCK_ELEMENTS", 5)  # one row per block
    for k, (value, (gx, gy)) in full.items():
        np.testing.assert_allclose(_g(R.mmd2(x, y, k, BW[k])), _g(value), **TIGHT)
        bx, by = R.mmd2_backward(x, y, 1.0, k, BW[k])
        np.testing.assert_allclose(bx, gx, **TIGHT)
        np.testing.assert_allclose(by, gy, **TIGHT)


# ============================================================================= DIV.8 / DIV.9 gradients


FD_SHAPES = {
    "unbiased": [(2, 3, 1), (4, 5, 3)],
    "biased": [(1, 2, 2), (4, 5, 3)],
    "linear": [(2, 2, 1), (5, 5, 3)],
}
FD_CASES = [(k, e, s) for k in KERNELS for e in ESTIMATORS for s in FD_SHAPES[e]]


@pytest.mark.parametrize(
    ("kernel", "estimator", "shape"), FD_CASES, ids=[f"{k}-{e}-{s}" for k, e, s in FD_CASES]
)
def test_mmd2_backward_fd(kernel, estimator, shape):
    """(DIV.8), (DIV.9) mmd2_backward = central finite differences of mmd2, w.r.t. x and y."""
    n, m, d = shape
    rng = np.random.default_rng(n + 10 * m + 100 * d)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) * 1.5 + 0.5
    bw = BW[kernel]
    go = float(fd_weights(rng, ()))
    check_fd(
        f"mmd2[{kernel}, {estimator}]",
        lambda a, b: R.mmd2(a, b, kernel, bw, estimator),
        lambda a, b, g: R.mmd2_backward(a, b, g, kernel, bw, estimator),
        [x, y],
        go,
        (0, 1),
    )
    if estimator == "linear" and n % 2:  # the unused last row gets no gradient
        gx, gy = R.mmd2_backward(x, y, go, kernel, bw, estimator)
        assert np.all(gx[-1] == 0.0) and np.all(gy[-1] == 0.0)


@given(
    kernel=st.sampled_from(KERNELS),
    estimator=st.sampled_from(ESTIMATORS),
    n=st.integers(2, 6),
    m=st.integers(2, 6),
    d=st.integers(1, 4),
    scale=st.floats(0.2, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_mmd2_backward_fd_hypothesis(kernel, estimator, n, m, d, scale, seed):
    """(DIV.8), (DIV.9) As test_mmd2_backward_fd, with hypothesis drawing sizes, scale and kernel."""
    if estimator == "linear":
        m = n
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)) * scale, rng.normal(size=(m, d)) * scale + 0.3
    bw = BW[kernel]
    check_fd(
        f"mmd2[{kernel}, {estimator}, {n}x{m}x{d}]",
        lambda a, b: R.mmd2(a, b, kernel, bw, estimator),
        lambda a, b, g: R.mmd2_backward(a, b, g, kernel, bw, estimator),
        [x, y],
        float(fd_weights(rng, ())),
        (0, 1),
    )


def test_energy_gradient_at_coincident_points():
    """(DIV.8) -|a - b| has no derivative at a = b: that pair contributes 0, the rest as usual."""
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    y = np.array([[0.0, 0.0], [0.0, 2.0]])  # y_0 = x_0
    gx, gy = R.mmd2_backward(x, y, 1.0, "energy", None, "biased")
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))

    def unit(v):
        return v / np.linalg.norm(v)

    # d/dx_0 of biased MMD^2 = 1/N^2 * 2 sum_j -u(x_0 - x_j) + 2/(NM) sum_j u(x_0 - y_j), pairs at 0 skipped.
    expect_x0 = 2.0 / 4 * -unit(x[0] - x[1]) + 2.0 / 4 * unit(x[0] - y[1])
    np.testing.assert_allclose(gx[0], expect_x0, **TIGHT)
    expect_y0 = 2.0 / 4 * -unit(y[0] - y[1]) + 2.0 / 4 * unit(y[0] - x[1])
    np.testing.assert_allclose(gy[0], expect_y0, **TIGHT)


# ============================================================================= DIV.7 / DIV.10 statistics


@pytest.mark.parametrize("kernel", KERNELS)
def test_unbiased_mmd2_has_expectation_zero(kernel):
    """(DIV.7) One distribution: E[unbiased] = E[linear] = 0 (within 3 standard errors), E[biased] > 0.
    Two distributions: all three estimates average well above 0."""
    runs, n, d = 300, 12, 2
    bw = (1.0,) if kernel in ("rbf", "imq") else None
    same = {e: [] for e in ESTIMATORS}
    diff = {e: [] for e in ESTIMATORS}
    for seed in range(runs):
        rng = np.random.default_rng(10_000 + seed)
        x, y, z = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=(n, d))
        z[:, 0] += 1.0  # shifted: a different distribution
        for e in ESTIMATORS:
            same[e].append(_g(R.mmd2(x, y, kernel, bw, e)))
            diff[e].append(_g(R.mmd2(x, z, kernel, bw, e)))
    for e in ESTIMATORS:
        a, b = np.array(same[e]), np.array(diff[e])
        se_a, se_b = a.std(ddof=1) / math.sqrt(runs), b.std(ddof=1) / math.sqrt(runs)
        if e == "biased":
            assert a.mean() > 3 * se_a, (e, a.mean(), se_a)  # biased upwards by the diagonal
        else:
            assert abs(a.mean()) < 3 * se_a, (e, a.mean(), se_a)
        assert b.mean() > 3 * se_b and b.mean() > a.mean(), (e, b.mean(), se_b)


@pytest.mark.parametrize("kernel", KERNELS)
def test_biased_is_unbiased_plus_diagonal_correction(kernel):
    """(DIV.10) biased = unbiased + (mean_i k(x_i,x_i) - U_xx)/N + (mean_j k(y_j,y_j) - U_yy)/M."""
    rng = np.random.default_rng(21)
    n, m = 7, 10
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 3)) * 1.5
    bw = BW[kernel]
    kxx, kyy = _kernel_matrix(kernel, x, x, bw), _kernel_matrix(kernel, y, y, bw)
    uxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    uyy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    unbiased, biased = _g(R.mmd2(x, y, kernel, bw, "unbiased")), _g(R.mmd2(x, y, kernel, bw, "biased"))
    correction = (np.trace(kxx) / n - uxx) / n + (np.trace(kyy) / m - uyy) / m
    np.testing.assert_allclose(biased, unbiased + correction, **MMD_TOL)
    if kernel in ("rbf", "imq"):  # k(a, a) = number of bandwidths = max k: the correction is >= 0
        np.testing.assert_array_equal(np.diag(kxx), len(bw))
        assert biased >= unbiased
    if kernel == "energy":  # k(a, a) = 0 <= k: the correction is >= 0 as well
        assert biased >= unbiased


def test_mmd_is_the_rkhs_ipm():
    """(DIV.5) sqrt(biased MMD^2) = sup over the RKHS unit ball of E_p f - E_q f: the witness
    f = (mu_p - mu_q)/||.|| attains it; random functions sum_k a_k k(z_k, .) of norm 1 stay below."""
    rng = np.random.default_rng(31)
    bw = (1.0,)
    x, y = rng.normal(size=(8, 2)), rng.normal(size=(6, 2)) + [1.0, 0.0]
    mmd = math.sqrt(_g(R.mmd2(x, y, "rbf", bw, "biased")))

    def gap_over_norm(z, a):  # (E_p f - E_q f) / ||f||_H for f = sum_k a_k k(z_k, .)
        mean_gap = a @ (_kernel_matrix("rbf", z, x, bw).mean(1) - _kernel_matrix("rbf", z, y, bw).mean(1))
        return mean_gap / math.sqrt(a @ _kernel_matrix("rbf", z, z, bw) @ a)

    witness = np.concatenate([np.full(8, 1 / 8), np.full(6, -1 / 6)])
    np.testing.assert_allclose(gap_over_norm(np.concatenate([x, y]), witness), mmd, **TIGHT)
    for _ in range(200):
        z = rng.normal(size=(5, 2)) * 2
        assert abs(gap_over_norm(z, rng.normal(size=5))) <= mmd * (1 + 1e-12)


# ============================================================================= DIV.12 / DIV.13 / DIV.14


def test_median_bandwidth_brute_force():
    """(DIV.12) The median of |z_i - z_j| over i < j, by loops; strided subsample above max_points."""
    rng = np.random.default_rng(41)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(25, 2)) + 1.0

    def brute(z):
        d = [
            math.sqrt(sum((a - b) ** 2 for a, b in zip(z[i], z[j], strict=True)))
            for i in range(len(z))
            for j in range(i + 1, len(z))
        ]
        return float(np.median(d))

    z = np.concatenate([x, y]).tolist()
    np.testing.assert_allclose(R.median_bandwidth(x, y), brute(z), **TIGHT)
    assert isinstance(R.median_bandwidth(x, y), float)
    # 55 points, max_points=20: stride ceil(55/20) = 3, points 0, 3, ..., 54 (19 of them, an odd
    # number of pairs: 171).
    np.testing.assert_allclose(R.median_bandwidth(x, y, max_points=20), brute(z[::3]), **TIGHT)
    # 4 points, 6 pairs: the mean of the two middle distances.
    pts = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert R.median_bandwidth(pts[:2], pts[2:]) == 3.5  # distances 1 2 3 4 6 7
    # One empty sample is allowed: the pool is what counts.
    assert R.median_bandwidth(pts, np.zeros((0, 1))) == 3.5


def test_median_bandwidth_refuses_degenerate_data():
    """(DIV.12) A zero median or fewer than 2 points is a ValueError naming the data."""
    same = np.ones((4, 2))
    with pytest.raises(ValueError, match="x, y: the median pairwise distance of the pooled data is 0"):
        R.median_bandwidth(same, same[:2])
    with pytest.raises(ValueError, match="x, y: the median heuristic needs at least 2"):
        R.median_bandwidth(np.zeros((1, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="x, y: the median pairwise distance of the pooled data is 0"):
        R.mmd2(same, same, "rbf")  # the default bandwidth surfaces the same error


def test_kid_matches_dense_subsets():
    """(DIV.13) kid = mean and std (ddof 0) of the unbiased cubic-kernel MMD^2 on the subsets that
    default_rng(seed) draws (real first, then fake, per subset), written as torch-fidelity does."""
    rng = np.random.default_rng(51)
    real, fake = rng.normal(size=(40, 5)), rng.normal(size=(37, 5)) * 1.2
    subsets, size, seed = 7, 10, 3
    draw = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        xr = real[draw.choice(40, size, replace=False)]
        xf = fake[draw.choice(37, size, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / 5 + 1) ** 3 for a, b in ((xr, xr), (xf, xf), (xr, xf)))
        m = size
        values.append(
            (kxx.sum() - np.diag(kxx).sum()) / (m * (m - 1))
            + (kyy.sum() - np.diag(kyy).sum()) / (m * (m - 1))
            - 2 * kxy.sum() / m**2
        )
    mean, std = R.kid(real, fake, subsets=subsets, subset_size=size, seed=seed)
    np.testing.assert_allclose(_g(mean), np.mean(values), **MMD_TOL)
    np.testing.assert_allclose(
        _g(std), math.sqrt(np.mean((np.array(values) - np.mean(values)) ** 2)), **MMD_TOL
    )
    again = R.kid(real, fake, subsets=subsets, subset_size=size, seed=seed)
    assert _g(again[0]) == _g(mean) and _g(again[1]) == _g(std)
    assert _g(R.kid(real, fake, subsets=subsets, subset_size=size, seed=seed + 1)[0]) != _g(mean)
    # One subset holding every sample: KID is the full unbiased polynomial MMD^2, std 0.
    one, spread = R.kid(real[:20], fake[:20], subsets=1, subset_size=20)
    np.testing.assert_allclose(
        _g(one), _dense_mmd2("polynomial", real[:20], fake[:20], None, "unbiased"), **MMD_TOL
    )
    assert _g(spread) == 0.0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_energy_kernel_is_energy_distance(estimator):
    """(DIV.14) With k = -|a - b|, MMD^2 is the energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'|,
    each expectation estimated with the estimator's own normalisation."""
    rng = np.random.default_rng(61)
    n = 8
    m = n if estimator == "linear" else 11
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 3)) + 0.5
    got = _g(R.mmd2(x, y, "energy", None, estimator))
    dxx = np.linalg.norm(x[:, None] - x[None], axis=-1)
    dyy = np.linalg.norm(y[:, None] - y[None], axis=-1)
    dxy = np.linalg.norm(x[:, None] - y[None], axis=-1)
    if estimator == "linear":
        i = np.arange(0, n - 1, 2)
        e_xy = (dxy[i, i + 1] + dxy[i + 1, i]).mean() / 2
        expect = 2 * e_xy - dxx[i, i + 1].mean() - dyy[i, i + 1].mean()
    elif estimator == "unbiased":
        expect = 2 * dxy.mean() - dxx.sum() / (n * (n - 1)) - dyy.sum() / (m * (m - 1))
    else:
        expect = 2 * dxy.mean() - dxx.mean() - dyy.mean()
    np.testing.assert_allclose(got, expect, **MMD_TOL)
    # Known answer: point masses at 0 and at d in 1-D: 2d (biased; the within terms vanish).
    d = 2.5
    np.testing.assert_allclose(
        _g(R.mmd2(np.zeros((3, 1)), np.full((4, 1), d), "energy", None, "biased")), 2 * d
    )


# ============================================================================= DIV.1 density ratio


@pytest.mark.parametrize("seed", range(3))
def test_density_ratio_of_optimal_discriminator(seed):
    """(DIV.1) The discriminator that maximises V (found by Newton steps on gan_d_loss_backward)
    has D/(1-D) = p/q, which density_ratio_from_logits reads off its logits."""
    rng = np.random.default_rng(70 + seed)
    n, m, p, q = _discrete(rng)
    idx_n, idx_m = np.repeat(np.arange(K), n), np.repeat(np.arange(K), m)
    l = np.zeros(K)
    for _ in range(60):
        gr, gf = G.gan_d_loss_backward(np.repeat(l, n), np.repeat(l, m), grad_output=1.0)
        grad = np.bincount(idx_n, gr, K) + np.bincount(idx_m, gf, K)  # q s(l) - p s(-l)
        s = 1 / (1 + np.exp(-l))
        l -= grad / ((p + q) * s * (1 - s))  # Newton: the curvature is (p + q) s (1 - s)
    ratio = R.density_ratio_from_logits(l)
    np.testing.assert_allclose(ratio, p / q, rtol=1e-10)
    s = 1 / (1 + np.exp(-l))
    np.testing.assert_allclose(ratio, s / (1 - s), rtol=1e-10)  # the quotient form, moderate logits


def test_density_ratio_backward_fd_and_extremes():
    """(DIV.1) d e^l / dl = e^l (finite differences); e^l is exact at the extremes, no NaN."""
    rng = np.random.default_rng(80)
    for shape in [(), (5,), (3, 4)]:
        l = rng.uniform(-5, 5, size=shape)
        check_fd(
            "density_ratio_from_logits",
            R.density_ratio_from_logits,
            R.density_ratio_from_logits_backward,
            [np.asarray(l)],
            fd_weights(rng, shape),
            (0,),
        )
    ext = np.array([-1e4, -40.0, 0.0, 40.0, 1e4])
    with np.errstate(invalid="raise", divide="raise"):
        r = R.density_ratio_from_logits(ext)
        (g,) = R.density_ratio_from_logits_backward(ext, np.ones(5))
    np.testing.assert_allclose(r, [0.0, math.exp(-40), 1.0, math.exp(40), np.inf], rtol=1e-15, atol=0)
    np.testing.assert_array_equal(g, r)


# ============================================================================= DIV.2 / DIV.3 f-divergences


@pytest.mark.parametrize("div", DIVERGENCES)
def test_f_divergence_against_definition(div):
    """(DIV.2) f_divergence = sum q f(p/q) with f from the GAN.18 table; JS is 2 JSD, gan 2 JSD - log 4."""
    rng = np.random.default_rng(90)
    for _ in range(5):
        _, _, p, q = _discrete(rng)
        np.testing.assert_allclose(_g(R.f_divergence(p, q, div)), np.sum(q * _F[div](p / q)), **TIGHT)
        if div == "jensen_shannon":
            np.testing.assert_allclose(_g(R.f_divergence(p, q, div)), 2 * _jsd(p, q), **TIGHT)
        if div == "gan":
            np.testing.assert_allclose(_g(R.f_divergence(p, q, div)), 2 * _jsd(p, q) - math.log(4), **TIGHT)
        if div != "gan":
            assert _g(R.f_divergence(p, p, div)) == 0.0  # f(1) = 0


ZERO_CASES = {
    # divergence: (value for p=(1/2,1/2,0), q=(1/4,1/4,1/2)), (value for p, q swapped)
    "kl": (LOG2, np.inf),
    "reverse_kl": (np.inf, LOG2),
    "pearson": (1.0, np.inf),  # sum (p-q)^2/q = 1/16*4*2 + 1/4*2 = 1
    "squared_hellinger": (2 - math.sqrt(2), 2 - math.sqrt(2)),
    "jensen_shannon": (None, None),  # checked against its definition below
    "gan": (None, None),
    "total_variation": (0.5, 0.5),
}


@pytest.mark.parametrize("div", DIVERGENCES)
def test_f_divergence_zeros(div):
    """(DIV.2) 0 log 0 = 0; p > 0 where q = 0 is inf exactly where lim f(u)/u is; the limits are exact."""
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    fwd, bwd = _g(R.f_divergence(p, q, div)), _g(R.f_divergence(q, p, div))
    expect = ZERO_CASES[div]
    if div == "jensen_shannon":
        mix = (p + q) / 2
        expect = (np.sum(p[:2] * np.log(p[:2] / mix[:2])) + np.sum(q * np.log(q / mix)),) * 2  # symmetric
    if div == "gan":
        expect = (np.sum(p[:2] * np.log(p[:2] / (p + q)[:2])) + np.sum(q * np.log(q / (p + q))),) * 2
    np.testing.assert_allclose([fwd, bwd], expect, **TIGHT)
    # Disjoint supports: kl, reverse_kl, pearson infinite; the bounded ones at their maximum.
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    top = {"squared_hellinger": 2.0, "jensen_shannon": 2 * LOG2, "gan": 0.0, "total_variation": 1.0}
    np.testing.assert_allclose(_g(R.f_divergence(a, b, div)), top.get(div, np.inf), **TIGHT)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("seed", range(3))
def test_variational_bound_tight_at_f_prime(div, seed):
    """(DIV.3) E_p T - E_q f*(T), with g_f and f* of gan.F_DIVERGENCES, equals f_divergence at
    T* = f'(p/q) and is strictly smaller for every perturbed T; -fgan_d_loss is the same bound."""
    rng = np.random.default_rng(100 + seed)
    n, m, p, q = _discrete(rng)
    exact = _g(R.f_divergence(p, q, div))
    vstar = _VSTAR[div](p / q)
    np.testing.assert_allclose(_bound(div, vstar, p, q), exact, **TIGHT)
    fgan = -_g(G.fgan_d_loss(np.repeat(vstar, n), np.repeat(vstar, m), div))
    np.testing.assert_allclose(fgan, exact, **TIGHT)
    for _ in range(20):
        if div == "total_variation":  # pull T = tanh(v)/2 inside (-1/2, 1/2)
            v = vstar * rng.uniform(0.0, 0.05, size=K)
        else:
            v = vstar + rng.normal(scale=0.3, size=K)
        assert _bound(div, v, p, q) < exact


# ============================================================================= DIV.4 scoring rules


@pytest.mark.parametrize("seed", range(3))
def test_brier_gap_is_pearson_to_mixture(seed):
    """(DIV.4) Brier-coded LSGAN (a=0, b=1): the best D improves on D = 1/2 by
    chi2(p || (p+q)/2)/4 = Delta(p, q)/8 -- a Pearson chi^2 to the MIXTURE, bounded by 1/4,
    not chi2(p || q)."""
    rng = np.random.default_rng(110 + seed)
    n, m, p, q = _discrete(rng)

    def brier(d):
        return _g(G.lsgan_d_loss(np.repeat(d, n), np.repeat(d, m), a=0.0, b=1.0))

    best = brier(p / (p + q))
    assert abs(brier(np.full(K, 0.5)) - 0.25) < 1e-15
    gap = 0.25 - best
    chi2_mix = _g(R.f_divergence(p, (p + q) / 2, "pearson"))
    np.testing.assert_allclose(gap, chi2_mix / 4, **TIGHT)
    np.testing.assert_allclose(gap, np.sum((p - q) ** 2 / (p + q)) / 8, **TIGHT)
    # Brute force: per-atom grid minimum of p (d-1)^2/2 + q d^2/2.
    grid = np.linspace(0, 1, 100001)
    per_atom = np.min(0.5 * p[:, None] * (grid - 1) ** 2 + 0.5 * q[:, None] * grid**2, axis=1)
    np.testing.assert_allclose(per_atom.sum(), best, rtol=0, atol=1e-10)
    # Not the Pearson chi^2 of p against q: on a pair where q nearly misses an atom of p, chi2(p||q)
    # is huge while the Brier gap stays below 1/4.
    p2, q2 = np.array([0.5, 0.5]), np.array([0.999, 0.001])
    d2 = p2 / (p2 + q2)
    gap2 = 0.25 - float(np.sum(0.5 * p2 * (d2 - 1) ** 2 + 0.5 * q2 * d2**2))
    assert _g(R.f_divergence(p2, q2, "pearson")) > 200 and 0 < gap2 < 0.25


@pytest.mark.parametrize("seed", range(3))
def test_least_squares_ratio_fit_is_pearson(seed):
    """(DIV.4) Least-squares fit of the density ratio, J(r) = E_q r^2/2 - E_p r, is minimised at
    r = p/q with J* = -(1 + chi2(p||q))/2; the pearson f-GAN bound is exactly -2 J(r) - 1 at
    T = 2(r - 1), for every r."""
    rng = np.random.default_rng(120 + seed)
    n, m, p, q = _discrete(rng)
    chi2 = _g(R.f_divergence(p, q, "pearson"))

    def J(r):
        return float(np.sum(q * r**2) / 2 - np.sum(p * r))

    np.testing.assert_allclose(J(p / q), -(1 + chi2) / 2, **TIGHT)
    for _ in range(20):
        r = p / q + rng.normal(scale=0.2, size=K)
        assert J(r) > J(p / q)
        fgan = -_g(G.fgan_d_loss(np.repeat(2 * (r - 1), n), np.repeat(2 * (r - 1), m), "pearson"))
        np.testing.assert_allclose(fgan, -2 * J(r) - 1, **TIGHT)


@pytest.mark.parametrize("seed", range(3))
def test_hinge_gap_is_total_variation(seed):
    """(DIV.4) Hinge loss: min over D is 2 - 2 TV(p, q) at D = sign(p - q); the best constant D gives 2.
    So the gap is 2 TV = 2 f_divergence(p, q, 'total_variation')."""
    rng = np.random.default_rng(130 + seed)
    n, m, p, q = _discrete(rng)

    def hinge(d):
        return _g(G.hinge_d_loss(np.repeat(d, n), np.repeat(d, m)))

    tv = _g(R.f_divergence(p, q, "total_variation"))
    np.testing.assert_allclose(hinge(np.sign(p - q)), 2 - 2 * tv, **TIGHT)
    assert abs(hinge(np.zeros(K)) - 2.0) < 1e-12
    grid = np.linspace(-3, 3, 6001)
    per_atom = np.min(p[:, None] * np.maximum(1 - grid, 0) + q[:, None] * np.maximum(1 + grid, 0), axis=1)
    np.testing.assert_allclose(per_atom.sum(), 2 - 2 * tv, **TIGHT)


# ============================================================================= DIV.15 disjoint supports


def test_disjoint_supports_jsd_flat_mmd_not():
    """(DIV.15) p uniform on 5 points, q the same points shifted by d >= 5: JSD = log 2 (and KL = inf)
    for every d, so its derivative in d is 0; MMD^2 grows with d and its gradient moves y towards x."""
    atoms = np.arange(5.0)
    grid = np.arange(60.0)
    shifts = [5, 8, 12, 20]
    mmd = {"rbf": [], "energy": []}
    for s in shifts:
        p = np.isin(grid, atoms) / 5.0
        q = np.isin(grid, atoms + s) / 5.0
        assert _g(R.f_divergence(p, q, "jensen_shannon")) / 2 == pytest.approx(LOG2, abs=1e-15)
        assert _g(R.f_divergence(p, q, "kl")) == np.inf
        x, y = atoms[:, None], (atoms + s)[:, None]
        for kernel, bw in (("rbf", (10.0,)), ("energy", None)):
            mmd[kernel].append(_g(R.mmd2(x, y, kernel, bw, "unbiased")))
            _, gy = R.mmd2_backward(x, y, 1.0, kernel, bw, "unbiased")
            assert gy.sum() > 1e-3  # d MMD^2 / d shift > 0: descent moves y back towards x
    for kernel, values in mmd.items():
        assert np.all(np.diff(values) > 0), (kernel, values)
    # The energy distance between the two 5-point sets grows exactly like 2 d (DIV.14) once disjoint.
    np.testing.assert_allclose(np.diff(mmd["energy"]), 2 * np.diff(shifts), **TIGHT)


# ============================================================================= bad input


def _xy(n=4, m=5, d=2):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d))


X, Y = _xy()
BAD = [
    (lambda: R.mmd2(X[0], Y), ValueError, "x must have 2 dimension"),
    (lambda: R.mmd2(X, Y[:, :1]), ValueError, "y must have the feature size of x"),
    (lambda: R.mmd2(X, np.zeros((0, 2))), ValueError, "y has no samples"),
    (lambda: R.mmd2(np.zeros((3, 0)), Y), ValueError, "x must have at least one feature"),
    (lambda: R.mmd2(X.astype(complex), Y), TypeError, "x must be a real numeric array"),
    (lambda: R.mmd2(X, Y, kernel="gauss"), ValueError, "kernel must be one of"),
    (lambda: R.mmd2(X, Y, estimator="mc"), ValueError, "estimator must be one of"),
    (lambda: R.mmd2(X, Y, bandwidths=(1.0, -1.0)), ValueError, r"bandwidths\[1\] must be > 0"),
    (lambda: R.mmd2(X, Y, bandwidths=(np.inf,)), ValueError, r"bandwidths\[0\] must be finite"),
    (lambda: R.mmd2(X, Y, bandwidths=()), ValueError, "bandwidths must not be empty"),
    (lambda: R.mmd2(X, Y, bandwidths=1.0), TypeError, "bandwidths must be a tuple or list"),
    (lambda: R.mmd2(X, Y, bandwidths=("a",)), TypeError, r"bandwidths\[0\] must be a real number"),
    (
        lambda: R.mmd2(X, Y, "polynomial", (1.0,)),
        ValueError,
        "bandwidths must be None for kernel='polynomial'",
    ),
    (lambda: R.mmd2(X, Y, "energy", [1.0]), ValueError, "bandwidths must be None for kernel='energy'"),
    (lambda: R.mmd2(X[:1], Y), ValueError, "x must have at least 2 samples"),
    (lambda: R.mmd2(X, Y[:1], estimator="unbiased"), ValueError, "y must have at least 2 samples"),
    (lambda: R.mmd2(X, Y, estimator="linear"), ValueError, "y must have as many samples as x"),
    (
        lambda: R.mmd2_backward(X, Y, np.ones(2), bandwidths=(1.0,)),
        ValueError,
        "grad_output must be a scalar",
    ),
    (lambda: R.median_bandwidth(X, Y, max_points=1), ValueError, "max_points must be >= 2"),
    (lambda: R.median_bandwidth(X, Y, max_points=0), ValueError, "max_points must be >= 2"),  # not ">= 1"
    (lambda: R.median_bandwidth(X, Y, max_points=2.0), TypeError, "max_points must be an int"),
    (lambda: R.kid(X, Y, subset_size=5), ValueError, "exceeds the 4 samples of real_features"),
    (lambda: R.kid(Y, X, subset_size=5), ValueError, "exceeds the 4 samples of fake_features"),
    (lambda: R.kid(X, Y, subset_size=1), ValueError, "subset_size must be >= 2"),
    (lambda: R.kid(X, Y, subset_size=0), ValueError, "subset_size must be >= 2"),
    (lambda: R.kid(X, Y, subsets=0, subset_size=2), ValueError, "subsets must be >= 1"),
    (lambda: R.kid(X, Y, subset_size=2, seed=-1), ValueError, "seed must be >= 0"),
    (lambda: R.kid(X, Y, subset_size=2, seed=1.5), TypeError, "seed must be an int"),
    (lambda: R.kid(X, Y[:, :1], subset_size=2), ValueError, "fake_features must have the feature size"),
    (lambda: R.density_ratio_from_logits("a"), TypeError, "logits must be a real numeric array"),
    (
        lambda: R.density_ratio_from_logits_backward(np.zeros(3), np.ones(2)),
        ValueError,
        "grad_output must have",
    ),
    (lambda: R.f_divergence([0.5, 0.5], [0.5, 0.5], "chi2"), ValueError, "divergence must be one of"),
    (lambda: R.f_divergence([0.5, 0.6], [0.5, 0.5], "kl"), ValueError, "p must sum to 1"),
    (lambda: R.f_divergence([0.5, 0.5], [1.5, -0.5], "kl"), ValueError, "q must be finite and >= 0"),
    (lambda: R.f_divergence([0.5, 0.5], [1.0], "kl"), ValueError, "q must have the shape of p"),
    (lambda: R.f_divergence([[1.0]], [[1.0]], "kl"), ValueError, "p must have 1 dimension"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_inputs_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
