"""storage.py: Mechanic's buffers hidden from the base optimizer's lazy state initialisation, published
into the base optimizer (and taken back out when a parameter leaves), and loaded in the dtype their
state mode keeps them in."""

from __future__ import annotations

import pytest
import torch

import manic
from manic.modes import MODES
from manic.state import DELTA, PARAM_KEYS, REF
from manic.storage import hidden

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


# --------------------------------------------------------------------------- publishing and loading
@pytest.mark.parametrize("state", list(MODES))
def test_the_mode_s_buffers_are_published_into_the_base_state(state):
    params = [_param(0), _param(1)]
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt = manic.mechanize(base, state=state)
    assert "mechanic_s" in base.param_groups[0] and not base.state  # the tuner's entries from the start
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    engine = manic.engine_of(opt)
    for s in engine.layout.slots:
        entry = base.state[s.ref()]
        assert {k for k in entry if k in PARAM_KEYS} == set(MODES[state].keys)
        assert all(entry[k] is v for k, v in engine.buffers[s.index].items())  # the engine's tensors, not copies
    assert base.param_groups[0]["mechanic_state"] == state


def test_a_parameter_that_leaves_takes_its_buffers_out_of_the_base_state():
    params = [_param(0), _param(1)]
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    params[1].requires_grad_(False)  # frozen: no longer under Mechanic
    opt.state_dict()  # follows the change
    assert REF in opt.state[params[0]] and params[1] not in opt.state


@pytest.mark.parametrize("fp32_reference", [False, True])
def test_loaded_buffers_take_the_dtype_their_mode_keeps(fp32_reference):
    """A checkpoint's buffers are copied in the dtype the mode keeps them in: Delta float32 for bf16
    parameters, x_ref bf16 (float32 with fp32_reference), whatever dtype they were saved in."""
    p = torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))
    opt = manic.mechanize(torch.optim.SGD([p], lr=0.1), fp32_reference=fp32_reference)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0] = {k: v.double() for k, v in sd["state"][0].items()}
    opt.load_state_dict(sd)
    assert opt.state[p][DELTA].dtype == torch.float32
    assert opt.state[p][REF].dtype == (torch.float32 if fp32_reference else torch.bfloat16)
    assert opt.state[p][REF] is not sd["state"][0][REF]
