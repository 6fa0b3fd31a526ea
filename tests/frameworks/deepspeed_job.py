"""What tests/frameworks/test_deepspeed.py runs: manic under DeepSpeed ZeRO, 2 CPU ranks, gloo.

    torchrun --standalone --nproc-per-node 2 tests/frameworks/deepspeed_job.py OUT_DIR

One launch (DeepSpeed's import and start-up are the expensive part) trains several engines in
turn, each a fresh ``deepspeed.initialize`` of the same float32 MLP (same seed) with
``manic.mechanize(AdamW)`` as the client optimizer; every step each rank takes its own half of
one fixed batch:

  zero0            ZeRO-0 (every rank holds the whole model; no process_group): the reference
  zero1, zero2     ZeRO-1/2 with ``process_group=torch.distributed.group.WORLD``
  adamw1, adamw2   ZeRO-1/2 with a plain AdamW (what DeepSpeed's own step dispatches, for the count)
  skip2            ZeRO-2, step POISON's loss times inf: DeepSpeed's overflow check skips it
  zero3            ZeRO-3 with process_group=WORLD (or the exception DeepSpeed raised)
  adamw3           ZeRO-3 with a plain AdamW
  several parts    ZeRO-1/2 step the client optimizer once per param group, ZeRO-3 once per sub-group
                   (a part each): Mechanic's one step spans them (src/manic/partitions.py)
    zero0_groups,  ZeRO-0 / 1 / 2 / 3 with two param groups (weights; biases without weight decay, as
    zero1_groups,  HF Trainer's default optimizer splits them)
    zero2_groups,
    zero3_groups
    zero2_groups_alike      the two groups with the same hyperparameters: the one-group run's trajectory
    zero3_subgroups         ZeRO-3, sub_group_size=SUB (smaller than a rank's share), one group
    zero3_subgroups_groups  the same with the two groups
    adamw2_groups, adamw3_subgroups_groups   the same with a plain AdamW (for the count)
    zero0_groups_<mode>, zero2_groups_<mode>, zero3_subgroups_groups_<mode>: the state modes with a
                   transient ("ref", "delta") and per_group=True, ZeRO-0 against several parts
    skip_nonfinite_groups, offload_groups   what is refused with several parts (or DeepSpeed's own error)
  bf16, fp16       ZeRO-2 mixed precision with one poisoned step (or the exception DeepSpeed raised)
  bf16_groups_alike  bf16 with the two groups alike (two parts)
  adamw_bf16       ZeRO-2 bf16 with a plain AdamW
  ckpt             ZeRO-2: A N steps uninterrupted; B N/2 steps, ``engine.save_checkpoint``;
                   C a fresh engine, ``engine.load_checkpoint``, N/2 more steps
  ckpt3            the same under ZeRO-3 with the two groups and sub_group_size=SUB (several parts)
  universal        ckpt's checkpoint through DeepSpeed's universal checkpoint (ds_to_universal, then
                   ``load_universal`` into a fresh ZeRO-2 engine on the same 2 ranks)
  hf               HF ``Trainer(args=TrainingArguments(deepspeed=<ZeRO-2 dict>))``, a Llama model and
                   synthetic tokens (hf_trainer_run.py):
                     ignored   ``optimizers=(mechanize(AdamW), LambdaLR)``: what Trainer steps instead
                     refused   the same with ``MechanicCallback``: the error it raises at train begin
                     saving    examples/deepspeed_hf_trainer.py's ``MechanicTrainer`` (its create_optimizer
                               mechanizes Trainer's own AdamW: two param groups, decay and no decay)
                               with ``MechanicCallback``, HF_STEPS steps, a Trainer checkpoint at HF_SAVE_AT
                     resumed   a new ``MechanicTrainer``, ``train(resume_from_checkpoint=...)`` from it
  wrong            ZeRO-2 WITHOUT process_group: the first step must raise (last, on purpose: it leaves
  wrong_groups     an engine mid-step behind); wrong_groups the same with the two groups

Each rank writes ``OUT_DIR/rank{r}.pt`` (a dict of the runs' results) or, on an error outside
what a run is expected to raise, ``OUT_DIR/rank{r}.err`` (the traceback).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

STEPS = 30          # steps of each trajectory run
CKPT_N = 10         # the checkpoint run: save at CKPT_N, resume to 2 * CKPT_N
LR = 1e-2
S_INIT = 1e-6
SAMPLES = 64        # the fixed batch; rank r takes rows [r*32, (r+1)*32)
HF_STEPS = 40       # the Trainer runs: a checkpoint at HF_SAVE_AT, resumed to HF_STEPS
HF_SAVE_AT = 20
HF_IGNORED_STEPS = 2
SUB = {"stage": 3, "sub_group_size": 100}  # ZeRO-3 sub-groups smaller than a rank's share (225 elements)
MODE_STEPS = 10     # the state-mode runs
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deepspeed_hf_trainer.py"


class CountC10d(TorchDispatchMode):
    """Counts the c10d collectives dispatched while active (by op name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "c10d":
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(SAMPLES, 8, generator=g)
    y = torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], 1)
    r, half = dist.get_rank(), SAMPLES // dist.get_world_size()
    return X[r * half:(r + 1) * half], y[r * half:(r + 1) * half]


def config(stage: int, **extra: Any) -> dict[str, Any]:
    cfg = {"train_micro_batch_size_per_gpu": SAMPLES // dist.get_world_size(), "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
           "steps_per_print": 10**9, "wall_clock_breakdown": False}
    cfg.update(extra)
    return cfg


def build(stage: int, pg: bool = True, mechanic: bool = True, groups: bool | str = False,
          options: dict[str, Any] | None = None, **extra: Any) -> tuple[Any, Any, Any]:
    """A fresh engine; with ``groups``, AdamW has two param groups (the weight matrices, and the
    biases without weight decay, as HF Trainer's default optimizer splits them; ``"alike"``: both with
    the same hyperparameters, which is one group to AdamW); ``options``: more of Mechanic's."""
    import deepspeed

    import manic

    net = model()
    if groups:
        params: Any = [{"params": [p for p in net.parameters() if p.dim() > 1]},
                       {"params": [p for p in net.parameters() if p.dim() <= 1],
                        **({} if groups == "alike" else {"weight_decay": 0.0})}]
    else:
        params = net.parameters()
    base = torch.optim.AdamW(params, lr=LR)
    opt = manic.mechanize(base, s_init=S_INIT, **({"process_group": dist.group.WORLD} if pg else {}),
                          **(options or {})) if mechanic else base
    engine, dsopt, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config(stage, **extra))
    return engine, dsopt, opt


def train_step(engine: Any, X: torch.Tensor, y: torch.Tensor, poison: bool = False) -> list[str]:
    """One step; the c10d ops dispatched inside ``engine.step()``."""
    out = engine(X.to(next(engine.module.parameters()).dtype))
    loss = F.mse_loss(out.float(), y)
    if poison:
        loss = loss * float("inf")
    engine.backward(loss)
    with CountC10d() as c:
        engine.step()
    return c.ops


def count_mechanic(opt: Any) -> list[int]:
    """Wrap the bound reducer's all_reduce_sum (the only way Mechanic talks to other ranks)."""
    calls = [0]
    reducer = opt._engine.layout.reducer
    inner = reducer.all_reduce_sum

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return inner(t)

    reducer.all_reduce_sum = counted
    return calls


def ds_partitions(dsopt: Any) -> list[torch.Tensor]:
    """The flat fp32 partitions DeepSpeed's ZeRO optimizer hands its client optimizer."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(dsopt, name):
            return list(getattr(dsopt, name))
    return []


def describe(engine: Any, dsopt: Any, opt: Any) -> dict[str, Any]:
    eng = opt._engine
    params = eng.params
    parts = ds_partitions(dsopt)
    mech = {k: v for st in opt.state.values() for k, v in st.items()
            if k.startswith("mechanic_") and isinstance(v, torch.Tensor)}
    mech_tensors = [v for st in opt.state.values() for k, v in st.items()
                    if k.startswith("mechanic_") and isinstance(v, torch.Tensor)]
    return {
        "ds_optimizer": type(dsopt).__name__,
        "reducer": repr(eng.reducer),
        "param_shapes": [tuple(p.shape) for p in params],
        "param_dtypes": [str(p.dtype) for p in params],
        "params_are_ds_partitions": bool(parts) and len(parts) == len(params)
        and all(a is b for a, b in zip(params, parts)),
        "params_in_param_groups": [p is q for p, q in zip(params, [q for g in opt.param_groups for q in g["params"]])],
        "partition_bytes": sum(p.numel() * p.element_size() for p in params),
        "mechanic_keys": sorted(mech),
        "mechanic_bytes": sum(v.numel() * v.element_size() for v in mech_tensors),
        "mechanic_dtypes": sorted({str(v.dtype) for v in mech_tensors}),
        "mechanic_on_partitions": all(k in [id(p) for p in params] for k in
                                      [id(p) for p, st in opt.state.items()
                                       if any(n.startswith("mechanic_") for n in st)]),
        "model_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "model_numel": sum(p.numel() for p in engine.module.parameters()),
    }


def full_params(engine: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def trajectory(stage: int, steps: int = STEPS, pg: bool = True, mechanic: bool = True,
               poison_at: int | None = None, groups: bool | str = False, options: dict[str, Any] | None = None,
               **extra: Any) -> dict[str, Any]:
    """``steps`` steps; with ``poison_at``, that step's loss is multiplied by inf (DeepSpeed's
    overflow check must skip it before Mechanic sees it). The scales: (steps,), or (steps, groups)
    with per_group=True."""
    engine, dsopt, opt = build(stage, pg=pg, mechanic=mechanic, groups=groups, options=options, **extra)
    X, y = data()
    scales, ops, mech_calls, tuner_steps, overflow = [], [], [], [], []
    calls = None
    for t in range(steps):
        ops.append(train_step(engine, X, y, poison=(t == poison_at)))
        overflow.append(bool(getattr(dsopt, "overflow", False)))
        if mechanic:
            scales.append(opt.scale.detach().double().clone())
            tuner_steps.append(int(opt.stats()["step"]))
            if calls is None:
                calls = count_mechanic(opt)  # bound at the first step; count from the second on
            mech_calls.append(calls[0])
    res: dict[str, Any] = {"ops": ops, "params": full_params(engine), "overflow": overflow,
                           "ds_skipped_steps": getattr(engine, "skipped_steps", None)}
    if mechanic:
        res.update(scales=torch.stack(scales), mech_calls=mech_calls,
                   tuner_steps=tuner_steps, skipped_by_tuner=int(opt.stats()["skipped_steps"]),
                   **describe(engine, dsopt, opt))
    return res


def attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn``; an exception becomes the result (type, message, traceback)."""
    try:
        return {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - recorded for the test and the docs
        return {"ok": False, "error_type": type(e).__name__, "error": str(e), "traceback": traceback.format_exc()}


POISON = 5  # the step whose loss is multiplied by inf in the overflow runs


def ckpt_run(root: Path, stage: int = 2, tag: str = "ckpt", **extra: Any) -> dict[str, Any]:
    X, y = data()

    def run(steps: int, load: Path | None = None, save: Path | None = None) -> dict[str, Any]:
        engine, dsopt, opt = build(stage, **extra)
        if load is not None:
            path, client = engine.load_checkpoint(str(load))
            assert path is not None, f"load_checkpoint({load}) found nothing"
        scales = []
        for _ in range(steps):
            train_step(engine, X, y)
            scales.append(opt.scale.item())
        if save is not None:
            engine.save_checkpoint(str(save), tag="half")
        return {"scales": torch.tensor(scales, dtype=torch.float64), "scale": opt.scale.detach().clone(),
                "params": full_params(engine), "partitions": [p.detach().clone() for p in opt._engine.params],
                "stats_step": int(opt.stats()["step"]), "parts": len(opt._engine.params)}

    ckdir = root / tag
    A = run(2 * CKPT_N)
    B = run(CKPT_N, save=ckdir)
    dist.barrier()
    C = run(CKPT_N, load=ckdir)
    files = sorted(str(p.relative_to(ckdir)) for p in ckdir.rglob("*") if p.is_file())
    mine = ckdir / "half" / f"zero_pp_rank_{dist.get_rank()}_mp_rank_00_optim_states.pt"
    keys = _keys(torch.load(mine, map_location="cpu", weights_only=False)) if mine.exists() else set()
    return {"A": A, "B": B, "C": C, "files": files,
            "optim_file_mechanic_keys": sorted(k for k in keys if k.startswith("mechanic_"))}


def universal_run(root: Path) -> dict[str, Any]:
    """ckpt_run's ZeRO-2 checkpoint (step CKPT_N) converted by DeepSpeed's ``ds_to_universal`` (on
    rank 0, in process) and loaded with ``checkpoint.load_universal`` into a fresh engine on the same
    2 ranks: what survives of the model, AdamW and Mechanic."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    src, dst = root / "ckpt" / "half", root / "universal"
    if dist.get_rank() == 0:
        ds_to_universal.main(Namespace(input_folder=str(src), output_folder=str(dst / "half"), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
        (dst / "latest_universal").write_text("half")
    dist.barrier()
    converted = sorted({p.stem for p in (dst / "half" / "zero").rglob("*.pt") if p.parent.name != "zero"})
    engine, dsopt, opt = build(2, checkpoint={"load_universal": True})
    path, _ = engine.load_checkpoint(str(dst))
    return {"loaded": path is not None, "converted_keys": converted, "params": full_params(engine),
            "state_keys": sorted({k for st in opt.state.values() for k in st}),
            "scale": opt.scale.item(), "tuner_step": int(opt.stats()["step"])}


def _keys(obj: Any, depth: int = 0) -> set[str]:
    """Every string dict key in a (nested) checkpoint object."""
    out: set[str] = set()
    if depth > 12:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                out.add(k)
            out |= _keys(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out |= _keys(v, depth + 1)
    return out


# ----------------------------------------------------------------------------- HF Trainer
def _example() -> Any:
    """examples/deepspeed_hf_trainer.py as a module (its training run is under ``__main__``): the
    documented ``MechanicTrainer`` and ZeRO-2 config, used here as they are."""
    spec = importlib.util.spec_from_file_location("deepspeed_hf_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chain(optimizer: Any) -> list[str]:
    """The optimizer Trainer steps, and what it wraps (``.optimizer``), outermost first."""
    out = []
    while optimizer is not None and len(out) < 5:
        out.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def hf_runs(root: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import hf_trainer_run as H
    import manic
    from manic.integrations import find_mechanic
    from manic.integrations.transformers import MechanicCallback

    example = _example()

    class Record(TrainerCallback):
        """What Trainer steps, and Mechanic's scale and lrs after every optimizer step."""

        def __init__(self) -> None:
            self.seen: dict[str, Any] = {}
            self.mech: Any = None
            self.lrs: list[float] = []
            self.scales: list[float] = []
            self.at: dict[int, dict[str, Any]] = {}

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            self.seen["chain"] = _chain(optimizer)
            try:
                self.mech = find_mechanic(optimizer)
            except TypeError:
                pass  # Trainer steps an optimizer of its own

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.mech is not None:
                self.lrs = [g["lr"] for g in self.mech.param_groups]  # this step's, before the scheduler

        def on_step_end(self, args, state, control, **kwargs):
            if self.mech is not None:
                self.scales.append(self.mech.scale.item())
                self.at[state.global_step] = {"scale": self.scales[-1], "lrs": self.lrs}

    def run(tag: str, trainer_cls: Any, steps: int, passed: bool = False, callback: bool = True,
            save: bool = False, resume: str | None = None) -> dict[str, Any]:
        model = H.make_model()
        kwargs: dict[str, Any] = {}
        if passed:  # what works without DeepSpeed (test_hf_trainer.py)
            opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=H.LR), s_init=S_INIT,
                                  process_group=dist.group.WORLD)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
            kwargs["optimizers"] = (opt, sched)
        args = TrainingArguments(
            output_dir=str(root / "hf" / tag), deepspeed=copy.deepcopy(example.ZERO2), max_steps=steps,
            per_device_train_batch_size=H.BATCH, seed=42, learning_rate=H.LR, weight_decay=0.01,
            lr_scheduler_type="cosine",
            warmup_steps=4, logging_steps=5, save_strategy="steps" if save else "no", save_steps=HF_SAVE_AT,
            report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        record = Record()
        callbacks = [record, MechanicCallback()] if callback else [record]
        trainer = trainer_cls(model=model, args=args, train_dataset=H.Tokens(), callbacks=callbacks, **kwargs)
        out: dict[str, Any] = {"ok": True}
        try:
            trainer.train(resume_from_checkpoint=resume)
        except TypeError as e:
            out = {"ok": False, "error_type": type(e).__name__, "error": str(e)}
        out.update(seen=record.seen, scales=record.scales, at=record.at,
                   log_history=[dict(h) for h in trainer.state.log_history],
                   world=trainer.args.world_size, deepspeed_enabled=trainer.is_deepspeed_enabled)
        if passed:
            out.update(passed_steps=int(opt.stats()["step"]), passed_scale=opt.scale.item(),
                       scheduler_is_passed=trainer.lr_scheduler is sched,
                       client_lr=[g["lr"] for g in trainer.optimizer.param_groups])
        if record.mech is not None:
            m = record.mech
            out.update(final_scale=m.scale.item(), tuner_step=int(m.stats()["step"]), reducer=repr(m._engine.reducer),
                       group_weight_decay=[g["weight_decay"] for g in m.param_groups],
                       params=[p.detach().clone() for p in trainer.model.parameters()],
                       partitions=[p.detach().clone() for p in m._engine.params],
                       params_are_ds_partitions=[a is b for a, b in zip(
                           m._engine.params, ds_partitions(trainer.optimizer.optimizer))])
        return out

    res: dict[str, Any] = {}
    res["ignored"] = run("ignored", Trainer, HF_IGNORED_STEPS, passed=True, callback=False)
    res["saving"] = run("saving", example.MechanicTrainer, HF_STEPS, save=True)
    dist.barrier()
    checkpoint = root / "hf" / "saving" / f"checkpoint-{HF_SAVE_AT}"
    res["checkpoint_files"] = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    res["resumed"] = run("resumed", example.MechanicTrainer, HF_STEPS, resume=str(checkpoint))
    res["refused"] = run("refused", Trainer, HF_IGNORED_STEPS, passed=True)  # raises at train begin
    return res


def wrong_run(groups: bool = False) -> dict[str, Any]:
    engine, dsopt, opt = build(2, pg=False, groups=groups)
    X, y = data()
    try:
        train_step(engine, X, y)
    except ValueError as e:
        return {"raised": "ValueError", "error": str(e), "stats_step": int(opt.stats()["step"])}
    return {"raised": None, "scale": opt.scale.item()}


def main() -> None:
    out = Path(sys.argv[1])
    import deepspeed

    deepspeed.init_distributed("gloo", timeout=timedelta(seconds=60))
    r = dist.get_rank()
    try:
        res: dict[str, Any] = {"world": dist.get_world_size(), "deepspeed": deepspeed.__version__}
        res["zero0"] = trajectory(0, pg=False)
        res["zero1"] = trajectory(1)
        res["zero2"] = trajectory(2)
        res["adamw1"] = trajectory(1, mechanic=False, steps=5)
        res["adamw2"] = trajectory(2, mechanic=False, steps=5)
        res["skip2"] = trajectory(2, steps=10, poison_at=POISON)
        res["zero3"] = attempt(lambda: trajectory(3))
        res["adamw3"] = attempt(lambda: trajectory(3, mechanic=False, steps=5))
        # several parts: ZeRO-1/2 step the client optimizer once per group, each time with that group alone
        # in param_groups; ZeRO-3 once per sub-group, with the other sub-groups' partitions emptied
        res["zero0_groups"] = trajectory(0, pg=False, groups=True)
        for stage in (1, 2, 3):
            res[f"zero{stage}_groups"] = attempt(lambda: trajectory(stage, groups=True))
        res["zero2_groups_alike"] = attempt(lambda: trajectory(2, groups="alike"))
        res["zero3_subgroups"] = attempt(lambda: trajectory(3, zero_optimization=SUB))
        res["zero3_subgroups_groups"] = attempt(lambda: trajectory(3, groups=True, zero_optimization=SUB))
        res["adamw2_groups"] = trajectory(2, mechanic=False, groups=True, steps=5)
        res["adamw3_subgroups_groups"] = trajectory(3, mechanic=False, groups=True, steps=5, zero_optimization=SUB)
        for mode, options in (("ref", {"state": "ref"}), ("delta", {"state": "delta"}),
                              ("per_group", {"per_group": True})):
            res[f"zero0_groups_{mode}"] = trajectory(0, pg=False, groups=True, steps=MODE_STEPS, options=options)
            res[f"zero2_groups_{mode}"] = attempt(lambda: trajectory(2, groups=True, steps=MODE_STEPS, options=options))
            res[f"zero3_subgroups_groups_{mode}"] = attempt(lambda: trajectory(
                3, groups=True, steps=MODE_STEPS, options=options, zero_optimization=SUB))
        res["bf16"] = attempt(lambda: trajectory(2, poison_at=POISON, bf16={"enabled": True}))
        res["bf16_groups_alike"] = attempt(lambda: trajectory(2, groups="alike", poison_at=POISON, bf16={"enabled": True}))
        res["adamw_bf16"] = attempt(lambda: trajectory(2, mechanic=False, steps=5, bf16={"enabled": True}))
        res["fp16"] = attempt(lambda: trajectory(2, steps=10, poison_at=POISON, fp16={
            "enabled": True, "initial_scale_power": 8}))
        res["ckpt"] = ckpt_run(out)
        res["ckpt3"] = attempt(lambda: ckpt_run(out, 3, "ckpt3", groups=True, zero_optimization=SUB))
        res["universal"] = attempt(lambda: universal_run(out))
        res["hf"] = hf_runs(out)
        # last: these leave an engine mid-step behind
        res["skip_nonfinite_groups"] = attempt(lambda: trajectory(2, groups=True, steps=2,
                                                                  options={"skip_nonfinite": True}))
        res["offload_groups"] = attempt(lambda: trajectory(2, groups=True, steps=2, zero_optimization={
            "stage": 2, "offload_optimizer": {"device": "cpu"}}, zero_force_ds_cpu_optimizer=False))
        res["wrong"] = wrong_run()
        res["wrong_groups"] = wrong_run(groups=True)
        torch.save(res, out / f"rank{r}.pt")
    except BaseException:
        (out / f"rank{r}.err").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    from teardown import leave

    main()
    leave()
