"""The corpus: Python's standard-library source, read in sorted order, as bytes (vocabulary 256)."""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class CharData:
    train: torch.Tensor  # uint8 tokens
    val: torch.Tensor
    vocab_size: int = 256

    @staticmethod
    def load(max_bytes: int = 4_000_000) -> "CharData":
        """The first ``max_bytes`` characters of the stdlib's .py files (sorted, so every rank and
        every machine with the same Python reads the same text); the last 10% is held out."""
        chunks, total = [], 0
        for path in _stdlib_sources(Path(sysconfig.get_paths()["stdlib"])):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        text = b"".join(chunks)[:max_bytes]
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        split = int(0.9 * len(tokens))
        return CharData(tokens[:split].clone(), tokens[split:].clone())

    def batch(self, split: str, batch_size: int, block: int, seed: int, step: int, rank: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch determined by (seed, step, rank) alone: resuming needs no data-loader state."""
        data = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) % (2**63))
        starts = torch.randint(len(data) - block - 1, (batch_size,), generator=g)
        x = torch.stack([data[s:s + block] for s in starts.tolist()]).long()
        y = torch.stack([data[s + 1:s + block + 1] for s in starts.tolist()]).long()
        return x, y


def _stdlib_sources(root: Path) -> list[Path]:
    """The .py files under ``root`` in sorted order, without installed packages and test suites."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "test", "tests", "idlelib",
                                                       "__pycache__"))
        out += [Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return out
