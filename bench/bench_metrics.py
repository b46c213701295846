#!/usr/bin/env python
r"""Benchmark of ``prdc`` (precision, recall, density, coverage) on the CPU: time and peak memory.

One command, one process (the issue-18 case: N = M = 50,000, D = 64, k = 5, float32)::

    python bench/bench_metrics.py [--n 50000] [--dense-n N] [--d 64] [--k 5] [--reps 3]
                                  [--dense-reps 1] [--mem-gib 24] [--json OUT] [--no-dense]

Competitors, float32 features (N = M), the same inputs:

* ``native``  ``genloss.native.prdc`` (the tiled k-NN kernel: an expansion at GEMM speed with an
              exact recheck, memory O(N + M); derivations/metrics.md MET.28-MET.31)
* ``prdc``    the ``prdc`` package (clovaai: sklearn's full distance matrices), when it imports
* ``cdist``   the dense version a user writes in torch: ``torch.cdist`` of the three N x M
              matrices, ``kthvalue`` for the radii, the comparisons (the prdc package's
              algorithm on torch's multithreaded GEMM)

The dense competitors hold N x M matrices: about 16 (cdist) and 12.5 (prdc) bytes per pair at
their peak (measured at N = 10,000), i.e. 37 and 29 GiB at N = 50,000, more than the 24 GiB
(``--mem-gib``) of the target machine. So they run at ``--dense-n``: by default the largest N
up to 20,000 whose estimate fits in both the budget and 80 % of this machine's available
memory. The script prints that estimate, runs ``native`` beside them at ``--dense-n`` (the
speed ratio, checked to give the same values: the prdc package up to its strict ``<`` tie
rule, which no continuous data meets), and then ``native`` alone at ``--n`` (the time and
memory goals).

Each call is timed (wall and CPU seconds of all threads, user + sys: under load the CPU time
is the steadier figure) and its peak memory taken with VmHWM reset before it, minus the RSS
before it (bench_mmd.peak_extra); the competitors take turns, ``--reps`` (``--dense-reps`` for
the dense case) rounds, medians reported. ``--no-dense`` skips the dense competitors.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import genloss.native as gn
import harness as bh
from bench_mmd import peak_extra

# Peak extra bytes per (N x M) pair of the dense competitors: 1,538 MiB (cdist) and 1,166 MiB
# (prdc package) at N = M = 10,000 (bench/README.md, prdc section).
DENSE_BYTES_PER_PAIR = {"cdist": 16.0, "prdc": 12.5}
DENSE_N_MAX = 20000  # beyond this the prdc package takes many minutes per call on 2 cores


def cdist_prdc(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """The dense torch version: every N x M matrix in memory at once."""
    rr = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # self 0 included
    fr = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    drf = torch.cdist(real, fake)
    inside = drf <= rr[:, None]
    return {
        "precision": float(inside.any(dim=0).double().mean()),
        "recall": float((drf <= fr[None, :]).any(dim=1).double().mean()),
        "density": float(inside.sum()) / (k * fake.shape[0]),
        "coverage": float((drf.min(dim=1).values <= rr).double().mean()),
    }


def features(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    real = rng.standard_normal((n, d)).astype(np.float32)
    fake = (rng.standard_normal((n, d)) * 1.1 + 0.05).astype(np.float32)
    return real, fake


def available_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """One call: wall and CPU seconds (process_time: user + sys of every thread), peak extra bytes, value."""
    box: dict[str, Any] = {}

    def call() -> Any:
        w, c = time.perf_counter(), time.process_time()
        box["value"] = fn()
        box["wall_s"], box["cpu_s"] = time.perf_counter() - w, time.process_time() - c
        return box["value"]

    box["peak_extra_bytes"] = peak_extra(call)
    return box


def run(runners: dict[str, Callable[[], Any]], reps: int, n: int) -> dict[str, dict[str, Any]]:
    """Round robin: every competitor once per round; medians of wall and CPU time, the largest peak."""
    calls: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            calls[name].append(measure(fn))
    rows = {}
    ref = calls["native"][0]["value"]
    for name, cs in calls.items():
        v = cs[0]["value"]
        agree = all(abs(float(v[key]) - ref[key]) <= 1e-9 for key in ref)
        s = bh.summary([c["wall_s"] for c in cs])
        cpu = float(np.median([c["cpu_s"] for c in cs]))
        peaks = [c["peak_extra_bytes"] for c in cs if c["peak_extra_bytes"] is not None]
        peak = max(peaks) if peaks else None
        rows[name] = {**s, "cpu_median_s": cpu, "peak_extra_bytes": peak, "agrees_with_native": agree}
        mib = "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"
        print(f"N = {n:>6} {name:>7}: median {bh.fmt_t(s['median_s'])} wall, {bh.fmt_t(cpu)} CPU "
              f"({s['reps']} reps), peak extra {mib}, values {({key: round(float(x), 6) for key, x in v.items()})}, "
              f"agree with native: {agree}")  # fmt: skip
    return rows


def package_runner(real: np.ndarray, fake: np.ndarray, k: int) -> Callable[[], Any] | None:
    try:
        import prdc
    except ImportError:
        print("prdc package not installed: skipped")
        return None

    def package() -> Any:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return prdc.compute_prdc(real, fake, k)  # it prints the sizes

    return package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50000, help="N = M for native (the goal's size)")
    ap.add_argument(
        "--dense-n", type=int, default=None, help="N = M for the dense comparison (default: see above)"
    )
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-reps", type=int, default=1)
    ap.add_argument("--mem-gib", type=float, default=24.0, help="memory of the target machine")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-dense", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    budget = min(a.mem_gib * 2**30, 0.8 * available_bytes())
    worst = max(DENSE_BYTES_PER_PAIR.values())
    dense_n = a.dense_n or min(a.n, DENSE_N_MAX, int(math.sqrt(budget / worst)))
    for name, bpp in DENSE_BYTES_PER_PAIR.items():
        for n in sorted({a.n, dense_n}):
            need = bpp * n * n
            fits = "fits" if need <= budget else "does NOT fit"
            print(f"{name} at N = M = {n}: needs ~{need / 2**30:.1f} GiB, {fits} in {budget / 2**30:.1f} GiB "
                  f"(min of --mem-gib {a.mem_gib:g} and 80% of available)")  # fmt: skip
    gn.prdc(*features(200, a.d), a.k)  # load and warm the engine
    result: dict[str, Any] = {"args": vars(a), "dense_n": dense_n}
    if not a.no_dense:
        real, fake = features(dense_n, a.d)
        rt, ft = torch.from_numpy(real), torch.from_numpy(fake)
        runners: dict[str, Callable[[], Any]] = {"native": lambda: gn.prdc(real, fake, a.k)}
        if DENSE_BYTES_PER_PAIR["cdist"] * dense_n**2 <= budget:
            runners["cdist"] = lambda: cdist_prdc(rt, ft, a.k)
        package = package_runner(real, fake, a.k)
        if package is not None and DENSE_BYTES_PER_PAIR["prdc"] * dense_n**2 <= budget:
            runners["prdc"] = package
        rows = run(runners, a.dense_reps, dense_n)
        result["dense"] = rows
        for other in ("prdc", "cdist"):
            if other in rows:
                wall = rows[other]["median_s"] / rows["native"]["median_s"]
                cpu = rows[other]["cpu_median_s"] / rows["native"]["cpu_median_s"]
                print(f"N = {dense_n}: native speedup vs {other}: {wall:.1f}x wall, {cpu:.1f}x CPU time")
                result[f"speedup_vs_{other}"] = {"wall": wall, "cpu": cpu}
        del real, fake, rt, ft
    if a.n != dense_n or a.no_dense:
        real, fake = features(a.n, a.d)
        result["main"] = run({"native": lambda: gn.prdc(real, fake, a.k)}, a.reps, a.n)
    load_after = os.getloadavg()
    result["load_average_before"], result["load_average_after"] = load_before, load_after
    result["threads"] = {
        "torch": torch.get_num_threads(),
        "genloss": gn.options()["threads"] or "OpenMP default",
    }
    print(f"threads: {result['threads']}; load average before {load_before}, after {load_after}; "
          f"total {time.perf_counter() - t0:.0f} s")  # fmt: skip
    if a.json:
        import json
        from pathlib import Path

        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
