r"""The ONE tolerance table of genloss: how close each implementation must come to
the float64 NumPy reference, per dtype and kind of check, each entry with its
reason. Used by the test suite (tests/tolerances.py) and by ``genloss verify``.

Criterion, elementwise (NaN/inf judged apart)::

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max(1, max |expected|)

``atol`` is measured against the LARGEST magnitude of the expected array (or 1):
a floating-point computation makes errors of the size of the numbers it handles,
so a tiny gradient entry next to large ones is judged against the scale of the
vector, not against itself. Every oracle is float64, evaluated on the very inputs
the implementation saw, so these tolerances measure arithmetic only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# (dtype of the computation under test, kind of check) -> (rtol, atol)
TOLERANCES: dict[tuple[str, str], tuple[float, float]] = {
    # Reference backward vs central finite differences of the reference, float64.
    # Step h = 1e-6 * max(1, |x|): truncation h^2 |f'''| / 6 <= ~1e-12 for |x| <= 40 in
    # these domains; rounding eps |f| / h ~ 2.2e-10 |f| with |f| <= ~1e3 (pix2pix's
    # lambda 100, exp-based f-GAN at v ~ 8): <= 2e-7 absolute.  A wrong factor or sign
    # is an O(1) error.
    ("float64", "fd"): (1e-5, 1e-6),
    # Native float64 vs reference float64: libmvec exp/log1p/expm1/tanh (<= 4 ulp) and
    # a different (blocked pairwise) summation order; measured <= 5e-15 relative to
    # the scale on odd shapes; 1e-12 leaves room for hypothesis' larger batches.
    ("float64", "native"): (1e-12, 1e-13),
    # Native float32 vs reference float64 on the same (float32) inputs: elementwise
    # math in float32 (<= 4 ulp, 1 ulp = 6e-8), 16 float32 lane accumulators over
    # chunks of 4096 elements (<= 256 adds per lane), partials in double, one final
    # rounding.  Measured <= 4.4e-7 (7 ulp) on odd shapes; 1e-5 / 1e-6 ~ 16-170 ulp.
    ("float32", "native"): (1e-5, 1e-6),
    # Extreme (|x| = 1e4) inputs: as "native" (values judged against ``value_scale``:
    # a float32 sum of +-1e4 terms that cancel has an absolute error of eps * sum |terms|).
    ("float64", "extreme"): (1e-12, 1e-13),
    ("float32", "extreme"): (1e-5, 1e-6),
    # Torch op (which runs the native kernels through DLPack) vs reference: as native.
    ("float64", "torch"): (1e-12, 1e-13),
    ("float32", "torch"): (1e-5, 1e-6),
    # fp16 / bf16 inputs on CPU: the op computes in float32 from the exactly widened
    # inputs (so the value, float32, is judged as float32), then rounds the gradients to
    # the input dtype: half an ulp of fp16 (2^-11 = 4.9e-4) or bf16 (2^-8 = 3.9e-3)
    # relative, plus the float32 error; values below fp16's normal range (6e-5) are
    # subnormal with an absolute spacing of 6e-8 (covered by atol * scale).
    ("float16", "torch"): (1e-3, 1e-4),
    ("bfloat16", "torch"): (8e-3, 1e-3),
    # torch.compile vs eager: the same kernels are called; only Inductor's own fused
    # pointwise code around them can round differently (float32: a few ulp).
    ("float64", "compile"): (1e-12, 1e-13),
    ("float32", "compile"): (1e-5, 1e-6),
    # CUDA vs CPU: CUDA's libdevice (<= 2 ulp) vs glibc/libmvec (<= 4 ulp) and a
    # different reduction tree (warp shuffles, then fixed-order block partials).
    ("float64", "cuda"): (1e-12, 1e-13),
    ("float32", "cuda"): (1e-5, 1e-6),
    # fp16/bf16 CUDA inputs: float32 compute, gradients rounded to the input dtype (as "torch").
    ("float16", "cuda"): (1e-3, 1e-4),
    ("bfloat16", "cuda"): (8e-3, 1e-3),
}


def dtype_name(dtype: Any) -> str:
    """'float32' for np.float32, np.dtype('float32'), torch.float32 or 'float32'."""
    if isinstance(dtype, str):
        return dtype
    s = str(dtype)
    if s.startswith("torch."):
        return s[len("torch.") :]
    return np.dtype(dtype).name


def tolerance(kind: str, dtype: Any) -> tuple[float, float]:
    return TOLERANCES[(dtype_name(dtype), kind)]


def to_numpy(x: Any) -> np.ndarray:
    """Any array (NumPy, torch on any device, Python scalar) as a float64 NumPy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch, without importing it
        x = x.detach().cpu()
        if x.dtype.is_floating_point:
            x = x.double()
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def value_scale(inputs: Any, reduction: str | None, expected: Any) -> float:
    r"""The magnitude a loss VALUE's rounding error is proportional to: max(1, |expected|, S).

    A sum of n terms computed in floating point has an error of order
    eps * sum |terms|, which exceeds eps * |sum| when the terms cancel (a WGAN critic
    loss of two populations of similar means, a JSD estimate near 0).  The terms are
    not observable from outside, so S bounds them by the floating inputs:
    S = sum |x| over every floating input, divided by the batch size of the first
    input unless ``reduction == 'sum'``.  Every term of the GAN losses is at most
    ~|x| (linear, hinge, softplus, log-sum-exp differences) or is non-negative
    (squares, exponentials: then there is no cancellation and |expected| bounds it).
    """
    arrays = [to_numpy(x) for x in inputs if _is_float(x)]
    total = sum(float(np.abs(a).sum()) for a in arrays)
    batch = to_numpy(next(x for x in inputs if _is_float(x))).shape[0] if arrays else 1
    s = total / (1 if reduction == "sum" else max(batch, 1))
    e = to_numpy(expected)
    return max(1.0, float(np.abs(e[np.isfinite(e)]).max(initial=0.0)), s)


def _is_float(x: Any) -> bool:
    dt = getattr(x, "dtype", None)
    if dt is None:
        return False
    if hasattr(dt, "is_floating_point"):
        return bool(dt.is_floating_point)
    return np.dtype(dt).kind == "f"


def metrics(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Vector error metrics over the entries that are finite in both arrays."""
    both = np.isfinite(actual) & np.isfinite(expected)
    a, e = actual[both], expected[both]
    d = np.abs(a - e)
    out = {
        "max_abs": float(d.max()) if d.size else 0.0,
        "max_rel": float((d / np.maximum(np.abs(e), np.finfo(np.float64).tiny)).max()) if d.size else 0.0,
    }
    ne = float(np.linalg.norm(e))
    out["rel_l2"] = float(np.linalg.norm(a - e) / ne) if ne > 0 else float(np.linalg.norm(a - e))
    na = float(np.linalg.norm(a))
    out["cosine"] = float(a @ e / (na * ne)) if na > 0 and ne > 0 else float("nan")
    return out
