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
    # header, AdamW's 9-point grid (its best, 0.03, is inside it: no point added past an edge), two forms x 5 lrs,
    # 4 peers, 4 knobs, 2 per-group groupings
    assert len(rows) == 1 + 9 + 5 + 5 + 4 + 4 + 2


def test_step_overhead_quick(tmp_path):
    out = _run(["benchmarks/step_overhead.py", "--quick"], tmp_path)
    assert "manic(adamw_fused)" in out and (tmp_path / "step_overhead_quick.csv").exists()


@pytest.mark.timeout(300)
def test_collectives_quick(tmp_path):
    out = _run(["benchmarks/collectives.py", "--quick"], tmp_path)
    assert "| fsdp2 | 2 | 1 | 32 |" in out and "| ddp | 2 | 0 | 0 |" in out  # four float64 sums


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
        "run_all.py", "report.py", "run_length_report.py", "gpu_check.py",
        "suite_tasks.py", "suite_report.py", "candidates.py"}  # (the suite's modules: suite.py runs them)
    assert set(run_all.SCRIPTS) == scripts


def test_run_length_extends_adamw_past_an_edge(tmp_path):
    """run_length.py adds AdamW one grid point past a best that sits on the grid's edge (all seeds of that
    task and length), and nothing once the best is inside."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_length

    assert [run_length._neighbour(v, True) for v in (0.3, 1.0, 3.0)] == [1.0, 3.0, 10.0]
    assert [run_length._neighbour(v, False) for v in (1e-4, 3e-5)] == [3e-5, 1e-5]
    path = tmp_path / "run_length.csv"

    def write(losses: dict[float, float]) -> None:
        with open(path, "w") as f:
            f.write(",".join(run_length.FIELDS) + "\n")
            for lr, loss in losses.items():
                f.write(f"digits,100,adamw,{lr},0,{loss},0.9,0.1,2.3,nan,nan,\n")

    grid = {lr: 1.0 for lr in run_length.ADAMW_LRS}
    write({**grid, 1.0: 0.5})  # best at the top edge
    assert run_length.past_edges(["digits"], [100], 2, path) == [("digits", 100, "adamw", 3.0, 0),
                                                                 ("digits", 100, "adamw", 3.0, 1)]
    write({**grid, 1.0: 0.5, 3.0: 0.6})  # past it, worse: done
    assert run_length.past_edges(["digits"], [100], 2, path) == []
    write({**grid, 1e-4: 0.5})  # best at the bottom edge
    assert run_length.past_edges(["digits"], [100], 1, path) == [("digits", 100, "adamw", 3e-5, 0)]
