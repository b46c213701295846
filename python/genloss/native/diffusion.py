r"""The diffusion family on the native engine.

Same conventions as ``genloss.native.gan``: each function returns ``(value, grads)``
with the gradients of ``sum(value)`` w.r.t. the differentiable inputs (``need_grad``
a bool or one bool per differentiable input; ``()`` when none is asked).  Signatures
follow ``genloss.reference.diffusion``; ``schedule`` is a
``genloss.reference.DiffusionSchedule`` (or anything with a ``reference`` attribute
holding one, such as ``genloss.torch.DiffusionSchedule``).

The schedule reaches the kernels as a small per-step float64 table, built once per
schedule and device from the float64 arrays (never rounded to the input's
precision); each sample's row is gathered inside the kernel at its timestep (engine.h, ``MapReduceArgs::table``).  The math of
each functor is in cpp/include/genloss/ops/diffusion.h; derivations/diffusion.md
derives each line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _checks as C
from ..reference import diffusion as _R
from ._compose import (
    cached,
    computed_in_float32,
    empty_elementwise,
    inputs,
    loss_scale,
    low_storage,
    needs,
    value_out,
)
from ._engine import (
    CPU,
    FLOAT32,
    FLOAT64,
    Buf,
    as_input,
    broadcast,
    check_if_nan,
    empty,
    float_range,
    guard,
    int_range,
    map_reduce,
    reduce_to,
    row_map,
    same_place,
    skip_checks,
    to_host,
)

PREDICTIONS = _R.PREDICTIONS
_ALL = C.REDUCTIONS

# ============================================================================= plumbing


def _schedule(schedule: Any) -> _R.DiffusionSchedule:
    ref = getattr(schedule, "reference", schedule)
    if not isinstance(ref, _R.DiffusionSchedule):
        kind = type(schedule)
        raise TypeError(f"schedule must be a DiffusionSchedule, got {kind.__module__}.{kind.__qualname__}")
    return ref


def _to_place(like: Buf, host: np.ndarray) -> Buf:
    """A host array copied to ``like``'s device (itself on the CPU)."""
    host = np.ascontiguousarray(host)
    if like.kind == "torch":  # (on the CPU, a zero-copy view: the one-call path reads tensors)
        import torch

        return as_input(torch.from_numpy(host).to(like.arr.device), "table")
    if like.device == CPU:
        return as_input(host, "table")
    if like.kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device_id):
            return as_input(cupy.asarray(host), "table")
    raise TypeError("genloss.native needs torch or CuPy for CUDA diffusion inputs")


def _table(schedule: _R.DiffusionSchedule, name: str, like: Buf, build) -> Buf:
    """The per-step float64 table ``name`` of ``schedule`` in ``like``'s place (cached: a
    schedule is immutable)."""
    cache = schedule.__dict__.setdefault("_genloss_tables", {})
    key = (name, like.device, like.device_id, like.kind)
    buf = cache.get(key)
    if buf is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            host = np.asarray(build(schedule), dtype=np.float64)
        buf = cache[key] = _to_place(like, host)
    return buf


def _timesteps(t: Any, ref: Buf, ref_name: str, num_timesteps: int) -> Buf:
    tb = as_input(t, "t", integer=True)
    if len(tb.shape) != 1 or tb.shape[0] != ref.rows:
        raise ValueError(
            f"t must have shape ({ref.rows},) (one timestep per sample of {ref_name}), got {tb.shape}"
        )
    if (tb.device, tb.device_id) != (ref.device, ref.device_id):
        raise ValueError(f"t must be on the device of {ref_name}")
    r = int_range(tb, ("index_range", (tb,), num_timesteps))
    if r is not None and (r[0] < 0 or r[1] >= num_timesteps):
        raise ValueError(f"t must lie in [0, {num_timesteps}), got range [{r[0]}, {r[1]}]")
    return tb


def _batched(names, arrays, reduction="none"):
    bufs = inputs(names, arrays)
    for n, b in zip(names, bufs, strict=True):
        C.batched(n, b.shape, reduction)
        C.same_shape(names[0], bufs[0].shape, n, b.shape)
    return bufs


def _xp(b: Buf):
    if b.kind == "torch":
        import torch

        return torch
    if b.kind == "cupy":
        import cupy

        return cupy
    return np


def _row_vector(
    name: str,
    value: Any,
    like: Buf,
    like_name: str,
    *,
    nonnegative: bool = False,
    cast: bool = False,
    within: float | None = None,
) -> Buf:
    """A finite per-sample vector (B,) in ``like``'s place and dtype (``cast``: converted to it, for
    constant weights; else a differentiable input must match, as every other input). ``within``:
    also in [-within, within], checked by the same read-back (one wait for a GPU, not two)."""
    b = as_input(value, name)
    if b.shape != (like.rows,):
        raise ValueError(f"{name} must have shape ({like.rows},) (one value per sample), got {b.shape}")
    if (b.device, b.device_id) != (like.device, like.device_id):
        raise ValueError(f"{name} must be on the device of {like_name}")
    if b.dtype != like.dtype and not cast:
        same_place(like, like_name, b, name)
    if b.dtype != like.dtype:  # a float64 weight vector for float32 data: cast the B values
        b = as_input(b.arr.to(like.arr.dtype) if b.kind == "torch" else b.arr.astype(like.arr.dtype), name)
    guard = ("finite", (b,), float(nonnegative)) if within is None else ("within", (b,), within)
    r = float_range(b, guard)
    if r is not None and not (math.isfinite(r[0]) and math.isfinite(r[1])):
        raise ValueError(f"{name} must be finite")
    if r is not None and nonnegative and r[0] < 0:
        raise ValueError(f"{name} must be >= 0, got min {r[0]}")
    if r is not None and within is not None and (r[0] < -within or r[1] > within):
        kind = "float32" if like.dtype == FLOAT32 else "float64"
        raise ValueError(
            f"{name} must lie in [-{within:.4g}, {within:.4g}] for {kind} data, got values in [{r[0]:g}, {r[1]:g}]"
        )
    return b


def _run(functor: str, ins: Sequence[Buf], grads: Sequence[Buf | None], **kw: Any) -> None:
    """One engine Call over ``ins`` (same shape), writing ``grads`` (``_engine.map_reduce``'s
    keywords: params by name, scales, outputs, the per-row table, index and weights)."""
    map_reduce(functor, ins[0], more=ins[1:], grads=grads, **kw)


_value_out = value_out  # (scalar output, per-sample output) by the reduction: _compose's rule


def _result(out: Buf | None, rows: Buf | None, grads: list[Buf | None], flags: tuple[bool, ...]):
    buf = rows if out is None else out
    assert buf is not None  # _value_out gives exactly one of them
    value = buf.arr
    if not any(flags):
        return value, ()
    return value, tuple(None if g is None else g.arr for g in grads)


def _squared_diff(a: Buf, b: Buf, w: Buf | None, reduction: str, coef: float, flags, want_raw: bool = False):
    """coef * w_b * sum_i (a - b)^2 per sample in one pass (SquaredDiff with row weights): the
    value buffers, the gradients of (a, b) that ``flags`` ask for, and (``want_raw``) the
    unweighted per-sample coef * sum_i (a - b)^2.  eps_mse_loss and both VDM losses."""
    out, rows = _value_out(a, reduction)
    grads = [empty(x, x.shape) if f else None for x, f in zip((a, b), flags[:2], strict=True)]
    raw = empty(a, (a.rows,)) if want_raw else None
    s = loss_scale(reduction, a, coef=coef)
    _run("SquaredDiff", [a, b], grads, params={}, value_scale=s, out=out, rows_out=rows, grad_scale=s,
         row_weight=w, rows_raw=raw)  # fmt: skip
    return out, rows, grads, raw


# ============================================================================= linear maps (DIF.2, 3, 7, 14)


def _linear(names, arrays, t, schedule, table_name, build, need_grad, signal=None):
    """a_t * first + b_t * second, elementwise, with (a, b) from a per-step table."""
    sched = _schedule(schedule)
    tab = _table(sched, table_name, as_input(arrays[0], names[0]), build)

    def compose():
        x, _ = _batched(names, arrays)
        tb = _timesteps(t, x, names[0], sched.num_timesteps)
        # ``signal``: the eps parameterisation divides by zero at zero terminal SNR, where the
        # table row is not finite: refused by the rows the timesteps pick (a guard)
        return linear_with_table(names, arrays, tb, tab, need_grad, what=signal)

    # A cached plan (plain CPU tensors) re-checks the timesteps' range (and the table rows they
    # pick) and runs the one Call on the schedule's table, an input of the plan like the others.
    return cached(("linear", table_name, need_grad), (*arrays, t, tab.arr), compose)


def linear_with_table(names, arrays, t, table, need_grad, what=None):
    """The kernel of the linear maps, for a per-step float64 (T, 2) ``table`` (the torch ops
    hold theirs as buffers).  ``what``: refuse steps whose row is not finite
    (the eps parameterisation at zero terminal SNR), naming the quantity."""
    x, y = _batched(names, arrays)
    tab = _table_input(table, x, 2)
    tb = t if isinstance(t, Buf) else _timesteps(t, x, names[0], tab.rows)
    if what is not None:
        _finite_rows(tab, tb, *what)
    flags = needs(need_grad, 2)
    out = empty(x, x.shape)
    grads = [empty(b, b.shape) if f else None for b, f in zip((x, y), flags, strict=True)]
    _run("RowAffine", [x, y], grads, params={}, elems_out=out, table=tab, stride=2, index=tb)
    return _result(out, None, grads, flags)


def _tensor_of(table: Any) -> Any:
    """The array behind a table (a Buf from ``_table``, or the array itself)."""
    return table.arr if isinstance(table, Buf) else table


def _table_input(table, like: Buf, stride: int) -> Buf:
    tab = table if isinstance(table, Buf) else as_input(table, "table")
    if tab.dtype != FLOAT64 or len(tab.shape) != 2 or tab.shape[1] != stride:
        raise ValueError(f"table must be a float64 (T, {stride}) array (the schedule's per-step table)")
    if (tab.device, tab.device_id) != (like.device, like.device_id):
        raise ValueError("table must be on the device of the inputs")
    return tab


def _finite_rows(tab: Buf, tb: Buf, attr: str, what: str) -> None:
    """Refuse timesteps whose table row is not finite (a division by sqrt(alpha_bar) or
    sqrt(alpha) = 0), with the reference's message."""
    guard("rows_finite", (tab, tb))  # a plan re-checks the rows its timesteps pick
    if skip_checks(tab):
        return
    xp = _xp(tab)
    if bool(xp.isfinite(tab.arr).all()):
        return
    rows_ok = to_host(xp.isfinite(tab.arr).all(axis=1) if xp is not np else np.isfinite(tab.arr).all(axis=1))
    steps = to_host(tb.arr)
    bad = steps[~rows_ok[steps]]
    if bad.size:
        raise ValueError(
            f"t hits step {int(bad[0])} where {attr} = 0 (zero terminal SNR): {what} is not "
            "determined by eps there; predict v or x0 instead"
        )


def _pair_table(a_name, b_name, sign_a=1.0, sign_b=1.0):
    def build(s):
        return np.stack([sign_a * getattr(s, a_name), sign_b * getattr(s, b_name)], axis=1)

    return build


def _div(a: Any, b: np.ndarray) -> np.ndarray:
    """a/b, NaN where b = 0 (such steps are refused before use). No np.errstate, so the table
    builders also trace under torch.compile when a schedule is first seen inside it."""
    return a / np.where(b == 0.0, np.nan, b)


def _x0_table(s):
    ra = _div(1.0, s.sqrt_alpha_bar)  # steps with abar = 0 are refused before use
    return np.stack([ra, -s.sqrt_one_minus_alpha_bar * ra], axis=1)


def _mean_table(s):
    ra = _div(1.0, np.sqrt(s.alphas))  # steps with alpha = 0 are refused before use
    return np.stack([ra, -_div(s.betas, s.sqrt_one_minus_alpha_bar) * ra], axis=1)


def q_sample(x0, t, noise, schedule, *, need_grad=True):
    r"""x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.  (DIF.2)"""
    build = _pair_table("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar")
    return _linear(("x0", "noise"), (x0, noise), t, schedule, "q_sample", build, need_grad)


def v_target(x0, t, noise, schedule, *, need_grad=True):
    r"""v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0.  (DIF.14)"""
    build = _pair_table("sqrt_one_minus_alpha_bar", "sqrt_alpha_bar", sign_a=-1.0)
    return _linear(("x0", "noise"), (x0, noise), t, schedule, "v_target", build, need_grad)


def predict_x0_from_eps(x_t, t, eps, schedule, *, need_grad=True):
    r"""(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).  (DIF.7)"""
    return _linear(
        ("x_t", "eps"), (x_t, eps), t, schedule, "x0_from_eps", _x0_table, need_grad, ("alpha_bar", "x0")
    )


def posterior_mean_from_eps(x_t, t, eps, schedule, *, need_grad=True):
    r"""(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).  (DIF.7)"""
    return _linear(
        ("x_t", "eps"),
        (x_t, eps),
        t,
        schedule,
        "mean_from_eps",
        _mean_table,
        need_grad,
        ("alphas", "the posterior mean"),
    )


def _per_row(like: Buf, values: np.ndarray, tb: Buf, shape) -> Any:
    """``values[t]`` broadcast to ``shape``, in ``like``'s dtype and place (a constant output)."""
    if like.kind == "torch":
        import torch

        v = torch.from_numpy(np.array(values)).to(like.arr.device)[tb.arr.long()].to(like.arr.dtype)
        return v.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape).contiguous()
    xp = _xp(like)
    v = xp.asarray(values)[tb.arr].astype(like.arr.dtype)
    return xp.ascontiguousarray(xp.broadcast_to(v.reshape((-1,) + (1,) * (len(shape) - 1)), shape))


def q_posterior(x0, x_t, t, schedule, *, need_grad=True):
    r"""((mean, variance, log_variance), grads of sum(mean) w.r.t. (x0, x_t)).  (DIF.3)"""
    sched = _schedule(schedule)
    mean, grads = _linear(
        ("x0", "x_t"),
        (x0, x_t),
        t,
        schedule,
        "q_posterior",
        _pair_table("posterior_mean_coef1", "posterior_mean_coef2"),
        need_grad,
    )
    x = as_input(x0, "x0")
    tb = as_input(t, "t", integer=True)
    variance = _per_row(x, sched.posterior_variance, tb, x.shape)
    log_variance = _per_row(x, sched.posterior_log_variance_clipped, tb, x.shape)
    return (mean, variance, log_variance), grads


# ============================================================================= MSE losses (DIF.12, 14)


def eps_mse_loss(eps_pred, eps, weights=None, reduction="mean", *, need_grad=True):
    r"""Per sample w_b mean_i (eps - eps_pred)^2 (L_simple).  (DIF.12)

    Differentiable inputs: eps_pred, eps and, when given, weights."""

    def compose():
        C.reduction(reduction)
        p, e = _batched(("eps_pred", "eps"), (eps_pred, eps), reduction)
        w = (
            None
            if weights is None
            else _row_vector("weights", weights, p, "eps_pred", nonnegative=True, cast=True)
        )
        flags = needs(need_grad, 2 if weights is None else 3)  # weights: the unweighted row term
        want_w = len(flags) == 3 and flags[2]
        out, rows, grads, raw = _squared_diff(p, e, w, reduction, 1.0 / p.cols, flags, want_raw=want_w)
        return _result(out, rows, [*grads, raw][: len(flags)], flags)

    # A cached plan (plain CPU tensors) re-checks the weights (finite, >= 0) and runs the one Call.
    arrays = (eps_pred, eps) if weights is None else (eps_pred, eps, weights)
    return cached(("eps_mse", reduction, need_grad, weights is None), arrays, compose)


_TARGETS = {  # (coefficient of x0, coefficient of noise) per step (DIF.14)
    "eps": lambda s: np.stack([np.zeros_like(s.betas), np.ones_like(s.betas)], axis=1),
    "x0": lambda s: np.stack([np.ones_like(s.betas), np.zeros_like(s.betas)], axis=1),
    "v": lambda s: np.stack([-s.sqrt_one_minus_alpha_bar, s.sqrt_alpha_bar], axis=1),
}


def diffusion_mse_loss(
    pred, x0, noise, t, schedule, prediction="eps", weights=None, reduction="mean", *, need_grad=True
):
    r"""Per sample w_b mean_i (target - pred)^2, the target (eps, x0 or v) built in the kernel.

    ONE pass: reads pred, x0 and noise once, writes the per-sample loss and d/dpred.
    (DIF.12, DIF.14)
    """
    prediction = C.choice("prediction", prediction, PREDICTIONS)
    sched = _schedule(schedule)
    p = as_input(pred, "pred")
    table = _table(sched, f"mse_{prediction}", p, _TARGETS[prediction])
    return diffusion_mse_with_table(pred, x0, noise, t, table, weights, reduction, need_grad=need_grad)


def diffusion_mse_with_table(pred, x0, noise, t, table, weights=None, reduction="mean", *, need_grad=True):
    """The kernel of ``diffusion_mse_loss`` for a per-step float64 (T, 2) target table (x0, noise
    coefficients).  Differentiable inputs: pred, x0, noise (the kernel writes all three from the
    one residual; DIF.14) and, when given, weights (the unweighted per-sample MSE)."""

    def compose():
        flags = needs(need_grad, 3 if weights is None else 4)
        want_w = len(flags) == 4 and flags[3]
        C.reduction(reduction)
        p, x, n = _batched(("pred", "x0", "noise"), (pred, x0, noise), reduction)
        tab = _table_input(table, p, 2)
        tb = _timesteps(t, p, "pred", tab.rows)
        w = (
            None
            if weights is None
            else _row_vector("weights", weights, p, "pred", nonnegative=True, cast=True)
        )
        out, rows = _value_out(p, reduction)
        grads = [empty(b, b.shape) if f else None for b, f in zip((p, x, n), flags[:3], strict=True)]
        raw = empty(p, (p.rows,)) if want_w else None  # d value / d w_b: the unweighted row term
        s = loss_scale(reduction, p, per_sample_mean=True)
        _run(
            "DiffusionMSE", [p, x, n], grads, params={}, value_scale=s, out=out, rows_out=rows,
            grad_scale=s, table=tab, stride=2, index=tb, row_weight=w, rows_raw=raw,
        )  # fmt: skip
        return _result(out, rows, [*grads, raw][: len(flags)], flags)

    # A cached plan (plain CPU tensors) re-checks the timesteps' range and the weights' sign
    # (guards) and runs the one Call; else this Python path.
    arrays = (pred, x0, noise, t, _tensor_of(table)) + (() if weights is None else (weights,))
    return cached(("diffusion_mse", reduction, need_grad, weights is None), arrays, compose)


# ============================================================================= the bound (DIF.4-11)


def _bin_width(bits: int) -> float:
    """The width of one bin of data in [-1, 1] quantised to ``bits`` bits."""
    return 1.0 / (2.0**bits - 1.0)


def _bits(bits) -> int:
    bits = C.positive_int("bits", bits)
    if bits > 24:
        raise ValueError(f"bits must be <= 24, got {bits}")
    return bits


def _unit_box(b: Buf, name: str, what: str) -> None:
    r = float_range(b, ("within", (b,), 1.0))
    if r is not None and not (r[0] >= -1.0 and r[1] <= 1.0):  # NaN fails too
        raise ValueError(f"{name} must lie in [-1, 1] ({what}), got values in [{r[0]}, {r[1]}]")


def discretized_gaussian_log_likelihood(x, means, log_scales, bits=8, cdf="exact", *, need_grad=True):
    r"""Elementwise log P(bin of x) under N(means, exp(2 log_scales)), edge bins open.

    Differentiable inputs: means, log_scales (x is data).  (DIF.9-DIF.11)
    """

    def compose():
        cdf_ = C.choice("cdf", cdf, ("exact", "tanh"))
        bits_ = _bits(bits)
        names = ("x", "means", "log_scales")
        bufs = inputs(names, (x, means, log_scales))
        try:
            shape = tuple(np.broadcast_shapes(*(b.shape for b in bufs)))
        except ValueError:
            got = ", ".join(f"{n} {b.shape}" for n, b in zip(names, bufs, strict=True))
            raise ValueError(f"x, means, log_scales must broadcast together, got {got}") from None
        if math.prod(shape) == 0:  # before the range check's min/max, which has nothing to read
            return empty_elementwise(bufs[0], shape, bufs[1:], needs(need_grad, 2))
        _unit_box(bufs[0], "x", "discretized data")
        full = [broadcast(b, shape, n) for b, n in zip(bufs, names, strict=True)]  # same shapes: themselves
        flags = needs(need_grad, 2)
        out = empty(full[0], shape)
        grads = [None] + [empty(f, shape) if fl else None for f, fl in zip(full[1:], flags, strict=True)]
        n = math.prod(shape)
        params = {"bin_width": _bin_width(bits_), "tanh_cdf": cdf_ == "tanh"}
        _run("DiscretizedGaussianLL", full, grads, params=params, shape2d=(1, n), elems_out=out)
        if not any(flags):
            return out.arr, ()
        return out.arr, tuple(
            None if g is None else reduce_to(g, b.shape) for g, b in zip(grads[1:], bufs[1:], strict=True)
        )

    # Same-shape arrays (the usual call) and trailing broadcasts (broadcast, reduce_to) run on a
    # cached plan, which re-checks x in [-1, 1]; other broadcasts are derived arrays: the Python
    # path each time.
    return cached(("discretized_gll", bits, cdf, need_grad), (x, means, log_scales), compose)


def _vlb_table(s: _R.DiffusionSchedule) -> np.ndarray:
    """Per step: posterior mean coefs, model mean coefs, the log-variances, the decoder flag, the
    fixed variance's e^{-lv} and KL constant, c2 - k1, e^{-log beta~} (ops::VlbRow)."""
    T = s.num_timesteps
    ra = _div(1.0, np.sqrt(s.alphas))  # steps with alpha = 0 are refused before use
    k2 = _div(s.betas, s.sqrt_one_minus_alpha_bar) * ra
    log_tilde = s.posterior_log_variance_clipped
    log_beta = np.log(s.betas)
    first = np.arange(T) == 0
    fixed = np.where(first, log_tilde, log_beta)  # (DIF.8) fixedlarge, beta~_1 at t = 0
    delta = log_tilde - fixed
    tab = np.zeros((T, 12))
    tab[:, 0] = s.posterior_mean_coef1
    tab[:, 1] = s.posterior_mean_coef2
    tab[:, 2] = ra
    tab[:, 3] = k2
    tab[:, 4] = log_tilde
    tab[:, 5] = log_beta
    tab[:, 6] = fixed
    tab[:, 7] = first
    tab[:, 8] = np.exp(-fixed)
    tab[:, 9] = 0.5 * (np.expm1(delta) - delta)
    tab[:, 10] = -_div(s.betas, s.one_minus_alpha_bar * np.sqrt(s.alphas))  # c2 - k1, without cancelling
    tab[:, 11] = np.exp(-log_tilde)
    return tab


def vlb_term(
    x0, x_t, t, eps_pred, schedule, model_log_variance=None, reduction="none", bits=8, *, need_grad=True
):
    r"""One term of the variational bound per sample (nats): the posterior KL for t > 0, the
    discretized decoder NLL at t = 0, in ONE pass over x0, x_t, eps_pred (and v).

    Differentiable inputs: eps_pred, model_log_variance.  (DIF.4-DIF.9)
    """
    sched = _schedule(schedule)
    x = as_input(x0, "x0")
    if np.any(sched.alphas == 0.0):  # the reference's check and message (only such schedules pay it)
        _R._require_signal(
            sched, to_host(_timesteps(t, x, "x0", sched.num_timesteps).arr), "alphas", "the model mean"
        )
    table = _table(sched, "vlb", x, _vlb_table)
    return vlb_with_table(
        x0, x_t, t, eps_pred, table, model_log_variance, reduction, bits, need_grad=need_grad
    )


def vlb_with_table(
    x0, x_t, t, eps_pred, table, model_log_variance=None, reduction="none", bits=8, *, need_grad=True
):
    """The kernel of ``vlb_term`` for a per-step float64 (T, 12) table (``_vlb_table``)."""
    # A cached plan (plain CPU tensors) re-checks the timesteps' range, the rows they pick
    # and the value's NaNs (guards) and runs the one Call; else the Python path.
    arrays = (x0, x_t, t, eps_pred, _tensor_of(table))
    arrays += () if model_log_variance is None else (model_log_variance,)
    key = ("vlb", reduction, bits, need_grad, model_log_variance is None)
    return cached(
        key, arrays, lambda: _vlb(x0, x_t, t, eps_pred, table, model_log_variance, reduction, bits, need_grad)
    )


def _vlb(x0, x_t, t, eps_pred, table, model_log_variance, reduction, bits, need_grad):
    C.reduction(reduction)
    bits = _bits(bits)
    x, xt, e = _batched(("x0", "x_t", "eps_pred"), (x0, x_t, eps_pred), reduction)
    tab = _table_input(table, x, 12)
    tb = _timesteps(t, x, "x0", tab.rows)
    v = None
    if model_log_variance is not None:
        vb = as_input(model_log_variance, "model_log_variance")
        same_place(x, "x0", vb, "model_log_variance")
        try:
            ok = tuple(np.broadcast_shapes(vb.shape, x.shape)) == tuple(x.shape)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"model_log_variance must broadcast to the shape of x0 {x.shape}, got shape {vb.shape}"
            )
        v = broadcast(vb, x.shape, "model_log_variance")
    _finite_rows(tab, tb, "alphas", "the model mean")
    flags = needs(need_grad, 1 if v is None else 2)
    out, rows = _value_out(x, reduction)
    g_eps = empty(e, e.shape) if flags[0] else None
    g_v = empty(v, v.shape) if v is not None and flags[1] else None
    s = loss_scale(reduction, x)
    _run(
        "VlbKL" if v is None else "VlbKLLearned", [x, xt, e, e if v is None else v], [None, None, g_eps, g_v],
        params={"bin_width": _bin_width(bits)}, value_scale=s, out=out, rows_out=rows, grad_scale=s,
        table=tab, stride=12, index=tb,
    )  # fmt: skip
    # The functors make the value NaN where x0 is off [-1, 1]: only then read x0 again.
    value, _ = _result(out, rows, [], ())
    check_if_nan(
        value, lambda: _unit_box(x, "x0", "the discretized decoder's data"), out if rows is None else rows
    )
    if not any(flags):
        return value, ()
    grads: tuple = (None if g_eps is None else g_eps.arr,)
    if v is not None:
        grads += (None if g_v is None else reduce_to(g_v, vb.shape),)
    return value, grads


def prior_kl(x0, schedule, reduction="none", *, need_grad=True):
    r"""L_T = KL(q(x_T | x0) || N(0, I)) per sample (nats); gradient w.r.t. x0.  (DIF.5)"""
    return prior_kl_from_alpha_bar(
        x0, float(_schedule(schedule).alpha_bar[-1]), reduction, need_grad=need_grad
    )


def prior_kl_from_alpha_bar(x0, alpha_bar_T, reduction="none", *, need_grad=True):
    """``prior_kl`` given the schedule's last alpha_bar."""
    C.reduction(reduction)
    a = C.finite("alpha_bar_T", alpha_bar_T)
    if not 0.0 <= a < 1.0:
        raise ValueError(f"alpha_bar_T must lie in [0, 1), got {a}")

    def compose():
        (x,) = _batched(("x0",), (x0,), reduction)
        const = 0.5 * float(_R._neg_log1m_minus(np.float64(a)))
        flags = needs(need_grad, 1)
        out, rows = _value_out(x, reduction)
        grads = [empty(x, x.shape) if flags[0] else None]
        s = loss_scale(reduction, x)
        _run(
            "PriorKL",
            [x],
            grads,
            params={"constant": const, "half_alpha_bar": 0.5 * a},
            value_scale=s,
            out=out,
            rows_out=rows,
            grad_scale=s,
        )
        return _result(out, rows, grads, flags)

    return cached(("prior_kl", a, reduction, need_grad), (x0,), compose)


# ============================================================================= VDM (DIF.16, 17)


def vdm_continuous_loss(eps, eps_pred, dgamma_dt, reduction="mean", *, need_grad=True):
    r"""Per sample 1/2 gamma'(t) ||eps - eps_pred||^2.  (DIF.16)

    Differentiable inputs: eps, eps_pred, dgamma_dt (d/d gamma' = 1/2 ||eps - eps_pred||^2,
    the kernel's unweighted row sums).
    """

    def compose():
        C.reduction(reduction)
        e, p = _batched(("eps", "eps_pred"), (eps, eps_pred), reduction)
        w = _row_vector("dgamma_dt", dgamma_dt, e, "eps")
        flags = needs(need_grad, 3)
        out, rows, grads, raw = _squared_diff(e, p, w, reduction, 0.5, flags, want_raw=flags[2])
        return _result(out, rows, [*grads, raw], flags)

    return cached(("vdm_continuous", reduction, need_grad), (eps, eps_pred, dgamma_dt), compose)


def vdm_discrete_loss(eps, eps_pred, gamma_t, gamma_s, T, reduction="mean", *, need_grad=True):
    r"""Per sample T/2 expm1(gamma_t - gamma_s) ||eps - eps_pred||^2.  (DIF.17)

    Differentiable inputs: eps, eps_pred, gamma_t, gamma_s. float16/bfloat16 CUDA inputs are
    computed in float32 (the weights and the per-sample sums pass between steps); value and
    gradients in their dtype.
    """
    if low_storage((eps, eps_pred, gamma_t, gamma_s)):
        return computed_in_float32(
            lambda e, p, g_t, g_s: vdm_discrete_loss(e, p, g_t, g_s, T, reduction, need_grad=need_grad),
            (eps, eps_pred, gamma_t, gamma_s),
        )

    def compose():
        C.reduction(reduction)
        half_t = {"half_T": 0.5 * C.positive_int("T", T)}
        e, p = _batched(("eps", "eps_pred"), (eps, eps_pred), reduction)
        gt = _row_vector("gamma_t", gamma_t, e, "eps")
        gs = _row_vector("gamma_s", gamma_s, e, "eps")
        w = empty(e, (e.rows,))
        row_map("VdmDiscreteRows", [gt, gs], outs=[w], params=half_t)  # (DIF.17) T/2 expm1, in float64
        flags = needs(need_grad, 4)
        out, rows, grads, raw = _squared_diff(e, p, w, reduction, 1.0, flags, want_raw=flags[2] or flags[3])
        value, _ = _result(out, rows, [], ())
        if not any(flags):
            return value, ()
        g_t = empty(gt, (gt.rows,)) if flags[2] else None
        g_s = empty(gs, (gs.rows,)) if flags[3] else None
        if raw is not None:  # (DIF.17) d/dgamma_t = T/2 e^{gamma_t - gamma_s} m = -d/dgamma_s
            row_map("VdmDiscreteGrads", [gt, gs, raw], outs=[g_t, g_s], params=half_t)
        return value, tuple(None if g is None else g.arr for g in (*grads[:2], g_t, g_s))

    return cached(("vdm_discrete", T, reduction, need_grad), (eps, eps_pred, gamma_t, gamma_s), compose)
