"""How Mechanic's per-step partial sums become global sums: the process-group abstraction.

A reducer has one method, ``all_reduce_sum(tensor)``, which returns the elementwise sum of
``tensor`` over every rank that holds a part of the model. Mechanic calls it exactly once per
step with one small packed tensor. ``NoReduce`` is the single-process (and fully replicated,
e.g. DDP) case: the local sums already are the global ones, so no collective is issued.

``detect`` picks the reducer from the parameters and says, per parameter, whether this rank
adds it to the sums: a parameter replicated across ranks of the reduction group is counted
once, by the group member at coordinate 0 of the replicated mesh dimensions.
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from .compat import is_dtensor, is_fsdp1_flat, is_strided_shard, local, root_mesh
from .options import check_sources


@runtime_checkable
class Reducer(Protocol):
    """Sums a tensor over the ranks that share a model; called once per step."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...


class NoReduce:
    """Single process, or parameters replicated on every rank: nothing to combine."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def __repr__(self) -> str:
        return "NoReduce()"


class ProcessGroupReducer:
    """One all-reduce (sum) over a torch.distributed process group."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroupReducer needs torch.distributed to be initialised first "
                               "(torch.distributed.init_process_group)")
        self.group = group if group is not None else dist.group.WORLD

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def __repr__(self) -> str:
        return f"ProcessGroupReducer(size={dist.get_world_size(self.group)})"


# --------------------------------------------------------------------------- detection
def _sharded_dims(p: Any) -> set[int]:
    """Dims of ``p.device_mesh`` over which ``p`` is sharded."""
    from torch.distributed.tensor import Replicate, Shard

    dims = set()
    for d, placement in enumerate(p.placements):
        if isinstance(placement, Shard) or is_strided_shard(placement):
            dims.add(d)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"Parameter placement {placement} on mesh dim {d} is not supported "
                             "(parameters must be Shard or Replicate); pass process_group= explicitly")
    return dims


def _in_root(mesh: Any, root: Any) -> list[int]:
    """Which dims of ``root`` the dims of ``mesh`` (a sub-mesh of it) are."""
    if mesh == root:
        return list(range(mesh.ndim))
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if not names or not root_names or any(n not in root_names for n in names):
        raise ValueError("Parameters live on device meshes that are not named slices of one mesh; "
                         "pass device_mesh= or process_group= explicitly")
    return [root_names.index(n) for n in names]


def _mesh_group(mesh: Any, dims: set[int]) -> Any:
    if len(dims) == 1:
        return mesh.get_group(next(iter(dims)))
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(f"Parameters are sharded over dims {sorted(dims)} of a {mesh.ndim}-D mesh; Mechanic "
                     "reduces over one mesh dim or a mesh spanning the world: pass process_group= (a group "
                     "spanning those dims) explicitly")


def detect(params: Sequence[Tensor], process_group: Any = None, device_mesh: Any = None
           ) -> tuple[Reducer, list[bool]]:
    """(reducer, whether this rank adds each parameter to the sums)."""
    check_sources(None, process_group, device_mesh)
    dtensors = [p for p in params if is_dtensor(p)]
    if device_mesh is not None or dtensors:
        # Work on the root mesh: FSDP2 + TP puts some parameters on a (dp, tp) mesh and
        # others on its dp slice, which are replicated over tp.
        root = device_mesh
        if root is None:
            root = root_mesh(dtensors[0].device_mesh)
        sharded = {}
        for p in dtensors:
            in_root = _in_root(p.device_mesh, root)
            sharded[id(p)] = {in_root[d] for d in _sharded_dims(p)}
        dims = set(range(root.ndim)) if device_mesh is not None else set().union(*sharded.values())
        if not dims:  # every parameter replicated everywhere: like DDP
            return NoReduce(), [True] * len(params)
        coord = root.get_coordinate()
        # a parameter replicated over some reduced dims is counted by coordinate 0 there
        contributes = [all(coord[d] == 0 for d in dims - sharded.get(id(p), set())) for p in params]
        return ProcessGroupReducer(_mesh_group(root, dims)), contributes
    if process_group is not None:
        return ProcessGroupReducer(process_group), [True] * len(params)
    if any(is_fsdp1_flat(p) for p in params):
        rank0 = dist.get_rank() == 0
        return ProcessGroupReducer(dist.group.WORLD), [is_fsdp1_flat(p) or rank0 for p in params]
    return NoReduce(), [True] * len(params)


def check_config(fields: dict[str, Any], group: Any = None, params: Sequence[Tensor] | None = None,
                 reduces: bool | None = None) -> None:
    """Every rank of ``group`` (default: the world) must agree on ``fields``; raise on all
    ranks if not. One collective (once, when Mechanic first steps); a no-op in a single process.

    With ``params`` and ``reduces`` (whether the detected reducer sums over ranks), it also
    compares what the ranks hold: ranks holding different parameters that nothing reduces over
    would each tune a scale of their own (DeepSpeed ZeRO hands each rank a different flat
    partition of plain tensors, and torch's ZeroRedundancyOptimizer a different subset), so that raises,
    before any difference in ``fields`` (a different number of parameters is one); identical parameters
    on every rank that are summed over ranks would count each of them world-size times, so that warns.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size(group) == 1:
        return
    mine = {"fields": fields, "held": _fingerprint(params) if params is not None else None}
    gathered = gather_objects(mine, group)
    diffs = {k: f"{k}: " + ", ".join(f"rank {r}={g['fields'].get(k)!r}" for r, g in enumerate(gathered))
             for k in fields if len({repr(g["fields"].get(k)) for g in gathered}) > 1}
    same = params is None or all(g["held"] == gathered[0]["held"] for g in gathered)
    if reduces is False and not same:
        # first, whatever else differs: a different number of parameters is what this looks like
        other = [d for k, d in diffs.items() if k != "num_params"]
        raise ValueError(
            "The ranks hold different parameters but Mechanic reduces its sums over no group (the "
            "parameters are plain tensors), so each rank would tune a scale of its own. Pass the group "
            "the parameters are split over: process_group=<the data-parallel group> (DeepSpeed ZeRO-1/2/3, "
            "or torch's ZeroRedundancyOptimizer with Mechanic inside, in pure data parallelism: "
            "process_group=torch.distributed.group.WORLD); or, if the ranks train independent models, say "
            "so with reducer=manic.NoReduce()" + (". The ranks also disagree on their Mechanic configuration: "
                                                  + "; ".join(other) if other else ""))
    if diffs:
        raise ValueError("Ranks disagree on their Mechanic configuration; build Mechanic identically on "
                         "every rank. Differences: " + "; ".join(diffs.values()))
    if params is None or reduces is None:
        return
    if reduces and same:
        warnings.warn("Every rank holds the same parameters, yet Mechanic sums over the ranks: each "
                      "parameter counts world-size times. Replicated training (DDP) needs no process_group=",
                      stacklevel=3)


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order: ``dist.all_gather_object`` without NumPy (torch's reads the bytes
    through ``Tensor.numpy()``, and manic depends on torch alone). Two all-gathers: the sizes, then the
    pickles padded to the longest."""
    data = pickle.dumps(obj)
    device = _object_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(n) for n in torch.cat(sizes).tolist()]
    mine = torch.zeros(max(lengths), dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return [pickle.loads(bytes(t[:n].cpu().tolist())) for t, n in zip(everyone, lengths)]


def _object_device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: the CPU for gloo (or a group with a gloo part) and MPI,
    else the current accelerator (NCCL: the current CUDA device)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator()
        return torch.device(kind.type, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _fingerprint(params: Sequence[Tensor]) -> list[tuple]:
    """What this rank holds: each local tensor's shape and sum (one host sync, once)."""
    if not params:
        return []
    sums = torch.stack([local(p).detach().sum(dtype=torch.float64) for p in params]).tolist()
    return [(tuple(local(p).shape), s) for p, s in zip(params, sums)]
