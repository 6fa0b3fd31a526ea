"""``transformers.Trainer`` runs with a mechanized AdamW, for test_hf_trainer.py.

Imported by the test for the single-process runs; run under ``torchrun --nproc_per_node 2`` for
the DDP ones (``python hf_trainer_run.py OUT_DIR first|resume``), when each rank writes its
results to ``OUT_DIR/<tag>_rank<r>.pt``.

The model is a 2-layer Llama built from a config (no downloads, no dropout); the data are a
fixed synthetic token set; everything random is seeded, so two runs are bitwise equal.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch.utils.data import Dataset

import manic

STEPS = 40
SAVE_AT = STEPS // 2
BATCH = 4  # per device; 64 samples: 16 steps per epoch in one process, 8 per rank under DDP,
# so that the checkpoint falls inside an epoch (Trainer then skips the batches already seen)
S_INIT = 1e-6
LR = 1e-2


class Tokens(Dataset):
    """64 sequences of 16 tokens counting up from a random start (learnable: next = token + 1)."""

    def __init__(self, n: int = 64, seq: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.data = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def make_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         attention_dropout=0.0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _callback(opt: manic.Mechanized) -> Any:
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        """The scale after every optimizer step, and what the Trainer did with the optimizer."""

        def __init__(self) -> None:
            self.scales: list[float] = []
            self.seen: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            self.seen["optimizer"] = type(optimizer).__name__
            self.seen["wraps_mechanized"] = getattr(optimizer, "optimizer", None) is opt
            self.seen["scheduler"] = type(lr_scheduler).__name__
            self.seen["param_groups_same_list"] = opt.param_groups is opt.base_optimizer.param_groups
            self.seen["params_are_model_params"] = all(
                a is b for a, b in zip([p for g in opt.param_groups for p in g["params"]],
                                       kwargs["model"].parameters()))

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.scales.append(opt.scale.item())

    return Record()


def run(out_dir: str, steps: int = STEPS, save_steps: int | None = None, resume: str | None = None,
        distributed: bool = False) -> dict[str, Any]:
    """One Trainer.train(); the scales after each step, the final scale and parameters, and
    what the Trainer and accelerate did with the optimizer."""
    from transformers import Trainer, TrainingArguments

    model = make_model()
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=LR), s_init=S_INIT)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 5))
    calls: dict[str, int] = {"state_dict": 0, "load_state_dict": 0, "step": 0}
    opt.register_state_dict_pre_hook(lambda o: calls.__setitem__("state_dict", calls["state_dict"] + 1))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.__setitem__("load_state_dict",
                                                                          calls["load_state_dict"] + 1))
    opt.register_step_pre_hook(lambda o, a, k: calls.__setitem__("step", calls["step"] + 1))
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=BATCH, seed=42,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or steps,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        **({"ddp_backend": "gloo", "ddp_find_unused_parameters": False} if distributed else {}))
    record = _callback(opt)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched), callbacks=[record])
    trainer.train(resume_from_checkpoint=resume)
    return {"scales": record.scales, "final_scale": opt.scale.item(),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "seen": {**record.seen, "calls": calls, "scaler": repr(trainer.accelerator.scaler),
                     "accelerated_scheduler": type(trainer.lr_scheduler).__name__,
                     "world": trainer.args.world_size}}


def main(out_dir: str, phase: str) -> None:
    """Under torchrun: ``first`` runs the uninterrupted run and the one that saves at
    checkpoint-SAVE_AT (two Trainers, one after the other); ``resume`` resumes from it."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if phase == "first":
        results = {"uninterrupted": run(os.path.join(out_dir, "uninterrupted"), distributed=True),
                   "saving": run(os.path.join(out_dir, "saving"), save_steps=SAVE_AT, distributed=True)}
    else:
        results = {"resumed": run(os.path.join(out_dir, "resumed"), save_steps=SAVE_AT, distributed=True,
                                  resume=os.path.join(out_dir, "saving", f"checkpoint-{SAVE_AT}"))}
    for tag, r in results.items():
        torch.save(r, os.path.join(out_dir, f"{tag}_rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from teardown import leave

    main(sys.argv[1], sys.argv[2])
    leave()
