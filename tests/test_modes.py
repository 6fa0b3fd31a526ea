"""modes.py: the state modes as objects: their buffers and dtypes, the direction and transient of each,
the snapshot, the kernel each rebase runs, the unit of the tuner's h, and what a skipped step restores."""

from __future__ import annotations

import pytest
import torch

from manic import kernels
from manic.modes import DELTA, MODES, REF, Delta, Ref, RefDelta
from manic.options import STATES

F64, BF16 = torch.float64, torch.bfloat16


def _x(seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(3, 2, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def test_one_mode_per_state_name():
    assert tuple(MODES) == STATES == ("ref+delta", "ref", "delta")
    assert [type(m) for m in MODES.values()] == [RefDelta, Ref, Delta]
    assert {n: m.keys for n, m in MODES.items()} == {"ref+delta": (REF, DELTA), "ref": (REF,), "delta": (DELTA,)}
    assert {n: m.keeps_delta for n, m in MODES.items()} == {"ref+delta": True, "ref": False, "delta": True}


@pytest.mark.parametrize("fp32_reference", [False, True])
@pytest.mark.parametrize("name", list(MODES))
def test_new_buffers_start_at_x_with_delta_zero(name, fp32_reference):
    p = torch.nn.Parameter(_x(dtype=BF16))
    bufs = MODES[name].new_buffers(p, fp32_reference)
    assert tuple(bufs) == MODES[name].keys
    if REF in bufs:
        assert bufs[REF].dtype == (torch.float32 if fp32_reference else BF16)
        assert torch.equal(bufs[REF], p.detach().to(bufs[REF].dtype)) and bufs[REF].data_ptr() != p.data_ptr()
        assert not bufs[REF].requires_grad
    if DELTA in bufs:
        assert bufs[DELTA].dtype == torch.float32 and not bufs[DELTA].any()  # float32 for 16-bit parameters


def test_placed_copies_in_the_mode_s_dtype():
    p = _x(dtype=BF16)
    saved = _x(1)
    for key, fp32_reference, dtype in ((REF, False, BF16), (REF, True, torch.float32), (DELTA, False, torch.float32)):
        got = MODES["ref+delta"].placed(p, key, saved, fp32_reference)
        assert got.dtype == dtype and got.data_ptr() != saved.data_ptr()


def test_direction_transient_and_snapshot():
    xs, refs, ds = [_x(0)], [_x(1)], [_x(2)]
    bufs = [{REF: refs[0], DELTA: ds[0]}]
    for mode in (MODES["ref+delta"], MODES["delta"]):
        d, transient = mode.direction(xs, bufs)
        assert d[0] is ds[0] and transient is None
    d, transient = MODES["ref"].direction(xs, [{REF: refs[0]}])
    assert torch.equal(d[0], xs[0] - refs[0]) and transient is d  # D = x_t - x_ref, kept for the rebase
    assert MODES["ref"].snapshot(xs, transient) is transient and MODES["ref+delta"].snapshot(xs, None) is None
    copy = MODES["delta"].snapshot(xs, None)
    assert torch.equal(copy[0], xs[0]) and copy[0].data_ptr() != xs[0].data_ptr()  # x_t, a copy


def test_unit_of_h():
    S, lr_ref = torch.tensor(0.5, dtype=F64), torch.tensor(0.25, dtype=F64)
    assert MODES["ref+delta"].unit(S, lr_ref, 1e-8) is lr_ref and MODES["delta"].unit(S, lr_ref, 1e-8) is lr_ref
    assert MODES["ref"].unit(S, lr_ref, 1e-8).item() == 0.5 + 1e-8


def test_each_mode_rebases_with_its_kernel():
    calls = []
    fake = kernels.Kernels(None, *(lambda *a, name=n: calls.append((name, len(a))) for n in
                                   ("rebase", "rebase_recompute", "rebase_delta")))
    x, bufs = [_x()], [{REF: _x(1), DELTA: _x(2)}]
    one = torch.ones((), dtype=F64)
    for name in MODES:
        MODES[name].rebase(fake, x, bufs, [_x(3)], one, one, torch.tensor(True), one)
    assert calls == [("rebase", 6), ("rebase_recompute", 7), ("rebase_delta", 6)]


@pytest.mark.parametrize("fns", [kernels.EAGER, kernels.Kernels(kernels.partial_sums_fusable, kernels.rebase_fusable,
                                                               kernels.rebase_recompute_fusable,
                                                               kernels.rebase_delta_fusable)],
                         ids=["eager", "fusable"])
def test_a_skipped_step_restores_what_each_mode_says(fns):
    """ok false: the base step's move is dropped, whatever x holds after it (here NaN)."""
    S_old, S_new, eps, no = torch.tensor(0.5, dtype=F64), torch.tensor(0.75, dtype=F64), 1e-8, torch.tensor(False)
    x_ref, delta, x_t = _x(1), _x(2), _x(3)
    after = lambda: [torch.full_like(x_t, float("nan"))]  # noqa: E731
    # ref+delta: x = x_ref + S_new * Delta_t, Delta unchanged
    x, d = after(), delta.clone()
    MODES["ref+delta"].rebase(fns, x, [{REF: x_ref, DELTA: d}], None, S_old, S_new, no, torch.tensor(eps))
    torch.testing.assert_close(x[0], x_ref + S_new * delta, rtol=1e-15, atol=0)
    assert torch.equal(d, delta)
    # ref: x = x_ref + S_new * D / (S_old + eps), D = x_t - x_ref
    x, D = after(), x_t - x_ref
    MODES["ref"].rebase(fns, x, [{REF: x_ref}], [D], S_old, S_new, no, torch.tensor(eps))
    torch.testing.assert_close(x[0], x_ref + S_new * D / (S_old + eps), rtol=1e-14, atol=0)
    # delta: x = x_t + (S_new - S_old) * Delta_t, Delta unchanged
    x, d = after(), delta.clone()
    MODES["delta"].rebase(fns, x, [{DELTA: d}], [x_t.clone()], S_old, S_new, no, torch.tensor(eps))
    torch.testing.assert_close(x[0], x_t + (S_new - S_old) * delta, rtol=1e-15, atol=1e-16)
    assert torch.equal(d, delta)
