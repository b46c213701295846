"""Run a real multi-process ``torch.distributed`` job (gloo on 127.0.0.1) from a test.

Shared by the distributed tests (tests/test_metrics.py, tests/test_quant_regularizers.py): a free
port, and ``run_workers`` that spawns ``nprocs`` processes of ``worker(rank, port, out_dir, *args)``
and fails the test (killing the workers) if they do not finish in time.  The worker initializes
the process group itself (``init_gloo``), so its module must be importable by the spawned
interpreter (the test modules are: tests/ is on sys.path).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world_size: int) -> None:
    """Join the gloo group of ``world_size`` processes on the loopback interface (60 s timeout)."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip


def run_workers(
    worker: Callable[..., None], nprocs: int, args: tuple = (), deadline: float = 120.0
) -> list[Any]:
    """Spawn ``worker(rank, port, out_dir, *args)`` on ``nprocs`` ranks; return what each saved to
    ``<out_dir>/rank<r>.pt`` (``torch.save``), in rank order."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            worker, args=(free_port(), out_dir, *args), nprocs=nprocs, join=False, start_method="spawn"
        )
        t0 = time.monotonic()
        while not ctx.join(timeout=5):
            if time.monotonic() - t0 > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {nprocs}-process gloo job did not finish in {deadline:.0f} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(nprocs)]
