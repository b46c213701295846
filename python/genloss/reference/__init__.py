"""NumPy reference implementations (float64, forward and analytic backward): the oracle.

Every public name of the family modules is re-exported flat, e.g.
``genloss.reference.gan_d_loss`` is ``genloss.reference.gan.gan_d_loss`` and
``genloss.reference.gaussian_kl`` is ``genloss.reference.vae.gaussian_kl``.
"""

from . import gan, vae
from .gan import *  # noqa: F403
from .gan import __all__ as _gan_all
from .vae import *  # noqa: F403
from .vae import __all__ as _vae_all

__all__ = ["gan", "vae", *_gan_all, *_vae_all]
