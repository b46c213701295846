"""Composition of losses from engine calls, shared by every family.

A loss is a sum of ``Term``s; ``run_terms`` runs each term's functor once over
its inputs (one read each), accumulating the value (scalar or per sample) and
writing each needed gradient exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .. import _checks as C
from ._engine import _C, Buf, F, as_input, empty, same_place, stream_of


class Term(NamedTuple):
    """coef * sum over the population of functor(x, y, *more; params)."""

    functor: str
    x: Buf
    coef: float = 1.0
    params: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mode: int = 0
    y: Buf | None = None  # second input of a binary functor
    per_sample_mean: bool = False  # divide each sample's sum by its element count
    more: tuple[Buf, ...] = ()  # third and fourth inputs
    slots: tuple[int | None, ...] | None = None  # output index per input (None: no gradient)


def inputs(names: Sequence[str], arrays: Sequence[Any]) -> list[Buf]:
    bufs = [as_input(a, n) for n, a in zip(names, arrays, strict=True)]
    for n, b in zip(names[1:], bufs[1:], strict=True):
        same_place(bufs[0], names[0], b, n)
    return bufs


def batch_scale(reduction: str, b: int) -> float:
    """THE reduction rule of every native loss: 'mean' divides the per-sample values by the
    batch size b; 'sum' and 'none' (per-sample output) do not scale."""
    return 1.0 / b if reduction == "mean" else 1.0


def loss_scale(reduction: str, x: Buf, *, per_sample_mean: bool = False, coef: float = 1.0) -> float:
    """The scale of a loss over ``x``'s rows: ``coef`` times the reduction rule, divided by the
    elements per sample for the per-sample-MEAN losses (L1, the diffusion and flow MSEs)."""
    return coef * batch_scale(reduction, x.rows) / (x.cols if per_sample_mean else 1)


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


def run_terms(terms: Sequence[Term], reduction: str, need_grad, n_grads: int, grad_of: Sequence[int]):
    """Sum of terms; term i's inputs write gradient outputs grad_of[i], grad_of[i] + 1, ...
    (or ``Term.slots``). Every gradient output belongs to one input of one term,
    so each is written once, never accumulated."""
    flags = needs(need_grad, n_grads)
    ref = terms[0].x
    grads: list[Buf | None] = [None] * n_grads
    per_sample = reduction == "none"
    value = empty(ref, (ref.rows,) if per_sample else ())  # per-sample rows, or the scalar
    out_p, rows_p = (0, value.ptr) if per_sample else (value.ptr, 0)
    stream = stream_of(ref)
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
        # The engine call, positional (this path is hot for batch-256 losses).
        _C.map_reduce(
            x.device, x.device_id, stream, F[t.functor], t.params[0], t.params[1], t.params[2], t.mode, x.dtype,
            [b.ptr for b in ins], [0 if g is None else g.ptr for g in gbufs],
            x.rows, x.cols, s, out_p, int(i > 0), rows_p, 0, s, 0.0, False,
        )  # fmt: skip
    return value.arr, grads_out(grads, flags)


def one_population(name, array, reduction, functor, coef, params, mode, need_grad):
    fast = _C.fast_populations((array,), ((functor, coef, params, mode),), reduction, need_grad, True)
    if fast is not None:  # small plain CPU tensors: checked and run in one C++ call (fast_path.cpp)
        return fast
    C.reduction(reduction)
    (b,) = inputs([name], [array])
    C.batched(name, b.shape, reduction)
    return run_terms([Term(functor, b, coef, params, mode)], reduction, need_grad, 1, [0])


def two_population(names, arrays, reduction, functors, need_grad):
    fast = _C.fast_populations(arrays, functors, reduction, need_grad, False)
    if fast is not None:  # small plain CPU tensors: checked and run in one C++ call (fast_path.cpp)
        return fast
    C.reduction(reduction, C.TWO_POPULATION)
    bufs = inputs(names, arrays)
    for n, b in zip(names, bufs, strict=True):
        C.batched(n, b.shape, reduction)
    terms = [
        Term(f, b, coef, params, mode) for b, (f, coef, params, mode) in zip(bufs, functors, strict=True)
    ]
    return run_terms(terms, reduction, need_grad, len(bufs), range(len(bufs)))
