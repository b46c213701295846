"""The torch-only VDM pieces: LearnedSNRSchedule and vdm_schedule_variance_grad (DIF.20-DIF.22).

Oracles: the schedule's definition (monotone, exact end points), central finite differences
and plain autograd for its derivatives, the closed forms of a toy problem (1-D Gaussian data,
a fixed analytic denoiser conditioned on gamma) whose loss mean and variance are one-dimensional
integrals taken by Gauss-Legendre quadrature, and the gradient of the sample second moment
computed directly by autograd and by finite differences.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gl = pytest.importorskip("genloss.torch")

import genloss.reference.diffusion as R  # noqa: E402
from tolerances import assert_close  # noqa: E402

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]

# torch 2.13 internals that -W error would turn into failures (see tests/test_torch_ops.py).
TORCH_INTERNAL_WARNINGS = (
    "ignore:.*should not be instantiated:DeprecationWarning",
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
)


def _schedule(hidden_size=8, seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    return gl.LearnedSNRSchedule(hidden_size=hidden_size, dtype=dtype, **kw)


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


# ----------------------------------------------------------------------------- the schedule (DIF.20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("hidden_size", "seed", "ends"), [(1, 0, (-13.3, 5.0)), (7, 1, (-5.0, 5.0)), (1024, 2, (-13.3, 5.0))]
)
def test_gamma_increasing_and_exact_at_endpoints(dtype, hidden_size, seed, ends):
    s = _schedule(hidden_size, seed, dtype, gamma_0=ends[0], gamma_1=ends[1])
    with torch.no_grad():
        if hidden_size == 7:  # a strongly bent schedule: steep, nearly saturated hidden units
            s.raw_hidden_weight.mul_(4.0)
            s.raw_out_weight.add_(3.0)
        t = torch.linspace(0, 1, 1001, dtype=dtype)
        gamma = s(t)
        assert gamma.dtype == dtype and gamma.shape == t.shape
        assert bool((gamma[1:] > gamma[:-1]).all()), "gamma must be strictly increasing on the grid"
        g0, g1 = s.gamma_0.item(), s.gamma_1.item()
        # exactly the end points (bitwise), at t = 0 and 1 inside a batch and alone
        assert gamma[0].item() == g0 and gamma[-1].item() == g1
        assert s(torch.tensor(0.0, dtype=dtype)).item() == g0
        assert s(torch.tensor(1.0, dtype=dtype)).item() == g1
        odd = torch.tensor([[1.0, 0.3], [0.0, 1.0], [0.5, 0.0]], dtype=dtype)  # any shape
        out = s(odd)
        assert out.shape == odd.shape
        assert (out[odd == 0] == g0).all() and (out[odd == 1] == g1).all()
        assert s(0.0).item() == g0  # a Python float is accepted
    # float64 parameters with float32 times: computed in the promoted dtype
    assert _schedule(3)(torch.tensor([0.5], dtype=torch.float32)).dtype == F64


@pytest.mark.parametrize("hidden_size", [1, 5])
def test_dgamma_dt_matches_finite_differences_and_autograd(hidden_size):
    s = _schedule(hidden_size, seed=3)
    t = torch.tensor([0.0, 1e-3, 0.2, 0.5, 0.77, 0.999, 1.0], dtype=F64)
    gamma, dgamma = s.gamma_and_derivative(t)
    assert bool((dgamma > 0).all())
    # central differences (one-sided at the ends of [0, 1])
    h = 1e-6
    with torch.no_grad():
        tp, tm = (t + h).clamp(max=1.0), (t - h).clamp(min=0.0)
        fd = (s(tp) - s(tm)) / (tp - tm)
    assert_close(
        dgamma, fd, "fd", F64, "dgamma/dt vs finite differences", scale=float(dgamma.detach().abs().max())
    )
    # the closed form against autograd through gamma(t)
    tt = t.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(s(tt).sum(), tt)
    torch.testing.assert_close(dgamma, auto, rtol=1e-13, atol=1e-12)
    # and the module's derivative of u against d gamma / dt: gamma' = (gamma_1 - gamma_0) u'
    out = s.evaluate(t)
    torch.testing.assert_close(out.dgamma_dt, (s.gamma_1 - s.gamma_0) * out.du_dt, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parameter_gradients_finite(dtype):
    s = _schedule(16, seed=4, dtype=dtype)
    t = torch.cat([torch.tensor([0.0, 1.0], dtype=dtype), torch.rand(30, dtype=dtype)])
    gamma, dgamma = s.gamma_and_derivative(t)
    alpha, sigma = s.alpha_sigma(t)
    (gamma.sum() + dgamma.sum() + alpha.sum() + sigma.sum()).backward()
    for name, p in s.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    # at the end points gamma is the end point whatever the interior: its interior gradient is 0
    s.zero_grad()
    s(torch.tensor([0.0, 1.0], dtype=dtype)).sum().backward()
    for p in s.interior_parameters():
        assert float(p.grad.abs().max()) <= 1e-6 * (s.gamma_1.item() - s.gamma_0.item())
    torch.testing.assert_close(s.gamma_0.grad, torch.ones((), dtype=dtype))


def test_gamma_and_derivative_gradcheck_in_parameters():
    """gamma and dgamma/dt are differentiable in every parameter, twice, by plain autograd."""
    s = _schedule(3, seed=5)
    names = [n for n, _ in s.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in s.parameters())
    t = torch.tensor([0.0, 0.13, 0.5, 0.91, 1.0], dtype=F64)

    def gamma_and_derivative(*ps):
        return torch.func.functional_call(s, dict(zip(names, ps, strict=True)), (t,), strict=True)

    def both(*ps):  # through the public method, with the parameters swapped in
        return torch.func.functional_call(
            _Derivative(s), {f"s.{n}": p for n, p in zip(names, ps, strict=True)}, (t,), strict=True
        )

    assert torch.autograd.gradcheck(gamma_and_derivative, params)
    assert torch.autograd.gradcheck(both, params)
    assert torch.autograd.gradgradcheck(both, params)


class _Derivative(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, t):
        return torch.stack(self.s.gamma_and_derivative(t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_sigma(dtype):
    s = _schedule(8, seed=6, dtype=dtype)
    t = torch.linspace(0, 1, 257, dtype=dtype)
    alpha, sigma = s.alpha_sigma(t)
    gamma = s(t)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=4 * eps)
    # alpha^2 = exp(log sigmoid(-gamma)): exp turns the absolute rounding of its argument
    # (|log sigmoid| <= |gamma| <= 13.3, times eps) into relative error, so up to ~16 eps here
    tol = (4 + float(gamma.detach().abs().max())) * eps
    torch.testing.assert_close(alpha**2, torch.sigmoid(-gamma), rtol=tol, atol=0)
    torch.testing.assert_close(sigma**2, torch.sigmoid(gamma), rtol=tol, atol=0)
    # far outside any schedule: finite, alpha ~ e^{-gamma/2} keeps its relative accuracy
    g = torch.tensor([-1e4, -50.0, 0.0, 50.0, 300.0, 1e4], dtype=dtype, requires_grad=True)
    a, sg = gl.alpha_sigma_from_gamma(g)
    assert bool(torch.isfinite(a).all() and torch.isfinite(sg).all())
    torch.testing.assert_close(a[4], torch.exp(torch.tensor(-150.0, dtype=dtype)), rtol=8 * eps, atol=0)
    (a.sum() + sg.sum()).backward()
    assert bool(torch.isfinite(g.grad).all())


# ----------------------------------------------------------------------------- the toy problem
# x ~ N(0, S^2) in one dimension, z = alpha x + sigma eps, and the fixed denoiser
# eps_hat(z, gamma) = k(gamma) z with k = sigma / (alpha^2 s^2 + sigma^2): the posterior mean of
# eps for data of scale s (s = S is the optimal denoiser; s != S a wrong one).  The error
# eps - eps_hat is N(0, m(gamma)) with m = (1 - k sigma)^2 + k^2 alpha^2 S^2, so per time the loss
# l = 1/2 gamma' m chi^2_1, E[l] = 1/2 int m(gamma) dgamma (DIF.16) and
# E[l^2] = 3/4 int_0^1 gamma'(t)^2 m(gamma(t))^2 dt (a Gaussian's fourth moment is 3 m^2).
S_DATA = 1.0
S_MODEL = 0.8
NODES, WEIGHTS = np.polynomial.legendre.leggauss(400)


def _k(gamma, s_model):
    a2, s2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
    return s2.sqrt() / (a2 * s_model**2 + s2)


def _toy_losses(out, x, eps, s_model=S_MODEL):
    alpha, sigma = gl.alpha_sigma_from_gamma(out.gamma)
    z = alpha * x + sigma * eps
    eps_hat = _k(out.gamma, s_model) * z
    return 0.5 * out.dgamma_dt * (eps - eps_hat) ** 2  # (DIF.16), one element per sample


def _m(gamma, s_model=S_MODEL):
    k = _k(gamma, s_model)
    a2, s2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
    return (1 - k * s2.sqrt()) ** 2 + k**2 * a2 * S_DATA**2


def _exact_mean_and_variance(s):
    """E[l] and Var[l] for t ~ U(0, 1), by 400-node Gauss-Legendre quadrature over t."""
    t = torch.tensor((NODES + 1) / 2, dtype=F64)
    w = torch.tensor(WEIGHTS / 2, dtype=F64)
    gamma, dgamma = s.gamma_and_derivative(t)
    m = _m(gamma)
    mean = (w * 0.5 * dgamma * m).sum()
    second = (w * 0.75 * dgamma**2 * m**2).sum()
    return mean, second - mean**2


def _draw(n, gen):
    t = torch.rand(n, generator=gen, dtype=F64)
    x = S_DATA * torch.randn(n, generator=gen, dtype=F64)
    eps = torch.randn(n, generator=gen, dtype=F64)
    return t, x, eps


def test_toy_losses_are_the_reference_continuous_loss():
    s = _schedule(4, seed=7)
    t, x, eps = _draw(64, torch.Generator().manual_seed(0))
    out = s.evaluate(t)
    alpha, sigma = gl.alpha_sigma_from_gamma(out.gamma)
    eps_hat = _k(out.gamma, S_MODEL) * (alpha * x + sigma * eps)
    ref = R.vdm_continuous_loss(
        eps[:, None].numpy(), eps_hat[:, None].detach().numpy(), out.dgamma_dt.detach().numpy(), "none"
    )
    assert_close(_toy_losses(out, x, eps), ref, "torch", F64, "toy loss vs reference vdm_continuous_loss")


# ----------------------------------------------------------------------------- the variance gradient (DIF.22)


class _Denoiser(torch.nn.Module):
    """The toy denoiser with a learnable data scale: a stand-in for the network's parameters."""

    def __init__(self):
        super().__init__()
        self.s_model = torch.nn.Parameter(torch.tensor(S_MODEL, dtype=F64))

    def forward(self, out, x, eps):
        return _toy_losses(out, x, eps, self.s_model)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_variance_grad_gives_interior_the_second_moment_and_endpoints_the_mean(reduction):
    s, net = _schedule(6, seed=8), _Denoiser()
    t, x, eps = _draw(48, torch.Generator().manual_seed(1))
    t[:2] = torch.tensor([0.0, 1.0], dtype=F64)  # the end points are ordinary times
    interior, ends, theta = s.interior_parameters(), s.endpoint_parameters(), list(net.parameters())
    reduce = torch.mean if reduction == "mean" else torch.sum

    out = s.evaluate(t)
    losses = net(out, x, eps)
    value = gl.vdm_schedule_variance_grad(losses, out, reduction)
    torch.testing.assert_close(value, reduce(losses), rtol=0, atol=0)
    g_int, g_end, g_theta = (_flat(g) for g in _grads(value, (interior, ends, theta)))

    # independently: fresh graphs, plain autograd of the second moment and of the mean
    direct = reduce(net(s.evaluate(t), x, eps) ** 2)
    plain = reduce(net(s.evaluate(t), x, eps))
    torch.testing.assert_close(g_int, _flat(torch.autograd.grad(direct, interior)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        g_end, _flat(torch.autograd.grad(plain, ends, retain_graph=True)), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(g_theta, _flat(torch.autograd.grad(plain, theta)), rtol=1e-12, atol=1e-12)
    assert float(g_int.abs().max()) > 1e-3  # the check is not vacuous


def _grads(value, groups):
    flat = [p for g in groups for p in g]
    grads = torch.autograd.grad(value, flat)
    out, i = [], 0
    for g in groups:
        out.append(grads[i : i + len(g)])
        i += len(g)
    return out


def test_variance_grad_interior_matches_finite_differences():
    """The interior gradient is d/deta of the batch mean of l_b^2, by central differences."""
    s = _schedule(2, seed=9)
    t, x, eps = _draw(32, torch.Generator().manual_seed(2))
    out = s.evaluate(t)
    value = gl.vdm_schedule_variance_grad(_toy_losses(out, x, eps), out)
    interior = s.interior_parameters()
    analytic = _flat(torch.autograd.grad(value, interior)).numpy()

    def second_moment():
        with torch.no_grad():
            return float((_toy_losses(s.evaluate(t), x, eps) ** 2).mean())

    fd = []
    for p in interior:
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            x0 = float(flat[i])
            h = 1e-6 * max(1.0, abs(x0))
            flat[i] = x0 + h
            fp = second_moment()
            flat[i] = x0 - h
            fm = second_moment()
            flat[i] = x0
            fd.append((fp - fm) / (2 * h))
    assert_close(analytic, np.array(fd), "fd", F64, "d mean(l^2) / d interior", scale=float(np.abs(fd).max()))


def test_variance_grad_is_unbiased_for_the_exact_variance_gradient():
    """Averaged over draws, the interior gradient is grad Var[l] of the exact (quadrature) variance.

    The exact mean's interior gradient is 0 (DIF.16: the value depends on the end points only),
    so grad Var = grad E[l^2]; 40 batches of 5000 give the Monte-Carlo mean and its standard error.
    """
    s = _schedule(4, seed=0)
    interior = s.interior_parameters()
    mean, var = _exact_mean_and_variance(s)
    g_mean = _flat(torch.autograd.grad(mean, interior, retain_graph=True))
    g_var = _flat(torch.autograd.grad(var, interior))
    assert float(g_mean.abs().max()) < 1e-12 * float(g_var.abs().max()) + 1e-12  # the invariance
    gen = torch.Generator().manual_seed(3)
    chunks = []
    for _ in range(40):
        t, x, eps = _draw(5000, gen)
        out = s.evaluate(t)
        value = gl.vdm_schedule_variance_grad(_toy_losses(out, x, eps), out)
        chunks.append(_flat(torch.autograd.grad(value, interior)))
    g = torch.stack(chunks)
    est, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    z = (est - g_var) / se
    assert float(z.abs().max()) < 4.5, f"z-scores {z}"  # 13 entries: P(|z| > 4.5 anywhere) ~ 1e-4


def test_training_the_interior_lowers_variance_and_keeps_the_mean():
    """Adam on the interior parameters with the variance gradient: the estimator's variance falls
    (exact and empirical), its mean stays where it was (exactly, and within the standard error)."""
    s = _schedule(16, seed=0)
    with torch.no_grad():
        mean0, var0 = (float(v) for v in _exact_mean_and_variance(s))
    ends0 = (s.gamma_0.item(), s.gamma_1.item())
    probe = _draw(20000, torch.Generator().manual_seed(11))  # common random numbers before/after

    def empirical():
        with torch.no_grad():
            return _toy_losses(s.evaluate(probe[0]), probe[1], probe[2])

    before = empirical()
    opt = torch.optim.Adam(s.interior_parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(12)
    for _ in range(200):
        t, x, eps = _draw(512, gen)
        out = s.evaluate(t)
        opt.zero_grad()
        gl.vdm_schedule_variance_grad(_toy_losses(out, x, eps), out).backward()
        opt.step()
    after = empirical()
    with torch.no_grad():
        mean1, var1 = (float(v) for v in _exact_mean_and_variance(s))
    # the variance-optimal schedule has gamma' m(gamma) constant: Var = (2 E[l])^2 / 2
    var_opt = (2 * mean0) ** 2 / 2
    assert (s.gamma_0.item(), s.gamma_1.item()) == ends0
    # measured: 122.6 -> 101.6 of a possible 89.9 (64% of the gain); asked: 40%
    assert var1 < var0 - 0.4 * (var0 - var_opt), (var0, var1, var_opt)
    assert var1 >= var_opt * (1 - 1e-9)
    assert abs(mean1 - mean0) < 1e-10 * mean0  # DIF.16: the interior cannot move the mean
    assert float(after.var()) < 0.9 * float(before.var())
    n = before.numel()
    se = math.sqrt(float(before.var()) / n + float(after.var()) / n)
    assert abs(float(after.mean()) - float(before.mean())) < 4 * se
    assert abs(float(after.mean()) - mean0) < 4 * math.sqrt(float(after.var()) / n)


def test_variance_grad_with_frozen_or_fixed_parts():
    # fixed end points: buffers, no endpoint parameters; the interior still trains
    s = _schedule(4, seed=1, learn_endpoints=False)
    assert s.endpoint_parameters() == [] and "gamma_0" in dict(s.named_buffers())
    t, x, eps = _draw(16, torch.Generator().manual_seed(4))
    out = s.evaluate(t)
    value = gl.vdm_schedule_variance_grad(_toy_losses(out, x, eps), out)
    direct = (_toy_losses(s.evaluate(t), x, eps) ** 2).mean()
    torch.testing.assert_close(
        _flat(torch.autograd.grad(value, s.interior_parameters())),
        _flat(torch.autograd.grad(direct, s.interior_parameters())),
    )
    # frozen interior: the end points get the ordinary gradient, nothing to rescale
    s = _schedule(4, seed=1)
    for p in s.interior_parameters():
        p.requires_grad_(False)
    out = s.evaluate(t)
    value = gl.vdm_schedule_variance_grad(_toy_losses(out, x, eps), out)
    plain = _toy_losses(s.evaluate(t), x, eps).mean()
    torch.testing.assert_close(
        _flat(torch.autograd.grad(value, s.endpoint_parameters())),
        _flat(torch.autograd.grad(plain, s.endpoint_parameters())),
    )


# ----------------------------------------------------------------------------- bad arguments


def test_bad_arguments_name_the_argument():
    bad_init = [
        (dict(gamma_0=float("nan")), ValueError, "gamma_0"),
        (dict(gamma_1=float("inf")), ValueError, "gamma_1"),
        (dict(gamma_0=5.0, gamma_1=5.0), ValueError, "gamma_0"),
        (dict(gamma_0=6.0, gamma_1=5.0), ValueError, "gamma_0"),
        (dict(hidden_size=0), ValueError, "hidden_size"),
        (dict(hidden_size=2.0), TypeError, "hidden_size"),
        (dict(gamma_0="a"), TypeError, "gamma_0"),
        (dict(learn_endpoints=1), TypeError, "learn_endpoints"),
        (dict(dtype=torch.int64), TypeError, "dtype"),
        (dict(dtype="float32"), TypeError, "dtype"),  # an AttributeError before
        (dict(device="gpu"), ValueError, "device"),  # torch's RuntimeError before
    ]
    for kw, exc, name in bad_init:  # named after the class, as the ops are (it was "gamma_0 must ...")
        with pytest.raises(exc, match=f"^LearnedSNRSchedule: {name}"):
            gl.LearnedSNRSchedule(**kw)
    s = _schedule(4)
    for t, exc in [
        (torch.tensor([0.5, 1.5], dtype=F64), ValueError),
        (torch.tensor([-1e-9], dtype=F64), ValueError),
        (torch.tensor([float("nan")], dtype=F64), ValueError),
        (torch.tensor([0, 1]), TypeError),
        ("0.5", TypeError),
        (2.0, ValueError),
    ]:
        with pytest.raises(exc, match=r"^LearnedSNRSchedule: t "):
            s(t)
    with pytest.raises(TypeError, match="gamma"):
        gl.alpha_sigma_from_gamma(torch.tensor([1, 2]))

    t, x, eps = _draw(8, torch.Generator().manual_seed(5))
    out = s.evaluate(t)
    losses = _toy_losses(out, x, eps)
    for args, exc, name in [
        ((losses[:4], out), ValueError, "losses"),
        ((losses[:, None], out), ValueError, "losses"),
        ((losses.sum(), out), ValueError, "losses"),
        ((losses.detach().long(), out), TypeError, "losses"),
        ((losses, (out.gamma, out.dgamma_dt)), TypeError, "schedule_output"),
    ]:
        with pytest.raises(exc, match=name):
            gl.vdm_schedule_variance_grad(*args)
    with pytest.raises(ValueError, match="reduction"):
        gl.vdm_schedule_variance_grad(losses, out, "none")
    gl.vdm_schedule_variance_grad(losses, out)
    with pytest.raises(ValueError, match="schedule_output"):  # hooks twice would scale by 4 l^2
        gl.vdm_schedule_variance_grad(losses, out)


# ----------------------------------------------------------------------------- compile and CUDA


@pytest.mark.filterwarnings(TORCH_INTERNAL_WARNINGS[0])
@pytest.mark.filterwarnings(TORCH_INTERNAL_WARNINGS[1])
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend):
    s = _schedule(8, seed=10)
    t = torch.cat([torch.tensor([0.0, 1.0], dtype=F64), torch.rand(14, dtype=F64)])
    torch._dynamo.reset()
    compiled = torch.compile(s.gamma_and_derivative, fullgraph=True, backend=backend)
    results = []
    for f in (s.gamma_and_derivative, compiled):
        g, d = f(t)
        loss = (g * torch.linspace(-1, 1, 16, dtype=F64)).sum() + (d**2).sum()
        results.append((g, d, torch.autograd.grad(loss, list(s.parameters()))))
    (eg, ed, egrads), (cg, cd, cgrads) = results
    assert cg[0].item() == s.gamma_0.item() and cg[1].item() == s.gamma_1.item()
    assert_close(cg, eg, "compile", F64, f"compiled gamma [{backend}]")
    assert_close(cd, ed, "compile", F64, f"compiled dgamma/dt [{backend}]")
    # the loss adds 16 terms d^2 ~ 300: its gradients round relative to that sum, not to 1
    scale = float((ed.detach() ** 2).sum())
    for a, b in zip(cgrads, egrads, strict=True):
        assert_close(a, b, "compile", F64, f"compiled parameter gradient [{backend}]", scale=scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
def test_cuda_matches_cpu():
    # plain torch: a CUDA device is enough (no `cuda` marker, which also asks for a CUDA build of genloss)
    s = _schedule(32, seed=11, dtype=torch.float32)
    t = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(100)])
    cpu = s.evaluate(t)
    s_cuda = s.to("cuda")
    dev = s_cuda.evaluate(t.to("cuda"))
    for a, b, what in zip(dev, cpu, ("gamma", "dgamma_dt", "u", "du_dt"), strict=True):
        assert_close(a, b, "cuda", torch.float32, f"{what} on CUDA")
    assert dev.gamma[0].item() == s.gamma_0.item() and dev.gamma[1].item() == s.gamma_1.item()
