"""The per-tensor work of a step, in two implementations with one signature each.

``EAGER`` uses torch's foreach and out= kernels (no transient parameter-sized buffer);
``COMPILED`` is the same code through ``torch.compile``, which fuses each function into a
single pass over the tensors (opt in with ``compile=True``: the first step pays the compile).
All tensors here are local shards; the 0-dim tensors live on the same device.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .compat import foreach_norm, foreach_sub_


def _dot(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """<a, b> accumulated in the wider of the inputs' dtypes and ``dtype`` (the tuner's)."""
    wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), dtype)
    return torch.dot(a.reshape(-1).to(wide), b.reshape(-1).to(wide))


def partial_sums_eager(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor],
                       xds: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """[<g, D>, <x, D>, ||g||^2, ||x||^2] over the lists, in ``dtype`` (a negated g counts as -g)."""
    zero = torch.zeros((), dtype=dtype, device=device)

    def total(parts: list[Tensor]) -> Tensor:
        return torch.stack([t.to(dtype) for t in parts]).sum() if parts else zero

    g_dot_d = [-_dot(g, d, dtype) if neg else _dot(g, d, dtype) for g, d, neg in zip(gs, gds, negate)]
    x_dot_d = [_dot(x, d, dtype) for x, d in zip(xs, xds)]
    g_sq = [n * n for n in foreach_norm(gs, 2, dtype=dtype)] if gs else []
    x_sq = [n * n for n in foreach_norm(xs, 2, dtype=dtype)] if xs else []
    return torch.stack([total(g_dot_d), total(x_dot_d), total(g_sq), total(x_sq)])


def partial_sums_fusable(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor],
                         xds: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=device)
    g_dot_d, x_dot_d, g_sq, x_sq = zero, zero, zero, zero
    for g, d, neg in zip(gs, gds, negate):
        g = g.to(dtype)
        dot = (g * d.to(dtype)).sum()
        g_dot_d = g_dot_d - dot if neg else g_dot_d + dot
        g_sq = g_sq + (g * g).sum()
    for x, d in zip(xs, xds):
        x = x.to(dtype)
        x_dot_d = x_dot_d + (x * d.to(dtype)).sum()
        x_sq = x_sq + (x * x).sum()
    return torch.stack([g_dot_d, x_dot_d, g_sq, x_sq])


def rebase_eager(xs: list[Tensor], refs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                 ok: Tensor) -> None:
    """store_delta=True. On entry xs hold x_after (the base step's result), ds hold Delta_t.
    Delta <- Delta + u with u = x_after - x_ref - S_old * Delta (u := 0 if not ok);
    x <- x_ref + S_new * Delta."""
    keep = 1 - S_old * ok
    same, wide = _split(xs, refs, ds)
    if same:
        foreach_sub_([x for x, _, _ in same], [r for _, r, _ in same])  # y = x_after - x_ref
    for x, r, d in same:
        torch.where(ok, x, x.new_zeros(()), out=x)  # a non-finite step moves nothing
        torch.addcmul(x, d, keep, out=d)  # Delta + u = y + (1 - S_old) * Delta, in Delta's dtype
        torch.addcmul(r, d, S_new, out=x)
    for x, r, d in wide:  # a float32 reference for 16-bit parameters: y in float32, one tensor at a time
        y = torch.sub(x, r)
        torch.where(ok, y, y.new_zeros(()), out=y)
        torch.addcmul(y, d, keep, out=d)
        torch.addcmul(r, d, S_new, out=x)


def _split(xs: list[Tensor], refs: list[Tensor], others: list[Tensor]) -> tuple[list, list]:
    """(parameters whose reference has their dtype, those with a wider reference)."""
    triples = list(zip(xs, refs, others))
    return [t for t in triples if t[1].dtype == t[0].dtype], [t for t in triples if t[1].dtype != t[0].dtype]


def rebase_fusable(xs: list[Tensor], refs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                   ok: Tensor) -> None:
    keep = 1 - S_old * ok
    for x, r, d in zip(xs, refs, ds):
        y = torch.where(ok, x - r, 0.0).to(d.dtype)
        d_new = y + d * keep
        d.copy_(d_new)
        x.copy_(r + S_new * d_new)


def rebase_recompute_eager(xs: list[Tensor], refs: list[Tensor], diffs: list[Tensor], S_old: Tensor,
                           S_new: Tensor, ok: Tensor, eps: Tensor | float) -> None:
    """store_delta=False. diffs hold x_t - x_ref (taken before the base step).
    x <- x_ref + S_new * (D_t + u) with D_t = diffs / (S_old + eps), u = x_after - x_t."""
    inv = torch.reciprocal(S_old + eps)
    same, wide = _split(xs, refs, diffs)
    if same:
        xs_same = [x for x, _, _ in same]
        foreach_sub_(xs_same, [r for _, r, _ in same])
        foreach_sub_(xs_same, [dd for _, _, dd in same])  # u
    for x, r, dd in same:
        torch.where(ok, x, x.new_zeros(()), out=x)
        torch.addcmul(x, dd, inv, out=x)  # D_t + u
        torch.addcmul(r, x, S_new, out=x)
    for x, r, dd in wide:
        u = torch.sub(x, r).sub_(dd)
        torch.where(ok, u, u.new_zeros(()), out=u)
        torch.addcmul(u, dd, inv, out=u)
        torch.addcmul(r, u, S_new, out=x)


def rebase_recompute_fusable(xs: list[Tensor], refs: list[Tensor], diffs: list[Tensor], S_old: Tensor,
                             S_new: Tensor, ok: Tensor, eps: Tensor | float) -> None:
    inv = torch.reciprocal(S_old + eps)
    for x, r, dd in zip(xs, refs, diffs):
        u = torch.where(ok, x - r - dd, 0.0)
        x.copy_(r + S_new * (u + dd * inv))


class Kernels(NamedTuple):
    partial_sums: Callable[..., Tensor]
    rebase: Callable[..., None]
    rebase_recompute: Callable[..., None]


EAGER = Kernels(partial_sums_eager, rebase_eager, rebase_recompute_eager)
_compiled: Kernels | None = None


def compiled() -> Kernels:
    """The fused versions (compiled on first use; one graph per tensor-list layout)."""
    global _compiled
    if _compiled is None:
        def fuse(fn: Callable) -> Callable:
            return torch.compile(fn, fullgraph=True, dynamic=False)

        _compiled = Kernels(fuse(partial_sums_fusable), fuse(rebase_fusable), fuse(rebase_recompute_fusable))
    return _compiled
