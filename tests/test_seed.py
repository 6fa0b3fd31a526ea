"""seed.py: the seed pair. ``Updater`` steps the base optimizer, then its scheduler (through the engine a
``Mechanic`` attached to it), and keeps its own state apart from Mechanic's; ``Mechanic`` reads like
an LR scheduler."""

from __future__ import annotations

import pytest
import torch

import manic
from manic.state import REF

F64 = torch.float64


def _base(seed: int = 0) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(seed)
    params = [torch.randn(3, 2, dtype=F64, requires_grad=True), torch.randn(4, dtype=F64, requires_grad=True)]
    return params, torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _grads(params, t: int) -> None:
    for p in params:
        p.grad = torch.full_like(p, 0.1 * (t + 1))


def test_updater_alone_steps_the_base_then_the_scheduler():
    params, base = _base()
    twin_params, twin = _base()
    updater = manic.Updater(base, torch.optim.lr_scheduler.StepLR(base, 1, gamma=0.5))
    sched = torch.optim.lr_scheduler.StepLR(twin, 1, gamma=0.5)
    for t in range(3):
        _grads(params, t)
        _grads(twin_params, t)
        updater.step()
        twin.step()
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert updater.get_last_lr() == sched.get_last_lr() == [0.1 / 8]


def test_mechanic_attaches_its_engine_to_the_updater():
    params, base = _base()
    updater = manic.Updater(base)
    mechanic = manic.Mechanic(updater)
    _grads(params, 0)
    with pytest.raises(RuntimeError, match=r"mechanic\.step\(\)"):  # the updater steps through the engine
        updater.step()
    mechanic.step()
    updater.step()
    assert int(mechanic.stats()["step"]) == 1
    _, other = _base(1)
    with pytest.raises(ValueError, match="another optimizer"):
        manic.Updater(other).attach(manic.engine_of(mechanic))


def test_updater_state_is_the_base_s_and_the_scheduler_s_alone():
    params, base = _base()
    updater = manic.Updater(base, torch.optim.lr_scheduler.StepLR(base, 2))
    mechanic = manic.Mechanic(updater)
    for t in range(3):
        _grads(params, t)
        mechanic.step()
        updater.step()
    sd = updater.state_dict()
    assert set(sd) == {"base_optimizer", "lr_scheduler"}
    assert not any(k.startswith("mechanic_") for g in sd["base_optimizer"]["param_groups"] for k in g)
    assert not any(k.startswith("mechanic_") for st in sd["base_optimizer"]["state"].values() for k in st)
    buffers = [base.state[p][REF] for p in params]
    updater.load_state_dict(sd)  # the base's state is replaced: Mechanic's buffers are published into it again
    assert all(base.state[p][REF] is b for p, b in zip(params, buffers))
    assert "momentum_buffer" in base.state[params[0]]


def test_mechanic_reads_like_a_scheduler():
    params, base = _base()
    mechanic = manic.Mechanic(manic.Updater(base), per_group=False)
    assert mechanic.get_last_lr() == [pytest.approx(mechanic.scale.item())]
    assert mechanic.optimizer is base
