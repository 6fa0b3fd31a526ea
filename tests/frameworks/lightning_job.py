"""What tests/frameworks/test_lightning.py runs: manic under Lightning's own Trainer.

    python tests/frameworks/lightning_job.py MODE OUT_DIR        MODE: single | ddp | fsdp2

One launch trains four times, each a fresh LightningModule and Trainer (``N``
deterministic mini-batch steps of a tiny float64 MLP, AdamW under ``manic.mechanize`` and a per-step LR
schedule, all returned from ``configure_optimizers``):

  A  N steps uninterrupted; a ``ModelCheckpoint`` saves at step N/2 and training goes on
  B  ``max_steps=N/2``, then ``trainer.save_checkpoint``
  C  ``fit(ckpt_path=<B's checkpoint>)`` to N
  D  ``fit(ckpt_path=<A's ModelCheckpoint at N/2>)`` to N

Each rank's share of the data is a single batch, so every step sees the same data whatever
Lightning's loop bookkeeping does on resume. (With several batches per epoch, Lightning 2.6
resumes a run that ``max_steps`` stopped at an epoch boundary with one step of a spurious
"batch 4" of the finished epoch on a fresh iterator, then a new epoch: the batch order shifts by
one. That is Lightning's, not Mechanic's, and would make C differ from A for reasons unrelated
to the optimizer. A ``ModelCheckpoint`` taken at the same step resumes in order.)
For ``ddp`` and ``fsdp2`` Lightning's own launcher starts rank 1 (it re-runs this script with
``LOCAL_RANK=1``); every rank writes ``OUT_DIR/rank{r}.pt`` (the result of each run, plus what
Lightning did to the optimizer) or, on an error, ``OUT_DIR/rank{r}.err`` (the traceback).
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: nets.py
from nets import MLP  # noqa: E402

N = 40          # steps of a full run
HALF = N // 2   # where the interrupted run stops
LR = 1e-2
SAMPLES = 32    # split over the data-parallel ranks; each rank's share is one batch
PG_TIMEOUT = timedelta(seconds=45)


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def loader(world: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(SAMPLES, 8, generator=g, dtype=torch.float64)
    y = torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], dim=1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=SAMPLES // world,
                                       shuffle=False)


def _callers() -> list[str]:
    """The Lightning / torch.distributed.checkpoint frames that led here (outermost first)."""
    out = []
    for f in traceback.extract_stack()[:-2]:
        path = f.filename.replace(os.sep, "/")
        for root in ("lightning/", "torch/distributed/checkpoint/", "torch/optim/"):
            if root in path:
                out.append(f"{root}{path.split(root, 1)[1]}:{f.name}")
                break
    return out


def build_task(sharded: bool):  # -> lightning.LightningModule
    import lightning as L

    import manic

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = MLP(gain=False).double()
            self.events: list[Any] = []   # hook order, what configure_optimizers saw
            self.scales: list[torch.Tensor] = []
            self.trace: list[tuple] = []
            self.other_steps: list[list[str]] = []
            self.step_kwargs: list[list[str]] = []
            self.state_dict_callers: list[list[str]] = []
            self.load_state_dict_callers: list[list[str]] = []
            self.checkpoints: list[dict] = []

        def configure_model(self) -> None:
            self.events.append(("configure_model", [type(p).__name__ for p in self.net.parameters()]))
            if not sharded or is_dtensor(self.net.fc1.weight):
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net.fc1, self.net.fc2, self.net.fc3):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def configure_optimizers(self) -> dict:
            self.events.append(("configure_optimizers", [type(p).__name__ for p in self.parameters()],
                                type(self.trainer.strategy.model).__name__))
            opt = manic.mechanize(torch.optim.AdamW(self.parameters(), lr=LR))
            opt.register_step_pre_hook(self._pre_step)
            opt.register_state_dict_pre_hook(lambda o: self.state_dict_callers.append(_callers()))
            opt.register_load_state_dict_pre_hook(lambda o, sd: self.load_state_dict_callers.append(_callers()))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * N)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def _pre_step(self, opt: Any, args: tuple, kwargs: dict) -> None:
            # args[0] is the optimizer itself (torch's step wrapper passes it through)
            call = [f"{k}={'None' if v is None else type(v).__name__}" for k, v in sorted(kwargs.items())]
            self.step_kwargs.append(call + [f"arg{i}" for i in range(1, len(args))])
            if kwargs.get("closure", 0) is None and not args[1:]:
                # not Lightning's training step: record who stepped (e.g. DSD's _init_optim_state)
                self.other_steps.append(_callers())

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if not self.events or self.events[-1][0] != "training_step":
                lo = self.optimizers()
                self.events.append(("training_step", type(lo).__name__,
                                    [c.__name__ for c in type(lo).__mro__[:3]],
                                    lo._optimizer is self.trainer.optimizers[0],
                                    type(self.trainer.optimizers[0]).__name__))
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            opt = self.trainer.optimizers[0]
            self.scales.append(opt.scale.detach().clone())
            # (epoch, batch index, first input of the batch, the base LR the next step will use)
            self.trace.append((self.current_epoch, batch_idx, batch[0][0, 0].item(), opt.param_groups[0]["lr"]))

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            osd = checkpoint["optimizer_states"][0] if checkpoint.get("optimizer_states") else {}
            state = osd.get("state", {})
            first = next(iter(state.values()), {})
            self.checkpoints.append({
                "step": self.trainer.global_step,
                "keys": sorted(checkpoint),
                "optim_state_keys": [repr(k) for k in list(state)[:8]],
                "optim_entry": {k: type(v).__name__ for k, v in first.items()},
                "param_group_keys": sorted(osd["param_groups"][0]) if osd.get("param_groups") else [],
            })

    return Task()


def strategy(mode: str) -> Any:
    if mode == "single":
        return "auto"
    if mode == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(timeout=PG_TIMEOUT)
    from lightning.pytorch.strategies import ModelParallelStrategy

    # Plain Lightning on CPU: gloo (chosen by Lightning for a CPU root device), a (2, 1) mesh
    # named ("data_parallel", "tensor_parallel"); nothing is patched.
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=PG_TIMEOUT)


def fit(mode: str, out: Path, max_steps: int, ckpt_path: str | None = None, callbacks: tuple = (),
        save: str | None = None) -> dict:
    import lightning as L

    L.seed_everything(0, verbose=False)
    task = build_task(sharded=(mode == "fsdp2"))
    trainer = L.Trainer(accelerator="cpu", devices=1 if mode == "single" else 2, strategy=strategy(mode),
                        max_steps=max_steps, max_epochs=-1, callbacks=list(callbacks),
                        enable_checkpointing=bool(callbacks), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        deterministic=True, default_root_dir=str(out))
    trainer.fit(task, train_dataloaders=loader(1 if mode == "single" else 2), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return summary(task, trainer)


def summary(task: Any, trainer: Any) -> dict:
    opt = trainer.optimizers[0]
    params = list(task.net.parameters())
    mech = {id(p): st for p, st in opt.state.items() if any(k.startswith("mechanic_") for k in st)}
    bufs = [(p, k, v) for p, st in opt.state.items() for k, v in st.items() if k.startswith("mechanic_")]
    return {
        "scale": opt.scale.detach().clone(),
        "scales": torch.stack(task.scales) if task.scales else torch.empty(0, dtype=torch.float64),
        "params": [full(p).clone() for p in params],
        "global_step": trainer.global_step,
        "trace": task.trace,
        "lr": opt.param_groups[0]["lr"],
        "is_mechanized": type(opt).__name__,
        "events": task.events,
        "step_kwargs": task.step_kwargs[:2],
        "num_steps_seen": len(task.step_kwargs),
        "other_steps": task.other_steps,
        "state_dict_callers": task.state_dict_callers,
        "load_state_dict_callers": task.load_state_dict_callers,
        "checkpoints": task.checkpoints,
        # Mechanic's buffers: on the model's own parameters (by identity), one set per parameter
        "mechanic_keys_are_params": bool(mech) and all(any(k is p for p in params)
                                                       for k in opt.state if id(k) in mech),
        "params_with_mechanic": sum(id(p) in mech for p in params),
        "num_params": len(params),
        "mechanic_keys": sorted({k for _, k, _ in bufs}),
        "params_dtensor": [is_dtensor(p) for p in params],
        "buffers_dtensor": [is_dtensor(v) for _, _, v in bufs],
        "buffers_match_shards": all(local(v).shape == local(p).shape and
                                    (not is_dtensor(p) or v.placements == p.placements)
                                    for p, _, v in bufs),
        "mechanic_bytes": sum(local(v).numel() * local(v).element_size() for _, _, v in bufs),
        "local_param_bytes": sum(local(p).numel() * local(p).element_size() for p in params),
    }


def main(mode: str, out: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.set_num_threads(1)
    results = {}
    mc = ModelCheckpoint(dirpath=str(out / "mc"), filename="half-{step}", every_n_train_steps=HALF, save_top_k=-1)
    results["A"] = fit(mode, out, N, callbacks=(mc,))
    results["B"] = fit(mode, out, HALF, save=str(out / "stop.ckpt"))
    results["C"] = fit(mode, out, N, ckpt_path=str(out / "stop.ckpt"))
    results["D"] = fit(mode, out, N, ckpt_path=str(out / "mc" / f"half-step={HALF}.ckpt"))
    results["world"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    results["ckpt_is_dir"] = (out / "stop.ckpt").is_dir()
    torch.save(results, out / f"rank{rank()}.pt")


if __name__ == "__main__":
    mode_arg, out_arg = sys.argv[1], Path(sys.argv[2])
    try:
        main(mode_arg, out_arg)
    except BaseException:
        (out_arg / f"rank{rank()}.err").write_text(traceback.format_exc())
        raise
