"""manic under DeepSpeed ZeRO on 2 CPU ranks (gloo), through DeepSpeed's own engine.

One ``torchrun --nproc-per-node 2`` launch of ``deepspeed_job.py`` (see its docstring) trains a
float32 MLP under several configurations with ``manic.mechanize(AdamW, process_group=WORLD)`` as
the client optimizer; each rank writes its results to a file, which the tests below read.

DeepSpeed is not optional here: it is in the test extra, and a missing install fails collection
(no silent skip in CI).

Measured (deepspeed 0.19.8, torch 2.13 CPU): after 30 steps the scale is 2.090e-3 (from
``s_init=1e-6``); ZeRO-1/2 differ from ZeRO-0 by at most 4.4e-7 relative, ZeRO-3 by 3.7e-7; each
rank's partition is 226 (ZeRO-1/2) or 225 (ZeRO-3) of the 450 float32 parameters, 904 or 900
bytes, and Mechanic's state 1808 or 1800 bytes. fp16 is refused on CPU ("Type fp16 is not
supported on your device."); bf16 runs. With several parts (ZeRO-1/2/3 with two param groups:
DeepSpeed steps the client optimizer once per group; ZeRO-3 with sub_group_size 100 below a
rank's share: once per sub-group) Mechanic's one step spans every part (src/manic/partitions.py):
the scale matches ZeRO-0's with the same groups within 2.5e-7 relative, one all-reduce per step,
and a ZeRO-3 checkpoint over three parts resumes bitwise; skip_nonfinite=True is refused there
(DeepSpeed's parts before the last have stepped when the global sums are known). A universal
checkpoint (ds_to_universal, then load_universal) restores the model and AdamW but not Mechanic,
which starts over.

HF Trainer (transformers 5.24.0, accelerate 1.16.0) with ``TrainingArguments(deepspeed=<ZeRO-2
dict>)``: ``optimizers=`` is dropped without a word (transformers' ``deepspeed_init`` sets
``trainer.optimizer = None`` and calls ``create_optimizer()``), and the engine steps a torch AdamW
of Trainer's own. Overriding ``create_optimizer`` to mechanize Trainer's own AdamW (its two groups,
decay and no decay; examples/deepspeed_hf_trainer.py) works, and ``resume_from_checkpoint``
continues bitwise.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import jobs
import manic

# not a skip: without deepspeed this module fails to collect
DEEPSPEED_VERSION = importlib.metadata.version("deepspeed")

JOB = Path(__file__).with_name("deepspeed_job.py")
WORLD = 2
STEPS, CKPT_N, POISON, MODE_STEPS = 30, 10, 5, 10   # as in deepspeed_job.py
HF_STEPS, HF_SAVE_AT, HF_IGNORED_STEPS, HF_LOG_EVERY = 40, 20, 2, 5   # its HF Trainer runs
S_INIT = 1e-6
FRESH_SCALE = manic.Options().num_betas * S_INIT  # what the scale reads before the tuner's first step
MODEL_NUMEL = 8 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2   # the float32 MLP there: 450
REL_TOL = 1e-5      # ZeRO-1/2/3 vs ZeRO-0: measured at most 4.4e-7 (float32 round-off of the partial sums)
# the first DeepSpeed process on a machine JIT-builds DeepSpeed's shared-memory op (1-3 min on 2 busy cores)
LAUNCH_TIMEOUT = 420

@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> list[dict[str, Any]]:
    """Each rank's results of the one torchrun launch (one per pytest session: under
    ``pytest -n`` the xdist workers share it through a lock in their common base temp dir)."""
    if worker_id == "master":
        return _launch(tmp_path_factory.mktemp("deepspeed"))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent
    with FileLock(str(root / "deepspeed_job.lock")):
        out = root / "deepspeed_job"
        if not (out / "done").exists():
            if out.exists():
                shutil.rmtree(out)
            out.mkdir()
            _launch(out)
            (out / "done").touch()
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _launch(out: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(JOB), str(out)]
    return jobs.run(cmd, out, WORLD, LAUNCH_TIMEOUT, "the DeepSpeed job")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def _ran(run: dict[str, Any], name: str) -> dict[str, Any]:
    assert run.get("ok", True), f"{name} raised {run['error_type']}: {run['error']}\n{run['traceback']}"
    return run


def _extra_ops(run: dict[str, Any], plain: dict[str, Any]) -> list[list[str]]:
    """The c10d ops of each step of ``run``'s ``engine.step()`` that a plain-AdamW engine's lacks."""
    out = []
    for ops in run["ops"][1:len(plain["ops"])]:
        base = list(plain["ops"][1])
        extra = []
        for op in ops:
            if op in base:
                base.remove(op)
            else:
                extra.append(op)
        assert not base, f"ops of the plain engine missing from the Mechanic one: {base}"
        out.append(extra)
    return out


pytestmark = pytest.mark.timeout(LAUNCH_TIMEOUT + 30)


def test_launch(runs):
    assert [r["world"] for r in runs] == [WORLD] * WORLD
    assert runs[0]["deepspeed"] == DEEPSPEED_VERSION


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_trajectory_matches_zero0(runs, name):
    """The scale after every step is ZeRO-0's to float32 round-off, grows > 100x, and is bitwise
    the same on every rank."""
    for rank, r in enumerate(runs):
        ref, run = r["zero0"], _ran(r[name], name)
        assert ref["reducer"] == "NoReduce()" and run["reducer"] == f"ProcessGroupReducer(size={WORLD})"
        assert len(run["scales"]) == STEPS and run["tuner_steps"][-1] == STEPS
        rel = _rel(run["scales"], ref["scales"])
        assert rel <= REL_TOL, f"{name} rank {rank}: max rel diff vs ZeRO-0 {rel:.3g}"
        assert run["scales"][-1] > 100 * S_INIT, (name, rank, run["scales"][-1].item())
        assert ref["scales"][-1] > 100 * S_INIT
        # the model DeepSpeed trained ends where ZeRO-0's does (to round-off)
        for p, q in zip(run["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    for rank, r in enumerate(runs[1:], 1):
        assert torch.equal(r[name]["scales"], runs[0][name]["scales"]), f"{name}: rank {rank}'s scales differ"


@pytest.mark.parametrize("name,plain", [("zero1", "adamw1"), ("zero2", "adamw2"), ("zero3", "adamw3"),
                                        ("bf16", "adamw_bf16"), ("zero2_groups", "adamw2_groups"),
                                        ("zero3_subgroups_groups", "adamw3_subgroups_groups")])
def test_one_mechanic_collective_per_step(runs, name, plain):
    """After the first step, ``engine.step()`` dispatches exactly one c10d op more than with a plain
    AdamW (an all-reduce), and Mechanic's reducer is called exactly once per step."""
    for rank, r in enumerate(runs):
        run, base = _ran(r[name], name), _ran(r[plain], plain)
        extra = _extra_ops(run, base)
        assert extra == [["allreduce_.default"]] * len(extra), (name, rank, extra)
        calls = run["mech_calls"]   # counted from the second step on
        skipped = sum(run["overflow"][1:])
        assert calls[-1] == len(calls) - 1 - skipped, (name, rank, calls)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "bf16"])
def test_mechanic_on_flat_fp32_partitions(runs, name):
    """Mechanic is bound to the flat fp32 partitions DeepSpeed's ZeRO optimizer holds, and its
    state per rank is twice the local partition's bytes."""
    sizes = []
    for rank, r in enumerate(runs):
        run = _ran(r[name], name)
        assert run["ds_optimizer"].startswith("DeepSpeedZeroOptimizer"), run["ds_optimizer"]
        assert run["params_are_ds_partitions"], (name, rank)
        assert len(run["param_shapes"]) == 1 and len(run["param_shapes"][0]) == 1, run["param_shapes"]
        assert run["param_dtypes"] == ["torch.float32"]
        assert run["mechanic_keys"] == ["mechanic_delta", "mechanic_ref"] and run["mechanic_on_partitions"]
        assert run["mechanic_dtypes"] == ["torch.float32"]
        assert run["mechanic_bytes"] == 2 * run["partition_bytes"], (name, rank, run["mechanic_bytes"],
                                                                      run["partition_bytes"])
        assert run["model_numel"] == MODEL_NUMEL
        sizes.append(run["param_shapes"][0][0])
    # the partitions split the model (ZeRO-1/2 pad the flat buffer to a multiple of the world size)
    assert MODEL_NUMEL <= sum(sizes) < MODEL_NUMEL + 2 * WORLD, (name, sizes)
    # ZeRO-0 is the whole model on every rank
    assert runs[0]["zero0"]["partition_bytes"] == 4 * MODEL_NUMEL


def test_bf16_master_weights_and_skipped_step(runs):
    """bf16 ZeRO-2: the model is bf16, Mechanic's buffers are on the fp32 partitions; the step whose
    gradients DeepSpeed finds non-finite is skipped before it reaches Mechanic."""
    for rank, r in enumerate(runs):
        run = _ran(r["bf16"], "bf16")
        assert run["model_dtypes"] == ["torch.bfloat16"] and run["mechanic_dtypes"] == ["torch.float32"]
        _check_skipped(run, "bf16", rank)
        assert run["scales"][-1] > 100 * S_INIT
    for rank, r in enumerate(runs[1:], 1):
        assert torch.equal(r["bf16"]["scales"], runs[0]["bf16"]["scales"]), f"bf16: rank {rank} differs"


def test_bf16_several_parts(runs):
    """bf16 ZeRO-2 with two param groups alike (two parts): the model's bf16 weights of the first part are
    made again from its rebased fp32 partition, so the run is the one-group bf16 run (the skipped step
    included)."""
    for rank, r in enumerate(runs):
        run, ref = _ran(r["bf16_groups_alike"], "bf16_groups_alike"), r["bf16"]
        assert len(run["param_shapes"]) == 2 and run["model_dtypes"] == ["torch.bfloat16"]
        _check_skipped(run, "bf16_groups_alike", rank)
        rel = _rel(run["scales"], ref["scales"])
        assert rel <= REL_TOL, f"bf16 two parts rank {rank}: max rel diff vs one part {rel:.3g}"
        for p, q in zip(run["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=2e-2, atol=1e-3)


def test_fp32_skipped_step_is_a_no_op(runs):
    """ZeRO-2 fp32 also skips a non-finite step; the tuner is untouched and the run goes on as if
    the step had not happened (bitwise the unpoisoned run, one step later)."""
    for rank, r in enumerate(runs):
        run = r["skip2"]
        _check_skipped(run, "skip2", rank)
        assert torch.equal(run["scales"][:POISON], r["zero2"]["scales"][:POISON])
        assert torch.equal(run["scales"][POISON + 1:], r["zero2"]["scales"][POISON:len(run["scales"]) - 1])


def _check_skipped(run: dict[str, Any], name: str, rank: int) -> None:
    assert run["overflow"] == [t == POISON for t in range(len(run["overflow"]))], (name, rank, run["overflow"])
    assert run["ds_skipped_steps"] == 1, (name, rank)
    steps, scales, calls = run["tuner_steps"], run["scales"], run["mech_calls"]
    assert steps[POISON] == steps[POISON - 1] == POISON, (name, rank, steps)
    assert steps[-1] == len(steps) - 1
    assert scales[POISON] == scales[POISON - 1], (name, rank)
    assert calls[POISON] == calls[POISON - 1], (name, rank, calls)
    assert run["skipped_by_tuner"] == 0     # DeepSpeed skipped it; Mechanic never saw it


def test_fp16(runs):
    """fp16 with dynamic loss scaling: DeepSpeed 0.19.8 refuses it on CPU ("Type fp16 is not
    supported on your device."). Where it runs, an overflow-skipped step must not reach Mechanic."""
    for rank, r in enumerate(runs):
        run = r["fp16"]
        if run["ok"]:
            _check_skipped(run, "fp16", rank)
        else:
            print(f"rank {rank}: fp16 refused: {run['error_type']}: {run['error']}")


# several parts: (run, its ZeRO-0 reference with the same param groups, parts per rank)
PARTS = [("zero1_groups", "zero0_groups", 2), ("zero2_groups", "zero0_groups", 2), ("zero3_groups", "zero0_groups", 2),
         ("zero2_groups_alike", "zero0", 2), ("zero3_subgroups", "zero0", 2),
         ("zero3_subgroups_groups", "zero0_groups", 3)]


@pytest.mark.parametrize("name,ref,parts", PARTS)
def test_several_parts_match_zero0(runs, name, ref, parts):
    """ZeRO-1/2 step the client optimizer once per param group, showing it that group alone; ZeRO-3
    once per sub-group (sub_group_size 100, below a rank's 225 elements). Mechanic's one step spans
    every part: it works on all of DeepSpeed's fp32 partitions (by identity), calls its reducer once per
    step, and the scale after every step is ZeRO-0's (same groups; two groups alike, or one group split
    into sub-groups: the one-group run's) to float32 round-off, bitwise the same on every rank; the
    model ends where ZeRO-0's does."""
    sizes = []
    for rank, r in enumerate(runs):
        run, base = _ran(r[name], name), r[ref]
        assert run["params_are_ds_partitions"] and len(run["param_shapes"]) == parts, (name, run["param_shapes"])
        assert run["reducer"] == f"ProcessGroupReducer(size={WORLD})" and run["mechanic_on_partitions"]
        assert run["mechanic_bytes"] == 2 * run["partition_bytes"], name
        assert len(run["scales"]) == STEPS and run["tuner_steps"][-1] == STEPS
        rel = _rel(run["scales"], base["scales"])
        assert rel <= REL_TOL, f"{name} rank {rank}: max rel diff vs {ref} {rel:.3g}"
        assert run["scales"][-1] > 100 * S_INIT, (name, rank, run["scales"][-1].item())
        for p, q in zip(run["params"], base["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        calls = run["mech_calls"]  # counted from the second step on
        assert calls[-1] == len(calls) - 1, (name, rank, calls)
        sizes.append(sum(shape[0] for shape in run["param_shapes"]))
    assert MODEL_NUMEL <= sum(sizes) < MODEL_NUMEL + 2 * WORLD * parts, (name, sizes)
    for rank, r in enumerate(runs[1:], 1):
        assert torch.equal(r[name]["scales"], runs[0][name]["scales"]), f"{name}: rank {rank}'s scales differ"


@pytest.mark.parametrize("mode", ["ref", "delta", "per_group"])
@pytest.mark.parametrize("name", ["zero2_groups", "zero3_subgroups_groups"])
def test_several_parts_in_each_state_mode_and_per_group(runs, name, mode):
    """The state modes that keep a transient from before the base step (state="ref": x_t - x_ref,
    state="delta": a copy of x_t), kept per part until the last one rebases them all, and one tuner per
    param group (ZeRO-3's sub-groups go to their group's tuner): ZeRO-0's scales to round-off."""
    for rank, r in enumerate(runs):
        run, base = _ran(r[f"{name}_{mode}"], f"{name}_{mode}"), r[f"zero0_groups_{mode}"]
        assert run["scales"].shape == base["scales"].shape == ((MODE_STEPS, 2) if mode == "per_group" else (MODE_STEPS,))
        rel = _rel(run["scales"], base["scales"])
        assert rel <= REL_TOL, f"{name} {mode} rank {rank}: max rel diff vs ZeRO-0 {rel:.3g}"
        assert (run["scales"][-1] > 10 * S_INIT).all(), (name, mode, run["scales"][-1])
        keys = {"ref": ["mechanic_ref"], "delta": ["mechanic_delta"]}.get(mode, ["mechanic_delta", "mechanic_ref"])
        assert run["mechanic_keys"] == keys, (name, mode, run["mechanic_keys"])


def test_several_parts_refuse_skip_nonfinite(runs):
    """skip_nonfinite=True cannot be exact over several parts: when the global sums are not finite the
    one-group step skips the base step, but DeepSpeed has stepped the parts before the last by then.
    Refused at the first step, before any part steps, naming the cause and the fix."""
    for rank, r in enumerate(runs):
        run = r["skip_nonfinite_groups"]
        assert not run["ok"] and run["error_type"] == "ValueError", (rank, run)
        for words in ("once per param group", "skip_nonfinite=False", "one param group"):
            assert words in run["error"], (words, run["error"])


def test_several_parts_with_offload_are_refused(runs):
    """Optimizer offload with several parts (ZeRO-2, offload_optimizer to the CPU, with DeepSpeed's own
    refusal of a client optimizer under offload turned off): not supported, refused at the first step."""
    for rank, r in enumerate(runs):
        run = r["offload_groups"]
        assert not run["ok"] and run["error_type"] == "NotImplementedError", (rank, run)
        assert "offload_optimizer" in run["error"] and "one param group" in run["error"], run["error"]


@pytest.mark.parametrize("name", ["wrong", "wrong_groups"])
def test_wrong_setup_fails_at_first_step(runs, name):
    """ZeRO-2 without process_group (with one param group, and with two): every rank raises at the first
    step, naming the fix."""
    for rank, r in enumerate(runs):
        w = r[name]
        assert w["raised"] == "ValueError", (rank, w)
        assert "process_group=torch.distributed.group.WORLD" in w["error"], w["error"]
        assert w["stats_step"] == 0


@pytest.mark.parametrize("name,parts", [("ckpt", 1), ("ckpt3", 3)])
def test_checkpoint_round_trip(runs, name, parts):
    """``engine.save_checkpoint`` at step N, a fresh engine's ``engine.load_checkpoint``, N more
    steps: bitwise the uninterrupted run (scale after every step, parameters, partitions). ZeRO-2 with
    one group; ZeRO-3 with two groups and sub_group_size 100 (three parts per rank)."""
    for rank, r in enumerate(runs):
        c = _ran(r[name], name)
        A, B, C = c["A"], c["B"], c["C"]
        assert torch.equal(B["scales"], A["scales"][:CKPT_N]), rank
        assert torch.equal(C["scales"], A["scales"][CKPT_N:]), (rank, C["scales"], A["scales"][CKPT_N:])
        assert torch.equal(C["scale"], A["scale"]) and C["stats_step"] == A["stats_step"] == 2 * CKPT_N
        assert all(torch.equal(p, q) for p, q in zip(C["params"], A["params"])), rank
        assert all(torch.equal(p, q) for p, q in zip(C["partitions"], A["partitions"])), rank
        assert A["scale"] > 10 * S_INIT and A["parts"] == C["parts"] == parts, (A["parts"], C["parts"])
        # Mechanic's buffers and tuner state travel in each rank's ZeRO optimizer-state file
        assert f"half/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in c["files"], c["files"]
        keys = set(c["optim_file_mechanic_keys"])
        assert {"mechanic_delta", "mechanic_ref", "mechanic_s"} <= keys, sorted(keys)


def test_universal_checkpoint_keeps_the_model_and_adamw_but_not_mechanic(runs):
    """DeepSpeed's universal checkpoint (its route to another world size) converts only the fp32
    weights and AdamW's exp_avg, exp_avg_sq and step. Loading it restores the model and AdamW;
    Mechanic's buffers and tuner are gone, so Mechanic starts over from the loaded weights (tuner
    step 0, the scale back to num_betas * s_init), without an error. Recorded for the docs."""
    for rank, r in enumerate(runs):
        u = _ran(r["universal"], "universal")
        assert u["loaded"] and u["converted_keys"] == ["exp_avg", "exp_avg_sq", "fp32", "step"], u
        assert all(torch.equal(p, q) for p, q in zip(u["params"], r["ckpt"]["B"]["params"])), rank
        assert u["state_keys"] == ["exp_avg", "exp_avg_sq", "step"], u["state_keys"]
        assert u["tuner_step"] == 0 and u["scale"] == pytest.approx(FRESH_SCALE), (rank, u)


# ----------------------------------------------------------------------------- HF Trainer
def test_hf_trainer_ignores_optimizers_under_deepspeed(runs):
    """``Trainer(optimizers=(mechanize(AdamW), sched), args=TrainingArguments(deepspeed=...))``
    trains without a word, but not with the optimizer it was given: transformers' ``deepspeed_init``
    sets ``trainer.optimizer = None`` and calls ``create_optimizer()``, so the engine steps a torch
    AdamW of Trainer's own, with Trainer's own scheduler; the passed optimizer never steps."""
    for rank, r in enumerate(runs):
        run = r["hf"]["ignored"]
        assert run["ok"] and run["deepspeed_enabled"] and run["world"] == WORLD, (rank, run)
        assert run["seen"]["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "AdamW"], run["seen"]
        assert run["passed_steps"] == 0 and run["passed_scale"] == pytest.approx(FRESH_SCALE), (rank, run)
        assert not run["scheduler_is_passed"]


def test_hf_trainer_mechanic_callback_names_the_fix(runs):
    """The same Trainer with ``MechanicCallback``: training stops at its start, saying what to do."""
    for rank, r in enumerate(runs):
        run = r["hf"]["refused"]
        assert not run["ok"] and run["error_type"] == "TypeError", (rank, run)
        assert "no Mechanic optimizer" in run["error"], run["error"]
        assert "Trainer ignores optimizers=" in run["error"] and "override create_optimizer" in run["error"]
        assert run["passed_steps"] == 0


def test_hf_trainer_create_optimizer_route(runs):
    """examples/deepspeed_hf_trainer.py's ``MechanicTrainer`` (``create_optimizer`` mechanizes the AdamW
    of Trainer's own ``create_optimizer``, with ``process_group=WORLD``) through Trainer's own ``train()``:
    Mechanic works on both of its param groups' ZeRO-2 partitions (decay, no decay) and reduces over both
    ranks, the scale grows > 100x from s_init and is
    bitwise the same on both ranks, and ``MechanicCallback``'s log lines (rank 0) hold the true scale
    and the scale times the lr of Trainer's own schedule (which reaches Mechanic's param groups)."""
    for rank, r in enumerate(runs):
        run = r["hf"]["saving"]
        assert run["ok"], (rank, run)
        assert run["seen"]["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "Mechanized"]
        assert run["params_are_ds_partitions"] == [True, True]
        assert run["group_weight_decay"] == [0.01, 0.0], run["group_weight_decay"]
        assert run["reducer"] == f"ProcessGroupReducer(size={WORLD})"
        assert len(run["scales"]) == HF_STEPS
        # the first step runs at the warmup's lr 0, which leaves the tuner fresh (docs/behaviour.md)
        assert run["tuner_step"] == HF_STEPS - 1
        assert run["final_scale"] > 100 * S_INIT, (rank, run["final_scale"])
        logs = [h for h in run["log_history"] if "loss" in h]
        assert [h["step"] for h in logs] == list(range(HF_LOG_EVERY, HF_STEPS + 1, HF_LOG_EVERY))
        if rank > 0:  # only the main process reads and logs them
            assert not any(k.startswith("mechanic/") for h in run["log_history"] for k in h)
            continue
        for h in logs:
            at = run["at"][h["step"]]
            assert h["mechanic/scale"] == at["scale"], (h, at)
            assert h["mechanic/effective_lr"] == pytest.approx(at["scale"] * at["lrs"][0], rel=1e-6), (h, at)
            assert h["mechanic/effective_lr"] == pytest.approx(h["mechanic/scale"] * h["learning_rate"], rel=1e-6)
        assert len({h["learning_rate"] for h in logs}) == len(logs)  # the cosine schedule moved at every log
    assert runs[1]["hf"]["saving"]["scales"] == runs[0]["hf"]["saving"]["scales"], "the ranks' scales differ"


def test_hf_trainer_resume_from_checkpoint(runs):
    """Trainer saves checkpoint-HF_SAVE_AT through DeepSpeed (Mechanic's state in each rank's ZeRO
    file); a new Trainer's ``train(resume_from_checkpoint=...)`` continues that run bitwise."""
    for rank, r in enumerate(runs):
        hf = r["hf"]
        saving, resumed = hf["saving"], hf["resumed"]
        assert f"global_step{HF_SAVE_AT}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in hf["checkpoint_files"]
        assert resumed["ok"], (rank, resumed)
        assert resumed["scales"] == saving["scales"][HF_SAVE_AT:], (rank, resumed["scales"], saving["scales"])
        assert resumed["final_scale"] == saving["final_scale"] and resumed["tuner_step"] == saving["tuner_step"]
        assert all(torch.equal(p, q) for p, q in zip(resumed["params"], saving["params"])), rank
        assert all(torch.equal(p, q) for p, q in zip(resumed["partitions"], saving["partitions"])), rank
        assert saving["scales"][HF_SAVE_AT - 1] > 10 * S_INIT  # the checkpoint holds a scale far from s_init
    assert runs[1]["hf"]["resumed"]["scales"] == runs[0]["hf"]["resumed"]["scales"]
