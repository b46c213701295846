"""Argument checks shared by every layer (reference, native, torch).

Each check raises ``ValueError`` or ``TypeError`` whose message starts with the
name of the offending argument, so a user reads what to fix, never a segfault or
a NaN.  The checks look only at shapes and Python scalars, so the NumPy
reference, the DLPack native wrappers and the torch ops share them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

REDUCTIONS = ("mean", "sum", "none")
TWO_POPULATION = ("mean", "sum")


@contextlib.contextmanager
def named_errors(op: str) -> Iterator[None]:
    """Prefix the op's name to the ValueError / TypeError of its argument checks (the checks
    here name the argument; this says which call it was)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        msg = str(err)
        if _names(msg, op):
            raise
        raise type(err)(_prefixed(op, msg)) from None


def _names(msg: str, op: str) -> bool:
    """Whether ``msg`` already opens with the op's name ("op: ...", "op() ...", "op needs ...")."""
    after = msg[len(op) : len(op) + 1]
    return msg.startswith(op) and not (after.isalnum() or after == "_")


_OPS: set[str] = set()  # the names op_errors has wrapped


def _prefixed(op: str, msg: str) -> str:
    """``op: msg``; a message another op raised (``inner: ...``) is the user's call's, so it
    is named after the op the user called, once."""
    inner, sep, rest = msg.partition(": ")
    return f"{op}: {rest if sep and inner in _OPS else msg}"


def register_op_name(op: str) -> None:
    """Record ``op`` as an op name (a message another op raised is renamed to the caller's)."""
    _OPS.add(op)


def name_error(err: BaseException, op: str) -> None:
    """Start ``err``'s message with the op's name, once (the exception keeps its type and
    traceback: its message is rewritten in place)."""
    if len(err.args) == 1 and isinstance(err.args[0], str) and not _names(err.args[0], op):
        err.args = (_prefixed(op, err.args[0]),)


def op_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose ValueError / TypeError messages start with its name (the op), once.

    The argument checks name the argument; a user calling several ops in one line also
    needs to read which op refused it.  The exception keeps its type and traceback (its
    message is rewritten in place); a try block costs nothing when nothing is raised.
    """
    op = fn.__name__
    _OPS.add(op)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as err:
            name_error(err, op)
            raise

    call.__genloss_op_errors__ = True  # type: ignore[attr-defined]
    return call


def name_op_errors(namespace: dict[str, Any], names: Sequence[str]) -> None:
    """Wrap the public functions ``names`` of a package namespace with :func:`op_errors`, in
    the namespace and in the module that defines each (so ``genloss.native.gan.gan_d_loss``
    and ``genloss.native.gan_d_loss`` are the same wrapped function)."""
    for name in names:
        fn = namespace.get(name)
        if not inspect.isfunction(fn) or getattr(fn, "__genloss_op_errors__", False) or name.startswith("_"):
            continue
        wrapped = op_errors(fn)
        namespace[name] = wrapped
        home = sys.modules.get(fn.__module__)
        if home is not None and getattr(home, name, None) is fn:
            setattr(home, name, wrapped)


def reduction(value: object, allowed: Sequence[str] = REDUCTIONS) -> str:
    """Check ``reduction`` against the allowed names and return it."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"reduction must be one of {tuple(allowed)}, got {value!r}")
    return value


def choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def finite(name: str, value: object) -> float:
    """A finite real hyperparameter (bools and complex numbers are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, np.generic) and np.isrealobj(value):
                value = float(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def nonnegative(name: str, value: object) -> float:
    v = finite(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def positive_int(name: str, value: object, least: int = 1, why: str = "") -> int:
    """An int >= ``least`` (1 unless the argument needs more); ``why`` says why, in the message, so
    that the bound a 0 is refused with is the one a 1 would be."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}{f' ({why})' if why else ''}, got {value}")
    return value


def seed(name: str, value: object, below: int | None = None) -> int:
    """A seed: an int >= 0 (NumPy's ``default_rng`` takes no negative one), and < ``below`` where it
    travels as a torch op's int argument (signed 64 bits)."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = value.__index__()  # type: ignore[attr-defined]
    if v < 0 or (below is not None and v >= below):
        raise ValueError(
            f"{name} must be >= 0" + (f" and < {below}" if below is not None else "") + f", got {v}"
        )
    return int(v)


def batched(name: str, shape: Sequence[int], reduction_: str = "mean", min_ndim: int = 1) -> int:
    """A tensor with a batch dimension first; returns the batch size.

    An empty batch is refused when a mean is asked for (the mean of nothing is
    undefined); any empty tensor is refused because a loss of no elements is
    almost always a bug upstream.
    """
    if len(shape) < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s) (batch first), got shape {tuple(shape)}"
        )
    b = int(shape[0])
    if b == 0 and reduction_ == "mean":
        raise ValueError(f"{name} has an empty batch (shape {tuple(shape)}); the mean over it is undefined")
    if math.prod(shape) == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(shape)})")
    return b


def ndim(name: str, shape: Sequence[int], n: int) -> None:
    if len(shape) != n:
        raise ValueError(f"{name} must have {n} dimension(s), got shape {tuple(shape)}")


def same_shape(name_a: str, shape_a: Sequence[int], name_b: str, shape_b: Sequence[int]) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(shape_a)}, got {tuple(shape_b)}")


def same_batch(name_a: str, shape_a: Sequence[int], name_b: str, shape_b: Sequence[int]) -> None:
    if len(shape_b) == 0 or len(shape_a) == 0 or shape_a[0] != shape_b[0]:
        raise ValueError(
            f"{name_b} must have the batch size of {name_a} ({shape_a[0] if shape_a else '?'}), "
            f"got shape {tuple(shape_b)}"
        )


def positive(name: str, value: object) -> float:
    v = finite(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def flag(name: str, value: object) -> bool:
    """A boolean switch (``True``/``False``, NumPy bools included); ints are refused."""
    if not isinstance(value, bool):
        try:
            import numpy as np

            if isinstance(value, np.bool_):
                return bool(value)
        except ImportError:
            pass
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
