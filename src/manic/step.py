"""A step as a value: ``prepare`` it before the base step, ``rebase`` after it.

``prepare`` takes the layout (bound by the engine), decides whether Mechanic starts (``begin``), computes
this rank's partial sums per tuner, reduces them in ONE collective and runs the tuner update, all into an
immutable ``Plan`` and without changing anything (the one host sync, ``bool(ok)``, only with
skip_nonfinite). The base optimizer then steps; the engine installs the plan and ``rebase`` moves
``x`` by the state mode's rule. A base step that raises drops the plan: Mechanic is as it was.
(Under DeepSpeed ZeRO with several partitions, partitions.py takes the same steps part by part.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from . import distance, tuner
from .compat import local
from .kernels import Kernels
from .layout import Layout, Slot
from .modes import Buffers, StateMode
from .options import Options
from .reduce import NoReduce, check_config
from .tuner import Resolved, TunerState, of_group


@dataclass(frozen=True)
class Update:
    """The tuner's part of a step."""

    tuner: TunerState  # after the step
    S_old: Tensor
    ok: Tensor  # the sums were finite (0-dim bool, on the device)
    transient: list[Tensor] | None  # per slot, what the state mode keeps from before the base step
    skip_base: bool  # skip_nonfinite and the sums were not finite
    last: dict[str, Tensor]  # statistics for stats()
    acc: list[Tensor | None] | None = None  # distance_floor=True: per slot the new A (distance.commit)


@dataclass(frozen=True)
class Plan:
    """A prepared step: what the engine installs after the base step. Dropping it is the cancel."""

    layout: Layout
    buffers: dict[int, Buffers]
    started: bool
    tuner: TunerState  # the state the update started from (moved to the layout's dtype and device)
    update: Update | None  # None: an idle step (lr = 0 before Mechanic started)


def prepare(groups: list[dict[str, Any]], layout: Layout, buffers: dict[int, Buffers], state: TunerState,
            started: bool, options: Options, hyper: Resolved, fns: Kernels, beta: Tensor) -> Plan:
    """The plan of a step over ``layout`` (``buffers`` carried to it), from tuner ``state``; ``groups``
    are the base optimizer's param groups, ``beta`` the betas in the layout's dtype and device."""
    plan = begin(groups, layout, buffers, state, started, options, hyper)
    if not plan.started or not layout.slots:
        return plan
    mode, buffers, state = hyper.mode, plan.buffers, plan.tuner
    xs, bufs = views(layout, buffers)
    ds, transient = mode.direction(xs, bufs)
    w = distance.weights(groups, layout, state) if hyper.distance_floor else None
    part = distance.partial(w, layout, bufs) if w is not None else None
    sums = layout.reducer.all_reduce_sum(distance.packed(local_sums(layout, xs, ds, fns), part, state.lr_ref.shape))
    new, h, ok = tuner.update(state, sums[..., :4], hyper, beta)
    if w is not None:
        new, ok = distance.apply(state, new, ok, sums, w, mode)
    skip_base = options.skip_nonfinite and not bool(ok)  # the one host sync, by request
    if not skip_base:
        transient = mode.snapshot(xs, transient)
    return Plan(layout, buffers, True, state, Update(new, state.scale, ok, transient, skip_base, stats(sums, h),
                                                     part.cands if part is not None else None))


def begin(groups: list[dict[str, Any]], layout: Layout, buffers: dict[int, Buffers], state: TunerState,
          started: bool, options: Options, hyper: Resolved) -> Plan:
    """A step's first half, before any sum: the tuner state on the layout's dtype and device, and Mechanic's
    start (its buffers made from the parameters as they are, the invariant form's unit recorded). Its plan
    has no update yet; it stays an idle step unless it has started and there are parameters to sum over."""
    state = state.to(layout.dtype, layout.device)
    if state.lr_ref.numel() != len(layout.tuners):  # per_group=True, and the groups changed
        if started:
            raise RuntimeError(
                f"per_group=True keeps one tuner per param group, and the optimizer now has {layout.num_groups} "
                f"groups where Mechanic started with {state.s.shape[0]}; add param groups before the first "
                "step, or rebuild the optimizer and Mechanic")
        state = TunerState.fresh(hyper, layout.dtype, layout.device, len(layout.tuners))
    if not layout.slots:  # every parameter is frozen
        return Plan(layout, {}, started, state, None)
    mode = hyper.mode
    if not started:
        # Mechanic starts at the first step with a non-zero learning rate. Before it, the
        # base update is zero, so starting later leaves the trajectory as it is; and
        # torch's lazy state initialisation (a step at lr=0 with zero gradients, used by
        # torch.distributed.checkpoint) then creates the buffers but moves nothing.
        buffers = {s.index: mode.new_buffers(s.param, options.fp32_reference) for s in layout.slots}
        if all_lr_zero(groups):
            return Plan(layout, buffers, False, state, None)
        started = True
        if hyper.variant == "invariant":
            lr_ref = lr_refs(groups) if hyper.per_group else lr_unit(groups)
            state = replace(state, lr_ref=torch.tensor(lr_ref, dtype=layout.dtype, device=layout.device))
    return Plan(layout, buffers, started, state, None)


def stats(sums: Tensor, h: Tensor) -> dict[str, Tensor]:
    """A step's statistics for stats(), from its reduced sums (float64) and the tuner's h, in h's dtype."""
    norms = sums[..., [tuner.G_SQ, tuner.X_SQ]].sqrt().to(h.dtype)
    return {"h": h, "grad_norm": norms[..., 0], "param_norm": norms[..., 1]}


def views(layout: Layout, buffers: dict[int, Buffers]) -> tuple[list[Tensor], list[Buffers]]:
    """Per slot, the part of its parameter and of its buffers this rank holds."""
    return ([local(s.ref()) for s in layout.slots],  # type: ignore[arg-type]
            [{k: local(t) for k, t in buffers[s.index].items()} for s in layout.slots])


def local_sums(layout: Layout, xs: list[Tensor], ds: list[Tensor], fns: Kernels) -> Tensor:
    """This rank's partial sums (G_DOT_D, X_DOT_D, G_SQ, X_SQ) per tuner, shape (tuners, 4), in float64
    (tuner.WIDE: what the one all-reduce sends), over the slots with their local ``xs`` and directions
    ``ds`` (a replicated parameter counts on one rank)."""
    return torch.stack([_sums([(layout.slots[k], xs[k], ds[k]) for k in ks], layout, fns) for ks in layout.tuners])


def _sums(parts: list[tuple[Slot, Tensor, Tensor]], layout: Layout, fns: Kernels) -> Tensor:
    gs, gds, negate, xs, xds = [], [], [], [], []
    for s, x, d in parts:
        if not s.counted:
            continue
        xs.append(x)
        xds.append(d)
        g = s.ref().grad  # type: ignore[union-attr]
        if g is None:
            continue
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError("Mechanic does not support sparse gradients; use a dense gradient "
                               "(e.g. nn.Embedding(sparse=False))")
        gs.append(local(g))
        gds.append(d)
        negate.append(s.negate)
    return fns.partial_sums(gs, gds, negate, xs, xds, tuner.WIDE, layout.device)


@torch.no_grad()
def rebase(plan: Plan, mode: StateMode, eps: float, fns: Kernels) -> None:
    """After the base step: each tuner's parameters to its new scale, by the state mode's rebase."""
    u = plan.update
    assert u is not None
    S_new, eps_t = u.tuner.scale, eps / u.tuner.lr_ref
    xs, bufs = views(plan.layout, plan.buffers)
    if u.acc is not None:
        distance.commit(u.acc, bufs, u.ok)
    for g, ks in enumerate(plan.layout.tuners):
        if ks:
            saved = [u.transient[k] for k in ks] if u.transient is not None else None
            mode.rebase(fns, [xs[k] for k in ks], [bufs[k] for k in ks], saved, of_group(u.S_old, g),
                        of_group(S_new, g), u.ok, of_group(eps_t, g))


# ------------------------------------------------------------------ when Mechanic starts, in which unit
def _under(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in groups if g.get("mechanic", True)]


def all_lr_zero(groups: list[dict[str, Any]]) -> bool:
    return all(isinstance(g.get("lr"), (int, float)) and g.get("lr") == 0 for g in _under(groups))


def max_lr(groups: list[dict[str, Any]]) -> float:
    return max(float(g.get("initial_lr", g["lr"])) for g in _under(groups))


def lr_unit(groups: list[dict[str, Any]]) -> float:
    """The invariant form's unit: the largest base learning rate of Mechanic's groups, before any
    schedule (torch's LR schedulers keep it as ``initial_lr``)."""
    lr = max_lr(groups)
    if not (0 < lr < float("inf")):
        raise ValueError(f"Mechanic's invariant variant measures its scale in units of the base learning rate, "
                         f"but the largest lr of its param groups is {lr!r}; give the groups a finite positive "
                         "lr, or pass variant='original'")
    return lr


def lr_refs(groups: list[dict[str, Any]]) -> list[float]:
    """per_group=True: each group's tuner in units of that group's own base learning rate (a group
    without a finite positive one, which never moves, takes the largest)."""
    largest, out = lr_unit(groups), []
    for g in groups:
        lr = float(g.get("initial_lr", g["lr"]))
        out.append(lr if 0 < lr < float("inf") and g.get("mechanic", True) else largest)
    return out


def check_ranks(groups: list[dict[str, Any]], layout: Layout, options: Options, hyper: Resolved) -> None:
    """Every rank must build Mechanic alike (one collective, at the first step; see reduce.check_config)."""
    o, h = options, hyper
    check_config({**{f.name: getattr(h, f.name) for f in fields(h)}, "store_delta": h.store_delta,
                  # the invariant form's unit: ranks (e.g. pipeline stages) with different lrs would
                  # tune in different units
                  "lr_ref": max_lr(groups) if h.variant == "invariant" else None,
                  "reducer": type(layout.reducer).__name__,
                  "num_groups": layout.num_groups if h.per_group else None,
                  # pipeline stages (an explicit group) hold different parameters
                  "num_params": len(layout.slots) if o.process_group is None and o.reducer is None else None},
                 group=o.process_group, params=layout.params if o.reducer is None else None,
                 reduces=not isinstance(layout.reducer, NoReduce))
