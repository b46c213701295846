"""The records of the divergence family."""

from __future__ import annotations

from ..reference import divergence as _div
from .core import ALL, DEFAULT, TWO, Arg, Hyper, OpRecord, Variant, _v, record_factory  # noqa: F401

_divrec = record_factory("divergence", _div, "DIV")


DIVERGENCE_RECORDS: tuple[OpRecord, ...] = (
    # e^l overflows for l > 88.7 in float32 (the ratio itself is out of range): no extreme inputs
    _divrec("density_ratio_from_logits", [Arg("logits", "scores", ("B", "..."), broadcast=True)], ("logits",), (),
            1, elementwise=True, extreme_finite=False),
    _divrec("mmd2", [Arg("x", "features", ("Br", "F")), Arg("y", "features", ("Bf", "F"))], ("x", "y"), (), 6,
            hypers=(Hyper("kernel", "choice", _div.KERNELS), Hyper("estimator", "choice", _div.MMD_ESTIMATORS),
                    Hyper("bandwidths", "bandwidths")),
            # the blocked (D > 4) body is covered by tests/test_mmd.py at D = 9, not at +-1e4 entries
            size_limits=(("Br", 2, 10**9), ("Bf", 2, 10**9), ("F", 1, 4)),
            variants=(_v(kernel="rbf", bandwidths=(1.0, 2.5), estimator="unbiased"),
                      _v(kernel="imq", bandwidths=(1.5,), estimator="biased"),
                      # the cubic kernel of 1e4-sized features is ~1e24: the unbiased estimator's float32
                      # differences of such terms are noise (finite, not accurate): no extreme inputs
                      _v(kernel="polynomial", estimator="unbiased", extreme_finite=False),
                      _v(kernel="energy", estimator="biased"),
                      _v(kernel="rbf", bandwidths=(2.0,), estimator="linear", same=(("Bf", "Br"),)),
                      # the median heuristic moves with the data: central differences see it, the
                      # gradient (by definition) does not
                      _v(kernel="rbf", estimator="unbiased", fd=False))),
)  # fmt: skip

RECORDS = DIVERGENCE_RECORDS


# ============================================================================= verify cases
# kid (NOT_REGISTERED: (mean, std) Python floats over random subsets) is checked by ``genloss verify``.
import numpy as np  # noqa: E402

from .core import Out, case_factory, native_value  # noqa: E402

_dcase = case_factory("divergence", _div)


def _kid_draw(rng):
    """Subsets (seed 0 and another) and the full sets (subsets=None: the closed-form std)."""
    calls = []
    for subsets, seed in ((3, 0), (4, int(rng.integers(1, 2**31))), (None, 0)):
        n, m = (int(v) for v in rng.integers(4, 9, size=2))
        d = int(rng.integers(1, 5))
        x, y = rng.normal(0.0, 1.0, size=(n, d)), rng.normal(0.3, 1.0, size=(m, d))
        calls.append(((x, y), {"subsets": subsets, "subset_size": min(n, m) - 1, "seed": seed}))
    return calls


def _kid_scale(args, expected):
    """The kernel values (x.y/D + 1)^3 the unbiased means cancel (the estimator is ~ their spread)."""
    x, y = args
    return max(1.0, float(((np.abs(np.concatenate([x, y])) ** 2).sum(1).max() / x.shape[1] + 1.0) ** 3))


CASES = (
    _dcase("kid", _kid_draw, (Out("mean", scale=_kid_scale), Out("std", scale=_kid_scale)),
           native=native_value("kid")),
)  # fmt: skip
