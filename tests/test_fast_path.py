"""The small-call fast path on plain CPU torch tensors (cpp/src/plan.cpp): cached plans, with
their guards (checks of the data re-run on every call), and the one entry point of the engine
(_C.Call, _C.run).

A composition's first call for a key (its op, hyperparameters, reduction, need_grad) on plain
CPU torch tensors records its engine Calls; later calls with the same key, dtype and shapes
replay them in C++ (_compose.cached). The replay must be indistinguishable from the Python
path, except in speed:

* every native record, torch inputs, float32/float64, every reduction, need_grad True, False
  and one flag per input: bitwise the same value and gradients as with the fast paths switched
  off, and equal to the float64 NumPy reference;
* it is really taken for the ops that use it (else the above proves nothing);
* a plan serves only its own key, dtype and shapes (another hyperparameter, dtype or batch
  size runs the Python path and records its own plan);
* it declines (returns None, so the Python path runs and raises or handles the case) for
  everything unusual: NumPy arrays, subclasses, float16, non-contiguous or negated views, 0-d
  or empty inputs, mixed dtypes, data that fails a guard (timesteps out of range, negative
  weights, a NaN value that names x0); and a recording it could not replay is not kept;
* keys compare by type and float bits: 0.0 and -0.0 are two plans;
* the errors users see are the Python path's, naming the argument.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import numpy as np
import pytest

from genloss import registry as R
from test_native import check_against_reference

torch = pytest.importorskip("torch")
_C = pytest.importorskip("genloss._C")
from genloss.native import _compose, _engine  # noqa: E402
from genloss.native import diffusion as _diffusion  # noqa: E402

# The ops whose native composition runs through a cached plan (_compose.cached).
PLAN_OPS = (
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
    "l1_loss",
    "pix2pix_g_loss",
    "cycle_consistency_loss",
    "gaussian_kl",
    "bernoulli_nll",  # with a guard: no NaN in the value (x off [0, 1] makes one)
    "gaussian_nll",  # logvar of mean's shape, per-feature (col_broadcast, col_sum) or per-sample (row_scale)
    "normal_kl",  # four inputs of one shape, or per-feature / per-sample broadcasts
    "diffusion_mse_loss",  # with guards: the timesteps' range, the weights' sign
    "eps_mse_loss",  # with a guard: the weights' sign
    "flow_matching_loss",  # lambda(t) by row_map; guards: t in [0, 1] (above 'sigma_sqrt''s end point), weights >= 0
    "denoiser_loss",  # row_map (EDM's coefficients, the sigma and logvar gradients); guard: sigma in (0, 1e50]
    "consistency_training_loss",  # row_map (iCT's weight), pseudo-Huber; guard: 0 <= sigma_i < sigma_next
    "pseudo_huber_loss",  # SquaredDiff, PseudoHuberOfSqNorm, SquaredDiff with row weights
    "meanflow_loss",  # row_map (the (1, r - t) table, the adaptive weight); guards: t, r in [0, 1]
    "vsd_loss",  # AbsDiff row means, row_map (DMD2's normaliser), SquaredDiff, RowAffine
    "q_sample",  # the schedule's table an input; with a guard: the timesteps' range
    "v_target",
    "predict_x0_from_eps",  # and the table rows the timesteps pick (zero terminal SNR)
    "posterior_mean_from_eps",
    "vlb_term",  # and the table rows used, the value's NaNs
    # the engine's other kernels, kinds of the same Call (plan.cpp, Kind):
    "relativistic_d_loss",  # the means passed between calls in a float64 scratch (totals_out, param_from)
    "relativistic_g_loss",
    "gradient_penalty_from_grads",  # map_reduce + row_scale, with scratch (the norms, coefficients)
    "feature_matching_loss",  # col_sum into scratch means, col_broadcast
    "ssgan_critic_loss",  # row_lse, with a guard: the labels' range
    "ssgan_g_loss",  # row_lse
    "iwae_bound",  # row_lse
    "gmm_log_likelihood",  # gmm
    "mmd2",  # mmd, with bandwidths given (the median heuristic reads the data: no plan)
    "flow_interpolant",  # row_map (the path's coefficients), RowAffine; guard: t in [0, 1]
    "vdm_continuous_loss",  # SquaredDiff with row weights; guard: dgamma_dt finite
    "vdm_discrete_loss",  # row_map (T/2 expm1(gamma_t - gamma_s) and its gradients), SquaredDiff
    "negative_elbo",  # two map_reduce terms per sample; guard: no NaN in the value (x off [0, 1])
    "discretized_gaussian_log_likelihood",  # same shapes; guard: x in [-1, 1]
    "density_ratio_from_logits",  # map_reduce Exp, elementwise
    "jsd_estimate",  # row_scale without x writes log(4)/2, two map_reduce accumulate onto it
    "prior_kl",  # map_reduce PriorKL (alpha_bar_T in the key)
    "gmm_responsibilities",  # gmm, the (N, K) responsibilities only
    "scm_loss",  # row_map (sCM's tables, ||g||, e^{-u}); guards: t in [0, pi/2], no row rescaled (after)
)
FAST_OPS = PLAN_OPS
NATIVE_RECORDS = tuple(r for r in R.RECORDS if r.has_native)
CASES = list(R.cases(NATIVE_RECORDS))


class Spy:
    """The plan cache as the compositions see it (_compose.PLANS), counted or switched off: a
    fresh one (no plan recorded elsewhere is used)."""

    def __init__(self, off: bool) -> None:
        self.off = off
        self.served = 0
        self.plans = _C.PlanCache()

    def run(self, key, arrays):
        if self.off:
            return None
        out = self.plans.run(key, arrays)
        self.served += out is not None
        return out

    def add(self, *args):
        return False if self.off else self.plans.add(*args)


@pytest.fixture
def spy(monkeypatch):
    def install(off: bool) -> Spy:
        s = Spy(off)
        monkeypatch.setattr(_compose, "PLANS", s)
        return s

    return install


def _repeats_rows(small, full):
    """``small`` broadcast to ``full`` is ``full``'s rows each equal to ``small`` (leading 1s
    dropped, ``small`` is ``full``'s trailing dims; a scalar too)."""
    small = list(small)
    while small and small[0] == 1:
        small.pop(0)
    return not small or tuple(full[-len(small) :]) == tuple(small)


def _leading(small, full):
    """``small`` broadcast to ``full`` is ``full``'s rows, each one of ``small``'s entries
    repeated ((B, 1) over (B, F)): after right-aligning, ``full``'s first dims then 1s."""
    s = (1,) * (len(full) - len(small)) + tuple(small)
    k = max((i for i in range(len(full) + 1) if s[:i] == tuple(full[:i])), default=0)
    return k > 0 and all(d == 1 for d in s[k:])


def _expect_fast(record, tensors, kwargs, need=True):
    """The plans serve FAST_OPS on same-shape inputs and on trailing broadcasts (a per-feature
    log-variance: broadcast and reduced by the engine; a 0-d one is declined, as every 0-d
    input); any other broadcast (a (B, 1)
    mean stretched over F) is materialised by the Python path (a derived array, no plan); and
    mmd2 where its bandwidths do not come from the data."""
    if record.name not in FAST_OPS:
        return False
    if record.name in (
        "gaussian_nll",
        "normal_kl",
        "discretized_gaussian_log_likelihood",
        "negative_elbo",
        "vlb_term",
    ):
        shapes = [tuple(t.shape) for t in tensors if t.is_floating_point()]
        full = np.broadcast_shapes(*shapes)
        return all(s and (_repeats_rows(s, full) or _leading(s, full)) for s in shapes)  # (plans decline 0-d)
    if record.name == "mmd2":
        return kwargs.get("bandwidths") is not None or kwargs.get("kernel") in ("polynomial", "energy")
    return True


def _run(record, tensors, kwargs, need):
    value, grads = record.native(*tensors, **kwargs, need_grad=need)
    return [value.clone(), *[None if g is None else g.clone() for g in grads]]


def _same(label, fast, slow):
    assert len(fast) == len(slow), label
    for k, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert (a is None) == (b is None), f"{label} output {k}"
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, f"{label} output {k}"
            assert torch.equal(a, b), f"{label} output {k}: fast path differs from the Python path"


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
        first = _run(record, tensors, kwargs, need)  # records the plan (a plan op) or is served
        fast = _run(record, tensors, kwargs, need)  # served by the plan recorded just now
        spy(off=True)
        slow = _run(record, tensors, kwargs, need)
        label = f"{record.name}({variant.id}, {reduction}) need_grad={need}"
        if _expect_fast(record, tensors, kwargs, need):
            assert fast_spy.served > 0, f"{label}: the fast path was not taken"
        _same(label, first, slow)
        _same(label, fast, slow)
        if need is True:
            check_against_reference(record, variant, reduction, inputs, dtype, values=(fast[0], fast[1:]))


# The plan ops whose compositions run 16-bit CPU inputs through plans (elementwise kernels
# only: the others refuse them, gradient_penalty_from_grads computes them on float32 copies).
REFUSE_16 = (
    "ssgan_critic_loss",
    "ssgan_g_loss",
    "iwae_bound",
    "gmm_log_likelihood",
    "gmm_responsibilities",
    "mmd2",
)
COPIES_16 = ("gradient_penalty_from_grads",)
LOW_CASES = [
    (r, v, red)
    for r, v, red in CASES
    if r.name in PLAN_OPS and r.name not in REFUSE_16 and v is r.variants[0] and red in (None, "mean", "none")
]


@pytest.mark.parametrize("f32_values", [False, True], ids=["value16", "value32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("record", "variant", "reduction"), LOW_CASES, ids=[f"{r.name}-{v.id}-{red}" for r, v, red in LOW_CASES]
)
def test_16bit_plans_equal_the_python_path(spy, record, variant, reduction, dtype, f32_values):
    """float16/bfloat16 CPU tensors (and, under float32_values, the float32 value of a 16-bit
    call) are served by plans: bit for bit what the Python path gives, in the same dtypes."""
    inputs = R.make_inputs(record, np.random.default_rng(5), np.float32, R.ODD_SIZES[0], variant)
    tensors = tuple(
        torch.from_numpy(x).to(dtype) if x.dtype == np.float32 else torch.from_numpy(x) for x in inputs
    )
    kwargs = R.call_kwargs(record, variant, reduction)
    n = len(record.differentiable)
    for need in [True, False, tuple(j == 0 for j in range(n))] if n else [True]:
        fast_spy = spy(off=False)
        with _engine.float32_values() if f32_values else contextlib.nullcontext():
            first = _run(record, tensors, kwargs, need)
            fast = _run(record, tensors, kwargs, need)
            spy(off=True)
            slow = _run(record, tensors, kwargs, need)
        label = f"{record.name}({variant.id}, {reduction}, {dtype}) need_grad={need}"
        if record.name not in COPIES_16 and _expect_fast(record, tensors, kwargs, need):
            assert fast_spy.served > 0, f"{label}: the fast path was not taken"
        # (float32_values: float32 where the value kernel can write it; feature_matching's comes
        # from col_sum and stays 16-bit, which genloss.torch's pass-through then declines)
        assert slow[0].dtype in ((torch.float32, dtype) if f32_values else (dtype,)), label
        assert all(g is None or g.dtype == dtype for g in slow[1:]), label
        _same(label, first, slow)
        _same(label, fast, slow)


def test_16bit_plans_refuse_as_the_python_path_does(plans):
    """An op that also runs a kernel without CPU 16-bit storage (row_lse) raises the same
    TypeError whether or not a plan exists for its float32 inputs."""
    import genloss.native as gn

    logits = torch.randn(6, 4)
    gn.ssgan_g_loss(logits)  # a float32 plan
    assert len(plans) == 1
    for _ in range(2):
        with pytest.raises(TypeError, match="ssgan_g_loss.*row_lse"):
            gn.ssgan_g_loss(logits.bfloat16())
    assert len(plans) == 1


def _plain(n=8, dtype=torch.float32):
    return torch.linspace(-2, 2, n, dtype=dtype)


def _softplus_mean(x):
    return torch.nn.functional.softplus(x).mean()


@pytest.fixture
def plans(monkeypatch):
    """A fresh plan cache for the compositions."""
    cache = _C.PlanCache()
    monkeypatch.setattr(_compose, "PLANS", cache)
    return cache


KEY = ("one", "Softplus", 1.0, {"shift": 0.0}, "mean", True)  # gan_g_loss(minimax)'s key, less the sign


@pytest.mark.parametrize(
    ("label", "arrays"),
    [
        ("numpy array", (np.linspace(-2, 2, 8, dtype=np.float32),)),
        ("tensor subclass", (torch.nn.Parameter(_plain()),)),
        ("float16", (_plain().half(),)),
        ("int64", (torch.arange(8),)),
        ("non-contiguous", (torch.linspace(-2, 2, 16)[::2],)),
        ("negated view", (torch._neg_view(_plain()),)),
        ("0-d", (torch.tensor(1.0),)),
        ("empty batch", (torch.zeros(0),)),
        ("another batch size", (_plain(9),)),
        ("another dtype", (_plain(dtype=torch.float64),)),
        ("another key", "key"),
        ("a key that cannot be hashed", "set"),
        ("two arrays for one", (_plain(), _plain())),
        ("no arrays", ()),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_plans_decline_the_unusual(plans, label, arrays):
    x = _plain()
    want = _compose.one_population("x", x, "mean", "Softplus", 1.0, {"shift": 0.0}, True)
    assert len(plans) == 1
    served = plans.run(KEY, (x,))  # the baseline is served
    assert served is not None
    _same("baseline", list(served[:1]) + list(served[1]), list(want[:1]) + list(want[1]))
    key = KEY
    if arrays == "key":
        key, arrays = ("one", "Softplus", 1.0, {"shift": 0.5}, "mean", True), (x,)
    elif arrays == "set":
        key, arrays = (*KEY, {1, 2}), (x,)
    assert plans.run(key, arrays) is None, label


def test_a_plan_serves_only_its_hyperparameters_and_dtype(plans):
    """lsgan_g_loss with another target c, or float64 after float32: a new plan each, each
    giving the closed form."""
    import genloss.native as gn

    for dtype in (torch.float32, torch.float64):
        x = _plain(16, dtype)
        for c in (1.0, -0.5, 1.0):
            for _ in range(2):
                value, (g,) = gn.lsgan_g_loss(x, c=c)
                torch.testing.assert_close(value, 0.5 * ((x - c) ** 2).mean())
                torch.testing.assert_close(g, (x - c) / x.numel())
                assert value.dtype == dtype and g.dtype == dtype
    assert len(plans) == 4  # (c = 1, c = -0.5) x (float32, float64)
    value, grads = gn.lsgan_g_loss(_plain(16), c=1.0, need_grad=False)  # need_grad is in the key
    assert grads == () and len(plans) == 5
    gn.lsgan_g_loss(_plain(32), c=1.0)  # so is the batch size
    assert len(plans) == 6


def test_plan_scalar_results_are_fresh_tensors(plans):
    """A plan makes a 0-d result as a new tensor each call (empty_like of a kept 0-d tensor of
    its dtype): never the kept one, never shared between calls, ordinary (not an inference
    tensor) even when the first call ran under inference_mode."""
    import genloss.native as gn

    for dtype in (torch.float64, torch.float32):
        x = _plain(16, dtype)
        with torch.inference_mode():
            first, _ = gn.wgan_g_loss(x)
        values = [gn.wgan_g_loss(x)[0] for _ in range(3)]
        assert len(plans) == (1 if dtype == torch.float64 else 2)  # one plan per dtype
        want = -x.double().mean()
        for v in (first, *values):
            assert v.shape == () and v.dtype == dtype and not v.requires_grad
            torch.testing.assert_close(v.double(), want)
        assert not any(v.is_inference() for v in values)
        assert len({v.data_ptr() for v in values}) == 3  # alive together: three buffers
        values[0].fill_(123.0)  # a caller writing into its result changes nothing else
        again, _ = gn.wgan_g_loss(x)
        torch.testing.assert_close(again.double(), want)
        torch.testing.assert_close(values[1].double(), want)


def test_recordings_that_cannot_be_replayed_are_not_kept(plans):
    """A composition that reads the data in Python (a total read back, the data's median) or
    runs a primitive that is not a Call leaves no plan; sums passed between calls through
    float64 memory that it allocated itself are kept (relativistic_d_loss's means)."""
    import genloss.native as gn

    r, f = _plain(16), _plain(16) * 0.5
    with _engine.Recording() as rec:
        gn.relativistic_d_loss(r, f)  # the means pass between calls through its float64 scratch
    assert rec.ok
    with _engine.Recording() as rec:  # the median heuristic reads the data for its bandwidth
        gn.mmd2(_plain(16).reshape(8, 2), _plain(16).reshape(8, 2) * 0.5)
    assert not rec.ok
    value = gn.wgan_g_loss(r)
    calls: list = []  # a call whose pointers are neither inputs nor outputs: refused
    scratch = torch.empty(16)
    calls.append(
        _C.Call(functor="Linear", ins=[scratch.data_ptr()], rows=16, cols=1, out_value=value[0].data_ptr())
    )
    assert not plans.add(("other",), (r,), calls, value)
    aliased = _C.Call(functor="Linear", ins=[r.data_ptr()], rows=16, cols=1, out_value=value[0].data_ptr())
    assert not plans.add(("aliased",), (r, r), [aliased], value)
    totals = _C.Call(functor="Linear", ins=[r.data_ptr()], rows=16, cols=1, totals=True)
    assert not plans.add(("totals",), (r,), [totals], value)
    sums = torch.zeros(2, dtype=torch.float64)  # float64 memory the composition did not allocate
    kept = _C.Call(functor="Linear", ins=[r.data_ptr()], rows=16, cols=1, totals_out=sums.data_ptr())
    assert not plans.add(("totals_out",), (r,), [kept], value)
    own = torch.zeros(3)  # its own scratch, but float32: no float64 slot
    kept = _C.Call(functor="Linear", ins=[r.data_ptr()], rows=16, cols=1, totals_out=own.data_ptr())
    assert not plans.add(("f32 slot",), (r,), [kept], value, allocs=[own])
    own = torch.zeros(2, dtype=torch.float64)  # a slot past its end
    kept = _C.Call(functor="Linear", ins=[r.data_ptr()], rows=16, cols=1, totals_out=own.data_ptr() + 16)
    assert not plans.add(("past the end",), (r,), [kept], value, allocs=[own])


def test_large_outputs_come_from_the_output_cache(plans):
    """Outputs of 4 MiB or more: the same block cache as the Python path (_engine.empty)."""
    import genloss.native as gn

    if not gn.options()["huge_pages"]:
        pytest.skip("the output cache is off in this environment")

    x = torch.linspace(-3, 3, 1 << 20)  # 4 MiB of float32: its gradient comes from the cache
    gn.gan_g_loss(x, mode="minimax")  # records the plan
    before = gn.cache_info()
    value, (g,) = gn.gan_g_loss(x, mode="minimax")
    after = gn.cache_info()
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"] + 1
    assert g.data_ptr() % (2 << 20) == 0  # a 2 MiB-aligned block
    torch.testing.assert_close(g, -torch.sigmoid(x) / x.numel())
    torch.testing.assert_close(value, -_softplus_mean(x))


# ----------------------------------------------------------------------------- Call: named parameters


def _call(**over):
    x = _plain(4)
    kw = dict(functor="HalfSquare", params={"target": 1.0}, ins=[x.data_ptr()], rows=4, cols=1)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        (dict(params={"margin": 1.0}), TypeError, "functor HalfSquare: unknown parameter 'margin'"),
        (
            dict(params={"target": 1.0, "margin": 1.0}),
            TypeError,
            "unknown parameter 'margin'.*its parameters: target",
        ),
        (dict(params={}), TypeError, "missing parameter 'target'"),
        (dict(params={"target": "one"}), TypeError, "'target' must be a real number"),
        (
            dict(functor="GradPenaltyOfSqNorm", params={"center": 1.0, "one_sided": 0.5}),
            TypeError,
            "one_sided",
        ),
        (
            dict(functor="Linear", params={"shift": 0.0}),
            TypeError,
            "Linear: unknown parameter 'shift'.*has none",
        ),
        (dict(params=(1.0, 0.0, 0.0)), TypeError, "params must be a dict"),
        (dict(functor="NoSuchFunctor"), ValueError, "unknown functor"),
        (dict(ins=[0, 0]), ValueError, "HalfSquare takes 1 inputs, got 2"),
        (dict(rows_out=0), TypeError, "unknown field 'rows_out'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_call_names_its_parameters(over, error, match):
    with pytest.raises(error, match=match):
        _C.Call(**_call(**over))


def test_functor_params_are_exported():
    """Every functor's parameter names, and its slots (a, b, c, mode) for the positional form."""
    assert set(_C.FUNCTOR_PARAMS) == set(_C.FUNCTORS)
    assert _C.FUNCTOR_PARAMS["HingeRelu"] == ("offset", "slope")
    assert _C.FUNCTOR_PARAMS["GradPenaltyOfSqNorm"] == ("center", "one_sided")
    assert _C.FUNCTOR_SLOTS["GradPenaltyOfSqNorm"] == ("center", None, None, "one_sided")
    assert _C.FUNCTOR_PARAMS["Linear"] == ()
    c = _C.Call(**_call(functor="HingeRelu", params={"slope": -1.0, "offset": 2.0}))
    assert c.params == {"offset": 2.0, "slope": -1.0} and c.functor == "HingeRelu"


def test_run_computes_by_named_parameters():
    """relu(offset + slope x) summed, through Call and run, against the closed form."""
    x = torch.linspace(-2, 2, 8, dtype=torch.float64)
    out, g = torch.empty((), dtype=torch.float64), torch.empty(8, dtype=torch.float64)
    call = _C.Call(functor="HingeRelu", params={"offset": 1.0, "slope": -1.0}, dtype=1, ins=[x.data_ptr()],
                   grads=[g.data_ptr()], rows=8, cols=1, value_scale=0.5, grad_scale=0.5,
                   out_value=out.data_ptr(), totals=True)  # fmt: skip
    _C.run([call])
    torch.testing.assert_close(out, 0.5 * torch.relu(1 - x).sum())
    torch.testing.assert_close(g, -0.5 * (1 - x > 0).double())
    assert call.totals == pytest.approx((float(torch.relu(1 - x).sum()), -float((1 - x > 0).sum())))


def test_scalars_pass_between_calls_through_memory():
    """totals_out / param_from / offset_from (engine.h): the second call centres x on the mean
    the first left in memory and offsets its gradient by a multiple of a derivative sum,
    with no host round trip; against the closed form. param_from needs a parameter."""
    x = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64) ** 2
    b = _engine.as_input(x, "x")
    sums = _engine.zeros64(b, 4)
    g = _engine.empty(b, (7,))
    _engine.map_reduce("Linear", b, params={}, grads=[g], totals_out=(sums, 0))  # sum x, sum d = 7
    kept = torch.as_tensor(sums.arr)  # (a view: what the calls wrote)
    torch.testing.assert_close(kept[:2], torch.stack([x.sum(), torch.tensor(7.0, dtype=torch.float64)]))
    out = _engine.empty(b, ())
    _engine.map_reduce("HalfSquare", b, params={"target": 123.0}, param_from=(sums, 0, 1.0 / 7), out=out,
                       grads=[g], offset_from=(sums, 1, -0.5), totals_out=(sums, 2))  # fmt: skip
    m = x.mean()
    torch.testing.assert_close(out.arr, 0.5 * ((x - m) ** 2).sum())
    torch.testing.assert_close(g.arr, (x - m) - 3.5)
    torch.testing.assert_close(kept[2:], torch.stack([0.5 * ((x - m) ** 2).sum(), (x - m).sum()]))
    with pytest.raises(TypeError, match="param_from: functor Linear has no parameter"):
        _C.Call(functor="Linear", ins=[x.data_ptr()], rows=7, cols=1, param_from=sums.ptr)


def test_map_reduce_keeps_its_keywords():
    """_engine.map_reduce: named params, and the positional form (params=(a, b, c), mode=)
    of callers written before, mapped by slot; a value in a slot the functor lacks is refused."""
    x = torch.linspace(0, 3, 6, dtype=torch.float64)
    b = _engine.as_input(x, "x")
    for params, mode in (({"center": 1.0, "one_sided": True}, 0), ((1.0, 0.0, 0.0), 1)):
        out = _engine.empty(b, ())
        _engine.map_reduce("GradPenaltyOfSqNorm", b, params=params, mode=mode, out=out)
        torch.testing.assert_close(out.arr, (torch.relu(x.sqrt() - 1) ** 2).sum())
    with pytest.raises(ValueError, match="GradPenaltyOfSqNorm has no parameter in slot b"):
        _engine.map_reduce("GradPenaltyOfSqNorm", b, params=(1.0, 2.0, 0.0), out=_engine.empty(b, ()))
    with pytest.raises(TypeError, match="missing parameter 'center'"):
        _engine.map_reduce("GradPenaltyOfSqNorm", b, params={"one_sided": False}, out=_engine.empty(b, ()))


def _mse_args(n=6, **over):
    """Arguments of diffusion_mse_with_table on a 4-step table (float32 data)."""
    g = torch.Generator().manual_seed(5)
    pred, x0, noise = (torch.randn(n, 3, generator=g) for _ in range(3))
    args = dict(
        pred=pred,
        x0=x0,
        noise=noise,
        t=torch.randint(0, 4, (n,), generator=g),
        table=torch.rand(4, 2, dtype=torch.float64, generator=g),
        weights=torch.rand(n, generator=g),
    )
    args.update(over)
    return args


MSE_KEY = ("diffusion_mse", "mean", True, False)  # diffusion_mse_with_table's key, with weights


def _mse_arrays(a):
    return (a["pred"], a["x0"], a["noise"], a["t"], a["table"], a["weights"])


@pytest.mark.parametrize(
    ("label", "over"),
    [
        ("table float32", dict(table=torch.rand(4, 2))),
        ("table stride", dict(table=torch.rand(4, 3, dtype=torch.float64))),
        ("t out of range", dict(t=torch.tensor([0, 1, 2, 3, 4, 0]))),
        ("t negative", dict(t=torch.tensor([0, 1, 2, 3, -1, 0]))),
        ("t float", dict(t=torch.zeros(6))),
        ("t int32", dict(t=torch.zeros(6, dtype=torch.int32))),
        ("t shape", dict(t=torch.zeros(5, dtype=torch.int64))),
        ("weights negative", dict(weights=torch.tensor([1.0, 1, 1, 1, 1, -1]))),
        ("weights NaN", dict(weights=torch.tensor([1.0, 1, 1, 1, 1, float("nan")]))),
        ("weights inf", dict(weights=torch.tensor([1.0, 1, 1, 1, 1, float("inf")]))),
        ("weights float64 for float32 data", dict(weights=torch.ones(6, dtype=torch.float64))),
        ("shapes differ", dict(noise=torch.zeros(6, 2))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_table_plans_decline_the_unusual(plans, label, over):
    """diffusion_mse_with_table's plan re-runs the Python path's checks of the data (guards);
    any other dtype or shape is another plan. Then the Python path runs and names the problem
    (or, for another dtype or shape that it accepts, records its own plan)."""
    base = _mse_args()
    want = _diffusion.diffusion_mse_with_table(**base)  # records the plan
    assert len(plans) == 1
    served = plans.run(MSE_KEY, _mse_arrays(base))
    assert served is not None
    _same("baseline", [served[0], *served[1]], [want[0], *want[1]])
    assert plans.run(MSE_KEY, _mse_arrays(_mse_args(**over))) is None, label


@pytest.mark.parametrize(
    ("label", "over", "match"),
    [
        ("t out of range", dict(t=torch.tensor([0, 1, 2, 3, 4, 0])), r"t must lie in \[0, 4\)"),
        ("weights negative", dict(weights=torch.tensor([1.0, 1, 1, 1, 1, -1])), "weights must be >= 0"),
        (
            "weights NaN",
            dict(weights=torch.tensor([1.0, 1, 1, 1, 1, float("nan")])),
            "weights must be finite",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_failed_guard_gives_the_python_paths_error(plans, label, over, match):
    _diffusion.diffusion_mse_with_table(**_mse_args())  # records the plan
    with pytest.raises(ValueError, match=match):
        _diffusion.diffusion_mse_with_table(**_mse_args(**over))
    assert len(plans) == 1, label  # and records nothing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16bit_guards_read_16bit_bits(plans, dtype):
    """The weights' guard on 16-bit data: -0 and the smallest subnormal pass (served), a
    negative, NaN or infinite weight declines and the Python path names it."""
    low = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in _mse_args().items()}
    _diffusion.diffusion_mse_with_table(**low)  # records the plan
    assert len(plans) == 1
    tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal of the dtype
    for w, served in (
        ([1.0, 1, 1, 1, 1, -0.0], True),
        ([1.0, 1, 1, 1, 1, tiny], True),
        ([1.0, 1, 1, 1, 1, -tiny], False),
        ([1.0, 1, 1, 1, 1, float("nan")], False),
        ([1.0, 1, 1, 1, 1, -float("nan")], False),
        ([1.0, 1, 1, 1, 1, float("inf")], False),
    ):
        args = {**low, "weights": torch.tensor(w, dtype=dtype)}
        assert args["weights"][5].item() != 0 or w[5] == 0  # the subnormal is representable
        out = plans.run(MSE_KEY, _mse_arrays(args))
        assert (out is not None) == served, (w, out)
        if served:  # the Python path's result, the plans off
            with pytest.MonkeyPatch.context() as m:
                m.setattr(_compose, "PLANS", Spy(off=True))
                want = _diffusion.diffusion_mse_with_table(**args)
            _same(f"weights {w}", [out[0], *out[1]], [want[0], *want[1]])
        else:
            with pytest.raises(ValueError, match="weights must be"):
                _diffusion.diffusion_mse_with_table(**args)
    assert len(plans) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_flow_matching_plan_guards_t(plans, dtype):
    """flow_matching_loss's plan re-checks t in [0, 1] (the end points included): outside it,
    or NaN, the plan declines and the Python path names t; inside, the plan's result is the
    Python path's."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(3)
    pred, x0, noise = (torch.randn(5, 4, generator=g).to(dtype) for _ in range(3))
    t = torch.tensor([0.5, 0.25, 0.0, 1.0, 0.75], dtype=dtype)
    gn.flow_matching_loss(pred, x0, noise, t, need_grad=(True, False, False, False))  # records
    assert len(plans) == 1
    key = ("flow_matching", "none", 0.0, "mean", (True, False, False, False), True)
    for t5, served in (
        (0.0, True),
        (1.0, True),
        (-0.0, True),
        (1.0 + torch.finfo(dtype).eps, False),
        (-torch.finfo(dtype).tiny, False),
        (float("nan"), False),
    ):
        tt = t.clone()
        tt[4] = t5
        out = plans.run(key, (pred, x0, noise, tt))
        assert (out is not None) == served, t5
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_compose, "PLANS", Spy(off=True))
            if served:
                want = gn.flow_matching_loss(pred, x0, noise, tt, need_grad=(True, False, False, False))
                _same(f"t = {t5}", [out[0], *out[1]], [want[0], *want[1]])
            else:
                with pytest.raises(ValueError, match="t must"):
                    gn.flow_matching_loss(pred, x0, noise, tt, need_grad=(True, False, False, False))
    assert len(plans) == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_flow_matching_plan_takes_the_weights_as_given(plans, reduction):
    """flow_matching_loss with per-sample weights (no lambda(t)) runs on a plan: the weights go
    to the kernel as given, the plan re-checks them (finite, >= 0; else it declines and the
    Python path names them), and its result is the Python path's bit for bit, and the
    closed form's: sum_b w_b mean_i r^2 / B (reduction 'mean')."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(5)
    pred, x0, noise = (torch.randn(6, 3, 5, generator=g) for _ in range(3))
    t = torch.rand(6, generator=g)
    w = torch.rand(6, generator=g) * 2
    need = (True, True, False, False, False)

    def call(ww):
        return gn.flow_matching_loss(pred, x0, noise, t, weights=ww, reduction=reduction, need_grad=need)

    first = call(w)  # records
    assert len(plans) == 1
    key = ("flow_matching", "none", 0.0, reduction, need, False)
    r = (pred - (noise - x0)).double().reshape(6, -1)
    per = w.double() * r.square().mean(1)
    want = per.mean() if reduction == "mean" else per
    torch.testing.assert_close(first[0].double(), want, rtol=1e-6, atol=0)
    for w0, served in (
        (0.0, True),
        (3.0, True),
        (-1e-30, False),
        (float("nan"), False),
        (float("inf"), False),
    ):
        ww = w.clone()
        ww[2] = w0
        out = plans.run(key, (pred, x0, noise, t, ww))
        assert (out is not None) == served, w0
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_compose, "PLANS", Spy(off=True))
            if served:
                slow = call(ww)
                _same(f"w = {w0}", [out[0], *out[1]], [slow[0], *slow[1]])
            else:
                with pytest.raises(ValueError, match="weights must"):
                    call(ww)
    assert len(plans) == 1


def _served_or_named(plans, key, call, arrays_of, cases, match):
    """For each (value put into the inputs, served): the plan serves exactly the cases it
    should (the result then the Python path's, bit for bit); elsewhere it declines and the
    Python path raises ValueError matching ``match``."""
    for v, served in cases:
        arrays = arrays_of(v)
        out = plans.run(key, arrays)
        assert (out is not None) == served, v
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_compose, "PLANS", Spy(off=True))
            if served:
                want = call(*arrays)
                _same(f"{v}", [out[0], *out[1]], [want[0], *want[1]])
            else:
                with pytest.raises(ValueError, match=match):
                    call(*arrays)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_denoiser_plan_guards_sigma(plans, dtype):
    """denoiser_loss runs on a plan (row_map forms EDM's coefficients and the sigma and logvar
    gradients): it re-checks sigma in (0, 1e50] and declines outside (the Python path names
    the end point), and serves the range's extremes with the Python path's bits."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(8)
    F, x0, noise = (torch.randn(4, 3, 2, generator=g, dtype=dtype) for _ in range(3))
    sigma = torch.tensor([0.2, 1.0, 5.0, 80.0], dtype=dtype)
    lv = torch.randn(4, generator=g, dtype=dtype)
    need = (True, False, False, True, True)

    def call(*a):
        return gn.denoiser_loss(*a[:4], weighting="min_snr", logvar=a[4], need_grad=need)

    call(F, x0, noise, sigma, lv)  # records
    assert len(plans) == 1
    key = ("denoiser", 0.5, "min_snr", 5.0, "mean", need, False)
    top = float(torch.finfo(dtype).max) if dtype == torch.float32 else 1e50

    def arrays_of(v):
        s = sigma.clone()
        s[2] = v
        return (F, x0, noise, s, lv)

    cases = [
        (float(torch.finfo(dtype).tiny), True),
        (top, True),
        (0.0, False),
        (-1.0, False),
        (float("nan"), False),
    ]
    if dtype == torch.float64:
        cases.append((1.0000000000000002e50, False))
    _served_or_named(plans, key, call, arrays_of, cases, "sigma must")
    assert len(plans) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sigma_sqrt_plan_guards_the_end_point(plans, dtype):
    """flow_matching_loss(weighting='sigma_sqrt') runs on a plan that declines at t = 0 and
    where t^-2 would overflow the dtype (the Python path names t); a t just above its floor
    (the guard's margin) is served with the Python path's bits."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(9)
    pred, x0, noise = (torch.randn(3, 4, generator=g, dtype=dtype) for _ in range(3))
    t = torch.tensor([0.5, 0.25, 0.75], dtype=dtype)
    need = (True, False, False, True)

    def call(*a):
        return gn.flow_matching_loss(*a, weighting="sigma_sqrt", need_grad=need)

    call(pred, x0, noise, t)  # records
    key = ("flow_matching", "sigma_sqrt", 0.0, "mean", need, True)
    root = math.sqrt(float(torch.finfo(dtype).max))
    floor = 1.001 / root  # t^-2 < max / 1.002: served

    def arrays_of(v):
        tt = t.clone()
        tt[1] = v
        return (pred, x0, noise, tt)

    cases = [(floor, True), (1.0, True), (0.0, False), (0.5 / root, False), (-0.1, False)]
    _served_or_named(plans, key, call, arrays_of, cases, "t = 0 is the end point|t is so close|t must")
    assert len(plans) == 1


def test_consistency_plan_guards_the_noise_levels(plans):
    """consistency_training_loss runs on a plan (row_map: iCT's 1 / (sigma_next - sigma_i) in
    float64) that declines unless 0 <= sigma_i < sigma_next row by row; the Python path names
    the argument. Served results are the Python path's, and the closed form's."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(10)
    fs, ft = (torch.randn(3, 5, generator=g) for _ in range(2))
    lo = torch.tensor([0.0, 0.5, 2.0])
    hi = torch.tensor([0.1, 0.6, 2.5])

    def call(*a):
        return gn.consistency_training_loss(*a, need_grad=True)

    first = call(fs, ft, lo, hi)  # records
    c = 0.00054 * math.sqrt(5)
    d2 = (fs - ft).double().square().sum(1)
    want = ((d2 + c * c).sqrt() - c) / (hi.double() - lo.double())
    torch.testing.assert_close(first[0].double(), want.mean(), rtol=1e-5, atol=0)
    key = ("consistency_training", None, "mean", True)

    def arrays_of(v):
        lo2 = lo.clone()
        lo2[1] = v
        return (fs, ft, lo2, hi)

    cases = [(0.0, True), (0.59, True), (0.6, False), (0.7, False), (-1e-30, False), (float("nan"), False)]
    _served_or_named(
        plans, key, call, arrays_of, cases, "sigma_next must be > sigma_i|sigma_i must|must be finite"
    )
    assert len(plans) == 1


def test_meanflow_plan_guards_t_and_r(plans):
    """meanflow_loss runs on a plan (row_map: the (1, r - t) table and the adaptive weight) that
    re-checks t and r in [0, 1] and declines outside them (the Python path names the argument);
    r = t (du_dt not read) and the end points are served with the Python path's bits."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(12)
    u, v, du = (torch.randn(3, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.3])
    r = torch.tensor([0.1, 0.5, 0.2])

    def call(*a):
        return gn.meanflow_loss(*a, need_grad=True)

    call(u, v, du, t, r)  # records
    key = ("meanflow", 1.0, 1e-3, "mean", True)

    def arrays_of(v_):
        rr = r.clone()
        rr[2] = v_
        return (u, v, du, t, rr)

    cases = [
        (0.0, True),
        (0.3, True),
        (1.0, True),
        (1.0 + 2**-23, False),
        (-1e-30, False),
        (float("nan"), False),
    ]
    _served_or_named(plans, key, call, arrays_of, cases, "r must")
    assert len(plans) == 1


def test_discretized_plan_guards_x(plans):
    """discretized_gaussian_log_likelihood runs on a plan (same-shape inputs) that re-checks x
    in [-1, 1]: the end points are served with the Python path's bits; outside, or NaN, the
    plan declines and the Python path names x."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(13)
    x = torch.rand(2, 5, generator=g) * 2 - 1
    means, log_scales = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g) * 0.1 - 2

    def call(*a):
        return gn.discretized_gaussian_log_likelihood(*a, need_grad=True)

    call(x, means, log_scales)  # records
    key = ("discretized_gll", 8, "exact", True)

    def arrays_of(v):
        xx = x.clone()
        xx[1, 3] = v
        return (xx, means, log_scales)

    cases = [(-1.0, True), (1.0, True), (1.0 + 2**-23, False), (-1.5, False), (float("nan"), False)]
    _served_or_named(plans, key, call, arrays_of, cases, "x must lie in")
    assert len(plans) == 1


def test_scm_plan_declines_where_a_norm_needs_rescaling(plans):
    """scm_loss runs on a plan whose ||g|| comes from the float32 row sums; a row whose sum
    overflows (or falls below 2^-64) is redone by the Python path on a scaled copy. The plan
    re-checks the sums after its calls (guard 'rows_normal') and declines there: the Python
    path's value is then finite and equals the float64 formula; on ordinary data the plan
    serves the Python path's bits. t out of [0, pi/2] declines too, and is named."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(14)
    F, fm, dfm, xt, dxt = (torch.randn(3, 8, generator=g) for _ in range(5))
    t = torch.tensor([0.3, 1.0, 1.4])

    def call(*a):
        return gn.scm_loss(*a, need_grad=True)

    call(F, fm, dfm, xt, dxt, t)  # records
    assert len(plans) == 1
    key = ("scm", 0.5, 1.0, 0.1, True, "mean", True)
    out = plans.run(key, (F, fm, dfm, xt, dxt, t))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_compose, "PLANS", Spy(off=True))
        want = call(F, fm, dfm, xt, dxt, t)
    _same("ordinary", [out[0], *out[1]], [want[0], *want[1]])
    for big in (1e25, 1e-25):  # ||g||^2 over float32's range / below 2^-64 (F^- kept: r bounded)
        scaled = (fm if big > 1 else fm * big, dfm * big, xt * big, dxt * big)
        assert plans.run(key, (F, *scaled, t)) is None, big
        value, _ = call(F, *scaled, t)
        d = [a.double() for a in (F, *scaled)]
        ct, st = t.double().cos()[:, None], t.double().sin()[:, None]
        alpha, beta = -(ct * ct), -ct * st
        gg = alpha * (0.5 * d[1] - d[4]) + beta * (d[3] + 0.5 * d[2])
        k = 1.0 / (gg.norm(dim=1, keepdim=True) + 0.1)
        ref = ((d[0] - d[1] - k * gg) ** 2).mean(1).mean()
        assert math.isfinite(float(value)), big
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=0)
    tt = t.clone()
    tt[1] = 1.6  # above pi/2
    assert plans.run(key, (F, fm, dfm, xt, dxt, tt)) is None
    with pytest.raises(ValueError, match="TrigFlow angle"):
        call(F, fm, dfm, xt, dxt, tt)
    assert len(plans) == 1


def test_bernoulli_plan_declines_on_a_nan_value(plans):
    """bernoulli_nll's plan checks its value for NaN after the call: a target off [0, 1] makes
    one, the plan declines and the Python path names x; a NaN logit makes one too, and the
    Python path returns it (NaN propagates, no error)."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(4)
    logits, x = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g)
    gn.bernoulli_nll(logits, x)  # records
    assert len(plans) == 1
    key = ("bernoulli_nll", "mean", True)
    assert plans.run(key, (logits, x)) is not None
    bad_x = x.clone()
    bad_x[2, 3] = 1.5
    assert plans.run(key, (logits, bad_x)) is None
    with pytest.raises(ValueError, match="x must lie in"):
        gn.bernoulli_nll(logits, bad_x)
    nan_logits = logits.clone()
    nan_logits[1, 1] = float("nan")
    assert plans.run(key, (nan_logits, x)) is None
    value, (g_l, _) = gn.bernoulli_nll(nan_logits, x)
    assert value.isnan() and g_l[1, 1].isnan()
    assert len(plans) == 1


def test_linear_map_plans_follow_the_schedule_and_its_checks(plans):
    """predict_x0_from_eps: schedules of one length share a plan (the table is an input), a
    zero-terminal-SNR one too: its plan re-checks that the table rows the timesteps pick are
    finite, so a step where the map is undefined is refused on every call."""
    import genloss.native as gn
    from genloss.reference import diffusion as RD

    g = torch.Generator().manual_seed(6)
    x_t, eps = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    t = torch.tensor([0, 3, 9, 5])
    a, b = RD.DiffusionSchedule(RD.linear_betas(10)), RD.DiffusionSchedule(RD.cosine_betas(10))
    for sched in (a, b, a, b):
        got, _ = gn.predict_x0_from_eps(x_t, t, eps, sched)
        abar = torch.tensor(sched.alpha_bar)[t].float().reshape(-1, 1)
        torch.testing.assert_close(got, (x_t - (1 - abar).sqrt() * eps) / abar.sqrt())
    assert len(plans) == 1
    zero = RD.DiffusionSchedule(np.append(RD.linear_betas(9, 0.01, 0.2), 1.0))
    spy = Spy(off=False)
    spy.plans = plans
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_compose, "PLANS", spy)
        gn.predict_x0_from_eps(x_t, torch.tensor([0, 3, 8, 5]), eps, zero)  # valid steps: served
    assert spy.served == 1 and len(plans) == 1
    for _ in range(2):
        with pytest.raises(ValueError, match="zero terminal SNR"):
            gn.predict_x0_from_eps(x_t, t, eps, zero)  # step 9: alpha_bar = 0


def test_vlb_plan_guards_the_rows_used_and_the_value(plans):
    """vlb_with_table: a table row that a timestep picks and that is not finite (zero alpha),
    or a NaN value (x0 off [-1, 1] at t = 0), declines; a bad row no timestep picks does not."""
    g = torch.Generator().manual_seed(9)
    x0 = torch.rand(4, 5, generator=g, dtype=torch.float64) * 2 - 1
    x_t, eps = (
        torch.randn(4, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 5, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0, 1, 2, 1])
    table = torch.rand(4, 12, generator=g, dtype=torch.float64) + 0.5
    key = ("vlb", "none", 8, True, True)
    want = _diffusion.vlb_with_table(x0, x_t, t, eps, table)
    assert len(plans) == 1
    served = plans.run(key, (x0, x_t, t, eps, table))
    assert served is not None
    _same("baseline", [served[0], *served[1]], [want[0], *want[1]])
    unused = table.clone()
    unused[3, 4] = float("inf")  # step 3: no sample is at it
    assert plans.run(key, (x0, x_t, t, eps, unused)) is not None
    used = table.clone()
    used[2, 4] = float("inf")
    assert plans.run(key, (x0, x_t, t, eps, used)) is None
    with pytest.raises(ValueError, match="t hits step 2"):
        _diffusion.vlb_with_table(x0, x_t, t, eps, used)
    bad = x0.clone()
    bad[0, 0] = 1.5  # sample 0 is at t = 0: the decoder's value is NaN there
    assert plans.run(key, (bad, x_t, t, eps, table)) is None
    with pytest.raises(ValueError, match="x0 must lie in"):
        _diffusion.vlb_with_table(bad, x_t, t, eps, table)


def test_keys_compare_by_type_and_float_bits(plans):
    """0.0 and -0.0 are equal in Python but not in IEEE arithmetic: a composition whose
    gradient is s * f'(x) + s gives -0.0 for s = -0.0 and +0.0 for s = 0.0, so they must be
    two plans. Without the bitwise key, -0.0 was served the plan of 0.0 (sign flipped)."""
    x = _plain(8, torch.float64)

    def loss(s):
        def compose():
            b = _engine.as_input(x, "x")
            out, g = _engine.empty(b, ()), _engine.empty(b, b.shape)
            _engine.map_reduce("Linear", b, out=out, grads=[g], grad_scale=s, grad_offset=s)
            return out.arr, (g.arr,)

        return _compose.cached(("zero_sign", s), (x,), compose)

    for s in (0.0, -0.0, 0.0, -0.0):
        _, (g,) = loss(s)
        negative = math.copysign(1.0, s) < 0  # IEEE: (-0) * 1 + (-0) = -0; (+0) * 1 + (+0) = +0
        assert torch.equal(torch.signbit(g), torch.full((8,), negative)), s
    assert len(plans) == 2
    # True and 1, (True,) and [True] are equal or alike in Python too, but four keys here.
    for flag in (True, 1, (True,), [True]):
        _compose.one_population("x", x, "sum", "Linear", 1.0, None, flag)
    assert len(plans) == 6


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


# ----------------------------------------------------------------------------- the kernels as kinds of Call


def test_kernel_kinds_compute_by_named_fields():
    """col_sum, col_broadcast, row_scale and row_lse through Call and run, against torch."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    m = torch.empty(3, dtype=torch.float64)
    _C.run(_C.Call(kind="col_sum", dtype=1, x=x.data_ptr(), out=m.data_ptr(), rows=5, cols=3, scale=0.5))
    torch.testing.assert_close(m, 0.5 * x.sum(0))
    b = torch.ones(4, 3, dtype=torch.float64)
    _C.run(_C.Call(kind="col_broadcast", dtype=1, v=m.data_ptr(), out=b.data_ptr(), rows=4, cols=3, scale=2.0,
                   accumulate=True))  # fmt: skip
    torch.testing.assert_close(b, 1.0 + 2.0 * m.expand(4, 3))
    coef = torch.arange(5, dtype=torch.float64)
    s = torch.empty(5, 3, dtype=torch.float64)
    _C.run(_C.Call(kind="row_scale", dtype=1, x=x.data_ptr(), coef=coef.data_ptr(), out=s.data_ptr(), rows=5,
                   cols=3, scale=3.0))  # fmt: skip
    torch.testing.assert_close(s, 3.0 * coef[:, None] * x)
    _C.run(
        _C.Call(kind="row_scale", dtype=1, coef=coef.data_ptr(), out=s.data_ptr(), rows=5, cols=3, scale=3.0)
    )
    torch.testing.assert_close(s, 3.0 * coef[:, None].expand(5, 3))  # no x: ones (a per-row broadcast)
    _C.run(
        _C.Call(
            kind="row_scale", dtype=1, coef=coef.data_ptr(), out=s.data_ptr(), rows=5, cols=3, accumulate=True
        )
    )
    torch.testing.assert_close(s, 4.0 * coef[:, None].expand(5, 3))
    out, grad = torch.empty((), dtype=torch.float64), torch.empty(5, 3, dtype=torch.float64)
    call = _C.run_call(kind="row_lse", dtype=1, logits=x.data_ptr(), mode=1, index=2, rows=5, K=3,
                       value_scale=0.25, out_value=out.data_ptr(), grad=grad.data_ptr(), grad_scale=0.25)  # fmt: skip
    torch.testing.assert_close(out, 0.25 * (torch.logsumexp(x, 1) - x[:, 2]).sum())
    torch.testing.assert_close(grad, 0.25 * (torch.softmax(x, 1) - torch.nn.functional.one_hot(
        torch.full((5,), 2), 3).double()))  # fmt: skip
    assert call.kind == "row_lse" and call.fields["K"] == 3 and call.fields["mode"] == 1
    with pytest.raises(AttributeError, match="map_reduce field"):
        call.functor  # noqa: B018


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        (dict(kind="col_max"), ValueError, "unknown kind 'col_max'"),
        (dict(kind="col_sum", x=8, out=8, rows=2), TypeError, r"col_sum'\): missing field 'cols'"),
        (dict(kind="col_sum", x=8, out=8, rows=2, cols=2, K=2), TypeError, r"unknown field 'K' \(its fields"),
        (dict(kind="col_sum", x=0, out=8, rows=2, cols=2), ValueError, "x must be an address"),
        (dict(kind="row_scale", x=8, out=8, rows=-1, cols=2), ValueError, "rows must be >= 0"),
        (dict(kind="row_lse", logits=8, mode=7, rows=1, K=2), ValueError, "mode must be 0-4"),
        (dict(kind="row_lse", logits=8, mode=0, rows=1, K=2), ValueError, "mode 0 needs labels"),
        (dict(kind="row_lse", logits=8, mode=1, index=2, rows=1, K=2), ValueError, "index must be < K"),
        (dict(kind="gmm", x=8, logits=8, means=8, logvars=8, N=1, K=1, D=1, dtype=5), ValueError, "dtype"),
        (dict(kind="mmd", kernel=0, estimator=0, x=8, y=8, N=2, M=2, D=1), ValueError, "need bandwidths"),
        (
            dict(kind="mmd", kernel=0, estimator=0, x=8, y=8, N=2, M=2, D=1, bandwidths=1.0),
            TypeError,
            "bandwidths must be a list",
        ),
        (dict(kind="mmd", kernel=4, estimator=0, x=8, y=8, N=2, M=2, D=1), ValueError, "kernel must be 0-3"),
        (
            dict(kind="sinkhorn", x=8, y=8, N=2, M=2, D=1, p=2.0, tol=1e-6, max_iter=9, value=8),
            TypeError,
            "missing field 'eps'",
        ),  # fmt: skip
        (
            dict(kind="sinkhorn", x=8, y=8, N=2, M=2, D=1, p=2.0, eps=[], tol=1e-6, max_iter=9, value=8),
            ValueError,
            "eps must hold",
        ),  # fmt: skip
        (
            dict(kind="assignment", dtype=0, x0=8, x1=8, B=2, D=1, perm=8),
            TypeError,
            r"dtype must be 1 \(float64",
        ),
        (
            dict(kind="knn_prdc", real=8, fake=8, N=3, M=5, D=2, k=3, real_r2=8, fake_r2=8, counts=8),
            ValueError,
            "1 <= k < N",
        ),  # fmt: skip
        (dict(kind="lfq_entropy", z=8, N=2, d=21, inv_temperature=1.0, out_value=8), ValueError, "d <= 20"),
        (dict(kind="row_map", functor=99, x0=8, rows=2), ValueError, "functor must be 0-"),
        (dict(kind="row_map", functor=4, x0=8, x2=8, rows=2), ValueError, "CtWeight takes 2 inputs"),
        (dict(kind="row_map", functor=4, x0=8, rows=2, table=8), ValueError, "CtWeight writes no table"),
        (dict(kind="row_map", functor=4, x0=8, rows=2, out1=8), ValueError, r"one output \(out0\)"),
        (dict(kind="row_map", functor=5, x0=8, rows=2, out0=8), ValueError, "MeanflowRows writes no output"),
        (dict(kind="row_map", functor=4, x0=0, rows=2), ValueError, "x0 must be an address"),
        (
            dict(kind="row_map", dtype=3, functor=4, x0=8, rows=2),
            TypeError,
            "float16/bfloat16 inputs on the CPU",
        ),
        (dict(kind="row_map", dtype=3, functor=4, x0=8, rows=2, device=1), TypeError, "dtype must be 0 or 1"),
        (
            dict(
                kind="vector_quantize",
                dtype=2,
                z=8,
                codebook=8,
                N=1,
                K=1,
                D=1,
                beta=0.25,
                z_q=8,
                indices=8,
                out_commitment=8,
                out_codebook=8,
            ),
            TypeError,
            "float16/bfloat16 inputs on the CPU .* vector_quantize",
        ),  # fmt: skip
        (
            dict(
                kind="vq_ema_update",
                N=2,
                K=2,
                D=1,
                cluster_size=8,
                embed_sum=8,
                decay=0.9,
                eps=1e-5,
                out_cluster_size=8,
                out_embed_sum=8,
                out_codebook=8,
            ),
            ValueError,
            "z and indices are needed",
        ),  # fmt: skip
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_kernel_calls_name_their_fields(fields, error, match):
    with pytest.raises(error, match=match):
        _C.Call(**fields)


def test_row_map_computes_the_reference_coefficients():
    """row_map's row functors (ops/flow.h) against the reference's formulas in float64
    (reference/flow.py: denoiser_rows, weight_and_slope, ct_weight), each weighting; a
    float32 call computes in float64 and rounds once: its outputs are the float64 call's
    rounded, bit for bit. _engine.row_map names the functor's parameters."""
    from genloss.native import _engine as E
    from genloss.reference import flow as RF

    g = np.random.default_rng(4)
    sigma = np.concatenate([np.exp(g.uniform(-12, 12, 20)), [1e-30, 1e30, 1e50, 0.5]])  # both tails
    u = g.normal(size=sigma.size)
    m, dot = g.uniform(0, 3, sigma.size), g.normal(size=sigma.size)

    def rows(functor, ins, n_table, n_out, dtype=np.float64, **params):
        bufs = [None if a is None else E.as_input(np.ascontiguousarray(a, dtype), "x") for a in ins]
        tab = np.full((len(ins[0]), n_table), np.nan) if n_table else None
        outs = [np.full(len(ins[0]), np.nan, dtype) for _ in range(n_out)]
        E.row_map(functor, bufs, table=None if tab is None else E.as_input(tab, "table"),
                  outs=[E.as_input(o, "out") for o in outs], params=params)  # fmt: skip
        return tab, outs

    for name, mode in (("edm", 0), ("snr", 1), ("soft_min_snr", 2), ("min_snr", 3)):
        a, b, w, dw, k = RF.denoiser_rows(sigma, 0.5, name, 5.0)
        p = {"sigma_data": 0.5, "gamma": 5.0, "weighting": mode}
        tab, (rw,) = rows("DenoiserRows", [sigma, u], 4, 1, **p)
        np.testing.assert_allclose(tab, np.stack([a, b, k, k * sigma], 1), rtol=1e-15, atol=0)
        np.testing.assert_allclose(rw, w * np.exp(-u), rtol=1e-15, atol=0)
        _, (gs, gu) = rows("DenoiserGrads", [sigma, u, m, dot], 0, 2, **p, value_weight=0.25)
        np.testing.assert_allclose(gs, np.exp(-u) * (dw * m - 2 * w * dot), rtol=1e-13, atol=1e-300)
        np.testing.assert_allclose(gu, 0.25 - np.exp(-u) * w * m, rtol=1e-13, atol=1e-15)
        # no logvar: u = 0, e^{-u} = 1 exactly
        _, (rw0,) = rows("DenoiserRows", [sigma, None], 0, 1, **p)
        np.testing.assert_array_equal(rw0, w)
        s32 = sigma[sigma < 1e38].astype(np.float32)
        _, (r32,) = rows("DenoiserRows", [s32], 0, 1, np.float32, **p)
        _, (r64,) = rows("DenoiserRows", [s32.astype(np.float64)], 0, 1, **p)
        np.testing.assert_array_equal(r32, r64.astype(np.float32))
    t = np.concatenate([g.uniform(0, 1, 30), [1e-100, 0.5, 1.0]])
    wts, mm = g.uniform(0, 2, t.size), g.uniform(0, 3, t.size)
    for name, mode in (("sigma_sqrt", 1), ("cosmap", 2)):
        lam, dlam = RF.weight_and_slope(t, name)
        _, (rw,) = rows("FlowWeightRows", [t, wts], 0, 1, weighting=mode)
        np.testing.assert_allclose(rw, wts * lam, rtol=1e-15, atol=0)
        _, (gt, gw) = rows("FlowWeightGrads", [t, wts, mm], 0, 2, weighting=mode)
        np.testing.assert_allclose(gt, wts * dlam * mm, rtol=1e-15, atol=0)
        np.testing.assert_allclose(gw, lam * mm, rtol=1e-15, atol=0)
    _, (rw,) = rows("FlowWeightRows", [t, wts], 0, 1, weighting=0)  # 'none': lambda = 1
    np.testing.assert_array_equal(rw, wts)
    _, (gt, gw) = rows("FlowWeightGrads", [t, wts, mm], 0, 2, weighting=0)
    np.testing.assert_array_equal(gt, np.zeros_like(mm))
    np.testing.assert_array_equal(gw, mm)
    lo = g.uniform(0, 80, 16)
    hi = lo + np.exp(g.uniform(-30, 3, 16))
    _, (lam,) = rows("CtWeight", [lo, hi], 0, 1)
    np.testing.assert_array_equal(lam, RF.ct_weight(lo, hi))
    d = g.uniform(0, 4, 12)
    _, (w,) = rows("MeanflowWeight", [d], 0, 1, p=0.75, eps=1e-3)
    np.testing.assert_allclose(w, (d + 1e-3) ** -0.75, rtol=1e-15, atol=0)
    tab, (hw,) = rows("VsdRows", [d], 2, 1, scale=0.125, eps=RF.VSD_EPS)
    wv = RF.vsd_weight(d)
    np.testing.assert_allclose(tab, np.stack([0.125 * wv, -0.125 * wv], 1), rtol=1e-15, atol=0)
    np.testing.assert_allclose(hw, 0.5 * wv * wv, rtol=1e-15, atol=0)
    tr = g.uniform(0, 1, (2, 12))
    tab, _ = rows("MeanflowRows", [tr[0], tr[1]], 2, 0)
    np.testing.assert_array_equal(tab, np.stack([np.ones(12), tr[1] - tr[0]], 1))
    with pytest.raises(TypeError, match="DenoiserRows: missing parameter 'gamma'"):
        rows("DenoiserRows", [sigma], 0, 1, sigma_data=0.5, weighting=0)
    with pytest.raises(TypeError, match="CtWeight: unknown parameter 'c'"):
        rows("CtWeight", [lo, hi], 0, 1, c=1.0)
    # raw addresses: the sizes the kernel will touch are checked before the call
    b16 = E.as_input(np.zeros(16), "x")
    with pytest.raises(ValueError, match=r"table must be a float64 \(16, 2\)"):
        E.row_map("MeanflowRows", [b16, b16], table=E.as_input(np.zeros((16, 3)), "t"))
    with pytest.raises(ValueError, match="every input and output must be a"):
        E.row_map("CtWeight", [b16, b16], outs=[E.as_input(np.zeros(15), "o")])
    with pytest.raises(ValueError, match="every input and output must be a"):
        E.row_map("CtWeight", [b16, E.as_input(np.zeros(16, np.float32), "y")])


def test_cpu_only_kinds_compute_by_named_fields():
    """The quant and metrics kernels as kinds of the one Call: assignment against scipy's
    solver, vector_quantize against a brute-force argmin, sinkhorn's rounds read back, and a
    kernel's own data check (vq_ema_update's indices) a ValueError naming the kind."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(5)
    x0, x1 = (
        torch.randn(7, 3, dtype=torch.float64, generator=g),
        torch.randn(7, 3, dtype=torch.float64, generator=g),
    )
    perm = torch.empty(7, dtype=torch.int64)
    call = _C.run_call(kind="assignment", x0=x0.data_ptr(), x1=x1.data_ptr(), B=7, D=3, perm=perm.data_ptr())
    _, cols = scipy_opt.linear_sum_assignment(torch.cdist(x0, x1).square().numpy())
    assert perm.tolist() == cols.tolist()
    assert call.kind == "assignment" and call.fields["dtype"] == 1 and call.fields["B"] == 7

    z, cb = torch.randn(9, 2, generator=g), torch.randn(4, 2, generator=g)
    zq, idx = torch.empty(9, 2), torch.empty(9, dtype=torch.int64)
    commit, code = torch.empty(()), torch.empty(())
    _C.run_call(kind="vector_quantize", dtype=0, z=z.data_ptr(), codebook=cb.data_ptr(), N=9, K=4, D=2, beta=0.25,
                z_q=zq.data_ptr(), indices=idx.data_ptr(), out_commitment=commit.data_ptr(),
                out_codebook=code.data_ptr())  # fmt: skip
    want = torch.cdist(z.double(), cb.double()).argmin(1)
    assert idx.tolist() == want.tolist()
    torch.testing.assert_close(zq, cb[want])
    torch.testing.assert_close(commit, 0.25 * (z - cb[want]).square().mean())

    value, rounds = torch.empty((), dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    _C.run_call(kind="sinkhorn", x=x0.data_ptr(), y=x1.data_ptr(), N=7, M=7, D=3, p=2.0, eps=[1.0, 0.5],
                tol=1e-9, max_iter=500, debias=True, value=value.data_ptr(), rounds=rounds.data_ptr())  # fmt: skip
    assert 1 <= int(rounds) <= 500 and bool(torch.isfinite(value))

    bad = torch.tensor([0, 3])
    out = [torch.empty(2, dtype=torch.float64), torch.empty(2, 1, dtype=torch.float64),
           torch.empty(2, 1, dtype=torch.float64)]  # fmt: skip
    src = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="vq_ema_update: indices must lie in"):
        _C.run_call(kind="vq_ema_update", dtype=1, z=src.data_ptr(), indices=bad.data_ptr(), N=2, K=2, D=1,
                    cluster_size=out[0].data_ptr(), embed_sum=src.data_ptr(), decay=0.9, eps=1e-5,
                    out_cluster_size=out[0].data_ptr(), out_embed_sum=out[1].data_ptr(),
                    out_codebook=out[2].data_ptr())  # fmt: skip


def test_plans_with_scratch_serve_new_data(plans):
    """feature_matching_loss's plan allocates its scratch (the column means and their
    gradients) on every run: new data, a new batch of results, each the closed form, and the
    results of an earlier run untouched."""
    import genloss.native as gn

    g = torch.Generator().manual_seed(4)
    runs = []
    for _ in range(3):
        r, f = (
            torch.randn(6, 4, dtype=torch.float64, generator=g),
            torch.randn(5, 4, dtype=torch.float64, generator=g),
        )
        value, (gr, gf) = gn.feature_matching_loss(r, f)
        runs.append((r, f, value, gr, gf))
    assert len(plans) == 1
    for r, f, value, gr, gf in runs:  # checked after all ran: no run wrote into another's arrays
        d = r.mean(0) - f.mean(0)
        torch.testing.assert_close(value, (d**2).sum())
        torch.testing.assert_close(gr, (2 * d / 6).expand(6, 4))
        torch.testing.assert_close(gf, (-2 * d / 5).expand(5, 4))


def test_scratch_is_per_run_across_threads(plans):
    """Two threads replay gradient_penalty_from_grads's plan at once (large enough that the
    kernels run with the GIL released, so the runs overlap): each run's scratch (the squared
    norms and the coefficients) is its own, and every result is the closed form."""
    import threading

    import genloss.native as gn

    shape = (64, 2048)  # 131,072 elements: the GIL is released while the calls run
    gn.gradient_penalty_from_grads(torch.randn(shape, dtype=torch.float64))  # records the plan
    results: dict[int, list] = {0: [], 1: []}

    def work(k: int) -> None:
        g = torch.Generator().manual_seed(10 + k)
        for _ in range(15):
            x = torch.randn(shape, dtype=torch.float64, generator=g) * (0.5 + k)
            results[k].append((x, *gn.gradient_penalty_from_grads(x)))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(plans) == 1
    for k in (0, 1):
        assert len(results[k]) == 15
        for x, value, (grad,) in results[k]:
            norm = x.norm(dim=1)
            torch.testing.assert_close(value, 10.0 * ((norm - 1.0) ** 2).mean())
            torch.testing.assert_close(grad, (20.0 * (norm - 1.0) / norm / 64)[:, None] * x)


def test_ssgan_plan_guards_the_labels(plans):
    """ssgan_critic_loss's plan re-checks that the labels are real classes: one that is the
    fake class declines, and the Python path names the labels."""
    import genloss.native as gn

    lab, unl, fak = _plain(12).reshape(4, 3), _plain(12).reshape(4, 3) * 0.5, _plain(12).reshape(4, 3) - 1.0
    y = torch.tensor([0, 1, 1, 0])
    gn.ssgan_critic_loss(lab, y, unl, fak)
    assert len(plans) == 1
    assert plans.run(("ssgan_critic_loss", "mean", True), (lab, y, unl, fak)) is not None
    bad = torch.tensor([0, 1, 2, 0])  # 2: the fake class
    assert plans.run(("ssgan_critic_loss", "mean", True), (lab, bad, unl, fak)) is None
    with pytest.raises(ValueError, match="labels must lie in"):
        gn.ssgan_critic_loss(lab, bad, unl, fak)


def test_a_derived_array_is_never_taken_for_an_allocation(plans):
    """A plan names buffers by address. A derived array (here 2 x, computed by torch) that a
    call reads and that is freed before an output is allocated could leave its address to that
    output; taken for the output, the plan would read an uninitialised array where the Python
    path read 2 x. The recording keeps every array the composition made alive until the plan is
    recorded, so the derived array keeps its own address and the recording is refused."""

    def loss(x):
        def compose():
            b = _engine.as_input(x, "x")
            twice = _engine.as_input(x * 2.0, "twice")  # derived: a plan cannot compute it
            value = _engine.empty(b, ())
            _engine.map_reduce("Linear", twice, out=value)
            del twice  # its array is freed here but for the recording
            g = _engine.empty(b, x.shape)  # the size of the derived array
            _engine.map_reduce("Linear", b, grads=[g])
            return value.arr, (g.arr,)

        return _compose.cached(("derived",), (x,), compose)

    for n in range(1, 4):
        x = torch.full((1 << 16,), float(n))  # blocks of 256 KiB: freed ones are handed out again
        value, (g,) = loss(x)
        assert float(value) == 2.0 * (1 << 16) * n
        assert torch.equal(g, torch.ones(1 << 16))
    assert len(plans) == 0
    # what makes it so whatever the allocator does: the recording holds what it made
    with _engine.Recording() as rec:
        derived = _engine.as_input(torch.ones(8) * 2.0, "derived")
        alive = weakref.ref(derived.arr)
        del derived
        assert alive() is not None
    del rec
    assert alive() is None


def test_returned_arrays_must_be_the_compositions_own(plans):
    """A plan allocates its outputs itself: a recording whose result is not an array the
    composition allocated (here an input's view), or that names an allocation it was not told
    of, is refused."""
    x = _plain(8)
    out = torch.empty(())
    call = _C.Call(functor="Linear", ins=[x.data_ptr()], rows=8, cols=1, out_value=out.data_ptr())
    assert not plans.add(("not allocated",), (x,), [call], (out, ()), None, [])
    assert plans.add(("allocated",), (x,), [call], (out, ()), None, [out])
    scratch = torch.empty(8)
    copy = _C.Call(functor="Linear", ins=[scratch.data_ptr()], rows=8, cols=1, out_value=out.data_ptr())
    assert not plans.add(("unknown scratch",), (x,), [copy], (out, ()), None, [out])
    assert plans.add(("known scratch",), (x,), [copy], (out, ()), None, [out, scratch])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_broadcast_parameters_run_on_plans(spy, dtype):
    """Per-feature (F,) and per-sample (B, 1) parameters, which the engine broadcasts (col_broadcast,
    row_scale of ones) and whose gradients it sums back (col_sum, per-row sums): the second call is
    served by the plan, both equal the Python path bit for bit, and the reference."""
    rng = np.random.default_rng(3)
    b, f = 9, 5

    def r(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    by_name = {(rec.name, v.id, red): (rec, v, red) for rec, v, red in CASES}
    cases = [
        (("gaussian_nll", "default", "mean"), (r(b, f), r(b, f), r(b, 1, scale=0.3))),
        (("gaussian_nll", "default", "none"), (r(b, f), r(b, f), r(1, f, scale=0.3))),
        (("normal_kl", "default", None), (r(b, 1), r(f, scale=0.3), r(b, f), r(b, 1, scale=0.3))),
        (("discretized_gaussian_log_likelihood", "default", None),
         (np.clip(r(b, f), -1, 1), r(b, f, scale=0.5), r(b, 1, scale=0.3) - 3)),
    ]  # fmt: skip
    for key, inputs in cases:
        record, variant, reduction = by_name[key]
        tensors = tuple(torch.from_numpy(x) for x in inputs)
        kwargs = R.call_kwargs(record, variant, reduction)
        fast_spy = spy(off=False)
        first = _run(record, tensors, kwargs, True)
        fast = _run(record, tensors, kwargs, True)
        spy(off=True)
        slow = _run(record, tensors, kwargs, True)
        label = f"{key} shapes {[x.shape for x in inputs]}"
        assert fast_spy.served == 1, f"{label}: the plan did not serve the second call"
        _same(label, first, slow)
        _same(label, fast, slow)
        check_against_reference(record, variant, reduction, inputs, dtype, values=(fast[0], fast[1:]))


_RACE = """
import sys, threading, time
import torch
import genloss.native as gn

torch.manual_seed(0)
real, fake = torch.randn(64), torch.randn(64)
want_v, want_g = gn.gan_d_loss(real, fake)
want_v, want_g = want_v.clone(), [g.clone() for g in want_g]
stop, bad = False, [0]


def replay():  # one plan, replayed
    while not stop:
        v, g = gn.gan_d_loss(real, fake)
        if not (torch.equal(v, want_v) and all(torch.equal(a, b) for a, b in zip(g, want_g))):
            bad[0] += 1


def churn():  # more than kMaxPlans shapes: add() keeps clearing the cache
    k = 1
    while not stop:
        gn.wgan_g_loss(torch.zeros(k), "mean", need_grad=False)
        k = k + 1 if k < 3000 else 1


threads = [threading.Thread(target=replay), threading.Thread(target=churn)]
for t in threads:
    t.start()
time.sleep(float(sys.argv[1]))
stop = True
for t in threads:
    t.join()
print("bad", bad[0])
"""


def test_a_plan_outlives_a_concurrent_clear(tmp_path):
    """A replay holds its plan for the whole call: torch's allocations release the GIL, and
    another thread's add() may clear the cache (past 1,024 plans) meanwhile. When run() held a
    raw pointer, this freed the plan under it: wrong values (seen as 1.5e16 for 1.59 with
    MALLOC_PERTURB_) and then a segfault. Run in a child so that a crash is a failure here."""
    import os
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(_RACE)
    # freed memory overwritten at once (no tcache): a use-after-free reads garbage, not old bits
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "MALLOC_PERTURB_": "165"}
    done = subprocess.run(
        [sys.executable, str(script), "6"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"child died (rc {done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.split()[-2:] == ["bad", "0"], done.stdout
