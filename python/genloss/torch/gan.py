r"""The GAN family as torch custom ops (``torch.ops.genloss.<name>``) and helpers.

Each op has the signature of its NumPy reference (``genloss.reference.gan``),
returns a Tensor, and is differentiable through the fused native kernel
(``genloss.native.gan``); see ``_op.py`` for the registration. The helpers at
the bottom (``gradient_penalty``, ``r1_penalty``, ``r2_penalty``) take a critic
module, so they are plain functions built on the ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _checks as C
from .. import registry
from ..native import gan as native
from ._op import LossOp, lib, public, schema_of, with_reference_doc

# Every fused op of the family's records: the schema, the differentiable arguments and the
# docstring come from the record and the reference (genloss.registry, genloss.reference.gan).
OPS: dict[str, LossOp] = {
    r.name: LossOp(r.name, schema_of(r.name), getattr(native, r.name))
    for r in registry.RECORDS
    if r.family == "gan" and r.has_native
}

gan_d_loss = public(OPS["gan_d_loss"], __name__)
gan_g_loss = public(OPS["gan_g_loss"], __name__)
lsgan_d_loss = public(OPS["lsgan_d_loss"], __name__)
lsgan_g_loss = public(OPS["lsgan_g_loss"], __name__)
wgan_critic_loss = public(OPS["wgan_critic_loss"], __name__)
wgan_g_loss = public(OPS["wgan_g_loss"], __name__)
hinge_d_loss = public(OPS["hinge_d_loss"], __name__)
hinge_g_loss = public(OPS["hinge_g_loss"], __name__)
relativistic_d_loss = public(OPS["relativistic_d_loss"], __name__)
relativistic_g_loss = public(OPS["relativistic_g_loss"], __name__)
gradient_penalty_from_grads = public(OPS["gradient_penalty_from_grads"], __name__)
r1_penalty_from_grads = public(OPS["r1_penalty_from_grads"], __name__)
feature_matching_loss = public(OPS["feature_matching_loss"], __name__)
ssgan_critic_loss = public(OPS["ssgan_critic_loss"], __name__)
ssgan_g_loss = public(OPS["ssgan_g_loss"], __name__)
l1_loss = public(OPS["l1_loss"], __name__)
pix2pix_g_loss = public(OPS["pix2pix_g_loss"], __name__)
cycle_consistency_loss = public(OPS["cycle_consistency_loss"], __name__)
fgan_d_loss = public(OPS["fgan_d_loss"], __name__)
fgan_g_loss = public(OPS["fgan_g_loss"], __name__)
jsd_estimate = public(OPS["jsd_estimate"], __name__)


# ---------------------------------------------------------------- (GAN.17)
lib.define(
    "spectral_norm_sigma(Tensor W, Tensor u, int n_iters=1, float eps=1e-12) -> (Tensor, Tensor, Tensor)"
)


def _spectral_norm_sigma(W: torch.Tensor, u: torch.Tensor, n_iters: int = 1, eps: float = 1e-12):
    for name, t in (("W", W), ("u", u)):  # the reference refuses complex and integer arrays too
        if not t.is_floating_point():
            raise TypeError(f"spectral_norm_sigma: {name} must be a real floating tensor, got {t.dtype}")
    if W.device != u.device:
        raise ValueError(f"spectral_norm_sigma: u must be on the device of W ({W.device}), got {u.device}")
    if u.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "spectral_norm_sigma: u requires grad, but u (the power iteration's start) is held "
            "constant, as in torch.nn.utils.spectral_norm; pass u.detach()"
        )
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"W must be a non-empty 2-D tensor (out, in), got shape {tuple(W.shape)}")
    if tuple(u.shape) != (W.shape[0],):
        raise ValueError(f"u must have shape ({W.shape[0]},) (the rows of W), got {tuple(u.shape)}")
    C.positive_int("n_iters", n_iters)
    C.positive("eps", eps)
    if W.dtype in (torch.float16, torch.bfloat16):  # computed in float32, like every genloss op
        W = W.float()
    with torch.no_grad():  # u, v are constants of the gradient, as in torch.nn.utils.spectral_norm
        w = W.detach()
        u = u.detach().to(w.dtype)
        for _ in range(n_iters):
            v = torch.nn.functional.normalize(w.t() @ u, dim=0, eps=eps)
            u = torch.nn.functional.normalize(w @ v, dim=0, eps=eps)
    sigma = torch.dot(u, W @ v)  # (GAN.17) d sigma / dW = u v^T
    return sigma, u.clone(), v.clone()


lib.impl("spectral_norm_sigma", _spectral_norm_sigma, "CompositeImplicitAutograd")


@with_reference_doc
def spectral_norm_sigma(W: torch.Tensor, u: torch.Tensor, n_iters: int = 1, eps: float = 1e-12):
    r"""Power-iteration estimate (sigma, u, v) of the top singular value of ``W``.

    .. math:: v = \frac{W^\top u}{\lVert W^\top u\rVert},\; u = \frac{W v}{\lVert W v\rVert},\; \sigma = u^\top W v

    Differentiable w.r.t. ``W`` (u, v held constant), twice as well. (GAN.17)
    """
    for name, v in (("n_iters", n_iters), ("eps", eps)):  # the op's schema would take a bool as a number
        if isinstance(v, bool):
            raise TypeError(f"spectral_norm_sigma: {name} must be a number, got bool")
    return torch.ops.genloss.spectral_norm_sigma(W, u, n_iters, eps)


# ---------------------------------------------------------------- (GAN.12, GAN.13)
def _penalty_inputs(op: str, critic: object, **tensors: object) -> None:
    """The helpers' arguments checked before any work: a callable critic, floating tensors."""
    if not callable(critic):
        raise TypeError(
            f"{op}: critic must be callable (a module or a function), got {type(critic).__name__}"
        )
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")


def _input_grads(
    critic: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_scaler: object | None
) -> torch.Tensor:
    """d sum(critic(x)) / dx with create_graph, unscaled when a GradScaler scaled it."""
    out = critic(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the critic must return a torch.Tensor, got {type(out).__name__}")
    unused = (
        "the critic's output does not depend on its input (a detach() or torch.no_grad() inside it?): "
        "the penalty is of d critic(x) / dx"
    )
    if not out.requires_grad:
        raise ValueError(unused)
    total = out.sum()
    if grad_scaler is not None:
        if not callable(getattr(grad_scaler, "scale", None)) or not callable(
            getattr(grad_scaler, "get_scale", None)
        ):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler (or None), got {type(grad_scaler).__name__}"
            )
        total = grad_scaler.scale(total)  # type: ignore[attr-defined]
    (g,) = torch.autograd.grad(total, x, create_graph=True, allow_unused=True)
    if g is None:
        raise ValueError(unused)
    if grad_scaler is not None:
        # The scaler multiplied the inner gradient by its scale: undo it before
        # the norm, or the penalty would see a gradient thousands of times larger.
        g = g * (1.0 / grad_scaler.get_scale())  # type: ignore[attr-defined]
    return g


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    lambda_: float = 10.0,
    center: float = 1.0,
    one_sided: bool = False,
    grad_scaler: object | None = None,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""WGAN-GP: :math:`\lambda\,\mathbb{E}_b(\lVert\nabla_{\hat x} C(\hat x_b)\rVert_2 - c)^2`.

    :math:`\hat x = \epsilon x + (1-\epsilon)\tilde x`, :math:`\epsilon \sim U[0,1]`
    per sample; the norm is over ALL non-batch dims; the critic is trained
    through the penalty (``create_graph=True``). With a ``torch.amp.GradScaler``
    the inner gradient is computed scaled and unscaled before the norm.
    (GAN.12)
    """
    _penalty_inputs("gradient_penalty", critic, real=real, fake=fake)
    if real.shape != fake.shape:
        raise ValueError(f"fake must have the shape of real {tuple(real.shape)}, got {tuple(fake.shape)}")
    C.batched("real", tuple(real.shape), reduction)
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    eps = torch.rand(shape, device=real.device, dtype=real.dtype, generator=generator)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    grads = _input_grads(critic, x_hat, grad_scaler)
    return gradient_penalty_from_grads(grads, lambda_, center, one_sided, reduction)


def _squared_norm_penalty(critic, x, name, gamma, grad_scaler, reduction) -> torch.Tensor:
    _penalty_inputs("r1_penalty" if name == "real" else "r2_penalty", critic, **{name: x})
    C.batched(name, tuple(x.shape), reduction)
    x = x.detach().requires_grad_(True)
    return r1_penalty_from_grads(_input_grads(critic, x, grad_scaler), gamma, reduction)


def r1_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    gamma: float = 10.0,
    grad_scaler: object | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""R1: :math:`\frac{\gamma}{2}\mathbb{E}\lVert\nabla_x D(x)\rVert^2` on real samples. (GAN.13)"""
    return _squared_norm_penalty(critic, real, "real", gamma, grad_scaler, reduction)


def r2_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    fake: torch.Tensor,
    gamma: float = 10.0,
    grad_scaler: object | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""R2: :math:`\frac{\gamma}{2}\mathbb{E}\lVert\nabla_x D(x)\rVert^2` on generated samples. (GAN.13)"""
    return _squared_norm_penalty(critic, fake, "fake", gamma, grad_scaler, reduction)


# Literal names (the ops of OPS, then the helpers), so type checkers see what genloss.torch re-exports;
# tests/test_torch_ops.py reaches every record's op through genloss.torch.
__all__ = [
    "gan_d_loss",
    "gan_g_loss",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "wgan_critic_loss",
    "wgan_g_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "relativistic_d_loss",
    "relativistic_g_loss",
    "gradient_penalty_from_grads",
    "r1_penalty_from_grads",
    "feature_matching_loss",
    "ssgan_critic_loss",
    "ssgan_g_loss",
    "l1_loss",
    "pix2pix_g_loss",
    "cycle_consistency_loss",
    "fgan_d_loss",
    "fgan_g_loss",
    "jsd_estimate",
    "spectral_norm_sigma",
    "gradient_penalty",
    "r1_penalty",
    "r2_penalty",
]
