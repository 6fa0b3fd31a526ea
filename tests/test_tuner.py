"""manic.tuner: one Mechanic update checked against values derived by hand (docs/algorithm.md,
"One step", the original form; then the invariant form: its floor, its start as wealth and its
division by lr_ref), the non-finite skip, the betas and TunerState's helpers.

Every expected number below is written out from the spec's formulas in plain Python floats,
with the derivation beside it; none is copied from the implementation's output. float64
throughout, compared to REL relative (a handful of roundings on either side).
"""

from __future__ import annotations

import math

import pytest
import torch

from manic import tuner
from manic.options import Hyper
from manic.testing import Count  # host syncs
from manic.tuner import TunerState

F64 = torch.float64
CPU = torch.device("cpu")
REL = 1e-15
EPS = 1e-8


# --------------------------------------------------------------------------- helpers
def state(r, m, v, s, step=0, skipped=0, lr_ref=1.0, dtype=F64) -> TunerState:
    """A tuner state with s and lr_ref in ``dtype`` (r, m, v are float64 in every tuner: tuner.WIDE)."""
    t = lambda xs: torch.tensor(xs, dtype=dtype)  # noqa: E731
    w = lambda xs: torch.tensor(xs, dtype=tuner.WIDE)  # noqa: E731
    c = lambda k: torch.tensor(k, dtype=torch.int64)  # noqa: E731
    return TunerState(w(r), w(m), w(v), t(s), c(step), c(skipped), t(lr_ref))


def sums(g_dot_d, x_dot_d=0.0, g_sq=1.0, x_sq=1.0) -> torch.Tensor:
    return torch.tensor([g_dot_d, x_dot_d, g_sq, x_sq], dtype=F64)


def beta(*bs) -> torch.Tensor:
    return torch.tensor(bs, dtype=F64)


def close(got: torch.Tensor | float, expected: list[float] | float) -> None:
    got_list = got.tolist() if isinstance(got, torch.Tensor) else got
    if not isinstance(got_list, list):
        got_list, expected = [got_list], [expected]
    assert len(got_list) == len(expected)
    for g, e in zip(got_list, expected):
        assert g == pytest.approx(e, rel=REL, abs=0), (got_list, expected)


def check(st: TunerState, r, m, v, s, step, skipped) -> None:
    close(st.r, r)
    close(st.m, m)
    close(st.v, v)
    close(st.s, s)
    assert st.step.item() == step and st.skipped.item() == skipped
    assert st.step.dtype == torch.int64 and st.skipped.dtype == torch.int64


def update(st, sm, hyper, b):
    with Count() as mode:
        out = tuner.update(st, sm, hyper, b)
    assert mode.syncs == 0
    return out


# --------------------------------------------------------------------------- the update by hand
def test_two_steps_n1_no_decay():
    s0 = 1e-3
    hy = Hyper(weight_decay=0.0, eps=EPS, s_init=s0, num_betas=1, variant="original")
    b = beta(0.9)
    st = TunerState.fresh(hy, F64, CPU)

    # step 1: h = <g,D> = 2 (lambda = 0: the decay term is 0 * S * |g|/(|x|+eps) * <x,D> = 0)
    # hc = clamp(2, -0, 0) = 0   (old m = 0)
    # m  = max(0.9 * 0, 2 + eps) = 2 + eps
    # v  = 0.81 * 0 + 2^2 = 4
    # r  = 0.9 * 0 - 0 * s0 = 0
    # s  = (s0 / 1 * (2 + eps) + max(0, 0)) / (sqrt(4) + eps) = s0
    st1, h, ok = update(st, sums(2.0, 5.0, 3.0, 7.0), hy, b)
    close(h, 2.0)
    assert ok.item() is True
    check(st1, r=[0.0], m=[2 + EPS], v=[4.0], s=[s0 * (2 + EPS) / (2 + EPS)], step=1, skipped=0)

    # step 2: h = -1
    # hc = clamp(-1, -(2+eps), 2+eps) = -1
    # m  = max(0.9 * (2 + eps), 1 + eps) = 0.9 * (2 + eps)
    # v  = 0.81 * 4 + 1 = 4.24
    # r  = 0.9 * 0 - (-1) * s0 = s0        (s before the step is s0)
    # s  = (s0 * m + max(s0, 0)) / (sqrt(4.24) + eps)
    st2, h, ok = update(st1, sums(-1.0), hy, b)
    close(h, -1.0)
    m2 = 0.9 * (2 + EPS)
    check(st2, r=[s0], m=[m2], v=[0.81 * 4 + 1], s=[(s0 * m2 + s0) / (math.sqrt(4.24) + EPS)], step=2, skipped=0)

    # the inputs are not touched: update returns a new state
    check(st1, r=[0.0], m=[2 + EPS], v=[4.0], s=[s0], step=1, skipped=0)


def test_clip_uses_old_m_and_r_is_stored_unclamped():
    s0 = 1e-3
    hy = Hyper(weight_decay=0.0, eps=EPS, s_init=s0, num_betas=1, variant="original")
    b = beta(0.9)
    # before: r = 0, m = 1, v = 1, s = 0.5
    st = state([0.0], [1.0], [1.0], [0.5], step=3)
    # h = 3: hc = clamp(3, -1, 1) = 1 with the OLD m (the new m, 3 + eps, would give hc = 3)
    # m  = max(0.9 * 1, 3 + eps) = 3 + eps
    # v  = 0.81 * 1 + 9 = 9.81
    # r  = 0.9 * 0 - 1 * 0.5 = -0.5      (with hc = 3 it would be -1.5)
    # s  = (s0 * (3 + eps) + max(-0.5, 0)) / (sqrt(9.81) + eps) = s0 * (3 + eps) / (sqrt(9.81) + eps)
    st1, h, ok = update(st, sums(3.0), hy, b)
    close(h, 3.0)
    check(st1, r=[-0.5], m=[3 + EPS], v=[9.81], s=[s0 * (3 + EPS) / (math.sqrt(9.81) + EPS)], step=4, skipped=0)

    # r stays negative and stored as is: h = -0.1, inside [-m, m], so hc = -0.1
    # r = 0.9 * (-0.5) - (-0.1) * s1 = -0.45 + 0.1 * s1  (still < 0: s = s0/n * m / (sqrt v + eps))
    # m = max(0.9 * (3 + eps), 0.1 + eps) = 0.9 * (3 + eps);  v = 0.81 * 9.81 + 0.01
    s1 = s0 * (3 + EPS) / (math.sqrt(9.81) + EPS)
    st2, h, ok = update(st1, sums(-0.1), hy, b)
    m2, v2 = 0.9 * (3 + EPS), 0.81 * 9.81 + 0.01
    check(st2, r=[-0.45 + 0.1 * s1], m=[m2], v=[v2], s=[s0 * m2 / (math.sqrt(v2) + EPS)], step=5, skipped=0)


def test_negative_h_clipped_to_minus_old_m():
    hy = Hyper(weight_decay=0.0, eps=EPS, s_init=1e-3, num_betas=1, variant="original")
    # before: r = 0.2, m = 0.5, v = 2, s = 0.25; h = -4 -> hc = clamp(-4, -0.5, 0.5) = -0.5
    # m = max(0.9 * 0.5, 4 + eps) = 4 + eps; v = 0.81 * 2 + 16 = 17.62
    # r = 0.9 * 0.2 - (-0.5) * 0.25 = 0.18 + 0.125 = 0.305
    # s = (1e-3 * (4 + eps) + 0.305) / (sqrt(17.62) + eps)
    st1, h, _ = update(state([0.2], [0.5], [2.0], [0.25]), sums(-4.0), hy, beta(0.9))
    close(h, -4.0)
    check(st1, r=[0.9 * 0.2 + 0.5 * 0.25], m=[4 + EPS], v=[0.81 * 2 + 16],
          s=[(1e-3 * (4 + EPS) + (0.9 * 0.2 + 0.5 * 0.25)) / (math.sqrt(17.62) + EPS)], step=1, skipped=0)


def test_weight_decay_term_in_h():
    # lambda = 0.5, n = 1, s = 0.25 so S = 0.25; sums: <g,D> = 1, <x,D> = 2, |g|^2 = 9, |x|^2 = 16
    # h = 1 + 0.5 * 0.25 * 3 / (4 + eps) * 2 = 1 + 0.75 / (4 + eps)  (~1.1875, the decay adds ~19%)
    hy = Hyper(weight_decay=0.5, eps=EPS, s_init=1e-3, num_betas=1, variant="original")
    st = state([0.0], [10.0], [1.0], [0.25])
    st1, h, _ = update(st, sums(1.0, 2.0, 9.0, 16.0), hy, beta(0.9))
    h_exp = 1 + 0.75 / (4 + EPS)
    close(h, h_exp)
    # the decay term must matter: without it h would be exactly 1
    assert abs(h.item() - 1.0) > 0.18
    # old m = 10 > h: hc = h;  m = max(9, h + eps) = 9;  v = 0.81 + h^2
    # r = 0 - h * 0.25;  s = (1e-3 * 9 + max(r, 0)) / (sqrt(v) + eps) with r < 0
    v_exp = 0.81 + h_exp * h_exp
    check(st1, r=[-0.25 * h_exp], m=[9.0], v=[v_exp], s=[1e-3 * 9.0 / (math.sqrt(v_exp) + EPS)], step=1, skipped=0)

    # the term's sign follows <x,D>: <x,D> = -2 gives h = 1 - 0.75 / (4 + eps)
    _, h, _ = update(st, sums(1.0, -2.0, 9.0, 16.0), hy, beta(0.9))
    close(h, 1 - 0.75 / (4 + EPS))
    # and it scales with S: s = 0.5 doubles it
    _, h, _ = update(state([0.0], [10.0], [1.0], [0.5]), sums(1.0, 2.0, 9.0, 16.0), hy, beta(0.9))
    close(h, 1 + 1.5 / (4 + EPS))


def test_weight_decay_with_zero_x():
    # |x| = 0 and <x,D> = 0: the term is lambda * S * |g| / (0 + eps) * 0 = 0, no division by zero
    hy = Hyper(weight_decay=0.5, eps=EPS, s_init=1e-3, num_betas=1, variant="original")
    _, h, ok = update(state([0.0], [1.0], [1.0], [0.25]), sums(0.3, 0.0, 4.0, 0.0), hy, beta(0.9))
    close(h, 0.3)
    assert ok.item() is True


def test_recompute_form_divides_h_by_S_plus_eps():
    # store_delta=False: sums hold <., x - x_ref>; h = (<g,D> + decay) / (S + eps)
    # lambda = 0.5, S = 0.25: h = (1 + 0.75 / (4 + eps)) / (0.25 + eps)
    hy = Hyper(weight_decay=0.5, eps=EPS, s_init=1e-3, num_betas=1, store_delta=False, variant="original")
    st1, h, _ = update(state([0.0], [10.0], [1.0], [0.25]), sums(1.0, 2.0, 9.0, 16.0), hy, beta(0.9))
    h_exp = (1 + 0.75 / (4 + EPS)) / (0.25 + EPS)  # ~4.75
    close(h, h_exp)
    # old m = 10 > h: hc = h;  m = max(9, h + eps) = 9;  v = 0.81 + h^2;  r = -0.25 h < 0
    v_exp = 0.81 + h_exp * h_exp
    check(st1, r=[-0.25 * h_exp], m=[9.0], v=[v_exp], s=[1e-3 * 9.0 / (math.sqrt(v_exp) + EPS)], step=1, skipped=0)

    # at the first step (x = x_ref) the sums of D vanish and h = 0 as in the stored form
    hy0 = Hyper(weight_decay=0.5, eps=EPS, s_init=1e-3, num_betas=2, store_delta=False, variant="original")
    st, h, _ = update(TunerState.fresh(hy0, F64, CPU), sums(0.0, 0.0, 9.0, 16.0), hy0, beta(0.9, 0.99))
    assert h.item() == 0.0
    close(st.s, [1e-3 / 2 * EPS / EPS] * 2)


def test_two_betas_and_s_init_over_n():
    s0 = 1e-2
    hy = Hyper(weight_decay=0.0, eps=EPS, s_init=s0, num_betas=2, variant="original")
    b = tuner.betas(2, F64, CPU)  # (0.9, 0.99)
    st = TunerState.fresh(hy, F64, CPU)
    close(st.s.sum(), 2 * s0)  # S = n * s_init before the first step

    # step 1: D = 0, h = 0.  hc = 0;  m_i = max(0, 0 + eps) = eps;  v_i = 0;  r_i = 0
    # s_i = (s0 / 2 * eps + 0) / (sqrt(0) + eps) = s0 / 2;  S = s0
    st, h, _ = update(st, sums(0.0, 0.0, 4.0, 9.0), hy, b)
    assert h.item() == 0.0
    check(st, r=[0.0, 0.0], m=[EPS, EPS], v=[0.0, 0.0], s=[s0 / 2, s0 / 2], step=1, skipped=0)
    close(st.s.sum(), s0)

    # step 2: h = 2.  hc = clamp(2, -eps, eps) = eps
    # m_i = max(beta_i * eps, 2 + eps) = 2 + eps;  v_i = 4
    # r_i = beta_i * 0 - eps * s0 / 2 = -eps * s0 / 2   (negative, stored)
    # s_i = (s0 / 2 * (2 + eps) + 0) / (2 + eps) = s0 / 2
    st, h, _ = update(st, sums(2.0), hy, b)
    r2 = -EPS * s0 / 2
    check(st, r=[r2, r2], m=[2 + EPS] * 2, v=[4.0, 4.0], s=[s0 / 2, s0 / 2], step=2, skipped=0)

    # step 3: h = -1.  hc_i = -1 (inside +-(2 + eps))
    # m_i = max(beta_i * (2 + eps), 1 + eps) = beta_i * (2 + eps)       (1.8.., 1.98..)
    # v_i = beta_i^2 * 4 + 1                                              (4.24, 4.9204)
    # r_i = beta_i * r2 + s0 / 2
    # s_i = (s0 / 2 * m_i + r_i) / (sqrt(v_i) + eps)   -- the two betas now differ
    st, h, _ = update(st, sums(-1.0), hy, b)
    m3 = [bi * (2 + EPS) for bi in (0.9, 0.99)]
    v3 = [bi * bi * 4 + 1 for bi in (0.9, 0.99)]
    r3 = [bi * r2 + s0 / 2 for bi in (0.9, 0.99)]
    s3 = [(s0 / 2 * mi + ri) / (math.sqrt(vi) + EPS) for mi, vi, ri in zip(m3, v3, r3)]
    check(st, r=r3, m=m3, v=v3, s=s3, step=3, skipped=0)
    assert s3[0] != pytest.approx(s3[1], rel=1e-3)


def test_decay_uses_S_the_sum_over_betas():
    # n = 2, lambda = 0.1, s = (0.1, 0.3) so S = 0.4; <g,D> = -1, <x,D> = 5, |g| = 2, |x| = 1
    # h = -1 + 0.1 * 0.4 * 2 / (1 + eps) * 5 = -1 + 0.4 / (1 + eps)  (~ -0.6)
    hy = Hyper(weight_decay=0.1, eps=EPS, s_init=1e-2, num_betas=2, variant="original")
    st = state([0.05, -0.02], [0.3, 0.3], [1.0, 2.0], [0.1, 0.3])
    st1, h, _ = update(st, sums(-1.0, 5.0, 4.0, 1.0), hy, beta(0.9, 0.99))
    h_exp = -1 + 0.4 / (1 + EPS)
    close(h, h_exp)
    # hc = clamp(h, -0.3, 0.3) = -0.3 for both (|h| ~ 0.6 > 0.3)
    # m_i = max(beta_i * 0.3, |h| + eps) = |h| + eps;  v_i = beta_i^2 * v_i + h^2
    # r = (0.9 * 0.05 + 0.3 * 0.1, 0.99 * (-0.02) + 0.3 * 0.3) = (0.075, 0.0702)
    # s_i = (0.01 / 2 * m_i + r_i) / (sqrt(v_i) + eps)
    m1 = abs(h_exp) + EPS
    v1 = [0.81 * 1 + h_exp ** 2, 0.99 * 0.99 * 2 + h_exp ** 2]
    r1 = [0.9 * 0.05 + 0.3 * 0.1, 0.99 * -0.02 + 0.3 * 0.3]
    s1 = [(0.01 / 2 * m1 + ri) / (math.sqrt(vi) + EPS) for vi, ri in zip(v1, r1)]
    check(st1, r=r1, m=[m1, m1], v=v1, s=s1, step=1, skipped=0)


# --------------------------------------------------------------------------- the invariant form by hand
# Its state is in units of the normalized direction Delta' = Delta / lr_ref: sum(s) = S' is an
# effective learning rate and the factor on Delta is S = S' / lr_ref. h = <g + lam S' |g|/(|x|+eps) x, Delta>
# / lr_ref (stored form) or (<g, x - x_ref> + lam S' |g|/(|x|+eps) <x, x - x_ref>) / (S' + eps) (recompute
# form). At the first non-zero h (v = 0 everywhere), r := s_init / n * |h| before the update; the floor
# term is s_init * 1e-3 / n * m. Otherwise the update is the original one.
FLOOR = 1e-3  # the specification's number (tuner.FLOOR)


def inv(**kw) -> Hyper:
    return Hyper(variant="invariant", eps=EPS, **kw)


def test_floor_constant():
    assert tuner.FLOOR == FLOOR


def test_invariant_first_step_moves_at_the_floor_and_zero_h_pays_no_wealth():
    s0, L = 1e-2, 0.25
    hy = inv(weight_decay=0.5, s_init=s0, num_betas=2)
    b = beta(0.9, 0.99)
    st = state([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [s0, s0], lr_ref=L)  # fresh, lr_ref set at the start
    close(st.scale, 2 * s0 / L)
    # step 1: D = 0, h = 0 (the decay term is lam * S' * |g|/(|x|+eps) * <x, D> = 0 too)
    # h = 0: no wealth yet, r stays 0;  hc = 0;  m_i = eps;  v_i = 0
    # s_i = (s0 * 1e-3 / 2 * eps + 0) / (0 + eps) = s0 * 1e-3 / 2   (the original form: s0 / 2)
    st1, h, ok = update(st, sums(0.0, 0.0, 4.0, 9.0), hy, b)
    assert h.item() == 0.0 and ok.item() is True
    f = s0 * FLOOR / 2
    check(st1, r=[0.0, 0.0], m=[EPS, EPS], v=[0.0, 0.0], s=[f * EPS / EPS] * 2, step=1, skipped=0)
    close(st1.scale, 2 * f / L)  # S = S' / lr_ref
    assert st1.lr_ref.item() == L  # the update never changes lr_ref
    # step 2: a zero gradient, h = 0 again: still no wealth (v is still 0), nothing moves
    # m_i = max(beta_i * eps, 0 + eps) = eps
    st2, h, _ = update(st1, sums(0.0, 0.0, 0.0, 9.0), hy, b)
    assert h.item() == 0.0
    check(st2, r=[0.0, 0.0], m=[EPS, EPS], v=[0.0, 0.0], s=[f, f], step=2, skipped=0)

    # the original form with the same numbers floors at s_init itself
    orig = Hyper(variant="original", weight_decay=0.5, eps=EPS, s_init=s0, num_betas=2)
    o1, _, _ = update(st, sums(0.0, 0.0, 4.0, 9.0), orig, b)
    check(o1, r=[0.0, 0.0], m=[EPS, EPS], v=[0.0, 0.0], s=[s0 / 2, s0 / 2], step=1, skipped=0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_invariant_start_is_wealth_at_the_first_nonzero_h(sign):
    s0, L = 1e-2, 0.5
    hy = inv(weight_decay=0.0, s_init=s0, num_betas=2)
    b = beta(0.9, 0.99)
    f = s0 * FLOOR / 2
    # after a first step with h = 0: r = 0, m = eps, v = 0, s_i = s0 * 1e-3 / 2
    st1 = state([0.0, 0.0], [EPS, EPS], [0.0, 0.0], [f, f], step=1, lr_ref=L)

    # step 2: <g, Delta> = +-1, so h = +-1 / lr_ref = +-2 (the division by lr_ref)
    # first non-zero h: r := s0 / 2 * |h| = s0 for each beta, then the ordinary update:
    # hc = clamp(h, -eps, eps) = +-eps     (the OLD m)
    # m_i = max(beta_i * eps, 2 + eps) = 2 + eps;  v_i = 4
    # r_i = beta_i * s0 - hc * f
    # s_i = (s0 * 1e-3 / 2 * (2 + eps) + r_i) / (2 + eps)
    st2, h, ok = update(st1, sums(sign * 1.0), hy, b)
    close(h, sign * 2.0)
    r2 = [bi * s0 - sign * EPS * f for bi in (0.9, 0.99)]
    s2 = [(f * (2 + EPS) + ri) / (2 + EPS) for ri in r2]
    check(st2, r=r2, m=[2 + EPS] * 2, v=[4.0, 4.0], s=s2, step=2, skipped=0)
    # the effective lr S' is now about s_init * mean(beta): the start, paid in as wealth
    assert 0.9 * s0 < st2.s.sum().item() < s0
    close(st2.scale, sum(s2) / L)

    # without the wealth (the original update with the same floor) it would stay at the floor
    orig = Hyper(variant="original", weight_decay=0.0, eps=EPS, s_init=s0 * FLOOR, num_betas=2)
    o2, _, _ = update(st1, sums(sign * 1.0), orig, b)
    assert o2.s.sum().item() == pytest.approx(2 * f, rel=1e-6)

    # step 3: v > 0, so r is NOT reset; <g, Delta> = -+0.5, h = -+1, inside +-(2 + eps): hc = h
    # m_i = max(beta_i * (2 + eps), 1 + eps) = beta_i * (2 + eps);  v_i = beta_i^2 * 4 + 1
    # r_i = beta_i * r2_i - h * s2_i;  s_i = (s0 * 1e-3 / 2 * m_i + max(r_i, 0)) / (sqrt(v_i) + eps)
    st3, h, _ = update(st2, sums(-sign * 0.5), hy, b)
    close(h, -sign * 1.0)
    m3 = [bi * (2 + EPS) for bi in (0.9, 0.99)]
    v3 = [bi * bi * 4 + 1 for bi in (0.9, 0.99)]
    r3 = [bi * ri + sign * si for bi, ri, si in zip((0.9, 0.99), r2, s2)]
    s3 = [(f * mi + max(ri, 0.0)) / (math.sqrt(vi) + EPS) for mi, vi, ri in zip(m3, v3, r3)]
    check(st3, r=r3, m=m3, v=v3, s=s3, step=3, skipped=0)


def test_invariant_wealth_waits_for_a_finite_step():
    """A non-finite first non-zero h is skipped as usual: no wealth is paid in, and the next finite
    non-zero h (v still 0) pays it."""
    s0, L = 1e-2, 0.5
    hy = inv(weight_decay=0.0, s_init=s0, num_betas=1)
    f = s0 * FLOOR
    st1 = state([0.0], [EPS], [0.0], [f], step=1, lr_ref=L)
    bad, _, ok = update(st1, sums(float("nan")), hy, beta(0.9))
    assert not ok.item()
    for k in ("r", "m", "v", "s", "lr_ref"):
        assert torch.equal(getattr(bad, k), getattr(st1, k)), k
    # <g, Delta> = 3: h = 6, r := s0 * 6, hc = eps;  m = 6 + eps, v = 36;  r = 0.9 * 6 s0 - eps * f
    good, h, _ = update(bad, sums(3.0), hy, beta(0.9))
    close(h, 6.0)
    r = 0.9 * 6 * s0 - EPS * f
    check(good, r=[r], m=[6 + EPS], v=[36.0], s=[(f * (6 + EPS) + r) / (6 + EPS)], step=2, skipped=1)


def test_invariant_h_divides_by_lr_ref_and_decays_with_the_effective_lr():
    # past the start (v > 0): lambda = 0.5, n = 1, s = 0.25 so S' = 0.25; lr_ref = 0.5 so S = 0.5
    # sums: <g,Delta> = 1, <x,Delta> = 2, |g|^2 = 9, |x|^2 = 16
    # h = (1 + 0.5 * S' * 3 / (4 + eps) * 2) / lr_ref = (1 + 0.75 / (4 + eps)) / 0.5
    # (the decay uses S' = sum(s); with S = 0.5 it would be 1 + 1.5 / (4 + eps))
    s0 = 1e-3
    hy = inv(weight_decay=0.5, s_init=s0, num_betas=1)
    st = state([0.0], [10.0], [1.0], [0.25], step=5, lr_ref=0.5)
    st1, h, _ = update(st, sums(1.0, 2.0, 9.0, 16.0), hy, beta(0.9))
    h_exp = (1 + 0.75 / (4 + EPS)) / 0.5
    close(h, h_exp)
    # old m = 10 > h: hc = h;  m = max(9, h + eps) = 9;  v = 0.81 + h^2;  r = -0.25 h < 0
    # s = (s0 * 1e-3 * 9 + 0) / (sqrt(v) + eps)
    v_exp = 0.81 + h_exp * h_exp
    check(st1, r=[-0.25 * h_exp], m=[9.0], v=[v_exp], s=[s0 * FLOOR * 9.0 / (math.sqrt(v_exp) + EPS)], step=6,
          skipped=0)

    # the recompute form's sums are over x - x_ref = S' * Delta': it divides by S' + eps, never by lr_ref
    # h = (1 + 0.75 / (4 + eps)) / (0.25 + eps), whatever lr_ref is
    rec = inv(weight_decay=0.5, s_init=s0, num_betas=1, store_delta=False)
    for L in (0.5, 1e-4):
        _, h, _ = update(state([0.0], [10.0], [1.0], [0.25], step=5, lr_ref=L), sums(1.0, 2.0, 9.0, 16.0), rec,
                         beta(0.9))
        close(h, (1 + 0.75 / (4 + EPS)) / (0.25 + EPS))


@pytest.mark.parametrize("c", [1e-4, 3.0, 2.0 ** -20])
def test_invariant_update_ignores_the_units_of_delta(c):
    """Delta and lr_ref scaled together by c (the same run at c times the base lr): the stored form's
    update is the same (to rounding; exactly for a power of two)."""
    hy = inv(weight_decay=0.5, s_init=1e-3, num_betas=2)
    b = beta(0.9, 0.99)
    for v0 in ([0.0, 0.0], [1.0, 2.0]):  # at the start (wealth) and past it
        st = state([0.05, -0.02], [0.3, 0.4], v0, [0.1, 0.3], step=3, lr_ref=0.5)
        st_c = state([0.05, -0.02], [0.3, 0.4], v0, [0.1, 0.3], step=3, lr_ref=0.5 * c)
        a, ha, _ = update(st, sums(-1.0, 5.0, 4.0, 1.0), hy, b)
        z, hz, _ = update(st_c, sums(-1.0 * c, 5.0 * c, 4.0, 1.0), hy, b)
        close(hz, ha.item())
        for k in ("r", "m", "v", "s"):
            close(getattr(z, k), getattr(a, k).tolist())
        if c == 2.0 ** -20:
            assert torch.equal(hz, ha) and all(torch.equal(getattr(z, k), getattr(a, k)) for k in "rmvs")


def _authors_update(state, sums, hyper, beta):
    """The original update as manic implemented it before the invariant form existed (verbatim,
    with TunerState's new field passed through): the original form must stay exactly this."""
    eps, lam = hyper.eps, hyper.weight_decay
    S = state.s.sum()
    g_dot_d, x_dot_d, g_sq, x_sq = sums.unbind()
    gn, xn = g_sq.sqrt(), x_sq.sqrt()
    h = g_dot_d + lam * S * gn / (xn + eps) * x_dot_d
    if not hyper.store_delta:
        h = h / (S + eps)

    hc = torch.minimum(torch.maximum(h, -state.m), state.m)
    m = torch.maximum(beta * state.m, h.abs() + eps)
    v = beta * beta * state.v + h * h
    r = beta * state.r - hc * state.s
    s = (hyper.s_init / hyper.num_betas * m + r.clamp(min=0)) / (v.sqrt() + eps)

    ok = torch.isfinite(torch.cat([sums, h.reshape(1), m, v, r, s])).all()
    keep = lambda new, old: torch.where(ok, new, old)  # noqa: E731
    new = TunerState(keep(r, state.r), keep(m, state.m), keep(v, state.v), keep(s, state.s),
                     state.step + ok.to(torch.int64), state.skipped + (~ok).to(torch.int64), state.lr_ref)
    return new, h, ok


def _random_cases(dtype, n=3, count=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    for i in range(count):
        started = i % 4 != 0  # some at the start: no non-zero h yet, so v = r = 0
        v = rnd(n).abs() if started else torch.zeros(n, dtype=torch.float64)
        r = rnd(n) if started else torch.zeros(n, dtype=torch.float64)
        st = state(r.tolist(), rnd(n).abs().tolist(), v.tolist(), (rnd(n).abs() * 1e-2).tolist(), step=i,
                   dtype=dtype)
        sm = torch.cat([rnd(2) * 10.0 ** (i % 5 - 2), rnd(2).abs() * 10]).to(dtype)
        if i % 7 == 0:
            sm[0] = sm[1] = 0.0  # h = 0
        yield st, sm


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("store_delta", [True, False])
def test_original_form_is_the_authors_update_bitwise(dtype, store_delta):
    """lr_ref = 1 (the original form's) changes nothing: every output bit is the authors' update evaluated in
    float64 (the sums and r, m, v are float64 in every tuner, issue 28), with s and h rounded to the tuner's
    dtype once at the end (a no-op for a float64 tuner: every bit as before)."""
    hy = Hyper(variant="original", weight_decay=0.1, eps=EPS, s_init=1e-3, num_betas=3, store_delta=store_delta)
    b = tuner.betas(3, dtype, CPU)
    for st, sm in _random_cases(dtype):
        new, h, ok = update(st, sm, hy, b)
        wide = TunerState.of({k: t.to(F64) if t.is_floating_point() else t for k, t in st.tensors().items()},
                             F64, CPU)
        old, h_old, ok_old = _authors_update(wide, sm.to(F64), hy, b.to(F64))
        assert torch.equal(h, h_old.to(dtype)) and torch.equal(ok, ok_old)
        for k, t in new.tensors().items():
            want = getattr(old, k)
            if k == "s":  # (kept as it was on a skipped step: rounding it again changes nothing)
                want = want.to(dtype)
            assert torch.equal(t, want.to(t.dtype)), k


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("store_delta", [True, False])
def test_invariant_at_lr_ref_one_past_its_start_is_the_original_bitwise(dtype, store_delta):
    """With lr_ref = 1 and v > 0 (past the wealth start), the invariant form is the original update
    with s_init * 1e-3 for s_init, bit for bit; at the start (v = 0, h != 0) it adds the wealth."""
    s_inv = 2.0
    common = dict(weight_decay=0.1, eps=EPS, num_betas=3, store_delta=store_delta)
    hy = Hyper(variant="invariant", s_init=s_inv, **common)
    orig = Hyper(variant="original", s_init=s_inv * FLOOR, **common)
    b = tuner.betas(3, dtype, CPU)
    started = differs = 0
    for st, sm in _random_cases(dtype, seed=1):
        new, h, ok = update(st, sm, hy, b)
        old, h_old, ok_old = update(st, sm, orig, b)
        assert torch.equal(h, h_old) and torch.equal(ok, ok_old)
        if bool((st.v > 0).all()) or h.item() == 0.0:
            started += 1
            for k, t in new.tensors().items():
                assert torch.equal(t, getattr(old, k)), k
        else:
            differs += 1
            assert (new.r > old.r).all()  # the start, s_init / n * |h| per beta, is paid in
    assert started >= 20 and differs >= 5


# --------------------------------------------------------------------------- non-finite sums
NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("variant", tuner.VARIANTS)
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("pos", [tuner.G_DOT_D, tuner.X_DOT_D, tuner.G_SQ, tuner.X_SQ])
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_nonfinite_sum_skips_bitwise(pos, bad, store_delta, variant):
    hy = Hyper(weight_decay=0.1, eps=EPS, s_init=1e-3, num_betas=2, store_delta=store_delta, variant=variant)
    lr_ref = 1.0 if variant == "original" else 0.25
    st = state([0.05, -0.02], [0.3, 0.4], [1.0, 2.0], [0.1, 0.3], step=7, skipped=2, lr_ref=lr_ref)
    before = {k: t.clone() for k, t in st.tensors().items()}
    sm = sums(-1.0, 5.0, 4.0, 1.0)
    sm[pos] = bad
    new, h, ok = update(st, sm, hy, beta(0.9, 0.99))  # asserts no host sync
    assert isinstance(ok, torch.Tensor) and ok.dtype == torch.bool and ok.dim() == 0
    assert not ok.item()
    for k in ("r", "m", "v", "s", "lr_ref"):
        assert torch.equal(getattr(new, k), before[k]), k  # bitwise the old values
    assert new.step.item() == 7 and new.skipped.item() == 3
    # the old state object itself is untouched
    for k, t in st.tensors().items():
        assert torch.equal(t, before[k]), k


@pytest.mark.parametrize("variant", tuner.VARIANTS)
def test_overflow_in_new_state_skips(variant):
    # the sums are finite but h^2 overflows (h = 1e200 -> v = inf): skipped as well
    hy = Hyper(weight_decay=0.0, eps=EPS, s_init=1e-3, num_betas=1, variant=variant)
    st = state([0.1], [0.3], [1.0], [0.2], step=4, skipped=0)
    new, h, ok = update(st, sums(1e200), hy, beta(0.9))
    assert not ok.item() and math.isfinite(h.item())
    assert torch.equal(new.v, st.v) and torch.equal(new.s, st.s) and torch.equal(new.r, st.r)
    assert torch.equal(new.m, st.m)
    assert new.step.item() == 4 and new.skipped.item() == 1


def test_finite_step_counts_step_not_skipped():
    hy = Hyper(num_betas=3, variant="original")
    st = TunerState.fresh(hy, F64, CPU)
    new, _, ok = update(st, sums(0.0, 0.0, 1.0, 1.0), hy, tuner.betas(3, F64, CPU))
    assert isinstance(ok, torch.Tensor) and ok.item() is True
    assert new.step.item() == 1 and new.skipped.item() == 0


# --------------------------------------------------------------------------- betas, TunerState
def test_betas_values():
    b = tuner.betas(6, F64, CPU)
    assert b.dtype == F64 and b.shape == (6,)
    assert b.tolist() == [0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999]
    assert tuner.betas(1, F64, CPU).tolist() == [0.9]
    b32 = tuner.betas(3, torch.float32, CPU)
    assert b32.dtype == torch.float32
    assert torch.equal(b32, torch.tensor([0.9, 0.99, 0.999], dtype=torch.float32))


def test_fresh():
    hy = Hyper(s_init=1e-4, num_betas=3)
    st = TunerState.fresh(hy, F64, CPU)
    for k in ("r", "m", "v"):
        t = getattr(st, k)
        assert t.dtype == F64 and t.shape == (3,) and t.tolist() == [0.0] * 3
    assert st.s.tolist() == [1e-4] * 3 and st.s.dtype == F64
    assert st.step.dtype == torch.int64 and st.step.shape == () and st.step.item() == 0
    assert st.skipped.dtype == torch.int64 and st.skipped.shape == () and st.skipped.item() == 0
    # lr_ref is 1 until Mechanic starts (the invariant form sets it then), in the tuner's dtype
    assert st.lr_ref.dtype == F64 and st.lr_ref.shape == () and st.lr_ref.item() == 1.0
    # seven distinct tensors (no aliasing between fields)
    assert len({t.data_ptr() for t in st.tensors().values()}) == 7
    assert list(st.tensors()) == ["r", "m", "v", "s", "step", "skipped", "lr_ref"]
    st32 = TunerState.fresh(hy, torch.float32, CPU)
    assert st32.s.dtype == torch.float32 and st32.step.dtype == torch.int64 and st32.lr_ref.dtype == torch.float32
    # the scale is sum(s) / lr_ref: n * s_init before the first step, whatever the variant
    for variant in tuner.VARIANTS:
        close(TunerState.fresh(Hyper(s_init=1e-4, num_betas=3, variant=variant), F64, CPU).scale, 3e-4)


def test_of_copies_and_casts():
    src = {"r": torch.tensor([0.5, -0.25], dtype=torch.float32), "m": torch.tensor([1.0, 2.0], dtype=torch.float32),
           "v": torch.tensor([3.0, 4.0], dtype=torch.float32), "s": torch.tensor([0.1, 0.2], dtype=torch.float32),
           "step": torch.tensor(5.0), "skipped": torch.tensor(2, dtype=torch.int32)}
    st = TunerState.of(src, F64, CPU)
    for k in ("r", "m", "v", "s"):
        t = getattr(st, k)
        assert t.dtype == F64 and torch.equal(t, src[k].double())
        assert t.data_ptr() != src[k].data_ptr()
    assert st.step.dtype == torch.int64 and st.step.item() == 5
    assert st.skipped.dtype == torch.int64 and st.skipped.item() == 2
    # without lr_ref (a version-1 state dict): 1, the original form's unit, in the tuner's dtype
    assert st.lr_ref.dtype == F64 and st.lr_ref.shape == () and st.lr_ref.item() == 1.0
    # with it: copied and cast like the vectors
    lr_ref = torch.tensor(0.1, dtype=torch.float32)
    st1 = TunerState.of({**src, "lr_ref": lr_ref}, F64, CPU)
    assert st1.lr_ref.dtype == F64 and st1.lr_ref.item() == lr_ref.item() and st1.lr_ref.data_ptr() != lr_ref.data_ptr()
    # same dtype: still a copy, never an alias
    src64 = {k: v.clone() for k, v in state([1.0], [2.0], [3.0], [4.0], 1, 0, lr_ref=0.5).tensors().items()}
    st2 = TunerState.of(src64, F64, CPU)
    for k, t in st2.tensors().items():
        assert torch.equal(t, src64[k]) and t.data_ptr() != src64[k].data_ptr()
    src64["s"].fill_(9.0)
    assert st2.s.item() == 4.0
    # a tensor that requires grad comes out detached
    st3 = TunerState.of({**src64, "r": torch.tensor([1.0], dtype=F64, requires_grad=True)}, F64, CPU)
    assert not st3.r.requires_grad


def test_to():
    st = state([0.5], [1.5], [2.5], [0.125], step=3, skipped=1, lr_ref=0.25)
    assert st.to(F64, CPU) is st
    st32 = st.to(torch.float32, CPU)
    assert st32 is not st
    assert st32.s.dtype == torch.float32 and st32.step.dtype == torch.int64 and st32.lr_ref.dtype == torch.float32
    assert st32.r.tolist() == [0.5] and st32.m.tolist() == [1.5] and st32.v.tolist() == [2.5]
    assert st32.s.tolist() == [0.125] and st32.step.item() == 3 and st32.skipped.item() == 1
    assert st32.lr_ref.item() == 0.25 and st32.scale.item() == 0.5
    st.s.fill_(7.0)  # a copy: the original's later changes do not show
    assert st32.s.item() == 0.125


def test_copy_in_place():
    dst = state([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    ptrs = {k: t.data_ptr() for k, t in dst.tensors().items()}
    objs = {k: t for k, t in dst.tensors().items()}
    src = state([1.0, -2.0], [3.0, 4.0], [5.0, 6.0], [0.1, 0.2], step=9, skipped=4, lr_ref=0.5)
    dst.copy_(src)
    for k, t in dst.tensors().items():
        assert t is objs[k] and t.data_ptr() == ptrs[k]
        assert torch.equal(t, getattr(src, k))
    src.r.fill_(0.0)  # values, not aliases
    assert dst.r.tolist() == [1.0, -2.0]
    # copy_ from a float32 state casts into the float64 tensors
    dst.copy_(src.to(torch.float32, CPU))
    assert dst.r.dtype == F64 and dst.r.tolist() == [0.0, 0.0] and dst.step.item() == 9
