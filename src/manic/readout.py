"""What users read of a Mechanic: the scale, the effective learning rates and the statistics, shared by
both public faces (``Mechanized`` and ``Mechanic``) and by the framework integrations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .options import Options
from .tuner import Resolved, TunerState, of_group


class TunerReadout:
    """What both user-facing forms expose of their engine."""

    _engine: Any  # the engine.Engine behind this face (engine_of finds it; not imported here: engine.py imports this)

    @property
    def hyper(self) -> Resolved:
        """The resolved hyperparameters (``Options.hyper``)."""
        return self._engine.hyper

    @property
    def options(self) -> Options:
        """The options as given (``manic.Options``; ``hyper`` has the defaults applied)."""
        return self._engine.options

    @property
    def scale(self) -> Tensor:
        """The current scale S (sum of the per-beta scales), a 0-dim tensor on the device; with
        per_group=True, one per param group (shape ``(len(param_groups),)``)."""
        return self._engine.scale

    @property
    def effective_lr(self) -> list[Tensor]:
        """Per param group, the learning rate the base update is applied with: ``S * lr`` (0-dim
        tensors on the device; a group with ``"mechanic": False`` keeps its ``lr``). The parameters
        also move by ``(S_new - S_old) * Delta`` when the scale changes (docs/behaviour.md)."""
        return effective_lrs(self._engine.scale, self._engine.optimizer.param_groups)

    def stats(self) -> dict[str, Tensor]:
        """Tuner statistics for logging (0-dim tensors; reading them syncs, the step does not).
        ``h``, ``grad_norm`` and ``param_norm`` are NaN until the first step."""
        return self._engine.stats()


per_group = of_group  # group i's scale: S[i] with per_group=True, else the one scale S


def effective_lrs(S: Tensor, groups: list[dict[str, Any]], lrs: list[float] | None = None) -> list[Tensor]:
    """Per param group, ``S_i * lr`` (``lrs``, else each group's current ``lr``); a group with
    ``"mechanic": False`` keeps its ``lr``."""
    lrs = [g["lr"] for g in groups] if lrs is None else lrs
    return [per_group(S, i) * lr if g.get("mechanic", True) else torch.as_tensor(lr, dtype=S.dtype, device=S.device)
            for i, (lr, g) in enumerate(zip(lrs, groups))]


def nan_stats(state: TunerState) -> dict[str, Tensor]:
    """The statistics ``h``, ``grad_norm`` and ``param_norm`` before the first step: NaN, one per tuner."""
    return {k: torch.full(state.lr_ref.shape, float("nan"), dtype=state.s.dtype, device=state.s.device)
            for k in ("h", "grad_norm", "param_norm")}
