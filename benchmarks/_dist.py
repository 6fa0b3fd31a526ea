"""Shared by the distributed benchmarks: start ranks (manic.testing, which also counts what a step
sends), build a model, wrap it in a parallel form."""

from __future__ import annotations

import sys
from typing import Any

import torch

from manic import testing as harness  # forkserver ranks, gloo, a hard timeout

run = harness.run


def width(n_params: float) -> int:
    return 512 if n_params < 4e6 else 1024


def mlp(n_params: float, seed: int = 0) -> torch.nn.Sequential:
    """Linear + Tanh blocks of about ``n_params`` parameters, input width ``width(n_params)``."""
    w = width(n_params)
    layers = max(2, round(n_params / (w * w + w)))
    torch.manual_seed(seed)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(w, w), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks)


def wrap(model: torch.nn.Sequential, setup: str, world: int) -> Any:
    """Parallelise ``model`` for ``setup`` in ddp | fsdp2 | hsdp | fsdp1 | tp."""
    if setup == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if setup in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if setup == "hsdp" \
            else None
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if setup == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    if setup == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        linears = [i for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)]
        plan = {str(i): (ColwiseParallel() if k % 2 == 0 else RowwiseParallel()) for k, i in enumerate(linears)}
        return parallelize_module(model, mesh, plan)
    raise ValueError(setup)


def publish(name: str, args: Any, lines: list[str], notes: list[str], failures: list[str]) -> None:
    """Print a distributed benchmark's table, notes and failures, and save them under results/."""
    import shlex

    import _common

    command = shlex.join(["python", f"benchmarks/{name}.py", *sys.argv[1:]])
    text = "\n".join(lines + [""] + notes + ["", _common.env_line(command, "gloo on CPU, 1 thread per rank")])
    if failures:
        text += "\n\n## Failures\n\n" + "\n\n".join(failures)
    print("\n" + text)
    _common.save(args.out, name, args.quick, text)
