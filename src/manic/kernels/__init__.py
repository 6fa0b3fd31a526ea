"""The per-tensor work of a step, as kernel sets with one signature each.

``EAGER`` (eager.py, its sums in sums.py) uses torch's foreach and out= kernels; ``compiled()`` runs the fusable kernels
(fused.py, over the per-tensor bodies of bodies.py) through ``torch.compile``, which fuses each into a
single pass over one tensor, shared by all tensors (opt in with ``compile=True``: the first step pays the
compile); tensors below ``SMALL`` elements stay eager. ``for_step`` picks the set a step runs with. A state
mode (modes.py) picks its rebase from the set. All tensors here are local shards; the 0-dim tensors
live on the same device.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..compat import dispatch_mode_active
from . import bodies
from . import sums  # noqa: F401  (kernels.sums: the eager sums)
from .eager import partial_sums_eager, rebase_delta_eager, rebase_eager, rebase_recompute_eager
from .fused import partial_sums_fusable, rebase_delta_fusable, rebase_fusable, rebase_recompute_fusable

__all__ = ["EAGER", "SMALL", "Kernels", "compiled", "for_step", "partial_sums_eager", "partial_sums_fusable",
           "rebase_delta_eager", "rebase_delta_fusable", "rebase_eager", "rebase_fusable", "rebase_recompute_eager",
           "rebase_recompute_fusable"]


class Kernels(NamedTuple):
    partial_sums: Callable[..., Tensor]
    rebase: Callable[..., None]  # state "ref+delta"
    rebase_recompute: Callable[..., None]  # state "ref"
    rebase_delta: Callable[..., None]  # state "delta"


EAGER = Kernels(partial_sums_eager, rebase_eager, rebase_recompute_eager, rebase_delta_eager)
_compiled: Kernels | None = None


# Below this many elements a compiled call's fixed cost (~0.1 ms on CPU) exceeds what fusing saves over
# the eager foreach kernels, which take all small tensors in one launch per op (docs/performance.md).
SMALL = 1 << 17


def _split_small(fused: Callable, eager: Callable) -> Callable:
    """A rebase that sends tensors of fewer than SMALL elements to ``eager`` and the others to ``fused``."""
    def run(xs: list[Tensor], refs: list[Tensor], others: list[Tensor], *args: object) -> None:
        small = [x.numel() < SMALL for x in xs]
        for fn, want in ((eager, True), (fused, False)):
            picked = [i for i, sm in enumerate(small) if sm == want]
            if picked:
                fn([xs[i] for i in picked], [refs[i] for i in picked], [others[i] for i in picked], *args)
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
            return lambda *args: (rows if args[0].numel() >= bodies.ROW else flat)(*args)

        sums_gx, sums_x, sums_g = (by_length(fuse(f), fuse(r)) for f, r in (
            (bodies.sums_gx, bodies.sums_gx_rows), (bodies.sums_x, bodies.sums_x_rows),
            (bodies.sums_g, bodies.sums_g_rows)))
        rebase_one, recompute_one, delta_one = map(fuse, (bodies.rebase_one, bodies.recompute_one,
                                                          bodies.rebase_delta_one))
        _compiled = Kernels(_split_small_sums(partial(partial_sums_fusable, one=sums_gx, xonly=sums_x, gonly=sums_g)),
                            _split_small(partial(rebase_fusable, one=rebase_one), rebase_eager),
                            _split_small(partial(rebase_recompute_fusable, one=recompute_one), rebase_recompute_eager),
                            _split_small(partial(rebase_delta_fusable, one=delta_one), rebase_delta_eager))
    return _compiled


def for_step(chosen: Kernels) -> Kernels:
    """The set a step runs with: ``chosen``, or the eager one under a TorchDispatchMode (FlopCounterMode, a
    profiler's op counter), where compiled code cannot run."""
    return EAGER if chosen is not EAGER and dispatch_mode_active() else chosen
