r"""Shared pieces of the NumPy reference: conversion, stable primitives, reductions.

Everything here is float64 and written out in full, so a reader can check each
line against the derivations without knowing any library.

Reduction convention (``notes/API.md``): the batch is dim 0; the per-sample
value is the SUM over all non-batch dims (``reduce_sum``) -- or, for the L1
family only, the MEAN over them (``reduce_mean``); then ``'mean'`` averages the
per-sample values over the batch, ``'sum'`` adds them and ``'none'`` returns
them, shape ``(B,)``.  ``grad_sum`` / ``grad_mean`` are the matching backward
passes: they broadcast ``grad_output`` back to every element of the input.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _checks

__all__ = [
    "as_float64",
    "batch_array",
    "batch_broadcast",
    "grad_mean",
    "grad_sum",
    "labels_array",
    "log_diff_ndtr",
    "log_diff_ndtr_grad",
    "log_ndtr",
    "log_ndtr_grad",
    "log_normal_pdf",
    "log_sigmoid",
    "logsumexp",
    "reduce_mean",
    "reduce_sum",
    "result",
    "scalar_grad",
    "sigmoid",
    "softmax",
    "softplus",
    "sum_to_shape",
]


# ----------------------------------------------------------------------------- conversion


def as_float64(name: str, x: object) -> np.ndarray:
    """``x`` as a float64 ndarray; complex, boolean or non-numeric input is a ``TypeError``."""
    try:
        a = np.asarray(x)
    except ValueError as err:  # ragged nested sequences
        raise TypeError(f"{name} must be a real numeric array ({err})") from None
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def batch_array(name: str, x: object, reduction: str = "mean", min_ndim: int = 1) -> np.ndarray:
    """``as_float64`` plus the batch checks of ``_checks.batched`` (batch first, not empty)."""
    a = as_float64(name, x)
    _checks.batched(name, a.shape, reduction, min_ndim)
    return a


def labels_array(name: str, x: object, batch: int, num_classes: int) -> np.ndarray:
    """1-D integer class labels of length ``batch`` with values in ``[0, num_classes)``."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype (int64 or int32), got {a.dtype}")
    _checks.ndim(name, a.shape, 1)
    if a.shape[0] != batch:
        raise ValueError(f"{name} must have length {batch} (the batch size), got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{a.min()}, {a.max()}]")
    return a.astype(np.int64, copy=False)


def result(x: object) -> np.ndarray:
    """Return values as float64 ndarrays (0-d for scalars): ufuncs turn 0-d arrays into scalars."""
    return np.asarray(x, dtype=np.float64)


def scalar_grad(name: str, grad: object) -> np.ndarray:
    """A 0-d upstream gradient (for scalar-valued ops)."""
    g = as_float64(name, grad)
    if g.ndim != 0:
        raise ValueError(f"{name} must be a scalar (the op returns a scalar), got shape {g.shape}")
    return g


# ----------------------------------------------------------------------------- stable primitives


def softplus(x: np.ndarray) -> np.ndarray:
    r"""softplus(x) = log(1 + e^x), computed as max(x, 0) + log1p(e^{-|x|}) (never overflows)."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    r"""log sigmoid(x) = -softplus(-x)  (GAN.2), never log of a rounded probability."""
    return -softplus(-x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    r"""sigmoid(x) = 1/(1+e^{-x}), sign-split so the exponent is never positive.

    x >= 0: 1/(1+e^{-x});  x < 0: e^{x}/(1+e^{x}).  Both use e = e^{-|x|} <= 1.
    """
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""log sum_k e^{x_k} = m + log sum_k e^{x_k - m} with m = max_k x_k (every exponent <= 0).

    A row that is all ``-inf`` gives ``-inf`` (the shift is then taken as 0).
    """
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""softmax(x)_k = e^{x_k - logsumexp(x)}, the gradient of ``logsumexp``."""
    return np.exp(x - np.expand_dims(logsumexp(x, axis=axis), axis))


# ----------------------------------------------------------------------------- the normal CDF in log space

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_erfc = np.vectorize(math.erfc, otypes=[np.float64])  # libm erfc: relative accuracy into the far tail
_erf = np.vectorize(math.erf, otypes=[np.float64])  # libm erf: a few ulp relative near 0
_ERF_BELOW = 1.0  # log_diff_ndtr takes the erf difference when both ends are inside (-1, 1)
# Below this argument log Phi is taken from the asymptotic (Mills-ratio) series; above it from
# erfc, which is accurate to a few ulp relative until it underflows near z = -38.
_ASYMPTOTIC_BELOW = -20.0
_ASYMPTOTIC_TERMS = 12


def log_normal_pdf(z: np.ndarray) -> np.ndarray:
    r"""log phi(z) = -z^2/2 - log sqrt(2 pi), the standard normal log-density."""
    z = np.asarray(z, dtype=np.float64)
    return -0.5 * z * z - _LOG_SQRT_2PI


def _mills_series(z: np.ndarray) -> np.ndarray:
    r"""S(z) = sum_{n=0}^{N} (-1)^n (2n-1)!! / z^{2n}, so that Phi(z) = phi(z) S(z) / (-z) as z -> -inf.

    The series is asymptotic: for z <= -20 and N = 12 the first omitted term is
    25!! / 20^26 < 1e-22 relative, far below float64 rounding.
    """
    w = 1.0 / (z * z)
    s = np.ones_like(w)
    for n in range(_ASYMPTOTIC_TERMS, 0, -1):  # Horner: 1 - w(1 - 3w(1 - 5w(...)))
        s = 1.0 - (2 * n - 1) * w * s
    return s


def log_ndtr(z: np.ndarray) -> np.ndarray:
    r"""log Phi(z), the log of the standard normal CDF, accurate to a few ulp for every z.

    .. math::
        \log\Phi(z) = \begin{cases}
            \operatorname{log1p}\big(-\tfrac12\operatorname{erfc}(z/\sqrt2)\big) & z > 0 \\
            \log\big(\tfrac12\operatorname{erfc}(-z/\sqrt2)\big) & -20 \le z \le 0 \\
            -\tfrac{z^2}{2} - \log(-z) - \log\sqrt{2\pi} + \log S(z) & z < -20
        \end{cases}

    ``erfc`` keeps full relative accuracy in its tail (``1 - erf`` would not), ``log1p``
    keeps it where Phi is close to 1, and the asymptotic series takes over before
    ``erfc`` underflows (z < -38), so log Phi stays finite down to z ~ -1e154
    (then ``-inf``, as z^2 overflows).  Phi(+inf) = 1 gives 0, Phi(-inf) gives ``-inf``.
    """
    z = np.asarray(z, dtype=np.float64)
    upper = z > 0
    tail = z < _ASYMPTOTIC_BELOW
    middle = ~upper & ~tail
    out = np.empty_like(z)
    out[upper] = np.log1p(-0.5 * _erfc(z[upper] * _SQRT_HALF))
    out[middle] = np.log(0.5 * _erfc(-z[middle] * _SQRT_HALF))
    zt = z[tail]
    with np.errstate(over="ignore"):  # z^2 overflows only for |z| > 1e154: log Phi = -inf, correctly
        out[tail] = log_normal_pdf(zt) - np.log(-zt) + np.log(_mills_series(zt))
    out[np.isnan(z)] = np.nan
    return out


def log_ndtr_grad(z: np.ndarray) -> np.ndarray:
    r"""d/dz log Phi(z) = phi(z)/Phi(z) (the inverse Mills ratio), >= 0 and finite for finite z.

    For z < -20 it is -z / S(z) from the same series as ``log_ndtr`` (no cancellation
    of the two large exponents); elsewhere exp(log phi(z) - log Phi(z)), whose
    exponent is a difference of numbers below ~200 in magnitude.  It tends to 0 as
    z -> +inf and behaves like -z as z -> -inf.
    """
    z = np.asarray(z, dtype=np.float64)
    tail = z < _ASYMPTOTIC_BELOW
    out = np.empty_like(z)
    zt = z[tail]
    out[tail] = -zt / _mills_series(zt)
    zr = z[~tail]
    out[~tail] = np.exp(log_normal_pdf(zr) - log_ndtr(zr))
    return out


def log_diff_ndtr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""log(Phi(b) - Phi(a)) for a < b (a may be -inf, b may be +inf), without forming either CDF.

    By the symmetry Phi(b) - Phi(a) = Phi(-a) - Phi(-b), the pair is first moved to
    the lower side: (lo, hi) = (a, b) if a + b <= 0 else (-b, -a), so hi + lo <= 0 and
    Phi(lo) <= Phi(hi) with Phi(lo) < 1/2.  Then

    .. math::
        \log(\Phi(hi) - \Phi(lo)) = \log\Phi(hi) + \operatorname{log1p}\big(
            -e^{\log\Phi(lo) - \log\Phi(hi)}\big),

    every term in log space: finite for any a < b that are not both in one far tail
    past |z| ~ 1e154, and never a clamp.  Relative accuracy of the difference is
    about eps |log Phi(lo)| Phi(lo) / ((b - a) phi): full for bins of width >~ 1e-4
    standard deviations, degrading for narrower ones.

    When both ends lie in (-1, 1) the log form is replaced by the erf difference,

    .. math::
        \log(\Phi(b) - \Phi(a)) = \log\big(\tfrac12(\operatorname{erf}(b/\sqrt2)
            - \operatorname{erf}(a/\sqrt2))\big),

    whose relative error is about eps erf(|z|/sqrt2) / ((b - a) phi) ~ eps |z| / (b - a):
    the log form pays eps |log Phi| Phi / phi ~ eps / (b - a) even for a bin centred
    at 0, where the two log-CDFs are both near log 1/2 and their difference (the whole
    answer) drowns below an ulp once the bin is narrower than eps (a decoder of
    log-scale 35 returned -inf).  Measured against mpmath, the two errors cross near
    |z| ~ 0.9: at 1 the erf form is within 15% of the log form, inside it up to 10x
    better, beyond it worse (2.5x at |z| = 2); hence the cut at 1.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # -inf + inf = nan: the (-inf, inf) bin, handled as "not flipped"
        flip = (a + b) > 0
    lo = np.where(flip, -b, a)
    hi = np.where(flip, -a, b)
    log_hi = log_ndtr(hi)
    # invalid: lo = hi = -inf cannot occur for a < b; divide: log1p(-1) where the two log-CDFs
    # round together, entries the erf difference below replaces
    with np.errstate(invalid="ignore", divide="ignore"):
        out = log_hi + np.log1p(-np.exp(log_ndtr(lo) - log_hi))
    # (DIF.10) both ends in (-1, 1): the erf difference, exact for a centred bin of any width
    # (an infinite or NaN end fails the test and keeps the log form)
    near = (np.abs(a) < _ERF_BELOW) & (np.abs(b) < _ERF_BELOW)
    if np.any(near):
        mass = 0.5 * (_erf(b[near] * _SQRT_HALF) - _erf(a[near] * _SQRT_HALF))
        with np.errstate(divide="ignore"):  # a = b: an empty bin, log 0 = -inf
            out = np.asarray(out).copy()
            out[near] = np.log(mass)
    return out


def log_diff_ndtr_grad(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""The slopes of ``log_diff_ndtr`` for finite a < b: d/da = -phi(a)/P and d/db = phi(b)/P,
    P = Phi(b) - Phi(a).

    Moved to the lower side as ``log_diff_ndtr`` does, (lo, hi) with lo + hi <= 0, and with
    r = log Phi(lo) - log Phi(hi) <= 0, each slope is an inverse Mills ratio m = phi/Phi
    (``log_ndtr_grad``) over a factor in [0, 1] or above it:

    .. math::
        \frac{\phi(hi)}{P} = \frac{m(hi)}{-\operatorname{expm1}(r)},\qquad
        \frac{\phi(lo)}{P} = \frac{m(lo)}{\operatorname{expm1}(-r)}.

    Forming exp(log phi(z) - log P) instead subtracts two numbers ~ z^2/2 that agree in their
    leading digits: far in a tail (a decoder log-scale of -18, |z| ~ 1e7) it lost every digit.
    r has an absolute error of a few ulp of z^2/2 while it is ~ (hi - lo)|z| when small, so the
    factors keep a relative error ~ eps |z| / (hi - lo), independent of how deep the tail is.

    Both ends in (-1, 1) (the erf difference of ``log_diff_ndtr``): r rounds to 0 for a
    centred bin narrower than eps, so there the exponent form is kept, whose two terms are
    small (|log phi| < 1.5) and log P is exact."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    flip = (a + b) > 0
    lo = np.where(flip, -b, a)
    hi = np.where(flip, -a, b)
    r = log_ndtr(lo) - log_ndtr(hi)
    # divide: r = 0 where the two log-CDFs round together (log P = -inf there too): an infinite slope
    with np.errstate(divide="ignore", over="ignore"):
        d_hi = log_ndtr_grad(hi) / -np.expm1(r)  # phi(hi) / P
        d_lo = log_ndtr_grad(lo) / np.expm1(-r)  # phi(lo) / P (expm1 overflows: a zero slope)
    # back on the original side: Phi(b) - Phi(a) = Phi(-a) - Phi(-b), so a flipped pair swaps roles
    da = -np.where(flip, d_hi, d_lo)
    db = np.where(flip, d_lo, d_hi)
    near = (np.abs(a) < _ERF_BELOW) & (np.abs(b) < _ERF_BELOW)
    if np.any(near):
        logp = log_diff_ndtr(a[near], b[near])
        with np.errstate(over="ignore"):  # an empty bin (a = b): log P = -inf, an infinite slope
            da, db = np.asarray(da).copy(), np.asarray(db).copy()
            da[near] = -np.exp(log_normal_pdf(a[near]) - logp)
            db[near] = np.exp(log_normal_pdf(b[near]) - logp)
    return da, db


# ----------------------------------------------------------------------------- reductions


def batch_broadcast(per_sample: np.ndarray, ndim: int) -> np.ndarray:
    """A per-sample vector (B,) reshaped to (B, 1, ..., 1) to broadcast against an ``ndim``-D input."""
    return per_sample.reshape(per_sample.shape[:1] + (1,) * (ndim - 1))


def _per_sample(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def _batch_reduce(per_sample: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "mean":
        return result(per_sample.mean())
    if reduction == "sum":
        return result(per_sample.sum())
    return result(per_sample)


def reduce_sum(elementwise: np.ndarray, reduction: str) -> np.ndarray:
    r"""Per-sample SUM over non-batch dims, then the batch reduction.

    .. math::
        L_b = \sum_{i} \ell_{b,i}, \qquad
        L = \tfrac{1}{B}\sum_b L_b \;(\text{mean}),\quad \sum_b L_b \;(\text{sum}),\quad
        (L_b)_b \;(\text{none})
    """
    return _batch_reduce(_per_sample(elementwise).sum(axis=1), reduction)


def reduce_mean(elementwise: np.ndarray, reduction: str) -> np.ndarray:
    r"""Per-sample MEAN over non-batch dims (the L1 family), then the batch reduction."""
    return _batch_reduce(_per_sample(elementwise).mean(axis=1), reduction)


def _sample_weights(grad_output: object, reduction: str, batch: int) -> np.ndarray:
    """d(reduced)/d(per-sample value) times grad_output, shape (B,)."""
    g = as_float64("grad_output", grad_output)
    if reduction == "none":
        if g.shape != (batch,):
            raise ValueError(f"grad_output must have shape ({batch},) for reduction='none', got {g.shape}")
        return g
    if g.ndim != 0:
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}")
    scale = 1.0 / batch if reduction == "mean" else 1.0
    return np.full(batch, g * scale)


def grad_sum(grad_output: object, reduction: str, shape: tuple[int, ...]) -> np.ndarray:
    """Backward of ``reduce_sum``: grad_output spread over an input of ``shape``."""
    w = _sample_weights(grad_output, reduction, shape[0])
    return np.broadcast_to(batch_broadcast(w, len(shape)), shape).astype(np.float64)


def grad_mean(grad_output: object, reduction: str, shape: tuple[int, ...]) -> np.ndarray:
    """Backward of ``reduce_mean``: as ``grad_sum`` divided by the elements per sample."""
    per_sample = int(np.prod(shape[1:], dtype=np.int64))
    return grad_sum(grad_output, reduction, shape) / per_sample


def sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    r"""Backward of NumPy broadcasting: ``grad`` summed down to an input of ``shape``.

    An input of ``shape`` broadcast to ``grad.shape`` is read once per output element
    it was copied to, so its gradient is the sum over those copies: over the leading
    axes broadcasting added, and (keeping them) over the axes where ``shape`` has 1.
    """
    g = np.asarray(grad, dtype=np.float64)
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g.reshape(shape)
