"""``mechanize``: Mechanic as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .engine import Engine, TunerReadout
from .state import strip_mechanic
from .reduce import Reducer
from .tuner import Hyper


class Mechanized(TunerReadout, torch.optim.Optimizer):
    """A base optimizer whose accumulated updates Mechanic scales.

    ``param_groups`` and ``state`` ARE the base optimizer's, so LR schedulers, gradient
    scalers and checkpoint tools built on either object see the same thing.
    """

    # GradScaler must unscale the gradients before step(): Mechanic's sums need them unscaled.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, *, weight_decay: float = 1e-2, eps: float = 1e-8,
                 s_init: float = 1e-6, num_betas: int = 6, store_delta: bool = True,
                 reducer: Reducer | None = None, process_group: Any = None, device_mesh: Any = None,
                 skip_nonfinite: bool = False, compile: bool = False, fp32_reference: bool = False) -> None:
        hyper = Hyper(weight_decay=weight_decay, eps=eps, s_init=s_init, num_betas=num_betas, store_delta=store_delta)
        self._base = optimizer
        self._engine = Engine(optimizer, hyper, reducer=reducer, process_group=process_group, device_mesh=device_mesh,
                              skip_nonfinite=skip_nonfinite, compile=compile, fp32_reference=fp32_reference)
        # The hook registries and step profiling that torch.optim.Optimizer.__init__ sets up;
        # parameters, state and defaults stay the base optimizer's.
        super().__setstate__({})

    # The base optimizer replaces these objects when it loads a state dict: always read through.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._base.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._base.state

    @state.setter
    def state(self, value: Any) -> None:
        self._base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._base.defaults = value

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self._base

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._engine.prepare()
        self._engine.step_base(self._step_base)
        return loss

    def _step_base(self) -> None:
        base = self._base
        step = type(base).step
        inner = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
        if inner is None:
            base.step()
            return
        # torch wraps every Optimizer.step to run the global step hooks and the instance's
        # own; the global ones already ran for this optimizer, so run only the base's.
        for hook in base._optimizer_step_pre_hooks.values():
            hook(base, (), {})
        inner(base)
        for hook in base._optimizer_step_post_hooks.values():
            hook(base, (), {})
        base._opt_called = True  # type: ignore[attr-defined]  # for an LR scheduler built on the base

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its parameters come under Mechanic (unless
        the group says ``"mechanic": False``) with their current values as reference."""
        self._base.add_param_group(param_group)
        self._engine.params_added()

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._engine.publish(full=False)
        state_dict = self._base.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this form, or a plain base-optimizer one (Mechanic then
        starts afresh from the loaded point). Nothing changes if the state does not fit."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        base_sd, mechanic_sd = strip_mechanic(state_dict)
        if mechanic_sd is not None:
            self._engine.check_state_dict(mechanic_sd)
        self._engine.load_base(lambda: self._base.load_state_dict(base_sd))
        self._engine.load_state_dict(mechanic_sd)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # Like torch.optim.Optimizer: no hooks, and not the step wrapper an LR scheduler put on
        # this instance (it points back at this object).
        return {k: v for k, v in self.__dict__.items()
                if k not in ("step", "_opt_called") and not k.startswith("_optimizer_")}

    def __repr__(self) -> str:
        h = self._engine.hyper
        base = "\n".join("    " + line for line in repr(self._base).splitlines()).lstrip()
        return (f"Mechanized(\n    {base},\n    weight_decay={h.weight_decay}, eps={h.eps}, s_init={h.s_init}, "
                f"num_betas={h.num_betas}, store_delta={h.store_delta},\n    reducer={self._engine.reducer!r}\n)")


def mechanize(optimizer: torch.optim.Optimizer, *, weight_decay: float = 1e-2, eps: float = 1e-8,
              s_init: float = 1e-6, num_betas: int = 6, store_delta: bool = True,
              reducer: Reducer | None = None, process_group: Any = None, device_mesh: Any = None,
              skip_nonfinite: bool = False, compile: bool = False, fp32_reference: bool = False) -> Mechanized:
    """Wrap ``optimizer`` so that Mechanic tunes the scale of its updates.

    Returns a ``torch.optim.Optimizer``; use it wherever the base optimizer was used.
    """
    return Mechanized(optimizer, weight_decay=weight_decay, eps=eps, s_init=s_init, num_betas=num_betas,
                      store_delta=store_delta, reducer=reducer, process_group=process_group,
                      device_mesh=device_mesh, skip_nonfinite=skip_nonfinite,
                      compile=compile, fp32_reference=fp32_reference)
