"""Non-greedy candidates for Mechanic's scale (issue 26), as a small research prototype.

``Candidate`` is the invariant form of docs/algorithm.md written out plainly (one process, float64
tuner, x_ref and Delta kept, host syncs allowed: it is for measuring ideas, not for training), with
one change per candidate to what the bet sees or to the scale it applies:

- ``base``: no change; it reproduces manic's default (the check that the prototype is faithful);
- ``peak``: the scale never falls below the highest the bet has reached since it first rose above
  its start; the bets are the applied ones (``s`` is rescaled up to the peak), so the wealth
  accounts for what was bet (like Prodigy's and D-Adaptation's monotone ``d``);
- ``peak_apart``: the same floor, but the bet keeps its own accounting (the applied scale is
  ``max(bet, peak)``);
- ``lag``: the bet sees ``<g, L>`` with ``L`` an exponential average of Delta (``lag_beta``): the
  derivative along the slowly drifting part of the displacement, without its fast fluctuations;
- ``distance``: a Prodigy-style distance estimate as a floor: ``sum_k w_k <g_k, x_ref - x_k>`` over
  ``||sum_k w_k g_k||_1`` with ``w_k = S'_k * lr_k / lr_ref`` (one more parameter-sized buffer);
- ``times``: the applied scale is ``kappa`` times the bet's;
- ``horizon``: the bet sees ``h - kappa * rho_t * rms_t(h)``, ``rho_t = lr_t / lr_ref`` the schedule's factor
  (a proxy for the horizon left: 1 at the peak, 0 at the end of a decay) and ``rms_t`` the bet's own running
  RMS of h (over the shortest beta's window, about ten steps): an optimistic bias that settles the scale
  where the loss still rises along the line by ``kappa`` noise units while much of the run remains, and at
  the greedy scale at the end.

``suite.py`` runs them as methods ``cand_<name>`` (see ``CANDIDATES``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

EPS = 1e-8


class Candidate(torch.optim.Optimizer):
    """AdamW (weight decay 0.01) under the invariant form with one candidate change; ``param_groups`` and
    ``state`` are the base's, so an LR scheduler drives it. ``param_groups[0]["d"]`` is the applied scale S
    (the factor on Delta), so the suite records ``S * lr`` as for Prodigy."""

    def __init__(self, params: Any, kind: str = "base", base_lr: float = 1e-2, num_betas: int = 6,
                 s_init: float = 1e-3, weight_decay: float = 4.0, **knobs: float) -> None:
        self.base = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.01)
        self.defaults, self.param_groups, self.state = self.base.defaults, self.base.param_groups, self.base.state
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self.kind, self.n, self.s_init, self.lam, self.knobs = kind, num_betas, s_init, weight_decay, knobs
        self.beta = torch.tensor([1 - 10.0 ** -(i + 1) for i in range(num_betas)], dtype=torch.float64)
        zeros = lambda: torch.zeros(num_betas, dtype=torch.float64)  # noqa: E731
        self.r, self.m, self.v = zeros(), zeros(), zeros()
        self.s = torch.full((num_betas,), s_init, dtype=torch.float64)
        self.applied = float(self.s.sum())  # S', the effective-lr scale the parameters sit at
        self.peak = 0.0
        self.floor = 0.0
        self.num = 0.0  # distance: the numerator
        self.params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        self.started = False
        self.param_groups[0]["d"] = 1.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        ps = self.params
        if not self.started:
            self.started = True
            self.lr_ref = max(g.get("initial_lr", g["lr"]) for g in self.param_groups)
            self.ref = [p.detach().clone() for p in ps]
            self.delta = [torch.zeros_like(p) for p in ps]
            self.lagged = [torch.zeros_like(p) for p in ps] if self.kind == "lag" else None
            self.grads = [torch.zeros_like(p) for p in ps] if self.kind == "distance" else None
        gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        d = self.lagged if self.kind == "lag" else self.delta
        dot = lambda a, b: sum(float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()))  # noqa: E731
                               for x, y in zip(a, b))
        g_d, x_d, g_sq, x_sq = dot(gs, d), dot(ps, d), dot(gs, gs), dot(ps, ps)
        S = self.applied
        h = (g_d + self.lam * S * math.sqrt(g_sq) / (math.sqrt(x_sq) + EPS) * x_d) / self.lr_ref
        hb = torch.tensor(h, dtype=torch.float64)
        if self.kind == "horizon":  # an optimistic bias that fades with the schedule's factor (see the docstring)
            rho = self.param_groups[0]["lr"] / self.lr_ref
            hb = hb - self.knobs.get("kappa", 1.0) * rho * float(self.v[0] * (1 - self.beta[0] ** 2)) ** 0.5
        r_old = self.r
        if bool((self.v == 0).all()) and h != 0:  # the start, as wealth
            r_old = torch.full_like(self.r, self.s_init / self.n * abs(h))
        self.r = self.beta * r_old - torch.minimum(torch.maximum(hb, -self.m), self.m) * self.s
        self.m = torch.maximum(self.beta * self.m, hb.abs() + EPS)
        self.v = self.beta**2 * self.v + hb * hb
        self.s = (self.s_init * 1e-3 / self.n * self.m + self.r.clamp(min=0)) / (self.v.sqrt() + EPS)
        bet = float(self.s.sum())
        lr_t = self.param_groups[0]["lr"] / self.lr_ref
        if self.kind == "distance":
            w = S * lr_t
            self.num += w * (-S * g_d / self.lr_ref)  # <g, x_ref - x> = -S' <g, Delta> / lr_ref
            for acc, g in zip(self.grads, gs):
                acc.add_(g, alpha=w)
            l1 = sum(float(a.abs().sum()) for a in self.grads)
            if l1 > 0:
                self.floor = max(self.floor, self.knobs.get("coef", 1.0) * self.num / l1)
        if self.kind in ("peak", "peak_apart") and bet > self.s_init:
            self.peak = max(self.peak, bet)
        floor = self.peak if self.kind in ("peak", "peak_apart") else self.floor
        if self.kind in ("peak", "distance") and bet < floor:
            self.s = self.s * (floor / bet)  # the bet is the applied one
        bet = float(self.s.sum())
        applied = max(bet, floor) if self.kind == "peak_apart" else bet
        if self.kind == "times":
            applied = self.knobs.get("kappa", 3.0) * bet
        xt = [p.detach().clone() for p in ps]
        self.base.step()
        Sn = applied / self.lr_ref
        for p, x0, dl, ref in zip(ps, xt, self.delta, self.ref):
            dl.add_(p - x0)
            p.copy_(ref + Sn * dl)
        if self.lagged is not None:
            b = self.knobs.get("lag_beta", 0.9)
            for lg, dl in zip(self.lagged, self.delta):
                lg.mul_(b).add_(dl, alpha=1 - b)
        self.applied = applied
        self.param_groups[0]["d"] = Sn


# method name -> (kind, knobs): what suite.py runs as cand_<name>
CANDIDATES: dict[str, tuple[str, dict[str, float]]] = {
    "base": ("base", {}),
    "peak": ("peak", {}),
    "peak_apart": ("peak_apart", {}),
    "lag0.9": ("lag", {"lag_beta": 0.9}),
    "lag0.99": ("lag", {"lag_beta": 0.99}),
    "distance": ("distance", {}),
    "times3": ("times", {"kappa": 3.0}),
    "horizon0.5": ("horizon", {"kappa": 0.5}),
    "horizon1": ("horizon", {"kappa": 1.0}),
    "horizon2": ("horizon", {"kappa": 2.0}),
}
