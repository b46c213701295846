"""genloss.torch: the genloss ops as ``torch.ops.genloss.*`` custom ops.

Works in eager, under ``torch.compile(fullgraph=True)`` and passes
``torch.library.opcheck``. Importing this module registers the ops.
"""

try:  # first: without torch, one line saying what to install, not a traceback from a submodule
    import torch as _torch  # noqa: F401
except ModuleNotFoundError as _err:
    if _err.name != "torch":  # torch is there, one of its own imports is not: its error says which
        raise
    raise ImportError("genloss.torch needs PyTorch: pip install 'genloss[torch]'", name="torch") from None

from . import diffusion, divergence, flow, gan, metrics, quant, vae, vdm
from .diffusion import *  # noqa: F403
from .diffusion import __all__ as _diffusion_all
from .divergence import *  # noqa: F403
from .divergence import __all__ as _divergence_all
from .flow import *  # noqa: F403
from .flow import __all__ as _flow_all
from .gan import *  # noqa: F403
from .gan import __all__ as _gan_all
from .metrics import *  # noqa: F403
from .metrics import __all__ as _metrics_all
from .quant import *  # noqa: F403
from .quant import __all__ as _quant_all
from .vae import *  # noqa: F403
from .vae import __all__ as _vae_all
from .vdm import *  # noqa: F403
from .vdm import __all__ as _vdm_all

__all__ = [
    "diffusion",
    "divergence",
    "flow",
    "gan",
    "metrics",
    "quant",
    "vae",
    "vdm",
    *_gan_all,
    *_vae_all,
    *_diffusion_all,
    *_vdm_all,
    *_divergence_all,
    *_flow_all,
    *_metrics_all,
    *_quant_all,
]

# Every public function's ValueError / TypeError names its op (the checks name the argument).
from .. import _checks  # noqa: E402

_checks.name_op_errors(globals(), __all__)
