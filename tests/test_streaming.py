"""The CPU engine's store loops (cpp/src/cpu_kernels.cpp, ``chunk``: kDirect below the
streaming threshold, kBuffered above it, streaming where aligned; knobs
``genloss.native.options(stream_min_bytes=..., nt_stores=..., threads=...)``). What must
hold: above the threshold, streamed and plain stores and one thread instead of two give
the same bits, for every instruction-set build, dtype, arity and output kind (gradients,
elementwise values, per-row tables, rows whose start is not aligned, tails shorter than
a block); the direct loop (streaming off) gives the same bits at 16M elements (l1_loss
float32 and float64, gan_d_loss: plain arithmetic, no FP contraction) and agrees to an
ulp elsewhere (an exp/log1p may be vectorised in one loop and not the other); results
match the reference; calls above the threshold really stream and calls below or with
streaming off do not; NumPy outputs start on a cache line.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("genloss._C")

import genloss.native as gn  # noqa: E402
from genloss import reference as ref  # noqa: E402
from genloss.native import _engine as E  # noqa: E402
from isa_builds import ISAS, run_under_isa  # noqa: E402

# The knob settings every case runs under: the buffered loop with plain stores, then
# streaming where aligned, streaming on one thread, and the direct loop (streaming off).
KNOBS = r"""
KNOBS = [("plain", dict(stream_min_bytes=0, nt_stores=False)),
         ("streamed", dict(stream_min_bytes=0)),
         ("streamed, 1 thread", dict(stream_min_bytes=0, threads=1)),
         ("direct", dict(stream_min_bytes=-1))]

def under_every_knob(make):
    # (bytes of each output, streamed-call count) per knob setting, and the outputs of the
    # first setting (the others compare to it bit for bit)
    runs = []
    for label, kw in KNOBS:
        with gn.options(**kw):
            before = E._C.streamed_calls()
            out = make()
            runs.append((label, arrays(out), E._C.streamed_calls() - before))
    first = runs[0][1]
    same = {label: len(a) == len(first) and all(
                x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                for x, y in zip(a, first))
            for label, a, _ in runs[1:]}
    # largest difference of the direct loop's outputs, relative to each output's largest value
    rel = max(float(np.max(np.abs(x.astype(np.float64) - y))) / max(float(np.max(np.abs(y))), 1e-300)
              for x, y in zip(runs[-1][1], first))
    return same, {label: n for label, _, n in runs}, first, rel

def arrays(out):
    value, grads = out if isinstance(out, tuple) and len(out) == 2 else (out, ())
    return [np.asarray(value)] + [np.asarray(g) for g in grads if g is not None]
"""

# Each case above the threshold (outputs >= 64 KiB: NumPy outputs start on a cache line
# from that size on) under every knob setting, for both dtypes.
SCRIPT = (
    r"""
import json, numpy as np, genloss, genloss.native as gn
from genloss import reference as ref
from genloss.native import _engine as E
rng = np.random.default_rng(0)
sched = ref.DiffusionSchedule(ref.cosine_betas(100))
"""
    + KNOBS
    + r"""
def cases(dt):
    def arr(*shape, scale=1.0):
        return (rng.normal(size=shape) * scale).astype(dt)
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
    yield "gaussian_nll (3 inputs)", lambda: gn.gaussian_nll(arr(37, 517), arr(37, 517), arr(37, 517))

res = {"isa": genloss.build_info()["isa"], "cases": []}
for dt in (np.float32, np.float64):
    for name, make in cases(dt):
        state = rng.bit_generator.state
        def again(make=make, state=state):
            rng.bit_generator.state = state  # the same inputs for every run
            return make()
        same, streamed, first, rel = under_every_knob(again)
        res["cases"].append({"case": f"{np.dtype(dt).name} {name}", "same": same, "streamed": streamed,
                             "rel_direct": rel, "head": [a.ravel()[:3].tolist() for a in first]})
print(json.dumps(res))
"""
)


@pytest.mark.parametrize("isa", ISAS)
def test_every_store_loop_gives_the_same_bits(isa):
    res = run_under_isa(isa, SCRIPT, drop_env=("GENLOSS_STREAM_MIN_BYTES", "GENLOSS_NUM_THREADS"))
    assert len(res["cases"]) == 18
    for c in res["cases"]:
        assert c["same"]["streamed"] and c["same"]["streamed, 1 thread"], c
        tol = 1e-6 if c["case"].startswith("float32") else 1e-14  # the direct loop: an ulp or so
        assert c["same"]["direct"] or c["rel_direct"] <= tol, c
        n = c["streamed"]
        assert n["plain"] == 0 and n["direct"] == 0, c
        # Outputs under 64 KiB start wherever malloc puts them: how many of a case's calls
        # find aligned chunks may vary run to run, but every case has some.
        assert n["streamed"] >= 1 and n["streamed, 1 thread"] >= 1, c


# 16M elements: the size of issue 14's benchmark (l1_loss 16M float32), a two-population
# loss with 16M logits, and a float64 case; value and every gradient, bit for bit under
# every knob, and against the closed forms.
BIG_SCRIPT = (
    r"""
import json, numpy as np, genloss, genloss.native as gn
from genloss.native import _engine as E
"""
    + KNOBS
    + r"""
n = 1 << 24
rng = np.random.default_rng(5)
res = {"isa": genloss.build_info()["isa"], "cases": []}
def record(name, make, check):
    same, streamed, first, _ = under_every_knob(make)
    res["cases"].append({"case": name, "same": same, "streamed": streamed, "check": check(first)})

a32, b32 = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
def l1_check(out, a, b):
    v, ga, gb = out
    d = a.astype(np.float64) - b.astype(np.float64)
    want_g = (np.sign(a - b) / a.dtype.type(a.size)).astype(a.dtype)  # 1/n exact: n = 2^24
    return {"value_rel": abs(float(v) - float(np.abs(d).mean())) / float(np.abs(d).mean()),
            "grads_exact": bool(np.array_equal(ga, want_g) and np.array_equal(gb, -want_g))}
record("l1_loss float32 16M", lambda: gn.l1_loss(a32, b32), lambda o: l1_check(o, a32, b32))

r32 = rng.standard_normal(n // 2, dtype=np.float32) * 3
f32 = rng.standard_normal(n // 2 + 12345, dtype=np.float32) * 3
def gan_check(out):
    v, gr, gf = out
    r, f = r32.astype(np.float64), f32.astype(np.float64)
    want = np.logaddexp(0, -r).mean() + np.logaddexp(0, f).mean()
    sig = lambda x: 0.5 * (1 + np.tanh(x / 2))
    return {"value_rel": abs(float(v) - want) / want,
            "grad_rel": max(float(np.max(np.abs(gr - (-sig(-r) / r.size)))) * r.size,
                            float(np.max(np.abs(gf - sig(f) / f.size))) * f.size)}
record("gan_d_loss float32 16M logits", lambda: gn.gan_d_loss(r32, f32), gan_check)

a64, b64 = rng.standard_normal(n), rng.standard_normal(n)
record("l1_loss float64 16M", lambda: gn.l1_loss(a64, b64), lambda o: l1_check(o, a64, b64))
print(json.dumps(res))
"""
)


@pytest.mark.parametrize("isa", ISAS)
def test_16m_losses_give_the_same_bits_under_every_knob(isa):
    res = run_under_isa(isa, BIG_SCRIPT, drop_env=("GENLOSS_STREAM_MIN_BYTES", "GENLOSS_NUM_THREADS"))
    assert [c["case"] for c in res["cases"]] == [
        "l1_loss float32 16M",
        "gan_d_loss float32 16M logits",
        "l1_loss float64 16M",
    ]
    for c in res["cases"]:
        assert all(c["same"].values()), c
        n = c["streamed"]
        calls = 2 if c["case"].startswith("gan_d") else 1  # one map_reduce per population
        assert n["streamed"] == n["streamed, 1 thread"] == calls and n["plain"] == n["direct"] == 0, c
        chk = c["check"]
        tol = 1e-12 if "float64" in c["case"] else 1e-5
        assert chk["value_rel"] <= tol, c
        if "grads_exact" in chk:
            assert chk["grads_exact"], c
        else:
            assert chk["grad_rel"] <= 1e-6, c  # float32 sigmoid, scaled by the batch size


def test_threshold_decides_per_call():
    rng = np.random.default_rng(1)
    small = [rng.normal(size=(8, 4096)).astype(np.float32) for _ in range(2)]  # 128 KiB gradients
    with gn.options(stream_min_bytes=192 << 10) as now:
        assert now["stream_min_bytes"] == 192 << 10
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
    for nt in (False, True):
        with gn.options(stream_min_bytes=1 << 20, nt_stores=nt):
            before = E._C.streamed_calls()
            pred.grad = None
            gt.diffusion_mse_loss(pred, x0, noise, t, sched, "v").backward()
            assert (E._C.streamed_calls() > before) == nt
            grads.append(pred.grad)
    assert torch.equal(grads[0], grads[1])
    args = [a.detach().double().numpy() for a in (pred, x0, noise)]
    want = ref.diffusion_mse_loss_backward(*args, t.numpy(), 1.0, sched, "v")[0]  # d/dpred
    np.testing.assert_allclose(grads[1].numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
