r"""The GPU check of issue 16: everything a lent one-GPU machine can tell, in one run of <= 8 minutes.

``bash bench/gpu_check.sh`` (this driver) runs these stages in order, each under its own
timeout and all under one overall budget; a stage that fails or times out is recorded
and the next one still runs, so one run yields all it can:

1. ``info``: ``nvidia-smi``, ``nvcc --version``, Python/torch versions.
2. ``build``: ``CUDAARCHS=90 pip install --no-deps --no-build-isolation -Cbuild-dir=build/gpu-check .``
   (sm_90 only, every core; the lent machine has no network, hence ``--no-deps``).
3. ``build_info``: ``genloss.build_info()`` of the installed package.
4. ``tests``: ``pytest -m cuda`` over the test files that have CUDA cases (the ``cuda``
   marker or the ``cuda_device`` fixture: tests/conftest.py), JUnit counts recorded.
5. ``bench``: fwd+bwd of the 16M-element fused losses, genloss vs torch eager vs
   ``torch.compile`` vs a same-run ``copy_`` (CUDA events, medians, GB/s of the minimal
   traffic: every input read once, every gradient written once), the eager host
   overhead per call at a tiny size, and whether a CUDA graph captures the op.
6. ``memcheck`` / ``racecheck``: ``compute-sanitizer`` on ``--exercise`` (a few ops on
   small CUDA inputs), when the tool is on PATH.

The JSON goes to ``bench/results/gpu-<device>-check.json``. ``--dry-run`` (CPU only, for
CI): no build, no GPU; checks this script's paths and the shell wrapper's syntax,
collects the CUDA tests and builds the benchmark plan, and exits 0 when all of that works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
TESTS = ROOT / "tests"
BUDGET_S = 470  # the whole run, build included: 8 minutes less a margin
N_ELEMS = 1 << 24  # 16,777,216: the fused-loss size of the speed goals
SHAPE = (16, 4, 512, 512)
DEVICE = "cuda:0"  # the one lent GPU
TINY = (64, 16)  # host overhead: small enough that the GPU waits for the host

# (name, timeout cap in s, seconds kept back for it from the overall budget)
STAGES = [
    ("info", 30, 5),
    ("build", 240, 20),
    ("build_info", 30, 5),
    ("tests", 200, 60),
    ("bench", 200, 60),
    ("memcheck", 60, 20),
    ("racecheck", 60, 20),
]


# ----------------------------------------------------------------------------- the benchmark plan
@dataclass(frozen=True)
class Case:
    """One fused loss: its inputs (all SHAPE unless noted), which need a gradient, the calls."""

    name: str
    inputs: tuple[str, ...]  # "x" = a SHAPE float tensor, "p" = SHAPE in (0, 1), "t" = per-sample time
    grads: tuple[int, ...]  # indices of the inputs that require grad

    def traffic_bytes(self, itemsize: int) -> int:
        """Minimal fwd+bwd traffic: every SHAPE input read once, every gradient written once."""
        big = sum(1 for k in self.inputs if k in "xp")
        return (big + len(self.grads)) * N_ELEMS * itemsize


PLAN = [
    Case("l1_loss", ("x", "x"), (0,)),
    Case("gan_d_loss", ("x", "x"), (0, 1)),
    Case("diffusion_mse_loss", ("x", "x", "x", "t"), (0,)),
    Case("negative_elbo", ("x", "p", "x", "x"), (0, 2, 3)),
    Case("flow_matching_loss", ("x", "x", "x", "t"), (0,)),
]


def calls(torch: Any, gt: Any) -> dict[str, tuple[Any, Any]]:
    """name -> (genloss call, the same loss as torch eager ops), on the PLAN's inputs."""
    import genloss.reference as gr

    F = torch.nn.functional
    sched = gt.DiffusionSchedule(gr.DiffusionSchedule(gr.cosine_betas(1000)))

    def gan_d(real, fake):  # per-sample sums over the non-batch dims, batch mean (GAN.1)
        return F.softplus(-real).flatten(1).sum(1).mean() + F.softplus(fake).flatten(1).sum(1).mean()

    def mse_eps(pred, x0, noise, t):
        return ((pred - noise) ** 2).mean()

    def elbo(recon, x, mu, logvar):
        b = recon.shape[0]
        nll = F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / b
        return nll + 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar).sum() / b

    def flow(pred, x0, noise, t):
        return ((pred - (noise - x0)) ** 2).mean()

    return {
        "l1_loss": (gt.l1_loss, F.l1_loss),
        "gan_d_loss": (gt.gan_d_loss, gan_d),
        "diffusion_mse_loss": (lambda p, x0, n, t: gt.diffusion_mse_loss(p, x0, n, t, sched, "eps"), mse_eps),
        "negative_elbo": (gt.negative_elbo, elbo),
        "flow_matching_loss": (gt.flow_matching_loss, flow),
    }


def make_inputs(torch: Any, case: Case, device: Any, dtype: Any, shape: tuple[int, ...]) -> list[Any]:
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for i, kind in enumerate(case.inputs):
        if kind == "t":
            v = torch.randint(1, 1000, (shape[0],), device=device, generator=g)
            if case.name == "flow_matching_loss":
                v = torch.rand(shape[0], device=device, generator=g).to(dtype)  # the dtype of pred
        elif kind == "p":
            v = torch.rand(shape, device=device, generator=g).to(dtype)
        else:
            v = torch.randn(shape, device=device, generator=g).to(dtype)
        if i in case.grads:
            v.requires_grad_(True)
        out.append(v)
    return out


# ----------------------------------------------------------------------------- timing (CUDA events)
def time_events(torch: Any, fn: Any, reps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b) * 1e-3)
    return ms


def fwd_bwd(fn: Any, xs: list[Any]) -> Any:
    def run():
        for x in xs:
            x.grad = None
        fn(*xs).backward()

    return run


def host_overhead_s(torch: Any, run: Any, n: int = 200) -> float:
    """Wall time per call of n back-to-back calls on tiny inputs (the GPU waits for the host)."""
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def graph_capture(torch: Any, run: Any, reps: int = 0) -> tuple[str, float | None]:
    """('ok', median replay seconds over ``reps`` replays or None) when fwd+bwd captures in a
    CUDA graph and replays, else (the error, None). A replay's time is the GPU's alone: no
    Python, no launch gaps (what eager timing at 16M adds when the host is the bottleneck)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()  # warm up on a side stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        g.replay()
        torch.cuda.synchronize()
        return "ok", (statistics.median(time_events(torch, g.replay, reps)) if reps else None)
    except Exception as e:  # recorded, never fatal: capture is a goal, not a precondition
        torch.cuda.synchronize()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", None


def bench(reps: int, path: Path) -> None:
    """The benchmark (the bench stage's child process), written to ``path`` after every case
    so that a stage killed at its timeout still leaves what it measured."""
    import torch

    import genloss.native as gn
    import genloss.torch as gt

    dev = torch.device(DEVICE)
    fns = calls(torch, gt)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "reps": reps, "cases": []}
    src = torch.randn(N_ELEMS, device=dev)
    dst = torch.empty_like(src)
    copy_s = statistics.median(time_events(torch, lambda: dst.copy_(src), reps))
    out["copy_gbps"] = 2 * src.numel() * 4 / copy_s / 1e9
    path.write_text(json.dumps(out, indent=1))
    print(f"copy_ {N_ELEMS} float32: {out['copy_gbps']:.0f} GB/s", flush=True)
    for case in PLAN:
        for dtype in (torch.float32, torch.bfloat16):
            row: dict[str, Any] = {"name": case.name, "dtype": str(dtype).removeprefix("torch.")}
            try:
                op, eager = fns[case.name]
                xs = make_inputs(torch, case, dev, dtype, SHAPE)
                traffic = case.traffic_bytes(xs[0].element_size())
                row["traffic_bytes"] = traffic
                runs = {"genloss": fwd_bwd(op, xs), "eager": fwd_bwd(eager, xs)}
                try:  # float32 only: each compilation costs 10-30 s of the 8-minute budget
                    if dtype != torch.float32:
                        raise RuntimeError("not compiled for bfloat16 (time budget)")
                    comp = torch.compile(eager)
                    t0 = time.perf_counter()
                    fwd_bwd(comp, xs)()
                    row["compile_time_s"] = time.perf_counter() - t0  # first call: compilation
                    runs["compile"] = fwd_bwd(comp, xs)
                except Exception as e:
                    row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                with torch.no_grad():
                    v_op, v_ref = float(op(*xs)), float(eager(*xs))
                row["rel_diff_vs_eager"] = abs(v_op - v_ref) / max(abs(v_ref), 1e-30)
                for who, run in runs.items():
                    med = statistics.median(time_events(torch, run, reps))
                    row[f"{who}_s"] = med
                    row[f"{who}_gbps"] = traffic / med / 1e9
                row["genloss_vs_copy"] = row["genloss_gbps"] / out["copy_gbps"]
                if "compile_s" in row:
                    row["speedup_vs_compile"] = row["compile_s"] / row["genloss_s"]
                tiny = make_inputs(torch, case, dev, dtype, TINY)
                row["host_overhead_us"] = {
                    who: 1e6 * host_overhead_s(torch, fwd_bwd(f, tiny))
                    for who, f in (("genloss", op), ("eager", eager))
                }
                with gn.options(check_data=False):  # no value checks: no waits for the GPU
                    row["host_overhead_us"]["genloss_check_data_off"] = 1e6 * host_overhead_s(
                        torch, fwd_bwd(op, tiny)
                    )
                row["graph_capture"], _ = graph_capture(torch, fwd_bwd(op, tiny))
                for who, f in (("genloss", op), ("eager", eager)):  # GPU time alone, 16M elements
                    status, replay_s = graph_capture(torch, fwd_bwd(f, xs), reps)
                    if replay_s is not None:
                        row[f"{who}_graph_s"] = replay_s
                        row[f"{who}_graph_gbps"] = traffic / replay_s / 1e9
                    elif who == "genloss":
                        row["graph_error"] = status
                if "genloss_graph_gbps" in row:
                    row["genloss_graph_vs_copy"] = row["genloss_graph_gbps"] / out["copy_gbps"]
                del xs, tiny, runs
            except Exception as e:  # one case failing leaves the others measured
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(json.dumps(row), flush=True)
            out["cases"].append(row)
            path.write_text(json.dumps(out, indent=1))
            torch.cuda.empty_cache()
    out["profile"] = host_profile(torch, fns, dev)
    path.write_text(json.dumps(out, indent=1))
    out["mmd"] = mmd_rows(torch, gt, dev)
    path.write_text(json.dumps(out, indent=1))
    out["families"] = family_rows(torch, gt, dev, lambda: path.write_text(json.dumps(out, indent=1)))
    path.write_text(json.dumps(out, indent=1))


def host_profile(torch: Any, fns: dict, dev: Any, n: int = 300) -> dict:
    """Where the host time of a tiny fwd+bwd goes (cProfile, n calls): per case the top
    functions by own time, in microseconds per call."""
    import cProfile
    import pstats

    out = {}
    for case in PLAN[:3]:
        run = fwd_bwd(fns[case.name][0], make_inputs(torch, case, dev, torch.float32, TINY))
        for _ in range(20):
            run()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            run()
        torch.cuda.synchronize()
        prof.disable()
        st = pstats.Stats(prof)
        stats: dict = st.stats  # type: ignore[attr-defined]  # (file, line, fn) -> (cc, nc, tt, ct, callers)
        rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
        out[case.name] = [
            {
                "fn": f"{Path(k[0]).name}:{k[1]}:{k[2]}",
                "calls": v[1] / n,
                "own_us": 1e6 * v[2] / n,
                "cum_us": 1e6 * v[3] / n,
            }
            for k, v in rows
        ]
    return out


def mmd_rows(torch: Any, gt: Any, dev: Any) -> list[dict]:
    """MMD^2 (rbf, one bandwidth, biased) at D = 64, N = M = 16,384 then 65,536 (the speed goal's
    size), against the same estimate from torch.cdist in 8,192-row blocks (float64 block sums).
    Forward only (genloss_s, cdist_s); genloss_fwd_bwd_s adds the value with both gradients
    (the op's one pass, then backward) and genloss_fwd_bwd_x_s with d/dx only (a generator's
    step), which have no cdist counterpart here (autograd through the blocks would keep every
    block's distance matrix). The larger size is skipped when the
    smaller already took > 1.5 s."""
    rows = []
    bw = 8.0  # ~ the median distance of two N(0, I_64) points (sqrt(128) = 11.3)
    for n in (16384, 65536):
        g = torch.Generator(device=dev).manual_seed(n)
        x = torch.randn(n, 64, device=dev, generator=g)
        y = torch.randn(n, 64, device=dev, generator=g) + 0.1

        def ours(x=x, y=y):
            return gt.mmd2(x, y, "rbf", [bw], "biased")

        def cdist_blocks(x=x, y=y, n=n):
            total = torch.zeros((), device=dev, dtype=torch.float64)
            for a, b, w in ((x, x, 1.0), (y, y, 1.0), (x, y, -2.0)):
                for i in range(0, n, 8192):
                    d2 = torch.cdist(a[i : i + 8192], b).square_().mul_(-0.5 / bw**2)
                    total += w * d2.exp_().sum(dtype=torch.float64)
            return total / (n * n)

        row: dict[str, Any] = {"n": n, "d": 64}
        try:
            row["genloss_s"] = statistics.median(time_events(torch, ours, 3, warmup=1))
            row["cdist_s"] = statistics.median(time_events(torch, cdist_blocks, 3, warmup=1))
            row["speedup_vs_cdist"] = row["cdist_s"] / row["genloss_s"]
            xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)

            def ours_fwd_bwd(xg=xg, yg=yg):
                xg.grad = yg.grad = None
                gt.mmd2(xg, yg, "rbf", [bw], "biased").backward()

            row["genloss_fwd_bwd_s"] = statistics.median(time_events(torch, ours_fwd_bwd, 3, warmup=1))

            def ours_fwd_bwd_x(xg=xg, y=y):  # a generator's step: the gradient of the samples only
                xg.grad = None
                gt.mmd2(xg, y, "rbf", [bw], "biased").backward()

            row["genloss_fwd_bwd_x_s"] = statistics.median(time_events(torch, ours_fwd_bwd_x, 3, warmup=1))
            a, b = float(ours()), float(cdist_blocks())
            row["rel_diff_vs_cdist"] = abs(a - b) / max(abs(b), 1e-30)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        if "error" in row or row["genloss_s"] > 1.5:
            break
    return rows


def family_rows(torch: Any, gt: Any, dev: Any, save: Any) -> list[dict]:
    """The quant and metrics kernels at the sizes of their issues' speed goals (issues 18, 19; those
    goals are stated for the CPU, these are the GPU's times for the record): vector_quantize fwd+bwd
    against the torch eager composite (cdist + argmin + losses), lfq_entropy_loss fwd+bwd, prdc,
    the exact ot_coupling and sinkhorn_divergence. CUDA events, median of 3 after one warm-up."""
    rows: list[dict] = []
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, device=dev, generator=g, dtype=dtype).requires_grad_(grad)

    def vq_case():
        z, book = randn(65536, 32, grad=True), randn(16384, 32, grad=True)

        def ours():
            z.grad = book.grad = None
            zq, _, commit, cb = gt.vector_quantize(z, book)
            (zq.square().mean() + commit + cb).backward()

        def eager():
            z.grad = book.grad = None
            idx = torch.cdist(z, book).argmin(1)
            e = book[idx]
            commit = 0.25 * (z - e.detach()).square().mean()
            cb = (z.detach() - e).square().mean()
            zq = z + (e - z).detach()
            (zq.square().mean() + commit + cb).backward()

        return {"shape": "N=65536 K=16384 D=32 float32 fwd+bwd", "genloss": ours, "torch_eager": eager}

    def lfq_case():
        z = randn(65536, 16, grad=True)

        def ours():
            z.grad = None
            gt.lfq_entropy_loss(z).backward()

        return {"shape": "N=65536 d=16 float32 fwd+bwd", "genloss": ours}

    def prdc_case():
        real, fake = randn(50000, 64), randn(50000, 64)
        return {"shape": "N=M=50000 D=64 k=5 float32", "genloss": lambda: gt.prdc(real, fake, 5)}

    def ot_case():
        x0, x1 = randn(1024, 3), randn(1024, 3)
        return {"shape": "B=1024 D=3 exact", "genloss": lambda: gt.ot_coupling(x0, x1)}

    def sinkhorn_case():
        x, y = randn(10000, 3, dtype=torch.float64, grad=True), randn(10000, 3, dtype=torch.float64)

        def ours():
            x.grad = None
            gt.sinkhorn_divergence(x, y, 0.05).backward()

        return {"shape": "N=M=10000 D=3 eps=0.05 float64 fwd+bwd", "genloss": ours}

    for name, make in (("vector_quantize", vq_case), ("lfq_entropy_loss", lfq_case), ("prdc", prdc_case),
                       ("ot_coupling", ot_case), ("sinkhorn_divergence", sinkhorn_case)):  # fmt: skip
        row: dict[str, Any] = {"op": name}
        try:
            fns = make()
            row["shape"] = fns.pop("shape")
            for who, fn in fns.items():
                row[f"{who}_s"] = statistics.median(time_events(torch, fn, 3, warmup=1))
            if "torch_eager_s" in row:
                row["speedup_vs_eager"] = row["torch_eager_s"] / row["genloss_s"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        save()
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- the sanitizer workload
def exercise() -> None:
    """A few ops, forward and backward, on small CUDA inputs (the compute-sanitizer workload):
    several chunks, a per-row op, an LSE op, a GMM, MMD, an empty input, bfloat16."""
    import torch

    import genloss.torch as gt

    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(1)
    fns = calls(torch, gt)
    for case in PLAN:
        xs = make_inputs(torch, case, dev, torch.float32, (3, 5000))  # 3 rows, 2 chunks each
        fwd_bwd(fns[case.name][0], xs)()
    bf = [torch.randn(4, 1000, device=dev, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(2)]
    gt.l1_loss(*bf).backward()
    empty = torch.empty(0, 7, device=dev, requires_grad=True)  # an elementwise op takes an empty batch
    gt.density_ratio_from_logits(empty).sum().backward()
    x = torch.randn(300, 3, device=dev, generator=g, requires_grad=True)
    y = torch.randn(200, 3, device=dev, generator=g, requires_grad=True)
    gt.mmd2(x, y).backward()
    c = torch.randn(50, 6, device=dev, generator=g, requires_grad=True)  # row_lse: (K+1)-class critic
    gt.ssgan_g_loss(c).backward()
    pts = torch.randn(700, 3, device=dev, generator=g, requires_grad=True)  # GMM, two chunks of points
    params = [torch.randn(*s, device=dev, generator=g, requires_grad=True) for s in ((4,), (4, 3), (4, 3))]
    gt.gmm_log_likelihood(pts, *params).backward()
    r = torch.randn(33, 5, device=dev, generator=g, requires_grad=True)  # means kept on the device
    gt.relativistic_d_loss(r, torch.randn(21, 5, device=dev, generator=g)).backward()
    # the quant and metrics kernels: nearest code + segment sums, EMA, LFQ tables, k-NN, OT
    z = torch.randn(300, 8, device=dev, generator=g, requires_grad=True)
    book = torch.randn(70, 8, device=dev, generator=g, requires_grad=True)
    zq, idx, commit, cb = gt.vector_quantize(z, book)
    (zq.sum() + commit + cb).backward()
    gt.vq_ema_update(z.detach(), idx, torch.ones(70, device=dev), book.detach().clone())
    gt.lfq_entropy_loss(torch.randn(100, 9, device=dev, generator=g, requires_grad=True)).backward()
    gt.prdc(torch.randn(150, 4, device=dev, generator=g), torch.randn(130, 4, device=dev, generator=g), 3)
    gt.ot_coupling(torch.randn(40, 3, device=dev, generator=g), torch.randn(40, 3, device=dev, generator=g))
    sx = torch.randn(60, 2, device=dev, generator=g, dtype=torch.float64, requires_grad=True)
    gt.sinkhorn_divergence(
        sx, torch.randn(50, 2, device=dev, generator=g, dtype=torch.float64), 0.5
    ).backward()
    torch.cuda.synchronize()
    print("exercise: ok")


# ----------------------------------------------------------------------------- stages
def cuda_test_files() -> list[str]:
    """The test files with `cuda`-marked cases (tests/conftest.py; `-m cuda` selects them),
    CUDA graph capture last: a capture that fails part-way must not disturb the others."""
    pat = re.compile(r"pytest\.mark\.cuda")
    files = [p for p in TESTS.glob("test_*.py") if pat.search(p.read_text(encoding="utf-8"))]
    return [str(p.relative_to(ROOT)) for p in sorted(files, key=lambda p: ("graph" in p.name, p.name))]


def has_module(py: str, name: str) -> bool:
    return subprocess.run([py, "-c", f"import {name}"], capture_output=True).returncode == 0


def run_stage(
    cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT, log: Path | None = None
) -> dict:
    """Run cmd, output captured; on timeout kill its whole process group (pip's cmake and
    ninja, pytest's workers), so a stage past its time frees the machine for the next."""
    print(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    rc: int | str
    try:
        p = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    except OSError as e:
        return {"cmd": cmd, "rc": "not run", "seconds": 0.0, "tail": str(e)}
    try:
        raw, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raw, _ = p.communicate()
        rc = "timeout"
    text = raw.decode(errors="replace")
    if log is not None:  # the whole output (the tail below is what the report keeps)
        log.write_text(text)
    print(text[-4000:], flush=True)
    return {"cmd": cmd, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": text[-3000:]}


def junit_counts(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def device_slug() -> str:
    try:
        name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        name = "unknown"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def full_run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="genloss-gpu-check-"))
    # the JUnit XML, the whole test log and the benchmark JSON go beside the report
    keep = Path(args.json).resolve().parent if args.json else tmp
    keep.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
    reserve = {name: keep for name, _, keep in STAGES}

    def timeout_for(name: str, cap: float) -> float:
        later = [n for n, _, _ in STAGES][[n for n, _, _ in STAGES].index(name) + 1 :]
        left = BUDGET_S - (time.perf_counter() - start) - sum(reserve[n] for n in later)
        return max(5.0, min(cap, left))

    caps = {name: cap for name, cap, _ in STAGES}
    skip = set(args.skip)
    for name, _, _ in STAGES:
        if name in skip:
            report["stages"][name] = {"rc": "skipped"}
            continue
        print(f"\n== {name}", flush=True)
        t = timeout_for(name, caps[name])
        env = dict(os.environ)
        if name == "info":
            parts = [run_stage(["nvidia-smi"], t / 2), run_stage(["nvcc", "--version"], t / 2)]
            st = {"rc": parts[0]["rc"], "nvidia_smi": parts[0]["tail"], "nvcc": parts[1]["tail"]}
            st["python"] = platform.python_version()
            st["torch"] = run_stage(
                [py, "-c", "import torch; print(torch.__version__, torch.version.cuda)"], 20
            )["tail"].strip()
        elif name == "build":
            env.update(CUDAARCHS="90", CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
            # no network there: no version check; a system Python (PEP 668) still takes the install
            env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_BREAK_SYSTEM_PACKAGES="1")
            pip = [py, "-m", "pip", "install", "--no-deps", "--no-index"]
            st = {}
            if args.wheel:  # built elsewhere for this Python and sm_90: seconds instead of minutes
                st = run_stage([*pip, "--force-reinstall", args.wheel], t, env)
                probe = [py, "-c", "import genloss; assert genloss.build_info()['cuda']"]
                if st["rc"] == 0 and run_stage(probe, 30, cwd=tmp)["rc"] == 0:
                    st["from"] = args.wheel
                else:  # a wheel that does not load here (system libraries): build after all
                    st = {"wheel_failed": st}
            if "from" not in st:
                cmd = [*pip, "--no-build-isolation", "-Cbuild-dir=build/gpu-check"]
                st.update(
                    run_stage(
                        [*cmd, "-Ccmake.define.GENLOSS_CUDA=ON", "."], timeout_for(name, caps[name]), env
                    )
                )
        elif name == "build_info":
            st = run_stage(
                [py, "-c", "import genloss, json; print(json.dumps(genloss.build_info()))"], t, cwd=tmp
            )
            try:
                st["build_info"] = json.loads(st["tail"].strip().splitlines()[-1])
            except (ValueError, IndexError):
                pass
        elif name == "tests":
            xml = keep / "cuda-tests.xml"
            cmd = [py, "-m", "pytest", *cuda_test_files(), "-m", "cuda", "-q", "-p", "no:cacheprovider"]
            # -p no:benchmark: pytest-benchmark (on the lent machine) warns under xdist, and the
            # suite turns warnings into errors
            cmd += ["-rfE", f"--junitxml={xml}", "-p", "no:benchmark"]
            if has_module(py, "xdist"):  # one GPU, several processes: the cases are small
                cmd += ["-n", str(min(8, os.cpu_count() or 1))]
            if has_module(py, "pytest_timeout"):  # a hung case must not eat the stage
                cmd += ["--timeout", "90"]
            st = run_stage(cmd, t, log=keep / "cuda-tests.log")
            st["counts"] = junit_counts(xml)
        elif name == "bench":
            out = keep / "bench.json"
            st = run_stage([py, str(Path(__file__)), "--bench-only", str(out), "--reps", str(args.reps)], t)
            if out.exists():
                st["result"] = json.loads(out.read_text())
        else:  # memcheck / racecheck
            tool = shutil.which("compute-sanitizer")
            if tool is None:
                st = {"rc": "not run", "tail": "compute-sanitizer not on PATH"}
            else:
                cmd = [tool, "--tool", name, "--error-exitcode", "1", "--print-limit", "20"]
                st = run_stage([*cmd, py, str(Path(__file__)), "--exercise"], t)
        report["stages"][name] = st
        print(f"== {name}: rc {st.get('rc')} ({st.get('seconds', 0)} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    RESULTS.mkdir(exist_ok=True)
    path = Path(args.json) if args.json else RESULTS / f"gpu-{device_slug()}-check.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {path} ({report['seconds']} s)")
    for name, st in report["stages"].items():
        print(f"  {name:11s} rc {st.get('rc')}  {st.get('counts', '')}")
    return 0 if all(st.get("rc") in (0, "skipped") for st in report["stages"].values()) else 1


def dry_run() -> int:
    """CPU only, no build: what can rot without a GPU is checked here (CI runs this)."""
    problems = []
    if not RESULTS.is_dir() or not os.access(RESULTS, os.W_OK):
        problems.append(f"{RESULTS} is not a writable folder")
    sh = BENCH / "gpu_check.sh"
    if subprocess.run(["bash", "-n", str(sh)]).returncode != 0:
        problems.append(f"{sh}: bash syntax error")
    files = cuda_test_files()
    print(f"CUDA test files: {' '.join(files)}")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "cuda",
        *files,
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if "::" in ln]
    print(
        f"collected {len(lines)} CUDA test cases ({p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ''})"
    )
    if p.returncode not in (0, 5) or not lines:  # 5: none collected, itself a problem here
        problems.append("pytest --collect-only -m cuda failed:\n" + (p.stdout + p.stderr)[-3000:])
    try:
        import torch

        import genloss.torch as gt

        fns = calls(torch, gt)
        missing = [c.name for c in PLAN if c.name not in fns or not callable(fns[c.name][0])]
        if missing:
            problems.append(f"benchmark plan: no genloss.torch op for {missing}")
        for case in PLAN:  # genloss and the eager loss agree (value, gradients) on the CPU, float64
            xs = make_inputs(torch, case, torch.device("cpu"), torch.float64, TINY)
            diff = [xs[i] for i in case.grads]
            op, eager = fns[case.name]
            for what, a, b in zip(
                ("value", *(f"grad {i}" for i in case.grads)),
                (op(*xs), *torch.autograd.grad(op(*xs), diff)),
                (eager(*xs), *torch.autograd.grad(eager(*xs), diff)),
                strict=True,
            ):
                if not torch.allclose(a, b, rtol=1e-9, atol=1e-12):
                    problems.append(f"benchmark plan: {case.name} {what}: genloss and eager differ")
        print(f"benchmark plan: {[c.name for c in PLAN]} x (float32, bfloat16), {N_ELEMS} elements")
    except Exception as e:
        problems.append(f"benchmark plan: {type(e).__name__}: {e}")
    for msg in problems:
        print(f"gpu_check --dry-run: {msg}", file=sys.stderr)
    print("gpu_check --dry-run:", "ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU only: collect, plan, check paths; no build, no GPU"
    )
    ap.add_argument("--json", help="output path (default bench/results/gpu-<device>-check.json)")
    ap.add_argument(
        "--wheel", help="install this prebuilt wheel (cp312, sm_90) instead of building; builds if it fails"
    )
    ap.add_argument("--reps", type=int, default=20, help="timed repeats per benchmark (median)")
    ap.add_argument("--skip", nargs="*", default=[], choices=[s[0] for s in STAGES], help="stages to skip")
    ap.add_argument("--bench-only", metavar="OUT", help=argparse.SUPPRESS)  # the bench stage's child
    ap.add_argument("--exercise", action="store_true", help=argparse.SUPPRESS)  # the sanitizers' workload
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run()
    if args.exercise:
        exercise()
        return 0
    if args.bench_only:
        bench(args.reps, Path(args.bench_only))
        return 0
    return full_run(args)


if __name__ == "__main__":
    sys.exit(main())
