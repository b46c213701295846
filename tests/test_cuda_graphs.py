"""Every op under CUDA graph capture: fwd+bwd captured once, replayed on new inputs, equal to
the eager result on those inputs (issue 16, items 6 and 9): the ops with a registry record, and
the ops without one through their ``genloss verify`` cases (genloss.registry.VERIFY_CASES). A host
synchronisation inside an op (a value read back for a check, a blocking copy) makes capture fail
here; the ops whose result must be read on the host refuse capture with a ValueError saying why.

Its own file, run after the other CUDA tests (bench/gpu_check.py orders it last): a capture
that fails part-way must not disturb the cases that do not capture.
"""

from __future__ import annotations

import numpy as np
import pytest

from genloss import registry as R
from test_cuda import _cuda_tensors, _torch_step
from tolerances import assert_close

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.cuda

CASES = list(R.cases())


def refuses_capture(record, variant) -> bool:
    """The ops whose result needs a value read back on the host, which must refuse capture with
    a ValueError saying so: MMD with the median-heuristic bandwidth, Sinkhorn's convergence
    test. (The relativistic losses' batch means stay on the device: they capture.)"""
    kw = variant.kwargs
    if record.name == "mmd2":
        return kw.get("bandwidths") is None and kw.get("kernel", "rbf") in ("rbf", "imq")
    return record.name == "sinkhorn_divergence"


CASE_IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in CASES]


# torch 2.11 warns when a leaf's AccumulateGrad node made during the side-stream warm-up is
# still alive at capture (seen for six GAN ops, torch's own remedy is to drop every reference
# to the warm-up graph); autograd.grad is used here, so no gradient is accumulated on it.
@pytest.mark.filterwarnings("ignore:The AccumulateGrad node's stream:UserWarning")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")  # after a refusal
@pytest.mark.parametrize(("record", "variant", "reduction"), CASES, ids=CASE_IDS)
def test_capture_and_replay(record, variant, reduction, cuda_device):
    first = R.make_inputs(record, np.random.default_rng(1), np.float64, R.ODD_SIZES[0], variant)
    second = R.make_inputs(record, np.random.default_rng(2), np.float64, R.ODD_SIZES[0], variant)
    static = _cuda_tensors(record, first, cuda_device)
    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):  # warm-up (caches, lazily built tables) off the capture
        for _ in range(2):
            _torch_step(record, variant, reduction, static)
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if refuses_capture(record, variant):
        with pytest.raises(ValueError, match="CUDA graph capture"), torch.cuda.graph(graph):
            _torch_step(record, variant, reduction, static)
        return
    with torch.cuda.graph(graph):
        value, grads = _torch_step(record, variant, reduction, static)
    with torch.no_grad():
        for t, x in zip(static, second, strict=True):
            t.copy_(torch.from_numpy(np.asarray(x)).to(t.dtype))
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    eager_value, eager_grads = _torch_step(record, variant, reduction, static)
    label = f"{record.name}({variant.id}, {reduction}) replayed"
    assert_close(value, eager_value.detach(), "cuda", "float32", label + " value")
    for n, a, b in zip(record.differentiable, grads, eager_grads, strict=True):
        assert_close(a, b, "cuda", "float32", f"{label} d/d{n}")


# ------------------------------------------------------------------ the ops without a record


def case_refuses_capture(case, kwargs) -> bool:
    """The ops without a record whose result is read on the host: Python floats (kid, prdc),
    torch.linalg's status of its decompositions (frechet_distance), a convergence test
    (ot_coupling's Sinkhorn plan). 'exact' ot_coupling captures (the one-block Hungarian port)."""
    if case.name == "ot_coupling":
        return kwargs.get("method", "exact") == "sinkhorn"
    return case.name in ("kid", "prdc", "frechet_distance")


def _on(device, a):
    """A draw's argument on the device: float arrays as float32, integer ones as int64, lists
    element by element, anything else (levels, seeds) as it is."""
    if isinstance(a, list):
        return [_on(device, x) for x in a]
    if not isinstance(a, np.ndarray):
        return a
    t = torch.from_numpy(np.array(a, copy=True)).to(device)
    return t.float() if t.is_floating_point() else t.long()


def _flat(args) -> list:
    out: list = []
    for a in args:
        out += _flat(a) if isinstance(a, list) else ([a] if isinstance(a, torch.Tensor) else [])
    return out


def _case_step(case, args, kwargs, leaves, upstream):
    """The op's outputs and the gradient of sum(upstream * output) w.r.t. the leaves."""
    outs = case.outputs_of(case.torch_fn(*args, **kwargs))
    if not leaves:
        return outs, ()
    total = sum((u * o).sum() for o, u in zip(outs, upstream, strict=True) if u is not None)
    return outs, torch.autograd.grad(total, leaves, allow_unused=True)


def _same(a, b, label):
    if a is None or b is None:
        assert a is None and b is None, f"{label}: a gradient is missing on one side"
    elif a.is_floating_point():
        assert_close(a, b.detach(), "cuda", "float32", label)
    else:
        assert torch.equal(a, b), f"{label}: differs"


VERIFY_CALLS = [(c, i) for c in R.VERIFY_CASES for i in range(len(c.draw(np.random.default_rng(1))))]


@pytest.mark.filterwarnings("ignore:The AccumulateGrad node's stream:UserWarning")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")
@pytest.mark.parametrize(("case", "call"), VERIFY_CALLS, ids=[f"{c.name}-{i}" for c, i in VERIFY_CALLS])
def test_capture_and_replay_ops_without_record(case, call, cuda_device):
    """Each call of each verify case: captured after a warm-up (fwd and the backward of a random
    weighting of the differentiable outputs), replayed on new data in the same buffers (every
    tensor reversed along its first dimension: the same domain, other values), equal to eager on
    that data; or refused with a ValueError naming CUDA graph capture."""
    rng = np.random.default_rng(1)
    raw, kwargs = case.draw(rng)[call]
    if case.dtype_kw:
        kwargs = {**kwargs, case.dtype_kw: torch.float32}
    args = [_on(cuda_device, a) for a in raw]
    leaves = []
    for i in case.differentiable:
        leaves += args[i] if isinstance(args[i], list) else [args[i]]
    for t in leaves:
        t.requires_grad_(True)
    upstream = []  # the weights of the differentiable outputs (a case with gradients has no ``post``)
    if leaves:
        ref = case.outputs_of(case.reference(*raw, **kwargs))
        upstream = [
            torch.from_numpy(rng.standard_normal(np.shape(r))).float().to(cuda_device) if o.grad else None
            for o, r in zip(case.outputs, ref, strict=True)
        ]
    side = torch.cuda.Stream(device=cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    graph = torch.cuda.CUDAGraph()
    label = f"{case.name}[{call}] replayed"
    if case_refuses_capture(case, kwargs):
        with pytest.raises(ValueError, match="CUDA graph capture"), torch.cuda.graph(graph):
            _case_step(case, args, kwargs, leaves, upstream)
        return
    with torch.cuda.stream(side):  # warm-up (kept directions, constants) off the capture
        for _ in range(2):
            _case_step(case, args, kwargs, leaves, upstream)
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    with torch.cuda.graph(graph):
        outs, grads = _case_step(case, args, kwargs, leaves, upstream)
    with torch.no_grad():
        for t in _flat(args):
            if t.dim():
                t.copy_(t.flip(0))
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    eager_outs, eager_grads = _case_step(case, args, kwargs, leaves, upstream)
    for k, (a, b) in enumerate(zip(outs, eager_outs, strict=True)):
        _same(a, b, f"{label} output {k}")
    for k, (a, b) in enumerate(zip(grads, eager_grads, strict=True)):
        _same(a, b, f"{label} gradient {k}")


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")
@pytest.mark.parametrize("helper", ["median_bandwidth", "GaussianMoments.update"])
def test_host_valued_helpers_refuse_capture(helper, cuda_device):
    """A Python float (the median) or a Python count (the streaming moments' n, which a replay would
    not advance): refused under capture with a ValueError naming it, before any work."""
    import genloss.torch as gt

    x = torch.randn(20, 3, device=cuda_device)
    moments = gt.GaussianMoments().update(x)  # eager: fine
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=rf"{helper}: .*CUDA graph capture"), torch.cuda.graph(graph):
        if helper == "median_bandwidth":
            gt.median_bandwidth(x, x + 1.0)
        else:
            moments.update(x)
    assert moments.n == 20


@pytest.mark.parametrize("fn", ["quantile", "cdf", "density"])
@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode", "cosmap", "lognormal_sigma"])
def test_timestep_maps_capture_and_replay(fn, kind, cuda_device):
    """timestep_quantile / cdf / density (FLOW.6, FLOW.7: torch ops on the device, 'mode''s fixed Newton
    steps included): captured, replayed on new times, equal to eager and to the reference."""
    import genloss.torch as gt
    from genloss.reference import flow as RF

    op = getattr(gt, f"timestep_{fn}")
    gen = torch.Generator(device=cuda_device).manual_seed(3)
    x = torch.rand(1000, device=cuda_device, dtype=torch.float64, generator=gen)
    op(x, kind)  # eager warm-up (its data check runs here; not under capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, kind)
    x.copy_(torch.rand(1000, device=cuda_device, dtype=torch.float64, generator=gen))
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    torch.testing.assert_close(out, op(x, kind), rtol=0, atol=0)
    want = getattr(RF, f"timestep_{fn}")(x.cpu().numpy(), kind)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-12, atol=0)


def test_sample_timesteps_on_a_cuda_generator_captures(cuda_device):
    """(FLOW.6, FLOW.8) a generator on the GPU: draws and the inverse CDF on the device, captured in a
    CUDA graph with the generator registered; each replay draws anew, from the logit-normal law
    (the reference's CDF of the draws is uniform: Kolmogorov-Smirnov, 4096 draws)."""
    import genloss.torch as gt
    from genloss.reference import flow as RF

    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        pytest.skip("this torch cannot register a generator with a CUDA graph")
    gen = torch.Generator(device=cuda_device).manual_seed(7)
    assert gt.sample_timesteps(8, "logit_normal", gen).device.type == "cuda"  # eager warm-up
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = gt.sample_timesteps(4096, "logit_normal", gen, dtype=torch.float64)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)
    for draws in (first, out):
        u = np.sort(RF.timestep_cdf(draws.cpu().numpy(), "logit_normal"))
        ks = np.max(np.maximum(np.arange(1, 4097) / 4096 - u, u - np.arange(4096) / 4096))
        assert ks < 1.95 / np.sqrt(4096)  # the 0.1 % critical value
