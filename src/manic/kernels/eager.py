"""The eager kernels: torch's foreach and out= ops over the lists of local shards (the default; no
transient parameter-sized buffer beyond the copy of x_t that state="delta" takes before the base step)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..compat import foreach_sub_
from .bodies import rebase_delta_one


def partial_sums_eager(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor],
                       xds: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """[<g, D>, <x, D>, ||g||^2, ||x||^2] over the lists, in ``dtype`` (a negated g counts as -g). Each
    is a dot product accumulated in the wider of the inputs' dtypes and ``dtype`` (the tuner's); the
    squares too (one read, like a norm, but on CPU about twice as fast as torch's norm kernel)."""
    flat: dict[int, Tensor] = {}  # each contiguous tensor's flat view, made once

    def f(t: Tensor) -> Tensor:
        v = flat.get(id(t))
        if v is None:
            v = t.reshape(-1)
            wide = torch.promote_types(v.dtype, dtype)
            if v.dtype != wide:  # a widened copy per use, freed after it: one tensor's transient at a time
                return v.to(wide)
            if t.is_contiguous():
                flat[id(t)] = v
        return v

    def dot(a: Tensor, b: Tensor) -> Tensor:
        a, b = f(a), f(b)
        if a.dtype != b.dtype:
            wide = torch.promote_types(a.dtype, b.dtype)
            a, b = a.to(wide), b.to(wide)
        return torch.dot(a, b)

    def total(parts: list[Tensor]) -> Tensor:
        if not parts:
            return torch.zeros((), dtype=dtype, device=device)
        return torch.stack([t if t.dtype == dtype else t.to(dtype) for t in parts]).sum()

    g_dot_d = [-dot(g, d) if neg else dot(g, d) for g, d, neg in zip(gs, gds, negate)]
    x_dot_d = [dot(x, d) for x, d in zip(xs, xds)]
    return torch.stack([total(g_dot_d), total(x_dot_d), total([dot(g, g) for g in gs]),
                        total([dot(x, x) for x in xs])])


class _Zeros(dict):
    """Per dtype, the 0-dim zero a skipped step's move is replaced by (made once per call, not per tensor)."""

    def __init__(self, ok: Tensor):
        super().__init__()
        self.ok = ok

    def __missing__(self, dtype: torch.dtype) -> Tensor:
        z = self[dtype] = self.ok.new_zeros((), dtype=dtype)
        return z


def _split(xs: list[Tensor], refs: list[Tensor], others: list[Tensor]) -> tuple[list, list]:
    """(parameters whose reference has their dtype, those with a wider reference)."""
    triples = list(zip(xs, refs, others))
    return [t for t in triples if t[1].dtype == t[0].dtype], [t for t in triples if t[1].dtype != t[0].dtype]


def rebase_eager(xs: list[Tensor], refs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                 ok: Tensor) -> None:
    """store_delta=True. On entry xs hold x_after (the base step's result), ds hold Delta_t.
    Delta <- Delta + u with u = x_after - x_ref - S_old * Delta (u := 0 if not ok);
    x <- x_ref + S_new * Delta."""
    keep, zero = 1 - S_old * ok, _Zeros(ok)
    same, wide = _split(xs, refs, ds)
    if same:
        foreach_sub_([x for x, _, _ in same], [r for _, r, _ in same])  # y = x_after - x_ref
    for x, r, d in same:
        torch.where(ok, x, zero[x.dtype], out=x)  # a non-finite step moves nothing
        torch.addcmul(x, d, keep, out=d)  # Delta + u = y + (1 - S_old) * Delta, in Delta's dtype
        torch.addcmul(r, d, S_new, out=x)
    for x, r, d in wide:  # a float32 reference for 16-bit parameters: y in float32, one tensor at a time
        y = torch.sub(x, r)
        torch.where(ok, y, zero[y.dtype], out=y)
        torch.addcmul(y, d, keep, out=d)
        torch.addcmul(r, d, S_new, out=x)


def rebase_recompute_eager(xs: list[Tensor], refs: list[Tensor], diffs: list[Tensor], S_old: Tensor,
                           S_new: Tensor, ok: Tensor, eps: Tensor | float) -> None:
    """store_delta=False. diffs hold x_t - x_ref (taken before the base step).
    x <- x_ref + S_new * (D_t + u) with D_t = diffs / (S_old + eps), u = x_after - x_t."""
    inv, zero = torch.reciprocal(S_old + eps), _Zeros(ok)
    same, wide = _split(xs, refs, diffs)
    if same:
        xs_same = [x for x, _, _ in same]
        foreach_sub_(xs_same, [r for _, r, _ in same])
        foreach_sub_(xs_same, [dd for _, _, dd in same])  # u
    for x, r, dd in same:
        torch.where(ok, x, zero[x.dtype], out=x)
        torch.addcmul(x, dd, inv, out=x)  # D_t + u
        torch.addcmul(r, x, S_new, out=x)
    for x, r, dd in wide:
        u = torch.sub(x, r).sub_(dd)
        torch.where(ok, u, zero[u.dtype], out=u)
        torch.addcmul(u, dd, inv, out=u)
        torch.addcmul(r, u, S_new, out=x)


def rebase_delta_eager(xs: list[Tensor], prevs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                       ok: Tensor) -> None:
    """state="delta". On entry xs hold x_after, prevs x_t (the step's transient copy, used as scratch),
    ds Delta_t. u = x_after - x_t (u := 0 if not ok); Delta <- Delta + u;
    x <- x_t + (S_new - S_old) * Delta_t + S_new * u = x_t + ((S_new - S_old) * Delta_{t+1} + S_old * u)."""
    dS, zero = S_new - S_old, _Zeros(ok)
    same, wide = _split(xs, ds, prevs)  # (Delta is wider than 16-bit parameters)
    if same:
        foreach_sub_([x for x, _, _ in same], [p for _, _, p in same])  # u
    for x, d, p in same:
        torch.where(ok, x, zero[x.dtype], out=x)
        d.add_(x)
        x.mul_(S_old).addcmul_(d, dS).add_(p)  # the increment, added to x_t in one rounding
    for x, d, p in wide:
        rebase_delta_one(x, p, d, S_old, S_new, ok)
