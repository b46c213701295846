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


def _no_double_backward(name: str, grads: list) -> list:
    """Outputs whose grad_fn raises if anyone differentiates them again."""
    tensors = [g for g in grads if g is not None]
    if not tensors:
        return grads
    err = torch._C._functions.DelayedError(
        f"genloss.{name}: double backward is not supported (its backward reuses gradients computed "
        f"by the fused forward kernel); compose the loss from torch ops if you need second derivatives".encode(),
        len(tensors),
    )
    res = err(*[t.detach().requires_grad_(True) for t in tensors])
    wrapped = iter(res if isinstance(res, tuple) else (res,))
    return [next(wrapped) if g is not None else None for g in grads]


class LossOp:
    """One loss: its schema, its native implementation, its differentiable args."""

    def __init__(
        self,
        name: str,
        schema: str,
        native: Callable[..., tuple[Any, tuple]],
        differentiable: Sequence[str],
        doc: str = "",
    ) -> None:
        self.name = name
        self.args = _parse(schema)
        self.names = [a[1] for a in self.args]
        self.tensor_idx = [i for i, a in enumerate(self.args) if a[0] == "Tensor"]
        self.diff_idx = [self.names.index(n) for n in differentiable]
        self.red_idx = self.names.index("reduction") if "reduction" in self.names else None
        self.native = native
        plain = ", ".join(f"{a[0]} {a[1]}" for a in self.args)  # no defaults: need_grad follows
        lib.define(f"{name}_fwd({plain}, bool[] need_grad) -> (Tensor, Tensor?[])")
        lib.define(f"{name}({schema}) -> Tensor")
        lib.impl(f"{name}_fwd", self._kernel, "CPU")
        lib.impl(f"{name}_fwd", self._kernel, "CUDA")
        torch.library.register_fake(f"genloss::{name}_fwd", self._fake, lib=lib)
        lib.impl(name, self.__call__, "CompositeImplicitAutograd")
        self.fwd = getattr(torch.ops.genloss, f"{name}_fwd").default
        self.fn = self._function()
        self.__doc__ = doc

    # -- the primitive ----------------------------------------------------------
    def _kernel(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, need_grad = args  # type: ignore[assignment]
        args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in _LOW else a for a in args]
        value, grads = self.native(*args, need_grad=tuple(need_grad))
        return value, list(grads)

    def _fake(self, *args: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        *args, need_grad = args  # type: ignore[assignment]
        first = args[self.tensor_idx[0]]
        dt = torch.float32 if first.dtype in _LOW else first.dtype
        per_sample = self.red_idx is not None and args[self.red_idx] == "none"
        value = first.new_empty((first.shape[0],) if per_sample else (), dtype=dt)
        if not any(need_grad):
            return value, []
        grads = [
            args[i].new_empty(args[i].shape, dtype=dt) if n else None
            for i, n in zip(self.diff_idx, need_grad, strict=False)
        ]
        return value, grads

    # -- autograd -----------------------------------------------------------------
    def _function(self) -> type[torch.autograd.Function]:
        op = self

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *args: Any) -> torch.Tensor:
                # Only the gradients some input needs are written (a target image
                # that needs none costs no 64 MiB write).
                need = [ctx.needs_input_grad[i] for i in op.diff_idx]
                if op.plain_eager(args):  # skip the dispatcher hop: ~6 us per call
                    value, grads = op._kernel(*args, need)
                else:  # compile, fake tensors, functionalization: through the op
                    value, grads = op.fwd(*args, need)
                if any(need):
                    ctx.save_for_backward(*grads)
                    ctx.dtypes = [args[i].dtype for i in op.diff_idx]
                    ctx.per_sample = op.red_idx is not None and args[op.red_idx] == "none"
                return value

            @staticmethod
            def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                out: list[torch.Tensor | None] = [None] * len(op.args)
                # d loss/d grad_output = 1 exactly (loss.backward() on a CPU scalar):
                # hand the saved gradient over instead of a multiply pass.
                unit = (
                    not ctx.per_sample
                    and grad_output.device.type == "cpu"
                    and not torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()
                    and grad_output.item() == 1.0
                )
                for i, saved, dt in zip(op.diff_idx, ctx.saved_tensors, ctx.dtypes, strict=True):
                    if saved is None or not ctx.needs_input_grad[i]:
                        continue
                    if unit:
                        gi = saved
                    else:
                        g = (
                            grad_output.reshape((-1,) + (1,) * (saved.dim() - 1))
                            if ctx.per_sample
                            else grad_output
                        )
                        gi = saved * g
                    out[i] = gi if gi.dtype == dt else gi.to(dt)
                if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                    out = _no_double_backward(op.name, out)
                return tuple(out)

        Fn.__name__ = f"{self.name}_autograd"
        return Fn

    def plain_eager(self, args: Sequence[Any]) -> bool:
        """Plain tensors outside any tracing: the kernel may be called directly."""
        if torch.compiler.is_compiling():
            return False
        return all(type(args[i]) is torch.Tensor for i in self.tensor_idx)

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
            if not isinstance(out[i], torch.Tensor):
                raise TypeError(f"{self.names[i]} must be a torch.Tensor, got {type(out[i]).__name__}")
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn.apply(*self.bind(args, kwargs))
