"""The one torch glue of genloss: turns a native loss into ``torch.ops.genloss.<name>``.

Per loss, two ops in the ``genloss`` namespace:

* ``<name>_fwd(<args>, bool[] need_grad) -> (Tensor value, Tensor?[] grads)``: the
  primitive. CPU and CUDA kernels call ``genloss.native`` (one fused pass that
  writes the value and, when asked, every gradient); a fake kernel gives shapes
  to ``torch.compile``. It is not differentiable itself.
* ``<name>(<args>) -> Tensor``: the public op, a CompositeImplicitAutograd
  kernel that runs ONE ``torch.autograd.Function`` around the kernel: forward asks
  for the gradients only of the inputs that need them (none under ``no_grad``),
  backward scales them by ``grad_output``. No math here.

Only public torch APIs are used (``torch.library``, ``torch.autograd.Function``
with ``setup_context``, ``torch.compiler``). The Function's forward calls the
native kernel directly on plain CPU/CUDA tensors (no dispatcher hop) and goes
through ``<name>_fwd`` for anything else (fake, functional or subclass tensors,
``torch.compile``), so tracing sees the op.

The differentiable arguments come from the op's record in ``genloss.registry``
(one source of truth). A floating input that requires grad but is not
differentiable raises a ValueError at forward time naming it: never a silently
missing gradient.

Low precision: float16/bfloat16 inputs are computed in float32 (the value is
float32, gradients come back in the input's dtype), as torch's autocast does
for its own losses. bfloat16 tensors of an eager call go to the kernels as they
are (loaded as bfloat16, computed in float32, the value written in float32, the
gradients in bfloat16: no widened copies), where the op's kernels can write a
float32 value; the others, and float16, whose gradients must be scaled by the
upstream gradient (a loss scale) before they are rounded, run on float32
copies. Double backward raises a clear error (the saved gradients
are not functions of the inputs in the autograd graph).

``torch.func``: ``grad``/``vjp`` take the setup_context form of the Function; ``vmap`` (and
``jacrev``, per-sample gradients ``vmap(grad(...))``) runs the op once per batch entry (the
Function's ``vmap`` staticmethod; ``<name>_fwd`` has a vmap rule too, for its direct calls),
since vmap's batched tensors have no memory for the kernels to read; ``jvp``/``jacfwd`` of a
scalar value is the gradients' inner product with the tangents.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._checks import name_error, named_errors, register_op_name
from ..native import _engine
from ..native._engine import check_copy_size

lib = torch.library.Library("genloss", "DEF")

_LOW = (torch.float16, torch.bfloat16)
_PARAM = re.compile(r"^\s*(\w+(?:\[\])?\??)\s+(\w+)(?:\s*=\s*(.+))?\s*$")
_DEFAULTS = {"True": True, "False": False, "None": None}


def eager_checks(x: torch.Tensor) -> bool:
    """Whether a check of the data of ``x`` (which reads values back to the host) may run: not
    while torch.compile traces, and on CUDA not with ``genloss.native.options(check_data=False)``
    nor while a CUDA graph is captured on the current stream (its eager warm-up call runs the
    checks; a replay runs no Python, so replayed data is not checked), nor under a torch.func
    transform (vmap's batched tensors cannot be read back; grad's wrappers are skipped alike, as
    a tensor without memory is all either shows). CPU data is always checked: there a check
    costs no wait."""
    if torch.compiler.is_compiling() or not has_storage(x):
        return False
    return not x.is_cuda or (_engine._check_data and not torch.cuda.is_current_stream_capturing())


def has_storage(x: torch.Tensor) -> bool:
    """Whether ``x`` holds memory: False for torch.func's wrappers (vmap's batched tensors, grad's)."""
    try:
        x.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def float_dtype(op: str, dtype: Any) -> torch.dtype:
    """``dtype`` when it is a floating torch.dtype; else a TypeError naming the op (an integer
    dtype for weights, times or codes would truncate them)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{op}: dtype must be a floating torch.dtype, got {dtype}")
    return dtype


def device_arg(op: str, device: Any) -> torch.device | None:
    """``device`` as a torch.device (None stays None). A string torch cannot parse ('gpu', 'cdua')
    was torch's RuntimeError listing every backend; here it is a ValueError naming the op."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(
            f"{op}: device must be a torch.device, a string or an int, got {type(device).__name__}"
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{op}: device must name a torch device (such as 'cpu' or 'cuda:0'), got {device!r}"
        ) from None


def _requiring_grad(tensors: Sequence[Any]) -> list:
    """The tensors among ``tensors`` that require grad (a plain loop: dynamo traces this code)."""
    out = []
    for a in tensors:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            out.append(a)
    return out


def refuse_capture(x: torch.Tensor, op: str, why: str) -> None:
    """ValueError, before anything runs, when ``x`` is a CUDA tensor and a CUDA graph is captured
    on the current stream, for an op that must read device data back on the host (``why``): the
    read-back would fail in the CUDA runtime and invalidate the whole capture."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{op}: {why}, which CUDA graph capture forbids")


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def kept(like: torch.Tensor) -> bool:
    """Whether a constant kept from an earlier call may serve a call on ``like``: an ordinary
    tensor outside tracing (a fake or traced one needs constants made in its own mode)."""
    return type(like) is torch.Tensor and not torch.compiler.is_compiling()


def kept_on(cache: dict, key: Any, like: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, a constant on ``like``'s device, made once per (key, device) and kept in
    ``cache``: a host-to-device copy on every call costs a transfer each time, and CUDA graph
    capture refuses it. Made outside inference mode (an inference tensor could not be saved
    for a later backward); only for ordinary tensors (``kept``). Callers never modify it."""
    if not kept(like):
        return make()
    k = (key, like.device)
    hit = cache.get(k)
    if hit is None:
        with torch.inference_mode(False):
            hit = cache[k] = make()
    return hit


def device_constant(values: tuple, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A small constant made of hyperparameters (FSQ levels, per-channel bounds) on ``like``'s
    device (``kept_on``)."""
    return kept_on(
        _CONSTANTS, (values, dtype), like, lambda: torch.tensor(values, dtype=dtype, device=like.device)
    )


def _parse(schema: str) -> list[tuple[str, str, Any, bool]]:
    """[(type, name, default, has_default)] of a schema argument list."""
    out = []
    for part in schema.split(","):
        m = _PARAM.match(part)
        if m is None:
            raise ValueError(f"bad schema argument {part!r}")
        typ, name, default = m.groups()
        if default is None:
            out.append((typ, name, None, False))
            continue
        if default in _DEFAULTS:
            value: Any = _DEFAULTS[default]
        elif default[0] in "'\"":
            value = default[1:-1]
        else:
            value = float(default) if typ == "float" else int(default)
        out.append((typ, name, value, True))
    return out


def _layout_free(name: str) -> bool:
    """The op's registry record says it is ``layout_free`` (an op without a record: no)."""
    from .. import registry

    try:
        return registry.by_name(name).layout_free
    except KeyError:
        return False


def dense_order(tensors: Sequence[Any]) -> list[int] | None:
    """The dims order ``p`` (batch first) that makes every tensor of 2 or more dims in
    ``tensors`` a contiguous ``t.permute(p)``, when they share one non-contiguous dense layout
    (channels_last, or any permutation of the non-batch dims; their batch sizes may differ);
    None when one is contiguous already, or their layouts differ, or one is not dense (a
    broadcast or sliced view): those are copied as before."""
    ref = None
    p: list[int] = []
    for t in tensors:
        if t is None or t.ndim < 2:
            continue
        if ref is None:
            if t.is_contiguous():
                return None
            st = t.stride()
            p = [0, *sorted(range(1, t.ndim), key=lambda d: (-st[d], d))]
            ref = t
        elif t.ndim != ref.ndim or t.shape[1:] != ref.shape[1:] or t.stride()[1:] != ref.stride()[1:]:
            return None
        if not t.permute(p).is_contiguous():
            return None
    return p if ref is not None else None


def record_differentiable(name: str) -> tuple[str, ...]:
    """The differentiable arguments of op ``name`` as its registry record states them."""
    from .. import registry

    return registry.by_name(name).differentiable


_SCHEMA_TYPES = {"real": "float", "flag": "bool", "choice": "str", "int": "int", "bandwidths": "float[]?"}


def _schema_default(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"no schema literal for the default {value!r}")


def schema_of(name: str) -> str:
    """The torch schema argument list of op ``name``, generated from its registry record and
    its reference's signature: arrays are Tensors (optional ones ``Tensor?``), hyperparameters
    take their kind's type, and the defaults are the reference's."""
    from .. import registry

    rec = registry.by_name(name)
    arrays = {a.name: a for a in rec.args}
    hypers = {h.name: h for h in rec.hypers}
    parts = []
    for p in inspect.signature(registry.raw(rec.reference)).parameters.values():
        if p.name in arrays:
            typ = "Tensor?" if arrays[p.name].optional or p.default is None else "Tensor"
        elif p.name == "reduction":
            typ = "str"
        elif p.name in hypers:
            typ = _SCHEMA_TYPES[hypers[p.name].kind]
        else:
            raise ValueError(f"{name}: the reference argument {p.name!r} is not declared in its record")
        if p.default is None and not typ.endswith("?"):  # a hyperparameter that may be left out
            typ += "?"
        default = "" if p.default is inspect.Parameter.empty else "=" + _schema_default(p.default)
        parts.append(f"{typ} {p.name}{default}")
    return ", ".join(parts)


def reference_doc(name: str) -> str:
    """The docstring of ``genloss.reference.<name>`` (the rich one), or ''."""
    from .. import reference

    fn = getattr(reference, name, None)
    return (fn.__doc__ or "") if fn is not None else ""


def with_reference_doc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: ``fn``'s own docstring (the torch specifics), then the reference's."""
    ref = reference_doc(fn.__name__)
    if ref:
        fn.__doc__ = (fn.__doc__ or "").rstrip() + (
            f"\n\n    The NumPy reference (``genloss.reference.{fn.__name__}``):\n\n    " + ref.strip()
        )
    return fn


class _RejectDoubleBackward(torch.autograd.Function):
    """Passes a gradient through and raises if anyone differentiates it again.

    Its inputs are the gradient and every differentiable input of the op, so the node
    has an edge back to each: ``.backward()`` and ``torch.autograd.grad(..., inputs)``
    reach it and raise, for the same input and across inputs (d/dy of dL/dx), instead
    of finding no path and returning zeros (or None with ``allow_unused``).
    """

    generate_vmap_rule = True  # a view: vmap runs it per batch as it is

    @staticmethod
    def forward(grad: torch.Tensor, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.name = inputs[1]

    @staticmethod
    def backward(ctx: Any, _grad: torch.Tensor) -> tuple:
        raise RuntimeError(
            f"genloss.{ctx.name}: double backward is not supported (its backward reuses gradients "
            f"computed by the fused forward kernel); compose the loss from torch ops if you need "
            f"second derivatives"
        )


def once_differentiable_grads(name: str, grads: Sequence[Any], inputs: Sequence[Any]) -> tuple:
    """The gradients an autograd.Function's backward computed (without a graph), each made to
    raise 'double backward' if differentiated again: in the backward of a create_graph=True
    pass (grad mode on there) they are linked to every input that requires grad. torch's
    ``once_differentiable`` raises only when the incoming gradient requires grad; when it
    does not (a gradient penalty's first derivatives), the second derivative was silently 0."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return tuple(grads)
    linked = _requiring_grad(inputs)
    return tuple(
        g if not isinstance(g, torch.Tensor) else _RejectDoubleBackward.apply(g.detach(), name, *linked)
        for g in grads
    )


TRACED, PLAIN, LOW = 0, 1, 2  # LossOp.route
_LIVE: dict[str, LossOp] = {}  # name -> op, for the autograd Functions (see LossOp._function)


class LossOp:
    """One loss: its schema, its native implementation, its differentiable args.

    ``differentiable``: None takes them from the op's registry record.
    ``prepare`` (torch ops, differentiable) runs before the kernel, e.g. to
    broadcast a log-variance so autograd sums its gradient back to its shape.
    ``elementwise``: the value has the inputs' shape (no reduction).
    ``shared_params``: some differentiable inputs are shared by all samples, so a
    'none' reduction cannot scale saved gradients per sample; its backward
    re-runs the kernel with per-sample weights (``<name>_wfwd``).
    ``value_like``: the value has the shape of this argument (an elementwise map
    whose other inputs, e.g. a per-step table, do not broadcast with it).
    ``constants``: tensor arguments that never require grad (a schedule's table).
    """

    def __init__(
        self,
        name: str,
        schema: str,
        native: Callable[..., tuple[Any, tuple]],
        differentiable: Sequence[str] | None = None,
        doc: str | None = None,
        prepare: Callable[[list], list] | None = None,
        elementwise: bool = False,
        shared_params: bool = False,
        value_like: str | None = None,
        constants: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.args = _parse(schema)
        self.names = [a[1] for a in self.args]
        if differentiable is None:
            differentiable = record_differentiable(name)
        self.tensor_idx = [i for i, a in enumerate(self.args) if a[0].startswith("Tensor")]
        self.optional = {i for i, a in enumerate(self.args) if a[0] == "Tensor?"}
        self.diff_idx = [self.names.index(n) for n in differentiable]
        # tensor inputs with no gradient: requiring one is an error, named at forward time
        self.fixed_idx = [
            i for i in self.tensor_idx if i not in self.diff_idx and self.names[i] not in constants
        ]
        self.red_idx = self.names.index("reduction") if "reduction" in self.names else None
        # channels_last (any dense permuted layout) inputs as permuted contiguous views, not copies
        self.data_idx = [i for i in self.tensor_idx if self.names[i] not in constants]
        self.layout_free = bool(self.data_idx) and _layout_free(name)
        # the native function itself, not its op_errors wrapper: the public function names the op
        self.native = getattr(native, "__wrapped__", native)
        self.prepare = prepare
        self.elementwise = elementwise or value_like is not None
        self.value_like = None if value_like is None else self.names.index(value_like)
        self.shared_params = shared_params
        # Absent optional differentiable inputs have no gradient slot in the native call.
        self.optional_diff = any(i in self.optional for i in self.diff_idx)
        # forward may call the native function as it is (need is a tuple, one slot per input)
        self.direct = not self.optional_diff and not shared_params
        self.n_diff = len(self.diff_idx)
        self.no_need = (False,) * self.n_diff
        self.tensor_slots = [(i, i in self.optional) for i in self.tensor_idx]
        self.other_idx = [i for i in range(len(self.args)) if i not in self.tensor_idx]
        self.n_required = sum(not a[3] for a in self.args)
        self.default_values = [a[2] for a in self.args]  # required args come first (schema rule)
        # A backward that hands the gradients over as they are: one slot per argument.
        self.diff_first = self.diff_idx == list(range(self.n_diff))
        # backward may hand the gradients over as they are (a scalar loss, one slot per input)
        self.unit_ok = self.diff_first and not self.elementwise
        k = len(self.tensor_idx)
        self.split = k if self.tensor_idx == list(range(k)) else None
        self.lean = self.direct and self.split is not None  # forward_setup's one-step case
        # bfloat16 inputs go to the kernels as they are (see _native); turned off for good the
        # first time the op's kernels cannot write its value in float32
        self.bf16_direct = not self.elementwise and not shared_params
        self.none_tail = (None,) * (len(self.args) - self.n_diff + 2)  # + the need and route slots
        plain = ", ".join(f"{a[0]} {a[1]}" for a in self.args)  # no defaults: need_grad follows
        lib.define(f"{name}_fwd({plain}, bool[] need_grad) -> (Tensor, Tensor?[])")
        lib.define(f"{name}({schema}) -> Tensor")
        lib.impl(f"{name}_fwd", self._kernel, "CPU")
        lib.impl(f"{name}_fwd", self._kernel, "CUDA")
        torch.library.register_fake(f"genloss::{name}_fwd", self._fake, lib=lib)
        torch.library.register_vmap(f"genloss::{name}_fwd", self._vmap, lib=lib)
        if shared_params:
            lib.define(f"{name}_wfwd({plain}, Tensor row_weights, bool[] need_grad) -> (Tensor, Tensor?[])")
            lib.impl(f"{name}_wfwd", self._wkernel, "CPU")
            lib.impl(f"{name}_wfwd", self._wkernel, "CUDA")
            torch.library.register_fake(f"genloss::{name}_wfwd", self._wfake, lib=lib)
            torch.library.register_vmap(f"genloss::{name}_wfwd", self._vmap, lib=lib)
            self.wfwd = getattr(torch.ops.genloss, f"{name}_wfwd").default
        lib.impl(name, self.__call__, "CompositeImplicitAutograd")
        self.fwd = getattr(torch.ops.genloss, f"{name}_fwd").default
        _LIVE[name] = self
        self.fn, self.fn_transforms = self._functions()
        self.apply = self.fn.apply
        self.__doc__ = doc if doc is not None else reference_doc(name)
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    n,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=d if has else inspect.Parameter.empty,
                    annotation="torch.Tensor | None"
                    if t == "Tensor?"
                    else ("torch.Tensor" if t == "Tensor" else t),
                )
                for t, n, d, has in self.args
            ],
            return_annotation="torch.Tensor",
        )

    # -- the primitive ----------------------------------------------------------
    def _native(
        self, args: Sequence[Any], need_grad: Sequence[bool], direct: bool = False, **extra: Any
    ) -> tuple[Any, Sequence]:
        """The native function; float16/bfloat16 tensors computed in float32. ``direct`` (an
        eager call): bfloat16 tensors are passed as they are where the op's kernels write a
        float32 value (``_engine.float32_values``); the same value, and gradients rounded once
        from the same float32 numbers, without the float32 copies."""
        if direct and self.bf16_direct and not extra and self._all_bf16(args):
            try:
                with _engine.float32_values():
                    value, grads = self._call(args, tuple(need_grad))
                if value.dtype == torch.float32:
                    return value, grads
            except TypeError:  # a kernel that writes its value in bfloat16 only
                pass
            value, grads = self._native(args, need_grad)  # user errors are raised here, as always
            self.bf16_direct = False  # and it is not tried again for this op
            return value, grads
        for i in self.tensor_idx:
            a = args[i]
            if a is not None and a.dtype in _LOW:
                # the float32 copies must fit: a broadcast view of a few bytes can be terabytes
                with named_errors(self.name):
                    for j in self.tensor_idx:
                        b = args[j]
                        if isinstance(b, torch.Tensor) and b.dtype in _LOW:
                            check_copy_size(
                                self.names[j], b.shape, 4, f"a {b.dtype} tensor (computed in float32)"
                            )
                args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in _LOW else a for a in args]
                break
        return self._call(args, tuple(need_grad), **extra)

    def _all_bf16(self, args: Sequence[Any]) -> bool:
        """Every floating tensor argument is bfloat16 (a float16 one, or a float32 table, is not)."""
        for i in self.tensor_idx:
            a = args[i]
            if a is not None and a.is_floating_point() and a.dtype != torch.bfloat16:
                return False
        return True

    def _call(self, args: Sequence[Any], need_grad: tuple, **extra: Any) -> tuple[Any, Sequence]:
        """The native function on float32/float64 arguments; one gradient slot per differentiable arg."""
        if not self.optional_diff:
            return self.native(*args, need_grad=need_grad, **extra)
        # Absent optional inputs have no gradient slot in the native call.
        present = [n for i, n in zip(self.diff_idx, need_grad, strict=True) if args[i] is not None]
        value, grads = self.native(*args, need_grad=tuple(present), **extra)
        if not grads:
            return value, []
        it = iter(grads)
        return value, [next(it) if args[i] is not None else None for i in self.diff_idx]

    def _kernel(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, need_grad = args  # type: ignore[assignment]
        value, grads = self._native(args, need_grad)
        return value, list(grads)

    def _wkernel(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, row_weights, need_grad = args  # type: ignore[assignment]
        first = args[self.tensor_idx[0]]  # the kernel computes in float32 for float16/bfloat16 inputs
        dt = torch.float32 if first.dtype in _LOW else first.dtype
        value, grads = self._native(args, need_grad, row_weights=row_weights.to(dt))
        return value, list(grads)

    def _fake(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, need_grad = args  # type: ignore[assignment]
        first = args[self.tensor_idx[0]]
        dt = torch.float32 if first.dtype in _LOW else first.dtype
        if self.value_like is not None:
            shape: tuple = tuple(args[self.value_like].shape)
        elif self.elementwise:  # the kernel broadcasts its inputs (NumPy rules)
            shapes = [args[i].shape for i in self.tensor_idx if args[i] is not None]
            shape = tuple(torch.broadcast_shapes(*shapes))
        elif self.red_idx is not None and args[self.red_idx] == "none":
            shape = (first.shape[0],)
        else:
            shape = ()
        value = first.new_empty(shape, dtype=dt)
        if not any(need_grad):
            return value, []
        grads = [
            args[i].new_empty(args[i].shape, dtype=dt) if n and args[i] is not None else None
            for i, n in zip(self.diff_idx, need_grad, strict=True)
        ]
        return value, grads

    def _vmap(self, info: Any, in_dims: tuple, *args: Any) -> tuple:
        """``torch.func.vmap`` of ``<name>_fwd`` (or ``_wfwd``): the op once per batch entry, stacked.
        The kernels read real memory, which vmap's batched tensors do not have; each entry is an
        ordinary slice. A loop of B calls: for speed, give the op the whole batch instead
        (reduction='none' gives per-sample losses)."""
        *ins, need_grad = args
        dims = in_dims[:-1]
        fwd = self.fwd if len(ins) == len(self.args) else self.wfwd
        values, grads = [], []
        for b in range(info.batch_size):
            v, g = fwd(
                *[a if d is None else a.select(d, b) for a, d in zip(ins, dims, strict=True)], need_grad
            )
            values.append(v)
            grads.append(g)
        stacked = [
            None if grads[0][k] is None else torch.stack([g[k] for g in grads]) for k in range(len(grads[0]))
        ]
        return (torch.stack(values), stacked), (0, [None if g is None else 0 for g in stacked])

    def vmap_forward(self, info: Any, in_dims: tuple, inputs: Sequence[Any]) -> tuple:
        """FnT under torch.func.vmap: ``forward`` once per batch entry, stacked. The entries are
        ordinary slices, so each goes to the kernel directly (routed as an eager call), without
        torch's generated rule (about 1 ms of pytree work a call) or a dispatcher hop."""
        dims = in_dims[:-2]
        outs = []
        for b in range(info.batch_size):
            sl = [a if d is None else a.select(d, b) for a, d in zip(inputs[:-2], dims, strict=True)]
            # (under a nested vmap a slice is still batched: through <name>_fwd and its rule)
            route = TRACED if _wrapped(sl, self.tensor_idx, self) else self.route(sl)
            value, grads = self.forward((*sl, inputs[-2], route))
            outs.append((value, *grads))
        stacked = tuple(
            None if outs[0][k] is None else torch.stack([o[k] for o in outs]) for k in range(len(outs[0]))
        )
        return stacked, tuple(None if s is None else 0 for s in stacked)

    def _wfake(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, _row_weights, need_grad = args  # type: ignore[assignment]
        return self._fake(*args, need_grad)

    def route(self, args: Sequence[Any]) -> int:
        """TRACED: through ``<name>_fwd`` (fake, functional and other subclass tensors, a
        non-tensor argument (whose error the op's checks give), anything under
        ``torch.compile``); PLAIN: the native kernel directly; LOW: the same with a
        float16/bfloat16 input, computed in float32."""
        if torch.compiler.is_compiling():
            return TRACED
        if torch.jit.is_tracing():  # it recorded the native call's bookkeeping: garbage on replay
            raise RuntimeError(
                f"{self.name}: torch.jit.trace cannot record genloss's fused ops (a trace made without its "
                f"check returned garbage); use torch.export.export or torch.compile, which record the op"
            )
        code = PLAIN
        for i, optional in self.tensor_slots:
            a = args[i]
            if type(a) is torch.Tensor:
                if a.dtype in _LOW:
                    code = LOW
            elif not (a is None and optional):
                return TRACED
        return code

    def run(self, args: Sequence[Any], need: Sequence[bool], route: int) -> tuple[Any, Sequence]:
        """(value, grads): directly, or through ``<name>_fwd``."""
        if route == PLAIN:
            return self._call(args, tuple(need))
        if route == LOW:
            return self._native(args, need, direct=True)
        return self.fwd(*args, list(need))

    # -- autograd -----------------------------------------------------------------
    def _functions(self) -> tuple[type[torch.autograd.Function], type[torch.autograd.Function]]:
        """The one autograd path, in two shells of the same three steps (``forward``, ``setup``,
        ``backward`` below; ``Fn`` runs the first two as ``forward_setup``): ``Fn`` in the
        classic form (ctx in forward), which ``Function.apply`` runs without binding its
        arguments by signature on every call (the cost of a batch-256 loss is Python
        overhead), and ``FnT`` in the setup_context form,
        which functorch transforms (``torch.func.grad``, ``vjp``) require; ``Fn.apply`` refuses
        to run under a transform and ``__call__`` then takes ``FnT``."""
        name = self.name  # the op is looked up in a module global: Dynamo traces forward,
        # setup_context and backward through a wrapper, where a closure over the op has no source

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *inputs: Any) -> torch.Tensor:
                return _LIVE[name].forward_setup(ctx, inputs)

            @staticmethod
            def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
                return _LIVE[name].backward(ctx, grad_output)

        class FnT(torch.autograd.Function):
            @staticmethod
            def vmap(info: Any, in_dims: tuple, *inputs: Any) -> tuple:
                return _LIVE[name].vmap_forward(info, in_dims, inputs)

            @staticmethod
            def forward(*inputs: Any) -> tuple:
                value, grads = _LIVE[name].forward(inputs)
                return (value, *grads)

            @staticmethod
            def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
                grads = [g for g in output[1:] if g is not None]
                if grads:
                    ctx.mark_non_differentiable(*grads)
                _LIVE[name].setup(ctx, inputs, output[1:])

            @staticmethod
            def backward(ctx: Any, grad_output: torch.Tensor, *_ignored: Any) -> tuple:
                return _LIVE[name].backward(ctx, grad_output)

            @staticmethod
            def jvp(ctx: Any, *tangents: Any) -> tuple:
                return _LIVE[name].jvp(ctx, tangents)

        Fn.__name__ = f"{self.name}_autograd"
        FnT.__name__ = f"{self.name}_autograd_transforms"
        return Fn, FnT

    def forward(self, inputs: Sequence[Any]) -> tuple[Any, Sequence]:
        """The kernel, asked for the gradients the caller's ``need`` flags name (the inputs end
        with ``need`` and the route). Per-sample losses with shared parameters ask for none:
        their gradients need the per-sample grad_output as row weights, so backward re-runs
        the kernel."""
        args, need, route = inputs[:-2], inputs[-2], inputs[-1]
        if route == PLAIN and self.direct:  # the common case, with the fewest Python calls
            return self.native(*args, need_grad=need)
        if self.shared_params and self.red_idx is not None and args[self.red_idx] == "none":
            need = (False,) * self.n_diff
        return self.run(args, need, route)

    def forward_setup(self, ctx: Any, inputs: Sequence[Any]) -> torch.Tensor:
        """``forward`` then ``setup``, in one step for the common case (a plain call, tensors
        first): what ``setup`` would store, without computing it twice."""
        args, need, route = inputs[:-2], inputs[-2], inputs[-1]
        if route == PLAIN and self.lean:
            value, grads = self.native(*args, need_grad=need)
            per_sample = self.red_idx is not None and args[self.red_idx] == "none"
            ctx.grads = grads or None  # as setup does, and setup's ctx.st layout:
            ctx.st = (  # (unit, need, route, per_sample, rerun, dtypes, others, n_grads)
                self.unit_ok and not per_sample,
                need,
                PLAIN,
                per_sample,
                False,
                None,
                args[self.split :],
                0,
            )
            ctx.save_for_backward(*args[: self.split])
            return value
        value, grads = self.forward(inputs)
        self.setup(ctx, inputs, grads)
        return value

    def setup(self, ctx: Any, inputs: Sequence[Any], grads: Sequence[Any]) -> None:
        """What backward needs, in one tuple ``ctx.st`` (one attribute set: a batch-256 loss
        costs about as much as its Python steps) and the gradients in ``ctx.grads``."""
        args, need, route = inputs[:-2], inputs[-2], inputs[-1]
        per_sample = self.red_idx is not None and args[self.red_idx] == "none"
        rerun = self.shared_params and per_sample
        # gradients come back in the inputs' dtypes (float16/bfloat16 are computed in float32)
        dtypes = (
            None if route == PLAIN else [None if args[i] is None else args[i].dtype for i in self.diff_idx]
        )
        if self.split is not None:  # tensors first, then the rest: two slices
            tensors, others = args[: self.split], args[self.split :]
        else:
            tensors = [args[i] for i in self.tensor_idx]
            others = [args[i] for i in self.other_idx]
        # backward may hand the saved gradients over as they are when grad_output is 1, if they
        # are in the inputs' dtypes (a float16/bfloat16 call: when it went straight to the kernels)
        unit = self.unit_ok and not per_sample
        if unit and route != PLAIN:
            unit = route == LOW and all(
                g is None or g.dtype == args[i].dtype for g, i in zip(grads, self.diff_idx, strict=False)
            )
        # The gradients of a direct call wait on ctx, not in save_for_backward, so the first
        # backward hands them to autograd as the only reference: AccumulateGrad adopts them
        # instead of copying (a 64 MiB copy per input of an image loss). Traced calls (and
        # re-runs) keep everything in save_for_backward: n_grads of them after the inputs.
        direct = route != TRACED and not rerun
        ctx.grads = (grads or None) if direct else None
        n_grads = 0 if direct else len(grads)
        ctx.st = (unit, need, route, per_sample, rerun, dtypes, others, n_grads)
        ctx.save_for_backward(*tensors, *([] if direct else grads))
        if route == TRACED and not torch.compiler.is_compiling():  # for jvp (torch.func's wrappers)
            ctx.save_for_forward(*grads)

    def backward(self, ctx: Any, grad_output: torch.Tensor) -> tuple:
        grads = ctx.grads
        st = ctx.st
        if grads is not None:  # the first backward of a direct call
            ctx.grads = None
            if (  # loss.backward() on a CPU scalar loss: the gradients as they are
                st[0]
                and type(grad_output) is torch.Tensor
                and grad_output.is_cpu
                and not torch.is_grad_enabled()
                and grad_output.item() == 1.0
            ):
                return (*grads, *self.none_tail)
        _unit, need, route, _per_sample, rerun, _dtypes, others, n_grads = st
        nt = len(self.tensor_idx)
        saved = ctx.saved_tensors
        args = self.inputs_of(others, saved[:nt])
        if rerun:
            _, grads = self.wfwd(*args, grad_output, list(need))
            return self.finish_backward(ctx, grads, None, args)
        if route == TRACED:
            grads = saved[nt : nt + n_grads]
        elif grads is None:  # the graph was retained and is run again: same bits
            _, grads = self.run(args, need, route)
        return self.finish_backward(ctx, grads, grad_output, args)

    def jvp(self, ctx: Any, tangents: Sequence[Any]) -> tuple:
        """Forward mode for a scalar value: the tangent sum_k <dL/dx_k, t_k> from the gradients the
        kernel computed (``call`` asks for every one on a transform's wrappers). A per-sample or
        elementwise value would need per-entry derivatives the kernel sums away: refused."""
        per_sample = ctx.st[3]
        if per_sample or self.elementwise:
            raise NotImplementedError(
                f"{self.name}: forward-mode AD (torch.func.jvp, jacfwd) takes a scalar value (reduction "
                f"'mean' or 'sum'); this call's value is per-sample or elementwise"
            )
        grads = ctx.saved_tensors
        total = None
        for i in self.tensor_idx:
            t = tangents[i]
            if t is None:
                continue
            if i not in self.diff_idx:  # torch.func passes zeros for the inputs that are not primals
                if bool(t.ne(0).any()):  # (a read-back: forward mode is not a training hot path)
                    raise ValueError(f"{self.name}: {self.names[i]} is not differentiable; it has no tangent")
                continue
            g = grads[self.diff_idx.index(i)]
            term = (g * t).sum()
            total = term if total is None else total + term
        return (total, *([None] * len(grads)))

    def inputs_of(self, others: Sequence[Any], tensors: Sequence[Any]) -> list:
        """The arguments of the forward call (unpacking raises if one was modified in place)."""
        if self.split is not None:
            return [*tensors, *others]
        args: list = [None] * len(self.args)
        for i, a in zip(self.other_idx, others, strict=True):
            args[i] = a
        for i, t in zip(self.tensor_idx, tensors, strict=True):
            args[i] = t
        return args

    def finish_backward(
        self, ctx: Any, grads: Sequence, grad_output: torch.Tensor | None, args: Sequence[Any]
    ) -> tuple[torch.Tensor | None, ...]:
        """The gradients of every argument: the saved ones times grad_output (None: as they are)."""
        out: list[torch.Tensor | None] = [None] * (len(self.args) + 2)
        _unit, _need, route, per_sample, _rerun, dtypes, _others, _n = ctx.st
        # (not TRACED: a traced or vmapped grad_output has no value to compare with 1 here)
        if grad_output is not None and route != TRACED and self.is_unit(grad_output, per_sample):
            # d loss/d grad_output = 1 exactly (loss.backward() on a CPU scalar):
            # hand the saved gradient over instead of a multiply pass.
            grad_output = None
        nig = ctx.needs_input_grad
        twice = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        linked = (
            _requiring_grad([args[j] for j in self.diff_idx]) if twice else []
        )  # every input of the gradients
        for k, i in enumerate(self.diff_idx):
            g = grads[k] if k < len(grads) else None
            if g is None or not nig[i]:
                continue
            if grad_output is not None:
                if per_sample:
                    g = g * grad_output.reshape((-1,) + (1,) * (g.dim() - 1))
                else:  # scalar, or elementwise (same shape)
                    g = g * grad_output
            if dtypes is not None and g.dtype != dtypes[k]:
                g = g.to(dtypes[k])
            if twice:  # create_graph: differentiating this gradient again must raise
                g = _RejectDoubleBackward.apply(g.detach(), self.name, *linked)
            out[i] = g
        return tuple(out)

    def is_unit(self, grad_output: torch.Tensor, per_sample: bool) -> bool:
        """grad_output is exactly 1 on a CPU scalar loss (outside any tracing)."""
        return (
            not per_sample
            and not self.elementwise
            and type(grad_output) is torch.Tensor  # not a fake/functional/traced tensor
            and grad_output.is_cpu
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and grad_output.item() == 1.0
        )

    # -- the public call ------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> list:
        """The arguments in schema order, defaults filled in; a TypeError names what is wrong."""
        if len(args) > len(self.args):
            raise TypeError(f"{self.name}() takes {len(self.args)} arguments, got {len(args)}")
        out = list(args)
        for _typ, name, default, has_default in self.args[len(args) :]:
            if name in kwargs:
                out.append(kwargs.pop(name))
            elif has_default:
                out.append(default)
            else:
                raise TypeError(f"{self.name}() missing required argument {name!r}")
        if kwargs:
            dup = sorted(k for k in kwargs if k in self.names)
            if dup:
                raise TypeError(f"{self.name}() got multiple values for argument(s) {dup}")
            raise TypeError(f"{self.name}() got unexpected keyword argument(s) {sorted(kwargs)}")
        self.check_tensors(out)
        return out

    def check_tensors(self, out: Sequence[Any]) -> None:
        for i in self.tensor_idx:
            if out[i] is None and i in self.optional:
                continue
            if not isinstance(out[i], torch.Tensor):
                raise TypeError(
                    f"{self.name}: {self.names[i]} must be a torch.Tensor, got {type(out[i]).__name__}"
                )

    def needs(self, bound: Sequence[Any]) -> tuple[bool, ...]:
        """Which differentiable inputs need a gradient (grad mode on); a non-differentiable
        input that requires grad is an error, not a silently missing gradient."""
        for i in self.fixed_idx:
            a = bound[i]
            if a is not None and a.requires_grad:
                raise ValueError(
                    f"{self.name}: {self.names[i]} requires grad, but {self.name} has no gradient "
                    f"w.r.t. {self.names[i]} (differentiable: {', '.join(self.names[j] for j in self.diff_idx)}); "
                    f"pass {self.names[i]}.detach()"
                )
        return tuple([bound[i] is not None and bound[i].requires_grad for i in self.diff_idx])

    def distinct(self, bound: list) -> None:
        """One tensor passed to two inputs (``gan_d_loss(x, x)``): the second gets an alias
        (``x.view_as(x)``: no copy), as Dynamo refuses the same tensor twice in one
        ``autograd.Function.apply``. Autograd sums both gradients into ``x`` as before."""
        idx = self.tensor_idx
        for k in range(1, len(idx)):
            a = bound[idx[k]]
            if a is not None and any(a is bound[j] for j in idx[:k]):
                bound[idx[k]] = a.view_as(a)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.call(args, kwargs)

    def call(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The op on ``args``/``kwargs`` as given (``public``'s function passes them on
        without unpacking them into another call)."""
        n = len(args)
        if kwargs or self.prepare is not None or not self.n_required <= n <= len(self.args):
            bound = self.bind(args, kwargs)
            if self.prepare is not None:
                bound = self.prepare(bound)
            route = self.route(bound)
        else:  # positional only: route() finds anything that is not a plain tensor
            bound = [*args, *self.default_values[n:]]
            route = self.route(bound)
            if route == TRACED:
                self.check_tensors(bound)
        if self.layout_free and route != TRACED:
            first = bound[self.data_idx[0]]
            if first is not None and first.ndim > 2 and not first.is_contiguous():
                p = dense_order([bound[i] for i in self.data_idx])
                if p is not None:  # autograd's permute backward gives the gradients their layout
                    for i in self.data_idx:
                        a = bound[i]
                        if a is not None and a.ndim > 1:
                            bound[i] = a.permute(p)
                    value = self.finish(bound, route)
                    return value.permute(_inverse(p)) if value.ndim == len(p) else value
        return self.finish(bound, route)

    def finish(self, bound: list, route: int) -> torch.Tensor:
        """``call``'s work once the arguments are bound and routed."""
        need = self.needs(bound) if torch.is_grad_enabled() else self.no_need
        if True not in need:
            # no_grad / inference_mode / nothing to differentiate: the value only
            if route != TRACED and _wrapped(bound, self.tensor_idx, self):  # ~55 ns a tensor
                # a torch.func transform's wrappers: through the Function, which vmap runs per entry
                # (its vmap staticmethod) and jvp differentiates (every gradient asked: jvp's
                # tangents do not show as requires_grad); the op alone gave jvp a zero tangent
                return self.fn_transforms.apply(*bound, (True,) * self.n_diff, TRACED)[0]
            value, _ = self.run(bound, need, route)
            return value
        if route == TRACED and torch.compiler.is_compiling():
            self.distinct(bound)
        try:
            return self.apply(*bound, need, route)
        except RuntimeError as e:  # under a functorch transform: the setup_context form
            if "functorch transforms" not in str(e):
                raise
        if route != TRACED and _wrapped(bound, self.tensor_idx, self):
            route = TRACED  # vmap (its vmap staticmethod) or grad's wrappers (through <name>_fwd)
        return self.fn_transforms.apply(*bound, need, route)[0]


def _wrapped(bound: Sequence[Any], tensor_idx: Sequence[int], op: LossOp) -> bool:
    """Whether a tensor argument is a torch.func transform's wrapper (vmap's batched tensors, jvp's
    and grad's), which has no storage for the kernels to read (public APIs only: a plain tensor,
    even an empty one, has storage). A sparse or nested tensor has none either: refused by name."""
    for i in tensor_idx:
        a = bound[i]
        if a is not None and not has_storage(a):
            kind = _engine.not_dense(a)
            if kind:
                raise TypeError(f"{op.name}: {op.names[i]} must be a dense (strided) tensor, got {kind}")
            return True
    return False


def _inverse(p: Sequence[int]) -> list[int]:
    q = [0] * len(p)
    for i, d in enumerate(p):
        q[d] = i
    return q


def public(op: LossOp, module: str) -> Callable[..., torch.Tensor]:
    """The user-facing function of ``op``: a real function with the op's signature and the
    reference's docstring (``help()`` and ``inspect.signature`` show them). It names the op in
    its ValueError / TypeError messages itself (as ``_checks.op_errors`` would, one call frame
    fewer: a batch-256 loss costs about as much as its Python calls)."""
    call, name = op.call, op.name

    def fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return call(args, kwargs)
        except (ValueError, TypeError) as err:
            name_error(err, name)
            raise

    fn.__name__ = fn.__qualname__ = op.name
    fn.__module__ = module
    fn.__doc__ = op.__doc__
    fn.__signature__ = op.__signature__  # type: ignore[attr-defined]
    fn.op = op  # type: ignore[attr-defined]
    fn.__genloss_op_errors__ = True  # type: ignore[attr-defined]
    register_op_name(name)
    return fn
