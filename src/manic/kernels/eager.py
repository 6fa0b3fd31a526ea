"""The eager kernels: torch's foreach and out= ops over the lists of local shards (the default).

The sums are in sums.py. The rebase runs one foreach op per elementwise step over all tensors of a dtype,
plus one ``nan_to_num`` per tensor (torch has no foreach form of it); the rebase of 16-bit parameters takes
one float32 tensor at a time, state="delta" the copy of x_t it took before the base step.

Float64 tensors keep the arithmetic of manic 0.3 bit for bit (tests/golden): the stored form's
``Delta + u`` as ``(x - x_ref) + (1 - S_old) * Delta``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compat import foreach_add_, foreach_addcmul_, foreach_mul_, foreach_sub_
from .sums import partial_sums_eager

__all__ = ["partial_sums_eager", "rebase_delta_eager", "rebase_eager", "rebase_recompute_eager"]

F64 = torch.float64


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
