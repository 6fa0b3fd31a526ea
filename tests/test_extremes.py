"""The kernels at the edges: gradients at the ends of float32's range (issue 28 item 3), a non-finite base
update (issue 28 item 5) and 16-bit parameters' moves (issue 29), eager and compiled."""

from __future__ import annotations

import pytest
import torch

import manic
from manic import kernels
from manic.kernels import bodies

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
STATES = ["ref+delta", "ref", "delta"]


# ----------------------------------------------------------------------------- 3. huge and tiny gradients
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1.1754944e-38])
@pytest.mark.parametrize("state", STATES)
def test_gradients_at_the_ends_of_the_float32_range(dtype, magnitude, state):
    """The squared norms of gradients near float32's range limits neither overflow nor underflow: no step
    is skipped, grad_norm is the true norm, the tuner stays finite, Delta and float32 weights move. (bf16 weights
    do not move in five steps even with gradients of 1: AdamW's steps of 1e-2 times a scale that falls on
    random gradients stay below half a bf16 ulp; with gradients of 1e-38 AdamW's own move, its weight decay,
    rounds to nothing in bf16. Mechanic's Delta, float32, takes the moves there are.)"""
    torch.manual_seed(0)
    p = torch.randn(64, dtype=dtype).requires_grad_()
    opt = manic.mechanize(torch.optim.AdamW([p], lr=1e-2), state=state)
    start = p.detach().clone()
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        p.grad = (torch.randn(64, generator=g, dtype=F64) * magnitude).to(dtype)
        true = p.grad.to(F64).norm()
        opt.step()
        stats = opt.stats()
        assert int(stats["skipped_steps"]) == 0
        got = stats["grad_norm"].to(F64)
        assert torch.isfinite(got) and abs(got / true - 1) < 1e-3, (float(got), float(true))
    if dtype == F32 and state == "ref+delta":  # (the other forms round moves of 1e-8 to nothing here)
        assert not torch.equal(p.detach(), start)
    if state != "ref" and (dtype == F32 or magnitude == 1e20):  # (AdamW: g**2 of 1e30 overflows its v)
        assert opt.state[p]["mechanic_delta"].abs().max() > 0
    assert torch.isfinite(opt.scale).all() and torch.isfinite(p).all()
    tuner = opt.param_groups[0]
    assert all(torch.isfinite(tuner[f"mechanic_{k}"]).all() for k in ("r", "m", "v", "s"))


@pytest.mark.parametrize("magnitude", [1e20, 1.1754944e-38])
def test_the_sums_at_the_ends_of_the_float32_range(magnitude):
    """The four sums of float32 tensors (small ones, and a large one in pieces) against float64, at
    gradients of 1e20 and of the smallest normal float32: each to 1e-5 relative (float32 dot products of up to
    CHUNK elements; an overflow or underflow would be off by orders of magnitude)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (300,), (kernels.sums.CHUNK + 3,), (2,)]  # (the large one in two pieces)
    xs = [torch.randn(s, generator=gen) for s in shapes]
    ds = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    gs = [(torch.randn(s, generator=gen, dtype=F64) * magnitude).to(F32) for s in shapes]
    neg = [False, True, False, False]
    want = torch.stack([sum((-1 if n else 1) * (g.double() * d.double()).sum() for g, d, n in zip(gs, ds, neg)),
                        sum((x.double() * d.double()).sum() for x, d in zip(xs, ds)),
                        sum(g.double().square().sum() for g in gs), sum(x.double().square().sum() for x in xs)])
    for fn in (kernels.partial_sums_eager, kernels.partial_sums_fusable):
        got = fn(gs, ds, neg, xs, ds, F64, torch.device("cpu"))
        assert got.dtype == F64 and torch.isfinite(got).all(), fn.__name__
        scale = torch.stack([sum((g.double() * d.double()).abs().sum() for g, d in zip(gs, ds)),
                             sum((x.double() * d.double()).abs().sum() for x, d in zip(xs, ds)), want[2], want[3]])
        assert ((got - want).abs() <= 1e-5 * scale).all(), (fn.__name__, got, want)


def test_the_gradient_scale_is_a_power_of_two_within_the_bounds():
    scale = kernels.sums.gradient_scale
    assert scale(torch.tensor([3.0, 0.25])).item() == 0.25  # the largest norm, 3, is below 2**2
    assert scale(torch.tensor([float("inf"), 1.0])).item() == 2.0 ** -100
    assert scale(torch.tensor([0.0])).item() == 2.0 ** 100
    assert scale(torch.tensor([float("nan"), 1.0])).isnan()


# ----------------------------------------------------------------------------- 5. non-finite base update
def _pull(params, targets, t):
    g = torch.Generator().manual_seed(t)
    for p, target in zip(params, targets):
        p.grad = (p.detach() - target) + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("skip", [False, True])
def test_a_nonfinite_base_update_never_reaches_delta(skip, state, compile, monkeypatch):
    """A NaN learning rate for one step: Mechanic's state and the parameters stay finite, and training goes on."""
    monkeypatch.setattr(kernels, "SMALL", 0)  # compile=True: every tensor through the compiled kernels
    a, b = (torch.full((3,), v, dtype=F64).requires_grad_() for v in (0.0, 10.0))
    targets = [torch.full((3,), 1.0, dtype=F64), torch.full((3,), 11.0, dtype=F64)]
    opt = manic.mechanize(torch.optim.SGD([a, b], lr=0.1), skip_nonfinite=skip, state=state, compile=compile)
    for t in range(3):
        _pull([a, b], targets, t)
        opt.step()
    opt.param_groups[0]["lr"] = float("nan")
    _pull([a, b], targets, 3)
    opt.step()
    opt.param_groups[0]["lr"] = 0.1
    for t in range(4, 8):
        _pull([a, b], targets, t)
        opt.step()
    for p in (a, b):
        for k, v in opt.state[p].items():
            if k.startswith("mechanic_"):
                assert torch.isfinite(v).all(), k
        assert torch.isfinite(p).all()
    assert torch.isfinite(opt.scale).all()
    assert abs(a.detach() - 1).max() < 1 and abs(b.detach() - 11).max() < 1  # and it kept training


KERNELS = {"ref+delta": ("rebase", bodies.rebase_one), "delta": ("rebase_delta", bodies.rebase_delta_one)}


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("form", ["eager", "fusable"])
@pytest.mark.parametrize("state", list(KERNELS))
def test_a_nonfinite_move_leaves_that_element_s_delta_unchanged(state, form, dtype):
    """Elementwise: where u is NaN or infinite Delta keeps its value bit for bit and x goes to the point
    of u = 0; every other element takes its move."""
    gen = torch.Generator().manual_seed(1)
    wide = F32 if dtype == BF16 else dtype
    n = 6
    d = torch.randn(n, generator=gen, dtype=F64).to(wide)
    S_old, S_new = torch.tensor(0.5, dtype=wide), torch.tensor(0.75, dtype=wide)
    base = torch.randn(n, generator=gen, dtype=F64).to(dtype)  # x_ref (state "ref+delta") or x_t ("delta")
    start = (base.to(wide) + S_old * d).to(dtype) if state == "ref+delta" else base
    u = torch.full((n,), 0.125, dtype=F64)
    x = (start.to(F64) + u).to(dtype)
    x[1], x[3] = float("nan"), float("inf")
    d_before = d.clone()
    if form == "eager":
        getattr(kernels.EAGER, KERNELS[state][0])([x], [base], [d], S_old, S_new, torch.tensor(True))
    else:
        KERNELS[state][1](x.view(-1), base.view(-1), d.view(-1), S_old, S_new, torch.tensor(True))
    bad = torch.tensor([i in (1, 3) for i in range(n)])
    assert torch.equal(d[bad], d_before[bad])
    assert not torch.equal(d[~bad], d_before[~bad])
    assert torch.isfinite(x).all()
    if state == "ref+delta":  # x = x_ref + S_new * Delta, Delta unchanged there
        torch.testing.assert_close(x[bad], (base.to(wide) + S_new * d_before).to(dtype)[bad])


# ----------------------------------------------------------------------------- 16-bit parameters' moves
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("state", list(KERNELS))
def test_a_16bit_move_is_taken_in_float32(state, dtype):
    """x_after - x_ref (x_after - x_t in state "delta") is formed in Delta's float32, not rounded to the
    parameter's dtype first (issue 29): Delta takes exactly the float32 move, eager and fusable alike."""
    gen = torch.Generator().manual_seed(2)
    n = 4096
    base = (torch.randn(n, generator=gen) * 4).to(dtype)  # large entries: the bf16 ulp is coarse
    d = torch.zeros(n, dtype=F32)
    x = (base.to(F64) + torch.randn(n, generator=gen, dtype=F64) * 1e-2).to(dtype)
    S = torch.tensor(1.0)
    want = (x.to(F32) - base.to(F32))  # exact in float32: both are 16-bit values
    rounded = (x - base).to(F32)  # the 16-bit subtraction the eager kernel used to make
    assert not torch.equal(want, rounded)
    outs = []
    for form in ("eager", "fusable"):
        xf, df = x.clone(), d.clone()
        if form == "eager":
            getattr(kernels.EAGER, KERNELS[state][0])([xf], [base], [df], S, S, torch.tensor(True))
        else:
            KERNELS[state][1](xf, base, df, S, S, torch.tensor(True))
        assert torch.equal(df, want), form
        outs.append(df)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("state", list(KERNELS))
def test_16bit_eager_and_compiled_agree(dtype, state, monkeypatch):
    """bf16/fp16 parameters: one compiled rebase and the eager one leave the same Delta to float32's rounding,
    and x within one 16-bit rounding (before issue 29 the eager one rounded x_after - x_ref to 16 bits)."""
    monkeypatch.setattr(kernels, "SMALL", 0)
    gen = torch.Generator().manual_seed(3)
    n = 3000
    base = (torch.randn(n, generator=gen) * 8).to(dtype)
    d0 = torch.randn(n, generator=gen) * 1e-1
    S_old, S_new = torch.tensor(0.5), torch.tensor(0.625)
    start = (base.float() + S_old * d0).to(dtype) if state == "ref+delta" else base
    x0 = (start.double() + torch.randn(n, generator=gen, dtype=F64) * 1e-2).to(dtype)
    outs = []
    for fns in (kernels.EAGER, kernels.compiled()):
        x, d = x0.clone(), d0.clone()
        getattr(fns, KERNELS[state][0])([x], [base], [d], S_old, S_new, torch.tensor(True))
        outs.append((x, d))
    (xe, de), (xc, dc) = outs
    x_t = base.double() + S_old.double() * d0.double() if state == "ref+delta" else base.double()
    want = d0.double() + (x0.double() - x_t)  # Delta + u, u = x_after - x_t taken in float32
    torch.testing.assert_close(de.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(dc, de, rtol=0, atol=1e-6)
    ulp = torch.finfo(dtype).eps * xe.double().abs().clamp(min=1.0)
    assert ((xc.double() - xe.double()).abs() <= ulp).all()
