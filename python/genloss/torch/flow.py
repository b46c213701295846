r"""The continuous-time (flow) family as torch ops (``torch.ops.genloss.<name>``).

``flow_matching_loss`` is a custom op on the fused native kernel (see ``_op.py`` for
the registration), differentiable w.r.t. every float input (pred, x0, noise, t and
weights).  ``flow_interpolant`` is two multiply-adds: a composite of torch ops, so
autograd (double backward included) and ``torch.compile`` see through it.  No math
here beyond that line; it is derived in derivations/flow.md (FLOW.1, FLOW.2).

The distillation losses ``scm_loss``, ``meanflow_loss`` and ``vsd_loss`` are custom ops on
their native compositions, ``sds_loss`` a custom op on a torch kernel (no native one):
differentiable w.r.t. the student's output only (and sCM's ``logvar``); a target that
requires grad is refused, named (FLOW.30).

The samplers' densities, CDFs and quantiles (``timestep_density`` / ``_cdf`` / ``_quantile``) and
``ict_sigma_probs`` are data for sampling and weighting, not differentiated: an input that requires
grad is refused (SPEC: never a silently dropped gradient).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from .. import _checks as C
from ..native import flow as native
from ..native._compose import needs
from ..reference import flow as ref
from ._op import LossOp, device_arg, eager_checks, float_dtype, kept_on, public, schema_of
from .diffusion import DiffusionSchedule as _TorchSchedule
from .diffusion import _stratified_grid

__all__ = [
    "consistency_training_loss",
    "denoiser_loss",
    "edm_preconditioning",
    "flow_interpolant",
    "flow_matching_loss",
    "flux_mu",
    "ict_num_steps",
    "ict_sigma_probs",
    "karras_sigmas",
    "meanflow_loss",
    "prediction_convert",
    "pseudo_huber_loss",
    "sample_timesteps",
    "scm_loss",
    "sds_loss",
    "shift_timesteps",
    "timestep_cdf",
    "timestep_density",
    "timestep_quantile",
    "vsd_loss",
]

# schema, differentiable arguments (pred, x0, noise, t, weights) and docstring from the record
flow_matching_loss = public(
    LossOp("flow_matching_loss", schema_of("flow_matching_loss"), native.flow_matching_loss), __name__
)


# (FLOW.20) differentiable: x, y, weights
pseudo_huber_loss = public(
    LossOp("pseudo_huber_loss", schema_of("pseudo_huber_loss"), native.pseudo_huber_loss), __name__
)
# (FLOW.21-FLOW.23) differentiable: F, x0, noise, sigma, logvar
denoiser_loss = public(LossOp("denoiser_loss", schema_of("denoiser_loss"), native.denoiser_loss), __name__)
# (FLOW.24) differentiable: f_student only; f_target (a stop-gradient target) and the noise levels
# requiring grad are refused with an error naming them
consistency_training_loss = public(
    LossOp(
        "consistency_training_loss", schema_of("consistency_training_loss"), native.consistency_training_loss
    ),
    __name__,
)


# (FLOW.30-FLOW.35) distillation: differentiable w.r.t. the student's output only (and sCM's logvar);
# the targets (teacher outputs, JVPs, times, SDS weights) requiring grad are refused, named
scm_loss = public(LossOp("scm_loss", schema_of("scm_loss"), native.scm_loss), __name__)
meanflow_loss = public(LossOp("meanflow_loss", schema_of("meanflow_loss"), native.meanflow_loss), __name__)
vsd_loss = public(LossOp("vsd_loss", schema_of("vsd_loss"), native.vsd_loss), __name__)


def _sds_kernel(
    x: torch.Tensor, eps_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor, reduction: str = "mean",
    *, need_grad: Any = True,
) -> tuple[torch.Tensor, tuple]:  # fmt: skip
    """sds_loss's kernel (SPEC asks no native one): torch arithmetic on any device, in the
    ``(value, grads)`` form of ``genloss.native``, so the op is a custom op like the fused losses."""
    _same_floats("sds_loss", (("x", x), ("eps_pred", eps_pred), ("noise", noise), ("weights", weights)))
    with ref.named_errors("sds_loss"):
        C.reduction(reduction)
        for name, a in (("x", x), ("eps_pred", eps_pred), ("noise", noise)):
            C.batched(name, tuple(a.shape), reduction)
            C.same_shape("x", tuple(x.shape), name, tuple(a.shape))
        if tuple(weights.shape) != (x.shape[0],):
            raise ValueError(
                f"weights must have shape ({x.shape[0]},) (one value per sample), got {tuple(weights.shape)}"
            )
        lo, hi = (float(v) for v in weights.detach().aminmax()) if eager_checks(weights) else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("weights must be finite")
        if lo < 0.0:
            raise ValueError(f"weights must be >= 0, got min {lo}")
    (flag,) = needs(need_grad, 1)
    # (FLOW.35) + 0 x: NaN / inf in x gives NaN as the literal x - sg(x - grad) does (reference._sds_inputs)
    grad = weights.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1)) * (eps_pred - noise) + 0.0 * x
    per = 0.5 * grad.square().reshape(x.shape[0], -1).sum(1)
    value = per if reduction == "none" else (per.mean() if reduction == "mean" else per.sum())
    if not flag:
        return value, ()
    return value, (grad / x.shape[0] if reduction == "mean" else grad,)


sds_loss = public(LossOp("sds_loss", schema_of("sds_loss"), _sds_kernel), __name__)


def flow_interpolant(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    with ref.named_errors("flow_interpolant"):
        c = 1.0 - ref.sigma_min_value(sigma_min)
        _same_floats("flow_interpolant", (("x0", x0), ("noise", noise), ("t", t)))
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if x0.dim() < 1 or tuple(t.shape) != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0] if x0.dim() else '?'},) (one time per sample)")
        if x0.numel() == 0:
            raise ValueError(f"x0 has no elements (shape {tuple(x0.shape)})")
        if eager_checks(t):  # a data-dependent check: eager only
            lo, hi = (float(v) for v in t.detach().aminmax()) if t.numel() else (0.0, 0.0)
            ref.check_times(torch.tensor([lo, hi], dtype=torch.float64).numpy())
    # float16 / bfloat16 inputs: computed in float32 (autograd rounds the gradients back)
    x0, noise, t = (a.float() if a.dtype in (torch.float16, torch.bfloat16) else a for a in (x0, noise, t))
    tb = t.reshape((-1,) + (1,) * (x0.dim() - 1))
    return (1.0 - c * tb) * x0 + tb * noise  # (FLOW.1)


flow_interpolant.__doc__ = ref.flow_interpolant.__doc__


# ============================================================================= samplers, shifts, parameterizations
# Plain torch functions (no custom op: nothing here is a fused loss).  The samplers and densities
# run the float64 reference on the (n,) vector; shift_timesteps, edm_preconditioning and
# prediction_convert are float64 torch arithmetic on (B,) coefficients, differentiable by autograd
# (double backward included) and traceable by torch.compile (their data-dependent checks run in
# eager only).  The math is derived in derivations/flow.md (FLOW.6-FLOW.12).

_LOW = (torch.float16, torch.bfloat16)
flux_mu = ref.flux_mu  # Python floats in, a float out
ict_num_steps = ref.ict_num_steps  # ints in, an int out


def _tensor(op: str, name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {x.dtype}")
    return x


def _same_floats(op: str, named: tuple[tuple[str, Any], ...]) -> None:
    """Floating tensors of one dtype on one device, as genloss.native asks of a fused loss's inputs
    (for the ops computed in torch here: no silent promotion, no integer truncation)."""
    first_name, first = named[0][0], _tensor(op, *named[0])
    for name, a in named[1:]:
        if _tensor(op, name, a).dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} must have the dtype of {first_name} ({first.dtype}), got {a.dtype}"
            )
        if a.device != first.device:
            raise ValueError(
                f"{op}: {name} must be on the device of {first_name} ({first.device}), got {a.device}"
            )


def _no_grad_input(op: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """SPEC: a gradient is given or refused at forward time, never silently dropped."""
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad, but {op} is not differentiable (its values are "
                         f"data for sampling and weighting); pass {name}.detach()")  # fmt: skip
    return x


def _eager_check(fn: Callable[..., Any], *tensors: torch.Tensor, **kwargs: Any) -> None:
    """Run the reference's argument checks on the values (data-dependent: when ``eager_checks``)."""
    if all(eager_checks(t) for t in tensors):
        fn(*(t.detach().cpu().double().numpy() for t in tensors), **kwargs)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW else x.dtype  # float16 / bfloat16: computed in float32


def _torch_generator(generator: Any) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        with ref.named_errors("sample_timesteps"):  # a torch.Generator's seed is 64 bits
            return torch.Generator().manual_seed(C.seed("generator", generator, below=2**64))
    raise TypeError(f"sample_timesteps: generator must be a torch.Generator, an int seed or None, "
                    f"got {type(generator).__name__}")  # fmt: skip


def sample_timesteps(
    n: int, kind: str = "uniform", generator: Any = None, m: float = 0.0, s: float = 1.0, scale: float = 1.29,
    p_mean: float = -1.2, p_std: float = 1.2, stratified: bool = False, rank: int = 0, world_size: int = 1,
    *, device: Any = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # fmt: skip
    r"""``genloss.reference.sample_timesteps`` with uniform draws from a ``torch.Generator`` (an int seed:
    a CPU one; None: torch's global CPU generator), mapped by the inverse CDF in float64 torch ops on
    the generator's device (``reference.timestep_map``), returned in ``dtype`` (float32 by default) on
    ``device`` (default: the generator's).  (FLOW.6-FLOW.8)

    A generator on the GPU (``torch.Generator(device='cuda')``) draws and maps there: no host round
    trip, and a CUDA graph captures the call (register the generator with the graph, as for any
    random op). Given the same uniform draws u, the times equal the reference's to the last bits of
    torch's functions; the draws themselves come from torch's generator, not NumPy's, so one seed
    gives different times here and in ``reference.sample_timesteps``. torch.compile does not trace the generator:
    call it outside the compiled step, or compile ``timestep_quantile(u, kind, ...)`` of your own
    draws ``u``."""
    dtype, device = float_dtype("sample_timesteps", dtype), device_arg("sample_timesteps", device)
    with ref.named_errors("sample_timesteps"):
        kind, params = ref._timestep_params(kind, m, s, scale, p_mean, p_std, draws_in=torch.finfo(dtype))
        n = C.positive_int("n", n)
        if C.flag("stratified", stratified) and world_size != 1 and generator is None:
            raise ValueError("generator must be given (the same seed on every rank) for stratified draws")
        ref._dif.low_discrepancy_times(1, 0.0, rank, world_size)  # the checks of rank and world_size
        g = _torch_generator(generator)
    where = g.device if g is not None else torch.device("cpu")
    if stratified:  # (DIF.18) one u0 shared by the ranks, then this rank's share of the job's grid
        u0 = torch.rand((), generator=g, device=where, dtype=torch.float64)
        u = _stratified_grid(u0, n, rank, world_size, where)
    else:
        u = torch.rand(n, generator=g, device=where, dtype=torch.float64)
    t = ref.timestep_map("quantile", u.clamp(ref._U_LOW, ref._U_HIGH), kind, params, _TORCH_OPS)  # (FLOW.8)
    return t.to(device=where if device is None else device, dtype=dtype)


# The array functions of ``reference.timestep_map`` on tensors: the same lines of FLOW.3, FLOW.6 and
# FLOW.7 run on the data's device (no host round trip; a CUDA graph captures them, torch.compile
# traces them). Phi by erfc: torch.special.ndtr computes 1 + erf and returns 0 below z ~ -8.5
# (derivations FLOW.6).
_SQRT_HALF = math.sqrt(0.5)
_TORCH_OPS = SimpleNamespace(
    sin=torch.sin, cos=torch.cos, sqrt=torch.sqrt, exp=torch.exp, log=torch.log, log1p=torch.log1p,
    arctan2=torch.atan2, isfinite=torch.isfinite, where=torch.where, zeros_like=torch.zeros_like,
    ones_like=torch.ones_like, ndtri=torch.special.ndtri, ndtr=lambda z: 0.5 * torch.special.erfc(-z * _SQRT_HALF),
    sigmoid=torch.sigmoid, quiet=contextlib.nullcontext,
)  # fmt: skip


def _timestep_map(op: str, name: str, x: torch.Tensor, kind: str, params: tuple) -> torch.Tensor:
    """``reference.<op>`` on a tensor: float64 on its device, returned in its dtype (float32 for float16 /
    bfloat16); not differentiable (a density is data): an input that requires grad is refused. The
    values are checked as the reference checks them where ``eager_checks`` allows (not under
    torch.compile or CUDA graph capture)."""
    x = _no_grad_input(op, name, _tensor(op, name, x))
    with ref.named_errors(op):
        kind, p = ref._timestep_params(kind, *params)
        domain = kind if name == "t" else "uniform"  # u: probabilities; t: times, or sigmas
        _eager_check(lambda a: ref._unit_or_sigma(domain, a, name), x)
    out = ref.timestep_map(op.removeprefix("timestep_"), x.detach().double(), kind, p, _TORCH_OPS)
    return out.to(_out_dtype(x))


# The reference's argument names (t, or u for the quantile), so keyword calls work in every layer.
def timestep_density(t: torch.Tensor, kind: str = "uniform", m: float = 0.0, s: float = 1.0, scale: float = 1.29,
                     p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:  # fmt: skip
    return _timestep_map("timestep_density", "t", t, kind, (m, s, scale, p_mean, p_std))


def timestep_cdf(t: torch.Tensor, kind: str = "uniform", m: float = 0.0, s: float = 1.0, scale: float = 1.29,
                 p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:  # fmt: skip
    return _timestep_map("timestep_cdf", "t", t, kind, (m, s, scale, p_mean, p_std))


def timestep_quantile(u: torch.Tensor, kind: str = "uniform", m: float = 0.0, s: float = 1.0, scale: float = 1.29,
                      p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:  # fmt: skip
    return _timestep_map("timestep_quantile", "u", u, kind, (m, s, scale, p_mean, p_std))


for _fn in (timestep_density, timestep_cdf, timestep_quantile):
    _fn.__doc__ = getattr(ref, _fn.__name__).__doc__


def ict_sigma_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """The reference's float64 probabilities of the adjacent pairs of ``sigmas``, in their dtype (float32 for
    float16 / bfloat16) on their device: a table computed once per curriculum stage, on the host."""
    sigmas = _no_grad_input("ict_sigma_probs", "sigmas", _tensor("ict_sigma_probs", "sigmas", sigmas))
    out = ref.ict_sigma_probs(sigmas.detach().cpu().double().numpy(), p_mean, p_std)
    return torch.from_numpy(out).to(device=sigmas.device, dtype=_out_dtype(sigmas))


ict_sigma_probs.__doc__ = ref.ict_sigma_probs.__doc__


def shift_timesteps(
    t: torch.Tensor, shift: float | None = None, mu: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    with ref.named_errors("shift_timesteps"):
        alpha = ref._shift_factor(shift, mu)
    t = _tensor("shift_timesteps", "t", t)
    with ref.named_errors("shift_timesteps"):
        _eager_check(ref.check_times, t)
    t64 = t.double()
    den = alpha * t64 + (1.0 - t64)  # (FLOW.9)
    dtype = _out_dtype(t)
    return (alpha * t64 / den).to(dtype), (alpha / den / den).to(dtype)  # den * den could overflow


shift_timesteps.__doc__ = ref.shift_timesteps.__doc__


def edm_preconditioning(
    sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with ref.named_errors("edm_preconditioning"):
        sd = C.positive("sigma_data", sigma_data)
    sigma = _tensor("edm_preconditioning", "sigma", sigma)
    _eager_check(ref._sigmas, sigma, op="edm_preconditioning")
    s = sigma.double()
    r = torch.hypot(s, torch.full_like(s, sd))
    rd = sd / r  # (FLOW.10) sigma_d / r <= 1: no cancellation, no overflow
    dtype = _out_dtype(sigma)
    return tuple(c.to(dtype) for c in (rd * rd, s * rd, 1.0 / r, 0.25 * torch.log(s)))  # type: ignore[return-value]


edm_preconditioning.__doc__ = ref.edm_preconditioning.__doc__


def _path(t_or_sigma: Any, schedule: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per sample in float64, as ``reference.path_coefs`` (which checks the values in eager).
    A ``genloss.torch.DiffusionSchedule`` is read from its own buffers (they follow ``.to(device)``)."""
    op = "prediction_convert"
    module = schedule if isinstance(schedule, _TorchSchedule) else None
    if module is not None:
        schedule = module.reference  # the NumPy schedule: the checks below, the same (a, b)
    pair = isinstance(schedule, str) and schedule == "alpha_sigma"
    parts = tuple(t_or_sigma) if pair and isinstance(t_or_sigma, (tuple, list)) else (t_or_sigma,)
    for x in parts:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{op}: t_or_sigma must be a torch.Tensor (or a pair of them), got {type(x).__name__}"
            )
        if x.requires_grad:
            raise ValueError(f"{op}: t_or_sigma requires grad, but the conversion is differentiable only "
                             "w.r.t. pred and x_t; pass t_or_sigma.detach()")  # fmt: skip
    if eager_checks(parts[0]):
        vals = tuple(
            (x.detach().cpu().double() if x.is_floating_point() else x.detach().cpu()).numpy() for x in parts
        )
        with ref.named_errors(op):
            ref.path_coefs(vals if pair else vals[0], schedule, batch)
    if module is not None:
        t = parts[0]
        # t checked just above (path_coefs): the unchecked gather, no second read-back
        return module._gather("sqrt_alpha_bar", t, torch.float64), module._gather(
            "sqrt_one_minus_alpha_bar", t, torch.float64
        )
    if isinstance(schedule, ref._dif.DiffusionSchedule):
        t = parts[0]

        def table(name: str) -> torch.Tensor:  # a copy (the schedule's arrays are read-only), once per device
            return kept_on(
                schedule.__dict__.setdefault("_genloss_torch_path", {}), name, t,
                lambda: torch.tensor(getattr(schedule, name), dtype=torch.float64, device=t.device),
            )  # fmt: skip

        return table("sqrt_alpha_bar")[t], table("sqrt_one_minus_alpha_bar")[t]
    if pair:
        return parts[0].double(), parts[1].double()
    x = parts[0].double()
    return (1.0 - x, x) if schedule == "flow" else (torch.ones_like(x), x)


def prediction_convert(
    pred: torch.Tensor, x_t: torch.Tensor, t_or_sigma: Any, source: str, target: str,
    schedule: Any = "flow", sigma_data: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    op = "prediction_convert"
    with ref.named_errors(op):
        source = C.choice("source", source, ref.PREDICTIONS)
        target = C.choice("target", target, ref.PREDICTIONS)
        sd = C.positive("sigma_data", sigma_data)
    pred, x_t = _tensor(op, "pred", pred), _tensor(op, "x_t", x_t)
    if x_t.shape != pred.shape or pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"{op}: x_t must have the shape of pred {tuple(pred.shape)} (batch first, not empty), "
                         f"got {tuple(x_t.shape)}")  # fmt: skip
    a, b = _path(t_or_sigma, schedule, pred.shape[0])
    A, Cf, det = ref.convert_coefs(source, target, a, b, sd)  # (FLOW.11) float64 (B,) coefficients
    if eager_checks(det) and source != target and bool((det == 0.0).any()):
        raise ValueError(f"{op}: {ref.singular_message(source, target)}")
    dtype = torch.promote_types(_out_dtype(pred), _out_dtype(x_t))
    shape = (-1,) + (1,) * (pred.dim() - 1)
    A, Cf = A.to(dtype).reshape(shape), Cf.to(dtype).reshape(shape)
    return A * x_t.to(dtype) + Cf * pred.to(dtype)  # (FLOW.11)


prediction_convert.__doc__ = ref.prediction_convert.__doc__


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
    *, device: Any = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # fmt: skip
    r"""``genloss.reference.karras_sigmas`` (float64, ascending) in ``dtype`` on ``device``.  (FLOW.12)"""
    dtype, device = float_dtype("karras_sigmas", dtype), device_arg("karras_sigmas", device)
    return torch.from_numpy(ref.karras_sigmas(n, sigma_min, sigma_max, rho)).to(device=device, dtype=dtype)
