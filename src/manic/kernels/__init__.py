"""The per-tensor work of a step, in two implementations with one signature each.

``EAGER`` uses torch's foreach and out= kernels (no transient parameter-sized buffer beyond the
copy of x_t that state="delta" takes before the base step);
``compiled()`` is the same per-tensor code through ``torch.compile``, which fuses each function into a
single pass over one tensor, shared by all tensors (opt in with ``compile=True``: the first step pays
the compile). A fused rebase also returns, per tensor, ``[0, <x, Delta>, 0, ||x||^2]`` of the values it
wrote (None for a 16-bit x), so that the next step's sums need to read only ``g`` and ``Delta`` (the
engine checks that ``x`` and ``Delta`` were not changed in between); the eager rebases return None.
All tensors here are local shards; the 0-dim tensors live on the same device.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .compat import foreach_sub_


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


_ROW = 4096


def _total(t: Tensor) -> Tensor:
    return t.sum()


def _total_rows(t: Tensor) -> Tensor:
    """The sum of a 1-D tensor of at least 4096 elements, in rows of 4096 and then over the rows: compiled,
    this parallelises and vectorises better than one reduction over a dynamic length (about 25% faster on
    CPU). (Inductor 2.13 fails to lower it for fewer elements, so those take ``_total``.)"""
    k = t.shape[0] // _ROW * _ROW
    return t[:k].view(-1, _ROW).sum(1).sum() + t[k:].sum()


def _sums_gx(g: Tensor, d: Tensor, x: Tensor, dtype: torch.dtype, total: Callable = _total) -> Tensor:
    """[<g, d>, <x, d>, ||g||^2, ||x||^2] of one tensor (one fused pass when compiled)."""
    g, d, x = g.to(dtype), d.to(dtype), x.to(dtype)
    return torch.stack([total(g * d), total(x * d), total(g * g), total(x * x)])


def _sums_x(x: Tensor, d: Tensor, dtype: torch.dtype, total: Callable = _total) -> Tensor:
    """[0, <x, d>, 0, ||x||^2] of one tensor without a gradient."""
    x, d = x.to(dtype), d.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    return torch.stack([zero, total(x * d), zero, total(x * x)])


def _sums_g(g: Tensor, d: Tensor, dtype: torch.dtype, total: Callable = _total) -> Tensor:
    """[<g, d>, 0, ||g||^2, 0] of one tensor whose x-sums are known from the last rebase."""
    g, d = g.to(dtype), d.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=g.device)
    return torch.stack([total(g * d), zero, total(g * g), zero])


# The rows forms, each its own function: torch.compile caches per code object, with a limit of 8 variants.
def _sums_gx_rows(g: Tensor, d: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    return _sums_gx(g, d, x, dtype, _total_rows)


def _sums_x_rows(x: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    return _sums_x(x, d, dtype, _total_rows)


def _sums_g_rows(g: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    return _sums_g(g, d, dtype, _total_rows)


def _flat(*ts: Tensor) -> list[Tensor] | None:
    """Flat 1-D views of the tensors, or None if one of them is not contiguous."""
    return [t.view(-1) for t in ts] if all(t.is_contiguous() for t in ts) else None


def partial_sums_fusable(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor],
                         xds: list[Tensor], dtype: torch.dtype, device: torch.device,
                         one: Callable = _sums_gx, xonly: Callable = _sums_x, gonly: Callable = _sums_g) -> Tensor:
    """The same sums, one tensor at a time through ``one`` (g and x of a tensor in one pass), ``xonly``
    (no gradient) or ``gonly`` (x not asked for), on flat 1-D views; compiled: one kernel each, shared by
    every tensor through dynamic shapes (see ``compiled``). A tensor with a non-contiguous part has no
    such view and takes the eager sums."""
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


class _Zeros(dict):
    """Per dtype, the 0-dim zero a skipped step's move is replaced by (made once per call, not per tensor)."""

    def __init__(self, ok: Tensor):
        super().__init__()
        self.ok = ok

    def __missing__(self, dtype: torch.dtype) -> Tensor:
        z = self[dtype] = self.ok.new_zeros((), dtype=dtype)
        return z


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


def _split(xs: list[Tensor], refs: list[Tensor], others: list[Tensor]) -> tuple[list, list]:
    """(parameters whose reference has their dtype, those with a wider reference)."""
    triples = list(zip(xs, refs, others))
    return [t for t in triples if t[1].dtype == t[0].dtype], [t for t in triples if t[1].dtype != t[0].dtype]


def _each(one: Callable, eager: Callable, xs: list[Tensor], ys: list[Tensor], zs: list[Tensor],
          *args: object) -> list[Tensor | None]:
    """``one`` per tensor triple, on flat 1-D views (a compiled ``one`` is then shared by every shape);
    ``eager`` for a triple with a non-contiguous tensor, which has no such view. Returns their results."""
    out = []
    for x, y, z in zip(xs, ys, zs):
        flat = _flat(x, y, z)
        out.append(eager(x, y, z, *args) if flat is None else one(*flat, *args))
    return out


# A rebase asked for ``sums`` returns [0, <x, Delta>, 0, ||x||^2] of what it wrote (``_sums_x``), only where
# x has Delta's dtype: compiled, Inductor keeps a value rounded to a 16-bit x in float32, so its sums would
# not be of what x holds.


def _rebase_one(x: Tensor, r: Tensor, d: Tensor, S_old: Tensor, S_new: Tensor, ok: Tensor,
                sums: bool = False) -> Tensor | None:
    keep = 1 - S_old * ok
    y = torch.where(ok, x - r, 0.0).to(d.dtype)
    d_new = y + d * keep
    x_new = (r + S_new * d_new).to(x.dtype)
    d.copy_(d_new)
    x.copy_(x_new)
    return _sums_x(x_new, d_new, S_new.dtype) if sums and x.dtype == d.dtype else None


def _rebase_one_sums(x: Tensor, r: Tensor, d: Tensor, S_old: Tensor, S_new: Tensor, ok: Tensor) -> Tensor | None:
    return _rebase_one(x, r, d, S_old, S_new, ok, sums=True)


def rebase_fusable(xs: list[Tensor], refs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                   ok: Tensor, one: Callable = _rebase_one) -> list[Tensor | None]:
    return _each(one, _rebase_one, xs, refs, ds, S_old, S_new, ok)


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


def _recompute_one(x: Tensor, r: Tensor, dd: Tensor, S_old: Tensor, S_new: Tensor, ok: Tensor,
                   eps: Tensor | float) -> None:
    inv = torch.reciprocal(S_old + eps)
    u = torch.where(ok, x - r - dd, 0.0)
    x.copy_(r + S_new * (u + dd * inv))


def rebase_recompute_fusable(xs: list[Tensor], refs: list[Tensor], diffs: list[Tensor], S_old: Tensor,
                             S_new: Tensor, ok: Tensor, eps: Tensor | float, one: Callable = _recompute_one) -> list[None]:
    return _each(one, _recompute_one, xs, refs, diffs, S_old, S_new, ok, eps)


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
        _rebase_delta_one(x, p, d, S_old, S_new, ok)


def _rebase_delta_one(x: Tensor, p: Tensor, d: Tensor, S_old: Tensor, S_new: Tensor, ok: Tensor,
                      sums: bool = False) -> Tensor | None:
    u = torch.where(ok, x.to(d.dtype) - p.to(d.dtype), 0.0)
    d_new = d + u
    x_new = (p.to(d.dtype) + (S_old * u + (S_new - S_old) * d_new)).to(x.dtype)
    d.copy_(d_new)
    x.copy_(x_new)
    return _sums_x(x_new, d_new, S_new.dtype) if sums and x.dtype == d.dtype else None


def _rebase_delta_one_sums(x: Tensor, p: Tensor, d: Tensor, S_old: Tensor, S_new: Tensor,
                           ok: Tensor) -> Tensor | None:
    return _rebase_delta_one(x, p, d, S_old, S_new, ok, sums=True)


def rebase_delta_fusable(xs: list[Tensor], prevs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                         ok: Tensor, one: Callable = _rebase_delta_one) -> list[Tensor | None]:
    return _each(one, _rebase_delta_one, xs, prevs, ds, S_old, S_new, ok)


class Kernels(NamedTuple):
    partial_sums: Callable[..., Tensor]
    # the rebases: None (eager) or, per tensor, what the fused form returned (see the module docstring)
    rebase: Callable[..., list[Tensor | None] | None]
    rebase_recompute: Callable[..., list[None] | None]
    rebase_delta: Callable[..., list[Tensor | None] | None]


EAGER = Kernels(partial_sums_eager, rebase_eager, rebase_recompute_eager, rebase_delta_eager)
_compiled: Kernels | None = None


# Below this many elements a compiled call's fixed cost (~0.1 ms on CPU) exceeds what fusing saves over
# the eager foreach kernels, which take all small tensors in one launch per op (docs/performance.md).
SMALL = 1 << 17


def _split_small(fused: Callable, eager: Callable) -> Callable:
    """A rebase that sends tensors of fewer than SMALL elements to ``eager`` and the others to ``fused``;
    returns, per tensor, what ``fused`` returned for it (None for the eager ones)."""
    def run(xs: list[Tensor], refs: list[Tensor], others: list[Tensor], *args: object) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(xs)
        small = [x.numel() < SMALL for x in xs]
        for fn, want in ((eager, True), (fused, False)):
            picked = [i for i, sm in enumerate(small) if sm == want]
            if picked:
                got = fn([xs[i] for i in picked], [refs[i] for i in picked], [others[i] for i in picked], *args)
                for i, r in zip(picked, got or [None] * len(picked)):
                    out[i] = r
        return out
    return run


def _split_small_sums(fused: Callable) -> Callable:
    def run(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor], xds: list[Tensor],
            dtype: torch.dtype, device: torch.device) -> Tensor:
        small = {id(d) for x, d in zip(xs, xds) if x.numel() < SMALL}
        parts = []
        for fn, want in ((partial_sums_eager, True), (fused, False)):
            g_sel = [i for i, d in enumerate(gds) if (id(d) in small) == want]
            x_sel = [i for i, d in enumerate(xds) if (id(d) in small) == want]
            if g_sel or x_sel:
                parts.append(fn([gs[i] for i in g_sel], [gds[i] for i in g_sel], [negate[i] for i in g_sel],
                                [xs[i] for i in x_sel], [xds[i] for i in x_sel], dtype, device))
        return torch.stack(parts).sum(0) if parts else torch.zeros(4, dtype=dtype, device=device)
    return run


def compiled() -> Kernels:
    """The fused versions: one compiled kernel per function, shared by every tensor through flat 1-D
    views and dynamic shapes, so the compile is paid once (per dtype combination), not per model layout.
    Tensors below SMALL elements stay on the eager foreach kernels."""
    global _compiled
    if _compiled is None:
        def fuse(fn: Callable) -> Callable:
            # (not fullgraph=True: past torch.compile's limit of 8 variants per function, e.g. many dtype
            # combinations, the function then runs uncompiled, with the same result, instead of raising)
            return torch.compile(fn, dynamic=True)

        def by_length(flat: Callable, rows: Callable) -> Callable:  # the rows form from 4096 elements
            return lambda *args: (rows if args[0].numel() >= _ROW else flat)(*args)

        sums_gx, sums_x, sums_g = (by_length(fuse(f), fuse(r)) for f, r in (
            (_sums_gx, _sums_gx_rows), (_sums_x, _sums_x_rows), (_sums_g, _sums_g_rows)))
        rebase_one, recompute_one, delta_one = map(fuse, (_rebase_one_sums, _recompute_one, _rebase_delta_one_sums))
        _compiled = Kernels(_split_small_sums(partial(partial_sums_fusable, one=sums_gx, xonly=sums_x, gonly=sums_g)),
                            _split_small(partial(rebase_fusable, one=rebase_one), rebase_eager),
                            _split_small(partial(rebase_recompute_fusable, one=recompute_one), rebase_recompute_eager),
                            _split_small(partial(rebase_delta_fusable, one=delta_one), rebase_delta_eager))
    return _compiled
