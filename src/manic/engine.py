"""Mechanic's per-step work over the local parameter shards.

A step is: local partial sums -> ONE reduce -> tuner update (``prepare``), then the base
optimizer's step, then the rebase ``x = x_ref + S * Delta`` (``finish``). Both user-facing
forms (``mechanize`` and the seed ``Mechanic``/``Updater`` pair) drive this class.

Where the state lives: the engine owns its tensors. It also *publishes* them into the base
optimizer, so that ordinary checkpoint tools see them: per-parameter buffers under
``optimizer.state[p]["mechanic_ref" | "mechanic_delta"]``, the tuner's scalars and the
hyperparameters under ``optimizer.param_groups[0]["mechanic_*"]``. While the base optimizer
steps, the buffers are hidden from parameters whose base state is otherwise empty, because
torch optimizers initialise their state lazily when ``len(state[p]) == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import kernels, tuner
from .reduce import Reducer, check_config, detect
from .state import DELTA, PARAM_KEYS, REF, check_state_dict, group_entries
from .tuner import Hyper, TunerState

try:  # DTensor parameters (FSDP2, TP): Mechanic works on the local shard.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds."""
    return t.to_local() if isinstance(t, DTensor) else t


def delta_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Delta is float32 for 16-bit parameters, so it holds the direction exactly."""
    return torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype


def mechanic_params(optimizer: torch.optim.Optimizer) -> list[tuple[int, Tensor, bool]]:
    """(state-dict index, parameter, maximize) of every parameter under Mechanic."""
    out, index = [], 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if group.get("mechanic", True):
                out.append((index, p, bool(group.get("maximize", False))))
            index += 1
    return out


@dataclass
class _Pending:
    """A prepared step: applied by ``finish``, or forgotten by ``cancel`` as if never taken."""

    rollback: tuple  # (buffers, started, published state) before the step
    S_old: Tensor | None = None  # None: an idle step (see Engine.prepare)
    tuner: TunerState | None = None  # the tuner after the step, committed by finish
    ok: Tensor | None = None  # the sums were finite (0-dim bool, on the device)
    diffs: list[Tensor] | None = None  # x_t - x_ref (store_delta=False only)
    skip_base: bool = False  # skip_nonfinite and the sums were not finite
    last: dict[str, Tensor] | None = None  # statistics for stats()


class Engine:
    """The Mechanic tuner attached to one base optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, hyper: Hyper, *, reducer: Reducer | None = None,
                 process_group: Any = None, device_mesh: Any = None, skip_nonfinite: bool = False,
                 compile: bool = False, fp32_reference: bool = False):
        _check_optimizer(optimizer)
        if reducer is not None:
            if not callable(getattr(reducer, "all_reduce_sum", None)):
                raise TypeError(f"Invalid reducer: {reducer!r}; pass an object with all_reduce_sum(tensor) -> tensor")
            if process_group is not None or device_mesh is not None:
                raise ValueError("Pass one of reducer=, process_group= and device_mesh=")
        for name, flag in (("skip_nonfinite", skip_nonfinite), ("compile", compile),
                           ("fp32_reference", fp32_reference)):
            if not isinstance(flag, bool):
                raise TypeError(f"Invalid {name}: {flag!r}; pass True or False")
        self._kernels = kernels.compiled() if compile else kernels.EAGER
        self.optimizer = optimizer
        self.hyper = hyper
        self.skip_nonfinite = skip_nonfinite
        self.fp32_reference = fp32_reference
        self._reduce_args = (reducer, process_group, device_mesh)
        self._index_params()
        check_config({"weight_decay": hyper.weight_decay, "eps": hyper.eps, "s_init": hyper.s_init,
                      "num_betas": hyper.num_betas, "store_delta": hyper.store_delta,
                      "reducer": type(self.reducer).__name__,
                      # pipeline stages (an explicit group) hold different parameters
                      "num_params": len(self._params) if process_group is None and reducer is None else None},
                     group=process_group)
        first = self._params[0]
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        self.device = local(first).device
        self.tuner = TunerState.fresh(hyper, self.dtype, self.device)
        self._beta = tuner.betas(hyper.num_betas, self.dtype, self.device)
        self._buf: dict[Tensor, dict[str, Tensor]] = {}
        self._started = False
        self._pending: _Pending | None = None
        self._last: dict[str, Tensor] = {}
        self._published_state: Any = None
        self._published_group: Any = None
        self._bare: list[Tensor] = []
        optimizer._manic_engine = self  # type: ignore[attr-defined]
        self.publish()

    # ------------------------------------------------------------------ parameters
    def _index_params(self) -> None:
        entries = mechanic_params(self.optimizer)
        if not entries:
            raise ValueError("The optimizer has no parameters under Mechanic; pass an optimizer with parameters "
                             "(a param group with 'mechanic': False takes no part)")
        devices = {local(p).device for _, p, _ in entries}
        if len(devices) > 1:
            raise ValueError(f"Parameters under Mechanic live on several devices {sorted(map(str, devices))}; "
                             "Mechanic needs them on one device (use one optimizer per device)")
        for i, p, _ in entries:
            if p.is_complex():
                raise TypeError(f"Parameter {i} is complex ({p.dtype}); Mechanic supports real floating-point "
                                "parameters only (view it as real with torch.view_as_real)")
            if not p.is_floating_point():
                raise TypeError(f"Parameter {i} has dtype {p.dtype}; Mechanic needs floating-point parameters")
        self._entries = entries
        self._params = [p for _, p, _ in entries]
        self._num_params = sum(len(g["params"]) for g in self.optimizer.param_groups)
        reducer, process_group, device_mesh = self._reduce_args
        if reducer is not None:
            self.reducer, counted = reducer, [True] * len(self._params)
        else:
            self.reducer, counted = detect(self._params, process_group, device_mesh)
        # this rank adds these to the sums (a replicated parameter counts once), and negates
        # the gradient of those whose base optimizer maximizes
        self._counted = [(p, negate) for (_, p, negate), c in zip(entries, counted) if c]

    def params_added(self) -> None:
        """Bring parameters added by ``add_param_group`` under Mechanic."""
        old = set(self._buf)
        self._index_params()
        if self._started:
            with torch.no_grad():
                for p in self._params:
                    if p not in old:
                        self._buf[p] = self._new_buffers(p)
        self.publish(full=True)

    def _check_unchanged(self) -> None:
        n = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n != self._num_params:
            raise RuntimeError(f"The base optimizer now has {n} parameters, {self._num_params} when Mechanic was "
                               "attached; add parameter groups through the mechanized optimizer's add_param_group")

    # ------------------------------------------------------------------ the step
    def _all_lr_zero(self) -> bool:
        lrs = [g.get("lr") for g in self.optimizer.param_groups if g.get("mechanic", True)]
        return all(isinstance(lr, (int, float)) and lr == 0 for lr in lrs)

    def _ref_dtype(self, p: Tensor) -> torch.dtype:
        return delta_dtype(p.dtype) if self.fp32_reference else p.dtype

    def _new_buffers(self, p: Tensor) -> dict[str, Tensor]:
        buf = {REF: p.detach().to(self._ref_dtype(p), copy=True)}
        if self.hyper.store_delta:
            buf[DELTA] = torch.zeros_like(p, dtype=delta_dtype(p.dtype))
        return buf

    @torch.no_grad()
    def prepare(self) -> None:
        """Everything before the base step: partial sums, the one reduce, the tuner update.
        Nothing is committed until ``finish``: a step that fails leaves Mechanic as it was."""
        if self._pending is not None:
            raise RuntimeError("Mechanic's step was called twice without the base optimizer stepping in between; "
                               "call updater.step() after each mechanic.step()")
        self._check_unchanged()
        rollback = (self._buf, self._started, self._published_state)
        try:
            self._pending = self._prepare(rollback)
        except BaseException:
            self._buf, self._started, self._published_state = rollback
            raise

    def _prepare(self, rollback: tuple) -> _Pending:
        if not self._started:
            # Mechanic starts at the first step with a non-zero learning rate. Before it, the
            # base update is zero, so starting later leaves the trajectory as it is; and
            # torch's lazy state initialisation (a step at lr=0 with zero gradients, used by
            # torch.distributed.checkpoint) then creates the buffers but moves nothing.
            self._buf = {p: self._new_buffers(p) for p in self._params}
            self._published_state = None
            if self._all_lr_zero():
                return _Pending(rollback)
            self._started = True
        sums, diffs = self._local_sums()
        sums = self.reducer.all_reduce_sum(sums)
        new, h, ok = tuner.update(self.tuner, sums, self.hyper, self._beta)
        last = {"h": h, "grad_norm": sums[tuner.G_SQ].sqrt(), "param_norm": sums[tuner.X_SQ].sqrt()}
        # skip_nonfinite: the one host sync, by request
        skip_base = self.skip_nonfinite and not bool(ok)
        return _Pending(rollback, self.tuner.s.sum(), new, ok, diffs, skip_base, last)

    def _local_sums(self) -> tuple[Tensor, list[Tensor] | None]:
        buf = self._buf
        if self.hyper.store_delta:
            direction = {p: local(buf[p][DELTA]) for p, _ in self._counted}
            diffs = None
        else:
            xs = [local(p) for p in self._params]
            diffs = torch._foreach_sub(xs, [local(buf[p][REF]) for p in self._params])
            direction = dict(zip(self._params, diffs))
        gs, gds, negate = [], [], []
        for p, neg in self._counted:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError("Mechanic does not support sparse gradients; use a dense gradient "
                                   "(e.g. nn.Embedding(sparse=False))")
            gs.append(local(g))
            gds.append(direction[p])
            negate.append(neg)
        xs = [local(p) for p, _ in self._counted]
        xds = [direction[p] for p, _ in self._counted]
        sums = self._kernels.partial_sums(gs, gds, negate, xs, xds, self.dtype, self.device)
        return sums, diffs

    def step_base(self, step: Callable[[], Any]) -> None:
        """Run the prepared step's base step, then the rebase; if the base step raises, the
        prepared step is forgotten (``cancel``) and Mechanic stays as it was."""
        if self._pending is None:
            raise RuntimeError("The base optimizer is about to step without Mechanic's step before it; "
                               "call mechanic.step() before updater.step()")
        if not self._pending.skip_base:
            try:
                self._run_base_step(step)
            except BaseException:
                self.cancel()
                raise
        self.finish()

    def _run_base_step(self, step: Callable[[], Any]) -> None:
        """Mechanic's buffers are hidden where they would make the base think it had
        already initialised a parameter's state."""
        self.publish(full=False)
        state = self.optimizer.state
        for p in self._bare:
            for k in PARAM_KEYS:
                state[p].pop(k, None)
        try:
            step()
        finally:
            self.publish(full=False)

    @torch.no_grad()
    def finish(self) -> None:
        """Everything after the base step: x = x_ref + S_new * (D + u)."""
        pending, self._pending = self._pending, None
        if pending.S_old is None:
            return
        self.tuner.copy_(pending.tuner)
        self._last = pending.last
        if pending.skip_base:
            return
        S_old, S_new, ok = pending.S_old, pending.tuner.s.sum(), pending.ok
        xs = [local(p) for p in self._params]
        refs = [local(self._buf[p][REF]) for p in self._params]
        if self.hyper.store_delta:
            ds = [local(self._buf[p][DELTA]) for p in self._params]
            self._kernels.rebase(xs, refs, ds, S_old, S_new, ok)
        else:
            self._kernels.rebase_recompute(xs, refs, pending.diffs, S_old, S_new, ok, self.hyper.eps)

    def cancel(self) -> None:
        """Forget a prepared step whose base step failed: Mechanic is as it was before it."""
        pending, self._pending = self._pending, None
        if pending is None or pending.rollback[0] is self._buf:
            return
        # the step had created the buffers (a first step): take them back out of the base's state
        state = self.optimizer.state
        for p in self._params:
            if p in state:
                for k in PARAM_KEYS:
                    state[p].pop(k, None)
        self._buf, self._started, _ = pending.rollback
        self._published_state = None
        self.publish()

    # ------------------------------------------------------------------ what users read
    @property
    def scale(self) -> Tensor:
        return self.tuner.s.sum()

    def stats(self) -> dict[str, Tensor]:
        out = {"scale": self.scale, "step": self.tuner.step, "skipped_steps": self.tuner.skipped}
        out.update(self._last)
        return out

    # ------------------------------------------------------------------ publishing
    def publish(self, full: bool = True) -> None:
        """Make the base optimizer's state and first param group carry Mechanic's tensors."""
        group = self.optimizer.param_groups[0]
        if group is not self._published_group or group.get("mechanic_s") is not self.tuner.s:
            group.update(group_entries(self.tuner, self.hyper))
            self._published_group = group
        state = self.optimizer.state
        if state is not self._published_state:
            full, self._published_state = True, state
        if not self._buf:
            self._bare = []
            return
        for p in self._params if full else self._bare:
            state[p].update(self._buf[p])
        candidates = self._params if full else self._bare
        self._bare = [p for p in candidates if len(state[p]) == len(self._buf[p])]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Mechanic's own state: {"state": {index: {mechanic_ref, mechanic_delta}}, "tuner": {mechanic_*}}."""
        return {"state": {i: dict(self._buf[p]) for i, p, _ in self._entries if p in self._buf},
                "tuner": group_entries(self.tuner, self.hyper)}

    def load_base(self, load: Callable[[], Any]) -> None:
        """Run the base optimizer's load_state_dict, keeping the groups' "mechanic" flags: torch
        replaces every group by the saved one, which may come from a run without them."""
        flags = [g.get("mechanic") for g in self.optimizer.param_groups]
        load()
        for group, flag in zip(self.optimizer.param_groups, flags):
            if flag is not None:
                group["mechanic"] = flag

    def check_state_dict(self, sd: dict[str, Any]) -> None:
        """Raise ValueError if ``sd`` (the form of ``state_dict``) cannot be loaded here."""
        check_state_dict(sd, self.hyper, self._entries)

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        """Load a checked state dict; None starts Mechanic afresh from the current parameters."""
        if sd is not None:
            self.check_state_dict(sd)  # before anything changes
        self._pending = None
        self._last = {}
        if sd is None:
            self.tuner.copy_(TunerState.fresh(self.hyper, self.dtype, self.device))
            self._buf, self._started = {}, False
        else:
            t = sd["tuner"]
            for k, dst in self.tuner.tensors().items():
                dst.copy_(t[f"mechanic_{k}"])
            state = sd.get("state", {})
            buf = {}
            self._started = int(self.tuner.step) > 0
            for i, p, _ in self._entries:
                entry = state.get(i)
                if entry and REF in entry:
                    buf[p] = {k: self._placed(p, k, entry[k]) for k in PARAM_KEYS if k in entry}
                elif self._started:  # an empty local shard (see check_state_dict)
                    buf[p] = self._new_buffers(p)
            self._buf = buf
        self._published_state = None
        self.publish()

    def _placed(self, p: Tensor, key: str, value: Tensor) -> Tensor:
        dtype = self._ref_dtype(p) if key == REF else delta_dtype(p.dtype)
        if isinstance(p, DTensor) and not isinstance(value, DTensor):
            raise ValueError(f"Checkpoint {key} is a plain tensor but its parameter is a DTensor; "
                             "load sharded state with torch.distributed.checkpoint")
        return value.detach().to(device=p.device, dtype=dtype, copy=True)


class TunerReadout:
    """What both user-facing forms expose of their engine."""

    _engine: Engine

    @property
    def hyper(self) -> Hyper:
        return self._engine.hyper

    @property
    def scale(self) -> Tensor:
        """The current scale S (sum of the per-beta scales), a 0-dim tensor on the device."""
        return self._engine.scale

    def stats(self) -> dict[str, Tensor]:
        """Tuner statistics for logging (0-dim tensors; reading them syncs, the step does not)."""
        return self._engine.stats()


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Mechanic wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                        "build the base optimizer first, e.g. torch.optim.AdamW(model.parameters())")
    if getattr(optimizer, "_manic_engine", None) is not None or hasattr(optimizer, "_engine"):
        raise TypeError("This optimizer is already under Mechanic; wrap the base optimizer once")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("LBFGS is not supported: its step re-evaluates the closure at trial points, "
                        "which Mechanic's rebase cannot follow; use a first-order optimizer")
    for group in optimizer.param_groups:
        clash = [k for k in group if k.startswith("mechanic_")]
        if clash:
            raise ValueError(f"The base optimizer's param group already has keys {clash}; Mechanic reserves "
                             "the prefix 'mechanic_'")
    for st in optimizer.state.values():
        clash = [k for k in st if isinstance(k, str) and k.startswith("mechanic_")]
        if clash:
            raise ValueError(f"The base optimizer's state already has keys {clash}; Mechanic reserves the "
                             "prefix 'mechanic_'")
