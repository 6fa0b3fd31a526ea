"""The GPU path on one CUDA device (skipped without one; benchmarks/gpu_check.py runs these on a GPU
machine, with tests/distributed/test_nccl.py on 2+ GPUs):

- manic against the float64 NumPy reference of docs/algorithm.md, float64 parameters on the GPU (fused,
  foreach and for-loop bases), eager and compile=True (Triton), to test_reference.py's 1e-9;
- bf16 parameters do not stall: "ref+delta" and "delta" grow where "ref" stays at s_init, eager and
  compiled, and the invariant form's default start learns;
- no host sync in a step, eager and compile=True, counted by torch's profiler (aten::_local_scalar_dense
  and CUDA's synchronizing runtime calls) and by torch's CUDA sync debug mode;
- compile=True through Triton gives the eager kernels' results and the eager trajectory. Each compiled
  check starts from a fresh Dynamo that raises at its recompile limit (instead of running a kernel
  uncompiled) and asserts that something was compiled.

Each test is ``check_*("cuda", ...)``; tests/test_gpu_check.py runs the same ``check_*`` on the CPU, so the
checks themselves run on every CI pass. The measuring code is tests/gpu_checks.py.
"""

from __future__ import annotations

import pytest
import torch

import gpu_checks as G

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason=f"needs a CUDA GPU (torch {torch.__version__} sees none); on a GPU "
                                        "machine: python benchmarks/gpu_check.py"),
]
VARIANTS = ["original", "invariant"]


@pytest.fixture(autouse=True)
def _on_the_first_gpu():
    if CUDA:
        torch.cuda.set_device(0)
    yield


def _cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


# ----------------------------------------------------------------------------- the float64 reference
def check_reference(device: str, base: str, regime: str, store_delta: bool, variant: str) -> None:
    errors = G.reference_errors(device, base, regime, variant, store_delta)
    assert errors["scale"] <= 1e-9 and errors["x"] <= 1e-9, errors


def check_compiled_reference(device: str, store_delta: bool, variant: str) -> None:
    """Every tensor through the compiled kernels (SMALL = 0)."""
    with G.small(0), G.compiled_graphs() as graphs:
        for regime in ("fixed", "closed"):
            errors = G.reference_errors(device, "adamw_fused", regime, variant, store_delta, compile=True)
            assert errors["scale"] <= 1e-9 and errors["x"] <= 1e-9, (regime, errors)
    assert graphs[0] > 0, "nothing was compiled"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("regime", ["random", "fixed", "closed"])
@pytest.mark.parametrize("base", ["adamw_fused", "adamw", "sgd_nesterov", "adagrad"])
def test_matches_reference_on_cuda(base, regime, store_delta, variant):
    check_reference("cuda", base, regime, store_delta, variant)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("store_delta", [True, False])
def test_compiled_matches_reference_on_cuda(store_delta, variant):
    check_compiled_reference("cuda", store_delta, variant)


# ----------------------------------------------------------------------------- bf16
def _worst(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / y for x, y in zip(a, b))


def check_bf16_does_not_stall(device: str, compile: bool) -> None:
    """(On the CPU: "delta" within 8.2e-3 of "ref+delta" over the 40 steps; 5e-2 here, as CUDA's bf16 matmuls
    round otherwise and compile=True keeps intermediates in float32.)"""
    with G.small(0 if compile else G.kernels.SMALL), G.compiled_graphs() as graphs:
        r = G.bf16_no_stall(device, compile=compile)
    assert (graphs[0] > 0) == compile, graphs
    assert max(r["ref"]) < 1.01e-6, "state='ref' was expected to stall at s_init in bf16"
    assert max(r["ref+delta"]) > 1e-2 and max(r["delta"]) > 1e-2, (max(r["ref+delta"]), max(r["delta"]))
    assert _worst(r["delta"], r["ref+delta"]) <= 5e-2
    inv, losses = r["invariant"], r["invariant_losses"]
    assert max(inv) > 100 * inv[0] and losses[-1] < 0.5 * losses[0], (inv[0], max(inv), losses[0], losses[-1])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_does_not_stall_on_cuda(compile):
    check_bf16_does_not_stall("cuda", compile)


# ----------------------------------------------------------------------------- host syncs
def check_no_host_sync(device: str, compile: bool, state: str) -> None:
    """From the third step (the first two compile=True steps compile): manic over fused AdamW makes the host
    syncs fused AdamW alone makes, by the profiler; on CUDA none by the sync debug mode."""
    with G.compiled_graphs() as graphs:
        rows = G.step_syncs(device, compile=compile, state=state)
    assert (graphs[0] > 0) == compile, graphs
    *steps, probe = rows
    # the counters see a sync when there is one: .item() is one _local_scalar_dense (and on CUDA a copy to the
    # host and a stream synchronize)
    assert probe["item"].get("aten::_local_scalar_dense") == 1, probe
    if _cuda(device):
        assert probe["item"].get("cudaStreamSynchronize", 0) + probe["item"].get("cudaMemcpy", 0) >= 1, (
            f"the profiler recorded no CUDA runtime sync for .item() ({probe}): CUPTI is not tracing, so the "
            "runtime half of this count is blind")
    for t, row in enumerate(steps[2:], 2):
        assert row["manic"] == row["base"], f"step {t}: manic {row['manic']}, fused AdamW alone {row['base']}"
        if _cuda(device):  # fused AdamW on CUDA syncs nowhere: none at all
            assert row["manic"] == {}, f"step {t}: host syncs {row['manic']} (fused AdamW alone: {row['base']})"
            assert row["manic_debug"] == 0, (f"step {t}: the sync debug mode saw {row['manic_debug']} synchronizing "
                                             f"operations in manic's step (fused AdamW alone: {row['base_debug']})")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("state", ["ref+delta", "delta"])
@pytest.mark.parametrize("compile", [False, True])
def test_no_host_sync_per_step_on_cuda(compile, state):
    check_no_host_sync("cuda", compile, state)


# ----------------------------------------------------------------------------- compile=True against eager
def check_compiled_kernels(device: str, dtype: torch.dtype) -> None:
    with G.compiled_graphs() as graphs:
        errors = G.compiled_kernels_errors(device, dtype)
    assert graphs[0] > 0, "nothing was compiled"
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    sums_tol = {torch.float64: 1e-13, torch.float32: 1e-5}[dtype]  # (in units of the sums of |products|)
    assert errors.pop("partial_sums") <= sums_tol
    assert all(e <= tol for e in errors.values()), errors


def check_compiled_step(device: str, state: str) -> None:
    """float64, 10 steps, two param groups: compile=True's scales and parameters are the eager ones."""
    with G.compiled_graphs() as graphs:
        runs = G.compiled_trajectory(device, state=state)
    assert graphs[0] > 0, "nothing was compiled"
    eager, compiled = runs["eager"], runs["compiled"]
    assert eager["scales"][-1] > 100 * eager["scales"][0]  # the scale moved
    assert compiled["scales"] == pytest.approx(eager["scales"], rel=1e-10)
    for a, b in zip(compiled["params"], eager["params"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_kernels_match_eager_on_cuda(dtype):
    check_compiled_kernels("cuda", dtype)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("state", ["ref+delta", "delta"])
def test_compiled_step_follows_eager_on_cuda(state):
    check_compiled_step("cuda", state)
