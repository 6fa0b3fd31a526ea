"""Run a framework's job script in a subprocess, as its users launch it, and read what each rank wrote:
shared by test_deepspeed.py (torchrun) and test_lightning.py (Lightning's own launcher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import run_session


def errors(out: Path) -> str:
    """The tracebacks the ranks wrote (rank<r>.err)."""
    return "".join(f"--- {p.name} ---\n{p.read_text()}\n" for p in sorted(out.glob("rank*.err")))


def run(cmd: list[str], out: Path, world: int, timeout: float, what: str) -> list[dict[str, Any]]:
    """Run ``cmd`` in ``out`` in a session of its own (on a timeout the launcher and every rank are killed
    together); return each rank's ``rank<r>.pt``, or fail with the ranks' tracebacks and the output's tail."""
    code, log, _ = run_session(cmd, out, timeout)
    if code is None:
        pytest.fail(f"{what} did not finish within {timeout}s (a hung collective?)\n"
                    f"{errors(out)}--- output (tail) ---\n{log[-4000:]}")
    failed = errors(out)
    if code != 0 or failed:
        pytest.fail(f"{what} failed (exit code {code})\n{failed}\n--- output (tail) ---\n{log[-4000:]}")
    missing = [r for r in range(world) if not (out / f"rank{r}.pt").exists()]
    assert not missing, f"{what}: ranks {missing} wrote no result\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
