"""manic.kernels: the eager kernels against the fusable bodies (called directly, uncompiled) and
both against a plain float64 formula written here (docs/algorithm.md, "One step").

Tolerances, per tensor, relative to a scale made of the magnitudes that enter the result:
  float64 parameters                  1e-14
  float32 parameters                  1e-6   (float32 or float64 tuner)
  bf16 parameters, float32 reference  Delta 1e-6 (x_after - x_ref is formed in float32),
                                      x 2**-7 (one rounding to bf16, whose unit roundoff is 2**-8)
  bf16 parameters, bf16 reference     stored form: Delta 1e-6 (x_after - x_ref is formed in Delta's
                                      float32, issue 29), x 2**-7; recompute form: x 2**-6 (x_after -
                                      x_ref and D + u are rounded to bf16 before they are scaled; eager
                                      and fusable may land one bf16 ulp apart)
The sums are float64 (what the all-reduce sends, tuner.WIDE): 1e-14 for float64 parameters; 2e-6 for
16/32-bit ones, whose per-tensor partial sums are float32 (the totals float64).
Eager and fusable are held to the same tolerances against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from manic import kernels

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
CPU = torch.device("cpu")
EPS = 1e-8
SHAPES = [(3, 4), (5,), (0,), (), (2, 3, 2)]


@dataclass
class Spec:
    shape: tuple
    x: torch.dtype  # parameter
    d: torch.dtype  # Delta (and the tuner's view of D)
    ref: torch.dtype  # x_ref


def specs(kind: str) -> list[Spec]:
    if kind == "f64":
        return [Spec(s, F64, F64, F64) for s in SHAPES]
    if kind in ("f32", "f32_f64tuner"):
        return [Spec(s, F32, F32, F32) for s in SHAPES]
    if kind == "bf16":  # bf16 parameter and reference, float32 Delta
        return [Spec(s, BF16, F32, BF16) for s in SHAPES]
    if kind == "bf16_wide":  # fp32_reference=True
        return [Spec(s, BF16, F32, F32) for s in SHAPES]
    if kind == "mixed_wide":  # float32 parameters next to bf16 ones with float32 references, interleaved
        return [Spec(s, BF16 if i % 2 else F32, F32, F32) for i, s in enumerate(SHAPES)]
    raise AssertionError(kind)


TUNER = {"f64": F64, "f32": F32, "f32_f64tuner": F64, "bf16": F32, "bf16_wide": F32, "mixed_wide": F32}
KINDS = list(TUNER)


def tol_d(sp: Spec) -> float:
    return 1e-14 if sp.x == F64 else 1e-6


def tol_x(sp: Spec) -> float:
    if sp.x == F64:
        return 1e-14
    if sp.x == BF16:
        return 2.0 ** -6 if sp.ref == BF16 else 2.0 ** -7
    return 1e-6


def sum_tol(kind: str) -> float:
    return 1e-14 if kind == "f64" else 2e-6


def within(got: torch.Tensor, expected: torch.Tensor, tol, scale: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, what
    err = (got.double() - expected.double()).abs()
    bound = tol * scale.double() + 1e-300  # tol: a float or a tensor broadcast against scale
    assert bool((err <= bound).all()), f"{what}: max err {err.max() if err.numel() else 0} > tol {tol} x scale"


def rand(shape, gen, lo=0.5, hi=1.5) -> torch.Tensor:
    mag = torch.rand(shape, generator=gen, dtype=F64) * (hi - lo) + lo
    sign = torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.5, -1.0, 1.0)
    return mag * sign


# --------------------------------------------------------------------------- partial sums
def sums_inputs(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sp = specs(kind)
    xs = [rand(s.shape, gen).to(s.x) for s in sp]
    gs = [(0.1 * rand(s.shape, gen)).to(s.x) for s in sp]
    ds = [(0.3 * rand(s.shape, gen)).to(s.d) for s in sp]
    return sp, gs, ds, xs


def sums64(gs, gds, negate, xs, xds):
    """[<g,D>, <x,D>, |g|^2, |x|^2] and the scales (sum of |terms|) in float64."""
    g_dot_d = sum(((-1.0 if n else 1.0) * (g.double() * d.double()).sum()).item()
                  for g, d, n in zip(gs, gds, negate))
    x_dot_d = sum((x.double() * d.double()).sum().item() for x, d in zip(xs, xds))
    g_sq = sum((g.double() ** 2).sum().item() for g in gs)
    x_sq = sum((x.double() ** 2).sum().item() for x in xs)
    scale = [sum((g.double() * d.double()).abs().sum().item() for g, d in zip(gs, gds)),
             sum((x.double() * d.double()).abs().sum().item() for x, d in zip(xs, xds)), g_sq, x_sq]
    return torch.tensor([g_dot_d, x_dot_d, g_sq, x_sq], dtype=F64), torch.tensor(scale, dtype=F64)


@pytest.mark.parametrize("kind", KINDS)
def test_partial_sums(kind):
    dtype = TUNER[kind]
    sp, gs, ds, xs = sums_inputs(kind, 1)
    negate = [i % 2 == 1 for i in range(len(gs))]
    # the grads of a subset (a parameter without .grad adds only to the x sums)
    cases = {"all": (gs, ds, negate), "subset": (gs[1:4], ds[1:4], negate[1:4]), "none": ([], [], [])}
    for name, (g_, gd_, neg_) in cases.items():
        before = [t.clone() for t in g_ + gd_ + xs + ds]
        exp, scale = sums64(g_, gd_, neg_, xs, ds)
        eager = kernels.partial_sums_eager(g_, gd_, neg_, xs, ds, dtype, CPU)
        fusable = kernels.partial_sums_fusable(g_, gd_, neg_, xs, ds, dtype, CPU)
        for out, which in ((eager, "eager"), (fusable, "fusable")):
            assert out.dtype == dtype and out.shape == (4,), (which, name)
            tol = torch.full((4,), sum_tol(kind), dtype=F64)
            within(out, exp, tol, scale, f"{kind}/{name}/{which} vs float64")
        tol = torch.full((4,), sum_tol(kind), dtype=F64)
        within(eager, fusable.double(), tol, scale, f"{kind}/{name} eager vs fusable")
        # inputs untouched
        for a, b in zip(g_ + gd_ + xs + ds, before):
            assert torch.equal(a, b)
    # no tensors at all: four zeros
    for fn in (kernels.partial_sums_eager, kernels.partial_sums_fusable):
        out = fn([], [], [], [], [], dtype, CPU)
        assert out.dtype == dtype and out.tolist() == [0.0] * 4


@pytest.mark.parametrize("fn", [kernels.partial_sums_eager, kernels.partial_sums_fusable])
def test_partial_sums_negate_flips_only_g_dot_d(fn):
    _, gs, ds, xs = sums_inputs("f64", 2)
    plain = fn(gs, ds, [False] * len(gs), xs, ds, F64, CPU)
    neg = fn(gs, ds, [True] * len(gs), xs, ds, F64, CPU)
    assert neg[0].item() == pytest.approx(-plain[0].item(), rel=1e-14)
    assert torch.equal(neg[1:], plain[1:])
    # one exact case: g = (3, 4), D = (1, 2), x = (0, 2),
    # negated -> [<g,D>, <x,D>, |g|^2, |x|^2] = [-11, 4, 25, 4]
    g, d, x = (torch.tensor(v, dtype=F64) for v in ([3.0, 4.0], [1.0, 2.0], [0.0, 2.0]))
    assert fn([g], [d], [True], [x], [d], F64, CPU).tolist() == [-11.0, 4.0, 25.0, 4.0]


def test_partial_sums_fusable_without_some_x():
    """x's sums of a tensor left out of xs are not computed:
    its gradient still counts ([<g,D>, 0, ||g||^2, 0]), and a tensor in xs without a gradient adds
    [0, <x,D>, 0, ||x||^2]. By hand: g1 = (3, 4), D1 = (1, 2), x1 left out; x2 = (0, 2), D2 = (1, 1), no g."""
    g1, d1, x2, d2 = (torch.tensor(v, dtype=F64) for v in ([3.0, 4.0], [1.0, 2.0], [0.0, 2.0], [1.0, 1.0]))
    out = kernels.partial_sums_fusable([g1], [d1], [False], [x2], [d2], F64, CPU)
    assert out.tolist() == [11.0, 2.0, 25.0, 4.0]
    out = kernels.partial_sums_fusable([g1], [d1], [True], [], [], F64, CPU)
    assert out.tolist() == [-11.0, 0.0, 25.0, 0.0]


def test_partial_sums_of_many_small_tensors():
    """1000 one-element float32 tensors g = D = x = 0.1 (float32's 0.1 = 13421773 * 2**-27): the eager
    kernels pack the scaled gradients of small tensors side by side (one float32 partial sum per pack), the
    fusable ones sum each tensor in float64: both within float32's accuracy of the exact 1000 * 0.1**2."""
    ts = [torch.full((1,), 0.1, dtype=F32) for _ in range(1000)]
    exact = 1000 * (13421773 * 2.0 ** -27) ** 2
    for fn in (kernels.partial_sums_eager, kernels.partial_sums_fusable):
        out = fn(ts, ts, [False] * 1000, ts, ts, F64, CPU)
        for k in range(4):
            assert out[k].item() == pytest.approx(exact, rel=2e-6), (fn.__name__, k)


# --------------------------------------------------------------------------- rebase (store_delta=True)
def _start(kind: str, seed: int):
    """(generator, specs, S_old, S_new, x_ref per tensor) of a rebase's inputs."""
    gen = torch.Generator().manual_seed(seed)
    sp = specs(kind)
    S_old, S_new = torch.tensor(0.3, dtype=TUNER[kind]), torch.tensor(0.45, dtype=TUNER[kind])
    return gen, sp, S_old, S_new, [rand(s.shape, gen).to(s.ref) for s in sp]


def rebase_inputs(kind: str, seed: int, ok: bool):
    gen, sp, S_old, S_new, refs = _start(kind, seed)
    ds = [(0.2 * rand(s.shape, gen)).to(s.d) for s in sp]
    us = [0.01 * rand(s.shape, gen) for s in sp]
    # x_after = x_ref + S_old * Delta + u (the base step's result), rounded to the parameter's dtype
    xs = [(r.double() + S_old.double() * d.double() + u).to(s.x) for r, d, u, s in zip(refs, ds, us, sp)]
    if not ok:  # a skipped step may have left garbage in the parameters: it must not leak
        _garbage(xs, float("inf"))
    return sp, xs, refs, ds, S_old, S_new, torch.tensor(ok)


def _garbage(xs: list[torch.Tensor], second: float) -> None:
    """NaN and ``second`` in the first two elements of each tensor that has them."""
    for x in xs:
        if x.numel() >= 2:
            x.view(-1)[0] = float("nan")
            x.view(-1)[1] = second


def rebase64(xs, refs, ds, S_old, S_new, ok):
    """Delta_new = Delta + (x_after - x_ref - S_old * Delta) (0 if not ok); x = x_ref + S_new * Delta_new."""
    out_d, out_x, sc_d, sc_x = [], [], [], []
    so, sn = S_old.double(), S_new.double()
    for x, r, d in zip(xs, refs, ds):
        x, r, d = x.double(), r.double(), d.double()
        u = x - r - so * d if ok else torch.zeros_like(d)
        dn = d + u
        out_d.append(dn)
        out_x.append(r + sn * dn)
        y = (x - r).abs() if ok else torch.zeros_like(d)
        sc_d.append(y + d.abs())
        sc_x.append(r.abs() + sn.abs() * (y + d.abs()))
    return out_d, out_x, sc_d, sc_x


def run_rebase(fn, xs, refs, ds, S_old, S_new, ok):
    xs, refs, ds = [t.clone() for t in xs], [t.clone() for t in refs], [t.clone() for t in ds]
    ids_x, ids_d = [t.data_ptr() for t in xs], [t.data_ptr() for t in ds]
    refs_before = [t.clone() for t in refs]
    out = fn(xs, refs, ds, S_old, S_new, ok)
    assert out is None or out == [None] * len(xs)  # (a rebase returns nothing, eager or fused)
    # in place: the same storage, dtypes kept; the references untouched
    assert [t.data_ptr() for t in xs] == ids_x and [t.data_ptr() for t in ds] == ids_d
    for a, b in zip(refs, refs_before):
        assert torch.equal(a, b) and a.dtype == b.dtype
    return xs, ds


@pytest.mark.parametrize("ok", [True, False], ids=["ok", "skipped"])
@pytest.mark.parametrize("kind", KINDS)
def test_rebase(kind, ok):
    sp, xs, refs, ds, S_old, S_new, okt = rebase_inputs(kind, 3, ok)
    exp_d, exp_x, sc_d, sc_x = rebase64(xs, refs, ds, S_old, S_new, ok)
    outs = {}
    for name, fn in (("eager", kernels.rebase_eager), ("fusable", kernels.rebase_fusable)):
        x_out, d_out = run_rebase(fn, xs, refs, ds, S_old, S_new, okt)
        outs[name] = (x_out, d_out)
        for i, s in enumerate(sp):
            assert x_out[i].dtype == s.x and d_out[i].dtype == s.d
            within(d_out[i], exp_d[i], tol_d(s), sc_d[i], f"{kind}/{name} Delta[{i}]")
            within(x_out[i], exp_x[i], tol_x(s), sc_x[i], f"{kind}/{name} x[{i}]")
            assert bool(torch.isfinite(x_out[i]).all())
            if not ok:
                # the base step's move is dropped: Delta unchanged, x = x_ref + S_new * Delta_old
                assert torch.equal(d_out[i], ds[i]), f"{kind}/{name} Delta[{i}] changed on a skipped step"
    for i, s in enumerate(sp):
        within(outs["eager"][1][i], outs["fusable"][1][i], tol_d(s), sc_d[i], f"{kind} Delta[{i}] eager vs fusable")
        within(outs["eager"][0][i], outs["fusable"][0][i], tol_x(s), sc_x[i], f"{kind} x[{i}] eager vs fusable")


@pytest.mark.parametrize("fn", [kernels.rebase_eager, kernels.rebase_fusable])
def test_rebase_exact_small_case(fn):
    # x_ref = (1, 2), Delta = (0.5, -1), S_old = 0.5, u = (0.25, 0.5): x_after = (1.5, 2)
    # Delta_new = (0.75, -0.5);  S_new = 2: x = (1 + 1.5, 2 - 1) = (2.5, 1)   (all exact in binary)
    x = torch.tensor([1.5, 2.0], dtype=F64)
    r = torch.tensor([1.0, 2.0], dtype=F64)
    d = torch.tensor([0.5, -1.0], dtype=F64)
    fn([x], [r], [d], torch.tensor(0.5, dtype=F64), torch.tensor(2.0, dtype=F64), torch.tensor(True))
    assert d.tolist() == [0.75, -0.5] and x.tolist() == [2.5, 1.0]


# --------------------------------------------------------------------------- rebase (store_delta=False)
def recompute_inputs(kind: str, seed: int, ok: bool):
    gen, sp, S_old, S_new, refs = _start(kind, seed)
    x_t = [(r.double() + S_old.double() * 0.2 * rand(s.shape, gen)).to(s.x) for r, s in zip(refs, sp)]
    # diffs = x_t - x_ref as the engine forms them (foreach_sub: float32 for bf16 with a float32 reference)
    diffs = [torch.sub(x, r) for x, r in zip(x_t, refs)]
    xs = [(x.double() + 0.01 * rand(s.shape, gen)).to(s.x) for x, s in zip(x_t, sp)]  # x_after
    if not ok:
        _garbage(xs, float("-inf"))
    return sp, xs, refs, diffs, S_old, S_new, torch.tensor(ok)


def recompute64(xs, refs, diffs, S_old, S_new, ok):
    """D = diffs / (S_old + eps); u = x_after - x_ref - diffs (0 if not ok); x = x_ref + S_new * (D + u)."""
    out, scales = [], []
    so, sn = S_old.double(), S_new.double()
    for x, r, dd in zip(xs, refs, diffs):
        x, r, dd = x.double(), r.double(), dd.double()
        D = dd / (so + EPS)
        u = x - r - dd if ok else torch.zeros_like(dd)
        out.append(r + sn * (D + u))
        mag = ((x - r).abs() + dd.abs()) if ok else torch.zeros_like(dd)
        scales.append(r.abs() + sn.abs() * (D.abs() + mag) + mag)
    return out, scales


@pytest.mark.parametrize("ok", [True, False], ids=["ok", "skipped"])
@pytest.mark.parametrize("kind", KINDS)
def test_rebase_recompute(kind, ok):
    sp, xs, refs, diffs, S_old, S_new, okt = recompute_inputs(kind, 4, ok)
    exp_x, sc = recompute64(xs, refs, diffs, S_old, S_new, ok)
    outs = {}
    for name, fn in (("eager", kernels.rebase_recompute_eager), ("fusable", kernels.rebase_recompute_fusable)):
        x_out, r_in, dd_in = [t.clone() for t in xs], [t.clone() for t in refs], [t.clone() for t in diffs]
        ptrs = [t.data_ptr() for t in x_out]
        out = fn(x_out, r_in, dd_in, S_old, S_new, okt, EPS)
        assert out is None or out == [None] * len(x_out)
        assert [t.data_ptr() for t in x_out] == ptrs  # written in place
        for a, b in zip(r_in + dd_in, refs + diffs):  # references and diffs untouched
            assert torch.equal(a, b) and a.dtype == b.dtype
        outs[name] = x_out
        for i, s in enumerate(sp):
            assert x_out[i].dtype == s.x
            within(x_out[i], exp_x[i], tol_x(s), sc[i], f"{kind}/{name} x[{i}]")
            assert bool(torch.isfinite(x_out[i]).all())
    for i, s in enumerate(sp):
        within(outs["eager"][i], outs["fusable"][i], tol_x(s), sc[i], f"{kind} x[{i}] eager vs fusable")


@pytest.mark.parametrize("fn", [kernels.rebase_recompute_eager, kernels.rebase_recompute_fusable])
def test_rebase_recompute_exact_small_case(fn):
    # x_ref = (1, 2), diffs = x_t - x_ref = (0.5, -0.25), S_old + eps -> use eps = 0.5 - S_old exactly:
    # S_old = 0.25, eps = 0.25: D = diffs / 0.5 = (1, -0.5); x_after = (1.75, 1.75): u = (0.25, 0)
    # S_new = 2: x = x_ref + 2 * (D + u) = (1 + 2.5, 2 - 1) = (3.5, 1)
    x = torch.tensor([1.75, 1.75], dtype=F64)
    r = torch.tensor([1.0, 2.0], dtype=F64)
    dd = torch.tensor([0.5, -0.25], dtype=F64)
    fn([x], [r], [dd], torch.tensor(0.25, dtype=F64), torch.tensor(2.0, dtype=F64), torch.tensor(True), 0.25)
    assert x.tolist() == [3.5, 1.0]
    # skipped: u dropped, x = x_ref + S_new * D = (3, 1)
    x = torch.tensor([float("nan"), 1.75], dtype=F64)
    fn([x], [r], [dd], torch.tensor(0.25, dtype=F64), torch.tensor(2.0, dtype=F64), torch.tensor(False), 0.25)
    assert x.tolist() == [3.0, 1.0]


@pytest.mark.parametrize("kind", KINDS)
def test_rebase_recompute_eps_as_a_tensor(kind):
    """The engine passes eps / lr_ref, a 0-dim tensor in the tuner's dtype (lr_ref is 1 in the
    original form): with lr_ref = 1 every bit is as with the float eps; with lr_ref = 2 it is eps / 2."""
    sp, xs, refs, diffs, S_old, S_new, okt = recompute_inputs(kind, 5, True)
    one, two = torch.ones((), dtype=S_old.dtype), torch.full((), 2.0, dtype=S_old.dtype)
    for fn in (kernels.rebase_recompute_eager, kernels.rebase_recompute_fusable):
        runs = {}
        for name, eps in (("float", EPS), ("tensor", EPS / one), ("half float", EPS / 2), ("half tensor", EPS / two)):
            x_out = [t.clone() for t in xs]
            fn(x_out, refs, diffs, S_old, S_new, okt, eps)
            runs[name] = x_out
        assert all(torch.equal(a, b) for a, b in zip(runs["float"], runs["tensor"])), fn.__name__
        assert all(torch.equal(a, b) for a, b in zip(runs["half float"], runs["half tensor"])), fn.__name__
    # the exact small case with eps = 0.5 / lr_ref, lr_ref = 2
    x = torch.tensor([1.75, 1.75], dtype=F64)
    kernels.rebase_recompute_eager([x], [torch.tensor([1.0, 2.0], dtype=F64)], [torch.tensor([0.5, -0.25], dtype=F64)],
                                   torch.tensor(0.25, dtype=F64), torch.tensor(2.0, dtype=F64), torch.tensor(True),
                                   0.5 / torch.tensor(2.0, dtype=F64))
    assert x.tolist() == [3.5, 1.0]


def test_eager_kernels_are_the_default_set():
    assert kernels.EAGER == (kernels.partial_sums_eager, kernels.rebase_eager, kernels.rebase_recompute_eager,
                             kernels.rebase_delta_eager)
    assert math.isfinite(EPS)
