"""manic (both forms) against the NumPy float64 reference of docs/algorithm.md, and the
hand-checkable examples of docs/algorithm.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
from helpers import BASES, Runner, flat, init_params, rel_err, unflat

SCHEDULE = lambda t: 1.0 / (1.0 + 0.05 * t)  # noqa: E731


def _gradient_source(regime: str, n: int, seed: int):
    """Returns (steps, grad(x, t) -> flat gradient)."""
    rng = np.random.default_rng(seed + 1)
    if regime == "random":  # no consistent direction: the scale stays small
        gs = rng.normal(size=(200, n))
        return 200, lambda x, t: gs[t]
    if regime == "fixed":  # open loop through the scale's growth and overshoot
        g = rng.normal(size=n)
        return 80, lambda x, t: g
    if regime == "closed":  # a quadratic: the gradient depends on where we are
        a, x_star = rng.uniform(0.5, 2.0, size=n), rng.normal(size=n)
        return 30, lambda x, t: a * (x - x_star)
    raise ValueError(regime)


def _compare(form, base_name, regime, store_delta, scheduled, seed=0, **options):
    make_torch, make_ref, lr = BASES[base_name]
    params = init_params(seed)
    x0 = flat(params)
    schedule = SCHEDULE if scheduled else None
    run = Runner(form, params, make_torch(params, lr), schedule, store_delta=store_delta, **options)
    mech = ref.Mechanic(x0, make_ref(lr), store_delta=store_delta)
    steps, grad = _gradient_source(regime, x0.size, seed)
    worst_scale = worst_x = worst_delta = 0.0
    for t in range(steps):
        lr_t = lr * (SCHEDULE(t) if scheduled else 1.0)
        mech_g = grad(mech.x, t)
        run.step(unflat(grad(flat(params), t), params))
        mech.step(mech_g, lr_t)
        worst_scale = max(worst_scale, abs(run.scale.item() - mech.scale) / mech.scale)
        worst_x = max(worst_x, rel_err(flat(params) - x0, mech.x - x0))
        if store_delta:  # the stored direction, free of the parameters' rounding
            state = run.base.state
            worst_delta = max(worst_delta, rel_err(flat([state[p]["mechanic_delta"] for p in params]), mech.delta))
    return worst_scale, max(worst_x, worst_delta), mech.scale


@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("regime", ["random", "fixed", "closed"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_matches_reference(form, base, regime, store_delta):
    for scheduled in (False, True):
        worst_scale, worst_x, final_scale = _compare(form, base, regime, store_delta, scheduled)
        assert worst_scale <= 1e-9, (scheduled, worst_scale)
        assert worst_x <= 1e-9, (scheduled, worst_x)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("store_delta", [True, False])
def test_compiled_kernels_match_reference(store_delta):
    """compile=True fuses the per-tensor work; it follows the reference just as closely."""
    for regime in ("fixed", "closed"):
        worst_scale, worst_x, _ = _compare("dropin", "adamw", regime, store_delta, True, compile=True)
        assert worst_scale <= 1e-9 and worst_x <= 1e-9, (regime, worst_scale, worst_x)


def test_fixed_regime_goes_through_growth():
    """The fixed-gradient regime really exercises the scale's growth (not a trivially small scale)."""
    _, _, final = _compare("dropin", "sgd", "fixed", True, False)
    assert final > 1e3 * 1e-6


# docs/algorithm.md, "Worked examples (float64)".
HAND = [
    # (num_betas, weight_decay, s_init, store_delta, expected sum(s) after steps 1..3, rel tol)
    (1, 0.0, 1e-8, False, [1e-8, 1e-8, 1.397452261670677e-8], 1e-7),
    (1, 0.0, 1e-8, True, [1e-8, 1e-8, 1.429154875246747e-8], 1e-13),
    (2, 0.1, 0.1, False, [0.1, 0.1, 0.14088817234907436], 1e-13),
    (2, 0.1, 0.1, True, [0.1, 0.1, 0.14088817289208438], 1e-13),
]
HAND_GRADS = [(1.0, 0.0), (-2.0, 1.0), (-1.0, 2.0)]


@pytest.mark.parametrize("n,wd,s_init,store_delta,expected,tol", HAND)
def test_hand_examples_reference(n, wd, s_init, store_delta, expected, tol):
    """The NumPy reference itself reproduces docs/algorithm.md's numbers."""
    mech = ref.Mechanic([1.0, 2.0], ref.SGD(1.0), weight_decay=wd, eps=1e-8, s_init=s_init, num_betas=n,
                        store_delta=store_delta)
    for g, want in zip(HAND_GRADS, expected):
        mech.step(np.array(g), 1.0)
        assert mech.scale == pytest.approx(want, rel=tol)


@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("n,wd,s_init,store_delta,expected,tol", HAND)
def test_hand_examples(form, n, wd, s_init, store_delta, expected, tol):
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    run = Runner(form, [p], torch.optim.SGD([p], lr=1.0), weight_decay=wd, eps=1e-8, s_init=s_init,
                 num_betas=n, store_delta=store_delta)
    assert run.scale.item() == pytest.approx(n * s_init, rel=1e-15)  # n * s_init before the first step
    for g, want in zip(HAND_GRADS, expected):
        run.step([torch.tensor(g, dtype=torch.float64)])
        assert run.scale.item() == pytest.approx(want, rel=tol)
