r"""The continuous-time (flow) family on the native engine.

Same conventions as ``genloss.native.gan``: each function returns ``(value, grads)``
with the gradients of ``sum(value)`` w.r.t. the differentiable inputs (``need_grad``
a bool or one bool per differentiable input; ``()`` when none is asked).  Signatures
follow ``genloss.reference.flow``; every float input is differentiable, ``t`` and
``weights`` included, except in ``consistency_training_loss`` (``f_student`` only) and the
distillation losses (``scm_loss``, ``meanflow_loss``, ``vsd_loss``: the student's output
only, and sCM's ``logvar``; FLOW.30).

The per-sample factors (the weighting :math:`\lambda(t_b)` times ``weights``, or the
path's coefficients) are B numbers formed in float64 where the inputs live (NumPy,
torch or CuPy operations on the (B,) vectors, no host round trip of the data) and
handed to the engine as row weights or a per-row table; the math of the per-element
functor is in cpp/include/genloss/ops/flow.h, derived in derivations/flow.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _checks as C
from ..reference import flow as _R
from ._compose import cached, computed_in_float32, loss_scale, low_storage, needs
from ._engine import (
    FLOAT32,
    Buf,
    as_input,
    checked_values,
    empty,
    float_range,
    guard,
    map_reduce,
    row_map,
    skip_checks,
)
from .diffusion import _batched, _result, _row_vector, _run, _value_out, _xp

FLOW_WEIGHTINGS = _R.FLOW_WEIGHTINGS


def _f64(b: Buf) -> Any:
    """The (B,) vector of ``b`` in float64, on its device."""
    return b.arr.double() if b.kind == "torch" else b.arr.astype(_xp(b).float64)


# The row functors' modes (ops/flow.h: flow_weight, DenoiserWeighting).
_FLOW_MODE = {"none": 0, "sigma_sqrt": 1, "cosmap": 2}
_DENOISER_MODE = {"edm": 0, "karras": 0, "snr": 1, "soft_min_snr": 2, "min_snr": 3}


def _dtype_max(like: Buf) -> float:
    """The largest finite value of ``like``'s dtype (float32 or float64)."""
    return float(np.finfo(np.float32 if like.dtype == FLOAT32 else np.float64).max)


def _times(t: Any, like: Buf, like_name: str, weighting: str) -> Buf:
    """t: (B,), the dtype and place of ``like``, in [0, 1]; the weighting's end point refused,
    with the reference's messages (_R.check_times on the range), and for 'sigma_sqrt' a t so
    close to 0 that t^-2 overflows the inputs' dtype."""
    tb = _row_vector("t", t, like, like_name)  # shape, place, dtype, finite (NaN refused)
    # a plan's guard for 'sigma_sqrt': t at least a floor where t^-2 stays below the dtype's
    # largest value with a margin (the Python path decides the few t just below it)
    floor = (1.0 + 2.0**-20) / math.sqrt(_dtype_max(like)) if weighting == "sigma_sqrt" else 0.0
    r = float_range(tb, ("unit_interval", (tb,), floor))
    if r is not None:
        _R.check_times(np.array(r), weighting)
        if weighting == "sigma_sqrt" and 1.0 / (r[0] * r[0]) > _dtype_max(like):
            raise ValueError(
                "t is so close to the end point t = 0 that weighting='sigma_sqrt' (t^-2) overflows "
                "the inputs' dtype"
            )
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
    (1 - c t_b, t_b), the row functor ``InterpolantRows``); d/dt = sum_i (noise - c x0) per
    sample takes a second pass over x0 and noise, only when asked. float16/bfloat16 inputs are
    computed on float32 copies (the 16-bit kernel would compute the same float32 numbers; the
    row coefficients are formed from float32/float64 t), each result rounded once.
    """
    if low_storage((x0, noise, t)):
        return computed_in_float32(
            lambda x_, n_, t_: flow_interpolant(x_, n_, t_, sigma_min, need_grad=need_grad), (x0, noise, t)
        )

    def compose():
        with _R.named_errors("flow_interpolant"):
            c = 1.0 - _R.sigma_min_value(sigma_min)
            x, n = _batched(("x0", "noise"), (x0, noise))
            tb = _times(t, x, "x0", "none")
        flags = needs(need_grad, 3)
        table = empty(tb, (tb.rows, 2), f64=True)  # (FLOW.1) the coefficients of x0 and noise
        row_map("InterpolantRows", [tb], table=table, params={"x0_coef": c, "velocity": 0})
        out = empty(x, x.shape)
        grads = [empty(b, b.shape) if f else None for b, f in zip((x, n), flags[:2], strict=True)]
        _run("RowAffine", [x, n], grads, elems_out=out, table=table, stride=2)  # (FLOW.1)
        if not any(flags):
            return out.arr, ()
        grad_t = None
        if flags[2]:  # (FLOW.1) d/dt_b = sum_i (noise - c x0): the same functor with rows (-c, 1)
            vel = empty(tb, (tb.rows, 2), f64=True)
            row_map("InterpolantRows", [tb], table=vel, params={"x0_coef": c, "velocity": 1})
            rows = empty(x, (x.rows,))
            _run("RowAffine", [x, n], [None, None], rows_out=rows, table=vel, stride=2)
            grad_t = rows.arr
        return out.arr, (*(None if g is None else g.arr for g in grads), grad_t)

    return cached(("flow_interpolant", sigma_min, need_grad), (x0, noise, t), compose)


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
    Differentiable inputs: pred, x0, noise, t, weights (when given). float16/bfloat16 inputs with a
    per-sample weight (``weighting`` or ``weights``) are computed in float32 (the weight, formed in
    float64, would be rounded to the storage dtype); without one, in their dtype.
    """
    weighted = weighting != "none" or weights is not None  # per-sample weights formed in float64
    if weighted and low_storage((pred, x0, noise, t, weights)):
        return computed_in_float32(
            lambda p_, x_, n_, t_, w_: flow_matching_loss(
                p_, x_, n_, t_, weighting, sigma_min, w_, reduction, need_grad=need_grad
            ),
            (pred, x0, noise, t, weights),
        )

    def compose():
        with _R.named_errors("flow_matching_loss"):
            C.reduction(reduction)
            wt = C.choice("weighting", weighting, FLOW_WEIGHTINGS)
            c = 1.0 - _R.sigma_min_value(sigma_min)
            p, x, n = _batched(("pred", "x0", "noise"), (pred, x0, noise), reduction)
            tb = _times(t, p, "pred", wt)
            wb = None if weights is None else _row_vector("weights", weights, p, "pred", nonnegative=True)
            flags = needs(need_grad, 4 if wb is None else 5)
        mode = {"weighting": _FLOW_MODE[wt]}
        row_w = wb  # user weights alone: as given (the dtype of pred)
        if wt != "none":  # (FLOW.3) w_b lambda(t_b), formed in float64
            row_w = empty(p, (p.rows,))
            row_map("FlowWeightRows", [tb, wb], outs=[row_w], params=mode)
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
        # (FLOW.2) d/dt = w lambda'(t) m, d/dw = lambda(t) m; m = raw = s sum_i r^2 (the
        # reduction's weight included), set when either is asked
        grad_t = grad_w = None
        if raw is not None:
            grad_t = empty(tb, (tb.rows,)) if flags[3] else None
            if wt == "none":  # lambda = 1: d/dt = 0 m (a NaN kept; any dtype), d/dw = m itself
                if grad_t is not None:
                    map_reduce("Linear", raw, value_scale=0.0, elems_out=grad_t)
                grad_w = raw if wb is not None and flags[4] else None
            else:
                grad_w = empty(wb, (wb.rows,)) if wb is not None and flags[4] else None
                row_map("FlowWeightGrads", [tb, wb, raw], outs=[grad_t, grad_w], params=mode)
        gt = None if grad_t is None else grad_t.arr
        return value, (*gs[:3], gt) if wb is None else (*gs[:3], gt, None if grad_w is None else grad_w.arr)

    # A cached plan (plain CPU tensors) re-checks t (finite, in [0, 1], and above the end point
    # of 'sigma_sqrt') and the weights (finite, >= 0) and runs the Calls; else this Python path.
    arrays = (pred, x0, noise, t) if weights is None else (pred, x0, noise, t, weights)
    key = ("flow_matching", weighting, sigma_min, reduction, need_grad, weights is None)
    return cached(key, arrays, compose)


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


def _logvar_rows(logvar: Any, f: Buf) -> Buf:
    """EDM2's per-sample log-variance u, within +-log(max) of the data's dtype: the row weight
    e^-u is formed in that dtype, and an e^-u that overflows times a zero mean square would be
    a NaN where the value e^-u m + u is finite (float32: |u| <= 88.7). Checked by the plan too."""
    return _row_vector("logvar", logvar, f, "F", within=math.log(_dtype_max(f)))


def _huber_c(c: Any, n: int, like: Buf) -> float:
    """The pseudo-Huber constant (reference.huber_c) within what the kernel's dtype represents:
    PseudoHuberOfSqNorm forms c^2 in it, and a c^2 that underflows makes q = 0 at x = y (a NaN
    gradient) or one that overflows makes the value 0. The reference (float64, hypot) takes any c."""
    hc = _R.huber_c(c, n)
    info = np.finfo(np.float32 if like.dtype == FLOAT32 else np.float64)
    lo, hi = math.sqrt(float(info.tiny)), math.sqrt(float(info.max))
    if not lo <= hc <= hi:
        raise ValueError(
            f"c must lie in [{lo:.3g}, {hi:.3g}] for {info.dtype} data (c^2 must be a normal {info.dtype}), got {hc:g}"
        )
    return hc


def pseudo_huber_loss(x, y, c=None, weights=None, reduction="mean", *, need_grad=True):
    r"""Per sample w_b (sqrt(||x_b - y_b||^2 + c^2) - c), c = 0.00054 sqrt(n) by default.  (FLOW.20)

    Fused: one read of x and y for the squared norms, one more (reading x and y, writing the
    gradients) only when d/dx or d/dy is asked.  Differentiable inputs: x, y, weights (when given).
    float16/bfloat16 inputs are computed in float32 (the squared norms pass between two calls).
    """
    if low_storage((x, y, weights)):
        return computed_in_float32(
            lambda x_, y_, w_: pseudo_huber_loss(x_, y_, c, w_, reduction, need_grad=need_grad),
            (x, y, weights),
        )

    def compose():
        with _R.named_errors("pseudo_huber_loss"):
            C.reduction(reduction)
            xb, yb = _batched(("x", "y"), (x, y), reduction)
            hc = _huber_c(c, xb.cols, xb)
            wb = None if weights is None else _row_vector("weights", weights, xb, "x", nonnegative=True)
            flags = needs(need_grad, 2 if wb is None else 3)
        want_w = len(flags) == 3 and flags[2]
        out, rows, grads, raw = _pseudo_huber(xb, yb, hc, wb, reduction, flags[:2], want_w)
        return _result(out, rows, [*grads, raw][: len(flags)], flags)

    arrays = (x, y) if weights is None else (x, y, weights)
    return cached(("pseudo_huber", c, reduction, need_grad, weights is None), arrays, compose)


def consistency_training_loss(f_student, f_target, sigma_i, sigma_next, c=None, reduction="mean", *,
                              need_grad=True):  # fmt: skip
    r"""Per sample (sqrt(||f_student - f_target||^2 + c^2) - c) / (sigma_next - sigma_i) (iCT).
    (FLOW.24)

    The pseudo-Huber kernel with iCT's lambda = 1 / (sigma_next - sigma_i) (formed in float64
    from the B noise levels by the row functor ``CtWeight``) as its row weight.  Differentiable
    input: f_student only (f_target is a stop-gradient target; the noise levels are points of
    the discretization). float16/bfloat16 inputs are computed in float32 (as pseudo_huber_loss).
    """
    if low_storage((f_student, f_target, sigma_i, sigma_next)):
        return computed_in_float32(
            lambda a, b, lo, hi: consistency_training_loss(a, b, lo, hi, c, reduction, need_grad=need_grad),
            (f_student, f_target, sigma_i, sigma_next),
        )

    def compose():
        with _R.named_errors("consistency_training_loss"):
            C.reduction(reduction)
            fs, ft = _batched(("f_student", "f_target"), (f_student, f_target), reduction)
            hc = _huber_c(c, fs.cols, fs)
            lo = _row_vector("sigma_i", sigma_i, fs, "f_student")
            hi = _row_vector("sigma_next", sigma_next, fs, "f_student")
            values = checked_values((lo, hi), ("ordered", (lo, hi)))
            if values is not None:  # the checks (0 <= sigma_i < sigma_next), with their messages
                _R.ct_weight(values[0].astype(np.float64), values[1].astype(np.float64))
            (flag,) = needs(need_grad, 1)
        lam = empty(fs, (fs.rows,))
        row_map("CtWeight", [lo, hi], outs=[lam])  # (FLOW.24) 1 / (sigma_next - sigma_i) in float64
        out, rows, grads, _ = _pseudo_huber(fs, ft, hc, lam, reduction, (flag, False), False)
        return _result(out, rows, grads[:1], (flag,))

    key = ("consistency_training", c, reduction, need_grad)
    return cached(key, (f_student, f_target, sigma_i, sigma_next), compose)


# ============================================================================= EDM denoiser loss (FLOW.21-FLOW.23)

DENOISER_WEIGHTINGS = _R.DENOISER_WEIGHTINGS


def denoiser_loss(
    F, x0, noise, sigma, sigma_data=0.5, weighting="edm", gamma=5.0, logvar=None, reduction="mean", *,
    need_grad=True,
):  # fmt: skip
    r"""Per sample lambda(sigma) mean_i (D - x0)^2 in F-space: W(sigma) mean_i (F - (a x0 + b noise))^2
    (+ EDM2's e^-u ... + u with ``logvar``).  (FLOW.21-FLOW.23)

    ONE pass over the data (``DiffusionMSE`` with the per-row table (a_b, b_b, a'_b, b'_b) and the
    row weight W_b e^{-u_b}, both formed in float64 from the B noise levels by the row functor
    ``DenoiserRows``): reads F, x0 and noise once and writes the value, the gradients w.r.t. F,
    x0 and noise that are asked and, when sigma or logvar needs a gradient, the unweighted
    per-sample mean squares.  The sigma-gradient also needs sum_i r dF_tgt/dsigma = sum_i r (a' x0
    + b' noise) per sample: one more pass (``DenoiserSigmaDot``), only when asked; ``DenoiserGrads``
    forms the B gradients.  No x_sigma, D or target array; engine calls only, so a cached plan
    serves plain CPU tensors.  Differentiable inputs: F, x0, noise, sigma, logvar (when given).
    float16/bfloat16 CUDA inputs are computed in float32 (the per-sample means and the sigma
    dot products pass between engine calls); value and gradients in their dtype.
    """
    if low_storage((F, x0, noise, sigma, logvar)):
        return computed_in_float32(
            lambda f, x, n, s, u: denoiser_loss(
                f, x, n, s, sigma_data, weighting, gamma, u, reduction, need_grad=need_grad
            ),
            (F, x0, noise, sigma, logvar),
        )

    def compose():
        with _R.named_errors("denoiser_loss"):
            C.reduction(reduction)
            wt = C.choice("weighting", weighting, DENOISER_WEIGHTINGS)
            sd = C.positive("sigma_data", sigma_data)
            g = C.positive("gamma", gamma)
            f, x, n = _batched(("F", "x0", "noise"), (F, x0, noise), reduction)
            sb = _row_vector("sigma", sigma, f, "F")
            r = float_range(sb, ("positive", (sb,), _R.SIGMA_MAX))
            if r is not None:
                _R.check_sigmas(np.array(r))  # sigma = 0 and sigma -> inf refused, named
            ub = None if logvar is None else _logvar_rows(logvar, f)
            flags = needs(need_grad, 4 if ub is None else 5)
        vs = loss_scale(reduction, f, per_sample_mean=True)
        params = {"sigma_data": sd, "gamma": g, "weighting": _DENOISER_MODE[wt]}
        # (FLOW.21, FLOW.22) F_tgt = a x0 + b noise, dF_tgt/dsigma = k x0 + k sigma noise, W e^{-u}
        tab = empty(f, (f.rows, 4), f64=True)
        row_w = None if params["weighting"] == 0 and ub is None else empty(f, (f.rows,))  # W = 1: none
        row_map("DenoiserRows", [sb, ub], table=tab, outs=[row_w], params=params)
        out, rows = _value_out(f, reduction)
        grads = [empty(q, q.shape) if on else None for q, on in zip((f, x, n), flags[:3], strict=True)]
        raw = empty(f, (f.rows,)) if any(flags[3:]) else None
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
        gs = [None if q is None else q.arr for q in grads]
        grad_s = empty(sb, (sb.rows,)) if flags[3] else None
        grad_u = empty(ub, (ub.rows,)) if ub is not None and flags[4] else None
        dot = None
        if flags[3]:  # g sum_i r (k x0 + k sigma noise) / n per sample: a value only
            dot = empty(f, (f.rows,))
            _run(
                "DenoiserSigmaDot",
                [f, x, n],
                [None, None, None],
                value_scale=vs,
                rows_out=dot,
                table=tab,
                stride=4,
            )
        if raw is not None:  # (FLOW.23) g e^{-u} (W' m - 2 W dot) and g (1 - e^{-u} W m), raw = g m
            row_map(
                "DenoiserGrads",
                [sb, ub, raw, dot],
                outs=[grad_s, grad_u],
                params={**params, "value_weight": f.cols * vs},
            )
        grad_s_arr = None if grad_s is None else grad_s.arr
        if ub is None:
            return value, (*gs[:3], grad_s_arr)
        return value, (*gs[:3], grad_s_arr, None if grad_u is None else grad_u.arr)

    arrays = (F, x0, noise, sigma) if logvar is None else (F, x0, noise, sigma, logvar)
    key = ("denoiser", sigma_data, weighting, gamma, reduction, need_grad, logvar is None)
    return cached(key, arrays, compose)


# ============================================================================= distillation (FLOW.30-FLOW.34)
# Composed from the shared functors (RowAffine, SquaredDiff, DiffusionMSE, AbsDiff) with per-row
# coefficients formed in float64 on the inputs' device.  sds_loss has no native form (SPEC): its
# torch op is a torch kernel (genloss/torch/flow.py).

# Rows whose float sum of squares left the normal range are redone on a copy scaled by an exact
# power of two.  Bits of the dtype -> (scale of an overflowed row, scale of a tiny row, the "tiny"
# threshold of the sum): after scaling no element square overflows (float32: 2^128 2^-96 = 2^32).
_RESCALE = {32: (2.0**-96, 2.0**64, 2.0**-64), 64: (2.0**-768, 2.0**512, 2.0**-512)}


def _norm_rows(a: Buf, b: Buf) -> Buf:
    r"""||a_b - b_b|| per sample, a float64 (B, 1) or (B,) array on the device, accurate to the
    dtype's rounding for any magnitude (FLOW.31).  One SquaredDiff pass (per-lane sums in the
    dtype, chunks combined pairwise in float64) and the row functor ``SqrtRows``; a row whose sum
    overflowed (inf) or fell below 2^-64 (float32) is summed again (``Square``) on the difference
    scaled by an exact power of two (2^-96 / 2^64), so no square overflows and none that matters
    underflows.  That extra pass runs only when such a row exists (a plan re-checks the sums
    after its calls and declines then: the guard 'rows_normal')."""
    s = empty(a, (a.rows,))
    _run("SquaredDiff", [a, b], [None, None], rows_out=s)
    down, up, tiny = _RESCALE[32 if a.dtype == FLOAT32 else 64]
    # Without read-backs (CUDA graph capture, check_data=False) the test is not read: always
    # take the rescaled pass (k = 1 on ordinary rows, so the same values).
    s64 = _f64(s)
    over, under = s64 == float("inf"), s64 < tiny
    if not skip_checks(a):
        guard("rows_normal", (s,), tiny)
        if not bool((over | under).any()):
            norm = empty(a, (a.rows, 1), f64=True)
            row_map("SqrtRows", [s], table=norm)
            return norm
    k = _xp(a).ones_like(s64)  # float64 (a bool-times-float product would be float32 in torch)
    k[over] = down
    k[under] = up
    scaled = empty(a, a.shape)
    _run("RowAffine", [a, b], [None, None], elems_out=scaled, table=_table([k, -k], a), stride=2)
    s2 = empty(a, (a.rows,))
    _run("Square", [scaled], [None], rows_out=s2)
    return as_input(_f64(s2) ** 0.5 / k, "norm")


def scm_loss(F, F_minus, dF_dt, x_t, dxt_dt, t, sigma_data=0.5, r=1.0, c=0.1, logvar=None, reduction="mean", *,
             need_grad=True):  # fmt: skip
    r"""sCM: per sample mean_i (F - F^- - g / (||g|| + c))^2 (x e^{-u} + u with ``logvar``).  (FLOW.31, FLOW.32)

    With the B coefficients alpha = -cos^2 t, beta = -r cos t sin t (float64), g = G - H where
    G = alpha sigma_d F^- - alpha dx_t/dt and H = -beta x_t - beta sigma_d dF^-/dt.  Five passes,
    two scratch arrays, no float64 copy of the data:

    1. ``RowAffine`` (F^-, dx_t/dt) -> G;  2. ``RowAffine`` (x_t, dF^-/dt) -> H;
    3. ``SquaredDiff`` (G, H) row sums: ||g|| (rescaled rows, ``_norm_rows``), k_b = 1/(||g|| + c);
    4. ``RowAffine`` (F^-, dx_t/dt) -> G := F^- + k G = (1 + k alpha sigma_d) F^- - k alpha dx_t/dt;
    5. ``DiffusionMSE`` (F, G, H) with the per-row table (1, -k): r = F - F^- - k (G - H), the
       value (row weight e^{-u}), d/dF and the raw per-sample means for d/dlogvar.

    Differentiable inputs: F, logvar (when given). float16/bfloat16 CUDA inputs are computed in
    float32 (G and H are full-size intermediates); value and gradients in their dtype.
    """
    if low_storage((F, F_minus, dF_dt, x_t, dxt_dt, t, logvar)):
        return computed_in_float32(
            lambda f, fm, dfm, xt, dxt, tt, u: scm_loss(
                f, fm, dfm, xt, dxt, tt, sigma_data, r, c, u, reduction, need_grad=need_grad
            ),
            (F, F_minus, dF_dt, x_t, dxt_dt, t, logvar),
        )
    names = ("F", "F_minus", "dF_dt", "x_t", "dxt_dt")

    def compose():
        with _R.named_errors("scm_loss"):
            C.reduction(reduction)
            sd, rr, cc = _R.scm_params(sigma_data, r, c)
            f, fm, dfm, xt, dxt = _batched(names, (F, F_minus, dF_dt, x_t, dxt_dt), reduction)
            tb = _row_vector("t", t, f, "F")
            span = float_range(tb, ("bounded", (tb,), _R._T_MAX_ROUNDED))
            if span is not None:
                _R.check_angles(np.array(span))
            ub = None if logvar is None else _logvar_rows(logvar, f)
            flags = needs(need_grad, 1 if ub is None else 2)
        p = {"sigma_data": sd, "r": rr, "c": cc}

        def table(mode: int, norm: Buf | None = None) -> Buf:  # (FLOW.31) ScmRows' two columns
            tab = empty(tb, (tb.rows, 2), f64=True)
            row_map("ScmRows", [tb, norm], table=tab, params={**p, "mode": mode})
            return tab

        G, H = empty(f, f.shape), empty(f, f.shape)
        _run("RowAffine", [fm, dxt], [None, None], elems_out=G, table=table(0), stride=2)
        _run("RowAffine", [xt, dfm], [None, None], elems_out=H, table=table(1), stride=2)
        norm = _norm_rows(G, H)  # (FLOW.31) ||g||, then k = 1 / (||g|| + c) in ScmRows
        _run("RowAffine", [fm, dxt], [None, None], elems_out=G, table=table(2, norm), stride=2)
        ew = None
        if ub is not None:  # EDM2's e^{-u} as the row weight
            ew = empty(f, (f.rows,))
            row_map("UncertaintyRows", [ub], outs=[ew], params={"value_weight": 0.0})
        out, rows = _value_out(f, reduction)
        grads = [empty(f, f.shape) if flags[0] else None, None, None]
        raw = empty(f, (f.rows,)) if ub is not None and flags[1] else None
        vs = loss_scale(reduction, f, per_sample_mean=True)
        # (FLOW.32) r = F - F^- - k (G - H) in registers: the value, d/dF = 2 e^{-u} r / n, the raw means
        _run(
            "DiffusionMSE", [f, G, H], grads, value_scale=vs, out=out, rows_out=rows, grad_scale=vs,
            table=table(3, norm), stride=2, row_weight=ew, rows_raw=raw,
        )  # fmt: skip
        if ub is not None:  # (FLOW.32) + u_b per sample, as denoiser_loss
            map_reduce("Linear", ub, value_scale=f.cols * vs, out=out, rows_out=rows, accumulate=True)
        value, _ = _result(out, rows, [], ())
        if not any(flags):
            return value, ()
        grad_F = None if grads[0] is None else grads[0].arr
        if ub is None:
            return value, (grad_F,)
        grad_u = None
        if raw is not None:  # (FLOW.32) g (1 - e^{-u} m), raw = g m (set when flags[1])
            gu = empty(ub, (ub.rows,))
            row_map("UncertaintyRows", [ub, raw], outs=[None, gu], params={"value_weight": f.cols * vs})
            grad_u = gu.arr
        return value, (grad_F, grad_u)

    arrays = (
        (F, F_minus, dF_dt, x_t, dxt_dt, t) if logvar is None else (F, F_minus, dF_dt, x_t, dxt_dt, t, logvar)
    )
    return cached(("scm", sigma_data, r, c, logvar is None, reduction, need_grad), arrays, compose)


def _unit_rows(name: str, value: Any, like: Buf) -> Buf:
    """A (B,) vector of times in [0, 1] in ``like``'s place and dtype (NaN refused, named)."""
    b = _row_vector(name, value, like, "u")
    r = float_range(b, ("unit_interval", (b,), 0.0))
    if r is not None and (r[0] < 0.0 or r[1] > 1.0):
        raise ValueError(
            f"{name} must lie in [0, 1] (t = 0 data, t = 1 noise), got {r[0] if r[0] < 0.0 else r[1]}"
        )
    return b


def meanflow_loss(u, v, du_dt, t, r, p=1.0, eps=1e-3, reduction="mean", *, need_grad=True):
    r"""MeanFlow: per sample sg(w) ||u - u_tgt||^2, u_tgt = v - (t - r) du_dt, w = (sg(delta) + eps)^-p.
    (FLOW.33)

    Two ``DiffusionMSE`` passes over (u, v, du_dt) with the per-row table (1, r - t) (the row
    functor ``MeanflowRows``; the target built in registers; at r = t du_dt is not read): the row
    sums delta_b, then w_b = (delta_b + eps)^-p in float64 (``MeanflowWeight``) as the row weight
    of the value and of d/du = 2 w (u - u_tgt).  No target array.  Differentiable input: u (the surrogate's gradient, w frozen). float16/bfloat16 inputs
    are computed in float32 (delta passes between the two calls, w is a per-sample weight).
    """
    if low_storage((u, v, du_dt, t, r)):
        return computed_in_float32(
            lambda u_, v_, d_, t_, r_: meanflow_loss(
                u_, v_, d_, t_, r_, p, eps, reduction, need_grad=need_grad
            ),
            (u, v, du_dt, t, r),
        )

    def compose():
        with _R.named_errors("meanflow_loss"):
            C.reduction(reduction)
            pw, e = _R.meanflow_params(p, eps)
            ub, vb, db = _batched(("u", "v", "du_dt"), (u, v, du_dt), reduction)
            tb, rb = _unit_rows("t", t, ub), _unit_rows("r", r, ub)
            (flag,) = needs(need_grad, 1)
        tab = empty(ub, (ub.rows, 2), f64=True)
        row_map("MeanflowRows", [tb, rb], table=tab)  # (1, r - t), r - t in float64 (0 exactly at r = t)
        delta = empty(ub, (ub.rows,))
        _run("DiffusionMSE", [ub, vb, db], [None, None, None], rows_out=delta, table=tab, stride=2)
        w = empty(ub, (ub.rows,))
        row_map("MeanflowWeight", [delta], outs=[w], params={"p": pw, "eps": e})  # (FLOW.33) no gradient
        out, rows = _value_out(ub, reduction)
        grads = [empty(ub, ub.shape) if flag else None, None, None]
        s = loss_scale(reduction, ub)
        _run("DiffusionMSE", [ub, vb, db], grads, value_scale=s, out=out, rows_out=rows, grad_scale=s, table=tab,
             stride=2, row_weight=w)  # fmt: skip
        return _result(out, rows, grads[:1], (flag,))

    return cached(("meanflow", p, eps, reduction, need_grad), (u, v, du_dt, t, r), compose)


def vsd_loss(x, x0_fake, x0_real, reduction="mean", *, need_grad=True):
    r"""DMD2: per sample 1/2 mean_i (w (x0_fake - x0_real))^2, w = 1/(mean|x - x0_real| + 1e-6).  (FLOW.34)

    ``AbsDiff`` (x, x0_real) row means give w (float64, no gradient: the row functor ``VsdRows``,
    which also writes the row weight and the gradient's table); ``SquaredDiff`` (x0_fake,
    x0_real) with the row weight w^2/2 gives the value; when asked, ``RowAffine`` (x0_fake,
    x0_real) with the per-row table (s w/n, -s w/n) writes d/dx = w (x0_fake - x0_real)/n.
    Differentiable input: x (the surrogate's gradient: x enters the value only through the frozen w).
    float16/bfloat16 inputs are computed in float32 (the row means pass between calls).
    """
    if low_storage((x, x0_fake, x0_real)):
        return computed_in_float32(
            lambda a, b, c_: vsd_loss(a, b, c_, reduction, need_grad=need_grad), (x, x0_fake, x0_real)
        )

    def compose():
        with _R.named_errors("vsd_loss"):
            C.reduction(reduction)
            xb, fb, rb = _batched(("x", "x0_fake", "x0_real"), (x, x0_fake, x0_real), reduction)
            (flag,) = needs(need_grad, 1)
        a = empty(xb, (xb.rows,))
        _run("AbsDiff", [xb, rb], [None, None], value_scale=1.0 / xb.cols, rows_out=a)
        s = loss_scale(reduction, xb, per_sample_mean=True)
        # (FLOW.34) w = 1 / (a + eps): the row weight w^2 / 2 and the gradient's table (s w, -s w)
        tab = empty(xb, (xb.rows, 2), f64=True)
        half_w2 = empty(xb, (xb.rows,))
        row_map("VsdRows", [a], table=tab, outs=[half_w2], params={"scale": s, "eps": _R.VSD_EPS})
        out, rows = _value_out(xb, reduction)
        _run("SquaredDiff", [fb, rb], [None, None], value_scale=s, out=out, rows_out=rows, row_weight=half_w2)
        if not flag:
            return _result(out, rows, [], ())
        grad = empty(xb, xb.shape)
        _run("RowAffine", [fb, rb], [None, None], elems_out=grad, table=tab, stride=2)
        return _result(out, rows, [grad], (flag,))

    return cached(("vsd", reduction, need_grad), (x, x0_fake, x0_real), compose)
