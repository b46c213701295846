"""The native engine itself: build info, and every instruction-set build agrees
with the NumPy reference (the SSE2 / AVX2 / AVX-512 builds ship in one module
and are picked at run time; GENLOSS_ISA forces a narrower one)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import genloss
import genloss.native as gn
from genloss import reference as ref
from isa_builds import ISAS, run_under_isa

SCRIPT = r"""
import json, numpy as np, genloss, genloss.native as gn
rng = np.random.default_rng(0)
x = rng.normal(size=(37, 129)) * 4
y = rng.normal(size=(41, 129)) * 4
out = {"isa": genloss.build_info()["isa"]}
for dt in (np.float32, np.float64):
    v, (gx, gy) = gn.gan_d_loss(x.astype(dt), y.astype(dt))
    w, (hx, hy) = gn.fgan_d_loss(x.astype(dt), y.astype(dt), "total_variation")
    u, (lx, ly) = gn.l1_loss(x.astype(dt), (x + 1e-3 + np.abs(x)).astype(dt))
    out[np.dtype(dt).name] = [float(v), gx.tolist(), gy.tolist(), float(w), hx.tolist(), float(u), lx.tolist()]
print(json.dumps(out))
"""


def test_build_info_reports_the_build():
    info = genloss.build_info()
    assert set(info) >= {"cuda", "isa", "openmp", "omp_max_threads", "cuda_archs", "version"}
    assert info["isa"] in ("sse2", "avx2", "avx512")
    assert info["omp_max_threads"] >= 1
    if info["cuda"]:
        assert "90" in info["cuda_archs"].split(",")  # H100/H200 are in the arch list


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_build_matches_reference(isa):
    out = run_under_isa(isa, SCRIPT)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 129)) * 4
    y = rng.normal(size=(41, 129)) * 4
    t = x + 1e-3 + np.abs(x)
    for name, rtol in (("float64", 1e-12), ("float32", 2e-5)):
        # The reference sees the inputs the native call saw (rounded to the dtype).
        xd, yd, td = (a.astype(name).astype(np.float64) for a in (x, y, t))
        v, gx, gy, w, hx, u, lx = out[name]
        np.testing.assert_allclose(v, ref.gan_d_loss(xd, yd), rtol=rtol)
        rgx, rgy = ref.gan_d_loss_backward(xd, yd, 1.0)
        np.testing.assert_allclose(gx, rgx, rtol=rtol, atol=1e-7 if name == "float32" else 0)
        np.testing.assert_allclose(gy, rgy, rtol=rtol, atol=1e-7 if name == "float32" else 0)
        np.testing.assert_allclose(w, ref.fgan_d_loss(xd, yd, "total_variation"), rtol=rtol, atol=1e-6)
        rhx, _ = ref.fgan_d_loss_backward(xd, yd, 1.0, "total_variation")
        np.testing.assert_allclose(hx, rhx, rtol=rtol, atol=1e-7 if name == "float32" else 1e-15)
        np.testing.assert_allclose(u, ref.l1_loss(xd, td), rtol=rtol)
        (rlx, _) = ref.l1_loss_backward(xd, td, 1.0)
        np.testing.assert_allclose(lx, rlx, rtol=rtol)


# ---------------------------------------------------------------- inline float math
# genloss/common.h: exp_nonpos (e^x, x <= 0) and log1p_unit (log1p(e), e in [0, 1]) are
# polynomials GCC vectorises inline. Read back per element through bernoulli_nll with
# reduction='none' on (n, 1) inputs: x = 0 gives softplus(l), and the gradient with
# respect to the logits is sigmoid(l) = e^{-|l|} / (1 + e^{-|l|}) for l < 0.
ULP_SCRIPT = r"""
import json, numpy as np, genloss, genloss.native as gn
l = np.concatenate([-np.linspace(0, 87, 1_000_001), -np.exp(np.linspace(-20, 4.4, 100_001))]).astype(np.float32)
x = np.zeros_like(l)
v, _ = gn.bernoulli_nll(l[:, None], x[:, None], reduction="none", need_grad=False)
_, (g, _) = gn.bernoulli_nll(l[:, None], x[:, None], reduction="sum")
ex = np.log1p(np.exp(l.astype(np.float64)))          # softplus(l) = log1p(e^l), l <= 0
sg = np.exp(l.astype(np.float64)) / (1 + np.exp(l.astype(np.float64)))
ok = sg > 2.0**-126                                   # normal range (below: flushed to 0)
def ulps(got, want):
    return float((np.abs(got.astype(np.float64) - want) / np.spacing(want.astype(np.float32))).max())
print(json.dumps({"isa": genloss.build_info()["isa"], "softplus": ulps(v[ok], ex[ok]),
                  "sigmoid": ulps(g[ok, 0], sg[ok]), "tiny": float(np.abs(g[~ok, 0]).max(initial=0.0))}))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_float32_inline_exp_and_log1p_ulps(isa):
    """softplus and sigmoid from the inline exp and log1p: within 3 ulp of float64 on
    l in [-87, 0] (exp <= ~2 ulp after its reduction, log1p <= 1.33 ulp, one division),
    on every instruction-set build; below float's normal range the value is 0."""
    out = run_under_isa(isa, ULP_SCRIPT)
    assert out["softplus"] <= 3.0, out
    assert out["sigmoid"] <= 3.0, out
    assert out["tiny"] < 2.0**-126, out


# exp_expm1 (genloss/common.h): e^x and e^x - 1 inline, read back per element through
# normal_kl's gradients (elementwise): with m1 = 1, m2 = 0, lv1 = 0, lv2 = -x the gradient
# w.r.t. m1 is (m1 - m2) e^{-lv2} = e^x; with m1 = m2 = 0, lv2 = 0, lv1 = x the gradient
# w.r.t. lv1 is expm1(x) / 2 (the halving is exact).
EXP_SCRIPT = r"""
import json, numpy as np, genloss, genloss.native as gn
x = np.concatenate([np.linspace(-110, 95, 2_000_001), np.sinh(np.linspace(-12, 12, 200_001)) * 1e-3,
                    [-np.inf, np.inf, np.nan, 0.0, -0.0]]).astype(np.float32)
one, zero = np.ones_like(x), np.zeros_like(x)
_, (g_exp, _, _, _) = gn.normal_kl(one, zero, zero, -x)
_, (_, g_em1, _, _) = gn.normal_kl(zero, x, zero, zero)
xd = x.astype(np.float64)
with np.errstate(over="ignore"):
    want_e, want_m = np.exp(xd).astype(np.float32), np.expm1(xd)
def ulps(got, want, mask):
    got, want = got[mask].astype(np.float64), want[mask].astype(np.float64)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    err = np.abs(got - want) / np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return float(np.where(same, 0.0, err).max())
finite = np.isfinite(xd)
normal_e = finite & (np.abs(want_e.astype(np.float64)) >= 2.0**-126) & np.isfinite(want_e)
exp_ulp = ulps(g_exp, np.exp(xd), normal_e)
em1_f = finite & np.isfinite(want_m.astype(np.float32))
em1_ulp = ulps(2 * g_em1, want_m, em1_f)
tiny = finite & (want_e.astype(np.float64) < 2.0**-126)
print(json.dumps({
    "isa": genloss.build_info()["isa"], "exp": exp_ulp, "expm1": em1_ulp,
    "denormal_abs": float(np.abs(g_exp[tiny].astype(np.float64) - np.exp(xd[tiny])).max()),
    "overflow_inf": bool(np.all(np.isinf(g_exp[finite & ~np.isfinite(want_e)]))),
    "specials": [float(g_exp[-5]), float(g_exp[-4]), float(2 * g_em1[-5]), float(2 * g_em1[-4])],
    "nan": bool(np.isnan(g_exp[-3]) and np.isnan(g_em1[-3])),
}))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_float32_inline_exp_expm1_ulps(isa):
    """e^x and expm1(x) from exp_expm1 (NormalKL and vlb_term's learned range use it): within
    3 ulp of float64 wherever the result is a normal float, on x in [-110, 95] and densely
    near 0 (expm1's relative accuracy there); denormal results within one denormal step of
    the truth, overflow to inf, -inf -> (0, -1), +inf -> inf, NaN -> NaN; every ISA build."""
    out = run_under_isa(isa, EXP_SCRIPT)
    assert out["exp"] <= 3.0, out
    assert out["expm1"] <= 3.0, out
    assert out["denormal_abs"] <= 2.0**-149 * 4, out
    assert out["overflow_inf"], out
    assert out["specials"] == [0.0, float("inf"), -1.0, float("inf")], out
    assert out["nan"], out


# ---------------------------------------------------------------- runtime settings
# genloss.native.options: cpp/src/config.cpp reads the environment once; options() reads
# and sets the same values, restores them as a context manager, and names a bad option.
OPTIONS_SCRIPT = r"""
import json, genloss.native as gn
print(json.dumps(gn.options()))
"""


def _fresh_options(env: dict) -> tuple[dict, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GENLOSS_") and k != "OMP_NUM_THREADS"}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", OPTIONS_SCRIPT],
        env=full,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout), out.stderr


def _defaults() -> dict:
    return {
        "huge_pages": True,
        "host_cache_mb": None,
        "stream_min_bytes": 2 << 20,
        "nt_stores": True,
        "check_data": True,
        "threads": len(os.sched_getaffinity(0)),  # OpenMP's default: the cores this process may use
        "isa": {"running": genloss.build_info()["isa"], "forced": None},
    }


@pytest.mark.parametrize(
    ("env", "changed", "warns"),
    [
        ({}, {}, None),
        ({"GENLOSS_STREAM_MIN_BYTES": "12345"}, {"stream_min_bytes": 12345}, None),
        ({"GENLOSS_STREAM_MIN_BYTES": "-1"}, {"stream_min_bytes": -1}, None),
        ({"GENLOSS_STREAM_MIN_BYTES": "junk"}, {}, "GENLOSS_STREAM_MIN_BYTES"),
        ({"GENLOSS_HOST_CACHE_MB": "64"}, {"host_cache_mb": 64}, None),
        ({"GENLOSS_HOST_CACHE_MB": "-3"}, {}, "GENLOSS_HOST_CACHE_MB"),
        ({"GENLOSS_HUGE_PAGES": "0"}, {"huge_pages": False}, None),
        ({"GENLOSS_HUGE_PAGES": "yes"}, {}, "GENLOSS_HUGE_PAGES"),
        ({"GENLOSS_NUM_THREADS": "1"}, {"threads": 1}, None),
        ({"GENLOSS_NUM_THREADS": "0"}, {}, "GENLOSS_NUM_THREADS"),
        ({"OMP_NUM_THREADS": "1"}, {"threads": 1}, None),
        ({"GENLOSS_ISA": "sse2"}, {"isa": {"running": "sse2", "forced": "sse2"}}, None),
        ({"GENLOSS_ISA": "avx9"}, {}, "GENLOSS_ISA"),
    ],
)
def test_options_read_the_environment(env, changed, warns):
    got, err = _fresh_options(env)
    assert got == {**_defaults(), **changed}, err
    if warns is None:
        assert "RuntimeWarning" not in err, err
    else:
        assert "RuntimeWarning" in err and warns in err, err


def test_options_set_and_restore():
    before = gn.options()
    want = {
        "stream_min_bytes": 123,
        "nt_stores": False,
        "threads": 1,
        "huge_pages": False,
        "host_cache_mb": 7,
        "check_data": False,
    }
    with gn.options(**want) as now:
        assert {k: now[k] for k in want} == want
        assert gn.options() == now
        assert genloss.build_info()["omp_max_threads"] == 1
        with gn.options(threads=2, stream_min_bytes=-1):  # nested: the inner exit restores the outer
            assert gn.options()["threads"] == 2
        assert gn.options() == now
    assert gn.options() == before
    with pytest.raises(RuntimeError), gn.options(stream_min_bytes=5):  # restored on an exception too
        raise RuntimeError
    assert gn.options() == before
    try:  # without `with` a setting stays
        gn.options(stream_min_bytes=4096)
        assert gn.options()["stream_min_bytes"] == 4096
    finally:
        gn.options(stream_min_bytes=before["stream_min_bytes"])
    assert gn.options(**before) == before  # the dict round-trips (isa: the value running)


def test_check_data_false_still_checks_cpu_data():
    """options(check_data=False) skips only the checks that wait for a GPU: CPU values (here an
    out-of-range timestep, Bernoulli targets outside [0, 1]) are still refused by name."""
    import genloss.reference as gr

    sched = gr.DiffusionSchedule(gr.linear_betas(10))
    x = np.zeros((3, 4))
    with gn.options(check_data=False):
        with pytest.raises(ValueError, match="t must lie in"):
            gn.diffusion_mse_loss(x, x, x, np.array([0, 10, 2]), sched, "eps")
        with pytest.raises(ValueError, match="targets"):
            gn.bernoulli_nll(np.zeros((3, 4)), np.full((3, 4), 2.0))


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("stream_min_bytes", 1.5, TypeError),
        ("stream_min_bytes", "big", TypeError),
        ("stream_min_bytes", True, TypeError),
        ("stream_min_bytes", 2.0**21, TypeError),
        ("stream_min_bytes", 2**70, ValueError),
        ("threads", 0, ValueError),
        ("threads", 2.0, TypeError),
        ("huge_pages", 1, TypeError),
        ("nt_stores", "yes", TypeError),
        ("check_data", 1, TypeError),
        ("host_cache_mb", -1, ValueError),
        ("isa", "avx9", ValueError),
        ("bogus", 1, TypeError),
    ],
)
def test_options_reject_bad_values(name, value, error):
    before = gn.options()
    with pytest.raises(error, match=name):
        good = {"stream_min_bytes": 999} if name != "stream_min_bytes" else {"threads": 1}
        gn.options(**good, **{name: value})  # nothing is set when one value is bad
    assert gn.options() == before


def test_workspace_field_is_for_cuda_calls_only():
    """``workspace=`` (the CUDA scratch allocator, _engine.workspace) is accepted by run_call
    and _C.Call of every kind, and a CPU call never calls it; the fallback counter of CUDA
    scratch exists (0 without CUDA calls)."""
    from genloss import _C

    def alloc(device_id, nbytes):
        raise AssertionError("a CPU call asked for a CUDA workspace")

    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = np.zeros(1)
    _C.run_call(
        functor="Linear", params={}, dtype=1, ins=[x.ctypes.data], rows=2, cols=3, out_value=out.ctypes.data,
        workspace=alloc,
    )  # fmt: skip
    assert out[0] == 15.0
    col = np.zeros(3)
    c = _C.Call(
        kind="col_sum", dtype=1, x=x.ctypes.data, out=col.ctypes.data, rows=2, cols=3, workspace=alloc
    )
    _C.run(c)
    assert col.tolist() == [3.0, 5.0, 7.0]
    assert isinstance(_C.cuda_scratch_fallbacks(), int)


def test_device_empty_and_to_host_helpers():
    """The two helpers the CUDA compositions share (outputs of another dtype than the input's;
    one read-back): device_empty follows the input's kind (checked here on a CPU torch tensor,
    the same call on CUDA), refuses a producer it cannot allocate for, and to_host gives the
    values of every kind."""
    torch = pytest.importorskip("torch")
    from genloss.native import _engine as E

    like = E.as_input(torch.zeros(3, 2), "x")
    out, ptr = E.device_empty(like, (5,), "int64")
    assert out.dtype == torch.int64 and out.shape == (5,) and ptr == out.data_ptr()
    out, ptr = E.device_empty(like, (2, 3), "float64")
    assert out.dtype == torch.float64 and out.shape == (2, 3) and ptr == out.data_ptr()
    with pytest.raises(TypeError, match="torch or CuPy"):
        E.device_empty(E.as_input(np.zeros((3, 2)), "x"), (5,), "int64")
    a = np.arange(4.0)
    for x in (a, torch.from_numpy(a), torch.from_numpy(a).requires_grad_()):
        np.testing.assert_array_equal(E.to_host(x), a)
