r"""The demo's methods: a GAN's generator and discriminator under several objectives, a VAE, a
DDPM, rectified flow, EDM, a consistency model (one-step sampling, distilled from an EDM
teacher) and a VQ-VAE; each a few small MLPs trained with ``genloss.torch`` losses.

Hyperparameters are the papers' where a paper gives them (each method's ``hparams`` says
which, and what the demo changed and why). The papers train for 10^5 steps or more; the
demo's whole run fits in about 3 minutes on 2 CPU cores, so the networks are small (2
hidden layers of 64 units for the GANs, 3 of 64 for the denoisers: on CPU a step's cost
grows with width², and at these batch sizes the small nets train further in the budget)
and the GANs take Adam at 1e-3 (the papers' 1e-4 to 2e-4 do not move the generator far
enough in a few thousand steps), decayed linearly to 0 so that the last steps settle. Adam runs fused (one kernel per step for all
parameters): at these sizes the optimizer's per-tensor overhead is a large share of a step.
A GAN's seeds train together as one batched model (``BatchedMLP``: every seed its own
weights, initialisation, data, draws and loss), which pays the per-step overhead (the
optimizer, the loss ops, autograd) once for all seeds; measured on the demo's 2-core VM,
3 seeds cost about 0.8x of 3 lone runs at batch 256 (the 64-wide layers are already
mostly arithmetic there), about 0.7x at batch 64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import genloss.torch as gl

from .data import Dataset

__all__ = ["Method", "Trainer", "METHODS", "GAN_METHODS", "mlp", "BatchedMLP", "Z_DIM"]

WIDTH, DEPTH = 64, 2  # a GAN's generator and discriminator (Metz et al. 2017 use 2 x 128; see above)


def mlp(d_in: int, d_out: int, width: int = WIDTH, depth: int = DEPTH) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units with LeakyReLU(0.2), then a linear output."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def adam(params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam, fused: one kernel updates every parameter (the per-tensor loop is a large share of a small step)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


@dataclass
class Trainer:
    """What a method's ``setup`` builds: the modules, optimizers and the RNG of one run.

    ``k`` and ``K`` are the current and total training steps (set by the runner)."""

    device: torch.device
    gen: torch.Generator  # every random draw of the run (latents, timesteps, GP mixing)
    modules: dict[str, nn.Module]
    opts: dict[str, torch.optim.Optimizer]
    extra: dict[str, Any] = field(default_factory=dict)
    k: int = 0
    K: int = 1
    # A batched method's trainer holds S runs (one per seed) as one model: ``gens`` the
    # seeds' generators (``gen`` is the first), every draw stacked as (S, *shape).
    gens: list[torch.Generator] | None = None

    def randn(self, *shape: int) -> torch.Tensor:
        if self.gens is not None:
            return torch.stack([torch.randn(shape, device=self.device, generator=g) for g in self.gens])
        return torch.randn(shape, device=self.device, generator=self.gen)

    def rand(self, *shape: int) -> torch.Tensor:
        if self.gens is not None:
            return torch.stack([torch.rand(shape, device=self.device, generator=g) for g in self.gens])
        return torch.rand(shape, device=self.device, generator=self.gen)

    @property
    def logging(self) -> bool:
        """Whether this step's losses are kept: the runner reports the mean of the last ``LOSS_WINDOW``."""
        return self.k >= self.K - LOSS_WINDOW

    def decay_lr(self, *opts: str, progress: float | None = None) -> None:
        """Set the rate of ``opts`` (default: every optimizer) to its initial rate x (1 - progress),
        ``progress`` by default k / K: a linear decay to 0 over the run."""
        frac = 1.0 - (self.k / self.K if progress is None else progress)
        for name in opts or tuple(self.opts):
            for group in self.opts[name].param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * frac

    def update(self, opt: str, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """One optimizer step on ``loss``, gradients accumulated only into ``params``."""
        o = self.opts[opt]
        o.zero_grad(set_to_none=True)
        loss.backward(inputs=list(params))
        o.step()


LOSS_WINDOW = 100  # the reported losses: the mean of the last 100 steps

Setup = Callable[[torch.device, torch.Generator, Dataset], Trainer]
# a batched method's setup: one generator per seed, each seeded with its run's seed
BatchedSetup = Callable[[torch.device, list[torch.Generator], Dataset], Trainer]
Step = Callable[[Trainer, Callable[[], torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """One demo method: the genloss torch ops it needs, and how it trains and samples.

    ``step(trainer, sample_real)`` does one training step (for a GAN: ``n_critic``
    discriminator steps and one generator step) on batches from ``sample_real()`` and
    returns its losses, detached. ``pretrain(trainer, sample_real, n)``, when given, runs
    first for ``n`` steps (``pretrain_steps``, scaled like ``steps``): the consistency
    model's EDM teacher. ``evaluate(trainer, held_out)``, when given, adds method-specific
    metrics (the VQ-VAE's codebook usage). The method runs only when every name in ``ops``
    exists in ``genloss.torch``; otherwise its rows say which are missing. ``datasets``:
    where it trains; ``default``: in the default run (else only when named).
    """

    name: str
    family: str  # 'gan' | 'vae' | 'diffusion' | 'flow' | 'consistency' | 'vq'
    ops: tuple[str, ...]
    about: str
    hparams: str  # the stated hyperparameters: the paper's, and the demo's changes
    step: Step
    setup: Setup | BatchedSetup  # BatchedSetup when ``batched``
    sample: Callable[[Trainer, int], torch.Tensor]
    steps: int = 1200  # default number of (generator) steps
    datasets: tuple[str, ...] = ("swiss_roll",)
    evaluate: Callable[[Trainer, torch.Tensor], dict[str, float]] | None = None
    work_per_step: float = 1.0  # relative cost of a step, to schedule the longest runs first
    default: bool = True
    pretrain: Callable[[Trainer, Callable[[], torch.Tensor], int], None] | None = None
    pretrain_steps: int = 0
    # True: the runner trains all seeds of a (dataset, method) as one batched model (see
    # BatchedMLP): ``setup`` is a BatchedSetup, ``sample_real()`` and ``sample`` give
    # (S, n, 2), ``step`` returns each seed's losses as (S,) tensors.
    batched: bool = False

    def missing(self) -> list[str]:
        """The ops of ``ops`` that ``genloss.torch`` does not have."""
        return [op for op in self.ops if not hasattr(gl, op)]

    def available(self) -> bool:
        return not self.missing()


# ============================================================================ GANs

Z_DIM = 2  # a 2-D latent, as in the ring experiments of Metz et al. and VEEGAN's toy code
GAN_WIDTH, GAN_DEPTH = 64, 2
GAN_BATCH = 256
GAN_LR = 1e-3  # every GAN's initial Adam rate here (the papers': 1e-4 to 4e-4, for 10^5 steps)
# Both rates decay linearly to 0 over the run, as in the WGAN-GP authors' CIFAR-10 code
# (gan_cifar_resnet.py, DECAY). Why: at a constant 1e-3 the runs still hop between partial
# collapses at the last step (Metz et al.'s mode hopping) and their modes stay blurred;
# with the decay the last steps settle. Measured on the ring (3 seeds, 2500 steps): gan-ns
# covered 3.7 ± 0.6 of 8 modes at 31 ± 7% high quality at a constant rate, 5.7 ± 0.6 at
# 52 ± 2% with the decay, at the same cost (hinge and LSGAN alike).


class BatchedMLP(nn.Module):
    """S independent MLPs of one shape, evaluated as one: layer ``l`` of model ``s`` is
    ``x @ weights[l][s] + biases[l][s]`` (``torch.baddbmm``), on inputs ``(S, n, d_in)``.

    Built from S ``mlp``s (each initialised from its own seed), whose weights it copies. No
    operation mixes the models: model ``s``'s outputs depend only on its own slice of
    inputs and weights, so a loss that is a sum of per-model losses gives each model the
    gradient it would get alone, and an elementwise optimizer (Adam) steps each as alone.
    Why: at these sizes a step's cost is mostly per-operation overhead (the optimizer, the
    loss ops, autograd), paid once for S models instead of S times."""

    def __init__(self, nets: Sequence[nn.Sequential], slope: float = 0.2) -> None:
        super().__init__()
        layers = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].weight.detach().T for ls in layers]).contiguous())
            for i in range(len(layers[0]))
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].bias.detach()[None] for ls in layers]).contiguous())
            for i in range(len(layers[0]))
        )
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = nn.functional.leaky_relu(x, self.slope)
        return x


def batched_mlps(
    gens: Sequence[torch.Generator], d_in: int, d_out: int, width: int, depth: int
) -> BatchedMLP:
    """One ``mlp`` per seed, each initialised under torch's global RNG seeded with its
    generator's seed (as a lone run is), stacked into a BatchedMLP."""
    nets = []
    for g in gens:
        torch.manual_seed(g.initial_seed())
        nets.append(mlp(d_in, d_out, width, depth))
    return BatchedMLP(nets)


def _gan_setup(lr_g: float, lr_d: float, betas: tuple[float, float]) -> BatchedSetup:
    def setup(device: torch.device, gens: list[torch.Generator], ds: Dataset) -> Trainer:
        G = batched_mlps(gens, Z_DIM, 2, GAN_WIDTH, GAN_DEPTH).to(device)
        D = batched_mlps([_offset(g) for g in gens], 2, 1, GAN_WIDTH, GAN_DEPTH).to(device)
        opts: dict[str, torch.optim.Optimizer] = {
            "g": adam(G.parameters(), lr_g, betas),
            "d": adam(D.parameters(), lr_d, betas),
        }
        return Trainer(device, gens[0], {"G": G, "D": D}, opts, gens=list(gens))

    return setup


def _offset(g: torch.Generator) -> torch.Generator:
    """A generator seeded one past ``g``'s seed: D's initialisation, distinct from G's."""
    out = torch.Generator(device=g.device)
    out.manual_seed((g.initial_seed() + 1) % 2**63)
    return out


def _gan_sample(t: Trainer, n: int) -> torch.Tensor:
    with torch.no_grad():
        return t.modules["G"](t.randn(n, Z_DIM))


def _per_seed(fn: Callable[..., torch.Tensor], real: torch.Tensor | None, fake: torch.Tensor) -> torch.Tensor:
    """``fn`` on each seed's slice of the logits ``(S, B)``: the seeds' losses, ``(S,)``, detached."""
    with torch.no_grad():
        return torch.stack([fn(None if real is None else real[s], fake[s]) for s in range(fake.shape[0])])


def _gan_step(
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    g_loss: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
    penalty: Callable[[Trainer, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    n_critic: int,
    g_needs_real: bool,
) -> Step:
    """A GAN step of S seeds' models at once, from the two losses ``d_loss(D(real), D(fake))``
    and ``g_loss(D(real), D(fake))`` (``D(real)`` is ``None`` for the generator unless
    ``g_needs_real``: only the relativistic losses look at it).

    The losses see the logits as ``(B, S)``: the batch first, one column per seed. genloss's
    losses sum a sample's loss over the non-batch dims and average over the batch, so
    that one call is the sum over seeds of each seed's own loss (the mean over its B
    samples), and its gradient with respect to seed s's logits is seed s's alone. The
    relativistic losses (``g_needs_real``) are the exception: they subtract the mean logit
    of the other batch over all its elements, which would mix the seeds, so they run once
    per seed and add up."""

    def loss(fn: Callable[..., torch.Tensor], r: torch.Tensor | None, f: torch.Tensor) -> torch.Tensor:
        if not g_needs_real:
            return fn(None if r is None else r.T, f.T)
        return torch.stack([fn(None if r is None else r[s], f[s]) for s in range(f.shape[0])]).sum()

    def step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
        G, D = t.modules["G"], t.modules["D"]
        t.decay_lr()  # both rates decay linearly to 0 over the run (see GAN_LR)
        for _ in range(n_critic):
            real = sample_real()  # (S, B, 2)
            b = real.shape[1]
            with torch.no_grad():
                fake = G(t.randn(b, Z_DIM))
            out_r_d, out_f_d = D(torch.cat([real, fake], dim=1))[..., 0].split([b, b], dim=1)  # one pass of D
            ld = loss(d_loss, out_r_d, out_f_d)
            total = ld if penalty is None else ld + penalty(t, real, fake)
            t.update("d", total, list(D.parameters()))
        out_f = D(G(t.randn(b, Z_DIM)))[..., 0]
        out_r = None
        if g_needs_real:  # a constant to G: D is not updated by the generator step
            with torch.no_grad():
                out_r = D(real)[..., 0]
        lg = loss(g_loss, out_r, out_f)
        t.update("g", lg, list(G.parameters()))
        if not t.logging:
            return {}
        # each seed's own losses, for the report (the discriminator's on its last batch)
        return {
            "d": _per_seed(d_loss, out_r_d.detach(), out_f_d.detach()),
            "g": _per_seed(g_loss, out_r, out_f),
        }

    return step


# The WGAN-GP authors' toy script's (gan_toy.py, on data of this scale). The paper's 10
# failed here on the ring (3 seeds): with the recipe below, 0 of 8 modes and MMD² 0.31 ±
# 0.10 (0.022 ± 0.002 at 0.1); with 5 critic steps at 1e-3 and 600 G steps (the earlier
# recipe), 0 of 8 modes and MMD² 0.12 ± 0.06.
GP_LAMBDA = 0.1


def _gp(t: Trainer, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's penalty for S seeds' critics: x_hat mixes each seed's real and fake batch with
    that seed's own uniform draws, and ``genloss.torch.gradient_penalty_from_grads`` scores
    the critic's input gradients flattened to (S * B, 2): a per-sample penalty averaged
    over S * B samples, times S, is the sum over seeds of each seed's penalty."""
    s, b = real.shape[0], real.shape[1]
    eps = t.rand(b, 1)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grads,) = torch.autograd.grad(t.modules["D"](x_hat).sum(), x_hat, create_graph=True)
    return s * gl.gradient_penalty_from_grads(grads.reshape(s * b, 2), GP_LAMBDA)


def _gan(
    name: str,
    ops: tuple[str, ...],
    about: str,
    paper: str,
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    g_loss: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
    lr_g: float = GAN_LR,
    lr_d: float = GAN_LR,
    betas: tuple[float, float] = (0.5, 0.999),
    n_critic: int = 1,
    penalty: Callable[[Trainer, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    g_needs_real: bool = False,
    steps: int = 2500,
    default: bool = True,
    datasets: tuple[str, ...] = ("ring", "grid"),
) -> Method:
    demo = (
        f"demo: Adam lr G {lr_g:g}, D {lr_d:g}, betas {betas}, {n_critic} D step{'s' * (n_critic > 1)} "
        f"per G step, both rates decayed linearly to 0, batch {GAN_BATCH}, {steps} G steps, "
        f"G and D {GAN_DEPTH} x {GAN_WIDTH} LeakyReLU(0.2), z 2-D"
    )
    return Method(
        name=name,
        family="gan",
        ops=ops,
        about=about,
        hparams=f"{paper}; {demo}",
        step=_gan_step(d_loss, g_loss, penalty, n_critic, g_needs_real),
        setup=_gan_setup(lr_g, lr_d, betas),
        sample=_gan_sample,
        steps=steps,
        datasets=datasets,
        work_per_step=n_critic * (1.5 if penalty is not None else 1.0),  # the penalty: a double backward
        default=default,
        batched=True,
    )


_DCGAN = "paper (DCGAN's Adam, Radford et al. 2016): lr 2e-4, betas (0.5, 0.999)"
GAN_METHODS = [
    _gan(
        "gan-ns",
        ("gan_d_loss", "gan_g_loss"),
        "GAN (Goodfellow et al. 2014), non-saturating generator: min E softplus(-D(G(z)))",
        _DCGAN,
        lambda r, f: gl.gan_d_loss(r, f),
        lambda r, f: gl.gan_g_loss(f, mode="nonsaturating"),
    ),
    _gan(
        "hinge",
        ("hinge_d_loss", "hinge_g_loss"),
        "hinge loss (Lim & Ye 2017; SAGAN, BigGAN)",
        "paper (SAGAN's TTUR, Zhang et al. 2019): lr G 1e-4, D 4e-4, betas (0, 0.9)",
        lambda r, f: gl.hinge_d_loss(r, f),
        lambda r, f: gl.hinge_g_loss(f),
        datasets=("ring",),
    ),
    _gan(
        "lsgan",
        ("lsgan_d_loss", "lsgan_g_loss"),
        "least squares GAN (Mao et al. 2017), a=0, b=1, c=1",
        "paper: Adam lr 2e-4, beta1 0.5",
        lambda r, f: gl.lsgan_d_loss(r, f),
        lambda r, f: gl.lsgan_g_loss(f),
        datasets=("ring",),
    ),
    _gan(
        "wgan-gp",
        ("wgan_critic_loss", "wgan_g_loss", "gradient_penalty_from_grads"),
        f"Wasserstein critic + gradient penalty (Gulrajani et al. 2017), lambda {GP_LAMBDA:g}",
        "paper (Algorithm 1): lr 1e-4, betas (0, 0.9), 5 critic steps, lambda 10 (its toy script gan_toy.py: 0.1)",
        lambda r, f: gl.wgan_critic_loss(r, f),
        lambda r, f: gl.wgan_g_loss(f),
        betas=(0.0, 0.9),
        # One critic step at twice G's rate (a two time-scale update, Heusel et al. 2017)
        # instead of 5 at G's: 5 critic steps leave 600 G steps in the budget, not enough
        # (0 of 8 ring modes); on the ring, 3 seeds: D at 1e-3 covered 3.0 ± 2.6 of 8 modes
        # (MMD² 0.065 ± 0.062), at 2e-3 6.3 ± 0.6 (0.022 ± 0.002), at 4e-3 6.0 ± 1.0.
        lr_d=2 * GAN_LR,
        n_critic=1,
        penalty=_gp,
    ),
    _gan(
        "gan-minimax",
        ("gan_d_loss", "gan_g_loss"),
        "the original minimax generator: min E log(1 - D(G(z))), saturates when D wins",
        _DCGAN,
        lambda r, f: gl.gan_d_loss(r, f),
        lambda r, f: gl.gan_g_loss(f, mode="minimax"),
        default=False,
    ),
    _gan(
        "fgan-js",
        ("fgan_d_loss", "fgan_g_loss"),
        "f-GAN (Nowozin et al. 2016), Jensen-Shannon divergence, non-saturating generator",
        "paper: Adam lr 2e-4, beta1 0.5",
        lambda r, f: gl.fgan_d_loss(r, f, "jensen_shannon"),
        lambda r, f: gl.fgan_g_loss(f, "jensen_shannon"),
        default=False,
    ),
    _gan(
        "ragan",
        ("relativistic_d_loss", "relativistic_g_loss"),
        "relativistic average GAN (Jolicoeur-Martineau 2019)",
        "paper: Adam lr 2e-4, betas (0.5, 0.999)",
        lambda r, f: gl.relativistic_d_loss(r, f, average=True),
        lambda r, f: gl.relativistic_g_loss(r, f, average=True),
        g_needs_real=True,
        default=False,
    ),
]

# ============================================================================ VAE

VAE_LATENT = 2
_MLP2 = f"MLPs {DEPTH} x {WIDTH}"
_MLP3 = f"MLP 3 x {WIDTH} + a 16-d sinusoidal time embedding"
LR = 1e-3  # the VAE and the VQ-VAE: Adam 1e-3, the common choice for 2-D toy data (the papers: 1e-4 to 3e-4)
# The denoisers (DDPM, flow, EDM, the consistency model's EDM teacher): Adam from 5e-3 decayed
# linearly to 0 over 4800 steps. Measured on the swiss roll (3 seeds, MMD² x 10^3 to held-out
# data, whose own floor is ~0.1): at the earlier constant 1e-3 for 1200 steps flow reached 6.8,
# EDM 6.1, DDPM 10.7 (diffuse clouds around the roll); at 1e-3 for 4800 steps flow 3.7; at
# 5e-3 decayed over 4800 steps flow 0.43 ± 0.09, EDM 0.33 ± 0.35, DDPM 1.4 ± 0.5 (3.6x the
# training CPU of the old recipe). An EMA of the weights for sampling did not help here.
DENOISER_LR, DENOISER_STEPS = 5e-3, 4800
_DENOISER = f"Adam lr {DENOISER_LR:g} decayed linearly to 0, batch 256, "


def _vae_setup(device: torch.device, gen: torch.Generator, ds: Dataset) -> Trainer:
    enc, dec = mlp(2, 2 * VAE_LATENT).to(device), mlp(VAE_LATENT, 2).to(device)
    # A learned scalar decoder log-variance: with a fixed unit variance the
    # reconstruction of a 0.05-wide roll is worth too little against the KL.
    recon_logvar = nn.Parameter(torch.zeros((), device=device))
    params = [*enc.parameters(), *dec.parameters(), recon_logvar]
    return Trainer(
        device, gen, {"enc": enc, "dec": dec}, {"vae": adam(params, LR)},
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
    about="VAE (Kingma & Welling 2014), 2-D latent, Gaussian decoder with a learned scalar variance",
    hparams=f"paper: beta 1, Adam; demo: Adam lr {LR:g}, batch 256, encoder and decoder " + _MLP2,
    step=_vae_step,
    setup=_vae_setup,
    sample=_vae_sample,
    steps=800,
)

# ============================================================================ DDPM

DDPM_T = 100
T_EMB = 16


def _t_embedding(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding ``(B, T_EMB)`` of (scaled) times (Ho et al. / the Transformer's)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(T_EMB // 2, device=t.device) / (T_EMB // 2))
    arg = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def _time_net(device: torch.device) -> nn.Module:
    # one layer more than the GANs': one network learns every noise level
    return mlp(2 + T_EMB, 2, depth=3).to(device)


def _ddpm_setup(device: torch.device, gen: torch.Generator, ds: Dataset) -> Trainer:
    # Linear betas scaled by 1000 / T as in improved DDPM (Nichol & Dhariwal 2021),
    # so that T = 100 steps still end at alpha_bar_T ~ 5e-5 (pure noise).
    scale = 1000.0 / DDPM_T
    betas = gl.linear_betas(DDPM_T, beta_start=scale * 1e-4, beta_end=scale * 0.02)  # float64
    schedule = gl.DiffusionSchedule(betas).to(device)
    net = _time_net(device)
    return Trainer(
        device, gen, {"eps": net}, {"eps": adam(net.parameters(), DENOISER_LR)},
        extra={"schedule": schedule, "betas": betas.to(device, torch.float64)},
    )  # fmt: skip


def _ddpm_eps(t: Trainer, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    return t.modules["eps"](torch.cat([x, _t_embedding(steps)], dim=1))


def _ddpm_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x0 = sample_real()
    steps = torch.randint(0, DDPM_T, (x0.shape[0],), device=t.device, generator=t.gen)
    noise = t.randn(*x0.shape)
    sched = t.extra["schedule"]
    x_t = gl.q_sample(x0, steps, noise, sched)
    t.decay_lr()
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
    about=f"DDPM (Ho et al. 2020), eps prediction, T = {DDPM_T}, ancestral sampler",
    hparams=f"paper: T 1000, linear betas 1e-4..0.02, Adam 2e-4; demo: T {DDPM_T} with the betas x{1000 // DDPM_T} "
    "(improved DDPM's rescaling), " + _DENOISER + _MLP3,
    step=_ddpm_step,
    setup=_ddpm_setup,
    sample=_ddpm_sample,
    steps=DENOISER_STEPS,
)

# ============================================================================ flow matching, EDM

FLOW_STEPS = 50  # Euler steps of the flow / EDM samplers


def _flow_setup(device: torch.device, gen: torch.Generator, ds: Dataset) -> Trainer:
    net = _time_net(device)
    return Trainer(device, gen, {"v": net}, {"v": adam(net.parameters(), DENOISER_LR)})


def _flow_velocity(t: Trainer, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    return t.modules["v"](torch.cat([x, _t_embedding(1000.0 * times)], dim=1))


def _draw_seed(t: Trainer) -> int:
    """An int seed for genloss's samplers, drawn from the run's RNG (so the run's seed decides it)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=t.gen))


def _flow_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x0 = sample_real()
    noise = t.randn(*x0.shape)
    times = gl.sample_timesteps(x0.shape[0], "logit_normal", _draw_seed(t), device=t.device)  # SD3's
    x_t = gl.flow_interpolant(x0, noise, times)
    loss = gl.flow_matching_loss(_flow_velocity(t, x_t, times), x0, noise, times)
    t.decay_lr()
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
    about=f"rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023), {FLOW_STEPS} Euler steps",
    hparams="paper (SD3, Esser et al. 2024): logit-normal t (m 0, s 1); demo: " + _DENOISER + _MLP3,
    step=_flow_step,
    setup=_flow_setup,
    sample=_flow_sample,
    steps=DENOISER_STEPS,
)


def _sigma_data(ds: Dataset) -> float:
    """The data's per-coordinate std (EDM's sigma_data), from 10^5 draws of a fixed seed."""
    x = ds.sample(100_000, np.random.default_rng(0)).astype(np.float64)
    return float(np.sqrt(x.var(axis=0).mean()))


def _edm_setup(device: torch.device, gen: torch.Generator, ds: Dataset) -> Trainer:
    net = _time_net(device)
    return Trainer(
        device, gen, {"F": net}, {"F": adam(net.parameters(), DENOISER_LR)},
        extra={"sigma_data": _sigma_data(ds)},
    )  # fmt: skip


def _edm_raw(t: Trainer, x: torch.Tensor, sigma: torch.Tensor, net: str = "F") -> tuple[torch.Tensor, ...]:
    """(F, c_skip, c_out): the network on the preconditioned input (Karras et al. 2022, Table 1)."""
    c_skip, c_out, c_in, c_noise = gl.edm_preconditioning(sigma, t.extra["sigma_data"])
    f = t.modules[net](torch.cat([c_in[:, None] * x, _t_embedding(250.0 * c_noise)], dim=1))
    return f, c_skip, c_out


def _edm_denoise(t: Trainer, x: torch.Tensor, sigma: torch.Tensor, net: str = "F") -> torch.Tensor:
    """EDM's denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    f, c_skip, c_out = _edm_raw(t, x, sigma, net)
    return c_skip[:, None] * x + c_out[:, None] * f


def _edm_train(t: Trainer, sample_real: Callable[[], torch.Tensor], net: str = "F") -> torch.Tensor:
    """One step of EDM's denoiser loss on the network ``net``; returns the loss, detached."""
    x0 = sample_real()
    noise = t.randn(*x0.shape)
    sigma = gl.sample_timesteps(x0.shape[0], "lognormal_sigma", _draw_seed(t), device=t.device)
    f, _, _ = _edm_raw(t, x0 + sigma[:, None] * noise, sigma, net)
    loss = gl.denoiser_loss(f, x0, noise, sigma, sigma_data=t.extra["sigma_data"])  # weighting 'edm'
    t.update(net, loss, list(t.modules[net].parameters()))
    return loss.detach()


def _edm_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    t.decay_lr()
    return {"loss": _edm_train(t, sample_real)}


def _edm_sample(t: Trainer, n: int) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma on Karras's
    sigmas (rho = 7) from 80 down to 0.002, then the denoiser's last estimate."""
    sigmas = gl.karras_sigmas(FLOW_STEPS, device=t.device).flip(0)  # descending
    x = sigmas[0] * t.randn(n, 2)
    with torch.no_grad():
        for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = x + (b - a) * (x - _edm_denoise(t, x, a.expand(n))) / a
        return _edm_denoise(t, x, sigmas[-1].expand(n))


EDM_STEPS = DENOISER_STEPS
EDM_METHOD = Method(
    name="edm",
    family="flow",
    ops=("sample_timesteps", "edm_preconditioning", "denoiser_loss", "karras_sigmas"),
    about=f"EDM denoiser (Karras et al. 2022), {FLOW_STEPS} Euler steps of the probability-flow ODE",
    hparams="paper: lognormal sigma (P_mean -1.2, P_std 1.2), 'edm' weighting, sigmas 0.002..80, rho 7; "
    "demo: sigma_data = the data's std, " + _DENOISER + _MLP3,
    step=_edm_step,
    setup=_edm_setup,
    sample=_edm_sample,
    steps=EDM_STEPS,
)

# ============================================================================ consistency distillation

# Consistency distillation (CD, Song et al. 2023, Algorithm 2) from an EDM teacher trained
# first in the same run by the edm row's recipe. Consistency *training* from scratch (iCT)
# needs 10^5+ steps of its curriculum; in this budget it failed (MMD² ~40x EDM's).
CM_SIGMA_MIN, CM_SIGMA_MAX = 0.002, 80.0
CD_N = 18  # the paper's CIFAR-10 discretization (Karras sigmas, rho 7)
CD_MU = 0.95  # the EMA rate of the target network (the paper's ImageNet 64 value)


def _cd_setup(device: torch.device, gen: torch.Generator, ds: Dataset) -> Trainer:
    teacher, student, target = _time_net(device), _time_net(device), _time_net(device)
    sigmas = gl.karras_sigmas(CD_N, CM_SIGMA_MIN, CM_SIGMA_MAX, device=device)  # ascending
    return Trainer(
        device, gen, {"teacher": teacher, "F": student, "target": target},
        {"teacher": adam(teacher.parameters(), DENOISER_LR), "F": adam(student.parameters(), LR)},
        extra={"sigma_data": _sigma_data(ds), "sigmas": sigmas},
    )  # fmt: skip


def _cd_pretrain(t: Trainer, sample_real: Callable[[], torch.Tensor], n: int) -> None:
    """Train the EDM teacher for ``n`` steps, then start student and target from its weights (as CD does)."""
    for i in range(n):
        t.decay_lr("teacher", progress=i / n)
        _edm_train(t, sample_real, "teacher")
    t.modules["teacher"].requires_grad_(False)
    for name in ("F", "target"):
        t.modules[name].load_state_dict(t.modules["teacher"].state_dict())
    t.modules["target"].requires_grad_(False)


def _cm_f(t: Trainer, x: torch.Tensor, sigma: torch.Tensor, net: str = "F") -> torch.Tensor:
    """The consistency function f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with the
    boundary condition f(x, sigma_min) = x (Song et al. 2023, Appendix C); F sees EDM's
    c_in and c_noise, so the teacher's weights start it near EDM's denoiser."""
    sd = t.extra["sigma_data"]
    s = sigma[:, None]
    c_skip = sd**2 / ((s - CM_SIGMA_MIN) ** 2 + sd**2)
    c_out = (s - CM_SIGMA_MIN) * sd / torch.sqrt(sd**2 + s**2)
    c_in = 1.0 / torch.sqrt(sd**2 + s**2)
    f = t.modules[net](torch.cat([c_in * x, _t_embedding(250.0 * 0.25 * torch.log(sigma))], dim=1))
    return c_skip * x + c_out * f


def heun_step(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    hi: torch.Tensor,
    lo: torch.Tensor,
) -> torch.Tensor:
    """One Heun step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from
    ``hi`` down to ``lo`` (per row, both > 0): EDM's second-order solver, CD's teacher step."""
    d_hi = (x - denoise(x, hi)) / hi[:, None]
    x_euler = x + (lo - hi)[:, None] * d_hi
    d_lo = (x_euler - denoise(x_euler, lo)) / lo[:, None]
    return x + (lo - hi)[:, None] * 0.5 * (d_hi + d_lo)


def _cd_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x0 = sample_real()
    b = x0.shape[0]
    sig = t.extra["sigmas"]
    i = torch.randint(0, CD_N - 1, (b,), device=t.device, generator=t.gen)  # adjacent pairs, uniform
    lo, hi = sig[i], sig[i + 1]
    x_hi = x0 + hi[:, None] * t.randn(b, 2)
    with torch.no_grad():
        x_lo = heun_step(lambda x, s: _edm_denoise(t, x, s, "teacher"), x_hi, hi, lo)
        target = _cm_f(t, x_lo, lo, "target")
    student = _cm_f(t, x_hi, hi)
    loss = gl.pseudo_huber_loss(student, target)  # iCT's metric, c = 0.00054 sqrt(2)
    params = list(t.modules["F"].parameters())
    t.update("F", loss, params)
    with torch.no_grad():  # the target network: an EMA of the student
        for p_t, p in zip(t.modules["target"].parameters(), params, strict=True):
            p_t.lerp_(p, 1.0 - CD_MU)
    return {"loss": loss.detach()}


def _cd_sample(t: Trainer, n: int) -> torch.Tensor:
    """One step: f(sigma_max z, sigma_max), with the student (as the paper samples with the EMA, mu 0.95)."""
    with torch.no_grad():
        return _cm_f(t, CM_SIGMA_MAX * t.randn(n, 2), torch.full((n,), CM_SIGMA_MAX, device=t.device))


CT_METHOD = Method(
    name="consistency",
    family="consistency",
    ops=("pseudo_huber_loss", "karras_sigmas", "edm_preconditioning", "denoiser_loss", "sample_timesteps"),
    about="consistency distillation (CD, Song et al. 2023) of an EDM teacher trained first in the same run "
    f"({EDM_STEPS} steps, the edm row's recipe), ONE sampling step",
    hparams=f"paper (CD): Heun steps of the teacher's ODE between adjacent Karras sigmas 0.002..80 (N 18 on "
    "CIFAR-10), the target an EMA of the student, the student initialised from the teacher, LPIPS metric; "
    f"demo: N {CD_N}, EMA mu {CD_MU:g} (the paper's ImageNet 64 value), genloss's pseudo_huber_loss as the metric "
    f"(iCT's, c 0.00054 sqrt(2)), Adam lr {LR:g} (decayed: worse, MMD² 11.8 vs 7.1), batch 256, " + _MLP3,
    step=_cd_step,
    setup=_cd_setup,
    sample=_cd_sample,
    steps=500,
    pretrain=_cd_pretrain,
    pretrain_steps=EDM_STEPS,
    work_per_step=3.0,  # two teacher evaluations, the target's, the student's forward and backward
)

# ============================================================================ VQ-VAE

VQ_CODES, VQ_DIM, VQ_BETA = 64, 2, 0.25


def _vq_setup(device: torch.device, gen: torch.Generator, ds: Dataset) -> Trainer:
    enc, dec = mlp(2, VQ_DIM).to(device), mlp(VQ_DIM, 2).to(device)
    codebook = nn.Parameter(0.5 * torch.randn(VQ_CODES, VQ_DIM, generator=gen, device=device))
    params = [*enc.parameters(), *dec.parameters(), codebook]
    return Trainer(
        device, gen, {"enc": enc, "dec": dec}, {"vq": adam(params, LR)},
        extra={"codebook": codebook, "params": params, "counts": torch.zeros(VQ_CODES, device=device)},
    )  # fmt: skip


def _vq(t: Trainer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``genloss.torch.vector_quantize`` on the encoding of ``x``: (z_q, indices, commitment, codebook loss)."""
    out = gl.vector_quantize(t.modules["enc"](x), t.extra["codebook"], beta=VQ_BETA)  # type: ignore[attr-defined]
    if isinstance(out, dict):
        return out["z_q"], out["indices"], out["commitment"], out["codebook"]
    z_q, idx, commit, cb = out
    return z_q, idx, commit, cb


def _vq_step(t: Trainer, sample_real: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    x = sample_real()
    z_q, idx, commit, cb = _vq(t, x)
    recon = ((t.modules["dec"](z_q) - x) ** 2).sum(1).mean()
    loss = recon + commit.mean() + cb.mean()
    t.update("vq", loss, t.extra["params"])
    # the prior the samples are drawn from: code frequencies over the last steps (decayed counts)
    t.extra["counts"].mul_(0.99).add_(torch.bincount(idx.detach().reshape(-1), minlength=VQ_CODES))
    return {"loss": loss.detach()}


def _vq_sample(t: Trainer, n: int) -> torch.Tensor:
    """Decode codes drawn from their training frequencies (a unigram prior: at most K distinct points)."""
    counts = t.extra["counts"]
    probs = counts / counts.sum() if float(counts.sum()) > 0 else torch.ones_like(counts) / len(counts)
    idx = torch.multinomial(probs, n, replacement=True, generator=t.gen)
    with torch.no_grad():
        return t.modules["dec"](t.extra["codebook"][idx])


def _vq_evaluate(t: Trainer, held_out: torch.Tensor) -> dict[str, float]:
    """Codebook usage (fraction of codes used by held-out data) and perplexity exp(H(code frequencies))."""
    with torch.no_grad():
        _, idx, _, _ = _vq(t, held_out)
    p = torch.bincount(idx.reshape(-1), minlength=VQ_CODES).double()
    p = p / p.sum()
    h = -(p[p > 0] * torch.log(p[p > 0])).sum()
    return {"codebook_usage": float((p > 0).double().mean()), "perplexity": float(torch.exp(h))}


VQ_METHOD = Method(
    name="vq-vae",
    family="vq",
    ops=("vector_quantize",),
    about=f"VQ-VAE (van den Oord et al. 2017), {VQ_CODES} codes of dim {VQ_DIM}, samples from the code frequencies",
    hparams=f"paper: beta {VQ_BETA}, straight-through gradient; demo: Adam lr {LR:g}, batch 256, encoder and decoder "
    + _MLP2,
    step=_vq_step,
    setup=_vq_setup,
    sample=_vq_sample,
    evaluate=_vq_evaluate,
    steps=800,
)

METHODS: list[Method] = [*GAN_METHODS, VAE_METHOD, DDPM_METHOD, FLOW_METHOD, EDM_METHOD, CT_METHOD, VQ_METHOD]
