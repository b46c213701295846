"""genloss.native: fused forward+backward kernels on any ``__dlpack__`` array.

``genloss.native.<name>(*inputs, **hyperparameters, need_grad=True)`` returns
``(value, grads)``; see ``genloss.native.gan`` for the conventions.

The exports are made, not listed: every function of a family module (``gan``, ``vae``, ...)
named in the reference family's ``__all__`` (``genloss.reference.<family>``) is
``genloss.native.<name>``. Adding an op's native composition to its family module is all
it takes; no line here.
"""

from typing import TYPE_CHECKING

from .. import reference as _reference
from . import diffusion, divergence, flow, gan, metrics, quant, vae
from ._engine import cache_info, empty_cache, options

if TYPE_CHECKING:  # what type checkers see: each family's public names (made below at run time)
    from .diffusion import *  # noqa: F403
    from .divergence import *  # noqa: F403
    from .flow import *  # noqa: F403
    from .gan import *  # noqa: F403
    from .metrics import *  # noqa: F403
    from .quant import *  # noqa: F403
    from .vae import *  # noqa: F403

_FAMILIES = {
    "diffusion": diffusion,
    "divergence": divergence,
    "flow": flow,
    "gan": gan,
    "metrics": metrics,
    "quant": quant,
    "vae": vae,
}


def _ops() -> list[str]:
    """The op functions of the family modules (defined there, named in the reference's
    ``__all__``), put in this namespace."""
    names = []
    for family, module in _FAMILIES.items():
        for name in getattr(_reference, family).__all__:
            fn = vars(module).get(name)
            if callable(fn) and getattr(fn, "__module__", None) == module.__name__:
                globals()[name] = fn
                names.append(name)
    return names


__all__ = ["cache_info", "empty_cache", "options", *_FAMILIES, *_ops()]

# Every public function's ValueError / TypeError names its op (the checks name the argument).
from .. import _checks  # noqa: E402

_checks.name_op_errors(globals(), __all__)
