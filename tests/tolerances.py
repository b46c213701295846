r"""The ONE tolerance table of the test suite, and ``assert_close``.

Criterion, elementwise (NaN/inf handled apart, see ``assert_close``)::

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max(1, max |expected|)

``atol`` is measured against the LARGEST magnitude of the expected array (or 1):
a floating-point computation makes errors of the size of the numbers it handles,
so a tiny gradient entry next to large ones (a saturated sigmoid, a total-variation
sech^2 in its tail) is judged against the scale of the vector, not against itself.
Callers that know a larger natural scale (sums that cancel) pass ``scale=``.

Every oracle is float64: the reference is evaluated on the very same inputs the
implementation saw (float32 inputs are converted exactly to float64), so these
tolerances measure the implementation's arithmetic only, never input rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genloss.tolerances import (  # noqa: F401  (the one table lives in the package)
    TOLERANCES,
    dtype_name,
    metrics,
    to_numpy,
    tolerance,
    value_scale,
)


def assert_close(
    actual: Any,
    expected: Any,
    kind: str,
    dtype: Any,
    what: str = "",
    *,
    scale: float | None = None,
) -> None:
    """Assert ``actual`` equals the float64 oracle ``expected`` within ``TOLERANCES[(dtype, kind)]``.

    NaN must meet NaN and inf must meet an inf of the same sign; such mismatches are
    counted and reported apart from the numeric error.  On failure the message gives
    the vector metrics (max abs, max rel, relative L2, cosine similarity), the worst
    entry, and the tolerance used.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: judged by the NaN/inf counts below
        _assert_close(actual, expected, kind, dtype, what, scale)


def _assert_close(actual, expected, kind, dtype, what, scale) -> None:
    rtol, atol = tolerance(kind, dtype)
    a, e = to_numpy(actual), to_numpy(expected)
    label = f"{what} [{kind}, {dtype_name(dtype)}]"
    if a.shape != e.shape:
        raise AssertionError(f"{label}: shape {a.shape} != expected {e.shape}")
    nan_mismatch = int(np.sum(np.isnan(a) != np.isnan(e)))
    inf_mismatch = int(np.sum((np.isinf(a) | np.isinf(e)) & ~(a == e) & ~np.isnan(a) & ~np.isnan(e)))
    finite = np.isfinite(a) & np.isfinite(e)
    s = scale if scale is not None else max(1.0, float(np.abs(e[np.isfinite(e)]).max(initial=0.0)))
    bound = atol * s + rtol * np.abs(e)
    bad = finite & ~(np.abs(a - e) <= bound)
    n_bad = int(bad.sum())
    if nan_mismatch == 0 and inf_mismatch == 0 and n_bad == 0:
        return
    m = metrics(a, e)
    lines = [
        f"{label}: {n_bad} of {a.size} entries outside rtol={rtol:g}, atol={atol:g} x scale={s:.6g}",
        f"  max_abs={m['max_abs']:.3e}  max_rel={m['max_rel']:.3e}  rel_l2={m['rel_l2']:.3e}  cosine={m['cosine']:.12f}",
        f"  NaN mismatches: {nan_mismatch}   inf mismatches: {inf_mismatch}",
    ]
    if n_bad:
        excess = np.where(bad, np.abs(a - e) - bound, -np.inf)
        i = np.unravel_index(int(np.argmax(excess)), a.shape) if a.ndim else ()
        lines.append(f"  worst at {tuple(int(j) for j in i)}: actual={a[i]!r} expected={e[i]!r}")
    elif nan_mismatch or inf_mismatch:
        j = np.flatnonzero((np.isnan(a) != np.isnan(e)) | (~finite & (a != e)))[:5]
        lines.append(
            f"  first non-finite mismatches at flat {j.tolist()}: actual={a.flat[j]} expected={e.flat[j]}"
        )
    raise AssertionError("\n".join(lines))


def assert_all_finite(x: Any, what: str) -> None:
    a = to_numpy(x)
    bad = ~np.isfinite(a)
    if bad.any():
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} entries not finite "
            f"(NaN: {int(np.isnan(a).sum())}, inf: {int(np.isinf(a).sum())})"
        )
