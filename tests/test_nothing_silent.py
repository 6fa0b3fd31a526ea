"""Nothing silent: the ways a run could lose Mechanic's state or silently train the wrong weights
(issue 28), each reproduced and answered: it works correctly, or it raises at the earliest point
naming the cause and the fix, with the optimizer, the parameters and the state exactly as before."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import manic

F64 = torch.float64


def vec(value: float, n: int = 3, dtype=F64) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype).requires_grad_()


def pull(params, targets, noise: float = 0.0, t: int = 0) -> None:
    """Gradients of 0.5 * ||p - target||^2 (plus a little deterministic noise)."""
    g = torch.Generator().manual_seed(t)
    for p, target in zip(params, targets):
        p.grad = (p.detach() - target) + noise * torch.randn(p.shape, generator=g, dtype=p.dtype)


def snapshot(opt) -> dict:
    """Everything a user could observe: parameters, scale, state tensors (by parameter identity)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"params": [p.detach().clone() for p in params],
            "scale": opt.scale.clone(),
            "state": [{k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
                      if p in opt.state else None for p in params]}


def same(a: dict, b: dict) -> bool:
    if len(a["params"]) != len(b["params"]) or not torch.equal(a["scale"], b["scale"]):
        return False
    if not all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])):
        return False
    for x, y in zip(a["state"], b["state"]):
        if (x is None) != (y is None):
            return False
        if x is not None:
            if x.keys() != y.keys():
                return False
            for k in x:
                if torch.is_tensor(x[k]) and not torch.equal(x[k], y[k]):
                    return False
    return True


# ----------------------------------------------------------------------------- 1. identity first
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_reordered_parameters_keep_their_own_buffers(base):
    """Swapping two same-shape parameters in param_groups after the start moves nothing: each keeps
    its own x_ref and Delta (before: a near 0 went to 9.9 and b near 10 to 0.09)."""

    def run(swap: bool):
        a, b = vec(0.0), vec(10.0)
        targets = {id(a): torch.full((3,), 1.0, dtype=F64), id(b): torch.full((3,), 11.0, dtype=F64)}
        make = (lambda ps: torch.optim.SGD(ps, lr=0.1)) if base == "sgd" else (lambda ps: torch.optim.AdamW(ps, lr=0.1))
        opt = manic.mechanize(make([a, b]))
        for t in range(6):
            if swap and t == 3:
                opt.param_groups[0]["params"] = [b, a]
            ps = opt.param_groups[0]["params"]
            pull(ps, [targets[id(p)] for p in ps], t=t)
            opt.step()
        return a.detach(), b.detach(), opt.scale

    a0, b0, s0 = run(False)
    a1, b1, s1 = run(True)
    assert a1.max() < 5 and b1.min() > 5
    # two tensors: the sums are the same in either order, so the runs agree bitwise
    assert torch.equal(s0, s1) and torch.equal(a0, a1) and torch.equal(b0, b1)


def test_group_inserted_in_front_and_a_stranger_at_a_known_position():
    """One run: a group inserted at index 0 (its parameter new to Mechanic, zero so it adds nothing
    to the sums) and a parameter replaced by a same-shape tensor Mechanic never saw (as accelerate
    and DeepSpeed do): known tensors keep their own buffers, the stranger takes over its position's."""
    a, b = vec(0.0), vec(10.0)
    ta, tb = torch.full((3,), 1.0, dtype=F64), torch.full((3,), 11.0, dtype=F64)
    opt = manic.mechanize(torch.optim.SGD([a, b], lr=0.1))
    control_a, control_b = vec(0.0), vec(10.0)
    control = manic.mechanize(torch.optim.SGD([control_a, control_b], lr=0.1))
    for t in range(3):
        pull([a, b], [ta, tb], t=t)
        pull([control_a, control_b], [ta, tb], t=t)
        opt.step()
        control.step()
    ref_b = opt.state[b]["mechanic_ref"].clone()
    c = torch.zeros(3, dtype=F64, requires_grad=True)
    opt.param_groups.insert(0, {**{k: v for k, v in opt.param_groups[0].items() if not k.startswith("mechanic_")},
                                "params": [c]})
    stranger = torch.nn.Parameter(b.detach().clone())  # the same values, a new tensor
    opt.param_groups[1]["params"] = [a, stranger]
    for t in range(3, 6):
        c.grad = torch.zeros(3, dtype=F64)
        pull([a, stranger], [ta, tb], t=t)
        pull([control_a, control_b], [ta, tb], t=t)
        opt.step()
        control.step()
    assert torch.equal(opt.state[stranger]["mechanic_ref"], ref_b)
    assert torch.equal(a, control_a) and torch.equal(stranger, control_b)
    assert torch.equal(opt.scale, control.scale)
    assert "mechanic_s" in opt.param_groups[0]  # the tuner's entries live in the first group, whichever it is
    sd = opt.state_dict()
    fresh = [torch.zeros(3, dtype=F64, requires_grad=True), vec(0.0), vec(10.0)]
    opt2 = manic.mechanize(torch.optim.SGD([{"params": [fresh[0]]}, {"params": fresh[1:]}], lr=0.1))
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.scale, opt.scale)


# ----------------------------------------------------------------------------- 2. state cleared
@pytest.mark.parametrize("how", ["clear", "del"])
def test_clearing_the_optimizer_state_does_not_lose_mechanics_buffers(how):
    a, b = vec(0.0), vec(10.0)
    targets = [torch.full((3,), 1.0, dtype=F64), torch.full((3,), 11.0, dtype=F64)]
    opt = manic.mechanize(torch.optim.SGD([a, b], lr=0.1))  # stateless base: the runs stay comparable
    ca, cb = vec(0.0), vec(10.0)
    control = manic.mechanize(torch.optim.SGD([ca, cb], lr=0.1))
    for t in range(6):
        if t == 3:
            if how == "clear":
                opt.state.clear()
            else:
                del opt.state[a]
        pull([a, b], targets, t=t)
        pull([ca, cb], targets, t=t)
        opt.step()
        control.step()
    assert torch.equal(a, ca) and torch.equal(b, cb) and torch.equal(opt.scale, control.scale)
    sd = opt.state_dict()
    assert all("mechanic_ref" in sd["state"][i] and "mechanic_delta" in sd["state"][i] for i in (0, 1))
    ra, rb = vec(0.0), vec(10.0)
    resumed = manic.mechanize(torch.optim.SGD([ra, rb], lr=0.1))
    with torch.no_grad():
        ra.copy_(a)
        rb.copy_(b)
    resumed.load_state_dict(sd)
    pull([ra, rb], targets, t=9)
    pull([a, b], targets, t=9)
    resumed.step()
    opt.step()
    assert torch.equal(ra, a) and torch.equal(rb, b)


# 3. huge and tiny gradients: tests/test_extremes.py


# ----------------------------------------------------------------------------- 4. loading through the base
def _trained(steps=4, seed_api=False):
    a, b = vec(0.0), vec(10.0)
    targets = [torch.full((3,), 1.0, dtype=F64), torch.full((3,), 11.0, dtype=F64)]
    base = torch.optim.AdamW([a, b], lr=0.1)
    if seed_api:
        updater = manic.Updater(base, torch.optim.lr_scheduler.LambdaLR(base, lambda t: 1.0))
        mech = manic.Mechanic(updater)
        for t in range(steps):
            pull([a, b], targets, t=t)
            mech.step()
            updater.step()
        return (a, b), targets, mech, base
    opt = manic.mechanize(base)
    for t in range(steps):
        pull([a, b], targets, t=t)
        opt.step()
    return (a, b), targets, opt, base


def test_loading_through_the_base_optimizer_loads_mechanic_too():
    (a, b), targets, opt, base = _trained()
    sd = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in (a, b)]
    for t in range(4, 7):  # move on, then go back through the base optimizer
        pull([a, b], targets, t=t)
        opt.step()
    with torch.no_grad():
        a.copy_(params[0])
        b.copy_(params[1])
    opt.base_optimizer.load_state_dict(sd)
    assert torch.equal(opt.scale, sd["param_groups"][0]["mechanic_s"].sum() / sd["param_groups"][0]["mechanic_lr_ref"])
    assert torch.equal(opt.state[a]["mechanic_delta"], sd["state"][0]["mechanic_delta"])
    # and the next step is the one the saved run would have taken
    (a2, b2), _, opt2, _ = _trained(steps=5)
    pull([a, b], targets, t=4)
    opt.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_loading_the_seed_apis_optimizer_loads_mechanic_too():
    (a, b), targets, mech, base = _trained(seed_api=True)
    sd = copy.deepcopy(base.state_dict())
    scale = mech.scale.clone()
    for t in range(4, 7):
        pull([a, b], targets, t=t)
        mech.step()
        mech.updater.step() if hasattr(mech, "updater") else None
    mech.optimizer.load_state_dict(sd)
    assert torch.equal(mech.scale, scale)


# 5. a non-finite base update: tests/test_extremes.py


# ----------------------------------------------------------------------------- 6. a parameter twice
def test_the_same_parameter_twice_in_one_group_is_refused():
    a = vec(0.0)
    with pytest.warns(UserWarning):  # torch's own warning; Mechanic then refuses at its first step
        base = torch.optim.SGD([a, a], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):  # at the earliest point: construction
        manic.mechanize(base)


def test_the_same_parameter_in_two_groups_is_refused():
    a, b = vec(0.0), vec(1.0)
    opt = manic.mechanize(torch.optim.SGD([a, b], lr=0.1))
    a.grad, b.grad = torch.ones(3, dtype=F64), torch.ones(3, dtype=F64)
    opt.step()
    before = snapshot(opt)
    opt.param_groups.append({**{k: v for k, v in opt.param_groups[0].items() if not k.startswith("mechanic_")},
                             "params": [a]})
    with pytest.raises(ValueError, match="more than once"):
        opt.step()
    opt.param_groups.pop()
    assert same(snapshot(opt), before)
    opt.step()  # and it still steps


# ----------------------------------------------------------------------------- 7. dtype moved
def test_model_double_after_the_start_follows_the_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    model.double()
    for _ in range(3):
        opt.zero_grad()
        model(x.double()).pow(2).mean().backward()
        opt.step()
    for p in model.parameters():
        assert p.dtype == F64
        assert opt.state[p]["mechanic_delta"].dtype == F64 and opt.state[p]["mechanic_ref"].dtype == F64
        # x = x_ref + S * Delta in float64 (to its rounding), not rounded to float32 (~1e-8)
        implied = opt.state[p]["mechanic_ref"] + opt.scale * opt.state[p]["mechanic_delta"]
        assert torch.allclose(p.detach(), implied, rtol=1e-14, atol=1e-16)
    assert opt.scale.dtype == F64


# ----------------------------------------------------------------------------- 8. per_group and a new group
def test_per_group_refuses_a_new_group_after_the_start_at_the_call():
    a, b = vec(0.0), vec(1.0)
    opt = manic.mechanize(torch.optim.SGD([a], lr=0.1), per_group=True)
    a.grad = torch.ones(3, dtype=F64)
    opt.step()
    before = snapshot(opt)
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="per_group"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == groups and same(snapshot(opt), before)
    opt.state_dict()
    opt.step()


@pytest.mark.parametrize("read", ["scale", "effective_lr", "stats", "state_dict"])
def test_per_group_reads_one_scale_per_group_added_before_the_start(read):
    """A group added before the first step gets its tuner at once: whatever is read first (the scale, the
    effective lrs, the statistics or a state dict), the scale has one entry per group, and reading it
    changes nothing a later read would see (the stateful suite found state_dict() resizing it)."""
    a, b = vec(0.0), vec(1.0)
    opt = manic.mechanize(torch.optim.SGD([a], lr=0.1), per_group=True)
    opt.add_param_group({"params": [b], "lr": 0.2})
    first = {"scale": lambda: opt.scale, "effective_lr": lambda: opt.effective_lr, "stats": opt.stats,
             "state_dict": opt.state_dict}[read]()
    assert opt.scale.shape == (2,) and len(opt.effective_lr) == 2 and opt.stats()["scale"].shape == (2,)
    if read == "scale":
        assert torch.equal(first, opt.scale)
    a.grad, b.grad = torch.ones(3, dtype=F64), torch.ones(3, dtype=F64)
    opt.step()
    assert opt.scale.shape == (2,)


# ----------------------------------------------------------------------------- 9. pickle
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_mechanized_optimizer_pickles_after_the_first_step(how):
    (a, b), targets, opt, _ = _trained()
    if how == "pickle":
        opt2 = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        opt2 = torch.load(buf, weights_only=False)
    a2, b2 = opt2.param_groups[0]["params"]
    assert torch.equal(opt2.scale, opt.scale)
    for t in range(4, 7):
        pull([a, b], targets, t=t)
        pull([a2, b2], targets, t=t)
        opt.step()
        opt2.step()
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(opt.scale, opt2.scale)


# ----------------------------------------------------------------------------- the smaller ones
def test_a_checkpoint_saved_while_a_layer_was_frozen_loads_where_it_trains():
    a, b = vec(0.0), vec(10.0)
    b.requires_grad_(False)
    opt = manic.mechanize(torch.optim.SGD([a, b], lr=0.1))
    for t in range(3):
        a.grad = torch.ones(3, dtype=F64)
        opt.step()
    sd = opt.state_dict()
    a2, b2 = vec(0.0), vec(10.0)  # b trains here
    opt2 = manic.mechanize(torch.optim.SGD([a2, b2], lr=0.1))
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.scale, opt.scale)
    a2.grad, b2.grad = torch.ones(3, dtype=F64), torch.ones(3, dtype=F64)
    opt2.step()
    assert torch.isfinite(b2).all()


def test_updater_load_of_an_optimizer_state_dict_is_a_clear_error():
    (a, b), targets, mech, base = _trained(seed_api=True)
    updater = mech.updater if hasattr(mech, "updater") else None
    if updater is None:
        pytest.skip("the seed API exposes no updater on Mechanic")
    with pytest.raises(ValueError, match="updater"):
        updater.load_state_dict(base.state_dict())


class SAMLike(torch.optim.Optimizer):
    """A base that needs the closure: it evaluates the gradient at a perturbed point (like SAM)."""

    def __init__(self, params, lr=0.1, rho=0.05):
        super().__init__(params, {"lr": lr, "rho": rho})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("SAMLike needs a closure")
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        eps = [self.defaults["rho"] * p.grad / (p.grad.norm() + 1e-12) for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
        with torch.enable_grad():
            closure()
        for p, e in zip(params, eps):
            p.sub_(e)
            p.add_(p.grad, alpha=-self.defaults["lr"])


def closure_run(make_base):
    """A mechanized optimizer over a small float64 model, and a closure that counts its evaluations."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(16, 3, dtype=F64), torch.randn(16, 1, dtype=F64)
    opt = manic.mechanize(make_base(model.parameters()))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return opt, closure, calls


def test_step_with_a_closure_reaches_a_base_that_needs_it():
    opt, closure, calls = closure_run(SAMLike)
    loss = opt.step(closure)
    assert loss is not None and len(calls) == 2  # Mechanic's evaluation at x_t, SAM's at the perturbed point


def test_step_with_a_closure_evaluates_it_once_for_a_plain_base():
    opt, closure, calls = closure_run(lambda ps: torch.optim.AdamW(ps, lr=0.1))
    for _ in range(3):
        opt.step(closure)
    assert len(calls) == 3


def test_a_plain_state_dict_from_another_model_is_refused_at_load():
    a, b = vec(0.0), vec(1.0)
    other = torch.optim.AdamW([torch.zeros(5, dtype=F64, requires_grad=True), torch.zeros(2, dtype=F64,
                                                                                          requires_grad=True)])
    for p in other.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    other.step()
    opt = manic.mechanize(torch.optim.AdamW([a, b], lr=0.1))
    before = snapshot(opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    assert same(snapshot(opt), before)


def test_a_mechanized_state_dict_in_a_plain_optimizer_then_wrapped_names_the_fix():
    (a, b), targets, opt, _ = _trained()
    sd = opt.state_dict()
    a2, b2 = vec(0.0), vec(10.0)
    plain = torch.optim.AdamW([a2, b2], lr=0.1)
    plain.load_state_dict(sd)
    with pytest.raises(ValueError, match="mechanize"):
        manic.mechanize(plain)
