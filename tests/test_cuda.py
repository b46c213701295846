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
from native_storage import LOW, check_native_storage
from tolerances import assert_close

torch = pytest.importorskip("torch")
gt = pytest.importorskip("genloss.torch")

pytestmark = pytest.mark.cuda

# Every case with a reduction that is defined on an empty batch ('mean' of nothing is refused).
ALL_CASES = list(R.cases())
ALL_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in ALL_CASES]
EMPTY_CASES = [(r, v, red) for r, v, red in ALL_CASES if red in ("sum", "none", None)]
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


def assert_same_outcome(cpu, dev, label, who="CUDA"):
    """Two ``run_op`` outcomes: the same error type, or the same value and gradients."""
    assert cpu[0] == dev[0], f"{label}: CPU gave {cpu[0]} {cpu[1:] if cpu[0] == 'error' else ''}, {who} {dev}"
    if cpu[0] == "error":
        assert cpu[1] == dev[1], f"{label}: CPU raised {cpu[1].__name__}, {who} {dev[1].__name__}"
        return
    torch.testing.assert_close(dev[1], cpu[1], equal_nan=True, msg=f"{label}: value")
    for g_dev, g_cpu in zip(dev[2], cpu[2], strict=True):
        if g_cpu is None:
            assert g_dev is None, label
        else:
            torch.testing.assert_close(g_dev, g_cpu, equal_nan=True, msg=f"{label}: gradient")


@pytest.mark.parametrize("which", sorted(EMPTY_SIZES))
@pytest.mark.parametrize(("record", "variant", "reduction"), EMPTY_CASES, ids=EMPTY_IDS)
def test_empty_inputs_match_cpu(record, variant, reduction, which, cuda_device):
    arrays = empty_inputs(record, variant, EMPTY_SIZES[which])
    cpu = run_op(record, variant, reduction, arrays, "cpu")
    dev = run_op(record, variant, reduction, arrays, cuda_device)
    assert_same_outcome(cpu, dev, f"{record.name}({variant.id}, {reduction}) on {which}-empty inputs")


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


# ----------------------------------------------------------------------------- fp16/bf16 storage
NATIVE_CASES = [(r, v, red) for r, v, red in R.cases() if r.has_native]
NATIVE_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in NATIVE_CASES]


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(("record", "variant", "reduction"), NATIVE_CASES, ids=NATIVE_IDS)
def test_native_low_precision_storage(record, variant, reduction, low, cuda_device):
    """``genloss.native`` on float16/bfloat16 CUDA tensors runs the storage kernels (load the
    low dtype, compute in float32, accumulate in float64, store the low dtype); genloss.torch
    widens to float32 first, so only this reaches them. Oracle: the reference on the exactly
    widened inputs, value and gradients rounded to the storage dtype. An op whose native
    version has no low-precision CUDA kernel must refuse with an error naming the dtype. The
    compositions of FLOAT32_PATH compute in float32 (on an H200 their float16 storage was 2-7
    ulps off in one gradient entry while they kept intermediates in it): exact here too."""
    check_native_storage(record, variant, reduction, low, cuda_device)


# ----------------------------------------------------------------------------- streams, repeatability
def _torch_step(record, variant, reduction, tensors):
    """(value, gradients of sum(value)) of the torch op: one forward and one backward."""
    out = record.torch(*tensors, **R.call_kwargs(record, variant, reduction))
    value = out if record.value_index is None else out[record.value_index]
    diff = [tensors[record.arg_names.index(n)] for n in record.differentiable]
    if not diff or not value.requires_grad:
        return value, ()
    return value, torch.autograd.grad(value, diff, torch.ones_like(value))


def _cuda_tensors(record, arrays, device):
    out = []
    for a, x in zip(record.args, arrays, strict=True):
        t = torch.from_numpy(np.array(x, copy=True)).to(device)
        t = t.float() if t.is_floating_point() else t
        out.append(t.requires_grad_(True) if a.name in record.differentiable else t)
    return out


@pytest.mark.parametrize(("record", "variant", "reduction"), ALL_CASES, ids=ALL_IDS)
def test_bitwise_repeatable(record, variant, reduction, cuda_device):
    """Two calls on the same inputs give bitwise the same value and gradients (no atomics, a
    fixed reduction tree), on inputs of several chunks."""
    sizes = {**R.ODD_SIZES[0], "B": 37, "Br": 37, "Bl": 37, "Ba": 37, "...": (3, 2731), "...2": (2, 4099)}
    sizes = R.capped(record, sizes)
    arrays = R.make_inputs(record, np.random.default_rng(5), np.float64, sizes, variant)
    ts = _cuda_tensors(record, arrays, cuda_device)
    v1, g1 = _torch_step(record, variant, reduction, ts)
    v2, g2 = _torch_step(record, variant, reduction, ts)
    label = f"{record.name}({variant.id}, {reduction})"
    assert torch.equal(v1, v2), f"{label}: value differs between two calls"
    for n, a, b in zip(record.differentiable, g1, g2, strict=True):
        assert torch.equal(a, b), f"{label} d/d{n}: differs between two calls"


def test_launches_on_the_current_stream(cuda_device):
    """The op runs on torch's current stream: a producer still running on a side stream (a
    sleep, then the copy that writes the input) is waited for, and the result is ready
    when that stream is synchronised. An op launched on another stream would read the
    input before the copy: the stale value 0."""
    n = (1 << 20) + 3
    src = torch.randn(4, n, device=cuda_device)
    y = torch.randn(4, n, device=cuda_device)
    x = torch.zeros(4, n, device=cuda_device, requires_grad=True)
    expect = (src.double() - y.double()).abs().mean()
    s = torch.cuda.Stream(device=cuda_device)
    s.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time on s before the input is written
        with torch.no_grad():
            x.copy_(src)
        value = gt.l1_loss(x, y)
        value.backward()
    s.synchronize()
    torch.testing.assert_close(value.double(), expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, torch.sign(src - y) / src.numel(), rtol=0, atol=0)


def test_check_data_false_makes_bad_values_nan_not_garbage(cuda_device):
    """options(check_data=False) skips the value checks that wait for the GPU. A timestep
    outside the schedule then makes its row NaN (the kernel reads no row past the table) and
    leaves the other rows exact; Bernoulli targets outside [0, 1] make the value NaN. With the
    checks on, both are ValueErrors naming the argument."""
    import genloss.native as gn
    import genloss.reference as gr

    sched = gr.DiffusionSchedule(gr.linear_betas(10))
    g = torch.Generator().manual_seed(0)
    pred, x0, noise = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t_bad = torch.tensor([1, 10, 3])
    args = [a.to(cuda_device) for a in (pred, x0, noise, t_bad)]
    with pytest.raises(ValueError, match="t must lie in"):
        gt.diffusion_mse_loss(*args, sched, "eps", reduction="none")
    with gn.options(check_data=False):
        rows = gt.diffusion_mse_loss(*args, sched, "eps", reduction="none").cpu()
    expect = ((pred - noise) ** 2).mean(dim=1)  # the eps target needs no schedule value
    assert torch.isnan(rows[1]), rows
    torch.testing.assert_close(rows[[0, 2]], expect[[0, 2]], rtol=1e-12, atol=0)
    logits = torch.randn(4, 3, dtype=torch.float64, device=cuda_device)
    targets = torch.full((4, 3), 0.5, dtype=torch.float64, device=cuda_device)
    targets[2, 1] = 1.5
    with pytest.raises(ValueError, match="targets"):
        gt.bernoulli_nll(logits, targets)
    with gn.options(check_data=False):
        assert torch.isnan(gt.bernoulli_nll(logits, targets)).item()


# ---- the engine's kernels on their own (issue 16, items 5 and 7) -------------------------
#
# Each kernel is run through genloss.native._engine (the path every op takes: run_call with
# the inputs' workspace allocator) on the same data on the CPU and on CUDA. row_lse (a warp
# per row), col_sum (row slices combined in a fixed order) and gmm's online log-sum-exp add
# in another order than the CPU, so the comparison uses the "native" tolerance; two CUDA
# calls must agree bit for bit.


def _engine():
    from genloss.native import _engine as E

    return E


def _same_bits(a, b, what):
    """a and b bitwise equal (NaN included)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    ua, ub = a.detach().cpu().contiguous().view(torch.uint8), b.detach().cpu().contiguous().view(torch.uint8)
    assert torch.equal(ua, ub), f"{what}: differs between two CUDA calls"


def _row_lse(logits, mode, labels, index):
    """(value, per-row values, gradient) of one row_lse call on logits' device."""
    E = _engine()
    rows = logits.shape[0]
    out = torch.zeros(1, dtype=logits.dtype, device=logits.device)
    rows_out = torch.zeros(rows, dtype=logits.dtype, device=logits.device)
    grad = torch.zeros_like(logits)
    E.row_lse(
        E.as_input(logits, "logits"), mode=mode, labels=None if labels is None else E.as_input(labels, "labels", integer=True),
        index=index, value_scale=0.5, out=E.as_input(out, "out"), rows_out=E.as_input(rows_out, "rows_out"),
        grad=E.as_input(grad, "grad"), grad_scale=0.5,
    )  # fmt: skip
    return out, rows_out, grad


@pytest.mark.parametrize("K", [1, 2, 31, 32, 33, 1025, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_row_lse_matches_cpu(K, dtype, cuda_device):
    """row_lse (a warp per row, lanes over the row, butterfly max then sum) vs the CPU's one
    row per thread, in every mode, B = 128 rows (IWAE's shape at K = 5000), a NaN row
    included; two CUDA calls bitwise equal."""
    B = 128
    g = torch.Generator().manual_seed(K)
    logits = (torch.randn(B, K, generator=g, dtype=torch.float64) * 4).to(dtype)
    logits[7, K // 2] = float("nan")
    logits[9, :] = -float("inf")
    labels = torch.randint(0, K, (B,), generator=g)
    modes = [(0, labels, 0), (1, None, K - 1), (3, None, 0)] + ([(2, None, 0)] if K >= 2 else [])
    for mode, lab, index in modes:
        cpu = _row_lse(logits, mode, lab, index)
        cuda_in = logits.to(cuda_device)
        cuda_lab = None if lab is None else lab.to(cuda_device)
        got = _row_lse(cuda_in, mode, cuda_lab, index)
        again = _row_lse(cuda_in, mode, cuda_lab, index)
        for name, c, a, b in zip(("value", "rows", "grad"), cpu, got, again, strict=True):
            what = f"row_lse mode {mode} K={K} {name}"
            assert_close(a.cpu(), c, "native", dtype, what)
            _same_bits(a, b, what)


def _col_sum(x):
    E = _engine()
    out = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    E.col_sum(E.as_input(x, "x"), E.as_input(out, "out"), scale=0.25)
    return out


@pytest.mark.parametrize("rows", [1, 255, 100_000])
@pytest.mark.parametrize("cols", [1, 33, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_col_sum_matches_cpu(rows, cols, dtype, cuda_device):
    """col_sum (32 columns x 8 row strides a block, row slices over grid.y, slices combined in
    order) vs the CPU's rows in order; two CUDA calls bitwise equal; no scratch outside the
    caller's allocator."""
    E = _engine()
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    expect = _col_sum(x)
    before = E._C.cuda_scratch_fallbacks()
    xc = x.to(cuda_device)
    got, again = _col_sum(xc), _col_sum(xc)
    assert E._C.cuda_scratch_fallbacks() == before, "col_sum took scratch outside torch's allocator"
    # |sum| may be far below sum |x|: judge against the scale of the terms
    scale = max(1.0, float(x.double().abs().sum(dim=0).max()) * 0.25)
    assert_close(got.cpu(), expect, "native", dtype, f"col_sum rows={rows} cols={cols}", scale=scale)
    _same_bits(got, again, f"col_sum rows={rows} cols={cols}")


def _gmm(x, logits, means, logvars, *, rows=True, resp=False, grads=False):
    """gmm's outputs on x's device: value, [rows], [resp], [grad x, logits, means, logvars]."""
    E = _engine()
    dev, dt = x.device, x.dtype
    outs = {"value": torch.zeros(1, dtype=dt, device=dev)}
    if rows:
        outs["rows"] = torch.zeros(x.shape[0], dtype=dt, device=dev)
    if resp:
        outs["resp"] = torch.zeros(x.shape[0], logits.shape[0], dtype=dt, device=dev)
    if grads:
        for n, a in (
            ("grad_x", x),
            ("grad_logits", logits),
            ("grad_means", means),
            ("grad_logvars", logvars),
        ):
            outs[n] = torch.zeros_like(a)
    b = {k: E.as_input(v, k) for k, v in outs.items()}
    E.gmm(
        E.as_input(x, "x"), E.as_input(logits, "logits"), E.as_input(means, "means"),
        E.as_input(logvars, "logvars"), value_scale=-1.0, out=b["value"], rows_out=b.get("rows"),
        resp=b.get("resp"), grad_scale=-0.5,
        grads=tuple(b.get(n) for n in ("grad_x", "grad_logits", "grad_means", "grad_logvars")),
    )  # fmt: skip
    return outs


def _gmm_inputs(N, K, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * 2
    logits = torch.randn(K, generator=g, dtype=torch.float64)
    means = torch.randn(K, D, generator=g, dtype=torch.float64) * 2
    logvars = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    return [t.to(dtype) for t in (x, logits, means, logvars)]


@pytest.mark.parametrize("N", [1, 1023, 1025, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gmm_with_gradients_matches_cpu(N, dtype, cuda_device):
    """gmm with every output (responsibilities, all four gradients: the chunk partials,
    their totals computed once each, gmm_finish's shared sum) vs the CPU, across the
    1024-point chunk (N = 1025 with a NaN point); two CUDA calls bitwise equal."""
    ins = _gmm_inputs(N, 5, 3, dtype, N)
    if N == 1025:  # a NaN point: its row, responsibilities and every parameter gradient NaN
        ins[0][N // 2, 1] = float("nan")
    expect = _gmm(*ins, resp=True, grads=True)
    cuda_ins = [t.to(cuda_device) for t in ins]
    got = _gmm(*cuda_ins, resp=True, grads=True)
    again = _gmm(*cuda_ins, resp=True, grads=True)
    for k, e in expect.items():
        what = f"gmm N={N} {k}"
        assert_close(got[k].cpu(), e, "native", dtype, what)
        _same_bits(got[k], again[k], what)
    # the value alone (no N x K array) is the same number, bit for bit
    alone = _gmm(*cuda_ins, rows=True)
    _same_bits(alone["value"], got["value"], f"gmm N={N} value-only vs with gradients")
    _same_bits(alone["rows"], got["rows"], f"gmm N={N} rows value-only vs with gradients")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_mmd_tiled_sweeps_match_cpu(dtype, cuda_device):
    """MMD^2 at D = 64, N = 3000, M = 2500: the tiled kernel's sweeps over 44 (float32) or 87
    (float64) tiles, several launches of 4 sweeps, each pair of tiles once with the gradients
    of both (issue 16, item 7). Against the CPU engine, for both gradients, d/dx only and none;
    two calls bitwise equal, and the value's bits the same whichever gradients are asked."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3000, 64, generator=g, dtype=dtype)
    y = torch.randn(2500, 64, generator=g, dtype=dtype) * 0.9 + 0.1
    xc, yc = x.to(cuda_device), y.to(cuda_device)
    kw = {"kernel": "rbf", "bandwidths": (6.0, 12.0), "estimator": "unbiased"}
    v0, (gx0, gy0) = gn.mmd2(x, y, **kw)
    values = []
    for need in ((True, True), (True, False), False):
        v, grads = gn.mmd2(xc, yc, **kw, need_grad=need)
        again, grads2 = gn.mmd2(xc, yc, **kw, need_grad=need)
        v, again = torch.as_tensor(v).reshape(1), torch.as_tensor(again).reshape(1)  # bits: 1-d views
        _same_bits(v, again, f"mmd2 value, need_grad={need}")
        assert_close(
            v.cpu(), torch.as_tensor(v0).reshape(1), "native", dtype, f"mmd2 value, need_grad={need}"
        )
        values.append(v)
        for got, got2, want in zip(grads, grads2, (gx0, gy0), strict=False):
            if got is None:
                continue
            assert_close(got.cpu(), want, "native", dtype, f"mmd2 gradient, need_grad={need}")
            _same_bits(got, got2, f"mmd2 gradient, need_grad={need}")
    for v in values[1:]:
        _same_bits(v, values[0], "mmd2 value with and without gradients")


def test_gmm_value_only_has_no_n_by_k_buffer(cuda_device):
    """A value-only gmm call (N = 2^20, K = 64) allocates no N x K float64 array (512 MiB
    here; 5 GB at N = 1e7): the peak of torch's allocator during the call stays far below it,
    the one workspace comes from torch's allocator (its allocation count moves, the engine's
    cudaMallocAsync fallback count does not), and the value matches the CPU."""
    E = _engine()
    N, K, D = 1 << 20, 64, 4
    ins = _gmm_inputs(N, K, D, torch.float64, 11)
    expect = _gmm(*ins, rows=False)
    cuda_ins = [t.to(cuda_device) for t in ins]
    out = torch.zeros(1, dtype=torch.float64, device=cuda_device)
    bufs = [E.as_input(t, n) for t, n in zip(cuda_ins, ("x", "logits", "means", "logvars"), strict=True)]
    torch.cuda.synchronize(cuda_device)
    torch.cuda.reset_peak_memory_stats(cuda_device)
    base = torch.cuda.memory_allocated(cuda_device)
    allocs = torch.cuda.memory_stats(cuda_device)["allocation.all.allocated"]
    fallbacks = E._C.cuda_scratch_fallbacks()
    E.gmm(*bufs, value_scale=-1.0, out=E.as_input(out, "out"))
    torch.cuda.synchronize(cuda_device)
    peak = torch.cuda.max_memory_allocated(cuda_device) - base
    assert E._C.cuda_scratch_fallbacks() == fallbacks, "gmm took scratch outside torch's allocator"
    assert torch.cuda.memory_stats(cuda_device)["allocation.all.allocated"] > allocs, (
        "no allocation seen in torch's allocator: where did gmm's scratch come from?"
    )
    nk = N * K * 8
    assert peak < nk // 16, f"gmm value-only peaked at {peak} bytes; an N x K float64 array is {nk}"
    assert_close(out.cpu(), expect["value"], "native", torch.float64, "gmm value N=2^20 K=64")


def test_scratch_comes_from_torch_and_capture_replays(cuda_device):
    """The kinds that take scratch (map_reduce through an op, row_lse, col_sum with row
    slices, gmm) take it from torch's caching allocator: the engine's cudaMallocAsync
    fallback count does not move, eager or under CUDA graph capture (where torch allocates
    from the graph's private pool), and a replay on new inputs equals the eager result."""
    E = _engine()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(128, 700, generator=g, dtype=torch.float64).to(cuda_device)
    x = torch.randn(5000, 7, generator=g, dtype=torch.float64).to(cuda_device)
    gins = [t.to(cuda_device) for t in _gmm_inputs(3000, 6, 2, torch.float64, 4)]
    a = torch.randn(300, 40, generator=g, dtype=torch.float64).to(cuda_device)
    b = torch.randn(300, 40, generator=g, dtype=torch.float64).to(cuda_device)

    def step():
        v1 = _row_lse(logits, 3, None, 0)
        v2 = _col_sum(x)
        v3 = _gmm(*gins, resp=True, grads=True)
        v4 = gt.l1_loss(a, b)
        return [*v1, v2, *v3.values(), v4]

    before = E._C.cuda_scratch_fallbacks()
    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    assert E._C.cuda_scratch_fallbacks() == before, "scratch outside torch's allocator"
    with torch.no_grad():
        for t in (logits, x, a, b, *gins):
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(cuda_device))
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    eager = step()
    for i, (c, e) in enumerate(zip(captured[:-1], eager[:-1], strict=True)):
        _same_bits(c, e, f"engine output {i}: replay vs eager")  # the same kernels on the same data
    assert_close(captured[-1].cpu(), eager[-1].cpu(), "cuda", torch.float64, "l1_loss replayed")


def test_family_kernels_take_scratch_from_torch(cuda_device):
    """The kinds whose scratch depends on their launcher's path (mmd, vector_quantize,
    vq_ema_update, lfq_entropy, knn_prdc, sinkhorn, assignment: no size function) ask
    torch's allocator for each block they need (plan.cpp more_scratch): the engine's
    cudaMallocAsync fallback count does not move while every one of them runs, forward and
    backward, and torch's allocator sees the blocks."""
    E = _engine()
    g = torch.Generator(device=cuda_device).manual_seed(4)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, device=cuda_device, generator=g, dtype=dtype).requires_grad_(grad)

    z, book = randn(500, 8, grad=True), randn(300, 8, grad=True)
    steps = {
        "mmd2": lambda: gt.mmd2(randn(300, 9, grad=True), randn(200, 9, grad=True)).backward(),
        "vector_quantize": lambda: sum(v.sum() for v in gt.vector_quantize(z, book) if v.is_floating_point()).backward(),
        "vq_ema_update": lambda: gt.vq_ema_update(
            z.detach(), torch.arange(500, device=cuda_device) % 300, torch.ones(300, device=cuda_device),
            book.detach().clone(),
        ),
        "lfq_entropy_loss": lambda: gt.lfq_entropy_loss(randn(200, 10, grad=True)).backward(),
        "prdc": lambda: gt.prdc(randn(400, 6), randn(300, 6), 4),
        "ot_coupling": lambda: gt.ot_coupling(randn(64, 3), randn(64, 3)),
        "sinkhorn_divergence": lambda: gt.sinkhorn_divergence(
            randn(80, 2, dtype=torch.float64, grad=True), randn(70, 2, dtype=torch.float64), 0.5
        ).backward(),
    }  # fmt: skip
    for name, step in steps.items():
        before = E._C.cuda_scratch_fallbacks()
        allocs = torch.cuda.memory_stats(cuda_device)["allocation.all.allocated"]
        step()
        torch.cuda.synchronize(cuda_device)
        assert E._C.cuda_scratch_fallbacks() == before, f"{name}: scratch outside torch's allocator"
        assert torch.cuda.memory_stats(cuda_device)["allocation.all.allocated"] > allocs, name
