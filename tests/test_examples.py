"""Every file in examples/ (included verbatim in README and docs) runs as users run it.

Each example runs in a subprocess from the repository root, with ``python examples/x.py`` or
``torchrun --standalone --nproc-per-node N examples/x.py``, and must exit 0 with its documented
final line on stdout: ``... scale <S>`` with the scale grown above ``s_init`` (1e-6) by at least
the factor given here. An example added to examples/ without an entry here fails
``test_every_example_is_tested``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_session

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# file: (processes, 0 = plain python; what the final line starts with; the least final scale; timeout s)
CASES = {
    "quickstart.py": (0, "loss ", 1.0, 90),
    "per_group.py": (0, "loss ", 0.1, 90),
    "seed_api.py": (0, "resumed run is bitwise identical, ", 1.0, 90),
    "ddp.py": (2, "", 1.0, 120),
    "fsdp2.py": (2, "resumed from DCP, ", 1e-4, 150),
    "hsdp.py": (4, "", 1e-4, 180),
    "fsdp1.py": (2, "", 1e-4, 120),
    "hf_trainer.py": (0, "", 1e-2, 150),
    "deepspeed_hf_trainer.py": (2, "", 1e-2, 420),  # (DeepSpeed may JIT-build its shm op first)
    "lightning_trainer.py": (0, "", 1e-2, 150),
    "observe_hf_trainer.py": (0, "step ", 1e-2, 150),
    "observe_lightning.py": (0, "step ", 1e-2, 150),
    "observe_loop.py": (0, "step ", 1e-2, 90),
}

def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything it started: torchrun puts each rank in a session of its own,
    so killing torchrun's process group would leave the ranks running (and holding our pipes)."""
    for p in [*_descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_example(name: str, nproc: int, timeout: float) -> subprocess.CompletedProcess:
    script = os.path.join("examples", name)
    cmd = ([sys.executable, script] if nproc == 0 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), script])
    code, out, err = run_session(cmd, ROOT, timeout, merge=False, kill=_kill_tree)
    if code is None:
        pytest.fail(f"{' '.join(cmd[1:])} did not finish within {timeout}s\n--- stdout ---\n{out[-2000:]}\n"
                    f"--- stderr (tail) ---\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, code, out, err)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.timeout(c[3] + 15)) for n, c in CASES.items()])
def test_example_runs(name):
    nproc, prefix, min_scale, timeout = CASES[name]
    proc = run_example(name, nproc, timeout)
    where = f"{' '.join(proc.args[1:])} (exit code {proc.returncode})"
    assert proc.returncode == 0, f"{where}\n--- stdout ---\n{proc.stdout[-2000:]}\n--- stderr (tail) ---\n" \
                                 f"{proc.stderr[-6000:]}"
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    match = re.fullmatch(re.escape(prefix) + r".*\bscale (\S+)", last)
    assert match, f"{where}: the final line is {last!r}, expected {prefix!r}...'scale <S>'\n{proc.stdout[-2000:]}"
    assert float(match.group(1)) >= min_scale, f"{where}: the scale only reached {match.group(1)} ({last!r})"
    if nproc:
        # only rank 0 prints the result
        assert sum("scale " in line for line in lines) == 1, f"{where}: {lines}"


def test_every_example_is_tested():
    files = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert files, f"no examples in {EXAMPLES}"
    assert files == sorted(CASES), (f"examples/ holds {files}; tests/test_examples.py covers {sorted(CASES)}: "
                                    f"add the missing ones to CASES")
