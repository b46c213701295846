#!/usr/bin/env python
r"""bfloat16 fwd+bwd through genloss.torch: straight to the 16-bit kernels vs the float32 copies.

One command, one process::

    python bench/bench_low.py [--size N] [--reps R] [--device cpu|cuda] [--json OUT]

Competitors, round-robin (``harness.run_round_robin``), per case, fwd+bwd, ``loss.backward()``:

* ``direct``: the torch op on bfloat16 tensors (what an eager call does since session 16:
  loaded as bfloat16, computed in float32, float32 value, bfloat16 gradients);
* ``widened``: the same call with the op's bfloat16 path turned off (``LossOp.bf16_direct``):
  float32 copies of the inputs, the float32 kernels, the gradients rounded to bfloat16
  (what every bfloat16 call did before);
* ``float32``: the torch op on float32 tensors of the same values;
* ``eager``: the composite as a user writes it, on the bfloat16 tensors (torch's own
  bfloat16 kernels);
* ``copy``: ``dst.copy_(src)`` of bfloat16 tensors moving the case's minimal bytes.

``--native``: the same cases through ``genloss.native`` (value and the first input's gradient,
one call, no autograd) on float32, bfloat16 and float16 tensors, and ``copy`` of the 16-bit
bytes: what the CPU engine's 16-bit loop costs against its float32 loop (since session 18 it
converts float16 by F16C a 16-element block at a time; bfloat16 element by element).

Bytes counted (GB/s): the inputs read once, the one gradient written once. Cases
(B = 16 rows): ``l1_loss`` (x, y; grad of x), ``flow_matching_loss`` (pred, x0, noise, t,
no weighting; grad of pred), ``eps_mse_loss`` (eps_pred, eps; grad of eps_pred).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

import genloss.torch as gt
import harness as bh
from genloss.torch._op import _LIVE


def cases(n: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    b = 16

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, y, z = r(b, n // b), r(b, n // b), r(b, n // b)
    t = torch.rand(b, generator=g).to(device)
    yield (
        "l1_loss", (x, y), lambda a, c: gt.l1_loss(a, c), lambda a, c: (a - c).abs().mean(), 3,
    )  # fmt: skip
    yield (
        "flow_matching_loss", (x, y, z, t), lambda p, x0, e, tt: gt.flow_matching_loss(p, x0, e, tt),
        lambda p, x0, e, tt: (p - (e - x0)).square().mean(), 4,
    )  # fmt: skip
    yield (
        "eps_mse_loss", (x, y), lambda a, c: gt.eps_mse_loss(a, c), lambda a, c: (a - c).square().mean(), 3,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1 << 22, help="elements per tensor (default 4M)")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--native", action="store_true", help="genloss.native on float32 / bfloat16 / float16")
    args = ap.parse_args()
    device = torch.device(args.device)
    clock = bh.Clock(device)
    result = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": bh.machine_info(device),
        "git": bh.git_state(),
        "size": args.size,
        "cases": {},
    }
    if args.native:
        native(args, device, clock, result)
    else:
        through_torch(args, device, clock, result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _fmt(t: float) -> str:
    return f"{t * 1e3:8.2f}ms" if t >= 1e-3 else f"{t * 1e6:8.1f}us"


def _store(result: dict, name: str, times: dict, nbytes: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    result["cases"][name] = {
        k: {**bh.summary(v), "bytes": nbytes[k], "GBps": nbytes[k] / med[k] / 1e9} for k, v in times.items()
    }
    return med


def native(args, device, clock, result) -> None:
    import genloss.native as gn

    kinds = ("float32", "bfloat16", "float16")
    print(
        f"genloss.native value + first gradient, {args.size} elements per tensor, {device}, median of {args.reps}"
    )
    print(
        f"{'case':<20} "
        + " ".join(f"{k:>10}" for k in (*kinds, "copy16"))
        + "  float32/float16 float32/bfloat16"
    )
    for name, ins32, _op, _eager, nbytes_per_el in cases(args.size, device):
        fn = getattr(gn, name)
        need = (True,) + (False,) * (len(ins32) - 1)  # (each case's inputs: the op's differentiable ones)
        runners, nbytes = [], {}
        for k in kinds:
            ins = [a.to(getattr(torch, k)) for a in ins32]
            runners.append(bh.Runner(k, lambda fn=fn, ins=ins, need=need: fn(*ins, need_grad=need)))
            nbytes[k] = nbytes_per_el * ins32[0].numel() * ins[0].element_size()
        src = torch.empty(nbytes["float16"] // 4, dtype=torch.float16, device=device)
        dst = torch.empty_like(src)
        runners.append(bh.Runner("copy16", lambda dst=dst, src=src: dst.copy_(src)))
        nbytes["copy16"] = nbytes["float16"]
        med = _store(result, name, bh.run_round_robin(clock, runners, args.reps, 2), nbytes)
        row = " ".join(_fmt(med[k]) for k in (*kinds, "copy16"))
        print(
            f"{name:<20} {row}  {med['float32'] / med['float16']:.2f}x {med['float32'] / med['bfloat16']:.2f}x"
        )


def through_torch(args, device, clock, result) -> None:
    print(f"bfloat16 fwd+bwd, {args.size} elements per tensor, {device}, median of {args.reps}")
    print(
        f"{'case':<20} {'direct':>10} {'widened':>10} {'float32':>10} {'eager':>10} {'copy':>10}  widened/direct"
    )
    for name, ins32, op, eager, nbytes_per_el in cases(args.size, device):
        ins16 = [a.to(torch.bfloat16) for a in ins32]
        record = _LIVE[name]

        def step(fn, ins, direct=True, record=record):
            def call():
                record.bf16_direct = direct
                a = ins[0].detach().requires_grad_(True)
                fn(a, *ins[1:]).backward()
                return a.grad

            return call

        nbytes = nbytes_per_el * ins16[0].numel() * 2  # bfloat16: 2 bytes an element
        src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        runners = [
            bh.Runner("direct", step(op, ins16)),
            bh.Runner("widened", step(op, ins16, direct=False)),
            bh.Runner("float32", step(op, ins32)),
            bh.Runner("eager", step(eager, ins16)),
            bh.Runner("copy", lambda dst=dst, src=src: dst.copy_(src)),
        ]
        times = bh.run_round_robin(clock, runners, args.reps, 2)
        record.bf16_direct = True
        med = _store(result, name, times, dict.fromkeys(times, nbytes))
        row = " ".join(_fmt(med[k]) for k in ("direct", "widened", "float32", "eager", "copy"))
        print(f"{name:<20} {row}  {med['widened'] / med['direct']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
