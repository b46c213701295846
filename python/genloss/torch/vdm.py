r"""The torch-only pieces of Variational Diffusion Models (Kingma et al. 2021).

* :class:`LearnedSNRSchedule`: the learned noise schedule :math:`\gamma_\eta(t) = -\log\mathrm{SNR}(t)`,
  a monotone network between learnable end points (DIF.20), with its exact time derivative and
  the stable :math:`(\alpha_t, \sigma_t)` (DIF.21).
* :func:`vdm_schedule_variance_grad`: trains the schedule's interior to minimise the variance of the
  continuous-time loss estimator, the end points on the loss itself (DIF.22).

Both are plain torch (no custom op, no native kernel): the schedule is a small module and the
variance gradient a rescaling of one backward pass.  Typical use, one training step::

    out = schedule.evaluate(t)                        # t: (B,), e.g. low_discrepancy_times
    alpha, sigma = alpha_sigma_from_gamma(out.gamma)  # (DIF.21)
    z = alpha[:, None] * x + sigma[:, None] * eps
    eps_hat = denoiser(z, out.gamma)                  # conditioned on the noise level, not on t
    losses = 0.5 * out.dgamma_dt * ((eps - eps_hat) ** 2).flatten(1).sum(1)   # (DIF.16), shape (B,)
    loss = vdm_schedule_variance_grad(losses, out)    # value: losses.mean()
    (loss + prior_and_reconstruction_terms).backward()
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .. import _checks as C
from ._op import device_arg, eager_checks, float_dtype

__all__ = [
    "LearnedSNRSchedule",
    "VDMScheduleOutput",
    "alpha_sigma_from_gamma",
    "vdm_schedule_variance_grad",
]

_SOFTPLUS_INV_ONE = math.log(math.expm1(1.0))  # softplus(x) = 1
_HOOKED = "_genloss_vdm_variance_hook"


class VDMScheduleOutput(NamedTuple):
    r"""A learned schedule evaluated at times ``t`` (every field has the shape of ``t``).

    ``gamma`` and ``dgamma_dt`` are what a loss uses.  ``u`` and ``du_dt`` are the normalised
    monotone curve :math:`u_\eta(t) \in [0, 1]` and its derivative, with
    :math:`\gamma = (1-u)\gamma_0 + u\gamma_1` and :math:`\gamma' = (\gamma_1-\gamma_0)u'`: they depend
    on the interior parameters only, which is how :func:`vdm_schedule_variance_grad` tells the
    interior from the end points (DIF.22).
    """

    gamma: torch.Tensor
    dgamma_dt: torch.Tensor
    u: torch.Tensor
    du_dt: torch.Tensor


def alpha_sigma_from_gamma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\alpha, \sigma)` with :math:`\alpha^2 = \operatorname{sigmoid}(-\gamma)`,
    :math:`\sigma^2 = \operatorname{sigmoid}(\gamma)` (DIF.21).

    .. math::
        \alpha = \exp\big(\tfrac12\log\operatorname{sigmoid}(-\gamma)\big), \qquad
        \sigma = \exp\big(\tfrac12\log\operatorname{sigmoid}(\gamma)\big)

    Through the log-sigmoid, so :math:`\alpha \approx e^{-\gamma/2}` keeps its relative accuracy
    where :math:`\operatorname{sigmoid}(-\gamma)` would underflow (:math:`\gamma \gtrsim 745` in
    float64, 103 in float32); finite with finite gradients for any finite ``gamma``.
    :math:`\alpha^2 + \sigma^2 = 1` to a few ulps.
    """
    if not torch.is_tensor(gamma) or not gamma.is_floating_point():
        raise TypeError(f"gamma must be a floating-point tensor, got {_describe(gamma)}")
    alpha = torch.exp(0.5 * F.logsigmoid(-gamma))  # (DIF.21)
    sigma = torch.exp(0.5 * F.logsigmoid(gamma))
    return alpha, sigma


def _describe(x: object) -> str:
    return f"a tensor of dtype {x.dtype}" if torch.is_tensor(x) else type(x).__name__


class LearnedSNRSchedule(torch.nn.Module):
    r"""VDM's learned noise schedule :math:`\gamma_\eta(t) = -\log\mathrm{SNR}(t)`, increasing in t (DIF.20).

    .. math::
        f_\eta(t) = a\,t + \frac1H\sum_{j=1}^{H} c_j\,\operatorname{sigmoid}\big(w_j(2t-1) + b_j\big),
        \qquad a, w_j, c_j > 0

        u_\eta(t) = \frac{f_\eta(t) - f_\eta(0)}{f_\eta(1) - f_\eta(0)}, \qquad
        \gamma_\eta(t) = (1 - u_\eta(t))\,\gamma_0 + u_\eta(t)\,\gamma_1

    A monotone MLP (a linear path plus one sigmoid hidden layer, every weight positive through a
    softplus, the hidden biases free), normalised to :math:`[0, 1]` and mapped onto
    :math:`[\gamma_0, \gamma_1]`, as in the VDM paper.  :math:`f' \ge a > 0`, so for
    :math:`\gamma_0 < \gamma_1` the schedule is strictly increasing, and
    :math:`\gamma(0) = \gamma_0`, :math:`\gamma(1) = \gamma_1` exactly, whatever the interior
    parameters (DIF.20).

    Parameters
    ----------
    gamma_0, gamma_1 : float
        The end points :math:`\gamma(0) = -\log\mathrm{SNR}_{\max}` and :math:`\gamma(1) = -\log\mathrm{SNR}_{\min}`,
        finite, ``gamma_0 < gamma_1``.  Defaults -13.3 and 5.0, VDM's.
    hidden_size : int
        H >= 1, the width of the sigmoid layer (VDM: 1024).
    learn_endpoints : bool
        ``True``: ``gamma_0``, ``gamma_1`` are ``Parameter``\ s (0-d); ``False``: buffers.
    device, dtype
        Of the parameters (float32 by default; ``float64`` for a schedule held in double, as the
        library's convention for schedules).

    Attributes
    ----------
    gamma_0, gamma_1 : Tensor, shape []
        The end points.  Training may move them; keeping ``gamma_0 < gamma_1`` is then up to the
        caller (not re-checked per call, which would synchronise a GPU).
    raw_linear : Parameter, shape []
        :math:`a = \operatorname{softplus}(\texttt{raw\_linear})`, initialised to :math:`a = 1`.
    raw_hidden_weight, hidden_bias, raw_out_weight : Parameter, shape [H]
        :math:`w = \operatorname{softplus}(\cdot)`, :math:`b`, :math:`c = \operatorname{softplus}(\cdot)`,
        each raw entry initialised from :math:`\mathcal N(0, 1)` (torch's global generator), so the
        initial schedule is close to linear in t with a mild bend.

    Notes
    -----
    Times are checked to lie in [0, 1] (a ``ValueError`` naming ``t``) in eager mode only: the check
    reads the values (a device synchronisation on CUDA) and is skipped under ``torch.compile``, where
    the module traces with ``fullgraph=True``.  The computation runs in the promoted dtype of ``t``
    and the parameters (at least float32), on their device.  Cost: O(H) per time, negligible next to
    a denoiser.
    """

    # Registered in __init__ as parameters or buffers (by learn_endpoints); declared for type checkers,
    # which otherwise read them as Module.__getattr__'s Tensor | Module.
    gamma_0: torch.Tensor
    gamma_1: torch.Tensor

    def __init__(
        self,
        gamma_0: float = -13.3,
        gamma_1: float = 5.0,
        hidden_size: int = 1024,
        learn_endpoints: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        with C.named_errors("LearnedSNRSchedule"):
            g0 = C.finite("gamma_0", gamma_0)
            g1 = C.finite("gamma_1", gamma_1)
            if not g0 < g1:
                raise ValueError(f"gamma_0 must be < gamma_1 (gamma increases with t), got {g0} and {g1}")
            H = C.positive_int("hidden_size", hidden_size)
            learn_endpoints = C.flag("learn_endpoints", learn_endpoints)
            dtype = None if dtype is None else float_dtype("LearnedSNRSchedule", dtype)
        kw: dict[str, Any] = {"device": device_arg("LearnedSNRSchedule", device), "dtype": dtype}
        self.hidden_size = H
        for name, value in (("gamma_0", g0), ("gamma_1", g1)):
            v = torch.tensor(value, **kw)
            if learn_endpoints:
                self.register_parameter(name, torch.nn.Parameter(v))
            else:
                self.register_buffer(name, v)
        self.raw_linear = torch.nn.Parameter(torch.tensor(_SOFTPLUS_INV_ONE, **kw))
        self.raw_hidden_weight = torch.nn.Parameter(torch.randn(H, **kw))
        self.hidden_bias = torch.nn.Parameter(torch.randn(H, **kw))
        self.raw_out_weight = torch.nn.Parameter(torch.randn(H, **kw))

    # ----------------------------------------------------------------- parameter groups
    def interior_parameters(self) -> list[torch.nn.Parameter]:
        r"""The parameters of the shape :math:`u_\eta` (not the end points): the ones the variance trains."""
        return [self.raw_linear, self.raw_hidden_weight, self.hidden_bias, self.raw_out_weight]

    def endpoint_parameters(self) -> list[torch.nn.Parameter]:
        """``[gamma_0, gamma_1]`` when they are learnable, else ``[]``."""
        return [p for p in (self.gamma_0, self.gamma_1) if isinstance(p, torch.nn.Parameter)]

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"

    # ----------------------------------------------------------------- evaluation
    def _times(self, t: object) -> torch.Tensor:
        ref = self.raw_linear
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(
                    f"LearnedSNRSchedule: t must be a floating-point tensor or a float, got {type(t).__name__}"
                )
            t = torch.full((), float(t), dtype=ref.dtype, device=ref.device)  # a fill: no host-to-device copy
        if not t.is_floating_point():
            raise TypeError(f"LearnedSNRSchedule: t must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != ref.device:
            raise ValueError(
                f"LearnedSNRSchedule: t is on {t.device} but the schedule's parameters are on {ref.device}"
            )
        if eager_checks(t):
            td = t.detach()
            if td.numel() and not bool(((td >= 0) & (td <= 1)).all()):
                bad = td[~((td >= 0) & (td <= 1))].flatten()[0].item()
                raise ValueError(f"LearnedSNRSchedule: t must lie in [0, 1], got {bad}")
        dtype = torch.promote_types(torch.promote_types(t.dtype, ref.dtype), torch.float32)
        return t.to(dtype)

    def evaluate(self, t: torch.Tensor | float) -> VDMScheduleOutput:
        r""":math:`\gamma(t)`, :math:`\gamma'(t)`, :math:`u(t)`, :math:`u'(t)`, all of the shape of ``t`` (DIF.20).

        .. math::
            u' = \frac{f'(t)}{f(1) - f(0)}, \quad
            f'(t) = a + \frac2H\sum_j c_j w_j\,\operatorname{sigmoid}(h_j)\operatorname{sigmoid}(-h_j),
            \quad \gamma' = (\gamma_1 - \gamma_0)\,u'

        in closed form (no inner autograd call): exact, differentiable in the parameters (and in
        ``t``) by ordinary autograd, twice as well, and traceable by ``torch.compile(fullgraph=True)``.
        """
        t = self._times(t)
        dtype = t.dtype
        a = F.softplus(self.raw_linear.to(dtype))
        w = F.softplus(self.raw_hidden_weight.to(dtype))
        b = self.hidden_bias.to(dtype)
        c = F.softplus(self.raw_out_weight.to(dtype)) / self.hidden_size
        g0 = self.gamma_0.to(dtype)
        g1 = self.gamma_1.to(dtype)

        h = (2.0 * t - 1.0).unsqueeze(-1) * w + b  # (..., H) hidden pre-activations
        s = torch.sigmoid(h)
        s0 = torch.sigmoid(b - w)  # f at t = 0 and t = 1
        s1 = torch.sigmoid(b + w)
        span = a + ((s1 - s0) * c).sum(-1)  # f(1) - f(0) >= a > 0
        rise = a * t + ((s - s0) * c).sum(-1)  # f(t) - f(0), 0 exactly at t = 0
        u = rise / span  # (DIF.20)
        # Rounding may leave u(1) a few ulps from 1 (the sums run in another order): pin the values at
        # the end points exactly, leaving the derivatives untouched (the correction is a constant).
        u = u + torch.where(t == 1, 1.0 - u, torch.where(t == 0, -u, torch.zeros_like(u))).detach()
        slope = a + (s * torch.sigmoid(-h) * (2.0 * w) * c).sum(-1)  # (DIF.20) f'(t) >= a
        du_dt = slope / span
        gamma = (1.0 - u) * g0 + u * g1  # exact at u = 0 and u = 1
        dgamma_dt = (g1 - g0) * du_dt
        return VDMScheduleOutput(gamma, dgamma_dt, u, du_dt)

    def forward(self, t: torch.Tensor | float) -> torch.Tensor:
        r""":math:`\gamma_\eta(t)`, the shape of ``t`` (DIF.20); differentiable in ``t`` and the parameters."""
        return self.evaluate(t).gamma

    def gamma_and_derivative(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(gamma, dgamma_dt)`` at ``t``; :math:`\gamma'` in closed form (see :meth:`evaluate`)."""
        out = self.evaluate(t)
        return out.gamma, out.dgamma_dt

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(alpha, sigma)`` at ``t``: :math:`\alpha^2 = \operatorname{sigmoid}(-\gamma)`,
        :math:`\sigma^2 = \operatorname{sigmoid}(\gamma)`, by :func:`alpha_sigma_from_gamma` (DIF.21)."""
        return alpha_sigma_from_gamma(self.forward(t))


def _scale_by(scale: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * scale.to(grad.dtype)  # (DIF.22) d/du of the loss, times 2 l_b

    return hook


def vdm_schedule_variance_grad(
    losses: torch.Tensor, schedule_output: VDMScheduleOutput, reduction: str = "mean"
) -> torch.Tensor:
    r"""The reduced loss, with a backward that trains the schedule's interior to minimise its variance (DIF.22).

    Returns ``losses.mean()`` (or ``.sum()``); its ``.backward()`` (and every later backward
    through ``schedule_output``) gives

    ==========================  =====================================================================
    parameter                   gradient received (``'mean'``; drop the :math:`1/B` for ``'sum'``)
    ==========================  =====================================================================
    interior :math:`\eta_I`      :math:`\frac1B\sum_b 2\,\ell_b\,\nabla_{\eta_I}\ell_b = \nabla_{\eta_I}\frac1B\sum_b\ell_b^2`,
    (``interior_parameters()``)  an unbiased estimate of :math:`\nabla_{\eta_I}\mathrm{Var}[\ell]`
    end points                  :math:`\frac1B\sum_b\nabla_{\gamma_0,\gamma_1}\ell_b`, the ordinary gradient
    :math:`\gamma_0, \gamma_1`   (unbiased for :math:`\nabla\mathbb E[\ell]`)
    anything else (denoiser)    :math:`\frac1B\sum_b\nabla\ell_b`, the ordinary gradient
    ==========================  =====================================================================

    with :math:`\ell_b` = ``losses[b]``.  Why this is right: the expected continuous-time loss
    depends on the schedule only through its end points (DIF.16), so
    :math:`\nabla_{\eta_I}\mathbb E[\ell] = 0` and
    :math:`\nabla_{\eta_I}\mathrm{Var}[\ell] = \nabla_{\eta_I}\mathbb E[\ell^2] = \mathbb E[2\ell\nabla_{\eta_I}\ell]`
    (DIF.22).  The ordinary interior gradient, zero in expectation, is replaced, not added to.

    How: ``schedule_output.u`` and ``.du_dt`` depend on the interior parameters only (the end points
    enter through :math:`\gamma = (1-u)\gamma_0 + u\gamma_1`, :math:`\gamma' = (\gamma_1-\gamma_0)u'`),
    so a gradient hook on each multiplies the gradient arriving at :math:`u_b, u'_b` by
    :math:`2\ell_b` (detached): one backward pass, one multiply per sample.

    Parameters
    ----------
    losses : Tensor, shape [B]
        Per-sample continuous-time losses (DIF.16) computed from ``schedule_output.gamma`` and
        ``.dgamma_dt`` (the diffusion loss, or the whole per-sample loss: terms that depend on the end
        points only, such as the prior and reconstruction terms, leave the argument intact).
    schedule_output : VDMScheduleOutput
        From :meth:`LearnedSNRSchedule.evaluate` at times of shape [B] (one per sample, drawn
        uniformly on [0, 1], i.i.d. or low-discrepancy (DIF.18): only the marginals matter).
    reduction : {'mean', 'sum'}

    Returns
    -------
    Tensor, shape []
        ``losses.mean()`` or ``losses.sum()``.

    Notes
    -----
    Preconditions (not checkable here): each ``losses[b]`` depends on sample b's time only (no batch
    norm or attention across the batch in the denoiser), the denoiser sees the noise level
    :math:`\gamma`, not t (else DIF.16 fails), and no other loss sends gradient into this
    ``schedule_output`` (the hooks would rescale it too: evaluate the schedule separately at t = 0
    and 1 for the reconstruction and prior terms).  The loss must be the continuous-time one: the
    T-step loss (DIF.17) depends on the interior.  Call it in eager mode (it registers hooks); the
    schedule and denoiser may be compiled.  A second call on the same output raises.
    """
    reduction = C.reduction(reduction, C.TWO_POPULATION)
    if not isinstance(schedule_output, VDMScheduleOutput):
        raise TypeError(
            "schedule_output must be a VDMScheduleOutput (from LearnedSNRSchedule.evaluate), "
            f"got {type(schedule_output).__name__}"
        )
    if not torch.is_tensor(losses) or not losses.is_floating_point():
        raise TypeError(f"losses must be a floating-point tensor, got {_describe(losses)}")
    if losses.dim() != 1 or losses.shape[0] == 0:
        raise ValueError(
            f"losses must have shape (B,) with B >= 1 (one loss per sample), got {tuple(losses.shape)}"
        )
    B = losses.shape[0]
    u, du_dt = schedule_output.u, schedule_output.du_dt
    if u.numel() != B or u.dim() == 0 or u.shape[0] != B:
        raise ValueError(
            f"losses must have one entry per time of schedule_output (times of shape {tuple(u.shape)}), "
            f"got shape {tuple(losses.shape)}"
        )
    if losses.device != u.device:
        raise ValueError(f"losses is on {losses.device} but schedule_output on {u.device}")
    scale = 2.0 * losses.detach().reshape(u.shape)  # (DIF.22)
    for x in (u, du_dt):
        if not x.requires_grad:
            continue  # interior frozen: nothing to rescale
        if getattr(x, _HOOKED, False):
            raise ValueError("schedule_output already has its variance hooks (one call per evaluation)")
        x.register_hook(_scale_by(scale))
        setattr(x, _HOOKED, True)
    return losses.mean() if reduction == "mean" else losses.sum()
