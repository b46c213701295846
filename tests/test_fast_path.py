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
from genloss.native import diffusion as _diffusion  # noqa: E402

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
    "diffusion_mse_loss",  # fast_table_rows
    "vlb_term",
)
NATIVE_RECORDS = tuple(r for r in R.RECORDS if r.has_native)
CASES = list(R.cases(NATIVE_RECORDS))
TERM = ("Softplus", 1.0, (0.0, 0.0, 0.0), 0)


class Spy:
    """genloss._C as the native modules see it, with the fast_* entries counted or switched off."""

    def __init__(self, off: bool) -> None:
        self.off = off
        self.served = 0

    def __getattr__(self, name: str):
        real = getattr(_C, name)
        if not name.startswith("fast_"):
            return real

        def call(*args):
            if self.off:
                return None
            out = real(*args)
            self.served += out is not None
            return out

        return call


@pytest.fixture
def spy(monkeypatch):
    def install(off: bool) -> Spy:
        s = Spy(off)
        monkeypatch.setattr(_compose, "_C", s)
        monkeypatch.setattr(_diffusion, "_C", s)
        return s

    return install


def _expect_fast(record, tensors, need=True):
    """The fast path serves FAST_OPS on same-shape inputs (a broadcast model_log_variance
    is materialised by the Python path), except a requested gradient w.r.t. per-sample
    ``weights`` (the Python path writes the unweighted per-sample terms it needs)."""
    if record.name not in FAST_OPS:
        return False
    if "weights" in record.differentiable:
        k = record.differentiable.index("weights")
        if need is True or (not isinstance(need, bool) and need[k]):
            return False
    if record.name == "vlb_term":
        shapes = {tuple(t.shape) for t in tensors if t.is_floating_point()}
        return len(shapes) == 1
    return True


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
        if _expect_fast(record, tensors, need):
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


def test_large_outputs_come_from_the_output_cache():
    """Outputs of 4 MiB or more: the same block cache as the Python path (_engine.empty)."""
    import genloss.native as gn

    if not gn.options()["huge_pages"]:
        pytest.skip("the output cache is off in this environment")

    x = torch.linspace(-3, 3, 1 << 20)  # 4 MiB of float32: its gradient comes from the cache
    before = gn.cache_info()
    out = _C.fast_populations((x,), (TERM,), "mean", True, True)
    assert out is not None
    value, (g,) = out
    after = gn.cache_info()
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"] + 1
    assert g.data_ptr() % (2 << 20) == 0  # a 2 MiB-aligned block
    torch.testing.assert_close(g, torch.sigmoid(x) / x.numel())
    torch.testing.assert_close(value, torch.nn.functional.softplus(x).mean())


def _mse_call(n=6, **over):
    """Arguments of fast_table_rows for diffusion_mse_with_table on a 4-step table."""
    g = torch.Generator().manual_seed(5)
    call = dict(
        arrays=tuple(torch.randn(n, 3, generator=g) for _ in range(3)),
        functor="DiffusionMSE",
        grad_of=(0,),
        params=(0.0, 0.0, 0.0),
        table=torch.rand(4, 2, dtype=torch.float64, generator=g),
        stride=2,
        t=torch.randint(0, 4, (n,), generator=g),
        weights=torch.rand(n, generator=g),
        reduction="mean",
        need_grad=True,
        per_sample_mean=True,
    )
    call.update(over)
    return call


def _table_with(row, value):
    tab = torch.rand(4, 2, dtype=torch.float64)
    tab[row, 0] = value
    return tab


@pytest.mark.parametrize(
    ("label", "over"),
    [
        ("table float32", dict(table=torch.rand(4, 2))),
        ("table stride", dict(table=torch.rand(4, 3, dtype=torch.float64))),
        ("t out of range", dict(t=torch.tensor([0, 1, 2, 3, 4, 0]))),
        ("t negative", dict(t=torch.tensor([0, 1, 2, 3, -1, 0]))),
        ("t float", dict(t=torch.zeros(6))),
        ("t shape", dict(t=torch.zeros(5, dtype=torch.int64))),
        ("weights negative", dict(weights=torch.tensor([1.0, 1, 1, 1, 1, -1]))),
        ("weights NaN", dict(weights=torch.tensor([1.0, 1, 1, 1, 1, float("nan")]))),
        ("weights float64 for float32 data", dict(weights=torch.ones(6, dtype=torch.float64))),
        (
            "table row not finite",
            dict(table=_table_with(2, float("inf")), t=torch.tensor([2, 0, 0, 0, 0, 0])),
        ),
        ("shapes differ", dict(arrays=(torch.zeros(6, 3), torch.zeros(6, 3), torch.zeros(6, 2)))),
        ("NaN value", dict(arrays=(torch.full((6, 3), float("nan")), torch.zeros(6, 3), torch.zeros(6, 3)))),
        ("grad_of out of range", dict(grad_of=(3,))),
        ("need_grad length", dict(need_grad=(True, True))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_table_rows_declines_the_unusual(label, over):
    assert _C.fast_table_rows(**_mse_call()) is not None  # the baseline is served
    assert _C.fast_table_rows(**_mse_call(**over)) is None, label


def test_table_rows_unused_bad_row_is_fine():
    """Only the rows the timesteps read must be finite (as the Python path checks)."""
    out = _C.fast_table_rows(
        **_mse_call(table=_table_with(3, float("inf")), t=torch.tensor([0, 1, 2, 0, 1, 2]))
    )
    assert out is not None and torch.isfinite(out[0])


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


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vlb_x0_off_the_data_box_is_named(reduction):
    """vlb_term's kernel marks x0 outside [-1, 1] with a NaN value (no separate pass over
    x0); the fast path then falls back and the Python path names x0. A NaN elsewhere (x_t)
    is not an x0 error: the value is NaN, as the math says."""
    import genloss.native as gn
    import genloss.reference as gr

    sched = gr.DiffusionSchedule(gr.linear_betas(10))
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 5, generator=g) * 2 - 1
    x_t, eps = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    t = torch.tensor([0, 3, 5, 9])
    value, _ = gn.vlb_term(x0, x_t, t, eps, sched, None, reduction)
    assert torch.isfinite(value).all()
    bad = x0.clone()
    bad[2, 1] = 1.5  # a t > 0 row: the KL term itself is finite there
    with pytest.raises(ValueError, match="x0 must lie in"):
        gn.vlb_term(bad, x_t, t, eps, sched, None, reduction)
    nan_xt = x_t.clone()
    nan_xt[1, 0] = float("nan")
    value, _ = gn.vlb_term(x0, nan_xt, t, eps, sched, None, reduction)
    assert torch.isnan(value).any()
