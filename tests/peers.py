"""Optional peer packages (diffusers, k-diffusion, torchcfm, torchmetrics, POT, prdc,
vector-quantize-pytorch, pytorch-fid): a test that compares with one imports it through
``peer`` and is skipped, saying why, where the peer cannot be used.

``pytest.importorskip`` skips only when the module is missing. A peer that is installed
but does not import must skip too, because its failure is not genloss's. The common case
is torchvision from PyPI (built against the CUDA torch) next to the CPU torch: its
``import`` raises ``RuntimeError: operator torchvision::nms does not exist``, and every
peer that imports torchvision fails the same way (k-diffusion, pytorch-fid, torchmetrics'
image metrics). A peer's import-time warnings are silenced: the suite turns warnings into
errors, and a deprecation inside a peer says nothing about genloss.

``GENLOSS_REQUIRE_PEERS``: comma-separated top-level module names (``torchmetrics,ot``) whose
import failure fails the test instead of skipping it. CI installs those peers and sets it, so a
cross-check that should run cannot skip unnoticed.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest


def try_peer(module: str) -> ModuleType | Exception:
    """``module`` imported, or the exception its import raised (any: ImportError, a RuntimeError from a
    broken build, ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception as e:
        required = {n.strip() for n in os.environ.get("GENLOSS_REQUIRE_PEERS", "").split(",") if n.strip()}
        if module.split(".")[0] in required:
            pytest.fail(f"peer {module!r} is required here (GENLOSS_REQUIRE_PEERS) but does not import: "
                        f"{type(e).__name__}: {e}")  # fmt: skip
        return e


def peer(module: str) -> ModuleType:
    """``module`` imported, or the calling test skipped with the import's error."""
    got = try_peer(module)
    if isinstance(got, Exception):
        pytest.skip(f"peer {module!r} does not import here: {type(got).__name__}: {got}")
    return got


def given_features(d: int):
    """A ``torch.nn.Module`` that returns its input, with ``num_features = d``: torchmetrics' FID and KID
    metrics take it as their ``feature`` extractor, so they are computed on features the test gives."""
    import torch

    class GivenFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_features = d

        def forward(self, v):
            return v

    return GivenFeatures()
