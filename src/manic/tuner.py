"""The Mechanic scale tuner: state and one update, in the notation of docs/algorithm.md.

Everything here works on a handful of small tensors (length ``n``) that live on the
parameters' device, so a step never waits for the device. Nothing here knows about
parameters, optimizers or process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Layout of the packed tensor of global sums that one step reduces across ranks.
# With D the accumulated direction (Delta, or x - x_ref in the recompute form, state="ref"):
G_DOT_D, X_DOT_D, G_SQ, X_SQ = range(4)
NUM_SUMS = 4


@dataclass(frozen=True)
class Hyper:
    """Mechanic's hyperparameters (the same keywords in every entry point)."""

    weight_decay: float = 1e-2
    eps: float = 1e-8
    s_init: float = 1e-6
    num_betas: int = 6
    store_delta: bool = True
    variant: str = "original"
    per_group: bool = False
    state: str | None = None  # None: "ref+delta" if store_delta else "ref" (resolved here)

    def __post_init__(self) -> None:
        def bad(name: str, value: object, fix: str) -> ValueError:
            return ValueError(f"Invalid {name}: {value!r}; {fix}")

        if isinstance(self.num_betas, bool) or not isinstance(self.num_betas, int) or self.num_betas < 1:
            raise bad("num_betas", self.num_betas, "pass a positive int (default 6)")
        for name in ("weight_decay", "eps", "s_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Invalid {name}: {value!r}; pass a Python float")
            if value != value or value in (float("inf"), float("-inf")):
                raise bad(name, value, "pass a finite float")
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "pass a value >= 0 (default 1e-2)")
        if self.eps <= 0:
            raise bad("eps", self.eps, "pass a value > 0 (default 1e-8)")
        if self.s_init <= 0:
            raise bad("s_init", self.s_init, "pass a value > 0 (default 1e-6)")
        if not isinstance(self.store_delta, bool):
            raise TypeError(f"Invalid store_delta: {self.store_delta!r}; pass True or False")
        if not isinstance(self.per_group, bool):
            raise TypeError(f"Invalid per_group: {self.per_group!r}; pass True or False")
        if self.variant not in VARIANTS:
            raise bad("variant", self.variant, f"pass one of {', '.join(map(repr, VARIANTS))}")
        if self.state is None:
            object.__setattr__(self, "state", "ref+delta" if self.store_delta else "ref")
        elif self.state not in STATES:
            raise bad("state", self.state, f"pass one of {', '.join(map(repr, STATES))}")
        elif not self.store_delta and self.state != "ref":
            raise ValueError(f"Invalid store_delta=False with state={self.state!r}: store_delta=False is the older "
                             "spelling of state='ref'; pass only state=")
        # store_delta says whether Delta is state (it is with "ref+delta" and "delta")
        object.__setattr__(self, "store_delta", self.state != "ref")


VARIANTS = ("invariant", "original")
# What Mechanic keeps per parameter (docs/algorithm.md): x_ref and Delta; x_ref only (Delta recomputed
# as (x - x_ref) / S); Delta only (x_ref = x - S * Delta implied).
STATES = ("ref+delta", "ref", "delta")
# The invariant form's floor, as a fraction of its start (docs/algorithm.md, "The invariant form").
FLOOR = 1e-3


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

    r: Tensor  # (n,)
    m: Tensor  # (n,)
    v: Tensor  # (n,)
    s: Tensor  # (n,)
    step: Tensor  # () int64
    skipped: Tensor  # () int64
    lr_ref: Tensor  # ()

    @property
    def scale(self) -> Tensor:
        """S, the factor on the base optimizer's accumulated updates (one per group with per_group=True)."""
        return self.s.sum(-1) / self.lr_ref

    @staticmethod
    def fresh(hyper: Hyper, dtype: torch.dtype, device: torch.device, groups: int = 1) -> "TunerState":
        """A new state; ``groups`` tuners (one per param group) if ``hyper.per_group``."""
        lead = (groups,) if hyper.per_group else ()
        shape = (*lead, hyper.num_betas)
        zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        count = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
        return TunerState(zeros(), zeros(), zeros(), torch.full(shape, hyper.s_init, dtype=dtype, device=device),
                          count(), count(), torch.ones(lead, dtype=dtype, device=device))

    def tensors(self) -> dict[str, Tensor]:
        return {"r": self.r, "m": self.m, "v": self.v, "s": self.s, "step": self.step, "skipped": self.skipped,
                "lr_ref": self.lr_ref}

    @staticmethod
    def of(tensors: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> "TunerState":
        """A copy of ``tensors`` (keyed like ``tensors()``) in ``dtype`` (the counters stay int64) on ``device``."""
        def own(k: str) -> Tensor:
            return tensors[k].detach().to(device=device, dtype=torch.int64 if k in ("step", "skipped") else dtype,
                                          copy=True)
        lr_ref = own("lr_ref") if "lr_ref" in tensors else torch.ones((), dtype=dtype, device=device)
        return TunerState(own("r"), own("m"), own("v"), own("s"), own("step"), own("skipped"), lr_ref)

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


def update(state: TunerState, sums: Tensor, hyper: Hyper, beta: Tensor) -> tuple[TunerState, Tensor, Tensor]:
    """One tuner update from the reduced global sums; returns (the new state, h, ok).

    ``sums`` holds <g, D>, <x, D>, ||g||^2, ||x||^2 (shape (4,), or (groups, 4) with one tuner per
    group: the groups' tuners are independent and share only ``ok``), where D is Delta (state "ref+delta" or
    "delta") or x - x_ref (state "ref"; the division by S + eps of docs/algorithm.md, "One step", happens here).
    Everything is computed in the units of ``state.s`` (docs/algorithm.md, "The invariant form"):
    the direction is Delta / lr_ref, whose scale is sum(s); with lr_ref = 1 this is the original update.
    A step whose sums are not finite leaves the state as it was and counts as skipped;
    the choice is made on the device, so no host sync happens.
    """
    eps, lam = hyper.eps, hyper.weight_decay
    S = state.s.sum(-1)
    g_dot_d, x_dot_d, g_sq, x_sq = sums.unbind(-1)
    gn, xn = g_sq.sqrt(), x_sq.sqrt()
    # h = <g + lam * S * |g| / (|x| + eps) * x, D>
    h = g_dot_d + lam * S * gn / (xn + eps) * x_dot_d
    if hyper.state != "ref":
        h = h / state.lr_ref  # D = Delta / lr_ref
    else:
        h = h / (S + eps)  # D = (x - x_ref) / (S + eps): no lr_ref, x - x_ref = S * D already
    hb = h.unsqueeze(-1)  # broadcast over the betas
    floor = hyper.s_init
    r_old = state.r
    if hyper.variant == "invariant":
        floor = hyper.s_init * FLOOR
        # the start is wealth, s_init / n per beta in units of the first non-zero |h|, which bad bets can lose
        first = (state.v == 0) & (hb != 0)
        r_old = torch.where(first, hyper.s_init / hyper.num_betas * hb.abs(), r_old)

    hc = torch.minimum(torch.maximum(hb, -state.m), state.m)  # clip with the OLD m
    m = torch.maximum(beta * state.m, hb.abs() + eps)
    v = beta * beta * state.v + hb * hb
    r = beta * r_old - hc * state.s
    s = (floor / hyper.num_betas * m + r.clamp(min=0)) / (v.sqrt() + eps)

    ok = torch.isfinite(torch.cat([t.reshape(-1) for t in (sums, h, m, v, r, s)])).all()
    keep = lambda new, old: torch.where(ok, new, old)  # noqa: E731
    new = TunerState(keep(r, state.r), keep(m, state.m), keep(v, state.v), keep(s, state.s),
                     state.step + ok.to(torch.int64), state.skipped + (~ok).to(torch.int64), state.lr_ref)
    return new, h, ok
