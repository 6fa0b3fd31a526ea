"""Process group and model wrapping: gloo on CPU, NCCL on GPUs, one function per concern."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def choose_device(device: str, local_rank: int, local_world: int, cuda_available: bool, gpus: int) -> torch.device:
    """This process's device for ``--device`` (auto: CUDA if available, else the CPU): ``cuda:LOCAL_RANK``,
    one GPU per process, or the CPU. Refuses, naming the fix, ``--device cuda`` without CUDA and a node
    that starts more processes (``local_world``) than it has GPUs: every local rank decides the same
    from the node's process count, so none goes on to wait for a rank that stopped."""
    if device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"launch/train.py: --device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu" or (device == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        raise SystemExit(f"launch/train.py: --device cuda, but torch {torch.__version__} finds no CUDA device; "
                         "train on the CPU with --device cpu (gloo), or install a CUDA build of torch")
    if local_world > gpus:
        raise SystemExit(f"launch/train.py: {local_world} processes on this node but {gpus} CUDA device(s), and "
                         f"each process takes a GPU of its own (cuda:LOCAL_RANK): start at most {gpus} per node "
                         f"(torchrun --nproc-per-node {gpus}), or train on the CPU with gloo: --device cpu")
    return torch.device("cuda", local_rank)


def setup(device: str, timeout: float) -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    cuda = torch.cuda.is_available()
    try:
        dev = choose_device(device, local_rank, local_world, cuda, torch.cuda.device_count() if cuda else 0)
    except SystemExit:
        if local_rank == 0:
            raise  # the message, once per node
        raise SystemExit(1) from None
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 or "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout),
                                device_id=dev if use_cuda else None)
    return rank, world, dev


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, mode: str, world: int, device: torch.device) -> nn.Module:
    """Parallelise a GPT (launch/model.py) for ``mode``: none | ddp | fsdp2 | fsdp1 | hsdp."""
    model.to(device)
    if mode == "none":
        if world > 1:
            raise SystemExit("--parallel none with more than one process would train independent models")
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = None
        if mode == "hsdp":
            if world % 2:
                raise SystemExit(f"--parallel hsdp needs an even number of processes, got {world}")
            mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
        # The logits are a reshaped matmul output (a view); nothing modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)  # the root: embeddings, final norm and head
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=device, use_orig_params=True)
    raise SystemExit(f"unknown --parallel {mode!r}")


def agree(value: int, device: torch.device) -> int:
    """The largest of the ranks' ``value`` on every rank (one tiny all-reduce): e.g. the number of the
    signal that stopped any of them, 0 if none."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def share(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
