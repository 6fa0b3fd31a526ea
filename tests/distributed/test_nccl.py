"""DDP and FSDP2 over NCCL on 2 GPUs (skipped without them): the single-process run's trajectory on the
same GPU, the scale bitwise the same on both ranks, one all-reduce per step under FSDP2 (none under DDP)
and no host sync (device_scenarios.py). Part of benchmarks/gpu_check.py; the same forms run over gloo on
the CPU in tests/test_gpu_check.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import device_scenarios
import nccl_harness

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(GPUS < 2 or not dist.is_nccl_available(),
                       reason=f"needs 2 CUDA GPUs and NCCL (found {GPUS} GPU(s), NCCL "
                              f"{'available' if dist.is_available() and dist.is_nccl_available() else 'not available'})"),
]


@pytest.mark.timeout(240)
def test_two_ranks_over_nccl_match_single_process():
    results = nccl_harness.run(2, device_scenarios.forms, "cuda", backend="nccl", timeout=200, pg_timeout=60)
    device_scenarios.check_results(results, "cuda")
