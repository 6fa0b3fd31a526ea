"""Where Mechanic's state lives: published into the base optimizer, hidden from its lazy state
initialisation, saved and loaded (the format and its checks: state.py).

The engine owns its tensors and *publishes* them into the base optimizer, so that ordinary checkpoint
tools see them: the state mode's per-parameter buffers under ``optimizer.state[p]["mechanic_ref" |
"mechanic_delta"]``, the tuner's tensors and the hyperparameters under ``optimizer.param_groups[0]
["mechanic_*"]``. Loading places every tensor on its parameter's device, in the dtype its mode keeps it in.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from .compat import is_dtensor
from .layout import Layout
from .modes import Buffers
from .tuner import Resolved
from .state import PARAM_KEYS, group_entries
from .tuner import TunerState


@contextmanager
def hidden(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> Iterator[None]:
    """While the block runs (the base optimizer's step), a parameter whose state holds only
    Mechanic's buffers has an empty state: torch optimizers initialise a parameter's state
    lazily, when ``len(state[p]) == 0``. The buffers are back afterwards, whatever happens."""
    state = optimizer.state
    saved = []
    for p in params:
        entry = state.get(p)
        if entry and all(k in PARAM_KEYS for k in entry):
            saved.append((p, dict(entry)))
            entry.clear()
    try:
        yield
    finally:
        state = optimizer.state
        for p, mine in saved:
            state[p].update(mine)


Published = tuple  # (optimizer.state, layout, buffers) as last published; () before the first time


def publish(optimizer: torch.optim.Optimizer, tuner: TunerState, hyper: Resolved, layout: Layout | None,
            buffers: dict[int, Buffers], before: Published) -> Published:
    """Make the base optimizer's state and first param group carry Mechanic's tensors (a no-op when
    nothing changed since ``before``, what the last call returned)."""
    group, state = optimizer.param_groups[0], optimizer.state
    if group.get("mechanic_s") is not tuner.s or group.get("mechanic_lr_ref") is not tuner.lr_ref:
        group.update(group_entries(tuner, hyper))
    key = (state, layout, buffers)
    if len(before) == 3 and all(a is b for a, b in zip(key, before)):
        return before
    now = {}
    if layout is not None:
        for s in layout.slots:
            if s.index in buffers:
                p = s.ref()
                state[p].update(buffers[s.index])
                now[id(p)] = p
    if before and before[1] is not None:
        for s in before[1].slots:  # parameters that left: their entries lose Mechanic's buffers
            p = s.ref()
            if p is None or id(p) in now or p not in state:
                continue
            entry = state[p]
            for k in PARAM_KEYS:
                entry.pop(k, None)
            if not entry:
                del state[p]
    return key


def state_dict(tuner: TunerState, hyper: Resolved, buffers: dict[int, Buffers]) -> dict[str, Any]:
    """Mechanic's own state: {"state": {index: {the mode's buffers}}, "tuner": {mechanic_*}}."""
    return {"state": {i: dict(b) for i, b in buffers.items()}, "tuner": group_entries(tuner, hyper)}


def load_base(optimizer: torch.optim.Optimizer, load: Callable[[], Any]) -> None:
    """Run the base optimizer's load_state_dict, keeping the groups' "mechanic" flags: torch
    replaces every group by the saved one, which may come from a run without them."""
    flags = [g.get("mechanic") for g in optimizer.param_groups]
    load()
    for group, flag in zip(optimizer.param_groups, flags):
        if flag is not None:
            group["mechanic"] = flag


def loaded(sd: dict[str, Any], layout: Layout, hyper: Resolved, fp32_reference: bool
           ) -> tuple[TunerState, dict[int, Buffers], bool]:
    """The tuner state, the buffers and whether Mechanic had started, from a checked state dict
    (``state.check_state_dict``), placed for ``layout``."""
    tuner = TunerState.of({k[len("mechanic_"):]: v for k, v in sd["tuner"].items()}, layout.dtype, layout.device)
    started = int(tuner.step) > 0
    saved = sd.get("state", {})
    mode, buffers = hyper.mode, {}
    for s in layout.slots:
        entry, p = saved.get(s.index), s.ref()
        if entry and any(k in entry for k in PARAM_KEYS):
            buffers[s.index] = {k: _placed(mode.placed, p, k, entry[k], fp32_reference) for k in PARAM_KEYS
                                if k in entry}
        elif started:  # an empty local shard (see check_state_dict)
            buffers[s.index] = mode.new_buffers(p, fp32_reference)
    return tuner, buffers, started


def _placed(place: Callable, p: Tensor, key: str, value: Tensor, fp32_reference: bool) -> Tensor:
    if is_dtensor(p) and not is_dtensor(value):
        raise ValueError(f"Checkpoint {key} is a plain tensor but its parameter is a DTensor; "
                         "load sharded state with torch.distributed.checkpoint")
    return place(p, key, value, fp32_reference)
