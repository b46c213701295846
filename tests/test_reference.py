r"""The NumPy reference backward = central finite differences of the reference forward (float64).

Registry-driven: every (record, variant, reduction) of ``genloss.registry`` is checked,
with hypothesis drawing the shapes (odd sizes, B = 1, 0 to 3 trailing dims) and the
values (from each argument's domain, kept ``KINK_MARGIN`` away from kinks).  The
upstream gradient is random: a scalar for 'mean'/'sum', a (B,) vector for 'none', so
the test covers the chain rule through the reduction, not just ones.

Independent direct formulas for the VALUES live in tests/test_gan_identities.py.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from genloss import reference
from genloss import registry as R
from tolerances import assert_close

FD_STEP = 1e-6  # relative: the step for x is FD_STEP * max(1, |x|)
FD_MAX_BATCH = 5
FD_MAX_DIM = 3


def _sizes(max_batch: int, max_dim: int, max_trailing: int = 3) -> st.SearchStrategy[dict]:
    """Sizes for every shape symbol of the registry (trailing groups: 0..max_trailing dims)."""
    return st.fixed_dictionaries(
        {
            **{s: st.integers(1, max_batch) for s in R.BATCH_SYMBOLS},
            **{s: st.integers(1, max_dim) for s in R.DIM_SYMBOLS},
            "K": st.integers(2, max_dim + 1),
            **{
                g: st.lists(st.integers(1, max_dim), max_size=max_trailing).map(tuple)
                for g in R.GROUP_SYMBOLS
            },
        }
    )


def _value(record, inputs, kwargs):
    out = record.reference(*inputs, **kwargs)
    return out if record.value_index is None else out[record.value_index]


def finite_difference(record, inputs, kwargs, which: int, weights) -> np.ndarray:
    r"""d/dx sum(weights * f(x)) for the input ``which``, by central differences, entry by entry.

    .. math:: \partial_i F \approx \frac{F(x + h e_i) - F(x - h e_i)}{(x_i + h) - (x_i - h)}

    (the denominator is the step actually taken in floating point).  Within ``h`` of an end
    of a closed domain (Bernoulli targets at exactly 0 or 1) the step cannot cross it: the
    one-sided second-order formula, stepping inwards (``s`` = +-1), is used instead:

    .. math:: \partial_i F \approx s\,\frac{-3F(x) + 4F(x + s h e_i) - F(x + 2 s h e_i)}{2h}
    """
    inputs = list(inputs)
    x = inputs[which].copy()
    inputs[which] = x
    bounds = R.DOMAINS[record.args[which].domain].bounds
    lo, hi = bounds if bounds is not None else (-np.inf, np.inf)

    def f():
        return float(np.sum(weights * _value(record, inputs, kwargs)))

    grad = np.empty_like(x)
    for i in range(x.size):
        x0 = x.flat[i]
        h = FD_STEP * max(1.0, abs(x0))
        if x0 - h < lo or x0 + h > hi:
            s = 1.0 if x0 - h < lo else -1.0
            f0 = f()
            x.flat[i] = x0 + s * h
            step, f1 = x.flat[i] - x0, f()
            x.flat[i] = x0 + 2 * step
            f2 = f()
            x.flat[i] = x0
            grad.flat[i] = (-3.0 * f0 + 4.0 * f1 - f2) / (2.0 * step)
            continue
        x.flat[i] = x0 + h
        xp, fp = x.flat[i], f()
        x.flat[i] = x0 - h
        xm, fm = x.flat[i], f()
        x.flat[i] = x0
        grad.flat[i] = (fp - fm) / (xp - xm)
    return grad


FD_CASES = [c for c in R.cases() if c[1].fd and c[0].differentiable]  # value-only ops have no backward
FD_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in FD_CASES]


@pytest.mark.parametrize(("record", "variant", "reduction"), FD_CASES, ids=FD_IDS)
@given(sizes=_sizes(FD_MAX_BATCH, FD_MAX_DIM), seed=st.integers(0, 2**32 - 1))
@example(sizes=R.ODD_SIZES[1], seed=0)  # B = 1, no trailing dims
@example(sizes={**R.ODD_SIZES[2], "...": (3, 2, 1), "...2": (2, 3)}, seed=1)  # 3-D trailing
def test_backward_matches_finite_differences(record, variant, reduction, sizes, seed):
    rng = np.random.default_rng(seed)
    inputs = R.make_inputs(record, rng, np.float64, sizes, variant)
    kwargs = R.call_kwargs(record, variant, reduction)
    value = np.asarray(_value(record, inputs, kwargs))
    weights = rng.uniform(0.5, 1.5, size=value.shape) * rng.choice([-1.0, 1.0], size=value.shape)
    grad_output = weights if value.ndim else float(weights)  # per sample ('none') or elementwise
    analytic = record.reference_backward(*inputs, grad_output, **kwargs)
    assert isinstance(analytic, tuple) and len(analytic) == len(record.differentiable), (
        f"{record.name}_backward must return one gradient per differentiable input {record.differentiable}"
    )
    for name, g in zip(record.differentiable, analytic, strict=True):
        which = record.arg_names.index(name)
        assert g.shape == inputs[which].shape, (
            f"grad of {name}: shape {g.shape} != input {inputs[which].shape}"
        )
        assert g.dtype == np.float64, f"grad of {name}: dtype {g.dtype}"
        numeric = finite_difference(record, inputs, kwargs, which, weights)
        assert_close(g, numeric, "fd", np.float64, f"{record.name}({variant.id}, {reduction}) d/d{name}")


@pytest.mark.parametrize("n_iters", [1, 2])
def test_spectral_norm_backward_holds_vectors_constant(n_iters):
    """Before convergence the spectral-norm backward is, by design, NOT d sigma / dW: it is the
    gradient of u^T W v with the returned u, v held constant (as torch.nn.utils.spectral_norm).
    Finite differences of that bilinear form, with u and v frozen, are the oracle."""
    record = R.by_name("spectral_norm_sigma")
    rng = np.random.default_rng(n_iters)
    W, u0 = R.make_inputs(record, rng, np.float64, R.ODD_SIZES[2])
    sigma, u, v = record.reference(W, u0, n_iters=n_iters)
    assert_close(sigma, u @ W @ v, "fd", np.float64, "sigma = u^T W v")
    (g,) = record.reference_backward(W, u0, 0.75, n_iters=n_iters)
    numeric = np.empty_like(W)
    for i in range(W.size):
        e = np.zeros_like(W)
        e.flat[i] = FD_STEP
        numeric.flat[i] = 0.75 * (u @ (W + e) @ v - u @ (W - e) @ v) / (2 * FD_STEP)
    assert_close(g, numeric, "fd", np.float64, f"spectral_norm_sigma(n_iters={n_iters}) d/dW")


# every family module of genloss.reference (a new family cannot be missed)
FAMILIES = sorted(n for n in reference.__all__ if isinstance(getattr(reference, n), types.ModuleType))


def test_families_are_the_derivation_files():
    assert FAMILIES == sorted(
        p.stem for p in (Path(__file__).parents[1] / "derivations").glob("*.md") if p.stem != "README"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_covers_every_reference_op(family):
    """Every op the reference exports (a forward, with or without ``_backward``) has a registry
    record or is listed in ``NOT_REGISTERED`` with its reason (so the generic tests cannot
    silently miss an op); each record's backward is the module's."""
    import importlib
    import inspect

    module = importlib.import_module(f"genloss.reference.{family}")
    ops = {
        n for n in module.__all__ if inspect.isfunction(getattr(module, n)) and not n.endswith("_backward")
    }
    records = {r.name: r for r in R.RECORDS if r.family == family}
    assert ops - set(R.NOT_REGISTERED) == set(records)
    for name, r in records.items():
        has_backward = name + "_backward" in module.__all__
        assert has_backward == bool(r.differentiable), f"{name}: backward exported {has_backward}"


def test_specialised_records():
    """``record.at(variant)``: the variant's arguments (replaced / optional ones supplied), its
    differentiable ones; ``make_inputs`` and the routed entry points agree with it."""
    elbo = R.by_name("negative_elbo")
    plain, with_logvar = elbo.variants[0], elbo.variants[-1]
    assert elbo.at(plain).arg_names == ("recon", "x", "mu", "logvar")
    assert elbo.at(plain).differentiable == ("recon", "mu", "logvar")
    spec = elbo.at(with_logvar)
    assert spec.arg_names[-1] == "recon_logvar" and spec.differentiable[-1] == "recon_logvar"
    again = spec.at(with_logvar)  # idempotent
    assert (again.args, again.differentiable, again.variants) == (
        spec.args,
        spec.differentiable,
        spec.variants,
    )
    inputs = R.make_inputs(elbo, np.random.default_rng(0), np.float64, R.ODD_SIZES[2], with_logvar)
    assert len(inputs) == 5
    kw = R.call_kwargs(spec, with_logvar, "sum")
    direct = R.by_name("negative_elbo").reference.__wrapped__(*inputs[:4], recon_logvar=inputs[4], **kw)
    assert spec.reference(*inputs, **kw) == direct
    nll = R.by_name("gaussian_nll")
    assert [nll.at(v).arg("logvar").shape for v in nll.variants] == [("B", "..."), (), ("...",)]


def test_api_notes_match_the_registry():
    """notes/API.md's op table is generated from the records: regenerate it with
    ``python -m genloss.registry notes/API.md`` when a record changes."""
    import pathlib

    from genloss import registry

    notes = pathlib.Path(__file__).resolve().parents[1] / "notes" / "API.md"
    if not notes.exists():
        pytest.skip("notes/API.md is not beside the tests")
    text = notes.read_text(encoding="utf-8")
    table = text.split(registry.API_BEGIN, 1)[1].split(registry.API_END, 1)[0].strip()
    assert table == registry.api_markdown().strip(), (
        "notes/API.md is out of date: run python -m genloss.registry notes/API.md"
    )
    assert {r.family for r in registry.RECORDS} <= {
        line[4:].strip() for line in table.splitlines() if line.startswith("### ")
    }


def test_api_notes_name_every_public_function():
    """Every public name of genloss.torch (the widest layer) is in notes/API.md: the op table
    (generated) or the hand-written "Outside the op table" rows (27 were missing)."""
    import pathlib
    import re

    torch_layer = pytest.importorskip("genloss.torch")
    notes = pathlib.Path(__file__).resolve().parents[1] / "notes" / "API.md"
    if not notes.exists():
        pytest.skip("notes/API.md is not beside the tests")
    text = notes.read_text(encoding="utf-8")
    missing = [n for n in torch_layer.__all__ if not re.search(rf"\b{re.escape(n)}\b", text)]
    assert not missing, f"notes/API.md does not mention {missing}"
