"""Edits between steps, and the other ways to change Mechanic's parameters behind its back.

An edit made in place under ``torch.no_grad()`` (a layer re-initialised, a snapshot loaded into the model, a
clamp) is kept as an edit in every state mode: ``state="delta"`` keeps it by construction (x_ref is implied),
and ``state="ref+delta"`` moves x_ref by it (src/manic/edits.py) instead of multiplying it by the scale at the
next step. Two parameters sharing memory, a step of the base optimizer that Mechanic does not run, and a
shape changed through ``.data`` are refused with a message that names the fix.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manic

LR = 1e-3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    X, Y = _data()
    opt.zero_grad()
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()


EDITS = {
    "fill": lambda m, snap: m[2].weight.fill_(0.5),
    "reset_parameters": lambda m, snap: m[0].reset_parameters(),
    "load_state_dict": lambda m, snap: m.load_state_dict(snap),  # a rollback, the optimizer kept
    "clamp": lambda m, snap: [p.clamp_(-0.05, 0.05) for p in m.parameters()],
    "one_row": lambda m, snap: m[0].weight[2].mul_(3.0),
}


def _run(state: str, edit: str, steps_after: int = 5) -> tuple[list[torch.Tensor], list[float]]:
    model = _model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=LR), state=state)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    scales = []
    for _ in range(8):
        _step(model, opt)
    with torch.no_grad():
        EDITS[edit](model, snap)
    for _ in range(steps_after):
        _step(model, opt)
        scales.append(float(opt.scale))
    return [p.detach().clone() for p in model.parameters()], scales


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_every_state_mode_keeps_an_edit(edit):
    """The default ref+delta agrees with state="delta" (which keeps any edit by construction: x_ref is
    implied) to float64 rounding after an edit and five more steps."""
    delta, s_delta = _run("delta", edit)
    ref_delta, s_ref_delta = _run("ref+delta", edit)
    for a, b in zip(ref_delta, delta):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (edit, (a - b).abs().max())
    assert s_ref_delta == pytest.approx(s_delta, rel=1e-9)


def _trained_sgd(state: str) -> tuple[nn.Parameter, torch.optim.Optimizer]:
    """A float64 weight after six steps of mechanized SGD (lr 0.1) in ``state``."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    opt = manic.mechanize(torch.optim.SGD([w], lr=0.1), state=state)
    for _ in range(6):
        opt.zero_grad()
        (w.sin().sum()).backward()
        opt.step()
    return w, opt


def test_state_ref_takes_an_edit_into_its_displacement():
    """state="ref" keeps no Delta: an edit becomes part of D = x - x_ref, which the next step scales by
    S_new / (S_old + eps) (zero gradient, SGD: the base step moves nothing), as docs/behaviour.md says."""
    w, opt = _trained_sgd("ref")
    ref = opt.state[w]["mechanic_ref"].clone()
    S_old = opt.scale.clone()
    with torch.no_grad():
        w[1].fill_(7.0)
    edited = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    eps = manic.Options().hyper.eps / 0.1  # eps in the scale's units (lr_ref = 0.1)
    assert torch.equal(opt.state[w]["mechanic_ref"], ref)
    assert torch.allclose(w.detach(), ref + opt.scale / (S_old + eps) * (edited - ref), rtol=1e-12, atol=1e-14)


def test_edit_survives_the_next_step_by_hand():
    """SGD without momentum and a zero gradient: the base step moves nothing, so after an edit the next step
    leaves x = x_edit + (S_new - S_old) * Delta (Delta unchanged), with x_ref = x_edit - S_old * Delta; an
    element the edit left alone keeps its x_ref bit for bit."""
    w, opt = _trained_sgd("ref+delta")
    st = opt.state[w]
    ref_before, delta = st["mechanic_ref"].clone(), st["mechanic_delta"].clone()
    S_old = opt.scale.clone()
    with torch.no_grad():
        w[1].fill_(7.0)
    edited = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    S_new = opt.scale
    assert torch.allclose(st["mechanic_delta"], delta, rtol=1e-12, atol=0)  # (u = 0: rounding only)
    expect_ref = ref_before.clone()
    expect_ref[1] = edited[1] - S_old * delta[1]
    assert torch.allclose(st["mechanic_ref"], expect_ref, rtol=0, atol=1e-14)
    assert torch.equal(st["mechanic_ref"][[0, 2, 3]], ref_before[[0, 2, 3]])  # untouched rows: bit for bit
    assert torch.allclose(w.detach(), edited + (S_new - S_old) * delta, rtol=0, atol=1e-13)
    assert float((w.detach()[1] - 7.0).abs().max()) < 1e-2  # (before the fix: about S_new * 7 away)


def test_no_edit_changes_nothing():
    """Without an edit the check is idle: the trajectory is the one manic 0.3 computed (tests/golden pins
    it bitwise); here, a run with a model.load_state_dict of the model's own current weights (an in-place
    copy that changes no value) is bitwise the uninterrupted one."""
    def run(reload: bool) -> list[torch.Tensor]:
        model = _model()
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=LR))
        for i in range(10):
            if reload and i == 5:
                model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
            _step(model, opt)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_memory_shared_by_two_parameters_is_refused():
    """Weights tied by assigning .data are two Parameters over one memory: refused when wrapping, and at the
    first step if the tie is made after wrapping; disjoint views of one flat buffer train as separate tensors."""
    enc, dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    dec.weight.data = enc.weight.data
    with pytest.raises(ValueError, match=r"share memory.*b\.weight = a\.weight"):
        manic.mechanize(torch.optim.AdamW([enc.weight, dec.weight], lr=LR))
    enc, dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    opt = manic.mechanize(torch.optim.AdamW([enc.weight, dec.weight], lr=LR))
    dec.weight.data = enc.weight.data
    x = torch.randn(2, 4)
    dec(enc(x)).sum().backward()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()

    flat = torch.randn(30, dtype=torch.float64)
    views = [nn.Parameter(flat[:12].view(3, 4)), nn.Parameter(flat[12:].view(6, 3))]
    apart = [nn.Parameter(v.detach().clone()) for v in views]
    runs = []
    for ps in (views, apart):
        opt = manic.mechanize(torch.optim.AdamW(ps, lr=LR))
        for _ in range(5):
            opt.zero_grad()
            (ps[0].sin().sum() + ps[1].cos().sum()).backward()
            opt.step()
        runs.append([p.detach().clone() for p in ps])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_stepping_the_base_optimizer_directly_is_refused():
    """After wrapping, base.step() raises before it changes anything (the update would land unscaled); the
    seed API's optimizer likewise; the wrapped step and updater.step() run as before."""
    model = _model()
    base = torch.optim.AdamW(model.parameters(), lr=LR)
    opt = manic.mechanize(base)
    for _ in range(3):
        _step(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in base.state[next(model.parameters())].items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match="under Mechanic: step the optimizer manic.mechanize returned"):
        base.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(v, base.state[next(model.parameters())][k]) for k, v in state.items())
    _step(model, opt)

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    updater = manic.Updater(optimizer)
    mechanic = manic.Mechanic(updater)
    X, Y = _data()
    nn.functional.mse_loss(model(X), Y).backward()
    mechanic.step()
    updater.step()
    with pytest.raises(RuntimeError, match="mechanic.step\\(\\) then updater.step\\(\\)"):
        optimizer.step()


def test_shape_changed_through_data_is_named():
    """An embedding grown through .data after the start: a clear error naming the parameter and the change,
    not a size mismatch inside the kernels; nothing is committed."""
    emb = nn.Embedding(5, 3)
    opt = manic.mechanize(torch.optim.AdamW(emb.parameters(), lr=LR))
    emb(torch.tensor([0, 1])).sum().backward()
    opt.step()
    emb.weight.data = torch.cat([emb.weight.data, torch.zeros(2, 3)])
    opt.zero_grad()
    emb(torch.tensor([0, 6])).sum().backward()
    with pytest.raises(RuntimeError, match="changed shape"):
        opt.step()
