r"""Divergences and kernels, NumPy reference (float64): values with hand-derived gradients.

Read next to ``derivations/divergence.md``; the tags ``(DIV.n)`` in the comments name
its equations.  Conventions:

* Two samples are 2-D arrays, ``x`` of shape ``(N, D)`` (real, :math:`p`) and ``y`` of
  shape ``(M, D)`` (model, :math:`q`), one sample per row; ``N`` and ``M`` may differ,
  ``D`` may not.
* ``mmd2`` is the squared maximum mean discrepancy for one of four kernels and one of
  three estimators; ``mmd2_backward`` returns the gradients w.r.t. ``x`` and ``y``.  The
  kernel matrix is formed in row blocks of at most ``_BLOCK_ELEMENTS`` differences, the
  reference's version of the tiling the native kernel does (DIV.11).
* Bandwidths chosen by the median heuristic (``bandwidths=None``) are constants: no
  gradient flows through :func:`median_bandwidth`.
* ``f_divergence`` is exact for discrete distributions and exists to check the f-GAN
  bounds of ``gan.py``: it accepts the divergence names of ``gan.F_DIVERGENCES``, with
  the same generator functions :math:`f`.
* ``name(...)`` returns float64 ndarrays (0-d for scalars; ``kid`` a pair of them);
  ``name_backward(*inputs, grad_output, **kw)`` returns a tuple with the gradient of
  ``sum(grad_output * name(...))`` w.r.t. each differentiable input, in order.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _checks
from ._common import as_float64, result, scalar_grad
from .gan import F_DIVERGENCES

__all__ = [
    "KERNELS",
    "MMD_ESTIMATORS",
    "density_ratio_from_logits",
    "density_ratio_from_logits_backward",
    "f_divergence",
    "kid",
    "median_bandwidth",
    "mmd2",
    "mmd2_backward",
]

KERNELS = ("rbf", "imq", "polynomial", "energy")
MMD_ESTIMATORS = ("unbiased", "biased", "linear")
_BANDWIDTH_KERNELS = ("rbf", "imq")  # the kernels that take bandwidths

# Row blocks of the pairwise arrays hold at most this many (row, column, feature)
# differences (32 MiB of float64), so the reference never forms an N x M x D array.
_BLOCK_ELEMENTS = 1 << 22


# ============================================================================= input checks


def _samples(x, y, allow_empty=False, names=("x", "y")):
    """``x`` (N, D) and ``y`` (M, D) as float64, same D; rows may be 0 only if ``allow_empty``."""
    x = as_float64(names[0], x)
    y = as_float64(names[1], y)
    for name, a in zip(names, (x, y), strict=True):
        _checks.ndim(name, a.shape, 2)
        if a.shape[1] == 0:
            raise ValueError(
                f"{name} must have at least one feature (shape (rows, D), D >= 1), got {a.shape}"
            )
        if a.shape[0] == 0 and not allow_empty:
            raise ValueError(f"{name} has no samples (shape {a.shape})")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{names[1]} must have the feature size of {names[0]} ({x.shape[1]}), got shape {y.shape}"
        )
    return x, y


def _bandwidths(kernel, bandwidths, x, y):
    """The tuple of bandwidths of an rbf/imq kernel (median heuristic for ``None``); () otherwise."""
    if kernel not in _BANDWIDTH_KERNELS:
        if bandwidths is not None:
            raise ValueError(f"bandwidths must be None for kernel={kernel!r}, got {bandwidths!r}")
        return ()
    if bandwidths is None:
        return (median_bandwidth(x, y),)  # (DIV.12) a constant: no gradient through it
    if isinstance(bandwidths, np.ndarray):
        if bandwidths.ndim != 1:
            raise ValueError(f"bandwidths must be one-dimensional, got shape {bandwidths.shape}")
        bandwidths = bandwidths.tolist()
    if not isinstance(bandwidths, (tuple, list)):
        raise TypeError(f"bandwidths must be a tuple or list of floats, got {type(bandwidths).__name__}")
    if len(bandwidths) == 0:
        raise ValueError("bandwidths must not be empty")
    return tuple(_checks.positive(f"bandwidths[{i}]", s) for i, s in enumerate(bandwidths))


def _estimator_sizes(estimator, n, m):
    if estimator == "unbiased":
        if n < 2:
            raise ValueError(f"x must have at least 2 samples for estimator='unbiased', got {n}")
        if m < 2:
            raise ValueError(f"y must have at least 2 samples for estimator='unbiased', got {m}")
    elif estimator == "linear":
        if m != n:
            raise ValueError(f"y must have as many samples as x ({n}) for estimator='linear', got {m}")
        if n < 2:
            raise ValueError(f"x must have at least 2 samples for estimator='linear', got {n}")


def _mmd_inputs(x, y, kernel, bandwidths, estimator):
    kernel = _checks.choice("kernel", kernel, KERNELS)
    estimator = _checks.choice("estimator", estimator, MMD_ESTIMATORS)
    x, y = _samples(x, y)
    _estimator_sizes(estimator, x.shape[0], y.shape[0])
    return x, y, kernel, _bandwidths(kernel, bandwidths, x, y), estimator


# ============================================================================= kernels


def _profile(kernel, t, bandwidths):
    r"""The kernel as a function of one statistic ``t``, and its derivative in ``t``.  (DIV.6), (DIV.8)

    Distance kernels take :math:`t = \lVert a - b\rVert^2`, the polynomial kernel
    :math:`t = a\cdot b / D` (the caller divides by D).  Returns ``(k, dk/dt)``.
    """
    if kernel == "rbf":  # sum_s exp(-t / (2 s^2))
        k = np.zeros_like(t)
        dk = np.zeros_like(t)
        for s in bandwidths:
            e = np.exp(-t / (2.0 * s * s))
            k += e
            dk -= e / (2.0 * s * s)
        return k, dk
    if kernel == "imq":  # sum_s (1 + t / s^2)^(-1/2)
        k = np.zeros_like(t)
        dk = np.zeros_like(t)
        for s in bandwidths:
            base = 1.0 + t / (s * s)
            k += base**-0.5
            dk -= 0.5 * base**-1.5 / (s * s)
        return k, dk
    if kernel == "energy":  # -sqrt(t); d/dt = -1/(2 sqrt t), taken as 0 at t = 0 (DIV.8)
        r = np.sqrt(t)
        safe = np.where(r > 0.0, r, 1.0)
        return -r, np.where(r > 0.0, -0.5 / safe, 0.0)
    # polynomial: (t + 1)^3 with t = a.b / D
    return (t + 1.0) ** 3, 3.0 * (t + 1.0) ** 2


def _row_blocks(rows, cols, features):
    step = max(1, _BLOCK_ELEMENTS // max(1, cols * features))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _pair_term(kernel, a, b, coef, bandwidths, with_grad):
    r"""Value :math:`\sum_{ij} C_{ij}\,k(a_i, b_j)` and, if asked, its gradients w.r.t. a and b.  (DIV.9)

    ``coef`` is the (Na, Nb) matrix C of the estimator's weights.  With
    :math:`\partial_1 k(a, b)` the derivative in the first argument (DIV.8) and the
    symmetry :math:`k(a, b) = k(b, a)`:

    .. math::
        \nabla_{a_i} = \sum_j C_{ij}\,\partial_1 k(a_i, b_j), \qquad
        \nabla_{b_j} = \sum_i C_{ij}\,\partial_1 k(b_j, a_i)
    """
    dim = a.shape[1]
    if kernel == "polynomial":
        # (DIV.6) t = a.b / D; (DIV.8) d/da k = 3 (t + 1)^2 b / D
        k, dk = _profile(kernel, (a @ b.T) / dim, bandwidths)
        value = float(np.sum(coef * k))
        if not with_grad:
            return value, None, None
        w = coef * dk / dim
        return value, w @ b, w.T @ a
    # Distance kernels: (DIV.8) d/da phi(|a - b|^2) = 2 phi'(|a - b|^2) (a - b), summed in row blocks.
    value = 0.0
    grad_a = np.zeros_like(a) if with_grad else None
    grad_b = np.zeros_like(b) if with_grad else None
    for rows in _row_blocks(a.shape[0], b.shape[0], dim):
        diff = a[rows, None, :] - b[None, :, :]  # (rows, Nb, D), exact differences: t_ii = 0 exactly
        k, dk = _profile(kernel, np.sum(diff * diff, axis=-1), bandwidths)
        value += float(np.sum(coef[rows] * k))
        if grad_a is not None and grad_b is not None:  # with_grad
            w = 2.0 * coef[rows] * dk  # (DIV.9)
            grad_a[rows] += np.einsum("ij,ijd->id", w, diff)
            grad_b -= np.einsum("ij,ijd->jd", w, diff)
    return value, grad_a, grad_b


def _paired_term(kernel, a, b, bandwidths, with_grad):
    r"""Value :math:`\sum_i k(a_i, b_i)` over matched rows, and its row gradients.  (DIV.7), (DIV.9)"""
    dim = a.shape[1]
    if kernel == "polynomial":
        k, dk = _profile(kernel, np.sum(a * b, axis=1) / dim, bandwidths)
        if not with_grad:
            return float(np.sum(k)), None, None
        w = (dk / dim)[:, None]
        return float(np.sum(k)), w * b, w * a
    diff = a - b
    k, dk = _profile(kernel, np.sum(diff * diff, axis=1), bandwidths)
    if not with_grad:
        return float(np.sum(k)), None, None
    g = 2.0 * dk[:, None] * diff
    return float(np.sum(k)), g, -g


def _off_diagonal(n):
    """Pair weights [i != j] / (n (n - 1)) of a within-sample term of the unbiased estimator (n >= 2)."""
    return (1.0 - np.eye(n)) / (n * (n - 1))


def _mmd2(x, y, kernel, bw, estimator, with_grad):
    """(value, grad_x, grad_y) of the estimator; gradients None unless ``with_grad``."""
    n, m = x.shape[0], y.shape[0]
    if estimator == "linear":
        # (DIV.7) h_i = k(x_2i, x_2i+1) + k(y_2i, y_2i+1) - k(x_2i, y_2i+1) - k(x_2i+1, y_2i)
        half = n // 2
        even, odd = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
        data = {"x": x, "y": y}
        grads = {"x": np.zeros_like(x), "y": np.zeros_like(y)}
        value = 0.0
        for sign, a, a_rows, b, b_rows in (
            (+1.0, "x", even, "x", odd),
            (+1.0, "y", even, "y", odd),
            (-1.0, "x", even, "y", odd),
            (-1.0, "x", odd, "y", even),
        ):
            v, ga, gb = _paired_term(kernel, data[a][a_rows], data[b][b_rows], bw, with_grad)
            value += sign * v / half
            if with_grad:  # (DIV.9) each row appears in exactly one pair of each kind
                grads[a][a_rows] += sign * ga / half
                grads[b][b_rows] += sign * gb / half
        if not with_grad:
            return value, None, None
        return value, grads["x"], grads["y"]

    if estimator == "unbiased":
        cxx, cyy = _off_diagonal(n), _off_diagonal(m)  # (DIV.7) i != j only
    else:
        cxx, cyy = np.full((n, n), 1.0 / (n * n)), np.full((m, m), 1.0 / (m * m))  # (DIV.7) all pairs
    cxy = np.full((n, m), -2.0 / (n * m))
    vxx, gxx_a, gxx_b = _pair_term(kernel, x, x, cxx, bw, with_grad)
    vyy, gyy_a, gyy_b = _pair_term(kernel, y, y, cyy, bw, with_grad)
    vxy, gxy_x, gxy_y = _pair_term(kernel, x, y, cxy, bw, with_grad)
    value = vxx + vyy + vxy  # (DIV.6) E k(x,x') + E k(y,y') - 2 E k(x,y)
    if not with_grad:
        return value, None, None
    # (DIV.9) x appears as both arguments of the k(x, x') term: both gradients add.
    return value, gxx_a + gxx_b + gxy_x, gyy_a + gyy_b + gxy_y


# ============================================================================= MMD


def mmd2(x, y, kernel="rbf", bandwidths=None, estimator="unbiased"):
    r"""Squared maximum mean discrepancy between the samples ``x`` ~ p and ``y`` ~ q.

    .. math::
        \mathrm{MMD}^2(p, q) = \mathbb{E}\,k(x, x') + \mathbb{E}\,k(y, y') - 2\,\mathbb{E}\,k(x, y)

    estimated by

    .. math::
        \text{unbiased:}\ \frac{\sum_{i\ne j}k(x_i,x_j)}{N(N-1)} + \frac{\sum_{i\ne j}k(y_i,y_j)}{M(M-1)}
            - \frac{2}{NM}\sum_{i,j}k(x_i,y_j), \qquad
        \text{biased:}\ \frac{\sum_{i,j}k(x_i,x_j)}{N^2} + \frac{\sum_{i,j}k(y_i,y_j)}{M^2}
            - \frac{2}{NM}\sum_{i,j}k(x_i,y_j),

    .. math::
        \text{linear } (N = M,\ n = \lfloor N/2\rfloor):\ \frac1n\sum_{i<n}
            k(x_{2i},x_{2i+1}) + k(y_{2i},y_{2i+1}) - k(x_{2i},y_{2i+1}) - k(x_{2i+1},y_{2i})

    with the kernels (:math:`r = \lVert a - b\rVert_2`, bandwidths :math:`s`)

    .. math::
        k_{\text{rbf}} = \sum_s e^{-r^2/(2s^2)}, \quad
        k_{\text{imq}} = \sum_s \big(1 + r^2/s^2\big)^{-1/2}, \quad
        k_{\text{polynomial}} = \big(a\cdot b/D + 1\big)^3, \quad
        k_{\text{energy}} = -r

    Parameters
    ----------
    x : ndarray, shape [N, D]
        Samples of p, one per row.
    y : ndarray, shape [M, D]
        Samples of q (same D).
    kernel : {'rbf', 'imq', 'polynomial', 'energy'}
        'polynomial' is the cubic kernel of KID; 'energy' makes MMD^2 the energy distance.
    bandwidths : tuple or list of float (or a 1-D array), or None
        Positive, finite, at least one; rbf/imq only (None for the other kernels).
        ``None`` means ``(median_bandwidth(x, y),)``, held constant.
    estimator : {'unbiased', 'biased', 'linear'}
        'unbiased' needs N, M >= 2; 'linear' needs N == M >= 2 (an odd last row is unused).

    Returns
    -------
    ndarray, shape []
        The estimate (the unbiased and linear ones can be negative).

    Notes
    -----
    Pairwise squared distances are summed from exact coordinate differences (no
    :math:`\lVert a\rVert^2 + \lVert b\rVert^2 - 2a\cdot b` cancellation), in row blocks
    (DIV.11).  All kernels are bounded by their inputs' scale: finite for finite inputs
    (the polynomial kernel up to :math:`(a\cdot b/D)^3 \lesssim 10^{308}`).
    """
    x, y, kernel, bw, estimator = _mmd_inputs(x, y, kernel, bandwidths, estimator)
    value, _, _ = _mmd2(x, y, kernel, bw, estimator, with_grad=False)
    return result(value)


def mmd2_backward(x, y, grad_output, kernel="rbf", bandwidths=None, estimator="unbiased"):
    r"""Gradient of :func:`mmd2` w.r.t. ``x`` and ``y``.

    .. math::
        \nabla_{x_i} = g\Big(\sum_j (C^{xx}_{ij} + C^{xx}_{ji})\,\partial_1 k(x_i, x_j)
            + \sum_j C^{xy}_{ij}\,\partial_1 k(x_i, y_j)\Big)

    (and symmetrically for :math:`y_j`), with :math:`C` the estimator's pair weights and

    .. math::
        \partial_1 k(a, b) = 2\varphi'(r^2)\,(a - b) \ \text{(distance kernels)}, \qquad
        \partial_1 k(a, b) = \tfrac{3}{D}\big(a\cdot b/D + 1\big)^2\, b \ \text{(polynomial)}

    Parameters
    ----------
    x : ndarray, shape [N, D]
    y : ndarray, shape [M, D]
    grad_output : float or ndarray, shape []
        Upstream gradient of the scalar.
    kernel, bandwidths, estimator
        As in :func:`mmd2`; ``bandwidths=None`` is the median heuristic, held constant.

    Returns
    -------
    (grad_x, grad_y) : tuple of ndarray, shapes [N, D] and [M, D]

    Notes
    -----
    The energy kernel :math:`-\lVert a - b\rVert` is not differentiable at
    :math:`a = b`; there the pair contributes 0 (the minimum-norm subgradient, also
    what makes the diagonal :math:`k(x_i, x_i) = 0` contribute nothing).
    """
    x, y, kernel, bw, estimator = _mmd_inputs(x, y, kernel, bandwidths, estimator)
    g = scalar_grad("grad_output", grad_output)
    _, grad_x, grad_y = _mmd2(x, y, kernel, bw, estimator, with_grad=True)
    return g * grad_x, g * grad_y


# ============================================================================= median heuristic, KID


def median_bandwidth(x, y, max_points=2000):
    r"""The median heuristic: the median pairwise distance of the pooled sample.

    .. math::
        s = \operatorname{median}\big\{\lVert z_i - z_j\rVert_2 : i < j\big\}, \qquad
        z = (x_1, \dots, x_N, y_1, \dots, y_M)

    If the pool has more than ``max_points`` rows, the strided subsample
    ``z[::ceil(len(z) / max_points)]`` is used.

    Parameters
    ----------
    x : ndarray, shape [N, D]
    y : ndarray, shape [M, D]
        Either may have 0 rows, not both of them together with the other's single row.
    max_points : int
        At least 2.

    Returns
    -------
    float
        A positive bandwidth.

    Raises
    ------
    ValueError
        If the pool has fewer than 2 points, or the median distance is 0 (more than
        half of the pairs coincide): no scale can be read from such data.

    Notes
    -----
    ``np.median`` of the :math:`L(L-1)/2` distances (the mean of the two middle ones
    when their number is even).  Distances from exact differences, in row blocks.
    """
    with _checks.named_errors("median_bandwidth"):
        return _median_bandwidth(x, y, max_points)


def _median_bandwidth(x, y, max_points):
    x, y = _samples(x, y, allow_empty=True)
    max_points = _checks.positive_int("max_points", max_points, 2)
    z = np.concatenate([x, y], axis=0)
    if len(z) > max_points:
        z = z[:: math.ceil(len(z) / max_points)]  # (DIV.12) strided subsample
    if len(z) < 2:
        raise ValueError(f"x, y: the median heuristic needs at least 2 pooled points, got {len(z)}")
    if not np.isfinite(z).all():  # as the engine's centred form, which makes it NaN: refused the same way
        raise ValueError("x, y: the median pairwise distance is nan (non-finite data)")
    sq = np.empty((len(z), len(z)))
    for rows in _row_blocks(len(z), len(z), z.shape[1]):
        diff = z[rows, None, :] - z[None, :, :]
        sq[rows] = np.sum(diff * diff, axis=-1)
    s = float(np.median(np.sqrt(sq[np.triu_indices(len(z), k=1)])))  # (DIV.12) pairs i < j
    if not math.isfinite(s):
        raise ValueError(f"x, y: the median pairwise distance is {s} (non-finite data)")
    if s == 0.0:
        raise ValueError(
            "x, y: the median pairwise distance of the pooled data is 0 (most points coincide); "
            "pass bandwidths explicitly"
        )
    return s


def mmd2_u_variance(n, m, sums):
    r"""The unbiased estimate of :math:`\operatorname{Var}\widehat{\mathrm{MMD}}^2_u` from kernel sums.  (DIV.16)

    .. math::
        \operatorname{Var} = \frac{4(N-2)\zeta_1^{x} + 2\zeta_2^{x}}{N(N-1)}
        + \frac{4(M-2)\zeta_1^{y} + 2\zeta_2^{y}}{M(M-1)}
        + \frac{4\big(\zeta_{11} + (M-1)\zeta_{10} + (N-1)\zeta_{01}\big)}{NM}
        - \frac{8\xi_x}{N} - \frac{8\xi_y}{M}

    with every population moment replaced by its U-statistic over distinct indices, so the
    estimate is exactly unbiased (it can be slightly negative).  ``sums`` maps ``Sx, Rx, Fx``
    (sum, squared norm of the row sums, sum of squares of the off-diagonal :math:`K_{xx}`),
    ``Sy, Ry, Fy`` (the same for :math:`K_{yy}`), ``Sxy, Ra, Rb, Fxy`` (sum, squared norms of the
    row and column sums, sum of squares of :math:`K_{xy}`), ``Dx`` = (row sums of
    :math:`K_{xx}`)·(row sums of :math:`K_{xy}`) and ``Dy`` = (row sums of :math:`K_{yy}`)·(column
    sums of :math:`K_{xy}`).  Needs N, M >= 4.
    """
    g = sums

    def ff(k, j):  # falling factorial k (k-1) ... (k-j+1)
        return math.prod(range(k - j + 1, k + 1))

    mu2_x = (g["Sx"] ** 2 - 4 * g["Rx"] + 2 * g["Fx"]) / ff(n, 4)  # E k(x1,x2) k(x3,x4)
    mu2_y = (g["Sy"] ** 2 - 4 * g["Ry"] + 2 * g["Fy"]) / ff(m, 4)
    mu2_xy = (g["Sxy"] ** 2 - g["Ra"] - g["Rb"] + g["Fxy"]) / (ff(n, 2) * ff(m, 2))  # E k(x1,y1) k(x2,y2)
    zeta1_x = (g["Rx"] - g["Fx"]) / ff(n, 3) - mu2_x  # Cov k(x1,x2), k(x1,x3)
    zeta1_y = (g["Ry"] - g["Fy"]) / ff(m, 3) - mu2_y
    zeta2_x = g["Fx"] / ff(n, 2) - mu2_x  # Var k(x1,x2)
    zeta2_y = g["Fy"] / ff(m, 2) - mu2_y
    zeta11 = g["Fxy"] / (n * m) - mu2_xy  # Var k(x,y)
    zeta10 = (g["Ra"] - g["Fxy"]) / (n * ff(m, 2)) - mu2_xy  # Cov k(x,y1), k(x,y2)
    zeta01 = (g["Rb"] - g["Fxy"]) / (ff(n, 2) * m) - mu2_xy  # Cov k(x1,y), k(x2,y)
    # Cov k(x1,x2), k(x1,y)
    xi_x = g["Dx"] / (ff(n, 2) * m) - (g["Sx"] * g["Sxy"] - 2 * g["Dx"]) / (ff(n, 3) * m)
    xi_y = g["Dy"] / (ff(m, 2) * n) - (g["Sy"] * g["Sxy"] - 2 * g["Dy"]) / (ff(m, 3) * n)
    return (  # (DIV.16)
        (4 * (n - 2) * zeta1_x + 2 * zeta2_x) / ff(n, 2)
        + (4 * (m - 2) * zeta1_y + 2 * zeta2_y) / ff(m, 2)
        + 4 * (zeta11 + (m - 1) * zeta10 + (n - 1) * zeta01) / (n * m)
        - 8 * xi_x / n
        - 8 * xi_y / m
    )


def _polynomial_sums(x, y):
    """The kernel sums of :func:`mmd2_u_variance` from the dense cubic-polynomial Gram matrices."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    np.fill_diagonal(kxx, 0.0)  # the U-statistics never pair a sample with itself
    np.fill_diagonal(kyy, 0.0)
    rx, ry, a, b = kxx.sum(1), kyy.sum(1), kxy.sum(1), kxy.sum(0)
    return {
        "Sx": rx.sum(), "Rx": rx @ rx, "Fx": np.sum(kxx * kxx),
        "Sy": ry.sum(), "Ry": ry @ ry, "Fy": np.sum(kyy * kyy),
        "Sxy": a.sum(), "Ra": a @ a, "Rb": b @ b, "Fxy": np.sum(kxy * kxy),
        "Dx": rx @ a, "Dy": ry @ b,
    }  # fmt: skip


def kid(real_features, fake_features, subsets=100, subset_size=1000, seed=0):
    r"""Kernel Inception Distance: the unbiased cubic-polynomial MMD^2 averaged over random subsets,
    or on the full sets with the closed-form standard deviation of the estimator.

    .. math::
        \mathrm{KID} = \frac1S\sum_{s=1}^{S}\widehat{\mathrm{MMD}}^2_u\big(X_{I_s}, Y_{J_s}\big),
        \qquad k(a, b) = \big(a\cdot b/D + 1\big)^3

    with :math:`I_s, J_s` drawn without replacement, in this order per subset:
    ``rng = np.random.default_rng(seed)``, ``I = rng.choice(N_real, subset_size,
    replace=False)``, ``J = rng.choice(N_fake, subset_size, replace=False)``.

    Parameters
    ----------
    real_features : ndarray, shape [N_real, D]
    fake_features : ndarray, shape [N_fake, D]
    subsets : int or None
        Number of subsets S (>= 1); ``None``: no subsampling, the full sets (N, M >= 4).
    subset_size : int
        Rows per subset, 2 <= subset_size <= min(N_real, N_fake) (ignored when ``subsets=None``).
    seed : int
        Seed of ``np.random.default_rng`` (>= 0).

    Returns
    -------
    (mean, std) : tuple of ndarray, shape []
        Mean and standard deviation (``ddof=0``, as torch-fidelity) over the subsets.  With
        ``subsets=None``: the full-set :math:`\widehat{\mathrm{MMD}}^2_u` and the square root of
        the unbiased estimate of its variance (DIV.16; clipped at 0 when the estimate, which is
        unbiased and so can dip below 0 when the variance is tiny, is negative): the error bar
        of this one estimate, not a spread of subsets.

    Notes
    -----
    Not differentiable here (an evaluation metric); the gradient of each subset's term is
    :func:`mmd2_backward` with ``kernel='polynomial'``.
    """
    real, fake = _samples(real_features, fake_features, names=("real_features", "fake_features"))
    if subsets is None:
        for name, a in (("real_features", real), ("fake_features", fake)):
            if a.shape[0] < 4:
                raise ValueError(
                    f"kid: {name} needs >= 4 samples for the variance (subsets=None), got {len(a)}"
                )
        value, _, _ = _mmd2(real, fake, "polynomial", (), "unbiased", False)  # (DIV.13)
        var = mmd2_u_variance(real.shape[0], fake.shape[0], _polynomial_sums(real, fake))  # (DIV.16)
        return result(value), result(math.sqrt(max(var, 0.0)))
    subsets = _checks.positive_int("subsets", subsets)
    subset_size = _checks.positive_int("subset_size", subset_size, 2, "the unbiased estimator")
    seed = _checks.seed("seed", seed)
    for name, a in (("real_features", real), ("fake_features", fake)):
        if subset_size > a.shape[0]:
            raise ValueError(f"subset_size ({subset_size}) exceeds the {a.shape[0]} samples of {name}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        idx_r = rng.choice(real.shape[0], subset_size, replace=False)
        idx_f = rng.choice(fake.shape[0], subset_size, replace=False)
        values[s], _, _ = _mmd2(real[idx_r], fake[idx_f], "polynomial", (), "unbiased", False)  # (DIV.13)
    return result(values.mean()), result(values.std())


# ============================================================================= density ratio


def density_ratio_from_logits(logits):
    r"""The density ratio a classifier's logits estimate: :math:`D/(1-D) = e^{l}`.

    .. math::
        r = \frac{D}{1 - D} = \frac{\sigma(l)}{\sigma(-l)} = e^{l}

    At the optimal discriminator :math:`l^* = \log(p/q)` this is :math:`p/q`.

    Parameters
    ----------
    logits : ndarray, any shape
        Discriminator logits.

    Returns
    -------
    ndarray, the shape of ``logits``
        :math:`e^{l}`, elementwise.

    Notes
    -----
    Never formed as a quotient of rounded probabilities (which is 0/0 or 1/0 for
    :math:`|l| \gtrsim 37` in float64).  Overflows to ``inf`` for :math:`l > 709.78`
    (float64), where the true ratio exceeds the format: the right answer, not a failure.
    """
    l = as_float64("logits", logits)
    with np.errstate(over="ignore"):
        return result(np.exp(l))  # (DIV.1)


def density_ratio_from_logits_backward(logits, grad_output):
    r"""Gradient of :func:`density_ratio_from_logits`: :math:`g\,e^{l}`.

    Parameters
    ----------
    logits : ndarray, any shape
    grad_output : ndarray, the shape of ``logits``

    Returns
    -------
    (grad_logits,) : tuple of ndarray

    Notes
    -----
    Same domain as the forward.
    """
    l = as_float64("logits", logits)
    g = as_float64("grad_output", grad_output)
    if g.shape != l.shape:
        raise ValueError(f"grad_output must have the shape of logits {l.shape}, got {g.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        return (g * np.exp(l),)  # (DIV.1) d e^l / dl = e^l


# ============================================================================= f-divergences


def _rel(a, b):
    r""":math:`a\log(a/b)` elementwise with :math:`0\log(0/b) = 0` and :math:`a\log(a/0) = +\infty` for a > 0."""
    out = np.zeros_like(a)
    pos = a > 0
    with np.errstate(divide="ignore"):
        out[pos] = a[pos] * (np.log(a[pos]) - np.log(b[pos]))
    return out


def _pearson(p, q):
    out = np.zeros_like(p)
    out[(q == 0) & (p > 0)] = np.inf
    pos = q > 0
    out[pos] = (p[pos] - q[pos]) ** 2 / q[pos]
    return out


# (DIV.2) The perspective q f(p/q) of each generator f of gan.F_DIVERGENCES (GAN.18), written in
# p and q so that the limits at p = 0 and q = 0 are exact:
_PERSPECTIVES = {
    "kl": lambda p, q: _rel(p, q),  # f = u log u
    "reverse_kl": lambda p, q: _rel(q, p),  # f = -log u
    "pearson": _pearson,  # f = (u - 1)^2
    "squared_hellinger": lambda p, q: (np.sqrt(p) - np.sqrt(q)) ** 2,  # f = (sqrt u - 1)^2
    # f = u log u - (u + 1) log((u + 1)/2): KL(p||m) + KL(q||m) = 2 JSD, m = (p + q)/2
    "jensen_shannon": lambda p, q: _rel(p, (p + q) / 2.0) + _rel(q, (p + q) / 2.0),
    # f = u log u - (u + 1) log(u + 1): 2 JSD - log 4
    "gan": lambda p, q: _rel(p, p + q) + _rel(q, p + q),
    "total_variation": lambda p, q: 0.5 * np.abs(p - q),  # f = |u - 1| / 2
}
assert set(_PERSPECTIVES) == set(F_DIVERGENCES), "f_divergence must cover the f-GAN divergences"


def _distribution(name, a):
    a = as_float64(name, a)
    _checks.ndim(name, a.shape, 1)
    if a.shape[0] == 0:
        raise ValueError(f"{name} must have at least one atom, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name} must be finite and >= 0 (probabilities)")
    if abs(float(np.sum(a)) - 1.0) > 1e-9:
        raise ValueError(f"{name} must sum to 1 (a distribution), got {float(np.sum(a))!r}")
    return a


def f_divergence(p, q, divergence):
    r"""Exact f-divergence of two discrete distributions, with the f of the f-GAN (GAN.18).

    .. math::
        D_f(p\,\Vert\,q) = \sum_i q_i\, f\!\Big(\frac{p_i}{q_i}\Big)

    with the limits :math:`0\,f(0/0) = 0` and, for :math:`q_i = 0 < p_i`,
    :math:`p_i \lim_{u\to\infty} f(u)/u` (:math:`+\infty` for kl and pearson,
    :math:`p_i` for squared_hellinger, :math:`p_i\log 2` for jensen_shannon, 0 for
    reverse_kl and gan, :math:`p_i/2` for total_variation); for :math:`p_i = 0 < q_i` the term
    is :math:`q_i f(0)` (:math:`+\infty` for reverse_kl).

    Parameters
    ----------
    p, q : ndarray, shape [K]
        Probabilities (finite, >= 0, each summing to 1 within 1e-9).
    divergence : str
        One of 'kl', 'reverse_kl', 'pearson', 'squared_hellinger', 'jensen_shannon',
        'gan', 'total_variation' (the keys of ``gan.F_DIVERGENCES``); the generator
        functions are those of ``derivations/gan.md`` (GAN.18), so 'jensen_shannon'
        is 2 JSD and 'gan' is 2 JSD - log 4.

    Returns
    -------
    ndarray, shape []
        :math:`D_f` in nats, possibly ``inf``.

    Notes
    -----
    Each term is the perspective :math:`q f(p/q)` written in p and q (DIV.2), so the
    zero cases are exact limits, not ``0 * inf``.  No backward: a checking tool.
    """
    divergence = _checks.choice("divergence", divergence, tuple(F_DIVERGENCES))
    p = _distribution("p", p)
    q = _distribution("q", q)
    if q.shape != p.shape:
        raise ValueError(f"q must have the shape of p {p.shape}, got {q.shape}")
    return result(np.sum(_PERSPECTIVES[divergence](p, q)))  # (DIV.2)
