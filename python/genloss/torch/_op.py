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

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

lib = torch.library.Library("genloss", "DEF")

_LOW = (torch.float16, torch.bfloat16)
_PARAM = re.compile(r"^\s*(\w+(?:\[\])?\??)\s+(\w+)(?:\s*=\s*(.+))?\s*$")
_DEFAULTS = {"True": True, "False": False, "None": None}


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
        self.__doc__ = doc

    # -- the primitive ----------------------------------------------------------
    def _native(self, args: list, need_grad: Sequence[bool], **extra: Any) -> tuple[Any, list]:
        args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in _LOW else a for a in args]
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
                    need_now = [False] * len(need)
                else:
                    need_now = need
                eager = op.plain_eager(args)
                if eager:  # skip the dispatcher hop: ~6 us per call
                    value, grads = op._kernel(*args, need_now)
                else:  # compile, fake tensors, functionalization: through the op
                    value, grads = op.fwd(*args, need_now)
                # Eager: the gradients wait on ctx (not in save_for_backward), so the first
                # backward can hand them to autograd as the only reference: AccumulateGrad then
                # adopts them instead of copying (a 64 MiB copy and its page faults, per input).
                # A second backward through a retained graph re-runs the kernel (deterministic).
                ctx.steal = eager and any(need_now)
                if ctx.steal:
                    ctx.grads = list(grads)
                    ctx.need_now = need_now
                    ctx.others = [None if isinstance(a, torch.Tensor) else a for a in args]
                    ctx.save_for_backward(*[args[i] for i in op.tensor_idx])
                elif any(need_now):  # the gradients, and the inputs (edges for _no_double_backward)
                    ctx.save_for_backward(*grads, *[args[i] for i in op.diff_idx])
                ctx.dtypes = [None if args[i] is None else args[i].dtype for i in op.diff_idx]
                return value

            @staticmethod
            def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                out: list[torch.Tensor | None] = [None] * len(op.args)
                if ctx.rerun:
                    args = list(ctx.others)
                    for i, t in zip(op.tensor_idx, ctx.saved_tensors, strict=True):
                        args[i] = t
                    diff_inputs = [args[i] for i in op.diff_idx]
                    need = [ctx.needs_input_grad[i] for i in op.diff_idx]
                    _, grads = op.wfwd(*args, grad_output, need)
                    for i, g, dt in zip(op.diff_idx, grads, ctx.dtypes, strict=False):
                        if g is not None and ctx.needs_input_grad[i]:
                            out[i] = g if g.dtype == dt else g.to(dt)
                    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                        wrapped = _no_double_backward(op.name, [out[i] for i in op.diff_idx], diff_inputs)
                        for i, g in zip(op.diff_idx, wrapped, strict=True):
                            out[i] = g
                    return tuple(out)
                # d loss/d grad_output = 1 exactly (loss.backward() on a CPU scalar):
                # hand the saved gradient over instead of a multiply pass.
                unit = (
                    not ctx.per_sample
                    and not op.elementwise
                    and type(grad_output) is torch.Tensor  # not a fake/functional/traced tensor
                    and grad_output.device.type == "cpu"
                    and not torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()
                    and _get_current_dispatch_mode() is None
                    and grad_output.item() == 1.0
                )
                nd = len(op.diff_idx)
                saved_all = ctx.saved_tensors
                if ctx.steal:
                    args = list(ctx.others)
                    for i, t in zip(op.tensor_idx, saved_all, strict=True):
                        args[i] = t
                    diff_inputs = [args[i] for i in op.diff_idx]
                    saved_grads, ctx.grads = ctx.grads, None
                    if saved_grads is None:  # the graph was retained and is run again
                        _, saved_grads = op._kernel(*args, ctx.need_now)
                else:
                    saved_grads, diff_inputs = saved_all[:nd], saved_all[nd:]
                for i, saved, dt in zip(op.diff_idx, saved_grads, ctx.dtypes, strict=False):
                    if saved is None or not ctx.needs_input_grad[i]:
                        continue
                    if unit:
                        gi = saved
                    elif ctx.per_sample:
                        gi = saved * grad_output.reshape((-1,) + (1,) * (saved.dim() - 1))
                    else:  # scalar, or elementwise (same shape)
                        gi = saved * grad_output
                    out[i] = gi if gi.dtype == dt else gi.to(dt)
                if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                    wrapped = _no_double_backward(op.name, [out[i] for i in op.diff_idx], diff_inputs)
                    for i, g in zip(op.diff_idx, wrapped, strict=True):
                        out[i] = g
                return tuple(out)

        Fn.__name__ = f"{self.name}_autograd"
        return Fn

    def plain_eager(self, args: Sequence[Any]) -> bool:
        """Plain tensors outside any tracing: the kernel may be called directly."""
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return False
        return all(type(args[i]) is torch.Tensor for i in self.tensor_idx if args[i] is not None)

    # -- the public call ------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> list:
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
        for i in self.tensor_idx:
            if out[i] is None and i in self.optional:
                continue
            if not isinstance(out[i], torch.Tensor):
                raise TypeError(f"{self.names[i]} must be a torch.Tensor, got {type(out[i]).__name__}")
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = self.bind(args, kwargs)
        if self.prepare is not None:
            bound = self.prepare(bound)
        if not torch.is_grad_enabled():
            # no_grad / inference_mode: value only. (Inside Function.forward,
            # ctx.needs_input_grad follows requires_grad, not grad mode, so this
            # must be decided here.)
            need = [False] * len(self.diff_idx)
            value, _ = self._kernel(*bound, need) if self.plain_eager(bound) else self.fwd(*bound, need)
            return value
        return self.fn.apply(*bound)
