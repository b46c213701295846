r"""Identities of the VAE family and of Gaussian mixtures, checked against the NumPy reference.

Every assertion compares ``genloss.reference.vae`` with a value computed here
independently of it: central finite differences, a Monte-Carlo estimate, a closed
form written out with plain NumPy / ``numpy.linalg`` (never the reference's
primitives), a quadrature, or an answer known from the labels of simulated data.
The equations are derived in ``derivations/vae.md`` (tags ``VAE.n``).

Monte-Carlo checks use fixed seeds and accept a deviation of at most ``Z_MC``
standard errors (estimated from the same samples): with a fixed seed the test is
deterministic, and a wrong constant or sign is many standard errors off.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from genloss.reference import vae as R
from tolerances import assert_all_finite

LOG_2PI = math.log(2.0 * math.pi)
REDUCTIONS = ("none", "sum", "mean")
Z_MC = 4.0  # Monte-Carlo tolerance in standard errors

# Closed forms vs the reference: sums of at most a few hundred O(1) float64 terms,
# rounding below 1e-13; 1e-11 leaves a margin, while a wrong factor is O(1).
TIGHT = dict(rtol=1e-11, atol=1e-11)


# ============================================================================= independent helpers


def _lse(a, axis=-1):
    """log sum exp by NumPy's own pairwise logaddexp (not the reference's primitive)."""
    return np.logaddexp.reduce(a, axis=axis)


def _log_normal_diag(x, mean, logvar):
    """log N(x; mean, diag e^logvar), summed over the last axis, from the density's definition."""
    var = np.exp(logvar)
    return np.sum(-0.5 * np.log(2.0 * np.pi * var) - (x - mean) ** 2 / (2.0 * var), axis=-1)


def _mvn_logpdf(x, mean, cov):
    """log N(x; mean, cov) for full covariance with numpy.linalg (Cholesky-free, slogdet + solve)."""
    d = x - mean
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    quad = np.einsum("...i,...i->...", d, np.linalg.solve(cov, d.T).T)
    return -0.5 * (x.shape[-1] * LOG_2PI + logdet + quad)


# ============================================================================= finite differences, every op

PER_SAMPLE_SHAPES = [(1,), (3,), (2, 5), (3, 2, 4)]


# logvar broadcast variants for a mean of shape (3, 2, 4): per element, per sample, per feature, scalar
GAUSSIAN_LOGVAR_SHAPES = [(3, 2, 4), (3, 1, 1), (2, 4), (4,), ()]


NORMAL_KL_SHAPES = [
    ((4,), (4,), (4,), (4,)),
    ((3, 4), (4,), (), (3, 1)),  # every input broadcast differently
    ((2, 1, 3), (1, 5, 1), (5, 3), (2, 5, 3)),
    ((), (), (), ()),
]


# ============================================================================= values from the definitions


def test_gaussian_kl_matches_monte_carlo():
    """(VAE.4) closed form = E_q[log q(z) - log p(z)], estimated from 200k samples of q."""
    rng = np.random.default_rng(1)
    mu = np.array([[0.3, -1.2, 2.0], [0.0, 0.5, -0.4]])
    lv = np.array([[-1.0, 0.7, 0.2], [1.5, -2.0, 0.0]])
    closed = R.gaussian_kl(mu, lv, "none")
    n = 200_000
    for b in range(mu.shape[0]):
        z = mu[b] + np.exp(0.5 * lv[b]) * rng.standard_normal((n, mu.shape[1]))
        terms = _log_normal_diag(z, mu[b], lv[b]) - _log_normal_diag(z, 0.0, 0.0)
        se = terms.std(ddof=1) / math.sqrt(n)
        assert abs(terms.mean() - closed[b]) < Z_MC * se, (b, terms.mean(), closed[b], se)


def test_normal_kl_matches_monte_carlo_and_direct_formula():
    """(VAE.5) elementwise KL(N1||N2) = E_{N1}[log N1 - log N2], and = the textbook formula."""
    rng = np.random.default_rng(2)
    m1, v1 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([0.0, -1.0, 1.2, 2.0])
    m2, v2 = np.array([0.5, 1.0, 1.0, -0.5]), np.array([0.3, 0.4, -0.6, 2.0])
    kl = R.normal_kl(m1, v1, m2, v2)
    s1, s2 = np.exp(0.5 * v1), np.exp(0.5 * v2)
    textbook = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(kl, textbook, **TIGHT)
    n = 200_000
    z = m1 + s1 * rng.standard_normal((n, 4))
    terms = (-0.5 * ((z - m1) / s1) ** 2 - np.log(s1)) - (-0.5 * ((z - m2) / s2) ** 2 - np.log(s2))
    se = terms.std(axis=0, ddof=1) / math.sqrt(n)
    assert np.all(np.abs(terms.mean(axis=0) - kl) < Z_MC * se)


def test_normal_kl_on_empty_input_is_empty_in_every_layer():
    """(VAE.5) Elementwise: a broadcast shape with no element gives an empty KL in every layer
    (the reference's), and an input broadcast into it a zero gradient of its own shape."""
    import torch

    import genloss.native as N
    import genloss.torch as T

    e, lv = np.zeros((0, 3)), np.zeros(3)
    assert R.normal_kl(e, lv, e, lv).shape == (0, 3)
    value, grads = N.normal_kl(e, lv, e, lv)
    assert value.shape == (0, 3) and [g.shape for g in grads] == [(0, 3), (3,), (0, 3), (3,)]
    np.testing.assert_array_equal(grads[1], 0.0)
    a, b = torch.zeros(0, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
    out = T.normal_kl(a, b, a, b)
    out.sum().backward()
    assert out.shape == (0, 3) and a.grad.shape == (0, 3)
    np.testing.assert_array_equal(b.grad.numpy(), 0.0)


def test_normal_kl_zero_iff_equal_and_reduces_to_gaussian_kl():
    """(VAE.5) KL = 0 exactly when the Gaussians agree, > 0 when either parameter differs;
    (VAE.4) with N2 = N(0, 1) and summed per sample it is gaussian_kl."""
    rng = np.random.default_rng(3)
    m, v = rng.normal(size=(4, 3)), rng.uniform(-3, 3, size=(4, 3))
    assert np.all(R.normal_kl(m, v, m, v) == 0.0)
    for dm, dv in [(1e-3, 0.0), (0.0, 1e-3), (-0.7, 0.4)]:
        assert np.all(R.normal_kl(m + dm, v + dv, m, v) > 0.0)
    # a quadratic lower bound away from equality: KL >= (m1-m2)^2 e^{-v2}/2 (the variance part is >= 0)
    kl = R.normal_kl(m + 0.5, v, m, v)
    np.testing.assert_allclose(kl, 0.125 * np.exp(-v), **TIGHT)
    per_sample = R.normal_kl(m, v, 0.0, 0.0).sum(axis=1)
    np.testing.assert_allclose(R.gaussian_kl(m, v, "none"), per_sample, **TIGHT)
    np.testing.assert_allclose(
        R.gaussian_kl(m, v, "none"), 0.5 * np.sum(m**2 + np.exp(v) - 1 - v, axis=1), **TIGHT
    )


def test_bernoulli_nll_against_probabilities():
    """(VAE.6) softplus(l) - x l = -(x log p + (1-x) log(1-p)), p = 1/(1+e^{-l}), at moderate logits."""
    rng = np.random.default_rng(4)
    logits, x = rng.normal(scale=3, size=(5, 7)), rng.uniform(0, 1, size=(5, 7))
    x[0] = (x[0] > 0.5).astype(float)  # binary row too
    p = 1.0 / (1.0 + np.exp(-logits))
    direct = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=1)
    np.testing.assert_allclose(R.bernoulli_nll(logits, x, "none"), direct, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(R.bernoulli_nll(logits, x, "mean"), direct.mean(), rtol=1e-10)
    np.testing.assert_allclose(R.bernoulli_nll(logits, x, "sum"), direct.sum(), rtol=1e-10)
    (g_l, g_x) = R.bernoulli_nll_backward(logits, x, 1.0, "sum")
    np.testing.assert_allclose(g_l, p - x, **TIGHT)
    np.testing.assert_allclose(g_x, -logits, **TIGHT)


def test_gaussian_nll_against_logpdf():
    """(VAE.7) against the full-covariance log-density from numpy.linalg, per element / per
    feature / scalar log-variances."""
    rng = np.random.default_rng(5)
    mean, x = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    for lv in [rng.uniform(-1, 1, size=(4, 3)), rng.uniform(-1, 1, size=(3,)), np.array(0.4)]:
        lv_full = np.broadcast_to(lv, mean.shape)
        direct = np.array([-_mvn_logpdf(x[b], mean[b], np.diag(np.exp(lv_full[b]))) for b in range(4)])
        np.testing.assert_allclose(R.gaussian_nll(mean, x, lv, "none"), direct, **TIGHT)


@pytest.mark.parametrize("sigma2", [1.0, 0.05])
def test_mse_is_a_gaussian_of_fixed_variance(sigma2):
    """(VAE.7) "MSE" is a Gaussian NLL with a FIXED variance: sum-SE = 2 sigma^2 (NLL - n/2 log 2 pi sigma^2);
    and the notes' per-sample MEAN over D dims is the Gaussian with sigma^2 = D/2."""
    rng = np.random.default_rng(6)
    b, d = 5, 12
    mean, x = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    sse = np.sum((x - mean) ** 2, axis=1)
    nll = R.gaussian_nll(mean, x, math.log(sigma2), "none")
    np.testing.assert_allclose(2 * sigma2 * (nll - 0.5 * d * math.log(2 * math.pi * sigma2)), sse, **TIGHT)
    nll_half_d = R.gaussian_nll(mean, x, math.log(d / 2.0), "none")
    mse_mean = np.mean((x - mean) ** 2, axis=1)
    np.testing.assert_allclose(nll_half_d - 0.5 * d * math.log(math.pi * d), mse_mean, **TIGHT)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_negative_elbo_is_nll_plus_beta_kl(likelihood):
    """(VAE.8) per sample: reconstruction NLL from its definition + beta * the closed-form KL."""
    rng = np.random.default_rng(7)
    recon, mu, lv = rng.normal(size=(4, 6)), rng.normal(size=(4, 3)), rng.uniform(-1, 1, size=(4, 3))
    kl = 0.5 * np.sum(mu**2 + np.exp(lv) - 1 - lv, axis=1)
    if likelihood == "bernoulli":
        x = rng.uniform(0, 1, size=(4, 6))
        p = 1 / (1 + np.exp(-recon))
        nll = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=1)
        s = None
    else:
        x = rng.normal(size=(4, 6))
        s = rng.uniform(-1, 1, size=(6,))
        nll = -_log_normal_diag(x, recon, s)
    for beta in [0.0, 0.25, 1.0, 4.0]:
        got = R.negative_elbo(recon, x, mu, lv, beta, likelihood, s, "none")
        np.testing.assert_allclose(got, nll + beta * kl, rtol=1e-10, atol=1e-10)
    if likelihood == "gaussian":  # default recon_logvar: unit variance
        got = R.negative_elbo(recon, x, mu, lv, 1.0, "gaussian", None, "none")
        np.testing.assert_allclose(got, -_log_normal_diag(x, recon, 0.0) + kl, **TIGHT)


def test_reparameterization_gradient_is_unbiased():
    """(VAE.3) pathwise gradients through z = mu + e^{v/2} eps, chained from negative_elbo_backward,
    average to the gradient of the EXACT expected loss: identity decoder, unit-variance Gaussian,
    E_q[L] = 1/2 sum((x - mu)^2 + e^v) + const + beta KL."""
    rng = np.random.default_rng(8)
    mu, lv, x, beta = np.array([0.4, -1.0, 2.0]), np.array([-0.5, 0.3, 1.0]), np.array([1.0, 0.0, 0.5]), 0.6
    n = 100_000
    eps = rng.standard_normal((n, 3))
    z = mu + np.exp(0.5 * lv) * eps
    mus, lvs, xs = (np.broadcast_to(a, (n, 3)).copy() for a in (mu, lv, x))
    g_recon, g_mu, g_lv = R.negative_elbo_backward(
        z, xs, mus, lvs, np.ones(n), beta, "gaussian", None, "none"
    )
    path_mu = g_recon + g_mu  # dz/dmu = 1
    path_lv = g_recon * eps * 0.5 * np.exp(0.5 * lv) + g_lv  # dz/dv = eps e^{v/2} / 2
    exact_mu = (mu - x) + beta * mu
    exact_lv = 0.5 * np.exp(lv) + beta * 0.5 * (np.exp(lv) - 1)
    for path, exact in [(path_mu, exact_mu), (path_lv, exact_lv)]:
        se = path.std(axis=0, ddof=1) / math.sqrt(n)
        assert np.all(np.abs(path.mean(axis=0) - exact) < Z_MC * se), (path.mean(axis=0), exact, se)


# ============================================================================= linear-Gaussian latent model


def _linear_gaussian_model(rng, d_latent=2, d_data=5, sigma2=0.3, orthogonal=True):
    """z ~ N(0, I_d), x = W z + b + N(0, sigma2 I_D).  With orthogonal columns, W^T W is diagonal
    and so is the exact posterior (which the diagonal-Gaussian ops can then represent)."""
    if orthogonal:
        u, _ = np.linalg.qr(rng.standard_normal((d_data, d_latent)))
        w = u * np.array([2.0, 0.8, 1.3, 0.5][:d_latent])
    else:
        w = rng.normal(size=(d_data, d_latent))
    b = rng.normal(size=d_data)
    return w, b, sigma2


def _exact_posterior(w, b, sigma2, x):
    """q*(z|x) = N(m, diag c) with c = sigma2 / (sigma2 + ||w_j||^2), m = c w^T (x - b) / sigma2."""
    col = np.sum(w**2, axis=0)
    assert np.allclose(w.T @ w, np.diag(col)), "needs orthogonal columns"
    c = sigma2 / (sigma2 + col)
    m = (x - b) @ w * (c / sigma2)
    return m, np.log(np.broadcast_to(c, m.shape))


def test_linear_gaussian_elbo_equals_log_evidence():
    """(VAE.1), (VAE.2) For the linear-Gaussian model the ELBO at the exact posterior IS log p(x),
    log p(x) = log N(x; b, W W^T + sigma2 I) from numpy.linalg; for any other q it is strictly
    below, by exactly KL(q || p(z|x))."""
    rng = np.random.default_rng(11)
    w, b, sigma2 = _linear_gaussian_model(rng)
    x = (rng.standard_normal((6, 2)) @ w.T) + b + math.sqrt(sigma2) * rng.standard_normal((6, 5))
    log_px = _mvn_logpdf(x, b, w @ w.T + sigma2 * np.eye(5))
    m, lv = _exact_posterior(w, b, sigma2, x)

    def neg_elbo_exact(m, lv):
        """-ELBO with E_q taken exactly: NLL at the mean plus sum_j c_j ||w_j||^2 / (2 sigma2)."""
        at_mean = R.negative_elbo(m @ w.T + b, x, m, lv, 1.0, "gaussian", math.log(sigma2), "none")
        return at_mean + np.exp(lv) @ np.sum(w**2, axis=0) / (2 * sigma2)

    np.testing.assert_allclose(-neg_elbo_exact(m, lv), log_px, **TIGHT)
    # pointwise form: log p(x|z) + log p(z) - log q*(z|x) = log p(x) for EVERY z (Bayes' rule)
    for _ in range(3):
        z = rng.normal(scale=2.0, size=m.shape)
        integrand = (
            -R.gaussian_nll(z @ w.T + b, x, math.log(sigma2), "none")
            - R.gaussian_nll(z, np.zeros_like(z), 0.0, "none")
            + R.gaussian_nll(z, m, lv, "none")
        )
        np.testing.assert_allclose(integrand, log_px, **TIGHT)
    # any other q: strictly below, and the gap is KL(q || posterior) (VAE.2)
    for dm, dlv in [(0.3, 0.0), (0.0, -0.5), (-0.2, 0.7)]:
        elbo = -neg_elbo_exact(m + dm, lv + dlv)
        gap = R.normal_kl(m + dm, lv + dlv, m, lv).sum(axis=1)
        assert np.all(elbo < log_px)
        np.testing.assert_allclose(log_px - elbo, gap, **TIGHT)


def test_iwae_bound_rises_with_k_toward_log_evidence():
    """(VAE.10) In the same model with a mismatched q, E[L_K] increases with K, stays below log p(x),
    starts at the (closed-form) ELBO for K = 1 and closes most of the gap by K = 256."""
    rng = np.random.default_rng(12)
    w, b, sigma2 = _linear_gaussian_model(rng, d_latent=2, d_data=4, sigma2=0.5, orthogonal=True)
    x = np.array([[0.5, -1.0, 2.0, 0.3]])
    log_px = float(_mvn_logpdf(x, b, w @ w.T + sigma2 * np.eye(4))[0])
    m, lv = _exact_posterior(w, b, sigma2, x)
    qm, qlv = m + np.array([0.6, -0.4]), lv + np.array([0.8, -0.6])  # a poor but honest q
    reps, kmax = 4000, 256
    z = qm + np.exp(0.5 * qlv) * rng.standard_normal((reps, kmax, 2))
    log_w = (
        _log_normal_diag(x[0], z @ w.T + b, math.log(sigma2))
        + _log_normal_diag(z, 0.0, 0.0)
        - _log_normal_diag(z, qm, qlv)
    )  # (reps, kmax), independent of the reference
    elbo = log_px - float(R.normal_kl(qm, qlv, m, lv).sum())  # VAE.2: ELBO = log p(x) - KL(q||posterior)
    ks = [1, 2, 4, 16, 64, 256]
    means, ses = [], []
    for k in ks:  # nested subsets: the first k samples of each replicate
        bounds = R.iwae_bound(log_w[:, :k], "none")
        np.testing.assert_allclose(bounds, _lse(log_w[:, :k], axis=1) - math.log(k), **TIGHT)
        means.append(bounds.mean())
        ses.append(bounds.std(ddof=1) / math.sqrt(reps))
    assert abs(means[0] - elbo) < Z_MC * ses[0], (means[0], elbo)
    for i in range(len(ks) - 1):
        diff = R.iwae_bound(log_w[:, : ks[i + 1]], "none") - R.iwae_bound(log_w[:, : ks[i]], "none")
        assert diff.mean() > -Z_MC * diff.std(ddof=1) / math.sqrt(reps), (ks[i], ks[i + 1])
    assert log_px - means[-1] < 0.1 * (log_px - elbo)  # most of the gap closed (here 2.09 -> 0.02 nats)
    assert all(mu < log_px + Z_MC * se for mu, se in zip(means, ses, strict=True))
    assert log_px - elbo > 0.3  # the q is really mismatched, so the check above is not vacuous


def test_vae_marginal_is_a_continuous_mixture():
    """(VAE.14) p(x) = int N(z; 0, 1) N(x; w z + b, sigma2 I) dz is a mixture over a continuum of
    Gaussians; Gauss-Hermite quadrature turns it into a FINITE GMM whose gmm_log_likelihood
    converges to the closed form log N(x; b, w w^T + sigma2 I)."""
    w, b, sigma2 = np.array([1.5, -0.7]), np.array([0.2, 0.1]), 0.5
    x = np.array([[0.0, 0.0], [2.5, -1.0], [-3.0, 1.5]])
    exact = _mvn_logpdf(x, b, np.outer(w, w) + sigma2 * np.eye(2))
    errors = []
    for k in [1, 5, 20, 80]:
        nodes, h = np.polynomial.hermite_e.hermegauss(k)  # int e^{-z^2/2} f(z) dz ~ sum h_k f(z_k)
        ll = R.gmm_log_likelihood(
            x, np.log(h), nodes[:, None] * w + b, np.full((k, 2), math.log(sigma2)), reduction="none"
        )
        errors.append(np.max(np.abs(ll - exact)))
    assert errors[0] > 1.0  # one component is a poor model
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-9  # quadrature error of the 80-point rule (measured 2e-11)


# ============================================================================= beta-VAE: rate and posterior collapse


def _linear_vae_fit(S, sigma2, beta, d, steps=3000, lr=0.1, seed=1):
    r"""Gradient descent on the EXACT expected beta-VAE loss of a linear VAE on zero-mean data of
    covariance S: decoder N(W z, sigma2 I), encoder N(V x, diag e^rho).

    L = [tr((I-WV) S (I-WV)^T) + sum_j e^{rho_j} ||W_j||^2] / (2 sigma2) + D/2 log(2 pi sigma2)
        + beta/2 (tr(V S V^T) + sum_j (e^{rho_j} - 1 - rho_j)).
    """
    rng = np.random.default_rng(seed)
    n = S.shape[0]
    W, V, rho = 0.1 * rng.standard_normal((n, d)), 0.1 * rng.standard_normal((d, n)), np.zeros(d)
    eye = np.eye(n)
    for _ in range(steps):
        s = np.exp(rho)
        resid = eye - W @ V
        grad_W = (-(resid @ S @ V.T) + W * s) / sigma2
        grad_V = -(W.T @ resid @ S) / sigma2 + beta * V @ S
        grad_rho = s * np.sum(W**2, axis=0) / (2 * sigma2) + 0.5 * beta * (s - 1)
        W, V, rho = W - lr * grad_W, V - lr * grad_V, rho - lr * grad_rho
    return W, V, rho


def _expected_loss(W, V, rho, S, sigma2, beta):
    n = S.shape[0]
    resid = np.eye(n) - W @ V
    distortion = (np.trace(resid @ S @ resid.T) + np.exp(rho) @ np.sum(W**2, axis=0)) / (2 * sigma2)
    rate = 0.5 * (np.trace(V @ S @ V.T) + np.sum(np.exp(rho) - 1 - rho))
    return distortion + 0.5 * n * math.log(2 * math.pi * sigma2) + beta * rate


def _rate_with_reference(V, rho, S):
    """E_x KL(q(z|x) || N(0,I)) via gaussian_kl: KL is linear in mu^2, so the root-mean-square
    mean sqrt(diag(V S V^T)) gives the exact expectation over x ~ N(0, S)."""
    rms_mu = np.sqrt(np.diag(V @ S @ V.T))
    return float(R.gaussian_kl(rms_mu[None, :], rho[None, :], "sum"))


def _collapse_setup():
    """D = 8 data dims from a 2-dim linear-Gaussian model with noise 0.1: the covariance has
    eigenvalues 0.6, 0.3 (signal + noise) and 0.1 (noise only, x 6).  Per latent direction the
    data-to-noise ratio lambda_i / sigma^2 is 6 and 3."""
    rng = np.random.default_rng(21)
    sigma2, n = 0.1, 8
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.full(n, sigma2)
    lam[:2] = [6 * sigma2, 3 * sigma2]
    return (u * lam) @ u.T, sigma2, lam


def test_beta_below_one_does_not_collapse():
    r"""(VAE.9) The notes' claim "beta < 1 may lead to posterior collapse" is wrong.  For a linear VAE
    with a Gaussian decoder (noise sigma^2 = the data's), the optimum of the beta-VAE loss has rate
    R(beta) = 1/2 sum_i max(0, log(lambda_i / (beta sigma^2))): positive for EVERY beta < 1 (indeed
    it grows as beta falls), and 0 (collapse) only once beta >= lambda_max / sigma^2 = 1 + SNR.
    Gradient descent on the exact loss finds the same rates, measured with gaussian_kl."""
    S, sigma2, lam = _collapse_setup()
    evals = np.sort(np.linalg.eigvalsh(S))[::-1]
    np.testing.assert_allclose(evals, np.sort(lam)[::-1], **TIGHT)
    rates = {}
    for beta in [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]:
        W, V, rho = _linear_vae_fit(S, sigma2, beta, d=2)
        rate = _rate_with_reference(V, rho, S)
        closed = 0.5 * np.sum(np.maximum(0.0, np.log(evals[:2] / (beta * sigma2))))
        # 1e-3: what 3000 plain GD steps reach at beta = 0.25 (measured 6e-5); a wrong factor is O(1)
        assert abs(rate - closed) < 1e-3, (beta, rate, closed)
        rates[beta] = rate
    assert all(rates[b] > 1.0 for b in (0.25, 0.5, 1.0))  # small beta: far from collapse
    assert rates[0.25] > rates[0.5] > rates[1.0] > rates[2.0] > rates[4.0] > 0.1  # monotone in beta
    assert rates[8.0] < 1e-8  # collapse only above the threshold lambda_max / sigma^2 = 6
    # the GD objective is the library's loss: its value at the beta = 1 optimum = MC average of
    # negative_elbo over x ~ N(0, S) and the reparameterised z
    rng = np.random.default_rng(22)
    W, V, rho = _linear_vae_fit(S, sigma2, 1.0, d=2)
    n = 100_000
    x = rng.standard_normal((n, 8)) @ np.linalg.cholesky(S).T
    mu = x @ V.T
    z = mu + np.exp(0.5 * rho) * rng.standard_normal((n, 2))
    lv = np.broadcast_to(rho, mu.shape)
    per = R.negative_elbo(z @ W.T, x, mu, lv, 1.0, "gaussian", math.log(sigma2), "none")
    exact = _expected_loss(W, V, rho, S, sigma2, 1.0)
    assert abs(per.mean() - exact) < Z_MC * per.std(ddof=1) / math.sqrt(n)


def test_mse_mean_over_dims_rescales_beta():
    r"""(VAE.7), (VAE.9) The notes' loss mean_d (x - x_hat)^2 + beta KL is the Gaussian ELBO with
    sigma^2 = D/2, i.e. the properly scaled loss with an effective beta_eff = beta D / (2 sigma^2).
    On the data above (D = 8, sigma^2 = 0.1), beta = 0.25 means beta_eff = 10 > 6: COLLAPSED --
    the collapse comes from the 1/D, not from beta < 1.  The properly scaled loss at the same
    beta = 0.25 keeps a rate near 2.8 nats."""
    S, sigma2, lam = _collapse_setup()
    n = S.shape[0]
    rng = np.random.default_rng(23)
    W, V, rho = rng.normal(size=(n, 2)), rng.normal(size=(2, n)), rng.normal(size=2)
    resid = np.eye(n) - W @ V
    mse_mean = (np.trace(resid @ S @ resid.T) + np.exp(rho) @ np.sum(W**2, axis=0)) / n  # E ||x - Wz||^2 / D
    rate = 0.5 * (np.trace(V @ S @ V.T) + np.sum(np.exp(rho) - 1 - rho))
    notes_loss = mse_mean + 0.25 * rate
    np.testing.assert_allclose(
        _expected_loss(W, V, rho, S, n / 2.0, 0.25) - 0.5 * n * math.log(math.pi * n), notes_loss, **TIGHT
    )
    W, V, rho = _linear_vae_fit(S, n / 2.0, 0.25, d=2)
    assert _rate_with_reference(V, rho, S) < 1e-6  # the notes' loss collapses at beta = 0.25
    assert 0.25 * n / (2 * sigma2) > lam.max() / sigma2  # because beta_eff exceeds the threshold
    W, V, rho = _linear_vae_fit(S, sigma2, 0.25, d=2)
    assert _rate_with_reference(V, rho, S) > 2.5  # the likelihood-scaled loss does not


# ============================================================================= Gaussian mixtures


def _gmm_ll_direct(x, logits, means, logvars):
    """Per-point log-likelihood from explicit full-covariance densities (numpy.linalg) and logaddexp."""
    log_pi = logits - _lse(logits)
    comp = np.stack(
        [_mvn_logpdf(x, means[k], np.diag(np.exp(logvars[k]))) for k in range(len(logits))], axis=1
    )
    return _lse(log_pi + comp, axis=1)


def test_gmm_log_likelihood_and_responsibilities_against_direct():
    """(VAE.11), (VAE.12) the mixture density and Bayes' rule, computed with plain densities."""
    rng = np.random.default_rng(31)
    x = rng.normal(scale=2, size=(9, 3))
    logits, means, logvars = rng.normal(size=4), rng.normal(scale=2, size=(4, 3)), rng.uniform(-1, 1, (4, 3))
    direct = _gmm_ll_direct(x, logits, means, logvars)
    np.testing.assert_allclose(R.gmm_log_likelihood(x, logits, means, logvars, "none"), direct, **TIGHT)
    np.testing.assert_allclose(R.gmm_log_likelihood(x, logits, means, logvars), direct.mean(), **TIGHT)
    pi = np.exp(logits) / np.exp(logits).sum()
    dens = np.stack([np.exp(_log_normal_diag(x, means[k], logvars[k])) for k in range(4)], axis=1)
    bayes = pi * dens / (pi * dens).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(R.gmm_responsibilities(x, logits, means, logvars), bayes, **TIGHT)
    # the logit gradient of the total log-likelihood is sum_n (r_nk - pi_k) (VAE.11)
    _, g_logits, _, _ = R.gmm_log_likelihood_backward(x, logits, means, logvars, 1.0, "sum")
    np.testing.assert_allclose(g_logits, (bayes - pi).sum(axis=0), **TIGHT)


def test_em_step_matches_weighted_formulas():
    """(VAE.13) one EM step = Bayes' rule responsibilities, then responsibility-weighted MLEs."""
    rng = np.random.default_rng(32)
    x = rng.normal(scale=2, size=(40, 2))
    logits, means, logvars = rng.normal(size=3), rng.normal(size=(3, 2)), rng.uniform(-0.5, 1, (3, 2))
    pi = np.exp(logits) / np.exp(logits).sum()
    dens = np.stack([np.exp(_log_normal_diag(x, means[k], logvars[k])) for k in range(3)], axis=1)
    r = pi * dens / (pi * dens).sum(axis=1, keepdims=True)
    nk = r.sum(axis=0)
    mu_new = (r.T @ x) / nk[:, None]
    var_new = np.stack([(r[:, k : k + 1] * (x - mu_new[k]) ** 2).sum(axis=0) / nk[k] for k in range(3)])
    new_logits, new_means, new_logvars = R.gmm_em_step(x, logits, means, logvars)
    np.testing.assert_allclose(np.exp(new_logits), nk / len(x), **TIGHT)
    np.testing.assert_allclose(new_means, mu_new, **TIGHT)
    np.testing.assert_allclose(new_logvars, np.log(var_new), **TIGHT)
    # the variance floor: a component sitting on one isolated point gets e^{min_logvar}
    x2 = np.vstack([x, [[100.0, 100.0]]])
    means2 = np.vstack([means, [[100.0, 100.0]]])
    _, m2, lv2 = R.gmm_em_step(x2, np.zeros(4), means2, np.vstack([logvars, [[-3.0, -3.0]]]), min_logvar=-5.0)
    np.testing.assert_allclose(m2[3], [100.0, 100.0], **TIGHT)
    np.testing.assert_allclose(lv2[3], [-5.0, -5.0], **TIGHT)


def _farthest_point_init(x, k):
    idx = [0]
    for _ in range(k - 1):
        dist = np.min(((x[:, None, :] - x[idx][None]) ** 2).sum(-1), axis=1)
        idx.append(int(np.argmax(dist)))
    return x[idx].copy()


@pytest.mark.parametrize("separated", [True, False], ids=["separated", "overlapping"])
def test_em_never_lowers_log_likelihood_and_recovers_components(separated):
    """(VAE.13) 30 EM steps: the log-likelihood (computed directly) never decreases; on a
    well-separated mixture EM recovers the components: means, variances and weights equal the
    per-cluster maximum-likelihood estimates from the TRUE labels, up to a permutation."""
    rng = np.random.default_rng(33)
    true_means = np.array([[-5.0, 0.0], [5.0, 0.5], [0.0, 6.0]]) * (1.0 if separated else 0.25)
    true_std = np.array([[0.7, 0.5], [0.6, 0.9], [0.8, 0.6]])
    labels = rng.choice(3, size=600, p=[0.5, 0.3, 0.2])
    x = true_means[labels] + true_std[labels] * rng.standard_normal((600, 2))
    logits = np.zeros(3)
    means = _farthest_point_init(x, 3) if separated else rng.normal(size=(3, 2))
    logvars = np.tile(np.log(x.var(axis=0)), (3, 1))
    history = [_gmm_ll_direct(x, logits, means, logvars).sum()]
    for _ in range(30):
        logits, means, logvars = R.gmm_em_step(x, logits, means, logvars)
        history.append(_gmm_ll_direct(x, logits, means, logvars).sum())
    steps = np.diff(history)
    # rounding of a sum of 600 terms of size ~5: 1e-9 relative is far above it, far below a real drop
    assert np.all(steps >= -1e-9 * abs(history[-1])), steps.min()
    assert history[-1] > history[0]
    if not separated:
        return
    best = min(itertools.permutations(range(3)), key=lambda p: np.sum((means[list(p)] - true_means) ** 2))
    perm = list(best)
    for k in range(3):  # ML estimates with known labels (divide by N_k)
        xk = x[labels == k]
        np.testing.assert_allclose(means[perm[k]], xk.mean(axis=0), rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(np.exp(logvars[perm[k]]), xk.var(axis=0), rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(np.exp(logits[perm[k]]), len(xk) / len(x), rtol=1e-8, atol=1e-8)
    assert np.max(np.abs(means[perm] - true_means)) < 0.2


# ============================================================================= extreme inputs and checks


def test_extreme_inputs_stay_finite():
    """logvar +-30 and logits +-1e4: every value and gradient finite, with exact asymptotic answers."""
    big = 1e4
    mu = np.array([[0.0, 1.0], [-2.0, 0.5]])
    lv = np.array([[30.0, -30.0], [-30.0, 30.0]])
    kl = R.gaussian_kl(mu, lv, "none")
    np.testing.assert_allclose(kl, 0.5 * np.sum(mu**2 + np.exp(lv) - 1 - lv, axis=1), rtol=1e-14)
    for g in R.gaussian_kl_backward(mu, lv, 1.0, "sum"):
        assert_all_finite(g, "gaussian_kl grad")
    nk = R.normal_kl(mu, lv, mu[::-1], lv[::-1])
    assert_all_finite(nk, "normal_kl")
    for g in R.normal_kl_backward(mu, lv, mu[::-1], lv[::-1], np.ones((2, 2))):
        assert_all_finite(g, "normal_kl grad")
    # Bernoulli at +-1e4: confident and right = 0 exactly, confident and wrong = |l|
    logits = np.array([[big, -big, big, -big]])
    x = np.array([[1.0, 0.0, 0.0, 1.0]])
    assert float(R.bernoulli_nll(logits, x, "sum")) == 2 * big
    assert float(R.bernoulli_nll(logits[:, :2], x[:, :2], "sum")) == 0.0
    g_l, g_x = R.bernoulli_nll_backward(logits, x, 1.0, "sum")
    np.testing.assert_array_equal(g_l, [[0.0, 0.0, 1.0, -1.0]])
    assert_all_finite(g_x, "bernoulli grad x")
    # Gaussian NLL at logvar +-30
    gn = R.gaussian_nll(mu, mu + 1.0, lv, "none")
    np.testing.assert_allclose(gn, 0.5 * np.sum(LOG_2PI + lv + np.exp(-lv), axis=1), rtol=1e-14)
    for g in R.gaussian_nll_backward(mu, mu + 1.0, lv, 1.0, "sum"):
        assert_all_finite(g, "gaussian_nll grad")
    for lik, rec, xx in [("bernoulli", logits, x), ("gaussian", np.zeros((1, 4)), np.ones((1, 4)))]:
        v = R.negative_elbo(rec, xx, mu[:1], lv[:1], 2.0, lik, None if lik == "bernoulli" else -30.0)
        assert_all_finite(v, f"negative_elbo {lik}")
        for g in R.negative_elbo_backward(rec, xx, mu[:1], lv[:1], 1.0, 2.0, lik):
            assert_all_finite(g, f"negative_elbo {lik} grad")
    # IWAE: one weight dominates by 2e4 nats
    lw = np.array([[big, -big, -big], [-big, -big, -big]])
    np.testing.assert_allclose(R.iwae_bound(lw, "none"), [big - math.log(3), -big], rtol=1e-15)
    (g,) = R.iwae_bound_backward(lw, 1.0, "sum")
    np.testing.assert_allclose(g, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-15)
    # GMM: logits +-1e4 (component 0 has all the weight), logvars +-30
    pts = np.array([[0.0, 0.0], [3.0, -1.0]])
    lg = np.array([big, -big, 0.0])
    means = np.array([[0.0, 0.0], [3.0, -1.0], [1.0, 1.0]])
    logvars = np.array([[30.0, 30.0], [-30.0, -30.0], [0.0, 0.0]])
    ll = R.gmm_log_likelihood(pts, lg, means, logvars, "none")
    np.testing.assert_allclose(ll, _log_normal_diag(pts, means[0], logvars[0]), rtol=1e-14)
    for g in R.gmm_log_likelihood_backward(pts, lg, means, logvars, 1.0, "sum"):
        assert_all_finite(g, "gmm grad")
    r = R.gmm_responsibilities(pts, np.zeros(3), means, logvars)
    assert_all_finite(r, "responsibilities")
    np.testing.assert_allclose(r.sum(axis=1), 1.0, rtol=1e-15)
    # a point 1e3 away from two tight components: every density underflows, the log domain does not
    far = np.array([[1000.0, 0.0]])
    tight = np.array([[-1.0, -1.0], [-1.0, -1.0]])
    mm = np.array([[0.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(R.gmm_responsibilities(far, np.zeros(2), mm, tight), [[0.0, 1.0]], atol=1e-300)
    for arr in R.gmm_em_step(far.repeat(3, 0) + np.arange(3)[:, None], np.zeros(2), mm, tight):
        assert_all_finite(arr, "em step")


def test_bad_arguments_name_the_argument():
    ok = np.zeros((2, 3))
    cases = [
        (lambda: R.gaussian_kl(ok, np.zeros((2, 4))), ValueError, "logvar"),
        (lambda: R.gaussian_kl(ok, ok, "avg"), ValueError, "reduction"),
        (lambda: R.bernoulli_nll(ok, ok + 1.5), ValueError, "x"),
        (lambda: R.bernoulli_nll(ok, ok + np.nan), ValueError, "x"),
        (lambda: R.gaussian_nll(ok, ok, np.zeros((2, 1, 3))), ValueError, "logvar"),
        (lambda: R.gaussian_nll(ok, ok, np.zeros(2)), ValueError, "logvar"),
        (lambda: R.normal_kl(ok, np.zeros(4), ok, ok), ValueError, "mean1, logvar1"),
        (lambda: R.normal_kl_backward(ok, ok, ok, ok, np.ones(3)), ValueError, "grad_output"),
        (lambda: R.negative_elbo(ok, ok, ok, ok, beta=-1.0), ValueError, "beta"),
        (lambda: R.negative_elbo(ok, ok, ok, ok, beta=math.inf), ValueError, "beta"),
        (lambda: R.negative_elbo(ok, ok, ok, ok, likelihood="laplace"), ValueError, "likelihood"),
        (lambda: R.negative_elbo(ok, ok, ok, ok, recon_logvar=0.0), ValueError, "recon_logvar"),
        (lambda: R.negative_elbo(ok, ok, np.zeros((3, 2)), np.zeros((3, 2))), ValueError, "mu"),
        (lambda: R.iwae_bound(np.zeros(4)), ValueError, "log_weights"),
        (lambda: R.iwae_bound(np.zeros((0, 3))), ValueError, "log_weights"),
        (
            lambda: R.gmm_log_likelihood(ok, np.zeros(2), np.zeros((2, 2)), np.zeros((2, 3))),
            ValueError,
            "means",
        ),
        (
            lambda: R.gmm_log_likelihood(ok, np.zeros(2), np.zeros((2, 3)), np.zeros((3, 3))),
            ValueError,
            "logvars",
        ),
        (lambda: R.gmm_log_likelihood(ok, np.zeros((2, 1)), ok, ok), ValueError, "logits"),
        (lambda: R.gmm_em_step(ok, np.zeros(2), ok, ok, min_logvar=math.nan), ValueError, "min_logvar"),
        (lambda: R.gmm_em_step(ok, np.zeros(2), ok, ok, min_logvar=800.0), ValueError, "min_logvar"),
        (lambda: R.gaussian_kl(ok.astype(complex), ok), TypeError, "mu"),
        (lambda: R.gmm_responsibilities(np.zeros(3), np.zeros(2), ok, ok), ValueError, "x"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=rf"^[a-z_0-9]+: {name}"):
            call()


# ---------------------------------------------------------------- the target check in the kernel
@pytest.mark.parametrize("fn", ["bernoulli_nll", "negative_elbo"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bernoulli_target_outside_unit_interval_raises(fn, reduction):
    """The kernel marks an out-of-range target NaN and the caller then raises naming x;
    a NaN logit with valid targets is a NaN result, not an error; -0.0 is a valid target."""
    pytest.importorskip("genloss._C")
    import genloss.native as gn

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 9))
    x = rng.uniform(size=(6, 9))
    mu, lv = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))

    def call(lg, xx):
        if fn == "bernoulli_nll":
            return gn.bernoulli_nll(lg, xx, reduction=reduction)[0]
        return gn.negative_elbo(lg, xx, mu, lv, reduction=reduction)[0]

    for bad in (1.0 + 1e-6, -1e-6, np.inf, np.nan):
        xb = x.copy()
        xb[4, 7] = bad
        with pytest.raises(ValueError, match=r"^[a-z_0-9]+: x must lie in \[0, 1\]"):
            call(logits, xb)
    lg = logits.copy()
    lg[2, 3] = np.nan
    v = np.asarray(call(lg, x))
    assert np.isnan(v).any()
    xz = x.copy()
    xz[0, 0] = -0.0
    xz[0, 1] = 1.0
    assert np.isfinite(np.asarray(call(logits, xz))).all()


# ============================================================================= all -inf rows: reference == engine


def test_iwae_all_neg_inf_row_gradient_is_uniform_in_every_layer():
    """(VAE.10) a row of only -inf log-weights: value -inf, gradient w/K per entry, the limit of
    softmax(a - L) as L -> inf (every normalised-weight row sums to 1); the reference and the torch
    op (native engine) agree, and each row of the gradient sums to its upstream weight."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    lw = np.array([[-np.inf] * 4, [0.0, 1.0, 2.0, -np.inf], [-np.inf, -np.inf, 3.0, -np.inf]])
    up = np.array([2.0, 3.0, 0.5])
    # the limit, written here: a row of equal finite entries has softmax exactly 1/K
    expected = np.array(
        [[0.5] * 4, np.r_[np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum() * 3, 0], [0, 0, 0.5, 0]]
    )
    (ref,) = R.iwae_bound_backward(lw, up, "none")
    np.testing.assert_allclose(ref, expected, rtol=1e-15, atol=0)
    np.testing.assert_allclose(ref.sum(axis=1), up, rtol=1e-15)
    t = torch.tensor(lw, requires_grad=True)
    value = gt.iwae_bound(t, reduction="none")
    assert value[0].item() == -math.inf
    value.backward(torch.tensor(up))
    np.testing.assert_allclose(t.grad.numpy(), ref, rtol=1e-15, atol=0)


def test_gmm_all_neg_inf_logits_backward_matches_its_forward():
    """(VAE.11) every mixing logit -inf: the forward is the uniform mixture (its log-softmax shifts
    the maximum by exactly 0), so the logit gradient is sum_n w_n (r_nk - 1/K) and sums to 0 —
    the same as for any equal finite logits; the torch op agrees."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    x = np.zeros((2, 1))
    means = np.array([[0.0], [1.0]])
    logvars = np.zeros((2, 1))
    neg = np.array([-np.inf, -np.inf])
    # responsibilities of the uniform mixture by Bayes' rule: r_0 = 1 / (1 + e^{-1/2}) at x = 0
    r0 = 1.0 / (1.0 + math.exp(-0.5))
    expected = 2 * np.array([r0 - 0.5, 0.5 - r0])
    for reduction, scale in (("sum", 1.0), ("mean", 0.5)):
        grads = R.gmm_log_likelihood_backward(x, neg, means, logvars, 1.0, reduction)
        np.testing.assert_allclose(grads[1], scale * expected, rtol=1e-14)
        assert abs(grads[1].sum()) <= 1e-15
        # equal finite logits are the same mixture: every gradient equal
        for g, g0 in zip(
            grads, R.gmm_log_likelihood_backward(x, np.zeros(2), means, logvars, 1.0, reduction), strict=True
        ):
            np.testing.assert_allclose(g, g0, rtol=1e-15, atol=1e-16)
        ts = [torch.tensor(a, requires_grad=True) for a in (x, neg, means, logvars)]
        gt.gmm_log_likelihood(*ts, reduction=reduction).backward()
        for name, tt, g in zip(("x", "logits", "means", "logvars"), ts, grads, strict=True):
            np.testing.assert_allclose(tt.grad.numpy(), g, rtol=1e-13, atol=1e-15, err_msg=name)
