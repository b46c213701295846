r"""The quant family's quantizers on the native engine: vector_quantize, vq_ema_update, lfq_entropy_loss.

Same conventions as ``genloss.native.gan``: ``(value, grads)`` with the gradients of the sum of the
LOSS values w.r.t. the differentiable inputs (``need_grad`` a bool or one bool per input; ``()`` when
none is asked).  Signatures follow ``genloss.reference.quant``; the kernels are in
cpp/src/quant_cpu.cpp (CPU) and cuda/quant.cu (CUDA: the same rules, launched on the array's current
stream, capturable in a CUDA graph), derived in derivations/quant.md (QNT.1-QNT.9).  float32/float64
arrays, CPU or CUDA; on CUDA the index, z_q and the EMA outputs are the CPU's bits, the loss values and
gradients equal them within rounding (fixed-order sums: bitwise repeatable).

* ``vector_quantize(z, codebook, beta)``: value ``(z_q, indices, commitment, codebook_loss)``; grads
  ``(d commitment / dz, d codebook_loss / dcodebook)``, the only non-zero derivatives of the two loss
  terms (z_q's straight-through identity is the caller's: grad_z = grad_z_q + g_c * grads[0]).
* ``vq_ema_update``: a state update, no gradient; returns ``(cluster_size', embed_sum', codebook)``.
* ``lfq_entropy_loss``: value a 0-d array, grads ``(d loss / dz,)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _checks as C
from ..reference import quant as _R
from ._compose import grads_out, inputs, needs
from ._engine import (
    CPU,
    INT32,
    INT64,
    Buf,
    _p,
    as_input,
    device_empty,
    empty,
    int_range,
    ran,
    run_call,
    same_place,
    stream_of,
    to_host,
    workspace,
    zeros64,
)


def _where(b: Buf) -> dict[str, Any]:
    """The device fields of a Call that runs where ``b`` is (CUDA: on the current stream, scratch from
    ``b``'s allocator)."""
    return {"device": b.device, "device_id": b.device_id, "stream": stream_of(b), **workspace(b)}


def _rows(op: str, name: str, b: Buf, what: str) -> tuple[int, int]:
    """(n, D) of a 2-D array with n, D >= 1; the error names op and argument."""
    if len(b.shape) != 2:
        raise ValueError(f"{op}: {name} must have shape ({what}), got shape {b.shape}")
    n, d = b.shape
    if n == 0:
        raise ValueError(f"{op}: {name} is empty (shape {b.shape}); the mean over it is undefined")
    if d == 0:
        raise ValueError(f"{op}: {name} has no features (shape {b.shape})")
    return n, d


def _index_empty(like: Buf, n: int) -> tuple[Any, int]:
    """An int64 (n,) array of ``like``'s kind on its device, and its address."""
    if like.device != CPU:
        return device_empty(like, (n,), "int64")
    if like.kind == "torch":
        import torch

        t = torch.empty(n, dtype=torch.int64)
        return t, t.data_ptr()
    a = np.empty(n, dtype=np.int64)
    return a, a.__array_interface__["data"][0]


# ============================================================================= vector_quantize (QNT.1-QNT.4)
def vector_quantize(z, codebook, beta=0.25, *, need_grad=True):
    r"""Nearest code per row of z among the codebook rows, ties to the lowest index, with the commitment
    beta * mean ||z - sg(e)||^2 and codebook mean ||sg(z) - e||^2 terms (means over N*D).  (QNT.1-QNT.4)

    One tiled pass (no N x K matrix); the index is the exact float64 argmin (QNT.3).  A row with a NaN
    gets index 0 and NaN losses; a NaN code is never chosen while another code has a number.
    Differentiable inputs: z (through the commitment), codebook (through the codebook term).
    """
    op = "vector_quantize"
    with C.named_errors(op):
        b = C.nonnegative("beta", beta)
        zb, eb = inputs(["z", "codebook"], [z, codebook])
    n, d = _rows(op, "z", zb, "N, D")
    k, de = _rows(op, "codebook", eb, "K, D")
    if de != d:
        raise ValueError(f"{op}: codebook must have the dimension of z (D={d}), got shape {eb.shape}")
    flags = needs(need_grad, 2)
    zq = empty(zb, (n, d))
    idx, idx_ptr = _index_empty(zb, n)
    commit, cb = empty(zb, ()), empty(zb, ())
    gz = empty(zb, (n, d)) if flags[0] else None
    ge = empty(eb, (k, d)) if flags[1] else None
    ran(run_call(
        kind="vector_quantize", **_where(zb), dtype=zb.dtype, z=zb.ptr, codebook=eb.ptr, N=n, K=k, D=d, beta=b, z_q=zq.ptr,
        indices=idx_ptr, out_commitment=commit.ptr, out_codebook=cb.ptr, grad_z=_p(gz), grad_codebook=_p(ge),
    ))  # fmt: skip
    return (zq.arr, idx, commit.arr, cb.arr), grads_out([gz, ge], flags)


# ============================================================================= vq_ema_update (QNT.5, QNT.6)
def vq_ema_update(z, indices, cluster_size, embed_sum, decay=0.99, eps=1e-5):
    r"""EMA codebook update with Laplace smoothing (VQ-VAE-2, vector-quantize-pytorch).  (QNT.5, QNT.6)

    Returns ``(cluster_size', embed_sum', codebook)`` in embed_sum's dtype.  The segment sums run in a
    fixed order in float64: bitwise the same result for any thread count.
    """
    op = "vq_ema_update"
    with C.named_errors(op):
        dec = C.finite("decay", decay)
        if not 0.0 <= dec <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {dec}")
        ep = C.positive("eps", eps)
        eb = as_input(embed_sum, "embed_sum")
        zb = as_input(z, "z")
        csb = as_input(cluster_size, "cluster_size")
        ib = as_input(indices, "indices", integer=True)
        same_place(eb, "embed_sum", zb, "z")
        same_place(eb, "embed_sum", csb, "cluster_size")
    if (ib.device, ib.device_id) != (eb.device, eb.device_id):
        raise ValueError(f"{op}: indices must be on the device of embed_sum")
    if len(eb.shape) != 2 or 0 in eb.shape:
        raise ValueError(f"{op}: embed_sum must have shape (K, D) with K, D >= 1, got shape {eb.shape}")
    k, d = eb.shape
    if csb.shape != (k,):
        raise ValueError(f"{op}: cluster_size must have shape ({k},) (one count per code), got {csb.shape}")
    if len(zb.shape) != 2 or zb.shape[1] != d:
        raise ValueError(
            f"{op}: z must have shape (N, {d}) (the dimension of embed_sum), got shape {zb.shape}"
        )
    n = zb.shape[0]
    if ib.shape != (n,):
        raise ValueError(f"{op}: indices must have shape ({n},) (one per row of z), got {ib.shape}")
    if n:  # CUDA: a wait for the GPU, skipped by check_data=False or under capture (the kernel then ignores
        # an index outside [0, K): its row counts for no code)
        r = int_range(ib)
        if r is not None and (r[0] < 0 or r[1] >= k):
            raise ValueError(f"{op}: indices must lie in [0, {k}), got values in [{r[0]}, {r[1]}]")
    ocs, oes, ocb = empty(eb, (k,)), empty(eb, (k, d)), empty(eb, (k, d))
    ran(run_call(
        kind="vq_ema_update", **_where(eb), dtype=eb.dtype, index_dtype=INT64 if ib.dtype == INT64 else INT32, z=zb.ptr,
        indices=ib.ptr, N=n, K=k, D=d, cluster_size=csb.ptr, embed_sum=eb.ptr, decay=dec, eps=ep,
        out_cluster_size=ocs.ptr, out_embed_sum=oes.ptr, out_codebook=ocb.ptr,
    ))  # fmt: skip
    return ocs.arr, oes.arr, ocb.arr


# ============================================================================= lfq_entropy_loss (QNT.7-QNT.9)
LFQ_MAX_BITS = _R.LFQ_MAX_BITS  # = _C.LFQ_MAX_BITS (kLfqMaxBits, quant_cpu.h; a test checks it)


def lfq_entropy_loss(z, inv_temperature=100.0, sample_weight=1.0, codebook_weight=1.0, *, need_grad=True,
                     terms=None):  # fmt: skip
    r"""sample_weight * mean_i H(p(.|z_i)) - codebook_weight * H(mean_i p(.|z_i)) over the 2^d codes
    {-1, +1}^d, p the softmax of inv_temperature * <z, c>.  (QNT.7-QNT.9)

    The per-sample entropy is the sum of d bit entropies (O(N d)); the codebook entropy streams 2^d
    float64 accumulators (d <= 20, no N x 2^d array; skipped when codebook_weight == 0).  ``terms``: an
    optional float64 NumPy array of 2 that receives (mean per-sample entropy, codebook entropy) (for
    a CUDA z: a synchronising copy).
    Differentiable input: z.
    """
    op = "lfq_entropy_loss"
    with C.named_errors(op):
        tau = C.positive("inv_temperature", inv_temperature)
        sw = C.finite("sample_weight", sample_weight)
        cw = C.finite("codebook_weight", codebook_weight)
        (zb,) = inputs(["z"], [z])
    n, d = _rows(op, "z", zb, "N, d")
    if d > LFQ_MAX_BITS:
        raise ValueError(
            f"{op}: z has d={d} bits: the codebook entropy sums over 2^d codes, d <= {LFQ_MAX_BITS} "
            f"(split the code into groups of at most {LFQ_MAX_BITS} bits)"
        )
    if terms is not None and not (
        isinstance(terms, np.ndarray)
        and terms.dtype == np.float64
        and terms.shape == (2,)
        and terms.flags.c_contiguous
    ):
        raise TypeError(f"{op}: terms must be a contiguous float64 NumPy array of shape (2,)")
    flags = needs(need_grad, 1)
    out = empty(zb, ())
    gz = empty(zb, (n, d)) if flags[0] else None
    dev_terms = zeros64(zb, 2) if terms is not None and zb.device != CPU else None
    terms_ptr = None if terms is None else (terms.ctypes.data if dev_terms is None else dev_terms.ptr)
    ran(run_call(
        kind="lfq_entropy", **_where(zb), dtype=zb.dtype, z=zb.ptr, N=n, d=d, inv_temperature=tau,
        sample_weight=sw, codebook_weight=cw, out_value=out.ptr, terms=terms_ptr, grad_z=_p(gz),
    ))  # fmt: skip
    if dev_terms is not None:
        assert terms is not None
        terms[:] = to_host(dev_terms.arr)
    return out.arr, grads_out([gz], flags)
