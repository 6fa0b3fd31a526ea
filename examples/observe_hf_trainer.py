# Hugging Face Trainer: Mechanic's scale and effective lr in every log (log history, TensorBoard, W&B, console).
# Run: python examples/observe_hf_trainer.py
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
import manic
from manic.integrations.transformers import MechanicCallback

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                   bos_token_id=0, eos_token_id=0))
starts = torch.randint(0, 64, (64, 1))
dataset = [{"input_ids": s, "labels": s} for s in (starts + torch.arange(16)) % 64]

opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)

with tempfile.TemporaryDirectory() as tmp:
    args = TrainingArguments(output_dir=tmp, max_steps=50, per_device_train_batch_size=8, logging_steps=10,
                             save_strategy="no", report_to=[],  # or ["tensorboard"], ["wandb"], ...: they get them too
                             use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched),
                      callbacks=[MechanicCallback()])  # or trainer.add_callback(MechanicCallback())
    trainer.train()

last = [log for log in trainer.state.log_history if "loss" in log][-1]
print(f"step {last['step']}: learning_rate {last['learning_rate']:.3g}, "
      f"mechanic/effective_lr {last['mechanic/effective_lr']:.3g}, scale {last['mechanic/scale']:.4g}")
