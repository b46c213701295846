"""The check of ``genloss.native`` on float16/bfloat16 storage, shared by the CUDA test
(tests/test_cuda.py: the storage kernels) and the CPU test of the float32 path that some
compositions take (tests/test_native.py). Needs torch (callers importorskip it first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genloss import registry as R
from strategies import seed_of
from tolerances import assert_close, value_scale

LOW = ("float16", "bfloat16")

# The compositions that hand an intermediate from one engine call to the next (or a per-sample
# weight formed in float64) and so compute float16/bfloat16 inputs in float32
# (genloss.native._compose.computed_in_float32); flow_matching_loss does where it has a weight.
FLOAT32_PATH = (
    "gradient_penalty_from_grads", "denoiser_loss", "scm_loss", "vdm_discrete_loss", "pseudo_huber_loss",
    "consistency_training_loss", "meanflow_loss", "vsd_loss",
)  # fmt: skip


def _rounded(x, dtype):
    """The float64 oracle rounded to ``dtype`` (inf where it overflows): the best a kernel
    that stores ``dtype`` can return."""
    return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype).double().numpy()


def check_native_storage(record, variant, reduction, low, device, *, may_refuse=True):
    """``record.native`` on ``low`` (a dtype name) inputs on ``device`` against the reference on
    the exactly widened inputs, value and gradients rounded to ``low``; value and gradients
    must come back in ``low`` on ``device``. ``may_refuse``: an op may instead refuse with an
    error naming the dtype (then the test is skipped)."""
    dtype = getattr(torch, low)
    rng = np.random.default_rng(seed_of(record.name, variant.id, low))
    arrays = R.make_inputs(record, rng, np.float64, R.ODD_SIZES[0], variant)
    ts = [torch.from_numpy(np.array(x, copy=True)).to(device) for x in arrays]
    ts = [t.to(dtype) if t.is_floating_point() else t for t in ts]
    kwargs = R.call_kwargs(record, variant, reduction)
    try:
        value, grads = record.native(*ts, **kwargs)
    except (TypeError, ValueError) as e:
        if not may_refuse:
            raise
        assert low in str(e) or "CUDA" in str(e), f"{record.name}: refused {low} without naming it: {e}"
        pytest.skip(f"no {low} kernel on {device}: {e}")
    x64 = tuple(t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ts)
    ref = record.reference(*x64, **kwargs)
    ref_value = np.asarray(ref if record.value_index is None else ref[record.value_index])
    label = f"{record.name}({variant.id}, {reduction}) [{low} storage]"
    assert value.dtype == dtype and value.device == ts[0].device, (
        f"{label}: value {value.dtype} on {value.device}"
    )
    scale = value_scale(x64, reduction, ref_value)
    assert_close(value.cpu(), _rounded(ref_value, dtype), "cuda", low, label + " value", scale=scale)
    if record.reference_backward is None:
        return
    ones = np.ones(ref_value.shape) if ref_value.ndim else 1.0
    ref_grads = record.reference_backward(*x64, ones, **kwargs)
    assert len(grads) == len(ref_grads) == len(record.differentiable), label
    for name, g, rg in zip(record.differentiable, grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.device == ts[0].device, f"{label} d/d{name}: {g.dtype} on {g.device}"
        gs = R.grad_scale(record, name, x64, reduction, rg)
        assert_close(g.cpu(), _rounded(rg, dtype), "cuda", low, f"{label} d/d{name}", scale=gs)
