"""Real multi-process groups for tests and benchmarks: start N ranks (gloo on CPU, or NCCL with one GPU per
rank) with a hard timeout, and count what a step dispatches.

Used by manic's own tests and benchmarks, and usable for testing an integration of manic:
``manic.testing.run(2, fn)`` runs ``fn(rank, world)`` on two ranks and returns their results;
``with manic.testing.Count() as c: opt.step()`` counts the step's collectives and host syncs.

Each call gets a fresh TCPStore on port 0 and forkserver workers; a rank that raises reports
its traceback; a rank that hangs (e.g. waiting in a collective) makes the call fail after
``timeout`` seconds instead of hanging the suite.
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
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")


class Count(TorchDispatchMode):
    """What the block dispatches: the collectives (``names`` in order, ``collectives`` how many, ``bytes``
    of their tensor arguments) and the host syncs (``syncs``: aten._local_scalar_dense, what ``.item()``
    and ``bool()`` of a tensor dispatch to). Compiled code does not run under a dispatch mode."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.bytes = 0
        self.syncs = 0

    @property
    def collectives(self) -> int:
        return len(self.names)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN201
        if func.namespace in COLLECTIVE_NAMESPACES:
            self.names.append(str(func))
            for a in (*args, *(kwargs or {}).values()):
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        self.bytes += t.numel() * t.element_size()
        elif func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, results: Any,
            pg_timeout: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        device = None
        if backend == "nccl":  # one GPU per rank
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=pg_timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout), device_id=device)
        try:
            # tensors travel as bytes (on the CPU): torch's shared-memory passing needs the sender alive, and
            # the parent may have no GPU context
            buf = io.BytesIO()
            torch.save(fn(rank, world, *args), buf)
            results.put((rank, True, buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run(world: int, fn: Callable, *args: Any, timeout: float = 120.0, pg_timeout: float = 60.0,
        backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks over ``backend`` (``"nccl"``: rank r on cuda:r);
    return the per-rank results."""
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
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)  # (the ranks' own results)
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
