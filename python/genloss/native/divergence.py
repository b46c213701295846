r"""Divergences and kernels on the native engine: MMD^2, the median heuristic, KID, the
density ratio of a classifier.

``mmd2`` returns ``(value, grads)`` like every native loss (see
``genloss.native.gan``): ``value`` a 0-d array of the inputs' kind and dtype,
``grads`` = (d value/d x, d value/d y), empty when ``need_grad=False``
(``need_grad`` may be two bools; an unneeded gradient is then ``None`` and never
written). Value and both gradients come from ONE tiled pass over the pairs
(cpp/include/genloss/mmd.h, cpp/src/mmd_cpu.cpp, cuda/mmd.cu): memory
O((N + M) D), the N x M kernel matrix never exists, and the result is bitwise the
same for any thread count.

Conventions (shared with ``genloss.reference.divergence``):

* rbf: :math:`k(a, b) = \sum_s \exp(-\|a-b\|^2 / (2 s^2))`;
  imq: :math:`k = \sum_s (1 + \|a-b\|^2/s^2)^{-1/2}`;
  polynomial: :math:`k = (a \cdot b / D + 1)^3`; energy: :math:`k = -\|a-b\|`
  (gradient 0 at a == b). ``bandwidths=None`` means ``(median_bandwidth(x, y),)``
  for rbf/imq, held constant (no gradient flows through it); polynomial and
  energy take no bandwidths.
* unbiased: :math:`\frac{1}{N(N-1)}\sum_{i\ne j}k(x_i,x_j) + \frac{1}{M(M-1)}\sum_{i\ne j}k(y_i,y_j)
  - \frac{2}{NM}\sum_{i,j}k(x_i,y_j)`; biased: 1/N^2, 1/M^2 with the diagonals;
  linear (N == M): :math:`\frac1n\sum_{i<n} k(x_{2i},x_{2i+1}) + k(y_{2i},y_{2i+1})
  - k(x_{2i},y_{2i+1}) - k(x_{2i+1},y_{2i})`, n = N // 2.

Accuracy: float64 inputs are computed in float64. float32 inputs are computed in
float32 inside a tile of 256 x 256 pairs and summed across tiles in float64; the
value agrees with a float64 evaluation to about 1e-6 relative to
:math:`\frac{1}{N^2}\sum |k|` (see tests/test_mmd.py, ``F32_TOL``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _checks as C
from ._compose import cached, grads_out, inputs, needs
from ._engine import _C, Buf, as_input, data_used, empty, map_reduce, mmd, refuse_capture, to_host

KERNELS: tuple[str, ...] = tuple(_C.MMD_KERNELS)  # order = enum MmdKernel in genloss/mmd.h
ESTIMATORS: tuple[str, ...] = tuple(_C.MMD_ESTIMATORS)  # order = enum MmdEstimator
BANDWIDTH_KERNELS = ("rbf", "imq")


def _points(name: str, b: Buf) -> tuple[int, int]:
    if len(b.shape) != 2:
        raise ValueError(f"{name} must have shape (n, D), got shape {tuple(b.shape)}")
    n, d = b.shape
    if d < 1:
        raise ValueError(f"{name} has no features (shape {tuple(b.shape)})")
    return n, d


def check_bandwidths(kernel: str, bandwidths: Any) -> tuple[float, ...] | None:
    """The bandwidths as a tuple of finite positive floats; None (median) for rbf/imq only."""
    if kernel not in BANDWIDTH_KERNELS:
        if bandwidths is not None:
            raise ValueError(f"bandwidths must be None for kernel {kernel!r}, got {bandwidths!r}")
        return ()
    if bandwidths is None:
        return None
    if isinstance(bandwidths, (str, bytes)) or not hasattr(bandwidths, "__iter__"):
        raise TypeError(
            f"bandwidths must be a sequence of positive floats or None, got {type(bandwidths).__name__}"
        )
    bws = tuple(
        C.positive(f"bandwidths[{i}]", float(v) if hasattr(v, "item") else v)
        for i, v in enumerate(bandwidths)
    )
    if not bws:
        raise ValueError("bandwidths must not be empty (None means the median heuristic)")
    return bws


def check_sizes(estimator: str, n: int, m: int) -> None:
    if estimator == "linear":
        if n != m:
            raise ValueError(
                f"y must have as many points as x for estimator 'linear' (N == M), got N={n}, M={m}"
            )
        if n < 2:
            raise ValueError(f"x must have at least 2 points for estimator 'linear', got {n}")
    elif estimator == "unbiased":
        if n < 2:
            raise ValueError(f"x must have at least 2 points for the unbiased estimator, got {n}")
        if m < 2:
            raise ValueError(f"y must have at least 2 points for the unbiased estimator, got {m}")
    else:
        if n < 1:
            raise ValueError("x has no points")
        if m < 1:
            raise ValueError("y has no points")


# ---------------------------------------------------------------- (DIV.12)
def _median_numpy(z: np.ndarray) -> float:
    if not np.isfinite(z).all():  # the centred form below would be NaN (inf - inf), with a warning
        return float("nan")
    z = z - z.mean(axis=0)  # distances are translation invariant; centring shrinks cancellation
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    iu = np.triu_indices(len(z), k=1)
    return float(np.median(np.sqrt(np.maximum(d2[iu], 0.0))))


def _median_torch(torch: Any, z: Any) -> float:
    z = z - z.mean(dim=0)
    sq = (z * z).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    iu = torch.triu_indices(len(z), len(z), offset=1, device=z.device)
    d = torch.sqrt(torch.clamp(d2[iu[0], iu[1]], min=0.0)).sort().values
    k = d.numel()
    mid = d[(k - 1) // 2 : k // 2 + 1]  # NumPy's median: the mean of the middle pair
    return float(mid.mean())


def median_bandwidth(x: Any, y: Any, max_points: int = 2000) -> float:
    r"""The median heuristic: the median of :math:`\|z_i - z_j\|`, i < j, over z = concat(x, y).

    If z has more than ``max_points`` points, the strided subsample
    ``z[::ceil(len(z) / max_points)]`` is used. Computed in float64 (NumPy for
    NumPy/CuPy-free CPU arrays, torch on the tensor's device for torch tensors).
    ValueError if z has fewer than 2 points or the median distance is 0.  (DIV.12)
    """
    with C.named_errors("median_bandwidth"):
        return _median_bandwidth(x, y, max_points)


def _median_bandwidth(x: Any, y: Any, max_points: int) -> float:
    C.positive_int("max_points", max_points, 2)
    xb, yb = as_input(x, "x"), as_input(y, "y")
    _, d = _points("x", xb)
    _, dy = _points("y", yb)
    if dy != d:
        raise ValueError(f"y must have the dimension of x (D={d}), got shape {tuple(yb.shape)}")
    total = xb.shape[0] + yb.shape[0]
    if total < 2:
        raise ValueError(f"x, y: the median heuristic needs at least 2 pooled points, got {total}")
    refuse_capture(xb, "median_bandwidth", "it returns a Python float (the median is read back to the host)")
    step = math.ceil(total / max_points) if total > max_points else 1
    if xb.kind == "torch":
        import torch

        z = torch.cat([xb.arr.detach(), _torch_like(xb, yb)]).to(torch.float64)[::step]
        med = _median_torch(torch, z)
    else:
        zn = np.concatenate([to_host(xb.arr), to_host(yb.arr)]).astype(np.float64)[::step]
        med = _median_numpy(zn)
    if not math.isfinite(med):  # the reference's messages: NaN is not "repeated points"
        raise ValueError(f"x, y: the median pairwise distance is {med} (non-finite data)")
    if med == 0.0:
        raise ValueError(
            "x, y: the median pairwise distance of the pooled data is 0 (most points coincide); "
            "pass bandwidths explicitly"
        )
    return med


# ---------------------------------------------------------------- (DIV.6, DIV.7, DIV.9)
def mmd2(x, y, kernel="rbf", bandwidths=None, estimator="unbiased", *, need_grad=True):
    r"""Squared MMD between the samples x (N, D) and y (M, D), with d/dx and d/dy.  (DIV.6, DIV.7, DIV.9)

    One tiled pass computes the value and both gradients; see the module
    docstring for the kernels and estimators.
    """
    C.choice("kernel", kernel, KERNELS)
    C.choice("estimator", estimator, ESTIMATORS)
    bws = check_bandwidths(kernel, bandwidths)

    def compose():
        xb, yb = inputs(["x", "y"], [x, y])
        n, d = _points("x", xb)
        m, dy = _points("y", yb)
        if dy != d:
            raise ValueError(f"y must have the dimension of x (D={d}), got shape {tuple(yb.shape)}")
        check_sizes(estimator, n, m)
        flags = needs(need_grad, 2)
        out = empty(xb, ())
        gx = empty(xb, xb.shape) if flags[0] else None
        gy = empty(yb, yb.shape) if flags[1] else None
        b = bws
        if b is None:
            refuse_capture(xb, "mmd2", "bandwidths=None takes the median distance of the data on the host "
                           "(pass the bandwidths: median_bandwidth(x, y) once, before capture)")  # fmt: skip
            data_used()  # the median of the data: a plan could not follow it
            b = (median_bandwidth(xb.arr, yb.arr),)
        mmd(xb, yb, kernel=KERNELS.index(kernel), estimator=ESTIMATORS.index(estimator), bandwidths=b, out=out,
            grads=(gx, gy))  # fmt: skip
        return out.arr, grads_out([gx, gy], flags)

    if bws is None:  # no plan (see above): no recording either
        return compose()
    return cached(("mmd2", kernel, estimator, bws, need_grad), (x, y), compose)


# ---------------------------------------------------------------- (DIV.13)
def kid_indices(n_real: int, n_fake: int, subsets: int, subset_size: int, seed: Any) -> list:
    """The subset indices KID draws: per subset, real then fake, without replacement."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(subsets):
        idx_r = rng.choice(n_real, subset_size, replace=False)
        idx_f = rng.choice(n_fake, subset_size, replace=False)
        out.append((idx_r, idx_f))
    return out


_KID_TILE = 1024  # rows per tile of the full-set variance sums: memory O(_KID_TILE * (N + M))


def _torch_like(like: Buf, b: Buf) -> Any:
    """``b``'s values as a detached torch tensor on ``like``'s device (``b`` may be NumPy, CuPy,
    any DLPack array: the ops that read their data back accept mixed kinds, as the engine's do)."""
    import torch

    t = b.arr.detach() if b.kind == "torch" else torch.as_tensor(to_host(b.arr))
    return t.to(like.arr.device)


def kid_full_set(real: Buf, fake: Buf) -> tuple[float, float]:
    r"""(full-set unbiased polynomial MMD^2, sqrt of the unbiased estimate of its variance).  (DIV.16)

    The Gram matrices are formed one row tile at a time in float64 on the data's device and
    reduced at once to the sums of ``reference.divergence.mmd2_u_variance`` (row sums, their
    squared norms and dot products, sums of squares): memory O(tile (N + M)), never N x N.
    """
    from ..reference.divergence import mmd2_u_variance

    if real.kind == "torch":
        import torch

        x, y = real.arr.detach().to(torch.float64), _torch_like(real, fake).to(torch.float64)
    elif fake.kind == real.kind:  # NumPy, or CuPy on its device
        x, y = real.arr.astype(np.float64), fake.arr.astype(np.float64)
    else:  # mixed kinds (a NumPy x with a torch y, ...): both on the host
        x, y = to_host(real.arr).astype(np.float64), to_host(fake.arr).astype(np.float64)
    n, d = x.shape
    m = y.shape[0]
    for name, k in (("real_features", n), ("fake_features", m)):
        if k < 4:
            raise ValueError(f"kid: {name} needs >= 4 samples for the variance (subsets=None), got {k}")

    def rows(a, b, diagonal):  # one tile of (a b^T / D + 1)^3, its diagonal taken out when a is b's tile
        k = (a @ b.T / d + 1.0) ** 3
        if diagonal is not None:
            diag = ((a * a).sum(axis=1) / d + 1.0) ** 3
            return k.sum(axis=1) - diag, float((k * k).sum() - (diag * diag).sum())
        return k, None

    g = dict.fromkeys(("Sx", "Rx", "Fx", "Sy", "Ry", "Fy", "Sxy", "Ra", "Rb", "Fxy", "Dx", "Dy"), 0.0)
    col: Any = None  # column sums of K_xy, accumulated over the row tiles
    for i in range(0, n, _KID_TILE):
        a = x[i : i + _KID_TILE]
        r, f = rows(a, x, True)
        kxy, _ = rows(a, y, None)
        rs = kxy.sum(axis=1)
        col = kxy.sum(axis=0) if col is None else col + kxy.sum(axis=0)
        g["Sx"] += float(r.sum())
        g["Rx"] += float((r * r).sum())
        g["Fx"] += f
        g["Sxy"] += float(rs.sum())
        g["Ra"] += float((rs * rs).sum())
        g["Fxy"] += float((kxy * kxy).sum())
        g["Dx"] += float((r * rs).sum())
    g["Rb"] = float((col * col).sum())
    for j in range(0, m, _KID_TILE):
        r, f = rows(y[j : j + _KID_TILE], y, True)
        g["Sy"] += float(r.sum())
        g["Ry"] += float((r * r).sum())
        g["Fy"] += f
        g["Dy"] += float((r * col[j : j + _KID_TILE]).sum())
    value = g["Sx"] / (n * (n - 1)) + g["Sy"] / (m * (m - 1)) - 2.0 * g["Sxy"] / (n * m)  # (DIV.7)
    return value, math.sqrt(max(mmd2_u_variance(n, m, g), 0.0))


def check_kid(n_real: int, n_fake: int, subsets: Any, subset_size: Any, seed: Any = 0) -> None:
    C.positive_int("subsets", subsets)
    C.seed("seed", seed)  # the reference's rule: a reproducible subset draw (no None, no negative seed)
    C.positive_int("subset_size", subset_size, 2, "the unbiased estimator")
    if subset_size > n_real:
        raise ValueError(f"subset_size must be <= the number of real_features ({n_real}), got {subset_size}")
    if subset_size > n_fake:
        raise ValueError(f"subset_size must be <= the number of fake_features ({n_fake}), got {subset_size}")


def kid(real_features, fake_features, subsets=100, subset_size=1000, seed=0) -> tuple[float, float]:
    r"""Kernel Inception Distance: (mean, std with ddof=0) of the unbiased polynomial MMD^2 over subsets.

    ``rng = np.random.default_rng(seed)``; per subset ``idx_r = rng.choice(N_real,
    subset_size, replace=False)`` then ``idx_f = rng.choice(N_fake, subset_size,
    replace=False)``.  (DIV.13)  ``subsets=None``: no subsampling, the full-set MMD^2 and the
    square root of the unbiased estimate of its variance (:func:`kid_full_set`, DIV.16).
    """
    rb, fb = inputs(["real_features", "fake_features"], [real_features, fake_features])
    n_r, d = _points("real_features", rb)
    n_f, d2 = _points("fake_features", fb)
    if d2 != d:
        raise ValueError(
            f"fake_features must have the dimension of real_features (D={d}), got {tuple(fb.shape)}"
        )
    refuse_capture(rb, "kid", "it returns Python floats (each subset's MMD^2 is read back to the host)")
    if subsets is None:  # the full sets and the closed-form standard deviation  (DIV.16)
        return kid_full_set(rb, fb)
    check_kid(n_r, n_f, subsets, subset_size, seed)
    values = []
    for idx_r, idx_f in kid_indices(n_r, n_f, subsets, subset_size, seed):
        if rb.kind == "torch":
            import torch

            r = rb.arr[torch.as_tensor(idx_r, device=rb.arr.device)]
            f = fb.arr[torch.as_tensor(idx_f, device=fb.arr.device)]
        else:
            r, f = rb.arr[idx_r], fb.arr[idx_f]
        v, _ = mmd2(r, f, "polynomial", None, "unbiased", need_grad=False)
        values.append(float(v))
    vals = np.asarray(values, dtype=np.float64)
    return float(vals.mean()), float(vals.std())


def density_ratio_from_logits(logits, *, need_grad=True):
    r"""Elementwise :math:`D/(1-D) = e^{l}` for a classifier's logits, and its gradient
    :math:`e^{l}` (of the sum).  +inf where :math:`e^l` exceeds the dtype (l > 88.7 in
    float32): the ratio itself is out of range there.  (DIV.1)"""

    def compose():
        (b,) = inputs(["logits"], [logits])
        flags = needs(need_grad, 1)
        out = empty(b, b.shape)
        grad = empty(b, b.shape) if flags[0] else None
        map_reduce("Exp", b, params={}, shape2d=(1, b.numel), elems_out=out, grads=[grad])
        return out.arr, grads_out([grad], flags)

    return cached(("density_ratio", need_grad), (logits,), compose)
