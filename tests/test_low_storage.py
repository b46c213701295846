"""The float32 path of ``genloss.native`` for float16/bfloat16 storage, on the CPU.

Four compositions hand an intermediate from one engine call to the next (FLOAT32_PATH); on
float16/bfloat16 CUDA inputs they run on float32 copies and round only their results
(``genloss.native._compose.computed_in_float32``). The CPU engine has no low-precision
kernels and refuses such inputs, so here the one device test of that path
(``_compose._low_cuda``) is widened to CPU tensors: everything else (which arrays are widened,
the recursion into the float32 op, the value and every gradient rounded back, absent optional
inputs and gradients) runs as on a GPU, against the reference rounded to the storage dtype.
tests/test_cuda.py runs the same check on CUDA tensors.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("genloss._C")

from genloss import registry as R  # noqa: E402
from genloss.native import _compose  # noqa: E402
from native_storage import FLOAT32_PATH, LOW, check_native_storage  # noqa: E402

CASES = [(r, v, red) for r, v, red in R.cases() if r.name in FLOAT32_PATH]
IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in CASES]


def _low_anywhere(x):
    return isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)


def test_every_float32_path_op_has_cases():
    assert {r.name for r, _, _ in CASES} == set(FLOAT32_PATH)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(("record", "variant", "reduction"), CASES, ids=IDS)
def test_float32_path_matches_rounded_reference(record, variant, reduction, low, monkeypatch):
    monkeypatch.setattr(_compose, "_low_cuda", _low_anywhere)
    check_native_storage(record, variant, reduction, low, "cpu", may_refuse=False)


@pytest.mark.parametrize("name", FLOAT32_PATH)
def test_float32_path_is_for_low_storage_only(name, monkeypatch):
    """Without the widened device test a CPU float16 input is refused as before (the path
    is not taken), naming the argument and the dtype; and with it, a call whose inputs mix
    float16 and float32 takes the op's own path, which refuses the mix (never silently
    computed after widening; ops with two or more floating inputs)."""
    record = R.by_name(name)
    variant = record.variants[0]
    arrays = R.make_inputs(record, np.random.default_rng(0), np.float64, R.ODD_SIZES[0], variant)
    ts = [torch.from_numpy(a.copy()) for a in arrays]
    kwargs = R.call_kwargs(record, variant, "mean" if "mean" in record.reductions else None)
    half = [t.half() if t.is_floating_point() else t for t in ts]
    with pytest.raises(TypeError, match="float16"):
        record.native(*half, **kwargs)
    floats = [i for i, t in enumerate(ts) if t.is_floating_point()]
    if len(floats) < 2:
        return  # one floating input: nothing to mix
    monkeypatch.setattr(_compose, "_low_cuda", _low_anywhere)
    mixed = list(half)
    mixed[floats[-1]] = ts[floats[-1]].float()
    with pytest.raises((TypeError, ValueError)):
        record.native(*mixed, **kwargs)
