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

from ..compat import foreach_copy_

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


# The 16/32-bit sums take their tensors in packs: a run of small tensors side by side, or one piece of a larger
# one, at most CHUNK elements, copied into float32 scratches kept between steps (a handful of dispatches for
# any number of small tensors, and no transient of more than CHUNK elements per operand).
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
    when squared in float32, from norms of the gradients (``norms``, 1-D: per tensor, or the largest |entry|
    of a pack): 2**-e with e = ceil(log2(n)), n the largest, within [2**-100, 2**100] (|c * g| <= 1, and the
    largest entries' squares are at least 1/(4 numel)). Where a norm overflows, c = 2**-100 (every float32
    times it squares to below 2**57); where they all underflow, c = 2**100 (every entry was below 2**-75); a
    non-finite gradient makes c, and so the sums, NaN (a skipped step)."""
    e = torch.ceil(torch.log2(norms.max()))
    return torch.exp2(torch.clamp(e, -100, 100).neg_())


def _packs(ts: list[Tensor]) -> list[list[tuple[int, int, int]]]:
    """The packs over ``ts``: lists of (index, start, stop) slices of their flat forms, each pack of at most
    CHUNK elements (consecutive small tensors together, a large one in pieces; empty tensors left out)."""
    out: list[list[tuple[int, int, int]]] = []
    used = CHUNK
    for i, t in enumerate(ts):
        n = t.numel()
        for a in range(0, n, CHUNK):
            m = min(CHUNK, n - a)
            if used + m > CHUNK:
                out.append([])
                used = 0
            out[-1].append((i, a, a + m))
            used += m
    return out


def _packed(flat: list[Tensor], pack: list[tuple[int, int, int]], slot: int, device: torch.device) -> Tensor:
    """The pack's slices of the flat tensors side by side in float32: for one float32 slice the slice itself
    (a view: read only), else a copy in scratch ``slot``."""
    parts = [flat[i][a:b] for i, a, b in pack]
    if len(parts) == 1 and parts[0].dtype == torch.float32:
        return parts[0]
    buf = _scratch(slot, sum(b - a for _, a, b in pack), device)
    if all(t.dtype == torch.float32 for t in parts):
        torch.cat(parts, out=buf)
    else:
        foreach_copy_(list(buf.split([b - a for _, a, b in pack])), parts)
    return buf


def _narrow_sums(gs: list[Tensor], gds: list[Tensor], negate: list[bool], xs: list[Tensor], xds: list[Tensor],
                 device: torch.device) -> Tensor:
    """The sums of 16/32-bit tensors in float64, from float32 dot products per pack (``_packs``). A pack of
    gradients is scaled by its own power of two (``gradient_scale`` of its largest |entry|: exact, divided out
    in float64); a negated gradient's slice is negated in the pack. When the parameters and the gradients
    share their directions (every parameter has a gradient), a pack of directions serves both."""
    keep = [k for k, g in enumerate(gs) if g.numel()]
    fg, fgd = [gs[k].reshape(-1) for k in keep], [gds[k].reshape(-1) for k in keep]
    neg = [negate[k] for k in keep]
    shared = len(keep) == len(xs) and all(gds[k] is d for k, d in zip(keep, xds))
    fx = [x.reshape(-1) for x in xs]
    rows: list[Tensor] = []  # per pack, float64 [<g, D>, <x, D>, ||g||^2, ||x||^2]
    for pack in _packs(fg):
        g = _packed(fg, pack, 0, device)
        lo, hi = torch.aminmax(g)  # (the largest |entry|: on the CPU 30 times faster than an inf-norm)
        c = gradient_scale(torch.maximum(hi, lo.neg()).reshape(1))
        if len(pack) == 1 and fg[pack[0][0]].dtype == torch.float32:
            g = torch.mul(g, c, out=_scratch(0, g.numel(), device))  # (g is the gradient itself: scale a copy)
        else:
            g.mul_(c)
        at = 0
        for i, a, b in pack:
            if neg[i]:
                g[at:at + b - a].neg_()
            at += b - a
        d = _packed(fgd, pack, 1, device)
        c64 = c.to(F64)
        if shared:
            x = _packed(fx, pack, 2, device)
            r = torch.stack([torch.dot(g, d), torch.dot(x, d), torch.dot(g, g), torch.dot(x, x)]).to(F64)
            rows.append(r / torch.stack([c64, torch.ones_like(c64), c64 * c64, torch.ones_like(c64)]))
        else:
            r = torch.stack([torch.dot(g, d), torch.dot(g, g)]).to(F64)
            rows.append(torch.stack([r[0] / c64, torch.zeros_like(c64), r[1] / (c64 * c64), torch.zeros_like(c64)]))
    if not shared:
        fxd = [d.reshape(-1) for d in xds]
        for pack in _packs(fx):
            x, d = _packed(fx, pack, 2, device), _packed(fxd, pack, 1, device)
            r = torch.stack([torch.dot(x, d), torch.dot(x, x)]).to(F64)
            zero = torch.zeros_like(r[0])
            rows.append(torch.stack([zero, r[0], zero, r[1]]))
    if not rows:
        return torch.zeros(4, dtype=F64, device=device)
    return torch.stack(rows).sum(0)
