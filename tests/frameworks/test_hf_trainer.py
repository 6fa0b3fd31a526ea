"""``transformers.Trainer(optimizers=(mechanize(AdamW), LambdaLR))``: a run resumed with
``trainer.train(resume_from_checkpoint=...)`` from the mid-run checkpoint, in a new Trainer
(single process) or new processes (2-rank DDP under torchrun, gloo), ends bitwise where the
uninterrupted run ends: the scale after every resumed step, the final scale and the final
parameters. See hf_trainer_run.py for the runs.

What Trainer does with the optimizer (accelerate 1.16, transformers 5.24, CPU): it wraps it in
an ``AcceleratedOptimizer`` (whose device placement is a ``state_dict()`` /
``load_state_dict()`` round trip before the first step), steps it without a GradScaler (fp32),
zeroes gradients through ``model.zero_grad()``, steps the user's scheduler itself (not
wrapped), and saves/loads ``optimizer.state_dict()`` with torch.save/torch.load on resume.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import hf_trainer_run as H

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


def _check_resume(name: str, uninterrupted: dict, saving: dict, resumed: dict) -> None:
    # the comparison is not vacuous: Mechanic's step ran and the scale moved far from s_init
    for run in (uninterrupted, saving, resumed):
        assert run["seen"]["wraps_mechanized"], f"{name}: Trainer steps {run['seen']['optimizer']}, not ours"
    assert uninterrupted["seen"]["calls"]["step"] == H.STEPS
    assert resumed["seen"]["calls"]["step"] == H.STEPS - H.SAVE_AT
    assert uninterrupted["final_scale"] > 1e3 * H.S_INIT, (
        f"{name}: the scale only reached {uninterrupted['final_scale']}")
    assert len(uninterrupted["scales"]) == H.STEPS and len(resumed["scales"]) == H.STEPS - H.SAVE_AT
    # saving a checkpoint changes nothing
    assert saving["scales"] == uninterrupted["scales"] and all(
        torch.equal(v, saving["params"][k]) for k, v in uninterrupted["params"].items()), (
        f"{name}: the run that saved differs from the one that did not")
    # the resumed run continues bitwise
    assert resumed["final_scale"] == uninterrupted["final_scale"], (
        f"{name}: final scale {resumed['final_scale']!r} after resume vs {uninterrupted['final_scale']!r}")
    assert resumed["scales"] == uninterrupted["scales"][H.SAVE_AT:], (
        f"{name}: scales after resume {resumed['scales']} vs {uninterrupted['scales'][H.SAVE_AT:]}")
    differ = [k for k, v in uninterrupted["params"].items() if not torch.equal(v, resumed["params"][k])]
    assert not differ, f"{name}: parameters differ after resume: {differ}"


@pytest.mark.timeout(120)
def test_single_process_resume_is_bitwise(tmp_path):
    uninterrupted = H.run(str(tmp_path / "uninterrupted"))
    saving = H.run(str(tmp_path / "saving"), save_steps=H.SAVE_AT)
    assert os.path.isfile(tmp_path / "saving" / f"checkpoint-{H.SAVE_AT}" / "optimizer.pt")
    resumed = H.run(str(tmp_path / "resumed"), save_steps=H.SAVE_AT,
                    resume=str(tmp_path / "saving" / f"checkpoint-{H.SAVE_AT}"))
    _check_resume("single process", uninterrupted, saving, resumed)


def _torchrun(out_dir: str, phase: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           H.__file__, out_dir, phase]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, (
        f"torchrun {phase} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


@pytest.mark.timeout(330)
def test_ddp_two_ranks_resume_is_bitwise(tmp_path):
    out = str(tmp_path)
    _torchrun(out, "first")  # the uninterrupted run, then the one that saves checkpoint-SAVE_AT
    assert os.path.isfile(tmp_path / "saving" / f"checkpoint-{H.SAVE_AT}" / "optimizer.pt")
    _torchrun(out, "resume")  # new processes
    runs = {tag: [torch.load(tmp_path / f"{tag}_rank{r}.pt", weights_only=False) for r in range(2)]
            for tag in ("uninterrupted", "saving", "resumed")}
    for tag, ranks in runs.items():
        assert ranks[0]["seen"]["world"] == 2
        assert ranks[0]["scales"] == ranks[1]["scales"], f"DDP {tag}: the scale differs across ranks"
    for r in range(2):
        _check_resume(f"DDP rank {r}", runs["uninterrupted"][r], runs["saving"][r], runs["resumed"][r])
