"""The drop-in object honours the torch.optim.Optimizer contract; checkpoints resume bitwise."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import manic


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2)).to(dtype)


def _batch(t, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + t)
    X = torch.randn(32, 5, generator=g, dtype=dtype)
    return X, torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], 1)


def _loss(model, t):
    X, y = _batch(t, next(model.parameters()).dtype)
    return torch.nn.functional.mse_loss(model(X), y)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_is_an_optimizer_sharing_groups_and_state():
    model = _model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = manic.mechanize(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.base_optimizer is base


@pytest.mark.parametrize("on", ["wrapper", "base"])
def test_lr_scheduler_on_either_object_drives_the_base_lr(on):
    model = _model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = manic.mechanize(base)
    sched = torch.optim.lr_scheduler.StepLR(opt if on == "wrapper" else base, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(4):
            opt.zero_grad()
            _loss(model, t).backward()
            opt.step()
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


def test_step_hooks_fire_once_per_step():
    model = _model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    g1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("gpre", o)))
    g2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append(("gpost", o)))
    try:
        _loss(model, 0).backward()
        opt.step()
    finally:
        for h in (h1, h2, g1, g2):
            h.remove()
    assert sorted(kind for kind, _ in calls) == ["gpost", "gpre", "post", "pre"]
    assert all(o is opt for _, o in calls)


def test_state_dict_and_load_hooks():
    model = _model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    _loss(model, 0).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["extra"] == 1 and "mechanic_delta" in sd["state"][0]
    opt.load_state_dict(sd)
    assert seen == ["sd_pre", "load_pre", "load_post"]


def test_deepcopy_is_independent():
    model = _model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for t in range(3):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
    twin = copy.deepcopy(opt)
    before, scale = _params(model), opt.scale.clone()
    twin_params = twin.param_groups[0]["params"]
    for p in twin.param_groups[0]["params"] + twin.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    assert torch.equal(opt.scale, scale) and not torch.equal(twin.scale, scale)
    assert not any(torch.equal(a, b) for a, b in zip(before, twin_params))


def test_repr_is_informative():
    opt = manic.mechanize(torch.optim.AdamW(_model().parameters(), lr=1e-2), weight_decay=0.05)
    text = repr(opt)
    assert "AdamW" in text and "weight_decay=0.05" in text and "store_delta=True" in text


def _run(form, store_delta, steps, state=None):
    """Train `steps` steps (optionally from saved state); returns (params, scale, saved state)."""
    model = _model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if form == "dropin":
        opt = manic.mechanize(base, store_delta=store_delta)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 40)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        scale = lambda: opt.scale  # noqa: E731
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, 40)
        updater = manic.Updater(base, sched)
        mechanic = manic.Mechanic(updater, store_delta=store_delta)
        if state is not None:
            model.load_state_dict(state["model"])
            updater.load_state_dict(state["updater"])
            mechanic.load_state_dict(state["mechanic"])
            mechanic.optimizer = updater.base_optimizer  # the seed README's line: unnecessary, harmless
        scale = lambda: mechanic.scale  # noqa: E731
    start = state["t"] if state else 0
    for t in range(start, start + steps):
        base.zero_grad()
        _loss(model, t).backward()
        if form == "dropin":
            opt.step()
            sched.step()
        else:
            mechanic.step()
            updater.step()
    saved = {"model": model.state_dict(), "t": start + steps}
    if form == "dropin":
        saved.update(opt=opt.state_dict(), sched=sched.state_dict())
    else:
        saved.update(updater=updater.state_dict(), mechanic=mechanic.state_dict())
    return _params(model), scale().clone(), saved


@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("store_delta", [True, False])
def test_checkpoint_resume_is_bitwise(form, store_delta, tmp_path):
    full_params, full_scale, _ = _run(form, store_delta, 40)
    _, _, saved = _run(form, store_delta, 17)
    torch.save(saved, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    params, scale, _ = _run(form, store_delta, 23, state=loaded)
    assert full_scale.item() > 1e-4
    assert torch.equal(scale, full_scale)
    assert all(torch.equal(a, b) for a, b in zip(params, full_params))


def test_named_parameter_optimizer_round_trips(tmp_path):
    model = _model()
    opt = manic.mechanize(torch.optim.AdamW(model.named_parameters(), lr=1e-2))
    for t in range(3):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"][0] == "0.weight"
    torch.save(sd, tmp_path / "o.pt")
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = manic.mechanize(torch.optim.AdamW(model2.named_parameters(), lr=1e-2))
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    for o, m in ((opt, model), (opt2, model2)):
        o.zero_grad()
        _loss(m, 3).backward()
        o.step()
    assert torch.equal(opt.scale, opt2.scale)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_add_param_group_brings_parameters_under_mechanic():
    model = _model()
    extra = torch.nn.Parameter(torch.full((3,), 0.5, dtype=torch.float64))
    opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.1))
    for t in range(30):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
    opt.add_param_group({"params": [extra], "lr": 0.1})
    start = extra.detach().clone()
    extra.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    # its reference is its value when added, and it moved by scale * (base update)
    assert torch.equal(opt.state[extra]["mechanic_ref"], start)
    torch.testing.assert_close(extra.detach(), start + opt.scale * (-0.1) * torch.ones(3, dtype=torch.float64))
    sd = opt.state_dict()
    assert "mechanic_delta" in sd["state"][len(list(model.parameters()))]
    opt.load_state_dict(sd)


def test_closure_form_equals_plain_form():
    runs = []
    for use_closure in (False, True):
        model = _model()
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
        losses = []
        for t in range(20):
            def closure(t=t):
                opt.zero_grad()
                loss = _loss(model, t)
                loss.backward()
                return loss
            if use_closure:
                losses.append(opt.step(closure).item())
            else:
                losses.append(closure().item())
                opt.step()
        runs.append((losses, _params(model), opt.scale.clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][2], runs[1][2])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler(fused):
    """A step the scaler skips leaves everything untouched; taken steps see unscaled gradients
    (the same trajectory as without a scaler), also over a fused base optimizer."""
    runs = []
    for use_scaler in (False, True):
        model = _model(dtype=torch.float32)
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000) if use_scaler else None
        for t in range(25):
            opt.zero_grad()
            loss = _loss(model, t)
            if scaler is None:
                loss.backward()
                opt.step()
                continue
            scaler.scale(loss).backward()
            if t == 10:  # an overflowing step: the scaler skips it
                next(model.parameters()).grad[0, 0] = float("inf")
                before = (_params(model), opt.scale.clone(), copy.deepcopy(opt.state_dict()))
                scaler.step(opt)
                scaler.update()
                assert all(torch.equal(a, b) for a, b in zip(before[0], _params(model)))
                assert torch.equal(opt.scale, before[1])
                after = opt.state_dict()
                for i, entry in before[2]["state"].items():
                    assert all(torch.equal(v, after["state"][i][k]) for k, v in entry.items())
                opt.zero_grad()
                scaler.scale(_loss(model, t)).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((_params(model), opt.scale.clone()))
    (p0, s0), (p1, s1) = runs
    assert s0.item() > 1e-4
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=0)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loading_a_plain_base_state_starts_mechanic_fresh():
    model = _model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for t in range(5):
        plain.zero_grad()
        _loss(model, t).backward()
        plain.step()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.load_state_dict(plain.state_dict())
    assert torch.equal(opt.state[next(model.parameters())]["exp_avg"], plain.state[next(model.parameters())]["exp_avg"])
    start = _params(model)
    opt.zero_grad()
    _loss(model, 5).backward()
    opt.step()
    assert opt.scale.item() == pytest.approx(1e-6)  # a first step: S = s_init
    assert all(torch.equal(opt.state[p]["mechanic_ref"], s) for p, s in zip(model.parameters(), start))


def test_opted_out_group_follows_the_base_alone():
    model, twin = _model(), _model()
    head, twin_head = list(model[2].parameters()), list(twin[2].parameters())
    opt = manic.mechanize(torch.optim.SGD([{"params": list(model[0].parameters())},
                                           {"params": head, "mechanic": False}], lr=0.05, momentum=0.9))
    plain_head = torch.optim.SGD(twin_head, lr=0.05, momentum=0.9)
    ref = manic.mechanize(torch.optim.SGD(list(_model()[0].parameters()), lr=0.05, momentum=0.9))
    for t in range(15):
        opt.zero_grad()
        _loss(model, t).backward()
        grads = [p.grad.clone() for p in head]
        opt.step()
        for p, g in zip(twin_head, grads):
            p.grad = g
        plain_head.step()
        for p, q in zip(ref.param_groups[0]["params"], model[0].parameters()):
            p.grad = q.grad.clone()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(head, twin_head))
    assert torch.equal(opt.scale, ref.scale)  # the head takes no part in the sums
    assert all("mechanic_ref" not in opt.state[p] for p in head)


def test_maximize_equals_minimizing_the_negated_gradient():
    runs = []
    for maximize in (False, True):
        model = _model()
        opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, maximize=maximize))
        for t in range(40):
            opt.zero_grad()
            loss = _loss(model, t)
            (-loss if maximize else loss).backward()
            opt.step()
        runs.append((_params(model), opt.scale.clone()))
    assert runs[0][1].item() > 1e-4 and torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = _model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    _loss(model, 0).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0
