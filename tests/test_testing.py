"""testing.py: ``manic.testing.run`` starts real gloo ranks: the results come back in rank order, and a
rank that raises fails the call with its traceback instead of hanging it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from manic import testing


def _sum_of_ranks(rank: int, world: int, scale: float) -> dict:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "total": t.item() * scale}


def _rank_one_raises(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    return rank


@pytest.mark.timeout(120)
def test_results_in_rank_order():
    assert testing.run(2, _sum_of_ranks, 2.0, timeout=90) == [{"rank": r, "world": 2, "total": 2.0} for r in (0, 1)]


@pytest.mark.timeout(120)
def test_a_rank_that_raises_fails_the_call_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: rank one fails on purpose"):
        testing.run(2, _rank_one_raises, timeout=90)
