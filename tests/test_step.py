"""step.py: a step as a value: ``prepare`` changes nothing and returns an immutable plan (idle before the
first non-zero lr), the partial sums come per tuner, the invariant form's unit per group, and a base step
that raises drops the plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import manic
from manic import kernels, step

F64 = torch.float64


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64).requires_grad_() for shape in ((3, 2), (4,), (2, 2))]


def _groups(params: list[torch.Tensor], lr: float = 0.1) -> list[dict]:
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}]


def _engine(params, **options):
    opt = manic.mechanize(torch.optim.SGD(_groups(params), lr=0.1, momentum=0.9), **options)
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.1 * (i + 1))
    return opt, manic.engine_of(opt)


def _prepare(engine) -> step.Plan:
    layout, buffers = engine.bound()
    return step.prepare(engine.optimizer.param_groups, layout, buffers, engine.tuner, engine.started, engine.options,
                        engine.hyper, kernels.EAGER, engine.betas(layout))


@pytest.mark.parametrize("state", ["ref+delta", "ref", "delta"])
def test_prepare_changes_nothing_and_the_plan_is_frozen(state):
    params = _params()
    opt, engine = _engine(params, state=state)
    opt.step()  # started: buffers exist
    before = [p.detach().clone() for p in params]
    bufs = {i: {k: t.clone() for k, t in b.items()} for i, b in engine.buffers.items()}
    tuner = {k: t.clone() for k, t in engine.tuner.tensors().items()}
    plan = _prepare(engine)
    assert plan.update is not None and plan.started
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(engine.buffers[i][k], t) for i, b in bufs.items() for k, t in b.items())
    assert all(torch.equal(engine.tuner.tensors()[k], t) for k, t in tuner.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.started = False  # type: ignore[misc]
    # the transient is the mode's: x_t - x_ref ("ref"), a copy of x_t ("delta"), none ("ref+delta")
    assert (plan.update.transient is None) == (state == "ref+delta")


def test_an_idle_plan_before_the_first_nonzero_lr():
    params = _params()
    opt, engine = _engine(params)
    for g in opt.param_groups:
        g["lr"] = 0.0
    plan = _prepare(engine)
    assert plan.update is None and not plan.started and sorted(plan.buffers) == [0, 1, 2]


@pytest.mark.parametrize("state", ["ref+delta", "ref", "delta"])
def test_local_sums_come_per_tuner_and_add_up_to_one_tuner_s(state):
    sums = {}
    for per_group in (False, True):
        opt, engine = _engine(_params(), state=state, per_group=per_group)
        layout = engine._bind()
        gen = torch.Generator().manual_seed(1)
        buffers = {s.index: {k: torch.randn(s.ref().shape, generator=gen, dtype=F64) for k in engine.hyper.mode.keys}
                   for s in layout.slots}
        xs, bufs = step.views(layout, buffers)
        sums[per_group] = step.local_sums(layout, xs, engine.hyper.mode.direction(xs, bufs)[0], kernels.EAGER)
        assert layout.tuners == (((0, 1), (2,)) if per_group else ((0, 1, 2),))
        assert sums[per_group].shape == (len(layout.tuners), 4)
    torch.testing.assert_close(sums[True].sum(0), sums[False][0], rtol=1e-14, atol=0)


def test_lr_units():
    groups = [{"lr": 0.1, "params": []}, {"lr": 0.0, "params": []}, {"lr": 0.5, "mechanic": False, "params": []}]
    assert step.all_lr_zero([{"lr": 0.0}, {"lr": 1.0, "mechanic": False}])
    assert not step.all_lr_zero(groups)
    assert step.lr_unit(groups) == 0.1  # the largest lr of Mechanic's groups
    assert step.lr_refs(groups) == [0.1, 0.1, 0.1]  # a group without a positive lr, or opted out: the largest
    groups[0]["initial_lr"] = 0.2  # before the schedule
    assert step.lr_unit(groups) == 0.2
    with pytest.raises(ValueError, match="invariant.*lr"):
        step.lr_unit([{"lr": 0.0}])


def test_a_base_step_that_raises_drops_the_plan():
    params = _params()
    opt, engine = _engine(params)
    opt.step()
    scale, before = opt.scale.clone(), [p.detach().clone() for p in params]
    engine.prepare()

    def boom():
        raise RuntimeError("base step failed")

    with pytest.raises(RuntimeError, match="base step failed"):
        engine.step_base(boom)
    assert engine._plan is None and torch.equal(opt.scale, scale)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    opt.step()  # and the next step works
