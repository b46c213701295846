r"""The ``quant`` family in torch: tokenizer quantizers and GAN-training regularizers.

The math is the reference's (``genloss.reference.quant``, ``derivations/quant.md``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks as C
from ..reference import quant as ref
from ._op import device_constant, eager_checks, float_dtype, has_storage, lib, with_reference_doc

# ============================================================================= quantizers (QNT.1-QNT.9)
# Custom ops (torch.library): ``genloss::vector_quantize_fwd`` (4 outputs + the two saved loss gradients, autograd
# registered), ``genloss::vq_ema_update`` (a state update, no autograd) and ``lfq_entropy_loss`` through the LossOp
# glue of _op.py.  CPU and CUDA tensors run the native kernels (cpp/src/quant_cpu.cpp, cuda/quant.cu; float16 /
# bfloat16 computed in float32), on the current stream, capturable in a CUDA graph.
_QUANTIZER_NAMES: list[str] = ["vector_quantize", "vq_ema_update", "lfq_entropy_loss"]

from ..native import quant as _qnative  # noqa: E402
from ._op import LossOp as _LossOp  # noqa: E402
from ._op import public as _public  # noqa: E402

_QLOW = (torch.float16, torch.bfloat16)


def _qup(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 computed in float32 (the kernels take float32 / float64)."""
    return x.float() if x.dtype in _QLOW else x


def _qtensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {x.dtype}")
    return x


@torch.library.custom_op("genloss::vector_quantize_fwd", mutates_args=())
def _vector_quantize_fwd(
    z: torch.Tensor, codebook: torch.Tensor, beta: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_q, indices, commitment, codebook_loss, d commitment/dz, d codebook_loss/dcodebook); the last two are
    empty when need_grad is False.  z_q comes back in the codebook's dtype (its rows, exactly)."""
    zc, ec = _qup(z), _qup(codebook)
    (zq, idx, c, b), grads = _qnative.vector_quantize(zc, ec, beta, need_grad=need_grad)
    gz, ge = grads if need_grad else (zc.new_empty(0), ec.new_empty(0))
    if zq.dtype != codebook.dtype:
        zq = zq.to(codebook.dtype)
    return zq, idx, c, b, gz, ge


@_vector_quantize_fwd.register_fake
def _(z: torch.Tensor, codebook: torch.Tensor, beta: float, need_grad: bool) -> tuple:
    dt = torch.float32 if z.dtype in _QLOW else z.dtype
    n, d = z.shape
    k = codebook.shape[0]
    return (
        codebook.new_empty((n, d)),
        z.new_empty((n,), dtype=torch.int64),
        z.new_empty((), dtype=dt),
        z.new_empty((), dtype=dt),
        z.new_empty((n, d) if need_grad else (0,), dtype=dt),
        z.new_empty((k, d) if need_grad else (0,), dtype=dt),
    )


def _vq_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[4], output[5], inputs[0], inputs[1], output[1])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.beta = inputs[2]


def _vq_loss_grads(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(QNT.4) d commitment/dz = 2 beta (z - sg(e_k)) / (N D) and d codebook_loss/de_k = 2 sum_{k_i = k}
    (e_k - sg(z_i)) / (N D) (0 for a code no row picked) in torch ops, for a backward that is differentiated
    again (create_graph): their derivatives w.r.t. z and the codebook are then autograd's, exact."""
    _, _, z, e, idx = ctx.saved_tensors
    z, e = _qup(z), _qup(e)
    scale = 2.0 / (z.shape[0] * z.shape[1])
    gz = (ctx.beta * scale) * (z - e.detach()[idx])
    ge = scale * torch.zeros_like(e).index_add(0, idx, e[idx] - z.detach())
    return gz, ge


def _vq_backward(ctx: Any, g_zq: Any, _g_idx: Any, g_c: Any, g_b: Any, _g_gz: Any, _g_ge: Any) -> tuple:
    """(QNT.4) grad_z = g_zq (straight-through) + g_c d commitment/dz; grad_codebook = g_b d codebook_loss/de.
    The kernel's gradients (saved by the forward), or, under create_graph, the same in differentiable torch
    ops (double backward: the second derivatives 2 beta/(N D) and 2 n_k/(N D), not a silent 0)."""
    gz, ge = ctx.saved_tensors[:2]
    if torch.is_grad_enabled():
        gz, ge = _vq_loss_grads(ctx)
    grad_z = grad_e = None
    if ctx.needs_input_grad[0]:
        grad_z = gz * g_c if g_c is not None else torch.zeros_like(gz)
        if g_zq is not None:
            grad_z = grad_z + g_zq.to(grad_z.dtype)
        grad_z = grad_z.to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        grad_e = (ge * g_b if g_b is not None else torch.zeros_like(ge)).to(ctx.dtypes[1])
    return grad_z, grad_e, None, None


_vector_quantize_fwd.register_autograd(_vq_backward, setup_context=_vq_setup)


@_vector_quantize_fwd.register_vmap
def _vq_vmap(
    info: Any, in_dims: tuple, z: torch.Tensor, codebook: torch.Tensor, beta: float, need: bool
) -> tuple:
    """torch.func.vmap: one call per batch entry (each its own codebook search and losses), stacked."""
    outs = [
        _vector_quantize_fwd(
            z if in_dims[0] is None else z.select(in_dims[0], b),
            codebook if in_dims[1] is None else codebook.select(in_dims[1], b),
            beta,
            need,
        )
        for b in range(info.batch_size)
    ]
    return tuple(torch.stack([o[k] for o in outs]) for k in range(6)), (0,) * 6


class _VqTransforms(torch.autograd.Function):
    """The op's autograd (the same setup and backward) in the form torch.func transforms take: the
    Function torch.library generates from register_autograd refuses grad (no setup_context)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, codebook: torch.Tensor, beta: float, need: bool) -> tuple:
        return torch.ops.genloss.vector_quantize_fwd(z, codebook, beta, need)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.mark_non_differentiable(output[1], output[4], output[5])
        _vq_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:
        return _vq_backward(ctx, *grads)


@with_reference_doc
def vector_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_q, indices, commitment, codebook_loss) with autograd (QNT.1-QNT.4). z and codebook may differ in
    dtype: they compute in the promoted one, float16/bfloat16 in float32 (a bfloat16 z from autocast with a
    float32 codebook: float32); each gradient comes back in its input's dtype and z_q has the codebook's
    (its rows, exactly)."""
    op = "vector_quantize"
    z, codebook = _qtensor(op, "z", z), _qtensor(op, "codebook", codebook)
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(
            f"{op}: z must be (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(
            f"{op}: codebook must have the dimension of z (D={z.shape[1]}), got {tuple(codebook.shape)}"
        )
    if z.shape[0] == 0 or codebook.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{op}: z {tuple(z.shape)} and codebook {tuple(codebook.shape)} must not be empty")
    # Mixed dtypes compute in the promoted one (a bfloat16 z from autocast with a float32 codebook: float32,
    # as the kernels compute 16-bit inputs anyway); the casts are autograd's, so each gradient comes back
    # in its input's dtype. z_q has the codebook's dtype (its rows, exactly).
    dt = torch.promote_types(_qup(z).dtype, _qup(codebook).dtype)
    z = z if _qup(z).dtype == dt else z.to(dt)
    codebook = codebook if _qup(codebook).dtype == dt else codebook.to(dt)
    with C.named_errors(op):
        b = C.nonnegative("beta", beta)
    need = torch.is_grad_enabled() and (z.requires_grad or codebook.requires_grad)
    if not (has_storage(z) and has_storage(codebook)):  # a torch.func transform's wrappers (grad, vmap)
        zq, idx, c, cb, _, _ = _VqTransforms.apply(z, codebook, b, need)
        return zq, idx, c, cb
    zq, idx, c, cb, _, _ = torch.ops.genloss.vector_quantize_fwd(z, codebook, b, need)
    return zq, idx, c, cb


@torch.library.custom_op("genloss::vq_ema_update", mutates_args=())
def _vq_ema_update_op(
    z: torch.Tensor, indices: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, decay: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    dt = embed_sum.dtype
    zc, csc, esc = _qup(z), _qup(cluster_size), _qup(embed_sum)
    out = _qnative.vq_ema_update(zc, indices, csc, esc, decay, eps)
    return tuple(o.to(dt) for o in out)


@_vq_ema_update_op.register_fake
def _(z, indices, cluster_size, embed_sum, decay, eps):
    return (
        embed_sum.new_empty(cluster_size.shape),
        embed_sum.new_empty(embed_sum.shape),
        embed_sum.new_empty(embed_sum.shape),
    )


@with_reference_doc
def vq_ema_update(
    z: torch.Tensor, indices: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor,
    decay: float = 0.99, eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The EMA codebook update (QNT.5, QNT.6), without autograd. The state (cluster_size, embed_sum) sets the
    dtype: z is converted to it (a bfloat16 z from autocast with a float32 state, exactly)."""
    op = "vq_ema_update"
    for name, a in (("z", z), ("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        _qtensor(op, name, a)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: indices must be an int64 or int32 torch.Tensor")
    if cluster_size.dtype != embed_sum.dtype:
        raise TypeError(f"{op}: cluster_size must have the dtype of embed_sum ({embed_sum.dtype}), "
                        f"got {cluster_size.dtype}")  # fmt: skip
    if embed_sum.dim() != 2 or 0 in embed_sum.shape:
        raise ValueError(
            f"{op}: embed_sum must have shape (K, D) with K, D >= 1, got {tuple(embed_sum.shape)}"
        )
    k, d = embed_sum.shape
    if tuple(cluster_size.shape) != (k,):
        raise ValueError(f"{op}: cluster_size must have shape ({k},), got {tuple(cluster_size.shape)}")
    if z.dim() != 2 or z.shape[1] != d:
        raise ValueError(f"{op}: z must have shape (N, {d}), got {tuple(z.shape)}")
    if tuple(indices.shape) != (z.shape[0],):
        raise ValueError(f"{op}: indices must have shape ({z.shape[0]},), got {tuple(indices.shape)}")
    with C.named_errors(op):
        dec = C.finite("decay", decay)
        if not 0.0 <= dec <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {dec}")
        ep = C.positive("eps", eps)
    # The range of indices is checked once, by the native kernel this op runs (a read-back on
    # CUDA, skipped under capture or check_data=False as everywhere): a second check here
    # would make a CUDA call wait for the GPU twice.
    with torch.no_grad():  # z in the state's dtype (a bfloat16 z from autocast, a float32 state: exact)
        z = z if z.dtype == embed_sum.dtype else z.to(embed_sum.dtype)
        return torch.ops.genloss.vq_ema_update(z, indices, cluster_size, embed_sum, dec, ep)


lfq_entropy_loss = _public(
    _LossOp(
        "lfq_entropy_loss",
        "Tensor z, float inv_temperature=100.0, float sample_weight=1.0, float codebook_weight=1.0",
        _qnative.lfq_entropy_loss,
        differentiable=("z",),
        doc=ref.lfq_entropy_loss.__doc__,
    ),
    __name__,
)


# ============================================================================= regularizers (QNT.10-QNT.19)
# No native kernels (SPEC: reference + torch).  fsq_quantize is a custom op (schema, fake, straight-
# through autograd: torch.compile sees one node); the others are plain functions of torch ops, since
# they take lists of tensors (adaptive_gan_weight, lpips_head), run a collective (adaptive_gan_weight)
# or must be differentiated twice (path_length_penalty sits in a create_graph region), which autograd
# gives a composite for free.  Argument checks are the reference's where they look at values.
_REGULARIZER_NAMES: list[str] = [
    "fsq_quantize",
    "fsq_indices",
    "fsq_codes",
    "adaptive_gan_weight",
    "path_length_penalty",
    "lazy_regularization",
    "lpips_head",
]


def _tensor_list(op: str, name: str, xs: Any) -> list[torch.Tensor]:
    """One tensor, or a non-empty list/tuple of them (as the reference's ``_array_list``)."""
    if isinstance(xs, (list, tuple)):
        if not xs:
            raise ValueError(f"{op}: {name} must not be empty")
        return [_qtensor(op, f"{name}[{i}]", x) for i, x in enumerate(xs)]
    return [_qtensor(op, name, xs)]


def _safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """sqrt(s) whose derivative at s = 0 is 0 (QNT.13, QNT.15), not inf * 0 = NaN: the inner where keeps
    the unused branch's derivative finite, so double backward is finite too.  NaN stays NaN."""
    nonzero = s != 0
    return torch.where(nonzero, torch.sqrt(torch.where(nonzero, s, torch.ones_like(s))), torch.zeros_like(s))


# ----------------------------------------------------------------------------- fsq_quantize (QNT.10, QNT.11)
lib.define("fsq_quantize(Tensor z, int[] levels) -> Tensor")


def _fsq_bound_parts(z: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tanh(z + s), h / w) per channel in float64 (QNT.10).  The bound is taken in float64 so the
    code of a float32 / float16 z is the reference's: a float32 bound would flip the rounding of the
    entries within ~1e-7 of a half-integer, i.e. give another token than the same z in float64. A float64 z
    within about an ulp of a rounding boundary can still round either way between the layers: torch's and
    NumPy's tanh differ by an ulp on some float64 inputs (neither is the correctly rounded one everywhere)."""
    half_l, _, shift, half_width = ref.fsq_constants(levels)
    t = torch.tanh(z.double() + _f64(shift, z))
    return t, _f64(half_l / half_width, z)


def _f64(values: Any, like: torch.Tensor) -> torch.Tensor:
    """A per-channel constant of the reference (a float64 ndarray) on ``like``'s device."""
    return device_constant(tuple(values.tolist()), torch.float64, like)


def _fsq_kernel(z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    half_l, offset, _, half_width = ref.fsq_constants(levels)
    t, _ = _fsq_bound_parts(z, levels)
    bounded = t * _f64(half_l, z) - _f64(offset, z)  # (QNT.10)
    return (torch.round(bounded) / _f64(half_width, z)).to(_qup(z).dtype)


@torch.library.register_fake("genloss::fsq_quantize", lib=lib)
def _fsq_fake(z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    return torch.empty_like(z, dtype=_qup(z).dtype)


def _fsq_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    z, levels = inputs
    ctx.levels = levels
    ctx.save_for_backward(z)


def _fsq_slope(ctx: Any) -> torch.Tensor:
    """(QNT.10) straight-through: the round passes the gradient, which is the bound's derivative
    (1 - tanh^2) h / w, in float64."""
    (z,) = ctx.saved_tensors
    t, scale = _fsq_bound_parts(z, ctx.levels)
    return (1.0 - t * t) * scale


def _fsq_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return (grad.double() * _fsq_slope(ctx)).to(ctx.saved_tensors[0].dtype), None


lib.impl("fsq_quantize", _fsq_kernel, "CPU")
lib.impl("fsq_quantize", _fsq_kernel, "CUDA")
torch.library.register_autograd("genloss::fsq_quantize", _fsq_backward, setup_context=_fsq_setup, lib=lib)


def _fsq_vmap(info: Any, in_dims: tuple, z: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, int]:
    """torch.func.vmap: FSQ is elementwise over every dim but the last (the channels), so the
    vmapped dim, moved first, is one more leading dim of one call."""
    return torch.ops.genloss.fsq_quantize(z.movedim(in_dims[0], 0), levels), 0


torch.library.register_vmap("genloss::fsq_quantize", _fsq_vmap, lib=lib)


class _FsqTransforms(torch.autograd.Function):
    """The op's autograd (the same setup and backward) in the form torch.func transforms take:
    the Function torch.library generates from register_autograd refuses grad and vmap (it has
    no setup_context)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, levels: list[int]) -> torch.Tensor:
        return torch.ops.genloss.fsq_quantize(z, levels)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _fsq_setup(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    backward = staticmethod(_fsq_backward)

    @staticmethod
    def jvp(ctx: Any, t_z: torch.Tensor, _t_levels: Any) -> torch.Tensor:
        """Forward mode: the straight-through slope of the backward (QNT.10) times the tangent."""
        z_dtype = ctx.saved_tensors[0].dtype
        return (t_z.double() * _fsq_slope(ctx)).to(torch.float32 if z_dtype in _QLOW else z_dtype)


def _fsq_level_list(op: str, levels: Any) -> list[int]:
    with C.named_errors(op):
        return list(ref.fsq_levels(levels))


@with_reference_doc
def fsq_quantize(z: torch.Tensor, levels: Any) -> torch.Tensor:
    r"""FSQ as the custom op ``torch.ops.genloss.fsq_quantize`` (straight-through gradient; the
    bound in float64, the value in z's dtype, float32 for float16 / bfloat16).  (QNT.10)"""
    op = "fsq_quantize"
    lv = _fsq_level_list(op, levels)
    z = _qtensor(op, "z", z)
    if z.dim() < 1 or z.shape[-1] != len(lv):
        raise ValueError(
            f"{op}: z must have {len(lv)} channels last (one per level), got shape {tuple(z.shape)}"
        )
    if not has_storage(z):  # a torch.func transform's wrapper (grad, vmap)
        return _FsqTransforms.apply(z, lv)
    return torch.ops.genloss.fsq_quantize(z, lv)


def _fsq_size(op: str, levels: list[int]) -> int:
    with C.named_errors(op):
        return ref.fsq_codebook_size(levels)


def _fsq_grid(levels: list[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, basis, w) as int64 tensors (QNT.11): channel 0 varies fastest."""
    L = device_constant(tuple(levels), torch.int64, like)
    basis = torch.cumprod(torch.cat([L.new_ones(1), L[:-1]]), 0)
    return L, basis, L // 2


@with_reference_doc
def fsq_indices(codes: torch.Tensor, levels: Any) -> torch.Tensor:
    r"""int64 indices of FSQ codes (no gradient).  (QNT.11)"""
    op = "fsq_indices"
    lv = _fsq_level_list(op, levels)
    _fsq_size(op, lv)  # the int64 range check of prod(levels)
    codes = _qtensor(op, "codes", codes)
    if codes.dim() < 1 or codes.shape[-1] != len(lv):
        raise ValueError(f"{op}: codes must have {len(lv)} channels last (one per level), got shape "
                         f"{tuple(codes.shape)}")  # fmt: skip
    L, basis, w = _fsq_grid(lv, codes)
    kf = codes.detach().double() * w + w
    k = torch.round(kf)
    # the reference's test (QNT.11): codes are k/w rounded once, so w*code is within a few ulp of
    # an integer; rounding alone would silently index an off-grid code by its nearest neighbour
    off_grid = (kf - k).abs() > 1e-6 * torch.clamp(w, min=1).double()
    k = k.long()
    if eager_checks(k) and bool((off_grid | (k < 0) | (k >= L)).any()):  # data-dependent: eager
        raise ValueError(f"{op}: codes must lie on the FSQ grid of levels (outputs of fsq_quantize)")
    return (k * basis).sum(-1)


@with_reference_doc
def fsq_codes(indices: torch.Tensor, levels: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""The codes of int64 FSQ indices, in ``dtype`` (float32 by default).  (QNT.11)"""
    op = "fsq_codes"
    lv = _fsq_level_list(op, levels)
    size = _fsq_size(op, lv)
    if (
        not isinstance(indices, torch.Tensor)
        or indices.is_floating_point()
        or indices.is_complex()
        or indices.dtype == torch.bool
    ):
        raise TypeError(f"{op}: indices must be an integer torch.Tensor")
    float_dtype(op, dtype)  # integer codes would truncate
    idx = indices.long()
    if eager_checks(idx) and idx.numel() and bool(((idx < 0) | (idx >= size)).any()):
        raise ValueError(f"{op}: indices must lie in [0, {size}) (prod(levels))")
    L, basis, w = _fsq_grid(lv, idx)
    k = (idx.unsqueeze(-1) // basis) % L
    return ((k - w).double() / w).to(dtype)


# ----------------------------------------------------------------------------- adaptive_gan_weight (QNT.12)
@with_reference_doc
def adaptive_gan_weight(
    rec_grads: Any, gan_grads: Any, max_weight: float = 1e4, eps: float = 1e-4, group: Any = None
) -> torch.Tensor:
    r"""VQGAN's adaptive weight, detached.  ``group``: None for a last layer held whole by this
    process; else the ``torch.distributed`` process group across which it is sharded (tensor
    parallel, FSDP): the two squared norms are all-reduced (summed) over it, in one collective, so
    every rank gets the weight of the whole layer.  (QNT.12)

    The squared norms are summed in float64 (a bf16/fp16 or float32 square of a large gradient
    would overflow or lose the small terms); the value is returned in the gradients' dtype
    (float32 for float16 / bfloat16)."""
    op = "adaptive_gan_weight"
    with C.named_errors(op):
        max_weight = C.nonnegative("max_weight", max_weight)
        eps = C.positive("eps", eps)
    rec, gan = _tensor_list(op, "rec_grads", rec_grads), _tensor_list(op, "gan_grads", gan_grads)
    if len(rec) != len(gan):
        raise ValueError(
            f"{op}: gan_grads must hold one tensor per tensor of rec_grads ({len(rec)}), got {len(gan)}"
        )
    for i, (r, g) in enumerate(zip(rec, gan, strict=True)):
        if r.shape != g.shape:
            raise ValueError(f"{op}: gan_grads[{i}] must have the shape of rec_grads[{i}] {tuple(r.shape)}, got "
                             f"{tuple(g.shape)}")  # fmt: skip
    with torch.no_grad():
        sq = torch.stack([
            torch.stack([r.detach().double().square().sum() for r in rec]).sum(),
            torch.stack([g.detach().double().square().sum() for g in gan]).sum(),
        ])  # fmt: skip
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)  # (QNT.12) the whole layer's squared norms
        lam = sq[0].sqrt() / (sq[1].sqrt() + eps)  # (QNT.12) taming-transformers' formula
        dtype = torch.promote_types(_qup(rec[0]).dtype, _qup(gan[0]).dtype)
        return lam.clamp(0.0, max_weight).to(dtype)


# ----------------------------------------------------------------------------- path_length_penalty (QNT.13)
@with_reference_doc
def path_length_penalty(
    grads_w: torch.Tensor, pl_mean: Any, decay: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""StyleGAN2's path-length penalty, a composite of torch ops: differentiable twice (``grads_w``
    comes from ``autograd.grad(..., create_graph=True)`` and the penalty is backpropagated into the
    generator).  Returns ``(penalty, new_pl_mean)``, the new mean detached (store it in the buffer).
    ``pl_mean``: a float or a 0-d tensor that does not require grad.  (QNT.13)"""
    op = "path_length_penalty"
    with C.named_errors(op):
        decay = C.finite("decay", decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
    g = _qtensor(op, "grads_w", grads_w)
    if g.dim() < 2 or g.shape[0] == 0 or g.numel() == 0:
        raise ValueError(f"{op}: grads_w must have shape (B, ..., w_dim) with B >= 1, not empty, got "
                         f"{tuple(g.shape)}")  # fmt: skip
    g = _qup(g)
    if isinstance(pl_mean, torch.Tensor):
        if pl_mean.dim() != 0:
            raise ValueError(
                f"{op}: pl_mean must be a scalar (the running mean), got shape {tuple(pl_mean.shape)}"
            )
        if pl_mean.requires_grad:
            raise ValueError(f"{op}: pl_mean requires grad, but it is a running mean (a buffer); pass "
                             "pl_mean.detach()")  # fmt: skip
        a = pl_mean.to(dtype=g.dtype, device=g.device)
    elif isinstance(pl_mean, (int, float)) and not isinstance(pl_mean, bool):
        # NaN in, NaN out: no finiteness check. A fill, not torch.tensor: no host-to-device copy (a
        # CUDA graph captures it, the value as the fill kernel's argument)
        a = torch.full((), float(pl_mean), dtype=g.dtype, device=g.device)
    else:
        raise TypeError(f"{op}: pl_mean must be a float or a 0-d torch.Tensor, got {type(pl_mean).__name__}")
    # (QNT.13) stylegan2-ada: pl_grads.square().sum(2).mean(1).sqrt(), the mean over every middle dim
    s = g.square().sum(-1).reshape(g.shape[0], -1).mean(1)
    pl = _safe_sqrt(s)
    new = a + decay * (pl.mean() - a)  # (QNT.13) pl_mean.lerp(pl.mean(), decay): a function of pl
    return (pl - new).square().mean(), new.detach()


lazy_regularization = ref.lazy_regularization  # (QNT.14) Python floats in, Python floats out


# ----------------------------------------------------------------------------- lpips_head (QNT.15)
def _unit_channels(x: torch.Tensor) -> torch.Tensor:
    """x / (||x||_c + 1e-10) per position (QNT.15); the derivative of the norm at 0 is taken as 0.
    The norm is m ||x / m|| with m the position's largest |x_c| (detached: for a constant m the
    same function, so the same gradient): x^2 overflowed float32 for features of 1e19, and the
    head, which is scale invariant, returned 0."""
    m = x.detach().abs().amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))  # 0, inf, NaN: unscaled
    return x / (m * _safe_sqrt((x / m).square().sum(1, keepdim=True)) + ref.LPIPS_EPS)


@with_reference_doc
def lpips_head(features_x: Any, features_y: Any, weights: Any) -> torch.Tensor:
    r"""LPIPS from the backbone's features, a composite of torch ops (differentiable w.r.t. the
    features and the weights).  Computed in the promoted dtype of all the features and weights, at
    least float32 (float16 / bfloat16 in float32, mixed float32 / float64 in float64, as
    :func:`vector_quantize` promotes), with autocast off: the value is returned in that dtype, the
    gradients in each input's own dtype.  (QNT.15)"""
    op = "lpips_head"
    fx, fy = _tensor_list(op, "features_x", features_x), _tensor_list(op, "features_y", features_y)
    ws = _tensor_list(op, "weights", weights)
    if not len(fx) == len(fy) == len(ws):
        raise ValueError(f"{op}: features_x, features_y and weights must have one entry per layer, got "
                         f"{len(fx)}, {len(fy)}, {len(ws)}")  # fmt: skip
    dt = torch.float32
    for t in (*fx, *fy, *ws):
        dt = torch.promote_types(dt, t.dtype)
    total: torch.Tensor | None = None
    for i, (x, y, w) in enumerate(zip(fx, fy, ws, strict=True)):
        if x.dim() != 4 or x.numel() == 0:
            raise ValueError(
                f"{op}: features_x[{i}] must have shape (B, C, H, W), not empty, got {tuple(x.shape)}"
            )
        if y.shape != x.shape:
            raise ValueError(f"{op}: features_y[{i}] must have the shape of features_x[{i}] {tuple(x.shape)}, got "
                             f"{tuple(y.shape)}")  # fmt: skip
        if x.shape[0] != fx[0].shape[0]:
            raise ValueError(f"{op}: features_x[{i}] must have the batch size of features_x[0] ({fx[0].shape[0]}), "
                             f"got shape {tuple(x.shape)}")  # fmt: skip
        if tuple(w.shape) not in ((x.shape[1],), (1, x.shape[1], 1, 1)):
            raise ValueError(f"{op}: weights[{i}] must have shape ({x.shape[1]},) or (1, {x.shape[1]}, 1, 1), got "
                             f"{tuple(w.shape)}")  # fmt: skip
        if eager_checks(w) and bool((w.detach() < 0).any()):  # data-dependent: eager
            raise ValueError(f"{op}: weights[{i}] must be >= 0 (LPIPS's linear heads are nonnegative)")
        # autocast off: under float16 autocast the einsum ran in float16, whose sum over H*W positions
        # overflowed (and bfloat16 autocast returned bfloat16), where the contract is float32 compute
        with torch.autocast(x.device.type, enabled=False):
            x, y, w = x.to(dt), y.to(dt), w.to(dt).reshape(-1)
            d = _unit_channels(x) - _unit_channels(y)
            # (QNT.15) the spatial mean first, then the channel-weighted sum: each term is at most
            # 4 w_c, so nothing grows with H*W
            layer = (d * d).mean(dim=(2, 3)) @ w
        total = layer if total is None else total + layer
    assert total is not None
    return total


__all__ = [*_QUANTIZER_NAMES, *_REGULARIZER_NAMES]
