"""Edits between steps: a parameter changed in place between two of Mechanic's steps (a layer
re-initialised, a checkpoint's weights loaded into the model, a pruning mask or a clamp applied under
``torch.no_grad()``).

torch counts the in-place changes of every tensor (``t._version``, read on the host: no sync). The engine
records each parameter's count when it has written the parameters (``record``); at the next step a
parameter whose count moved, or that is another tensor now, was edited (``edited``).

Under ``state="ref+delta"`` the parameters are ``x = x_ref + S * Delta``: the next rebase would take an
edit for part of the base step and multiply it by the scale. ``adopt`` lets the edit move the reference
instead, ``x_ref = x - S * Delta``, where ``x`` differs from what the rebase wrote (elementwise: an element
left alone keeps its ``x_ref`` bit for bit). That is what ``state="delta"`` does by construction (``x_ref``
is implied there); ``state="ref"`` takes an edit into its displacement ``x - x_ref``, which the next
rebase scales by ``S_new / S_old``. An edit through ``.data`` bypasses torch's counter and is not seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .compat import local
from .modes import DELTA, REF, Buffers
from .tuner import of_group

if TYPE_CHECKING:
    from .layout import Layout

Record = dict[int, int]  # id of a parameter -> the in-place change count of its local shard


def record(params: list[Tensor], xs: list[Tensor]) -> Record:
    """Each parameter's in-place change count (of its local shard ``xs``: a view shares its base's count),
    keyed by the parameter's identity (a DTensor's local view is a new object at each call; a parameter that
    moves to another position, or is frozen, is not an edit)."""
    return {id(p): x._version for p, x in zip(params, xs)}


def edited(params: list[Tensor], xs: list[Tensor], before: Record) -> list[int]:
    """The slots whose parameter changed in place since ``before`` was recorded, or was not there then (a
    tensor that took over a position's buffers; one new under Mechanic has x = x_ref and Delta = 0, so it
    checks out unchanged)."""
    return [k for k, (p, x) in enumerate(zip(params, xs)) if before.get(id(p)) != x._version]


@torch.no_grad()
def adopt(x: Tensor, ref: Tensor, delta: Tensor, S: Tensor) -> None:
    """``x_ref = x - S * Delta`` where ``x`` is not what the ref+delta rebase wrote (``x_ref + S * Delta``,
    in its arithmetic: Delta's dtype, then the parameter's)."""
    written = torch.addcmul(ref, delta, S).to(x.dtype)
    moved = torch.addcmul(x.to(delta.dtype), delta, -S).to(ref.dtype)
    ref.copy_(torch.where(written == x, ref, moved))


def adopt_edited(layout: Layout, buffers: dict[int, Buffers], before: Record, scale: Callable[[], Tensor]) -> None:
    """``adopt`` every parameter of ``layout`` edited since ``before`` (``scale()``: S per tuner, read only if
    one was edited). Nothing when the tuners no longer match the groups: the step names that change."""
    params = [s.ref() for s in layout.slots]
    xs = [local(p) for p in params]
    ks = [k for k in edited(params, xs, before) if layout.slots[k].index in buffers]
    if not ks:
        return
    S = scale()
    if S.dim() and S.shape[0] != len(layout.tuners):
        return
    tuner_of = {k: g for g, slots in enumerate(layout.tuners) for k in slots}
    for k in ks:
        b = buffers[layout.slots[k].index]
        adopt(xs[k], local(b[REF]), local(b[DELTA]), of_group(S, tuner_of[k]))
