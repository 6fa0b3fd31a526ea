"""Which tensors Mechanic works on, read from the base optimizer's ``param_groups``.

Frameworks replace an optimizer's parameters after it is built (accelerate and HF Trainer
with FSDP2 swap in the sharded DTensors; DeepSpeed swaps in flat partitions), so the layout is
read when Mechanic first steps or loads a checkpoint, and read again whenever the groups
change. A parameter is under Mechanic when its group does not say ``"mechanic": False`` and
it requires grad. The layout holds the parameters through weak references: a tensor the
optimizer dropped is never kept alive by Mechanic. Parameters are always in tuners: one tuner over
all of them, or one per param group with per_group=True (``Layout.tuners``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .compat import is_dtensor, local
from .modes import Buffers
from .reduce import NoReduce, Reducer, detect


def _signature(p: Tensor) -> tuple:
    """What must agree for Mechanic's buffers to move from one tensor to its replacement."""
    placement = None
    if is_dtensor(p):
        mesh = p.device_mesh
        placement = (tuple(map(str, p.placements)), tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names)
    return tuple(p.shape), tuple(local(p).shape), p.dtype, local(p).device, placement


def _describe(sig: tuple) -> dict[str, Any]:
    shape, local_shape, dtype, device, placement = sig
    return {"shape": shape, "local shape": local_shape, "dtype": dtype, "device": device,
            "placement": placement[0] if placement else "plain tensor", "mesh": placement[1:] if placement else None}


@dataclass(frozen=True)
class Slot:
    """One parameter under Mechanic."""

    index: int  # its position over all param groups, as in the optimizer's state dict
    ref: weakref.ref
    negate: bool  # its group maximizes: its gradient counts as -g
    counted: bool  # this rank adds it to the sums (a replicated parameter counts once)
    signature: tuple
    place: tuple[int, int] = (0, 0)  # (its param group, its position in the group's list)

    @property
    def param(self) -> Tensor | None:
        return self.ref()


@dataclass(frozen=True)
class Layout:
    """The parameters under Mechanic, the reducer for their sums, and the tuner's dtype and device."""

    slots: tuple[Slot, ...]
    seen: tuple[tuple[weakref.ref, bool, bool, torch.dtype, torch.Size], ...]  # every parameter: (ref, under,
    # negate, dtype, shape); a shape changed through ``.data`` rebinds, and carry() names it
    reducer: Reducer
    dtype: torch.dtype
    device: torch.device
    num_groups: int = 1  # len(optimizer.param_groups)
    tuners: tuple[tuple[int, ...], ...] = ((),)  # per tuner, the positions in ``slots`` of its parameters

    @property
    def params(self) -> list[Tensor]:
        return [s.ref() for s in self.slots]  # type: ignore[misc]

    def matches(self, optimizer: torch.optim.Optimizer) -> bool:
        """True while ``optimizer.param_groups`` still hold exactly these parameters (cheap: no allocation)."""
        seen, k = self.seen, 0
        if len(optimizer.param_groups) != self.num_groups:
            return False
        for group in optimizer.param_groups:
            on, negate = group.get("mechanic", True), bool(group.get("maximize", False))
            for p in group["params"]:
                if k == len(seen):
                    return False
                ref, under, neg, dtype, shape = seen[k]
                if (ref() is not p or p.dtype != dtype or (on and p.requires_grad) != under or (under and negate != neg)
                        or p.shape != shape):
                    return False
                k += 1
        return k == len(seen)


def check_disjoint(optimizer: torch.optim.Optimizer) -> None:
    """``_check_disjoint`` over the parameters Mechanic would take, as the optimizer holds them now."""
    every = [(g.get("mechanic", True) and p.requires_grad, p) for g in optimizer.param_groups for p in g["params"]]
    _check_disjoint([(i, local(p)) for i, (under, p) in enumerate(every) if under])


def _check_disjoint(params: list[tuple[int, Tensor]]) -> None:
    """Raise if two parameters share memory (weights tied through ``.data``): the rebase would move that memory
    once per parameter. Views of one buffer that do not overlap (a flat buffer cut into parameters) are fine."""
    spans: dict[int, list[tuple[int, int, int]]] = {}
    for i, t in params:
        if t.numel() == 0 or t.device.type == "meta":
            continue
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))  # elements the view spans
        start = t.storage_offset() * t.element_size()
        spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + extent * t.element_size(), i))
    for found in spans.values():
        found.sort()
        for (_, end, i), (begin, _, j) in zip(found, found[1:]):
            if begin < end:
                raise ValueError(
                    f"Parameters {i} and {j} share memory (weights tied by assigning .data, e.g. "
                    "b.weight.data = a.weight.data): Mechanic would move that memory once for each of them. "
                    "Tie them as one Parameter (b.weight = a.weight), so that the optimizer holds it once")


def bind(optimizer: torch.optim.Optimizer, reducer: Reducer | None, process_group: Any, device_mesh: Any,
         per_group: bool = False) -> Layout:
    """Read the layout from ``optimizer.param_groups`` now; raise if Mechanic cannot work on it.
    ``per_group``: a tuner per param group, else one over every parameter."""
    seen, entries = [], []
    for gi, group in enumerate(optimizer.param_groups):
        on, negate = group.get("mechanic", True), bool(group.get("maximize", False))
        first = len(seen)
        for p in group["params"]:
            under = bool(on and p.requires_grad)
            if under:
                entries.append((len(seen), p, negate, (gi, len(seen) - first)))
            seen.append((weakref.ref(p), under, negate, p.dtype, p.shape))
    check_unique(optimizer)
    if not any(g.get("mechanic", True) and g["params"] for g in optimizer.param_groups):
        raise ValueError("The optimizer has no parameters under Mechanic: every param group says 'mechanic': "
                         "False (or has no parameters); let at least one group take part")
    for i, p, _, _ in entries:
        if p.is_complex():
            raise TypeError(f"Parameter {i} is complex ({p.dtype}); Mechanic supports real floating-point "
                            "parameters only (view it as real with torch.view_as_real)")
        if not p.is_floating_point():
            raise TypeError(f"Parameter {i} has dtype {p.dtype}; Mechanic needs floating-point parameters")
    _check_disjoint([(i, local(p)) for i, p, _, _ in entries])
    devices = {local(p).device for _, p, _, _ in entries}
    if len(devices) > 1:
        raise ValueError(f"Parameters under Mechanic live on several devices {sorted(map(str, devices))}; "
                         "Mechanic needs them on one device (use one optimizer per device)")
    params = [p for _, p, _, _ in entries]
    num_groups = len(optimizer.param_groups)
    by_tuner = [place[0] if per_group else 0 for _, _, _, place in entries]
    tuners = tuple(tuple(k for k, t in enumerate(by_tuner) if t == i) for i in range(num_groups if per_group else 1))
    if not params:  # every parameter is frozen: Mechanic idles until one is not
        on = [p for g in optimizer.param_groups if g.get("mechanic", True) for p in g["params"]]
        return Layout((), tuple(seen), NoReduce(), _tuner_dtype(on), local(on[0]).device, num_groups, tuners)
    if reducer is not None:
        counted = [True] * len(params)
    else:
        reducer, counted = detect(params, process_group, device_mesh)
    slots = tuple(Slot(i, weakref.ref(p), neg, c, _signature(p), place) for (i, p, neg, place), c in zip(entries, counted))
    return Layout(slots, tuple(seen), reducer, _tuner_dtype(params), devices.pop(), num_groups, tuners)


def _tuner_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def check_unique(optimizer: torch.optim.Optimizer) -> None:
    """Raise if a tensor appears more than once in ``optimizer.param_groups`` (torch only warns):
    Mechanic would keep two references and two Deltas for one tensor, and ``x = x_ref + S * Delta``
    could not hold for both."""
    first: dict[int, int] = {}
    k = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in first:
                raise ValueError(f"Parameters {first[id(p)]} and {k} of the optimizer are the same tensor: it "
                                 "appears more than once in param_groups (torch only warns). Mechanic keeps one "
                                 "reference and one Delta per tensor; list each parameter once")
            first[id(p)] = k
            k += 1


def carry(old: Layout, new: Layout, buffers: dict[int, Buffers], join: Callable[[Tensor], Buffers] | None,
          place: Callable[[Tensor, Buffers], Buffers]) -> dict[int, Buffers]:
    """The buffers for ``new``, moved over from ``old``: identity first, position only for a stranger.

    A tensor Mechanic already holds keeps its own buffers wherever it moved (a reordering, a group
    inserted in front), re-placed with ``place`` if its dtype or device changed (``model.double()``).
    A tensor Mechanic never saw takes over the buffers of its position's previous tensor when that one
    is gone from the optimizer: a framework's replacement (accelerate, DeepSpeed), which must match it
    in shape, dtype, device and placement. Any other parameter new under Mechanic (added, unfrozen)
    gets ``join(p)`` (``None``: no buffers yet); one that left (frozen) loses its buffers. A parameter
    whose buffers have nowhere to go raises, naming it.
    """
    mine = {id(s.ref()): s for s in old.slots if s.index in buffers and s.ref() is not None}
    present = {id(r()) for r, *_ in new.seen if r() is not None}
    before = {s.index: s for s in old.slots}
    out: dict[int, Buffers] = {}
    used: set[int] = set()
    for s in new.slots:
        o = mine.get(id(s.ref()))
        if o is None:
            continue
        if o.signature[:2] != s.signature[:2] or o.signature[4] != s.signature[4]:
            _replaced(s.index, o.signature, s.signature, "changed shape or placement")
        out[s.index] = buffers[o.index] if o.signature == s.signature else place(s.ref(), buffers[o.index])
        used.add(o.index)
    # a group's counterpart before: the old group its known tensors came from (a group inserted in front
    # shifts the positions, not the groups' lists); else the group at the same index
    counterpart: dict[int, int] = {}
    for s in new.slots:
        o = mine.get(id(s.ref()))
        if o is not None:
            counterpart.setdefault(s.place[0], o.place[0])
    at = {o.place: o for o in old.slots}
    for s in new.slots:
        if s.index in out:
            continue
        o = at.get((counterpart.get(s.place[0], s.place[0]), s.place[1])) if counterpart else before.get(s.index)
        if o is not None and o.index in buffers and o.index not in used and id(o.ref()) not in present:
            if o.signature != s.signature:
                _replaced(s.index, o.signature, s.signature, "was replaced by a tensor that does not match it")
            out[s.index] = buffers[o.index]
            used.add(o.index)
        elif join is not None:
            out[s.index] = join(s.ref())  # type: ignore[arg-type]
    gone = sorted(o.index for o in old.slots
                  if o.index in buffers and o.index not in used and id(o.ref()) not in present)
    if gone:
        raise RuntimeError(
            f"The base optimizer holds {len(new.seen)} parameters, {len(old.seen)} at Mechanic's last step: "
            f"parameter {gone[0]} is gone, so Mechanic's state for it has nowhere to go. Remove parameters by "
            "freezing them (requires_grad=False) or rebuild the optimizer and Mechanic")
    return out


def _replaced(index: int, was_sig: tuple, now_sig: tuple, what: str) -> None:
    was, now = _describe(was_sig), _describe(now_sig)
    changed = "; ".join(f"{k} {was[k]} -> {now[k]}" for k in was if was[k] != now[k])
    raise RuntimeError(
        f"Parameter {index} of the base optimizer {what} after Mechanic's first step ({changed}), so Mechanic "
        "cannot carry its state over. Replace parameters before the first step (e.g. build or prepare the "
        "optimizer after sharding), or with tensors of the same shape, dtype, device and placement")
