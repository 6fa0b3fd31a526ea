"""The seed API: ``Updater`` (base optimizer + LR scheduler) and ``Mechanic`` (the tuner).

    updater = Updater(optimizer, lr_scheduler)
    mechanic = Mechanic(updater)
    loss.backward(); mechanic.step(); updater.step()
"""

from __future__ import annotations

from typing import Any

import torch

from .apidoc import api_doc
from .engine import Engine
from .options import Options, with_options_signature
from .readout import TunerReadout
from .state import strip_mechanic


class Updater:
    """Steps a base optimizer and then its LR scheduler (a static schedule if none): the half of the seed
    API that ``Mechanic(updater, **options)`` tunes (Mechanic's options go there; ``help(manic.Mechanic)``).

    Args:
        optimizer: the base optimizer, a ``torch.optim.Optimizer``.
        lr_scheduler: an LR scheduler built on ``optimizer`` (anything with ``step()``), or None.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, or ``lr_scheduler`` has no ``step()``.
        ValueError: ``lr_scheduler`` is attached to another optimizer.

    Readouts:
        base_optimizer: the optimizer.
        lr_scheduler: the scheduler, or None.
        get_last_lr(): the scheduler's last lrs (the schedule, not what Mechanic applies: that is
            ``mechanic.effective_lr``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Updater takes a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        if lr_scheduler is not None:
            if not callable(getattr(lr_scheduler, "step", None)):
                raise TypeError(f"lr_scheduler must be an LR scheduler with step(), got {type(lr_scheduler).__name__}")
            owner = getattr(lr_scheduler, "optimizer", optimizer)
            if owner is not optimizer and getattr(owner, "base_optimizer", None) is not optimizer:
                raise ValueError("lr_scheduler is attached to another optimizer; build it on this optimizer")
        self.base_optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Step and load the base optimizer through ``engine`` from now on (``Mechanic(updater)`` calls this)."""
        if engine.optimizer is not self.base_optimizer:
            raise ValueError("The engine is attached to another optimizer than this updater's")
        self._engine = engine

    def step(self) -> None:
        """Step the base optimizer (rebased by Mechanic, if attached), then the scheduler."""
        if self._engine is None:
            self.base_optimizer.step()
        else:
            self._engine.step_base(self.base_optimizer.step)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def get_last_lr(self) -> list[float]:
        if self.lr_scheduler is not None:
            return self.lr_scheduler.get_last_lr()
        return [group["lr"] for group in self.base_optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's and the scheduler's state (Mechanic's is in ``mechanic.state_dict()``)."""
        base, _ = strip_mechanic(self.base_optimizer.state_dict())
        sched = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
        return {"base_optimizer": base, "lr_scheduler": sched}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"Updater.load_state_dict takes what updater.state_dict() returns (keys 'base_optimizer' "
                             f"and 'lr_scheduler'), got {keys}; an optimizer's own state dict loads with "
                             "updater.base_optimizer.load_state_dict(...)")
        base, _ = strip_mechanic(state_dict["base_optimizer"])
        if self._engine is None:
            self.base_optimizer.load_state_dict(base)
        else:
            self._engine.load_base(lambda: self.base_optimizer.load_state_dict(base))
        if self.lr_scheduler is not None and state_dict.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state_dict["lr_scheduler"])


@api_doc(options=True, readouts=True)
class Mechanic(TunerReadout):
    """Tunes the scale of the updates of ``updater``'s base optimizer.

    Call ``mechanic.step()`` after ``loss.backward()`` and before ``updater.step()``. The keywords are
    the fields of ``manic.Options``; docs/options.md explains each at length.

    Args:
        updater: a ``manic.Updater`` holding the base optimizer and its LR scheduler.

    Raises:

    Readouts:
        updater: the updater; ``optimizer`` is its base optimizer.
        get_last_lr(): ``[float(scale)]``, like an LR scheduler (reading it syncs with the device).
    """

    @with_options_signature
    def __init__(self, updater: Updater, **options: Any) -> None:
        if not isinstance(updater, Updater):
            raise TypeError(f"Mechanic takes a manic.Updater, got {type(updater).__name__}; "
                            "build Updater(optimizer, lr_scheduler) first (or use manic.mechanize(optimizer))")
        self.updater = updater
        self._engine = Engine(updater.base_optimizer, Options.from_kwargs("Mechanic", options))
        updater.attach(self._engine)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer (kept for the seed README's load snippet)."""
        return self.updater.base_optimizer

    @optimizer.setter
    def optimizer(self, value: torch.optim.Optimizer) -> None:
        if value is not self.updater.base_optimizer:
            raise ValueError("Mechanic.optimizer is the updater's base optimizer and cannot be replaced; "
                             "build a new Updater and Mechanic for another optimizer")

    def get_last_lr(self) -> list[float]:
        """``[float(scale)]`` (one per param group with per_group=True), like an LR scheduler
        (reading it syncs with the device)."""
        return self.scale.reshape(-1).tolist()

    def step(self) -> None:
        """Compute the tuner update from the current gradients; ``updater.step()`` applies it."""
        self._engine.prepare()

    def state_dict(self) -> dict[str, Any]:
        return self._engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._engine.load(state_dict)
