"""Shared by the benchmark scripts: where results go and the line that says how they were made."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    if Path("/proc/cpuinfo").exists():
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def env_line(command: str, threads: str | None = None) -> str:
    threads = threads or f"{torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {cpu_model()}, {threads}; command: {command}"


def save(out: str | Path, name: str, quick: bool, text: str) -> Path:
    """Write ``text`` to OUT/NAME.md (NAME_quick.md for a --quick run, which git ignores)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'_quick' if quick else ''}.md"
    path.write_text(text + "\n")
    return path
