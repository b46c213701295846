r"""Continuous-time family, NumPy reference (float64): flow matching, EDM, consistency models
and distillation (sCM, MeanFlow, DMD2, SDS).

Read next to ``derivations/flow.md``; the tags ``(FLOW.n)`` in the comments name its
equations.  Conventions:

* Time is continuous, one ``t`` per sample (shape ``[B]``, a float array), in
  ``[0, 1]``, in the SD3 / diffusers direction: ``t = 0`` is data, ``t = 1`` is noise
  (torchcfm's direction is the reverse; FLOW.5 gives the mapping).
* ``x0`` is the data, ``noise`` the Gaussian draw; with :math:`c = 1 - \sigma_{\min}`
  the path is :math:`x_t = (1 - c t)\,x_0 + t\,\epsilon` and its velocity
  :math:`u = \mathrm{d}x_t/\mathrm{d}t = \epsilon - c\,x_0` (FLOW.1).
* ``flow_matching_loss`` takes the MEAN over the non-batch dims per sample (as the
  diffusion MSE losses); ``reduction`` = ``'mean'`` | ``'sum'`` | ``'none'`` then acts
  on the batch.
* ``name(...)`` returns float64 ndarrays; ``name_backward(*arrays, grad_output, **kw)``
  returns the gradient of ``sum(grad_output * name(...))`` w.r.t. EVERY floating array
  input, in order (``t`` and ``weights`` included: FLOW.2) -- except
  ``consistency_training_loss`` (``f_student`` only: ``f_target`` is the stop-gradient
  target, the noise levels points of the discretization) and the distillation losses
  (``scm_loss``, ``meanflow_loss``, ``vsd_loss``, ``sds_loss``), whose targets are
  stop-gradient by definition: only the student's output (and sCM's ``logvar``), and for
  the three surrogates the prescribed update, not the value's derivative (FLOW.30).
* Bad input raises ``ValueError`` / ``TypeError`` whose message starts with the op's
  name and names the argument.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .. import _checks
from . import diffusion as _dif
from ._common import (
    _SQRT_HALF,
    _erfc,
    as_float64,
    batch_broadcast,
    labels_array,
    log_diff_ndtr,
    reduce_mean,
    reduce_sum,
    result,
    sigmoid,
)
from ._common import _sample_weights as _reduction_weights
from .diffusion import _arrays, _per_sample_vector, _sample_weights  # the checks of the MSE losses

__all__ = [
    "DENOISER_WEIGHTINGS",
    "FLOW_WEIGHTINGS",
    "consistency_training_loss",
    "consistency_training_loss_backward",
    "denoiser_loss",
    "denoiser_loss_backward",
    "flow_interpolant",
    "flow_interpolant_backward",
    "flow_matching_loss",
    "flow_matching_loss_backward",
    "flow_weight",
    "pseudo_huber_loss",
    "pseudo_huber_loss_backward",
    # not PREDICTIONS: genloss.reference re-exports every family flat, and its PREDICTIONS is
    # diffusion's (eps, x0, v); this module's wider set is reference.flow.PREDICTIONS
    "TIMESTEP_KINDS",
    "edm_preconditioning",
    "edm_preconditioning_backward",
    "flux_mu",
    "ict_num_steps",
    "ict_sigma_probs",
    "karras_sigmas",
    "prediction_convert",
    "prediction_convert_backward",
    "sample_timesteps",
    "shift_timesteps",
    "timestep_cdf",
    "timestep_density",
    "timestep_quantile",
    "meanflow_loss",
    "meanflow_loss_backward",
    "scm_loss",
    "scm_loss_backward",
    "sds_loss",
    "sds_loss_backward",
    "vsd_loss",
    "vsd_loss_backward",
]

FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
_ALL = _checks.REDUCTIONS
_SQRT_2PI = math.sqrt(2.0 * math.pi)


# ============================================================================= checks


named_errors = _checks.named_errors  # used by this family's layers as R.named_errors


def sigma_min_value(sigma_min) -> float:
    """sigma_min in [0, 1): c = 1 - sigma_min > 0 keeps the path's data coefficient 1 - c t > 0."""
    s = _checks.nonnegative("sigma_min", sigma_min)
    if s >= 1.0:
        raise ValueError(f"sigma_min must lie in [0, 1), got {s}")
    return s


def check_times(t: np.ndarray, weighting: str = "none") -> None:
    r"""Every t in [0, 1] (NaN refused), and the end point a weighting is infinite at.

    (FLOW.3) 'sigma_sqrt' is :math:`t^{-2}`: infinite at the end point t = 0 (and above the
    float range for t below 7.5e-155 in float64): refused, naming t and the end point.
    """
    if not np.all((t >= 0.0) & (t <= 1.0)):
        bad = t[~((t >= 0.0) & (t <= 1.0))][0]
        raise ValueError(f"t must lie in [0, 1] (t = 0 data, t = 1 noise), got {bad}")
    if weighting == "sigma_sqrt" and t.size and t.min() == 0.0:
        raise ValueError(
            "t = 0 is the end point where weighting='sigma_sqrt' (t^-2) is infinite; "
            "draw t in (0, 1] or use weighting='cosmap' or 'none'"
        )


def _times(t, batch: int, weighting: str = "none") -> np.ndarray:
    a = as_float64("t", t)
    if a.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) (one time per sample), got {a.shape}")
    check_times(a, weighting)
    return a


# ============================================================================= the path (FLOW.1)


def _interpolant_inputs(x0, noise, t, sigma_min):
    with named_errors("flow_interpolant"):
        c = 1.0 - sigma_min_value(sigma_min)
        x0, noise = _arrays(("x0", "noise"), (x0, noise), "none")
        t = _times(t, x0.shape[0])
    return x0, noise, t, c


def flow_interpolant(x0, noise, t, sigma_min=0.0):
    r"""The flow-matching path from data (t = 0) to noise (t = 1) (FLOW.1).

    .. math::
        x_t = (1 - (1 - \sigma_{\min})\,t)\,x_0 + t\,\epsilon

    Parameters
    ----------
    x0 : ndarray, shape [B, ...]
        The data.
    noise : ndarray, shape of ``x0``
        The noise :math:`\epsilon`.
    t : ndarray, shape [B]
        Times in [0, 1] (0: data, 1: noise; SD3 / diffusers direction).
    sigma_min : float
        In [0, 1); the path ends at :math:`\epsilon + \sigma_{\min} x_0` (FLOW.5).

    Returns
    -------
    ndarray, shape of ``x0``
    """
    x0, noise, t, c = _interpolant_inputs(x0, noise, t, sigma_min)
    tb = batch_broadcast(t, x0.ndim)
    return result((1.0 - c * tb) * x0 + tb * noise)  # (FLOW.1)


def flow_interpolant_backward(x0, noise, t, grad_output, sigma_min=0.0):
    r"""Gradients of :func:`flow_interpolant` w.r.t. ``x0``, ``noise`` and ``t`` (FLOW.1).

    .. math::
        \frac{\partial}{\partial x_0} = (1 - c t)\,g,\qquad
        \frac{\partial}{\partial \epsilon} = t\,g,\qquad
        \frac{\partial}{\partial t_b} = \sum_i g_{b,i}\,(\epsilon_{b,i} - c\,x_{0,b,i})

    Returns
    -------
    (grad_x0, grad_noise, grad_t) : tuple of ndarrays
    """
    x0, noise, t, c = _interpolant_inputs(x0, noise, t, sigma_min)
    with named_errors("flow_interpolant"):
        g = as_float64("grad_output", grad_output)
        _checks.same_shape("x0", x0.shape, "grad_output", g.shape)
    tb = batch_broadcast(t, x0.ndim)
    velocity = noise - c * x0  # (FLOW.1) dx_t/dt
    grad_t = (g * velocity).reshape(x0.shape[0], -1).sum(axis=1)
    return result((1.0 - c * tb) * g), result(tb * g), result(grad_t)


# ============================================================================= weightings (FLOW.3)


def flow_weight(t, weighting="none"):
    r"""The per-sample weight :math:`\lambda(t)` of a weighting and its derivative (FLOW.3).

    .. math::
        \texttt{'none'}: 1, \qquad
        \texttt{'sigma\_sqrt'}: t^{-2}, \qquad
        \texttt{'cosmap'}: \frac{2}{\pi\,((1-t)^2 + t^2)} = \frac{2}{\pi(1 - 2t + 2t^2)}

    'cosmap' is the density of SD3's cosmap times :math:`t = 1 - 1/(\tan(\pi u/2) + 1)`,
    :math:`u \sim U(0, 1)`: finite at both end points (:math:`2/\pi`), largest at
    :math:`t = 1/2` (:math:`4/\pi`); its denominator is written as a sum of two squares
    (no cancellation).  'sigma_sqrt' is infinite at the end point t = 0, which is refused.

    Returns
    -------
    (weight, d weight / dt) : tuple of two ndarrays, shape of ``t``
    """
    weighting = _checks.choice("weighting", weighting, FLOW_WEIGHTINGS)
    t = as_float64("t", t)
    check_times(t, weighting)
    if weighting == "none":
        return np.ones_like(t), np.zeros_like(t)
    with np.errstate(over="ignore", divide="ignore"):  # t^-2 beyond float64: refused just below
        w, slope = weight_and_slope(t, weighting)
    if not np.all(np.isfinite(w)):
        raise ValueError(
            f"t = {t[~np.isfinite(w)][0]} is so close to the end point t = 0 that "
            "weighting='sigma_sqrt' (t^-2) overflows float64"
        )
    return w, slope


def weight_and_slope(t, weighting):
    r"""(:math:`\lambda(t)`, :math:`\lambda'(t)`) of 'sigma_sqrt' or 'cosmap' by arithmetic only, so
    that the native layer evaluates the same lines on NumPy, torch or CuPy vectors (FLOW.3)."""
    if weighting == "sigma_sqrt":
        w = 1.0 / (t * t)  # (FLOW.3) t^-2
        return w, -2.0 * w / t  # d t^-2/dt = -2 t^-3
    s = (1.0 - t) ** 2 + t * t  # = 1 - 2t + 2t^2 >= 1/2, a sum of squares: no cancellation
    return 2.0 / (math.pi * s), 4.0 * (1.0 - 2.0 * t) / (math.pi * s * s)  # (FLOW.3) cosmap


# ============================================================================= the loss (FLOW.2)


def _loss_inputs(pred, x0, noise, t, weighting, sigma_min, weights, reduction):
    with named_errors("flow_matching_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        weighting = _checks.choice("weighting", weighting, FLOW_WEIGHTINGS)
        c = 1.0 - sigma_min_value(sigma_min)
        pred, x0, noise = _arrays(("pred", "x0", "noise"), (pred, x0, noise), reduction)
        t = _times(t, pred.shape[0], weighting)
        w = None if weights is None else _sample_weights(weights, pred.shape[0])
        lam, dlam = flow_weight(t, weighting)
    r = pred - (noise - c * x0)  # (FLOW.2) residual to the velocity u = noise - c x0
    return r, c, t, w, lam, dlam, reduction


def flow_matching_loss(pred, x0, noise, t, weighting="none", sigma_min=0.0, weights=None, reduction="mean"):
    r"""Flow-matching loss: per-sample weighted MSE of a velocity prediction (FLOW.2, FLOW.3).

    .. math::
        L_b = \omega_b\,\lambda(t_b)\,\frac1n\sum_i
        \big(\hat v_{b,i} - (\epsilon_{b,i} - (1 - \sigma_{\min})\,x_{0,b,i})\big)^2

    with :math:`\lambda` the ``weighting`` (:func:`flow_weight`: 1, :math:`t^{-2}` or the
    cosmap density) and :math:`\omega` the optional per-sample ``weights``.

    Parameters
    ----------
    pred : ndarray, shape [B, ...]
        The predicted velocity :math:`\hat v`.
    x0, noise : ndarray, shape of ``pred``
        Data and noise; the target is :math:`\mathrm{d}x_t/\mathrm{d}t` of
        :func:`flow_interpolant`.
    t : ndarray, shape [B]
        Times in [0, 1] (0: data); with 'sigma_sqrt', in (0, 1].
    weighting : {'none', 'sigma_sqrt', 'cosmap'}
    sigma_min : float
        In [0, 1).
    weights : ndarray, shape [B], optional
        Per-sample weights >= 0 (differentiable, as every other float input).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    r, _c, _t, w, lam, _dlam, reduction = _loss_inputs(
        pred, x0, noise, t, weighting, sigma_min, weights, reduction
    )
    row = lam if w is None else w * lam
    return reduce_mean(batch_broadcast(row, r.ndim) * r * r, reduction)  # (FLOW.2)


def flow_matching_loss_backward(
    pred, x0, noise, t, grad_output, weighting="none", sigma_min=0.0, weights=None, reduction="mean"
):
    r"""Gradients of :func:`flow_matching_loss` w.r.t. every float input (FLOW.2).

    With :math:`r = \hat v - (\epsilon - c x_0)`, :math:`m_b = \frac1n\sum_i r_{b,i}^2` and
    :math:`g_b` the reduction's weight of sample b:

    .. math::
        \frac{\partial}{\partial \hat v} = \frac{2 g_b \omega_b \lambda_b r}{n},\quad
        \frac{\partial}{\partial x_0} = c\,\frac{2 g_b \omega_b \lambda_b r}{n},\quad
        \frac{\partial}{\partial \epsilon} = -\frac{2 g_b \omega_b \lambda_b r}{n},\quad
        \frac{\partial}{\partial t_b} = g_b \omega_b \lambda'(t_b)\, m_b,\quad
        \frac{\partial}{\partial \omega_b} = g_b \lambda(t_b)\, m_b

    Returns
    -------
    (grad_pred, grad_x0, grad_noise, grad_t[, grad_weights]) : tuple of ndarrays
        ``grad_weights`` only when ``weights`` is given.
    """
    r, c, _t, w, lam, dlam, reduction = _loss_inputs(
        pred, x0, noise, t, weighting, sigma_min, weights, reduction
    )
    with named_errors("flow_matching_loss"):
        gb = _reduction_weights(grad_output, reduction, r.shape[0])  # g_b: the reduction's weight
    row = lam if w is None else w * lam
    d_pred = batch_broadcast(2.0 * gb * row / r[0].size, r.ndim) * r  # (FLOW.2)
    m = (r * r).reshape(r.shape[0], -1).mean(axis=1)  # per-sample mean square
    grad_t = gb * (dlam if w is None else w * dlam) * m  # (FLOW.2) through lambda(t)
    grads = (result(d_pred), result(c * d_pred), result(-d_pred), result(grad_t))
    if w is None:
        return grads
    return (*grads, result(gb * lam * m))  # (FLOW.2) d/d omega


# ============================================================================= timestep samplers (FLOW.6-FLOW.8)

TIMESTEP_KINDS = ("uniform", "logit_normal", "mode", "cosmap", "lognormal_sigma")
# (FLOW.7) SD3's mode map is strictly monotone exactly for -1 <= scale <= 2/(pi - 2) ~ 1.752
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))
# Uniform draws are kept in [2^-54, 1 - 2^-53] (probability <= 2^-53 moved): Phi^-1 stays finite,
# so a 'lognormal_sigma' draw is never sigma = 0 and a 'logit_normal' one never exactly 0 or 1.
_U_LOW, _U_HIGH = 2.0**-54, 1.0 - 2.0**-53

# Wichura's AS241 (PPND16) rational approximations of Phi^-1, relative error ~1e-16 (the
# coefficients of Python's statistics.NormalDist.inv_cdf), highest power first for np.polyval.
_AS241 = (
    ((2.5090809287301226727e3, 3.3430575583588128105e4, 6.7265770927008700853e4, 4.5921953931549871457e4,
      1.3731693765509461125e4, 1.9715909503065514427e3, 1.3314166789178437745e2, 3.3871328727963666080e0),
     (5.2264952788528545610e3, 2.8729085735721942674e4, 3.9307895800092710610e4, 2.1213794301586595867e4,
      5.3941960214247511077e3, 6.8718700749205790830e2, 4.2313330701600911252e1, 1.0)),
    ((7.7454501427834140764e-4, 2.2723844989269184583e-2, 2.4178072517745061177e-1, 1.2704582524523683826e0,
      3.6478483247632045605e0, 5.7694972214606914055e0, 4.6303378461565452959e0, 1.4234371107496835773e0),
     (1.0507500716444168432e-9, 5.4759380849953449460e-4, 1.5198666563616457197e-2, 1.4810397642748007459e-1,
      6.8976733498510000455e-1, 1.6763848301838038494e0, 2.0531916266377588219e0, 1.0)),
    ((2.0103343992922881327e-7, 2.7115555687434875782e-5, 1.2426609473880784386e-3, 2.6532189526576123093e-2,
      2.9656057182850489123e-1, 1.7848265399172913358e0, 5.4637849111641143699e0, 6.6579046435011037772e0),
     (2.0442631033899397856e-15, 1.4215117583164458887e-7, 1.8463183175100546818e-5, 7.8686913114561325910e-4,
      1.4875361290850614853e-2, 1.3692988092273580531e-1, 5.9983220655588793769e-1, 1.0)),
)  # fmt: skip


def ndtri(p) -> np.ndarray:
    r""":math:`\Phi^{-1}(p)` elementwise (AS241; :math:`\pm\infty` at p = 1, 0), float64."""
    p = np.asarray(p, dtype=np.float64)
    q = p - 0.5
    central = np.abs(q) <= 0.425
    r = 0.180625 - q * q
    (cn, cd), (nn, nd), (fn, fd) = _AS241
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.sqrt(-np.log(np.where(q <= 0.0, p, 1.0 - p)))  # p or 1 - p, whichever is small
        x_tail = np.where(
            tail <= 5.0,
            np.polyval(nn, tail - 1.6) / np.polyval(nd, tail - 1.6),
            np.polyval(fn, tail - 5.0) / np.polyval(fd, tail - 5.0),
        )
    out = np.where(central, q * np.polyval(cn, r) / np.polyval(cd, r), np.where(q < 0.0, -x_tail, x_tail))
    out = np.where(p == 0.0, -np.inf, np.where(p == 1.0, np.inf, out))
    return np.where((p >= 0.0) & (p <= 1.0), out, np.nan)


def ndtr(z) -> np.ndarray:
    r""":math:`\Phi(z)=\tfrac12\operatorname{erfc}(-z/\sqrt2)` (erfc: full relative accuracy in the lower tail)."""
    return 0.5 * _erfc(-np.asarray(z, dtype=np.float64) * _SQRT_HALF)


def _timestep_params(kind, m, s, scale, p_mean, p_std, draws_in=None):
    """The checked parameters; ``draws_in``: the finfo (NumPy's or torch's) of the dtype a sampler
    returns, whose range must hold every 'lognormal_sigma' draw (the quantile map itself gives
    exp(p_mean + p_std z) of any u, inf included)."""
    kind = _checks.choice("kind", kind, TIMESTEP_KINDS)
    m, p_mean = _checks.finite("m", m), _checks.finite("p_mean", p_mean)
    s, p_std = _checks.positive("s", s), _checks.positive("p_std", p_std)
    if kind == "lognormal_sigma" and draws_in is not None:
        _lognormal_draws_fit(p_mean, p_std, draws_in)
    scale = _checks.finite("scale", scale)
    lo, hi = MODE_SCALE_RANGE
    if not lo <= scale <= hi:
        raise ValueError(
            f"scale must lie in [-1, 2/(pi - 2)] = [{lo}, {hi:.6f}] (SD3's mode map is monotone only there), "
            f"got {scale}"
        )
    return kind, dict(m=m, s=s, scale=scale, p_mean=p_mean, p_std=p_std)


# The array functions of ``timestep_map``: NumPy's, this module's Phi^-1, Phi and sigmoid, and ``quiet``
# (the floating-point warnings of log 0, 1/0 and underflow off: those limits are the values wanted).
NUMPY_OPS = SimpleNamespace(
    sin=np.sin, cos=np.cos, sqrt=np.sqrt, exp=np.exp, log=np.log, log1p=np.log1p, arctan2=np.arctan2,
    isfinite=np.isfinite, where=np.where, zeros_like=np.zeros_like, ones_like=np.ones_like, ndtri=ndtri,
    ndtr=ndtr, sigmoid=sigmoid, quiet=lambda: np.errstate(divide="ignore", invalid="ignore", under="ignore"),
)  # fmt: skip


MODE_NEWTON_STEPS = 32  # (FLOW.7) enough for every scale of the range (the measurement: derivations/flow.md)


def _mode_map(u, scale, xp=NUMPY_OPS):
    r"""(FLOW.7) the quantile of SD3's mode density, :math:`Q(u) = (1 + s)u - s\sin^2(\pi u/2) = 1 - f_{\rm mode}(u)`,
    and its slope :math:`Q'(u) = 1 + s - s\frac\pi2\sin(\pi u)`. Written ``(1 + s) u - s sin^2``, not the
    paper's ``u - s (sin^2 - u)``: for s near -1 and small u that difference cancels (Q(1e-17) would be 0).
    ``xp``: the array functions (NumPy's; the torch layer passes torch's, see ``timestep_map``)."""
    sin_half = xp.sin(0.5 * math.pi * u)
    slope = 1.0 + scale - scale * 0.5 * math.pi * xp.sin(math.pi * u)
    return (1.0 + scale) * u - scale * (sin_half * sin_half), slope


def _mode_start(t, scale, xp=NUMPY_OPS):
    r"""(FLOW.7) where Newton starts: t for scale >= 0 (Q(u) = u + O(scale u^2)); for scale < 0 the root of
    Q's second-order expansion at the nearer end, :math:`(1+s)u - s\frac{\pi^2}4u^2 = t`, in the form
    :math:`2t/(a + \sqrt{a^2 + 4bt})` (no cancellation; exact for s = -1 to first order, where
    Q(u) ~ (pi u / 2)^2 and a start at t would take hundreds of halvings to reach sqrt(t))."""
    if scale >= 0.0:
        return t + 0.0  # a copy
    a, b = 1.0 + scale, -scale * math.pi**2 / 4.0

    def near_zero(x):
        return xp.where(x > 0.0, 2.0 * x / (a + xp.sqrt(a * a + 4.0 * b * x)), 0.0)

    with xp.quiet():
        return xp.where(t <= 0.5, near_zero(t), 1.0 - near_zero(1.0 - t))  # Q(1 - u) = 1 - Q(u)


def _mode_cdf(t, scale, xp=NUMPY_OPS):
    r"""(FLOW.7) :math:`Q^{-1}(t)`: ``MODE_NEWTON_STEPS`` Newton steps safeguarded by bisection on the
    bracket [lo, hi] (Q increasing), a fixed count (no exit on the data: the torch layer runs the same
    steps on the device, capturable). An exact root is kept (Q(0) = 0: the CDF at 0 is 0), and a step
    landing ON the bracket's end is taken: a converged point's step is itself, and refusing it would
    bisect away from the root."""
    lo, hi = xp.zeros_like(t), xp.ones_like(t)
    u = _mode_start(t, scale, xp)
    for _ in range(MODE_NEWTON_STEPS):
        q, slope = _mode_map(u, scale, xp)
        above = q > t
        hi, lo = xp.where(above, u, hi), xp.where(above, lo, u)
        with xp.quiet():
            step = u - (q - t) / slope
        inside = (step >= lo) & (step <= hi) & xp.isfinite(step)
        u = xp.where(q == t, u, xp.where(inside, step, 0.5 * (lo + hi)))
    return u


def timestep_map(fn, x, kind, p, xp=NUMPY_OPS):
    r"""The value of ``fn`` ('quantile', 'cdf' or 'density') of the timestep density ``kind`` with the
    checked parameters ``p`` (``_timestep_params``) at the checked float64 array ``x``, by arithmetic
    and ``xp``'s functions only (``sin``, ``cos``, ``sqrt``, ``exp``, ``log``, ``log1p``, ``arctan2``,
    ``isfinite``, ``where``, ``zeros_like``, ``ones_like``, ``ndtri``, ``ndtr``, ``sigmoid``, and ``quiet``:
    a context without floating-point warnings), so that the torch layer evaluates these same lines on
    the device (FLOW.3, FLOW.6, FLOW.7)."""
    if kind == "uniform":
        return xp.ones_like(x) if fn == "density" else x + 0.0
    if kind == "cosmap":
        if fn == "quantile":
            sn, cs = xp.sin(0.5 * math.pi * x), xp.cos(0.5 * math.pi * x)
            return sn / (sn + cs)  # (FLOW.3) tan/(tan + 1), finite at u = 1
        if fn == "cdf":
            return 2.0 / math.pi * xp.arctan2(x, 1.0 - x)  # (FLOW.3)
        return weight_and_slope(x, "cosmap")[0]  # (FLOW.3)
    if kind == "mode":
        if fn == "quantile":
            return _mode_map(x, p["scale"], xp)[0]  # (FLOW.7)
        u = _mode_cdf(x, p["scale"], xp)  # (FLOW.7)
        if fn == "cdf":
            return u
        with xp.quiet():
            return 1.0 / _mode_map(u, p["scale"], xp)[1]  # (FLOW.7)
    logit = kind == "logit_normal"
    loc, spread = (p["m"], p["s"]) if logit else (p["p_mean"], p["p_std"])
    if fn == "quantile":  # (FLOW.6)
        z = loc + spread * xp.ndtri(x)
        return xp.sigmoid(z) if logit else xp.exp(z)
    if fn == "cdf":  # (FLOW.6)
        with xp.quiet():  # log 0 = -inf: the CDF's limit 0 (and the logit's 1 at t = 1)
            logx = (xp.log(x) - xp.log1p(-x)) if logit else xp.log(x)
            return xp.ndtr((logx - loc) / spread)
    inner = (x > 0.0) & (x < 1.0) if logit else (x > 0.0) & xp.isfinite(x)
    xi = xp.where(inner, x, 0.5)  # the density's limit 0 at the ends, without log 0
    logx = (xp.log(xi) - xp.log1p(-xi)) if logit else xp.log(xi)
    jac = xi * (1.0 - xi) if logit else xi  # d logx / dx = 1 / jac
    with xp.quiet():
        z = (logx - loc) / spread
        dens = xp.exp(-0.5 * z * z) / (spread * _SQRT_2PI * jac)  # (FLOW.6)
    return xp.where(inner, dens, 0.0)


def _unit_or_sigma(kind, x, name):
    """t in [0, 1] for the time kinds, sigma >= 0 for 'lognormal_sigma'; NaN refused."""
    if kind == "lognormal_sigma":
        if not np.all(x >= 0.0):
            raise ValueError(f"{name} must be noise levels sigma >= 0, got {x[~(x >= 0.0)][0]}")
    elif not np.all((x >= 0.0) & (x <= 1.0)):
        raise ValueError(f"{name} must lie in [0, 1], got {x[~((x >= 0.0) & (x <= 1.0))][0]}")
    return x


def timestep_quantile(u, kind="uniform", m=0.0, s=1.0, scale=1.29, p_mean=-1.2, p_std=1.2):
    r"""The inverse CDF :math:`Q = F^{-1}` of a timestep density (FLOW.6, FLOW.7): a time (or, for
    'lognormal_sigma', a noise level) from :math:`u \in [0, 1]`; :func:`sample_timesteps` applies it
    to uniform draws.

    .. math::
        \texttt{'uniform'}: u,\quad
        \texttt{'logit\_normal'}: \operatorname{sigmoid}(m + s\,\Phi^{-1}(u)),\quad
        \texttt{'mode'}: u - c\,(\sin^2\tfrac{\pi u}{2} - u) = 1 - f_{\rm mode}(u;c),\\
        \texttt{'cosmap'}: 1 - \frac{1}{\tan(\pi u/2) + 1} = \frac{\sin(\pi u/2)}{\sin(\pi u/2) + \cos(\pi u/2)},\quad
        \texttt{'lognormal\_sigma'}: \exp(P_{\rm mean} + P_{\rm std}\,\Phi^{-1}(u))

    with :math:`c` = ``scale``.  SD3's Eq. 20 map :math:`f_{\rm mode}(u) = 1 - u - c(\cos^2\frac{\pi u}{2} - 1 + u)`
    DEcreases from 1 to 0; :math:`1 - f_{\rm mode}(u) = f_{\rm mode}(1 - u)` is its increasing
    version, the same distribution (the density is symmetric about 1/2, FLOW.7).  Valid for
    ``scale`` in [-1, 2/(pi - 2)], where the map is monotone.

    Parameters
    ----------
    u : ndarray
        Probabilities in [0, 1].
    kind : {'uniform', 'logit_normal', 'mode', 'cosmap', 'lognormal_sigma'}
    m, s : float
        'logit_normal' location and scale (s > 0).
    scale : float
        'mode' scale, in [-1, 2/(pi - 2)].
    p_mean, p_std : float
        'lognormal_sigma' (EDM's P_mean, P_std; p_std > 0).

    Returns
    -------
    ndarray, shape of ``u``
    """
    with named_errors("timestep_quantile"):
        kind, p = _timestep_params(kind, m, s, scale, p_mean, p_std)
        u = _unit_or_sigma("uniform", as_float64("u", u), "u")
    return result(timestep_map("quantile", u, kind, p))


def timestep_cdf(t, kind="uniform", m=0.0, s=1.0, scale=1.29, p_mean=-1.2, p_std=1.2):
    r"""The CDF :math:`F` of a timestep density, the inverse of :func:`timestep_quantile` (FLOW.6, FLOW.7).

    .. math::
        \texttt{'logit\_normal'}: \Phi\Big(\frac{\operatorname{logit} t - m}{s}\Big),\quad
        \texttt{'mode'}: Q^{-1}(t),\quad
        \texttt{'cosmap'}: \frac2\pi\operatorname{atan2}(t, 1 - t),\quad
        \texttt{'lognormal\_sigma'}: \Phi\Big(\frac{\ln\sigma - P_{\rm mean}}{P_{\rm std}}\Big)

    'mode' has no closed-form inverse: :math:`Q^{-1}` by safeguarded Newton to the last ulp.

    Returns
    -------
    ndarray, shape of ``t``
    """
    with named_errors("timestep_cdf"):
        kind, p = _timestep_params(kind, m, s, scale, p_mean, p_std)
        t = _unit_or_sigma(kind, as_float64("t", t), "t")
    return result(timestep_map("cdf", t, kind, p))


def timestep_density(t, kind="uniform", m=0.0, s=1.0, scale=1.29, p_mean=-1.2, p_std=1.2):
    r"""The density that :func:`sample_timesteps` draws from (FLOW.6, FLOW.7, FLOW.3).

    .. math::
        \texttt{'logit\_normal'}: \frac{1}{s\sqrt{2\pi}}\frac{1}{t(1-t)}
            \exp\Big(-\frac{(\operatorname{logit}t - m)^2}{2s^2}\Big),\qquad
        \texttt{'mode'}: \frac{1}{1 + c - c\frac\pi2\sin(\pi Q^{-1}(t))},\\
        \texttt{'cosmap'}: \frac{2}{\pi((1-t)^2 + t^2)},\qquad
        \texttt{'lognormal\_sigma'}: \frac{1}{\sigma P_{\rm std}\sqrt{2\pi}}
            \exp\Big(-\frac{(\ln\sigma - P_{\rm mean})^2}{2P_{\rm std}^2}\Big)

    'uniform' is 1 on [0, 1].  'mode' is SD3's Eq. 20 density by change of variables,
    :math:`1/Q'(Q^{-1}(t))`; finite for ``scale`` inside (-1, 2/(pi - 2)) (at the two limits it is
    infinite at isolated points: t = 0 and 1 for -1, t = 1/2 for 2/(pi - 2)).  The logit-normal
    and lognormal densities are 0 at their end points t = 0, 1 and sigma = 0.

    Parameters
    ----------
    t : ndarray
        Times in [0, 1], or noise levels sigma >= 0 for 'lognormal_sigma'.

    Returns
    -------
    ndarray, shape of ``t``
    """
    with named_errors("timestep_density"):
        kind, p = _timestep_params(kind, m, s, scale, p_mean, p_std)
        t = _unit_or_sigma(kind, as_float64("t", t), "t")
    return result(timestep_map("density", t, kind, p))


def _generator(generator, op):
    if isinstance(generator, np.random.Generator):
        return generator
    if generator is None or (isinstance(generator, (int, np.integer)) and not isinstance(generator, bool)):
        with named_errors(op):
            seed = None if generator is None else _checks.seed("generator", generator)
        return np.random.default_rng(seed)
    raise TypeError(f"{op}: generator must be a numpy.random.Generator, an int seed or None, "
                    f"got {type(generator).__name__}")  # fmt: skip


def uniform_draws(n, generator=None, stratified=False, rank=0, world_size=1, op="sample_timesteps"):
    r"""The uniform :math:`u` that :func:`sample_timesteps` maps, kept in [2^-54, 1 - 2^-53] (FLOW.8).

    Plain: n i.i.d. U[0, 1) draws.  Stratified: ONE draw :math:`u_0` from the generator and
    ``low_discrepancy_times(n, u0, rank, world_size)``: the same generator state on every rank gives
    the grid :math:`\{(u_0 + j/k) \bmod 1\}_{j<nW}` shared out across the ranks (DIF.18).
    """
    with named_errors(op):
        n = _checks.positive_int("n", n)
        if _checks.flag("stratified", stratified) and world_size != 1 and generator is None:
            raise ValueError(
                "generator must be given (the same seed on every rank) for stratified draws across ranks"
            )
        rng = _generator(generator, op)
        if stratified:
            u = _dif.low_discrepancy_times(n, float(rng.random()), rank, world_size)  # (DIF.18)
        else:
            _dif.low_discrepancy_times(1, 0.0, rank, world_size)  # the same checks of rank, world_size
            u = rng.random(n)
    return np.clip(u, _U_LOW, _U_HIGH)


def sample_timesteps(
    n, kind="uniform", generator=None, m=0.0, s=1.0, scale=1.29, p_mean=-1.2, p_std=1.2,
    stratified=False, rank=0, world_size=1,
):  # fmt: skip
    r"""Timesteps drawn by the exact inverse CDF of a named density (FLOW.6-FLOW.8).

    .. math::
        t = Q(u),\qquad u \sim U(0, 1)

    with :math:`Q` = :func:`timestep_quantile` of ``kind``; the density is :func:`timestep_density`.
    'uniform', 'logit_normal' (SD3 Eq. 19, :math:`t = \operatorname{sigmoid}(m + s\,\Phi^{-1}(u))`),
    'mode' (SD3 Eq. 20, ``scale`` in [-1, 2/(pi-2)]), 'cosmap' (SD3 Eq. 21) give times in [0, 1]
    (t = 0 data, t = 1 noise); 'lognormal_sigma' gives EDM's noise levels
    :math:`\sigma = \exp(P_{\rm mean} + P_{\rm std}\,\Phi^{-1}(u))`.

    Parameters
    ----------
    n : int
        Draws (per rank when stratified).
    kind : {'uniform', 'logit_normal', 'mode', 'cosmap', 'lognormal_sigma'}
    generator : numpy.random.Generator, int seed or None
    m, s, scale, p_mean, p_std : float
        As :func:`timestep_quantile`.
    stratified : bool
        One :math:`u_0` from the generator and the grid of ``low_discrepancy_times`` (DIF.18):
        with the same generator state on every rank, the ``n * world_size`` draws of the job put
        exactly one draw in each probability-1/(n W) stratum of the density.
    rank, world_size : int

    Returns
    -------
    ndarray, shape [n], float64
    """
    with named_errors("sample_timesteps"):
        _timestep_params(kind, m, s, scale, p_mean, p_std, draws_in=np.finfo(np.float64))
    u = uniform_draws(n, generator, stratified, rank, world_size)
    return timestep_quantile(u, kind, m, s, scale, p_mean, p_std)


def _lognormal_draws_fit(p_mean, p_std, info):
    """Every draw sigma = exp(p_mean + p_std z) of the kept uniforms (z within Phi^-1 of [_U_LOW, _U_HIGH],
    about +-8.3) is finite and nonzero in the output dtype (at least its smallest subnormal, tiny eps):
    an EDM p_mean of 1e3 drew inf everywhere, and -1e3 drew sigma = 0 (a noise level no loss accepts)."""
    z_lo, z_hi = float(ndtri(np.float64(_U_LOW))), float(ndtri(np.float64(_U_HIGH)))
    lo, hi = p_mean + p_std * z_lo, p_mean + p_std * z_hi
    least = float(info.tiny) * float(info.eps)
    log_least, log_max = math.log(least), math.log(float(info.max))
    if not (log_least <= lo and hi <= log_max):
        raise ValueError(
            f"p_mean = {p_mean:g}, p_std = {p_std:g} draw noise levels exp(p_mean + p_std z), z in "
            f"[{z_lo:.2f}, {z_hi:.2f}], outside {info.dtype}'s range [{least:.3g}, {float(info.max):.3g}]: "
            f"need p_mean + {z_hi:.2f} p_std <= {log_max:.1f} and p_mean - {-z_lo:.2f} p_std >= {log_least:.1f}"
        )


# ============================================================================= shifts (FLOW.9)


def shift_timesteps(t, shift=None, mu=None):
    r"""SD3's timestep shift, or Flux's dynamic shift, and its Jacobian (FLOW.9).

    .. math::
        t' = \frac{\alpha t}{1 + (\alpha - 1)t} = \frac{\alpha t}{\alpha t + (1 - t)},\qquad
        \frac{\mathrm dt'}{\mathrm dt} = \frac{\alpha}{(\alpha t + 1 - t)^2}

    with :math:`\alpha` = ``shift`` (SD3 Eq. 23, diffusers' ``FlowMatchEulerDiscreteScheduler``),
    or :math:`\alpha = e^\mu` for Flux's :math:`t' = e^\mu/(e^\mu + (1/t - 1))` (the same map: FLOW.9).
    A density moves as :math:`p'(t') = p(t)/|\mathrm dt'/\mathrm dt|`; shifting by :math:`1/\alpha`
    undoes it.  Exact at the end points (t = 0 -> 0, t = 1 -> 1).

    Parameters
    ----------
    t : ndarray
        Times in [0, 1].
    shift : float, optional
        :math:`\alpha > 0`.
    mu : float, optional
        Flux's :math:`\mu` (see :func:`flux_mu`).  Exactly one of ``shift`` and ``mu``.

    Returns
    -------
    (t_shifted, dt_shifted_dt) : tuple of two ndarrays, shape of ``t``
    """
    with named_errors("shift_timesteps"):
        alpha = _shift_factor(shift, mu)
        t = as_float64("t", t)
        check_times(t)
    den = alpha * t + (1.0 - t)  # (FLOW.9) in [min(1, alpha), max(1, alpha)]: no cancellation
    # alpha / den is in [min(1, alpha), max(1, alpha)] too; den * den alone could overflow or underflow
    return result(alpha * t / den), result(alpha / den / den)


def _shift_factor(shift, mu):
    if (shift is None) == (mu is None):
        raise ValueError("give exactly one of shift (SD3) and mu (Flux's dynamic shift)")
    if shift is not None:
        return _checks.positive("shift", shift)
    alpha = math.exp(_checks.finite("mu", mu)) if _checks.finite("mu", mu) < 709.0 else math.inf
    if not 0.0 < alpha < math.inf:
        raise ValueError(f"mu must give a finite, positive e^mu, got mu = {mu}")
    return alpha


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    r"""The :math:`\mu` of Flux's dynamic shift, linear in the image's token count (FLOW.9).

    .. math::
        \mu = \mathrm{base\_shift} + (L - L_{\rm base})
        \frac{\mathrm{max\_shift} - \mathrm{base\_shift}}{L_{\max} - L_{\rm base}}

    (diffusers' ``calculate_shift``; e.g. a 1024x1024 image, 4096 tokens: :math:`\mu = 1.15`).

    Returns
    -------
    float
    """
    with named_errors("flux_mu"):
        length = _checks.positive("image_seq_len", image_seq_len)  # a token count: > 0
        base, top = _checks.finite("base_seq_len", base_seq_len), _checks.finite("max_seq_len", max_seq_len)
        lo, hi = _checks.finite("base_shift", base_shift), _checks.finite("max_shift", max_shift)
        if top == base:
            raise ValueError(f"max_seq_len must differ from base_seq_len, both are {base}")
    slope = (hi - lo) / (top - base)
    return lo + (length - base) * slope  # = length * m + (base_shift - m * base_seq_len)


# ============================================================================= EDM preconditioning (FLOW.10)


def _sigmas(sigma, op):
    with named_errors(op):
        s = as_float64("sigma", sigma)
        if not np.all((s > 0.0) & np.isfinite(s)):
            bad = s[~((s > 0.0) & np.isfinite(s))][0]
            raise ValueError(
                f"sigma must be finite and > 0 (c_noise = ln(sigma)/4 is infinite at the end point "
                f"sigma = 0), got {bad}"
            )
    return s


def edm_preconditioning(sigma, sigma_data=0.5):
    r"""EDM's preconditioning coefficients (Karras et al. 2022, Table 1) (FLOW.10).

    .. math::
        c_{\rm skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2},\quad
        c_{\rm out} = \frac{\sigma\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}},\quad
        c_{\rm in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}},\quad
        c_{\rm noise} = \tfrac14\ln\sigma

    so that :math:`D(x;\sigma) = c_{\rm skip}x + c_{\rm out}F(c_{\rm in}x; c_{\rm noise})`.
    Computed from :math:`r = \operatorname{hypot}(\sigma, \sigma_d)` and the ratios
    :math:`\sigma_d/r, \sigma/r \le 1`: no cancellation and no overflow for any finite
    :math:`\sigma > 0` (float32 included); :math:`\sigma = 0` (:math:`c_{\rm noise} = -\infty`) is refused.

    Parameters
    ----------
    sigma : ndarray
        Noise levels > 0, any shape.
    sigma_data : float
        > 0.

    Returns
    -------
    (c_skip, c_out, c_in, c_noise) : tuple of four ndarrays, shape of ``sigma``
    """
    s = _sigmas(sigma, "edm_preconditioning")
    with named_errors("edm_preconditioning"):
        sd = _checks.positive("sigma_data", sigma_data)
    r = np.hypot(s, sd)
    rd = sd / r  # (FLOW.10) sigma_d / r in (0, 1]
    return result(rd * rd), result(s * rd), result(1.0 / r), result(0.25 * np.log(s))


def edm_preconditioning_backward(sigma, grad_output, sigma_data=0.5):
    r"""Gradient of :func:`edm_preconditioning` w.r.t. ``sigma`` (FLOW.10).

    ``grad_output`` = :math:`(g_{\rm skip}, g_{\rm out}, g_{\rm in}, g_{\rm noise})`, the upstream
    gradients of the four outputs (None for one that is not used):

    .. math::
        \frac{\partial}{\partial\sigma} = -\frac{2\sigma\sigma_d^2}{r^4}g_{\rm skip}
        + \frac{\sigma_d^3}{r^3}g_{\rm out} - \frac{\sigma}{r^3}g_{\rm in} + \frac{1}{4\sigma}g_{\rm noise}

    Returns
    -------
    (grad_sigma,) : tuple of one ndarray
    """
    s = _sigmas(sigma, "edm_preconditioning")
    with named_errors("edm_preconditioning"):
        sd = _checks.positive("sigma_data", sigma_data)
        if not isinstance(grad_output, (tuple, list)) or len(grad_output) != 4:
            raise TypeError(
                "grad_output must be a tuple of 4 (c_skip, c_out, c_in, c_noise), entries may be None"
            )
        gs = [np.zeros_like(s) if g is None else np.broadcast_to(as_float64("grad_output", g), s.shape)
              for g in grad_output]  # fmt: skip
    r = np.hypot(s, sd)
    rd, rs = sd / r, s / r  # (FLOW.10) both <= 1
    d = (-2.0 * rs * rd * rd / r, rd * rd * rd, -rs / (r * r), 0.25 / s)
    return (result(sum(g * di for g, di in zip(gs, d, strict=True))),)


# ============================================================================= parameterizations (FLOW.11)

PREDICTIONS = ("eps", "x0", "v", "flow", "edm_F")
PATHS = ("flow", "ve", "alpha_sigma")


def prediction_coefs(kind, a, b, sigma_data):
    r"""(FLOW.11) a parameterization as :math:`p_x x_0 + p_\epsilon\epsilon` on the path
    :math:`x_t = a x_0 + b\epsilon`: eps (0, 1), x0 (1, 0), v :math:`(-b, a)`, flow (-1, 1),
    edm_F :math:`(b/(\sigma_d\rho), -\sigma_d a/\rho)`, :math:`\rho = \sqrt{b^2 + \sigma_d^2a^2}`.
    Arithmetic only (NumPy arrays or torch tensors)."""
    one, zero = a * 0.0 + 1.0, a * 0.0
    if kind == "eps":
        return zero, one
    if kind == "x0":
        return one, zero
    if kind == "v":
        return -b, a
    if kind == "flow":
        return -one, one
    # rho as m sqrt((b/m)^2 + (sigma_d a/m)^2), m = |b| + |sigma_d a|: no square overflows (sigma
    # ~1e160) or underflows (a, b ~1e-170) where rho and the coefficients are finite (abs, not
    # hypot: the same line serves NumPy arrays and torch tensors)
    m = abs(b) + abs(sigma_data * a)
    rho = m * ((b / m) ** 2 + (sigma_data * a / m) ** 2) ** 0.5
    return b / (sigma_data * rho), -sigma_data * a / rho


def convert_coefs(source, target, a, b, sigma_data):
    r"""(FLOW.11) :math:`(A, C, \det)` with target = :math:`A x_t + C\,` pred: from
    :math:`[a\ b;\ p_x\ p_\epsilon][x_0;\epsilon] = [x_t;\ \mathrm{pred}]`,
    :math:`A = (q_xp_\epsilon - q_\epsilon p_x)/\det`, :math:`C = (a q_\epsilon - b q_x)/\det`,
    :math:`\det = a p_\epsilon - b p_x` (0 only for eps at a = 0 and x0 at b = 0).  Arithmetic only."""
    px, pe = prediction_coefs(source, a, b, sigma_data)
    qx, qe = prediction_coefs(target, a, b, sigma_data)
    det = a * pe - b * px
    if source == target:
        return a * 0.0, a * 0.0 + 1.0, det
    return (qx * pe - qe * px) / det, (a * qe - b * qx) / det, det


def singular_message(source, target):
    where = ("a = 0: x_t is pure noise (t = 1 on the flow path)" if source == "eps"
             else "b = 0: x_t is the data (t = 0, sigma = 0)")  # fmt: skip
    return (
        f"source={source!r} does not determine target={target!r} at the end point t_or_sigma where {where}; "
        "convert from 'v', 'flow' or 'edm_F' there"
    )


def path_coefs(t_or_sigma, schedule, batch):
    r"""(FLOW.11) the path :math:`x_t = a x_0 + b\epsilon` per sample: 'flow' :math:`(1 - t, t)`,
    've' :math:`(1, \sigma)`, 'alpha_sigma' a given pair :math:`(\alpha_t, \sigma_t)`, a
    ``DiffusionSchedule`` :math:`(\sqrt{\bar\alpha_t}, \sqrt{1 - \bar\alpha_t})` at integer t."""
    if isinstance(schedule, _dif.DiffusionSchedule):
        t = labels_array("t_or_sigma", t_or_sigma, batch, schedule.num_timesteps)
        return schedule.sqrt_alpha_bar[t], schedule.sqrt_one_minus_alpha_bar[t]
    if not isinstance(schedule, str):
        raise TypeError(
            f"schedule must be one of {PATHS} or a DiffusionSchedule, got {type(schedule).__name__}"
        )
    schedule = _checks.choice("schedule", schedule, PATHS)
    if schedule == "alpha_sigma":
        if not isinstance(t_or_sigma, (tuple, list)) or len(t_or_sigma) != 2:
            raise TypeError(
                "t_or_sigma must be a pair (alpha_t, sigma_t) of (B,) arrays for schedule='alpha_sigma'"
            )
        pair = [as_float64("t_or_sigma", x) for x in t_or_sigma]
    else:
        pair = [as_float64("t_or_sigma", t_or_sigma)]
    for x in pair:
        if x.shape != (batch,):
            raise ValueError(f"t_or_sigma must have shape ({batch},) (one value per sample), got {x.shape}")
        if not np.all((x >= 0.0) & np.isfinite(x)):
            raise ValueError(
                f"t_or_sigma must be finite and >= 0, got {x[~((x >= 0.0) & np.isfinite(x))][0]}"
            )
    if schedule == "flow":
        if not np.all(pair[0] <= 1.0):
            raise ValueError(f"t_or_sigma must lie in [0, 1] on the flow path, got {pair[0].max()}")
        return 1.0 - pair[0], pair[0]
    if schedule == "ve":
        return np.ones(batch), pair[0]
    if np.any((pair[0] == 0.0) & (pair[1] == 0.0)):
        raise ValueError("t_or_sigma: alpha_t and sigma_t are both 0 for a sample (no path)")
    return pair[0], pair[1]


def _convert_inputs(pred, x_t, t_or_sigma, source, target, schedule, sigma_data):
    with named_errors("prediction_convert"):
        source = _checks.choice("source", source, PREDICTIONS)
        target = _checks.choice("target", target, PREDICTIONS)
        sd = _checks.positive("sigma_data", sigma_data)
        pred, x_t = _arrays(("pred", "x_t"), (pred, x_t))
        a, b = path_coefs(t_or_sigma, schedule, pred.shape[0])
        with np.errstate(divide="ignore", invalid="ignore"):  # det = 0 is refused just below
            A, C, det = convert_coefs(source, target, a, b, sd)
        if source != target and np.any(det == 0.0):
            raise ValueError(singular_message(source, target))
    return pred, x_t, A, C


def prediction_convert(pred, x_t, t_or_sigma, source, target, schedule="flow", sigma_data=0.5):
    r"""Convert a prediction between parameterizations on one Gaussian path (FLOW.11).

    On the path :math:`x_t = a\,x_0 + b\,\epsilon` every parameterization is a linear function of
    :math:`(x_0, \epsilon)`: 'eps' :math:`\epsilon`, 'x0' :math:`x_0`, 'v' :math:`a\epsilon - b x_0`
    (Salimans & Ho), 'flow' :math:`\epsilon - x_0` (the velocity of SD3's path; on any path the
    velocity of the flow path it is a rescaling of), 'edm_F' EDM's raw network output
    :math:`F = (x_0 - c_{\rm skip}\tilde x)/c_{\rm out}` at :math:`\sigma = b/a`,
    :math:`\tilde x = x_t/a` (the VE path :math:`\tilde x = x_0 + \sigma\epsilon`), i.e.
    :math:`F = (b x_0/\sigma_d - \sigma_d a\epsilon)/\sqrt{b^2 + \sigma_d^2a^2}`.  The target is

    .. math::
        \mathrm{target} = A\,x_t + C\,\mathrm{pred},\qquad
        A = \frac{q_xp_\epsilon - q_\epsilon p_x}{ap_\epsilon - bp_x},\quad
        C = \frac{aq_\epsilon - bq_x}{ap_\epsilon - bp_x}

    with :math:`(p_x, p_\epsilon)`, :math:`(q_x, q_\epsilon)` the source's and target's coefficients.

    Parameters
    ----------
    pred : ndarray, shape [B, ...]
        The source prediction.
    x_t : ndarray, shape of ``pred``
        The network's input on the path.
    t_or_sigma : ndarray, shape [B], or a pair of them
        schedule='flow': t in [0, 1] (:math:`a = 1 - t`, :math:`b = t`, SD3); 've': sigma >= 0
        (:math:`a = 1`, :math:`b = \sigma`, EDM); 'alpha_sigma': a pair (alpha_t, sigma_t) (a VP
        schedule's, or any); a ``DiffusionSchedule``: integer timesteps.
    source, target : {'eps', 'x0', 'v', 'flow', 'edm_F'}
    schedule : {'flow', 've', 'alpha_sigma'} or DiffusionSchedule
    sigma_data : float
        > 0, used by 'edm_F'.

    Returns
    -------
    ndarray, shape of ``pred``

    'eps' cannot be converted where :math:`a = 0` (pure noise) nor 'x0' where :math:`b = 0`
    (the data): a ``ValueError`` names the end point.
    """
    pred, x_t, A, C = _convert_inputs(pred, x_t, t_or_sigma, source, target, schedule, sigma_data)
    return result(batch_broadcast(A, pred.ndim) * x_t + batch_broadcast(C, pred.ndim) * pred)  # (FLOW.11)


def prediction_convert_backward(
    pred, x_t, t_or_sigma, grad_output, source, target, schedule="flow", sigma_data=0.5
):
    r"""Gradients of :func:`prediction_convert` w.r.t. ``pred`` and ``x_t`` (FLOW.11):
    :math:`(C g,\ A g)`, the per-sample coefficients times the upstream gradient.

    Returns
    -------
    (grad_pred, grad_x_t) : tuple of ndarrays
    """
    pred, x_t, A, C = _convert_inputs(pred, x_t, t_or_sigma, source, target, schedule, sigma_data)
    with named_errors("prediction_convert"):
        g = as_float64("grad_output", grad_output)
        _checks.same_shape("pred", pred.shape, "grad_output", g.shape)
    return result(batch_broadcast(C, g.ndim) * g), result(batch_broadcast(A, g.ndim) * g)


# ============================================================================= iCT discretization (FLOW.12)


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    r"""The EDM / iCT noise levels, ASCENDING (FLOW.12).

    .. math::
        \sigma_i = \Big(\sigma_{\min}^{1/\rho} + \frac{i}{n-1}\big(\sigma_{\max}^{1/\rho}
        - \sigma_{\min}^{1/\rho}\big)\Big)^\rho,\qquad i = 0, \dots, n-1

    (iCT's :math:`\sigma_1 < \dots < \sigma_N`; EDM's sampler and k-diffusion's ``get_sigmas_karras``
    run it backwards, k-diffusion appending 0).  The end points are exactly ``sigma_min`` and
    ``sigma_max``.

    Returns
    -------
    ndarray, shape [n], float64, strictly increasing
    """
    with named_errors("karras_sigmas"):
        n = _checks.positive_int("n", n, 2, "both end points")
        lo, hi = _checks.positive("sigma_min", sigma_min), _checks.positive("sigma_max", sigma_max)
        rho = _checks.positive("rho", rho)
        if not hi > lo:
            raise ValueError(f"sigma_max must be > sigma_min, got {hi} <= {lo}")
    # (FLOW.12) divided through by sigma_max^(1/rho): sigma_i = sigma_max (r + f_i (1 - r))^rho with
    # r = (sigma_min / sigma_max)^(1/rho) in (0, 1), so no power overflows (80^(1/rho) does for
    # rho < 0.0062); r underflowing to 0 only loses sigma_0, which is set exactly below
    r = (lo / hi) ** (1.0 / rho)
    out = hi * (r + np.arange(n) / (n - 1) * (1.0 - r)) ** rho
    out[0], out[-1] = lo, hi
    return out


def ict_num_steps(k, K, s0=10, s1=1280):
    r"""iCT's discretization curriculum (Song & Dhariwal 2023) (FLOW.12).

    .. math::
        N(k) = \min\big(s_0\,2^{\lfloor k/K'\rfloor}, s_1\big) + 1,\qquad
        K' = \Big\lfloor\frac{K}{\log_2\lfloor s_1/s_0\rfloor + 1}\Big\rfloor

    Parameters
    ----------
    k : int
        The training step, >= 0.
    K : int
        Total training steps; K' >= 1 is required.
    s0, s1 : int
        Initial and final number of steps, 1 <= s0 <= s1.

    Returns
    -------
    int
    """
    with named_errors("ict_num_steps"):
        for name, v in (("k", k), ("K", K), ("s0", s0), ("s1", s1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        s0, s1 = _checks.positive_int("s0", int(s0)), _checks.positive_int("s1", int(s1))
        if s1 < s0:
            raise ValueError(f"s1 must be >= s0, got {s1} < {s0}")
        K_prime = math.floor(int(K) / (math.log2(s1 // s0) + 1.0))
        if K_prime < 1:
            raise ValueError(f"K = {K} is too small: K' = floor(K / (log2 floor(s1/s0) + 1)) = {K_prime} < 1")
    doublings = int(k) // K_prime
    # (FLOW.12) s0 * 2^doublings is compared without forming a huge power
    return (s1 if doublings >= (s1 // s0).bit_length() else min(s0 * 2**doublings, s1)) + 1


_FULL_PRECISION = 2.0**-969  # 2^53 times float64's smallest normal: a sum above it has normal terms


def ict_sigma_probs(sigmas, p_mean=-1.1, p_std=2.0):
    r"""iCT's discrete lognormal over adjacent noise-level pairs (Song & Dhariwal 2023) (FLOW.12).

    .. math::
        p(\sigma_i) \propto \operatorname{erf}\Big(\frac{\ln\sigma_{i+1} - P_{\rm mean}}{\sqrt2 P_{\rm std}}\Big)
        - \operatorname{erf}\Big(\frac{\ln\sigma_i - P_{\rm mean}}{\sqrt2 P_{\rm std}}\Big)

    for the pairs :math:`(\sigma_i, \sigma_{i+1})`, normalised to sum to 1.  A difference of two
    erfs near :math:`\pm1` is taken as a difference of erfcs on that side (no cancellation in the
    tails), so a far pair's small probability keeps its relative accuracy.

    Parameters
    ----------
    sigmas : ndarray, shape [N]
        Strictly increasing noise levels > 0 (:func:`karras_sigmas`), N >= 2.

    Returns
    -------
    ndarray, shape [N - 1], float64, summing to 1
    """
    with named_errors("ict_sigma_probs"):
        s = as_float64("sigmas", sigmas)
        if s.ndim != 1 or s.size < 2:
            raise ValueError(f"sigmas must be a 1-D array of at least 2 noise levels, got shape {s.shape}")
        if not (np.all(np.isfinite(s)) and np.all(s > 0.0) and np.all(np.diff(s) > 0.0)):
            raise ValueError("sigmas must be finite, > 0 and strictly increasing")
        mean, std = _checks.finite("p_mean", p_mean), _checks.positive("p_std", p_std)
    z = (np.log(s) - mean) / (std * math.sqrt(2.0))
    lo, hi = z[:-1], z[1:]
    # (FLOW.12) erf(hi) - erf(lo) = erfc(lo) - erfc(hi) = erfc(-hi) - erfc(-lo): the erfcs of the small side
    upper = lo >= 0.0
    mass = np.where(upper, _erfc(lo) - _erfc(hi), _erfc(-hi) - _erfc(-lo))
    if mass.sum() > _FULL_PRECISION:
        return result(mass / mass.sum())
    # Every pair far in one tail (the erfcs underflow or are subnormal): the same masses in logs
    # (DIF.10's log(Phi(b) - Phi(a)), on the small side), normalised by the largest before
    # exponentiating.
    w = z * math.sqrt(2.0)  # standard normal arguments
    with np.errstate(divide="ignore"):  # a pair whose mass is 0 beside the others': log 0 = -inf
        log_mass = log_diff_ndtr(w[:-1], w[1:])
    mass = np.exp(log_mass - log_mass.max())
    return result(mass / mass.sum())


# ============================================================================= pseudo-Huber (FLOW.20)

ICT_HUBER_C = 0.00054  # iCT (Song & Dhariwal 2023, Sec. 3.3): c = 0.00054 sqrt(d), d = elements per sample


def huber_c(c, n: int) -> float:
    """The pseudo-Huber constant: ``0.00054 * sqrt(n)`` when ``c`` is None (iCT), else a finite c > 0."""
    if c is None:
        return ICT_HUBER_C * math.sqrt(n)
    return _checks.positive("c", c)


def pseudo_huber_rows(d: np.ndarray, c: float):
    r"""Per sample :math:`h_b = \sqrt{s_b + c^2} - c` of a difference ``d`` (B, ...), with
    :math:`s_b = \lVert d_b\rVert^2`, and :math:`q_b = \sqrt{s_b + c^2}` (FLOW.20).

    :math:`h` is evaluated as :math:`s/(q + c)`: the same number, without the cancellation of
    :math:`q - c` when :math:`s \ll c^2` (there :math:`h \approx s/2c`). The squares are never
    formed: with the scaled norm :math:`r = \lVert d_b\rVert` (:func:`row_norm`),
    :math:`q = \operatorname{hypot}(r, c)` and :math:`h = r\,(r/(q + c))`, so neither
    :math:`s` overflowing (:math:`r > 10^{154}`) nor :math:`c^2` underflowing (a tiny ``c``,
    where :math:`q = 0` at :math:`d = 0` would make the gradient :math:`d/q` NaN) loses a
    finite answer. :math:`r = \infty` gives :math:`h = \infty` (not :math:`\infty/\infty`)."""
    r = row_norm(d)
    q = np.hypot(r, c)
    with np.errstate(invalid="ignore"):  # r = inf: inf / inf, replaced below
        h = r * (r / (q + c))
    return np.where(np.isinf(r), r, h), q


def _huber_inputs(x, y, c, weights, reduction):
    with named_errors("pseudo_huber_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        x, y = _arrays(("x", "y"), (x, y), reduction)
        c = huber_c(c, x[0].size)
        w = None if weights is None else _sample_weights(weights, x.shape[0])
    d = x - y
    h, q = pseudo_huber_rows(d, c)
    return d, h, q, w, reduction


def pseudo_huber_loss(x, y, c=None, weights=None, reduction="mean"):
    r"""Pseudo-Huber distance per sample (iCT's metric; FLOW.20).

    .. math::
        L_b = \omega_b\left(\sqrt{\lVert x_b - y_b\rVert^2 + c^2} - c\right),\qquad
        c = 0.00054\sqrt{n}\ \text{by default}

    with the norm over all non-batch dims (:math:`n` elements per sample).  It is
    :math:`\approx\frac{\lVert x-y\rVert^2}{2c}` for :math:`\lVert x-y\rVert\ll c` and
    :math:`\approx\lVert x-y\rVert - c` for :math:`\lVert x-y\rVert\gg c`; evaluated as
    :math:`s/(\sqrt{s+c^2}+c)`, :math:`s = \lVert x-y\rVert^2` (no cancellation).

    Parameters
    ----------
    x, y : ndarray, shape [B, ...]
    c : float, optional
        > 0; default ``0.00054 * sqrt(n)`` (Song & Dhariwal 2023).
    weights : ndarray, shape [B], optional
        Per-sample weights >= 0 (differentiable).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    _d, h, _q, w, reduction = _huber_inputs(x, y, c, weights, reduction)
    return reduce_sum(h if w is None else w * h, reduction)  # (FLOW.20)


def pseudo_huber_loss_backward(x, y, grad_output, c=None, weights=None, reduction="mean"):
    r"""Gradients of :func:`pseudo_huber_loss` w.r.t. ``x``, ``y`` and (when given) ``weights`` (FLOW.20).

    .. math::
        \frac{\partial}{\partial x} = \frac{g_b\,\omega_b\,(x - y)}{\sqrt{s_b + c^2}},\qquad
        \frac{\partial}{\partial y} = -\frac{\partial}{\partial x},\qquad
        \frac{\partial}{\partial \omega_b} = g_b\,h_b

    Returns
    -------
    (grad_x, grad_y[, grad_weights]) : tuple of ndarrays
    """
    d, h, q, w, reduction = _huber_inputs(x, y, c, weights, reduction)
    with named_errors("pseudo_huber_loss"):
        gb = _reduction_weights(grad_output, reduction, d.shape[0])
    coef = gb / q if w is None else gb * w / q  # (FLOW.20) g w dh/ds * 2, dh/ds = 1/(2q)
    gx = batch_broadcast(coef, d.ndim) * d
    if w is None:
        return result(gx), result(-gx)
    return result(gx), result(-gx), result(gb * h)


# ============================================================================= EDM denoiser loss (FLOW.21-FLOW.23)

DENOISER_WEIGHTINGS = ("edm", "karras", "soft_min_snr", "snr", "min_snr")
# sigma above this is refused (the end point sigma -> inf): rho^6 = (sigma^2 + sigma_d^2)^3 stays in float64
SIGMA_MAX = 1e50


def check_sigmas(sigma: np.ndarray) -> None:
    r"""Noise levels: finite, in (0, 1e50]; the end points sigma = 0 and sigma -> inf refused, named."""
    if np.any(np.isnan(sigma)):
        raise ValueError("sigma must not be NaN")
    if np.any(sigma <= 0.0):
        raise ValueError(
            f"sigma must be > 0, got {sigma[sigma <= 0.0][0]} (sigma = 0 is the end point where "
            "c_out = 0 and the EDM weighting 1/c_out^2 is infinite)"
        )
    if np.any(sigma > SIGMA_MAX):
        raise ValueError(
            f"sigma must be <= {SIGMA_MAX:g}, got {sigma[sigma > SIGMA_MAX][0]} (the end point sigma -> inf: "
            "sigma^2 leaves float64's range)"
        )


def denoiser_rows(sigma, sigma_data, weighting, gamma):
    r"""Per-sample coefficients of the F-space denoiser loss (FLOW.21, FLOW.23), by arithmetic only
    (NumPy, torch or CuPy vectors: the native layer evaluates these same lines on the device).

    With :math:`\rho = \sqrt{\sigma^2 + \sigma_d^2}`: the target of the raw network output is
    :math:`F_{\rm tgt} = a\,x_0 + b\,\epsilon`, :math:`a = \sigma/(\sigma_d\rho)`,
    :math:`b = -\sigma_d/\rho`; :math:`W = \lambda(\sigma)\,c_{\rm out}^2` is the weight of the
    F-space mean square, :math:`W'` its derivative in :math:`\sigma`, and
    :math:`k = \sigma_d/\rho^3` the factor of :math:`\mathrm dF_{\rm tgt}/\mathrm d\sigma = k\,x_\sigma`.

    Returns
    -------
    (a, b, W, W', k) : five vectors of ``sigma``'s shape
    """
    sd2 = sigma_data * sigma_data
    s2 = sigma * sigma
    p2 = s2 + sd2  # rho^2 = sigma^2 + sigma_d^2
    rho = p2**0.5
    a = sigma / (sigma_data * rho)  # (FLOW.21) (1 - c_skip) / c_out
    b = -sigma_data / rho  # (FLOW.21) -c_skip sigma / c_out
    k = sigma_data / (p2 * rho)  # (FLOW.23) da/dsigma = k, db/dsigma = k sigma
    if weighting in ("edm", "karras"):  # (FLOW.22) lambda = 1 / c_out^2
        w, dw = sigma * 0.0 + 1.0, sigma * 0.0
    elif weighting == "snr":  # lambda = 1 / sigma^2
        w = sd2 / p2
        dw = -2.0 * sigma * sd2 / (p2 * p2)
    elif weighting == "soft_min_snr":  # lambda = 1 / (sigma^2 + sigma_d^2)
        w = s2 * sd2 / (p2 * p2)
        dw = 2.0 * sigma * sd2 * (sd2 - s2) / (p2 * p2 * p2)
    else:  # 'min_snr': lambda = min(1 / sigma^2, gamma)
        low = (gamma * s2 < 1.0) * 1.0  # 1 where gamma sigma^2 < 1 (lambda = gamma), else 0
        snr_w, snr_dw = sd2 / p2, -2.0 * sigma * sd2 / (p2 * p2)
        w = low * (gamma * s2 * snr_w) + (1.0 - low) * snr_w
        dw = low * (2.0 * gamma * sigma * sd2 * sd2 / (p2 * p2)) + (1.0 - low) * snr_dw
    return a, b, w, dw, k


def _denoiser_inputs(F, x0, noise, sigma, sigma_data, weighting, gamma, logvar, reduction):
    with named_errors("denoiser_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        weighting = _checks.choice("weighting", weighting, DENOISER_WEIGHTINGS)
        sigma_data = _checks.positive("sigma_data", sigma_data)
        gamma = _checks.positive("gamma", gamma)
        F, x0, noise = _arrays(("F", "x0", "noise"), (F, x0, noise), reduction)
        sigma = as_float64("sigma", sigma)
        if sigma.shape != (F.shape[0],):
            raise ValueError(
                f"sigma must have shape ({F.shape[0]},) (one noise level per sample), got {sigma.shape}"
            )
        check_sigmas(sigma)
        u = None if logvar is None else _per_sample_vector("logvar", logvar, F.shape[0])
    rows = denoiser_rows(sigma, sigma_data, weighting, gamma)  # (a, b, W, W', k)
    a, b = rows[0], rows[1]
    r = F - (batch_broadcast(a, F.ndim) * x0 + batch_broadcast(b, F.ndim) * noise)  # (FLOW.21) F - F_tgt
    m = (r * r).reshape(r.shape[0], -1).mean(axis=1)
    return r, m, sigma, rows, u, x0, noise, reduction


def denoiser_loss(
    F, x0, noise, sigma, sigma_data=0.5, weighting="edm", gamma=5.0, logvar=None, reduction="mean"
):
    r"""EDM's denoiser loss in the raw network output's space (Karras et al. 2022; FLOW.21, FLOW.23).

    .. math::
        L_b = \lambda(\sigma_b)\,\frac1n\sum_i (D_{b,i} - x_{0,b,i})^2,\qquad
        D = c_{\rm skip} x_\sigma + c_{\rm out} F,\quad x_\sigma = x_0 + \sigma\epsilon

    computed as :math:`W(\sigma)\,\frac1n\sum_i(F - F_{\rm tgt})^2` with
    :math:`D - x_0 = c_{\rm out}(F - F_{\rm tgt})`,
    :math:`F_{\rm tgt} = (\sigma x_0/\sigma_d - \sigma_d\epsilon)/\sqrt{\sigma^2+\sigma_d^2}` and
    :math:`W = \lambda c_{\rm out}^2` (no cancellation at small :math:`\sigma`).  Weightings
    (:math:`\lambda`; :math:`W`): ``'edm'`` and ``'karras'`` (k-diffusion's name)
    :math:`(\sigma^2+\sigma_d^2)/(\sigma\sigma_d)^2`; 1 --- ``'snr'`` :math:`1/\sigma^2`;
    :math:`\sigma_d^2/(\sigma^2+\sigma_d^2)` --- ``'soft_min_snr'`` :math:`1/(\sigma^2+\sigma_d^2)`;
    :math:`\sigma^2\sigma_d^2/(\sigma^2+\sigma_d^2)^2` --- ``'min_snr'`` :math:`\min(1/\sigma^2, \gamma)`;
    :math:`\min(1, \gamma\sigma^2)\,\sigma_d^2/(\sigma^2+\sigma_d^2)`.  With ``logvar`` :math:`u`
    (EDM2's uncertainty): :math:`L_b = e^{-u_b}\lambda\,\mathrm{mean}(D - x_0)^2 + u_b`.

    Parameters
    ----------
    F : ndarray, shape [B, ...]
        The raw network output (EDM's :math:`F_\theta`).
    x0, noise : ndarray, shape of ``F``
        Data and the unit Gaussian draw :math:`\epsilon`.
    sigma : ndarray, shape [B]
        Noise levels in (0, 1e50].
    sigma_data : float
        > 0.
    weighting : {'edm', 'karras', 'soft_min_snr', 'snr', 'min_snr'}
    gamma : float
        > 0, the cap of 'min_snr'.
    logvar : ndarray, shape [B], optional
        EDM2's per-sample log-variance (differentiable).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    _r, m, _s, (_a, _b, w, _dw, _k), u, _x0, _n, reduction = _denoiser_inputs(
        F, x0, noise, sigma, sigma_data, weighting, gamma, logvar, reduction
    )
    per = w * m if u is None else np.exp(-u) * w * m + u  # (FLOW.21, FLOW.23)
    return reduce_sum(per, reduction)


def denoiser_loss_backward(
    F, x0, noise, sigma, grad_output, sigma_data=0.5, weighting="edm", gamma=5.0, logvar=None,
    reduction="mean",
):  # fmt: skip
    r"""Gradients of :func:`denoiser_loss` w.r.t. ``F``, ``x0``, ``noise``, ``sigma`` and ``logvar``
    (FLOW.22, FLOW.23).

    With :math:`r = F - a x_0 - b\epsilon`, :math:`m_b = \frac1n\sum_i r^2`,
    :math:`K_b = g_b e^{-u_b} W_b`:

    .. math::
        \partial_F = \frac{2K_b r}{n},\quad \partial_{x_0} = -a\,\partial_F,\quad
        \partial_\epsilon = -b\,\partial_F,\quad
        \partial_{\sigma_b} = g_b e^{-u_b}\Big(W'm_b - \frac{2Wk}{n}\sum_i r\,(x_0 + \sigma\epsilon)\Big),\quad
        \partial_{u_b} = g_b\,(1 - e^{-u_b}W_b m_b)

    Returns
    -------
    (grad_F, grad_x0, grad_noise, grad_sigma[, grad_logvar]) : tuple of ndarrays
    """
    r, m, sigma, (a, b, w, dw, k), u, x0, noise, reduction = _denoiser_inputs(
        F, x0, noise, sigma, sigma_data, weighting, gamma, logvar, reduction
    )
    with named_errors("denoiser_loss"):
        gb = _reduction_weights(grad_output, reduction, r.shape[0])
    eu = 1.0 if u is None else np.exp(-u)
    n = r[0].size
    d_F = batch_broadcast(2.0 * gb * eu * w / n, r.ndim) * r  # (FLOW.23) 2 K r / n
    # dF_tgt/dsigma = k x0 + k sigma noise = k x_sigma: both coefficients bounded for every sigma
    slope = batch_broadcast(k, r.ndim) * x0 + batch_broadcast(k * sigma, r.ndim) * noise
    dot = (r * slope).reshape(r.shape[0], -1).sum(axis=1)
    grad_sigma = gb * eu * (dw * m - 2.0 * w * dot / n)  # (FLOW.23)
    grads = (
        result(d_F),
        result(-batch_broadcast(a, r.ndim) * d_F),
        result(-batch_broadcast(b, r.ndim) * d_F),
        result(grad_sigma),
    )
    if u is None:
        return grads
    return (*grads, result(gb * (1.0 - eu * w * m)))  # (FLOW.23) d/du of e^-u W m + u


# ============================================================================= consistency training (FLOW.24)


def _ct_inputs(f_student, f_target, sigma_i, sigma_next, c, reduction):
    with named_errors("consistency_training_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        fs, ft = _arrays(("f_student", "f_target"), (f_student, f_target), reduction)
        c = huber_c(c, fs[0].size)
        lo = _per_sample_vector("sigma_i", sigma_i, fs.shape[0])
        hi = _per_sample_vector("sigma_next", sigma_next, fs.shape[0])
        lam = ct_weight(lo, hi)
    h, q = pseudo_huber_rows(fs - ft, c)
    return fs - ft, h, q, lam, reduction


def ct_weight(sigma_i, sigma_next):
    r"""iCT's :math:`\lambda(\sigma_i) = 1/(\sigma_{i+1} - \sigma_i)` (FLOW.24), with
    :math:`0 \le \sigma_i < \sigma_{i+1}` checked (the difference formed in float64)."""
    if np.any(sigma_i < 0.0):
        raise ValueError(f"sigma_i must be >= 0, got {sigma_i[sigma_i < 0.0][0]}")
    gap = sigma_next - sigma_i
    if np.any(gap <= 0.0):
        j = int(np.argmax(gap <= 0.0))
        raise ValueError(
            f"sigma_next must be > sigma_i (adjacent noise levels sigma_i < sigma_(i+1)), got "
            f"sigma_next = {sigma_next[j]} <= sigma_i = {sigma_i[j]} at sample {j}"
        )
    return 1.0 / gap


def consistency_training_loss(f_student, f_target, sigma_i, sigma_next, c=None, reduction="mean"):
    r"""iCT's consistency-training loss (Song & Dhariwal 2023; FLOW.24).

    .. math::
        L_b = \frac{1}{\sigma_{i+1,b} - \sigma_{i,b}}
        \left(\sqrt{\lVert f_{\rm student} - f_{\rm target}\rVert^2 + c^2} - c\right)

    the pseudo-Huber distance (FLOW.20) between the student's output at :math:`\sigma_{i+1}`
    and the stop-gradient target's at :math:`\sigma_i`, weighted by iCT's
    :math:`\lambda(\sigma_i)`.  Only ``f_student`` is differentiable: ``f_target`` is a
    stop-gradient target and the noise levels are points of the discretization.

    Parameters
    ----------
    f_student : ndarray, shape [B, ...]
        The consistency function at the larger noise level :math:`\sigma_{i+1}`.
    f_target : ndarray, shape of ``f_student``
        Its value at :math:`\sigma_i` (no gradient).
    sigma_i, sigma_next : ndarray, shape [B]
        Adjacent noise levels, :math:`0 \le \sigma_i < \sigma_{i+1}`.
    c : float, optional
        > 0; default ``0.00054 * sqrt(n)``.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    _d, h, _q, lam, reduction = _ct_inputs(f_student, f_target, sigma_i, sigma_next, c, reduction)
    return reduce_sum(lam * h, reduction)  # (FLOW.24)


def consistency_training_loss_backward(
    f_student, f_target, sigma_i, sigma_next, grad_output, c=None, reduction="mean"
):
    r"""Gradient of :func:`consistency_training_loss` w.r.t. ``f_student`` (FLOW.24):
    :math:`g_b\lambda_b\,(f_{\rm student} - f_{\rm target})/\sqrt{s_b + c^2}`.

    Returns
    -------
    (grad_f_student,) : tuple of one ndarray
    """
    d, _h, q, lam, reduction = _ct_inputs(f_student, f_target, sigma_i, sigma_next, c, reduction)
    with named_errors("consistency_training_loss"):
        gb = _reduction_weights(grad_output, reduction, d.shape[0])
    return (result(batch_broadcast(gb * lam / q, d.ndim) * d),)  # (FLOW.20, FLOW.24)


# ============================================================================= distillation (FLOW.30-FLOW.36)
# The four few-step objectives whose targets are stop-gradient quantities the user computes (a
# teacher's output, a JVP): only the student's output is differentiable.  vsd_loss, sds_loss and
# meanflow_loss are SURROGATES: their backward is the prescribed gradient with the stop-gradient
# factors frozen, which is not the derivative of their value (FLOW.30).

VSD_EPS = 1e-6  # DMD2's normaliser 1 / (mean|x - x0_real| + 1e-6): finite (1e6) when x = x0_real
TRIGFLOW_T_MAX = math.pi / 2  # TrigFlow's angle t in [0, pi/2]: t = 0 data, t = pi/2 noise
_T_MAX_ROUNDED = float(np.float32(TRIGFLOW_T_MAX))  # pi/2 rounded to float32 is above pi/2: admitted


def row_norm(g: np.ndarray) -> np.ndarray:
    r"""Per-sample L2 norm over the non-batch dims, scaled by the row's max-abs so no square
    overflows or underflows (FLOW.31): :math:`\lVert g\rVert = m\,\lVert g/m\rVert`,
    :math:`m = \max_i |g_i|` (NaN in, NaN out; inf gives inf)."""
    flat = g.reshape(g.shape[0], -1)
    m = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(flat.shape[0])
    m = np.where((m > 0.0) & np.isfinite(m), m, 1.0)  # 0 rows (and NaN / inf ones) unscaled
    return m * np.sqrt(((flat / m[:, None]) ** 2).sum(axis=1))


def scm_rows(cos_t, sin_t, r):
    r"""sCM's per-sample tangent coefficients (FLOW.31), by arithmetic only (NumPy, torch or CuPy
    vectors; the native layer evaluates these lines on the device):
    :math:`g = \alpha(\sigma_dF^- - \dot x_t) + \beta(x_t + \sigma_d\dot F^-)`,
    :math:`\alpha = -\cos^2t`, :math:`\beta = -r\cos t\sin t`."""
    return -(cos_t * cos_t), -r * cos_t * sin_t


def scm_params(sigma_data, r, c):
    """(sigma_data > 0, r in [0, 1] (the tangent warm-up), c > 0), checked."""
    sd = _checks.positive("sigma_data", sigma_data)
    rr = _checks.nonnegative("r", r)
    if rr > 1.0:
        raise ValueError(f"r (the tangent warm-up factor min(1, iteration / H)) must lie in [0, 1], got {rr}")
    return sd, rr, _checks.positive("c", c)


def check_angles(t: np.ndarray) -> None:
    """TrigFlow angles: every t in [0, pi/2] (NaN refused)."""
    ok = (t >= 0.0) & (t <= _T_MAX_ROUNDED)
    if not np.all(ok):
        raise ValueError(
            f"t (the TrigFlow angle) must lie in [0, pi/2] (t = 0 data, pi/2 noise), got {t[~ok][0]}"
        )


def _scm_inputs(F, F_minus, dF_dt, x_t, dxt_dt, t, sigma_data, r, c, logvar, reduction):
    with named_errors("scm_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        sd, rr, c = scm_params(sigma_data, r, c)
        F, fm, dfm, xt, dxt = _arrays(("F", "F_minus", "dF_dt", "x_t", "dxt_dt"), (F, F_minus, dF_dt, x_t, dxt_dt),
                                      reduction)  # fmt: skip
        t = _per_sample_vector("t", t, F.shape[0])
        check_angles(t)
        u = None if logvar is None else _per_sample_vector("logvar", logvar, F.shape[0])
    alpha, beta = (batch_broadcast(v, F.ndim) for v in scm_rows(np.cos(t), np.sin(t), rr))
    g = alpha * (sd * fm - dxt) + beta * (xt + sd * dfm)  # (FLOW.31) the tangent
    g_hat = g / batch_broadcast(row_norm(g) + c, F.ndim)  # (FLOW.31) normalized
    res = F - fm - g_hat  # (FLOW.32)
    m = (res * res).reshape(res.shape[0], -1).mean(axis=1)
    return res, m, u, reduction


def scm_loss(F, F_minus, dF_dt, x_t, dxt_dt, t, sigma_data=0.5, r=1.0, c=0.1, logvar=None, reduction="mean"):
    r"""sCM's continuous-time consistency loss (Lu & Song 2024, Algorithm 1; FLOW.31, FLOW.32).

    .. math::
        g = -\cos^2t\,(\sigma_dF^- - \tfrac{\mathrm dx_t}{\mathrm dt})
            - r\cos t\sin t\,(x_t + \sigma_d\tfrac{\mathrm dF^-}{\mathrm dt}),\qquad
        \hat g = \frac{g}{\lVert g\rVert + c},\qquad
        L_b = \frac1n\sum_i (F - F^- - \hat g)^2\ \big(\times e^{-u_b}\ {+}\ u_b\ \text{with}\ \texttt{logvar}\big)

    with :math:`\lVert g\rVert` the L2 norm of sample b's tangent over all its dims (the
    paper's; computed max-abs scaled, FLOW.31) and the paper's adaptive weight :math:`w = -u`.
    Only ``F`` (and ``logvar``) is differentiable: ``F_minus`` (:math:`F_{\theta^-}`, the
    stop-gradient copy), ``dF_dt`` (its JVP), ``x_t``, ``dxt_dt`` and ``t`` are constants.

    Parameters
    ----------
    F : ndarray, shape [B, ...]
        The student's raw output :math:`F_\theta(x_t/\sigma_d, t)`.
    F_minus, dF_dt, x_t, dxt_dt : ndarray, shape of ``F``
        :math:`F_{\theta^-}`, its total derivative in t (the user's JVP), the noisy input
        :math:`x_t = \cos t\,x_0 + \sin t\,z` and :math:`\mathrm dx_t/\mathrm dt` (sCT:
        :math:`\cos t\,z - \sin t\,x_0`; sCD: :math:`\sigma_d F_{\rm pretrain}`).
    t : ndarray, shape [B]
        TrigFlow angles in [0, pi/2].
    sigma_data : float
        > 0.
    r : float
        The tangent warm-up factor in [0, 1] (1 after warm-up).
    c : float
        > 0, the normalisation constant (0.1 in the paper).
    logvar : ndarray, shape [B], optional
        The adaptive log-variance :math:`u = -w_\phi(t)` (differentiable).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    _res, m, u, reduction = _scm_inputs(
        F, F_minus, dF_dt, x_t, dxt_dt, t, sigma_data, r, c, logvar, reduction
    )
    return reduce_sum(m if u is None else np.exp(-u) * m + u, reduction)  # (FLOW.32)


def scm_loss_backward(
    F,
    F_minus,
    dF_dt,
    x_t,
    dxt_dt,
    t,
    grad_output,
    sigma_data=0.5,
    r=1.0,
    c=0.1,
    logvar=None,
    reduction="mean",
):
    r"""Gradients of :func:`scm_loss` w.r.t. ``F`` and (when given) ``logvar`` (FLOW.32):
    :math:`\partial_F = 2g_be^{-u_b}(F - F^- - \hat g)/n`,
    :math:`\partial_{u_b} = g_b(1 - e^{-u_b}m_b)`.

    Returns
    -------
    (grad_F[, grad_logvar]) : tuple of ndarrays
    """
    res, m, u, reduction = _scm_inputs(F, F_minus, dF_dt, x_t, dxt_dt, t, sigma_data, r, c, logvar, reduction)
    with named_errors("scm_loss"):
        gb = _reduction_weights(grad_output, reduction, res.shape[0])
    eu = 1.0 if u is None else np.exp(-u)
    grad_F = result(batch_broadcast(2.0 * gb * eu / res[0].size, res.ndim) * res)
    return (grad_F,) if u is None else (grad_F, result(gb * (1.0 - eu * m)))


def _unit_vector(name, value, batch):
    """A per-sample vector in [0, 1] (the MeanFlow times; NaN refused)."""
    a = _per_sample_vector(name, value, batch)
    if np.any((a < 0.0) | (a > 1.0)):
        raise ValueError(
            f"{name} must lie in [0, 1] (t = 0 data, t = 1 noise), got {a[(a < 0.0) | (a > 1.0)][0]}"
        )
    return a


def meanflow_params(p, eps):
    """(p >= 0, eps > 0), checked: eps > 0 keeps w = (delta + eps)^-p finite at delta = 0."""
    return _checks.nonnegative("p", p), _checks.positive("eps", eps)


def _meanflow_inputs(u, v, du_dt, t, r, p, eps, reduction):
    with named_errors("meanflow_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        p, eps = meanflow_params(p, eps)
        u, v, du = _arrays(("u", "v", "du_dt"), (u, v, du_dt), reduction)
        t = _unit_vector("t", t, u.shape[0])
        r = _unit_vector("r", r, u.shape[0])
    k = batch_broadcast(t - r, u.ndim)
    # (FLOW.33) at r = t du_dt does not enter (selected out, not multiplied: an inf JVP there is no NaN)
    u_tgt = v - k * np.where(k == 0.0, 0.0, du)
    d = u - u_tgt
    delta = (d * d).reshape(d.shape[0], -1).sum(axis=1)  # the squared L2 norm (the paper's, official code's)
    return d, delta, (delta + eps) ** -p, reduction


def meanflow_loss(u, v, du_dt, t, r, p=1.0, eps=1e-3, reduction="mean"):
    r"""MeanFlow's loss with its adaptive weight (Geng et al. 2025, Eqs. 9-10, Sec. 4.3; FLOW.33).

    .. math::
        u_{\rm tgt} = \mathrm{sg}\big(v - (t - r)\tfrac{\mathrm du}{\mathrm dt}\big),\qquad
        \delta_b = \lVert u_b - u_{{\rm tgt},b}\rVert_2^2,\qquad
        L_b = \mathrm{sg}(w_b)\,\delta_b,\quad w_b = (\delta_b + \epsilon)^{-p}

    :math:`\delta` is the SUM of squares over the non-batch dims (the paper's
    :math:`\lVert\Delta\rVert_2^2`; the official code sums over (C, H, W)), so with
    ``reduction='mean'`` this is the official loss exactly.  The backward is the surrogate's
    :math:`2w_b(u - u_{\rm tgt})` (w frozen), not the derivative of the value (FLOW.30).
    At :math:`r = t` the JVP term is left out (not multiplied by 0).

    Parameters
    ----------
    u : ndarray, shape [B, ...]
        The predicted average velocity :math:`u_\theta(z_t, r, t)`.
    v, du_dt : ndarray, shape of ``u``
        The instantaneous velocity and the total derivative of u along (v, 0, 1) (the user's
        JVP); no gradient.
    t, r : ndarray, shape [B]
        Times in [0, 1].
    p : float
        >= 0, the weight's power (1 - gamma in the paper; 1.0 by default, 0: plain L2).
    eps : float
        > 0 (the paper's c = 1e-3).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    _d, delta, w, reduction = _meanflow_inputs(u, v, du_dt, t, r, p, eps, reduction)
    return reduce_sum(w * delta, reduction)  # (FLOW.33)


def meanflow_loss_backward(u, v, du_dt, t, r, grad_output, p=1.0, eps=1e-3, reduction="mean"):
    r"""The surrogate gradient of :func:`meanflow_loss` w.r.t. ``u`` (FLOW.33):
    :math:`2g_bw_b(u - u_{\rm tgt})` with :math:`w_b` a constant.

    Returns
    -------
    (grad_u,) : tuple of one ndarray
    """
    d, _delta, w, reduction = _meanflow_inputs(u, v, du_dt, t, r, p, eps, reduction)
    with named_errors("meanflow_loss"):
        gb = _reduction_weights(grad_output, reduction, d.shape[0])
    return (result(batch_broadcast(2.0 * gb * w, d.ndim) * d),)


def vsd_weight(abs_mean):
    """DMD2's per-sample normaliser 1 / (mean|x - x0_real| + 1e-6) (FLOW.34), arithmetic only."""
    return 1.0 / (abs_mean + VSD_EPS)


def _vsd_inputs(x, x0_fake, x0_real, reduction):
    with named_errors("vsd_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        x, fake, real = _arrays(("x", "x0_fake", "x0_real"), (x, x0_fake, x0_real), reduction)
    w = vsd_weight(np.abs(x - real).reshape(x.shape[0], -1).mean(axis=1))
    grad = batch_broadcast(w, x.ndim) * (fake - real)  # (FLOW.34) the distribution-matching gradient
    return grad, reduction


def vsd_loss(x, x0_fake, x0_real, reduction="mean"):
    r"""DMD2's distribution-matching (VSD) surrogate (Yin et al. 2024; FLOW.34).

    .. math::
        w_b = \frac{1}{\frac1n\sum_i|x - x_0^{\rm real}| + 10^{-6}},\qquad
        \nabla_b = w_b\,(x_0^{\rm fake} - x_0^{\rm real}),\qquad
        L_b = \tfrac12\,\tfrac1n\sum_i\big(x - \mathrm{sg}(x - \nabla_b)\big)^2
            = \tfrac{1}{2n}\lVert\nabla_b\rVert^2

    whose gradient w.r.t. the generator output ``x`` is :math:`\nabla_b/n` (w, the two
    denoisers' outputs: no gradient).  Per sample the MEAN over dims, so with
    ``reduction='mean'`` value and gradient are DMD2's
    ``0.5 * F.mse_loss(x, (x - grad).detach())`` exactly (its mean runs over batch and dims).
    The value depends on ``x`` only through the frozen w: the backward is the surrogate's, not
    the derivative of the value (FLOW.30).

    Parameters
    ----------
    x : ndarray, shape [B, ...]
        The generator's output (the clean sample the two denoisers were queried at).
    x0_fake, x0_real : ndarray, shape of ``x``
        The fake (student-distribution) and real (teacher) denoisers' x0 predictions.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    grad, reduction = _vsd_inputs(x, x0_fake, x0_real, reduction)
    return reduce_mean(0.5 * grad * grad, reduction)  # (FLOW.34)


def vsd_loss_backward(x, x0_fake, x0_real, grad_output, reduction="mean"):
    r"""The gradient of :func:`vsd_loss` w.r.t. ``x``: :math:`g_b w_b(x_0^{\rm fake} - x_0^{\rm real})/n`
    (FLOW.34).

    Returns
    -------
    (grad_x,) : tuple of one ndarray
    """
    grad, reduction = _vsd_inputs(x, x0_fake, x0_real, reduction)
    with named_errors("vsd_loss"):
        gb = _reduction_weights(grad_output, reduction, grad.shape[0])
    return (result(batch_broadcast(gb / grad[0].size, grad.ndim) * grad),)


def _sds_inputs(x, eps_pred, noise, weights, reduction):
    with named_errors("sds_loss"):
        reduction = _checks.reduction(reduction, _ALL)
        x, e, z = _arrays(("x", "eps_pred", "noise"), (x, eps_pred, noise), reduction)
        if weights is None:
            raise TypeError("weights (w(t), one per sample) must be given")
        w = _sample_weights(weights, x.shape[0])
    # (FLOW.35) the SDS gradient; + 0 x: x cancels in x - sg(x - grad), but a NaN / inf x gives NaN as the
    # literal surrogate does (NaN in, NaN out), without its rounding (x - (x - grad) != grad for |x| >> |grad|)
    return batch_broadcast(w, x.ndim) * (e - z) + 0.0 * x, reduction


def sds_loss(x, eps_pred, noise, weights, reduction="mean"):
    r"""Score distillation sampling as a surrogate loss (DreamFusion, Poole et al. 2022; FLOW.35).

    .. math::
        \nabla_b = w_b\,(\hat\epsilon - \epsilon),\qquad
        L_b = \tfrac12\sum_i\big(x - \mathrm{sg}(x - \nabla_b)\big)^2 = \tfrac12\lVert\nabla_b\rVert^2

    whose gradient w.r.t. ``x`` is exactly :math:`w_b(\hat\epsilon - \epsilon)` per element
    (per-sample SUM; ``eps_pred``, ``noise`` and ``weights``: no gradient).  With
    ``reduction='mean'`` value and gradient are threestudio's / stable-dreamfusion's
    ``0.5 * F.mse_loss(x, (x - grad).detach(), reduction='sum') / B``.  The value
    :math:`\frac12 w_b^2\lVert\hat\epsilon - \epsilon\rVert^2` does not depend on ``x``: a
    number to log, not an objective; the backward is the surrogate's (FLOW.30).

    Parameters
    ----------
    x : ndarray, shape [B, ...]
        The rendered / generated sample (the diffusion model's clean input).
    eps_pred, noise : ndarray, shape of ``x``
        The frozen diffusion model's noise prediction at :math:`x_t` and the noise drawn.
    weights : ndarray, shape [B]
        :math:`w(t) \ge 0` per sample (e.g. :math:`1 - \bar\alpha_t`).
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    ndarray, shape [] or [B] for ``'none'``
    """
    grad, reduction = _sds_inputs(x, eps_pred, noise, weights, reduction)
    return reduce_sum(0.5 * grad * grad, reduction)  # (FLOW.35)


def sds_loss_backward(x, eps_pred, noise, weights, grad_output, reduction="mean"):
    r"""The gradient of :func:`sds_loss` w.r.t. ``x``: :math:`g_bw_b(\hat\epsilon - \epsilon)` (FLOW.35).

    Returns
    -------
    (grad_x,) : tuple of one ndarray
    """
    grad, reduction = _sds_inputs(x, eps_pred, noise, weights, reduction)
    with named_errors("sds_loss"):
        gb = _reduction_weights(grad_output, reduction, grad.shape[0])
    return (result(batch_broadcast(gb, grad.ndim) * grad),)
