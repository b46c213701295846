"""The quant family's quantizers: vector_quantize, vq_ema_update, lfq_entropy_loss (derivations/quant.md,
QNT.1-QNT.9), in every layer (reference, native, torch).

Every expected value is computed here independently of the implementation: brute-force argmins over
all codes, the autograd composite people write (cdist + argmin + the two MSE terms), NumPy segment
sums, the brute-force softmax over all 2^d LFQ codes, central finite differences, and the peer
vector-quantize-pytorch where installed.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch

import genloss.native as gn
import genloss.torch as gt
from genloss import _C
from genloss.native import quant as NQ
from genloss.reference import quant as RQ
from peers import peer

# ============================================================================= helpers (independent math)


def brute_argmin(z: np.ndarray, e: np.ndarray) -> np.ndarray:
    """argmin_k ||z_i - e_k||^2 over all codes, float64 from the inputs' values, first index on ties."""
    d = ((z.astype(np.float64)[:, None, :] - e.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    return np.argmin(d, axis=1)


def vq_composite(z: torch.Tensor, e: torch.Tensor, beta: float):
    """The usual autograd composite (VQGAN / VQ-VAE code): cdist + argmin, straight-through z_q, two MSEs."""
    idx = torch.cdist(z.detach().double(), e.detach().double()).argmin(dim=1)
    eq = e[idx]
    zq = z + (eq - z).detach()
    commit = beta * torch.mean((z - eq.detach()) ** 2)
    cb = torch.mean((z.detach() - eq) ** 2)
    return zq, idx, commit, cb


def lfq_brute(z: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, codebook entropy) by the softmax over all 2^d codes {-1, +1}^d of tau <z, c>."""
    d = z.shape[1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=z.dtype)
    logits = tau * z @ codes.T
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    per_sample = -(p * logp).sum(1).mean()
    pbar = p.mean(0)
    cb = -(pbar * torch.log(pbar)).sum()
    return per_sample, cb


# ============================================================================= vector_quantize


def test_vq_indices_equal_brute_force_argmin():
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        for n, k, d in ((37, 5, 3), (300, 130, 16), (65, 257, 33)):
            z = rng.standard_normal((n, d)).astype(dt)
            e = rng.standard_normal((k, d)).astype(dt)
            (zq, idx, _, _), _ = gn.vector_quantize(z, e, need_grad=False)
            want = brute_argmin(z, e)
            np.testing.assert_array_equal(idx, want)
            np.testing.assert_array_equal(zq, e[want])  # z_q is the code row, exactly
            np.testing.assert_array_equal(RQ.vector_quantize(z, e)[1], want)


def test_vq_ties_go_to_lowest_index():
    rng = np.random.default_rng(1)
    e = rng.standard_normal((12, 4))
    e[7] = e[3]
    e[10] = e[3]  # three identical codes: every row nearest to them must get 3
    z = e[[3, 7, 10]] + 1e-3 * rng.standard_normal((3, 4))
    # z = 0 is exactly equidistant from +v and -v: the lower index wins
    v = rng.standard_normal(4)
    e2 = np.stack([v + 5.0, -v, v, 3.0 * v])
    for dt in (np.float32, np.float64):
        (_, idx, _, _), _ = gn.vector_quantize(z.astype(dt), e.astype(dt), need_grad=False)
        np.testing.assert_array_equal(idx, [3, 3, 3])
        (_, idx2, _, _), _ = gn.vector_quantize(np.zeros((2, 4), dt), e2.astype(dt), need_grad=False)
        np.testing.assert_array_equal(idx2, [1, 1])
    _, ti, _, _ = gt.vector_quantize(torch.zeros(2, 4), torch.tensor(e2, dtype=torch.float32))
    assert ti.tolist() == [1, 1]


def test_vq_near_ties_pick_the_exact_nearest():
    """Codes packed around a point far from the origin: the float32 expansion ||e||^2 - 2 z.e cannot tell
    them apart (its rounding ~ (D+2) u ||z||^2 >> the distance gaps); the float64 recheck (QNT.3) can."""
    rng = np.random.default_rng(2)
    d = 8
    center = np.full(d, 1000.0)
    e = (center + 0.5 * rng.standard_normal((64, d))).astype(np.float32)
    z = (center + 0.5 * rng.standard_normal((256, d))).astype(np.float32)
    want = brute_argmin(z, e)
    (_, idx, _, _), _ = gn.vector_quantize(z, e, need_grad=False)
    np.testing.assert_array_equal(idx, want)
    zt, et = torch.from_numpy(z), torch.from_numpy(e)
    naive = ((et * et).sum(1)[None, :] - 2.0 * zt @ et.T).argmin(1).numpy()  # the plain float32 expansion
    assert (naive != want).sum() > 0, (
        "the data must defeat the plain expansion for this test to mean anything"
    )


def test_vq_values_near_the_float_range_pick_the_exact_nearest():
    """|z|, |e| ~ 3e19 in float32: ||e||^2 overflows float32, so the filter's expansion is inf or
    NaN for the true nearest code; such rows are searched exactly over every code (the float64
    brute force, whose distances stay finite). Also one infinite code among finite ones, and
    float64 inputs near 3e153."""
    big = np.array([[3e19, 0.0], [-3e19, 2.0]])
    e = np.array([[0.0, 0.0], [3e19, 1.0], [-3e19, 1.0], [1.0, 1.0]])
    cases = [(big.astype(np.float32), e.astype(np.float32))]
    e_inf = np.array([[np.inf, 0.0], [0.5, 0.5], [-0.5, 0.25]], np.float32)
    cases.append((np.array([[0.4, 0.4], [-1.0, 0.0]], np.float32), e_inf))
    cases.append(((big * 1e134), (e * 1e134)))
    for z, cb in cases:
        want = brute_argmin(z, cb)
        (zq, idx, _, _), _ = gn.vector_quantize(z, cb, need_grad=False)
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(zq, cb[want])
        np.testing.assert_array_equal(RQ.vector_quantize(z, cb)[1], want)
    assert brute_argmin(*cases[0]).tolist() == [1, 2]  # the float64 distances: 1 and 1


def test_vq_native_matches_reference():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((50, 6))
    e = rng.standard_normal((9, 6))
    beta = 0.3
    (zq, idx, c, b), (gz, ge) = gn.vector_quantize(z, e, beta)
    rzq, ridx, rc, rb = RQ.vector_quantize(z, e, beta)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(zq, rzq)
    np.testing.assert_allclose([c, b], [rc, rb], rtol=1e-13)
    # native grads are of commitment + codebook_loss: the reference backward with g_c = g_b = 1, g_zq = 0
    rgz, rge = RQ.vector_quantize_backward(z, e, np.zeros_like(z), 1.0, 1.0, beta)
    np.testing.assert_allclose(gz, rgz, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ge, rge, rtol=1e-12, atol=1e-15)
    # closed form of the two terms (QNT.1)
    dist = ((z - e[brute_argmin(z, e)]) ** 2).sum()
    np.testing.assert_allclose([c, b], [beta * dist / z.size, dist / z.size], rtol=1e-13)
    # float32: computed in float32, losses from float64 sums
    (_, idx32, c32, b32), (gz32, ge32) = gn.vector_quantize(z.astype(np.float32), e.astype(np.float32), beta)
    assert c32.dtype == np.float32 and gz32.dtype == np.float32
    np.testing.assert_allclose([c32, b32], [rc, rb], rtol=1e-6)
    np.testing.assert_allclose(ge32, rge, rtol=1e-5, atol=1e-7)


def test_vq_reference_backward_fd():
    """The analytic backward (QNT.4) against central differences of the loss terms (indices held: away from
    ties, a small step does not change the argmin)."""
    rng = np.random.default_rng(4)
    z = rng.standard_normal((7, 3))
    e = rng.standard_normal((4, 3))
    gc, gb, beta = 0.7, -1.3, 0.25
    gq = rng.standard_normal(z.shape)

    # the commitment holds e constant (sg), the codebook term holds z constant: differentiate each term in its
    # own argument, as autograd does
    h = 1e-6
    gz_fd = np.zeros_like(z)
    for i in range(z.size):
        zp, zm = z.copy(), z.copy()
        zp.flat[i] += h
        zm.flat[i] -= h
        gz_fd.flat[i] = (
            gc * (RQ.vector_quantize(zp, e, beta)[2] - RQ.vector_quantize(zm, e, beta)[2]) / (2 * h)
        )
    ge_fd = np.zeros_like(e)
    for i in range(e.size):
        ep, em = e.copy(), e.copy()
        ep.flat[i] += h
        em.flat[i] -= h
        ge_fd.flat[i] = (
            gb * (RQ.vector_quantize(z, ep, beta)[3] - RQ.vector_quantize(z, em, beta)[3]) / (2 * h)
        )
    gz, ge = RQ.vector_quantize_backward(z, e, gq, gc, gb, beta)
    np.testing.assert_allclose(gz, gq + gz_fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ge, ge_fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vq_losses_and_grads_equal_autograd_composite(dtype):
    torch.manual_seed(0)
    z0 = torch.randn(64, 8, dtype=dtype)
    e0 = torch.randn(20, 8, dtype=dtype)
    w = torch.randn(64, 8, dtype=dtype)
    out = []
    for fn in (gt.vector_quantize, vq_composite):
        z = z0.clone().requires_grad_(True)
        e = e0.clone().requires_grad_(True)
        zq, idx, commit, cb = fn(z, e, 0.25)
        total = (zq * w).sum() + 0.7 * commit + 1.9 * cb
        total.backward()
        out.append((zq.detach(), idx, commit.detach(), cb.detach(), z.grad, e.grad))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    (zq, idx, c, b, gz, ge), (zq2, idx2, c2, b2, gz2, ge2) = out
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(zq, zq2, **tol)
    torch.testing.assert_close(c, c2, **tol)
    torch.testing.assert_close(b, b2, **tol)
    torch.testing.assert_close(gz, gz2, **tol)
    torch.testing.assert_close(ge, ge2, **tol)


def test_vq_double_backward_equals_autograd_composite():
    """Differentiating the backward again (create_graph: a gradient penalty on the encoder) gives the
    true second derivatives (once a silent 0): those of the autograd composite, and in closed form
    (QNT.4) d/dz of g_c d commitment/dz = g_c 2 beta/(N D) I, d/de_k of g_b d codebook/de_k =
    g_b 2 n_k/(N D) I, with n_k the rows that picked code k."""
    torch.manual_seed(5)
    n, k, d, beta = 12, 5, 3, 0.3
    z0, e0 = torch.randn(n, d, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64)
    w, vz, ve = (
        torch.randn(n, d, dtype=torch.float64),
        torch.randn(n, d, dtype=torch.float64),
        torch.randn(k, d),
    )
    out = []
    for fn in (gt.vector_quantize, vq_composite):
        z, e = z0.clone().requires_grad_(True), e0.clone().requires_grad_(True)
        zq, idx, c, cb = fn(z, e, beta)
        gz, ge = torch.autograd.grad((zq * w).sum() + 0.7 * c + 1.9 * cb, (z, e), create_graph=True)
        s = (gz * vz).sum() + (ge * ve.double()).sum()
        out.append((idx, *torch.autograd.grad(s, (z, e), allow_unused=True, materialize_grads=True)))
    (idx, hz, he), (idx2, hz2, he2) = out
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(hz, hz2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(he, he2, rtol=1e-12, atol=1e-15)
    counts = torch.bincount(idx, minlength=k).double()
    torch.testing.assert_close(hz, 0.7 * 2 * beta / (n * d) * vz, rtol=1e-12, atol=0)
    torch.testing.assert_close(he, 1.9 * 2 / (n * d) * counts[:, None] * ve.double(), rtol=1e-12, atol=0)


def test_vq_unused_code_gets_zero_gradient():
    """(QNT.4) the codebook loss does not depend on a code no row picked: its gradient is 0 in every
    layer, also when that code holds inf or NaN (count_k e_k was 0 * inf = NaN in the kernel)."""
    z = np.array([[0.0, 0.0], [1.0, 1.0]])
    e = np.array([[0.0, 0.1], [1.0, 0.9], [np.nan, 5.0], [np.inf, 1.0]])
    want = np.zeros_like(e)
    want[:2] = 2.0 / 4.0 * (e[:2] - z)  # one row each
    (_, idx, _, b), (_, ge) = NQ.vector_quantize(z, e, 0.25)
    assert idx.tolist() == [0, 1] and np.isfinite(b)
    np.testing.assert_allclose(ge, want, rtol=1e-15, atol=0)
    np.testing.assert_allclose(
        RQ.vector_quantize_backward(z, e, np.zeros_like(z), 0.0, 1.0)[1], want, rtol=1e-15, atol=0
    )
    et = torch.tensor(e, requires_grad=True)
    gt.vector_quantize(torch.tensor(z), et, 0.25)[3].backward()
    np.testing.assert_allclose(et.grad.numpy(), want, rtol=1e-15, atol=0)


def test_vq_torch_op_checks():
    """gradcheck (float64) of each loss term in the argument it depends on, opcheck, compile(fullgraph)."""
    torch.manual_seed(1)
    z = torch.randn(10, 3, dtype=torch.float64)
    e = torch.randn(6, 3, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    er = e.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: gt.vector_quantize(a, e, 0.4)[2], (zr,))
    assert torch.autograd.gradcheck(lambda b: gt.vector_quantize(z, b, 0.4)[3], (er,))
    torch.library.opcheck(torch.ops.genloss.vector_quantize_fwd.default, (zr, er, 0.4, True))
    torch.library.opcheck(torch.ops.genloss.vector_quantize_fwd.default, (z, e, 0.4, False))

    def f(a, b):
        zq, idx, c, cb = gt.vector_quantize(a, b, 0.4)
        return (zq * 2).sum() + c + cb, idx

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for fn in (f, compiled):
        a, b = z.clone().requires_grad_(True), e.clone().requires_grad_(True)
        v, idx = fn(a, b)
        v.backward()
        if fn is f:
            ref = (v.detach(), idx, a.grad, b.grad)
        else:
            torch.testing.assert_close((v.detach(), idx, a.grad, b.grad), ref, rtol=1e-12, atol=1e-14)


def test_vq_low_precision_computed_in_float32():
    torch.manual_seed(2)
    for low in (torch.float16, torch.bfloat16):
        z = torch.randn(40, 8).to(low)
        e = torch.randn(16, 8).to(low)
        zr, er = z.clone().requires_grad_(True), e.clone().requires_grad_(True)
        zq, idx, c, cb = gt.vector_quantize(zr, er)
        (zq.float().sum() + c + cb).backward()
        want = brute_argmin(z.float().numpy(), e.float().numpy())  # the float32 (exact) values of the inputs
        np.testing.assert_array_equal(idx.numpy(), want)
        assert zq.dtype == low and torch.equal(zq, e[idx])
        assert c.dtype == torch.float32 and zr.grad.dtype == low and er.grad.dtype == low
        (_, _, c32, cb32), _ = gn.vector_quantize(z.float(), e.float(), need_grad=False)
        assert c.item() == c32.item() and cb.item() == cb32.item()


def test_vq_mixed_dtypes_as_under_autocast():
    """A VQ-VAE step under ``torch.autocast``: the encoder gives a bfloat16 z, the codebook and the EMA state
    stay float32. vector_quantize computes in float32 on z's exact float32 values (it raised a TypeError):
    the same indices and losses as the float32 call on z.float(), gradients in each input's dtype (z's the
    float32 one rounded to bfloat16), z_q the codebook's rows; vq_ema_update takes z into the state's dtype,
    exactly the update of z.float(). float32 z with a float64 codebook computes in float64."""
    torch.manual_seed(3)
    enc = torch.nn.Linear(4, 8)
    x = torch.randn(40, 4)
    e = torch.randn(16, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = enc(x)
    assert z.dtype == torch.bfloat16
    zq, idx, c, cb = gt.vector_quantize(z, e, 0.3)
    (zq.sum() + c + cb).backward()
    z32 = z.detach().float().requires_grad_(True)
    e32 = e.detach().clone().requires_grad_(True)
    zq2, idx2, c2, cb2 = gt.vector_quantize(z32, e32, 0.3)
    (zq2.sum() + c2 + cb2).backward()
    assert torch.equal(idx, idx2) and torch.equal(zq, zq2) and zq.dtype == torch.float32
    assert c.item() == c2.item() and cb.item() == cb2.item()
    assert torch.equal(e.grad, e32.grad)
    assert enc.weight.grad is not None and enc.weight.grad.dtype == torch.float32
    zl = z.detach().requires_grad_(True)
    (zg,) = torch.autograd.grad(gt.vector_quantize(zl, e.detach(), 0.3)[2], zl)
    (zg32,) = torch.autograd.grad(gt.vector_quantize(z32, e.detach(), 0.3)[2], z32)
    assert zg.dtype == torch.bfloat16 and torch.equal(zg, zg32.to(torch.bfloat16))
    cluster, embed_sum = torch.ones(16), torch.randn(16, 8)
    got = gt.vq_ema_update(z.detach(), idx, cluster, embed_sum, 0.9)
    want = gt.vq_ema_update(z.detach().float(), idx, cluster, embed_sum, 0.9)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # float32 z, float64 codebook: float64 throughout, z's gradient back in float32
    z1 = torch.randn(12, 8, requires_grad=True)
    e64 = torch.randn(5, 8, dtype=torch.float64)
    zq, idx, c, _ = gt.vector_quantize(z1, e64)
    (zq.sum() + c).backward()
    (_, idx64, c64, _), _ = gn.vector_quantize(z1.detach().double().numpy(), e64.numpy(), need_grad=False)
    assert c.dtype == torch.float64 and c.item() == c64 and np.array_equal(idx.numpy(), idx64)
    assert z1.grad.dtype == torch.float32
    with pytest.raises(TypeError, match=r"vq_ema_update: cluster_size must have the dtype of embed_sum"):
        gt.vq_ema_update(z1.detach(), idx, torch.ones(5, dtype=torch.float64), torch.zeros(5, 8), 0.9)


def test_vq_nan_row_gets_index_zero():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((4, 3))
    e = rng.standard_normal((5, 3))
    z[2, 1] = np.nan
    (zq, idx, c, b), _ = gn.vector_quantize(z, e)
    assert idx[2] == 0 and np.isnan(c) and np.isnan(b)
    np.testing.assert_array_equal(np.delete(idx, 2), np.delete(brute_argmin(np.nan_to_num(z), e), 2))
    assert RQ.vector_quantize(z, e)[1][2] == 0 and np.isnan(RQ.vector_quantize(z, e)[2])
    # a NaN code is never chosen while another code has a number
    e2 = e.copy()
    e2[0, 0] = np.nan
    z2 = rng.standard_normal((6, 3))
    (_, idx2, c2, _), _ = gn.vector_quantize(z2, e2)
    assert (idx2 != 0).all() and np.isfinite(c2)
    np.testing.assert_array_equal(idx2, RQ.vector_quantize(z2, e2)[1])


def test_vq_bad_input():
    z, e = np.zeros((4, 3)), np.zeros((5, 3))
    cases = [
        ((z, np.zeros((5, 2))), ValueError, "codebook"),
        ((z, np.zeros((0, 3))), ValueError, "codebook"),
        ((np.zeros((0, 3)), e), ValueError, "z"),
        ((z[0], e), ValueError, "z"),
        ((z, e.astype(np.float32)), TypeError, "codebook"),
        ((z.astype(np.int64), e), TypeError, "z"),
    ]
    for args, exc, name in cases:
        for fn in (gn.vector_quantize, RQ.vector_quantize):
            if fn is RQ.vector_quantize and exc is TypeError:
                continue  # the float64 reference converts any real dtype
            with pytest.raises(exc, match=rf"^vector_quantize: .*{name}"):
                fn(*args)
    with pytest.raises(ValueError, match="^vector_quantize: beta"):
        gn.vector_quantize(z, e, beta=-1.0)
    with pytest.raises(ValueError, match="^vector_quantize: codebook"):
        gt.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(TypeError, match="^vector_quantize: codebook"):
        gt.vector_quantize(torch.zeros(4, 3), [[0.0, 0.0, 0.0]])


def test_vq_memory_is_linear():
    """No N x K matrix: the peak RSS growth of one call stays far below N*K*4 bytes (256 MiB here)."""
    code = textwrap.dedent(
        """
        import resource, numpy as np, genloss.native as gn
        rng = np.random.default_rng(0)
        z = rng.standard_normal((4096, 8)).astype(np.float32)
        e = rng.standard_normal((16384, 8)).astype(np.float32)
        gn.vector_quantize(z[:8], e[:8])  # load everything first
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        gn.vector_quantize(z, e)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_kib = int(out.stdout.split()[-1])
    assert grown_kib < 32 * 1024, f"peak RSS grew {grown_kib} KiB; an N x K float32 matrix is 262144 KiB"


# ============================================================================= vq_ema_update


def numpy_ema(z, idx, cs, es, decay, eps):
    """Segment sums by a Python loop over rows, then VQ-VAE-2's EMA and Laplace smoothing (QNT.5, QNT.6)."""
    k, d = es.shape
    counts = np.zeros(k)
    sums = np.zeros((k, d))
    for i, j in enumerate(idx):
        counts[j] += 1
        sums[j] += z[i]
    ncs = decay * cs + (1 - decay) * counts
    nes = decay * es + (1 - decay) * sums
    n = ncs.sum()
    sm = (ncs + eps) / (n + k * eps) * n
    return ncs, nes, nes / sm[:, None]


def test_ema_equals_numpy_segment_sums():
    rng = np.random.default_rng(6)
    n, k, d = 300, 17, 5
    z = rng.standard_normal((n, d))
    idx = rng.integers(0, k - 2, n)  # the last two codes unused: Laplace smoothing keeps them finite
    cs = rng.uniform(0, 3, k)
    es = rng.standard_normal((k, d))
    want = numpy_ema(z, idx, cs, es, 0.9, 1e-5)
    for got in (
        gn.vq_ema_update(z, idx, cs, es, 0.9, 1e-5),
        gn.vq_ema_update(z, idx.astype(np.int32), cs, es, 0.9, 1e-5),
        RQ.vq_ema_update(z, idx, cs, es, 0.9, 1e-5),
        tuple(
            t.numpy() for t in gt.vq_ema_update(*(torch.from_numpy(a) for a in (z, idx, cs, es)), 0.9, 1e-5)
        ),
    ):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    f32 = gn.vq_ema_update(*(a.astype(np.float32) if a.dtype == np.float64 else a for a in (z, idx, cs, es)))
    assert all(a.dtype == np.float32 for a in f32)
    np.testing.assert_allclose(f32[2], numpy_ema(z, idx, cs, es, 0.99, 1e-5)[2], rtol=2e-5, atol=1e-6)


def test_ema_bitwise_across_thread_counts():
    rng = np.random.default_rng(7)
    n, k, d = 40000, 64, 16
    z = rng.standard_normal((n, d)).astype(np.float32)
    idx = rng.integers(0, k, n)
    cs = rng.uniform(0, 3, k).astype(np.float32)
    es = rng.standard_normal((k, d)).astype(np.float32)
    results = []
    for t in (1, 2):
        with gn.options(threads=t):
            results.append(gn.vq_ema_update(z, idx, cs, es))
            results.append(gn.vector_quantize(z, es, need_grad=True))
    for a, b in zip(results[0], results[2], strict=True):
        assert np.array_equal(a, b)
    (zq1, i1, c1, b1), (gz1, ge1) = results[1]
    (zq2, i2, c2, b2), (gz2, ge2) = results[3]
    for a, b in ((zq1, zq2), (i1, i2), (c1, c2), (b1, b2), (gz1, gz2), (ge1, ge2)):
        assert np.array_equal(a, b)


def test_ema_torch_compile():
    rng = np.random.default_rng(8)
    z = torch.from_numpy(rng.standard_normal((50, 4)))
    idx = torch.from_numpy(rng.integers(0, 9, 50))
    cs = torch.from_numpy(rng.uniform(0, 2, 9))
    es = torch.from_numpy(rng.standard_normal((9, 4)))
    want = gt.vq_ema_update(z, idx, cs, es, 0.8)
    got = torch.compile(lambda *a: gt.vq_ema_update(*a, 0.8), fullgraph=True, backend="aot_eager")(
        z, idx, cs, es
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.genloss.vq_ema_update.default, (z, idx, cs, es, 0.8, 1e-5))


def test_ema_bad_input():
    z, idx, cs, es = np.zeros((4, 3)), np.array([0, 1, 2, 1]), np.zeros(3), np.zeros((3, 3))
    bad = [
        ((z, np.array([0, 1, 3, 1]), cs, es), ValueError, "indices"),
        ((z, np.array([0, -1, 2, 1]), cs, es), ValueError, "indices"),
        ((z, idx[:3], cs, es), ValueError, "indices"),
        ((z, idx, np.zeros(4), es), ValueError, "cluster_size"),
        ((np.zeros((4, 2)), idx, cs, es), ValueError, "z"),
        ((z, idx.astype(np.float64), cs, es), TypeError, "indices"),
    ]
    for args, exc, name in bad:
        for fn in (gn.vq_ema_update, RQ.vq_ema_update):
            with pytest.raises(exc, match=rf"^vq_ema_update: .*{name}"):
                fn(*args)
    for kw, name in (({"decay": 1.5}, "decay"), ({"eps": 0.0}, "eps")):
        with pytest.raises(ValueError, match=rf"^vq_ema_update: {name}"):
            gn.vq_ema_update(z, idx, cs, es, **kw)


# ============================================================================= lfq_entropy_loss


@pytest.mark.parametrize("d", [1, 2, 5, 8, 10])
def test_lfq_equals_brute_force_softmax(d):
    """Both terms and their weighted sum against the softmax over all 2^d codes (float64, 1e-12)."""
    rng = np.random.default_rng(10 + d)
    for tau, scale in ((100.0, 0.02), (1.0, 1.0), (3.0, 0.3)):
        z = scale * rng.standard_normal((33, d))
        hs, hc = (float(t) for t in lfq_brute(torch.from_numpy(z), tau))
        terms = np.zeros(2)
        v, _ = gn.lfq_entropy_loss(z, tau, 0.7, 1.3, need_grad=False, terms=terms)
        np.testing.assert_allclose(terms, [hs, hc], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(v, 0.7 * hs - 1.3 * hc, rtol=1e-12, atol=1e-12)
        # each term alone, through the weights
        np.testing.assert_allclose(RQ.lfq_entropy_loss(z, tau, 1.0, 0.0), hs, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(RQ.lfq_entropy_loss(z, tau, 0.0, -1.0), hc, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            RQ.lfq_entropy_loss(z, tau, 0.7, 1.3), 0.7 * hs - 1.3 * hc, rtol=1e-12, atol=1e-12
        )


def test_lfq_gradient_fd_and_brute_autograd():
    rng = np.random.default_rng(20)
    for d, tau in ((3, 2.0), (6, 1.0), (9, 0.5)):
        z = rng.standard_normal((11, d))
        g = 0.8
        zt = torch.from_numpy(z).requires_grad_(True)
        hs, hc = lfq_brute(zt, tau)
        ((0.6 * hs - 1.4 * hc) * g).backward()
        brute = zt.grad.numpy()
        (ref,) = RQ.lfq_entropy_loss_backward(z, g, tau, 0.6, 1.4)
        _, (nat,) = gn.lfq_entropy_loss(z, tau, 0.6, 1.4)
        np.testing.assert_allclose(ref, brute, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g * nat, brute, rtol=1e-9, atol=1e-12)
        # central differences of the reference value
        fd = np.zeros_like(z)
        for i in range(z.size):
            h = 1e-6
            zp, zm = z.copy(), z.copy()
            zp.flat[i] += h
            zm.flat[i] -= h
            fd.flat[i] = (
                g
                * (RQ.lfq_entropy_loss(zp, tau, 0.6, 1.4) - RQ.lfq_entropy_loss(zm, tau, 0.6, 1.4))
                / (2 * h)
            )
        np.testing.assert_allclose(ref, fd, rtol=1e-6, atol=1e-8)


def test_lfq_native_matches_reference():
    rng = np.random.default_rng(21)
    for d in (11, 13, 16):
        z = 0.05 * rng.standard_normal((300, d))
        v, (g,) = gn.lfq_entropy_loss(z, 100.0, 1.0, 1.0)
        np.testing.assert_allclose(v, RQ.lfq_entropy_loss(z), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(g, RQ.lfq_entropy_loss_backward(z, 1.0)[0], rtol=1e-9, atol=1e-13)
    z32 = z.astype(np.float32)
    v32, (g32,) = gn.lfq_entropy_loss(z32)
    assert v32.dtype == np.float32 and g32.dtype == np.float32
    np.testing.assert_allclose(v32, RQ.lfq_entropy_loss(z32), rtol=1e-6, atol=1e-6)


def test_lfq_d18_bounded_memory():
    """d = 18: N x 2^d float64 would be 2 GiB at N = 1024; the reference's traced peak and the native call's
    peak RSS growth stay under 100 MB."""
    rng = np.random.default_rng(22)
    z = 0.01 * rng.standard_normal((1024, 18))
    tracemalloc.start()
    try:
        v = RQ.lfq_entropy_loss(z, 100.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"reference peak {peak} bytes"
    terms = np.zeros(2)
    code = textwrap.dedent(
        """
        import resource, sys, numpy as np, genloss.native as gn
        z = 0.01 * np.random.default_rng(22).standard_normal((1024, 18))
        gn.lfq_entropy_loss(z[:2, :2])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v, (g,) = gn.lfq_entropy_loss(z)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, repr(float(v)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_kib, nv = out.stdout.split()
    assert int(grown_kib) < 100e6 / 1024, f"native peak RSS grew {grown_kib} KiB"
    np.testing.assert_allclose(float(nv), v, rtol=1e-10)
    gn.lfq_entropy_loss(z[:4], terms=terms, need_grad=False)
    # the per-sample term (d bit entropies) at d = 18 against its closed form per bit
    x = 2 * 100.0 * z[:4]
    q = 1 / (1 + np.exp(-x))
    bits = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    np.testing.assert_allclose(terms[0], bits.sum(1).mean(), rtol=1e-10)


def test_lfq_low_precision_finite():
    """fp16 inputs (logits 2 tau z of order 1e3 at tau = 100): the torch layer computes in float32, no NaN/inf."""
    torch.manual_seed(4)
    for low in (torch.float16, torch.bfloat16):
        z = (torch.randn(64, 12) * 5).to(low).requires_grad_(True)
        v = gt.lfq_entropy_loss(z)
        v.backward()
        assert v.dtype == torch.float32 and torch.isfinite(v) and torch.isfinite(z.grad).all()
        assert z.grad.dtype == low
        want = RQ.lfq_entropy_loss(z.detach().double().numpy())
        np.testing.assert_allclose(v.item(), want, rtol=1e-5, atol=1e-5)


# torch's own deprecation warnings inside Dynamo's tracing of an autograd.Function (as tests/test_torch_ops.py)
def test_lfq_torch_op_checks():
    torch.manual_seed(5)
    z = (0.3 * torch.randn(9, 5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: gt.lfq_entropy_loss(a, 2.0, 0.5, 1.5), (z,))
    torch.library.opcheck(torch.ops.genloss.lfq_entropy_loss.default, (z, 2.0, 0.5, 1.5))
    for need in ([True], [False]):  # the primitive: real kernel + fake kernel
        torch.library.opcheck(
            torch.ops.genloss.lfq_entropy_loss_fwd.default, (z.detach(), 2.0, 0.5, 1.5, need)
        )
    f = torch.compile(lambda a: gt.lfq_entropy_loss(a, 2.0), fullgraph=True, backend="aot_eager")
    a, b = z.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
    f(a).backward()
    gt.lfq_entropy_loss(b, 2.0).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_lfq_nan_and_bad_input():
    z = np.zeros((3, 4))
    z[1, 2] = np.nan
    assert np.isnan(gn.lfq_entropy_loss(z)[0]) and np.isnan(RQ.lfq_entropy_loss(z))
    with pytest.raises(ValueError, match=r"^lfq_entropy_loss: z has d=21 bits"):
        gn.lfq_entropy_loss(np.zeros((2, 21)))
    with pytest.raises(ValueError, match=r"^lfq_entropy_loss: z has d=21 bits"):
        RQ.lfq_entropy_loss(np.zeros((2, 21)))
    with pytest.raises(ValueError, match=r"^lfq_entropy_loss: z is empty"):
        gn.lfq_entropy_loss(np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"^lfq_entropy_loss: inv_temperature"):
        gn.lfq_entropy_loss(np.zeros((2, 4)), inv_temperature=0.0)
    with pytest.raises(ValueError, match=r"^lfq_entropy_loss: z must have shape"):
        gn.lfq_entropy_loss(np.zeros(4))
    with pytest.raises(TypeError, match=r"^lfq_entropy_loss: z"):
        gn.lfq_entropy_loss(np.zeros((2, 4), dtype=np.int32))
    assert _C.LFQ_MAX_BITS == NQ.LFQ_MAX_BITS == RQ.LFQ_MAX_BITS


# ============================================================================= peer: vector-quantize-pytorch


def test_peer_vector_quantize_pytorch_ema():
    """VectorQuantize (EMA codebook, training mode): indices, commitment loss and the EMA state equal ours."""
    vqp = peer("vector_quantize_pytorch")
    torch.manual_seed(6)
    n, d, k, decay, beta = 256, 8, 32, 0.9, 0.25
    vq = vqp.VectorQuantize(dim=d, codebook_size=k, decay=decay, commitment_weight=beta, kmeans_init=False)
    vq.train()
    cb = vq._codebook
    e0 = cb.embed[0].detach().clone()
    cs0 = cb.cluster_size[0].detach().clone()
    es0 = cb.embed_avg[0].detach().clone()
    x = torch.randn(1, n, d)
    _, idx, commit = vq(x)
    (zq, ours_idx, ours_commit, _), _ = gn.vector_quantize(x[0], e0, beta, need_grad=False)
    assert torch.equal(idx[0], ours_idx)
    torch.testing.assert_close(commit.reshape(()), ours_commit, rtol=1e-5, atol=1e-7)
    ncs, nes, ncb = gn.vq_ema_update(x[0], ours_idx, cs0, es0, decay, cb.eps)
    torch.testing.assert_close(cb.cluster_size[0], ncs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.embed_avg[0], nes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.embed[0], ncb, rtol=1e-4, atol=1e-5)


def test_peer_lfq_entropy():
    """vector-quantize-pytorch's LFQ: logits 2 t <z, c> (t its inv_temperature), so its per-sample and codebook
    entropies are ours at inv_temperature = 2 t, up to its log clamp at 1e-5 (QNT.7): equal where no probability
    is below 1e-5, and the test shows the clamp's bias where many are."""
    vqp = peer("vector_quantize_pytorch")
    torch.manual_seed(7)
    d, t = 6, 0.5
    lfq = vqp.LFQ(dim=d, codebook_size=2**d, entropy_loss_weight=1.0, diversity_gamma=1.0,
                  commitment_loss_weight=0.0)  # fmt: skip
    lfq.train()
    x = 0.3 * torch.randn(1, 128, d)
    out = lfq(x, inv_temperature=t, return_loss_breakdown=True)
    breakdown = out[-1]
    terms = np.zeros(2)
    gn.lfq_entropy_loss(x[0].double().numpy(), 2 * t, need_grad=False, terms=terms)
    hs_brute, hc_brute = (float(v) for v in lfq_brute(x[0].double(), 2 * t))
    np.testing.assert_allclose(terms, [hs_brute, hc_brute], rtol=1e-12)
    p_min = float(torch.softmax(2 * t * x[0].double() @ torch.tensor(
        list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64).T, 1).min())  # fmt: skip
    assert p_min > 1e-5  # no clamp in play at this temperature: the peer must agree
    np.testing.assert_allclose(float(breakdown.per_sample_entropy), terms[0], rtol=1e-5)
    np.testing.assert_allclose(float(breakdown.batch_entropy), terms[1], rtol=1e-5)
    # where codes have probabilities below 1e-5, the peer's clamped log lowers both entropies
    # (-p log max(p, 1e-5) < -p log p): it equals the clamped brute force, genloss the exact one
    d2, t2 = 10, 10.0
    lfq2 = vqp.LFQ(dim=d2, codebook_size=2**d2, entropy_loss_weight=1.0, diversity_gamma=1.0,
                   commitment_loss_weight=0.0)  # fmt: skip
    lfq2.train()
    x2 = 0.5 * torch.randn(1, 16, d2)
    theirs = lfq2(x2, inv_temperature=t2, return_loss_breakdown=True)[-1]
    codes2 = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d2)), dtype=torch.float64)
    p2 = torch.softmax(2 * t2 * x2[0].double() @ codes2.T, 1)
    clamped = -(p2.mean(0) * torch.log(p2.mean(0).clamp_min(1e-5))).sum()
    gn.lfq_entropy_loss(x2[0].double().numpy(), 2 * t2, need_grad=False, terms=terms)
    exact = float(lfq_brute(x2[0].double(), 2 * t2)[1])
    np.testing.assert_allclose(terms[1], exact, rtol=1e-12)
    np.testing.assert_allclose(float(theirs.batch_entropy), float(clamped), rtol=1e-5)
    assert float(theirs.batch_entropy) < exact - 5e-5


# ============================================================================= native on CUDA (cuda/quant.cu)
# Native CUDA against native CPU on the same data: the index, z_q and the EMA outputs bitwise (the CPU defines
# exact rules for them), the losses and gradients within tests/tolerances.py ("cuda").
from tolerances import assert_close  # noqa: E402

_VQ_SIZES = [
    (1, 1, 1),
    (1, 5, 3),
    (127, 63, 32),  # float64 D=32: the rows staged, tiles of 64 codes (K below, at and past one tile)
    (129, 64, 32),
    (257, 129, 32),
    (1000, 300, 7),
    (300, 40, 64),  # float64 D=64: rows not staged, codes staged
    (70, 9, 2000),  # a few codes per tile
    (20, 3, 7000),  # float64: codes read from global memory (no tile fits)
    (4000, 1000, 16),
]


def _vq_both(z: np.ndarray, e: np.ndarray, dev, beta=0.25):
    cpu = gn.vector_quantize(torch.from_numpy(z), torch.from_numpy(e), beta)
    zc, ec = torch.from_numpy(z).to(dev), torch.from_numpy(e).to(dev)
    cuda = gn.vector_quantize(zc, ec, beta)
    return cpu, cuda


def _vq_compare(cpu, cuda, dtype, what):
    (zq, idx, c, b), (gz, ge) = cpu
    (zq2, idx2, c2, b2), (gz2, ge2) = cuda
    for t in (zq2, idx2, c2, b2, gz2, ge2):
        assert t.is_cuda, f"{what}: an output is not on the device"
    i1, i2 = idx.numpy(), idx2.cpu().numpy()
    bad = np.flatnonzero(i1 != i2)
    assert bad.size == 0, (
        f"{what}: {bad.size} indices differ, first rows {bad[:5].tolist()}: cpu {i1[bad[:5]]} cuda {i2[bad[:5]]}"
    )
    assert torch.equal(zq, zq2.cpu()), f"{what}: z_q differs from the CPU's bits"
    for name, a, w in (
        ("commitment", c2, c),
        ("codebook_loss", b2, b),
        ("grad_z", gz2, gz),
        ("grad_codebook", ge2, ge),
    ):
        assert_close(a.cpu().numpy(), w.numpy(), "cuda", dtype, f"{what}: {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k,d", _VQ_SIZES)
def test_vq_native_cuda_equals_cpu(cuda_device, dtype, n, k, d):
    rng = np.random.default_rng(n * 7 + k + d)
    z = rng.standard_normal((n, d)).astype(dtype)
    e = rng.standard_normal((k, d)).astype(dtype)
    _vq_compare(*_vq_both(z, e, cuda_device), dtype, f"N={n} K={k} D={d}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vq_native_cuda_ties_and_nan(cuda_device, dtype):
    rng = np.random.default_rng(21)
    base = rng.standard_normal((70, 8))
    e = np.concatenate([base, base, base[:5]]).astype(dtype)  # every code twice or three times: ties
    e[3] = np.nan  # a NaN code is never chosen while another code has a number
    pick = rng.integers(0, 70, 500)
    pick[pick == 3] = 4  # (code 3 is NaN: its rows' nearest code would be its copy 73)
    z = (base[pick] + 1e-3 * rng.standard_normal((500, 8))).astype(dtype)
    z[7] = np.nan  # a NaN row: index 0, NaN losses
    z[400, 2] = np.nan
    cpu, cuda = _vq_both(z, e, cuda_device)
    (_, idx, c, b), _ = cpu
    (_, idx2, c2, b2), (gz2, _) = cuda
    assert int(idx2[7]) == 0 and int(idx2[400]) == 0
    assert bool(torch.isnan(c2).item()) and bool(torch.isnan(b2).item())
    assert torch.isnan(gz2[7]).all()
    i2 = idx2.cpu().numpy()
    assert not np.any(i2 == 3), "a NaN code was chosen"
    assert np.all(i2[np.isfinite(z).all(1)] < 70), "a tie did not go to the lowest index"
    assert np.array_equal(idx.numpy(), i2)
    # the same without the NaN rows: finite losses within tolerance
    keep = np.isfinite(z).all(1)
    _vq_compare(*_vq_both(z[keep], e, cuda_device), dtype, "ties")


@pytest.mark.cuda
def test_vq_native_cuda_repeatable_and_stream(cuda_device):
    rng = np.random.default_rng(22)
    z = torch.from_numpy(rng.standard_normal((3000, 24)).astype(np.float32)).to(cuda_device)
    e = torch.from_numpy(rng.standard_normal((700, 24)).astype(np.float32)).to(cuda_device)
    (a1, a2, a3, a4), (a5, a6) = gn.vector_quantize(z, e, 0.3)
    s = torch.cuda.Stream(cuda_device)
    s.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(s):
        (b1, b2, b3, b4), (b5, b6) = gn.vector_quantize(z, e, 0.3)
    s.synchronize()
    for name, x, y in zip(("z_q", "indices", "commitment", "codebook", "grad_z", "grad_codebook"),
                          (a1, a2, a3, a4, a5, a6), (b1, b2, b3, b4, b5, b6), strict=True):  # fmt: skip
        assert torch.equal(x, y), f"{name} differs between two calls"


def _ema_both(z, idx, cs, es, dev, decay=0.9, eps=1e-5):
    cpu = gn.vq_ema_update(*(torch.from_numpy(a) for a in (z, idx, cs, es)), decay, eps)
    cuda = gn.vq_ema_update(*(torch.from_numpy(a).to(dev) for a in (z, idx, cs, es)), decay, eps)
    return cpu, cuda


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("itype", [np.int64, np.int32])
@pytest.mark.parametrize("n,k,d", [(0, 3, 2), (1, 1, 1), (5000, 1500, 16), (300, 40, 45), (2049, 2, 3)])
def test_ema_native_cuda_bitwise_equals_cpu(cuda_device, dtype, itype, n, k, d):
    """K past one block of the serial count (1024), D past one warp (32), N = 0."""
    rng = np.random.default_rng(n + k + d)
    z = rng.standard_normal((n, d)).astype(dtype)
    idx = rng.integers(0, max(1, k - 1), n).astype(itype)  # the last code unused
    cs = rng.uniform(0, 3, k).astype(dtype)
    es = rng.standard_normal((k, d)).astype(dtype)
    cpu, cuda = _ema_both(z, idx, cs, es, cuda_device)
    for name, a, w in zip(("cluster_size", "embed_sum", "codebook"), cuda, cpu, strict=True):
        assert a.is_cuda and a.dtype == w.dtype
        diff = np.flatnonzero(a.cpu().numpy().ravel() != w.numpy().ravel())
        assert diff.size == 0, (
            f"{name}: {diff.size} entries differ from the CPU's bits, first at flat {diff[:5].tolist()}"
        )
    again = gn.vq_ema_update(*(torch.from_numpy(a).to(cuda_device) for a in (z, idx, cs, es)), 0.9, 1e-5)
    assert all(torch.equal(x, y) for x, y in zip(cuda, again, strict=True)), "two calls differ"


def test_ema_torch_checks_indices_once(monkeypatch):
    """genloss.torch.vq_ema_update reads the range of its indices once (the native kernel's
    check; on CUDA each check is a wait for the GPU), and still names the op and the argument."""
    calls = []
    real = NQ.int_range

    def counted(b):
        calls.append(b.shape)
        return real(b)

    monkeypatch.setattr(NQ, "int_range", counted)
    rng = np.random.default_rng(29)
    z, cs, es = (torch.from_numpy(a) for a in (rng.standard_normal((40, 3)), rng.uniform(0, 2, 5),
                                               rng.standard_normal((5, 3))))  # fmt: skip
    idx = torch.from_numpy(rng.integers(0, 5, 40))
    got = gt.vq_ema_update(z, idx, cs, es, 0.9, 1e-5)
    want = RQ.vq_ema_update(z.numpy(), idx.numpy(), cs.numpy(), es.numpy(), 0.9, 1e-5)
    for a, w in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), w, rtol=1e-12, atol=1e-12)
    assert calls == [(40,)], calls
    bad = idx.clone()
    bad[7] = 5
    with pytest.raises(
        ValueError, match=r"^vq_ema_update: indices must lie in \[0, 5\), got values in \[0, 5\]"
    ):
        gt.vq_ema_update(z, bad, cs, es)
    assert len(calls) == 2, calls
    # No other check in between: with the native read-back answering "not checked" (as on CUDA
    # under capture), the CPU kernel's own bounds check is the one that raises.
    monkeypatch.setattr(NQ, "int_range", lambda b: None)
    with pytest.raises(
        ValueError, match=r"^vq_ema_update: indices must lie in \[0, K\) with K = 5, got 5 at"
    ):
        gt.vq_ema_update(z, bad, cs, es)


@pytest.mark.cuda
def test_ema_native_cuda_index_checks(cuda_device):
    rng = np.random.default_rng(23)
    z = rng.standard_normal((50, 4))
    idx = rng.integers(0, 6, 50)
    cs, es = rng.uniform(0, 2, 6), rng.standard_normal((6, 4))
    bad = idx.copy()
    bad[[3, 17]] = [6, -1]
    args = [torch.from_numpy(a).to(cuda_device) for a in (z, bad, cs, es)]
    with pytest.raises(ValueError, match=r"^vq_ema_update: indices must lie in \[0, 6\)"):
        gn.vq_ema_update(*args)
    with gn.options(check_data=False):  # unchecked: the kernel ignores the rows of an out-of-range index
        got = gn.vq_ema_update(*args)
    keep = (bad >= 0) & (bad < 6)
    want = gn.vq_ema_update(z[keep], bad[keep], cs, es)
    for name, a, w in zip(("cluster_size", "embed_sum", "codebook"), got, want, strict=True):
        assert np.array_equal(a.cpu().numpy(), w), f"{name}: the out-of-range rows were not ignored"


_LFQ_CASES = [(1, 1), (33, 1), (33, 2), (1, 5), (100, 5), (257, 10), (65, 11), (40, 15), (9, 20), (1000, 8)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d", _LFQ_CASES)
def test_lfq_native_cuda_equals_cpu(cuda_device, dtype, n, d):
    rng = np.random.default_rng(100 * n + d)
    for tau, scale, cw in ((1.0, 1.0, 1.3), (3.0, 0.3, 0.7), (100.0, 0.02, 1.0), (2.0, 0.5, 0.0)):
        z = (scale * rng.standard_normal((n, d))).astype(dtype)
        t_cpu, t_cuda = np.zeros(2), np.zeros(2)
        v, (g,) = gn.lfq_entropy_loss(torch.from_numpy(z), tau, 0.9, cw, terms=t_cpu)
        v2, (g2,) = gn.lfq_entropy_loss(torch.from_numpy(z).to(cuda_device), tau, 0.9, cw, terms=t_cuda)
        what = f"N={n} d={d} tau={tau} cw={cw}"
        assert v2.is_cuda and g2.is_cuda
        assert_close(v2.cpu().numpy(), v.numpy(), "cuda", dtype, f"{what}: value")
        assert_close(g2.cpu().numpy(), g.numpy(), "cuda", dtype, f"{what}: grad")
        assert_close(t_cuda, t_cpu, "cuda", np.float64, f"{what}: terms")
        v3, (g3,) = gn.lfq_entropy_loss(torch.from_numpy(z).to(cuda_device), tau, 0.9, cw)
        assert torch.equal(v2, v3) and torch.equal(g2, g3), f"{what}: two calls differ"


@pytest.mark.cuda
def test_lfq_native_cuda_nan(cuda_device):
    z = np.random.default_rng(24).standard_normal((40, 6))
    z[5, 2] = np.nan
    v, (g,) = gn.lfq_entropy_loss(torch.from_numpy(z).to(cuda_device), 2.0)
    v0, (g0,) = gn.lfq_entropy_loss(z, 2.0)
    assert bool(torch.isnan(v).item()) and np.isnan(v0)
    assert np.array_equal(np.isnan(g.cpu().numpy()), np.isnan(g0)), (
        "NaN gradients at other places than the CPU's"
    )


@pytest.mark.cuda
def test_quant_native_cuda_graph_capture(cuda_device):
    """The three kernels captured in a CUDA graph (no host sync, scratch stream-ordered), replayed on new data."""
    rng = np.random.default_rng(25)
    z = torch.from_numpy(rng.standard_normal((500, 12))).to(cuda_device)
    e = torch.from_numpy(rng.standard_normal((90, 12))).to(cuda_device)
    idx = torch.from_numpy(rng.integers(0, 90, 500)).to(cuda_device)
    cs = torch.from_numpy(rng.uniform(0, 2, 90)).to(cuda_device)
    x = torch.from_numpy(rng.standard_normal((300, 10))).to(cuda_device)

    def run():
        (zq, i, c, b), (gz, ge) = gn.vector_quantize(z, e, 0.25)
        ema = gn.vq_ema_update(z, idx, cs, e, 0.9)
        v, (g,) = gn.lfq_entropy_loss(x, 3.0)
        return (zq, i, c, b, gz, ge, *ema, v, g)

    s = torch.cuda.Stream(cuda_device)
    s.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(s):
        run()  # warm-up
    torch.cuda.current_stream(cuda_device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for fresh in range(2):
        z.copy_(torch.from_numpy(rng.standard_normal((500, 12))))
        idx.copy_(torch.from_numpy(rng.integers(0, 90, 500)))
        x.copy_(torch.from_numpy(rng.standard_normal((300, 10))))
        graph.replay()
        torch.cuda.synchronize(cuda_device)
        want = run()
        for j, (a, w) in enumerate(zip(outs, want, strict=True)):
            assert torch.equal(a, w), f"replay {fresh}: output {j} differs from an eager call"


# ============================================================================= genloss.torch on CUDA (the native kernels)
_TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", _TORCH_DTYPES)
def test_torch_quantizers_cuda_equal_cpu(cuda_device, dtype):
    """genloss.torch on CUDA tensors equals genloss.torch on the same CPU tensors: the same native rules
    (float16/bfloat16 computed in float32 on both)."""
    g = torch.Generator().manual_seed(26)
    z = torch.randn(333, 16, generator=g).to(dtype)
    e = torch.randn(150, 16, generator=g).to(dtype)
    outs = {}
    for dev in ("cpu", cuda_device):
        # clone: z.to("cpu") IS z, which must stay a leaf without grad for the CUDA round and the EMA below
        zr = z.to(dev).clone().requires_grad_(True)
        er = e.to(dev).clone().requires_grad_(True)
        zq, idx, c, cb = gt.vector_quantize(zr, er, 0.25)
        (zq.float().square().sum() + 2 * c + 3 * cb).backward()
        outs[str(dev)] = [t.detach().cpu() for t in (zq, idx, c, cb, zr.grad, er.grad)]
    cpu, cuda = outs["cpu"], outs[str(cuda_device)]
    assert torch.equal(cpu[1], cuda[1]), "indices differ"
    assert torch.equal(cpu[0], cuda[0]), "z_q differs"
    for name, a, w in zip(
        ("commitment", "codebook_loss", "grad z", "grad codebook"), cuda[2:], cpu[2:], strict=True
    ):
        assert a.dtype == w.dtype, f"{name}: dtype {a.dtype} != {w.dtype}"
        assert_close(a.double().numpy(), w.double().numpy(), "cuda", dtype, name)
    idx = cpu[1]
    cs = torch.rand(150, generator=g).to(dtype)
    ema_cpu = gt.vq_ema_update(z, idx, cs, e, 0.9)
    ema_cuda = gt.vq_ema_update(
        z.to(cuda_device), idx.to(cuda_device), cs.to(cuda_device), e.to(cuda_device), 0.9
    )
    for name, a, w in zip(("cluster_size", "embed_sum", "codebook"), ema_cuda, ema_cpu, strict=True):
        assert a.is_cuda and a.dtype == w.dtype and torch.equal(a.cpu(), w), f"vq_ema_update {name} differs"
    x = (0.3 * torch.randn(200, 12, generator=g)).to(dtype)
    vals = {}
    for dev in ("cpu", cuda_device):
        xr = x.to(dev).clone().requires_grad_(True)  # a leaf on both devices (x.to("cpu") IS x)
        v = gt.lfq_entropy_loss(xr, 3.0, 1.0, 1.0)
        v.backward()
        vals[str(dev)] = (v.detach().cpu(), xr.grad.cpu())
    (v0, g0), (v1, g1) = vals["cpu"], vals[str(cuda_device)]
    assert v1.dtype == v0.dtype and g1.dtype == g0.dtype
    assert_close(v1.double().numpy(), v0.double().numpy(), "cuda", dtype, "lfq value")
    assert_close(g1.double().numpy(), g0.double().numpy(), "cuda", dtype, "lfq grad")


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:The AccumulateGrad node's stream:UserWarning")
def test_torch_quantizers_cuda_graph_capture(cuda_device):
    """genloss.torch.vector_quantize (fwd + bwd), vq_ema_update and lfq_entropy_loss (fwd + bwd) captured
    once and replayed on new data equal eager calls on that data."""
    g = torch.Generator().manual_seed(27)
    z = torch.randn(400, 8, generator=g, dtype=torch.float64).to(cuda_device)
    e = torch.randn(70, 8, generator=g, dtype=torch.float64).to(cuda_device)
    idx = torch.randint(0, 70, (400,), generator=g).to(cuda_device)
    cs = torch.rand(70, generator=g, dtype=torch.float64).to(cuda_device)
    x = (0.3 * torch.randn(300, 9, generator=g, dtype=torch.float64)).to(cuda_device)

    def step():
        zr, er, xr = (
            z.detach().requires_grad_(True),
            e.detach().requires_grad_(True),
            x.detach().requires_grad_(True),
        )
        zq, i, c, cb = gt.vector_quantize(zr, er, 0.25)
        loss = zq.square().sum() + c + cb
        gz, ge = torch.autograd.grad(loss, (zr, er))
        ema = gt.vq_ema_update(z, idx, cs, e, 0.9)
        v = gt.lfq_entropy_loss(xr, 2.0)
        (gx,) = torch.autograd.grad(v, (xr,))
        return (zq.detach(), i, c.detach(), cb.detach(), gz, ge, *ema, v.detach(), gx)

    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for rep in range(2):
        with torch.no_grad():
            z.copy_(torch.randn(400, 8, generator=g, dtype=torch.float64))
            idx.copy_(torch.randint(0, 70, (400,), generator=g))
            x.copy_(0.3 * torch.randn(300, 9, generator=g, dtype=torch.float64))
        graph.replay()
        torch.cuda.synchronize(cuda_device)
        want = step()
        for j, (a, w) in enumerate(zip(outs, want, strict=True)):
            assert torch.equal(a, w), f"replay {rep}: output {j} differs from an eager call"


def test_vector_quantize_under_torch_func():
    """torch.func.grad of vector_quantize raised ("must override the setup_context staticmethod": the
    Function torch.library generates); now grad and vmap(grad) give each call's autograd gradients,
    for z and for the codebook, and vmap runs without torch's batching fallback."""
    import genloss.torch as gt

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    codebook = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def f(zz, e):
        zq, _, commitment, codebook_loss = gt.vector_quantize(zz, e, 0.3)
        return commitment + codebook_loss + (zq * zq).sum()

    for argnums in (0, 1):
        per_call = torch.func.vmap(torch.func.grad(f, argnums=argnums), in_dims=(0, None))(z, codebook)
        for i in range(3):
            zz, e = z[i].clone().requires_grad_(True), codebook.clone().requires_grad_(True)
            f(zz, e).backward()
            np.testing.assert_allclose(
                per_call[i].numpy(), (zz, e)[argnums].grad.numpy(), rtol=1e-13, atol=1e-15
            )


def test_fsq_quantize_forward_mode():
    """torch.func.jvp of fsq_quantize (a straight-through op) is its backward's slope times the tangent:
    it raised (no jvp); the tangent equals autograd's gradient inner product with the direction."""
    import warnings

    import genloss.torch as gt

    g = torch.Generator().manual_seed(1)
    z, direction = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))

    def f(a):
        return (gt.fsq_quantize(a, [3, 4, 5]) ** 2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.func.jvp's own jit.script use
        _, tangent = torch.func.jvp(f, (z,), (direction,))
    a = z.clone().requires_grad_(True)
    f(a).backward()
    np.testing.assert_allclose(float(tangent), float((a.grad * direction).sum()), rtol=1e-12)
