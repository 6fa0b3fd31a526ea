"""What each rank runs in the distributed tests (importable by forkserver workers).

Every rank trains the same float64 model on the same full batch, so the data-parallel
gradient equals the single-process one and any difference comes from Mechanic's sums.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import manic
from manic.testing import Count  # collectives and host syncs of a block
from nets import MLP

STEPS = 40
LR = 1e-2
# The authors' update with optax's values; the default is the invariant form (manic.options.DEFAULTS).
ORIGINAL = {"variant": "original", "s_init": 1e-6, "weight_decay": 1e-2}


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two param groups with different lrs (for per_group=True): fc1 and fc2 at LR, fc3 and gain at LR / 4."""
    named = list(model.named_parameters())
    first = [p for n, p in named if "fc1" in n or "fc2" in n]
    return [{"params": first}, {"params": [p for _, p in named if all(p is not q for q in first)], "lr": LR / 4}]


def base(params: Any, kind: str = "adamw") -> torch.optim.Optimizer:
    # Neither reads a step counter on the host, so the sync count below is Mechanic's alone.
    # (Fused AdamW refuses a mix of DTensor and plain parameters, as in the TP model.)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=0.9)
    return torch.optim.AdamW(params, lr=LR, fused=True)


Net = MLP  # a small MLP with a 3-element gain (fewer elements than 4 ranks: some shards are empty)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(32, 8, generator=g, dtype=torch.float64)
    return X, torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], dim=1)


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


COUNTING = True  # train() counts collectives and host syncs under Count (compiled_forms turns it off)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, forward: Callable | None = None,
          counts: list | None = None, device: torch.device | None = None, readout: Any = None,
          names: bool = False) -> list[float]:
    """Full-batch steps (the batch on ``device``); returns the scale of ``readout`` (default: ``opt``) after
    each step; records per step (collectives, host syncs) in ``counts``: how many, or the collectives'
    names with ``names``."""
    X, y = (t if device is None else t.to(device) for t in data())
    scales = []
    for _ in range(steps):
        opt.zero_grad()
        if forward is None:
            torch.nn.functional.mse_loss(model(X), y).backward()
        else:
            forward(X, y)
        if COUNTING:
            with Count() as c:
                opt.step()
            if counts is not None:
                counts.append((c.names if names else c.collectives, c.syncs))
        else:  # (compiled code does not run under a TorchDispatchMode: compiled_forms)
            opt.step()
        scales.extend((readout or opt).scale.reshape(-1).tolist())  # one per group with per_group=True
    return scales


def baseline(steps: int = STEPS, kind: str = "adamw", **hyper: Any) -> tuple[list[torch.Tensor], list[float]]:
    model = make_net()
    opt = manic.mechanize(base(groups(model) if hyper.get("per_group") else model.parameters(), kind), **hyper)
    scales = train(model, opt, steps)
    return [p.detach().clone() for p in model.parameters()], scales


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def compare(name: str, model: nn.Module, scales: list[float], ref: tuple[list[torch.Tensor], list[float]],
            tol: float = 1e-10) -> dict[str, float]:
    params = [full(p) for p in model.parameters()]
    ref_params, ref_scales = ref
    worst_p = max(rel(a, b) for a, b in zip(params, ref_params))
    worst_s = max(abs(a - b) / b for a, b in zip(scales, ref_scales))
    assert worst_p <= tol and worst_s <= tol, f"{name}: params rel {worst_p:.2e}, scale rel {worst_s:.2e}"
    # the scale is bitwise identical on every rank
    mine = torch.tensor(scales, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name}: scales differ across ranks"
    assert ref_scales[-1] > 1e-3, "the scale never moved: the comparison would be weak"
    return {"params_rel": worst_p, "scale_rel": worst_s}


def check_counts(name: str, counts: list, collectives: int) -> None:
    """``collectives`` and no host sync per step; the first step also runs the one-time
    configuration check (reduce.gather_objects: two all-gathers, and its own host syncs)."""
    if not COUNTING:
        return
    assert all(c == (collectives, 0) for c in counts[1:]), f"{name}: (collectives, host syncs) per step {counts}"
    assert counts[0][0] == collectives + 2, f"{name}: the first step's (collectives, host syncs) {counts[0]}"


def check_lr_ref(name: str, opt: torch.optim.Optimizer, variant: str = "invariant") -> None:
    """lr_ref (the invariant form's unit, 1 in the original form) is bitwise the same on every rank."""
    mine = opt.param_groups[0]["mechanic_lr_ref"].reshape(-1)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    want = [LR if variant == "invariant" else 1.0]
    if mine.numel() > 1:  # per_group=True: each group's tuner in units of its own lr
        want = [g["lr"] if variant == "invariant" else 1.0 for g in opt.param_groups]
    assert all(torch.equal(g, gathered[0]) for g in gathered) and gathered[0].tolist() == want, f"{name}: {gathered}"


def check_form(name: str, model: nn.Module, collectives: int, kind: str = "adamw",
               unwrapped: nn.Module | None = None, **options: Any) -> tuple[dict, torch.optim.Optimizer]:
    """Train the parallel ``model`` under manic (``options``: Mechanic's keywords; the default is
    the invariant form); check the counts per step and the match with the single-process run."""
    opt = manic.mechanize(base(groups(model) if options.get("per_group") else model.parameters(), kind), **options)
    counts: list = []
    scales = train(model, opt, STEPS, counts=counts)
    check_counts(name, counts, collectives)
    check_lr_ref(name, opt, options.get("variant", "invariant"))
    # per_group: smaller sums per tuner, whose summation order differs with the sharding; the closed
    # loop amplifies that to ~1e-10 by step 40 (4-rank FSDP2), so the reference tests' 1e-9 applies
    tol = 1e-9 if options.get("per_group") else 1e-10
    return compare(name, unwrapped or model, scales, baseline(kind=kind, **options), tol), opt


# ----------------------------------------------------------------------------- forms
def ddp(rank: int, world: int, **options: Any) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    return check_form("ddp", model, 0, unwrapped=model.module, **options)[0]


def fsdp1(rank: int, world: int, use_orig_params: bool, **options: Any) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(make_net(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    opt = manic.mechanize(base(model.parameters()), **options)
    counts: list = []
    scales = train(model, opt, STEPS, counts=counts)
    check_counts(f"fsdp1 orig={use_orig_params}", counts, 1)
    names = [n for n, _ in make_net().named_parameters()]
    with FSDP.summon_full_params(model):
        params = [model.module.get_parameter(n).detach().clone() if use_orig_params else
                  _attr(model.module, n).detach().clone() for n in names]
    ref_params, ref_scales = baseline(**options)
    worst = max(rel(a, b) for a, b in zip(params, ref_params))
    worst_s = max(abs(a - b) / b for a, b in zip(scales, ref_scales))
    assert worst <= 1e-10 and worst_s <= 1e-10, f"fsdp1: params {worst:.2e} scale {worst_s:.2e}"
    gathered = [None] * world
    dist.all_gather_object(gathered, scales)
    assert all(g == gathered[0] for g in gathered)
    fsdp1_round_trip(model, opt, use_orig_params, **options)
    return {"params_rel": worst, "scale_rel": worst_s}


def fsdp1_round_trip(model: nn.Module, opt: torch.optim.Optimizer, use_orig_params: bool, **options: Any) -> None:
    """get/set_optimizer_state_dict under FSDP1 into fresh objects continues bitwise."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    msd = {k: v.clone() for k, v in msd.items()}
    osd = {"state": {k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                     for k, v in osd["state"].items()},
           "param_groups": [dict(g) for g in osd["param_groups"]]}
    assert all("mechanic_delta" in v for v in osd["state"].values())
    model2 = FSDP(make_net(1), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    opt2 = manic.mechanize(base(model2.parameters()), **options)
    set_model_state_dict(model2, msd)
    set_optimizer_state_dict(model2, opt2, osd)
    a, b = train(model, opt, 5), train(model2, opt2, 5)
    assert a == b, f"FSDP1 orig={use_orig_params} round trip: scales {a} vs {b}"
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def _attr(module: nn.Module, name: str) -> torch.Tensor:
    for part in name.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def shard2(model: Net, mesh: Any = None) -> Net:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2(rank: int, world: int, **options: Any) -> dict:
    result, opt = check_form("fsdp2", shard2(make_net()), 1, **options)
    return {**result, "state_bytes": sum(manic_bytes(opt))}


def manic_bytes(opt: torch.optim.Optimizer) -> list[int]:
    out = []
    for st in opt.state.values():
        for k, v in st.items():
            if k.startswith("mechanic_"):
                t = v.to_local() if hasattr(v, "to_local") else v
                out.append(t.numel() * t.element_size())
    return out


def hsdp(rank: int, world: int, **options: Any) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = shard2(make_net(), mesh)
    assert tuple(model.fc1.weight.placements) == (Replicate(), Shard(0))
    return check_form("hsdp", model, 1, **options)[0]


def tp(rank: int, world: int, **options: Any) -> dict:
    """1-D tensor parallel: fc1 column-wise, fc2 row-wise (its bias a Replicate DTensor),
    fc3 and gain plain replicated tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = parallelize_module(make_net(), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    return check_form("tp", model, 1, kind="sgd", **options)[0]


def pipeline(rank: int, world: int, **options: Any) -> dict:
    """Two stages by hand: rank 0 holds fc1, rank 1 holds fc2, fc3 and gain."""
    assert world == 2
    net = make_net()
    stage = [net.fc1] if rank == 0 else [net.fc2, net.fc3]
    params = [p for m in stage for p in m.parameters()] + ([] if rank == 0 else [net.gain])
    opt = manic.mechanize(base(params), process_group=dist.group.WORLD, **options)

    def forward(X: torch.Tensor, y: torch.Tensor) -> None:
        if rank == 0:
            h = torch.tanh(net.fc1(X))
            dist.send(h.detach(), 1)
            grad = torch.empty_like(h)
            dist.recv(grad, 1)
            h.backward(grad)
        else:
            h = torch.empty(X.shape[0], 16, dtype=torch.float64)
            dist.recv(h, 0)
            h.requires_grad_(True)
            out = net.fc3(torch.tanh(net.fc2(h))) * net.gain[:2] + net.gain[2]
            torch.nn.functional.mse_loss(out, y).backward()
            dist.send(h.grad, 0)

    counts: list = []
    scales = train(net, opt, STEPS, forward=forward, counts=counts)
    check_counts("pipeline", counts, 1)
    check_lr_ref("pipeline", opt, options.get("variant", "invariant"))
    ref_params, ref_scales = baseline(**options)
    mine = {n: p for n, p in net.named_parameters()}
    ref_named = dict(zip([n for n, _ in make_net().named_parameters()], ref_params))
    held = [n for n, p in mine.items() if any(p is q for q in params)]
    worst = max(rel(mine[n].detach(), ref_named[n]) for n in held)
    worst_s = max(abs(a - b) / b for a, b in zip(scales, ref_scales))
    assert worst <= 1e-10 and worst_s <= 1e-10, f"pipeline: params {worst:.2e} scale {worst_s:.2e}"
    return {"params_rel": worst, "scale_rel": worst_s}


def two_rank_forms(rank: int, world: int) -> dict:
    """Every form in the default (invariant) form; DDP, FSDP2, TP and the pipeline in the original
    form too (in the same process group); DDP, FSDP1, FSDP2 and TP with state="delta" (one buffer)."""
    return {"ddp": ddp(rank, world), "fsdp1": fsdp1(rank, world, False), "fsdp1_orig": fsdp1(rank, world, True),
            "fsdp2": fsdp2(rank, world), "tp": tp(rank, world), "pipeline": pipeline(rank, world),
            "ddp_original": ddp(rank, world, **ORIGINAL), "fsdp2_original": fsdp2(rank, world, **ORIGINAL),
            "tp_original": tp(rank, world, **ORIGINAL), "pipeline_original": pipeline(rank, world, **ORIGINAL),
            "ddp_per_group": ddp(rank, world, per_group=True), "tp_per_group": tp(rank, world, per_group=True),
            "fsdp2_per_group_original": fsdp2(rank, world, per_group=True, **ORIGINAL),
            "ddp_delta": ddp(rank, world, state="delta"), "fsdp2_delta": fsdp2(rank, world, state="delta"),
            "tp_delta": tp(rank, world, state="delta"), "fsdp1_delta": fsdp1(rank, world, False, state="delta"),
            "fsdp1_orig_delta": fsdp1(rank, world, True, state="delta")}


def four_rank_forms(rank: int, world: int) -> dict:
    return {"fsdp2": fsdp2(rank, world), "hsdp": hsdp(rank, world), "fsdp_tp": fsdp_tp(rank, world),
            "grads_none": grads_none_on_one_rank(rank, world), "fsdp2_original": fsdp2(rank, world, **ORIGINAL),
            "hsdp_original": hsdp(rank, world, **ORIGINAL), "fsdp2_per_group": fsdp2(rank, world, per_group=True),
            "hsdp_per_group": hsdp(rank, world, per_group=True), "fsdp2_delta": fsdp2(rank, world, state="delta"),
            "hsdp_delta": hsdp(rank, world, state="delta")}


def compiled_forms(rank: int, world: int) -> dict:
    """compile=True on DTensor shards (FSDP2 in both state modes that keep Delta, TP): the fused sums take
    x's part from the last rebase on each rank's local shard. (SMALL = 0: compile these small tensors.
    Not counted: compiled code does not run under Count, a TorchDispatchMode; the forms above count the
    same collectives with the eager kernels.)"""
    global COUNTING
    from manic import kernels

    kernels.SMALL, COUNTING = 0, False
    return {"fsdp2_compiled": fsdp2(rank, world, compile=True),
            "fsdp2_delta_compiled": fsdp2(rank, world, compile=True, state="delta"),
            "tp_compiled": tp(rank, world, compile=True)}


# ----------------------------------------------------------------------------- config check
CONFIG_FIELDS = ("weight_decay", "eps", "s_init", "num_betas", "store_delta", "state", "variant", "per_group",
                 "lr_ref", "reducer", "num_params")


def _numpy_missing(self: torch.Tensor) -> Any:
    raise RuntimeError("Numpy is not available")  # what torch raises in an environment without NumPy


def config_mismatch(rank: int, world: int) -> dict[str, str]:
    """For each checked field, rank 1 differs from rank 0: every rank must raise at the first
    step (when Mechanic binds), naming it; with nothing different ("none"), the step runs. All of it
    as without NumPy (manic depends on torch alone; torch's all_gather_object needs NumPy)."""
    numpy = torch.Tensor.numpy
    torch.Tensor.numpy = _numpy_missing  # type: ignore[method-assign]
    try:
        return _config_mismatch(rank)
    finally:
        torch.Tensor.numpy = numpy  # type: ignore[method-assign]


def _config_mismatch(rank: int) -> dict[str, str]:
    out = {}
    X, y = data()
    for field in ("none", *CONFIG_FIELDS):
        kwargs: dict[str, Any] = {}
        model = make_net()
        params = list(model.parameters())
        if rank == 1:
            kwargs = {"weight_decay": {"weight_decay": 0.5}, "eps": {"eps": 1e-6}, "s_init": {"s_init": 1e-5},
                      "num_betas": {"num_betas": 3}, "store_delta": {"store_delta": False},
                      "state": {"state": "delta"},
                      # (with its defaults: weight_decay and s_init differ as well)
                      "variant": {"variant": "original"}, "per_group": {"per_group": True},
                      "reducer": {"device_mesh": None, "process_group": None}}.get(field, {})
            if field == "num_params":
                params = params[:-1]
        elif field == "reducer":
            kwargs = {"reducer": manic.ProcessGroupReducer()}
        lr = 2 * LR if rank == 1 and field == "lr_ref" else LR  # pipeline stages with different lrs
        opt = manic.mechanize(torch.optim.SGD(params, lr=lr), **kwargs)
        torch.nn.functional.mse_loss(model(X), y).backward()
        try:
            opt.step()
            out[field] = "no error"
        except ValueError as e:
            out[field] = str(e)
    return out


def rank_fails_mid_step(rank: int, world: int, how: str) -> str:
    """Rank 1 fails before entering the step's collective; rank 0 must not hang."""
    import os
    import time

    model = shard2(make_net())
    opt = manic.mechanize(base(model.parameters(), "sgd"))
    train(model, opt, 2)
    X, y = data()
    torch.nn.functional.mse_loss(model(X), y).backward()
    if rank == 1:
        if how == "dies":
            os._exit(3)
        raise RuntimeError("rank 1 failed on purpose")
    start = time.monotonic()
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - any error is fine, hanging is not
        return f"{type(e).__name__} after {time.monotonic() - start:.1f}s: {e}"
    return "no error"


def zero_redundancy(rank: int, world: int) -> dict[str, Any]:
    """torch's ZeroRedundancyOptimizer with Mechanic inside (its optimizer_class builds a mechanized AdamW
    over the parameters it gives this rank, a different subset on each rank). Without process_group=
    the first step must raise the message that names it, on every rank, before anything moves; with it,
    the run is the single-process one (every rank trains on the same full batch)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def zero(model: nn.Module, **options: Any) -> ZeroRedundancyOptimizer:
        def mechanized(params: Any, **defaults: Any) -> torch.optim.Optimizer:
            return manic.mechanize(torch.optim.AdamW(params, **defaults), **options)
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=mechanized, lr=LR)

    out: dict[str, Any] = {}
    model = make_net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = zero(model)
    out["held"] = len(opt.optim.param_groups[0]["params"])
    X, y = data()
    torch.nn.functional.mse_loss(model(X), y).backward()
    try:
        opt.step()
        out["without"] = "no error"
    except ValueError as e:
        out["without"] = str(e)
    out["moved"] = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))

    model = make_net()
    opt = zero(model, process_group=dist.group.WORLD)
    counts: list = []
    out["scales"] = train(model, opt, 10, counts=counts, readout=opt.optim, names=True)
    out["allreduces"] = [sum("allreduce" in n for n in names) for names, _ in counts]
    out["params"] = [p.detach().clone() for p in model.parameters()]
    ref = make_net()
    ref_opt = manic.mechanize(torch.optim.AdamW(ref.parameters(), lr=LR))
    out["ref_scales"] = train(ref, ref_opt, 10)
    out["ref_params"] = [p.detach().clone() for p in ref.parameters()]
    return out


# ----------------------------------------------------------------------------- checkpoints
def _sharded_run(**options: Any) -> tuple[Net, torch.optim.Optimizer]:
    model = shard2(make_net())
    return model, manic.mechanize(base(groups(model) if options.get("per_group") else model.parameters()), **options)


def _cloned_state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd, optim_sd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    model_sd = {k: v.clone() for k, v in model_sd.items()}
    optim_sd = {"state": {k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                          for k, v in optim_sd["state"].items()},
                "param_groups": [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in g.items()}
                                 for g in optim_sd["param_groups"]]}
    return model_sd, optim_sd


def _dsd_round_trip(before: int, after: int, **options: Any) -> tuple[nn.Module, list[float]]:
    """Train, take the DSD state dicts, continue; the same state dicts set into freshly built
    objects continue bitwise."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model, opt = _sharded_run(**options)
    train(model, opt, before)
    model_sd, optim_sd = _cloned_state_dicts(model, opt)
    scales = train(model, opt, after)
    model2, opt2 = _sharded_run(**options)
    set_model_state_dict(model2, model_sd)
    set_optimizer_state_dict(model2, opt2, optim_sd)
    scales2 = train(model2, opt2, after)
    assert scales2 == scales, f"DSD round trip {options}: scales differ"
    assert all(torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), model2.parameters()))
    return model, scales


def _final(model: nn.Module, scales: list[float]) -> dict:
    return {"params": [full(p).clone() for p in model.parameters()], "scales": scales}


def _load(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    before = [full(p).clone() for p in model.parameters()]
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    # the checkpoint tools' lazy state initialisation moved nothing
    assert all(torch.equal(a, full(p)) for a, p in zip(before, model.parameters()))
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def dcp_save(rank: int, world: int, path: str, before: int, after: int) -> dict:
    """Train, save with DCP, continue; also a DSD round trip into fresh objects continues bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    model, opt = _sharded_run()
    train(model, opt, before)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    model_sd, optim_sd = _cloned_state_dicts(model, opt)
    scales = train(model, opt, after)

    # DSD round trip into freshly built objects
    model2, opt2 = _sharded_run()
    set_model_state_dict(model2, model_sd)
    set_optimizer_state_dict(model2, opt2, optim_sd)
    scales2 = train(model2, opt2, after)
    assert scales2 == scales, "DSD round trip: scales differ"
    assert all(torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), model2.parameters()))

    # DCP resume at the same world size is bitwise
    model3, opt3 = _sharded_run()
    _load(model3, opt3, path)
    scales3 = train(model3, opt3, after)
    assert scales3 == scales, "DCP resume on the same world size: scales differ"
    assert all(torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), model3.parameters()))
    check_lr_ref("dcp resume", opt3)

    # the original form's DSD round trip continues bitwise as well
    _dsd_round_trip(before, after, **ORIGINAL)

    # state="delta" (one buffer): its DSD round trip continues bitwise too
    _dsd_round_trip(before, after, state="delta")

    # per_group=True (two groups, a tuner each) and state="delta": saved as well, for the resharded resume
    out = _final(model, scales)
    for name, options in SAVED_VARIANTS.items():
        model4, opt4 = _sharded_run(**options)
        train(model4, opt4, before)
        dcp.save({"model": get_model_state_dict(model4), "optim": get_optimizer_state_dict(model4, opt4)},
                 checkpoint_id=f"{path}_{name}")
        out[name] = _final(model4, train(model4, opt4, after))
    return out


SAVED_VARIANTS = {"per_group": {"per_group": True}, "delta": {"state": "delta"}}


def dcp_resume(rank: int, world: int, path: str, after: int) -> dict:
    model, opt = _sharded_run()
    _load(model, opt, path)
    check_lr_ref("dcp resharded", opt)  # restored, not taken afresh
    out = _final(model, train(model, opt, after))
    for name, options in SAVED_VARIANTS.items():
        model2, opt2 = _sharded_run(**options)
        _load(model2, opt2, f"{path}_{name}")
        check_lr_ref(f"dcp resharded, {name}", opt2)
        out[name] = _final(model2, train(model2, opt2, after))
    return out


def fsdp_tp(rank: int, world: int) -> dict:
    """2-D: tensor parallel over "tp" inside FSDP2 over "dp" (a 2x2 mesh); fc3 and gain live
    on the dp slice only, replicated over tp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(make_net(), mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    assert model.fc1.weight.device_mesh.ndim == 2 and model.gain.device_mesh.ndim == 1
    return check_form("fsdp_tp", model, 1, kind="sgd")[0]


def grads_none_on_one_rank(rank: int, world: int) -> dict:
    """A rank whose every gradient is None still enters the step's collective."""
    model = shard2(make_net())
    opt = manic.mechanize(base(model.parameters(), "sgd"))
    train(model, opt, 3)
    X, y = data()
    torch.nn.functional.mse_loss(model(X), y).backward()
    if rank == world - 1:
        opt.zero_grad(set_to_none=True)
    with Count() as c:
        opt.step()
    assert c.collectives == 1
    return {"scale": opt.scale.item()}


def held_check(rank: int, world: int) -> dict[str, str]:
    """The first step's check of what the ranks hold (plain tensors, so nothing is detected)."""
    import warnings

    out = {}
    for case in ("different", "different_but_independent", "same_but_summed", "same"):
        torch.manual_seed(rank if case.startswith("different") else 0)
        p = torch.randn(6, requires_grad=True)
        kwargs: dict[str, Any] = {"different_but_independent": {"reducer": manic.NoReduce()},
                                  "same_but_summed": {"process_group": dist.group.WORLD}}.get(case, {})
        opt = manic.mechanize(torch.optim.SGD([p], lr=0.1), **kwargs)
        p.grad = torch.ones(6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt.step()
                out[case] = "ok"
            except ValueError as e:
                out[case] = f"ValueError: {e}"
        out[case] += "".join(f" | warning: {w.message}" for w in caught if "same parameters" in str(w.message))
    return out
