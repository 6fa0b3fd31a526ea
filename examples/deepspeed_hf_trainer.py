# Hugging Face Trainer + DeepSpeed ZeRO-2 + Mechanic. With deepspeed= set, Trainer ignores optimizers=
# and builds its optimizer with create_optimizer(): override that to mechanize the one Trainer builds.
# Run: torchrun --standalone --nproc-per-node 2 examples/deepspeed_hf_trainer.py
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
import manic
from manic.integrations import find_mechanic
from manic.integrations.transformers import MechanicCallback


class MechanicTrainer(Trainer):
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            base = super().create_optimizer(model)  # Trainer's own AdamW: decay and no-decay groups
            # ZeRO gives each rank a slice of the parameters: Mechanic sums over the data-parallel group
            self.optimizer = manic.mechanize(base, process_group=torch.distributed.group.WORLD)
        return self.optimizer


ZERO2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto"}

if __name__ == "__main__":
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    starts = torch.randint(0, 64, (64, 1))  # learnable sequences: each token is the previous one + 1
    dataset = [{"input_ids": s, "labels": s} for s in (starts + torch.arange(16)) % 64]

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, deepspeed=ZERO2, max_steps=50, per_device_train_batch_size=8,
                                 learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=25,
                                 save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available())
        trainer = MechanicTrainer(model=model, args=args, train_dataset=dataset, callbacks=[MechanicCallback()])
        trainer.train()

    if trainer.is_world_process_zero():
        print(f"scale {find_mechanic(trainer).scale.item():.4g}")
