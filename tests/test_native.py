r"""The native engine (``genloss.native``) against the float64 NumPy reference.

Registry-driven: every record with a native version, every variant and reduction.

* values and EVERY gradient = reference (float32 and float64), on odd shapes, B = 1,
  3-D trailing dims (explicit examples) and hypothesis-drawn shapes and values;
* non-contiguous inputs (strided and transposed NumPy views, torch tensors);
* extreme inputs (logits +-1e4, log-variances +-30, ...): finite and equal to the reference;
* determinism: bitwise the same for 1 and 2 threads and across runs, on inputs large
  enough for the engine to go parallel;
* array kind in = kind out, value dtype = input dtype, value shape = the reference's;
* bad input: a ValueError/TypeError naming the argument (native and reference): shapes
  that do not match or broadcast, dtypes, empty batches, non-finite or out-of-range
  hyperparameters, values outside an argument's domain, invalid combinations;
* ``need_grad=False``: empty grads, the same value.

The native functions return the gradients of ``sum(value)``; the oracle is therefore
the reference backward with ``grad_output`` = 1 (a scalar) or ones of the value's shape
('none', elementwise).  Value-only ops (no gradient) are compared on the value alone.
Records are specialised to each variant (``record.at(variant)``): the arguments of that call.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from genloss import registry as R
from strategies import seed_of as _seed
from strategies import sizes as _sizes
from tolerances import assert_all_finite, assert_close, value_scale

torch = pytest.importorskip("torch")  # for the torch-tensor inputs; genloss.native itself never imports it
pytest.importorskip("genloss._C")
import genloss.native as gn  # noqa: E402

NATIVE_RECORDS = tuple(r for r in R.RECORDS if r.has_native)
NATIVE_CASES = list(R.cases(NATIVE_RECORDS))
CASE_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in NATIVE_CASES]
DTYPES = [np.float32, np.float64]


def _as64(inputs):
    return tuple(x.astype(np.float64) if x.dtype.kind == "f" else x for x in inputs)


def reference_value_and_grads(record, inputs, kwargs):
    """The oracle: reference value and the gradients of sum(value), float64."""
    x64 = _as64(inputs)
    value = record.reference(*x64, **kwargs)
    value = np.asarray(value if record.value_index is None else value[record.value_index])
    if record.reference_backward is None:  # a value-only op
        return value, ()
    ones = np.ones(value.shape) if value.ndim else 1.0
    return value, record.reference_backward(*x64, ones, **kwargs)


def check_against_reference(
    record, variant, reduction, inputs, dtype, kind="native", what="", *, values=None
):
    kwargs = R.call_kwargs(record, variant, reduction)
    value, grads = record.native(*inputs, **kwargs) if values is None else values
    ref_value, ref_grads = reference_value_and_grads(record, inputs, kwargs)
    label = f"{record.name}({variant.id}, {reduction}){what}"
    scale = value_scale(inputs, reduction, ref_value)
    assert_close(value, ref_value, kind, dtype, label + " value", scale=scale)
    assert len(grads) == len(ref_grads) == len(record.differentiable), label
    for name, g, rg in zip(record.differentiable, grads, ref_grads, strict=True):
        gs = R.grad_scale(record, name, inputs, reduction, rg)
        assert_close(g, rg, kind, dtype, f"{label} d/d{name}", scale=gs)


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("record", "variant", "reduction"), NATIVE_CASES, ids=CASE_IDS)
@given(sizes=_sizes(max_batch=50, max_dim=7), seed=st.integers(0, 2**32 - 1))
@example(sizes=R.ODD_SIZES[0], seed=0)  # (41, 7), two populations 41 / 13
@example(sizes=R.ODD_SIZES[1], seed=1)  # B = 1, no trailing dims
@example(sizes=R.ODD_SIZES[2], seed=2)  # trailing (3, 2, 5)
def test_native_matches_reference(record, variant, reduction, dtype, sizes, seed):
    inputs = R.make_inputs(record, np.random.default_rng(seed), dtype, sizes, variant)
    check_against_reference(record, variant, reduction, inputs, dtype)


# Rows longer than the engine's chunk (4096) and more elements than its parallel threshold
# (2^15): the multi-chunk per-row partials and the threaded path, against the reference.
LONG = dict(B=9, Br=9, Bf=5, Bl=9, Bu=5, Ba=9, Bb=5, K=4099, F=4099, O=9, I=4099)
LONG.update({"...": (4099,), "...2": (3, 1367)})  # (record ``caps`` may lower a size: the GMM's K)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("record", "variant", "reduction"), NATIVE_CASES, ids=CASE_IDS)
def test_native_matches_reference_long_rows(record, variant, reduction, dtype):
    sizes = R.capped(record, LONG)
    inputs = R.make_inputs(record, np.random.default_rng(_seed(record.name, "long")), dtype, sizes, variant)
    with num_threads(2):
        check_against_reference(record, variant, reduction, inputs, dtype, what=" [long rows]")


def test_gmm_logit_gradient_that_cancels():
    """A component with pi_k ~ 1 (logit 36 against O(1)): d/dlogits_k = sum_n (r_nk - pi_k) is a sum
    of 50 terms of size ~1 that cancel to ~1e-9.  Both implementations err by ~50 eps there; the
    record's ``bounded_sums`` makes the check judge it on that scale (found by the 'dev' profile)."""
    record = R.by_name("gmm_log_likelihood")
    sizes = {**R.ODD_SIZES[0], "B": 50, "K": 4, "F": 4}
    inputs = R.make_inputs(record, np.random.default_rng(7), np.float64, sizes)
    assert np.max(inputs[1]) - np.sort(inputs[1])[-2] > 30  # one dominant component
    _, ref_grads = reference_value_and_grads(record, inputs, {"reduction": "sum"})
    assert 0 < abs(ref_grads[1]).max() < 1e-8  # the cancelled sum
    assert R.grad_scale(record, "logits", inputs, "sum", ref_grads[1]) == 50
    assert R.grad_scale(record, "logits", inputs, "mean", ref_grads[1]) == 1
    check_against_reference(record, R.DEFAULT, "sum", inputs, np.float64, what=" [dominant component]")


LOOSE_RECORDS = [r for r in NATIVE_RECORDS if "..." in r.loose]


@pytest.mark.parametrize("record", LOOSE_RECORDS, ids=lambda r: r.name)
def test_two_populations_may_have_different_trailing_dims(record):
    """Symbols listed as ``loose`` need not match: two populations reduced separately may have
    different trailing dims (real (B_r, 3, 2, 5) and fake (B_f, 3, 2, 6))."""
    for variant in record.variants:
        if "..." not in record.loose_symbols(variant):
            continue
        inputs = R.make_inputs(record, np.random.default_rng(12), np.float64, BASE_SIZES, variant)
        inputs, _ = _resize(record.args[-1].name, "...")(record, inputs, {})
        inputs = (
            *inputs[:-1],
            inputs[-1] + np.linspace(-2.0, 2.0, inputs[-1].size).reshape(inputs[-1].shape),
        )
        for reduction in record.reductions or (None,):
            check_against_reference(
                record, variant, reduction, inputs, np.float64, what=" [different trailing dims]"
            )


def test_int32_labels():
    """Labels may be int32 as well as int64 (SPEC: integer inputs)."""
    record = R.by_name("ssgan_critic_loss")
    for dtype in DTYPES:
        inputs = R.make_inputs(record, np.random.default_rng(7), dtype, R.ODD_SIZES[0])
        i = record.arg_names.index("labels")
        as32 = (*inputs[:i], inputs[i].astype(np.int32), *inputs[i + 1 :])
        for reduction in record.reductions:
            kwargs = R.call_kwargs(record, R.DEFAULT, reduction)
            check_against_reference(
                record,
                R.DEFAULT,
                reduction,
                inputs,
                dtype,
                what=" [int32 labels]",
                values=record.native(*as32, **kwargs),
            )


def _strided(x: np.ndarray) -> np.ndarray:
    """The same values as a non-contiguous view: every other element of a twice-as-wide buffer."""
    if x.ndim == 0:
        return x
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    big[..., ::2] = x
    view = big[..., ::2]
    assert not view.flags.c_contiguous or x.size <= 1
    return view


def _transposed(x: np.ndarray) -> np.ndarray:
    """The same values as a non-contiguous view: the transpose of a C-contiguous transpose."""
    if x.ndim < 2:
        return _strided(x)
    return np.ascontiguousarray(x.T).T


def _torch_strided(x: np.ndarray):
    if x.ndim == 0:
        return torch.from_numpy(x.copy())
    big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=torch.from_numpy(x[:0]).dtype)
    big[..., ::2] = torch.from_numpy(np.ascontiguousarray(x))
    return big[..., ::2]


def _torch_transposed(x: np.ndarray):
    if x.ndim < 2:
        return _torch_strided(x)
    rev = tuple(range(x.ndim - 1, -1, -1))
    return torch.from_numpy(np.ascontiguousarray(x.T)).permute(rev)


LAYOUTS = {
    "numpy-strided": _strided,
    "numpy-transposed": _transposed,
    "torch-strided": _torch_strided,
    "torch-transposed": _torch_transposed,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("record", NATIVE_RECORDS, ids=lambda r: r.name)
def test_native_noncontiguous(record, layout):
    variant = record.variants[-1]
    record = record.at(variant)
    for si, sizes in enumerate((R.ODD_SIZES[0], R.ODD_SIZES[2])):
        for dtype in DTYPES:
            inputs = R.make_inputs(
                record, np.random.default_rng(_seed(record.name, si)), dtype, sizes, variant
            )
            views = tuple(LAYOUTS[layout](x) for x in inputs)
            for reduction in record.reductions or (None,):
                kwargs = R.call_kwargs(record, variant, reduction)
                value, grads = record.native(*views, **kwargs)
                check_against_reference(
                    record, variant, reduction, inputs, dtype, what=f" [{layout}]", values=(value, grads)
                )


# ----------------------------------------------------------------------------- extreme logits

EXTREME_CASES = [c for c in NATIVE_CASES if R.extreme_ok(c[0], c[1])]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    ("record", "variant", "reduction"),
    EXTREME_CASES,
    ids=[f"{r.name}-{v.id}-{red}" for r, v, red in EXTREME_CASES],
)
def test_extreme_logits_finite(record, variant, reduction, dtype):
    """About a quarter of the entries of every floating input at its domain's extreme (+-1e4
    for logits and log-weights, +-30 for log-variances, means and Gaussian data): value and
    gradients finite, and equal to the reference (which uses the stable forms in float64)."""
    for si, sizes in enumerate((R.ODD_SIZES[0], R.ODD_SIZES[2])):
        rng = np.random.default_rng(_seed(record.name, variant.id, si))
        inputs = R.make_inputs(record, rng, dtype, sizes, variant, extreme=True)
        assert any(
            x.size and np.abs(x).max() == R.extreme_value(record, a.name)
            for a, x in zip(record.args, inputs, strict=True)
        )
        kwargs = R.call_kwargs(record, variant, reduction)
        value, grads = record.native(*inputs, **kwargs)
        assert_all_finite(value, f"{record.name} value at the extremes")
        for name, g in zip(record.differentiable, grads, strict=True):
            assert_all_finite(g, f"{record.name} d/d{name} at the extremes")
        check_against_reference(
            record,
            variant,
            reduction,
            inputs,
            dtype,
            "extreme",
            f" [extremes, sizes {si}]",
            values=(value, grads),
        )


# ----------------------------------------------------------------------------- determinism

BIG = dict(B=300, Br=300, Bf=300, Bl=300, Bu=300, Ba=300, Bb=300, K=200, F=200, O=300, I=200)
BIG.update({"...": (200,), "...2": (200,)})  # 60,000 elements per array: above the parallel threshold


def num_threads(n: int):
    return gn.options(threads=n)


def _bits(value, grads) -> list[bytes]:
    return [np.ascontiguousarray(a).tobytes() for a in (value, *grads)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("record", NATIVE_RECORDS, ids=lambda r: r.name)
def test_deterministic_across_threads_and_runs(record, dtype):
    for variant in record.variants:
        record = record.at(variant)
        sizes = R.capped(record, BIG)
        inputs = R.make_inputs(
            record, np.random.default_rng(_seed(record.name, "big")), dtype, sizes, variant
        )
        for reduction in record.reductions or (None,):
            kwargs = R.call_kwargs(record, variant, reduction)
            with num_threads(1):
                one = _bits(*record.native(*inputs, **kwargs))
            with num_threads(2):
                two = [_bits(*record.native(*inputs, **kwargs)) for _ in range(3)]
            label = f"{record.name}({variant.id}, {reduction})"
            with num_threads(2):  # and the parallel result is the right one
                check_against_reference(
                    record, variant, reduction, inputs, dtype, what=" [300 x 200, 2 threads]"
                )
            for k, run in enumerate(two):
                for i, (a, b) in enumerate(zip(one, run, strict=True)):
                    what = "value" if i == 0 else f"d/d{record.differentiable[i - 1]}"
                    assert a == b, f"{label} {what}: 2 threads (run {k}) differs bitwise from 1 thread"


def test_parallel_path_is_taken():
    """The determinism test is only meaningful if the engine runs >1 thread at that size."""
    info = pytest.importorskip("genloss").build_info()
    if not info["openmp"]:
        pytest.skip("built without OpenMP")
    with num_threads(2):
        assert gn.options()["threads"] == 2


# ----------------------------------------------------------------------------- array kinds and dtypes


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("record", NATIVE_RECORDS, ids=lambda r: r.name)
def test_array_kind_and_dtype_round_trip(record, dtype, kind):
    record = record.at(record.variants[0])
    inputs = R.make_inputs(record, np.random.default_rng(3), dtype, R.ODD_SIZES[2], record.variants[0])
    numpy_inputs = inputs
    if kind == "torch":
        inputs = tuple(torch.from_numpy(x) for x in inputs)
    array_type = torch.Tensor if kind == "torch" else np.ndarray
    want_dtype = getattr(torch, np.dtype(dtype).name) if kind == "torch" else np.dtype(dtype)
    for reduction in record.reductions or (None,):
        kwargs = R.call_kwargs(record, record.variants[0], reduction)
        value, grads = record.native(*inputs, **kwargs)
        want = record.reference(*_as64(numpy_inputs), **kwargs)
        want_shape = np.shape(want if record.value_index is None else want[record.value_index])
        assert type(value) is array_type, f"{record.name}: {kind} in, {type(value).__name__} out"
        assert value.dtype == want_dtype, f"{record.name}: value dtype {value.dtype} for {dtype} input"
        assert tuple(value.shape) == want_shape, f"{record.name}: value shape {value.shape} != {want_shape}"
        assert len(grads) == len(record.differentiable)
        for name, g in zip(record.differentiable, grads, strict=True):
            x = inputs[record.arg_names.index(name)]
            assert type(g) is array_type and g.dtype == want_dtype and tuple(g.shape) == tuple(x.shape), (
                f"{record.name} d/d{name}: {type(g).__name__} {g.dtype} {tuple(g.shape)}"
            )


def test_torch_inputs_requiring_grad_are_accepted():
    """A tensor that requires grad (refused by __dlpack__) is read through .detach()."""
    record = R.by_name("gan_d_loss")
    inputs = R.make_inputs(record, np.random.default_rng(4), np.float64, R.ODD_SIZES[0])
    tensors = tuple(torch.from_numpy(x).requires_grad_(True) for x in inputs)
    value, grads = record.native(*tensors)
    check_against_reference(record, R.DEFAULT, "mean", inputs, np.float64, values=(value, grads))


@pytest.mark.parametrize("record", NATIVE_RECORDS, ids=lambda r: r.name)
def test_need_grad_false(record):
    for variant in record.variants:
        record = record.at(variant)
        for dtype in DTYPES:
            inputs = R.make_inputs(record, np.random.default_rng(5), dtype, R.ODD_SIZES[0], variant)
            for reduction in record.reductions or (None,):
                kwargs = R.call_kwargs(record, variant, reduction)
                value, grads = record.native(*inputs, **kwargs, need_grad=False)
                assert grads == (), f"{record.name}: need_grad=False returned {len(grads)} gradients"
                full, _ = record.native(*inputs, **kwargs)
                label = f"{record.name}({variant.id}, {reduction}) need_grad=False"
                ref, _ = reference_value_and_grads(record, inputs, kwargs)
                scale = value_scale(inputs, reduction, ref)
                assert_close(value, full, "native", dtype, label + " vs need_grad=True", scale=scale)
                assert_close(value, ref, "native", dtype, label + " vs reference", scale=scale)


GRAD_CASES = [c for c in NATIVE_CASES if c[0].differentiable]


@pytest.mark.parametrize(
    ("record", "variant", "reduction"), GRAD_CASES, ids=[f"{r.name}-{v.id}-{red}" for r, v, red in GRAD_CASES]
)
def test_need_grad_per_input(record, variant, reduction):
    """need_grad as one flag per differentiable input: exactly the asked gradients come back
    (None for the others) and each equals the reference (the relativistic losses' cross terms
    through the means must not depend on which gradients are asked for)."""
    n = len(record.differentiable)
    dtype = np.float64
    inputs = R.make_inputs(
        record, np.random.default_rng(_seed(record.name, "mask")), dtype, R.ODD_SIZES[0], variant
    )
    kwargs = R.call_kwargs(record, variant, reduction)
    ref_value, ref_grads = reference_value_and_grads(record, inputs, kwargs)
    masks = [tuple(i == j for j in range(n)) for i in range(n)] + [(False,) * n]
    for mask in masks:
        value, grads = record.native(*inputs, **kwargs, need_grad=mask)
        label = f"{record.name}({variant.id}, {reduction}) need_grad={mask}"
        assert_close(
            value, ref_value, "native", dtype, label, scale=value_scale(inputs, reduction, ref_value)
        )
        if not any(mask):
            assert grads == (), label
            continue
        assert len(grads) == n, label
        for name, want, g, rg in zip(record.differentiable, mask, grads, ref_grads, strict=True):
            if want:
                assert_close(g, rg, "native", dtype, f"{label} d/d{name}")
            else:
                assert g is None, f"{label}: d/d{name} computed though not asked for"


# ----------------------------------------------------------------------------- bad input


def _bad_cases(record: R.OpRecord):
    """(id, layers, variant, mutate, exception types, names one of which the message must contain).

    ``mutate(record, inputs, kwargs) -> (inputs, kwargs)`` breaks one thing in a valid call of
    ``record.at(variant)`` (the test passes the specialised record).
    ``layers``: which layers must refuse it (the reference converts any real array to
    float64 on purpose, so dtype errors are native-only).
    """
    both = ("native", "reference")
    default = record.variants[0]
    spec = record.at(default)
    if record.reductions:
        yield "reduction-unknown", both, default, _set("reduction", "avg"), ValueError, ["reduction"]
        if "none" not in record.reductions:
            yield "reduction-none", both, default, _set("reduction", "none"), ValueError, ["reduction"]
    # shapes: every symbol the op requires to match, changed for each argument that has it but the
    # first (the message may name either side of the mismatch)
    seen = set()
    for variant in record.variants:
        v_args = record.at(variant).args
        ties = dict(variant.same)
        effective = {a.name: tuple(ties.get(s, s) for s in a.shape) for a in v_args}
        loose = set(record.loose_symbols(variant))
        for sym in dict.fromkeys(s for shape in effective.values() for s in shape):
            holders = [a.name for a in v_args if sym in effective[a.name]]
            if len(holders) < 2 or sym in loose or sym.isdigit():
                continue
            for target in holders[1:]:
                key = (sym, tuple(holders), target, effective[target])
                if key in seen:
                    continue
                seen.add(key)
                yield (
                    f"mismatch-{sym}-{target}-{variant.id}",
                    both,
                    variant,
                    _resize(target, sym),
                    ValueError,
                    holders,
                )
    for a in spec.args:
        if a.broadcast:  # fewer or extra leading dims, 0-d: valid for a broadcast parameter
            continue
        if not any(s.startswith("...") for s in a.shape):  # a fixed number of dims: one more is wrong
            yield (
                f"ndim-{a.name}",
                both,
                default,
                _replace(a.name, lambda x: x[..., None]),
                ValueError,
                [a.name],
            )
        if not a.shape:  # already 0-d (a scalar state): there is no "0-d" mutation of it
            continue
        yield (
            f"0d-{a.name}",
            both,
            default,
            _replace(a.name, lambda x: np.asarray(x.flat[0])),
            ValueError,
            [a.name],
        )
    # dtypes: every floating argument, in the first variant that has it (an optional one too)
    dtype_seen = set()
    for variant in record.variants:
        floats = record.at(variant).float_args
        for a in floats:
            if a.name in dtype_seen:
                continue
            dtype_seen.add(a.name)
            to_int, to_half = (
                _replace(a.name, lambda x: x.astype(np.int64)),
                _replace(a.name, lambda x: x.astype(np.float16)),
            )
            yield f"int-dtype-{a.name}", ("native",), variant, to_int, TypeError, [a.name]
            # float16 is a storage dtype: one float16 input among float64 ones mixes dtypes (the
            # per-sample weights of the diffusion MSEs are cast to the data's dtype instead)
            if len(floats) >= 2 and (record.name, a.name) not in CAST_ARGS:
                yield f"float16-{a.name}", ("native",), variant, to_half, TypeError, [a.name]
    floats = spec.float_args
    if len(floats) >= 2:
        last = floats[-1].name
        to_f32 = _replace(last, lambda x: x.astype(np.float32))
        yield f"mixed-dtype-{last}", ("native",), default, to_f32, TypeError, [last]
    # an empty batch where a mean is asked (an op without a reduction argument = batch means;
    # an elementwise op has no mean)
    if not record.elementwise and (not record.reductions or "mean" in record.reductions):
        sym = spec.args[0].shape[0]
        holders = [a.name for a in spec.args if sym in a.shape]
        yield f"empty-batch-{sym}", both, default, _resize(None, sym, new=0), ValueError, holders
    for h in record.hypers:
        if h.kind == "real":
            for bad in (float("nan"), float("inf"), -float("inf")):
                yield f"{h.name}={bad}", both, default, _set(h.name, bad), ValueError, [h.name]
            if h.low is not None:
                yield f"{h.name}<{h.low}", both, default, _set(h.name, h.low - 0.5), ValueError, [h.name]
        elif h.kind == "choice":
            yield f"{h.name}=bogus", both, default, _set(h.name, "bogus"), ValueError, [h.name]
        elif h.kind == "flag":
            yield f"{h.name}=1", both, default, _set(h.name, 1), TypeError, [h.name]
        elif h.kind == "int":
            yield f"{h.name}=0", both, default, _set(h.name, 0), ValueError, [h.name]
    # values outside an argument's domain (Bernoulli targets outside [0, 1], NaN)
    for a in spec.args:
        for bad in R.DOMAINS[a.domain].invalid:
            yield f"{a.name}={bad}", both, default, _set_entry(a.name, bad), ValueError, [a.name]
    # invalid combinations the record lists (recon_logvar with a Bernoulli likelihood)
    for variant, name in record.rejects:
        yield f"reject-{variant.id}", both, variant, lambda r, i, k: (i, k), ValueError, [name]
    for a in spec.args:
        if a.domain == "labels":  # labels in [0, C); C = K - 1 is the fake class
            fake, neg = (
                _labels(a.name, lambda y, k: np.full_like(y, k - 1)),
                _labels(a.name, lambda y, k: y - 1 - y),
            )
            yield "labels-fake-class", both, default, fake, ValueError, [a.name]
            yield "labels-negative", both, default, neg, ValueError, [a.name]
            yield (
                "labels-float",
                both,
                default,
                _replace(a.name, lambda y: y.astype(np.float64)),
                TypeError,
                [a.name],
            )
        if a.domain == "timesteps":  # t in [0, T) of the variant's schedule
            yield (
                "t-past-the-end",
                both,
                default,
                _timestep(a.name, lambda t, T: np.full_like(t, T)),
                ValueError,
                [a.name],
            )
            yield "t-negative", both, default, _timestep(a.name, lambda t, T: t - 1 - t), ValueError, [a.name]
            yield (
                "t-float",
                both,
                default,
                _replace(a.name, lambda t: t.astype(np.float64)),
                TypeError,
                [a.name],
            )


def _set_entry(name, value):
    """One entry (the last) of argument ``name`` set to ``value``."""

    def fn(x):
        x = x.copy()
        x.flat[-1] = value
        return x

    return _replace(name, fn)


# Arguments the native op converts to its data's dtype (python/genloss/native/diffusion.py,
# ``_row_vector(..., cast=True)``): any float dtype is accepted there.
CAST_ARGS = {("eps_mse_loss", "weights"), ("diffusion_mse_loss", "weights")}


def _replace(name, fn):
    def mutate(record, inputs, kwargs):
        i = record.arg_names.index(name)
        return (*inputs[:i], fn(inputs[i]), *inputs[i + 1 :]), kwargs

    return mutate


def _set(key, value):
    return lambda record, inputs, kwargs: (inputs, {**kwargs, key: value})


def _labels(name, fn):
    def mutate(record, inputs, kwargs):
        i = record.arg_names.index(name)
        k = inputs[record.arg_names.index("labeled_logits")].shape[1]
        return (*inputs[:i], fn(inputs[i], k), *inputs[i + 1 :]), kwargs

    return mutate


def _timestep(name, fn):
    def mutate(record, inputs, kwargs):
        i = record.arg_names.index(name)
        return (*inputs[:i], fn(inputs[i], kwargs["schedule"].num_timesteps), *inputs[i + 1 :]), kwargs

    return mutate


def _resize(name, sym, new=None):
    """Regenerate argument ``name`` (every argument using ``sym`` when name is None) with the
    size of ``sym`` changed: +1 (a trailing group: its last dim +1, or one dim of 2), or ``new``."""

    def mutate(record, inputs, kwargs):
        sizes = dict(BASE_SIZES)
        if sym.startswith("..."):
            dims = sizes[sym]
            sizes[sym] = (*dims[:-1], dims[-1] + 1) if dims else (2,)
        else:
            sizes[sym] = sizes[sym] + 1 if new is None else new
        out = list(inputs)
        for i, a in enumerate(record.args):
            if a.name == name or (name is None and sym in a.shape):
                shape = R.resolve_shapes(record, sizes)[a.name]
                if R.DOMAINS[a.domain].kind == "int":
                    out[i] = np.zeros(shape, dtype=np.int64)
                else:
                    out[i] = np.full(shape, 0.5, dtype=inputs[i].dtype)
        return tuple(out), kwargs

    return mutate


BASE_SIZES = R.ODD_SIZES[2]
BAD_CASES = [
    (record, layer, variant, mutate, exc, names, case_id)
    for record in R.RECORDS
    for case_id, layers, variant, mutate, exc, names in _bad_cases(record)
    for layer in layers
    if layer != "native" or record.has_native
]


@pytest.mark.parametrize(
    ("record", "layer", "variant", "mutate", "exc", "names", "case_id"),
    BAD_CASES,
    ids=[f"{c[0].name}-{c[1]}-{c[6]}" for c in BAD_CASES],
)
def test_bad_input_names_the_argument(record, layer, variant, mutate, exc, names, case_id):
    record = record.at(variant)
    inputs = R.make_inputs(record, np.random.default_rng(6), np.float64, BASE_SIZES, variant)
    kwargs = R.call_kwargs(record, variant, record.reductions[0] if record.reductions else None)
    inputs, kwargs = mutate(record, inputs, kwargs)
    fn = record.native if layer == "native" else record.reference
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*inputs, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, exc), (
        f"{case_id}: expected {exc.__name__}, got {type(info.value).__name__}: {message}"
    )
    assert any(n in message for n in names), f"{case_id}: message does not name {names}: {message!r}"
    assert record.name in message, f"{case_id}: message does not name the op: {message!r}"


def test_exports_come_from_the_family_modules():
    """genloss.native lists no op by hand: it exports every function that a native family
    module defines under a name of the reference family's ``__all__``, and nothing else
    (no helper or import of the family modules leaks into the package)."""
    import inspect

    import genloss.reference as gr

    families = {n for n in gr.__all__ if inspect.ismodule(getattr(gr, n))}
    ops = [n for n in gn.__all__ if n not in families and n not in ("cache_info", "empty_cache", "options")]
    for name in ops:
        fn = getattr(gn, name)
        family = fn.__module__.rsplit(".", 1)[-1]
        assert family in families and name in getattr(gr, family).__all__, name
        assert getattr(getattr(gn, family), name) is fn, name  # the family module's own (wrapped) function
    assert {r.name for r in R.RECORDS if r.has_native} <= set(ops)
    for family in families:  # every op a family module defines under a reference name is exported
        module = getattr(gn, family)
        defined = {
            n
            for n in getattr(gr, family).__all__
            if getattr(getattr(module, n, None), "__module__", "") == module.__name__
        }
        assert defined <= set(ops), family
    assert not {"np", "C", "R", "Buf", "math", "Any"} & set(vars(gn)), "a family module's helper leaked"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("need_grad", [True, False, (True, False), (False, True)])
def test_relativistic_sums_in_memory_equal_host_sums(reduction, need_grad):
    """The relativistic losses hand the means and derivative sums between their passes as host
    floats on the CPU and through memory on CUDA (the stream never waits; a graph captures it).
    Forced onto the CPU, the memory path gives bitwise the host path's value and gradients: the
    same kernels, the same products (scale * sum) in double."""
    from genloss.native.gan import _relativistic

    rng = np.random.default_rng(3)
    r, f = rng.normal(size=(37, 5)), rng.normal(size=(19, 5)) + 0.5
    args = (r, f, "real_logits", "fake_logits", True, reduction, need_grad)
    v_host, g_host = _relativistic(*args, memory=False)
    v_mem, g_mem = _relativistic(*args, memory=True)
    assert np.array_equal(v_host, v_mem)
    assert len(g_host) == len(g_mem)
    for a, b in zip(g_host, g_mem, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
