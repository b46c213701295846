#!/usr/bin/env python
r"""Per-sample gradients through ``torch.func``: what ``vmap`` costs a fused op.

One command, one process::

    python bench/bench_vmap.py [--batches 16,64,256] [--cols N] [--reps R] [--json OUT]

Under ``torch.func.vmap`` a fused op runs once per batch entry (its kernels read memory that
vmap's batched tensors do not have: ``<name>_fwd``'s vmap rule loops), so ``vmap(grad(op))``
costs about B calls. This measures that loop against the same loss written in torch eager
(which vmap vectorises), and against what needs no vmap at all: for a per-sample loss, the
gradient of ``reduction='sum'`` w.r.t. an input IS the per-sample gradients, one row per sample.

Case: SD3's cosmap ``flow_matching_loss`` (per sample the mean of (pred - (noise - x0))^2,
weighted by 2 / (pi ((1 - t)^2 + t^2))), float32, per-sample gradients w.r.t. ``pred`` of
shape (B, N). Every route's gradients are first checked against the op's rows. Competitors
take turns (``harness.run_round_robin``); median of ``--reps`` calls.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import genloss.torch as gt  # noqa: E402
import harness as bh  # noqa: E402


def _eager(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The cosmap flow-matching loss of one sample (pred (N,), t 0-d) in torch ops."""
    w = 2.0 / (math.pi * ((1.0 - t) ** 2 + t**2))
    return w * ((pred - (noise - x0)) ** 2).mean()


def routes(b: int, n: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    pred, x0, noise = (torch.randn(b, n, generator=g) for _ in range(3))
    t = torch.rand(b, generator=g).clamp(0.01, 0.99)

    def op_one(p, x, e, s):  # one sample as a batch of one
        return gt.flow_matching_loss(p[None], x[None], e[None], s[None], weighting="cosmap")

    vmap_op = torch.func.vmap(torch.func.grad(op_one), in_dims=(0, 0, 0, 0))
    vmap_eager = torch.func.vmap(torch.func.grad(_eager), in_dims=(0, 0, 0, 0))

    def rows() -> torch.Tensor:  # reduction='sum': the rows of d/dpred are the per-sample gradients
        p = pred.detach().requires_grad_(True)
        gt.flow_matching_loss(p, x0, noise, t, weighting="cosmap", reduction="sum").backward()
        return p.grad

    calls = {
        "genloss vmap(grad)": lambda: vmap_op(pred, x0, noise, t),
        "eager vmap(grad)": lambda: vmap_eager(pred, x0, noise, t),
        "genloss sum, one backward": rows,
    }
    return calls, rows()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    clock = bh.Clock(torch.device("cpu"))
    out: dict = {
        "bench": "vmap",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": bh.machine_info(torch.device("cpu")),
        "cols": a.cols,
        "cases": [],
    }
    print(f"per-sample gradients of flow_matching_loss (cosmap), float32, N = {a.cols}; median of {a.reps}")
    for b in (int(v) for v in a.batches.split(",")):
        calls, want = routes(b, a.cols)
        check = {k: float((f() - want).abs().max()) for k, f in calls.items()}
        bad = {k: v for k, v in check.items() if not v <= 1e-6 * max(1.0, float(want.abs().max()))}
        if bad:
            print(f"B = {b}: gradients differ from the op's rows: {bad}", file=sys.stderr)
            return 1
        times = bh.run_round_robin(
            clock, [bh.Runner(k, f) for k, f in calls.items()], reps=a.reps, warmup=5, block=a.block
        )
        stats = {k: bh.summary(v) for k, v in times.items()}
        line = ", ".join(f"{k} {bh.fmt_t(s['median_s'])}" for k, s in stats.items())
        per = stats["genloss vmap(grad)"]["median_s"] / b
        print(f"B = {b:4d}: {line}; genloss vmap per sample {bh.fmt_t(per)}")
        out["cases"].append({"batch": b, "check_max_abs": check, "stats": stats})
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
