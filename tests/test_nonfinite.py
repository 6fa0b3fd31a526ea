"""Non-finite gradients: Mechanic's own state never takes a non-finite value."""

from __future__ import annotations

import copy

import pytest
import torch

import manic
from helpers import init_params

MECH_GROUP_KEYS = ("mechanic_r", "mechanic_m", "mechanic_v", "mechanic_s", "mechanic_lr_ref")


def _grads(params, t):
    g = torch.Generator().manual_seed(t)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.3 for p in params]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _snapshot(opt, params):
    return copy.deepcopy(({k: opt.param_groups[0][k] for k in MECH_GROUP_KEYS},
                          [{k: v for k, v in opt.state[p].items()} for p in params], [p.detach() for p in params]))


@pytest.mark.parametrize("variant", ["invariant", "original"])
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_step_leaves_mechanic_state(store_delta, bad, variant):
    params = init_params(0)
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1), store_delta=store_delta, variant=variant)
    for t in range(15):
        _step(opt, params, _grads(params, t))
    tuner, state, xs = _snapshot(opt, params)
    grads = _grads(params, 99)
    grads[1][2] = bad
    _step(opt, params, grads)
    assert opt.stats()["skipped_steps"].item() == 1 and opt.stats()["step"].item() == 15
    for k in MECH_GROUP_KEYS:
        assert torch.equal(opt.param_groups[0][k], tuner[k]), k
    for p, before in zip(params, state):
        for k, v in opt.state[p].items():
            assert torch.isfinite(v).all(), k
            if k.startswith("mechanic_"):
                assert torch.equal(v, before[k]), k
    # the parameters are back at x_ref + S * Delta (finite; the recompute form's direction
    # carries its factor S / (S + eps)), and training goes on
    for p, x in zip(params, xs):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), x, rtol=1e-9 if store_delta else 1e-6, atol=0)
    for t in range(15, 20):
        _step(opt, params, _grads(params, t))
    assert torch.isfinite(opt.scale) and opt.stats()["step"].item() == 20


def test_skip_nonfinite_skips_the_whole_step():
    """skip_nonfinite=True: the base optimizer does not step either (AdamW's moments stay
    clean), and the run continues bitwise like one that never saw the bad step."""
    params = init_params(0)
    clean = init_params(0)
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-2), skip_nonfinite=True)
    ref = manic.mechanize(torch.optim.AdamW(clean, lr=1e-2))
    for t in range(10):
        _step(opt, params, _grads(params, t))
        _step(ref, clean, _grads(clean, t))
    bad = _grads(params, 50)
    bad[0][0, 0] = float("inf")
    _step(opt, params, bad)
    for t in range(10, 25):
        _step(opt, params, _grads(params, t))
        _step(ref, clean, _grads(clean, t))
    assert opt.stats()["skipped_steps"].item() == 1
    assert torch.equal(opt.scale, ref.scale)
    for a, b in zip(params, clean):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"])


def test_nonfinite_first_nonzero_h_waits_for_the_wealth():
    """Invariant form: the first step (h = 0) moves at the floor; a non-finite second step is skipped
    (no wealth paid in, lr_ref kept); the next finite step pays it, as if the bad step had not come."""
    params, clean = init_params(0), init_params(0)
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1))
    ref = manic.mechanize(torch.optim.SGD(clean, lr=0.1))
    _step(opt, params, _grads(params, 0))
    _step(ref, clean, _grads(clean, 0))
    floor = manic.options.DEFAULTS["invariant"]["s_init"] * manic.tuner.FLOOR
    assert opt.effective_lr[0].item() == pytest.approx(floor, rel=1e-12)
    bad = _grads(params, 1)
    bad[0][0, 0] = float("nan")
    _step(opt, params, bad)
    assert opt.stats()["skipped_steps"].item() == 1 and opt.param_groups[0]["mechanic_lr_ref"].item() == 0.1
    assert torch.equal(opt.param_groups[0]["mechanic_r"], torch.zeros(6, dtype=torch.float64))
    for t in range(1, 6):
        _step(opt, params, _grads(params, t))
        _step(ref, clean, _grads(clean, t))
    assert opt.effective_lr[0].item() > 100 * floor  # the start was paid in
    torch.testing.assert_close(opt.scale, ref.scale, rtol=1e-12, atol=0)
    for a, b in zip(params, clean):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
