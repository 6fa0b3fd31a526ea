"""The eager sums: [<g, D>, <x, D>, ||g||^2, ||x||^2] over a step's local shards, in float64 whatever the
tensors' dtype (issue 28: a gradient of 1e20 squares beyond float32's range, one of 1e-38 below it).

Float64 tensors: a dot product per tensor, summed in order (manic 0.3's arithmetic, bit for bit: tests/golden).
16/32-bit tensors: float32 partial sums, totals in float64, the gradients scaled by a power of two first. The
small ones are packed side by side in a scratch kept between steps (one scale op and one dot product for
their squared norm, one ``foreach_norm`` for the parameters' squared norms), a large one goes in pieces of at
most CHUNK elements: a handful of dispatches for any number of small tensors (issue 29), and no transient
of more than CHUNK elements per operand.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ..compat import foreach_copy_, foreach_norm_out

F64 = torch.float64


@torch.no_grad()  # (out= ops refuse tensors that require grad; the sums are never differentiated)
def partial_sums_eager(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor],
                       xds: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """[<g, D>, <x, D>, ||g||^2, ||x||^2] over the lists, in ``dtype`` (a negated g counts as -g).

    Float64 pairs: per-tensor dot products in float64, as manic 0.3. 16/32-bit pairs (``_narrow_sums``):
    accumulated in float64 from float32 partial sums of the gradients scaled by a power of two, so that
    neither huge (1e19 and above) nor tiny (down to the smallest normal float32) gradients overflow or
    underflow in the squares (issue 28)."""
    wide_g = [i for i, (g, d) in enumerate(zip(gs, gds)) if g.dtype == F64 and d.dtype == F64]
    wide_x = [i for i, (x, d) in enumerate(zip(xs, xds)) if x.dtype == F64 and d.dtype == F64]
    rest_g = sorted(set(range(len(gs))) - set(wide_g))
    rest_x = sorted(set(range(len(xs))) - set(wide_x))
    parts = []
    if wide_g or wide_x:
        parts.append(_wide_sums([gs[i] for i in wide_g], [gds[i] for i in wide_g], [negate[i] for i in wide_g],
                                [xs[i] for i in wide_x], [xds[i] for i in wide_x], dtype, device))
    if rest_g or rest_x:
        parts.append(_narrow_sums([gs[i] for i in rest_g], [gds[i] for i in rest_g], [negate[i] for i in rest_g],
                                  [xs[i] for i in rest_x], [xds[i] for i in rest_x], device).to(dtype))
    if not parts:
        return torch.zeros(4, dtype=dtype, device=device)
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _wide_sums(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor], xds: list[Tensor],
               dtype: torch.dtype, device: torch.device) -> Tensor:
    """The float64 sums: each a dot product per tensor, summed in order (manic 0.3's arithmetic)."""
    def total(parts: list[Tensor]) -> Tensor:
        if not parts:
            return torch.zeros((), dtype=dtype, device=device)
        return torch.stack(parts).sum().to(dtype)

    g_dot_d = [-torch.dot(_flat(g), _flat(d)) if neg else torch.dot(_flat(g), _flat(d))
               for g, d, neg in zip(gs, gds, negate)]
    x_dot_d = [torch.dot(_flat(x), _flat(d)) for x, d in zip(xs, xds)]
    return torch.stack([total(g_dot_d), total(x_dot_d), total([torch.dot(_flat(g), _flat(g)) for g in gs]),
                        total([torch.dot(_flat(x), _flat(x)) for x in xs])])


def _f32(t: Tensor) -> Tensor:
    """A flat float32 view of ``t`` (a widened copy if it is not float32)."""
    return _flat(t) if t.dtype == torch.float32 else _flat(t).float()


# The 16/32-bit sums pack tensors of fewer than PACK elements side by side (a float32 copy of at most CHUNK
# elements per pack: one dot product then covers them all) and go through a larger tensor in pieces of at
# most CHUNK elements: no transient of more than CHUNK elements per operand, and a handful of dispatches
# for any number of small tensors.
PACK = 1 << 17
CHUNK = 1 << 18
_workspace = threading.local()


def _scratch(slot: int, n: int, device: torch.device) -> Tensor:
    """A float32 buffer of n <= CHUNK elements for the sums. On the CPU one per slot and thread, kept between
    steps (a fresh allocation of megabytes costs more there than the work it holds: the pages are mapped
    anew); elsewhere a plain allocation (CUDA's caching allocator keeps it, and knows its stream)."""
    if device.type != "cpu":
        return torch.empty(n, dtype=torch.float32, device=device)
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n:
        buf = bufs[slot] = torch.empty(max(n, min(2 * n, CHUNK)), dtype=torch.float32)
    return buf[:n]


def gradient_scale(norms: Tensor) -> Tensor:
    """A power of two c (0-dim float32, on the device) for which c * g neither overflows nor underflows
    when squared in float32, from the gradients' float32 norms per tensor (``norms``, 1-D): 2**-e with
    e = ceil(log2(n)), n the largest norm, within [2**-100, 2**100] (|c * g| <= 1, and the largest
    entries' squares are at least 1/(4 numel)). Where a norm overflows, c = 2**-100 (every float32 times
    it squares to below 2**57); where they all underflow, c = 2**100 (every entry was below 2**-75); a
    non-finite gradient makes c, and so the sums, NaN (a skipped step)."""
    e = torch.ceil(torch.log2(norms.max()))
    return torch.exp2(torch.clamp(e, -100, 100).neg_())


def _groups(sizes: list[int]) -> list[list[int]]:
    """Consecutive indices grouped so that each group has at most CHUNK elements."""
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if used + n > CHUNK and out[-1]:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out if out[0] else []


def _in_f32(t: Tensor, slot: int, device: torch.device) -> Tensor:
    """``t`` (flat, at most CHUNK elements) if it is float32, else its float32 copy in a scratch."""
    return t if t.dtype == torch.float32 else _scratch(slot, t.numel(), device).copy_(t)


def _pieces(t: Tensor) -> list[Tensor]:
    return [t[a:a + CHUNK] for a in range(0, t.numel(), CHUNK)] or [t]


def _split(items: tuple, sizes: list[int]) -> list[tuple]:
    out, at = [], 0
    for n in sizes:
        out.append(items[at:at + n])
        at += n
    return out


def _narrow_sums(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor], xds: list[Tensor],
                 device: torch.device) -> Tensor:
    """The sums of 16/32-bit tensors in float64: float32 partial sums (one per tensor, piece or pack), float64
    totals. The gradients are scaled by ``gradient_scale`` (a power of two: exact, divided out in float64):
    the small ones side by side in a scratch (one op scales them all, one dot product gives their squared
    norm), a larger one in pieces; <g, D> and <x, D> are one dot product per tensor or piece, ||x||^2 one
    foreach_norm. Every partial sum is written into one float32 vector (no stacking of 0-dim tensors)."""
    f32 = torch.float32
    flat_d: dict[int, Tensor] = {}

    def fd(d: Tensor) -> Tensor:  # a direction's flat float32 view (a widened copy for 16-bit), made once
        v = flat_d.get(id(d))
        if v is None:
            v = d.reshape(-1)
            v = flat_d[id(d)] = v if v.dtype == f32 else v.float()
        return v

    fg = [g.reshape(-1) for g in gs]
    fx = [x.reshape(-1) for x in xs]
    small = [i for i, g in enumerate(fg) if g.numel() < PACK]
    large = [(i, p) for i, g in enumerate(fg) if g.numel() >= PACK for p in range(len(_pieces(g)))]
    groups = _groups([fg[i].numel() for i in small])
    n_gd, n_gg = len(small) + len(large), len(groups) + len(large)
    # ||x||^2: one foreach_norm over the small float32 tensors; a dot product for a 16-bit one (on its widened
    # copy) and for a large one (torch's float32 norm of a few 1e5 elements is ~1e-5 off, the dot ~1e-6)
    normed = [k for k, x in enumerate(fx) if x.dtype == f32 and x.numel() < PACK]
    dotted = [k for k, x in enumerate(fx) if not (x.dtype == f32 and x.numel() < PACK)]
    # one float32 vector of partial sums: <g,D> | ||g||^2 | <x,D> | ||x||^2 (dotted) | ||x|| (normed) | ||g||
    cut = [n_gd, n_gg, len(fx), len(dotted), len(normed), len(fg)]
    res = torch.empty(sum(cut), dtype=f32, device=device)
    gd, gg, xd, xx, xn, norms = _split(res.unbind(), cut)
    ends = [sum(cut[:i + 1]) for i in range(len(cut))]
    c = None
    if fg:
        foreach_norm_out(fg, list(norms))
        c = gradient_scale(res[ends[4]:])
        k = 0
        for j, group in enumerate(groups):
            idx = [small[m] for m in group]
            sizes = [fg[i].numel() for i in idx]
            buf = _scratch(0, sum(sizes), device)
            if all(fg[i].dtype == f32 for i in idx):
                torch.cat([fg[i] for i in idx], out=buf)
            else:
                foreach_copy_(list(buf.split(sizes)), [fg[i] for i in idx])
            buf.mul_(c)
            torch.dot(buf, buf, out=gg[j])
            for v, i in zip(buf.split(sizes), idx):
                torch.dot(v, fd(gds[i]), out=gd[k])
                k += 1
        for j, (i, p) in enumerate(large, len(groups)):
            piece, d = _pieces(fg[i])[p], _pieces(gds[i].reshape(-1))[p]
            g = torch.mul(piece, c, out=_scratch(0, piece.numel(), device))
            torch.dot(g, _in_f32(d, 1, device), out=gd[len(small) + j - len(groups)])
            torch.dot(g, g, out=gg[j])
        for k, i in enumerate(small + [i for i, _ in large]):
            if negate[i]:
                gd[k].neg_()
    at = {k: j for j, k in enumerate(dotted)}
    for k, (x, d) in enumerate(zip(fx, xds)):
        w = x if x.dtype == f32 else x.float()
        torch.dot(w, fd(d), out=xd[k])
        if k in at:
            torch.dot(w, w, out=xx[at[k]])
    if normed:
        foreach_norm_out([fx[k] for k in normed], list(xn))
    r = res.to(F64)
    xn64 = r[ends[3]:ends[4]]
    out = torch.stack([r[:ends[0]].sum(), r[ends[1]:ends[2]].sum(), r[ends[0]:ends[1]].sum(),
                       r[ends[2]:ends[3]].sum() + (xn64 * xn64).sum()])
    if c is not None:
        c64 = c.to(F64)
        out = out / torch.stack([c64, torch.ones_like(c64), c64 * c64, torch.ones_like(c64)])
    return out
