"""Where Mechanic's state lives: published into the base optimizer, hidden from its lazy state
initialisation, saved and loaded (the format and its checks: state.py), also through the base optimizer's
own ``load_state_dict`` and in a pickle of the engine.

The engine owns its tensors and *publishes* them into the base optimizer, so that ordinary checkpoint
tools see them: the state mode's per-parameter buffers under ``optimizer.state[p]["mechanic_ref" |
"mechanic_delta" | "mechanic_dist_acc"]``, the tuner's tensors and the hyperparameters under ``optimizer.param_groups[0]
["mechanic_*"]``. Loading places every tensor on its parameter's device, in the dtype its mode keeps it in.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from .compat import has_own_hook, is_dtensor
from .layout import Layout
from .modes import Buffers
from .state import PARAM_KEYS, group_entries, strip_mechanic
from .tuner import Resolved, TunerState

if TYPE_CHECKING:
    from .engine import Engine

# id(base optimizer) -> its engine; an entry goes with its engine (which holds the optimizer)
_ENGINES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def attach(optimizer: torch.optim.Optimizer, engine: Engine) -> None:
    """Record ``engine`` as the one behind ``optimizer`` (``attached``), and follow loads made through the
    base optimizer itself (``opt.base_optimizer.load_state_dict``, the seed API's ``mechanic.optimizer``):
    Mechanic's part of the state dict is checked before the base loads anything, and loaded after it."""
    _ENGINES[id(optimizer)] = engine
    if not has_own_hook(optimizer, "load_state_dict_pre", _base_load_pre):
        optimizer.register_load_state_dict_pre_hook(_base_load_pre)
        optimizer.register_load_state_dict_post_hook(_base_load_post)
    if not has_own_hook(optimizer, "step_pre", _base_step_pre):
        optimizer.register_step_pre_hook(_base_step_pre)


_STEPPING: set[int] = set()  # the base optimizers whose step Mechanic is running now (``hidden``)


def _base_step_pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Refuse a step of the base optimizer that Mechanic does not run: its update would land unscaled in x,
    and the next rebase would take it for an edit."""
    if id(optimizer) not in _STEPPING and attached(optimizer) is not None:
        raise RuntimeError(
            "This optimizer is under Mechanic: step the optimizer manic.mechanize returned (opt.step()), or with "
            "the seed API call mechanic.step() then updater.step(); stepping the base optimizer directly would "
            "apply its update without Mechanic's scale")


def attached(optimizer: Any) -> Engine | None:
    """The engine ``attach`` recorded for ``optimizer``, or None."""
    engine = _ENGINES.get(id(optimizer))
    return engine if engine is not None and engine.optimizer is optimizer else None


def check_unclaimed(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError if the base optimizer already carries Mechanic's state (a checkpoint of a mechanized
    optimizer loaded into the plain one)."""
    where = [("param group", g) for g in optimizer.param_groups] + [("state", st) for st in optimizer.state.values()]
    for what, entries in where:
        clash = [k for k in entries if isinstance(k, str) and k.startswith("mechanic_")]
        if clash:
            raise ValueError(f"The base optimizer's {what} already has keys {clash}: Mechanic's state, from a "
                             "checkpoint of a mechanized optimizer loaded into the plain one. Wrap first, then load: "
                             "opt = manic.mechanize(optimizer); opt.load_state_dict(checkpoint). (Mechanic reserves "
                             "the prefix 'mechanic_')")


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
        _STEPPING.add(id(optimizer))
        yield
    finally:
        _STEPPING.discard(id(optimizer))
        state = optimizer.state
        for p, mine in saved:
            state[p].update(mine)


Published = tuple  # (optimizer.state, layout, buffers) as last published; () before the first time


def publish(optimizer: torch.optim.Optimizer, tuner: TunerState, hyper: Resolved, layout: Layout | None,
            buffers: dict[int, Buffers], before: Published) -> Published:
    """Make the base optimizer's state and first param group carry Mechanic's tensors. Every entry is
    checked each time (a dict lookup per parameter), so an entry a user removed (``optimizer.state.clear()``,
    ``del optimizer.state[p]``) or a group inserted in front comes back at once; parameters that left the
    layout since ``before`` (what the last call returned) lose theirs."""
    groups, state = optimizer.param_groups, optimizer.state
    group = groups[0]
    if group.get("mechanic_s") is not tuner.s or group.get("mechanic_lr_ref") is not tuner.lr_ref:
        group.update(group_entries(tuner, hyper))
        for other in groups[1:]:  # the first group changed (one inserted in front): one copy only
            for k in [k for k in other if k.startswith("mechanic_")]:
                del other[k]
    now = {}
    if layout is not None:
        for s in layout.slots:
            mine = buffers.get(s.index)
            if mine is None:
                continue
            p = s.ref()
            entry = state[p]
            for k, v in mine.items():
                if entry.get(k) is not v:
                    entry[k] = v
            now[id(p)] = p
    key = (state, layout, buffers)
    if len(before) == 3 and before[1] is not None and before[1] is not layout:
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


# per-parameter state that torch's optimizers keep in the parameter's shape
PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum",
                "ax", "exp_inf", "prev", "grad_avg")


def check_base_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Raise ValueError if a base optimizer's state dict holds state of another shape than its parameter
    (a checkpoint of another model that torch's own load would accept and the next step would trip on)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = [k for g in sd.get("param_groups", []) for k in g.get("params", [])]
    if len(saved) != len(params):
        return  # torch's load_state_dict refuses this itself
    position = {key: i for i, key in enumerate(saved)}
    for key, entry in sd.get("state", {}).items():
        i = position.get(key)
        if i is None or not isinstance(entry, dict):
            continue
        for k in PARAM_SHAPED:
            v = entry.get(k)
            if isinstance(v, Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(params[i].shape):
                raise ValueError(f"The state dict's {k} of parameter {i} has shape {tuple(v.shape)}, the parameter "
                                 f"has {tuple(params[i].shape)}: it comes from another model; load a state dict "
                                 "saved from this model's optimizer")


def load_base(engine: Engine, load: Callable[[], Any]) -> None:
    """Run the base optimizer's load_state_dict for ``engine`` (its hooks leave Mechanic's part to the
    engine), keeping the groups' "mechanic" flags: torch replaces every group by the saved one, which
    may come from a run without them."""
    flags = _flags(engine.optimizer)
    engine.own_load = True
    try:
        load()
    finally:
        engine.own_load = False
    _restore_flags(engine.optimizer, flags)


def _flags(optimizer: torch.optim.Optimizer) -> list[Any]:
    return [g.get("mechanic") for g in optimizer.param_groups]


def _restore_flags(optimizer: torch.optim.Optimizer, flags: list[Any]) -> None:
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


def _base_load_pre(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any] | None:
    """A load through the base optimizer: check Mechanic's part first (a mismatch raises before the base
    loads anything) and hand the base its own part."""
    engine = attached(optimizer)
    if engine is None or engine.own_load:
        return None
    base_sd, mechanic_sd = strip_mechanic(sd)
    check_base_state(optimizer, base_sd)
    layout = engine.check_state_dict(mechanic_sd) if mechanic_sd is not None else None
    engine.pending = (mechanic_sd, layout, _flags(optimizer))
    return base_sd


def _base_load_post(optimizer: torch.optim.Optimizer) -> None:
    """... then load Mechanic's part (none: Mechanic starts afresh from the loaded point, as
    ``Mechanized.load_state_dict`` does with a plain state dict)."""
    engine = attached(optimizer)
    if engine is None or engine.pending is None:
        return
    mechanic_sd, layout, flags = engine.pending
    engine.pending = None
    _restore_flags(optimizer, flags)
    engine._load(mechanic_sd, layout)


def pickled(engine: Engine) -> dict[str, Any]:
    """What a pickle or a deep copy of ``engine`` keeps: the layout holds weak references (and the reducer,
    perhaps a process group), so the copy binds again at its next step, keeping the buffers by position;
    the plan, what was published and DeepSpeed's parts go too, and the kernels are chosen again."""
    state = dict(engine.__dict__)
    state.update(layout=None, _plan=None, _published=(), pending=None, kernels=None, parts=None)
    return state
