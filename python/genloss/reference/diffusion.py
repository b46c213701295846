r"""Diffusion family, NumPy reference (float64): schedules, the bound's terms and the training losses.

Read next to ``derivations/diffusion.md``; the tags ``(DIF.n)`` in the comments name its
equations.  Conventions:

* A :class:`DiffusionSchedule` is built from ``betas`` (shape ``[T]``, every entry in
  (0, 1]).  Timesteps ``t`` are per-sample integers (int64, int32 accepted), shape
  ``[B]``, values in ``[0, T)``, **0-based as in DDPM's and improved-diffusion's code**:
  index ``t`` of every schedule array is the paper's step ``t + 1``, and
  ``q_sample(x0, t, ...)`` draws the paper's :math:`x_{t+1}`.  ``vlb_term`` at index
  ``t > 0`` is the paper's :math:`L_t` and at index 0 the decoder term :math:`L_0`.
* Products of many :math:`\alpha` are formed in log space:
  :math:`\log\bar\alpha_t = \sum_{s\le t}\operatorname{log1p}(-\beta_s)` and
  :math:`1-\bar\alpha_t = -\operatorname{expm1}(\log\bar\alpha_t)`, so
  :math:`1-\bar\alpha_0 = \beta_0` to an ulp and the log-SNR is finite wherever
  :math:`\bar\alpha > 0`.
* Batch is dim 0.  The MSE losses (``eps_mse_loss``, ``diffusion_mse_loss``) take the
  MEAN over the non-batch dims per sample (L_simple); the bound terms (``vlb_term``,
  ``prior_kl``) and the VDM losses are SUMS over them, in nats.  ``reduction`` =
  ``'mean'`` | ``'sum'`` | ``'none'`` then acts on the batch; the bound terms default to
  ``'none'`` (per-sample terms that are summed over t).
* ``name(...)`` returns float64 ndarrays; ``name_backward(*arrays, grad_output, **kw)``
  returns a tuple with the gradient of ``sum(grad_output * name(...))`` w.r.t. each
  differentiable array input, in order.  Non-array inputs (the schedule, the choice of
  parameterisation) follow ``grad_output``, as in ``fgan_d_loss_backward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .. import _checks
from ._common import (
    as_float64,
    batch_array,
    batch_broadcast,
    grad_mean,
    grad_sum,
    labels_array,
    log_diff_ndtr,
    log_diff_ndtr_grad,
    log_ndtr,  # noqa: F401  (re-exported for the derivation table, DIF.10)
    log_ndtr_grad,
    log_sigmoid,
    reduce_mean,
    reduce_sum,
    result,
    sigmoid,
    softplus,
    sum_to_shape,
)
from .vae import normal_kl, normal_kl_backward

__all__ = [
    "PREDICTIONS",
    "SNR_WEIGHTINGS",
    "DiffusionSchedule",
    "cosine_betas",
    "diffusion_mse_loss",
    "diffusion_mse_loss_backward",
    "discretized_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood_backward",
    "eps_mse_loss",
    "eps_mse_loss_backward",
    "full_bound",
    "linear_betas",
    "low_discrepancy_times",
    "posterior_mean_from_eps",
    "posterior_mean_from_eps_backward",
    "predict_x0_from_eps",
    "predict_x0_from_eps_backward",
    "prior_kl",
    "prior_kl_backward",
    "q_posterior",
    "q_posterior_backward",
    "q_sample",
    "q_sample_backward",
    "snr_weights",
    "to_bits_per_dim",
    "to_bits_per_dim_backward",
    "v_target",
    "v_target_backward",
    "vdm_continuous_loss",
    "vdm_continuous_loss_backward",
    "vdm_discrete_loss",
    "vdm_discrete_loss_backward",
    "vlb_term",
    "vlb_term_backward",
]

_ALL = _checks.REDUCTIONS  # 'mean', 'sum', 'none'
PREDICTIONS = ("eps", "x0", "v")
SNR_WEIGHTINGS = ("min_snr", "soft_min_snr", "snr", "truncated_snr")
_CDFS = ("exact", "tanh")
_LOG2 = math.log(2.0)
_TANH_C = math.sqrt(2.0 / math.pi)  # improved-diffusion's approx_standard_normal_cdf constants
_TANH_K = 0.044715
_TANH_CLAMP = 1e-12


# ============================================================================= schedules


def _unit_beta(name, value):
    v = _checks.finite(name, value)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {v}")
    return v


def linear_betas(T, beta_start=1e-4, beta_end=0.02):
    r"""DDPM's linear schedule: ``T`` betas evenly spaced from ``beta_start`` to ``beta_end`` (DIF.1).

    .. math::
        \beta_t = \beta_{\text{start}} + \frac{t}{T-1}(\beta_{\text{end}} - \beta_{\text{start}}),
        \qquad t = 0, \dots, T-1

    Parameters
    ----------
    T : int
        Number of steps (>= 1).
    beta_start, beta_end : float
        In (0, 1].  Ho et al. (2020) use 1e-4 and 0.02 with T = 1000; improved-diffusion
        rescales both by 1000 / T for other T (pass the scaled values to get its schedule).

    Returns
    -------
    ndarray, shape [T]
    """
    T = _checks.positive_int("T", T)
    beta_start = _unit_beta("beta_start", beta_start)
    beta_end = _unit_beta("beta_end", beta_end)
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)  # (DIF.1)


def cosine_betas(T, s=0.008, max_beta=0.999):
    r"""The cosine schedule of Nichol & Dhariwal (2021), betas clipped at ``max_beta`` (DIF.1).

    .. math::
        f(u) = \cos^2\Big(\frac{u + s}{1 + s}\cdot\frac{\pi}{2}\Big), \qquad
        \beta_t = \min\Big(1 - \frac{f((t+1)/T)}{f(t/T)},\ \beta_{\max}\Big)
               = \min\Big(\frac{\sin(b - a)\,\sin(b + a)}{\cos^2 a},\ \beta_{\max}\Big)

    with :math:`a, b` the cosine's arguments at :math:`t/T` and :math:`(t+1)/T`, so that
    :math:`\bar\alpha_t = f((t+1)/T)/f(0)` wherever no clip is active.

    Parameters
    ----------
    T : int
        Number of steps (>= 1).
    s : float
        Offset (>= 0) that keeps :math:`\beta_0` from being vanishingly small.
    max_beta : float
        Clip in (0, 1].  The last unclipped beta is exactly 1 (:math:`f(1) = 0`), so
        ``max_beta=1`` gives zero terminal SNR.

    Returns
    -------
    ndarray, shape [T]

    Notes
    -----
    :math:`\cos^2 a - \cos^2 b = \sin(b-a)\sin(b+a)` removes the cancellation of
    :math:`1 - f_{t+1}/f_t` at small t (there :math:`\beta_0 \approx 4\cdot10^{-5}` at
    T = 1000 would lose 5 digits); the result agrees with the direct form to its rounding.
    """
    T = _checks.positive_int("T", T)
    s = _checks.nonnegative("s", s)
    max_beta = _unit_beta("max_beta", max_beta)
    u = np.arange(T + 1, dtype=np.float64) / T
    angle = (u + s) / (1.0 + s) * (math.pi / 2.0)
    a, b = angle[:-1], angle[1:]
    betas = np.sin(b - a) * np.sin(b + a) / np.cos(a) ** 2  # (DIF.1) 1 - f(t+1)/f(t) without cancellation
    betas[-1] = 1.0  # f(1) = cos^2(pi/2) = 0 exactly; the rounded pi/2 would leave 1 - 1e-16
    return np.minimum(betas, max_beta)


class DiffusionSchedule:
    r"""The per-step quantities of a Gaussian diffusion, derived from ``betas`` (DIF.1-DIF.3, DIF.15).

    Every attribute is a read-only float64 array of shape ``[T]`` indexed by the 0-based
    timestep t (the paper's step t + 1):

    ================================  =====================================================
    ``betas``, ``alphas``             :math:`\beta_t`, :math:`\alpha_t = 1-\beta_t`
    ``log_alpha_bar``                 :math:`\log\bar\alpha_t = \sum_{s\le t}\operatorname{log1p}(-\beta_s)`
    ``alpha_bar``                     :math:`\bar\alpha_t = \prod_{s\le t}\alpha_s`
    ``one_minus_alpha_bar``           :math:`1-\bar\alpha_t = -\operatorname{expm1}(\log\bar\alpha_t)`
    ``alpha_bar_prev``                :math:`\bar\alpha_{t-1}`, with :math:`\bar\alpha_{-1} = 1`
    ``sqrt_alpha_bar``                :math:`\sqrt{\bar\alpha_t}`
    ``sqrt_one_minus_alpha_bar``      :math:`\sqrt{1-\bar\alpha_t}`
    ``posterior_variance``            :math:`\tilde\beta_t = \beta_t(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)` (0 at t = 0)
    ``posterior_log_variance_clipped`` :math:`\log\tilde\beta_t`, with t = 0 replaced by t = 1
    ``posterior_mean_coef1``          :math:`\beta_t\sqrt{\bar\alpha_{t-1}}/(1-\bar\alpha_t)` (multiplies x0)
    ``posterior_mean_coef2``          :math:`(1-\bar\alpha_{t-1})\sqrt{\alpha_t}/(1-\bar\alpha_t)` (multiplies x_t)
    ``log_snr``                       :math:`\lambda_t = \log\bar\alpha_t - \log(1-\bar\alpha_t)` (``-inf`` where :math:`\bar\alpha = 0`)
    ``snr``                           :math:`e^{\lambda_t} = \bar\alpha_t/(1-\bar\alpha_t)`
    ================================  =====================================================

    Parameters
    ----------
    betas : array_like, shape [T]
        1-D, finite, every entry in (0, 1], T >= 2 (the clipped posterior log-variance
        needs a step 1).  A beta of exactly 1 gives zero terminal SNR
        (:math:`\bar\alpha = 0` from that step on).
    """

    _ARRAYS = (
        "betas",
        "alphas",
        "log_alpha_bar",
        "alpha_bar",
        "one_minus_alpha_bar",
        "alpha_bar_prev",
        "sqrt_alpha_bar",
        "sqrt_one_minus_alpha_bar",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "log_snr",
        "snr",
    )

    def __init__(self, betas):
        with _checks.named_errors("DiffusionSchedule"):  # the messages say which constructor
            b = as_float64("betas", betas)
            if b.ndim != 1:
                raise ValueError(f"betas must be 1-D (one beta per step), got shape {b.shape}")
            if b.shape[0] < 2:
                raise ValueError(f"betas must have at least 2 steps, got {b.shape[0]}")
            if not np.all(np.isfinite(b)):
                raise ValueError("betas must be finite")
            if not np.all((b > 0.0) & (b <= 1.0)):
                raise ValueError(f"betas must lie in (0, 1], got values in [{b.min()}, {b.max()}]")
        b = b.copy()
        self.num_timesteps = int(b.shape[0])
        self.betas = b
        self.alphas = 1.0 - b
        with np.errstate(divide="ignore"):  # log1p(-1) = -inf: zero terminal SNR
            self.log_alpha_bar = np.cumsum(np.log1p(-b))  # (DIF.2)
        self.alpha_bar = np.exp(self.log_alpha_bar)
        self.one_minus_alpha_bar = -np.expm1(self.log_alpha_bar)  # (DIF.2) = beta_0 exactly at t = 0
        self.alpha_bar_prev = np.concatenate([[1.0], self.alpha_bar[:-1]])
        one_minus_prev = np.concatenate([[0.0], self.one_minus_alpha_bar[:-1]])
        self.sqrt_alpha_bar = np.sqrt(self.alpha_bar)
        self.sqrt_one_minus_alpha_bar = np.sqrt(self.one_minus_alpha_bar)
        # (DIF.3) the posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = b * one_minus_prev / self.one_minus_alpha_bar
        # its log as a sum of logs (finite even where the product underflows), t = 0 replaced by t = 1
        log_tilde = np.log(b[1:]) + np.log(one_minus_prev[1:]) - np.log(self.one_minus_alpha_bar[1:])
        self.posterior_log_variance_clipped = np.concatenate([log_tilde[:1], log_tilde])
        self.posterior_mean_coef1 = b * np.sqrt(self.alpha_bar_prev) / self.one_minus_alpha_bar
        self.posterior_mean_coef2 = one_minus_prev * np.sqrt(self.alphas) / self.one_minus_alpha_bar
        # (DIF.15) log-SNR from the two logs: finite wherever alpha_bar > 0, -inf at zero SNR
        self.log_snr = self.log_alpha_bar - np.log(self.one_minus_alpha_bar)
        with np.errstate(over="ignore"):  # e^lambda > 1.8e308 only for beta_0 < 1e-308: snr = inf
            self.snr = np.exp(self.log_snr)
        for name in self._ARRAYS:
            getattr(self, name).setflags(write=False)
        # a Python float made here, at construction: the torch layer passes it to prior_kl's op,
        # and under torch.compile a float derived from the arrays inside the traced region would
        # be an unbacked SymFloat, which the op's float argument refuses
        self.alpha_bar_T = float(self.alpha_bar[-1])

    def __len__(self):
        return self.num_timesteps

    def __repr__(self):
        b = self.betas
        return f"DiffusionSchedule(T={self.num_timesteps}, betas in [{b.min():.3g}, {b.max():.3g}])"


# ============================================================================= argument checks


def _schedule(schedule):
    """A DiffusionSchedule, or the torch layer's (its float64 ``reference``): each layer takes either."""
    ref = getattr(schedule, "reference", schedule)
    if not isinstance(ref, DiffusionSchedule):
        kind = type(schedule)
        raise TypeError(f"schedule must be a DiffusionSchedule, got {kind.__module__}.{kind.__qualname__}")
    return ref


def _timesteps(t, batch, schedule):
    return labels_array("t", t, batch, schedule.num_timesteps)


def _arrays(names, values, reduction="none"):
    """Batched float64 arrays of one shape (batch first, not empty)."""
    out: list[np.ndarray] = []
    for name, v in zip(names, values, strict=True):
        a = batch_array(name, v, reduction)
        if out:
            _checks.same_shape(names[0], out[0].shape, name, a.shape)
        out.append(a)
    return out


def _per_sample_vector(name, value, batch):
    """A finite float vector of shape (B,)."""
    a = as_float64(name, value)
    if a.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one value per sample), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _sample_weights(weights, batch):
    if weights is None:
        return np.ones(batch)
    w = _per_sample_vector("weights", weights, batch)
    if np.any(w < 0):
        raise ValueError(f"weights must be >= 0, got min {w.min()}")
    return w


def _at(values, t, ndim):
    """A schedule array gathered per sample and shaped (B, 1, ..., 1) against an ndim-D input."""
    return batch_broadcast(values[t], ndim)


def _require_signal(schedule, t, attr, what):
    """The eps parameterisation divides by sqrt(alpha_bar_t) or sqrt(alpha_t): refuse where it is 0."""
    bad = getattr(schedule, attr)[t] == 0.0
    if np.any(bad):
        raise ValueError(
            f"t hits step {int(t[bad][0])} where {attr} = 0 (zero terminal SNR): {what} is not "
            "determined by eps there; predict v or x0 instead"
        )


# ============================================================================= forward process


def _q_sample_inputs(x0, t, noise, schedule):
    schedule = _schedule(schedule)
    x0, noise = _arrays(("x0", "noise"), (x0, noise))
    t = _timesteps(t, x0.shape[0], schedule)
    return x0, t, noise, schedule


def q_sample(x0, t, noise, schedule):
    r"""A draw of :math:`x_t \sim q(x_t \mid x_0)` from given noise (DIF.2).

    .. math::
        x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon

    Parameters
    ----------
    x0 : ndarray, shape [B, ...]
    t : int ndarray, shape [B]
        0-based timesteps in [0, T).
    noise : ndarray, shape of ``x0``
        :math:`\epsilon`, standard normal.
    schedule : DiffusionSchedule

    Returns
    -------
    ndarray, shape of ``x0``
    """
    x0, t, noise, schedule = _q_sample_inputs(x0, t, noise, schedule)
    a = _at(schedule.sqrt_alpha_bar, t, x0.ndim)
    s = _at(schedule.sqrt_one_minus_alpha_bar, t, x0.ndim)
    return result(a * x0 + s * noise)  # (DIF.2)


def q_sample_backward(x0, t, noise, grad_output, schedule):
    r"""Gradient of :func:`q_sample`: :math:`(\sqrt{\bar\alpha_t}\,g,\ \sqrt{1-\bar\alpha_t}\,g)`.

    Returns
    -------
    (grad_x0, grad_noise) : tuple of ndarray
    """
    x0, t, noise, schedule = _q_sample_inputs(x0, t, noise, schedule)
    g = _elementwise_grad(grad_output, x0.shape)
    return (
        g * _at(schedule.sqrt_alpha_bar, t, x0.ndim),  # (DIF.2)
        g * _at(schedule.sqrt_one_minus_alpha_bar, t, x0.ndim),
    )


def _elementwise_grad(grad_output, shape):
    g = as_float64("grad_output", grad_output)
    if g.shape != tuple(shape):
        raise ValueError(f"grad_output must have the output's shape {tuple(shape)}, got {g.shape}")
    return g


def _q_posterior_inputs(x0, x_t, t, schedule):
    schedule = _schedule(schedule)
    x0, x_t = _arrays(("x0", "x_t"), (x0, x_t))
    t = _timesteps(t, x0.shape[0], schedule)
    return x0, x_t, t, schedule


def q_posterior(x0, x_t, t, schedule):
    r"""Mean, variance and log-variance of the forward posterior :math:`q(x_{t-1} \mid x_t, x_0)` (DIF.3).

    .. math::
        \tilde\mu_t = \frac{\beta_t\sqrt{\bar\alpha_{t-1}}}{1-\bar\alpha_t}\,x_0
                    + \frac{(1-\bar\alpha_{t-1})\sqrt{\alpha_t}}{1-\bar\alpha_t}\,x_t, \qquad
        \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\,\beta_t

    Parameters
    ----------
    x0, x_t : ndarray, shape [B, ...]
    t : int ndarray, shape [B]
    schedule : DiffusionSchedule

    Returns
    -------
    (mean, variance, log_variance) : tuple of ndarray, each of the shape of ``x0``
        ``variance`` is :math:`\tilde\beta_t` (0 at t = 0, where the posterior is the point
        mass at x0); ``log_variance`` is ``posterior_log_variance_clipped`` (finite at t = 0).
    """
    x0, x_t, t, schedule = _q_posterior_inputs(x0, x_t, t, schedule)
    n = x0.ndim
    mean = _at(schedule.posterior_mean_coef1, t, n) * x0 + _at(schedule.posterior_mean_coef2, t, n) * x_t
    variance = np.broadcast_to(_at(schedule.posterior_variance, t, n), x0.shape).copy()
    log_variance = np.broadcast_to(_at(schedule.posterior_log_variance_clipped, t, n), x0.shape).copy()
    return result(mean), variance, log_variance  # (DIF.3)


def q_posterior_backward(x0, x_t, t, grad_output, schedule):
    r"""Gradient of the posterior MEAN of :func:`q_posterior` w.r.t. x0 and x_t.

    The variance and log-variance do not depend on the inputs, so ``grad_output`` is the
    upstream gradient of the mean (shape of ``x0``).

    Returns
    -------
    (grad_x0, grad_x_t) : tuple of ndarray
        :math:`(c_1 g,\ c_2 g)` with the two posterior mean coefficients.
    """
    x0, x_t, t, schedule = _q_posterior_inputs(x0, x_t, t, schedule)
    g = _elementwise_grad(grad_output, x0.shape)
    n = x0.ndim
    return g * _at(schedule.posterior_mean_coef1, t, n), g * _at(schedule.posterior_mean_coef2, t, n)


# ============================================================================= eps and v parameterisations


def _eps_inputs(x_t, t, eps, schedule):
    schedule = _schedule(schedule)
    x_t, eps = _arrays(("x_t", "eps"), (x_t, eps))
    t = _timesteps(t, x_t.shape[0], schedule)
    return x_t, t, eps, schedule


def _x0_coefs(schedule, t, ndim):
    """(1/sqrt(abar_t), sqrt(1-abar_t)/sqrt(abar_t)) per sample."""
    _require_signal(schedule, t, "alpha_bar", "x0")
    ra = 1.0 / _at(schedule.sqrt_alpha_bar, t, ndim)
    return ra, _at(schedule.sqrt_one_minus_alpha_bar, t, ndim) * ra


def predict_x0_from_eps(x_t, t, eps, schedule):
    r"""The x0 that the noise ``eps`` implies for ``x_t``: :math:`q`'s marginal solved for x0 (DIF.7).

    .. math::
        \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\epsilon}{\sqrt{\bar\alpha_t}}

    Parameters
    ----------
    x_t, eps : ndarray, shape [B, ...]
    t : int ndarray, shape [B]
    schedule : DiffusionSchedule

    Returns
    -------
    ndarray, shape of ``x_t``

    Notes
    -----
    Singular where :math:`\bar\alpha_t = 0` (zero terminal SNR): a ``ValueError`` there.
    """
    x_t, t, eps, schedule = _eps_inputs(x_t, t, eps, schedule)
    ra, c = _x0_coefs(schedule, t, x_t.ndim)
    return result(ra * x_t - c * eps)  # (DIF.7)


def predict_x0_from_eps_backward(x_t, t, eps, grad_output, schedule):
    r"""Gradient of :func:`predict_x0_from_eps`: :math:`(g/\sqrt{\bar\alpha_t},\ -g\sqrt{1-\bar\alpha_t}/\sqrt{\bar\alpha_t})`.

    Returns
    -------
    (grad_x_t, grad_eps) : tuple of ndarray
    """
    x_t, t, eps, schedule = _eps_inputs(x_t, t, eps, schedule)
    g = _elementwise_grad(grad_output, x_t.shape)
    ra, c = _x0_coefs(schedule, t, x_t.ndim)
    return g * ra, -g * c  # (DIF.7)


def _mean_coefs(schedule, t, ndim):
    """(1/sqrt(alpha_t), beta_t / (sqrt(1-abar_t) sqrt(alpha_t))) per sample."""
    _require_signal(schedule, t, "alphas", "the posterior mean")
    ra = 1.0 / np.sqrt(_at(schedule.alphas, t, ndim))
    return ra, _at(schedule.betas, t, ndim) / _at(schedule.sqrt_one_minus_alpha_bar, t, ndim) * ra


def posterior_mean_from_eps(x_t, t, eps, schedule):
    r"""The reverse model's mean in the eps parameterisation (DIF.7).

    .. math::
        \mu_\theta(x_t, t) = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\epsilon\Big)
            = \tilde\mu_t\big(\hat x_0(x_t, \epsilon), x_t\big)

    With the true noise it is the posterior mean :math:`\tilde\mu_t(x_0, x_t)`.

    Parameters
    ----------
    x_t, eps : ndarray, shape [B, ...]
    t : int ndarray, shape [B]
    schedule : DiffusionSchedule

    Returns
    -------
    ndarray, shape of ``x_t``

    Notes
    -----
    Singular where :math:`\alpha_t = 0` (a beta of 1): a ``ValueError`` there.
    """
    x_t, t, eps, schedule = _eps_inputs(x_t, t, eps, schedule)
    ra, c = _mean_coefs(schedule, t, x_t.ndim)
    return result(ra * x_t - c * eps)  # (DIF.7)


def posterior_mean_from_eps_backward(x_t, t, eps, grad_output, schedule):
    r"""Gradient of :func:`posterior_mean_from_eps`:
    :math:`(g/\sqrt{\alpha_t},\ -g\,\beta_t/(\sqrt{1-\bar\alpha_t}\sqrt{\alpha_t}))`.

    Returns
    -------
    (grad_x_t, grad_eps) : tuple of ndarray
    """
    x_t, t, eps, schedule = _eps_inputs(x_t, t, eps, schedule)
    g = _elementwise_grad(grad_output, x_t.shape)
    ra, c = _mean_coefs(schedule, t, x_t.ndim)
    return g * ra, -g * c  # (DIF.7)


def v_target(x0, t, noise, schedule):
    r"""The v-prediction target of Salimans & Ho (2022) (DIF.14).

    .. math::
        v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0

    Parameters
    ----------
    x0, noise : ndarray, shape [B, ...]
    t : int ndarray, shape [B]
    schedule : DiffusionSchedule

    Returns
    -------
    ndarray, shape of ``x0``
    """
    x0, t, noise, schedule = _q_sample_inputs(x0, t, noise, schedule)
    a = _at(schedule.sqrt_alpha_bar, t, x0.ndim)
    s = _at(schedule.sqrt_one_minus_alpha_bar, t, x0.ndim)
    return result(a * noise - s * x0)  # (DIF.14)


def v_target_backward(x0, t, noise, grad_output, schedule):
    r"""Gradient of :func:`v_target`: :math:`(-\sqrt{1-\bar\alpha_t}\,g,\ \sqrt{\bar\alpha_t}\,g)`.

    Returns
    -------
    (grad_x0, grad_noise) : tuple of ndarray
    """
    x0, t, noise, schedule = _q_sample_inputs(x0, t, noise, schedule)
    g = _elementwise_grad(grad_output, x0.shape)
    return (
        -g * _at(schedule.sqrt_one_minus_alpha_bar, t, x0.ndim),  # (DIF.14)
        g * _at(schedule.sqrt_alpha_bar, t, x0.ndim),
    )


# ============================================================================= MSE training losses


def _eps_mse_inputs(eps_pred, eps, weights, reduction):
    reduction = _checks.reduction(reduction, _ALL)
    eps_pred, eps = _arrays(("eps_pred", "eps"), (eps_pred, eps), reduction)
    return eps_pred, eps, _sample_weights(weights, eps_pred.shape[0]), reduction


def eps_mse_loss(eps_pred, eps, weights=None, reduction="mean"):
    r"""The simplified loss :math:`L_{\text{simple}}` of Ho et al. (2020): per-sample MSE of the noise (DIF.12).

    .. math::
        L_b = w_b\,\frac{1}{n}\sum_i (\epsilon_{b,i} - \hat\epsilon_{b,i})^2

    Parameters
    ----------
    eps_pred : ndarray, shape [B, ...]
        The model's noise prediction.
    eps : ndarray, shape of ``eps_pred``
        The noise that made :math:`x_t`.
    weights : ndarray, shape [B], optional
        Per-sample weights >= 0 (e.g. :func:`snr_weights`); 1 when omitted.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    The MEAN over the n non-batch elements (as practice has it), not the sum the bound
    terms use.
    """
    eps_pred, eps, w, reduction = _eps_mse_inputs(eps_pred, eps, weights, reduction)
    sq = batch_broadcast(w, eps.ndim) * (eps - eps_pred) ** 2
    return reduce_mean(sq, reduction)  # (DIF.12)


def eps_mse_loss_backward(eps_pred, eps, grad_output, weights=None, reduction="mean"):
    r"""Gradient of :func:`eps_mse_loss`: :math:`\pm 2 w_b g_b(\hat\epsilon - \epsilon)/n`.

    With ``weights`` given, also :math:`\partial L/\partial w_b = g_b\,\mathrm{mean}_i(\epsilon - \hat\epsilon)^2`
    (learned loss weights train).

    Returns
    -------
    (grad_eps_pred, grad_eps) or (grad_eps_pred, grad_eps, grad_weights) : tuple of ndarray
        The third entry exactly when ``weights`` is given.
    """
    given = weights is not None
    eps_pred, eps, w, reduction = _eps_mse_inputs(eps_pred, eps, weights, reduction)
    g0 = grad_mean(grad_output, reduction, eps.shape)
    grad = 2.0 * g0 * batch_broadcast(w, eps.ndim) * (eps_pred - eps)  # (DIF.12)
    if not given:
        return grad, -grad
    return grad, -grad, _weights_grad(g0, eps - eps_pred)


def _weights_grad(g0, residual):
    """d/dw_b of sum_b w_b * (per-element scale g0) * residual^2: the unweighted per-sample term."""
    return (g0 * residual**2).reshape(residual.shape[0], -1).sum(axis=1)  # (DIF.12)


def _mse_target_coefs(t, schedule, prediction, ndim):
    """(c_x0, c_noise), per sample: the target is c_x0 * x0 + c_noise * noise (DIF.14)."""
    if prediction == "eps":
        return 0.0, 1.0
    if prediction == "x0":
        return 1.0, 0.0
    return -_at(schedule.sqrt_one_minus_alpha_bar, t, ndim), _at(schedule.sqrt_alpha_bar, t, ndim)


def _mse_target(x0, noise, t, schedule, prediction):
    if prediction == "eps":  # exactly noise (an inf in x0, which does not enter, stays out)
        return noise
    if prediction == "x0":
        return x0
    c_x0, c_noise = _mse_target_coefs(t, schedule, prediction, x0.ndim)
    return c_noise * noise + c_x0 * x0  # (DIF.14) v


def _diffusion_mse_inputs(pred, x0, noise, t, schedule, prediction, weights, reduction):
    reduction = _checks.reduction(reduction, _ALL)
    prediction = _checks.choice("prediction", prediction, PREDICTIONS)
    schedule = _schedule(schedule)
    pred, x0, noise = _arrays(("pred", "x0", "noise"), (pred, x0, noise), reduction)
    t = _timesteps(t, pred.shape[0], schedule)
    w = _sample_weights(weights, pred.shape[0])
    return pred, _mse_target(x0, noise, t, schedule, prediction), w, reduction


def diffusion_mse_loss(pred, x0, noise, t, schedule, prediction="eps", weights=None, reduction="mean"):
    r"""Training loss for any of the three parameterisations: per-sample weighted MSE to the target (DIF.12, DIF.14).

    .. math::
        L_b = w_b\,\frac{1}{n}\sum_i (y_{b,i} - \hat y_{b,i})^2, \qquad
        y = \epsilon \ (\texttt{'eps'}),\quad x_0 \ (\texttt{'x0'}),\quad
        \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0 \ (\texttt{'v'})

    Parameters
    ----------
    pred : ndarray, shape [B, ...]
        The model output.
    x0, noise : ndarray, shape of ``pred``
        The clean sample and the noise that made :math:`x_t` (see :func:`q_sample`).
    t : int ndarray, shape [B]
    schedule : DiffusionSchedule
    prediction : {'eps', 'x0', 'v'}
    weights : ndarray, shape [B], optional
        Per-sample weights >= 0 (e.g. :func:`snr_weights` for the same ``prediction``).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    pred, target, w, reduction = _diffusion_mse_inputs(
        pred, x0, noise, t, schedule, prediction, weights, reduction
    )
    return reduce_mean(batch_broadcast(w, pred.ndim) * (target - pred) ** 2, reduction)  # (DIF.12)


def diffusion_mse_loss_backward(
    pred, x0, noise, t, grad_output, schedule, prediction="eps", weights=None, reduction="mean"
):
    r"""Gradient of :func:`diffusion_mse_loss` w.r.t. ``pred``, ``x0``, ``noise`` (and ``weights``).

    .. math::
        \frac{\partial L}{\partial \hat y} = \frac{2 w_b g_b}{n}(\hat y - y), \qquad
        \frac{\partial L}{\partial x_0} = -c_{x_0}\frac{\partial L}{\partial \hat y}, \quad
        \frac{\partial L}{\partial \epsilon} = -c_{\epsilon}\frac{\partial L}{\partial \hat y}, \quad
        \frac{\partial L}{\partial w_b} = \frac{g_b}{n}\sum_i (y_{b,i} - \hat y_{b,i})^2

    with the target :math:`y = c_{x_0} x_0 + c_\epsilon\epsilon` of the parameterisation
    ((0, 1) for eps, (1, 0) for x0, :math:`(-\sqrt{1-\bar\alpha_t}, \sqrt{\bar\alpha_t})` for v;
    DIF.14): a jointly trained encoder (through x0) and learned loss weights train.

    Returns
    -------
    (grad_pred, grad_x0, grad_noise) or (..., grad_weights) : tuple of ndarray
        The fourth entry exactly when ``weights`` is given.
    """
    given = weights is not None
    pred, target, w, reduction = _diffusion_mse_inputs(
        pred, x0, noise, t, schedule, prediction, weights, reduction
    )
    g0 = grad_mean(grad_output, reduction, pred.shape)
    grad_pred = 2.0 * g0 * batch_broadcast(w, pred.ndim) * (pred - target)  # (DIF.12)
    c_x0, c_noise = _mse_target_coefs(np.asarray(t), _schedule(schedule), prediction, pred.ndim)
    grads = (grad_pred, -c_x0 * grad_pred, -c_noise * grad_pred)  # (DIF.14) through the target
    if not given:
        return grads
    return (*grads, _weights_grad(g0, target - pred))


# ============================================================================= SNR weights


def _log_weight(lam, log_gamma, kind, prediction):
    r"""log of the per-sample weight, as a function of lambda = log SNR only (DIF.15).

    Each kind is a weight w(snr) on the x0-MSE, given here as log w; dividing by snr
    (eps) or by snr + 1 (v) converts it to the same loss on the other targets (DIF.14).
    Every branch is simplified so that lambda = +-inf gives no inf - inf.
    """
    if prediction == "x0":
        log_w = {
            "snr": lam,  # w = snr
            "min_snr": np.minimum(lam, log_gamma),  # w = min(snr, gamma)
            "soft_min_snr": log_gamma + log_sigmoid(lam - log_gamma),  # w = (1/snr + 1/gamma)^-1
            "truncated_snr": np.maximum(lam, 0.0),  # w = max(snr, 1)
        }
        return log_w[kind]
    if prediction == "eps":  # w / snr
        log_w = {
            "snr": np.zeros_like(lam),
            "min_snr": np.minimum(0.0, log_gamma - lam),
            "soft_min_snr": log_sigmoid(log_gamma - lam),
            "truncated_snr": np.maximum(0.0, -lam),
        }
        return log_w[kind]
    log_w = {  # v: w / (snr + 1), and log(snr + 1) = softplus(lambda)
        "snr": log_sigmoid(lam),
        "min_snr": np.minimum(lam, log_gamma) - softplus(lam),
        "soft_min_snr": log_gamma + log_sigmoid(lam - log_gamma) - softplus(lam),
        "truncated_snr": log_sigmoid(np.abs(lam)),  # max(lambda, 0) - softplus(lambda)
    }
    return log_w[kind]


def snr_weights(t, schedule, kind="min_snr", prediction="eps", gamma=5.0):
    r"""Per-sample loss weights of the SNR family, computed from the log-SNR (DIF.15).

    Each ``kind`` is a weight :math:`w(\mathrm{snr})` on the x0-MSE
    :math:`\lVert x_0 - \hat x_0\rVert^2`; the returned weight makes the loss of the
    given ``prediction`` equal to that weighted x0-MSE (divide by snr for 'eps', by
    snr + 1 for 'v'):

    ================  ===========================  ====================  =======================  ==============================
    kind              :math:`w` on x0-MSE          'eps'                 'x0'                     'v'
    ================  ===========================  ====================  =======================  ==============================
    'snr'             snr                          1                     snr                      snr/(snr+1)
    'min_snr'         min(snr, γ)                  min(1, γ/snr)         min(snr, γ)              min(snr, γ)/(snr+1)
    'soft_min_snr'    snr γ/(snr+γ)                γ/(snr+γ)             snr γ/(snr+γ)            snr γ/((snr+γ)(snr+1))
    'truncated_snr'   max(snr, 1)                  max(1, 1/snr)         max(snr, 1)              max(snr, 1)/(snr+1)
    ================  ===========================  ====================  =======================  ==============================

    Parameters
    ----------
    t : int ndarray, shape [B]
    schedule : DiffusionSchedule
    kind : {'min_snr', 'soft_min_snr', 'snr', 'truncated_snr'}
    prediction : {'eps', 'x0', 'v'}
    gamma : float
        :math:`\gamma > 0` of the (soft) min-SNR kinds; ignored by the others.

    Returns
    -------
    ndarray, shape [B]

    Notes
    -----
    Evaluated as ``exp`` of a function of :math:`\lambda = \log\mathrm{snr}` built from
    min, max, softplus and log-sigmoid, so every bounded weight is finite at
    :math:`\lambda = -\infty` (zero terminal SNR) and for :math:`\lambda` beyond the
    overflow of snr itself.  Three weights are unbounded by definition: 'snr' and
    'truncated_snr' for 'x0' as snr -> inf, and 'truncated_snr' for 'eps' at snr = 0; where
    one of them is not finite a ``ValueError`` says so instead of returning inf.
    """
    schedule = _schedule(schedule)
    kind = _checks.choice("kind", kind, SNR_WEIGHTINGS)
    prediction = _checks.choice("prediction", prediction, PREDICTIONS)
    log_gamma = math.log(_checks.positive("gamma", gamma))
    t_arr = np.asarray(t)
    if t_arr.ndim != 1:
        raise ValueError(f"t must be 1-D (one timestep per sample), got shape {t_arr.shape}")
    t = _timesteps(t_arr, t_arr.shape[0], schedule)
    with np.errstate(over="ignore"):
        w = np.exp(_log_weight(schedule.log_snr[t], log_gamma, kind, prediction))  # (DIF.15)
    if not np.all(np.isfinite(w)):
        bad = int(t[~np.isfinite(w)][0])
        raise ValueError(
            f"kind={kind!r} with prediction={prediction!r} has an unbounded weight, infinite at "
            f"t = {bad} (log SNR = {schedule.log_snr[bad]}); use prediction='v' or a bounded kind"
        )
    return result(w)


# ============================================================================= discretized decoder


def _bin_edges(x, bits):
    """Standardisation-free pieces: half bin width h and the masks of the two open edge bins."""
    h = 1.0 / (2.0**bits - 1.0)  # (DIF.9) half the spacing 2/(2^bits - 1) of the levels
    lowest = x < -1.0 + h
    highest = x > 1.0 - h
    return h, lowest, highest


def _tanh_u(z):
    return _TANH_C * (z + _TANH_K * z**3)


def _tanh_cdf(z):
    r"""improved-diffusion's approx_standard_normal_cdf, 1/2 (1 + tanh(u)) with
    u = sqrt(2/pi)(z + 0.044715 z^3), evaluated as the identical sigmoid(2u) (DIF.11)."""
    return sigmoid(2.0 * _tanh_u(z))


def _tanh_cdf_grad(z):
    r"""d/dz of :func:`_tanh_cdf`: 2 sigmoid(2u) sigmoid(-2u) u'(z) (= 1/2 (1 - tanh^2 u) u', without
    the cancellation of 1 - tanh^2 in the tails) (DIF.11)."""
    u2 = 2.0 * _tanh_u(z)
    return 2.0 * sigmoid(u2) * sigmoid(-u2) * _TANH_C * (1.0 + 3.0 * _TANH_K * z * z)


def _dgll_inputs(x, means, log_scales, bits, cdf):
    cdf = _checks.choice("cdf", cdf, _CDFS)
    bits = _checks.positive_int("bits", bits)
    if bits > 24:
        raise ValueError(f"bits must be <= 24, got {bits}")
    names = ("x", "means", "log_scales")
    arrays = [as_float64(n, a) for n, a in zip(names, (x, means, log_scales), strict=True)]
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        shapes = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays, strict=True))
        raise ValueError(f"x, means, log_scales must broadcast together, got {shapes}") from None
    x = arrays[0]
    if not np.all((x >= -1.0) & (x <= 1.0)):
        raise ValueError(f"x must lie in [-1, 1] (discretized data), got values in [{x.min()}, {x.max()}]")
    return (*arrays, shape, bits, cdf)


def _dgll_standardized(x, means, log_scales, shape, bits):
    """Bin ends standardised by the Gaussian, with -inf / +inf for the open edge bins."""
    x, means, log_scales = (np.broadcast_to(a, shape) for a in (x, means, log_scales))
    h, lowest, highest = _bin_edges(x, bits)
    inv_s = np.exp(-log_scales)
    lo = np.where(lowest, -np.inf, (x - means - h) * inv_s)  # (DIF.9)
    hi = np.where(highest, np.inf, (x - means + h) * inv_s)
    return lo, hi, inv_s, lowest, highest


def _dgll_exact(lo, hi, with_grad):
    """log P(bin) and (if asked) d/d(lo), d/d(hi) of it (0 at an infinite end)."""
    logp = log_diff_ndtr(lo, hi)  # (DIF.10)
    if not with_grad:
        return _nan_where(lo, hi, logp, None, None)
    fin_lo, fin_hi = np.isfinite(lo), np.isfinite(hi)
    inner = fin_lo & fin_hi
    zlo, zhi = np.where(fin_lo, lo, 0.0), np.where(fin_hi, hi, 0.0)
    # (DIF.10) interior bins: d/dhi log(Phi(hi) - Phi(lo)) = phi(hi)/P, d/dlo = -phi(lo)/P, as
    # inverse Mills ratios (no difference of two exponents ~ z^2/2 in a far tail)
    d_lo, d_hi = np.zeros_like(logp), np.zeros_like(logp)
    if np.any(inner):
        d_lo[inner], d_hi[inner] = log_diff_ndtr_grad(zlo[inner], zhi[inner])
    # an open edge bin is log Phi(hi) or log Phi(-lo): its slope is the inverse Mills ratio, exactly
    d_hi = np.where(fin_hi & ~fin_lo, log_ndtr_grad(zhi), d_hi)
    d_lo = np.where(fin_lo & ~fin_hi, -log_ndtr_grad(-zlo), d_lo)
    return _nan_where(lo, hi, logp, d_lo, d_hi)


def _nan_where(lo, hi, *arrays):
    """NaN in, NaN out: a NaN bin end (a NaN mean or log-scale) makes the entry NaN; the
    infinite-end rules above would otherwise treat it as an open end and give a finite value."""
    bad = np.isnan(lo) | np.isnan(hi)
    return tuple(None if a is None else np.where(bad, np.nan, a) for a in arrays)


def _dgll_tanh(lo, hi, with_grad):
    """improved-diffusion's clamped log-probabilities and (if asked) their a.e. derivatives.

    The bin mass is a difference of two approximate CDFs; where the bin lies in the upper
    half (lo + hi > 0) it is taken as the difference of the two upper tails instead,
    1 - cdf(lo) - (1 - cdf(hi)), the same number without the cancellation of two values
    near 1 (a float32 evaluation of the plain form loses every digit there)."""
    fin_lo, fin_hi = np.isfinite(lo), np.isfinite(hi)
    lo0, hi0 = np.where(fin_lo, lo, 0.0), np.where(fin_hi, hi, 0.0)
    with np.errstate(invalid="ignore"):  # -inf + inf: the whole line, a lower-side bin
        upper = (lo + hi) > 0
    cdf_hi = np.where(fin_hi, _tanh_cdf(hi0), 1.0)
    cdf_lo = np.where(fin_lo, _tanh_cdf(lo0), 0.0)
    sf_lo = np.where(fin_lo, _tanh_cdf(-lo0), 1.0)  # 1 - cdf(z) = cdf(-z): u is odd
    sf_hi = np.where(fin_hi, _tanh_cdf(-hi0), 0.0)
    prob = np.where(upper, sf_lo - sf_hi, cdf_hi - cdf_lo)  # (DIF.11)
    logp = np.log(np.maximum(prob, _TANH_CLAMP))  # (DIF.11) the clamp at 1e-12
    if not with_grad:
        return _nan_where(lo, hi, logp, None, None)
    live = prob > _TANH_CLAMP
    inv = np.where(live, 1.0 / np.where(live, prob, 1.0), 0.0)  # clamped: zero slope
    d_hi = np.where(fin_hi, _tanh_cdf_grad(hi0), 0.0) * inv
    d_lo = -np.where(fin_lo, _tanh_cdf_grad(lo0), 0.0) * inv
    return _nan_where(lo, hi, logp, d_lo, d_hi)


def discretized_gaussian_log_likelihood(x, means, log_scales, bits=8, cdf="exact"):
    r"""Elementwise log-probability of the data bin under a Gaussian, edge bins open (DIF.9).

    .. math::
        \log P(x) = \log\big(\Phi(z_+) - \Phi(z_-)\big), \qquad
        z_\pm = \frac{x - \mu \pm h}{e^{s}}, \qquad h = \frac{1}{2^{\text{bits}} - 1},

    with :math:`z_- = -\infty` for the lowest level x = -1 and :math:`z_+ = +\infty` for the
    highest level x = 1 (the edge bins absorb the tails, so the probabilities of the
    :math:`2^{\text{bits}}` bins sum to 1).

    Parameters
    ----------
    x : ndarray
        Data on the grid of :math:`2^{\text{bits}}` levels in [-1, 1] (level k is
        :math:`-1 + 2k/(2^{\text{bits}}-1)`); any value in [-1, 1] is accepted, and the
        lowest / highest bins are recognised as x < -1 + h / x > 1 - h.
    means : ndarray
        Gaussian means :math:`\mu`.
    log_scales : ndarray
        Log standard deviations :math:`s` (half the log-variance).
    bits : int
        Bits per value, 1..24 (8 for images).
    cdf : {'exact', 'tanh'}
        'exact' evaluates :math:`\log\Phi` and the log-difference stably (DIF.10), with no
        clamp; 'tanh' reproduces improved-diffusion's approximation
        :math:`\Phi(z) \approx \tfrac12(1 + \tanh(\sqrt{2/\pi}(z + 0.044715 z^3)))` and its
        clamp of every probability at 1e-12 (DIF.11), for comparison.

    Returns
    -------
    ndarray, the broadcast shape of the three inputs
        Log-probabilities (<= 0), in nats.

    Notes
    -----
    'exact': a bin within one standard deviation of the mean (:math:`|x - \mu| + h < e^s`)
    is the erf difference (DIF.10), relative error about eps (|x - mu| + h) / (2h) at any
    log-scale (<= 256 eps for 8 bits and a mean in [-1, 1]), exact until h e^{-s} leaves the
    normal range (s ~ 703 for 8 bits), finite to s ~ 738; a bin further out is the log
    form, finite while the bin is wider than ~eps standard deviations (so a mean more than
    e^s ~ 1e14 from the data at s >~ 32 can give -inf).  Small scales are finite until
    z^2 overflows (|z| ~ 1e154).  Its only approximations are libm's ``erf`` and ``erfc``.
    An empty input gives an empty result.
    """
    x, means, log_scales, shape, bits, cdf = _dgll_inputs(x, means, log_scales, bits, cdf)
    lo, hi, *_ = _dgll_standardized(x, means, log_scales, shape, bits)
    logp, _, _ = (_dgll_exact if cdf == "exact" else _dgll_tanh)(lo, hi, False)
    return result(logp)


def discretized_gaussian_log_likelihood_backward(x, means, log_scales, grad_output, bits=8, cdf="exact"):
    r"""Gradient of :func:`discretized_gaussian_log_likelihood` w.r.t. ``means`` and ``log_scales``.

    With :math:`D_\pm = \partial\log P/\partial z_\pm` (DIF.10) and
    :math:`\partial z_\pm/\partial\mu = -e^{-s}`, :math:`\partial z_\pm/\partial s = -z_\pm`:

    .. math::
        \frac{\partial\log P}{\partial\mu} = -e^{-s}(D_+ + D_-), \qquad
        \frac{\partial\log P}{\partial s} = -(D_+ z_+ + D_- z_-),

    an infinite end contributing 0.  For 'tanh' the derivative is that of the clamped
    approximation (0 where the clamp is active).

    Returns
    -------
    (grad_means, grad_log_scales) : tuple of ndarray
        Each summed to the shape of its input (broadcasting).
    """
    x, means, log_scales, shape, bits, cdf = _dgll_inputs(x, means, log_scales, bits, cdf)
    g = _elementwise_grad(grad_output, shape)
    lo, hi, inv_s, *_ = _dgll_standardized(x, means, log_scales, shape, bits)
    _, d_lo, d_hi = (_dgll_exact if cdf == "exact" else _dgll_tanh)(lo, hi, True)
    zlo = np.where(np.isfinite(lo), lo, 0.0)
    zhi = np.where(np.isfinite(hi), hi, 0.0)
    grad_means = -g * inv_s * (d_hi + d_lo)  # (DIF.10)
    grad_log_scales = -g * (d_hi * zhi + d_lo * zlo)
    return sum_to_shape(grad_means, means.shape), sum_to_shape(grad_log_scales, log_scales.shape)


# ============================================================================= the bound's terms


def _vlb_inputs(x0, x_t, t, eps_pred, schedule, model_log_variance, reduction, bits):
    reduction = _checks.reduction(reduction, _ALL)
    schedule = _schedule(schedule)
    bits = _checks.positive_int("bits", bits)
    x0, x_t, eps_pred = _arrays(("x0", "x_t", "eps_pred"), (x0, x_t, eps_pred), reduction)
    if not np.all((x0 >= -1.0) & (x0 <= 1.0)):
        raise ValueError(
            f"x0 must lie in [-1, 1] (the discretized decoder's data), got values in [{x0.min()}, {x0.max()}]"
        )
    t = _timesteps(t, x0.shape[0], schedule)
    v = None
    if model_log_variance is not None:
        v = as_float64("model_log_variance", model_log_variance)
        try:
            ok = np.broadcast_shapes(v.shape, x0.shape) == x0.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"model_log_variance must broadcast to the shape of x0 {x0.shape}, got shape {v.shape}"
            )
    _require_signal(schedule, t, "alphas", "the model mean")
    return x0, x_t, t, eps_pred, schedule, v, reduction, bits


def _model_log_variance(schedule, t, ndim, v):
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) and d(log sigma^2)/dv (DIF.8)."""
    log_beta = _at(np.log(schedule.betas), t, ndim)
    log_tilde = _at(schedule.posterior_log_variance_clipped, t, ndim)
    if v is None:
        # (DIF.8) fixed "large" variance (DDPM's fixedlarge), 0-based: beta_t for t >= 1, beta~_1 at t = 0
        return np.where(_at(np.arange(schedule.num_timesteps), t, ndim) == 0, log_tilde, log_beta), None
    frac = 0.5 * (v + 1.0)  # (DIF.8) improved-diffusion's learned range, v in [-1, 1]
    return frac * log_beta + (1.0 - frac) * log_tilde, 0.5 * (log_beta - log_tilde)


def _vlb_parts(x0, x_t, t, eps_pred, schedule, v, bits):
    """Per-element KL and decoder NLL, and their partial derivatives w.r.t. the model mean / log-variance."""
    n = x0.ndim
    ra, c = _mean_coefs(schedule, t, n)
    mean = ra * x_t - c * eps_pred  # (DIF.7) mu_theta(x_t, eps)
    log_var, dlogvar_dv = _model_log_variance(schedule, t, n, v)
    log_var = np.broadcast_to(log_var, x0.shape)
    true_mean = _at(schedule.posterior_mean_coef1, t, n) * x0 + _at(schedule.posterior_mean_coef2, t, n) * x_t
    true_log_var = np.broadcast_to(_at(schedule.posterior_log_variance_clipped, t, n), x0.shape)
    kl = normal_kl(true_mean, true_log_var, mean, log_var)  # (DIF.6)
    _, _, kl_dmean, kl_dlogvar = normal_kl_backward(true_mean, true_log_var, mean, log_var, np.ones(x0.shape))
    half = 0.5 * log_var
    nll = -discretized_gaussian_log_likelihood(x0, mean, half, bits)  # (DIF.9)
    d_mean, d_half = discretized_gaussian_log_likelihood_backward(x0, mean, half, np.ones(x0.shape), bits)
    first = batch_broadcast(t == 0, n)
    value = np.where(first, nll, kl)  # (DIF.4) L_0 at t = 0, the KL term L_{t} above
    dmean = np.where(first, -d_mean, kl_dmean)
    dlogvar = np.where(first, -0.5 * d_half, kl_dlogvar)
    return value, dmean, dlogvar, c, dlogvar_dv


def vlb_term(x0, x_t, t, eps_pred, schedule, model_log_variance=None, reduction="none", bits=8):
    r"""One term of the variational bound, per sample in nats (DIF.4-DIF.9).

    .. math::
        L = \begin{cases}
            \sum_i \mathrm{KL}\big(q(x_{t-1}\mid x_t, x_0)\,\Vert\,p_\theta(x_{t-1}\mid x_t)\big)_i & t > 0 \\
            -\sum_i \log p_\theta(x_0\mid x_1)_i \ \text{(discretized, DIF.9)} & t = 0
        \end{cases}

    with :math:`p_\theta(x_{t-1}\mid x_t) = \mathcal N(\mu_\theta, \sigma_t^2)`, the mean from
    the predicted noise (DIF.7) and the variance fixed or learned (DIF.8).

    Parameters
    ----------
    x0 : ndarray, shape [B, ...]
        Clean data in [-1, 1] (on the 2^bits grid for the decoder term).
    x_t : ndarray, shape of ``x0``
        The noised sample at index t (``q_sample(x0, t, noise, schedule)``).
    t : int ndarray, shape [B]
        0-based; index t > 0 gives the paper's :math:`L_t`, index 0 the decoder :math:`L_0`.
    eps_pred : ndarray, shape of ``x0``
        The model's noise prediction.
    schedule : DiffusionSchedule
    model_log_variance : ndarray, broadcastable to ``x0``, optional
        ``None``: the fixed variance :math:`\sigma_t^2 = \beta_t`, with
        :math:`\tilde\beta_1` at t = 0 (DDPM's and improved-diffusion's "fixedlarge").
        Otherwise the raw model output :math:`v` of improved-diffusion's learned range:
        :math:`\log\sigma_t^2 = \tfrac{v+1}{2}\log\beta_t + \tfrac{1-v}{2}\log\tilde\beta_t`
        (:math:`\tilde\beta` clipped at t = 0), so v = 1 gives :math:`\beta_t` and v = -1 gives
        :math:`\tilde\beta_t`; values outside [-1, 1] extrapolate, unclamped.
    reduction : {'none', 'mean', 'sum'}
        Default ``'none'``: the per-sample terms.
    bits : int
        Bits per value of the data (decoder bins), default 8.

    Returns
    -------
    ndarray, shape [B] for ``'none'``, else []

    Notes
    -----
    The KL is the ``expm1`` form of ``normal_kl`` (VAE.5) and the decoder the exact
    log-CDF form (DIF.10): finite for any finite prediction.  A timestep with
    :math:`\alpha_t = 0` (a beta of 1) is refused: the eps parameterisation has no mean there.
    """
    x0, x_t, t, eps_pred, schedule, v, reduction, bits = _vlb_inputs(
        x0, x_t, t, eps_pred, schedule, model_log_variance, reduction, bits
    )
    value, *_ = _vlb_parts(x0, x_t, t, eps_pred, schedule, v, bits)
    return reduce_sum(value, reduction)


def vlb_term_backward(
    x0, x_t, t, eps_pred, grad_output, schedule, model_log_variance=None, reduction="none", bits=8
):
    r"""Gradient of :func:`vlb_term` w.r.t. ``eps_pred`` (and ``model_log_variance`` when given).

    .. math::
        \frac{\partial L}{\partial\hat\epsilon} = -\frac{\beta_t}{\sqrt{1-\bar\alpha_t}\sqrt{\alpha_t}}
            \frac{\partial L}{\partial\mu_\theta}, \qquad
        \frac{\partial L}{\partial v} = \tfrac12(\log\beta_t - \log\tilde\beta_t)\frac{\partial L}{\partial\log\sigma^2}

    with :math:`\partial L/\partial\mu_\theta` and :math:`\partial L/\partial\log\sigma^2` those of the
    Gaussian KL (VAE.5) for t > 0 and of the decoder NLL (DIF.9, DIF.10) at t = 0.

    Returns
    -------
    (grad_eps_pred,) or (grad_eps_pred, grad_model_log_variance) : tuple of ndarray
    """
    x0, x_t, t, eps_pred, schedule, v, reduction, bits = _vlb_inputs(
        x0, x_t, t, eps_pred, schedule, model_log_variance, reduction, bits
    )
    _, dmean, dlogvar, c, dlogvar_dv = _vlb_parts(x0, x_t, t, eps_pred, schedule, v, bits)
    w = grad_sum(grad_output, reduction, x0.shape)
    grad_eps = -w * dmean * c  # (DIF.7) d mu_theta / d eps = -beta_t / (sqrt(1 - abar_t) sqrt(alpha_t))
    if v is None:
        return (grad_eps,)
    return grad_eps, sum_to_shape(w * dlogvar * dlogvar_dv, v.shape)  # (DIF.8)


def _neg_log1m_minus(a):
    r"""-log(1 - a) - a = sum_{k>=2} a^k / k >= 0, accurate for all a in [0, 1).

    For a < 0.05 the series (13 terms: the first omitted is < 1e-17 relative); above,
    the direct form, where the result (>= a^2/2) is no longer a small difference of
    numbers of size a.
    """
    small = a < 0.05
    s = np.zeros_like(a)
    for k in range(14, 1, -1):
        s = s * a + 1.0 / k
    series = s * a * a
    return np.where(small, series, -np.log1p(-np.where(small, 0.0, a)) - np.where(small, 0.0, a))


def prior_kl(x0, schedule, reduction="none"):
    r"""The prior term :math:`L_T = \mathrm{KL}(q(x_T\mid x_0)\,\Vert\,\mathcal N(0, I))`, per sample in nats (DIF.5).

    .. math::
        L_T = \tfrac12\sum_i\big(\bar\alpha_T x_{0,i}^2 - \bar\alpha_T - \log(1-\bar\alpha_T)\big)

    (:math:`\bar\alpha_T` = ``alpha_bar[-1]``; it has no learnable input, but
    :func:`prior_kl_backward` gives its gradient w.r.t. x0).

    Parameters
    ----------
    x0 : ndarray, shape [B, ...]
    schedule : DiffusionSchedule
    reduction : {'none', 'mean', 'sum'}

    Returns
    -------
    ndarray, shape [B] for ``'none'``, else []

    Notes
    -----
    :math:`-a - \log(1-a)` is the variance part of the Gaussian KL (VAE.4 with
    :math:`v = \log(1-a)`); it is evaluated by its series :math:`\sum_{k\ge2} a^k/k` for
    small :math:`a` (long schedules have :math:`\bar\alpha_T \sim 10^{-5}`), so it keeps full
    relative accuracy and is exactly 0 at zero terminal SNR.
    """
    reduction = _checks.reduction(reduction, _ALL)
    schedule = _schedule(schedule)
    x0 = batch_array("x0", x0, reduction)
    a = schedule.alpha_bar[-1]
    per_element = 0.5 * (a * x0**2 + _neg_log1m_minus(np.float64(a)))  # (DIF.5)
    return reduce_sum(per_element, reduction)


def prior_kl_backward(x0, grad_output, schedule, reduction="none"):
    r"""Gradient of :func:`prior_kl` w.r.t. x0: :math:`\bar\alpha_T\,x_0\,g`.

    (x0 is data in training, but the bound is a function of it: the gradient serves
    likelihood-based uses such as adversarial or attribution analyses.)

    Returns
    -------
    (grad_x0,) : tuple of one ndarray
    """
    reduction = _checks.reduction(reduction, _ALL)
    schedule = _schedule(schedule)
    x0 = batch_array("x0", x0, reduction)
    return (grad_sum(grad_output, reduction, x0.shape) * schedule.alpha_bar[-1] * x0,)  # (DIF.5)


# ============================================================================= variational diffusion models


def _vdm_pair(eps, eps_pred, reduction):
    reduction = _checks.reduction(reduction, _ALL)
    eps, eps_pred = _arrays(("eps", "eps_pred"), (eps, eps_pred), reduction)
    return eps, eps_pred, reduction


def _sq_norm(eps, eps_pred):
    """||eps - eps_pred||^2 per sample, shape (B,)."""
    d = (eps - eps_pred).reshape(eps.shape[0], -1)
    return np.sum(d * d, axis=1)


def _batch_reduce(per_sample, reduction):
    return reduce_sum(per_sample[:, None], reduction)


def vdm_continuous_loss(eps, eps_pred, dgamma_dt, reduction="mean"):
    r"""The continuous-time diffusion loss of VDM (Kingma et al. 2021), one time per sample (DIF.16).

    .. math::
        L_b = \tfrac12\,\gamma'(t_b)\,\lVert\epsilon_b - \hat\epsilon_b\rVert_2^2

    an unbiased one-sample estimate of :math:`\tfrac12\int_0^1\gamma'(t)\,
    \mathbb E\lVert\epsilon - \hat\epsilon\rVert^2\,dt` for :math:`t \sim U(0, 1)`, with
    :math:`\gamma = -\log\mathrm{SNR}` increasing in t.

    Parameters
    ----------
    eps, eps_pred : ndarray, shape [B, ...]
    dgamma_dt : ndarray, shape [B]
        :math:`\gamma'(t_b)`, finite (>= 0 for a valid, monotone schedule; not enforced).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
        Nats; the squared norm is a SUM over the non-batch dims.
    """
    eps, eps_pred, reduction = _vdm_pair(eps, eps_pred, reduction)
    dg = _per_sample_vector("dgamma_dt", dgamma_dt, eps.shape[0])
    return _batch_reduce(0.5 * dg * _sq_norm(eps, eps_pred), reduction)  # (DIF.16)


def vdm_continuous_loss_backward(eps, eps_pred, dgamma_dt, grad_output, reduction="mean"):
    r"""Gradient of :func:`vdm_continuous_loss`.

    .. math::
        \frac{\partial L_b}{\partial\epsilon_b} = \gamma'(t_b)(\epsilon_b - \hat\epsilon_b)
            = -\frac{\partial L_b}{\partial\hat\epsilon_b}, \qquad
        \frac{\partial L_b}{\partial\gamma'(t_b)} = \tfrac12\lVert\epsilon_b - \hat\epsilon_b\rVert^2

    Returns
    -------
    (grad_eps, grad_eps_pred, grad_dgamma_dt) : tuple of ndarray
    """
    eps, eps_pred, reduction = _vdm_pair(eps, eps_pred, reduction)
    dg = _per_sample_vector("dgamma_dt", dgamma_dt, eps.shape[0])
    w = grad_sum(grad_output, reduction, (eps.shape[0],))
    grad_eps = batch_broadcast(w * dg, eps.ndim) * (eps - eps_pred)  # (DIF.16)
    return grad_eps, -grad_eps, 0.5 * w * _sq_norm(eps, eps_pred)


def vdm_discrete_loss(eps, eps_pred, gamma_t, gamma_s, T, reduction="mean"):
    r"""The T-step diffusion loss of VDM, one step per sample (DIF.17).

    .. math::
        L_b = \frac{T}{2}\,\operatorname{expm1}(\gamma_t - \gamma_s)\,\lVert\epsilon_b - \hat\epsilon_b\rVert_2^2
            = \frac{T}{2}\Big(\frac{\mathrm{SNR}(s)}{\mathrm{SNR}(t)} - 1\Big)\lVert\epsilon_b - \hat\epsilon_b\rVert_2^2

    with :math:`s = t - 1/T`: T times the KL term of that step, so its mean over
    :math:`t \in \{1/T, \dots, 1\}` is the sum of the T KL terms.

    Parameters
    ----------
    eps, eps_pred : ndarray, shape [B, ...]
    gamma_t, gamma_s : ndarray, shape [B]
        :math:`\gamma(t_b)` and :math:`\gamma(s_b)` (finite; :math:`\gamma_t > \gamma_s` for a
        valid schedule).
    T : int
        Number of steps (>= 1).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``

    Notes
    -----
    ``expm1`` keeps the relative accuracy of small steps (large T), where
    :math:`e^{\gamma_t - \gamma_s} - 1` would cancel; as :math:`T \to \infty` the loss tends to
    :func:`vdm_continuous_loss`.
    """
    eps, eps_pred, reduction = _vdm_pair(eps, eps_pred, reduction)
    T = _checks.positive_int("T", T)
    gt = _per_sample_vector("gamma_t", gamma_t, eps.shape[0])
    gs = _per_sample_vector("gamma_s", gamma_s, eps.shape[0])
    return _batch_reduce(0.5 * T * np.expm1(gt - gs) * _sq_norm(eps, eps_pred), reduction)  # (DIF.17)


def vdm_discrete_loss_backward(eps, eps_pred, gamma_t, gamma_s, grad_output, T, reduction="mean"):
    r"""Gradient of :func:`vdm_discrete_loss`.

    .. math::
        \frac{\partial L_b}{\partial\epsilon_b} = T\operatorname{expm1}(\gamma_t - \gamma_s)(\epsilon_b - \hat\epsilon_b)
            = -\frac{\partial L_b}{\partial\hat\epsilon_b}, \qquad
        \frac{\partial L_b}{\partial\gamma_t} = \frac T2 e^{\gamma_t - \gamma_s}\lVert\epsilon_b - \hat\epsilon_b\rVert^2
            = -\frac{\partial L_b}{\partial\gamma_s}

    Returns
    -------
    (grad_eps, grad_eps_pred, grad_gamma_t, grad_gamma_s) : tuple of ndarray
    """
    eps, eps_pred, reduction = _vdm_pair(eps, eps_pred, reduction)
    T = _checks.positive_int("T", T)
    gt = _per_sample_vector("gamma_t", gamma_t, eps.shape[0])
    gs = _per_sample_vector("gamma_s", gamma_s, eps.shape[0])
    w = grad_sum(grad_output, reduction, (eps.shape[0],))
    grad_eps = batch_broadcast(w * T * np.expm1(gt - gs), eps.ndim) * (eps - eps_pred)  # (DIF.17)
    grad_gamma_t = 0.5 * T * w * np.exp(gt - gs) * _sq_norm(eps, eps_pred)
    return grad_eps, -grad_eps, grad_gamma_t, -grad_gamma_t


def low_discrepancy_times(batch_size, u0, rank=0, world_size=1):
    r"""Stratified times in [0, 1) for a batch, shared out across data-parallel ranks (DIF.18).

    .. math::
        t_i = \Big(u_0 + \frac{r B + i}{k}\Big) \bmod 1, \qquad i = 0, \dots, B-1,\quad k = B\cdot W

    with B = ``batch_size``, r = ``rank``, W = ``world_size``.  With one :math:`u_0 \sim U[0,1)`
    shared by all ranks, the k times of the job form the grid
    :math:`\{(u_0 + j/k) \bmod 1\}_{j<k}`: each is marginally uniform, and together they
    cover [0, 1) with spacing exactly 1/k (VDM's variance reduction).

    Parameters
    ----------
    batch_size : int
        Times per rank (>= 1).
    u0 : float
        In [0, 1), the same on every rank (draw it from a shared seed).
    rank : int
        This rank, in [0, world_size).
    world_size : int
        Number of ranks (>= 1).

    Returns
    -------
    ndarray, shape [batch_size]
        float64 times in [0, 1) (``mod`` of a non-negative number never returns 1).
    """
    batch_size = _checks.positive_int("batch_size", batch_size)
    world_size = _checks.positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    u0 = _checks.finite("u0", u0)
    if not 0.0 <= u0 < 1.0:
        raise ValueError(f"u0 must lie in [0, 1), got {u0}")
    k = batch_size * world_size
    i = int(rank) * batch_size + np.arange(batch_size, dtype=np.float64)
    return np.mod(u0 + i / k, 1.0)  # (DIF.18)


def to_bits_per_dim(nats, num_dims):
    r"""Negative log-likelihood in nats per sample to bits per dimension (DIF.19).

    .. math::
        \text{bpd} = \frac{\text{nats}}{n\,\log 2}

    Parameters
    ----------
    nats : ndarray, any shape
    num_dims : int
        Dimensions n per sample (e.g. 3 * 32 * 32), >= 1.

    Returns
    -------
    ndarray, shape of ``nats``
    """
    num_dims = _checks.positive_int("num_dims", num_dims)
    return result(as_float64("nats", nats) / (num_dims * _LOG2))  # (DIF.19)


def to_bits_per_dim_backward(nats, grad_output, num_dims):
    r"""Gradient of :func:`to_bits_per_dim`: :math:`g/(n\log 2)`.

    Returns
    -------
    (grad_nats,) : tuple of one ndarray
    """
    num_dims = _checks.positive_int("num_dims", num_dims)
    nats = as_float64("nats", nats)
    g = _elementwise_grad(grad_output, nats.shape)
    return (g / (num_dims * _LOG2),)  # (DIF.19)


# ============================================================================= the whole bound


def full_bound(x0, model_eps_fn: Callable, schedule, rng, bits=8):
    r"""The variational bound :math:`L_T + \sum_{t\ge1} L_{t-1} + L_0` per sample, in nats (DIF.4).

    One Monte-Carlo draw of :math:`x_t \sim q(x_t\mid x_0)` per step (fresh noise from
    ``rng`` at every step), as improved-diffusion's ``calc_bpd_loop``:

    .. math::
        -\log p_\theta(x_0) \le \underbrace{\mathrm{KL}(q(x_T\mid x_0)\Vert p(x_T))}_{\texttt{prior\_kl}}
            + \sum_{t=1}^{T-1}\underbrace{\mathbb E_q\,\mathrm{KL}(q(x_t\mid x_{t+1}, x_0)\Vert p_\theta(x_t\mid x_{t+1}))}_{\texttt{vlb\_term}(t)}
            \underbrace{- \mathbb E_q\log p_\theta(x_0\mid x_1)}_{\texttt{vlb\_term}(0)}

    (0-based indices: ``vlb_term`` at index t compares the posteriors over the paper's
    :math:`x_t`, given its :math:`x_{t+1}` = ``q_sample`` at index t).

    Parameters
    ----------
    x0 : ndarray, shape [B, ...]
        Data in [-1, 1].
    model_eps_fn : callable
        ``model_eps_fn(x_t, t) -> eps_pred`` or ``-> (eps_pred, v)`` (learned-range
        variance, see :func:`vlb_term`), with ``t`` an int64 array of shape [B].
    schedule : DiffusionSchedule
    rng : numpy.random.Generator
        Source of the noise.
    bits : int
        Bits per value of the data.

    Returns
    -------
    ndarray, shape [B]
        The bound in nats; :func:`to_bits_per_dim` converts it.
    """
    schedule = _schedule(schedule)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not callable(model_eps_fn):
        raise TypeError("model_eps_fn must be callable")
    x0 = batch_array("x0", x0, "none")
    total = np.array(prior_kl(x0, schedule, "none"))  # (DIF.5) L_T
    for step in range(schedule.num_timesteps):
        t = np.full(x0.shape[0], step, dtype=np.int64)
        x_t = q_sample(x0, t, rng.standard_normal(x0.shape), schedule)
        out = model_eps_fn(x_t, t)
        eps_pred, v = out if isinstance(out, tuple) else (out, None)
        total += vlb_term(x0, x_t, t, eps_pred, schedule, v, "none", bits)  # (DIF.4)
    return result(total)
