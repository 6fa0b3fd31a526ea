"""Behaviour unchanged: the golden trajectories of make_golden.py (every variant x state mode x per_group x
compile, precision, non-finite steps, resumes, layout changes, one process and 2-rank FSDP2) recomputed
in a fresh single-threaded process are bitwise the recorded ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MAKE = Path(__file__).resolve().parent / "make_golden.py"


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("part", ["single", "fsdp2"])
def test_golden_trajectories_are_bitwise_the_recorded_ones(part):
    # a fresh process: compiled kernels start from an empty cache, and one thread (a compiled reduction
    # splits its work by the thread count)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(MAKE), "--check", part], env=env, capture_output=True, text=True,
                          timeout=1400)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
