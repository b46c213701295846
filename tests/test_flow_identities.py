r"""Identities of the continuous-time (flow) family, checked against values computed here.

Every assertion compares ``genloss.reference.flow`` (or the native kernel) with a value
computed independently of it: the formulas written out per sample, central finite
differences, SD3's cosmap sampler and its inverse, quadrature (``scipy.integrate.quad``),
Lipman et al.'s path formula, and, when installed, torchcfm and diffusers.  The
equations are derived in ``derivations/flow.md`` (tags ``FLOW.n``).  Time runs from
data (t = 0) to noise (t = 1).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import genloss.native as gn
from fd import check_fd, grad_output
from genloss.reference import flow as R
from peers import peer
from tolerances import assert_close

REDUCTIONS = ("none", "sum", "mean")
# Closed forms vs the reference: a handful of O(1) float64 operations per element.
TIGHT = dict(rtol=1e-12, atol=1e-13)
SIGMA_MINS = (0.0, 1e-4, 0.1)


def _draw(rng, shape, lo=0.05, hi=0.95):
    """pred, x0, noise ~ N(0, 1) and interior times (central differences step both ways)."""
    pred, x0, noise = (rng.standard_normal(shape) for _ in range(3))
    return pred, x0, noise, rng.uniform(lo, hi, size=shape[0])


def _lam(t, weighting):
    """lambda(t) as SD3 / diffusers write it (the expanded cosmap denominator)."""
    if weighting == "none":
        return np.ones_like(t)
    if weighting == "sigma_sqrt":
        return t**-2.0
    return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))


def _direct_loss(pred, x0, noise, t, weighting, sigma_min, weights, reduction):
    """The loss written out sample by sample (FLOW.2)."""
    c = 1.0 - sigma_min
    per = np.array(
        [
            _lam(t[b : b + 1], weighting)[0] * np.mean((pred[b] - (noise[b] - c * x0[b])) ** 2)
            for b in range(pred.shape[0])
        ]
    )
    if weights is not None:
        per = per * weights
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


# ============================================================================= FLOW.1


@pytest.mark.parametrize("sigma_min", SIGMA_MINS)
def test_interpolant_closed_form_and_velocity(sigma_min):
    """(FLOW.1) x_t against the line written out, its end points, and dx_t/dt = noise - c x0."""
    rng = np.random.default_rng(1)
    _, x0, noise, t = _draw(rng, (5, 3, 2))
    t[0], t[1] = 0.0, 1.0
    c = 1.0 - sigma_min
    xt = R.flow_interpolant(x0, noise, t, sigma_min)
    for b in range(5):
        np.testing.assert_allclose(xt[b], (1.0 - c * t[b]) * x0[b] + t[b] * noise[b], **TIGHT)
    np.testing.assert_array_equal(xt[0], x0[0])  # t = 0: the data, exactly
    np.testing.assert_allclose(xt[1], noise[1] + sigma_min * x0[1], **TIGHT)  # t = 1 (FLOW.5)
    h = 1e-6
    inner = np.full(5, 0.5)
    fd = (
        R.flow_interpolant(x0, noise, inner + h, sigma_min)
        - R.flow_interpolant(x0, noise, inner - h, sigma_min)
    ) / (2 * h)
    np.testing.assert_allclose(fd, noise - c * x0, rtol=1e-8, atol=1e-8)


# ============================================================================= FLOW.2


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", R.FLOW_WEIGHTINGS)
@pytest.mark.parametrize("sigma_min", (0.0, 0.1))
def test_loss_equals_direct_formula(reduction, weighting, sigma_min):
    """(FLOW.2, FLOW.3) the value against the per-sample formula, with and without weights."""
    rng = np.random.default_rng(2)
    pred, x0, noise, t = _draw(rng, (6, 4, 3), lo=0.0, hi=1.0)
    t[-1] = 1.0
    if weighting != "sigma_sqrt":
        t[0] = 0.0
    for weights in (None, rng.uniform(0.0, 2.0, size=6)):
        got = R.flow_matching_loss(pred, x0, noise, t, weighting, sigma_min, weights, reduction)
        want = _direct_loss(pred, x0, noise, t, weighting, sigma_min, weights, reduction)
        np.testing.assert_allclose(got, want, **TIGHT)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2), (1, 5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_fd(shape, reduction):
    """(FLOW.1, FLOW.2) every gradient (pred, x0, noise, t, weights) against central differences."""
    rng = np.random.default_rng(3 + len(shape))
    pred, x0, noise, t = _draw(rng, shape)
    w = rng.uniform(0.1, 2.0, size=shape[0])
    go = grad_output(rng, reduction, shape[0])
    for weighting in R.FLOW_WEIGHTINGS:
        for sigma_min in (0.0, 0.1):
            kw = dict(weighting=weighting, sigma_min=sigma_min, reduction=reduction)
            check_fd(
                f"flow_matching_loss({weighting}, {sigma_min})",
                lambda p, a, e, tt, ww, kw=kw: R.flow_matching_loss(p, a, e, tt, weights=ww, **kw),
                lambda p, a, e, tt, ww, g, kw=kw: R.flow_matching_loss_backward(
                    p, a, e, tt, g, weights=ww, **kw
                ),
                [pred, x0, noise, t, w],
                go,
                (0, 1, 2, 3, 4),
            )
    # without weights: four gradients, in order
    check_fd(
        "flow_matching_loss(cosmap, no weights)",
        lambda p, a, e, tt: R.flow_matching_loss(p, a, e, tt, "cosmap", reduction=reduction),
        lambda p, a, e, tt, g: R.flow_matching_loss_backward(p, a, e, tt, g, "cosmap", reduction=reduction),
        [pred, x0, noise, t],
        go,
        (0, 1, 2, 3),
    )
    up = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    check_fd(
        "flow_interpolant",
        lambda a, e, tt: R.flow_interpolant(a, e, tt, 0.1),
        lambda a, e, tt, g: R.flow_interpolant_backward(a, e, tt, g, 0.1),
        [x0, noise, t],
        up,
        (0, 1, 2),
    )


def _flag_sets(n):
    return [
        True,
        False,
        (True,) + (False,) * (n - 1),
        (False,) * (n - 1) + (True,),
        (False, False, False, True) + (False,) * (n - 4),
    ]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighting", R.FLOW_WEIGHTINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_native_matches_reference_every_gradient(dtype, weighting, reduction):
    """(FLOW.2) the fused kernel's value and each requested gradient (any subset) against the
    float64 reference on the same inputs, t and weights included."""
    rng = np.random.default_rng(4)
    shape = (7, 5, 3)
    pred, x0, noise, t = (a.astype(dtype) for a in _draw(rng, shape, lo=0.0, hi=1.0))
    t[-1] = 1.0
    if weighting != "sigma_sqrt":
        t[0] = 0.0
    w = rng.uniform(0.0, 2.0, size=shape[0]).astype(dtype)
    ones = np.ones(shape[0]) if reduction == "none" else 1.0
    for weights in (None, w):
        kw = dict(weighting=weighting, sigma_min=0.1, weights=weights, reduction=reduction)
        want_value = R.flow_matching_loss(pred, x0, noise, t, **kw)
        want = R.flow_matching_loss_backward(pred, x0, noise, t, ones, **kw)
        n = len(want)
        for flags in _flag_sets(n):
            value, grads = gn.flow_matching_loss(pred, x0, noise, t, **kw, need_grad=flags)
            assert_close(value, want_value, "native", dtype, f"value {flags}")
            asked = (flags,) * n if isinstance(flags, bool) else flags
            if not any(asked):
                assert grads == ()
                continue
            for k, (g, ref, on) in enumerate(zip(grads, want, asked, strict=True)):
                if not on:
                    assert g is None, f"grad {k} written though not asked"
                    continue
                assert g.dtype == dtype and g.shape == ref.shape
                assert_close(g, ref, "native", dtype, f"grad {k} {flags}")
    # the path: x_t and its three gradients (of sum(x_t))
    xt, (gx, gn_, gt) = gn.flow_interpolant(x0, noise, t, 0.1)
    assert_close(xt, R.flow_interpolant(x0, noise, t, 0.1), "native", dtype, "x_t")
    for g, ref in zip(
        (gx, gn_, gt), R.flow_interpolant_backward(x0, noise, t, np.ones(shape), 0.1), strict=True
    ):
        assert_close(g, ref, "native", dtype, "flow_interpolant grad", scale=float(np.prod(shape[1:])))


def test_one_pass_allocates_no_target():
    """(FLOW.2) the fused kernel allocates no x_t or target: on 4M-element float32 inputs the peak
    of new NumPy memory is the requested gradients and nothing else of the inputs' size."""
    rng = np.random.default_rng(5)
    shape = (16, 512, 512)  # 4M elements, 16 MiB per input
    pred, x0, noise = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    t = rng.uniform(0.0, 1.0, size=16).astype(np.float32)
    one = pred.nbytes
    gn.flow_matching_loss(pred, x0, noise, t, "cosmap", need_grad=False)  # warm up (caches, lazy imports)
    for flags, budget in (
        (False, 0.05 * one),  # value only: B-sized vectors
        ((True, False, False, True), 1.05 * one),  # d/dpred and d/dt: one input's size
        (True, 3.05 * one),  # all five: exactly the three elementwise gradients
    ):
        tracemalloc.start()
        tracemalloc.reset_peak()
        value, grads = gn.flow_matching_loss(pred, x0, noise, t, "cosmap", need_grad=flags)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert np.isfinite(value)
        assert peak < budget, f"need_grad={flags}: peak {peak / one:.2f} input sizes > {budget / one:.2f}"
    # and the composite a user writes does allocate the target (the measurement sees arrays)
    tracemalloc.start()
    target = noise - x0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del target
    assert peak >= one


# ============================================================================= FLOW.3


@pytest.mark.parametrize("weighting", R.FLOW_WEIGHTINGS)
def test_weightings_against_definitions(weighting):
    """(FLOW.3) lambda(t) against SD3 / diffusers' formulas, lambda'(t) against central
    differences, the end-point values, and cosmap's symmetry about t = 1/2."""
    t = np.concatenate([[0.0, 0.5, 1.0], np.random.default_rng(6).uniform(0.0, 1.0, 50)])
    if weighting == "sigma_sqrt":
        t = t[1:]
    w, slope = R.flow_weight(t, weighting)
    np.testing.assert_allclose(w, _lam(t, weighting), **TIGHT)
    h = 1e-6
    inner = np.clip(t, 2 * h, 1.0 - 2 * h)
    fd = (_lam(inner + h, weighting) - _lam(inner - h, weighting)) / (2 * h)
    np.testing.assert_allclose(R.flow_weight(inner, weighting)[1], fd, rtol=1e-7, atol=1e-7)
    if weighting == "cosmap":
        np.testing.assert_allclose(w[:3], [2 / math.pi, 4 / math.pi, 2 / math.pi], **TIGHT)
        np.testing.assert_allclose(R.flow_weight(1.0 - t, "cosmap")[0], w, **TIGHT)
        assert slope[1] == 0.0  # the maximum
    if weighting == "sigma_sqrt":
        assert w[1] == 1.0 and slope[1] == -2.0  # t = 1


def test_cosmap_is_the_density_of_cosmap_sampling():
    """(FLOW.3) SD3's cosmap sampler t = 1 - 1/(tan(pi u/2) + 1): the 'cosmap' weight is the
    derivative of its inverse, integrates to that inverse, and weighting a uniform-t loss by
    it equals the loss under cosmap-sampled t (change of variables)."""
    quad = pytest.importorskip("scipy.integrate").quad

    def f(u):
        return 1.0 - 1.0 / (math.tan(math.pi * u / 2) + 1.0)

    def f_inv(t):
        return 2.0 / math.pi * math.atan2(t, 1.0 - t)

    for t in (0.0, 0.1, 0.5, 0.77, 1.0):
        assert abs(f(f_inv(t)) - t) < 1e-12 if t < 1.0 else True
        integral, _ = quad(lambda s: float(R.flow_weight(np.array([s]), "cosmap")[0][0]), 0.0, t)
        assert abs(integral - f_inv(t)) < 1e-10, (t, integral, f_inv(t))
    for t in (0.05, 0.3, 0.5, 0.9):
        h = 1e-6
        d = (f_inv(t + h) - f_inv(t - h)) / (2 * h)
        assert abs(float(R.flow_weight(np.array([t]), "cosmap")[0][0]) - d) < 1e-8
    # a loss that varies with t: pred = a t + b against a fixed target
    rng = np.random.default_rng(7)
    a, b, x0, noise = (rng.standard_normal((1, 6)) for _ in range(4))

    def loss(t, weighting):
        return float(R.flow_matching_loss(a * t + b, x0, noise, np.array([t]), weighting))

    sampled, _ = quad(lambda u: loss(f(u), "none"), 0.0, 1.0, epsabs=1e-12)
    weighted, _ = quad(lambda t: loss(t, "cosmap"), 0.0, 1.0, epsabs=1e-12)
    assert abs(sampled - weighted) < 1e-8 * max(1.0, abs(weighted))


def test_end_points_in_float32():
    """(FLOW.3) at t = 0 and t = 1 every weighting is finite, with finite gradients, in float32
    (native and reference), or the op raises a ValueError naming t and the end point."""
    rng = np.random.default_rng(8)
    pred, x0, noise = (rng.standard_normal((4, 8)).astype(np.float32) for _ in range(3))
    w = np.full(4, 0.5, dtype=np.float32)
    for weighting, t in (
        ("none", [0.0, 1.0, 0.5, 1e-7]),
        ("cosmap", [0.0, 1.0, 0.5, 1e-7]),
        ("sigma_sqrt", [1.0, 1e-3, 0.5, 1e-6]),
    ):
        t = np.array(t, dtype=np.float32)
        value, grads = gn.flow_matching_loss(pred, x0, noise, t, weighting, 0.1, w, "none")
        assert np.all(np.isfinite(value)) and all(np.all(np.isfinite(g)) for g in grads), weighting
        want = R.flow_matching_loss(pred, x0, noise, t, weighting, 0.1, w, "none")
        assert_close(value, want, "native", np.float32, f"{weighting} at the end points")
    bad = {
        "t = 0": np.array([0.0, 0.5, 1.0, 1.0], dtype=np.float32),  # sigma_sqrt's end point
        "overflows": np.array([1e-30, 0.5, 1.0, 1.0], dtype=np.float32),  # t^-2 > float32 max
    }
    for what, t in bad.items():
        for fn in (gn.flow_matching_loss, R.flow_matching_loss):
            if fn is R.flow_matching_loss and what == "overflows":
                t = np.array([1e-200, 0.5, 1.0, 1.0])  # float64's version of the same
            with pytest.raises(ValueError, match=what) as info:
                fn(pred, x0, noise, t, "sigma_sqrt")
            assert "flow_matching_loss" in str(info.value) and "t" in str(info.value)
    for t_bad in (-0.25, 1.25, float("nan")):
        t = np.array([t_bad, 0.5, 0.5, 0.5], dtype=np.float32)
        for fn in (gn.flow_matching_loss, R.flow_matching_loss):
            with pytest.raises(ValueError, match="flow_matching_loss: t must"):
                fn(pred, x0, noise, t, "cosmap")
        for fn in (gn.flow_interpolant, R.flow_interpolant):
            with pytest.raises(ValueError, match="flow_interpolant: t must"):
                fn(x0, noise, t)
    for fn in (gn.flow_matching_loss, R.flow_matching_loss):
        with pytest.raises(ValueError, match="flow_matching_loss: sigma_min"):
            fn(pred, x0, noise, np.full(4, 0.5, dtype=np.float32), sigma_min=1.0)


def test_diffusers_sd3_weighting_and_loss():
    """(FLOW.3) diffusers' ``compute_loss_weighting_for_sd3`` and the SD3 training loss as
    diffusers' train_dreambooth_sd3 script writes it (sigmas = t, target = noise - x0)."""
    torch = pytest.importorskip("torch")
    compute_loss_weighting_for_sd3 = peer("diffusers.training_utils").compute_loss_weighting_for_sd3

    rng = np.random.default_rng(9)
    B = 6
    pred, x0, noise = (rng.standard_normal((B, 3, 4, 4)) for _ in range(3))
    t = rng.uniform(0.0, 1.0, size=B)
    t[-1] = 1.0
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        sigmas = torch.from_numpy(t).reshape(B, 1, 1, 1)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
        # diffusers returns 'sigma_sqrt' rounded to float32 (its .float()): compared at that precision
        tol = dict(rtol=1e-6) if scheme == "sigma_sqrt" else TIGHT
        np.testing.assert_allclose(weighting.reshape(B).numpy(), R.flow_weight(t, scheme)[0], **tol)
        model_pred, model_input, noise_t = (torch.from_numpy(a) for a in (pred, x0, noise))
        target = noise_t - model_input
        loss = torch.mean(
            (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(B, -1), 1
        ).mean()
        ours = R.flow_matching_loss(pred, x0, noise, t, scheme)
        np.testing.assert_allclose(float(loss), ours, rtol=1e-5)  # the script computes in float32


# ============================================================================= FLOW.4


@pytest.mark.parametrize("sigma_min", SIGMA_MINS)
def test_velocity_mse_equals_x0_and_eps_losses(sigma_min):
    """(FLOW.4) a velocity prediction's flow-matching loss is its x0-MSE / t^2 and its
    eps-MSE / (1 - c t)^2; with sigma_min = 0, x0-MSE = eps-MSE / snr, snr = (1-t)^2/t^2."""
    rng = np.random.default_rng(10)
    pred, x0, noise, t = _draw(rng, (8, 3, 5))
    c = 1.0 - sigma_min
    flow = R.flow_matching_loss(pred, x0, noise, t, sigma_min=sigma_min, reduction="none")
    xt = R.flow_interpolant(x0, noise, t, sigma_min)
    tb = t[:, None, None]
    x0_hat = xt - tb * pred
    eps_hat = c * xt + (1.0 - c * tb) * pred
    x0_mse = ((x0 - x0_hat) ** 2).mean(axis=(1, 2))
    eps_mse = ((noise - eps_hat) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(t**2 * flow, x0_mse, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose((1.0 - c * t) ** 2 * flow, eps_mse, rtol=1e-11, atol=1e-13)
    if sigma_min == 0.0:
        snr = (1.0 - t) ** 2 / t**2
        np.testing.assert_allclose(x0_mse, eps_mse / snr, rtol=1e-10)


# ============================================================================= FLOW.5


@pytest.mark.parametrize("sigma_min", SIGMA_MINS)
def test_sigma_min_is_lipmans_path_from_data(sigma_min):
    """(FLOW.5) SPEC's path is Lipman et al.'s psi_t = (1 - (1 - s) t) x + t x1 with the data as
    its source x and the noise as x1; Lipman's own (noise -> data) path, reversed into the SD3
    direction, differs from it by s (t x0 - (1 - t) noise), zero at s = 0."""
    rng = np.random.default_rng(11)
    pred, x0, noise, t = _draw(rng, (5, 4), lo=0.0, hi=1.0)

    def psi(x, x1, tt, s):  # Lipman et al. 2023, Eq. 22
        return (1.0 - (1.0 - s) * tt[:, None]) * x + tt[:, None] * x1

    ours = R.flow_interpolant(x0, noise, t, sigma_min)
    np.testing.assert_allclose(ours, psi(x0, noise, t, sigma_min), **TIGHT)
    lipman_sd3 = psi(noise, x0, 1.0 - t, sigma_min)  # noise source, data target, t -> 1 - t
    np.testing.assert_allclose(
        ours - lipman_sd3, sigma_min * (t[:, None] * x0 - (1.0 - t[:, None]) * noise), rtol=1e-10, atol=1e-14
    )
    # Lipman's velocity x1 - (1 - s) x (data source) is the loss's target: zero loss there
    v = noise - (1.0 - sigma_min) * x0
    assert R.flow_matching_loss(v, x0, noise, t, sigma_min=sigma_min) == 0.0


def test_torchcfm_direction_mapping():
    """(FLOW.5) torchcfm (noise at t' = 0, data at t' = 1): ConditionalFlowMatcher(sigma=0) with
    x0' = noise, x1' = data, t' = 1 - t gives our x_t and u' = -u (its training loss equals
    ours with pred' = -pred); TargetConditionalFlowMatcher(sigma) is our sigma_min path with
    its noise slot holding the data."""
    torch = pytest.importorskip("torch")
    cfm_mod = peer("torchcfm.conditional_flow_matching")
    ConditionalFlowMatcher, TargetConditionalFlowMatcher = (
        cfm_mod.ConditionalFlowMatcher,
        cfm_mod.TargetConditionalFlowMatcher,
    )

    rng = np.random.default_rng(12)
    B = 7
    pred, x0, noise, t = _draw(rng, (B, 2, 3), lo=0.0, hi=1.0)
    T = torch.from_numpy
    cfm = ConditionalFlowMatcher(sigma=0.0)
    _, xt, ut = cfm.sample_location_and_conditional_flow(T(noise), T(x0), t=T(1.0 - t))
    np.testing.assert_allclose(xt.numpy(), R.flow_interpolant(x0, noise, t), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ut.numpy(), -(noise - x0), **TIGHT)
    their_loss = torch.mean((T(-pred) - ut) ** 2)  # torchcfm's examples: mean((vt - ut)^2)
    np.testing.assert_allclose(float(their_loss), R.flow_matching_loss(pred, x0, noise, t), **TIGHT)
    # torchcfm divides by 1 - (1 - sigma) t to get u from x_t: interior times keep that exact enough
    t = rng.uniform(0.05, 0.95, size=B)
    for sigma in (0.0, 0.1):
        target = TargetConditionalFlowMatcher(sigma=sigma)
        _, xt, ut, eps = target.sample_location_and_conditional_flow(
            T(x0), T(noise), t=T(t), return_noise=True
        )
        data = eps.numpy()  # its source slot: our data
        np.testing.assert_allclose(
            xt.numpy(), R.flow_interpolant(data, noise, t, sigma), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(ut.numpy(), noise - (1.0 - sigma) * data, rtol=1e-9, atol=1e-9)


def test_torch_interpolant_is_differentiable_to_second_order():
    """(FLOW.1) genloss.torch.flow_interpolant is a composite of torch ops (no fused kernel to
    protect): first and second derivatives w.r.t. x0, noise and t by gradcheck / gradgradcheck."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    gen = torch.Generator().manual_seed(13)
    x0, noise = (
        torch.randn(3, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2)
    )
    t = torch.rand(3, dtype=torch.float64, generator=gen).clamp(0.05, 0.95).requires_grad_(True)

    def fn(a, e, tt):
        return gt.flow_interpolant(a, e, tt, 0.1)

    assert torch.autograd.gradcheck(fn, (x0, noise, t))
    assert torch.autograd.gradgradcheck(fn, (x0, noise, t))
    with pytest.raises(ValueError, match="flow_interpolant: t must"):
        gt.flow_interpolant(x0, noise, t + 2.0)
