"""The ``genloss`` command: ``demo``, ``verify``, ``bench``, ``info``.

    genloss demo     GAN objectives, VAE, DDPM, flow, EDM, consistency, VQ-VAE on 2-D toy data, 3 seeds: figure + tables
    genloss verify   every op x every backend against the NumPy reference on fresh inputs (seed printed)
    genloss bench    a quick benchmark: genloss vs torch eager vs torch.compile
    genloss info     what was built (CUDA, CPU instruction set, OpenMP threads)

Also ``python -m genloss``. A command whose packages are missing (``demo``: torch,
matplotlib and tqdm; ``bench``: torch) stops before any work with one line naming what to
install, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

# What each command imports beyond the library's own numpy, and the extra of
# pyproject.toml that installs it (``verify`` and ``info`` run without torch).
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "demo": (("torch", "matplotlib", "tqdm"), "demo"),  # genloss.apps.demo.REQUIRES
    "bench": (("torch",), "bench"),
}


def missing_dependencies(command: str) -> str | None:
    """One line saying what to install when a package ``command`` needs does not import; else None.

    Checked before any work so that a missing package costs no training time; a
    package that is installed but fails to import is named with its error.
    """
    packages, extra = NEEDS.get(command, ((), ""))
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # the package is there, one of its own imports is not
                return f"genloss {command}: {name} is installed but fails to import ({err})"
            missing.append(name)
        except ImportError as err:
            return f"genloss {command}: {name} is installed but fails to import ({err})"
    if not missing:
        return None
    return f"genloss {command} needs {' and '.join(missing)}: pip install 'genloss[{extra}]'"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _folder(text: str) -> str:
    if not text.strip():  # Path("") is the current folder: writing there unasked is a surprise
        raise argparse.ArgumentTypeError("expected a folder name, got an empty string")
    return text


def _device(text: str) -> str:
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be 'cpu' or 'cuda', got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genloss",
        description="Verified losses, bounds and kernels of generative models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each subcommand has its own --help.",
    )
    sub = p.add_subparsers(dest="command", metavar="{demo,verify,bench,info}")
    sub.required = True

    d = sub.add_parser(
        "demo",
        help="compare GAN objectives, VAE, DDPM, flow, EDM, consistency, VQ-VAE on 2-D toy data (needs torch, "
        "matplotlib, tqdm)",
        description="Train small MLPs with genloss's torch ops: GANs under four objectives (non-saturating, "
        "hinge, LSGAN, WGAN-GP) on the ring of 8 Gaussians and two of them on the grid of 25 (--methods names "
        "the others: gan-minimax, fgan-js, ragan); a VAE, DDPM, rectified flow, EDM, a one-step consistency model "
        "distilled from the EDM teacher and a VQ-VAE on a swiss roll; 3 seeds each (about 3 minutes on 2 cores; --quick: "
        "under 40 s). Writes into --out a figure (samples, density heatmaps, metric-vs-step curves) and the "
        "tables as Markdown, CSV and JSON (modes covered, high-quality fraction, MMD^2 to held-out data with the "
        "data's floor, precision/recall/density/coverage when available; mean +- std over seeds), and prints "
        "the Markdown. Same seed -> same numbers on CPU. Needs torch, matplotlib, tqdm: "
        "pip install 'genloss[demo]'.",
    )
    d.add_argument(
        "--out",
        type=_folder,
        default="genloss-demo",
        help="output folder (default: %(default)s; existing outputs are replaced, with a line saying so)",
    )
    d.add_argument("--quick", action="store_true", help="the CI-sized run: 2 seeds, a tenth of the steps")
    d.add_argument(
        "--steps", type=_positive_int, default=None, help="training steps per method (default: each method's)"
    )
    d.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    d.add_argument(
        "--seeds", type=_positive_int, default=None, help="seeds per method (default: 3; 2 with --quick)"
    )
    d.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (default: min(2, CPU cores))"
    )
    d.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default: %(default)s)")
    d.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="these methods only, or methods outside the default set (default: the default set above)",
    )
    d.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        help="run every chosen method on these (ring, grid, swiss_roll; default: GANs on ring and grid, "
        "the rest on swiss_roll)",
    )
    d.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads per worker (default: %(default)s; 1 is fastest on a busy 2-core machine)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    v = sub.add_parser(
        "verify",
        help="check every op on every backend against the NumPy reference",
        description="For every registered op and every available backend (native CPU, torch CPU, and CUDA where "
        "present) compare value and gradients against the float64 NumPy reference on fresh random inputs; print "
        "the seed, then op x backend with the worst relative errors and pass/fail against the tolerance table; "
        "exit 1 on any failure (rerun with the printed --seed to reproduce it), 2 when no chosen op can run here "
        "(torch-only ops without torch). --json prints one object: seed, version, backends, rows, skipped.",
    )
    v.add_argument("--json", action="store_true", help="print JSON instead of a table")
    v.add_argument(
        "--seed",
        type=int,
        default=None,
        help="input seed (default: a fresh one, printed to reproduce a failure)",
    )
    v.add_argument("--ops", nargs="+", default=None, help="only these ops")

    b = sub.add_parser(
        "bench",
        help="quick benchmark (< 1 minute): genloss vs torch eager vs torch.compile (needs torch)",
        description="Per op family, the genloss torch op vs the same loss in torch eager and under torch.compile, "
        "forward+backward: median and quartiles of the repeats, ratios of medians, and GB/s against a same-run "
        "copy-bandwidth probe; a warning when the load average exceeds the core count. The full benchmarks are "
        "in bench/ of the repository. Needs torch: pip install 'genloss[bench]'.",
    )
    b.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default: %(default)s)")
    b.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves the compile time)")
    b.add_argument("--family", nargs="+", default=None, help="only these op families (e.g. gan vae)")
    b.add_argument(
        "--reps", type=_positive_int, default=7, help="timed repeats per case (default: %(default)s)"
    )
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("info", help="what was built", description="Print genloss.build_info() as JSON.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = _run(args, argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe then raises where it is caught
        return status
    except KeyboardInterrupt:
        # Ctrl-C: one line, the shell's status for SIGINT, no traceback; the demo has stopped
        # its workers and writes its outputs only after the last run (all four, or none)
        more = "; nothing written" if args.command == "demo" else ""
        print(f"genloss {args.command}: interrupted{more}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`genloss info | head -1`): stop quietly, as a tool killed by
        # SIGPIPE would; stdout to devnull so the interpreter's final flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.command == "info":
        import genloss

        print(json.dumps(genloss.build_info(), indent=2))
        return 0
    missing = missing_dependencies(args.command)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if args.command in ("demo", "bench") and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("genloss: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    if args.command == "demo":
        from . import demo

        try:
            results = demo.run_demo(
                args.out,
                quick=args.quick,
                steps=args.steps,
                seed=args.seed,
                seeds=args.seeds,
                device=args.device,
                methods=args.methods,
                progress=not args.no_progress,
                datasets=args.dataset,
                threads=args.threads,
                workers=args.workers,
                command=" ".join(["genloss", *(sys.argv[1:] if argv is None else argv)]),
            )
        except ValueError as err:  # e.g. an unknown method name
            print(f"genloss demo: {err}", file=sys.stderr)
            return 2
        except demo.OutputError as err:  # trained and scored, but not written: show the tables anyway
            print(demo.format_table(err.result))
            sys.stdout.flush()
            print(f"genloss demo: {err}", file=sys.stderr)
            return 1
        print(demo.format_table(results))
        return 0
    if args.command == "verify":
        from . import verify

        try:
            report = verify.run_verify(seed=args.seed, ops=args.ops)
        except ValueError as err:
            print(f"genloss verify: {err}", file=sys.stderr)
            return 2
        ok = all(r["ok"] for r in report["rows"])
        if args.json:
            print(json.dumps(report, indent=1))
            if not ok:  # stdout stays one JSON object
                print(verify.reproduce_line(report), file=sys.stderr)
        else:
            print(verify.format_table(report))
        return 0 if ok else 1
    from . import bench

    try:
        result = bench.run_bench(
            device=args.device,
            compile=not args.no_compile,
            reps=args.reps,
            families=args.family,
            progress=not args.json,
        )
    except ValueError as err:
        print(f"genloss bench: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else bench.format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
