r"""The CUDA engine's kernels (cuda/*.cu), run on the host emulator (cuda/emulator/), against
the float64 reference and the CPU engine: the checks a GPU run would make of the kernels'
logic (indexing, chunking, the reduction trees, warp shuffles, barriers, 16-bit storage),
on every machine, without a GPU.

A build with ``-Ccmake.define.GENLOSS_CUDA_EMULATOR=ON`` compiles the .cu sources a second
time with the host compiler, in a namespace of their own; ``_C.cuda_emulator(True)`` then
routes every CPU call of the engine (plan.cpp run_one and the plan cache's replays) to those
kernels. The native compositions run unchanged on CPU arrays, so every registry case reaches
the CUDA kernels exactly as a CUDA tensor would (the same Calls; only the Python glue that
differs by device, such as the workspace from torch's allocator, is not exercised).

* every native record, variant and reduction, float32 and float64, on the registry's odd
  shapes (B = 1, trailing (3, 2, 5), two populations 41 / 13): value and every gradient equal
  the reference, and in float64 equal the CPU engine to 1e-11 (the kernels' math is the
  functors', shared with the CPU engine; only the summation order and libm differ);
* rows longer than a chunk (4,099 elements): the multi-chunk combine, the per-row segment
  sums and, in float32, the batched-load path of whole chunks;
* float16 and bfloat16 storage: the kernels that load, widen, accumulate and round 16-bit
  data (the same oracle as tests/test_cuda.py's storage test);
* a float16/bfloat16 call's float32 value (``float32_values``: finalize<S, float>);
* MMD's tiled kernel on several tiles, col_sum over several row slices, row_lse on rows
  wider than a warp, row_map over a partial last block;
* vector_quantize's expansion filter and float64 recheck: the CPU's indices bit for bit
  (near ties, exact ties, NaN rows and codes, values near the float range);
* empty inputs (an empty batch, empty trailing dims) and 40 chunks through genloss.torch, as
  tests/test_cuda.py checks them on a GPU;
* the kernels no registry case reaches: vq_ema_update, lfq_entropy_loss, prdc's k-NN, the exact
  coupling and Sinkhorn;
* no plan cache entry is recorded while emulating;
* the emulator itself: its launches are counted, so each test above asserts that the CUDA
  kernels really ran (a change to a kernel's indexing or to block_sum's shuffle offsets made
  over a thousand of these cases fail when it was tried).

What the emulator cannot show (races, memory ordering, speed, the GPU's own libm and FMA
contraction) is left to bench/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import genloss
from genloss import registry as R
from strategies import seed_of
from tolerances import value_scale

torch = pytest.importorskip("torch")
_C = pytest.importorskip("genloss._C")
if not genloss.build_info().get("cuda_emulator"):
    pytest.skip(
        "genloss was built without the CUDA emulator (-Ccmake.define.GENLOSS_CUDA_EMULATOR=ON)",
        allow_module_level=True,
    )

import genloss.native as gn  # noqa: E402
import genloss.torch as gt  # noqa: E402
from native_storage import LOW, check_native_storage  # noqa: E402
from test_cuda import EMPTY_CASES, EMPTY_IDS, EMPTY_SIZES, assert_same_outcome, empty_inputs, run_op  # noqa: E402
from test_native import LONG, check_against_reference  # noqa: E402

NATIVE_CASES = list(R.cases(tuple(r for r in R.RECORDS if r.has_native)))
CASE_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in NATIVE_CASES]
# each record's first case (its record specialised to that variant), for the larger inputs
FIRST_CASES = list({r.name: (r, v, red) for r, v, red in reversed(NATIVE_CASES)}.values())[::-1]
FIRST_IDS = [r.name for r, _, _ in FIRST_CASES]


@contextlib.contextmanager
def emulated(expect_launches: bool = True):
    """Every engine call in the block runs on the emulated CUDA kernels; asserts some did."""
    before = _C.cuda_emulator_launches()
    previous = _C.cuda_emulator(True)
    try:
        yield
    finally:
        _C.cuda_emulator(previous)
    assert not expect_launches or _C.cuda_emulator_launches() > before, "no kernel ran on the emulator"


def _close_to_cpu(record, variant, reduction, inputs, got):
    """The emulated (value, grads) against the CPU engine's on the same float64 inputs."""
    kwargs = R.call_kwargs(record, variant, reduction)
    value, grads = record.native(*inputs, **kwargs)
    label = f"{record.name}({variant.id}, {reduction})"
    pairs = [("value", got[0], value)] + [
        (f"d/d{n}", a, b) for n, a, b in zip(record.differentiable, got[1], grads, strict=True)
    ]
    for what, a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = value_scale(inputs, reduction, b)
        bad = ~(np.abs(a - b) <= 1e-11 * (scale + np.abs(b))) & ~(np.isnan(a) & np.isnan(b))
        bad &= ~((a == b) & np.isinf(b))
        assert not bad.any(), f"{label} {what}: emulated CUDA {a[bad][:3]} vs CPU engine {b[bad][:3]}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("record", "variant", "reduction"), NATIVE_CASES, ids=CASE_IDS)
def test_emulated_kernels_match_reference(record, variant, reduction, dtype):
    kwargs = R.call_kwargs(record, variant, reduction)
    for i, sizes in enumerate(R.ODD_SIZES):
        inputs = R.make_inputs(record, np.random.default_rng(seed_of(record.name, i)), dtype, sizes, variant)
        with emulated():
            got = record.native(*inputs, **kwargs)
        check_against_reference(
            record, variant, reduction, inputs, dtype, what=" [emulated CUDA]", values=got
        )
        if dtype == np.float64:
            _close_to_cpu(record, variant, reduction, inputs, got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("record", "variant", "reduction"), FIRST_CASES, ids=FIRST_IDS)
def test_emulated_kernels_on_long_rows(record, variant, reduction, dtype):
    sizes = R.capped(record, LONG)
    inputs = R.make_inputs(record, np.random.default_rng(seed_of(record.name, "long")), dtype, sizes, variant)
    with emulated():
        got = record.native(*inputs, **R.call_kwargs(record, variant, reduction))
    check_against_reference(
        record, variant, reduction, inputs, dtype, what=" [emulated CUDA, long]", values=got
    )


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(("record", "variant", "reduction"), FIRST_CASES, ids=FIRST_IDS)
def test_emulated_16bit_storage(record, variant, reduction, low):
    with emulated():
        check_native_storage(record, variant, reduction, low, "cpu")


def test_mmd_tiled_kernel_over_several_tiles():
    """N = 300, M = 287, D = 64: the centred tiled path with several tiles of each population
    and ragged last tiles, value and both gradients, against the CPU engine (to 1e-11 in
    float64, 2e-4 in float32: the two engines sum in different orders)."""
    rng = np.random.default_rng(3)
    for dtype in (np.float64, np.float32):
        x = rng.standard_normal((300, 64)).astype(dtype)
        y = (rng.standard_normal((287, 64)) + 0.3).astype(dtype)
        with emulated():
            v, (gx, gy) = gn.mmd2(x, y, kernel="rbf", bandwidths=(4.0, 8.0))
        v0, (gx0, gy0) = gn.mmd2(x, y, kernel="rbf", bandwidths=(4.0, 8.0))
        tol = 1e-11 if dtype == np.float64 else 2e-4
        for a, b in ((v, v0), (gx, gx0), (gy, gy0)):
            np.testing.assert_allclose(np.float64(a), np.float64(b), rtol=tol, atol=tol * np.abs(b).max())


# (N, M, D, dtype): the tiles are 64 points in float64, 128 in float32. T tiles give T // 2 + 1
# sweeps, run 4 per launch with gradients: odd and even T (the half sweep at offset T / 2),
# one and two launches, a population smaller than a tile, D off the slice widths.
SWEEP_SIZES = [
    (300, 260, 19, np.float64),  # T = 5 + 5 = 10: 6 sweeps, two launches, the half sweep
    (200, 137, 33, np.float64),  # T = 4 + 3 = 7: 4 sweeps, one launch
    (40, 300, 8, np.float64),  # T = 1 + 5 = 6: x smaller than a tile, the wrap-around of y onto x
    (700, 520, 21, np.float32),  # T = 6 + 5 = 11: 6 sweeps, two launches
    # D <= 4 (rows_small: one thread per point, 128 per block, tiles of 32 other points): a
    # block straddling x and y, tiles skipped below the block's rows and across populations
    (300, 260, 3, np.float64),
    (150, 333, 1, np.float32),
]


@pytest.mark.parametrize("kernel", ["rbf", "imq", "energy", "polynomial"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize(("n", "m", "d", "dtype"), SWEEP_SIZES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_mmd_kernels_evaluate_pairs_once(n, m, d, dtype, kernel, estimator):
    """The tiled kernel (D > 4) visits each unordered pair of tiles once (issue 16, item 7):
    the same-side pairs and, with both gradients, the cross pairs feed the gradients of both
    their points; the small-D kernel skips the tiles no requested output needs. Against the
    CPU engine (its own tile list and order) for every choice of gradients: value and the
    requested gradients to 1e-11 in float64 (2e-4 in float32), the gradients not requested
    absent, and the value's bits the same whichever are requested (each row's sums keep one
    order)."""
    rng = np.random.default_rng(seed_of(kernel, estimator, n, m))
    x = rng.standard_normal((n, d)).astype(dtype)
    y = (0.8 * rng.standard_normal((m, d)) + 0.2).astype(dtype)
    x[3] = x[1]  # coincident points: the exact re-evaluation of near pairs (energy: w = 0)
    kw = {"kernel": kernel, "estimator": estimator}
    if kernel in ("rbf", "imq"):
        kw["bandwidths"] = (2.0, 5.0)
    v0, (gx0, gy0) = gn.mmd2(x, y, **kw)
    tol = 1e-11 if dtype == np.float64 else 2e-4
    values = []
    for need in ((True, True), (True, False), (False, True), False):
        with emulated():
            v, grads = gn.mmd2(x, y, **kw, need_grad=need)
        values.append(np.float64(v))
        np.testing.assert_allclose(
            np.float64(v), np.float64(v0), rtol=tol, err_msg=f"value, need_grad={need}"
        )
        if need is False:
            assert grads == (), f"gradients returned though need_grad=False: {grads}"
            continue
        for name, g, g0, want in (("x", grads[0], gx0, need[0]), ("y", grads[1], gy0, need[1])):
            if not want:
                assert g is None, f"d/d{name} returned though need_grad={need}"
                continue
            scale = np.abs(g0).max()
            np.testing.assert_allclose(
                np.float64(g),
                np.float64(g0),
                rtol=tol,
                atol=tol * scale,
                err_msg=f"d/d{name}, need_grad={need}",
            )
    assert all(v == values[0] for v in values), (
        f"the value's bits depend on the gradients requested: {values}"
    )


def test_col_sum_and_row_lse_over_slices_and_lanes():
    """feature_matching_loss's column means over 3000 rows (several row slices, then their
    combine) and iwae_bound's log-sum-exp over rows of 1000 weights (32 lanes each, xor
    butterflies): against the reference's float64 value and gradients."""
    rng = np.random.default_rng(4)
    rf, ff = rng.standard_normal((3000, 40)), rng.standard_normal((2500, 40))
    with emulated():
        v, (gr, gf) = gn.feature_matching_loss(rf, ff)
    d = rf.mean(0) - ff.mean(0)
    np.testing.assert_allclose(v, np.sum(d**2), rtol=1e-12)  # ||mean f_r - mean f_f||^2 (GAN.14)
    np.testing.assert_allclose(gr, np.broadcast_to(2 * d / len(rf), rf.shape), rtol=1e-10)
    np.testing.assert_allclose(gf, np.broadcast_to(-2 * d / len(ff), ff.shape), rtol=1e-10)
    lw = rng.standard_normal((7, 1000)) * 3
    with emulated():
        v, (g,) = gn.iwae_bound(lw)
    m = lw.max(1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(lw - m).sum(1))) - np.log(lw.shape[1])
    np.testing.assert_allclose(v, lse.mean(), rtol=1e-12)
    w = np.exp(lw - m)
    np.testing.assert_allclose(g, w / w.sum(1, keepdims=True) / len(lw), rtol=1e-10, atol=1e-16)


def test_row_map_writes_every_row_of_a_partial_last_block():
    """row_map over 1,000 rows (one thread per row: three whole blocks of 256 and a partial
    one) writes every row's table entries as the CPU loop does (the same float64 functor), in
    exactly one emulated launch. Bit equality holds here because the emulator compiles the
    functor without contraction, as the CPU does; on a GPU, ptxas may fuse 1 - a t into an FMA
    (one rounding fewer, 134 of these 1,000 rows differ by an ulp), so the GPU tests
    (test_torch_ops.py's test_cuda_matches_reference_and_cpu) compare within rounding."""
    from genloss.native import _engine as E

    t = E.as_input(np.linspace(0.05, 0.95, 1000), "t")
    tables = []
    for on in (False, True):
        table = E.empty(t, (1000, 2))
        before = _C.cuda_emulator_launches()
        previous = _C.cuda_emulator(on)
        try:
            E.row_map("InterpolantRows", [t], table=table, params={"x0_coef": 0.75, "velocity": 0})
        finally:
            _C.cuda_emulator(previous)
        assert _C.cuda_emulator_launches() == before + on
        tables.append(np.asarray(table.arr))
    np.testing.assert_array_equal(tables[1], tables[0])
    np.testing.assert_array_equal(tables[1], np.stack([1 - 0.75 * t.arr, t.arr], axis=1))


def test_no_plan_is_recorded_while_emulating():
    """A composition run while emulating records no plan (its Calls may hold 16-bit data that
    only the CUDA kernels take): after an emulated bfloat16 call of gmm_responsibilities on CPU
    tensors, the same call with the emulator off still refuses bfloat16 (the CPU engine has no
    16-bit gmm kernel) instead of replaying the emulated Calls."""
    from genloss.native import _compose

    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((9, 3))).bfloat16()
    means = torch.from_numpy(rng.standard_normal((4, 3))).bfloat16()
    logvars = torch.zeros(4, 3).bfloat16()
    logits = torch.zeros(4).bfloat16()
    plans = len(_compose.PLANS)
    with emulated():
        for _ in range(2):
            r = gn.gmm_responsibilities(x, logits, means, logvars)
    assert len(_compose.PLANS) == plans
    assert r.dtype == torch.bfloat16 and torch.allclose(r.float().sum(1), torch.ones(9), atol=1e-2)
    with pytest.raises(TypeError, match="bfloat16"):
        gn.gmm_responsibilities(x, logits, means, logvars)


def _vq_emulated_equals_cpu(z, e, what, beta=0.25):
    """vector_quantize's CUDA kernels (the expansion filter and the float64 recheck) against the
    CPU engine's on the same inputs: the same indices and z_q bit for bit (both are the float64
    brute-force argmin, ties to the lowest index), the losses within rounding of the two sums'
    orders, and the float64 brute force itself."""
    zt, et = torch.from_numpy(z), torch.from_numpy(e)
    (zq, idx, c, b), (gz, ge) = gn.vector_quantize(zt, et, beta)
    with emulated():
        (zq2, idx2, c2, b2), (gz2, ge2) = gn.vector_quantize(zt, et, beta)
    bad = np.flatnonzero(idx.numpy() != idx2.numpy())
    assert bad.size == 0, (
        f"{what}: rows {bad[:5].tolist()}: CPU {idx.numpy()[bad[:5]]}, CUDA {idx2.numpy()[bad[:5]]}"
    )
    d = ((z.astype(np.float64)[:, None, :] - e.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    finite = np.isfinite(z).all(1)
    d[np.isnan(d)] = np.inf  # a NaN code is never chosen while another has a number (np.argmin would)
    np.testing.assert_array_equal(idx2.numpy()[finite], np.argmin(d, axis=1)[finite], err_msg=what)
    assert torch.equal(zq, zq2), f"{what}: z_q"
    for name, a, w in (
        ("commitment", c2, c),
        ("codebook", b2, b),
        ("grad_z", gz2, gz),
        ("grad_codebook", ge2, ge),
    ):
        np.testing.assert_allclose(
            a.double().numpy(), w.double().numpy(), rtol=1e-6, atol=0, err_msg=f"{what} {name}"
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_vector_quantize_filter_equals_cpu(dtype):
    """Random data over the search kernel's staging variants (the rows staged in shared memory
    or not: D = 100 float32 rows do not fit beside a code tile; several code tiles; a partial
    last block of rows), near ties that defeat the float32 expansion, exact ties and NaN rows,
    and rows near the float range (searched exactly)."""
    rng = np.random.default_rng(7)
    for n, k, d in ((1, 1, 1), (37, 5, 3), (300, 700, 16), (130, 40, 100)):
        z, e = rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((k, d)).astype(dtype)
        _vq_emulated_equals_cpu(z, e, f"N={n} K={k} D={d}")
    center = np.full(8, 1000.0)  # near ties: tests/test_quant_vq.py's data
    e = (center + 0.5 * rng.standard_normal((64, 8))).astype(dtype)
    z = (center + 0.5 * rng.standard_normal((256, 8))).astype(dtype)
    _vq_emulated_equals_cpu(z, e, "near ties")
    base = rng.standard_normal((70, 8))
    e = np.concatenate([base, base, base[:5]]).astype(dtype)  # every code twice or three times
    e[3] = np.nan
    z = (base[rng.integers(4, 70, 300)] + 1e-3 * rng.standard_normal((300, 8))).astype(dtype)
    z[7] = np.nan
    _vq_emulated_equals_cpu(z[np.isfinite(z).all(1)], e, "ties")
    zt, et = torch.from_numpy(z), torch.from_numpy(e)
    with emulated():
        (_, idx, c, _), (_, ge) = gn.vector_quantize(zt, et, 0.25)
    assert int(idx[7]) == 0 and bool(torch.isnan(c))  # a NaN row: index 0, NaN losses
    assert not bool((idx == 3).any()) and bool((ge[3] == 0).all())  # the NaN code, unpicked: gradient 0
    big = 3e19 if dtype == np.float32 else 3e153
    z = np.array([[big, 0.0], [-big, 2.0]], dtype)
    e = np.array([[0.0, 0.0], [big, 1.0], [-big, 1.0], [1.0, 1.0]], dtype)
    _vq_emulated_equals_cpu(z, e, "near the float range")


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(("record", "variant", "reduction"), FIRST_CASES, ids=FIRST_IDS)
def test_emulated_float32_value_of_16bit_calls(record, variant, reduction, low):
    """Under ``float32_values`` a float16/bfloat16 call's value comes back in float32
    (MapReduceArgs::value_f32: engine.cu's finalize<S, float>, which no GPU run has reached):
    the emulated kernels' float32 value equals the CPU engine's, within the rounding of two
    summation orders. Ops whose value another kernel writes refuse on both (skipped)."""
    from genloss.native import _engine as E

    dtype = getattr(torch, low)
    arrays = R.make_inputs(
        record, np.random.default_rng(seed_of(record.name, low)), np.float64, R.ODD_SIZES[0], variant
    )
    ts = [torch.from_numpy(np.array(a, copy=True)) for a in arrays]
    ts = [t.to(dtype) if t.is_floating_point() else t for t in ts]
    kwargs = R.call_kwargs(record, variant, reduction)
    try:
        with E.float32_values():
            want, _ = record.native(*ts, **kwargs)
    except TypeError as e:
        pytest.skip(f"no float32 value for {low} here: {e}")
    with emulated(), E.float32_values():
        got, _ = record.native(*ts, **kwargs)
    assert got.dtype == want.dtype == torch.float32 or got.dtype == want.dtype == dtype
    w = want.double().numpy()
    scale = value_scale(
        [t.double().numpy() if t.is_floating_point() else t.numpy() for t in ts], reduction, w
    )
    np.testing.assert_allclose(got.double().numpy(), w, rtol=2.0**-22, atol=1e-6 * scale, err_msg=record.name)


@pytest.mark.parametrize("which", sorted(EMPTY_SIZES))
@pytest.mark.parametrize(("record", "variant", "reduction"), EMPTY_CASES, ids=EMPTY_IDS)
def test_emulated_empty_inputs_match_cpu(record, variant, reduction, which):
    """tests/test_cuda.py's empty-input check through genloss.torch with the emulated kernels:
    the CPU engine's result or its error. An empty grid is an invalid launch on a GPU, and the
    emulator refuses it as the hardware does, so a launcher that forgot its early return fails
    here."""
    arrays = empty_inputs(record, variant, EMPTY_SIZES[which])
    cpu = run_op(record, variant, reduction, arrays, "cpu")
    with emulated(expect_launches=False):
        emu = run_op(record, variant, reduction, arrays, "cpu")
    label = f"{record.name}({variant.id}, {reduction}) on {which}-empty inputs"
    assert_same_outcome(cpu, emu, label, who="emulated CUDA")


@pytest.mark.parametrize("numel", [3 * 4096 + 1, 40 * 4096 + 7])
def test_emulated_many_chunks_match_float64(numel):
    """tests/test_cuda.py's many-chunk check (one whole-tensor reduction, then per-row sums of
    several chunks each) with the emulated kernels, against float64 sums."""
    g = torch.Generator().manual_seed(numel)
    cols = -(-numel // 3)
    x64 = torch.randn(3, cols, generator=g, dtype=torch.float64)
    y64 = torch.randn(3, cols, generator=g, dtype=torch.float64)
    x, y = x64.float().requires_grad_(True), y64.float()
    xe, ye = x.detach().double(), y.double()
    with emulated():
        value = gt.l1_loss(x, y)
        value.backward()
        per_row = gt.l1_loss(x.detach(), y, reduction="none")
    torch.testing.assert_close(value.double(), (xe - ye).abs().sum() / xe.numel(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), torch.sign(xe - ye) / xe.numel(), rtol=1e-6, atol=0)
    torch.testing.assert_close(per_row.double(), (xe - ye).abs().mean(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("low", LOW)
def test_emulated_16bit_conversions(low):
    """The emulator's own float16/bfloat16 conversions (what cuda_fp16.h / cuda_bf16.h do on a
    GPU), through the CUDA kernels' load and store: widening is exact and narrowing rounds to
    nearest even like torch, on every 64th bit pattern plus the special values (zeros,
    subnormals, the largest finite values, infinities, NaN) and on the ties and near-ties
    between neighbours (tests/test_low_storage.py's check, on a sample: one block per row)."""
    from test_low_storage import _bits, _narrow, _roundtrip_to_f32

    dt = getattr(torch, low)
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    special = torch.tensor(
        [0, 1, 2, 0x3FF, 0x400, 0x7BFF, 0x7C00, 0x7C01, 0x7F7F, 0x7F80, 0x7FC0], dtype=torch.int32
    )
    patterns = torch.cat([patterns[::64], special.to(torch.int16), (-special - 1).to(torch.int16)])
    every = patterns.view(dt)
    with emulated():
        wide = _roundtrip_to_f32(every)
    exp = every.float()
    nan = torch.isnan(exp)
    assert torch.equal(torch.isnan(wide), nan)
    assert torch.equal(wide[~nan], exp[~nan])
    f = exp[~nan].double()
    f = f[torch.isfinite(f)].sort().values.unique()
    mids = (f[1:] + f[:-1]) / 2
    cand = torch.cat([f, mids, mids.nextafter(torch.tensor(np.inf)), mids.nextafter(torch.tensor(-np.inf))])
    cand = torch.cat([cand, torch.tensor([np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-45, -1e-45, 0.0, -0.0])])
    x32 = cand.float()
    with emulated():
        got = _narrow(x32, dt)
    expect = x32.to(dt)
    gn_, en = torch.isnan(got.float()), torch.isnan(expect.float())
    assert torch.equal(gn_, en)
    assert np.array_equal(_bits(got[~gn_]), _bits(expect[~en]))


def test_quant_and_metrics_kernels_equal_cpu():
    """The kernels no registry case reaches, emulated, against the CPU engine on the same data:
    vq_ema_update (segment sums by a stable radix sort then one warp per code, in the CPU's
    order: the same bits), lfq_entropy_loss (the tiled rank-N update and its gradient: within
    rounding), prdc's k-NN radii and counts (the same counts), ot_coupling 'exact' (the same
    permutation) and 'sinkhorn' (the same plan within the tolerance)."""
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        z = rng.standard_normal((700, 12)).astype(dtype)
        idx = rng.integers(0, 40, 700)
        cs, es = rng.random(40).astype(dtype), rng.standard_normal((40, 12)).astype(dtype)
        want = gn.vq_ema_update(z, idx, cs, es, 0.9, 1e-5)
        with emulated():
            got = gn.vq_ema_update(z, idx, cs, es, 0.9, 1e-5)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)

        zl = rng.standard_normal((300, 10)).astype(dtype)
        v0, (g0,) = gn.lfq_entropy_loss(zl, 2.0)
        with emulated():
            v1, (g1,) = gn.lfq_entropy_loss(zl, 2.0)
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(v1, v0, rtol=tol)
        np.testing.assert_allclose(g1, g0, rtol=tol, atol=tol * np.abs(g0).max())

        real, fake = rng.standard_normal((400, 7)).astype(dtype), rng.standard_normal((300, 7)).astype(dtype)
        want_p = gn.prdc(real, fake, 5)
        with emulated():
            got_p = gn.prdc(real, fake, 5)
        assert got_p == want_p, (got_p, want_p)

        x0, x1 = rng.standard_normal((64, 3)).astype(dtype), rng.standard_normal((64, 3)).astype(dtype)
        perm = gn.ot_coupling(x0, x1)
        with emulated():
            np.testing.assert_array_equal(gn.ot_coupling(x0, x1), perm)
        plan = gn.ot_coupling(x0, x1, method="sinkhorn", eps=0.5)
        with emulated():
            np.testing.assert_allclose(
                gn.ot_coupling(x0, x1, method="sinkhorn", eps=0.5), plan, rtol=1e-9, atol=1e-12
            )
        # the loop's last change comes back from the CUDA kernel too: far from convergence, a warning
        with (
            emulated(),
            pytest.warns(RuntimeWarning, match="sinkhorn_divergence: the Sinkhorn iterations did not"),
        ):
            gn.sinkhorn_divergence(x0[:8], x1[:8] + 0.5, 1e-4, max_iter=50, need_grad=False)
