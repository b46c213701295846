r"""The ``genloss demo``: generative-model objectives compared on 2-D toy data, with spread.

Small MLPs are trained with nothing but ``genloss.torch`` for their losses: a GAN under
four objectives with a known story (non-saturating, hinge, LSGAN, WGAN-GP; ``gan-minimax``,
``fgan-js`` and ``ragan`` run when named) on the ring of 8 Gaussians and the 5x5 grid of 25 (where
mode dropping shows), and a VAE, a DDPM, rectified flow, EDM, a one-step consistency
model (distilled from an EDM teacher trained in the same run) and (when genloss has
``vector_quantize``) a VQ-VAE on a swiss roll. Every method runs with 3 seeds and is
scored against held-out data: modes covered and high-quality fraction (mixtures), MMD²
with the data's own floor, and precision / recall / density / coverage when genloss has
``prdc``::

    from genloss.apps.demo import run_demo, format_table
    result = run_demo("out", quick=True)  # out/genloss-demo.{png,md,csv,json}
    print(format_table(result))

Modules: :mod:`.data` (the distributions), :mod:`.metrics`, :mod:`.methods` (models,
losses, the stated hyperparameters), :mod:`.runner` (seeds, workers, the summary),
:mod:`.report` (figure, tables, provenance).
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import metrics as _metrics
from .data import DATASETS, Dataset, grid, grid_centers, ring, ring_centers, swiss_roll
from .methods import METHODS, Method
from .metrics import MIN_SHARE, MMD_BANDWIDTHS, N_SIGMA, mmd2_rbf, mode_coverage
from .report import COLUMNS, FILES, markdown_tables, source_hash, write_outputs
from .runner import (
    FULL,
    QUICK,
    Config,
    data_rows,
    plan,
    resolve_datasets,
    resolve_methods,
    run_all,
    summarize,
)

__all__ = [
    "DATASETS", "Dataset", "ring", "grid", "swiss_roll", "ring_centers", "grid_centers", "METHODS", "Method",
    "N_SIGMA", "MIN_SHARE", "MMD_BANDWIDTHS", "mode_coverage", "mmd2_rbf", "COLUMNS", "FILES", "source_hash",
    "Config", "FULL", "QUICK", "REQUIRES", "missing_dependencies", "run_demo", "format_table", "OutputError",
]  # fmt: skip

# What the demo imports beyond genloss and numpy: the ``demo`` extra of pyproject.toml.
REQUIRES = ("torch", "matplotlib", "tqdm")


def missing_dependencies() -> str | None:
    """One line naming what to install when a package of ``REQUIRES`` does not import, else None."""
    missing = []
    for name in REQUIRES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    return f"genloss demo needs {' and '.join(missing)}: pip install 'genloss[demo]'"


class OutputError(RuntimeError):
    """The run finished but its outputs could not be written; ``result`` holds it (nothing
    was replaced: each file is written whole, or not at all)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def _command(quick: bool, seed: int, out: Path | None, **opts: Any) -> str:
    parts = ["genloss demo"] + (["--quick"] if quick else []) + [f"--seed {seed}"]
    for k, v in opts.items():
        if v is not None:
            parts.append(
                f"--{k.replace('_', '-')} "
                + (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
            )
    if out is not None:
        parts.append(f"--out {out}")
    return " ".join(parts)


def run_demo(
    out_dir: str | Path | None = "genloss-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    seeds: int | None = None,
    steps: int | None = None,
    methods: Sequence[str] | str | None = None,
    datasets: Sequence[str] | str | None = None,
    device: str = "cpu",
    threads: int = 1,
    workers: int | None = None,
    n_eval: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train, score and report every (dataset, method) pair over ``seeds`` seeds.

    ``quick``: the CI-sized run (``QUICK``: 2 seeds, a tenth of the steps, 500 samples scored);
    else ``FULL`` (3 seeds, each method's default steps, 2000 samples). ``seeds``, ``steps``
    (replaces every method's), ``n_eval`` override the chosen size. ``methods``/``datasets``:
    only these (default: every default method on its own datasets: GANs on ``ring`` and
    ``grid``, the rest on ``swiss_roll``; naming datasets runs every chosen method on each).
    ``workers``: processes (default ``min(2, cores)``; 1 runs in this process); ``threads``:
    torch threads per worker (1: the fast and the reproducible choice for these small MLPs).

    Writes ``FILES`` into ``out_dir`` (saying so on stderr when it replaces files; None:
    nothing written) and returns ``{'meta', 'summary', 'runs', 'skipped', 'files'}``:
    ``summary`` one row per (dataset, method) with ``<metric>`` and ``<metric>_sd``, the
    ``data`` rows first (a second draw of the data: the floor of every metric); ``runs`` one
    dict per (dataset, method, seed) with its samples and metric-vs-step curve.
    Same ``seed`` -> same numbers (on CPU, whatever ``workers``).
    """
    missing = missing_dependencies()
    if missing:
        raise ImportError(missing)
    for name, v, lo in (("seed", seed, 0), ("threads", threads, 1), ("seeds", seeds, 1), ("steps", steps, 1),
                        ("workers", workers, 1), ("n_eval", n_eval, 2)):  # fmt: skip
        if v is None and name in ("seeds", "steps", "workers", "n_eval"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"run_demo: {name} must be an int >= {lo}, got {v!r}")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"run_demo: device must be 'cpu' or 'cuda', got {device!r}")
    chosen = resolve_methods(methods)
    dnames = resolve_datasets(datasets)
    base = QUICK if quick else FULL
    cfg = replace(base, seed=seed, device=str(device), threads=threads, steps=steps,
                  seeds=base.seeds if seeds is None else seeds,
                  n_eval=base.n_eval if n_eval is None else n_eval,
                  n_curve=min(base.n_curve, base.n_eval if n_eval is None else n_eval))  # fmt: skip
    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run_demo: device={device!r} asked for, but torch sees no CUDA device")
    if isinstance(out_dir, str) and not out_dir.strip():  # Path("") is the current folder: say so, not guess
        raise ValueError("run_demo: out_dir is empty: name a folder (or None to write nothing)")
    out = None if out_dir is None else Path(out_dir)
    created = out is not None and not out.exists()
    if out is not None:
        _writable_dir(out)  # before the training, not after it: a bad path would lose the whole run
        existing = [f for f in FILES if (out / f).exists()]
        if existing and progress is not None:
            print(f"genloss demo: will overwrite {', '.join(existing)} in {out}", file=sys.stderr)
    if workers is None:
        workers = max(1, min(2, os.cpu_count() or 1))
    if command is None:
        command = _command(quick, seed, out, seeds=seeds, steps=steps, methods=methods, datasets=datasets)

    pairs = plan(chosen, dnames)
    skipped = [{"method": m.name, "dataset": d,
                "note": f"{m.family} ops not available (genloss.torch has no {', '.join(m.missing())})"}
               for d, m in pairs if not m.available()]  # fmt: skip
    pairs = [(d, m) for d, m in pairs if m.available()]
    prdc_note = (
        None
        if _metrics.prdc_function() is not None  # looked up at run time, as the scoring does
        else "precision / recall / density / coverage are left out: this genloss has no "
        "genloss.reference.metrics.prdc"
    )
    if progress:
        for s in {s["method"]: s for s in skipped}.values():
            print(f"genloss demo: {s['method']} skipped: {s['note']}", file=sys.stderr)
        if prdc_note:
            print(f"genloss demo: {prdc_note}", file=sys.stderr)

    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [r for d in dict.fromkeys(d for d, _ in pairs) for r in data_rows(cfg, d)]
        runs += run_all(cfg, pairs, workers, progress)
    except BaseException:  # Ctrl-C or a failed run: leave no trace of this run behind
        _drop_if_made(out, created)
        raise
    finally:
        torch.set_num_threads(before)
    order = list(DATASETS)
    runs.sort(key=lambda r: order.index(r["dataset"]))  # stable: data rows first within a dataset
    summary = summarize(runs)
    meta = {
        "command": command,
        "source_hash": source_hash(),
        "config": cfg.__dict__ | {"quick": quick},
        "genloss": _version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "workers": workers,
        "total_wall_s": time.perf_counter() - t0,
        "cpu_s": sum(r["cpu_s"] or 0.0 for r in runs),
        "prdc_note": prdc_note,
        "hparams": {m.name: m.hparams for m in chosen},
        "about": {m.name: m.about for m in chosen},
    }
    result: dict[str, Any] = {"meta": meta, "summary": summary, "runs": runs, "skipped": skipped, "files": []}
    if out is not None:
        try:
            result["files"] = write_outputs(out, runs, summary, skipped, meta)
        except BaseException as err:  # the temporary files are gone: the folder too, if this run made it
            _drop_if_made(out, created)
            if not isinstance(err, OSError):  # Ctrl-C while writing
                raise
            # e.g. the disk filled during the run: the caller still gets the tables. The folder, not
            # err.filename: that is the temporary name the file was being written under
            raise OutputError(
                f"cannot write the outputs to {str(out)!r}: {err.strerror or err}; nothing was replaced",
                result,
            ) from err
    return result


def _drop_if_made(out: Path | None, created: bool) -> None:
    """Remove ``out`` when this run created it and it is still empty (never a folder that holds anything)."""
    if created and out is not None:
        try:
            out.rmdir()
        except OSError:
            pass


def _writable_dir(out: Path) -> None:
    """Create ``out`` (and its parents) and check a file can be written there and each of ``FILES``
    can be (re)placed: ValueError naming the path if not."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(
            f"run_demo: cannot write the outputs to {str(out)!r}: {err.strerror or err}"
        ) from None
    # a folder (or a fifo, ...) under an output's name would only fail when the run is written
    for name in FILES:
        path = out / name
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise ValueError(f"run_demo: cannot write the outputs to {str(out)!r}: {str(path)!r} is {kind}")


def _version() -> str:
    import genloss

    return str(getattr(genloss, "__version__", "?"))


def format_table(result: dict[str, Any]) -> str:
    """The run's tables and their column explanations, in Markdown (as the .md file)."""
    return markdown_tables(result["summary"], result["skipped"], result["meta"])
