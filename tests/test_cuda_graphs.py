"""Every op under CUDA graph capture: fwd+bwd captured once, replayed on new inputs, equal to
the eager result on those inputs (issue 16, items 6 and 9). A host synchronisation inside
an op (a value read back for a check, a blocking copy) makes capture fail here.

Its own file, run after the other CUDA tests (bench/gpu_check.py orders it last): a capture
that fails part-way must not disturb the cases that do not capture.
"""

from __future__ import annotations

import numpy as np
import pytest

from genloss import registry as R
from test_cuda import _cuda_tensors, _torch_step
from tolerances import assert_close

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.cuda

CASES = list(R.cases())


def refuses_capture(record, variant) -> bool:
    """The ops whose result needs a value read back on the host, which must refuse capture with
    a ValueError saying so: MMD with the median-heuristic bandwidth, Sinkhorn's convergence
    test. (The relativistic losses' batch means stay on the device: they capture.)"""
    kw = variant.kwargs
    if record.name == "mmd2":
        return kw.get("bandwidths") is None and kw.get("kernel", "rbf") in ("rbf", "imq")
    return record.name == "sinkhorn_divergence"


CASE_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in CASES]


# torch 2.11 warns when a leaf's AccumulateGrad node made during the side-stream warm-up is
# still alive at capture (seen for six GAN ops, torch's own remedy is to drop every reference
# to the warm-up graph); autograd.grad is used here, so no gradient is accumulated on it.
@pytest.mark.filterwarnings("ignore:The AccumulateGrad node's stream:UserWarning")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")  # after a refusal
@pytest.mark.parametrize(("record", "variant", "reduction"), CASES, ids=CASE_IDS)
def test_capture_and_replay(record, variant, reduction, cuda_device):
    first = R.make_inputs(record, np.random.default_rng(1), np.float64, R.ODD_SIZES[0], variant)
    second = R.make_inputs(record, np.random.default_rng(2), np.float64, R.ODD_SIZES[0], variant)
    static = _cuda_tensors(record, first, cuda_device)
    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):  # warm-up (caches, lazily built tables) off the capture
        for _ in range(2):
            _torch_step(record, variant, reduction, static)
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if refuses_capture(record, variant):
        with pytest.raises(ValueError, match="CUDA graph capture"), torch.cuda.graph(graph):
            _torch_step(record, variant, reduction, static)
        return
    with torch.cuda.graph(graph):
        value, grads = _torch_step(record, variant, reduction, static)
    with torch.no_grad():
        for t, x in zip(static, second, strict=True):
            t.copy_(torch.from_numpy(np.asarray(x)).to(t.dtype))
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    eager_value, eager_grads = _torch_step(record, variant, reduction, static)
    label = f"{record.name}({variant.id}, {reduction}) replayed"
    assert_close(value, eager_value.detach(), "cuda", "float32", label + " value")
    for n, a, b in zip(record.differentiable, grads, eager_grads, strict=True):
        assert_close(a, b, "cuda", "float32", f"{label} d/d{n}")
