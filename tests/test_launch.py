"""The launcher under real torchrun (2 CPU processes, gloo): end to end, kill -9 and resume,
SIGTERM, resharded resume, --help, plot.py."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--s-init", "1e-4", "--log-every", "5", "--eval-every", "20", "--eval-batches", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(ROOT / "launch" / "train.py"), *TINY, *args]


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def same_final(a: Path, b: Path) -> None:
    fa, fb = final(a), final(b)
    assert fa["scale"] == fb["scale"]
    assert fa["model"].keys() == fb["model"].keys()
    assert all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"])


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_help_without_distributed():
    done = run([sys.executable, "launch/train.py", "--help"], timeout=60)
    assert done.returncode == 0 and "--parallel" in done.stdout and "--resume" in done.stdout


@pytest.mark.timeout(600)
def test_end_to_end_kill_and_resume(tmp_path):
    """Uninterrupted run; a run whose worker is killed with -9 after a checkpoint; --resume of
    it: the final parameters and scale equal the uninterrupted run's bitwise."""
    steps = ["--steps", "200", "--ckpt-every", "40"]
    full = tmp_path / "full"
    done = run(torchrun(2, *steps, "--out-dir", str(full)))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = rows(full)
    assert (full / "metrics.png").stat().st_size > 0 and (full / "checkpoints" / "step_00000040" / "COMPLETE").exists()
    assert float(metrics[-1]["train_loss"]) < 0.8 * float(metrics[0]["train_loss"])  # it learns
    assert float(metrics[-1]["scale"]) > 1e-3 and metrics[-1]["val_loss"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(2, *steps, "--out-dir", str(killed)), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (killed / "checkpoints" / "step_00000040" / "COMPLETE").exists())
        os.kill(int((killed / "pids" / "rank1.pid").read_text()), signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert rc != 0  # torchrun reports the dead worker
    assert not (killed / "final.pt").exists()
    resumed = run(torchrun(2, *steps, "--out-dir", str(killed), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_final(full, killed)

    # resuming the step-40 checkpoint on one process (DCP reshards 2 -> 1) works too
    one = tmp_path / "one"
    shutil.copytree(full / "checkpoints" / "step_00000040", one / "checkpoints" / "step_00000040")
    done = run([sys.executable, str(ROOT / "launch" / "train.py"), *TINY, *steps, "--out-dir", str(one), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert abs(float(rows(one)[-1]["val_loss"]) - float(metrics[-1]["val_loss"])) < 0.5


@pytest.mark.timeout(300)
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun(2, "--steps", "100000", "--ckpt-every", "0", "--out-dir", str(out)), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out / "metrics.csv").exists() and len(rows(out)) >= 4)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # Every worker saved one checkpoint together and exited 0; torchrun itself reports the
    # signal it received (its SignalException), so its own exit code is not 0.
    assert "stopped by SIGTERM at step" in output
    assert "exitcode" not in output or "exitcode  : 0" in output
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").exists()
    step = int(ckpts[0].name.split("_")[1])
    assert step >= 20


def test_plot_regenerates_png(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("step,train_loss,val_loss,lr,scale,step_time\n5,3.0,,0.001,1e-5,0.1\n"
                                     "10,2.5,2.6,0.001,1e-3,0.1\n")
    done = run([sys.executable, "launch/plot.py", str(out)], timeout=120)
    assert done.returncode == 0 and (out / "metrics.png").stat().st_size > 0
