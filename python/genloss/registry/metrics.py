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


# ============================================================================= verify cases
# The metrics with no record (NOT_REGISTERED) are checked by ``genloss verify`` through these cases.
import itertools  # noqa: E402

import numpy as np  # noqa: E402

from .core import Out, case_factory, native_loss, native_value  # noqa: E402

_mcase = case_factory("metrics", _metrics)


def _clouds(rng, scale=1.0, shift=0.5, lo=2, hi=7, same=False):
    """Two point clouds (N, D), (M, D) (M = N when ``same``), the second shifted."""
    n, d = int(rng.integers(lo, hi + 1)), int(rng.integers(1, 5))
    m = n if same else int(rng.integers(lo, hi + 1))
    return rng.normal(0.0, scale, size=(n, d)), rng.normal(shift, scale, size=(m, d))


def _cmmd_draw(rng):
    """CLIP-like spreads around the bandwidth 10 (kernel values neither ~1 nor ~0); D = 8 too (the MMD
    kernel's blocked body, D > 4)."""
    n, m = (int(v) for v in rng.integers(2, 8, size=2))
    wide = (rng.normal(0.0, 4.0, size=(n, 8)), rng.normal(1.0, 4.0, size=(m, 8)))
    return [(_clouds(rng, scale=6.0, shift=3.0), {}), (_clouds(rng, scale=6.0, shift=3.0), {}), (wide, {})]


def _cmmd_scale(args, expected, upstream=None):
    """1000 x kernel means in [0, 1]: the rounding of the means, not of their difference, times 1000."""
    return _metrics.CMMD_SCALE * max(1.0, float(np.abs(expected).max()) / _metrics.CMMD_SCALE)


def _sw_draw(rng):
    """seed 0 included (valid: a fixed set of directions); p = 1 has kinks at ties, so p > 1."""
    return [(_clouds(rng), {"n_projections": 8, "p": 2.0, "seed": 0}),
            (_clouds(rng), {"n_projections": 5, "p": 1.5, "seed": int(rng.integers(1, 2**31))})]  # fmt: skip


def _prdc_draw(rng):
    """A fake point that copies a real one (distance exactly 0: the ``<=`` tie rule)."""
    calls: list[tuple[tuple, dict]] = []
    for k in (1, 3):
        real, fake = _clouds(rng, shift=0.3, lo=k + 2, hi=k + 8)
        fake[0] = real[-1]
        calls.append(((real, fake), {"k": k}))
    return calls


def _fd_draw(rng):
    """Both call forms: features (n > d and n < d: a rank-deficient covariance) and moments."""
    calls: list[tuple[tuple, dict]] = [(_clouds(rng, lo=2, hi=3), {}), (_clouds(rng, lo=6, hi=9), {})]
    x, y = _clouds(rng, lo=6, hi=9)
    moments = (x.mean(0), np.atleast_2d(np.cov(x.T)), y.mean(0), np.atleast_2d(np.cov(y.T)))
    return [*calls, (moments, {})]


def _fd_scale(args, expected):
    """||mu1 - mu2||^2 + tr S1 + tr S2: the terms that cancel against 2 tr sqrt(S1 S2)."""
    if len(args) == 4:
        mu1, c1, mu2, c2 = args
    else:
        mu1, c1, mu2, c2 = (args[0].mean(0), np.cov(args[0].T), args[1].mean(0), np.cov(args[1].T))
    return max(
        1.0, float(np.sum((mu1 - mu2) ** 2) + np.trace(np.atleast_2d(c1)) + np.trace(np.atleast_2d(c2)))
    )


def _ot_draw(rng):
    return [(_clouds(rng, lo=1, hi=6, same=True), {"method": "exact"}),
            (_clouds(rng, lo=2, hi=6, same=True), {"method": "sinkhorn", "eps": 0.5, "tol": 1e-12}),
            (_clouds(rng, lo=2, hi=6, same=True), {"method": "sinkhorn", "eps": 2.0, "tol": 1e-12})]  # fmt: skip


def _ot_reference(x0, x1, method="exact", **kw):
    """'exact': the optimal permutation by enumerating all B! of them (B <= 6; no scipy, independent of
    the native Hungarian solver); 'sinkhorn': the reference's plan."""
    if method != "exact":
        return _metrics.ot_coupling(x0, x1, method, **kw)
    cost = np.sum((x0[:, None, :] - x1[None, :, :]) ** 2, axis=-1)
    perms = np.array(list(itertools.permutations(range(x0.shape[0]))), dtype=np.int64)
    return perms[np.argmin(cost[np.arange(x0.shape[0]), perms].sum(axis=1))]


def _ot_post(args, kwargs, outputs):
    """An assignment is judged by its total cost (ties may pick another optimal one) and by being a
    permutation (its sorted entries 0..B-1); a plan as is."""
    if kwargs.get("method", "exact") != "exact":
        return outputs[0], np.zeros(0)
    x0, x1 = args
    perm = np.asarray(outputs[0].cpu() if hasattr(outputs[0], "cpu") else outputs[0])
    valid = perm.shape == (x0.shape[0],) and np.array_equal(np.sort(perm), np.arange(x0.shape[0]))
    cost = float(np.sum((x0 - x1[perm]) ** 2)) if valid else np.inf
    return np.asarray(cost), np.sort(perm)


CASES = (
    _mcase("cmmd", _cmmd_draw, (Out("cmmd", grad=True, scale=_cmmd_scale),), differentiable=(0, 1),
           native=native_loss("cmmd"), native_cuda=True, grad_scale=_cmmd_scale,
           backward=lambda a, kw, up: list(_metrics.cmmd_backward(a[0], a[1], up[0]))),
    _mcase("sliced_wasserstein", _sw_draw, (Out("sw", grad=True),), differentiable=(0, 1),
           backward=lambda a, kw, up: list(_metrics.sliced_wasserstein_backward(a[0], a[1], up[0], **kw))),
    _mcase("prdc", _prdc_draw, tuple(Out(n, "equal") for n in ("precision", "recall", "density", "coverage")),
           native=native_value("prdc"), native_cuda=True),
    # value only: the torch gradient w.r.t. the features has no reference backward (tests/test_metrics.py
    # checks it by gradcheck)
    _mcase("frechet_distance", _fd_draw, (Out("d2", scale=_fd_scale),)),
    _mcase("ot_coupling", _ot_draw, (Out("cost_or_plan"), Out("sorted_perm", "equal")),
           reference=_ot_reference, native=native_value("ot_coupling"), native_cuda=True, post=_ot_post),
)  # fmt: skip
