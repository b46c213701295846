"""The native engine across processes: a child forked after the parent ran a parallel
kernel must not hang (GNU OpenMP's thread pool does not survive fork; the engine's
at-fork handler, cpp/src/config.cpp, runs the child single-threaded).

Each scenario runs in a fresh interpreter with a timeout, so a hang fails the test
instead of stalling the suite."""

import json
import subprocess
import sys

import numpy as np
import pytest

from genloss import reference as ref

# 2 x 40,000 elements: above the engine's parallel threshold (kParallelMin, 2**15),
# so the parent's call starts an OpenMP team of 2.
FORK_SCRIPT = r"""
import json, multiprocessing as mp, sys, threading
import numpy as np
import genloss.native as gn

def data(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(200, 200)) * 3, rng.normal(size=(200, 200)) * 3

def compute(seed, out):
    x, y = data(seed)
    v, (gx, gy) = gn.gan_d_loss(x, y)
    u, (lx, _) = gn.l1_loss(x, y)
    cfg = gn._engine._C.config()
    out.append([float(v), gx.tolist(), float(u), lx.tolist(), cfg["forked"], cfg["threads"]])

def work(seed):
    out = []
    compute(seed, out)  # the thread that forked: its stale OpenMP pool must stay unused
    if RAISE:
        gn.options(threads=2)
        compute(seed, out)  # still one thread here
        t = threading.Thread(target=compute, args=(seed, out))  # a fresh pool: 2 threads
        t.start()
        t.join()
    return out

RAISE = sys.argv[1] == "raise"
gn.options(threads=2)
parent = [work(s) for s in (1, 2)]  # the parent's team of 2 exists from here on
with mp.get_context("fork").Pool(2) as pool:
    children = pool.map(work, [1, 2])
print(json.dumps({"parent": parent, "children": children}))
"""


def _data(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(200, 200)) * 3, rng.normal(size=(200, 200)) * 3


def _run(mode: str) -> dict:
    try:
        p = subprocess.run(
            [sys.executable, "-c", FORK_SCRIPT, mode], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a forked child hung in its first native kernel (GNU OpenMP after fork)")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["default", "raise"])
def test_fork_after_parallel_kernel_does_not_hang(mode):
    """Pool(fork) children compute what the parent computed. In a child the thread that
    forked runs single-threaded, even after options(threads=2) ("raise"); a thread the
    child starts gets the 2 threads."""
    out = _run(mode)
    for seed, par, child in zip((1, 2), out["parent"], out["children"], strict=True):
        assert all(p[4] is False and p[5] == 2 for p in par)  # the parent: not forked, 2 threads
        assert all(c[4] is True for c in child)
        assert [c[5] for c in child] == ([1, 1, 2] if mode == "raise" else [1])
        # the thread count never changes a bit of a result (options docstring)
        for c in child:
            assert c[:4] == par[0][:4]
        x, y = _data(seed)  # and the values are the reference's
        np.testing.assert_allclose(child[0][0], ref.gan_d_loss(x, y), rtol=1e-12)
        np.testing.assert_allclose(child[0][1], ref.gan_d_loss_backward(x, y, 1.0)[0], rtol=1e-12, atol=1e-18)
        np.testing.assert_allclose(child[0][2], ref.l1_loss(x, y), rtol=1e-12)
