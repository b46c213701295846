"""The records of the quant family."""

from __future__ import annotations

import numpy as np

from ..reference import quant as _quant  # noqa: F401
from .core import OpRecord

# quantizers (QNT.1-QNT.9)
QUANTIZER_RECORDS: tuple[OpRecord, ...] = ()

# regularizers (QNT.10-QNT.19): no native layer (SPEC: reference + torch).  adaptive_gan_weight and
# lpips_head take lists of arrays, fsq_indices / fsq_codes map to and from integers: NOT_REGISTERED.
from .core import DEFAULT, Arg, Hyper, _v, record_factory  # noqa: E402
from .domains import DOMAINS, Domain  # noqa: E402

_qrec = record_factory("quant", _quant, "QNT")


def _pl_mean(rng, shape, sizes, hyper):
    """A path-length running mean: U(0, 2) (about the lengths of N(0, 1) gradients), 0 (its start) often."""
    return np.where(rng.random(shape) < 0.25, 0.0, rng.uniform(0.0, 2.0, size=shape))


DOMAINS.update({
    # a running mean (state): any real is a valid value, NaN gives NaN (no invalid values)
    "pl_mean": Domain("path-length running mean, U(0, 2), 0 often", "float", _pl_mean, extreme=False),
})  # fmt: skip

REGULARIZER_RECORDS: tuple[OpRecord, ...] = (
    # (QNT.10) elementwise, channels last (d = len(levels)); the gradient is the straight-through one, by
    # design not the derivative of the (piecewise constant) value: fd=False.  L = 2 and L = 1000 are the
    # ends of the allowed levels.
    _qrec("fsq_quantize", [Arg("z", "data", ("B", "...", "4"))], ("z",), (), 10, elementwise=True,
          has_native=False, hypers=(Hyper("levels", "ints"),),
          variants=(_v(fd=False, levels=(8, 5, 5, 5)), _v(fd=False, levels=(2, 3, 4, 1000)))),
    # (QNT.13) (penalty, new_pl_mean); the penalty is the value.  pl_mean is 0-d state (no gradient).
    _qrec("path_length_penalty", [Arg("grads_w", "grads", ("B", "...", "F")),
                                  Arg("pl_mean", "pl_mean", ())],
          ("grads_w",), (), 13, has_native=False, value_index=0, hypers=(Hyper("decay", "real", low=0.0),),
          variants=(DEFAULT, _v(decay=0.5), _v(decay=0.0))),
)  # fmt: skip

RECORDS = QUANTIZER_RECORDS + REGULARIZER_RECORDS
