"""The distance floor (``distance_floor=True``; docs/algorithm.md, "The distance floor").

A Prodigy-style estimate of how far the parameters should go, kept as a floor under the scale. Per tuner,
with S' = sum(s) before the step (the effective lr the parameters sit at) and lr_t its groups' largest lr now:

    w_t     = S' * lr_t / lr_ref
    N_t     = N_{t-1} + w_t * <g_t, x_ref - x_t>     (from the sum <g, D> the tuner reduces anyway)
    A_t     = A_{t-1} + w_t * g_t                    (a buffer per parameter, ``modes.ACC``)
    floor_t = max(floor_{t-1}, N_t / ||A_t||_1)      (where ||A_t||_1 > 0)

and after the tuner's update, s is scaled by floor_t / sum(s) where sum(s) < floor_t (the bets are the applied
ones). ``||A_t||_1`` is a fifth partial sum per tuner, packed into the step's one all-reduce. A step whose sums
(or N, the floor, s) are not finite leaves N, the floor and A as they were, like the rest of the tuner.
Everything stays on the device: no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .compat import local
from .modes import ACC, Buffers, StateMode
from . import tuner
from .tuner import G_DOT_D, TunerState, of_group

if TYPE_CHECKING:
    from .layout import Layout

L1 = 4  # the packed sums' fifth column: ||A_t||_1
WIDE = tuner.WIDE  # N, the floor, w and the L1 norm (float64)


@dataclass(frozen=True)
class Partial:
    """This rank's part of a step, before the all-reduce: per slot the new A (None: no gradient, A stays),
    per tuner the L1 norm of the new A over the slots this rank counts."""

    cands: list[Tensor | None]
    l1: Tensor  # (tuners,), WIDE


def weights(groups: list[dict[str, Any]], layout: Layout, state: TunerState) -> Tensor:
    """w_t = S' * lr_t / lr_ref per tuner (shaped like ``state.lr_ref``), lr_t the largest current lr of the
    tuner's groups (with one schedule factor on every group: that factor times lr_ref)."""
    S, lr_ref = state.s.sum(-1).to(WIDE), state.lr_ref.to(WIDE)
    out = []
    for t, ks in enumerate(layout.tuners):
        unit = of_group(lr_ref, t)
        lrs = [groups[i]["lr"] for i in sorted({layout.slots[k].place[0] for k in ks})]
        if all(isinstance(v, (int, float)) for v in lrs):  # (a fill, not a copy from the host)
            lr = torch.full_like(unit, max(lrs, default=0.0))
        else:  # a tensor lr
            lr = torch.stack([torch.as_tensor(v, dtype=WIDE, device=unit.device) for v in lrs]).max()
        out.append(of_group(S, t) * (lr / unit))
    return torch.stack(out).reshape(state.lr_ref.shape)


def partial(w: Tensor, layout: Layout, bufs: list[Buffers]) -> Partial:
    """A_{t-1} + w_t * g_t per slot of ``layout`` (``bufs``: local views; a maximised group's g counts as -g,
    as in <g, D>), and its L1 norm per tuner over the counted slots (a replicated parameter counts once)."""
    cands: list[Tensor | None] = [None] * len(layout.slots)
    l1 = []
    for t, ks in enumerate(layout.tuners):
        wt, parts = of_group(w, t), []
        for k in ks:
            slot, a = layout.slots[k], bufs[k][ACC]
            g = slot.ref().grad  # type: ignore[union-attr]
            if g is not None:
                a = cands[k] = torch.addcmul(a, local(g), (-wt if slot.negate else wt).to(a.dtype))
            if slot.counted:
                parts.append(torch.linalg.vector_norm(a, 1, dtype=WIDE))
        l1.append(torch.stack(parts).sum() if parts else w.new_zeros(()))
    return Partial(cands, torch.stack(l1))


def packed(sums: Tensor, part: Partial | None, lead: tuple[int, ...]) -> Tensor:
    """The tensor the step all-reduces: the tuners' partial sums (tuners, 4), with ||A||_1 as a fifth column
    when the floor is on; shaped ``(*lead, 4 or 5)``."""
    if part is not None:
        sums = torch.cat([sums, part.l1.to(sums.dtype).unsqueeze(-1)], -1)
    return sums.reshape(*lead, sums.shape[-1])


def apply(old: TunerState, new: TunerState, ok: Tensor, sums: Tensor, w: Tensor, mode: StateMode
          ) -> tuple[TunerState, Tensor]:
    """The floor's update after the tuner's (``new``, ``ok`` from ``tuner.update(old, ...)``) from the reduced
    ``sums``: N and the floor, s scaled up to the floor; (the state, ok), with everything kept as in ``old``
    where the sums, N, the floor or s are not finite."""
    assert old.dist_num is not None and old.dist_floor is not None
    S = old.s.sum(-1).to(WIDE)
    gd, l1 = sums[..., G_DOT_D].to(WIDE), sums[..., L1].to(WIDE)
    num = old.dist_num + w * -mode.displaced(gd, S, old.lr_ref.to(WIDE))  # <g, x_ref - x> = -<g, x - x_ref>
    floor = torch.where(l1 > 0, torch.maximum(old.dist_floor, num / l1), old.dist_floor)
    bet = new.s.sum(-1).to(WIDE)
    s = torch.where((bet < floor).unsqueeze(-1), new.s * (floor / bet).to(new.s.dtype).unsqueeze(-1), new.s)
    ok = ok & torch.stack([torch.isfinite(t).all() for t in (sums, num, floor, s)]).all()
    return _kept(ok, replace(new, s=s, dist_num=num, dist_floor=floor), old), ok


def _kept(ok: Tensor, new: TunerState, old: TunerState) -> TunerState:
    """``new`` where ``ok``, else ``old``, with the step counted as taken or skipped."""
    out: dict[str, Tensor | None] = {}
    for f in fields(TunerState):
        a, b = getattr(new, f.name), getattr(old, f.name)
        out[f.name] = a if a is None or f.name in ("step", "skipped") else torch.where(ok, a, b)
    out["step"], out["skipped"] = old.step + ok.to(torch.int64), old.skipped + (~ok).to(torch.int64)
    return TunerState(**out)  # type: ignore[arg-type]


def commit(cands: list[Tensor | None], bufs: list[Buffers], ok: Tensor) -> None:
    """After the base step: A_t = A_{t-1} + w_t * g_t where the step's sums were finite (``ok``), else as it was."""
    for cand, b in zip(cands, bufs):
        if cand is not None:
            torch.where(ok, cand, b[ACC], out=b[ACC])
