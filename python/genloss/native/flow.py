r"""The continuous-time (flow) family on the native engine.

Same conventions as ``genloss.native.gan``: each function returns ``(value, grads)``
with the gradients of ``sum(value)`` w.r.t. the differentiable inputs (``need_grad``
a bool or one bool per differentiable input; ``()`` when none is asked).  Signatures
follow ``genloss.reference.flow``; every float input is differentiable, ``t`` and
``weights`` included.

The per-sample factors (the weighting :math:`\lambda(t_b)` times ``weights``, or the
path's coefficients) are B numbers formed in float64 where the inputs live (NumPy,
torch or CuPy operations on the (B,) vectors, no host round trip of the data) and
handed to the engine as row weights or a per-row table; the math of the per-element
functor is in cpp/include/genloss/ops/flow.h, derived in derivations/flow.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _checks as C
from ..reference import flow as R
from ._compose import loss_scale, needs
from ._engine import FLOAT32, Buf, as_input, empty, float_range, map_reduce
from .diffusion import _batched, _host, _result, _row_vector, _run, _value_out, _xp

FLOW_WEIGHTINGS = R.FLOW_WEIGHTINGS


def _f64(b: Buf) -> Any:
    """The (B,) vector of ``b`` in float64, on its device."""
    return b.arr.double() if b.kind == "torch" else b.arr.astype(_xp(b).float64)


def _like(a: Any, like: Buf, name: str) -> Buf:
    """A float64 (B,) vector in ``like``'s dtype (and place), as an engine input."""
    if like.kind == "torch":
        return as_input(a.to(like.arr.dtype).contiguous(), name)
    with np.errstate(over="ignore"):  # a product beyond the dtype: inf, the true value out of range
        return as_input(_xp(like).ascontiguousarray(a.astype(like.arr.dtype)), name)


def _times(t: Any, like: Buf, like_name: str, weighting: str) -> Buf:
    """t: (B,), the dtype and place of ``like``, in [0, 1]; the weighting's end point refused,
    with the reference's messages (R.check_times on the range)."""
    tb = _row_vector("t", t, like, like_name)  # shape, place, dtype, finite (NaN refused)
    lo, hi = float_range(tb)
    R.check_times(np.array([lo, hi]), weighting)
    return tb


def _table(columns: list, like: Buf) -> Buf:
    """A contiguous float64 (B, k) per-row table from k (B,) float64 vectors on ``like``'s device."""
    if like.kind == "torch":
        import torch

        return as_input(torch.stack(columns, dim=1).contiguous(), "table")
    xp = _xp(like)
    return as_input(xp.ascontiguousarray(xp.stack(columns, axis=1)), "table")


# ============================================================================= the path (FLOW.1)


def flow_interpolant(x0, noise, t, sigma_min=0.0, *, need_grad=True):
    r"""x_t = (1 - (1 - sigma_min) t) x0 + t noise, elementwise.  (FLOW.1)

    Differentiable inputs: x0, noise, t.  One pass (RowAffine with the per-row table
    (1 - c t_b, t_b)); d/dt = sum_i (noise - c x0) per sample takes a second pass over
    x0 and noise, only when asked.
    """
    with R.named_errors("flow_interpolant"):
        c = 1.0 - R.sigma_min_value(sigma_min)
        x, n = _batched(("x0", "noise"), (x0, noise))
        tb = _times(t, x, "x0", "none")
    flags = needs(need_grad, 3)
    t64 = _f64(tb)
    table = _table([1.0 - c * t64, t64], tb)  # (FLOW.1) the coefficients of x0 and noise
    out = empty(x, x.shape)
    grads = [empty(b, b.shape) if f else None for b, f in zip((x, n), flags[:2], strict=True)]
    _run("RowAffine", [x, n], grads, elems_out=out, table=table, stride=2)  # (FLOW.1)
    if not any(flags):
        return out.arr, ()
    grad_t = None
    if flags[2]:  # (FLOW.1) d/dt_b = sum_i (noise - c x0): the same functor with rows (-c, 1)
        vel = _table([t64 * 0.0 - c, t64 * 0.0 + 1.0], tb)
        rows = empty(x, (x.rows,))
        _run("RowAffine", [x, n], [None, None], rows_out=rows, table=vel, stride=2)
        grad_t = rows.arr
    return out.arr, (*(None if g is None else g.arr for g in grads), grad_t)


# ============================================================================= the loss (FLOW.2, FLOW.3)


def flow_matching_loss(
    pred,
    x0,
    noise,
    t,
    weighting="none",
    sigma_min=0.0,
    weights=None,
    reduction="mean",
    *,
    need_grad=True,
):
    r"""Per sample w_b lambda(t_b) mean_i (pred - (noise - (1 - sigma_min) x0))^2.  (FLOW.2, FLOW.3)

    ONE pass (FlowMatchingMSE): reads pred, x0 and noise once and writes the value, the
    gradients w.r.t. pred, x0 and noise that are asked for and, when t or weights need a
    gradient, the unweighted per-sample mean squares m_b (B numbers) that give
    d/dt_b = w_b lambda'(t_b) m_b and d/dw_b = lambda(t_b) m_b.  No x_t or target array.
    Differentiable inputs: pred, x0, noise, t, weights (when given).
    """
    with R.named_errors("flow_matching_loss"):
        C.reduction(reduction)
        weighting = C.choice("weighting", weighting, FLOW_WEIGHTINGS)
        c = 1.0 - R.sigma_min_value(sigma_min)
        p, x, n = _batched(("pred", "x0", "noise"), (pred, x0, noise), reduction)
        tb = _times(t, p, "pred", weighting)
        wb = None if weights is None else _row_vector("weights", weights, p, "pred", nonnegative=True)
        flags = needs(need_grad, 4 if wb is None else 5)
    t64 = _f64(tb)
    if weighting == "none":
        lam = dlam = None
    else:
        lam, dlam = R.weight_and_slope(t64, weighting)  # (FLOW.3) B values in float64
    w64 = None if wb is None else _f64(wb)
    row = lam if w64 is None else (w64 if lam is None else w64 * lam)
    row_w = None
    if row is not None:
        if weighting == "sigma_sqrt":
            with R.named_errors("flow_matching_loss"):
                _finite_weight(lam, p)
        row_w = _like(row, p, "weights")
    out, rows = _value_out(p, reduction)
    grads = [empty(b, b.shape) if f else None for b, f in zip((p, x, n), flags[:3], strict=True)]
    raw = empty(p, (p.rows,)) if any(flags[3:]) else None
    s = loss_scale(reduction, p, per_sample_mean=True)
    _run(
        "FlowMatchingMSE", [p, x, n], grads, params={"x0_coef": c}, value_scale=s, out=out, rows_out=rows,
        grad_scale=s, row_weight=row_w, rows_raw=raw,
    )  # fmt: skip
    value, gs = _result(out, rows, grads, flags)
    if not gs:
        return value, ()
    m = None if raw is None else _f64(raw)  # s * sum_i r^2 (the reduction's weight included)
    grad_t = grad_w = None
    if flags[3] and m is not None:  # m is set when flags[3] (raw is)
        slope = m * 0.0 if dlam is None else dlam * m  # (FLOW.2) d/dt through lambda(t)
        grad_t = _like(slope if w64 is None else w64 * slope, tb, "t").arr
    if wb is not None and flags[4]:
        grad_w = _like(m if lam is None else lam * m, wb, "weights").arr  # (FLOW.2) d/dw
    return value, (*gs[:3], grad_t) if wb is None else (*gs[:3], grad_t, grad_w)


def _finite_weight(lam: Any, like: Buf) -> None:
    """t^-2 beyond the inputs' dtype (t below ~5e-20 in float32): refused, naming t."""
    if float(lam.max()) > float(np.finfo(np.float32 if like.dtype == FLOAT32 else np.float64).max):
        raise ValueError(
            "t is so close to the end point t = 0 that weighting='sigma_sqrt' (t^-2) overflows "
            "the inputs' dtype"
        )


# ============================================================================= pseudo-Huber (FLOW.20, FLOW.24)


def _pseudo_huber(x: Buf, y: Buf, c: float, row_w: Buf | None, reduction: str, flags: tuple, want_raw: bool):
    r"""Per sample w_b (sqrt(||x_b - y_b||^2 + c^2) - c) and its gradients, in three engine passes
    (the pattern of gradient_penalty_from_grads):

    1. ``SquaredDiff`` row sums s_b = ||x_b - y_b||^2 (reads x and y; B numbers out);
    2. ``PseudoHuberOfSqNorm`` on the B values: the value (row weights w_b) and, when asked,
       the per-row coefficient k_b = g_b w_b / (2 sqrt(s_b + c^2)) and the unweighted g_b h_b;
    3. when d/dx or d/dy is asked, ``SquaredDiff`` again with k_b as its row weight: it writes
       k_b 2 (x - y) and its negative in one pass (reads x and y, writes the gradients).

    No (x - y) array is stored.  ``flags``: (d/dx, d/dy); ``want_raw``: also g_b h_b."""
    s = empty(x, (x.rows,))
    _run("SquaredDiff", [x, y], [None, None], rows_out=s)  # (FLOW.20) s_b
    out, rows = _value_out(x, reduction)
    vs = loss_scale(reduction, x)
    want_xy = any(flags)
    coef = empty(s, (s.rows,)) if want_xy else None
    raw = empty(s, (s.rows,)) if want_raw else None
    _run(
        "PseudoHuberOfSqNorm", [s], [coef], params={"c": c}, value_scale=vs, out=out, rows_out=rows,
        grad_scale=vs, row_weight=row_w, rows_raw=raw,
    )  # fmt: skip
    grads = [empty(b, b.shape) if f else None for b, f in zip((x, y), flags, strict=True)]
    if want_xy:  # (FLOW.20) d/dx = k_b 2 (x - y), d/dy = -d/dx
        _run("SquaredDiff", [x, y], grads, row_weight=coef)
    return out, rows, grads, raw


def pseudo_huber_loss(x, y, c=None, weights=None, reduction="mean", *, need_grad=True):
    r"""Per sample w_b (sqrt(||x_b - y_b||^2 + c^2) - c), c = 0.00054 sqrt(n) by default.  (FLOW.20)

    Fused: one read of x and y for the squared norms, one more (reading x and y, writing the
    gradients) only when d/dx or d/dy is asked.  Differentiable inputs: x, y, weights (when given).
    """
    with R.named_errors("pseudo_huber_loss"):
        C.reduction(reduction)
        xb, yb = _batched(("x", "y"), (x, y), reduction)
        c = R.huber_c(c, xb.cols)
        wb = None if weights is None else _row_vector("weights", weights, xb, "x", nonnegative=True)
        flags = needs(need_grad, 2 if wb is None else 3)
    want_w = len(flags) == 3 and flags[2]
    out, rows, grads, raw = _pseudo_huber(xb, yb, c, wb, reduction, flags[:2], want_w)
    return _result(out, rows, [*grads, raw][: len(flags)], flags)


def consistency_training_loss(f_student, f_target, sigma_i, sigma_next, c=None, reduction="mean", *,
                              need_grad=True):  # fmt: skip
    r"""Per sample (sqrt(||f_student - f_target||^2 + c^2) - c) / (sigma_next - sigma_i) (iCT).
    (FLOW.24)

    The pseudo-Huber kernel with iCT's lambda = 1 / (sigma_next - sigma_i) (formed in float64
    from the B noise levels) as its row weight.  Differentiable input: f_student only
    (f_target is a stop-gradient target; the noise levels are points of the discretization).
    """
    with R.named_errors("consistency_training_loss"):
        C.reduction(reduction)
        fs, ft = _batched(("f_student", "f_target"), (f_student, f_target), reduction)
        c = R.huber_c(c, fs.cols)
        lo = _f64(_row_vector("sigma_i", sigma_i, fs, "f_student"))
        hi = _f64(_row_vector("sigma_next", sigma_next, fs, "f_student"))
        R.ct_weight(_host(lo), _host(hi))  # the checks (0 <= sigma_i < sigma_next), with their messages
        (flag,) = needs(need_grad, 1)
    lam = _like(1.0 / (hi - lo), fs, "sigma_next")  # (FLOW.24) on the device
    out, rows, grads, _ = _pseudo_huber(fs, ft, c, lam, reduction, (flag, False), False)
    return _result(out, rows, grads[:1], (flag,))


# ============================================================================= EDM denoiser loss (FLOW.21-FLOW.23)

DENOISER_WEIGHTINGS = R.DENOISER_WEIGHTINGS


def denoiser_loss(
    F, x0, noise, sigma, sigma_data=0.5, weighting="edm", gamma=5.0, logvar=None, reduction="mean", *,
    need_grad=True,
):  # fmt: skip
    r"""Per sample lambda(sigma) mean_i (D - x0)^2 in F-space: W(sigma) mean_i (F - (a x0 + b noise))^2
    (+ EDM2's e^-u ... + u with ``logvar``).  (FLOW.21-FLOW.23)

    ONE pass (``DiffusionMSE`` with the per-row table (a_b, b_b, a'_b, b'_b) and the row weight
    W_b e^{-u_b}, both formed in float64 from the B noise levels): reads F, x0 and noise once
    and writes the value, the gradients w.r.t. F, x0 and noise that are asked and, when sigma or
    logvar needs a gradient, the unweighted per-sample mean squares.  The sigma-gradient also
    needs sum_i r dF_tgt/dsigma = sum_i r (a' x0 + b' noise) per sample: one more pass
    (``DenoiserSigmaDot``), only when asked.  No x_sigma, D or target array.  Differentiable inputs: F, x0, noise, sigma, logvar
    (when given).
    """
    with R.named_errors("denoiser_loss"):
        C.reduction(reduction)
        weighting = C.choice("weighting", weighting, DENOISER_WEIGHTINGS)
        sd = C.positive("sigma_data", sigma_data)
        gamma = C.positive("gamma", gamma)
        f, x, n = _batched(("F", "x0", "noise"), (F, x0, noise), reduction)
        sb = _row_vector("sigma", sigma, f, "F")
        R.check_sigmas(np.array(float_range(sb)))  # sigma = 0 and sigma -> inf refused, named
        ub = None if logvar is None else _row_vector("logvar", logvar, f, "F")
        flags = needs(need_grad, 4 if ub is None else 5)
    s64 = _f64(sb)
    a, b, w, dw, k = R.denoiser_rows(s64, sd, weighting, gamma)  # (FLOW.21, FLOW.22) B values, float64
    eu = None if ub is None else _xp(f).exp(-_f64(ub))  # EDM2: e^{-u}
    row = w if eu is None else w * eu
    row_w = None if weighting in ("edm", "karras") and eu is None else _like(row, f, "sigma")
    tab = _table([a, b, k, k * s64], f)  # F_tgt = a x0 + b noise; dF_tgt/dsigma = k x0 + k sigma noise
    out, rows = _value_out(f, reduction)
    grads = [empty(q, q.shape) if on else None for q, on in zip((f, x, n), flags[:3], strict=True)]
    want_rows = any(flags[3:])
    raw = empty(f, (f.rows,)) if want_rows else None
    vs = loss_scale(reduction, f, per_sample_mean=True)
    # (FLOW.21, FLOW.23) r = F - (a x0 + b noise) in registers: the value and 2 r, -2 a r, -2 b r
    _run(
        "DiffusionMSE", [f, x, n], grads, value_scale=vs, out=out, rows_out=rows, grad_scale=vs, table=tab,
        stride=4, row_weight=row_w, rows_raw=raw,
    )  # fmt: skip
    if ub is not None:  # (FLOW.23) + u_b per sample, accumulated in the engine's fixed order
        map_reduce("Linear", ub, value_scale=f.cols * vs, out=out, rows_out=rows, accumulate=True)
    value, _ = _result(out, rows, [], ())
    if not any(flags):
        return value, ()
    gs = [None if g is None else g.arr for g in grads]
    m = None if raw is None else _f64(raw)  # g_b m_b (the reduction's weight included)
    grad_s = grad_u = None
    if flags[3]:  # (FLOW.23) g e^{-u} (W' m - 2 W sum_i r dF_tgt/dsigma / n)
        dot = empty(f, (f.rows,))
        nothing = [None, None, None]  # a value only: g sum_i r (k x0 + k sigma noise) / n per sample
        _run("DenoiserSigmaDot", [f, x, n], nothing, value_scale=vs, rows_out=dot, table=tab, stride=4)
        slope = dw * m - 2.0 * w * _f64(dot)
        grad_s = _like(slope if eu is None else eu * slope, sb, "sigma").arr
    if ub is not None and flags[4]:  # (FLOW.23) g (1 - e^{-u} W m)
        grad_u = _like(f.cols * vs - eu * w * m, ub, "logvar").arr
    return value, (*gs[:3], grad_s) if ub is None else (*gs[:3], grad_s, grad_u)
