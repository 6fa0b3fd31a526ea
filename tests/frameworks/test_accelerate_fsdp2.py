"""accelerate's FSDP2 preparation under Mechanic, on 2 real gloo ranks.

``Accelerator._prepare_fsdp2`` wraps the optimizer built on the full-size model, swaps
placeholders into its param groups, shards the model with ``fully_shard`` and then points the
param groups at the sharded DTensors (``fsdp2_switch_optimizer_parameters``). Mechanic, built
before all this, must end up on the sharded parameters exactly as if it had been built after
sharding: same tensors, one all-reduce and no host sync per step, the same trajectory, state the
size of the local shards, no full-size parameter kept alive, and a DCP checkpoint (accelerate's
own save/load helpers) that resumes bitwise. See accelerate_fsdp2.py for what each rank runs.

One 2-rank group runs every check (starting one costs seconds); each test reports one of them.
"""

from __future__ import annotations

import pytest

import accelerate_fsdp2
import harness

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("accelerate_fsdp2") / "checkpoint")
    return harness.run(2, accelerate_fsdp2.run, ckpt, timeout=150)


# What each check of accelerate_fsdp2.run asserts on every rank (one test each).
CHECKS = {
    "control": "a plain AdamW prepared the same way ends on the sharded parameters and keeps no full-size one "
               "alive, so the checks below are about Mechanic",
    "identity": "the mechanic_* entries of opt.state are keyed by exactly the model's DTensor parameters, and "
                "the engine's params are list(model.parameters()) element-wise",
    "counts": "one all-reduce and no host sync per step",
    "scale_grows": "the scale grows",
    "state_bytes": "the state is two copies of the local shards",
    "no_full_size_refs": "no full-size parameter stays referenced",
    "state_dict": "the state dict",
    "dcp_resume": "accelerate's FSDP2 save (save_fsdp_model/optimizer: DCP) after 40 steps, loaded into a new "
                  "model + optimizer prepared the same way (different init), 10 more steps: scales and "
                  "parameters bitwise equal to the uninterrupted run",
}


def _check(ranks, name):
    for rank, r in enumerate(ranks):
        assert r["checks"][name] == "ok", f"rank {rank}: {r['checks'][name]}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(CHECKS))
def test_check_on_every_rank(ranks, name):
    _check(ranks, name)


@pytest.mark.timeout(180)
def test_trajectory_matches_optimizer_built_after_sharding(ranks):
    """Scale per step and final full parameters within 1e-9 relative (float64)."""
    _check(ranks, "trajectory")
    assert all(r["same_on_all_ranks"] for r in ranks), "the scale differs across ranks"
