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
from genloss import reference as ref

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


def _cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


def test_build_info_reports_the_build():
    info = genloss.build_info()
    assert set(info) >= {"cuda", "isa", "openmp", "omp_max_threads", "cuda_archs", "version"}
    assert info["isa"] in ("sse2", "avx2", "avx512")
    assert info["omp_max_threads"] >= 1
    if info["cuda"]:
        assert "90" in info["cuda_archs"].split(",")  # H100/H200 are in the arch list


@pytest.mark.parametrize("isa", ["sse2", "avx2", "avx512"])
def test_every_isa_build_matches_reference(isa):
    if isa == "avx2" and not _cpu_has("avx2"):
        pytest.skip("CPU has no AVX2")
    if isa == "avx512" and not _cpu_has("avx512f"):
        pytest.skip("CPU has no AVX-512")
    env = dict(os.environ, GENLOSS_ISA=isa)
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    assert out["isa"] == isa
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
