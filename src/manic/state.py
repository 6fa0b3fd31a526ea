"""The checkpoint format: the layout of Mechanic's state in a state dict, its versions and its checks.

Per parameter, by the state mode: ``mechanic_ref`` and ``mechanic_delta`` ("ref+delta"),
``mechanic_ref`` ("ref") or ``mechanic_delta`` ("delta") in ``state[index]``, and ``mechanic_dist_acc`` with
distance_floor=True; the tuner's tensors,
the hyperparameters and the format version as ``mechanic_*`` entries of the first param group.
(Putting it there and taking it back out is storage.py.)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch import Tensor

from .modes import ACC, DELTA, REF
from .tuner import Resolved
from .tuner import TunerState

# 2 added lr_ref and variant (a version-1 state dict is the original form); 3 added per_group; 4 added state;
# 5 added distance_floor (with its tuner entries dist_num, dist_floor and the buffer mechanic_dist_acc)
FORMAT_VERSION = 5
PARAM_KEYS = (REF, DELTA, ACC)
DIST_KEYS = ("dist_num", "dist_floor")  # tuner entries present with distance_floor=True only
TUNER_KEYS = TunerState.keys()
# the resolved record's fields, the variant first: it sets what the defaults of the others mean, so a
# mismatch names it. store_delta, the older spelling of the state mode, is written after state too.
HYPER_KEYS = tuple(f.name for f in fields(Resolved))
# what an older state dict, which lacks them, means: {key: (the version that added it, its meaning before:
# a value, or a function of the saved tuner entries)}
ADDED: dict[str, tuple[int, Any]] = {
    "variant": (2, "original"), "per_group": (3, False),
    "state": (4, lambda t: "ref+delta" if t.get("mechanic_store_delta", True) else "ref"),
    "distance_floor": (5, False)}


def group_entries(tuner: TunerState, hyper: Resolved) -> dict[str, Any]:
    """The ``mechanic_*`` entries of the first param group: tuner tensors, hyperparameters, version."""
    out: dict[str, Any] = {f"mechanic_{k}": t for k, t in tuner.tensors().items()}
    for k in HYPER_KEYS:
        out[f"mechanic_{k}"] = getattr(hyper, k)
        if k == "state":  # (read by a manic of format 3 or older)
            out["mechanic_store_delta"] = hyper.store_delta
    out["mechanic_version"] = FORMAT_VERSION
    return out


def check_state_dict(sd: dict[str, Any], hyper: Resolved, entries: list[tuple[int, Tensor]], positions: int,
                     groups: int = 1) -> None:
    """Raise ValueError if ``sd`` (the form of ``storage.state_dict``) cannot be loaded into
    parameters ``entries`` (index, parameter) of an optimizer with ``positions`` parameters
    under ``hyper`` (with ``groups`` param groups). Buffers saved for a parameter that is not under Mechanic here (frozen,
    or in a group with ``"mechanic": False``) are ignored."""
    t = sd.get("tuner")
    if not isinstance(t, dict):
        raise ValueError("Not a Mechanic state dict: it has no 'tuner' entry")
    version = t.get("mechanic_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"Unsupported Mechanic state format version {version!r}; this manic reads <= {FORMAT_VERSION}")
    for k in HYPER_KEYS:
        added, before = ADDED.get(k, (0, None))
        if version < added and callable(before):
            before = before(t)
        saved, mine = t.get(f"mechanic_{k}", before if version < added else None), getattr(hyper, k)
        if saved != mine or type(saved) is not type(mine) and isinstance(mine, bool):
            raise ValueError(f"Checkpoint has {k}={_spelled(k, saved)} but this Mechanic has "
                             f"{k}={_spelled(k, mine)}; build it with {k}={saved!r} to resume this run")
    n, lead = hyper.num_betas, (groups,) if hyper.per_group else ()
    for k in TUNER_KEYS:
        if k == "lr_ref" and version == 1 or k in DIST_KEYS and not hyper.distance_floor:
            continue  # absent: 1, the original form's unit (TunerState.of); no distance floor
        v = t.get(f"mechanic_{k}")
        want = (*lead, n) if k in ("r", "m", "v", "s") else lead if k in ("lr_ref", *DIST_KEYS) else ()
        if not isinstance(v, Tensor) or tuple(v.shape) != want:
            raise ValueError(f"Checkpoint entry mechanic_{k} should be a tensor of shape {want}, got {v!r:.80}")
    state = sd.get("state", {})
    mine_by_index = dict(entries)
    want_keys = set(hyper.mode.keys)
    started = int(t["mechanic_step"]) > 0
    for i, p in mine_by_index.items():
        entry = {k: v for k, v in state.get(i, {}).items() if k in PARAM_KEYS}
        if not entry:
            # not under Mechanic when saved (frozen then): it joins now, from its current value, as a
            # parameter unfrozen during a run does (and FSDP1 with use_orig_params=True keeps no state
            # for a rank's empty views)
            continue
        if set(entry) != want_keys:
            raise ValueError(f"Checkpoint parameter {i} has Mechanic buffers {sorted(entry)}, expected "
                             f"{sorted(want_keys)} (state={hyper.state!r})")
        for k, v in entry.items():
            if not isinstance(v, Tensor) or v.shape != p.shape:
                shape = getattr(v, "shape", None)
                raise ValueError(f"Checkpoint {k} of parameter {i} has shape {tuple(shape) if shape is not None else v!r}, "
                                 f"the parameter has {tuple(p.shape)}; it comes from another model")
    extra = sorted(i for i, entry in state.items() if not (isinstance(i, int) and 0 <= i < positions)
                   and any(k in PARAM_KEYS for k in entry))
    if extra:
        raise ValueError(f"Checkpoint has Mechanic buffers for parameters {extra}, but this optimizer has "
                         f"{positions} parameters; it comes from another model or optimizer layout")


def _spelled(key: str, value: Any) -> str:
    """A value for a message; the state modes store_delta also spells, with that spelling."""
    if key == "state" and value in ("ref+delta", "ref"):
        return f"{value!r} (store_delta={value == 'ref+delta'})"
    return repr(value)


def strip_mechanic(sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a full optimizer state dict into (the base optimizer's part, Mechanic's part or None).

    Mechanic's per-parameter entries are re-keyed by position in the saved param groups, as
    torch's load_state_dict matches them (state keys may be integers or, from
    torch.distributed.checkpoint's helpers, parameter names).
    """
    groups = [dict(g) for g in sd["param_groups"]]
    position = {key: i for i, key in enumerate(k for g in groups for k in g.get("params", []))}
    tuner_entries = {}
    for g in groups:
        for k in [k for k in g if k.startswith("mechanic_")]:
            value = g.pop(k)
            tuner_entries.setdefault(k, value)
    state, params = {}, {}
    for key, entry in sd["state"].items():
        mine = {k: v for k, v in entry.items() if k in PARAM_KEYS}
        state[key] = {k: v for k, v in entry.items() if k not in PARAM_KEYS}
        if mine:
            if key not in position:
                raise ValueError(f"State entry {key!r} belongs to no parameter of the saved param groups")
            params[position[key]] = mine
    base = dict(sd)
    base["state"], base["param_groups"] = state, groups
    if not tuner_entries:
        return base, None
    return base, {"state": params, "tuner": tuner_entries}
