"""The genloss command: help, argument errors, verify (including a broken kernel
injected through a test double), bench --json, demo writing its figure."""

import json
import subprocess
import sys

import numpy as np
import pytest

from genloss import cli, registry, verify


def run(*args, check=False):
    return subprocess.run(
        [sys.executable, "-m", "genloss", *args], capture_output=True, text=True, check=check
    )


def test_help_lists_every_subcommand():
    out = run("--help", check=True).stdout
    for sub in ("demo", "verify", "bench", "info"):
        assert sub in out
    for sub in ("demo", "verify", "bench", "info"):
        assert run(sub, "--help", check=True).stdout.startswith("usage: genloss " + sub)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--steps", "0"], "positive integer"),
        (["demo", "--device", "tpu"], "device must be 'cpu' or 'cuda'"),
        (["bench", "--reps", "x"], "positive integer"),
        (["verify", "--ops", "no_such_op"], "unknown op"),
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


def test_verify_passes_and_json_is_valid():
    res = run("verify", "--json", "--seed", "3", "--ops", "gan_d_loss", "l1_loss", "ssgan_critic_loss")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(res.stdout)
    assert {r["op"] for r in rows} == {"gan_d_loss", "l1_loss", "ssgan_critic_loss"}
    assert all(r["ok"] for r in rows)


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
    rows = verify.run_verify(seed=0, progress=False)
    by = {r["backend"]: r for r in rows}
    assert not by["native-cpu"]["ok"]
    assert by["native-cpu"]["grad_vs_tol"] > 1 and by["native-cpu"]["value_vs_tol"] <= 1
    assert cli.main(["verify"]) == 1
    assert "FAIL gan_d_loss on native-cpu" in capsys.readouterr().out


def test_bench_json_is_valid():
    pytest.importorskip("torch")
    res = run("bench", "--family", "gan", "--no-compile", "--reps", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["copy_gbps"] > 0
    assert {r["family"] for r in out["rows"]} == {"gan"}
    for r in out["rows"]:
        assert r["genloss_s"] > 0 and np.isfinite(r["vs_eager"])


def test_demo_writes_its_figure(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    res = run("demo", "--steps", "5", "--methods", "gan-ns", "--out", str(tmp_path), "--no-progress")
    assert res.returncode == 0, res.stderr
    png = tmp_path / "genloss-demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gan-ns" in res.stdout
