"""``MechanicMonitor``: Mechanic's scale and effective learning rate through Lightning's loggers.

    trainer = L.Trainer(..., callbacks=[MechanicMonitor()])

At the trainer's logging interval (``log_every_n_steps``) it logs ``mechanic/scale`` and
``mechanic/effective_lr`` (plus ``mechanic/effective_lr/<i>`` per param group when there are
several) with ``pl_module.log_dict(..., on_step=True)``, so they reach every attached logger
(CSV, TensorBoard, W&B, ...) in the same row and step as the other step metrics, and
``trainer.callback_metrics``. Like ``LearningRateMonitor``, it logs only on the steps Lightning
writes logs. Only global rank 0 logs (``rank_zero_only=True``): every rank has the same scale, and
no collective runs. The values go to Lightning as 0-dim tensors, which it reads when it writes
the logs (the one host sync).

The effective lr is the one of the optimizer step just taken: each group's lr is recorded in
``on_before_optimizer_step``, before the LR scheduler steps, so it pairs with the lr
``LearningRateMonitor`` logs at the same step: ``effective_lr == scale * lr``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from . import _param_groups, _tensors, find_mechanic

__all__ = ["MechanicMonitor"]


class MechanicMonitor(Callback):
    """Logs Mechanic's scale and effective learning rate at the trainer's logging interval.

    Args:
        prog_bar: also show them in the progress bar.
    """

    def __init__(self, prog_bar: bool = False) -> None:
        self.prog_bar = prog_bar
        self._source: Any = None
        self._mechanic: Any = None
        self._lrs: list[float] | None = None

    def _find(self, trainer: Any) -> Any:
        source = tuple(trainer.optimizers)  # compared element by element, by identity
        if source != self._source:
            self._mechanic = find_mechanic(list(source))  # TypeError if none is Mechanic
            self._source = source
        return self._mechanic

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._find(trainer)  # fail early if no optimizer is a Mechanic one

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        mechanic = self._find(trainer)
        self._lrs = [g["lr"] for g in _param_groups(mechanic)]  # Python floats: no device work

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or not (trainer.loggers or self.prog_bar):
            return
        # the steps Lightning writes logs on (LearningRateMonitor asks the same)
        connector = getattr(trainer, "_logger_connector", None)
        if not getattr(connector, "should_update_logs", True):
            return
        values = _tensors(self._find(trainer), self._lrs)
        pl_module.log_dict({k: v.detach() for k, v in values.items()}, on_step=True, on_epoch=False,
                           prog_bar=self.prog_bar, logger=True, rank_zero_only=True)
