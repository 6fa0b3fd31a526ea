"""groups.py: ``layer_groups``, one param group per layer for ``per_group=True``."""

from __future__ import annotations

import pytest
import torch

import manic


def test_layer_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                torch.nn.Linear(8, 2, bias=False))
    groups = manic.layer_groups(model.parameters(), lr=1e-3)
    ps = list(model.parameters())
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in ps[i:j]]
                                                              for i, j in ((0, 2), (2, 6), (6, 7))]
    assert all(g["lr"] == 1e-3 for g in groups)
    with pytest.raises(ValueError, match="no parameters"):
        manic.layer_groups([])
