"""scenarios.py's DDP and FSDP2 forms on any device: each rank on its own device (cuda:rank under NCCL,
the CPU under gloo), the float64 model and full batch of scenarios.py, checked against the single-process
run on the same device. Run over NCCL by test_nccl.py (2+ GPUs) and over gloo by tests/test_gpu_check.py.

Per step after the first: DDP adds no collective to the step (its gradients are already all-reduced), FSDP2
exactly one, an all-reduce; no host sync (aten::_local_scalar_dense) in either. The scale is bitwise the
same on every rank. Tolerance 1e-9 (scenarios.py's gloo forms hold 1e-10 on the CPU; a GPU sums in other
orders, and nothing has measured by how much the closed loop amplifies that yet).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import manic
import scenarios

TOL = 1e-9


def device_of(rank: int, device_type: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, device: torch.device,
          counts: list | None = None) -> list[float]:
    return scenarios.train(model, opt, steps, counts=counts, device=device, names=True)


def baseline(device: torch.device, **options: Any) -> tuple[list[torch.Tensor], list[float]]:
    model = scenarios.make_net().to(device)
    opt = manic.mechanize(scenarios.base(model.parameters()), **options)
    scales = train(model, opt, scenarios.STEPS, device)
    return [p.detach().clone() for p in model.parameters()], scales


def check(name: str, model: nn.Module, unwrapped: nn.Module, all_reduces: int, device: torch.device,
          **options: Any) -> dict[str, Any]:
    opt = manic.mechanize(scenarios.base(model.parameters()), **options)
    counts: list = []
    scales = train(model, opt, scenarios.STEPS, device, counts)
    for t, (names, syncs) in enumerate(counts[1:], 1):  # (the first step also checks the configuration)
        assert syncs == 0, f"{name}: {syncs} host syncs in step {t}"
        assert len(names) == all_reduces and all(re.search(r"all_?reduce", n) for n in names), \
            f"{name}: step {t} issued {names}, want {all_reduces} all-reduce(s)"
    ref_params, ref_scales = baseline(device, **options)
    params = [scenarios.full(p) for p in unwrapped.parameters()]
    assert all(p.device == device for p in params), f"{name}: parameters on {[p.device for p in params]}"
    worst_p = max(scenarios.rel(a, b) for a, b in zip(params, ref_params))
    worst_s = max(abs(a - b) / b for a, b in zip(scales, ref_scales))
    mine = torch.tensor(scales, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    assert ref_scales[-1] > 1e-3, f"{name}: the scale never moved: the comparison would be weak"
    return {"params_rel": worst_p, "scale_rel": worst_s, "same_scale_on_every_rank": same,
            "collectives_per_step": [len(n) for n, _ in counts], "device": str(params[0].device)}


def ddp(rank: int, world: int, device: torch.device, **options: Any) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = scenarios.make_net().to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return check("ddp", model, model.module, 0, device, **options)


def fsdp2(rank: int, world: int, device: torch.device, **options: Any) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    model = scenarios.shard2(scenarios.make_net().to(device), mesh)
    return check("fsdp2", model, model, 1, device, **options)


def forms(rank: int, world: int, device_type: str) -> dict[str, dict]:
    """DDP and FSDP2 in the default form, FSDP2 with state="delta" and in the original form."""
    device = device_of(rank, device_type)
    return {"ddp": ddp(rank, world, device), "fsdp2": fsdp2(rank, world, device),
            "fsdp2_delta": fsdp2(rank, world, device, state="delta"),
            "fsdp2_original": fsdp2(rank, world, device, **scenarios.ORIGINAL)}


def check_results(results: list[dict[str, dict]], device_type: str) -> None:
    """What test_nccl.py asserts of forms()'s results (and tests/test_gpu_check.py of the gloo run)."""
    for rank, out in enumerate(results):
        assert set(out) == {"ddp", "fsdp2", "fsdp2_delta", "fsdp2_original"}, sorted(out)
        for form, r in out.items():
            want_device = f"cuda:{rank}" if device_type == "cuda" else "cpu"
            assert r["device"] == want_device, (form, r["device"], want_device)
            assert r["params_rel"] <= TOL and r["scale_rel"] <= TOL, (form, r)
            assert r["same_scale_on_every_rank"], form
            per_step = r["collectives_per_step"]
            assert per_step[1:] == [0 if form == "ddp" else 1] * (len(per_step) - 1), (form, per_step)
