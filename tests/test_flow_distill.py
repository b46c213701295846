r"""The distillation losses of the flow family (derivations/flow.md, FLOW.30-FLOW.35): ``scm_loss``,
``meanflow_loss``, ``vsd_loss``, ``sds_loss``.

The registry-driven tests cover every layer (reference FD for sCM, native = reference, torch op,
opcheck, gradcheck, NaN); here, what they cannot show:

* each op against its paper's formula (or official code) written out independently with torch
  autograd and ``.detach()`` in float64: value and gradient, every layer;
* the surrogates' backward (meanflow, vsd, sds) = central differences of the loss with its
  stop-gradient factors frozen (their value's own derivative is a different number, FLOW.30);
* sCM's normalized tangent in float32 with no float64 round trip: per-sample norms from 1e-6 to
  1e6 (and rows that overflow / underflow float32 squares) against the float64 reference;
* finite values at the degenerate points (g = 0, delta = 0, x = x0_real), stop-gradient inputs
  that require grad refused by name, bad hyperparameters named, torch.compile = eager.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from genloss.reference import flow as R

torch = pytest.importorskip("torch")
gn = pytest.importorskip("genloss.native")
gt = pytest.importorskip("genloss.torch")

SHAPE = (4, 3, 2, 5)


def _rng(seed):
    return np.random.default_rng(seed)


def _t64(*arrays, grad=()):
    out = [torch.tensor(a, dtype=torch.float64) for a in arrays]
    for i in grad:
        out[i].requires_grad_(True)
    return out


def _fd(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp.flat[i] += h
        xm.flat[i] -= h
        g.flat[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def _layers(name, arrays, kwargs, diff=(0,)):
    """(value, grads w.r.t. the ``diff`` arrays) of the native function and the torch op, float64,
    reduction 'mean' (the upstream gradient 1)."""
    out = []
    if hasattr(gn, name):
        v, gs = getattr(gn, name)(*arrays, **kwargs)
        out.append(("native", np.asarray(v), [np.asarray(g) for g in gs]))
    ts = _t64(*arrays, grad=diff)
    tk = {
        k: (torch.tensor(v, requires_grad=True) if isinstance(v, np.ndarray) else v)
        for k, v in kwargs.items()
    }
    value = getattr(gt, name)(*ts, **tk)
    extra = [v for v in tk.values() if isinstance(v, torch.Tensor)]
    grads = torch.autograd.grad(value, [ts[i] for i in diff] + extra)
    out.append(("torch", value.detach().numpy(), [g.numpy() for g in grads]))
    return out


def _check(name, arrays, kwargs, want_value, want_grads, diff=(0,), tol=1e-12):
    ref_kw = {k: v for k, v in kwargs.items()}
    np.testing.assert_allclose(getattr(R, name)(*arrays, **ref_kw), want_value, rtol=tol, atol=tol)
    ref_grads = getattr(R, name + "_backward")(*arrays, 1.0, **ref_kw)
    for g, w in zip(ref_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    for layer, v, gs in _layers(name, arrays, kwargs, diff):
        np.testing.assert_allclose(v, want_value, rtol=tol, atol=tol, err_msg=layer)
        for g, w in zip(gs, want_grads, strict=True):
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=layer)


# ============================================================================= the papers' formulas


def _scm_paper(F, Fm, dF, xt, dxt, t, sd, r, c, w):
    """Lu & Song 2024, Algorithm 1, as written: g, g / (||g|| + c), e^w / D ||F - F^- - g||^2 - w."""
    F, w = _t64(F, w, grad=(0, 1))
    Fm, dF, xt, dxt, t = _t64(Fm, dF, xt, dxt, t)
    tb = t.reshape(-1, 1, 1, 1)
    g = -(torch.cos(tb) ** 2) * (sd * Fm - dxt) - r * torch.cos(tb) * torch.sin(tb) * (xt + sd * dF)
    g = g / (torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True) + c)
    D = F[0].numel()
    loss = (torch.exp(w) / D * ((F - Fm - g) ** 2).sum(dim=(1, 2, 3)) - w).mean()
    gF, gw = torch.autograd.grad(loss, (F, w))
    return loss.item(), gF.numpy(), -gw.numpy()  # our logvar u = -w


@pytest.mark.parametrize(("sd", "r", "c"), [(0.5, 1.0, 0.1), (1.0, 0.25, 1e-3)])
def test_scm_matches_paper_algorithm(sd, r, c):
    """(FLOW.31, FLOW.32) value and d/dF, d/dlogvar = the paper's Algorithm 1 under autograd."""
    rng = _rng(31)
    F, Fm, dF, xt, dxt = (rng.normal(size=SHAPE) for _ in range(5))
    t = rng.uniform(0.0, math.pi / 2, SHAPE[0])
    t[0], t[-1] = 0.0, math.pi / 2
    w = rng.normal(size=SHAPE[0])
    value, gF, gu = _scm_paper(F, Fm, dF, xt, dxt, t, sd, r, c, w)
    kw = dict(sigma_data=sd, r=r, c=c, logvar=-w)
    _check("scm_loss", (F, Fm, dF, xt, dxt, t), kw, value, (gF, gu), tol=1e-11)
    # without logvar: the plain mean square (w = 0 in the paper's form)
    value0, gF0, _ = _scm_paper(F, Fm, dF, xt, dxt, t, sd, r, c, np.zeros(SHAPE[0]))
    _check("scm_loss", (F, Fm, dF, xt, dxt, t), dict(sigma_data=sd, r=r, c=c), value0, (gF0,), tol=1e-11)


@pytest.mark.parametrize(("p", "eps"), [(1.0, 1e-3), (0.5, 1e-2), (0.0, 1e-3)])
def test_meanflow_matches_official_code(p, eps):
    """(FLOW.33) the official py-meanflow loss: u_tgt = (v - (t - r) du_dt).detach(), squared L2
    SUMMED over (C, H, W), divided by (loss.detach() + eps)^p, mean over the batch."""
    rng = _rng(33)
    u, v, du = (rng.normal(size=SHAPE) for _ in range(3))
    t, r = rng.uniform(size=SHAPE[0]), rng.uniform(size=SHAPE[0])
    r[1] = t[1]  # r = t: the instantaneous-velocity (flow matching) rows
    ut, vt, dut, tt, rt = _t64(u, v, du, t, r, grad=(0,))
    tb, rb = tt.reshape(-1, 1, 1, 1), rt.reshape(-1, 1, 1, 1)
    u_tgt = (vt - (tb - rb) * dut).detach()
    loss = ((ut - u_tgt) ** 2).sum(dim=(1, 2, 3))
    loss = (loss / (loss.detach() + eps) ** p).mean()
    (g,) = torch.autograd.grad(loss, ut)
    _check("meanflow_loss", (u, v, du, t, r), dict(p=p, eps=eps), loss.item(), (g.numpy(),))


def test_vsd_matches_dmd2_code():
    """(FLOW.34) DMD2's compute_distribution_matching_loss: p_real = x - x0_real, p_fake = x - x0_fake,
    grad = (p_real - p_fake) / (mean|p_real| + 1e-6), 0.5 * mse_loss(x, (x - grad).detach()) over
    batch and dims: equal, value and gradient, to reduction='mean' of the per-sample means."""
    rng = _rng(34)
    x, fake, real = (rng.normal(size=SHAPE) for _ in range(3))
    xt, ft, rt = _t64(x, fake, real, grad=(0,))
    with torch.no_grad():
        p_real, p_fake = xt - rt, xt - ft
        grad = (p_real - p_fake) / (torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True) + 1e-6)
    loss = 0.5 * torch.nn.functional.mse_loss(xt, (xt - grad).detach(), reduction="mean")
    (g,) = torch.autograd.grad(loss, xt)
    _check("vsd_loss", (x, fake, real), {}, loss.item(), (g.numpy(),))


def test_sds_matches_threestudio_code():
    """(FLOW.35) threestudio / stable-dreamfusion: grad = w (eps_pred - noise), target = (x - grad).detach(),
    0.5 * mse_loss(x, target, reduction='sum') / B; its gradient is exactly w (eps_pred - noise) / B."""
    rng = _rng(35)
    x, e, z = (rng.normal(size=SHAPE) for _ in range(3))
    w = rng.uniform(0.0, 2.0, SHAPE[0])
    xt, et, zt, wt = _t64(x, e, z, w, grad=(0,))
    grad = wt.reshape(-1, 1, 1, 1) * (et - zt)
    loss = 0.5 * torch.nn.functional.mse_loss(xt, (xt - grad).detach(), reduction="sum") / SHAPE[0]
    (g,) = torch.autograd.grad(loss, xt)
    np.testing.assert_allclose(g.numpy(), w.reshape(-1, 1, 1, 1) * (e - z) / SHAPE[0], rtol=1e-12, atol=1e-16)
    _check("sds_loss", (x, e, z, w), {}, loss.item(), (g.numpy(),))


# ============================================================================= surrogates: frozen FD


def _reduce(per, reduction, up):
    """The batch reduction of per-sample values times the upstream gradient ``up``."""
    if reduction == "none":
        return np.sum(up * per)
    return up * (per.mean() if reduction == "mean" else per.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_surrogate_backward_is_the_frozen_loss_derivative(reduction):
    """(FLOW.30) meanflow, vsd, sds: the backward = central differences of the loss with its
    stop-gradient factors (w, the target) frozen at the current point."""
    rng = _rng(30)
    shape = (3, 2, 4)
    a, b, c = (rng.normal(size=shape) for _ in range(3))
    t, r = rng.uniform(size=3), rng.uniform(size=3)
    w = rng.uniform(0.5, 2.0, 3)
    up = rng.normal(size=3) if reduction == "none" else 0.7
    kw = dict(rtol=1e-6, atol=1e-8)

    def sq_rows(d, agg):
        return getattr(d.reshape(3, -1) ** 2, agg)(1)

    # meanflow: w = (delta + eps)^-p and u_tgt frozen
    d0, _delta, wm, _ = R._meanflow_inputs(a, b, c, t, r, 0.7, 1e-3, reduction)
    u_tgt = a - d0
    got = R.meanflow_loss_backward(a, b, c, t, r, up, p=0.7, reduction=reduction)[0]
    np.testing.assert_allclose(
        got, _fd(lambda u: _reduce(wm * sq_rows(u - u_tgt, "sum"), reduction, up), a), **kw
    )
    # vsd: the target x - grad frozen
    grad_v, _ = R._vsd_inputs(a, b, c, reduction)
    target_v = a - grad_v
    got = R.vsd_loss_backward(a, b, c, up, reduction=reduction)[0]
    np.testing.assert_allclose(
        got, _fd(lambda x: _reduce(0.5 * sq_rows(x - target_v, "mean"), reduction, up), a), **kw
    )
    # sds: the target x - w (eps_pred - noise) frozen
    grad_s, _ = R._sds_inputs(a, b, c, w, reduction)
    target_s = a - grad_s
    got = R.sds_loss_backward(a, b, c, w, up, reduction=reduction)[0]
    np.testing.assert_allclose(
        got, _fd(lambda x: _reduce(0.5 * sq_rows(x - target_s, "sum"), reduction, up), a), **kw
    )


# ============================================================================= sCM in float32


def _scm_tangent_rows(rng, scales, shape=(6, 64)):
    """sCM inputs with F = F^- = 0 (the residual is -g_hat itself) and a tangent of norm about
    ``scales[b]`` per sample (dF, x_t, dx_t/dt carry it)."""
    B = len(scales)
    s = np.asarray(scales).reshape(-1, 1, 1) / math.sqrt(np.prod(shape))
    dF, xt, dxt = (rng.normal(size=(B, *shape)) * s for _ in range(3))
    zero = np.zeros_like(dF)
    return [zero, zero, dF, xt, dxt, rng.uniform(0.2, 1.3, B)]


@pytest.mark.parametrize(
    ("scales", "c"),
    [(10.0 ** np.arange(-6, 7), 1e-9), (10.0 ** np.arange(-6, 7), 0.1), ([1e25, 3e-25, 1.0, 1e-30], 1e-32)],
    ids=["norms-1e-6..1e6", "norms-1e-6..1e6-c=0.1", "float32-squares-overflow-underflow"],
)
def test_scm_float32_normalized_tangent(scales, c):
    """(FLOW.31) float32 sCM (native and torch op; no float64 copy of the data) = the float64
    reference on the same float32 inputs, for per-sample tangent norms spanning 1e-6..1e6 and rows
    whose float32 squares overflow (norm 1e25: unscaled, g_hat would be 0) or underflow (1e-25 with
    c = 1e-32: unscaled, g_hat would be g / c ~ 1e7).  With F = F^- = 0 the value is
    ||g_hat||^2 / n = (||g|| / (||g|| + c))^2 / n and d/dF = -2 g_hat / n, elementwise."""
    args32 = [a.astype(np.float32) for a in _scm_tangent_rows(_rng(131), scales)]
    args64 = [a.astype(np.float64) for a in args32]
    n = args32[0][0].size
    want = R.scm_loss(*args64, c=c, reduction="none")
    (want_g,) = R.scm_loss_backward(*args64, np.ones(len(scales)), c=c, reduction="none")
    norms = np.sqrt(R.scm_loss(*args64, c=0.0 + 1e-300, reduction="none") * n)  # ~1: g_hat of unit length
    big = np.asarray(scales) > 1e6 * c
    np.testing.assert_allclose(want[big], 1.0 / n, rtol=1e-6)  # a unit tangent where ||g|| >> c
    np.testing.assert_allclose(norms, 1.0, rtol=1e-12)
    v, (g,) = gn.scm_loss(*args32, c=c, reduction="none")
    assert v.dtype == np.float32 and g.dtype == np.float32
    np.testing.assert_allclose(v, want, rtol=2e-6)
    np.testing.assert_allclose(g, want_g, rtol=2e-5, atol=1e-6 * np.abs(want_g).max())
    tv = gt.scm_loss(*(torch.tensor(a) for a in args32), c=c, reduction="none")
    np.testing.assert_allclose(tv.numpy(), want, rtol=2e-6)


# ============================================================================= edge cases and errors


def test_degenerate_points_are_finite():
    """g = 0 (sCM: divided by 0 + c), delta = 0 (MeanFlow: w = eps^-p), x = x0_real (DMD2: w = 1e6):
    finite value and gradient in every layer, equal to the closed forms."""
    rng = _rng(36)
    F, Fm, dF = (rng.normal(size=SHAPE) for _ in range(3))
    dxt, xt = 0.5 * Fm, -0.5 * dF  # sigma_d F^- - dxt = 0 and x_t + sigma_d dF = 0 exactly: g = 0
    t = rng.uniform(0.1, 1.4, SHAPE[0])
    m = ((F - Fm) ** 2).reshape(SHAPE[0], -1).mean(1)
    _check("scm_loss", (F, Fm, dF, xt, dxt, t), {}, m.mean(), (2 * (F - Fm) / F[0].size / SHAPE[0],))
    u, du = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    tt = rng.uniform(size=SHAPE[0])
    r = rng.uniform(size=SHAPE[0])
    v = u + (tt - r).reshape(-1, 1, 1, 1) * du  # u = u_tgt: delta = 0
    _check("meanflow_loss", (u, v, du, tt, r), {}, 0.0, (np.zeros(SHAPE),), tol=1e-9)
    x, fake = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    w = 1.0 / R.VSD_EPS
    want = (0.5 * w * w * ((fake - x) ** 2).reshape(SHAPE[0], -1).mean(1)).mean()
    _check("vsd_loss", (x, fake, x.copy()), {}, want, (w * (fake - x) / x[0].size / SHAPE[0],), tol=1e-9)


def test_meanflow_r_equals_t_leaves_du_dt_out():
    """(FLOW.33) at r = t the JVP term is selected out: an inf there changes nothing (every layer)."""
    rng = _rng(37)
    u, v, du = (rng.normal(size=SHAPE) for _ in range(3))
    t = rng.uniform(size=SHAPE[0])
    r = t.copy()
    r[0] = 0.5 * t[0]
    bad = du.copy()
    bad[1:] = np.inf
    want = R.meanflow_loss(u, v, du * 0.0 + np.where(np.arange(SHAPE[0]) == 0, 1, 0).reshape(-1, 1, 1, 1) * du,
                           t, r, reduction="none")  # fmt: skip
    np.testing.assert_allclose(R.meanflow_loss(u, v, bad, t, r, reduction="none")[1:], want[1:], rtol=1e-14)
    nv, _ = gn.meanflow_loss(u, v, bad, t, r, reduction="none")
    np.testing.assert_allclose(nv[1:], want[1:], rtol=1e-12)
    tv = gt.meanflow_loss(*(torch.tensor(a) for a in (u, v, bad, t, r)), reduction="none")
    np.testing.assert_allclose(tv.numpy()[1:], want[1:], rtol=1e-12)


STOP_GRADIENT = [
    ("scm_loss", ("F_minus", "dF_dt", "x_t", "dxt_dt", "t")),
    ("meanflow_loss", ("v", "du_dt", "t", "r")),
    ("vsd_loss", ("x0_fake", "x0_real")),
    ("sds_loss", ("eps_pred", "noise", "weights")),
]


def _op_inputs(name, rng):
    data = [rng.normal(size=(2, 3)) for _ in range(5)]
    if name == "scm_loss":
        return data[:5] + [rng.uniform(0, 1.5, 2)]
    if name == "meanflow_loss":
        return data[:3] + [rng.uniform(size=2), rng.uniform(size=2)]
    if name == "vsd_loss":
        return data[:3]
    return data[:3] + [rng.uniform(size=2)]


@pytest.mark.parametrize(("name", "fixed"), STOP_GRADIENT, ids=[s[0] for s in STOP_GRADIENT])
def test_stop_gradient_inputs_requiring_grad_are_refused(name, fixed):
    """The targets are stop-gradient by the method's definition: requiring grad is a ValueError naming
    the argument (a forgotten .detach() would otherwise silently give no gradient there)."""
    import inspect

    params = list(inspect.signature(getattr(R, name)).parameters)
    arrays = _op_inputs(name, _rng(38))
    for arg in fixed:
        ts = [torch.tensor(a) for a in arrays]
        ts[0].requires_grad_(True)
        ts[params.index(arg)].requires_grad_(True)
        with pytest.raises(ValueError, match=rf"{name}: {arg} requires grad"):
            getattr(gt, name)(*ts)
    ts = [torch.tensor(a) for a in arrays]
    ts[0].requires_grad_(True)
    getattr(gt, name)(*ts).backward()  # the student's output alone: fine
    assert ts[0].grad is not None and torch.all(torch.isfinite(ts[0].grad))


BAD = [
    ("scm_loss", dict(c=0.0), "c"),
    ("scm_loss", dict(r=1.5), "r"),
    ("scm_loss", dict(sigma_data=-1.0), "sigma_data"),
    ("scm_loss", dict(t=np.array([0.1, 2.0])), "t"),
    ("meanflow_loss", dict(eps=0.0), "eps"),
    ("meanflow_loss", dict(p=-1.0), "p"),
    ("meanflow_loss", dict(r=np.array([0.1, 1.5])), "r"),
    ("vsd_loss", dict(x0_real=np.zeros((2, 4))), "x0_real"),
    ("sds_loss", dict(weights=np.array([1.0, -1.0])), "weights"),
    ("sds_loss", dict(noise=np.zeros((3, 3))), "noise"),
]


@pytest.mark.parametrize(("name", "change", "arg"), BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_input_names_op_and_argument(name, change, arg):
    import inspect

    params = list(inspect.signature(getattr(R, name)).parameters)
    arrays = _op_inputs(name, _rng(39))
    kwargs = {}
    for k, v in change.items():
        if k in params[: len(arrays)]:
            arrays[params.index(k)] = v
        else:
            kwargs[k] = v
    layers = [
        ("reference", getattr(R, name), arrays),
        ("torch", getattr(gt, name), [torch.tensor(a) for a in arrays]),
    ]
    if hasattr(gn, name):
        layers.append(("native", getattr(gn, name), arrays))
    for _layer, fn, args in layers:
        with pytest.raises((ValueError, TypeError), match=rf"{name}: .*\b{arg}\b"):
            fn(*args, **kwargs)


def test_torch_sds_takes_one_floating_dtype():
    """sds_loss (a torch kernel, no native checks) refuses an integer input or a second dtype as the
    native ops do: an int64 x once truncated the weights to 0 (value and gradient 0, silently), and a
    float32 x with float64 weights was promoted."""
    x, eps_pred, noise, w = (torch.tensor(a) for a in _op_inputs("sds_loss", _rng(41)))
    for args, arg in (
        ((x.float(), eps_pred, noise, w), "eps_pred"),
        ((x, eps_pred, noise, w.float()), "weights"),
    ):
        with pytest.raises(TypeError, match=rf"sds_loss: {arg} must have the dtype of x"):
            gt.sds_loss(*args)
    with pytest.raises(TypeError, match="sds_loss: x must be a floating tensor"):
        gt.sds_loss(x.long(), eps_pred, noise, w)


def test_compile_matches_eager():
    """torch.compile(fullgraph=True) of sds_loss (a custom op on a torch kernel, with a fake kernel) =
    eager, value and gradient.  (One op: the others are custom ops on native kernels, the pattern the
    registry's compile subset covers; a compile costs seconds on CI.)"""
    name = "sds_loss"
    arrays = _op_inputs(name, _rng(40))
    op = getattr(gt, name)

    def fn(*args):
        return op(*args, reduction="sum")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        ts = [torch.tensor(a, dtype=torch.float32) for a in arrays]
        ts[0].requires_grad_(True)
        value = f(*ts)
        results.append((value.detach(), torch.autograd.grad(value, ts[0])[0]))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
