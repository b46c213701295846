"""NumPy reference implementations (float64, forward and analytic backward): the oracle.

Every public name of the family modules is re-exported flat, e.g.
``genloss.reference.gan_d_loss`` is ``genloss.reference.gan.gan_d_loss``.
"""

from . import gan
from .gan import *  # noqa: F403
from .gan import __all__ as _gan_all

__all__ = ["gan", *_gan_all]
