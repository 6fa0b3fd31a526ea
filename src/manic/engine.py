"""Mechanic attached to one base optimizer: the state it keeps between steps, and a step's two halves.

The engine binds the layout (late, see layout.py) and carries the buffers over when the param groups
change, checks once that every rank built it alike, and drives a step: ``prepare`` makes the plan
(step.py) before the base step; ``step_base`` runs the base step with Mechanic's buffers hidden from
its lazy state initialisation, installs the plan and rebases. Its tensors are published into the base
optimizer, saved, loaded (also through the base optimizer's own ``load_state_dict``) and pickled through
storage.py. Both user-facing forms (``mechanize`` and the seed pair) drive this; ``manic.engine_of`` finds
it behind either of them, or behind the base optimizer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import deepspeed_zero, edits, kernels, partitions, step, storage, tuner
from .compat import local
from .layout import Layout, bind, carry, check_disjoint, check_unique
from .modes import Buffers
from .options import Options
from .readout import TunerReadout, nan_stats
from .state import check_state_dict
from .tuner import TunerState

def engine_of(obj: Any) -> Engine | None:
    """The engine behind ``obj``: a ``manic.mechanize(...)`` optimizer, a ``manic.Mechanic``, or a base
    optimizer under either; None if ``obj`` is none of these. (Its ``scale``, ``stats()``, ``options``,
    ``hyper``, ``optimizer`` and ``params`` are for integrations and tests; the rest is internal.)"""
    if isinstance(obj, TunerReadout):
        return obj._engine  # type: ignore[return-value]
    return storage.attached(obj)


class Engine:
    """The Mechanic tuner attached to one base optimizer.

    Its seams for the modules that run parts of it are public names: storage.py's load hooks use
    ``own_load``, ``pending`` and ``check_state_dict``; partitions.py's step over DeepSpeed's parts uses
    ``bound``, ``checked``, ``kernels``, ``betas`` and ``commit``; deepspeed_zero.py keeps its lookup in
    ``parts``. No other module touches an underscored name."""

    def __init__(self, optimizer: torch.optim.Optimizer, options: Options):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.options = options
        self.hyper = options.hyper
        self.kernels = kernels.compiled() if options.compile else kernels.EAGER
        self.layout: Layout | None = None
        self.buffers: dict[int, Buffers] = {}
        self.started = False
        self.checked = False  # the cross-rank configuration check ran
        self._beta: Tensor | None = None
        dtype, device = _provisional(optimizer)
        self.tuner = TunerState.fresh(self.hyper, dtype, device, len(optimizer.param_groups))
        self._plan: step.Plan | partitions.PartPlan | None = None
        self.parts: deepspeed_zero.Zero | str | None = None  # DeepSpeed ZeRO's parts (deepspeed_zero.of), once looked
        self._last = nan_stats(self.tuner)
        self._written: edits.Record | None = None  # the parameters as Mechanic last wrote them (edits.py)
        self._published: storage.Published = ()
        # loads through the base optimizer's own load_state_dict (storage.attach's hooks):
        self.own_load = False  # the engine is loading the base optimizer itself
        self.pending: tuple | None = None  # a load between the two hooks
        storage.attach(optimizer, self)
        self.publish()

    def __getstate__(self) -> dict[str, Any]:  # a pickle or a deep copy (storage.pickled)
        return storage.pickled(self)

    def __setstate__(self, state: dict[str, Any]) -> None:  # a deep copy or an unpickled one
        self.__dict__.update(state)
        self._written = None  # (tensor ids of another process or copy)
        self.kernels = kernels.compiled() if self.options.compile else kernels.EAGER
        storage.attach(self.optimizer, self)

    # ------------------------------------------------------------------ the layout
    @property
    def params(self) -> list[Tensor]:
        """The tensors under Mechanic (empty until it binds at the first step or load)."""
        return self.layout.params if self.layout is not None else []

    @property
    def reducer(self) -> Any:
        return self.layout.reducer if self.layout is not None else None

    def _bind(self) -> Layout:
        o = self.options
        return bind(self.optimizer, o.reducer, o.process_group, o.device_mesh, self.hyper.per_group)

    def bound(self) -> tuple[Layout, dict[int, Buffers]]:
        """The layout of the optimizer as it is now, and the buffers carried over to it (pure)."""
        if self.layout is not None and self.layout.matches(self.optimizer):
            return self.layout, self.buffers
        layout = self._bind()
        if self.layout is None and self.started:  # unpickled or deep-copied: the same positions
            return layout, self.buffers
        if self.layout is None or not self.started:
            return layout, {}  # buffers before the start are made afresh at the start
        mode, fp32 = self.hyper.mode, self.options.fp32_reference
        join = lambda p: mode.new_buffers(p, fp32)  # noqa: E731
        place = lambda p, b: {k: mode.placed(p, k, v, fp32) for k, v in b.items()}  # noqa: E731
        return layout, carry(self.layout, layout, self.buffers, join, place)

    def sync(self) -> None:
        """Follow a change of the param groups now (outside a step) if Mechanic holds state."""
        if self.buffers and self._plan is None:
            layout, buffers = self.bound()
            self._install(layout, buffers, self.tuner)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def prepare(self) -> None:
        """Everything before the base step; nothing changes until the base step has run."""
        if self._plan is not None:
            raise RuntimeError("Mechanic's step was called twice without the base optimizer stepping in between; "
                               "call updater.step() after each mechanic.step()")
        parts = deepspeed_zero.of(self)
        if parts is not None:  # DeepSpeed ZeRO steps the optimizer once per partition (partitions.py)
            self._plan = partitions.prepare(parts, self)
            return
        layout, buffers = self.bound()
        if self._written is not None and self.started:  # (a record only under a mode that adopts edits)
            edits.adopt_edited(layout, buffers, self._written, lambda: self.tuner.scale)
        groups = self.optimizer.param_groups
        if not self.checked:
            step.check_ranks(groups, layout, self.options, self.hyper)
            self.checked = True
        self._plan = step.prepare(groups, layout, buffers, self.tuner, self.started, self.options, self.hyper,
                                  kernels.for_step(self.kernels), self.betas(layout))

    def betas(self, layout: Layout) -> Tensor:
        """The betas in the tuner's dtype on its device, built once per layout dtype and device
        (a host-to-device copy otherwise on every step)."""
        beta = self._beta
        if beta is None or beta.dtype != layout.dtype or beta.device != layout.device:
            beta = self._beta = tuner.betas(self.hyper.num_betas, layout.dtype, layout.device)
        return beta

    def step_base(self, base_step: Callable[[], Any]) -> None:
        """Run the base step of the prepared plan, then commit it; if the base step raises,
        the plan is dropped and Mechanic stays as it was."""
        plan, self._plan = self._plan, None
        if plan is None:
            raise RuntimeError("The base optimizer is about to step without Mechanic's step before it; "
                               "call mechanic.step() before updater.step()")
        if isinstance(plan, partitions.PartPlan):
            plan.run(self, base_step)
            return
        if plan.update is None or not plan.update.skip_base:
            with storage.hidden(self.optimizer, plan.layout.params):
                base_step()
        self.commit(plan)

    @torch.no_grad()
    def commit(self, plan: step.Plan) -> None:
        self.started = plan.started
        self._install(plan.layout, plan.buffers, plan.tuner)
        u = plan.update
        if u is not None:
            self.tuner.copy_(u.tuner)
            self._last = u.last
            if not u.skip_base:
                step.rebase(plan, self.hyper.mode, self.hyper.eps, kernels.for_step(self.kernels))
        # the parameters as Mechanic leaves them (an edit before the next step is told apart: edits.py)
        self._written = None
        if plan.started and self.hyper.mode.adopts_edits:
            params = [s.ref() for s in plan.layout.slots]
            self._written = edits.record(params, [local(p) for p in params])

    def _install(self, layout: Layout | None, buffers: dict[int, Buffers], state: TunerState) -> None:
        self.layout, self.buffers = layout, buffers
        if state is not self.tuner:
            self.tuner = state
        self.publish()

    # ------------------------------------------------------------------ what users read
    @property
    def scale(self) -> Tensor:
        self._fit_groups()
        return self.tuner.scale

    def stats(self) -> dict[str, Tensor]:
        out = {"scale": self.scale, "step": self.tuner.step, "skipped_steps": self.tuner.skipped}
        out.update(self._last)
        return out

    # ------------------------------------------------------------------ storage
    def _fit_groups(self) -> None:
        """With per_group=True, before the start: one tuner per param group as the optimizer has them now (a
        group added before the first step), so the scale read and the state saved fit its groups."""
        groups = len(self.optimizer.param_groups)
        if self.hyper.per_group and not self.started and self.tuner.s.shape[0] != groups:
            self.tuner = TunerState.fresh(self.hyper, self.tuner.s.dtype, self.tuner.s.device, groups)
            self._last = nan_stats(self.tuner)

    def publish(self) -> None:
        """Make the base optimizer carry Mechanic's tensors (storage.publish)."""
        self._fit_groups()
        self._published = storage.publish(self.optimizer, self.tuner, self.hyper, self.layout, self.buffers,
                                          self._published)

    def state_dict(self) -> dict[str, Any]:
        """Mechanic's own state (storage.state_dict)."""
        self.sync()
        return storage.state_dict(self.tuner, self.hyper, self.buffers)

    def load(self, sd: dict[str, Any] | None, base: Callable[[], Any] | None = None) -> None:
        """Load Mechanic's state ``sd`` (None: start afresh from the current parameters), and first, with
        ``base``, the base optimizer's (keeping the groups' "mechanic" flags); ``sd`` is checked before
        anything changes."""
        layout = self.check_state_dict(sd) if sd is not None else None
        if base is not None:
            storage.load_base(self, base)
        self._load(sd, layout)

    def load_base(self, base: Callable[[], Any]) -> None:
        """Load the base optimizer's state alone (``base``), and publish Mechanic's tensors into it again."""
        storage.load_base(self, base)
        self.publish()

    def check_add_group(self) -> None:
        """Raise if a param group cannot be added now (per_group=True after the start: its tuners are fixed)."""
        if self.hyper.per_group and self.started:
            raise ValueError(
                "per_group=True keeps one tuner per param group, fixed when Mechanic starts; a group cannot be added "
                "after the first step. Add every param group before the first step, or rebuild the optimizer and "
                "Mechanic (per_group=False takes groups at any time)")

    def check_state_dict(self, sd: dict[str, Any]) -> Layout:
        """Raise ValueError if ``sd`` (the form of ``state_dict``) cannot be loaded here; return
        the layout it would be loaded into."""
        layout = self._bind()
        check_state_dict(sd, self.hyper, [(s.index, s.ref()) for s in layout.slots], len(layout.seen), layout.num_groups)
        return layout

    @torch.no_grad()
    def _load(self, sd: dict[str, Any] | None, layout: Layout | None) -> None:
        self._plan = self.parts = self._written = None
        if sd is None:
            self.started = False
            fresh = TunerState.fresh(self.hyper, self.tuner.s.dtype, self.tuner.s.device,
                                     len(self.optimizer.param_groups))
            self._last = nan_stats(fresh)
            self._install(self.layout, {}, fresh)
            return
        assert layout is not None
        state, buffers, self.started = storage.loaded(sd, layout, self.hyper, self.options.fp32_reference)
        self._last = nan_stats(state)
        self._install(layout, buffers, state)


def _provisional(optimizer: torch.optim.Optimizer) -> tuple[torch.dtype, torch.device]:
    """The tuner's dtype and device until Mechanic binds (it moves them then if they differ)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.is_floating_point()]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return dtype, (local(params[0]).device if params else torch.device("cpu"))


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Mechanic wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                        "build the base optimizer first, e.g. torch.optim.AdamW(model.parameters())")
    check_unique(optimizer)
    check_disjoint(optimizer)
    if engine_of(optimizer) is not None:
        raise TypeError("This optimizer is already under Mechanic; wrap the base optimizer once")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("LBFGS is not supported: its step re-evaluates the closure at trial points, "
                        "which Mechanic's rebase cannot follow; use a first-order optimizer")
    storage.check_unclaimed(optimizer)
