#!/usr/bin/env python
r"""Benchmark of the quant family's quantizers on the CPU: vector_quantize and lfq_entropy_loss, fwd+bwd.

One command, one process::

    python bench/bench_quant.py [--quick] [--json OUT] [--reps R]

vector_quantize, N x K codes of dimension D, float32, competitors each timed forward+backward:

* ``genloss``    ``genloss.torch.vector_quantize(z, e)``, then ``backward`` of ``z_q.sum() + commit + codebook``
                 (the tiled native kernel: no N x K matrix)
* ``eager``      the composite people write: ``torch.cdist`` + ``argmin``, the straight-through z_q, the two
                 ``torch.mean`` terms, ``backward``
* ``gemm``       one ``torch.mm`` of (N, D) x (D, K): the floor of any method that looks at every pair

lfq_entropy_loss, N x d, float32 (inv_temperature 100):

* ``genloss``    ``genloss.torch.lfq_entropy_loss(z).backward()`` (factorized per-sample entropy, streamed 2^d
                 codebook accumulators)
* ``eager``      the brute-force composite (vector-quantize-pytorch's LFQ entropy without its log clamp): the
                 (N, 2^d) logits ``2 tau z @ codes^T / 2``, softmax, per-sample and codebook entropies, backward
* ``vqp``        vector-quantize-pytorch's ``LFQ`` entropy aux loss, backward, when it is installed

The composites need N x K (N x 2^d) tensors: at the stated sizes (N = 65536, K = 16384: 4 GiB; d = 16: 17 GiB)
they run at a smaller N where they do not fit (``eager_n``), and the ratio is per row.  Timing: the harness's
round robin (median of the repeats); peak memory: VmHWM reset before one more call, minus the RSS before it.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bh  # noqa: E402

# isort: split
import genloss.torch as gt  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_extra_mib(fn: Any) -> float | None:
    """Peak resident memory of one call above the resident size before it (inputs resident)."""
    gc.collect()
    _malloc_trim()  # freed heap pages back to the OS first: the call's allocations must fault in fresh pages
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) / 1024


def vq_genloss(z: torch.Tensor, e: torch.Tensor) -> Any:
    zr, er = z.requires_grad_(True), e.requires_grad_(True)
    zq, idx, c, cb = gt.vector_quantize(zr, er)
    (zq.sum() + c + cb).backward()
    return idx, zr.grad, er.grad


def vq_eager(z: torch.Tensor, e: torch.Tensor) -> Any:
    zr, er = z.requires_grad_(True), e.requires_grad_(True)
    with torch.no_grad():
        idx = torch.cdist(zr, er).argmin(dim=1)
    eq = er[idx]
    zq = zr + (eq - zr).detach()
    commit = 0.25 * torch.mean((zr - eq.detach()) ** 2)
    cb = torch.mean((zr.detach() - eq) ** 2)
    (zq.sum() + commit + cb).backward()
    return idx, zr.grad, er.grad


def lfq_genloss(z: torch.Tensor) -> Any:
    zr = z.requires_grad_(True)
    gt.lfq_entropy_loss(zr, 100.0).backward()
    return zr.grad


def lfq_eager(z: torch.Tensor, codes: torch.Tensor) -> Any:
    zr = z.requires_grad_(True)
    logp = torch.log_softmax(100.0 * zr @ codes.T, dim=1)
    p = logp.exp()
    per_sample = -(p * logp).sum(1).mean()
    pbar = p.mean(0)
    loss = per_sample + (pbar * torch.log(pbar.clamp_min(1e-30))).sum()
    loss.backward()
    return zr.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (N=8192, K=4096; d=12)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    clock = bh.Clock(torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    t_start = datetime.datetime.now()

    def timed(runners: list[bh.Runner], reps: int) -> dict[str, float]:
        times = bh.run_round_robin(clock, runners, reps=reps, warmup=1)
        return {k: bh.summary(v)["median_s"] for k, v in times.items()}

    # ---------------------------------------------------------------- vector_quantize
    n, k, d = (8192, 4096, 32) if args.quick else (65536, 16384, 32)
    eager_n = n if args.quick else 16384  # the (eager_n, K) float32 distance matrix: 1 GiB
    z = torch.randn(n, d)
    e = torch.randn(k, d)
    ze = z[:eager_n].clone()
    et = e.T.contiguous()
    med = timed(
        [
            bh.Runner("genloss", lambda: vq_genloss(z.detach().clone(), e.detach().clone())),
            bh.Runner("gemm", lambda: torch.mm(z, et)),
            bh.Runner("eager", lambda: vq_eager(ze.detach().clone(), e.detach().clone())),
        ],
        args.reps,
    )
    mem = {
        "genloss": peak_extra_mib(lambda: vq_genloss(z.detach().clone(), e.detach().clone())),
        "gemm": peak_extra_mib(lambda: torch.mm(z, et)),
        "eager": peak_extra_mib(lambda: vq_eager(ze.detach().clone(), e.detach().clone())),
    }
    eager_full = med["eager"] * n / eager_n  # per-row scaling (the composite is linear in N)
    rows.append({
        "op": "vector_quantize", "case": f"N={n} K={k} D={d}", "genloss_s": med["genloss"], "gemm_s": med["gemm"],
        "eager_s": med["eager"], "eager_n": eager_n, "eager_scaled_s": eager_full,
        "speedup_vs_eager": eager_full / med["genloss"], "vs_gemm": med["genloss"] / med["gemm"], "peak_mib": mem,
    })  # fmt: skip

    # ---------------------------------------------------------------- lfq_entropy_loss
    n, d = (8192, 12) if args.quick else (65536, 16)
    eager_n = n if args.quick else 2048  # (2048, 2^16) float32 logits: 512 MiB per tensor
    z = 0.05 * torch.randn(n, d)
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)))
    ze = z[:eager_n].clone()
    runners = [
        bh.Runner("genloss", lambda: lfq_genloss(z.detach().clone())),
        bh.Runner("eager", lambda: lfq_eager(ze.detach().clone(), codes)),
    ]
    try:
        import vector_quantize_pytorch as vqp

        lfq = vqp.LFQ(dim=d, codebook_size=2**d, entropy_loss_weight=1.0, commitment_loss_weight=0.0)
        lfq.train()

        def vqp_call() -> Any:
            x = ze.detach().clone().unsqueeze(0).requires_grad_(True)
            out = lfq(x, inv_temperature=50.0)
            out[-1].backward()
            return x.grad

        runners.append(bh.Runner("vqp", vqp_call))
    except ImportError:
        pass
    med = timed(runners, args.reps)
    mem = {"genloss": peak_extra_mib(lambda: lfq_genloss(z.detach().clone()))}
    mem["eager"] = peak_extra_mib(lambda: lfq_eager(ze.detach().clone(), codes))
    row = {
        "op": "lfq_entropy_loss", "case": f"N={n} d={d}", "genloss_s": med["genloss"], "eager_s": med["eager"],
        "eager_n": eager_n, "eager_scaled_s": med["eager"] * n / eager_n,
        "speedup_vs_eager": med["eager"] * n / eager_n / med["genloss"], "peak_mib": mem,
    }  # fmt: skip
    if "vqp" in med:
        row["vqp_s"] = med["vqp"]
        row["speedup_vs_vqp"] = med["vqp"] * n / eager_n / med["genloss"]
    rows.append(row)

    info = bh.machine_info(torch.device("cpu"))
    print(f"# bench_quant {'--quick ' if args.quick else ''}({info['cpu_model']}, {info['cores']} cores, "
          f"torch threads {info['torch_threads']}, load {os.getloadavg()[0]:.1f})")  # fmt: skip
    for r in rows:
        extra = f" | vqp {r['vqp_s']:.3f} s (x{r['speedup_vs_vqp']:.1f})" if "vqp_s" in r else ""
        gemm = f" | gemm {r['gemm_s']:.3f} s (genloss/gemm {r['vs_gemm']:.2f})" if "gemm_s" in r else ""
        print(
            f"{r['op']} {r['case']}: genloss {r['genloss_s']:.3f} s{gemm} | eager {r['eager_s']:.3f} s at "
            f"N={r['eager_n']} (scaled {r['eager_scaled_s']:.3f} s, x{r['speedup_vs_eager']:.1f}){extra} | "
            f"peak MiB {r['peak_mib']}"
        )
    result = {"rows": rows, "machine": info, "started": t_start.isoformat(), "loadavg_end": os.getloadavg()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
