"""float16/bfloat16 storage of ``genloss.native`` on the CPU.

* The elementwise engine (``map_reduce``) stores them: it loads them, computes in float32
  and stores value and gradients in the storage dtype (cpp/src/cpu_half.h), as the CUDA
  storage kernels do. Every native op runs on float16 and bfloat16 CPU tensors against the
  reference on the exactly widened inputs, rounded to the storage dtype; an op that also needs
  another kernel refuses with a TypeError naming the dtype.
* Four compositions hand an intermediate from one engine call to the next (FLOAT32_PATH): on
  any float16/bfloat16 input they run on float32 copies and round only their results
  (``genloss.native._compose.computed_in_float32``); tests/test_cuda.py runs the same check on
  CUDA tensors.
* The conversions float32 <-> float16/bfloat16 of the engine agree with torch's on every
  16-bit pattern and around every rounding boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("genloss._C")

import genloss.native as gn  # noqa: E402
from genloss import registry as R  # noqa: E402
from genloss.native import _compose, diffusion, flow, gan  # noqa: E402
from genloss.native import _engine as E  # noqa: E402
from isa_builds import ISAS, run_under_isa  # noqa: E402
from native_storage import FLOAT32_PATH, LOW, check_native_storage  # noqa: E402

NATIVE_CASES = [(r, v, red) for r, v, red in R.cases() if r.has_native]
NATIVE_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in NATIVE_CASES]
PATH_CASES = [(r, v, red) for r, v, red in NATIVE_CASES if r.name in FLOAT32_PATH]
PATH_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in PATH_CASES]


def test_every_float32_path_op_has_cases():
    assert {r.name for r, _, _ in PATH_CASES} == set(FLOAT32_PATH)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(("record", "variant", "reduction"), NATIVE_CASES, ids=NATIVE_IDS)
def test_native_low_precision_storage_cpu(record, variant, reduction, low):
    check_native_storage(record, variant, reduction, low, "cpu")


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(("record", "variant", "reduction"), PATH_CASES, ids=PATH_IDS)
def test_float32_path_is_taken(record, variant, reduction, low, monkeypatch):
    """The four compositions run on float32 copies (computed_in_float32), never an engine call on
    16-bit data."""
    seen = []

    def spy(call, arrays):
        seen.append([getattr(a, "dtype", None) for a in arrays])
        return real(call, arrays)

    real = _compose.computed_in_float32
    dtypes = []
    run_call = E.run_call

    def calls(**kw):
        dtypes.append(kw.get("dtype"))
        return run_call(**kw)

    for m in (gan, flow, diffusion):
        monkeypatch.setattr(m, "computed_in_float32", spy)
    for m in (E, _compose):
        monkeypatch.setattr(m, "run_call", calls)
    _compose.PLANS.clear()  # (a cached plan would run its Calls in C++, past the spy)
    check_native_storage(record, variant, reduction, low, "cpu", may_refuse=False)
    assert len(seen) == 1, seen
    assert dtypes and E.FLOAT16 not in dtypes and E.BFLOAT16 not in dtypes, dtypes


@pytest.mark.parametrize("name", FLOAT32_PATH)
def test_mixed_dtypes_take_the_ops_own_path(name):
    """A call whose inputs mix float16 and float32 is not widened into agreement: the op's own
    checks refuse it (ops with two or more floating inputs)."""
    record = R.by_name(name)
    variant = record.variants[0]
    arrays = R.make_inputs(record, np.random.default_rng(0), np.float64, R.ODD_SIZES[0], variant)
    ts = [torch.from_numpy(a.copy()) for a in arrays]
    kwargs = R.call_kwargs(record, variant, "mean" if "mean" in record.reductions else None)
    floats = [i for i, t in enumerate(ts) if t.is_floating_point()]
    if len(floats) < 2:
        pytest.skip("one floating input: nothing to mix")
    mixed = [t.half() if t.is_floating_point() else t for t in ts]
    mixed[floats[-1]] = ts[floats[-1]].float()
    with pytest.raises((TypeError, ValueError)):
        record.native(*mixed, **kwargs)


def test_other_kernels_refuse_16_bit_cpu_inputs():
    """An op that needs a kernel other than the elementwise one refuses float16 CPU inputs with a
    TypeError that names the op and the dtype (iwae_bound: the row log-sum-exp)."""
    with pytest.raises(TypeError, match=r"^iwae_bound: float16/bfloat16 inputs on the CPU .* row_lse"):
        gn.iwae_bound(torch.randn(4, 5).half())


def _bits(t):
    return t.view(torch.int16).numpy().astype(np.uint16)


@pytest.mark.parametrize("low", LOW)
def test_conversions_match_torch(low):
    """cpu_half.h's widen (every 16-bit pattern) and narrow (float32 values on and around every
    rounding boundary, subnormals, overflow, infinities, NaN) against torch's conversions, bit
    for bit (NaN: a NaN), through engine calls (_roundtrip_to_f32, _narrow). The avx2 and
    avx512 builds convert a vector at a time (cpu_kernels.cpp, widen_block), the sse2 build an
    element at a time: test_every_isa_build_converts_and_computes_as_float32 runs this on each."""
    check_conversions(low)


def check_conversions(low):
    dt = getattr(torch, low)
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dt)
    wide = _roundtrip_to_f32(every)
    exp = every.float()
    nan = torch.isnan(exp)
    assert torch.equal(torch.isnan(wide), nan)
    assert torch.equal(wide[~nan], exp[~nan])  # (== : -0.0 and +0.0 compare equal; see _roundtrip_to_f32)
    nonzero = ~nan & (exp != 0)
    assert torch.equal(wide[nonzero].view(torch.int32), exp[nonzero].view(torch.int32))
    # narrow: each representable value, and the points between neighbours (ties) and just off them
    f = every[~nan].float().double()
    f = f[torch.isfinite(f)].sort().values
    mids = (f[1:] + f[:-1]) / 2
    cand = torch.cat([f, mids, mids.nextafter(torch.tensor(np.inf)), mids.nextafter(torch.tensor(-np.inf))])
    cand = torch.cat([cand, torch.tensor([np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-45, -1e-45, 0.0, -0.0])])
    x32 = cand.float()  # float32 inputs (the mids of 16-bit neighbours are exact in float32)
    got = _narrow(x32, dt)
    expect = x32.to(dt)
    gn_, en = torch.isnan(got.float()), torch.isnan(expect.float())
    assert torch.equal(gn_, en)  # (a NaN's sign and payload are not specified)
    assert np.array_equal(_bits(got[~gn_]), _bits(expect[~en]))


# Ops whose 16-bit native call is one map_reduce (the block loop of cpu_kernels.cpp's chunk):
# (name, the call on inputs (x, y, z, t)).
ONE_CALL = [
    ("l1_loss", lambda x, y, z, t, red: gn.l1_loss(x, y, reduction=red)),
    ("eps_mse_loss", lambda x, y, z, t, red: gn.eps_mse_loss(x, y, reduction=red)),
    ("flow_matching_loss", lambda x, y, z, t, red: gn.flow_matching_loss(x, y, z, t, reduction=red)),
]


@pytest.mark.parametrize("low", LOW)
def test_16bit_calls_are_the_float32_call_rounded(low):
    """A float16/bfloat16 call computes in float32 from the widened inputs (whole 16-element
    blocks, a partial one, a row shorter than one), so it is the float32 call on the widened
    inputs with its results rounded once: bit for bit, value and gradients."""
    check_float32_rounded(low)


def check_float32_rounded(low):
    dt = getattr(torch, low)
    g = torch.Generator().manual_seed(7)
    for shape in [(3, 16 * 37 + 5), (5, 7), (2, 4096 * 3 + 17)]:
        x, y, z = (torch.randn(*shape, generator=g).to(dt) for _ in range(3))
        x[0, :3] = torch.tensor([0.0, -0.0, 1e-7]).to(dt)  # signed zeros and a subnormal (float16)
        t = torch.rand(shape[0], generator=g).to(dt)
        for name, call in ONE_CALL:
            for red in ("mean", "none"):
                v16, g16 = call(x, y, z, t, red)
                v32, g32 = call(x.float(), y.float(), z.float(), t.float(), red)
                label = f"{name}({low}, {shape}, {red})"
                assert v16.dtype == dt and torch.equal(v16.view(torch.int16), v32.to(dt).view(torch.int16)), (
                    label
                )
                for a, b in zip(g16, g32, strict=True):
                    assert a.dtype == dt and torch.equal(a.view(torch.int16), b.to(dt).view(torch.int16)), (
                        label
                    )


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_build_converts_and_computes_as_float32(isa):
    """The conversion and the float32-rounded checks above under each instruction-set build
    (the sse2 build converts element by element, avx2 and avx512 a vector at a time)."""
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import genloss.native as gn, test_low_storage as T\n"
        "for low in T.LOW:\n"
        "    T.check_conversions(low)\n"
        "    T.check_float32_rounded(low)\n"
        "print(json.dumps({'isa': gn.options()['isa']['running']}))\n"
    )
    run_under_isa(isa, script)


def _roundtrip_to_f32(x16):
    """x16's values widened by the engine: the float32 per-row sums of one element each (a 16-bit
    call under float32_values; a sum starts at +0, so -0.0 comes back as +0.0)."""
    rows = E.as_input(x16.reshape(-1, 1).contiguous(), "x")
    out = E.empty(rows, (rows.rows,), f32=True)
    E.map_reduce("Linear", rows, rows_out=out, params={})
    return out.arr


def _narrow(x32, dt):
    """x32 narrowed by the engine: the elementwise values of ``RowAffine`` (v = a x + b y per row)
    with x = 1, y = -0 and the row table (a, b) = (x32, 0), written in the storage dtype; a 1 + 0 (-0)
    is a exactly, in float32, signed zeros and NaN included."""
    n = x32.numel()
    ones = torch.ones(n, 1, dtype=dt)
    negz = torch.full((n, 1), -0.0, dtype=dt)
    tab = torch.stack([x32.double(), torch.zeros(n, dtype=torch.float64)], 1).contiguous()
    out = torch.empty(n, 1, dtype=dt)
    E.map_reduce(
        "RowAffine", E.as_input(ones, "x"), y=E.as_input(negz, "y"), table=E.as_input(tab, "table"), stride=2,
        elems_out=E.as_input(out, "out"), params={},
    )  # fmt: skip
    return out.reshape(-1)


# ----------------------------------------------------------------------------- genloss.torch
def _kernel_dtypes(monkeypatch):
    """The dtype codes of the engine Calls made while the returned list is live."""
    seen = []
    run_call = E.run_call

    def calls(**kw):
        seen.append(kw.get("dtype"))
        return run_call(**kw)

    for m in (E, _compose):
        monkeypatch.setattr(m, "run_call", calls)
    _compose.PLANS.clear()
    return seen


def _pair(dtype, seed=0, shape=(6, 4, 33)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)
    y = torch.randn(*shape, generator=g).to(dtype)
    return x, y


def test_bfloat16_goes_to_the_kernels_as_it_is(monkeypatch):
    """An eager bfloat16 call runs the 16-bit kernels (no float32 copies) and gives the float32
    path's value and gradients bit for bit: the same float32 arithmetic on the same (exactly
    widened) values, the gradient rounded once (loss.backward(): upstream gradient 1)."""
    gt = pytest.importorskip("genloss.torch")
    x, y = _pair(torch.bfloat16)
    seen = _kernel_dtypes(monkeypatch)
    t = torch.rand(x.shape[0]).to(torch.bfloat16)
    v = gt.flow_matching_loss(x, y, y.flip(0), t)
    v.backward()
    assert seen and set(seen) == {E.BFLOAT16}, seen
    assert v.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_(True)
    v32 = gt.flow_matching_loss(x32, y.float(), y.flip(0).float(), t.float())
    v32.backward()
    assert torch.equal(v, v32)
    assert torch.equal(x.grad, x32.grad.to(torch.bfloat16))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "widened"])
def test_bfloat16_gradients_are_handed_over_only_when_in_the_inputs_dtype(monkeypatch, direct):
    """loss.backward() on a direct bfloat16 call hands the kernel's bfloat16 gradient over as it
    is (no multiply, no conversion pass); the widened path's float32 gradient still goes through
    the conversion. Both give the float32 path's gradient rounded once."""
    gt = pytest.importorskip("genloss.torch")
    from genloss.torch._op import _LIVE

    op = _LIVE["eps_mse_loss"]
    monkeypatch.setattr(op, "bf16_direct", direct)
    finished = []
    real = op.finish_backward
    monkeypatch.setattr(op, "finish_backward", lambda *a: finished.append(1) or real(*a))
    x, y = _pair(torch.bfloat16, seed=2)
    gt.eps_mse_loss(x, y).backward()
    assert (len(finished) == 0) == direct, finished
    x32 = x.detach().float().requires_grad_(True)
    gt.eps_mse_loss(x32, y.float()).backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, x32.grad.to(torch.bfloat16))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_direct_call_scales_by_the_upstream_gradient(reduction):
    """A non-unit upstream gradient multiplies the 16-bit gradient (rounded twice: within one
    bfloat16 ulp of the float32 path's)."""
    gt = pytest.importorskip("genloss.torch")
    x, y = _pair(torch.bfloat16, seed=1)
    v = gt.l1_loss(x, y, reduction=reduction)
    up = torch.linspace(0.3, 2.7, v.numel()).reshape(v.shape)
    v.backward(up)
    x32 = x.detach().float().requires_grad_(True)
    gt.l1_loss(x32, y.float(), reduction=reduction).backward(up)
    torch.testing.assert_close(x.grad.float(), x32.grad.to(torch.bfloat16).float(), rtol=2**-7, atol=0)


def test_an_op_whose_value_kernel_has_no_float32_output_falls_back_once(monkeypatch):
    """iwae_bound's value comes from the row log-sum-exp, which writes the inputs' dtype only: the
    first bfloat16 call is refused by that kernel and computed in float32 instead, and later calls
    go to the float32 copies directly (the op is not tried again)."""
    gt = pytest.importorskip("genloss.torch")
    from genloss.torch._op import _LIVE

    op = _LIVE["iwae_bound"]
    monkeypatch.setattr(op, "bf16_direct", True)
    lw = torch.randn(5, 7).to(torch.bfloat16).requires_grad_(True)
    seen = _kernel_dtypes(monkeypatch)
    v = gt.iwae_bound(lw)
    assert op.bf16_direct is False
    assert v.dtype == torch.float32
    ref = gt.iwae_bound(lw.detach().float())
    assert torch.equal(v, ref)
    seen.clear()
    _compose.PLANS.clear()
    gt.iwae_bound(lw).backward()
    assert seen and E.BFLOAT16 not in seen, seen
    assert lw.grad.dtype == torch.bfloat16


def test_a_user_error_is_raised_and_the_op_stays_direct(monkeypatch):
    """A bad argument raises its own error on a bfloat16 call, and does not turn the op's
    bfloat16 path off (only a kernel's refusal does)."""
    gt = pytest.importorskip("genloss.torch")
    from genloss.torch._op import _LIVE

    op = _LIVE["l1_loss"]
    monkeypatch.setattr(op, "bf16_direct", True)
    x, _ = _pair(torch.bfloat16)
    with pytest.raises((TypeError, ValueError), match="l1_loss"):
        gt.l1_loss(x, torch.zeros(3, dtype=torch.bfloat16))
    assert op.bf16_direct is True


def test_float16_gradients_are_scaled_before_rounding():
    """float16 keeps the float32 path: its gradients are multiplied by the upstream gradient (a
    loss scale, as torch.amp.GradScaler's) in float32 and rounded once, so gradients below
    float16's range survive the scale. Rounded to 16 bits first they would flush to 0."""
    gt = pytest.importorskip("genloss.torch")
    x = torch.ones(1 << 12, 1 << 13, dtype=torch.float16, requires_grad=True)
    y = torch.zeros(1 << 12, 1 << 13, dtype=torch.float16)
    v = gt.l1_loss(x, y)  # d/dx = 1 / numel = 2^-25: half float16's smallest subnormal
    v.backward(torch.tensor(2.0**16))  # the loss scale: the scaled gradient is 2^-9
    assert torch.all(x.grad == 2.0**-9), x.grad.unique()
