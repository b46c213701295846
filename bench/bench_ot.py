#!/usr/bin/env python
r"""Benchmark of the optimal-transport metrics on the CPU: sinkhorn_divergence and ot_coupling.

One command, one process::

    python bench/bench_ot.py [--quick] [--json OUT]

* ``sinkhorn_divergence``, N = M = 4096 (``--quick``: 1024), D = 32, eps = 4 (``--eps``; the mean pair cost is ~32), p = 2, scaling = 0.5,
  tol = 1e-6, float64, value and both gradients:

  - ``native``  ``genloss.native.sinkhorn_divergence`` (tiled, the cost recomputed per tile)
  - ``torch``   the dense torch log-domain loop of genloss.torch's CUDA code path, run on CPU
                tensors with one row chunk (the whole N x M cost per soft-min), same schedule
  - ``pot``     POT's ``ot.sinkhorn2(..., method='sinkhorn_log', stopThr=tol)`` three times on
                dense cost matrices (the three terms of the debiased value; value only, no
                gradient, no eps-scaling), when POT is installed

* ``ot_coupling`` exact, B in {256, 1024}, D = 32: ``native`` (the C++ Hungarian solver, cost
  matrix included) vs ``scipy`` (``cdist`` sqeuclidean + ``linear_sum_assignment``); the total
  costs are checked equal.

Timing: the harness's round robin (bench/harness.py), median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bh  # noqa: E402

# isort: split
import genloss.native as gn  # noqa: E402
from genloss.torch import metrics as tm  # noqa: E402


def sinkhorn_case(n: int, d: int, reps: int, eps: float) -> dict:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.3
    tol = 1e-6
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tm._OT_CHUNK = n * n  # dense: one chunk per soft-min
    runners = [
        bh.Runner("native", lambda: gn.sinkhorn_divergence(x, y, eps, 2.0, 0.5, tol)),
        bh.Runner("torch", lambda: tm._sinkhorn_torch(xt, yt, eps, 2.0, 0.5, tol)),
    ]
    values = {"native": float(runners[0].call()[0]), "torch": float(runners[1].call()[0])}
    try:
        import ot

        def pot():
            w = np.full(n, 1.0 / n)
            terms = []
            for a, b in ((x, y), (x, x), (y, y)):
                c = 0.5 * ot.dist(a, b)  # squared Euclidean / 2, the cost of MET.20
                terms.append(ot.sinkhorn2(w, w, c, eps, method="sinkhorn_log", stopThr=tol, numItermax=10000))
            return terms

        runners.append(bh.Runner("pot", pot, max_reps=max(1, reps // 2), note="value only, <P,C> terms"))
    except ImportError:
        pass
    times = bh.run_round_robin(bh.Clock(torch.device("cpu")), runners, reps, warmup=0)
    return {"case": f"sinkhorn_divergence N=M={n} D={d} eps={eps} tol={tol}", "values": values,
            "results": {k: bh.summary(v) for k, v in times.items() if v}}  # fmt: skip


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
    runners = [bh.Runner("native", lambda: gn.ot_coupling(x0, x1)), bh.Runner("scipy", scipy_lsa)]
    times = bh.run_round_robin(bh.Clock(torch.device("cpu")), runners, reps, warmup=1)
    return {"case": f"ot_coupling exact B={b} D={d}", "total_cost": cost,
            "results": {k: bh.summary(v) for k, v in times.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--n", type=int, default=None, help="N = M of the Sinkhorn case (default 4096, --quick 1024)"
    )
    ap.add_argument("--eps", type=float, default=4.0)
    args = ap.parse_args()
    n, reps = (1024, 3) if args.quick else (4096, 3)
    n = args.n or n
    cases = [sinkhorn_case(n, 32, reps, args.eps), coupling_case(256, 32, 5), coupling_case(1024, 32, 3)]
    for c in cases:
        print(c["case"])
        for name, s in c["results"].items():
            print(
                f"  {name:>8}: median {bh.fmt_t(s['median_s'])}  (min {bh.fmt_t(s['min_s'])}, {s['reps']} reps)"
            )
    if args.json:
        out = {"machine": bh.machine_info(torch.device("cpu")), "cases": cases}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
