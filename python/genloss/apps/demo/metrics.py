r"""The demo's metrics: mode coverage, high-quality fraction, MMD² and (when available) PRDC.

Each is computed on ``n`` generated samples against ``n`` held-out data points that no
method trained on. They are computed here in plain torch / NumPy, on purpose: the score
of the demo does not rest on the library it scores (PRDC, when genloss has it, is the
exception, and is cross-checked by its own tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "N_SIGMA",
    "MIN_SHARE",
    "MMD_BANDWIDTHS",
    "PRDC_K",
    "mode_coverage",
    "mmd2_rbf",
    "prdc_function",
    "prdc_scores",
]

# A sample is *high quality* when it lies within 3 standard deviations of a mode's
# centre: the rule of VEEGAN (Srivastava et al. 2017) and PacGAN (Lin et al. 2018).
# A true 2-D Gaussian sample lands beyond r with probability exp(-r²/2σ²) (its radius is
# Rayleigh), so the data itself scores 1 - e^{-4.5} = 98.9%.
N_SIGMA = 3.0
# A mode is *covered* when it receives at least 1/4 of its expected mass (1/K of the
# samples) within 3σ of its centre. The data gives each mode 98.9% of its share, so it
# covers every mode; a generator that blurs a mode to 3x its width still puts ~40% there
# and covers it (coverage is not sharpness: the high-quality fraction measures that); a
# few stray points passing by do not.
MIN_SHARE = 0.25
# RBF bandwidths, averaged: the mode width (x2.5 the ring's std), between-mode scale, the
# distribution's scale. MMD² with several bandwidths sees both blur and missing modes.
MMD_BANDWIDTHS = (0.05, 0.2, 1.0)
PRDC_K = 5  # Naeem et al. 2020's k


def mode_coverage(
    samples: torch.Tensor | np.ndarray,
    centers: np.ndarray,
    std: float,
    n_sigma: float = N_SIGMA,
    min_share: float = MIN_SHARE,
) -> dict[str, Any]:
    """Modes covered, per-mode counts and high-quality fraction of ``samples`` ``(n, 2)``.

    Each sample is assigned to its nearest centre; it is *high quality* when that distance
    is ``<= n_sigma * std``. Mode ``k`` is covered when its high-quality samples number
    ``>= min_share * n / K`` (K centres). Returns ``{'modes_covered': int, 'n_modes': K,
    'mode_counts': list[int], 'high_quality': float}``.
    """
    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[1] != 2 or x.shape[0] == 0:
        raise ValueError(f"mode_coverage: samples must have shape (n, 2) with n > 0, got {tuple(x.shape)}")
    c = torch.as_tensor(centers, dtype=torch.float64)
    finite = torch.isfinite(x).all(dim=1)
    dist = torch.cdist(x[finite], c, compute_mode="donot_use_mm_for_euclid_dist")
    d_min, nearest = dist.min(dim=1)
    good = d_min <= n_sigma * std
    counts = torch.bincount(nearest[good], minlength=c.shape[0])
    n, k = x.shape[0], c.shape[0]
    return {
        "modes_covered": int((counts >= min_share * n / k).sum()),
        "n_modes": k,
        "mode_counts": [int(v) for v in counts],
        "high_quality": float(good.sum()) / n,  # a non-finite sample is never high quality
    }


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> torch.Tensor:
    r"""Unbiased squared MMD between samples ``x`` ``(n, d)`` and ``y`` ``(m, d)``, in float64.

    .. math::
        \widehat{\mathrm{MMD}}^2_u = \frac{1}{n(n-1)}\sum_{i\ne j} k(x_i, x_j)
          + \frac{1}{m(m-1)}\sum_{i\ne j} k(y_i, y_j) - \frac{2}{nm}\sum_{i,j} k(x_i, y_j),
        \qquad k(a, b) = \frac{1}{S}\sum_s e^{-\lVert a-b\rVert^2 / 2 s^2}

    (Gretton et al. 2012, Lemma 6). Its expectation is the population MMD², 0 when both
    samples come from one distribution, so it can come out slightly negative. genloss's
    tiled ``genloss.torch.mmd2(x, y, "rbf", bandwidths)`` sums the kernels over the
    bandwidths where this averages them: it gives ``S`` times this value (a test checks
    the two against each other).
    """
    x = torch.as_tensor(x).detach().double()
    y = torch.as_tensor(y).detach().to(x.device, torch.float64)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd2_rbf needs at least 2 samples on each side, got {n} and {m}")

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # |a|^2 + |b|^2 - 2 a.b in float64: the cancellation error (~1e-16 |a|^2) is far
        # below the smallest bandwidth^2, and it is one matmul instead of an (n, m, d) pass
        d2 = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)
        out = torch.zeros_like(d2)
        for s in bandwidths:
            out += torch.exp(d2 * (-0.5 / (s * s)))
        return out / len(bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return xx + yy - 2.0 * kxy.mean()


PRDC_NAMES = ("precision", "recall", "density", "coverage")


def prdc_function() -> Callable[..., Any] | None:
    """``genloss.reference.metrics.prdc`` when this build has it, else None (the columns are left out)."""
    try:
        from genloss.reference.metrics import prdc
    except ImportError:
        return None
    return prdc


def prdc_scores(real: np.ndarray, fake: np.ndarray, k: int = PRDC_K) -> dict[str, float] | None:
    """Precision, recall, density, coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020) of
    ``fake`` against ``real`` with k nearest neighbours, or None when genloss has no ``prdc``."""
    fn = prdc_function()
    if fn is None:
        return None
    out = fn(np.asarray(real, np.float64), np.asarray(fake, np.float64), k=k)
    if isinstance(out, dict):
        return {name: float(out[name]) for name in PRDC_NAMES}
    if all(hasattr(out, name) for name in PRDC_NAMES):  # a named tuple or a result object
        return {name: float(getattr(out, name)) for name in PRDC_NAMES}
    return {name: float(v) for name, v in zip(PRDC_NAMES, out, strict=True)}  # a plain 4-tuple
