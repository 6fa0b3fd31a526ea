"""state="delta": one persistent buffer (Delta; x_ref = x - S * Delta implied) and one transient copy of
the parameters during the step. It is the store_delta=True update (docs/algorithm.md, "One-buffer form"),
learns where the recompute form ("ref") stalls, and checkpoints and skips like the other modes."""

from __future__ import annotations

import copy
import gc
import re
import weakref

import numpy as np
import pytest
import torch

import manic
import reference as ref
from helpers import BASES, Runner, flat, init_params, rel_err, unflat
from manic import kernels, step
from manic.state import DELTA, FORMAT_VERSION, REF
from test_precision import ORIGINAL, _train
from test_reference import SCHEDULE, VARIANTS, _gradient_source, _hyper


# ------------------------------------------------------------------ the update is the store_delta=True one
def _compare(form, base_name, regime, scheduled, variant, **options):
    """test_reference._compare for state="delta" against the reference's store_delta=True run. Returns the
    worst relative errors of the scale and of Delta, and of x in units of the accumulated rounding: x is
    updated in place, so it carries one rounding per step (like any in-place optimizer) where the
    reference's x_ref + S * Delta carries one in all; with x_np the reference's x, ``x_err`` is the worst of
    ||x - x_np|| / (1e-9 ||x_np - x_0|| + (t + 1) * eps64 * ||x_np||), which is <= 1 when x is within
    1e-9 of the reference's displacement or within the rounding of t + 1 in-place steps."""
    make_torch, make_ref, lr = BASES[base_name]
    params = init_params(0)
    x0 = flat(params)
    hyper = _hyper(variant)
    run = Runner(form, params, make_torch(params, lr), SCHEDULE if scheduled else None, state="delta", **hyper,
                 **options)
    mech = ref.Mechanic(x0, make_ref(lr), store_delta=True, **hyper)
    steps, grad = _gradient_source(regime, x0.size, 0, variant)
    worst_scale = worst_delta = x_err = 0.0
    for t in range(steps):
        mech_g = grad(mech.x, t)
        run.step(unflat(grad(flat(params), t), params))
        mech.step(mech_g, lr * (SCHEDULE(t) if scheduled else 1.0))
        worst_scale = max(worst_scale, abs(run.scale.item() - mech.scale) / mech.scale)
        delta = flat([run.base.state[p]["mechanic_delta"] for p in params])
        worst_delta = max(worst_delta, rel_err(delta, mech.delta))
        bound = 1e-9 * np.linalg.norm(mech.x - x0) + (t + 1) * EPS64 * np.linalg.norm(mech.x)
        x_err = max(x_err, np.linalg.norm(flat(params) - mech.x) / bound)
    return worst_scale, worst_delta, x_err


EPS64 = float(np.finfo(np.float64).eps)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("regime", ["random", "fixed", "closed"])
@pytest.mark.parametrize("base", ["sgd_nesterov", "adamw", "adagrad"])
def test_matches_reference(form, base, regime, variant):
    """float64: the NumPy reference with store_delta=True: the scale and Delta to 1e-9 (measured: 1e-13
    and below), x to 1e-9 of its displacement or within its in-place rounding (measured: <= 2e-15 of
    ||x||, in the original form's small-scale runs where x - x_0 is ~1e-7 and 1e-9 of it is below an ulp)."""
    for scheduled in (False, True):
        worst_scale, worst_delta, x_err = _compare(form, base, regime, scheduled, variant)
        assert worst_scale <= 1e-9 and worst_delta <= 1e-9, (scheduled, worst_scale, worst_delta)
        assert x_err <= 1, (scheduled, x_err)


@pytest.mark.timeout(600)
def test_compiled_kernel_matches_reference(monkeypatch):
    """compile=True (every tensor through the compiled kernel, however small)."""
    monkeypatch.setattr(kernels, "SMALL", 0, raising=False)  # (where compile=True leaves small tensors eager)
    for variant in VARIANTS:
        worst_scale, worst_delta, x_err = _compare("dropin", "adamw", "fixed", True, variant, compile=True)
        assert worst_scale <= 1e-9 and worst_delta <= 1e-9 and x_err <= 1, (variant, worst_scale, worst_delta, x_err)


# ------------------------------------------------------------------ precision: it does not stall
def _worst(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / y for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learns_where_the_recompute_form_stalls(dtype):
    """test_precision's floor (original form, weights of 0.25-1): "ref" stays at s_init, "delta" follows
    "ref+delta" through the scale's growth (40 steps, from 1e-6 to ~3e-2; its x rounds like any in-place
    optimizer's, its direction is exact). Measured over the 40 steps: 1.3e-6 apart in float32, 8.2e-3 in
    bf16 (where "ref+delta" itself is 7.4e-3 from float32)."""
    both, _ = _train(dtype, store_delta=True, steps=40, low=0.25, **ORIGINAL)
    rec, losses = _train(dtype, store_delta=False, steps=40, low=0.25, **ORIGINAL)
    delta, _ = _train(dtype, store_delta=True, steps=40, low=0.25, state="delta", **ORIGINAL)
    assert max(rec) < 1.01e-6 and losses[-1] == losses[0]  # stalled: the parameters never move
    assert max(both) > 1e4 * 1e-6  # grew
    assert _worst(delta, both) <= (1e-5 if dtype == torch.float32 else 2e-2), _worst(delta, both)


def test_learns_in_bf16_where_the_recompute_form_stays_at_the_floor_invariant():
    """The invariant form in bf16: "ref" stays at its floor; "delta" rises with "ref+delta", within 10%
    through the rise (measured 4.8e-2, as far as "ref+delta" in bf16 is from float32 there)."""
    lr, floor = 1e-3, manic.options.DEFAULTS["invariant"]["s_init"] * manic.tuner.FLOOR / 1e-3
    kw = dict(steps=40, low=0.25, lr=lr, variant="invariant")
    both, _ = _train(torch.bfloat16, store_delta=True, **kw)
    rec, _ = _train(torch.bfloat16, store_delta=False, **kw)
    delta, losses = _train(torch.bfloat16, store_delta=True, state="delta", **kw)
    assert max(rec) < 1.01 * floor and max(both) > 1000 * floor and max(delta) > 1000 * floor
    assert _worst(delta[:10], both[:10]) <= 0.1, _worst(delta[:10], both[:10])
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------ memory
def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 6, generator=g).to(next(model.parameters()).dtype)
    opt.zero_grad()
    model(X).float().pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_persistent_buffer_and_the_transient_is_freed(dtype, monkeypatch):
    """Persistent: mechanic_delta only, 1x the parameters' bytes (float32 for bf16 parameters, as Delta
    always is). Transient: the copy of x_t lives in the step's plan and is gone after the step."""
    copies: list[weakref.ref] = []
    prepare = step.prepare

    def spy(*args):
        plan = prepare(*args)
        if plan.update is not None and plan.update.transient is not None:
            copies.extend(weakref.ref(t) for t in plan.update.transient)
        return plan

    monkeypatch.setattr(step, "prepare", spy)
    model = _model(dtype)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2), state="delta")
    params = list(model.parameters())
    for t in range(3):
        _step(model, opt, t)
        gc.collect()
        assert len(copies) == len(params) * (t + 1) and all(c() is None for c in copies), t
        assert opt._engine._plan is None
    mine = [v for st in opt.state.values() for k, v in st.items() if k.startswith("mechanic_")]
    assert all(set(k for k in opt.state[p] if k.startswith("mechanic_")) == {DELTA} for p in params)
    assert all(v.dtype == torch.float32 for v in mine)
    nbytes = sum(v.numel() * v.element_size() for v in mine)
    assert nbytes == sum(p.numel() for p in params) * 4  # 1x the parameters' float32 bytes
    if dtype == torch.float32:
        assert nbytes == sum(p.numel() * p.element_size() for p in params)


# ------------------------------------------------------------------ checkpoints
def _run(steps: int, sd: dict | None = None, start: int = 0, **options):
    model = _model(torch.float64)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2), **options)
    if sd is not None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
    scales = []
    for t in range(start, start + steps):
        _step(model, opt, t)
        scales.append(opt.scale.clone())
    return model, opt, scales


def _checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    full_model, _, full_scales = _run(12, state="delta")
    model, opt, _ = _run(6, state="delta")
    sd = _checkpoint(model, opt)
    group = sd["opt"]["param_groups"][0]
    assert group["mechanic_state"] == "delta" and group["mechanic_version"] == FORMAT_VERSION == 5
    assert all(set(k for k in st if k.startswith("mechanic_")) == {DELTA} for st in sd["opt"]["state"].values())
    torch.save(sd, tmp_path / "sd.pt")
    model2, _, scales = _run(6, torch.load(tmp_path / "sd.pt", weights_only=True), start=6, state="delta")
    assert all(torch.equal(a, b) for a, b in zip(scales, full_scales[6:]))
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), full_model.parameters()))


@pytest.mark.parametrize("saved,mine", [("ref+delta", "delta"), ("delta", "ref+delta"), ("ref", "delta"),
                                        ("delta", "ref")])
def test_a_checkpoint_of_another_state_mode_is_refused(saved, mine):
    model, opt, _ = _run(3, state=saved)
    sd = _checkpoint(model, opt)
    model2, opt2, _ = _run(3, state=mine)
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(ValueError, match=re.escape(f"state='{saved}'") + ".*" + re.escape(f"state='{mine}'")):
        opt2.load_state_dict(sd["opt"])
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))


@pytest.mark.parametrize("store_delta", [True, False])
def test_a_version3_checkpoint_is_its_store_delta_mode(store_delta):
    """Before version 4 there was no state entry: store_delta says the mode ("ref+delta" or "ref")."""
    model, opt, _ = _run(3, store_delta=store_delta)
    sd = _checkpoint(model, opt)
    group = sd["opt"]["param_groups"][0]
    del group["mechanic_state"]
    group["mechanic_version"] = 3
    _, same, _ = _run(0, store_delta=store_delta)
    same.load_state_dict(copy.deepcopy(sd["opt"]))
    assert same._engine.started
    _, other, _ = _run(0, state="delta")
    old = "ref+delta" if store_delta else "ref"
    with pytest.raises(ValueError, match=re.escape(f"state='{old}'")):
        other.load_state_dict(sd["opt"])


# ------------------------------------------------------------------ a non-finite step
@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_nonfinite_gradient_is_a_no_op(form, skip_nonfinite):
    params = init_params(0)
    run = Runner(form, params, torch.optim.AdamW(params, lr=1e-2), state="delta", skip_nonfinite=skip_nonfinite)
    for t in range(3):
        run.step([torch.full_like(p, 0.1 * (t + 1)) for p in params])
    state = run.base.state
    before = [p.detach().clone() for p in params]
    deltas = [state[p][DELTA].clone() for p in params]
    scale = run.scale.clone()
    bad = [torch.full_like(p, 0.1) for p in params]
    bad[1][0] = float("nan")
    run.step(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(a, state[p][DELTA]) for a, p in zip(deltas, params))
    stats = run.opt.stats() if form == "dropin" else run.mechanic.stats()
    assert int(stats["skipped_steps"]) == 1 and int(stats["step"]) == 3 and torch.equal(run.scale, scale)


# ------------------------------------------------------------------ options
def test_state_option_and_its_older_spelling():
    assert manic.Options().hyper.state == "ref+delta"
    assert manic.Options(store_delta=False).hyper.state == "ref"
    assert manic.Options(state="ref").hyper == manic.Options(store_delta=False).hyper
    h = manic.Options(state="delta").hyper
    assert (h.state, h.store_delta) == ("delta", True)
    with pytest.raises(ValueError, match=r"store_delta=False.*state='delta'"):
        manic.Options(store_delta=False, state="delta")
    with pytest.raises(ValueError, match=r"store_delta=False.*state='ref\+delta'"):
        manic.Options(store_delta=False, state="ref+delta")
    with pytest.raises(ValueError, match=r"state.*'ref\+delta', 'ref', 'delta'"):
        manic.Options(state="x_ref")
    with pytest.raises(ValueError, match="fp32_reference"):
        manic.Options(state="delta", fp32_reference=True)
    p = torch.zeros(3, requires_grad=True)
    assert "state='delta'" in repr(manic.mechanize(torch.optim.SGD([p], lr=0.1), state="delta"))
    assert REF not in manic.mechanize(torch.optim.SGD([p], lr=0.1), state="delta").hyper.mode.new_buffers(p, False)


# ------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("ok", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rebase_delta_kernel(dtype, ok):
    """Both implementations (the fusable one uncompiled) against float64 arithmetic: x = x_t + (S_new -
    S_old) * Delta_t + S_new * u, Delta = Delta_t + u, u = x_after - x_t; with ok False, x = x_t and Delta
    stays. Contiguous and transposed (non-contiguous) tensors; Delta float32 for bf16."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    x_t = [torch.randn(5, 3, generator=gen).to(dtype), torch.randn(4, 6, generator=gen).to(dtype).t()]
    x_after = [(x + 0.01 * torch.randn(x.shape, generator=gen)).to(dtype) for x in x_t]
    ds = [torch.randn(x.shape, generator=gen).to(wide) for x in x_t]
    # (a non-finite step keeps the tuner: S_new = S_old)
    S_old, S_new, okt = torch.tensor(0.3, dtype=wide), torch.tensor(0.45 if ok else 0.3, dtype=wide), torch.tensor(ok)
    if not ok:
        x_after[0][0, 0] = float("nan")
    for fn in (kernels.rebase_delta_eager, kernels.rebase_delta_fusable):
        xs, prevs, d_out = [x.clone() for x in x_after], [x.clone() for x in x_t], [d.clone() for d in ds]
        fn(xs, prevs, d_out, S_old, S_new, okt)
        for x, xt, xa, d0, d in zip(xs, x_t, x_after, ds, d_out):
            if not ok:
                assert torch.equal(x, xt) and torch.equal(d, d0)
                continue
            u = xa.double() - xt.double()
            want = xt.double() + (S_new - S_old).double() * d0.double() + S_new.double() * u
            atol = 1e-6 if wide == torch.float32 else 1e-15
            torch.testing.assert_close(d.double(), d0.double() + u, rtol=0, atol=atol)
            torch.testing.assert_close(x.double(), want, rtol=torch.finfo(dtype).eps, atol=atol)
