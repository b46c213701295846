#!/usr/bin/env python
r"""Small calls of the flow family (the 2026 losses): fwd+bwd through genloss.torch vs the
same loss written in torch eager and under ``torch.compile``, hot, as in a training loop.

One command, one process::

    python bench/bench_small.py [--rows B] [--cols N] [--reps R] [--block K] [--only TEXT] [--json OUT]

At B = 16 samples of N = 16 elements (the defaults) no loss is bandwidth-bound: the time is
the per-call overhead of each route (Python, autograd, the allocator, the plan cache), which
is what a unit-test-sized model, a toy training loop or a loss on per-sample scalars pays.
The same tensors are reused call after call (their ``.grad`` dropped inside every timed call,
as ``zero_grad(set_to_none=True)`` would), so code, data and allocator are as warm as in a
loop over the loss. Competitors take turns (``harness.run_round_robin``, ``--block`` calls
per turn, default 25, rotating order); median and quartiles of ``--reps`` calls.

Cases (float32, ``reduction='mean'``, only the network output requires grad): the composites
of ``bench_flow.py`` for ``flow_matching_loss`` (cosmap), ``denoiser_loss`` (EDM) and
``pseudo_huber_loss``; EDM2's ``denoiser_loss`` with a learned ``logvar`` (which requires grad
too), iCT's ``consistency_training_loss``, ``meanflow_loss`` and DMD2's ``vsd_loss``, each as
its paper's code writes it. Before timing, every composite's value and first gradient are
checked against the op's (``check`` in the JSON): a ratio compares the same loss.

Then three ``genloss.native`` calls with a per-feature (N,) or per-sample (B, 1) log-variance
(``gaussian_nll``, ``normal_kl``: value and every gradient in one call) against the eager and
compiled fwd+bwd of the same loss; the value and the (N,) gradient are checked the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import genloss.native as gn
import genloss.torch as gt
import harness as bh
from bench_flow import SIGMA_DATA, _col, _rest, denoiser_composite, flow_composite, huber_composite

ICT_C = 0.00054


def _ct_composite(fs, ft, lo, hi):
    """iCT: pseudo-Huber of (student, stop-gradient target), weighted 1 / (sigma_next - sigma_i)."""
    c = ICT_C * math.sqrt(fs[0].numel())
    return ((torch.sqrt(((fs - ft) ** 2).sum(dim=_rest(fs)) + c**2) - c) / (hi - lo)).mean()


def _edm2_composite(F, x0, noise, sigma, logvar):
    """EDM2's loss with the learned uncertainty: (lambda / e^u) mean (D - x0)^2 + u per sample."""
    s = _col(sigma, F.dim())
    sd = SIGMA_DATA
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    D = c_skip * (x0 + s * noise) + c_out * F
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight / logvar.exp() * ((D - x0) ** 2).mean(dim=_rest(F)) + logvar).mean()


def _meanflow_composite(u, v, du_dt, t, r):
    """MeanFlow (p = 1, eps = 1e-3): sg(w) ||u - u_tgt||^2 with u_tgt = v - (t - r) du/dt."""
    u_tgt = (v - _col(t - r, u.dim()) * du_dt).detach()
    sq = ((u - u_tgt) ** 2).sum(dim=_rest(u))
    w = 1.0 / (sq.detach() + 1e-3)
    return (w * sq).mean()


def _vsd_composite(x, fake, real):
    """DMD2: the distribution-matching gradient as 0.5 mse(x, sg(x - grad))."""
    with torch.no_grad():
        w = 1.0 / ((x - real).abs().mean(dim=_rest(x), keepdim=True) + 1e-6)
        grad = w * (fake - real)
    return 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())


def cases(b: int, n: int) -> list[tuple[str, tuple, Callable, Callable, int]]:
    """(name, inputs, op, composite, how many leading inputs require grad)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, y, z = r(b, n), r(b, n), r(b, n)
    t = torch.sigmoid(r(b))
    sigma = torch.exp(r(b) * 1.2 - 1.2)
    lo = torch.rand(b, generator=g) * 10
    hi = lo + 0.5 + torch.rand(b, generator=g)
    tr = torch.rand(b, generator=g) * t
    return [
        ("flow_matching_loss", (x, y, z, t), lambda *a: gt.flow_matching_loss(*a, "cosmap"), flow_composite, 1),
        ("denoiser_loss", (x, y, z, sigma), lambda *a: gt.denoiser_loss(*a, SIGMA_DATA, "edm"),
         denoiser_composite, 1),
        ("denoiser_loss+logvar", (x, y, z, sigma, 0.1 * r(b)),
         lambda f, x0, e, s, u: gt.denoiser_loss(f, x0, e, s, SIGMA_DATA, "edm", logvar=u), _edm2_composite, 1),
        ("consistency_training", (x, x + 0.1 * y, lo, hi), lambda *a: gt.consistency_training_loss(*a),
         _ct_composite, 1),
        ("pseudo_huber_loss", (x, x + 0.1 * y), lambda *a: gt.pseudo_huber_loss(*a), huber_composite, 1),
        ("meanflow_loss", (x, y, z, t, tr), lambda *a: gt.meanflow_loss(*a), _meanflow_composite, 1),
        ("vsd_loss", (x, y, z), lambda *a: gt.vsd_loss(*a), _vsd_composite, 1),
    ]  # fmt: skip


def _step(fn: Callable, ins: tuple, logvar: bool) -> Callable[[], None]:
    """One fwd+bwd on ``ins`` (the first input, and a logvar last, require grad; their .grad dropped)."""
    a = ins[0].detach().clone().requires_grad_(True)
    rest = list(ins[1:])
    if logvar:
        rest[-1] = rest[-1].detach().clone().requires_grad_(True)
    leaves = [a, rest[-1]] if logvar else [a]

    def call():
        for leaf in leaves:
            leaf.grad = None
        fn(a, *rest).backward()

    return call


def check(op: Callable, comp: Callable, ins: tuple, logvar: bool) -> dict[str, float]:
    """Relative differences of value and d/d(first input) between the op and the composite."""
    out = {}
    grads = []
    for fn in (op, comp):
        a = ins[0].detach().double().requires_grad_(True)
        rest = [v.double() for v in ins[1:]]
        if logvar:
            rest[-1] = rest[-1].detach().requires_grad_(True)
        v = fn(a, *rest)
        v.backward()
        grads.append((float(v.detach()), a.grad))
    (v0, g0), (v1, g1) = grads
    out["value"] = abs(v0 - v1) / max(abs(v1), 1e-300)
    out["grad"] = float((g0 - g1).norm() / max(float(g1.norm()), 1e-300))
    return out


LOG_2PI = math.log(2.0 * math.pi)


def _gnll_eager(m, x, lv):
    """A VAE decoder's Gaussian NLL with a learned (broadcast) log-variance, per sample, mean."""
    return (0.5 * (LOG_2PI + lv + (x - m) ** 2 * torch.exp(-lv))).sum(1).mean()


def _nkl_eager(m1, lv1, m2, lv2):
    """Elementwise KL(N(m1, e^lv1) || N(m2, e^lv2)) with a per-feature lv1, summed."""
    return (0.5 * (lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2) - 1.0)).sum()


def broadcast_cases(b: int, n: int) -> list[tuple[str, tuple, Callable, Callable, Callable]]:
    """genloss.native with a per-feature (N,) or per-sample (B, 1) log-variance (broadcasts the
    engine makes and reduces), value and every gradient in one call, against the eager fwd+bwd of the
    same loss (its (N,) gradient summed by autograd): (name, inputs, native call, eager loss,
    the native value and gradient to check)."""
    g = torch.Generator().manual_seed(1)
    m, x, lv = (
        torch.randn(b, n, generator=g),
        torch.randn(b, n, generator=g),
        0.3 * torch.randn(n, generator=g),
    )
    m2, lv2 = torch.randn(b, n, generator=g), 0.3 * torch.randn(b, n, generator=g)
    lvb = 0.3 * torch.randn(b, 1, generator=g)  # a per-sample log-variance
    return [
        ("gaussian_nll, logvar (N,)", (m, x, lv), lambda a, c, d: gn.gaussian_nll(a, c, d), _gnll_eager,
         lambda a, c, d: (gn.gaussian_nll(a, c, d)[0], gn.gaussian_nll(a, c, d)[1][2])),
        ("normal_kl, logvar1 (N,)", (m, lv, m2, lv2), lambda *a: gn.normal_kl(*a), _nkl_eager,
         lambda *a: (gn.normal_kl(*a)[0].sum(), gn.normal_kl(*a)[1][1])),
        ("gaussian_nll, logvar (B,1)", (m, x, lvb), lambda a, c, d: gn.gaussian_nll(a, c, d), _gnll_eager,
         lambda a, c, d: (gn.gaussian_nll(a, c, d)[0], gn.gaussian_nll(a, c, d)[1][2])),
    ]  # fmt: skip


def _broadcast_runners(ins: tuple, op: Callable, eager: Callable, compiled: Callable | None) -> list:
    """The native call (value and gradients) and the eager / compiled fwd+bwd, on the same data
    (the first input and the (N,) log-variance require grad in the latter)."""
    k = 2 if len(ins) == 3 else 1  # the log-variance's place
    leaves = [t.detach().clone().requires_grad_(i in (0, k)) for i, t in enumerate(ins)]

    def step(fn):
        def call():
            leaves[0].grad = leaves[k].grad = None
            fn(*leaves).backward()

        return call

    runners = [bh.Runner("op", lambda: op(*ins)), bh.Runner("eager", step(eager))]
    if compiled is not None:
        runners.append(bh.Runner("compile", step(compiled)))
    return runners


def _broadcast_check(ins: tuple, eager: Callable, checked: Callable) -> dict[str, float]:
    """Relative differences of the value and of the (N,) log-variance gradient, float64."""
    k = 2 if len(ins) == 3 else 1
    d = [t.double() for t in ins]
    v, gk = checked(*d)
    leaves = [t.clone().requires_grad_(i == k) for i, t in enumerate(d)]
    ve = eager(*leaves)
    ve.backward()
    ref = leaves[k].grad
    return {
        "value": abs(float(v) - float(ve.detach())) / max(abs(float(ve.detach())), 1e-300),
        "grad": float((torch.as_tensor(gk) - ref).norm() / max(float(ref.norm()), 1e-300)),
    }


def _cell(s: dict) -> str:
    """median [q1-q3] in microseconds, 20 wide."""
    text = f"{s['median_s'] * 1e6:.1f} us [{s['q1_s'] * 1e6:.0f}-{s['q3_s'] * 1e6:.0f}]"
    return f"{text:>20}"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16, help="samples B (default 16)")
    ap.add_argument("--cols", type=int, default=16, help="elements per sample N (default 16)")
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--block", type=int, default=25, help="consecutive timed calls per turn (default 25)")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    clock = bh.Clock(torch.device("cpu"))
    result: dict = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/bench_small.py", *sys.argv[1:]]),
        "machine": bh.machine_info(torch.device("cpu")),
        "git": bh.git_state(),
        "rows": args.rows,
        "cols": args.cols,
        "cases": {},
    }
    kinds = ["op", "eager"] + ([] if args.no_compile else ["compile"])
    print(
        f"fwd+bwd, B = {args.rows} x N = {args.cols}, float32, median of {args.reps} (q1-q3), block {args.block}"
    )
    print(
        f"{'case':<22}" + "".join(f"{k:>20}" for k in kinds) + "   eager/op"
        + "  compile/op" * (not args.no_compile) + "  check (value, grad)"
    )  # fmt: skip
    for name, ins, op, comp, _ in cases(args.rows, args.cols):
        if args.only not in name:
            continue
        logvar = name.endswith("+logvar")
        fns = {"op": op, "eager": comp}
        if not args.no_compile:
            fns["compile"] = torch.compile(comp, fullgraph=False, dynamic=False)
        runners = [bh.Runner(k, _step(f, ins, logvar)) for k, f in fns.items()]
        times = bh.run_round_robin(clock, runners, args.reps, 20, block=args.block)
        stats = {k: bh.summary(v) for k, v in times.items()}
        result["cases"][name] = {"times": stats, "check": check(op, comp, ins, logvar)}
        med = {k: s["median_s"] for k, s in stats.items()}
        cells = "".join(_cell(stats[k]) for k in kinds)
        ratios = f"{med['eager'] / med['op']:10.2f}x" + (
            f"{med['compile'] / med['op']:11.2f}x" if "compile" in med else ""
        )
        chk = result["cases"][name]["check"]
        print(f"{name:<22}{cells}{ratios}  {chk['value']:.0e}, {chk['grad']:.0e}")
    print("genloss.native, value and gradients in one call (op) vs the eager / compiled fwd+bwd")
    for name, ins, op, comp, checked in broadcast_cases(args.rows, args.cols):
        if args.only not in name:
            continue
        compiled = None if args.no_compile else torch.compile(comp, fullgraph=False, dynamic=False)
        times = bh.run_round_robin(
            clock, _broadcast_runners(ins, op, comp, compiled), args.reps, 20, block=args.block
        )
        stats = {k: bh.summary(v) for k, v in times.items()}
        result["cases"][name] = {"times": stats, "check": _broadcast_check(ins, comp, checked)}
        med = {k: s["median_s"] for k, s in stats.items()}
        ratios = f"{med['eager'] / med['op']:10.2f}x" + (
            f"{med['compile'] / med['op']:11.2f}x" if "compile" in med else ""
        )
        chk = result["cases"][name]["check"]
        print(
            f"{name:<22}{''.join(_cell(stats[k]) for k in kinds)}{ratios}  {chk['value']:.0e}, {chk['grad']:.0e}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
