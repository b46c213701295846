r"""The VAE family and Gaussian mixtures on the native engine.

Same conventions as ``genloss.native.gan``: ``(value, grads)``, gradients of
``sum(value)``, ``need_grad`` a bool or one bool per differentiable input. The
math is in cpp/include/genloss/ops/vae.h and the fused mixture kernel
(engine.h, ``GmmArgs``); derivations/vae.md derives each line.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _checks as C
from ._compose import Term, batch_scale, cached, empty_elementwise, inputs, needs, run_terms, value_out
from ._engine import (
    as_input,
    broadcast,
    check_if_nan,
    empty,
    float_range,
    gmm,
    leading_rows,
    map_reduce,
    reduce_to,
    row_lse,
    same_place,
    trailing_cols,
)

LIKELIHOODS = ("bernoulli", "gaussian")


def _pair(names, arrays, reduction):
    a, b = inputs(names, arrays)
    C.batched(names[0], a.shape, reduction)
    C.same_shape(names[0], a.shape, names[1], b.shape)
    return a, b


def _unit_interval(b, name):
    r = float_range(b)
    if r is not None and not (r[0] >= 0.0 and r[1] <= 1.0):  # NaN fails too
        raise ValueError(f"{name} must lie in [0, 1] (Bernoulli targets), got values in [{r[0]}, {r[1]}]")


def _unit_interval_after(value, b, name):
    """The BernoulliNLL functor makes the value NaN where a target is outside [0, 1]: only then
    read the targets again (a plan repeats the NaN test on the value and declines on one)."""
    check_if_nan(value, lambda: _unit_interval(b, name), as_input(value, "value"))


def _broadcastable(name, b, target_name, shape):
    try:
        ok = tuple(np.broadcast_shapes(b.shape, shape)) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must broadcast to the shape of {target_name} {tuple(shape)}, got shape {b.shape}"
        )


# ---------------------------------------------------------------- (VAE.4, VAE.5)
def gaussian_kl(mu, logvar, reduction="mean", *, need_grad=True):
    """KL(N(mu, e^logvar) || N(0, I)) per sample.  (VAE.4)"""

    def compose():
        C.reduction(reduction)
        m, lv = _pair(("mu", "logvar"), (mu, logvar), reduction)
        return run_terms([Term("GaussianKL", m, y=lv)], reduction, need_grad, 2, [0])

    return cached(("gaussian_kl", reduction, need_grad), (mu, logvar), compose)


def normal_kl(mean1, logvar1, mean2, logvar2, *, need_grad=True):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), broadcasting.  (VAE.5)"""
    arrays = (mean1, logvar1, mean2, logvar2)

    def compose():
        names = ("mean1", "logvar1", "mean2", "logvar2")
        bufs = inputs(names, arrays)
        try:
            shape = tuple(np.broadcast_shapes(*(b.shape for b in bufs)))
        except ValueError:
            got = ", ".join(f"{n} {b.shape}" for n, b in zip(names, bufs, strict=True))
            raise ValueError(f"mean1, logvar1, mean2, logvar2 must broadcast together, got {got}") from None
        flags = needs(need_grad, 4)
        if math.prod(shape) == 0:
            return empty_elementwise(bufs[0], shape, bufs, flags)
        full = [broadcast(b, shape, n) for b, n in zip(bufs, names, strict=True)]
        out = empty(full[0], shape)
        grads = [empty(f, shape) if fl else None for f, fl in zip(full, flags, strict=True)]
        n = math.prod(shape)
        x0, *rest = full
        map_reduce("NormalKL", x0, more=rest, params={}, shape2d=(1, n), elems_out=out, grads=grads)
        if not any(flags):
            return out.arr, ()
        return out.arr, tuple(
            None if g is None else reduce_to(g, b.shape) for g, b in zip(grads, bufs, strict=True)
        )

    # Same-shape tensors, trailing broadcasts (a per-feature log-variance) and leading ones (a
    # per-sample (B, 1) value), which the engine broadcasts and reduces (broadcast, reduce_to), run
    # on a cached plan. Any other broadcast is materialised by torch/NumPy (a derived array): the
    # Python path, not recorded.
    shapes = [tuple(getattr(a, "shape", ())) for a in arrays]
    try:
        full = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return compose()  # (raises, naming the shapes)
    if all(s == full or trailing_cols(s, full) or leading_rows(s, full) for s in shapes):
        return cached(("normal_kl", need_grad), arrays, compose)
    return compose()


# ---------------------------------------------------------------- (VAE.6, VAE.7)
def bernoulli_nll(logits, x, reduction="mean", *, need_grad=True):
    """sum softplus(l) - x l per sample; x in [0, 1].  (VAE.6)"""

    def compose():
        C.reduction(reduction)
        lg, xb = _pair(("logits", "x"), (logits, x), reduction)
        value, grads = run_terms([Term("BernoulliNLL", lg, y=xb)], reduction, need_grad, 2, [0])
        _unit_interval_after(value, xb, "x")
        return value, grads

    return cached(("bernoulli_nll", reduction, need_grad), (logits, x), compose)


def gaussian_nll(mean, x, logvar, reduction="mean", *, need_grad=True):
    """sum 1/2 (log 2 pi + logvar + (x - mean)^2 e^-logvar) per sample; logvar broadcasts.  (VAE.7)"""

    def compose():
        C.reduction(reduction)
        m, xb = _pair(("mean", "x"), (mean, x), reduction)
        lv = as_input(logvar, "logvar")
        same_place(m, "mean", lv, "logvar")
        _broadcastable("logvar", lv, "mean", m.shape)
        full = broadcast(lv, m.shape, "logvar")  # (a stretched inner dim: a derived array, no plan)
        value, grads = run_terms([Term("GaussianNLL", m, y=xb, more=(full,))], reduction, need_grad, 3, [0])
        if grads and grads[2] is not None:
            grads = (grads[0], grads[1], reduce_to(as_input(grads[2], "logvar"), lv.shape))
        return value, grads

    return cached(("gaussian_nll", reduction, need_grad), (mean, x, logvar), compose)


def negative_elbo(
    recon,
    x,
    mu,
    logvar,
    beta=1.0,
    likelihood="bernoulli",
    recon_logvar=None,
    reduction="mean",
    *,
    need_grad=True,
):
    """Reconstruction NLL + beta * KL(q(z|x) || N(0, I)) per sample (the beta-VAE loss).  (VAE.8)

    Differentiable inputs: recon, mu, logvar (and recon_logvar when given); x is data.
    One pass over recon and x, one over mu and logvar, accumulating per sample.
    """

    def compose():
        return _negative_elbo(recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction, need_grad)

    arrays = (recon, x, mu, logvar) if recon_logvar is None else (recon, x, mu, logvar, recon_logvar)
    key = ("negative_elbo", beta, likelihood, recon_logvar is None, reduction, need_grad)
    return cached(key, arrays, compose)


def _negative_elbo(recon, x, mu, logvar, beta, likelihood, recon_logvar, reduction, need_grad):
    beta = C.nonnegative("beta", beta)
    C.choice("likelihood", likelihood, LIKELIHOODS)
    C.reduction(reduction)
    r, xb = _pair(("recon", "x"), (recon, x), reduction)
    m, lv = _pair(("mu", "logvar"), (mu, logvar), reduction)
    same_place(r, "recon", m, "mu")
    C.same_batch("recon", r.shape, "mu", m.shape)
    n_grads = 3
    if likelihood == "bernoulli":
        if recon_logvar is not None:
            raise ValueError("recon_logvar is only used with likelihood='gaussian', got an array")
        recon_term = Term("BernoulliNLL", r, y=xb, slots=(0, None))
    elif recon_logvar is None:
        recon_term = Term("GaussianNLLUnit", r, y=xb, slots=(0, None))
    else:
        rlv = as_input(recon_logvar, "recon_logvar")
        same_place(r, "recon", rlv, "recon_logvar")
        _broadcastable("recon_logvar", rlv, "recon", r.shape)
        recon_term = Term(
            "GaussianNLL", r, y=xb, more=(broadcast(rlv, r.shape, "recon_logvar"),), slots=(0, None, 3)
        )
        n_grads = 4
    terms = [recon_term, Term("GaussianKL", m, coef=beta, y=lv, slots=(1, 2))]
    value, grads = run_terms(terms, reduction, need_grad, n_grads, [0, 1])
    if likelihood == "bernoulli":
        _unit_interval_after(value, xb, "x")
    if n_grads == 4 and grads and grads[3] is not None:
        grads = (*grads[:3], reduce_to(as_input(grads[3], "recon_logvar"), rlv.shape))
    return value, grads


# ---------------------------------------------------------------- (VAE.10)
def iwae_bound(log_weights, reduction="mean", *, need_grad=True):
    """logsumexp_k log w_k - log K per sample (the importance-weighted bound).  (VAE.10)"""

    def compose():
        C.reduction(reduction)
        (w,) = inputs(["log_weights"], [log_weights])
        C.ndim("log_weights", w.shape, 2)
        b = C.batched("log_weights", w.shape, reduction)
        s = batch_scale(reduction, b)
        out, rows = value_out(w, reduction)
        (need,) = needs(need_grad, 1)
        g = empty(w, w.shape) if need else None
        row_lse(w, mode=3, value_scale=s, out=out, rows_out=rows, grad=g, grad_scale=s)
        return (out or rows).arr, ((g.arr,) if need else ())  # type: ignore[union-attr]

    return cached(("iwae_bound", reduction, need_grad), (log_weights,), compose)


# ---------------------------------------------------------------- (VAE.11, VAE.12)
def _gmm_inputs(x, logits, means, logvars, reduction):
    xb, lg, mb, vb = inputs(["x", "logits", "means", "logvars"], [x, logits, means, logvars])
    C.ndim("x", xb.shape, 2)
    C.batched("x", xb.shape, reduction)
    C.ndim("logits", lg.shape, 1)
    k, d = lg.shape[0], xb.shape[1]
    if k == 0:
        raise ValueError("logits must have at least one component, got shape (0,)")
    for name, b in (("means", mb), ("logvars", vb)):
        if b.shape != (k, d):
            raise ValueError(f"{name} must have shape ({k}, {d}) (components, dims of x), got {b.shape}")
    return xb, lg, mb, vb


def gmm_log_likelihood(x, logits, means, logvars, reduction="mean", *, need_grad=True, row_weights=None):
    """log sum_k softmax(logits)_k N(x; means_k, diag e^logvars_k) per point, fused over N x K x D.  (VAE.11)

    ``row_weights`` (N,) weights each point's gradient (the backward of a
    'none' reduction), leaving the value unweighted.
    """

    def compose():
        C.reduction(reduction)
        xb, lg, mb, vb = _gmm_inputs(x, logits, means, logvars, reduction)
        n = xb.shape[0]
        rw = None
        if row_weights is not None:
            rw = as_input(row_weights, "row_weights")
            same_place(xb, "x", rw, "row_weights")
            if rw.shape != (n,):
                raise ValueError(f"row_weights must have shape ({n},), got {rw.shape}")
        flags = needs(need_grad, 4)
        s = batch_scale(reduction, n)
        out, rows = value_out(xb, reduction)
        g = [empty(b, b.shape) if f else None for b, f in zip((xb, lg, mb, vb), flags, strict=True)]
        gmm(xb, lg, mb, vb, value_scale=s, out=out, rows_out=rows, row_weights=rw, grad_scale=s, grads=g)
        value = (out or rows).arr  # type: ignore[union-attr]
        return value, (tuple(None if t is None else t.arr for t in g) if any(flags) else ())

    arrays = (x, logits, means, logvars) + (() if row_weights is None else (row_weights,))
    return cached(("gmm_log_likelihood", reduction, need_grad, row_weights is None), arrays, compose)


def gmm_responsibilities(x, logits, means, logvars):
    """(N, K) posterior over components, the E-step.  (VAE.12)"""

    def compose():
        xb, lg, mb, vb = _gmm_inputs(x, logits, means, logvars, "sum")
        resp = empty(xb, (xb.shape[0], lg.shape[0]))
        gmm(xb, lg, mb, vb, resp=resp)
        return resp.arr, ()

    return cached(("gmm_responsibilities",), (x, logits, means, logvars), compose)[0]
