"""A training step with a torch.compile'd model under manic (CPU)."""

from __future__ import annotations

import pytest
import torch

import manic


@pytest.mark.timeout(600)
def test_compiled_model_trains_like_eager():
    X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = X[:, :1].sin()
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2))
        fwd = torch.compile(model) if compiled else model
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.mse_loss(fwd(X), y).backward()
            opt.step()
        runs.append((opt.scale.item(), [p.detach().clone() for p in model.parameters()]))
    (s_eager, p_eager), (s_comp, p_comp) = runs
    assert s_eager > 1e-5
    assert s_comp == pytest.approx(s_eager, rel=1e-3)
    for a, b in zip(p_comp, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
