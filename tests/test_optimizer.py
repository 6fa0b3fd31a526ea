"""optimizer.py: ``manic.mechanize(base)`` honours the torch.optim.Optimizer contract, as torch's own generic
optimizer tests (test/test_optim.py) check it: shared param groups, LR schedulers, step and
state-dict hooks, deepcopy, repr, checkpoints that resume bitwise (both forms, both store_delta
modes), named parameters, add_param_group, closures, GradScaler, plain base state dicts, opted-out
groups, maximize and zero_grad."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import manic
from manic.options import DEFAULTS

F64 = torch.float64


# --------------------------------------------------------------------------- helpers
def make_model(seed: int = 0, dtype=F64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


def batch(t: int, dtype=F64):
    g = torch.Generator().manual_seed(7919 + t)
    X = torch.randn(16, 4, generator=g, dtype=dtype)
    y = torch.stack([X[:, 0].sin() + X[:, 3], X[:, 1] * X[:, 2]], 1)
    return X, y


def loss_at(model: torch.nn.Module, t: int) -> torch.Tensor:
    X, y = batch(t, next(model.parameters()).dtype)
    return torch.nn.functional.mse_loss(model(X), y)


def snap(model_or_params) -> list[torch.Tensor]:
    ps = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return [p.detach().clone() for p in ps]


def all_equal(a, b) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))


def deep_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return a == b


def train(model, opt, steps, start=0, sched=None):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()
        if sched is not None:
            sched.step()


# --------------------------------------------------------------------------- identity and schedulers
def test_is_an_optimizer_and_shares_param_groups_and_state():
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = manic.mechanize(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, manic.Mechanized)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    train(model, opt, 2)
    # still the same objects after stepping and after a state-dict round trip
    assert opt.param_groups is base.param_groups and opt.state is base.state
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.param_groups is base.param_groups and opt.state is base.state


@pytest.mark.parametrize("built_on", ["mechanized", "base"])
def test_lr_scheduler_on_either_object_drives_the_base_lr_without_warnings(built_on):
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = manic.mechanize(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # includes "lr_scheduler.step() before optimizer.step()"
        sched = torch.optim.lr_scheduler.StepLR(opt if built_on == "mechanized" else base, step_size=2, gamma=0.5)
        lrs = []
        for t in range(6):
            opt.zero_grad()
            loss_at(model, t).backward()
            opt.step()
            sched.step()
            lrs.append(base.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])
    assert opt.param_groups[0]["lr"] == base.param_groups[0]["lr"]
    assert sched.get_last_lr() == [base.param_groups[0]["lr"]]


def test_lr_scheduler_on_the_base_in_the_seed_form_has_no_order_warning():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
        updater = manic.Updater(base, sched)
        mechanic = manic.Mechanic(updater)
        for t in range(3):
            base.zero_grad()
            loss_at(model, t).backward()
            mechanic.step()
            updater.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


# --------------------------------------------------------------------------- step hooks
def test_step_hooks_instance_and_global_fire_exactly_once_per_step():
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = manic.mechanize(base)
    calls: list[tuple[str, object]] = []
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
    ]
    g_pre = register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("gpre", o)))
    g_post = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("gpost", o)))
    try:
        for t in range(3):
            calls.clear()
            train(model, opt, 1, start=t)
            # torch's order (test_optim.py test_step_all_hooks): global pre, pre, post, global post
            assert [k for k, _ in calls] == ["gpre", "pre", "post", "gpost"]
            assert all(o is opt for _, o in calls)
    finally:
        g_pre.remove()
        g_post.remove()
    # removing handles stops them
    for h in handles:
        h.remove()
    calls.clear()
    train(model, opt, 1, start=3)
    assert calls == []


def test_step_hooks_registered_on_the_base_fire_once_per_step():
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = manic.mechanize(base)
    calls = []
    base.register_step_pre_hook(lambda o, a, k: calls.append(("base_pre", o)))
    base.register_step_post_hook(lambda o, a, k: calls.append(("base_post", o)))
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    for t in range(2):
        calls.clear()
        train(model, opt, 1, start=t)
        assert [k for k, _ in calls] == ["pre", "base_pre", "base_post", "post"]
        assert [o for _, o in calls] == [opt, base, base, opt]


def test_step_hooks_see_parameters_before_and_after_the_whole_mechanic_step():
    """A pre hook sees x_t, a post hook sees x_{t+1} (after Mechanic's rebase, not the raw base step)."""
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.__setitem__("pre", snap(model)))
    opt.register_step_post_hook(lambda o, a, k: seen.__setitem__("post", snap(model)))
    train(model, opt, 3)
    before = snap(model)
    opt.zero_grad()
    loss_at(model, 3).backward()
    opt.step()
    assert all_equal(seen["pre"], before)
    assert all_equal(seen["post"], snap(model))


# --------------------------------------------------------------------------- state-dict hooks
def test_state_dict_and_load_state_dict_hooks():
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(model, opt, 2)
    order = []

    def sd_pre(o):
        assert o is opt
        order.append("sd_pre")

    def sd_post(o, sd):
        assert o is opt
        order.append("sd_post")
        sd["user_key"] = "hello"
        return sd

    def load_pre(o, sd):
        assert o is opt
        order.append("load_pre")
        assert sd["user_key"] == "hello"
        sd = dict(sd)
        del sd["user_key"]  # the base optimizer must not see it
        return sd

    def load_post(o):
        assert o is opt
        order.append("load_post")

    hs = [opt.register_state_dict_pre_hook(sd_pre), opt.register_state_dict_post_hook(sd_post),
          opt.register_load_state_dict_pre_hook(load_pre), opt.register_load_state_dict_post_hook(load_post)]
    sd = opt.state_dict()
    assert sd["user_key"] == "hello"
    assert "mechanic_ref" in sd["state"][0] and "mechanic_s" in sd["param_groups"][0]
    assert order == ["sd_pre", "sd_post"]
    saved = copy.deepcopy(sd)
    opt.load_state_dict(saved)
    assert order == ["sd_pre", "sd_post", "load_pre", "load_post"]
    train(model, opt, 1, start=2)
    for h in hs:
        h.remove()
    order.clear()
    assert "user_key" not in opt.state_dict() and order == []


def test_state_dict_hooks_prepend_order():
    model = make_model()
    opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.1))
    order = []
    opt.register_state_dict_pre_hook(lambda o: order.append("a"))
    opt.register_state_dict_pre_hook(lambda o: order.append("b"), prepend=True)
    opt.state_dict()
    assert order == ["b", "a"]


def _hooked(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple]:
    """Every kind of hook torch.optim offers, registered twice (prepended where torch allows), through a
    step with and without a closure, a state_dict and a load_state_dict, then one of each removed: what
    ran, in order, what it was given, and what its return value did."""
    log: list[tuple] = []
    me = lambda o: o is opt  # noqa: E731

    def step_hook(name):
        return lambda o, args, kwargs: log.append((name, me(o), len(args), sorted(kwargs)))

    def sd_post(name, replace):
        def hook(o, sd):
            log.append((name, me(o), "marker" in sd))
            return {**sd, "marker": name} if replace else None
        return hook

    def load_pre(name, replace):
        def hook(o, sd):
            log.append((name, me(o), sd.get("marker")))
            return {k: v for k, v in sd.items() if k != "marker"} if replace else None
        return hook

    handles = [opt.register_step_pre_hook(step_hook("step_pre_a")), opt.register_step_pre_hook(step_hook("step_pre_b")),
               opt.register_step_post_hook(step_hook("step_post_a")),
               opt.register_step_post_hook(step_hook("step_post_b")),
               opt.register_state_dict_pre_hook(lambda o: log.append(("sd_pre_a", me(o)))),
               opt.register_state_dict_pre_hook(lambda o: log.append(("sd_pre_b", me(o))), prepend=True),
               opt.register_state_dict_post_hook(sd_post("sd_post_a", True)),
               opt.register_state_dict_post_hook(sd_post("sd_post_b", False), prepend=True),
               opt.register_load_state_dict_pre_hook(load_pre("load_pre_a", True)),
               opt.register_load_state_dict_pre_hook(load_pre("load_pre_b", False), prepend=True),
               opt.register_load_state_dict_post_hook(lambda o: log.append(("load_post_a", me(o)))),
               opt.register_load_state_dict_post_hook(lambda o: log.append(("load_post_b", me(o))), prepend=True)]
    g_pre = register_optimizer_step_pre_hook(step_hook("global_pre"))
    g_post = register_optimizer_step_post_hook(step_hook("global_post"))
    try:
        for t in range(2):
            opt.zero_grad()
            if t == 0:
                loss_at(model, t).backward()
                opt.step()
            else:
                opt.step(lambda: loss_at(model, t).backward())
        sd = opt.state_dict()
        log.append(("state_dict", sd.get("marker")))
        opt.load_state_dict(copy.deepcopy(sd))
        for h in handles[::2]:
            h.remove()
        train(model, opt, 1, start=2)
        opt.load_state_dict(opt.state_dict())
    finally:
        g_pre.remove()
        g_post.remove()
    return log


def test_the_hooks_run_by_hand_are_torch_s():
    """Mechanized bypasses Optimizer.__init__ (optimizer.py says why) and runs the state-dict hooks itself:
    every hook kind runs exactly as on a torch optimizer (order, prepend, arguments, return values, removal)."""
    torch_model, manic_model = make_model(), make_model()
    torch_log = _hooked(torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9), torch_model)
    manic_log = _hooked(manic.mechanize(torch.optim.SGD(manic_model.parameters(), lr=0.1, momentum=0.9)), manic_model)
    assert manic_log == torch_log
    assert ("state_dict", "sd_post_a") in torch_log and ("load_post_b", True) in torch_log  # (the log is not empty)


# --------------------------------------------------------------------------- deepcopy, repr
def test_deepcopy_is_an_independent_working_copy():
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(model, opt, 5)
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(p is not q for p, q in zip(twin_params, model.parameters()))
    before, scale = snap(model), opt.scale.clone()
    twin_before, twin_scale = snap(twin_params), twin.scale.clone()
    assert all_equal(before, twin_before) and torch.equal(scale, twin_scale)
    for _ in range(3):
        for p in twin_params:
            p.grad = torch.ones_like(p)
        twin.step()
    # the original did not move; the copy did
    assert all_equal(before, snap(model))
    assert torch.equal(opt.scale, scale)
    assert not torch.equal(twin.scale, twin_scale)
    assert not any(torch.equal(a, b) for a, b in zip(twin_before, twin_params))
    # the copy's state refers to its own parameters
    assert all(p in twin.state and "mechanic_ref" in twin.state[p] for p in twin_params)
    # and the original still trains
    train(model, opt, 1, start=5)
    assert not all_equal(before, snap(model))


def test_deepcopy_with_an_lr_scheduler_attached_is_independent():
    """As in the README's quick start, a scheduler is built on the mechanized optimizer; torch's
    LRScheduler wraps ``opt.step`` (an instance attribute bound to ``opt``). A deep copy must still
    step itself, not the original (torch's Optimizer.__getstate__ leaves that wrapper out)."""
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, 4, sched=sched)
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    before, scale = snap(model), opt.scale.clone()
    twin_before, twin_scale = snap(twin_params), twin.scale.clone()
    opt.zero_grad()  # the original has no gradients
    for p in twin_params:
        p.grad = torch.ones_like(p)
    twin.step()
    assert all_equal(before, snap(model)), "stepping the deep copy moved the original's parameters"
    assert torch.equal(opt.scale, scale), "stepping the deep copy changed the original's scale"
    assert not torch.equal(twin.scale, twin_scale), "the deep copy did not step"
    assert not all_equal(twin_before, snap(twin_params))


def test_repr_names_the_base_and_mechanics_hyperparameters():
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2), weight_decay=0.03, eps=1e-7,
                          s_init=2e-6, num_betas=4, store_delta=False)
    text = repr(opt)
    assert "AdamW" in text and "lr: 0.01" in text
    for frag in ("weight_decay=0.03", "eps=1e-07", "s_init=2e-06", "num_betas=4", "store_delta=False"):
        assert frag in text, (frag, text)
    assert "Mechanized" in text or "Mechanic" in text


# --------------------------------------------------------------------------- checkpoints, bitwise
TOTAL, CUT = 30, 13


def _build(form, store_delta, seed=0):
    model = make_model(seed)
    base = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=1e-3)
    if form == "dropin":
        opt = manic.mechanize(base, store_delta=store_delta)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
        return dict(model=model, base=base, opt=opt, sched=sched)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=4, gamma=0.7)
    updater = manic.Updater(base, sched)
    mechanic = manic.Mechanic(updater, store_delta=store_delta)
    return dict(model=model, base=base, updater=updater, mechanic=mechanic, sched=sched)


def _steps(run, start, n):
    for t in range(start, start + n):
        run["base"].zero_grad()
        loss_at(run["model"], t).backward()
        if "opt" in run:
            run["opt"].step()
            run["sched"].step()
        else:
            run["mechanic"].step()
            run["updater"].step()


def _scale(run):
    return (run["opt"] if "opt" in run else run["mechanic"]).scale.clone()


@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_checkpoint_resume_is_bitwise(form, store_delta, tmp_path):
    full = _build(form, store_delta)
    _steps(full, 0, TOTAL)

    first = _build(form, store_delta)
    _steps(first, 0, CUT)
    if form == "dropin":
        ckpt = {"model": first["model"].state_dict(), "opt": first["opt"].state_dict(),
                "sched": first["sched"].state_dict()}
    else:
        ckpt = {"model": first["model"].state_dict(), "updater": first["updater"].state_dict(),
                "mechanic": first["mechanic"].state_dict()}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    del first
    loaded = torch.load(path, weights_only=True)

    resumed = _build(form, store_delta, seed=123)  # different initial weights: all must come from the file
    resumed["model"].load_state_dict(loaded["model"])
    if form == "dropin":
        resumed["opt"].load_state_dict(loaded["opt"])
        resumed["sched"].load_state_dict(loaded["sched"])
    else:
        resumed["updater"].load_state_dict(loaded["updater"])
        resumed["mechanic"].load_state_dict(loaded["mechanic"])
        resumed["mechanic"].optimizer = resumed["updater"].base_optimizer  # the seed README's line
    assert resumed["base"].param_groups[0]["lr"] == pytest.approx(2e-2 * 0.7 ** (CUT // 4))
    _steps(resumed, CUT, TOTAL - CUT)

    assert _scale(full).item() > 1e-4, "the run is too short for the scale to grow; the test is weak"
    assert torch.equal(_scale(resumed), _scale(full))
    assert all_equal(snap(resumed["model"]), snap(full["model"]))
    assert full["base"].param_groups[0]["lr"] == resumed["base"].param_groups[0]["lr"]
    # state dicts are deterministic (test_optim.py test_state_dict_deterministic)
    if form == "dropin":
        assert deep_equal(full["opt"].state_dict(), resumed["opt"].state_dict())
    else:
        assert deep_equal(full["updater"].state_dict(), resumed["updater"].state_dict())
        assert deep_equal(full["mechanic"].state_dict(), resumed["mechanic"].state_dict())
    # every state tensor too
    for p, q in zip(full["model"].parameters(), resumed["model"].parameters()):
        assert deep_equal(full["base"].state[p], resumed["base"].state[q])


@pytest.mark.parametrize("store_delta", [True, False])
def test_checkpoint_taken_before_the_first_step_resumes_bitwise(store_delta, tmp_path):
    full = _build("dropin", store_delta)
    _steps(full, 0, 8)
    fresh = _build("dropin", store_delta)
    torch.save({"opt": fresh["opt"].state_dict(), "sched": fresh["sched"].state_dict()}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = _build("dropin", store_delta)
    resumed["opt"].load_state_dict(loaded["opt"])
    resumed["sched"].load_state_dict(loaded["sched"])
    _steps(resumed, 0, 8)
    assert torch.equal(_scale(resumed), _scale(full))
    assert all_equal(snap(resumed["model"]), snap(full["model"]))


def test_named_parameter_optimizer_saves_and_loads(tmp_path):
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.named_parameters(), lr=1e-2))
    train(model, opt, 4)
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    assert sd["param_groups"][0]["param_names"] == names
    torch.save({"model": model.state_dict(), "opt": sd}, tmp_path / "n.pt")
    loaded = torch.load(tmp_path / "n.pt", weights_only=True)
    model2 = make_model(seed=5)
    model2.load_state_dict(loaded["model"])
    opt2 = manic.mechanize(torch.optim.AdamW(model2.named_parameters(), lr=1e-2))
    opt2.load_state_dict(loaded["opt"])
    assert opt2.param_groups[0]["param_names"] == names
    train(model, opt, 5, start=4)
    train(model2, opt2, 5, start=4)
    assert torch.equal(opt.scale, opt2.scale)
    assert all_equal(snap(model), snap(model2))


def test_older_base_state_dicts_load_and_step():
    """test_optim.py test_can_load_older_state_dict / test_load_nontensor_step, through manic:
    group flags missing from the saved groups and a Python-number 'step'."""
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for k in ("maximize", "foreach", "differentiable", "fused", "capturable"):
            g.pop(k, None)
    for st in sd["state"].values():
        st["step"] = float(st["step"])
    model2 = make_model()
    model2.load_state_dict(model.state_dict())
    opt2 = manic.mechanize(torch.optim.AdamW(model2.parameters(), lr=1e-2))
    opt2.load_state_dict(sd)
    train(model, opt, 2, start=3)
    train(model2, opt2, 2, start=3)
    assert torch.equal(opt.scale, opt2.scale)
    assert all_equal(snap(model), snap(model2))


def test_first_step_without_gradients_leaves_params_unchanged():
    """test_optim.py test_step_is_noop_when_params_have_no_grad."""
    params = [torch.randn(2, 3, dtype=F64, requires_grad=False) for _ in range(2)]
    old = snap(params)
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-2))
    assert opt.step(lambda: torch.tensor([1.0])) is not None
    assert all_equal(old, params)


# --------------------------------------------------------------------------- add_param_group
@pytest.mark.parametrize("variant", ["original", "invariant"])
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("when", ["before_first_step", "after_steps"])
def test_add_param_group_brings_new_params_under_mechanic(store_delta, when, variant, tmp_path):
    def build(seed=0):
        model = make_model(seed)
        extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=F64))
        opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.05), store_delta=store_delta,
                              variant=variant, **DEFAULTS[variant])
        return model, extra, opt

    def extra_grad(t):
        return torch.linspace(0.5, 1.5, 5, dtype=F64) * (1 + 0.1 * t)

    def step(model, extra, opt, t, with_extra):
        opt.zero_grad()
        loss_at(model, t).backward()
        if with_extra:
            extra.grad = extra_grad(t)
        opt.step()

    model, extra, opt = build()
    pre = 0 if when == "before_first_step" else 6
    for t in range(pre):
        step(model, extra, opt, t, False)
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_optimizer.param_groups
    ref = extra.detach().clone()  # its reference: its value when it joins
    D = torch.zeros(5, dtype=F64)  # its accumulated base updates (docs/algorithm.md)
    for t in range(pre, pre + 6):
        x, S_old = extra.detach().clone(), opt.scale.clone()
        step(model, extra, opt, t, True)
        S_new = opt.scale
        # lr_ref: 1 in the original form; in the invariant one the largest lr when Mechanic started
        lr_ref = opt.param_groups[0]["mechanic_lr_ref"].item()
        assert lr_ref == {"original": 1.0, "invariant": 0.1 if when == "before_first_step" else 0.05}[variant]
        u = -0.1 * extra_grad(t)  # the base (plain SGD) update
        # it moves as every parameter under Mechanic: x = x_ref + S * (accumulated updates)
        if store_delta:
            D = D + u
        else:  # the direction in the base's units: (x - x_ref) / S (eps is in units of S * lr_ref)
            D = (x - ref) / (S_old + opt.hyper.eps / lr_ref) + u
        torch.testing.assert_close(extra.detach() - ref, S_new * D, rtol=1e-6, atol=0)
        if variant == "original":
            assert S_new.item() < 1e-3  # far less than the base's own step
        else:  # S' = S * lr_ref, an effective lr, stays near its start s_init (far below the base lrs)
            assert S_new.item() * lr_ref < 10 * DEFAULTS["invariant"]["s_init"]
    assert torch.equal(opt.state[extra]["mechanic_ref"], ref)
    assert "mechanic_ref" in opt.state[extra]
    assert ("mechanic_delta" in opt.state[extra]) == store_delta

    # the state dict round-trips after the new group (into a freshly built optimizer), bitwise
    n = len(list(model.parameters()))
    sd = opt.state_dict()
    assert "mechanic_ref" in sd["state"][n]
    torch.save({"model": model.state_dict(), "extra": extra.detach(), "opt": sd}, tmp_path / "a.pt")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    model2, extra2, opt2 = build(seed=9)
    opt2.add_param_group({"params": [extra2], "lr": 0.1})
    model2.load_state_dict(loaded["model"])
    with torch.no_grad():
        extra2.copy_(loaded["extra"])
    opt2.load_state_dict(loaded["opt"])
    for t in range(pre + 6, pre + 10):
        step(model, extra, opt, t, True)
        step(model2, extra2, opt2, t, True)
    assert torch.equal(opt.scale, opt2.scale)
    assert all_equal(snap(model), snap(model2)) and torch.equal(extra, extra2)


def test_add_param_group_opted_out_follows_the_base():
    model = make_model()
    opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.05))
    train(model, opt, 3)
    extra = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt.add_param_group({"params": [extra], "lr": 0.1, "mechanic": False})
    extra.grad = torch.full((3,), 2.0, dtype=F64)
    opt.step()
    assert torch.equal(extra.detach(), torch.ones(3, dtype=F64) - 0.1 * 2.0)
    assert "mechanic_ref" not in opt.state[extra]


# --------------------------------------------------------------------------- closure
@pytest.mark.parametrize("store_delta", [True, False])
def test_closure_returns_the_loss_and_matches_the_plain_form(store_delta):
    results = []
    for use_closure in (False, True):
        model = make_model()
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2), store_delta=store_delta)
        losses = []
        for t in range(15):
            def closure(t=t):
                opt.zero_grad()
                loss = loss_at(model, t)
                loss.backward()
                return loss
            if use_closure:
                out = opt.step(closure)
                assert isinstance(out, torch.Tensor) and out.requires_grad
                losses.append(out.detach().clone())
            else:
                losses.append(closure().detach().clone())
                assert opt.step() is None
        results.append((losses, snap(model), opt.scale.clone()))
    (l0, p0, s0), (l1, p1, s1) = results
    assert all_equal(l0, l1) and all_equal(p0, p1) and torch.equal(s0, s1)


# --------------------------------------------------------------------------- GradScaler
def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=4)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skips_an_overflowing_step_untouched(fused):
    model = make_model(dtype=torch.float32)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused))
    scaler = _scaler()
    for t in range(5):
        opt.zero_grad()
        scaler.scale(loss_at(model, t)).backward()
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()
    scaler.scale(loss_at(model, 5)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    before_params, before_scale = snap(model), opt.scale.clone()
    before_state = copy.deepcopy(opt.state_dict())
    before_stats = {k: v.clone() for k, v in opt.stats().items() if k in ("scale", "step", "skipped_steps")}
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before  # the scaler saw the overflow and backed off
    assert all_equal(before_params, snap(model))
    assert torch.equal(opt.scale, before_scale)
    assert deep_equal(before_state, opt.state_dict())
    for k, v in before_stats.items():
        assert torch.equal(opt.stats()[k], v), k
    # and it carries on
    opt.zero_grad()
    scaler.scale(loss_at(model, 6)).backward()
    scaler.step(opt)
    scaler.update()
    assert not all_equal(before_params, snap(model))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("store_delta", [True, False])
def test_grad_scaler_steps_see_unscaled_gradients(fused, store_delta):
    """The same trajectory with and without a scaler (an overflowing step in the scaled run is skipped
    and then redone with finite gradients); power-of-two scaling makes it bitwise."""
    runs = []
    for use_scaler in (False, True):
        model = make_model(dtype=torch.float32)
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused), store_delta=store_delta)
        scaler = _scaler() if use_scaler else None
        for t in range(25):
            if scaler is not None and t == 9:
                opt.zero_grad()
                scaler.scale(loss_at(model, t)).backward()
                next(model.parameters()).grad[1, 1] = float("nan")
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
            loss = loss_at(model, t)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        if scaler is not None:
            assert scaler.get_scale() != 2.0 ** 12  # it backed off and grew: the scaling was real
        runs.append((snap(model), opt.scale.clone(), opt.stats()["step"].clone()))
    (p0, s0, n0), (p1, s1, n1) = runs
    assert s0.item() > 1e-4
    assert int(n0) == int(n1) == 25
    assert torch.equal(s0, s1)
    assert all_equal(p0, p1)


# --------------------------------------------------------------------------- plain base state dicts
@pytest.mark.parametrize("trained_first", [False, True])
def test_loading_a_plain_base_state_dict_starts_mechanic_afresh(trained_first):
    model = make_model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, plain, 4)
    plain_sd = copy.deepcopy(plain.state_dict())
    point = snap(model)

    # reference: a fresh mechanized run's first step from the same point
    ref_model = make_model()
    ref_model.load_state_dict(model.state_dict())
    ref = manic.mechanize(torch.optim.AdamW(ref_model.parameters(), lr=1e-2))
    train(ref_model, ref, 1, start=4)

    model2 = make_model(seed=3)
    opt = manic.mechanize(torch.optim.AdamW(model2.parameters(), lr=1e-2))
    if trained_first:
        train(model2, opt, 3)
    with torch.no_grad():
        for p, v in zip(model2.parameters(), point):
            p.copy_(v)
    opt.load_state_dict(copy.deepcopy(plain_sd))
    for p, q in zip(model2.parameters(), model.parameters()):
        assert deep_equal(opt.state[p], plain.state[q])  # the base state is the loaded one
        assert not any(k.startswith("mechanic_") for k in opt.state[p])
    assert int(opt.stats()["step"]) == 0
    train(model2, opt, 1, start=4)
    assert torch.equal(opt.scale, ref.scale)
    assert all(torch.equal(opt.state[p]["mechanic_ref"], v) for p, v in zip(model2.parameters(), point))
    # the base step continued from the loaded AdamW moments: x = x_ref + S * u with u the plain
    # optimizer's own next update
    train(model, plain, 1, start=4)
    for p, x0, x_plain in zip(model2.parameters(), point, model.parameters()):
        torch.testing.assert_close(p.detach() - x0, opt.scale * (x_plain.detach() - x0), rtol=1e-6, atol=0)
        assert deep_equal(opt.state[p]["exp_avg"], plain.state[x_plain]["exp_avg"])
    # and the mechanized optimizer's own state dict still round-trips afterwards
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model2, opt, 1, start=5)


# --------------------------------------------------------------------------- opted-out groups
@pytest.mark.parametrize("base_name", ["adamw", "sgd_momentum"])
@pytest.mark.parametrize("opted_out_first", [False, True])
def test_opted_out_group_follows_the_base_alone_and_is_not_in_the_sums(base_name, opted_out_first):
    def make_base(groups):
        if base_name == "adamw":
            return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3)

    model = make_model()
    body, head = list(model[0].parameters()), list(model[2].parameters())
    groups = [{"params": body}, {"params": head, "mechanic": False}]
    opt = manic.mechanize(make_base(groups[::-1] if opted_out_first else groups))

    head_twin = [p.detach().clone().requires_grad_() for p in head]
    plain_head = make_base(head_twin)  # the base optimizer alone on a copy of the head
    body_twin = [p.detach().clone().requires_grad_() for p in body]
    body_only = manic.mechanize(make_base(body_twin))  # Mechanic without the opted-out group

    for t in range(20):
        opt.zero_grad()
        loss_at(model, t).backward()
        for twin, p in zip(head_twin, head):
            twin.grad = p.grad.clone()
        for twin, p in zip(body_twin, body):
            twin.grad = p.grad.clone()
        opt.step()
        plain_head.step()
        body_only.step()
        assert all_equal(head, head_twin), t
        assert torch.equal(opt.scale, body_only.scale), t
        assert all_equal(body, body_twin), t
    assert opt.scale.item() != pytest.approx(1e-6)
    assert all(not any(k.startswith("mechanic_") for k in opt.state[p]) for p in head)
    # round trip keeps the group opted out
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    assert [g.get("mechanic", True) for g in opt.param_groups] == [g.get("mechanic", True) for g in sd["param_groups"]]


def test_opted_out_group_stays_out_after_loading_a_plain_base_state_dict():
    """A plain base state dict has no "mechanic" key in its groups; loading it must not silently
    bring the opted-out group under Mechanic (e.g. at the next add_param_group)."""
    model = make_model()
    body, head = list(model[0].parameters()), list(model[2].parameters())
    plain = torch.optim.SGD([{"params": body}, {"params": head}], lr=0.05, momentum=0.9)
    train(model, plain, 3)
    sd = copy.deepcopy(plain.state_dict())

    opt = manic.mechanize(torch.optim.SGD([{"params": body}, {"params": head, "mechanic": False}],
                                          lr=0.05, momentum=0.9))
    opt.load_state_dict(sd)
    head_twin = [p.detach().clone().requires_grad_() for p in head]
    plain_head = torch.optim.SGD(head_twin, lr=0.05, momentum=0.9)
    plain_head.load_state_dict({"state": {0: copy.deepcopy(sd["state"][2]), 1: copy.deepcopy(sd["state"][3])},
                                "param_groups": [dict(sd["param_groups"][1], params=[0, 1])]})
    extra = torch.nn.Parameter(torch.ones(3, dtype=F64))
    for t in range(3, 9):
        if t == 6:
            opt.add_param_group({"params": [extra]})
        opt.zero_grad()
        loss_at(model, t).backward()
        extra.grad = torch.ones(3, dtype=F64)
        for twin, p in zip(head_twin, head):
            twin.grad = p.grad.clone()
        opt.step()
        plain_head.step()
        assert all_equal(head, head_twin), f"the opted-out group left the base's trajectory at step {t}"
        assert all("mechanic_ref" not in opt.state[p] for p in head), t
    assert opt.param_groups[1].get("mechanic", True) is False


# --------------------------------------------------------------------------- maximize
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
def test_maximize_with_g_equals_minimize_with_minus_g(base_name, store_delta):
    def make_base(params, maximize):
        if base_name == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9, maximize=maximize)
        return torch.optim.AdamW(params, lr=1e-2, maximize=maximize)

    runs = []
    for maximize in (False, True):
        model = make_model()
        opt = manic.mechanize(make_base(model.parameters(), maximize), store_delta=store_delta)
        for t in range(25):
            opt.zero_grad()
            loss_at(model, t).backward()  # g = grad of the loss
            if not maximize:
                for p in model.parameters():
                    p.grad.neg_()  # minimize with -g
            opt.step()
        runs.append((snap(model), opt.scale.clone()))
    (p0, s0), (p1, s1) = runs
    assert s0.item() > 1e-5
    assert torch.equal(s0, s1)
    assert all_equal(p0, p1)


# --------------------------------------------------------------------------- zero_grad
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    loss_at(model, 0).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=set_to_none)
    for p, g in zip(model.parameters(), grads):
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is g and torch.count_nonzero(p.grad) == 0
    # default is set_to_none=True, as in torch
    loss_at(model, 1).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # a step with all gradients None (a zeroed step) is accepted
    opt.step()
