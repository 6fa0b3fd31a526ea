"""Mechanic attached to one base optimizer: a step as a value, committed after the base step.

``prepare`` reads the layout (binding late, see layout.py), computes the local partial sums,
reduces them in ONE collective and runs the tuner update, all into an immutable ``Plan`` and
without changing anything. The base optimizer then steps; ``commit`` installs the plan and
rebases ``x = x_ref + S * Delta`` (state="delta": ``x`` from the plan's transient copy of ``x_t``).
A base step that raises drops the plan: Mechanic is as it was, with no undo code. Both user-facing
forms (``mechanize`` and the seed pair) drive this.

Where the state lives: the engine owns its tensors and *publishes* them into the base
optimizer, so that ordinary checkpoint tools see them: per-parameter buffers under
``optimizer.state[p]["mechanic_ref" | "mechanic_delta"]`` (which of them: the state mode), the
tuner's scalars and the hyperparameters under ``optimizer.param_groups[0]["mechanic_*"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from . import kernels, tuner
from .compat import dispatch_mode_active, foreach_sub, is_dtensor, local
from .layout import Buffers, Layout, bind, carry
from .options import Options
from .reduce import NoReduce, check_config
from .state import BUFFERS, DELTA, PARAM_KEYS, REF, check_state_dict, group_entries, hidden
from .tuner import TunerState

_NAN_STATS = ("h", "grad_norm", "param_norm")


def delta_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Delta is float32 for 16-bit parameters, so it holds the direction exactly."""
    return torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype


@dataclass(frozen=True)
class Update:
    """The tuner's part of a step."""

    tuner: TunerState  # after the step
    S_old: Tensor
    ok: Tensor  # the sums were finite (0-dim bool, on the device)
    # the step's one transient parameter-sized buffer, per slot: x_t - x_ref (state "ref") or a copy of
    # x_t (state "delta"); None with "ref+delta". Freed with the plan, after the rebase.
    saved: list[Tensor] | None
    skip_base: bool  # skip_nonfinite and the sums were not finite
    last: dict[str, Tensor]  # statistics for stats()


@dataclass(frozen=True)
class Plan:
    """A prepared step: what ``commit`` installs. Dropping it is the cancel."""

    layout: Layout
    buffers: dict[int, Buffers]
    started: bool
    tuner: TunerState  # the state the update started from (moved to the layout's dtype and device)
    update: Update | None  # None: an idle step (lr = 0 before Mechanic started)


class Engine:
    """The Mechanic tuner attached to one base optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, options: Options):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.options = options
        self.hyper = options.hyper
        self._kernels = kernels.compiled() if options.compile else kernels.EAGER
        self.layout: Layout | None = None
        self.buffers: dict[int, Buffers] = {}
        self.started = False
        self._checked = False  # the cross-rank configuration check ran
        self._beta: Tensor | None = None
        dtype, device = _provisional(optimizer)
        self.tuner = TunerState.fresh(self.hyper, dtype, device, len(optimizer.param_groups))
        self._plan: Plan | None = None
        self._last = _nan_stats(self.tuner)
        self._published: tuple = ()
        # per slot index: [0, <x, Delta>, 0, ||x||^2] written by the last (fused) rebase, and the (version,
        # address) of x and Delta then; the next step's sums use it while both are unchanged
        self._written: dict[int, tuple[Tensor, tuple]] = {}
        optimizer._manic_engine = self  # type: ignore[attr-defined]
        self.publish()

    # ------------------------------------------------------------------ the layout
    @property
    def params(self) -> list[Tensor]:
        """The tensors under Mechanic (empty until it binds at the first step or load)."""
        return self.layout.params if self.layout is not None else []

    @property
    def reducer(self) -> Any:
        return self.layout.reducer if self.layout is not None else None

    def _bound(self) -> tuple[Layout, dict[int, Buffers]]:
        """The layout of the optimizer as it is now, and the buffers carried over to it (pure)."""
        if self.layout is not None and self.layout.matches(self.optimizer):
            return self.layout, self.buffers
        o = self.options
        layout = bind(self.optimizer, o.reducer, o.process_group, o.device_mesh)
        if self.layout is None or not self.started:
            return layout, {}  # buffers before the start are made afresh at the start
        return layout, carry(self.layout, layout, self.buffers, self._new_buffers if self.started else None)

    def sync(self) -> None:
        """Follow a change of the param groups now (outside a step) if Mechanic holds state."""
        if self.buffers and self._plan is None:
            layout, buffers = self._bound()
            self._install(layout, buffers, self.tuner)

    def _ref_dtype(self, p: Tensor) -> torch.dtype:
        return delta_dtype(p.dtype) if self.options.fp32_reference else p.dtype

    def _new_buffers(self, p: Tensor) -> Buffers:
        keys = BUFFERS[self.hyper.state]
        with torch.no_grad():
            buf = {REF: p.detach().to(self._ref_dtype(p), copy=True)} if REF in keys else {}
            if DELTA in keys:
                buf[DELTA] = torch.zeros_like(p, dtype=delta_dtype(p.dtype))
        return buf

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def prepare(self) -> None:
        """Everything before the base step; nothing changes until ``commit``."""
        if self._plan is not None:
            raise RuntimeError("Mechanic's step was called twice without the base optimizer stepping in between; "
                               "call updater.step() after each mechanic.step()")
        self._plan = self._make_plan()

    def _make_plan(self) -> Plan:
        layout, buffers = self._bound()
        if not self._checked:
            o, h = self.options, self.hyper
            check_config({"weight_decay": h.weight_decay, "eps": h.eps, "s_init": h.s_init,
                          "num_betas": h.num_betas, "store_delta": h.store_delta, "state": h.state,
                          "variant": h.variant,
                          # the invariant form's unit: ranks (e.g. pipeline stages) with different lrs would
                          # tune in different units
                          "lr_ref": self._max_lr() if h.variant == "invariant" else None,
                          "reducer": type(layout.reducer).__name__, "per_group": h.per_group,
                          "num_groups": layout.num_groups if h.per_group else None,
                          # pipeline stages (an explicit group) hold different parameters
                          "num_params": len(layout.slots) if o.process_group is None and o.reducer is None else None},
                         group=o.process_group, params=layout.params if o.reducer is None else None,
                         reduces=not isinstance(layout.reducer, NoReduce))
            self._checked = True
        state = self.tuner.to(layout.dtype, layout.device)
        if self.hyper.per_group and state.s.shape[0] != layout.num_groups:
            if self.started:
                raise RuntimeError(
                    f"per_group=True keeps one tuner per param group, and the optimizer now has {layout.num_groups} "
                    f"groups where Mechanic started with {state.s.shape[0]}; add param groups before the first "
                    "step, or rebuild the optimizer and Mechanic")
            state = TunerState.fresh(self.hyper, layout.dtype, layout.device, layout.num_groups)
        if not layout.slots:  # every parameter is frozen
            return Plan(layout, {}, self.started, state, None)
        started = self.started
        if not started:
            # Mechanic starts at the first step with a non-zero learning rate. Before it, the
            # base update is zero, so starting later leaves the trajectory as it is; and
            # torch's lazy state initialisation (a step at lr=0 with zero gradients, used by
            # torch.distributed.checkpoint) then creates the buffers but moves nothing.
            buffers = {s.index: self._new_buffers(s.param) for s in layout.slots}
            if self._all_lr_zero():
                return Plan(layout, buffers, False, state, None)
            started = True
            if self.hyper.variant == "invariant":
                lr_ref = self._lr_refs() if self.hyper.per_group else self._lr_ref()
                state = replace(state, lr_ref=torch.tensor(lr_ref, dtype=layout.dtype, device=layout.device))
        sums, saved = self._local_sums(layout, buffers)
        sums = layout.reducer.all_reduce_sum(sums)
        new, h, ok = tuner.update(state, sums, self.hyper, self._betas(layout))
        last = {"h": h, "grad_norm": sums[..., tuner.G_SQ].sqrt(), "param_norm": sums[..., tuner.X_SQ].sqrt()}
        skip_base = self.options.skip_nonfinite and not bool(ok)  # the one host sync, by request
        if self.hyper.state == "delta" and not skip_base:  # x_t, to recover u = x_after - x_t
            saved = [local(s.ref()).clone() for s in layout.slots]  # type: ignore[arg-type]
        return Plan(layout, buffers, started, state, Update(new, state.scale, ok, saved, skip_base, last))

    def _betas(self, layout: Layout) -> Tensor:
        """The betas in the tuner's dtype on its device, built once per layout dtype and device
        (a host-to-device copy otherwise on every step)."""
        beta = self._beta
        if beta is None or beta.dtype != layout.dtype or beta.device != layout.device:
            beta = self._beta = tuner.betas(self.hyper.num_betas, layout.dtype, layout.device)
        return beta

    def _max_lr(self) -> float:
        return max(float(g.get("initial_lr", g["lr"])) for g in self.optimizer.param_groups if g.get("mechanic", True))

    def _lr_ref(self) -> float:
        """The invariant form's unit: the largest base learning rate of Mechanic's groups, before any
        schedule (torch's LR schedulers keep it as ``initial_lr``)."""
        lr = self._max_lr()
        if not (0 < lr < float("inf")):
            raise ValueError(f"Mechanic's invariant variant measures its scale in units of the base learning rate, "
                             f"but the largest lr of its param groups is {lr!r}; give the groups a finite positive "
                             "lr, or pass variant='original'")
        return lr

    def _lr_refs(self) -> list[float]:
        """per_group=True: each group's tuner in units of that group's own base learning rate (a group
        without a finite positive one, which never moves, takes the largest)."""
        largest, out = self._lr_ref(), []
        for g in self.optimizer.param_groups:
            lr = float(g.get("initial_lr", g["lr"]))
            out.append(lr if 0 < lr < float("inf") and g.get("mechanic", True) else largest)
        return out

    def _all_lr_zero(self) -> bool:
        lrs = [g.get("lr") for g in self.optimizer.param_groups if g.get("mechanic", True)]
        return all(isinstance(lr, (int, float)) and lr == 0 for lr in lrs)

    def _local_sums(self, layout: Layout, buffers: dict[int, Buffers]) -> tuple[Tensor, list[Tensor] | None]:
        slots = layout.slots
        if self.hyper.state != "ref":
            direction = {s.index: local(buffers[s.index][DELTA]) for s in slots if s.counted}
            diffs = None
        else:
            xs = [local(s.ref()) for s in slots]  # type: ignore[arg-type]
            diffs = foreach_sub(xs, [local(buffers[s.index][REF]) for s in slots])
            direction = {s.index: d for s, d in zip(slots, diffs)}
        # the last rebase's sums are of the installed layout's tensors
        written = self._written if layout is self.layout and buffers is self.buffers else {}
        if not self.hyper.per_group:
            return self._sums(slots, direction, layout, written), diffs
        return torch.stack([self._sums([slots[k] for k in ks], direction, layout, written)
                            for ks in _by_group(layout)]), diffs

    def _sums(self, slots: Any, direction: dict[int, Tensor], layout: Layout,
              written: dict[int, tuple[Tensor, tuple]]) -> Tensor:
        """This rank's partial sums over ``slots`` (G_DOT_D, X_DOT_D, G_SQ, X_SQ); x's part from ``written``
        where x and Delta are as the last rebase left them."""
        gs, gds, negate, xs, xds, known = [], [], [], [], [], []
        for s in slots:
            if not s.counted:
                continue
            p = s.ref()
            x, d = local(p), direction[s.index]
            last = written.get(s.index)
            if last is not None and last[1] == _stamp(x, d):
                known.append(last[0])
            else:
                xs.append(x)
                xds.append(d)
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError("Mechanic does not support sparse gradients; use a dense gradient "
                                   "(e.g. nn.Embedding(sparse=False))")
            gs.append(local(g))
            gds.append(d)
            negate.append(s.negate)
        sums = self._current_kernels().partial_sums(gs, gds, negate, xs, xds, layout.dtype, layout.device)
        return sums + torch.stack(known).sum(0) if known else sums

    def _current_kernels(self) -> kernels.Kernels:
        """compile=True's kernels, or the eager ones under a TorchDispatchMode (where compiled code cannot run)."""
        return kernels.EAGER if self.options.compile and dispatch_mode_active() else self._kernels

    def step_base(self, step: Callable[[], Any]) -> None:
        """Run the base step of the prepared plan, then commit it; if the base step raises,
        the plan is dropped and Mechanic stays as it was."""
        plan, self._plan = self._plan, None
        if plan is None:
            raise RuntimeError("The base optimizer is about to step without Mechanic's step before it; "
                               "call mechanic.step() before updater.step()")
        if plan.update is None or not plan.update.skip_base:
            with hidden(self.optimizer, plan.layout.params):
                step()
        self._commit(plan)

    def cancel(self) -> None:
        """Forget a prepared step."""
        self._plan = None

    @torch.no_grad()
    def _commit(self, plan: Plan) -> None:
        self.started = plan.started
        self._install(plan.layout, plan.buffers, plan.tuner)
        u = plan.update
        if u is None:
            return
        self.tuner.copy_(u.tuner)
        self._last = u.last
        if u.skip_base:
            return
        S_new, eps = u.tuner.scale, self.hyper.eps / u.tuner.lr_ref
        slots, fns = plan.layout.slots, self._current_kernels()
        groups = _by_group(plan.layout) if self.hyper.per_group else [range(len(slots))]
        for g, ks in enumerate(groups):
            if not ks:
                continue
            pick = (lambda t: t[g]) if self.hyper.per_group else (lambda t: t)  # noqa: E731
            xs = [local(slots[k].ref()) for k in ks]  # type: ignore[arg-type]
            mine = [plan.buffers[slots[k].index] for k in ks]
            saved = [u.saved[k] for k in ks] if u.saved is not None else []
            if self.hyper.state == "delta":
                ds = [local(b[DELTA]) for b in mine]
                written = fns.rebase_delta(xs, saved, ds, pick(u.S_old), pick(S_new), u.ok)
            elif self.hyper.state == "ref+delta":
                refs, ds = [local(b[REF]) for b in mine], [local(b[DELTA]) for b in mine]
                written = fns.rebase(xs, refs, ds, pick(u.S_old), pick(S_new), u.ok)
            else:
                refs = [local(b[REF]) for b in mine]
                fns.rebase_recompute(xs, refs, saved, pick(u.S_old), pick(S_new), u.ok, pick(eps))
                continue
            for k, x, d, w in zip(ks, xs, ds, written or ()):
                if w is not None:
                    self._written[slots[k].index] = (w, _stamp(x, d))

    def _install(self, layout: Layout, buffers: dict[int, Buffers], state: TunerState) -> None:
        if layout is not self.layout or buffers is not self.buffers:
            self._written = {}
        self.layout, self.buffers = layout, buffers
        if state is not self.tuner:
            self.tuner = state
        self.publish()

    # ------------------------------------------------------------------ what users read
    @property
    def scale(self) -> Tensor:
        return self.tuner.scale

    def stats(self) -> dict[str, Tensor]:
        out = {"scale": self.scale, "step": self.tuner.step, "skipped_steps": self.tuner.skipped}
        out.update(self._last)
        return out

    # ------------------------------------------------------------------ publishing
    def publish(self) -> None:
        """Make the base optimizer's state and first param group carry Mechanic's tensors
        (a no-op when nothing changed since the last call)."""
        group, state = self.optimizer.param_groups[0], self.optimizer.state
        if group.get("mechanic_s") is not self.tuner.s or group.get("mechanic_lr_ref") is not self.tuner.lr_ref:
            group.update(group_entries(self.tuner, self.hyper))
        key = (state, self.layout, self.buffers)
        if len(self._published) == 3 and all(a is b for a, b in zip(key, self._published)):
            return
        before, self._published = self._published, key
        now = {}
        if self.layout is not None:
            for s in self.layout.slots:
                if s.index in self.buffers:
                    p = s.ref()
                    state[p].update(self.buffers[s.index])
                    now[id(p)] = p
        if before and before[1] is not None:
            for s in before[1].slots:  # parameters that left: their entries lose Mechanic's buffers
                p = s.ref()
                if p is None or id(p) in now or p not in state:
                    continue
                entry = state[p]
                for k in PARAM_KEYS:
                    entry.pop(k, None)
                if not entry:
                    del state[p]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Mechanic's own state: {"state": {index: {mechanic_ref, mechanic_delta (by the state mode)}},
        "tuner": {mechanic_*}}."""
        self.sync()
        return {"state": {i: dict(b) for i, b in self.buffers.items()}, "tuner": group_entries(self.tuner, self.hyper)}

    def load_base(self, load: Callable[[], Any]) -> None:
        """Run the base optimizer's load_state_dict, keeping the groups' "mechanic" flags: torch
        replaces every group by the saved one, which may come from a run without them."""
        flags = [g.get("mechanic") for g in self.optimizer.param_groups]
        load()
        for group, flag in zip(self.optimizer.param_groups, flags):
            if flag is not None:
                group["mechanic"] = flag

    def check_state_dict(self, sd: dict[str, Any]) -> Layout:
        """Raise ValueError if ``sd`` (the form of ``state_dict``) cannot be loaded here; return
        the layout it would be loaded into."""
        o = self.options
        layout = bind(self.optimizer, o.reducer, o.process_group, o.device_mesh)
        check_state_dict(sd, self.hyper, [(s.index, s.ref()) for s in layout.slots], len(layout.seen), layout.num_groups)
        return layout

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any] | None, layout: Layout | None = None) -> None:
        """Load a checked state dict; None starts Mechanic afresh from the current parameters."""
        if sd is not None and layout is None:
            layout = self.check_state_dict(sd)  # before anything changes
        self._plan = None
        if sd is None:
            self.started = False
            fresh = TunerState.fresh(self.hyper, self.tuner.s.dtype, self.tuner.s.device,
                                     len(self.optimizer.param_groups))
            self._last = _nan_stats(fresh)
            self._install(self.layout, {}, fresh)
            return
        assert layout is not None
        state = TunerState.of({k[len("mechanic_"):]: v for k, v in sd["tuner"].items()}, layout.dtype, layout.device)
        self.started = int(state.step) > 0
        saved = sd.get("state", {})
        buffers = {}
        for s in layout.slots:
            entry, p = saved.get(s.index), s.ref()
            if entry and any(k in entry for k in PARAM_KEYS):
                buffers[s.index] = {k: self._placed(p, k, entry[k]) for k in PARAM_KEYS if k in entry}
            elif self.started:  # an empty local shard (see check_state_dict)
                buffers[s.index] = self._new_buffers(p)
        self._last = _nan_stats(state)
        self._install(layout, buffers, state)

    def _placed(self, p: Tensor, key: str, value: Tensor) -> Tensor:
        dtype = self._ref_dtype(p) if key == REF else delta_dtype(p.dtype)
        if is_dtensor(p) and not is_dtensor(value):
            raise ValueError(f"Checkpoint {key} is a plain tensor but its parameter is a DTensor; "
                             "load sharded state with torch.distributed.checkpoint")
        return value.detach().to(device=p.device, dtype=dtype, copy=True)


class TunerReadout:
    """What both user-facing forms expose of their engine."""

    _engine: Engine

    @property
    def hyper(self) -> Any:
        return self._engine.hyper

    @property
    def options(self) -> Options:
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


def _nan_stats(state: TunerState) -> dict[str, Tensor]:
    """The statistics before the first step: NaN, one per tuner."""
    return {k: torch.full(state.lr_ref.shape, float("nan"), dtype=state.s.dtype, device=state.s.device)
            for k in _NAN_STATS}


def per_group(S: Tensor, i: int) -> Tensor:
    """Group ``i``'s scale: ``S[i]`` with per_group=True, else the one scale ``S``."""
    return S[i] if S.dim() else S


def effective_lrs(S: Tensor, groups: list[dict[str, Any]], lrs: list[float] | None = None) -> list[Tensor]:
    """Per param group, ``S_i * lr`` (``lrs``, else each group's current ``lr``); a group with
    ``"mechanic": False`` keeps its ``lr``."""
    lrs = [g["lr"] for g in groups] if lrs is None else lrs
    return [per_group(S, i) * lr if g.get("mechanic", True) else torch.as_tensor(lr, dtype=S.dtype, device=S.device)
            for i, (lr, g) in enumerate(zip(lrs, groups))]


def _stamp(x: Tensor, d: Tensor) -> tuple:
    """What changes when ``x`` or ``Delta`` is written in place (autograd's version counter) or replaced
    (the address); a write through ``.data`` bypasses the counter and is not seen (docs/behaviour.md)."""
    return x._version, x.data_ptr(), d._version, d.data_ptr()


def _by_group(layout: Layout) -> list[list[int]]:
    """For each param group, the positions in ``layout.slots`` of its parameters."""
    out: list[list[int]] = [[] for _ in range(layout.num_groups)]
    for k, s in enumerate(layout.slots):
        out[s.group].append(k)
    return out


def _provisional(optimizer: torch.optim.Optimizer) -> tuple[torch.dtype, torch.device]:
    """The tuner's dtype and device until Mechanic binds (it moves them then if they differ)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.is_floating_point()]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return dtype, (local(params[0]).device if params else torch.device("cpu"))


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
