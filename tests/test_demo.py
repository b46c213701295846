"""The ``genloss demo`` (``genloss.apps.demo``): a --quick run, its metrics, outputs,
provenance (the committed README figure and table match the code), and determinism."""

from __future__ import annotations

import csv
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import genloss.torch as gl  # noqa: E402
from genloss.apps import demo  # noqa: E402
from genloss.apps.demo import methods as demo_methods  # noqa: E402
from genloss.apps.demo import metrics as demo_metrics  # noqa: E402
from genloss.apps.demo import runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_METHODS = ["gan-ns", "wgan-gp", "ddpm", "consistency"]  # plain GAN, gradient penalty, two samplers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As run_demo does: on a 2-core machine shared with other jobs, two OpenMP threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_run(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = demo.run_demo(out, quick=True, methods=QUICK_METHODS, workers=1, progress=False, seed=3)
    return out, res


# ------------------------------------------------------------------ the --quick run and its outputs


def test_quick_run_rows_and_spread(quick_run):
    _, res = quick_run
    pairs = [(r["dataset"], r["method"]) for r in res["summary"]]
    assert pairs == [
        ("ring", "data"), ("ring", "gan-ns"), ("ring", "wgan-gp"),
        ("grid", "data"), ("grid", "gan-ns"), ("grid", "wgan-gp"),
        ("swiss_roll", "data"), ("swiss_roll", "ddpm"), ("swiss_roll", "consistency"),
    ]  # fmt: skip
    assert len(res["runs"]) == len(pairs) * demo.QUICK.seeds
    for row in res["summary"]:
        runs = [r for r in res["runs"] if (r["dataset"], r["method"]) == (row["dataset"], row["method"])]
        assert sorted(r["rep"] for r in runs) == list(range(demo.QUICK.seeds))
        mmd = np.array([r["mmd2"] for r in runs])
        assert row["mmd2"] == pytest.approx(mmd.mean(), rel=1e-12)
        assert row["mmd2_sd"] == pytest.approx(mmd.std(ddof=1), rel=1e-9, abs=1e-15)
        if row["dataset"] == "swiss_roll":
            assert row["modes_covered"] is None and row["high_quality"] is None
        else:
            assert row["modes_covered"] == np.mean([r["modes_covered"] for r in runs])
    for r in res["runs"]:
        assert r["samples"].shape == (demo.QUICK.n_eval, 2)
        if r["method"] != "data":
            want = {m.name: m.steps for m in demo.METHODS}[r["method"]] * demo.QUICK.steps_scale
            assert r["steps"] == max(10, round(want))
            assert len(r["curve"]["step"]) == demo.QUICK.checkpoints and r["curve"]["step"][-1] == r["steps"]
            assert all(math.isfinite(v) for v in r["curve"]["mmd2"])
    # the data rows are the floor: every mode, ~98.9% high quality, the smallest MMD²
    for d in ("ring", "grid"):
        data = next(r for r in res["summary"] if r["dataset"] == d and r["method"] == "data")
        assert data["modes_covered"] == data["n_modes"] and data["high_quality"] > 0.96
        others = [r["mmd2"] for r in res["summary"] if r["dataset"] == d and r["method"] != "data"]
        assert data["mmd2"] < min(others)


def test_quick_run_writes_figure_tables_and_provenance(quick_run):
    out, res = quick_run
    assert [p.name for p in res["files"]] == list(demo.FILES)
    png = (out / "genloss-demo.png").read_bytes()
    assert png[:8] == PNG_MAGIC and demo.source_hash().encode() in png  # tEXt metadata
    md = (out / "genloss-demo.md").read_text()
    assert md == demo.format_table(res)
    assert "| method | steps | modes | high quality | MMD² ×10³ |" in md
    for name in QUICK_METHODS:
        assert f"| {name} |" in md and f"- `{name}`:" in md  # a row and its stated hyperparameters
    assert f"source hash `{demo.source_hash()}`" in md and "genloss demo --quick --seed 3" in md
    # the Methods text gives the full run's step counts: the --quick run says it trained a tenth of them
    assert "The step counts below are the full run's; this run trained for 0.1 of them" in md
    with (out / "genloss-demo.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["method"]) for r in rows] == [
        (r["dataset"], r["method"]) for r in res["summary"]
    ]
    assert float(rows[1]["mmd2"]) == res["summary"][1]["mmd2"]
    doc = json.loads((out / "genloss-demo.json").read_text())
    assert doc["meta"]["source_hash"] == demo.source_hash() and doc["meta"]["config"]["quick"] is True
    assert len(doc["runs"]) == len(res["runs"]) and "samples" not in doc["runs"][0]


def test_rerun_into_the_same_folder_says_it_overwrites(quick_run, capsys):
    out, _ = quick_run
    demo.run_demo(
        out, quick=True, methods=["lsgan"], datasets="ring", seeds=1, steps=3, workers=1, progress=True
    )
    err = capsys.readouterr().err
    assert f"will overwrite {', '.join(demo.FILES)} in {out}" in err
    md = (out / "genloss-demo.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| lsgan |") or line.startswith("| data |")]
    assert "one seed (no spread)" in md and rows and not any("±" in r for r in rows), md  # no measured spread
    assert "this run trained for 3 steps" in md


def test_an_unwritable_output_is_refused_before_any_training(tmp_path, capsys):
    """A path that cannot hold the outputs is a ValueError (rc 2 from the command) up front: it once
    failed with a traceback after the whole run had trained."""
    from genloss.apps import cli

    afile = tmp_path / "afile"
    afile.write_text("")
    for bad in (afile, afile / "sub"):
        with pytest.raises(ValueError, match="run_demo: cannot write the outputs to"):
            demo.run_demo(bad, methods=["lsgan"], datasets="ring", seeds=1, steps=3, workers=1, progress=True)
        assert "[1/" not in capsys.readouterr().err  # nothing trained
    assert cli.main(["demo", "--methods", "lsgan", "--steps", "3", "--seeds", "1", "--out", str(afile)]) == 2
    assert "genloss demo: run_demo: cannot write the outputs to" in capsys.readouterr().err


def test_same_seed_same_numbers_alone_in_process_or_in_workers():
    kw = dict(steps=15, seeds=2, datasets="ring", progress=False, n_eval=100)
    alone = demo.run_demo(None, methods=["ragan"], workers=1, **kw)
    mixed = demo.run_demo(None, methods=["lsgan", "ragan"], workers=2, **kw)
    a = [r for r in alone["runs"] if r["method"] == "ragan"]
    b = [r for r in mixed["runs"] if r["method"] == "ragan"]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["samples"], y["samples"])
        assert (x["mmd2"], x["losses"], x["mode_counts"], x["curve"]) == (
            y["mmd2"], y["losses"], y["mode_counts"], y["curve"])  # fmt: skip
    assert not np.array_equal(a[0]["samples"], a[1]["samples"])  # the seeds differ
    other = demo.run_demo(None, methods=["ragan"], workers=1, seed=1, **kw)
    assert not np.array_equal(other["runs"][-1]["samples"], a[-1]["samples"])


# ------------------------------------------------------------------ the committed docs match the code


def test_committed_docs_were_made_by_this_code():
    """docs/genloss-demo.* carry the hash of the demo sources that made them: a change to the demo
    without regenerating them (the command is in the README) fails here."""
    if not (DOCS / "genloss-demo.json").exists():
        pytest.skip("docs/genloss-demo.* not generated yet: run `genloss demo --seed 0 --out docs` (about 3 minutes "
                    "on 2 idle cores) and paste docs/genloss-demo.md into README.md's demo block")  # fmt: skip
    doc = json.loads((DOCS / "genloss-demo.json").read_text())
    regen = "regenerate with: " + doc["meta"]["command"]
    assert doc["meta"]["source_hash"] == demo.source_hash(), regen
    assert doc["meta"]["config"]["quick"] is False, "the docs show the full run"
    assert demo.source_hash().encode() in (DOCS / "genloss-demo.png").read_bytes(), regen
    md = (DOCS / "genloss-demo.md").read_text()
    assert f"source hash `{demo.source_hash()}`" in md, regen
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- genloss-demo.md start -->\n(.*?)<!-- genloss-demo.md end -->", readme, re.S)
    assert block is not None, "README.md has no demo table block"
    assert block.group(1) == md, "README's demo table differs from docs/genloss-demo.md: paste it in"
    assert doc["meta"]["command"] in readme


def test_source_hash_covers_every_demo_module():
    src = Path(demo.__file__).parent
    names = sorted(p.name for p in src.glob("*.py"))
    assert {"__init__.py", "data.py", "metrics.py", "methods.py", "runner.py", "report.py"} <= set(names)
    import hashlib

    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0" + (src / n).read_bytes() + b"\0")
    assert demo.source_hash() == h.hexdigest()[:16]


# ------------------------------------------------------------------ metrics


def test_mode_coverage_assignment_three_sigma_and_quarter_share():
    c, std = demo.ring_centers(), 0.02
    assert np.allclose(np.linalg.norm(c, axis=1), 2.0)
    n = 2000  # expected share 250 per mode; covered needs >= 62.5 within 3 std = 0.06
    x = [np.repeat(c[[0, 2, 3, 5]], 300, axis=0)]  # 4 modes, well covered
    x.append(np.repeat(c[1:2] + [0.059, 0.0], 63, axis=0))  # mode 1: 63 just inside 3 std: covered
    x.append(np.repeat(c[4:5] + [0.0, 0.05], 62, axis=0))  # mode 4: 62 inside: one short
    x.append(np.repeat(c[6:7] + [0.061, 0.0], 200, axis=0))  # mode 6: 200 just outside 3 std
    x.append(np.zeros((n - 1200 - 63 - 62 - 200, 2)))  # the rest at the origin
    cov = demo.mode_coverage(np.concatenate(x), c, std)
    assert cov["mode_counts"] == [300, 63, 300, 300, 62, 300, 0, 0]
    assert cov["modes_covered"] == 5 and cov["n_modes"] == 8
    assert cov["high_quality"] == pytest.approx((1200 + 63 + 62) / n)
    # the data: every mode covered, P(radius > 3 std) = exp(-4.5) outside
    real = demo.ring(20000, np.random.default_rng(0))
    cov = demo.mode_coverage(real, c, std)
    assert cov["modes_covered"] == 8
    assert cov["high_quality"] == pytest.approx(1 - math.exp(-4.5), abs=4 * math.sqrt(0.011 / 20000))
    g = demo.grid(5000, np.random.default_rng(1))
    assert demo.mode_coverage(g, demo.grid_centers(), 0.025)["modes_covered"] == 25


def test_grid_centres_and_non_finite_samples():
    gc = demo.grid_centers()
    assert gc.shape == (25, 2) and set(np.round(gc[:, 0], 12)) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    x = np.array([[np.nan, 0.0], [2.0, 0.0]])
    cov = demo.mode_coverage(x, demo.ring_centers(), 0.02)
    assert cov["high_quality"] == 0.5 and cov["mode_counts"][0] == 1


def test_mmd2_is_the_unbiased_estimator():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 2)), rng.normal(size=(5, 2)) + 0.3
    bw = (0.5, 2.0)

    def k(a, b):
        return np.mean([np.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in bw])

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    got = demo.mmd2_rbf(torch.from_numpy(x), torch.from_numpy(y), bandwidths=bw)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(xx + yy - 2 * xy, rel=1e-12, abs=1e-15)


def test_mmd2_agrees_with_genloss_mmd2_up_to_the_bandwidth_count():
    """genloss's tiled mmd2 sums the RBF kernels over the bandwidths, the demo's metric averages them."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(demo.ring(300, rng)).double()
    y = torch.from_numpy(demo.swiss_roll(200, rng)).double()
    ours = gl.mmd2(x, y, "rbf", list(demo.MMD_BANDWIDTHS), "unbiased")
    got = demo.mmd2_rbf(x, y)
    assert float(got) == pytest.approx(float(ours) / len(demo.MMD_BANDWIDTHS), rel=1e-10, abs=1e-14)


def test_mmd2_is_zero_in_expectation_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)

    def draw(n=250):
        return torch.from_numpy(demo.ring(n, rng))

    null = np.array([float(demo.mmd2_rbf(draw(), draw())) for _ in range(30)])
    se = null.std(ddof=1) / math.sqrt(len(null))
    assert abs(null.mean()) < 4 * se  # unbiased: no offset beyond the noise of the mean
    assert (null < 0).any()
    spread = torch.from_numpy(demo.ring(250, rng)) * 1.05  # modes 0.1 off the ring
    alt = float(demo.mmd2_rbf(draw(), spread))
    assert alt > null.mean() + 10 * null.std(ddof=1)


def _brute_prdc(real, fake, k=5):
    """Precision, recall, density, coverage by their definitions, with full distance matrices."""

    def radii(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=2)
        return np.sort(d, axis=1)[:, k]  # the k-th neighbour, itself excluded (column 0)

    r_real, r_fake = radii(real), radii(fake)
    d = np.linalg.norm(real[:, None] - fake[None], axis=2)  # (N, M)
    inside = d <= r_real[:, None]
    return {
        "precision": float(inside.any(axis=0).mean()),
        "recall": float((d <= r_fake[None, :]).any(axis=1).mean()),
        "density": float(inside.sum(axis=0).mean() / k),
        "coverage": float(inside.any(axis=1).mean()),
    }


def test_prdc_columns_are_wired_when_genloss_has_prdc(monkeypatch):
    monkeypatch.setattr(demo_metrics, "prdc_function", lambda: _brute_prdc)
    res = demo.run_demo(None, methods=["hinge"], datasets="ring", seeds=2, steps=10, workers=1, progress=False,
                        n_eval=120)  # fmt: skip
    cfg = runner.Config(seed=0, seeds=2, steps=10, n_eval=120, n_curve=120)
    runs = [r for r in res["runs"] if r["method"] == "hinge"]
    want = [_brute_prdc(runner.held_out(cfg, demo.DATASETS["ring"], r["rep"])[0].astype(np.float64),
                        r["samples"].astype(np.float64)) for r in runs]  # fmt: skip
    row = res["summary"][1]
    for name in ("precision", "recall", "density", "coverage"):
        assert row[name] == pytest.approx(np.mean([w[name] for w in want]), rel=1e-12)
    assert "| precision | recall | density | coverage |" in demo.format_table(res)
    assert res["meta"]["prdc_note"] is None


def test_without_prdc_the_columns_are_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(demo_metrics, "prdc_function", lambda: None)
    res = demo.run_demo(None, methods=["hinge"], datasets="ring", seeds=1, steps=3, workers=1, progress=False,
                        n_eval=50)  # fmt: skip
    table = demo.format_table(res)
    assert "precision" not in table.split("Columns:")[0]
    assert "no genloss.reference.metrics.prdc" in table


# ------------------------------------------------------------------ the method registry, skipping, VQ-VAE


def test_registry_names_real_ops():
    names = [m.name for m in demo.METHODS]
    assert len(set(names)) == len(names)
    assert {"gan-ns", "gan-minimax", "hinge", "lsgan", "wgan-gp", "fgan-js", "ragan", "vae", "ddpm", "flow",
            "edm", "consistency", "vq-vae"} <= set(names)  # fmt: skip
    for m in demo.METHODS:
        assert m.hparams.startswith("paper") and "demo:" in m.hparams, m.name
        if m.name != "vq-vae":  # vector_quantize: the quant family, landing separately
            assert m.available(), (m.name, m.missing())


def test_default_run_is_four_gan_objectives_and_every_other_family():
    default = [m.name for m in runner.resolve_methods(None)]
    assert default == ["gan-ns", "hinge", "lsgan", "wgan-gp", "vae", "ddpm", "flow", "edm", "consistency",
                       "vq-vae"]  # fmt: skip
    # a method left out of the default run still runs when named, on its own datasets
    pairs = runner.plan(runner.resolve_methods(["ragan"]), None)
    assert [(d, m.name) for d, m in pairs] == [("ring", "ragan"), ("grid", "ragan")]
    # WGAN-GP states the paper's recipe beside the demo's, and the demo's is what it runs
    wgan = next(m for m in demo.METHODS if m.name == "wgan-gp")
    paper, stated = wgan.hparams.split("; demo: ")
    assert "lambda 10" in paper and "5 critic steps" in paper
    assert "1 D step per G step" in stated and "decayed linearly to 0" in stated
    assert f"lambda {demo_methods.GP_LAMBDA:g}" in wgan.about
    t = wgan.setup(torch.device("cpu"), [torch.Generator().manual_seed(1)], demo.DATASETS["ring"])
    lr_g, lr_d = (t.opts[k].param_groups[0]["lr"] for k in ("g", "d"))
    assert f"lr G {lr_g:g}, D {lr_d:g}, betas {t.opts['d'].param_groups[0]['betas']}" in stated


def test_consistency_teacher_step_is_second_order():
    """CD's teacher step (Heun) against the exact probability-flow ODE for Gaussian data N(0, s²), whose
    ideal denoiser is D(x; σ) = s²/(s² + σ²) x and whose ODE solution is x(σ) ∝ sqrt(s² + σ²)."""
    s2 = 0.25

    def denoise(x, sigma):
        return s2 / (s2 + sigma[:, None] ** 2) * x

    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    hi = torch.tensor([1.0], dtype=torch.float64)
    errs = []
    for h in (0.2, 0.1):
        lo = hi - h
        exact = x * math.sqrt((s2 + lo.item() ** 2) / (s2 + hi.item() ** 2))
        errs.append(float((demo_methods.heun_step(denoise, x, hi, lo) - exact).abs().max()))
    assert errs[1] < 1e-3
    assert 5.0 < errs[0] / errs[1] < 11.0  # local error O(h³): halving the step divides it by ~8


def test_missing_family_is_skipped_with_a_line(monkeypatch, capsys):
    ghost = demo.Method(
        name="ghost", family="ghost", ops=("gan_d_loss", "no_such_op"), about="", hparams="", step=None,  # type: ignore[arg-type]
        setup=None, sample=None, datasets=("ring",),  # type: ignore[arg-type]
    )  # fmt: skip
    monkeypatch.setattr(demo_methods, "METHODS", [*demo_methods.METHODS, ghost])
    res = demo.run_demo(None, steps=3, seeds=1, methods=["ghost", "lsgan"], datasets="ring", workers=1,
                        progress=True, n_eval=50)  # fmt: skip
    assert res["skipped"] == [
        {
            "method": "ghost",
            "dataset": "ring",
            "note": "ghost ops not available (genloss.torch has no no_such_op)",
        }
    ]
    assert "`ghost` skipped: ghost ops not available" in demo.format_table(res)
    err = capsys.readouterr().err
    assert "genloss demo: ghost skipped" in err and "\r" not in err  # not a TTY: lines, no bar


def _vector_quantize(z, codebook, beta=0.25):
    """The SPEC's vector_quantize in plain torch: nearest code (ties to the lowest index), the
    straight-through z_q, the commitment and codebook losses per row."""
    d = torch.cdist(z.detach(), codebook.detach())
    idx = d.argmin(dim=1)
    e = codebook[idx]
    z_q = z + (e - z).detach()
    commit = beta * ((z - e.detach()) ** 2).sum(1)
    cb = ((z.detach() - e) ** 2).sum(1)
    return z_q, idx, commit, cb


def test_vq_vae_row_with_codebook_columns(monkeypatch):
    if not hasattr(gl, "vector_quantize"):
        monkeypatch.setattr(gl, "vector_quantize", _vector_quantize, raising=False)
    res = demo.run_demo(None, methods=["vq-vae"], seeds=2, steps=30, workers=1, progress=False, n_eval=200)
    row = res["summary"][-1]
    assert row["method"] == "vq-vae" and math.isfinite(row["mmd2"])
    for r in res["runs"][2:]:
        # perplexity from the code counts, independently: exp(entropy) is between 1 and the codes used
        used = r["extra"]["codebook_usage"] * demo_methods.VQ_CODES
        assert 1.0 <= r["extra"]["perplexity"] <= used + 1e-9
        assert len(np.unique(r["samples"], axis=0)) <= used + 64  # decoded codes: few distinct points
    table = demo.format_table(res)
    assert "codes used" in table and "perplexity" in table


# ------------------------------------------------------------------ arguments, dependencies


def test_bad_arguments():
    for kw, needle in [
        ({"methods": ["nope"]}, "methods"), ({"steps": 0}, "steps"), ({"threads": 0}, "threads"),
        ({"datasets": ["moons"]}, "datasets"), ({"n_eval": 1}, "n_eval"), ({"seeds": 0}, "seeds"),
        ({"seed": -1}, "seed"), ({"workers": 0}, "workers"), ({"device": "tpu"}, "device"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            demo.run_demo(None, progress=False, **kw)


def test_old_dataset_names_still_work():
    assert runner.resolve_datasets(["eight_gaussians", "spiral"]) == ["ring", "swiss_roll"]


def test_missing_dependency_is_one_line_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "REQUIRES", ("torch", "no_such_pkg_a", "no_such_pkg_b"))
    with pytest.raises(ImportError, match=re.escape(
            "genloss demo needs no_such_pkg_a and no_such_pkg_b: pip install 'genloss[demo]'")):  # fmt: skip
        demo.run_demo(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_seeds_are_independent_of_the_order_of_work():
    cfg = runner.Config(seed=7)
    a = runner._seed_sequence(cfg, "run", "ring", "gan-ns", 0).generate_state(2)
    want = np.random.SeedSequence([7, zlib.crc32(b"run"), zlib.crc32(b"ring"), zlib.crc32(b"gan-ns"), 0])
    np.testing.assert_array_equal(a, want.generate_state(2))


# ------------------------------------------------------------------ batched seeds: each seed is its own model


def _gan_batch(method, seeds, batches):
    """A GAN method's batched trainer over ``seeds`` after one step on the given real ``batches``."""
    m = next(x for x in demo.METHODS if x.name == method)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    t = m.setup(torch.device("cpu"), gens, demo.DATASETS["ring"])
    it = iter(batches)
    t.K, t.k = 1, 0
    losses = m.step(t, lambda: next(it))
    return t, losses


@pytest.mark.parametrize("method", ["gan-ns", "hinge", "lsgan", "wgan-gp", "ragan"])
def test_batched_gan_step_trains_each_seed_as_alone(method):
    """Three seeds trained as one batched model end one step where each seed trained alone
    ends: same weights, same losses (the seeds' gradients do not mix). In float64: the batched
    sums run in another order, and Adam's first steps (about lr x sign(gradient)) would
    turn a float32 rounding difference in a near-zero gradient into a visible one."""
    seeds, b = (11, 12, 13), 64
    n_critic = 1  # every GAN row takes one D step per G step (WGAN-GP: its critic at twice G's rate)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(demo.ring(3 * b, rng)).double().reshape(3, b, 2) for _ in range(n_critic)]
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        t3, l3 = _gan_batch(method, seeds, batches)
        alone = [_gan_batch(method, (seed,), [x[s : s + 1] for x in batches]) for s, seed in enumerate(seeds)]
    finally:
        torch.set_default_dtype(before)
    for s, (t1, l1) in enumerate(alone):
        for net in ("G", "D"):
            for p3, p1 in zip(t3.modules[net].parameters(), t1.modules[net].parameters(), strict=True):
                torch.testing.assert_close(p3[s : s + 1], p1, rtol=0, atol=1e-9)
        for k in ("d", "g"):
            torch.testing.assert_close(l3[k][s], l1[k][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("method", "lr_g", "lr_d"), [("gan-ns", 1e-3, 1e-3), ("wgan-gp", 1e-3, 2e-3)])
def test_gan_rates_decay_linearly_to_zero(method, lr_g, lr_d):
    """Step k of K runs at the stated initial rates times 1 - k/K (G's and D's alike)."""
    m = next(x for x in demo.METHODS if x.name == method)
    t = m.setup(torch.device("cpu"), [torch.Generator().manual_seed(5)], demo.DATASETS["ring"])
    t.K = 4
    rng = np.random.default_rng(0)
    for k in range(t.K):
        t.k = k
        m.step(t, lambda: torch.from_numpy(demo.ring(32, rng))[None])
        assert t.opts["g"].param_groups[0]["lr"] == pytest.approx(lr_g * (4 - k) / 4, rel=1e-12)
        assert t.opts["d"].param_groups[0]["lr"] == pytest.approx(lr_d * (4 - k) / 4, rel=1e-12)


@pytest.mark.parametrize("method", ["ddpm", "flow", "edm"])
def test_denoiser_rates_decay_linearly_to_zero(method):
    """A denoiser's step k of K runs at DENOISER_LR times 1 - k/K, as its hparams state."""
    m = next(x for x in demo.METHODS if x.name == method)
    assert f"lr {demo_methods.DENOISER_LR:g} decayed linearly to 0" in m.hparams
    t = m.setup(torch.device("cpu"), torch.Generator().manual_seed(5), demo.DATASETS["swiss_roll"])
    t.K = 4
    rng = np.random.default_rng(0)
    (opt,) = t.opts.values()
    for k in range(t.K):
        t.k = k
        m.step(t, lambda: torch.from_numpy(demo.swiss_roll(32, rng)))
        assert opt.param_groups[0]["lr"] == pytest.approx(demo_methods.DENOISER_LR * (4 - k) / 4, rel=1e-12)


def test_consistency_teacher_decays_and_student_does_not():
    """The EDM teacher of the consistency row trains at DENOISER_LR decayed to 0 over its n
    steps; the student keeps LR."""
    m = next(x for x in demo.METHODS if x.name == "consistency")
    t = m.setup(torch.device("cpu"), torch.Generator().manual_seed(5), demo.DATASETS["swiss_roll"])
    rng = np.random.default_rng(0)
    seen = []
    step = t.opts["teacher"].step

    def spy():
        seen.append(t.opts["teacher"].param_groups[0]["lr"])
        return step()

    t.opts["teacher"].step = spy  # type: ignore[method-assign]
    m.pretrain(t, lambda: torch.from_numpy(demo.swiss_roll(32, rng)), 5)
    assert seen == pytest.approx([demo_methods.DENOISER_LR * (5 - i) / 5 for i in range(5)], rel=1e-12)
    t.K, t.k = 4, 3
    m.step(t, lambda: torch.from_numpy(demo.swiss_roll(32, rng)))
    assert t.opts["F"].param_groups[0]["lr"] == demo_methods.LR


def test_batched_mlp_is_the_seeds_mlps_and_a_loss_over_b_by_s_is_the_sum_of_theirs():
    torch.manual_seed(0)
    nets = [demo_methods.mlp(2, 1, 16, 2) for _ in range(3)]
    bm = demo_methods.BatchedMLP(nets)
    x = torch.randn(3, 10, 2)
    out = bm(x)
    for s, net in enumerate(nets):
        torch.testing.assert_close(out[s], net(x[s]), rtol=1e-6, atol=1e-6)
    r, f = torch.randn(3, 10), torch.randn(3, 10)
    for d_loss in (gl.gan_d_loss, gl.hinge_d_loss, gl.lsgan_d_loss, gl.wgan_critic_loss):
        want = sum(float(d_loss(r[s], f[s])) for s in range(3))
        assert float(d_loss(r.T, f.T)) == pytest.approx(want, rel=1e-6)
    # the relativistic average loss subtracts the mean over every element: (B, S) would mix the
    # seeds, which is why the demo calls it once per seed
    want = sum(float(gl.relativistic_d_loss(r[s], f[s], average=True)) for s in range(3))
    assert float(gl.relativistic_d_loss(r.T, f.T, average=True)) != pytest.approx(want, rel=1e-6)
