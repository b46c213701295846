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

from typing import Any

import numpy as np

from ._common import as_float64, result

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
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
                raise ValueError(f"{self._op}: dim must be a positive int, got {dim!r}")
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
        if other.n == 0:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"{self._op}.merge: other has d={other.dim}, this state d={self.dim}")
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
        return result(self._mean)

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"{self._op}.cov: the unbiased covariance needs n >= 2 samples, have {self.n}")
        m2 = self.m2 / (self.n - 1)
        return result(0.5 * (m2 + m2.T))  # symmetric to the last bit (the outer products are)

    def __repr__(self) -> str:
        return f"GaussianMoments(n={self.n}, dim={self.dim})"


# ============================================================================= Fréchet distance


def _sqrt_factor(op: str, name: str, cov: np.ndarray) -> np.ndarray:
    r"""A factor :math:`F` with :math:`FF^\top = \Sigma` (MET.4): :math:`V_r\Lambda_r^{1/2}` from the
    symmetric eigendecomposition, eigenvalues at or below :math:`d\,\varepsilon\,\lambda_{\max}`
    dropped (they are rounding of zero; keeping them would add :math:`\sqrt{\varepsilon}` each)."""
    lam, v = np.linalg.eigh(0.5 * (cov + cov.T))
    top = max(float(lam[-1]), 0.0)
    if lam[0] < -1e-8 * max(top, np.finfo(np.float64).tiny):
        raise ValueError(
            f"{op}: {name} is not positive semi-definite (eigenvalue {lam[0]:.3g}, largest {top:.3g})"
        )
    keep = lam > cov.shape[0] * np.finfo(np.float64).eps * top
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


def _moments_args(op, args):
    """(mu1, tr cov1, mu2, tr cov2, f1, f2) from the 2- or 4-argument forms."""
    if len(args) == 4:
        mu1, cov1, mu2, cov2 = (
            as_float64(name, a) for name, a in zip(("mu1", "cov1", "mu2", "cov2"), args, strict=True)
        )
        for name, mu, cov in (("1", mu1, cov1), ("2", mu2, cov2)):
            if mu.ndim != 1 or cov.shape != (mu.size, mu.size):
                raise ValueError(
                    f"{op}: mu{name} must have shape (d,) and cov{name} (d, d), got {mu.shape}, {cov.shape}"
                )
            if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
                raise ValueError(f"{op}: mu{name} and cov{name} must be finite")
        if mu1.size != mu2.size:
            raise ValueError(f"{op}: mu2 must have the dimension of mu1 (d={mu1.size}), got {mu2.shape}")
        f1, f2 = _sqrt_factor(op, "cov1", cov1), _sqrt_factor(op, "cov2", cov2)
        return mu1, np.trace(cov1), mu2, np.trace(cov2), f1, f2
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
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    a, b = x - mu1, y - mu2
    f1 = _data_factor(a) / np.sqrt(x.shape[0] - 1)
    f2 = _data_factor(b) / np.sqrt(y.shape[0] - 1)
    tr1 = np.sum(a * a) / (x.shape[0] - 1)  # tr(A^T A) without the d x d product
    tr2 = np.sum(b * b) / (y.shape[0] - 1)
    return mu1, tr1, mu2, tr2, f1, f2


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
        below :math:`d\varepsilon\lambda_{\max}` dropped as rounding of zero (MET.4).

    Returns
    -------
    ndarray, shape []
        :math:`d^2`, real.  By the AM-GM inequality of MET.2 it is :math:`\ge0`; rounding
        can take it below 0 by about :math:`d\varepsilon(\operatorname{tr}\Sigma_1+\operatorname{tr}\Sigma_2)`,
        which is returned as computed (not clipped), so identical inputs give a rounding-size
        value of either sign.
    """
    op = "frechet_distance"
    mu1, tr1, mu2, tr2, f1, f2 = _moments_args(op, args)
    diff = mu1 - mu2
    value = diff @ diff + tr1 + tr2 - 2.0 * trace_sqrt_product(f1, f2)  # (MET.2)
    return result(value)


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
