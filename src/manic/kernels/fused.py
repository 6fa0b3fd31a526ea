"""The fusable kernels: the per-tensor bodies (bodies.py) driven one tensor at a time over flat 1-D views,
so that ``torch.compile`` (``compile=True``) fuses each into one pass shared by every tensor through dynamic
shapes. Uncompiled they are the reference the compiled forms are tested against. A tensor with a
non-contiguous part has no flat view and takes the eager kernel."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import bodies
from .eager import partial_sums_eager


def _flat(*ts: Tensor) -> list[Tensor] | None:
    """Flat 1-D views of the tensors, or None if one of them is not contiguous."""
    return [t.view(-1) for t in ts] if all(t.is_contiguous() for t in ts) else None


def partial_sums_fusable(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor],
                         xds: list[Tensor], dtype: torch.dtype, device: torch.device,
                         one: Callable = bodies.sums_gx, xonly: Callable = bodies.sums_x,
                         gonly: Callable = bodies.sums_g) -> Tensor:
    """``partial_sums_eager``'s sums, one tensor at a time through ``one`` (g and x of a tensor in one pass),
    ``xonly`` (no gradient) or ``gonly`` (x not asked for), on flat 1-D views."""
    at = {id(d): i for i, d in enumerate(xds)}  # a tensor's direction is its own
    parts, paired = [], set()
    eager: tuple[list, list, list, list, list] = ([], [], [], [], [])  # gs, gds, negate, xs, xds
    for g, d, neg in zip(gs, gds, negate):
        i = at.get(id(d))
        if i is not None:
            paired.add(i)
        ts = _flat(g, d) if i is None else _flat(g, d, xs[i])
        if ts is None:
            for lst, v in zip(eager, (g, d, neg)):
                lst.append(v)
            if i is not None:
                eager[3].append(xs[i])
                eager[4].append(d)
            continue
        part = gonly(*ts, dtype) if i is None else one(*ts, dtype)
        parts.append(torch.cat([-part[:1], part[1:]]) if neg else part)
    for i, (x, d) in enumerate(zip(xs, xds)):
        if i not in paired:
            ts = _flat(x, d)
            if ts is None:
                eager[3].append(x)
                eager[4].append(d)
            else:
                parts.append(xonly(*ts, dtype))
    if eager[0] or eager[3]:
        parts.append(partial_sums_eager(*eager, dtype, device))
    if not parts:
        return torch.zeros(4, dtype=dtype, device=device)
    return torch.stack(parts).sum(0)


def _each(one: Callable, eager: Callable, xs: list[Tensor], ys: list[Tensor], zs: list[Tensor],
          *args: object) -> None:
    """``one`` per tensor triple, on flat 1-D views (a compiled ``one`` is then shared by every shape);
    ``eager`` for a triple with a non-contiguous tensor, which has no such view."""
    for x, y, z in zip(xs, ys, zs):
        flat = _flat(x, y, z)
        if flat is None:
            eager(x, y, z, *args)
        else:
            one(*flat, *args)


def rebase_fusable(xs: list[Tensor], refs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                   ok: Tensor, one: Callable = bodies.rebase_one) -> None:
    _each(one, bodies.rebase_one, xs, refs, ds, S_old, S_new, ok)


def rebase_recompute_fusable(xs: list[Tensor], refs: list[Tensor], diffs: list[Tensor], S_old: Tensor,
                             S_new: Tensor, ok: Tensor, eps: Tensor | float,
                             one: Callable = bodies.recompute_one) -> None:
    _each(one, bodies.recompute_one, xs, refs, diffs, S_old, S_new, ok, eps)


def rebase_delta_fusable(xs: list[Tensor], prevs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                         ok: Tensor, one: Callable = bodies.rebase_delta_one) -> None:
    _each(one, bodies.rebase_delta_one, xs, prevs, ds, S_old, S_new, ok)
