"""genloss: verified losses, bounds and kernels of generative models.

Three layers that agree (tests/): ``genloss.reference`` (NumPy, the oracle),
``genloss.native`` (fused C++/CUDA kernels on any DLPack array) and
``genloss.torch`` (``torch.ops.genloss.*`` custom ops with autograd).
Derivations of every equation: derivations/.
"""

from __future__ import annotations

__version__ = "0.1.0"


def build_info() -> dict:
    """What the native module was built with: CUDA or not, the CPU instruction
    set chosen at run time, OpenMP and its thread count, the CUDA archs."""
    from . import _C

    info = dict(_C.build_info())
    info["version"] = __version__
    if info["cuda"]:
        try:
            import torch

            info["cuda_device_available"] = bool(torch.cuda.is_available())
        except ImportError:
            info["cuda_device_available"] = None
    return info
