r"""The torch diffusion pieces the registry does not cover (no float array input or a model
callback): schedules, SNR weights, low-discrepancy times, the full bound; and the schedule
held as float64 buffers whatever the input dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peers import peer

torch = pytest.importorskip("torch")
gt = pytest.importorskip("genloss.torch")

from genloss.reference import diffusion as R  # noqa: E402

ZERO_SNR = R.DiffusionSchedule(np.r_[R.linear_betas(9, 1e-4, 0.2), 1.0])  # alpha_bar = 0 at the end


@pytest.mark.parametrize(
    ("fn", "args"), [("linear_betas", (50, 1e-4, 0.02)), ("cosine_betas", (40, 0.008, 0.999))]
)
def test_betas_match_reference(fn, args):
    got = getattr(gt, fn)(*args)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), getattr(R, fn)(*args))


def test_schedule_buffers_are_the_reference_arrays_in_float64():
    ref = R.DiffusionSchedule(R.cosine_betas(30))
    s = gt.DiffusionSchedule(torch.from_numpy(np.array(ref.betas)))
    for name in R.DiffusionSchedule._ARRAYS:
        buf = getattr(s, name)
        assert buf.dtype == torch.float64, name
        np.testing.assert_array_equal(buf.numpy(), getattr(ref, name), err_msg=name)
    assert len(s) == 30 and s.state_dict() == {}  # derived from betas: nothing to save
    t = torch.tensor([0, 7, 29])
    g = s.gather("sqrt_alpha_bar", t)
    assert g.dtype == torch.float32
    np.testing.assert_array_equal(g.numpy(), ref.sqrt_alpha_bar[[0, 7, 29]].astype(np.float32))
    with pytest.raises(ValueError, match="betas"):
        gt.DiffusionSchedule(torch.tensor([0.1, 1.5]))


def test_low_precision_inputs_read_the_float64_schedule():
    """float16 data: the kernel computes in float32 with float64 coefficients, so q_sample equals
    the float64 reference on the float16 values to float32 accuracy (a float16 schedule would be
    off by ~1e-3)."""
    ref = R.DiffusionSchedule(R.linear_betas(100))
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.uniform(-1, 1, (4, 16))).half()
    noise = torch.from_numpy(rng.standard_normal((4, 16))).half()
    t = torch.tensor([0, 1, 50, 99])
    got = gt.q_sample(x0, t, noise, ref)
    assert got.dtype == torch.float32
    want = R.q_sample(x0.double().numpy(), t.numpy(), noise.double().numpy(), ref)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-7, atol=2e-7)


@pytest.mark.parametrize("kind", R.SNR_WEIGHTINGS)
@pytest.mark.parametrize("prediction", R.PREDICTIONS)
@pytest.mark.parametrize("sched", ["cosine", "zero_snr"])
def test_snr_weights_match_reference(kind, prediction, sched):
    s = R.DiffusionSchedule(R.cosine_betas(40)) if sched == "cosine" else ZERO_SNR
    t = np.arange(s.num_timesteps)
    try:
        want = R.snr_weights(t, s, kind, prediction, gamma=3.0)
    except ValueError as e:  # an unbounded weight: the torch layer refuses it too, with the message
        with pytest.raises(ValueError, match="unbounded weight"):
            gt.snr_weights(torch.from_numpy(t), s, kind, prediction, gamma=3.0)
        assert "unbounded" in str(e)
        return
    got = gt.snr_weights(torch.from_numpy(t), s, kind, prediction, gamma=3.0, dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=0)
    assert gt.snr_weights(torch.from_numpy(t), s, kind, prediction, gamma=3.0).dtype == torch.float32


def test_snr_weights_bad_arguments():
    s = R.DiffusionSchedule(R.cosine_betas(10))
    t = torch.tensor([0, 3])
    for kwargs, name in [
        ({"kind": "x"}, "kind"),
        ({"prediction": "y"}, "prediction"),
        ({"gamma": 0.0}, "gamma"),
    ]:
        with pytest.raises(ValueError, match=name):
            gt.snr_weights(t, s, **kwargs)
    with pytest.raises(ValueError, match="t must lie in"):
        gt.snr_weights(torch.tensor([10]), s)
    with pytest.raises(TypeError, match="t must be"):
        gt.snr_weights(torch.tensor([1.0]), s)
    # an integer dtype would truncate every weight to 0 (or 1): refused, as karras_sigmas does
    with pytest.raises(TypeError, match="snr_weights: dtype must be a floating torch.dtype"):
        gt.snr_weights(t, s, dtype=torch.int64)


def test_schedule_gather_checks_its_timesteps():
    """DiffusionSchedule.gather is public: a negative t once wrapped around to the end of the
    schedule and a float t was truncated, silently; both are refused by name, as is t = T and
    an unknown array name."""
    ref = R.DiffusionSchedule(R.cosine_betas(30))
    s = gt.DiffusionSchedule(ref)
    for t, exc, msg in [
        (torch.tensor([-1]), ValueError, r"t must lie in \[0, 30\), got range \[-1, -1\]"),
        (torch.tensor([30]), ValueError, r"t must lie in \[0, 30\)"),
        (torch.tensor([2.7]), TypeError, "t must be an integer"),
        (torch.tensor([True]), TypeError, "t must be an integer"),
    ]:
        with pytest.raises(exc, match=f"^DiffusionSchedule.gather: {msg}"):
            s.gather("alpha_bar", t)
    with pytest.raises(ValueError, match="^DiffusionSchedule.gather: name must be one of"):
        s.gather("nope", torch.tensor([1]))
    np.testing.assert_array_equal(s.gather("alpha_bar", torch.tensor([0, 29]), torch.float64).numpy(),
                                  ref.alpha_bar[[0, 29]])  # fmt: skip


@pytest.mark.parametrize(
    ("batch", "u0", "rank", "world"), [(8, 0.3, 0, 1), (5, 0.999999999, 3, 4), (1, 0.0, 0, 2)]
)
def test_low_discrepancy_times_match_reference_and_stay_below_one(batch, u0, rank, world):
    want = R.low_discrepancy_times(batch, u0, rank, world)
    got64 = gt.low_discrepancy_times(batch, u0, rank, world, dtype=torch.float64)
    np.testing.assert_array_equal(got64.numpy(), want)
    got32 = gt.low_discrepancy_times(batch, u0, rank, world)
    assert got32.dtype == torch.float32 and bool((got32 < 1.0).all()) and bool((got32 >= 0.0).all())
    np.testing.assert_allclose(got32.double().numpy(), want, atol=1e-7)


def test_to_bits_per_dim():
    nats = torch.tensor([3072.0 * math.log(2.0), 0.0], dtype=torch.float64, requires_grad=True)
    bpd = gt.to_bits_per_dim(nats, 3072)
    np.testing.assert_allclose(bpd.detach().numpy(), [1.0, 0.0], rtol=1e-15)
    bpd.sum().backward()
    np.testing.assert_allclose(nats.grad.numpy(), 1.0 / (3072 * math.log(2.0)), rtol=1e-15)
    with pytest.raises(ValueError, match="num_dims"):
        gt.to_bits_per_dim(nats, 0)


def test_full_bound_matches_reference_for_an_exact_denoiser():
    """(DIF.4) one point of data and its exact denoiser: every KL term is deterministic (the
    learned-range v = -1 gives sigma^2 = beta~, so they vanish), so the torch loop and the
    reference loop agree whatever noise each draws."""
    ref = R.DiffusionSchedule(R.cosine_betas(12))
    levels = -1.0 + 2.0 * np.arange(256) / 255
    c = levels[np.array([[0, 153, 255], [127, 204, 51]])]

    def exact_np(x_t, t):
        ab = ref.alpha_bar[t][:, None]
        return (x_t - np.sqrt(ab) * c) / np.sqrt(1 - ab), -np.ones_like(x_t)

    ct = torch.from_numpy(c)

    def exact_torch(x_t, t):
        ab = torch.from_numpy(np.array(ref.alpha_bar))[t][:, None]
        return (x_t - ab.sqrt() * ct) / (1 - ab).sqrt(), -torch.ones_like(x_t)

    want = R.full_bound(c, exact_np, ref, np.random.default_rng(0))
    got = gt.full_bound(ct, exact_torch, ref, torch.Generator().manual_seed(3))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)
    with pytest.raises(TypeError, match="model_eps_fn"):
        gt.full_bound(ct, None, ref)


def test_zero_terminal_snr_is_refused_where_eps_cannot_determine_the_mean():
    x = torch.zeros(2, 3, dtype=torch.float64)
    t = torch.tensor([1, 9])
    with pytest.raises(ValueError, match="alpha_bar = 0"):
        gt.predict_x0_from_eps(x, t, x, ZERO_SNR)
    with pytest.raises(ValueError, match="alphas = 0"):
        gt.vlb_term(x, x, t, x, ZERO_SNR)
    # v-prediction is fine there
    out = gt.diffusion_mse_loss(x, x, x + 1, t, ZERO_SNR, "v")
    assert torch.isfinite(out)


# ============================================================================= diffusers (optional peer)


def _diffusers_scheduler(**config):
    """A diffusers ``DDPMScheduler`` and the genloss schedule with the SAME alpha_bar: diffusers keeps
    its table in float32 (betas, then a float32 cumprod), so genloss's betas are recovered from that
    table, beta_t = 1 - abar_t / abar_(t-1) in float64, whose float64 cumprod is diffusers' alpha_bar to
    1e-15 relative. The formulas are then compared, not the two precisions of the table."""
    ddpm = peer("diffusers.schedulers.scheduling_ddpm")
    scheduler = ddpm.DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **config)
    abar = scheduler.alphas_cumprod.double()
    betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    schedule = gt.DiffusionSchedule(betas)
    np.testing.assert_allclose(schedule.alpha_bar.numpy(), abar.numpy(), rtol=1e-13)
    return scheduler, schedule


def test_diffusers_betas_are_ours_in_float32():
    """(DIF.1, DIF.15) diffusers' 'linear' and 'squaredcos_cap_v2' betas = ``linear_betas`` and
    ``cosine_betas`` rounded to float32 (within 2 float32 ulps: diffusers' ``linspace`` runs in float32).
    Its alpha_bar, a float32 cumprod, is off from the float64 product of its own betas by up to
    2 (t + 1) u relative (u = 2^-24: one rounding of 1 - beta and one of each product), and its SNR by
    that over 1 - alpha_bar: 5e-4 relative at t = 0 of the cosine schedule (measured with diffusers
    0.42.1). The test holds diffusers to those bounds; genloss's float64 table is the correct value."""
    ddpm = peer("diffusers.schedulers.scheduling_ddpm")
    u = 2.0**-24
    t = torch.arange(1000, dtype=torch.float64)
    for name, ours in (("linear", gt.linear_betas(1000)), ("squaredcos_cap_v2", gt.cosine_betas(1000))):
        theirs = ddpm.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
        assert theirs.betas.dtype == torch.float32
        assert torch.all((theirs.betas.double() - ours).abs() <= 4 * u * ours), name
        exact = gt.DiffusionSchedule(theirs.betas.double())  # float64 products of diffusers' own betas
        rel = (theirs.alphas_cumprod.double() - exact.alpha_bar).abs() / exact.alpha_bar
        assert torch.all(rel <= 2 * (t + 1) * u), name
        snr = theirs.alphas_cumprod.double() / (1 - theirs.alphas_cumprod.double())
        rel_snr = (snr - exact.snr).abs() / exact.snr
        assert torch.all(rel_snr <= 2 * (t + 1) * u / exact.one_minus_alpha_bar + 4 * u), name


def test_diffusers_forward_process_and_targets():
    """(DIF.2, DIF.14, DIF.15) ``add_noise`` = ``q_sample`` and ``get_velocity`` = ``v_target`` (diffusers casts its
    table to the float64 inputs: equal to 1e-12); ``training_utils.compute_snr`` = the schedule's SNR (diffusers
    computes it in float32: 1e-6); the min-SNR weights of diffusers' training scripts (train_text_to_image:
    min(snr, gamma) / snr for epsilon, / (snr + 1) for v_prediction) = ``snr_weights('min_snr')``."""
    training_utils = peer("diffusers.training_utils")
    scheduler, schedule = _diffusers_scheduler(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(21)
    x0, noise = (torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 1, 2, 10, 500, 900, 998, 999])
    torch.testing.assert_close(
        scheduler.add_noise(x0, noise, t), gt.q_sample(x0, t, noise, schedule), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        scheduler.get_velocity(x0, noise, t), gt.v_target(x0, t, noise, schedule), rtol=1e-12, atol=1e-12
    )
    snr = training_utils.compute_snr(scheduler, t).double()
    torch.testing.assert_close(snr, schedule.snr[t], rtol=1e-6, atol=0)
    gamma = 5.0
    for prediction, denominator in (("eps", snr), ("v", snr + 1)):
        theirs = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / denominator
        ours = gt.snr_weights(t, schedule, "min_snr", prediction=prediction, gamma=gamma, dtype=torch.float64)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_ddpm_step_is_the_posterior(prediction_type):
    """(DIF.3, DIF.7, DIF.8) One ancestral step of diffusers' ``DDPMScheduler.step`` (variance 'fixed_small') =
    the posterior mean of x0 predicted from the model output, plus sqrt(posterior variance) times the
    step's noise (drawn again from the same generator seed); t = 0 adds no noise. diffusers forms its
    coefficients in float32, beta_t as 1 - abar_t / abar_(t-1): a cancellation whose relative error is
    about u / beta_t (u = 2^-24), 5e-4 at t = 1 of the linear schedule (its posterior variance there is
    off by 1e-4 relative, the sample by 1.7e-4: diffusers 0.42.1). Compared within 8 u / beta_t."""
    scheduler, schedule = _diffusers_scheduler(
        beta_schedule="linear", variance_type="fixed_small", prediction_type=prediction_type
    )
    g = torch.Generator().manual_seed(22)
    x_t, out = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    for step in (999, 500, 37, 1, 0):
        t = torch.full((4,), step)
        got = scheduler.step(out, step, x_t, generator=torch.Generator().manual_seed(step)).prev_sample
        if prediction_type == "epsilon":
            mean = gt.posterior_mean_from_eps(x_t, t, out, schedule)
        else:
            x0 = gt.prediction_convert(out, x_t, t, "v", "x0", schedule)
            mean = gt.q_posterior(x0, x_t, t, schedule)[0]
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        want = mean + (schedule.posterior_variance[step].sqrt() * z if step > 0 else 0.0)
        tol = 8 * 2.0**-24 / float(schedule.betas[step])
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"t = {step}")


# ============================================================================= the exact decoder at extremes


def _mp_log_bin(mpmath, x, mean, log_scale):
    """log P(bin of x) (interior, 8 bits) from mpmath's erf at its working precision."""
    h, sd, r2 = mpmath.mpf(1) / 255, mpmath.exp(log_scale), mpmath.sqrt(2)
    lo, hi = (mpmath.mpf(x) - mean - h) / sd, (mpmath.mpf(x) - mean + h) / sd
    return mpmath.log((mpmath.erf(hi / r2) - mpmath.erf(lo / r2)) / 2)


@pytest.mark.parametrize("log_scale", [20.0, 30.0, 35.0, 50.0])
def test_discretized_decoder_at_large_log_scales(log_scale):
    """(DIF.9, DIF.10) the engine's decoder for a Gaussian far wider than a bin, float64: at
    mean = x the closed form log(2h phi(0)) - s with d/dmean = 0 (symmetry) and d/ds = -1 (the
    bin mass is 2h e^{-s} phi(0) (1 + O(e^{-2s}))); a mean 0.3 off x agrees with 50-digit
    mpmath (value, and both derivatives by mpmath's numerical differentiation).  The engine
    formed Phi(hi) - Phi(lo) from two numbers near 1/2 and returned -inf and a NaN slope at s = 35."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    h = 1.0 / 255
    x = torch.tensor([0.0, -1.0 + 400.0 / 255], dtype=torch.float64)
    closed = math.log(2 * h / math.sqrt(2 * math.pi)) - log_scale
    for offset in (0.0, 0.3):
        mean = (x + offset).requires_grad_()
        s = torch.full_like(x, log_scale, requires_grad=True)
        logp = gt.discretized_gaussian_log_likelihood(x, mean, s)
        logp.sum().backward()
        if offset == 0.0:
            np.testing.assert_allclose(logp.detach().numpy(), closed, rtol=1e-15)
            np.testing.assert_array_equal(mean.grad.numpy(), 0.0)
            np.testing.assert_allclose(s.grad.numpy(), -1.0, rtol=1e-14)
            continue
        v0 = mpmath.mpf(log_scale)
        for xi, mi, lp, gm, gs in zip(
            x.tolist(), mean.tolist(), logp.tolist(), mean.grad, s.grad, strict=True
        ):
            m0 = mpmath.mpf(mi)
            # relative error of the bin mass ~ eps (|x - mean| + h) / (2h) ~ 40 eps
            np.testing.assert_allclose(lp, float(_mp_log_bin(mpmath, xi, m0, v0)), rtol=0, atol=2e-14)
            d_s = mpmath.diff(lambda v, xi=xi, m0=m0: _mp_log_bin(mpmath, xi, m0, v), v0)
            np.testing.assert_allclose(gs.item(), float(d_s), rtol=1e-13)
            # d/dmean ~ -0.3 e^{-2s}: zero to the rounding of phi near phi(0), an ulp over 2h
            d_mean = mpmath.diff(lambda m, xi=xi, v0=v0: _mp_log_bin(mpmath, xi, m, v0), m0)
            np.testing.assert_allclose(gm.item(), float(d_mean), rtol=0, atol=1e-13)


@pytest.mark.parametrize("cdf", ["exact", "tanh"])
def test_discretized_decoder_on_empty_input_is_empty_in_every_layer(cdf):
    """An input with no element gives the empty result of the broadcast shape in the reference,
    the native engine and the torch op (the engine's range check of x used to reach aminmax of an
    empty tensor); a non-empty input broadcast into it gets a zero gradient of its own shape."""
    from genloss.native import diffusion as N

    shapes = [((0, 3), (0, 3), (0, 3)), ((0, 3), (1, 3), ())]
    for sx, sm, ss in shapes:
        ref = R.discretized_gaussian_log_likelihood(np.zeros(sx), np.zeros(sm), np.zeros(ss), cdf=cdf)
        assert ref.shape == (0, 3) and ref.dtype == np.float64
        ref_g = R.discretized_gaussian_log_likelihood_backward(
            np.zeros(sx), np.zeros(sm), np.zeros(ss), np.zeros((0, 3)), cdf=cdf
        )
        assert [g.shape for g in ref_g] == [sm, ss]
        np.testing.assert_array_equal(ref_g[0], 0.0)
        for dtype in (np.float32, np.float64):
            value, grads = N.discretized_gaussian_log_likelihood(
                np.zeros(sx, dtype), np.zeros(sm, dtype), np.zeros(ss, dtype), cdf=cdf
            )
            assert value.shape == (0, 3) and value.dtype == dtype
            assert [g.shape for g in grads] == [sm, ss]
            for g, r in zip(grads, ref_g, strict=True):
                np.testing.assert_array_equal(g, r)
        for dtype in (torch.float32, torch.float64):
            m = torch.zeros(sm, dtype=dtype, requires_grad=True)
            s = torch.zeros(ss, dtype=dtype, requires_grad=True)
            value = gt.discretized_gaussian_log_likelihood(torch.zeros(sx, dtype=dtype), m, s, cdf=cdf)
            assert tuple(value.shape) == (0, 3) and value.dtype == dtype
            value.sum().backward()
            for t, r in zip((m, s), ref_g, strict=True):
                assert tuple(t.grad.shape) == r.shape and t.grad.dtype == dtype
                np.testing.assert_array_equal(t.grad.numpy(), r)


def test_prior_kl_compiles_with_a_fresh_reference_schedule():
    """torch.compile(fullgraph=True) of prior_kl with a reference schedule the torch layer has not
    converted yet: the conversion runs inside the trace, where alpha_bar_T, computed from the
    traced arrays, was an unbacked SymFloat that the op's float argument refused (it passed only
    when an earlier eager call had converted, and cached, the schedule)."""
    ref = R.DiffusionSchedule(R.linear_betas(40, 1e-4, 0.2))
    x0 = torch.randn(3, 2, 5, dtype=torch.float64)
    compiled = torch.compile(lambda a: gt.prior_kl(a, ref, "none"), fullgraph=True, backend="eager")
    np.testing.assert_allclose(compiled(x0).numpy(), R.prior_kl(x0.numpy(), ref, "none"), rtol=1e-12)


def test_schedule_constructors_name_themselves():
    """Bad betas: the message starts with 'DiffusionSchedule:' in both layers (it named only the
    argument, so a traceback-less log line did not say which call failed)."""
    for make in (R.DiffusionSchedule, lambda b: gt.DiffusionSchedule(torch.tensor(b))):
        with pytest.raises(ValueError, match=r"^DiffusionSchedule: betas must lie in \(0, 1\]"):
            make([0.1, 1.5])
        with pytest.raises(ValueError, match="^DiffusionSchedule: betas must be finite"):
            make([0.1, float("nan")])


def test_every_layer_takes_either_layers_schedule():
    """A reference schedule and the torch layer's wrapper of it are interchangeable in all three
    layers (the reference refused the torch one with "must be a DiffusionSchedule, got
    DiffusionSchedule"); anything else is named with its module."""
    from genloss import native as gn

    ref = R.DiffusionSchedule(R.cosine_betas(50))
    wrapped = gt.DiffusionSchedule(ref)
    x0 = np.random.default_rng(0).standard_normal((3, 4))
    want = R.prior_kl(x0, ref, reduction="none")
    for schedule in (ref, wrapped):
        np.testing.assert_allclose(R.prior_kl(x0, schedule, reduction="none"), want, rtol=0, atol=0)
        np.testing.assert_allclose(gn.prior_kl(x0, schedule, reduction="none")[0], want, rtol=1e-14)
        got = gt.prior_kl(torch.from_numpy(x0), schedule, reduction="none")
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-14)
    for call in (
        lambda: R.prior_kl(x0, "cosine"),
        lambda: gn.prior_kl(x0, "cosine"),
        lambda: gt.prior_kl(torch.from_numpy(x0), "cosine"),
    ):
        with pytest.raises(
            TypeError, match=r"prior_kl: schedule must be a DiffusionSchedule, got builtins\.str"
        ):
            call()
