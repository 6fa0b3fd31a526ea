"""``mechanize``: Mechanic as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .apidoc import api_doc
from .compat import disable_dynamo, init_optimizer_hooks, is_optimizer_internal, step_with_own_hooks
from .engine import Engine
from .options import Options, with_options_signature
from .readout import TunerReadout
from .state import strip_mechanic
from .storage import check_base_state


@api_doc(readouts=True)
class Mechanized(TunerReadout, torch.optim.Optimizer):
    """A base optimizer whose accumulated updates Mechanic scales (what ``manic.mechanize`` returns).

    ``param_groups`` and ``state`` ARE the base optimizer's, so LR schedulers, gradient
    scalers and checkpoint tools built on either object see the same thing.

    Readouts:
        base_optimizer: the wrapped optimizer.
    """

    # GradScaler must unscale the gradients before step(): Mechanic's sums need them unscaled.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, options: Options | None = None, **kwargs: Any) -> None:
        if options is None:
            options = Options.from_kwargs("mechanize", kwargs)
        elif kwargs:
            raise TypeError("Pass Mechanic's options as options= or as keywords, not both")
        self._base = optimizer
        self._engine = Engine(optimizer, options)
        # Not Optimizer.__init__: it would rebuild param_groups, state and defaults, which here ARE the base's
        # (it would empty the base's groups and add copies); so the hooks it sets up, and the state-dict
        # hooks below, are run as torch runs them (tests/test_optimizer.py compares them with torch's).
        init_optimizer_hooks(self)

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
                loss = closure()  # the gradients at x_t, which Mechanic's sums need
        self._engine.prepare()
        base_closure = None if closure is None else _once(closure, loss, [p for g in self.param_groups
                                                                         for p in g["params"]])
        # the global step hooks already ran for this optimizer: run only the base's own
        self._engine.step_base(lambda: step_with_own_hooks(self._base, base_closure))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its parameters come under Mechanic (unless
        the group says ``"mechanic": False``) with their current values as reference."""
        self._engine.check_add_group()
        self._base.add_param_group(param_group)
        self._engine.sync()

    @disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._engine.sync()
        self._engine.publish()
        state_dict = self._base.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this form, or a plain base-optimizer one (Mechanic then
        starts afresh from the loaded point). Nothing changes if the state does not fit."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        base_sd, mechanic_sd = strip_mechanic(state_dict)
        check_base_state(self._base, base_sd)
        self._engine.load(mechanic_sd, base=lambda: self._base.load_state_dict(base_sd))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # Like torch.optim.Optimizer: no hooks, and not the step wrapper an LR scheduler put on
        # this instance (it points back at this object).
        return {k: v for k, v in self.__dict__.items() if not is_optimizer_internal(k)}

    def __repr__(self) -> str:
        h = self._engine.hyper
        reducer = repr(self._engine.reducer) if self._engine.layout is not None else "(chosen at the first step)"
        base = "\n".join("    " + line for line in repr(self._base).splitlines()).lstrip()
        return (f"Mechanized(\n    {base},\n    weight_decay={h.weight_decay}, eps={h.eps}, s_init={h.s_init}, "
                f"num_betas={h.num_betas}, store_delta={h.store_delta}, state={h.state!r},\n    reducer={reducer}\n)")


def _once(closure: Callable[[], Any], loss: Any, params: list[torch.Tensor]) -> Callable[[], Any]:
    """The closure for the base step: while the parameters are as they were when ``closure`` ran, its
    first call returns that loss (a first-order base calls it first, at x_t: no second evaluation);
    a base that moves the parameters before calling it (SAM) gets a real evaluation there."""
    versions = [p._version for p in params]
    fresh = [True]

    def call() -> Any:
        if fresh[0] and all(p._version == v for p, v in zip(params, versions)):
            fresh[0] = False
            return loss
        fresh[0] = False
        with torch.enable_grad():
            return closure()

    return call


@with_options_signature
@api_doc(options=True, readouts=True)
def mechanize(optimizer: torch.optim.Optimizer, **options: Any) -> Mechanized:
    """Wrap ``optimizer`` so that Mechanic tunes the scale of its updates.

    Mechanic reads which parameters it works on from ``optimizer.param_groups`` at its first step (or
    load), so frameworks may replace them until then. The keywords are the fields of ``manic.Options``;
    docs/options.md explains each at length.

    Args:
        optimizer: the base optimizer, a first-order ``torch.optim.Optimizer`` (build it after wrapping or
            sharding the model). A param group with ``"mechanic": False`` keeps its own lr.

    Returns:
        Mechanized: a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the base
        optimizer's; use it wherever the base optimizer was used (LR schedulers, GradScaler,
        ``state_dict()``, DCP).

    Raises:

    Readouts:
        base_optimizer: the optimizer passed in.
    """
    return Mechanized(optimizer, Options.from_kwargs("mechanize", options))
