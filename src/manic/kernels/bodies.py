"""What one tensor's sums and rebase compute, as plain tensor code: ``torch.compile`` fuses each body into
one pass over a flat tensor (fused.py). Written in the notation of docs/algorithm.md, "One step"."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ROW = 4096


def _total(t: Tensor) -> Tensor:
    return t.sum()


def _total_rows(t: Tensor) -> Tensor:
    """The sum of a 1-D tensor of at least 4096 elements, in rows of 4096 and then over the rows: compiled,
    this parallelises and vectorises better than one reduction over a dynamic length (about 25% faster on
    CPU). (Inductor 2.13 fails to lower it for fewer elements, so those take ``_total``.)"""
    k = t.shape[0] // ROW * ROW
    return t[:k].view(-1, ROW).sum(1).sum() + t[k:].sum()


def sums_gx(g: Tensor, d: Tensor, x: Tensor, dtype: torch.dtype, total: Callable = _total) -> Tensor:
    """[<g, d>, <x, d>, ||g||^2, ||x||^2] of one tensor (one fused pass when compiled)."""
    g, d, x = g.to(dtype), d.to(dtype), x.to(dtype)
    return torch.stack([total(g * d), total(x * d), total(g * g), total(x * x)])


def sums_x(x: Tensor, d: Tensor, dtype: torch.dtype, total: Callable = _total) -> Tensor:
    """[0, <x, d>, 0, ||x||^2] of one tensor without a gradient."""
    x, d = x.to(dtype), d.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    return torch.stack([zero, total(x * d), zero, total(x * x)])


def sums_g(g: Tensor, d: Tensor, dtype: torch.dtype, total: Callable = _total) -> Tensor:
    """[<g, d>, 0, ||g||^2, 0] of one tensor whose x is not asked for."""
    g, d = g.to(dtype), d.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=g.device)
    return torch.stack([total(g * d), zero, total(g * g), zero])


# The rows forms, each its own function: torch.compile caches per code object, with a limit of 8 variants.
def sums_gx_rows(g: Tensor, d: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    return sums_gx(g, d, x, dtype, _total_rows)


def sums_x_rows(x: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    return sums_x(x, d, dtype, _total_rows)


def sums_g_rows(g: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    return sums_g(g, d, dtype, _total_rows)


def rebase_one(x: Tensor, r: Tensor, d: Tensor, S_old: Tensor, S_new: Tensor, ok: Tensor) -> None:
    """state="ref+delta": Delta += u (u := 0 where it is not finite, everywhere if not ok),
    x = x_ref + S_new * Delta. Everything in Delta's dtype (float32 for 16-bit parameters): the move
    x - x_ref is not rounded to the parameter's dtype first."""
    keep = 1 - S_old * ok
    y = torch.where(ok, x.to(d.dtype) - r.to(d.dtype), 0.0)
    d_new = y + d * keep
    d_new = torch.where(torch.isfinite(d_new), d_new, d)
    x_new = (r.to(d.dtype) + S_new * d_new).to(x.dtype)
    d.copy_(d_new)
    x.copy_(x_new)


def recompute_one(x: Tensor, r: Tensor, dd: Tensor, S_old: Tensor, S_new: Tensor, ok: Tensor,
                  eps: Tensor | float) -> None:
    """state="ref": x = x_ref + S_new * (D_t + u), D_t = dd / (S_old + eps), dd = x_t - x_ref
    (u := 0 where it is not finite, everywhere if not ok)."""
    inv = torch.reciprocal(S_old + eps)
    u = torch.nan_to_num(torch.where(ok, x - r - dd, 0.0), 0.0, 0.0, 0.0)
    x.copy_(r + S_new * (u + dd * inv))


def rebase_delta_one(x: Tensor, p: Tensor, d: Tensor, S_old: Tensor, S_new: Tensor, ok: Tensor) -> None:
    """state="delta", p = x_t: Delta += u (u := 0 where it is not finite, everywhere if not ok),
    x = x_t + S_old * u + (S_new - S_old) * Delta_{t+1}, in Delta's dtype."""
    u = torch.nan_to_num(torch.where(ok, x.to(d.dtype) - p.to(d.dtype), 0.0), 0.0, 0.0, 0.0)
    d_new = d + u
    x_new = (p.to(d.dtype) + (S_old * u + (S_new - S_old) * d_new)).to(x.dtype)
    d.copy_(d_new)
    x.copy_(x_new)
