#!/usr/bin/env python
r"""Benchmark of ``prdc`` (precision, recall, density, coverage) on the CPU: time and peak memory.

One command, one process::

    python bench/bench_metrics.py [--n 10000] [--d 64] [--k 5] [--reps 3] [--json OUT] [--no-dense]

Competitors, float32 features (N = M = n, D = d), the same inputs:

* ``native``  ``genloss.native.prdc`` (the tiled k-NN kernel, memory O(N + M))
* ``prdc``    the ``prdc`` package (clovaai: sklearn's full distance matrices), when it imports
* ``cdist``   the dense version a user writes in torch: ``torch.cdist`` of the three N x M
              matrices, ``kthvalue`` for the radii, the comparisons (the prdc package's
              algorithm on torch's multithreaded GEMM)

The dense competitors are checked against the native values (the prdc package up to its
strict ``<`` tie rule, which no continuous data meets). Timing: harness.run_round_robin,
median of ``--reps``; peak memory: one more call with the peak RSS (VmHWM) reset before it,
minus the RSS before it (bench_mmd.peak_extra). ``--no-dense`` skips the two dense
competitors (their N x M matrices need ~3 x 4 N M bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np
import torch

import genloss.native as gn
import harness as bh
from bench_mmd import peak_extra


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-dense", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    real = rng.standard_normal((a.n, a.d)).astype(np.float32)
    fake = (rng.standard_normal((a.n, a.d)) * 1.1 + 0.05).astype(np.float32)
    rt, ft = torch.from_numpy(real), torch.from_numpy(fake)
    runners = [bh.Runner("native", lambda: gn.prdc(real, fake, a.k))]
    if not a.no_dense:
        runners.append(bh.Runner("cdist", lambda: cdist_prdc(rt, ft, a.k)))
        try:
            import prdc

            def package():
                with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                    return prdc.compute_prdc(real, fake, a.k)  # it prints the sizes

            runners.append(bh.Runner("prdc", package))
        except ImportError:
            print("prdc package not installed: skipped")
    t0 = time.perf_counter()
    values = {r.name: r.call() for r in runners}  # also the warm-up
    ref = values["native"]
    for name, v in values.items():
        agree = all(abs(float(v[key]) - ref[key]) <= 1e-9 for key in ref)
        print(
            f"{name:>7}: { ({key: round(float(x), 6) for key, x in v.items()}) } agrees with native: {agree}"
        )
    times = bh.run_round_robin(bh.Clock(torch.device("cpu")), runners, reps=a.reps, warmup=0)
    rows = {}
    for r in runners:
        s = bh.summary(times[r.name])
        peak = peak_extra(r.call)
        rows[r.name] = {**s, "peak_extra_bytes": peak}
        mib = "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"
        print(f"{r.name:>7}: median {bh.fmt_t(s['median_s'])} (q1 {bh.fmt_t(s['q1_s'])}, q3 {bh.fmt_t(s['q3_s'])}), "
              f"peak extra {mib}")  # fmt: skip
    for other in ("prdc", "cdist"):
        if other in rows:
            print(f"native speedup vs {other}: {rows[other]['median_s'] / rows['native']['median_s']:.1f}x")
    print(f"threads: torch {torch.get_num_threads()}, genloss {gn.options()['threads'] or 'OpenMP default'}; "
          f"load average {os.getloadavg()}; total {time.perf_counter() - t0:.0f} s")  # fmt: skip
    if a.json:
        import json
        from pathlib import Path

        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "values": ref}, indent=1) + "\n")


if __name__ == "__main__":
    main()
