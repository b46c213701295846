"""The records of the flow family."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..reference import flow as _flow
from .core import ALL, DEFAULT, TWO, Arg, Hyper, OpRecord, Variant, _v, record_factory  # noqa: F401
from .diffusion import _SCHEDULE, _WEIGHTS, COSINE_SCHEDULE
from .domains import DOMAINS, Domain

_frec = record_factory("flow", _flow, "FLOW")


_UNIT_T = Arg("t", "unit_times", ("B",))
_SIGMA_MIN = Hyper("sigma_min", "real", low=0.0)

FLOW_RECORDS: tuple[OpRecord, ...] = (
    _frec("flow_interpolant", [Arg("x0", "data", ("B", "...")), Arg("noise", "data", ("B", "...")), _UNIT_T],
          ("x0", "noise", "t"), (), 1, hypers=(_SIGMA_MIN,), elementwise=True,
          variants=(DEFAULT, _v(sigma_min=0.1))),
    _frec("flow_matching_loss", [Arg("pred", "data", ("B", "...")), Arg("x0", "data", ("B", "...")),
                                 Arg("noise", "data", ("B", "...")), _UNIT_T, _WEIGHTS],
          ("pred", "x0", "noise", "t", "weights"), ALL, 2,
          hypers=(Hyper("weighting", "choice", _flow.FLOW_WEIGHTINGS), _SIGMA_MIN),
          variants=(DEFAULT, _v(weighting="cosmap", sigma_min=0.1, args=(_WEIGHTS,)),
                    # t^-2 is infinite at the end point t = 0 (refused): times in [0.05, 1]
                    _v(weighting="sigma_sqrt", args=(Arg("t", "positive_times", ("B",)), _WEIGHTS)))),
)  # fmt: skip


# Parameterizations (FLOW.11): a torch composite of float64 (B,) coefficients, no native kernel; linear
# in pred and x_t.  Every source is invertible on its variant's domain: 'x0' needs b > 0 (the VE path's
# sigma > 0), 'eps' needs a > 0 (the cosine schedule's last alpha_bar ~ 1e-5 > 0).
FLOW_PARAM_RECORDS: tuple[OpRecord, ...] = (
    _frec("prediction_convert", [Arg("pred", "data", ("B", "...")), Arg("x_t", "data", ("B", "...")),
                                 Arg("t_or_sigma", "unit_times", ("B",))],
          ("pred", "x_t"), (), 11, elementwise=True, has_native=False,
          hypers=(Hyper("source", "choice", _flow.PREDICTIONS), Hyper("target", "choice", _flow.PREDICTIONS),
                  _SCHEDULE, Hyper("sigma_data", "real", low=0.0)),
          variants=(_v(source="flow", target="eps"), _v(source="v", target="x0"),
                    _v(source="eps", target="edm_F", schedule=COSINE_SCHEDULE,
                       args=(Arg("t_or_sigma", "timesteps", ("B",)),)),
                    _v(source="x0", target="v", schedule="ve", args=(Arg("t_or_sigma", "noise_levels", ("B",)),)),
                    _v(source="edm_F", target="flow", sigma_data=1.0))),
)  # fmt: skip


# Losses (FLOW.20-FLOW.24): pseudo-Huber, EDM's denoiser loss, iCT's consistency training.
def _ct_sigma_low(rng, shape, sizes, hyper):
    """iCT's sigma_i: in [0.002, 1] (the Karras grid's low end); below every ``_ct_sigma_high``."""
    return rng.uniform(0.002, 1.0, size=shape)


def _ct_sigma_high(rng, shape, sizes, hyper):
    """iCT's sigma_(i+1): in [1.5, 80] (so sigma_next > sigma_i for any pairing of the two domains)."""
    return rng.uniform(1.5, 80.0, size=shape)


DOMAINS.update({
    "ct_sigma_low": Domain("iCT sigma_i, U(0.002, 1)", "float", _ct_sigma_low, extreme=False,
                           invalid=(-0.5, float("nan"))),
    # 0.0 < every sigma_i: refused as sigma_next <= sigma_i
    "ct_sigma_high": Domain("iCT sigma_(i+1), U(1.5, 80)", "float", _ct_sigma_high, extreme=False,
                            invalid=(0.0, float("nan"))),
})  # fmt: skip

_SIGMA = Arg("sigma", "noise_levels", ("B",))
_EDM2_LOGVAR = Arg("logvar", "logvar", ("B",), optional=True, keyword=True)
_HUBER_C = Hyper("c", "real", low=0.0)

FLOW_LOSS_RECORDS: tuple[OpRecord, ...] = (
    _frec("pseudo_huber_loss", [Arg("x", "data", ("B", "...")), Arg("y", "data", ("B", "...")), _WEIGHTS],
          ("x", "y", "weights"), ALL, 20, hypers=(_HUBER_C,),
          variants=(DEFAULT, _v(c=0.5, args=(_WEIGHTS,)), _v(c=30.0))),
    _frec("denoiser_loss", [Arg("F", "data", ("B", "...")), Arg("x0", "data", ("B", "...")),
                            Arg("noise", "data", ("B", "...")), _SIGMA, _EDM2_LOGVAR],
          ("F", "x0", "noise", "sigma", "logvar"), ALL, 21,
          hypers=(Hyper("sigma_data", "real", low=0.0), Hyper("weighting", "choice", _flow.DENOISER_WEIGHTINGS),
                  Hyper("gamma", "real", low=0.0)),
          variants=(DEFAULT, _v(weighting="karras", sigma_data=1.0, args=(_EDM2_LOGVAR,)),
                    _v(weighting="snr"), _v(weighting="soft_min_snr", args=(_EDM2_LOGVAR,)),
                    # min(1/sigma^2, gamma) has a kink at sigma = gamma^-1/2: inputs kept away from it
                    _v(weighting="min_snr", gamma=5.0,
                       args=(dataclasses.replace(_SIGMA, kinks=(5.0**-0.5,)), _EDM2_LOGVAR)))),
    # f_target is a stop-gradient target and the noise levels points of the discretization: not
    # differentiable (the torch op refuses them requiring grad)
    _frec("consistency_training_loss", [Arg("f_student", "data", ("B", "...")), Arg("f_target", "data", ("B", "...")),
                                        Arg("sigma_i", "ct_sigma_low", ("B",)),
                                        Arg("sigma_next", "ct_sigma_high", ("B",))],
          ("f_student",), ALL, 24, hypers=(_HUBER_C,), variants=(DEFAULT, _v(c=0.1))),
)  # fmt: skip


# Distillation (FLOW.30-FLOW.35): only the student's output (and sCM's logvar) is differentiable; the
# targets (teacher outputs, JVPs, times) requiring grad are refused by the torch op.  meanflow, vsd
# and sds are surrogates whose backward is not the derivative of their value (FLOW.30): fd=False,
# their frozen-weight finite differences are in tests/test_flow_distill.py.
def _trig_angles(rng, shape, sizes, hyper):
    """TrigFlow angles in [0, pi/2], both end points often."""
    t = rng.uniform(0.0, _flow.TRIGFLOW_T_MAX, size=shape)
    if t.size >= 2:
        t.flat[0], t.flat[-1] = 0.0, _flow.TRIGFLOW_T_MAX
    return t


def _inner_times(rng, shape, sizes, hyper):
    """MeanFlow's r: U(0.05, 0.95), so never equal to a ``unit_times`` t at its end points (at r = t
    du_dt does not enter, FLOW.33, and a NaN there would not reach the value)."""
    return rng.uniform(0.05, 0.95, size=shape)


DOMAINS.update({
    "trig_angles": Domain("TrigFlow angles in [0, pi/2], 0 and pi/2 included", "float", _trig_angles,
                          extreme=False, bounds=(0.0, _flow.TRIGFLOW_T_MAX), invalid=(-0.25, 2.0, float("nan"))),
    "inner_times": Domain("times in [0.05, 0.95]", "float", _inner_times, extreme=False, bounds=(0.0, 1.0),
                          invalid=(-0.25, 1.25, float("nan"))),
})  # fmt: skip

_DATA = ("B", "...")
_SURROGATE = _v(fd=False)

FLOW_DISTILL_RECORDS: tuple[OpRecord, ...] = (
    _frec("scm_loss", [Arg("F", "data", _DATA), Arg("F_minus", "data", _DATA), Arg("dF_dt", "data", _DATA),
                       Arg("x_t", "data", _DATA), Arg("dxt_dt", "data", _DATA), Arg("t", "trig_angles", ("B",)),
                       _EDM2_LOGVAR],
          ("F", "logvar"), ALL, 32,
          hypers=(Hyper("sigma_data", "real", low=0.0), Hyper("r", "real", low=0.0), _HUBER_C),
          variants=(DEFAULT, _v(sigma_data=1.0, r=0.3, c=1.0, args=(_EDM2_LOGVAR,)))),
    _frec("meanflow_loss", [Arg("u", "data", _DATA), Arg("v", "data", _DATA), Arg("du_dt", "data", _DATA),
                            _UNIT_T, Arg("r", "inner_times", ("B",))],
          ("u",), ALL, 33, hypers=(Hyper("p", "real", low=0.0), Hyper("eps", "real", low=0.0)),
          variants=(_SURROGATE, _v(fd=False, p=0.5, eps=1e-2), _v(fd=False, p=0.0))),
    _frec("vsd_loss", [Arg("x", "data", _DATA), Arg("x0_fake", "data", _DATA), Arg("x0_real", "data", _DATA)],
          ("x",), ALL, 34, variants=(_SURROGATE,)),
    _frec("sds_loss", [Arg("x", "data", _DATA), Arg("eps_pred", "data", _DATA), Arg("noise", "data", _DATA),
                       Arg("weights", "sample_weights", ("B",))],
          ("x",), ALL, 35, has_native=False, variants=(_SURROGATE,)),
)  # fmt: skip

RECORDS = FLOW_RECORDS + FLOW_PARAM_RECORDS + FLOW_LOSS_RECORDS + FLOW_DISTILL_RECORDS


# ============================================================================= verify cases
# The flow ops with several outputs (NOT_REGISTERED) are checked by ``genloss verify`` through these cases.
from .core import Out, case_factory  # noqa: E402

_fcase = case_factory("flow", _flow)


def _edm_draw(rng):
    """Noise levels log-uniform over EDM's range [0.002, 80] and beyond (1e-3..1e3)."""
    calls = []
    for sd in (0.5, 1.0):
        s = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), size=int(rng.integers(1, 8))))
        calls.append(((s,), {"sigma_data": sd}))
    return calls


def _shift_draw(rng):
    """Times in [0, 1], both end points; SD3's shift and Flux's mu (e^mu)."""
    calls = []
    for kw in ({"shift": 3.0}, {"shift": 0.4}, {"mu": 1.15}):
        t = rng.uniform(0.0, 1.0, size=int(rng.integers(2, 8)))
        t[0], t[-1] = 0.0, 1.0
        calls.append(((t,), kw))
    return calls


CASES = (
    _fcase("edm_preconditioning", _edm_draw,
           tuple(Out(n, grad=True) for n in ("c_skip", "c_out", "c_in", "c_noise")), differentiable=(0,),
           backward=lambda a, kw, up: list(_flow.edm_preconditioning_backward(a[0], tuple(up), **kw))),
    # dt'/dt is the reference's own second output: the gradient of t' (its upstream times dt'/dt);
    # dt'/dt itself is compared as a value
    _fcase("shift_timesteps", _shift_draw, (Out("t_shifted", grad=True), Out("dt_shifted_dt")),
           differentiable=(0,), backward=lambda a, kw, up: [up[0] * _flow.shift_timesteps(*a, **kw)[1]]),
)  # fmt: skip
