"""DCP checkpoints: one directory per step, marked complete only once every rank has written.

A checkpoint cut short by a kill has no marker: it is never resumed from, never counted by the
retention (--keep-last) and removed by the next run (rundir.py finds, keeps and prunes them).
Model and optimizer go through torch.distributed.checkpoint's state-dict helpers, so they reshard
on load (another number of ranks) and manic's state rides along in the optimizer's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from rundir import MARKER

# What DCP says on every save and load without a process group (a plain `python launch/train.py`).
# Single-process is intended there, so only this warning is silenced, only around those calls.
SINGLE_PROCESS = ("torch.distributed is (disabled, )?unavailable or uninitialized, "
                  "assuming the intent is to (save|load) in a single process")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(root: str | Path, step: int, model: Any, opt: Any, trainer: dict) -> Path:
    path = Path(root) / f"step_{step:08d}"
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
        dcp.save(state, checkpoint_id=str(path))
    _barrier()
    if _rank0():
        (path / "trainer.json").write_text(json.dumps(trainer))
        (path / MARKER).write_text(str(step))
    _barrier()
    return path


def load(path: Path, model: Any, opt: Any) -> dict:
    """Load model and optimizer state (resharding as needed); returns the trainer state."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return json.loads((path / "trainer.json").read_text())
