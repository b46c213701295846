"""The ``genloss demo`` (``genloss.apps.demo``): a short run, its metrics, its determinism."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import genloss.torch as gl  # noqa: E402
from genloss.apps import demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEYS = {
    "method", "family", "status", "note", "about", "ops", "steps", "batch", "seed", "modes_covered",
    "mode_counts", "high_quality", "mmd2", "losses", "d_loss", "g_loss", "loss", "history", "samples",
    "wall_s", "cpu_s",
}  # fmt: skip
N_EVAL = 500  # the default 2000 costs 16x more in MMD²; the metrics are tested apart
SHORT = ["gan-ns", "wgan-gp", "ragan"]  # plain, gradient penalty, relativistic (G sees D(real))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As run_demo does: on a 2-core machine shared with other jobs, two OpenMP threads
    wait on each other (the MMD² test took 19 s instead of 0.3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def short_run(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(out, steps=30, seed=3, methods=SHORT, progress=False, n_eval=N_EVAL)


# ------------------------------------------------------------------ the run


def test_short_run_writes_a_png_and_the_results(short_run):
    out, results = short_run
    png = out / "genloss-demo.png"
    assert png.is_file() and png.stat().st_size > 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert [r["method"] for r in results] == ["data", *SHORT]
    assert results[0]["status"] == "reference"
    for r in results:
        assert set(r) == KEYS, r["method"]
        assert r["samples"].shape == (N_EVAL, 2)
        assert 0 <= r["modes_covered"] <= demo.N_MODES and sum(r["mode_counts"]) <= N_EVAL
        assert math.isfinite(r["mmd2"])
    for r in results[1:]:
        assert r["status"] == "ok" and r["steps"] == 30
        assert math.isfinite(r["d_loss"]) and math.isfinite(r["g_loss"]) and r["loss"] is None
        assert r["history"]["d"].shape == r["history"]["g"].shape == (30,)
    # the data row is the noise floor: all modes, all samples near a mode, tiny MMD²
    data = results[0]
    assert data["modes_covered"] == 8 and data["high_quality"] == 1.0
    assert data["mmd2"] < min(r["mmd2"] for r in results[1:])
    table = demo.format_table(results)
    assert table.splitlines()[0].split()[:4] == ["method", "modes", "hq", "MMD²"]
    for name in SHORT:
        assert name in table


def test_same_seed_same_numbers_alone_or_with_others(short_run, tmp_path):
    _, results = short_run
    again = demo.run_demo(
        tmp_path / "again", steps=30, seed=3, methods=["ragan"], progress=False, n_eval=N_EVAL
    )
    a, b = results[-1], again[-1]
    assert a["method"] == b["method"] == "ragan"
    np.testing.assert_array_equal(a["samples"], b["samples"])
    np.testing.assert_array_equal(a["history"]["g"], b["history"]["g"])
    assert (a["mmd2"], a["losses"], a["mode_counts"]) == (b["mmd2"], b["losses"], b["mode_counts"])
    other = demo.run_demo(tmp_path / "other", steps=2, seed=4, methods=["ragan"], progress=False, n_eval=50)
    assert not np.array_equal(other[-1]["history"]["g"], a["history"]["g"][:2])


# ------------------------------------------------------------------ metrics


def test_mode_counter_on_samples_placed_at_five_modes():
    c = demo.mode_centers()
    assert np.allclose(np.linalg.norm(c, axis=1), 2.0)
    at = [0, 2, 3, 5, 7]
    x = np.repeat(c[at], 360, axis=0)  # 1800 samples, exactly on 5 centres
    # 100 near mode 1 but outside the radius, 90 at the origin, 10 within the radius of mode 4 (< 2%)
    off = c[1] * (1 + 1.5 * demo.QUALITY_RADIUS / 2.0)
    x = np.concatenate([x, np.repeat(off[None], 100, 0), np.zeros((90, 2)), np.repeat(c[4:5] + 0.05, 10, 0)])
    cov = demo.mode_coverage(x)
    assert cov["modes_covered"] == 5
    assert cov["mode_counts"] == [360, 0, 360, 360, 10, 360, 0, 360]
    assert cov["high_quality"] == pytest.approx(1810 / 2000)
    # the data itself covers every mode, every sample high quality
    real = demo.eight_gaussians(2000, np.random.default_rng(0))
    assert demo.mode_coverage(torch.from_numpy(real)) == {
        "modes_covered": 8,
        "mode_counts": np.bincount(
            np.argmin(np.linalg.norm(real[:, None] - c[None], axis=2), axis=1), minlength=8
        ).tolist(),
        "high_quality": 1.0,
    }


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
    x = torch.from_numpy(demo.eight_gaussians(300, rng)).double()
    y = torch.from_numpy(demo.spiral(200, rng)).double()
    ours = gl.mmd2(x, y, "rbf", list(demo.MMD_BANDWIDTHS), "unbiased")
    got = demo.mmd2_rbf(x, y)
    assert float(got) == pytest.approx(float(ours) / len(demo.MMD_BANDWIDTHS), rel=1e-10, abs=1e-14)


def test_mmd2_is_zero_in_expectation_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)

    def draw(n=250):
        return torch.from_numpy(demo.eight_gaussians(n, rng))

    null = np.array([float(demo.mmd2_rbf(draw(), draw())) for _ in range(30)])
    se = null.std(ddof=1) / math.sqrt(len(null))
    assert abs(null.mean()) < 4 * se  # unbiased: no offset beyond the noise of the mean
    assert (null < 0).any()  # and, being unbiased, sometimes below zero
    spread = torch.from_numpy(demo.eight_gaussians(250, rng)) * 1.05  # modes 0.1 off the ring
    alt = float(demo.mmd2_rbf(draw(), spread))
    assert alt > null.mean() + 10 * null.std(ddof=1)
    assert float(demo.mmd2_rbf(draw(), torch.from_numpy(demo.spiral(250, rng)))) > alt


# ------------------------------------------------------------------ registry, skipping, progress


def test_registry_names_real_ops():
    names = [m.name for m in demo.METHODS]
    assert len(set(names)) == len(names)
    assert {"gan-ns", "gan-minimax", "hinge", "lsgan", "wgan-gp", "fgan-js", "ragan", "vae", "ddpm"} <= set(
        names
    )
    for m in demo.METHODS:  # every family of the demo is in genloss.torch: nothing is skipped
        assert m.available(), (m.name, m.missing())


def test_missing_family_is_skipped_with_a_line(monkeypatch, tmp_path, capsys):
    ghost = demo.Method(
        name="ghost", family="ghost", ops=("gan_d_loss", "no_such_op"), about="", step=None,  # type: ignore[arg-type]
        setup=None, sample=None,  # type: ignore[arg-type]
    )  # fmt: skip
    monkeypatch.setattr(demo, "METHODS", [*demo.METHODS, ghost])
    results = demo.run_demo(tmp_path, steps=3, methods=["ghost", "lsgan"], progress=True, n_eval=50)
    skipped = results[1]
    assert skipped["status"] == "skipped" and "no_such_op" in skipped["note"]
    assert "ghost ops not available (genloss.torch has no no_such_op)" in demo.format_table(results)
    # stderr is not a TTY under pytest: no bar, one line per method
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("ghost") and err[1].startswith("lsgan")
    assert "\r" not in "".join(err)


def test_progress_bar_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    bar = demo._Progress("x", 10, True, s)
    bar.last -= 1.0
    assert bar.due()
    bar.update(5, "D 1")
    bar.close("x done")
    assert s.getvalue().startswith("\rx ") and "[############............] 5/10" in s.getvalue()
    assert s.getvalue().endswith("\rx done" + " " * (len(s.getvalue().split("\r")[1]) - 6) + "\n")
    quiet = io.StringIO()
    demo._Progress("x", 10, False, quiet).close("x done")
    assert quiet.getvalue() == ""


def test_spiral_has_no_mode_metric(tmp_path):
    results = demo.run_demo(
        tmp_path, steps=3, methods=["hinge"], progress=False, n_eval=100, dataset="spiral"
    )
    assert [r["modes_covered"] for r in results] == [None, None]
    assert all(math.isfinite(r["mmd2"]) for r in results)
    assert "-" in demo.format_table(results).splitlines()[2].split()[1]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        demo.run_demo(tmp_path, methods=["nope"], progress=False)
    with pytest.raises(ValueError, match="steps"):
        demo.run_demo(tmp_path, steps=0, progress=False)
    with pytest.raises(ValueError, match="threads"):
        demo.run_demo(tmp_path, threads=0, progress=False)
    with pytest.raises(ValueError, match="dataset"):
        demo.run_demo(tmp_path, dataset="moons", progress=False)
    with pytest.raises(ValueError, match="n_eval"):
        demo.run_demo(tmp_path, n_eval=1, progress=False)


# ------------------------------------------------------------------ the VAE and the DDPM


def test_vae_and_ddpm_records_run(tmp_path):
    results = demo.run_demo(tmp_path, steps=10, methods=["vae", "ddpm"], progress=False, n_eval=200)
    assert [r["method"] for r in results] == ["data", "vae", "ddpm"]
    for r in results[1:]:
        assert r["status"] == "ok", r["note"]
        assert r["d_loss"] is None and math.isfinite(r["loss"]) and math.isfinite(r["mmd2"])
        assert r["history"]["loss"].shape == (10,)
        assert np.isfinite(r["samples"]).all()
    assert (tmp_path / "genloss-demo.png").read_bytes()[:8] == PNG_MAGIC
