"""``MechanicCallback``: Mechanic's scale and effective learning rate in every HF ``Trainer`` log.

    trainer = Trainer(..., optimizers=(manic.mechanize(opt), sched), callbacks=[MechanicCallback()])
    # or trainer.add_callback(MechanicCallback())

Every log the Trainer writes (its log history and every reporter: TensorBoard, W&B, the console,
...) then holds ``mechanic/scale`` and ``mechanic/effective_lr`` (plus ``mechanic/effective_lr/<i>``
per param group when there are several).

How: ``Trainer.log`` appends a copy of the logs to ``state.log_history`` and then calls ``on_log``
on each callback in turn, on the same ``logs`` dict; the reporters (``report_to``) and the console
printer come before the user's callbacks. So this callback moves itself to the front of the
Trainer's callback list (at its first event, from the ``CallbackHandler`` that calls it), adds the
values to ``logs`` in place, so every callback after it sees them, and adds them to the entry
``Trainer.log`` just appended to ``state.log_history``.

The effective lr is the one of the optimizer step just taken, as the Trainer's ``learning_rate``
is: each group's lr is recorded in ``on_optimizer_step`` (after the step, before the scheduler's),
so on every logged line ``mechanic/effective_lr == mechanic/scale * learning_rate``. Only the
world's main process reads the values (one host sync per log, no collective): the reporters log
from it alone, and every rank has the same scale.

If the Trainer's optimizer is not a Mechanic one, training stops at its start with a ``TypeError``.
With DeepSpeed (``TrainingArguments(deepspeed=...)``) that is what ``optimizers=`` leads to: Trainer
drops the pair and builds its own optimizer with ``create_optimizer()``, so the error says to
override that instead (docs/frameworks.md).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from . import _floats, _param_groups, _tensors, find_mechanic

__all__ = ["MechanicCallback"]


class MechanicCallback(TrainerCallback):
    """Adds ``mechanic/scale`` and ``mechanic/effective_lr`` to every log of an HF ``Trainer``."""

    def __init__(self) -> None:
        self._source: Any = None  # the optimizer object the Trainer passes to callbacks
        self._mechanic: Any = None
        self._lrs: list[float] | None = None  # each group's lr in the last optimizer step
        self._handler: CallbackHandler | None = None
        self._warned = False

    # ------------------------------------------------------------------ being first
    def _calling_handler(self) -> CallbackHandler | None:
        """The ``CallbackHandler`` whose ``call_event`` called this callback (a few frames up)."""
        frame = sys._getframe(2)
        for _ in range(6):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(c is self for c in owner.callbacks):
                return owner
            frame = frame.f_back
        return None

    def _to_front(self) -> None:
        """Be the first callback, so that the reporters after it see what it adds to ``logs``."""
        handler = self._handler
        if handler is not None and handler.callbacks and handler.callbacks[0] is self:
            return
        handler = self._calling_handler() or handler
        if handler is None:
            if not self._warned:
                self._warned = True
                warnings.warn("MechanicCallback could not find the Trainer's callback list; reporters that run "
                              "before it (report_to=...) may not show mechanic/scale", RuntimeWarning, stacklevel=3)
            return
        self._handler = handler
        if handler.callbacks[0] is not self:
            # a new list: the loop that is calling us goes on over the old one undisturbed
            handler.callbacks = [self, *(c for c in handler.callbacks if c is not self)]

    # ------------------------------------------------------------------ the optimizer
    def _find(self, optimizer: Any) -> Any:
        if optimizer is None:
            return None
        if optimizer is not self._source:
            self._mechanic = find_mechanic(optimizer)  # TypeError if the Trainer's optimizer is not Mechanic
            self._source = optimizer
        return self._mechanic

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._to_front()

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        self._to_front()
        try:
            self._find(optimizer)
        except TypeError as e:
            if getattr(args, "deepspeed", None) is None:
                raise
            # transformers' deepspeed_init drops the optimizers= pair and calls create_optimizer()
            raise TypeError(f"{e}. With deepspeed= set, Trainer ignores optimizers=(...) and builds its own optimizer "
                            "with create_optimizer(): subclass Trainer and override create_optimizer to return "
                            "manic.mechanize(..., process_group=torch.distributed.group.WORLD) (docs/frameworks.md, "
                            "DeepSpeed)") from e

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._to_front()

    def on_prediction_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._to_front()  # an evaluate() with no training before it logs too

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        mechanic = self._find(optimizer)
        if mechanic is not None:  # Python floats: no device work
            self._lrs = [g["lr"] for g in _param_groups(mechanic)]

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        self._to_front()
        if logs is None or not state.is_world_process_zero:
            return
        mechanic = self._find(optimizer)
        if mechanic is None:
            return
        values = _floats(_tensors(mechanic, self._lrs))
        logs.update(values)  # the same dict every later callback (reporter, printer) receives
        history = state.log_history
        if history:
            entry = history[-1]  # Trainer.log appended {**logs, "step": global_step} just before on_log
            if entry is not logs and entry.get("step") == state.global_step and all(
                    k in entry for k in logs if k not in values):
                entry.update(values)
