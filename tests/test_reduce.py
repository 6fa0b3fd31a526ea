"""manic.reduce: the reducers, detect() and check_config(), in one process and on one real
2-rank gloo group (the project's rank launcher, manic.testing.run, which tests/distributed/harness.py
re-exports). The function the ranks run is defined here at module level, so forkserver workers
import it from this module."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from manic import reduce
from manic.reduce import NoReduce, ProcessGroupReducer
from manic.testing import run  # == tests/distributed/harness.run


@pytest.fixture
def no_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this test process")


# --------------------------------------------------------------------------- one process
def test_no_reduce_returns_its_input():
    t = torch.tensor([1.0, -2.0, 3.0, 4.0])
    before = t.clone()
    assert NoReduce().all_reduce_sum(t) is t
    assert torch.equal(t, before)
    assert isinstance(NoReduce(), reduce.Reducer) and isinstance(NoReduce(), NoReduce)
    assert repr(NoReduce()) == "NoReduce()"


def test_process_group_reducer_needs_init(no_process_group):
    with pytest.raises(RuntimeError, match="init_process_group"):
        ProcessGroupReducer()


def test_detect_plain_tensors(no_process_group):
    params = [torch.zeros(3, requires_grad=True), torch.zeros(()), torch.zeros(0), torch.ones(2, 2)]
    reducer, counted = reduce.detect(params)
    assert isinstance(reducer, NoReduce) and counted == [True] * 4
    reducer, counted = reduce.detect([])
    assert isinstance(reducer, NoReduce) and counted == []


def test_detect_rejects_both_group_and_mesh():
    with pytest.raises(ValueError, match="process_group=.*device_mesh="):
        reduce.detect([torch.zeros(2)], process_group=object(), device_mesh=object())


def test_check_config_is_a_no_op_without_a_group(no_process_group):
    assert reduce.check_config({"eps": 1e-8, "num_betas": 6}) is None
    assert reduce.check_config({}) is None


# --------------------------------------------------------------------------- two gloo ranks
class Collectives(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def two_ranks(rank: int, world: int) -> dict[str, Any]:
    """Runs on each rank; returns plain values for the test process to check."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    out: dict[str, Any] = {"rank": rank}

    # ProcessGroupReducer: one all_reduce, summed in place, the input returned
    red = ProcessGroupReducer()
    t = torch.tensor([rank + 1.0, 10.0 * (rank + 1), -0.5, 2.0 ** (-rank)], dtype=torch.float64)
    with Collectives() as c:
        got = red.all_reduce_sum(t)
    out["sum"] = got.tolist()
    out["sum_same_object"] = got is t
    out["sum_collectives"] = c.count
    out["reducer_repr"] = repr(red)

    # FSDP2 on a small model: every parameter sharded over the world, counted by every rank
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))  # the last bias has 1 element
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    params = list(model.parameters())
    out["fsdp_all_dtensor"] = all(isinstance(p, DTensor) for p in params)
    reducer, counted = reduce.detect(params)
    out["fsdp_reducer"] = type(reducer).__name__
    out["fsdp_group_size"] = dist.get_world_size(reducer.group) if hasattr(reducer, "group") else None
    out["fsdp_counted"] = counted
    out["fsdp_local_numel"] = [p.to_local().numel() for p in params]
    out["fsdp_full_numel"] = [p.numel() for p in params]
    # the reducer it picked sums over the shards: sum of local numels = the model's size
    n = torch.tensor([float(sum(out["fsdp_local_numel"]))], dtype=torch.float64)
    out["fsdp_total_numel"] = reducer.all_reduce_sum(n).item()

    # a DTensor replicated on a 1-D mesh (and a plain tensor next to it): like DDP, nothing to reduce
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    torch.manual_seed(1)
    rep = distribute_tensor(torch.randn(3, 4), mesh, [Replicate()])
    reducer, counted = reduce.detect([rep, torch.zeros(2)])
    out["replicated_reducer"] = type(reducer).__name__
    out["replicated_counted"] = counted
    # ... but reduced over that mesh explicitly, a replicated parameter is counted by coordinate 0 only
    reducer, counted = reduce.detect([rep], device_mesh=mesh)
    out["replicated_mesh_reducer"] = type(reducer).__name__
    out["replicated_mesh_counted"] = counted

    # a Partial placement is refused, naming it
    part = DTensor.from_local(torch.ones(2, 2), mesh, [Partial()], run_check=False)
    out["partial_name"] = str(Partial())  # torch prints it as "P(sum)"
    try:
        reduce.detect([part])
        out["partial_error"] = None
    except ValueError as e:
        out["partial_error"] = str(e)

    # check_config: agreeing ranks pass; a differing field raises on every rank, naming it
    out["config_same"] = reduce.check_config({"eps": 1e-8, "num_betas": 6, "store_delta": True})
    try:
        reduce.check_config({"eps": 1e-8, "num_betas": 6 if rank == 0 else 3, "store_delta": True})
        out["config_error"] = None
    except ValueError as e:
        out["config_error"] = str(e)
    return out


@pytest.mark.timeout(120)
def test_two_gloo_ranks():
    results = run(2, two_ranks, timeout=100)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        rank = r["rank"]
        # (1 + 2, 10 + 20, -0.5 - 0.5, 1 + 0.5), exact in float64
        assert r["sum"] == [3.0, 30.0, -1.0, 1.5], rank
        assert r["sum_same_object"] and r["sum_collectives"] == 1, rank
        assert r["reducer_repr"] == "ProcessGroupReducer(size=2)"

        assert r["fsdp_all_dtensor"], rank
        assert r["fsdp_reducer"] == "ProcessGroupReducer" and r["fsdp_group_size"] == 2, rank
        assert r["fsdp_counted"] == [True] * 4, rank
        assert r["fsdp_full_numel"] == [32, 8, 8, 1]
        assert r["fsdp_total_numel"] == 32 + 8 + 8 + 1, rank

        assert r["replicated_reducer"] == "NoReduce" and r["replicated_counted"] == [True, True], rank
        assert r["replicated_mesh_reducer"] == "ProcessGroupReducer", rank
        assert r["replicated_mesh_counted"] == [rank == 0], rank

        err = r["partial_error"]
        assert err is not None and f"placement {r['partial_name']} on mesh dim 0" in err, (rank, err)

        assert r["config_same"] is None
        msg = r["config_error"]
        assert msg is not None and "num_betas" in msg and "rank 0=6" in msg and "rank 1=3" in msg, (rank, msg)
        assert "eps" not in msg.split("Differences:")[1] and "store_delta" not in msg, (rank, msg)
    # the shards are disjoint and cover each parameter (the 1-element bias: one rank holds it)
    local = [r["fsdp_local_numel"] for r in results]
    assert [a + b for a, b in zip(*local)] == [32, 8, 8, 1]
