"""The eager kernels: torch's foreach and out= ops over the lists of local shards (the default).

A step's work is a handful of multi-tensor dispatches whatever the number of tensors (issue 29): the sums
take the squared norms in one ``foreach_norm`` per list and the dot products one ``torch.dot`` per tensor;
the rebase runs one foreach op per elementwise step over all tensors of a dtype, plus one
``nan_to_num`` per tensor (torch has no foreach form of it). No transient parameter-sized buffer
outlives one call: the sums of 16/32-bit gradients take a scaled copy of the gradients (16-bit ones
widened), the rebase of 16-bit parameters one float32 tensor at a time, state="delta" the copy of x_t
it took before the base step.

Float64 tensors keep the arithmetic of manic 0.3 bit for bit (tests/golden): per-tensor dot products
summed in order, and the stored form's ``Delta + u`` as ``(x - x_ref) + (1 - S_old) * Delta``.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ..compat import foreach_add_, foreach_addcmul_, foreach_copy_, foreach_mul_, foreach_norm_out, foreach_sub_

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ the sums
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


# ------------------------------------------------------------------------------------------------ the rebases
# Every rebase drops a non-finite base update u elementwise (issue 28): where u is not finite, Delta keeps
# its value and x goes to the point its state mode's invariant gives for u = 0. ``ok`` (the step's sums
# were finite) is folded in by making u NaN everywhere when it is false, so one elementwise guard, a
# nan_to_num, serves both: no host sync, no collective.
def _nan_unless(ok: Tensor, value: Tensor | float) -> Tensor:
    """``value`` where ok, NaN otherwise (0-dim, on the device)."""
    return torch.where(ok, value, float("nan"))


def _each(factor: Tensor, ts: list[Tensor]) -> list[Tensor]:
    """A 0-dim factor once per tensor of ``ts``, in their dtype (what the single-tensor op would compute
    with: a 0-dim operand does not promote a tensor's dtype; torch's foreach out= ops want it given so)."""
    return [factor.to(ts[0].dtype)] * len(ts)


def _zero_nonfinite_(ts: list[Tensor]) -> None:
    for t in ts:
        torch.nan_to_num(t, 0.0, 0.0, 0.0, out=t)


def _by_kind(xs: list[Tensor], refs: list[Tensor], ds: list[Tensor]) -> tuple[list, list, list]:
    """(float64 triples whose parameter has Delta's dtype, other such triples, triples whose Delta is wider
    than the parameter: 16-bit parameters, whose move is taken in Delta's float32)."""
    f64, same, wide = [], [], []
    for t in zip(xs, refs, ds):
        x, _, d = t
        (wide if x.dtype != d.dtype else f64 if x.dtype == F64 else same).append(t)
    return f64, same, wide


def rebase_eager(xs: list[Tensor], refs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                 ok: Tensor) -> None:
    """state="ref+delta". On entry xs hold x_after (the base step's result), ds hold Delta_t.
    u = x_after - x_ref - S_old * Delta (u := 0 where it is not finite, everywhere if not ok);
    Delta <- Delta + u; x <- x_ref + S_new * Delta."""
    f64, same, wide = _by_kind(xs, refs, ds)
    if f64:
        _rebase_f64([t[0] for t in f64], [t[1] for t in f64], [t[2] for t in f64], S_old, S_new, ok)
    if same:
        for dt in {t[0].dtype for t in same}:  # (one dtype per group: foreach ops take one)
            xs_s, rs_s, ds_s = ([t[i] for t in same if t[0].dtype == dt] for i in range(3))
            foreach_sub_(xs_s, rs_s)  # x - x_ref
            foreach_addcmul_(xs_s, ds_s, _each(_nan_unless(ok, -S_old), xs_s))  # u
            _zero_nonfinite_(xs_s)
            foreach_add_(ds_s, xs_s)  # Delta + u
            for x, r, d in zip(xs_s, rs_s, ds_s):  # (torch's foreach out= form of this is slower on CPU)
                torch.addcmul(r, d, S_new, out=x)  # x = x_ref + S_new * Delta
    if wide:
        neg = _nan_unless(ok, -S_old)
        for x, r, d in wide:  # 16-bit parameters: the move in float32, one tensor at a time
            u = x.to(d.dtype)
            u.sub_(r).addcmul_(d, neg)
            torch.nan_to_num(u, 0.0, 0.0, 0.0, out=u)
            d.add_(u)
            x.copy_(torch.addcmul(r, d, S_new, out=u))


def _rebase_f64(xs: list[Tensor], rs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                ok: Tensor) -> None:
    """The stored form in float64, bit for bit as manic 0.3 computed it where u is finite:
    Delta <- (x - x_ref) + (1 - S_old) * Delta; where u is not finite, Delta is kept exactly through the
    factor K = 1 (and x - x_ref := 0) instead of 1 - S_old."""
    keep = 1 - S_old
    foreach_addcmul_(xs, rs, _each(_nan_unless(ok, -1.0), xs))  # y = x - x_ref (exactly), NaN if not ok
    for x, r, d in zip(xs, rs, ds):
        k = torch.addcmul(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))  # keep, NaN where y is not
        torch.nan_to_num(k, 1.0, 1.0, 1.0, out=k)
        torch.nan_to_num(x, 0.0, 0.0, 0.0, out=x)
        torch.addcmul(x, d, k, out=d)
        torch.addcmul(r, d, S_new, out=x)


def rebase_recompute_eager(xs: list[Tensor], refs: list[Tensor], diffs: list[Tensor], S_old: Tensor,
                           S_new: Tensor, ok: Tensor, eps: Tensor | float) -> None:
    """state="ref". diffs hold x_t - x_ref (taken before the base step).
    x <- x_ref + S_new * (D_t + u) with D_t = diffs / (S_old + eps), u = x_after - x_t (u := 0 where it is
    not finite, everywhere if not ok)."""
    inv, m1 = torch.reciprocal(S_old + eps), _nan_unless(ok, -1.0)
    same = [t for t in zip(xs, refs, diffs) if t[1].dtype == t[0].dtype]
    wide = [t for t in zip(xs, refs, diffs) if t[1].dtype != t[0].dtype]
    for dt in {t[0].dtype for t in same}:
        xs_s, rs_s, dd_s = ([t[i] for t in same if t[0].dtype == dt] for i in range(3))
        foreach_sub_(xs_s, rs_s)
        foreach_addcmul_(xs_s, dd_s, _each(m1, xs_s))  # u
        _zero_nonfinite_(xs_s)
        foreach_addcmul_(xs_s, dd_s, _each(inv, xs_s))  # D_t + u
        for x, r in zip(xs_s, rs_s):
            torch.addcmul(r, x, S_new, out=x)
    for x, r, dd in wide:  # a float32 reference for 16-bit parameters: u in float32, one tensor at a time
        u = torch.sub(x, r).addcmul_(dd, m1)
        torch.nan_to_num(u, 0.0, 0.0, 0.0, out=u)
        torch.addcmul(u, dd, inv, out=u)
        torch.addcmul(r, u, S_new, out=x)


def rebase_delta_eager(xs: list[Tensor], prevs: list[Tensor], ds: list[Tensor], S_old: Tensor, S_new: Tensor,
                       ok: Tensor) -> None:
    """state="delta". On entry xs hold x_after, prevs x_t (the step's transient copy), ds Delta_t.
    u = x_after - x_t (u := 0 where it is not finite, everywhere if not ok); Delta <- Delta + u;
    x <- x_t + (S_new - S_old) * Delta_t + S_new * u = x_t + ((S_new - S_old) * Delta_{t+1} + S_old * u)."""
    dS, m1 = S_new - S_old, _nan_unless(ok, -1.0)
    same = [t for t in zip(xs, prevs, ds) if t[2].dtype == t[0].dtype]
    wide = [t for t in zip(xs, prevs, ds) if t[2].dtype != t[0].dtype]  # (Delta is float32 for 16-bit ones)
    for dt in {t[0].dtype for t in same}:
        xs_s, ps_s, ds_s = ([t[i] for t in same if t[0].dtype == dt] for i in range(3))
        foreach_addcmul_(xs_s, ps_s, _each(m1, xs_s))  # u = x_after - x_t, NaN if not ok
        _zero_nonfinite_(xs_s)
        foreach_add_(ds_s, xs_s)
        foreach_mul_(xs_s, S_old.to(dt))
        foreach_addcmul_(xs_s, ds_s, _each(dS, xs_s))
        foreach_add_(xs_s, ps_s)  # the increment, added to x_t in one rounding
    for x, p, d in wide:  # in Delta's float32, one tensor at a time
        u = x.to(d.dtype)
        u.addcmul_(p, m1)
        torch.nan_to_num(u, 0.0, 0.0, 0.0, out=u)
        d.add_(u)
        u.mul_(S_old).addcmul_(d, dS).add_(p)
        x.copy_(u)
