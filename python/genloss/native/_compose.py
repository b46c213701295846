"""Composition of losses from engine calls, shared by every family.

A loss is a sum of ``Term``s; ``run_terms`` runs each term's functor once over
its inputs (one read each), accumulating the value (scalar or per sample) and
writing each needed gradient exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .. import _checks as C
from ._engine import (
    _C,
    FLOAT64,
    Buf,
    Recording,
    _local,
    _torch_mod,
    as_input,
    empty,
    ran,
    run_call,
    same_place,
    stream_of,
    value_f32,
    workspace,
)


class Term(NamedTuple):
    """coef * sum over the population of functor(x, y, *more; params)."""

    functor: str
    x: Buf
    coef: float = 1.0
    params: dict[str, float] | None = None  # the functor's parameters by name (_C.FUNCTOR_PARAMS)
    y: Buf | None = None  # second input of a binary functor
    per_sample_mean: bool = False  # divide each sample's sum by its element count
    more: tuple[Buf, ...] = ()  # third and fourth inputs
    slots: tuple[int | None, ...] | None = None  # output index per input (None: no gradient)


def inputs(names: Sequence[str], arrays: Sequence[Any]) -> list[Buf]:
    bufs = [as_input(a, n) for n, a in zip(names, arrays, strict=True)]
    for n, b in zip(names[1:], bufs[1:], strict=True):
        same_place(bufs[0], names[0], b, n)
    return bufs


# ---- float16/bfloat16 storage of compositions with intermediates -------------------------
# The engine's kernels load float16/bfloat16, compute in float32 and store the storage dtype.
# A composition that hands an intermediate from one engine call to the next (a per-row norm,
# a weight, a full-size scratch array) would round it to the storage dtype in between: 2-7
# float16 ulps off in a gradient entry on an H200. Those compositions run on float32 copies
# of their inputs instead (the float32 kernels) and round only their results.


def _low(x: Any) -> bool:
    """A float16/bfloat16 torch tensor, or a float16 NumPy or CuPy array."""
    t = _torch_mod()
    if t is not None and isinstance(x, t.Tensor):
        return x.dtype in (t.float16, t.bfloat16)
    return isinstance(getattr(x, "dtype", None), np.dtype) and x.dtype == np.float16


def low_storage(arrays: Sequence[Any]) -> bool:
    """Whether an op's floating inputs (None: an absent optional one) are float16/bfloat16
    arrays of one dtype and one kind: those :func:`computed_in_float32` takes. Anything else
    (a mixed dtype) takes the op's own path, which names what is wrong."""
    if not _low(arrays[0]):
        return False
    dt = arrays[0].dtype  # (a torch dtype never equals a NumPy one: one kind of array)
    return all(a is None or (_low(a) and a.dtype == dt) for a in arrays[1:])


def _astype(a: Any, dtype: Any) -> Any:
    return a.to(dtype) if hasattr(a, "is_cuda") else a.astype(dtype)


def computed_in_float32(call: Callable[..., tuple], arrays: Sequence[Any]) -> tuple:
    """``call(*arrays)`` on float32 copies of ``arrays`` (None stays None), its value and every
    gradient rounded to the inputs' storage dtype (the value stays float32 under
    ``_engine.float32_values``): ``(value, grads)`` as the op returns it."""
    low = arrays[0].dtype
    f32 = _torch_mod().float32 if hasattr(arrays[0], "is_cuda") else np.float32
    value, grads = call(*(None if a is None else _astype(a, f32) for a in arrays))
    if not _local.f32_values:
        value = _astype(value, low)
    return value, tuple(None if g is None else _astype(g, low) for g in grads)


# ---- THE reduction rule of every native loss -------------------------------------------
# 'mean' divides the per-sample values by the batch size; 'sum' does not scale; 'none'
# writes the per-sample values (rows) instead of one scalar. Every composition takes its
# scale from loss_scale (or batch_scale, for a loss whose rows are not an input's) and its
# value buffer from value_out; a cached plan (cached() below) replays the scales its
# recording computed here, for the same shapes only.


def batch_scale(reduction: str, b: int, *, coef: float = 1.0) -> float:
    """``coef`` / b for 'mean', ``coef`` for 'sum' and 'none'."""
    return coef / b if reduction == "mean" else coef


def loss_scale(reduction: str, x: Buf, *, per_sample_mean: bool = False, coef: float = 1.0) -> float:
    """The scale of a loss over ``x``'s rows: ``coef`` times the reduction rule, divided by the
    elements per sample for the per-sample-MEAN losses (L1, the diffusion and flow MSEs)."""
    return batch_scale(reduction, x.rows, coef=coef) / (x.cols if per_sample_mean else 1)


def value_out(like: Buf, reduction: str) -> tuple[Buf | None, Buf | None]:
    """(scalar output, per-sample output): one of them, by the reduction; float32 for a
    float16/bfloat16 ``like`` under ``_engine.float32_values``."""
    f32 = _local.f32_values
    if reduction == "none":
        return None, empty(like, (like.rows,), f32=f32)
    return empty(like, (), f32=f32), None


def needs(need_grad: bool | Sequence[bool], n: int) -> tuple[bool, ...]:
    """One flag per differentiable input."""
    if isinstance(need_grad, (bool, int)):
        return (bool(need_grad),) * n
    flags = tuple(bool(f) for f in need_grad)
    if len(flags) != n:
        raise ValueError(
            f"need_grad must be a bool or {n} bools (one per differentiable input), got {len(flags)}"
        )
    return flags


def grads_out(grads: Sequence[Buf | None], flags: tuple[bool, ...]) -> tuple:
    if not any(flags):
        return ()
    return tuple(None if g is None else g.arr for g in grads)


def empty_elementwise(
    like: Buf, shape: tuple[int, ...], diff: Sequence[Buf], flags: tuple[bool, ...]
) -> tuple:
    """``(value, grads)`` of an elementwise op whose broadcast ``shape`` has no element: an empty
    value (the reference's ``[]``; the engine has nothing to run) and, for each differentiable
    input ``diff`` asked by ``flags``, a zero gradient of its own shape (an input broadcast into
    nothing contributes nothing)."""
    zeros = [empty(b, b.shape, fill=0.0) if fl else None for b, fl in zip(diff, flags, strict=True)]
    return empty(like, shape).arr, grads_out(zeros, flags)


def run_terms(terms: Sequence[Term], reduction: str, need_grad, n_grads: int, grad_of: Sequence[int]):
    """Sum of terms; term i's inputs write gradient outputs grad_of[i], grad_of[i] + 1, ...
    (or ``Term.slots``). Every gradient output belongs to one input of one term,
    so each is written once, never accumulated."""
    flags = needs(need_grad, n_grads)
    ref = terms[0].x
    grads: list[Buf | None] = [None] * n_grads
    out, rows = value_out(ref, reduction)
    stream = stream_of(ref)
    ws = workspace(ref)  # CUDA scratch from the inputs' allocator (nothing on the CPU)
    for i, t in enumerate(terms):
        x = t.x
        ins: tuple[Buf, ...] = (x,) if t.y is None else (x, t.y)
        ins += t.more
        slots = t.slots if t.slots is not None else tuple(grad_of[i] + q for q in range(len(ins)))
        gbufs = [
            empty(b, b.shape) if sl is not None and flags[sl] else None
            for b, sl in zip(ins, slots, strict=True)
        ]
        for sl, g in zip(slots, gbufs, strict=True):
            if sl is not None:
                grads[sl] = g
        s = loss_scale(reduction, x, per_sample_mean=t.per_sample_mean, coef=t.coef)
        if x.dtype > FLOAT64 and value_f32(x, out, rows):
            ws = {**ws, "value_f32": True}
        ran(run_call(
            functor=t.functor, params=t.params, dtype=x.dtype, device=x.device, device_id=x.device_id,
            stream=stream, ins=[b.ptr for b in ins], grads=[0 if g is None else g.ptr for g in gbufs],
            rows=x.rows, cols=x.cols, value_scale=s, grad_scale=s, accumulate=i > 0,
            out_value=0 if out is None else out.ptr, out_rows=0 if rows is None else rows.ptr, **ws,
        ))  # fmt: skip
    value = out if rows is None else rows
    assert value is not None  # value_out gives exactly one of them
    return value.arr, grads_out(grads, flags)


# ---- cached plans ------------------------------------------------------------------------

PLANS = _C.PlanCache()


def cached(key: Any, arrays: Sequence[Any], compose: Callable[[], Any]) -> Any:
    """``compose()`` (the Python path: checks, allocation, engine Calls), or its cached plan.

    The first call for a ``key`` (every non-array argument that changes the result: the
    op's hyperparameters, reduction, need_grad) on plain CPU torch tensors of one dtype
    records the Calls ``compose`` runs; the plan cache (cpp/src/plan.cpp) keeps them with
    the arrays' dtype and shapes, and later calls with the same key, dtype and shapes run
    them in C++ on the new tensors. ``compose`` must return ``(value, grads)`` and reach
    the engine only through ``_engine.ran(run_call(...))`` Calls on ``arrays`` and arrays it
    allocates with ``_engine.empty`` (outputs, and scratch that the plan allocates afresh on
    every run); anything else (a check of the data that is not an ``_engine.guard``, a total,
    a copy or derived array, a returned array it did not allocate) makes the recording
    unusable and the Python path simply runs every time.
    ``arrays`` may hold integer tensors (timesteps) and arrays of another float dtype (a
    float64 table); their dtypes and shapes are part of the plan's identity. Keys compare by
    type and, for floats, bit for bit (0.0 and -0.0 are two plans).
    """
    if _local.rec is not None:  # inside another composition's recording: its calls are its own
        return compose()
    if _local.f32_values:  # its value dtype is part of the plan
        key = (key, "f32_values")
    fast = PLANS.run(key, arrays)
    if fast is not None:
        return fast
    with Recording() as rec:
        result = compose()
    if rec.ok:
        PLANS.add(key, arrays, rec.calls, result, rec.guards, rec.allocs)
    return result


def one_population(name, array, reduction, functor, coef, params, need_grad):
    """coef * the reduction of functor(x; params) over one population."""

    def compose():
        C.reduction(reduction)
        (b,) = inputs([name], [array])
        C.batched(name, b.shape, reduction)
        return run_terms([Term(functor, b, coef, params)], reduction, need_grad, 1, [0])

    return cached(("one", functor, coef, params, reduction, need_grad), (array,), compose)


def two_population(names, arrays, reduction, terms, need_grad):
    """Sum over populations i of coef_i * the reduction of functor_i(arrays[i]; params_i);
    ``terms``: one (functor, coef, params) per population."""

    def compose():
        C.reduction(reduction, C.TWO_POPULATION)
        bufs = inputs(names, arrays)
        for n, b in zip(names, bufs, strict=True):
            C.batched(n, b.shape, reduction)
        return run_terms(
            [Term(f, b, coef, params) for b, (f, coef, params) in zip(bufs, terms, strict=True)],
            reduction, need_grad, len(bufs), range(len(bufs)),
        )  # fmt: skip

    return cached(("two", terms, reduction, need_grad), arrays, compose)
