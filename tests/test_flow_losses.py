r"""The losses of the continuous-time (flow) family: pseudo-Huber, EDM's denoiser loss, iCT.

Every assertion compares ``genloss.reference.flow`` (or the native kernel, or the torch op)
with a value computed independently of it: the formulas written out per sample in D-space
with EDM's c_skip and c_out, the Taylor limits of the pseudo-Huber metric, central finite
differences, the closed-form optimum of EDM2's log-variance, k-diffusion's ``Denoiser.loss``
(its lines transcribed, and the package itself when it imports), and the Karras grid.  The
equations are derived in ``derivations/flow.md`` (tags FLOW.20-FLOW.24).
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
WEIGHTINGS = R.DENOISER_WEIGHTINGS
SD = 0.5  # EDM's sigma_data


def _norm2(d):
    return (d * d).reshape(d.shape[0], -1).sum(axis=1)


def _reduce(per, reduction):
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


def _edm_scalings(sigma, sd=SD):
    """EDM Table 1, written as the paper does."""
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / np.sqrt(sigma**2 + sd**2)
    return c_skip, c_out


def _lam(sigma, weighting, sd=SD, gamma=5.0):
    """lambda(sigma) of each weighting in D-space (FLOW.22's table, from its sources)."""
    if weighting in ("edm", "karras"):
        return (sigma**2 + sd**2) / (sigma * sd) ** 2
    if weighting == "snr":
        return 1.0 / sigma**2
    if weighting == "soft_min_snr":
        return 1.0 / (sigma**2 + sd**2)
    return np.minimum(1.0 / sigma**2, gamma)


def _direct_denoiser(F, x0, noise, sigma, weighting, sd=SD, logvar=None, gamma=5.0):
    """Per sample lambda(sigma) mean (D - x0)^2 with D = c_skip x_sigma + c_out F (FLOW.21), float64."""
    per = []
    for b in range(F.shape[0]):
        c_skip, c_out = _edm_scalings(sigma[b], sd)
        D = c_skip * (x0[b] + sigma[b] * noise[b]) + c_out * F[b]
        v = _lam(sigma[b], weighting, sd, gamma) * np.mean((D - x0[b]) ** 2)
        per.append(v if logvar is None else math.exp(-logvar[b]) * v + logvar[b])
    return np.array(per)


# ============================================================================= FLOW.20 pseudo-Huber


def test_pseudo_huber_limits():
    """(FLOW.20) -> ||d||^2 / 2c for ||d|| << c and ||d|| - c for ||d|| >> c (Taylor remainders
    s^2/8c^3 and c^2/(2||d||)), and the exact value sqrt(s + c^2) - c in between."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5))
    d = rng.standard_normal((4, 3, 5))
    c = 0.7
    for scale in (1e-6, 1e-4):  # small: s/c^2 ~ 1e-10 .. 1e-6
        y = x - scale * d
        s = _norm2(x - y)  # the difference as stored (x - y is not exactly scale * d)
        got = R.pseudo_huber_loss(x, y, c, reduction="none")
        np.testing.assert_allclose(got, s / (2 * c), rtol=2 * s.max() / (8 * c**2) + 1e-15)
    for scale in (1e4, 1e6):  # large
        y = x - scale * d
        nrm = np.sqrt(_norm2(x - y))
        got = R.pseudo_huber_loss(x, y, c, reduction="none")
        np.testing.assert_allclose(got, nrm - c, rtol=0, atol=c**2 / nrm.min() + 1e-9 * nrm.max())
    y = x - d
    s = _norm2(d)
    np.testing.assert_allclose(
        R.pseudo_huber_loss(x, y, c, reduction="none"), np.sqrt(s + c * c) - c, rtol=1e-13
    )
    # the default c is iCT's 0.00054 sqrt(n), n = 15 elements per sample
    c0 = 0.00054 * math.sqrt(15)
    np.testing.assert_allclose(
        R.pseudo_huber_loss(x, y, reduction="none"), np.sqrt(s + c0**2) - c0, rtol=1e-13
    )
    value, _ = gn.pseudo_huber_loss(x, y, reduction="none")
    np.testing.assert_allclose(value, np.sqrt(s + c0**2) - c0, rtol=1e-13)


def test_pseudo_huber_float32_no_cancellation():
    """(FLOW.20) float32 at ||d||^2 ~ 1e-7 c^2: the kernel's s/(q + c) keeps every digit (vs float64),
    where the textbook sqrt(s + c^2) - c in float32 loses them all."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    c = 0.03
    y = (x - 1e-6 * rng.standard_normal((6, 64))).astype(np.float32)
    d64 = x.astype(np.float64) - y.astype(np.float64)
    s = _norm2(d64)
    want = s / (np.sqrt(s + c * c) + c)  # float64 (no cancellation beyond float64's)
    got, (gx, gy) = gn.pseudo_huber_loss(x, y, c, reduction="none")
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(gx, d64 / np.sqrt(s + c * c)[:, None], rtol=2e-5, atol=0)
    np.testing.assert_array_equal(gy, -gx)
    d32 = x - y
    naive = np.sqrt((d32 * d32).sum(axis=1) + np.float32(c * c)) - np.float32(c)
    assert np.max(np.abs(naive / want - 1.0)) > 0.5  # the cancelling form: wrong at these sizes


def test_pseudo_huber_at_extreme_magnitudes():
    """(FLOW.20) The reference forms no square: ||x - y|| = 2e160 gives h = ||x - y|| - c (to
    float64's rounding) and the gradient (x - y)/q = 1/2 per element, not NaN and 0; a c whose
    square underflows float64 gives the gradient 0 at x = y (closed form), not NaN. The kernels
    form c^2 in the data's dtype: float32 refuses such a c by name, float64 takes c = 1e-150."""
    x, y = np.full((1, 4), 1e160), np.zeros((1, 4))
    np.testing.assert_allclose(R.pseudo_huber_loss(x, y, c=1.0), 2e160, rtol=1e-15)
    np.testing.assert_allclose(R.pseudo_huber_loss_backward(x, y, 1.0, c=1.0)[0], 0.5, rtol=1e-15)
    ones = np.ones((2, 4))
    np.testing.assert_array_equal(R.pseudo_huber_loss_backward(ones, ones, 1.0, c=1e-200)[0], 0.0)
    assert R.pseudo_huber_loss(np.full((1, 4), np.inf), y) == np.inf
    for bad in (1e-30, 1e20):
        with pytest.raises(ValueError, match=r"pseudo_huber_loss: c must lie in \[1.08e-19, 1.84e\+19\]"):
            gn.pseudo_huber_loss(ones.astype(np.float32), ones.astype(np.float32), c=bad)
        with pytest.raises(ValueError, match=r"consistency_training_loss: c must lie in"):
            gn.consistency_training_loss(
                ones.astype(np.float32),
                ones.astype(np.float32),
                np.zeros(2, np.float32),
                np.ones(2, np.float32),
                c=bad,
            )
    value, (gx, _gy) = gn.pseudo_huber_loss(ones, ones, c=1e-150)
    assert float(value) == 0.0
    np.testing.assert_array_equal(gx, 0.0)


# ============================================================================= FLOW.21, FLOW.22 the denoiser loss


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_denoiser_equals_direct_d_space(weighting, reduction):
    """(FLOW.21, FLOW.22) the F-space value equals lambda(sigma) mean (D - x0)^2 computed in D-space
    in float64, sigma from 1e-3 to 1e3, with and without EDM2's log-variance; native too."""
    rng = np.random.default_rng(2)
    sigma = np.geomspace(1e-3, 1e3, 13)
    shape = (13, 3, 4)
    F, x0, noise = (rng.standard_normal(shape) for _ in range(3))
    for logvar in (None, rng.uniform(-2.0, 2.0, size=13)):
        want = _reduce(_direct_denoiser(F, x0, noise, sigma, weighting, logvar=logvar), reduction)
        got = R.denoiser_loss(F, x0, noise, sigma, SD, weighting, 5.0, logvar, reduction)
        # D - x0 in D-space loses ~eps / sigma^2 relative at sigma = 1e-3 (the reason for F-space)
        np.testing.assert_allclose(got, want, rtol=1e-9)
        value, _ = gn.denoiser_loss(
            F, x0, noise, sigma, SD, weighting, 5.0, logvar, reduction, need_grad=False
        )
        np.testing.assert_allclose(value, want, rtol=1e-9)


def test_denoiser_float32_small_sigma():
    """(FLOW.21) float32 at sigma = 1e-5 .. 1e-2: the kernel (F-space) agrees with a float64 evaluation
    of the same float32 inputs to float32 accuracy; the D-space float32 composite, a difference of
    O(1) numbers whose result is O(sigma), is off by orders of magnitude more."""
    rng = np.random.default_rng(3)
    shape = (4, 256)
    sigma = np.array([1e-5, 1e-4, 1e-3, 1e-2], dtype=np.float32)
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    # a good denoiser: F close to its target (the regime a trained model is in)
    a, b = (v[:, None] for v in R.denoiser_rows(sigma.astype(np.float64), SD, "edm", 5.0)[:2])
    F = (a * x0 + b * noise + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    want = _direct_denoiser(*(v.astype(np.float64) for v in (F, x0, noise, sigma)), "edm")
    got, _ = gn.denoiser_loss(F, x0, noise, sigma, SD, "edm", reduction="none", need_grad=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    kernel_err = np.max(np.abs(got / want - 1.0))
    c_skip, c_out = (v.astype(np.float32)[:, None] for v in _edm_scalings(sigma.astype(np.float64)))
    D = c_skip * (x0 + sigma[:, None] * noise) + c_out * F  # the D-space composite in float32
    lam = _lam(sigma.astype(np.float64), "edm").astype(np.float32)
    naive = lam * np.mean((D - x0) ** 2, axis=1)
    naive_err = np.max(np.abs(naive / want - 1.0))
    assert naive_err > 1e-2 and naive_err > 100 * kernel_err, (naive_err, kernel_err)


def test_denoiser_weightings_against_definitions():
    """(FLOW.22) W = lambda c_out^2 from each weighting's source; 'karras' = 'edm'; 'snr' is the
    eps-prediction MSE of the same denoiser; 'min_snr' the smaller of 'snr' and gamma; the slopes
    W' against central differences."""
    sigma = np.geomspace(1e-3, 1e3, 41)
    for weighting in WEIGHTINGS:
        _a, _b, w, dw, _k = R.denoiser_rows(sigma, SD, weighting, 5.0)
        _, c_out = _edm_scalings(sigma)
        np.testing.assert_allclose(w, _lam(sigma, weighting) * c_out**2, rtol=1e-12)
        h = 1e-4 * sigma  # central differences: O(h^2) = 1e-8 relative
        fd = (
            R.denoiser_rows(sigma + h, SD, weighting, 5.0)[2]
            - R.denoiser_rows(sigma - h, SD, weighting, 5.0)[2]
        ) / (2 * h)
        kink = np.abs(sigma - 5.0**-0.5) < 1e-3
        np.testing.assert_allclose(dw[~kink], fd[~kink], rtol=1e-6, atol=1e-8)
    rng = np.random.default_rng(4)
    F, x0, noise = (rng.standard_normal((41, 6)) for _ in range(3))
    for wa, wb in (("edm", "karras"),):
        np.testing.assert_array_equal(
            R.denoiser_loss(F, x0, noise, sigma, weighting=wa, reduction="none"),
            R.denoiser_loss(F, x0, noise, sigma, weighting=wb, reduction="none"),
        )
    # 'snr': lambda = 1/sigma^2 makes the x0 loss the eps loss: eps_hat = (x_sigma - D) / sigma
    c_skip, c_out = _edm_scalings(sigma[:, None])
    x_sigma = x0 + sigma[:, None] * noise
    D = c_skip * x_sigma + c_out * F
    eps_mse = np.mean(((x_sigma - D) / sigma[:, None] - noise) ** 2, axis=1)
    snr_loss = R.denoiser_loss(F, x0, noise, sigma, weighting="snr", reduction="none")
    np.testing.assert_allclose(snr_loss, eps_mse, rtol=1e-8)
    snr = R.denoiser_loss(F, x0, noise, sigma, weighting="snr", reduction="none")
    edm_x0 = R.denoiser_loss(F, x0, noise, sigma, weighting="edm", reduction="none") / _lam(sigma, "edm")
    np.testing.assert_allclose(
        R.denoiser_loss(F, x0, noise, sigma, weighting="min_snr", gamma=5.0, reduction="none"),
        np.minimum(snr, 5.0 * edm_x0),
        rtol=1e-12,
    )


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_denoiser_end_points_float32(weighting):
    """(FLOW.22) value and every gradient finite in float32 at sigma = 1e-30 and 1e30 (the limits
    sigma -> 0 and sigma -> inf) and equal to the float64 reference; sigma = 0, inf, NaN and
    sigma > 1e50 refused naming sigma."""
    rng = np.random.default_rng(5)
    shape = (4, 5)
    F, x0, noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    sigma = np.array([1e-30, 1e-3, 1e3, 1e30], dtype=np.float32)
    u = np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32)
    value, grads = gn.denoiser_loss(F, x0, noise, sigma, SD, weighting, logvar=u, reduction="none")
    want = R.denoiser_loss(F, x0, noise, sigma, SD, weighting, logvar=u, reduction="none")
    want_g = R.denoiser_loss_backward(
        F, x0, noise, sigma, np.ones(4), SD, weighting, logvar=u, reduction="none"
    )
    assert np.all(np.isfinite(value)) and all(np.all(np.isfinite(g)) for g in grads)
    assert_close(value, want, "native", np.float32, f"{weighting} value")
    for k, (g, ref) in enumerate(zip(grads, want_g, strict=True)):
        if k == 3:  # d/dsigma spans 1e-30 .. 1e30 in size: relative per entry
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-37)
        else:
            assert_close(g, ref, "native", np.float32, f"{weighting} grad {k}")
    for bad in (0.0, np.inf, np.nan):
        s = sigma.copy()
        s[1] = bad
        for fn in (R.denoiser_loss, gn.denoiser_loss):
            with pytest.raises(ValueError, match="sigma"):
                fn(F, x0, noise, s, SD, weighting)
    with pytest.raises(ValueError, match="sigma -> inf"):
        R.denoiser_loss(F, x0, noise, np.array([1.0, 1.0, 1.0, 1e60]), SD, weighting)


def test_denoiser_logvar_optimum():
    """(FLOW.23) at u* = ln(W m) the u-gradient vanishes and the per-sample value is 1 + ln(W m)
    (EDM2's uncertainty weighting normalises the loss by its own magnitude)."""
    rng = np.random.default_rng(6)
    shape = (5, 4, 3)
    F, x0, noise = (rng.standard_normal(shape) for _ in range(3))
    sigma = np.array([0.01, 0.1, 0.5, 3.0, 80.0])
    for weighting in WEIGHTINGS:
        plain = _direct_denoiser(F, x0, noise, sigma, weighting)  # W m = lambda mean (D - x0)^2
        u = np.log(plain)
        got = R.denoiser_loss(F, x0, noise, sigma, SD, weighting, logvar=u, reduction="none")
        np.testing.assert_allclose(got, 1.0 + u, rtol=1e-10)
        grads = R.denoiser_loss_backward(
            F, x0, noise, sigma, np.ones(5), SD, weighting, logvar=u, reduction="none"
        )
        np.testing.assert_allclose(grads[4], 0.0, atol=1e-9)
        _, ng = gn.denoiser_loss(F, x0, noise, sigma, SD, weighting, logvar=u, reduction="none")
        np.testing.assert_allclose(ng[4], 0.0, atol=1e-9)


def test_logvar_beyond_the_dtype_is_refused_by_name():
    """(FLOW.23) The kernels round the row weight e^-u to the data's dtype: float32 refuses
    u < -88.7 (e^90 overflows; times a zero residual it was NaN) and u > 88.7, naming logvar;
    inside, a zero residual gives exactly u per sample (closed form: e^-u 0 + u)."""
    z = np.zeros((2, 3), np.float32)
    sigma, t = np.ones(2, np.float32), np.full(2, 0.5, np.float32)
    for u in (-90.0, 90.0):
        lv = np.full(2, u, np.float32)
        with pytest.raises(ValueError, match=r"denoiser_loss: logvar must lie in \[-88.72, 88.72\]"):
            gn.denoiser_loss(z, z, z, sigma, logvar=lv)
        with pytest.raises(ValueError, match=r"scm_loss: logvar must lie in \[-88.72, 88.72\]"):
            gn.scm_loss(z, z, z, z, z, t, logvar=lv)
    lv = np.full(2, -80.0, np.float32)
    value, _ = gn.denoiser_loss(z, z, z, sigma, logvar=lv, reduction="none")
    np.testing.assert_array_equal(value, lv)
    value, _ = gn.scm_loss(z, z, z, z, z, t, logvar=lv, reduction="none")
    np.testing.assert_array_equal(value, lv)


def test_k_diffusion_formulas():
    """(FLOW.21, FLOW.22) k-diffusion's ``Denoiser.loss`` (v0.1.1, k_diffusion/layers.py), its lines
    transcribed: target = (input - c_skip noised_input) / c_out, mean (model_output - target)^2 times
    c_weight, with 'karras' 1, 'snr' sd^2/(s^2 + sd^2), 'soft-min-snr' (s sd)^2/(s^2 + sd^2)^2."""
    rng = np.random.default_rng(7)
    shape = (7, 2, 3)
    F, x0, noise = (rng.standard_normal(shape) for _ in range(3))
    sigma = np.exp(rng.uniform(-4.0, 4.0, size=7))
    for sd in (0.5, 1.0):
        s = sigma[:, None, None]
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2) ** 0.5
        noised_input = x0 + noise * s
        target = (x0 - c_skip * noised_input) / c_out
        mse = ((F - target) ** 2).reshape(7, -1).mean(1)
        weights = {
            "karras": np.ones_like(sigma),
            "snr": sd**2 / (sigma**2 + sd**2),
            "soft_min_snr": (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2,
        }
        for weighting, c_weight in weights.items():
            got = R.denoiser_loss(F, x0, noise, sigma, sd, weighting, reduction="none")
            np.testing.assert_allclose(got, mse * c_weight, rtol=1e-12)


def test_k_diffusion_denoiser_loss():
    """(FLOW.21) k-diffusion's own ``Denoiser.loss`` with an inner model returning a fixed F
    (skipped when k-diffusion does not import: its package pulls in torchvision, CLIP, ...).
    Each weighting the installed k-diffusion knows: the PyPI release (0.1.1.post1) has 'karras'
    and 'soft-min-snr'; its repository later added 'snr' (a ValueError in the release)."""
    k_diffusion = peer("k_diffusion")
    import torch

    import genloss.torch as gl

    rng = np.random.default_rng(8)
    shape = (6, 3, 4)
    F, x0, noise = (torch.from_numpy(rng.standard_normal(shape)) for _ in range(3))
    sigma = torch.from_numpy(np.exp(rng.uniform(-4.0, 4.0, size=6)))
    compared = []
    for ours, theirs in (("karras", "karras"), ("snr", "snr"), ("soft_min_snr", "soft-min-snr")):
        try:
            model = k_diffusion.layers.Denoiser(lambda x, s: F, sigma_data=0.5, weighting=theirs)
        except ValueError:  # "Unknown weighting type": not in this version of k-diffusion
            continue
        compared.append(theirs)
        want = model.loss(x0, noise, sigma)
        got = gl.denoiser_loss(F, x0, noise, sigma, 0.5, ours, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert {"karras", "soft-min-snr"} <= set(compared), compared  # in every release


def test_denoiser_one_pass_allocates_no_target():
    """(FLOW.21) the fused kernel allocates no x_sigma, D or target: on 4M-element float32 inputs the
    peak of new NumPy memory is the requested gradients and nothing else of the inputs' size."""
    rng = np.random.default_rng(9)
    shape = (16, 512, 512)
    F, x0, noise = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    sigma = np.exp(rng.uniform(-4.0, 4.0, size=16)).astype(np.float32)
    nbytes = F.nbytes
    for flags, n_out in (((False,) * 4, 0), ((True, False, False, False), 1), ((True, True, True, True), 3)):
        tracemalloc.start()
        gn.denoiser_loss(F, x0, noise, sigma, weighting="snr", need_grad=flags)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < n_out * nbytes + nbytes // 8, (flags, peak / nbytes)


# ============================================================================= FLOW.24 consistency training


def test_consistency_training_on_karras_pairs():
    """(FLOW.24) on adjacent levels of the Karras grid: lambda = 1/(sigma_(i+1) - sigma_i) times the
    pseudo-Huber distance, written out; native and reference; f_target's gradient not returned."""
    rng = np.random.default_rng(10)
    n_levels, rho, smin, smax = 11, 7.0, 0.002, 80.0
    ramp = np.linspace(0.0, 1.0, n_levels)
    grid = (smin ** (1 / rho) + ramp * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho  # EDM Eq. 5
    i = rng.integers(0, n_levels - 1, size=8)
    sigma_i, sigma_next = grid[i], grid[i + 1]
    fs, ft = rng.standard_normal((8, 3, 8, 8)), rng.standard_normal((8, 3, 8, 8))
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    per = (np.sqrt(_norm2(fs - ft) + c * c) - c) / (sigma_next - sigma_i)
    for reduction in REDUCTIONS:
        want = _reduce(per, reduction)
        got = R.consistency_training_loss(fs, ft, sigma_i, sigma_next, reduction=reduction)
        np.testing.assert_allclose(got, want, rtol=1e-13)
        value, grads = gn.consistency_training_loss(fs, ft, sigma_i, sigma_next, reduction=reduction)
        np.testing.assert_allclose(value, want, rtol=1e-13)
        assert len(grads) == 1
    with pytest.raises(ValueError, match="sigma_next"):
        R.consistency_training_loss(fs, ft, sigma_next, sigma_i)  # levels swapped
    with pytest.raises(ValueError, match="sigma_next"):
        gn.consistency_training_loss(fs, ft, sigma_i, sigma_i)  # equal levels: lambda infinite


def test_consistency_target_requiring_grad_is_refused():
    """(FLOW.24) f_target is a stop-gradient target: the torch op refuses it requiring grad (naming
    it) and gives f_student the reference gradient."""
    torch = pytest.importorskip("torch")
    import genloss.torch as gl

    rng = np.random.default_rng(11)
    fs = torch.from_numpy(rng.standard_normal((4, 6))).requires_grad_(True)
    ft = torch.from_numpy(rng.standard_normal((4, 6)))
    lo = torch.tensor([0.01, 0.1, 1.0, 5.0], dtype=torch.float64)
    hi = torch.tensor([0.02, 0.3, 1.5, 9.0], dtype=torch.float64)
    gl.consistency_training_loss(fs, ft, lo, hi).backward()
    (want,) = R.consistency_training_loss_backward(
        fs.detach().numpy(), ft.numpy(), lo.numpy(), hi.numpy(), 1.0
    )
    np.testing.assert_allclose(fs.grad.numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="f_target"):
        gl.consistency_training_loss(fs, ft.clone().requires_grad_(True), lo, hi)


# ============================================================================= gradients (all three)


def _denoiser_fn(weighting, reduction, with_u):
    kw = dict(sigma_data=SD, weighting=weighting, gamma=5.0, reduction=reduction)
    if with_u:
        return (
            lambda f, a, e, s, u: R.denoiser_loss(f, a, e, s, logvar=u, **kw),
            lambda f, a, e, s, u, g: R.denoiser_loss_backward(f, a, e, s, g, logvar=u, **kw),
        )
    return (
        lambda f, a, e, s: R.denoiser_loss(f, a, e, s, **kw),
        lambda f, a, e, s, g: R.denoiser_loss_backward(f, a, e, s, g, **kw),
    )


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2), (1, 5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_fd(shape, reduction):
    """(FLOW.20, FLOW.23, FLOW.24) every gradient of the three losses against central differences."""
    rng = np.random.default_rng(12 + len(shape))
    B = shape[0]
    go = grad_output(rng, reduction, B)
    x, y = rng.standard_normal(shape), rng.standard_normal(shape)
    w = rng.uniform(0.1, 2.0, size=B)
    for c in (None, 0.3, 10.0):  # 10: ||x - y|| < c, the quadratic regime
        check_fd(
            f"pseudo_huber_loss(c={c})",
            lambda a, b, ww, c=c: R.pseudo_huber_loss(a, b, c, ww, reduction),
            lambda a, b, ww, g, c=c: R.pseudo_huber_loss_backward(a, b, g, c, ww, reduction),
            [x, y, w],
            go,
            (0, 1, 2),
        )
    F, x0, noise = (rng.standard_normal(shape) for _ in range(3))
    sigma = np.array([0.02, 0.9, 30.0])[:B]
    u = rng.uniform(-1.0, 1.0, size=B)
    for weighting in WEIGHTINGS:
        for with_u in (False, True):
            f, bw = _denoiser_fn(weighting, reduction, with_u)
            arrays = [F, x0, noise, sigma] + ([u] if with_u else [])
            check_fd(f"denoiser_loss({weighting}, {with_u})", f, bw, arrays, go, tuple(range(len(arrays))))
    lo, hi = np.array([0.002, 0.5, 3.0])[:B], np.array([0.004, 0.7, 4.5])[:B]
    check_fd(
        "consistency_training_loss",
        lambda a: R.consistency_training_loss(a, y, lo, hi, reduction=reduction),
        lambda a, g: R.consistency_training_loss_backward(a, y, lo, hi, g, reduction=reduction),
        [x],
        go,
        (0,),
    )


def _flag_sets(n):
    return [True, False, (True,) + (False,) * (n - 1), (False,) * (n - 1) + (True,)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_native_matches_reference_every_gradient(dtype, reduction):
    """(FLOW.20, FLOW.23) the kernels' value and each requested gradient (any subset) against the
    float64 reference on the same inputs, every weighting, with and without weights / logvar."""
    rng = np.random.default_rng(13)
    shape = (7, 5, 3)
    ones = np.ones(shape[0]) if reduction == "none" else 1.0
    x, y = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    w = rng.uniform(0.0, 2.0, size=shape[0]).astype(dtype)
    sigma = np.geomspace(0.003, 300.0, shape[0]).astype(dtype)
    u = rng.uniform(-2.0, 2.0, size=shape[0]).astype(dtype)
    calls = [
        (
            f"pseudo_huber c={c} w={wt is not None}",
            gn.pseudo_huber_loss,
            R.pseudo_huber_loss,
            R.pseudo_huber_loss_backward,
            (x, y),
            dict(c=c, weights=wt, reduction=reduction),
        )
        for c in (None, 2.0)
        for wt in (None, w)
    ]
    calls += [
        (
            f"denoiser {wg} u={lv is not None}",
            gn.denoiser_loss,
            R.denoiser_loss,
            R.denoiser_loss_backward,
            (x, y, x * 0.5 - y, sigma),
            dict(sigma_data=SD, weighting=wg, logvar=lv, reduction=reduction),
        )
        for wg in WEIGHTINGS
        for lv in (None, u)
    ]
    lo = (sigma * 0.5).astype(dtype)
    calls.append(
        (
            "consistency",
            gn.consistency_training_loss,
            R.consistency_training_loss,
            R.consistency_training_loss_backward,
            (x, y, lo, sigma),
            dict(reduction=reduction),
        )
    )
    for what, native, ref, ref_bw, arrays, kw in calls:
        want_value = ref(*arrays, **kw)
        want = ref_bw(*arrays, ones, **kw)
        for flags in _flag_sets(len(want)):
            value, grads = native(*arrays, **kw, need_grad=flags)
            assert_close(value, want_value, "native", dtype, f"{what} value {flags}")
            asked = (flags,) * len(want) if isinstance(flags, bool) else flags
            if not any(asked):
                assert grads == ()
                continue
            assert len(grads) == len(want)
            for k, (g, r, on) in enumerate(zip(grads, want, asked, strict=True)):
                if not on:
                    assert g is None, f"{what}: grad {k} written though not asked"
                    continue
                assert g.dtype == dtype and g.shape == r.shape
                assert_close(g, r, "native", dtype, f"{what} grad {k} {flags}")


# ============================================================================= torch.compile


@pytest.mark.parametrize("name", ["pseudo_huber_loss", "denoiser_loss", "consistency_training_loss"])
def test_compile_matches_reference(name):
    """(FLOW.20-FLOW.24) torch.compile(fullgraph=True) of each op (its last variant: weights, logvar
    or a set c), value and gradients against the float64 reference."""
    torch = pytest.importorskip("torch")
    import genloss.registry as REG

    record = REG.by_name(name)
    variant = record.variants[-1]
    record = record.at(variant)
    kwargs = REG.call_kwargs(record, variant, "mean")
    arrays = REG.make_inputs(record, np.random.default_rng(14), np.float64, REG.ODD_SIZES[2], variant)
    op = record.torch
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a, **kwargs), fullgraph=True, backend="aot_eager")
    wants_grad = [n in record.differentiable for n in record.arg_names]
    tensors = [torch.from_numpy(a).requires_grad_(g) for a, g in zip(arrays, wants_grad, strict=True)]
    value = compiled(*tensors)
    diff = [t for t, g in zip(tensors, wants_grad, strict=True) if g]
    grads = torch.autograd.grad(value, diff)
    np.testing.assert_allclose(value.detach().numpy(), record.reference(*arrays, **kwargs), rtol=1e-10)
    want = record.reference_backward(*arrays, 1.0, **kwargs)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12)
