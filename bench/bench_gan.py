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
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:
    import genloss
except ImportError:  # running from a checkout without installing: use python/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import genloss

import genloss.native as gn
import genloss.reference as gr
import genloss.torch as gt

COMPETITORS = ("op", "native", "eager", "compile", "numpy")
MODES = ("fwd+bwd", "fwd")
PROBE_MIB = 128
REF_SLOW_S = 2.0  # the NumPy reference is timed once only when a call takes longer


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
    r = (lambda n: max(5, n // 5)) if quick else (lambda n: n)
    cases = []
    for batch, reps, warmup in ((256, 300, 30), (65536, 100, 10)):
        if quick and batch != 256:
            continue
        for name, comp, n_in in GAN_LOSSES:
            cases.append(
                Case(name, f"B={batch}", "gan", [(batch,)] * n_in, comp, r(reps), r(warmup), r(reps) // 5)
            )
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
            if c.group == "image":
                c.reps, c.warmup = 5, 1
    return cases


# ----------------------------------------------------------------------------- timing
class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        t1 = time.perf_counter()
        del out  # freed outside the timer, for everyone
        return t1 - t0


@dataclass
class Runner:
    name: str
    call: Callable[[], Any]
    clear: Callable[[], None] = lambda: None
    max_reps: int | None = None
    note: str = ""


def run_round_robin(
    clock: Clock,
    runners: list[Runner],
    reps: int,
    warmup: int,
    block: int = 1,
    before: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Warm up each runner, then take turns, rotating the order: ``block`` timed calls per turn.

    ``before`` (untimed) runs before every timed call, e.g. to evict the caches: with
    inputs that fit in the last-level cache, the rotation would otherwise hand each
    runner the caches its predecessor left (always the same predecessor: the order
    rotates but stays cyclic), so one competitor would read its inputs from cache and
    another from DRAM.

    ``block=1`` interleaves call by call (the 16M cases: bandwidth drift hits everyone
    alike). Small cases use blocks of consecutive calls: they are not bandwidth-bound,
    and call-by-call interleaving runs each competitor with caches and branch
    predictors trained by another, which adds ~20-30 us to every call at B=256.
    """
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for r in runners:
        for _ in range(warmup if r.max_reps is None else 0):  # capped runners: warmed by the caller
            r.clear()
            clock.time(r.call)
            r.clear()
    gc.collect()
    gc.disable()
    try:
        for i in range(-(-reps // block)):
            k = i % len(runners)
            for r in runners[k:] + runners[:k]:
                for _ in range(min(block, reps - i * block)):
                    if r.max_reps is not None and len(times[r.name]) >= r.max_reps:
                        break
                    r.clear()
                    if before is not None:
                        before()
                    times[r.name].append(clock.time(r.call))
                    r.clear()
    finally:
        gc.enable()
    return times


def summary(ts: Sequence[float]) -> dict[str, float | int]:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "min_s": min(ts), "q1_s": q[0], "q3_s": q[2], "reps": len(ts)}


# ----------------------------------------------------------------------------- allocator
class Malloc:
    """glibc's mallopt, to switch 64 MiB outputs from fresh mmaps to recycled heap blocks."""

    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4

    def __init__(self) -> None:
        self.libc = None
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            self.libc = ctypes.CDLL("libc.so.6")

    @property
    def available(self) -> bool:
        return self.libc is not None

    def recycle(self) -> None:
        assert self.libc is not None
        ok = self.libc.mallopt(self.M_MMAP_MAX, 0) and self.libc.mallopt(self.M_TRIM_THRESHOLD, 2**31 - 1)
        if not ok:
            raise RuntimeError("mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD")


# ----------------------------------------------------------------------------- bandwidth probe
def bandwidth_probe(clock: Clock, device: torch.device, reps: int, alloc: str) -> dict[str, Any]:
    n = PROBE_MIB * 2**20 // 4
    a, b, c = (torch.empty(n, device=device) for _ in range(3))
    b.uniform_()
    c.uniform_()
    a.zero_()
    nbytes = n * 4
    runners = [
        Runner("copy", lambda: a.copy_(b)),
        Runner("triad", lambda: torch.add(b, c, alpha=0.5, out=a)),
        Runner("clone", lambda: b.clone()),  # fresh output: first-touch page faults on CPU
    ]
    times = run_round_robin(clock, runners, reps, 2)
    moved = {"copy": 2 * nbytes, "triad": 3 * nbytes, "clone": 2 * nbytes}
    out: dict[str, Any] = {"alloc": alloc, "buffer_MiB": PROBE_MIB}
    for k, ts in times.items():
        out[f"{k}_GBps"] = moved[k] / statistics.median(ts) / 1e9
        out[f"{k}_GBps_samples"] = [moved[k] / t / 1e9 for t in ts]
    return out


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
def fmt_t(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


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


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "python", "cpp", "cuda"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return {"commit": head.stdout.strip() or None, "dirty_sources": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty_sources": None}


def cache_sizes() -> dict[str, int]:
    """Cache size by level ("L1d", "L2", "L3") as cpu0's sysfs reports it (what the guest
    is told: on a VM the L3 is shared with whatever else runs on the host); {} elsewhere."""
    out: dict[str, int] = {}
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (d / "level").read_text().strip()
            kind = (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size:
            continue
        mult = units.get(size[-1], 1)
        digits = size[:-1] if size[-1] in units else size
        if digits.isdigit():
            out[f"L{level}" + ("d" if kind == "Data" else "")] = int(digits) * mult
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "cpu family", "model", "flags") and k not in cpu:
                cpu[k] = v.strip()
    except OSError:
        pass
    flags = set(cpu.pop("flags", "").split())
    thp = "unknown"
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    info = {
        "cpu_model": cpu.get("model name", platform.processor()),
        "cache_bytes": cache_sizes(),
        "cpu_family": cpu.get("cpu family"),
        "cpu_model_number": cpu.get("model"),
        "avx512f": "avx512f" in flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "transparent_hugepage": thp,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "genloss_build_info": genloss.build_info(),
        "genloss_git": git_state(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
def print_summary(result: dict, probes: list, copy: float, json_path: str | None) -> None:
    """The closing lines of a run (bandwidth, goals, load) and the optional JSON file."""
    print()
    sessions = ", ".join(f"{pr['copy_GBps']:.1f}" for pr in probes)
    print(f"copy bandwidth, run-wide median: {copy:.1f} GB/s (probe sessions: {sessions}); "
          f"triad {result['probe']['triad_GBps']:.1f} GB/s")  # fmt: skip
    print("goals (reported, not asserted):")
    for g in result["goals"]:
        note = f" [{g['note']}]" if g.get("note") else ""
        print(
            f"  [{'met' if g['met'] else 'NOT met':>7}] {g['goal']}: {g['case']} ({g['alloc']}) {g['measured']}{note}"
        )
    print(f"load average at end: {result['loadavg_end']}; total {result['duration_s']:.0f} s")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats; B=256 and l1_loss [16M] only (< 60 s)"
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
