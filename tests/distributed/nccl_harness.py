"""manic.testing.run with a choice of backend: NCCL on one GPU per rank (rank r on cuda:r), or gloo on
the CPU. tests/distributed/test_nccl.py runs the NCCL forms with it; tests/test_gpu_check.py runs the same
forms through it with gloo, so that the harness and the forms no GPU has run yet are run on every CI pass.

Never hangs: every rank's process group has ``pg_timeout`` (NCCL's watchdog aborts a collective stuck
past it), and after ``timeout`` seconds the call fails and kills the ranks that are left.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, results: Any,
            pg_timeout: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        device = None
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=pg_timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout), device_id=device)
        try:
            buf = io.BytesIO()  # tensors travel as bytes (on the CPU: the parent may have no GPU context)
            torch.save(fn(rank, world, *args), buf)
            results.put((rank, True, buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run(world: int, fn: Callable, *args: Any, backend: str = "nccl", timeout: float = 120.0,
        pg_timeout: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks over ``backend``; return the per-rank results."""
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise RuntimeError(f"{world} NCCL ranks need {world} CUDA devices, found {torch.cuda.device_count()}")
    ctx = mp.get_context("forkserver")  # (not fork: a CUDA context does not survive a fork)
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, store.port, backend, fn, args, results, pg_timeout),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []

    def take(item: tuple[int, bool, Any]) -> None:
        rank, ok, value = item
        if ok:
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{value}")

    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{backend} ranks {sorted(set(range(world)) - set(out))} did not finish within "
                                   f"{timeout}s (deadlock?); errors so far: {errors}")
            try:
                take(results.get(timeout=min(remaining, 1.0)))
                continue
            except queue_mod.Empty:
                pass
            if all(not p.is_alive() for p in procs):
                try:  # a result may still be in flight from a rank that just exited
                    take(results.get(timeout=2.0))
                except queue_mod.Empty:
                    codes = [p.exitcode for p in procs]
                    raise RuntimeError(f"ranks exited without a result (exit codes {codes}); errors: {errors}; "
                                       f"results: {out}") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("\n".join(errors) + f"\nresults of the other ranks: {out}")
    return [out[r] for r in range(world)]
