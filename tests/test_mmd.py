"""MMD^2, median_bandwidth and KID: the tiled native kernel and the torch op against a
dense float64 oracle written here (the full N x M kernel matrices, the textbook
formulas of SPEC.md "Divergences and kernels"), finite differences, tile boundaries,
thread-count determinism, odd inputs and bad inputs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
_C = pytest.importorskip("genloss._C")

import genloss.native as gn  # noqa: E402
import genloss.reference as R  # noqa: E402
import genloss.torch as gt  # noqa: E402

KERNELS = ("rbf", "imq", "polynomial", "energy")
ESTIMATORS = ("unbiased", "biased", "linear")
TILE = int(_C.MMD_TILE)
DIRECT_MAX_D = 4  # D <= 4: direct body; larger D: the blocked GEMM-like body (mmd_cpu.cpp)

# Tolerances, relative to the scale S = max(1, mean |k|) of the kernel values.
# float64: the tiled sums reorder ~N^2 terms; 1e-11 S leaves room for N = 600.
F64_TOL = 1e-11
# float32: each pair is computed in float32 (inline exp2 <= 1 ulp, r2 rounding, in the
# blocked body |a|^2 + |b|^2 - 2 a.b on centred points), each tile row summed in float32
# (<= 256 terms) and everything above in float64: measured <= 3e-7 S at these sizes.
F32_TOL = 3e-6
# Gradients: the same, per entry, relative to max |grad| of the oracle.
F64_GRAD_TOL = 1e-10
F32_GRAD_TOL = 3e-5


# ---------------------------------------------------------------- the dense oracle
def _bandwidths(kernel, bandwidths):
    if kernel in ("polynomial", "energy"):
        return None
    return bandwidths


def dense_kw(a, b, kernel, bws):
    """(K, W): K[i, j] = k(a_i, b_j); dk/da_i = W[i, j] (a_i - b_j) (distance kernels) or W[i, j] b_j."""
    d = a.shape[1]
    if kernel == "polynomial":
        t = a @ b.T / d + 1.0
        return t**3, 3.0 * t**2 / d
    diff = a[:, None, :] - b[None, :, :]
    r2 = np.einsum("ijd,ijd->ij", diff, diff)
    if kernel == "energy":
        r = np.sqrt(r2)
        with np.errstate(divide="ignore"):
            w = np.where(r > 0, -1.0 / np.where(r > 0, r, 1.0), 0.0)
        return -r, w
    k = np.zeros_like(r2)
    w = np.zeros_like(r2)
    for s in bws:
        if kernel == "rbf":  # exp(-r2 / (2 s^2)); d/dr2 = -e / (2 s^2)
            e = np.exp(-r2 / (2 * s * s))
            k += e
            w += -e / (s * s)
        else:  # (1 + r2/s^2)^(-1/2); d/dr2 = -1/(2 s^2) (1 + r2/s^2)^(-3/2)
            u = 1.0 + r2 / (s * s)
            k += u**-0.5
            w += -(u**-1.5) / (s * s)
    return k, w


def _grad_rows(a, b, w, kernel):
    """sum_j dk(a_i, b_j)/da_i for every i."""
    if kernel == "polynomial":
        return w @ b
    return w.sum(axis=1)[:, None] * a - w @ b


def dense(x, y, kernel, bws, estimator):
    """(value, grad_x, grad_y) in float64 from the full kernel matrices."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, m = len(x), len(y)
    if estimator == "linear":
        h = n // 2
        xe, xo, ye, yo = x[0 : 2 * h : 2], x[1 : 2 * h : 2], y[0 : 2 * h : 2], y[1 : 2 * h : 2]
        gx, gy = np.zeros_like(x), np.zeros_like(y)
        total = 0.0
        for (p, q, gp, gq, ip, iq), sign in (
            ((xe, xo, gx, gx, 0, 1), 1.0),
            ((ye, yo, gy, gy, 0, 1), 1.0),
            ((xe, yo, gx, gy, 0, 1), -1.0),
            ((xo, ye, gx, gy, 1, 0), -1.0),
        ):
            for i in range(h):
                k, w = dense_kw(p[i : i + 1], q[i : i + 1], kernel, bws)
                total += sign * k[0, 0]
                da = w[0, 0] * (p[i] - q[i]) if kernel != "polynomial" else w[0, 0] * q[i]
                db = -w[0, 0] * (p[i] - q[i]) if kernel != "polynomial" else w[0, 0] * p[i]
                gp[2 * i + ip] += sign * da / h
                gq[2 * i + iq] += sign * db / h
        return total / h, gx, gy
    kxx, wxx = dense_kw(x, x, kernel, bws)
    kyy, wyy = dense_kw(y, y, kernel, bws)
    kxy, wxy = dense_kw(x, y, kernel, bws)
    if estimator == "unbiased":
        for mat in (kxx, wxx, kyy, wyy):
            np.fill_diagonal(mat, 0.0)
        a, b = 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1))
    else:
        a, b = 1.0 / n**2, 1.0 / m**2
    c = -2.0 / (n * m)
    value = a * kxx.sum() + b * kyy.sum() + c * kxy.sum()
    gx = 2 * a * _grad_rows(x, x, wxx, kernel) + c * _grad_rows(x, y, wxy, kernel)
    gy = 2 * b * _grad_rows(y, y, wyy, kernel) + c * _grad_rows(y, x, wxy.T, kernel)
    return value, gx, gy


def scale_of(x, y, kernel, bws):
    ks = [np.abs(dense_kw(a, b, kernel, bws)[0]).mean() for a, b in ((x, x), (y, y), (x, y))]
    return max(1.0, *ks)


def samples(rng, n, m, d, dtype=np.float64, shift=0.4):
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) * 1.1 + shift
    return x.astype(dtype), y.astype(dtype)


def check(x, y, kernel, estimator, bws, value, grads, tol, gtol):
    ref, rgx, rgy = dense(x, y, kernel, bws, estimator)
    s = scale_of(np.asarray(x, np.float64), np.asarray(y, np.float64), kernel, bws)
    assert abs(float(value) - ref) <= tol * s, (kernel, estimator, float(value), ref, s)
    for g, rg, name in zip(grads, (rgx, rgy), ("grad_x", "grad_y"), strict=True):
        g = np.asarray(g, np.float64)
        gs = max(np.abs(rg).max(), 1e-300)
        err = np.abs(g - rg).max() / gs
        assert err <= gtol, (name, kernel, estimator, err)


BWS = {"rbf": (0.8, 2.5), "imq": (1.3,), "polynomial": None, "energy": None}


# ---------------------------------------------------------------- every kernel x estimator
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("d", [3, 9])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_native_vs_dense(kernel, estimator, d, dtype):
    rng = np.random.default_rng(hash((kernel, estimator, d)) % 2**32)
    n, m = (40, 40) if estimator == "linear" else (37, 29)
    x, y = samples(rng, n, m, d, dtype)
    bws = BWS[kernel]
    v, (gx, gy) = gn.mmd2(x, y, kernel, bws, estimator)
    assert v.dtype == dtype and gx.dtype == dtype and gx.shape == x.shape and gy.shape == y.shape
    f64 = dtype == np.float64
    check(x, y, kernel, estimator, bws, v, (gx, gy), F64_TOL if f64 else F32_TOL,
          F64_GRAD_TOL if f64 else F32_GRAD_TOL)  # fmt: skip


@pytest.mark.parametrize("d", [3, 9])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_rbf_one_bandwidth_vs_dense(estimator, dtype, d):
    """rbf with one bandwidth has its own tile loop (exponent in base 2, the factor
    -2c of the weight applied once per flushed row/column sum): both bodies, with
    and without lane masks (N = TILE + 1, M = TILE - 1)."""
    rng = np.random.default_rng(d)
    x, y = samples(rng, TILE + 1, TILE - 1, d, dtype)
    for bws in ((0.9,), (math.sqrt(d),)):
        v, g = gn.mmd2(x, y, "rbf", bws, estimator)
        f64 = dtype == np.float64
        check(x, y, "rbf", estimator, bws, v, g, F64_TOL if f64 else F32_TOL,
              F64_GRAD_TOL if f64 else F32_GRAD_TOL)  # fmt: skip


def test_float32_exp2_polynomial_ulp():
    """The float32 exponential of the tile loops (exp2_neg in genloss/mmd.h, 2^t by a
    degree-6 polynomial) against float64 exp2, read back exactly: x = 0, y = (d1, d2)
    with d1 = 1/64, bandwidth s = sqrt(log2(e)/2) so that the base-2 coefficient c log2 e
    rounds to exactly 1 and t = -(d1^2 + d2^2) is exact; biased MMD of one point each
    has grad_x[0] = 4 c 2^t d1, a power-of-two multiple of 2^t computed in float64 and
    rounded once to float32 (d1 = 1 below t = -1, so that it stays a normal float). Documented: <= 0.93 ulp for the polynomial, so <= 1.5 ulp
    after that rounding (FMA builds; 2.5 without FMA); 0 below t = -126."""
    s = math.sqrt(math.log2(math.e) / 2.0)
    c = 1.0 / (2.0 * s * s)
    # t from 0 to beyond -126: fine steps near 0, coarse below; all exact in float32
    pairs = [(1.0 / 64.0, k / 1024.0) for k in range(0, 1024, 3)]
    pairs += [(1.0, k / 64.0) for k in range(0, 730, 2)]
    worst = 0.0
    for d1, d2 in pairs:
        t = -(d1 * d1 + d2 * d2)
        x = np.zeros((1, 2), np.float32)
        y = np.array([[d1, d2]], np.float32)
        _, (gx, _) = gn.mmd2(x, y, "rbf", (s,), "biased")
        got = float(gx[0, 0]) / (4.0 * c * -d1)  # d/dx k = -2c k (x - y): x - y = -d1
        want = 2.0**t
        if t < -126.0:
            assert got == 0.0, (t, got)
            continue
        ulp = float(np.spacing(np.float32(want)))
        worst = max(worst, abs(got - want) / ulp)
    isa = __import__("genloss").build_info()["isa"]
    assert worst <= (1.5 if isa in ("avx2", "avx512") else 2.5), worst


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_vs_dense(kernel, estimator):
    rng = np.random.default_rng(7)
    n, m = (24, 24) if estimator == "linear" else (21, 17)
    x, y = samples(rng, n, m, 5)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y, requires_grad=True)
    bws = BWS[kernel]
    v = gt.mmd2(xt, yt, kernel, list(bws) if bws else None, estimator)
    v.backward()
    check(x, y, kernel, estimator, bws, v.item(), (xt.grad.numpy(), yt.grad.numpy()), F64_TOL, F64_GRAD_TOL)
    # float32 through the op
    x32 = xt.detach().float().requires_grad_()
    y32 = yt.detach().float().requires_grad_()
    v32 = gt.mmd2(x32, y32, kernel, list(bws) if bws else None, estimator)
    v32.backward()
    assert v32.dtype == torch.float32 and x32.grad.dtype == torch.float32
    check(
        x, y, kernel, estimator, bws, v32.item(), (x32.grad.numpy(), y32.grad.numpy()), F32_TOL, F32_GRAD_TOL
    )


def test_default_bandwidth_is_the_median():
    rng = np.random.default_rng(3)
    x, y = samples(rng, 30, 20, 4)
    med = gn.median_bandwidth(x, y)
    for kernel in ("rbf", "imq"):
        v, g = gn.mmd2(x, y, kernel)
        v2, g2 = gn.mmd2(x, y, kernel, (med,))
        assert float(v) == float(v2)
        np.testing.assert_array_equal(g[0], g2[0])
        vt = gt.mmd2(torch.tensor(x), torch.tensor(y), kernel)
        assert vt.item() == pytest.approx(float(v), rel=1e-12)


def test_median_bandwidth_refuses_inf_data_in_every_layer():
    """An inf coordinate: every layer refuses by name (the engine's centred form makes the
    median NaN; the reference once returned a number for it)."""
    rng = np.random.default_rng(6)
    x, y = samples(rng, 10, 10, 3)
    x[0, 1] = np.inf
    for fn in (R.median_bandwidth, gn.median_bandwidth, lambda a, b: gn.median_bandwidth(torch.tensor(a), b)):
        with pytest.raises(ValueError, match=r"^median_bandwidth: x, y: the median pairwise distance is nan"):
            fn(x, y)


def test_the_read_back_paths_take_mixed_array_kinds():
    """median_bandwidth, mmd2 with the median default and kid's full-set path read their data
    back; a torch x with a NumPy y (or the other way) gives the reference's numbers, as the
    engine's own ops do, not an AttributeError ('ndarray' has no 'detach')."""
    rng = np.random.default_rng(5)
    x, y = samples(rng, 30, 24, 4)
    med = float(R.median_bandwidth(x, y))
    kid_ref = R.kid(x, y, subsets=None)
    for a, b in ((torch.tensor(x), y), (x, torch.tensor(y))):
        assert gn.median_bandwidth(a, b) == pytest.approx(med, rel=1e-12)
        v, _ = gn.mmd2(a, b, "rbf")
        assert float(v) == pytest.approx(float(R.mmd2(x, y, "rbf", (med,))), rel=1e-12)
        np.testing.assert_allclose(gn.kid(a, b, subsets=None), kid_ref, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- tile boundaries
SIZES = [2, TILE - 1, TILE, TILE + 1, 301]


@pytest.mark.parametrize("d", [3, 6])
@pytest.mark.parametrize(("n", "m"), list(itertools.product(SIZES, SIZES)))
def test_tile_boundaries(n, m, d):
    """Every tile-boundary size, each with a kernel and estimator cycling over the grid."""
    i = SIZES.index(n) * len(SIZES) + SIZES.index(m) + d
    kernel = KERNELS[i % 4]
    estimator = "unbiased" if i % 2 else "biased"
    rng = np.random.default_rng(i)
    x, y = samples(rng, n, m, d)
    bws = BWS[kernel]
    v, g = gn.mmd2(x, y, kernel, bws, estimator)
    check(x, y, kernel, estimator, bws, v, g, F64_TOL, F64_GRAD_TOL)


@pytest.mark.parametrize("d", [2, 4, 5, 33])
@pytest.mark.parametrize("kernel", KERNELS)
def test_tile_boundary_every_kernel(kernel, d):
    rng = np.random.default_rng(d)
    x, y = samples(rng, TILE + 1, TILE - 1, d)
    bws = BWS[kernel]
    for est in ("unbiased", "biased"):
        v, g = gn.mmd2(x, y, kernel, bws, est)
        check(x, y, kernel, est, bws, v, g, F64_TOL, F64_GRAD_TOL)
    xl, yl = samples(rng, TILE + 3, TILE + 3, d)
    v, g = gn.mmd2(xl, yl, kernel, bws, "linear")
    check(xl, yl, kernel, "linear", bws, v, g, F64_TOL, F64_GRAD_TOL)


@pytest.mark.parametrize("d", [3, 7])
@pytest.mark.parametrize(("n", "m"), [(1, 5), (5, 1), (1, 1), (1, TILE + 1)])
def test_single_point_biased(n, m, d):
    rng = np.random.default_rng(n + m)
    x, y = samples(rng, n, m, d)
    for kernel in KERNELS:
        v, g = gn.mmd2(x, y, kernel, BWS[kernel], "biased")
        check(x, y, kernel, "biased", BWS[kernel], v, g, F64_TOL, F64_GRAD_TOL)


@pytest.mark.parametrize("d", [3, 40])
def test_float32_large_vs_float64(d):
    """The documented float32 tolerance at a size with many tiles (both bodies)."""
    rng = np.random.default_rng(11)
    x, y = samples(rng, 700, 650, d)
    for kernel in KERNELS:
        bws = BWS[kernel] if kernel != "rbf" else (math.sqrt(d),)
        v64, g64 = gn.mmd2(x, y, kernel, bws)
        v32, g32 = gn.mmd2(x.astype(np.float32), y.astype(np.float32), kernel, bws)
        s = scale_of(x[:200], y[:200], kernel, bws)
        assert abs(float(v32) - float(v64)) <= F32_TOL * s, (kernel, float(v32), float(v64))
        for a, b in zip(g32, g64, strict=True):
            assert np.abs(a - b).max() <= F32_GRAD_TOL * np.abs(b).max(), kernel


# ---------------------------------------------------------------- gradients vs finite differences
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_finite_differences(kernel, estimator):
    rng = np.random.default_rng(5)
    n = 6
    x, y = samples(rng, n, n if estimator == "linear" else 5, 3)
    bws = BWS[kernel]
    _, (gx, gy) = gn.mmd2(x, y, kernel, bws, estimator)
    for arr, g in ((x, gx), (y, gy)):
        for idx in np.ndindex(arr.shape):
            h = 1e-6 * max(1.0, abs(arr[idx]))
            old = arr[idx]
            arr[idx] = old + h
            vp = float(gn.mmd2(x, y, kernel, bws, estimator, need_grad=False)[0])
            arr[idx] = old - h
            vm = float(gn.mmd2(x, y, kernel, bws, estimator, need_grad=False)[0])
            arr[idx] = old
            assert abs((vp - vm) / (2 * h) - g[idx]) <= 1e-6 * max(1.0, abs(g[idx])), (idx, kernel)


def test_energy_gradient_zero_at_coincident_points():
    x = np.array([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]])
    y = np.array([[0.0, 1.0], [1.0, 1.0]])
    v, (gx, gy) = gn.mmd2(x, y, "energy", None, "biased")
    assert np.isfinite(gx).all() and np.isfinite(gy).all()
    check(x, y, "energy", "biased", None, v, (gx, gy), F64_TOL, F64_GRAD_TOL)


def _term_grad_scale(x, y, kernel, bws):
    """Largest entry of the gradient of each kernel sum on its own (S_xx, S_yy, S_xy): the scale
    a float rounding error of the gradient is relative to when the sums cancel (x ~ y)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, m = len(x), len(y)
    parts = [
        _grad_rows(x, x, dense_kw(x, x, kernel, bws)[1], kernel) / n**2,
        _grad_rows(y, y, dense_kw(y, y, kernel, bws)[1], kernel) / m**2,
        _grad_rows(x, y, dense_kw(x, y, kernel, bws)[1], kernel) / (n * m),
        _grad_rows(y, x, dense_kw(y, x, kernel, bws)[1], kernel) / (n * m),
    ]
    return max(float(np.abs(p).max()) for p in parts)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("d", [3, 9])
@pytest.mark.parametrize("gap", [0.0, 1e-6])
def test_coincident_and_near_coincident_sets(kernel, estimator, dtype, d, gap):
    """(DIV.11) y = x (biased MMD^2 = 0) and y = x + 1e-6 (near duplicates), D = 9 (the blocked body)
    and D = 3 (direct): value and gradients = the float64 dense oracle on the same (rounded) points.
    The blocked body's |a|^2 + |b|^2 - 2 a.b is all rounding for such pairs (it gave 1.1e-4 instead of
    0 in float32, and energy gradients off by 5x): it takes them from the differences instead."""
    rng = np.random.default_rng(d + int(gap > 0))
    n = TILE + 3  # two tiles per side: off-diagonal x-y tiles (row and column sums) and lane masks
    x = (rng.normal(size=(n, d)) + 0.7).astype(dtype)
    y = (x.astype(np.float64) + gap).astype(dtype)
    bws = BWS[kernel]
    v, (gx, gy) = gn.mmd2(x, y, kernel, bws, estimator)
    ref, rgx, rgy = dense(x, y, kernel, bws, estimator)
    s = scale_of(np.asarray(x, np.float64), np.asarray(y, np.float64), kernel, bws)
    tol = F64_TOL if dtype == np.float64 else F32_TOL
    assert abs(float(v) - ref) <= tol * s, (float(v), ref, s)
    if gap == 0.0 and estimator == "biased":
        assert abs(ref) <= 1e-13 * s  # the oracle: exactly the same sets
    gs = _term_grad_scale(x, y, kernel, bws)
    gtol = F64_GRAD_TOL if dtype == np.float64 else F32_GRAD_TOL
    for g, rg, name in ((gx, rgx, "grad_x"), (gy, rgy, "grad_y")):
        err = np.abs(np.asarray(g, np.float64) - rg).max() / gs
        assert err <= gtol, (name, err)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))


def test_need_grad_flags():
    rng = np.random.default_rng(2)
    x, y = samples(rng, 20, 30, 3)
    v, g = gn.mmd2(x, y, need_grad=False)
    assert g == ()
    v2, (gx, gy) = gn.mmd2(x, y, need_grad=(False, True))
    assert gx is None and gy.shape == y.shape
    assert float(v) == float(v2)


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("d", [3, 20])
def test_bitwise_across_threads_and_runs(d):
    rng = np.random.default_rng(9)
    x, y = samples(rng, 900, 700, d, np.float32)
    out = []
    for threads in (1, 2, 2, 1):
        with gn.options(threads=threads):
            v, (gx, gy) = gn.mmd2(x, y, "rbf", (1.0, 3.0))
        out.append((v.tobytes(), gx.tobytes(), gy.tobytes()))
    assert all(o == out[0] for o in out)


# ---------------------------------------------------------------- odd inputs
def test_non_contiguous():
    rng = np.random.default_rng(4)
    big_x = rng.normal(size=(60, 8))
    big_y = rng.normal(size=(8, 50)).T  # Fortran order
    x, y = big_x[::2, ::2], big_y[:, 1::2]
    assert not x.flags.c_contiguous and not y.flags.c_contiguous
    for kernel in KERNELS:
        v, g = gn.mmd2(x, y, kernel, BWS[kernel])
        check(x, y, kernel, "unbiased", BWS[kernel], v, g, F64_TOL, F64_GRAD_TOL)
    xt = torch.tensor(big_x, requires_grad=True)
    vt = gt.mmd2(xt[::2, ::2], torch.tensor(big_y).T.T[:, 1::2], "imq", [1.0])
    vt.backward()
    ref, rgx, _ = dense(x, y, "imq", (1.0,), "unbiased")
    assert vt.item() == pytest.approx(ref, abs=1e-12)
    np.testing.assert_allclose(xt.grad.numpy()[::2, ::2], rgx, rtol=1e-9, atol=1e-14)
    assert np.all(xt.grad.numpy()[1::2] == 0)


# ---------------------------------------------------------------- bad inputs
def _x():
    return np.zeros((4, 3)), np.ones((5, 3))


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"kernel": "gauss"}, ValueError, "kernel"),
        ({"estimator": "mean"}, ValueError, "estimator"),
        ({"bandwidths": (1.0, -1.0)}, ValueError, "bandwidths[1]"),
        ({"bandwidths": (float("nan"),)}, ValueError, "bandwidths[0]"),
        ({"bandwidths": ()}, ValueError, "bandwidths"),
        ({"bandwidths": "1.0"}, TypeError, "bandwidths"),
        ({"kernel": "polynomial", "bandwidths": (1.0,)}, ValueError, "bandwidths"),
        ({"kernel": "energy", "bandwidths": (1.0,)}, ValueError, "bandwidths"),
        ({"estimator": "linear"}, ValueError, "y"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    x, y = _x()
    with pytest.raises(exc, match=r"^[a-z_0-9]+: " + name.replace("[", r"\[").replace("]", r"\]")):
        gn.mmd2(x, y, **kwargs)


def test_bad_arrays():
    x, y = _x()
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: x must have shape"):
        gn.mmd2(x[0], y)
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: y must have the dimension of x"):
        gn.mmd2(x, np.ones((5, 2)))
    with pytest.raises(TypeError, match=r"^[a-z_0-9]+: y must have the dtype of x"):
        gn.mmd2(x, y.astype(np.float32))
    with pytest.raises(TypeError, match="^mmd2: x must be float32, float64"):
        gn.mmd2(x.astype(np.int64), y)
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: x must have at least 2 points"):
        gn.mmd2(x[:1], y)
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: y must have at least 2 points"):
        gn.mmd2(x, y[:1], "rbf", (1.0,))
    with pytest.raises(ValueError, match="^mmd2: x, y: the median pairwise distance of the pooled data is 0"):
        gn.mmd2(x, np.zeros((5, 3)), "rbf", None, "biased")
    with pytest.raises(TypeError, match="^mmd2: x must be a torch.Tensor"):
        gt.mmd2(x, torch.tensor(y))
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: bandwidths"):
        gt.mmd2(torch.tensor(x), torch.tensor(y), "polynomial", [1.0])


def test_bad_kid_and_median():
    r, f = np.ones((10, 3)), np.ones((8, 3))
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: subset_size"):
        gn.kid(r, f, subsets=2, subset_size=9)
    for size in (0, 1):
        with pytest.raises(ValueError, match=r"^[a-z_0-9]+: subset_size must be >= 2"):
            gn.kid(r, f, subsets=2, subset_size=size)
    for points in (0, 1):
        with pytest.raises(ValueError, match=r"^median_bandwidth: max_points must be >= 2"):
            gn.median_bandwidth(r, f, max_points=points)
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: subsets"):
        gn.kid(r, f, subsets=0, subset_size=4)
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: fake_features must have the dimension"):
        gn.kid(r, np.ones((8, 2)), subsets=2, subset_size=4)
    with pytest.raises(ValueError, match="^median_bandwidth: x, y: the median heuristic needs at least 2"):
        gn.median_bandwidth(np.ones((1, 3)), np.ones((0, 3)))
    with pytest.raises(ValueError, match="^median_bandwidth: max_points"):
        gn.median_bandwidth(r, f, max_points=1)


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
def test_kid_seed_is_one_rule_in_every_layer(layer):
    """An int >= 0 everywhere, refused by name otherwise: the native and torch layers took None (a
    fresh, irreproducible draw each call) and gave NumPy's unnamed error for -1."""
    r, f = np.random.default_rng(0).random((10, 3)), np.random.default_rng(1).random((8, 3))
    call = {
        "reference": R.kid,
        "native": gn.kid,
        "torch": lambda a, b, **k: gt.kid(torch.tensor(a), torch.tensor(b), **k),
    }[layer]
    for seed, err in ((None, TypeError), (-1, ValueError), (1.0, TypeError)):
        with pytest.raises(err, match="^kid: seed must be"):
            call(r, f, subsets=2, subset_size=4, seed=seed)
    a = call(r, f, subsets=2, subset_size=4, seed=np.int64(3))
    assert a == call(r, f, subsets=2, subset_size=4, seed=3)


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
def test_median_bandwidth_names_nan_data_as_such(layer):
    """NaN features are non-finite data, not "repeated points": every layer says so, naming the op."""
    x, y = np.random.default_rng(0).random((6, 3)), np.random.default_rng(1).random((5, 3))
    x[2, 1] = np.nan
    call = {
        "reference": R.median_bandwidth,
        "native": gn.median_bandwidth,
        "torch": lambda a, b: gt.median_bandwidth(torch.tensor(a), torch.tensor(b)),
    }[layer]
    for a, b in ((x, y), (y, x)):
        with pytest.raises(ValueError, match=r"^median_bandwidth: x, y: the median pairwise distance is nan"):
            call(a, b)
    with pytest.raises(
        ValueError, match="^median_bandwidth: x, y: the median pairwise distance of the pooled"
    ):
        call(np.zeros((4, 3)), np.zeros((3, 3)))


# ---------------------------------------------------------------- median heuristic and KID
def _median_oracle(x, y, max_points=2000):
    z = np.concatenate([x, y]).astype(np.float64)
    if len(z) > max_points:
        z = z[:: math.ceil(len(z) / max_points)]
    d = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    return float(np.median(d))


@pytest.mark.parametrize(("n", "m", "max_points"), [(7, 6, 2000), (30, 21, 2000), (40, 33, 16), (9, 0, 2000)])
def test_median_bandwidth(n, m, max_points):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 3)) + 5.0, rng.normal(size=(m, 3))
    ref = _median_oracle(x, y, max_points)
    assert gn.median_bandwidth(x, y, max_points) == pytest.approx(ref, rel=1e-12)
    assert gt.median_bandwidth(torch.tensor(x), torch.tensor(y), max_points) == pytest.approx(ref, rel=1e-12)


def test_kid():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 6)), rng.normal(size=(45, 6)) + 0.2
    draw = np.random.default_rng(3)
    vals = []
    for _ in range(4):
        ir = draw.choice(60, 20, replace=False)
        jf = draw.choice(45, 20, replace=False)
        vals.append(dense(real[ir], fake[jf], "polynomial", None, "unbiased")[0])
    mean, std = gn.kid(real, fake, subsets=4, subset_size=20, seed=3)
    assert mean == pytest.approx(np.mean(vals), rel=1e-10, abs=1e-13)
    assert std == pytest.approx(np.std(vals), rel=1e-9, abs=1e-13)
    mt, st = gt.kid(torch.tensor(real), torch.tensor(fake), subsets=4, subset_size=20, seed=3)
    assert (mt, st) == pytest.approx((mean, std), rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- torch: gradcheck, opcheck, compile
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck(kernel, estimator):
    g = torch.Generator().manual_seed(1)
    n = 6
    x = torch.randn(n, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = (
        torch.randn(n if estimator == "linear" else 5, 3, dtype=torch.float64, generator=g) + 0.3
    ).requires_grad_()
    bws = list(BWS[kernel]) if BWS[kernel] else None
    assert torch.autograd.gradcheck(lambda a, b: gt.mmd2(a, b, kernel, bws, estimator), (x, y))


def test_double_backward_raises():
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64)
    (gx,) = torch.autograd.grad(gt.mmd2(x, y, "rbf", [1.0]), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize(("kernel", "bws"), [("rbf", [1.0, 2.0]), ("energy", None)])
def test_opcheck(kernel, bws):
    x = torch.randn(9, 3, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.genloss.mmd2_fwd.default, (x, y, kernel, bws, "unbiased", [True, True]))
    torch.library.opcheck(torch.ops.genloss.mmd2.default, (x.requires_grad_(), y, kernel, bws, "biased"))


# torch 2.13's own warnings under -W error (see tests/test_torch_ops.py TORCH_INTERNAL_WARNINGS).
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile(backend):
    rng = np.random.default_rng(8)
    x, y = samples(rng, 30, 20, 4)

    def loss(a, b):
        return gt.mmd2(a, b, "rbf", [0.5, 2.0]) + 0.5 * gt.mmd2(a, b, "energy", None, "biased")

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    out = []
    for f in (loss, compiled):
        xt = torch.tensor(x, requires_grad=True)
        v = f(xt, torch.tensor(y))
        (g,) = torch.autograd.grad(v, xt)
        out.append((v.item(), g.numpy()))
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    r1, g1, _ = dense(x, y, "rbf", (0.5, 2.0), "unbiased")
    r2, g2, _ = dense(x, y, "energy", None, "biased")
    assert out[1][0] == pytest.approx(r1 + 0.5 * r2, abs=1e-12)
    np.testing.assert_allclose(out[1][1], g1 + 0.5 * g2, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("d", [3, 70])
def test_cuda_vs_cpu(kernel, estimator, d):
    rng = np.random.default_rng(1)
    n, m = (TILE + 1, TILE + 1) if estimator == "linear" else (TILE + 1, 301)
    x, y = samples(rng, n, m, d)
    bws = BWS[kernel]
    for dt, tol, gtol in ((torch.float64, F64_TOL, F64_GRAD_TOL), (torch.float32, F32_TOL, F32_GRAD_TOL)):
        xc = torch.tensor(x, dtype=dt, device="cuda")
        yc = torch.tensor(y, dtype=dt, device="cuda")
        v, (gx, gy) = gn.mmd2(xc, yc, kernel, bws, estimator)
        check(x, y, kernel, estimator, bws, v.item(), (gx.cpu().numpy(), gy.cpu().numpy()), tol, gtol)
        v2, _ = gn.mmd2(xc, yc, kernel, bws, estimator)
        assert v.item() == v2.item()  # deterministic: no float atomics
    for dt in (torch.float16, torch.bfloat16):
        xc = torch.tensor(x, device="cuda").to(dt)
        yc = torch.tensor(y, device="cuda").to(dt)
        v = gt.mmd2(xc, yc, kernel, list(bws) if bws else None, estimator)
        ref = dense(xc.double().cpu().numpy(), yc.double().cpu().numpy(), kernel, bws, estimator)[0]
        s = scale_of(x, y, kernel, bws)
        assert abs(v.item() - ref) <= 1e-4 * s


# The tiled CUDA body (cuda/mmd.cu rows_tiled, D > 4): 128 rows per block in float32 and
# float16/bfloat16, 64 in float64; 64 other points per tile; coordinates in slices of 16
# (distances) and 32 (gradients). The sizes cross each of these boundaries.
CUDA_SIZES = [(1, 1), (1, 130), (63, 127), (65, 129), (129, 63), (1000, 65)]


def _cuda_ref(x, y, kernel, estimator, bws):
    """CPU native float64 value and gradients (within F64_TOL of the dense oracle) and the scale S."""
    v, (gx, gy) = gn.mmd2(np.asarray(x, np.float64), np.asarray(y, np.float64), kernel, bws, estimator)
    s = scale_of(np.asarray(x[:200], np.float64), np.asarray(y[:200], np.float64), kernel, bws)
    return float(v), np.asarray(gx), np.asarray(gy), s


def _cuda_check(what, v, grads, ref, tol, gtol):
    rv, rgx, rgy, s = ref
    err = abs(v - rv) / s
    assert err <= tol, (
        f"{what}: value {v!r} vs CPU float64 {rv!r}: error {err:.3e} S > {tol:g} S (S = {s:.4g})"
    )
    for g, rg, name in zip(grads, (rgx, rgy), ("grad_x", "grad_y"), strict=True):
        if g is None:
            continue
        g = g.double().cpu().numpy()
        gs = max(float(np.abs(rg).max()), 1e-300)
        bad = np.abs(g - rg) / gs
        i = np.unravel_index(int(np.argmax(bad)), bad.shape)
        assert bad[i] <= gtol, (
            f"{what}: {name}{tuple(int(k) for k in i)} = {g[i]!r} vs CPU {rg[i]!r}: "
            f"error {bad[i]:.3e} of max |grad| {gs:.4g} > {gtol:g}"
        )


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("d", [5, 17, 64, 130])
@pytest.mark.parametrize("nm", CUDA_SIZES)
@pytest.mark.parametrize("need_grad", [True, (True, False), (False, True)])
def test_cuda_tiled_vs_cpu(kernel, estimator, d, nm, need_grad):
    """The tiled CUDA body against the CPU engine in float64 and float32, with and without
    each gradient; sizes crossing the row tiles (64 / 128), the 64-point column tiles and
    the coordinate slices."""
    n, m = nm
    if estimator == "unbiased" and min(n, m) < 2:
        pytest.skip("the unbiased estimator needs two points per side")
    rng = np.random.default_rng(n * 1000 + m + d)
    x, y = samples(rng, n, m, d)
    bws = BWS[kernel]
    if kernel == "rbf":  # a bandwidth of the order of the distances, so k is not ~0 everywhere
        bws = (0.8, math.sqrt(2.0 * d))
    for dt, tol, gtol in ((torch.float64, F64_TOL, F64_GRAD_TOL), (torch.float32, F32_TOL, F32_GRAD_TOL)):
        xc = torch.tensor(x, dtype=dt, device="cuda")
        yc = torch.tensor(y, dtype=dt, device="cuda")
        ref = _cuda_ref(xc.cpu().numpy(), yc.cpu().numpy(), kernel, estimator, bws)
        v, grads = gn.mmd2(xc, yc, kernel, bws, estimator, need_grad=need_grad)
        if need_grad is True:
            assert grads[0] is not None and grads[1] is not None
        else:
            assert (grads[0] is None) == (not need_grad[0]) and (grads[1] is None) == (not need_grad[1])
        _cuda_check(
            f"{kernel}/{estimator} N={n} M={m} D={d} {dt} need_grad={need_grad}",
            float(v),
            grads,
            ref,
            tol,
            gtol,
        )


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("d", [5, 64, 130])
@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_cuda_tiled_half(kernel, d, dt):
    """float16/bfloat16 stored, float32 computed: the value against the CPU in float64 on
    the same (rounded) inputs."""
    rng = np.random.default_rng(d)
    x, y = samples(rng, 129, 200, d)
    bws = (0.8, math.sqrt(2.0 * d)) if kernel == "rbf" else BWS[kernel]
    xc = torch.tensor(x, device="cuda").to(getattr(torch, dt))
    yc = torch.tensor(y, device="cuda").to(getattr(torch, dt))
    v, (gx, gy) = gn.mmd2(xc, yc, kernel, bws, "unbiased")
    assert gx.dtype == xc.dtype and gy.dtype == yc.dtype
    rv, _, _, s = _cuda_ref(xc.double().cpu().numpy(), yc.double().cpu().numpy(), kernel, "unbiased", bws)
    # the value itself is stored in dt: its rounding (eps |rv|: up to one unit in the last place) comes on
    # top of the float32 computation's 1e-4 S (seen on an H200: bfloat16 values 0.1-0.6 % off, all rounding)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dt]
    err = abs(float(v) - rv)
    assert err <= 1e-4 * s + eps * abs(rv), (
        f"{kernel} D={d} {dt}: value {float(v)!r} vs CPU {rv!r}: error {err:.3e} (S = {s:.3e})"
    )


@pytest.mark.cuda
@pytest.mark.parametrize("d", [5, 64, 130])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_cuda_tiled_bitwise_repeatable(d, dt):
    """No float atomics: two calls give the same bits; the value and grad_x do not depend on
    whether grad_y is requested (the y rows' cross pairs only feed grad_y)."""
    rng = np.random.default_rng(7)
    x, y = samples(rng, 1000, 700, d)
    xc = torch.tensor(x, dtype=dt, device="cuda")
    yc = torch.tensor(y, dtype=dt, device="cuda")
    outs = [gn.mmd2(xc, yc, "rbf", (1.0, 6.0)) for _ in range(2)]
    for (v1, (gx1, gy1)), (v2, (gx2, gy2)) in zip(outs, outs[1:], strict=False):
        assert float(v1) == float(v2)
        assert torch.equal(gx1, gx2), "grad_x differs between two calls"
        assert torch.equal(gy1, gy2), "grad_y differs between two calls"
    v3, (gx3, gy3) = gn.mmd2(xc, yc, "rbf", (1.0, 6.0), need_grad=(True, False))
    assert gy3 is None
    assert float(v3) == float(outs[0][0]), "the value depends on need_grad"
    assert torch.equal(gx3, outs[0][1][0]), "grad_x depends on whether grad_y is requested"
    # value only: the same-side tiles below the diagonal are skipped, not just weighted 0
    v4, _ = gn.mmd2(xc, yc, "rbf", (1.0, 6.0), need_grad=False)
    assert float(v4) == float(outs[0][0]), "the value-only call differs from the value with gradients"


# The tiled CUDA body computes r2 = |a|^2 + |b|^2 - 2 a.b on points centred on their pooled
# mean (as the CPU's blocked body) and takes the near pairs (r2 < (|a|^2 + |b|^2) / 16) from the
# input rows' differences: coincident points give r2 = 0 exactly (energy: w = 0, no 1/rounding).
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["energy", "rbf"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("d", [9, 64])
def test_cuda_tiled_coincident_points(kernel, estimator, d):
    """x holds exact copies of y rows and duplicated x rows: value and both gradients against the
    CPU in float64 on the same inputs; every gradient finite; value-only gives the same bits."""
    rng = np.random.default_rng(d)
    x, y = samples(rng, 300, 200, d)
    x[:60] = y[:60]  # x-y coincident pairs, in several column tiles
    x[150:190] = x[100:140]  # x-x duplicates (row tile 0 against row tile 1 in float32)
    x[200] = x[201]  # a duplicate inside one row block
    y[150:170] = y[10:30]  # y-y duplicates, which are also x rows
    bws = (0.8, math.sqrt(2.0 * d)) if kernel == "rbf" else None
    for dt, tol, gtol in ((torch.float64, F64_TOL, F64_GRAD_TOL), (torch.float32, F32_TOL, F32_GRAD_TOL)):
        xc = torch.tensor(x, dtype=dt, device="cuda")
        yc = torch.tensor(y, dtype=dt, device="cuda")
        ref = _cuda_ref(xc.cpu().numpy(), yc.cpu().numpy(), kernel, estimator, bws)
        v, grads = gn.mmd2(xc, yc, kernel, bws, estimator)
        what = f"coincident {kernel}/{estimator} D={d} {dt}"
        for g, name in zip(grads, ("grad_x", "grad_y"), strict=True):
            assert bool(torch.isfinite(g).all()), f"{what}: non-finite {name}"
        _cuda_check(what, float(v), grads, ref, tol, gtol)
        v0, _ = gn.mmd2(xc, yc, kernel, bws, estimator, need_grad=False)
        assert float(v0) == float(v), f"{what}: value-only {float(v0)!r} != {float(v)!r}"


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["rbf", "imq", "energy"])
@pytest.mark.parametrize("d", [17, 64])
def test_cuda_tiled_large_offset(kernel, d):
    """Points around 1e3 with spread 1: uncentred, |a|^2 + |b|^2 - 2 a.b would lose ~eps 1e6 D of
    r2 ~ 2 D in float32 (a few per cent); centred on the pooled mean it stays at the tolerance."""
    rng = np.random.default_rng(d + 5)
    x, y = samples(rng, 300, 200, d)
    x += 1e3
    y += 1e3
    bws = (0.8, math.sqrt(2.0 * d)) if kernel == "rbf" else BWS[kernel]
    for dt, tol, gtol in ((torch.float64, F64_TOL, F64_GRAD_TOL), (torch.float32, F32_TOL, F32_GRAD_TOL)):
        xc = torch.tensor(x, dtype=dt, device="cuda")
        yc = torch.tensor(y, dtype=dt, device="cuda")
        ref = _cuda_ref(xc.cpu().numpy(), yc.cpu().numpy(), kernel, "unbiased", bws)
        v, grads = gn.mmd2(xc, yc, kernel, bws, "unbiased")
        _cuda_check(f"offset 1e3 {kernel} D={d} {dt}", float(v), grads, ref, tol, gtol)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [8, 33, 130])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_cuda_nan_in_gives_nan_value(d, kernel, dt):
    rng = np.random.default_rng(d)
    x, y = rng.standard_normal((70, d)), rng.standard_normal((130, d))
    x[0, 0] = np.nan
    bw = (1.5,) if kernel in ("rbf", "imq") else None
    v, (gx, _) = gn.mmd2(
        torch.tensor(x, dtype=dt, device="cuda"), torch.tensor(y, dtype=dt, device="cuda"), kernel, bw
    )
    assert math.isnan(float(v)), f"{kernel} D={d}: value {float(v)!r} from a NaN input"
    assert math.isnan(float(gx[0, 0])), f"{kernel} D={d}: grad_x[0, 0] = {float(gx[0, 0])!r} from a NaN input"


@pytest.mark.parametrize("D", [2, 8, 33])  # the direct body (D <= 4) and the blocked one (D > 4)
@pytest.mark.parametrize("kernel", ["rbf", "imq", "energy", "polynomial"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_gives_nan_value(D, kernel, dtype):
    """NaN in, NaN out: the blocked body clamped a cancelled squared distance with
    ``max(sv, 0)``, which turned a NaN distance into 0 and returned a finite MMD^2."""
    rng = np.random.default_rng(D)
    x, y = rng.standard_normal((6, D)).astype(dtype), rng.standard_normal((7, D)).astype(dtype)
    x[0, 0] = np.nan
    bw = (1.5,) if kernel in ("rbf", "imq") else None  # the median of NaN data is refused
    ref_v = R.mmd2(x.astype(np.float64), y.astype(np.float64), kernel=kernel, bandwidths=bw)
    assert np.isnan(ref_v)
    value, (gx, _) = gn.mmd2(x, y, kernel=kernel, bandwidths=bw)
    assert np.isnan(float(np.asarray(value)))
    assert np.isnan(np.asarray(gx)[0, 0])
    tv = gt.mmd2(torch.from_numpy(x), torch.from_numpy(y), kernel=kernel, bandwidths=bw)
    assert torch.isnan(tv)


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
@pytest.mark.parametrize("subsets", [3, None])
def test_torch_kid_takes_low_precision_features(dt, subsets):
    """kid of float16/bfloat16 features is computed in float32 (as mmd2 and cmmd): it refused them,
    with a message that pointed to genloss.torch for exactly that. The value equals the reference's
    kid of the same stored values in float64, to float32 rounding."""
    rng = np.random.default_rng(4)
    real = torch.from_numpy(rng.standard_normal((24, 6))).to(getattr(torch, dt))
    fake = torch.from_numpy(rng.standard_normal((20, 6)) + 0.3).to(getattr(torch, dt))
    got = gt.kid(real, fake, subsets=subsets, subset_size=8, seed=2)
    want = R.kid(real.double().numpy(), fake.double().numpy(), subsets=subsets, subset_size=8, seed=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_torch_kid_promotes_mixed_float_features():
    """float32 real features with float64 fake ones (a cached array beside a model's output) are
    computed in float64, as frechet_distance, prdc and sliced_wasserstein take them; kid refused
    them. The value equals the reference's on the same numbers."""
    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.standard_normal((24, 6))).float()
    fake = torch.from_numpy(rng.standard_normal((20, 6)) + 0.3)
    got = gt.kid(real, fake, subsets=3, subset_size=8, seed=1)
    want = R.kid(real.double().numpy(), fake.numpy(), subsets=3, subset_size=8, seed=1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
