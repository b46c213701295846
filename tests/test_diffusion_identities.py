r"""Identities of the diffusion family, checked against the NumPy reference.

Every assertion compares ``genloss.reference.diffusion`` with a value computed here
independently of it: central finite differences; schedules rebuilt with ``np.cumprod``;
the forward chain run one step at a time; Bayes' rule evaluated on a grid; Gaussian
KLs and CDFs written from the textbook formulas with ``math.erf``; ``mpmath`` at high
precision; quadrature; or a Monte-Carlo estimate.  The equations are derived in
``derivations/diffusion.md`` (tags ``DIF.n``).  Timesteps are 0-based: index t is the
paper's step t + 1.

Monte-Carlo checks use fixed seeds and accept a deviation of at most ``Z_MC`` standard
errors (estimated from the same samples): deterministic, and a wrong constant is many
standard errors off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fd import check_fd as _check_fd
from fd import weights as _weights
from genloss.reference import diffusion as R
from tolerances import assert_all_finite

REDUCTIONS = ("none", "sum", "mean")
Z_MC = 4.0
# Closed forms vs the reference: a few hundred O(1) float64 operations; schedules built
# by cumprod here and in log space there differ by ~T ulp = 1e-13 relative.
TIGHT = dict(rtol=1e-10, atol=1e-12)


# ============================================================================= independent helpers


def _schedule_by_cumprod(betas):
    """The schedule's arrays the textbook way (DDPM's code): cumprod, no logs."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return dict(
        betas=betas,
        alphas=alphas,
        abar=abar,
        abar_prev=abar_prev,
        post_var=post_var,
        post_logvar_clipped=np.log(np.append(post_var[1], post_var[1:])),
        coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        snr=abar / (1.0 - abar),
    )


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _Phi(z):
    """The standard normal CDF from math.erf, with the infinities of the open bins."""
    z = np.asarray(z, dtype=np.float64)
    out = 0.5 * (1.0 + _erf(np.where(np.isfinite(z), z, 0.0) / math.sqrt(2.0)))
    return np.where(np.isposinf(z), 1.0, np.where(np.isneginf(z), 0.0, out))


def _bin_probability(x, mean, log_scale, bits):
    """P(bin of x) under N(mean, e^{2 log_scale}), edge bins open, from _Phi (no logs)."""
    h = 1.0 / (2**bits - 1)
    s = np.exp(log_scale)
    lo = np.where(x <= -1.0 + 1e-9, -np.inf, (x - mean - h) / s)
    hi = np.where(x >= 1.0 - 1e-9, np.inf, (x - mean + h) / s)
    return _Phi(hi) - _Phi(lo)


def _gauss_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) from the textbook formula with variances (not log-variances)."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def _grid_levels(bits):
    return -1.0 + 2.0 * np.arange(2**bits) / (2**bits - 1)


LINEAR = R.DiffusionSchedule(R.linear_betas(1000))
COSINE = R.DiffusionSchedule(R.cosine_betas(1000))
SHORT = R.DiffusionSchedule(R.linear_betas(20, 1e-3, 0.3))  # few steps, large betas


def _on_grid(rng, shape, bits=8):
    return _grid_levels(bits)[rng.integers(0, 2**bits, size=shape)]


# ============================================================================= finite differences, every op

SHAPES = [(1,), (3,), (2, 5), (3, 2, 4)]


@pytest.mark.parametrize("cdf", ["exact", "tanh"])
@pytest.mark.parametrize(
    ("bits", "scale_shape"), [(8, (4, 6)), (3, (4, 6)), (1, (4, 6)), (8, (6,)), (3, ())], ids=str
)
def test_discretized_log_likelihood_backward_fd(bits, scale_shape, cdf):
    """Interior and both open edge bins, log-scales per element, per feature or one scalar."""
    rng = np.random.default_rng(20 + bits)
    x = _on_grid(rng, (4, 6), bits)
    x[0, :2], x[1, :2] = -1.0, 1.0  # edge bins
    spread = 1.0 if cdf == "exact" else 0.3  # tanh: stay where its clamp is inactive
    means = x + spread * rng.normal(scale=0.05, size=x.shape)
    log_scales = rng.uniform(-4.0, -1.5, size=scale_shape)
    _check_fd(
        f"discretized_gaussian_log_likelihood({cdf}, bits={bits})",
        lambda m, s: R.discretized_gaussian_log_likelihood(x, m, s, bits, cdf),
        lambda m, s, go: R.discretized_gaussian_log_likelihood_backward(x, m, s, go, bits, cdf),
        [means, log_scales],
        _weights(rng, x.shape),
        (0, 1),
    )


# ============================================================================= schedules (DIF.1, DIF.2, DIF.3, DIF.15)


@pytest.mark.parametrize("name", ["linear", "cosine", "short", "zero_terminal"])
def test_schedule_arrays_against_definitions(name):
    """Every array of DiffusionSchedule against the textbook (cumprod) construction."""
    betas = {
        "linear": R.linear_betas(1000),
        "cosine": R.cosine_betas(1000),
        "short": R.linear_betas(20, 1e-3, 0.3),
        "zero_terminal": np.append(R.linear_betas(9, 0.01, 0.2), 1.0),
    }[name]
    s = R.DiffusionSchedule(betas)
    d = _schedule_by_cumprod(betas)
    np.testing.assert_array_equal(s.betas, betas)
    np.testing.assert_allclose(s.alphas, d["alphas"], **TIGHT)
    np.testing.assert_allclose(s.alpha_bar, d["abar"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(s.alpha_bar_prev, d["abar_prev"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(s.sqrt_alpha_bar, np.sqrt(d["abar"]), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(s.sqrt_one_minus_alpha_bar, np.sqrt(1 - d["abar"]), rtol=1e-12)
    np.testing.assert_allclose(s.posterior_variance, d["post_var"], rtol=1e-10)
    assert s.posterior_variance[0] == 0.0  # the posterior at t = 0 is the point mass at x0
    np.testing.assert_allclose(s.posterior_log_variance_clipped, d["post_logvar_clipped"], rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef1, d["coef1"], rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef2, d["coef2"], rtol=1e-10, atol=1e-300)
    assert (s.posterior_mean_coef1[0], s.posterior_mean_coef2[0]) == (1.0, 0.0)
    np.testing.assert_allclose(s.snr, d["snr"], rtol=1e-10, atol=1e-300)
    finite = d["abar"] > 0
    np.testing.assert_allclose(s.log_snr[finite], np.log(d["snr"][finite]), rtol=1e-10, atol=1e-12)
    # 1 - abar_0 = beta_0 to the ulp (the log-space construction; cumprod loses ~8 digits at 1e-4)
    assert abs(s.one_minus_alpha_bar[0] - betas[0]) <= 2 * np.spacing(betas[0])
    if name == "zero_terminal":
        assert s.alpha_bar[-1] == 0.0 and s.log_snr[-1] == -np.inf and s.snr[-1] == 0.0
    with pytest.raises(ValueError):
        s.betas[0] = 0.5  # read-only


def test_beta_schedules_against_their_definitions():
    """(DIF.1) linear = evenly spaced; cosine = 1 - f(t+1)/f(t), clipped, and abar = f(t+1)/f(0)."""
    np.testing.assert_allclose(R.linear_betas(5, 0.1, 0.5), [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-15)
    T, s = 1000, 0.008

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    direct = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    cos = R.cosine_betas(T)
    # the direct ratio loses ~log10(1/beta_0) = 4.4 digits at t = 0: compare at that accuracy
    np.testing.assert_allclose(cos, direct, rtol=1e-11)
    abar = np.cumprod(1 - cos)
    unclipped = cos < 0.999
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-9)
    assert np.sum(~unclipped) == 1 and not unclipped[-1]  # only the last step is clipped
    assert R.cosine_betas(T, max_beta=1.0)[-1] == 1.0  # f(1) = 0: zero terminal SNR when unclipped


# ============================================================================= the forward process (DIF.2)


@pytest.mark.parametrize("sched", [LINEAR, COSINE, SHORT], ids=["linear", "cosine", "short"])
def test_marginal_equals_chain_of_single_steps(sched):
    """(DIF.2) mean and variance of x_t | x0 propagated through the T single steps
    x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e_t, exactly (a scalar recursion), equal the
    closed-form marginal that q_sample uses at EVERY t."""
    x0 = np.array([0.7, -1.0, 0.0])
    m, v = x0.copy(), np.zeros(3)
    T = sched.num_timesteps
    means, variances = np.empty((T, 3)), np.empty(T)
    for k, beta in enumerate(sched.betas):
        m = math.sqrt(1.0 - beta) * m
        v = (1.0 - beta) * v + beta
        means[k], variances[k] = m, v[0]
    t = np.arange(T)
    x0s = np.tile(x0, (T, 1))
    closed_mean = R.q_sample(x0s, t, np.zeros_like(x0s), sched)  # noise 0: the mean
    closed_sd = R.q_sample(np.zeros_like(x0s), t, np.ones_like(x0s), sched)[:, 0]  # x0 0, noise 1: the sd
    np.testing.assert_allclose(closed_mean, means, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(closed_sd**2, variances, rtol=1e-11)


def test_marginal_sampled_chain():
    """(DIF.2) 200k chains run step by step with fresh noise: at several t the regression of x_t
    on a random (uniform) x0 has slope sqrt(abar_t), intercept 0 and residual variance 1 - abar_t;
    q_sample's draws have the same two moments."""
    rng = np.random.default_rng(7)
    sched, n = SHORT, 200_000
    x0 = rng.uniform(-1, 1, size=n)
    x = x0.copy()
    for k in range(sched.num_timesteps):
        x = math.sqrt(sched.alphas[k]) * x + math.sqrt(sched.betas[k]) * rng.standard_normal(n)
        if k not in (0, 4, 19):
            continue
        direct = R.q_sample(x0[:, None], np.full(n, k), rng.standard_normal((n, 1)), sched)[:, 0]
        for sample in (x, direct):
            slope = np.cov(sample, x0)[0, 1] / x0.var(ddof=1)
            resid = sample - slope * x0
            se_slope = resid.std() / (x0.std() * math.sqrt(n))
            assert abs(slope - sched.sqrt_alpha_bar[k]) < Z_MC * se_slope, (k, slope)
            assert abs(resid.mean()) < Z_MC * resid.std() / math.sqrt(n)
            var, target = resid.var(ddof=1), 1.0 - sched.alpha_bar[k]
            assert abs(var - target) < Z_MC * target * math.sqrt(2.0 / n), (k, var, target)


# ============================================================================= the posterior (DIF.3, DIF.7)


@pytest.mark.parametrize("k", [1, 2, 30, 500, 999])
def test_posterior_matches_bayes_on_a_grid(k):
    """(DIF.3) q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), normalised on a grid of
    x_{t-1}: its mean and variance by quadrature equal q_posterior's; so does the precision-
    weighted completion of the square written separately."""
    sched, d = LINEAR, _schedule_by_cumprod(LINEAR.betas)
    x0, x_t = np.array([[0.6]]), np.array([[-0.3]])
    beta, alpha, abar_prev = d["betas"][k], d["alphas"][k], d["abar_prev"][k]
    prec = alpha / beta + 1.0 / (1.0 - abar_prev)  # completing the square, independently
    m_sq = (math.sqrt(alpha) * x_t[0, 0] / beta + math.sqrt(abar_prev) * x0[0, 0] / (1 - abar_prev)) / prec
    grid = m_sq + np.linspace(-14, 14, 20_001) / math.sqrt(prec)
    log_dens = -((x_t[0, 0] - math.sqrt(alpha) * grid) ** 2) / (2 * beta) - (
        (grid - math.sqrt(abar_prev) * x0[0, 0]) ** 2
    ) / (2 * (1 - abar_prev))
    w = np.exp(log_dens - log_dens.max())
    z = np.trapezoid(w, grid)
    mean_q = np.trapezoid(w * grid, grid) / z
    var_q = np.trapezoid(w * (grid - mean_q) ** 2, grid) / z
    mean, var, log_var = R.q_posterior(x0, x_t, np.array([k]), sched)
    np.testing.assert_allclose(mean[0, 0], mean_q, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var[0, 0], var_q, rtol=1e-8)
    np.testing.assert_allclose(mean[0, 0], m_sq, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(var[0, 0], 1.0 / prec, rtol=1e-10)
    np.testing.assert_allclose(log_var[0, 0], math.log(1.0 / prec), rtol=1e-10)


def test_eps_posterior_mean_equals_posterior_mean():
    """(DIF.7) with the true noise, x0 from eps is x0 and the eps-form mean is the posterior mean;
    with any eps, the eps-form mean is the posterior mean at the implied x0."""
    rng = np.random.default_rng(8)
    for sched in (LINEAR, COSINE):
        t = np.arange(0, 1000, 37)
        x0, eps = rng.uniform(-1, 1, (len(t), 5)), rng.normal(size=(len(t), 5))
        x_t = R.q_sample(x0, t, eps, sched)
        np.testing.assert_allclose(R.predict_x0_from_eps(x_t, t, eps, sched), x0, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(
            R.posterior_mean_from_eps(x_t, t, eps, sched), R.q_posterior(x0, x_t, t, sched)[0], **TIGHT
        )
        other = rng.normal(size=x0.shape)
        implied = R.predict_x0_from_eps(x_t, t, other, sched)
        np.testing.assert_allclose(
            R.posterior_mean_from_eps(x_t, t, other, sched),
            R.q_posterior(implied, x_t, t, sched)[0],
            rtol=1e-9,
            atol=1e-9,
        )


# ============================================================================= the bound (DIF.4-DIF.9)


def test_vlb_term_against_direct_gaussian_kl_and_decoder():
    """(DIF.6, DIF.8, DIF.9) vlb_term = the textbook Gaussian KL (variances from cumprod) for t > 0
    and minus the log of the bin probability (math.erf) at t = 0; fixed and learned variances."""
    rng = np.random.default_rng(9)
    sched, d = SHORT, _schedule_by_cumprod(SHORT.betas)
    t = np.array([0, 1, 5, 19, 0])
    x0 = _on_grid(rng, (5, 4))
    eps = rng.normal(size=x0.shape)
    x_t = np.sqrt(d["abar"][t])[:, None] * x0 + np.sqrt(1 - d["abar"][t])[:, None] * eps
    eps_pred = eps + rng.normal(scale=0.5, size=x0.shape)
    mu = (x_t - (d["betas"][t] / np.sqrt(1 - d["abar"][t]))[:, None] * eps_pred) / np.sqrt(d["alphas"][t])[
        :, None
    ]
    true_mu = d["coef1"][t][:, None] * x0 + d["coef2"][t][:, None] * x_t
    fixed_large = np.append(d["post_var"][1], d["betas"][1:])  # DDPM's fixedlarge
    v = rng.uniform(-1, 1, size=x0.shape)
    log_lo, log_hi = d["post_logvar_clipped"][t][:, None], np.log(d["betas"][t])[:, None]
    learned = np.exp((v + 1) / 2 * log_hi + (1 - v) / 2 * log_lo)
    for var_model, arg in [(np.broadcast_to(fixed_large[t][:, None], x0.shape), None), (learned, v)]:
        kl = _gauss_kl(true_mu, np.exp(d["post_logvar_clipped"][t])[:, None], mu, var_model).sum(axis=1)
        nll = -np.log(_bin_probability(x0, mu, 0.5 * np.log(var_model), 8)).sum(axis=1)
        expected = np.where(t == 0, nll, kl)
        np.testing.assert_allclose(R.vlb_term(x0, x_t, t, eps_pred, sched, arg), expected, rtol=1e-9)
        np.testing.assert_allclose(
            R.vlb_term(x0, x_t, t, eps_pred, sched, arg, "mean"), expected.mean(), rtol=1e-9
        )


def test_learned_range_endpoints():
    """(DIF.8) v = +1 is sigma^2 = beta_t (the fixed variance for t >= 1); v = -1 is the posterior
    variance, so with the true noise every KL term vanishes."""
    rng = np.random.default_rng(10)
    sched = SHORT
    t = np.arange(1, 20)
    x0, eps = _on_grid(rng, (19, 3)), rng.normal(size=(19, 3))
    x_t = R.q_sample(x0, t, eps, sched)
    ones = np.ones_like(x0)
    np.testing.assert_allclose(
        R.vlb_term(x0, x_t, t, eps + 0.3, sched, ones), R.vlb_term(x0, x_t, t, eps + 0.3, sched), **TIGHT
    )
    np.testing.assert_allclose(R.vlb_term(x0, x_t, t, eps, sched, -ones), 0.0, atol=1e-12)
    # with sigma^2 = beta_t the true noise leaves only the variance mismatch: n/2 (r - 1 - log r)
    d = _schedule_by_cumprod(sched.betas)
    r = d["post_var"][t] / d["betas"][t]
    np.testing.assert_allclose(R.vlb_term(x0, x_t, t, eps, sched), 1.5 * (r - 1 - np.log(r)), rtol=1e-8)


def test_prior_kl_vanishes_for_long_schedules():
    """(DIF.5) L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) summed: the textbook formula;
    below 1e-4 nats per dimension for T = 1000 (linear, cosine), large for a 10-step schedule,
    and exactly 0 at zero terminal SNR."""
    rng = np.random.default_rng(11)
    x0 = rng.uniform(-1, 1, (4, 3, 2))
    for sched in (LINEAR, COSINE, R.DiffusionSchedule(R.linear_betas(10))):
        abar = np.cumprod(1 - sched.betas)[-1]
        direct = _gauss_kl(math.sqrt(abar) * x0, 1 - abar, 0.0, 1.0).reshape(4, -1).sum(axis=1)
        np.testing.assert_allclose(R.prior_kl(x0, sched), direct, rtol=1e-6)  # direct cancels at 1e-5
        np.testing.assert_allclose(R.prior_kl(x0, sched, "sum"), direct.sum(), rtol=1e-6)
    assert np.all(R.prior_kl(x0, LINEAR) < 1e-4 * 6) and np.all(R.prior_kl(x0, COSINE) < 1e-8 * 6)
    assert np.all(R.prior_kl(x0, R.DiffusionSchedule(R.linear_betas(10))) > 0.1)
    zero = R.DiffusionSchedule(np.append(R.linear_betas(9, 0.01, 0.2), 1.0))
    assert np.all(R.prior_kl(x0, zero) == 0.0)
    # the series used for small abar_T, against the exact value at high precision
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for a in (1e-12, 4.0358e-5, 0.03, 0.2, 0.9):
        betas = [0.05, 1 - a / 0.95]  # abar_T = 0.95 (1 - beta_1) = a
        s = R.DiffusionSchedule(betas)
        a_exact = (1 - mpmath.mpf(betas[0])) * (1 - mpmath.mpf(betas[1]))
        exact = 0.5 * (-a_exact - mpmath.log(1 - a_exact))
        np.testing.assert_allclose(R.prior_kl(np.zeros((1, 1)), s), [float(exact)], rtol=1e-12)


def test_full_bound_for_a_point_mass_with_its_exact_denoiser():
    """(DIF.4) data = one point c; the exact denoiser eps*(x_t) = (x_t - sqrt(abar) c)/sqrt(1 - abar)
    recovers the noise, so with sigma^2 = posterior variance (v = -1) every KL term is 0 and the
    bound is L_T + the decoder NLL of bins centred at c; with sigma^2 = beta it adds the variance
    mismatch n/2 (r - 1 - log r) at every step.  Both are deterministic: any noise draw gives them."""
    sched = SHORT
    d = _schedule_by_cumprod(sched.betas)
    c = _grid_levels(8)[np.array([[0, 153, 255], [127, 204, 51]])]  # both edge bins and interior ones

    def exact(x_t, t):
        ab = d["abar"][t][:, None]
        return (x_t - np.sqrt(ab) * c) / np.sqrt(1 - ab)

    abar_T = d["abar"][-1]
    l_T = _gauss_kl(math.sqrt(abar_T) * c, 1 - abar_T, 0.0, 1.0).sum(axis=1)
    decoder = -np.log(_bin_probability(c, c, 0.5 * np.log(d["post_var"][1]), 8)).sum(axis=1)
    got = R.full_bound(c, lambda x, t: (exact(x, t), -np.ones_like(x)), sched, np.random.default_rng(0))
    np.testing.assert_allclose(got, l_T + decoder, rtol=1e-8)
    r = d["post_var"][1:] / d["betas"][1:]
    mismatch = 1.5 * np.sum(r - 1 - np.log(r))
    got = R.full_bound(c, exact, sched, np.random.default_rng(1))
    np.testing.assert_allclose(got, l_T + decoder + mismatch, rtol=1e-8)
    bpd = R.to_bits_per_dim(got, 3)
    np.testing.assert_allclose(bpd, got / (3 * math.log(2)), rtol=1e-15)


# ============================================================================= the discretized decoder (DIF.9-DIF.11)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_discretized_likelihood_sums_to_one(bits):
    """(DIF.9) the 2^bits bin probabilities (exact cdf) of any Gaussian sum to 1, including
    Gaussians far outside [-1, 1] and very narrow or wide ones."""
    rng = np.random.default_rng(12 + bits)
    levels = _grid_levels(bits)[:, None]
    # The bins tile the line only up to the rounding of the levels (~1e-16): a Gaussian of scale s
    # sitting ON a bin boundary sees gaps of ~1e-16/s standard units, so the narrow one (s = 6e-6)
    # is centred on a level, where the identity holds to rounding.
    level = _grid_levels(bits)[len(_grid_levels(bits)) // 2]
    means = np.concatenate([rng.uniform(-1.5, 1.5, 40), [-30.0, 30.0, level, 1.0]])
    log_scales = np.concatenate([rng.uniform(-7, 2, 40), [0.0, 0.0, -12.0, 6.0]])
    logp = R.discretized_gaussian_log_likelihood(levels, means, log_scales, bits)
    assert logp.shape == (2**bits, 44) and np.all(logp <= 0)
    total = np.exp(logp).sum(axis=0)
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    # and each bin against Phi from math.erf where the probabilities are not tiny
    direct = _bin_probability(np.broadcast_to(levels, logp.shape), means, log_scales, bits)
    np.testing.assert_allclose(np.exp(logp), direct, rtol=0, atol=1e-14)


def test_discretized_likelihood_against_mpmath():
    """(DIF.9, DIF.10) log P(bin) against 50-digit mpmath, including far tails where Phi underflows
    (z down to -1e3, both edge bins from either side): relative 1e-12 on the log-probability."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    h = mpmath.mpf(1) / 255
    cases = [  # (x, mean, log_scale)
        (0.2 + 1 / 255 * 0, 0.21, -4.0),
        (-1.0, 0.3, -3.0),  # lowest bin, mean far above: z_+ ~ -26
        (1.0, -0.5, -2.0),  # highest bin, mean far below: z_- ~ 11
        (-1.0, -1.5, -1.0),  # lowest bin, most mass inside
        (1.0, 2.0, 0.0),  # highest bin, most mass inside
        (0.0, 40.0, -1.0),  # interior, z ~ -108
        (0.0, -5.0, -5.3),  # interior, z ~ 1e3 (upper tail)
        (0.5, 0.5, 3.0),  # wide Gaussian: a narrow bin in standard units
    ]
    for x, mean, ls in cases:
        x = float(np.round((x + 1) * 127.5) / 127.5 - 1)
        xm, mm, s = mpmath.mpf(x), mpmath.mpf(mean), mpmath.exp(mpmath.mpf(ls))
        lo = -mpmath.inf if x == -1.0 else (xm - mm - h) / s
        hi = mpmath.inf if x == 1.0 else (xm - mm + h) / s
        if lo + hi > 0:  # the upper side, written by symmetry so mpmath does not cancel
            p = mpmath.ncdf(-lo) - mpmath.ncdf(-hi)
        else:
            p = mpmath.ncdf(hi) - mpmath.ncdf(lo)
        got = float(R.discretized_gaussian_log_likelihood(np.array(x), np.array(mean), np.array(ls)))
        assert math.isfinite(got)
        np.testing.assert_allclose(got, float(mpmath.log(p)), rtol=1e-12, err_msg=str((x, mean, ls)))


def test_log_ndtr_against_mpmath():
    """(DIF.10) the stable log Phi and its derivative phi/Phi over 200 orders of magnitude of Phi."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    z = np.array([-1e4, -300.0, -38.6, -20.5, -20.0, -19.5, -7.0, -1.0, 0.0, 0.3, 2.0, 6.0, 8.5])
    got, slope = R.log_ndtr(z), R.log_ndtr_grad(z)
    for zi, gi, si in zip(z, got, slope, strict=True):
        exact = mpmath.log(mpmath.ncdf(zi))
        np.testing.assert_allclose(gi, float(exact), rtol=1e-13, atol=1e-300)
        np.testing.assert_allclose(si, float(mpmath.npdf(zi) / mpmath.ncdf(zi)), rtol=1e-13)
    assert R.log_ndtr(np.array(np.inf)) == 0.0 and R.log_ndtr(np.array(-np.inf)) == -np.inf


def test_exact_and_tanh_agree_to_the_approximation_accuracy():
    """(DIF.11) |P_exact - P_tanh| <= 2 max|Phi_tanh - Phi| (measured here on a fine grid against
    math.erf) wherever tanh's clamp is inactive; where the true probability is below 1e-12 the
    tanh path returns log(1e-12) exactly while the exact path keeps the true, far smaller value."""
    z = np.linspace(-10, 10, 200_001)
    approx = 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    err = np.abs(approx - _Phi(z)).max()
    assert 1e-4 < err < 1e-3  # the approximation's own accuracy (about 2e-4)
    rng = np.random.default_rng(14)
    x = np.broadcast_to(_grid_levels(8)[:, None], (256, 60))
    means = rng.uniform(-1.2, 1.2, 60)
    log_scales = rng.uniform(-6, 0, 60)
    exact = R.discretized_gaussian_log_likelihood(x, means, log_scales, cdf="exact")
    tanh = R.discretized_gaussian_log_likelihood(x, means, log_scales, cdf="tanh")
    live = tanh > math.log(1e-12) + 1e-9
    assert np.all(np.abs(np.exp(exact) - np.exp(tanh))[live] <= 2 * err)
    tiny = np.exp(exact) < 1e-13
    assert tiny.sum() > 1000
    np.testing.assert_array_equal(tanh[tiny], math.log(1e-12))
    assert np.all(exact[tiny] < math.log(1e-13)) and np.all(np.isfinite(exact))


# ============================================================================= L_simple and the weights it drops (DIF.12, DIF.13)


def _bound_weights(sched, variance):
    """lambda_t measured THROUGH vlb_term: (vlb(eps + delta) - vlb(eps)) / ||delta||^2, t >= 1."""
    rng = np.random.default_rng(15)
    T = sched.num_timesteps
    t = np.arange(1, T)
    x0, eps = _on_grid(rng, (T - 1, 2)), rng.normal(size=(T - 1, 2))
    delta = np.array([0.1, -0.05])
    x_t = R.q_sample(x0, t, eps, sched)
    v = None if variance == "beta" else -np.ones_like(x0)
    gap = R.vlb_term(x0, x_t, t, eps + delta, sched, v) - R.vlb_term(x0, x_t, t, eps, sched, v)
    return gap / np.sum(delta**2)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_lsimple_drops_weights_largest_at_small_t(name, variance):
    """(DIF.13) The bound's weight on ||eps - eps_hat||^2 at step t >= 1 (0-based) is
    lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)); with sigma^2 = posterior variance
    it is 1/2 (snr_{t-1}/snr_t - 1).  L_simple replaces it by a constant.  Over every step with
    snr > 1 (the low-noise steps, where x_t determines x0 best) lambda_t falls strictly with t and
    is largest at the first KL step, tens of times its median: relative to the bound, L_simple
    DOWN-weights the EASY small-t steps and gives more weight to the noisier, harder ones -- the
    notes' claim ("down-weights difficult denoising steps") is backwards.  For DDPM's linear
    schedule this holds for the easy half as a group too; the cosine schedule's bound also puts a
    large weight on its last steps (log-SNR falls fastest there; the final beta is clipped)."""
    sched = LINEAR if name == "linear" else COSINE
    d = _schedule_by_cumprod(sched.betas)
    measured = _bound_weights(sched, variance)
    k = np.arange(1, sched.num_timesteps)
    b, a, abar, abar_prev = d["betas"][k], d["alphas"][k], d["abar"][k], d["abar_prev"][k]
    sigma2 = b if variance == "beta" else d["post_var"][k]
    lam = b**2 / (2 * sigma2 * a * (1 - abar))
    np.testing.assert_allclose(measured, lam, rtol=1e-7)
    if variance == "posterior":
        snr, snr_prev = abar / (1 - abar), abar_prev / (1 - abar_prev)
        np.testing.assert_allclose(lam, 0.5 * (snr_prev / snr - 1), rtol=1e-9)
    snr = abar / (1 - abar)
    easy = snr > 1
    difficulty = 1 / (1 + snr)  # x0's posterior variance given x_t, unit-variance Gaussian data
    assert np.all(np.diff(difficulty) > 0)  # harder as t grows
    assert np.all(np.diff(lam[easy]) < 0)  # bound weight falls over the low-noise steps...
    assert np.argmax(lam[easy]) == 0  # ...from its peak at the first KL step
    assert lam[0] / np.median(lam) > 30
    relative = (1 / lam) / np.mean(1 / lam)  # L_simple's weight per step relative to the bound's
    assert np.all(np.diff(relative[easy]) > 0)  # rises with difficulty on the easy steps
    if name == "linear":
        assert np.argmax(lam) == 0
        bound_share = lam[easy].sum() / lam.sum()  # share of the bound's weight on snr > 1
        simple_share = easy.mean()  # share of L_simple's weight on them
        assert bound_share > 0.45 and simple_share < 0.27
        assert simple_share / bound_share < 0.6  # the easy group is down-weighted as a whole
    else:
        assert np.argmax(lam) == len(lam) - 1  # the clipped final step: 1/2 (snr_{T-1}/snr_T - 1) ~ 500
        assert lam[-1] > 400


# ============================================================================= MSE losses, v-prediction, weights (DIF.12, DIF.14, DIF.15)


def test_diffusion_mse_loss_targets():
    """(DIF.12, DIF.14) each parameterisation against its hand-built target (per-sample MEAN over
    dims), weights and reductions; eps_mse_loss is the 'eps' case."""
    rng = np.random.default_rng(16)
    d = _schedule_by_cumprod(COSINE.betas)
    t = np.array([0, 10, 500, 998, 999])
    x0, noise, pred = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 3))
    w = rng.uniform(0, 2, 5)
    sa, so = np.sqrt(d["abar"][t])[:, None, None], np.sqrt(1 - d["abar"][t])[:, None, None]
    targets = {"eps": noise, "x0": x0, "v": sa * noise - so * x0}
    np.testing.assert_allclose(R.v_target(x0, t, noise, COSINE), targets["v"], **TIGHT)
    for prediction, target in targets.items():
        per = ((target - pred) ** 2).mean(axis=(1, 2))
        for weights, ww in ((None, 1.0), (w, w)):
            np.testing.assert_allclose(
                R.diffusion_mse_loss(pred, x0, noise, t, COSINE, prediction, weights, "none"),
                ww * per,
                **TIGHT,
            )
            np.testing.assert_allclose(
                R.diffusion_mse_loss(pred, x0, noise, t, COSINE, prediction, weights),
                np.mean(ww * per),
                **TIGHT,
            )
            np.testing.assert_allclose(
                R.diffusion_mse_loss(pred, x0, noise, t, COSINE, prediction, weights, "sum"),
                np.sum(ww * per),
                **TIGHT,
            )
    np.testing.assert_allclose(
        R.eps_mse_loss(pred, noise, w, "none"), w * ((noise - pred) ** 2).mean(axis=(1, 2)), **TIGHT
    )


@pytest.mark.parametrize("kind", R.SNR_WEIGHTINGS)
def test_snr_weights_make_parameterisations_agree(kind):
    """(DIF.14, DIF.15) one denoiser written as an eps, x0 or v prediction: the three errors obey
    ||x0 - x0^||^2 = ||eps - eps^||^2 / snr = ||v - v^||^2 / (snr + 1), so the weighted losses
    with snr_weights(kind, prediction) are one and the same number."""
    rng = np.random.default_rng(17)
    sched = LINEAR
    t = np.array([1, 30, 200, 600, 999])
    x0, eps = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    x_t = R.q_sample(x0, t, eps, sched)
    eps_hat = eps + rng.normal(scale=0.2, size=x0.shape)
    x0_hat = R.predict_x0_from_eps(x_t, t, eps_hat, sched)
    sa, so = sched.sqrt_alpha_bar[t][:, None], sched.sqrt_one_minus_alpha_bar[t][:, None]
    v_hat = sa * eps_hat - so * x0_hat  # the same denoiser's v
    snr = sched.snr[t]
    e_eps = ((eps - eps_hat) ** 2).mean(axis=1)
    np.testing.assert_allclose(((x0 - x0_hat) ** 2).mean(axis=1), e_eps / snr, rtol=1e-8)
    np.testing.assert_allclose(
        ((R.v_target(x0, t, eps, sched) - v_hat) ** 2).mean(axis=1), e_eps * (snr + 1) / snr, rtol=1e-8
    )
    losses = [
        R.diffusion_mse_loss(p, x0, eps, t, sched, pr, R.snr_weights(t, sched, kind, pr), "none")
        for p, pr in ((eps_hat, "eps"), (x0_hat, "x0"), (v_hat, "v"))
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-8)
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-8)


@pytest.mark.parametrize("prediction", R.PREDICTIONS)
def test_snr_weights_definitions(prediction):
    """(DIF.15) each kind against its definition in snr, at moderate snr (gamma = 5 and 2)."""
    t = np.arange(0, 1000, 7)
    snr = _schedule_by_cumprod(LINEAR.betas)["snr"][t]
    for gamma in (5.0, 2.0):
        x0_weight = {
            "snr": snr,
            "min_snr": np.minimum(snr, gamma),
            "soft_min_snr": 1 / (1 / snr + 1 / gamma),
            "truncated_snr": np.maximum(snr, 1.0),
        }
        to_pred = {"eps": 1 / snr, "x0": np.ones_like(snr), "v": 1 / (snr + 1)}[prediction]
        for kind, w in x0_weight.items():
            np.testing.assert_allclose(
                R.snr_weights(t, LINEAR, kind, prediction, gamma), w * to_pred, rtol=1e-9, err_msg=kind
            )
    np.testing.assert_allclose(R.snr_weights(t, LINEAR, "snr", "eps"), 1.0, rtol=0)  # L_simple


def test_snr_weights_finite_at_zero_and_infinite_snr():
    """(DIF.15) a schedule whose first step has snr = 1/beta_0 beyond float64 (beta_0 = 5e-324:
    snr overflows to inf) and whose last has snr = 0 exactly (beta = 1): every bounded weight is
    finite with the right limit; the three unbounded ones raise instead of returning inf."""
    sched = R.DiffusionSchedule(np.concatenate([[5e-324], R.linear_betas(8, 0.01, 0.3), [1.0]]))
    assert sched.snr[0] == np.inf and np.isfinite(sched.log_snr[0]) and sched.log_snr[0] > 700
    assert sched.snr[-1] == 0.0 and sched.log_snr[-1] == -np.inf
    t = np.array([0, 4, 9])
    gamma = 5.0
    limits = {  # (weight at snr = inf, weight at snr = 0)
        ("min_snr", "eps"): (0.0, 1.0),
        ("min_snr", "x0"): (gamma, 0.0),
        ("min_snr", "v"): (0.0, 0.0),
        ("soft_min_snr", "eps"): (0.0, 1.0),
        ("soft_min_snr", "x0"): (gamma, 0.0),
        ("soft_min_snr", "v"): (0.0, 0.0),
        ("snr", "eps"): (1.0, 1.0),
        ("snr", "v"): (1.0, 0.0),
        ("truncated_snr", "v"): (1.0, 1.0),
    }
    for (kind, prediction), (at_inf, at_zero) in limits.items():
        w = R.snr_weights(t, sched, kind, prediction, gamma)
        assert_all_finite(w, f"{kind}/{prediction}")
        np.testing.assert_allclose(w[[0, 2]], [at_inf, at_zero], atol=1e-300, err_msg=f"{kind}/{prediction}")
    for kind, prediction, bad_t in [
        ("snr", "x0", 0),
        ("truncated_snr", "x0", 0),
        ("truncated_snr", "eps", 9),
    ]:
        with pytest.raises(ValueError, match=r"^[a-z_0-9]+: kind="):
            R.snr_weights(t, sched, kind, prediction)
        ok = np.array([4])
        assert_all_finite(R.snr_weights(ok, sched, kind, prediction), f"{kind}/{prediction} at moderate snr")
        with pytest.raises(ValueError, match=r"^[a-z_0-9]+: kind="):
            R.snr_weights(np.array([bad_t]), sched, kind, prediction)


# ============================================================================= VDM (DIF.16, DIF.17)


def _vp_state(x0, eps, gamma):
    """z = alpha x0 + sigma eps with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
    alpha = np.sqrt(1 / (1 + np.exp(gamma)))[:, None]
    sigma = np.sqrt(1 / (1 + np.exp(-gamma)))[:, None]
    return alpha * x0 + sigma * eps


def _denoiser(z, gamma):
    """A fixed, nonlinear noise predictor eps^(z, gamma): any function of (z, gamma) will do."""
    g = gamma[:, None]
    return np.tanh(z) / (1 + np.exp(-g)) + 0.3 * np.sin(0.5 * g) * z


def _continuous_loss(x0, eps, gamma_fn, dgamma_fn, nodes=400):
    """1/2 int_0^1 gamma'(t) ||eps - eps^(z_t, gamma_t)||^2 dt by Gauss-Legendre, via the reference."""
    u, w = np.polynomial.legendre.leggauss(nodes)
    t, w = 0.5 * (u + 1), 0.5 * w
    g = gamma_fn(t)
    eps_b = np.broadcast_to(eps, (nodes, eps.size))
    pred = _denoiser(_vp_state(x0[None, :], eps_b, g), g)
    per = R.vdm_continuous_loss(eps_b, pred, dgamma_fn(t), "none")
    return float(np.sum(w * per))


def test_vdm_continuous_loss_depends_on_schedule_only_through_endpoints():
    """(DIF.16) the same denoiser under three monotone gamma(t) with equal endpoints: the loss
    integrals agree (and equal the integral over gamma itself, 1/2 int ||eps - eps^||^2 dgamma);
    moving an endpoint changes the value."""
    rng = np.random.default_rng(18)
    x0, eps = rng.uniform(-1, 1, 3), rng.normal(size=3)
    g0, g1 = -6.0, 7.0
    span = g1 - g0
    schedules = {
        "linear": (lambda t: g0 + span * t, lambda t: np.full_like(t, span)),
        "exponential": (
            lambda t: g0 + span * np.expm1(3 * t) / np.expm1(3.0),
            lambda t: span * 3 * np.exp(3 * t) / np.expm1(3.0),
        ),
        "sine": (
            lambda t: g0 + span * np.sin(np.pi * t / 2) ** 2,
            lambda t: span * np.pi / 2 * np.sin(np.pi * t),
        ),
    }
    values = {k: _continuous_loss(x0, eps, *fns) for k, fns in schedules.items()}
    u, w = np.polynomial.legendre.leggauss(400)
    gam = g0 + span * 0.5 * (u + 1)
    direct = (
        0.5
        * span
        * 0.5
        * np.sum(
            w
            * np.sum(
                (eps[None] - _denoiser(_vp_state(x0[None], np.broadcast_to(eps, (400, 3)), gam), gam)) ** 2, 1
            )
        )
    )
    for k, v in values.items():
        np.testing.assert_allclose(v, direct, rtol=1e-9, err_msg=k)
    moved = _continuous_loss(x0, eps, lambda t: g0 + (span + 1) * t, lambda t: np.full_like(t, span + 1))
    assert abs(moved - direct) > 1e-3 * abs(direct)


def test_vdm_discrete_loss_tends_to_continuous_and_equals_the_kl_terms():
    """(DIF.17) averaged over its T steps, the discrete loss converges to the continuous one at
    rate O(1/T); and for a DDPM schedule, vdm_discrete_loss / T at (gamma_t, gamma_{t-1}) is the
    KL term vlb_term with sigma^2 = posterior variance (both 1/2 (snr_{t-1}/snr_t - 1)||.||^2)."""
    rng = np.random.default_rng(19)
    x0, eps = rng.uniform(-1, 1, 3), rng.normal(size=3)
    g0, span = -6.0, 13.0
    cont = _continuous_loss(x0, eps, lambda t: g0 + span * t, lambda t: np.full_like(t, span))
    errors = []
    for T in (100, 1000, 10_000):
        t = np.arange(1, T + 1) / T
        gt, gs = g0 + span * t, g0 + span * (t - 1 / T)
        eps_b = np.broadcast_to(eps, (T, 3))
        pred = _denoiser(_vp_state(x0[None], eps_b, gt), gt)
        errors.append(abs(float(R.vdm_discrete_loss(eps_b, pred, gt, gs, T)) - cont) / cont)
    assert errors[2] < 1e-3 and errors[1] / errors[2] > 8 and errors[0] / errors[1] > 8  # O(1/T)
    sched = SHORT
    t = np.arange(1, 20)
    x0b, epsb = _on_grid(rng, (19, 4)), rng.normal(size=(19, 4))
    x_t = R.q_sample(x0b, t, epsb, sched)
    eps_hat = epsb + rng.normal(scale=0.3, size=epsb.shape)
    gamma = -np.log(_schedule_by_cumprod(sched.betas)["snr"])
    T = sched.num_timesteps
    discrete = R.vdm_discrete_loss(epsb, eps_hat, gamma[t], gamma[t - 1], T, "none") / T
    kl = R.vlb_term(x0b, x_t, t, eps_hat, sched, -np.ones_like(x0b))
    np.testing.assert_allclose(discrete, kl, rtol=1e-8)


# ============================================================================= low-discrepancy times (DIF.18)


@pytest.mark.parametrize(("batch_size", "world_size"), [(1, 1), (7, 1), (4, 3), (1, 5), (16, 8)])
def test_low_discrepancy_times(batch_size, world_size):
    """(DIF.18) every rank's times lie in [0, 1); all ranks together form the grid u0 + j/k mod 1
    (sorted spacing exactly 1/k, cyclically); each time is uniform over u0, so its mean over a
    uniform u0 is 1/2 (Monte Carlo), and the k times average exactly (k-1)/(2k) + u0 - floor terms."""
    k = batch_size * world_size
    rng = np.random.default_rng(20)
    for u0 in (0.0, 0.37, 1 - 1e-16, rng.uniform()):
        times = [R.low_discrepancy_times(batch_size, u0, r, world_size) for r in range(world_size)]
        for ts in times:
            assert ts.shape == (batch_size,) and np.all((ts >= 0) & (ts < 1))
        allt = np.sort(np.concatenate(times))
        gaps = np.diff(np.append(allt, allt[0] + 1))
        np.testing.assert_allclose(gaps, 1 / k, rtol=0, atol=1e-12)
        # the union is the grid {(u0 + j/k) mod 1}, independently of how it is split among ranks
        np.testing.assert_allclose(allt, np.sort(np.mod(u0 + np.arange(k) / k, 1.0)), rtol=0, atol=1e-15)
    u0s = rng.uniform(size=4000)
    first = np.array([R.low_discrepancy_times(batch_size, u, world_size - 1, world_size)[-1] for u in u0s])
    assert abs(first.mean() - 0.5) < Z_MC * math.sqrt(1 / 12 / len(u0s))
    # stratification: the mean of the k times is within 1/(2k) of 1/2 for EVERY u0
    for u in u0s[:50]:
        allt = np.concatenate(
            [R.low_discrepancy_times(batch_size, u, r, world_size) for r in range(world_size)]
        )
        assert abs(allt.mean() - 0.5) <= 0.5 / k + 1e-12


def test_to_bits_per_dim():
    """(DIF.19) nats / (n log 2): a uniform density on 256 levels per dim is 8 bits."""
    n = 3 * 32 * 32
    np.testing.assert_allclose(R.to_bits_per_dim(np.array([n * math.log(256.0)]), n), [8.0], rtol=1e-15)


# ============================================================================= extreme inputs and bad arguments


def test_extreme_inputs_stay_finite():
    """Large predictions, far-off means, tiny and huge scales, zero terminal SNR: finite values and
    gradients, with exact asymptotic answers where known."""
    zero = R.DiffusionSchedule(np.append(R.linear_betas(9, 0.01, 0.2), 1.0))
    x0 = np.array([[-1.0, 1.0, 0.0]])
    # decoder with the mean 1e4 away and log-scales +-20: still finite, and log P ~ -z^2/2
    for mean, ls in [(1e4, 0.0), (-1e4, -2.0), (0.3, -20.0), (0.3, 20.0)]:
        lp = R.discretized_gaussian_log_likelihood(x0, np.full(3, mean), np.full(3, ls))
        assert_all_finite(lp, f"log-likelihood at mean {mean}, log-scale {ls}")
        for g in R.discretized_gaussian_log_likelihood_backward(
            x0, np.full(3, mean), np.full(3, ls), np.ones((1, 3))
        ):
            assert_all_finite(g, "log-likelihood grads")
    lp = R.discretized_gaussian_log_likelihood(np.array(0.0), np.array(1e4), np.array(0.0))
    z = 1e4 - 1 / 255  # |z_+|: the bin's mass sits at its upper end, P ~ phi(z)/z (1 - 1/z^2)
    np.testing.assert_allclose(lp, -0.5 * z * z - math.log(z) - 0.5 * math.log(2 * math.pi), rtol=1e-12)
    # vlb_term with predictions of 1e4 at every step, including the decoder
    rng = np.random.default_rng(21)
    t = np.array([0, 3, 19])
    x0b = _on_grid(rng, (3, 4))
    x_t = R.q_sample(x0b, t, rng.normal(size=(3, 4)), SHORT)
    for pred in (1e4, -1e4):
        e = np.full((3, 4), pred)
        assert_all_finite(R.vlb_term(x0b, x_t, t, e, SHORT), "vlb_term")
        for g in R.vlb_term_backward(x0b, x_t, t, e, np.ones(3), SHORT, np.full((3, 4), 3.0)):
            assert_all_finite(g, "vlb_term grads")
    # zero terminal SNR: the prior term is 0, q_sample is the noise, v is the noise
    x = rng.normal(size=(2, 3))
    n = rng.normal(size=(2, 3))
    last = np.array([9, 9])
    np.testing.assert_array_equal(R.q_sample(x, last, n, zero), n)
    np.testing.assert_array_equal(R.v_target(x, last, n, zero), -x)
    assert_all_finite(R.diffusion_mse_loss(x, x, n, last, zero, "v"), "v-loss at zero SNR")
    # the eps parameterisation has no x0 at zero SNR: a clear error, not inf
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: t hits step 9"):
        R.predict_x0_from_eps(x, last, n, zero)
    with pytest.raises(ValueError, match=r"^[a-z_0-9]+: t hits step 9"):
        R.vlb_term(np.zeros((2, 3)), x, last, n, zero)


def test_bad_arguments_name_the_argument():
    ok = np.zeros((2, 3))
    t = np.array([0, 1])
    s = SHORT
    cases = [
        (lambda: R.DiffusionSchedule([0.1, 0.0]), ValueError, "betas"),
        (lambda: R.DiffusionSchedule([0.1, 1.5]), ValueError, "betas"),
        (lambda: R.DiffusionSchedule([0.1, np.nan]), ValueError, "betas"),
        (lambda: R.DiffusionSchedule([[0.1, 0.2]]), ValueError, "betas"),
        (lambda: R.DiffusionSchedule([0.1]), ValueError, "betas"),
        (lambda: R.linear_betas(0), ValueError, "T"),
        (lambda: R.linear_betas(10, beta_end=1.5), ValueError, "beta_end"),
        (lambda: R.cosine_betas(10, max_beta=0.0), ValueError, "max_beta"),
        (lambda: R.q_sample(ok, np.array([0, 20]), ok, s), ValueError, "t"),
        (lambda: R.q_sample(ok, np.array([0.0, 1.0]), ok, s), TypeError, "t"),
        (lambda: R.q_sample(ok, np.array([0, 1, 2]), ok, s), ValueError, "t"),
        (lambda: R.q_sample(ok, t, np.zeros((2, 4)), s), ValueError, "noise"),
        (lambda: R.q_sample(ok, t, ok, "linear"), TypeError, "schedule"),
        (lambda: R.q_posterior(ok, np.zeros((3, 3)), t, s), ValueError, "x_t"),
        (lambda: R.q_sample_backward(ok, t, ok, np.ones(2), s), ValueError, "grad_output"),
        (lambda: R.eps_mse_loss(ok, ok, np.ones(3)), ValueError, "weights"),
        (lambda: R.eps_mse_loss(ok, ok, -np.ones(2)), ValueError, "weights"),
        (lambda: R.eps_mse_loss(ok, ok, reduction="avg"), ValueError, "reduction"),
        (lambda: R.diffusion_mse_loss(ok, ok, ok, t, s, prediction="score"), ValueError, "prediction"),
        (lambda: R.snr_weights(t, s, kind="p2"), ValueError, "kind"),
        (lambda: R.snr_weights(t, s, gamma=0.0), ValueError, "gamma"),
        (lambda: R.snr_weights(np.array([[0]]), s), ValueError, "t"),
        (lambda: R.discretized_gaussian_log_likelihood(ok + 2, ok, ok), ValueError, "x"),
        (lambda: R.discretized_gaussian_log_likelihood(ok, ok, ok, cdf="erf"), ValueError, "cdf"),
        (lambda: R.discretized_gaussian_log_likelihood(ok, ok, ok, bits=0), ValueError, "bits"),
        (lambda: R.discretized_gaussian_log_likelihood(ok, np.zeros(4), ok), ValueError, "x, means"),
        (lambda: R.vlb_term(ok + 3, ok, t, ok, s), ValueError, "x0"),
        (lambda: R.vlb_term(ok, ok, t, ok, s, np.zeros((2, 4))), ValueError, "model_log_variance"),
        (lambda: R.vdm_continuous_loss(ok, ok, np.ones(3)), ValueError, "dgamma_dt"),
        (lambda: R.vdm_continuous_loss(ok, ok, np.array([1.0, np.inf])), ValueError, "dgamma_dt"),
        (lambda: R.vdm_discrete_loss(ok, ok, np.ones(2), np.ones(2), 0), ValueError, "T"),
        (lambda: R.low_discrepancy_times(4, 1.0), ValueError, "u0"),
        (lambda: R.low_discrepancy_times(4, 0.5, rank=2, world_size=2), ValueError, "rank"),
        (lambda: R.low_discrepancy_times(0, 0.5), ValueError, "batch_size"),
        (lambda: R.to_bits_per_dim(ok, 0), ValueError, "num_dims"),
        (lambda: R.full_bound(ok, lambda x, t: x, s, 0), TypeError, "rng"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=rf"^([A-Za-z_0-9]+: )?{name}"):
            call()


def test_posterior_minus_model_mean_coefficient_closed_form():
    """(DIF.23) c2 - k1 = -beta_t / ((1 - abar_t) sqrt(alpha_t)), against the difference formed
    in exact rational arithmetic from the float64 schedule, for a schedule with beta_0 = 1e-6
    (where the two coefficients agree to 6 digits)."""
    from fractions import Fraction

    s = R.DiffusionSchedule(R.linear_betas(50, 1e-6, 0.02))
    closed = -s.betas / (s.one_minus_alpha_bar * np.sqrt(s.alphas))
    for t in range(1, 50):
        beta = Fraction(float(s.betas[t]))
        abar_prev = Fraction(1)
        for b in s.betas[:t]:
            abar_prev *= 1 - Fraction(float(b))
        # c2 - k1 = ((1 - abar_prev) alpha - (1 - abar)) / ((1 - abar) sqrt(alpha)), numerator exact
        alpha = 1 - beta
        num = (1 - abar_prev) * alpha - (1 - abar_prev * alpha)
        exact = float(num) / (float(1 - abar_prev * alpha) * math.sqrt(float(alpha)))
        assert closed[t] == pytest.approx(exact, rel=1e-12)
    # the difference of the two coefficients rounded to float32 (what a float32 table held) loses
    # log10(1/beta) digits at late steps; the closed form rounded once keeps float32's accuracy
    naive32 = s.posterior_mean_coef2.astype(np.float32).astype(np.float64) - (1.0 / np.sqrt(s.alphas)).astype(
        np.float32
    ).astype(np.float64)
    closed32 = closed.astype(np.float32).astype(np.float64)
    assert np.max(np.abs(closed32[1:] / closed[1:] - 1)) < 1e-7
    assert np.max(np.abs(naive32[1:] / closed[1:] - 1)) > 1e-6


def test_tanh_upper_tail_has_no_cancellation():
    """(DIF.23) the tanh bin mass in the upper half is the difference of two upper tails: for a bin
    far in the upper tail (mass ~2e-8) the value matches the same formula evaluated in 50-digit
    arithmetic, where the plain form 0.5 (tanh(u+) - tanh(u-)) in float64 is off."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    bits = 8
    h = 1.0 / (2**bits - 1)
    x = np.array([0.0])
    mean, log_scale = np.array([-0.045]), np.array([math.log(0.008)])
    got = float(R.discretized_gaussian_log_likelihood(x, mean, log_scale, bits, "tanh")[0])
    s = mpmath.mpf(0.008)
    c, k = mpmath.sqrt(2 / mpmath.pi), mpmath.mpf("0.044715")

    def cdf(z):
        return (1 + mpmath.tanh(c * (z + k * z**3))) / 2

    m = mpmath.mpf(-0.045)
    zlo, zhi = (0 - m - h) / s, (0 - m + h) / s
    exact = float(mpmath.log(cdf(zhi) - cdf(zlo)))
    assert exact > math.log(1e-12) + 1  # above the clamp
    assert got == pytest.approx(exact, rel=1e-9)
    plain = math.log(
        0.5 * (math.tanh(float(c * (zhi + k * zhi**3))) - math.tanh(float(c * (zlo + k * zlo**3))))
    )
    assert abs(plain - exact) > 1e3 * abs(got - exact)


def _mp_log_bin(mpmath, x, mean, log_scale, h):
    """log P(bin) for an interior bin from mpmath's erf (no cancellation at 50 digits: the two erfs
    of the narrow bins below differ in their leading digits)."""
    s = mpmath.exp(mpmath.mpf(log_scale))
    lo = (mpmath.mpf(x) - mpmath.mpf(mean) - h) / s
    hi = (mpmath.mpf(x) - mpmath.mpf(mean) + h) / s
    r2 = mpmath.sqrt(2)
    return mpmath.log((mpmath.erf(hi / r2) - mpmath.erf(lo / r2)) / 2)


@pytest.mark.parametrize("log_scale", [20.0, 30.0, 35.0, 50.0])
def test_discretized_likelihood_at_large_log_scales(log_scale):
    """(DIF.9, DIF.10) a Gaussian far wider than a bin: the bin is a sliver of width 2h e^{-s}
    around z ~ 0, and P = erf(h e^{-s}/sqrt2) = 2 h e^{-s} phi(0) (1 + O(e^{-2s})) at mean = x, so
    log P = log(2 h phi(0)) - s, d/dmean = 0 (symmetry), d/ds = -1 + O(e^{-2s}).  Forming
    Phi(hi) - Phi(lo) from two numbers near 1/2 lost digits from s ~ 10 and gave -inf (NaN slope)
    from s ~ 32.  A mean 0.3 off x is checked against 50-digit mpmath: value, d/ds, and d/dmean
    (~ -0.3 e^{-2s}) to eps/h absolute (the rounding of phi(z) near phi(0))."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    h = 1.0 / 255
    x = np.array([0.0, _grid_levels(8)[200]])
    closed = math.log(2 * h / math.sqrt(2 * math.pi)) - log_scale
    s = np.full_like(x, log_scale)
    logp = R.discretized_gaussian_log_likelihood(x, x, s)
    np.testing.assert_allclose(logp, closed, rtol=1e-15)
    g_mean, g_s = R.discretized_gaussian_log_likelihood_backward(x, x, s, np.ones_like(x))
    np.testing.assert_array_equal(g_mean, 0.0)
    np.testing.assert_allclose(g_s, -1.0, rtol=1e-14)
    mean = x + 0.3
    mh = mpmath.mpf(1) / 255
    logp = R.discretized_gaussian_log_likelihood(x, mean, s)
    g_mean, g_s = R.discretized_gaussian_log_likelihood_backward(x, mean, s, np.ones_like(x))
    for i in range(x.size):
        exact = _mp_log_bin(mpmath, x[i], mean[i], log_scale, mh)
        # relative error of P ~ eps (|x - mean| + h) / (2h) ~ 40 eps: an absolute error of log P
        np.testing.assert_allclose(logp[i], float(exact), rtol=0, atol=2e-14)
        d_s = mpmath.diff(lambda v, i=i: _mp_log_bin(mpmath, x[i], mean[i], v, mh), mpmath.mpf(log_scale))
        np.testing.assert_allclose(g_s[i], float(d_s), rtol=1e-13)
        d_mean = mpmath.diff(lambda m, i=i: _mp_log_bin(mpmath, x[i], m, log_scale, mh), mpmath.mpf(mean[i]))
        # ~ (x - mean) e^{-2s}, beneath the rounding of e^{-s} (phi(z+) - phi(z-)) / P: an ulp of
        # phi(0) over 2h phi(0), ~ 3e-14
        np.testing.assert_allclose(g_mean[i], float(d_mean), rtol=0, atol=1e-13)


def test_log_diff_ndtr_on_both_sides_of_the_erf_cut():
    """(DIF.10) log(Phi(b) - Phi(a)) against 50-digit mpmath for bins inside (-1, 1) (the erf
    difference), straddling |z| = 1 and outside it (the log form), wide and narrow: the absolute
    error of the log is within 8 eps / ((b - a) phi(max |z|)), the bound of either form there."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    pairs = [
        (-1e-20, 1e-20),  # centred, far narrower than eps: exact only by the erf difference
        (0.3, 0.3 + 1e-9),
        (-0.5, 0.4),
        (-0.999, 0.999),
        (-0.9999999, -0.9999998),
        (-1.0000001, -0.9999999),  # straddles the cut: the log form
        (0.99, 1.01),
        (-2.0, -1.5),
        (1.5, 1.5 + 1e-6),
        (-3.0, 0.5),
    ]
    for a, b in pairs:
        am, bm = mpmath.mpf(a), mpmath.mpf(b)
        exact = float(mpmath.log(mpmath.ncdf(bm) - mpmath.ncdf(am)))
        got = float(R.log_diff_ndtr(np.array(a), np.array(b)))
        zmax = max(abs(a), abs(b))
        bound = 8 * 2.2e-16 / ((b - a) * math.exp(-0.5 * zmax * zmax) / math.sqrt(2 * math.pi))
        assert abs(got - exact) <= bound, (a, b, got, exact, bound)


def _mp_bin_slopes(mpmath, x, mean, log_scale, h):
    """d log P / d mean and d log P / d log_scale of an interior bin, from phi(z)/P in 60 digits."""
    s = mpmath.exp(mpmath.mpf(log_scale))
    lo = (mpmath.mpf(x) - mpmath.mpf(mean) - h) / s
    hi = (mpmath.mpf(x) - mpmath.mpf(mean) + h) / s
    p = mpmath.ncdf(-lo) - mpmath.ncdf(-hi) if lo + hi > 0 else mpmath.ncdf(hi) - mpmath.ncdf(lo)
    d_hi, d_lo = mpmath.npdf(hi) / p, -mpmath.npdf(lo) / p
    return -(d_hi + d_lo) / s, -(d_hi * hi + d_lo * lo)


@pytest.mark.parametrize("log_scale", [-5.0, -10.0, -18.0, -19.0, -30.0, -40.0])
def test_interior_bin_slopes_in_far_tails(log_scale):
    """(DIF.10) a narrow Gaussian (log-scale down to -40) a little off an interior bin: both ends lie
    far in one tail, |z| up to 2e17, and log P ~ -z^2/2. The slopes phi(z)/P were formed as
    exp(log phi(z) - log P), two numbers ~ z^2/2 that agree in their leading digits: relative
    errors of 9e-9 at log-scale -10, 12 % at -18 and 100 % beyond. As inverse Mills ratios over
    expm1 of the log-CDF gap they hold to a few ulp; reference and the native engine (float64),
    against 60-digit mpmath, on both sides of the bin."""
    mpmath = pytest.importorskip("mpmath")
    from genloss import native as N

    mpmath.mp.dps = 60
    x = _grid_levels(8)[[128, 128, 128, 128, 40]]
    mean = x + np.array([0.01, 0.3, -0.3, 0.9, -0.45])
    s = np.full_like(x, log_scale)
    g_ref = R.discretized_gaussian_log_likelihood_backward(x, mean, s, np.ones_like(x))
    _, g_nat = N.discretized_gaussian_log_likelihood(x, mean, s)
    for i in range(x.size):
        exact = _mp_bin_slopes(mpmath, x[i], mean[i], log_scale, mpmath.mpf(1) / 255)
        for layer, grads in (("reference", g_ref), ("native", g_nat)):
            for name, got, want in zip(("means", "log_scales"), grads, exact, strict=True):
                np.testing.assert_allclose(got[i], float(want), rtol=4e-15, err_msg=f"{layer} {name} {i}")
