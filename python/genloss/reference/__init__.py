"""NumPy reference implementations (float64, forward and analytic backward): the oracle.

Every public name of the family modules is re-exported flat, e.g.
``genloss.reference.gan_d_loss`` is ``genloss.reference.gan.gan_d_loss``,
``genloss.reference.gaussian_kl`` is ``genloss.reference.vae.gaussian_kl``,
``genloss.reference.q_sample`` is ``genloss.reference.diffusion.q_sample`` and
``genloss.reference.mmd2`` is ``genloss.reference.divergence.mmd2``,
``genloss.reference.flow_matching_loss`` is ``genloss.reference.flow.flow_matching_loss`` and
``genloss.reference.frechet_distance`` is ``genloss.reference.metrics.frechet_distance``.
"""

from .. import _checks
from . import diffusion, divergence, flow, gan, metrics, quant, vae
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

__all__ = [
    "diffusion",
    "divergence",
    "flow",
    "gan",
    "metrics",
    "quant",
    "vae",
    *_gan_all,
    *_vae_all,
    *_diffusion_all,
    *_divergence_all,
    *_flow_all,
    *_metrics_all,
    *_quant_all,
]

# Every public function's ValueError / TypeError names its op (the checks name the argument).
for _module in (diffusion, divergence, flow, gan, metrics, quant, vae):
    _checks.name_op_errors(vars(_module), _module.__all__)
    globals().update({_n: getattr(_module, _n) for _n in _module.__all__})
del _module
