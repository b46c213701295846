"""Shared test configuration: hypothesis profiles and the CUDA marker.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

* ``ci`` -- the default, and what CI (``CI=true``) runs: derandomized (the same
  examples on every run and machine), no example database, no deadline (the first
  call of an op pays for imports and allocation), few examples per test so the whole
  suite stays fast.  The explicit ``@example`` odd shapes run in every profile.
* ``dev`` -- many more examples, randomized: for local bug hunting.

Tests marked ``@pytest.mark.cuda`` (or using the ``cuda_device`` fixture) are
SKIPPED, not failed, where torch sees no CUDA device or genloss was built
without CUDA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

try:  # the package from the source tree when it is not installed (PYTHONPATH=python also works)
    import genloss  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=6,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def cuda_available() -> tuple[bool, str]:
    """(usable, reason): torch sees a CUDA device AND genloss was built with CUDA."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    import genloss

    if not genloss.build_info().get("cuda", False):
        return False, "genloss was built without CUDA"
    return True, ""


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    ok, reason = cuda_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"cuda: {reason}")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    """A CUDA torch.device; skips the test where none is usable."""
    ok, reason = cuda_available()
    if not ok:
        pytest.skip(f"cuda: {reason}")
    import torch

    return torch.device("cuda", torch.cuda.current_device())
