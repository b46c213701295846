"""Shared helpers of the identity tests: central finite differences and the
random upstream gradients they are weighted with (float64 reference only)."""

from __future__ import annotations

import numpy as np

from tolerances import assert_close

FD_STEP = 1e-6  # relative step, as tests/test_reference.py: h = FD_STEP * max(1, |x|)


def weights(rng, shape):
    """A random upstream gradient with entries of either sign, away from 0."""
    return rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def grad_output(rng, reduction, batch):
    return weights(rng, (batch,)) if reduction == "none" else float(weights(rng, ()))


def finite_difference(f, arrays, which, weights):
    r"""d/dx sum(weights * f(arrays)) for ``arrays[which]``, entry by entry (central differences)."""
    arrays = [a.copy() for a in arrays]
    x = arrays[which]
    grad = np.empty_like(x)
    for i in range(x.size):
        x0 = x.flat[i]
        h = FD_STEP * max(1.0, abs(x0))
        x.flat[i] = x0 + h
        xp, fp = x.flat[i], float(np.sum(weights * f(*arrays)))
        x.flat[i] = x0 - h
        xm, fm = x.flat[i], float(np.sum(weights * f(*arrays)))
        x.flat[i] = x0
        grad.flat[i] = (fp - fm) / (xp - xm)
    return grad


def check_fd(name, f, backward, arrays, grad_output, differentiable):
    """The analytic gradients (one per differentiable array, in order) against finite differences."""
    weights = np.asarray(grad_output, dtype=np.float64)
    analytic = backward(*arrays, grad_output)
    assert isinstance(analytic, tuple) and len(analytic) == len(differentiable), name
    for which, g in zip(differentiable, analytic, strict=True):
        assert g.shape == arrays[which].shape, f"{name}: grad {which} shape {g.shape}"
        assert g.dtype == np.float64
        numeric = finite_difference(f, arrays, which, weights)
        assert_close(g, numeric, "fd", np.float64, f"{name} d/d(arg {which})")
