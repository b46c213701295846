"""The records of the quant family."""

from __future__ import annotations

import numpy as np

from ..reference import quant as _quant  # noqa: F401
from .core import OpRecord

# quantizers (QNT.1-QNT.9)
QUANTIZER_RECORDS: tuple[OpRecord, ...] = ()

# regularizers (QNT.10-QNT.19): no native layer (SPEC: reference + torch).  adaptive_gan_weight and
# lpips_head take lists of arrays, fsq_indices / fsq_codes map to and from integers: NOT_REGISTERED.
from .core import DEFAULT, Arg, Hyper, _v, record_factory  # noqa: E402
from .domains import DOMAINS, Domain  # noqa: E402

_qrec = record_factory("quant", _quant, "QNT")


def _pl_mean(rng, shape, sizes, hyper):
    """A path-length running mean: U(0, 2) (about the lengths of N(0, 1) gradients), 0 (its start) often."""
    return np.where(rng.random(shape) < 0.25, 0.0, rng.uniform(0.0, 2.0, size=shape))


DOMAINS.update({
    # a running mean (state): any real is a valid value, NaN gives NaN (no invalid values)
    "pl_mean": Domain("path-length running mean, U(0, 2), 0 often", "float", _pl_mean, extreme=False),
})  # fmt: skip

REGULARIZER_RECORDS: tuple[OpRecord, ...] = (
    # (QNT.10) elementwise, channels last (d = len(levels)); the gradient is the straight-through one, by
    # design not the derivative of the (piecewise constant) value: fd=False.  L = 2 and L = 1000 are the
    # ends of the allowed levels.
    _qrec("fsq_quantize", [Arg("z", "data", ("B", "...", "4"))], ("z",), (), 10, elementwise=True,
          has_native=False, hypers=(Hyper("levels", "ints"),),
          variants=(_v(fd=False, levels=(8, 5, 5, 5)), _v(fd=False, levels=(2, 3, 4, 1000)))),
    # (QNT.13) (penalty, new_pl_mean); the penalty is the value.  pl_mean is 0-d state (no gradient).
    _qrec("path_length_penalty", [Arg("grads_w", "grads", ("B", "...", "F")),
                                  Arg("pl_mean", "pl_mean", ())],
          ("grads_w",), (), 13, has_native=False, value_index=0, hypers=(Hyper("decay", "real", low=0.0),),
          variants=(DEFAULT, _v(decay=0.5), _v(decay=0.0))),
)  # fmt: skip

RECORDS = QUANTIZER_RECORDS + REGULARIZER_RECORDS


# ============================================================================= verify cases
# The quant ops with no record (NOT_REGISTERED: several or integer outputs, lists of arrays) are checked
# by ``genloss verify`` through these cases: every output of every layer vs the reference, the gradients
# vs the reference backwards.  Sizes are small (verify runs every op x backend in seconds).
from .core import Out, case_factory, native_loss, native_value  # noqa: E402

_qcase = case_factory("quant", _quant)


def _normal(rng, *shape, loc=0.0, scale=1.0):
    return rng.normal(loc, scale, size=shape)


def _size(rng, lo, hi):
    return int(rng.integers(lo, hi + 1))


def _vq_draw(rng):
    """Rows near distinct codes (no near-ties of the argmin across dtypes); one row exactly on a code."""
    calls = []
    for beta in (0.25, 1.5):
        n, k, d = _size(rng, 1, 9), _size(rng, 2, 7), _size(rng, 1, 5)
        codebook = _normal(rng, k, d, scale=2.0)
        z = codebook[rng.integers(0, k, size=n)] + _normal(rng, n, d, scale=0.3)
        z[0] = codebook[-1]
        calls.append(((z, codebook), {"beta": beta}))
    return calls


def _vq_native(args, kwargs, up):
    """The native (value, grads): (d commitment/dz, d codebook_loss/dcodebook) for upstream 1; z_q's
    straight-through identity is the caller's (genloss.native.quant's docstring)."""
    import genloss.native

    (zq, idx, commit, cb), (gz, ge) = genloss.native.vector_quantize(*args, **kwargs)
    return (zq, idx, commit, cb), [up[0] + float(up[2]) * gz, float(up[3]) * ge]


def _vq_ema_draw(rng):
    calls = []
    for decay, eps in ((0.99, 1e-5), (0.5, 1e-3), (0.0, 1e-5)):
        # N = 0 (no rows this step) once, where decay > 0 keeps the counts (decay 0 would leave 0 / 0)
        n, k, d = _size(rng, 0 if decay else 1, 9), _size(rng, 1, 6), _size(rng, 1, 4)
        idx = rng.integers(0, k, size=n).astype(np.int64)
        cs = rng.uniform(0.0, 5.0, size=k)
        cs[0] = 0.0 if k > 1 else cs[0]  # a code nobody chose yet (the Laplace smoothing's case); not all
        calls.append(((_normal(rng, n, d), idx, cs, _normal(rng, k, d)), {"decay": decay, "eps": eps}))
    return calls


def _lfq_draw(rng):
    calls = []
    for kw in ({"inv_temperature": 1.0}, {"inv_temperature": 3.0, "sample_weight": 0.5, "codebook_weight": 0.3},
               {"inv_temperature": 2.0, "codebook_weight": 0.0}):  # fmt: skip
        calls.append(((_normal(rng, _size(rng, 1, 7), _size(rng, 1, 6), scale=0.5),), kw))
    return calls


def _agw_draw(rng):
    """Lists of gradients (a weight and a bias) and a single array; the clamp at max_weight reached once."""
    shapes = [(3, 4), (4,)]
    rec = [_normal(rng, *s) for s in shapes]
    gan = [_normal(rng, *s, scale=0.1) for s in shapes]
    return [((rec, gan), {}), ((rec[0], gan[0]), {"max_weight": 2.0, "eps": 1e-3}),
            ((rec, [0.0 * g for g in gan]), {"max_weight": 50.0})]  # fmt: skip


def _lpips_draw(rng):
    b = _size(rng, 1, 3)
    layers = [(_size(rng, 1, 4), _size(rng, 1, 3), _size(rng, 1, 3)) for _ in range(2)]
    # entries |x| >= 0.5, so channel norms >= 0.5: the normalisation's Jacobian is ~1/||x||_c, whose float32
    # rounding (relative to the gradient) grows without bound as a norm -> 0 (a C = 1 layer's gradient is ~0)
    fx, fy = ([np.sign(u) * (0.5 + np.abs(u)) for u in (_normal(rng, b, c, h, w) for c, h, w in layers)]
              for _ in range(2))  # fmt: skip
    ws = [rng.uniform(0.0, 1.0, size=c) for c, _, _ in layers]
    ws[1] = ws[1].reshape(1, -1, 1, 1)  # the official heads' (1, C, 1, 1)
    return [((fx, fy, ws), {})]


def _lpips_grad_scale(args, expected, up):
    """The feature gradient is a/(n + eps) - x (x.a)/(n (n + eps)^2), a = 2 g w (x^ - y^)/(HW), |x^ - y^| <= 2:
    two terms that cancel, each up to |a|/n <= 4 |g| max(w)/(HW n) <= 8 |g| max(w)/(HW) (n >= 0.5 here)."""
    fx, _, ws = args
    hw = min(x.shape[2] * x.shape[3] for x in fx)
    return max(
        1.0,
        float(np.abs(expected).max()),
        16.0 * float(np.abs(up[0]).max()) * max(float(w.max()) for w in ws) / hw,
    )


def _lpips_backward(args, kwargs, up):
    fx, fy, ws = args
    gx, gy, gw = _quant.lpips_head_backward(fx, fy, ws, up[0])
    return [*gx, *gy, *gw]


_FSQ_LEVELS = ((8, 5, 5, 5), (2, 3, 4, 1000), (7,))


def _fsq_draws(rng):
    """Random indices of each grid (its first and last index included)."""
    calls = []
    for lv in _FSQ_LEVELS:
        idx = rng.integers(0, int(np.prod(lv)), size=(_size(rng, 1, 4), 3))
        idx.flat[0], idx.flat[-1] = 0, int(np.prod(lv)) - 1
        calls.append((idx.astype(np.int64), lv))
    return calls


def _fsq_index_draw(rng):
    """fsq_indices of the codes of random indices (codes on the grid, as fsq_quantize outputs)."""
    return [((_quant.fsq_codes(idx, lv),), {"levels": lv}) for idx, lv in _fsq_draws(rng)]


def _fsq_code_draw(rng):
    return [((idx,), {"levels": lv}) for idx, lv in _fsq_draws(rng)]


CASES = (
    _qcase("vector_quantize", _vq_draw,
           (Out("z_q", grad=True), Out("indices", "equal"), Out("commitment", grad=True),
            Out("codebook_loss", grad=True)),
           differentiable=(0, 1), native=_vq_native, native_cuda=True,
           backward=lambda a, kw, up: list(_quant.vector_quantize_backward(a[0], a[1], up[0], up[2], up[3], **kw))),
    _qcase("vq_ema_update", _vq_ema_draw, (Out("cluster_size"), Out("embed_sum"), Out("codebook")),
           native=native_value("vq_ema_update"), native_cuda=True),
    _qcase("lfq_entropy_loss", _lfq_draw, (Out("loss", grad=True),), differentiable=(0,),
           native=native_loss("lfq_entropy_loss"), native_cuda=True,
           backward=lambda a, kw, up: list(_quant.lfq_entropy_loss_backward(a[0], up[0], **kw))),
    # single process (group=None): the all-reduce of the two squared norms is the 2-process test's
    _qcase("adaptive_gan_weight", _agw_draw, (Out("weight"),)),
    _qcase("lpips_head", _lpips_draw, (Out("distance", grad=True),), differentiable=(0, 1, 2),
           backward=_lpips_backward, grad_scale=_lpips_grad_scale),
    _qcase("fsq_indices", _fsq_index_draw, (Out("indices", "equal"),)),
    _qcase("fsq_codes", _fsq_code_draw, (Out("codes"),), dtype_kw="dtype"),
)  # fmt: skip
