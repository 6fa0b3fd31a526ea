"""Every rejected input: the exception type, a message that names the problem, raised at the
earliest point, and (for loads) the live state left untouched."""

from __future__ import annotations

import copy

import pytest
import torch

import manic


def _params(n=2, dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.randn(4, 3, dtype=dtype, requires_grad=True) for _ in range(n)]


def _sgd(params=None, **kw):
    return torch.optim.SGD(params if params is not None else _params(), lr=0.1, **kw)


CONSTRUCTION = [
    # (description, factory, exception, message fragment)
    ("eps = 0", lambda: manic.mechanize(_sgd(), eps=0.0), ValueError, "eps"),
    ("eps < 0", lambda: manic.mechanize(_sgd(), eps=-1e-8), ValueError, "eps"),
    ("s_init = 0", lambda: manic.mechanize(_sgd(), s_init=0.0), ValueError, "s_init"),
    ("num_betas = 0", lambda: manic.mechanize(_sgd(), num_betas=0), ValueError, "num_betas"),
    ("num_betas = 2.5", lambda: manic.mechanize(_sgd(), num_betas=2.5), ValueError, "num_betas"),
    ("num_betas = True", lambda: manic.mechanize(_sgd(), num_betas=True), ValueError, "num_betas"),
    ("weight_decay < 0", lambda: manic.mechanize(_sgd(), weight_decay=-0.1), ValueError, "weight_decay"),
    ("weight_decay nan", lambda: manic.mechanize(_sgd(), weight_decay=float("nan")), ValueError, "weight_decay"),
    ("weight_decay inf", lambda: manic.mechanize(_sgd(), weight_decay=float("inf")), ValueError, "weight_decay"),
    ("eps a string", lambda: manic.mechanize(_sgd(), eps="1e-8"), TypeError, "eps"),
    ("store_delta not bool", lambda: manic.mechanize(_sgd(), store_delta=1), TypeError, "store_delta"),
    ("compile not bool", lambda: manic.mechanize(_sgd(), compile="yes"), TypeError, "compile"),
    ("a model, not an optimizer", lambda: manic.mechanize(torch.nn.Linear(2, 2)), TypeError, "Optimizer"),
    ("a list of params", lambda: manic.mechanize(_params()), TypeError, "Optimizer"),
    ("Updater of a model", lambda: manic.Updater(torch.nn.Linear(2, 2)), TypeError, "Optimizer"),
    ("Mechanic of an optimizer", lambda: manic.Mechanic(_sgd()), TypeError, "Updater"),
    ("every group opted out", lambda: manic.mechanize(torch.optim.SGD([{"params": _params(), "mechanic": False}],
                                                                      lr=0.1)), ValueError, "no parameters"),
    ("complex parameters", lambda: manic.mechanize(_sgd([torch.randn(3, dtype=torch.complex64,
                                                                     requires_grad=True)])), TypeError, "complex"),
    ("mechanize a Mechanized", lambda: manic.mechanize(manic.mechanize(_sgd())), TypeError, "already"),
    ("LBFGS", lambda: manic.mechanize(torch.optim.LBFGS(_params())), TypeError, "LBFGS"),
    ("an invalid reducer", lambda: manic.mechanize(_sgd(), reducer=object()), TypeError, "reducer"),
    ("reducer and process_group", lambda: manic.mechanize(_sgd(), reducer=manic.NoReduce(), process_group=1),
     ValueError, "one of"),
]


@pytest.mark.parametrize("what,factory,exc,fragment", CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_rejected_at_construction(what, factory, exc, fragment):
    with pytest.raises(exc, match=fragment):
        factory()


def test_same_base_mechanized_twice():
    base = _sgd()
    manic.mechanize(base)
    with pytest.raises(TypeError, match="already under Mechanic"):
        manic.mechanize(base)
    with pytest.raises(TypeError, match="already under Mechanic"):
        manic.Mechanic(manic.Updater(base))


def test_parameters_on_different_devices():
    params = [torch.randn(3, requires_grad=True), torch.randn(3, device="meta", requires_grad=True)]
    with pytest.raises(ValueError, match="several devices"):
        manic.mechanize(torch.optim.SGD(params, lr=0.1))


def test_scheduler_attached_to_another_optimizer():
    other = _sgd()
    with pytest.raises(ValueError, match="another optimizer"):
        manic.Updater(_sgd(), torch.optim.lr_scheduler.StepLR(other, 1))


def test_mechanic_optimizer_cannot_be_replaced():
    updater = manic.Updater(_sgd())
    mechanic = manic.Mechanic(updater)
    mechanic.optimizer = updater.base_optimizer  # the seed README's line: fine
    with pytest.raises(ValueError, match="cannot be replaced"):
        mechanic.optimizer = _sgd()


def test_sparse_gradient_at_step():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = manic.mechanize(torch.optim.SGD(emb.parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_mechanic_step_twice_and_updater_step_alone():
    params = _params()
    updater = manic.Updater(_sgd(params))
    mechanic = manic.Mechanic(updater)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="mechanic.step"):
        updater.step()
    mechanic.step()
    with pytest.raises(RuntimeError, match="twice"):
        mechanic.step()
    updater.step()  # the pair still works afterwards
    mechanic.step()
    updater.step()


def test_parameters_added_to_the_base_directly():
    base = _sgd()
    opt = manic.mechanize(base)
    base.add_param_group({"params": [torch.randn(2, dtype=torch.float64, requires_grad=True)]})
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.step()


def _trained(store_delta=True, weight_decay=1e-2, shape=(4, 3)):
    torch.manual_seed(0)
    params = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-2), store_delta=store_delta, weight_decay=weight_decay)
    for t in range(5):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (t + 1))
        opt.step()
    return params, opt


def _snapshot(params, opt):
    return copy.deepcopy(([p.detach() for p in params], opt.state_dict()))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _bad_version(sd):
    sd["param_groups"][0]["mechanic_version"] = 99
    return sd


def _bad_tuner(sd):
    sd["param_groups"][0]["mechanic_s"] = "garbage"
    return sd


LOADS = [
    ("other hyperparameters", lambda: _trained(weight_decay=0.5)[1].state_dict(), "weight_decay"),
    ("other store_delta mode", lambda: _trained(store_delta=False)[1].state_dict(), "store_delta"),
    ("another model", lambda: _trained(shape=(3, 4))[1].state_dict(), "shape"),
    ("unsupported format version", lambda: _bad_version(_trained()[1].state_dict()), "version"),
    ("corrupted tuner entry", lambda: _bad_tuner(_trained()[1].state_dict()), "mechanic_s"),
]


@pytest.mark.parametrize("what,make,fragment", LOADS, ids=[c[0] for c in LOADS])
def test_bad_load_raises_and_leaves_state_untouched(what, make, fragment):
    params, opt = _trained()
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match=fragment):
        opt.load_state_dict(copy.deepcopy(make()))
    assert _same(before, _snapshot(params, opt))
    for p in params:  # and it still steps
        p.grad = torch.ones_like(p)
    opt.step()


def test_bad_seed_load_raises_and_leaves_state_untouched():
    params = _params()
    updater = manic.Updater(torch.optim.AdamW(params, lr=1e-2))
    mechanic = manic.Mechanic(updater)
    for p in params:
        p.grad = torch.ones_like(p)
    mechanic.step()
    updater.step()
    before = copy.deepcopy(mechanic.state_dict())
    other = manic.Mechanic(manic.Updater(torch.optim.AdamW(_params(), lr=1e-2)), num_betas=3)
    with pytest.raises(ValueError, match="num_betas"):
        mechanic.load_state_dict(other.state_dict())
    assert _same(before, mechanic.state_dict())


def test_truncated_checkpoint_file(tmp_path):
    params, opt = _trained()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = _snapshot(params, opt)
    with pytest.raises(Exception):  # torch.load's own error; nothing reaches the optimizer
        opt.load_state_dict(torch.load(path, weights_only=True))
    assert _same(before, _snapshot(params, opt))
