r"""Evaluation metrics on features, NumPy reference (float64): streaming Gaussian moments and
the Fréchet distance.

Read next to ``derivations/metrics.md``; the tags ``(MET.n)`` in the comments name its
equations.  Conventions:

* Features are 2-D arrays, one sample per row: ``x`` of shape ``(n, d)``.  Everything is
  accumulated and returned in float64.
* :class:`GaussianMoments` keeps ``(n, mean, M2)`` with
  :math:`M_2=\sum_i (x_i-\bar x)(x_i-\bar x)^\top`; batches and other states merge by Chan's
  pairwise update (MET.1), so the result of any split of the data equals one pass over all
  of it, and no :math:`\sum x x^\top - n\bar x\bar x^\top` ever cancels.
* :func:`frechet_distance` never forms a non-symmetric matrix square root: the trace term
  is the nuclear norm of a product of square-root factors (MET.3, MET.4), real and
  non-negative by construction.
* These are metrics, not losses: no ``_backward`` here (the torch layer differentiates
  ``frechet_distance`` w.r.t. the features, MET.5).  Bad input raises ``ValueError`` /
  ``TypeError`` whose message starts with the op's name and names the argument.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .. import _checks
from ._common import as_float64, logsumexp, result, scalar_grad
from .divergence import mmd2, mmd2_backward

__all__ = ["GaussianMoments", "frechet_distance"]


def _features(op: str, name: str, x: object, dim: int | None = None) -> np.ndarray:
    """``x`` as a finite float64 array of shape (n, d) (d == ``dim`` when given)."""
    try:
        a = as_float64(name, x)
    except TypeError as err:
        raise TypeError(f"{op}: {err}") from None
    if a.ndim != 2:
        raise ValueError(f"{op}: {name} must have shape (n, d), got shape {a.shape}")
    if a.shape[1] < 1:
        raise ValueError(f"{op}: {name} has no features (shape {a.shape})")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{op}: {name} must have {dim} features (the dimension so far), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{op}: {name} must be finite (a NaN or inf would poison every later merge)")
    return a


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    r"""Chan, Golub & LeVeque's pairwise merge of two ``(n, mean, M2)`` states.  (MET.1)

    .. math::
        n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
        \bar x = \bar x_a + \delta\,\frac{n_b}{n},\quad
        M_2 = M_{2,a} + M_{2,b} + \delta\delta^\top\,\frac{n_a n_b}{n}

    Works on NumPy and torch arrays alike (only ``+``, ``-``, ``*``, ``/`` and an outer
    product through broadcasting); an empty side returns the other unchanged.
    """
    if n_a == 0:
        return n_b, mean_b, m2_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    n = n_a + n_b
    delta = mean_b - mean_a  # a difference of two means: O(spread), never O(mean^2)
    mean = mean_a + delta * (n_b / n)  # (MET.1)
    m2 = m2_a + m2_b + (delta[:, None] * delta[None, :]) * (n_a * n_b / n)  # (MET.1)
    return n, mean, m2


class GaussianMoments:
    r"""Streaming mean and covariance of features, mergeable across splits of the data.

    .. math::
        \bar x = \frac1n\sum_i x_i,\qquad
        \Sigma = \frac{1}{n-1}\sum_i (x_i-\bar x)(x_i-\bar x)^\top \quad\text{(unbiased, } n-1\text{)}

    ``update(x)`` folds in a batch (its own mean and centred scatter, two passes over the
    batch), ``merge(other)`` folds in another state; both by Chan's pairwise update (MET.1),
    so ``update`` on any split of the data, in any order, gives the one-pass result up to
    rounding, and data with mean :math:`10^4` and spread 1 keep their digits (the one-pass
    :math:`\sum xx^\top - n\bar x\bar x^\top` loses all of them in float64).

    Parameters
    ----------
    dim : int, optional
        The feature dimension ``d``; taken from the first batch when omitted.

    Attributes
    ----------
    n : int
        Samples seen.
    mean : ndarray, shape [d]
        (needs n >= 1)
    cov : ndarray, shape [d, d]
        The unbiased covariance, ``M2 / (n - 1)`` (needs n >= 2).
    m2 : ndarray, shape [d, d]
        The centred scatter :math:`M_2`.
    """

    _op = "GaussianMoments"

    def __init__(self, dim: int | None = None):
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
                raise TypeError(f"{self._op}: dim must be an int, got {type(dim).__name__}")
            if dim < 1:
                raise ValueError(f"{self._op}: dim must be >= 1, got {dim}")
            dim = int(dim)
        self.dim = dim
        self.n = 0
        self._mean: Any = None if dim is None else np.zeros(dim)
        self.m2: Any = None if dim is None else np.zeros((dim, dim))

    def update(self, x) -> GaussianMoments:
        """Fold the batch ``x`` (shape (n, d)) into the state; returns ``self``."""
        a = _features(f"{self._op}.update", "x", x, self.dim)
        if self.dim is None:
            self.dim = a.shape[1]
        n_b = a.shape[0]
        if n_b == 0:
            return self
        mean_b = a.mean(axis=0)
        c = a - mean_b  # two passes within the batch: the scatter of centred rows
        self._merge(n_b, mean_b, c.T @ c)
        return self

    def merge(self, other: GaussianMoments) -> GaussianMoments:
        """Fold another state (same ``d``) into this one; returns ``self``; ``other`` is unchanged."""
        if not isinstance(other, GaussianMoments):
            raise TypeError(f"{self._op}.merge: other must be a GaussianMoments, got {type(other).__name__}")
        if None not in (self.dim, other.dim) and other.dim != self.dim:  # an empty state's d counts too
            raise ValueError(f"{self._op}.merge: other has d={other.dim}, this state d={self.dim}")
        if other.n == 0:
            return self
        self.dim = other.dim
        self._merge(other.n, other._mean, other.m2)
        return self

    def _merge(self, n_b, mean_b, m2_b):
        if self.n == 0:
            self.n, self._mean, self.m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        self.n, self._mean, self.m2 = chan_merge(self.n, self._mean, self.m2, n_b, mean_b, m2_b)

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError(f"{self._op}.mean: no samples yet")
        return result(self._mean.copy())  # a copy: the caller's in-place edit must not change the state

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"{self._op}.cov: the unbiased covariance needs n >= 2 samples, have {self.n}")
        m2 = self.m2 / (self.n - 1)
        return result(0.5 * (m2 + m2.T))  # symmetric to the last bit (the outer products are)

    def __repr__(self) -> str:
        return f"GaussianMoments(n={self.n}, dim={self.dim})"


# ============================================================================= Fréchet distance


_EPS64 = float(np.finfo(np.float64).eps)
# machine epsilon of the float dtypes a covariance may arrive in (numpy, torch, ... by name)
_DTYPE_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": _EPS64}


def dtype_eps(a: object) -> float:
    """Machine epsilon of the dtype ``a`` was given in (NumPy or torch dtype names); float64's for
    float64, integers and anything without a float dtype (exact, or as precise as float64)."""
    return _DTYPE_EPS.get(str(getattr(a, "dtype", "")).rsplit(".", 1)[-1], _EPS64)


def psd_bands(d: int, eps_in: float) -> tuple[float, float]:
    r"""``(refuse, drop)``, relative to :math:`\lambda_{\max}`, for the eigenvalues of a symmetric
    :math:`d\times d` covariance given in a dtype of machine epsilon ``eps_in`` (MET.4).

    The matrix is rounding away from PSD: rounding each entry to the input dtype moves every
    eigenvalue by at most :math:`\lVert E\rVert_F\le\sqrt d\,\varepsilon_{in}\lambda_{\max}/2`, and
    eigh adds :math:`\approx d\,\varepsilon_{64}\lambda_{\max}`.  Eigenvalues at or below ``drop`` =
    :math:`d\,\varepsilon_{in}` are rounding of zero (a float32 covariance of n < d samples has
    d - n + 1 of them, of either sign: -1.1e-8 relative at d = 256 where ``drop`` is 3e-5); below
    ``-refuse`` the matrix is not PSD.  ``refuse`` is 4x ``drop`` (the covariance was also
    computed, not only stored, in that dtype), and never less than :math:`10^{-8}`, so float64
    input keeps its fixed :math:`-10^{-8}\lambda_{\max}` test for any d below 10^7."""
    drop = d * max(eps_in, _EPS64)
    return max(1e-8, 4.0 * drop), drop


def _sqrt_factor(op: str, name: str, cov: np.ndarray, eps_in: float = _EPS64) -> np.ndarray:
    r"""A factor :math:`F` with :math:`FF^\top = \Sigma` (MET.4): :math:`V_r\Lambda_r^{1/2}` from the
    symmetric eigendecomposition, eigenvalues at or below :math:`d\,\varepsilon_{in}\,\lambda_{\max}`
    dropped (they are rounding of zero in the input's dtype, :func:`psd_bands`; keeping them would
    add :math:`\sqrt{\varepsilon}` each)."""
    lam, v = np.linalg.eigh(0.5 * (cov + cov.T))
    top = max(float(lam[-1]), 0.0)
    refuse, drop = psd_bands(cov.shape[0], eps_in)
    if lam[0] < -refuse * max(top, np.finfo(np.float64).tiny):
        raise ValueError(
            f"{op}: {name} is not positive semi-definite (eigenvalue {lam[0]:.3g}, largest {top:.3g})"
        )
    keep = lam > drop * top
    return v[:, keep] * np.sqrt(lam[keep])


def _data_factor(a: np.ndarray) -> np.ndarray:
    r"""For centred rows ``a`` (n, d): a factor :math:`F` with :math:`FF^\top = a^\top a`, of width
    :math:`\min(n, d)`: :math:`a^\top` itself, or :math:`R^\top` of ``a = QR`` when n > d (MET.4)."""
    if a.shape[0] <= a.shape[1]:
        return a.T
    return np.asarray(np.linalg.qr(a, mode="r")).T  # mode "r" returns R alone


def trace_sqrt_product(f1: np.ndarray, f2: np.ndarray) -> float:
    r""":math:`\operatorname{tr}\sqrt{\Sigma_1\Sigma_2} = \lVert F_1^\top F_2\rVert_*` for
    :math:`\Sigma_i = F_iF_i^\top`.  (MET.3)"""
    if f1.shape[1] == 0 or f2.shape[1] == 0:
        return 0.0
    return float(np.linalg.svd(f1.T @ f2, compute_uv=False).sum())  # (MET.3)


_SCALE_BEYOND = 450  # features beyond 2^+-450: their squares (and n d of them summed) leave float64


def feature_scale(amax: float) -> float:
    """The power of two s that features of largest magnitude ``amax`` are divided by before the
    distance is formed (then d^2 = s^2 d^2(x/s, y/s), exact: a power of two only moves exponents):
    1 for magnitudes within 2^+-450, where every square and sum of n d squares is a normal float64;
    beyond, 2^k with amax in [2^(k-1), 2^k). Features at 1e200 gave NaN (inf - inf) or LAPACK's error,
    where the distance is finite whenever it fits (x close to y) and inf, as any overflow, when not.
    The torch layer's gradient, s^2 (1/s) grad d^2(x/s), forms s^2 first: beyond 2^511 (features
    above ~1e154) it is inf or NaN even where the value is finite."""
    if amax == 0.0 or not math.isfinite(amax):
        return 1.0
    k = math.frexp(amax)[1]
    return math.ldexp(1.0, k) if abs(k) > _SCALE_BEYOND else 1.0


def _moments_args(op, args):
    """(mu1, tr cov1, mu2, tr cov2, f1, f2, s) from the 2- or 4-argument forms; the features form's
    moments are of the features over ``feature_scale`` s (the value's factor is s^2)."""
    if len(args) == 4:
        mu1, cov1, mu2, cov2 = (
            as_float64(name, a) for name, a in zip(("mu1", "cov1", "mu2", "cov2"), args, strict=True)
        )
        for name, mu, cov in (("1", mu1, cov1), ("2", mu2, cov2)):
            if mu.ndim != 1 or mu.size == 0 or cov.shape != (mu.size, mu.size):
                raise ValueError(
                    f"{op}: mu{name} must have shape (d,) and cov{name} (d, d), d >= 1, got {mu.shape}, {cov.shape}"
                )
            if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
                raise ValueError(f"{op}: mu{name} and cov{name} must be finite")
        if mu1.size != mu2.size:
            raise ValueError(f"{op}: mu2 must have the dimension of mu1 (d={mu1.size}), got {mu2.shape}")
        # the tolerances follow the dtype the covariances came in, not the float64 they are held in
        f1 = _sqrt_factor(op, "cov1", cov1, dtype_eps(args[1]))
        f2 = _sqrt_factor(op, "cov2", cov2, dtype_eps(args[3]))
        return mu1, np.trace(cov1), mu2, np.trace(cov2), f1, f2, 1.0
    if len(args) != 2:
        raise TypeError(
            f"{op}: takes (x, y) features, two GaussianMoments, or (mu1, cov1, mu2, cov2); got {len(args)} arguments"
        )
    if all(isinstance(a, GaussianMoments) for a in args):
        return _moments_args(op, (args[0].mean, args[0].cov, args[1].mean, args[1].cov))
    x = _features(op, "x", args[0])
    y = _features(op, "y", args[1], x.shape[1])
    for name, a in (("x", x), ("y", y)):
        if a.shape[0] < 2:
            raise ValueError(
                f"{op}: {name} needs at least 2 samples (the unbiased covariance), got {a.shape[0]}"
            )
    s = feature_scale(max(float(np.abs(x).max(initial=0.0)), float(np.abs(y).max(initial=0.0))))
    x, y = x / s, y / s
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    a, b = x - mu1, y - mu2
    f1 = _data_factor(a) / np.sqrt(x.shape[0] - 1)
    f2 = _data_factor(b) / np.sqrt(y.shape[0] - 1)
    tr1 = np.sum(a * a) / (x.shape[0] - 1)  # tr(A^T A) without the d x d product
    tr2 = np.sum(b * b) / (y.shape[0] - 1)
    return mu1, tr1, mu2, tr2, f1, f2, s


def frechet_distance(*args):
    r"""Fréchet distance between two Gaussians (FID on Inception features).

    .. math::
        d^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
              - 2\operatorname{tr}\sqrt{\Sigma_1\Sigma_2},
        \qquad \operatorname{tr}\sqrt{\Sigma_1\Sigma_2} = \lVert F_1^\top F_2\rVert_*

    for any factors :math:`\Sigma_i = F_iF_i^\top`: the square roots of the eigenvalues of
    the SYMMETRIC :math:`\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}` are the singular values of
    :math:`F_1^\top F_2` (MET.3), computed directly (no square root of a rounded
    eigenvalue, no complex ``sqrtm``).

    Call forms
    ----------
    ``frechet_distance(x, y)`` : features, ndarray shape [n1, d] and [n2, d] (n1, n2 >= 2)
        Sample means and unbiased covariances; the factors are the centred data (or their
        QR ``R`` when n > d): exact for rank-deficient covariances (n < d), MET.4.
    ``frechet_distance(m1, m2)`` : two :class:`GaussianMoments`
        Their means and covariances (streamed features in bounded memory).
    ``frechet_distance(mu1, cov1, mu2, cov2)`` : ndarray shape [d], [d, d], [d], [d, d]
        Factors :math:`V\Lambda^{1/2}` of the symmetric eigendecompositions, eigenvalues
        at or below :math:`d\varepsilon\lambda_{\max}` dropped as rounding of zero, with
        :math:`\varepsilon` the machine epsilon of the dtype each covariance is given in
        (float32 statistics of n < d samples are accepted); an eigenvalue below
        :math:`-\max(10^{-8}, 4d\varepsilon)\lambda_{\max}` is refused (MET.4, :func:`psd_bands`).

    Returns
    -------
    ndarray, shape []
        :math:`d^2`, real.  By the AM-GM inequality of MET.2 it is :math:`\ge0`; rounding
        can take it below 0 by about :math:`d\varepsilon(\operatorname{tr}\Sigma_1+\operatorname{tr}\Sigma_2)`,
        which is returned as computed (not clipped), so identical inputs give a rounding-size
        value of either sign.
    """
    op = "frechet_distance"
    mu1, tr1, mu2, tr2, f1, f2, s = _moments_args(op, args)
    diff = mu1 - mu2
    value = diff @ diff + tr1 + tr2 - 2.0 * trace_sqrt_product(f1, f2)  # (MET.2)
    with np.errstate(over="ignore", under="ignore"):  # a distance beyond float64 is inf, as any overflow
        return result(value * s * s)  # not s^2 (inf beyond 2^512) times a small value


# ============================================================================= gather convention


def gathered_gradient(incoming, counts, rank):
    r"""The gradient that ``genloss.torch.gather_with_grad`` gives rank ``rank``'s shard.  (MET.6)

    .. math::
        \bar x_r = \Big(\sum_{s=0}^{W-1} \bar y^{(s)}\Big)_{\text{rows of } r}

    ``incoming[s]`` is rank s's gradient of its own loss w.r.t. the gathered batch (shape
    ``(sum(counts), ...)``); the shards are ``counts[0], counts[1], ...`` rows in rank order.
    When every rank computes the same loss L, this is :math:`W\,\partial L/\partial x_r`
    (the reason for the sum: derivations/metrics.md, MET.6).  The NumPy statement of the
    convention, for tests and readers; the collective itself is torch only.
    """
    op = "gathered_gradient"
    g = [as_float64(f"incoming[{s}]", a) for s, a in enumerate(incoming)]
    if not g or any(a.shape != g[0].shape for a in g):
        raise ValueError(f"{op}: incoming must be a non-empty list of arrays of one shape")
    if len(counts) != len(g) or not 0 <= rank < len(g) or sum(counts) != g[0].shape[0]:
        raise ValueError(
            f"{op}: counts must give one row count per rank summing to {g[0].shape[0]}, and 0 <= rank < W"
        )
    start = sum(counts[:rank])
    return result(np.sum(g, axis=0)[start : start + counts[rank]])  # (MET.6)


# ============================================================================= optimal transport
#
# sinkhorn_divergence and ot_coupling (MET.20-MET.29).  The Sinkhorn loop below is written on
# array operations only (+, -, *, abs, max), so genloss.torch.metrics runs the SAME loop on CUDA
# tensors with a torch softmin; the native CPU kernel (cpp/src/ot_cpu.cpp) follows it step by step.


def _ot_points(op: str, name: str, x: object, dim: int | None = None) -> np.ndarray:
    """``x`` as float64 of shape (n, d), n >= 1 (finiteness is the caller's business: NaN -> NaN)."""
    try:
        a = as_float64(name, x)
    except TypeError as err:
        raise TypeError(f"{op}: {err}") from None
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have shape (n, D) with n, D >= 1, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(
            f"{op}: {name} must have D={dim} features (those of the first input), got shape {a.shape}"
        )
    return a


def check_sinkhorn_args(op: str, eps, p, scaling, tol, max_iter) -> tuple[float, float, float, float, int]:
    """The hyperparameters of the Sinkhorn ops as floats/int; ValueError naming the bad one.
    (``math.isfinite``, not NumPy's: torch.compile traces these checks of Python numbers.)"""
    vals = {}
    for name, v in (("eps", eps), ("p", p), ("scaling", scaling), ("tol", tol)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
        vals[name] = float(v)
    if not (math.isfinite(vals["eps"]) and vals["eps"] > 0):
        raise ValueError(f"{op}: eps must be finite and > 0, got {eps!r}")
    if not (math.isfinite(vals["p"]) and vals["p"] >= 1):
        raise ValueError(f"{op}: p must be finite and >= 1, got {p!r}")
    if not 0 < vals["scaling"] < 1:
        raise ValueError(f"{op}: scaling must lie in (0, 1), got {scaling!r}")
    if not (math.isfinite(vals["tol"]) and vals["tol"] > 0):
        raise ValueError(f"{op}: tol must be finite and > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"{op}: max_iter must be an int >= 1, got {max_iter!r}")
    return vals["eps"], vals["p"], vals["scaling"], vals["tol"], int(max_iter)


def eps_schedule(
    diameter: float, p: float, eps: float, scaling: float, op: str = "sinkhorn_divergence"
) -> list[float]:
    r"""The annealing schedule of :math:`\varepsilon`.  (MET.22)

    :math:`\varepsilon_0 = \operatorname{diam}^p`, :math:`\varepsilon_{k+1} = \text{scaling}\cdot\varepsilon_k`
    while above ``eps``, then ``eps`` itself (the last entry, always present).  ``diameter`` is the
    diagonal of the bounding box of both point clouds (GeomLoss's choice: an upper bound of every
    distance, so the first scale sees a nearly flat kernel whose solution is easy).
    """
    out = []
    try:
        e = float(diameter) ** p
    except OverflowError:  # a finite diameter whose p-th power is past float64
        e = math.inf
    if e == math.inf:  # every scale would be inf: the loop below would never end
        raise ValueError(
            f"{op}: the points' spread (bounding-box diameter {float(diameter):.3g}) to the power p={p:g} "
            "overflows float64, so the costs do too; rescale the inputs"
        )
    if eps < EPS_RESOLUTION * e / p:  # e / p = diam^p / p bounds every cost
        warnings.warn(
            f"{op}: eps={eps:g} is below float64's resolution of the costs (up to {e / p:.3g}): the plan "
            "exp((f + g - C) / eps) then carries rounding errors of about 2^-52 C / eps in its exponent, "
            "so the potentials cannot resolve it and the result is unreliable; raise eps or rescale the inputs",
            RuntimeWarning,
            stacklevel=3,
        )
    while e > eps:
        out.append(e)
        e *= scaling
    out.append(eps)
    return out


# eps below this times the largest cost: the exponents (f + g - C) / eps of the plan have rounding
# errors above 2^-52 / 1e-12 ~ 2e-4, and at eps = 1e-300 the loop "converged" on meaningless
# potentials (S_eps 5.6 % below a bound it cannot cross) without a sign.
EPS_RESOLUTION = 1e-12


def bbox_diameter(x: np.ndarray, y: np.ndarray) -> float:
    """Diagonal of the bounding box of the rows of x and y together."""
    lo = np.minimum(x.min(axis=0), y.min(axis=0))
    hi = np.maximum(x.max(axis=0), y.max(axis=0))
    with np.errstate(over="ignore"):  # inf: eps_schedule says what it means
        return float(np.sqrt(np.sum((hi - lo) ** 2)))


def sinkhorn_loop(softmin, eps_list, log_a, log_b, tol, max_iter, debias=True):
    r"""Symmetric log-domain Sinkhorn with :math:`\varepsilon`-scaling.  (MET.21, MET.22)

    ``softmin(eps, pair, h)`` returns :math:`-\varepsilon\log\sum_j \exp(h_j - C_{ij}/\varepsilon)`
    over the rows of the first cloud of ``pair`` ('xy', 'yx', 'xx', 'yy') and the columns of the
    second.  Annealing scales (all but the last): one GeomLoss step each, every potential updated
    from the previous ones and averaged with them (the average damps the oscillation of the
    symmetric problems).  Last scale: the x-y potentials by alternating updates
    :math:`f\leftarrow T(g)`, :math:`g\leftarrow T'(f)` (twice the rate of the averaged ones), the
    self potentials by the averaged update (until their own change is at most ``tol * eps``, after
    which they are left alone), until the largest change of the x-y potentials is at most
    ``tol * eps`` too (a marginal error of about ``tol``) or ``max_iter`` rounds; then one plain
    step of the self potentials (GeomLoss's final extrapolation).  Returns ``(f, g, f_aa, g_bb, change)``
    (self potentials None without ``debias``), where ``change`` is the last round's largest x-y
    potential change: at most ``tol * eps`` when converged (see :func:`check_converged`).
    """
    e = eps_list[0]
    f, g = softmin(e, "xy", log_b), softmin(e, "yx", log_a)
    fa = softmin(e, "xx", log_a) if debias else None
    gb = softmin(e, "yy", log_b) if debias else None
    for e in eps_list[:-1]:  # (MET.22) one averaged step per annealing scale
        ft, gt = softmin(e, "xy", log_b + g / e), softmin(e, "yx", log_a + f / e)
        f, g = 0.5 * (f + ft), 0.5 * (g + gt)
        if debias:
            fat, gbt = softmin(e, "xx", log_a + fa / e), softmin(e, "yy", log_b + gb / e)
            fa, gb = 0.5 * (fa + fat), 0.5 * (gb + gbt)
    e = eps_list[-1]
    rounds = 0
    self_done = not debias
    while rounds < max_iter:
        rounds += 1
        fn = softmin(e, "xy", log_b + g / e)  # (MET.21)
        gn = softmin(e, "yx", log_a + fn / e)
        change = max(float(abs(fn - f).max()), float(abs(gn - g).max()))
        f, g = fn, gn
        if not self_done:  # the self problems converge at rate <= 1/2 (MET.21): usually first
            fat, gbt = softmin(e, "xx", log_a + fa / e), softmin(e, "yy", log_b + gb / e)
            self_done = not max(float(abs(fat - fa).max()), float(abs(gbt - gb).max())) > tol * e
            fa, gb = 0.5 * (fa + fat), 0.5 * (gb + gbt)
        if not change > tol * e and self_done:  # NaN stops too (NaN inputs give NaN potentials)
            break
    if debias:
        fa, gb = softmin(e, "xx", log_a + fa / e), softmin(e, "yy", log_b + gb / e)
    return f, g, fa, gb, change


# The loop's last change over eps estimates the relative error of the plan's row marginals
# (f_new - f = -eps log(row sum / a)). Below this (and below tol) a run stopped by max_iter is
# accurate for use: the gradients (envelope theorem) to about that relative error, the value
# (a stationary dual objective) to about its square.
UNCONVERGED_WARN = 1e-3


def check_converged(op: str, change: float, tol: float, max_iter: int, eps: float, solver_eps: float) -> None:
    """A RuntimeWarning when the loop stopped at ``max_iter`` with its last change above
    ``max(tol, UNCONVERGED_WARN) * solver_eps``: the potentials are then far from optimal, the value
    is not S_eps (it can fall below a bound it cannot cross) and the plan's row marginals are off
    by about ``change / solver_eps``. Small eps converges slowly (the contraction rate tends to 1)."""
    err = change / solver_eps
    if err > max(tol, UNCONVERGED_WARN):  # NaN (NaN inputs) is not > anything: no warning
        warnings.warn(
            f"{op}: the Sinkhorn iterations did not converge in max_iter={max_iter} rounds at eps={eps:g}: "
            f"the plan's marginals are off by about {err:.1e} (relative) and the result is not the converged "
            "one; raise max_iter, or eps",
            RuntimeWarning,
            stacklevel=3,
        )


def ot_cost_matrix(a: np.ndarray, b: np.ndarray, p: float) -> np.ndarray:
    r""":math:`C_{ij} = \lVert a_i - b_j\rVert^p / p` from the differences (no expansion).  (MET.20)"""
    r2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    return r2 ** (0.5 * p) / p


def _np_softmin(clouds: dict, p: float):
    def softmin(e, pair, h):  # (MET.21)
        c = ot_cost_matrix(clouds[pair[0]], clouds[pair[1]], p)
        return -e * logsumexp(h[None, :] - c / e, axis=1)

    return softmin


def transport_grad(a, b, f, g, log_wa, log_wb, e, p):
    r""":math:`\sum_j P_{ij}\nabla_{a_i}C(a_i,b_j)`, :math:`P_{ij}=\exp(\log w^a_i+\log w^b_j+(f_i+g_j-C_{ij})/\varepsilon)`,
    :math:`\nabla_a C = \lVert a-b\rVert^{p-2}(a-b)` (0 at a == b).  (MET.24)"""
    diff = a[:, None, :] - b[None, :, :]
    r2 = np.sum(diff**2, axis=-1)
    plan = np.exp(log_wa[:, None] + log_wb[None, :] + (f[:, None] + g[None, :] - r2 ** (0.5 * p) / p) / e)
    w = np.where(r2 > 0, plan * np.where(r2 > 0, r2, 1.0) ** (0.5 * p - 1.0), 0.0)
    return np.einsum("ij,ijd->id", w, diff)


def _sinkhorn_solve(
    x, y, eps, p, scaling, tol, max_iter, debias=True, op="sinkhorn_divergence", user_eps=None
):
    n, m = x.shape[0], y.shape[0]
    log_a, log_b = np.full(n, -np.log(n)), np.full(m, -np.log(m))
    eps_list = eps_schedule(bbox_diameter(x, y), p, eps, scaling)
    softmin = _np_softmin({"x": x, "y": y}, p)
    out = sinkhorn_loop(softmin, eps_list, log_a, log_b, tol, max_iter, debias)
    check_converged(op, out[4], tol, max_iter, eps if user_eps is None else user_eps, eps)
    return out, log_a, log_b


def _sinkhorn_prepare(x, y, eps, p, scaling, tol, max_iter):
    op = "sinkhorn_divergence"
    hyp = check_sinkhorn_args(op, eps, p, scaling, tol, max_iter)
    x = _ot_points(op, "x", x)
    y = _ot_points(op, "y", y, x.shape[1])
    return x, y, hyp, bool(np.isfinite(x).all() and np.isfinite(y).all())


def sinkhorn_divergence(x, y, eps, p=2.0, scaling=0.5, tol=1e-8, max_iter=1000):
    r"""Debiased Sinkhorn divergence between the uniform point clouds x and y.  (MET.20-MET.23)

    .. math::
        S_\varepsilon(x, y) = \mathrm{OT}_\varepsilon(x, y) - \tfrac12\mathrm{OT}_\varepsilon(x, x)
            - \tfrac12\mathrm{OT}_\varepsilon(y, y),\qquad
        \mathrm{OT}_\varepsilon(x, y) = \langle a, f\rangle + \langle b, g\rangle

    with :math:`a = 1/N`, :math:`b = 1/M`, cost :math:`C(u, v) = \lVert u - v\rVert^p / p` (GeomLoss's
    ``SamplesLoss("sinkhorn", p=p, blur=eps**(1/p))``) and :math:`(f, g)` the optimal dual
    potentials of the entropic problem
    :math:`\min_{P\in\Pi(a,b)}\langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,|\,a\otimes b)`: at the
    optimum the dual value :math:`\langle a,f\rangle+\langle b,g\rangle` EQUALS this primal value.
    POT's ``ot.sinkhorn2(a, b, C, reg)`` returns :math:`\langle P, C\rangle` of the same plan, without
    the entropy term: :math:`\mathrm{OT}_\varepsilon = \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,|\,a\otimes b)`
    (MET.23; tests/test_metrics_ot.py adds the term back before comparing).

    Log-domain updates with :math:`\varepsilon`-scaling from :math:`\operatorname{diam}^p` down by
    ``scaling`` per step (:func:`eps_schedule`, MET.22; GeomLoss scales the blur
    :math:`\varepsilon^{1/p}` by ``scaling``, i.e. :math:`\varepsilon` by ``scaling**p``); see
    :func:`sinkhorn_loop` for the iteration and ``tol`` / ``max_iter``.  :math:`S_\varepsilon\ge0`
    (up to about ``tol * eps``), 0 for x == y, and it tends to the unregularized OT cost as
    :math:`\varepsilon\to0`.

    Parameters
    ----------
    x : ndarray, shape [N, D]
    y : ndarray, shape [M, D]
    eps : float > 0
        The entropic regularization :math:`\varepsilon` (units of the cost).
    p : float >= 1
    scaling : float in (0, 1)

    Returns
    -------
    ndarray, shape []
        float64; NaN when x or y holds a NaN or inf.
    """
    x, y, (eps, p, scaling, tol, max_iter), finite = _sinkhorn_prepare(x, y, eps, p, scaling, tol, max_iter)
    if not finite:
        return result(np.nan)
    (f, g, fa, gb, _), _, _ = _sinkhorn_solve(x, y, eps, p, scaling, tol, max_iter)
    return result(np.mean(f - fa) + np.mean(g - gb))  # (MET.23)


def sinkhorn_divergence_backward(x, y, grad_output, eps, p=2.0, scaling=0.5, tol=1e-8, max_iter=1000):
    r"""Gradient of :func:`sinkhorn_divergence` w.r.t. x and y by the envelope theorem.  (MET.24)

    .. math::
        \nabla_{x_i}S_\varepsilon = \sum_j P^{xy}_{ij}\nabla_1C(x_i,y_j) - \sum_j P^{xx}_{ij}\nabla_1C(x_i,x_j)

    (and the same for :math:`y_j` with :math:`P^{yx}=(P^{xy})^\top`, :math:`P^{yy}`), with the plans
    :math:`P_{ij}=a_ib_j\exp((f_i+g_j-C_{ij})/\varepsilon)` of the converged potentials: no
    differentiation through the iterations.  The self term counts twice (x is both of its
    arguments) and carries the factor 1/2, hence coefficient 1.

    Returns
    -------
    (grad_x, grad_y) : ndarrays, shapes [N, D] and [M, D]
    """
    x, y, (eps, p, scaling, tol, max_iter), finite = _sinkhorn_prepare(x, y, eps, p, scaling, tol, max_iter)
    gout = np.asarray(grad_output, dtype=np.float64)
    if not finite:
        return result(np.full(x.shape, np.nan)), result(np.full(y.shape, np.nan))
    (f, g, fa, gb, _), la, lb = _sinkhorn_solve(x, y, eps, p, scaling, tol, max_iter)
    gx = transport_grad(x, y, f, g, la, lb, eps, p) - transport_grad(x, x, fa, fa, la, la, eps, p)  # (MET.24)
    gy = transport_grad(y, x, g, f, lb, la, eps, p) - transport_grad(y, y, gb, gb, lb, lb, eps, p)
    return result(gout * gx), result(gout * gy)


OT_COUPLING_METHODS = ("exact", "sinkhorn")


def check_coupling_args(op: str, method, eps) -> float | None:
    """Validate ``method`` and (for 'sinkhorn') ``eps``; returns eps as a float or None."""
    if method not in OT_COUPLING_METHODS:
        raise ValueError(f"{op}: method must be one of {OT_COUPLING_METHODS}, got {method!r}")
    if method == "exact":
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: eps must be a real number for method 'sinkhorn', got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be finite and > 0, got {eps!r}")
    return float(eps)


def _coupling_points(x0, x1):
    op = "ot_coupling"
    a = _ot_points(op, "x0", x0)
    b = _ot_points(op, "x1", x1, a.shape[1])
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"{op}: x1 must have as many rows as x0 (B={a.shape[0]}), got shape {b.shape}")
    for name, v in (("x0", a), ("x1", b)):
        if not np.isfinite(v).all():
            raise ValueError(f"{op}: {name} must be finite (a NaN or inf has no optimal pairing)")
    return a, b


def ot_coupling(x0, x1, method="exact", eps=0.1, tol=1e-8, max_iter=1000):
    r"""Minibatch optimal-transport pairing for OT flow matching (Tong et al. 2023).  (MET.25-MET.27)

    ``'exact'``: the permutation :math:`\pi` (int64, shape [B]) minimizing
    :math:`\sum_i\lVert x_{0,i}-x_{1,\pi(i)}\rVert^2`; ``x1[perm[i]]`` pairs with ``x0[i]``.  This
    reference uses :func:`scipy.optimize.linear_sum_assignment` as the oracle; the native solver
    (cpp/src/ot_cpu.cpp) is an independently written shortest-augmenting-path Hungarian (MET.26).

    ``'sinkhorn'``: the entropic plan :math:`P` (float64, shape [B, B], rows and columns summing to
    :math:`1/B`) of :math:`\min_P\langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,|\,a\otimes b)` with
    :math:`C_{ij}=\lVert x_{0,i}-x_{1,j}\rVert^2` (the plan of POT's ``ot.sinkhorn(a, b, C, eps)``);
    sample pairs from it as torchcfm's OTPlanSampler does (``multinomial(P.ravel(), B)``).  (MET.27)
    """
    eps = check_coupling_args("ot_coupling", method, eps)
    check_sinkhorn_args("ot_coupling", 1.0 if eps is None else eps, 2, 0.5, tol, max_iter)
    a, b = _coupling_points(x0, x1)
    if eps is None:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:  # the native and torch layers solve it without scipy
            raise ImportError(
                "ot_coupling: the reference's 'exact' method uses scipy.optimize.linear_sum_assignment as "
                "its oracle: pip install scipy (genloss.native / genloss.torch ot_coupling need no scipy)"
            ) from None

        cost = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty(a.shape[0], dtype=np.int64)
        perm[rows] = cols
        return perm
    # C = r^2 is 2 x (r^2 / 2): the same plan as cost r^2/2 (p = 2) at eps/2  (MET.27)
    (f, g, _, _, _), la, lb = _sinkhorn_solve(
        a, b, 0.5 * eps, 2.0, 0.5, tol, max_iter, debias=False, op="ot_coupling", user_eps=eps
    )
    c = ot_cost_matrix(a, b, 2.0)
    return result(np.exp(la[:, None] + lb[None, :] + (f[:, None] + g[None, :] - c) / (0.5 * eps)))


__all__ += [
    "sinkhorn_divergence",
    "sinkhorn_divergence_backward",
    "ot_coupling",
]


# ============================================================================= prdc, sliced Wasserstein, CMMD

__all__ += ["prdc", "sliced_wasserstein", "sliced_wasserstein_backward", "cmmd", "cmmd_backward"]

_PRDC_BLOCK = 1 << 22  # (rows x columns) squared distances per chunk: 32 MiB, never N x M


def _points(op: str, name: str, x: object, dim: int | None = None) -> np.ndarray:
    """``x`` as a float64 array of shape (n, d), n >= 1 (d == ``dim`` when given); NaN allowed."""
    try:
        a = as_float64(name, x)
    except TypeError as err:
        raise TypeError(f"{op}: {err}") from None
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have shape (n, d) with d >= 1, got shape {a.shape}")
    if a.shape[0] < 1:
        raise ValueError(f"{op}: {name} has no samples (shape {a.shape})")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(
            f"{op}: {name} must have the {dim} features of the first argument, got shape {a.shape}"
        )
    return a


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r""":math:`d^2_{ij}=\sum_d (a_{id}-b_{jd})^2`, summed over d in order (MET.10): the native kernel's
    arithmetic, so its comparisons (the tie rule) see the same numbers; exact differences, so a
    point's distance to itself is exactly 0 (no :math:`\lVert a\rVert^2-2a\cdot b+\lVert b\rVert^2`)."""
    d2 = np.zeros((a.shape[0], b.shape[0]))
    for d in range(a.shape[1]):
        t = a[:, d, None] - b[None, :, d]
        d2 += t * t
    return d2


def _chunks(rows: int, cols: int):
    step = max(1, _PRDC_BLOCK // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    r"""Squared k-NN radii within ``x``: the (k+1)-th smallest of :math:`d^2(x_i, x_j)` over all j,
    the self distance 0 included (= the k-th smallest over j != i, duplicates counted).  (MET.10)"""
    out = np.empty(x.shape[0])
    for rows in _chunks(x.shape[0], x.shape[0]):
        out[rows] = np.partition(squared_distances(x[rows], x), k, axis=1)[:, k]
    return out


def check_prdc_k(op: str, k: object, n: int, m: int) -> int:
    """``k`` as an int with 1 <= k < n (real) and k < m (fake), shared by every layer."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{op}: k must be >= 1, got {k}")
    for name, size in (("real", n), ("fake", m)):
        if k >= size:
            raise ValueError(
                f"{op}: k ({k}) must be < the {size} samples of {name} (a point is not its own neighbour)"
            )
    return int(k)


PRDC_NOT_FINITE = "must be finite (a NaN distance has no nearest-neighbour order)"


def _prdc_inputs(op, real, fake, k):
    real = _points(op, "real", real)
    fake = _points(op, "fake", fake, real.shape[1])
    k = check_prdc_k(op, k, real.shape[0], fake.shape[0])
    for name, a in (("real", real), ("fake", fake)):
        if not np.isfinite(a).all():
            raise ValueError(f"{op}: {name} {PRDC_NOT_FINITE}")
    return real, fake, k


def prdc_from_counts(counts, n: int, m: int, k: int) -> dict[str, float]:
    """The four metrics from the integer counts of MET.11-MET.13 (shared by every layer)."""
    hit_fake, recalled, pairs, covered = (int(c) for c in counts)
    return {
        "precision": hit_fake / m,  # (MET.11)
        "recall": recalled / n,  # (MET.11)
        "density": pairs / (k * m),  # (MET.12)
        "coverage": covered / n,  # (MET.13)
    }


def prdc(real, fake, k=5):
    r"""Precision, recall, density and coverage of generated features (Kynkäänniemi et al. 2019;
    Naeem et al. 2020), as the ``prdc`` package (clovaai) defines them, with the tie rule ``<=``.

    .. math::
        r_i = \mathrm{NND}_k(x_i),\quad s_j = \mathrm{NND}_k(y_j),\quad
        \text{precision} = \tfrac1M\sum_j \big[\exists i:\ d(y_j,x_i)\le r_i\big],\quad
        \text{recall} = \tfrac1N\sum_i \big[\exists j:\ d(x_i,y_j)\le s_j\big],

    .. math::
        \text{density} = \frac{1}{kM}\sum_j\#\{i:\ d(y_j,x_i)\le r_i\},\qquad
        \text{coverage} = \tfrac1N\sum_i\big[\min_j d(x_i,y_j)\le r_i\big]

    with :math:`\mathrm{NND}_k(x_i)` the distance to the k-th nearest OTHER point of the same
    set (the prdc package's (k+1)-th smallest of the row that includes the self distance 0;
    duplicates count, so a point with k copies has radius 0).  (MET.10-MET.13)

    Parameters
    ----------
    real : ndarray, shape [N, D]
        Real features x (finite).
    fake : ndarray, shape [M, D]
        Generated features y (finite, same D).
    k : int
        1 <= k < min(N, M).

    Returns
    -------
    dict
        ``{"precision", "recall", "density", "coverage"}`` as Python floats (the prdc package's keys).

    Notes
    -----
    Tie rule: every comparison is between squared distances computed the same way,
    :math:`\sum_d (a_d-b_d)^2` in d order in float64 (:func:`squared_distances`), and a point at
    exactly the radius is INSIDE the ball (``<=``, the closed ball of Kynkäänniemi et al.'s
    definition; the prdc package writes ``<``, which differs only when a distance equals a
    radius exactly, e.g. a fake copy of a real point whose radius is 0). Computed in row
    chunks, so memory is O(chunk * (N + M)), never N x M.
    """
    op = "prdc"
    real, fake, k = _prdc_inputs(op, real, fake, k)
    rr2, fr2 = knn_radii(real, k), knn_radii(fake, k)  # (MET.10)
    hit_fake = np.zeros(fake.shape[0], dtype=bool)
    recalled = pairs = covered = 0
    for rows in _chunks(real.shape[0], fake.shape[0]):
        d2 = squared_distances(real[rows], fake)
        inside = d2 <= rr2[rows, None]  # (MET.11) fake j in the ball of real i, the <= tie rule
        hit_fake |= inside.any(axis=0)
        pairs += int(inside.sum())  # (MET.12)
        covered += int(inside.any(axis=1).sum())  # (MET.13) nearest fake within r_i
        recalled += int((d2 <= fr2[None, :]).any(axis=1).sum())  # (MET.11)
    return prdc_from_counts((hit_fake.sum(), recalled, pairs, covered), real.shape[0], fake.shape[0], k)


def check_sw_ints(d, n_projections, seed) -> None:
    """``d``, ``n_projections`` and ``seed`` of :func:`sliced_wasserstein` (shared by every layer)."""
    op = "sliced_wasserstein"
    for name, v in (("d", d), ("n_projections", n_projections)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{op}: {name} must be >= 1, got {v}")
    with _checks.named_errors(op):
        _checks.seed("seed", seed, below=2**63)  # the torch op takes it as a signed 64-bit int


def sliced_wasserstein_projections(d: int, n_projections: int = 128, seed: int = 0) -> np.ndarray:
    r"""The directions of :func:`sliced_wasserstein`: ``(n_projections, d)`` unit vectors, uniform on
    the sphere, drawn as normalised standard normals by ``np.random.default_rng(seed)`` in float64.
    Every layer uses these same directions (the torch layer moves them to the data's device)."""
    check_sw_ints(d, n_projections, seed)
    g = np.random.default_rng(int(seed)).standard_normal((int(n_projections), int(d)))
    return g / np.linalg.norm(g, axis=1, keepdims=True)  # (MET.15) a zero draw has probability 0


def quantile_grid(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""The merged grid of CDF levels of two uniform empirical measures of n and m atoms.  (MET.14)

    Returns ``(w, iu, iv)``: on the l-th interval of the union of :math:`\{i/n\}` and :math:`\{j/m\}`
    (length ``w[l]``) both quantile functions are constant, the ``iu[l]``-th smallest of u and the
    ``iv[l]``-th smallest of v (0-based). Levels are kept as integers in units of :math:`1/(nm)`,
    so the grid is exact; n == m gives w = 1/n, iu = iv = 0..n-1 (the sorted matching).
    """
    levels = np.union1d(np.arange(n + 1, dtype=np.int64) * m, np.arange(m + 1, dtype=np.int64) * n)
    lo = levels[:-1]
    return np.diff(levels) / (n * m), lo // m, lo // n


def check_sw_p(p: object) -> float:
    """``p`` of :func:`sliced_wasserstein` as a float >= 1 (shared by every layer)."""
    with _checks.named_errors("sliced_wasserstein"):
        v = _checks.finite("p", p)
        if v < 1.0:
            raise ValueError(f"p must be >= 1 (W_p is a metric for p >= 1), got {v}")
    return v


def _sw_inputs(x, y, n_projections, p, seed):
    op = "sliced_wasserstein"
    x = _points(op, "x", x)
    y = _points(op, "y", y, x.shape[1])
    p = check_sw_p(p)
    return x, y, sliced_wasserstein_projections(x.shape[1], n_projections, seed), p


def _sliced(x, y, theta, p, with_grad):
    u, v = x @ theta.T, y @ theta.T  # (N, P), (M, P): one column per direction
    su, sv = np.argsort(u, axis=0, kind="stable"), np.argsort(v, axis=0, kind="stable")
    w, iu, iv = quantile_grid(x.shape[0], y.shape[0])
    delta = np.take_along_axis(u, su, 0)[iu] - np.take_along_axis(v, sv, 0)[iv]  # (L, P)
    a = np.abs(delta)
    mean = float(np.mean(w @ a**p))  # (MET.14) W_p^p per direction, averaged  (MET.15)
    value = 0.0 if mean == 0.0 else mean ** (1.0 / p)
    if not with_grad:
        return value, None, None
    # (MET.16) dS/d delta_l = c w_l p |delta|^(p-1) sign(delta), c = mean^(1/p - 1) / (p P); 0 at S = 0
    c = 0.0 if mean == 0.0 else mean ** (1.0 / p - 1.0) / (p * theta.shape[0])
    gd = c * p * w[:, None] * a ** (p - 1.0) * np.sign(delta)
    gu, gv = np.zeros_like(u), np.zeros_like(v)
    np.add.at(gu, iu, gd)  # back to the sorted positions, then to the points
    np.add.at(gv, iv, -gd)
    gx, gy = np.empty_like(u), np.empty_like(v)
    np.put_along_axis(gx, su, gu, 0)
    np.put_along_axis(gy, sv, gv, 0)
    return value, gx @ theta, gy @ theta


def sliced_wasserstein(x, y, n_projections=128, p=2.0, seed=0):
    r"""Sliced p-Wasserstein distance between the empirical measures of ``x`` and ``y``.

    .. math::
        SW_p(x, y) = \Big(\frac1P\sum_{l=1}^P W_p^p\big(\theta_l^\top x,\ \theta_l^\top y\big)\Big)^{1/p},
        \qquad W_p^p(u, v) = \int_0^1 \big|F_u^{-1}(t) - F_v^{-1}(t)\big|^p\,dt

    with the 1-D :math:`W_p^p` of the uniform empirical measures exact on the merged grid of CDF
    levels (:func:`quantile_grid`; for N == M the mean of :math:`|u_{(i)}-v_{(i)}|^p`) and the
    directions :math:`\theta_l` of :func:`sliced_wasserstein_projections` (seeded).  The p-th
    root of the mean, as POT's ``ot.sliced_wasserstein_distance``.  (MET.14, MET.15)

    Parameters
    ----------
    x : ndarray, shape [N, D]
    y : ndarray, shape [M, D]
    n_projections : int
        P >= 1.
    p : float
        >= 1.
    seed : int
        Seed of ``np.random.default_rng`` for the directions (>= 0).

    Returns
    -------
    ndarray, shape []
        :math:`SW_p`; NaN when an input holds a NaN.
    """
    x, y, theta, p = _sw_inputs(x, y, n_projections, p, seed)
    value, _, _ = _sliced(x, y, theta, p, with_grad=False)
    return result(value)


def sliced_wasserstein_backward(x, y, grad_output, n_projections=128, p=2.0, seed=0):
    r"""Gradients of :func:`sliced_wasserstein` w.r.t. ``x`` and ``y``.  (MET.16)

    .. math::
        \frac{\partial SW_p}{\partial x_i} = \frac{SW_p^{1-p}}{P}\sum_l\theta_l
            \sum_{\text{intervals } k:\ \text{rank}_l(i) = iu_k} w_k\,|\Delta_{lk}|^{p-1}\operatorname{sign}\Delta_{lk}

    and with the opposite sign for y: the sort is locally a fixed permutation, so each
    projected point receives the derivative of the intervals it is matched on.  At
    :math:`SW_p = 0` (identical measures, the minimum) the gradient is taken as 0; ties within a
    projection pick the stable order's subgradient.

    Returns
    -------
    (grad_x, grad_y) : tuple of ndarray, shapes [N, D] and [M, D]
    """
    x, y, theta, p = _sw_inputs(x, y, n_projections, p, seed)
    with _checks.named_errors("sliced_wasserstein"):
        g = scalar_grad("grad_output", grad_output)
    _, gx, gy = _sliced(x, y, theta, p, with_grad=True)
    return g * gx, g * gy


CMMD_SIGMA = 10.0  # the CMMD preset (Jayasumana et al. 2024): rbf bandwidth on CLIP embeddings
CMMD_SCALE = 1000.0


def cmmd(x, y):
    r"""CMMD: the biased (V-statistic) MMD^2 with the Gaussian kernel :math:`e^{-\lVert a-b\rVert^2/(2\sigma^2)}`,
    :math:`\sigma = 10`, times 1000 (Jayasumana et al. 2024, on CLIP embeddings).  (MET.17)

    ``1000 * mmd2(x, y, kernel='rbf', bandwidths=(10,), estimator='biased')``: genloss's rbf is
    :math:`e^{-d^2/(2s^2)}`, the same parameterisation as CMMD's :math:`\gamma = 1/(2\sigma^2)`.

    Parameters
    ----------
    x, y : ndarray, shapes [N, D] and [M, D]

    Returns
    -------
    ndarray, shape []
    """
    with _checks.named_errors("cmmd"):
        return result(CMMD_SCALE * mmd2(x, y, "rbf", (CMMD_SIGMA,), "biased"))  # (MET.17)


def cmmd_backward(x, y, grad_output):
    r"""Gradients of :func:`cmmd` w.r.t. ``x`` and ``y``: 1000 times those of the biased rbf
    ``mmd2`` (DIV.9).  (MET.17)"""
    with _checks.named_errors("cmmd"):
        gx, gy = mmd2_backward(x, y, grad_output, "rbf", (CMMD_SIGMA,), "biased")
    return CMMD_SCALE * gx, CMMD_SCALE * gy
