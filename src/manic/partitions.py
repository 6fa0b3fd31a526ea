"""One Mechanic step over DeepSpeed ZeRO's partitions, which DeepSpeed steps one at a time (finding
them, and what DeepSpeed shows the client optimizer at each: deepspeed_zero.py).

At each part (one flat fp32 partition) the part's gradient exists only for its client step (DeepSpeed
flattens it just before and frees it just after), and right after that step DeepSpeed copies the part's
fp32 partition into the model's weights.

So with several parts a Mechanic step has two phases. At each part, before its base step, the part's
local sums and what the state mode's rebase needs from before the base step (nothing for "ref+delta",
whose x_t is x_ref + S * Delta; x_t - x_ref for "ref"; a copy of x_t for "delta") are taken and kept,
and the part's base step runs. At the last part the kept sums go into the step's ONE all-reduce, the
tuner updates, every part is rebased to the new scale, and the model's copies of the earlier parts are
made again from their rebased fp32 partitions (as DeepSpeed made them after their base steps). This is
the one-group step exactly: a part's x_t, g and D do not change before its own base step, so these are
the sums the one-group step takes before any base step, added in another order (float32 round-off).
The engine sees the whole model throughout: while it binds, checks the ranks, starts and commits, the
base optimizer is shown every part (as DeepSpeed itself does around its checkpoints), so the layout,
its positions and the checkpoint are those of DeepSpeed's ``state_dict``. With ``distance_floor=True``
each part's new accumulator A and its L1 norm are taken with its sums (the weights once, at the first
part), and A is written at the last part with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from . import distance, kernels, step, storage, tuner
from .deepspeed_zero import Zero
from .layout import Layout

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class Pending:
    """A DeepSpeed step in progress: its first half, the parts seen so far and what they left."""

    plan: step.Plan  # step.begin's, over every part
    groups: list[dict[str, Any]]  # the full param groups
    positions: list[tuple[int, ...]]  # per part, the positions of its slots in plan.layout.slots
    next: int = 0  # the part expected next
    sums: Tensor | None = None  # the parts' local sums so far, (tuners, 4), or 5 with the distance floor
    transient: dict[int, Tensor] = field(default_factory=dict)  # per slot position, the mode's transient
    w: Tensor | None = None  # distance_floor=True: the tuners' weights (distance.weights, at part 0)
    acc: dict[int, Tensor | None] = field(default_factory=dict)  # per slot position, the new A

    @property
    def sums_taken(self) -> bool:
        return self.plan.started and bool(self.plan.layout.slots)


@dataclass(frozen=True)
class PartPlan:
    """A prepared part: its base step runs next (``run``)."""

    zero: Zero
    part: int
    params: tuple[Tensor, ...]  # the part's tensors under Mechanic

    def run(self, engine: Engine, base_step: Callable[[], Any]) -> None:
        """Part k's base step; at the last part, the step's second half."""
        z = self.zero
        p = z.pending
        assert p is not None and p.next == self.part
        try:
            with storage.hidden(engine.optimizer, self.params):
                base_step()
        except BaseException:
            if self.part == 0:
                z.pending = None  # nothing moved yet: Mechanic is as it was
            raise
        p.next += 1
        if p.next == len(p.positions):
            z.pending = None
            _finish(z, engine, p)


@torch.no_grad()
def prepare(z: Zero, engine: Engine) -> PartPlan:
    """Before part k's base step: (at the first part) the step's first half over every part, then the
    part's local sums and transient."""
    p = z.pending
    try:
        k, groups = z.now(engine)
    except RuntimeError:
        if p is not None:  # (DeepSpeed leaves the client's groups as its failed step left them)
            raise _broken(z, p, None) from None
        raise
    parts = z.parts()
    if k == 0:
        if p is not None:
            raise _broken(z, p, k)
        with z.showing_all(engine, groups):
            layout, buffers = engine.bound()
            if not engine.checked:
                step.check_ranks(groups, layout, engine.options, engine.hyper)
                engine.checked = True
            plan = step.begin(groups, layout, buffers, engine.tuner, engine.started, engine.options, engine.hyper)
        where = {id(s.ref()): i for i, s in enumerate(layout.slots)}
        positions = [tuple(where[id(t)] for t in (part,) if id(t) in where) for part in parts]
        p = z.pending = Pending(plan, groups, positions)
        if engine.hyper.distance_floor and p.sums_taken:
            p.w = distance.weights(groups, layout, plan.tuner)
    elif p is None or p.next != k:
        raise _broken(z, p, k)
    mine = p.positions[k]
    layout = p.plan.layout
    if p.sums_taken and mine:
        sub = _sub_layout(layout, mine)
        mode = engine.hyper.mode
        xs, bufs = step.views(sub, p.plan.buffers)
        ds, transient = mode.direction(xs, bufs)
        part = distance.partial(p.w, sub, bufs) if p.w is not None else None
        sums = distance.packed(step.local_sums(sub, xs, ds, kernels.for_step(engine.kernels)), part,
                               (len(sub.tuners),))
        p.sums = sums if p.sums is None else p.sums + sums
        if part is not None:
            p.acc.update(zip(mine, part.cands))
        transient = mode.snapshot(xs, transient)
        if transient is not None:
            p.transient.update(zip(mine, transient))
    return PartPlan(z, k, tuple(layout.slots[i].ref() for i in mine))


@torch.no_grad()
def _finish(z: Zero, engine: Engine, p: Pending) -> None:
    plan, layout = p.plan, p.plan.layout
    if p.sums_taken:
        state = plan.tuner
        assert p.sums is not None
        sums = layout.reducer.all_reduce_sum(p.sums.reshape(*state.lr_ref.shape, -1))
        new, h, ok = tuner.update(state, sums[..., :4], engine.hyper, engine.betas(layout))
        if p.w is not None:
            new, ok = distance.apply(state, new, ok, sums, p.w, engine.hyper.mode)
        transient = [p.transient[i] for i in range(len(layout.slots))] if p.transient else None
        acc = [p.acc.get(i) for i in range(len(layout.slots))] if p.w is not None else None
        plan = replace(plan, update=step.Update(new, state.scale, ok, transient, False, step.stats(sums, h), acc))
    with z.showing_all(engine, p.groups):
        engine.commit(plan)
    if plan.update is not None:  # rebased: the model's copies of the parts DeepSpeed copied already
        for k in range(len(p.positions) - 1):
            if p.positions[k]:
                z.copy_to_model(k)


def _broken(z: Zero, p: Pending | None, k: int | None) -> RuntimeError:
    n = len(z.parts())
    if p is None:
        return RuntimeError(f"DeepSpeed stepped part {k} of {n} of the client optimizer without part 0 first; "
                            "Mechanic needs every part of a step, in order")
    return RuntimeError(
        f"DeepSpeed's previous step stopped after part {p.next} of {n} of the client optimizer (an error in "
        "its step, or a step skipped for some parts only), and now steps again: the parts before it took "
        "their base step without Mechanic's rebase, so the model is no longer where Mechanic's state says. "
        "Load a checkpoint (engine.load_checkpoint) to go on")


def _sub_layout(layout: Layout, positions: tuple[int, ...]) -> Layout:
    """``layout`` restricted to the slots at ``positions`` (its tuners kept, each with its slots among them)."""
    at = {i: j for j, i in enumerate(positions)}
    return replace(layout, slots=tuple(layout.slots[i] for i in positions),
                   tuners=tuple(tuple(at[i] for i in ks if i in at) for ks in layout.tuners))
