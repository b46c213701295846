"""prdc (tiled k-NN), sliced_wasserstein, cmmd and KID's subsets against independent oracles.

prdc: a brute-force NumPy version (the full distance matrix, ``np.partition``), written here,
and the ``prdc`` package (clovaai) when installed; the tie rule (<=) on duplicated points;
memory O((N + M) k) of the native kernel.  sliced_wasserstein: exact 1-D formulas, scipy,
POT's ``ot.sliced_wasserstein_distance`` with the same directions, finite differences.
cmmd: the direct formula and the official CMMD (JAX) formula written in NumPy.  kid: the
per-subset MMD of torchmetrics' KernelInceptionDistance on the same subsets.
The kernel's expansion and its exact recheck: data that round across the radii, the bound itself, the
overflow path. derivations/metrics.md, MET.10-MET.17, MET.28-MET.31.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch

import genloss.native as gn
import genloss.torch as gt
from genloss.native import _engine as NE
from genloss.native.divergence import kid_indices
from genloss.reference import divergence as RD
from genloss.reference import metrics as RM
from genloss.torch import metrics as gt_metrics
from peers import given_features, peer

# ============================================================================= prdc


def ordered_d2(a, b):
    """Squared distances summed over d in order: the kernel's arithmetic, bit for bit."""
    d2 = np.zeros((a.shape[0], b.shape[0]))
    for d in range(a.shape[1]):
        d2 += (a[:, d, None] - b[None, :, d]) ** 2
    return d2


def any_order_d2(a, b):
    """Squared distances by NumPy's pairwise summation (another order: equal only on grid data)."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1)


def brute_prdc(real, fake, k, d2=ordered_d2):
    """The definition with the whole N x M matrix and np.partition: the oracle."""
    rr = np.partition(d2(real, real), k, axis=1)[:, k]  # (k+1)-th smallest, self 0 included
    fr = np.partition(d2(fake, fake), k, axis=1)[:, k]
    drf = d2(real, fake)
    inside = drf <= rr[:, None]
    return {
        "precision": float(inside.any(axis=0).mean()),
        "recall": float((drf <= fr[None, :]).any(axis=1).mean()),
        "density": float(inside.sum() / (k * fake.shape[0])),
        "coverage": float((drf.min(axis=1) <= rr).mean()),
    }


LAYERS = {
    "reference": RM.prdc,
    "native": gn.prdc,
    "torch": lambda r, f, k: gt.prdc(torch.from_numpy(r), torch.from_numpy(f), k),
}


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
def test_prdc_equals_brute_force(layer):
    """(MET.10-MET.13) Gaussian features: the same counts as the full-matrix definition."""
    rng = np.random.default_rng(0)
    for n, m, d, k in ((300, 257, 5, 5), (64, 90, 1, 3), (2000, 1500, 8, 5)):
        if layer != "native" and n > 1000:
            continue  # the 2,000-point case on the kernel only (the reference is the slow oracle's twin)
        real = rng.standard_normal((n, d))
        fake = rng.standard_normal((m, d)) * 1.2 + 0.3
        assert LAYERS[layer](real, fake, k) == brute_prdc(real, fake, k)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_prdc_grid_data_with_ties(layer):
    """Features on a small integer grid: many duplicates and equal distances, every squared distance
    exact, so any summation order (NumPy's pairwise sum here) gives the same numbers and the tie rule decides."""
    rng = np.random.default_rng(1)
    real = rng.integers(0, 4, (240, 3)).astype(np.float64)
    fake = rng.integers(0, 5, (199, 3)).astype(np.float64) * 0.75  # multiples of 1/4: still exact
    for k in (1, 3, 10):
        assert LAYERS[layer](real, fake, k) == brute_prdc(real, fake, k, any_order_d2)


def tie_example():
    """Real: 3 copies of 0 and 3 of (10, 0), radius 0 at k = 2; fake: 0, 5, 10, 20 on the first axis."""
    real = np.array([[0.0, 0.0]] * 3 + [[10.0, 0.0]] * 3)
    fake = np.array([[0.0, 0.0], [5.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    # by hand: the fakes at 0 and 10 sit ON radius-0 balls (inside by <=), each in 3 of them:
    # precision 2/4, density 6 / (k M) = 6/8, coverage 1; the fake radii (10, 5, 10, 15) hold every real
    return real, fake, {"precision": 0.5, "recall": 1.0, "density": 0.75, "coverage": 1.0}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_prdc_tie_rule_closed_ball(layer):
    """(MET.11) a point at exactly the radius is inside, radius 0 included."""
    real, fake, expected = tie_example()
    assert LAYERS[layer](real, fake, 2) == expected


def test_prdc_package_strict_rule_differs_only_at_ties():
    """The prdc package writes `<`: on the tie example its precision, density and coverage are 0; on continuous data
    (no distance equals a radius) it gives our values."""
    prdc = peer("prdc")
    real, fake, _ = tie_example()
    strict = prdc.compute_prdc(real, fake, 2)
    assert [float(strict[key]) for key in ("precision", "recall", "density", "coverage")] == [
        0.0,
        1.0,
        0.0,
        0.0,
    ]
    rng = np.random.default_rng(2)
    real = rng.standard_normal((500, 16)).astype(np.float32)
    fake = (rng.standard_normal((400, 16)) * 0.9 + 0.1).astype(np.float32)
    theirs = prdc.compute_prdc(real, fake, 5)
    ours = gn.prdc(real, fake, 5)
    for key in ("precision", "recall", "coverage"):
        assert ours[key] == float(theirs[key]), key
    assert ours["density"] == pytest.approx(float(theirs["density"]), rel=1e-12)  # (1/k) mean vs sum/(kM)


def test_prdc_float32_thread_count_and_views():
    """float32 inputs widened element by element (= the reference on the widened data); the result is
    the same for 1 thread and the default; non-contiguous views are read as their values."""
    rng = np.random.default_rng(3)
    real = rng.standard_normal((333, 7)).astype(np.float32)
    fake = rng.standard_normal((301, 7)).astype(np.float32)
    expected = brute_prdc(real.astype(np.float64), fake.astype(np.float64), 4)
    assert gn.prdc(real, fake, 4) == expected
    with gn.options(threads=1):
        assert gn.prdc(real, fake, 4) == expected
    wide = np.zeros((333, 14), dtype=np.float32)
    wide[:, ::2] = real
    assert gn.prdc(wide[:, ::2], fake, 4) == expected
    assert gt.prdc(torch.from_numpy(real).half(), torch.from_numpy(fake).half(), 4) == brute_prdc(
        real.astype(np.float16).astype(np.float64), fake.astype(np.float16).astype(np.float64), 4
    )


def test_prdc_native_memory_is_not_n_by_m():
    """(MET.10) N = M = 20,000, D = 8: the kernel's peak RSS growth is far below the 3.2 GB of one
    N x M float64 matrix (O((N + M) k): radii, per-thread tiles and flags)."""
    code = textwrap.dedent(
        """
        import resource, numpy as np, genloss.native as gn
        rng = np.random.default_rng(0)
        real, fake = rng.standard_normal((20000, 8)), rng.standard_normal((20000, 8))
        gn.prdc(real[:50], fake[:50], 5)  # load and warm the engine
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        gn.prdc(real, fake, 5)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    grown = int(out.stdout.split()[-1])
    assert grown < 64 * 2**20, grown  # vs 20000 * 20000 * 8 = 3.2e9 bytes


# ---------------------------------------------- the kernel's expansion and its exact recheck (MET.28-MET.31)


def incidences(drf, rr, fr):
    """The four integer counts: fakes in some real ball, reals in some fake ball, (fake, real ball) pairs, real
    balls holding a fake (MET.11-MET.13)."""
    inside = drf <= rr[:, None]
    recalled = (drf <= fr[None, :]).any(1)
    return np.array([inside.any(0).sum(), recalled.sum(), inside.sum(), inside.any(1).sum()])


def knn_exact(real, fake, k):
    """The definition on the float64-widened data: the radii and the counts from the full matrices."""
    r, f = real.astype(np.float64), fake.astype(np.float64)
    rr = np.partition(ordered_d2(r, r), k, axis=1)[:, k]
    fr = np.partition(ordered_d2(f, f), k, axis=1)[:, k]
    return rr, fr, incidences(ordered_d2(r, f), rr, fr)


def knn_native(real, fake, k):
    """The kernel's raw outputs (the Call kind knn_prdc): both radius arrays and the four counts."""
    from genloss import _C

    real, fake = np.ascontiguousarray(real), np.ascontiguousarray(fake)
    (n, d), m = real.shape, len(fake)
    rr, fr, counts = np.empty(n), np.empty(m), np.zeros(4, dtype=np.int64)
    code = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}[real.dtype]
    _C.run_call(
        kind="knn_prdc", dtype=code, real=real.ctypes.data, fake=fake.ctypes.data, N=n, M=m, D=d, k=k,
        real_r2=rr.ctypes.data, fake_r2=fr.ctypes.data, counts=counts.ctypes.data,
    )  # fmt: skip
    return rr, fr, counts


def expanded_d2(a, b, c):
    """(MET.28) in NumPy: centred on c, norms and dot products in the inputs' precision, no recheck."""
    t = a.dtype.type
    a = (a.astype(np.float64) - c).astype(t)
    b = (b.astype(np.float64) - c).astype(t)
    na = (a.astype(np.float64) ** 2).sum(1).astype(t)
    nb = (b.astype(np.float64) ** 2).sum(1).astype(t)
    return ((na[:, None] + nb[None, :]) - t(2) * (a @ b.T)).astype(np.float64), na, nb


def bulk_only(real, fake, k):
    """What the expansion alone would give (the kernel's centres, no recheck)."""
    mr, mf = real.astype(np.float64).mean(0), fake.astype(np.float64).mean(0)
    t = real.dtype.type
    rr = np.partition(expanded_d2(real, real, mr.astype(t))[0], k, axis=1)[:, k]
    fr = np.partition(expanded_d2(fake, fake, mf.astype(t))[0], k, axis=1)[:, k]
    return rr, fr, incidences(expanded_d2(real, fake, (0.5 * (mr + mf)).astype(t))[0], rr, fr)


def grid_with_copies(n, m, d, offset, dtype, seed):
    """Points of {0, 1, 2}^d plus a common offset: every exact squared distance is an integer, so many equal a
    radius; an eighth of the reals are duplicated and an eighth of the fakes copy reals (distance exactly 0)."""
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 3, (n, d)).astype(np.float64)
    real[n // 2 : n // 2 + n // 8] = real[: n // 8]
    fake = rng.integers(0, 3, (m, d)).astype(np.float64)
    fake[: m // 8] = real[n // 4 : n // 4 + m // 8]
    return (real + offset).astype(dtype), (fake + offset).astype(dtype)


@pytest.mark.parametrize(("dtype", "offset"), [(np.float32, 1000.0), (np.float64, 12345.678)])
def test_prdc_rechecked_expansion_equals_brute_force(dtype, offset):
    """(MET.28-MET.31) grid data with a large common offset, duplicates and copies: the kernel's radii are the exact
    (k+1)-th smallest float64 d2 bit for bit and its counts are the definition's, for 1 and 2 threads;
    the data are adversarial: the expansion alone (no recheck, emulated in NumPy) changes the counts and radii.
    Several row blocks and column tiles with ragged ends (480 x 430, D = 96)."""
    real, fake = grid_with_copies(480, 430, 96, offset, dtype, 0)
    k = 5
    rr, fr, counts = knn_exact(real, fake, k)
    brr, bfr, bcounts = bulk_only(real, fake, k)
    assert not np.array_equal(bcounts, counts)  # ties rounded across the radii by the bulk arithmetic
    assert not np.array_equal(brr, rr)
    for threads in (1, 2):
        with gn.options(threads=threads):
            nrr, nfr, ncounts = knn_native(real, fake, k)
        np.testing.assert_array_equal(nrr, rr)
        np.testing.assert_array_equal(nfr, fr)
        np.testing.assert_array_equal(ncounts, counts)
    n, m = len(real), len(fake)
    assert gn.prdc(real, fake, k) == {
        "precision": counts[0] / m,
        "recall": counts[1] / n,
        "density": counts[2] / (k * m),
        "coverage": counts[3] / n,
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prdc_expansion_bound_holds(dtype):
    """(MET.28, MET.29) the bound |d~2 - d2| <= beta_x + beta_y on NumPy's own expansion (another summation
    order: the bound holds for any), uncentred with an offset of 100 (large norms) and centred; and it is not
    vacuous: the worst observed error is within 100x of it."""
    rng = np.random.default_rng(7)
    d = 64
    x = (rng.standard_normal((300, d)) + 100.0).astype(dtype)
    y = (rng.standard_normal((200, d)) * 1.5 + 100.0).astype(dtype)
    exact = ordered_d2(x.astype(np.float64), y.astype(np.float64))
    ut, u64 = np.finfo(dtype).eps / 2, np.finfo(np.float64).eps / 2
    kappa = 2 * ((d + 8) * ut + (3 * d + 8) * u64)
    alpha = (d + 4) * float(np.finfo(dtype).smallest_subnormal)
    for c in (np.zeros(d, dtype), x.astype(np.float64).mean(0).astype(dtype)):
        e, nx, ny = expanded_d2(x, y, c)
        bx, by = kappa * nx.astype(np.float64) + alpha, kappa * ny.astype(np.float64) + alpha
        bound = bx[:, None] + by[None, :]
        ratio = np.abs(e - exact) / bound
        assert ratio.max() <= 1.0
        assert ratio.max() >= 0.01


def test_prdc_overflowing_expansion_rechecks_every_pair():
    """(MET.29, MET.31) float32 points at 1e19 (squared norms beyond float32's range): their bounds are NaN and
    every pair with them is decided exactly, mixed with ordinary points in the same tiles; the float64 distances
    of the definition do not overflow, so the counts are the brute force's."""
    rng = np.random.default_rng(11)
    real = rng.integers(-3, 4, (150, 8)).astype(np.float64)
    fake = rng.integers(-3, 4, (130, 8)).astype(np.float64)
    real[::3] *= 1e19
    fake[::4] *= 1e19
    real, fake = real.astype(np.float32), fake.astype(np.float32)
    rr, fr, counts = knn_exact(real, fake, 3)
    nrr, nfr, ncounts = knn_native(real, fake, 3)
    np.testing.assert_array_equal(nrr, rr)
    np.testing.assert_array_equal(nfr, fr)
    np.testing.assert_array_equal(ncounts, counts)


def test_prdc_reference_memory_is_chunked(monkeypatch):
    """The reference's chunks bound its memory too (tracemalloc sees NumPy's allocations)."""
    monkeypatch.setattr(RM, "_PRDC_BLOCK", 1 << 15)
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((3000, 4)), rng.standard_normal((3000, 4))
    tracemalloc.start()
    RM.prdc(real, fake, 3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3000 * 3000 * 8 / 8, peak  # an eighth of one N x M float64 matrix


BAD_PRDC = [
    (dict(k=5, n=5), ValueError, "k"), (dict(k=5, m=3), ValueError, "k"), (dict(k=0), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"), (dict(dim_fake=4), ValueError, "fake"), (dict(n=0), ValueError, "real"),
    (dict(nan="real"), ValueError, "real"), (dict(nan="fake"), ValueError, "fake"),
    (dict(inf="fake"), ValueError, "fake"), (dict(flat=True), ValueError, "real"),
]  # fmt: skip


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
@pytest.mark.parametrize(("bad", "err", "name"), BAD_PRDC)
def test_prdc_bad_input(layer, bad, err, name):
    n, m, k = bad.get("n", 10), bad.get("m", 8), bad.get("k", 3)
    real, fake = np.ones((n, 3)), np.zeros((m, bad.get("dim_fake", 3)))
    if "nan" in bad:
        (real if bad["nan"] == "real" else fake)[1, 2] = np.nan
    if "inf" in bad:
        fake[0, 0] = np.inf
    if bad.get("flat"):
        real = np.ones(10)
    with pytest.raises(err, match=rf"prdc: .*\b{name}\b"):
        LAYERS[layer](real, fake, k)


# ----------------------------------------------------------------------------- prdc on CUDA (cuda/knn.cu)
# Exact float64 distances in the CPU's order: radii bit for bit, counts exactly. The kernel's tiles: 64 query
# points per block, 32 other points by 16 coordinates per shared-memory tile; the sizes below cross each.


def knn_call(real, fake, k, device=None):
    """One Call of kind knn_prdc on NumPy data, on the CPU (device None) or the CUDA ``device`` (torch tensors):
    (real_r2, fake_r2, counts) as NumPy arrays."""
    n, d = real.shape
    m = fake.shape[0]
    dtype = {np.float32: 0, np.float64: 1}[real.dtype.type]
    if device is None:
        rr, fr, counts = np.full(n, -1.0), np.full(m, -1.0), np.full(4, -1, dtype=np.int64)
        NE.run_call(
            kind="knn_prdc", dtype=dtype, real=real.ctypes.data, fake=fake.ctypes.data, N=n, M=m, D=d, k=k,
            real_r2=rr.ctypes.data, fake_r2=fr.ctypes.data, counts=counts.ctypes.data,
        )  # fmt: skip
        return rr, fr, counts
    rt, ft = torch.from_numpy(real).to(device), torch.from_numpy(fake).to(device)
    rr = torch.full((n,), -1.0, dtype=torch.float64, device=device)
    fr = torch.full((m,), -1.0, dtype=torch.float64, device=device)
    counts = torch.full((4,), -1, dtype=torch.int64, device=device)
    NE.run_call(
        kind="knn_prdc", device=1, device_id=device.index, stream=torch.cuda.current_stream(device).cuda_stream,
        dtype=dtype, real=rt.data_ptr(), fake=ft.data_ptr(), N=n, M=m, D=d, k=k, real_r2=rr.data_ptr(),
        fake_r2=fr.data_ptr(), counts=counts.data_ptr(),
    )  # fmt: skip
    return rr.cpu().numpy(), fr.cpu().numpy(), counts.cpu().numpy()


def assert_knn_equal(real, fake, k, device, what=""):
    """The CUDA Call's radii equal the CPU's bit for bit and its counts exactly; says which differ first."""
    cpu, gpu = knn_call(real, fake, k), knn_call(real, fake, k, device)
    tag = f"{what} N={real.shape[0]} M={fake.shape[0]} D={real.shape[1]} k={k} {real.dtype}"
    for name, c, g in zip(("real_r2", "fake_r2"), cpu[:2], gpu[:2], strict=True):
        bad = np.flatnonzero(c.view(np.int64) != g.view(np.int64))
        assert bad.size == 0, (
            f"{tag}: {name} differs at {bad.size} points, first {bad[:5].tolist()}: cpu {c[bad[:5]].tolist()} "
            f"cuda {g[bad[:5]].tolist()}"
        )
    assert gpu[2].tolist() == cpu[2].tolist(), f"{tag}: counts cuda {gpu[2].tolist()} cpu {cpu[2].tolist()}"
    return cpu


KNN_SIZES = [  # (N, M, D, k): one tile, tile edges +-1, ragged blocks, several thousand
    (2, 2, 1, 1), (3, 5, 2, 2), (31, 33, 15, 1), (32, 32, 16, 5), (33, 31, 17, 30), (63, 65, 1, 3),
    (64, 64, 32, 63), (65, 129, 33, 64), (200, 150, 3, 10), (1000, 777, 70, 5), (3001, 2500, 64, 5),
]  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("n", "m", "d", "k"), KNN_SIZES)
def test_prdc_cuda_radii_bitwise_equal_cpu(n, m, d, k, dtype, cuda_device):
    """Gaussian data: the CUDA kernel's radii are the CPU kernel's bit for bit, its four counts equal."""
    rng = np.random.default_rng(n * 7 + m + d)
    real = rng.standard_normal((n, d)).astype(dtype)
    fake = (rng.standard_normal((m, d)) * 1.1 + 0.2).astype(dtype)
    assert_knn_equal(real, fake, k, cuda_device)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_prdc_cuda_duplicates_and_ties(dtype, cuda_device):
    """Grid data (many equal distances, points at exactly their radius, copies at distance 0) and the tie example:
    the CUDA counts equal the CPU's and the brute force's, for k = 1 up to the largest k allowed."""
    rng = np.random.default_rng(11)
    real = rng.integers(0, 4, (240, 3)).astype(dtype)
    fake = (rng.integers(0, 5, (199, 3)) * 0.75).astype(dtype)
    fake[:20] = real[:20]  # copies across the sets
    for k in (1, 2, 3, 10, 32, 33, 198):
        assert_knn_equal(real, fake, k, cuda_device, "grid")
        expected = brute_prdc(real.astype(np.float64), fake.astype(np.float64), k, any_order_d2)
        rt, ft = torch.from_numpy(real).to(cuda_device), torch.from_numpy(fake).to(cuda_device)
        assert gn.prdc(rt, ft, k) == expected, f"k={k}"
    real, fake, expected = tie_example()
    assert_knn_equal(real.astype(dtype), fake.astype(dtype), 2, cuda_device, "tie example")
    rt, ft = (torch.from_numpy(a.astype(dtype)).to(cuda_device) for a in (real, fake))
    assert gn.prdc(rt, ft, 2) == expected
    same = np.zeros((70, 4), dtype=dtype)  # every distance 0: radii 0, every pair inside
    assert_knn_equal(same, same[:40], 39, cuda_device, "all equal")


@pytest.mark.cuda
def test_prdc_cuda_extreme_values(cuda_device):
    """Huge and tiny coordinates (float64 squares that overflow to inf, subnormal differences): still equal."""
    rng = np.random.default_rng(12)
    real = rng.standard_normal((90, 5)) * 1e-160
    fake = rng.standard_normal((70, 5)) * 1e-160
    assert_knn_equal(real, fake, 4, cuda_device, "tiny")
    real[:5] = rng.standard_normal((5, 5)) * 1e160  # squares ~1e320 overflow to inf
    assert_knn_equal(real, fake, 4, cuda_device, "huge")


@pytest.mark.cuda
def test_prdc_cuda_native_and_torch_equal_cpu(cuda_device):
    """genloss.native.prdc and genloss.torch.prdc on CUDA tensors equal the CPU's dicts, every dtype torch takes;
    two calls give the same result (integer counts: no order dependence)."""
    rng = np.random.default_rng(13)
    real = rng.standard_normal((777, 20))
    fake = rng.standard_normal((555, 20)) * 0.9 + 0.1
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        rc, fc = torch.from_numpy(real).to(dt), torch.from_numpy(fake).to(dt)
        rg, fg = rc.to(cuda_device), fc.to(cuda_device)
        cpu = gt.prdc(rc, fc, 5)
        assert gt.prdc(rg, fg, 5) == cpu, dt
        assert gt.prdc(rg, fg, 5) == cpu, f"{dt}, second call"
        if dt in (torch.float64, torch.float32):
            assert gn.prdc(rg, fg, 5) == gn.prdc(rc, fc, 5) == cpu, dt
    cpu1, gpu1, gpu2 = (
        knn_call(real, fake, 5),
        knn_call(real, fake, 5, cuda_device),
        knn_call(real, fake, 5, cuda_device),
    )
    for a, b, c in zip(cpu1, gpu1, gpu2, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")
def test_prdc_cuda_bad_input(cuda_device):
    """The CPU's checks on CUDA: NaN and inf named, k range, float16 refused by the native layer, capture refused."""
    real, fake = torch.ones((10, 3), device=cuda_device), torch.zeros((8, 3), device=cuda_device)
    for name in ("real", "fake"):
        bad = (real if name == "real" else fake).clone()
        bad[1, 2] = float("nan") if name == "real" else float("inf")
        args = (bad, fake) if name == "real" else (real, bad)
        with pytest.raises(ValueError, match=rf"prdc: {name} must be finite"):
            gn.prdc(*args, 3)
        with pytest.raises(ValueError, match=rf"prdc: {name} must be finite"):
            gt.prdc(*args, 3)
    with pytest.raises(ValueError, match=r"prdc: k \(8\) must be < the 8 samples of fake"):
        gn.prdc(real, fake, 8)
    with pytest.raises(TypeError, match="prdc: real has dtype float16"):
        gn.prdc(real.half(), fake.half(), 3)
    with pytest.raises(ValueError, match="fake must be on the device of real"):
        gn.prdc(real, fake.cpu(), 3)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="CUDA graph capture"), torch.cuda.graph(graph):
        gn.prdc(real, fake, 3)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")
def test_prdc_cuda_call_is_capturable_and_honours_the_stream(cuda_device):
    """The knn_prdc Call (everything but prdc's read-back) captured in a CUDA graph and replayed on new data
    equals the CPU on that data; a Call on a side stream is ordered on that stream."""
    rng = np.random.default_rng(14)
    n, m, d, k = 300, 260, 9, 4
    first, second = ((rng.standard_normal((n, d)), rng.standard_normal((m, d)) + 0.3) for _ in range(2))
    rt = torch.from_numpy(first[0]).to(cuda_device)
    ft = torch.from_numpy(first[1]).to(cuda_device)
    rr = torch.empty(n, dtype=torch.float64, device=cuda_device)
    fr = torch.empty(m, dtype=torch.float64, device=cuda_device)
    counts = torch.empty(4, dtype=torch.int64, device=cuda_device)

    def call():
        NE.run_call(
            kind="knn_prdc", device=1, device_id=cuda_device.index,
            stream=torch.cuda.current_stream(cuda_device).cuda_stream, dtype=1, real=rt.data_ptr(),
            fake=ft.data_ptr(), N=n, M=m, D=d, k=k, real_r2=rr.data_ptr(), fake_r2=fr.data_ptr(),
            counts=counts.data_ptr(),
        )  # fmt: skip

    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):
        call()  # on the side stream: the read-backs below wait for it there
        got = (rr.cpu().numpy(), fr.cpu().numpy(), counts.cpu().numpy())
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    for a, b in zip(knn_call(*first, k), got, strict=True):
        assert a.tobytes() == b.tobytes(), "side stream"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    rt.copy_(torch.from_numpy(second[0]))
    ft.copy_(torch.from_numpy(second[1]))
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    got = (rr.cpu().numpy(), fr.cpu().numpy(), counts.cpu().numpy())
    for name, a, b in zip(("real_r2", "fake_r2", "counts"), knn_call(*second, k), got, strict=True):
        assert a.tobytes() == b.tobytes(), f"replay: {name}"


# ============================================================================= sliced Wasserstein


def test_sw_directions_are_seeded_unit_normals():
    theta = RM.sliced_wasserstein_projections(6, 10, seed=7)
    raw = np.random.default_rng(7).standard_normal((10, 6))
    np.testing.assert_allclose(theta, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=0, atol=0)
    np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0, rtol=1e-15)


def test_sw_one_dimension_is_wasserstein_1d():
    """(MET.14) D = 1: every direction is +-1 and SW_1 is W_1 (scipy) for N != M."""
    wasserstein_distance = pytest.importorskip("scipy.stats").wasserstein_distance
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((37, 1)), rng.standard_normal((23, 1)) * 2 + 1
    assert float(RM.sliced_wasserstein(x, y, 5, p=1)) == pytest.approx(
        wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-12
    )


def expanded_sw(x, y, p, theta):
    """Independent exact W_p^p of unequal uniform measures: repeat each of the N atoms M times and
    each of the M atoms N times (both N M equal-weight atoms), then the sorted matching."""
    n, m = x.shape[0], y.shape[0]
    costs = [np.mean(np.abs(np.sort(np.repeat(x @ t, m)) - np.sort(np.repeat(y @ t, n))) ** p) for t in theta]
    return np.mean(costs) ** (1 / p)


@pytest.mark.parametrize(("n", "m", "p"), [(20, 20, 2.0), (17, 29, 2.0), (31, 12, 1.0), (9, 14, 1.5)])
def test_sw_exact_formula(n, m, p):
    """(MET.14, MET.15) the merged quantile grid = the expanded sorted matching (= the plain sorted
    matching when N == M)."""
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((m, 3)) + 0.5
    theta = RM.sliced_wasserstein_projections(3, 16, seed=2)
    assert float(RM.sliced_wasserstein(x, y, 16, p, seed=2)) == pytest.approx(
        expanded_sw(x, y, p, theta), rel=1e-12
    )


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_sw_matches_pot(p):
    ot = peer("ot")
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((40, 5)), rng.standard_normal((25, 5)) * 0.7
    theta = RM.sliced_wasserstein_projections(5, 32, seed=3)
    pot = ot.sliced_wasserstein_distance(x, y, n_projections=32, p=p, projections=theta.T)
    assert float(RM.sliced_wasserstein(x, y, 32, p, seed=3)) == pytest.approx(float(pot), rel=1e-12)


@pytest.mark.parametrize(("n", "m", "p"), [(6, 6, 2.0), (5, 8, 2.0), (7, 4, 1.5)])
def test_sw_backward_finite_differences(n, m, p):
    """(MET.16) the analytic backward = central differences (float64, no ties)."""
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((m, 3))
    gx, gy = RM.sliced_wasserstein_backward(x, y, 1.0, 8, p, seed=4)
    h = 1e-6
    for arr, g in ((x, gx), (y, gy)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            up = float(RM.sliced_wasserstein(x, y, 8, p, seed=4))
            arr[idx] = old - h
            down = float(RM.sliced_wasserstein(x, y, 8, p, seed=4))
            arr[idx] = old
            num[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_sw_torch_agrees_with_reference(p):
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((21, 4)) + 0.2
    xt, yt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y).requires_grad_()
    v = gt.sliced_wasserstein(xt, yt, 24, p, seed=5)
    (3.0 * v).backward()
    assert float(v.detach()) == pytest.approx(float(RM.sliced_wasserstein(x, y, 24, p, seed=5)), rel=1e-12)
    gx, gy = RM.sliced_wasserstein_backward(x, y, 3.0, 24, p, seed=5)
    np.testing.assert_allclose(xt.grad.numpy(), gx, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(yt.grad.numpy(), gy, rtol=1e-10, atol=1e-14)
    xs, ys = xt.detach()[:6].clone().requires_grad_(), yt.detach()[:5].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gt.sliced_wasserstein(a, b, 8, 2.0, 1), (xs, ys))


def test_sw_torch_compiles_fullgraph():
    """(MET.14) ``torch.compile(fullgraph=True)`` of a step with sliced_wasserstein (the NumPy draw of the
    directions used to break the graph): the same value and gradients as eager, for n != m (a grid with
    coinciding levels: 12 and 8 share 0, 1/4, 1/2, 3/4) and again for other sizes; the grid equals the
    reference's with its empty intervals (w = 0) dropped."""
    rng = np.random.default_rng(13)

    def step(a, b):
        return 2.0 * gt.sliced_wasserstein(a, b, 16, 2.0, seed=3)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for n, m in ((12, 8), (9, 9), (7, 13)):
        x, y = rng.standard_normal((n, 3)), rng.standard_normal((m, 3))
        grads = []
        for fn in (step, compiled):
            xt, yt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y).requires_grad_()
            v = fn(xt, yt)
            v.backward()
            grads.append((v.detach(), xt.grad, yt.grad))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)
        assert float(grads[0][0]) == pytest.approx(
            2.0 * float(RM.sliced_wasserstein(x, y, 16, 2.0, 3)), rel=1e-12
        )
        w, iu, iv = gt_metrics._quantile_grid(n, m, torch.device("cpu"), torch.float64)
        keep = w > 0
        want = RM.quantile_grid(n, m)
        for got, ref_part in zip((w[keep], iu[keep], iv[keep]), want, strict=True):
            np.testing.assert_array_equal(got.numpy(), ref_part)
        assert float(w.sum()) == pytest.approx(1.0, rel=1e-15)


def test_sw_directions_are_drawn_once_per_seed_and_kept(monkeypatch):
    """The directions are drawn (NumPy) and moved to the device once per (D, n_projections, seed,
    dtype, device), not at every call: a host-to-device copy per call is a transfer each step and
    is what CUDA graph capture refuses. One entry per configuration: a new seed replaces it; the
    result equals the reference's every time."""
    rng = np.random.default_rng(21)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((5, 4))
    want = {seed: float(RM.sliced_wasserstein(x, y, 9, 2.0, seed)) for seed in (11, 12)}  # before the patch
    drawn = []
    real = RM.sliced_wasserstein_projections

    def counting(*args):
        drawn.append(args)
        return real(*args)

    monkeypatch.setattr(gt_metrics._ref_ot, "sliced_wasserstein_projections", counting)
    monkeypatch.setattr(gt_metrics, "_SW_LAST", {})
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for seed in (11, 11, 11, 12, 12, 11):
        v = gt.sliced_wasserstein(xt, yt, 9, 2.0, seed=seed)
        assert float(v) == pytest.approx(want[seed], rel=1e-12)
    assert drawn == [(4, 9, 11), (4, 9, 12), (4, 9, 11)]
    gt.sliced_wasserstein(xt.float(), yt.float(), 9, 2.0, seed=11)  # another dtype: its own entry
    assert drawn[-1] == (4, 9, 11) and len(drawn) == 4
    assert len(gt_metrics._SW_LAST) == 2
    # the kept array is never handed out: changing an op's output leaves the next call right
    theta = torch.ops.genloss.sliced_wasserstein_directions(xt.new_empty(0), 4, 9, 11)
    theta.fill_(0.0)
    v = gt.sliced_wasserstein(xt, yt, 9, 2.0, seed=11)
    assert float(v) == pytest.approx(want[11], rel=1e-12)


def test_sw_identical_nan_and_float32():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((10, 3))
    assert float(RM.sliced_wasserstein(x, x)) == 0.0
    gx, gy = RM.sliced_wasserstein_backward(x, x, 1.0)
    assert not gx.any() and not gy.any()  # the minimum: gradient 0, not NaN
    xt = torch.from_numpy(x).requires_grad_()
    v = gt.sliced_wasserstein(xt, xt.detach())
    v.backward()
    assert float(v.detach()) == 0.0 and not xt.grad.any()
    bad = x.copy()
    bad[3, 1] = np.nan
    assert np.isnan(float(RM.sliced_wasserstein(bad, x)))
    assert torch.isnan(gt.sliced_wasserstein(torch.from_numpy(bad), torch.from_numpy(x)))
    y = rng.standard_normal((12, 3))
    v32 = gt.sliced_wasserstein(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert v32.dtype == torch.float32
    assert float(v32) == pytest.approx(float(RM.sliced_wasserstein(x, y)), rel=1e-5)


def test_sw_autocast_float16_is_float32():
    """Under float16 autocast the projections and costs are computed in float32 with autocast off:
    features ~1e3 (float16's max is 65504; their squared gaps ~1e6) gave inf; now the value = the
    float64 reference on the same float32 inputs, and = the call without autocast."""
    rng = np.random.default_rng(30)
    x, y = rng.standard_normal((256, 64)) * 1000, rng.standard_normal((256, 64)) * 1000 + 200
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    plain = gt.sliced_wasserstein(xt, yt)
    with torch.autocast("cpu", dtype=torch.float16):
        got = gt.sliced_wasserstein(xt, yt)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert torch.equal(got, plain)
    want = float(RM.sliced_wasserstein(xt.double().numpy(), yt.double().numpy()))
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("scale, p", [(1e20, 2.0), (1e-25, 2.0), (1e3, 12.0), (1.0, 3.0)])
def test_sw_float32_extreme_scales_match_reference(scale, p):
    """float32 inputs whose |gap|^p over- or underflows float32 (1e40, 1e-50, 1e36 for the
    gaps ~1e3 at p = 12) while the gaps and SW themselves are representable: value and gradient =
    the float64 reference (MET.14-MET.16) on the same float32 inputs, to float32 rounding; it was
    inf, or 0 with a zero gradient."""
    rng = np.random.default_rng(31)
    x = (rng.standard_normal((40, 6)) * scale).astype(np.float32)
    y = ((rng.standard_normal((33, 6)) + 0.3) * scale).astype(np.float32)
    xt, yt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y).requires_grad_()
    v = gt.sliced_wasserstein(xt, yt, 16, p, seed=2)
    v.backward()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = float(RM.sliced_wasserstein(x64, y64, 16, p, seed=2))
    assert v.dtype == torch.float32 and float(v.detach()) == pytest.approx(want, rel=2e-5)
    gx, gy = RM.sliced_wasserstein_backward(x64, y64, 1.0, 16, p, seed=2)
    for got, ref_g in ((xt.grad, gx), (yt.grad, gy)):
        assert np.abs(ref_g).max() > 0
        rel = np.linalg.norm(got.double().numpy() - ref_g) / np.linalg.norm(ref_g)
        assert rel < 1e-4, rel


BAD_SW = [
    (dict(p=0.5), ValueError, "p"), (dict(p=float("nan")), ValueError, "p"), (dict(n_projections=0), ValueError, "n_projections"),
    (dict(seed=-1), ValueError, "seed"), (dict(seed=1.5), TypeError, "seed"), (dict(dim_y=2), ValueError, "y"),
    (dict(n=0), ValueError, "x"),
    (dict(seed=2**63), ValueError, "seed"),  # the torch op's int is int64: once a schema error there
]  # fmt: skip


@pytest.mark.parametrize("layer", ["reference", "torch"])
@pytest.mark.parametrize(("bad", "err", "name"), BAD_SW)
def test_sw_bad_input(layer, bad, err, name):
    bad = dict(bad)
    x, y = np.ones((bad.pop("n", 4), 3)), np.zeros((5, bad.pop("dim_y", 3)))
    fn = RM.sliced_wasserstein
    if layer == "torch":
        x, y, fn = torch.from_numpy(x), torch.from_numpy(y), gt.sliced_wasserstein
    with pytest.raises(err, match=rf"sliced_wasserstein: .*\b{name}\b"):
        fn(x, y, **bad)


# ============================================================================= CMMD


def cmmd_direct(x, y, sigma=10.0):
    def k(a, b):
        return np.exp(-ordered_d2(a, b) / (2 * sigma**2))

    return 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def cmmd_official(x, y):
    """google-research/cmmd distance.py `mmd` (JAX), written in NumPy: norm expansion, gamma = 1/(2 sigma^2)."""
    sigma, scale = 10, 1000
    x_sq, y_sq = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * sigma**2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sq[:, None] + x_sq[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sq[:, None] + y_sq[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sq[:, None] + y_sq[None, :])))
    return scale * (k_xx + k_yy - 2 * k_xy)


def embeddings(n, d, seed, shift=0.0):
    e = np.random.default_rng(seed).standard_normal((n, d)) + shift
    return e / np.linalg.norm(e, axis=1, keepdims=True)  # CLIP embeddings are unit vectors


def test_cmmd_every_layer_equals_the_formulas():
    """(MET.17) reference, native (float64 and float32), torch = the direct formula = the official one."""
    x, y = embeddings(40, 16, 0), embeddings(33, 16, 1, shift=0.3)
    direct = cmmd_direct(x, y)
    assert direct == pytest.approx(cmmd_official(x, y), rel=1e-9)
    assert float(RM.cmmd(x, y)) == pytest.approx(direct, rel=1e-12)
    value, (gx, gy) = gn.cmmd(x, y)
    assert float(value) == pytest.approx(direct, rel=1e-10)
    rgx, rgy = RM.cmmd_backward(x, y, 1.0)
    np.testing.assert_allclose(gx, rgx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gy, rgy, rtol=1e-9, atol=1e-12)
    v32, _ = gn.cmmd(x.astype(np.float32), y.astype(np.float32), need_grad=False)
    assert v32.dtype == np.float32 and float(v32) == pytest.approx(direct, rel=1e-3)
    xt, yt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y).requires_grad_()
    vt = gt.cmmd(xt, yt)
    vt.backward()
    assert float(vt.detach()) == pytest.approx(direct, rel=1e-10)
    np.testing.assert_allclose(xt.grad.numpy(), rgx, rtol=1e-9, atol=1e-12)


def test_cmmd_backward_finite_differences():
    x, y = embeddings(5, 3, 2), embeddings(4, 3, 3)
    gx, gy = RM.cmmd_backward(x, y, 2.0)
    h = 1e-6
    for arr, g in ((x, gx), (y, gy)):
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            up = cmmd_direct(x, y)
            arr[idx] = old - h
            down = cmmd_direct(x, y)
            arr[idx] = old
            assert g[idx] == pytest.approx(2.0 * (up - down) / (2 * h), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("layer", ["reference", "native", "torch"])
def test_cmmd_bad_input(layer):
    fn = {"reference": RM.cmmd, "native": gn.cmmd, "torch": gt.cmmd}[layer]
    x, y = np.ones((4, 3)), np.zeros((5, 2))
    if layer == "torch":
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    with pytest.raises(ValueError, match=r"cmmd: .*\by\b"):
        fn(x, y)


# ============================================================================= KID vs torchmetrics


def test_kid_subsets_match_torchmetrics_poly_mmd():
    """KID's subsets mode = the mean and ddof-0 std of torchmetrics' per-subset `poly_mmd` on the SAME
    subsets (torchmetrics draws them with torch.randperm, which cannot be aligned with NumPy's
    generator: the per-subset formula is what is compared)."""
    kid_mod = peer("torchmetrics.image.kid")
    rng = np.random.default_rng(14)
    real, fake = rng.standard_normal((120, 8)), rng.standard_normal((90, 8)) * 1.1 + 0.1
    subsets, size, seed = 6, 40, 3
    theirs = torch.stack([
        kid_mod.poly_mmd(torch.from_numpy(real[ir]), torch.from_numpy(fake[jf]))
        for ir, jf in kid_indices(len(real), len(fake), subsets, size, seed)
    ])  # fmt: skip
    mean, std = RD.kid(real, fake, subsets, size, seed)
    assert float(mean) == pytest.approx(float(theirs.mean()), rel=1e-10)
    assert float(std) == pytest.approx(float(theirs.std(unbiased=False)), rel=1e-8)
    nmean, nstd = gn.kid(real, fake, subsets, size, seed)
    assert nmean == pytest.approx(float(theirs.mean()), rel=1e-10)
    assert nstd == pytest.approx(float(theirs.std(unbiased=False)), rel=1e-8)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_full_sets_match_torchmetrics_metric():
    """KID through torchmetrics' public ``KernelInceptionDistance`` (a feature module that passes the
    features through), with one subset of every row (its random permutation then changes nothing): its
    mean is the unbiased cubic-polynomial MMD^2 of the full sets, ours with ``subsets=None`` (and with one
    full subset), and its std is 0."""
    kid_mod = peer("torchmetrics.image.kid")

    rng = np.random.default_rng(15)
    n, d = 64, 8
    real, fake = rng.standard_normal((n, d)), rng.standard_normal((n, d)) * 1.2 + 0.2
    metric = kid_mod.KernelInceptionDistance(feature=given_features(d), subsets=1, subset_size=n)
    metric.set_dtype(torch.float64)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    mean, std = (float(v) for v in metric.compute())
    assert float(RD.kid(real, fake, subsets=None)[0]) == pytest.approx(mean, rel=1e-10)
    assert float(RD.kid(real, fake, subsets=1, subset_size=n)[0]) == pytest.approx(mean, rel=1e-10)
    assert float(gn.kid(real, fake, subsets=None)[0]) == pytest.approx(mean, rel=1e-10)
    assert std == 0.0
