"""One Mechanic step over DeepSpeed ZeRO's partitions, which DeepSpeed steps one at a time.

Under ZeRO-1/2 DeepSpeed steps the client optimizer once per param group, showing it that group alone
(``param_groups = [group]``); under ZeRO-3 once per sub-group, showing every group with only that
sub-group's flat fp32 partition in it. Each time, the part's gradient exists only for that call
(DeepSpeed flattens it just before and frees it just after), and right after the call DeepSpeed copies
the part's fp32 partition into the model's weights. A *part* here is one such flat partition.

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
its positions and the checkpoint are those of DeepSpeed's ``state_dict``.

Refused, before the first part steps (the message names the cause and the fix):
  - ``skip_nonfinite=True``: when the global sums are not finite the one-group step skips the base step,
    but the earlier parts have already taken theirs (DeepSpeed itself skips a step whose gradients are
    not finite, before the client optimizer sees it).
  - optimizer offload (``offload_optimizer``): under ZeRO-3 a sub-group's fp32 partition and state may
    be swapped out, or stepped by DeepSpeed's second optimizer, before the last sub-group; under ZeRO-1/2
    the model's copies are made through DeepSpeed's offload buffers, which this module does not redo.
    Untested, so not supported with several parts.
With one part (one param group, and under ZeRO-3 one sub-group) the engine's ordinary step runs. With
``distance_floor=True`` each part's new accumulator A and its L1 norm are taken with its sums (the weights
once, at the first part), and A is written at the last part with the rest.

What this relies on in DeepSpeed (0.19.8), all checked where it is used, so that a DeepSpeed that
changes it fails loudly here: the client step is called from ``_optimizer_step`` (whose ``self`` is the
ZeRO optimizer, ``.optimizer`` the client; under ZeRO-1/2 its local ``original_param_groups`` holds the
full groups); the parts are ``single_partition_of_fp32_groups`` (ZeRO-1/2, one per group) or
``fp32_partitioned_groups_flat`` with ``sub_group_to_group_id`` (ZeRO-3), stepped in that order; the
model's copy of part k is ``parallel_partitioned_bit16_groups[k][rank in real_dp_process_group[k]]``
(ZeRO-1/2) or made by ``_reassign_or_swap_out_partitioned_parameters(k)`` (ZeRO-3).
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor

from . import distance, kernels, step, storage, tuner
from .compat import disable_dynamo
from .layout import Layout

if TYPE_CHECKING:
    from .engine import Engine

NOT_UNDER_ZERO = "not under ZeRO"  # the engine's mark: steps do not come part by part (looked once)
_DEPTH = 20  # frames between DeepSpeed's _optimizer_step and here (~8 through a GradScaler and torch's hooks)


def of(engine: Engine) -> Zero | None:
    """The DeepSpeed ZeRO optimizer stepping ``engine``'s optimizer part by part, or None (looked up at
    the engine's first step, and again after a load; refuses what it cannot step exactly)."""
    zero = getattr(engine, "_parts", None)
    if zero is None:
        zero = engine._parts = _detect(engine) or NOT_UNDER_ZERO
    return None if zero == NOT_UNDER_ZERO else zero


@disable_dynamo  # (frames are the interpreter's: looked at eagerly under torch.compile(opt.step))
def _caller(engine: Engine) -> tuple[Any, Any] | None:
    """DeepSpeed's ZeRO optimizer whose ``_optimizer_step`` is stepping this engine's optimizer now, and
    that call's ``original_param_groups`` (ZeRO-1/2: the full groups); None if no such call is on the
    stack (a walk of a few frames: at the first step, and at each part of a step over several)."""
    f = sys._getframe(1)
    try:
        for _ in range(_DEPTH):
            f = f.f_back
            if f is None:
                return None
            if f.f_code.co_name == "_optimizer_step":
                zero = f.f_locals.get("self")
                client = getattr(zero, "optimizer", None)
                if client is engine.optimizer or getattr(client, "_engine", None) is engine:
                    return zero, f.f_locals.get("original_param_groups")
        return None
    finally:
        del f


def _detect(engine: Engine) -> Zero | None:
    found = _caller(engine)
    if found is None:
        return None
    zero = found[0]
    if hasattr(zero, "fp32_partitioned_groups_flat") and hasattr(zero, "sub_group_to_group_id"):
        stage3 = True
    elif hasattr(zero, "single_partition_of_fp32_groups"):
        stage3 = False
    else:
        return None  # a DeepSpeed optimizer that shows the client all its groups at once
    z = Zero(zero, stage3)
    n = len(z.parts())
    if n < 2:
        return None  # one part: the ordinary step
    what = (f"DeepSpeed ZeRO-{3 if stage3 else '1/2'} steps the client optimizer once per "
            + ("sub-group" if stage3 else "param group") + f", {n} times per step here")
    fix = ("give the client optimizer one param group" + (" and keep sub_group_size at least each rank's "
           "share of the parameters" if stage3 else ""))
    if engine.options.skip_nonfinite:
        raise ValueError(
            f"{what}, and Mechanic's sums are global: when they are not finite, skip_nonfinite=True skips the "
            "base step, but the parts before the last have taken theirs by then. Pass skip_nonfinite=False "
            "(DeepSpeed itself skips a step whose gradients are not finite, before Mechanic sees it), or "
            f"{fix}")
    if getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False) \
            or getattr(zero, "swap_optimizer", False):
        where = ("a sub-group's fp32 partition and state may be swapped out, or stepped by DeepSpeed's second "
                 "optimizer, before the last sub-group" if stage3 else "the model's copy of each part is made "
                 "through DeepSpeed's offload buffers, which Mechanic does not make again")
        raise NotImplementedError(
            f"{what}, with optimizer offload: Mechanic rebases every part at the last one, and {where}; not "
            f"supported with several parts (untested). Turn offload_optimizer off, or {fix}")
    return z


@dataclass
class _Pending:
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
        self.zero.run(engine, self, base_step)


class Zero:
    """DeepSpeed's ZeRO optimizer that steps an engine's optimizer part by part, and the step in progress."""

    def __init__(self, zero: Any, stage3: bool) -> None:
        self._zero = weakref.ref(zero)
        self.stage3 = stage3
        self.pending: _Pending | None = None

    def __repr__(self) -> str:
        return f"<{len(self.parts())} parts of DeepSpeed ZeRO-{3 if self.stage3 else '1/2'}>"

    @property
    def zero(self) -> Any:
        zero = self._zero()
        if zero is None:
            raise RuntimeError("DeepSpeed's ZeRO optimizer that stepped this Mechanic is gone")
        return zero

    def parts(self) -> list[Tensor]:
        z = self.zero
        return list(z.fp32_partitioned_groups_flat if self.stage3 else z.single_partition_of_fp32_groups)

    def group_of(self, k: int) -> int:
        return self.zero.sub_group_to_group_id[k] if self.stage3 else k

    # ------------------------------------------------------------------ what DeepSpeed shows
    def _now(self, engine: Engine) -> tuple[int, list[dict[str, Any]]]:
        """(the part DeepSpeed is stepping, the full param groups)."""
        found = _caller(engine)
        if found is None or found[0] is not self.zero:
            raise RuntimeError(
                f"Mechanic is under DeepSpeed ZeRO ({self!r}) and was stepped outside DeepSpeed's step: step "
                "the model through the DeepSpeed engine (engine.step()), which steps each part in turn")
        groups = engine.optimizer.param_groups if self.stage3 else found[1]
        shown = [p for g in engine.optimizer.param_groups for p in g["params"]]
        parts = self.parts()
        k = next((k for k, p in enumerate(parts) if len(shown) == 1 and shown[0] is p), None)
        if k is None or not isinstance(groups, list) or len(groups) <= self.group_of(len(parts) - 1) \
                or not self.stage3 and groups[k] is not engine.optimizer.param_groups[0]:
            raise RuntimeError(
                f"DeepSpeed's ZeRO optimizer ({type(self.zero).__name__}) shows Mechanic {len(shown)} tensors, "
                f"not one of its {len(parts)} fp32 partitions: this DeepSpeed steps its client optimizer in a "
                "way Mechanic does not know (tested with deepspeed 0.19.8); give the client optimizer one "
                "param group (and one ZeRO-3 sub-group)")
        return k, groups

    @contextmanager
    def _showing_all(self, engine: Engine, groups: list[dict[str, Any]]) -> Iterator[None]:
        """While the block runs, the base optimizer's param groups are ``groups`` with every part in its
        group (ZeRO-1/2: the groups as they are; ZeRO-3: as DeepSpeed's checkpoint shows them)."""
        opt = engine.optimizer
        view, saved = opt.param_groups, [g["params"] for g in groups]
        opt.param_groups = groups
        if self.stage3:
            by_group: list[list[Tensor]] = [[] for _ in groups]
            for k, p in enumerate(self.parts()):
                by_group[self.group_of(k)].append(p)
            for g, params in zip(groups, by_group):
                g["params"] = params
        try:
            yield
        finally:
            for g, params in zip(groups, saved):
                g["params"] = params
            opt.param_groups = view

    # ------------------------------------------------------------------ the two phases
    @torch.no_grad()
    def prepare(self, engine: Engine) -> PartPlan:
        """Before part k's base step: (at the first part) the step's first half over every part, then the
        part's local sums and transient."""
        p = self.pending
        try:
            k, groups = self._now(engine)
        except RuntimeError:
            if p is not None:  # (DeepSpeed leaves the client's groups as its failed step left them)
                raise self._broken(p, None) from None
            raise
        parts = self.parts()
        if k == 0:
            if p is not None:
                raise self._broken(p, k)
            with self._showing_all(engine, groups):
                layout, buffers = engine._bound()
                if not engine._checked:
                    step.check_ranks(groups, layout, engine.options, engine.hyper)
                    engine._checked = True
                plan = step.begin(groups, layout, buffers, engine.tuner, engine.started, engine.options, engine.hyper)
            where = {id(s.ref()): i for i, s in enumerate(layout.slots)}
            positions = [tuple(where[id(t)] for t in (part,) if id(t) in where) for part in parts]
            p = self.pending = _Pending(plan, groups, positions)
            if engine.hyper.distance_floor and p.sums_taken:
                p.w = distance.weights(groups, layout, plan.tuner)
        elif p is None or p.next != k:
            raise self._broken(p, k)
        mine = p.positions[k]
        layout = p.plan.layout
        if p.sums_taken and mine:
            sub = _sub_layout(layout, mine)
            mode = engine.hyper.mode
            xs, bufs = step.views(sub, p.plan.buffers)
            ds, transient = mode.direction(xs, bufs)
            part = distance.partial(p.w, sub, bufs) if p.w is not None else None
            sums = distance.packed(step.local_sums(sub, xs, ds, kernels.for_step(engine._kernels)), part,
                                   (len(sub.tuners),))
            p.sums = sums if p.sums is None else p.sums + sums
            if part is not None:
                p.acc.update(zip(mine, part.cands))
            transient = mode.snapshot(xs, transient)
            if transient is not None:
                p.transient.update(zip(mine, transient))
        return PartPlan(self, k, tuple(layout.slots[i].ref() for i in mine))

    def run(self, engine: Engine, plan: PartPlan, base_step: Callable[[], Any]) -> None:
        """Part k's base step; at the last part, the step's second half."""
        p = self.pending
        assert p is not None and p.next == plan.part
        try:
            with storage.hidden(engine.optimizer, plan.params):
                base_step()
        except BaseException:
            if plan.part == 0:
                self.pending = None  # nothing moved yet: Mechanic is as it was
            raise
        p.next += 1
        if p.next == len(p.positions):
            self.pending = None
            self._finish(engine, p)

    @torch.no_grad()
    def _finish(self, engine: Engine, p: _Pending) -> None:
        plan, layout = p.plan, p.plan.layout
        if p.sums_taken:
            state = plan.tuner
            assert p.sums is not None
            sums = layout.reducer.all_reduce_sum(p.sums.reshape(*state.lr_ref.shape, -1))
            new, h, ok = tuner.update(state, sums[..., :4], engine.hyper, engine._betas(layout))
            if p.w is not None:
                new, ok = distance.apply(state, new, ok, sums, p.w, engine.hyper.mode)
            transient = [p.transient[i] for i in range(len(layout.slots))] if p.transient else None
            acc = [p.acc.get(i) for i in range(len(layout.slots))] if p.w is not None else None
            plan = replace(plan, update=step.Update(new, state.scale, ok, transient, False, step.stats(sums, h), acc))
        with self._showing_all(engine, p.groups):
            engine._commit(plan)
        if plan.update is not None:  # rebased: the model's copies of the parts DeepSpeed copied already
            for k in range(len(p.positions) - 1):
                if p.positions[k]:
                    self._copy_to_model(k)

    def _copy_to_model(self, k: int) -> None:
        """Make the model's copy of part k from its fp32 partition again, as DeepSpeed does after its step."""
        z = self.zero
        if self.stage3:
            z._reassign_or_swap_out_partitioned_parameters(k)
            return
        import torch.distributed as dist

        rank = dist.get_rank(group=z.real_dp_process_group[k])
        z.parallel_partitioned_bit16_groups[k][rank].data.copy_(z.single_partition_of_fp32_groups[k].data)

    def _broken(self, p: _Pending | None, k: int | None) -> RuntimeError:
        n = len(self.parts())
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
