"""Input domains: how each kind of argument is drawn, its extremes, bounds and invalid values."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

EXTREME = 1e4  # magnitude of the "extreme logits" every logit op must survive (SPEC)
KINK_MARGIN = 1e-2  # inputs are kept this far from kinks (FD steps are 1e-6; gradcheck's 1e-6)


@dataclass(frozen=True)
class Domain:
    description: str
    kind: str  # 'float' | 'int'
    make: Callable[[np.random.Generator, tuple[int, ...], Mapping[str, Any], Mapping[str, Any]], np.ndarray]
    extreme: bool = True  # whether ``extreme=True`` injects +-extreme_value into this argument
    extreme_value: float = EXTREME  # 1e4 for logits; 30 for log-variances (e^30 ~ 1e13) and moderate data
    bounds: tuple[float, float] | None = None  # a closed domain: finite differences go one-sided at its ends
    invalid: tuple[float, ...] = ()  # values outside the domain the ops must refuse (bad-input tests)


def _few(rng: np.random.Generator, n: int, frac: float) -> np.ndarray:
    """Indices of about ``frac`` of ``n`` entries (at least one when n > 0)."""
    k = min(n, max(1, int(round(frac * n))))
    return rng.choice(n, size=k, replace=False) if n else np.zeros(0, dtype=np.int64)


def _logits(rng, shape, sizes, hyper):
    x = 3.0 * rng.standard_normal(shape)
    if x.size >= 4:  # a few large logits: saturated sigmoids, softplus(l) ~ l
        idx = _few(rng, x.size, 0.1)
        x.flat[idx] = rng.choice([-1.0, 1.0], size=idx.size) * rng.uniform(12.0, 40.0, size=idx.size)
    return x


def _scores(rng, shape, sizes, hyper):
    return 2.0 * rng.standard_normal(shape)


def _outputs(rng, shape, sizes, hyper):
    return rng.uniform(-0.25, 1.25, size=shape)


def _grads(rng, shape, sizes, hyper):
    x = rng.standard_normal(shape)
    if shape[0] >= 2 and rng.random() < 0.5:
        x[rng.integers(shape[0])] = 0.0  # g_b = 0: the penalty's cone point (gradient defined as 0)
    return x


def _features(rng, shape, sizes, hyper):
    return rng.standard_normal(shape) + 0.5


def _labels(rng, shape, sizes, hyper):
    return rng.integers(0, sizes["K"] - 1, size=shape, dtype=np.int64)  # [0, C), C = K - 1


def _images(rng, shape, sizes, hyper):
    return rng.uniform(-1.0, 1.0, size=shape)


def _weight(rng, shape, sizes, hyper):
    """W = U diag(s) V^T with s_1 = 3 and the rest in [0.1, 1.5]: a spectral gap of at least 2,
    so 30 power iterations converge to ~1e-18."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = np.concatenate([[3.0], rng.uniform(0.1, 1.5, size=r - 1)])
    return (u * s) @ v.T


def _vector(rng, shape, sizes, hyper):
    return rng.standard_normal(shape)


def _moderate(rng, shape, sizes, hyper):
    return rng.uniform(-2.0, 2.0, size=shape)


def _data(rng, shape, sizes, hyper):
    return 1.5 * rng.standard_normal(shape)


def _probabilities(rng, shape, sizes, hyper):
    x = rng.uniform(0.0, 1.0, size=shape)
    if x.size >= 2:  # binary data: exact 0 and 1 (the ends of the domain)
        idx = _few(rng, x.size, 0.3)
        x.flat[idx] = rng.integers(0, 2, size=idx.size).astype(np.float64)
    return x


def _log_weights(rng, shape, sizes, hyper):
    x = -5.0 + 3.0 * rng.standard_normal(shape)
    if x.size >= 4:  # a few weights far apart: a near one-hot softmax
        idx = _few(rng, x.size, 0.1)
        x.flat[idx] = rng.uniform(-60.0, 20.0, size=idx.size)
    return x


def _timesteps(rng, shape, sizes, hyper):
    """Timesteps in [0, T) of the variant's schedule; the decoder step 0 and the last step often."""
    T = hyper["schedule"].num_timesteps
    t = rng.integers(0, T, size=shape, dtype=np.int64)
    if t.size >= 2:
        t.flat[0] = 0
        t.flat[-1] = T - 1
    return t


def _levels(rng, shape, sizes, hyper):
    """Data on the grid of 2^bits levels in [-1, 1], the two edge levels often."""
    n = 2 ** int(hyper.get("bits", 8)) - 1
    k = rng.integers(0, n + 1, size=shape)
    if k.size >= 3:
        idx = _few(rng, k.size, 0.3)
        k.flat[idx] = rng.choice([0, n], size=idx.size)
    return -1.0 + 2.0 * k / n


def _unit_box(rng, shape, sizes, hyper):
    return rng.uniform(-1.0, 1.0, size=shape)


def _sample_weights(rng, shape, sizes, hyper):
    return rng.uniform(0.0, 2.0, size=shape)


def _unit_times(rng, shape, sizes, hyper):
    """Flow-matching times in [0, 1]; the end points 0 (data) and 1 (noise) often."""
    t = rng.uniform(0.0, 1.0, size=shape)
    if t.size >= 2:
        t.flat[0] = 0.0
        t.flat[-1] = 1.0
    return t


def _noise_levels(rng, shape, sizes, hyper):
    """EDM noise levels sigma = e^U(-4, 4), about 0.018 .. 55 (a VE path's x_t = x0 + sigma noise)."""
    return np.exp(rng.uniform(-4.0, 4.0, size=shape))


def _positive_times(rng, shape, sizes, hyper):
    """Times in [0.05, 1], the end point 1 often (a weighting infinite at t = 0, e.g. t^-2)."""
    t = rng.uniform(0.05, 1.0, size=shape)
    if t.size >= 2:
        t.flat[-1] = 1.0
    return t


DOMAINS: dict[str, Domain] = {
    "logits": Domain("real line, 3*N(0,1) plus ~10% of magnitude 12..40", "float", _logits),
    "scores": Domain("real line, 2*N(0,1) (critic scores, f-GAN critic outputs)", "float", _scores),
    "outputs": Domain("raw outputs in [0, 1]-ish: U(-0.25, 1.25)", "float", _outputs),
    "grads": Domain("N(0,1) per-sample gradients; half the time one sample is exactly 0", "float", _grads),
    "features": Domain("N(0.5, 1) features", "float", _features),
    "class_logits": Domain("2-D (B, K = C+1) logits, as 'logits'", "float", _logits),
    "labels": Domain("int64 class labels in [0, C), C = K - 1", "int", _labels, extreme=False),
    "images": Domain("U(-1, 1) images", "float", _images),
    "weight": Domain("(out, in) matrix with singular values 3 > 1.5 >= s_i >= 0.1", "float", _weight, False),
    "vector": Domain("N(0,1) vector (power-iteration start)", "float", _vector, extreme=False),
    "mean": Domain("Gaussian means, U(-2, 2); extreme +-30", "float", _moderate, extreme_value=30.0),
    "logvar": Domain("log-variances, U(-2, 2); extreme +-30 (e^30 ~ 1e13 is finite in float32)", "float",
                     _moderate, extreme_value=30.0),
    "data": Domain("real data, 1.5*N(0,1); extreme +-30", "float", _data, extreme_value=30.0),
    "probabilities": Domain("Bernoulli targets in [0, 1], ~30% exactly 0 or 1", "float", _probabilities,
                            extreme=False, bounds=(0.0, 1.0), invalid=(-0.25, 1.25, float("nan"))),
    "log_weights": Domain("log importance weights, N(-5, 9) plus ~10% in U(-60, 20); extreme +-1e4", "float",
                          _log_weights),
    "timesteps": Domain("int64 timesteps in [0, T) of the schedule, 0 and T-1 included", "int", _timesteps,
                        extreme=False),
    "levels": Domain("data on the 2^bits-level grid of [-1, 1], ~30% at the edge levels", "float", _levels,
                     extreme=False, bounds=(-1.0, 1.0), invalid=(1.5, float("nan"))),
    "unit_box": Domain("data in [-1, 1], U(-1, 1)", "float", _unit_box, extreme=False, bounds=(-1.0, 1.0),
                       invalid=(-1.5, float("nan"))),
    "sample_weights": Domain("per-sample loss weights, U(0, 2)", "float", _sample_weights, extreme=False,
                             invalid=(-0.5, float("nan"))),
    "unit_times": Domain("continuous times in [0, 1], U(0, 1) with 0 and 1 included", "float", _unit_times,
                         extreme=False, bounds=(0.0, 1.0), invalid=(-0.25, 1.25, float("nan"))),
    "noise_levels": Domain("noise levels sigma > 0, e^U(-4, 4)", "float", _noise_levels, extreme=False,
                           invalid=(-0.5, float("nan"))),
    "positive_times": Domain("continuous times in [0.05, 1], 1 included", "float", _positive_times,
                             extreme=False, bounds=(0.0, 1.0), invalid=(0.0, -0.25, 1.25, float("nan"))),
}  # fmt: skip
