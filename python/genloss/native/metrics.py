r"""Evaluation metrics on the native engine: ``prdc`` on the tiled k-nearest-neighbour kernel
(cpp/src/knn_cpu.cpp on CPU, cuda/knn.cu on CUDA) and ``cmmd`` on the tiled MMD^2 kernel.

``prdc(real, fake, k=5)`` returns the reference's dict of Python floats (a metric: no
gradient); ``cmmd(x, y, need_grad=True)`` returns ``(value, grads)`` like every native loss.
Conventions and tie rule: ``genloss.reference.metrics`` and derivations/metrics.md (MET.10-MET.17).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _checks as C
from ..reference import metrics as _ref
from ..reference.metrics import CMMD_SCALE, CMMD_SIGMA, PRDC_NOT_FINITE, check_prdc_k, prdc_from_counts
from ._compose import inputs, needs
from ._engine import (
    _DTYPE_NAMES,
    CPU,
    FLOAT32,
    FLOAT64,
    Buf,
    _p,
    as_input,
    device_empty,
    empty,
    ran,
    refuse_capture,
    run_call,
    skip_checks,
    stream_of,
    to_host,
    workspace,
)
from .divergence import _points, mmd2


def _finite(b: Buf) -> bool:
    if b.kind == "torch":
        import torch

        return bool(torch.isfinite(b.arr.detach()).all())
    return bool(np.isfinite(b.arr).all())


# ---------------------------------------------------------------- (MET.10-MET.13)
def prdc(real: Any, fake: Any, k: int = 5) -> dict[str, float]:
    r"""Precision, recall, density, coverage of ``fake`` (M, D) against ``real`` (N, D), k-NN
    balls with the ``<=`` tie rule; a dict of Python floats.  (MET.10-MET.13)

    One tiled k-NN kernel, two passes (radii, then counts), memory O((N + M) k) beyond the
    inputs (the N x M distance matrix never exists). The bulk of the distances comes from the
    GEMM expansion |x|^2 + |y|^2 - 2 x.y in the inputs' precision (MET.28); every pair whose
    expanded distance lies within its rounding bound (MET.29) of a k-th neighbour or a radius it
    is compared with is recomputed exactly (float64 sums of the differences, in order), so the
    radii and counts equal ``genloss.reference.prdc``'s, not merely close (MET.30, MET.31).
    CUDA arrays (torch, CuPy): cuda/knn.cu computes every pair's exact float64 squared distance
    in the same order, so the radii equal the CPU kernel's bit for bit and the counts exactly;
    radii and counts stay on the device until the one read-back of the four counts.
    """
    rb, fb = inputs(["real", "fake"], [real, fake])
    with C.named_errors("prdc"):
        n, d = _points("real", rb)
        m, d2 = _points("fake", fb)
        if d2 != d:
            raise ValueError(f"fake must have the {d} features of real, got shape {tuple(fb.shape)}")
    if n < 1 or m < 1:
        raise ValueError(f"prdc: {'real' if n < 1 else 'fake'} has no samples")
    if rb.dtype not in (FLOAT32, FLOAT64):  # CUDA float16 / bfloat16 (the CPU refuses them as inputs)
        raise TypeError(
            f"prdc: real has dtype {_DTYPE_NAMES[rb.dtype]}; the k-NN kernel takes float32 or float64 "
            "(genloss.torch.prdc widens float16 and bfloat16 to float32)"
        )
    k = check_prdc_k("prdc", k, n, m)
    refuse_capture(
        rb, "prdc", "it returns Python floats (its finiteness check and counts are read back to the host)"
    )
    for name, b in (("real", rb), ("fake", fb)):
        if not _finite(b):
            raise ValueError(f"prdc: {name} {PRDC_NOT_FINITE}")
    if rb.device == CPU:
        real_r2, fake_r2 = np.empty(n), np.empty(m)
        counts = np.zeros(4, dtype=np.int64)
        ran(run_call(
            kind="knn_prdc", dtype=rb.dtype, real=rb.ptr, fake=fb.ptr, N=n, M=m, D=d, k=k,
            real_r2=real_r2.ctypes.data, fake_r2=fake_r2.ctypes.data, counts=counts.ctypes.data,
        ))  # fmt: skip
        return prdc_from_counts(counts, n, m, k)
    (real_r2, r_ptr), (fake_r2, f_ptr), (counts, c_ptr) = (
        device_empty(rb, (size,), dt) for size, dt in ((n, "float64"), (m, "float64"), (4, "int64"))
    )
    ran(run_call(
        kind="knn_prdc", device=rb.device, device_id=rb.device_id, stream=stream_of(rb), dtype=rb.dtype, real=rb.ptr,
        fake=fb.ptr, N=n, M=m, D=d, k=k, real_r2=r_ptr, fake_r2=f_ptr, counts=c_ptr, **workspace(rb),
    ))  # fmt: skip
    return prdc_from_counts(to_host(counts).tolist(), n, m, k)  # the one read-back


# ---------------------------------------------------------------- (MET.17)
def cmmd(x: Any, y: Any, *, need_grad: Any = True) -> tuple[Any, tuple]:
    r"""CMMD: 1000 x the biased rbf MMD^2 with bandwidth 10, value and d/dx, d/dy from one pass of
    the tiled MMD kernel (``mmd2``; CPU and CUDA).  (MET.17)"""
    with C.named_errors("cmmd"):
        value, grads = mmd2(x, y, "rbf", (CMMD_SIGMA,), "biased", need_grad=need_grad)
    value *= CMMD_SCALE  # in place: a fresh 0-d output of the kernel
    for g in grads:
        if g is not None:
            g *= CMMD_SCALE
    return value, grads


# ---------------------------------------------------------------- sinkhorn_divergence, ot_coupling (MET.20-MET.27)


def _host64(b: Buf) -> np.ndarray:
    """A CPU buffer as a contiguous float64 NumPy array (the OT kernels are float64 only)."""
    a = (
        b.arr.detach().double().numpy() if b.kind == "torch" else np.asarray(b.arr)
    )  # (bfloat16 has no NumPy dtype)
    return np.ascontiguousarray(a, dtype=np.float64)


def _like(b: Buf, a: np.ndarray) -> Any:
    """``a`` in the kind (NumPy or torch) and floating dtype of ``b``'s array."""
    if b.kind == "torch":
        import torch

        return torch.from_numpy(a).to(b.arr.dtype)
    return a.astype(b.arr.dtype, copy=False)


# ---- the same on CUDA (cuda/ot.cu): the data stays on its device, torch or CuPy arrays


def _xp(b: Buf) -> Any:
    """The array module of a CUDA buffer (torch or CuPy): the few array operations below."""
    if b.kind == "torch":
        import torch

        return torch
    if b.kind == "cupy":
        import cupy

        return cupy
    raise TypeError(
        "genloss.native runs optimal transport on CUDA torch tensors or CuPy arrays; pass one of those"
    )


def _dev64(op: str, name: str, b: Buf, dim: int | None = None) -> Buf:
    """A CUDA buffer as a contiguous float64 array on its device (shape checked as _ref._ot_points)."""
    if len(b.shape) != 2 or b.shape[0] < 1 or b.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have shape (n, D) with n, D >= 1, got shape {b.shape}")
    if dim is not None and b.shape[1] != dim:
        raise ValueError(
            f"{op}: {name} must have D={dim} features (those of the first input), got shape {b.shape}"
        )
    xp = _xp(b)
    if b.kind == "torch":
        a = b.arr.detach().to(xp.float64).contiguous()
    else:
        with xp.cuda.Device(b.device_id):
            a = xp.ascontiguousarray(b.arr, dtype=xp.float64)
    return as_input(a, name)


def _dev_bounds(x: Buf, y: Buf) -> tuple[float, bool]:
    """(bbox_diameter(x, y), whether x and y are finite) with one read-back: the bounding box's
    corners (exact min/max, so the diameter has the CPU's bits); NaN or inf in x or y reaches a
    corner (min/max propagate NaN)."""
    xp, d = _xp(x), x.shape[1]
    if x.kind == "torch":
        lo = xp.minimum(x.arr.amin(dim=0), y.arr.amin(dim=0))
        hi = xp.maximum(x.arr.amax(dim=0), y.arr.amax(dim=0))
    else:
        lo = xp.minimum(x.arr.min(axis=0), y.arr.min(axis=0))
        hi = xp.maximum(x.arr.max(axis=0), y.arr.max(axis=0))
    corners = to_host(xp.concatenate((lo, hi)))
    lo_h, hi_h = corners[:d], corners[d:]
    return float(np.sqrt(np.sum((hi_h - lo_h) ** 2))), bool(np.isfinite(corners).all())


def _dev_like(b: Buf, a: Buf) -> Any:
    """The float64 device array ``a`` in the floating dtype of ``b``'s array."""
    return a.arr.to(b.arr.dtype) if b.kind == "torch" else a.arr.astype(b.arr.dtype, copy=False)


def _dev_sinkhorn(x: Buf, y: Buf, eps_list: list[float], **fields: Any) -> None:
    ran(run_call(
        kind="sinkhorn", device=x.device, device_id=x.device_id, stream=stream_of(x), x=x.ptr, y=y.ptr,
        N=x.shape[0], M=y.shape[0], D=x.shape[1], eps=eps_list, **fields, **workspace(x),
    ))  # fmt: skip


def _sinkhorn_cuda(op, xb, yb, eps, p, scaling, tol, max_iter, flags):
    refuse_capture(xb, op, "the iterations stop when the potentials converge (a test read on the host)")
    x64 = _dev64(op, "x", xb)
    y64 = _dev64(op, "y", yb, x64.shape[1])
    value = empty(x64, (), fill=np.nan)
    gx = empty(x64, x64.shape, fill=np.nan) if flags[0] else None
    gy = empty(x64, y64.shape, fill=np.nan) if flags[1] else None
    diameter, finite = _dev_bounds(x64, y64)
    if finite:  # NaN in, NaN out (every entry)
        eps_list = _ref.eps_schedule(diameter, p, eps, scaling)  # (MET.22)
        change = empty(x64, ())
        _dev_sinkhorn(x64, y64, eps_list, p=p, tol=tol, max_iter=max_iter, debias=True, value=value.ptr,
                      grad_x=_p(gx), grad_y=_p(gy), change=change.ptr)  # fmt: skip
        _ref.check_converged(op, float(to_host(change.arr)), tol, max_iter, eps, eps)
    if not any(flags):
        return _dev_like(xb, value), ()
    return _dev_like(xb, value), tuple(None if g is None else _dev_like(xb, g) for g in (gx, gy))


def sinkhorn_divergence(x, y, eps, p=2.0, scaling=0.5, tol=1e-8, max_iter=1000, *, need_grad=True):
    r"""Debiased Sinkhorn divergence and its envelope gradients, ``(value, grads)``, by the native
    log-domain loop in float64 (results in the inputs' dtype), on the CPU (cpp/src/ot_cpu.cpp) or
    on CUDA (cuda/ot.cu: the data stays on the device; the convergence test is read back once
    per round, so a CUDA call refuses graph capture).  (MET.20-MET.24)"""
    op = "sinkhorn_divergence"
    eps, p, scaling, tol, max_iter = _ref.check_sinkhorn_args(op, eps, p, scaling, tol, max_iter)
    xb, yb = inputs(["x", "y"], [x, y])
    flags = needs(need_grad, 2)
    if xb.device != CPU:
        return _sinkhorn_cuda(op, xb, yb, eps, p, scaling, tol, max_iter, flags)
    x64 = _ref._ot_points(op, "x", _host64(xb))
    y64 = _ref._ot_points(op, "y", _host64(yb), x64.shape[1])
    value = np.full((), np.nan)
    gx = np.full(x64.shape, np.nan) if flags[0] else None
    gy = np.full(y64.shape, np.nan) if flags[1] else None
    if np.isfinite(x64).all() and np.isfinite(y64).all():  # NaN in, NaN out (every entry)
        eps_list = _ref.eps_schedule(_ref.bbox_diameter(x64, y64), p, eps, scaling)  # (MET.22)
        change = np.zeros(())
        ran(run_call(
            kind="sinkhorn", x=x64.ctypes.data, y=y64.ctypes.data, N=x64.shape[0], M=y64.shape[0],
            D=x64.shape[1], p=p, eps=eps_list, tol=tol, max_iter=max_iter, debias=True, value=value.ctypes.data,
            grad_x=None if gx is None else gx.ctypes.data, grad_y=None if gy is None else gy.ctypes.data,
            change=change.ctypes.data,
        ))  # fmt: skip
        _ref.check_converged(op, float(change), tol, max_iter, eps, eps)
    if not any(flags):
        return _like(xb, value), ()
    return _like(xb, value), tuple(None if g is None else _like(xb, g) for g in (gx, gy))


def _coupling_cuda(op, ab, bb, e, tol, max_iter):
    a = _dev64(op, "x0", ab)
    b = _dev64(op, "x1", bb, a.shape[1])
    n, d = a.shape
    if b.shape[0] != n:
        raise ValueError(f"{op}: x1 must have as many rows as x0 (B={n}), got shape {b.shape}")
    xp = _xp(a)
    if not skip_checks(a):  # one read-back; none under capture or check_data=False (MET.26)
        ok = to_host(xp.stack((xp.isfinite(a.arr).all(), xp.isfinite(b.arr).all())))
        for name, good in (("x0", ok[0]), ("x1", ok[1])):
            if not good:
                raise ValueError(f"{op}: {name} must be finite (a NaN or inf has no optimal pairing)")
    if e is None:  # no host synchronisation: CUDA-graph capturable
        out, ptr = device_empty(a, (n,), "int64")
        ran(run_call(
            kind="assignment", device=a.device, device_id=a.device_id, stream=stream_of(a), x0=a.ptr, x1=b.ptr,
            B=n, D=d, perm=ptr, **workspace(a),
        ))  # fmt: skip
        return out
    refuse_capture(a, op, "method 'sinkhorn' stops when the potentials converge (a test read on the host)")
    f, g, value = empty(a, (n,)), empty(a, (n,)), empty(a, ())
    diameter, _ = _dev_bounds(a, b)
    change = empty(a, ())
    _dev_sinkhorn(
        a, b, _ref.eps_schedule(diameter, 2.0, 0.5 * e, 0.5, op), p=2.0, tol=tol, max_iter=max_iter, value=value.ptr,
        f=f.ptr, g=g.ptr, change=change.ptr,
    )  # fmt: skip
    _ref.check_converged(op, float(to_host(change.arr)), tol, max_iter, e, 0.5 * e)
    x0, x1 = a.arr, b.arr
    r2 = (x0[:, None, 0] - x1[None, :, 0]) ** 2  # C = r^2 / 2 from the differences, summed over d in order
    for k in range(1, d):
        r2 = r2 + (x0[:, None, k] - x1[None, :, k]) ** 2
    la = -np.log(n)
    return xp.exp(2.0 * la + (f.arr[:, None] + g.arr[None, :] - r2 / 2.0) / (0.5 * e))  # (MET.27)


def ot_coupling(x0, x1, method="exact", eps=0.1, tol=1e-8, max_iter=1000):
    r"""Minibatch OT pairing: the permutation (int64, 'exact', native Hungarian) or the (B, B) entropic
    plan ('sinkhorn', native loop at eps/2 on the cost r^2/2), in the inputs' kind, on their device.
    On CUDA (cuda/ot.cu) 'exact' gives the CPU solver's permutation, bit for bit, with no host
    synchronisation beyond the finiteness check (skipped under CUDA graph capture and with
    ``options(check_data=False)``), so it captures; 'sinkhorn' reads its convergence test back
    once per round and refuses capture.  (MET.25-MET.27)"""
    op = "ot_coupling"
    e = _ref.check_coupling_args(op, method, eps)
    _ref.check_sinkhorn_args(op, 1.0 if e is None else e, 2.0, 0.5, tol, max_iter)
    ab, bb = inputs(["x0", "x1"], [x0, x1])
    if ab.device != CPU:
        return _coupling_cuda(op, ab, bb, e, tol, max_iter)
    a, b = _ref._coupling_points(_host64(ab), _host64(bb))
    n, d = a.shape
    if e is None:
        out = np.empty(n, dtype=np.int64)
        ran(
            run_call(kind="assignment", x0=a.ctypes.data, x1=b.ctypes.data, B=n, D=d, perm=out.ctypes.data)
        )  # (MET.26)
    else:  # C = r^2 = 2 (r^2 / 2): the plan of cost r^2/2 (p = 2) at eps/2  (MET.27)
        f, g, value, change = np.empty(n), np.empty(n), np.empty(()), np.zeros(())
        eps_list = _ref.eps_schedule(_ref.bbox_diameter(a, b), 2.0, 0.5 * e, 0.5, op)
        ran(run_call(
            kind="sinkhorn", x=a.ctypes.data, y=b.ctypes.data, N=n, M=n, D=d, p=2.0, eps=eps_list, tol=tol,
            max_iter=max_iter, value=value.ctypes.data, f=f.ctypes.data, g=g.ctypes.data, change=change.ctypes.data,
        ))  # fmt: skip
        _ref.check_converged(op, float(change), tol, max_iter, e, 0.5 * e)
        la = -np.log(n)
        out = np.exp(2.0 * la + (f[:, None] + g[None, :] - _ref.ot_cost_matrix(a, b, 2.0)) / (0.5 * e))
    if ab.kind == "torch":
        import torch

        return torch.from_numpy(out)
    return out
