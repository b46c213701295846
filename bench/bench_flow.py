#!/usr/bin/env python
r"""Side-by-side benchmark of the fused flow-family losses: genloss vs torch eager vs torch.compile vs copy.

One command, one process::

    python bench/bench_flow.py [--quick] [--size N] [--ops a,b] [--json OUT] [--no-recycled] [--block N]

The speed goals of issue 17: ``flow_matching_loss``, ``denoiser_loss`` and
``pseudo_huber_loss`` fwd+bwd on 16M float32 elements at >= 70 % of the same run's copy
bandwidth and >= 1.5x ``torch.compile`` of the composite as a user writes it, for the
``native`` call and the torch op both.

Shares its timing method, allocator passes and machine information with
``bench_diffusion.py`` (both import ``harness.py``): per-call ``time.perf_counter``,
medians and quartiles, competitors round-robin in a rotating order (``--block N``
consecutive calls per turn, default 4), fresh outputs for everyone, the garbage
collector off while timing, inputs from a ring of input sets (3x the L3 sysfs reports,
as ``bench_diffusion.py``) advanced untimed between calls, so that every call reads
inputs that come from DRAM. ``--quick`` is a smoke run (2 sets in the ring, small
size, few repeats), not a measurement.

Cases, float32, ``reduction='mean'``, (B, n) = (16, N / 16) (N = ``--size``, default
16M; the kernels and the composites see the same contiguous per-sample rows whatever
the trailing dims):

* ``flow_matching_loss`` with the SD3 ``cosmap`` weighting, sigma_min = 0: t logit-normal.
* ``denoiser_loss`` with EDM's weighting, sigma_data = 0.5: sigma lognormal (P_mean
  -1.2, P_std 1.2, EDM's training distribution).
* ``pseudo_huber_loss`` with iCT's c = 0.00054 sqrt(n), y = x + 0.1 z (a student and
  its target).

Only the network output (pred, F, x) requires grad; x0, noise, t, sigma and y are data
(iCT's target is a stop-gradient). Competitors: ``op`` (``genloss.torch``, autograd
backward), ``native`` (``genloss.native`` on the same tensors, ``need_grad`` for the
network output only), ``eager`` (the composite as a user writes it, below), ``compile``
(``torch.compile``, default inductor, of that composite: compiled and warmed before
timing, the compile time reported apart) and ``copy`` (``dst.copy_(src)`` with src and
dst each half the bytes the case counts, so copy moves exactly those bytes: the
"same run's copy bandwidth", interleaved with the competitors as one more runner).

Bytes counted: the minimum any implementation must move, every large input read once
and the one gradient written once (flow matching and denoiser: 12 B per element fwd,
16 B fwd+bwd; pseudo-Huber: 8 B and 12 B). GB/s = those bytes / median time.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bh  # noqa: E402  (first: shared timing, probe, allocator switch, machine info)

# isort: split
import genloss.native as gn  # noqa: E402
import genloss.reference as gr  # noqa: E402
import genloss.torch as gt  # noqa: E402
from bench_diffusion import RING_MIB  # noqa: E402  (the same ring rule: 3x the reported L3)

COMPETITORS = ("op", "native", "eager", "compile")
MODES = bh.MODES
BATCH = 16
SIGMA_DATA = 0.5
ICT_C = 0.00054  # iCT: c = 0.00054 sqrt(n), n elements per sample
COMPILE_S: dict[str, dict[str, float]] = {}  # op -> mode -> seconds of the compiling first call
TOL = 1e-3  # float32 agreement of a 16M-element mean: summation order differs per competitor


# ----------------------------------------------------------------------------- composites
def _rest(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def flow_composite(pred, x0, noise, t):
    """flow_matching_loss(weighting='cosmap', sigma_min=0) as a user writes it (SD3 / diffusers)."""
    target = noise - x0  # the velocity of x_t = (1 - t) x0 + t noise
    weight = 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))  # diffusers' cosmap weighting
    return (weight * ((pred - target) ** 2).mean(dim=_rest(pred))).mean()


def denoiser_composite(F, x0, noise, sigma):
    """denoiser_loss(weighting='edm') as EDM writes it: D = c_skip x + c_out F, x = x0 + sigma noise."""
    s = _col(sigma, F.dim())
    sd = SIGMA_DATA
    x = x0 + s * noise
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    D = c_skip * x + c_out * F
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight * ((D - x0) ** 2).mean(dim=_rest(F))).mean()


def huber_composite(x, y):
    """pseudo_huber_loss (iCT's default c) as a user writes it: sqrt(||x - y||^2 + c^2) - c per sample."""
    c = ICT_C * math.sqrt(x[0].numel())
    return (torch.sqrt(((x - y) ** 2).sum(dim=_rest(x)) + c**2) - c).mean()


@dataclass
class Case:
    """One loss: its input set (element 0 is the network output, the only input that requires
    grad), its genloss calls, its composite and its float64 reference value."""

    name: str
    make: Callable[[tuple[int, ...], torch.Generator], tuple]
    op: Callable[..., torch.Tensor]
    native: Callable[..., Any]
    composite: Callable[..., torch.Tensor]
    reference: Callable[..., Any]
    big: int  # large float32 inputs, each read once


def _flow_inputs(shape, g):
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.sigmoid(torch.randn(shape[0], generator=g))  # logit-normal(0, 1), SD3's default
    pred = (noise - x0 + 0.1 * torch.randn(shape, generator=g)).requires_grad_(True)
    return pred, x0, noise, t


def _denoiser_inputs(shape, g):
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sigma = torch.exp(torch.randn(shape[0], generator=g) * 1.2 - 1.2)  # EDM's P_mean, P_std
    F = torch.randn(shape, generator=g).requires_grad_(True)
    return F, x0, noise, sigma


def _huber_inputs(shape, g):
    y = torch.randn(shape, generator=g)
    x = (y + 0.1 * torch.randn(shape, generator=g)).requires_grad_(True)
    return x, y


_FIRST_OF_4 = (True, False, False, False)  # d/d(network output); x0, noise, t / sigma are data
CASES = {
    c.name: c
    for c in (
        Case(
            "flow_matching_loss", _flow_inputs,
            lambda p, x, n, t: gt.flow_matching_loss(p, x, n, t, "cosmap"),
            lambda p, x, n, t, ng: gn.flow_matching_loss(p.detach(), x, n, t, "cosmap",
                                                         need_grad=_FIRST_OF_4 if ng else False),
            flow_composite,
            lambda p, x, n, t: gr.flow_matching_loss(p, x, n, t, "cosmap"),
            3,
        ),
        Case(
            "denoiser_loss", _denoiser_inputs,
            lambda f, x, n, s: gt.denoiser_loss(f, x, n, s, SIGMA_DATA, "edm"),
            lambda f, x, n, s, ng: gn.denoiser_loss(f.detach(), x, n, s, SIGMA_DATA, "edm",
                                                    need_grad=_FIRST_OF_4 if ng else False),
            denoiser_composite,
            lambda f, x, n, s: gr.denoiser_loss(f, x, n, s, SIGMA_DATA, "edm"),
            3,
        ),
        Case(
            "pseudo_huber_loss", _huber_inputs,
            lambda x, y: gt.pseudo_huber_loss(x, y),
            lambda x, y, ng: gn.pseudo_huber_loss(x.detach(), y, need_grad=(True, False) if ng else False),
            huber_composite,
            lambda x, y: gr.pseudo_huber_loss(x, y),
            2,
        ),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------- helpers
def parse_size(s: str) -> int:
    """'16M', '256K', '1048576' -> elements; a positive multiple of the batch."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
    digits = s[:-1] if mult > 1 else s
    if not digits.isdigit() or int(digits) * mult <= 0 or int(digits) * mult % BATCH:
        raise argparse.ArgumentTypeError(
            f"--size must be a positive multiple of {BATCH} (e.g. 16M), got {s!r}"
        )
    return int(digits) * mult


def size_label(n: int) -> str:
    for unit, k in (("M", 1 << 20), ("K", 1 << 10)):
        if n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


def no_grad(f: Callable[[], Any]) -> Callable[[], Any]:
    def g():
        with torch.no_grad():
            return f()

    return g


def copy_runner(nbytes: int) -> bh.Runner:
    """``dst.copy_(src)`` moving ``nbytes`` (src and dst each half of them, read + written)."""
    half = nbytes // 8  # float32 elements of each
    src, dst = torch.ones(half), torch.zeros(half)
    return bh.Runner("copy", lambda: dst.copy_(src))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def check_agreement(case: Case, st: tuple, comp: Callable[..., torch.Tensor]) -> tuple[dict, dict]:
    """Every competitor's value (and gradient of the network output) against genloss's, and genloss's
    value against the float64 reference; asserted to float32 tolerance, outside timing. Also the
    first calls of the compiled composite (fwd+bwd and no_grad): their times are the compile times."""
    x = st[0]
    v_op = case.op(*st)
    (g_op,) = torch.autograd.grad(v_op, [x])
    v_nat, g_nat = case.native(*st, True)
    v_e = case.composite(*st)
    (g_e,) = torch.autograd.grad(v_e, [x])
    t0 = time.perf_counter()
    v_c = comp(*st)
    (g_c,) = torch.autograd.grad(v_c, [x])
    compile_s = {"fwd+bwd": time.perf_counter() - t0}
    t0 = time.perf_counter()
    v_cf = no_grad(lambda: comp(*st))()
    compile_s["fwd"] = time.perf_counter() - t0
    ref = float(case.reference(*[a.detach().numpy().astype(np.float64) for a in st]))
    vo = v_op.item()
    checks = {
        "value_rel_op_vs_reference": abs(vo - ref) / max(abs(ref), 1e-30),
        **{
            f"value_rel_{k}_vs_op": abs(float(v.detach()) - vo) / max(abs(vo), 1e-30)
            for k, v in (("native", v_nat), ("eager", v_e), ("compile", v_c), ("compile_fwd", v_cf))
        },
        **{f"grad_rel_{k}_vs_op": rel_err(g, g_op) for k, g in (("native", g_nat[0]), ("eager", g_e), ("compile", g_c))},
    }  # fmt: skip
    bad = {k: v for k, v in checks.items() if not v <= TOL}
    assert not bad, f"{case.name}: competitors disagree beyond {TOL:g}: {bad}"
    return checks, compile_s


# ----------------------------------------------------------------------------- one case
def bench_case(case, comp, n, clock, alloc, ring_sets, reps, block):
    shape = (BATCH, n // BATCH)
    seed = sum(map(ord, case.name))
    set_bytes = (case.big + 1) * 4 * n  # the inputs and the one gradient a call allocates
    k = ring_sets or max(2, -(-(RING_MIB << 20) // set_bytes))
    ring = [case.make(shape, torch.Generator().manual_seed(seed + i)) for i in range(k)]
    cur = [ring[0], 0]  # the set the next timed call reads, its index (advanced between calls, untimed)
    checks, first_s = check_agreement(case, ring[0], comp)
    compile_s = COMPILE_S.setdefault(case.name, first_s)  # the first pass's first calls compiled

    def clear():
        for st in ring:
            st[0].grad = None

    def advance():
        cur[1] = (cur[1] + 1) % len(ring)
        cur[0] = ring[cur[1]]

    bytes_fwd = case.big * 4 * n
    rows = []
    for mode in MODES:
        nbytes = bytes_fwd + (4 * n if mode == "fwd+bwd" else 0)
        if mode == "fwd+bwd":
            runners = [
                bh.Runner("op", lambda: case.op(*cur[0]).backward(), clear),
                bh.Runner("native", lambda: case.native(*cur[0], True)),
                bh.Runner("eager", lambda: case.composite(*cur[0]).backward(), clear),
                bh.Runner("compile", lambda: comp(*cur[0]).backward(), clear),
            ]
        else:
            runners = [
                bh.Runner("op", no_grad(lambda: case.op(*cur[0]))),
                bh.Runner("native", lambda: case.native(*cur[0], False)),
                bh.Runner("eager", no_grad(lambda: case.composite(*cur[0]))),
                bh.Runner("compile", no_grad(lambda: comp(*cur[0]))),
            ]
        runners.append(copy_runner(nbytes))
        times = bh.run_round_robin(clock, runners, reps, 2, block=block, before=advance)
        comps = {k: bh.summary(ts) for k, ts in times.items()}
        copy_gbps = nbytes / comps["copy"]["median_s"] / 1e9
        t_compile = comps["compile"]["median_s"]
        for s in comps.values():
            s["GBps"] = nbytes / s["median_s"] / 1e9
            s["x_copy"] = s["GBps"] / copy_gbps
            s["x_compile"] = t_compile / s["median_s"]
        row = {
            "case": case.name, "size": size_label(n), "shape": list(shape), "mode": mode, "alloc": alloc,
            "block": block, "ring_sets": k, "bytes": nbytes, "competitors": comps, "copy_GBps": copy_gbps,
            "compile_s": compile_s[mode], "check": checks, "load1": os.getloadavg()[0],
        }  # fmt: skip
        rows.append(row)
        print_row(row)
    return rows


# ----------------------------------------------------------------------------- output
HEADER = (
    f"{'op':<20} {'size':>5} {'mode':<8} {'alloc':<9} {'competitor':<10}"
    f"{'median':>11}{'IQR':>11}{'GB/s':>8}{'x copy':>8}{'x compile':>10}"
)


def print_row(row):
    head = f"{row['case']:<20} {row['size']:>5} {row['mode']:<8} {row['alloc']:<9}"
    for name in (*COMPETITORS, "copy"):
        s = row["competitors"][name]
        xc = "-" if name == "copy" else f"{s['x_compile']:.2f}"
        print(
            f"{head} {name:<10}{bh.fmt_t(s['median_s']):>11}{bh.fmt_t(s['q3_s'] - s['q1_s']):>11}"
            f"{s['GBps']:>8.2f}{s['x_copy']:>8.2f}{xc:>10}"
        )
        head = " " * len(head)
    sys.stdout.flush()


def evaluate_goals(rows):
    """Issue 17's two goals for every fwd+bwd row, for native and the op (reported, not asserted)."""
    goals = []
    for r in rows:
        if r["mode"] != "fwd+bwd":
            continue
        c = r["competitors"]
        lab = f"{r['case']} [{r['size']}]"
        for who in ("native", "op"):
            goals.append({
                "goal": f"{who} fwd+bwd >= 70% of same-run copy bandwidth", "case": lab, "alloc": r["alloc"],
                "measured": f"{c[who]['GBps']:.2f} GB/s = {100 * c[who]['x_copy']:.0f}% of copy {r['copy_GBps']:.2f} GB/s",
                "met": c[who]["x_copy"] >= 0.70,
            })  # fmt: skip
            goals.append({
                "goal": f"{who} fwd+bwd >= 1.5x faster than torch.compile", "case": lab, "alloc": r["alloc"],
                "measured": f"compile/{who} {c[who]['x_compile']:.2f}x (eager/{who} "
                            f"{c['eager']['median_s'] / c[who]['median_s']:.2f}x)",
                "met": c[who]["x_compile"] >= 1.5,
            })  # fmt: skip
    return goals


def markdown(result):
    lines = [
        "| op | size | mode | alloc | competitor | median | IQR | GB/s | x copy | x compile | load |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        for name in (*COMPETITORS, "copy"):
            s = r["competitors"][name]
            xc = "-" if name == "copy" else f"{s['x_compile']:.2f}"
            lines.append(
                f"| {r['case']} | {r['size']} | {r['mode']} | {r['alloc']} | {name} | {bh.fmt_t(s['median_s'])} | "
                f"{bh.fmt_t(s['q3_s'] - s['q1_s'])} | {s['GBps']:.2f} | {s['x_copy']:.2f} | {xc} | {r['load1']:.1f} |"
            )
    lines += ["", "| goal | case | alloc | measured | met |", "|---|---|---|---|---|"]
    for g in result["goals"]:
        lines.append(
            f"| {g['goal']} | {g['case']} | {g['alloc']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 256K elements (unless --size), 5 repeats, 2 input sets, no recycled pass")  # fmt: skip
    p.add_argument("--size", type=parse_size, help="elements per input, a multiple of 16 (default 16M)")
    p.add_argument("--ops", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument(
        "--json", metavar="OUT", help="write machine-readable results here (nothing is written without it)"
    )
    p.add_argument("--no-recycled", action="store_true", help="skip the recycled-allocator pass")
    p.add_argument("--block", type=int, default=4, metavar="N",
                   help="consecutive timed calls per competitor and turn (default 4; 1: call by call)")  # fmt: skip
    p.add_argument("--markdown", metavar="JSON", help="print the markdown tables of a saved run and exit")
    args = p.parse_args(argv)
    if args.markdown:
        import json

        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    ops = [s.strip() for s in args.ops.split(",") if s.strip()]
    unknown = [o for o in ops if o not in CASES]
    if unknown or not ops:
        p.error(f"--ops: unknown {unknown}; choose from {', '.join(CASES)}")
    n = args.size or (1 << 18 if args.quick else 1 << 24)
    reps = 5 if args.quick else 21
    ring_sets = 2 if args.quick else 0  # 0: RING_MIB of input sets
    t_start = time.perf_counter()
    device = torch.device("cpu")
    clock = bh.Clock(device)
    malloc = bh.Malloc()
    result: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
        "machine": bh.machine_info(device),
        "quick": args.quick,
        "block": args.block,
        "ring_MiB": RING_MIB,
        "elements": n,
    }
    m = result["machine"]
    print(f"genloss flow benchmark on {m['cpu_model']} ({m['cores']} cores, torch {m['torch']}), "
          f"{size_label(n)} float32 elements")  # fmt: skip
    probe_reps = 3 if args.quick else 15
    probes = [bh.bandwidth_probe(clock, device, probe_reps, "fresh")]
    print(f"probe: copy {probes[0]['copy_GBps']:.1f} GB/s, triad {probes[0]['triad_GBps']:.1f} GB/s")
    compiled = {
        name: torch.compile(CASES[name].composite) for name in ops
    }  # compiled once, kept for both passes
    print()
    print(HEADER)
    rows = []
    recycled = not (args.no_recycled or args.quick) and malloc.available
    allocs = ["fresh"] + (["recycled"] if recycled else [])
    for alloc in allocs:
        if alloc == "recycled":
            malloc.recycle()
        for name in ops:
            rows += bench_case(CASES[name], compiled[name], n, clock, alloc, ring_sets, reps, args.block)
    probes.append(bh.bandwidth_probe(clock, device, probe_reps, allocs[-1]))
    result["probe"] = {
        "copy_GBps": statistics.median([g for pr in probes for g in pr["copy_GBps_samples"]]),
        "triad_GBps": statistics.median([g for pr in probes for g in pr["triad_GBps_samples"]]),
        "sessions": probes,
    }
    result["results"] = rows
    result["goals"] = evaluate_goals(rows)
    result["loadavg_end"] = list(os.getloadavg())
    result["duration_s"] = time.perf_counter() - t_start
    bh.print_summary(result, probes, result["probe"]["copy_GBps"], args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
