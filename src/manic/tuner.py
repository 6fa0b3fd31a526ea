"""The Mechanic scale tuner: state and one update, in the notation of docs/algorithm.md.

Everything here works on a handful of small tensors (length ``n``) that live on the
parameters' device, so a step never waits for the device. Nothing here knows about
parameters, optimizers or process groups. The hyperparameters come as ``Resolved`` (built by
``options.Options.hyper``); a new variant is a name in ``VARIANTS``, its defaults in
``options.DEFAULTS`` and its branch in ``update``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .modes import ACCUMULATING, MODES, StateMode

# Layout of the packed tensor of global sums that one step reduces across ranks, with D the direction
# the state mode accumulates (modes.py: Delta, or x - x_ref in the recompute form, state="ref"):
G_DOT_D, X_DOT_D, G_SQ, X_SQ = range(4)
# The sums and the tuner's running quantities r, m, v are float64 whatever the parameters' dtype: a
# gradient of 1e20 has a squared norm beyond float32's range, and h of that size a v (the sum of h^2)
# beyond it (issue 28). s, lr_ref and what users read (the scale, the statistics) keep the tuner's dtype.
WIDE = torch.float64
RUNNING = ("r", "m", "v")

VARIANTS = ("invariant", "original")
# The invariant form's floor, as a fraction of its start (docs/algorithm.md, "The invariant form").
FLOOR = 1e-3


@dataclass(frozen=True)
class Resolved:
    """The resolved record: ``Options(...).hyper``, what the tuner, the state modes and the checkpoint
    format read. Every field is set (no defaults, no checks of its own: ``options.Options`` holds both)."""

    variant: str
    weight_decay: float
    eps: float
    s_init: float
    num_betas: int
    state: str  # the state mode's name (modes.MODES)
    per_group: bool
    distance_floor: bool  # distance.py

    @property
    def store_delta(self) -> bool:
        """Whether Delta is kept (the older spelling of the state mode, still in the checkpoint format)."""
        return self.mode.keeps_delta

    @property
    def mode(self) -> StateMode:
        return (ACCUMULATING if self.distance_floor else MODES)[self.state]


@dataclass
class TunerState:
    """The tuner's state: four length-n vectors and two counters.

    With per_group=True there is one tuner per param group: r, m, v, s have shape (groups, n) and
    lr_ref has shape (groups,), so that ``scale`` is one S per group. r: reward (stored unclamped), m: running max of |h|, v: running sum of squares of h,
    s: the per-beta scales, in units of 1 / lr_ref: their sum divided by lr_ref is the scale S of
    the base optimizer's accumulated updates. lr_ref is 1 in the original form; in the invariant
    form it is the base learning rate, recorded at the first step, so that sum(s) is an effective
    learning rate. step counts the steps taken, skipped the steps whose sums were not finite.
    """

    r: Tensor  # (n,) float64
    m: Tensor  # (n,) float64
    v: Tensor  # (n,) float64
    s: Tensor  # (n,) the tuner's dtype
    step: Tensor  # () int64
    skipped: Tensor  # () int64
    lr_ref: Tensor  # ()
    # distance_floor=True: the floor's numerator N and the floor (distance.py), float64, shaped like lr_ref
    dist_num: Tensor | None = None
    dist_floor: Tensor | None = None

    @property
    def scale(self) -> Tensor:
        """S, the factor on the base optimizer's accumulated updates (one per group with per_group=True)."""
        return self.s.sum(-1) / self.lr_ref

    @staticmethod
    def fresh(hyper: Resolved, dtype: torch.dtype, device: torch.device, groups: int = 1) -> "TunerState":
        """A new state; ``groups`` tuners (one per param group) if ``hyper.per_group``."""
        lead = (groups,) if hyper.per_group else ()
        shape = (*lead, hyper.num_betas)
        zeros = lambda: torch.zeros(shape, dtype=WIDE, device=device)  # noqa: E731
        count = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
        wide = lambda: (torch.zeros(lead, dtype=torch.float64, device=device)  # noqa: E731
                        if hyper.distance_floor else None)
        return TunerState(zeros(), zeros(), zeros(), torch.full(shape, hyper.s_init, dtype=dtype, device=device),
                          count(), count(), torch.ones(lead, dtype=dtype, device=device), wide(), wide())

    @staticmethod
    def keys() -> tuple[str, ...]:
        """The names of its tensors, in order (the checkpoint's ``mechanic_<name>`` entries)."""
        return tuple(f.name for f in fields(TunerState))

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.keys() if getattr(self, k) is not None}

    @staticmethod
    def of(tensors: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> "TunerState":
        """A copy of ``tensors`` (keyed like ``tensors()``) in ``dtype`` on ``device`` (the counters stay int64,
        r, m and v float64)."""
        def own(k: str) -> Tensor:
            want = torch.int64 if k in ("step", "skipped") else WIDE if k in RUNNING else dtype
            return tensors[k].detach().to(device=device, dtype=want, copy=True)
        lr_ref = own("lr_ref") if "lr_ref" in tensors else torch.ones((), dtype=dtype, device=device)
        wide = {k: tensors[k].detach().to(device=device, dtype=torch.float64, copy=True)
                for k in ("dist_num", "dist_floor") if k in tensors}
        return TunerState(own("r"), own("m"), own("v"), own("s"), own("step"), own("skipped"), lr_ref, **wide)

    def to(self, dtype: torch.dtype, device: torch.device) -> "TunerState":
        """This state if it already is in ``dtype`` on ``device``, else a moved copy."""
        if self.s.dtype == dtype and self.s.device == device:
            return self
        return TunerState.of(self.tensors(), dtype, device)

    def copy_(self, other: "TunerState") -> None:
        for name, t in self.tensors().items():
            t.copy_(getattr(other, name))


def betas(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """beta_i = 1 - 10**(-i), i = 1..n."""
    return torch.tensor([1.0 - 10.0 ** (-i) for i in range(1, n + 1)], dtype=dtype, device=device)


def of_group(t: Tensor, g: int) -> Tensor:
    """Tuner ``g``'s entry of ``t`` (a scale, an lr_ref): ``t[g]`` with one tuner per param group, else the
    one tuner's ``t`` itself (``g`` is then 0)."""
    return t[g] if t.dim() else t


def update(state: TunerState, sums: Tensor, hyper: Resolved, beta: Tensor) -> tuple[TunerState, Tensor, Tensor]:
    """One tuner update from the reduced global sums; returns (the new state, h, ok).

    ``sums`` holds <g, D>, <x, D>, ||g||^2, ||x||^2 (shape (4,), or (groups, 4) with one tuner per
    group: the groups' tuners are independent and share only ``ok``), where D is the state mode's direction:
    Delta, or x - x_ref (state "ref"), whose unit h is divided by here (``StateMode.unit``: lr_ref, or the
    S + eps of docs/algorithm.md, "One step").
    Everything is computed in the units of ``state.s`` (docs/algorithm.md, "The invariant form"):
    the direction is Delta / lr_ref, whose scale is sum(s); with lr_ref = 1 this is the original update.
    A step whose sums are not finite leaves the state as it was and counts as skipped;
    the choice is made on the device, so no host sync happens.
    """
    eps, lam = hyper.eps, hyper.weight_decay
    dtype = state.s.dtype
    wide = lambda t: t.to(WIDE)  # noqa: E731  (a no-op for a float64 tuner)
    S = wide(state.s).sum(-1)
    g_dot_d, x_dot_d, g_sq, x_sq = wide(sums).unbind(-1)
    gn, xn = g_sq.sqrt(), x_sq.sqrt()
    # h = <g + lam * S * |g| / (|x| + eps) * x, D>
    h = g_dot_d + lam * S * gn / (xn + eps) * x_dot_d
    h = h / wide(hyper.mode.unit(S, wide(state.lr_ref), eps))
    hb = h.unsqueeze(-1)  # broadcast over the betas
    floor = hyper.s_init
    r_old = state.r
    if hyper.variant == "invariant":
        floor = hyper.s_init * FLOOR
        # the start is wealth, s_init / n per beta in units of the first non-zero |h|, which bad bets can lose
        first = (state.v == 0) & (hb != 0)
        r_old = torch.where(first, hyper.s_init / hyper.num_betas * hb.abs(), r_old)

    beta = wide(beta)
    hc = torch.minimum(torch.maximum(hb, -state.m), state.m)  # clip with the OLD m
    m = torch.maximum(beta * state.m, hb.abs() + eps)
    v = beta * beta * state.v + hb * hb
    r = beta * r_old - hc * wide(state.s)
    s = ((floor / hyper.num_betas * m + r.clamp(min=0)) / (v.sqrt() + eps)).to(dtype)

    ok = torch.isfinite(torch.cat([t.reshape(-1).to(WIDE) for t in (sums, h, m, v, r, s)])).all()
    keep = lambda new, old: torch.where(ok, new, old)  # noqa: E731
    new = TunerState(keep(r, state.r), keep(m, state.m), keep(v, state.v), keep(s, state.s),
                     state.step + ok.to(torch.int64), state.skipped + (~ok).to(torch.int64), state.lr_ref)
    return new, h.to(dtype), ok
