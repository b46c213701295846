#!/usr/bin/env python
r"""Benchmark of the optimal-transport metrics on the CPU: sinkhorn_divergence and ot_coupling.

The speed goals of issue 18, one command, one process::

    python bench/bench_ot.py --json bench/results/<machine>-ot.json

* ``sinkhorn_divergence`` N = M = 10,000 (``--n``; ``--quick``: 2,000), D = 3, float64, value
  only (the number a user logs), p = 2 (cost |x - y|^2 / 2), GeomLoss's defaults for a point cloud
  of unit scale: blur 0.05, so eps = blur^2 = 0.0025 (``--eps``), scaling = 0.5; tol = 1e-4 (stop
  when no potential moves by more than tol * eps: a marginal error of about 1e-4, ``--tol``).
  x uniform in the unit cube, y normal around its centre (sd 0.2). Competitors:

  - ``native``     ``genloss.native.sinkhorn_divergence`` (tiled, costs recomputed per tile,
                   memory O(N + M))
  - ``cdist-lse``  the dense log-domain Sinkhorn people write in torch: the three cost matrices
                   (xy, xx, yy) by ``torch.cdist`` once, each soft-min by ``torch.logsumexp`` of
                   ``h - C / eps`` over the stored matrix (the y-x one over its columns), float64,
                   driven by the same loop (genloss.reference.metrics.sinkhorn_loop: same eps
                   schedule, tolerance, debiasing), so both run the same rounds; its value is
                   checked equal to native's (relative 1e-8) before timing.

  Peak memory of each: the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs before the call) minus its resident set before the call.

* ``ot_coupling`` exact, B = 1,024 (``--quick``: 256), D = 32: ``native`` (the C++ Hungarian
  solver, cost matrix included) vs ``scipy`` (``cdist`` sqeuclidean + ``linear_sum_assignment``),
  alternating call by call; the total costs are checked equal. The ratio is the median of the
  per-turn ratios (each turn times both back to back, so drift of the load hits both alike).

``--all`` adds the older cases: Sinkhorn N = M = 4096 (``--quick``: 1024), D = 32, eps = 4,
tol = 1e-6 with both gradients, for native and POT (``ot.sinkhorn2(method='sinkhorn_log')``,
value only, when installed); ot_coupling at B = 256.

Timing: the harness's round robin (bench/harness.py); wall time and process CPU time
(user + sys) of each call; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bh  # noqa: E402

# isort: split
import genloss.native as gn  # noqa: E402
from genloss.reference import metrics as rm  # noqa: E402


# ----------------------------------------------------------------------------- memory, CPU time
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_mib(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """``fn()`` and the peak of the resident set during the call beyond the one before it (MiB);
    None where Linux's VmHWM reset (/proc/self/clear_refs, 5) is unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return fn(), None
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    return out, None if base is None or peak is None else (peak - base) / 1024


class CpuTimed:
    """Wraps a call; records the process CPU seconds (user + sys, all threads) of each call."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.cpu_s = fn, []

    def __call__(self) -> Any:
        t0 = time.process_time()
        out = self.fn()
        self.cpu_s.append(time.process_time() - t0)
        return out


def timed(runners: list[bh.Runner], reps: int, warmup: int) -> dict[str, dict]:
    """Round robin of wall times; each runner's call must be a CpuTimed."""
    for r in runners:
        r.call.cpu_s.clear()  # type: ignore[attr-defined]
    times = bh.run_round_robin(bh.Clock(torch.device("cpu")), runners, reps, warmup=warmup)
    out = {}
    for r in runners:
        s = bh.summary(times[r.name])
        cpu = r.call.cpu_s[-len(times[r.name]) :]  # type: ignore[attr-defined]
        s["cpu_median_s"] = statistics.median(cpu)
        s["wall_s"] = times[r.name]
        out[r.name] = s
    return out


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# ----------------------------------------------------------------------------- Sinkhorn
def cdist_lse_sinkhorn(
    x: torch.Tensor, y: torch.Tensor, eps: float, scaling: float, tol: float, max_iter: int
) -> float:
    """The dense competitor: cost matrices by cdist (stored), soft-min by logsumexp, p = 2, debiased,
    the eps schedule and the loop of genloss's reference (so it runs native's rounds)."""
    n, m = x.shape[0], y.shape[0]
    c = {
        "xy": 0.5 * torch.cdist(x, y) ** 2,
        "xx": 0.5 * torch.cdist(x, x) ** 2,
        "yy": 0.5 * torch.cdist(y, y) ** 2,
    }

    def softmin(e: float, pair: str, h: torch.Tensor) -> torch.Tensor:
        if pair == "yx":  # the columns of the x-y matrix: no fourth matrix
            return -e * torch.logsumexp(h[:, None] - c["xy"] / e, dim=0)
        return -e * torch.logsumexp(h[None, :] - c[pair] / e, dim=1)

    la = torch.full((n,), -np.log(n), dtype=x.dtype)
    lb = torch.full((m,), -np.log(m), dtype=x.dtype)
    eps_list = rm.eps_schedule(rm.bbox_diameter(x.numpy(), y.numpy()), 2.0, eps, scaling)
    f, g, fa, gb, _ = rm.sinkhorn_loop(softmin, eps_list, la, lb, tol, max_iter, debias=True)
    return float((f - fa).mean() + (g - gb).mean())


def sinkhorn_goal(n: int, eps: float, tol: float, max_iter: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, 3))
    y = 0.5 + 0.2 * rng.normal(size=(n, 3))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    scaling = 0.5

    def native():
        return float(gn.sinkhorn_divergence(x, y, eps, 2.0, scaling, tol, max_iter, need_grad=False)[0])

    def dense():
        return cdist_lse_sinkhorn(xt, yt, eps, scaling, tol, max_iter)

    runners = [bh.Runner("native", CpuTimed(native)), bh.Runner("cdist-lse", CpuTimed(dense))]
    values, mem = {}, {}
    for r in runners:  # untimed first calls: the values (checked equal) and the peak memory
        values[r.name], mem[r.name] = peak_mib(r.call)
    rel = abs(values["native"] - values["cdist-lse"]) / abs(values["cdist-lse"])
    assert rel <= 1e-8, (values, rel)
    results = timed(runners, reps, warmup=0)
    for k, s in results.items():
        s["peak_MiB_beyond_inputs"] = mem[k]
    ratio = [
        d / nt for nt, d in zip(results["native"]["wall_s"], results["cdist-lse"]["wall_s"], strict=True)
    ]
    return {
        "case": f"sinkhorn_divergence N=M={n} D=3 eps={eps} (blur {eps**0.5:.3g}) scaling={scaling} tol={tol} "
        f"max_iter={max_iter} p=2 value",
        "goal": "native >= 3x faster than cdist-lse, memory O(N+M)",
        "values": values,
        "value_rel_diff": rel,
        "results": results,
        "speedup_wall_median": statistics.median(ratio),
        "speedup_wall_per_turn": ratio,
        "speedup_cpu": results["cdist-lse"]["cpu_median_s"] / results["native"]["cpu_median_s"],
    }


def sinkhorn_d32(n: int, reps: int, eps: float) -> dict:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, 32)), rng.normal(size=(n, 32)) + 0.3
    tol = 1e-6
    runners = [
        bh.Runner("native", CpuTimed(lambda: gn.sinkhorn_divergence(x, y, eps, 2.0, 0.5, tol))),
    ]
    values = {r.name: float(r.call()[0]) for r in runners}
    try:
        import ot

        def pot():
            w = np.full(n, 1.0 / n)
            terms = []
            for a, b in ((x, y), (x, x), (y, y)):
                c = 0.5 * ot.dist(a, b)  # squared Euclidean / 2, the cost of MET.20
                terms.append(ot.sinkhorn2(w, w, c, eps, method="sinkhorn_log", stopThr=tol, numItermax=10000))
            return terms

        runners.append(bh.Runner("pot", CpuTimed(pot), max_reps=max(1, reps // 2), note="value only"))
    except ImportError:
        pass
    return {"case": f"sinkhorn_divergence N=M={n} D=32 eps={eps} tol={tol} value+grads", "values": values,
            "results": timed(runners, reps, warmup=0)}  # fmt: skip


# ----------------------------------------------------------------------------- ot_coupling
def coupling_case(b: int, d: int, reps: int) -> dict:
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(1)
    x0, x1 = rng.normal(size=(b, d)), rng.normal(size=(b, d))

    def scipy_lsa():
        return linear_sum_assignment(cdist(x0, x1, "sqeuclidean"))[1]

    perm, want = gn.ot_coupling(x0, x1), scipy_lsa()
    cost = [float(np.sum((x0 - x1[p]) ** 2)) for p in (perm, want)]
    assert abs(cost[0] - cost[1]) <= 1e-9 * cost[1], cost
    runners = [
        bh.Runner("native", CpuTimed(lambda: gn.ot_coupling(x0, x1))),
        bh.Runner("scipy", CpuTimed(scipy_lsa)),
    ]
    results = timed(runners, reps, warmup=1)
    ratio = [nt / s for nt, s in zip(results["native"]["wall_s"], results["scipy"]["wall_s"], strict=True)]
    return {
        "case": f"ot_coupling exact B={b} D={d}",
        "goal": "native <= 1.5x scipy (cdist + linear_sum_assignment)",
        "total_cost": cost,
        "results": results,
        "ratio_wall_median": statistics.median(ratio),
        "ratio_wall_per_turn": ratio,
        "ratio_cpu": results["native"]["cpu_median_s"] / results["scipy"]["cpu_median_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--all", action="store_true", help="also the D = 32 Sinkhorn case and B = 256")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--n", type=int, default=None, help="N = M of the D = 3 Sinkhorn goal (10000; --quick 2000)"
    )
    ap.add_argument("--eps", type=float, default=0.0025, help="eps of the D = 3 goal (blur 0.05)")
    ap.add_argument("--tol", type=float, default=1e-4, help="tol of the D = 3 goal")
    ap.add_argument(
        "--reps", type=int, default=1, help="timed calls per competitor, Sinkhorn goal (each minutes)"
    )
    ap.add_argument(
        "--max-iter", type=int, default=100_000, help="cap on the rounds at the last eps (default: until tol)"
    )
    ap.add_argument("--coupling-reps", type=int, default=7, help="timed calls per competitor, B = 1024")
    args = ap.parse_args()
    t0, load0 = time.time(), loadavg()
    n = args.n or (2000 if args.quick else 10_000)
    b = 256 if args.quick else 1024
    cases = [
        sinkhorn_goal(n, args.eps, args.tol, args.max_iter, args.reps),
        coupling_case(b, 32, args.coupling_reps),
    ]
    if args.all:
        cases += [sinkhorn_d32(1024 if args.quick else 4096, 3, 4.0), coupling_case(256, 32, 5)]
    for c in cases:
        print(c["case"])
        for name, s in c["results"].items():
            mem = s.get("peak_MiB_beyond_inputs")
            print(
                f"  {name:>9}: median {bh.fmt_t(s['median_s'])}  (min {bh.fmt_t(s['min_s'])}, {s['reps']} reps)"
                f"  cpu {bh.fmt_t(s['cpu_median_s'])}" + ("" if mem is None else f"  peak +{mem:.1f} MiB")
            )
        if "speedup_wall_median" in c:
            print(f"  speedup native vs cdist-lse: {c['speedup_wall_median']:.2f}x wall, {c['speedup_cpu']:.2f}x CPU-s"
                  f" (goal >= 3x); values rel diff {c['value_rel_diff']:.1e}")  # fmt: skip
        if "ratio_wall_median" in c:
            print(f"  native / scipy: {c['ratio_wall_median']:.2f}x wall (per turn "
                  f"{min(c['ratio_wall_per_turn']):.2f}-{max(c['ratio_wall_per_turn']):.2f}), "
                  f"{c['ratio_cpu']:.2f}x CPU-s (goal <= 1.5x)")  # fmt: skip
    load1 = loadavg()
    print(f"load average: start {load0}, end {load1}; {time.time() - t0:.0f} s")
    if args.json:
        out = {
            "machine": bh.machine_info(torch.device("cpu")),
            "loadavg_start": load0,
            "loadavg_end": load1,
            "command": " ".join(["python", "bench/bench_ot.py", *sys.argv[1:]]),
            "omp_threads_env": os.environ.get("GENLOSS_NUM_THREADS"),
            "cases": cases,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
