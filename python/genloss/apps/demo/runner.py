"""Running the demo: one *run* per (dataset, method, seed), in worker processes, then the
per-(dataset, method) summary: mean and standard deviation over the seeds.

Determinism: each run draws from its own seed (derived from the demo's ``seed``, the
method, the dataset and the repetition, so a run gives the same numbers alone or with
others, in any worker, in any order), under ``torch.random.fork_rng`` so the caller's RNG
state is untouched. With one torch thread per worker (the default) the same seed gives
the same numbers, run after run (genloss's reductions are deterministic).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import signal
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch

from . import methods as _methods
from .data import ALIASES, DATASETS, Dataset
from .methods import LOSS_WINDOW
from .metrics import mmd2_rbf, mode_coverage, prdc_scores

__all__ = ["Config", "QUICK", "FULL", "plan", "run_one", "run_group", "run_all", "summarize"]


@dataclass(frozen=True)
class Config:
    """How long and on how much the demo runs. ``steps_scale`` multiplies every method's
    default steps (``steps``, when set, replaces them); ``seeds`` repetitions per method;
    ``n_eval`` samples scored against as many held-out points; ``checkpoints`` points of
    the metric-vs-step curves, each on ``n_curve`` samples."""

    seed: int = 0
    seeds: int = 3
    steps: int | None = None
    steps_scale: float = 1.0
    batch: int = 256
    n_eval: int = 2000
    n_curve: int = 500
    checkpoints: int = 10
    device: str = "cpu"
    threads: int = 1


FULL = Config()
# --quick: the CI run, <= 40 s on 2 cores: 2 seeds (a spread), a tenth of the steps.
QUICK = Config(seeds=2, steps_scale=0.1, n_eval=500, n_curve=250, checkpoints=4)


def resolve_datasets(names: Sequence[str] | str | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    # a name given twice (or under its old alias too) is one dataset, not a second run of it
    out = list(dict.fromkeys(ALIASES.get(n, n) for n in names))
    unknown = [n for n in out if n not in DATASETS]
    if unknown:
        raise ValueError(f"datasets: unknown {unknown}; known: {sorted(DATASETS)}")
    return out


def resolve_methods(names: Sequence[str] | str | None) -> list[_methods.Method]:
    if names is None:
        return [m for m in _methods.METHODS if m.default]
    if isinstance(names, str):
        names = [names]
    by_name = {m.name: m for m in _methods.METHODS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; known: {sorted(by_name)}")
    # a name given twice is one method: run twice, its runs would count as extra seeds of one row
    return [by_name[n] for n in dict.fromkeys(names)]


def plan(
    methods: Sequence[_methods.Method], datasets: Sequence[str] | None
) -> list[tuple[str, _methods.Method]]:
    """The (dataset, method) pairs: each method on its own ``datasets`` (GANs on the two
    mixtures, the rest on the swiss roll), or every method on each of ``datasets``."""
    names = list(DATASETS)
    pairs = []
    for d in names if datasets is None else datasets:
        for m in methods:
            if datasets is not None or d in m.datasets:
                pairs.append((d, m))
    return pairs


def _seed_sequence(cfg: Config, *parts: str | int) -> np.random.SeedSequence:
    words = [cfg.seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else p for p in parts]
    return np.random.SeedSequence(words)


def held_out(cfg: Config, ds: Dataset, rep: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out set of repetition ``rep`` (no method trains on it) and a second draw of
    the data (the ``data`` row: the noise floor of every metric)."""
    eval_ss, ref_ss = _seed_sequence(cfg, "held-out", ds.name, rep).spawn(2)
    return ds.sample(cfg.n_eval, np.random.default_rng(eval_ss)), ds.sample(
        cfg.n_eval, np.random.default_rng(ref_ss)
    )


def score(ds: Dataset, samples: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """Every metric of ``samples`` against the held-out ``real``."""
    out: dict[str, Any] = {
        "modes_covered": None,
        "n_modes": ds.n_modes,
        "mode_counts": None,
        "high_quality": None,
    }
    if ds.centers is not None:
        assert ds.std is not None
        out.update(mode_coverage(samples, ds.centers, ds.std))
    finite = bool(np.isfinite(samples).all())
    out["finite"] = finite
    out["mmd2"] = float(mmd2_rbf(torch.from_numpy(samples), torch.from_numpy(real))) if finite else math.nan
    scores = prdc_scores(real, samples) if finite else None
    out["prdc"] = scores
    return out


def _curve_point(ds: Dataset, samples: np.ndarray, real: np.ndarray) -> tuple[float, float | None]:
    finite = bool(np.isfinite(samples).all())
    mmd = float(mmd2_rbf(torch.from_numpy(samples), torch.from_numpy(real))) if finite else math.nan
    if ds.centers is None or ds.std is None:
        return mmd, None
    return mmd, mode_coverage(samples, ds.centers, ds.std)["modes_covered"] / len(ds.centers)


def _scaled(cfg: Config, steps: int) -> int:
    """A method's steps in this run: ``cfg.steps`` when set, else ``steps`` x ``cfg.steps_scale`` (>= 10)."""
    return cfg.steps if cfg.steps is not None else max(10, round(steps * cfg.steps_scale))


def _seeds(cfg: Config, dname: str, mname: str, rep: int) -> tuple[int, np.random.Generator, int]:
    """A run's torch seed (initialisation and training draws), its data stream, its evaluation seed."""
    ss_train, ss_data, ss_eval = _seed_sequence(cfg, "run", dname, mname, rep).spawn(3)

    def seed(ss: np.random.SeedSequence) -> int:
        return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))

    return seed(ss_train), np.random.default_rng(ss_data), seed(ss_eval)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def run_one(task: tuple[Config, str, str, int]) -> dict[str, Any]:
    """Train and score one (dataset, method, repetition); a top-level function for the worker pool."""
    cfg, dname, mname, rep = task
    return run_group((cfg, dname, mname, (rep,)))[0]


def run_group(task: tuple[Config, str, str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Train and score the repetitions ``reps`` of one (dataset, method): a batched method
    (``Method.batched``) trains them as one model, each with its own initialisation, data
    and draws (its numbers do not depend on which other repetitions share the model); any
    other method one after the other. Each run's ``cpu_s`` and ``wall_s``: a batched
    group's cost divided by its runs."""
    cfg, dname, mname, reps = task
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    m = next(x for x in _methods.METHODS if x.name == mname)
    if not m.batched:
        return [r for rep in reps for r in _run_batch(cfg, m, dname, (rep,))]
    return _run_batch(cfg, m, dname, reps)


def _run_batch(cfg: Config, m: _methods.Method, dname: str, reps: tuple[int, ...]) -> list[dict[str, Any]]:
    ds = DATASETS[dname]
    steps = _scaled(cfg, m.steps)
    t0, c0 = time.perf_counter(), time.process_time()
    seeds = [_seeds(cfg, dname, m.name, rep) for rep in reps]
    rngs = [rng for _, rng, _ in seeds]
    reals = [held_out(cfg, ds, rep)[0] for rep in reps]
    device = torch.device(cfg.device)
    at = sorted({max(1, round(steps * (j + 1) / cfg.checkpoints)) for j in range(cfg.checkpoints)})
    cuda = [device.index or 0] if device.type == "cuda" else []
    curves: list[dict[str, list[Any]]] = [{"step": [], "mmd2": [], "modes": []} for _ in reps]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        gens = [_generator(device, s) for s, _, _ in seeds]
        eval_gens = [_generator(device, s) for _, _, s in seeds]  # evaluation draws do not disturb training's
        if m.batched:
            trainer = cast(_methods.BatchedSetup, m.setup)(device, gens, ds)

            def sample_real() -> torch.Tensor:
                return torch.from_numpy(np.stack([ds.sample(cfg.batch, r) for r in rngs])).to(device)
        else:
            torch.manual_seed(gens[0].initial_seed())  # module initialisation
            trainer = cast(_methods.Setup, m.setup)(device, gens[0], ds)

            def sample_real() -> torch.Tensor:
                return torch.from_numpy(ds.sample(cfg.batch, rngs[0])).to(device)

        trainer.K = steps
        if m.pretrain is not None:
            m.pretrain(trainer, sample_real, _scaled(cfg, m.pretrain_steps))

        def draw(n: int) -> list[np.ndarray]:
            trainer.gen, trainer.gens = eval_gens[0], (eval_gens if m.batched else None)
            try:
                x = m.sample(trainer, n).detach().float().cpu().numpy()
            finally:
                trainer.gen, trainer.gens = gens[0], (gens if m.batched else None)
            return list(x) if m.batched else [x]

        history: dict[str, list[torch.Tensor]] = {}
        for i in range(steps):
            trainer.k = i
            for k, v in m.step(trainer, sample_real).items():
                history.setdefault(k, []).append(v)
            if i + 1 in at:
                for curve, x, real in zip(curves, draw(cfg.n_curve), reals, strict=True):
                    mmd, modes = _curve_point(ds, x, real[: cfg.n_curve])
                    curve["step"].append(i + 1)
                    curve["mmd2"].append(mmd)
                    curve["modes"].append(modes)
        samples = draw(cfg.n_eval)
        extra = {} if m.evaluate is None else m.evaluate(trainer, torch.from_numpy(reals[0]).to(device))
    # (steps, S) for a batched method, (steps,) otherwise: each run's losses over the last LOSS_WINDOW steps
    hist = {k: torch.stack(v).float().cpu().numpy()[-LOSS_WINDOW:] for k, v in history.items()}
    scores = [score(ds, x, real) for x, real in zip(samples, reals, strict=True)]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = []
    for j, rep in enumerate(reps):
        res = scores[j]
        res.update(
            dataset=dname,
            method=m.name,
            family=m.family,
            rep=rep,
            steps=steps,
            losses={k: float(np.mean(v[:, j] if m.batched else v)) for k, v in hist.items()},
            extra=extra,
            curve=curves[j],
            samples=samples[j],
            wall_s=wall / len(reps),
            cpu_s=cpu / len(reps),
        )
        out.append(res)
    return out


def data_rows(cfg: Config, dname: str) -> list[dict[str, Any]]:
    """The ``data`` row's runs: per repetition, a second draw of the data scored like a method."""
    ds = DATASETS[dname]
    rows = []
    for rep in range(cfg.seeds):
        real, ref = held_out(cfg, ds, rep)
        res = score(ds, ref, real)
        mmd_c, modes_c = _curve_point(ds, ref[: cfg.n_curve], real[: cfg.n_curve])
        res.update(
            dataset=dname, method="data", family="reference", rep=rep, steps=0, losses={}, extra={},
            curve={"step": [], "mmd2": [mmd_c], "modes": [modes_c]}, samples=ref, wall_s=None, cpu_s=None,
        )  # fmt: skip
        rows.append(res)
    return rows


def run_all(
    cfg: Config,
    pairs: Sequence[tuple[str, _methods.Method]],
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """Every run of ``pairs`` x ``cfg.seeds``, on ``workers`` processes (1: in this process)."""
    # a batched method's seeds: one task; any other method's: one task per seed
    reps = tuple(range(cfg.seeds))
    tasks = [(cfg, d, m.name, g) for d, m in pairs for g in ([reps] if m.batched else [(r,) for r in reps])]
    # the longest first, so that the last runs are short and the workers finish together
    cost = {m.name: m.steps * m.work_per_step + m.pretrain_steps for _, m in pairs}
    tasks.sort(key=lambda t: -cost[t[2]] * len(t[3]) ** 0.5)  # a batch of S costs about sqrt(S) of one run
    from tqdm.auto import tqdm

    stream = sys.stderr
    live = progress and stream.isatty()
    bar = tqdm(
        total=len(pairs) * cfg.seeds,
        desc="genloss demo",
        unit="run",
        file=stream,
        disable=not live,
        dynamic_ncols=True,
    )
    out: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        out.append(r)
        line = (
            f"{r['dataset']:<10} {r['method']:<12} seed {r['rep']}  MMD² {r['mmd2']:.2e}  {r['wall_s']:.1f}s"
        )
        if live:
            bar.set_postfix_str(line.split("  ")[0], refresh=False)
            bar.update(1)
        elif progress:
            stream.write(f"[{len(out)}/{len(pairs) * cfg.seeds}] {line}\n")
            stream.flush()

    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                for r in run_group(t):
                    done(r)
        else:
            # spawn: a fresh interpreter per worker (forking a process that has started
            # OpenMP threads is not safe)
            ctx = multiprocessing.get_context("spawn")
            pool = None
            try:
                with _sigint_held():  # the workers start (on submit) with Ctrl-C held off
                    pool = ProcessPoolExecutor(
                        max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_ignore_sigint
                    )
                    futures = [pool.submit(run_group, t) for t in tasks]
                for f in as_completed(futures):
                    for r in f.result():
                        done(r)
            except BaseException:
                # Ctrl-C (or a failed run): the pool's own exit would wait for every queued
                # run to finish, only for the results to be thrown away. Drop the queue and
                # stop the workers now; the caller sees the exception.
                if pool is not None:
                    _stop(pool)
                raise
            pool.shutdown(wait=True)
    finally:
        bar.close()
    order = {
        (d, m.name, rep): i
        for i, (d, m, rep) in enumerate((d, m, r) for d, m in pairs for r in range(cfg.seeds))
    }
    out.sort(key=lambda r: order[(r["dataset"], r["method"], r["rep"])])
    return out


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT ignored, and blocked, in this (main) thread meanwhile. The workers spawned
    meanwhile start with it ignored (an ignored disposition survives exec, and Python then
    installs no KeyboardInterrupt handler; a blocked mask does not survive multiprocessing's
    spawn), so a Ctrl-C while they import torch cannot print their traceback. Blocked as well,
    so that a Ctrl-C meanwhile is not discarded here: it stays pending and is delivered, to the
    restored handler, on leaving."""
    held = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if held:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if held:
            signal.signal(signal.SIGINT, previous)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _ignore_sigint() -> None:
    """Worker initialiser: Ctrl-C reaches the whole process group, but only the parent acts
    on it (it stops the workers); a worker interrupted mid-run would print a traceback and
    report KeyboardInterrupt as its result. (Already ignored since the worker started, by
    ``_sigint_held``; said again here, and unblocked, for a worker started any other way.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued runs and terminate the workers (no orphans, no waiting for them)."""
    # the worker processes, read before shutdown() forgets them (no public accessor)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():  # a worker that ignores SIGTERM (stuck in native code)
            p.kill()
            p.join(timeout=1)


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method): the mean and sample standard deviation over seeds of every metric."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    rows = []
    for (d, m), rs in groups.items():
        row: dict[str, Any] = {"dataset": d, "method": m, "family": rs[0]["family"], "seeds": len(rs),
                               "steps": rs[0]["steps"], "n_modes": rs[0]["n_modes"],
                               "diverged": sum(not r["finite"] for r in rs)}  # fmt: skip
        metrics: dict[str, list[float | None]] = {
            "modes_covered": [r["modes_covered"] for r in rs],
            "high_quality": [r["high_quality"] for r in rs],
            "mmd2": [r["mmd2"] if math.isfinite(r["mmd2"]) else None for r in rs],
            "wall_s": [r["wall_s"] for r in rs],
            "cpu_s": [r["cpu_s"] for r in rs],
        }
        for name in ("precision", "recall", "density", "coverage"):
            metrics[name] = [None if r["prdc"] is None else r["prdc"][name] for r in rs]
        for name in sorted({k for r in rs for k in r["extra"]}):
            metrics[name] = [r["extra"].get(name) for r in rs]
        for name in sorted({k for r in rs for k in r["losses"]}):
            metrics["loss_" + name] = [r["losses"].get(name) for r in rs]
        for name, vals in metrics.items():
            row[name], row[name + "_sd"] = _mean_sd(vals)
        rows.append(row)
    return rows


def config_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)
