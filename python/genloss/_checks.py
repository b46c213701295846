"""Argument checks shared by every layer (reference, native, torch).

Each check raises ``ValueError`` or ``TypeError`` whose message starts with the
name of the offending argument, so a user reads what to fix, never a segfault or
a NaN.  The checks look only at shapes and Python scalars, so the NumPy
reference, the DLPack native wrappers and the torch ops share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

REDUCTIONS = ("mean", "sum", "none")
TWO_POPULATION = ("mean", "sum")


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


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


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
