"""layout.py: late binding: Mechanic works on the tensors the optimizer holds when it steps.

Parameters replaced before the first step are followed silently; after it, a replacement of
the same shape, dtype, device and placement carries Mechanic's buffers over, anything else
raises naming the parameter. Frozen parameters are not under Mechanic. Mechanic never keeps
a tensor the optimizer dropped alive. Single process here; the sharded swaps (accelerate's
FSDP2 preparation) are in tests/frameworks/.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import manic
import reference as ref
from helpers import flat
from manic.options import DEFAULTS

F64 = torch.float64
SHAPES = [(4, 3), (3,), (2, 5)]


def make(seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(s, generator=g, dtype=F64) + 0.5).requires_grad_() for s in shapes]


def grad_at(p: torch.Tensor, i: int, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * t + i)
    return p.detach() - 0.3 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype)


def step(opt: torch.optim.Optimizer, t: int) -> None:
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if p.requires_grad:
            p.grad = grad_at(p, i, t)
    opt.step()


def train(opt: torch.optim.Optimizer, t0: int, n: int) -> None:
    for t in range(t0, t0 + n):
        step(opt, t)


def mech_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if isinstance(k, str) and k.startswith("mechanic_"))


def replace_params(opt: torch.optim.Optimizer, new: list[torch.Tensor], move_state: bool) -> None:
    """What frameworks do: rewrite ``param_groups[*]["params"]`` (and, some, move the base's state)."""
    old = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = list(new)
    if move_state:
        for o, n in zip(old, new):
            if o in opt.state:
                opt.state[n] = opt.state.pop(o)


# --------------------------------------------------------------------------- before the first step
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_swap_before_the_first_step_is_followed(base):
    """The accelerate pattern: built on one set of tensors, stepped on another."""
    kind = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "adamw": lambda p: torch.optim.AdamW(p, lr=2e-2)}
    placeholders = [torch.empty(1, dtype=F64, requires_grad=True) for _ in SHAPES]
    opt = manic.mechanize(kind[base](placeholders))
    real = make()
    replace_params(opt, real, move_state=False)
    dead = [weakref.ref(p) for p in placeholders]
    del placeholders
    gc.collect()
    assert all(r() is None for r in dead)  # Mechanic kept none of them alive
    train(opt, 0, 30)

    twin_params = make()
    twin = manic.mechanize(kind[base](twin_params))
    train(twin, 0, 30)
    assert torch.equal(opt.scale, twin.scale) and opt.scale > 1e-4
    assert all(torch.equal(a, b) for a, b in zip(real, twin_params))
    assert all(a is b for a, b in zip(opt._engine.params, real))
    assert mech_bytes(opt) == 2 * sum(p.numel() * 8 for p in real)


# --------------------------------------------------------------------------- after the first step
@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("store_delta", [True, False])
def test_swap_after_steps_with_matching_tensors_carries_the_state_over(form, store_delta):
    def build(params):
        base = torch.optim.AdamW(params, lr=2e-2)
        if form == "dropin":
            return base, manic.mechanize(base, store_delta=store_delta)
        updater = manic.Updater(base)
        mechanic = manic.Mechanic(updater, store_delta=store_delta)

        class Pair:  # steps the seed pair like an optimizer
            param_groups, state = base.param_groups, base.state
            scale = property(lambda self: mechanic.scale)

            def step(self):
                mechanic.step()
                updater.step()
        return base, Pair()

    params = make()
    base, opt = build(params)
    train(opt, 0, 10)
    # re-materialised tensors: same shape, dtype, device; the framework moves the base's state
    new = [p.detach().clone().requires_grad_() for p in params]
    replace_params(base, new, move_state=True)
    dead = [weakref.ref(p) for p in params]
    del params
    gc.collect()
    assert all(r() is None for r in dead)
    train(opt, 10, 20)

    twin_params = make()
    _, twin = build(twin_params)
    train(twin, 0, 30)
    assert torch.equal(opt.scale, twin.scale) and opt.scale > 1e-4
    assert all(torch.equal(a, b) for a, b in zip(new, twin_params))


def test_swap_after_steps_without_moving_the_base_state():
    """The base's state stays on the old tensors (the framework's business); Mechanic's moves
    to the new ones, and the old tensors' entries lose Mechanic's buffers."""
    params = make()
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.05))  # stateless base: the runs stay comparable
    train(opt, 0, 10)
    new = [p.detach().clone().requires_grad_() for p in params]
    replace_params(opt, new, move_state=False)
    train(opt, 10, 10)
    assert all(set(opt.state[p]) == {"mechanic_ref", "mechanic_delta"} for p in new)
    assert not any(p in opt.state for p in params)
    twin_params = make()
    twin = manic.mechanize(torch.optim.SGD(twin_params, lr=0.05))
    train(twin, 0, 20)
    assert torch.equal(opt.scale, twin.scale)
    assert all(torch.equal(a, b) for a, b in zip(new, twin_params))


SWAPS = {
    "shape": (lambda p: torch.zeros(p.numel(), dtype=F64, requires_grad=True), "Parameter 1 .*shape"),
    "dtype": (lambda p: p.detach().float().requires_grad_(), "Parameter 1 .*dtype torch.float64 -> torch.float32"),
}


@pytest.mark.parametrize("what", sorted(SWAPS))
def test_swap_after_steps_that_cannot_be_carried_over_raises_naming_the_parameter(what):
    make_new, message = SWAPS[what]
    params = make(shapes=[(3,), (2, 2)])
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.05))
    train(opt, 0, 5)
    before = (opt.scale.clone(), [p.detach().clone() for p in params])
    replace_params(opt, [params[0], make_new(params[1])], move_state=False)
    with pytest.raises(RuntimeError, match=message):
        step(opt, 5)
    with pytest.raises(RuntimeError, match=message):  # and at a checkpoint, instead of saving nonsense
        opt.state_dict()
    assert torch.equal(opt.scale, before[0]) and all(torch.equal(a, b) for a, b in zip(params, before[1]))
    replace_params(opt, params, move_state=False)  # undone: it steps on as if nothing happened
    train(opt, 5, 5)
    twin_params = make(shapes=[(3,), (2, 2)])
    twin = manic.mechanize(torch.optim.SGD(twin_params, lr=0.05))
    train(twin, 0, 10)
    assert torch.equal(opt.scale, twin.scale)


def test_removed_parameter_raises_naming_it():
    params = make()
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.05))
    train(opt, 0, 3)
    opt.param_groups[0]["params"] = params[:2]
    with pytest.raises(RuntimeError, match="parameter 2 is gone"):
        step(opt, 3)


def test_a_dropped_optimizer_parameter_is_not_kept_alive_after_steps():
    """Freezing is how a parameter leaves; once the optimizer drops it too, nothing holds it."""
    params = make()
    opt = manic.mechanize(torch.optim.SGD([{"params": params[:2]}, {"params": [params[2]]}], lr=0.05))
    train(opt, 0, 3)
    params[2].requires_grad_(False)
    train(opt, 3, 1)
    opt.param_groups[1]["params"] = [torch.zeros(1, dtype=F64)]  # frozen placeholder: nothing to carry
    train(opt, 4, 1)
    dead = weakref.ref(params[2])
    del params[2]
    gc.collect()
    assert dead() is None


# --------------------------------------------------------------------------- frozen parameters
def test_frozen_parameters_have_no_buffers_and_keep_user_edits():
    params = make()
    params[1].requires_grad_(False)
    opt = manic.mechanize(torch.optim.AdamW(params, lr=2e-2))
    train(opt, 0, 5)
    assert not opt.state.get(params[1])
    assert mech_bytes(opt) == 2 * 8 * (params[0].numel() + params[2].numel())
    with torch.no_grad():
        params[1].fill_(0.123)
    train(opt, 5, 20)
    assert torch.equal(params[1], torch.full((3,), 0.123, dtype=F64))
    assert opt.scale > 1e-4


def test_freezing_after_steps_drops_the_buffers_and_keeps_the_value():
    params = make()
    opt = manic.mechanize(torch.optim.AdamW(params, lr=2e-2))
    train(opt, 0, 10)
    params[0].requires_grad_(False)
    params[0].grad = None
    frozen_at = params[0].detach().clone()
    train(opt, 10, 10)
    assert torch.equal(params[0], frozen_at)
    assert not any(k.startswith("mechanic_") for k in opt.state[params[0]])


@pytest.mark.parametrize("variant", ["original", "invariant"])
@pytest.mark.parametrize("store_delta", [True, False])
def test_frozen_parameters_match_the_reference_without_them_and_unfreezing_joins_with_delta_zero(store_delta,
                                                                                               variant):
    """Steps 0-14 with parameter 1 frozen equal the NumPy reference over parameters 0 and 2
    alone; at step 15 it is unfrozen and joins with its current value as reference and Delta 0,
    which the reference expresses as a parameter added with x_ref = its value, Delta = 0."""
    params = make()
    params[1].requires_grad_(False)
    hyper = {"variant": variant, **DEFAULTS[variant]}  # the original's: optax's s_init 1e-6, weight_decay 1e-2
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.05), store_delta=store_delta, **hyper)
    trainable = [params[0], params[2]]
    mech = ref.Mechanic(flat(trainable), ref.SGD(0.05), store_delta=store_delta, **hyper)
    for t in range(15):
        step(opt, t)
        mech.step(flat([p.grad for p in trainable]), 0.05)
    assert abs(opt.scale.item() - mech.scale) <= 1e-12 * mech.scale
    assert np.allclose(flat(trainable), mech.x, rtol=0, atol=1e-12)
    frozen_value = params[1].detach().clone()

    params[1].requires_grad_(True)
    step(opt, 15)
    buf = opt.state[params[1]]
    assert torch.equal(buf["mechanic_ref"], frozen_value)  # its reference is its value at the join
    if store_delta:
        # Delta started at 0 and holds exactly this step's base update: -lr * g
        torch.testing.assert_close(buf["mechanic_delta"], -0.05 * params[1].grad, rtol=1e-14, atol=0)
    # the same step in the reference: a fourth block joins with x_ref = x, Delta = 0
    mech_all = _reference_with_join(mech, frozen_value, store_delta, hyper)
    mech_all.step(flat([params[0].grad, params[2].grad, params[1].grad]), 0.05)
    assert abs(opt.scale.item() - mech_all.scale) <= 1e-12 * mech_all.scale
    assert np.allclose(flat([params[0], params[2], params[1]]), mech_all.x, rtol=0, atol=1e-12)


def _reference_with_join(mech: "ref.Mechanic", value: torch.Tensor, store_delta: bool, hyper: dict) -> "ref.Mechanic":
    v = value.reshape(-1).numpy()
    out = ref.Mechanic(np.concatenate([mech.x, v]), ref.SGD(0.05), store_delta=store_delta, lr_ref=mech.lr_ref,
                       **hyper)
    out.r, out.m, out.v, out.s = mech.r.copy(), mech.m.copy(), mech.v.copy(), mech.s.copy()
    out.x_ref = np.concatenate([mech.x_ref, v])
    S = mech.s.sum()
    # (the recompute form reads its direction from x - x_ref, which is 0 for the joining block too)
    d = mech.delta if store_delta else (mech.x - mech.x_ref) / (S + mech.eps)
    out.delta = np.concatenate([d, np.zeros_like(v)])
    return out


def test_a_parameter_without_grad_that_requires_grad_is_still_under_mechanic():
    """Documented: it is rebased and in ||x||, but not in the gradient sums."""
    params = make()
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.05))
    train(opt, 0, 5)
    for i, p in enumerate(params):
        p.grad = None if i == 1 else grad_at(p, i, 5)
    opt.step()
    assert set(opt.state[params[1]]) == {"mechanic_ref", "mechanic_delta"}
    d = opt.state[params[1]]
    torch.testing.assert_close(params[1].detach(), d["mechanic_ref"] + opt.scale * d["mechanic_delta"],
                               rtol=1e-14, atol=0)


def test_all_parameters_frozen_idles_until_one_is_not():
    params = make()
    for p in params:
        p.requires_grad_(False)
    opt = manic.mechanize(torch.optim.AdamW(params, lr=2e-2))
    before = [p.clone() for p in params]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and int(opt.stats()["step"]) == 0
    params[0].requires_grad_(True)
    train(opt, 0, 3)
    assert int(opt.stats()["step"]) == 3 and mech_bytes(opt) == 2 * 8 * params[0].numel()
