"""The CPU output cache (cpp/src/host_cache.cpp): large torch and NumPy outputs (every float
dtype) come from reused huge-page blocks. What must hold: values and gradients are those of the
reference whether a block is new or reused, two live outputs never share memory,
a freed output's block is reused by the next output of its size, an explicit bound
(options(host_cache_mb=...)) is respected, the default bound is the recent working set
(capped at min(physical memory / 8, 4 GiB)) and forgets an old peak two windows later,
sizes that take turns keep their blocks, over the bound the block freed longest ago goes
first, and GENLOSS_HOST_CACHE_MB=0 / GENLOSS_HUGE_PAGES=0 turn it off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("genloss._C")

import genloss.native as gn  # noqa: E402
import genloss.torch as gt  # noqa: E402
from genloss.native import _engine as E  # noqa: E402
from genloss.reference import gan as ref  # noqa: E402

N = (E.HOST_CACHE_MIN_BYTES // 4) + 1000  # float32 elements: just above the threshold
HUGE = 2 << 20
BLOCK = -(-4 * N // HUGE) * HUGE  # an output's block: its bytes rounded up to 2 MiB


@pytest.fixture
def cache():
    now = gn.options()
    if not now["huge_pages"] or now["host_cache_mb"] == 0:
        pytest.skip("the CPU output cache is turned off in this environment")
    E.empty_cache()
    yield
    E.empty_cache()


def _pair(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=g), torch.randn(N, generator=g)


def test_reused_block_gives_the_reference_gradient(cache):
    for seed in range(3):  # the first call allocates, the next two reuse the block
        a, b = _pair(seed)
        v, (ga, gb) = gn.l1_loss(a, b)
        want_v = ref.l1_loss(a.numpy().astype(np.float64), b.numpy().astype(np.float64))
        want_ga, want_gb = ref.l1_loss_backward(
            a.numpy().astype(np.float64), b.numpy().astype(np.float64), 1.0
        )
        assert abs(float(v) - float(want_v)) <= 1e-6 * max(1.0, abs(float(want_v)))
        np.testing.assert_allclose(ga.numpy(), want_ga, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(gb.numpy(), want_gb, rtol=1e-6, atol=1e-12)
        del v, ga, gb
    info = E.cache_info()
    assert info["hits"] >= 4, info  # two gradients per call, reused by calls 2 and 3


def test_live_outputs_never_share_memory(cache):
    a, b = _pair(0)
    _, (ga, gb) = gn.l1_loss(a, b)
    _, (ga2, gb2) = gn.l1_loss(b, a)
    ptrs = {t.data_ptr() for t in (ga, gb, ga2, gb2)}
    assert len(ptrs) == 4
    torch.testing.assert_close(ga, -ga2, rtol=0, atol=0)  # sign(a - b) vs sign(b - a)
    assert E.cache_info()["cached_blocks"] == 0
    del ga
    info = E.cache_info()
    assert info["cached_blocks"] == 1 and info["cached_bytes"] >= 4 * N


def test_autograd_keeps_the_cached_gradient_and_frees_it_to_the_cache(cache):
    a, b = _pair(1)
    x = a.clone().requires_grad_()
    gt.l1_loss(x, b).backward()
    want = torch.sign(a - b) / N
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    ptr = x.grad.data_ptr()
    x.grad = None  # zero_grad(set_to_none=True)
    assert E.cache_info()["cached_blocks"] == 1
    gt.l1_loss(x, b).backward()
    assert x.grad.data_ptr() == ptr  # the same block, pages already mapped
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def test_explicit_limit_is_respected(cache):
    a, b = _pair(2)
    outs = [gn.l1_loss(a, b)[1] for _ in range(3)]  # six live blocks
    with gn.options(host_cache_mb=(2 * BLOCK) >> 20) as now:  # room for exactly two
        assert now["host_cache_mb"] == (2 * BLOCK) >> 20
        del outs
        info = E.cache_info()
        assert info["limit_bytes"] == 2 * BLOCK and not info["sized_by_use"], info
        assert info["cached_blocks"] == 2 and info["cached_bytes"] == 2 * BLOCK, info
        with gn.options(host_cache_mb=0):  # a smaller bound frees what it no longer holds
            assert E.cache_info()["cached_blocks"] == 0
    assert gn.options()["host_cache_mb"] is None and E.cache_info()["sized_by_use"]


def _default_bound_run(body: str) -> list:
    """What ``body`` prints (JSON), run in a fresh process with the default bound, after
    ``a, b``: two float32 tensors of N elements."""
    code = (
        "import json, torch, genloss.native as gn\n"
        "from genloss.native import _engine as E\n"
        f"a = torch.randn({N}); b = torch.randn({N})\n" + body
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GENLOSS_HOST_CACHE_MB", "GENLOSS_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_default_bound_follows_the_recent_working_set():
    """In a fresh process with the default rule: k outputs alive at once make the bound k
    blocks (all k freed blocks are kept); after two windows of requests that hold one
    block at a time, the bound is one block and the cache keeps one."""
    held, freed, later = _default_bound_run(
        "outs = [gn.l1_loss(a, b)[1] for _ in range(3)]\n"
        "held = E.cache_info()\n"
        "del outs\n"
        "freed = E.cache_info()\n"
        "for _ in range(2 * freed['window_requests']):\n"
        "    gn.l1_loss(a, b, need_grad=(True, False))\n"
        "print(json.dumps([held, freed, E.cache_info()]))\n"
    )
    cap = min(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8, 4 << 30)
    assert held["cap_bytes"] == cap and held["sized_by_use"], held
    assert held["live_bytes"] == 6 * BLOCK and held["limit_bytes"] == min(6 * BLOCK, cap), held
    assert freed["cached_blocks"] == 6 and freed["cached_bytes"] == 6 * BLOCK, freed
    assert later["limit_bytes"] == BLOCK and later["cached_blocks"] == 1, later
    assert later["hits"] >= 2 * freed["window_requests"], later  # the loop reused its block


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, TypeError), ("64", TypeError), (True, TypeError)]
)
def test_bad_bound(value, error):
    with pytest.raises(error, match="host_cache_mb"):
        gn.options(host_cache_mb=value)


@pytest.mark.parametrize(
    ("env", "expect"),
    [({"GENLOSS_HOST_CACHE_MB": "0"}, (0, 0)), ({"GENLOSS_HUGE_PAGES": "0"}, (0, 0)), ({}, (1, 1))],
)
def test_environment_switches(env, expect):
    """Each switch in a fresh process: blocks cached after a freed output, and cache hits."""
    code = (
        "import torch, genloss.native as gn\n"
        "from genloss.native import _engine as E\n"
        f"a = torch.randn({N}); b = torch.randn({N})\n"
        "gn.l1_loss(a, b, need_grad=(True, False))\n"
        "c1 = E.cache_info()['cached_blocks']\n"
        "gn.l1_loss(a, b, need_grad=(True, False))\n"
        "print(c1, E.cache_info()['hits'])\n"
    )
    full = {**os.environ, **env}
    for k in ("GENLOSS_HOST_CACHE_MB", "GENLOSS_HUGE_PAGES"):
        if k not in env:
            full.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    blocks, hits = (int(v) for v in out.stdout.split())
    assert (min(blocks, 1), min(hits, 1)) == expect, out.stdout


def test_numpy_outputs_come_from_the_cache(cache):
    """A large NumPy gradient is a cached block too (a fresh np.empty page-faults on every call:
    a 16M-element l1_loss took 19 ms instead of 6.4): a writeable, C-contiguous ndarray with the
    reference's values, whose block the next call reuses once the array dies."""
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64, np.float16):
        n = E.HOST_CACHE_MIN_BYTES // np.dtype(dtype).itemsize + 1000
        a, b = (rng.normal(size=n).astype(dtype) for _ in range(2))
        ptrs = []
        for _ in range(2):
            _, (ga, _gb) = gn.l1_loss(a, b, need_grad=(True, False))
            assert isinstance(ga, np.ndarray) and ga.dtype == dtype and ga.flags.c_contiguous
            assert ga.flags.writeable
            want = (np.sign(a.astype(np.float64) - b.astype(np.float64)) / n).astype(dtype)
            np.testing.assert_array_equal(ga, want)
            ptrs.append(ga.__array_interface__["data"][0])
            ga[0] = 7  # the caller's array to write
            assert E.cache_info()["live_bytes"] >= ga.nbytes
            del ga
        assert ptrs[0] == ptrs[1], dtype
        assert E.cache_info()["live_bytes"] == 0


def test_numpy_outputs_stay_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=N).astype(np.float32)
    b = rng.normal(size=N).astype(np.float32)
    _, (ga, _gb) = gn.l1_loss(a, b)
    assert isinstance(ga, np.ndarray) and ga.flags.c_contiguous
    np.testing.assert_array_equal(ga, np.sign(a - b).astype(np.float32) / np.float32(N))


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_16bit_outputs_come_from_the_cache(cache, low):
    """A 16-bit gradient of 4 MiB or more is a cached block too (a fresh one page-faults on
    every call), reused by the next call, with the float32 path's values rounded once."""
    dt = getattr(torch, low)
    n = E.HOST_CACHE_MIN_BYTES // 2 + 1000  # 16-bit elements: just above the threshold
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(n, generator=g).to(dt) for _ in range(2))
    want = (torch.sign(a.float() - b.float()) / n).to(dt)  # d/da of mean |a - b|, rounded once
    ptrs = []
    for _ in range(2):
        v, (ga, _) = gn.l1_loss(a, b, need_grad=(True, False))
        assert ga.dtype == dt
        torch.testing.assert_close(ga, want, rtol=0, atol=0)
        ptrs.append(ga.data_ptr())
        del v, ga
    info = E.cache_info()
    assert ptrs[0] == ptrs[1] and info["hits"] >= 1 and info["cached_blocks"] == 1, info


def test_over_the_bound_the_block_freed_longest_ago_goes(cache):
    """After a phase of outputs of one size, a phase of larger outputs reuses its own blocks
    after its first call: over the bound, the first phase's blocks, no longer asked for, go
    (oldest first). Before, the bound kept them and dropped each freshly freed block: two
    misses (two fresh 10 MiB blocks) per call, for good."""
    a, b = _pair(4)
    a2, b2 = torch.cat([a, a]), torch.cat([b, b])
    block2 = -(-8 * N // HUGE) * HUGE
    with gn.options(host_cache_mb=(2 * block2) >> 20):  # room for the second phase's two blocks
        for _ in range(4):
            gn.l1_loss(a, b)
        assert E.cache_info()["cached_blocks"] == 2
        gn.l1_loss(a2, b2)
        first = E.cache_info()
        for _ in range(4):
            gn.l1_loss(a2, b2)
        later = E.cache_info()
    assert later["misses"] == first["misses"] and later["hits"] == first["hits"] + 8, (first, later)
    assert later["cached_blocks"] == 2 and later["cached_bytes"] == 2 * block2, later


def test_default_bound_keeps_the_blocks_of_sizes_that_take_turns():
    """In a fresh process with the default bound: two losses of different sizes, each call's
    outputs freed before the next call (each with its own backward), never hold more than one
    call's blocks at once, but each needs its own: after one round, every call reuses blocks.
    Bounded by the most bytes live at once, every call of the smaller one dropped the larger
    one's blocks and vice versa (page faults on every call)."""
    first, later = _default_bound_run(
        "a2 = torch.cat([a, a]); b2 = torch.cat([b, b])\n"
        "for _ in range(2):\n"
        "    gn.l1_loss(a, b); gn.l1_loss(a2, b2)\n"
        "first = E.cache_info()\n"
        "for _ in range(4):\n"
        "    gn.l1_loss(a, b); gn.l1_loss(a2, b2)\n"
        "print(json.dumps([first, E.cache_info()]))\n"
    )
    assert later["misses"] == first["misses"] and later["hits"] == first["hits"] + 16, (first, later)
    block2 = -(-8 * N // HUGE) * HUGE
    assert later["limit_bytes"] == 2 * BLOCK + 2 * block2, later
