r"""``genloss verify``: the verification matrix on the user's own machine.

For every op of the registry (``genloss.registry``) and every backend available
here — the native engine on CPU, the torch op on CPU, and both on CUDA where
torch sees a GPU — draw fresh random inputs from the op's input domains, compute
the value and every gradient, and compare them with the float64 NumPy reference
(value and ``<name>_backward``). Each cell reports the worst error relative to
the tolerance of ``genloss.tolerances`` (``worst <= 1`` passes), so a wrong
kernel shows as a failing cell and a non-zero exit code.

The ops that have no record (several or integer outputs, lists of arrays, metrics returning
Python floats: ``genloss.registry.NOT_REGISTERED``) are checked the same way through their
``VerifyCase`` (``genloss.registry.VERIFY_CASES``): each output compared within the tolerance
or exactly (indices, counts), the gradient of a random weighting of the outputs against the
reference backward, with the same rows.

Every run has a seed (drawn fresh unless given) and prints it: the inputs of one op
depend only on that seed and the op's name, the same for every backend and whatever
other ops run, so ``genloss verify --seed N --ops NAME`` reruns a failing cell on
the very inputs that failed.
"""

from __future__ import annotations

import secrets
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import genloss
from genloss import registry as R
from genloss.tolerances import metrics, to_numpy, tolerance, value_scale


def _excess(
    actual: Any, expected: Any, kind: str, dtype: str, scale: float | None = None
) -> tuple[float, float]:
    """(worst |a - e| / (atol*scale + rtol*|e|), worst relative error); inf on NaN/inf mismatch."""
    rtol, atol = tolerance(kind, dtype)
    a, e = to_numpy(actual), to_numpy(expected)
    if a.shape != e.shape:
        return float("inf"), float("inf")
    with np.errstate(invalid="ignore", over="ignore"):
        if np.any(np.isnan(a) != np.isnan(e)) or np.any(np.isinf(a) & (a != e)):
            return float("inf"), float("inf")
        fin = np.isfinite(a) & np.isfinite(e)
        if not fin.any():
            return 0.0, 0.0
        s = scale if scale is not None else max(1.0, float(np.abs(e[fin]).max()))
        bound = atol * s + rtol * np.abs(e[fin])
        ratio = float((np.abs(a[fin] - e[fin]) / bound).max())
    return ratio, metrics(a[fin], e[fin])["max_abs"] / s


def _torch_call(record: R.OpRecord, inputs: tuple, kwargs: dict, dtype: str, device: str) -> tuple[Any, list]:
    import torch

    ts = []
    for a in inputs:
        t = torch.as_tensor(np.asarray(a))
        if t.dtype.is_floating_point:
            t = t.to(getattr(torch, dtype))
        t = t.to(device)
        ts.append(t)
    diff = [ts[record.arg_names.index(n)].requires_grad_(True) for n in record.differentiable]
    out = record.torch(*ts, **kwargs)  # arrays positionally; keyword ones (recon_logvar) routed
    value = out[record.value_index] if record.value_index is not None else out
    grads = torch.autograd.grad(value.sum(), diff, allow_unused=True) if diff else ()
    return value.detach(), [None if g is None else g.detach() for g in grads]


def _native_call(
    record: R.OpRecord, inputs: tuple, kwargs: dict, dtype: str, device: str
) -> tuple[Any, list]:
    if device == "cpu":
        xs = [a.astype(dtype) if a.dtype.kind == "f" else a for a in inputs]
    else:
        import torch

        xs = [
            torch.as_tensor(a).to(getattr(torch, dtype) if a.dtype.kind == "f" else torch.int64).cuda()
            for a in inputs
        ]
    native = record.native
    if native is None:
        raise TypeError(f"{record.name} has no native entry point")
    value, grads = native(*xs, **kwargs)
    return value, list(grads)


def backends() -> tuple[list[tuple[str, str, Callable]], dict[str, Any]]:
    """The backends available on this machine, as (name, device, caller), and what ran or why not.

    The status: ``{"cpu": True, "torch": True | "not installed: skipped", "cuda": "ran" |
    "not built" | "built, no device: skipped" | "built, no torch: skipped"}``.
    """
    out: list[tuple[str, str, Callable]] = [("native-cpu", "cpu", _native_call)]
    status: dict[str, Any] = {"cpu": True, "torch": True, "cuda": "not built"}
    built_cuda = bool(genloss.build_info()["cuda"])
    try:
        import torch

        import genloss.torch as _registers_the_ops  # noqa: F401
    except ImportError:
        status["torch"] = "not installed: skipped"
        if built_cuda:  # the CUDA backends take torch tensors
            status["cuda"] = "built, no torch: skipped"
        return out, status
    out.append(("torch-cpu", "cpu", _torch_call))
    if built_cuda:
        if torch.cuda.is_available():
            out += [("native-cuda", "cuda", _native_call), ("torch-cuda", "cuda", _torch_call)]
            status["cuda"] = "ran"
        else:
            status["cuda"] = "built, no device: skipped"
    return out, status


def check(
    record: R.OpRecord, backend: tuple[str, str, Callable], rng: np.random.Generator, dtypes: Sequence[str]
) -> dict:
    """One cell: every variant and reduction, float64 and float32, worst over all."""
    name, device, call = backend
    worst_v = worst_g = 0.0
    rel_v = rel_g = 0.0
    error = None
    compared = False  # whether any gradient was compared (an op without one shows "-", not 0)
    for variant in record.variants:
        record = record.at(variant)  # the arguments of this variant's call
        for reduction in record.reductions or (None,):
            for dtype in dtypes:
                inputs = R.make_inputs(record, rng, np.dtype(dtype), None, variant)
                kwargs = R.call_kwargs(record, variant, reduction)
                x64 = tuple(a.astype(np.float64) if a.dtype.kind == "f" else a for a in inputs)
                ref = record.reference(*x64, **kwargs)
                ref_v = np.asarray(ref[record.value_index] if record.value_index is not None else ref)
                ones = np.ones(ref_v.shape) if ref_v.ndim else 1.0
                backward = record.reference_backward  # not None when differentiable (registry checks)
                ref_g = (
                    backward(*x64, ones, **kwargs) if backward is not None and record.differentiable else ()
                )
                kind = "native" if name.startswith("native") else "torch"
                if device == "cuda":
                    kind = "cuda"
                try:
                    value, grads = call(record, inputs, kwargs, dtype, device)
                except Exception as err:  # a crash is a failing cell, reported by name
                    error = f"{type(err).__name__}: {err}"
                    continue
                ev, rv = _excess(value, ref_v, kind, dtype, value_scale(inputs, reduction, ref_v))
                worst_v, rel_v = max(worst_v, ev), max(rel_v, rv)
                for n, g, rg in zip(record.differentiable, grads, ref_g, strict=False):
                    if g is None:
                        continue
                    eg, rg_ = _excess(g, rg, kind, dtype, R.grad_scale(record, n, x64, reduction, rg))
                    worst_g, rel_g, compared = max(worst_g, eg), max(rel_g, rg_), True
    return _row(record.name, name, rel_v, rel_g if compared else None, worst_v, worst_g, error)


def _row(
    op: str,
    backend: str,
    rel_v: float,
    rel_g: float | None,
    worst_v: float,
    worst_g: float,
    error: str | None,
) -> dict:
    """One cell of the report (a record's or a case's); ``rel_g`` None: the op has no gradient to
    compare (the gradient fields are then None: null in the JSON, "-" in the table)."""
    return {
        "op": op,
        "backend": backend,
        "value_rel_err": rel_v,
        "grad_rel_err": rel_g,
        "value_vs_tol": worst_v,
        "grad_vs_tol": None if rel_g is None else worst_g,
        "ok": error is None and worst_v <= 1.0 and worst_g <= 1.0,
        "error": error,
    }


# ----------------------------------------------------------------------------- verify cases
# The ops with no record (R.VERIFY_CASES): the same cells, tolerances and row format as the records'.


def _cast(a: Any, dtype: str) -> Any:
    """A case argument in ``dtype``: float arrays cast, int arrays kept, lists element by element."""
    if isinstance(a, list):
        return [_cast(x, dtype) for x in a]
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.astype(dtype)
    return a


def _leaves(args: Sequence, positions: Sequence[int]) -> list:
    """The differentiable arrays, flat: each array of a list argument."""
    out: list = []
    for i in positions:
        out += args[i] if isinstance(args[i], list) else [args[i]]
    return out


def _case_torch(case: R.VerifyCase, args: tuple, kwargs: dict, dtype: str, device: str, upstream: list):
    import torch

    def tensor(a: Any) -> Any:
        if isinstance(a, list):
            return [tensor(x) for x in a]
        return torch.as_tensor(a).to(device) if isinstance(a, np.ndarray) else a

    ts = [tensor(a) for a in args]
    leaves = _leaves(ts, case.differentiable)
    for t in leaves:
        t.requires_grad_(True)
    if case.dtype_kw:
        kwargs = {**kwargs, case.dtype_kw: getattr(torch, dtype)}
    outs = case.outputs_of(case.torch_fn(*ts, **kwargs))
    grads: Sequence = ()
    # the upstream weights are aligned with the outputs (no ``post`` on a differentiable case); a missing
    # output is reported by check_case
    if leaves and len(outs) == len(upstream):
        terms = [
            (torch.as_tensor(u).to(o) * o).sum() for o, u in zip(outs, upstream, strict=True) if u is not None
        ]
        grads = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
    return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs), list(grads)


def _case_native(case: R.VerifyCase, args: tuple, kwargs: dict, dtype: str, device: str, upstream: list):
    if case.native is None:
        raise TypeError(f"{case.name} has no native entry point")
    if device != "cpu":
        import torch

        def tensor(a: Any) -> Any:
            if isinstance(a, list):
                return [tensor(x) for x in a]
            return torch.as_tensor(a).cuda() if isinstance(a, np.ndarray) else a

        args = tuple(tensor(a) for a in args)
    outs, grads = case.native(args, kwargs, upstream)
    return case.outputs_of(outs), list(grads)


def _equal_excess(actual: Any, expected: Any) -> tuple[float, float]:
    """An exact output (indices, counts): 0 when equal (NaN where NaN), inf otherwise."""
    a, e = to_numpy(actual), to_numpy(expected)
    if a.shape != e.shape:
        return float("inf"), float("inf")
    if np.array_equal(a, e, equal_nan=True):
        return 0.0, 0.0
    with np.errstate(invalid="ignore"):
        return float("inf"), float(
            np.nanmax(np.abs(a - e)) / max(1.0, float(np.nanmax(np.abs(e), initial=0.0)))
        )


def check_case(
    case: R.VerifyCase, backend: tuple[str, str, Callable], rng: np.random.Generator, dtypes: Sequence[str]
) -> dict:
    """One cell of an op without record: every call of its ``draw``, every output compared as its
    ``Out`` says, the gradient of a random weighting of the outputs vs the reference backward;
    float64 and float32; the row of :func:`check`."""
    name, device, _ = backend
    kind = "cuda" if device == "cuda" else ("native" if name.startswith("native") else "torch")
    call = _case_native if name.startswith("native") else _case_torch
    worst_v = worst_g = rel_v = rel_g = 0.0
    error = None
    compared = False
    for dtype in dtypes:
        for args, kwargs in case.draw(rng):
            args = tuple(_cast(a, dtype) for a in args)  # the backend's inputs; the reference gets
            x64 = tuple(_cast(a, "float64") for a in args)  # the same values in float64
            ref = case.outputs_of(case.reference(*x64, **kwargs))
            if case.post is not None:
                ref = case.post(x64, kwargs, ref)
            upstream = [
                rng.standard_normal(np.shape(r)) if o.grad else None
                for o, r in zip(case.outputs, ref, strict=True)
            ]
            ref_g = case.backward(x64, kwargs, upstream) if case.backward is not None else []
            try:
                outs, grads = call(case, args, kwargs, dtype, device, upstream)
                if case.post is not None:
                    outs = case.post(x64, kwargs, outs)
            except Exception as err:  # a crash is a failing cell, reported by name
                error = f"{type(err).__name__}: {err}"
                continue
            if len(outs) != len(ref) or len(grads) != len(ref_g):
                error = f"{len(outs)} outputs and {len(grads)} gradients, the reference has {len(ref)} and {len(ref_g)}"
                continue
            for o, a, e in zip(case.outputs, outs, ref, strict=True):
                e = to_numpy(e)
                if o.compare == "equal":
                    ev, rv = _equal_excess(a, e)
                else:
                    ev, rv = _excess(a, e, kind, dtype, None if o.scale is None else o.scale(x64, e))
                worst_v, rel_v = max(worst_v, ev), max(rel_v, rv)
            for g, rg in zip(grads, ref_g, strict=True):
                if g is None:  # an unused input: its gradient is zero
                    g = np.zeros(np.shape(rg))
                scale = None if case.grad_scale is None else case.grad_scale(x64, to_numpy(rg), upstream)
                eg, rg_ = _excess(g, rg, kind, dtype, scale)
                worst_g, rel_g, compared = max(worst_g, eg), max(rel_g, rg_), True
    return _row(case.name, name, rel_v, rel_g if compared else None, worst_v, worst_g, error)


def fresh_seed() -> int:
    """A seed for a run that was given none: 32 random bits, short enough to retype."""
    return secrets.randbits(32)


def op_rng(seed: int, op: str) -> np.random.Generator:
    """The generator of one op's inputs: from the run seed and the op's name only, so an op
    draws the same inputs on every backend and whether it runs alone or with the others."""
    return np.random.default_rng([seed, zlib.crc32(op.encode())])


def run_verify(seed: int | None = None, ops: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Check every op of ``ops`` (default: all) on every available backend.

    Returns ``{"seed": int, "version": str, "backends": {...} (see :func:`backends`),
    "rows": [one dict per op x backend cell], "skipped": {op: why} (ops no backend here
    runs: torch-only ops without torch)}``; ``seed=None`` draws a fresh seed, reported in
    ``"seed"``. ValueError when no op of ``ops`` can be checked here (checking nothing is
    not a pass).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    records, cases = R.RECORDS, R.VERIFY_CASES
    if ops:
        known = {r.name for r in records} | {c.name for c in cases}
        unknown = sorted(set(ops) - known)
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; known: {sorted(known)}")
        records = tuple(r for r in records if r.name in ops)
        cases = tuple(c for c in cases if c.name in ops)
    seed = fresh_seed() if seed is None else seed
    available, status = backends()
    rows = []

    def runs(op: R.OpRecord | R.VerifyCase, backend: str) -> bool:
        if not backend.startswith("native"):
            return True
        if isinstance(op, R.VerifyCase):
            return op.native is not None and (op.native_cuda or "cuda" not in backend)
        return op.native is not None

    every: tuple[R.OpRecord | R.VerifyCase, ...] = (*records, *cases)
    todo = [(op, b) for op in every for b in available if runs(op, b[0])]
    # ops no backend here can run: torch-only ops (no native kernel) when torch is missing
    skipped = {op.name: _skip_reason(status) for op in every if not any(o is op for o, _ in todo)}
    if not todo:  # checking nothing is not a pass
        names = ", ".join(skipped) or "none"
        raise ValueError(f"nothing to check: {names} {_need_torch(status, len(skipped))}")
    width = max(len(op.name) for op, _ in todo)
    for i, (op, backend) in enumerate(todo):
        if progress and sys.stderr.isatty():
            print(
                f"\r[{i + 1}/{len(todo)}] {op.name:{width}s} {backend[0]:12s}",
                end="",
                file=sys.stderr,
                flush=True,
            )
        cell = check_case if isinstance(op, R.VerifyCase) else check
        rows.append(cell(op, backend, op_rng(seed, op.name), ("float64", "float32")))  # type: ignore[arg-type]
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return {
        "seed": seed,
        "version": genloss.__version__,
        "backends": status,
        "rows": rows,
        "skipped": skipped,
    }


def _skip_reason(status: dict[str, Any]) -> str:
    return "no native kernel; torch " + (
        "not installed" if status.get("torch") is not True else "gave no backend"
    )


def _need_torch(status: dict[str, Any], n: int) -> str:
    """Why ``n`` ops had no backend, for the one-line error and the table's header."""
    have, need = ("has", "needs") if n == 1 else ("have", "need")
    why = "is not installed" if status.get("torch") is not True else "gave no backend"
    return f"{have} no native kernel and {need} torch, which {why} (pip install 'genloss[torch]')"


def reproduce_line(report: dict) -> str:
    """The command that reruns the failing cells of ``report`` on the same inputs."""
    failed = list(dict.fromkeys(r["op"] for r in report["rows"] if not r["ok"]))
    return f"reproduce: genloss verify --seed {report['seed']} --ops {' '.join(failed)}"


def _status_text(status: dict[str, Any]) -> str:
    return ", ".join(f"{k} {'ran' if v is True else v}" for k, v in status.items())


def _skipped_text(report: dict) -> str:
    """'not checked: N op(s) (names) have no native kernel and need torch, which is not installed (...)'."""
    skipped = list(report.get("skipped") or {})
    n = len(skipped)
    return f"not checked: {n} op{'s' * (n != 1)} ({', '.join(skipped)}) {_need_torch(report['backends'], n)}"


def format_table(report: dict) -> str:
    """The report of :func:`run_verify` as text: seed and backends, the op x backend table,
    then the failing cells and the command that reproduces them."""
    rows = report["rows"]
    names = sorted({r["backend"] for r in rows}, key=lambda b: ("cuda" in b, b))
    by = {(r["op"], r["backend"]): r for r in rows}
    ops = list(dict.fromkeys(r["op"] for r in rows))
    width = max([len("op"), *(len(op) for op in ops)])  # the longest name, not a guess at it
    skipped = report.get("skipped") or {}
    head = f"{'op':{width}s} " + " ".join(f"{b:>24s}" for b in names)
    lines = [
        f"genloss {report['version']} verify, seed {report['seed']}; backends: {_status_text(report['backends'])}",
    ]
    if skipped:
        lines.append(_skipped_text(report))
    lines += [
        "worst relative error of value / gradient vs the float64 reference (f32 and f64 inputs)",
        head,
    ]
    for op in ops:
        cells = []
        for b in names:
            r = by.get((op, b))
            if r is None:
                cells.append(f"{'-':>24s}")
            elif r["error"]:
                cells.append(f"{'ERROR':>24s}")
            else:
                mark = "ok " if r["ok"] else "FAIL"
                grad = "-" if r["grad_rel_err"] is None else f"{r['grad_rel_err']:7.1e}"
                cells.append(f"{r['value_rel_err']:9.1e} / {grad:>7s} {mark}")
        lines.append(f"{op:{width}s} " + " ".join(cells))
    bad = [r for r in rows if not r["ok"]]
    summary = f"{len(rows) - len(bad)} of {len(rows)} cells pass"
    if skipped:
        summary += f" ({len(skipped)} op{'s' * (len(skipped) != 1)} skipped: no native kernel, no torch)"
    lines.append(summary + (":" if bad else "."))
    for r in bad:
        grad = "" if r["grad_vs_tol"] is None else f", gradient {r['grad_vs_tol']:.3g}x tol"
        why = r["error"] or f"value {r['value_vs_tol']:.3g}x tol{grad}"
        lines.append(f"  FAIL {r['op']} on {r['backend']}: {why}")
    if bad:
        lines.append(reproduce_line(report))
    return "\n".join(lines)
