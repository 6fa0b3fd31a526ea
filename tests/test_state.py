"""state.py: the checkpoint format: the state-dict layout, its format versions and its checks (putting
it into the base optimizer and hiding it from its lazy state initialisation: test_storage.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import manic
from manic.state import DELTA, FORMAT_VERSION, REF, strip_mechanic

F64 = torch.float64


def _param(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_()


def test_strip_mechanic_splits_a_full_state_dict():
    params = [_param(0), _param(1)]
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-2))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    base, mine = strip_mechanic(opt.state_dict())
    assert not any(k.startswith("mechanic_") for g in base["param_groups"] for k in g)
    assert all(not any(k.startswith("mechanic_") for k in st) for st in base["state"].values())
    assert sorted(mine["state"]) == [0, 1] and set(mine["state"][0]) == {REF, DELTA}
    assert mine["tuner"]["mechanic_version"] == FORMAT_VERSION == 5
    # version 2 added the invariant form's unit and the variant; the unit is its base lr
    assert mine["tuner"]["mechanic_variant"] == "invariant"
    assert torch.equal(mine["tuner"]["mechanic_lr_ref"], torch.tensor(1e-2, dtype=F64))


# --------------------------------------------------------------------------- format versions
def _run(form: str, variant: str, steps: int, sd=None, seed: int = 0, start: int = 0):
    """A small AdamW run with a cosine schedule in either form; loads ``sd`` (what this returns:
    the form's state dicts and the parameters) before stepping, if given, and steps from step
    ``start`` on. Returns (params, the state dicts after the steps, scales)."""
    params = [_param(seed), _param(seed + 1)]
    base = torch.optim.AdamW(params, lr=1e-2)
    if form == "dropin":
        opt = manic.mechanize(base, variant=variant)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)
        holder, load = opt, opt.load_state_dict
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, 20)
        updater = manic.Updater(base, sched)
        holder = manic.Mechanic(updater, variant=variant)
        load = holder.load_state_dict
    if sd is not None:
        sd = dict(sd)
        with torch.no_grad():
            for p, q in zip(params, sd.pop("params")):
                p.copy_(q)
        if form == "seed":
            updater.load_state_dict(sd["updater"])
            sd = sd["mechanic"]
        else:
            sched.load_state_dict(sd.pop("sched"))
        load(sd)
    scales = []
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=F64) + 0.3
        if form == "dropin":
            opt.step()
            sched.step()
        else:
            holder.step()
            updater.step()
        scales.append(holder.scale.clone())
    if form == "dropin":
        out = {**opt.state_dict(), "sched": sched.state_dict()}
    else:
        out = {"updater": updater.state_dict(), "mechanic": holder.state_dict()}
    out["params"] = [p.detach().clone() for p in params]
    return params, out, scales


def _as_version1(sd, form):
    """What manic wrote before the invariant form: no mechanic_lr_ref, no mechanic_variant, version 1."""
    sd = copy.deepcopy(sd)
    tuner = sd["param_groups"][0] if form == "dropin" else sd["mechanic"]["tuner"]
    del tuner["mechanic_lr_ref"], tuner["mechanic_variant"], tuner["mechanic_per_group"]
    tuner["mechanic_version"] = 1
    return sd


def _as_version2(sd, form):
    """What manic wrote before per_group: no mechanic_per_group, version 2."""
    sd = copy.deepcopy(sd)
    tuner = sd["param_groups"][0] if form == "dropin" else sd["mechanic"]["tuner"]
    del tuner["mechanic_per_group"]
    tuner["mechanic_version"] = 2
    return sd


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_version2_state_dict_resumes_bitwise_as_one_tuner(form, tmp_path):
    _, mid, _ = _run(form, "invariant", 6)
    full_params, _, full_scales = _run(form, "invariant", 12)
    torch.save(_as_version2(mid, form), tmp_path / "v2.pt")
    params, after, scales = _run(form, "invariant", 6, sd=torch.load(tmp_path / "v2.pt", weights_only=True),
                                 seed=7, start=6)
    assert all(torch.equal(a, b) for a, b in zip(scales, full_scales[6:]))
    assert all(torch.equal(a, b) for a, b in zip(params, full_params))
    tuner = after["param_groups"][0] if form == "dropin" else after["mechanic"]["tuner"]
    assert tuner["mechanic_version"] == FORMAT_VERSION and tuner["mechanic_per_group"] is False


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_version1_state_dict_resumes_the_original_form_bitwise(form, tmp_path):
    _, mid, _ = _run(form, "original", 6)
    tuner = mid["param_groups"][0] if form == "dropin" else mid["mechanic"]["tuner"]
    assert tuner["mechanic_variant"] == "original" and tuner["mechanic_lr_ref"].item() == 1.0
    full_params, _, full_scales = _run(form, "original", 12)
    torch.save(_as_version1(mid, form), tmp_path / "v1.pt")
    old = torch.load(tmp_path / "v1.pt", weights_only=True)
    params, after, scales = _run(form, "original", 6, sd=old, seed=7, start=6)
    assert all(torch.equal(a, b) for a, b in zip(scales, full_scales[6:]))
    assert all(torch.equal(a, b) for a, b in zip(params, full_params))
    # saved again, it is a current state dict of the original form, lr_ref 1
    tuner = after["param_groups"][0] if form == "dropin" else after["mechanic"]["tuner"]
    assert tuner["mechanic_version"] == FORMAT_VERSION and tuner["mechanic_variant"] == "original"
    assert tuner["mechanic_lr_ref"].item() == 1.0 and tuner["mechanic_lr_ref"].dtype == F64


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_version1_state_dict_is_refused_by_the_invariant_form(form):
    _, mid, _ = _run(form, "original", 6)
    old = _as_version1(mid, form)
    params = [_param(0), _param(1)]
    base = torch.optim.AdamW(params, lr=1e-2)
    holder = manic.mechanize(base) if form == "dropin" else manic.Mechanic(manic.Updater(base))
    before = copy.deepcopy(holder.state_dict())
    with pytest.raises(ValueError, match=r"variant='original'.*variant='invariant'.*variant='original'"):
        holder.load_state_dict(old if form == "dropin" else old["mechanic"])
    after = holder.state_dict()
    assert before.keys() == after.keys() and repr(before) == repr(after)  # nothing changed


@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("saved,loading", [("invariant", "original"), ("original", "invariant")])
def test_state_dict_of_one_variant_is_refused_by_the_other(form, saved, loading):
    _, mid, _ = _run(form, saved, 3)
    sd = mid if form == "dropin" else mid["mechanic"]
    sd.pop("params", None), sd.pop("sched", None)
    params = [_param(0), _param(1)]
    base = torch.optim.AdamW(params, lr=1e-2)
    holder = (manic.mechanize(base, variant=loading) if form == "dropin"
              else manic.Mechanic(manic.Updater(base), variant=loading))
    with pytest.raises(ValueError, match=f"variant={saved!r} but this Mechanic has variant={loading!r}"):
        holder.load_state_dict(sd)
