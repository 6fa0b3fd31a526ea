"""The small MLP the distributed, framework and golden tests train: distributed/scenarios.py (float64,
with the gain), frameworks/lightning_job.py (without it) and golden/trajectories.py (narrower). The
golden trajectories were recorded with it: a change to how it builds or runs changes them."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """fc1 -> tanh -> fc2 -> tanh -> fc3 (``widths``: in, hidden, hidden, out = 2), then, with ``gain``,
    times the first two elements of a 3-element gain plus its third (fewer elements than 4 ranks: some
    shards are empty)."""

    def __init__(self, widths: tuple[int, int, int, int] = (8, 16, 16, 2), gain: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(widths[0], widths[1])
        self.fc2 = nn.Linear(widths[1], widths[2])
        self.fc3 = nn.Linear(widths[2], widths[3])
        self.gain = nn.Parameter(torch.tensor([0.7, -0.4, 0.9])) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return out if self.gain is None else out * self.gain[:2] + self.gain[2]
