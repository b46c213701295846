r"""NaN in, NaN out, and +-inf where the math is finite (SPEC, Conventions).

Registry-driven: for EVERY op in ``genloss.registry.RECORDS`` (every variant, every
reduction), every floating argument in turn gets one NaN entry (its first, then its
last), and

* the value is NaN in every layer (reference, native, torch op): the scalar, or for
  a per-sample / elementwise / per-row output the entries that depend on the NaN entry
  (the sample it belongs to; every entry when the argument is shared by all samples,
  e.g. a mixture's parameters; the broadcast image for an elementwise op);
* the gradient of the NaN entry w.r.t. its argument, where the op has one, is NaN in
  every layer (a ``max(0, NaN)``- or ``sign(NaN) = 0``-style mask would make it finite).

An argument whose domain refuses NaN (Bernoulli targets, the decoder's data, sample
weights: ``registry.DOMAINS[...].invalid``) must instead raise a ``ValueError`` naming it.
The few places where a finite result is RIGHT are in ``ALLOWED``, each with its reason.

The second half checks +-inf inputs where the math stays finite (issue 15).
"""

from __future__ import annotations

import numpy as np
import pytest

from genloss import registry as R

torch = pytest.importorskip("torch")
pytest.importorskip("genloss._C")
import genloss.native as gn  # noqa: E402
import genloss.torch as gt  # noqa: E402
from genloss.reference import diffusion as RD  # noqa: E402
from genloss.reference import vae as RV  # noqa: E402

SIZES = R.ODD_SIZES[2]  # B = 3 (two-population 3 / 2 / 5), K = 4, trailing (3, 2, 5)

# (op, argument) -> (what may stay finite, why). 'grad': the gradient of the NaN entry may be
# finite (the value is still NaN); 'value': the value may be finite too (the entry does not enter).
LINEAR = "the op is linear in this argument: its derivative is a constant that does not read the input (torch's autograd returns the same constant)"  # noqa: E501
ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    ("wgan_critic_loss", "real_scores"): ("grad", LINEAR),
    ("wgan_critic_loss", "fake_scores"): ("grad", LINEAR),
    ("wgan_g_loss", "fake_scores"): ("grad", LINEAR),
    ("hinge_g_loss", "fake_scores"): ("grad", LINEAR),
    **{(op, a): ("grad", LINEAR) for op in ("q_sample", "v_target") for a in ("x0", "noise")},
    **{
        (op, a): ("grad", LINEAR)
        for op in ("predict_x0_from_eps", "posterior_mean_from_eps")
        for a in ("x_t", "eps")
    },
    ("q_posterior", "x0"): ("grad", LINEAR),
    ("q_posterior", "x_t"): ("grad", LINEAR),
    ("to_bits_per_dim", "nats"): ("grad", LINEAR),
    ("flow_interpolant", "x0"): ("grad", LINEAR),
    ("flow_interpolant", "noise"): ("grad", LINEAR),
    ("prediction_convert", "pred"): ("grad", LINEAR),
    ("prediction_convert", "x_t"): ("grad", LINEAR),
}
# f-GAN: the divergences whose activation (real side) or conjugate (generated side) is linear in v.
_FGAN_LINEAR = {"real_v": ("kl", "pearson"), "fake_v": ("reverse_kl",)}


def _waived(record, variant, arg: str, shape: tuple, pos: int) -> str | None:
    """'grad' / 'value' if the check is waived for this (op, variant, argument, entry), else None."""
    row = np.unravel_index(pos, shape)[0] if shape else 0
    if record.name == "ssgan_critic_loss" and arg == "labeled_logits" and pos % shape[1] == shape[1] - 1:
        return "value"  # L_sup is conditioned on real: the fake logit of a labeled sample does not enter
    if record.name == "mmd2" and variant.kwargs.get("estimator") == "linear" and row >= 2 * (shape[0] // 2):
        return "value"  # the linear estimator pairs (2i, 2i+1): with an odd count the last point is unused
    if record.name in ("fgan_d_loss", "fgan_g_loss"):
        div = variant.kwargs["divergence"]
        mode = variant.kwargs.get("mode", "minimax")
        if record.name == "fgan_g_loss":  # NS: -g_f(v) (the activation); minimax: -f*(g_f(v))
            side = "real_v" if mode == "nonsaturating" else "fake_v"
        else:
            side = arg
        return "grad" if div in _FGAN_LINEAR[side] else None
    if record.name == "diffusion_mse_loss":
        # the target is noise ('eps'), x0 ('x0') or both ('v'): an input that is not in it does not enter
        pred = variant.kwargs["prediction"]
        if (pred, arg) in (("eps", "x0"), ("x0", "noise")):
            return "value"
    hit = ALLOWED.get((record.name, arg))
    return None if hit is None else hit[0]


def _cases():
    for record, variant, reduction in R.cases():
        for a in record.float_args:
            for where in ("first", "last"):
                yield pytest.param(record, variant, reduction, a.name, where,
                                   id=f"{record.name}-{variant.id}-{reduction}-{a.name}-{where}")  # fmt: skip


def _inputs(record, variant, arg: str, where: str):
    inputs = list(R.make_inputs(record, np.random.default_rng(15), np.float64, SIZES, variant))
    i = record.arg_names.index(arg)
    x = inputs[i].copy()
    if x.size == 0:
        pytest.skip("empty argument")
    pos = 0 if where == "first" else x.size - 1
    x.flat[pos] = np.nan
    inputs[i] = x
    return inputs, i, pos


def _affected(record, arg_index: int, pos: int, arg_shape: tuple, value_shape: tuple) -> np.ndarray:
    """Boolean mask of the value's entries that depend on entry ``pos`` of the argument."""
    if value_shape == ():
        return np.ones((), dtype=bool)
    hit = np.zeros(arg_shape, dtype=bool)
    hit.flat[pos] = True
    if record.elementwise:  # the value has the inputs' broadcast shape
        return np.broadcast_to(hit, value_shape)
    arg = record.args[arg_index]
    mask = np.zeros(value_shape, dtype=bool)
    if (
        arg.shape
        and arg.shape[0] == record.batch_arg.shape[0]
        and len(arg_shape)
        and arg_shape[0] == value_shape[0]
    ):
        mask[np.unravel_index(pos, arg_shape)[0]] = True  # that sample's entries
    else:
        mask[...] = True  # a parameter shared by every sample
    return mask


def _layers(record, variant, reduction, inputs, diff_index):
    """(layer, value, gradient w.r.t. the NaN argument or None) for reference, native, torch."""
    kwargs = R.call_kwargs(record, variant, reduction)
    out = []
    value = record.reference(*inputs, **kwargs)
    value = np.asarray(value if record.value_index is None else value[record.value_index])
    grad = None
    if diff_index is not None:
        ones = np.ones(value.shape) if value.ndim else 1.0
        grad = record.reference_backward(*inputs, ones, **kwargs)[diff_index]
    out.append(("reference", value, grad))
    if record.native is not None:
        v, gs = record.native(*inputs, **kwargs)
        out.append(("native", np.asarray(v), None if diff_index is None else np.asarray(gs[diff_index])))
    ts = []
    diff_names = set(record.differentiable)
    for a, x in zip(record.args, inputs, strict=True):
        t = torch.tensor(x)
        if a.name in diff_names:
            t.requires_grad_(True)
        ts.append(t)
    v = record.torch(*ts, **kwargs)
    if isinstance(v, tuple):
        v = v[record.value_index or 0]
    g = None
    if diff_index is not None:
        v.sum().backward()
        g = ts[record.arg_names.index(record.differentiable[diff_index])].grad.numpy()
    out.append(("torch", v.detach().numpy(), g))
    return out


@pytest.mark.parametrize(("record", "variant", "reduction", "arg", "where"), list(_cases()))
def test_nan_in_nan_out(record, variant, reduction, arg, where):
    inputs, i, pos = _inputs(record, variant, arg, where)
    kwargs = R.call_kwargs(record, variant, reduction)
    try:
        record.reference(*inputs, **kwargs)
    except ValueError as e:
        # Refused as bad input (NaN outside the argument's domain: Bernoulli targets, the decoder's
        # data, a per-sample rate that must be finite, a median bandwidth of NaN data): a clear
        # error naming the argument, in every layer, is the other correct answer.
        assert arg in str(e), str(e)
        for fn in (record.native, record.torch):  # refused too (the wording is the bad-input tests' concern)
            if fn is not None:
                args = inputs if fn is record.native else [torch.tensor(x) for x in inputs]
                with pytest.raises(ValueError):
                    fn(*args, **kwargs)
        return
    waived = _waived(record, variant, arg, inputs[i].shape, pos)
    diff_index = record.differentiable.index(arg) if arg in record.differentiable else None
    for layer, value, grad in _layers(record, variant, reduction, inputs, diff_index):
        label = f"{record.name}({variant.id}, {reduction}) [{layer}] NaN in {arg}[{pos}]"
        mask = _affected(record, i, pos, inputs[i].shape, value.shape)
        if waived != "value":
            assert np.all(np.isnan(value[mask])), f"{label}: value {value[mask]} is not NaN"
        if grad is not None and waived is None:
            assert np.isnan(grad.flat[pos]), f"{label}: gradient {grad.flat[pos]} is not NaN"


# ============================================================================= +-inf, finite math


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diffusion_mse_eps_ignores_x0(dtype):
    """(DIF.12) prediction='eps': x0 does not enter the loss, so inf (or NaN) in x0 changes nothing."""
    rng = np.random.default_rng(4)
    sched = R.COSINE_SCHEDULE
    pred, x0, noise = (rng.normal(size=(3, 4, 5)).astype(dtype) for _ in range(3))
    t = np.array([0, 7, 24])
    want = RD.diffusion_mse_loss(pred, x0, noise, t, sched, prediction="eps", reduction="none")
    want_g = RD.diffusion_mse_loss_backward(pred, x0, noise, t, np.ones(3), sched, prediction="eps",
                                            reduction="none")[0]  # fmt: skip
    for bad in (np.inf, -np.inf, np.nan):
        x0b = x0.copy()
        x0b[1, 2, 3] = bad
        np.testing.assert_array_equal(
            RD.diffusion_mse_loss(pred, x0b, noise, t, sched, prediction="eps", reduction="none"), want
        )
        v, (g, *_) = gn.diffusion_mse_loss(pred, x0b, noise, t, sched, prediction="eps", reduction="none")
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(v, want, **tol)
        np.testing.assert_allclose(g, want_g, **tol)
        tv = gt.diffusion_mse_loss(*(torch.tensor(a) for a in (pred, x0b, noise, t)), sched, prediction="eps",
                                   reduction="none")  # fmt: skip
        np.testing.assert_allclose(tv.detach().numpy(), want, **tol)
    # prediction='x0' likewise ignores the noise
    noise_b = noise.copy()
    noise_b[0, 0, 0] = np.inf
    v, _ = gn.diffusion_mse_loss(pred, x0, noise_b, t, sched, prediction="x0", reduction="none")
    assert np.all(np.isfinite(v))


def _gmm_problem(rng, n=6, k=3, d=2):
    return rng.normal(size=(n, d)), rng.normal(size=k), rng.normal(size=(k, d)), rng.normal(size=(k, d)) * 0.3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gmm_infinite_inputs_where_finite(dtype):
    """(VAE.11) A +inf mixing logit is a weight-1 component, a -inf one a weight-0 component; a
    component with an infinite mean has density 0 at every finite point.
    Responsibilities and log-likelihood stay finite and equal the limit computed without it."""
    rng = np.random.default_rng(7)
    x, logits, means, logvars = _gmm_problem(rng)
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)

    def check(args, want_resp, want_ll, grads_finite=True):
        args = [a.astype(dtype) for a in args]
        for name, resp in (("reference", RV.gmm_responsibilities(*args)),
                           ("native", gn.gmm_responsibilities(*args)),
                           ("torch", gt.gmm_responsibilities(*(torch.tensor(a) for a in args)).numpy())):  # fmt: skip
            assert np.all(np.isfinite(resp)), name
            np.testing.assert_allclose(resp, want_resp, **tol, err_msg=name)
        ll, grads = gn.gmm_log_likelihood(*args, reduction="none")
        np.testing.assert_allclose(ll, want_ll, **tol)
        np.testing.assert_allclose(RV.gmm_log_likelihood(*args, reduction="none"), want_ll, **tol)
        for g in grads if grads_finite else ():
            assert np.all(np.isfinite(g))

    # +inf logit on component 1: p(k = 1) = 1, so r[:, 1] = 1 and ll = log N(x; mean_1)
    lg = logits.copy()
    lg[1] = np.inf
    single = RV.gmm_log_likelihood(x, np.zeros(1), means[1:2], logvars[1:2], reduction="none")
    check((x, lg, means, logvars), np.eye(3)[np.full(6, 1)], single)
    # -inf logit on component 0: the mixture of components 1 and 2 alone
    lg = logits.copy()
    lg[0] = -np.inf
    want_r = np.concatenate(
        [np.zeros((6, 1)), RV.gmm_responsibilities(x, logits[1:], means[1:], logvars[1:])], 1
    )
    check(
        (x, lg, means, logvars), want_r, RV.gmm_log_likelihood(x, logits[1:], means[1:], logvars[1:], "none")
    )
    # an infinite mean on component 2: density 0 there (the first two components' posterior, renormalised)
    mu = means.copy()
    mu[2, 0] = np.inf
    lp2 = logits[:2] - np.logaddexp.reduce(logits)  # log pi_k of the 3-component mixture
    # (the two-component call renormalises its weights: add back log(pi_0 + pi_1))
    sub_ll = RV.gmm_log_likelihood(x, lp2, means[:2], logvars[:2], "none") + np.logaddexp.reduce(lp2)
    want_r = np.concatenate([RV.gmm_responsibilities(x, lp2, means[:2], logvars[:2]), np.zeros((6, 1))], 1)
    # (its mean's own gradient is 0 * inf there: only the values are claimed)
    check((x, logits, mu, logvars), want_r, sub_ll, grads_finite=False)
