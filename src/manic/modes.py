"""The state modes: what Mechanic keeps per parameter, one small class each (docs/algorithm.md).

A mode owns its buffers (their names in ``optimizer.state[p]`` and their dtypes), the direction D its
sums are taken over, the transient it keeps from before the base step, its rebase (the eager or the
fused kernel, from the kernel set the step runs with) and the unit of the tuner's h. Whatever the mode,
a skipped step (sums not finite: ``ok`` false) drops the base step's move u; what that restores is said
per mode. ``MODES`` maps each ``state=`` name to its mode.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .compat import foreach_sub

if TYPE_CHECKING:
    from .kernels import Kernels

REF, DELTA = "mechanic_ref", "mechanic_delta"
ACC = "mechanic_dist_acc"  # distance_floor=True: the weighted sum of gradients A (distance.py), Delta's dtype
Buffers = dict[str, Tensor]  # a parameter's buffers, keyed as in optimizer.state[p]


def delta_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Delta is float32 for 16-bit parameters, so it holds the direction exactly."""
    return torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype


def ref_dtype(param_dtype: torch.dtype, fp32_reference: bool) -> torch.dtype:
    """x_ref has the parameter's dtype, or Delta's with fp32_reference=True."""
    return delta_dtype(param_dtype) if fp32_reference else param_dtype


class StateMode:
    """What one state mode keeps per parameter and how it steps. Lists are per tensor, local shards."""

    name: str
    keys: tuple[str, ...]  # its buffers, in the order they are made
    adopts_edits = False  # an edit between steps must be moved into x_ref (edits.py), else the rebase scales it

    @property
    def keeps_delta(self) -> bool:
        """Delta is a buffer (``store_delta`` in the older spelling and in the checkpoint format)."""
        return DELTA in self.keys

    def new_buffers(self, p: Tensor, fp32_reference: bool) -> Buffers:
        """The buffers of a parameter that comes under Mechanic now: x_ref = x, Delta = 0."""
        out = {}
        with torch.no_grad():
            if REF in self.keys:
                out[REF] = p.detach().to(ref_dtype(p.dtype, fp32_reference), copy=True)
            if DELTA in self.keys:
                out[DELTA] = torch.zeros_like(p, dtype=delta_dtype(p.dtype))
            if ACC in self.keys:
                out[ACC] = torch.zeros_like(p, dtype=delta_dtype(p.dtype))
        return out

    def placed(self, p: Tensor, key: str, value: Tensor, fp32_reference: bool) -> Tensor:
        """A loaded buffer, copied to the parameter's device in the dtype this mode keeps it in."""
        dtype = ref_dtype(p.dtype, fp32_reference) if key == REF else delta_dtype(p.dtype)
        return value.detach().to(device=p.device, dtype=dtype, copy=True)

    def direction(self, xs: list[Tensor], bufs: list[Buffers]) -> tuple[list[Tensor], list[Tensor] | None]:
        """D per tensor for the sums, and the transient that D is (None: D is a buffer)."""
        return [b[DELTA] for b in bufs], None

    def snapshot(self, xs: list[Tensor], transient: list[Tensor] | None) -> list[Tensor] | None:
        """What the rebase needs from before the base step (taken only when the base step runs)."""
        return transient

    def rebase(self, fns: Kernels, xs: list[Tensor], bufs: list[Buffers], saved: list[Tensor] | None,
               S_old: Tensor, S_new: Tensor, ok: Tensor, eps: Tensor) -> None:
        """After the base step (xs hold x_after): update the buffers and move x to the new scale."""
        raise NotImplementedError

    def unit(self, S: Tensor, lr_ref: Tensor, eps: float) -> Tensor:
        """What the tuner divides h by to take it in the units of its scales (docs/algorithm.md)."""
        return lr_ref  # D = Delta / lr_ref

    def displaced(self, dot: Tensor, S: Tensor, lr_ref: Tensor) -> Tensor:
        """<a, x - x_ref> from the sum <a, D> over this mode's direction, S = sum(s) before the step."""
        return S * dot / lr_ref  # x - x_ref = (S / lr_ref) * Delta

    def accumulating(self) -> StateMode:
        """This mode with the distance floor's buffer A as well (``ACC``)."""
        mode = copy.copy(self)
        mode.keys = (*self.keys, ACC)
        return mode

    def __repr__(self) -> str:
        return f"<state mode {self.name!r}>"


class RefDelta(StateMode):
    """x_ref and Delta (2x the parameters' bytes): Delta += u, x = x_ref + S_new * Delta.
    A skipped step restores x = x_ref + S_new * Delta_t (Delta unchanged)."""

    name, keys = "ref+delta", (REF, DELTA)
    adopts_edits = True

    def rebase(self, fns: Kernels, xs: list[Tensor], bufs: list[Buffers], saved: list[Tensor] | None,
               S_old: Tensor, S_new: Tensor, ok: Tensor, eps: Tensor) -> None:
        fns.rebase(xs, [b[REF] for b in bufs], [b[DELTA] for b in bufs], S_old, S_new, ok)


class Ref(StateMode):
    """x_ref only (1x): D = x_t - x_ref, recomputed each step and kept as the step's transient;
    x = x_ref + S_new * (D / (S_old + eps) + u). A skipped step restores x = x_ref + S_new * D / (S_old + eps)."""

    name, keys = "ref", (REF,)

    def direction(self, xs: list[Tensor], bufs: list[Buffers]) -> tuple[list[Tensor], list[Tensor] | None]:
        diffs = foreach_sub(xs, [b[REF] for b in bufs])
        return diffs, diffs

    def rebase(self, fns: Kernels, xs: list[Tensor], bufs: list[Buffers], saved: list[Tensor] | None,
               S_old: Tensor, S_new: Tensor, ok: Tensor, eps: Tensor) -> None:
        fns.rebase_recompute(xs, [b[REF] for b in bufs], saved, S_old, S_new, ok, eps)

    def unit(self, S: Tensor, lr_ref: Tensor, eps: float) -> Tensor:
        return S + eps  # D = (x - x_ref) / (S + eps): no lr_ref, x - x_ref = S * D already

    def displaced(self, dot: Tensor, S: Tensor, lr_ref: Tensor) -> Tensor:
        return dot  # D = x - x_ref itself


class Delta(StateMode):
    """Delta only (1x; x_ref = x - S * Delta implied) and a transient copy of x_t per step:
    Delta += u, x = x_t + (S_new - S_old) * Delta_t + S_new * u. A skipped step restores
    x = x_t + (S_new - S_old) * Delta_t (Delta unchanged)."""

    name, keys = "delta", (DELTA,)

    def snapshot(self, xs: list[Tensor], transient: list[Tensor] | None) -> list[Tensor] | None:
        return [x.clone() for x in xs]  # x_t, to recover u = x_after - x_t

    def rebase(self, fns: Kernels, xs: list[Tensor], bufs: list[Buffers], saved: list[Tensor] | None,
               S_old: Tensor, S_new: Tensor, ok: Tensor, eps: Tensor) -> None:
        fns.rebase_delta(xs, saved, [b[DELTA] for b in bufs], S_old, S_new, ok)


MODES: dict[str, StateMode] = {m.name: m for m in (RefDelta(), Ref(), Delta())}
# the same modes with distance_floor=True (``Resolved.mode``)
ACCUMULATING: dict[str, StateMode] = {name: m.accumulating() for name, m in MODES.items()}
