r"""Identities of the GAN family, checked numerically against the NumPy reference.

Every assertion compares ``genloss.reference.gan`` with a value computed here
independently of it: a closed form, a definition written out with plain NumPy,
or a brute-force search.  The numbers in the comments are derived in
``derivations/gan.md`` (tags ``GAN.n``); none is copied from the implementation.

Discrete distributions are represented exactly by batches: with integer counts
``n_k`` and ``p_k = n_k / N``, the batch that repeats atom ``k`` ``n_k`` times has
batch mean ``sum_k p_k h(l_k)``, the expectation under ``p``.  So a two-population
loss evaluated on ``np.repeat(l, n)`` and ``np.repeat(l, m)`` IS the population
objective of the discrete pair ``(p, q)``, up to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from genloss.reference import gan as R

LOG2 = math.log(2.0)
LOG4 = math.log(4.0)
SEEDS = list(range(6))
K = 7  # atoms per discrete distribution

# Tolerances.  Float64 throughout.  Sums here have at most a few hundred terms
# of size O(1), so rounding is below 1e-13; 1e-12 leaves a margin without
# hiding an error of any real size (a wrong constant factor is O(1)).
TIGHT = dict(rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- independent helpers
# Written from the definitions with plain NumPy; deliberately NOT the reference's
# primitives.  np.logaddexp(0, x) = log(1 + e^x) is NumPy's own stable softplus.


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid_naive(x):
    """1/(1+e^{-x}); used only for |x| <= 30, where it is accurate in float64."""
    return 1.0 / (1.0 + np.exp(-x))


def _lse(z, axis=-1):
    return np.logaddexp.reduce(z, axis=axis)


def _discrete(rng, k=K, same=False):
    """Integer counts n, m >= 1 and the distributions p = n/N, q = m/M."""
    n = rng.integers(1, 30, size=k)
    m = n.copy() if same else rng.integers(1, 30, size=k)
    return n, m, n / n.sum(), m / m.sum()


def _kl(a, b):
    return float(np.sum(a * np.log(a / b)))


def _jsd(p, q):
    """JSD(p||q) = 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2 -- the definition."""
    mix = 0.5 * (p + q)
    return 0.5 * _kl(p, mix) + 0.5 * _kl(q, mix)


def _V_def(D, p, q):
    """V(D,G) = sum_x p log D + q log(1-D) for discrete p, q (GAN.1), from the definition."""
    return np.sum(p * np.log(D) + q * np.log1p(-D), axis=-1)


def _V_ref(logits, n, m):
    """-gan_d_loss on the repeated batches = V of the discrete pair (GAN.3)."""
    return -float(R.gan_d_loss(np.repeat(logits, n), np.repeat(logits, m)))


def _per_atom(grad, counts):
    """Sum a gradient w.r.t. the repeated batch back onto the atoms."""
    idx = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(idx, weights=grad, minlength=len(counts))


def _g(x):
    return float(np.asarray(x))


# ============================================================================= GAN.2 / GAN.4


def test_softplus_identities():
    """(GAN.2) log D = -softplus(-l), log(1-D) = -softplus(l), and softplus(l) - softplus(-l) = l."""
    l = np.linspace(-30.0, 30.0, 121)
    D = _sigmoid_naive(l)
    ns = R.gan_g_loss(l, mode="nonsaturating", reduction="none")  # softplus(-l) = -log D
    mm = R.gan_g_loss(l, mode="minimax", reduction="none")  # -softplus(l) = log(1 - D)
    np.testing.assert_allclose(ns, -np.log(D), rtol=1e-12, atol=1e-15)
    # log(1-D) = log(1/(1+e^l)) = -log1p(e^l): 1 - D itself would round away when D ~ 1.
    np.testing.assert_allclose(mm, -np.log1p(np.exp(l)), rtol=1e-12, atol=1e-15)
    # softplus(-l) - softplus(l) = -l: the two generator values differ by the logit.
    np.testing.assert_allclose(ns + mm, -l, rtol=0, atol=1e-12)
    # Extremes: softplus(1e4) = 1e4 exactly in float64, softplus(-1e4) = 0 (e^{-1e4} underflows).
    big = np.array([-1e4, 1e4])
    np.testing.assert_array_equal(R.gan_g_loss(big, mode="nonsaturating", reduction="none"), [1e4, 0.0])
    np.testing.assert_array_equal(R.gan_g_loss(big, mode="minimax", reduction="none"), [-0.0, -1e4])


def test_gan_d_loss_gradient_closed_form():
    """(GAN.4) d/dl softplus(-l) = sigmoid(l) - 1 = -sigmoid(-l); d/dl softplus(l) = sigmoid(l)."""
    rng = np.random.default_rng(0)
    r = rng.uniform(-25, 25, size=13)
    f = rng.uniform(-25, 25, size=9)
    gr, gf = R.gan_d_loss_backward(r, f, grad_output=np.float64(1.0))
    np.testing.assert_allclose(gr, -_sigmoid_naive(-r) / r.size, rtol=1e-12, atol=0)
    np.testing.assert_allclose(gf, _sigmoid_naive(f) / f.size, rtol=1e-12, atol=0)
    gr_s, gf_s = R.gan_d_loss_backward(r, f, grad_output=np.float64(2.5), reduction="sum")
    np.testing.assert_allclose(gr_s, 2.5 * (_sigmoid_naive(r) - 1.0), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(gf_s, 2.5 * _sigmoid_naive(f), rtol=1e-12, atol=0)
    # Limits at |l| = 1e4: sigmoid(1e4) - 1 = 0, sigmoid(-1e4) - 1 = -1, finite.
    ext = np.array([-1e4, 1e4])
    gr, gf = R.gan_d_loss_backward(ext, ext, grad_output=np.float64(1.0), reduction="sum")
    np.testing.assert_array_equal(gr, [-1.0, -0.0])
    np.testing.assert_array_equal(gf, [0.0, 1.0])
    assert np.isfinite(R.gan_d_loss(ext, ext))


# ============================================================================= constant factors


def test_constant_factor_gan_objective():
    """gan_d_loss has NO 1/2: it is BCE(real, 1) + BCE(fake, 0), each averaged over its batch.

    The note that writes V with a 1/2 in front (and the PyTorch snippet that divides the
    summed BCE by 2) describes 1/2 gan_d_loss: same maximiser D*, half the gradient.
    """
    rng = np.random.default_rng(1)
    r = rng.uniform(-8, 8, size=11)
    f = rng.uniform(-8, 8, size=6)

    def bce(l, y):  # binary cross-entropy on the probability, as nn.BCELoss, moderate logits
        s = _sigmoid_naive(l)
        return -(y * np.log(s) + (1 - y) * np.log(1 - s))

    full = bce(r, 1.0).mean() + bce(f, 0.0).mean()
    np.testing.assert_allclose(_g(R.gan_d_loss(r, f)), full, **TIGHT)
    half = 0.5 * full  # the 1/2-convention value
    assert abs(_g(R.gan_d_loss(r, f)) - 2.0 * half) < 1e-12
    # Halving the objective halves the gradient ...
    gr, gf = R.gan_d_loss_backward(r, f, grad_output=np.float64(0.5))
    np.testing.assert_allclose(gr, 0.5 * (_sigmoid_naive(r) - 1) / r.size, rtol=1e-10)
    np.testing.assert_allclose(gf, 0.5 * _sigmoid_naive(f) / f.size, rtol=1e-12)
    # ... and does not move the maximiser: brute-force argmax of V and of V/2 on a grid.
    p, q = 0.3, 0.7
    D = np.linspace(1e-4, 1 - 1e-4, 99999)
    v = p * np.log(D) + q * np.log1p(-D)
    assert np.argmax(v) == np.argmax(0.5 * v)
    assert abs(D[np.argmax(v)] - p / (p + q)) < 2e-5
    # With V as genloss has it (no 1/2), V(D*) = 2 JSD - log 4 (GAN.6); with V/2 it would be
    # JSD - log 2.  Two-atom distributions pp, qq; -gan_d_loss evaluated at D*:
    n, m = np.array([3, 7]), np.array([7, 3])  # pp = (0.3, 0.7), qq = (0.7, 0.3)
    pp, qq = n / 10, m / 10
    vstar = _V_ref(np.log(pp / qq), n, m)
    np.testing.assert_allclose(vstar, 2 * _jsd(pp, qq) - LOG4, **TIGHT)
    assert abs(vstar - (_jsd(pp, qq) - LOG2)) > 0.1  # the 1/2-convention statement is off by JSD - log 2


def test_constant_factor_lsgan_half():
    """lsgan_* keep Mao et al.'s 1/2: exactly half the plain squared error; gradients (x - target)."""
    rng = np.random.default_rng(2)
    r = rng.normal(size=(5, 3))
    f = rng.normal(size=(8, 3))
    a, b, c = -0.5, 0.8, 0.3
    plain_d = np.mean(np.sum((r - b) ** 2, axis=1)) + np.mean(np.sum((f - a) ** 2, axis=1))
    plain_g = np.mean(np.sum((f - c) ** 2, axis=1))
    np.testing.assert_allclose(_g(R.lsgan_d_loss(r, f, a=a, b=b)), 0.5 * plain_d, **TIGHT)
    np.testing.assert_allclose(_g(R.lsgan_g_loss(f, c=c)), 0.5 * plain_g, **TIGHT)
    gr, gf = R.lsgan_d_loss_backward(r, f, grad_output=np.float64(1.0), a=a, b=b)
    np.testing.assert_allclose(gr, (r - b) / 5, **TIGHT)  # the plain convention gives 2 (r - b)/5
    np.testing.assert_allclose(gf, (f - a) / 8, **TIGHT)
    (gg,) = R.lsgan_g_loss_backward(f, grad_output=np.float64(1.0), c=c)
    np.testing.assert_allclose(gg, (f - c) / 8, **TIGHT)


# ============================================================================= GAN.5 / GAN.6


@pytest.mark.parametrize("seed", SEEDS)
def test_optimal_discriminator_maximises_value(seed):
    """(GAN.5) D* = p/(p+q), i.e. l* = log(p/q), maximises V on discrete distributions."""
    rng = np.random.default_rng(100 + seed)
    n, m, p, q = _discrete(rng)
    lstar = np.log(p / q)
    vstar = _V_ref(lstar, n, m)
    np.testing.assert_allclose(vstar, _V_def(p / (p + q), p, q), **TIGHT)
    # Stationary: the gradient of gan_d_loss, summed back onto the atoms, vanishes at l*.
    gr, gf = R.gan_d_loss_backward(np.repeat(lstar, n), np.repeat(lstar, m), grad_output=np.float64(1.0))
    assert np.max(np.abs(_per_atom(gr, n) + _per_atom(gf, m))) < 1e-14
    # Perturbing D* in any one coordinate lowers V (V is strictly concave in each logit).
    for k in range(K):
        for d in (-2.0, -0.1, -1e-3, 1e-3, 0.1, 2.0):
            l = lstar.copy()
            l[k] += d
            assert _V_ref(l, n, m) < vstar
    # Brute force 1: per-atom grid search over D in (0, 1) (V separates over atoms).
    D = np.linspace(1e-5, 1 - 1e-5, 200001)
    best = D[np.argmax(p[:, None] * np.log(D) + q[:, None] * np.log1p(-D), axis=1)]
    np.testing.assert_allclose(best, p / (p + q), rtol=0, atol=1e-5)  # grid step 5e-6
    # Brute force 2: random search over whole discriminators never beats V(D*).
    Ds = rng.uniform(1e-6, 1 - 1e-6, size=(20000, K))
    assert np.max(_V_def(Ds, p, q)) < vstar
    # Brute force 3: gradient ascent on V with the reference backward converges to l*.
    l = np.zeros(K)
    for _ in range(300):
        gr, gf = R.gan_d_loss_backward(np.repeat(l, n), np.repeat(l, m), grad_output=np.float64(1.0))
        g = _per_atom(gr, n) + _per_atom(gf, m)  # d(loss)/dl_k = q_k sig(l) - p_k sig(-l)
        l -= g / ((p + q) * 0.25)  # Newton-like scale: the curvature is (p+q) D(1-D) <= (p+q)/4
    np.testing.assert_allclose(l, lstar, rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
def test_value_at_optimal_discriminator_is_2jsd_minus_log4(seed):
    """(GAN.6) V(D*, G) = 2 JSD(p||q) - log 4, JSD from its definition."""
    rng = np.random.default_rng(200 + seed)
    n, m, p, q = _discrete(rng)
    vstar = _V_ref(np.log(p / q), n, m)
    np.testing.assert_allclose(vstar, 2.0 * _jsd(p, q) - LOG4, **TIGHT)
    assert -LOG4 - 1e-12 <= vstar <= 1e-12  # JSD in [0, log 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_jsd_estimate_at_optimal_logits(seed):
    """(GAN.6) jsd_estimate = (V + log 4)/2 equals JSD at l* and lower-bounds it elsewhere."""
    rng = np.random.default_rng(300 + seed)
    n, m, p, q = _discrete(rng)
    lstar = np.log(p / q)
    est = _g(R.jsd_estimate(np.repeat(lstar, n), np.repeat(lstar, m)))
    np.testing.assert_allclose(est, _jsd(p, q), **TIGHT)
    for _ in range(20):
        l = lstar + rng.normal(scale=0.7, size=K)
        assert _g(R.jsd_estimate(np.repeat(l, n), np.repeat(l, m))) < _jsd(p, q)
    # Gradient of jsd_estimate = -1/2 gradient of gan_d_loss.
    r, f = rng.normal(size=6), rng.normal(size=4)
    jr, jf = R.jsd_estimate_backward(r, f, grad_output=np.float64(1.0))
    np.testing.assert_allclose(jr, 0.5 * _sigmoid_naive(-r) / 6, **TIGHT)
    np.testing.assert_allclose(jf, -0.5 * _sigmoid_naive(f) / 4, **TIGHT)
    # p = q: JSD = 0 at D = 1/2.  Disjoint supports: JSD -> log 2 as the logits saturate.
    assert abs(_g(R.jsd_estimate(np.zeros(3), np.zeros(5)))) < 1e-15
    sat = _g(R.jsd_estimate(np.full(3, 40.0), np.full(5, -40.0)))
    np.testing.assert_allclose(sat, LOG2 - _softplus(-40.0), rtol=0, atol=1e-15)


def test_jsd_estimate_averages_over_every_logit():
    """(GAN.6) A patch discriminator's logits are each a draw of V's expectations: at chance
    (all logits 0, p = q) the estimate is 0 whatever the logits' shape (summing a sample's 900
    logits would give (log 4 - 900 log 4)/2), and in every layer it equals the estimate of the
    same logits as one logit per row, with that gradient reshaped."""
    import torch

    from genloss import native as N
    from genloss import torch as T

    assert abs(_g(R.jsd_estimate(np.zeros((8, 1, 30, 30)), np.zeros((5, 1, 30, 30))))) < 1e-15
    rng = np.random.default_rng(7)
    r, f = rng.normal(size=(4, 3, 5)), rng.normal(size=(6, 3, 5))
    flat = _g(R.jsd_estimate(r.reshape(-1), f.reshape(-1)))
    jr, jf = R.jsd_estimate_backward(r.reshape(-1), f.reshape(-1), grad_output=np.float64(1.0))
    np.testing.assert_allclose(_g(R.jsd_estimate(r, f)), flat, **TIGHT)
    gr, gf = R.jsd_estimate_backward(r, f, grad_output=np.float64(1.0))
    np.testing.assert_allclose(gr, jr.reshape(r.shape), **TIGHT)
    np.testing.assert_allclose(gf, jf.reshape(f.shape), **TIGHT)
    value, (nr, nf) = N.jsd_estimate(r, f)
    np.testing.assert_allclose(_g(value), flat, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(nr, gr, rtol=1e-14, atol=1e-17)
    np.testing.assert_allclose(nf, gf, rtol=1e-14, atol=1e-17)
    tr, tf = (torch.tensor(a, requires_grad=True) for a in (r, f))
    T.jsd_estimate(tr, tf).backward()
    np.testing.assert_allclose(tr.grad.numpy(), gr, rtol=1e-14, atol=1e-17)
    np.testing.assert_allclose(tf.grad.numpy(), gf, rtol=1e-14, atol=1e-17)


# ============================================================================= GAN.7


@pytest.mark.parametrize("seed", SEEDS)
def test_generator_losses_same_fixed_point(seed):
    """(GAN.7) NS and minimax push the same way and are stationary at the same point q = p.

    With D held at D*(p, q) (alternating training), the generator objective
    sum_k q_k phi(l*_k) has gradient phi(l*_k) in q_k; its tangent part on the simplex,
    phi - mean(phi), vanishes iff phi(l*) is constant iff p = q (then D* = 1/2).
    """
    rng = np.random.default_rng(400 + seed)
    for mode in ("nonsaturating", "minimax"):
        # p = q: D* = sigmoid(0) = 1/2, and the projected gradient is exactly 0.
        n, m, p, q = _discrete(rng, same=True)
        lstar = np.log(p / q)
        np.testing.assert_array_equal(lstar, 0.0)
        phi = R.gan_g_loss(lstar, mode=mode, reduction="none")
        assert np.all(phi - phi.mean() == 0.0)
    n, m, p, q = _discrete(rng)
    lstar = np.log(p / q)
    ns = R.gan_g_loss(lstar, mode="nonsaturating", reduction="none")
    mm = R.gan_g_loss(lstar, mode="minimax", reduction="none")
    assert np.ptp(ns) > 1e-3 and np.ptp(mm) > 1e-3  # not stationary when q != p
    order = np.argsort(lstar)
    # Both strictly decreasing in l, hence in D: they move mass the same way.
    assert np.all(np.diff(ns[order]) < 0) and np.all(np.diff(mm[order]) < 0)
    # Known values at D*: E_q[log(1-D*)] = KL(q||m) - log 2 and E_q[-log D*] = KL(q||p) - KL(q||m) + log 2.
    mix = 0.5 * (p + q)
    np.testing.assert_allclose(np.sum(q * mm), _kl(q, mix) - LOG2, **TIGHT)
    np.testing.assert_allclose(np.sum(q * ns), _kl(q, p) - _kl(q, mix) + LOG2, **TIGHT)


def test_minimax_gradient_saturates_ns_does_not():
    """(GAN.7) At l -> -20 (D(G(z)) ~ 2e-9): minimax gradient ~ -2e-9, non-saturating ~ -1."""
    l = np.array([-20.0])
    (g_mm,) = R.gan_g_loss_backward(l, grad_output=np.float64(1.0), mode="minimax")
    (g_ns,) = R.gan_g_loss_backward(l, grad_output=np.float64(1.0), mode="nonsaturating")
    e = math.exp(-20.0)
    assert abs(g_mm[0]) < 1e-8
    assert abs(g_ns[0] + 1.0) < 1e-8
    np.testing.assert_allclose(g_mm[0], -e / (1 + e), rtol=1e-13)  # -sigmoid(l)
    np.testing.assert_allclose(g_ns[0], -1 / (1 + e), rtol=1e-13)  # sigmoid(l) - 1
    # Same sign everywhere; ratio NS/minimax = (1 - D)/D = e^{-l}.
    ls = np.linspace(-30, 30, 61)
    (a,) = R.gan_g_loss_backward(ls, grad_output=np.float64(1.0), mode="minimax")
    (b,) = R.gan_g_loss_backward(ls, grad_output=np.float64(1.0), mode="nonsaturating")
    assert np.all(a < 0) and np.all(b < 0)
    np.testing.assert_allclose(b / a, np.exp(-ls), rtol=1e-12)


# ============================================================================= GAN.8


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_lsgan_optimal_discriminator(seed):
    """(GAN.8) D* = (b p + a q)/(p + q); with a=-1, b=1, c=0 the generator value is Delta(p,q)/2."""
    rng = np.random.default_rng(500 + seed)
    n, m, p, q = _discrete(rng)
    for a, b in ((0.0, 1.0), (-1.0, 1.0)):
        dstar = (b * p + a * q) / (p + q)
        best = _g(R.lsgan_d_loss(np.repeat(dstar, n), np.repeat(dstar, m), a=a, b=b))
        for k in range(K):
            for d in (-0.3, -1e-3, 1e-3, 0.3):
                y = dstar.copy()
                y[k] += d
                assert _g(R.lsgan_d_loss(np.repeat(y, n), np.repeat(y, m), a=a, b=b)) > best
        if (a, b) == (0.0, 1.0):
            # Brier coding: min = 1/2 sum pq/(p+q) = (2 - Delta)/8 (triangular discrimination).
            delta = np.sum((p - q) ** 2 / (p + q))
            np.testing.assert_allclose(best, (2.0 - delta) / 8.0, **TIGHT)
    # Mao et al.'s condition b - c = 1, b - a = 2: 1/2 E_p (D*-c)^2 + 1/2 E_q (D*-c)^2 = Delta/2.
    dstar = (p - q) / (p + q)
    c_g = _g(R.lsgan_g_loss(np.repeat(dstar, n), c=0.0)) + _g(R.lsgan_g_loss(np.repeat(dstar, m), c=0.0))
    np.testing.assert_allclose(c_g, 0.5 * np.sum((p - q) ** 2 / (p + q)), **TIGHT)


# ============================================================================= GAN.9 / GAN.10


def test_wgan_values():
    """(GAN.9) critic = mean C(fake) - mean C(real); generator = -mean C(fake); per-sample sums."""
    rng = np.random.default_rng(3)
    r, f = rng.normal(size=(6, 2, 2)), rng.normal(size=(4, 2, 2))
    direct = f.reshape(4, -1).sum(1).mean() - r.reshape(6, -1).sum(1).mean()
    np.testing.assert_allclose(_g(R.wgan_critic_loss(r, f)), direct, **TIGHT)
    np.testing.assert_allclose(_g(R.wgan_critic_loss(r, f, reduction="sum")), f.sum() - r.sum(), **TIGHT)
    np.testing.assert_allclose(_g(R.wgan_g_loss(f)), -f.reshape(4, -1).sum(1).mean(), **TIGHT)
    gr, gf = R.wgan_critic_loss_backward(r, f, grad_output=np.float64(1.0))
    np.testing.assert_array_equal(gr, np.full(r.shape, -1 / 6))
    np.testing.assert_array_equal(gf, np.full(f.shape, 1 / 4))


@pytest.mark.parametrize("sizes", [(40, 40), (37, 23)])
def test_wgan_kantorovich_rubinstein_1d(sizes):
    """(GAN.9) In 1-D, the 1-Lipschitz critic f' = sign(F_fake - F_real) attains W1 = int |F_r - F_f|."""
    rng = np.random.default_rng(sum(sizes))
    x = rng.normal(0.0, 1.0, size=sizes[0])  # real
    y = rng.normal(0.7, 1.5, size=sizes[1])  # fake
    t = np.sort(np.concatenate([x, y]))
    Fx = np.searchsorted(np.sort(x), t, side="right") / x.size  # CDFs on [t_i, t_{i+1})
    Fy = np.searchsorted(np.sort(y), t, side="right") / y.size
    dt = np.diff(t)
    w1 = np.sum(np.abs(Fx - Fy)[:-1] * dt)
    if sizes[0] == sizes[1]:  # equal sizes: W1 = mean |x_(i) - y_(i)| (sorted matching)
        np.testing.assert_allclose(w1, np.mean(np.abs(np.sort(x) - np.sort(y))), **TIGHT)
    crit = np.concatenate([[0.0], np.cumsum(np.sign(Fy - Fx)[:-1] * dt)])  # critic at t

    def critic(pts):
        return np.interp(pts, t, crit)

    np.testing.assert_allclose(-_g(R.wgan_critic_loss(critic(x), critic(y))), w1, rtol=1e-12, atol=1e-12)
    # Any other 1-Lipschitz critic gives at most W1.
    for h in (lambda s: s, lambda s: -s, np.sin, lambda s: np.abs(s - 0.3), np.tanh):
        assert -_g(R.wgan_critic_loss(h(x), h(y))) <= w1 + 1e-12


def test_hinge_values_and_kink():
    """(GAN.10) relu(1 - r) + relu(1 + f), generator -f; derivative 0 at the kink."""
    rng = np.random.default_rng(4)
    r, f = rng.normal(size=(7, 3)) * 2, rng.normal(size=(5, 3)) * 2
    direct = (
        np.maximum(1 - r, 0).reshape(7, -1).sum(1).mean() + np.maximum(1 + f, 0).reshape(5, -1).sum(1).mean()
    )
    np.testing.assert_allclose(_g(R.hinge_d_loss(r, f)), direct, **TIGHT)
    np.testing.assert_allclose(_g(R.hinge_g_loss(f)), -f.reshape(5, -1).sum(1).mean(), **TIGHT)
    gr, gf = R.hinge_d_loss_backward(r, f, grad_output=np.float64(1.0), reduction="sum")
    np.testing.assert_array_equal(gr, np.where(r < 1, -1.0, 0.0))
    np.testing.assert_array_equal(gf, np.where(f > -1, 1.0, 0.0))
    kink_r, kink_f = np.array([1.0, 1.0]), np.array([-1.0])
    gr, gf = R.hinge_d_loss_backward(kink_r, kink_f, grad_output=np.float64(1.0))
    np.testing.assert_array_equal(gr, [0.0, 0.0])
    np.testing.assert_array_equal(gf, [0.0])


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_hinge_optimum_is_total_variation(seed):
    """(GAN.10) min_D hinge_d_loss = 2 - 2 TV(p, q), attained at D = sign(p - q)."""
    rng = np.random.default_rng(600 + seed)
    n, m, p, q = _discrete(rng)
    tv = 0.5 * np.sum(np.abs(p - q))
    ystar = np.sign(p - q)
    best = _g(R.hinge_d_loss(np.repeat(ystar, n), np.repeat(ystar, m)))
    np.testing.assert_allclose(best, 2.0 - 2.0 * tv, **TIGHT)
    grid = np.linspace(-3, 3, 6001)
    brute = np.min(p[:, None] * np.maximum(1 - grid, 0) + q[:, None] * np.maximum(1 + grid, 0), axis=1)
    np.testing.assert_allclose(brute.sum(), best, rtol=0, atol=1e-12)


# ============================================================================= GAN.11


def _ragan_direct(r, f):
    """RaGAN with per-sample sums: d, g values from the definition (means over ALL elements)."""
    br, bf = r.shape[0], f.shape[0]
    mr, mf = r.mean(), f.mean()
    d = _softplus(-(r - mf)).sum() / br + _softplus(f - mr).sum() / bf
    g = _softplus(-(f - mr)).sum() / bf + _softplus(r - mf).sum() / br
    return d, g


def test_relativistic_against_direct_formula():
    """(GAN.11) RaGAN / RSGAN values against an independent NumPy formula."""
    rng = np.random.default_rng(5)
    r, f = rng.normal(size=(6, 3)) * 3, rng.normal(size=(4, 3)) * 3
    d, g = _ragan_direct(r, f)
    np.testing.assert_allclose(_g(R.relativistic_d_loss(r, f)), d, **TIGHT)
    np.testing.assert_allclose(_g(R.relativistic_g_loss(r, f)), g, **TIGHT)
    f2 = rng.normal(size=(6, 3)) * 3  # paired RSGAN: same shape
    rs_d = _softplus(-(r - f2)).sum(1).mean()
    rs_g = _softplus(-(f2 - r)).sum(1).mean()
    np.testing.assert_allclose(_g(R.relativistic_d_loss(r, f2, average=False)), rs_d, **TIGHT)
    np.testing.assert_allclose(_g(R.relativistic_g_loss(r, f2, average=False)), rs_g, **TIGHT)
    # softplus(-x) - softplus(x) = -x turns D - G into the WGAN critic loss (x2 for RaGAN).
    np.testing.assert_allclose(
        _g(R.relativistic_d_loss(r, f)) - _g(R.relativistic_g_loss(r, f)),
        2 * _g(R.wgan_critic_loss(r, f)),
        **TIGHT,
    )
    np.testing.assert_allclose(
        _g(R.relativistic_d_loss(r, f2, average=False)) - _g(R.relativistic_g_loss(r, f2, average=False)),
        _g(R.wgan_critic_loss(r, f2)),
        **TIGHT,
    )
    # Extreme logits stay finite.
    big_r, big_f = np.array([1e4, -1e4, 3.0]), np.array([-1e4, 1e4])
    assert np.isfinite(R.relativistic_d_loss(big_r, big_f)) and np.isfinite(
        R.relativistic_g_loss(big_r, big_f)
    )


def test_relativistic_gradients_through_means():
    """(GAN.11) The backward includes the cross terms through m_f and m_r (closed form)."""
    rng = np.random.default_rng(6)
    r, f = rng.normal(size=(5, 2)) * 2, rng.normal(size=(3, 2)) * 2
    br, bf, nr, nf = 5, 3, r.size, f.size
    mr, mf = r.mean(), f.mean()
    sa = _sigmoid_naive(-(r - mf))  # sigma(-a_i), a = r - m_f
    sb = _sigmoid_naive(f - mr)  # sigma(b_j),  b = f - m_r
    gr_d = -sa / br - sb.sum() / bf / nr
    gf_d = sb / bf + sa.sum() / br / nf
    gr, gf = R.relativistic_d_loss_backward(r, f, grad_output=np.float64(1.0))
    np.testing.assert_allclose(gr, gr_d, **TIGHT)
    np.testing.assert_allclose(gf, gf_d, **TIGHT)
    sc = _sigmoid_naive(-(f - mr))  # sigma(-c_j), c = f - m_r
    sd = _sigmoid_naive(r - mf)  # sigma(d_i),  d = r - m_f
    gf_g = -sc / bf - sd.sum() / br / nf
    gr_g = sd / br + sc.sum() / bf / nr
    gr, gf = R.relativistic_g_loss_backward(r, f, grad_output=np.float64(1.0))
    np.testing.assert_allclose(gr, gr_g, **TIGHT)
    np.testing.assert_allclose(gf, gf_g, **TIGHT)


# ============================================================================= GAN.12 / GAN.13


def test_gradient_penalty_value_and_gradient():
    """(GAN.12) lambda (|g| - c)^2 per sample; gradient 2 lambda (n - c) g / n; one-sided variant."""
    rng = np.random.default_rng(7)
    g = rng.normal(size=(6, 2, 3)) * 0.6
    lam, c = 7.0, 1.0
    nrm = np.sqrt((g.reshape(6, -1) ** 2).sum(1))
    np.testing.assert_allclose(
        _g(R.gradient_penalty_from_grads(g, lambda_=lam, center=c)), lam * np.mean((nrm - c) ** 2), **TIGHT
    )
    (gg,) = R.gradient_penalty_from_grads_backward(g, grad_output=np.float64(1.0), lambda_=lam, center=c)
    np.testing.assert_allclose(gg, (2 * lam * (nrm - c) / nrm)[:, None, None] * g / 6, **TIGHT)
    # One-sided: only norms above the centre are penalised.
    v1 = R.gradient_penalty_from_grads(g, lambda_=lam, center=c, one_sided=True, reduction="none")
    np.testing.assert_allclose(v1, lam * np.maximum(nrm - c, 0) ** 2, **TIGHT)
    assert np.any(nrm < c) and np.any(nrm > c)
    (g1,) = R.gradient_penalty_from_grads_backward(
        g, grad_output=np.ones(6), lambda_=lam, center=c, one_sided=True, reduction="none"
    )
    np.testing.assert_allclose(g1, (2 * lam * np.maximum(nrm - c, 0) / nrm)[:, None, None] * g, **TIGHT)
    # centre 0: lambda |g|^2, smooth, gradient 2 lambda g.
    (g0,) = R.gradient_penalty_from_grads_backward(
        g, grad_output=np.float64(1.0), lambda_=lam, center=0.0, reduction="sum"
    )
    np.testing.assert_allclose(g0, 2 * lam * g, **TIGHT)


def test_gradient_penalty_zero_grads():
    """(GAN.12) At g = 0 (the cone point) the value is lambda c^2 and the gradient exactly 0, finite."""
    g = np.zeros((3, 4))
    g[1] = [0.3, -0.4, 0.0, 1.2]
    lam, c = 10.0, 1.0
    v = R.gradient_penalty_from_grads(g, lambda_=lam, center=c, reduction="none")
    np.testing.assert_allclose(v, [lam * c * c, lam * (1.3 - c) ** 2, lam * c * c], **TIGHT)
    (gg,) = R.gradient_penalty_from_grads_backward(
        g, grad_output=np.ones(3), lambda_=lam, center=c, reduction="none"
    )
    assert np.all(np.isfinite(gg))
    assert np.all(gg[0] == 0.0) and np.all(gg[2] == 0.0)
    np.testing.assert_allclose(gg[1], 2 * lam * (1.3 - c) / 1.3 * g[1], **TIGHT)
    # Why 0: approaching 0 along +u and -u the gradient tends to -2 lambda c (+u) and -2 lambda c (-u);
    # no limit exists, and 0 is the minimum-norm subgradient (the midpoint of the two limits).
    u = np.array([[0.6, 0.8, 0.0, 0.0]])
    (gp,) = R.gradient_penalty_from_grads_backward(
        1e-9 * u, grad_output=np.float64(1.0), lambda_=lam, center=c
    )
    (gm,) = R.gradient_penalty_from_grads_backward(
        -1e-9 * u, grad_output=np.float64(1.0), lambda_=lam, center=c
    )
    np.testing.assert_allclose(gp, -2 * lam * c * u, rtol=1e-8)
    np.testing.assert_allclose(gp + gm, 0.0, atol=1e-12)


def test_r1_penalty():
    """(GAN.13) gamma/2 |g|^2 per sample, gradient gamma g (smooth; 0 at 0)."""
    rng = np.random.default_rng(8)
    g = rng.normal(size=(5, 3, 2))
    gam = 3.0
    np.testing.assert_allclose(
        R.r1_penalty_from_grads(g, gamma=gam, reduction="none"),
        gam / 2 * (g.reshape(5, -1) ** 2).sum(1),
        **TIGHT,
    )
    (gg,) = R.r1_penalty_from_grads_backward(g, grad_output=np.float64(1.0), gamma=gam)
    np.testing.assert_allclose(gg, gam * g / 5, **TIGHT)
    (g0,) = R.r1_penalty_from_grads_backward(np.zeros((2, 3)), grad_output=np.float64(1.0), gamma=gam)
    np.testing.assert_array_equal(g0, 0.0)


# ============================================================================= GAN.14


def test_feature_matching():
    """(GAN.14) |mean f_r - mean f_f|^2; gradients +-2 (mu_r - mu_f)/B; a pure shift gives |delta|^2."""
    rng = np.random.default_rng(9)
    fr, ff = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    diff = fr.mean(0) - ff.mean(0)
    np.testing.assert_allclose(_g(R.feature_matching_loss(fr, ff)), np.sum(diff**2), **TIGHT)
    gr, gf = R.feature_matching_loss_backward(fr, ff, grad_output=np.float64(1.0))
    np.testing.assert_allclose(gr, np.broadcast_to(2 * diff / 7, fr.shape), **TIGHT)
    np.testing.assert_allclose(gf, np.broadcast_to(-2 * diff / 4, ff.shape), **TIGHT)
    delta = rng.normal(size=5)
    np.testing.assert_allclose(_g(R.feature_matching_loss(fr, fr - delta)), np.sum(delta**2), **TIGHT)
    np.testing.assert_allclose(_g(R.feature_matching_loss(fr, fr[::-1])), 0.0, atol=1e-28)


def test_feature_matching_takes_feature_vectors_in_every_layer():
    """(GAN.14) Features are (B, F) in every layer (SPEC): feature maps of one shape on both
    sides are refused by name, not flattened by one layer and refused by the other."""
    import torch

    from genloss import native as N
    from genloss import torch as T

    maps = np.zeros((3, 2, 2))
    for fn in (R.feature_matching_loss, N.feature_matching_loss):
        with pytest.raises(ValueError, match=r"feature_matching_loss: real_features must have 2 dim"):
            fn(maps, maps)
    with pytest.raises(ValueError, match=r"feature_matching_loss: real_features must have 2 dim"):
        T.feature_matching_loss(torch.tensor(maps), torch.tensor(maps))


# ============================================================================= GAN.15


def _ssgan_batches(rng, C, scale=2.0):
    lab = rng.normal(size=(6, C + 1)) * scale
    y = rng.integers(0, C, size=6)
    unl = rng.normal(size=(5, C + 1)) * scale
    fake = rng.normal(size=(4, C + 1)) * scale
    return lab, y, unl, fake


def test_ssgan_critic_against_softmax():
    """(GAN.15, GAN.19) LSE form = explicit softmax then -log; gradients = softmax - target (3 targets)."""
    rng = np.random.default_rng(10)
    C = 4
    lab, y, unl, fake = _ssgan_batches(rng, C)

    def probs(z):  # explicit probabilities, moderate logits only
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    pl, pu, pf = probs(lab), probs(unl), probs(fake)
    # L_sup = -log p(y | x, real) = -log(p_y / (1 - p_C)) (GAN.19)
    direct = (
        np.mean(-np.log(pl[np.arange(6), y] / (1 - pl[:, C])))
        + np.mean(-np.log(1 - pu[:, C]))
        + np.mean(-np.log(pf[:, C]))
    )
    np.testing.assert_allclose(_g(R.ssgan_critic_loss(lab, y, unl, fake)), direct, **TIGHT)
    np.testing.assert_allclose(_g(R.ssgan_g_loss(fake)), np.mean(np.log(pf[:, C])), **TIGHT)
    gl, gu, gfk = R.ssgan_critic_loss_backward(lab, y, unl, fake, grad_output=np.float64(1.0))
    t_lab = np.eye(C + 1)[y]  # one-hot label
    t_unl = np.concatenate([pu[:, :C] / pu[:, :C].sum(1, keepdims=True), np.zeros((5, 1))], axis=1)
    t_fake = np.eye(C + 1)[np.full(4, C)]  # one-hot fake class
    r_lab = np.concatenate([pl[:, :C] / pl[:, :C].sum(1, keepdims=True), np.zeros((6, 1))], axis=1)
    np.testing.assert_allclose(gl, (r_lab - t_lab) / 6, **TIGHT)  # softmax over the real classes
    np.testing.assert_allclose(gu, (pu - t_unl) / 5, **TIGHT)
    np.testing.assert_allclose(gfk, (pf - t_fake) / 4, **TIGHT)
    for g in (gl, gu, gfk):  # each row sums to 0: shift invariance of a softmax loss
        np.testing.assert_allclose(g.sum(1), 0.0, atol=1e-15)
    (gg,) = R.ssgan_g_loss_backward(fake, grad_output=np.float64(1.0))
    np.testing.assert_allclose(gg, (t_fake - pf) / 4, **TIGHT)
    shift = rng.normal(size=(6, 1)) * 50
    np.testing.assert_allclose(
        _g(R.ssgan_critic_loss(lab + shift, y, unl + shift[:5], fake + shift[:4])), direct, rtol=1e-12
    )


def test_ssgan_extreme_logits_finite():
    """(GAN.15) +-1e4 logits: finite values with the exact asymptotics (each LSE has its own max)."""
    C = 3
    hi, lo = 1e4, -1e4
    lab = np.full((1, C + 1), lo)
    lab[0, 1] = hi  # confident and right: CE = 0
    unl = np.full((1, C + 1), lo)
    unl[0, C] = hi  # real sample called fake with certainty: -log(1 - p_C) = 2e4 - log C
    fake = np.full((1, C + 1), hi)
    fake[0, C] = lo  # fake sample called real: -log p_C = 2e4 + log C
    v = _g(R.ssgan_critic_loss(lab, np.array([1]), unl, fake))
    np.testing.assert_allclose(v, (2e4 - math.log(C)) + (2e4 + math.log(C)), rtol=1e-15)
    grads = R.ssgan_critic_loss_backward(lab, np.array([1]), unl, fake, grad_output=np.float64(1.0))
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(_g(R.ssgan_g_loss(fake)), -(2e4 + math.log(C)), rtol=1e-15)
    assert np.all(np.isfinite(R.ssgan_g_loss_backward(fake, grad_output=np.float64(1.0))[0]))


def test_ssgan_reduces_to_binary_gan():
    """(GAN.15) With l = lse(z_{<C}) - z_C the unsupervised part is gan_d_loss and ssgan_g_loss the minimax gan_g_loss."""
    rng = np.random.default_rng(11)
    C = 5
    lab, y, unl, fake = _ssgan_batches(rng, C, scale=4.0)
    ce = np.mean(_lse(lab[:, :C]) - lab[np.arange(6), y])  # L_sup: over the real classes (GAN.19)
    lu = _lse(unl[:, :C]) - unl[:, C]
    lf = _lse(fake[:, :C]) - fake[:, C]
    np.testing.assert_allclose(
        _g(R.ssgan_critic_loss(lab, y, unl, fake)) - ce, _g(R.gan_d_loss(lu, lf)), **TIGHT
    )
    np.testing.assert_allclose(_g(R.ssgan_g_loss(fake)), _g(R.gan_g_loss(lf, mode="minimax")), **TIGHT)


# ============================================================================= GAN.16


def test_l1_family_per_sample_mean():
    """(GAN.16) L1 terms and pix2pix's adversarial term take the per-sample MEAN (as the pix2pix code)."""
    rng = np.random.default_rng(12)
    x, t = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
    t[0, 0, :2] = x[0, 0, :2]  # exact ties: subgradient 0
    np.testing.assert_allclose(_g(R.l1_loss(x, t)), np.mean(np.abs(x - t)), **TIGHT)  # = nn.L1Loss()
    np.testing.assert_allclose(
        R.l1_loss(x, t, reduction="none"), np.abs(x - t).reshape(4, -1).mean(1), **TIGHT
    )
    np.testing.assert_allclose(
        _g(R.l1_loss(x, t, reduction="sum")), np.abs(x - t).reshape(4, -1).mean(1).sum(), **TIGHT
    )
    gx, gt = R.l1_loss_backward(x, t, grad_output=np.float64(1.0))
    np.testing.assert_array_equal(gx, np.sign(x - t) / x.size)
    np.testing.assert_array_equal(gt, -np.sign(x - t) / x.size)
    assert np.all(gx[0, 0, :2] == 0.0)
    # pix2pix: NS adversarial averaged over the (PatchGAN) logits per sample + lambda * mean |G - y|.
    logits = rng.normal(size=(4, 1, 2, 2)) * 3
    lam = 100.0
    per = _softplus(-logits).reshape(4, -1).mean(1) + lam * np.abs(x - t).reshape(4, -1).mean(1)
    np.testing.assert_allclose(R.pix2pix_g_loss(logits, x, t, lambda_l1=lam, reduction="none"), per, **TIGHT)
    np.testing.assert_allclose(_g(R.pix2pix_g_loss(logits, x, t, lambda_l1=lam)), per.mean(), **TIGHT)
    # Cycle consistency: lambda (mean|rec_a - a| + mean|rec_b - b|), batches of A and B may differ.
    a, ra = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    b, rb = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    np.testing.assert_allclose(
        _g(R.cycle_consistency_loss(a, ra, b, rb, lambda_cyc=10.0)),
        10.0 * (np.mean(np.abs(ra - a)) + np.mean(np.abs(rb - b))),
        **TIGHT,
    )


# ----------------------------------------------------------------------------- every layer vs upstream
# The tests below compare the reference, the native engine (float64 and float32) and the torch op
# with a formula composed from torch's own functions (the code practitioners compare with).


def _native():
    return pytest.importorskip("genloss.native")


def _torch_layers():
    torch = pytest.importorskip("torch")
    return torch, pytest.importorskip("genloss.torch")


def _close(got, want, dtype, scale=1.0):
    """float64: 1e-12 relative; float32: 2e-5 of the term's scale (sums of <= 1e4 O(1) terms)."""
    got = np.asarray(got, dtype=np.float64)
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale)


def _torch_value_grads(torch, fn, arrays, diff):
    ts = [torch.tensor(a, requires_grad=(i in diff) and a.dtype.kind == "f") for i, a in enumerate(arrays)]
    v = fn(*ts)
    v.sum().backward()
    return v.detach().numpy(), [ts[i].grad.numpy() for i in diff]


def _pix2pix_upstream(torch, logits, gen, tgt, lam, reduction):
    """pix2pix's generator loss (networks.GANLoss('vanilla') + lambda * L1): BCE-with-logits of the
    PatchGAN map against ones, averaged, plus lambda * nn.L1Loss; per sample for 'none'."""
    F = torch.nn.functional
    if reduction == "mean":
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)) + lam * F.l1_loss(gen, tgt)
    b = logits.shape[0]
    per = torch.stack(
        [
            F.binary_cross_entropy_with_logits(logits[i], torch.ones_like(logits[i]))
            + lam * F.l1_loss(gen[i], tgt[i])
            for i in range(b)
        ]
    )
    return per if reduction == "none" else per.sum()


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_pix2pix_matches_upstream_formula(reduction):
    """(GAN.16) pix2pix_g_loss = BCE-with-logits (mean over a 30x30 PatchGAN) + lambda * L1 (mean), every layer."""
    torch, gl = _torch_layers()
    N = _native()
    rng = np.random.default_rng(16)
    logits = rng.normal(size=(3, 1, 30, 30)) * 3
    logits.flat[rng.choice(logits.size, 40, replace=False)] = rng.choice([-30.0, 30.0], size=40)
    gen, tgt = rng.uniform(-1, 1, size=(3, 3, 8, 8)), rng.uniform(-1, 1, size=(3, 3, 8, 8))
    lam = 100.0
    want, want_g = _torch_value_grads(
        torch,
        lambda a, b, c: _pix2pix_upstream(torch, a, b, c, lam, reduction),
        (logits, gen, tgt),
        (0, 1, 2),
    )
    scale = float(np.max(np.abs(want)))
    # the adversarial term is O(1), not 900x that of a per-sample sum
    assert float(np.max(R.pix2pix_g_loss(logits, gen, tgt, 0.0, reduction="none"))) < 10.0
    v = R.pix2pix_g_loss(logits, gen, tgt, lam, reduction=reduction)
    _close(v, want, np.float64, scale)
    g = R.pix2pix_g_loss_backward(logits, gen, tgt, np.ones_like(want), lam, reduction=reduction)
    for a, b in zip(g, want_g, strict=True):
        _close(a, b, np.float64)
    for dt in (np.float64, np.float32):
        v, g = N.pix2pix_g_loss(logits.astype(dt), gen.astype(dt), tgt.astype(dt), lam, reduction)
        _close(v, want, dt, scale)
        for a, b in zip(g, want_g, strict=True):
            _close(a, b, dt, float(np.max(np.abs(b))))
    got, got_g = _torch_value_grads(
        torch, lambda a, b, c: gl.pix2pix_g_loss(a, b, c, lam, reduction), (logits, gen, tgt), (0, 1, 2)
    )
    _close(got, want, np.float64, scale)
    for a, b in zip(got_g, want_g, strict=True):
        _close(a, b, np.float64)


def _ssgan_paper(torch, lab, y, unl, fake):
    r"""Salimans et al. (2016), Sec. 5, the (C+1)-class form composed from torch's functions:
    L_sup = cross-entropy over the C real logits (-log p(y | x, y < C+1)),
    L_unsup = -mean log(1 - p_fake(x_u)) - mean log p_fake(G(z)), 1 - p_fake = sum_{k<C} softmax."""
    F = torch.nn.functional
    C = lab.shape[1] - 1
    sup = F.cross_entropy(lab[:, :C], y)
    unl_term = -(torch.logsumexp(unl[:, :C], 1) - torch.logsumexp(unl, 1)).mean()
    fake_term = -F.log_softmax(fake, 1)[:, C].mean()
    return sup + unl_term + fake_term


def _ssgan_binary_form(torch, lab, y, unl, fake):
    r"""The paper's other form: fix l_C = 0 (subtract it from the row), D(x) = Z/(Z+1) with
    Z = sum_{k<C} e^{l'_k}, i.e. the logit of D is lse(l'_{<C}); L_unsup is the standard
    binary GAN loss BCE(D(x_u), 1) + BCE(D(G(z)), 0)."""
    F = torch.nn.functional
    C = lab.shape[1] - 1
    du = torch.logsumexp(unl[:, :C] - unl[:, C:], 1)
    df = torch.logsumexp(fake[:, :C] - fake[:, C:], 1)
    return (
        F.cross_entropy(lab[:, :C] - lab[:, C:], y)
        + F.binary_cross_entropy_with_logits(du, torch.ones_like(du))
        + F.binary_cross_entropy_with_logits(df, torch.zeros_like(df))
    )


def _ssgan_cases(rng, C):
    lab, y, unl, fake = _ssgan_batches(rng, C, scale=3.0)
    big = [a.copy() for a in (lab, unl, fake)]
    for a in big:  # +-1e4 logits in every row (each set keeps its own maximum)
        a.flat[rng.choice(a.size, a.size // 2, replace=False)] = rng.choice([-1e4, 1e4], size=a.size // 2)
    return [(lab, y, unl, fake), (big[0], y, big[1], big[2])]


@pytest.mark.parametrize("C", [1, 4])
def test_ssgan_matches_paper_formula(C):
    """(GAN.19) ssgan_critic_loss = L_sup (CE over the C real classes) + L_unsup, every layer, to 1e4."""
    torch, gl = _torch_layers()
    N = _native()
    rng = np.random.default_rng(19 + C)
    for lab, y, unl, fake in _ssgan_cases(rng, C):
        want, want_g = _torch_value_grads(
            torch, lambda a, b, c, d: _ssgan_paper(torch, a, b, c, d), (lab, y, unl, fake), (0, 2, 3)
        )
        scale = max(1.0, abs(float(want)))
        _close(R.ssgan_critic_loss(lab, y, unl, fake), want, np.float64, scale)
        for a, b in zip(R.ssgan_critic_loss_backward(lab, y, unl, fake, 1.0), want_g, strict=True):
            _close(a, b, np.float64)
        for dt in (np.float64, np.float32):
            v, g = N.ssgan_critic_loss(lab.astype(dt), y, unl.astype(dt), fake.astype(dt))
            _close(v, want, dt, scale)
            for a, b in zip(g, want_g, strict=True):
                _close(a, b, dt)
        got, got_g = _torch_value_grads(torch, gl.ssgan_critic_loss, (lab, y, unl, fake), (0, 2, 3))
        _close(got, want, np.float64, scale)
        for a, b in zip(got_g, want_g, strict=True):
            _close(a, b, np.float64)


def test_ssgan_two_forms_agree():
    """(GAN.19) The (C+1)-class form and the paper's l_C = 0 binary-D form are one function; the
    (C+1)-class cross-entropy on the labeled batch is L_sup plus the real-vs-fake term again."""
    torch, _ = _torch_layers()
    rng = np.random.default_rng(190)
    C = 5
    lab, y, unl, fake = _ssgan_batches(rng, C, scale=4.0)
    t = [torch.tensor(a) for a in (lab, y, unl, fake)]
    paper = float(_ssgan_paper(torch, *t))
    binary = float(_ssgan_binary_form(torch, *t))
    np.testing.assert_allclose(binary, paper, rtol=1e-13)
    np.testing.assert_allclose(_g(R.ssgan_critic_loss(lab, y, unl, fake)), binary, rtol=1e-13)
    # CE over all C+1 classes = L_sup + (-log(1 - p_C)) per labeled sample: the real-vs-fake term twice.
    ce_all = _lse(lab) - lab[np.arange(6), y]
    sup = _lse(lab[:, :C]) - lab[np.arange(6), y]
    minus_log_real = _lse(lab) - _lse(lab[:, :C])
    np.testing.assert_allclose(ce_all, sup + minus_log_real, rtol=1e-13)
    assert np.all(minus_log_real > 0)  # so the old C+1 cross-entropy was strictly larger
    unsup = _g(R.ssgan_critic_loss(lab, y, unl, fake)) - np.mean(sup)
    np.testing.assert_allclose(unsup, _g(R.gan_d_loss(_lse(unl[:, :C]) - unl[:, C], _lse(fake[:, :C]) - fake[:, C])),
                               rtol=1e-13)  # fmt: skip


def test_ssgan_infinite_logits():
    """(GAN.19) +inf logits where the math is finite: a +inf real-class logit of an unlabeled row and a
    +inf fake logit of a generated row each contribute 0 (value) and 0 (gradient), in every layer."""
    torch, gl = _torch_layers()
    N = _native()
    rng = np.random.default_rng(191)
    C = 3
    lab, y, unl, fake = _ssgan_batches(rng, C)
    unl_inf, fake_inf = unl.copy(), fake.copy()
    unl_inf[0, 1] = np.inf  # certainly real: -log(1 - p_fake) = 0
    fake_inf[1, C] = np.inf  # certainly fake: -log p_fake = 0
    # expected: the other rows alone ('sum': the infinite rows add exactly 0)
    rest = np.delete(unl, 0, axis=0), np.delete(fake, 1, axis=0)
    want = _g(R.ssgan_critic_loss(lab, y, *rest, reduction="sum"))
    want_gl, want_gu, want_gf = R.ssgan_critic_loss_backward(lab, y, *rest, 1.0, reduction="sum")
    results = [(R.ssgan_critic_loss(lab, y, unl_inf, fake_inf, "sum"),
                R.ssgan_critic_loss_backward(lab, y, unl_inf, fake_inf, 1.0, "sum"), np.float64)]  # fmt: skip
    for dt in (np.float64, np.float32):
        results.append(
            (*N.ssgan_critic_loss(lab.astype(dt), y, unl_inf.astype(dt), fake_inf.astype(dt), "sum"), dt)
        )
    v, g = _torch_value_grads(torch, lambda a, b, c, d: gl.ssgan_critic_loss(a, b, c, d, "sum"),
                              (lab, y, unl_inf, fake_inf), (0, 2, 3))  # fmt: skip
    results.append((v, g, np.float64))
    for v, (g_l, g_u, g_f), dt in results:
        _close(v, want, dt, abs(want))
        _close(g_l, want_gl, dt)
        _close(np.delete(g_u, 0, axis=0), want_gu, dt)
        _close(np.delete(g_f, 1, axis=0), want_gf, dt)
        np.testing.assert_array_equal(np.asarray(g_u[0], dtype=np.float64), 0.0)
        np.testing.assert_array_equal(np.asarray(g_f[1], dtype=np.float64), 0.0)
    # and ssgan_g_loss: log p_fake = 0 for that row
    np.testing.assert_allclose(R.ssgan_g_loss(fake_inf, reduction="none")[1], 0.0, atol=0)
    v, (g,) = N.ssgan_g_loss(fake_inf, reduction="none")
    assert v[1] == 0.0 and np.all(g[1] == 0.0)


# ============================================================================= GAN.17


def test_spectral_norm_converges_to_svd():
    """(GAN.17) Power iteration -> sigma_1 of np.linalg.svd; backward u v^T -> u_1 v_1^T."""
    rng = np.random.default_rng(13)
    W = rng.normal(size=(6, 4))
    u0 = rng.normal(size=6)
    U, s, Vt = np.linalg.svd(W)
    # One iteration, torch.nn.utils.spectral_norm's order: v = W^T u/|.|, u = W v/|.|, sigma = u^T W v.
    v1 = W.T @ u0 / np.linalg.norm(W.T @ u0)
    u1 = W @ v1 / np.linalg.norm(W @ v1)
    sig, uu, vv = R.spectral_norm_sigma(W, u0, n_iters=1)
    np.testing.assert_allclose(_g(sig), u1 @ W @ v1, **TIGHT)
    np.testing.assert_allclose(uu, u1, **TIGHT)
    np.testing.assert_allclose(vv, v1, **TIGHT)
    (gW,) = R.spectral_norm_sigma_backward(W, u0, np.float64(1.0), n_iters=1)
    np.testing.assert_allclose(gW, np.outer(u1, v1), **TIGHT)  # u, v held fixed
    assert _g(sig) <= s[0] + 1e-12  # u^T W v <= |W|_2 for unit u, v
    # Converged: error ~ (s2/s1)^(2k); 300 iterations are far past float64 resolution here.
    assert s[1] / s[0] < 0.95
    sig, uu, vv = R.spectral_norm_sigma(W, u0, n_iters=300)
    np.testing.assert_allclose(_g(sig), s[0], rtol=1e-12)
    (gW,) = R.spectral_norm_sigma_backward(W, u0, np.float64(1.0), n_iters=300)
    np.testing.assert_allclose(gW, np.outer(U[:, 0], Vt[0]), rtol=0, atol=1e-10)  # sign-invariant product
    # The SVD gradient is the true derivative of sigma_1: check it by a central difference of svd.
    E = rng.normal(size=W.shape)
    h = 1e-6
    fd = (np.linalg.svd(W + h * E, compute_uv=False)[0] - np.linalg.svd(W - h * E, compute_uv=False)[0]) / (
        2 * h
    )
    np.testing.assert_allclose(np.sum(gW * E), fd, rtol=1e-7)


# ============================================================================= GAN.18

# f, f* and the inverse of the activation g_f, written from the definitions (Nowozin et al. 2016).
_F = {
    "kl": (lambda u: u * np.log(u), lambda t: np.exp(t - 1)),
    "reverse_kl": (lambda u: -np.log(u), lambda t: -1 - np.log(-t)),
    "pearson": (lambda u: (u - 1) ** 2, lambda t: t * t / 4 + t),
    "squared_hellinger": (lambda u: (np.sqrt(u) - 1) ** 2, lambda t: t / (1 - t)),
    "jensen_shannon": (
        lambda u: u * np.log(u) - (u + 1) * np.log((u + 1) / 2),
        lambda t: -np.log(2 - np.exp(t)),
    ),
    "gan": (lambda u: u * np.log(u) - (u + 1) * np.log(u + 1), lambda t: -np.log(1 - np.exp(t))),
    "total_variation": (lambda u: 0.5 * np.abs(u - 1), lambda t: t),
}
# f'(u) = T*, and v* with g_f(v*) = T*, as functions of the ratio u = p/q.
_TSTAR = {
    "kl": (lambda u: 1 + np.log(u), lambda u: 1 + np.log(u)),
    "reverse_kl": (lambda u: -1 / u, lambda u: np.log(u)),
    "pearson": (lambda u: 2 * (u - 1), lambda u: 2 * (u - 1)),
    "squared_hellinger": (lambda u: 1 - 1 / np.sqrt(u), lambda u: 0.5 * np.log(u)),
    "jensen_shannon": (lambda u: np.log(2 * u / (1 + u)), lambda u: np.log(u)),
    "gan": (lambda u: np.log(u / (1 + u)), lambda u: np.log(u)),
    "total_variation": (lambda u: 0.5 * np.sign(u - 1), lambda u: 40.0 * np.sign(u - 1)),  # tanh(40) == 1.0
}
# The activations g_f, independent of the reference (plain, moderate inputs).
_ACT = {
    "kl": lambda v: v,
    "reverse_kl": lambda v: -np.exp(-v),
    "pearson": lambda v: v,
    "squared_hellinger": lambda v: 1 - np.exp(-v),
    "jensen_shannon": lambda v: LOG2 - np.log1p(np.exp(-v)),
    "gan": lambda v: -np.log1p(np.exp(-v)),
    "total_variation": lambda v: 0.5 * np.tanh(v),
}
DIVERGENCES = list(_F)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_fgan_conjugates_by_brute_force(div):
    """(GAN.18) f*(t) = sup_u (u t - f(u)) on a u-grid, and the reference's f*(g_f(v)), -g_f(v) match."""
    f, fstar = _F[div]
    u = np.linspace(1e-9, 60.0, 600001)
    ts = {
        "reverse_kl": [-3.0, -1.0, -0.2],  # dom f* = (-inf, 0)
        "squared_hellinger": [-1.0, 0.2, 0.6],  # (-inf, 1)
        "gan": [-2.0, -0.7, -0.1],  # (-inf, 0)
    }.get(div, [-0.4, 0.0, 0.3])
    if div == "pearson":
        ts = [-1.5, 0.0, 2.0]  # t >= -2 where the sup over u >= 0 is interior
    for t in ts:
        brute = np.max(u * t - f(u))
        np.testing.assert_allclose(brute, fstar(t), rtol=0, atol=2e-6)
    v = np.linspace(-6, 6, 25)
    np.testing.assert_allclose(
        R.fgan_g_loss(v, div, mode="nonsaturating", reduction="none"), -_ACT[div](v), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        R.fgan_g_loss(v, div, mode="minimax", reduction="none"), -fstar(_ACT[div](v)), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_fgan_bound_tight_at_f_prime(div, seed):
    """(GAN.18) E_p T - E_q f*(T) at T* = f'(p/q) equals D_f = sum q f(p/q); any perturbation is lower."""
    rng = np.random.default_rng(700 + seed)
    n, m, p, q = _discrete(rng)
    f, fstar = _F[div]
    tstar_of, vstar_of = _TSTAR[div]
    ratio = p / q
    dfdef = float(np.sum(q * f(ratio)))
    tstar = tstar_of(ratio)
    np.testing.assert_allclose(np.sum(p * tstar - q * fstar(tstar)), dfdef, rtol=1e-12, atol=1e-12)
    vstar = vstar_of(ratio)
    np.testing.assert_allclose(_ACT[div](vstar), tstar, rtol=1e-12, atol=1e-12)  # g_f(v*) = T*

    def bound(v):
        return -_g(R.fgan_d_loss(np.repeat(v, n), np.repeat(v, m), div))

    best = bound(vstar)
    np.testing.assert_allclose(best, dfdef, rtol=1e-12, atol=1e-12)
    moves = (-1.0, -0.05, 0.05, 1.0)
    for k in range(K):
        if p[k] == q[k]:
            continue
        for d in moves:
            v = vstar.copy()
            v[k] = -vstar[k] if div == "total_variation" and abs(d) == 1.0 else v[k] + d
            if div == "total_variation" and abs(d) != 1.0:
                v[k] = np.sign(vstar[k]) * 0.5  # move T inside (-1/2, 1/2): tanh saturates at 40 +- d
            assert bound(v) < best
    for _ in range(10):
        if div == "total_variation":  # pull T = tanh(v)/2 off the boundary +-1/2 (tanh(40 + d) == 1)
            assert bound(vstar * rng.uniform(0.0, 0.05, size=K)) < best
        else:
            assert bound(vstar + rng.normal(scale=0.3, size=K)) < best


def test_fgan_named_divergences():
    """(GAN.18) 'gan' is the standard GAN (2 JSD - log 4); 'jensen_shannon' gives 2 JSD, not JSD."""
    rng = np.random.default_rng(14)
    r, f = rng.normal(size=(6, 2)) * 3, rng.normal(size=(5, 2)) * 3
    np.testing.assert_allclose(_g(R.fgan_d_loss(r, f, "gan")), _g(R.gan_d_loss(r, f)), **TIGHT)
    for mode in ("nonsaturating", "minimax"):
        np.testing.assert_allclose(
            R.fgan_g_loss(f, "gan", mode=mode, reduction="none"),
            R.gan_g_loss(f, mode=mode, reduction="none"),
            **TIGHT,
        )
    n, m, p, q = _discrete(rng)
    lstar = np.log(p / q)
    js = -_g(R.fgan_d_loss(np.repeat(lstar, n), np.repeat(lstar, m), "jensen_shannon"))
    np.testing.assert_allclose(js, 2 * _jsd(p, q), **TIGHT)
    gn = -_g(R.fgan_d_loss(np.repeat(lstar, n), np.repeat(lstar, m), "gan"))
    np.testing.assert_allclose(gn, 2 * _jsd(p, q) - LOG4, **TIGHT)
    # Log-domain divergences stay finite at |v| = 1e4.
    ext = np.array([-1e4, 1e4])
    for div in ("jensen_shannon", "gan", "total_variation", "pearson"):
        assert np.isfinite(R.fgan_d_loss(ext, ext, div))
        assert all(
            np.all(np.isfinite(g))
            for g in R.fgan_d_loss_backward(ext, ext, grad_output=np.float64(1.0), divergence=div)
        )
