"""Precision: float32 and bf16 models start learning in the default mode; the recompute
mode's precision floor (docs/options.md#precision) is real; fp32/fp64/bf16 all train."""

from __future__ import annotations

import pytest
import torch

import manic


def _model(dtype: torch.dtype, seed: int = 0, low: float = 0.02) -> torch.nn.Module:
    """An MLP whose every weight has magnitude low-1 (no zero-initialised parameter)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty_like(p).uniform_(low, 1.0) * torch.randint(0, 2, p.shape).mul(2).sub(1))
    return model.to(dtype)


def _train(dtype, store_delta, steps, lr=1e-3, low=0.02, **options):
    model = _model(dtype, low=low)
    mags = torch.cat([p.detach().abs().float().reshape(-1) for p in model.parameters()])
    assert mags.min() >= low * 0.99 and mags.max() <= 1.0
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=lr), store_delta=store_delta, **options)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(128, 8, generator=g).to(dtype)
    y = (X[:, :1] - 0.5 * X[:, 1:2]).sin()
    scales, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
        scales.append(opt.scale.item())
        losses.append(loss.item())
    return scales, losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_mode_starts_learning(dtype):
    scales, _ = _train(dtype, store_delta=True, steps=40)
    first = next(i for i, s in enumerate(scales) if s > 10 * 1e-6)
    assert first < 40, "the scale never left s_init"


ORIGINAL = {"variant": "original", "s_init": 1e-6, "weight_decay": 1e-2}  # optax's values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_mode_precision_floor(dtype):
    """store_delta=False reads the direction back from the rounded parameters: in the original form
    the first displacements (~s_init * lr = 1e-9) are below half an ulp of weights of 0.25-1 in
    float32 (and of nearly any weight in bf16), so they vanish and the scale stays at s_init."""
    scales, _ = _train(dtype, store_delta=False, steps=40, low=0.25, **ORIGINAL)
    assert max(scales) < 1.01e-6


def test_recompute_mode_precision_floor_invariant():
    """The invariant form's first displacement is its floor, an effective lr of s_init * 1e-3, times
    the normalized update (~1 for AdamW): about 1e-6 for the default start, above half an ulp of
    float32 weights of 0.25-1 (3e-8 to 6e-8), so float32 learns; in bf16 (half an ulp of 1e-3 and
    more) it vanishes, h stays 0, the start is never paid in, and the effective lr stays at the floor."""
    lr, s_init = 1e-3, manic.options.DEFAULTS["invariant"]["s_init"]
    floor = s_init * manic.tuner.FLOOR / lr  # S = S' / lr_ref
    scales, _ = _train(torch.float32, store_delta=False, steps=40, low=0.25, lr=lr, variant="invariant")
    assert scales[0] == pytest.approx(floor, rel=1e-6) and max(scales) * lr > 2 * s_init  # past its start
    scales, _ = _train(torch.bfloat16, store_delta=False, steps=40, low=0.25, lr=lr, variant="invariant")
    assert max(scales) < 1.01 * floor and min(scales[1:]) > 0.99 * floor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_mode_starts_learning_with_large_weights(dtype):
    scales, _ = _train(dtype, store_delta=True, steps=40, low=0.25)
    assert max(scales) > 10 * 1e-6


def test_recompute_mode_fine_in_float64():
    scales, _ = _train(torch.float64, store_delta=False, steps=40)
    assert max(scales) > 10 * 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_trains_in_each_dtype(dtype):
    scales, losses = _train(dtype, store_delta=True, steps=150, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(scales)))
    assert losses[-1] < 0.5 * losses[0]


def _losses_scales(dtype, steps, **options):
    options = {**ORIGINAL, **options}
    model = _model(dtype)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3), **options)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(128, 8, generator=g).to(dtype)
    y = (X[:, :1] - 0.5 * X[:, 1:2]).sin().float()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X).float(), y)
        loss.backward()
        opt.step()
        out.append((loss.item(), opt.scale.item()))
    return out, opt


@pytest.mark.parametrize("fp32_reference", [False, True])
def test_bf16_trajectory_close_to_float32(fp32_reference):
    """How close bf16 stays to float32 in the original form (docs/options.md, Precision): the scale tracks float32's within 2%
    through its growth (first 50 steps, from 1e-6 to ~0.5); afterwards bf16's own rounding in the
    forward and backward dominates (plain AdamW in bf16 ends 2-4x above float32 on this task), and
    the final loss stays within 4x of float32's."""
    fp32, _ = _losses_scales(torch.float32, 200)
    bf16, opt = _losses_scales(torch.bfloat16, 200, fp32_reference=fp32_reference)
    for t in range(50):
        assert abs(bf16[t][1] - fp32[t][1]) <= 0.02 * fp32[t][1], t
    assert fp32[49][1] > 0.1  # the growth phase really happened
    assert bf16[-1][0] <= 4 * fp32[-1][0] and bf16[-1][0] < 0.25 * bf16[0][0]
    ref = next(iter(opt.state.values()))["mechanic_ref"]
    assert ref.dtype == (torch.float32 if fp32_reference else torch.bfloat16)


@pytest.mark.parametrize("fp32_reference", [False, True])
def test_bf16_trajectory_invariant(fp32_reference):
    """The same in the invariant form (its defaults): the scale tracks float32's within 10% through its
    rise (the first 10 steps, from an effective lr of 1e-6 to ~4e-3), and bf16 trains; afterwards it
    separates further than in the original form (at this effective lr, ~1e-2 by the end, bf16's
    rounding costs more: the final loss is ~30-40x float32's, measured)."""
    fp32, _ = _losses_scales(torch.float32, 200, variant="invariant", s_init=None, weight_decay=None)
    bf16, _ = _losses_scales(torch.bfloat16, 200, variant="invariant", s_init=None, weight_decay=None,
                             fp32_reference=fp32_reference)
    for t in range(10):
        assert abs(bf16[t][1] - fp32[t][1]) <= 0.1 * fp32[t][1], t
    assert fp32[9][1] > 100 * fp32[0][1]  # the rise really happened
    assert all(torch.isfinite(torch.tensor([s for _, s in bf16])))
    assert bf16[-1][0] < 0.25 * bf16[0][0]


def test_bf16_base_lr_rule():
    """docs/options.md's rule for 16-bit parameters: the base step's update is rounded to bf16 before
    Mechanic multiplies it by S, so a base lr far below the effective lr (S ~ 10) costs bf16 much more
    than one near it (S ~ 1). The numbers the docs quote are these runs' final losses."""
    def final(dtype, lr):
        model = _model(dtype)
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=lr))
        g = torch.Generator().manual_seed(1)
        X = torch.randn(128, 8, generator=g).to(dtype)
        y = (X[:, :1] - 0.5 * X[:, 1:2]).sin().float()
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X).float(), y)
            loss.backward()
            opt.step()
        return loss.item(), opt.scale.item()

    (f_small, s_small), (b_small, _) = final(torch.float32, 1e-3), final(torch.bfloat16, 1e-3)
    (f_near, s_near), (b_near, _) = final(torch.float32, 1e-2), final(torch.bfloat16, 1e-2)
    assert s_small > 5 and 0.5 < s_near < 2  # S about 10 and about 1
    assert b_near <= 4 * f_near  # near S = 1, bf16 costs what it costs plain AdamW (2-3x)
    assert b_small > 10 * f_small  # at S about 10 the rounding of u is multiplied by S
