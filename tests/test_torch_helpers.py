"""The torch-only GAN helpers: gradient_penalty (WGAN-GP), r1_penalty, r2_penalty.

Each is checked against the same penalty written directly in torch autograd
(an independent composite), including the GradScaler path and training the
critic through the penalty (create_graph).
"""

import pytest

torch = pytest.importorskip("torch")
gl = pytest.importorskip("genloss.torch")


def _critic(seed=0, shape=(3, 4, 5)):
    torch.manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()


def _assert_same_param_grads(critic, ours, direct):
    params = list(critic.parameters())
    g_ours = torch.autograd.grad(ours, params, allow_unused=True, retain_graph=True)
    g_direct = torch.autograd.grad(direct, params, allow_unused=True, retain_graph=True)
    assert sum(g is not None for g in g_ours) >= 3  # the critic is trained through the penalty
    for a, b in zip(g_ours, g_direct, strict=True):
        assert (a is None) == (b is None)  # the last bias does not move the input gradient
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _direct_gp(critic, real, fake, eps, lambda_, center, one_sided):
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    n = g.flatten(1).norm(dim=1)  # per sample over ALL non-batch dims
    r = (n - center).clamp_min(0) if one_sided else n - center
    return lambda_ * (r**2).mean()


@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("center", [1.0, 0.05])
def test_gradient_penalty_matches_direct_autograd(one_sided, center):
    critic = _critic()
    real = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    fake = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    ours = gl.gradient_penalty(critic, real, fake, 10.0, center, one_sided, generator=gen)
    eps = torch.rand((6, 1, 1, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    direct = _direct_gp(critic, real, fake, eps, 10.0, center, one_sided)
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=1e-14)
    # Training the critic through the penalty: parameter gradients agree too.
    _assert_same_param_grads(critic, ours, direct)


def test_gradient_penalty_with_grad_scaler_equals_unscaled():
    critic = _critic(1)
    real = torch.randn(4, 3, 4, 5, dtype=torch.float64)
    fake = torch.randn(4, 3, 4, 5, dtype=torch.float64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    a = gl.gradient_penalty(
        critic, real, fake, grad_scaler=scaler, generator=torch.Generator().manual_seed(3)
    )
    b = gl.gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # Without unscaling the inner gradient would be 4096x larger: the test can fail.
    assert abs(a.item()) < 1e4


@pytest.mark.parametrize("which", ["r1", "r2"])
def test_r1_r2_match_direct_autograd(which):
    critic = _critic(2)
    x = torch.randn(5, 3, 4, 5, dtype=torch.float64)
    fn = gl.r1_penalty if which == "r1" else gl.r2_penalty
    ours = fn(critic, x, gamma=3.0)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(xr).sum(), xr, create_graph=True)
    direct = 1.5 * g.flatten(1).pow(2).sum(1).mean()
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=1e-14)
    _assert_same_param_grads(critic, ours, direct)


def test_gradient_penalty_at_zero_gradient_is_finite_and_zero_grad():
    # A critic constant in x has grads = 0: penalty = lambda * center^2, gradient 0, never NaN.
    g = torch.zeros(3, 2, 2, dtype=torch.float64, requires_grad=True)
    v = gl.gradient_penalty_from_grads(g, lambda_=10.0, center=1.0)
    assert v.item() == pytest.approx(10.0)
    (dg,) = torch.autograd.grad(v, g)
    assert torch.equal(dg, torch.zeros_like(dg))


def test_gradient_penalty_bad_input():
    critic = _critic()
    with pytest.raises(ValueError, match="fake"):
        gl.gradient_penalty(critic, torch.randn(2, 3, 4, 5), torch.randn(3, 3, 4, 5))
    with pytest.raises(ValueError, match="lambda_"):
        gl.gradient_penalty_from_grads(torch.randn(2, 3), lambda_=float("nan"))


@pytest.mark.parametrize("penalty", ["gradient_penalty", "r1_penalty"])
def test_penalty_of_a_critic_that_ignores_its_input_is_refused(penalty):
    """A critic whose output does not depend on x (a detach() inside, a constant) has no input
    gradient to penalise: a ValueError naming the op and saying so, not autograd's 'appears to not
    have been used in the graph' (nor a silent lambda c^2); a grad_scaler that is not one: TypeError."""
    lin = torch.nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    call = (lambda c, **kw: gl.gradient_penalty(c, x, y, **kw)) if penalty == "gradient_penalty" else (
        lambda c, **kw: gl.r1_penalty(c, x, **kw))  # fmt: skip
    for critic in (lambda z: lin(z.detach()), lambda z: torch.ones(4, 1)):
        with pytest.raises(ValueError, match=f"^{penalty}: the critic's output does not depend on its input"):
            call(critic)
    with pytest.raises(TypeError, match=f"^{penalty}: grad_scaler must be a torch.amp.GradScaler"):
        call(lin, grad_scaler=object())


def test_no_grad_computes_no_gradient(monkeypatch):
    """Under no_grad / inference_mode the kernel is asked for the value only, even
    when the inputs require grad (a forward-only call must not write gradients)."""
    import genloss.native.gan as native_gan

    seen = []
    real = native_gan.l1_loss

    def spy(*args, need_grad=True, **kwargs):
        seen.append(need_grad)
        return real(*args, need_grad=need_grad, **kwargs)

    monkeypatch.setattr(gl.gan.OPS["l1_loss"], "native", spy)
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(4, 3)
    for ctx in (torch.no_grad, torch.inference_mode):
        seen.clear()
        with ctx():
            v = gl.l1_loss(x, y)
        assert not v.requires_grad
        assert seen and not any(any(s) if isinstance(s, tuple) else s for s in seen)
        torch.testing.assert_close(v, (x.detach() - y).abs().mean())
    seen.clear()
    gl.l1_loss(x, y).backward()
    assert seen == [(True, False)]  # with grad mode on: only the input that needs it
