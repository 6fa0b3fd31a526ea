"""An independent float64 NumPy reference of docs/algorithm.md (the original form) and of the
invariant form (its specification: the variant="invariant" notes in ``Mechanic`` below), with NumPy
base optimizers.

Written from the specification, not from manic's code: the tests compare manic against it.
Base optimizers return their update ``u`` exactly (torch's default hyperparameters).
"""

from __future__ import annotations

import math

import numpy as np


class SGD:
    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0, maximize=False):
        self.lr, self.mom, self.nesterov, self.wd, self.maximize = lr, momentum, nesterov, weight_decay, maximize
        self.buf = None

    def update(self, x, g, lr):
        g = -g if self.maximize else g
        g = g + self.wd * x if self.wd else g
        if self.mom:
            self.buf = g.copy() if self.buf is None else self.mom * self.buf + g
            g = g + self.mom * self.buf if self.nesterov else self.buf
        return -lr * g


class Adam:
    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        self.lr, self.b1, self.b2, self.eps, self.wd, self.decoupled = lr, *betas, eps, weight_decay, decoupled
        self.m = self.v = None
        self.t = 0

    def update(self, x, g, lr):
        self.t += 1
        if self.m is None:
            self.m, self.v = np.zeros_like(x), np.zeros_like(x)
        decay = -lr * self.wd * x if self.decoupled else 0.0
        if not self.decoupled and self.wd:
            g = g + self.wd * x
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        step_size = lr / (1 - self.b1 ** self.t)
        denom = np.sqrt(self.v) / math.sqrt(1 - self.b2 ** self.t) + self.eps
        return decay - step_size * self.m / denom


def AdamW(lr, weight_decay=1e-2):
    return Adam(lr, weight_decay=weight_decay, decoupled=True)


class RMSprop:
    def __init__(self, lr, alpha=0.99, eps=1e-8):
        self.lr, self.alpha, self.eps, self.v = lr, alpha, eps, None

    def update(self, x, g, lr):
        self.v = (1 - self.alpha) * g * g if self.v is None else self.alpha * self.v + (1 - self.alpha) * g * g
        return -lr * g / (np.sqrt(self.v) + self.eps)


class Adagrad:
    def __init__(self, lr, eps=1e-10):
        self.lr, self.eps, self.sum = lr, eps, None

    def update(self, x, g, lr):
        self.sum = g * g if self.sum is None else self.sum + g * g
        return -lr * g / (np.sqrt(self.sum) + self.eps)


class Mechanic:
    """docs/algorithm.md, one flat float64 vector of all parameters.

    ``variant="original"`` is the authors' update. ``variant="invariant"`` measures the tuner in
    units of the base learning rate: ``lr_ref`` (the lr of the first step, unless given) divides
    the direction, ``sum(s)`` is an effective learning rate S' and the factor on Delta is
    S = S' / lr_ref; the start s_init is paid in as wealth at the first non-zero h, and the floor is
    s_init * 1e-3. ``delta`` is Delta in the base optimizer's units in both variants.
    """

    FLOOR = 1e-3  # the invariant form's floor, as a fraction of s_init

    def __init__(self, x, base, weight_decay=1e-2, eps=1e-8, s_init=1e-6, num_betas=6, store_delta=True,
                 variant="original", lr_ref=None):
        if variant not in ("original", "invariant"):
            raise ValueError(variant)
        self.x = np.array(x, dtype=np.float64)
        self.base, self.lam, self.eps, self.s_init, self.n = base, weight_decay, eps, s_init, num_betas
        self.store_delta, self.variant = store_delta, variant
        self.beta = np.array([1 - 10.0 ** (-i) for i in range(1, num_betas + 1)])
        self.r, self.m, self.v = np.zeros(num_betas), np.zeros(num_betas), np.zeros(num_betas)
        self.s = np.full(num_betas, s_init)
        self.x_ref = None
        self.delta = None
        self.lr_ref = 1.0 if variant == "original" else lr_ref  # None: the first step's lr

    @property
    def scale(self) -> float:
        """S, the factor on Delta."""
        if self.variant == "invariant":
            return float(self.s.sum() / (self.lr_ref if self.lr_ref is not None else 1.0))
        return float(self.s.sum())

    def step(self, g, lr):
        if self.variant == "invariant":
            return self._step_invariant(g, lr)
        g = np.asarray(g, dtype=np.float64)
        if self.x_ref is None:
            self.x_ref, self.delta = self.x.copy(), np.zeros_like(self.x)
        x, S, eps = self.x, self.s.sum(), self.eps
        D = self.delta if self.store_delta else (x - self.x_ref) / (S + eps)
        gn, xn = np.linalg.norm(g), np.linalg.norm(x)
        gt = g + self.lam * S * gn / (xn + eps) * x
        h = float(gt @ D)
        hc = np.clip(h, -self.m, self.m)
        self.m = np.maximum(self.beta * self.m, abs(h) + eps)
        self.v = self.beta ** 2 * self.v + h * h
        self.r = self.beta * self.r - hc * self.s
        self.s = (self.s_init / self.n * self.m + np.maximum(self.r, 0)) / (np.sqrt(self.v) + eps)
        u = self.base.update(x, g, lr)
        self.delta = D + u
        self.x = self.x_ref + self.s.sum() * self.delta

    def _step_invariant(self, g, lr):
        g = np.asarray(g, dtype=np.float64)
        if self.x_ref is None:
            self.x_ref, self.delta = self.x.copy(), np.zeros_like(self.x)
            if self.lr_ref is None:
                self.lr_ref = float(lr)
        L, x, eps = self.lr_ref, self.x, self.eps
        S_eff = self.s.sum()  # S' = sum(s), an effective learning rate; the factor on Delta is S'/L
        # the normalized direction Delta' = Delta / L; in the recompute form x - x_ref = S' * Delta'
        D = self.delta / L if self.store_delta else (x - self.x_ref) / (S_eff + eps)
        gn, xn = np.linalg.norm(g), np.linalg.norm(x)
        gt = g + self.lam * S_eff * gn / (xn + eps) * x
        h = float(gt @ D)
        if h != 0 and not self.v.any():  # the first non-zero h: the start becomes wealth
            self.r = np.full(self.n, self.s_init / self.n * abs(h))
        hc = np.clip(h, -self.m, self.m)
        self.m = np.maximum(self.beta * self.m, abs(h) + eps)
        self.v = self.beta ** 2 * self.v + h * h
        self.r = self.beta * self.r - hc * self.s
        floor = self.s_init * self.FLOOR
        self.s = (floor / self.n * self.m + np.maximum(self.r, 0)) / (np.sqrt(self.v) + eps)
        u = self.base.update(x, g, lr)
        self.delta = L * D + u  # back in the base optimizer's units
        self.x = self.x_ref + self.s.sum() / L * self.delta
