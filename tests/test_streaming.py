"""Streaming (non-temporal) stores in the CPU engine (cpp/src/cpu_kernels.cpp, ``chunk``
with kBuffered / kStreamed; threshold ``genloss.native.streaming_stores``). What must
hold: above the threshold a call's values and gradients are bitwise the same whether its
blocks are streamed or put with plain stores (so they do not depend on which chunks are
64-byte aligned), for every instruction-set build, dtype, arity and output kind
(gradients, elementwise values, per-row tables, rows whose start is not aligned, tails
shorter than a block); they match the reference; calls above the threshold really
stream and calls below or with streaming off do not; the threshold's default, its
environment variable and its setter's errors; NumPy outputs start on a cache line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("genloss._C")

import genloss.native as gn  # noqa: E402
from genloss import reference as ref  # noqa: E402
from genloss.native import _engine as E  # noqa: E402
from isa_builds import ISAS, run_under_isa  # noqa: E402

# Runs every case above the threshold (0) twice, every block put with plain stores
# (set_stream_plain_only) and streamed where aligned; then with streaming off (-1, the
# direct path). Prints, per case, whether the first two agree bit for bit, how many
# map_reduce calls streamed in each run, and the largest difference to the direct path
# relative to the largest output (the direct path may round differently in the last bit).
SCRIPT = r"""
import json, numpy as np, genloss, genloss.native as gn
from genloss import reference as ref
from genloss.native import _engine as E
rng = np.random.default_rng(0)
sched = ref.DiffusionSchedule(ref.cosine_betas(100))

def cases(dt):
    def arr(*shape, scale=1.0):
        return (rng.normal(size=shape) * scale).astype(dt)
    # outputs >= 64 KiB (NumPy outputs start on a cache line from that size on)
    t = rng.integers(0, 100, size=37)
    w = rng.uniform(0.5, 2.0, size=37).astype(dt)
    x0 = np.clip(arr(37, 3, 164), -1, 1)  # rows of 492 elements: every 4th row starts aligned
    yield "l1 (2 gradients, one long row, tail)", lambda: gn.l1_loss(arr(37, 517), arr(37, 517))
    yield "gan_d (two populations, tails)", lambda: gn.gan_d_loss(arr(20000), arr(16411))
    yield "diffusion_mse (table, weights, rows of 492)", lambda: gn.diffusion_mse_loss(
        arr(37, 3, 164), x0, arr(37, 3, 164), t, sched, "v", w)
    yield "diffusion_mse (rows of 4096)", lambda: gn.diffusion_mse_loss(
        arr(37, 4, 32, 32), np.clip(arr(37, 4, 32, 32), -1, 1), arr(37, 4, 32, 32), t, sched, "eps")
    yield "q_sample (elementwise values, two gradients)", lambda: gn.q_sample(x0, t, arr(37, 3, 164), sched)
    yield "q_sample (elementwise values only)", lambda: gn.q_sample(
        x0, t, arr(37, 3, 164), sched, need_grad=False)
    yield "vlb_term learned (4 inputs, 2 gradients, t = 0 rows)", lambda: gn.vlb_term(
        x0, arr(37, 3, 164), np.where(np.arange(37) % 5 == 0, 0, t), arr(37, 3, 164), sched,
        np.clip(arr(37, 3, 164), -1, 1), reduction="mean")
    yield "negative_elbo (per-sample terms)", lambda: gn.negative_elbo(
        arr(37, 600, scale=3), (rng.uniform(size=(37, 600)) < 0.5).astype(dt), arr(37, 16), arr(37, 16))

def arrays(out):
    value, grads = out if isinstance(out, tuple) and len(out) == 2 else (out, ())
    return [np.asarray(value)] + [np.asarray(g) for g in grads if g is not None]

def flat(out):
    arrs = arrays(out)
    return [a.tobytes() for a in arrs], [a.ravel()[:3].tolist() for a in arrs]

res = {"isa": genloss.build_info()["isa"], "cases": []}
for dt in (np.float32, np.float64):
    for name, make in cases(dt):
        state = rng.bit_generator.state
        got = []
        for th, plain in ((0, True), (0, False), (-1, False)):
            rng.bit_generator.state = state  # the same inputs for every run
            E.streaming_stores(th)
            E._C.set_stream_plain_only(plain)
            before = E._C.streamed_calls()
            got.append((make(), E._C.streamed_calls() - before))
        E._C.set_stream_plain_only(False)
        (a, na), (b, nb), (c, nc) = ((flat(o), n) for o, n in got)
        rel = max(float(np.max(np.abs(x.astype(np.float64) - y))) / max(float(np.max(np.abs(y))), 1e-300)
                  for x, y in zip(arrays(got[1][0]), arrays(got[2][0])))
        res["cases"].append({"case": f"{np.dtype(dt).name} {name}", "equal": a[0] == b[0], "head": b[1],
                             "streamed_plain": na, "streamed_on": nb, "streamed_off": nc, "rel_to_direct": rel})
print(json.dumps(res))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_streamed_outputs_are_bitwise_the_stored_ones(isa):
    res = run_under_isa(isa, SCRIPT, drop_env=("GENLOSS_STREAM_MIN_BYTES",))
    assert len(res["cases"]) == 16
    for c in res["cases"]:
        assert c["equal"], c
        assert c["streamed_plain"] == 0 and c["streamed_off"] == 0, c
        assert c["streamed_on"] >= 1, c  # every case has 64-byte aligned chunks to stream
        tol = 1e-5 if c["case"].startswith("float32") else 1e-13
        assert c["rel_to_direct"] <= tol, c


def test_threshold_decides_per_call():
    rng = np.random.default_rng(1)
    small = [rng.normal(size=(8, 4096)).astype(np.float32) for _ in range(2)]  # 128 KiB gradients
    old = gn.streaming_stores(192 << 10)
    try:
        before = E._C.streamed_calls()
        gn.l1_loss(*small, need_grad=(True, False))  # one gradient, 128 KiB < 192 KiB: stored
        assert E._C.streamed_calls() == before
        gn.l1_loss(*small)  # two, 256 KiB: streamed
        assert E._C.streamed_calls() == before + 1
        v, (ga, gb) = gn.l1_loss(*small)
        a, b = (s.astype(np.float64) for s in small)
        np.testing.assert_allclose(v, ref.l1_loss(a, b), rtol=1e-6)
        ra, rb = ref.l1_loss_backward(a, b, 1.0)
        np.testing.assert_allclose(ga, ra, rtol=1e-6)
        np.testing.assert_allclose(gb, rb, rtol=1e-6)
    finally:
        gn.streaming_stores(old)
    assert gn.streaming_stores() == old


def test_setter_rejects_non_integers():
    for bad in (1.5, "big", True, 2.0**21):
        with pytest.raises(TypeError, match="min_bytes"):
            gn.streaming_stores(bad)


@pytest.mark.parametrize(("env", "want"), [(None, 2 << 20), ("12345", 12345), ("-1", -1), ("junk", 2 << 20)])
def test_default_and_environment(env, want):
    full = dict(os.environ)
    full.pop("GENLOSS_STREAM_MIN_BYTES", None)
    if env is not None:
        full["GENLOSS_STREAM_MIN_BYTES"] = env
    code = "import genloss.native as gn; print(gn.streaming_stores())"
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    assert int(out.stdout) == want


def test_numpy_outputs_start_on_a_cache_line():
    rng = np.random.default_rng(2)
    for n in (E._ALIGN_MIN_BYTES // 4, 3 * (1 << 18) + 5):
        a = rng.normal(size=n).astype(np.float32)
        b = rng.normal(size=n).astype(np.float32)
        _, (ga, gb) = gn.l1_loss(a, b)
        for g in (ga, gb):
            assert isinstance(g, np.ndarray) and g.shape == (n,) and g.dtype == np.float32
            assert g.__array_interface__["data"][0] % 64 == 0
            assert g.flags.c_contiguous and g.flags.writeable
        np.testing.assert_array_equal(ga, np.sign(a - b).astype(np.float32) / np.float32(n))


def test_torch_op_gradient_streams_and_matches_the_reference():
    torch = pytest.importorskip("torch")
    import genloss.torch as gt

    sched = ref.DiffusionSchedule(ref.cosine_betas(1000))
    g = torch.Generator().manual_seed(3)
    shape = (16, 4, 64, 64)  # a 1 MiB gradient: streamed under a 1 MiB threshold
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    pred = torch.randn(shape, generator=g, requires_grad=True)
    grads = []
    old = gn.streaming_stores()
    try:
        gn.streaming_stores(1 << 20)
        for plain in (True, False):
            E._C.set_stream_plain_only(plain)
            before = E._C.streamed_calls()
            pred.grad = None
            gt.diffusion_mse_loss(pred, x0, noise, t, sched, "v").backward()
            assert (E._C.streamed_calls() > before) == (not plain)
            grads.append(pred.grad)
    finally:
        E._C.set_stream_plain_only(False)
        gn.streaming_stores(old)
    assert torch.equal(grads[0], grads[1])
    args = [a.detach().double().numpy() for a in (pred, x0, noise)]
    (want,) = ref.diffusion_mse_loss_backward(*args, t.numpy(), 1.0, sched, "v")
    np.testing.assert_allclose(grads[1].numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
