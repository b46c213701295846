"""The demo's toy distributions: two Gaussian mixtures with known modes, and a swiss roll.

The mixtures are the benchmarks of the mode-collapse literature, at the scale of the
WGAN-GP authors' toy script (``gan_toy.py``): points in about [-2.5, 2.5]², so that one
network, learning rate and MMD bandwidth serve all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "DATASETS", "ALIASES", "ring_centers", "grid_centers", "ring", "grid", "swiss_roll"]

# The ring of Metz et al. (Unrolled GANs, 2017) and VEEGAN: 8 modes on a circle of
# radius 2, std 0.02. Neighbouring modes are 2·2·sin(π/8) = 1.53 apart, 77 std.
RING_RADIUS, RING_STD, RING_MODES = 2.0, 0.02, 8
# The 5x5 grid of VEEGAN / PacGAN (modes at {-4, -2, 0, 2, 4}², std 0.05) scaled by 1/2
# as gan_toy.py does: modes 1 apart, std 0.025 (the same 40 std between neighbours).
GRID_SPACING, GRID_STD, GRID_SIDE = 1.0, 0.025, 5


def ring_centers(n_modes: int = RING_MODES, radius: float = RING_RADIUS) -> np.ndarray:
    """The ``(n_modes, 2)`` centres of the ring, the first at angle 0."""
    angles = 2 * np.pi * np.arange(n_modes) / n_modes
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def grid_centers(side: int = GRID_SIDE, spacing: float = GRID_SPACING) -> np.ndarray:
    """The ``(side², 2)`` centres of the grid, centred on the origin, row-major."""
    axis = spacing * (np.arange(side) - (side - 1) / 2)
    xx, yy = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def _mixture(centers: np.ndarray, std: float, n: int, rng: np.random.Generator) -> np.ndarray:
    k = rng.integers(0, len(centers), size=n)  # equal weights
    return (centers[k] + std * rng.standard_normal((n, 2))).astype(np.float32)


def ring(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points of the ring of 8 Gaussians (radius 2, std 0.02), float32 ``(n, 2)``."""
    return _mixture(ring_centers(), RING_STD, n, rng)


def grid(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points of the 5x5 grid of 25 Gaussians (spacing 1, std 0.025), float32 ``(n, 2)``."""
    return _mixture(grid_centers(), GRID_STD, n, rng)


def swiss_roll(n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """``n`` points of a 2-D swiss roll (1.5 turns, scikit-learn's parametrisation / 5), float32 ``(n, 2)``."""
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 5.0
    return (x + noise * rng.standard_normal((n, 2))).astype(np.float32)


@dataclass(frozen=True)
class Dataset:
    """A toy distribution: its sampler and, for a mixture, its mode centres and per-mode std."""

    name: str
    title: str
    sample: Callable[[int, np.random.Generator], np.ndarray]
    centers: np.ndarray | None = None  # None: no modes (the swiss roll)
    std: float | None = None

    @property
    def n_modes(self) -> int | None:
        return None if self.centers is None else len(self.centers)


DATASETS: dict[str, Dataset] = {
    "ring": Dataset("ring", "ring of 8 Gaussians", ring, ring_centers(), RING_STD),
    "grid": Dataset("grid", "grid of 25 Gaussians", grid, grid_centers(), GRID_STD),
    "swiss_roll": Dataset("swiss_roll", "swiss roll", swiss_roll),
}
# the names of earlier versions of the demo
ALIASES = {"eight_gaussians": "ring", "spiral": "swiss_roll"}
