"""engine.py: structural properties of a step: forms agree bitwise, the invariant holds for every
parameter, no host sync, the state's bytes, torch's lazy state initialisation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import manic
from manic.testing import Count
from helpers import init_params


def _mlp(seed: int, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(123)
    X = torch.randn(64, 6, generator=g, dtype=dtype)
    return X, (X[:, :1] * 1.5 - X[:, 1:2]).tanh()


def _train_dropin(model, opt, sched, steps, X, y):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("store_delta", [True, False])
def test_seed_equals_dropin_bitwise(store_delta):
    X, y = _data()
    m1, m2 = _mlp(0), _mlp(0)
    o1 = manic.mechanize(torch.optim.AdamW(m1.parameters(), lr=1e-2), store_delta=store_delta)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, 40)
    _train_dropin(m1, o1, s1, 40, X, y)

    base = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    updater = manic.Updater(base, torch.optim.lr_scheduler.CosineAnnealingLR(base, 40))
    mechanic = manic.Mechanic(updater, store_delta=store_delta)
    for _ in range(40):
        base.zero_grad()
        torch.nn.functional.mse_loss(m2(X), y).backward()
        mechanic.step()
        updater.step()
    assert o1.scale.item() > 1e-3  # the scale really moved
    assert torch.equal(o1.scale, mechanic.scale)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert mechanic.get_last_lr() == [float(mechanic.scale)]


@pytest.mark.parametrize("store_delta", [True, False])
def test_invariant_every_parameter_including_unused(store_delta):
    """x = x_ref + S * Delta for every parameter at every step, also when its grad is None."""
    params = init_params(0)
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1, momentum=0.9), store_delta=store_delta)
    g = torch.Generator().manual_seed(0)
    x0 = [p.detach().clone() for p in params]
    for t in range(30):
        for i, p in enumerate(params):
            unused = i == 1 and t % 3 != 0  # parameter 1 only gets a gradient every third step
            p.grad = None if unused else torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5
        opt.step()
        for p, p0 in zip(params, x0):
            st = opt.state[p]
            assert torch.equal(st["mechanic_ref"], p0)
            if store_delta:  # (the recompute form defines its direction by this identity)
                torch.testing.assert_close(p, p0 + opt.scale * st["mechanic_delta"], rtol=0, atol=1e-14)
    assert torch.isfinite(opt.scale) and opt.scale > 1e-6


@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("base", ["adamw_fused", "adamw_foreach", "sgd"])
def test_no_host_sync_in_step(store_delta, base):
    X, y = _data(torch.float32)
    model = _mlp(0, torch.float32)
    make = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
            "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
            "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)}[base]
    opt = manic.mechanize(make(model.parameters()), store_delta=store_delta)
    plain_model = _mlp(0, torch.float32)
    plain = make(plain_model.parameters())  # some base optimizers read CPU step counters themselves
    for t in range(4):
        syncs = []
        for m, o in ((model, opt), (plain_model, plain)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(X), y).backward()
            with Count() as counter:
                o.step()
            syncs.append(counter.syncs)
        assert syncs[0] == syncs[1], f"step {t}: Mechanic adds {syncs[0] - syncs[1]} host syncs"
    # the counter does see a sync when there is one
    with Count() as counter:
        opt.scale.item()
    assert counter.syncs == 1


class _LargeAllocations(TorchDispatchMode):
    """Bytes of tensor outputs of out-of-place ops (in-place ops allocate nothing)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.bytes = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])]
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel:
                if t.untyped_storage().data_ptr() not in seen:  # a view or an in-place result is no allocation
                    self.bytes += t.numel() * t.element_size()
        return out


@pytest.mark.parametrize("store_delta", [True, False])
def test_state_and_transient_bytes(store_delta):
    """store_delta=True: two parameter-sized buffers, no transient one; False: one and one."""
    torch.manual_seed(0)
    params = [torch.randn(200, 100, requires_grad=True), torch.randn(300, requires_grad=True)]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1), store_delta=store_delta)  # SGD steps in place
    for t in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with _LargeAllocations(min_numel=300) as alloc:
            opt.step()
        if t > 0:  # the first step allocates the state itself
            assert alloc.bytes == (0 if store_delta else param_bytes)
    state_bytes = sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
                      if k.startswith("mechanic_"))
    assert state_bytes == (2 if store_delta else 1) * param_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_delta_and_tuner_are_float32(dtype):
    p = torch.randn(10, 10, dtype=dtype, requires_grad=True)
    opt = manic.mechanize(torch.optim.AdamW([p], lr=1e-3))
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["mechanic_ref"].dtype == dtype
    assert opt.state[p]["mechanic_delta"].dtype == torch.float32
    assert opt.scale.dtype == torch.float32 and opt.stats()["grad_norm"].dtype == torch.float32


def test_tuner_dtype_follows_float64_model():
    p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = manic.mechanize(torch.optim.SGD([p], lr=0.1), variant="original", s_init=1e-6, weight_decay=1e-2)
    assert opt.scale.dtype == torch.float64
    assert opt.scale.item() == pytest.approx(6 * 1e-6)  # n * s_init before the first step
    inv = manic.mechanize(torch.optim.SGD([p], lr=0.1), variant="invariant")
    assert inv.scale.dtype == torch.float64 and inv.param_groups[0]["mechanic_lr_ref"].dtype == torch.float64


def test_state_keys_are_prefixed():
    X, y = _data()
    model = _mlp(0)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = manic.mechanize(base)
    _train_dropin(model, opt, torch.optim.lr_scheduler.StepLR(opt, 10), 2, X, y)
    plain = torch.optim.AdamW(_mlp(0).parameters(), lr=1e-2)
    plain_keys = {"step", "exp_avg", "exp_avg_sq"}
    sd = opt.state_dict()
    for entry in sd["state"].values():
        added = set(entry) - plain_keys
        assert added and all(k.startswith("mechanic_") for k in added)
    added = set(sd["param_groups"][0]) - set(plain.state_dict()["param_groups"][0]) - {"initial_lr"}
    assert added and all(k.startswith("mechanic_") for k in added)


@pytest.mark.parametrize("store_delta", [True, False])
def test_lazy_state_init_moves_nothing(store_delta):
    """torch.distributed.checkpoint's lazy init (a step at lr=0 with zero grads on an
    optimizer without state) moves no parameter and leaves the tuner as a fresh one."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    X, y = _data()
    model = _mlp(0)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2), store_delta=store_delta)
    before = [p.detach().clone() for p in model.parameters()]
    osd = get_optimizer_state_dict(model, opt)
    fresh = manic.mechanize(torch.optim.AdamW(_mlp(0).parameters(), lr=1e-2), store_delta=store_delta)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    for k, v in fresh.state_dict()["param_groups"][0].items():
        if k.startswith("mechanic_"):
            got = opt.param_groups[0][k]
            assert (torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v), k
    assert opt.param_groups[0]["lr"] == 1e-2
    # the template the checkpoint tools fill in carries Mechanic's buffers
    assert all("mechanic_ref" in entry for entry in osd["state"].values())

    # and training from there is a fresh start: same as a base optimizer that was lazily
    # initialised the same way before Mechanic was attached
    model2 = _mlp(0)
    base2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    get_optimizer_state_dict(model2, base2)
    opt2 = manic.mechanize(base2, store_delta=store_delta)
    _train_dropin(model, opt, torch.optim.lr_scheduler.StepLR(opt, 100), 10, X, y)
    _train_dropin(model2, opt2, torch.optim.lr_scheduler.StepLR(opt2, 100), 10, X, y)
    assert torch.equal(opt.scale, opt2.scale)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_zero_initialised_parameters_no_nan():
    torch.manual_seed(0)
    w = torch.zeros(8, 4, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    opt = manic.mechanize(torch.optim.AdamW([w, b], lr=1e-2))
    X = torch.randn(32, 4)
    for _ in range(50):
        opt.zero_grad()
        ((X @ w.T + b - 1.0) ** 2).mean().backward()
        opt.step()
    assert torch.isfinite(opt.scale) and opt.scale > 1e-6
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    for k in ("h", "grad_norm", "param_norm"):
        assert torch.isfinite(opt.stats()[k])


def test_user_supplied_reducer_is_called_once_per_step_with_the_packed_sums():
    class Doubling:
        """Pretends a second rank holds an identical copy of the model: sums double."""

        def __init__(self):
            self.calls = []

        def all_reduce_sum(self, tensor):
            self.calls.append(tensor.clone())
            return tensor * 2

    params, twin_a, twin_b = init_params(0), init_params(0), init_params(0)
    reducer = Doubling()
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1), reducer=reducer)
    # the same model twice in one process is what the doubled sums describe
    both = manic.mechanize(torch.optim.SGD(twin_a + twin_b, lr=0.1))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 for p in params]
        for p, a, b, gr in zip(params, twin_a, twin_b, grads):
            p.grad, a.grad, b.grad = gr.clone(), gr.clone(), gr.clone()
        opt.step()
        both.step()
    assert len(reducer.calls) == 20 and all(c.shape == (4,) for c in reducer.calls)
    torch.testing.assert_close(opt.scale, both.scale, rtol=1e-12, atol=0)
