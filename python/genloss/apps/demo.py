r"""The ``genloss demo``: one method per panel, trained with the genloss torch ops.

Every method trains small MLPs (a GAN's generator and discriminator under one of
seven objectives, a VAE's encoder and decoder, a DDPM's noise predictor) on a toy
2-D distribution generated in code, with nothing but ``genloss.torch`` for its
losses, and is scored against held-out data::

    from genloss.apps.demo import run_demo, format_table
    results = run_demo("out")            # writes out/genloss-demo.png
    print(format_table(results))

What it shows on the ring of eight Gaussians: with the same networks, optimizer and
number of steps, each objective has found the ring and is gathering its samples onto
the modes; how far it has got (modes covered, MMD²) differs by objective and, at this
budget, by seed too, so one seed ranks the objectives only loosely. The bridges
between modes are those of any continuous generator of a connected latent space (it
cannot put zero mass between the modes); a DDPM's sampler, a chain of noisy steps,
is not bound by that. A generator that collapses shows it as a low mode count with
a high high-quality fraction.

Metrics, per method, on ``N_EVAL`` = 2000 samples:

* **modes covered** (of 8): a sample is *high quality* when it lies within
  ``QUALITY_RADIUS`` of its nearest mode centre, and a mode is *covered* when at
  least ``MIN_MODE_FRACTION`` of all samples are high-quality samples of it (the
  comments at those constants say why these values);
* **high-quality fraction**: the fraction of high-quality samples;
* **MMD²** to held-out data: unbiased estimator, RBF kernel averaged over the
  bandwidths ``MMD_BANDWIDTHS`` (:func:`mmd2_rbf`). The ``data`` row of the table is a
  second draw of the data itself: its MMD² is the noise floor of the estimate;
* the final losses (mean of the last ``LOSS_WINDOW`` steps), the wall and CPU time.

Determinism: each method draws from its own seed (derived from ``seed`` and the
method's name, so a method gives the same numbers whether it runs alone or with the
others), under ``torch.random.fork_rng`` so the caller's RNG state is untouched. On
CPU the same seed gives the same numbers, run after run (genloss's reductions are
deterministic; a fixed thread count keeps torch's matmuls so).
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

import genloss.torch as gl

__all__ = [
    "METHODS",
    "Method",
    "eight_gaussians",
    "spiral",
    "DATASETS",
    "mode_centers",
    "mode_coverage",
    "mmd2_rbf",
    "run_demo",
    "format_table",
]

# ============================================================================ toy data

RING_RADIUS = 2.0
MODE_STD = 0.02
N_MODES = 8


def mode_centers(n_modes: int = N_MODES, radius: float = RING_RADIUS) -> np.ndarray:
    """The ``(n_modes, 2)`` centres of the ring, the first at angle 0."""
    angles = 2 * np.pi * np.arange(n_modes) / n_modes
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points of the ring of 8 Gaussians (radius 2, std 0.02 per mode), float32 ``(n, 2)``.

    The modes are 2·2·sin(π/8) ≈ 1.53 apart, 77 standard deviations: a sample belongs
    to one mode without ambiguity.
    """
    k = rng.integers(0, N_MODES, size=n)
    x = mode_centers()[k] + MODE_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32)


def spiral(n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """``n`` points of a 2-D swiss roll (a spiral of 1.5 turns), float32 ``(n, 2)``, in about [-2.5, 2.5]²."""
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 5.0
    return (x + noise * rng.standard_normal((n, 2))).astype(np.float32)


DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "eight_gaussians": eight_gaussians,
    "spiral": spiral,
}

# ============================================================================ metrics

N_EVAL = 2000
# 5 standard deviations. A true sample lands farther than r from its centre with
# probability exp(-r^2 / 2 std^2) (the radius of a 2-D Gaussian is Rayleigh):
# 1.1e-2 at 3 std (the "3 std" rule of VEEGAN / PacGAN), 3.7e-6 at 5 std, so at 5
# std the data itself scores 100% and a generator is not penalised for a mode a few
# hundredths wider than 0.02, which a small MLP trained for a few thousand steps
# cannot resolve. It is still 1/15 of the distance between neighbouring modes
# (1.53): a point between two modes is never counted for either.
QUALITY_RADIUS = 5 * MODE_STD
# A mode is covered when it holds >= 2% of the samples (40 of 2000), i.e. 16% of
# the 12.5% a perfect generator puts there: a few stray points passing by a mode do
# not count, a mode with a sixth of its share does.
MIN_MODE_FRACTION = 0.02
MMD_BANDWIDTHS = (0.05, 0.2, 1.0)  # mode width (x2.5), between-mode scale, ring scale
LOSS_WINDOW = 100


def mode_coverage(
    samples: torch.Tensor | np.ndarray,
    centers: np.ndarray | None = None,
    radius: float = QUALITY_RADIUS,
    min_fraction: float = MIN_MODE_FRACTION,
) -> dict[str, Any]:
    """Modes covered, per-mode counts and high-quality fraction of ``samples`` ``(n, 2)``.

    A sample is high quality when its distance to the nearest centre is ``<= radius``;
    a mode is covered when its high-quality samples are ``>= min_fraction * n``.
    Returns ``{'modes_covered': int, 'mode_counts': list[int], 'high_quality': float}``.
    """
    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[1] != 2 or x.shape[0] == 0:
        raise ValueError(f"samples must have shape (n, 2) with n > 0, got {tuple(x.shape)}")
    c = torch.as_tensor(mode_centers() if centers is None else centers, dtype=torch.float64)
    dist = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist")
    d_min, nearest = dist.min(dim=1)
    good = d_min <= radius
    counts = torch.bincount(nearest[good], minlength=c.shape[0])
    n = x.shape[0]
    return {
        "modes_covered": int((counts >= min_fraction * n).sum()),
        "mode_counts": [int(v) for v in counts],
        "high_quality": float(good.double().mean()),
    }


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> torch.Tensor:
    r"""Unbiased squared MMD between samples ``x`` ``(n, d)`` and ``y`` ``(m, d)``, in float64.

    .. math::
        \widehat{\mathrm{MMD}}^2_u = \frac{1}{n(n-1)}\sum_{i\ne j} k(x_i, x_j)
          + \frac{1}{m(m-1)}\sum_{i\ne j} k(y_i, y_j) - \frac{2}{nm}\sum_{i,j} k(x_i, y_j),
        \qquad k(a, b) = \frac{1}{S}\sum_s e^{-\lVert a-b\rVert^2 / 2 s^2}

    (Gretton et al. 2012, Lemma 6). Its expectation is the population MMD², 0 when
    both samples come from one distribution, so it can come out slightly negative.
    Plain torch, O(nm) memory, on purpose: the score of the demo does not rest on the
    library it scores. genloss's tiled ``genloss.torch.mmd2(x, y, "rbf", bandwidths)``
    sums the kernels over the bandwidths where this averages them: it gives ``S``
    times this value (a test checks the two against each other).
    """
    x = x.detach().double()
    y = y.detach().to(x.device, torch.float64)
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


# ============================================================================ models


WIDTH, DEPTH = 128, 2


def mlp(d_in: int, d_out: int, width: int | None = None, depth: int | None = None) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units with LeakyReLU(0.2), then a linear output."""
    width = WIDTH if width is None else width
    depth = DEPTH if depth is None else depth
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


@dataclass
class Trainer:
    """What a method's ``setup`` builds: the modules, optimizers and the RNG of one run."""

    device: torch.device
    gen: torch.Generator  # every random draw of the run (latents, timesteps, GP mixing)
    modules: dict[str, nn.Module]
    opts: dict[str, torch.optim.Optimizer]
    extra: dict[str, Any] = field(default_factory=dict)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, device=self.device, generator=self.gen)

    def update(self, opt: str, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """One optimizer step on ``loss``, gradients accumulated only into ``params``."""
        o = self.opts[opt]
        o.zero_grad(set_to_none=True)
        loss.backward(inputs=list(params))
        o.step()


# ============================================================================ the methods

Z_DIM = 2  # a 2-D latent: the generator bends a Gaussian blob onto the ring


@dataclass(frozen=True)
class Method:
    """One demo method: the genloss torch ops it needs, and how it trains and samples.

    ``step(trainer, sample_real)`` does one training step (for a GAN: ``n_critic``
    discriminator steps and one generator step) drawing data batches from
    ``sample_real()``, and returns ``{'d': loss, 'g': loss}`` (GANs) or ``{'loss': loss}``,
    detached. The method is run only when every name in ``ops`` exists in
    ``genloss.torch`` (all do in a full build); otherwise the table says which are missing.
    """

    name: str
    family: str  # 'gan' | 'vae' | 'diffusion' | 'flow'
    ops: tuple[str, ...]
    about: str
    step: Callable[[Trainer, Callable[[], torch.Tensor]], dict[str, torch.Tensor]]
    setup: Callable[[torch.device, torch.Generator], Trainer]
    sample: Callable[[Trainer, int], torch.Tensor]
    steps: int = 2000  # default number of (generator) steps

    def missing(self) -> list[str]:
        """The ops of ``ops`` that ``genloss.torch`` does not have."""
        return [op for op in self.ops if not hasattr(gl, op)]

    def available(self) -> bool:
        return not self.missing()


# ---------------------------------------------------------------- GANs


def _gan_setup(lr: float = 5e-4, betas: tuple[float, float] = (0.5, 0.999)):
    def setup(device: torch.device, gen: torch.Generator) -> Trainer:
        G, D = mlp(Z_DIM, 2).to(device), mlp(2, 1).to(device)
        opts: dict[str, torch.optim.Optimizer] = {
            "g": torch.optim.Adam(G.parameters(), lr=lr, betas=betas),
            "d": torch.optim.Adam(D.parameters(), lr=lr, betas=betas),
        }
        return Trainer(device, gen, {"G": G, "D": D}, opts)

    return setup


def _gan_sample(t: Trainer, n: int) -> torch.Tensor:
    with torch.no_grad():
        return t.modules["G"](t.randn(n, Z_DIM))


def _gan_step(
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    g_loss: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
    penalty: Callable[[Trainer, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    n_critic: int = 1,
    g_needs_real: bool = False,
):
    """A GAN step from its two losses: ``d_loss(D(real), D(fake))`` and ``g_loss(D(real), D(fake))``
    (``D(real)`` is ``None`` for the generator unless ``g_needs_real``, as only the relativistic
    losses look at it)."""

    def step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
        G, D = t.modules["G"], t.modules["D"]
        for _ in range(n_critic):
            real = sample_real()
            b = real.shape[0]
            with torch.no_grad():
                fake = G(t.randn(b, Z_DIM))
            out_r, out_f = D(torch.cat([real, fake])).split([b, b])  # one pass of D for both
            ld = d_loss(out_r, out_f)
            total = ld if penalty is None else ld + penalty(t, real, fake)
            t.update("d", total, list(D.parameters()))
        out_f = D(G(t.randn(b, Z_DIM)))
        out_r = None
        if g_needs_real:  # a constant to G: D is not updated by the generator step
            with torch.no_grad():
                out_r = D(real)
        lg = g_loss(out_r, out_f)
        t.update("g", lg, list(G.parameters()))
        return {"d": ld.detach(), "g": lg.detach()}

    return step


# lambda = 1: between the 10 of the WGAN-GP paper's images and the 0.1 of its toy
# script (gan_toy.py, trained 100k iterations); with ~3000 critic steps here, 1 gave
# the sharpest ring of the three (0.1: a blurred disc, 10: a blurred ring).
GP_LAMBDA = 1.0


def _gp(t: Trainer, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return gl.gradient_penalty(t.modules["D"], real, fake, lambda_=GP_LAMBDA, generator=t.gen)


def _gan(name: str, ops: tuple[str, ...], about: str, d_loss, g_loss, **kw) -> Method:
    setup_kw = {k: kw.pop(k) for k in ("lr", "betas") if k in kw}
    steps = kw.pop("steps", 2000)
    return Method(
        name=name,
        family="gan",
        ops=ops,
        about=about,
        step=_gan_step(d_loss, g_loss, **kw),
        setup=_gan_setup(**setup_kw),
        sample=_gan_sample,
        steps=steps,
    )


GAN_METHODS = [
    _gan(
        "gan-ns",
        ("gan_d_loss", "gan_g_loss"),
        "Goodfellow et al.'s GAN, non-saturating generator: min E softplus(-D(G(z)))",
        lambda r, f: gl.gan_d_loss(r, f),
        lambda r, f: gl.gan_g_loss(f, mode="nonsaturating"),
    ),
    _gan(
        "gan-minimax",
        ("gan_d_loss", "gan_g_loss"),
        "the original minimax generator: min E log(1 - D(G(z))), saturates when D wins",
        lambda r, f: gl.gan_d_loss(r, f),
        lambda r, f: gl.gan_g_loss(f, mode="minimax"),
    ),
    _gan(
        "hinge",
        ("hinge_d_loss", "hinge_g_loss"),
        "hinge loss (SAGAN / BigGAN)",
        lambda r, f: gl.hinge_d_loss(r, f),
        lambda r, f: gl.hinge_g_loss(f),
    ),
    _gan(
        "lsgan",
        ("lsgan_d_loss", "lsgan_g_loss"),
        "least squares GAN, a=0, b=1, c=1",
        lambda r, f: gl.lsgan_d_loss(r, f),
        lambda r, f: gl.lsgan_g_loss(f),
    ),
    _gan(
        "wgan-gp",
        ("wgan_critic_loss", "wgan_g_loss", "gradient_penalty"),
        f"Wasserstein critic + gradient penalty (lambda {GP_LAMBDA:g}), 3 critic steps per generator step",
        lambda r, f: gl.wgan_critic_loss(r, f),
        lambda r, f: gl.wgan_g_loss(f),
        penalty=_gp,
        n_critic=3,
        lr=1e-3,
        betas=(0.5, 0.9),
        steps=1000,
    ),
    _gan(
        "fgan-js",
        ("fgan_d_loss", "fgan_g_loss"),
        "f-GAN, Jensen-Shannon divergence, non-saturating generator",
        lambda r, f: gl.fgan_d_loss(r, f, "jensen_shannon"),
        lambda r, f: gl.fgan_g_loss(f, "jensen_shannon"),
    ),
    _gan(
        "ragan",
        ("relativistic_d_loss", "relativistic_g_loss"),
        "relativistic average GAN (RaGAN)",
        lambda r, f: gl.relativistic_d_loss(r, f, average=True),
        lambda r, f: gl.relativistic_g_loss(r, f, average=True),
        g_needs_real=True,
    ),
]


# ---------------------------------------------------------------- VAE

VAE_LATENT = 2


def _vae_setup(device: torch.device, gen: torch.Generator) -> Trainer:
    enc, dec = mlp(2, 2 * VAE_LATENT).to(device), mlp(VAE_LATENT, 2).to(device)
    # A learned scalar decoder log-variance: with a fixed unit variance the
    # reconstruction of 0.02-wide modes is worth too little against the KL.
    recon_logvar = nn.Parameter(torch.zeros((), device=device))
    params = [*enc.parameters(), *dec.parameters(), recon_logvar]
    return Trainer(
        device, gen, {"enc": enc, "dec": dec}, {"vae": torch.optim.Adam(params, lr=1e-3)},
        extra={"recon_logvar": recon_logvar, "params": params},
    )  # fmt: skip


def _vae_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x = sample_real()
    mu, logvar = t.modules["enc"](x).chunk(2, dim=1)
    z = mu + torch.exp(0.5 * logvar) * t.randn(*mu.shape)  # reparameterisation
    recon = t.modules["dec"](z)
    loss = gl.negative_elbo(
        recon, x, mu, logvar, beta=1.0, likelihood="gaussian", recon_logvar=t.extra["recon_logvar"]
    )
    t.update("vae", loss, t.extra["params"])
    return {"loss": loss.detach()}


def _vae_sample(t: Trainer, n: int) -> torch.Tensor:
    """Decoder means at z ~ N(0, I) (the usual VAE samples)."""
    with torch.no_grad():
        return t.modules["dec"](t.randn(n, VAE_LATENT))


VAE_METHOD = Method(
    name="vae",
    family="vae",
    ops=("negative_elbo",),
    about="VAE, 2-D latent, Gaussian decoder with a learned scalar variance, beta = 1",
    step=_vae_step,
    setup=_vae_setup,
    sample=_vae_sample,
    steps=2000,
)

# ---------------------------------------------------------------- DDPM

DDPM_T = 100
T_EMB = 16


def _t_embedding(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding ``(B, T_EMB)`` of integer timesteps (Ho et al. / the Transformer's)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(T_EMB // 2, device=t.device) / (T_EMB // 2))
    arg = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def _ddpm_setup(device: torch.device, gen: torch.Generator) -> Trainer:
    # Linear betas scaled by 1000 / T as in improved DDPM (Nichol & Dhariwal 2021),
    # so that T = 100 steps still end at alpha_bar_T ~ 5e-5 (pure noise).
    scale = 1000.0 / DDPM_T
    betas = gl.linear_betas(DDPM_T, beta_start=scale * 1e-4, beta_end=scale * 0.02)  # float64
    schedule = gl.DiffusionSchedule(betas).to(device)
    net = mlp(2 + T_EMB, 2, depth=3).to(device)  # one layer more than the GANs': it learns all T denoisers
    b = betas.to(device, torch.float64)  # the sampler's own float64 copy
    return Trainer(
        device, gen, {"eps": net}, {"eps": torch.optim.Adam(net.parameters(), lr=1e-3)},
        extra={"schedule": schedule, "betas": b},
    )  # fmt: skip


def _ddpm_eps(t: Trainer, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    return t.modules["eps"](torch.cat([x, _t_embedding(steps)], dim=1))


def _ddpm_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x0 = sample_real()
    steps = torch.randint(0, DDPM_T, (x0.shape[0],), device=t.device, generator=t.gen)
    noise = t.randn(*x0.shape)
    sched = t.extra["schedule"]
    x_t = gl.q_sample(x0, steps, noise, sched)
    loss = gl.diffusion_mse_loss(_ddpm_eps(t, x_t, steps), x0, noise, steps, sched, prediction="eps")
    t.update("eps", loss, list(t.modules["eps"].parameters()))
    return {"loss": loss.detach()}


def _ddpm_sample(t: Trainer, n: int) -> torch.Tensor:
    """Ancestral sampling with the posterior variance (Ho et al. 2020, Algorithm 2, sigma^2 = beta~)."""
    betas = t.extra["betas"]
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    x = t.randn(n, 2)
    with torch.no_grad():
        for s in reversed(range(DDPM_T)):
            steps = torch.full((n,), s, device=t.device, dtype=torch.long)
            eps = _ddpm_eps(t, x, steps).double()
            mean = (x.double() - betas[s] / torch.sqrt(1.0 - abar[s]) * eps) / torch.sqrt(alphas[s])
            x = mean if s == 0 else mean + torch.sqrt(post_var[s]) * t.randn(n, 2).double()
            x = x.float()
    return x


DDPM_METHOD = Method(
    name="ddpm",
    family="diffusion",
    ops=("linear_betas", "DiffusionSchedule", "q_sample", "diffusion_mse_loss"),
    about=f"DDPM, eps prediction, T = {DDPM_T}, linear betas, MLP with a sinusoidal time embedding",
    step=_ddpm_step,
    setup=_ddpm_setup,
    sample=_ddpm_sample,
    steps=2000,
)

# ---------------------------------------------------------------- flow matching and EDM

FLOW_STEPS = 50  # Euler steps of the samplers below


def _time_net(device: torch.device) -> nn.Module:
    return mlp(2 + T_EMB, 2, depth=3).to(device)  # as DDPM's: one network for every noise level


def _flow_setup(device: torch.device, gen: torch.Generator) -> Trainer:
    net = _time_net(device)
    return Trainer(device, gen, {"v": net}, {"v": torch.optim.Adam(net.parameters(), lr=1e-3)})


def _flow_velocity(t: Trainer, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    return t.modules["v"](torch.cat([x, _t_embedding(1000.0 * times)], dim=1))


def _flow_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x0 = sample_real()
    noise = t.randn(*x0.shape)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=t.gen))  # the run's RNG decides the draw
    times = gl.sample_timesteps(x0.shape[0], "logit_normal", seed, device=t.device)  # SD3's sampling
    x_t = gl.flow_interpolant(x0, noise, times)
    loss = gl.flow_matching_loss(_flow_velocity(t, x_t, times), x0, noise, times)
    t.update("v", loss, list(t.modules["v"].parameters()))
    return {"loss": loss.detach()}


def _flow_sample(t: Trainer, n: int) -> torch.Tensor:
    """Euler steps of dx/dt = v from t = 1 (noise) to t = 0 (data): the SD3 direction."""
    x = t.randn(n, 2)
    grid = torch.linspace(1.0, 0.0, FLOW_STEPS + 1, device=t.device)
    with torch.no_grad():
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            x = x + (b - a) * _flow_velocity(t, x, a.expand(n))
    return x


FLOW_METHOD = Method(
    name="flow",
    family="flow",
    ops=("sample_timesteps", "flow_interpolant", "flow_matching_loss"),
    about=f"rectified flow (SD3 direction), logit-normal t, velocity MLP, {FLOW_STEPS} Euler steps",
    step=_flow_step,
    setup=_flow_setup,
    sample=_flow_sample,
    steps=2000,
)

# The ring's per-coordinate spread: radius / sqrt(2) (its points sit at angles k pi / 4).
EDM_SIGMA_DATA = RING_RADIUS / math.sqrt(2.0)


def _edm_setup(device: torch.device, gen: torch.Generator) -> Trainer:
    net = _time_net(device)
    return Trainer(device, gen, {"F": net}, {"F": torch.optim.Adam(net.parameters(), lr=1e-3)})


def _edm_raw(t: Trainer, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(F, c_skip, c_out): the network on the preconditioned input (Karras et al. 2022, Table 1)."""
    c_skip, c_out, c_in, c_noise = gl.edm_preconditioning(sigma, EDM_SIGMA_DATA)
    f = t.modules["F"](torch.cat([c_in[:, None] * x, _t_embedding(250.0 * c_noise)], dim=1))
    return f, c_skip, c_out


def _edm_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x0 = sample_real()
    noise = t.randn(*x0.shape)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=t.gen))
    sigma = gl.sample_timesteps(x0.shape[0], "lognormal_sigma", seed, device=t.device)  # EDM's p(sigma)
    f, _, _ = _edm_raw(t, x0 + sigma[:, None] * noise, sigma)
    loss = gl.denoiser_loss(f, x0, noise, sigma, sigma_data=EDM_SIGMA_DATA)  # weighting 'edm'
    t.update("F", loss, list(t.modules["F"].parameters()))
    return {"loss": loss.detach()}


def _edm_sample(t: Trainer, n: int) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma on Karras's
    sigmas (rho = 7) from 80 down to 0.002, then the denoiser's last estimate."""
    sigmas = gl.karras_sigmas(FLOW_STEPS, device=t.device).flip(0)  # descending
    x = sigmas[0] * t.randn(n, 2)
    with torch.no_grad():
        for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
            s = a.expand(n)
            f, c_skip, c_out = _edm_raw(t, x, s)
            d = c_skip[:, None] * x + c_out[:, None] * f
            x = x + (b - a) * (x - d) / a
        f, c_skip, c_out = _edm_raw(t, x, sigmas[-1].expand(n))
        return c_skip[:, None] * x + c_out[:, None] * f


EDM_METHOD = Method(
    name="edm",
    family="flow",
    ops=("sample_timesteps", "edm_preconditioning", "denoiser_loss", "karras_sigmas"),
    about=f"EDM denoiser (Karras et al. 2022): lognormal sigma, 'edm' weighting, {FLOW_STEPS} Euler steps",
    step=_edm_step,
    setup=_edm_setup,
    sample=_edm_sample,
    steps=2000,
)

METHODS: list[Method] = [*GAN_METHODS, VAE_METHOD, DDPM_METHOD, FLOW_METHOD, EDM_METHOD]

# ============================================================================ progress


class _Progress:
    """A dependency-free text progress bar on a TTY; one summary line per method otherwise."""

    WIDTH = 24

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO) -> None:
        self.label, self.total, self.enabled, self.stream = label, total, enabled, stream
        isatty = getattr(stream, "isatty", None)
        self.live = enabled and callable(isatty) and bool(isatty())
        self.t0 = self.last = time.perf_counter()
        self.shown = 0

    def _write(self, text: str) -> None:
        pad = max(0, self.shown - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self.shown = len(text)

    def due(self) -> bool:
        """Whether an update would be drawn now (at most 10 per second)."""
        return self.live and time.perf_counter() - self.last >= 0.1

    def update(self, done: int, info: str = "") -> None:
        if not self.live:
            return
        self.last = now = time.perf_counter()
        fill = int(self.WIDTH * done / max(self.total, 1))
        bar = "#" * fill + "." * (self.WIDTH - fill)
        self._write(f"{self.label:<12} [{bar}] {done}/{self.total} {now - self.t0:5.1f}s {info}")

    def close(self, line: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self._write(line)
            self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ============================================================================ running


def _seeds(seed: int, name: str) -> tuple[int, np.random.Generator]:
    """A torch seed and a NumPy generator of one method, from the run seed and the method's name."""
    ss = np.random.SeedSequence([seed, zlib.crc32(name.encode())])
    torch_seed = int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return torch_seed, np.random.default_rng(ss.spawn(1)[0])


def _fmt_losses(losses: dict[str, float]) -> str:
    names = {"d": "D", "g": "G", "loss": "loss"}
    return "  ".join(f"{names.get(k, k)} {v:.4g}" for k, v in losses.items())


def _run_method(
    m: Method,
    data: Callable[[int, np.random.Generator], np.ndarray],
    steps: int,
    batch: int,
    seed: int,
    device: torch.device,
    eval_real: torch.Tensor,
    ring: bool,
    progress: bool,
    stream: TextIO,
    n_eval: int,
) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    torch_seed, rng = _seeds(seed, m.name)
    bar = _Progress(m.name, steps, progress, stream)
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(torch_seed)  # module initialisation (on the CPU, then moved)
        gen = torch.Generator(device=device)
        gen.manual_seed(torch_seed)
        trainer = m.setup(device, gen)

        def sample_real() -> torch.Tensor:
            return torch.from_numpy(data(batch, rng)).to(device)

        history: dict[str, list[torch.Tensor]] = {}
        for i in range(steps):
            losses = m.step(trainer, sample_real)
            for k, v in losses.items():
                history.setdefault(k, []).append(v)
            if bar.due():
                bar.update(i + 1, _fmt_losses({k: float(v) for k, v in losses.items()}))
        samples = m.sample(trainer, n_eval)
    hist = {k: torch.stack(v).float().cpu().numpy() for k, v in history.items()}
    final = {k: float(np.mean(v[-LOSS_WINDOW:])) for k, v in hist.items()}
    res = _score(samples, eval_real, ring)
    finite = bool(torch.isfinite(samples).all())
    res.update(
        method=m.name,
        family=m.family,
        status="ok",
        note="" if finite else "non-finite samples (diverged)",
        about=m.about,
        ops=list(m.ops),
        steps=steps,
        batch=batch,
        seed=seed,
        losses=final,
        d_loss=final.get("d"),
        g_loss=final.get("g"),
        loss=final.get("loss"),
        history=hist,
        samples=samples.detach().float().cpu().numpy(),
        wall_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
    )
    bar.close(_summary(res))
    return res


def _score(samples: torch.Tensor, eval_real: torch.Tensor, ring: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"modes_covered": None, "mode_counts": None, "high_quality": None}
    if ring:
        out.update(mode_coverage(samples))
    x = samples.detach()
    out["mmd2"] = float(mmd2_rbf(x, eval_real)) if bool(torch.isfinite(x).all()) else math.nan
    return out


def _summary(r: dict[str, Any]) -> str:
    if r["status"] == "skipped":
        return f"{r['method']:<12} skipped: {r['note']}"
    modes = "" if r["modes_covered"] is None else f"{r['modes_covered']}/{N_MODES} modes  "
    losses = _fmt_losses(r["losses"])
    wall = "" if r.get("wall_s") is None else f"  {r['wall_s']:.1f}s"
    return f"{r['method']:<12} {modes}MMD² {r['mmd2']:.2e}  {losses}{wall}".rstrip()


def _resolve(methods: Sequence[str] | None) -> list[Method]:
    if methods is None:
        return list(METHODS)
    if isinstance(methods, str):
        methods = [methods]
    by_name = {m.name: m for m in METHODS}
    unknown = [n for n in methods if n not in by_name]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in methods]


def run_demo(
    out_dir: str | Path,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    methods: Sequence[str] | None = None,
    progress: bool = True,
    batch: int = 256,
    dataset: str = "eight_gaussians",
    threads: int | None = 1,
    n_eval: int = N_EVAL,
) -> list[dict[str, Any]]:
    """Train every method of ``methods`` (default: all of ``METHODS``) and compare them.

    Writes ``out_dir/genloss-demo.png`` (the data and each method's samples) and
    returns one dict per row of the table: first a ``'data'`` reference row (a second
    draw of the data scored like a method: the noise floor of the metrics), then one
    per method, ``status`` ``'ok'`` or ``'skipped'`` (some of its ops are not in this
    build's ``genloss.torch``; ``note`` says which). Keys: ``method, family, status, note,
    about, ops, steps, batch, seed, modes_covered, mode_counts, high_quality, mmd2,
    losses, d_loss, g_loss, loss, history, samples, wall_s, cpu_s`` (``cpu_s``: the
    process's CPU time, all threads; on a machine shared with other jobs, the measure of
    the work done where ``wall_s`` also counts the waiting).

    ``steps`` overrides every method's default number of (generator) steps;
    ``n_eval`` is the number of samples scored (and of held-out data points).
    ``progress``: a live bar per method on a TTY (stderr), one line per method when
    stderr is not a TTY, nothing when False. Same ``seed`` on CPU -> same numbers.

    ``threads``: torch's intra-op CPU threads during the run (restored after); None
    leaves torch's setting. The default, 1, is the fast and the reproducible choice
    for these tiny MLPs: a second thread gains ~25% on an idle 2-core machine but
    costs up to 7x when another process holds a core (OpenMP threads wait on each
    other), and the last bits of a result depend on the thread count.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, steps, seed, device, methods, progress, batch, dataset, n_eval)
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def _run_demo(
    out_dir: str | Path,
    steps: int | None,
    seed: int,
    device: str | torch.device,
    methods: Sequence[str] | None,
    progress: bool,
    batch: int,
    dataset: str,
    n_eval: int,
) -> list[dict[str, Any]]:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 2:
        raise ValueError(f"batch must be an int >= 2, got {batch!r}")
    if not isinstance(n_eval, int) or isinstance(n_eval, bool) or n_eval < 2:
        raise ValueError(f"n_eval must be an int >= 2, got {n_eval!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} asked for, but torch sees no CUDA device")
    chosen = _resolve(methods)
    data = DATASETS[dataset]
    ring = dataset == "eight_gaussians"
    stream = sys.stderr

    ss = np.random.SeedSequence([seed, 0])
    eval_rng, ref_rng = (np.random.default_rng(s) for s in ss.spawn(2))
    eval_real = torch.from_numpy(data(n_eval, eval_rng)).to(dev)
    ref = torch.from_numpy(data(n_eval, ref_rng))
    t0 = time.perf_counter()
    results = [
        {
            **_score(ref.to(dev), eval_real, ring),
            "method": "data",
            "family": "reference",
            "status": "reference",
            "note": "a second draw of the data: the noise floor of the metrics",
            "about": dataset,
            "ops": [],
            "steps": 0,
            "batch": batch,
            "seed": seed,
            "losses": {},
            "d_loss": None,
            "g_loss": None,
            "loss": None,
            "history": {},
            "samples": ref.numpy(),
            "wall_s": time.perf_counter() - t0,
            "cpu_s": None,
        }
    ]
    for m in chosen:
        missing = m.missing()
        if missing:
            res = {
                "method": m.name,
                "family": m.family,
                "status": "skipped",
                "note": f"{m.family} ops not available (genloss.torch has no {', '.join(missing)})",
                "about": m.about,
                "ops": list(m.ops),
            }
            if progress:
                stream.write(_summary(res) + "\n")
            results.append(res)
            continue
        n = m.steps if steps is None else steps
        results.append(_run_method(m, data, n, batch, seed, dev, eval_real, ring, progress, stream, n_eval))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_results(results, out / "genloss-demo.png")
    return results


# ============================================================================ output


def plot_results(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One PNG: the data, then each trained method's samples over the data (grey)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "the genloss demo draws its figure with matplotlib: pip install 'genloss[demo]'"
        ) from e

    rows = [r for r in results if r.get("status") in ("ok", "reference")]
    data = next((r["samples"] for r in rows if r["status"] == "reference"), None)
    ncols = min(5, max(1, len(rows)))
    nrows = math.ceil(len(rows) / ncols)
    fig = Figure(figsize=(2.9 * ncols, 3.05 * nrows), dpi=100, layout="constrained")
    lim = 2.9
    for i, r in enumerate(rows):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        s = r["samples"]
        if r["status"] == "reference":
            ax.scatter(s[:, 0], s[:, 1], s=2, c="0.25", linewidths=0)
            title = f"data ({r['about']})"
        else:
            if data is not None:
                ax.scatter(data[:, 0], data[:, 1], s=2, c="0.8", linewidths=0)
            ax.scatter(
                s[:, 0], s[:, 1], s=2, c="C0" if r["family"] == "gan" else "C2", linewidths=0, alpha=0.6
            )
            title = r["method"]
        sub = [] if r["modes_covered"] is None else [f"{r['modes_covered']}/{N_MODES} modes"]
        sub.append(f"MMD² {r['mmd2']:.1e}")
        ax.set_title(f"{title}\n{', '.join(sub)}", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    path = Path(path)
    fig.savefig(path)
    return path


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a plain-text table: method, modes covered, high-quality fraction,
    MMD², final losses (mean of the last ``LOSS_WINDOW`` steps), steps, wall and CPU time.
    A skipped method gets one line saying why."""
    head = ("method", "modes", "hq", "MMD²", "final losses", "steps", "wall", "cpu")
    rows: list[tuple[str, ...]] = []
    notes: dict[int, str] = {}
    for r in results:
        if r.get("status") == "skipped":
            notes[len(rows)] = r["note"]
            rows.append((r["method"],))
            continue
        ok = r.get("status") == "ok"
        modes = "-" if r.get("modes_covered") is None else f"{r['modes_covered']}/{N_MODES}"
        hq = "-" if r.get("high_quality") is None else f"{100 * r['high_quality']:.1f}%"
        losses = _fmt_losses(r.get("losses") or {}) or "-"
        rows.append(
            (
                r["method"],
                modes,
                hq,
                f"{r['mmd2']:.2e}",
                losses,
                str(r["steps"]) if ok else "-",
                f"{r['wall_s']:.1f}s" if ok else "-",
                f"{r['cpu_s']:.1f}s" if ok and r.get("cpu_s") is not None else "-",
            )
        )
    widths = [max([len(head[j])] + [len(row[j]) for row in rows if len(row) > j]) for j in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    lines = [line(head), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(rows):
        lines.append(line(row) if i not in notes else f"{row[0].ljust(widths[0])}  skipped: {notes[i]}")
    ok = [r for r in results if r.get("status") == "ok"]
    if ok:
        cpu = sum(r.get("cpu_s") or 0.0 for r in ok)
        lines.append(
            f"total: {sum(r['wall_s'] for r in ok):.1f}s wall, {cpu:.1f}s cpu over {len(ok)} method{'s' * (len(ok) != 1)}"
        )
    return "\n".join(lines)
