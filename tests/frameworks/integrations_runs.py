"""The runs test_integrations.py checks: manic.integrations inside HF Trainer, Lightning, accelerate.

``hf(out_dir)`` trains a ``transformers.Trainer`` with ``MechanicCallback`` and returns what its log
history, a reporter-like callback and the console received, next to the true values recorded at
each step. Run under ``torchrun --nproc_per_node 2`` (``python integrations_runs.py OUT_DIR``), each
rank writes that to ``OUT_DIR/rank<r>.pt``. ``lightning(out_dir)`` fits a Lightning module with
``MechanicMonitor`` and a ``CSVLogger``. ``accelerate_rank`` (one of 2 gloo ranks) builds accelerate's
``AcceleratedOptimizer`` the way accelerate's FSDP2 preparation does (accelerate_fsdp2.py).
``deepspeed_rank`` builds DeepSpeed engines and logs through their monitor.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any

import torch

import manic
from manic.integrations import find_mechanic, readout

HF_STEPS = 12
HF_LOG_EVERY = 4
HF_EVAL_EVERY = 8
LR = 1e-2
S_INIT = 1e-6


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two param groups with different lrs: matrices, and the rest at half the lr."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices}, {"params": rest, "lr": LR / 2}]


def _decay(step: int) -> float:
    """A schedule that changes at every step, so that pairing the scale with the wrong step's lr shows."""
    return 1.0 - step / (2 * HF_STEPS)


# ----------------------------------------------------------------------------- HF Trainer
def hf(out_dir: str, distributed: bool = False) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations import is_tensorboard_available

    import hf_trainer_run
    from manic.integrations.transformers import MechanicCallback

    class Truth(TrainerCallback):
        """Scale and lrs of every optimizer step, recorded as the step ends."""

        def __init__(self, opt: manic.Mechanized) -> None:
            self.opt = opt
            self.lrs: list[float] = []
            self.at: dict[int, dict[str, Any]] = {}

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.lrs = [g["lr"] for g in self.opt.param_groups]  # this step's lrs, before the scheduler

        def on_step_end(self, args, state, control, **kwargs):
            self.at[state.global_step] = {"scale": float(self.opt.scale), "lrs": self.lrs}

    class Reporter(TrainerCallback):
        """What a report_to= integration receives: each on_log's logs, as they are when it runs."""

        def __init__(self) -> None:
            self.got: list[dict[str, Any]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                self.got.append({**logs, "step": state.global_step})

    model = hf_trainer_run.make_model()
    opt = manic.mechanize(torch.optim.AdamW(_groups(model), lr=LR), s_init=S_INIT)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _decay)
    truth, reporter = Truth(opt), Reporter()
    tensorboard = is_tensorboard_available()
    args = TrainingArguments(
        output_dir=out_dir, max_steps=HF_STEPS, per_device_train_batch_size=hf_trainer_run.BATCH, seed=42,
        logging_steps=HF_LOG_EVERY, eval_strategy="steps", eval_steps=HF_EVAL_EVERY, save_strategy="no",
        report_to=["tensorboard"] if tensorboard else [], use_cpu=True, disable_tqdm=True,  # console: PrinterCallback
        dataloader_num_workers=0,
        **({"ddp_backend": "gloo", "ddp_find_unused_parameters": False} if distributed else {}))
    data = hf_trainer_run.Tokens()
    kwargs = dict(model=model, args=args, train_dataset=data, eval_dataset=torch.utils.data.Subset(data, range(8)),
                  optimizers=(opt, sched))
    if distributed:  # the other documented way: add_callback after the Trainer is built
        trainer = Trainer(**kwargs, callbacks=[truth])
        trainer.add_callback(MechanicCallback())
    else:
        trainer = Trainer(**kwargs, callbacks=[MechanicCallback(), truth])
    # report_to= integrations sit before the user's callbacks: this one goes before all of them
    trainer.callback_handler.callbacks.insert(0, reporter)
    before = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        trainer.train()
    return {"log_history": trainer.state.log_history, "reporter": reporter.got, "truth": truth.at,
            "console": console.getvalue(), "callbacks_before": before,
            "callbacks_after": [type(c).__name__ for c in trainer.callback_handler.callbacks],
            "tensorboard": _tensorboard_scalars(out_dir) if tensorboard and trainer.is_world_process_zero() else None,
            "found_in_trainer": find_mechanic(trainer) is opt, "wrapper": type(trainer.optimizer).__name__,
            "world": trainer.args.world_size}


def _tensorboard_scalars(out_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoardCallback wrote under ``out_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in os.walk(out_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


# ----------------------------------------------------------------------------- Lightning
LIGHTNING_STEPS = 12
LIGHTNING_LOG_EVERY = 4


def lightning(out_dir: str) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from manic.integrations.lightning import MechanicMonitor

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
            self.seen: dict[str, Any] = {}

        def training_step(self, batch, batch_idx):
            if not self.seen:  # what a user holds inside the step: Lightning's LightningOptimizer
                wrapped = self.optimizers()
                self.seen = {"wrapper": type(wrapped).__name__, "wrapper_passes_for_it": isinstance(
                    wrapped, manic.Mechanized), "found": find_mechanic(wrapped) is self.opt}
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            self.opt = manic.mechanize(torch.optim.AdamW(_groups(self), lr=LR), s_init=S_INIT)
            sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _decay)
            return {"optimizer": self.opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Truth(Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []
            self.at: dict[int, dict[str, Any]] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs = [g["lr"] for g in pl_module.opt.param_groups]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # the step Lightning's loggers write this batch's metrics at
            self.at[trainer.fit_loop.epoch_loop._batches_that_stepped] = {
                "scale": float(pl_module.opt.scale), "lrs": self.lrs}

    torch.manual_seed(0)
    X = torch.randn(256, 8)
    y = X @ torch.randn(8, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)
    module, truth = Regression(), Truth()
    logger = CSVLogger(out_dir, name="run")
    trainer = L.Trainer(max_steps=LIGHTNING_STEPS, log_every_n_steps=LIGHTNING_LOG_EVERY, logger=logger,
                        callbacks=[MechanicMonitor(), LearningRateMonitor(), truth], accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return {"csv": os.path.join(logger.log_dir, "metrics.csv"), "truth": truth.at, "seen": module.seen,
            "found_in_trainer": find_mechanic(trainer) is module.opt,
            "found_in_module": find_mechanic(module) is module.opt}


# ----------------------------------------------------------------------------- accelerate
def accelerate_rank(rank: int, world: int) -> dict[str, Any]:
    """accelerate's AcceleratedOptimizer, built as ``Accelerator._prepare_fsdp2`` builds it (the
    replay in accelerate_fsdp2.py), around a mechanized optimizer; a few steps; what we find in it."""
    import accelerate_fsdp2 as A

    accelerator = A.make_accelerator(rank, world)
    model, opt, mech, _ = A.prepared(accelerator, A.fsdp2_plugin(), seed=0)
    A.train(model, opt, mech, 3)
    return {"wrapper": type(opt).__module__ + "." + type(opt).__name__, "found": find_mechanic(opt) is mech,
            "found_in_accelerator": find_mechanic(accelerator) is mech, "readout": readout(opt),
            "scale": float(mech.scale), "effective_lr": [float(e) for e in mech.effective_lr]}


# ----------------------------------------------------------------------------- DeepSpeed
DEEPSPEED_STEPS = 6
DEEPSPEED_LOG_EVERY = 2


def deepspeed_rank(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """A DeepSpeed engine per ZeRO stage (0: engine.optimizer is the client optimizer; 2: a ZeRO
    wrapper holding it), each with a csv_monitor, logging through docs/observability.md's line."""
    # the variables a launcher sets (the harness's gloo group is already up: DeepSpeed uses it)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    import deepspeed

    results: dict[str, Any] = {}
    for stage in (0, 2):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        opt = manic.mechanize(torch.optim.AdamW(net.parameters(), lr=LR), s_init=S_INIT)
        config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9,
                  "csv_monitor": {"enabled": True, "output_path": out_dir, "job_name": f"zero{stage}"}}
        engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        truth = {}
        for _ in range(DEEPSPEED_STEPS):
            engine.backward(torch.nn.functional.mse_loss(engine(X), y))
            engine.step()
            if engine.global_rank == 0 and engine.global_steps % DEEPSPEED_LOG_EVERY == 0:
                # docs/observability.md's line, verbatim
                engine.monitor.write_events([(f"Train/Samples/{k}", v, engine.global_samples) for k, v in readout(engine).items()])  # noqa: E501
                truth[engine.global_samples] = {"scale": float(opt.scale), "lr": opt.param_groups[0]["lr"]}
        results[f"zero{stage}"] = {"wrapper": type(engine.optimizer).__name__, "found": find_mechanic(engine) is opt,
                                   "truth": truth}
    return results


def main(out_dir: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    result = hf(os.path.join(out_dir, "trainer"), distributed=True)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from teardown import leave

    main(sys.argv[1])
    leave()
