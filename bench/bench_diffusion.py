#!/usr/bin/env python
r"""Side-by-side benchmark of the fused diffusion losses: genloss vs torch eager vs torch.compile vs NumPy.

One command, one process::

    python bench/bench_diffusion.py [--quick] [--json OUT] [--no-recycled]

Shares its timing method, allocator switch, bandwidth probe and machine information
with ``bench_gan.py`` (both import ``harness.py``): per-call ``time.perf_counter``, medians, competitors
round-robin call by call in a rotating order, fresh outputs for everyone, the
garbage collector off while timing, and the ``copy`` probe interleaved as one more
runner inside every case (the "same-run copy bandwidth" of the goals). These inputs
(12-20 MiB) fit in the L3, so every timed call reads the next of a ring of input
sets (``RING_MIB``: 3x the L3 sysfs reports, 96 MiB to 1 GiB, advanced untimed between
calls): each call's inputs were last touched ~3 L3s of traffic ago and come from DRAM, as the copy probe's do,
while the Python and torch code stays as warm as in a training loop. (Without the ring,
the cyclic rotation handed ``native`` the inputs ``op`` had just read. The previous
remedy, a 128 MiB copy before every call, also evicted the code and the interpreter's
data: each competitor then paid 0.3-0.7 ms of cache misses in Python and in torch's
dispatcher, e.g. a 256-element op fwd+bwd went from 38 µs to ~0.7 ms, which says more
about that copy than about the losses.) ``--block N`` (default 4): each competitor makes
N consecutive timed calls per turn, so its code is as warm as in a loop over the loss
while its data stays cold; ``--block 1`` times call by call, each call right after
another competitor's work (the 64 MiB copy probe, eager's fresh 4 MiB temporaries),
which charges every competitor its cold-code cost, ~0.25 ms for ``native`` and
~0.5 ms for ``op`` and ``compile`` on this VM.

Cases, on (64, 4, 64, 64) latents and (256, 3, 32, 32) images (1 048 576 and 786 432
elements), float32, a cosine schedule of T = 1000 steps, timesteps uniform in [1, T)
(a training batch; the decoder step t = 0, 1/T of the steps, is timed apart):

* ``diffusion_mse_loss`` with ``prediction='v'`` and per-sample min-SNR weights,
  ``reduction='mean'``. Bytes: fwd reads pred, x0, noise; fwd+bwd also writes
  d/dpred.
* ``vlb_term`` with the fixed variance and with the learned range ``v`` (per element),
  ``reduction='mean'``. Bytes: fwd reads x0, x_t, eps_pred (and v); fwd+bwd also
  writes d/deps_pred (and d/dv).
* ``vlb_term`` at t = 0 for every sample (the decoder term L_0, one step of a full-bound
  evaluation), fixed variance, images shape: the exact discretized Gaussian log-likelihood.

Competitors: ``op`` (``genloss.torch``), ``native`` (``genloss.native`` on the same
tensors), ``eager`` (the loss written with torch ops as improved-diffusion does: the
schedule gathered per sample and broadcast, the target or the two means formed,
``normal_kl`` and the discretized decoder (``torch.special.log_ndtr``) both evaluated
and selected with ``torch.where(t == 0, ...)``), ``compile`` (``torch.compile``,
default inductor, of that composite) and ``numpy`` (the float64 reference forward +
backward, timed a few times). Only pred / eps_pred / v require grad (x0, x_t, noise
are data).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
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

COMPETITORS = ("op", "native", "eager", "compile", "numpy")
MODES = bh.MODES
T_STEPS = 1000
SHAPES = {"latents (64,4,64,64)": (64, 4, 64, 64), "images (256,3,32,32)": (256, 3, 32, 32)}
SCHEDULE = gr.DiffusionSchedule(gr.cosine_betas(T_STEPS))
TS = gt.DiffusionSchedule(SCHEDULE)


# ----------------------------------------------------------------------------- composites
def _col(v: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[t].float().reshape((-1,) + (1,) * (ndim - 1))


def mse_v_composite(pred, x0, noise, t, w):
    """diffusion_mse_loss('v', weights w, mean) as torch ops."""
    a, s = _col(TS.sqrt_alpha_bar, t, pred.dim()), _col(TS.sqrt_one_minus_alpha_bar, t, pred.dim())
    target = a * noise - s * x0
    return (w * ((target - pred) ** 2).mean(dim=tuple(range(1, pred.dim())))).mean()


def _log_diff_ndtr(lo, hi):
    lh = torch.special.log_ndtr(hi)
    return lh + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - lh))


def _decoder_nll(x, mean, log_scale, bits=8):
    h = 1.0 / (2**bits - 1)
    inv = torch.exp(-log_scale)
    lo = (x - mean - h) * inv
    hi = (x - mean + h) * inv
    # improved-diffusion's three-way where, with the exact log-CDF (flipped to the lower side)
    flip = lo + hi > 0
    mid = torch.where(flip, _log_diff_ndtr(-hi, -lo), _log_diff_ndtr(lo, hi))
    logp = torch.where(
        x < -1 + h, torch.special.log_ndtr(hi), torch.where(x > 1 - h, torch.special.log_ndtr(-lo), mid)
    )
    return -logp


def vlb_composite(x0, x_t, t, eps, v=None):
    """vlb_term (fixed 'fixedlarge' variance, or the learned range v; mean) as torch ops."""
    n = x0.dim()
    c1, c2 = _col(TS.posterior_mean_coef1, t, n), _col(TS.posterior_mean_coef2, t, n)
    k1 = _col(1.0 / TS.alphas.sqrt(), t, n)
    k2 = _col(TS.betas / (TS.sqrt_one_minus_alpha_bar * TS.alphas.sqrt()), t, n)
    lt = _col(TS.posterior_log_variance_clipped, t, n)
    lb = _col(torch.log(TS.betas), t, n)
    if v is None:
        lv = torch.where(_col(torch.arange(T_STEPS), t, n) == 0, lt, lb).expand_as(x0)
    else:
        frac = 0.5 * (v + 1)
        lv = frac * lb + (1 - frac) * lt
    true_mean = c1 * x0 + c2 * x_t
    mean = k1 * x_t - k2 * eps
    kl = 0.5 * (-1.0 + lv - lt + torch.exp(lt - lv) + (true_mean - mean) ** 2 * torch.exp(-lv))
    nll = _decoder_nll(x0, mean, 0.5 * lv)
    first = (t == 0).reshape((-1,) + (1,) * (n - 1))
    per = torch.where(first, nll, kl).sum(dim=tuple(range(1, n)))
    return per.mean()


# ----------------------------------------------------------------------------- inputs
def inputs(shape, seed, decoder=False):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x0 = torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1.0  # 8-bit data in [-1, 1]
    noise = torch.randn(shape, generator=g)
    t = torch.randint(1, T_STEPS, (b,), generator=g)  # a training batch: t = 0 has probability B/T
    if decoder:
        t.zero_()  # the L_0 step of a full-bound evaluation
    x_t = gt.q_sample(x0, t, noise, TS)
    pred = (noise + 0.1 * torch.randn(shape, generator=g)).requires_grad_(True)
    v = (torch.rand(shape, generator=g) * 2 - 1).requires_grad_(True)
    w = gt.snr_weights(t, TS, "min_snr", "v")
    return x0, noise, t, x_t, pred, v, w


def rel_err(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def no_grad(f: Callable[[], Any]) -> Callable[[], Any]:
    def g():
        with torch.no_grad():
            return f()

    return g


# ----------------------------------------------------------------------------- one case
def ring_mib() -> int:
    """The ring's size: 3x the last-level cache the machine reports (96 MiB at least, 1 GiB
    at most), so a set's inputs are cold again when its turn comes back. (The 2-core AMD
    EPYC VM reports a 32 MiB L3, the 2-core Xeon VM 300 MiB.)"""
    llc = max(bh.cache_sizes().values(), default=32 << 20)
    return int(min(1024, max(96, 3 * llc >> 20)))


RING_MIB = ring_mib()


def input_ring(shape, seed, decoder):
    """Input sets whose total exceeds RING_MIB: consecutive timed calls read different
    sets, each last touched RING_MIB of traffic ago (cold in the caches)."""
    set_bytes = 5 * 4 * int(np.prod(shape))  # x0, noise, x_t, pred, v
    k = max(2, -(-(RING_MIB << 20) // set_bytes))
    return [inputs(shape, seed + i, decoder) for i in range(k)]


def bench_case(op_name, variant, shape_label, shape, clock, alloc, probe, quick, block):
    torch._dynamo.reset()
    decoder = variant.startswith("decoder")
    ring = input_ring(shape, zlib.crc32(f"{op_name}{variant}{shape}".encode()), decoder)
    cur = [ring[0], 0]  # the set the next timed call reads, its index (advanced between calls, untimed)
    x0, noise, t, x_t, pred, v, w = ring[0]  # the correctness check, compile and the reference
    n = x0.numel()
    tn = t.numpy()
    learned = variant == "learned v"
    if op_name == "diffusion_mse_loss":
        diff_at = [4]  # pred
        op = lambda s: gt.diffusion_mse_loss(s[4], s[0], s[1], s[2], TS, "v", s[6])  # noqa: E731
        nat = lambda s, ng: gn.diffusion_mse_loss(s[4].detach(), s[0], s[1], s[2], SCHEDULE, "v", s[6],  # noqa: E731
                                                  need_grad=ng)  # fmt: skip
        comp_fn = mse_v_composite
        args_of = lambda s: (s[4], s[0], s[1], s[2], s[6])  # noqa: E731
        xn = [a.detach().numpy() for a in (pred, x0, noise)]
        wn = w.numpy()
        ref_f = lambda: gr.diffusion_mse_loss(xn[0], xn[1], xn[2], tn, SCHEDULE, "v", wn)  # noqa: E731

        def ref_fb():
            return ref_f(), gr.diffusion_mse_loss_backward(xn[0], xn[1], xn[2], tn, 1.0, SCHEDULE, "v", wn)

        bytes_fwd, bytes_fb = 12 * n, 16 * n
    else:
        diff_at = [4, 5] if learned else [4]  # eps_pred (and v)
        op = lambda s: gt.vlb_term(s[0], s[3], s[2], s[4], TS, s[5] if learned else None, "mean")  # noqa: E731
        nat = lambda s, ng: gn.vlb_term(s[0], s[3], s[2], s[4].detach(), SCHEDULE,  # noqa: E731
                                        s[5].detach() if learned else None, "mean", need_grad=ng)  # fmt: skip
        comp_fn = vlb_composite
        args_of = lambda s: (s[0], s[3], s[2], s[4]) + ((s[5],) if learned else ())  # noqa: E731
        xn = [a.detach().numpy() for a in (x0, x_t, pred)]
        vn = v.detach().numpy() if learned else None
        ref_f = lambda: gr.vlb_term(xn[0], xn[1], tn, xn[2], SCHEDULE, vn, "mean")  # noqa: E731

        def ref_fb():
            return ref_f(), gr.vlb_term_backward(xn[0], xn[1], tn, xn[2], 1.0, SCHEDULE, vn, "mean")

        bytes_fwd = (16 if learned else 12) * n
        bytes_fb = bytes_fwd + (8 if learned else 4) * n
    diff = [pred, v][: len(diff_at)]
    args = args_of(ring[0])
    comp = torch.compile(comp_fn)

    def clear():
        for st in ring:
            for i in diff_at:
                st[i].grad = None

    def advance():
        cur[1] = (cur[1] + 1) % len(ring)
        cur[0] = ring[cur[1]]

    # correctness: op vs the eager composite and vs the float64 reference
    v_op = op(ring[0])
    g_op = torch.autograd.grad(v_op, diff)
    v_e = comp_fn(*args)
    g_e = torch.autograd.grad(v_e, diff)
    checks = {
        "value_rel_vs_eager": abs(v_op.item() - v_e.item()) / max(abs(v_e.item()), 1e-30),
        "grad_rel_vs_eager": max(rel_err(a, b) for a, b in zip(g_op, g_e, strict=True)),
        "value_rel_vs_reference": abs(v_op.item() - float(ref_f())) / max(abs(float(ref_f())), 1e-30),
    }
    if max(checks.values()) > 1e-3:
        print(f"  WARNING {op_name} {variant}: genloss and a composite differ: {checks}")
    del v_op, g_op, v_e, g_e
    compile_s = {}
    for mode in MODES:
        t0 = time.perf_counter()
        if mode == "fwd+bwd":
            comp(*args).backward()
        else:
            no_grad(lambda: comp(*args))()
        compile_s[mode] = time.perf_counter() - t0
        clear()
    t_ref = clock.time(ref_fb)
    ref_reps = 1 if quick or t_ref > bh.REF_SLOW_S else 3
    dst, src = probe
    reps = 7 if quick else 21
    rows = []
    for mode in MODES:
        if mode == "fwd+bwd":
            runners = [
                bh.Runner("op", lambda: op(cur[0]).backward(), clear),
                bh.Runner("native", lambda: nat(cur[0], True)),
                bh.Runner("eager", lambda: comp_fn(*args_of(cur[0])).backward(), clear),
                bh.Runner("compile", lambda: comp(*args_of(cur[0])).backward(), clear),
                bh.Runner("numpy", ref_fb, max_reps=ref_reps, note=f"{ref_reps} repeat(s) (slow)"),
            ]
            nbytes = bytes_fb
        else:
            runners = [
                bh.Runner("op", no_grad(lambda: op(cur[0]))),
                bh.Runner("native", lambda: nat(cur[0], False)),
                bh.Runner("eager", no_grad(lambda: comp_fn(*args_of(cur[0])))),
                bh.Runner("compile", no_grad(lambda: comp(*args_of(cur[0])))),
                bh.Runner("numpy", ref_f, max_reps=ref_reps, note=f"{ref_reps} repeat(s) (slow)"),
            ]
            nbytes = bytes_fwd
        runners.append(bh.Runner("copy", lambda: dst.copy_(src)))
        # Inputs of 12-20 MiB fit in this VM's 32 MiB L3: every timed call reads the next
        # set of the ring, so every competitor reads its inputs from DRAM (the copy
        # probe's regime) while the code stays as warm as in a training loop.
        times = bh.run_round_robin(clock, runners, reps, 2, block=block, before=advance)
        copy_ts = times.pop("copy")
        comps = {k: bh.summary(ts) for k, ts in times.items() if ts}
        t_op = comps["op"]["median_s"]
        for s in comps.values():
            s["ratio_vs_op"] = s["median_s"] / t_op
            s["GBps"] = nbytes / s["median_s"] / 1e9
        for r in runners:
            if r.note and r.name in comps:
                comps[r.name]["note"] = r.note
        row = {
            "case": op_name, "variant": variant, "size": shape_label, "shape": list(shape), "mode": mode,
            "alloc": alloc, "block": block, "bytes": nbytes, "competitors": comps, "compile_s": compile_s[mode], "check": checks,
            "local_copy_GBps": 2 * dst.numel() * 4 / statistics.median(copy_ts) / 1e9, "load1": os.getloadavg()[0],
        }  # fmt: skip
        rows.append(row)
        print_row(row)
    torch._dynamo.reset()
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- output
HEADER = (
    f"{'case':<52} {'mode':<8} {'alloc':<9}"
    + "".join(f"{c:>10}" for c in COMPETITORS)
    + "  "
    + "".join(f"{c + '/op':>10}" for c in COMPETITORS[1:])
    + f"{'op GB/s':>9}{'% copy':>8}"
)


def label(row):
    return f"{row['case']} ({row['variant']}) {row['size']}"


def print_row(row):
    c = row["competitors"]
    ts = "".join(f"{bh.fmt_t(c[k]['median_s']) if k in c else '-':>10}" for k in COMPETITORS)
    rs = "".join(f"{c[k]['ratio_vs_op']:>9.2f}x" if k in c else f"{'-':>10}" for k in COMPETITORS[1:])
    pct = 100 * c["op"]["GBps"] / row["local_copy_GBps"]
    print(f"{label(row):<52} {row['mode']:<8} {row['alloc']:<9}{ts}  {rs}{c['op']['GBps']:>9.2f}{pct:>7.0f}%")
    sys.stdout.flush()


def evaluate_goals(rows):
    goals = []
    for r in rows:
        if r["mode"] != "fwd+bwd" or r["variant"].startswith("decoder"):
            continue
        c = r["competitors"]
        pct = c["op"]["GBps"] / r["local_copy_GBps"]
        lab = label(r)
        goals.append({
            "goal": "fwd+bwd >= 70% of same-run copy bandwidth", "case": lab, "alloc": r["alloc"],
            "measured": f"op {c['op']['GBps']:.2f} GB/s = {100 * pct:.0f}% of copy {r['local_copy_GBps']:.1f} GB/s "
                        f"(native {100 * c['native']['GBps'] / r['local_copy_GBps']:.0f}%)",
            "met": pct >= 0.70,
        })  # fmt: skip
        sp = c["compile"]["ratio_vs_op"]
        goals.append({"goal": "fwd+bwd >= 1.5x faster than torch.compile", "case": lab, "alloc": r["alloc"],
                      "measured": f"compile/op {sp:.2f}x (eager/op {c['eager']['ratio_vs_op']:.2f}x)",
                      "met": sp >= 1.5})  # fmt: skip
    return goals


def markdown(result):
    lines = [
        "| case | mode | alloc | " + " | ".join(COMPETITORS) + " | " + " | ".join(f"{c}/op" for c in COMPETITORS[1:])
        + " | op GB/s | compile GB/s | op % copy | load |",
        "|---|---|---|" + "---:|" * (2 * len(COMPETITORS) + 3),
    ]  # fmt: skip
    for r in result["results"]:
        c = r["competitors"]
        ts = " | ".join(bh.fmt_t(c[k]["median_s"]) if k in c else "-" for k in COMPETITORS)
        rs = " | ".join(f"{c[k]['ratio_vs_op']:.2f}" if k in c else "-" for k in COMPETITORS[1:])
        lines.append(
            f"| {label(r)} | {r['mode']} | {r['alloc']} | {ts} | {rs} | {c['op']['GBps']:.2f} | "
            f"{c['compile']['GBps']:.2f} | {100 * c['op']['GBps'] / r['local_copy_GBps']:.0f}% | {r['load1']:.1f} |"
        )
    lines += ["", "| goal | case | alloc | measured | met |", "|---|---|---|---|---|"]
    for g in result["goals"]:
        lines.append(
            f"| {g['goal']} | {g['case']} | {g['alloc']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, the latents shape only")
    p.add_argument("--json", metavar="OUT", help="write machine-readable results here")
    p.add_argument("--no-recycled", action="store_true", help="skip the recycled-allocator pass")
    p.add_argument("--markdown", metavar="JSON", help="print the markdown tables of a saved run and exit")
    p.add_argument(
        "--block", type=int, default=4, metavar="N",
        help="consecutive timed calls per competitor and turn (default 4: the code warm as in a training "
        "loop of the loss; 1: call by call, each call after another competitor's work)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.markdown:
        import json

        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
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
    }
    m = result["machine"]
    print(f"genloss diffusion benchmark on {m['cpu_model']} ({m['cores']} cores, torch {m['torch']})")
    probe_reps = 5 if args.quick else 15
    probes = [bh.bandwidth_probe(clock, device, probe_reps, "fresh")]
    print(f"probe: copy {probes[0]['copy_GBps']:.1f} GB/s, triad {probes[0]['triad_GBps']:.1f} GB/s")
    nprobe = bh.PROBE_MIB * 2**20 // 4
    copy_bufs = (torch.zeros(nprobe), torch.ones(nprobe))
    cases = [
        ("diffusion_mse_loss", "v, min-SNR weights"),
        ("vlb_term", "fixed variance"),
        ("vlb_term", "learned v"),
    ]
    shapes = list(SHAPES.items())[:1] if args.quick else list(SHAPES.items())
    extra = [] if args.quick else [("vlb_term", "decoder step, t = 0", *list(SHAPES.items())[1])]
    print()
    print(HEADER)
    rows = []
    allocs = ["fresh"] + (["recycled"] if not args.no_recycled and malloc.available else [])
    for alloc in allocs:
        if alloc == "recycled":
            malloc.recycle()
        for op_name, variant in cases:
            for shape_label, shape in shapes:
                rows += bench_case(op_name, variant, shape_label, shape, clock, alloc, copy_bufs, args.quick,
                                   args.block)  # fmt: skip
        if alloc == "fresh":
            for op_name, variant, shape_label, shape in extra:
                rows += bench_case(op_name, variant, shape_label, shape, clock, alloc, copy_bufs, args.quick,
                                   args.block)  # fmt: skip
    probes.append(bh.bandwidth_probe(clock, device, probe_reps, allocs[-1]))
    copy_samples = [g for pr in probes for g in pr["copy_GBps_samples"]]
    result["probe"] = {
        "copy_GBps": statistics.median(copy_samples),
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
    np.seterr(all="ignore")
    raise SystemExit(main())
