"""genloss.torch: the genloss ops as ``torch.ops.genloss.*`` custom ops.

Works in eager, under ``torch.compile(fullgraph=True)`` and passes
``torch.library.opcheck``. Importing this module registers the ops.
"""

from . import divergence, gan, vae
from .divergence import *  # noqa: F403
from .divergence import __all__ as _divergence_all
from .gan import *  # noqa: F403
from .gan import __all__ as _gan_all
from .vae import *  # noqa: F403
from .vae import __all__ as _vae_all

__all__ = ["divergence", "gan", "vae", *_divergence_all, *_gan_all, *_vae_all]
