"""Stateful property tests (hypothesis.stateful, issue 28 item 3): random sequences of what users do to a
mechanized optimizer, checked after every operation.

The subject: ``manic.mechanize(torch.optim.SGD(momentum=0.9))`` over four small parameters in two param
groups (a (3,), b (3,), c (2, 2) | d (3,): same shapes within and across groups, so reorders pass any
shape check) with an ``ExponentialLR`` scheduler attached; float64, or float32 with ``model.double()``
as a rule. Drawn once per run: the dtype, ``variant`` and ``skip_nonfinite``; parametrized: ``per_group``
and the state mode (``"ref+delta"``, ``"delta"``, ``"ref"``).

The rules (one per operation): step (fresh deterministic gradients, some of them None), zero_grad,
freeze / unfreeze, add_param_group, reorder within a group, swap two same-shape parameters across
groups, insert a group at index 0, replace a parameter by a never-seen same-shape tensor (late binding),
the same parameter twice, state_dict round trip into the same optimizer and into a fresh one, deepcopy,
pickle / torch.save, model.double(), lr 0 / 1e-30 / 1e20, one step at lr nan / inf, state.clear() /
del state[p].

After every operation either the operation raised where the issue says it must (the same parameter
twice: ValueError "more than once"; per_group and a new group after the start: "per_group") and nothing
changed (parameters, scale, every state tensor, the param groups), or:
- for every parameter under Mechanic, its reference is the one it got when it came under Mechanic
  (identity first: reorders carry buffers, a never-seen tensor takes over its position's), bitwise;
  ``x == x_ref + S_g * Delta`` to a few ulps ("ref+delta"; "delta": ``x - S_g * Delta`` is that reference);
  every parameter is finite (with "ref", Delta is implied by x);
  a parameter that just joined has ``x_ref == x`` and ``Delta == 0``; every buffer is finite, in the
  parameter's dtype, present in ``state_dict()`` and in ``opt.state`` after it (also after
  ``state.clear()``); frozen parameters have none and never move;
- an operation that is not a step changed no parameter, no buffer of a parameter that stays under
  Mechanic and no tuner entry;
- the scale is finite and > 0;
- a save / load round trip into a freshly built optimizer over clones (the rules that save go through
  torch.save and torch.load(weights_only=True); the check deep-copies) restores the state dict bitwise,
  and when the next operation is a step, that fresh optimizer takes it alongside with the same
  gradients and ends bitwise equal (parameters, scale, lrs).
  A deepcopy or unpickled copy is checked the same way against the original (the copy is of the
  optimizer and its scheduler together, which clones the parameters: the copy is a whole independent
  run; the machine goes on with either and the other one must take the same next step).

Undefined by the issue and so not drawn: with ``per_group=True``, moving a parameter across groups, and
adding or inserting a group after a step at lr 0 but before Mechanic started; the same parameter twice
when it is frozen.

Budget (fixed, derandomized, no example database): 6 parametrizations x 25 examples x up to 25 steps.
Measured with the rules that fail on today's main switched off: about 30 s of CPU in all (one thread,
torch 2.13; 8-22 s wall per parametrization on a shared 2-core machine at load 8). A failure is shrunk
for at most 150 s. On today's main the file fails (issue 28's situations, ~100 s); the fixes land
separately. Not covered here: loading through the base optimizer and huge gradients (situations 4 and 3;
tests/test_nothing_silent.py).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import random
import warnings

import hypothesis.internal.conjecture.engine
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, \
    run_state_machine_as_test

import manic

REF, DELTA = "mechanic_ref", "mechanic_delta"
BUFFERS = {"ref+delta": (REF, DELTA), "ref": (REF,), "delta": (DELTA,)}
TUNER = ("mechanic_r", "mechanic_m", "mechanic_v", "mechanic_s", "mechanic_step", "mechanic_skipped",
         "mechanic_lr_ref")
F64 = torch.float64
GAMMA = 0.97
SHAPES = {"a": (3,), "b": (3,), "c": (2, 2), "d": (3,)}
START = {"a": 0.0, "b": 10.0, "c": -5.0, "d": 3.0}

# report_multiple_bugs=False: a failing run shrinks one failure (several take more than the timeout)
SETTINGS = settings(max_examples=25, stateful_step_count=25, deadline=None, derandomize=True, database=None,
                    report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers
def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (float tensors as integers of the same width), for bitwise comparison."""
    t = t.detach()
    if t.dtype == F64:
        return t.view(torch.int64)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def same_value(a, b, cast: bool = False) -> bool:
    """Equal: tensors bitwise (``cast``: after casting both to float64, which is exact from float32),
    floats with NaN equal to NaN, containers elementwise."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return False
        if cast and a.is_floating_point() and b.is_floating_point():
            return same_bits(a.to(F64), b.to(F64))
        return same_bits(a, b)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], cast) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y, cast) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def positions(opt) -> list[torch.Tensor]:
    """The parameters in state-dict order (each once)."""
    out, seen = [], set()
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def group_of(opt, p) -> int:
    return next(i for i, g in enumerate(opt.param_groups) if any(q is p for q in g["params"]))


def snapshot(opt) -> dict:
    """Everything that must stay as it was when an operation raises: the param groups (which tensors,
    every other entry), every parameter (value, dtype, requires_grad), every state tensor, the scale."""
    ps = positions(opt)
    return {"groups": [([id(p) for p in g["params"]], {k: copy.deepcopy(v) for k, v in g.items() if k != "params"})
                       for g in opt.param_groups],
            "params": [(p, p.detach().clone(), p.requires_grad) for p in ps],
            "state": {id(k): (k, {n: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                                  for n, v in entry.items()}) for k, entry in opt.state.items()},
            "scale": opt.scale.detach().clone()}


def assert_unchanged(opt, before: dict, what: str, cast: bool = False) -> None:
    """``cast``: values compared in float64 (Mechanic may move its float32 state to float64 after
    model.double())."""
    now = snapshot(opt)
    assert [g[0] for g in now["groups"]] == [g[0] for g in before["groups"]], f"{what}: param groups changed"
    for (_, h1), (_, h2) in zip(before["groups"], now["groups"]):
        assert same_value(h1, h2, cast), f"{what}: a param group's entries changed: {h1} -> {h2}"
    for (p, x, rg), (q, y, rg2) in zip(before["params"], now["params"]):
        assert p is q and rg == rg2 and same_bits(x, y), f"{what}: a parameter changed"
    assert now["state"].keys() == before["state"].keys(), f"{what}: the set of state entries changed"
    for k in before["state"]:
        assert same_value(before["state"][k][1], now["state"][k][1], cast), f"{what}: a state entry changed"
    if cast:  # S = sum(s) / lr_ref, summed in float64 now: the entries above are the stored state
        assert close(now["scale"], before["scale"], before["scale"].abs(), 8, torch.float32), \
            f"{what}: the scale changed"
    else:
        assert same_bits(before["scale"], now["scale"]), f"{what}: the scale changed"


def close(x: torch.Tensor, y: torch.Tensor, mag: torch.Tensor, ulps: float, *dtypes: torch.dtype) -> bool:
    """|x - y| <= ulps * eps * mag + tiny, elementwise (computed in float64), eps that of the coarsest of
    x's dtype and ``dtypes`` (the buffers' and the scale's: what x was computed in)."""
    eps = max(torch.finfo(d).eps for d in (x.dtype, *dtypes))
    err = (x.to(F64) - y.to(F64)).abs()
    return bool((err <= ulps * eps * mag.to(F64) + 1e-300).all())


def norm_state(sd_state: dict) -> dict:
    return {k: v for k, v in sd_state.items() if v}


def groups_entries(sd: dict) -> list[dict]:
    """A state dict's param groups, Mechanic's entries taken from the first group only: the tuner's entries
    live in the first group, whichever it is; a group that was first before one was inserted in front may
    keep copies, which a load ignores."""
    return [{k: v for k, v in g.items() if i == 0 or not k.startswith("mechanic_")}
            for i, g in enumerate(sd["param_groups"])]


# ----------------------------------------------------------------------------- the machine
class MechanizedMachine(RuleBasedStateMachine):
    PER_GROUP = False
    MODE = "ref+delta"

    def __init__(self):
        super().__init__()
        self.opt = None

    # ------------------------------------------------------------------ building
    @initialize(dtype=st.sampled_from(["float64", "float32"]), variant=st.sampled_from(["invariant", "original"]),
                skip_nonfinite=st.booleans())
    def build(self, dtype, variant, skip_nonfinite):
        """Four parameters in two groups, mechanized, with an ExponentialLR scheduler."""
        self.dtype = getattr(torch, dtype)
        # state="delta" implies x_ref as x - S * Delta: once float32 took part, that holds to float32's precision
        # for the rest of the run, float64 parameters (model.double()) included
        self.history = () if self.dtype == F64 else (torch.float32,)
        self.options = {"per_group": self.PER_GROUP, "state": self.MODE, "variant": variant,
                        "skip_nonfinite": skip_nonfinite}
        self.params = {n: self._new_param(SHAPES[n], START[n], seed=i) for i, n in enumerate("abcd")}
        a, b, c, d = self.params.values()
        base = torch.optim.SGD([{"params": [a, b, c], "lr": 0.1}, {"params": [d], "lr": 0.05}], lr=0.1, momentum=0.9)
        self.opt = manic.mechanize(base, **self.options)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, GAMMA)
        self.t = 0  # gradient counter
        self.fresh_count = 0
        self.stepped = False  # any step taken (Mechanic may not have started: lr 0)
        self.started = False  # Mechanic started: a step with a parameter under it and a non-zero lr
        self.refs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(p) -> (p, its x_ref)
        self.followers: list[tuple[str, object, object]] = []  # (what, opt, sched): must take the next step too
        self.prev = None  # the last check's view
        self.expect: dict = {"kind": "kept"}
        self.dtype_moved = False  # model.double() since the last step
        self.pending: list = []  # followers a rule adds for the next step (besides the check's)

    def _new_param(self, shape, center: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (center + 0.5 * torch.randn(shape, generator=g, dtype=F64)).to(self.dtype).requires_grad_()

    def _fresh(self, shape) -> torch.Tensor:
        self.fresh_count += 1
        return self._new_param(shape, 20.0 + self.fresh_count, seed=100 + self.fresh_count)

    def _build_like(self, opt, sched, sd, sched_sd):
        """A fresh optimizer and scheduler over clones of ``opt``'s parameters, loaded from ``sd``."""
        clones = {}
        groups = []
        for g in opt.param_groups:
            ps = []
            for p in g["params"]:
                if id(p) not in clones:
                    clones[id(p)] = p.detach().clone().requires_grad_(p.requires_grad)
                ps.append(clones[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params" and not k.startswith("mechanic_")},
                           "params": ps})
        fresh = manic.mechanize(torch.optim.SGD(groups, lr=0.1, momentum=0.9), **self.options)
        fresh_sched = torch.optim.lr_scheduler.ExponentialLR(fresh, GAMMA)
        fresh.load_state_dict(sd)
        fresh_sched.load_state_dict(sched_sd)
        return fresh, fresh_sched

    def _checkpoint(self, opt) -> dict:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    def _switch_to(self, opt, sched) -> None:
        """Go on with ``opt`` (a copy or a resumed optimizer over other tensors in the same positions)."""
        old = positions(self.opt)
        new = positions(opt)
        assert len(old) == len(new)
        rename = {id(p): q for p, q in zip(old, new)}
        self.refs = {id(rename[k]): (rename[k], r) for k, (_, r) in self.refs.items() if k in rename}
        self.opt, self.sched = opt, sched
        self.expect = {"kind": "kept", "rename": rename}

    def _begin(self, kind: str = "kept", **kw) -> None:
        """Every rule but a step: the followers only follow into a step right after the check."""
        self.followers = []
        self.expect = {"kind": kind, **kw}

    # ------------------------------------------------------------------ gradients and steps
    def _grads(self, opt, none_mask: int) -> None:
        """Deterministic gradients: a pull towards 1 (clamped: any size of weights stays finite) plus noise,
        None where ``none_mask`` has a bit set and for frozen parameters."""
        for i, p in enumerate(positions(opt)):
            if not p.requires_grad or (none_mask >> i) & 1:
                p.grad = None
                continue
            g = torch.Generator().manual_seed(1000 * self.t + i)
            noise = torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
            p.grad = (p.detach() - 1.0).clamp(-10, 10) + 0.3 * noise

    def _step(self, none_mask: int, lr: tuple[int, float] | None = None, may_raise: bool = False) -> None:
        """One step of the machine's optimizer (and the scheduler), with every follower alongside."""
        self.t += 1
        opt, followers = self.opt, self.followers
        self.followers = []
        self.expect = {"kind": "stepped"}
        ps = positions(opt)
        self._grads(opt, none_mask)
        for _, f, _ in followers:
            for p, q in zip(ps, positions(f)):
                q.grad = None if p.grad is None else p.grad.clone()
        pre = [p.detach().clone() for p in ps]
        frozen = [(p, p.detach().clone()) for p in ps if not p.requires_grad]
        lrs = [g["lr"] for g in opt.param_groups]
        if lr is not None:
            lrs[lr[0] % len(lrs)] = lr[1]
        starts = any(p.requires_grad for p in ps) and not all(v == 0 for v in lrs)

        def run(o, s) -> None:
            saved = None
            if lr is not None:
                g = o.param_groups[lr[0] % len(o.param_groups)]
                saved, g["lr"] = g["lr"], lr[1]
            try:
                o.step()
            finally:
                if lr is not None:
                    g["lr"] = saved
            s.step()

        before = snapshot(opt) if may_raise else None
        try:
            run(opt, self.sched)
        except Exception:
            if not may_raise:
                raise
            assert_unchanged(opt, before, "a step that raised")
            return
        self.stepped = True
        self.dtype_moved = False
        if starts:
            self.started = True
        if self.started:
            for p, x in zip(ps, pre):
                if p.requires_grad and id(p) not in self.refs:
                    self.refs[id(p)] = (p, x)  # came under Mechanic at this step: x_ref is its value before
        for p, x in frozen:
            assert same_bits(p.detach(), x), "a frozen parameter moved"
        for what, f, fs in followers:
            run(f, fs)
            for i, (p, q) in enumerate(zip(ps, positions(f))):
                assert same_bits(p.detach(), q.detach()), f"{what}: parameter {i} differs after the step"
            assert same_bits(opt.scale, f.scale), f"{what}: the scale differs after the step"
            assert same_value([g["lr"] for g in opt.param_groups], [g["lr"] for g in f.param_groups]), \
                f"{what}: the lrs differ after the step"

    # ------------------------------------------------------------------ rules
    @rule(none=st.integers(0, 15))
    def step(self, none):
        """opt.step() with fresh gradients (bit i of ``none``: parameter i has none), then the scheduler."""
        self._step(none)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        """opt.zero_grad(set_to_none)."""
        self._begin()
        self.opt.zero_grad(set_to_none=set_to_none)

    @rule(i=st.integers(0, 9))
    def freeze(self, i):
        """Parameter i stops training: requires_grad False, grad None."""
        self._begin()
        ps = positions(self.opt)
        p = ps[i % len(ps)]
        p.requires_grad_(False)
        p.grad = None
        self.refs.pop(id(p), None)

    @rule(i=st.integers(0, 9))
    def unfreeze(self, i):
        """Parameter i trains again: requires_grad True (it joins Mechanic with Delta = 0)."""
        self._begin()
        ps = positions(self.opt)
        ps[i % len(ps)].requires_grad_(True)

    @precondition(lambda self: not (self.PER_GROUP and self.stepped and not self.started))
    @rule(shape=st.sampled_from([(3,), (2, 2)]))
    def add_group(self, shape):
        """opt.add_param_group with a new parameter; with per_group after the start it must raise at the call
        (ValueError naming per_group) and change nothing."""
        self._begin()
        p = self._fresh(shape)
        if self.PER_GROUP and self.started:
            before = snapshot(self.opt)
            with pytest.raises(ValueError, match="per_group"):
                self.opt.add_param_group({"params": [p]})
            assert_unchanged(self.opt, before, "add_param_group refused")
            return
        self.opt.add_param_group({"params": [p]})

    @rule(g=st.integers(0, 9), seed=st.integers(0, 5))
    def reorder_group(self, g, seed):
        """Permute the parameters of group g (random.Random(seed).shuffle)."""
        self._begin()
        group = self.opt.param_groups[g % len(self.opt.param_groups)]
        ps = list(group["params"])
        random.Random(seed).shuffle(ps)
        group["params"] = ps

    @precondition(lambda self: not self.PER_GROUP)
    @rule(i=st.integers(0, 9), j=st.integers(0, 9))
    def swap_across_groups(self, i, j):
        """Swap two same-shape parameters of different groups (in place in both lists)."""
        self._begin()
        slots = [(gi, k, p) for gi, g in enumerate(self.opt.param_groups) for k, p in enumerate(g["params"])]
        first = slots[i % len(slots)]
        others = [s for s in slots if s[0] != first[0] and s[2].shape == first[2].shape]
        if not others:
            return
        second = others[j % len(others)]
        (g1, k1, p1), (g2, k2, p2) = first, second
        self.opt.param_groups[g1]["params"][k1] = p2
        self.opt.param_groups[g2]["params"][k2] = p1

    @precondition(lambda self: not (self.PER_GROUP and self.stepped and not self.started))
    @rule(shape=st.sampled_from([(3,), (2, 2)]))
    def insert_group_front(self, shape):
        """param_groups.insert(0, a group with a new parameter): every known parameter keeps its buffers, the
        new one joins. With per_group after the start (no call to refuse) the next step must raise naming
        per_group and change nothing, and removing the group again leaves everything as it was."""
        self._begin()
        p = self._fresh(shape)
        hyper = {k: v for k, v in self.opt.param_groups[0].items()
                 if k not in ("params", "initial_lr") and not k.startswith("mechanic_")}
        if self.PER_GROUP and self.started:
            before = snapshot(self.opt)
            self.opt.param_groups.insert(0, {**hyper, "params": [p]})
            self._grads(self.opt, 0)
            inserted = snapshot(self.opt)
            with pytest.raises((ValueError, RuntimeError), match="per_group"):
                self.opt.step()
            assert_unchanged(self.opt, inserted, "a step refused after a group was inserted (per_group)")
            self.opt.param_groups.pop(0)
            assert_unchanged(self.opt, before, "the inserted group removed again")
            return
        self.opt.param_groups.insert(0, {**hyper, "params": [p]})

    @rule(i=st.integers(0, 9), whole_entry=st.booleans())
    def replace_with_stranger(self, i, whole_entry):
        """The tensor at position i is replaced by a never-seen tensor of the same shape and values (as
        accelerate and DeepSpeed do); its base state moves with it (the whole state entry, or only the
        base optimizer's keys). The stranger takes over the position's Mechanic buffers."""
        ps = positions(self.opt)
        old = ps[i % len(ps)]
        new = old.detach().clone().requires_grad_(old.requires_grad)
        self._begin("kept", rename={id(old): new})
        for g in self.opt.param_groups:
            g["params"] = [new if q is old else q for q in g["params"]]
        if old in self.opt.state:
            entry = self.opt.state.pop(old)
            moved = entry if whole_entry else {k: v for k, v in entry.items() if not k.startswith("mechanic_")}
            if moved:
                self.opt.state[new] = moved
        if id(old) in self.refs:
            self.refs[id(new)] = (new, self.refs.pop(id(old))[1])

    @rule(i=st.integers(0, 9), same_group=st.booleans())
    def same_parameter_twice(self, i, same_group):
        """A trainable parameter listed twice (again in its group, or in a new group): the next step must
        raise ValueError ("more than once") and change nothing; undone, training goes on."""
        self._begin()
        ps = [p for p in positions(self.opt) if p.requires_grad]
        if not ps:
            return
        p = ps[i % len(ps)]
        if not same_group and self.PER_GROUP:
            same_group = True  # a new group would also break per_group's group count
        before = snapshot(self.opt)
        if same_group:
            self.opt.param_groups[group_of(self.opt, p)]["params"].append(p)
        else:
            hyper = {k: v for k, v in self.opt.param_groups[0].items()
                     if k not in ("params", "initial_lr") and not k.startswith("mechanic_")}
            self.opt.param_groups.append({**hyper, "params": [p]})
        self._grads(self.opt, 0)
        doubled = snapshot(self.opt)
        with pytest.raises(ValueError, match="more than once"):
            self.opt.step()
        assert_unchanged(self.opt, doubled, "a step refused for a parameter listed twice")
        if same_group:
            self.opt.param_groups[group_of(self.opt, p)]["params"].pop()  # the copy appended
        else:
            self.opt.param_groups.pop()
        assert_unchanged(self.opt, before, "the parameter listed once again")

    @rule()
    def roundtrip_same(self):
        """opt.load_state_dict(the checkpoint of opt itself, through torch.save/torch.load): nothing changes."""
        self._begin()
        before = snapshot(self.opt)
        self.opt.load_state_dict(self._checkpoint(self.opt))
        assert_unchanged(self.opt, before, "loading its own checkpoint", cast=self.dtype_moved)

    @rule()
    def resume_in_fresh(self):
        """Go on in a freshly built optimizer (and scheduler) over clones, loaded from a checkpoint."""
        self._begin()
        fresh, sched = self._build_like(self.opt, self.sched, self._checkpoint(self.opt),
                                        copy.deepcopy(self.sched.state_dict()))
        self._switch_to(fresh, sched)

    @rule(go_on_with_copy=st.booleans())
    def deepcopy(self, go_on_with_copy):
        """copy.deepcopy((opt, scheduler)): the original is untouched; the machine goes on with one of the
        two, and the other must take the same next step."""
        self._begin()
        before = snapshot(self.opt)
        opt2, sched2 = copy.deepcopy((self.opt, self.sched))
        assert_unchanged(self.opt, before, "deepcopy")
        self._compare_copy(opt2, "the deepcopy")
        self._go_on(opt2, sched2, go_on_with_copy, "deepcopy")

    @rule(via=st.sampled_from(["pickle", "torch.save"]), go_on_with_copy=st.booleans())
    def pickle_roundtrip(self, via, go_on_with_copy):
        """pickle.dumps/loads (or torch.save/torch.load) of (opt, scheduler), as deepcopy."""
        self._begin()
        before = snapshot(self.opt)
        if via == "pickle":
            opt2, sched2 = pickle.loads(pickle.dumps((self.opt, self.sched)))
        else:
            buf = io.BytesIO()
            torch.save((self.opt, self.sched), buf)
            buf.seek(0)
            opt2, sched2 = torch.load(buf, weights_only=False)
        assert_unchanged(self.opt, before, via)
        self._compare_copy(opt2, via)
        self._go_on(opt2, sched2, go_on_with_copy, via)

    def _compare_copy(self, opt2, what: str) -> None:
        assert same_bits(opt2.scale, self.opt.scale), f"{what}: the scale differs"
        for p, q in zip(positions(self.opt), positions(opt2)):
            assert q is not p and same_bits(p.detach(), q.detach()) and p.requires_grad == q.requires_grad
            assert same_value(self.opt.state.get(p, {}), opt2.state.get(q, {})), f"{what}: a state entry differs"

    def _go_on(self, opt2, sched2, go_on_with_copy: bool, what: str) -> None:
        original = (self.opt, self.sched)
        if go_on_with_copy:
            self._switch_to(opt2, sched2)
            self.pending = [(f"the original of the {what}", *original)]
        else:
            self.pending = [(f"the {what}", opt2, sched2)]

    @precondition(lambda self: self.opt is not None and self.dtype == torch.float32)
    @rule()
    def model_double(self):
        """model.double(): every parameter becomes float64 in place (p.data = p.data.double()), the base
        optimizer's own state too (a user's job); Mechanic must follow (buffers and tuner in float64)."""
        self._begin("kept", cast=True)
        for p in positions(self.opt):
            p.grad = None
            p.data = p.data.double()
        for entry in self.opt.state.values():
            for k, v in entry.items():
                if torch.is_tensor(v) and v.is_floating_point() and not k.startswith("mechanic_"):
                    entry[k] = v.double()
        self.refs = {k: (p, r.double()) for k, (p, r) in self.refs.items()}
        self.dtype = F64
        self.dtype_moved = True

    @rule(g=st.integers(0, 9), lr=st.sampled_from([0.0, 1e-30, 1e20, 0.1]))
    def set_lr(self, g, lr):
        """param_groups[g]["lr"] = lr (0, tiny, huge but finite, or normal) until changed again."""
        self._begin()
        self.opt.param_groups[g % len(self.opt.param_groups)]["lr"] = lr

    @rule(g=st.integers(0, 9), lr=st.sampled_from([math.nan, math.inf, -math.inf]), none=st.integers(0, 15))
    def nonfinite_lr_step(self, g, lr, none):
        """One step with a non-finite lr in group g, then the lr restored: Mechanic's state stays finite
        (or the step raises and changes nothing)."""
        self._step(none, lr=(g, lr), may_raise=True)

    @rule(how=st.sampled_from(["clear", "del"]), i=st.integers(0, 9))
    def clear_state(self, how, i):
        """opt.state.clear(), or del opt.state[p] for one p: the base optimizer's state is gone, Mechanic's
        buffers are not (state_dict has them afterwards)."""
        self._begin("kept")
        if how == "clear":
            self.opt.state.clear()
            return
        keys = list(self.opt.state.keys())
        if keys:
            del self.opt.state[keys[i % len(keys)]]

    # ------------------------------------------------------------------ the check
    @invariant()
    def consistent(self):
        """After every operation (see the module docstring)."""
        if self.opt is None:
            return
        opt = self.opt
        ps = positions(opt)
        xs = [p.detach().clone() for p in ps]
        scale = opt.scale.detach().clone()
        sd = opt.state_dict()
        assert all(same_bits(p.detach(), x) for p, x in zip(ps, xs)), "state_dict() moved a parameter"
        assert same_bits(opt.scale, scale), "state_dict() changed the scale"
        S = opt.scale.detach()
        assert torch.isfinite(S).all() and (S > 0).all(), f"the scale is {S}"
        keys = BUFFERS[self.MODE]
        moved = (torch.float32,) if self.dtype_moved else ()  # x was last computed in float32
        view = {"params": {}, "tuner": {k: v.detach().clone() for k, v in sd["param_groups"][0].items()
                                        if k in TUNER}}
        for i, p in enumerate(ps):
            entry = sd["state"].get(i, {})
            mine = {k: v for k, v in entry.items() if k.startswith("mechanic_")}
            live = {k: v for k, v in opt.state.get(p, {}).items() if k.startswith("mechanic_")}
            for k, v in mine.items():
                assert torch.isfinite(v).all(), f"parameter {i}: {k} is not finite: {v}"
            view["params"][id(p)] = (p, p.detach().clone(), {k: v.clone() for k, v in mine.items()})
            # ("ref" keeps Delta implied, as (x - x_ref) / S: a non-finite x is a non-finite Delta)
            assert torch.isfinite(p).all(), f"parameter {i} is not finite: {p}"
            if not p.requires_grad:
                assert not mine and not live, f"frozen parameter {i} has Mechanic buffers {sorted(mine)}"
                continue
            if not self.started:
                continue
            assert set(mine) == set(keys), f"parameter {i}: state_dict has Mechanic buffers {sorted(mine)}, not {keys}"
            assert same_value(mine, live), f"parameter {i}: opt.state does not hold its Mechanic buffers"
            if not self.dtype_moved:
                assert all(v.dtype == p.dtype for v in mine.values()), f"parameter {i}: buffers not in {p.dtype}"
            x = p.detach()
            if id(p) not in self.refs:  # joined since the last step: x_ref = x, Delta = 0
                if REF in mine:
                    assert same_value(mine[REF], x, cast=True), f"parameter {i} joined with x_ref != x"
                if DELTA in mine:
                    assert not mine[DELTA].any(), f"parameter {i} joined with Delta != 0"
                self.refs[id(p)] = (p, x.clone())
            ref = self.refs[id(p)][1]
            if REF in mine:
                assert same_value(mine[REF], ref, cast=True), \
                    f"parameter {i}: x_ref is not its own (identity first): {mine[REF]} != {ref}"
            if DELTA in mine:
                s = S[group_of(opt, p)] if self.PER_GROUP else S
                sd_ = s.to(F64) * mine[DELTA].to(F64)
                if REF in mine:
                    mag = mine[REF].to(F64).abs() + sd_.abs()
                    dtypes = (s.dtype, *moved, *(v.dtype for v in mine.values()))
                    assert close(x, mine[REF].to(F64) + sd_, mag, 4, *dtypes), \
                        f"parameter {i}: x != x_ref + S * Delta ({x} vs {mine[REF]} + {s} * {mine[DELTA]})"
                else:
                    mag = ref.to(F64).abs() + sd_.abs() + x.to(F64).abs()
                    wide = x.dtype == s.dtype == mine[DELTA].dtype == F64 and not moved and not self.history
                    assert close(x, ref.to(F64) + sd_, mag, 1e7 if wide else 1e3, s.dtype, *moved, *self.history,
                                 mine[DELTA].dtype), \
                        f"parameter {i}: x - S * Delta is not its reference ({x} - {s} * {mine[DELTA]} vs {ref})"
        if not self.dtype_moved and any(p.dtype == F64 for p in ps if p.requires_grad) and self.started:
            assert S.dtype == F64, f"float64 parameters but a {S.dtype} scale"
        # what an operation other than a step must leave as it was
        if self.expect["kind"] == "kept" and self.prev is not None:
            rename, cast = self.expect.get("rename", {}), self.expect.get("cast", False) or self.dtype_moved
            for pid, (p, x, bufs) in self.prev["params"].items():
                q = rename.get(pid, p)
                if id(q) not in view["params"]:
                    continue
                _, y, now = view["params"][id(q)]
                assert same_value(x, y, cast), "an operation other than a step moved a parameter"
                if self.started and bufs and q.requires_grad:
                    assert same_value(bufs, now, cast), \
                        "an operation other than a step changed the Mechanic buffers of a parameter that stayed"
            if self.started:
                assert same_value(self.prev["tuner"], view["tuner"], cast), \
                    "an operation other than a step changed the tuner"
        self.prev = view
        # a round trip into a freshly built optimizer restores everything, and resumes bitwise (next step)
        # (a deepcopy of the state dict stands for a file here; the rules save through torch.save)
        fresh, fresh_sched = self._build_like(opt, self.sched, copy.deepcopy(sd),
                                              copy.deepcopy(self.sched.state_dict()))
        sd2 = fresh.state_dict()
        assert same_value(norm_state(sd["state"]), norm_state(sd2["state"]), cast=self.dtype_moved), \
            "the fresh optimizer's state differs after loading the checkpoint"
        assert same_value(groups_entries(sd), groups_entries(sd2), cast=self.dtype_moved), \
            "the fresh optimizer's param groups differ after loading the checkpoint"
        self.followers = [*self.pending, ("the optimizer resumed from a checkpoint", fresh, fresh_sched)]
        self.pending = []


def machine(per_group: bool, mode: str) -> type:
    return type(f"Machine_{'per_group' if per_group else 'one'}_{mode.replace('+', '_')}", (MechanizedMachine,),
                {"PER_GROUP": per_group, "MODE": mode})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["ref+delta", "delta", "ref"])
@pytest.mark.parametrize("per_group", [False, True], ids=["one_scale", "per_group"])
def test_random_user_operations_keep_mechanic_consistent(per_group, mode, monkeypatch):
    # a failure found is shrunk for at most 150 s (hypothesis' own limit, 300 s, plus the search would
    # pass the timeout and lose the example)
    monkeypatch.setattr(hypothesis.internal.conjecture.engine, "MAX_SHRINKING_SECONDS", 150, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_state_machine_as_test(machine(per_group, mode), settings=SETTINGS)
