r"""Samplers, shifts, preconditioning and parameterizations of the continuous-time (flow) family.

Every assertion compares ``genloss.reference.flow`` (or ``genloss.torch``) with a value computed
independently of it: the papers' maps written out (SD3 Eq. 19-21 and 23, Flux's time shift,
Karras et al. 2022 Table 1, iCT's curriculum and pair probabilities), scipy's distributions, special functions and
quadrature, Kolmogorov-Smirnov statistics on 10^6 draws with fixed seeds, central finite
differences, the true (x0, noise) of a synthetic batch, and, when installed, diffusers.  The
equations are derived in ``derivations/flow.md`` (FLOW.6-FLOW.12).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from genloss.reference import diffusion as RD
from genloss.reference import flow as R
from peers import peer

stats = pytest.importorskip("scipy.stats")
special = pytest.importorskip("scipy.special")
integrate = pytest.importorskip("scipy.integrate")
optimize = pytest.importorskip("scipy.optimize")

N_DRAWS = 10**6
# KS: the critical value of the one-sample statistic at level 1e-3 is ~1.95/sqrt(n) (asymptotic).
KS_CRITICAL = 1.95 / math.sqrt(N_DRAWS)
# Each kind with parameters away from the defaults where a sign or a swap would show.
KINDS = {
    "uniform": {},
    "logit_normal": dict(m=0.3, s=0.8),
    "mode": dict(scale=1.29),
    "mode_negative": dict(scale=-0.5),
    "cosmap": {},
    "lognormal_sigma": dict(p_mean=-1.2, p_std=1.2),
}


def _kind(name):
    return ("mode" if name.startswith("mode") else name), KINDS[name]


def _integrated_cdf(kind, params):
    """The CDF as the running integral of ``timestep_density`` (trapezoid on 2^17 points; for
    'lognormal_sigma' in log sigma): independent of the sampler's inverse CDF."""
    if kind == "lognormal_sigma":
        y = np.linspace(
            params["p_mean"] - 12 * params["p_std"], params["p_mean"] + 12 * params["p_std"], 2**17 + 1
        )
        x = np.exp(y)
        dens = R.timestep_density(x, kind, **params) * x  # d sigma = sigma d(log sigma)
        cum = integrate.cumulative_trapezoid(dens, y, initial=0.0)
        return (lambda s: np.interp(np.log(s), y, cum)), cum[-1]
    x = np.linspace(0.0, 1.0, 2**17 + 1)
    cum = integrate.cumulative_trapezoid(R.timestep_density(x, kind, **params), x, initial=0.0)
    return (lambda t: np.interp(t, x, cum)), cum[-1]


def _closed_form_cdf(kind, params):
    """scipy's distributions (or the arctan for cosmap); None for 'mode' (no closed form)."""
    if kind == "uniform":
        return lambda t: t
    if kind == "logit_normal":
        return lambda t: stats.norm(params["m"], params["s"]).cdf(special.logit(t))
    if kind == "cosmap":
        return lambda t: 2.0 / math.pi * np.arctan(t / (1.0 - t))
    if kind == "lognormal_sigma":
        return stats.lognorm(s=params["p_std"], scale=math.exp(params["p_mean"])).cdf
    return None


def _ks(draws, cdf):
    x = np.sort(draws)
    f = cdf(x)
    n = x.size
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def _sd3_mode(u, scale):
    """SD3's Eq. 20 as printed (a decreasing map of u)."""
    return 1.0 - u - scale * (np.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


# ============================================================================= FLOW.6, FLOW.7 samplers


@pytest.mark.parametrize("name", list(KINDS))
def test_samples_match_density_ks(name):
    """(FLOW.6, FLOW.7) 10^6 draws (fixed seed) against the integral of timestep_density and the
    closed-form CDF: the KS statistic below its 1e-3 critical value; the density integrates to 1."""
    kind, params = _kind(name)
    draws = R.sample_timesteps(N_DRAWS, kind, 20261203, **params)
    assert draws.shape == (N_DRAWS,) and draws.dtype == np.float64
    cdf, total = _integrated_cdf(kind, params)
    assert total == pytest.approx(1.0, abs=1e-7)
    assert _ks(draws, cdf) < KS_CRITICAL, name
    closed = _closed_form_cdf(kind, params)
    if closed is not None:
        assert _ks(draws, closed) < KS_CRITICAL, name
    if kind != "uniform":  # the statistic has power: the same draws are far from uniform
        other = (lambda s: stats.lognorm(s=1.0).cdf(s)) if kind == "lognormal_sigma" else (lambda t: t)
        assert _ks(draws, other) > 10 * KS_CRITICAL


@pytest.mark.parametrize("name", list(KINDS))
def test_quantile_is_the_exact_inverse_cdf(name):
    """(FLOW.6, FLOW.7) F(Q(u)) = u to 1e-12 in float64 (and Q(F(t)) = t), and the sampler is Q of the
    generator's uniforms."""
    kind, params = _kind(name)
    u = np.concatenate([np.linspace(1e-6, 1.0 - 1e-6, 2001), np.random.default_rng(0).random(5000)])
    t = R.timestep_quantile(u, kind, **params)
    np.testing.assert_allclose(R.timestep_cdf(t, kind, **params), u, rtol=0, atol=1e-12)
    back = R.timestep_quantile(R.timestep_cdf(t, kind, **params), kind, **params)
    np.testing.assert_allclose(back, t, rtol=1e-11, atol=1e-13)
    assert np.all(np.diff(R.timestep_quantile(np.sort(u), kind, **params)) >= 0.0)
    draws = R.sample_timesteps(1000, kind, 5, **params)
    np.testing.assert_array_equal(
        draws, R.timestep_quantile(np.random.default_rng(5).random(1000), kind, **params)
    )


def test_quantiles_are_the_papers_maps():
    """(FLOW.6, FLOW.7, FLOW.3) Q against the maps as SD3 and EDM print them (scipy's ndtri)."""
    u = np.linspace(1e-4, 1 - 1e-4, 999)
    m, s = 0.3, 0.8
    np.testing.assert_allclose(
        R.timestep_quantile(u, "logit_normal", m=m, s=s), special.expit(m + s * special.ndtri(u)), rtol=1e-14
    )
    for scale in (1.29, -0.5, 0.0):  # increasing version of Eq. 20: f(1 - u) = 1 - f(u)
        q = R.timestep_quantile(u, "mode", scale=scale)
        np.testing.assert_allclose(q, _sd3_mode(1.0 - u, scale), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(q, 1.0 - _sd3_mode(u, scale), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(
        R.timestep_quantile(u, "cosmap"),
        1.0 - 1.0 / (np.tan(math.pi * u / 2.0) + 1.0),
        rtol=1e-13,
        atol=2e-16,
    )  # atol: the printed 1 - 1/(tan + 1) itself cancels near t = 0 (an ulp of 1)
    np.testing.assert_allclose(
        R.timestep_quantile(u, "lognormal_sigma", p_mean=-1.2, p_std=1.2),
        np.exp(-1.2 + 1.2 * special.ndtri(u)),
        rtol=1e-13,
    )
    # the open interval keeps Phi^-1 finite: the extreme uniforms give finite, positive sigmas
    sig = R.sample_timesteps(10, "lognormal_sigma", np.random.default_rng(1))
    assert np.all(np.isfinite(sig) & (sig > 0))


def test_mode_density_integrates_to_one_and_is_sd3s():
    """(FLOW.7) the mode density integrates to 1 (quadrature), equals 1/|f'(u)| at the u solving
    SD3's f(u) = t (brentq on the printed map, f' by central differences), is symmetric about 1/2,
    and matches a central difference of its CDF."""
    for scale in (1.29, -0.5, 1.7):
        total, err = integrate.quad(lambda t, c=scale: float(R.timestep_density(t, "mode", scale=c)), 0, 1,
                                    points=[0.5], limit=200)  # fmt: skip
        assert total == pytest.approx(1.0, abs=1e-9), (scale, err)
        for t in (0.01, 0.2, 0.45, 0.5, 0.8, 0.999):
            u = optimize.brentq(lambda v, c=scale, t=t: _sd3_mode(v, c) - t, 0.0, 1.0, xtol=1e-15)
            h = 1e-6
            slope = (_sd3_mode(u + h, scale) - _sd3_mode(u - h, scale)) / (2 * h)
            assert float(R.timestep_density(t, "mode", scale=scale)) == pytest.approx(
                1.0 / abs(slope), rel=1e-7
            )
        t = np.linspace(0.0, 1.0, 101)
        d = R.timestep_density(t, "mode", scale=scale)
        np.testing.assert_allclose(d, d[::-1], rtol=1e-12)
        h = 1e-6
        ti = t[1:-1]
        fd = (R.timestep_cdf(ti + h, "mode", scale=scale) - R.timestep_cdf(ti - h, "mode", scale=scale)) / (
            2 * h
        )
        np.testing.assert_allclose(d[1:-1], fd, rtol=1e-6)
        # the end points: p(0) = p(1) = 1/(1 + c), p(1/2) = 1/(1 + c - c pi/2)
        assert d[0] == pytest.approx(1.0 / (1.0 + scale), rel=1e-14)
        assert d[50] == pytest.approx(1.0 / (1.0 + scale - scale * math.pi / 2.0), rel=1e-12)


def test_mode_scale_range():
    """(FLOW.7) monotone exactly on [-1, 2/(pi - 2)]: at the limits Q is still increasing and inside
    [0, 1]; just outside it is not, and the ops refuse such a scale naming it."""
    lo, hi = -1.0, 2.0 / (math.pi - 2.0)
    assert R.MODE_SCALE_RANGE == pytest.approx((lo, hi), rel=1e-15)
    u = np.linspace(0.0, 1.0, 100001)
    for c in (lo, hi):
        q = R.timestep_quantile(u, "mode", scale=c)
        assert np.all(np.diff(q) > 0) and q.min() >= 0.0 and q.max() <= 1.0
    for c in (lo - 0.05, hi + 0.05):  # the printed map itself stops being a quantile function
        q = 1.0 - _sd3_mode(u, c)
        assert np.any(np.diff(q) < 0) or q.min() < 0.0 or q.max() > 1.0
        with pytest.raises(ValueError, match=r"sample_timesteps: scale must lie in"):
            R.sample_timesteps(4, "mode", 0, scale=c)
        with pytest.raises(ValueError, match=r"timestep_density: scale"):
            R.timestep_density(np.array([0.5]), "mode", scale=c)


def _mode_q(u, c):
    """Q(u) = (1 + c) u - c sin^2(pi u / 2) (FLOW.7) in 60-digit mpmath: the backward error's yardstick
    (as (1 + c) u - ..., since u - c (sin^2 - u) cancels past 60 digits too at c = -1, u = 1e-150)."""
    import mpmath

    with mpmath.workdps(60):
        u = mpmath.mpf(float(u))
        return (1 + c) * u - c * mpmath.sin(mpmath.pi * u / 2) ** 2


def test_mode_cdf_to_the_last_digits_from_zero_to_one():
    """(FLOW.7) F = Q^-1 by MODE_NEWTON_STEPS safeguarded Newton steps, for every scale of the range:
    F(0) = 0 and F(1) = 1 exactly; scale 0 is the identity; at scale -1, Q = sin^2(pi u / 2), so
    F(t) = (2 / pi) asin(sqrt t), to 1e-15 relative down to t = 1e-300 (the paper's u - c (sin^2 - u)
    cancels to 0 there, and a Newton start at t takes hundreds of halvings to reach sqrt t); and for
    each scale Q(F(t)) = t to a few ulps of t (in 60 digits), t from 1e-300 to 1 - 1e-16."""
    mpmath = pytest.importorskip("mpmath")
    lo, hi = R.MODE_SCALE_RANGE
    t = np.concatenate([[0.0, 1.0], np.geomspace(1e-300, 1e-3, 60), np.linspace(0.0, 1.0, 41)[1:-1],
                        0.5 + np.geomspace(1e-16, 1e-2, 8), 1.0 - np.geomspace(1e-16, 1e-3, 8)])  # fmt: skip
    np.testing.assert_array_equal(R.timestep_cdf(t, "mode", scale=0.0), t)
    tiny = t[2:62]
    np.testing.assert_allclose(
        R.timestep_cdf(tiny, "mode", scale=lo), 2.0 / math.pi * np.arcsin(np.sqrt(tiny)), rtol=1e-15
    )
    for c in (lo, -0.999, -0.5, 0.5, 1.29, 1.75, hi):
        u = R.timestep_cdf(t, "mode", scale=c)
        assert u[0] == 0.0 and u[1] == 1.0, c
        assert np.all((u >= 0.0) & (u <= 1.0))
        back = np.array([float(_mode_q(x, mpmath.mpf(c))) for x in u])
        np.testing.assert_allclose(back[2:], t[2:], rtol=4e-15, atol=0, err_msg=f"scale {c}")
        if lo < c < hi:  # at the limits the density is infinite at t = 0, 1 (c = -1) or 1/2
            assert np.all(np.isfinite(R.timestep_density(t, "mode", scale=c)))


# ============================================================================= FLOW.8 stratified


@pytest.mark.parametrize("name", ["uniform", "logit_normal", "mode", "lognormal_sigma"])
def test_stratified_draws_partition_across_ranks(name):
    """(FLOW.8) with one seed on every rank, the n * W draws of the job put exactly one draw in each
    probability-1/(nW) stratum, F of the union sorted is a grid of spacing 1/(nW), and each rank's
    draws are Q of low_discrepancy_times(n, u0, rank, W)."""
    kind, params = _kind(name)
    n, W, seed = 8, 4, 11
    per_rank = [
        R.sample_timesteps(n, kind, seed, **params, stratified=True, rank=r, world_size=W) for r in range(W)
    ]
    u0 = np.random.default_rng(seed).random()
    for r, t in enumerate(per_rank):
        np.testing.assert_allclose(
            t, R.timestep_quantile(RD.low_discrepancy_times(n, u0, r, W), kind, **params), rtol=1e-15
        )
    u = np.sort(R.timestep_cdf(np.concatenate(per_rank), kind, **params))
    k = n * W
    np.testing.assert_allclose(np.diff(u), 1.0 / k, atol=1e-12)
    strata = np.floor(u * k + 1e-9).astype(int) % k  # +1e-9: a draw exactly on a stratum's left edge
    assert sorted(strata) == list(range(k))
    # a second job with another seed shifts the grid (u0 is random), and still partitions
    other = np.concatenate(
        [
            R.sample_timesteps(n, kind, seed + 1, **params, stratified=True, rank=r, world_size=W)
            for r in range(W)
        ]
    )
    assert not np.allclose(np.sort(other), np.sort(np.concatenate(per_rank)))


# ============================================================================= FLOW.9 shifts


def test_shift_formulas_and_inverse():
    """(FLOW.9) SD3's and Flux's maps as printed, the same map with alpha = e^mu, the Jacobian by
    central differences, the inverse shift, the end points exact."""
    t = np.concatenate([[0.0, 1.0], np.random.default_rng(2).uniform(1e-3, 1.0 - 1e-3, 500)])
    for alpha in (3.0, 0.4, 1.0):
        ts, jac = R.shift_timesteps(t, shift=alpha)
        np.testing.assert_allclose(ts, alpha * t / (1.0 + (alpha - 1.0) * t), rtol=1e-14)
        assert ts[0] == 0.0 and ts[1] == 1.0
        h = 1e-7
        inner = t[2:]
        fd = (R.shift_timesteps(inner + h, shift=alpha)[0] - R.shift_timesteps(inner - h, shift=alpha)[0]) / (
            2 * h
        )
        np.testing.assert_allclose(jac[2:], fd, rtol=1e-7)
        np.testing.assert_allclose(R.shift_timesteps(ts, shift=1.0 / alpha)[0], t, rtol=1e-13, atol=1e-16)
    mu = 1.15
    ts, jac = R.shift_timesteps(t, mu=mu)
    with np.errstate(divide="ignore"):
        flux = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    np.testing.assert_allclose(ts, flux, rtol=1e-14)
    np.testing.assert_allclose(jac, R.shift_timesteps(t, shift=math.exp(mu))[1], rtol=1e-15)
    with pytest.raises(ValueError, match="shift_timesteps: give exactly one of shift"):
        R.shift_timesteps(t, shift=2.0, mu=0.5)
    with pytest.raises(ValueError, match="shift_timesteps: shift must be > 0"):
        R.shift_timesteps(t, shift=0.0)
    with pytest.raises(ValueError, match=r"shift_timesteps: t must lie in \[0, 1\]"):
        R.shift_timesteps(np.array([1.5]), shift=2.0)


def test_shift_moves_the_density_by_its_jacobian():
    """(FLOW.9) shifted draws have the density p(t)/(dt'/dt) at t' (KS of 10^6 shifted draws against
    F(h^-1(t'))); for the logit-normal that is the logit-normal with location m + ln alpha; the moved
    mode density integrates to 1."""
    alpha, m, s = 3.0, 0.3, 0.8
    t = R.sample_timesteps(N_DRAWS, "logit_normal", 99, m=m, s=s)
    ts, jac = R.shift_timesteps(t, shift=alpha)
    assert (
        _ks(
            ts, lambda x: R.timestep_cdf(R.shift_timesteps(x, shift=1.0 / alpha)[0], "logit_normal", m=m, s=s)
        )
        < KS_CRITICAL
    )
    grid = np.linspace(0.01, 0.99, 197)
    back, back_jac = R.shift_timesteps(grid, shift=1.0 / alpha)  # h^-1(t') and its slope
    moved = R.timestep_density(back, "logit_normal", m=m, s=s) / R.shift_timesteps(back, shift=alpha)[1]
    np.testing.assert_allclose(
        moved, R.timestep_density(grid, "logit_normal", m=m + math.log(alpha), s=s), rtol=1e-12
    )
    np.testing.assert_allclose(
        moved, R.timestep_density(back, "logit_normal", m=m, s=s) * back_jac, rtol=1e-12
    )

    def moved_mode(x):
        b, bj = R.shift_timesteps(np.array([x]), shift=1.0 / alpha)
        return float(R.timestep_density(b, "mode", scale=1.29)[0] * bj[0])

    total, _ = integrate.quad(moved_mode, 0.0, 1.0, limit=200)
    assert total == pytest.approx(1.0, abs=1e-8)


def test_flux_mu_line():
    """(FLOW.9) Flux's mu: diffusers' calculate_shift line written out, its end points 0.5 and 1.15."""
    base_len, max_len, base, top = 256, 4096, 0.5, 1.15
    slope = (top - base) / (max_len - base_len)
    for length in (256, 1024, 4096, 8192, 77):
        assert R.flux_mu(length) == pytest.approx(length * slope + (base - slope * base_len), rel=1e-14)
    assert R.flux_mu(256) == pytest.approx(0.5, rel=1e-15) and R.flux_mu(4096) == pytest.approx(
        1.15, rel=1e-15
    )
    assert R.flux_mu(1000, 100, 1100, 0.0, 1.0) == pytest.approx(0.9, rel=1e-15)
    with pytest.raises(ValueError, match="flux_mu: max_seq_len must differ"):
        R.flux_mu(10, 256, 256)
    for length in (0, -5):  # a token count: the line continued below 0 is no shift anyone asked for
        with pytest.raises(ValueError, match="flux_mu: image_seq_len must be > 0"):
            R.flux_mu(length)


# ============================================================================= FLOW.10 EDM


def _table_1(sigma, sd):
    """Karras et al. 2022, Table 1, written as printed (float64)."""
    return (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / np.sqrt(sigma**2 + sd**2),
        1.0 / np.sqrt(sigma**2 + sd**2),
        0.25 * np.log(sigma),
    )


SIGMAS = np.geomspace(1e-3, 1e3, 121)


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_edm_preconditioning_is_table_1(sd):
    """(FLOW.10) the four coefficients = Table 1 in float64 for sigma in [1e-3, 1e3]; the unit-variance
    identity c_skip + c_out^2 / sigma_d^2 = 1."""
    got = R.edm_preconditioning(SIGMAS, sd)
    for name, g, want in zip(("c_skip", "c_out", "c_in", "c_noise"), got, _table_1(SIGMAS, sd), strict=True):
        np.testing.assert_allclose(g, want, rtol=4e-16 * 8, atol=0, err_msg=name)
    np.testing.assert_allclose(got[0] + got[1] ** 2 / sd**2, 1.0, rtol=1e-15)
    with pytest.raises(
        ValueError, match="edm_preconditioning: sigma must be finite and > 0.*end point sigma = 0"
    ):
        R.edm_preconditioning(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="edm_preconditioning: sigma_data must be > 0"):
        R.edm_preconditioning(SIGMAS, 0.0)


def test_edm_preconditioning_float32_range():
    """(FLOW.10) the torch layer in float32: finite and within a few float32 ulp of the float64 Table 1
    from sigma = 1e-3 to 1e3 (and finite far beyond, where sigma^2 would overflow float32)."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    for sigmas in (SIGMAS, np.geomspace(1e-30, 1e30, 61)):
        s32 = torch.tensor(sigmas, dtype=torch.float32)
        got = gt.edm_preconditioning(s32)
        exact = _table_1(s32.double().numpy(), 0.5)
        for g, want in zip(got, exact, strict=True):
            assert g.dtype == torch.float32 and torch.isfinite(g).all()
            normal = (
                np.abs(want) >= np.finfo(np.float32).tiny
            )  # below: float32 subnormals, no relative accuracy
            np.testing.assert_allclose(g.double().numpy()[normal], want[normal], rtol=2 * 2.0**-24, atol=0)
        # the float32 formulas of the same lines (no float64 anywhere) are accurate too: no cancellation
        r = torch.hypot(s32, torch.tensor(0.5))
        rd = 0.5 / r
        for g, want in zip((rd * rd, s32 * rd, 1.0 / r), exact[:3], strict=False):
            normal = np.abs(want) >= np.finfo(np.float32).tiny
            np.testing.assert_allclose(g.double().numpy()[normal], want[normal], rtol=8 * 2.0**-24, atol=0)


def test_edm_preconditioning_backward():
    """(FLOW.10) the backward of all four outputs against central differences (float64) and torch's
    autograd of the torch layer; None skips an output."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    rng = np.random.default_rng(4)
    sigma = np.geomspace(1e-3, 1e3, 25)
    g = tuple(rng.standard_normal(sigma.shape) for _ in range(4))
    (grad,) = R.edm_preconditioning_backward(sigma, g, 0.7)
    h = 1e-6 * sigma
    up = R.edm_preconditioning(sigma + h, 0.7)
    dn = R.edm_preconditioning(sigma - h, 0.7)
    fd = sum(gi * (a - b) / (2 * h) for gi, a, b in zip(g, up, dn, strict=True))
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)
    (only_noise,) = R.edm_preconditioning_backward(sigma, (None, None, None, g[3]), 0.7)
    np.testing.assert_allclose(only_noise, g[3] / (4 * sigma), rtol=1e-15)
    s = torch.tensor(sigma, requires_grad=True)
    outs = gt.edm_preconditioning(s, 0.7)
    total = sum((o * torch.from_numpy(gi)).sum() for o, gi in zip(outs, g, strict=True))
    (tg,) = torch.autograd.grad(total, s)
    np.testing.assert_allclose(tg.numpy(), grad, rtol=1e-13)


# ============================================================================= FLOW.11 parameterizations


def _batch(seed=3, B=6, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, *shape)), rng.standard_normal((B, *shape))


def _paths(B):
    """(t_or_sigma, schedule, (a, b)) of every kind of path, interior values."""
    rng = np.random.default_rng(7)
    t = rng.uniform(0.01, 0.99, B)
    sig = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), B))
    lam = rng.uniform(-6, 6, B)  # a VP schedule at log-SNR lam: alpha^2 = sigmoid(lam)
    alpha, sigma_vp = np.sqrt(special.expit(lam)), np.sqrt(special.expit(-lam))
    sched = RD.DiffusionSchedule(RD.cosine_betas(50))
    steps = rng.integers(0, 48, B)
    return [
        (t, "flow", (1 - t, t)),
        (sig, "ve", (np.ones(B), sig)),
        ((alpha, sigma_vp), "alpha_sigma", (alpha, sigma_vp)),
        (steps, sched, (sched.sqrt_alpha_bar[steps], sched.sqrt_one_minus_alpha_bar[steps])),
    ]


def _definition(kind, x0, noise, a, b, sd):
    """Each parameterization from the true (x0, noise), written from its paper: v (Salimans & Ho),
    the SD3 velocity, EDM's F = (x0 - c_skip x~)/c_out with x~ = x_t/a at sigma = b/a (Table 1)."""
    ab = (a[:, None, None], b[:, None, None])
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    if kind == "v":
        return ab[0] * noise - ab[1] * x0
    if kind == "flow":
        return noise - x0
    # the two end points by their limits: sigma -> inf (a = 0): c_skip -> 0, c_out -> sigma_d, F -> x0/sigma_d;
    # sigma -> 0 (b = 0): 1 - c_skip ~ sigma^2/sigma_d^2, c_out ~ sigma, F -> -noise
    pure, clean = (a == 0.0)[:, None, None], (b == 0.0)[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = b / a
        c_skip, c_out, _, _ = _table_1(sigma, sd)
        F = (x0 - c_skip[:, None, None] * (x0 + sigma[:, None, None] * noise)) / c_out[:, None, None]
    return np.where(pure, x0 / sd, np.where(clean, -noise, F))


@pytest.mark.parametrize(("source", "target"), list(itertools.product(R.PREDICTIONS, repeat=2)))
def test_prediction_convert_round_trips_every_pair(source, target):
    """(FLOW.11) source -> target -> source is the identity to 1e-12 in float64, on every path."""
    x0, noise = _batch()
    for t_or_sigma, schedule, (a, b) in _paths(x0.shape[0]):
        x_t = a[:, None, None] * x0 + b[:, None, None] * noise
        pred = np.random.default_rng(1).standard_normal(x0.shape)  # any prediction, not only the true one
        there = R.prediction_convert(pred, x_t, t_or_sigma, source, target, schedule, 0.5)
        back = R.prediction_convert(there, x_t, t_or_sigma, target, source, schedule, 0.5)
        np.testing.assert_allclose(back, pred, rtol=0, atol=1e-12, err_msg=f"{schedule}")


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_prediction_convert_against_definitions(sd):
    """(FLOW.11) from the TRUE source value, every target equals its definition from (x0, noise): the
    conversion is the parameterizations' change of variables, not only self-consistent.  Also the
    flow-path x0 from a velocity is FLOW.4's x_t - t v, DDPM's x0 from eps is DIF.7's, and on the VE
    path with sigma_d = 1 EDM's F is -v of the VP path (1/r, sigma/r)."""
    x0, noise = _batch(5)
    for t_or_sigma, schedule, (a, b) in _paths(x0.shape[0]):
        x_t = a[:, None, None] * x0 + b[:, None, None] * noise
        for source, target in itertools.product(R.PREDICTIONS, repeat=2):
            pred = _definition(source, x0, noise, a, b, sd)
            got = R.prediction_convert(pred, x_t, t_or_sigma, source, target, schedule, sd)
            np.testing.assert_allclose(got, _definition(target, x0, noise, a, b, sd), rtol=1e-10, atol=1e-10,
                                       err_msg=f"{source}->{target} on {schedule}")  # fmt: skip
    t, _, _ = _paths(x0.shape[0])[0]
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
    v = np.random.default_rng(8).standard_normal(x0.shape)
    np.testing.assert_allclose(
        R.prediction_convert(v, x_t, t, "flow", "x0"), x_t - t[:, None, None] * v, rtol=1e-13, atol=1e-14
    )
    sched = RD.DiffusionSchedule(RD.cosine_betas(50))
    steps = np.arange(6) * 7
    eps = np.random.default_rng(9).standard_normal(x0.shape)
    np.testing.assert_allclose(
        R.prediction_convert(eps, x_t, steps, "eps", "x0", sched), RD.predict_x0_from_eps(x_t, steps, eps, sched),
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip
    sig = np.geomspace(0.05, 20, 6)
    x_ve = x0 + sig[:, None, None] * noise
    r = np.sqrt(sig**2 + 1)
    v_vp = (noise - sig[:, None, None] * x0) / r[:, None, None]  # alpha eps - sigma x0, alpha = 1/r
    F = R.prediction_convert(noise, x_ve, sig, "eps", "edm_F", "ve", 1.0)
    np.testing.assert_allclose(F, -v_vp, rtol=1e-12, atol=1e-13)


def test_extreme_scales_stay_finite():
    """(FLOW.9, FLOW.11) finite answers where the math is finite at extreme but valid scales:
    the shift's Jacobian alpha / den^2 (den^2 alone overflows or underflows) and the edm_F
    coefficients at sigma = 1e160 and at a, b = 1e-170 (the squares under rho do); against
    the formulas in 50-digit mpmath, in both layers."""
    mpmath = pytest.importorskip("mpmath")
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    mpmath.mp.dps = 50
    t = np.array([0.0, 0.5, 1.0])
    for kw, alpha in (({"mu": -500.0}, mpmath.exp(-500)), ({"shift": 1e-200}, mpmath.mpf(1e-200)),
                      ({"shift": 1e200}, mpmath.mpf(1e200))):  # fmt: skip
        want = [float(alpha / (alpha * mpmath.mpf(x) + (1 - mpmath.mpf(x))) ** 2) for x in t]
        np.testing.assert_allclose(R.shift_timesteps(t, **kw)[1], want, rtol=1e-14)
        np.testing.assert_allclose(gt.shift_timesteps(torch.from_numpy(t), **kw)[1].numpy(), want, rtol=1e-14)
    pred, xt, sd = np.array([[0.7, -1.3]]), np.array([[2.0, 0.5]]), mpmath.mpf(0.5)

    def exact(a, b, source, target):  # solve [a b; p_x p_e] [x0; eps] = [x_t; pred], then the target
        rho = mpmath.sqrt(b * b + sd * sd * a * a)
        coefs = {"x0": (1, 0), "edm_F": (b / (sd * rho), -sd * a / rho)}
        (px, pe), (qx, qe) = coefs[source], coefs[target]
        out = []
        det = a * pe - b * px
        for p_, x_ in zip(map(mpmath.mpf, pred[0]), map(mpmath.mpf, xt[0]), strict=True):  # Cramer's rule
            x0, eps = (x_ * pe - b * p_) / det, (a * p_ - px * x_) / det
            out.append(float(qx * x0 + qe * eps))
        return [out]

    cases = [
        ((1.0, 1e160), np.array([1e160]), "ve"),
        ((1e-170, 1e-170), (np.array([1e-170]),) * 2, "alpha_sigma"),
    ]
    for (a, b), tos, schedule in cases:
        for source, target in (("x0", "edm_F"), ("edm_F", "x0")):
            want = exact(mpmath.mpf(a), mpmath.mpf(b), source, target)
            got = R.prediction_convert(pred, xt, tos, source, target, schedule=schedule)
            np.testing.assert_allclose(got, want, rtol=1e-13)
            ttos = (
                tuple(torch.from_numpy(v) for v in tos) if isinstance(tos, tuple) else torch.from_numpy(tos)
            )
            tgot = gt.prediction_convert(torch.from_numpy(pred), torch.from_numpy(xt), ttos, source, target,
                                         schedule=schedule)  # fmt: skip
            np.testing.assert_allclose(tgot.numpy(), want, rtol=1e-13)


def test_prediction_convert_end_points():
    """(FLOW.11) 'eps' at a = 0 (t = 1) and 'x0' at b = 0 (t = 0, sigma = 0) are refused naming the end
    point; 'v', 'flow', 'edm_F' convert at both ends (edm_F = x0/sigma_d at pure noise); the torch layer
    agrees and refuses t_or_sigma requiring grad."""
    x0, noise = _batch(6, B=2)
    t = np.array([0.0, 1.0])
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
    with pytest.raises(ValueError, match=r"prediction_convert: source='eps'.*a = 0"):
        R.prediction_convert(noise, x_t, t, "eps", "x0")
    with pytest.raises(ValueError, match=r"prediction_convert: source='x0'.*b = 0"):
        R.prediction_convert(x0, x_t, t, "x0", "flow")
    with pytest.raises(ValueError, match=r"prediction_convert: source='x0'.*b = 0"):
        R.prediction_convert(x0, x0, np.zeros(2), "x0", "eps", "ve")
    for source in ("v", "flow", "edm_F"):
        pred = _definition(source, x0, noise, 1 - t, t, 0.5)
        for target in R.PREDICTIONS:
            want = _definition(target, x0, noise, 1 - t, t, 0.5) if target not in ("eps", "x0") else None
            got = R.prediction_convert(pred, x_t, t, source, target)
            assert np.all(np.isfinite(got))
            if want is not None:
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(R.prediction_convert(pred, x_t, t, source, "x0")[0], x0[0], atol=1e-15)
        np.testing.assert_allclose(R.prediction_convert(pred, x_t, t, source, "eps")[1], noise[1], atol=1e-15)
    F = R.prediction_convert(noise - x0, x_t, t, "flow", "edm_F", sigma_data=0.5)
    np.testing.assert_allclose(F[1], x0[1] / 0.5, rtol=1e-14)
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    tt = torch.from_numpy(t)
    with pytest.raises(ValueError, match=r"prediction_convert: source='eps'.*a = 0"):
        gt.prediction_convert(torch.from_numpy(noise), torch.from_numpy(x_t), tt, "eps", "x0")
    with pytest.raises(ValueError, match=r"prediction_convert: t_or_sigma requires grad"):
        gt.prediction_convert(
            torch.from_numpy(noise), torch.from_numpy(x_t), tt.clone().requires_grad_(), "v", "x0"
        )


def test_torch_prediction_convert_takes_the_torch_schedule():
    """(FLOW.11) ``genloss.torch.prediction_convert`` takes the schedule torch users hold, a
    ``genloss.torch.DiffusionSchedule`` (it refused one with a TypeError, accepting only the NumPy
    schedule): every pair equals the reference's conversion on the same schedule, in eager and
    compiled; out-of-range timesteps are refused naming the op."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    sched = RD.DiffusionSchedule(RD.cosine_betas(50))
    module = gt.DiffusionSchedule(sched)
    rng = np.random.default_rng(23)
    pred, x_t = rng.standard_normal((2, 6, 3, 2))
    steps = np.array([0, 1, 7, 25, 48, 49])
    compiled = torch.compile(gt.prediction_convert, fullgraph=True)
    args = (torch.from_numpy(pred), torch.from_numpy(x_t), torch.from_numpy(steps))
    for source, target in itertools.product(R.PREDICTIONS, repeat=2):
        want = R.prediction_convert(pred, x_t, steps, source, target, sched, 0.5)
        fns = [gt.prediction_convert]
        if (source, target) in (("eps", "x0"), ("v", "edm_F")):  # compiled too: one graph per pair
            fns.append(compiled)
        for fn in fns:
            got = fn(*args, source, target, module)
            np.testing.assert_allclose(
                got.numpy(), want, rtol=1e-13, atol=1e-13, err_msg=f"{source}->{target}"
            )
    with pytest.raises(ValueError, match=r"prediction_convert: t_or_sigma"):
        gt.prediction_convert(*args[:2], torch.from_numpy(steps + 1), "eps", "x0", module)


# ============================================================================= FLOW.12 iCT


def test_karras_sigmas():
    """(FLOW.12) exact end points, strictly increasing, EDM's Eq. 5 written out (= k-diffusion's
    get_sigmas_karras reversed, without its appended 0), rho = 1 linear."""
    s = R.karras_sigmas(18)
    assert s[0] == 0.002 and s[-1] == 80.0 and np.all(np.diff(s) > 0)
    i = np.arange(18)
    edm = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7  # EDM's descending form
    np.testing.assert_allclose(s, edm[::-1], rtol=1e-14)
    np.testing.assert_allclose(R.karras_sigmas(5, 1.0, 3.0, 1.0), [1.0, 1.5, 2.0, 2.5, 3.0], rtol=1e-15)
    for n in (0, 1):  # one bound for both: a 0 was told ">= 1", then a 1 ">= 2"
        with pytest.raises(ValueError, match="karras_sigmas: n must be >= 2"):
            R.karras_sigmas(n)
    with pytest.raises(ValueError, match="karras_sigmas: sigma_max must be > sigma_min"):
        R.karras_sigmas(5, 1.0, 0.5)


@pytest.mark.parametrize(
    "n,lo,hi,rho", [(5, 0.002, 80.0, 0.005), (5, 1.0, 1e200, 0.5), (7, 1e-300, 1e300, 3.0)]
)
def test_karras_sigmas_where_the_papers_powers_overflow(n, lo, hi, rho):
    """(FLOW.12) finite for every valid (sigma_min, sigma_max, rho), where EDM's Eq. 5 taken literally
    overflows (80^(1/rho) for rho < 0.0062): against that equation in 50-digit mpmath."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    a, b = mpmath.mpf(lo) ** (1 / mpmath.mpf(rho)), mpmath.mpf(hi) ** (1 / mpmath.mpf(rho))
    want = [float((a + mpmath.mpf(i) / (n - 1) * (b - a)) ** mpmath.mpf(rho)) for i in range(n)]
    np.testing.assert_allclose(R.karras_sigmas(n, lo, hi, rho), want, rtol=1e-13)


def test_k_diffusion_karras_sigmas_and_preconditioning():
    """(FLOW.10, FLOW.12) k-diffusion (optional peer): ``sampling.get_sigmas_karras`` = ``karras_sigmas``
    descending with a 0 appended (k-diffusion computes it in float32: 1e-6), and ``layers.Denoiser``'s
    ``get_scalings`` (c_skip, c_out, c_in) = ``edm_preconditioning`` in float64."""
    k_diffusion = peer("k_diffusion")
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    theirs = k_diffusion.sampling.get_sigmas_karras(18, 0.002, 80.0, rho=7.0).double().numpy()
    assert theirs[-1] == 0.0
    np.testing.assert_allclose(theirs[:-1], R.karras_sigmas(18, 0.002, 80.0, 7.0)[::-1], rtol=1e-6)
    sigma = torch.from_numpy(np.exp(np.random.default_rng(24).uniform(-7.0, 5.0, size=9)))
    denoiser = k_diffusion.layers.Denoiser(lambda x, s: x, sigma_data=0.5)
    ours = gt.edm_preconditioning(sigma, 0.5)[:3]
    for name, want, got in zip(("c_skip", "c_out", "c_in"), denoiser.get_scalings(sigma), ours, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0, msg=name)


def test_ict_num_steps_known_values():
    """(FLOW.12) iCT's curriculum at known steps: K = 400k gives K' = 50k and N = 11, 21, ..., 641, 1281."""
    K = 400_000
    assert [R.ict_num_steps(k, K) for k in (0, 49_999, 50_000, 100_000, 349_999, 350_000, 399_999)] == [
        11, 11, 21, 41, 641, 1281, 1281,
    ]  # fmt: skip
    assert [R.ict_num_steps(j * 50_000, K) for j in range(8)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert R.ict_num_steps(10**9, K) == 1281  # capped, no huge power formed
    assert R.ict_num_steps(5, 12, s0=2, s1=7) == 5  # floor(7/2) = 3: K' = floor(12 / (log2 3 + 1)) = 4
    with pytest.raises(ValueError, match="ict_num_steps: K = 5 is too small"):
        R.ict_num_steps(0, 5)
    with pytest.raises(TypeError, match="ict_num_steps: k must be an int"):
        R.ict_num_steps(1.5, K)


def test_ict_sigma_probs():
    """(FLOW.12) the probabilities sum to 1, equal the lognormal masses of the pairs (scipy's norm.cdf
    differences, normalised) and the erf formula where it does not cancel, and keep the relative
    accuracy of a far pair's tiny mass (erfc on the small side)."""
    for n in (11, 161, 1281):
        s = R.karras_sigmas(n)
        p = R.ict_sigma_probs(s)
        assert p.shape == (n - 1,) and np.all(p > 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-14)
        z = (np.log(s) + 1.1) / 2.0
        mass = stats.norm.sf(z[:-1]) - stats.norm.sf(z[1:])
        np.testing.assert_allclose(p, mass / mass.sum(), rtol=1e-10)
        erf = np.array(
            [
                math.erf(b / math.sqrt(2)) - math.erf(a / math.sqrt(2))
                for a, b in zip(z[:-1], z[1:], strict=True)
            ]
        )
        ok = erf > 1e-6  # the direct formula keeps ~1e-10 relative accuracy there
        np.testing.assert_allclose(p[ok], (erf / erf.sum())[ok], rtol=1e-8)
    # a pair 8 to 9 standard deviations out: erf(9/sqrt 2) - erf(8/sqrt 2) ~ 1e-15 is all cancellation
    # in the direct formula; the erfc form keeps it to ~1e-12 relative
    near = R.ict_sigma_probs(np.array([1.0, np.exp(8.0), np.exp(9.0)]), p_mean=0.0, p_std=1.0)
    tail = stats.norm.sf(8.0) - stats.norm.sf(9.0)
    assert near[1] == pytest.approx(tail / (0.5 - stats.norm.sf(8.0) + tail), rel=1e-12)
    with pytest.raises(
        ValueError, match="ict_sigma_probs: sigmas must be finite, > 0 and strictly increasing"
    ):
        R.ict_sigma_probs(np.array([1.0, 1.0, 2.0]))


@pytest.mark.parametrize("p_mean,p_std", [(-1.1, 0.05), (10.0, 0.2), (-12.0, 0.1)])
def test_ict_sigma_probs_when_every_pair_is_far_in_a_tail(p_mean, p_std):
    """(FLOW.12) every pair's mass underflows (the lognormal sits far from all the sigmas, on either
    side): the probabilities are still the normalised masses, not 0/0, against normal CDF
    differences in 60-digit mpmath."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    s = R.karras_sigmas(6, sigma_min=10.0, sigma_max=80.0)
    z = [(mpmath.log(mpmath.mpf(x)) - p_mean) / p_std for x in s]
    # each difference on its small side (the CDFs near 1 would cancel even in 60 digits)
    mass = [
        mpmath.ncdf(-a) - mpmath.ncdf(-b) if a >= 0 else mpmath.ncdf(b) - mpmath.ncdf(a)
        for a, b in zip(z[:-1], z[1:], strict=True)
    ]
    want = [float(m / sum(mass)) for m in mass]
    got = R.ict_sigma_probs(s, p_mean, p_std)
    assert np.all(np.isfinite(got)) and got.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)


# ============================================================================= torch layer


def test_torch_layer_matches_reference():
    """(FLOW.6, FLOW.8) the torch samplers draw from a torch.Generator (or a seed) and map by the same
    float64 inverse CDF (float32 by default); densities, CDFs, shifts (with autograd's Jacobian),
    karras_sigmas and ict_sigma_probs equal the reference."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    for name in KINDS:
        kind, params = _kind(name)
        u = torch.rand(100, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
        want = R.timestep_quantile(u, kind, **params)
        # the same u (the generator's), mapped in torch ops: to the last bits of torch's functions
        got = gt.sample_timesteps(100, kind, 3, **params, dtype=torch.float64)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=0)
        if kind == "uniform":
            np.testing.assert_array_equal(got.numpy(), np.clip(u, 2.0**-54, 1.0 - 2.0**-53))
        f32 = gt.sample_timesteps(100, kind, torch.Generator().manual_seed(3), **params)
        assert f32.dtype == torch.float32
        np.testing.assert_allclose(f32.numpy(), want.astype(np.float32), rtol=2**-23, atol=0)
        u0 = float(torch.rand((), generator=torch.Generator().manual_seed(4), dtype=torch.float64))
        strat = gt.sample_timesteps(
            6, kind, 4, **params, stratified=True, rank=1, world_size=3, dtype=torch.float64
        )
        grid = RD.low_discrepancy_times(6, u0, 1, 3)
        np.testing.assert_allclose(
            strat.numpy(), R.timestep_quantile(grid, kind, **params), rtol=1e-13, atol=0
        )
        if kind == "uniform":  # the stratified grid itself, bit for bit (DIF.18)
            np.testing.assert_array_equal(strat.numpy(), grid)
        # the same lines (reference.timestep_map) in torch ops: equal up to the last bits of torch's
        # sin / erfc / ndtri against NumPy's and the reference's
        t = torch.from_numpy(want)
        for fn, x in (("quantile", u), ("cdf", want), ("density", want)):
            got = getattr(gt, f"timestep_{fn}")(torch.from_numpy(x), kind, **params)
            assert got.dtype == torch.float64
            np.testing.assert_allclose(
                got.numpy(), getattr(R, f"timestep_{fn}")(x, kind, **params), rtol=1e-13, atol=0, err_msg=fn
            )
            assert (
                getattr(gt, f"timestep_{fn}")(torch.from_numpy(x).half(), kind, **params).dtype
                == torch.float32
            )
    # 'mode': the fixed Newton steps on tensors, from t = 0 (exactly 0) to 1, tiny t included
    t = np.concatenate([[0.0, 1.0], np.geomspace(1e-300, 1e-3, 30), np.linspace(0.0, 1.0, 101)])
    for c in (-1.0, -0.4, 1.29, R.MODE_SCALE_RANGE[1]):
        for fn in ("cdf", "density"):
            got = getattr(gt, f"timestep_{fn}")(torch.from_numpy(t), "mode", scale=c).numpy()
            want = getattr(R, f"timestep_{fn}")(t, "mode", scale=c)
            # at the upper limit the root near t = 1/2 is cubic: ~eps^(1/3) apart whatever the steps
            rtol = 1e-4 if c == R.MODE_SCALE_RANGE[1] else 1e-13
            np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=f"{fn} scale {c}")
        assert float(gt.timestep_cdf(torch.zeros(1, dtype=torch.float64), "mode", scale=c)) == 0.0
    # a loss reweighted by the density of its times, compiled whole (torch ops: traced, the 32 Newton
    # steps of 'mode' too)
    for name in ("logit_normal", "mode"):
        kind, params = _kind(name)
        t = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        x = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
        compiled = torch.compile(
            lambda a, b, kind=kind, params=params: ((a * a).sum(1) / gt.timestep_density(b, kind, **params)).mean(),
            fullgraph=True, backend="aot_eager",
        )  # fmt: skip
        torch.testing.assert_close(
            compiled(x, t),
            ((x * x).sum(1) / torch.from_numpy(R.timestep_density(t.numpy(), kind, **params))).mean(),
            rtol=1e-13, atol=0,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"timestep_cdf: t must lie in \[0, 1\]"):
        gt.timestep_cdf(torch.tensor([0.5, 1.5]), "mode")
    with pytest.raises(ValueError, match=r"timestep_quantile: u must lie in \[0, 1\]"):
        gt.timestep_quantile(torch.tensor([-0.1]), "lognormal_sigma")
    with pytest.raises(ValueError, match=r"timestep_density: t must be noise levels"):
        gt.timestep_density(torch.tensor([-0.1]), "lognormal_sigma")
    t = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    ts, jac = gt.shift_timesteps(t, shift=3.0)
    rts, rjac = R.shift_timesteps(t.detach().numpy(), shift=3.0)
    np.testing.assert_allclose(ts.detach().numpy(), rts, rtol=1e-15)
    (g,) = torch.autograd.grad(ts.sum(), t)
    np.testing.assert_allclose(g.numpy(), rjac, rtol=1e-14)
    np.testing.assert_allclose(jac.detach().numpy(), rjac, rtol=1e-15)
    assert gt.shift_timesteps(t.detach().float(), mu=1.0)[0].dtype == torch.float32
    np.testing.assert_array_equal(gt.karras_sigmas(40, dtype=torch.float64).numpy(), R.karras_sigmas(40))
    s = gt.karras_sigmas(40, dtype=torch.float64)
    np.testing.assert_array_equal(gt.ict_sigma_probs(s).numpy(), R.ict_sigma_probs(s.numpy()))
    assert gt.ict_num_steps(123_456, 400_000) == R.ict_num_steps(123_456, 400_000) == 41
    with pytest.raises(TypeError, match="sample_timesteps: generator must be a torch.Generator"):
        gt.sample_timesteps(3, "uniform", np.random.default_rng(0))
    with pytest.raises(ValueError, match="sample_timesteps: kind must be one of"):
        gt.sample_timesteps(3, "beta")
    with pytest.raises(ValueError, match="sample_timesteps: generator must be given"):
        gt.sample_timesteps(3, "uniform", None, stratified=True, world_size=2)


def test_bad_input_names_op_and_argument():
    """Bad input: ValueError / TypeError whose message names the op and the argument."""
    cases = [
        (lambda: R.sample_timesteps(0), ValueError, "sample_timesteps: n"),
        (lambda: R.sample_timesteps(3, "beta"), ValueError, "sample_timesteps: kind"),
        (lambda: R.sample_timesteps(3, "logit_normal", s=0.0), ValueError, "sample_timesteps: s"),
        (lambda: R.sample_timesteps(3, "lognormal_sigma", p_std=-1.0), ValueError, "sample_timesteps: p_std"),
        (lambda: R.sample_timesteps(3, generator="x"), TypeError, "sample_timesteps: generator"),
        (lambda: R.sample_timesteps(3, "uniform", 0, stratified=True, rank=2, world_size=2), ValueError,
         "sample_timesteps: rank"),
        (lambda: R.timestep_density(np.array([1.2]), "cosmap"), ValueError, "timestep_density: t"),
        (lambda: R.timestep_density(np.array([-1.0]), "lognormal_sigma"), ValueError, "timestep_density: t"),
        (lambda: R.timestep_cdf(np.array([np.nan]), "mode"), ValueError, "timestep_cdf: t"),
        (lambda: R.timestep_quantile(np.array([1.5]), "mode"), ValueError, "timestep_quantile: u"),
        (lambda: R.shift_timesteps(np.array([0.5]), mu=float("nan")), ValueError, "shift_timesteps: mu"),
        (lambda: R.edm_preconditioning(np.array([np.inf])), ValueError, "edm_preconditioning: sigma"),
        (lambda: R.prediction_convert(np.ones((2, 3)), np.ones((2, 3)), np.ones(2), "eps", "score"), ValueError,
         "prediction_convert: target"),
        (lambda: R.prediction_convert(np.ones((2, 3)), np.ones((2, 4)), np.ones(2), "v", "x0"), ValueError,
         "prediction_convert: x_t"),
        (lambda: R.prediction_convert(np.ones((2, 3)), np.ones((2, 3)), np.ones(3), "v", "x0"), ValueError,
         "prediction_convert: t_or_sigma"),
        (lambda: R.prediction_convert(np.ones((2, 3)), np.ones((2, 3)), np.ones(2), "v", "x0", "vp"), ValueError,
         "prediction_convert: schedule"),
        (lambda: R.prediction_convert(np.ones((2, 3)), np.ones((2, 3)), np.ones(2), "v", "x0", "alpha_sigma"),
         TypeError, "prediction_convert: t_or_sigma"),
        (lambda: R.karras_sigmas(10, rho=0.0), ValueError, "karras_sigmas: rho"),
        (lambda: R.ict_sigma_probs(np.array([1.0])), ValueError, "ict_sigma_probs: sigmas"),
        (lambda: R.ict_num_steps(0, 100, s0=0), ValueError, "ict_num_steps: s0"),
    ]  # fmt: skip
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()


def test_torch_helpers_refuse_what_they_cannot_do():
    """The torch helpers computed in torch ops: a dtype they cannot return, an input whose gradient
    they do not compute (SPEC: refused at forward time, never silently dropped), and seeds a
    torch.Generator cannot take are ValueError / TypeError naming the op and the argument; the
    interpolant takes the native ops' dtypes (no integer inputs, no silent promotion)."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    t = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    for name in ("timestep_density", "timestep_cdf", "timestep_quantile"):
        with pytest.raises(ValueError, match=rf"{name}: (t|u) requires grad"):
            getattr(gt, name)(t, "logit_normal")
        with torch.no_grad():  # nothing to refuse there
            assert torch.equal(
                getattr(gt, name)(t, "logit_normal"), getattr(gt, name)(t.detach(), "logit_normal")
            )
    with pytest.raises(ValueError, match="ict_sigma_probs: sigmas requires grad"):
        gt.ict_sigma_probs(gt.karras_sigmas(5, dtype=torch.float64).requires_grad_())
    for fn in (
        lambda: gt.sample_timesteps(3, dtype=torch.int64),
        lambda: gt.karras_sigmas(5, dtype=torch.int64),
    ):
        with pytest.raises(TypeError, match=r"(sample_timesteps|karras_sigmas): dtype must be a floating"):
            fn()
    for seed in (-1, 2**64):
        with pytest.raises(
            ValueError, match="sample_timesteps: generator must be >= 0 and < 18446744073709551616"
        ):
            gt.sample_timesteps(3, generator=seed)
    with pytest.raises(ValueError, match="sample_timesteps: generator must be >= 0, got -1"):
        R.sample_timesteps(3, generator=-1)
    x0, noise, tt = (
        torch.ones(3, 4, dtype=torch.float64),
        torch.zeros(3, 4, dtype=torch.float64),
        torch.rand(3),
    )
    with pytest.raises(TypeError, match=r"flow_interpolant: t must have the dtype of x0"):
        gt.flow_interpolant(x0, noise, tt)
    with pytest.raises(TypeError, match=r"flow_interpolant: x0 must be a floating tensor"):
        gt.flow_interpolant(x0.long(), noise.long(), tt.double())
    with pytest.raises(ValueError, match=r"flow_interpolant: x0 has no elements"):
        gt.flow_interpolant(x0[:0], noise[:0], tt.double()[:0])


# ============================================================================= peers (optional)


def test_diffusers_timestep_sampling():
    """(FLOW.6, FLOW.7) diffusers' compute_density_for_timestep_sampling: its 'logit_normal' and 'mode'
    draws have our densities (KS on 10^6 draws); its 'cosmap' has no branch and returns UNIFORM draws,
    which the cosmap CDF rejects (the peer is not the paper: SD3 Eq. 21); and the examples' recipe
    turns a logit-normal location m into -m on the noise level."""
    torch = pytest.importorskip("torch")
    training_utils = peer("diffusers.training_utils")
    draw = training_utils.compute_density_for_timestep_sampling
    gen = torch.Generator().manual_seed(0)
    u = draw("logit_normal", N_DRAWS, logit_mean=0.3, logit_std=0.8, generator=gen).double().numpy()
    assert (
        _ks(u, lambda t: R.timestep_cdf(t, "logit_normal", m=0.3, s=0.8)) < 2 * KS_CRITICAL
    )  # float32 draws
    u = draw("mode", N_DRAWS, mode_scale=1.29, generator=gen).double().numpy()
    assert _ks(u, lambda t: R.timestep_cdf(np.clip(t, 0, 1), "mode", scale=1.29)) < 2 * KS_CRITICAL
    u = draw("cosmap", N_DRAWS, generator=gen).double().numpy()
    assert _ks(u, lambda t: R.timestep_cdf(t, "cosmap")) > 20 * KS_CRITICAL  # not the cosmap density
    assert _ks(u, lambda t: t) < 2 * KS_CRITICAL  # but uniform
    ours = R.sample_timesteps(N_DRAWS, "cosmap", 0)
    assert _ks(ours, lambda t: R.timestep_cdf(t, "cosmap")) < KS_CRITICAL
    # diffusers' SD3 / Flux training examples index the scheduler's DESCENDING sigmas with u
    # (timesteps[(u * 1000).long()]): the noise level is ~1 - u, so logit_mean m acts as -m on sigma
    schedulers = peer("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    table = schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    u = draw("logit_normal", N_DRAWS, logit_mean=0.3, logit_std=0.8, generator=gen)
    sigma = table[(u * 1000).long()].double().numpy()  # the examples' recipe
    slack = 1e-3 * 1.6  # the 1/1000 grid moves each draw by < 1e-3, where the density is < 1.6
    assert _ks(sigma, lambda t: R.timestep_cdf(t, "logit_normal", m=-0.3, s=0.8)) < 2 * KS_CRITICAL + slack
    assert _ks(sigma, lambda t: R.timestep_cdf(t, "logit_normal", m=0.3, s=0.8)) > 0.05


def test_diffusers_flow_match_shift():
    """(FLOW.9) diffusers' FlowMatchEulerDiscreteScheduler: the static shift of its training sigmas
    and its dynamic (Flux) time_shift at calculate_shift's mu equal shift_timesteps."""
    torch = pytest.importorskip("torch")
    schedulers = peer("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    plain = schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shifted = schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    base = plain.sigmas.double().numpy()
    np.testing.assert_allclose(
        R.shift_timesteps(base, shift=3.0)[0], shifted.sigmas.double().numpy(), rtol=2e-7
    )
    dyn = schedulers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = R.flux_mu(4096 // 4)
    t = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    np.testing.assert_allclose(
        R.shift_timesteps(t.numpy(), mu=mu)[0], dyn.time_shift(mu, 1.0, t).numpy(), rtol=1e-14
    )


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_lognormal_sigma_draws_stay_finite_and_nonzero(dtype):
    """'lognormal_sigma' draws sigma = exp(p_mean + p_std z) with z = Phi^-1(u), u kept in
    [2^-54, 1 - 2^-53] (z within about +-8.3, from the standard library's inverse CDF here). An EDM
    p_mean of 1e3 drew inf everywhere and -1e3 drew 0; the sampler now refuses parameters whose extreme
    draw leaves the output dtype's range (largest finite, smallest subnormal), and accepts them just
    inside, where the extreme quantiles are still finite and nonzero in that dtype. (Below, a draw
    rounds to 0 only under half the smallest subnormal: the refused example there is one e-fold out.)"""
    import statistics

    torch = pytest.importorskip("torch") if dtype != "float64" else None
    z_lo, z_hi = (statistics.NormalDist().inv_cdf(u) for u in (2.0**-54, 1.0 - 2.0**-53))
    info = np.finfo(dtype)
    log_max, log_least = math.log(float(info.max)), math.log(float(info.smallest_subnormal))

    def sample(p_mean):
        if torch is None:
            return R.sample_timesteps(64, "lognormal_sigma", 0, p_mean=p_mean, p_std=1.0)
        from genloss import torch as gt

        out = gt.sample_timesteps(
            64, "lognormal_sigma", 0, p_mean=p_mean, p_std=1.0, dtype=getattr(torch, dtype)
        )
        return out.double().numpy()

    for inside, outside in (
        (log_max - z_hi - 0.01, log_max - z_hi + 0.01),
        (log_least - z_lo + 0.01, log_least - z_lo - 1),
    ):
        assert np.all(np.isfinite(sample(inside)) & (sample(inside) > 0))
        ends = R.timestep_quantile(
            np.array([2.0**-54, 1.0 - 2.0**-53]), "lognormal_sigma", p_mean=inside, p_std=1.0
        )
        assert np.all(np.isfinite(ends.astype(dtype)) & (ends.astype(dtype) > 0))
        with np.errstate(over="ignore", under="ignore"):  # the draw the refusal prevents: inf or 0
            bad = R.timestep_quantile(
                np.array([2.0**-54, 1.0 - 2.0**-53]), "lognormal_sigma", p_mean=outside, p_std=1.0
            )
            assert not np.all(np.isfinite(bad.astype(dtype)) & (bad.astype(dtype) > 0))
        with pytest.raises(ValueError, match=f"sample_timesteps: p_mean = .* outside {dtype}'s range"):
            sample(outside)
