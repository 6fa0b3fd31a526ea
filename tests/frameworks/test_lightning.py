"""manic under PyTorch Lightning's own code paths: ``Trainer.fit`` with ``configure_optimizers``
returning ``manic.mechanize(AdamW)`` and a per-step LR scheduler, ``ModelCheckpoint``,
``trainer.save_checkpoint`` and ``fit(ckpt_path=...)``, on one process, under ``strategy="ddp"``
on two CPU ranks, and under ``ModelParallelStrategy`` with FSDP2 ``fully_shard`` applied in
``configure_model`` (Lightning saves and loads a distributed checkpoint directory through
``torch.distributed.checkpoint``).

Each test runs ``lightning_job.py`` in a subprocess (Lightning's own launcher starts rank 1 by
re-running the script; under pytest it would re-run pytest). The job trains four times
(see its docstring): A uninterrupted with a ``ModelCheckpoint`` at N/2, B stopped by
``max_steps=N/2`` and saved, C resumed from B, D resumed from A's ``ModelCheckpoint``. A resumed
run must end bitwise where the uninterrupted one does: same scale after every step, same
parameters; the scale must have moved far from ``s_init=1e-6`` and agree on every rank.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import jobs

JOB = Path(__file__).with_name("lightning_job.py")
N, HALF = 40, 20                      # as in lightning_job.py
PARAM_BYTES = 8 * (8 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2)   # the float64 MLP there

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs lightning")

def launch(mode: str, out: Path, world: int, timeout: float) -> list[dict[str, Any]]:
    """Run the job; return each rank's results (fail with the ranks' tracebacks otherwise)."""
    return jobs.run([sys.executable, str(JOB), mode, str(out)], out, world, timeout, f"{mode}: the Lightning job")


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    i = int((a != b).nonzero()[0, 0])
    return f"first at step index {i}: {a[i].item()!r} vs {b[i].item()!r}"


def check_resume(name: str, results: list[dict[str, Any]]) -> None:
    """The assertions every mode shares, on every rank."""
    for rank, r in enumerate(results):
        A, B, C, D = r["A"], r["B"], r["C"], r["D"]
        where = f"{name} rank {rank}"
        assert (A["global_step"], B["global_step"], C["global_step"], D["global_step"]) == (N, HALF, N, N), where
        # Lightning's own path: automatic optimization steps the Mechanized optimizer with a closure
        assert A["is_mechanized"] == "Mechanized" and A["step_kwargs"][0] == ["closure=partial"], \
            (where, A["is_mechanized"], A["step_kwargs"])
        assert A["scale"].item() > 1e-3, f"{where}: the scale never moved from s_init: {A['scale'].item()!r}"
        assert torch.equal(B["scales"], A["scales"][:HALF]), \
            f"{where}: the stopped run's first half differs: {_first_difference(B['scales'], A['scales'][:HALF])}"
        for run, source in (("C", "trainer.save_checkpoint after max_steps"), ("D", "ModelCheckpoint mid-run")):
            X = r[run]
            assert torch.equal(X["scale"], A["scale"]), \
                (f"{where}: resumed from {source}, the final scale is {X['scale'].item()!r}, "
                 f"uninterrupted {A['scale'].item()!r}")
            assert torch.equal(X["scales"], A["scales"][HALF:]), \
                f"{where}: resumed from {source}: {_first_difference(X['scales'], A['scales'][HALF:])}"
            diff = [i for i, (p, q) in enumerate(zip(X["params"], A["params"])) if not torch.equal(p, q)]
            assert not diff, f"{where}: resumed from {source}: parameters {diff} differ from the uninterrupted run"
        for run in "ABCD":
            X = r[run]
            # Mechanic's buffers sit in opt.state under the model's own parameters, one set each
            assert X["mechanic_keys_are_params"] and X["params_with_mechanic"] == X["num_params"], \
                (where, run, X["mechanic_keys_are_params"], X["params_with_mechanic"], X["num_params"])
            assert X["mechanic_keys"] == ["mechanic_delta", "mechanic_ref"], (where, run, X["mechanic_keys"])
            assert X["buffers_match_shards"], (where, run)
            assert X["mechanic_bytes"] == 2 * X["local_param_bytes"], \
                (where, run, X["mechanic_bytes"], X["local_param_bytes"])
        # the checkpoints Lightning wrote carry Mechanic's per-parameter buffers
        for ckpt in A["checkpoints"] + B["checkpoints"]:
            assert {"mechanic_ref", "mechanic_delta"} <= set(ckpt["optim_entry"]), (where, ckpt)
    # the scale is bitwise the same on every rank, after every step of every run
    for run in "ABCD":
        for rank, r in enumerate(results[1:], 1):
            assert torch.equal(r[run]["scales"], results[0][run]["scales"]), \
                f"{name} run {run}: rank {rank}'s scales differ from rank 0's"


@pytest.mark.timeout(150)
def test_single_process_resume(tmp_path):
    results = launch("single", tmp_path, 1, timeout=130)
    check_resume("single", results)


@pytest.mark.timeout(200)
def test_ddp_two_ranks_resume(tmp_path):
    """``strategy="ddp"`` on 2 CPU devices; Lightning launches rank 1 itself."""
    results = launch("ddp", tmp_path, 2, timeout=180)
    assert [r["world"] for r in results] == [2, 2]
    check_resume("ddp", results)
    # under DDP every rank holds the whole model, and Mechanic a whole copy of each buffer
    assert all(r["A"]["local_param_bytes"] == PARAM_BYTES for r in results)
    # Lightning wrapped the module in DDP before it called configure_optimizers
    assert results[0]["A"]["events"][1][2] == "DistributedDataParallel", results[0]["A"]["events"]


@pytest.mark.timeout(200)
def test_model_parallel_fsdp2_resume(tmp_path):
    """``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, ``fully_shard`` in
    ``configure_model``; Lightning's distributed checkpoint (a directory written with DCP from
    ``get_optimizer_state_dict``, loaded with ``set_optimizer_state_dict``)."""
    results = launch("fsdp2", tmp_path, 2, timeout=180)
    assert [r["world"] for r in results] == [2, 2]
    assert results[0]["ckpt_is_dir"], "ModelParallelStrategy should have saved a distributed checkpoint directory"
    # configure_optimizers ran after configure_model: the optimizer was built on the DTensors
    events = results[0]["A"]["events"]
    assert events[0][0] == "configure_model" and events[1][0] == "configure_optimizers", events
    assert set(events[1][1]) == {"DTensor"}, events
    check_resume("fsdp2", results)
    for rank, r in enumerate(results):
        for run in "ABCD":
            X = r[run]
            # Mechanic's buffers are on the sharded DTensor parameters, sharded like them
            assert all(X["params_dtensor"]) and all(X["buffers_dtensor"]), \
                (rank, run, X["params_dtensor"], X["buffers_dtensor"])
            assert X["buffers_match_shards"], (rank, run)
            assert X["mechanic_bytes"] == 2 * X["local_param_bytes"], \
                (rank, run, X["mechanic_bytes"], X["local_param_bytes"])
        for ckpt in r["A"]["checkpoints"] + r["B"]["checkpoints"]:
            # get_optimizer_state_dict keys the state by parameter name, the buffers stay DTensors
            assert ckpt["optim_state_keys"][0] == "'net.fc1.weight'", ckpt
            assert ckpt["optim_entry"]["mechanic_ref"] == ckpt["optim_entry"]["mechanic_delta"] == "DTensor", ckpt
    # each rank holds a shard, and the shards add up to the model
    local = [r["A"]["local_param_bytes"] for r in results]
    assert sum(local) == PARAM_BYTES and max(local) < PARAM_BYTES, local
