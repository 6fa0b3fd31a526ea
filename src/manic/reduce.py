"""How Mechanic's per-step partial sums become global sums: the process-group abstraction.

A reducer has one method, ``all_reduce_sum(tensor)``, which returns the elementwise sum of
``tensor`` over every rank that holds a part of the model. Mechanic calls it exactly once per
step with one small packed tensor. ``NoReduce`` is the single-process (and fully replicated,
e.g. DDP) case: the local sums already are the global ones, so no collective is issued.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Reducer(Protocol):
    """Sums a tensor over the ranks that share a model; called once per step."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...


class NoReduce:
    """Single process, or parameters replicated on every rank: nothing to combine."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def __repr__(self) -> str:
        return "NoReduce()"
