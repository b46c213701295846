r"""The torch glue itself (``genloss/torch/_op.py``): what every op gets from its record.

Registry-driven:

* every floating input that requires grad, ALONE: its gradient equals the reference backward
  (differentiable inputs) or the op refuses at forward time with a ValueError naming it
  (SPEC, Conventions, "Gradients"): never a crash in backward, never a silently missing
  gradient;
* ``torch.compile(fullgraph=True)`` traces every op with and without inputs that require grad
  and under ``no_grad``;
* the public functions carry the op's signature and the reference's docstring;
* a NumPy schedule first seen under ``inference_mode``, a ``FakeTensorMode``, a functorch
  transform or inside a compiled region still serves ordinary training afterwards;
* the package uses no private torch name.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import warnings

import numpy as np
import pytest

from genloss import registry as R

torch = pytest.importorskip("torch")
gt = pytest.importorskip("genloss.torch")

from tolerances import assert_close  # noqa: E402

TORCH_RECORDS = [r for r in R.RECORDS if r.torch_op_name != "spectral_norm_sigma"]
SIZES = R.ODD_SIZES[2]


def _loss(record, out):
    return out if record.value_index is None else out[record.value_index]


def _tensors(arrays):
    return [torch.from_numpy(np.array(x, copy=True)) for x in arrays]


@pytest.mark.parametrize(
    ("record", "variant"),
    [(r, v) for r in TORCH_RECORDS if r.differentiable for v in r.variants],
    ids=lambda x: getattr(x, "name", None) or getattr(x, "id", ""),
)
def test_each_float_input_alone(record, variant):
    """Only input k requires grad, for every floating k: the true gradient, or a forward-time
    ValueError that names k. Every reduction."""
    spec = record.at(variant)
    arrays = R.make_inputs(spec, np.random.default_rng(3), np.float64, SIZES, variant, interior=True)
    for reduction in spec.reductions or (None,):
        kwargs = R.call_kwargs(spec, variant, reduction)
        ref_value = np.asarray(_loss(spec, spec.reference(*arrays, **kwargs)))
        w = np.random.default_rng(4).uniform(0.5, 1.5, size=ref_value.shape)
        ref = dict(
            zip(
                spec.differentiable,
                spec.reference_backward(*arrays, w if w.ndim else float(w), **kwargs),
                strict=True,
            )
        )
        for k, a in enumerate(spec.args):
            if R.DOMAINS[a.domain].kind != "float":
                continue
            tensors = _tensors(arrays)
            x = tensors[k].requires_grad_(True)
            label = f"{spec.name}({variant.id}, {reduction}) with only {a.name} requiring grad"
            if a.name not in spec.differentiable:
                with pytest.raises(ValueError, match=rf"{spec.torch_op_name}.*\b{a.name}\b"):
                    spec.torch(*tensors, **kwargs)
                continue
            value = _loss(spec, spec.torch(*tensors, **kwargs))
            (g,) = torch.autograd.grad(value, x, grad_outputs=torch.as_tensor(w, dtype=value.dtype))
            assert_close(
                g,
                ref[a.name],
                "torch",
                torch.float64,
                label,
                scale=R.grad_scale(spec, a.name, arrays, reduction, ref[a.name], w),
            )


def _compile_cases():
    for r in TORCH_RECORDS:
        v = r.variants[-1]
        yield r, v, (r.reductions or (None,))[-1]


@pytest.mark.parametrize(
    ("record", "variant", "reduction"),
    list(_compile_cases()),
    ids=lambda x: getattr(x, "name", None) or str(x),
)
@pytest.mark.parametrize("mode", ["grad", "no_requires_grad", "no_grad"])
def test_fullgraph_compiles_every_op(record, variant, reduction, mode):
    """torch.compile(fullgraph=True) traces every op whatever needs a gradient (backend 'eager':
    Dynamo's tracing is what is checked; test_torch_ops compares compiled values on a subset)."""
    spec = record.at(variant)
    kwargs = R.call_kwargs(spec, variant, reduction)
    arrays = R.make_inputs(spec, np.random.default_rng(5), np.float64, SIZES, variant)
    op = spec.torch
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _loss(spec, op(*a, **kwargs)), fullgraph=True, backend="eager")
    tensors = _tensors(arrays)
    if mode == "grad":
        for n in spec.differentiable:
            tensors[spec.arg_names.index(n)].requires_grad_(True)
    if mode == "no_grad":
        with torch.no_grad():
            value = compiled(*tensors)
    else:
        value = compiled(*tensors)
    ref = _loss(spec, spec.reference(*arrays, **kwargs))
    assert_close(value, ref, "torch", torch.float64, f"{spec.name} compiled ({mode})")
    if mode == "grad" and spec.differentiable:
        value.sum().backward()
        assert all(tensors[spec.arg_names.index(n)].grad is not None for n in spec.differentiable)


PUBLIC = sorted({r.torch_op_name for r in R.RECORDS} - {"q_posterior"})


@pytest.mark.parametrize("name", PUBLIC)
def test_public_functions_have_signature_and_reference_doc(name):
    """help() and inspect.signature show the op's arguments and the reference's documentation."""
    fn = getattr(gt, name)
    assert inspect.isfunction(fn), f"genloss.torch.{name} is a {type(fn).__name__}, not a function"
    sig = inspect.signature(fn)
    ref_sig = inspect.signature(getattr(__import__("genloss.reference", fromlist=[name]), name))
    assert list(sig.parameters) == list(ref_sig.parameters), f"{name}: {sig} vs reference {ref_sig}"
    for p, q in zip(sig.parameters.values(), ref_sig.parameters.values(), strict=True):
        if q.default is not inspect.Parameter.empty and not isinstance(q.default, (tuple, list)):
            assert p.default == q.default, (
                f"{name}({p.name}): default {p.default!r} vs reference {q.default!r}"
            )
    ref_doc = inspect.getdoc(getattr(__import__("genloss.reference", fromlist=[name]), name))
    assert ref_doc and ref_doc.splitlines()[0] in (inspect.getdoc(fn) or ""), f"{name}: reference doc missing"


# Where a torch function's argument is another kind of object than the reference's, so named
# for what it takes: a torch.Generator where the reference takes a numpy Generator.
RENAMED = {"full_bound": {"rng": "generator"}}


def test_every_torch_function_takes_the_references_argument_names():
    """The functions without a record too (samplers, metrics, quantizers, helpers): the reference's
    argument names, in its order, so keyword calls work in both layers (the torch layer may add
    arguments after them: device, dtype, a process group). timestep_density(t=...) once failed."""
    import genloss.reference as ref

    names = sorted(n for n in set(gt.__all__) & set(dir(ref)) if inspect.isfunction(getattr(gt, n)))
    assert len(names) > 80
    for name in names:

        def positional(f):
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
            return [p.name for p in inspect.signature(f).parameters.values() if p.kind in kinds]

        want = [RENAMED.get(name, {}).get(a, a) for a in positional(getattr(ref, name))]
        got = positional(getattr(gt, name))
        assert got[: len(want)] == want, f"genloss.torch.{name}{got} vs the reference's {want}"
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert torch.equal(gt.timestep_density(t=t, kind="cosmap"), gt.timestep_density(t, "cosmap"))
    assert torch.equal(gt.timestep_quantile(u=t, kind="mode"), gt.timestep_quantile(t, "mode"))


def test_bad_calls_name_the_public_function():
    x = torch.randn(2, 3)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match=r"^diffusion_mse_loss\(\): missing a required argument: 'schedule'"):
        gt.diffusion_mse_loss(x, x, x, t)
    with pytest.raises(TypeError, match=r"gan_d_loss\(\) missing required argument 'fake_logits'"):
        gt.gan_d_loss(x)
    with pytest.raises(TypeError, match=r"gan_d_loss: fake_logits must be a torch.Tensor"):
        gt.gan_d_loss(x, [1.0])


# ----------------------------------------------------------------------------- schedules


def _train_step(schedule):
    """An ordinary training step on a schedule: every table op with gradients."""
    x0 = torch.randn(3, 4, requires_grad=True)
    noise = torch.randn(3, 4)
    t = torch.tensor([0, 5, 9])
    pred = torch.randn(3, 4, requires_grad=True)
    x_t = gt.q_sample(x0, t, noise, schedule)
    loss = gt.diffusion_mse_loss(pred, x0, noise, t, schedule, prediction="v")
    loss = loss + gt.vlb_term(x0.detach().clamp(-1, 1), x_t.detach(), t, pred, schedule).mean()
    loss = loss + gt.prior_kl(x0, schedule).mean() + gt.v_target(x0, t, noise, schedule).sum()
    loss.backward()
    assert x0.grad is not None and pred.grad is not None and torch.isfinite(x0.grad).all()
    return loss.detach()


def _fresh():
    from genloss import reference as Ref

    return Ref.DiffusionSchedule(Ref.cosine_betas(10))


def test_schedule_first_seen_under_inference_mode():
    s = _fresh()
    with torch.inference_mode():
        gt.q_sample(torch.randn(2, 4), torch.tensor([1, 2]), torch.randn(2, 4), s)
    _train_step(s)


def test_schedule_first_seen_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode  # the tests may use torch internals

    s = _fresh()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 4))
        t = mode.from_tensor(torch.tensor([1, 2]))
        out = gt.q_sample(x, t, x, s)
        assert tuple(out.shape) == (2, 4)
    _train_step(s)


def test_schedule_first_seen_under_functorch_grad():
    s = _fresh()
    t = torch.tensor([1, 2])
    noise = torch.randn(2, 4)
    x0 = torch.randn(2, 4)

    def f(x):
        return gt.q_sample(x, t, noise, s).sum()

    g = torch.func.grad(f)(x0)
    expected = torch.from_numpy(s.sqrt_alpha_bar[t.numpy()]).float()[:, None].expand(2, 4)
    torch.testing.assert_close(g, expected)
    _train_step(s)


def test_schedule_first_seen_inside_compiled_region():
    s = _fresh()
    torch._dynamo.reset()

    def f(pred, x0, noise, t):
        return (
            gt.diffusion_mse_loss(pred, x0, noise, t, s, prediction="v") + gt.q_sample(x0, t, noise, s).sum()
        )

    args = (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 4, 9]))
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), f(*args))
    _train_step(s)


def test_no_private_torch_names_in_the_package():
    root = pathlib.Path(__file__).resolve().parents[1] / "python" / "genloss"
    if not root.is_dir():
        pytest.skip("the source tree is not beside the tests")
    private = re.compile(r"torch\._(?!check|_)\w+")  # torch.__version__ is public
    hits = [
        f"{p.relative_to(root)}:{i}: {line.strip()}"
        for p in root.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not hits, "private torch names:\n" + "\n".join(hits)


def test_helpers_refuse_bad_arguments_before_any_work():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="gradient_penalty: critic must be callable"):
        gt.gradient_penalty("critic", x, x)
    with pytest.raises(TypeError, match="r1_penalty: real must be a torch.Tensor"):
        gt.r1_penalty(lambda z: z.sum(1), x.numpy())
    with pytest.raises(TypeError, match="r2_penalty: fake must be a floating tensor"):
        gt.r2_penalty(lambda z: z.sum(1), torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="spectral_norm_sigma: W must be a real floating tensor"):
        gt.spectral_norm_sigma(torch.randn(3, 2, dtype=torch.complex64), torch.randn(3))
    with pytest.raises(TypeError, match="spectral_norm_sigma: n_iters must be a number, got bool"):
        gt.spectral_norm_sigma(torch.randn(3, 2), torch.randn(3), True)
    with pytest.raises(ValueError, match="spectral_norm_sigma: u requires grad"):
        gt.spectral_norm_sigma(torch.randn(3, 2), torch.randn(3, requires_grad=True))
    meta = torch.randn(5, 2, device="meta")
    with pytest.raises(ValueError, match="gmm_responsibilities: logits must be on the device of x"):
        gt.gmm_responsibilities(meta, torch.randn(3), torch.randn(3, 2), torch.randn(3, 2))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("gan_d_loss", {}),
        ("hinge_d_loss", {}),
        ("lsgan_d_loss", {"a": 0.0, "b": 1.0}),
        ("l1_loss", {"reduction": "sum"}),
        ("wgan_critic_loss", {}),
    ],
)
def test_one_tensor_for_two_inputs(name, kwargs):
    """op(x, x): eager value and gradient equal those of two separate copies of x (autograd
    sums the two gradients), and torch.compile(fullgraph=True) traces it (Dynamo refuses one
    tensor twice in an autograd.Function.apply; the glue passes an alias of it)."""
    op = getattr(gt, name)
    base = torch.linspace(-1.5, 2.0, 12, dtype=torch.float64)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    want = op(a, b, **kwargs)
    want.backward()
    x = base.clone().requires_grad_(True)
    got = op(x, x, **kwargs)
    got.backward()
    assert torch.equal(got.detach(), want.detach())
    torch.testing.assert_close(x.grad, a.grad + b.grad, rtol=0, atol=1e-15)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: op(t, t, **kwargs), fullgraph=True, backend="eager")
    y = base.clone().requires_grad_(True)
    value = compiled(y)
    value.backward()
    torch.testing.assert_close(value.detach(), want.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(y.grad, a.grad + b.grad, rtol=0, atol=1e-15)


def test_tables_placed_on_a_device_are_kept_and_made_outside_inference_mode():
    """A CPU DiffusionSchedule used with inputs on another device copies each table there once
    and keeps it (a copy per call costs a transfer each time and cannot be captured in a CUDA
    graph), made outside inference mode even when the first call runs inside it: a later
    training step saves it for backward, which an inference tensor would refuse. (The meta
    device stands in for CUDA; fake and traced tensors get a fresh copy, never the kept one.)"""
    sched = gt.DiffusionSchedule(torch.linspace(1e-4, 0.02, 50, dtype=torch.float64))
    like = torch.empty(3, device="meta")
    with torch.inference_mode():
        first = sched.table("q_sample", like)
        gathered = sched.gather("alpha_bar", torch.zeros(3, dtype=torch.int64, device="meta"))
    assert first.device.type == "meta" and not first.is_inference()
    assert sched.table("q_sample", like) is first  # kept, not copied again
    assert gathered.device.type == "meta"
    assert sched.table("q_sample", torch.empty(3)) is sched._buffers["_table_q_sample"]  # same device: itself


@pytest.mark.parametrize(
    "name, call",
    [
        ("karras_sigmas", lambda device: gt.karras_sigmas(5, device=device)),
        ("sample_timesteps", lambda device: gt.sample_timesteps(5, generator=0, device=device)),
        ("low_discrepancy_times", lambda device: gt.low_discrepancy_times(4, 0.25, device=device)),
        ("GaussianMoments", lambda device: gt.GaussianMoments(3, device=device)),
        ("LearnedSNRSchedule", lambda device: gt.LearnedSNRSchedule(hidden_size=2, device=device)),
    ],
)
def test_device_arguments_are_checked_by_name(name, call):
    """A device string torch cannot parse was torch's RuntimeError listing every backend; now a
    ValueError naming the function, a non-device a TypeError; a valid one still works."""
    with pytest.raises(ValueError, match=f"^{name}: device must name a torch device .* got 'gpu'"):
        call("gpu")
    with pytest.raises(
        TypeError, match=f"^{name}: device must be a torch.device, a string or an int, got float"
    ):
        call(0.5)
    for device in ("cpu", torch.device("cpu")):
        call(device)


@pytest.mark.parametrize(
    ("record", "variant"),
    [(r, r.variants[-1]) for r in TORCH_RECORDS],
    ids=lambda x: getattr(x, "name", None) or getattr(x, "id", ""),
)
def test_vmap_and_per_sample_gradients(record, variant):
    """torch.func.vmap over an op (two independent calls stacked on a new leading dim) gives the two
    calls' values, and vmap(grad) their gradients, for every differentiable input. The kernels cannot
    read vmap's batched tensors (it failed with "Cannot access data pointer of Tensor that doesn't
    have storage"), so each entry of a fused op runs as an ordinary call through the op's vmap rule;
    the composites' data checks (which read values back: ".item() on a Tensor") are skipped there.
    torch.func.jvp of a fused op with a scalar value is the gradients' inner product with the
    tangents (it returned a zero tangent), and raises for a per-sample or elementwise value."""
    spec = record.at(variant)
    reduction = (spec.reductions or (None,))[-1]
    kwargs = R.call_kwargs(spec, variant, reduction)
    calls = [
        _tensors(R.make_inputs(spec, np.random.default_rng(s), np.float64, SIZES, variant)) for s in (7, 8)
    ]
    stacked = [torch.stack([c[k] for c in calls]) for k in range(len(spec.args))]

    def loss(*a):
        return _loss(spec, spec.torch(*a, **kwargs))

    want = torch.stack([loss(*c) for c in calls])
    assert_close(torch.func.vmap(loss)(*stacked), want.numpy(), "torch", torch.float64, f"{spec.name} vmap")
    for name in spec.differentiable:
        k = spec.arg_names.index(name)
        per_sample = torch.func.vmap(torch.func.grad(lambda *a: loss(*a).sum(), argnums=k))(*stacked)
        for b, c in enumerate(calls):
            x = c[k].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(*c[:k], x, *c[k + 1 :]).sum(), x)
            assert_close(
                per_sample[b], g.numpy(), "torch", torch.float64, f"{spec.name} vmap(grad) d/d{name}"
            )
    if getattr(spec.torch, "op", None) is not None and spec.differentiable:
        # forward mode of a fused op: for a scalar value, sum_k <dL/dx_k, t_k> from the kernel's
        # gradients (the op alone gave jvp and jacfwd a zero tangent, silently); else a clear error
        ks = [spec.arg_names.index(n) for n in spec.differentiable]
        gen = torch.Generator().manual_seed(9)
        tangents = [torch.randn(calls[0][k].shape, generator=gen, dtype=calls[0][k].dtype) for k in ks]

        def at_reduction(red):
            kw = R.call_kwargs(spec, variant, red)

            def at(*vs):
                args = list(calls[0])
                for k, v in zip(ks, vs, strict=True):
                    args[k] = v
                return _loss(spec, spec.torch(*args, **kw))

            return at

        for red in spec.reductions or (None,):
            at = at_reduction(red)
            primals = tuple(calls[0][k] for k in ks)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.func.jvp's own jit.script use
                if at(*primals).dim() == 0:
                    _, tangent_out = torch.func.jvp(at, primals, tuple(tangents))
                    xs = [p.clone().requires_grad_(True) for p in primals]
                    grads = torch.autograd.grad(at(*xs), xs)
                    pairs = list(zip(grads, tangents, strict=True))
                    expected = sum(float((g * t).sum()) for g, t in pairs)
                    scale = 1.0 + sum(float(g.abs().sum() * t.abs().max()) for g, t in pairs)
                    assert abs(float(tangent_out) - expected) <= 1e-12 * scale, (
                        red,
                        float(tangent_out),
                        expected,
                    )
                else:
                    with pytest.raises(NotImplementedError, match="forward-mode AD"):
                        torch.func.jvp(at, primals, tuple(tangents))


def test_jit_trace_is_refused_and_export_records_the_op():
    """torch.jit.trace recorded the native call's bookkeeping instead of the op: with its check the
    trace failed ("Graphs differed"), without it the traced function returned garbage (-1.5e-31 for
    2.32) on new inputs. It is refused by name; torch.export records the op and replays it right."""
    x, y = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    for check in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's own warnings
            with pytest.raises(RuntimeError, match=r"^gan_d_loss: torch\.jit\.trace cannot record"):
                torch.jit.trace(lambda a, b: gt.gan_d_loss(a, b), (x, y), check_trace=check)

    class Loss(torch.nn.Module):
        def forward(self, a, b):
            return gt.gan_d_loss(a, b)

    program = torch.export.export(Loss(), (x, y))
    x2, y2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    want = torch.nn.functional.softplus(-x2).mean() + torch.nn.functional.softplus(y2).mean()
    assert_close(program.module()(x2, y2), want.numpy(), "torch", torch.float64, "exported gan_d_loss")


def test_jvp_refuses_a_tangent_on_a_non_differentiable_input():
    """meanflow_loss differentiates u only: a tangent on v (data) is named, not dropped; a zero
    tangent there (what torch.func passes for inputs that are not primals) is accepted."""
    import warnings

    g = torch.Generator().manual_seed(2)
    u, v, d = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(3, generator=g, dtype=torch.float64)
    r = t * 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.func.jvp's own jit.script use
        with pytest.raises(ValueError, match=r"meanflow_loss: v is not differentiable; it has no tangent"):
            torch.func.jvp(lambda v_: gt.meanflow_loss(u, v_, d, t, r), (v,), (torch.ones_like(v),))
        _, zero = torch.func.jvp(lambda v_: gt.meanflow_loss(u, v_, d, t, r), (v,), (torch.zeros_like(v),))
    assert float(zero) == 0.0


@pytest.mark.xfail(
    strict=True,
    reason="known defect (session 27): under torch.compile, Dynamo shows the op a torch.func.grad input "
    "as not requiring grad, so the op asks its kernel for no gradient and the gradient comes back 0. "
    "Routing through the autograd Function there needs either Dynamo support for a setup_context "
    "Function under functorch (it raised 'AutogradFunctionContextVariable has no attribute proxy') or "
    "a private check of the functorch stack. Eager torch.func.grad and torch.compile of .backward() "
    "are right (tested above).",
)
def test_compile_of_func_grad_gives_the_gradient():
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    torch._dynamo.reset()
    got = torch.compile(torch.func.grad(lambda a: gt.gan_d_loss(a, y)), fullgraph=True, backend="eager")(x)
    want = -torch.sigmoid(-x) / x.shape[0]  # d/dx mean softplus(-x): the real term alone
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_nested_vmap_and_per_sample_gradients():
    """vmap(vmap(...)) of a fused op: the outer level's slices are still batched at the inner one
    (they failed with "Cannot access data pointer"), and vmap(vmap(grad)) gives each entry's gradient."""
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(3, 2, 5, generator=g, dtype=torch.float64) for _ in range(2))

    def f(a, b):
        return gt.gan_d_loss(a[None], b[None])

    values = torch.func.vmap(torch.func.vmap(f))(x, y)
    grads = torch.func.vmap(torch.func.vmap(torch.func.grad(f)))(x, y)
    for i in range(3):
        for j in range(2):
            a = x[i, j].clone().requires_grad_(True)
            v = f(a, y[i, j])
            v.backward()
            assert_close(values[i, j], v.detach().numpy(), "torch", torch.float64, "nested vmap value")
            assert_close(grads[i, j], a.grad.numpy(), "torch", torch.float64, "nested vmap(vmap(grad))")
