"""Optimal transport metrics: sinkhorn_divergence and ot_coupling (derivations/metrics.md, MET.20-MET.29).

Oracles: POT's log-domain Sinkhorn plan with the entropy term added back (MET.23), the exact OT
cost of scipy's linear_sum_assignment (the eps -> 0 limit), closed forms (two Diracs; x == y),
central finite differences in float64 (the envelope gradient, MET.24), scipy's assignment (the
exact pairing, MET.26) and torchcfm's OTPlanSampler.  The three layers (NumPy reference, native
CPU kernel, torch op and its CUDA code path run on CPU tensors) are compared with each other.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import genloss.native as gn
from genloss.native import metrics as NM
from genloss.reference import metrics as RM

torch = pytest.importorskip("torch")
import genloss.torch as T  # noqa: E402
from genloss.torch import metrics as TM  # noqa: E402


def clouds(n, m, d, seed=0, shift=0.7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d)) + shift


def half_sq(a, b):
    return 0.5 * np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)


def exact_ot(x, y):
    """Unregularized OT cost of two uniform clouds of equal size (an assignment), cost r^2/2."""
    c = half_sq(x, y)
    r, k = linear_sum_assignment(c)
    return c[r, k].mean()


# ============================================================================= sinkhorn_divergence


def pot_ot_eps(a_pts, b_pts, eps):
    """OT_eps = <P, C> + eps KL(P | a x b) of POT's log-domain plan (MET.23): sinkhorn2 alone is <P, C>."""
    ot = pytest.importorskip("ot")
    c = half_sq(a_pts, b_pts)
    a = np.full(len(a_pts), 1.0 / len(a_pts))
    b = np.full(len(b_pts), 1.0 / len(b_pts))
    plan = ot.sinkhorn(a, b, c, reg=eps, method="sinkhorn_log", stopThr=1e-11, numItermax=20000)
    lin = float(np.sum(plan * c))
    assert lin == pytest.approx(float(ot.sinkhorn2(a, b, c, eps, method="sinkhorn_log", stopThr=1e-11,
                                                   numItermax=20000)), rel=1e-9)  # fmt: skip
    nz = plan > 0
    kl = float(np.sum(plan[nz] * np.log(plan[nz] / np.outer(a, b)[nz])))
    return lin + eps * kl


@pytest.mark.parametrize("eps", [1.0, 0.5])
def test_sinkhorn_matches_pot(eps):
    """(MET.20-MET.23) all layers = POT's plan's primal value, debiased by hand."""
    x, y = clouds(11, 9, 3)
    want = pot_ot_eps(x, y, eps) - 0.5 * pot_ot_eps(x, x, eps) - 0.5 * pot_ot_eps(y, y, eps)
    ref = float(RM.sinkhorn_divergence(x, y, eps, tol=1e-11))
    nat = float(NM.sinkhorn_divergence(x, y, eps, tol=1e-11, need_grad=False)[0])
    tch = float(T.sinkhorn_divergence(torch.from_numpy(x), torch.from_numpy(y), eps, tol=1e-11))
    dev = float(TM._sinkhorn_torch(torch.from_numpy(x), torch.from_numpy(y), eps, tol=1e-11)[0])
    for got in (ref, nat, tch, dev):
        assert got == pytest.approx(want, rel=1e-8, abs=1e-10)


def test_sinkhorn_tends_to_exact_ot():
    """(MET.20) S_eps -> the assignment's OT cost as eps -> 0, monotonically on this sequence."""
    x, y = clouds(8, 8, 2, seed=3)
    w = exact_ot(x, y)
    errs = [
        abs(float(NM.sinkhorn_divergence(x, y, e, need_grad=False)[0]) - w) for e in (1.0, 0.1, 0.01, 0.001)
    ]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-3 * w
    assert float(RM.sinkhorn_divergence(x, y, 0.001)) == pytest.approx(w, rel=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_sinkhorn_nonnegative_and_zero_on_identical(seed):
    """S_eps >= 0 up to about tol * eps, and 0 for x == y (the debiasing, MET.23)."""
    x, y = clouds(13, 7, 4, seed=seed, shift=0.1 * seed)
    eps = [0.05, 0.3, 1.0, 3.0][seed]
    assert float(NM.sinkhorn_divergence(x, y, eps, need_grad=False)[0]) >= -1e-8 * eps
    v, (gx, gy) = NM.sinkhorn_divergence(x, x, eps)
    assert abs(float(v)) <= 1e-7 * eps
    np.testing.assert_allclose(gx + gy, 0.0, atol=1e-7)  # moving both clouds together changes nothing


def test_sinkhorn_diracs_closed_form():
    """Two Diracs (all points identical, N = 1, duplicates): S = |a - b|^p / p exactly, gradient a - b."""
    a, b = np.array([[1.0, -2.0, 0.5]]), np.array([[0.0, 1.0, 2.5]])
    want = 0.5 * np.sum((a - b) ** 2)
    for xs, ys in ((a, b), (np.repeat(a, 5, 0), np.repeat(b, 3, 0)), (np.repeat(a, 4, 0), b)):
        for eps in (1e-3, 1.0, 1e3):
            v, (gx, gy) = NM.sinkhorn_divergence(xs, ys, eps)
            assert float(v) == pytest.approx(want, rel=1e-10)
            np.testing.assert_allclose(gx.sum(0), (a - b)[0], rtol=1e-9)
            np.testing.assert_allclose(gy.sum(0), (b - a)[0], rtol=1e-9)
            assert float(RM.sinkhorn_divergence(xs, ys, eps)) == pytest.approx(want, rel=1e-10)
    same = np.zeros((6, 2))
    v, (gx, gy) = NM.sinkhorn_divergence(same, same, 0.1)
    assert float(v) == 0.0 and not np.isnan(gx).any() and not np.isnan(gy).any()
    dup, _ = clouds(5, 1, 3)
    dup = np.concatenate([dup, dup[:3]])  # duplicated points: finite, = reference
    v, (gx, _) = NM.sinkhorn_divergence(dup, dup[::-1] + 0.3, 0.2)
    assert np.isfinite(float(v)) and np.isfinite(gx).all()
    assert float(v) == pytest.approx(float(RM.sinkhorn_divergence(dup, dup[::-1] + 0.3, 0.2)), rel=1e-10)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_sinkhorn_gradient_finite_differences(p):
    """(MET.24) the envelope-theorem gradient = central differences of the value (float64)."""
    x, y = clouds(4, 3, 2, seed=7)
    eps, h = 0.3, 1e-5
    gx, gy = RM.sinkhorn_divergence_backward(x, y, 1.0, eps, p, tol=1e-12)

    def value(a, b):
        return float(RM.sinkhorn_divergence(a, b, eps, p, tol=1e-12))

    for arr, g, first in ((x, gx, True), (y, gy, False)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            d = np.zeros_like(arr)
            d[idx] = h
            hi, lo = (
                (value(arr + d, y), value(arr - d, y)) if first else (value(x, arr + d), value(x, arr - d))
            )
            num[idx] = (hi - lo) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)


def native_matches_reference(x, y, eps, p):
    """The native Sinkhorn divergence and its gradients = the reference's; returns the reference's."""
    rv = float(RM.sinkhorn_divergence(x, y, eps, p))
    rgx, rgy = RM.sinkhorn_divergence_backward(x, y, 1.0, eps, p)
    v, (gx, gy) = NM.sinkhorn_divergence(x, y, eps, p)
    assert float(v) == pytest.approx(rv, rel=1e-10, abs=1e-13)
    np.testing.assert_allclose(gx, rgx, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gy, rgy, rtol=1e-8, atol=1e-12)
    return rv, (rgx, rgy)


@pytest.mark.parametrize("p", [2.0, 1.0, 1.5])
def test_sinkhorn_layers_agree(p):
    """Native kernel, torch op (CPU: native; the CUDA code path run on CPU) = reference, values and grads."""
    x, y = clouds(37, 29, 5, seed=11)
    eps = 0.4
    rv, (rgx, rgy) = native_matches_reference(x, y, eps, p)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.from_numpy(y).requires_grad_()
    (2.0 * T.sinkhorn_divergence(xt, yt, eps, p)).backward()
    np.testing.assert_allclose(xt.grad.numpy(), 2 * rgx, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(yt.grad.numpy(), 2 * rgy, rtol=1e-8, atol=1e-12)
    dv, (dgx, dgy) = TM._sinkhorn_torch(torch.from_numpy(x), torch.from_numpy(y), eps, p)
    assert float(dv) == pytest.approx(rv, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(dgx.numpy(), rgx, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(dgy.numpy(), rgy, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_sinkhorn_small_d_fused_pass(d, p):
    """D <= 3, p in {1, 2}: the native kernel's fused score pass (whole 4-row tiles; the last tile of
    23 rows takes the general pass) = the reference, value and gradients."""
    native_matches_reference(*clouds(23, 18, d, seed=d), 0.3, p)


def test_sinkhorn_far_blocks_and_thread_count():
    """Columns in two clusters 40 apart, eps = 0.5 (C / eps = 1600 between them): for rows of the
    first cluster the second 512-column block lies > 708 under the row maximum and its exponentials
    are skipped (exact zeros). The value and gradients still = the reference; 1 and 2 threads give
    the same bits."""
    rng = np.random.default_rng(4)
    y = np.concatenate([rng.normal(size=(512, 2)), rng.normal(size=(88, 2)) + 40.0])
    x = np.concatenate([rng.normal(size=(17, 2)), rng.normal(size=(3, 2)) + 40.0])
    rv = float(RM.sinkhorn_divergence(x, y, 0.5))
    with gn.options(threads=1):
        v1, (gx1, gy1) = NM.sinkhorn_divergence(x, y, 0.5)
    with gn.options(threads=2):
        v2, (gx2, gy2) = NM.sinkhorn_divergence(x, y, 0.5)
    assert float(v1) == pytest.approx(rv, rel=1e-10)
    rgx, _ = RM.sinkhorn_divergence_backward(x, y, 1.0, 0.5)
    np.testing.assert_allclose(gx1, rgx, rtol=1e-8, atol=1e-12)
    assert float(v1) == float(v2)
    np.testing.assert_array_equal(gx1, gx2)
    np.testing.assert_array_equal(gy1, gy2)


def test_sinkhorn_float32_and_chunks(monkeypatch):
    """float32 inputs are computed in float64 (value and gradient in float32); the torch loop's row
    chunks (forced to 7 entries... rows) give the unchunked result."""
    x, y = clouds(20, 17, 3, seed=5)
    v32, (g32, _) = NM.sinkhorn_divergence(x.astype(np.float32), y.astype(np.float32), 0.5)
    v64, (g64, _) = NM.sinkhorn_divergence(x.astype(np.float32).astype(np.float64),
                                           y.astype(np.float32).astype(np.float64), 0.5)  # fmt: skip
    assert v32.dtype == np.float32 and g32.dtype == np.float32
    assert float(v32) == pytest.approx(float(v64), rel=1e-6)
    monkeypatch.setattr(TM, "_OT_CHUNK", 40)  # 2 rows per chunk of 17 (or 20) columns
    dv, _ = TM._sinkhorn_torch(torch.from_numpy(x), torch.from_numpy(y), 0.5, need_grad=False)
    assert float(dv) == pytest.approx(float(RM.sinkhorn_divergence(x, y, 0.5)), rel=1e-10)


def test_sinkhorn_nan_in_nan_out():
    x, y = clouds(5, 4, 2)
    x[2, 1] = np.nan
    assert np.isnan(float(RM.sinkhorn_divergence(x, y, 0.5)))
    v, (gx, gy) = NM.sinkhorn_divergence(x, y, 0.5)
    assert np.isnan(float(v)) and np.isnan(gx).all() and np.isnan(gy).all()
    assert torch.isnan(T.sinkhorn_divergence(torch.from_numpy(x), torch.from_numpy(y), 0.5))
    assert torch.isnan(TM._sinkhorn_torch(torch.from_numpy(x), torch.from_numpy(y), 0.5)[0])


BAD_SINKHORN = [
    (dict(eps=0.0), "eps"), (dict(eps=-1.0), "eps"), (dict(eps=float("nan")), "eps"), (dict(eps=float("inf")), "eps"),
    (dict(scaling=1.0), "scaling"), (dict(scaling=0.0), "scaling"), (dict(p=0.5), "p"),
    (dict(y=np.zeros((4, 3))), "y"), (dict(x=np.zeros((0, 2))), "x"), (dict(y=np.zeros((0, 2))), "y"),
    (dict(x=np.zeros(3)), "x"), (dict(max_iter=0), "max_iter"),
]  # fmt: skip


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
@pytest.mark.parametrize(("change", "name"), BAD_SINKHORN)
def test_sinkhorn_bad_input(layer, change, name):
    kw = dict(x=np.ones((3, 2)), y=np.zeros((4, 2)), eps=0.5, scaling=0.5, p=2.0, max_iter=10)
    kw.update(change)
    if layer == "torch":
        kw["x"], kw["y"] = torch.from_numpy(kw["x"]), torch.from_numpy(kw["y"])
    fn = {
        "reference": RM.sinkhorn_divergence,
        "native": NM.sinkhorn_divergence,
        "torch": T.sinkhorn_divergence,
    }
    with pytest.raises(ValueError, match=rf"sinkhorn_divergence: .*\b{name}\b"):
        fn[layer](kw.pop("x"), kw.pop("y"), **kw)


# ============================================================================= ot_coupling


def total_cost(x0, x1, perm):
    return float(np.sum((x0 - x1[perm]) ** 2))


@pytest.mark.parametrize("b", [1, 2, 7, 64, 150, 333])
def test_exact_coupling_matches_scipy(b):
    """(MET.26) the native Hungarian solver = scipy's assignment: same cost, same permutation (no ties)."""
    x0, x1 = clouds(b, b, 3, seed=b)
    c = np.sum((x0[:, None] - x1[None]) ** 2, axis=-1)
    _, want = linear_sum_assignment(c)
    perm = NM.ot_coupling(x0, x1)
    assert perm.dtype == np.int64 and sorted(perm) == list(range(b))
    np.testing.assert_array_equal(perm, want)
    np.testing.assert_array_equal(RM.ot_coupling(x0, x1), want)
    tp = T.ot_coupling(torch.from_numpy(x0).float(), torch.from_numpy(x1).float())
    assert tp.dtype == torch.int64
    assert total_cost(x0, x1, tp.numpy()) == pytest.approx(total_cost(x0, x1, want), rel=1e-6)


def test_exact_coupling_ties():
    """Tied costs (repeated points, a symmetric square): an optimal permutation, the same every call."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 2))
    x0, x1 = np.repeat(base, 3, 0), np.repeat(base[::-1], 3, 0)
    sq = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    for a, b in ((x0, x1), (sq, sq[::-1].copy()), (np.zeros((5, 2)), np.zeros((5, 2)))):
        c = np.sum((a[:, None] - b[None]) ** 2, axis=-1)
        r, k = linear_sum_assignment(c)
        perm = NM.ot_coupling(a, b)
        assert sorted(perm) == list(range(len(a)))
        assert total_cost(a, b, perm) == pytest.approx(c[r, k].sum(), abs=1e-12)
        np.testing.assert_array_equal(NM.ot_coupling(a, b), perm)
    # every cost tied, 130 columns (three blocks of the column scan): the lowest free column, in order
    np.testing.assert_array_equal(NM.ot_coupling(np.zeros((130, 2)), np.zeros((130, 2))), np.arange(130))


def test_exact_coupling_vs_torchcfm():
    pytest.importorskip("ot")
    cfm = pytest.importorskip("torchcfm.optimal_transport")
    x0, x1 = clouds(32, 32, 4, seed=1)
    pi = cfm.OTPlanSampler("exact").get_map(torch.from_numpy(x0), torch.from_numpy(x1))
    c = np.sum((x0[:, None] - x1[None]) ** 2, axis=-1)
    perm = NM.ot_coupling(x0, x1)
    assert total_cost(x0, x1, perm) == pytest.approx(32 * float(np.sum(pi * c)), rel=1e-10)


def test_sinkhorn_coupling_plan():
    """(MET.27) the 'sinkhorn' plan = POT's ot.sinkhorn plan of C = |x0 - x1|^2 at reg eps; all layers."""
    ot = pytest.importorskip("ot")
    x0, x1 = clouds(12, 12, 3, seed=2)
    eps = 0.5
    c = np.sum((x0[:, None] - x1[None]) ** 2, axis=-1)
    w = np.full(12, 1 / 12)
    want = ot.sinkhorn(w, w, c, reg=eps, method="sinkhorn_log", stopThr=1e-11, numItermax=20000)
    ref = RM.ot_coupling(x0, x1, "sinkhorn", eps, tol=1e-11)
    nat = NM.ot_coupling(x0, x1, "sinkhorn", eps, tol=1e-11)
    tch = T.ot_coupling(torch.from_numpy(x0), torch.from_numpy(x1), "sinkhorn", eps, tol=1e-11)
    dev = TM._plan_torch(torch.from_numpy(x0), torch.from_numpy(x1), eps, 1e-11, 1000)
    for got in (ref, nat, tch.numpy(), dev.numpy()):
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)


def test_sinkhorn_coupling_marginals_without_pot():
    x0, x1 = clouds(9, 9, 2, seed=4)
    plan = NM.ot_coupling(x0, x1, "sinkhorn", 1.0)  # converges well within max_iter
    np.testing.assert_allclose(plan.sum(1), 1 / 9, rtol=1e-6)
    np.testing.assert_allclose(plan.sum(0), 1 / 9, rtol=1e-12)  # g is the last update: exact columns
    # small eps: the plan concentrates on the exact assignment
    sharp = NM.ot_coupling(x0, x1, "sinkhorn", 1e-3)
    np.testing.assert_array_equal(sharp.argmax(1), NM.ot_coupling(x0, x1))


BAD_COUPLING = [
    (dict(method="greedy"), "method"), (dict(method="sinkhorn", eps=0.0), "eps"),
    (dict(method="sinkhorn", eps=float("nan")), "eps"), (dict(x1=np.zeros((4, 2))), "x1"),
    (dict(x1=np.zeros((3, 5))), "x1"), (dict(x0=np.zeros((0, 2)), x1=np.zeros((0, 2))), "x0"),
    (dict(x0=np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]])), "x0"),
    (dict(x1=np.array([[0.0, np.inf], [1.0, 1.0], [2.0, 2.0]]), method="sinkhorn"), "x1"),
]  # fmt: skip


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
@pytest.mark.parametrize(("change", "name"), BAD_COUPLING)
def test_coupling_bad_input(layer, change, name):
    kw = dict(x0=np.ones((3, 2)), x1=np.zeros((3, 2)), method="exact", eps=0.5)
    kw.update(change)
    if layer == "torch":
        kw["x0"], kw["x1"] = torch.from_numpy(kw["x0"]), torch.from_numpy(kw["x1"])
    fn = {"reference": RM.ot_coupling, "native": NM.ot_coupling, "torch": T.ot_coupling}
    with pytest.raises(ValueError, match=rf"ot_coupling: .*\b{name}\b"):
        fn[layer](kw.pop("x0"), kw.pop("x1"), **kw)


def test_native_refuses_cuda_arrays():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = torch.zeros((3, 2), device="cuda")
    with pytest.raises(ValueError, match="sinkhorn_divergence: no CUDA kernel yet"):
        NM.sinkhorn_divergence(x, x, 0.5)
    perm = T.ot_coupling(x, x + 1)  # exact: a documented host round trip, the result on the device
    assert perm.device == x.device
    assert T.ot_coupling(x, x + 1, "sinkhorn", 0.5).device == x.device


def test_sinkhorn_extreme_inputs_finite():
    """Inputs of magnitude 1e4 (C / eps ~ 1e8): finite value and gradients, close to the reference."""
    rng = np.random.default_rng(9)
    x, y = 1e4 * rng.normal(size=(7, 3)), 1e4 * rng.normal(size=(6, 3))
    v, (gx, gy) = NM.sinkhorn_divergence(x, y, 0.5)
    assert np.isfinite(float(v)) and np.isfinite(gx).all() and np.isfinite(gy).all()
    assert float(v) == pytest.approx(float(RM.sinkhorn_divergence(x, y, 0.5)), rel=1e-6)
