"""genloss.torch: the genloss ops as ``torch.ops.genloss.*`` custom ops.

Works in eager, under ``torch.compile(fullgraph=True)`` and passes
``torch.library.opcheck``. Importing this module registers the ops.
``vdm`` holds the torch-only VDM pieces (a learned schedule module and the
schedule's variance gradient), plain torch with no custom op.
"""

from . import gan, vae, vdm
from .gan import *  # noqa: F403
from .gan import __all__ as _gan_all
from .vae import *  # noqa: F403
from .vae import __all__ as _vae_all
from .vdm import *  # noqa: F403
from .vdm import __all__ as _vdm_all

__all__ = ["gan", "vae", "vdm", *_gan_all, *_vae_all, *_vdm_all]
