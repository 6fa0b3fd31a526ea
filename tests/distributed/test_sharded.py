"""Sharded Mechanic on real gloo process groups: every parallel form matches the single-process
run, the scale is bitwise identical on every rank, one collective per step (none under DDP),
no host sync, and ranks that disagree on the configuration are all told."""

from __future__ import annotations

import pytest

import harness
import scenarios


@pytest.mark.timeout(240)
def test_two_ranks_match_single_process():
    """Every form in the default (invariant) form, DDP, FSDP2, TP and the pipeline in the original, DDP,
    TP and FSDP2 (original form) with per_group=True: two param groups, one tuner each, and DDP, FSDP1
    (both flat-parameter modes, with its bitwise state-dict round trip), FSDP2 and TP with state="delta"
    (one buffer, a transient copy of the local shards)."""
    results = harness.run(2, scenarios.two_rank_forms, timeout=200)
    assert {"ddp_original", "fsdp2_original", "tp_original", "pipeline_original", "ddp_per_group", "tp_per_group",
            "fsdp2_per_group_original", "ddp_delta", "fsdp2_delta", "tp_delta", "fsdp1_delta",
            "fsdp1_orig_delta"} <= set(results[0])
    for form, r in results[0].items():
        tol = 1e-9 if "per_group" in form else 1e-10  # (scenarios.check_form)
        assert r["params_rel"] <= tol and r["scale_rel"] <= tol, form


@pytest.mark.timeout(300)
def test_two_ranks_compiled():
    """compile=True under FSDP2 (state "ref+delta" and "delta") and TP matches the single-process
    compile=True run, with one collective and no host sync per step (scenarios.check_form)."""
    results = harness.run(2, scenarios.compiled_forms, timeout=260)
    for form, r in results[0].items():
        assert r["params_rel"] <= 1e-10 and r["scale_rel"] <= 1e-10, form


@pytest.mark.timeout(300)
def test_four_ranks_fsdp2_hsdp_and_2d():
    results = harness.run(4, scenarios.four_rank_forms, timeout=260)
    for r in results:
        for form in ("fsdp2", "hsdp", "fsdp_tp", "fsdp2_original", "hsdp_original", "fsdp2_per_group", "hsdp_per_group",
                     "fsdp2_delta", "hsdp_delta"):
            tol = 1e-9 if "per_group" in form else 1e-10  # (scenarios.check_form)
            assert r[form]["params_rel"] <= tol and r[form]["scale_rel"] <= tol, form
    assert len({r["grads_none"]["scale"] for r in results}) == 1
    # per-rank Mechanic state falls as 1/world: the shards add up to two copies of the model
    per_rank = [r["fsdp2"]["state_bytes"] for r in results]
    total = 2 * 8 * sum(p.numel() for p in scenarios.make_net().parameters())
    assert sum(per_rank) == total and max(per_rank) <= total / 4 + 2 * 8 * 16, per_rank
    # state="delta": one copy
    assert sum(r["fsdp2_delta"]["state_bytes"] for r in results) == total // 2


@pytest.mark.timeout(120)
def test_config_mismatch_raises_on_every_rank():
    """Each differing field named on every rank; the check needs no NumPy (Tensor.numpy raises here)."""
    results = harness.run(2, scenarios.config_mismatch, timeout=90)
    assert [r["none"] for r in results] == ["no error", "no error"], results
    for field in scenarios.CONFIG_FIELDS:
        for rank, messages in enumerate(results):
            if field == "num_params":  # ranks holding different parameters: the message names process_group=
                assert "hold different parameters" in messages[field] and "process_group=" in messages[field], \
                    (rank, messages[field])
                continue
            assert "disagree" in messages[field] and field in messages[field], (rank, field, messages[field])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["raises", "dies"])
def test_failing_rank_does_not_hang_the_others(how):
    """Rank 0 gets an error from the collective within the process-group timeout (here 10 s)."""
    with pytest.raises(RuntimeError) as info:
        harness.run(2, scenarios.rank_fails_mid_step, how, timeout=60, pg_timeout=10)
    text = str(info.value)
    assert "rank 1" in text or "exit codes" in text
    assert "Error after" in text  # rank 0's step raised (it did not hang), see rank_fails_mid_step
    if how == "raises":
        assert "failed on purpose" in text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DCP checkpoint written by 2 FSDP2 ranks after 30 steps, and the uninterrupted run's end."""
    path = str(tmp_path_factory.mktemp("dcp") / "step30")
    results = harness.run(2, scenarios.dcp_save, path, 30, 12, timeout=200)
    return path, results[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 4])
def test_dcp_resharded_resume(saved, world):
    """Saved on 2 ranks, loaded on 1 and 4: continues like the uninterrupted run (float64, 1e-9), with
    one tuner, with per_group=True and with state="delta"."""
    path, uninterrupted = saved
    results = harness.run(world, scenarios.dcp_resume, path, 12, timeout=200)
    for r in results:
        for got, want in ((r, uninterrupted), (r["per_group"], uninterrupted["per_group"]),
                          (r["delta"], uninterrupted["delta"])):
            for a, b in zip(got["params"], want["params"]):
                assert scenarios.rel(a, b) <= 1e-9
            for a, b in zip(got["scales"], want["scales"]):
                assert abs(a - b) / b <= 1e-9
    assert uninterrupted["scales"][-1] > 1e-3 and len(uninterrupted["per_group"]["scales"]) == 2 * 12


@pytest.mark.timeout(120)
def test_ranks_holding_different_parameters_with_nothing_to_reduce_raise():
    """DeepSpeed ZeRO's case without process_group=: each rank would tune its own scale."""
    results = harness.run(2, scenarios.held_check, timeout=90)
    for r in results:
        assert r["different"].startswith("ValueError") and "process_group=" in r["different"], r
        assert r["different_but_independent"] == "ok", r
        assert r["same_but_summed"].startswith("ok | warning: Every rank holds the same parameters"), r
        assert r["same"] == "ok", r


@pytest.mark.timeout(120)
def test_zero_redundancy_optimizer_with_mechanic_inside():
    """torch's ZeroRedundancyOptimizer gives each rank's mechanized optimizer a different subset of the
    parameters (here a different number of them): without process_group= every rank raises at the first
    step the message that names it (not "Ranks disagree ... num_params"), and nothing moves; with
    process_group=WORLD, one all-reduce per step and the single-process trajectory (float64, 1e-10)."""
    results = harness.run(2, scenarios.zero_redundancy, timeout=90)
    assert results[0]["held"] != results[1]["held"], [r["held"] for r in results]
    for rank, r in enumerate(results):
        msg = r["without"]
        assert "hold different parameters" in msg and "process_group=" in msg and "ZeroRedundancyOptimizer" in msg, \
            (rank, msg)
        assert "disagree" not in msg, (rank, msg)
        assert not r["moved"], rank
        assert r["allreduces"] == [1] * len(r["allreduces"]), (rank, r["allreduces"])
        for a, b in zip(r["scales"], r["ref_scales"]):
            assert abs(a - b) <= 1e-10 * abs(b), (rank, r["scales"], r["ref_scales"])
        for p, q in zip(r["params"], r["ref_params"]):
            assert scenarios.rel(p, q) <= 1e-10, rank
        assert r["scales"][-1] > 10 * r["scales"][0]
    assert results[0]["scales"] == results[1]["scales"]
