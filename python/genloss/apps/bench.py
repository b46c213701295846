r"""``genloss bench``: a quick side-by-side benchmark (under a minute on 2 cores).

Per family, the genloss torch op against the same loss written in torch eager
and under ``torch.compile``, forward+backward, with the ratio and the achieved
GB/s against a copy-bandwidth probe measured in the same run. Each time is the
median of the repeats with its quartiles (q1, q3): a wide spread says the machine
was busy, and a load average above the core count is warned about before the run.
The full benchmarks (more sizes, forward-only, the NumPy reference, native calls)
are in ``bench/`` of the repository.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Case:
    family: str
    name: str
    make: Callable[[Any, str], tuple]  # (torch, device) -> tensors
    ours: Callable[..., Any]
    eager: Callable[..., Any]
    nbytes: Callable[[tuple], int]  # minimal bytes: inputs read once + gradients written once


def quartiles(times: list[float]) -> dict[str, float]:
    """``{"median", "q1", "q3"}`` of ``times``: linear interpolation between order statistics
    at (n - 1) p (``statistics.quantiles``' inclusive method, NumPy's default), which stays
    within the times for any n (the exclusive method extrapolates below the fastest of 2
    repeats); one time is its own quartiles."""
    if len(times) < 2:
        return {"median": times[0], "q1": times[0], "q3": times[0]}
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3}


def load1() -> float | None:
    """The 1-minute load average, None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_warning(load1: float | None) -> str | None:
    """One line when the load average ``load1`` exceeds the core count (other processes
    compete for the cores: the times are slower and noisier than the machine's), else None."""
    cores = os.cpu_count() or 1
    if load1 is None or load1 <= cores:
        return None
    return f"warning: load average {load1:.2f} > {cores} cores: other processes share the CPUs, times are inflated"


def _timeit(torch: Any, fn: Callable[[], Any], device: str, reps: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return quartiles(times)


def copy_bandwidth(torch: Any, device: str, mib: int = 128, reps: int = 10) -> float:
    """GB/s of dst.copy_(src) on preallocated tensors, counting read + write."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = _timeit(torch, lambda: dst.copy_(src), device, reps)["median"]
    return 2 * 4 * n / t / 1e9


def _fwd_bwd(torch: Any, loss_fn: Callable[..., Any], tensors: tuple) -> Callable[[], None]:
    leaves = [t for t in tensors if t.requires_grad]

    def run() -> None:
        for t in leaves:
            t.grad = None
        loss_fn(*tensors).backward()

    return run


def _cases(torch: Any) -> list[Case]:
    import torch.nn.functional as F

    import genloss.torch as gl

    def logits(n):
        return lambda t, d: (
            t.randn(n, device=d, requires_grad=True),
            t.randn(n, device=d, requires_grad=True),
        )

    def images(shape):
        return lambda t, d: (t.randn(*shape, device=d, requires_grad=True), t.randn(*shape, device=d))

    def channels_last(make):
        return lambda t, d: tuple(
            x.detach().contiguous(memory_format=t.channels_last).requires_grad_(x.requires_grad)
            for x in make(t, d)
        )

    def elbo(b, dx, dz):
        return lambda t, d: (
            t.randn(b, dx, device=d, requires_grad=True),
            t.rand(b, dx, device=d),
            t.randn(b, dz, device=d, requires_grad=True),
            t.randn(b, dz, device=d, requires_grad=True),
        )

    def eager_elbo(r, x, mu, lv):
        rec = F.binary_cross_entropy_with_logits(r, x, reduction="sum") / r.shape[0]
        kl = 0.5 * (mu.pow(2) + lv.exp() - 1 - lv).sum() / r.shape[0]
        return rec + kl

    def gmm_inputs(n, k, dd):
        return lambda t, d: (
            t.randn(n, dd, device=d),
            t.randn(k, device=d, requires_grad=True),
            t.randn(k, dd, device=d, requires_grad=True),
            (0.1 * t.randn(k, dd, device=d)).requires_grad_(),
        )

    def eager_gmm(x, lg, m, lv):
        comp = -0.5 * ((x[:, None, :] - m) ** 2 * torch.exp(-lv) + lv + 1.8378770664093453).sum(-1)
        return torch.logsumexp(comp + torch.log_softmax(lg, 0), dim=1).mean()

    def edm_inputs(shape, sigma_data=0.5):
        b = shape[0]
        return lambda t, d: (
            t.randn(*shape, device=d, requires_grad=True),
            t.randn(*shape, device=d) * sigma_data,
            t.randn(*shape, device=d),
            (t.randn(b, device=d) * 1.2 - 1.2).exp(),  # EDM's lognormal sigma (P_mean -1.2, P_std 1.2)
        )

    def eager_edm(Fx, x0, n, s, sd=0.5):  # EDM's training loss as its reference code writes it
        sb = s.reshape(-1, *([1] * (Fx.ndim - 1)))
        c_skip = sd**2 / (sb**2 + sd**2)
        c_out = sb * sd / (sb**2 + sd**2).sqrt()
        lam = (sb**2 + sd**2) / (sb * sd) ** 2
        D = c_skip * (x0 + sb * n) + c_out * Fx
        return (lam * (D - x0) ** 2).mean()

    def flow_inputs(shape):
        return lambda t, d: (
            t.randn(*shape, device=d, requires_grad=True),
            t.randn(*shape, device=d),
            t.randn(*shape, device=d),
            t.rand(shape[0], device=d),
        )

    def samples(n, dd):
        return lambda t, d: (t.randn(n, dd, device=d, requires_grad=True), t.randn(n, dd, device=d) + 0.5)

    def eager_mmd(x, y):  # unbiased rbf MMD^2, bandwidth 8, through cdist
        def k(a, b):
            return torch.exp(-torch.cdist(a, b).square() / 128.0)

        kxx, kyy = k(x, x), k(y, y)
        n, m = x.shape[0], y.shape[0]
        return (
            (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2.0 * k(x, y).mean()
        )

    def four(ts: tuple) -> int:  # inputs read once + gradients written once
        read = sum(t.numel() * t.element_size() for t in ts)
        return read + sum(t.numel() * t.element_size() for t in ts if t.requires_grad)

    cases = [
        Case("gan", "gan_d_loss B=65536", logits(65536), gl.gan_d_loss,
             lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(), four),
        Case("gan", "gan_d_loss B=256", logits(256), gl.gan_d_loss,
             lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(), four),
        Case("gan", "l1_loss 4M", images((4, 4, 512, 512)), gl.l1_loss, F.l1_loss, four),
        Case("gan", "l1_loss 4M channels_last", channels_last(images((4, 4, 512, 512))), gl.l1_loss, F.l1_loss,
             four),
    ]  # fmt: skip
    if hasattr(gl, "negative_elbo"):
        cases += [
            Case("vae", "negative_elbo B=256 D=784", elbo(256, 784, 64), gl.negative_elbo, eager_elbo, four),
            Case("vae", "negative_elbo 4M", elbo(16, 262144, 64), gl.negative_elbo, eager_elbo, four),
            Case("vae", "gmm_log_likelihood N=20000 K=16 D=8", gmm_inputs(20000, 16, 8), gl.gmm_log_likelihood,
                 eager_gmm, four),
        ]  # fmt: skip
    cases += [
        Case("diffusion", "eps_mse_loss 4M", images((16, 4, 256, 256)), gl.eps_mse_loss, F.mse_loss, four),
        Case("flow", "flow_matching_loss 4M", flow_inputs((16, 4, 256, 256)), gl.flow_matching_loss,
             lambda p, x0, n, t: (p - (n - x0)).square().mean(), four),
        Case("flow", "denoiser_loss (EDM) 4M", edm_inputs((16, 4, 256, 256)), gl.denoiser_loss, eager_edm, four),
        Case("metrics", "mmd2 rbf N=M=2048 D=64", samples(2048, 64),
             lambda x, y: gl.mmd2(x, y, bandwidths=[8.0]), eager_mmd, four),
    ]  # fmt: skip
    return cases


def run_bench(
    device: str = "cpu",
    compile: bool = True,
    reps: int = 7,
    families: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Run every case; returns ``{'device', 'copy_gbps', 'build', 'load1', 'load_warning', 'rows'}``.

    Per row, for ``genloss``, ``eager`` and ``compile``: ``<name>_s`` the median time in
    seconds and ``<name>_q1_s``, ``<name>_q3_s`` its quartiles (``compile_*`` None without
    compile); ``vs_eager`` and ``vs_compile`` are ratios of medians. The load warning
    (:func:`load_warning`) is printed to stderr before the first timing.
    """
    import torch

    import genloss

    load = load1()  # before the run: the run's own threads raise it
    warning = load_warning(load)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    cases = _cases(torch)
    if families:
        known = sorted({c.family for c in cases})
        unknown = sorted(set(families) - set(known))
        if unknown:
            raise ValueError(f"unknown family {unknown}; available: {known}")
        cases = [c for c in cases if c.family in families]
    bw = copy_bandwidth(torch, device)
    rows = []
    for i, c in enumerate(cases):
        if progress:
            print(f"[{i + 1}/{len(cases)}] {c.family}: {c.name}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        ts = c.make(torch, device)
        t_ours = _timeit(torch, _fwd_bwd(torch, c.ours, ts), device, reps)
        t_eager = _timeit(torch, _fwd_bwd(torch, c.eager, ts), device, reps)
        t_comp = None
        if compile:
            compiled = torch.compile(c.eager)
            t_comp = _timeit(torch, _fwd_bwd(torch, compiled, ts), device, reps)
        nb = c.nbytes(ts)
        row: dict[str, Any] = {"family": c.family, "case": c.name}
        for name, t in (("genloss", t_ours), ("eager", t_eager), ("compile", t_comp)):
            row[f"{name}_s"] = None if t is None else t["median"]
            row[f"{name}_q1_s"] = None if t is None else t["q1"]
            row[f"{name}_q3_s"] = None if t is None else t["q3"]
        row.update(
            bytes=nb,
            genloss_gbps=nb / t_ours["median"] / 1e9,
            vs_eager=t_eager["median"] / t_ours["median"],
            vs_compile=None if t_comp is None else t_comp["median"] / t_ours["median"],
        )
        rows.append(row)
    return {
        "device": device,
        "copy_gbps": bw,
        "build": genloss.build_info(),
        "load1": load,
        "load_warning": warning,
        "rows": rows,
    }


def _spread(r: dict, name: str) -> str:
    """``median (q1-q3)`` of one competitor in ms, or ``-`` when it did not run."""
    if r[f"{name}_s"] is None:
        return "-"
    return f"{r[f'{name}_s'] * 1e3:.3g} ({r[f'{name}_q1_s'] * 1e3:.3g}-{r[f'{name}_q3_s'] * 1e3:.3g})"


def format_table(result: dict) -> str:
    bw = result["copy_gbps"]
    times = ("genloss", "eager", "compile")
    cells = [[_spread(r, n) for n in times] for r in result["rows"]]
    w = [max([len(n) + 3] + [len(c[j]) for c in cells]) for j, n in enumerate(times)]
    fw = max([6] + [len(r["family"]) for r in result["rows"]])
    head = (
        f"{'family':{fw}s} {'case':38s} "
        + " ".join(f"{n + ' ms':>{w[j]}s}" for j, n in enumerate(times))
        + f" {'x eager':>8s} {'x compile':>9s} {'GB/s':>7s} {'% copy':>7s}"
    )
    lines = [
        f"device {result['device']}, same-run copy bandwidth {bw:.1f} GB/s; fwd+bwd times in ms, "
        f"median (q1-q3) of the repeats; ratios of medians",
        head,
    ]
    for r, c in zip(result["rows"], cells, strict=True):
        vc = "-" if r["vs_compile"] is None else f"{r['vs_compile']:.2f}"
        lines.append(
            f"{r['family']:{fw}s} {r['case']:38s} "
            + " ".join(f"{c[j]:>{w[j]}s}" for j in range(len(times)))
            + f" {r['vs_eager']:8.2f} {vc:>9s} {r['genloss_gbps']:7.2f} {100 * r['genloss_gbps'] / bw:6.1f}%"
        )
    if any(r["genloss_gbps"] > bw for r in result["rows"]):
        # not an error (bench/README.md): the probe's copy_ moves 3 bytes per 2 it counts (each
        # destination line is read before it is written), genloss's streamed outputs only those
        # counted; and a case smaller than the probe's 128 MiB may stay partly in cache
        lines.append(
            "% copy above 100 is not an error: copy_ moves 3 bytes for the 2 it counts (it reads each "
            "destination line first), genloss's streamed outputs only the bytes counted, and a case "
            "smaller than the probe's 128 MiB may stay partly in cache"
        )
    return "\n".join(lines)
