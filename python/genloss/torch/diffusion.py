r"""The diffusion family as torch custom ops (``torch.ops.genloss.<name>``) and helpers.

Signatures follow ``genloss.reference.diffusion``; ``schedule`` is a
:class:`DiffusionSchedule` (an ``nn.Module`` whose float64 buffers move with
``.to(device)``) or a ``genloss.reference.DiffusionSchedule`` (converted once and
cached).  The schedule reaches the fused kernels (``genloss.native.diffusion``) as a
small per-step float64 table held as a buffer, so a schedule is never rounded to the
input's precision; each sample's row is gathered inside the kernel at its timestep.

The custom ops take that table as a tensor argument (``torch.ops.genloss.q_sample(x0,
t, noise, table)``); each public function's ``lower(*args, **kwargs)`` returns the op
and the arguments it would call it with (used by the opcheck tests).

Schedule-level helpers with no per-element work (``snr_weights``,
``low_discrepancy_times``, ``to_bits_per_dim``, the schedules themselves) are plain
torch functions of the float64 buffers.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import _checks as C
from ..native import diffusion as native
from ..reference import diffusion as R
from ._op import LossOp, device_arg, eager_checks, float_dtype, kept_on, reference_doc, with_reference_doc

__all__ = [
    "DiffusionSchedule",
    "cosine_betas",
    "diffusion_mse_loss",
    "discretized_gaussian_log_likelihood",
    "eps_mse_loss",
    "full_bound",
    "linear_betas",
    "low_discrepancy_times",
    "posterior_mean_from_eps",
    "predict_x0_from_eps",
    "prior_kl",
    "q_posterior",
    "q_sample",
    "snr_weights",
    "to_bits_per_dim",
    "v_target",
    "vdm_continuous_loss",
    "vdm_discrete_loss",
    "vlb_term",
]

_LOW = (torch.float16, torch.bfloat16)

# ============================================================================= schedules

# Per-step tables of the kernels: name -> builder from the reference schedule (float64).
_TABLES: dict[str, Callable[[R.DiffusionSchedule], np.ndarray]] = {
    "q_sample": native._pair_table("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar"),
    "v_target": native._pair_table("sqrt_one_minus_alpha_bar", "sqrt_alpha_bar", sign_a=-1.0),
    "x0_from_eps": native._x0_table,
    "mean_from_eps": native._mean_table,
    "q_posterior": native._pair_table("posterior_mean_coef1", "posterior_mean_coef2"),
    "mse_eps": native._TARGETS["eps"],
    "mse_x0": native._TARGETS["x0"],
    "mse_v": native._TARGETS["v"],
    "vlb": native._vlb_table,
}


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas as a float64 tensor (``genloss.reference.linear_betas``).  (DIF.1)"""
    return torch.from_numpy(np.array(R.linear_betas(T, beta_start, beta_end)))


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule's betas as a float64 tensor (``genloss.reference.cosine_betas``).  (DIF.1)"""
    return torch.from_numpy(np.array(R.cosine_betas(T, s, max_beta)))


class DiffusionSchedule(torch.nn.Module):
    r"""A Gaussian diffusion's per-step quantities as float64 buffers (DIF.1-DIF.3, DIF.15).

    Built from ``betas`` (tensor or array, shape [T], entries in (0, 1]) or from a
    ``genloss.reference.DiffusionSchedule``.  The attributes are those of the reference
    schedule (``betas``, ``alphas``, ``alpha_bar``, ``alpha_bar_prev``, ``sqrt_alpha_bar``,
    ``sqrt_one_minus_alpha_bar``, ``posterior_variance``, ``posterior_log_variance_clipped``,
    ``posterior_mean_coef1``/``2``, ``log_snr``, ``snr``, ...), computed in float64 by the
    reference and registered as non-persistent buffers (derived from ``betas``), so
    ``.to(device)`` moves them and a state dict stays clean.  ``gather(name, t)`` gathers
    one per sample in float32 (or a dtype you name).  ``reference`` is the NumPy schedule.
    """

    # The buffers __init__ registers (reference.DiffusionSchedule._ARRAYS), declared for type
    # checkers, which otherwise read them as Module.__getattr__'s Tensor | Module.
    betas: torch.Tensor
    alphas: torch.Tensor
    log_alpha_bar: torch.Tensor
    alpha_bar: torch.Tensor
    one_minus_alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_snr: torch.Tensor
    snr: torch.Tensor

    def __init__(self, betas: Any) -> None:
        super().__init__()
        if isinstance(betas, R.DiffusionSchedule):
            ref = betas
        else:
            if isinstance(betas, torch.Tensor):
                betas = betas.detach().to("cpu", torch.float64).numpy()
            ref = R.DiffusionSchedule(betas)
        self.reference = ref
        self.num_timesteps = ref.num_timesteps
        self.alpha_bar_T = ref.alpha_bar_T  # a Python constant (prior_kl's op argument), not traced
        for name in R.DiffusionSchedule._ARRAYS:
            self.register_buffer(name, torch.from_numpy(np.array(getattr(ref, name))), persistent=False)
        for name, build in _TABLES.items():
            tab = np.asarray(build(ref), dtype=np.float64)
            self.register_buffer(f"_table_{name}", torch.from_numpy(tab.copy()), persistent=False)

    def __len__(self) -> int:
        return self.num_timesteps

    def extra_repr(self) -> str:
        return f"T={self.num_timesteps}"

    def table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The kernel table ``name`` (float64), on ``like``'s device."""
        tab = self._buffers["_table_" + name]  # not Module.__getattr__: this runs on every loss call
        assert tab is not None  # registered as a tensor in __init__ (the buffer dict also admits None)
        if tab.is_cpu and like.is_cpu:
            return tab
        return self._placed("_table_" + name, tab, like)

    def gather(self, name: str, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``self.<name>[t]`` in ``dtype`` (float32 by default), on ``t``'s device. ``t``: integer
        timesteps in [0, T) (checked where data checks run, ``eager_checks``: a negative one
        would otherwise wrap around to the end of the schedule, silently)."""
        if name not in R.DiffusionSchedule._ARRAYS:
            raise ValueError(
                f"DiffusionSchedule.gather: name must be one of {R.DiffusionSchedule._ARRAYS}, got {name!r}"
            )
        if (
            not isinstance(t, torch.Tensor)
            or t.is_floating_point()
            or t.is_complex()
            or t.dtype == torch.bool
        ):
            raise TypeError(
                f"DiffusionSchedule.gather: t must be an integer torch.Tensor, got {getattr(t, 'dtype', type(t))}"
            )
        float_dtype("DiffusionSchedule.gather", dtype)
        if eager_checks(t) and t.numel() and t.device.type != "meta":  # meta: no data to check
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(
                    f"DiffusionSchedule.gather: t must lie in [0, {self.num_timesteps}), got range [{lo}, {hi}]"
                )
        return self._gather(name, t, dtype)

    def _gather(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``gather`` for the ops' own use, whose ``t`` they have checked (no second read-back)."""
        values = self._placed(name, getattr(self, name), t)
        return values[t.long()].to(dtype)

    def _placed(self, name: str, tab: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``tab`` on ``like``'s device, copied once per device and kept (``_op.kept_on``: a
        schedule is constant)."""
        if tab.device == like.device:
            return tab
        if type(tab) is not torch.Tensor:  # a fake or traced buffer: its own mode's copy
            return tab.to(like.device)
        return kept_on(
            self.__dict__.setdefault("_genloss_placed", {}), name, like, lambda: tab.to(like.device)
        )


def _as_schedule(schedule: Any) -> DiffusionSchedule:
    if isinstance(schedule, DiffusionSchedule):
        return schedule
    if isinstance(schedule, R.DiffusionSchedule):
        cached = schedule.__dict__.get("_genloss_torch")
        if cached is None:
            # Built outside inference mode (its tables may later be saved for backward), and kept
            # only when its buffers are ordinary tensors: one built from fake tensors (a
            # FakeTensorMode) or under a functorch transform serves that call alone.
            if torch.compiler.is_compiling():  # traced once; the cache then holds ordinary tensors
                cached = schedule.__dict__["_genloss_torch"] = DiffusionSchedule(schedule)
                return cached
            if torch.is_inference_mode_enabled():
                with torch.inference_mode(False):
                    cached = DiffusionSchedule(schedule)
            else:
                cached = DiffusionSchedule(schedule)
            if all(type(b) is torch.Tensor and not b.is_inference() for b in cached.buffers()):
                schedule.__dict__["_genloss_torch"] = cached
        return cached
    kind = type(schedule)
    raise TypeError(f"schedule must be a DiffusionSchedule, got {kind.__module__}.{kind.__qualname__}")


def _tensor(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


# ============================================================================= the ops


def _named_linear(names, what=None):
    def fn(first, t, second, table, *, need_grad=True):
        return native.linear_with_table(names, (first, second), t, table, need_grad, what)

    return fn


# name: (schema, native function, options); the differentiable arguments come from the registry record
_OPS: dict[str, tuple[str, Callable, dict]] = {
    "q_sample": (
        "Tensor x0, Tensor t, Tensor noise, Tensor table",
        _named_linear(("x0", "noise")),
        {"value_like": "x0"},
    ),
    "v_target": (
        "Tensor x0, Tensor t, Tensor noise, Tensor table",
        _named_linear(("x0", "noise")),
        {"value_like": "x0"},
    ),
    "predict_x0_from_eps": (
        "Tensor x_t, Tensor t, Tensor eps, Tensor table",
        _named_linear(("x_t", "eps"), ("alpha_bar", "x0")),
        {"value_like": "x_t"},
    ),
    "posterior_mean_from_eps": (
        "Tensor x_t, Tensor t, Tensor eps, Tensor table",
        _named_linear(("x_t", "eps"), ("alphas", "the posterior mean")),
        {"value_like": "x_t"},
    ),
    "q_posterior_mean": (
        "Tensor x0, Tensor t, Tensor x_t, Tensor table",
        _named_linear(("x0", "x_t")),
        {"value_like": "x0", "differentiable": ("x0", "x_t")},
    ),
    "eps_mse_loss": (
        "Tensor eps_pred, Tensor eps, Tensor? weights=None, str reduction='mean'",
        native.eps_mse_loss,
        {},
    ),
    "diffusion_mse_loss": (
        "Tensor pred, Tensor x0, Tensor noise, Tensor t, Tensor table, Tensor? weights=None, "
        "str reduction='mean'",
        native.diffusion_mse_with_table,
        {},
    ),
    "vlb_term": (
        "Tensor x0, Tensor x_t, Tensor t, Tensor eps_pred, Tensor table, Tensor? model_log_variance=None, "
        "str reduction='none', int bits=8",
        native.vlb_with_table,
        {},
    ),
    "prior_kl": (
        "Tensor x0, float alpha_bar_T, str reduction='none'",
        native.prior_kl_from_alpha_bar,
        {},
    ),
    "discretized_gaussian_log_likelihood": (
        "Tensor x, Tensor means, Tensor log_scales, int bits=8, str cdf='exact'",
        native.discretized_gaussian_log_likelihood,
        {"elementwise": True},
    ),
    "vdm_continuous_loss": (
        "Tensor eps, Tensor eps_pred, Tensor dgamma_dt, str reduction='mean'",
        native.vdm_continuous_loss,
        {},
    ),
    "vdm_discrete_loss": (
        "Tensor eps, Tensor eps_pred, Tensor gamma_t, Tensor gamma_s, int T, str reduction='mean'",
        native.vdm_discrete_loss,
        {},
    ),
}


def _widen(t: torch.Tensor, shape) -> torch.Tensor:
    return t.float() if t.dtype in _LOW and tuple(t.shape) != tuple(shape) else t


def _broadcast_dgll(args: list) -> list:
    """x, means, log_scales broadcast together with torch ops (autograd sums the gradients back)."""
    ts = args[:3]
    if all(isinstance(t, torch.Tensor) for t in ts):
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in ts))
        except RuntimeError:
            got = ", ".join(
                f"{n} {tuple(t.shape)}" for n, t in zip(("x", "means", "log_scales"), ts, strict=True)
            )
            raise ValueError(f"x, means, log_scales must broadcast together, got {got}") from None
        args[:3] = torch.broadcast_tensors(*(_widen(t, shape) for t in ts))
    return args


def _expand_model_log_variance(args: list) -> list:
    """vlb_term's v broadcast to x0's shape before the kernel (autograd sums it back)."""
    x0, v = args[0], args[5]
    if isinstance(v, torch.Tensor) and isinstance(x0, torch.Tensor):
        try:
            args[5] = _widen(v, x0.shape).expand(x0.shape)
        except RuntimeError:
            raise ValueError(
                f"model_log_variance must broadcast to the shape of x0 {tuple(x0.shape)}, got shape {tuple(v.shape)}"
            ) from None
    return args


_PREPARE = {
    "discretized_gaussian_log_likelihood": _broadcast_dgll,
    "vlb_term": _expand_model_log_variance,
}

OPS: dict[str, LossOp] = {
    name: LossOp(name, schema, fn, prepare=_PREPARE.get(name), constants=("table",), **opts)
    for name, (schema, fn, opts) in _OPS.items()
}


def _public(name: str, lower: Callable[..., tuple[list, dict]], doc: str) -> Callable[..., torch.Tensor]:
    """The public function: its arguments lowered to the op's (schedule -> table), then the op.
    Its signature is the lowering's (the reference's), its docstring ``doc`` followed by the
    reference's."""
    op = OPS[name]
    sig = inspect.signature(getattr(R, name, lower))  # the reference's argument names

    def fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            a, kw = lower(*args, **kwargs)
        except TypeError:
            try:
                sig.bind(*args, **kwargs)
            except TypeError as e:  # a bad call: say so in the public function's words
                raise TypeError(f"{name}(): {e}") from None
            raise
        return op(*a, **kw)

    def lowered(*args: Any, **kwargs: Any):
        a, kw = lower(*args, **kwargs)
        return getattr(torch.ops.genloss, name), a, kw

    fn.__name__ = fn.__qualname__ = name
    ref = reference_doc(name)
    fn.__doc__ = doc + (
        f"\n\n    The NumPy reference (``genloss.reference.{name}``):\n\n    " + ref.strip() if ref else ""
    )
    fn.__signature__ = sig  # type: ignore[attr-defined]
    fn.lower = lowered  # type: ignore[attr-defined]
    fn.op = op  # type: ignore[attr-defined]
    return fn


def _lower_linear(table_name: str, first: str, second: str):
    def lower(a, t, b, schedule):
        s = _as_schedule(schedule)
        return [a, t, b, s.table(table_name, _tensor(first, a))], {}

    return lower


q_sample = _public(
    "q_sample",
    _lower_linear("q_sample", "x0", "noise"),
    r"""``q_sample(x0, t, noise, schedule)``: :math:`\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\epsilon`,
    differentiable in x0 and noise.  (DIF.2)""",
)
v_target = _public(
    "v_target",
    _lower_linear("v_target", "x0", "noise"),
    r"""``v_target(x0, t, noise, schedule)``: :math:`\sqrt{\bar\alpha_t}\epsilon - \sqrt{1-\bar\alpha_t}x_0`.  (DIF.14)""",
)
predict_x0_from_eps = _public(
    "predict_x0_from_eps",
    _lower_linear("x0_from_eps", "x_t", "eps"),
    r"""``predict_x0_from_eps(x_t, t, eps, schedule)``: :math:`(x_t - \sqrt{1-\bar\alpha_t}\epsilon)/\sqrt{\bar\alpha_t}`;
    a ValueError at steps with :math:`\bar\alpha_t = 0`.  (DIF.7)""",
)
posterior_mean_from_eps = _public(
    "posterior_mean_from_eps",
    _lower_linear("mean_from_eps", "x_t", "eps"),
    r"""``posterior_mean_from_eps(x_t, t, eps, schedule)``: :math:`(x_t - \beta_t\epsilon/\sqrt{1-\bar\alpha_t})/\sqrt{\alpha_t}`;
    a ValueError at steps with :math:`\alpha_t = 0`.  (DIF.7)""",
)
_q_posterior_mean = _public("q_posterior_mean", _lower_linear("q_posterior", "x0", "x_t"), "")


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Any):
    r"""(mean, variance, log_variance) of :math:`q(x_{t-1}\mid x_t, x_0)`, each of x0's shape (DIF.3).

    The mean is differentiable in x0 and x_t (one fused pass); the variance
    :math:`\tilde\beta_t` and ``posterior_log_variance_clipped`` are the schedule's,
    gathered per sample in the compute type and broadcast (constants).
    """
    s = _as_schedule(schedule)
    mean = _q_posterior_mean(x0, t, x_t, s)
    view = (-1,) + (1,) * (x0.dim() - 1)
    dt = mean.dtype
    variance = s._gather("posterior_variance", t, dt).reshape(view).expand(x0.shape)
    log_variance = s._gather("posterior_log_variance_clipped", t, dt).reshape(view).expand(x0.shape)
    return mean, variance, log_variance


def _lower_eps_mse(eps_pred, eps, weights=None, reduction="mean"):
    return [eps_pred, eps, weights, reduction], {}


eps_mse_loss = _public(
    "eps_mse_loss",
    _lower_eps_mse,
    r"""``eps_mse_loss(eps_pred, eps, weights=None, reduction='mean')``: per sample
    :math:`w_b\,\mathrm{mean}_i(\epsilon - \hat\epsilon)^2` (L_simple); differentiable in all three.  (DIF.12)""",
)


def _lower_mse(pred, x0, noise, t, schedule, prediction="eps", weights=None, reduction="mean"):
    prediction = C.choice("prediction", prediction, R.PREDICTIONS)
    table = _as_schedule(schedule).table(f"mse_{prediction}", _tensor("pred", pred))
    return [pred, x0, noise, t, table, weights, reduction], {}


diffusion_mse_loss = _public(
    "diffusion_mse_loss",
    _lower_mse,
    r"""``diffusion_mse_loss(pred, x0, noise, t, schedule, prediction='eps', weights=None, reduction='mean')``:
    per sample :math:`w_b\,\mathrm{mean}_i(y - \hat y)^2` with the target y (eps, x0 or v) built inside
    ONE fused kernel that reads pred, x0 and noise once; differentiable in pred, x0, noise and weights
    (a jointly trained encoder and learned loss weights train).  (DIF.12, DIF.14)""",
)


def _lower_vlb(x0, x_t, t, eps_pred, schedule, model_log_variance=None, reduction="none", bits=8):
    table = _as_schedule(schedule).table("vlb", _tensor("x0", x0))
    return [x0, x_t, t, eps_pred, table, model_log_variance, reduction, bits], {}


vlb_term = _public(
    "vlb_term",
    _lower_vlb,
    r"""``vlb_term(x0, x_t, t, eps_pred, schedule, model_log_variance=None, reduction='none', bits=8)``:
    per sample in nats, the KL between the forward posterior and the model's Gaussian for t > 0 and the
    discretized decoder NLL at t = 0, in ONE fused kernel; differentiable in eps_pred and
    model_log_variance (improved-diffusion's learned-range v).  (DIF.4-DIF.9)""",
)


def _lower_prior_kl(x0, schedule, reduction="none"):
    return [x0, _as_schedule(schedule).alpha_bar_T, reduction], {}


prior_kl = _public(
    "prior_kl",
    _lower_prior_kl,
    r"""``prior_kl(x0, schedule, reduction='none')``: :math:`L_T = \mathrm{KL}(q(x_T\mid x_0)\Vert\mathcal N(0,I))`
    per sample in nats; differentiable in x0.  (DIF.5)""",
)


def _lower_dgll(x, means, log_scales, bits=8, cdf="exact"):
    return [x, means, log_scales, bits, cdf], {}


discretized_gaussian_log_likelihood = _public(
    "discretized_gaussian_log_likelihood",
    _lower_dgll,
    r"""``discretized_gaussian_log_likelihood(x, means, log_scales, bits=8, cdf='exact')``: elementwise
    log-probability of x's bin (2^bits levels in [-1, 1], edge bins open), broadcasting; differentiable in
    means and log_scales.  (DIF.9-DIF.11)""",
)


def _lower_vdm_c(eps, eps_pred, dgamma_dt, reduction="mean"):
    return [eps, eps_pred, dgamma_dt, reduction], {}


vdm_continuous_loss = _public(
    "vdm_continuous_loss",
    _lower_vdm_c,
    r"""``vdm_continuous_loss(eps, eps_pred, dgamma_dt, reduction='mean')``: per sample
    :math:`\tfrac12\gamma'(t)\lVert\epsilon - \hat\epsilon\rVert^2`; differentiable in all three (so a
    learned schedule's :math:`\gamma'` gets its gradient).  (DIF.16)""",
)


def _lower_vdm_d(eps, eps_pred, gamma_t, gamma_s, T, reduction="mean"):
    return [eps, eps_pred, gamma_t, gamma_s, T, reduction], {}


vdm_discrete_loss = _public(
    "vdm_discrete_loss",
    _lower_vdm_d,
    r"""``vdm_discrete_loss(eps, eps_pred, gamma_t, gamma_s, T, reduction='mean')``: per sample
    :math:`\tfrac T2\operatorname{expm1}(\gamma_t - \gamma_s)\lVert\epsilon - \hat\epsilon\rVert^2`.  (DIF.17)""",
)


# ============================================================================= schedule-level helpers


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.logsigmoid(x)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # max(x, 0) + log1p(e^{-|x|}): finite at x = +-inf (torch's softplus is too, but keep it explicit)
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-x.abs()))


def _log_weight(lam: torch.Tensor, log_gamma: float, kind: str, prediction: str) -> torch.Tensor:
    """log w(lambda) of the SNR weightings, as the reference's ``_log_weight`` (DIF.15)."""
    zero = torch.zeros_like(lam)
    if prediction == "x0":
        table = {
            "snr": lambda: lam,
            "min_snr": lambda: torch.clamp(lam, max=log_gamma),
            "soft_min_snr": lambda: log_gamma + _log_sigmoid(lam - log_gamma),
            "truncated_snr": lambda: torch.clamp(lam, min=0.0),
        }
    elif prediction == "eps":
        table = {
            "snr": lambda: zero,
            "min_snr": lambda: torch.clamp(log_gamma - lam, max=0.0),
            "soft_min_snr": lambda: _log_sigmoid(log_gamma - lam),
            "truncated_snr": lambda: torch.clamp(-lam, min=0.0),
        }
    else:
        table = {
            "snr": lambda: _log_sigmoid(lam),
            "min_snr": lambda: torch.clamp(lam, max=log_gamma) - _softplus(lam),
            "soft_min_snr": lambda: log_gamma + _log_sigmoid(lam - log_gamma) - _softplus(lam),
            "truncated_snr": lambda: _log_sigmoid(lam.abs()),
        }
    return table[kind]()


def snr_weights(
    t: torch.Tensor,
    schedule: Any,
    kind: str = "min_snr",
    prediction: str = "eps",
    gamma: float = 5.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Per-sample weights of the SNR family, from the float64 log-SNR, returned in ``dtype``
    (float32 by default).  Same kinds, table and errors as ``genloss.reference.snr_weights``:
    finite at SNR = 0 and SNR = inf for every bounded weight; a ValueError where an unbounded
    one (e.g. 'snr' for 'x0' at SNR = inf) is hit.  (DIF.15)"""
    s = _as_schedule(schedule)
    kind = C.choice("kind", kind, R.SNR_WEIGHTINGS)
    prediction = C.choice("prediction", prediction, R.PREDICTIONS)
    log_gamma = math.log(C.positive("gamma", gamma))
    float_dtype("snr_weights", dtype)  # int64 weights would be 0s
    t = _tensor("t", t)
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D (one timestep per sample), got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"t must be int64 or int32, got {t.dtype}")
    eager = eager_checks(t) and t.numel() > 0
    if eager:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= s.num_timesteps:
            raise ValueError(f"t must lie in [0, {s.num_timesteps}), got range [{lo}, {hi}]")
    lam = s._gather("log_snr", t, torch.float64)
    w = torch.exp(_log_weight(lam, log_gamma, kind, prediction))
    if eager:
        if not bool(torch.isfinite(w).all()):
            bad = int(t[~torch.isfinite(w)][0])
            raise ValueError(
                f"kind={kind!r} with prediction={prediction!r} has an unbounded weight, infinite at "
                f"t = {bad} (log SNR = {float(s.log_snr[bad])}); use prediction='v' or a bounded kind"
            )
    return w.to(dtype)


def low_discrepancy_times(
    batch_size: int,
    u0: float,
    rank: int = 0,
    world_size: int = 1,
    *,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Stratified times in [0, 1) across data-parallel ranks, as ``genloss.reference.low_discrepancy_times``
    (computed in float64 on ``device``, bit for bit the reference's), returned in ``dtype``.  Rounding to
    float32 never yields 1.0: such a time is mapped to the largest float below 1.  (DIF.18)"""
    R.low_discrepancy_times(1, u0, rank, world_size)  # the reference's checks of u0, rank and world_size
    batch_size = C.positive_int("batch_size", batch_size)
    device = device_arg("low_discrepancy_times", device)
    dtype = float_dtype("low_discrepancy_times", dtype)
    out = _stratified_grid(u0, batch_size, rank, world_size, device).to(dtype)
    below_one = float(torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype)))
    return torch.where(out >= 1.0, below_one, out)  # a Python float: exact in dtype, no host copy


def _stratified_grid(
    u0: Any, batch_size: int, rank: int, world_size: int, device: Any = None
) -> torch.Tensor:
    r"""(DIF.18) rank ``rank``'s share :math:`(u_0 + j/k) \bmod 1`, j = rank B, ..., rank B + B - 1, k = B W,
    in float64 on ``device`` (``u0``: a float, or a 0-d float64 tensor there): the reference's two
    operations, so the same u0 gives its grid bit for bit, made where it is used (no host copy).
    The arguments are the caller's to check."""
    j = rank * batch_size + torch.arange(batch_size, device=device, dtype=torch.float64)
    return torch.remainder(u0 + j / (batch_size * world_size), 1.0)


@with_reference_doc
def to_bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    r"""nats / (num_dims log 2), differentiable (float16/bfloat16 computed and returned in float32,
    as the losses).  (DIF.19)"""
    num_dims = C.positive_int("num_dims", num_dims)
    nats = _tensor("nats", nats)
    if not nats.is_floating_point():
        raise TypeError(f"nats must be a floating tensor, got {nats.dtype}")
    return (nats.float() if nats.dtype in _LOW else nats) / (num_dims * math.log(2.0))


@torch.no_grad()
def full_bound(
    x0: torch.Tensor,
    model_eps_fn: Callable[..., Any],
    schedule: Any,
    generator: torch.Generator | None = None,
    bits: int = 8,
) -> torch.Tensor:
    r"""The variational bound :math:`L_T + \sum_t L_{t-1} + L_0` per sample in nats (DIF.4), one fresh
    noise draw per step (as improved-diffusion's ``calc_bpd_loop``); ``model_eps_fn(x_t, t)`` returns
    eps_pred or (eps_pred, v).  ``to_bits_per_dim(full_bound(...), x0[0].numel())`` gives bits/dim.
    Accumulates in float64 whatever the input dtype."""
    s = _as_schedule(schedule)
    x0 = _tensor("x0", x0)
    if not callable(model_eps_fn):
        raise TypeError("model_eps_fn must be callable")
    total = prior_kl(x0, s, "none").double()
    for step in range(s.num_timesteps):
        t = torch.full((x0.shape[0],), step, dtype=torch.int64, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = q_sample(x0, t, noise, s)
        out = model_eps_fn(x_t, t)
        eps_pred, v = out if isinstance(out, tuple) else (out, None)
        total += vlb_term(x0, x_t, t, eps_pred, s, v, "none", bits).double()
    return total
