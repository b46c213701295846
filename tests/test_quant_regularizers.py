"""The regularizer half of the quant family (derivations/quant.md, QNT.10-QNT.16): FSQ, VQGAN's
adaptive GAN weight, StyleGAN2's path-length penalty, lazy R1 and the LPIPS head.

Oracles, each written out here from its source, never taken from genloss: the FSQ paper's
Appendix A.1 code, taming-transformers' ``calculate_adaptive_weight``, stylegan2-ada's
``accumulate_gradients`` lines, the ``lpips`` package's ``normalize_tensor`` / ``NetLinLayer`` /
``spatial_average``, all in torch float64 with autograd; central finite differences; exact
enumeration of the FSQ grid; a real 2-process gloo run; vector-quantize-pytorch's ``FSQ`` when
installed.  The registry-driven tests cover fsq_quantize and path_length_penalty too.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

from genloss.reference import gan as RG
from genloss.reference import quant as RQ
from gloo_workers import init_gloo, run_workers
from peers import peer

torch = pytest.importorskip("torch")
import genloss.torch as T  # noqa: E402

F64 = torch.float64
REL = 1e-12  # two float64 evaluations of one formula: a few roundings apart


def rel_err(a, b) -> float:
    a = np.asarray(a.detach() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def central_fd(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f(x) / dx by central differences, f scalar-valued, entry by entry (float64)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


# ============================================================================= FSQ (QNT.10, QNT.11)


def paper_fsq(z: torch.Tensor, levels) -> torch.Tensor:
    """The FSQ paper's Appendix A.1 ``bound`` / ``round_ste`` / ``quantize``, in torch."""
    lv = torch.tensor(levels, dtype=F64)
    eps = 1e-3
    half_l = (lv - 1) * (1 - eps) / 2
    offset = torch.where(lv % 2 == 1, 0.0, 0.5)
    shift = torch.tan(offset / half_l)
    bounded = torch.tanh(z + shift) * half_l - offset
    quantized = bounded + (torch.round(bounded) - bounded).detach()  # round_ste
    half_width = torch.div(lv, 2, rounding_mode="floor")
    return quantized / half_width


FSQ_LEVELS = [(8, 5, 5, 5), (7, 5, 5, 5, 5), (2, 3, 4, 1000)]


@pytest.mark.parametrize("levels", FSQ_LEVELS, ids=str)
def test_fsq_value_and_gradient_match_the_paper_formula(levels):
    """(QNT.10) reference and torch op = the paper's code: value exactly (codes k/w), the
    straight-through gradient to 1e-13."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 3, len(levels))) * 2.0
    z.flat[:5] = [0.0, 25.0, -25.0, 1e-9, -3.0]  # the code 0, saturated ends
    zt = torch.tensor(z, requires_grad=True)
    want = paper_fsq(zt, levels)
    up = torch.tensor(rng.uniform(-1.5, 1.5, size=z.shape))
    (want_grad,) = torch.autograd.grad(want, zt, up)
    assert np.array_equal(RQ.fsq_quantize(z, levels), want.detach().numpy())
    (ref_grad,) = RQ.fsq_quantize_backward(z, up.numpy(), levels)
    assert rel_err(ref_grad, want_grad) < 1e-13
    got = T.fsq_quantize(zt, list(levels))
    (got_grad,) = torch.autograd.grad(got, zt, up)
    assert torch.equal(got.detach(), want.detach())
    assert rel_err(got_grad, want_grad) < 1e-13


@pytest.mark.parametrize("levels", [(2, 3, 4, 5, 8), (1000, 999)], ids=str)
def test_fsq_every_code_reachable_and_no_other(levels):
    """(QNT.10) on a fine grid of z over the whole line, channel i takes exactly the L_i values
    k / floor(L_i/2), k in [-floor(L/2), ceil(L/2) - 1]; L = 1001 is refused (its outer codes
    would be unreachable).  Every one of the prod(levels) codes is the image of a z built from
    the inverse of the bound (the product is reachable, not just each channel)."""
    grid = np.concatenate([np.linspace(-12.0, 12.0, 60001), [-40.0, 40.0]])
    z = np.repeat(grid[:, None], len(levels), axis=1)
    out = RQ.fsq_quantize(z, levels)
    for i, L in enumerate(levels):
        w = L // 2
        want = {k / w for k in range(-(L // 2), L - L // 2)}
        assert set(out[:, i].tolist()) == want, f"L={L}"
    with pytest.raises(ValueError, match="fsq_quantize: levels"):
        RQ.fsq_quantize(z[:, :1], [1001])
    if math.prod(levels) <= 1000:  # every code of the product: z = the bound's inverse at k
        lv = np.asarray(levels)
        k = np.array(
            list(itertools.product(*[range(-(L // 2), L - L // 2) for L in levels])), dtype=np.float64
        )
        half_l, offset = (lv - 1) * (1 - 1e-3) / 2, np.where(lv % 2 == 0, 0.5, 0.0)
        # the outer integers lie just outside the bound's open range (-h - o, h - o): aim 0.1 inside it
        target = np.clip(k, -half_l - offset + 0.1, half_l - offset - 0.1)
        zk = np.arctanh((target + offset) / half_l) - np.tan(offset / half_l)
        codes = RQ.fsq_quantize(zk, levels)
        assert np.array_equal(codes, k / (lv // 2))
        assert len({tuple(c) for c in codes}) == math.prod(levels)


def test_fsq_backward_is_the_bound_derivative():
    """(QNT.10) the straight-through gradient = central differences of the BOUND
    h tanh(z + s) - o (divided by w), written out from the paper's constants."""
    levels = (8, 5, 3, 2)
    lv = np.asarray(levels, dtype=np.float64)
    half_l, offset = (lv - 1) * (1 - 1e-3) / 2, np.where(lv % 2 == 0, 0.5, 0.0)
    shift, w = np.tan(offset / half_l), np.floor(lv / 2)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 4)) * 1.5
    up = rng.uniform(-1.5, 1.5, size=z.shape)

    def bound_sum(x):
        return float(np.sum(up * (np.tanh(x + shift) * half_l - offset) / w))

    (g,) = RQ.fsq_quantize_backward(z, up, levels)
    assert rel_err(g, central_fd(bound_sum, z)) < 1e-8
    # saturated: exactly 0, never NaN
    (g_far,) = RQ.fsq_quantize_backward(np.full((1, 4), 40.0), np.ones((1, 4)), levels)
    assert np.array_equal(g_far, np.zeros((1, 4)))


def test_fsq_indices_are_a_bijection():
    """(QNT.11) the indices of all prod(levels) codes are 0..prod-1, each the mixed-radix number
    sum_i k_i prod_{j<i} L_j (enumerated with Python ints); fsq_codes inverts fsq_indices;
    reference and torch agree."""
    levels = (2, 3, 4, 5)
    n = math.prod(levels)
    codes = RQ.fsq_codes(np.arange(n), levels)
    assert len({tuple(c) for c in codes}) == n
    assert np.array_equal(RQ.fsq_indices(codes, levels), np.arange(n))
    for ks in itertools.product(*[range(L) for L in levels]):
        idx = sum(k * math.prod(levels[:i]) for i, k in enumerate(ks))
        code = [(k - L // 2) / (L // 2) for k, L in zip(ks, levels, strict=True)]
        assert np.array_equal(RQ.fsq_codes(np.array(idx), levels), code)
        assert int(RQ.fsq_indices(np.array(code), levels)) == idx
    ct = T.fsq_codes(torch.arange(n), list(levels), dtype=F64)
    assert np.array_equal(ct.numpy(), codes)
    assert torch.equal(T.fsq_indices(ct, list(levels)), torch.arange(n))
    # the quantizer's output indexes, any batch shape
    z = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    q = T.fsq_quantize(z, list(levels))
    assert np.array_equal(T.fsq_indices(q, list(levels)).numpy(), RQ.fsq_indices(q.numpy(), levels))
    with pytest.raises(ValueError, match="fsq_indices: codes"):
        RQ.fsq_indices(np.full((1, 4), 0.3), levels)
    with pytest.raises(ValueError, match="fsq_codes: indices"):
        T.fsq_codes(torch.tensor([n]), list(levels))


def test_fsq_indices_refuses_off_grid_codes_like_the_reference():
    """(QNT.11) a code between grid points (0.3 with L=5: w*code + w = 2.6) is refused by torch as
    by the reference, with the same message; rounding it to the nearest point would silently give
    a wrong token.  Codes one float32 rounding off the grid (fsq_quantize's float32 output) pass."""
    levels = [5, 5]
    bad = np.array([[0.3, 0.0]])
    with pytest.raises(ValueError) as want:
        RQ.fsq_indices(bad, levels)
    for dtype in (F64, torch.float32):
        with pytest.raises(ValueError) as got:
            T.fsq_indices(torch.tensor(bad, dtype=dtype), levels)
        assert str(got.value) == str(want.value)
        assert str(got.value).startswith("fsq_indices: codes must lie on the FSQ grid")
    on_grid = RQ.fsq_codes(np.arange(7 * 3), [7, 3]).astype(np.float32)  # 1/3 etc. rounded once
    assert np.array_equal(T.fsq_indices(torch.from_numpy(on_grid), [7, 3]).numpy(), np.arange(21))


def test_fsq_torch_op_matches_reference_opcheck_compile():
    """(QNT.10) the custom op: float32 / float64 / float16 / bfloat16 values = the reference on the
    widened input (the bound in float64: the same codes whatever the dtype), the gradient in z's
    dtype; torch.library.opcheck; torch.compile(fullgraph=True) value and gradient = eager."""
    levels = [8, 5, 5, 5]
    z64 = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(2), dtype=F64) * 2
    for dtype in (torch.float32, F64, torch.float16, torch.bfloat16):
        z = z64.to(dtype, copy=True).requires_grad_()
        out = T.fsq_quantize(z, levels)
        assert out.dtype == (F64 if dtype == F64 else torch.float32)
        want = RQ.fsq_quantize(z.detach().double().numpy(), levels)
        assert np.array_equal(out.detach().double().numpy(), want.astype(np.float32).astype(np.float64))
        (g,) = torch.autograd.grad(out.sum(), z)
        assert g.dtype == dtype
        (rg,) = RQ.fsq_quantize_backward(z.detach().double().numpy(), np.ones(z.shape), levels)
        tol = {F64: 1e-14, torch.float32: 1e-6}.get(dtype, 1e-2)  # the gradient rounded to the dtype
        assert rel_err(g.double(), rg) < tol, dtype
    for dtype in (torch.float32, F64):
        torch.library.opcheck(
            torch.ops.genloss.fsq_quantize, (z64.to(dtype, copy=True).requires_grad_(), levels)
        )
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: T.fsq_quantize(x, levels), fullgraph=True, backend="aot_eager")
    z = z64.clone().requires_grad_()
    zc = z64.clone().requires_grad_()
    out, outc = T.fsq_quantize(z, levels), compiled(zc)
    assert torch.equal(out, outc)
    out.square().sum().backward()
    outc.square().sum().backward()
    assert torch.equal(z.grad, zc.grad)
    # a tokenizer's forward, compiled whole: codes -> indices -> codes (the int64 size check in plain
    # Python: it went through NumPy and broke the graph)
    tokens = torch.compile(
        lambda x: T.fsq_codes(T.fsq_indices(T.fsq_quantize(x, levels), levels), levels, dtype=F64),
        fullgraph=True, backend="aot_eager",
    )  # fmt: skip
    assert torch.equal(tokens(z64), T.fsq_quantize(z64, levels))
    huge = [RQ.FSQ_MAX_LEVEL] * 7  # 1000^7 > 2^63 - 1
    for call in (
        lambda: T.fsq_indices(torch.zeros(1, 7), huge),
        lambda: T.fsq_codes(torch.zeros(1, dtype=torch.int64), huge),
    ):
        with pytest.raises(
            ValueError, match=r"fsq_(indices|codes): levels: the codebook size .* does not fit in int64"
        ):
            call()


def test_fsq_matches_vector_quantize_pytorch():
    """(QNT.10, QNT.11) vector-quantize-pytorch's FSQ (optional peer).  Its bound uses (1 + eps) and
    artanh where the paper's uses (1 - eps) and tan: the codes agree wherever both bounded values
    are clear of a rounding boundary (by 0.01), the gradients to (1 + eps)/(1 - eps) - 1 ~ 2e-3;
    codes_to_indices / indices_to_codes = fsq_indices / fsq_codes exactly."""
    peer("einops")
    vqp = peer("vector_quantize_pytorch")
    levels = [8, 5, 5, 5]
    fsq = vqp.FSQ(levels).double()
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
    lv = torch.tensor(levels, dtype=F64)
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    ours_h, theirs_h = (lv - 1) * (1 - 1e-3) / 2, (lv - 1) * (1 + 1e-3) / 2
    b1 = torch.tanh(z + torch.tan(offset / ours_h)) * ours_h - offset
    b2 = torch.tanh(z + torch.atanh(offset / theirs_h)) * theirs_h - offset
    clear = ((b1 - b1.floor() - 0.5).abs() > 0.01) & ((b2 - b2.floor() - 0.5).abs() > 0.01)
    zg = z.clone().requires_grad_()
    theirs = fsq.bound(zg)
    ours = T.fsq_quantize(z, levels)
    assert clear.float().mean() > 0.9
    assert torch.equal(ours[clear], theirs.detach()[clear])
    (g_theirs,) = torch.autograd.grad(theirs.sum(), zg)
    (g_ours,) = RQ.fsq_quantize_backward(z.numpy(), np.ones(z.shape), levels)
    assert rel_err(g_ours, g_theirs) < 2.5e-3
    n = math.prod(levels)
    codes = T.fsq_codes(torch.arange(n), levels, dtype=F64)
    assert torch.equal(fsq.codes_to_indices(codes).long(), torch.arange(n))
    assert torch.equal(fsq.indices_to_codes(torch.arange(n)).double(), codes)


# ============================================================================= adaptive weight (QNT.12)


def taming_weight(nll_loss, g_loss, last_layer):
    """taming-transformers' VQLPIPSWithDiscriminator.calculate_adaptive_weight (its
    discriminator_weight factor left out)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach()


def _decoder_losses(seed=0, gan_scale=1.0):
    """A 2-layer decoder's reconstruction (L1) and hinge generator losses, and its last layer."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=gen, dtype=F64)
    target = torch.randn(8, 6, generator=gen, dtype=F64)
    w1 = torch.randn(7, 5, generator=gen, dtype=F64, requires_grad=True)
    last = torch.randn(6, 7, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.zeros(6, dtype=F64, requires_grad=True)
    out = torch.relu(x @ w1.T) @ last.T + bias
    critic = torch.randn(6, generator=gen, dtype=F64)
    return (out - target).abs().mean(), -gan_scale * (out @ critic).mean(), last, bias


def test_adaptive_weight_matches_taming():
    """(QNT.12) = taming's lines on autograd gradients of a real decoder's last layer; a list
    (weight, bias) = the norm over both; clamped at max_weight and at 0-gradient; detached."""
    nll, g_loss, last, bias = _decoder_losses()
    want = taming_weight(nll, g_loss, last)
    r = torch.autograd.grad(nll, last, retain_graph=True, create_graph=True)[0]
    g = torch.autograd.grad(g_loss, last, retain_graph=True, create_graph=True)[0]
    got = T.adaptive_gan_weight(r, g)
    assert not got.requires_grad and got.dtype == F64
    assert rel_err(got, want) < REL
    assert rel_err(RQ.adaptive_gan_weight(r.detach().numpy(), g.detach().numpy()), want) < REL
    rb, gb = (
        torch.autograd.grad(nll, bias, retain_graph=True)[0],
        torch.autograd.grad(g_loss, bias, retain_graph=True)[0],
    )
    both = torch.norm(torch.cat([r.flatten(), rb])) / (torch.norm(torch.cat([g.flatten(), gb])) + 1e-4)
    assert rel_err(T.adaptive_gan_weight([r, rb], [g, gb]), both) < REL
    # the clamps: a vanishing GAN gradient gives ||r|| / eps, clamped to max_weight
    # (the norm summed in another order than torch.norm's: equal to rounding, not bit for bit)
    assert (
        rel_err(T.adaptive_gan_weight(r, torch.zeros_like(g)), min(float(r.detach().norm()) / 1e-4, 1e4))
        < REL
    )
    assert float(T.adaptive_gan_weight(100 * r, torch.zeros_like(g))) == 1e4
    assert float(T.adaptive_gan_weight(r, g, max_weight=0.01)) == 0.01
    small = torch.full((3,), 1e-9, dtype=F64)
    assert rel_err(T.adaptive_gan_weight(small, torch.zeros(3, dtype=F64)), math.sqrt(3) * 1e-9 / 1e-4) < REL
    # float16 gradients: the squares summed in float64, the value in float32
    h = T.adaptive_gan_weight(r.detach().half(), g.detach().half())
    assert h.dtype == torch.float32
    assert (
        rel_err(
            h, RQ.adaptive_gan_weight(r.detach().half().double().numpy(), g.detach().half().double().numpy())
        )
        < 1e-6
    )


def _adaptive_worker(rank, port, out_dir):
    import torch.distributed as dist

    init_gloo(rank, port, 2)
    try:
        nll, g_loss, last, _ = _decoder_losses(seed=5)
        r = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g = torch.autograd.grad(g_loss, last)[0]
        rows = (slice(0, 4), slice(4, 6))[rank]  # unequal row shards of the (6, 7) last layer
        sharded = T.adaptive_gan_weight(r[rows], g[rows], group=dist.group.WORLD)
        local = T.adaptive_gan_weight(r[rows], g[rows])  # what an unaware implementation computes
        torch.save({"sharded": sharded, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_adaptive_weight_sharded_gloo_two_ranks():
    """(QNT.12) the last layer split by rows across 2 gloo processes: each rank's weight (squared
    norms all-reduced) = the unsharded one (1e-12); the shard-local ratio is not."""
    nll, g_loss, last, _ = _decoder_losses(seed=5)
    want = taming_weight(nll, g_loss, last)
    res = run_workers(_adaptive_worker, 2)
    for got in res:
        assert rel_err(got["sharded"], want) < REL
        assert rel_err(got["local"], want) > 1e-3


# ============================================================================= path length (QNT.13)


def ada_path_length(pl_grads, pl_mean_buffer, pl_decay):
    """stylegan2-ada's StyleGAN2Loss.accumulate_gradients, phase Greg (before pl_weight)."""
    pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
    pl_mean = pl_mean_buffer.lerp(pl_lengths.mean(), pl_decay)
    new_buffer = pl_mean.detach()
    pl_penalty = (pl_lengths - pl_mean).square()
    return pl_penalty.mean(), new_buffer


def _tiny_generator(seed, batch=4, num_ws=3, w_dim=5):
    """img = tanh(ws A) as (B, 2, 3, num_ws * ...) images; ws broadcast over num_ws; A the weights."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(w_dim, 6, generator=gen, dtype=F64, requires_grad=True)
    ws = torch.randn(batch, 1, w_dim, generator=gen, dtype=F64).repeat(1, num_ws, 1).requires_grad_()
    img = (
        torch.tanh(ws @ A).reshape(batch, num_ws, 2, 3)
        * torch.arange(1.0, num_ws + 1, dtype=F64)[:, None, None]
    )
    noise = torch.randn(img.shape, generator=gen, dtype=F64) / math.sqrt(img.shape[2] * img.shape[3])
    (pl_grads,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
    return A, pl_grads


@pytest.mark.parametrize("decay", [0.01, 0.5])
def test_path_length_matches_stylegan2_ada(decay):
    """(QNT.13) = stylegan2-ada's lines: penalty, new mean, and the generator's gradient through
    autograd.grad(create_graph=True) (double backward of the penalty); the reference too."""
    A, pl_grads = _tiny_generator(0)
    buf = torch.tensor(0.7, dtype=F64)
    want, want_mean = ada_path_length(pl_grads, buf, decay)
    (want_A,) = torch.autograd.grad(want, A, retain_graph=True)
    got, got_mean = T.path_length_penalty(pl_grads, buf, decay)
    assert not got_mean.requires_grad
    assert rel_err(got, want) < REL and rel_err(got_mean, want_mean) < REL
    (got_A,) = torch.autograd.grad(got, A)
    assert rel_err(got_A, want_A) < 1e-10
    p, m = RQ.path_length_penalty(pl_grads.detach().numpy(), 0.7, decay)
    assert rel_err(p, want) < REL and rel_err(m, want_mean) < REL
    # the reference backward = autograd through stylegan2-ada's lines (the lerp's dependence included)
    g = pl_grads.detach().requires_grad_()
    (want_g,) = torch.autograd.grad(ada_path_length(g, buf, decay)[0], g)
    (ref_g,) = RQ.path_length_penalty_backward(g.detach().numpy(), 0.7, 1.0, decay)
    assert rel_err(ref_g, want_g) < REL


@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 6), (1, 2, 3), (2, 2, 3, 4)], ids=str)
def test_path_length_backward_fd(shape):
    """(QNT.13) the reference backward = central differences (one sample exactly 0: the defined
    gradient 0 is what central differences give, the norm being even along lines through 0)."""
    rng = np.random.default_rng(7)
    g = rng.normal(size=shape)
    if shape[0] > 1:
        g[1] = 0.0
    go = 1.7
    (grad,) = RQ.path_length_penalty_backward(g, 0.4, go, 0.3)
    numeric = central_fd(lambda x: go * float(RQ.path_length_penalty(x, 0.4, 0.3)[0]), g)
    assert rel_err(grad, numeric) < 1e-7
    if shape[0] > 1:
        assert np.array_equal(grad[1], np.zeros(shape[1:]))


def test_path_length_double_backward():
    """(QNT.13) torch's op is twice differentiable: gradcheck and gradgradcheck in float64 (away from
    the zero-length point, where the first derivative jumps)."""
    g = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(8), dtype=F64, requires_grad=True)
    m = torch.tensor(0.9, dtype=F64)

    def penalty(x):
        return T.path_length_penalty(x, m, 0.2)[0]

    assert torch.autograd.gradcheck(penalty, (g,))
    assert torch.autograd.gradgradcheck(penalty, (g,))


def test_path_length_finite_at_one_sample_and_zero_length():
    """(QNT.13) B = 1 and a zero-length sample: value, gradient and second derivative finite, the
    gradient 0 on the zero sample (stylegan2-ada's sqrt gives NaN there); the new mean is the EMA."""
    g = torch.tensor([[[0.3, -0.4]]], dtype=F64, requires_grad=True)  # B = 1, length 0.5
    p, m = T.path_length_penalty(g, 0.2, 0.01)
    assert rel_err(m, 0.2 + 0.01 * (0.5 - 0.2)) < REL
    assert rel_err(p, (0.5 - float(m)) ** 2) < REL
    z = torch.zeros(2, 3, 4, dtype=F64)
    z[1] = 1.0
    z.requires_grad_()
    p, _ = T.path_length_penalty(z, 0.5, 0.01)
    (dz,) = torch.autograd.grad(p, z, create_graph=True)
    assert torch.isfinite(dz).all() and torch.equal(dz[0].detach(), torch.zeros(3, 4, dtype=F64))
    (ddz,) = torch.autograd.grad(dz.square().sum(), z)
    assert torch.isfinite(ddz).all()
    za = z.detach().clone().requires_grad_()
    (da,) = torch.autograd.grad(ada_path_length(za, torch.tensor(0.5, dtype=F64), 0.01)[0], za)
    assert torch.isnan(da[0]).all()  # the official code at the zero-length point
    (ref_dz,) = RQ.path_length_penalty_backward(z.detach().numpy(), 0.5, 1.0, 0.01)
    assert rel_err(dz, ref_dz) < REL


# ============================================================================= lazy R1 (QNT.14)


def test_lazy_r1_is_k_times_the_eager_penalty():
    """(QNT.14) the lazy R1 term every k steps = r1_penalty_from_grads with gamma * k = k times the
    eager penalty (value and gradient), = stylegan2-ada's loss_Dr1 with gain = D_reg_interval."""
    k, gamma = 16, 0.8
    rng = np.random.default_rng(9)
    grads = rng.normal(size=(5, 3, 4, 4))
    eager, lazy = RG.r1_penalty_from_grads(grads, gamma), RG.r1_penalty_from_grads(grads, gamma * k)
    assert rel_err(lazy, k * eager) < REL
    (ge,) = RG.r1_penalty_from_grads_backward(grads, 1.0, gamma)
    (gl,) = RG.r1_penalty_from_grads_backward(grads, 1.0, gamma * k)
    assert rel_err(gl, k * ge) < REL
    r1_grads = torch.tensor(grads, requires_grad=True)
    ada = (r1_grads.square().sum([1, 2, 3]) * (gamma / 2)).mean().mul(k)  # loss_Dr1.mean().mul(gain)
    (ada_g,) = torch.autograd.grad(ada, r1_grads)
    t = torch.tensor(grads, requires_grad=True)
    ours = T.r1_penalty_from_grads(t, gamma * k)
    (ours_g,) = torch.autograd.grad(ours, t)
    assert rel_err(ours, ada) < REL and rel_err(ours_g, ada_g) < REL
    # stylegan2-ada's training_loop: mb_ratio = reg_interval / (reg_interval + 1), lr and betas adjusted
    lr, betas = 0.0025, (0.0, 0.99)
    mb_ratio = k / (k + 1)
    gain, lr2, betas2 = T.lazy_regularization(k, lr, betas)
    assert gain == k and lr2 == lr * mb_ratio and betas2 == tuple(beta**mb_ratio for beta in betas)
    assert RQ.lazy_regularization(1, lr, betas) == (1.0, lr * 0.5, tuple(b**0.5 for b in betas))


# ============================================================================= LPIPS head (QNT.15)


def official_lpips(feats0, feats1, lins):
    """The lpips package: normalize_tensor, (f0 - f1)**2, NetLinLayer's 1x1 conv (no bias, eval:
    no dropout), spatial_average(keepdim=True), the sum over layers; reshaped to (B,)."""

    def normalize_tensor(in_feat, eps=1e-10):
        norm_factor = torch.sqrt(torch.sum(in_feat**2, dim=1, keepdim=True))
        return in_feat / (norm_factor + eps)

    val = 0
    for f0, f1, w in zip(feats0, feats1, lins, strict=True):
        diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
        val = val + torch.nn.functional.conv2d(diff, w.reshape(1, -1, 1, 1)).mean([2, 3], keepdim=True)
    return val.reshape(-1)


def _lpips_inputs(seed=10, shapes=((3, 4, 5), (6, 2, 3), (2, 1, 1)), batch=2):
    rng = np.random.default_rng(seed)
    fx = [rng.normal(size=(batch, *s)) for s in shapes]
    fy = [rng.normal(size=(batch, *s)) for s in shapes]
    ws = [rng.uniform(0.0, 1.0, size=s[0]) for s in shapes]
    return fx, fy, ws


def test_lpips_matches_the_official_composite():
    """(QNT.15) value and the gradients w.r.t. both features and the weights: reference, reference
    backward and torch op = autograd through the official formula (float64, 1e-12)."""
    fx, fy, ws = _lpips_inputs()
    tx, ty, tw = ([torch.tensor(a, requires_grad=True) for a in arrs] for arrs in (fx, fy, ws))
    up = torch.tensor([0.7, -1.3], dtype=F64)
    want = official_lpips(tx, ty, tw)
    want_grads = torch.autograd.grad(want, [*tx, *ty, *tw], up)
    assert rel_err(RQ.lpips_head(fx, fy, ws), want) < REL
    gx, gy, gw = RQ.lpips_head_backward(fx, fy, ws, up.numpy())
    for got, w in zip([*gx, *gy, *gw], want_grads, strict=True):
        assert rel_err(got, w) < REL
    got = T.lpips_head(tx, ty, tw)
    assert rel_err(got, want) < REL
    for g, w in zip(torch.autograd.grad(got, [*tx, *ty, *tw], up), want_grads, strict=True):
        assert rel_err(g, w) < REL
    # the official conv weight shape (1, C, 1, 1) is taken as it is, its gradient in that shape
    w4 = [np.asarray(w).reshape(1, -1, 1, 1) for w in ws]
    assert rel_err(RQ.lpips_head(fx, fy, w4), want) < REL
    assert RQ.lpips_head_backward(fx, fy, w4, up.numpy())[2][0].shape == w4[0].shape


def test_lpips_backward_fd():
    """(QNT.15) the reference backward = central differences for every features and weights entry."""
    fx, fy, ws = _lpips_inputs(seed=11, shapes=((3, 2, 2), (2, 1, 3)))
    up = np.array([1.2, -0.4])
    gx, gy, gw = RQ.lpips_head_backward(fx, fy, ws, up)
    for lists, grads in ((fx, gx), (fy, gy), (ws, gw)):
        for i, a in enumerate(lists):

            def f(v, lists=lists, i=i):
                saved = lists[i]
                lists[i] = v
                try:
                    return float(up @ RQ.lpips_head(fx, fy, ws))
                finally:
                    lists[i] = saved

            assert rel_err(grads[i], central_fd(f, np.array(a))) < 1e-7


def test_lpips_identical_zero_and_low_precision():
    """(QNT.15) identical features give exactly 0 (and 0 gradients); a zero feature vector gives a
    finite gradient (a / eps, the official formula's NaN); float16 / bfloat16 features are computed
    in float32 (= float32 on the widened inputs)."""
    fx, _, ws = _lpips_inputs(seed=12)
    tx = [torch.tensor(a, requires_grad=True) for a in fx]
    tw = [torch.tensor(w) for w in ws]
    d = T.lpips_head(tx, [t.detach().clone() for t in tx], tw)
    assert torch.equal(d, torch.zeros(2, dtype=F64))
    assert np.array_equal(RQ.lpips_head(fx, fx, ws), np.zeros(2))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(d.sum(), tx))
    x0 = [t.detach().clone() for t in tx]
    x0[0][0, :, 1, 2] = 0.0
    x0 = [t.requires_grad_() for t in x0]
    y0 = [torch.tensor(a) for a in _lpips_inputs(seed=13)[0]]
    (gx0,) = torch.autograd.grad(T.lpips_head(x0, y0, tw).sum(), x0[:1])
    assert torch.isfinite(gx0).all()
    (ref_gx0,) = RQ.lpips_head_backward(
        [t.detach().numpy() for t in x0], [t.numpy() for t in y0], ws, np.ones(2)
    )[0][:1]
    assert rel_err(gx0, ref_gx0) < REL
    (off,) = torch.autograd.grad(official_lpips(x0, y0, tw).sum(), x0[:1])
    assert torch.isnan(off[0, :, 1, 2]).all()  # the official composite at a zero vector
    for low in (torch.float16, torch.bfloat16):
        xl = [t.detach().to(low) for t in tx]
        yl = [t.to(low) for t in y0]
        wl = [w.to(low) for w in tw]
        got = T.lpips_head(xl, yl, wl)
        assert got.dtype == torch.float32
        want = T.lpips_head([t.float() for t in xl], [t.float() for t in yl], [w.float() for w in wl])
        assert torch.equal(got, want)


def test_lpips_autocast_and_mixed_dtypes():
    """(QNT.15) under float16 autocast the head is computed in float32 with autocast off: with 4096
    positions and weights 50 the spatial sum (~1.4e5) exceeds float16's 65504, which gave inf;
    now the value = the float64 reference (float32 rounding) and = the float32 call without
    autocast, bit for bit; bfloat16 autocast returns float32 too.  Mixed float64 / float32 inputs
    are promoted (float64), their gradients in each input's dtype."""
    g = torch.Generator().manual_seed(20)
    x = torch.relu(torch.randn(2, 8, 64, 64, generator=g))
    y = torch.relu(torch.randn(2, 8, 64, 64, generator=g))
    w = torch.full((8,), 50.0)
    want = RQ.lpips_head([x.double().numpy()], [y.double().numpy()], [w.double().numpy()])
    plain = T.lpips_head([x], [y], [w])
    for low in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=low):
            got = T.lpips_head([x], [y], [w])
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), low
        assert torch.equal(got, plain), low
        assert rel_err(got, want) < 1e-5, low
    xs = [torch.tensor(a, requires_grad=True) for a in _lpips_inputs(seed=14)[0]]
    ys = [torch.tensor(a) for a in _lpips_inputs(seed=15)[0]]
    ws = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in _lpips_inputs(seed=14)[2]]
    got = T.lpips_head(xs, ys, ws)
    assert got.dtype == F64
    ws64 = [w.detach().double() for w in ws]
    assert (
        rel_err(
            got,
            RQ.lpips_head(
                [a.detach().numpy() for a in xs], [a.numpy() for a in ys], [w.numpy() for w in ws64]
            ),
        )
        < REL
    )
    gws = torch.autograd.grad(got.sum(), ws)
    rgw = RQ.lpips_head_backward([a.detach().numpy() for a in xs], [a.numpy() for a in ys],
                                 [w.numpy() for w in ws64], np.ones(2))[2]  # fmt: skip
    for gw, r in zip(gws, rgw, strict=True):
        assert gw.dtype == torch.float32 and rel_err(gw.double(), r) < 1e-6


# ============================================================================= bad input, NaN (QNT.16)


def _t(*shape):
    return torch.ones(shape, dtype=F64)


BAD = [
    # (call, error, op, argument named)
    (lambda: RQ.fsq_quantize(np.ones((2, 3)), []), ValueError, "fsq_quantize", "levels"),
    (lambda: RQ.fsq_quantize(np.ones((2, 1)), [1]), ValueError, "fsq_quantize", "levels"),
    (lambda: RQ.fsq_quantize(np.ones((2, 1)), [2.5]), TypeError, "fsq_quantize", "levels"),
    (lambda: RQ.fsq_quantize(np.ones((2, 3)), [5, 5]), ValueError, "fsq_quantize", "z"),
    (lambda: T.fsq_quantize(_t(2, 3), []), ValueError, "fsq_quantize", "levels"),
    (lambda: T.fsq_quantize(_t(2, 3), [5, 5]), ValueError, "fsq_quantize", "z"),
    (lambda: T.fsq_quantize(torch.ones(2, 2, dtype=torch.int64), [5, 5]), TypeError, "fsq_quantize", "z"),
    (lambda: T.fsq_quantize(_t(2, 1), 5), TypeError, "fsq_quantize", "levels"),
    (lambda: RQ.adaptive_gan_weight(np.ones(3), np.ones(3), max_weight=-1.0), ValueError, "adaptive_gan_weight", "max_weight"),
    (lambda: RQ.adaptive_gan_weight(np.ones(3), np.ones(3), eps=float("nan")), ValueError, "adaptive_gan_weight", "eps"),
    (lambda: RQ.adaptive_gan_weight(np.ones(3), np.ones(3), eps=0.0), ValueError, "adaptive_gan_weight", "eps"),
    (lambda: RQ.adaptive_gan_weight([np.ones(3)], [np.ones(3), np.ones(2)]), ValueError, "adaptive_gan_weight", "gan_grads"),
    (lambda: RQ.adaptive_gan_weight(np.ones(3), np.ones(4)), ValueError, "adaptive_gan_weight", "gan_grads"),
    (lambda: RQ.adaptive_gan_weight([], []), ValueError, "adaptive_gan_weight", "rec_grads"),
    (lambda: T.adaptive_gan_weight(_t(3), _t(3), max_weight=-1.0), ValueError, "adaptive_gan_weight", "max_weight"),
    (lambda: T.adaptive_gan_weight(_t(3), _t(3), max_weight=float("inf")), ValueError, "adaptive_gan_weight", "max_weight"),
    (lambda: T.adaptive_gan_weight([_t(3)], [_t(3), _t(2)]), ValueError, "adaptive_gan_weight", "gan_grads"),
    (lambda: T.adaptive_gan_weight(_t(3), _t(4)), ValueError, "adaptive_gan_weight", "gan_grads"),
    (lambda: T.adaptive_gan_weight(np.ones(3), _t(3)), TypeError, "adaptive_gan_weight", "rec_grads"),
    (lambda: RQ.path_length_penalty(np.ones((2, 3)), 0.0, decay=1.5), ValueError, "path_length_penalty", "decay"),
    (lambda: RQ.path_length_penalty(np.ones((2, 3)), 0.0, decay=float("inf")), ValueError, "path_length_penalty", "decay"),
    (lambda: RQ.path_length_penalty(np.ones(3), 0.0), ValueError, "path_length_penalty", "grads_w"),
    (lambda: RQ.path_length_penalty(np.ones((0, 3)), 0.0), ValueError, "path_length_penalty", "grads_w"),
    (lambda: RQ.path_length_penalty(np.ones((2, 3)), np.ones(2)), ValueError, "path_length_penalty", "pl_mean"),
    (lambda: T.path_length_penalty(_t(2, 3), 0.0, decay=-0.1), ValueError, "path_length_penalty", "decay"),
    (lambda: T.path_length_penalty(_t(3), 0.0), ValueError, "path_length_penalty", "grads_w"),
    (lambda: T.path_length_penalty(_t(2, 3), _t(2)), ValueError, "path_length_penalty", "pl_mean"),
    (lambda: T.path_length_penalty(_t(2, 3), _t().requires_grad_()), ValueError, "path_length_penalty", "pl_mean"),
    (lambda: T.path_length_penalty(_t(2, 3), "0"), TypeError, "path_length_penalty", "pl_mean"),
    (lambda: RQ.lazy_regularization(0, 0.1), ValueError, "lazy_regularization", "interval"),
    (lambda: RQ.lazy_regularization(4, -0.1), ValueError, "lazy_regularization", "lr"),
    (lambda: RQ.lazy_regularization(4, 0.1, (0.9, 1.0)), ValueError, "lazy_regularization", "betas"),
    (lambda: RQ.lpips_head([np.ones((1, 2, 2, 2))], [np.ones((1, 2, 2, 2))], []), ValueError, "lpips_head", "weights"),
    (lambda: RQ.lpips_head([np.ones((1, 2, 2, 2))], [np.ones((1, 2, 2, 3))], [np.ones(2)]), ValueError, "lpips_head", "features_y[0]"),
    (lambda: RQ.lpips_head([np.ones((1, 2, 2))], [np.ones((1, 2, 2))], [np.ones(2)]), ValueError, "lpips_head", "features_x[0]"),
    (lambda: RQ.lpips_head([np.ones((1, 2, 2, 2))], [np.ones((1, 2, 2, 2))], [np.ones(3)]), ValueError, "lpips_head", "weights[0]"),
    (lambda: RQ.lpips_head([np.ones((1, 2, 2, 2))], [np.ones((1, 2, 2, 2))], [-np.ones(2)]), ValueError, "lpips_head", "weights[0]"),
    (lambda: T.lpips_head([_t(1, 2, 2, 2)], [_t(1, 2, 2, 2)], []), ValueError, "lpips_head", "weights"),
    (lambda: T.lpips_head([_t(1, 2, 2, 2)], [_t(1, 2, 2, 3)], [_t(2)]), ValueError, "lpips_head", "features_y[0]"),
    (lambda: T.lpips_head([_t(1, 2, 2, 2), _t(2, 2, 2, 2)], [_t(1, 2, 2, 2), _t(2, 2, 2, 2)], [_t(2), _t(2)]),
     ValueError, "lpips_head", "features_x[1]"),
    (lambda: T.lpips_head([_t(1, 2, 2, 2)], [_t(1, 2, 2, 2)], [-_t(2)]), ValueError, "lpips_head", "weights[0]"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "op", "arg"), BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_op_and_argument(call, error, op, arg):
    """(QNT.16) every layer: the error type, the op's name first, the argument named."""
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{op}: ") and arg in msg, msg


def test_nan_in_nan_out():
    """(QNT.16) NaN in the data gives NaN where it reaches (FSQ: that entry; LPIPS: that sample),
    in every layer; never an exception, never a finite stand-in."""
    z = np.ones((2, 3))
    z[1, 2] = np.nan
    for out in (RQ.fsq_quantize(z, [5, 5, 5]), T.fsq_quantize(torch.tensor(z), [5, 5, 5]).numpy()):
        assert np.array_equal(np.isnan(out), np.isnan(z))
    g = np.ones((2, 3))
    g[0, 1] = np.nan
    assert np.isnan(RQ.adaptive_gan_weight(g, np.ones((2, 3))))
    assert torch.isnan(T.adaptive_gan_weight(_t(2, 3), torch.tensor(g)))
    assert all(np.isnan(v) for v in RQ.path_length_penalty(g, 0.5))
    assert all(torch.isnan(v) for v in T.path_length_penalty(torch.tensor(g), 0.5))
    assert np.isnan(RQ.path_length_penalty(np.ones((2, 3)), float("nan"))[0])
    fx, fy, ws = _lpips_inputs(seed=14)
    fx[1][0, 0, 0, 0] = np.nan
    for d in (
        RQ.lpips_head(fx, fy, ws),
        T.lpips_head(*([torch.tensor(a) for a in arrs] for arrs in (fx, fy, ws))).numpy(),
    ):
        assert np.isnan(d[0]) and np.isfinite(d[1])


def test_fsq_codes_takes_integer_indices_and_gives_float_codes():
    """fsq_codes: bool indices are refused as the reference refuses them, and an integer dtype
    for the codes (which truncated the +-0.5 codes of even levels to 0) is refused by name."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    with pytest.raises(TypeError, match="^fsq_codes: indices must be an integer torch.Tensor"):
        gt.fsq_codes(torch.tensor([True, False]), [4, 5])
    with pytest.raises(TypeError, match="^fsq_codes: dtype must be a floating torch.dtype"):
        gt.fsq_codes(torch.tensor([1, 2]), [4, 5], dtype=torch.int64)


def test_lpips_head_float32_features_of_any_magnitude():
    """(QNT.15) The head is scale invariant: float32 features of 1e19 and 1e20 (whose squares
    overflow float32) give the reference's value at scale 1, as they did below 1e19 (they gave
    0.47 and then 0, for 0.56)."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("genloss.torch")
    from genloss.reference import quant as RQ

    g = torch.Generator().manual_seed(0)
    x, y = ([torch.randn(2, 8, 4, 4, generator=g)] for _ in range(2))
    w = [torch.rand(8, generator=g)]
    want = RQ.lpips_head([x[0].double().numpy()], [y[0].double().numpy()], [w[0].double().numpy()])
    for scale in (1e19, 1e20, 1e30):
        got = gt.lpips_head([x[0] * scale], [y[0] * scale], w)
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-6)
