"""manic (both forms, both variants) against the NumPy float64 reference of docs/algorithm.md and
of the invariant form, and the hand-checkable examples of docs/algorithm.md (the original form)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reference as ref
from helpers import BASES, Runner, flat, init_params, rel_err, unflat
from manic.options import DEFAULTS

SCHEDULE = lambda t: 1.0 / (1.0 + 0.05 * t)  # noqa: E731


def _gradient_source(regime: str, n: int, seed: int, variant: str = "original"):
    """Returns (steps, grad(x, t) -> flat gradient)."""
    rng = np.random.default_rng(seed + 1)
    if regime == "random":  # no consistent direction: the scale stays small
        gs = rng.normal(size=(200, n))
        return 200, lambda x, t: gs[t]
    if regime == "fixed":  # open loop through the scale's growth and overshoot
        g = rng.normal(size=n)
        # The invariant form (starting at an effective lr of s_init, not s_init * lr) is through its rise
        # and peak by step ~30 and then oscillates, where rounding differences grow chaotically
        # (docs/algorithm.md, "Comparing float64 trajectories"): a relative 1e-15 change of the
        # reference's own Delta at step 1 exceeds 1e-12 from step 45 on at s_init = 1e-3 (31 at 1e-2,
        # weight_decay 1-8), so it stops at 36.
        return (80 if variant == "original" else 36), lambda x, t: g
    if regime == "closed":  # a quadratic: the gradient depends on where we are
        a, x_star = rng.uniform(0.5, 2.0, size=n), rng.normal(size=n)
        return 30, lambda x, t: a * (x - x_star)
    raise ValueError(regime)


VARIANTS = ["original", "invariant"]


def _hyper(variant: str) -> dict:
    """The variant with its default s_init and weight_decay, spelled out for both sides (the
    original's are optax's, 1e-6 and 1e-2; the invariant form's are read from manic.options)."""
    return {"variant": variant, **DEFAULTS[variant]}


def _compare(form, base_name, regime, store_delta, scheduled, seed=0, variant="original", **options):
    make_torch, make_ref, lr = BASES[base_name]
    params = init_params(seed)
    x0 = flat(params)
    schedule = SCHEDULE if scheduled else None
    hyper = _hyper(variant)
    run = Runner(form, params, make_torch(params, lr), schedule, store_delta=store_delta, **hyper, **options)
    # lr_ref: the reference takes the first step's lr (the schedule's factor is 1 at t = 0)
    mech = ref.Mechanic(x0, make_ref(lr), store_delta=store_delta, **hyper)
    steps, grad = _gradient_source(regime, x0.size, seed, variant)
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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("regime", ["random", "fixed", "closed"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_matches_reference(form, base, regime, store_delta, variant):
    for scheduled in (False, True):
        worst_scale, worst_x, final_scale = _compare(form, base, regime, store_delta, scheduled, variant=variant)
        assert worst_scale <= 1e-9, (scheduled, worst_scale)
        assert worst_x <= 1e-9, (scheduled, worst_x)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("store_delta", [True, False])
def test_compiled_kernels_match_reference(store_delta, variant, monkeypatch):
    """compile=True fuses the per-tensor work; it follows the reference just as closely. (These
    tensors are small, which compile=True leaves to the eager kernels: SMALL = 0 compiles them all.)"""
    from manic import kernels

    monkeypatch.setattr(kernels, "SMALL", 0)
    for regime in ("fixed", "closed"):
        worst_scale, worst_x, _ = _compare("dropin", "adamw", regime, store_delta, True, variant=variant,
                                           compile=True)
        assert worst_scale <= 1e-9 and worst_x <= 1e-9, (regime, worst_scale, worst_x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_regime_goes_through_growth(variant):
    """The fixed-gradient regime really exercises the scale's growth (not a trivially small scale):
    the effective lr S * lr ends far above where it starts, s_init * lr in the original form (1000
    times), s_init itself in the invariant one (100 times, in its shorter run)."""
    _, _, final = _compare("dropin", "sgd", "fixed", True, False, variant=variant)
    lr = BASES["sgd"][2]
    if variant == "original":
        assert final * lr > 1e3 * DEFAULTS["original"]["s_init"] * lr
    else:
        assert final * lr > 1e2 * DEFAULTS["invariant"]["s_init"]


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
                        store_delta=store_delta, variant="original")
    for g, want in zip(HAND_GRADS, expected):
        mech.step(np.array(g), 1.0)
        assert mech.scale == pytest.approx(want, rel=tol)


@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("n,wd,s_init,store_delta,expected,tol", HAND)
def test_hand_examples(form, n, wd, s_init, store_delta, expected, tol):
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    run = Runner(form, [p], torch.optim.SGD([p], lr=1.0), weight_decay=wd, eps=1e-8, s_init=s_init,
                 num_betas=n, store_delta=store_delta, variant="original")
    assert run.scale.item() == pytest.approx(n * s_init, rel=1e-15)  # n * s_init before the first step
    for g, want in zip(HAND_GRADS, expected):
        run.step([torch.tensor(g, dtype=torch.float64)])
        assert run.scale.item() == pytest.approx(want, rel=tol)


# The invariant form by hand (written from its specification, lambda = 0 so that only the directions
# matter): the same two scalars and gradients, SGD at lr = 0.5 = lr_ref, n = 1 (beta = 0.9),
# s_init = 0.1 (an effective lr), eps = 1e-8; S = S' / lr_ref with S' = s.
def _invariant_hand(store_delta: bool) -> list[float]:
    eps, L, s0, f = 1e-8, 0.5, 0.1, 0.1 * 1e-3  # f: the floor, s_init * 1e-3
    # step 1: Delta = 0, h = 0: no wealth, m = eps, v = 0, s = f * eps / eps = f
    s1 = f
    # Delta_2 = u_1 = -0.5 * (1, 0); x_2 - x_ref = S_1 * Delta_2 = (s1 / L) * (-0.5, 0) = (-s1, 0)
    # step 2, g = (-2, 1): stored, Delta' = Delta / L = (-1, 0), h = 2;
    #   recompute, h = <g, x - x_ref> / (S' + eps) = 2 s1 / (s1 + eps)
    h2 = 2.0 if store_delta else 2 * s1 / (s1 + eps)
    # first non-zero h: r := s_init * |h|; hc = clamp(h, -eps, eps) = eps; m = |h| + eps, v = h^2
    r2 = 0.9 * s0 * h2 - eps * s1
    m2, v2 = h2 + eps, h2 * h2
    s2 = (f * m2 + r2) / (math.sqrt(v2) + eps)
    # Delta'_3 = D'_2 + u_2 / L, u_2 = -0.5 * (-2, 1): D'_2 = (-1, 0) stored, (-s1 / (s1 + eps), 0) recompute
    d2 = -1.0 if store_delta else -s1 / (s1 + eps)
    d3 = (d2 + 2.0, -1.0)
    # step 3, g = (-1, 2): h = <g, Delta'_3>, times S'_2 / (S'_2 + eps) in the recompute form
    h3 = -d3[0] + 2 * d3[1]
    if not store_delta:
        h3 = h3 * s2 / (s2 + eps)
    hc3 = max(-m2, min(h3, m2))
    m3 = max(0.9 * m2, abs(h3) + eps)
    v3 = 0.81 * v2 + h3 * h3
    r3 = 0.9 * r2 - hc3 * s2
    s3 = (f * m3 + max(r3, 0.0)) / (math.sqrt(v3) + eps)
    return [s1 / L, s2 / L, s3 / L]


@pytest.mark.parametrize("store_delta", [True, False])
def test_invariant_hand_example_reference(store_delta):
    expected = _invariant_hand(store_delta)
    assert expected[1] > 500 * expected[0] and expected[2] > expected[1]  # the wealth start, then growth
    mech = ref.Mechanic([1.0, 2.0], ref.SGD(0.5), weight_decay=0.0, eps=1e-8, s_init=0.1, num_betas=1,
                        store_delta=store_delta, variant="invariant")
    for g, want in zip(HAND_GRADS, expected):
        mech.step(np.array(g), 0.5)
        assert mech.lr_ref == 0.5
        assert mech.scale == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("store_delta", [True, False])
def test_invariant_hand_example(form, store_delta):
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    run = Runner(form, [p], torch.optim.SGD([p], lr=0.5), weight_decay=0.0, eps=1e-8, s_init=0.1, num_betas=1,
                 store_delta=store_delta, variant="invariant")
    assert run.scale.item() == 0.1  # n * s_init before the first step (lr_ref is not known yet: 1)
    for g, want in zip(HAND_GRADS, _invariant_hand(store_delta)):
        run.step([torch.tensor(g, dtype=torch.float64)])
        assert run.scale.item() == pytest.approx(want, rel=1e-12)
