"""state.py: hiding Mechanic's buffers from the base optimizer's lazy state initialisation, and
the state-dict layout."""

from __future__ import annotations

import pytest
import torch

import manic
from manic.state import DELTA, REF, hidden, strip_mechanic

F64 = torch.float64
LAZY = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),  # initialises at construction: never bare
}


def _param(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_()


@pytest.mark.parametrize("name", sorted(LAZY))
def test_hidden_buffers_let_the_base_initialise_its_state(name):
    """A parameter whose state holds only Mechanic's buffers steps exactly like a fresh one,
    and the buffers (the same tensor objects) are back afterwards."""
    p, twin = _param(), _param()
    for t in (p, twin):
        t.grad = torch.full_like(t, 0.5)
    opt, plain = LAZY[name]([p]), LAZY[name]([twin])
    mine = {REF: torch.zeros(3, 4, dtype=F64), DELTA: torch.ones(3, 4, dtype=F64)}
    opt.state[p].update(mine)
    bare = name != "Adagrad"  # Adagrad's entry already holds its own state: nothing to hide
    with hidden(opt, [p]):
        assert all((k in opt.state[p]) != bare for k in mine)
        opt.step()
    plain.step()
    assert torch.equal(p, twin)
    assert set(opt.state[p]) == set(plain.state[twin]) | set(mine)
    assert all(opt.state[p][k] is v for k, v in mine.items())
    for k, v in plain.state[twin].items():
        assert torch.equal(opt.state[p][k], v), k


def test_without_hiding_adam_would_skip_its_initialisation():
    """Why hiding is needed: the check the test above guards against."""
    p = _param()
    p.grad = torch.ones_like(p)
    opt = torch.optim.Adam([p], lr=1e-2)
    opt.state[p][REF] = torch.zeros_like(p)
    with pytest.raises(KeyError):
        opt.step()


def test_hidden_restores_the_buffers_when_the_step_raises():
    p = _param()
    opt = torch.optim.Adam([p], lr=1e-2)
    buf = torch.zeros_like(p)
    opt.state[p][REF] = buf
    with pytest.raises(RuntimeError, match="boom"):
        with hidden(opt, [p]):
            raise RuntimeError("boom")
    assert opt.state[p][REF] is buf


def test_hidden_leaves_entries_with_base_state_alone():
    p = _param()
    opt = torch.optim.SGD([p], lr=1e-2, momentum=0.9)
    opt.state[p].update({"momentum_buffer": torch.ones_like(p), REF: torch.zeros_like(p)})
    with hidden(opt, [p]):
        assert REF in opt.state[p]


def test_strip_mechanic_splits_a_full_state_dict():
    params = [_param(0), _param(1)]
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-2))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    base, mine = strip_mechanic(opt.state_dict())
    assert not any(k.startswith("mechanic_") for g in base["param_groups"] for k in g)
    assert all(not any(k.startswith("mechanic_") for k in st) for st in base["state"].values())
    assert sorted(mine["state"]) == [0, 1] and set(mine["state"][0]) == {REF, DELTA}
    assert mine["tuner"]["mechanic_version"] == 1
