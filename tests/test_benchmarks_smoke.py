"""Each benchmark script runs in its quickest mode, so none of them rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(300)
def test_memory_quick(tmp_path):
    out = _run(["benchmarks/memory.py", "--quick"], tmp_path)
    assert "| manic |" in out and (tmp_path / "memory_quick.md").exists()


@pytest.mark.timeout(300)
def test_lr_sweep_quick(tmp_path):
    out = _run(["benchmarks/lr_sweep.py", "--quick", "--tasks", "digits"], tmp_path)
    assert "manic_adamw" in out and (tmp_path / "lr_sweep_quick.csv").exists()


@pytest.mark.timeout(300)
def test_run_length_quick(tmp_path):
    out = _run(["benchmarks/run_length.py", "--quick", "--jobs", "1"], tmp_path)
    assert "manic (default: invariant)" in out and "Prodigy" in out
    rows = (tmp_path / "run_length_quick.csv").read_text().splitlines()
    # header, AdamW grid, two forms x 5 lrs, 4 peers, 4 knobs, 2 per-group groupings
    assert len(rows) == 1 + 7 + 5 + 5 + 4 + 4 + 2


def test_step_overhead_quick(tmp_path):
    out = _run(["benchmarks/step_overhead.py", "--quick"], tmp_path)
    assert "manic(adamw_fused)" in out and (tmp_path / "step_overhead_quick.csv").exists()


@pytest.mark.timeout(300)
def test_collectives_quick(tmp_path):
    out = _run(["benchmarks/collectives.py", "--quick"], tmp_path)
    assert "| fsdp2 | 2 | 1 | 16 |" in out and "| ddp | 2 | 0 | 0 |" in out


@pytest.mark.timeout(300)
def test_scaling_quick(tmp_path):
    out = _run(["benchmarks/scaling.py", "--quick"], tmp_path)
    assert "| fsdp2 | 2 |" in out and "failed" not in out


@pytest.mark.timeout(300)
def test_train_overhead_quick(tmp_path):
    out = _run(["benchmarks/train_overhead.py", "--quick"], tmp_path)
    assert "manic(adamw)" in out


@pytest.mark.timeout(300)
def test_launcher_demo_quick(tmp_path):
    out = _run(["benchmarks/launcher_demo.py", "--quick"], tmp_path)
    assert "wrote" in out and (tmp_path / "launcher_fsdp2_2ranks_quick_adamw.csv").exists()


def test_run_all_lists_every_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    # (gpu_check.py needs a GPU: tests/test_gpu_check.py tests what of it runs without one)
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")} - {
        "run_all.py", "report.py", "run_length_report.py", "gpu_check.py"}
    assert set(run_all.SCRIPTS) == scripts
