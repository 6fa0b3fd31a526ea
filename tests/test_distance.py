"""distance.py, ``distance_floor=True`` (docs/algorithm.md, "The distance floor"): against an independent float64
NumPy reference in every state mode and per group, against benchmarks/candidates.py's prototype, on 2 gloo ranks,
in one collective with no host sync, through a checkpoint, on a non-finite step, under the DeepSpeed partitions
path, and what the constructor and the checkpoint checks refuse."""

from __future__ import annotations

import copy
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import manic
import reference as ref
from manic.testing import Count
from nets import MLP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))
STEPS, LR, F64 = 30, 1e-2, torch.float64
ACC = "mechanic_dist_acc"


def factor(t: int, steps: int = STEPS, warmup: int = 3) -> float:
    """Linear warmup over ``warmup`` steps, then cosine to 0 (the suite's schedule)."""
    return (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))


def net(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().double()


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(32, 8, generator=g, dtype=F64)
    return X, torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], dim=1)


def param_groups(model: nn.Module, two: bool) -> list[dict[str, Any]]:
    """One group, or fc1 and fc2 at LR and fc3 and the gain at LR / 4."""
    params = list(model.parameters())
    return [{"params": params[:4]}, {"params": params[4:], "lr": LR / 4}] if two else [{"params": params}]


def grad_at(model: nn.Module, x: np.ndarray | None = None) -> np.ndarray:
    """The full-batch gradient of the model (at the flat parameters ``x``, if given)."""
    if x is not None:
        torch.nn.utils.vector_to_parameters(torch.tensor(x), model.parameters())
    model.zero_grad()
    X, y = data()
    torch.nn.functional.mse_loss(model(X), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()


def flat(ts: list[Tensor]) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in ts]).numpy().copy()


def dist_state(opt: torch.optim.Optimizer, params: list[Tensor]) -> tuple[Tensor, Tensor, np.ndarray]:
    """(N, the floor, A flat) of a mechanized optimizer."""
    g = opt.param_groups[0]
    return g["mechanic_dist_num"].clone(), g["mechanic_dist_floor"].clone(), flat([opt.state[p][ACC] for p in params])


# ----------------------------------------------------------------------------- the NumPy reference
class Reference:
    """docs/algorithm.md's invariant form with the distance floor, written from the specification over one
    flat float64 vector. ``groups``: per param group its slice and base lr; one tuner over all of them, or
    one per group; ``recompute``: state="ref" (D = (x - x_ref) / (S + eps)), else the stored direction Delta.
    The base optimizer is reference.py's AdamW (weight decay 1e-2), one per group."""

    def __init__(self, x: np.ndarray, groups: list[tuple[slice, float]], per_group: bool, recompute: bool,
                 lam: float = 4.0, s_init: float = 1e-3, n: int = 6, eps: float = 1e-8) -> None:
        self.x, self.x_ref, self.delta, self.A = x.copy(), x.copy(), np.zeros_like(x), np.zeros_like(x)
        self.groups, self.recompute, self.lam, self.s_init, self.n, self.eps = groups, recompute, lam, s_init, n, eps
        self.bases = [ref.AdamW(lr) for _, lr in groups]
        members = [[i] for i in range(len(groups))] if per_group else [list(range(len(groups)))]
        self.tuners = []
        for m in members:
            idx = np.concatenate([np.arange(len(x))[groups[i][0]] for i in m])
            self.tuners.append({"groups": m, "idx": idx, "L": max(groups[i][1] for i in m), "r": np.zeros(n),
                                "m": np.zeros(n), "v": np.zeros(n), "s": np.full(n, s_init), "N": 0.0, "floor": 0.0})
        self.beta = np.array([1 - 10.0 ** -(i + 1) for i in range(n)])
        self.bound = 0  # steps at which the floor raised the bet

    def scales(self) -> list[float]:
        return [T["s"].sum() / T["L"] for T in self.tuners]

    def step(self, g: np.ndarray, f: float) -> None:
        eps, x = self.eps, self.x
        S_old = [T["s"].sum() for T in self.tuners]
        for T, S in zip(self.tuners, S_old):
            i, L = T["idx"], T["L"]
            gi, xi, disp = g[i], x[i], x[i] - self.x_ref[i]
            D = disp / (S + eps) if self.recompute else self.delta[i] / L
            h = (gi + self.lam * S * np.linalg.norm(gi) / (np.linalg.norm(xi) + eps) * xi) @ D
            if h != 0 and not T["v"].any():
                T["r"] = np.full(self.n, self.s_init / self.n * abs(h))
            hc = np.clip(h, -T["m"], T["m"])
            T["m"] = np.maximum(self.beta * T["m"], abs(h) + eps)
            T["v"] = self.beta ** 2 * T["v"] + h * h
            T["r"] = self.beta * T["r"] - hc * T["s"]
            s = (self.s_init * 1e-3 / self.n * T["m"] + np.maximum(T["r"], 0)) / (np.sqrt(T["v"]) + eps)
            # the floor: w = S' lr_t / lr_ref, N += w <g, x_ref - x>, A += w g, floor = max(floor, N / |A|_1)
            w = S * max(self.groups[k][1] * f for k in T["groups"]) / L
            toward = -(gi @ disp) if self.recompute else -S / L * (gi @ self.delta[i])  # x - x_ref = S/L Delta
            T["N"] += w * toward
            self.A[i] += w * gi
            l1 = np.abs(self.A[i]).sum()
            if l1 > 0:
                T["floor"] = max(T["floor"], T["N"] / l1)
            if s.sum() < T["floor"]:
                s = s * (T["floor"] / s.sum())
                self.bound += 1
            T["s"] = s
        u = np.zeros_like(x)
        for (sl, lr), base in zip(self.groups, self.bases):
            u[sl] = base.update(x[sl], g[sl], lr * f)
        new = x.copy()
        for T, S in zip(self.tuners, S_old):
            i, L, S_new = T["idx"], T["L"], T["s"].sum()
            if self.recompute:
                new[i] = self.x_ref[i] + S_new * (x[i] - self.x_ref[i]) / (S + eps) + S_new / L * u[i]
            else:
                self.delta[i] += u[i]
                new[i] = self.x_ref[i] + S_new / L * self.delta[i]
        self.x = new


def slices(model: nn.Module, two: bool) -> list[tuple[slice, float]]:
    sizes = [p.numel() for p in model.parameters()]
    if not two:
        return [(slice(0, sum(sizes)), LR)]
    k = sum(sizes[:4])
    return [(slice(0, k), LR), (slice(k, sum(sizes)), LR / 4)]


def run(steps: int = STEPS, two: bool = False, sched: bool = True, **options: Any) -> tuple[nn.Module, torch.optim.Optimizer, list[Tensor], Any]:
    """``steps`` full-batch steps of the float64 MLP under mechanize(AdamW) with the distance floor on (unless
    ``options`` say otherwise) and the warmup + cosine schedule; returns the model, the optimizer, the scale
    after each step and the scheduler."""
    model = net()
    opt = manic.mechanize(torch.optim.AdamW(param_groups(model, two), lr=LR), **{"distance_floor": True, **options})
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if sched else None
    X, y = data()
    scales = []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
        scales.append(opt.scale.clone())
    return model, opt, scales, lr_sched


CASES = {"ref+delta": ({"state": "ref+delta"}, False), "ref": ({"state": "ref"}, False),
         "delta": ({"state": "delta"}, False), "per_group": ({"per_group": True}, True),
         "one_tuner_two_lrs": ({}, True)}


# ----------------------------------------------------------------------------- (a) the reference
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_numpy_reference(case):
    """30 steps of AdamW under warmup + cosine, closed loop (each side takes its gradient at its own x): the
    scale after every step, the parameters, N, the floor and A agree to 1e-10 with the floor raising the bet
    at most steps."""
    options, two = CASES[case]
    model, opt, scales, _ = run(two=two, **options)
    grads = net()
    r = Reference(flat(list(net().parameters())), slices(grads, two), bool(options.get("per_group")),
                  options.get("state") == "ref")
    want = []
    for t in range(STEPS):
        r.step(grad_at(grads, r.x), factor(t))
        want.append(r.scales())
    got = np.array([s.reshape(-1).tolist() for s in scales])
    assert np.max(np.abs(got - want) / np.abs(want)) <= 1e-10
    assert np.max(np.abs(flat(list(model.parameters())) - r.x)) <= 1e-10 * np.abs(r.x).max()
    N, floor, A = dist_state(opt, list(model.parameters()))
    np.testing.assert_allclose(N.reshape(-1).numpy(), [T["N"] for T in r.tuners], rtol=1e-10)
    np.testing.assert_allclose(floor.reshape(-1).numpy(), [T["floor"] for T in r.tuners], rtol=1e-10)
    np.testing.assert_allclose(A, r.A, rtol=1e-10, atol=1e-12 * np.abs(r.A).max())
    assert r.bound >= STEPS // 2 * len(r.tuners), r.bound  # the floor is what sets the scale here


def test_maximize_is_minimize_of_the_negated_loss():
    """A maximised group's gradient counts as -g in A as in <g, D>: maximising -loss is minimising loss."""
    runs = []
    for maximize in (False, True):
        model = net()
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=LR, maximize=maximize), distance_floor=True)
        X, y = data()
        for _ in range(15):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), y)
            (-loss if maximize else loss).backward()
            opt.step()
        runs.append((opt.scale.clone(), *dist_state(opt, list(model.parameters()))))
    (s0, n0, f0, a0), (s1, n1, f1, a1) = runs
    assert torch.equal(s0, s1) and torch.equal(n0, n1) and torch.equal(f0, f1) and np.array_equal(a0, a1)
    assert f0 > 0


# ----------------------------------------------------------------------------- (b) the prototype
def test_matches_the_candidates_prototype():
    """benchmarks/candidates.py's Candidate(kind="distance") (AdamW weight decay 0.01, base lr 1e-2, s_init 1e-3,
    Mechanic's weight_decay 4, 6 betas: manic's defaults) and mechanize(AdamW, distance_floor=True) on the same
    float64 model and schedule: the applied scale, N and the floor after every step, and the parameters, to
    1e-12; the floor changes the run (the prototype's kind="base" ends elsewhere)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from candidates import Candidate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def go(make: Any) -> tuple[list[tuple[float, float, float]], list[Tensor]]:
        model = net()
        opt = make(list(model.parameters()))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        X, y = data()
        out = []
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), y).backward()
            opt.step()
            sched.step()
            g = opt.param_groups[0]
            if isinstance(opt, Candidate):
                out.append((g["d"], opt.num, opt.floor))
            else:
                out.append((opt.scale.item(), g["mechanic_dist_num"].item(), g["mechanic_dist_floor"].item()))
        return out, [p.detach().clone() for p in model.parameters()]

    theirs, p_theirs = go(lambda p: Candidate(p, kind="distance", base_lr=LR, num_betas=6, s_init=1e-3,
                                              weight_decay=4.0))
    ours, p_ours = go(lambda p: manic.mechanize(torch.optim.AdamW(p, lr=LR, weight_decay=0.01), distance_floor=True))
    h = manic.Options().hyper
    assert (h.s_init, h.weight_decay, h.num_betas, h.eps) == (1e-3, 4.0, 6, 1e-8)  # the prototype's values
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-12, atol=0)
    for a, b in zip(p_ours, p_theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    base, _ = go(lambda p: Candidate(p, kind="base", base_lr=LR, num_betas=6, s_init=1e-3, weight_decay=4.0))
    assert abs(base[-1][0] / theirs[-1][0] - 1) > 0.1


# ----------------------------------------------------------------------------- (c) two gloo ranks
def sharded_forms(rank: int, world: int) -> dict:
    """What each rank runs: scenarios.py's FSDP2 (every state mode, per_group), TP (a Replicate DTensor bias and
    plain replicated tensors, each counted on one rank) and DDP with the floor on, each checked against the
    single-process run (1e-10; 1e-9 per group), with its collectives and host syncs counted."""
    import scenarios

    on = {"distance_floor": True}
    out = {"fsdp2": scenarios.fsdp2(rank, world, **on), "fsdp2_ref": scenarios.fsdp2(rank, world, state="ref", **on),
           "fsdp2_delta": scenarios.fsdp2(rank, world, state="delta", **on),
           "fsdp2_per_group": scenarios.fsdp2(rank, world, per_group=True, **on),
           "tp": scenarios.tp(rank, world, **on), "ddp": scenarios.ddp(rank, world, **on)}
    # the floor itself is bitwise the same on every rank and the single-process run's
    _, opt = scenarios.check_form("fsdp2_floor", scenarios.shard2(scenarios.make_net()), 1, **on)
    model = scenarios.make_net()
    single = manic.mechanize(scenarios.base(model.parameters()), **on)
    scenarios.train(model, single, scenarios.STEPS)
    mine = torch.stack([opt.param_groups[0]["mechanic_dist_floor"], opt.param_groups[0]["mechanic_dist_num"]])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    want = torch.stack([single.param_groups[0]["mechanic_dist_floor"], single.param_groups[0]["mechanic_dist_num"]])
    out["floor"] = {"same_on_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
                    "rel": float(((mine - want).abs() / want.abs()).max()), "floor": float(mine[0])}
    return out


@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_one_process():
    import harness
    import scenarios

    results = harness.run(2, sharded_forms, timeout=280)
    for form in ("fsdp2", "fsdp2_ref", "fsdp2_delta", "fsdp2_per_group", "tp", "ddp"):
        tol = 1e-9 if "per_group" in form else 1e-10
        r = results[0][form]
        assert r["params_rel"] <= tol and r["scale_rel"] <= tol, (form, r)
    floor = results[0]["floor"]
    assert floor["same_on_ranks"] and floor["rel"] <= 1e-10 and floor["floor"] > 0, floor
    # A is sharded like Delta: over both ranks, three float64 copies of the model (x_ref, Delta, A)
    total = 8 * sum(p.numel() for p in scenarios.make_net().parameters())
    assert sum(r["fsdp2"]["state_bytes"] for r in results) == 3 * total
    assert sum(r["fsdp2_delta"]["state_bytes"] for r in results) == 2 * total


# ----------------------------------------------------------------------------- (d) one collective, no sync
class Counting(manic.NoReduce):
    """A single-process reducer that records the shape of what it is asked to reduce."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        self.calls.append(tuple(tensor.shape))
        return tensor


@pytest.mark.parametrize("case", ["ref+delta", "ref", "delta", "per_group"])
def test_one_collective_of_five_sums_per_tuner_and_no_host_sync(case):
    options, two = CASES[case]
    for on in (False, True):
        reducer = Counting()
        model = net()
        opt = manic.mechanize(torch.optim.AdamW(param_groups(model, two), lr=LR, fused=True), reducer=reducer,
                              distance_floor=on, **options)
        X, y = data()
        syncs = []
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), y).backward()
            with Count() as c:
                opt.step()
            syncs.append(c.syncs)
        lead = (2,) if two else ()
        assert reducer.calls == [(*lead, 5 if on else 4)] * 6  # the fifth sum only with the floor on
        assert syncs == [0] * 6


@pytest.mark.timeout(600)
def test_compile_true_follows_the_eager_step(monkeypatch):
    """compile=True with every tensor through the compiled kernels (SMALL = 0): the pass over A stays eager,
    and the run is the eager one to 1e-12 (scales, N, the floor)."""
    from manic import kernels

    monkeypatch.setattr(kernels, "SMALL", 0)
    runs = [run(15, compile=c)[1:3] for c in (False, True)]
    (eager, s_eager), (comp, s_comp) = runs
    assert comp._engine.kernels is kernels.compiled()
    torch.testing.assert_close(torch.stack(s_comp), torch.stack(s_eager), rtol=1e-12, atol=0)
    for k in ("mechanic_dist_num", "mechanic_dist_floor"):
        torch.testing.assert_close(comp.param_groups[0][k], eager.param_groups[0][k], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- (e) checkpoints
@pytest.mark.parametrize("case", ["ref+delta", "ref", "delta", "per_group"])
def test_state_dict_round_trip_mid_run_continues_bitwise(case):
    """Saved after 12 of 24 steps (optimizer and scheduler, through torch.save), loaded into a fresh model and
    optimizer: the next 12 steps, N, the floor and A are bitwise the uninterrupted run's."""
    options, two = CASES[case]
    whole_model, whole, whole_scales, _ = run(24, two=two, **options)
    model, opt, _, sched = run(12, two=two, **options)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert any(ACC in entry for entry in saved["opt"]["state"].values())
    model2 = net(seed=3)
    model2.load_state_dict(saved["model"])
    opt2 = manic.mechanize(torch.optim.AdamW(param_groups(model2, two), lr=LR), distance_floor=True, **options)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, factor)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    X, y = data()
    scales = []
    for _ in range(12):
        opt2.zero_grad()
        torch.nn.functional.mse_loss(model2(X), y).backward()
        opt2.step()
        sched2.step()
        scales.append(opt2.scale.clone())
    assert all(torch.equal(a, b) for a, b in zip(scales, whole_scales[12:]))
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), whole_model.parameters()))
    n2, f2, a2 = dist_state(opt2, list(model2.parameters()))
    n1, f1, a1 = dist_state(whole, list(whole_model.parameters()))
    assert torch.equal(n2, n1) and torch.equal(f2, f1) and np.array_equal(a2, a1)


def _mechanized(distance_floor: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt, _, _ = run(3, distance_floor=distance_floor)
    return model, opt


@pytest.mark.parametrize("saved_on", [True, False])
def test_a_checkpoint_resumes_only_with_the_same_setting(saved_on):
    """Into a Mechanic with the other setting, the load raises before anything changes, naming the argument
    and the fix; through the base optimizer too."""
    _, src = _mechanized(saved_on)
    sd = copy.deepcopy(src.state_dict())
    model, dst = _mechanized(not saved_on)
    before = [p.detach().clone() for p in model.parameters()], dst.scale.clone()
    for load in (dst.load_state_dict, dst.base_optimizer.load_state_dict):
        with pytest.raises(ValueError, match=f"distance_floor={saved_on}.*build it with distance_floor={saved_on}"):
            load(copy.deepcopy(sd))
    assert torch.equal(dst.scale, before[1])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[0]))


def test_an_older_checkpoint_is_one_without_the_floor():
    """A version-4 state dict (before the option existed) loads with the floor off and is refused with it on."""
    _, src = _mechanized(False)
    sd = copy.deepcopy(src.state_dict())
    group = sd["param_groups"][0]
    del group["mechanic_distance_floor"]
    group["mechanic_version"] = 4
    _, off = _mechanized(False)
    off.load_state_dict(copy.deepcopy(sd))
    assert off.param_groups[0]["mechanic_version"] == 5 and off.param_groups[0]["mechanic_distance_floor"] is False
    _, on = _mechanized(True)
    with pytest.raises(ValueError, match="Checkpoint has distance_floor=False"):
        on.load_state_dict(sd)


def test_a_checkpoint_missing_its_accumulator_is_refused():
    _, src = _mechanized(True)
    sd = copy.deepcopy(src.state_dict())
    del sd["state"][0][ACC]
    _, dst = _mechanized(True)
    with pytest.raises(ValueError, match=r"parameter 0 has Mechanic buffers .*expected .*mechanic_dist_acc"):
        dst.load_state_dict(sd)
    sd = copy.deepcopy(src.state_dict())
    sd["param_groups"][0]["mechanic_dist_floor"] = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="mechanic_dist_floor should be a tensor of shape"):
        dst.load_state_dict(sd)


# ----------------------------------------------------------------------------- (f) non-finite steps
@pytest.mark.parametrize("how", ["nan_grad", "inf_accumulator", "nan_grad_skip_base"])
def test_a_nonfinite_step_leaves_the_floor_state_unchanged(how):
    """A NaN gradient, or an A whose L1 norm is infinite (the fifth sum), skips the step: N, the floor, A and s
    are as they were (and the parameters), skipped grows by one. With skip_nonfinite (the base optimizer's
    state untouched too) the next finite step goes on from there."""
    model, opt, _, _ = run(6, sched=False, skip_nonfinite=how == "nan_grad_skip_base")
    params = list(model.parameters())
    if how == "inf_accumulator":
        opt.state[params[2]][ACC].view(-1)[0] = math.inf
    n0, f0, a0 = dist_state(opt, params)
    s0, x0 = opt.param_groups[0]["mechanic_s"].clone(), flat(params)
    X, y = data()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X), y).backward()
    if how != "inf_accumulator":
        params[1].grad[0] = math.nan
    opt.step()
    n1, f1, a1 = dist_state(opt, params)
    assert torch.equal(n0, n1) and torch.equal(f0, f1) and np.array_equal(a0, a1)
    assert torch.equal(opt.param_groups[0]["mechanic_s"], s0)
    assert opt.stats()["skipped_steps"].item() == 1 and opt.stats()["step"].item() == 6
    np.testing.assert_array_equal(flat(params), x0)
    if how != "nan_grad_skip_base":  # (otherwise AdamW's state took the NaN: later steps are not finite)
        return
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X), y).backward()
    opt.step()
    n2, f2, a2 = dist_state(opt, params)
    assert opt.stats()["step"].item() == 7 and not np.array_equal(a2, a1) and not torch.equal(n2, n1)


# ----------------------------------------------------------------------------- DeepSpeed's partitions


@pytest.mark.parametrize("kind", ["zero12", "zero3"])
@pytest.mark.parametrize("options", [{}, {"state": "ref"}, {"state": "delta"}, {"per_group": True}],
                         ids=["ref+delta", "ref", "delta", "per_group"])
def test_partitions_follow_the_ordinary_step(one_rank, kind, options):
    """Under the DeepSpeed ZeRO stand-ins of test_partitions.py (two or four parts stepped one at a time), with
    the floor on: the scales, N and the floor of the ordinary step (1e-12), its parameters (1e-10 elementwise),
    one reduction of five sums per tuner, no host sync."""
    import test_partitions as tp

    calls: list = []

    class Recording(manic.NoReduce):
        def all_reduce_sum(self, tensor: Tensor) -> Tensor:
            calls.append(tuple(tensor.shape))
            return tensor

    on = {"distance_floor": True, **options}
    ref_run, got = tp.run("plain", **on), tp.run(kind, reducer=Recording(), **on)
    assert tp.rel(got["scales"], ref_run["scales"]) <= 1e-12
    for p, q in zip(got["params"], ref_run["params"]):  # (elementwise; the L1 norm is summed in another order)
        assert tp.rel(p, q) <= 1e-10
    for k in ("mechanic_dist_num", "mechanic_dist_floor"):
        assert tp.rel(got["opt"].param_groups[0][k], ref_run["opt"].param_groups[0][k]) <= 1e-12
    assert (ref_run["opt"].param_groups[0]["mechanic_dist_floor"] > 0).all()
    assert calls == [(2, 5) if options.get("per_group") else (5,)] * tp.STEPS
    assert got["syncs"] == [0] * tp.STEPS


# ----------------------------------------------------------------------------- (g) the constructor
def test_the_constructor_refuses_what_it_cannot_do():
    params = [torch.zeros(3, requires_grad=True)]
    for make in (lambda: manic.Options(variant="original", distance_floor=True),
                 lambda: manic.mechanize(torch.optim.SGD(params, lr=0.1), variant="original", distance_floor=True)):
        with pytest.raises(ValueError, match=r"distance_floor=True with variant='original'.*variant='invariant'"):
            make()
    with pytest.raises(TypeError, match="Invalid distance_floor: 'yes'"):
        manic.Options(distance_floor="yes")
    assert manic.Options(variant="original", distance_floor=False).hyper.distance_floor is False
    assert manic.Options().hyper.distance_floor is False and manic.Options(distance_floor=True).hyper.distance_floor
    # off, no buffer and no tuner entries; on, both
    for on in (False, True):
        _, opt = _mechanized(on)
        assert (ACC in opt.state[next(iter(opt.state))]) is on
        assert ("mechanic_dist_floor" in opt.param_groups[0]) is on
