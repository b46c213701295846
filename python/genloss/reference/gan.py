r"""GAN family, NumPy reference (float64): every loss with its hand-derived gradient.

Read next to ``derivations/gan.md``; the tags ``(GAN.n)`` in the comments name its
equations.  Conventions (``notes/API.md``):

* Discriminator outputs are logits :math:`l`, :math:`D = \sigma(l)`.  Logs of
  probabilities are always written as softplus / log-sigmoid / log-sum-exp (GAN.2),
  so every loss and gradient is finite for :math:`|l| \le 10^4`.
* Batch is dim 0.  The per-sample value is the SUM over the non-batch dims, then
  ``reduction`` = ``'mean'`` | ``'sum'`` | ``'none'`` over the batch.  Two-population
  losses (real and fake batches, sizes may differ) reduce each population over its
  own batch and add; they take ``'mean'`` | ``'sum'`` only.  The L1 family
  (``l1_loss``, ``pix2pix_g_loss`` (both its terms: the adversarial one over the PatchGAN
  map, the L1 one over the image), ``cycle_consistency_loss``) takes the MEAN over the
  non-batch dims instead (as ``torch.nn.L1Loss``); ``jsd_estimate`` averages over every logit.
* ``name(...)`` returns a float64 ndarray (0-d, or ``(B,)`` for ``'none'``);
  ``name_backward(*inputs, grad_output, **kwargs)`` returns a tuple with the gradient
  of ``sum(grad_output * name(...))`` w.r.t. each differentiable input, in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .. import _checks
from ._common import (
    as_float64,
    batch_array,
    batch_broadcast,
    grad_mean,
    grad_sum,
    labels_array,
    log_sigmoid,
    reduce_mean,
    reduce_sum,
    result,
    scalar_grad,
    sigmoid,
    softplus,
)

__all__ = [
    "F_DIVERGENCES",
    "FDivergence",
    "cycle_consistency_loss",
    "cycle_consistency_loss_backward",
    "feature_matching_loss",
    "feature_matching_loss_backward",
    "fgan_d_loss",
    "fgan_d_loss_backward",
    "fgan_g_loss",
    "fgan_g_loss_backward",
    "gan_d_loss",
    "gan_d_loss_backward",
    "gan_g_loss",
    "gan_g_loss_backward",
    "gradient_penalty_from_grads",
    "gradient_penalty_from_grads_backward",
    "hinge_d_loss",
    "hinge_d_loss_backward",
    "hinge_g_loss",
    "hinge_g_loss_backward",
    "jsd_estimate",
    "jsd_estimate_backward",
    "l1_loss",
    "l1_loss_backward",
    "lsgan_d_loss",
    "lsgan_d_loss_backward",
    "lsgan_g_loss",
    "lsgan_g_loss_backward",
    "pix2pix_g_loss",
    "pix2pix_g_loss_backward",
    "r1_penalty_from_grads",
    "r1_penalty_from_grads_backward",
    "relativistic_d_loss",
    "relativistic_d_loss_backward",
    "relativistic_g_loss",
    "relativistic_g_loss_backward",
    "spectral_norm_sigma",
    "spectral_norm_sigma_backward",
    "ssgan_critic_loss",
    "ssgan_critic_loss_backward",
    "ssgan_g_loss",
    "ssgan_g_loss_backward",
    "wgan_critic_loss",
    "wgan_critic_loss_backward",
    "wgan_g_loss",
    "wgan_g_loss_backward",
]

_ALL = _checks.REDUCTIONS  # 'mean', 'sum', 'none'
_TWO = _checks.TWO_POPULATION  # 'mean', 'sum'
_GENERATOR_MODES = ("nonsaturating", "minimax")
_LOG2 = math.log(2.0)
_LOG4 = math.log(4.0)


# ============================================================================= standard GAN


def gan_d_loss(real_logits, fake_logits, reduction="mean"):
    r"""Discriminator loss of the standard GAN, from logits.

    .. math::
        L_D = \frac{1}{B_r}\sum_b \sum_i \operatorname{softplus}(-l^r_{b,i})
            + \frac{1}{B_f}\sum_b \sum_i \operatorname{softplus}(l^f_{b,i})
            = -\big(\mathbb{E}\log D(x) + \mathbb{E}\log(1 - D(G(z)))\big)

    with :math:`D = \sigma(l)`, i.e. minus the value function :math:`V(D, G)`.

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
        Discriminator logits on real samples.
    fake_logits : ndarray, shape [B_f, ...]
        Discriminator logits on generated samples (``B_f`` may differ from ``B_r``).
    reduction : {'mean', 'sum'}
        Each population is reduced over its own batch, then the two are added.

    Returns
    -------
    ndarray, shape []
        The loss, float64.

    Notes
    -----
    :math:`\log D = -\operatorname{softplus}(-l)` and
    :math:`\log(1-D) = -\operatorname{softplus}(l)`, never ``log(sigmoid(l))``:
    finite for any finite logit (|l| = 1e4 included).
    """
    reduction = _checks.reduction(reduction, _TWO)
    lr = batch_array("real_logits", real_logits, reduction)
    lf = batch_array("fake_logits", fake_logits, reduction)
    # (GAN.1) V(D,G) = E log D(x) + E log(1 - D(G(z))); (GAN.2) in softplus form; (GAN.3) L_D = -V
    return result(reduce_sum(softplus(-lr), reduction) + reduce_sum(softplus(lf), reduction))


def gan_d_loss_backward(real_logits, fake_logits, grad_output, reduction="mean"):
    r"""Gradient of :func:`gan_d_loss`.

    .. math::
        \frac{\partial L_D}{\partial l^r} = \frac{g}{B_r}\,(\sigma(l^r) - 1) = -\frac{g}{B_r}\sigma(-l^r),
        \qquad
        \frac{\partial L_D}{\partial l^f} = \frac{g}{B_f}\,\sigma(l^f)

    (``1/B`` only for ``'mean'``; :math:`g` is ``grad_output``.)

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
    fake_logits : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []
        Upstream gradient of the scalar loss.
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_logits, grad_fake_logits) : tuple of ndarray
        Float64, shapes of the inputs.

    Notes
    -----
    :math:`-\sigma(-l)` is used instead of :math:`\sigma(l) - 1`: no cancellation
    for large positive :math:`l`; both sigmoids use the sign-split form.
    """
    reduction = _checks.reduction(reduction, _TWO)
    lr = batch_array("real_logits", real_logits, reduction)
    lf = batch_array("fake_logits", fake_logits, reduction)
    # (GAN.4) d softplus(-l)/dl = -sigmoid(-l); d softplus(l)/dl = sigmoid(l)
    grad_real = grad_sum(grad_output, reduction, lr.shape) * -sigmoid(-lr)
    grad_fake = grad_sum(grad_output, reduction, lf.shape) * sigmoid(lf)
    return grad_real, grad_fake


def gan_g_loss(fake_logits, mode="nonsaturating", reduction="mean"):
    r"""Generator loss of the standard GAN, from logits.

    .. math::
        \text{nonsaturating:}\quad L_G = \mathbb{E}\,\operatorname{softplus}(-l^f)
            = -\mathbb{E}\log D(G(z)), \qquad
        \text{minimax:}\quad L_G = -\mathbb{E}\,\operatorname{softplus}(l^f)
            = \mathbb{E}\log(1 - D(G(z)))

    Parameters
    ----------
    fake_logits : ndarray, shape [B, ...]
        Discriminator logits on generated samples.
    mode : {'nonsaturating', 'minimax'}
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    Softplus form (GAN.2): finite for any finite logit.  The minimax loss saturates
    (its gradient :math:`-\sigma(l^f)` vanishes as :math:`l^f \to -\infty`), which is
    why the nonsaturating form is the default.
    """
    mode = _checks.choice("mode", mode, _GENERATOR_MODES)
    reduction = _checks.reduction(reduction, _ALL)
    lf = batch_array("fake_logits", fake_logits, reduction)
    if mode == "nonsaturating":
        return reduce_sum(softplus(-lf), reduction)  # (GAN.7) -log D(G(z))
    return reduce_sum(-softplus(lf), reduction)  # (GAN.7) log(1 - D(G(z)))


def gan_g_loss_backward(fake_logits, grad_output, mode="nonsaturating", reduction="mean"):
    r"""Gradient of :func:`gan_g_loss`.

    .. math::
        \text{nonsaturating:}\ \frac{\partial L_G}{\partial l^f} = -g\,\sigma(-l^f), \qquad
        \text{minimax:}\ \frac{\partial L_G}{\partial l^f} = -g\,\sigma(l^f)

    (times ``1/B`` for ``'mean'``; :math:`g` is ``grad_output``, per sample for ``'none'``).

    Parameters
    ----------
    fake_logits : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] (``'mean'``, ``'sum'``) or [B] (``'none'``)
    mode : {'nonsaturating', 'minimax'}
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_fake_logits,) : tuple of ndarray, shape [B, ...]

    Notes
    -----
    Sign-split sigmoid: bounded by 1 for any logit.
    """
    mode = _checks.choice("mode", mode, _GENERATOR_MODES)
    reduction = _checks.reduction(reduction, _ALL)
    lf = batch_array("fake_logits", fake_logits, reduction)
    # (GAN.4)
    local = -sigmoid(-lf) if mode == "nonsaturating" else -sigmoid(lf)
    return (grad_sum(grad_output, reduction, lf.shape) * local,)


def jsd_estimate(real_logits, fake_logits):
    r"""Jensen-Shannon divergence estimate from discriminator logits.

    .. math::
        \widehat{\mathrm{JSD}} = \tfrac12\big(V(D, G) + \log 4\big)
            = \tfrac12\big(\log 4 - L_D\big)

    with :math:`L_D` = :func:`gan_d_loss` over every logit: the mean over all the logits of
    each population, so that a discriminator with several logits per sample (a PatchGAN's
    patches, each a draw of the same expectation :math:`V`) estimates the JSD, and a
    chance-level one (all logits 0) gives 0 (summing a sample's logits, as ``gan_d_loss``
    does, would give :math:`\tfrac12(\log 4 - n\log 4)` for :math:`n` logits).  At the optimal
    discriminator :math:`D^* = p/(p+q)` (GAN.5), :math:`V(D^*, G) = 2\,\mathrm{JSD} - \log 4`
    (GAN.6), so the estimate equals :math:`\mathrm{JSD}(p\,\|\,q)`; for any other
    :math:`D` it is a lower bound in expectation.

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
    fake_logits : ndarray, shape [B_f, ...]

    Returns
    -------
    ndarray, shape []
        The estimate in nats.

    Notes
    -----
    Inherits the softplus form of :func:`gan_d_loss`: finite for any finite logit.
    """
    r, f = _every_logit(real_logits, fake_logits)
    return result((_LOG4 - gan_d_loss(r, f, "mean")) / 2.0)  # (GAN.6)


def _every_logit(real_logits, fake_logits):
    """Both populations as one logit per row (jsd_estimate averages over every logit)."""
    r = batch_array("real_logits", real_logits, "mean")
    f = batch_array("fake_logits", fake_logits, "mean")
    return r.reshape(-1), f.reshape(-1)


def jsd_estimate_backward(real_logits, fake_logits, grad_output):
    r"""Gradient of :func:`jsd_estimate`: :math:`-\tfrac12` times that of :func:`gan_d_loss`.

    .. math::
        \frac{\partial \widehat{\mathrm{JSD}}}{\partial l^r} = \frac{g}{2n_r}\sigma(-l^r), \qquad
        \frac{\partial \widehat{\mathrm{JSD}}}{\partial l^f} = -\frac{g}{2n_f}\sigma(l^f)

    with :math:`n_r, n_f` the numbers of logits (:math:`B_r, B_f` for one logit per sample).

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
    fake_logits : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []

    Returns
    -------
    (grad_real_logits, grad_fake_logits) : tuple of ndarray

    Notes
    -----
    Bounded sigmoids: finite for any finite logit.
    """
    g = scalar_grad("grad_output", grad_output)
    r, f = _every_logit(real_logits, fake_logits)
    gr, gf = gan_d_loss_backward(r, f, -0.5 * g, "mean")  # (GAN.6), (GAN.4)
    return gr.reshape(np.shape(real_logits)), gf.reshape(np.shape(fake_logits))


# ============================================================================= LSGAN, WGAN, hinge


def lsgan_d_loss(real_out, fake_out, a=0.0, b=1.0, reduction="mean"):
    r"""Least-squares GAN discriminator loss (Mao et al., with the factor 1/2).

    .. math::
        L_D = \tfrac12\,\mathbb{E}\,(D(x) - b)^2 + \tfrac12\,\mathbb{E}\,(D(G(z)) - a)^2

    Parameters
    ----------
    real_out : ndarray, shape [B_r, ...]
        Raw (linear) discriminator outputs on real samples.
    fake_out : ndarray, shape [B_f, ...]
        Raw discriminator outputs on generated samples.
    a, b : float
        Targets for fake and real samples (finite).
    reduction : {'mean', 'sum'}

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Polynomial: finite as long as the squares are (|out| < 1e154 in float64).
    """
    a = _checks.finite("a", a)
    b = _checks.finite("b", b)
    reduction = _checks.reduction(reduction, _TWO)
    r = batch_array("real_out", real_out, reduction)
    f = batch_array("fake_out", fake_out, reduction)
    # (GAN.8)
    return result(reduce_sum(0.5 * (r - b) ** 2, reduction) + reduce_sum(0.5 * (f - a) ** 2, reduction))


def lsgan_d_loss_backward(real_out, fake_out, grad_output, a=0.0, b=1.0, reduction="mean"):
    r"""Gradient of :func:`lsgan_d_loss`.

    .. math::
        \frac{\partial L_D}{\partial D(x)} = \frac{g}{B_r}(D(x) - b), \qquad
        \frac{\partial L_D}{\partial D(G(z))} = \frac{g}{B_f}(D(G(z)) - a)

    Parameters
    ----------
    real_out : ndarray, shape [B_r, ...]
    fake_out : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []
    a, b : float
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_out, grad_fake_out) : tuple of ndarray

    Notes
    -----
    Linear in the inputs: no stability concern.
    """
    a = _checks.finite("a", a)
    b = _checks.finite("b", b)
    reduction = _checks.reduction(reduction, _TWO)
    r = batch_array("real_out", real_out, reduction)
    f = batch_array("fake_out", fake_out, reduction)
    # (GAN.8)
    grad_real = grad_sum(grad_output, reduction, r.shape) * (r - b)
    grad_fake = grad_sum(grad_output, reduction, f.shape) * (f - a)
    return grad_real, grad_fake


def lsgan_g_loss(fake_out, c=1.0, reduction="mean"):
    r"""Least-squares GAN generator loss.

    .. math::
        L_G = \tfrac12\,\mathbb{E}\,(D(G(z)) - c)^2

    Parameters
    ----------
    fake_out : ndarray, shape [B, ...]
        Raw discriminator outputs on generated samples.
    c : float
        The value the generator wants the discriminator to output (finite).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    Polynomial: finite as long as the square is.
    """
    c = _checks.finite("c", c)
    reduction = _checks.reduction(reduction, _ALL)
    f = batch_array("fake_out", fake_out, reduction)
    return reduce_sum(0.5 * (f - c) ** 2, reduction)  # (GAN.8)


def lsgan_g_loss_backward(fake_out, grad_output, c=1.0, reduction="mean"):
    r"""Gradient of :func:`lsgan_g_loss`.

    .. math::
        \frac{\partial L_G}{\partial D(G(z))} = g\,(D(G(z)) - c)

    Parameters
    ----------
    fake_out : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    c : float
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_fake_out,) : tuple of ndarray

    Notes
    -----
    Linear: no stability concern.
    """
    c = _checks.finite("c", c)
    reduction = _checks.reduction(reduction, _ALL)
    f = batch_array("fake_out", fake_out, reduction)
    return (grad_sum(grad_output, reduction, f.shape) * (f - c),)  # (GAN.8)


def wgan_critic_loss(real_scores, fake_scores, reduction="mean"):
    r"""Wasserstein GAN critic loss.

    .. math::
        L_C = \mathbb{E}\,C(G(z)) - \mathbb{E}\,C(x)

    Parameters
    ----------
    real_scores : ndarray, shape [B_r, ...]
        Critic scores on real samples.
    fake_scores : ndarray, shape [B_f, ...]
        Critic scores on generated samples.
    reduction : {'mean', 'sum'}

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Linear: finite for finite scores.  The Lipschitz constraint is not part of the
    loss (see :func:`gradient_penalty_from_grads`, :func:`spectral_norm_sigma`).
    """
    reduction = _checks.reduction(reduction, _TWO)
    r = batch_array("real_scores", real_scores, reduction)
    f = batch_array("fake_scores", fake_scores, reduction)
    return result(reduce_sum(f, reduction) - reduce_sum(r, reduction))  # (GAN.9)


def wgan_critic_loss_backward(real_scores, fake_scores, grad_output, reduction="mean"):
    r"""Gradient of :func:`wgan_critic_loss`.

    .. math::
        \frac{\partial L_C}{\partial C(x)} = -\frac{g}{B_r}, \qquad
        \frac{\partial L_C}{\partial C(G(z))} = \frac{g}{B_f}

    Parameters
    ----------
    real_scores : ndarray, shape [B_r, ...]
    fake_scores : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_scores, grad_fake_scores) : tuple of ndarray

    Notes
    -----
    Constant gradients: no stability concern.
    """
    reduction = _checks.reduction(reduction, _TWO)
    r = batch_array("real_scores", real_scores, reduction)
    f = batch_array("fake_scores", fake_scores, reduction)
    # (GAN.9)
    return -grad_sum(grad_output, reduction, r.shape), grad_sum(grad_output, reduction, f.shape)


def wgan_g_loss(fake_scores, reduction="mean"):
    r"""Wasserstein GAN generator loss.

    .. math::
        L_G = -\mathbb{E}\,C(G(z))

    Parameters
    ----------
    fake_scores : ndarray, shape [B, ...]
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    Linear: finite for finite scores.
    """
    reduction = _checks.reduction(reduction, _ALL)
    f = batch_array("fake_scores", fake_scores, reduction)
    return reduce_sum(-f, reduction)  # (GAN.9)


def wgan_g_loss_backward(fake_scores, grad_output, reduction="mean"):
    r"""Gradient of :func:`wgan_g_loss`.

    .. math::
        \frac{\partial L_G}{\partial C(G(z))} = -g

    Parameters
    ----------
    fake_scores : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_fake_scores,) : tuple of ndarray

    Notes
    -----
    Constant gradient: no stability concern.
    """
    reduction = _checks.reduction(reduction, _ALL)
    f = batch_array("fake_scores", fake_scores, reduction)
    return (-grad_sum(grad_output, reduction, f.shape),)  # (GAN.9)


def hinge_d_loss(real_scores, fake_scores, reduction="mean"):
    r"""Hinge discriminator loss (geometric GAN / SAGAN / BigGAN).

    .. math::
        L_D = \mathbb{E}\,\operatorname{relu}(1 - D(x)) + \mathbb{E}\,\operatorname{relu}(1 + D(G(z)))

    Parameters
    ----------
    real_scores : ndarray, shape [B_r, ...]
    fake_scores : ndarray, shape [B_f, ...]
    reduction : {'mean', 'sum'}

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Piecewise linear: finite for finite scores.
    """
    reduction = _checks.reduction(reduction, _TWO)
    r = batch_array("real_scores", real_scores, reduction)
    f = batch_array("fake_scores", fake_scores, reduction)
    # (GAN.10)
    return result(
        reduce_sum(np.maximum(1.0 - r, 0.0), reduction) + reduce_sum(np.maximum(1.0 + f, 0.0), reduction)
    )


def hinge_d_loss_backward(real_scores, fake_scores, grad_output, reduction="mean"):
    r"""Gradient of :func:`hinge_d_loss`, with :math:`\operatorname{relu}'(0) := 0`.

    .. math::
        \frac{\partial L_D}{\partial D(x)} = -\frac{g}{B_r}\,[1 - D(x) > 0], \qquad
        \frac{\partial L_D}{\partial D(G(z))} = \frac{g}{B_f}\,[1 + D(G(z)) > 0]

    Parameters
    ----------
    real_scores : ndarray, shape [B_r, ...]
    fake_scores : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_scores, grad_fake_scores) : tuple of ndarray

    Notes
    -----
    At the kinks (score exactly +-1) the subgradient 0 is returned.
    """
    reduction = _checks.reduction(reduction, _TWO)
    r = batch_array("real_scores", real_scores, reduction)
    f = batch_array("fake_scores", fake_scores, reduction)
    # (GAN.10) relu'(z) = [z > 0], and NaN at a NaN score (np.sign keeps it; a comparison would not)
    grad_real = grad_sum(grad_output, reduction, r.shape) * -np.maximum(np.sign(1.0 - r), 0.0)
    grad_fake = grad_sum(grad_output, reduction, f.shape) * np.maximum(np.sign(1.0 + f), 0.0)
    return grad_real, grad_fake


def hinge_g_loss(fake_scores, reduction="mean"):
    r"""Hinge generator loss.

    .. math::
        L_G = -\mathbb{E}\,D(G(z))

    Parameters
    ----------
    fake_scores : ndarray, shape [B, ...]
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    The same math as :func:`wgan_g_loss` (GAN.9 = GAN.10's generator side: the hinge
    acts on the critic only), so it is that function: one implementation.
    """
    return wgan_g_loss(fake_scores, reduction)  # (GAN.10)


def hinge_g_loss_backward(fake_scores, grad_output, reduction="mean"):
    r"""Gradient of :func:`hinge_g_loss`.

    .. math::
        \frac{\partial L_G}{\partial D(G(z))} = -g

    Parameters
    ----------
    fake_scores : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_fake_scores,) : tuple of ndarray

    Notes
    -----
    :func:`wgan_g_loss_backward` (the same loss).
    """
    return wgan_g_loss_backward(fake_scores, grad_output, reduction)  # (GAN.10)


# ============================================================================= relativistic


def _relativistic_inputs(real_logits, fake_logits, average, reduction):
    average = _checks.flag("average", average)
    reduction = _checks.reduction(reduction, _TWO)
    lr = batch_array("real_logits", real_logits, reduction)
    lf = batch_array("fake_logits", fake_logits, reduction)
    if not average:  # RSGAN pairs the samples element by element
        _checks.same_shape("real_logits", lr.shape, "fake_logits", lf.shape)
    return lr, lf, average, reduction


def _relativistic_value(first, second, average, reduction):
    """The loss that pushes ``first`` above ``second``: D with (real, fake), G with (fake, real)."""
    if average:  # (GAN.11) RaGAN: each sample against the mean of the other population
        m_first, m_second = first.mean(), second.mean()
        return result(
            reduce_sum(softplus(-(first - m_second)), reduction)
            + reduce_sum(softplus(second - m_first), reduction)
        )
    return reduce_sum(softplus(-(first - second)), reduction)  # (GAN.11) RSGAN, paired


def _relativistic_grads(first, second, grad_output, average, reduction):
    if average:
        m_first, m_second = first.mean(), second.mean()
        # (GAN.4) on z1 = first - m_second and z2 = second - m_first
        s1 = grad_sum(grad_output, reduction, first.shape) * sigmoid(-(first - m_second))
        s2 = grad_sum(grad_output, reduction, second.shape) * sigmoid(second - m_first)
        # (GAN.11) the means pass their gradient evenly to every element they average
        grad_first = -s1 - s2.sum() / first.size
        grad_second = s2 + s1.sum() / second.size
        return grad_first, grad_second
    s = grad_sum(grad_output, reduction, first.shape) * sigmoid(-(first - second))
    return -s, s


def relativistic_d_loss(real_logits, fake_logits, average=True, reduction="mean"):
    r"""Relativistic discriminator loss: RaGAN (``average=True``) or RSGAN (``average=False``).

    .. math::
        \text{RaGAN:}\quad L_D = \mathbb{E}_r\,\operatorname{softplus}\!\big(-(l^r - \bar l^f)\big)
                              + \mathbb{E}_f\,\operatorname{softplus}\!\big(l^f - \bar l^r\big),
        \qquad
        \text{RSGAN:}\quad L_D = \mathbb{E}\,\operatorname{softplus}\!\big(-(l^r - l^f)\big)

    where :math:`\bar l^f`, :math:`\bar l^r` are the means over ALL elements of
    ``fake_logits`` / ``real_logits`` (gradients flow through them).

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
    fake_logits : ndarray, shape [B_f, ...]
        Any shape when ``average=True``; the shape of ``real_logits`` when ``average=False``.
    average : bool
    reduction : {'mean', 'sum'}
        RaGAN reduces each population over its own batch; RSGAN over the shared batch.

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Softplus form (GAN.2) of :math:`-\log\sigma(\cdot)`: finite for any finite logit.
    """
    lr, lf, average, reduction = _relativistic_inputs(real_logits, fake_logits, average, reduction)
    return _relativistic_value(lr, lf, average, reduction)


def relativistic_d_loss_backward(real_logits, fake_logits, grad_output, average=True, reduction="mean"):
    r"""Gradient of :func:`relativistic_d_loss`.

    .. math::
        \text{RaGAN:}\quad
        \frac{\partial L_D}{\partial l^r_i} = -s^r_i - \frac{1}{N_r}\sum_j s^f_j, \qquad
        \frac{\partial L_D}{\partial l^f_j} = s^f_j + \frac{1}{N_f}\sum_i s^r_i

    with :math:`s^r_i = w_r\,\sigma(\bar l^f - l^r_i)`, :math:`s^f_j = w_f\,\sigma(l^f_j - \bar l^r)`,
    :math:`w = g/B` (``'mean'``) or :math:`g` (``'sum'``), and :math:`N` the element
    counts.  RSGAN: :math:`\partial/\partial l^r = -w\,\sigma(l^f - l^r) = -\partial/\partial l^f`.

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
    fake_logits : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []
    average : bool
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_logits, grad_fake_logits) : tuple of ndarray

    Notes
    -----
    Bounded sigmoids: finite for any finite logit.
    """
    lr, lf, average, reduction = _relativistic_inputs(real_logits, fake_logits, average, reduction)
    return _relativistic_grads(lr, lf, grad_output, average, reduction)


def relativistic_g_loss(real_logits, fake_logits, average=True, reduction="mean"):
    r"""Relativistic generator loss: the discriminator loss with real and fake swapped.

    .. math::
        \text{RaGAN:}\quad L_G = \mathbb{E}_f\,\operatorname{softplus}\!\big(-(l^f - \bar l^r)\big)
                              + \mathbb{E}_r\,\operatorname{softplus}\!\big(l^r - \bar l^f\big),
        \qquad
        \text{RSGAN:}\quad L_G = \mathbb{E}\,\operatorname{softplus}\!\big(-(l^f - l^r)\big)

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
    fake_logits : ndarray, shape [B_f, ...]
        Any shape when ``average=True``; the shape of ``real_logits`` when ``average=False``.
    average : bool
    reduction : {'mean', 'sum'}

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Softplus form: finite for any finite logit.  Unlike the standard GAN, the
    generator loss depends on the real logits too (and has a gradient w.r.t. them).
    """
    lr, lf, average, reduction = _relativistic_inputs(real_logits, fake_logits, average, reduction)
    return _relativistic_value(lf, lr, average, reduction)  # (GAN.11) roles swapped


def relativistic_g_loss_backward(real_logits, fake_logits, grad_output, average=True, reduction="mean"):
    r"""Gradient of :func:`relativistic_g_loss` (that of the D loss with the roles swapped).

    .. math::
        \text{RaGAN:}\quad
        \frac{\partial L_G}{\partial l^f_j} = -s^f_j - \frac{1}{N_f}\sum_i s^r_i, \qquad
        \frac{\partial L_G}{\partial l^r_i} = s^r_i + \frac{1}{N_r}\sum_j s^f_j

    with :math:`s^f_j = w_f\,\sigma(\bar l^r - l^f_j)`, :math:`s^r_i = w_r\,\sigma(l^r_i - \bar l^f)`.

    Parameters
    ----------
    real_logits : ndarray, shape [B_r, ...]
    fake_logits : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []
    average : bool
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_logits, grad_fake_logits) : tuple of ndarray

    Notes
    -----
    Bounded sigmoids: finite for any finite logit.
    """
    lr, lf, average, reduction = _relativistic_inputs(real_logits, fake_logits, average, reduction)
    grad_fake, grad_real = _relativistic_grads(lf, lr, grad_output, average, reduction)
    return grad_real, grad_fake


# ============================================================================= gradient penalties


def _sample_norms(g):
    """Per-sample Euclidean norm over all non-batch dims, shape (B,)."""
    return np.sqrt(np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1))


def _gradient_penalty_inputs(grads, lambda_, center, one_sided, reduction):
    lambda_ = _checks.finite("lambda_", lambda_)
    center = _checks.finite("center", center)
    one_sided = _checks.flag("one_sided", one_sided)
    reduction = _checks.reduction(reduction, _ALL)
    g = batch_array("grads", grads, reduction)
    norms = _sample_norms(g)
    gap = np.maximum(norms - center, 0.0) if one_sided else norms - center
    return g, norms, gap, lambda_, reduction


def gradient_penalty_from_grads(grads, lambda_=10.0, center=1.0, one_sided=False, reduction="mean"):
    r"""WGAN-GP penalty from the critic's input gradients at the interpolates.

    .. math::
        P = \lambda\,\mathbb{E}_b\,\big(\lVert g_b \rVert_2 - c\big)^2
        \qquad\text{(one-sided: } \lambda\,\mathbb{E}_b \max(\lVert g_b \rVert_2 - c, 0)^2\text{)}

    where :math:`g_b = \nabla_{\hat x} C(\hat x_b)` and the norm runs over all
    non-batch dims of sample :math:`b`.

    Parameters
    ----------
    grads : ndarray, shape [B, ...]
        Per-sample gradients of the critic w.r.t. its input.
    lambda_ : float
        Penalty weight (finite).
    center : float
        Target norm :math:`c` (finite; 1 for WGAN-GP, 0 for a zero-centred penalty).
    one_sided : bool
        Penalise only norms above ``center``.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    The norm is the plain root of the sum of squares (finite for entries below
    ~1e154).  The value is well defined at :math:`g_b = 0`; see the backward for
    the gradient there.
    """
    _, _, gap, lambda_, reduction = _gradient_penalty_inputs(grads, lambda_, center, one_sided, reduction)
    return reduce_sum(lambda_ * gap**2, reduction)  # (GAN.12)


def gradient_penalty_from_grads_backward(
    grads, grad_output, lambda_=10.0, center=1.0, one_sided=False, reduction="mean"
):
    r"""Gradient of :func:`gradient_penalty_from_grads`, defined as 0 at :math:`g_b = 0`.

    .. math::
        \frac{\partial P}{\partial g_b}
            = w_b\,2\lambda\,\big(\lVert g_b\rVert - c\big)\,\frac{g_b}{\lVert g_b\rVert}
        \quad (\lVert g_b\rVert > 0), \qquad 0 \quad (g_b = 0)

    (one-sided: :math:`\max(\lVert g_b\rVert - c, 0)` in place of :math:`\lVert g_b\rVert - c`);
    :math:`w_b` = ``grad_output`` (per sample for ``'none'``, divided by B for ``'mean'``).

    Parameters
    ----------
    grads : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    lambda_, center : float
    one_sided : bool
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_grads,) : tuple of ndarray, shape [B, ...]

    Notes
    -----
    :math:`\lVert g\rVert` is not differentiable at 0 (for :math:`c \ne 0`); the
    value 0 is returned there, never NaN (the division is guarded).
    """
    g, norms, gap, lambda_, reduction = _gradient_penalty_inputs(grads, lambda_, center, one_sided, reduction)
    nonzero = norms != 0  # (a NaN norm is "nonzero": its NaN reaches the gradient)
    # (GAN.12) d||g||/dg = g/||g||, and 0 where g = 0. gap/||g|| is written
    # 1 - c/||g|| (clamped at 0 when one-sided): no inf/inf once ||g|| overflows.
    ratio = 1.0 - center / np.where(nonzero, norms, 1.0)
    if one_sided:
        ratio = np.maximum(ratio, 0.0)
    coef = np.where(nonzero, 2.0 * lambda_ * ratio, 0.0)
    return (grad_sum(grad_output, reduction, g.shape) * batch_broadcast(coef, g.ndim) * g,)


def r1_penalty_from_grads(grads, gamma=10.0, reduction="mean"):
    r"""R1 / R2 penalty from the discriminator's input gradients (on real / on fake samples).

    .. math::
        R = \frac{\gamma}{2}\,\mathbb{E}_b\,\lVert g_b \rVert_2^2

    Parameters
    ----------
    grads : ndarray, shape [B, ...]
        Per-sample gradients :math:`\nabla_x D(x_b)`.
    gamma : float
        Penalty weight (finite).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    Sum of squares, no square root: smooth everywhere, finite for entries below ~1e154.
    """
    gamma = _checks.finite("gamma", gamma)
    reduction = _checks.reduction(reduction, _ALL)
    g = batch_array("grads", grads, reduction)
    return reduce_sum(0.5 * gamma * g**2, reduction)  # (GAN.13)


def r1_penalty_from_grads_backward(grads, grad_output, gamma=10.0, reduction="mean"):
    r"""Gradient of :func:`r1_penalty_from_grads`.

    .. math::
        \frac{\partial R}{\partial g_b} = w_b\,\gamma\,g_b

    Parameters
    ----------
    grads : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    gamma : float
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_grads,) : tuple of ndarray

    Notes
    -----
    Linear: no stability concern.
    """
    gamma = _checks.finite("gamma", gamma)
    reduction = _checks.reduction(reduction, _ALL)
    g = batch_array("grads", grads, reduction)
    return (grad_sum(grad_output, reduction, g.shape) * gamma * g,)  # (GAN.13)


# ============================================================================= feature matching


def _feature_inputs(real_features, fake_features):
    fr = as_float64("real_features", real_features)
    ff = as_float64("fake_features", fake_features)
    _checks.ndim("real_features", fr.shape, 2)
    _checks.ndim("fake_features", ff.shape, 2)
    _checks.batched("real_features", fr.shape, "mean", 2)
    _checks.batched("fake_features", ff.shape, "mean", 2)
    if fr.shape[1] != ff.shape[1]:
        raise ValueError(
            f"fake_features must have the feature size of real_features ({fr.shape[1]}), got shape {ff.shape}"
        )
    return fr, ff


def feature_matching_loss(real_features, fake_features):
    r"""Feature matching (Salimans et al. 2016): squared distance of the batch-mean features.

    .. math::
        L = \Big\lVert \frac{1}{B_r}\sum_b f^r_b - \frac{1}{B_f}\sum_b f^f_b \Big\rVert_2^2

    Parameters
    ----------
    real_features : ndarray, shape [B_r, F]
        Intermediate discriminator features on real samples.
    fake_features : ndarray, shape [B_f, F]
        The same features on generated samples.

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Means, then a square: finite for features below ~1e154.
    """
    fr, ff = _feature_inputs(real_features, fake_features)
    diff = fr.mean(axis=0) - ff.mean(axis=0)
    return result(np.sum(diff**2))  # (GAN.14)


def feature_matching_loss_backward(real_features, fake_features, grad_output):
    r"""Gradient of :func:`feature_matching_loss`.

    .. math::
        \frac{\partial L}{\partial f^r_b} = \frac{2g}{B_r}\,\Delta, \qquad
        \frac{\partial L}{\partial f^f_b} = -\frac{2g}{B_f}\,\Delta, \qquad
        \Delta = \bar f^r - \bar f^f

    Parameters
    ----------
    real_features : ndarray, shape [B_r, F]
    fake_features : ndarray, shape [B_f, F]
    grad_output : float or ndarray, shape []

    Returns
    -------
    (grad_real_features, grad_fake_features) : tuple of ndarray

    Notes
    -----
    Linear in the features: no stability concern.
    """
    fr, ff = _feature_inputs(real_features, fake_features)
    g = scalar_grad("grad_output", grad_output)
    diff = fr.mean(axis=0) - ff.mean(axis=0)
    # (GAN.14)
    grad_real = np.broadcast_to(2.0 * g * diff / fr.shape[0], fr.shape).copy()
    grad_fake = np.broadcast_to(-2.0 * g * diff / ff.shape[0], ff.shape).copy()
    return grad_real, grad_fake


# ============================================================================= semi-supervised GAN


def _class_logits(name, x, reduction, num_logits=None):
    """2-D logits (B, C+1), C+1 >= 2, optionally with a given C+1."""
    a = as_float64(name, x)
    _checks.ndim(name, a.shape, 2)
    _checks.batched(name, a.shape, reduction, 2)
    if num_logits is None and a.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 columns (C real classes + the fake class), got {a.shape}")
    if num_logits is not None and a.shape[1] != num_logits:
        raise ValueError(
            f"{name} must have {num_logits} columns (C+1, as labeled_logits), got shape {a.shape}"
        )
    return a


def _ssgan_inputs(labeled_logits, labels, unlabeled_logits, fake_logits, reduction):
    reduction = _checks.reduction(reduction, _TWO)
    ll = _class_logits("labeled_logits", labeled_logits, reduction)
    k = ll.shape[1]
    lu = _class_logits("unlabeled_logits", unlabeled_logits, reduction, k)
    lf = _class_logits("fake_logits", fake_logits, reduction, k)
    y = labels_array("labels", labels, ll.shape[0], k - 1)
    return ll, y, lu, lf, reduction


def _set_lse(logits, member):
    r"""Per row: the log-sum-exp over the classes where ``member`` is True, and the softmax
    within that set (0 outside it).

    Shifted by the set's OWN maximum m, the shift of an entry equal to m taken as exactly 0:
    a +inf logit gives :math:`e^0 = 1`, not :math:`e^{\infty - \infty}`.  An empty set has
    lse :math:`-\infty`; a NaN member makes the row NaN.
    """
    x = np.where(member, logits, -np.inf)
    m = np.max(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(member, np.where(x == m, 0.0, x - m), -np.inf)
        e = np.exp(z)
        s = np.sum(e, axis=1, keepdims=True)
        lse = (m + np.log(s))[:, 0]
        soft = np.where(member, e / s, 0.0)
    return lse, soft


def _lse_gap_loss(logits, target, other):
    r"""Per row :math:`\operatorname{lse}(l_{T\cup O}) - \operatorname{lse}(l_T)
    = \operatorname{softplus}(d)`, :math:`d = \operatorname{lse}(l_O) - \operatorname{lse}(l_T)`
    (GAN.19), and its gradient :math:`\sigma(d)\operatorname{softmax}_O(l) - \sigma(d)\operatorname{softmax}_T(l)`
    (0 on classes in neither set).  ``target``, ``other``: boolean masks of T and O, shape of ``logits``.
    """
    lse_t, soft_t = _set_lse(logits, target)
    lse_o, soft_o = _set_lse(logits, other)
    with np.errstate(invalid="ignore"):
        d = lse_o - lse_t
    sig = sigmoid(d)[:, None]
    return softplus(d), sig * soft_o - sig * soft_t


def _ssgan_sets(logits, labels=None):
    r"""(T, O) masks of the three SSGAN terms (fake class last, GAN.19):

    * labels given (L_sup): T = {y}, O = the other REAL classes (the fake class is in neither);
    * no labels: (the real classes, {fake}), the sets of -log(1 - p_fake); swapped, of -log p_fake.
    """
    k = logits.shape[1]
    cls = np.arange(k)[None, :]
    real = np.broadcast_to(cls < k - 1, logits.shape)
    if labels is not None:
        target = cls == labels[:, None]
        return target, real & ~target
    return real, ~real


def ssgan_critic_loss(labeled_logits, labels, unlabeled_logits, fake_logits, reduction="mean"):
    r"""Semi-supervised GAN critic loss (Salimans et al. 2016, Sec. 5), K = C+1 classes, fake last.

    .. math::
        L = \underbrace{\mathbb{E}_{\ell}\big[\operatorname{lse}(l_{<C}) - l_y\big]}_{L_{sup}}
          + \underbrace{\mathbb{E}_{u}\big[\operatorname{lse}(l) - \operatorname{lse}(l_{<C})\big]
          + \mathbb{E}_{f}\big[\operatorname{lse}(l) - l_C\big]}_{L_{unsup}}

    :math:`L_{sup} = -\log p(y \mid x, y < C+1)`: the cross-entropy over the C REAL classes
    (conditioned on real; the fake logit of a labeled sample does not enter), then
    :math:`-\log(1 - p_{\mathrm{fake}})` on unlabeled real data and
    :math:`-\log p_{\mathrm{fake}}` on generated data (GAN.15, GAN.19).

    Parameters
    ----------
    labeled_logits : ndarray, shape [B_l, C+1]
    labels : ndarray of int, shape [B_l]
        Classes in ``[0, C)`` (int64 or int32; never the fake class).
    unlabeled_logits : ndarray, shape [B_u, C+1]
    fake_logits : ndarray, shape [B_f, C+1]
    reduction : {'mean', 'sum'}
        Each of the three batches is reduced on its own, then the terms are added.

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Every term is :math:`\operatorname{softplus}(\operatorname{lse}(l_O) - \operatorname{lse}(l_T))`
    for a target set T and the other classes O (GAN.19): no difference of two large
    log-sum-exps, each set shifted by its own maximum.  Finite for any finite logit, and
    wherever the math is finite with infinite ones (a +inf real-class logit of an unlabeled
    sample gives :math:`-\log(1 - p_{\mathrm{fake}}) = 0`).
    """
    ll, y, lu, lf, reduction = _ssgan_inputs(labeled_logits, labels, unlabeled_logits, fake_logits, reduction)
    sup, _ = _lse_gap_loss(ll, *_ssgan_sets(ll, y))  # (GAN.19) -log p(y | x, real)
    t_u, o_u = _ssgan_sets(lu)
    unlabeled, _ = _lse_gap_loss(lu, t_u, o_u)  # (GAN.15) -log(1 - p_fake(x_u))
    t_f, o_f = _ssgan_sets(lf)
    fake, _ = _lse_gap_loss(lf, o_f, t_f)  # (GAN.15) -log p_fake(G(z)): T = {fake}
    return result(reduce_sum(sup, reduction) + reduce_sum(unlabeled, reduction) + reduce_sum(fake, reduction))


def ssgan_critic_loss_backward(
    labeled_logits, labels, unlabeled_logits, fake_logits, grad_output, reduction="mean"
):
    r"""Gradient of :func:`ssgan_critic_loss` w.r.t. the three logit arrays (not the labels).

    .. math::
        \frac{\partial}{\partial l}\operatorname{softplus}\big(\operatorname{lse}(l_O) - \operatorname{lse}(l_T)\big)
            = \sigma(d)\,\operatorname{softmax}_O(l) - \sigma(d)\,\operatorname{softmax}_T(l)

    per row and term (GAN.19), times the batch weight: labeled
    :math:`(T, O) = (\{y\}, \{k < C\} \setminus \{y\})` (the fake column gets 0), unlabeled
    :math:`(\{k < C\}, \{C\})`, generated :math:`(\{C\}, \{k < C\})`.

    Parameters
    ----------
    labeled_logits : ndarray, shape [B_l, C+1]
    labels : ndarray of int, shape [B_l]
    unlabeled_logits : ndarray, shape [B_u, C+1]
    fake_logits : ndarray, shape [B_f, C+1]
    grad_output : float or ndarray, shape []
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_labeled_logits, grad_unlabeled_logits, grad_fake_logits) : tuple of ndarray

    Notes
    -----
    Every row of a term's gradient sums to 0 and each entry lies in [-1, 1] times the weight.
    """
    ll, y, lu, lf, reduction = _ssgan_inputs(labeled_logits, labels, unlabeled_logits, fake_logits, reduction)
    _, d_sup = _lse_gap_loss(ll, *_ssgan_sets(ll, y))  # (GAN.19)
    t_u, o_u = _ssgan_sets(lu)
    _, d_unl = _lse_gap_loss(lu, t_u, o_u)
    t_f, o_f = _ssgan_sets(lf)
    _, d_fake = _lse_gap_loss(lf, o_f, t_f)
    return (
        grad_sum(grad_output, reduction, ll.shape) * d_sup,
        grad_sum(grad_output, reduction, lu.shape) * d_unl,
        grad_sum(grad_output, reduction, lf.shape) * d_fake,
    )


def ssgan_g_loss(fake_logits, reduction="mean"):
    r"""Semi-supervised GAN generator loss: the log-probability of the fake class.

    .. math::
        L_G = \mathbb{E}_f\big[\log p_{\mathrm{fake}}(G(z))\big]
            = \mathbb{E}_f\big[l_C - \operatorname{lse}(l)\big]
            = -\mathbb{E}_f\,\operatorname{softplus}(\operatorname{lse}(l_{<C}) - l_C)

    Parameters
    ----------
    fake_logits : ndarray, shape [B, C+1]
        Classifier logits on generated samples, fake class last.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    The softplus form (GAN.19): finite for any finite logit.
    """
    reduction = _checks.reduction(reduction, _ALL)
    lf = _class_logits("fake_logits", fake_logits, reduction)
    real, fake = _ssgan_sets(lf)
    value, _ = _lse_gap_loss(lf, fake, real)
    return reduce_sum(-value, reduction)  # (GAN.15)


def ssgan_g_loss_backward(fake_logits, grad_output, reduction="mean"):
    r"""Gradient of :func:`ssgan_g_loss`.

    .. math::
        \frac{\partial L_G}{\partial l} = w\,\big(\sigma(d)\operatorname{softmax}_T(l) - \sigma(d)\operatorname{softmax}_O(l)\big)
            = w\,(e_C - \operatorname{softmax}(l))

    with :math:`T = \{C\}`, :math:`O = \{k < C\}`, :math:`d = \operatorname{lse}(l_{<C}) - l_C` (GAN.19).

    Parameters
    ----------
    fake_logits : ndarray, shape [B, C+1]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_fake_logits,) : tuple of ndarray

    Notes
    -----
    Bounded by the weight in absolute value; finite for any finite logit.
    """
    reduction = _checks.reduction(reduction, _ALL)
    lf = _class_logits("fake_logits", fake_logits, reduction)
    real, fake = _ssgan_sets(lf)
    _, d = _lse_gap_loss(lf, fake, real)
    return (-grad_sum(grad_output, reduction, lf.shape) * d,)  # (GAN.15), (GAN.19)


# ============================================================================= L1 family


def _same_shape_pair(name_a, a, name_b, b, reduction):
    a = batch_array(name_a, a, reduction)
    b = as_float64(name_b, b)
    _checks.same_shape(name_a, a.shape, name_b, b.shape)
    return a, b


def l1_loss(input, target, reduction="mean"):
    r"""Mean absolute error, per sample the MEAN over the non-batch dims (as ``torch.nn.L1Loss``).

    .. math::
        L_b = \frac{1}{n}\sum_i \lvert x_{b,i} - y_{b,i} \rvert, \qquad
        L = \frac{1}{B}\sum_b L_b \ (\text{mean})

    Parameters
    ----------
    input : ndarray, shape [B, ...]
    target : ndarray, shape of ``input``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    ``'mean'`` is the mean over all elements.  Finite for finite inputs.
    """
    reduction = _checks.reduction(reduction, _ALL)
    x, y = _same_shape_pair("input", input, "target", target, reduction)
    return reduce_mean(np.abs(x - y), reduction)  # (GAN.16)


def l1_loss_backward(input, target, grad_output, reduction="mean"):
    r"""Gradient of :func:`l1_loss`, with the subgradient 0 where ``input == target``.

    .. math::
        \frac{\partial L}{\partial x_{b,i}} = \frac{w_b}{n}\operatorname{sign}(x_{b,i} - y_{b,i})
            = -\frac{\partial L}{\partial y_{b,i}}

    Parameters
    ----------
    input : ndarray, shape [B, ...]
    target : ndarray, shape of ``input``
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_input, grad_target) : tuple of ndarray

    Notes
    -----
    ``sign(0) = 0``: the kink gets the zero subgradient (as torch).
    """
    reduction = _checks.reduction(reduction, _ALL)
    x, y = _same_shape_pair("input", input, "target", target, reduction)
    grad = grad_mean(grad_output, reduction, x.shape) * np.sign(x - y)  # (GAN.16)
    return grad, -grad


def _pix2pix_inputs(fake_logits, generated, target, lambda_l1, reduction):
    lambda_l1 = _checks.finite("lambda_l1", lambda_l1)
    reduction = _checks.reduction(reduction, _ALL)
    lf = batch_array("fake_logits", fake_logits, reduction)
    gen, tgt = _same_shape_pair("generated", generated, "target", target, reduction)
    _checks.same_batch("fake_logits", lf.shape, "generated", gen.shape)
    return lf, gen, tgt, lambda_l1, reduction


def pix2pix_g_loss(fake_logits, generated, target, lambda_l1=100.0, reduction="mean"):
    r"""pix2pix generator loss: nonsaturating adversarial term plus weighted L1.

    .. math::
        L_b = \frac{1}{P}\sum_i \operatorname{softplus}(-l^f_{b,i})
            + \lambda_{L1}\,\frac{1}{n}\sum_j \lvert G(x)_{b,j} - y_{b,j} \rvert

    BOTH terms are per-sample MEANS: over the P logits of a sample (e.g. a 30x30
    PatchGAN map) and over its n image elements, as the pix2pix code computes them
    (BCE-with-logits and L1, each averaged): ``lambda_l1 = 100`` is calibrated on that
    balance (GAN.16).

    Parameters
    ----------
    fake_logits : ndarray, shape [B, ...]
        Discriminator logits on (input, generated) pairs.
    generated : ndarray, shape [B, ...]
        Generator output :math:`G(x)`.
    target : ndarray, shape of ``generated``
        Ground truth :math:`y`.
    lambda_l1 : float
        L1 weight (finite).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    Softplus form for the adversarial term: finite for any finite logit.
    """
    lf, gen, tgt, lambda_l1, reduction = _pix2pix_inputs(fake_logits, generated, target, lambda_l1, reduction)
    adversarial = reduce_mean(softplus(-lf), reduction)  # (GAN.7) nonsaturating, per-sample mean
    return result(adversarial + lambda_l1 * reduce_mean(np.abs(gen - tgt), reduction))  # (GAN.16)


def pix2pix_g_loss_backward(fake_logits, generated, target, grad_output, lambda_l1=100.0, reduction="mean"):
    r"""Gradient of :func:`pix2pix_g_loss`.

    .. math::
        \frac{\partial L}{\partial l^f} = -\frac{w}{P}\,\sigma(-l^f), \qquad
        \frac{\partial L}{\partial G(x)} = \frac{w\,\lambda_{L1}}{n}\operatorname{sign}(G(x) - y)
            = -\frac{\partial L}{\partial y}

    Parameters
    ----------
    fake_logits : ndarray, shape [B, ...]
    generated : ndarray, shape [B, ...]
    target : ndarray, shape of ``generated``
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    lambda_l1 : float
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_fake_logits, grad_generated, grad_target) : tuple of ndarray

    Notes
    -----
    Bounded sigmoid; zero subgradient where ``generated == target``.
    """
    lf, gen, tgt, lambda_l1, reduction = _pix2pix_inputs(fake_logits, generated, target, lambda_l1, reduction)
    grad_logits = grad_mean(grad_output, reduction, lf.shape) * -sigmoid(-lf)  # (GAN.4), (GAN.16)
    grad_generated = lambda_l1 * grad_mean(grad_output, reduction, gen.shape) * np.sign(gen - tgt)  # (GAN.16)
    return grad_logits, grad_generated, -grad_generated


def _cycle_inputs(real_a, rec_a, real_b, rec_b, lambda_cyc, reduction):
    lambda_cyc = _checks.finite("lambda_cyc", lambda_cyc)
    reduction = _checks.reduction(reduction, _TWO)
    real_a, rec_a = _same_shape_pair("real_a", real_a, "rec_a", rec_a, reduction)
    real_b, rec_b = _same_shape_pair("real_b", real_b, "rec_b", rec_b, reduction)
    return real_a, rec_a, real_b, rec_b, lambda_cyc, reduction


def cycle_consistency_loss(real_a, rec_a, real_b, rec_b, lambda_cyc=10.0, reduction="mean"):
    r"""CycleGAN cycle-consistency loss (L1, per sample the mean over non-batch dims).

    .. math::
        L = \lambda_{cyc}\Big(\mathbb{E}_a\,\tfrac{1}{n_a}\lVert F(G(a)) - a \rVert_1
                            + \mathbb{E}_b\,\tfrac{1}{n_b}\lVert G(F(b)) - b \rVert_1\Big)

    Parameters
    ----------
    real_a : ndarray, shape [B_a, ...]
    rec_a : ndarray, shape of ``real_a``
        Reconstruction :math:`F(G(a))`.
    real_b : ndarray, shape [B_b, ...]
    rec_b : ndarray, shape of ``real_b``
        Reconstruction :math:`G(F(b))`.
    lambda_cyc : float
        Weight (finite).
    reduction : {'mean', 'sum'}
        Each domain is reduced over its own batch, then the two are added.

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    Finite for finite inputs.
    """
    real_a, rec_a, real_b, rec_b, lambda_cyc, reduction = _cycle_inputs(
        real_a, rec_a, real_b, rec_b, lambda_cyc, reduction
    )
    # (GAN.16)
    return result(
        lambda_cyc
        * (reduce_mean(np.abs(rec_a - real_a), reduction) + reduce_mean(np.abs(rec_b - real_b), reduction))
    )


def cycle_consistency_loss_backward(
    real_a, rec_a, real_b, rec_b, grad_output, lambda_cyc=10.0, reduction="mean"
):
    r"""Gradient of :func:`cycle_consistency_loss`.

    .. math::
        \frac{\partial L}{\partial\,\mathrm{rec}_a} = \frac{w_a\,\lambda_{cyc}}{n_a}
            \operatorname{sign}(\mathrm{rec}_a - a) = -\frac{\partial L}{\partial a}

    and likewise for domain b.

    Parameters
    ----------
    real_a, rec_a : ndarray, shape [B_a, ...]
    real_b, rec_b : ndarray, shape [B_b, ...]
    grad_output : float or ndarray, shape []
    lambda_cyc : float
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_a, grad_rec_a, grad_real_b, grad_rec_b) : tuple of ndarray

    Notes
    -----
    Zero subgradient where a reconstruction equals its input.
    """
    real_a, rec_a, real_b, rec_b, lambda_cyc, reduction = _cycle_inputs(
        real_a, rec_a, real_b, rec_b, lambda_cyc, reduction
    )
    # (GAN.16)
    grad_rec_a = lambda_cyc * grad_mean(grad_output, reduction, rec_a.shape) * np.sign(rec_a - real_a)
    grad_rec_b = lambda_cyc * grad_mean(grad_output, reduction, rec_b.shape) * np.sign(rec_b - real_b)
    return -grad_rec_a, grad_rec_a, -grad_rec_b, grad_rec_b


# ============================================================================= spectral norm


def _spectral_inputs(W, u, n_iters, eps):
    W = as_float64("W", W)
    _checks.ndim("W", W.shape, 2)
    if W.size == 0:
        raise ValueError(f"W has no elements (shape {W.shape})")
    u = as_float64("u", u)
    if u.shape != (W.shape[0],):
        raise ValueError(f"u must have shape ({W.shape[0]},) (the rows of W), got {u.shape}")
    n_iters = _checks.positive_int("n_iters", n_iters)
    eps = _checks.positive("eps", eps)
    return W, u, n_iters, eps


def _normalize(x, eps):
    return x / max(float(np.linalg.norm(x)), eps)


def _power_iteration(W, u, n_iters, eps):
    for _ in range(n_iters):
        v = _normalize(W.T @ u, eps)  # (GAN.17)
        u = _normalize(W @ v, eps)
    return u, v


def spectral_norm_sigma(W, u, n_iters=1, eps=1e-12):
    r"""Power-iteration estimate of the largest singular value (spectral normalisation).

    .. math::
        v \leftarrow \frac{W^\top u}{\max(\lVert W^\top u\rVert, \epsilon)}, \quad
        u \leftarrow \frac{W v}{\max(\lVert W v\rVert, \epsilon)} \quad (\text{n\_iters times}), \qquad
        \sigma = u^\top W v

    Parameters
    ----------
    W : ndarray, shape [out, in]
        The weight (a conv weight reshaped to ``(out, -1)``, as torch does).
    u : ndarray, shape [out]
        The left vector carried over from the previous step.
    n_iters : int
        Power iterations, >= 1.
    eps : float
        Floor of the norms (> 0), as in ``torch.nn.functional.normalize``.

    Returns
    -------
    sigma : ndarray, shape []
        :math:`\sigma(W) \le \lVert W\rVert_2`; equal to it as the iteration converges.
    u : ndarray, shape [out]
    v : ndarray, shape [in]
        The updated vectors (to carry over, and for the backward).

    Notes
    -----
    The ``eps`` floor keeps a zero ``W`` or ``u`` finite (sigma = 0 then).
    """
    W, u, n_iters, eps = _spectral_inputs(W, u, n_iters, eps)
    u, v = _power_iteration(W, u, n_iters, eps)
    return result(u @ W @ v), u, v  # (GAN.17)


def spectral_norm_sigma_backward(W, u, grad_sigma, n_iters=1, eps=1e-12):
    r"""Gradient of :func:`spectral_norm_sigma` w.r.t. ``W``, with ``u`` and ``v`` held constant.

    .. math::
        \frac{\partial \sigma}{\partial W} = g\,u v^\top

    (``torch.nn.utils.spectral_norm`` treats the power-iteration vectors as
    constants; at convergence this is the exact gradient of :math:`\lVert W\rVert_2`.)

    Parameters
    ----------
    W : ndarray, shape [out, in]
    u : ndarray, shape [out]
        The vector passed to the forward (the iteration is re-run to get u, v).
    grad_sigma : float or ndarray, shape []
    n_iters : int
    eps : float

    Returns
    -------
    (grad_W,) : tuple of ndarray, shape [out, in]

    Notes
    -----
    u and v are unit vectors (or zero): the gradient is bounded by ``|grad_sigma|``.
    """
    W, u, n_iters, eps = _spectral_inputs(W, u, n_iters, eps)
    g = scalar_grad("grad_sigma", grad_sigma)
    u, v = _power_iteration(W, u, n_iters, eps)
    return (g * np.outer(u, v),)  # (GAN.17)


# ============================================================================= f-GAN


def _half_sech2(v):
    r"""d/dv tanh(v)/2 = sech(v)^2/2 = 2t/(1+t)^2 with t = e^{-2|v|} (no overflow)."""
    t = np.exp(-2.0 * np.abs(v))
    return 2.0 * t / (1.0 + t) ** 2


class FDivergence(NamedTuple):
    r"""One f-divergence of the f-GAN, as functions of the raw critic output v.

    ``activation`` is :math:`g_f(v)` (maps v into the domain of :math:`f^*`),
    ``conjugate`` is the composition :math:`f^*(g_f(v))` in closed form; ``*_grad``
    are their derivatives in v.
    """

    activation: Callable[[np.ndarray], np.ndarray]
    activation_grad: Callable[[np.ndarray], np.ndarray]
    conjugate: Callable[[np.ndarray], np.ndarray]
    conjugate_grad: Callable[[np.ndarray], np.ndarray]


# (GAN.18) Nowozin et al. 2016, Table 2 (conjugates f*) and Table 6 (activations g_f),
# composed in closed form:
F_DIVERGENCES: dict[str, FDivergence] = {
    # f*(t) = e^{t-1};  g = v  =>  f*(g) = e^{v-1}
    "kl": FDivergence(
        activation=lambda v: v,
        activation_grad=np.ones_like,
        conjugate=lambda v: np.exp(v - 1.0),
        conjugate_grad=lambda v: np.exp(v - 1.0),
    ),
    # f*(t) = -1 - log(-t);  g = -e^{-v}  =>  f*(g) = v - 1
    "reverse_kl": FDivergence(
        activation=lambda v: -np.exp(-v),
        activation_grad=lambda v: np.exp(-v),
        conjugate=lambda v: v - 1.0,
        conjugate_grad=np.ones_like,
    ),
    # f*(t) = t^2/4 + t;  g = v  =>  f*(g) = v^2/4 + v
    "pearson": FDivergence(
        activation=lambda v: v,
        activation_grad=np.ones_like,
        conjugate=lambda v: v**2 / 4.0 + v,
        conjugate_grad=lambda v: v / 2.0 + 1.0,
    ),
    # f*(t) = t/(1-t);  g = 1 - e^{-v}  =>  f*(g) = e^v - 1
    "squared_hellinger": FDivergence(
        activation=lambda v: -np.expm1(-v),
        activation_grad=lambda v: np.exp(-v),
        conjugate=np.expm1,
        conjugate_grad=np.exp,
    ),
    # f*(t) = -log(2 - e^t);  g = log 2 - softplus(-v)  =>  f*(g) = softplus(v) - log 2
    "jensen_shannon": FDivergence(
        activation=lambda v: _LOG2 + log_sigmoid(v),
        activation_grad=lambda v: sigmoid(-v),
        conjugate=lambda v: softplus(v) - _LOG2,
        conjugate_grad=sigmoid,
    ),
    # f*(t) = -log(1 - e^t);  g = -softplus(-v) = log sigmoid(v)  =>  f*(g) = softplus(v)
    "gan": FDivergence(
        activation=log_sigmoid,
        activation_grad=lambda v: sigmoid(-v),
        conjugate=softplus,
        conjugate_grad=sigmoid,
    ),
    # f*(t) = t on |t| <= 1/2;  g = tanh(v)/2  =>  f*(g) = tanh(v)/2
    "total_variation": FDivergence(
        activation=lambda v: np.tanh(v) / 2.0,
        activation_grad=_half_sech2,
        conjugate=lambda v: np.tanh(v) / 2.0,
        conjugate_grad=_half_sech2,
    ),
}


def _divergence(divergence):
    return F_DIVERGENCES[_checks.choice("divergence", divergence, tuple(F_DIVERGENCES))]


def fgan_d_loss(real_v, fake_v, divergence, reduction="mean"):
    r"""f-GAN critic loss: minus the variational lower bound on :math:`D_f(P\,\|\,Q)`.

    .. math::
        L_T = -\Big(\mathbb{E}_{x\sim P}\,g_f(V(x)) - \mathbb{E}_{x\sim Q}\,f^*\big(g_f(V(x))\big)\Big)

    Parameters
    ----------
    real_v : ndarray, shape [B_r, ...]
        Raw critic outputs :math:`V` on real samples (P).
    fake_v : ndarray, shape [B_f, ...]
        Raw critic outputs on generated samples (Q).
    divergence : str
        One of 'kl', 'reverse_kl', 'pearson', 'squared_hellinger', 'jensen_shannon',
        'gan', 'total_variation' (the keys of ``F_DIVERGENCES``).
    reduction : {'mean', 'sum'}

    Returns
    -------
    ndarray, shape []

    Notes
    -----
    :math:`g_f` and :math:`f^*\circ g_f` are evaluated in the closed forms of
    ``F_DIVERGENCES`` (softplus, expm1, tanh).  'pearson', 'jensen_shannon', 'gan'
    and 'total_variation' are finite for any finite v; 'kl', 'reverse_kl' and
    'squared_hellinger' contain :math:`e^{\pm v}` and overflow to ``inf`` (no NaN)
    once the exact value exceeds the float64 range (|v| > ~709).
    """
    div = _divergence(divergence)
    reduction = _checks.reduction(reduction, _TWO)
    vr = batch_array("real_v", real_v, reduction)
    vf = batch_array("fake_v", fake_v, reduction)
    with np.errstate(over="ignore"):  # exp overflow is the exact answer (inf), not an error
        # (GAN.18)
        return result(reduce_sum(-div.activation(vr), reduction) + reduce_sum(div.conjugate(vf), reduction))


def fgan_d_loss_backward(real_v, fake_v, grad_output, divergence, reduction="mean"):
    r"""Gradient of :func:`fgan_d_loss`.

    .. math::
        \frac{\partial L_T}{\partial V(x_r)} = -\frac{g}{B_r}\,g_f'(V), \qquad
        \frac{\partial L_T}{\partial V(x_f)} = \frac{g}{B_f}\,(f^*\circ g_f)'(V)

    Parameters
    ----------
    real_v : ndarray, shape [B_r, ...]
    fake_v : ndarray, shape [B_f, ...]
    grad_output : float or ndarray, shape []
    divergence : str
        As in :func:`fgan_d_loss`.
    reduction : {'mean', 'sum'}

    Returns
    -------
    (grad_real_v, grad_fake_v) : tuple of ndarray

    Notes
    -----
    The derivatives are closed forms too (sigmoids, :math:`\tfrac12\operatorname{sech}^2`
    via :math:`e^{-2|v|}`); exp-based ones overflow to ``inf`` as the forward does.
    """
    div = _divergence(divergence)
    reduction = _checks.reduction(reduction, _TWO)
    vr = batch_array("real_v", real_v, reduction)
    vf = batch_array("fake_v", fake_v, reduction)
    with np.errstate(over="ignore"):
        # (GAN.18)
        grad_real = grad_sum(grad_output, reduction, vr.shape) * -div.activation_grad(vr)
        grad_fake = grad_sum(grad_output, reduction, vf.shape) * div.conjugate_grad(vf)
    return grad_real, grad_fake


def fgan_g_loss(fake_v, divergence, mode="nonsaturating", reduction="mean"):
    r"""f-GAN generator loss.

    .. math::
        \text{minimax:}\quad L_G = -\mathbb{E}_{Q}\,f^*\big(g_f(V)\big), \qquad
        \text{nonsaturating:}\quad L_G = -\mathbb{E}_{Q}\,g_f(V)

    Parameters
    ----------
    fake_v : ndarray, shape [B, ...]
        Raw critic outputs on generated samples.
    divergence : str
        As in :func:`fgan_d_loss`.
    mode : {'nonsaturating', 'minimax'}
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    As :func:`fgan_d_loss`: exp-based divergences overflow to ``inf`` for |v| > ~709.
    """
    div = _divergence(divergence)
    mode = _checks.choice("mode", mode, _GENERATOR_MODES)
    reduction = _checks.reduction(reduction, _ALL)
    vf = batch_array("fake_v", fake_v, reduction)
    with np.errstate(over="ignore"):
        # (GAN.18)
        elementwise = -div.activation(vf) if mode == "nonsaturating" else -div.conjugate(vf)
    return reduce_sum(elementwise, reduction)


def fgan_g_loss_backward(fake_v, grad_output, divergence, mode="nonsaturating", reduction="mean"):
    r"""Gradient of :func:`fgan_g_loss`.

    .. math::
        \text{minimax:}\ \frac{\partial L_G}{\partial V} = -w\,(f^*\circ g_f)'(V), \qquad
        \text{nonsaturating:}\ \frac{\partial L_G}{\partial V} = -w\,g_f'(V)

    Parameters
    ----------
    fake_v : ndarray, shape [B, ...]
    grad_output : float or ndarray, shape [] or [B] for ``'none'``
    divergence : str
    mode : {'nonsaturating', 'minimax'}
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    (grad_fake_v,) : tuple of ndarray

    Notes
    -----
    Closed-form derivatives; exp-based ones overflow to ``inf`` as the forward does.
    """
    div = _divergence(divergence)
    mode = _checks.choice("mode", mode, _GENERATOR_MODES)
    reduction = _checks.reduction(reduction, _ALL)
    vf = batch_array("fake_v", fake_v, reduction)
    with np.errstate(over="ignore"):
        # (GAN.18)
        local = -div.activation_grad(vf) if mode == "nonsaturating" else -div.conjugate_grad(vf)
    return (grad_sum(grad_output, reduction, vf.shape) * local,)
