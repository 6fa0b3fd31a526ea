"""What each rank runs in test_accelerate_fsdp2.py (importable by forkserver workers).

accelerate enables FSDP only on GPUs, so ``prepare_fsdp2`` replays ``Accelerator._prepare_fsdp2``
(accelerate 1.16) for a (model, optimizer) pair on CPU, step for step, calling accelerate's own
code wherever it exists (``Accelerator.prepare_optimizer``, ``Accelerator._get_named_parameters``,
``fsdp2_canonicalize_names``, ``_get_parameter_id``, ``fsdp2_switch_optimizer_parameters``, the
plugin's fully_shard arguments) and copying the rest verbatim (the placeholder loop, the mapping).
The point: the optimizer, and so Mechanic, is built on the full-size parameters, which accelerate
then replaces under it by their sharded DTensors.

Every check is recorded by name ("ok" or why not) rather than raised, so that one run of the
2-rank group reports all of them; a stage that cannot run because an earlier one raised says so.
"""

from __future__ import annotations

import gc
import os
import traceback
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import manic
import scenarios

STEPS = 40  # before the checkpoint
AFTER = 10  # after it
S_INIT = 1e-6


# ----------------------------------------------------------------------------- accelerate
def make_accelerator(rank: int, world: int) -> Any:
    """A real ``Accelerator`` on the harness's already initialised gloo group (MULTI_CPU: it
    reads the launcher's environment and, the group being up, does not initialise another)."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world and accelerator.process_index == rank, accelerator.state
    return accelerator


def fsdp2_plugin() -> Any:
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")


def prepare_fsdp2(accelerator: Any, plugin: Any, model: scenarios.Net, optimizer: torch.optim.Optimizer
                  ) -> tuple[scenarios.Net, torch.optim.Optimizer]:
    """``Accelerator._prepare_fsdp2(model, optimizer)``, in its order; returns (model, the
    AcceleratedOptimizer)."""
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names, fsdp2_switch_optimizer_parameters
    from accelerate.utils.modeling import _get_parameter_id
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # First pass: the optimizer is wrapped in an AcceleratedOptimizer (device_placement=True, the
    # default: a state_dict() / load_state_dict() round trip on the optimizer, before any step).
    result: list[Any] = [model, accelerator.prepare_optimizer(optimizer)]
    # (no scheduler, activation checkpointing or compile here)

    # Get old params and canonicalize - we canonicalize to have the mapping easy
    old_named_params = fsdp2_canonicalize_names(accelerator._get_named_parameters(*tuple(result), drop_refs=True))

    # Swap the optimizer parameters with empty, so `fully_shard` after will not allocate too much memory
    for obj in result:
        if isinstance(obj, torch.optim.Optimizer):
            for param_group in obj.param_groups:
                for i, p in enumerate(param_group["params"]):
                    # We drop a reference to the original param here, so that _move_states_to_device triggers a reallocation
                    # Keep a key to match each original parameter to its sharded replacement.
                    param_group["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
                    param_group["params"][i].data_ptr = _get_parameter_id(p)

    accelerator._models.append(model)

    # fsdp2_prepare_model: the wrapped units bottom-up with the plugin's arguments, then the root
    # with reshard_after_forward left to torch's heuristic
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(), "mesh": None}
    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer, **kwargs)
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})

    # Get new params and canonicalize
    new_named_params = fsdp2_canonicalize_names(accelerator._get_named_parameters(*result))
    # Build a map from old to new params and handle missings gracefully
    mapping = {}
    missing_params = []
    for n, p in old_named_params.items():
        if n in new_named_params:
            mapping[p] = new_named_params[n]
        else:
            missing_params.append(n)
    if missing_params:
        raise KeyError(f"Parameters missing after FSDP2 wrapping: {missing_params}")

    # Update the optimizer parameters
    for obj in result:
        if isinstance(obj, torch.optim.Optimizer):
            fsdp2_switch_optimizer_parameters(obj, mapping)
    return result[0], result[1]


def prepared(accelerator: Any, plugin: Any, seed: int) -> tuple[scenarios.Net, Any, manic.Mechanized, list]:
    """A model built and mechanized like a user would before ``accelerator.prepare``, then
    prepared; also weak references to its original full-size parameters."""
    model = scenarios.make_net(seed)
    full_size = [weakref.ref(p) for p in model.parameters()]
    mech = manic.mechanize(scenarios.base(model.parameters()), s_init=S_INIT)
    model, opt = prepare_fsdp2(accelerator, plugin, model, mech)
    return model, opt, mech, full_size


# ----------------------------------------------------------------------------- runs
def train(model: nn.Module, opt: torch.optim.Optimizer, mech: manic.Mechanized, steps: int,
          counts: list | None = None) -> list[float]:
    """scenarios.train through accelerate's optimizer ``opt``, reading the scale of ``mech``."""
    return scenarios.train(model, opt, steps, counts=counts, readout=mech, names=True)


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [scenarios.full(p).clone() for p in model.parameters()]


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def holders(obj: Any) -> list[str]:
    """What refers to ``obj`` (for the failure message), one level up and, for containers, two."""
    out = []
    for r in gc.get_referrers(obj):
        if type(r).__name__ == "frame":
            continue
        if isinstance(r, (list, dict, tuple, set)):
            up = [type(u).__name__ for u in gc.get_referrers(r) if type(u).__name__ != "frame"][:4]
            out.append(f"{type(r).__name__} held by {up}")
        else:
            out.append(type(r).__name__)
    return out


def dead(refs: list) -> str:
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    if not alive:
        return "ok"
    obj = refs[alive[0]]()
    held = holders(obj)  # (slow: only the first)
    del obj
    return f"full-size parameters {alive} of {len(refs)} are still referenced; the first by {held}"


class Checks:
    def __init__(self) -> None:
        self.results: dict[str, str] = {}

    def record(self, name: str, ok: bool, why: str = "") -> None:
        self.results[name] = "ok" if ok else why

    def stage(self, names: list[str], fn: Callable[[], Any]) -> Any:
        """Run ``fn``; if it raises, every check in ``names`` not yet recorded gets the traceback."""
        try:
            return fn()
        except Exception:  # noqa: BLE001 - reported, per check
            tb = traceback.format_exc(limit=-4)  # the innermost frames
            for n in names:
                self.results.setdefault(n, f"raised:\n{tb}")
            return None


CHECKS = ("control", "identity", "counts", "scale_grows", "trajectory", "state_bytes", "no_full_size_refs",
          "state_dict", "dcp_resume")


def run(rank: int, world: int, ckpt: str) -> dict:
    torch.manual_seed(0)
    accelerator = make_accelerator(rank, world)
    plugin = fsdp2_plugin()
    checks = Checks()

    # control: a plain AdamW through the same preparation ends on the sharded parameters and
    # keeps none of the full-size ones (so the checks below test Mechanic, not the replay)
    def control() -> None:
        model = scenarios.make_net(0)
        refs = [weakref.ref(p) for p in model.parameters()]
        model, opt = prepare_fsdp2(accelerator, plugin, model, scenarios.base(model.parameters()))
        mine = [p for g in opt.param_groups for p in g["params"]]
        same = len(mine) == len(list(model.parameters())) and all(a is b for a, b in zip(mine, model.parameters()))
        gone = dead(refs)
        checks.record("control", same and gone == "ok",
                      f"plain AdamW: optimizer on the model's parameters {same}; {gone}")
        accelerator._optimizers.clear()
        accelerator._models.clear()

    checks.stage(["control"], control)

    # the run under test
    model, opt, mech, full_size = checks.stage(list(CHECKS), lambda: prepared(accelerator, plugin, 0)) or (None,) * 4
    counts: list = []
    scales = checks.stage(list(CHECKS), lambda: train(model, opt, mech, STEPS, counts)) if model is not None else None
    out: dict[str, Any] = {"scales": scales, "counts": [(len(n), s) for n, s in counts]}

    if scales is not None:
        def identity() -> None:
            params = list(model.parameters())
            from torch.distributed.tensor import DTensor

            assert all(isinstance(p, DTensor) for p in params), "the model's parameters are not DTensors"
            keyed = [p for p, st in mech.state.items() if any(isinstance(k, str) and k.startswith("mechanic_")
                                                               for k in st)]
            mine = {id(p) for p in params}
            extra = [f"{type(p).__name__}{tuple(p.shape)}" for p in keyed if id(p) not in mine]
            missing = [i for i, p in enumerate(params) if not any(p is q for q in keyed)]
            engine_params = getattr(mech._engine, "params", None)
            same = (engine_params is not None and len(engine_params) == len(params)
                    and all(a is b for a, b in zip(engine_params, params)))
            described = (None if engine_params is None else
                         [f"{type(p).__name__}{tuple(p.shape)}" for p in engine_params])
            checks.record("identity", not extra and not missing and same,
                          f"opt.state entries with mechanic_* keys that are not model parameters: {extra}; model "
                          f"parameters without them: {missing}; opt._engine.params is the model's parameters: {same} "
                          f"(opt._engine.params = {described})")

        checks.stage(["identity"], identity)
        bad = [(i, names, syncs) for i, (names, syncs) in enumerate(counts) if i > 0 and not (
            len(names) == 1 and "allreduce" in names[0].replace("_", "") and syncs == 0)]
        checks.record("counts", not bad, f"steps 1.. should issue exactly one all-reduce and no host sync; "
                                         f"(step, collectives, host syncs) that do not: {bad[:5]}")
        checks.record("scale_grows", scales[-1] > 100 * S_INIT,
                      f"the scale went from {S_INIT} to {scales[-1]} in {STEPS} steps (want > 100x)")

        def trajectory() -> None:
            ref_model = scenarios.shard2(scenarios.make_net(0))
            ref_opt = manic.mechanize(scenarios.base(ref_model.parameters()), s_init=S_INIT)
            ref_scales = train(ref_model, ref_opt, ref_opt, STEPS)
            worst_s = max(abs(a - b) / b for a, b in zip(scales, ref_scales))
            worst_p = max(scenarios.rel(a, b) for a, b in zip(full_params(model), full_params(ref_model)))
            out["trajectory"] = {"scale_rel": worst_s, "params_rel": worst_p, "ref_final_scale": ref_scales[-1]}
            checks.record("trajectory", worst_s <= 1e-9 and worst_p <= 1e-9,
                          f"vs mechanize(AdamW) built after sharding: scale rel {worst_s:.3e}, params rel "
                          f"{worst_p:.3e} (final scale {scales[-1]:.6g} vs {ref_scales[-1]:.6g})")

        checks.stage(["trajectory"], trajectory)

        def state_bytes() -> None:
            have = sum(scenarios.manic_bytes(mech))
            want = 2 * sum(local_bytes(p) for p in model.parameters())
            out["state_bytes"] = (have, want)
            checks.record("state_bytes", have == want,
                          f"Mechanic's state on rank {rank} is {have} bytes; 2x the local shards is {want}")

        checks.stage(["state_bytes"], state_bytes)
        gone = dead(full_size)
        checks.record("no_full_size_refs", gone == "ok", gone)

        def state_dict() -> None:
            sd = mech.state_dict()
            n = len(list(model.parameters()))
            with_buffers = sorted(k for k, v in sd["state"].items() if "mechanic_ref" in v and "mechanic_delta" in v)
            ok = with_buffers == list(range(n)) and "mechanic_s" in sd["param_groups"][0]
            opt.state_dict()  # through the AcceleratedOptimizer too
            checks.record("state_dict", ok, f"state_dict(): parameters with Mechanic buffers {with_buffers} of {n}; "
                                            f"tuner in param_groups[0]: {'mechanic_s' in sd['param_groups'][0]}")

        checks.stage(["state_dict"], state_dict)

        def dcp_resume() -> None:
            from accelerate.utils.fsdp_utils import (load_fsdp_model, load_fsdp_optimizer, save_fsdp_model,
                                                     save_fsdp_optimizer)

            # Accelerator.save_state / load_state under FSDP2: DCP with get/set_{model,optimizer}_state_dict
            save_fsdp_model(plugin, accelerator, model, ckpt)
            save_fsdp_optimizer(plugin, accelerator, opt, model, ckpt)
            cont = train(model, opt, mech, AFTER)
            cont_params = full_params(model)
            model2, opt2, mech2, _ = prepared(accelerator, plugin, 1)
            load_fsdp_model(plugin, accelerator, model2, ckpt)
            load_fsdp_optimizer(plugin, accelerator, opt2, model2, ckpt)
            resumed = train(model2, opt2, mech2, AFTER)
            equal = [torch.equal(a, b) for a, b in zip(full_params(model2), cont_params)]
            engine_params = getattr(mech2._engine, "params", None)
            bound = engine_params is not None and len(engine_params) == len(list(model2.parameters())) and all(
                a is b for a, b in zip(engine_params, model2.parameters()))
            out["dcp"] = {"uninterrupted": cont, "resumed": resumed}
            checks.record("dcp_resume", resumed == cont and all(equal) and bound,
                          f"after the DCP resume: scales {resumed} vs uninterrupted {cont}; parameters bitwise "
                          f"equal {equal}; the resumed Mechanic holds the new model's sharded parameters: {bound}")

        checks.stage(["dcp_resume"], dcp_resume)

    # every rank saw the same scale sequence
    gathered: list = [None] * world
    dist.all_gather_object(gathered, scales)
    out["same_on_all_ranks"] = all(g == gathered[0] for g in gathered)
    out["checks"] = {name: checks.results.get(name, "not run") for name in CHECKS}
    return out
