"""manic.testing.run with a choice of backend: NCCL on one GPU per rank (rank r on cuda:r), or gloo on
the CPU. tests/distributed/test_nccl.py runs the NCCL forms with it; tests/test_gpu_check.py runs the same
forms through it with gloo, so that the harness and the forms no GPU has run yet are run on every CI pass.

Never hangs: every rank's process group has ``pg_timeout`` (NCCL's watchdog aborts a collective stuck
past it), and after ``timeout`` seconds the call fails and kills the ranks that are left.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from manic import testing


def run(world: int, fn: Callable, *args: Any, backend: str = "nccl", timeout: float = 120.0,
        pg_timeout: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks over ``backend``; return the per-rank results."""
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise RuntimeError(f"{world} NCCL ranks need {world} CUDA devices, found {torch.cuda.device_count()}")
    return testing.run(world, fn, *args, timeout=timeout, pg_timeout=pg_timeout, backend=backend)
