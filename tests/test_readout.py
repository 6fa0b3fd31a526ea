"""readout.py and engine_of: what users read of a Mechanic (stats, scale, effective lr) in both forms, and
finding the engine behind a mechanized optimizer, a Mechanic or a base optimizer under either."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import manic
from manic.readout import effective_lrs, per_group


def _wrapped(form, base):
    """(the object that reads out Mechanic, a function taking one step) in either form."""
    if form == "dropin":
        opt = manic.mechanize(base)
        return opt, opt.step
    updater = manic.Updater(base)
    mechanic = manic.Mechanic(updater)
    return mechanic, lambda: (mechanic.step(), updater.step())


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_stats_keys_are_stable_from_construction(form):
    """The six documented keys before the first step (the last step's readouts are NaN then) and after."""
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    base = torch.optim.SGD([p], lr=0.1)
    opt, step = _wrapped(form, base)
    keys = {"scale", "step", "skipped_steps", "h", "grad_norm", "param_norm"}
    before = opt.stats()
    assert set(before) == keys and all(before[k].isnan() for k in ("h", "grad_norm", "param_norm"))
    p.grad = torch.ones(3, dtype=torch.float64)
    step()
    after = opt.stats()
    assert set(after) == keys and after["grad_norm"].item() == pytest.approx(3 ** 0.5)


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_effective_lr_is_scale_times_each_groups_lr(form):
    a, b, c = (torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    base = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02},
                            {"params": [c], "lr": 0.5, "mechanic": False}], lr=0.1)
    opt, step = _wrapped(form, base)
    for t in range(5):
        for p in (a, b, c):
            p.grad = torch.full((2,), 1.0 + t, dtype=torch.float64)
        step()
    S = opt.scale
    lrs = opt.effective_lr
    assert [x.item() for x in lrs] == [(S * 0.1).item(), (S * 0.02).item(), 0.5]
    assert all(x.dim() == 0 and x.dtype == S.dtype for x in lrs)


def test_engine_of_finds_the_engine_behind_every_face():
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    base = torch.optim.SGD([p], lr=0.1)
    assert manic.engine_of(base) is None and manic.engine_of(object()) is None
    opt = manic.mechanize(base)
    engine = manic.engine_of(opt)
    assert engine is not None and manic.engine_of(base) is engine and engine.optimizer is base
    other = torch.optim.SGD([torch.ones(2, requires_grad=True)], lr=0.1)
    updater = manic.Updater(other)
    assert manic.engine_of(updater) is None  # an Updater is not a Mechanic
    mechanic = manic.Mechanic(updater)
    assert manic.engine_of(mechanic) is manic.engine_of(other) is not None
    # a deep copy's base optimizer leads to the copy's engine
    twin = copy.deepcopy(opt)
    assert manic.engine_of(twin.base_optimizer) is manic.engine_of(twin) is not engine
    # the engine goes with the optimizer wrapping it: the base is then under no Mechanic
    gone = weakref.ref(engine)
    del opt, engine
    gc.collect()
    assert gone() is None and manic.engine_of(base) is None


def test_effective_lrs_and_per_group():
    S = torch.tensor([2.0, 3.0], dtype=torch.float64)
    groups = [{"lr": 0.1}, {"lr": 0.5, "mechanic": False}]
    assert [t.item() for t in effective_lrs(S, groups)] == [0.2, 0.5]
    assert [t.item() for t in effective_lrs(S, groups, [0.2, 0.25])] == [0.4, 0.25]
    assert per_group(S, 1).item() == 3.0
    one = torch.tensor(2.0)
    assert per_group(one, 0) is one  # the one tuner's scale for every group
