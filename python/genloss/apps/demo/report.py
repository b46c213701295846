"""The demo's outputs: the figure, the tables (terminal / Markdown, CSV, JSON), and their
provenance (the command and a hash of the demo's source files, so that a test can tell
when committed outputs no longer match the code)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import secrets
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import DATASETS
from .metrics import MIN_SHARE, MMD_BANDWIDTHS, N_SIGMA, PRDC_K

__all__ = ["source_hash", "COLUMNS", "markdown_tables", "plot", "write_outputs", "FILES"]

FILES = ("genloss-demo.png", "genloss-demo.md", "genloss-demo.csv", "genloss-demo.json")
LIM = 3.0  # every dataset lies in [-3, 3]²


def source_hash() -> str:
    """sha256 (first 16 hex digits) of the demo's source files: names and contents, sorted by name."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()[:16]


# (key, header, explanation): one list for the terminal, the Markdown file and the README
COLUMNS: list[tuple[str, str, str]] = [
    ("modes_covered", "modes", f"modes covered, of K: a mode is covered when at least {MIN_SHARE:g} of its expected "
     f"share of the samples (n/K) lies within {N_SIGMA:g}σ of its centre (σ: the mode's std); coverage, not sharpness"),
    ("high_quality", "high quality", f"fraction of samples within {N_SIGMA:g}σ of some mode's centre (VEEGAN's "
     "criterion; the data itself: 98.9%): sharpness"),
    ("mmd2", "MMD² ×10³", "unbiased MMD² to held-out data (points no method trained on), RBF kernel averaged over "
     f"bandwidths {', '.join(f'{b:g}' for b in MMD_BANDWIDTHS)}; lower is better; the `data` row, a second draw "
     "of the data, is the floor (0 in expectation, its spread the estimator's noise)"),
    ("precision", "precision", f"share of samples inside the {PRDC_K}-NN balls of the held-out data (fidelity; "
     "Kynkäänniemi et al. 2019)"),
    ("recall", "recall", f"share of held-out points inside the {PRDC_K}-NN balls of the samples (diversity)"),
    ("density", "density", "mean number of held-out k-NN balls holding a sample, / k (Naeem et al. 2020; 1 for the "
     "data, > 1 for samples crowding dense regions)"),
    ("coverage", "coverage", "share of held-out points whose k-NN ball holds a sample (Naeem et al. 2020)"),
    ("codebook_usage", "codes used", "VQ-VAE: share of the codebook the held-out data uses"),
    ("perplexity", "perplexity", "VQ-VAE: exp(entropy) of the code frequencies on held-out data (of 64 codes)"),
    ("cpu_s", "CPU s/run", "CPU seconds per run (one seed: training, the metric-vs-step curve, scoring), "
     "on the machine that made the table; CPU time, not wall time, as the machine may be shared. A GAN's "
     "seeds train together as one batched model (each seed its own weights, data, draws and loss): its "
     "value is the batch's CPU time divided by the seeds"),
]  # fmt: skip


def _cell(row: dict[str, Any], key: str) -> str:
    v, sd = row.get(key), row.get(key + "_sd") or 0.0
    if v is None:
        return "–"
    spread = row["seeds"] > 1  # one seed has no spread to show (not a measured 0)

    def pm(scale: float, digits: int, unit: str = "") -> str:
        return f"{scale * v:.{digits}f}" + (f" ± {scale * sd:.{digits}f}" if spread else "") + unit

    if key == "modes_covered":
        return pm(1.0, 1, f" / {row['n_modes']}")
    if key == "mmd2":
        return pm(1e3, 2)
    if key in ("high_quality", "codebook_usage"):
        return pm(100.0, 0, "%")
    if key == "perplexity":
        return pm(1.0, 1)
    if key == "cpu_s":
        return f"{v:.1f}"
    return pm(1.0, 2)


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The columns with a value in some row (mode columns only for mixtures, PRDC when genloss has it)."""
    return [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def markdown_tables(
    summary: Sequence[dict[str, Any]], skipped: Sequence[dict[str, str]], meta: dict[str, Any]
) -> str:
    """The Markdown tables, one per dataset, then what the columns mean and how it was made."""
    out: list[str] = []
    seeds = meta["config"]["seeds"]
    for d in DATASETS:
        rows = [r for r in summary if r["dataset"] == d]
        if not rows:
            continue
        over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed (no spread)"
        out.append(f"**{DATASETS[d].title}** (`{d}`), {over}")
        out.append("")
        cols = _columns(rows)
        out.append("| method | steps | " + " | ".join(c[1] for c in cols) + " |")
        out.append("|---|---:|" + "---:|" * len(cols))
        for r in rows:
            name = r["method"] + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            steps = "–" if r["method"] == "data" else str(r["steps"])
            out.append(f"| {name} | {steps} | " + " | ".join(_cell(r, c[0]) for c in cols) + " |")
        out.append("")
    for s in skipped:
        out.append(f"- `{s['method']}` skipped: {s['note']}")
    if skipped:
        out.append("")
    used = {c[0] for d in DATASETS for c in _columns([r for r in summary if r["dataset"] == d])}
    out.append("Columns:")
    out.append("")
    for key, head, text in COLUMNS:
        if key in used:
            out.append(f"- **{head}**: {text}.")
    if meta.get("prdc_note"):
        out.append(f"- {meta['prdc_note']}")
    out.append("")
    out.append("Methods (what each is, then its hyperparameters: the paper's, and the demo's):")
    out.append("")
    cfg = meta["config"]
    if cfg.get("steps") is not None or cfg.get("steps_scale", 1.0) != 1.0:
        ran = (f"{cfg['steps']} steps" if cfg.get("steps") is not None
               else f"{cfg['steps_scale']:g} of them (at least 10)")  # fmt: skip
        out.append(f"(The step counts below are the full run's; this run trained for {ran}, pretraining "
                   "included: the steps column.)")  # fmt: skip
        out.append("")
    for name, about in meta["about"].items():
        out.append(f"- `{name}`: {about}. {meta['hparams'][name]}.")
    out.append("")
    out.append(f"Made by `{meta['command']}` (demo source hash `{meta['source_hash']}`, genloss {meta['genloss']}, "
               f"torch {meta['torch']}); {meta['cpu_s']:.0f} CPU s in the runs, {meta['total_wall_s']:.0f} s wall "
               f"with {meta['workers']} worker{'s' * (meta['workers'] != 1)}.")  # fmt: skip
    return "\n".join(out) + "\n"


def _method_colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def plot(
    runs: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], path: Path, meta: dict[str, Any]
) -> Path:
    """One PNG: per dataset a row of sample scatters (seed 0, over held-out data) and a row of
    sample density heatmaps, one column per method; then the metric-vs-step curves."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    dsets = [d for d in DATASETS if any(r["dataset"] == d for r in runs)]
    per = {d: [r["method"] for r in summary if r["dataset"] == d] for d in dsets}
    ncols = max(len(v) for v in per.values())
    panels = [(d, "mmd2") for d in dsets] + [(d, "modes") for d in dsets if DATASETS[d].centers is not None]
    # wide enough for the curves too (3 inches each), however few methods run
    width = max(1.85 * ncols + 0.6, 3.0 * len(panels))
    fig = Figure(figsize=(width, 3.75 * len(dsets) + 3.0), dpi=90, layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.75 * len(dsets), 3.0])  # type: ignore[misc]
    axes = top.subplots(2 * len(dsets), ncols, squeeze=False, sharex=True, sharey=True)
    bins = np.linspace(-LIM, LIM, 91)
    srow = {(r["dataset"], r["method"]): r for r in summary}
    for i, d in enumerate(dsets):
        first = {r["method"]: r for r in runs if r["dataset"] == d and r["rep"] == 0}
        data = first["data"]["samples"]
        im = None
        for j in range(ncols):
            a_s, a_d = axes[2 * i, j], axes[2 * i + 1, j]
            if j >= len(per[d]):
                a_s.set_axis_off()
                a_d.set_axis_off()
                continue
            name = per[d][j]
            s = first[name]["samples"]
            s = s[np.isfinite(s).all(axis=1)]
            a_s.scatter(data[:, 0], data[:, 1], s=1, c="0.75", linewidths=0, label="held-out data")
            if name != "data":
                a_s.scatter(s[:, 0], s[:, 1], s=1, c="C3", linewidths=0, alpha=0.6, label="samples (seed 0)")
            h, _, _ = np.histogram2d(s[:, 0], s[:, 1], bins=[bins, bins])
            im = a_d.imshow(h.T, origin="lower", extent=(-LIM, LIM, -LIM, LIM), cmap="magma",
                            norm=LogNorm(vmin=1, vmax=max(2.0, len(s) / 20)), interpolation="nearest")  # fmt: skip
            r = srow[(d, name)]
            sub = f"MMD² {1e3 * r['mmd2']:.1f}e-3" if r["mmd2"] is not None else "diverged"
            if r["modes_covered"] is not None:
                sub = f"{r['modes_covered']:.1f}/{r['n_modes']} modes, {sub}"
            a_s.set_title(f"{name}\n{sub}", fontsize=8)
            a_s.set_aspect("equal")
            a_d.set_aspect("equal")
            a_d.set_facecolor("black")
            a_s.tick_params(labelsize=7)
            a_d.tick_params(labelsize=7)
        axes[2 * i, 0].set_ylabel(f"{d}\nsamples", fontsize=9)
        axes[2 * i + 1, 0].set_ylabel(f"{d}\ndensity (log)", fontsize=9)
        if i == 0:
            axes[0, 0].legend(loc="lower left", fontsize=6, markerscale=6, framealpha=0.8)
        if im is not None:
            top.colorbar(im, ax=axes[2 * i + 1, :].tolist(), shrink=0.9, pad=0.01, label="samples / bin")
    axes[0, 0].set_xlim(-LIM, LIM)
    axes[0, 0].set_ylim(-LIM, LIM)
    # the curves: MMD² per dataset (log scale), modes covered per mixture
    caxes = bottom.subplots(1, len(panels), squeeze=False)[0]
    for ax, (d, key) in zip(caxes, panels, strict=True):
        names = [n for n in per[d] if n != "data"]
        colors = _method_colors(names)
        for n in names:
            rs = [r for r in runs if r["dataset"] == d and r["method"] == n]
            steps = np.asarray(rs[0]["curve"]["step"])
            ys = np.asarray(
                [[math.nan if v is None else v for v in r["curve"][key]] for r in rs], dtype=float
            )
            if key == "mmd2":
                ys = np.maximum(ys, 1e-6)  # the log axis: an estimate at or below 0 shows at 1e-6
            mean = np.nanmean(ys, axis=0)
            ax.plot(steps, mean, color=colors[n], lw=1.3, label=n)
            ax.fill_between(
                steps, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=colors[n], alpha=0.15, lw=0
            )
        floor = np.asarray([r["curve"][key][0] for r in runs if r["dataset"] == d and r["method"] == "data"])
        if key == "mmd2":
            # the data's own estimate is 0 in expectation: its noise level, mean + 2 std, is the floor
            noise = float(floor.mean() + 2 * floor.std(ddof=1)) if len(floor) > 1 else float(abs(floor[0]))
            ax.set_yscale("log")
            ax.axhline(max(noise, 1e-6), color="k", ls="--", lw=1, label="data vs data (+2 sd)")
            ax.set_ylabel("MMD² to held-out data", fontsize=8)
        else:
            ax.set_ylim(-0.03, 1.03)
            ax.axhline(float(np.mean(floor)), color="k", ls="--", lw=1, label="data")
            ax.set_ylabel("share of modes covered", fontsize=8)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_title(f"{d}: {'MMD²' if key == 'mmd2' else 'modes covered'}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key == "mmd2":
            ax.legend(fontsize=6, ncol=2, loc="best", framealpha=0.7)
    top.suptitle("samples of seed 0 (red) over held-out data (grey), and their density", fontsize=10)
    bottom.suptitle(
        f"metrics during training: mean over seeds, band: min to max        [{meta['command']}, "
        f"demo source {meta['source_hash']}]",
        fontsize=10,
    )
    fig.savefig(path, metadata={"Description": f"{meta['command']} source_hash={meta['source_hash']}"})
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if k != "samples"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_outputs(
    out: Path,
    runs: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, str]],
    meta: dict[str, Any],
) -> list[Path]:
    """The figure, the Markdown tables, the CSV (one row per dataset x method, mean and std
    columns) and the JSON (config, provenance, summary, every run with its curves).

    Each file is written under a temporary name in ``out`` and renamed over its final name
    only once all four are written: a failure (a full disk, Ctrl-C) leaves the previous
    outputs as they were and no half-written file."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f for f in FILES]
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    # the same suffix: matplotlib picks the figure's format from it
    tmps = [p.with_name(f".{p.stem}.tmp-{token}{p.suffix}") for p in paths]
    try:
        plot(runs, summary, tmps[0], meta)
        tmps[1].write_text(markdown_tables(summary, skipped, meta), encoding="utf-8")
        keys = sorted({k for r in summary for k in r})
        front = ["dataset", "method", "family", "seeds", "steps"]
        with tmps[2].open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=front + [k for k in keys if k not in front])
            w.writeheader()
            for r in summary:
                w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        doc = {
            "meta": meta,
            "columns": {k: t for k, _, t in COLUMNS},
            "summary": summary,
            "skipped": skipped,
            "runs": runs,
        }
        tmps[3].write_text(json.dumps(_jsonable(doc), indent=1) + "\n", encoding="utf-8")
        _replace_all(tmps, paths)
    finally:
        for t in tmps:  # after a failure: the files written so far; after success: none left
            t.unlink(missing_ok=True)
    return paths


def _replace_all(tmps: Sequence[Path], paths: Sequence[Path]) -> None:
    """Rename each of ``tmps`` over its ``paths``, with Ctrl-C held off (where this is the main
    thread) so that an interrupt does not leave a mix of this run's files and the last one's."""
    held = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if held:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for t, p in zip(tmps, paths, strict=True):
            os.replace(t, p)
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
