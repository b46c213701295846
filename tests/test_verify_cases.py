"""``genloss verify``'s cases for the ops without a registry record (genloss.registry.VERIFY_CASES):
they run on every backend, pass, and a wrong backend output (value, index, count, gradient) fails
its cell."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genloss import registry as R
from genloss.apps import cli, verify

pytest.importorskip("torch")

CASE_NAMES = tuple(c.name for c in R.VERIFY_CASES)

# issues 18 and 19: every metrics and quant op has a verify row (a record or a case); and the
# multi-output flow ops
REQUIRED = {
    "vector_quantize", "vq_ema_update", "lfq_entropy_loss", "adaptive_gan_weight", "lpips_head", "cmmd",
    "sliced_wasserstein", "prdc", "frechet_distance", "ot_coupling", "edm_preconditioning", "shift_timesteps",
    "fsq_indices", "fsq_codes",
}  # fmt: skip


def rows_of(ops, seed=0):
    return verify.run_verify(seed=seed, ops=list(ops), progress=False)["rows"]


def test_the_required_ops_have_cases_and_their_reasons_say_so():
    assert REQUIRED <= set(CASE_NAMES)
    for name in CASE_NAMES:
        assert name not in {r.name for r in R.RECORDS}
        assert "genloss verify case" in R.NOT_REGISTERED[name]


def test_every_case_passes_on_every_backend():
    rows = rows_of(CASE_NAMES, seed=5)
    by = {(r["op"], r["backend"]): r for r in rows}
    for case in R.VERIFY_CASES:
        assert (case.name, "torch-cpu") in by
        assert ((case.name, "native-cpu") in by) == (case.native is not None)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    # the gradient cells compared gradients: float32 rounding leaves a non-zero error in each
    diff = {c.name for c in R.VERIFY_CASES if c.differentiable}
    assert all(r["grad_rel_err"] > 0.0 for r in rows if r["op"] in diff)


def test_cli_rows_of_a_case(capsys):
    assert cli.main(["verify", "--seed", "2", "--ops", "vector_quantize", "gan_d_loss", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ops = {(r["op"], r["backend"]) for r in report["rows"]}
    assert {("vector_quantize", "native-cpu"), ("vector_quantize", "torch-cpu")} <= ops
    assert {r["op"] for r in report["rows"]} == {"vector_quantize", "gan_d_loss"}
    assert set(report["rows"][0]) == set(next(r for r in report["rows"] if r["op"] == "vector_quantize"))
    assert cli.main(["verify", "--seed", "2", "--ops", "prdc"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("prdc ") and line.count("ok") == 2 for line in out.splitlines())
    # prdc has no gradient: its gradient cells say so ("-", null), not a measured 0
    assert any(line.startswith("prdc ") and line.count("/       - ok") == 2 for line in out.splitlines()), out
    assert cli.main(["verify", "--seed", "2", "--ops", "prdc", "kid", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and all(r["grad_rel_err"] is None and r["grad_vs_tol"] is None and r["ok"] for r in rows)


def test_a_case_reruns_on_the_same_inputs():
    assert rows_of(["lpips_head"], seed=9) == rows_of(["lpips_head", "prdc"], seed=9)[:1]


# ------------------------------------------------------------------ wrong outputs are caught


def _failing(monkeypatch, module, name, wrap, op=None, seed=0):
    """Rows of ``op`` (default ``name``) with ``module.name`` replaced by ``wrap(original)``."""
    monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    return {r["backend"]: r for r in rows_of([op or name], seed)}


def test_a_wrong_index_fails_the_exact_comparison(monkeypatch):
    import genloss.native

    def wrap(good):
        def broken(z, codebook, *a, **kw):
            (zq, idx, c, cb), grads = good(z, codebook, *a, **kw)
            idx = idx.copy()
            idx[0] = (idx[0] + 1) % codebook.shape[0]  # every codebook has K >= 2 codes
            return (zq, idx, c, cb), grads

        return broken

    by = _failing(monkeypatch, genloss.native, "vector_quantize", wrap)
    assert not by["native-cpu"]["ok"] and by["native-cpu"]["value_vs_tol"] == float("inf")
    assert by["native-cpu"]["grad_vs_tol"] <= 1  # only the index is wrong
    assert by["torch-cpu"]["ok"]  # the torch op calls the compiled kernel, not the patched wrapper


@pytest.mark.parametrize("term", [0, 1])
def test_a_wrong_loss_term_gradient_fails(monkeypatch, term):
    """d commitment/dz (term 0) or d codebook_loss/dcodebook (term 1) off by 1e-3 relative."""
    import genloss.native

    def wrap(good):
        def broken(*a, **kw):
            value, grads = good(*a, **kw)
            grads = list(grads)
            grads[term] = grads[term] * (1 + 1e-3)
            return value, tuple(grads)

        return broken

    by = _failing(monkeypatch, genloss.native, "vector_quantize", wrap)
    assert not by["native-cpu"]["ok"] and by["native-cpu"]["grad_vs_tol"] > 1
    assert by["native-cpu"]["value_vs_tol"] <= 1


def test_a_wrong_count_fails_prdc(monkeypatch):
    import genloss.native

    def wrap(good):
        def broken(real, fake, k=5):
            out = dict(good(real, fake, k))
            out["coverage"] += 1.0 / len(real)  # one more covered real point
            return out

        return broken

    by = _failing(monkeypatch, genloss.native, "prdc", wrap)
    assert not by["native-cpu"]["ok"] and by["native-cpu"]["value_vs_tol"] == float("inf")


def test_a_suboptimal_assignment_and_a_wrong_plan_fail_ot_coupling(monkeypatch):
    import genloss.native

    def wrap(good):
        def broken(x0, x1, method="exact", *a, **kw):
            out = good(x0, x1, method, *a, **kw)
            if method == "exact" and len(out) > 1:
                out = out.copy()
                out[[0, 1]] = out[[1, 0]]  # still a permutation, not the optimal one
            elif method != "exact":
                out = out * (1 + 1e-7)
            return out

        return broken

    by = _failing(monkeypatch, genloss.native, "ot_coupling", wrap)
    assert not by["native-cpu"]["ok"] and 1 < by["native-cpu"]["value_vs_tol"] < float("inf")


def test_a_wrong_torch_value_fails_sliced_wasserstein(monkeypatch):
    import genloss.torch

    by = _failing(
        monkeypatch, genloss.torch, "sliced_wasserstein", lambda good: lambda *a, **kw: good(*a, **kw) * 1.001
    )
    assert (
        not by["torch-cpu"]["ok"]
        and by["torch-cpu"]["value_vs_tol"] > 1
        and by["torch-cpu"]["grad_vs_tol"] > 1
    )


def test_a_wrong_gradient_of_a_list_argument_fails_lpips_head(monkeypatch):
    """The weights of the second layer see a gradient 1e-3 too large: only the gradient is off."""
    import torch

    import genloss.torch

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, g):
            return g * (1 + 1e-3)

    def wrap(good):
        return lambda fx, fy, ws: good(fx, fy, [ws[0], Scale.apply(ws[1])])

    by = _failing(monkeypatch, genloss.torch, "lpips_head", wrap)
    assert not by["torch-cpu"]["ok"] and by["torch-cpu"]["grad_vs_tol"] > 1
    assert by["torch-cpu"]["value_vs_tol"] <= 1


def test_a_wrong_second_output_fails_edm_preconditioning(monkeypatch):
    import genloss.torch

    def wrap(good):
        def broken(sigma, sigma_data=0.5):
            c = good(sigma, sigma_data)
            return c[0], c[1], c[2], c[3] + 1e-6  # c_noise shifted

        return broken

    by = _failing(monkeypatch, genloss.torch, "edm_preconditioning", wrap)
    assert not by["torch-cpu"]["ok"] and by["torch-cpu"]["value_vs_tol"] > 1


def test_a_crash_is_a_failing_cell_with_its_error(monkeypatch):
    import genloss.torch

    def wrap(good):
        def broken(*a, **kw):
            raise RuntimeError("kernel exploded")

        return broken

    by = _failing(monkeypatch, genloss.torch, "fsq_indices", wrap)
    assert not by["torch-cpu"]["ok"] and by["torch-cpu"]["error"] == "RuntimeError: kernel exploded"
    table = verify.format_table(
        {"seed": 0, "version": genloss.__version__, "backends": {}, "rows": list(by.values())}
    )
    assert "FAIL fsq_indices on torch-cpu: RuntimeError: kernel exploded" in table
    assert table.splitlines()[-1] == "reproduce: genloss verify --seed 0 --ops fsq_indices"


# ------------------------------------------------------------------ the cases' own references


def test_the_brute_force_assignment_is_scipys():
    scipy_opt = pytest.importorskip("scipy.optimize")
    from genloss.registry.metrics import _ot_reference

    rng = np.random.default_rng(0)
    for b in range(1, 7):
        x0, x1 = rng.normal(size=(b, 3)), rng.normal(size=(b, 3))
        cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
        rows, cols = scipy_opt.linear_sum_assignment(cost)
        assert np.isclose(cost[np.arange(b), _ot_reference(x0, x1)].sum(), cost[rows, cols].sum(), rtol=1e-14)


def test_a_case_for_a_registered_op_is_refused(monkeypatch):
    import dataclasses

    bad = dataclasses.replace(R.VERIFY_CASES[0], name="gan_d_loss")
    monkeypatch.setattr(R, "VERIFY_CASES", (*R.VERIFY_CASES, bad))
    with pytest.raises(ValueError, match="verify case gan_d_loss"):
        R._check_registry()


def test_a_missing_output_is_a_failing_cell(monkeypatch):
    import genloss.torch

    by = _failing(
        monkeypatch, genloss.torch, "shift_timesteps", lambda good: lambda *a, **kw: good(*a, **kw)[:1]
    )
    assert not by["torch-cpu"]["ok"]
    assert by["torch-cpu"]["error"] == "1 outputs and 0 gradients, the reference has 2 and 1"
