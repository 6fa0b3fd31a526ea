"""DCP checkpoints: one directory per step, marked complete only once every rank has written.

A checkpoint cut short by a kill has no marker and is never picked by ``latest``. Model and
optimizer go through torch.distributed.checkpoint's state-dict helpers, so they reshard on
load (another number of ranks) and manic's state rides along in the optimizer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

MARKER = "COMPLETE"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root: str | Path, step: int, model: Any, opt: Any, trainer: dict) -> Path:
    path = Path(root) / f"step_{step:08d}"
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=str(path))
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        (path / "trainer.json").write_text(json.dumps(trainer))
        (path / MARKER).write_text(str(step))
    _barrier()
    return path


def latest(root: str | Path) -> Path | None:
    complete = sorted(p for p in Path(root).glob("step_*") if (p / MARKER).exists())
    return complete[-1] if complete else None


def load(path: Path, model: Any, opt: Any) -> dict:
    """Load model and optimizer state (resharding as needed); returns the trainer state."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return json.loads((path / "trainer.json").read_text())
