"""torch.compile and compile=True on the CPU: a compiled model, a compiled ``opt.step`` and the compiled kernels
follow the eager step."""

from __future__ import annotations

import pytest
import torch

import manic

ORIGINAL = {"variant": "original", "s_init": 1e-6, "weight_decay": 1e-2}  # optax's values


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", ["original", "invariant"])
def test_compiled_model_trains_like_eager(variant):
    """The compiled forward rounds differently in float32 (~1e-7). In the original form the scale is
    still small after 30 steps; the invariant form rises to an effective lr near the base lr within
    ~20 steps, after which such differences grow chaotically (2e-3 by step 30), so it compares 20
    steps, more tightly."""
    options, steps, rel = (ORIGINAL, 30, 1e-3) if variant == "original" else ({"variant": "invariant"}, 20, 1e-5)
    X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = X[:, :1].sin()
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-2), **options)
        fwd = torch.compile(model) if compiled else model
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(fwd(X), y).backward()
            opt.step()
        runs.append((opt.scale.item(), [p.detach().clone() for p in model.parameters()]))
    (s_eager, p_eager), (s_comp, p_comp) = runs
    assert s_eager > (1e-5 if variant == "original" else 0.1)
    assert s_comp == pytest.approx(s_eager, rel=rel)
    for a, b in zip(p_comp, p_eager):
        torch.testing.assert_close(a, b, rtol=rel, atol=rel / 10)


def _eager_and_compiled(seed, target, make, steps, between=None, scale=torch.Tensor.item):
    """For compiled False, then True: ``make(model, compiled) -> (opt, step)`` on a fresh float64
    Linear-Tanh-Linear model (torch seed 0), trained full batch on 32 samples (generator ``seed``) towards
    ``target(X)``, ``between(step, model, opt)`` before each step. Returns, per run, (``scale(opt.scale)``
    after each step, the final parameters)."""
    X = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = target(X)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
        opt, step = make(model, compiled)
        scales = []
        for t in range(steps):
            if between is not None:
                between(t, model, opt)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), y).backward()
            step()
            scales.append(scale(opt.scale))
        runs.append((scales, [p.detach().clone() for p in model.parameters()]))
    return runs


@pytest.mark.timeout(600)
def test_user_compiled_step_follows_eager():
    """torch.compile(opt.step), torch's documented way to speed up an optimizer step, gives the eager
    trajectory: Mechanic's step traces (with graph breaks at its host-side bookkeeping) and computes
    the same float64 values. (SGD with momentum as the base: torch's compiled AdamW itself differs from
    its eager form by ~1e-5 in float64, which would hide Mechanic's part.)"""

    def make(model, compiled):
        opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        return opt, torch.compile(opt.step) if compiled else opt.step

    runs = _eager_and_compiled(1, lambda X: X[:, :1].sin(), make, 12)
    (s_eager, p_eager), (s_comp, p_comp) = runs
    assert s_eager[-1] > 10 * s_eager[0]  # the scale moved
    assert s_comp == pytest.approx(s_eager, rel=1e-12)
    for a, b in zip(p_comp, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.timeout(600)
def test_compiled_kernels_split_small_and_large_tensors():
    """compile=True sends tensors below kernels.SMALL elements to the eager kernels and the others to
    the compiled ones; on a mix of both, every function gives the eager result (float64)."""
    from manic import kernels

    gen = torch.Generator().manual_seed(0)
    shapes = [(kernels.SMALL,), (3, 4), (2, kernels.SMALL // 2 + 1), (7,)]
    make = lambda: [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]  # noqa: E731
    gs, ds, xs, refs = make(), make(), make(), make()
    S_old, S_new, ok = (torch.tensor(v, dtype=torch.float64) for v in (0.5, 0.7, 1.0))
    ok = ok.bool()
    fused = kernels.compiled()
    args = (gs[:3], ds[:3], [False, True, False], xs, ds, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(fused.partial_sums(*args), kernels.EAGER.partial_sums(*args), rtol=1e-12, atol=0)
    for name in kernels.Kernels._fields[1:]:  # every rebase
        extra = (1e-8,) if name == "rebase_recompute" else ()
        outs = []
        for k in (kernels.EAGER, fused):
            x2, r2, d2 = [t.clone() for t in xs], [t.clone() for t in refs], [t.clone() for t in ds]
            getattr(k, name)(x2, r2, d2, S_old, S_new, ok, *extra)
            outs.append(x2 + d2)
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("state", ["ref+delta", "delta"])
@pytest.mark.parametrize("per_group", [False, True])
def test_compiled_step_follows_eager_through_changes_between_steps(state, per_group, monkeypatch):
    """compile=True follows the eager step on the same float64 trajectory, through an in-place change of
    the parameters between steps and a load_state_dict that replaces Mechanic's buffers."""
    from manic import kernels

    monkeypatch.setattr(kernels, "SMALL", 0)  # (these tensors are small: compile them all)

    def make(model, compiled):
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
        opt = manic.mechanize(torch.optim.SGD(groups, lr=0.1, momentum=0.9), compile=compiled, state=state,
                              per_group=per_group, weight_decay=0.1)
        return opt, opt.step

    def between(step, model, opt):
        if step == 4:
            with torch.no_grad():
                model[0].weight.mul_(1.01)  # a change between steps
        if step == 6:
            opt.load_state_dict(opt.state_dict())  # Mechanic's buffers replaced

    runs = _eager_and_compiled(2, lambda X: X[:, :1].cos(), make, 8, between, torch.Tensor.clone)
    (s_eager, p_eager), (s_comp, p_comp) = runs
    for a, b in zip(s_comp, s_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for a, b in zip(p_comp, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.timeout(600)
def test_compiled_sums_at_lengths_around_the_row(monkeypatch):
    """The compiled sums reduce tensors of 4096 elements or more in rows (kernels._total_rows) and
    shorter ones in one reduction; at lengths on both sides of the row and not a multiple of it,
    in either order, every entry is the float64 dot product."""
    from manic import kernels

    monkeypatch.setattr(kernels, "SMALL", 0)
    gen = torch.Generator().manual_seed(3)
    fused, cpu, f64 = kernels.compiled(), torch.device("cpu"), torch.float64
    for n in (5000, 2, 4095, 4096, 4097, 3 * 4096 + 1):
        g, d, x = (torch.randn(n, dtype=f64, generator=gen) for _ in range(3))
        exact = torch.stack([g @ d, x @ d, g @ g, x @ x])
        torch.testing.assert_close(fused.partial_sums([g], [d], [False], [x], [d], f64, cpu), exact,
                                   rtol=1e-12, atol=1e-12)
        no_x = exact * torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=f64)
        torch.testing.assert_close(fused.partial_sums([g], [d], [False], [], [], f64, cpu), no_x, rtol=1e-12, atol=1e-12)
        no_g = exact * torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=f64)
        torch.testing.assert_close(fused.partial_sums([], [], [], [x], [d], f64, cpu), no_g, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(600)
def test_compiled_step_under_a_dispatch_mode_runs_eagerly(monkeypatch):
    """Compiled code refuses to run under a TorchDispatchMode (FlopCounterMode, a profiler's op counter);
    compile=True then steps on the eager kernels, on the same trajectory, and goes back to the compiled
    ones after it."""
    from torch.utils.flop_counter import FlopCounterMode

    from manic import kernels

    monkeypatch.setattr(kernels, "SMALL", 0)
    X = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).double()
        opt = manic.mechanize(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), compile=compiled)
        for step in range(6):
            opt.zero_grad()
            model(X).square().mean().backward()
            if step in (2, 3):
                with FlopCounterMode(display=False):
                    opt.step()
            else:
                opt.step()
        runs.append((opt.scale.clone(), [p.detach().clone() for p in model.parameters()]))
    (s_eager, p_eager), (s_comp, p_comp) = runs
    torch.testing.assert_close(s_comp, s_eager, rtol=1e-12, atol=0)
    for a, b in zip(p_comp, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_param_norm_is_of_the_parameters_the_step_starts_from(dtype, monkeypatch):
    """stats()["param_norm"] comes from the step's ||x||^2: with compile=True too it is the norm of the x
    the step started from (float32 and bf16). A non-contiguous parameter of 8192 rows (no flat view)
    takes the eager sums."""
    from manic import kernels

    monkeypatch.setattr(kernels, "SMALL", 0)
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(64, 128, generator=gen).to(dtype)),
              torch.nn.Parameter(torch.randn(32, 8192, generator=gen).to(dtype).t())]
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1), compile=True, s_init=0.1)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        start = sum(p.detach().double().square().sum() for p in params)
        opt.step()
        assert opt.stats()["param_norm"].double().square().item() == pytest.approx(start.item(), rel=1e-5)
    assert opt.scale.item() != 0.1  # the scale moved, so x was rebased with it


@pytest.mark.timeout(600)
def test_compiled_step_has_no_host_sync(monkeypatch):
    """The step's host syncs (aten::_local_scalar_dense: .item(), bool() of a tensor) with compile=True,
    counted by torch's profiler (a TorchDispatchMode counter would put the step on the eager kernels):
    none beyond what the base optimizer does by itself. The profiler does see one when there is one."""
    from torch.profiler import profile

    from manic import kernels

    monkeypatch.setattr(kernels, "SMALL", 0)

    compiled_ran = []

    def syncs(fn) -> int:
        with profile() as prof:
            fn()
        compiled_ran.append(any(e.key.startswith("Torch-Compiled Region") for e in prof.key_averages()))
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")

    gen = torch.Generator().manual_seed(6)
    runs = []
    for wrap in (True, False):
        params = [torch.nn.Parameter(torch.randn(64, 32, generator=gen)), torch.nn.Parameter(torch.randn(32, generator=gen))]
        base = torch.optim.AdamW(params, lr=1e-2, fused=True)
        runs.append((params, manic.mechanize(base, compile=True) if wrap else base))
    for t in range(5):
        counts = []
        for params, opt in runs:
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            counts.append(syncs(opt.step))
        if t > 1:  # (the first two steps compile the kernels, whose compile reads sizes and values)
            assert counts[0] == counts[1], f"step {t}: {counts}"
    assert compiled_ran[-2] and not compiled_ran[-1]  # the compiled path ran (the wrapped step), not the base's
    assert syncs(lambda: runs[0][1].scale.item()) == 1
