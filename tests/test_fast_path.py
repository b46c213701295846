"""The one-call path for small population losses on plain CPU torch tensors (cpp/src/fast_path.cpp).

The C++ path must be indistinguishable from the Python path it short-cuts
(python/genloss/native/_compose.py), except in speed:

* every native record, torch inputs, float32/float64, every reduction, need_grad True, False and
  one flag per input: bitwise the same value and gradients as with the fast path switched off,
  and equal to the float64 NumPy reference;
* it is really taken for the population losses (else the above proves nothing);
* it declines (returns None, so the Python path runs and raises or handles the case) for
  everything unusual: NumPy arrays, subclasses, float16, non-contiguous or negated views, 0-d
  or empty inputs, inputs the output cache should serve, mixed dtypes, bad reductions,
  'none' where two populations are summed, malformed need_grad, unknown functors;
* the errors users see are the Python path's, naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

from genloss import registry as R
from test_native import check_against_reference

torch = pytest.importorskip("torch")
_C = pytest.importorskip("genloss._C")
from genloss.native import _compose  # noqa: E402

# The population losses of the GAN family: each runs through fast_populations.
FAST_OPS = (
    "gan_d_loss",
    "gan_g_loss",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "wgan_critic_loss",
    "wgan_g_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "r1_penalty_from_grads",
    "fgan_d_loss",
    "fgan_g_loss",
)
NATIVE_RECORDS = tuple(r for r in R.RECORDS if r.has_native)
CASES = list(R.cases(NATIVE_RECORDS))
TERM = ("Softplus", 1.0, (0.0, 0.0, 0.0), 0)


class Spy:
    """genloss._C as _compose sees it, with fast_populations counted or switched off."""

    def __init__(self, off: bool) -> None:
        self.off = off
        self.served = 0

    def __getattr__(self, name: str):
        return getattr(_C, name)

    def fast_populations(self, *args):
        if self.off:
            return None
        out = _C.fast_populations(*args)
        self.served += out is not None
        return out


@pytest.fixture
def spy(monkeypatch):
    def install(off: bool) -> Spy:
        s = Spy(off)
        monkeypatch.setattr(_compose, "_C", s)
        return s

    return install


def _run(record, tensors, kwargs, need):
    value, grads = record.native(*tensors, **kwargs, need_grad=need)
    return [value.clone(), *[None if g is None else g.clone() for g in grads]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    ("record", "variant", "reduction"), CASES, ids=[f"{r.name}-{v.id}-{red}" for r, v, red in CASES]
)
def test_fast_path_equals_python_path(spy, record, variant, reduction, dtype):
    inputs = R.make_inputs(record, np.random.default_rng(11), dtype, R.ODD_SIZES[0], variant)
    tensors = tuple(torch.from_numpy(x) for x in inputs)
    kwargs = R.call_kwargs(record, variant, reduction)
    n = len(record.differentiable)
    needs = [True, False] + [tuple(i == j for j in range(n)) for i in range(n)] if n else [True]
    for need in needs:
        fast_spy = spy(off=False)
        fast = _run(record, tensors, kwargs, need)
        spy(off=True)
        slow = _run(record, tensors, kwargs, need)
        label = f"{record.name}({variant.id}, {reduction}) need_grad={need}"
        if record.name in FAST_OPS:
            assert fast_spy.served > 0, f"{label}: the fast path was not taken"
        assert len(fast) == len(slow), label
        for k, (a, b) in enumerate(zip(fast, slow, strict=True)):
            assert (a is None) == (b is None), f"{label} output {k}"
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, f"{label} output {k}"
                assert torch.equal(a, b), f"{label} output {k}: fast path differs from the Python path"
        if need is True:
            check_against_reference(record, variant, reduction, inputs, dtype, values=(fast[0], fast[1:]))


def _plain(n=8, dtype=torch.float32):
    return torch.linspace(-2, 2, n, dtype=dtype)


@pytest.mark.parametrize(
    ("label", "arrays", "terms", "reduction", "need", "allow_none"),
    [
        ("numpy array", (np.zeros(4, np.float32),), (TERM,), "mean", True, True),
        ("tensor subclass", (torch.nn.Parameter(_plain()),), (TERM,), "mean", True, True),
        ("float16", (_plain().half(),), (TERM,), "mean", True, True),
        ("int64", (torch.arange(4),), (TERM,), "mean", True, True),
        ("non-contiguous", (torch.zeros(4, 6)[:, ::2],), (TERM,), "mean", True, True),
        ("negated view", (torch._neg_view(_plain()),), (TERM,), "mean", True, True),
        ("0-d", (torch.tensor(1.0),), (TERM,), "mean", True, True),
        ("empty batch", (torch.zeros(0, 3),), (TERM,), "sum", True, True),
        ("output-cache size", (torch.zeros(1 << 20),), (TERM,), "mean", True, True),
        ("mixed dtypes", (_plain(), _plain(dtype=torch.float64)), (TERM, TERM), "mean", True, False),
        ("bad reduction", (_plain(),), (TERM,), "avg", True, True),
        ("reduction not a str", (_plain(),), (TERM,), 0, True, True),
        ("'none' of two populations", (_plain(), _plain()), (TERM, TERM), "none", True, False),
        ("need_grad an int", (_plain(),), (TERM,), "mean", 1, True),
        ("need_grad too short", (_plain(), _plain()), (TERM, TERM), "mean", (True,), False),
        ("need_grad of ints", (_plain(),), (TERM,), "mean", (1,), True),
        ("unknown functor", (_plain(),), (("NoSuchFunctor", 1.0, (0.0, 0.0, 0.0), 0),), "mean", True, True),
        ("term count", (_plain(), _plain()), (TERM,), "mean", True, False),
        ("bool mode", (_plain(),), (("Softplus", 1.0, (0.0, 0.0, 0.0), True),), "mean", True, True),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_fast_path_declines_the_unusual(label, arrays, terms, reduction, need, allow_none):
    assert _C.fast_populations(arrays, terms, reduction, need, allow_none) is None, label


def test_fast_path_serves_plain_tensors():
    """The counterpart of the above: the cases the benchmarks and training loops hit."""
    r, f = _plain(256), _plain(100, torch.float32)
    two = _C.fast_populations((r, f), (TERM, TERM), "mean", (True, False), False)
    assert two is not None
    value, (gr, gf) = two
    assert value.shape == () and gr.shape == r.shape and gf is None
    want = torch.nn.functional.softplus(r).mean() + torch.nn.functional.softplus(f).mean()
    torch.testing.assert_close(value, want)
    torch.testing.assert_close(gr, torch.sigmoid(r) / 256)
    rows = _C.fast_populations((r.reshape(16, 16),), (TERM,), "none", False, True)
    assert rows is not None and rows[1] == ()
    torch.testing.assert_close(rows[0], torch.nn.functional.softplus(r.reshape(16, 16)).sum(1))


def test_errors_come_from_the_python_path():
    import genloss.native as gn

    r = _plain()
    with pytest.raises(ValueError, match="reduction"):
        gn.gan_d_loss(r, r, reduction="none")  # two populations: no per-sample pairing
    with pytest.raises(ValueError, match="fake_logits"):
        gn.gan_d_loss(r, torch.zeros(0))
    with pytest.raises(TypeError, match="real_logits"):
        gn.gan_d_loss(r.half(), r)
    with pytest.raises(ValueError, match="need_grad"):
        gn.gan_d_loss(r, r, need_grad=(True,))


def test_negated_views_are_read_as_their_values():
    """torch._neg_view shares memory holding -x: both paths must see x, not the memory."""
    import genloss.native as gn
    import genloss.torch as gt

    x = _plain(7, torch.float64)
    view = torch._neg_view(-x)  # the values of x, the memory of -x
    assert view.is_neg()
    torch.testing.assert_close(gn.wgan_g_loss(view)[0], -x.mean())
    torch.testing.assert_close(gt.wgan_g_loss(view), -x.mean())
    torch.testing.assert_close(gn.gan_g_loss(view)[0], torch.nn.functional.softplus(-x).mean())


# ----------------------------------------------------------------------------- the torch layer's eager path


def test_eager_call_names_bad_positional_arguments():
    """Positional calls skip bind(): the routing must still name what is wrong."""
    import genloss.torch as gt

    t = _plain()
    with pytest.raises(TypeError, match="real_logits must be a torch.Tensor"):
        gt.gan_d_loss(np.zeros(8, np.float32), t)
    with pytest.raises(TypeError, match="fake_logits must be a torch.Tensor"):
        gt.gan_d_loss(t, None)
    with pytest.raises(TypeError, match="missing required argument 'fake_logits'"):
        gt.gan_d_loss(t)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        gt.gan_d_loss(t, t, "mean", "extra")


def test_eager_rerun_refuses_inputs_modified_in_place():
    """A retained graph's second backward re-runs the kernel on the saved inputs: an input
    modified in place since the forward must raise, as autograd does, not give a gradient at
    another point."""
    import genloss.torch as gt

    x = _plain(16, torch.float64).requires_grad_(True)
    y = x * 1.0  # a non-leaf input, as a discriminator's logits
    loss = gt.gan_g_loss(y)
    loss.backward(retain_graph=True)
    want = -torch.sigmoid(-x.detach()) / 16
    torch.testing.assert_close(x.grad, want)
    loss.backward(retain_graph=True)  # unchanged inputs: the re-run gives the same gradient
    torch.testing.assert_close(x.grad, 2 * want)
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_eager_backward_scales_by_the_upstream_gradient():
    """Only an upstream gradient of exactly 1 skips the multiply."""
    import genloss.torch as gt

    x = _plain(16, torch.float64).requires_grad_(True)
    (g,) = torch.autograd.grad(gt.gan_g_loss(x), x, grad_outputs=torch.tensor(-2.5, dtype=torch.float64))
    torch.testing.assert_close(g, 2.5 * torch.sigmoid(-x.detach()) / 16)
    (g,) = torch.autograd.grad(3.0 * gt.gan_g_loss(x, reduction="sum"), x)
    torch.testing.assert_close(g, -3.0 * torch.sigmoid(-x.detach()))
    rows = gt.gan_g_loss(x.reshape(4, 4), reduction="none")
    w = torch.arange(4, dtype=torch.float64)
    (g,) = torch.autograd.grad(rows, x, grad_outputs=w)
    torch.testing.assert_close(g, (-torch.sigmoid(-x.detach()).reshape(4, 4) * w[:, None]).reshape(16))
