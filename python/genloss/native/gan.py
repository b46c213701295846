r"""The GAN family on the native engine.

Every function returns ``(value, grads)``: ``value`` an array of the inputs'
kind and dtype (0-d for 'mean'/'sum', shape (B,) for 'none'), ``grads`` the
gradients of ``sum(value)`` with respect to each differentiable input, in input
order (empty when ``need_grad=False``; ``need_grad`` may also be a sequence of
bools, one per differentiable input, and unneeded gradients are then ``None``
and never written). Value and gradient come from ONE pass
over each input. The math is in cpp/include/genloss/ops/gan.h; this file only
says which functor runs on which input with which scale (derivations/gan.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import _checks as C
from ._compose import (
    Term,
    batch_scale,
    cached,
    computed_in_float32,
    grads_out,
    inputs,
    low_storage,
    needs,
    one_population,
    run_terms,
    two_population,
    value_out,
)
from ._engine import (
    CPU,
    Buf,
    as_input,
    col_broadcast,
    col_sum,
    empty,
    int_range,
    map_reduce,
    recording,
    row_lse,
    row_scale,
    same_place,
)

FGAN_DIVERGENCES = (
    "kl",
    "reverse_kl",
    "pearson",
    "squared_hellinger",
    "jensen_shannon",
    "gan",
    "total_variation",
)  # order = enum FganDivergence in ops/gan.h
GAN_G_MODES = ("nonsaturating", "minimax")
_NO_SHIFT = {"shift": 0.0}  # SoftplusNeg / Softplus at 0: the plain GAN terms (read only)
# The (functor, coef, params) terms of the fixed two-population losses, made once: the plan
# key holds the same object on every call, so the plan cache compares it by identity.
_GAN_D_TERMS = (("SoftplusNeg", 1.0, _NO_SHIFT), ("Softplus", 1.0, _NO_SHIFT))
_WGAN_CRITIC_TERMS = (("Linear", -1.0, None), ("Linear", 1.0, None))
_HINGE_D_TERMS = (
    ("HingeRelu", 1.0, {"offset": 1.0, "slope": -1.0}),
    ("HingeRelu", 1.0, {"offset": 1.0, "slope": 1.0}),
)


# ---------------------------------------------------------------- (GAN.3, GAN.7)
def gan_d_loss(real_logits, fake_logits, reduction="mean", *, need_grad=True):
    """mean softplus(-l_r) + mean softplus(l_f).  (GAN.3)"""
    return two_population(
        ("real_logits", "fake_logits"), (real_logits, fake_logits), reduction, _GAN_D_TERMS, need_grad
    )  # fmt: skip


def gan_g_loss(fake_logits, mode="nonsaturating", reduction="mean", *, need_grad=True):
    """NS: mean softplus(-l_f); minimax: -mean softplus(l_f).  (GAN.7)"""
    C.choice("mode", mode, GAN_G_MODES)
    if mode == "nonsaturating":
        return one_population("fake_logits", fake_logits, reduction, "SoftplusNeg", 1.0, _NO_SHIFT, need_grad)
    return one_population("fake_logits", fake_logits, reduction, "Softplus", -1.0, _NO_SHIFT, need_grad)


# ---------------------------------------------------------------- (GAN.8)
def lsgan_d_loss(real_out, fake_out, a=0.0, b=1.0, reduction="mean", *, need_grad=True):
    """1/2 mean (D(x) - b)^2 + 1/2 mean (D(G(z)) - a)^2.  (GAN.8)"""
    a, b = C.finite("a", a), C.finite("b", b)
    return two_population(
        ("real_out", "fake_out"), (real_out, fake_out), reduction,
        (("HalfSquare", 1.0, {"target": b}), ("HalfSquare", 1.0, {"target": a})), need_grad,
    )  # fmt: skip


def lsgan_g_loss(fake_out, c=1.0, reduction="mean", *, need_grad=True):
    """1/2 mean (D(G(z)) - c)^2.  (GAN.8)"""
    c = C.finite("c", c)
    return one_population("fake_out", fake_out, reduction, "HalfSquare", 1.0, {"target": c}, need_grad)


# ---------------------------------------------------------------- (GAN.9, GAN.10)
def wgan_critic_loss(real_scores, fake_scores, reduction="mean", *, need_grad=True):
    """mean C(G(z)) - mean C(x).  (GAN.9)"""
    return two_population(
        ("real_scores", "fake_scores"), (real_scores, fake_scores), reduction, _WGAN_CRITIC_TERMS, need_grad
    )  # fmt: skip


def wgan_g_loss(fake_scores, reduction="mean", *, need_grad=True):
    """-mean C(G(z)).  (GAN.9)"""
    return one_population("fake_scores", fake_scores, reduction, "Linear", -1.0, None, need_grad)


def hinge_d_loss(real_scores, fake_scores, reduction="mean", *, need_grad=True):
    """mean relu(1 - D(x)) + mean relu(1 + D(G(z))).  (GAN.10)"""
    return two_population(
        ("real_scores", "fake_scores"), (real_scores, fake_scores), reduction, _HINGE_D_TERMS, need_grad
    )  # fmt: skip


def hinge_g_loss(fake_scores, reduction="mean", *, need_grad=True):
    """-mean D(G(z)): the same loss as ``wgan_g_loss`` (GAN.10), so that function."""
    return wgan_g_loss(fake_scores, reduction, need_grad=need_grad)


# ---------------------------------------------------------------- (GAN.11)
class _Sums:
    """The (value, derivative) sums one relativistic pass hands to the next, slots 0-7: host
    floats on the CPU (no wait there, and ~15 us cheaper per call), float64 memory where the
    data is on CUDA (``map_reduce``'s ``totals_out`` / ``param_from`` / ``offset_from``: the
    stream never waits for the host, and a CUDA graph captures the loss)."""

    def __init__(self, like: Buf, memory: bool) -> None:
        # every slot is written (totals_out) before a later pass reads it: no zeros needed,
        # and an array of _engine.empty is one a plan allocates afresh as scratch
        self.buf = empty(like, (8,), f64=True) if memory else None
        self.host = [0.0] * 8

    def into(self, i: int) -> dict:
        """Keywords that leave a pass's (value, derivative) totals in slots i, i + 1."""
        return {"totals": True} if self.buf is None else {"totals_out": (self.buf, i)}

    def keep(self, i: int, totals: Any) -> None:
        if self.buf is None:
            self.host[i : i + 2] = totals

    def shift(self, i: int, scale: float) -> dict:
        """Keywords for a functor whose ``shift`` is scale * slot i."""
        if self.buf is None:
            return {"params": {"shift": scale * self.host[i]}}
        return {"params": {"shift": 0.0}, "param_from": (self.buf, i, scale)}

    def offset(self, i: int, scale: float) -> dict:
        """Keywords for a gradient offset of scale * slot i."""
        if self.buf is None:
            return {"grad_offset": scale * self.host[i]}
        return {"offset_from": (self.buf, i, scale)}


def _relativistic(pos, neg, pos_name, neg_name, average, reduction, need_grad, memory=None):
    """s_p sum softplus(m_n - p) + s_n sum softplus(n - m_p), m = the population's mean.

    D: pos = real, neg = fake.  G: pos = fake, neg = real. The means depend on
    the other population, so each gradient gets a constant cross term
    (GAN.11): d/dn_j of the first sum is -s_p * sum(dp) / numel(n). ``memory``: where the
    sums between passes live (``_Sums``); None: in memory on CUDA and while a plan records
    (the plan replays the passes with the sums in its float64 scratch), else on the host.
    """
    C.reduction(reduction, C.TWO_POPULATION)
    average = C.flag("average", average)
    p, n = inputs([pos_name, neg_name], [pos, neg])
    bp = C.batched(pos_name, p.shape, reduction)
    bn = C.batched(neg_name, n.shape, reduction)
    if not average:  # RSGAN: softplus(-(p - n)) per paired element
        C.same_shape(pos_name, p.shape, neg_name, n.shape)
        terms = [Term("SoftplusNegDiff", p, y=n)]
        return run_terms(terms, reduction, need_grad, 2, [0])
    s = _Sums(p, (p.device != CPU or recording()) if memory is None else memory)
    s.keep(0, map_reduce("Linear", p, params={}, **s.into(0)))  # slots 0-1: sum(p); 2-3: sum(n)
    s.keep(2, map_reduce("Linear", n, params={}, **s.into(2)))
    sp, sn = batch_scale(reduction, bp), batch_scale(reduction, bn)
    need_p, need_n = needs(need_grad, 2)
    out = empty(p, ())
    # shift = the other population's mean: mean(n) for the p pass, mean(p) for the n pass
    if not (need_p or need_n):
        map_reduce("SoftplusNeg", p, **s.shift(2, 1.0 / n.numel), value_scale=sp, out=out)
        map_reduce("Softplus", n, **s.shift(0, 1.0 / p.numel), value_scale=sn, out=out, accumulate=True)
        return out.arr, ()
    # Pass 1 and 2 write the value and the derivative sums (slots 4-5, 6-7); each
    # population's gradient also gets the other term's cross term through its mean (GAN.11):
    # cross_n = -sp * sum(d pass 1) / numel(n), cross_p = -sn * sum(d pass 2) / numel(p).
    gp = empty(p, p.shape)  # written twice below; the first pass only yields the sum
    gn = empty(n, n.shape) if need_n else None
    s.keep(4, map_reduce("SoftplusNeg", p, **s.shift(2, 1.0 / n.numel), value_scale=sp, out=out, grads=[gp],
                         grad_scale=sp, **s.into(4)))  # fmt: skip
    scratch = gn if gn is not None else empty(n, n.shape)
    s.keep(6, map_reduce("Softplus", n, **s.shift(0, 1.0 / p.numel), value_scale=sn, out=out, accumulate=True,
                         grads=[scratch], grad_scale=sn, **s.offset(5, -sp / n.numel), **s.into(6)))  # fmt: skip
    if need_p:  # rewrite pos's gradient with its cross term (no value this time)
        map_reduce("SoftplusNeg", p, **s.shift(2, 1.0 / n.numel), grads=[gp], grad_scale=sp,
                   **s.offset(7, -sn / p.numel))  # fmt: skip
    return out.arr, (gp.arr if need_p else None, None if gn is None else gn.arr)


def relativistic_d_loss(real_logits, fake_logits, average=True, reduction="mean", *, need_grad=True):
    """RaGAN / RSGAN discriminator loss.  (GAN.11)"""

    def compose():
        return _relativistic(
            real_logits, fake_logits, "real_logits", "fake_logits", average, reduction, need_grad
        )

    return cached(("relativistic_d", average, reduction, need_grad), (real_logits, fake_logits), compose)


def relativistic_g_loss(real_logits, fake_logits, average=True, reduction="mean", *, need_grad=True):
    """RaGAN / RSGAN generator loss: the discriminator loss with the roles swapped.  (GAN.11)"""
    flags = need_grad if isinstance(need_grad, (bool, int)) else tuple(need_grad)[::-1]

    def compose():
        value, grads = _relativistic(fake_logits, real_logits, "fake_logits", "real_logits", average, reduction,
                                     flags)  # fmt: skip
        return value, grads[::-1] if grads else ()

    return cached(("relativistic_g", average, reduction, need_grad), (real_logits, fake_logits), compose)


# ---------------------------------------------------------------- (GAN.12, GAN.13)
def gradient_penalty_from_grads(grads, lambda_=10.0, center=1.0, one_sided=False, reduction="mean", *,
                                need_grad=True):  # fmt: skip
    """lambda * mean_b (||g_b|| - center)^2; gradient 0 at g_b = 0.  (GAN.12)

    float16/bfloat16 CUDA inputs are computed in float32 (the per-row norms would otherwise be
    rounded to the storage dtype between two engine calls); value and gradient in their dtype."""
    if low_storage((grads,)):
        return computed_in_float32(
            lambda g: gradient_penalty_from_grads(
                g, lambda_, center, one_sided, reduction, need_grad=need_grad
            ),
            (grads,),
        )
    lam, c = C.finite("lambda_", lambda_), C.finite("center", center)
    one_sided = C.flag("one_sided", one_sided)

    def compose():
        C.reduction(reduction)
        (g,) = inputs(["grads"], [grads])
        b = C.batched("grads", g.shape, reduction)
        sq = empty(g, (b,))  # scratch (a plan allocates it afresh)
        map_reduce("Square", g, params={}, rows_out=sq)  # (GAN.12) s_b = ||g_b||^2
        s = batch_scale(reduction, b, coef=lam)
        out, rows = value_out(g, reduction)
        (need,) = needs(need_grad, 1)
        coef = empty(g, (b,)) if need else None  # scratch
        map_reduce("GradPenaltyOfSqNorm", sq, params={"center": c, "one_sided": one_sided}, shape2d=(b, 1),
                   value_scale=s, out=out, rows_out=rows, grads=[coef], grad_scale=s)  # fmt: skip
        value = (out or rows).arr  # type: ignore[union-attr]
        if not need:
            return value, ()
        gg = empty(g, g.shape)
        row_scale(g, gg, coef=coef, scale=2.0)  # d s_b / d g = 2 g
        return value, (gg.arr,)

    return cached(("gradient_penalty", lam, c, one_sided, reduction, need_grad), (grads,), compose)


def r1_penalty_from_grads(grads, gamma=10.0, reduction="mean", *, need_grad=True):
    """gamma/2 * mean_b ||g_b||^2.  (GAN.13)"""
    gamma = C.finite("gamma", gamma)
    return one_population("grads", grads, reduction, "Square", gamma / 2.0, None, need_grad)


# ---------------------------------------------------------------- (GAN.14)
def feature_matching_loss(real_features, fake_features, *, need_grad=True):
    """|| mean_b f_r - mean_b f_f ||^2.  (GAN.14)"""

    def compose():
        r, f = inputs(["real_features", "fake_features"], [real_features, fake_features])
        br = C.batched("real_features", r.shape, "mean", min_ndim=2)
        bf = C.batched("fake_features", f.shape, "mean", min_ndim=2)
        C.ndim("real_features", r.shape, 2)  # (B, F), as SPEC and the reference: flatten feature maps first
        C.ndim("fake_features", f.shape, 2)
        if r.shape[1:] != f.shape[1:]:
            raise ValueError(
                f"fake_features must have the feature shape of real_features {r.shape[1:]}, got {f.shape[1:]}"
            )
        nf = r.numel // br
        mr, mf = empty(r, (nf,)), empty(r, (nf,))  # scratch, as dr and df (a plan allocates them afresh)
        col_sum(r, mr, scale=1.0 / br)
        col_sum(f, mf, scale=1.0 / bf)
        out = empty(r, ())
        need_r, need_f = needs(need_grad, 2)
        dr = empty(r, (nf,)) if need_r else None
        df = empty(r, (nf,)) if need_f else None
        map_reduce("SquaredDiff", mr, y=mf, params={}, shape2d=(1, nf), out=out, grads=[dr, df])
        gr = empty(r, r.shape) if need_r else None
        gf = empty(f, f.shape) if need_f else None
        for d, g, b in ((dr, gr, br), (df, gf, bf)):
            if g is not None:
                col_broadcast(d, g, scale=1.0 / b)  # type: ignore[arg-type]
        return out.arr, grads_out([gr, gf], (need_r, need_f))

    return cached(("feature_matching", need_grad), (real_features, fake_features), compose)


# ---------------------------------------------------------------- (GAN.15)
def _class_logits(names: Sequence[str], arrays: Sequence[Any], reduction: str) -> list[Buf]:
    bufs = inputs(names, arrays)
    for n, b in zip(names, bufs, strict=True):
        C.ndim(n, b.shape, 2)
        C.batched(n, b.shape, reduction)
        if b.shape[1] < 2:
            raise ValueError(
                f"{n} must have at least 2 columns (C real classes + the fake class), got {b.shape}"
            )
        if b.shape[1] != bufs[0].shape[1]:
            raise ValueError(f"{n} must have {bufs[0].shape[1]} columns like {names[0]}, got {b.shape[1]}")
    return bufs


def ssgan_critic_loss(
    labeled_logits, labels, unlabeled_logits, fake_logits, reduction="mean", *, need_grad=True
):
    """L_sup + L_unsup (Salimans et al. 2016): mean -log p(y | x, real) over the C real classes
    + mean -log(1 - p_fake(x_u)) + mean -log p_fake(G(z)).  (GAN.15, GAN.19)"""

    def compose():
        C.reduction(reduction, C.TWO_POPULATION)
        lab, unl, fak = _class_logits(
            ["labeled_logits", "unlabeled_logits", "fake_logits"], [labeled_logits, unlabeled_logits, fake_logits],
            reduction,
        )  # fmt: skip
        y = as_input(labels, "labels", integer=True)
        C.ndim("labels", y.shape, 1)
        C.same_batch("labeled_logits", lab.shape, "labels", y.shape)
        if (y.device, y.device_id) != (lab.device, lab.device_id):
            raise ValueError("labels must be on the device of labeled_logits")
        k = lab.shape[1]
        r = int_range(y, ("index_range", (y,), k - 1))  # a plan re-checks it on every call
        if r is not None and (r[0] < 0 or r[1] >= k - 1):
            raise ValueError(
                f"labels must lie in [0, {k - 1}) (the last class is the fake one), got range [{r[0]}, {r[1]}]"
            )
        out = empty(lab, ())
        flags = needs(need_grad, 3)
        grads = [empty(b, b.shape) if nd else None for b, nd in zip((lab, unl, fak), flags, strict=True)]
        # row_lse modes (ops::RowLseMode): 4 = -log p(y | real) (the fake column excluded), 2 =
        # -log(1 - p_fake), 1 = -log p_fake with index = the fake class.  (GAN.19, GAN.15)
        for i, (b, mode) in enumerate(((lab, 4), (unl, 2), (fak, 1))):
            s = batch_scale(reduction, b.shape[0])
            row_lse(b, mode=mode, labels=y if mode == 4 else None, index=k - 1, value_scale=s, out=out,
                    accumulate=i > 0, grad=grads[i], grad_scale=s)  # fmt: skip
        return out.arr, grads_out(grads, flags)

    arrays = (labeled_logits, labels, unlabeled_logits, fake_logits)
    return cached(("ssgan_critic_loss", reduction, need_grad), arrays, compose)


def ssgan_g_loss(fake_logits, reduction="mean", *, need_grad=True):
    """mean log p_fake(G(z)) = mean (l_C - lse(l)).  (GAN.15)"""

    def compose():
        C.reduction(reduction)
        (f,) = _class_logits(["fake_logits"], [fake_logits], reduction)
        s = batch_scale(reduction, f.shape[0], coef=-1.0)
        out, rows = value_out(f, reduction)
        flags = needs(need_grad, 1)
        g = empty(f, f.shape) if flags[0] else None
        row_lse(f, mode=1, index=f.shape[1] - 1, value_scale=s, out=out, rows_out=rows, grad=g, grad_scale=s)
        return (out or rows).arr, grads_out([g], flags)  # type: ignore[union-attr]

    return cached(("ssgan_g_loss", reduction, need_grad), (fake_logits,), compose)


# ---------------------------------------------------------------- (GAN.16)
def _image_pair(names, arrays, reduction):
    x, t = inputs(names, arrays)
    C.batched(names[0], x.shape, reduction)
    C.same_shape(names[0], x.shape, names[1], t.shape)
    return x, t


def l1_loss(input, target, reduction="mean", *, need_grad=True):  # noqa: A002
    """mean |input - target| (per-sample MEAN over non-batch dims, as torch.nn.L1Loss).  (GAN.16)"""

    def compose():
        C.reduction(reduction)
        x, t = _image_pair(("input", "target"), (input, target), reduction)
        return run_terms([Term("AbsDiff", x, y=t, per_sample_mean=True)], reduction, need_grad, 2, [0])

    return cached(("l1_loss", reduction, need_grad), (input, target), compose)


def pix2pix_g_loss(fake_logits, generated, target, lambda_l1=100.0, reduction="mean", *, need_grad=True):
    """mean softplus(-l_f) + lambda_l1 * mean |G(x) - y|, both per-sample MEANS.  (GAN.7, GAN.16)"""
    lam = C.finite("lambda_l1", lambda_l1)

    def compose():
        C.reduction(reduction)
        (lg,) = inputs(["fake_logits"], [fake_logits])
        C.batched("fake_logits", lg.shape, reduction)
        x, t = _image_pair(("generated", "target"), (generated, target), reduction)
        same_place(lg, "fake_logits", x, "generated")
        C.same_batch("fake_logits", lg.shape, "generated", x.shape)
        # Both terms average over their sample's elements (the PatchGAN's outputs, the pixels), as
        # the pix2pix code's BCE-with-logits and L1 do: lambda_l1 = 100 is calibrated on that.
        terms = [
            Term("SoftplusNeg", lg, params=_NO_SHIFT, per_sample_mean=True),
            Term("AbsDiff", x, coef=lam, y=t, per_sample_mean=True),
        ]
        return run_terms(terms, reduction, need_grad, 3, [0, 1])

    key = ("pix2pix_g_loss", lam, reduction, need_grad)
    return cached(key, (fake_logits, generated, target), compose)


def cycle_consistency_loss(
    real_a, rec_a, real_b, rec_b, lambda_cyc=10.0, reduction="mean", *, need_grad=True
):
    """lambda_cyc (mean |rec_a - real_a| + mean |rec_b - real_b|).  (GAN.16)"""
    lam = C.finite("lambda_cyc", lambda_cyc)

    def compose():
        C.reduction(reduction, C.TWO_POPULATION)
        ra, pa = _image_pair(("real_a", "rec_a"), (real_a, rec_a), reduction)
        rb, pb = _image_pair(("real_b", "rec_b"), (real_b, rec_b), reduction)
        same_place(ra, "real_a", rb, "real_b")
        terms = [
            Term("AbsDiff", ra, coef=lam, y=pa, per_sample_mean=True),
            Term("AbsDiff", rb, coef=lam, y=pb, per_sample_mean=True),
        ]
        return run_terms(terms, reduction, need_grad, 4, [0, 2])

    key = ("cycle_consistency_loss", lam, reduction, need_grad)
    return cached(key, (real_a, rec_a, real_b, rec_b), compose)


# ---------------------------------------------------------------- (GAN.6, GAN.18)
def _divergence(divergence: object) -> int:
    return FGAN_DIVERGENCES.index(C.choice("divergence", divergence, FGAN_DIVERGENCES))


def fgan_d_loss(real_v, fake_v, divergence, reduction="mean", *, need_grad=True):
    """mean[-g_f(v_r)] + mean[f*(g_f(v_f))].  (GAN.18)"""
    m = _divergence(divergence)
    return two_population(
        ("real_v", "fake_v"), (real_v, fake_v), reduction,
        (("FganActivation", 1.0, {"divergence": m}), ("FganConjugate", 1.0, {"divergence": m})), need_grad,
    )  # fmt: skip


def fgan_g_loss(fake_v, divergence, mode="nonsaturating", reduction="mean", *, need_grad=True):
    """minimax: -mean f*(g_f(v_f)); nonsaturating: -mean g_f(v_f).  (GAN.18)"""
    m = _divergence(divergence)
    C.choice("mode", mode, GAN_G_MODES)
    if mode == "nonsaturating":
        return one_population(
            "fake_v", fake_v, reduction, "FganActivation", 1.0, {"divergence": m}, need_grad
        )
    return one_population("fake_v", fake_v, reduction, "FganConjugate", -1.0, {"divergence": m}, need_grad)


def jsd_estimate(real_logits, fake_logits, *, need_grad=True):
    """(log 4 - gan_d_loss) / 2, the JSD at the optimal discriminator.  (GAN.6)"""

    def compose():
        r, f = inputs(["real_logits", "fake_logits"], [real_logits, fake_logits])
        C.batched("real_logits", r.shape)
        C.batched("fake_logits", f.shape)
        out = empty(r, ())
        row_scale(None, out, scale=math.log(4.0) / 2.0)  # the constant, by an engine Call: a plan replays it
        flags = needs(need_grad, 2)
        gr = empty(r, r.shape) if flags[0] else None
        gf = empty(f, f.shape) if flags[1] else None
        # The mean over every logit, not over the batch (reference.jsd_estimate: a PatchGAN's patches)
        sr, sf = (
            batch_scale("mean", r.rows * r.cols, coef=-0.5),
            batch_scale("mean", f.rows * f.cols, coef=-0.5),
        )
        map_reduce("SoftplusNeg", r, params=_NO_SHIFT, value_scale=sr, out=out, accumulate=True, grads=[gr],
                   grad_scale=sr)  # fmt: skip
        map_reduce("Softplus", f, params=_NO_SHIFT, value_scale=sf, out=out, accumulate=True, grads=[gf],
                   grad_scale=sf)  # fmt: skip
        return out.arr, grads_out([gr, gf], flags)

    return cached(("jsd_estimate", need_grad), (real_logits, fake_logits), compose)
