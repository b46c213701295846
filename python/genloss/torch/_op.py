"""The one torch glue of genloss: turns a native loss into ``torch.ops.genloss.<name>``.

Per loss, two ops in the ``genloss`` namespace:

* ``<name>_fwd(<args>, bool need_grad) -> (Tensor value, Tensor[] grads)``: the
  primitive. CPU and CUDA kernels call ``genloss.native`` (one fused pass that
  writes the value and, when asked, every gradient); a fake kernel gives
  shapes to ``torch.compile``. It is not differentiable itself.
* ``<name>(<args>) -> Tensor``: the public op, a CompositeImplicitAutograd
  kernel running a ``torch.autograd.Function`` around ``<name>_fwd``: forward
  asks for gradients only when an input needs them (never under ``no_grad``),
  backward scales the saved gradients by ``grad_output``. No math here.

Low precision: float16/bfloat16 inputs are computed in float32 (the value is
float32, gradients come back in the input's dtype), as torch's autocast does
for its own losses. Double backward raises a clear error (the saved gradients
are not functions of the inputs in the autograd graph).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

lib = torch.library.Library("genloss", "DEF")

_LOW = (torch.float16, torch.bfloat16)
_PLAIN, _LOW_DTYPE, _TRACED = 0, 1, 2  # LossOp.route
_dispatch_modes = torch._C._len_torch_dispatch_stack  # > 0: a TorchDispatchMode is active
_PARAM = re.compile(r"^\s*(\w+(?:\[\])?\??)\s+(\w+)(?:\s*=\s*(.+))?\s*$")
_DEFAULTS = {"True": True, "False": False, "None": None}


def _getter(idx: Sequence[int]) -> Callable[[Sequence[Any]], tuple]:
    """seq -> tuple(seq[i] for i in idx), as one C call."""
    if len(idx) > 1:
        return operator.itemgetter(*idx)
    if len(idx) == 1:
        i = idx[0]
        return lambda seq: (seq[i],)
    return lambda seq: ()


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


def _no_double_backward(name: str, grads: list, inputs: Sequence[torch.Tensor | None]) -> list:
    """Gradients whose grad_fn raises if anyone differentiates them again.

    Each gradient goes through a DelayedError node together with the input it is
    the gradient of, so the node has an edge back to that input: both
    ``.backward()`` and ``torch.autograd.grad(..., inputs)`` reach it and raise
    the message, instead of finding no path and returning zeros.
    """
    msg = (
        f"genloss.{name}: double backward is not supported (its backward reuses gradients computed "
        f"by the fused forward kernel); compose the loss from torch ops if you need second derivatives"
    ).encode()
    out = []
    for g, x in zip(grads, inputs, strict=True):
        if g is None:
            out.append(None)
            continue
        leaf = g.detach().requires_grad_(True)
        if x is not None and x.requires_grad:
            g2, _ = torch._C._functions.DelayedError(msg, 2)(leaf, x)
        else:
            g2 = torch._C._functions.DelayedError(msg, 1)(leaf)
        out.append(g2)
    return out


class LossOp:
    """One loss: its schema, its native implementation, its differentiable args.

    ``prepare`` (torch ops, differentiable) runs before the kernel, e.g. to
    broadcast a log-variance so autograd sums its gradient back to its shape.
    ``elementwise``: the value has the inputs' shape (no reduction).
    ``shared_params``: some differentiable inputs are shared by all samples, so a
    'none' reduction cannot scale saved gradients per sample; its backward
    re-runs the kernel with per-sample weights (``<name>_wfwd``).
    ``value_like``: the value has the shape of this argument (an elementwise map
    whose other inputs, e.g. a per-step table, do not broadcast with it).
    """

    def __init__(
        self,
        name: str,
        schema: str,
        native: Callable[..., tuple[Any, tuple]],
        differentiable: Sequence[str],
        doc: str = "",
        prepare: Callable[[list], list] | None = None,
        elementwise: bool = False,
        shared_params: bool = False,
        value_like: str | None = None,
    ) -> None:
        self.name = name
        self.args = _parse(schema)
        self.names = [a[1] for a in self.args]
        self.tensor_idx = [i for i, a in enumerate(self.args) if a[0].startswith("Tensor")]
        self.optional = {i for i, a in enumerate(self.args) if a[0] == "Tensor?"}
        self.diff_idx = [self.names.index(n) for n in differentiable]
        self.red_idx = self.names.index("reduction") if "reduction" in self.names else None
        self.native = native
        self.prepare = prepare
        self.elementwise = elementwise or value_like is not None
        self.value_like = None if value_like is None else self.names.index(value_like)
        self.shared_params = shared_params
        # Absent optional differentiable inputs have no gradient slot in the native call.
        self.optional_diff = any(i in self.optional for i in self.diff_idx)
        self.pick_need = _getter(self.diff_idx)  # needs_input_grad -> one flag per differentiable input
        self.n_diff = len(self.diff_idx)
        self.tensor_slots = [(i, i in self.optional) for i in self.tensor_idx]
        self.other_idx = [i for i in range(len(self.args)) if i not in self.tensor_idx]
        self.others_of = _getter(self.other_idx)  # args -> tuple of the non-tensor args
        self.tensors_of = _getter(self.tensor_idx)
        self.n_required = sum(not a[3] for a in self.args)
        self.default_values = [a[2] for a in self.args]  # required args come first (schema rule)
        # A backward that hands the gradients over as they are: one slot per argument.
        self.diff_first = self.diff_idx == list(range(self.n_diff))
        self.none_tail = (None,) * (len(self.args) - self.n_diff)
        plain = ", ".join(f"{a[0]} {a[1]}" for a in self.args)  # no defaults: need_grad follows
        lib.define(f"{name}_fwd({plain}, bool[] need_grad) -> (Tensor, Tensor?[])")
        lib.define(f"{name}({schema}) -> Tensor")
        lib.impl(f"{name}_fwd", self._kernel, "CPU")
        lib.impl(f"{name}_fwd", self._kernel, "CUDA")
        torch.library.register_fake(f"genloss::{name}_fwd", self._fake, lib=lib)
        if shared_params:
            lib.define(f"{name}_wfwd({plain}, Tensor row_weights, bool[] need_grad) -> (Tensor, Tensor?[])")
            lib.impl(f"{name}_wfwd", self._wkernel, "CPU")
            lib.impl(f"{name}_wfwd", self._wkernel, "CUDA")
            torch.library.register_fake(f"genloss::{name}_wfwd", self._wfake, lib=lib)
            self.wfwd = getattr(torch.ops.genloss, f"{name}_wfwd").default
        lib.impl(name, self.__call__, "CompositeImplicitAutograd")
        self.fwd = getattr(torch.ops.genloss, f"{name}_fwd").default
        self.fn = self._function()
        self.eager_fn = self._eager_function()
        # Function.apply's Python wrapper only adds functorch handling; the eager path
        # checks that no functorch transform is active and calls the C apply directly.
        self.eager_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, self.eager_fn)
        self.__doc__ = doc

    # -- the primitive ----------------------------------------------------------
    def _native(self, args: Sequence[Any], need_grad: Sequence[bool], **extra: Any) -> tuple[Any, Sequence]:
        if self.route(args) == _LOW_DTYPE:
            args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in _LOW else a for a in args]
        return self._call(args, tuple(need_grad), **extra)

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
        return self._native(args, need_grad)

    def _wkernel(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, row_weights, need_grad = args  # type: ignore[assignment]
        first = args[self.tensor_idx[0]]  # the kernel computes in float32 for float16/bfloat16 inputs
        dt = torch.float32 if first.dtype in _LOW else first.dtype
        return self._native(args, need_grad, row_weights=row_weights.to(dt))

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

    def _wfake(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, _row_weights, need_grad = args  # type: ignore[assignment]
        return self._fake(*args, need_grad)

    # -- autograd -----------------------------------------------------------------
    def _function(self) -> type[torch.autograd.Function]:
        """The general path: traced/compiled/fake tensors, float16/bfloat16, functorch, and
        per-sample losses with shared parameters. Runs the kernel through the op."""
        op = self

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *args: Any) -> torch.Tensor:
                # Only the gradients some input needs are written (a target image
                # that needs none costs no 64 MiB write).
                need = [ctx.needs_input_grad[i] for i in op.diff_idx]
                ctx.per_sample = op.red_idx is not None and args[op.red_idx] == "none"
                ctx.rerun = op.shared_params and ctx.per_sample and any(need)
                if ctx.rerun:  # gradients need the per-sample weights: backward re-runs
                    ctx.save_for_backward(*[args[i] for i in op.tensor_idx])
                    ctx.others = args
                    need = [False] * len(need)
                value, grads = op.fwd(*args, need)
                if any(need):  # the gradients, and the inputs (edges for _no_double_backward)
                    ctx.save_for_backward(*grads, *[args[i] for i in op.diff_idx])
                ctx.dtypes = [None if args[i] is None else args[i].dtype for i in op.diff_idx]
                return value

            @staticmethod
            def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                if ctx.rerun:
                    args = list(ctx.others)
                    for i, t in zip(op.tensor_idx, ctx.saved_tensors, strict=True):
                        args[i] = t
                    diff_inputs = [args[i] for i in op.diff_idx]
                    need = [ctx.needs_input_grad[i] for i in op.diff_idx]
                    _, grads = op.wfwd(*args, grad_output, need)
                    scale = None  # the weights were the per-sample grad_output
                else:
                    nd = op.n_diff
                    grads, diff_inputs = ctx.saved_tensors[:nd], ctx.saved_tensors[nd:]
                    scale = grad_output
                return op.finish_backward(ctx, grads, scale, lambda: diff_inputs, ctx.dtypes)

        Fn.__name__ = f"{self.name}_autograd"
        return Fn

    def _eager_function(self) -> type[torch.autograd.Function]:
        """The eager path (plain CPU/CUDA tensors, float32/float64, nothing tracing): the
        kernel is called directly (no dispatcher hop), and the gradients it wrote wait on
        ctx, not in save_for_backward, so the first backward hands them to autograd as the
        only reference: AccumulateGrad adopts them instead of copying (a 64 MiB copy and
        its page faults per input of an image loss). A second backward through a retained
        graph re-runs the kernel (deterministic: the same gradients)."""
        op = self

        class EagerFn(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *args: Any) -> torch.Tensor:
                need = op.pick_need(ctx.needs_input_grad)
                value, grads = op._call(args, need)
                ctx.grads = grads
                ctx.per_sample = op.red_idx is not None and args[op.red_idx] == "none"
                if grads:  # for a re-run: the tensors in save_for_backward (freed by the
                    # backward, not kept alive as long as the loss), the rest on ctx
                    ctx.need = need
                    ctx.others = op.others_of(args)
                    ctx.save_for_backward(*op.tensors_of(args))
                return value

            @staticmethod
            def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                grads, ctx.grads = ctx.grads, None
                if (
                    grads is not None
                    and op.diff_first
                    and not torch.is_grad_enabled()
                    and op.is_unit(grad_output, ctx.per_sample)
                ):  # loss.backward(): the gradients as they are, no bookkeeping
                    return (*grads, *op.none_tail)
                if grads is None:  # the graph was retained and is run again
                    _, grads = op._call(ctx_inputs(ctx), ctx.need)
                return op.finish_backward(
                    ctx, grads, grad_output, lambda: [ctx_inputs(ctx)[i] for i in op.diff_idx], None
                )

        def ctx_inputs(ctx: Any) -> list:
            """The arguments of the forward call (unpacking raises if one was modified in place)."""
            args: list = [None] * len(op.args)
            for i, a in zip(op.other_idx, ctx.others, strict=True):
                args[i] = a
            for i, t in zip(op.tensor_idx, ctx.saved_tensors, strict=True):
                args[i] = t
            return args

        EagerFn.__name__ = f"{self.name}_eager_autograd"
        return EagerFn

    def finish_backward(
        self,
        ctx: Any,
        grads: Sequence,
        grad_output: torch.Tensor | None,
        diff_inputs: Callable[[], Sequence],
        dtypes: list | None,
    ) -> tuple[torch.Tensor | None, ...]:
        """The gradients of every argument: the saved ones times grad_output (None: as they
        are). ``diff_inputs()`` gives the differentiable inputs, needed only under create_graph."""
        out: list[torch.Tensor | None] = [None] * len(self.args)
        per_sample = ctx.per_sample
        if grad_output is not None and self.is_unit(grad_output, per_sample):
            # d loss/d grad_output = 1 exactly (loss.backward() on a CPU scalar):
            # hand the saved gradient over instead of a multiply pass.
            grad_output = None
        nig = ctx.needs_input_grad
        for k, i in enumerate(self.diff_idx):
            g = grads[k]
            if g is None or not nig[i]:
                continue
            if grad_output is not None:
                if per_sample:
                    g = g * grad_output.reshape((-1,) + (1,) * (g.dim() - 1))
                else:  # scalar, or elementwise (same shape)
                    g = g * grad_output
            if dtypes is not None and g.dtype != dtypes[k]:
                g = g.to(dtypes[k])
            out[i] = g
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            wrapped = _no_double_backward(self.name, [out[i] for i in self.diff_idx], diff_inputs())
            for i, g in zip(self.diff_idx, wrapped, strict=True):
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
            and not _dispatch_modes()
            and grad_output.item() == 1.0
        )

    def route(self, args: Sequence[Any]) -> int:
        """_PLAIN: plain tensors outside any tracing or functorch transform, float32/float64
        (the kernel may be called directly); _LOW_DTYPE: the same with a float16/bfloat16
        input (computed in float32); _TRACED: anything else (through the op)."""
        if torch.compiler.is_compiling() or _dispatch_modes() or torch._C._are_functorch_transforms_active():
            return _TRACED
        kind = _PLAIN
        for i, optional in self.tensor_slots:
            a = args[i]
            if type(a) is torch.Tensor:
                if a.dtype in _LOW:
                    kind = _LOW_DTYPE
            elif not (a is None and optional):
                return _TRACED  # a subclass, or not a tensor: bind's check names it
        return kind

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
            raise TypeError(f"{self.name}() got unexpected keyword argument(s) {sorted(kwargs)}")
        self.check_tensors(out)
        return out

    def check_tensors(self, out: Sequence[Any]) -> None:
        for i in self.tensor_idx:
            if out[i] is None and i in self.optional:
                continue
            if not isinstance(out[i], torch.Tensor):
                raise TypeError(f"{self.names[i]} must be a torch.Tensor, got {type(out[i]).__name__}")

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        n = len(args)
        if kwargs or self.prepare is not None or not self.n_required <= n <= len(self.args):
            bound = self.bind(args, kwargs)
            if self.prepare is not None:
                bound = self.prepare(bound)
            kind = self.route(bound)
        else:  # positional only: route() finds anything that is not a plain tensor
            bound = [*args, *self.default_values[n:]]
            kind = self.route(bound)
            if kind == _TRACED:
                self.check_tensors(bound)
        if not torch.is_grad_enabled():
            # no_grad / inference_mode: value only. (Inside Function.forward,
            # ctx.needs_input_grad follows requires_grad, not grad mode, so this
            # must be decided here.)
            need = [False] * self.n_diff
            value, _ = self.fwd(*bound, need) if kind == _TRACED else self._native(bound, need)
            return value
        if kind == _PLAIN and not (self.shared_params and bound[self.red_idx] == "none"):  # type: ignore[index]
            return self.eager_apply(*bound)
        return self.fn.apply(*bound)
