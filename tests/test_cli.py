"""The genloss command (``genloss.apps``): help, argument errors, missing packages, verify
(its seed, its report, a broken kernel injected through a test double), bench (quartiles,
the load warning), demo writing its figure."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import genloss
from genloss import registry
from genloss.apps import bench, cli, verify

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=False):
    return subprocess.run(
        [sys.executable, "-m", "genloss", *args], capture_output=True, text=True, check=check
    )


# A meta-path finder, first on sys.meta_path, that fails the import of the named packages
# (and their submodules) with ERROR; without uninstalling anything.
BLOCK = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NAMES:
            raise ERROR
        return None

sys.meta_path.insert(0, Block())
"""
ABSENT = 'ModuleNotFoundError(f"No module named {name!r}", name=name)'  # what a missing package raises


def run_without(names, code, error=ABSENT):
    """Run ``code`` in a fresh interpreter in which importing the packages ``names`` raises ``error``."""
    block = BLOCK.replace("NAMES", repr(sorted(names))).replace("ERROR", error)
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True)


def run_cli_without(names, *args, error=ABSENT):
    code = f"from genloss.apps.cli import main\nraise SystemExit(main({list(args)!r}))\n"
    return run_without(names, code, error)


# ------------------------------------------------------------------ the command itself


def test_help_lists_every_subcommand():
    out = run("--help", check=True).stdout
    for sub in ("demo", "verify", "bench", "info"):
        assert sub in out
    for sub in ("demo", "verify", "bench", "info"):
        assert run(sub, "--help", check=True).stdout.startswith("usage: genloss " + sub)


def test_console_script_and_module_name_the_same_main():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["genloss"].partition(":")
    assert (module, attr) == ("genloss.apps.cli", "main")
    assert getattr(__import__(module, fromlist=[attr]), attr) is cli.main
    shim = (ROOT / "python" / "genloss" / "__main__.py").read_text()
    assert "from genloss.apps.cli import main" in shim


def test_library_core_does_not_import_the_apps():
    code = (
        "import sys, genloss, genloss.reference, genloss.native, genloss.registry, genloss.tolerances\n"
        "try:\n    import genloss.torch\nexcept ImportError:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('genloss.apps')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--steps", "0"], "positive integer"),
        (["demo", "--device", "tpu"], "device must be 'cpu' or 'cuda'"),
        (["bench", "--reps", "x"], "positive integer"),
        (["verify", "--ops", "no_such_op"], "unknown op"),
        (["verify", "--seed", "-1"], "seed must be a non-negative int"),
        (["bench", "--family", "nope", "--no-compile"], "unknown family"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argument_errors_are_clear(args, needle):
    res = run(*args)
    assert res.returncode == 2
    assert needle in res.stderr


def test_info_is_json():
    info = json.loads(run("info", check=True).stdout)
    assert {"cuda", "isa", "openmp"} <= set(info)


def test_a_closed_pipe_ends_quietly():
    """`genloss info | head -0`: the reader is gone before the first write; no BrokenPipeError traceback."""
    p = subprocess.Popen(
        [sys.executable, "-m", "genloss", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    p.stdout.close()  # before the interpreter has even started: its first write meets a closed pipe
    with p.stderr:
        err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141  # 128 + SIGPIPE, as a tool killed by the signal
    assert err == ""


def test_demo_help_names_the_extra_methods_as_accepted():
    from genloss.apps.demo.methods import METHODS

    text = " ".join(run("demo", "--help", check=True).stdout.split())  # argparse wraps lines
    extra = [m.name for m in METHODS if not m.default]
    assert extra and f"the others: {', '.join(extra)})" in text


def test_an_empty_out_is_refused():
    res = run("demo", "--out", "", "--steps", "1")
    assert res.returncode == 2
    assert "argument --out: expected a folder name, got an empty string" in res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------ missing packages


@pytest.mark.parametrize(
    ("absent", "args", "line"),
    [
        ({"torch"}, ["demo"], "genloss demo needs torch: pip install 'genloss[demo]'"),
        ({"matplotlib"}, ["demo"], "genloss demo needs matplotlib: pip install 'genloss[demo]'"),
        (
            {"torch", "matplotlib"},
            ["demo"],
            "genloss demo needs torch and matplotlib: pip install 'genloss[demo]'",
        ),
        ({"torch"}, ["bench"], "genloss bench needs torch: pip install 'genloss[bench]'"),
    ],
)
def test_a_missing_package_stops_the_command_at_once_with_one_line(tmp_path, absent, args, line):
    out = tmp_path / "out"
    res = run_cli_without(absent, *args, *(["--out", str(out)] if args == ["demo"] else []))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [line]
    assert res.stdout == ""
    assert not out.exists()  # the demo stopped before any training (it writes its figure last)


def test_a_broken_package_is_named_with_its_error():
    """Installed but failing to import (ImportError without the package's name): not 'install it'."""
    res = run_cli_without({"torch"}, "bench", error='ImportError("libx.so: cannot open")')
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "genloss bench: torch is installed but fails to import (libx.so: cannot open)"
    ]


def test_genloss_torch_without_torch_is_one_import_error():
    res = run_without(
        {"torch"},
        "try:\n    import genloss.torch\nexcept ImportError as e:\n    print(type(e).__name__, '|', e)\n"
        "import genloss.reference, genloss.native\nprint('core ok')\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "ImportError | genloss.torch needs PyTorch: pip install 'genloss[torch]'",
        "core ok",
    ]


def test_verify_runs_without_torch_and_says_what_it_skipped():
    res = run_cli_without({"torch"}, "verify", "--json", "--seed", "1", "--ops", "gan_d_loss")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    expected_cuda = "built, no torch: skipped" if genloss.build_info()["cuda"] else "not built"
    assert report["backends"] == {"cpu": True, "torch": "not installed: skipped", "cuda": expected_cuda}
    assert [(r["op"], r["backend"], r["ok"]) for r in report["rows"]] == [("gan_d_loss", "native-cpu", True)]


def test_verify_of_torch_only_ops_without_torch_is_an_error_not_a_pass():
    """No cell can run: not '0 of 0 cells pass.' and exit 0, but one line saying why, exit 2."""
    res = run_cli_without({"torch"}, "verify", "--ops", "spectral_norm_sigma", "frechet_distance")
    assert res.returncode == 2, res.stdout
    assert res.stderr.splitlines() == [
        "genloss verify: nothing to check: spectral_norm_sigma, frechet_distance have no native kernel and "
        "need torch, which is not installed (pip install 'genloss[torch]')"
    ]
    assert res.stdout == ""


def test_verify_without_torch_says_which_ops_it_skipped():
    res = run_cli_without({"torch"}, "verify", "--seed", "1", "--ops", "gan_d_loss", "spectral_norm_sigma")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1] == (
        "not checked: 1 op (spectral_norm_sigma) has no native kernel and needs torch, which is not "
        "installed (pip install 'genloss[torch]')"
    )
    assert lines[-1] == "1 of 1 cells pass (1 op skipped: no native kernel, no torch)."
    res = run_cli_without(
        {"torch"}, "verify", "--json", "--seed", "1", "--ops", "gan_d_loss", "spectral_norm_sigma"
    )
    report = json.loads(res.stdout)
    assert report["skipped"] == {"spectral_norm_sigma": "no native kernel; torch not installed"}
    assert [r["op"] for r in report["rows"]] == ["gan_d_loss"]


def test_verify_table_column_fits_the_longest_op_name():
    names = ["discretized_gaussian_log_likelihood", "l1_loss"]
    rows = [verify._row(n, "native-cpu", 1e-8, 1e-8, 0.1, 0.1, None) for n in names]
    status = {"cpu": True, "torch": True, "cuda": "not built"}
    lines = verify.format_table({"seed": 0, "version": "x", "backends": status, "rows": rows}).splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("op "))
    table = lines[head : head + 1 + len(names)]
    assert [ln.split()[0] for ln in table[1:]] == names
    # the op column as wide as the longest name (+ 1 space): the long name's cells line up with the rest
    assert len(table[1]) == len(table[2]), table
    assert table[0] == "op".ljust(len(names[0])) + " " + "native-cpu".rjust(24)


# ------------------------------------------------------------------ verify

VERIFY_OPS = ("gan_d_loss", "l1_loss", "ssgan_critic_loss")


def expected_backends():
    """What verify should say ran, from build_info and torch directly."""
    torch = pytest.importorskip("torch")
    if not genloss.build_info()["cuda"]:
        cuda = "not built"
    else:
        cuda = "ran" if torch.cuda.is_available() else "built, no device: skipped"
    return {"cpu": True, "torch": True, "cuda": cuda}


def test_verify_passes_and_json_is_one_object():
    res = run("verify", "--json", "--seed", "3", "--ops", *VERIFY_OPS)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert set(report) == {"seed", "version", "backends", "rows", "skipped"}
    assert report["seed"] == 3 and report["version"] == genloss.__version__
    assert report["skipped"] == {}  # with torch every op has a backend
    assert report["backends"] == expected_backends()
    rows = report["rows"]
    assert {r["op"] for r in rows} == set(VERIFY_OPS)
    cuda_rows = {r["backend"] for r in rows if "cuda" in r["backend"]}
    assert bool(cuda_rows) == (report["backends"]["cuda"] == "ran")
    assert all(r["ok"] for r in rows)


def test_verify_prints_its_seed_and_the_seed_reproduces_the_inputs(capsys):
    fresh = verify.run_verify(ops=["gan_d_loss", "l1_loss"], progress=False)
    seed = fresh["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again = verify.run_verify(seed=seed, ops=["gan_d_loss", "l1_loss"], progress=False)
    assert again["rows"] == fresh["rows"]  # the same inputs give bit-identical errors
    # an op draws the same inputs alone as with others: a failing cell reruns alone
    alone = verify.run_verify(seed=seed, ops=["l1_loss"], progress=False)
    assert alone["rows"] == [r for r in fresh["rows"] if r["op"] == "l1_loss"]
    assert cli.main(["verify", "--seed", str(seed), "--ops", "l1_loss"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"genloss {genloss.__version__} verify, seed {seed}; backends: cpu ran")


def test_verify_fails_on_a_broken_kernel(monkeypatch, capsys):
    """A test double of the native gan_d_loss whose gradient is off by 1e-3 relative."""
    import genloss.native

    record = registry.by_name("gan_d_loss")
    good = record.native

    def broken(*args, **kwargs):
        value, grads = good(*args, **kwargs)
        return value, tuple(g * (1 + 1e-3) for g in grads)

    monkeypatch.setattr(genloss.native, "gan_d_loss", broken)  # the registry looks it up by name
    monkeypatch.setattr(verify.R, "RECORDS", (record,))
    monkeypatch.setattr(verify.R, "VERIFY_CASES", ())  # their own failures: tests/test_verify_cases.py
    rows = verify.run_verify(seed=0, progress=False)["rows"]
    by = {r["backend"]: r for r in rows}
    assert not by["native-cpu"]["ok"]
    assert by["native-cpu"]["grad_vs_tol"] > 1 and by["native-cpu"]["value_vs_tol"] <= 1
    assert cli.main(["verify", "--seed", "11"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "  FAIL gan_d_loss on native-cpu: " in "\n".join(out)
    assert out[-1] == "reproduce: genloss verify --seed 11 --ops gan_d_loss"
    assert cli.main(["verify", "--seed", "11", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["seed"] == 11  # stdout stays one JSON object
    assert captured.err.splitlines() == ["reproduce: genloss verify --seed 11 --ops gan_d_loss"]


# ------------------------------------------------------------------ bench


def test_bench_cases_time_the_same_loss():
    """Each ``genloss bench`` case's eager composite (what it times genloss against) is the same
    loss as the genloss op: value and gradients of the case's own inputs agree (a peer's
    formula, written as users write it: EDM's c_skip/c_out/lambda form, MMD^2 through cdist)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("genloss._C")
    cases = bench._cases(torch)
    assert {"gan", "vae", "diffusion", "flow", "metrics"} <= {c.family for c in cases}
    for c in cases:
        torch.manual_seed(0)
        ts = c.make(torch, "cpu")
        leaves = [t for t in ts if t.requires_grad]
        ours = c.ours(*ts)
        eager = c.eager(*ts)
        g_ours = torch.autograd.grad(ours, leaves)
        g_eager = torch.autograd.grad(eager, leaves)
        torch.testing.assert_close(ours.double(), eager.double(), rtol=2e-5, atol=1e-7, msg=c.name)
        for a, b in zip(g_ours, g_eager, strict=True):
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale, msg=c.name)


def test_bench_quartiles_interpolate_within_the_times():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 10):
        ts = rng.random(n).tolist()
        q = bench.quartiles(ts)
        q1, med, q3 = np.percentile(ts, [25, 50, 75])  # NumPy's default: linear at (n - 1) p
        assert (q["q1"], q["median"], q["q3"]) == pytest.approx((q1, med, q3), rel=1e-12)
        assert q["median"] == pytest.approx(statistics.median(ts), rel=1e-15)
        assert min(ts) <= q["q1"] <= q["median"] <= q["q3"] <= max(ts)
    assert bench.quartiles([2.0, 1.0]) == {"median": 1.5, "q1": 1.25, "q3": 1.75}
    assert bench.quartiles([0.5]) == {"median": 0.5, "q1": 0.5, "q3": 0.5}


@pytest.mark.parametrize(
    ("load", "cores", "warned"), [(2.5, 2, True), (2.0, 2, False), (0.1, 16, False), (None, 2, False)]
)
def test_bench_load_warning(monkeypatch, load, cores, warned):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    w = bench.load_warning(load)
    if warned:
        assert w is not None and w.startswith(f"warning: load average {load:.2f} > {cores} cores")
        assert "\n" not in w
    else:
        assert w is None


def test_bench_json_has_quartiles_and_warns_under_load(monkeypatch, capsys):
    pytest.importorskip("torch")
    hot = 4.0 * os.cpu_count()  # a busy machine, whatever its size
    monkeypatch.setattr(os, "getloadavg", lambda: (hot, 0.0, 0.0))
    assert cli.main(["bench", "--family", "gan", "--no-compile", "--reps", "3", "--json"]) == 0
    captured = capsys.readouterr()
    warning = bench.load_warning(hot)
    assert warning.startswith(f"warning: load average {hot:.2f} > {os.cpu_count()} cores")
    assert [ln for ln in captured.err.splitlines() if ln.startswith("warning")] == [warning]
    out = json.loads(captured.out)
    assert out["load1"] == hot and out["load_warning"] == warning
    assert out["copy_gbps"] > 0
    assert {r["family"] for r in out["rows"]} == {"gan"}
    for r in out["rows"]:
        for name in ("genloss", "eager"):
            assert 0 < r[f"{name}_q1_s"] <= r[f"{name}_s"] <= r[f"{name}_q3_s"]
        assert r["compile_s"] is r["compile_q1_s"] is r["compile_q3_s"] is None
        assert r["vs_eager"] == pytest.approx(r["eager_s"] / r["genloss_s"], rel=1e-12)
        assert np.isfinite(r["genloss_gbps"]) and r["genloss_gbps"] > 0
    table = bench.format_table(out)
    assert "median (q1-q3)" in table.splitlines()[0]
    r0 = out["rows"][0]
    assert (
        f"{r0['genloss_s'] * 1e3:.3g} ({r0['genloss_q1_s'] * 1e3:.3g}-{r0['genloss_q3_s'] * 1e3:.3g})"
        in table
    )


def test_bench_table_explains_a_share_of_copy_above_100():
    """A case above the copy probe's counted bandwidth gets a line under the table saying why
    that is not an error; a table without one gets none."""
    row = {"family": "gan", "case": "l1_loss 4M", "genloss_s": 1e-3, "genloss_q1_s": 1e-3, "genloss_q3_s": 1e-3,
           "eager_s": 2e-3, "eager_q1_s": 2e-3, "eager_q3_s": 2e-3, "compile_s": None, "compile_q1_s": None,
           "compile_q3_s": None, "vs_eager": 2.0, "vs_compile": None}  # fmt: skip
    fast = bench.format_table({"device": "cpu", "copy_gbps": 20.0, "rows": [{**row, "genloss_gbps": 35.0}]})
    assert "175.0%" in fast and fast.splitlines()[-1].startswith("% copy above 100 is not an error")
    slow = bench.format_table({"device": "cpu", "copy_gbps": 20.0, "rows": [{**row, "genloss_gbps": 10.0}]})
    assert "% copy above 100" not in slow


# ------------------------------------------------------------------ demo


def test_demo_writes_its_figure(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    res = run("demo", "--steps", "5", "--methods", "gan-ns", "--out", str(tmp_path), "--no-progress")
    assert res.returncode == 0, res.stderr
    png = tmp_path / "genloss-demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gan-ns" in res.stdout


def test_an_output_name_taken_by_a_folder_is_refused_before_any_training(tmp_path, capsys):
    """It once trained the whole run, then failed writing with an IsADirectoryError traceback."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    (tmp_path / "genloss-demo.json").mkdir()
    args = [
        "demo",
        "--methods",
        "vae",
        "--steps",
        "10",
        "--seeds",
        "1",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"genloss demo: run_demo: cannot write the outputs to {str(tmp_path)!r}: "
        f"{str(tmp_path / 'genloss-demo.json')!r} is a folder"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genloss-demo.json"]  # nothing trained, written


def test_a_write_failure_at_the_end_keeps_the_old_outputs_and_prints_the_table(tmp_path, capsys, monkeypatch):
    """The disk fills while the JSON is written: the table still reaches the terminal, one line says what
    failed (exit 1), the previous outputs are untouched and no half-written or temporary file is left."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from genloss.apps.demo import FILES, report

    for f in FILES:
        (tmp_path / f).write_text("old")

    def full(_doc):
        raise OSError(28, "No space left on device", str(tmp_path / "genloss-demo.json"))

    monkeypatch.setattr(report, "_jsonable", full)
    args = ["demo", "--methods", "vae", "--steps", "3", "--seeds", "1", "--workers", "1", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "| vae |" in captured.out
    errors = [ln for ln in captured.err.splitlines() if not ln.startswith("genloss demo: will overwrite")]
    assert errors == [
        f"genloss demo: cannot write the outputs to {str(tmp_path)!r}: No space left on device; nothing was replaced"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert all((tmp_path / f).read_text() == "old" for f in FILES)


def test_a_write_failure_removes_the_folder_the_demo_made(tmp_path, capsys, monkeypatch):
    """The same failure into a folder that did not exist: the demo made it for the outputs, and it is
    gone again (it stayed behind empty), while a parent that existed is left alone."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from genloss.apps.demo import report

    def full(_doc):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "_jsonable", full)
    out = tmp_path / "new"
    args = ["demo", "--methods", "vae", "--steps", "3", "--seeds", "1", "--workers", "1", "--no-progress"]
    assert cli.main([*args, "--out", str(out)]) == 1
    assert "No space left on device; nothing was replaced" in capsys.readouterr().err
    assert not out.exists()
    assert tmp_path.is_dir()


def test_a_method_named_twice_runs_once(tmp_path):
    pytest.importorskip("torch")
    from genloss.apps.demo import run_demo, runner

    assert [m.name for m in runner.resolve_methods(["vae", "ddpm", "vae"])] == ["vae", "ddpm"]
    assert runner.resolve_datasets(["ring", "eight_gaussians", "grid", "ring"]) == ["ring", "grid"]
    res = run_demo(None, methods=["vae", "vae"], steps=3, seeds=1, workers=1, progress=False, n_eval=50)
    vae = [r for r in res["summary"] if r["method"] == "vae"]
    assert len(vae) == 1 and vae[0]["seeds"] == 1  # not a second run counted as a second seed
    assert sum(r["method"] == "vae" for r in res["runs"]) == 1


def _group_alive(pgid):
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(d.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc and process groups")
def test_ctrl_c_stops_the_demo_at_once_without_traceback_or_workers(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole process group (the command and its workers) while
    the workers train. It once took 7 s and printed a KeyboardInterrupt traceback (and, with SIGINT
    to the parent only, finished every queued run first)."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "genloss", "demo", "--methods", "vae", "--steps", "100000", "--seeds", "2",
           "--workers", "2", "--out", str(out)]  # fmt: skip
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # pytest's SIGINT handling aside
    )
    try:
        # working: both workers started (spawned interpreters, children of the command)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            workers = [q for q in _group_alive(p.pid) if q != p.pid and "spawn_main" in _cmdline(q)]
            if len(workers) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail(
                f"the demo's workers did not start: {p.poll()=} {p.stderr.read() if p.poll() else ''}"
            )
        time.sleep(1.0)  # into the work (a Ctrl-C while they boot is handled as well)
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert took < 15, took  # ~1 s idle; generous for a loaded 2-core CI machine
    assert err.splitlines()[-1:] == ["genloss demo: interrupted; nothing written"], err
    assert "Traceback" not in err
    assert not out.exists()  # the folder it made for the outputs is gone again
    deadline = time.monotonic() + 10  # the resource tracker exits once it sees its parent gone
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_alive(p.pid) == []  # no orphaned worker still training


def _cmdline(pid):
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
