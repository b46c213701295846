#!/usr/bin/env python
r"""Side-by-side benchmark of MMD^2 (rbf, unbiased), forward+backward, on the CPU.

One command, one process::

    python bench/bench_mmd.py [--quick] [--json OUT] [--no-large]

Competitors per case, each timed forward+backward (value and the gradients with
respect to x and y):

* ``native``   ``genloss.native.mmd2(x, y, 'rbf', bws)`` on torch tensors (one tiled pass)
* ``op``       ``genloss.torch.mmd2(x, y, 'rbf', bws).backward()``
* ``eager``    the composite a user writes: ``torch.cdist(a, b).square()``, ``exp`` per
               bandwidth, the three means with the diagonals removed, ``.backward()``
* ``compile``  ``torch.compile`` (inductor) of that composite, compiled and warmed first
* ``keops``    pykeops ``LazyTensor`` (CPU backend) sums of the same kernel, ``.backward()``,
               when pykeops imports and compiles here

Cases: N = M in {2048, 8192}, D in {3, 64}, 1 bandwidth (1.0) and 5 (0.5, 1, 2, 4, 8),
float32. Plus one run at N = M = 100,000, D = 3, native only, with its peak extra memory.

Pairs of a case: N^2 + M^2 + N M, the ordered pairs of the three kernel sums of the
biased estimator (the diagonals included; what a dense implementation evaluates). The
native kernel evaluates each unordered pair of K_xx and K_yy once (by symmetry), so it
does about N^2/2 + M^2/2 + NM evaluations, but the rate is reported on the same count
for everyone. Gpair/s per core divides by the threads in use (torch and OpenMP: all
cores).

Timing: ``time.perf_counter`` around one call; the median of the repeats, the
competitors taking turns in a rotating order (harness.run_round_robin); every call
allocates its outputs afresh. Peak memory, one more call per competitor after the
timing: ``gc.collect()`` and ``malloc_trim(0)`` (freed heap pages go back to the OS,
so the call's own allocations must fault in fresh pages), the peak resident set size
(VmHWM) reset (``/proc/self/clear_refs`` = 5), the call, VmHWM read: the reported
figure is that peak minus the resident size before the call (inputs already
resident; outputs and gradients included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bh  # noqa: E402  (first: shared timing, probe, allocator switch, machine info)

# isort: split
import genloss.native as gn  # noqa: E402
import genloss.torch as gt  # noqa: E402

BWS = {1: (1.0,), 5: (0.5, 1.0, 2.0, 4.0, 8.0)}


# ----------------------------------------------------------------------------- composites
def mmd2_composite(x: torch.Tensor, y: torch.Tensor, bws: tuple[float, ...]) -> torch.Tensor:
    """Unbiased rbf MMD^2 the way a user writes it in torch (dense N x M matrices)."""
    n, m = x.shape[0], y.shape[0]

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2.0 * s * s)) for s in bws)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = kxx.sum() - kxx.diagonal().sum()
    syy = kyy.sum() - kyy.diagonal().sum()
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * kxy.mean()


def keops_factory() -> tuple[Any, str]:
    """The KeOps version, or (None, why not)."""
    try:
        from pykeops.torch import LazyTensor
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"pykeops does not import: {type(e).__name__}: {e}"

    def mmd2_keops(x, y, bws):
        n, m = x.shape[0], y.shape[0]

        def ksum(a, b):
            d2 = ((LazyTensor(a[:, None, :]) - LazyTensor(b[None, :, :])) ** 2).sum(-1)
            kk = (-d2 / (2.0 * bws[0] ** 2)).exp()
            for s in bws[1:]:
                kk = kk + (-d2 / (2.0 * s * s)).exp()
            return kk.sum(dim=1).sum()

        nb = len(bws)  # rbf: k(a, a) = one per bandwidth
        return (
            (ksum(x, x) - nb * n) / (n * (n - 1))
            + (ksum(y, y) - nb * m) / (m * (m - 1))
            - 2.0 * ksum(x, y) / (n * m)
        )

    try:  # compile the formulas once, here (a failure is reported, not raised)
        a = torch.randn(64, 3, requires_grad=True)
        b = torch.randn(64, 3)
        v = mmd2_keops(a, b, (1.0,))
        v.backward()
        ref = mmd2_composite(a.detach(), b, (1.0,))
        if not torch.allclose(v.detach(), ref, rtol=1e-4, atol=1e-6):
            return None, f"pykeops disagrees with the composite ({v.item()} vs {ref.item()})"
    except Exception as e:  # noqa: BLE001
        return None, f"pykeops could not compile or run here: {type(e).__name__}: {str(e)[:300]}"
    return mmd2_keops, "pykeops " + __import__("pykeops").__version__


# ----------------------------------------------------------------------------- memory
def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_extra(fn) -> int | None:
    """Peak resident bytes the call adds over what was resident before it."""
    import ctypes
    import gc

    gc.collect()
    gn.empty_cache()  # genloss's CPU output cache: freed blocks would stay resident
    try:  # hand freed heap pages back, so the call's own allocations show up in the RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if not reset_peak():
        return None
    before = rss_bytes()
    out = fn()
    peak = rss_bytes("VmHWM")
    del out
    return max(0, peak - before)


# ----------------------------------------------------------------------------- one case
SLOW = ("eager", "compile", "keops")


def run_case(
    n: int,
    d: int,
    nbw: int,
    competitors: dict,
    reps: int,
    warmup: int,
    seed: int,
    slow_reps: int | None = None,
) -> dict:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g)
    y0 = torch.randn(n, d, generator=g) * 1.1 + 0.2
    bws = BWS[nbw]
    pairs = 3 * n * n
    threads = torch.get_num_threads()
    state: dict[str, Any] = {}

    def fresh():
        state["x"] = x0.clone().requires_grad_(True)
        state["y"] = y0.clone().requires_grad_(True)

    def backward_of(f):
        def call():
            v = f(state["x"], state["y"])
            v.backward()
            return v, state["x"].grad, state["y"].grad

        return call

    def clear():
        fresh()

    calls = {}
    for name, f in competitors.items():
        if name == "native":
            calls[name] = lambda: gn.mmd2(x0, y0, "rbf", bws)
        else:
            calls[name] = backward_of(lambda a, b, f=f: f(a, b, bws))
    # correctness first: every competitor's value and grad_x against the native one
    fresh()
    v_ref, (gx_ref, _) = gn.mmd2(x0, y0, "rbf", bws)
    check = {}
    compile_s = None
    for name, call in calls.items():
        fresh()
        t0 = time.perf_counter()
        out = call()
        if name == "compile":
            compile_s = time.perf_counter() - t0
        if name == "native":
            continue
        v, gx = out[0].detach(), out[1]
        check[name] = {
            "value_rel_diff": abs(v.item() - v_ref.item()) / max(abs(v_ref.item()), 1e-30),
            "grad_x_rel_l2": float((gx - gx_ref).norm() / gx_ref.norm()),
        }
    clock = bh.Clock(torch.device("cpu"))
    # The dense and KeOps competitors take seconds per call at N = 8192: capped at
    # `slow_reps` timed calls (their correctness-check call above is their warm-up).
    runners = [
        bh.Runner(name, call, clear, max_reps=slow_reps if name in SLOW else None)
        for name, call in calls.items()
    ]
    times = bh.run_round_robin(clock, runners, reps, warmup)
    rows = {}
    for name, call in calls.items():
        fresh()
        mem = peak_extra(call)
        s = bh.summary(times[name])
        med = s["median_s"]
        rows[name] = {
            **s,
            "Gpair_per_s": pairs / med / 1e9,
            "Gpair_per_s_per_core": pairs / med / 1e9 / threads,
            "peak_extra_MiB": None if mem is None else mem / 2**20,
        }
    base = rows["native"]["median_s"]
    for r in rows.values():
        r["time_vs_native"] = r["median_s"] / base
    return {
        "case": f"N=M={n} D={d} bws={nbw}",
        "N": n,
        "M": n,
        "D": d,
        "bandwidths": list(bws),
        "pairs": pairs,
        "threads": threads,
        "compile_s": compile_s,
        "check": check,
        "results": rows,
    }


def run_large(n: int, d: int) -> dict:
    """N = M = n, native only: one warm-up, three timed calls, peak extra memory."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g) + 0.1
    gn.mmd2(x[:4096], y[:4096], "rbf", (1.0,))  # warm the code path
    mem = peak_extra(lambda: gn.mmd2(x, y, "rbf", (1.0,)))
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        gn.mmd2(x, y, "rbf", (1.0,))
        ts.append(time.perf_counter() - t0)
    med = sorted(ts)[1]
    pairs = 3 * n * n
    threads = torch.get_num_threads()
    outputs = (2 * n * d + 1) * 4  # grad_x, grad_y, the value (float32)
    # The kernel's own buffers (cpp/src/mmd_cpu.cpp): P float64 gradient accumulators of
    # (N + M) D each (P <= 16, and P (N + M) D 8 <= 48 MiB), the transposed float32 copy
    # of x and y padded to the tile, the tile list.
    tiles = 2 * (math.ceil(n / 256) * (math.ceil(n / 256) + 1) // 2) + math.ceil(n / 256) ** 2
    parts = max(1, min(16, tiles, (48 << 20) // ((2 * n * d) * 8)))
    counted = parts * 2 * n * d * 8 + 2 * d * math.ceil(n / 256) * 256 * 4 + tiles * 56
    return {
        "case": f"N=M={n} D={d} bws=1 (native only)",
        "N": n,
        "D": d,
        "pairs": pairs,
        "threads": threads,
        "times_s": ts,
        "median_s": med,
        "Gpair_per_s": pairs / med / 1e9,
        "Gpair_per_s_per_core": pairs / med / 1e9 / threads,
        "peak_extra_MiB_rss": None if mem is None else mem / 2**20,
        "outputs_MiB": outputs / 2**20,
        "kernel_buffers_MiB_counted": counted / 2**20,
        "partitions": parts,
    }


# ----------------------------------------------------------------------------- report
def fmt_row(case: dict) -> list[str]:
    lines = [f"\n{case['case']}  (pairs {case['pairs']:.3g}, {case['threads']} threads)"]
    lines.append(f"  {'':8s} {'median':>10s} {'x native':>9s} {'Gpair/s':>8s} {'/core':>7s} {'peak MiB':>9s}")
    for name, r in case["results"].items():
        mem = "-" if r["peak_extra_MiB"] is None else f"{r['peak_extra_MiB']:.1f}"
        lines.append(
            f"  {name:8s} {r['median_s'] * 1e3:8.1f}ms {r['time_vs_native']:8.2f}x "
            f"{r['Gpair_per_s']:8.3f} {r['Gpair_per_s_per_core']:7.3f} {mem:>9s}"
        )
    return lines


def goals(cases: list[dict], large: dict | None) -> list[dict]:
    out = []
    for c in cases:
        r = c["results"]
        if c["D"] == 3 and c["bandwidths"] == [1.0]:
            v = r["native"]["Gpair_per_s_per_core"]
            out.append({"goal": "D=3 fwd+bwd >= 2 Gpair/s per core (native, 1 bandwidth)", "case": c["case"],
                        "measured": f"{v:.2f}", "met": v >= 2.0})  # fmt: skip
        if c["N"] == 8192 and c["D"] == 64:
            v = r["eager"]["median_s"] / r["native"]["median_s"]
            out.append({"goal": ">= 3x torch eager cdist at N=M=8192, D=64", "case": c["case"],
                        "measured": f"{v:.2f}x", "met": v >= 3.0})  # fmt: skip
    if large is not None and large.get("peak_extra_MiB_rss") is not None:
        v = large["peak_extra_MiB_rss"]
        out.append({"goal": "N=M=100,000, D=3 within 100 MB extra", "case": large["case"],
                    "measured": f"{v:.1f} MiB RSS peak over the inputs", "met": v * 2**20 <= 100e6})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=2048 only, fewer repeats")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-large", action="store_true", help="skip the N=M=100,000 run")
    ap.add_argument("--no-keops", action="store_true")
    ap.add_argument("--sizes", default="2048,8192", help="N = M values (comma-separated)")
    ap.add_argument("--dims", default="3,64", help="D values (comma-separated)")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    keops, keops_note = (None, "skipped (--no-keops)") if args.no_keops else keops_factory()
    print(f"keops: {keops_note if keops is None else keops_note}")
    compiled = torch.compile(mmd2_composite)
    competitors: dict[str, Any] = {
        "native": None,
        "op": lambda a, b, bws: gt.mmd2(a, b, "rbf", list(bws)),
        "eager": mmd2_composite,
        "compile": compiled,
    }
    if keops is not None:
        competitors["keops"] = keops
    cases = []
    sizes = (2048,) if args.quick else tuple(int(v) for v in args.sizes.split(","))
    for n in sizes:
        for d in (int(v) for v in args.dims.split(",")):
            for nbw in (1, 5):
                reps = (3 if args.quick else 9) if n <= 2048 else 7
                slow_reps = None if n <= 2048 and d == 3 else 3
                torch._dynamo.reset()
                compiled = torch.compile(mmd2_composite)
                competitors["compile"] = compiled
                case = run_case(n, d, nbw, competitors, reps, 1, seed=n + d + nbw, slow_reps=slow_reps)
                cases.append(case)
                print("\n".join(fmt_row(case)), flush=True)
    large = None
    if not args.no_large and not args.quick:
        large = run_large(100_000, 3)
        print(
            f"\n{large['case']}: {large['median_s']:.2f} s, {large['Gpair_per_s']:.2f} Gpair/s "
            f"({large['Gpair_per_s_per_core']:.2f} per core), peak extra RSS "
            f"{large['peak_extra_MiB_rss']:.1f} MiB (outputs {large['outputs_MiB']:.1f} MiB; kernel "
            f"buffers counted {large['kernel_buffers_MiB_counted']:.1f} MiB)"
        )
    gs = goals(cases, large)
    print("\nGoals:")
    for g in gs:
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']} ({g['case']})")
    if args.json:
        result = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "started": started.isoformat(timespec="seconds"),
            "loadavg_start": load0,
            "machine": bh.machine_info(torch.device("cpu")),
            "quick": args.quick,
            "keops": keops_note,
            "pairs_counted_as": "N^2 + M^2 + N M (ordered pairs of K_xx, K_yy, K_xy, diagonals included)",
            "cases": cases,
            "large": large,
            "goals": gs,
            "loadavg_end": os.getloadavg(),
            "duration_s": time.perf_counter() - t_start,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
