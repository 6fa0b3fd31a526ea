"""benchmarks/suite.py --quick runs end to end: every method, the AdamW sweep, the oracle, the report."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ~30 s on a lightly loaded 2-core machine, 135 s at load 12; the limit (as the other benchmark smoke tests) is a hang guard
@pytest.mark.timeout(300)
def test_suite_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "benchmarks/suite.py", "--quick", "--jobs", "1", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=290)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "suite_quick.csv") as f:
        rows = list(csv.DictReader(f))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import suite

    assert {r["method"] for r in rows} == set(suite.methods())
    for task in suite.QUICK_TASKS:
        sweep = sorted(float(r["lr"]) for r in rows if r["task"] == task and r["method"] == "adamw")
        best = min((r for r in rows if r["task"] == task and r["method"] == "adamw"), key=lambda r: float(r["val_loss"]))
        # the best AdamW lr is bracketed (a worse lr on both sides) unless it is at the grid's end
        assert float(best["lr"]) in (suite.ADAMW_GRID[0], suite.ADAMW_GRID[-1]) or \
            sweep[0] < float(best["lr"]) < sweep[-1]
    manic_rows = [r for r in rows if r["method"] == "manic"]
    assert all(len(r["oracle_trace"].split()) == len(suite.ORACLE_AT) for r in manic_rows)
    assert all(len(r["eff_lr_trace"].split()) >= 10 for r in rows)
    # the default form is invariant to the base lr: the same run at base lr 1e-2 and 1e-3
    lr3 = {r["task"]: float(r["val_loss"]) for r in rows if r["method"] == "manic_lr1e-3"}
    for r in manic_rows:
        assert float(r["val_loss"]) == pytest.approx(lr3[r["task"]], rel=1e-3)
    for name in ("suite_dev_quick.md", "suite_test_quick.md", "suite_quick.png"):
        assert (tmp_path / name).exists()
    assert "| manic |" in (tmp_path / "suite_test_quick.md").read_text()
