r"""VAE family and Gaussian mixtures, NumPy reference (float64): values with hand-derived gradients.

Read next to ``derivations/vae.md``; the tags ``(VAE.n)`` in the comments name its
equations.  Conventions (as in ``gan.py``):

* Gaussians are parameterised by a mean and a LOG-variance ``logvar``
  (:math:`\sigma^2 = e^{\text{logvar}}`), Bernoulli likelihoods by logits.  Every log
  of a probability is a softplus or a log-sum-exp; variances enter only through
  ``exp(+-logvar)`` and ``expm1``.  Values and gradients are finite for
  :math:`\lvert\text{logvar}\rvert \le 30` and logits of magnitude :math:`10^4`.
* Batch is dim 0.  The per-sample value is the SUM over the non-batch dims (a
  log-likelihood of independent coordinates is a sum), then ``reduction`` =
  ``'mean'`` | ``'sum'`` | ``'none'`` over the batch.  ``normal_kl`` is elementwise
  (no reduction); ``gmm_*`` treat the N data points as the batch.
* Losses are positive quantities to minimise (KL, negative log-likelihoods, the
  negative ELBO).  Two ops return log-likelihoods / bounds to MAXIMISE, as their
  names say: ``iwae_bound`` and ``gmm_log_likelihood``.
* ``name(...)`` returns float64 ndarrays; ``name_backward(*inputs, grad_output, **kw)``
  returns a tuple with the gradient of ``sum(grad_output * name(...))`` w.r.t. each
  differentiable array input, in order, each of that input's shape.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _checks
from ._common import (
    as_float64,
    batch_array,
    grad_sum,
    logsumexp,
    reduce_sum,
    result,
    sigmoid,
    sum_to_shape,
)

__all__ = [
    "bernoulli_nll",
    "bernoulli_nll_backward",
    "gaussian_kl",
    "gaussian_kl_backward",
    "gaussian_nll",
    "gaussian_nll_backward",
    "gmm_em_step",
    "gmm_log_likelihood",
    "gmm_log_likelihood_backward",
    "gmm_responsibilities",
    "iwae_bound",
    "iwae_bound_backward",
    "negative_elbo",
    "negative_elbo_backward",
    "normal_kl",
    "normal_kl_backward",
]

_ALL = _checks.REDUCTIONS  # 'mean', 'sum', 'none'
_LIKELIHOODS = ("bernoulli", "gaussian")
_LOG_2PI = math.log(2.0 * math.pi)


# ============================================================================= helpers


def _normalized_exp(a, axis):
    r"""softmax along ``axis`` as :math:`e^{a - m} / \sum e^{a - m}`, :math:`m = \max a`.

    Shifting by the max and dividing (rather than :math:`e^{a - \operatorname{lse}(a)}`)
    keeps full relative accuracy at large magnitudes: at :math:`a \approx -10^4` the
    difference :math:`a - \operatorname{lse}` carries an absolute error of one ulp of
    :math:`10^4` (2e-12), while :math:`a - m` is exact for nearby entries.  A slice
    that is all ``-inf`` (no mass at all) gets 0.  The shift of an entry equal to the max is
    exactly 0, so a ``+inf`` entry takes the mass (not :math:`\infty - \infty`); a NaN gives NaN.
    """
    m = np.max(a, axis=axis, keepdims=True)
    empty = np.isneginf(m)
    with np.errstate(invalid="ignore"):
        z = np.where(a == m, 0.0, a - np.where(empty, 0.0, m))
    e = np.where(empty, 0.0, np.exp(z))
    total = e.sum(axis=axis, keepdims=True)
    return e / np.where(empty, 1.0, total)


# ============================================================================= argument checks


def _pair(name_a, a, name_b, b, reduction):
    """Two batched arrays of one shape (batch first, not empty)."""
    a = batch_array(name_a, a, reduction)
    b = batch_array(name_b, b, reduction)
    _checks.same_shape(name_a, a.shape, name_b, b.shape)
    return a, b


def _unit_interval(name, x):
    """Bernoulli targets: every entry in [0, 1] (NaN refused too)."""
    if not np.all((x >= 0.0) & (x <= 1.0)):
        raise ValueError(
            f"{name} must lie in [0, 1] (Bernoulli targets), got values in [{x.min()}, {x.max()}]"
        )


def _broadcastable_to(name, a, target_name, shape):
    """``a`` must broadcast to ``shape`` WITHOUT enlarging it (a per-element, per-feature or scalar parameter)."""
    try:
        ok = np.broadcast_shapes(a.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must broadcast to the shape of {target_name} {tuple(shape)}, got shape {a.shape}"
        )


# ============================================================================= KL divergences


def _gaussian_kl_inputs(mu, logvar, reduction):
    reduction = _checks.reduction(reduction, _ALL)
    mu, logvar = _pair("mu", mu, "logvar", logvar, reduction)
    return mu, logvar, reduction


def gaussian_kl(mu, logvar, reduction="mean"):
    r"""KL divergence of a diagonal Gaussian from the standard normal prior, per sample.

    .. math::
        \mathrm{KL}\big(\mathcal N(\mu, \operatorname{diag} e^{v}) \,\Vert\, \mathcal N(0, I)\big)
            = \tfrac12 \sum_j \big(\mu_j^2 + e^{v_j} - 1 - v_j\big)
            = \tfrac12 \sum_j \big(\mu_j^2 + \operatorname{expm1}(v_j) - v_j\big)

    with :math:`v` = ``logvar``; the second form is the one evaluated (VAE.4).

    Parameters
    ----------
    mu : ndarray, shape [B, ...]
        Posterior means (encoder output).
    logvar : ndarray, shape of ``mu``
        Posterior log-variances.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
        The rate in nats (>= 0).

    Notes
    -----
    ``expm1(v) - v`` keeps the relative accuracy of the :math:`v^2/2` that remains
    near :math:`v = 0`, where ``exp(v) - 1 - v`` loses it.  Finite for
    :math:`\lvert v\rvert \le 700` (:math:`e^{30} \approx 10^{13}`).
    """
    mu, logvar, reduction = _gaussian_kl_inputs(mu, logvar, reduction)
    return reduce_sum(0.5 * (mu**2 + np.expm1(logvar) - logvar), reduction)  # (VAE.4)


def gaussian_kl_backward(mu, logvar, grad_output, reduction="mean"):
    r"""Gradient of :func:`gaussian_kl`.

    .. math::
        \frac{\partial\,\mathrm{KL}}{\partial \mu_j} = w\,\mu_j, \qquad
        \frac{\partial\,\mathrm{KL}}{\partial v_j} = \tfrac{w}{2}\,\operatorname{expm1}(v_j)

    (:math:`w` = ``grad_output``, per sample for ``'none'``, divided by B for ``'mean'``).

    Parameters
    ----------
    mu, logvar : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_mu, grad_logvar) : tuple of ndarray

    Notes
    -----
    ``expm1`` gives the small gradient near :math:`v = 0` to full relative accuracy.
    """
    mu, logvar, reduction = _gaussian_kl_inputs(mu, logvar, reduction)
    w = grad_sum(grad_output, reduction, mu.shape)
    return w * mu, w * 0.5 * np.expm1(logvar)  # (VAE.4)


def _normal_kl_inputs(mean1, logvar1, mean2, logvar2):
    names = ("mean1", "logvar1", "mean2", "logvar2")
    arrays = [as_float64(n, a) for n, a in zip(names, (mean1, logvar1, mean2, logvar2), strict=True)]
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        shapes = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays, strict=True))
        raise ValueError(f"mean1, logvar1, mean2, logvar2 must broadcast together, got {shapes}") from None
    return (*arrays, shape)


def _normal_kl_parts(m1, v1, m2, v2):
    """delta = v1 - v2, m1 - m2 and e^{-v2}, broadcast."""
    diff = m1 - m2
    inv_var2 = np.exp(-v2)
    return v1 - v2, diff, inv_var2


def normal_kl(mean1, logvar1, mean2, logvar2):
    r"""Elementwise KL divergence between two (scalar) Gaussians, no reduction.

    .. math::
        \mathrm{KL}\big(\mathcal N(m_1, e^{v_1}) \,\Vert\, \mathcal N(m_2, e^{v_2})\big)
            = \tfrac12\big(v_2 - v_1 + e^{v_1 - v_2} + (m_1 - m_2)^2 e^{-v_2} - 1\big)
            = \tfrac12\big(\operatorname{expm1}(\delta) - \delta + (m_1 - m_2)^2 e^{-v_2}\big),
            \quad \delta = v_1 - v_2

    Parameters
    ----------
    mean1, logvar1, mean2, logvar2 : ndarray
        Any shapes that broadcast together (NumPy rules), 0-d included.

    Returns
    -------
    ndarray, the broadcast shape
        One KL per element, in nats (>= 0; 0 exactly where the two Gaussians agree).

    Notes
    -----
    The second form (VAE.5) is evaluated: ``expm1`` keeps accuracy when the variances
    are close.  Finite for :math:`\lvert v_1 - v_2\rvert \le 700` and
    :math:`v_2 \ge -700`; with :math:`\lvert v\rvert \le 30`, terms are at most ~1e26.
    """
    m1, v1, m2, v2, _ = _normal_kl_inputs(mean1, logvar1, mean2, logvar2)
    delta, diff, inv_var2 = _normal_kl_parts(m1, v1, m2, v2)
    return result(0.5 * (np.expm1(delta) - delta + diff**2 * inv_var2))  # (VAE.5)


def normal_kl_backward(mean1, logvar1, mean2, logvar2, grad_output):
    r"""Gradient of :func:`normal_kl` w.r.t. all four inputs.

    .. math::
        \frac{\partial}{\partial m_1} = g\,(m_1 - m_2)e^{-v_2} = -\frac{\partial}{\partial m_2}, \qquad
        \frac{\partial}{\partial v_1} = \tfrac{g}{2}\operatorname{expm1}(\delta), \qquad
        \frac{\partial}{\partial v_2} = -\tfrac{g}{2}\big(\operatorname{expm1}(\delta) + (m_1 - m_2)^2 e^{-v_2}\big)

    each then summed over the axes along which that input was broadcast.

    Parameters
    ----------
    mean1, logvar1, mean2, logvar2 : ndarray
        As in :func:`normal_kl`.
    grad_output : ndarray, the broadcast shape
        Upstream gradient of the elementwise output.

    Returns
    -------
    (grad_mean1, grad_logvar1, grad_mean2, grad_logvar2) : tuple of ndarray
        Each of the shape of its input.

    Notes
    -----
    Same domain as the forward.
    """
    m1, v1, m2, v2, shape = _normal_kl_inputs(mean1, logvar1, mean2, logvar2)
    g = as_float64("grad_output", grad_output)
    if g.shape != shape:
        raise ValueError(f"grad_output must have the broadcast shape {shape} of the inputs, got {g.shape}")
    delta, diff, inv_var2 = _normal_kl_parts(m1, v1, m2, v2)
    # (VAE.5)
    grad_m1 = g * diff * inv_var2
    grad_v1 = g * 0.5 * np.expm1(delta)
    grad_v2 = -g * 0.5 * (np.expm1(delta) + diff**2 * inv_var2)
    return (
        sum_to_shape(grad_m1, m1.shape),
        sum_to_shape(grad_v1, v1.shape),
        sum_to_shape(-grad_m1, m2.shape),
        sum_to_shape(grad_v2, v2.shape),
    )


# ============================================================================= likelihoods


def _bernoulli_inputs(logits, x, reduction):
    reduction = _checks.reduction(reduction, _ALL)
    logits, x = _pair("logits", logits, "x", x, reduction)
    _unit_interval("x", x)
    return logits, x, reduction


def _bernoulli_elementwise(logits, x):
    # (VAE.6) softplus(l) - x l = max(l, 0) - x l + log1p(e^{-|l|}): for x in {0, 1} the
    # first two terms cancel EXACTLY where the answer is small, so no rounding is left.
    return np.maximum(logits, 0.0) - x * logits + np.log1p(np.exp(-np.abs(logits)))


def _bernoulli_grad_logits(logits, x):
    # (VAE.6) sigmoid(l) - x written as (1 - x) sigmoid(l) - x sigmoid(-l): no cancellation for x in {0, 1}
    return (1.0 - x) * sigmoid(logits) - x * sigmoid(-logits)


def bernoulli_nll(logits, x, reduction="mean"):
    r"""Negative log-likelihood of data under independent Bernoulli(sigmoid(l)) coordinates.

    .. math::
        -\log p(x \mid l) = \sum_i \big(\operatorname{softplus}(l_i) - x_i l_i\big)
            = -\sum_i \big(x_i \log\sigma(l_i) + (1 - x_i)\log(1 - \sigma(l_i))\big)

    Parameters
    ----------
    logits : ndarray, shape [B, ...]
        Decoder logits.
    x : ndarray, shape of ``logits``
        Targets in [0, 1] (binary data, or grey levels read as probabilities: the
        "continuous Bernoulli" use without its normaliser).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    Evaluated as :math:`\max(l,0) - x l + \operatorname{log1p}(e^{-\lvert l\rvert})`
    (BCE-with-logits), never through :math:`\log\sigma(l)`: finite for any finite
    logit, exact 0 for a confident correct binary prediction at :math:`\lvert l\rvert = 10^4`.
    """
    logits, x, reduction = _bernoulli_inputs(logits, x, reduction)
    return reduce_sum(_bernoulli_elementwise(logits, x), reduction)


def bernoulli_nll_backward(logits, x, grad_output, reduction="mean"):
    r"""Gradient of :func:`bernoulli_nll` w.r.t. the logits and the targets.

    .. math::
        \frac{\partial}{\partial l_i} = w\,(\sigma(l_i) - x_i), \qquad
        \frac{\partial}{\partial x_i} = -w\,l_i

    Parameters
    ----------
    logits, x : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_logits, grad_x) : tuple of ndarray

    Notes
    -----
    :math:`\sigma(l) - x = (1-x)\sigma(l) - x\,\sigma(-l)` with sign-split sigmoids:
    bounded by 1 and accurate for binary targets at any logit.
    """
    logits, x, reduction = _bernoulli_inputs(logits, x, reduction)
    w = grad_sum(grad_output, reduction, logits.shape)
    return w * _bernoulli_grad_logits(logits, x), -w * logits  # (VAE.6)


def _gaussian_nll_inputs(mean, x, logvar, reduction):
    reduction = _checks.reduction(reduction, _ALL)
    mean, x = _pair("mean", mean, "x", x, reduction)
    logvar = as_float64("logvar", logvar)
    _broadcastable_to("logvar", logvar, "mean", mean.shape)
    return mean, x, logvar, reduction


def _gaussian_nll_elementwise(mean, x, logvar):
    # (VAE.7) 1/2 (log 2pi + v + (x - m)^2 e^{-v}); v broadcast over mean's shape
    return 0.5 * (_LOG_2PI + logvar + (x - mean) ** 2 * np.exp(-logvar))


def gaussian_nll(mean, x, logvar, reduction="mean"):
    r"""Negative log-likelihood of data under a diagonal Gaussian, per sample.

    .. math::
        -\log \mathcal N(x; m, \operatorname{diag} e^{v})
            = \tfrac12 \sum_i \big(\log 2\pi + v_i + (x_i - m_i)^2 e^{-v_i}\big)

    Parameters
    ----------
    mean : ndarray, shape [B, ...]
        Predicted means (the prediction comes first, as in torch's losses).
    x : ndarray, shape of ``mean``
        Data.
    logvar : ndarray, broadcastable to the shape of ``mean``
        Log-variances: per element (shape of ``mean``), per sample (``[B, 1, ...]``),
        per feature (trailing dims only) or one learned scalar (0-d).  Broadcast
        entries count once per element they cover (a scalar adds :math:`n\,v/2` per
        sample of :math:`n` elements).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    With a fixed :math:`v` this is :math:`\lVert x - m\rVert^2 / (2e^{v})` plus a
    constant: "MSE" is a Gaussian likelihood of fixed variance (VAE.7).  Finite for
    :math:`\lvert v\rvert \le 30` and any moderate residual (:math:`e^{30}\approx 10^{13}`).
    """
    mean, x, logvar, reduction = _gaussian_nll_inputs(mean, x, logvar, reduction)
    return reduce_sum(_gaussian_nll_elementwise(mean, x, logvar), reduction)


def _gaussian_nll_grads(mean, x, logvar, w):
    """(grad_mean, grad_x, grad_logvar) of sum(w * elementwise NLL), w of mean's shape."""
    inv_var = np.exp(-logvar)
    residual = (mean - x) * inv_var
    grad_mean = w * residual  # (VAE.7) d/dm = (m - x) e^{-v}
    grad_logvar = w * 0.5 * (1.0 - (x - mean) ** 2 * inv_var)  # (VAE.7) d/dv = (1 - (x-m)^2 e^{-v})/2
    return grad_mean, -grad_mean, sum_to_shape(grad_logvar, logvar.shape)


def gaussian_nll_backward(mean, x, logvar, grad_output, reduction="mean"):
    r"""Gradient of :func:`gaussian_nll` w.r.t. ``mean``, ``x`` and ``logvar``.

    .. math::
        \frac{\partial}{\partial m_i} = w\,(m_i - x_i)e^{-v_i} = -\frac{\partial}{\partial x_i}, \qquad
        \frac{\partial}{\partial v_i} = \tfrac{w}{2}\big(1 - (x_i - m_i)^2 e^{-v_i}\big)

    and the ``logvar`` gradient is summed over the axes it was broadcast along.

    Parameters
    ----------
    mean, x : ndarray, shape [B, ...]
    logvar : ndarray, broadcastable to the shape of ``mean``
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_mean, grad_x, grad_logvar) : tuple of ndarray
        ``grad_logvar`` has the shape of ``logvar``.

    Notes
    -----
    Same domain as the forward.
    """
    mean, x, logvar, reduction = _gaussian_nll_inputs(mean, x, logvar, reduction)
    return _gaussian_nll_grads(mean, x, logvar, grad_sum(grad_output, reduction, mean.shape))


# ============================================================================= negative ELBO (beta-VAE)


def _elbo_inputs(recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction):
    beta = _checks.nonnegative("beta", beta)
    likelihood = _checks.choice("likelihood", likelihood, _LIKELIHOODS)
    reduction = _checks.reduction(reduction, _ALL)
    recon, x = _pair("recon", recon, "x", x, reduction)
    mu, logvar = _pair("mu", mu, "logvar", logvar, reduction)
    _checks.same_batch("recon", recon.shape, "mu", mu.shape)
    if likelihood == "bernoulli":
        if recon_logvar is not None:
            raise ValueError("recon_logvar is only used with likelihood='gaussian', got an array")
        _unit_interval("x", x)
    else:
        recon_logvar = np.zeros(()) if recon_logvar is None else as_float64("recon_logvar", recon_logvar)
        _broadcastable_to("recon_logvar", recon_logvar, "recon", recon.shape)
    return recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction


def negative_elbo(
    recon, x, mu, logvar, beta=1.0, likelihood="bernoulli", recon_logvar=None, reduction="mean"
):
    r"""The (beta-)VAE loss: reconstruction NLL plus beta times the Gaussian KL, per sample.

    .. math::
        L_b = -\log p_\theta(x_b \mid z_b) + \beta\,\mathrm{KL}\big(q_\phi(z \mid x_b) \,\Vert\, \mathcal N(0, I)\big),
        \qquad z_b = \mu_b + e^{v_b/2}\odot\epsilon_b

    a one-sample reparameterised estimate of :math:`-\mathrm{ELBO}` at :math:`\beta = 1`
    (VAE.2, VAE.3, VAE.8).  The sample :math:`z_b` is drawn by the caller; this op
    sees the decoder output ``recon`` at :math:`z_b`.

    Parameters
    ----------
    recon : ndarray, shape [B, ...]
        Decoder output at the sampled latent: logits (``'bernoulli'``) or means
        (``'gaussian'``).
    x : ndarray, shape of ``recon``
        Data (in [0, 1] for ``'bernoulli'``).  Not differentiated.
    mu, logvar : ndarray, shape [B, ...] (same batch as ``recon``)
        Encoder posterior parameters.
    beta : float
        Weight of the KL (rate) term, >= 0.
    likelihood : {'bernoulli', 'gaussian'}
    recon_logvar : ndarray or None
        ``'gaussian'`` only: decoder log-variance broadcastable to ``recon`` (None = 0,
        unit variance).  Passing it with ``'bernoulli'`` is an error.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    The sum of :func:`bernoulli_nll` or :func:`gaussian_nll` and ``beta *``
    :func:`gaussian_kl`, with their stable forms.
    """
    recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction = _elbo_inputs(
        recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction
    )
    if likelihood == "bernoulli":
        nll = _bernoulli_elementwise(recon, x)  # (VAE.6)
    else:
        nll = _gaussian_nll_elementwise(recon, x, recon_logvar)  # (VAE.7)
    kl = 0.5 * (mu**2 + np.expm1(logvar) - logvar)  # (VAE.4)
    return result(reduce_sum(nll, reduction) + beta * reduce_sum(kl, reduction))  # (VAE.8)


def negative_elbo_backward(
    recon, x, mu, logvar, grad_output, beta=1.0, likelihood="bernoulli", recon_logvar=None, reduction="mean"
):
    r"""Gradient of :func:`negative_elbo` w.r.t. ``recon``, ``mu``, ``logvar`` (and ``recon_logvar``).

    .. math::
        \frac{\partial L}{\partial\,\mathrm{recon}} = w\,(\sigma(\mathrm{recon}) - x)
            \ \text{(Bernoulli)}, \quad w\,(\mathrm{recon} - x)e^{-s} \ \text{(Gaussian)}, \qquad
        \frac{\partial L}{\partial \mu} = w\beta\mu, \quad
        \frac{\partial L}{\partial v} = \tfrac{w\beta}{2}\operatorname{expm1}(v)

    and, for ``'gaussian'`` with ``recon_logvar`` :math:`s` given,
    :math:`\partial L/\partial s = \tfrac w2 (1 - (x - \mathrm{recon})^2 e^{-s})`, summed to its shape.

    Parameters
    ----------
    recon, x, mu, logvar : ndarray
        As in :func:`negative_elbo`.
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    beta, likelihood, recon_logvar, reduction
        As in :func:`negative_elbo`.

    Returns
    -------
    (grad_recon, grad_mu, grad_logvar) or (grad_recon, grad_mu, grad_logvar, grad_recon_logvar)
        The fourth entry exactly when ``recon_logvar`` is given.  No gradient for ``x``
        (data).  Gradients w.r.t. the encoder reach ``mu``/``logvar`` also through
        ``recon`` (the reparameterised sample): the caller chains ``grad_recon`` back
        through the decoder and :math:`z = \mu + e^{v/2}\epsilon` (VAE.3).

    Notes
    -----
    Same stable forms as the forward; bounded sigmoids for the Bernoulli case.
    """
    given_logvar = recon_logvar is not None
    recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction = _elbo_inputs(
        recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction
    )
    w_recon = grad_sum(grad_output, reduction, recon.shape)
    w_latent = grad_sum(grad_output, reduction, mu.shape)
    grad_mu = w_latent * beta * mu  # (VAE.4), (VAE.8)
    grad_logvar = w_latent * beta * 0.5 * np.expm1(logvar)
    if likelihood == "bernoulli":
        return w_recon * _bernoulli_grad_logits(recon, x), grad_mu, grad_logvar  # (VAE.6)
    grad_recon, _, grad_recon_logvar = _gaussian_nll_grads(recon, x, recon_logvar, w_recon)  # (VAE.7)
    if given_logvar:
        return grad_recon, grad_mu, grad_logvar, grad_recon_logvar
    return grad_recon, grad_mu, grad_logvar


# ============================================================================= IWAE


def _iwae_inputs(log_weights, reduction):
    reduction = _checks.reduction(reduction, _ALL)
    lw = batch_array("log_weights", log_weights, reduction, min_ndim=2)
    _checks.ndim("log_weights", lw.shape, 2)
    return lw, reduction


def iwae_bound(log_weights, reduction="mean"):
    r"""Importance-weighted lower bound on :math:`\log p(x)`, per sample (to MAXIMISE).

    .. math::
        \mathcal L_K = \log \frac1K \sum_{k=1}^K w_k = \operatorname{lse}_k(\log w_k) - \log K,
        \qquad \log w_k = \log p(x, z_k) - \log q(z_k \mid x), \quad z_k \sim q

    Parameters
    ----------
    log_weights : ndarray, shape [B, K]
        Log importance weights of K samples per data point.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    Shifted log-sum-exp (VAE.10): finite for finite weights of any magnitude
    (:math:`\pm 10^4` included).  ``-inf`` entries are weights of 0; a row of
    ``-inf`` only has the value ``-inf``.  K = 1 gives the one-sample ELBO.
    """
    lw, reduction = _iwae_inputs(log_weights, reduction)
    with np.errstate(divide="ignore"):  # a row of -inf: log 0 = -inf is the exact value
        lse = logsumexp(lw, axis=1)
    return reduce_sum((lse - math.log(lw.shape[1]))[:, None], reduction)  # (VAE.10)


def iwae_bound_backward(log_weights, grad_output, reduction="mean"):
    r"""Gradient of :func:`iwae_bound`: the normalised importance weights.

    .. math::
        \frac{\partial \mathcal L_K}{\partial \log w_k} = w\,\frac{w_k}{\sum_j w_j}
            = w\,\operatorname{softmax}(\log w)_k

    Parameters
    ----------
    log_weights : ndarray, shape [B, K]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_log_weights,) : tuple of ndarray, shape [B, K]

    Notes
    -----
    Entries in [0, w], each row summing to w.  A row of all ``-inf`` (value ``-inf``)
    gets w/K per entry: the limit of the softmax as every entry goes to :math:`-L`,
    :math:`L\to\infty`, together (the weights of a normalised importance sampler sum to 1),
    and the native engine's convention (its shift of an all ``-inf`` row is 0).
    """
    lw, reduction = _iwae_inputs(log_weights, reduction)
    w = grad_sum(grad_output, reduction, lw.shape)
    soft = _normalized_exp(lw, axis=1)  # (VAE.10) softmax of the log-weights
    # _normalized_exp gives a massless row 0; its limit (and the engine's value) is uniform
    soft = np.where(np.all(np.isneginf(lw), axis=1, keepdims=True), 1.0 / lw.shape[1], soft)
    return (w * soft,)


# ============================================================================= Gaussian mixtures


def _gmm_inputs(x, logits, means, logvars, reduction="mean"):
    x = batch_array("x", x, reduction, min_ndim=2)
    _checks.ndim("x", x.shape, 2)
    n_dims = x.shape[1]
    logits = as_float64("logits", logits)
    _checks.ndim("logits", logits.shape, 1)
    k = logits.shape[0]
    if k == 0:
        raise ValueError("logits must have at least one component, got shape (0,)")
    means = as_float64("means", means)
    if means.shape != (k, n_dims):
        raise ValueError(f"means must have shape ({k}, {n_dims}) (components, dims of x), got {means.shape}")
    logvars = as_float64("logvars", logvars)
    if logvars.shape != (k, n_dims):
        raise ValueError(
            f"logvars must have shape ({k}, {n_dims}) (components, dims of x), got {logvars.shape}"
        )
    return x, logits, means, logvars


def _gmm_joint(x, logits, means, logvars):
    r"""log pi_k + log N(x_n; m_k, diag e^{v_k}) for every (n, k), and the pieces the gradients reuse."""
    # (VAE.11) log-softmax of the mixing logits, shifted by the maximum with the shift of the
    # maximum itself exactly 0: a +inf logit is a weight-1 component (not inf - inf = NaN).
    m = np.max(logits)
    with np.errstate(invalid="ignore"):  # inf - inf, discarded by the select
        z = np.where(logits == m, 0.0, logits - m)
    log_pi = z - np.log(np.sum(np.exp(z)))
    diff = x[:, None, :] - means[None, :, :]  # (N, K, D)
    inv_var = np.exp(-logvars)  # (K, D)
    sq = diff**2 * inv_var  # (x - m)^2 e^{-v}
    log_normal = -0.5 * (x.shape[1] * _LOG_2PI + logvars.sum(axis=1) + sq.sum(axis=2))  # (N, K)
    return log_pi[None, :] + log_normal, log_pi, diff, inv_var, sq


def gmm_log_likelihood(x, logits, means, logvars, reduction="mean"):
    r"""Log-likelihood of points under a diagonal Gaussian mixture (to MAXIMISE).

    .. math::
        \log p(x_n) = \operatorname{lse}_k\Big(\log\pi_k - \tfrac12\sum_d\big(\log 2\pi + v_{kd}
            + (x_{nd} - m_{kd})^2 e^{-v_{kd}}\big)\Big), \qquad
        \log\pi = l - \operatorname{lse}(l)

    Parameters
    ----------
    x : ndarray, shape [N, D]
        Data points (the batch).
    logits : ndarray, shape [K]
        Unnormalised log mixing weights (:math:`\pi = \operatorname{softmax}(l)`).
    means : ndarray, shape [K, D]
    logvars : ndarray, shape [K, D]
        Per-component diagonal log-variances.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [N] for ``'none'``

    Notes
    -----
    Both sums over components are shifted log-sum-exps (VAE.11), so a point far from
    every component (all densities underflow) still gets its exact log-likelihood.
    Finite for logits of magnitude :math:`10^4` and :math:`\lvert v\rvert \le 30`.
    """
    reduction = _checks.reduction(reduction, _ALL)
    x, logits, means, logvars = _gmm_inputs(x, logits, means, logvars, reduction)
    joint, *_ = _gmm_joint(x, logits, means, logvars)
    return reduce_sum(logsumexp(joint, axis=1)[:, None], reduction)  # (VAE.11)


def gmm_log_likelihood_backward(x, logits, means, logvars, grad_output, reduction="mean"):
    r"""Gradient of :func:`gmm_log_likelihood` w.r.t. all four inputs: responsibility-weighted.

    .. math::
        \frac{\partial}{\partial x_n} = w_n \sum_k r_{nk}\,(m_k - x_n)e^{-v_k}, \qquad
        \frac{\partial}{\partial l_k} = \sum_n w_n\,(r_{nk} - \pi_k),

    .. math::
        \frac{\partial}{\partial m_k} = \sum_n w_n r_{nk}\,(x_n - m_k)e^{-v_k}, \qquad
        \frac{\partial}{\partial v_k} = \tfrac12 \sum_n w_n r_{nk}\big((x_n - m_k)^2 e^{-v_k} - 1\big)

    with :math:`r_{nk}` the responsibilities (:func:`gmm_responsibilities`).

    Parameters
    ----------
    x, logits, means, logvars : ndarray
        As in :func:`gmm_log_likelihood`.
    grad_output : float or ndarray, shape [] or [N] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_x, grad_logits, grad_means, grad_logvars) : tuple of ndarray

    Notes
    -----
    Responsibilities are :math:`e^{\log r}` with :math:`\log r \le 0`: in [0, 1] for any input.
    """
    reduction = _checks.reduction(reduction, _ALL)
    x, logits, means, logvars = _gmm_inputs(x, logits, means, logvars, reduction)
    joint, log_pi, diff, inv_var, sq = _gmm_joint(x, logits, means, logvars)
    w = grad_sum(grad_output, reduction, (x.shape[0],))  # (N,) weight of each point
    wr = w[:, None] * _normalized_exp(joint, axis=1)  # (VAE.12) w_n r_nk, (N, K)
    pull = wr[:, :, None] * diff * inv_var  # w_n r_nk (x_n - m_k) e^{-v_k}, (N, K, D)
    grad_x = -pull.sum(axis=1)  # (VAE.11)
    # (VAE.11) r - pi, pi the forward's own softmax (all -inf logits: uniform, so the logit
    # gradients still sum to 0; a softmax of its own would make that pi 0)
    grad_logits = wr.sum(axis=0) - w.sum() * np.exp(log_pi)
    grad_means = pull.sum(axis=0)  # (VAE.11)
    grad_logvars = 0.5 * (wr[:, :, None] * (sq - 1.0)).sum(axis=0)  # (VAE.11)
    return grad_x, grad_logits, grad_means, grad_logvars


def gmm_responsibilities(x, logits, means, logvars):
    r"""Posterior over components for every point (the E-step).

    .. math::
        r_{nk} = p(k \mid x_n) = \frac{\pi_k\,\mathcal N(x_n; m_k, \operatorname{diag} e^{v_k})}
            {\sum_j \pi_j\,\mathcal N(x_n; m_j, \operatorname{diag} e^{v_j})}
            = \exp\big(a_{nk} - \operatorname{lse}_j a_{nj}\big)

    with :math:`a_{nk} = \log\pi_k + \log\mathcal N(x_n; m_k, \cdot)`.

    Parameters
    ----------
    x : ndarray, shape [N, D]
    logits : ndarray, shape [K]
    means, logvars : ndarray, shape [K, D]

    Returns
    -------
    ndarray, shape [N, K]
        Rows sum to 1.

    Notes
    -----
    Computed in the log domain (VAE.12): no density is formed and then normalised,
    so points far from every component are assigned correctly.
    """
    x, logits, means, logvars = _gmm_inputs(x, logits, means, logvars)
    joint, *_ = _gmm_joint(x, logits, means, logvars)
    return result(_normalized_exp(joint, axis=1))  # (VAE.12)


def gmm_em_step(x, logits, means, logvars, min_logvar=-20.0):
    r"""One expectation-maximisation update of a diagonal Gaussian mixture.

    E-step (log domain): :math:`\log r_{nk} = a_{nk} - \operatorname{lse}_j a_{nj}`.
    M-step, with :math:`N_k = \sum_n r_{nk}` and :math:`\omega_{nk} = r_{nk}/N_k`:

    .. math::
        \log\pi_k' = \log N_k - \log N, \qquad
        m_k' = \sum_n \omega_{nk}\,x_n, \qquad
        v_{kd}' = \log\max\Big(\sum_n \omega_{nk}(x_{nd} - m_{kd}')^2,\ e^{v_{\min}}\Big)

    Parameters
    ----------
    x : ndarray, shape [N, D]
    logits : ndarray, shape [K]
    means, logvars : ndarray, shape [K, D]
    min_logvar : float
        Variance floor :math:`v_{\min}` (finite): a component that shrinks onto one
        point would otherwise drive the likelihood to :math:`+\infty`.

    Returns
    -------
    (logits, means, logvars) : tuple of ndarray
        The updated parameters; ``logits`` are normalised (``logsumexp(logits) == 0``).

    Notes
    -----
    :math:`\log N_k = \operatorname{lse}_n \log r_{nk}` and
    :math:`\omega_{\cdot k} = \operatorname{softmax}_n(\log r_{\cdot k})` are formed in the log
    domain, so a component whose responsibilities all underflow still gets finite
    weights (VAE.13).  The log-likelihood never decreases, provided the input
    ``logvars`` are already at or above the floor (then the old parameters are
    feasible for the floored M-step).  A component with :math:`\pi_k = 0`
    (``logits`` of ``-inf``) keeps its mean and log-variance.
    """
    min_logvar = _checks.finite("min_logvar", min_logvar)
    if min_logvar > 700.0:
        raise ValueError(f"min_logvar must be <= 700 (e^min_logvar must be finite), got {min_logvar}")
    x, logits, means, logvars = _gmm_inputs(x, logits, means, logvars)
    joint, *_ = _gmm_joint(x, logits, means, logvars)
    log_r = joint - logsumexp(joint, axis=1)[:, None]  # (VAE.12) log r_nk = a_nk - log p(x_n)
    with np.errstate(divide="ignore"):  # pi_k = 0 exactly: log N_k = -inf, handled below
        log_nk = logsumexp(log_r, axis=0)  # (VAE.13) log N_k, finite even where every r_nk underflows
    alive = np.isfinite(log_nk)
    omega = np.exp(log_r - np.where(alive, log_nk, 0.0)[None, :])  # (VAE.13) columns sum to 1
    new_logits = log_nk - math.log(x.shape[0])  # (VAE.13) log(N_k / N)
    new_means = omega.T @ x  # (VAE.13) weighted means
    spread = np.einsum("nk,nkd->kd", omega, (x[:, None, :] - new_means[None, :, :]) ** 2)
    new_logvars = np.log(np.maximum(spread, math.exp(min_logvar)))  # (VAE.13) floored variance
    new_means = np.where(alive[:, None], new_means, means)
    new_logvars = np.where(alive[:, None], new_logvars, logvars)
    return result(new_logits), result(new_means), result(new_logvars)
