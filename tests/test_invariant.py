"""The invariant form (variant="invariant", the default): the effective lr it finds does not depend
on the size of the base learning rate (the original form's does), and its unit lr_ref: where it is
taken from, when, and that it travels in the state dict."""

from __future__ import annotations

import copy

import pytest
import torch

import manic
from manic.options import DEFAULTS

F64 = torch.float64
BASES = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "sgd_momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=1e-2),
}


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(F64)


def _data():
    g = torch.Generator().manual_seed(123)
    X = torch.randn(64, 6, generator=g, dtype=F64)
    return X, (X[:, :1] * 1.5 - X[:, 1:2]).tanh()


def _train(base: str, lr: float, steps: int, scheduled: bool = False, **options):
    """Full-batch steps on a small float64 MLP; returns the effective lr of the first group (the lr
    the base update is applied with, S * lr) after each step and the parameters after each step."""
    model, (X, y) = _mlp(), _data()
    opt = manic.mechanize(BASES[base](model.parameters(), lr), **options)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2 * steps) if scheduled else None
    eff, params = [], []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
        eff.append(opt.effective_lr[0].item())
        if sched is not None:
            sched.step()
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return eff, params


def _rel(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return ((a - b).norm() / b.norm()).item()
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- invariance
STEPS = 30  # closed loop: past ~40 steps rounding differences grow chaotically (docs/algorithm.md)


@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("base,scheduled", [("sgd", False), ("sgd_momentum", False), ("sgd_momentum", True),
                                            ("adamw", False)])
def test_invariant_form_does_not_depend_on_the_base_lr(base, scheduled, store_delta):
    """The same model and data at base lr 1e-4 and 1: the same effective lr at every step and the same
    parameters. (Not bitwise: the base update is recovered from the stepped parameters, whose
    rounding is in units of x, so at lr 1e-4 it keeps ~4 digits fewer; that leaves ~1e-13.)"""
    small, small_params = _train(base, 1e-4, STEPS, scheduled, store_delta=store_delta)
    large, large_params = _train(base, 1.0, STEPS, scheduled, store_delta=store_delta)
    assert small[0] == pytest.approx(DEFAULTS["invariant"]["s_init"] * 1e-3, rel=1e-12)  # the floor, either lr
    assert large[-1] > 100 * large[0]  # the scale really moved: through the start and beyond
    worst_eff = max(_rel(a, b) for a, b in zip(small, large))
    worst_params = max(_rel(a, b) for a, b in zip(small_params, large_params))
    assert worst_eff <= 1e-11 and worst_params <= 1e-11, (worst_eff, worst_params)


@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("base", ["sgd", "sgd_momentum"])
def test_original_form_depends_on_the_base_lr(base, store_delta):
    """The original form with the same data: its scale multiplies the base lr, so the effective lr
    starts at s_init * lr, 1e4 times apart, and the runs end in different places."""
    options = {"variant": "original", "s_init": 1e-6, "weight_decay": 1e-2, "store_delta": store_delta}
    small, small_params = _train(base, 1e-4, STEPS, **options)
    large, large_params = _train(base, 1.0, STEPS, **options)
    assert small[0] == pytest.approx(1e-6 * 1e-4, rel=1e-12) and large[0] == pytest.approx(1e-6, rel=1e-12)
    assert min(b / a for a, b in zip(small[:5], large[:5])) > 1e3
    assert max(_rel(a, b) for a, b in zip(small, large)) > 0.5
    assert _rel(small_params[-1] - small_params[0], large_params[-1] - large_params[0]) > 0.1
    # the invariant twin of the same runs agrees (the test above, on these settings)
    inv_small, _ = _train(base, 1e-4, STEPS, store_delta=store_delta)
    inv_large, _ = _train(base, 1.0, STEPS, store_delta=store_delta)
    assert max(_rel(a, b) for a, b in zip(inv_small, inv_large)) <= 1e-11


def test_effective_lr_is_the_tuners_sum_at_the_reference_lr():
    """S' = sum(s) is the effective lr at lr = lr_ref; the factor on Delta is S = S' / lr_ref."""
    eff, _ = _train("sgd", 0.25, 5)
    model, (X, y) = _mlp(), _data()
    opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.25))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    group = opt.param_groups[0]
    assert group["mechanic_lr_ref"].item() == 0.25
    torch.testing.assert_close(opt.scale, group["mechanic_s"].sum() / 0.25, rtol=0, atol=0)
    torch.testing.assert_close(opt.effective_lr[0], opt.scale * 0.25, rtol=0, atol=0)
    assert opt.effective_lr[0].item() == pytest.approx(group["mechanic_s"].sum().item(), rel=1e-15)
    assert opt.effective_lr[0].item() == eff[-1]


# --------------------------------------------------------------------------- lr_ref
def _params(seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, generator=g, dtype=F64).requires_grad_() for _ in range(n)]


def _grads(params, t: int = 0) -> None:
    g = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=F64) + 0.2


def _lr_ref(holder) -> float:
    sd = holder.state_dict()
    tuner = sd["param_groups"][0] if "param_groups" in sd else sd["tuner"]
    return tuner["mechanic_lr_ref"].item()


FORMS = ["dropin", "seed"]


def _build(form, base, sched_factory=None, **options):
    """(holder of the scale and state dict, a step function, the scheduler)."""
    if form == "dropin":
        opt = manic.mechanize(base, **options)
        sched = sched_factory(opt) if sched_factory else None

        def step():
            opt.step()
            if sched is not None:
                sched.step()
        return opt, step, sched
    sched = sched_factory(base) if sched_factory else None
    updater = manic.Updater(base, sched)
    mechanic = manic.Mechanic(updater, **options)

    def step():
        mechanic.step()
        updater.step()
    return mechanic, step, sched


@pytest.mark.parametrize("form", FORMS)
def test_lr_ref_is_initial_lr_when_a_scheduler_set_it(form):
    params = _params()
    base = torch.optim.SGD(params, lr=0.4)
    holder, step, _ = _build(form, base, lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1,
                                                                                     total_iters=5))
    assert base.param_groups[0]["lr"] == pytest.approx(0.04) and base.param_groups[0]["initial_lr"] == 0.4
    assert _lr_ref(holder) == 1.0  # not known before Mechanic starts
    _grads(params)
    step()
    assert _lr_ref(holder) == 0.4  # the schedule's base, not the 0.04 of the first step
    for t in range(1, 4):
        _grads(params, t)
        step()
    assert _lr_ref(holder) == 0.4


@pytest.mark.parametrize("form", FORMS)
def test_lr_ref_is_taken_when_mechanic_starts(form):
    """Steps at lr = 0 do not start Mechanic; lr_ref is the lr at the first step that does (no
    scheduler: the group's lr), and it stays when the lr changes afterwards."""
    params = _params()
    base = torch.optim.SGD(params, lr=0.0)
    holder, step, _ = _build(form, base)
    _grads(params)
    step()
    assert _lr_ref(holder) == 1.0 and holder.stats()["step"].item() == 0
    base.param_groups[0]["lr"] = 0.07
    _grads(params, 1)
    step()
    assert _lr_ref(holder) == 0.07 and holder.stats()["step"].item() == 1
    base.param_groups[0]["lr"] = 0.5
    _grads(params, 2)
    step()
    assert _lr_ref(holder) == 0.07


def test_lr_ref_is_the_largest_over_mechanics_groups():
    params = _params(n=4)
    base = torch.optim.SGD([{"params": params[:1], "lr": 0.01}, {"params": params[1:2], "lr": 0.03},
                            {"params": params[2:3], "lr": 5.0, "mechanic": False},
                            {"params": params[3:], "lr": 0.02}], lr=0.1)
    opt = manic.mechanize(base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)  # initial_lr = lr, lr halved
    assert [g["lr"] for g in opt.param_groups] == [0.005, 0.015, 2.5, 0.01]
    _grads(params)
    opt.step()
    sched.step()
    # 0.03: the largest initial_lr under Mechanic (the opted-out group's 5.0 is ignored)
    assert _lr_ref(opt) == 0.03
    # the opted-out group keeps its lr as its effective lr; the others have S * lr
    eff = opt.effective_lr
    assert eff[2].item() == 2.5
    assert eff[1].item() == pytest.approx(opt.scale.item() * 0.015, rel=1e-15)


def test_lr_ref_accepts_a_tensor_lr():
    params = _params()
    opt = manic.mechanize(torch.optim.SGD(params, lr=torch.tensor(0.125)))
    _grads(params)
    opt.step()
    assert _lr_ref(opt) == 0.125


@pytest.mark.parametrize("form", FORMS)
def test_original_form_keeps_lr_ref_one(form):
    params = _params()
    holder, step, _ = _build(form, torch.optim.SGD(params, lr=0.3), variant="original")
    for t in range(3):
        _grads(params, t)
        step()
    assert _lr_ref(holder) == 1.0
    sd = holder.state_dict()
    tuner = sd["param_groups"][0] if form == "dropin" else sd["tuner"]
    assert tuner["mechanic_variant"] == "original"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_invalid_lr_raises_and_nothing_changes(form, bad):
    params = _params()
    base = torch.optim.SGD(params, lr=0.1)
    holder, step, _ = _build(form, base)
    base.param_groups[0]["lr"] = bad
    _grads(params)
    before = [p.detach().clone() for p in params]
    sd_before = copy.deepcopy(holder.state_dict())
    with pytest.raises(ValueError, match=r"invariant variant.*largest lr.*variant='original'"):
        step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert repr(holder.state_dict()) == repr(sd_before)
    # with a valid lr it starts normally
    base.param_groups[0]["lr"] = 0.1
    step()
    assert _lr_ref(holder) == 0.1 and holder.stats()["step"].item() == 1


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("store_delta", [True, False])
def test_lr_ref_travels_in_the_state_dict_and_resumes_bitwise(form, store_delta, tmp_path):
    def build(seed):
        params = _params(seed)
        base = torch.optim.AdamW(params, lr=3e-2)
        holder, step, sched = _build(form, base, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 20),
                                     store_delta=store_delta)
        return params, base, holder, step, sched

    params, base, holder, step, sched = build(0)
    for t in range(16):
        _grads(params, t)
        step()
        if t == 7:
            if form == "dropin":
                saved = {"opt": holder.state_dict(), "sched": sched.state_dict()}
            else:
                saved = {"mechanic": holder.state_dict(), "updater": holder.updater.state_dict()}
            saved["params"] = [p.detach().clone() for p in params]
            torch.save(saved, tmp_path / "ckpt.pt")
            lr_ref_saved = holder.param_groups[0]["mechanic_lr_ref"].clone() if form == "dropin" else \
                holder.state_dict()["tuner"]["mechanic_lr_ref"].clone()
    assert lr_ref_saved.item() == 3e-2 and lr_ref_saved.dtype == F64
    assert base.param_groups[0]["lr"] != 3e-2  # the schedule moved on; lr_ref did not

    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    params2, base2, holder2, step2, sched2 = build(1)
    with torch.no_grad():
        for p, q in zip(params2, loaded["params"]):
            p.copy_(q)
    if form == "dropin":
        holder2.load_state_dict(loaded["opt"])
        sched2.load_state_dict(loaded["sched"])
    else:
        holder2.updater.load_state_dict(loaded["updater"])
        holder2.load_state_dict(loaded["mechanic"])
    assert _lr_ref(holder2) == lr_ref_saved.item()
    for t in range(8, 16):
        _grads(params2, t)
        step2()
    assert torch.equal(holder2.scale, holder.scale)
    assert all(torch.equal(p, q) for p, q in zip(params2, params))
    sd, sd2 = holder.state_dict(), holder2.state_dict()
    t1 = sd["param_groups"][0] if form == "dropin" else sd["tuner"]
    t2 = sd2["param_groups"][0] if form == "dropin" else sd2["tuner"]
    assert torch.equal(t1["mechanic_lr_ref"], t2["mechanic_lr_ref"]) and torch.equal(t1["mechanic_lr_ref"],
                                                                                        lr_ref_saved)
