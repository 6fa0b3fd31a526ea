"""See Mechanic's scale and effective learning rate where training frameworks log.

    from manic.integrations import readout
    writer.add_scalars("mechanic", readout(opt), step)   # or wandb.log(readout(opt)), ...

``find_mechanic(obj)`` finds the Mechanic object (``manic.Mechanized`` or ``manic.Mechanic``) inside
the wrappers frameworks put around it; ``readout(obj)`` returns its scale and effective learning
rates as floats. The framework callbacks live in submodules, imported on demand:
``manic.integrations.transformers.MechanicCallback`` (HF ``Trainer``) and
``manic.integrations.lightning.MechanicMonitor`` (Lightning). Importing this package imports
neither framework. See docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..readout import TunerReadout, effective_lrs, per_group
from ..optimizer import Mechanized
from ..seed import Mechanic, Updater

__all__ = ["find_mechanic", "readout"]

PREFIX = "mechanic/"

# Where frameworks keep the optimizer they wrap, in the order they are tried:
#   accelerate AcceleratedOptimizer .optimizer, Accelerator ._optimizers;
#   Lightning LightningOptimizer ._optimizer, Trainer / Strategy .optimizers, LightningModule .trainer;
#   HF Trainer .optimizer; DeepSpeed engine .optimizer (a ZeRO / fp16 / bf16 wrapper, itself holding
#   the client optimizer as .optimizer) and .client_optimizer.
_WRAPPER_ATTRS = ("optimizer", "_optimizer", "optimizers", "_optimizers", "client_optimizer", "strategy", "trainer")
_MAX_DEPTH = 6


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return list(obj)
    found = []
    for name in _WRAPPER_ATTRS:
        try:  # a property may raise (a LightningModule not attached to a Trainer, ...)
            value = getattr(obj, name)
        except Exception:  # noqa: BLE001
            continue
        if value is None or (callable(value) and not isinstance(value, torch.optim.Optimizer)):
            continue  # methods, models
        found.append(value)
    return found


def find_mechanic(obj: Any) -> Mechanized | Mechanic:
    """The Mechanic object in ``obj``: ``obj`` itself, or the one a framework's wrapper holds.

    Walks the attributes where frameworks keep the optimizer they wrap (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, ``Trainer`` and strategy, an HF
    ``Trainer``, a DeepSpeed engine), breadth first, without importing any framework. With several
    Mechanic optimizers (e.g. Lightning with two), returns the first found. Raises ``TypeError``
    if there is none.
    """
    seen: set[int] = set()
    level, path = [obj], {id(obj): type(obj).__name__}
    for _ in range(_MAX_DEPTH):
        following = []
        for node in level:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, TunerReadout):
                # A wrapper may itself pass for the optimizer (Lightning's LightningOptimizer subclasses
                # the class of the optimizer it wraps and copies its __dict__): prefer what it wraps.
                inner = [c for c in _children(node) if isinstance(c, TunerReadout)]
                return find_mechanic(inner[0]) if inner else node  # type: ignore[return-value]
            for child in _children(node):
                path.setdefault(id(child), f"{path[id(node)]} -> {type(child).__name__}")
                following.append(child)
        level = following
        if not level:
            break
    looked = sorted(set(path.values()))
    hint = (" (pass the manic.Mechanic built on this Updater: an Updater does not know its Mechanic)"
            if isinstance(obj, Updater) else "")
    raise TypeError(f"no Mechanic optimizer (manic.mechanize(...) or manic.Mechanic) found in "
                    f"{type(obj).__name__}{hint}; looked at: {', '.join(looked)}")


def _param_groups(mechanic: Mechanized | Mechanic) -> list[dict[str, Any]]:
    return mechanic.optimizer.param_groups if isinstance(mechanic, Mechanic) else mechanic.param_groups


def _tensors(mechanic: Mechanized | Mechanic, lrs: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``readout`` as 0-dim tensors on the device (no host sync). With ``lrs`` (one per param group,
    e.g. recorded before the LR scheduler stepped), the effective lr is taken with those instead of
    the groups' current ``lr``, as ``effective_lr`` does it."""
    S = mechanic.scale
    if lrs is None:
        effective = mechanic.effective_lr
    else:
        groups = _param_groups(mechanic)
        if len(lrs) != len(groups):  # a group was added since: the current lrs
            effective = mechanic.effective_lr
        else:
            effective = effective_lrs(S, groups, list(lrs))
    out = {PREFIX + "scale": per_group(S, 0), PREFIX + "effective_lr": effective[0]}
    if S.dim():  # per_group=True: a scale per group
        out.update({f"{PREFIX}scale/{i}": s for i, s in enumerate(S.unbind())})
    if len(effective) > 1:
        out.update({f"{PREFIX}effective_lr/{i}": e for i, e in enumerate(effective)})
    return out


def _floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The tensors of ``_tensors`` as Python floats, in one host sync."""
    stacked = torch.stack([v.detach().reshape(()) for v in values.values()])  # all in the scale's dtype
    return dict(zip(values, stacked.tolist()))


def readout(obj: Any) -> dict[str, float]:
    """Mechanic's scale and effective learning rate, as floats ready for a logger.

    ``{"mechanic/scale": S, "mechanic/effective_lr": S * lr of group 0}``, plus
    ``"mechanic/effective_lr/<i>"`` for every group when there are several (a group with
    ``"mechanic": False`` shows its own lr). ``obj`` is the Mechanic optimizer or anything
    ``find_mechanic`` looks into. Reading the values is one host sync; nothing else syncs.

    The effective lr pairs the current scale with each group's current ``lr``: read between
    ``opt.step()`` and ``scheduler.step()``, it is the lr with which that step's base update was
    applied (docs/observability.md).
    """
    return _floats(_tensors(find_mechanic(obj)))
