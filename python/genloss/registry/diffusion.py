"""The records of the diffusion family."""

from __future__ import annotations

import dataclasses

from ..reference import diffusion as _dif
from .core import ALL, DEFAULT, TWO, Arg, Hyper, OpRecord, Variant, _v, record_factory  # noqa: F401

# Short schedules keep the tests cheap; the cosine one reaches alpha_bar ~ 1e-5 at its end (beta
# clipped at 0.999), the linear one starts at beta = 1e-4 (alpha_bar ~ 1, snr ~ 1e4).
LINEAR_SCHEDULE = _dif.DiffusionSchedule(_dif.linear_betas(40, 1e-4, 0.2))
COSINE_SCHEDULE = _dif.DiffusionSchedule(_dif.cosine_betas(25))
_SCHEDULE = Hyper("schedule", "schedule")
_SCHEDULES = (_v(schedule=COSINE_SCHEDULE), _v(schedule=LINEAR_SCHEDULE))


_drec = record_factory("diffusion", _dif, "DIF")


_T = Arg("t", "timesteps", ("B",))
_WEIGHTS = Arg("weights", "sample_weights", ("B",), optional=True, keyword=True)
_V = Arg("model_log_variance", "unit_box", ("B", "..."), optional=True, keyword=True)


def _linear_rec(name, first, second, tag, first_domain="data"):
    return _drec(
        name,
        [Arg(first, first_domain, ("B", "...")), _T, Arg(second, "data", ("B", "..."))],
        (first, second),
        (),
        tag,
        hypers=(_SCHEDULE,),
        variants=_SCHEDULES,
        elementwise=True,
    )


DIFFUSION_RECORDS: tuple[OpRecord, ...] = (
    _linear_rec("q_sample", "x0", "noise", 2),
    _linear_rec("v_target", "x0", "noise", 14),
    _linear_rec("predict_x0_from_eps", "x_t", "eps", 7),
    _linear_rec("posterior_mean_from_eps", "x_t", "eps", 7),
    _drec("q_posterior", [Arg("x0", "data", ("B", "...")), Arg("x_t", "data", ("B", "...")), _T], ("x0", "x_t"),
          (), 3, hypers=(_SCHEDULE,), variants=_SCHEDULES, elementwise=True, value_index=0),
    _drec("eps_mse_loss", [Arg("eps_pred", "data", ("B", "...")), Arg("eps", "data", ("B", "...")), _WEIGHTS],
          ("eps_pred", "eps", "weights"), ALL, 12, variants=(DEFAULT, _v(args=(_WEIGHTS,)))),
    _drec("diffusion_mse_loss", [Arg("pred", "data", ("B", "...")), Arg("x0", "data", ("B", "...")),
                                 Arg("noise", "data", ("B", "...")), _T, _WEIGHTS],
          ("pred", "x0", "noise", "weights"), ALL, 12,
          hypers=(_SCHEDULE, Hyper("prediction", "choice", _dif.PREDICTIONS)),
          variants=(_v(schedule=COSINE_SCHEDULE, prediction="eps"),
                    _v(schedule=LINEAR_SCHEDULE, prediction="x0", args=(_WEIGHTS,)),
                    _v(schedule=COSINE_SCHEDULE, prediction="v", args=(_WEIGHTS,)))),
    _drec("vlb_term", [Arg("x0", "unit_box", ("B", "...")), Arg("x_t", "data", ("B", "...")), _T,
                       Arg("eps_pred", "data", ("B", "...")), _V],
          ("eps_pred", "model_log_variance"), ALL, 4, hypers=(_SCHEDULE, Hyper("bits", "int")),
          # (the linear schedule's beta_0 = 1e-4 makes the t = 0 decoder bin ~100 standard deviations
          # wide: values ~1e4, beyond what gradcheck's central differences resolve; the native tests
          # cover it with the fixed variance)
          variants=(_v(schedule=LINEAR_SCHEDULE), _v(schedule=COSINE_SCHEDULE, bits=5, args=(_V,)),
                    _v(schedule=COSINE_SCHEDULE,
                       args=(dataclasses.replace(_V, shape=("...",), broadcast=True),)))),
    _drec("prior_kl", [Arg("x0", "data", ("B", "..."))], ("x0",), ALL, 5, hypers=(_SCHEDULE,),
          variants=_SCHEDULES),
    _drec("discretized_gaussian_log_likelihood",
          [Arg("x", "levels", ("B", "..."), broadcast=True), Arg("means", "mean", ("B", "..."), broadcast=True),
           Arg("log_scales", "logvar", ("B", "..."), broadcast=True)],
          ("means", "log_scales"), (), 9, elementwise=True,
          hypers=(Hyper("bits", "int"), Hyper("cdf", "choice", ("exact", "tanh"))),
          # tanh: 1 - cdf in the upper tail cancels (the approximation's own conditioning), so central
          # differences of the forward are noise there; its derivative is checked by the identity tests
          variants=(DEFAULT, _v(bits=3), _v(cdf="tanh", fd=False),
                    _v(bits=4, args=(Arg("log_scales", "logvar", ("...",), broadcast=True),)))),
    _drec("vdm_continuous_loss", [Arg("eps", "data", ("B", "...")), Arg("eps_pred", "data", ("B", "...")),
                                  Arg("dgamma_dt", "mean", ("B",))],
          ("eps", "eps_pred", "dgamma_dt"), ALL, 16),
    _drec("vdm_discrete_loss", [Arg("eps", "data", ("B", "...")), Arg("eps_pred", "data", ("B", "...")),
                                Arg("gamma_t", "mean", ("B",)), Arg("gamma_s", "mean", ("B",))],
          ("eps", "eps_pred", "gamma_t", "gamma_s"), ALL, 17, hypers=(Hyper("T", "int"),),
          variants=(_v(T=1000), _v(T=3))),
    _drec("to_bits_per_dim", [Arg("nats", "data", ("B", "..."), broadcast=True)], ("nats",), (), 19, has_native=False,
          hypers=(Hyper("num_dims", "int"),), variants=(_v(num_dims=3072),), elementwise=True),
)  # fmt: skip

RECORDS = DIFFUSION_RECORDS
