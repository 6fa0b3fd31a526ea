"""partitions.py and deepspeed_zero.py: one Mechanic step over partitions stepped one at a time, as DeepSpeed
ZeRO steps them, and how DeepSpeed is found behind the engine.

On one process, with stand-ins that do around the client optimizer what DeepSpeed 0.19.8 does
(``Zero12``: stage_1_and_2.py's ``step`` / ``_optimizer_step``; ``Zero3``: stage3.py's, with
sub-groups and its checkpoint's ``_set`` / ``_clear_fp32_optimizer_param_groups``). DeepSpeed itself,
on 2 gloo ranks and through HF Trainer, is tests/frameworks/test_deepspeed.py's; these are the fast
checks of the same path: the trajectory of the ordinary step (float64, every state mode, per_group),
one reduction and no host sync per step, a bitwise checkpoint round trip, and what is refused.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import manic
from manic.deepspeed_zero import NOT_UNDER_ZERO
from manic.testing import Count
from nets import MLP

LR, STEPS = 1e-2, 12


pytestmark = pytest.mark.usefixtures("one_rank")  # (conftest.py)


def model() -> MLP:
    torch.manual_seed(0)
    return MLP().double()


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(32, 8, generator=g, dtype=torch.float64)
    return X, torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], 1)


def groups(net: MLP) -> list[list[Tensor]]:
    """HF Trainer's split: weight matrices, and the rest (biases, the gain) without weight decay."""
    return [[p for p in net.parameters() if p.dim() > 1], [p for p in net.parameters() if p.dim() <= 1]]


def base_groups(params: list[list[Tensor]]) -> list[dict[str, Any]]:
    # (with fused AdamW, which reads no step counter on the host: the sync count is Mechanic's alone)
    return [{"params": params[0]}, {"params": params[1], "weight_decay": 0.0}]


def _flat_views(params: list[Tensor]) -> Tensor:
    """One flat buffer holding ``params``' values, the parameters made views of it (as DeepSpeed's)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


class Zero12:
    """ZeRO-1/2 on one rank: per param group one flat fp32 partition, which the client optimizer holds;
    the group's gradient is made just before its client step and freed after it, and the partition is
    then copied into the model's weights; the client sees one group per step."""

    def __init__(self, params: list[list[Tensor]], client: torch.optim.Optimizer) -> None:
        self.bit16_groups = params
        self.parallel_partitioned_bit16_groups = [[_flat_views(ps)] for ps in params]
        self.single_partition_of_fp32_groups = [g[0].clone().requires_grad_(True)
                                                for g in self.parallel_partitioned_bit16_groups]
        self.real_dp_process_group = [dist.group.WORLD] * len(params)
        self.optimizer = client
        for group, flat in zip(client.param_groups, self.single_partition_of_fp32_groups):
            group["params"] = [flat]

    def step(self) -> None:
        for i, params in enumerate(self.bit16_groups):
            fp32 = self.single_partition_of_fp32_groups[i]
            fp32.grad = torch.cat([p.grad.reshape(-1) for p in params])
            self._optimizer_step(i)
            fp32.grad = None
            self.parallel_partitioned_bit16_groups[i][0].data.copy_(fp32.data)

    def _optimizer_step(self, group_no: int) -> None:
        original_param_groups = self.optimizer.param_groups
        self.optimizer.param_groups = [original_param_groups[group_no]]
        self.optimizer.step()
        self.optimizer.param_groups = original_param_groups


class Zero3:
    """ZeRO-3 on one rank: each group split into sub-groups of about ``size`` elements, each with its flat
    fp32 partition; between steps the client's groups are empty, and during a sub-group's step its group
    holds that sub-group's partition alone; a checkpoint shows every partition in its group."""

    def __init__(self, params: list[list[Tensor]], client: torch.optim.Optimizer, size: int) -> None:
        self.fp16_groups, self.sub_group_to_group_id = [], []
        for g, ps in enumerate(params):
            sub: list[Tensor] = []
            for p in ps:
                sub.append(p)
                if sum(q.numel() for q in sub) >= size or p is ps[-1]:
                    self.fp16_groups.append(sub)
                    self.sub_group_to_group_id.append(g)
                    sub = []
        self.fp16_partitioned_groups_flat = [_flat_views(ps) for ps in self.fp16_groups]
        self.fp32_partitioned_groups_flat = [f.clone().requires_grad_(True) for f in self.fp16_partitioned_groups_flat]
        self.optimizer = client
        self._clear_fp32_optimizer_param_groups()

    def step(self) -> None:
        for s, params in enumerate(self.fp16_groups):
            self.fp32_partitioned_groups_flat[s].grad = torch.cat([p.grad.reshape(-1) for p in params])
            self._optimizer_step(s)
            self._reassign_or_swap_out_partitioned_parameters(s)
            self.fp32_partitioned_groups_flat[s].grad = None

    def _optimizer_step(self, sub_group_id: int) -> None:
        group = self.optimizer.param_groups[self.sub_group_to_group_id[sub_group_id]]
        group["params"] = [self.fp32_partitioned_groups_flat[sub_group_id]]
        self.optimizer.step()
        group["params"] = []

    def _reassign_or_swap_out_partitioned_parameters(self, sub_group_id: int) -> None:
        self.fp16_partitioned_groups_flat[sub_group_id].data.copy_(self.fp32_partitioned_groups_flat[sub_group_id].data)

    def _set_fp32_optimizer_param_groups(self) -> None:
        for s, flat in enumerate(self.fp32_partitioned_groups_flat):
            self.optimizer.param_groups[self.sub_group_to_group_id[s]]["params"].append(flat)

    def _clear_fp32_optimizer_param_groups(self) -> None:
        for group in self.optimizer.param_groups:
            group["params"] = []

    def state_dict(self) -> dict[str, Any]:
        self._set_fp32_optimizer_param_groups()
        sd = copy.deepcopy(self.optimizer.state_dict())
        self._clear_fp32_optimizer_param_groups()
        return {"optimizer": sd, "fp32": [f.detach().clone() for f in self.fp32_partitioned_groups_flat]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._set_fp32_optimizer_param_groups()
        self.optimizer.load_state_dict(sd["optimizer"])
        self._clear_fp32_optimizer_param_groups()
        for s, saved in enumerate(sd["fp32"]):
            self.fp32_partitioned_groups_flat[s].data.copy_(saved)
            self.fp16_partitioned_groups_flat[s].data.copy_(saved)


def run(kind: str, steps: int = STEPS, size: int = 100, **options: Any) -> dict[str, Any]:
    """``steps`` full-batch steps of the float64 MLP with a mechanized AdamW on two param groups:
    ``"plain"`` steps it with every group at once, ``"zero12"`` / ``"zero3"`` through the stand-ins."""
    net = model()
    params = groups(net)
    opt = manic.mechanize(torch.optim.AdamW(base_groups(params), lr=LR, fused=True), **options)
    zero = {"plain": None, "zero12": lambda: Zero12(params, opt), "zero3": lambda: Zero3(params, opt, size)}[kind]
    zero = zero() if zero is not None else None
    X, y = data()
    scales, counts = [], []
    for _ in range(steps):
        net.zero_grad()
        torch.nn.functional.mse_loss(net(X), y).backward()
        with Count() as c:
            (zero or opt).step()
        counts.append(c.syncs)
        scales.append(opt.scale.detach().clone())
    return {"scales": torch.stack(scales), "params": [p.detach().clone() for p in net.parameters()], "opt": opt,
            "zero": zero, "syncs": counts, "net": net}


def rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


@pytest.mark.parametrize("kind", ["zero12", "zero3"])
@pytest.mark.parametrize("options", [{}, {"state": "ref"}, {"state": "delta"}, {"per_group": True},
                                     {"variant": "original"}], ids=["ref+delta", "ref", "delta", "per_group", "original"])
def test_the_ordinary_steps_trajectory(kind, options):
    """Two parts (ZeRO-1/2: a group each) or four (ZeRO-3: sub-groups of 100 elements or more): the scale after
    every step and the model are those of the same optimizer stepped with every group at once (float64,
    1e-12: the same sums, added in another order), with no host sync."""
    ref, got = run("plain", **options), run(kind, **options)
    assert repr(got["opt"]._engine.parts).startswith(f"<{2 if kind == 'zero12' else 4} parts")
    assert rel(got["scales"], ref["scales"]) <= 1e-12, (got["scales"], ref["scales"])
    for p, q in zip(got["params"], ref["params"]):
        assert rel(p, q) <= 1e-12
    assert (ref["scales"][-1] > 10 * ref["scales"][0]).all()
    assert got["syncs"] == [0] * STEPS


def test_one_reduction_per_step():
    """The parts' sums go into one call of the reducer per step, at the last part."""
    calls = []

    class Counting(manic.NoReduce):
        def all_reduce_sum(self, tensor: Tensor) -> Tensor:
            calls.append(tuple(tensor.shape))
            return tensor

    got = run("zero3", steps=4, reducer=Counting())
    assert calls == [(4,)] * 4
    assert rel(got["scales"], run("plain", steps=4)["scales"]) <= 1e-12


@pytest.mark.parametrize("options", [{}, {"state": "delta"}, {"per_group": True}], ids=["ref+delta", "delta", "per_group"])
def test_zero3_checkpoint_resumes_bitwise(options):
    """A checkpoint as ZeRO-3 takes it (every sub-group's partition shown in its group) at step 6, loaded
    into fresh stand-ins, 6 more steps: bitwise the uninterrupted run."""
    whole = run("zero3", **options)
    first = run("zero3", steps=STEPS // 2, **options)
    sd = first["zero"].state_dict()
    assert any(k.startswith("mechanic_") for entry in sd["optimizer"]["state"].values() for k in entry)
    net = model()
    params = groups(net)
    opt = manic.mechanize(torch.optim.AdamW(base_groups(params), lr=LR, fused=True), **options)
    zero = Zero3(params, opt, 100)
    zero.load_state_dict(sd)
    X, y = data()
    scales = []
    for _ in range(STEPS - STEPS // 2):
        net.zero_grad()
        torch.nn.functional.mse_loss(net(X), y).backward()
        zero.step()
        scales.append(opt.scale.detach().clone())
    assert torch.equal(torch.stack(scales), whole["scales"][STEPS // 2:])
    assert all(torch.equal(p.detach(), q) for p, q in zip(net.parameters(), whole["params"]))


def test_one_part_takes_the_ordinary_step():
    """One group under ZeRO-1/2 (one part): nothing of partitions.py runs."""
    net = model()
    opt = manic.mechanize(torch.optim.AdamW(net.parameters(), lr=LR))
    zero = Zero12([list(net.parameters())], opt)
    X, y = data()
    torch.nn.functional.mse_loss(net(X), y).backward()
    zero.step()
    assert opt._engine.parts is NOT_UNDER_ZERO and int(opt.stats()["step"]) == 1


def test_skip_nonfinite_is_refused_before_anything_moves():
    """skip_nonfinite=True cannot skip the base step of the parts before the last: refused at the first
    part, naming the cause and the fix."""
    net = model()
    params = groups(net)
    opt = manic.mechanize(torch.optim.AdamW(base_groups(params), lr=LR, fused=True), skip_nonfinite=True)
    zero = Zero12(params, opt)
    before = [p.detach().clone() for p in net.parameters()]
    X, y = data()
    torch.nn.functional.mse_loss(net(X), y).backward()
    with pytest.raises(ValueError, match="skip_nonfinite=False") as info:
        zero.step()
    assert "once per param group, 2 times per step" in str(info.value) and "one param group" in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert int(opt.stats()["step"]) == 0 and not opt.state


def test_a_step_stopped_between_parts_is_refused_at_the_next():
    """A base step that raises at the second part: the first part has stepped without the rebase, so the
    next step raises, saying so (a base step that raises at the first part leaves Mechanic as it was)."""
    class Failing(torch.optim.AdamW):
        calls = 0

        def step(self, closure: Any = None) -> Any:
            Failing.calls += 1
            if Failing.calls == 2:
                raise RuntimeError("out of memory, on purpose")
            return super().step(closure)

    net = model()
    params = groups(net)
    opt = manic.mechanize(Failing(base_groups(params), lr=LR, fused=True))
    zero = Zero12(params, opt)
    X, y = data()
    torch.nn.functional.mse_loss(net(X), y).backward()
    with pytest.raises(RuntimeError, match="on purpose"):
        zero.step()
    # (DeepSpeed does not put the groups back either: the engine is broken, and Mechanic says why)
    with pytest.raises(RuntimeError, match="previous step stopped after part 1 of 2"):
        zero.step()


def test_stepping_outside_deepspeed_raises():
    """Once under ZeRO with several parts, a step that does not come from DeepSpeed's part-by-part step
    is refused (it would show Mechanic some parts only)."""
    got = run("zero12", steps=1)
    with pytest.raises(RuntimeError, match="outside DeepSpeed's step"):
        got["opt"].step()


def test_not_under_deepspeed_is_looked_up_once():
    net = model()
    opt = manic.mechanize(torch.optim.AdamW(net.parameters(), lr=LR))
    X, y = data()
    torch.nn.functional.mse_loss(net(X), y).backward()
    opt.step()
    assert opt._engine.parts is NOT_UNDER_ZERO
