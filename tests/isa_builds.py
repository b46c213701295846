"""Runs a script under one instruction-set build of the CPU engine (GENLOSS_ISA forces a
build narrower than the CPU's widest; cpp/src/cpu_dispatch.cpp) in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ISAS = ["sse2", "avx2", "avx512"]
_CPU_FLAG = {"avx2": "avx2", "avx512": "avx512f"}


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


def run_under_isa(isa: str, script: str, drop_env: tuple[str, ...] = ()) -> dict:
    """The JSON the script prints, run with GENLOSS_ISA=isa (skips where the CPU lacks it);
    checks the build that ran is the one asked for. ``drop_env``: variables to unset."""
    flag = _CPU_FLAG.get(isa)
    if flag is not None and not _cpu_has(flag):
        pytest.skip(f"CPU has no {isa}")
    env = dict(os.environ, GENLOSS_ISA=isa)
    for k in drop_env:
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"GENLOSS_ISA={isa}: the script failed:\n{res.stderr[-4000:]}"
    out = json.loads(res.stdout)
    assert out["isa"] == isa
    return out
