r"""The NumPy reference backward = central finite differences of the reference forward (float64).

Registry-driven: every (record, variant, reduction) of ``genloss.registry`` is checked,
with hypothesis drawing the shapes (odd sizes, B = 1, 0 to 3 trailing dims) and the
values (from each argument's domain, kept ``KINK_MARGIN`` away from kinks).  The
upstream gradient is random: a scalar for 'mean'/'sum', a (B,) vector for 'none', so
the test covers the chain rule through the reduction, not just ones.

Independent direct formulas for the VALUES live in tests/test_gan_identities.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

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

    (the denominator is the step actually taken in floating point).
    """
    inputs = list(inputs)
    x = inputs[which].copy()
    inputs[which] = x
    grad = np.empty_like(x)
    for i in range(x.size):
        x0 = x.flat[i]
        h = FD_STEP * max(1.0, abs(x0))
        x.flat[i] = x0 + h
        xp, fp = x.flat[i], float(np.sum(weights * _value(record, inputs, kwargs)))
        x.flat[i] = x0 - h
        xm, fm = x.flat[i], float(np.sum(weights * _value(record, inputs, kwargs)))
        x.flat[i] = x0
        grad.flat[i] = (fp - fm) / (xp - xm)
    return grad


FD_CASES = [c for c in R.cases() if c[1].fd]
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
    grad_output = weights if reduction == "none" else float(weights)
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


def test_registry_covers_every_reference_op():
    """Every forward/backward pair the reference exports has a registry record (so the generic
    tests cannot silently miss an op)."""
    from genloss.reference import gan

    forwards = {n for n in gan.__all__ if n + "_backward" in gan.__all__}
    assert forwards == {r.name for r in R.RECORDS if r.family == "gan"}
