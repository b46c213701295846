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
from ..native import gan as native
from ._op import LossOp, lib

R = "str reduction='mean'"
T2 = "Tensor real_logits, Tensor fake_logits"

# name: (schema, differentiable args)
_OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gan_d_loss": (f"{T2}, {R}", ("real_logits", "fake_logits")),
    "gan_g_loss": (f"Tensor fake_logits, str mode='nonsaturating', {R}", ("fake_logits",)),
    "lsgan_d_loss": (
        f"Tensor real_out, Tensor fake_out, float a=0.0, float b=1.0, {R}",
        ("real_out", "fake_out"),
    ),
    "lsgan_g_loss": (f"Tensor fake_out, float c=1.0, {R}", ("fake_out",)),
    "wgan_critic_loss": (f"Tensor real_scores, Tensor fake_scores, {R}", ("real_scores", "fake_scores")),
    "wgan_g_loss": (f"Tensor fake_scores, {R}", ("fake_scores",)),
    "hinge_d_loss": (f"Tensor real_scores, Tensor fake_scores, {R}", ("real_scores", "fake_scores")),
    "hinge_g_loss": (f"Tensor fake_scores, {R}", ("fake_scores",)),
    "relativistic_d_loss": (f"{T2}, bool average=True, {R}", ("real_logits", "fake_logits")),
    "relativistic_g_loss": (f"{T2}, bool average=True, {R}", ("real_logits", "fake_logits")),
    "gradient_penalty_from_grads": (
        f"Tensor grads, float lambda_=10.0, float center=1.0, bool one_sided=False, {R}",
        ("grads",),
    ),
    "r1_penalty_from_grads": (f"Tensor grads, float gamma=10.0, {R}", ("grads",)),
    "feature_matching_loss": (
        "Tensor real_features, Tensor fake_features",
        ("real_features", "fake_features"),
    ),
    "ssgan_critic_loss": (
        f"Tensor labeled_logits, Tensor labels, Tensor unlabeled_logits, Tensor fake_logits, {R}",
        ("labeled_logits", "unlabeled_logits", "fake_logits"),
    ),
    "ssgan_g_loss": (f"Tensor fake_logits, {R}", ("fake_logits",)),
    "l1_loss": (f"Tensor input, Tensor target, {R}", ("input", "target")),
    "pix2pix_g_loss": (
        f"Tensor fake_logits, Tensor generated, Tensor target, float lambda_l1=100.0, {R}",
        ("fake_logits", "generated", "target"),
    ),
    "cycle_consistency_loss": (
        f"Tensor real_a, Tensor rec_a, Tensor real_b, Tensor rec_b, float lambda_cyc=10.0, {R}",
        ("real_a", "rec_a", "real_b", "rec_b"),
    ),
    "fgan_d_loss": (f"Tensor real_v, Tensor fake_v, str divergence, {R}", ("real_v", "fake_v")),
    "fgan_g_loss": (f"Tensor fake_v, str divergence, str mode='nonsaturating', {R}", ("fake_v",)),
    "jsd_estimate": (T2, ("real_logits", "fake_logits")),
}

OPS: dict[str, LossOp] = {
    name: LossOp(name, schema, getattr(native, name), diff, doc=getattr(native, name).__doc__ or "")
    for name, (schema, diff) in _OPS.items()
}

gan_d_loss = OPS["gan_d_loss"]
gan_g_loss = OPS["gan_g_loss"]
lsgan_d_loss = OPS["lsgan_d_loss"]
lsgan_g_loss = OPS["lsgan_g_loss"]
wgan_critic_loss = OPS["wgan_critic_loss"]
wgan_g_loss = OPS["wgan_g_loss"]
hinge_d_loss = OPS["hinge_d_loss"]
hinge_g_loss = OPS["hinge_g_loss"]
relativistic_d_loss = OPS["relativistic_d_loss"]
relativistic_g_loss = OPS["relativistic_g_loss"]
gradient_penalty_from_grads = OPS["gradient_penalty_from_grads"]
r1_penalty_from_grads = OPS["r1_penalty_from_grads"]
feature_matching_loss = OPS["feature_matching_loss"]
ssgan_critic_loss = OPS["ssgan_critic_loss"]
ssgan_g_loss = OPS["ssgan_g_loss"]
l1_loss = OPS["l1_loss"]
pix2pix_g_loss = OPS["pix2pix_g_loss"]
cycle_consistency_loss = OPS["cycle_consistency_loss"]
fgan_d_loss = OPS["fgan_d_loss"]
fgan_g_loss = OPS["fgan_g_loss"]
jsd_estimate = OPS["jsd_estimate"]


# ---------------------------------------------------------------- (GAN.17)
lib.define(
    "spectral_norm_sigma(Tensor W, Tensor u, int n_iters=1, float eps=1e-12) -> (Tensor, Tensor, Tensor)"
)


def _spectral_norm_sigma(W: torch.Tensor, u: torch.Tensor, n_iters: int = 1, eps: float = 1e-12):
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


def spectral_norm_sigma(W: torch.Tensor, u: torch.Tensor, n_iters: int = 1, eps: float = 1e-12):
    r"""Power-iteration estimate (sigma, u, v) of the top singular value of ``W``.

    .. math:: v = \frac{W^\top u}{\lVert W^\top u\rVert},\; u = \frac{W v}{\lVert W v\rVert},\; \sigma = u^\top W v

    Differentiable w.r.t. ``W`` (u, v held constant), twice as well. (GAN.17)
    """
    return torch.ops.genloss.spectral_norm_sigma(W, u, n_iters, eps)


# ---------------------------------------------------------------- (GAN.12, GAN.13)
def _input_grads(
    critic: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_scaler: object | None
) -> torch.Tensor:
    """d sum(critic(x)) / dx with create_graph, unscaled when a GradScaler scaled it."""
    out = critic(x)
    total = out.sum()
    if grad_scaler is not None:
        total = grad_scaler.scale(total)  # type: ignore[attr-defined]
    (g,) = torch.autograd.grad(total, x, create_graph=True)
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
    if real.shape != fake.shape:
        raise ValueError(f"fake must have the shape of real {tuple(real.shape)}, got {tuple(fake.shape)}")
    C.batched("real", tuple(real.shape), reduction)
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    eps = torch.rand(shape, device=real.device, dtype=real.dtype, generator=generator)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    grads = _input_grads(critic, x_hat, grad_scaler)
    return gradient_penalty_from_grads(grads, lambda_, center, one_sided, reduction)


def _squared_norm_penalty(critic, x, name, gamma, grad_scaler, reduction) -> torch.Tensor:
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


__all__ = [*OPS, "spectral_norm_sigma", "gradient_penalty", "r1_penalty", "r2_penalty"]
