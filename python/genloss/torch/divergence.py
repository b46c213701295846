r"""MMD^2, the median heuristic and KID as torch custom ops (``torch.ops.genloss.mmd2``).

Signatures and conventions follow ``genloss.native.divergence`` (and the NumPy
reference ``genloss.reference.divergence``); the math runs in the tiled native
kernel, value and both gradients in one pass. ``bandwidths=None`` for rbf/imq
takes the median heuristic of the inputs inside the kernel, as a constant (no
gradient flows through it).
"""

from __future__ import annotations

import torch

from ..native import divergence as native
from ._op import LossOp, public

mmd2 = public(
    LossOp(
        "mmd2",
        "Tensor x, Tensor y, str kernel='rbf', float[]? bandwidths=None, str estimator='unbiased'",
        native.mmd2,
    ),
    __name__,
)
density_ratio_from_logits = public(
    LossOp("density_ratio_from_logits", "Tensor logits", native.density_ratio_from_logits, elementwise=True),
    __name__,
)


def median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 2000) -> float:
    r"""The median of :math:`\|z_i - z_j\|`, i < j, z = concat(x, y) (strided subsample above
    ``max_points``), computed in float64 on the tensors' device; a Python float.  (DIV.12)"""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return native.median_bandwidth(x.detach(), y.detach(), max_points)


def kid(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int | None = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    r"""Kernel Inception Distance: (mean, std ddof=0) of the unbiased cubic-polynomial MMD^2
    over ``subsets`` random subsets drawn by ``np.random.default_rng(seed)``; Python floats.  (DIV.13)
    ``subsets=None``: (full-set MMD^2, the square root of the unbiased estimate of its
    variance), row tiles in float64 on the features' device.  (DIV.16) float16/bfloat16 features
    are computed in float32, as the losses and ``cmmd`` do, and float32 with float64 in float64, as
    ``frechet_distance``, ``prdc`` and ``sliced_wasserstein`` do."""
    for name, t in (("real_features", real_features), ("fake_features", fake_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    low = (torch.float16, torch.bfloat16)
    real, fake = (
        t.detach().float() if t.dtype in low else t.detach() for t in (real_features, fake_features)
    )
    if real.is_floating_point() and fake.is_floating_point() and real.dtype != fake.dtype:
        dtype = torch.promote_types(real.dtype, fake.dtype)
        real, fake = real.to(dtype), fake.to(dtype)
    with torch.no_grad():
        return native.kid(real, fake, subsets, subset_size, seed)


__all__ = ["mmd2", "median_bandwidth", "kid", "density_ratio_from_logits"]
