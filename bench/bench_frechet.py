#!/usr/bin/env python
r"""Benchmark of ``frechet_distance`` from streamed features on the CPU: time and peak memory
(issue 18: "frechet_distance from 50,000 x 2,048 float32 features streams in bounded memory
(<= 2 covariance matrices)").

One command, one process::

    python bench/bench_frechet.py [--n 50000] [--d 2048] [--batch 1000] [--json OUT] [--no-dense]

Cases, float32 features drawn batch by batch (a feature extractor's output; the same seeded
batches in every case, so every case sees the same data):

* ``stream``   two ``genloss.torch.GaussianMoments`` fed ``--batch`` rows at a time (Chan's
               merge in float64, MET.1): the state is one mean and one d x d scatter per set,
               whatever n is. Peak memory beyond the start: the two states, one batch and
               its float64 centred copy (and what torch's GEMM and the generator hold);
               ``stream_n_over_5`` is the same at n / 5: a bounded stream peaks alike.
* ``distance`` ``genloss.torch.frechet_distance(m_real, m_fake)``: the symmetric eigenproblem
               of MET.3 on the two covariances (value only).
* ``dense``    what FID code usually does (pytorch-fid's ``calculate_frechet_distance``
               formula): all features in memory, ``np.cov`` of each set in float64,
               ``scipy.linalg.sqrtm`` of the product, its real part; skipped by ``--no-dense``.

Peak memory: VmHWM reset before each case, minus the RSS before it (bench_mmd.peak_extra).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch

import genloss.torch as gt
import harness as bh
from bench_metrics import measure

MIB = 2**20


def batches(n: int, d: int, batch: int, seed: int):
    """The features of one set, ``batch`` rows at a time: correlated, shifted Gaussians (float32)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5  # a fixed correlation between the features
    shift = torch.randn(d, generator=g) + 0.1 * seed
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), d, generator=g)
        yield (z + 0.5 * z @ mix + shift).float()


def stream(n: int, d: int, batch: int) -> tuple[gt.GaussianMoments, gt.GaussianMoments]:
    real, fake = gt.GaussianMoments(d), gt.GaussianMoments(d)
    for moments, seed in ((real, 1), (fake, 2)):
        for x in batches(n, d, batch, seed):
            moments.update(x)
    return real, fake


def dense(n: int, d: int, batch: int) -> float:
    from scipy import linalg

    feats = [torch.cat(list(batches(n, d, batch, seed))).numpy() for seed in (1, 2)]
    mu1, mu2 = (f.mean(axis=0, dtype=np.float64) for f in feats)
    s1, s2 = (np.cov(f, rowvar=False) for f in feats)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000, help="samples per set")
    ap.add_argument("--d", type=int, default=2048, help="feature dimension")
    ap.add_argument("--batch", type=int, default=1000, help="rows per update")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-dense", action="store_true", help="skip the all-in-memory scipy version")
    a = ap.parse_args()
    t0 = time.perf_counter()
    info = bh.machine_info(torch.device("cpu"))
    print(f"frechet_distance benchmark on {info.get('cpu_model', '?')}, torch {torch.__version__}: "
          f"n = {a.n} per set, d = {a.d}, batches of {a.batch}, float32 features")  # fmt: skip
    cov_bytes = a.d * a.d * 8
    batch_bytes = a.batch * a.d * 4
    load_before = os.getloadavg()
    gen = measure(lambda: sum(1 for s in (1, 2) for _ in batches(a.n, a.d, a.batch, s)))
    rows: dict[str, Any] = {"generate_only": gen}
    # the same stream at a fifth of n: a bounded stream peaks at the same memory for both
    rows["stream_n_over_5"] = measure(lambda: stream(a.n // 5, a.d, a.batch))
    rows["stream_n_over_5"].pop("value")
    rows["stream"] = measure(lambda: stream(a.n, a.d, a.batch))
    real, fake = rows["stream"].pop("value")
    rows["distance"] = measure(lambda: float(gt.frechet_distance(real, fake)))
    if not a.no_dense:
        rows["dense"] = measure(lambda: dense(a.n, a.d, a.batch))
    print(f"one d x d float64 matrix: {cov_bytes / MIB:.0f} MiB; one batch: {batch_bytes / MIB:.1f} MiB; "
          f"the features of one set: {a.n * a.d * 4 / MIB:.0f} MiB")  # fmt: skip
    for name, r in rows.items():
        peak = r["peak_extra_bytes"]
        value = r.get("value")
        shown = f"{value:.6f}" if isinstance(value, float) else ""
        print(f"  {name:16s} {r['wall_s']:8.2f} s wall {r['cpu_s']:8.2f} s CPU   peak extra "
              f"{'?' if peak is None else f'{peak / MIB:8.0f} MiB'}"
              f"{'' if peak is None else f' ({peak / cov_bytes:.1f} covariances)'}  {shown}")  # fmt: skip
    if "dense" in rows:
        v, w = rows["distance"]["value"], rows["dense"]["value"]
        rows["rel_diff_vs_dense"] = abs(v - w) / abs(w)
        print(f"  genloss vs dense value: relative difference {rows['rel_diff_vs_dense']:.2e}")
    result = {"args": vars(a), "machine": info, "git": bh.git_state(), "rows": rows,
              "covariance_bytes": cov_bytes, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    print(f"load average before {load_before}, after {result['load_average_after']}; "
          f"total {time.perf_counter() - t0:.0f} s")  # fmt: skip
    if a.json:
        import json
        from pathlib import Path

        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
