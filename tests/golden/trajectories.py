"""The runs the golden trajectories record (make_golden.py writes and checks them): see make_golden.py."""


from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: nets.py
from nets import MLP  # noqa: E402

STEPS, LR = 12, 0.05
VARIANTS = ("invariant", "original")
STATES = ("ref+delta", "ref", "delta")


def make_net(dtype: torch.dtype = torch.float64, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP((4, 6, 6, 2)).to(dtype)


def data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(24, 4, generator=g, dtype=torch.float64)
    return X.to(dtype), torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], dim=1)


def groups(model: MLP) -> list[dict[str, Any]]:
    return [{"params": list(model.fc1.parameters())},
            {"params": list(model.fc2.parameters()), "lr": LR / 2, "weight_decay": 0.0},
            {"params": [*model.fc3.parameters(), model.gain], "lr": 2 * LR}]


def base(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=0.9)
    assert kind == "plain_sgd"
    return torch.optim.SGD(params, lr=LR)


def schedule(t: int) -> float:
    """Linear warmup from 0 over 3 steps, then cosine to 0 at step STEPS."""
    return t / 3 if t < 3 else 0.5 * (1 + math.cos(math.pi * (t - 3) / (STEPS - 3)))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def as64(t: torch.Tensor) -> torch.Tensor:
    t = local(t.detach())
    return t.to(torch.float64).clone() if t.is_floating_point() else t.clone()


def record(model: nn.Module, opt: torch.optim.Optimizer, readout: Any, scales: list[torch.Tensor]) -> dict:
    """The run's end in float64: scales per step, parameters (full), Mechanic's buffers (local shards),
    tuner tensors and statistics."""
    out = {"scales": torch.stack([s.to(torch.float64) for s in scales])}
    for i, p in enumerate(model.parameters()):
        out[f"param{i}"] = full(p.detach()).to(torch.float64).clone()
        for k, v in opt.state.get(p, {}).items():
            if isinstance(k, str) and k.startswith("mechanic_"):
                out[f"param{i}/{k}"] = as64(v)
    for k, v in opt.param_groups[0].items():
        if k.startswith("mechanic_") and isinstance(v, torch.Tensor):
            out[k] = as64(v)
    for k, v in readout.stats().items():
        out[f"stats/{k}"] = as64(v)
    return out


def grads(model: nn.Module, X: torch.Tensor, y: torch.Tensor, nan: bool = False) -> None:
    torch.nn.functional.mse_loss(model(X).to(torch.float64), y).backward()
    if nan:
        with torch.no_grad():
            local(model.fc2.weight.grad)[0, 0] = float("nan")


def run(kind: str = "adamw", dtype: torch.dtype = torch.float64, nan_at: int | None = None, resume_at: int | None = None,
        seed_form: bool = False, layout_changes: bool = False, shard: Callable | None = None, **options: Any) -> dict:
    """One run of STEPS steps (see the module docstring); ``options`` are Mechanic's keywords."""
    import manic

    def build(model: nn.Module) -> tuple[list[Any], Any]:
        opt = base(kind, groups(model))
        if seed_form:
            updater = manic.Updater(opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule))
            return [opt, updater, manic.Mechanic(updater, **options)], None
        mech = manic.mechanize(opt, **options)
        return [mech, torch.optim.lr_scheduler.LambdaLR(mech, schedule)], mech

    def step(objs: list[Any]) -> None:
        if seed_form:
            objs[2].step()
            objs[1].step()
        else:
            objs[0].step()
            objs[1].step()

    model = make_net(dtype)
    if shard is not None:
        shard(model)
    objs, readout = build(model)
    X, y = data(dtype)
    scales = []
    for t in range(STEPS):
        if resume_at == t:  # a state-dict round trip into freshly built objects
            model2 = make_net(dtype, seed=1)
            model2.load_state_dict(model.state_dict())
            objs2, readout = build(model2)
            for a, b in zip(objs2[1:], objs[1:]) if seed_form else zip(objs2, objs):
                a.load_state_dict(b.state_dict())
            model, objs = model2, objs2
        if layout_changes and t == 4:  # a parameter joins (a group of its own) after Mechanic started
            extra = nn.Parameter(torch.full((2,), 0.3, dtype=dtype))
            model.register_parameter("extra", extra)
            objs[0].add_param_group({"params": [extra], "initial_lr": LR})
            objs[1] = torch.optim.lr_scheduler.LambdaLR(objs[0], schedule, last_epoch=t - 1)
        if layout_changes and t == 8:  # a parameter leaves: frozen
            model.fc1.bias.requires_grad_(False)
        objs[0].zero_grad()
        grads(model, X, y, nan=(t == nan_at))
        if layout_changes and t >= 4:
            model.extra.grad = torch.full_like(model.extra, 0.1 * t)
        step(objs)
        scales.append((readout or objs[2]).scale.detach().clone())
    readout = readout or objs[2]
    return record(model, objs[0], readout, scales)


def _single_runs() -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    for compile_ in (False, True):
        c = "/compile" if compile_ else ""
        for kind in ("adamw", "sgd"):
            for variant in VARIANTS:
                for state in STATES:
                    for per_group in (False, True):
                        runs[f"{kind}/{variant}/{state}/per_group={per_group}{c}"] = dict(
                            kind=kind, variant=variant, state=state, per_group=per_group, compile=compile_)
        for state in STATES:
            for dtype in (torch.float32, torch.bfloat16):
                runs[f"precision/{dtype}/{state}{c}"] = dict(dtype=dtype, state=state, compile=compile_)
            if state != "delta":
                runs[f"precision/bf16_fp32_reference/{state}{c}"] = dict(
                    dtype=torch.bfloat16, state=state, fp32_reference=True, compile=compile_)
            runs[f"nonfinite/skip/{state}{c}"] = dict(state=state, nan_at=6, skip_nonfinite=True, compile=compile_)
            runs[f"nonfinite/plain_sgd/{state}{c}"] = dict(kind="plain_sgd", state=state, nan_at=6, compile=compile_)
            for per_group in (False, True):
                runs[f"resume/{state}/per_group={per_group}{c}"] = dict(
                    state=state, per_group=per_group, resume_at=6, compile=compile_)
            if not compile_:
                runs[f"resume/seed/{state}"] = dict(state=state, resume_at=6, seed_form=True)
                runs[f"layout/{state}"] = dict(state=state, layout_changes=True)
                runs[f"seed/{state}/original"] = dict(state=state, seed_form=True, variant="original")
    return runs


def single() -> dict[str, dict]:
    import manic.kernels

    out = {}
    for name, kw in _single_runs().items():
        if kw.get("compile"):
            manic.kernels.SMALL = 0
        out[name] = run(**kw)
    return out


def _shard(model: MLP) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer)
    fully_shard(model)


def fsdp2_worker(rank: int, world: int) -> dict[str, dict]:
    import manic.kernels

    torch.set_num_threads(1)
    manic.kernels.SMALL = 0
    out = {}
    for compile_ in (False, True):
        for variant in VARIANTS:
            for state in STATES:
                for per_group in (False, True):
                    name = f"fsdp2/{variant}/{state}/per_group={per_group}{'/compile' if compile_ else ''}"
                    out[name] = run(shard=_shard, variant=variant, state=state, per_group=per_group, compile=compile_)
    return out


def fsdp2() -> dict[str, dict]:
    from manic.testing import run as ranks

    results = ranks(2, fsdp2_worker, timeout=1200)
    return {f"{name}/rank{r}": rec for r, res in enumerate(results) for name, rec in res.items()}
