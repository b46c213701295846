r"""Tokenizers and GAN-training regularizers (the ``quant`` family), NumPy reference (float64).

Read next to ``derivations/quant.md``; the tags ``(QNT.n)`` in the comments name its
equations.  Forward functions and their analytic ``<name>_backward(..., grad_output)``.
Bad input raises ``ValueError`` / ``TypeError`` whose message starts with the op's name
and names the argument.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _checks
from . import _common
from ._common import as_float64, batch_array, batch_broadcast, result, scalar_grad

# ============================================================================= quantizers (QNT.1-QNT.9)
# vector_quantize (QNT.1-QNT.4), vq_ema_update (QNT.5, QNT.6), lfq_entropy_loss (QNT.7-QNT.9).
_QUANTIZER_NAMES: list[str] = [
    "vector_quantize",
    "vector_quantize_backward",
    "vq_ema_update",
    "lfq_entropy_loss",
    "lfq_entropy_loss_backward",
]

LFQ_MAX_BITS = 20  # 2^d codebook accumulators: 2^20 float64 = 8 MiB; beyond, refused (the 2^d work too)
_VQ_CHUNK_ELEMS = 1 << 22  # rows per chunk of the reference's distance blocks: chunk * K * D <= this
_LFQ_CHUNK = 1024  # rows per chunk of the LFQ codebook accumulation: memory O(chunk 2^(d/2) + 2^d)


def _points(op: str, name: str, x: object, what: str) -> np.ndarray:
    """A float64 (n, D) array with n >= 1 and D >= 1; the error names op and argument."""
    with _checks.named_errors(op):
        a = _common.as_float64(name, x)
        if a.ndim != 2:
            raise ValueError(f"{name} must have shape ({what}), got shape {a.shape}")
        if a.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {a.shape}); the mean over it is undefined")
        if a.shape[1] == 0:
            raise ValueError(f"{name} has no features (shape {a.shape})")
    return a


def vq_inputs(z: object, codebook: object, beta: object) -> tuple[np.ndarray, np.ndarray, float]:
    """(QNT.1) z (N, D), codebook (K, D) with K >= 1, beta >= 0; errors name vector_quantize and the argument."""
    zz = _points("vector_quantize", "z", z, "N, D")
    e = _points("vector_quantize", "codebook", codebook, "K, D")
    with _checks.named_errors("vector_quantize"):
        if e.shape[1] != zz.shape[1]:
            raise ValueError(f"codebook must have the dimension of z (D={zz.shape[1]}), got shape {e.shape}")
        b = _checks.nonnegative("beta", beta)
    return zz, e, b


def nearest_codes(z: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(QNT.2, QNT.3) argmin_k ||z_i - e_k||^2 from exact float64 differences, in row chunks (no N x K x D array
    beyond a chunk): ties go to the lowest index (np.argmin's first occurrence); a NaN distance (a NaN code) is
    never chosen while another is a number; a row whose distances are all NaN (a NaN in z_i) gets index 0.
    Returns (indices int64, squared distances)."""
    n, k = z.shape[0], e.shape[0]
    step = max(1, _VQ_CHUNK_ELEMS // max(1, k * z.shape[1]))
    idx = np.empty(n, dtype=np.int64)
    for i in range(0, n, step):
        d = ((z[i : i + step, None, :] - e[None, :, :]) ** 2).sum(axis=-1)
        idx[i : i + step] = np.argmin(np.where(np.isnan(d), np.inf, d), axis=1)
    dist = ((z - e[idx]) ** 2).sum(axis=1)
    return idx, dist


def vector_quantize(z, codebook, beta=0.25):
    r"""Nearest-code vector quantization with VQ-VAE's two loss terms (QNT.1-QNT.4).

    .. math::
        k_i = \arg\min_k \lVert z_i - e_k\rVert^2,\quad z_q = e_{k},\quad
        L_{commit} = \beta\,\frac{1}{ND}\sum_i\lVert z_i - \mathrm{sg}(e_{k_i})\rVert^2,\quad
        L_{codebook} = \frac{1}{ND}\sum_i\lVert \mathrm{sg}(z_i) - e_{k_i}\rVert^2

    Means over all N*D elements, as VQ-VAE/VQGAN (``torch.mean``) and vector-quantize-pytorch
    (``F.mse_loss``) take them.  z_q carries the straight-through gradient (d z_q / d z = identity,
    no gradient to the codebook through z_q).  Ties go to the lowest index; see :func:`nearest_codes`
    for NaN.

    Parameters
    ----------
    z : ndarray, shape [N, D]
    codebook : ndarray, shape [K, D]
    beta : float, >= 0

    Returns
    -------
    (z_q [N, D], indices [N] int64, commitment [], codebook_loss [])
    """
    zz, e, b = vq_inputs(z, codebook, beta)
    idx, dist = nearest_codes(zz, e)
    mean = dist.sum() / zz.size  # (QNT.1) the mean over N*D elements
    return _common.result(e[idx]), idx, _common.result(b * mean), _common.result(mean)


def vector_quantize_backward(z, codebook, grad_z_q, grad_commitment, grad_codebook_loss, beta=0.25):
    r"""Gradients of :func:`vector_quantize` w.r.t. z and the codebook (QNT.4).

    .. math::
        \frac{\partial}{\partial z_i} = g_{z_q,i} + g_c\,\frac{2\beta}{ND}(z_i - e_{k_i}),\qquad
        \frac{\partial}{\partial e_k} = g_b\,\frac{2}{ND}\sum_{i: k_i = k}(e_k - z_i)

    (the straight-through term passes g_{z_q} to z unchanged).

    Returns
    -------
    (grad_z [N, D], grad_codebook [K, D])
    """
    zz, e, b = vq_inputs(z, codebook, beta)
    with _checks.named_errors("vector_quantize"):
        gq = _common.as_float64("grad_z_q", grad_z_q)
        _checks.same_shape("z", zz.shape, "grad_z_q", gq.shape)
        gc = _common.scalar_grad("grad_commitment", grad_commitment)
        gb = _common.scalar_grad("grad_codebook_loss", grad_codebook_loss)
    idx, _ = nearest_codes(zz, e)
    diff = zz - e[idx]
    s = 2.0 / zz.size
    grad_z = gq + gc * b * s * diff  # (QNT.4)
    grad_e = np.zeros_like(e)
    np.add.at(grad_e, idx, -gb * s * diff)  # (QNT.4) the segment sum over the rows of each code
    return _common.result(grad_z), _common.result(grad_e)


def vq_ema_inputs(z, indices, cluster_size, embed_sum, decay, eps):
    """The checked inputs of vq_ema_update (QNT.5); errors name the op and the argument."""
    with _checks.named_errors("vq_ema_update"):
        e = _common.as_float64("embed_sum", embed_sum)
        if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
            raise ValueError(f"embed_sum must have shape (K, D) with K, D >= 1, got shape {e.shape}")
        k, dim = e.shape
        cs = _common.as_float64("cluster_size", cluster_size)
        if cs.shape != (k,):
            raise ValueError(f"cluster_size must have shape ({k},) (one count per code), got {cs.shape}")
        zz = _common.as_float64("z", z)
        if zz.ndim != 2 or zz.shape[1] != dim:
            raise ValueError(
                f"z must have shape (N, {dim}) (the dimension of embed_sum), got shape {zz.shape}"
            )
        idx = _common.labels_array("indices", indices, zz.shape[0], k)
        dec = _checks.finite("decay", decay)
        if not 0.0 <= dec <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {dec}")
        ep = _checks.positive("eps", eps)
    return zz, idx, cs, e, dec, ep


def vq_ema_update(z, indices, cluster_size, embed_sum, decay=0.99, eps=1e-5):
    r"""The EMA codebook update of VQ-VAE(-2) / vector-quantize-pytorch (QNT.5, QNT.6).

    .. math::
        n_k' = \gamma n_k + (1-\gamma)\,\#\{i: k_i = k\},\quad
        m_k' = \gamma m_k + (1-\gamma)\sum_{i: k_i = k} z_i,\quad
        e_k = \frac{m_k'}{\tilde n_k},\quad \tilde n_k = \frac{n_k' + \epsilon}{\sum_j n_j' + K\epsilon}\sum_j n_j'

    (gamma = ``decay``; the Laplace-smoothed counts keep a code no row chose away from 1/0).
    Not differentiable: a state update (run it under ``torch.no_grad``).

    Returns
    -------
    (cluster_size' [K], embed_sum' [K, D], codebook [K, D])
    """
    zz, idx, cs, e, dec, ep = vq_ema_inputs(z, indices, cluster_size, embed_sum, decay, eps)
    k = e.shape[0]
    counts = np.bincount(idx, minlength=k).astype(np.float64)
    sums = np.zeros_like(e)
    np.add.at(sums, idx, zz)  # (QNT.5) the segment sums
    ncs = dec * cs + (1.0 - dec) * counts
    nes = dec * e + (1.0 - dec) * sums
    n = ncs.sum()
    smoothed = (ncs + ep) / (n + k * ep) * n  # (QNT.6)
    return _common.result(ncs), _common.result(nes), _common.result(nes / smoothed[:, None])


def lfq_inputs(z, inv_temperature, sample_weight, codebook_weight):
    """(QNT.7) z (N, d) with N >= 1 and 1 <= d <= 20; errors name lfq_entropy_loss and the argument."""
    zz = _points("lfq_entropy_loss", "z", z, "N, d")
    with _checks.named_errors("lfq_entropy_loss"):
        if zz.shape[1] > LFQ_MAX_BITS:
            raise ValueError(
                f"z has d={zz.shape[1]} bits: the codebook entropy sums over 2^d codes, d <= {LFQ_MAX_BITS} "
                f"(split the code into groups of at most {LFQ_MAX_BITS} bits)"
            )
        tau = _checks.positive("inv_temperature", inv_temperature)
        sw = _checks.finite("sample_weight", sample_weight)
        cw = _checks.finite("codebook_weight", codebook_weight)
    return zz, tau, sw, cw


def bit_probs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigmoid(x), sigmoid(-x)), each without cancellation."""
    return _common.sigmoid(x), _common.sigmoid(-x)


def product_tables(q: np.ndarray, qm: np.ndarray) -> np.ndarray:
    """(n, 2^m): entry c = prod_j (bit j of c ? q[:, j] : qm[:, j]), bit 0 the lowest (QNT.7)."""
    tab = np.ones((q.shape[0], 1))
    for j in range(q.shape[1]):  # the new bit j is the high half: index t + 2^j
        tab = np.concatenate([tab * qm[:, j : j + 1], tab * q[:, j : j + 1]], axis=1)
    return tab


def _bit_entropy(x: np.ndarray) -> np.ndarray:
    """Binary entropy (nats) of sigmoid(x): log1p(e^-|x|) + |x| sigmoid(-|x|) (QNT.8)."""
    ax = np.abs(x)
    return np.log1p(np.exp(-ax)) + ax * _common.sigmoid(-ax)


def _lfq_codebook_probs(x: np.ndarray, dl: int) -> np.ndarray:
    """(QNT.9) mean_i p(. | z_i) as (2^(d-dl), 2^dl): p_i = A_i (high bits) outer B_i (low bits), streamed."""
    n = x.shape[0]
    p = None
    for i in range(0, n, _LFQ_CHUNK):
        q, qm = bit_probs(x[i : i + _LFQ_CHUNK])
        a = product_tables(q[:, dl:], qm[:, dl:])
        b = product_tables(q[:, :dl], qm[:, :dl])
        p = a.T @ b if p is None else p + a.T @ b
    assert p is not None
    return p / n


def lfq_entropy_loss(z, inv_temperature=100.0, sample_weight=1.0, codebook_weight=1.0):
    r"""The LFQ (MAGVIT-v2) entropy penalty over the 2^d codes c in {-1, +1}^d (QNT.7-QNT.9).

    .. math::
        p(c\mid z_i) = \mathrm{softmax}_c(\tau\langle z_i, c\rangle)
                     = \prod_j \sigma(2\tau z_{ij} c_j),\qquad
        L = w_s\,\frac1N\sum_i H(p(\cdot\mid z_i)) - w_c\,H\Big(\frac1N\sum_i p(\cdot\mid z_i)\Big)

    The per-sample entropy is exactly the sum of the d bit entropies (the softmax factorizes);
    the codebook entropy streams the 2^d mean probabilities (no N x 2^d array; d <= 20).
    vector-quantize-pytorch's LFQ takes the logits -inv_temperature ||z - c||^2 = 2 tau <z, c> - const:
    its ``inv_temperature`` t is ``inv_temperature = 2 t`` here (derivations/quant.md, QNT.7).

    Parameters
    ----------
    z : ndarray, shape [N, d], 1 <= d <= 20
    inv_temperature : float > 0
    sample_weight, codebook_weight : float (gamma = codebook_weight)

    Returns
    -------
    ndarray, shape []
    """
    zz, tau, sw, cw = lfq_inputs(z, inv_temperature, sample_weight, codebook_weight)
    x = 2.0 * tau * zz  # (QNT.7) bit logits
    per_sample = _bit_entropy(x).sum() / zz.shape[0]  # (QNT.8)
    if cw == 0.0:
        return _common.result(sw * per_sample)
    p = _lfq_codebook_probs(x, zz.shape[1] - zz.shape[1] // 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(
            p > 0, p * np.log(np.where(p > 0, p, 1.0)), np.where(np.isnan(p), p, 0.0)
        ).sum()  # (QNT.9)
    return _common.result(sw * per_sample - cw * h)


def _multilinear_grads(u: np.ndarray, q: np.ndarray, qm: np.ndarray) -> np.ndarray:
    """(n, m): d/dq_j of sum_c u[:, c] prod_k (bit k of c ? q_k : 1 - q_k): per bit j, the product table with
    bit j's factors replaced by (-1, +1), contracted with u (QNT.9)."""
    g = np.empty(q.shape)
    for j in range(q.shape[1]):
        qj, qmj = q.copy(), qm.copy()
        qj[:, j], qmj[:, j] = 1.0, -1.0
        g[:, j] = (u * product_tables(qj, qmj)).sum(axis=1)
    return g


def lfq_entropy_loss_backward(z, grad_output, inv_temperature=100.0, sample_weight=1.0, codebook_weight=1.0):
    r"""Gradient of :func:`lfq_entropy_loss` w.r.t. z (QNT.8, QNT.9).

    .. math::
        \frac{\partial L}{\partial z_{ij}} = \frac{2\tau\, q_{ij}(1-q_{ij})}{N}
            \Big(-w_s\,x_{ij} + w_c \sum_c \log P(c)\,\frac{\partial p_i(c)}{\partial q_{ij}}\Big),
        \quad x = 2\tau z,\ q = \sigma(x)

    Returns
    -------
    (grad_z [N, d],)
    """
    zz, tau, sw, cw = lfq_inputs(z, inv_temperature, sample_weight, codebook_weight)
    with _checks.named_errors("lfq_entropy_loss"):
        g = _common.scalar_grad("grad_output", grad_output)
    n, d = zz.shape
    x = 2.0 * tau * zz
    q, qm = bit_probs(x)
    inner = -sw * x  # (QNT.8) dh/dx = -x q (1 - q)
    if cw != 0.0:
        dl = d - d // 2
        p = _lfq_codebook_probs(x, dl)
        # an underflowed P(c) = 0: a finite log (that of the smallest double), as lfq_entropy in quant_cpu.cpp
        tiny = np.log(np.finfo(np.float64).smallest_subnormal)
        with np.errstate(divide="ignore", invalid="ignore"):
            m = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), np.where(p == 0, tiny, p))
        gq = np.empty((n, d))
        for i in range(0, n, _LFQ_CHUNK):
            qc, qmc = q[i : i + _LFQ_CHUNK], qm[i : i + _LFQ_CHUNK]
            a = product_tables(qc[:, dl:], qmc[:, dl:])
            b = product_tables(qc[:, :dl], qmc[:, :dl])
            gq[i : i + _LFQ_CHUNK, :dl] = _multilinear_grads(a @ m, qc[:, :dl], qmc[:, :dl])  # (QNT.9)
            gq[i : i + _LFQ_CHUNK, dl:] = _multilinear_grads(b @ m.T, qc[:, dl:], qmc[:, dl:])
        inner = inner + cw * gq
    return (_common.result(g * 2.0 * tau * q * qm * inner / n),)


# ============================================================================= regularizers (QNT.10-QNT.19)
# FSQ (Mentzer et al. 2023), VQGAN's adaptive GAN weight (Esser et al. 2021), StyleGAN2's
# path-length penalty (Karras et al. 2020) and the LPIPS head (Zhang et al. 2018).  No native
# layer: the reference here and the torch layer (genloss.torch.quant) are the implementations.
_REGULARIZER_NAMES: list[str] = [
    "fsq_quantize",
    "fsq_quantize_backward",
    "fsq_indices",
    "fsq_codes",
    "adaptive_gan_weight",
    "path_length_penalty",
    "path_length_penalty_backward",
    "lazy_regularization",
    "lpips_head",
    "lpips_head_backward",
]

# The paper's (and google-research's) eps: the bound's half-width is (L - 1)(1 - eps)/2, so the
# outer codes are reached (QNT.10) and no code outside the L levels ever is.
FSQ_EPS = 1e-3
# (QNT.10) the outer codes are reachable iff (L - 1) eps / 2 < 1/2, i.e. L <= 1000.
FSQ_MAX_LEVEL = 1000
LPIPS_EPS = 1e-10  # the official normalize_tensor's eps: x / (sqrt(sum_c x^2) + 1e-10)  (QNT.15)


def fsq_levels(levels: object) -> tuple[int, ...]:
    """``levels`` as a tuple of Python ints, each 2 <= L <= FSQ_MAX_LEVEL (QNT.10).  Plain Python (no
    NumPy call), so the torch layer runs it under ``torch.compile`` too."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple, np.ndarray)):
        raise TypeError(f"levels must be a sequence of ints (one per channel), got {type(levels).__name__}")
    out = []
    for v in levels:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"levels must hold ints, got {type(v).__name__}")
        if not 2 <= v <= FSQ_MAX_LEVEL:
            raise ValueError(f"levels must lie in [2, {FSQ_MAX_LEVEL}] (QNT.10), got {int(v)}")
        out.append(int(v))
    if not out:
        raise ValueError("levels must not be empty (one level count per channel)")
    return tuple(out)


def fsq_constants(levels: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Per-channel constants of the FSQ bound (QNT.10), float64 vectors of length d.

    .. math::
        h = \tfrac{(L-1)(1-\epsilon)}{2},\quad o = \tfrac12[L\text{ even}],\quad
        s = \tan(o/h),\quad w = \lfloor L/2\rfloor

    (half-width ``h``, even-level offset ``o``, shift ``s``, code scale ``w``), exactly the paper's
    Appendix A.1 code (``jnp.tan``, ``1 - eps``).  Raises on bad ``levels`` (not named by op:
    callers wrap it).
    """
    L = np.asarray(fsq_levels(levels), dtype=np.int64)
    half_l = (L - 1) * (1.0 - FSQ_EPS) / 2.0
    offset = np.where(L % 2 == 0, 0.5, 0.0)
    return half_l, offset, np.tan(offset / half_l), (L // 2).astype(np.float64)


def _fsq_inputs(z, levels):
    with _checks.named_errors("fsq_quantize"):
        consts = fsq_constants(levels)
        z = as_float64("z", z)
        if z.ndim < 1 or z.shape[-1] != consts[0].size:
            raise ValueError(
                f"z must have {consts[0].size} channels last (one per level), got shape {z.shape}"
            )
    return z, consts


def fsq_quantize(z, levels):
    r"""Finite scalar quantization (Mentzer et al. 2023): bound each channel, round, rescale.

    .. math::
        \hat z = \operatorname{round}\big(h\tanh(z + s) - o\big) / w

    with the per-channel constants of :func:`fsq_constants` (QNT.10).  Channel ``i`` takes
    the ``levels[i]`` values ``k / w`` for the integers ``k`` in ``[-floor(L/2), ceil(L/2) - 1]``
    (all reachable, no other), so the implicit codebook has ``prod(levels)`` codes.

    Parameters
    ----------
    z : ndarray, shape [..., d]
        Channels last, ``d = len(levels)``.
    levels : sequence of int
        Levels per channel, each in [2, 1000].

    Returns
    -------
    ndarray, shape [..., d]
        The quantized ``z`` in [-1, 1].

    Notes
    -----
    The gradient (:func:`fsq_quantize_backward`) is the straight-through one: the round is
    taken as the identity, so it is the derivative of the bound, never 0 a.e.  NaN in, NaN out.
    """
    z, (half_l, offset, shift, half_width) = _fsq_inputs(z, levels)
    bounded = np.tanh(z + shift) * half_l - offset  # (QNT.10)
    return result(np.round(bounded) / half_width)  # round half to even, as jnp / torch round


def fsq_quantize_backward(z, grad_output, levels):
    r"""Straight-through gradient of :func:`fsq_quantize` (QNT.10).

    .. math::
        \frac{\partial L}{\partial z} = g\,\frac{h}{w}\,\big(1 - \tanh^2(z + s)\big)

    Returns ``(grad_z,)``.  Finite for every finite ``z`` (0 where tanh saturates).
    """
    z, (half_l, _, shift, half_width) = _fsq_inputs(z, levels)
    with _checks.named_errors("fsq_quantize"):
        g = as_float64("grad_output", grad_output)
        _checks.same_shape("z", z.shape, "grad_output", g.shape)
    t = np.tanh(z + shift)
    return (g * (1.0 - t * t) * (half_l / half_width),)  # (QNT.10) the round passes the gradient


def fsq_codebook_size(levels: tuple[int, ...] | list[int]) -> int:
    """prod(levels) of checked levels, which must fit in int64 (plain Python: the torch layer's
    torch.compile traces it)."""
    size = math.prod(levels)
    if size > 2**63 - 1:
        raise ValueError(f"levels: the codebook size prod(levels) = {size} does not fit in int64")
    return size


def fsq_basis(levels, op):
    with _checks.named_errors(op):
        lv = fsq_levels(levels)
        size = fsq_codebook_size(lv)
    L = np.asarray(lv, dtype=np.int64)
    basis = np.concatenate(([1], np.cumprod(L[:-1]))).astype(np.int64)  # channel 0 varies fastest
    return L, basis, size


def fsq_indices(codes, levels):
    r"""The integer index of each FSQ code (QNT.11): ``sum_i k_i * prod_{j<i} L_j`` with
    ``k_i = w_i * code_i + w_i`` in ``[0, L_i)`` (the order of the paper's ``codes_to_indexes``).

    Parameters
    ----------
    codes : ndarray, shape [..., d]
        Outputs of :func:`fsq_quantize` (values off the grid are refused).
    levels : sequence of int

    Returns
    -------
    ndarray of int64, shape [...]
        In ``[0, prod(levels))``; a bijection with the grid (:func:`fsq_codes` inverts it).
    """
    L, basis, _ = fsq_basis(levels, "fsq_indices")
    with _checks.named_errors("fsq_indices"):
        c = as_float64("codes", codes)
        if c.ndim < 1 or c.shape[-1] != L.size:
            raise ValueError(f"codes must have {L.size} channels last (one per level), got shape {c.shape}")
        w = (L // 2).astype(np.float64)
        k = c * w + w
        kr = np.round(k)
        # codes are k/w exactly rounded: w*code is within a few ulp of an integer
        if not (np.all(np.abs(k - kr) <= 1e-6 * np.maximum(1.0, w)) and np.all((kr >= 0) & (kr < L))):
            raise ValueError("codes must lie on the FSQ grid of levels (outputs of fsq_quantize)")
    return (kr.astype(np.int64) * basis).sum(axis=-1)


def fsq_codes(indices, levels):
    r"""The FSQ code (float64, shape ``[..., d]``) of each index in ``[0, prod(levels))``: the
    inverse of :func:`fsq_indices` (QNT.11), ``k_i = (index // prod_{j<i} L_j) mod L_i``."""
    L, basis, size = fsq_basis(levels, "fsq_codes")
    with _checks.named_errors("fsq_codes"):
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must have an integer dtype, got {idx.dtype}")
        if idx.size and (idx.min() < 0 or int(idx.max()) >= size):
            raise ValueError(
                f"indices must lie in [0, {size}) (prod(levels)), got [{idx.min()}, {idx.max()}]"
            )
    k = (idx.astype(np.int64)[..., None] // basis) % L
    w = (L // 2).astype(np.float64)
    return result((k - w) / w)


def _array_list(name: str, xs: object) -> list[np.ndarray]:
    """One array, or a non-empty list/tuple of arrays (e.g. the gradients of a layer's weight and bias)."""
    if isinstance(xs, (list, tuple)):
        if not xs:
            raise ValueError(f"{name} must not be empty")
        return [as_float64(f"{name}[{i}]", x) for i, x in enumerate(xs)]
    return [as_float64(name, xs)]


def adaptive_gan_weight(rec_grads, gan_grads, max_weight=1e4, eps=1e-4):
    r"""VQGAN's adaptive weight of the generator's GAN loss (Esser et al. 2021, eq. 7).

    .. math::
        \lambda = \operatorname{clip}\Big(\frac{\lVert\nabla_\delta L_{\rm rec}\rVert}
                  {\lVert\nabla_\delta L_G\rVert + \epsilon},\ 0,\ \lambda_{\max}\Big)

    with :math:`\nabla_\delta` the gradients w.r.t. the decoder's last layer (QNT.12).  As
    taming-transformers' ``calculate_adaptive_weight``: the Frobenius norms of the gradients,
    ``eps = 1e-4`` added to the denominator, then ``clamp(0, 1e4)``; its ``discriminator_weight``
    factor is the caller's.  A value, never differentiated (the torch layer returns it detached).

    Parameters
    ----------
    rec_grads, gan_grads : ndarray or list of ndarray
        The gradients of the reconstruction (perceptual + L1/L2) loss and of the generator's
        GAN loss w.r.t. the last layer's parameters (the same shapes, pairwise); a list holds
        one array per parameter, and the norm is taken over all of them.
    max_weight : float
        Upper clamp, finite and >= 0.
    eps : float
        Added to the denominator, finite and > 0 (so :math:`\nabla L_G = 0` gives
        :math:`\lVert\nabla L_{\rm rec}\rVert/\epsilon`, clamped).

    Returns
    -------
    ndarray, shape []
    """
    with _checks.named_errors("adaptive_gan_weight"):
        max_weight = _checks.nonnegative("max_weight", max_weight)
        eps = _checks.positive("eps", eps)
        rec, gan = _array_list("rec_grads", rec_grads), _array_list("gan_grads", gan_grads)
        if len(rec) != len(gan):
            raise ValueError(
                f"gan_grads must hold one array per array of rec_grads ({len(rec)}), got {len(gan)}"
            )
        for i, (r, g) in enumerate(zip(rec, gan, strict=True)):
            _checks.same_shape(f"rec_grads[{i}]", r.shape, f"gan_grads[{i}]", g.shape)
    sq_rec = sum(float(np.sum(r * r)) for r in rec)  # squared norms: what a sharded layer all-reduces
    sq_gan = sum(float(np.sum(g * g)) for g in gan)
    lam = math.sqrt(sq_rec) / (math.sqrt(sq_gan) + eps)  # (QNT.12)
    return result(np.clip(lam, 0.0, max_weight))


def _pl_inputs(grads_w, pl_mean, decay):
    with _checks.named_errors("path_length_penalty"):
        decay = _checks.finite("decay", decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        g = batch_array("grads_w", grads_w, "mean", min_ndim=2)
        a = as_float64("pl_mean", pl_mean)
        if a.ndim != 0:
            raise ValueError(
                f"pl_mean must be a scalar (the running mean of the path lengths), got shape {a.shape}"
            )
    # (QNT.13) stylegan2-ada: pl_grads.square().sum(2).mean(1).sqrt(); the mean runs over every
    # dim between the batch and the last (w) dim, none for a (B, w_dim) gradient
    s = (g * g).sum(axis=-1).reshape(g.shape[0], -1).mean(axis=1)
    return g, float(a), decay, s


def path_length_penalty(grads_w, pl_mean, decay=0.01):
    r"""StyleGAN2's path-length penalty and the updated running mean (Karras et al. 2020, eq. 4).

    .. math::
        \ell_b = \sqrt{\tfrac1M\textstyle\sum_{m}\lVert g_{b,m}\rVert^2},\quad
        \bar a' = \bar a + \beta(\operatorname{mean}_b\ell_b - \bar a),\quad
        P = \tfrac1B\textstyle\sum_b(\ell_b - \bar a')^2

    (QNT.13): :math:`g_b = J_w^\top y` is the gradient of ``(img * noise).sum()`` w.r.t. the
    sample's w (shape ``(M, w_dim)`` for ``M`` broadcast copies, or ``(w_dim,)``), and
    :math:`\beta` = ``decay``.  As stylegan2-ada's ``pl_mean.lerp(pl_lengths.mean(), pl_decay)``,
    the penalty uses the UPDATED mean, which is a function of the lengths (its gradient flows);
    the returned mean is a value (the caller stores it).

    Parameters
    ----------
    grads_w : ndarray, shape [B, ..., w_dim]
    pl_mean : float or ndarray, shape []
        The running mean :math:`\bar a` (0 at the start of training).
    decay : float
        In [0, 1].

    Returns
    -------
    (penalty, new_pl_mean) : tuple of ndarray, shape []

    Notes
    -----
    :math:`\ell_b` is a norm: not differentiable where :math:`g_b = 0`; the gradient there
    is defined as 0 (the least-norm subgradient, as GAN.12), never NaN.  Finite at B = 1.
    """
    _, a, decay, s = _pl_inputs(grads_w, pl_mean, decay)
    pl = np.sqrt(s)
    new = a + decay * (pl.mean() - a)  # (QNT.13) the EMA, before the penalty (stylegan2-ada)
    return result(np.mean((pl - new) ** 2)), result(new)


def path_length_penalty_backward(grads_w, pl_mean, grad_output, decay=0.01):
    r"""Gradient of the penalty of :func:`path_length_penalty` w.r.t. ``grads_w`` (QNT.13).

    .. math::
        \frac{\partial P}{\partial\ell_b} = \frac2B\big(r_b - \beta\,\bar r\big),\quad
        r_b = \ell_b - \bar a',\quad
        \frac{\partial\ell_b}{\partial g_{b}} = \frac{g_b}{M\,\ell_b}\ (0\text{ where }\ell_b = 0)

    (:math:`-\beta\bar r`: the updated mean's dependence on the lengths).  Returns ``(grad_grads_w,)``.
    """
    g, a, decay, s = _pl_inputs(grads_w, pl_mean, decay)
    with _checks.named_errors("path_length_penalty"):
        go = scalar_grad("grad_output", grad_output)
    pl = np.sqrt(s)
    r = pl - (a + decay * (pl.mean() - a))
    d_pl = go * 2.0 / pl.size * (r - decay * r.mean())
    m = g[0].size // g.shape[-1]  # M, the number of broadcast copies of w
    nonzero = pl != 0  # (a NaN length is "nonzero": its NaN reaches the gradient)
    coef = np.where(nonzero, d_pl / (m * np.where(nonzero, pl, 1.0)), 0.0)
    return (batch_broadcast(coef, g.ndim) * g,)


def lazy_regularization(interval, lr, betas=(0.0, 0.99)):
    r"""StyleGAN2's lazy regularization: the penalty gain and Adam's compensated settings (QNT.14).

    A regularizer evaluated every ``interval`` = k steps is multiplied by k (so its expected
    gradient per step is the eager one), and the optimizer, which now sees k + 1 minibatches
    per k steps, is compensated as stylegan2-ada's ``training_loop`` does:

    .. math::
        c = \frac{k}{k+1},\qquad \eta' = c\,\eta,\qquad \beta_i' = \beta_i^{\,c}

    The lazy R1 term is then ``r1_penalty_from_grads(grads, gamma=k * gamma)`` (GAN.13, linear
    in gamma) every k-th discriminator step; the lazy path-length term k * pl_weight * P.

    Parameters
    ----------
    interval : int
        k >= 1 (1: eager, nothing changes).  StyleGAN2: 16 for R1, 4 for the path length.
    lr : float
        Adam's learning rate, > 0.
    betas : tuple of float
        Adam's betas, each in [0, 1).

    Returns
    -------
    (gain, lr, betas) : (float, float, tuple of float)
    """
    with _checks.named_errors("lazy_regularization"):
        k = _checks.positive_int("interval", interval)
        lr = _checks.positive("lr", lr)
        if not isinstance(betas, (list, tuple)) or not betas:
            raise TypeError(f"betas must be a non-empty tuple of floats, got {betas!r}")
        bs = [_checks.finite("betas", b) for b in betas]
        if any(not 0.0 <= b < 1.0 for b in bs):
            raise ValueError(f"betas must lie in [0, 1), got {tuple(bs)}")
    c = k / (k + 1)  # (QNT.14) mb_ratio
    return float(k), lr * c, tuple(b**c for b in bs)


def _lpips_inputs(features_x, features_y, weights):
    with _checks.named_errors("lpips_head"):
        fx, fy = _array_list("features_x", features_x), _array_list("features_y", features_y)
        ws = _array_list("weights", weights)
        if not len(fx) == len(fy) == len(ws):
            raise ValueError(f"features_x, features_y and weights must have one entry per layer, got "
                             f"{len(fx)}, {len(fy)}, {len(ws)}")  # fmt: skip
        out = []
        for i, (x, y, w) in enumerate(zip(fx, fy, ws, strict=True)):
            if x.ndim != 4 or x.size == 0:
                raise ValueError(f"features_x[{i}] must have shape (B, C, H, W), not empty, got {x.shape}")
            _checks.same_shape(f"features_x[{i}]", x.shape, f"features_y[{i}]", y.shape)
            _checks.same_batch("features_x[0]", fx[0].shape, f"features_x[{i}]", x.shape)
            if w.shape not in ((x.shape[1],), (1, x.shape[1], 1, 1)):  # (C,) or the official conv's
                raise ValueError(f"weights[{i}] must have shape ({x.shape[1]},) or (1, {x.shape[1]}, 1, 1), "
                                 f"got {w.shape}")  # fmt: skip
            w = w.reshape(-1)
            if np.any(w < 0):  # NaN passes (NaN in, NaN out)
                raise ValueError(f"weights[{i}] must be >= 0 (LPIPS's linear heads are nonnegative)")
            out.append((x, y, w))
    return out


def _unit_channels(x):
    """(x / (||x||_c + eps), ||x||_c) per position, the norm over the channel axis 1 (QNT.15)."""
    n = np.sqrt(np.sum(x * x, axis=1, keepdims=True))
    return x / (n + LPIPS_EPS), n


def lpips_head(features_x, features_y, weights):
    r"""The LPIPS distance given the backbone's features (Zhang et al. 2018, eq. 1).

    .. math::
        d_b = \sum_l \frac{1}{H_lW_l}\sum_{h,w}\sum_c w_{l,c}\,(\hat x_{l,bchw} - \hat y_{l,bchw})^2,
        \qquad \hat x = \frac{x}{\lVert x\rVert_c + 10^{-10}}

    (QNT.15), :math:`\lVert x\rVert_c` the norm over the channels at one position; as the
    official ``lpips`` package (``normalize_tensor``, ``(f0 - f1)**2``, the 1x1 ``NetLinLayer``
    conv without bias, ``spatial_average``, the sum over layers), without its dropout.

    Parameters
    ----------
    features_x, features_y : list of ndarray, shape [B, C_l, H_l, W_l]
        One entry per layer (the official backbones' scaling layer applied by the caller).
    weights : list of ndarray, shape [C_l] (or the official [1, C_l, 1, 1])
        Nonnegative per-channel weights of the linear heads.

    Returns
    -------
    ndarray, shape [B]
        Zero for identical features.
    """
    total = 0.0
    for x, y, w in _lpips_inputs(features_x, features_y, weights):
        d = _unit_channels(x)[0] - _unit_channels(y)[0]
        total = total + np.einsum("bchw,c->b", d * d, w) / (x.shape[2] * x.shape[3])  # (QNT.15)
    return result(total)


def lpips_head_backward(features_x, features_y, weights, grad_output):
    r"""Gradients of :func:`lpips_head` (QNT.15): ``(grads_x, grads_y, grads_weights)``, lists.

    .. math::
        a = \frac{2 g_b}{HW} w_c (\hat x - \hat y),\quad
        \frac{\partial d}{\partial x} = \frac{a}{n + \epsilon} - \frac{x\,(x\cdot a)}{n(n+\epsilon)^2},\quad
        \frac{\partial d}{\partial w_c} = \sum_b \frac{g_b}{HW}\sum_{h,w}(\hat x - \hat y)^2_c

    (the second term of the normalization's Jacobian is 0 where :math:`n = 0`: there
    :math:`x = 0`); the ``y`` gradient is the same with ``-a``.  Weights given as
    ``(1, C, 1, 1)`` get gradients of that shape.
    """
    layers = _lpips_inputs(features_x, features_y, weights)
    with _checks.named_errors("lpips_head"):
        go = as_float64("grad_output", grad_output)
        if go.shape != (layers[0][0].shape[0],):
            raise ValueError(f"grad_output must have shape ({layers[0][0].shape[0]},), got {go.shape}")
    raw_w = _array_list("weights", weights)
    gx, gy, gw = [], [], []
    for (x, y, w), w0 in zip(layers, raw_w, strict=True):
        (ux, nx), (uy, ny) = _unit_channels(x), _unit_channels(y)
        d = ux - uy
        hw = x.shape[2] * x.shape[3]
        gb = go[:, None, None, None] / hw
        gw.append(np.einsum("bchw,b->c", d * d, go / hw).reshape(w0.shape))
        a = 2.0 * gb * w[None, :, None, None] * d
        gx.append(_unit_backward(x, nx, a))
        gy.append(_unit_backward(y, ny, -a))
    return gx, gy, gw


def _unit_backward(x, n, a):
    """d/dx of x / (n + eps) against the upstream ``a`` (per position, channels axis 1)  (QNT.15)."""
    xa = np.sum(x * a, axis=1, keepdims=True)
    nonzero = n != 0
    second = np.where(nonzero, xa / (np.where(nonzero, n, 1.0) * (n + LPIPS_EPS) ** 2), 0.0)
    return a / (n + LPIPS_EPS) - x * second


__all__ = [*_QUANTIZER_NAMES, *_REGULARIZER_NAMES]
