"""The records of the flow family."""

from __future__ import annotations

import dataclasses

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

RECORDS = FLOW_RECORDS + FLOW_PARAM_RECORDS + FLOW_LOSS_RECORDS
