"""genloss.native: fused forward+backward kernels on any ``__dlpack__`` array.

``genloss.native.<name>(*inputs, **hyperparameters, need_grad=True)`` returns
``(value, grads)``; see ``genloss.native.gan`` for the conventions.
"""

from . import divergence, gan, vae
from .divergence import kid, median_bandwidth, mmd2
from .gan import (
    cycle_consistency_loss,
    feature_matching_loss,
    fgan_d_loss,
    fgan_g_loss,
    gan_d_loss,
    gan_g_loss,
    gradient_penalty_from_grads,
    hinge_d_loss,
    hinge_g_loss,
    jsd_estimate,
    l1_loss,
    lsgan_d_loss,
    lsgan_g_loss,
    pix2pix_g_loss,
    r1_penalty_from_grads,
    relativistic_d_loss,
    relativistic_g_loss,
    ssgan_critic_loss,
    ssgan_g_loss,
    wgan_critic_loss,
    wgan_g_loss,
)
from .vae import (
    bernoulli_nll,
    gaussian_kl,
    gaussian_nll,
    gmm_log_likelihood,
    gmm_responsibilities,
    iwae_bound,
    negative_elbo,
    normal_kl,
)

__all__ = [
    "divergence",
    "gan",
    "vae",
    "kid",
    "median_bandwidth",
    "mmd2",
    "bernoulli_nll",
    "gaussian_kl",
    "gaussian_nll",
    "gmm_log_likelihood",
    "gmm_responsibilities",
    "iwae_bound",
    "negative_elbo",
    "normal_kl",
    "cycle_consistency_loss",
    "feature_matching_loss",
    "fgan_d_loss",
    "fgan_g_loss",
    "gan_d_loss",
    "gan_g_loss",
    "gradient_penalty_from_grads",
    "hinge_d_loss",
    "hinge_g_loss",
    "jsd_estimate",
    "l1_loss",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "pix2pix_g_loss",
    "r1_penalty_from_grads",
    "relativistic_d_loss",
    "relativistic_g_loss",
    "ssgan_critic_loss",
    "ssgan_g_loss",
    "wgan_critic_loss",
    "wgan_g_loss",
]
