"""The records of the metrics family."""

from __future__ import annotations

from ..reference import metrics as _metrics
from .core import Arg, Hyper, OpRecord, _v, record_factory

_mrec = record_factory("metrics", _metrics, "MET")

# ---------------------------------------------------------------- optimal transport (MET.20-MET.29)
# sinkhorn_divergence: a value of two point clouds with gradients w.r.t. both (MET.24).  Its
# hyperparameters all have defaults except eps.  ot_coupling is in NOT_REGISTERED (an integer
# permutation or a plan, no gradient).
_OT_HYPERS = (
    Hyper("eps", "real", low=0.0),
    Hyper("p", "real", low=1.0),
    Hyper("scaling", "real", low=0.0),
    Hyper("tol", "real", low=0.0),
    Hyper("max_iter", "int"),
)
OT_RECORDS: tuple[OpRecord, ...] = (
    _mrec("sinkhorn_divergence", [Arg("x", "features", ("Br", "F")), Arg("y", "features", ("Bf", "F"))],
          ("x", "y"), (), 20, hypers=_OT_HYPERS,
          # the reference forms dense (N, M, D) differences and iterates: keep the large-input tests small
          caps=(("Br", 48), ("Bf", 40), ("F", 8)),
          # at |x| ~ 1e4 (C / eps ~ 1e8) the loop ends at a tol-level point, or at max_iter, so native and
          # reference agree to ~1e-7 there, not the table's 1e-12; finiteness: test_metrics_ot.py
          extreme_finite=False,
          variants=(_v(eps=0.5), _v(eps=2.0, p=1.0, scaling=0.7), _v(eps=0.2, p=3.0, scaling=0.3))),
)  # fmt: skip

RECORDS: tuple[OpRecord, ...] = OT_RECORDS
