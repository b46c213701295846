"""The bad-input matrix, run where a crash cannot take the caller down, with its counts.

    python tests/bad_input_matrix.py [--json PATH] [--ops NAME ...]

Every registry op x every way of breaking one argument of a valid call
(``tests/test_native.py::_bad_cases``: unknown reduction, mismatched sizes, a dim too
many, a 0-d array, a wrong dtype, an out-of-range label or timestep, a non-finite
hyperparameter, ...) x every layer that must refuse it (reference, native, and the torch
op on the same values as tensors).  The cases run in a child process that writes the
index of each case before running it, so a crash (a segfault, an abort) is charged to
its case and the run resumes after it in a fresh child; a child silent for ``TIMEOUT``
seconds is a hang, charged the same way.  Outcomes:

* ``named``: a ValueError/TypeError whose message names the op and the argument;
* ``no_op_name``: a ValueError/TypeError naming the argument but not the op;
* ``unclear``: another exception type, or a message that names no argument involved;
* ``accepted``: no exception (a silent answer to a bad question);
* ``crashed`` / ``hung``: the child died or stopped answering.

``tests/test_bad_input.py::test_bad_input_matrix_in_a_subprocess`` runs it and requires
every case ``named``; ``tests/test_native.py::test_bad_input_names_the_argument`` runs the
reference and native cases in-process, one pytest id each, to pinpoint a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT = 300.0  # seconds without progress before a child counts as hung
OUTCOMES = ("named", "no_op_name", "unclear", "accepted", "crashed", "hung")


def cases(ops: list[str] | None = None) -> list[tuple]:
    """(record, layer, variant, mutate, exc, names, case_id) for every case, in a fixed order."""
    sys.path.insert(0, str(HERE))
    import test_native  # the one definition of the bad cases

    out = []
    for record, layer, variant, mutate, exc, names, case_id in test_native.BAD_CASES:
        if ops and record.name not in ops:
            continue
        out.append((record, layer, variant, mutate, exc, names, case_id))
        if layer == "reference":  # the torch op refuses what the reference refuses
            out.append((record, "torch", variant, mutate, exc, names, case_id))
    return out


def _torch_args(inputs: tuple) -> tuple:
    import numpy as np
    import torch

    return tuple(torch.as_tensor(np.asarray(a)) if isinstance(a, np.ndarray) else a for a in inputs)


def run_case(case: tuple) -> tuple[str, str]:
    """(outcome, message) of one case."""
    import numpy as np

    import genloss.registry as R

    record, layer, variant, mutate, exc, names, case_id = case
    spec = record.at(variant)
    sys.path.insert(0, str(HERE))
    from test_native import BASE_SIZES

    inputs = R.make_inputs(spec, np.random.default_rng(6), np.float64, BASE_SIZES, variant)
    kwargs = R.call_kwargs(spec, variant, spec.reductions[0] if spec.reductions else None)
    inputs, kwargs = mutate(spec, inputs, kwargs)
    if layer == "torch":
        fn, inputs = spec.torch, _torch_args(inputs)
    else:
        fn = spec.native if layer == "native" else spec.reference
    try:
        fn(*inputs, **kwargs)
    except (ValueError, TypeError) as err:
        msg = str(err)
        if not isinstance(err, exc) or not any(n in msg for n in names):
            return "unclear", f"{type(err).__name__}: {msg}"
        return ("named" if record.name in msg else "no_op_name"), msg
    except Exception as err:  # noqa: BLE001 - every other type is the finding
        return "unclear", f"{type(err).__name__}: {err}"
    return "accepted", ""


def _child(start: int, ops: list[str] | None, progress: str, results: str) -> None:
    all_cases = cases(ops)
    with open(results, "a", encoding="utf-8") as res:
        for i in range(start, len(all_cases)):
            with open(progress, "w", encoding="utf-8") as p:
                p.write(str(i))
            outcome, msg = run_case(all_cases[i])
            res.write(json.dumps({"i": i, "outcome": outcome, "message": msg[:300]}) + "\n")
            res.flush()


def _case_id(case: tuple) -> str:
    return f"{case[0].name}-{case[1]}-{case[6]}"


def run_matrix(ops: list[str] | None = None) -> dict:
    """Every case, crash-isolated; returns {"counts": {...}, "cases": n, "findings": [...]}."""
    all_cases = cases(ops)
    outcomes: dict[int, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        progress, results = os.path.join(tmp, "progress"), os.path.join(tmp, "results")
        start = 0
        while start < len(all_cases):
            cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", str(start), "--progress", progress,
                   "--results", results, *(["--ops", *ops] if ops else [])]  # fmt: skip
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            last, last_change = None, time.monotonic()
            while child.poll() is None:  # a hang is no progress for TIMEOUT seconds
                time.sleep(0.2)
                now = Path(progress).read_text() if os.path.exists(progress) else None
                if now != last:
                    last, last_change = now, time.monotonic()
                elif time.monotonic() - last_change > TIMEOUT:
                    child.kill()
                    child.wait()
                    break
            stderr = child.stderr.read() if child.stderr else ""
            if os.path.exists(results):
                with open(results, encoding="utf-8") as f:
                    for line in f:
                        r = json.loads(line)
                        outcomes[r["i"]] = (r["outcome"], r["message"])
            if child.returncode == 0:
                break
            at = int(Path(progress).read_text())
            outcomes[at] = ("hung" if child.returncode == -9 else "crashed", stderr[-300:])
            start = at + 1
    counts = Counter({k: 0 for k in OUTCOMES})
    counts.update(o for o, _ in outcomes.values())
    findings = [
        {"case": _case_id(all_cases[i]), "outcome": o, "message": m}
        for i, (o, m) in sorted(outcomes.items())
        if o != "named"
    ]
    return {"cases": len(all_cases), "counts": dict(counts), "findings": findings}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--ops", nargs="*", help="only these ops")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.ops, args.progress, args.results)
        return 0
    report = run_matrix(args.ops)
    print(
        f"bad-input matrix: {report['cases']} cases: "
        + ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    )
    for f in report["findings"]:
        print(f"  {f['outcome']:<10} {f['case']}: {f['message']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if report["counts"]["named"] == report["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
