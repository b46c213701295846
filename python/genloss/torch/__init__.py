"""genloss.torch: the genloss ops as ``torch.ops.genloss.*`` custom ops.

Works in eager, under ``torch.compile(fullgraph=True)`` and passes
``torch.library.opcheck``. Importing this module registers the ops.
"""

from . import diffusion, divergence, gan, vae, vdm
from .diffusion import *  # noqa: F403
from .diffusion import __all__ as _diffusion_all
from .divergence import *  # noqa: F403
from .divergence import __all__ as _divergence_all
from .gan import *  # noqa: F403
from .gan import __all__ as _gan_all
from .vae import *  # noqa: F403
from .vae import __all__ as _vae_all
from .vdm import *  # noqa: F403
from .vdm import __all__ as _vdm_all

__all__ = [
    "diffusion",
    "divergence",
    "gan",
    "vae",
    "vdm",
    *_gan_all,
    *_vae_all,
    *_diffusion_all,
    *_vdm_all,
    *_divergence_all,
]
