r"""The shared harness of the benchmarks in bench/: timing, competitors, bandwidth probe, machine info, JSON.

Imported by ``bench_gan.py``, ``bench_vae.py``, ``bench_diffusion.py``,
``bench_flow.py`` and ``bench_mmd.py`` (``import harness as bh`` from the scripts' own folder), so that
every benchmark times the same way:

* ``Clock``: ``time.perf_counter`` around one call, ``torch.cuda.synchronize`` on
  both sides on CUDA; the result is dropped after the timer stops, for everyone.
* ``Runner`` + ``run_round_robin``: the competitors take turns in a rotating order so
  that the machine's drift hits all of them alike; ``summary``: median, quartiles,
  minimum of the repeats.
* ``Malloc``: glibc's ``mallopt`` switch from fresh mmaps to recycled heap blocks
  (the ``fresh`` / ``recycled`` allocator passes).
* ``bandwidth_probe``: copy / triad / clone on preallocated ``PROBE_MIB`` tensors in
  the same process, the yardstick of every GB/s figure.
* ``machine_info`` (CPU, caches, THP, versions, genloss build and git state) and
  ``print_summary`` (closing lines and the JSON file of a run).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import genloss
except ImportError:  # running from a checkout without installing: use python/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import genloss

MODES = ("fwd+bwd", "fwd")
PROBE_MIB = 128
REF_SLOW_S = 2.0  # the NumPy reference is timed once only when a call takes longer


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


# ----------------------------------------------------------------------------- output
def fmt_t(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


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
