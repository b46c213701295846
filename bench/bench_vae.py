#!/usr/bin/env python
r"""Side-by-side benchmark of the VAE family: genloss vs torch eager vs torch.compile vs NumPy.

One command, one process (plus one short-lived subprocess per peak-memory measurement)::

    python bench/bench_vae.py [--quick] [--json OUT] [--no-recycled] [--no-memory]

Shares its timing method, allocator switch, bandwidth probe and machine information
with ``bench_gan.py`` (both import ``harness.py``): per-call ``time.perf_counter``, medians,
competitors round-robin in a rotating order, fresh outputs for everyone, the garbage
collector off while timing, the ``copy``/``triad`` probe in the same process and
``copy`` interleaved as one more runner inside every 16M-element case.

Cases

* ``negative_elbo`` (Bernoulli likelihood, beta=1, ``reduction='mean'``) on
  ``(B=256, D=784)`` data with ``d=64`` latents, and on a 16M-element decoder output
  ``(B=64, D=262144)``, ``d=64``. Competitors: ``op`` (``genloss.torch``), ``native``
  (``genloss.native`` on the same tensors), ``eager`` (the per-sample-sum composite
  ``F.binary_cross_entropy_with_logits(recon, x, reduction='sum') / B
  + beta * 0.5 * (mu**2 + exp(lv) - 1 - lv).sum() / B``), ``compile``
  (``torch.compile``, default inductor, of that composite) and ``numpy`` (the float64
  reference ``negative_elbo`` + ``negative_elbo_backward``). ``x`` is data: it never
  requires grad. Bytes (the minimum any implementation moves): fwd reads recon, x, mu,
  logvar once; fwd+bwd also writes the gradients of recon, mu and logvar once.
* ``gmm_log_likelihood`` at K=64, D=16, N=1e5 and N=1e6. Competitors: ``op``,
  ``native``, ``eager`` (the plain composite: ``log_softmax(logits)`` plus the
  ``(N, K, D)`` broadcast diagonal-Gaussian log-density summed over D, ``logsumexp``
  over K, mean), ``dist`` (``MixtureSameFamily(Categorical(logits),
  Independent(Normal(means, exp(lv/2)), 1)).log_prob(x).mean()``), ``compile``
  (``torch.compile`` of the plain composite) and ``numpy`` (float64 reference,
  timed once). ``eager`` and ``dist`` materialise several ``(N, K, D)`` float32
  tensors (4 GiB each at N=1e6; their measured peak at N=1e5 is ~2.2 GB, so ~22 GB at
  N=1e6): they run at N=1e5 only. Nothing is chunked. Throughput in G (n, k, d)
  evaluations per second, N*K*D / time, and a nominal GFLOP/s at 4 flop per (n, k, d)
  forward and 12 forward+backward.

Peak memory (``gmm_log_likelihood``, fwd+bwd): one fresh subprocess per competitor and
size. It builds the inputs, makes one warm-up call (which compiles, for ``compile``),
drops its outputs, ``gc.collect()`` + ``genloss.native.empty_cache()`` (the output
cache would otherwise keep the warm-up's gradient blocks resident and hide them from the
call's peak) + ``malloc_trim(0)``, reads ``VmRSS`` from
``/proc/self/status``, resets the high-water mark (``echo 5 > /proc/self/clear_refs``),
makes one timed fwd+bwd call and reads ``VmHWM``: peak = VmHWM - VmRSS before the call,
i.e. every byte the call had resident at its peak beyond the inputs (outputs and
gradients included). The peak of the whole subprocess (import and compile
included: VmHWM before the reset, or after the call if higher) is recorded next to it.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bh  # noqa: E402  (first: shared timing, probe, allocator switch, machine info)

# isort: split
import genloss.native as gn  # noqa: E402
import genloss.reference as gr  # noqa: E402
import genloss.torch as gt  # noqa: E402

COMPETITORS = ("op", "native", "eager", "dist", "compile", "numpy")
MODES = bh.MODES
BETA = 1.0
LATENT = 64
GMM_K, GMM_D = 64, 16
FLOP_PER_NKD = {"fwd": 4, "fwd+bwd": 12}  # nominal, see the module docstring
EAGER_MAX_N = 100_000  # eager / dist materialise (N, K, D): ~2.2 GB peak at N=1e5


# ----------------------------------------------------------------------------- composites
def elbo_composite(recon, x, mu, logvar):
    """negative_elbo (Bernoulli, beta=1, mean over the batch of per-sample sums) in torch ops."""
    b = recon.shape[0]
    nll = F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / b
    return nll + BETA * 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar).sum() / b


def gmm_composite(x, logits, means, logvars):
    """gmm_log_likelihood (mean) as the plain broadcast composite: an (N, K, D) intermediate."""
    log_pi = torch.log_softmax(logits, 0)
    diff = x[:, None, :] - means[None, :, :]
    log_normal = -0.5 * (math.log(2 * math.pi) + logvars[None] + diff**2 * torch.exp(-logvars)[None]).sum(-1)
    return torch.logsumexp(log_pi[None, :] + log_normal, 1).mean()


def gmm_dist(x, logits, means, logvars):
    """The same log-likelihood through torch.distributions (default argument validation)."""
    comp = Independent(Normal(means, torch.exp(0.5 * logvars)), 1)
    return MixtureSameFamily(Categorical(logits=logits), comp).log_prob(x).mean()


# ----------------------------------------------------------------------------- cases
@dataclass
class ElboCase:
    size: str
    batch: int
    dim: int
    reps: int
    warmup: int
    block: int
    dram: bool  # DRAM-bound: interleave the copy probe, run the recycled pass

    @property
    def label(self) -> str:
        return f"negative_elbo [{self.size}]"


@dataclass
class GmmCase:
    size: str
    n: int
    reps: int
    warmup: int
    competitors: tuple[str, ...]
    max_reps: dict[str, int]  # per-competitor caps (slow ones)

    @property
    def label(self) -> str:
        return f"gmm_log_likelihood [{self.size}]"


def elbo_cases(quick: bool) -> list[ElboCase]:
    if quick:
        return [
            ElboCase("B=256,D=784", 256, 784, 60, 10, 12, False),
            ElboCase("16M", 64, 262144, 5, 1, 1, True),
        ]
    return [
        ElboCase("B=256,D=784", 256, 784, 300, 30, 60, False),
        ElboCase("16M", 64, 262144, 21, 2, 1, True),
    ]


def gmm_cases(quick: bool) -> list[GmmCase]:
    if quick:
        # no warm-up calls: the correctness check before timing has run every competitor once
        return [GmmCase("N=1e5", 100_000, 2, 0, ("op", "native", "eager", "compile"), {})]
    return [
        GmmCase("N=1e5", 100_000, 5, 1, ("op", "native", "eager", "dist", "compile", "numpy"), {"numpy": 1}),
        GmmCase("N=1e6", 1_000_000, 5, 1, ("op", "native", "compile"), {"compile": 3}),
    ]


def elbo_inputs(case: ElboCase, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(case.label.encode()))
    recon = torch.randn(case.batch, case.dim, generator=g)  # decoder logits
    x = torch.rand(case.batch, case.dim, generator=g)  # data in [0, 1]
    mu = torch.randn(case.batch, LATENT, generator=g)
    logvar = 0.5 * torch.randn(case.batch, LATENT, generator=g)
    out = [t.to(device) for t in (recon, x, mu, logvar)]
    for i in (0, 2, 3):
        out[i].requires_grad_(True)
    return out


def gmm_inputs(n: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(12345)
    means = 2.0 * torch.randn(GMM_K, GMM_D, generator=g)
    logvars = 0.3 * torch.randn(GMM_K, GMM_D, generator=g)
    logits = torch.randn(GMM_K, generator=g)
    comp = torch.randint(0, GMM_K, (n,), generator=g)
    x = means[comp] + torch.exp(0.5 * logvars[comp]) * torch.randn(n, GMM_D, generator=g)
    return [t.to(device).requires_grad_(True) for t in (x, logits, means, logvars)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def no_grad(f: Callable, args: Sequence) -> Callable[[], Any]:
    def g() -> Any:
        with torch.no_grad():
            return f(*args)

    return g


def compile_both_modes(comp: Callable, xs: list, clear: Callable[[], None], clock: bh.Clock) -> dict:
    """Compile (and warm) the fwd+bwd graph and the no_grad graph before any timing."""
    out = {}
    for mode in MODES:
        t0 = time.perf_counter()
        if mode == "fwd+bwd":
            comp(*xs).backward()
        else:
            no_grad(comp, xs)()
        clock.sync()
        out[mode] = time.perf_counter() - t0
        clear()
    return out


def finish_rows(rows_times: dict[str, list[float]], runners: list[bh.Runner]) -> dict[str, dict]:
    comps = {name: bh.summary(ts) for name, ts in rows_times.items() if ts}
    t_op = comps["op"]["median_s"]
    for s in comps.values():
        s["ratio_vs_op"] = s["median_s"] / t_op
    for r in runners:
        if r.note and r.name in comps:
            comps[r.name]["note"] = r.note
    return comps


# ----------------------------------------------------------------------------- negative_elbo
def bench_elbo(
    case: ElboCase, device: torch.device, clock: bh.Clock, alloc: str, with_ref: bool, probe: tuple | None
) -> list[dict]:
    torch._dynamo.reset()
    recon, x, mu, lv = xs = elbo_inputs(case, device)
    diff = [recon, mu, lv]
    xd = [t.detach() for t in xs]
    xn = [t.detach().cpu().numpy() for t in xs]
    comp = torch.compile(elbo_composite)

    def clear() -> None:
        for t in diff:
            t.grad = None

    # correctness: the op against the eager composite (value, every gradient) and the float64 oracle
    v_op = gt.negative_elbo(*xs, beta=BETA)
    g_op = torch.autograd.grad(v_op, diff)
    v_e = elbo_composite(*xs)
    g_e = torch.autograd.grad(v_e, diff)
    checks = {
        "value_rel_vs_eager": abs(v_op.item() - v_e.item()) / max(abs(v_e.item()), 1e-30),
        "grad_rel_vs_eager": max(rel_err(a, b) for a, b in zip(g_op, g_e, strict=True)),
    }
    if not case.dram:
        v_ref = float(gr.negative_elbo(*xn, beta=BETA))
        checks["value_rel_vs_reference"] = abs(v_op.item() - v_ref) / max(abs(v_ref), 1e-30)
    if max(checks["value_rel_vs_eager"], checks["grad_rel_vs_eager"]) > 1e-3:
        print(f"  WARNING {case.label}: genloss and the eager composite differ: {checks}")
    del v_op, g_op, v_e, g_e

    compile_s = compile_both_modes(comp, xs, clear, clock)

    def ref_fb() -> Any:
        return gr.negative_elbo(*xn, beta=BETA), gr.negative_elbo_backward(*xn, 1.0, beta=BETA)

    ref_note, ref_max = "", None
    if with_ref:
        t = clock.time(ref_fb)
        if t > bh.REF_SLOW_S:
            ref_max, ref_note = 1, f"timed once (a fwd+bwd call took {t:.1f} s > {bh.REF_SLOW_S:.0f} s)"
        elif case.dram:
            ref_max, ref_note = 3, "3 repeats (slow)"

    b, d = case.batch, case.dim
    bytes_fwd = 4 * (2 * b * d + 2 * b * LATENT)  # recon, x, mu, logvar read once
    bytes_fb = bytes_fwd + 4 * (b * d + 2 * b * LATENT)  # + grads of recon, mu, logvar written once
    if probe is not None:
        dst, src = probe
        copy_runner = bh.Runner("copy", lambda: dst.copy_(src))
    rows = []
    for mode in MODES:
        if mode == "fwd+bwd":
            runners = [
                bh.Runner("op", lambda: gt.negative_elbo(*xs, beta=BETA).backward(), clear),
                bh.Runner("native", lambda: gn.negative_elbo(*xd, beta=BETA, need_grad=True)),
                bh.Runner("eager", lambda: elbo_composite(*xs).backward(), clear),
                bh.Runner("compile", lambda: comp(*xs).backward(), clear),
            ]
            ref_call, nbytes = ref_fb, bytes_fb
        else:
            runners = [
                bh.Runner("op", no_grad(lambda *a: gt.negative_elbo(*a, beta=BETA), xs)),
                bh.Runner("native", lambda: gn.negative_elbo(*xd, beta=BETA, need_grad=False)),
                bh.Runner("eager", no_grad(elbo_composite, xs)),
                bh.Runner("compile", no_grad(comp, xs)),
            ]
            ref_call, nbytes = (lambda: gr.negative_elbo(*xn, beta=BETA)), bytes_fwd
        if with_ref:
            runners.append(bh.Runner("numpy", ref_call, max_reps=ref_max, note=ref_note))
        if probe is not None:  # the copy probe as one more runner: same rounds, same noise
            runners.append(copy_runner)
        times = bh.run_round_robin(clock, runners, case.reps, case.warmup, case.block)
        copy_ts = times.pop("copy", None)
        comps = finish_rows(times, runners)
        row = {
            "case": "negative_elbo", "size": case.size, "family": "elbo", "mode": mode, "alloc": alloc,
            "shapes": {"recon": [b, d], "x": [b, d], "mu": [b, LATENT], "logvar": [b, LATENT]},
            "bytes": nbytes, "competitors": comps, "compile_s": compile_s[mode], "check": checks,
            "op_GBps": nbytes / comps["op"]["median_s"] / 1e9,
            "native_GBps": nbytes / comps["native"]["median_s"] / 1e9,
            "compile_GBps": nbytes / comps["compile"]["median_s"] / 1e9,
        }  # fmt: skip
        if copy_ts is not None:
            row["local_copy_GBps"] = 2 * probe[0].numel() * 4 / statistics.median(copy_ts) / 1e9  # type: ignore[index]
        row["load1"] = os.getloadavg()[0]
        rows.append(row)
        print_row(row)
    torch._dynamo.reset()
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- gmm_log_likelihood
def bench_gmm(case: GmmCase, device: torch.device, clock: bh.Clock) -> list[dict]:
    torch._dynamo.reset()
    xs = gmm_inputs(case.n, device)
    xd = [t.detach() for t in xs]
    want = set(case.competitors)
    comp = torch.compile(gmm_composite)

    def clear() -> None:
        for t in xs:
            t.grad = None

    # correctness against the eager composite where it runs, else against compile
    v_op = gt.gmm_log_likelihood(*xs)
    g_op = torch.autograd.grad(v_op, xs)
    checks: dict[str, float] = {}
    against = {"eager": gmm_composite, "dist": gmm_dist}
    for name in ("eager", "dist"):
        if name in want:
            v = against[name](*xs)
            gs = torch.autograd.grad(v, xs)
            checks[f"value_rel_vs_{name}"] = abs(v_op.item() - v.item()) / max(abs(v.item()), 1e-30)
            checks[f"grad_rel_vs_{name}"] = max(rel_err(a, b) for a, b in zip(g_op, gs, strict=True))
            del v, gs
    compile_s = compile_both_modes(comp, xs, clear, clock)
    v = comp(*xs)
    gs = torch.autograd.grad(v, xs)
    checks["value_rel_vs_compile"] = abs(v_op.item() - v.item()) / max(abs(v.item()), 1e-30)
    checks["grad_rel_vs_compile"] = max(rel_err(a, b) for a, b in zip(g_op, gs, strict=True))
    del v, gs, v_op, g_op
    clear()
    if any(v > 1e-3 for v in checks.values()):
        print(f"  WARNING {case.label}: genloss and a composite differ: {checks}")

    xn = [t.detach().cpu().numpy() for t in xs] if "numpy" in want else []
    nkd = case.n * GMM_K * GMM_D
    rows = []
    for mode in MODES:
        cap = case.max_reps
        if mode == "fwd+bwd":
            all_runners = {
                "op": bh.Runner("op", lambda: gt.gmm_log_likelihood(*xs).backward(), clear),
                "native": bh.Runner("native", lambda: gn.gmm_log_likelihood(*xd, need_grad=True)),
                "eager": bh.Runner("eager", lambda: gmm_composite(*xs).backward(), clear),
                "dist": bh.Runner("dist", lambda: gmm_dist(*xs).backward(), clear),
                "compile": bh.Runner("compile", lambda: comp(*xs).backward(), clear, cap.get("compile")),
                "numpy": bh.Runner(
                    "numpy",
                    lambda: (gr.gmm_log_likelihood(*xn), gr.gmm_log_likelihood_backward(*xn, 1.0)),
                    max_reps=cap.get("numpy"),
                ),
            }
        else:
            all_runners = {
                "op": bh.Runner("op", no_grad(gt.gmm_log_likelihood, xs)),
                "native": bh.Runner("native", lambda: gn.gmm_log_likelihood(*xd, need_grad=False)),
                "eager": bh.Runner("eager", no_grad(gmm_composite, xs)),
                "dist": bh.Runner("dist", no_grad(gmm_dist, xs)),
                "compile": bh.Runner("compile", no_grad(comp, xs), max_reps=cap.get("compile")),
                "numpy": bh.Runner("numpy", lambda: gr.gmm_log_likelihood(*xn), max_reps=cap.get("numpy")),
            }
        runners = [all_runners[c] for c in COMPETITORS if c in want]
        for r in runners:
            if r.max_reps is not None:
                r.note = f"{r.max_reps} repeat(s) (slow)"
        times = bh.run_round_robin(clock, runners, case.reps, case.warmup)
        comps = finish_rows(times, runners)
        row = {
            "case": "gmm_log_likelihood", "size": case.size, "family": "gmm", "mode": mode, "alloc": "fresh",
            "shapes": {"x": [case.n, GMM_D], "logits": [GMM_K], "means": [GMM_K, GMM_D],
                       "logvars": [GMM_K, GMM_D]},
            "nkd": nkd, "competitors": comps, "compile_s": compile_s[mode], "check": checks,
        }  # fmt: skip
        for s in comps.values():
            s["G_nkd_per_s"] = nkd / s["median_s"] / 1e9
            s["GFLOPs_nominal"] = FLOP_PER_NKD[mode] * nkd / s["median_s"] / 1e9
        row["load1"] = os.getloadavg()[0]
        rows.append(row)
        print_row(row)
    torch._dynamo.reset()
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- peak memory
def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def memory_child(competitor: str, n: int) -> dict[str, Any]:
    """Run in a fresh subprocess: the resident peak of one fwd+bwd call beyond its inputs."""
    xs = gmm_inputs(n, torch.device("cpu"))
    xd = [t.detach() for t in xs]
    fns = {
        "op": lambda: gt.gmm_log_likelihood(*xs).backward(),
        "native": lambda: gn.gmm_log_likelihood(*xd, need_grad=True),
        "eager": lambda: gmm_composite(*xs).backward(),
        "dist": lambda: gmm_dist(*xs).backward(),
    }
    if competitor == "compile":
        comp = torch.compile(gmm_composite)
        fns["compile"] = lambda: comp(*xs).backward()
    fn = fns[competitor]

    def clear() -> None:
        for t in xs:
            t.grad = None

    fn()  # warm-up (compiles for "compile")
    clear()
    gc.collect()
    gn.empty_cache()  # genloss's CPU output cache would keep the warm-up's gradient resident
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    st = _status()
    before, setup_hwm = st["VmRSS"], st["VmHWM"]  # setup_hwm: import, inputs, warm-up (and compile)
    method = "VmHWM after clear_refs reset - VmRSS before the call"
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        method = "VmHWM - VmRSS before the call (clear_refs unavailable: VmHWM may include setup)"
    t0 = time.perf_counter()
    out = fn()
    t = time.perf_counter() - t0
    hwm = _status()["VmHWM"]
    del out
    # (ru_maxrss is not used: Linux carries the parent's maximum over fork + exec)
    return {
        "competitor": competitor, "n": n, "peak_bytes": hwm - before, "rss_before_bytes": before, "call_s": t,
        "process_peak_bytes": max(setup_hwm, hwm), "method": method,
    }  # fmt: skip


def measure_memory(jobs: list[tuple[str, int]]) -> list[dict]:
    print()
    print("peak memory, gmm_log_likelihood fwd+bwd (fresh subprocess each; VmHWM - VmRSS before the call):")
    out = []
    for competitor, n in jobs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", competitor, str(n)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            res = {"competitor": competitor, "n": n, "error": (p.stderr or p.stdout).strip()[-2000:]}
            print(f"  {competitor:<8} N={n:<8} FAILED (rc {p.returncode}): {res['error'][-300:]}")
        else:
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["per_point_bytes"] = res["peak_bytes"] / n
            res["vs_NK_float32"] = res["peak_bytes"] / (4 * n * GMM_K)
            res["vs_NKD_float32"] = res["peak_bytes"] / (4 * n * GMM_K * GMM_D)
            print(
                f"  {competitor:<8} N={n:<8} peak {res['peak_bytes'] / 1e6:9.1f} MB "
                f"({res['per_point_bytes']:7.1f} B/point; {res['vs_NK_float32']:6.3f}x an (N,K) float32, "
                f"{res['vs_NKD_float32']:6.3f}x an (N,K,D) float32)  whole process {res['process_peak_bytes'] / 1e9:.2f} GB"
            )
        res["subprocess_s"] = time.perf_counter() - t0
        out.append(res)
        sys.stdout.flush()
    return out


# ----------------------------------------------------------------------------- output
HEADER = (
    f"{'case':<34} {'mode':<8} {'alloc':<9}"
    + "".join(f"{c:>10}" for c in COMPETITORS)
    + "  "
    + "".join(f"{c + '/op':>10}" for c in COMPETITORS[1:])
    + f"{'op rate':>14}{'copy GB/s':>10}"
)


def rate(row: dict, name: str = "op") -> str:
    if row["family"] == "elbo":
        return f"{row['bytes'] / row['competitors'][name]['median_s'] / 1e9:.2f} GB/s"
    return f"{row['competitors'][name]['G_nkd_per_s']:.2f} Gnkd/s"


def print_row(row: dict) -> None:
    c = row["competitors"]
    t = "".join(f"{bh.fmt_t(c[k]['median_s']) if k in c else '-':>10}" for k in COMPETITORS)
    r = "".join(f"{c[k]['ratio_vs_op']:>9.2f}x" if k in c else f"{'-':>10}" for k in COMPETITORS[1:])
    local = f"{row['local_copy_GBps']:>10.1f}" if "local_copy_GBps" in row else f"{'-':>10}"
    label = f"{row['case']} [{row['size']}]"
    print(f"{label:<34} {row['mode']:<8} {row['alloc']:<9}{t}  {r}{rate(row):>14}{local}")
    sys.stdout.flush()


def goal(name: str, case: str, alloc: str, measured: str, met: bool, note: str = "") -> dict:
    return {"goal": name, "case": case, "alloc": alloc, "measured": measured, "met": met, "note": note}


def evaluate_goals(rows: list[dict], memory: list[dict], copy_gbps: float) -> list[dict]:
    """The issue's speed and memory goals, judged on this run (reported, never asserted)."""
    goals = []
    for r in rows:
        if r["family"] == "elbo" and r["size"] == "16M" and r["mode"] == "fwd+bwd":
            lab = f"negative_elbo [{r['size']}]"
            local = r.get("local_copy_GBps", copy_gbps)
            pct = r["op_GBps"] / local
            measured = (
                f"op {r['op_GBps']:.2f} GB/s = {100 * pct:.0f}% of interleaved copy {local:.1f} GB/s "
                f"(native {100 * r['native_GBps'] / local:.0f}%; op {100 * r['op_GBps'] / copy_gbps:.0f}% "
                f"of run-wide copy {copy_gbps:.1f} GB/s)"
            )
            goals.append(goal("16M fwd+bwd >= 70% of copy bandwidth", lab, r["alloc"], measured, pct >= 0.70))
            sp = r["competitors"]["compile"]["ratio_vs_op"]
            goals.append(goal("16M fwd+bwd >= 1.5x faster than torch.compile", lab, r["alloc"],
                              f"compile/op {sp:.2f}x", sp >= 1.5))  # fmt: skip
    fb = {r["size"]: r for r in rows if r["family"] == "gmm" and r["mode"] == "fwd+bwd"}
    big = fb.get("N=1e6")
    for size, r in fb.items():
        if "eager" not in r["competitors"]:
            continue
        sp = r["competitors"]["eager"]["ratio_vs_op"]
        measured = f"eager/op {sp:.2f}x at {size} (eager {bh.fmt_t(r['competitors']['eager']['median_s'])})"
        note = ""
        if big is not None and "eager" not in big["competitors"]:
            n_small = r["shapes"]["x"][0]
            n_big = big["shapes"]["x"][0]
            extrap = r["competitors"]["eager"]["median_s"] * n_big / n_small
            measured += (
                f"; at N=1e6 op {bh.fmt_t(big['competitors']['op']['median_s'])} vs eager extrapolated "
                f"linearly {bh.fmt_t(extrap)} = {extrap / big['competitors']['op']['median_s']:.2f}x"
            )
            note = (
                "the goal names N=1e6, where the eager composite's (N,K,D) intermediates (~22 GB peak) do not "
                "fit this machine: judged on the measured N=1e5 ratio"
            )
        goals.append(
            goal("gmm fwd+bwd >= 5x faster than torch eager", f"gmm_log_likelihood [{size}]", "fresh",
                 measured, sp >= 5.0, note)
        )  # fmt: skip
    ops = {m["n"]: m for m in memory if m["competitor"] == "op" and "peak_bytes" in m}
    if ops:
        n = max(ops)
        m = ops[n]
        nk = 4 * n * GMM_K
        measured = (
            f"op peak {m['peak_bytes'] / 1e6:.1f} MB at N={n:.0e} = {m['peak_bytes'] / nk:.3f}x one (N,K) float32 "
            f"array ({nk / 1e6:.0f} MB); {m['per_point_bytes']:.1f} B/point"
        )
        if len(ops) > 1:
            lo = min(ops)
            measured += f" (N={lo:.0e}: {ops[lo]['per_point_bytes']:.1f} B/point)"
        goals.append(
            goal("gmm memory O(N*K) at most (peak <= one (N,K) float32 array)", f"gmm_log_likelihood [N={n:.0e}]",
                 "fresh", measured, m["peak_bytes"] <= nk)
        )  # fmt: skip
    return goals


def markdown(result: dict) -> str:
    comps = COMPETITORS
    lines = [
        "| case | mode | alloc | " + " | ".join(comps) + " | " + " | ".join(f"{c}/op" for c in comps[1:])
        + " | op rate | compile rate | op % copy | load |",
        "|---|---|---|" + "---:|" * (2 * len(comps) + 3),
    ]  # fmt: skip
    for r in result["results"]:
        c = r["competitors"]
        ts = " | ".join(bh.fmt_t(c[k]["median_s"]) if k in c else "-" for k in comps)
        rs = " | ".join(f"{c[k]['ratio_vs_op']:.2f}" if k in c else "-" for k in comps[1:])
        local = r.get("local_copy_GBps")
        pct = f"{100 * r['op_GBps'] / local:.0f}%" if local and r["family"] == "elbo" else "-"
        lines.append(
            f"| {r['case']} [{r['size']}] | {r['mode']} | {r['alloc']} | {ts} | {rs} | {rate(r)} | "
            f"{rate(r, 'compile')} | {pct} | {r['load1']:.1f} |"
        )
    if result.get("memory"):
        lines += ["", "| peak memory, gmm fwd+bwd | N | call peak (MB) | B/point | x (N,K) f32 | x (N,K,D) f32 "
                  "| process peak (GB) |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for m in result["memory"]:
            if "peak_bytes" not in m:
                lines.append(f"| {m['competitor']} | {m['n']:.0e} | failed | - | - | - | - |")
                continue
            lines.append(
                f"| {m['competitor']} | {m['n']:.0e} | {m['peak_bytes'] / 1e6:.1f} | {m['per_point_bytes']:.1f} | "
                f"{m['vs_NK_float32']:.3f} | {m['vs_NKD_float32']:.3f} | {m['process_peak_bytes'] / 1e9:.2f} |"
            )
    lines += ["", "| goal | case | alloc | measured | met |", "|---|---|---|---|---|"]
    for g in result["goals"]:
        note = f" ({g['note']})" if g.get("note") else ""
        lines.append(
            f"| {g['goal']} | {g['case']} | {g['alloc']} | {g['measured']}{note} | {'yes' if g['met'] else '**no**'} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats, GMM at N=1e5 only (< 60 s)")
    p.add_argument("--json", metavar="OUT", help="write machine-readable results here")
    p.add_argument(
        "--no-recycled", action="store_true", help="skip the recycled-allocator pass of the 16M case"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--markdown", metavar="JSON", help="print the markdown tables of a saved run and exit")
    p.add_argument("--_memory-child", nargs=2, metavar=("COMPETITOR", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._memory_child:
        print(json.dumps(memory_child(args._memory_child[0], int(args._memory_child[1]))))
        return 0
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0

    t_start = time.perf_counter()
    device = torch.device("cpu")
    clock = bh.Clock(device)
    malloc = bh.Malloc()
    recycled = not args.no_recycled and malloc.available
    alloc = "fresh-thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "fresh"
    result: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
        "machine": bh.machine_info(device),
        "quick": args.quick,
    }
    m = result["machine"]
    print(
        f"genloss VAE benchmark on {m['cpu_model']} ({m['cores']} cores, torch {m['torch']}, device {device})"
    )
    print(f"load average at start: {result['loadavg_start']}")

    probe_reps = 5 if args.quick else 15
    probes = [bh.bandwidth_probe(clock, device, probe_reps, alloc)]
    print(f"probe: copy {probes[0]['copy_GBps']:.1f} GB/s, triad {probes[0]['triad_GBps']:.1f} GB/s, "
          f"clone (fresh output) {probes[0]['clone_GBps']:.1f} GB/s")  # fmt: skip
    n = bh.PROBE_MIB * 2**20 // 4
    copy_bufs = (torch.zeros(n), torch.ones(n))
    print()
    print(HEADER)
    rows: list[dict] = []
    ecases = elbo_cases(args.quick)
    for case in ecases:
        with_ref = not (args.quick and case.dram)  # the 16M reference takes ~6 s: not in --quick
        rows += bench_elbo(case, device, clock, alloc, with_ref, copy_bufs if case.dram else None)
    for gcase in gmm_cases(args.quick):
        rows += bench_gmm(gcase, device, clock)
    probes.append(bh.bandwidth_probe(clock, device, probe_reps, alloc))

    memory: list[dict] = []
    if not args.no_memory:
        if args.quick:
            jobs = [("op", 100_000)]
        else:
            jobs = [(c, 100_000) for c in ("op", "native", "eager", "dist", "compile")]
            jobs += [(c, 1_000_000) for c in ("op", "native", "compile")]
        memory = measure_memory(jobs)
        print()
        print(HEADER)

    if recycled:
        malloc.recycle()
        for case in ecases:
            if case.dram:
                rows += bench_elbo(case, device, clock, "recycled", False, copy_bufs)
        probes.append(bh.bandwidth_probe(clock, device, probe_reps, "recycled"))

    copy_samples = [g for pr in probes for g in pr["copy_GBps_samples"]]
    triad_samples = [g for pr in probes for g in pr["triad_GBps_samples"]]
    result["probe"] = {
        "copy_GBps": statistics.median(copy_samples),
        "triad_GBps": statistics.median(triad_samples),
        "sessions": probes,
    }
    copy = result["probe"]["copy_GBps"]
    for r in rows:
        if r["family"] == "elbo":
            r["op_pct_copy"] = 100 * r["op_GBps"] / copy
            if "local_copy_GBps" in r:
                r["op_pct_local_copy"] = 100 * r["op_GBps"] / r["local_copy_GBps"]
                r["native_pct_local_copy"] = 100 * r["native_GBps"] / r["local_copy_GBps"]
    result["results"] = rows
    result["memory"] = memory
    result["goals"] = evaluate_goals(rows, memory, copy)
    result["loadavg_end"] = list(os.getloadavg())
    result["duration_s"] = time.perf_counter() - t_start

    bh.print_summary(result, probes, copy, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
