"""CUDA engine cases that the registry-wide comparisons (test_torch_ops.py) do not reach.

* the caller's current device is unchanged after a call (the bindings used to
  ``cudaSetDevice`` without restoring it), on every visible device;
* empty inputs (an empty batch, empty trailing dims) give the CPU's result (they used to
  launch a 0-block grid: "invalid configuration argument"), or the CPU's error;
* inputs of many chunks, up to 2^24 + 13 elements (the multi-chunk combine and the
  per-row segment sums), against float64 sums computed by torch on the CPU.

All marked ``cuda``: skipped without a device (tests/conftest.py); ``bash bench/gpu_check.sh``
runs them on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from genloss import registry as R

torch = pytest.importorskip("torch")
gt = pytest.importorskip("genloss.torch")

pytestmark = pytest.mark.cuda

# Every case with a reduction that is defined on an empty batch ('mean' of nothing is refused).
EMPTY_CASES = [(r, v, red) for r, v, red in R.cases() if red in ("sum", "none", None)]
EMPTY_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in EMPTY_CASES]
EMPTY_SIZES = {
    "batch": {**R.ODD_SIZES[0], **{s: 0 for s in R.BATCH_SYMBOLS}},
    "trailing": {**R.ODD_SIZES[2], "...": (3, 0), "...2": (0,)},
}


def empty_inputs(record, variant, sizes):
    """The op's inputs at ``sizes``; where the generator cannot draw them (a kink-avoiding
    rescale of an empty array), zeros of the same shapes: an empty array has no values."""
    try:
        return R.make_inputs(record, np.random.default_rng(0), np.float64, sizes, variant)
    except ValueError:
        shapes = R.resolve_shapes(record, sizes, variant)
        kinds = [R.DOMAINS[a.domain].kind for a in record.args]
        return tuple(
            np.zeros(shapes[a.name], np.float64 if k == "float" else np.int64)
            for a, k in zip(record.args, kinds, strict=True)
        )


def run_op(record, variant, reduction, arrays, device):
    """("value", value, grads) of the torch op on ``device`` (grads of ones upstream), or
    ("error", exception type)."""
    kwargs = R.call_kwargs(record, variant, reduction)
    tensors = []
    for a, x in zip(record.args, arrays, strict=True):
        t = torch.from_numpy(np.array(x, copy=True)).to(device)
        if a.name in record.differentiable:
            t.requires_grad_(True)
        tensors.append(t)
    try:
        out = record.torch(*tensors, **kwargs)
        value = out if record.value_index is None else out[record.value_index]
        diff = [tensors[record.arg_names.index(n)] for n in record.differentiable]
        grads = ()
        if diff and value.requires_grad:
            grads = torch.autograd.grad(value, diff, torch.ones_like(value), allow_unused=True)
    except (ValueError, TypeError, RuntimeError) as e:
        return ("error", type(e))
    return ("value", value.detach().cpu(), [None if g is None else g.cpu() for g in grads])


@pytest.mark.parametrize("which", sorted(EMPTY_SIZES))
@pytest.mark.parametrize(("record", "variant", "reduction"), EMPTY_CASES, ids=EMPTY_IDS)
def test_empty_inputs_match_cpu(record, variant, reduction, which, cuda_device):
    arrays = empty_inputs(record, variant, EMPTY_SIZES[which])
    cpu = run_op(record, variant, reduction, arrays, "cpu")
    dev = run_op(record, variant, reduction, arrays, cuda_device)
    label = f"{record.name}({variant.id}, {reduction}) on {which}-empty inputs"
    assert cpu[0] == dev[0], f"{label}: CPU gave {cpu[0]} {cpu[1:] if cpu[0] == 'error' else ''}, CUDA {dev}"
    if cpu[0] == "error":
        assert cpu[1] == dev[1], f"{label}: CPU raised {cpu[1].__name__}, CUDA {dev[1].__name__}"
        return
    torch.testing.assert_close(dev[1], cpu[1], equal_nan=True, msg=f"{label}: value")
    for g_dev, g_cpu in zip(dev[2], cpu[2], strict=True):
        if g_cpu is None:
            assert g_dev is None, label
        else:
            torch.testing.assert_close(g_dev, g_cpu, equal_nan=True, msg=f"{label}: gradient")


def test_current_device_unchanged_after_a_call(cuda_device):
    """A call on device d leaves the caller's current device as it was, for every pair (current, d)."""
    n = torch.cuda.device_count()
    before = torch.cuda.current_device()
    try:
        for current in range(n):
            for d in range(n):
                torch.cuda.set_device(current)
                x = torch.randn(5, 300, device=f"cuda:{d}", requires_grad=True)
                y = torch.randn(5, 300, device=f"cuda:{d}")
                gt.l1_loss(x, y).backward()  # map_reduce (bindings.cpp)
                gt.mmd2(x.detach()[:, :3], y[:, :3])  # mmd (bindings_mmd.cpp)
                torch.cuda.synchronize(d)
                assert torch.cuda.current_device() == current, f"a call on cuda:{d} moved the current device"
                expect = (x.detach().cpu().double() - y.cpu().double()).abs().mean()
                got = gt.l1_loss(x.detach(), y)
                assert torch.cuda.current_device() == current
                assert got.device == torch.device("cuda", d)
                torch.testing.assert_close(got.cpu().double(), expect, rtol=1e-6, atol=0)
    finally:
        torch.cuda.set_device(before)


@pytest.mark.parametrize("numel", [3 * 4096 + 1, 40 * 4096 + 7, (1 << 24) + 13])
def test_many_chunks_match_float64(numel, cuda_device):
    """One long row (whole-tensor reduction) and per-row sums over several chunks each."""
    g = torch.Generator().manual_seed(numel)
    rows = 3
    cols = -(-numel // rows)
    x64 = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    y64 = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = x64.float().to(cuda_device).requires_grad_(True)
    y = y64.float().to(cuda_device)
    xe, ye = x.detach().cpu().double(), y.cpu().double()  # exactly what the op sees, widened
    value = gt.l1_loss(x, y)
    value.backward()
    expect = (xe - ye).abs().sum() / xe.numel()
    torch.testing.assert_close(value.cpu().double(), expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.cpu().double(), torch.sign(xe - ye) / xe.numel(), rtol=1e-6, atol=0)
    per_row = gt.l1_loss(x.detach(), y, reduction="none")
    torch.testing.assert_close(per_row.cpu().double(), (xe - ye).abs().mean(dim=1), rtol=1e-6, atol=0)


def test_cupy_inputs_are_exported_for_the_launch_stream(cuda_device):
    """The DLPack stream protocol: a CuPy input is exported for the stream genloss launches
    on (CuPy's current stream on the array's device), not for the legacy default stream."""
    cupy = pytest.importorskip("cupy")
    import genloss.native as gn

    class Recorder:  # a CuPy array to genloss (its module), recording the streams it is exported for
        def __init__(self, a):
            self.a, self.streams = a, []

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

        def __dlpack__(self, stream=None, **kw):
            self.streams.append(stream)
            return self.a.__dlpack__(stream=stream, **kw)

    Recorder.__module__ = "cupy._genloss_test"
    with cupy.cuda.Device(cuda_device.index):
        s = cupy.cuda.Stream(non_blocking=True)
        with s:
            x = cupy.random.standard_normal((4, 300), dtype=cupy.float32)
            y = cupy.random.standard_normal((4, 300), dtype=cupy.float32)
            rx, ry = Recorder(x), Recorder(y)
            value, _ = gn.l1_loss(rx, ry)
            s.synchronize()
            expect = float(cupy.abs(x.astype(cupy.float64) - y.astype(cupy.float64)).mean())
    assert rx.streams == [s.ptr] and ry.streams == [s.ptr], (rx.streams, ry.streams, s.ptr)
    assert abs(float(value) - expect) <= 1e-6 * abs(expect)
