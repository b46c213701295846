#!/usr/bin/env python
r"""Side-by-side benchmark of the GAN family: genloss vs torch eager vs torch.compile vs NumPy.

One command, one process::

    python bench/bench_gan.py [--quick] [--json OUT] [--device cpu|cuda]

Competitors per case, each timed forward+backward and forward-only:

* ``op``       ``genloss.torch.<name>``: ``.backward()`` on the op / the op under ``torch.no_grad()``
* ``native``   ``genloss.native.<name>`` on the same torch tensors, ``need_grad=True`` / ``False``
* ``eager``    the loss written the way a user writes it (``F.softplus``, ``F.l1_loss``, ...)
* ``compile``  ``torch.compile`` (default inductor) of that same composite; compiled and warmed
               up before timing, compile time reported apart
* ``numpy``    the float64 NumPy reference ``name`` + ``name_backward`` (on CPU copies)

Timing: per call ``time.perf_counter`` around one call (``torch.cuda.synchronize`` on
both sides on CUDA); median over the repeats. The competitors take turns in a
rotating order (one call each for the 16M cases, blocks of consecutive calls for the
small ones; see ``run_round_robin``) so that the machine's drift hits all of them alike. Every call allocates its outputs afresh, for everyone:
``.grad`` is reset to ``None`` and every result is dropped after the timer stops,
so no competitor reuses another's or its own buffers, and no one pays for freeing
its previous outputs inside the timer.

Allocator conditions (CPU): glibc serves every allocation of 32 MiB or more with a
fresh ``mmap``, so each 64 MiB output of a 16M-element case page-faults on first
touch (13-20 ms on this VM, several times the cost of writing it). The 16M cases are
therefore timed twice: ``fresh`` (glibc defaults, what a user gets) and, at the end
of the run, ``recycled`` (``mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)``: freed
blocks are reused, pages already mapped, as under a caching allocator such as
CUDA's). genloss's own CPU outputs of >= 4 MiB come from its output cache in both
passes (cpp/src/host_cache.cpp: huge-page blocks, reused when freed; what a genloss
user gets; GENLOSS_HUGE_PAGES=0 before starting makes genloss allocate like everyone
else). The bandwidth probe runs in the same process: ``copy`` (``dst.copy_(src)``)
and ``triad`` (``torch.add(b, c, alpha=s, out=a)``) on preallocated 128 MiB float32
tensors, counting bytes read + written, and ``clone`` (a fresh output, for the
page-fault cost), before, between and after the cases; and the same ``copy`` runs
as one more round-robin runner inside every 16M case, so that each of those cases
has a copy bandwidth measured in the very rounds it was timed in.

Bytes of a case (the minimum any implementation must move): forward+backward reads
every input once and writes every gradient once; forward-only reads every input once.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# first: the shared timing, probe, allocator switch, machine info; it also finds genloss in a checkout
from harness import (
    MODES,
    PROBE_MIB,
    REF_SLOW_S,
    Clock,
    Malloc,
    Runner,
    bandwidth_probe,
    fmt_t,
    machine_info,
    print_summary,
    run_round_robin,
    summary,
)

# isort: split
import genloss.native as gn
import genloss.reference as gr
import genloss.torch as gt

COMPETITORS = ("op", "native", "eager", "compile", "numpy")


# ----------------------------------------------------------------------------- composites
# The losses as a user writes them with torch.nn.functional (same values as genloss,
# checked against the op before timing).
def gan_d_composite(real, fake):
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def gan_g_composite(fake):
    return F.softplus(-fake).mean()


def hinge_d_composite(real, fake):
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def lsgan_d_composite(real, fake):  # a=0, b=1, with Mao et al.'s 1/2
    return 0.5 * ((real - 1.0) ** 2).mean() + 0.5 * (fake**2).mean()


def wgan_critic_composite(real, fake):
    return fake.mean() - real.mean()


def relativistic_d_composite(real, fake):  # RaGAN
    return F.softplus(-(real - fake.mean())).mean() + F.softplus(fake - real.mean()).mean()


def gradient_penalty_composite(grads):
    norms = grads.flatten(1).norm(2, dim=1)
    return 10.0 * ((norms - 1.0) ** 2).mean()


def l1_composite(x, target):
    return F.l1_loss(x, target)


def cycle_composite(real_a, rec_a, real_b, rec_b):
    return 10.0 * (F.l1_loss(rec_a, real_a) + F.l1_loss(rec_b, real_b))


def pix2pix_composite(fake_logits, generated, target):
    return F.softplus(-fake_logits).flatten(1).sum(1).mean() + 100.0 * F.l1_loss(generated, target)


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    op: str
    size: str  # label of the size: "B=256", "16M", ...
    group: str  # "gan", "gp", "image"
    shapes: list[tuple[int, ...]]
    composite: Callable[..., torch.Tensor]
    reps: int
    warmup: int
    block: int = 1  # consecutive timed calls per turn (see run_round_robin)
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.op} [{self.size}]"


IMAGE = (16, 4, 512, 512)  # 16,777,216 elements, 64 MiB in float32
GAN_LOSSES = [
    ("gan_d_loss", gan_d_composite, 2),
    ("gan_g_loss", gan_g_composite, 1),
    ("hinge_d_loss", hinge_d_composite, 2),
    ("lsgan_d_loss", lsgan_d_composite, 2),
    ("wgan_critic_loss", wgan_critic_composite, 2),
    ("relativistic_d_loss", relativistic_d_composite, 2),
]


def make_cases(quick: bool) -> list[Case]:
    cases = []
    for batch, reps, warmup in ((256, 300, 30), (65536, 100, 10)):
        if quick and batch != 256:
            continue
        # --quick runs B=256 only, with every repetition: 300 calls of ~50 us cost nothing next
        # to the compiles, and fewer would leave the op/eager ratio (a goal) to a few noisy blocks
        for name, comp, n_in in GAN_LOSSES:
            cases.append(Case(name, f"B={batch}", "gan", [(batch,)] * n_in, comp, reps, warmup, reps // 5))
    if not quick:
        cases.append(Case("gradient_penalty_from_grads", "256x3x32x32", "gp", [(256, 3, 32, 32)],
                          gradient_penalty_composite, 100, 10, 20))  # fmt: skip
    image = [
        Case("l1_loss", "16M", "image", [IMAGE] * 2, l1_composite, 21, 2),
        Case("cycle_consistency_loss", "4x16M", "image", [IMAGE] * 4, cycle_composite, 21, 2),
        Case("pix2pix_g_loss", "16M", "image", [(16, 1, 30, 30), IMAGE, IMAGE], pix2pix_composite, 21, 2),
    ]
    cases += image[:1] if quick else image
    if quick:
        for c in cases:
            if c.group == "image":  # 11, not fewer: the recycled torch.compile median moved 30 % at 5
                c.reps, c.warmup = 11, 1
    return cases


# ----------------------------------------------------------------------------- one case
def make_inputs(case: Case, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = []
    for shape in case.shapes:
        x = torch.randn(shape, generator=g)
        if case.group == "gp":
            x *= 0.02  # norms near the center 1, as a trained critic's input gradients
        xs.append(x.to(device).requires_grad_(True))
    return xs


def check(case: Case, xs: list[torch.Tensor], op: Callable, ref_fwd: Callable) -> dict[str, float]:
    """Relative differences between the genloss op and the eager composite (value and grads)."""
    v_op = op(*xs)
    g_op = torch.autograd.grad(v_op, xs)
    v_eager = case.composite(*xs)
    g_eager = torch.autograd.grad(v_eager, xs)
    v_op, v_eager = v_op.item(), v_eager.item()
    value_rel = abs(v_op - v_eager) / max(abs(v_eager), 1e-30)
    grad_rel = max(
        float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)
        for a, b in zip(g_op, g_eager, strict=True)
    )
    out = {"value_rel_vs_eager": value_rel, "grad_rel_vs_eager": grad_rel}
    if case.group != "image":  # the float64 oracle, where it is cheap
        v_ref = float(ref_fwd(*[x.detach().cpu().numpy() for x in xs]))
        out["value_rel_vs_reference"] = abs(v_op - v_ref) / max(abs(v_ref), 1e-30)
    return out


def bench_case(
    case: Case, device: torch.device, clock: Clock, alloc: str, with_ref: bool, probe: tuple | None
) -> list[dict]:
    """Time every competitor on one case, both modes; ``probe`` = (dst, src) of an interleaved copy."""
    torch._dynamo.reset()
    xs = make_inputs(case, device, seed=zlib.crc32(case.label.encode()))
    xd = [x.detach() for x in xs]
    xn = [x.detach().cpu().numpy() for x in xs]
    op = getattr(gt, case.op)
    nat = getattr(gn, case.op)
    ref_f, ref_b = getattr(gr, case.op), getattr(gr, case.op + "_backward")
    kw = case.kwargs
    comp = torch.compile(case.composite)

    checks = check(case, xs, lambda *a: op(*a, **kw), lambda *a: ref_f(*a, **kw))
    if max(checks["value_rel_vs_eager"], checks["grad_rel_vs_eager"]) > 1e-3:
        print(f"  WARNING {case.label}: genloss and the eager composite differ: {checks}")

    def clear() -> None:
        for x in xs:
            x.grad = None

    def no_grad(f: Callable) -> Callable[[], Any]:
        def g() -> Any:
            with torch.no_grad():
                return f(*xs)

        return g

    compile_s = {}
    for mode in MODES:  # compile (and recompile for no_grad) before any timing
        t0 = time.perf_counter()
        if mode == "fwd+bwd":
            comp(*xs).backward()
        else:
            no_grad(comp)()
        clock.sync()
        compile_s[mode] = time.perf_counter() - t0
        clear()

    ref_note, ref_max = "", None
    if with_ref:
        t = clock.time(lambda: (ref_f(*xn, **kw), ref_b(*xn, 1.0, **kw)))
        if t > REF_SLOW_S:
            ref_max = 1
            ref_note = f"timed once (a fwd+bwd call took {t:.1f} s > {REF_SLOW_S:.0f} s)"
        elif case.group == "image":
            ref_max = 3
            ref_note = "3 repeats (slow)"

    if probe is not None:
        dst, src = probe
        copy_runner = Runner("copy", lambda: dst.copy_(src))
    rows = []
    nbytes_in = sum(x.numel() * x.element_size() for x in xs)
    for mode in MODES:
        if mode == "fwd+bwd":
            runners = [
                Runner("op", lambda: op(*xs, **kw).backward(), clear),
                Runner("native", lambda: nat(*xd, **kw, need_grad=True)),
                Runner("eager", lambda: case.composite(*xs).backward(), clear),
                Runner("compile", lambda: comp(*xs).backward(), clear),
            ]
            ref_call = lambda: (ref_f(*xn, **kw), ref_b(*xn, 1.0, **kw))  # noqa: E731
            nbytes = 2 * nbytes_in  # every input read once, every gradient written once
        else:
            runners = [
                Runner("op", no_grad(lambda *a: op(*a, **kw))),
                Runner("native", lambda: nat(*xd, **kw, need_grad=False)),
                Runner("eager", no_grad(case.composite)),
                Runner("compile", no_grad(comp)),
            ]
            ref_call = lambda: ref_f(*xn, **kw)  # noqa: E731
            nbytes = nbytes_in
        if with_ref:
            runners.append(Runner("numpy", ref_call, max_reps=ref_max, note=ref_note))
        if probe is not None:  # the copy probe as one more runner: same rounds, same noise
            runners.append(copy_runner)
        times = run_round_robin(clock, runners, case.reps, case.warmup, case.block)
        copy_ts = times.pop("copy", None)
        comps = {name: summary(ts) for name, ts in times.items()}
        t_op = comps["op"]["median_s"]
        for s in comps.values():
            s["ratio_vs_op"] = s["median_s"] / t_op
        for r in runners:
            if r.note:
                comps[r.name]["note"] = r.note
        rows.append({
            "case": case.op, "size": case.size, "group": case.group, "shapes": case.shapes, "mode": mode,
            "alloc": alloc, "bytes": nbytes, "competitors": comps, "compile_s": compile_s[mode],
            "op_GBps": nbytes / t_op / 1e9, "native_GBps": nbytes / comps["native"]["median_s"] / 1e9,
            "check": checks,
        })  # fmt: skip
        if copy_ts is not None:
            copy_bytes = 2 * probe[0].numel() * probe[0].element_size()  # type: ignore[index]
            rows[-1]["local_copy_GBps"] = copy_bytes / statistics.median(copy_ts) / 1e9
        rows[-1]["load1"] = os.getloadavg()[0]  # other processes share the cores: say when
        print_row(rows[-1])
    torch._dynamo.reset()
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- output
HEADER = (
    f"{'case':<34} {'mode':<8} {'alloc':<9}"
    + "".join(f"{c:>11}" for c in COMPETITORS)
    + "  "
    + "".join(f"{c + '/op':>11}" for c in COMPETITORS[1:])
    + f"{'op GB/s':>9}{'nat GB/s':>9}{'copy GB/s':>10}"
)


def print_row(row: dict) -> None:
    c = row["competitors"]
    t = "".join(f"{fmt_t(c[k]['median_s']) if k in c else '-':>11}" for k in COMPETITORS)
    r = "".join(f"{c[k]['ratio_vs_op']:>10.2f}x" if k in c else f"{'-':>11}" for k in COMPETITORS[1:])
    label = f"{row['case']} [{row['size']}]"
    local = f"{row['local_copy_GBps']:>10.1f}" if "local_copy_GBps" in row else f"{'-':>10}"
    print(
        f"{label:<34} {row['mode']:<8} {row['alloc']:<9}{t}  {r}"
        f"{row['op_GBps']:>9.2f}{row['native_GBps']:>9.2f}{local}"
    )
    sys.stdout.flush()


def goal(name: str, row: dict, measured: str, met: bool) -> dict:
    return {"goal": name, "case": f"{row['case']} [{row['size']}]", "alloc": row["alloc"], "measured": measured,
            "met": met}  # fmt: skip


def evaluate_goals(rows: list[dict], copy_gbps: float) -> list[dict]:
    """The issue's speed goals, judged on this run (reported, never asserted).

    Bandwidth: the op's fwd+bwd GB/s against the copy probe interleaved with that
    case (same rounds, so the same bandwidth weather); the run-wide copy median in
    brackets.
    """
    goals = []
    for r in rows:
        if r["group"] == "image" and r["mode"] == "fwd+bwd":
            local = r.get("local_copy_GBps", copy_gbps)
            pct, pct_run = r["op_GBps"] / local, r["op_GBps"] / copy_gbps
            measured = (f"op {100 * pct:.0f}% of interleaved copy (native {100 * r['native_GBps'] / local:.0f}%); "
                        f"op {100 * pct_run:.0f}% of run-wide copy")  # fmt: skip
            goals.append(goal("16M fwd+bwd >= 70% of copy bandwidth", r, measured, pct >= 0.70))
            speedup = r["competitors"]["compile"]["ratio_vs_op"]
            goals.append(
                goal("16M fwd+bwd >= 1.5x faster than torch.compile", r, f"{speedup:.2f}x", speedup >= 1.5)
            )
    for r in rows:
        if r["group"] == "gan" and r["size"] == "B=256" and r["mode"] == "fwd+bwd":
            ratio = r["competitors"]["eager"]["ratio_vs_op"]
            goals.append(
                goal("B=256 op fwd+bwd no slower than eager", r, f"eager/op {ratio:.2f}x", ratio >= 1.0)
            )
    return goals


def markdown(result: dict) -> str:
    """The results of a saved run as markdown (bench/README.md's tables come from this)."""
    lines = [
        "| case | mode | alloc | op | native | eager | compile | numpy | native/op | eager/op | compile/op "
        "| numpy/op | op GB/s | native GB/s | op % copy | load |",
        "|---|---|---|" + "---:|" * 13,
    ]
    for r in result["results"]:
        c = r["competitors"]
        ts = " | ".join(fmt_t(c[k]["median_s"]) if k in c else "-" for k in COMPETITORS)
        rs = " | ".join(f"{c[k]['ratio_vs_op']:.2f}" if k in c else "-" for k in COMPETITORS[1:])
        local = r.get("local_copy_GBps")
        pct = f"{100 * r['op_GBps'] / local:.0f}%" if local else "-"  # only the 16M cases are DRAM-bound
        load = f"{r['load1']:.1f}" if "load1" in r else "-"
        bw = f"{r['op_GBps']:.2f} | {r['native_GBps']:.2f} | {pct} | {load}"
        lines.append(f"| {r['case']} [{r['size']}] | {r['mode']} | {r['alloc']} | {ts} | {rs} | {bw} |")
    lines += ["", "| goal | case | alloc | measured | met |", "|---|---|---|---|---|"]
    for g in result["goals"]:
        lines.append(
            f"| {g['goal']} | {g['case']} | {g['alloc']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="B=256 (every repeat) and l1_loss [16M] (fewer repeats) only (< 60 s)",
    )
    p.add_argument("--json", metavar="OUT", help="write machine-readable results here")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--no-recycled", action="store_true", help="skip the recycled-allocator pass of the 16M cases"
    )
    p.add_argument("--markdown", metavar="JSON", help="print the markdown tables of a saved run and exit")
    args = p.parse_args(argv)

    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0

    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available to torch")
    clock = Clock(device)
    malloc = Malloc()
    recycled = device.type == "cpu" and not args.no_recycled and malloc.available
    if device.type == "cuda":
        alloc = "caching"  # torch's CUDA caching allocator recycles blocks for everyone
    else:
        alloc = "fresh-thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "fresh"
    result: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
        "machine": machine_info(device),
        "quick": args.quick,
    }
    m = result["machine"]
    print(
        f"genloss GAN benchmark on {m['cpu_model']} ({m['cores']} cores, torch {m['torch']}, device {device})"
    )
    print(f"load average at start: {result['loadavg_start']}")

    probe_reps = 5 if args.quick else 15
    probes = [bandwidth_probe(clock, device, probe_reps, alloc)]
    print(f"probe: copy {probes[0]['copy_GBps']:.1f} GB/s, triad {probes[0]['triad_GBps']:.1f} GB/s, "
          f"clone (fresh output) {probes[0]['clone_GBps']:.1f} GB/s")  # fmt: skip
    n = PROBE_MIB * 2**20 // 4
    copy_bufs = (
        torch.zeros(n, device=device),
        torch.ones(n, device=device),
    )  # interleaved with the 16M cases
    print()
    print(HEADER)
    rows: list[dict] = []
    cases = make_cases(args.quick)
    for case in cases:
        rows += bench_case(case, device, clock, alloc, True, copy_bufs if case.group == "image" else None)
    probes.append(bandwidth_probe(clock, device, probe_reps, alloc))
    if recycled:
        malloc.recycle()
        for case in cases:
            if case.group == "image":
                rows += bench_case(case, device, clock, "recycled", False, copy_bufs)
        probes.append(bandwidth_probe(clock, device, probe_reps, "recycled"))

    copy_samples = [g for pr in probes for g in pr["copy_GBps_samples"]]
    triad_samples = [g for pr in probes for g in pr["triad_GBps_samples"]]
    result["probe"] = {
        "copy_GBps": statistics.median(copy_samples),
        "triad_GBps": statistics.median(triad_samples),
        "sessions": probes,
    }
    copy = result["probe"]["copy_GBps"]
    for r in rows:
        r["op_pct_copy"] = 100 * r["op_GBps"] / copy
        r["native_pct_copy"] = 100 * r["native_GBps"] / copy
        if "local_copy_GBps" in r:
            r["op_pct_local_copy"] = 100 * r["op_GBps"] / r["local_copy_GBps"]
            r["native_pct_local_copy"] = 100 * r["native_GBps"] / r["local_copy_GBps"]
    result["results"] = rows
    result["goals"] = evaluate_goals(rows, copy)
    result["loadavg_end"] = list(os.getloadavg())
    result["duration_s"] = time.perf_counter() - t_start

    print_summary(result, probes, copy, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
