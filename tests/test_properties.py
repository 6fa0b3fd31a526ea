"""Property tests (hypothesis): sharded partial sums add up to the unsharded ones; valid
random hyperparameters never produce a non-finite value."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manic
from manic import kernels, step
from manic.layout import bind
from manic.state import DELTA, REF

shapes = st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple)


def _partial_sums(params, grads, refs, deltas):
    """The engine's local partial sums over ``params`` holding the given buffers."""
    for p, g in zip(params, grads):
        p.grad = g
    opt = manic.mechanize(torch.optim.SGD(params, lr=0.1))
    layout = bind(opt.base_optimizer, None, None, None)
    buffers = {s.index: {REF: r, DELTA: d} for s, r, d in zip(layout.slots, refs, deltas)}
    xs, bufs = step.views(layout, buffers)
    return step.local_sums(layout, xs, opt.hyper.mode.direction(xs, bufs)[0], kernels.EAGER)[0]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape_list=st.lists(shapes, min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float64]), world=st.integers(1, 4))
def test_sharded_partial_sums_add_up(data, shape_list, dtype, world):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    full = [[torch.randn(s, generator=gen, dtype=dtype) for s in shape_list] for _ in range(4)]
    xs, gs, refs, deltas = full
    params = [x.clone().requires_grad_(True) for x in xs]
    expected = _partial_sums(params, gs, refs, deltas)

    total = torch.zeros_like(expected)
    # each tensor is flattened and cut at random points into `world` (possibly empty) shards
    cuts = []
    for x in xs:
        points = sorted(data.draw(st.lists(st.integers(0, x.numel()), min_size=world - 1, max_size=world - 1)))
        cuts.append([0, *points, x.numel()])
    for r in range(world):
        shard = [[t.reshape(-1)[c[r]:c[r + 1]].clone() for t, c in zip(ts, cuts)] for ts in full]
        sxs, sgs, srefs, sdeltas = shard
        sparams = [x.requires_grad_(True) for x in sxs]
        total += _partial_sums(sparams, sgs, srefs, sdeltas)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    scale = expected.abs().max().item() + 1.0
    assert (total - expected).abs().max().item() <= tol * scale


@settings(max_examples=40, deadline=None)
@given(weight_decay=st.floats(0, 1), eps=st.floats(1e-12, 1e-3), s_init=st.floats(1e-10, 1.0),
       num_betas=st.integers(1, 8), store_delta=st.booleans(), log_gscale=st.floats(-6, 6),
       seed=st.integers(0, 1000))
def test_valid_hyperparameters_never_produce_nan(weight_decay, eps, s_init, num_betas, store_delta, log_gscale,
                                                 seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 3, generator=gen).requires_grad_(True), torch.zeros(4, requires_grad=True)]
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-2), weight_decay=weight_decay, eps=eps, s_init=s_init,
                          num_betas=num_betas, store_delta=store_delta)
    for _ in range(20):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10.0**log_gscale + 0.1 * p.detach()
        opt.step()
    assert math.isfinite(opt.scale.item())
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.stats()["skipped_steps"].item() == 0
