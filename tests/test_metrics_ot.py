"""Optimal transport metrics: sinkhorn_divergence and ot_coupling (derivations/metrics.md, MET.20-MET.29).

Oracles: POT's log-domain Sinkhorn plan with the entropy term added back (MET.23), the exact OT
cost of scipy's linear_sum_assignment (the eps -> 0 limit), closed forms (two Diracs; x == y),
central finite differences in float64 (the envelope gradient, MET.24), scipy's assignment (the
exact pairing, MET.26) and torchcfm's OTPlanSampler.  The three layers (NumPy reference, native
kernels, torch op) are compared with each other, and the CUDA kernels with the CPU ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import genloss.native as gn
from genloss.native import metrics as NM
from genloss.reference import metrics as RM
from peers import peer
from tolerances import assert_close

torch = pytest.importorskip("torch")
import genloss.torch as T  # noqa: E402


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
    ot = peer("ot")
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
    for got in (ref, nat, tch):
        assert got == pytest.approx(want, rel=1e-8, abs=1e-10)


def test_sinkhorn_tends_to_exact_ot():
    """(MET.20) S_eps -> the assignment's OT cost as eps -> 0, monotonically on this sequence (small
    eps converges slowly: 20,000 rounds, where 1,000 stop with the marginals 0.2 % off and warn)."""
    x, y = clouds(8, 8, 2, seed=3)
    w = exact_ot(x, y)
    errs = [
        abs(float(NM.sinkhorn_divergence(x, y, e, need_grad=False, max_iter=20000)[0]) - w)
        for e in (1.0, 0.1, 0.01, 0.001)
    ]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-6 * w
    assert float(RM.sinkhorn_divergence(x, y, 0.001, max_iter=20000)) == pytest.approx(w, rel=1e-6)


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
    """Native kernel, torch op = reference, values and grads."""
    x, y = clouds(37, 29, 5, seed=11)
    eps = 0.4
    rv, (rgx, rgy) = native_matches_reference(x, y, eps, p)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.from_numpy(y).requires_grad_()
    (2.0 * T.sinkhorn_divergence(xt, yt, eps, p)).backward()
    np.testing.assert_allclose(xt.grad.numpy(), 2 * rgx, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(yt.grad.numpy(), 2 * rgy, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_sinkhorn_small_d_fused_pass(d, p):
    """D <= 3, p in {1, 2}: the native kernel's fused score pass (whole 4-row tiles; the last tile of
    23 rows takes the general pass) = the reference, value and gradients."""
    native_matches_reference(*clouds(23, 18, d, seed=d), 0.3, p)


# Unconverged at max_iter (check_converged warns); what these check (the skipped blocks, the thread
# count, finiteness, the layers' agreement) holds after any number of rounds.
UNCONVERGED = pytest.mark.filterwarnings("ignore:sinkhorn_divergence.*did not converge:RuntimeWarning")


@UNCONVERGED
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


def test_sinkhorn_float32():
    """float32 inputs are computed in float64 (value and gradient in float32)."""
    x, y = clouds(20, 17, 3, seed=5)
    v32, (g32, _) = NM.sinkhorn_divergence(x.astype(np.float32), y.astype(np.float32), 0.5)
    v64, (g64, _) = NM.sinkhorn_divergence(x.astype(np.float32).astype(np.float64),
                                           y.astype(np.float32).astype(np.float64), 0.5)  # fmt: skip
    assert v32.dtype == np.float32 and g32.dtype == np.float32
    assert float(v32) == pytest.approx(float(v64), rel=1e-6)


def test_sinkhorn_nan_in_nan_out():
    x, y = clouds(5, 4, 2)
    x[2, 1] = np.nan
    assert np.isnan(float(RM.sinkhorn_divergence(x, y, 0.5)))
    v, (gx, gy) = NM.sinkhorn_divergence(x, y, 0.5)
    assert np.isnan(float(v)) and np.isnan(gx).all() and np.isnan(gy).all()
    assert torch.isnan(T.sinkhorn_divergence(torch.from_numpy(x), torch.from_numpy(y), 0.5))


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


def test_exact_coupling_takes_eps_none_in_every_layer():
    """'exact' ignores eps, so eps=None is accepted by the reference, native and torch layers alike,
    and all three give scipy's permutation (no ties)."""
    x0, x1 = clouds(9, 9, 3, seed=4)
    _, want = linear_sum_assignment(np.sum((x0[:, None] - x1[None]) ** 2, axis=-1))
    np.testing.assert_array_equal(RM.ot_coupling(x0, x1, "exact", eps=None), want)
    np.testing.assert_array_equal(NM.ot_coupling(x0, x1, "exact", eps=None), want)
    tp = T.ot_coupling(torch.from_numpy(x0), torch.from_numpy(x1), "exact", eps=None)
    assert tp.dtype == torch.int64
    np.testing.assert_array_equal(tp.numpy(), want)
    with pytest.raises(TypeError, match="ot_coupling: eps"):  # 'sinkhorn' still needs a number
        T.ot_coupling(torch.from_numpy(x0), torch.from_numpy(x1), "sinkhorn", eps=None)


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
    peer("ot")
    cfm = peer("torchcfm.optimal_transport")
    x0, x1 = clouds(32, 32, 4, seed=1)
    pi = cfm.OTPlanSampler("exact").get_map(torch.from_numpy(x0), torch.from_numpy(x1))
    c = np.sum((x0[:, None] - x1[None]) ** 2, axis=-1)
    perm = NM.ot_coupling(x0, x1)
    assert total_cost(x0, x1, perm) == pytest.approx(32 * float(np.sum(pi * c)), rel=1e-10)


def test_sinkhorn_coupling_plan():
    """(MET.27) the 'sinkhorn' plan = POT's ot.sinkhorn plan of C = |x0 - x1|^2 at reg eps; all layers."""
    ot = peer("ot")
    x0, x1 = clouds(12, 12, 3, seed=2)
    eps = 0.5
    c = np.sum((x0[:, None] - x1[None]) ** 2, axis=-1)
    w = np.full(12, 1 / 12)
    want = ot.sinkhorn(w, w, c, reg=eps, method="sinkhorn_log", stopThr=1e-11, numItermax=20000)
    ref = RM.ot_coupling(x0, x1, "sinkhorn", eps, tol=1e-11)
    nat = NM.ot_coupling(x0, x1, "sinkhorn", eps, tol=1e-11)
    tch = T.ot_coupling(torch.from_numpy(x0), torch.from_numpy(x1), "sinkhorn", eps, tol=1e-11)
    for got in (ref, nat, tch.numpy()):
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)


def test_coupling_compiles_fullgraph():
    """(MET.25, MET.27) an OT-CFM step compiled with ``fullgraph=True`` (ot_coupling is a custom op; its
    argument checks are plain Python on Python numbers): the same permutation and plan as eager."""
    x0, x1 = clouds(10, 10, 3, seed=6)
    a, b = torch.from_numpy(x0), torch.from_numpy(x1)
    for method in ("exact", "sinkhorn"):

        def pair(u, v, method=method):
            return T.ot_coupling(u, v, method, 0.5)

        compiled = torch.compile(pair, fullgraph=True, backend="aot_eager")
        want = pair(a, b)
        torch.testing.assert_close(compiled(a, b), want, rtol=0, atol=0)
        np.testing.assert_allclose(want.numpy(), RM.ot_coupling(x0, x1, method, 0.5), rtol=1e-10, atol=0)
    torch.library.opcheck(torch.ops.genloss.ot_coupling.default, (a, b, "exact", 0.1, 1e-8, 1000))


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


def test_unconverged_sinkhorn_warns_in_every_layer():
    """Small eps converges slowly: stopped at max_iter, the value can fall below the bound
    S_eps >= OT_0 - eps/2 (log n + log m) that a converged one respects (OT_eps(x, y) >= OT_0 as
    KL >= 0; OT_eps(x, x) <= eps log n by the identity plan), with OT_0 from scipy's exact
    assignment (n = m: a permutation is optimal). That is a RuntimeWarning naming the op in
    every layer (it was silent); a converged call warns nothing."""
    import warnings

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5
    cost = 0.5 * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    eps = 1e-4
    bound = cost[r, c].mean() - 0.5 * eps * 2 * np.log(6)
    calls = {
        "reference": lambda e, **k: RM.sinkhorn_divergence(x, y, e, **k),
        "native": lambda e, **k: NM.sinkhorn_divergence(x, y, e, need_grad=False, **k)[0],
        "torch": lambda e, **k: T.sinkhorn_divergence(torch.tensor(x), torch.tensor(y), e, **k),
        "native ot_coupling": lambda e, **k: NM.ot_coupling(x, y, "sinkhorn", e, **k),
        "reference ot_coupling": lambda e, **k: RM.ot_coupling(x, y, "sinkhorn", e, **k),
    }
    for layer, call in calls.items():
        op = "ot_coupling" if "coupling" in layer else "sinkhorn_divergence"
        with pytest.warns(
            RuntimeWarning, match=rf"{op}: the Sinkhorn iterations did not converge in max_iter=50 "
        ):
            out = call(eps, max_iter=50)
        if op == "sinkhorn_divergence":
            assert float(out) < bound, layer  # what the warning is about: not the converged value
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(0.5)  # converges well within the default max_iter


def test_eps_below_the_costs_resolution_warns_in_every_layer():
    """eps = 1e-300 against costs ~1: the plan's exponents (f + g - C) / eps are all rounding, and the
    loop once stopped "converged" with a value 5 % below the bound OT_0 - eps/2 (log n + log m) it
    cannot cross; now a RuntimeWarning naming the op says so (every layer shares eps_schedule)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5
    for call in (lambda: RM.sinkhorn_divergence(x, y, 1e-300), lambda: NM.sinkhorn_divergence(x, y, 1e-300),
                 lambda: T.sinkhorn_divergence(torch.tensor(x), torch.tensor(y), 1e-300)):  # fmt: skip
        with pytest.warns(
            RuntimeWarning, match=r"sinkhorn_divergence: eps=1e-300 is below float64's resolution"
        ):
            call()
    with pytest.warns(RuntimeWarning, match=r"ot_coupling: eps=5e-301 is below float64's resolution"):
        NM.ot_coupling(x, x[::-1] + 0.5, "sinkhorn", 1e-300)


@UNCONVERGED
def test_sinkhorn_extreme_inputs_finite():
    """Inputs of magnitude 1e4 (C / eps ~ 1e8): finite value and gradients, close to the reference."""
    rng = np.random.default_rng(9)
    x, y = 1e4 * rng.normal(size=(7, 3)), 1e4 * rng.normal(size=(6, 3))
    v, (gx, gy) = NM.sinkhorn_divergence(x, y, 0.5)
    assert np.isfinite(float(v)) and np.isfinite(gx).all() and np.isfinite(gy).all()
    assert float(v) == pytest.approx(float(RM.sinkhorn_divergence(x, y, 0.5)), rel=1e-6)


# ============================================================================= CUDA (cuda/ot.cu)
# The assignment equals the CPU solver's permutation exactly (the same float64 operations, ties to
# the lowest column); Sinkhorn equals the CPU loop to rounding (other summation orders): the value
# and gradients within tests/tolerances.py's "cuda" entry, with tol so small that neither loop meets
# it before max_iter (or both stop on an exactly zero change): the same number of rounds on both.

TIGHT = dict(tol=1e-15, max_iter=400)
# ... so both loops may warn that they did not converge (check_converged): expected here
TIGHT_WARNS = pytest.mark.filterwarnings("ignore:.*did not converge in max_iter=400:RuntimeWarning")


def _lattice(b, d, seed):
    """Points on a 3-per-axis integer lattice: many exactly equal costs (ties) and coincident points."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=(b, d)).astype(np.float64), rng.integers(0, 3, size=(b, d)).astype(
        np.float64
    )


def _coupling_inputs():
    out = []
    for b in (1, 2, 7, 64, 1000, 1100):  # 1100: more columns than the solver's 1024 threads
        for d in (1, 3):
            out.append((f"normal-B{b}-D{d}", *clouds(b, b, d, seed=b + d)))
    for b in (7, 64, 1000):
        for d in (1, 3):
            out.append((f"lattice-B{b}-D{d}", *_lattice(b, d, seed=b * d)))
    rng = np.random.default_rng(3)
    base = rng.normal(size=(20, 3))
    out.append(("duplicated-rows", np.repeat(base, 5, 0), np.repeat(base[::-1], 5, 0)))
    out.append(("all-equal-130", np.zeros((130, 2)), np.zeros((130, 2))))  # every cost 0: the identity
    return out


COUPLING_INPUTS = _coupling_inputs()


@pytest.mark.cuda
@pytest.mark.parametrize(("label", "x0", "x1"), COUPLING_INPUTS, ids=[c[0] for c in COUPLING_INPUTS])
def test_cuda_assignment_is_the_cpu_permutation(label, x0, x1, cuda_device):
    """(MET.26) native on CUDA == native on the CPU, every entry, float64 and float32 inputs; two
    calls give the same permutation; the torch op on CUDA too, its result on the device."""
    for dt in (torch.float64, torch.float32):
        a, b = torch.from_numpy(x0).to(dt), torch.from_numpy(x1).to(dt)
        want = NM.ot_coupling(a.double().numpy(), b.double().numpy())
        got = NM.ot_coupling(a.to(cuda_device), b.to(cuda_device))
        assert got.device == cuda_device and got.dtype == torch.int64, (label, got.device, got.dtype)
        g = got.cpu().numpy()
        bad = np.flatnonzero(g != want)
        assert bad.size == 0, (
            f"{label} {dt}: {bad.size} of {len(want)} rows differ, first rows {bad[:8].tolist()}: "
            f"cuda {g[bad[:8]].tolist()} cpu {want[bad[:8]].tolist()}; cost cuda "
            f"{total_cost(x0, x1, g) if sorted(g) == list(range(len(g))) else 'not a permutation'} "
            f"cpu {total_cost(x0, x1, want)}"
        )
        if dt != torch.float64:
            continue
        again = NM.ot_coupling(a.to(cuda_device), b.to(cuda_device)).cpu().numpy()
        np.testing.assert_array_equal(again, g, err_msg=f"{label}: two CUDA calls differ")
        tp = T.ot_coupling(a.to(cuda_device), b.to(cuda_device))
        assert tp.device == cuda_device
        np.testing.assert_array_equal(tp.cpu().numpy(), want, err_msg=f"{label}: genloss.torch on CUDA")


@pytest.mark.cuda
def test_cuda_assignment_captures_and_replays(cuda_device):
    """No host round trip: genloss.torch.ot_coupling(method='exact') is captured in a CUDA graph (a
    host copy or synchronisation would fail the capture) and its replays solve new inputs, on the
    capture's (side) stream, equal to the CPU solver."""
    x0, x1 = clouds(100, 100, 3, seed=11)
    y0, y1 = _lattice(100, 3, seed=12)
    s0 = torch.from_numpy(x0).to(cuda_device)
    s1 = torch.from_numpy(x1).to(cuda_device)
    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):  # warm-up off the capture
        for _ in range(2):
            T.ot_coupling(s0, s1)
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        perm = T.ot_coupling(s0, s1)
    for a, b in ((x0, x1), (y0, y1)):
        with torch.no_grad():
            s0.copy_(torch.from_numpy(a))
            s1.copy_(torch.from_numpy(b))
        graph.replay()
        torch.cuda.synchronize(cuda_device)
        np.testing.assert_array_equal(perm.cpu().numpy(), NM.ot_coupling(a, b), err_msg="replayed assignment")


@pytest.mark.cuda
def test_cuda_assignment_refuses_non_finite(cuda_device):
    x = torch.zeros((3, 2), device=cuda_device, dtype=torch.float64)
    bad = x.clone()
    bad[1, 0] = float("nan")
    for args, name in (((bad, x), "x0"), ((x, bad), "x1")):
        with pytest.raises(ValueError, match=rf"ot_coupling: {name} must be finite"):
            NM.ot_coupling(*args)
        with pytest.raises(ValueError, match=rf"ot_coupling: {name} must be finite"):
            T.ot_coupling(*args, "sinkhorn", 0.5)


def _ot_clouds():
    out = [("N17-M9-D3", *clouds(17, 9, 3, seed=1)), ("N1-M40-D2", *clouds(1, 40, 2, seed=2))]
    out.append(("N70-M33-D1", *clouds(70, 33, 1, seed=3)))
    out.append(("N300-M257-D5", *clouds(300, 257, 5, seed=4)))
    x, y = clouds(12, 10, 2, seed=5)
    x[3] = x[7]  # coincident points within x, and between x and y (the p = 1 gradient's 0 at r = 0)
    y[:4] = x[:4]
    out.append(("coincident", x, y))
    return out


OT_CLOUDS = _ot_clouds()


@TIGHT_WARNS
@pytest.mark.cuda
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize(("label", "x", "y"), OT_CLOUDS, ids=[c[0] for c in OT_CLOUDS])
def test_cuda_sinkhorn_is_the_cpu_loop(label, x, y, p, cuda_device):
    """(MET.20-MET.24) value and both gradients, native CUDA vs native CPU on the same data, to the
    "cuda" tolerance; float32 inputs too; two CUDA calls bitwise equal."""
    for dt in (torch.float64, torch.float32):
        xc, yc = torch.from_numpy(x).to(dt), torch.from_numpy(y).to(dt)
        v, (gx, gy) = NM.sinkhorn_divergence(xc.numpy(), yc.numpy(), 0.5, p, **TIGHT)
        cv, (cgx, cgy) = NM.sinkhorn_divergence(xc.to(cuda_device), yc.to(cuda_device), 0.5, p, **TIGHT)
        assert cv.device == cuda_device and cv.dtype == dt and cgx.dtype == dt and cgy.shape == yc.shape
        what = f"{label} p={p} {dt}"
        assert_close(cv.cpu(), v, "cuda", dt, what + " value")
        assert_close(cgx.cpu(), gx, "cuda", dt, what + " d/dx")
        assert_close(cgy.cpu(), gy, "cuda", dt, what + " d/dy")
        cv2, (cgx2, cgy2) = NM.sinkhorn_divergence(xc.to(cuda_device), yc.to(cuda_device), 0.5, p, **TIGHT)
        for a, b, n in ((cv, cv2, "value"), (cgx, cgx2, "d/dx"), (cgy, cgy2, "d/dy")):
            assert torch.equal(a, b), f"{what} {n}: two CUDA calls differ"


@TIGHT_WARNS
@pytest.mark.cuda
@pytest.mark.parametrize(("label", "x", "y"), OT_CLOUDS[:3], ids=[c[0] for c in OT_CLOUDS[:3]])
def test_cuda_sinkhorn_plan_and_torch_op(label, x, y, cuda_device):
    """The other users of the CUDA loop: ot_coupling's 'sinkhorn' plan (not debiased) and the torch
    op's value and autograd gradients, CUDA vs CPU; the default tol against the reference."""
    b = min(len(x), len(y))
    x0, x1 = x[:b], y[:b]
    plan = NM.ot_coupling(x0, x1, "sinkhorn", 0.5, **TIGHT)
    cplan = T.ot_coupling(torch.from_numpy(x0).to(cuda_device), torch.from_numpy(x1).to(cuda_device),
                          "sinkhorn", 0.5, **TIGHT)  # fmt: skip
    assert cplan.device == cuda_device
    assert_close(cplan.cpu(), plan, "cuda", torch.float64, f"{label} plan")
    xt, yt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y).requires_grad_()
    xc = torch.from_numpy(x).to(cuda_device).requires_grad_()
    yc = torch.from_numpy(y).to(cuda_device).requires_grad_()
    v = T.sinkhorn_divergence(xt, yt, 0.5, **TIGHT)
    cv = T.sinkhorn_divergence(xc, yc, 0.5, **TIGHT)
    (2 * v).backward()
    (2 * cv).backward()
    assert_close(cv.detach().cpu(), v.detach(), "cuda", torch.float64, f"{label} torch value")
    assert_close(xc.grad.cpu(), xt.grad, "cuda", torch.float64, f"{label} torch d/dx")
    assert_close(yc.grad.cpu(), yt.grad, "cuda", torch.float64, f"{label} torch d/dy")
    # the default tol: the rounds may differ by one where the largest change sits at tol * eps
    ref = float(RM.sinkhorn_divergence(x, y, 0.5))
    dv = float(NM.sinkhorn_divergence(xc.detach(), yc.detach(), 0.5, need_grad=False)[0])
    assert dv == pytest.approx(ref, rel=1e-7, abs=1e-9), label


@pytest.mark.cuda
def test_cuda_sinkhorn_nan_and_capture(cuda_device):
    """NaN in, NaN out (no kernel runs); the loop refuses CUDA graph capture, saying why."""
    x = torch.zeros((4, 2), device=cuda_device, dtype=torch.float64)
    bad = x.clone()
    bad[0, 1] = float("nan")
    v, (gx, gy) = NM.sinkhorn_divergence(bad, x + 1, 0.5)
    assert torch.isnan(v) and torch.isnan(gx).all() and torch.isnan(gy).all()
    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="CUDA graph capture"), torch.cuda.graph(graph, stream=side):
        NM.sinkhorn_divergence(x, x + 1, 0.5)


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
def test_overflowing_spread_is_a_clear_error_not_a_hang(layer):
    """Finite points whose bounding-box diameter (or its p-th power) overflows float64 made the
    epsilon schedule start at inf, and inf * scaling never drops below eps: the loop never
    ended. Now every layer says which op and why (the costs overflow too)."""
    x = np.array([[1e155, 0.0], [-1e155, 1.0]])  # diameter^2 = 4e310: inf
    y = np.array([[0.0, 0.0], [1.0, 2.0]])
    big = np.array([[1e200, 0.0], [-1e200, 1.0]])  # diameter finite (2e200), diameter^2 overflows
    for pts in (x, big):
        with pytest.raises(ValueError, match="sinkhorn_divergence: the points' spread"):
            if layer == "reference":
                RM.sinkhorn_divergence(pts, y, 0.5)
            elif layer == "native":
                gn.sinkhorn_divergence(pts, y, 0.5)
            else:
                T.sinkhorn_divergence(torch.from_numpy(pts), torch.from_numpy(y), 0.5)
        if layer != "reference":
            with pytest.raises(ValueError, match="ot_coupling: the points' spread"):
                if layer == "native":
                    gn.ot_coupling(pts, y, method="sinkhorn")
                else:
                    T.ot_coupling(torch.from_numpy(pts), torch.from_numpy(y), method="sinkhorn")
