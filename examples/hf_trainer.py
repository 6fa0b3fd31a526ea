# Hugging Face Trainer + Mechanic: pass the mechanized optimizer and its scheduler as optimizers=.
# Run: python examples/hf_trainer.py
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
import manic

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                   bos_token_id=0, eos_token_id=0))
# synthetic, learnable sequences: each token is the previous one + 1
starts = torch.randint(0, 64, (64, 1))
dataset = [{"input_ids": s, "labels": s} for s in (starts + torch.arange(16)) % 64]

opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=1e-3))
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)

with tempfile.TemporaryDirectory() as tmp:
    args = TrainingArguments(output_dir=tmp, max_steps=50, per_device_train_batch_size=8, logging_steps=25,
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched))
    trainer.train()

print(f"scale {opt.scale.item():.4g}")
