"""NumPy reference implementations (float64, forward and analytic backward): the oracle.

Every public name of the family modules is re-exported flat, e.g.
``genloss.reference.gan_d_loss`` is ``genloss.reference.gan.gan_d_loss``,
``genloss.reference.gaussian_kl`` is ``genloss.reference.vae.gaussian_kl``,
``genloss.reference.q_sample`` is ``genloss.reference.diffusion.q_sample`` and
``genloss.reference.mmd2`` is ``genloss.reference.divergence.mmd2``.
"""

from . import diffusion, divergence, gan, vae
from .diffusion import *  # noqa: F403
from .diffusion import __all__ as _diffusion_all
from .divergence import *  # noqa: F403
from .divergence import __all__ as _divergence_all
from .gan import *  # noqa: F403
from .gan import __all__ as _gan_all
from .vae import *  # noqa: F403
from .vae import __all__ as _vae_all

__all__ = [
    "diffusion",
    "divergence",
    "gan",
    "vae",
    *_gan_all,
    *_vae_all,
    *_diffusion_all,
    *_divergence_all,
]
